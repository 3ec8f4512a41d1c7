//! The store's file: one full snapshot of the data, written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced, so a crash leaves the old or the new
//! snapshot, never a mix. Format: `SHOALMETA` magic, `u16` format version, `u64` body length,
//! `u32` CRC-32 of the body (all little-endian), then the postcard body. Decoding returns an
//! error for any damaged file, never panics, and never yields an empty store by accident.
use crate::keys;
use crate::types::{LeaseId, MetaError, Revision};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Data, Entry, Lease};

const MAGIC: &[u8; 9] = b"SHOALMETA";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = MAGIC.len() + 2 + 8 + 4;
/// Revisions a file may hold are below this.
const MAX_REVISION: Revision = 1 << 62;

#[derive(Serialize)]
struct SnapshotRef<'a> {
    revision: Revision,
    next_lease: LeaseId,
    keys: &'a BTreeMap<String, Entry>,
    leases: Vec<(LeaseId, u64)>,
}

#[derive(Deserialize)]
struct Snapshot {
    revision: Revision,
    next_lease: LeaseId,
    keys: BTreeMap<String, Entry>,
    leases: Vec<(LeaseId, u64)>,
}

fn tmp_path(path: &Path) -> Result<PathBuf, MetaError> {
    let name = path.file_name().ok_or_else(|| {
        MetaError::InvalidArgument(format!("metadata file {} has no file name", path.display()))
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

pub(super) fn encode_snapshot(data: &Data) -> Result<Vec<u8>, MetaError> {
    let body = postcard::to_stdvec(&SnapshotRef {
        revision: data.revision,
        next_lease: data.next_lease,
        keys: &data.keys,
        leases: data
            .leases
            .iter()
            .map(|(id, l)| (*id, l.ttl_secs))
            .collect(),
    })
    .map_err(|e| MetaError::Backend(format!("encoding the metadata snapshot: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub(super) fn write_snapshot(path: &Path, data: &Data) -> Result<(), MetaError> {
    let bytes = encode_snapshot(data)?;
    let tmp = tmp_path(path)?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    };
    write()
        .map_err(|e| MetaError::Backend(format!("writing metadata file {}: {e}", path.display())))
}

pub(super) fn load(path: &Path) -> Result<Option<Data>, MetaError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(MetaError::Backend(format!(
                "metadata file {}: cannot read it: {e}",
                path.display()
            )))
        }
    };
    decode_snapshot(&bytes).map(Some).map_err(|what| {
        MetaError::Backend(format!(
            "metadata file {}: {what}; refusing to start from a damaged store (restore it from a \
             backup, or move it away to start empty)",
            path.display()
        ))
    })
}

/// Decodes and checks a snapshot file's bytes; the error says what is wrong.
pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<Data, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if &header[..MAGIC.len()] != MAGIC {
        return Err("bad magic: not a shoal metadata file".into());
    }
    let field = |at: usize, n: usize| &header[MAGIC.len() + at..MAGIC.len() + at + n];
    let version = u16::from_le_bytes([field(0, 2)[0], field(0, 2)[1]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(field(2, 8));
    let len = u64::from_le_bytes(len);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(field(10, 4));
    let crc = u32::from_le_bytes(crc);
    if (body.len() as u64) < len {
        return Err(format!(
            "truncated: the header announces {len} body bytes, the file holds {}",
            body.len()
        ));
    }
    if (body.len() as u64) > len {
        return Err(format!(
            "{} unexpected bytes after the {len}-byte body",
            body.len() as u64 - len
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "checksum mismatch (stored {crc:#010x}, computed {actual:#010x}): the file is corrupt"
        ));
    }
    let snap: Snapshot =
        postcard::from_bytes(body).map_err(|e| format!("the body does not decode: {e}"))?;
    // A negative revision, or one so high that writes would soon overflow it (2^62 is 146,000
    // years of a million writes a second), is no revision the store wrote; neither is a key or
    // a value over the limits every write is checked against.
    if !(0..MAX_REVISION).contains(&snap.revision) {
        return Err(format!("inconsistent: revision {}", snap.revision));
    }
    let mut leases = BTreeMap::new();
    for (id, ttl_secs) in snap.leases {
        if id <= 0 || ttl_secs == 0 || ttl_secs > keys::MAX_LEASE_TTL.as_secs() {
            return Err(format!(
                "inconsistent: lease {id} with a TTL of {ttl_secs} s"
            ));
        }
        leases.insert(
            id,
            Lease {
                ttl_secs,
                keys: BTreeSet::new(),
            },
        );
    }
    for (key, e) in &snap.keys {
        if key.len() > keys::MAX_KEY_LEN || e.value.len() > keys::MAX_VALUE_LEN {
            return Err(format!(
                "inconsistent: key {:?}... of {} bytes with a value of {} bytes, over the limits",
                key.chars().take(32).collect::<String>(),
                key.len(),
                e.value.len()
            ));
        }
        if key.is_empty()
            || e.create_revision < 1
            || e.create_revision > e.mod_revision
            || e.mod_revision > snap.revision
        {
            return Err(format!("inconsistent: revisions of key {key:?}"));
        }
        if let Some(id) = e.lease {
            match leases.get_mut(&id) {
                Some(l) => {
                    l.keys.insert(key.clone());
                }
                None => {
                    return Err(format!(
                        "inconsistent: key {key:?} names missing lease {id}"
                    ))
                }
            }
        }
    }
    Ok(Data {
        revision: snap.revision,
        next_lease: snap.next_lease.max(1),
        keys: snap.keys,
        leases,
    })
}
