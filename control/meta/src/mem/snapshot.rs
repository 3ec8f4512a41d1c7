//! The snapshot file: the whole data as of one log sequence number, written only by a
//! compaction (see `disk`), never per mutation.
//!
//! Format 2: `SHOALMETA` magic, `u16` format version, `u64` body length, `u64` XXH3-64 of the
//! body (all little-endian), then the postcard body (sequence number, revision, next lease
//! id, keys, leases). Format 1 (written by earlier versions: a CRC-32 in place of the XXH3 and
//! no sequence number) is still read. Decoding returns an error for any damaged file, never
//! panics, and never yields an empty store by accident.
use super::image::{StoreFile, StoreFileError};
use super::{Data, Entry, Lease};
use crate::keys;
use crate::types::{LeaseId, MetaError, Revision};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

const MAGIC: &[u8; 9] = b"SHOALMETA";
const FORMAT_VERSION: u16 = 2;
const V1_HEADER_LEN: usize = MAGIC.len() + 2 + 8 + 4;
const HEADER_LEN: usize = MAGIC.len() + 2 + 8 + 8;
const FILE: StoreFile = StoreFile::Snapshot;
/// Revisions a file may hold are below this.
const MAX_REVISION: Revision = 1 << 62;

#[derive(Serialize)]
struct SnapshotRef<'a> {
    seq: u64,
    revision: Revision,
    next_lease: LeaseId,
    keys: &'a BTreeMap<String, Entry>,
    leases: Vec<(LeaseId, u64)>,
}

#[derive(Deserialize)]
struct Snapshot {
    seq: u64,
    revision: Revision,
    next_lease: LeaseId,
    keys: BTreeMap<String, Entry>,
    leases: Vec<(LeaseId, u64)>,
}

#[derive(Deserialize)]
struct SnapshotV1 {
    revision: Revision,
    next_lease: LeaseId,
    keys: BTreeMap<String, Entry>,
    leases: Vec<(LeaseId, u64)>,
}

/// The snapshot file's bytes for `data`, which includes every record up to `seq`.
pub(super) fn encode_snapshot(data: &Data, seq: u64) -> Result<Vec<u8>, MetaError> {
    let body = postcard::to_stdvec(&SnapshotRef {
        seq,
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
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Splits `bytes` into a header of `header_len` and a body of the announced length.
fn body_of(bytes: &[u8], header_len: usize) -> Result<&[u8], StoreFileError> {
    if bytes.len() < header_len {
        return Err(StoreFileError::ShortHeader {
            file: FILE,
            len: bytes.len(),
            need: header_len,
        });
    }
    let at = MAGIC.len() + 2;
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[at..at + 8]);
    let announced = u64::from_le_bytes(len);
    let body = &bytes[header_len..];
    let held = body.len() as u64;
    if held < announced {
        return Err(StoreFileError::ShortBody {
            file: FILE,
            announced,
            held,
        });
    }
    if held > announced {
        return Err(StoreFileError::Trailing {
            file: FILE,
            extra: held - announced,
            len: announced,
        });
    }
    Ok(body)
}

/// Decodes and checks a snapshot file's bytes: the data and the sequence number it includes.
pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<(Data, u64), StoreFileError> {
    if bytes.len() < MAGIC.len() + 2 {
        return Err(StoreFileError::ShortHeader {
            file: FILE,
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StoreFileError::BadMagic { file: FILE });
    }
    let version = u16::from_le_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]);
    let sum_at = MAGIC.len() + 2 + 8;
    let snap = match version {
        1 => {
            let body = body_of(bytes, V1_HEADER_LEN)?;
            let mut crc = [0u8; 4];
            crc.copy_from_slice(&bytes[sum_at..sum_at + 4]);
            let stored = u32::from_le_bytes(crc);
            let computed = crc32fast::hash(body);
            if stored != computed {
                return Err(StoreFileError::Checksum {
                    file: FILE,
                    stored: stored.into(),
                    computed: computed.into(),
                });
            }
            let v1: SnapshotV1 =
                postcard::from_bytes(body).map_err(|e| StoreFileError::Undecodable {
                    file: FILE,
                    reason: e.to_string(),
                })?;
            Snapshot {
                seq: 0,
                revision: v1.revision,
                next_lease: v1.next_lease,
                keys: v1.keys,
                leases: v1.leases,
            }
        }
        FORMAT_VERSION => {
            let body = body_of(bytes, HEADER_LEN)?;
            let mut sum = [0u8; 8];
            sum.copy_from_slice(&bytes[sum_at..sum_at + 8]);
            let stored = u64::from_le_bytes(sum);
            let computed = xxhash_rust::xxh3::xxh3_64(body);
            if stored != computed {
                return Err(StoreFileError::Checksum {
                    file: FILE,
                    stored,
                    computed,
                });
            }
            postcard::from_bytes(body).map_err(|e| StoreFileError::Undecodable {
                file: FILE,
                reason: e.to_string(),
            })?
        }
        found => {
            return Err(StoreFileError::Version {
                file: FILE,
                found,
                supported: FORMAT_VERSION,
            })
        }
    };
    let inconsistent = |what: String| StoreFileError::Inconsistent(what);
    // A negative revision, or one so high that writes would soon overflow it (2^62 is 146,000
    // years of a million writes a second), is no revision the store wrote.
    if !(0..MAX_REVISION).contains(&snap.revision) {
        return Err(inconsistent(format!("revision {}", snap.revision)));
    }
    let mut leases = BTreeMap::new();
    for (id, ttl_secs) in snap.leases {
        if id <= 0 || ttl_secs == 0 || ttl_secs > keys::MAX_LEASE_TTL.as_secs() {
            return Err(inconsistent(format!(
                "lease {id} with a TTL of {ttl_secs} s"
            )));
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
        if key.is_empty()
            || e.create_revision < 1
            || e.create_revision > e.mod_revision
            || e.mod_revision > snap.revision
        {
            return Err(inconsistent(format!("revisions of key {key:?}")));
        }
        // Nor is a key or a value over the limits every write is checked against.
        if key.len() > keys::MAX_KEY_LEN || e.value.len() > keys::MAX_VALUE_LEN {
            return Err(inconsistent(format!(
                "key {:?}... of {} bytes with a value of {} bytes, over the limits",
                key.chars().take(32).collect::<String>(),
                key.len(),
                e.value.len()
            )));
        }
        if let Some(id) = e.lease {
            match leases.get_mut(&id) {
                Some(l) => {
                    l.keys.insert(key.clone());
                }
                None => {
                    return Err(inconsistent(format!(
                        "key {key:?} names missing lease {id}"
                    )))
                }
            }
        }
    }
    Ok((
        Data {
            revision: snap.revision,
            next_lease: snap.next_lease.max(1),
            keys: snap.keys,
            leases,
        },
        snap.seq,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Serialize)]
    struct V1 {
        revision: Revision,
        next_lease: LeaseId,
        keys: BTreeMap<String, Entry>,
        leases: Vec<(LeaseId, u64)>,
    }

    #[test]
    fn format_1_files_still_load() {
        let mut keys = BTreeMap::new();
        keys.insert(
            "k".to_owned(),
            Entry {
                value: b"v".to_vec(),
                create_revision: 1,
                mod_revision: 3,
                lease: Some(9),
            },
        );
        let body = postcard::to_stdvec(&V1 {
            revision: 3,
            next_lease: 10,
            keys,
            leases: vec![(9, 30)],
        })
        .unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&1u16.to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend_from_slice(&body);
        let (data, seq) = decode_snapshot(&file).unwrap();
        assert_eq!((data.revision, data.next_lease, seq), (3, 10, 0));
        assert!(data.leases[&9].keys.contains("k"));
        let last = file.len() - 1;
        file[last] ^= 1;
        assert!(matches!(
            decode_snapshot(&file),
            Err(StoreFileError::Checksum { .. })
        ));
    }
}
