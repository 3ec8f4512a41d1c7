//! Recovery as a pure function of the two files' bytes: [`decode_store`] is everything
//! [`super::MemStore::open`] does with what it reads (the file handling is in `disk`), and the
//! entry point for fuzzing the loader. It never panics and allocates only in proportion to
//! its input.
use super::change::Record;
use super::log::{self, Scan};
use super::snapshot::decode_snapshot;
use super::Data;
use crate::types::Revision;

/// Which of the embedded store's files an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFile {
    /// The snapshot (the path given to [`super::MemStore::open`]).
    Snapshot,
    /// The log of mutations since the snapshot (that path with `.log` appended).
    Log,
}

impl std::fmt::Display for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreFile::Snapshot => "snapshot",
            StoreFile::Log => "log",
        })
    }
}

/// Why the embedded store's files cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreFileError {
    /// The file is shorter than its header.
    #[error("{file} truncated: {len} bytes, shorter than the {need}-byte header")]
    ShortHeader {
        /// Which file.
        file: StoreFile,
        /// Its length.
        len: usize,
        /// The header's length.
        need: usize,
    },
    /// Not one of shoal's metadata files.
    #[error("bad magic: not a shoal metadata {file}")]
    BadMagic {
        /// Which file.
        file: StoreFile,
    },
    /// A format this build does not read.
    #[error("{file} format version {found} is not supported (this build reads {supported})")]
    Version {
        /// Which file.
        file: StoreFile,
        /// The version in the file.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// The snapshot's body is shorter than its header announces.
    #[error(
        "{file} truncated: the header announces {announced} body bytes, the file holds {held}"
    )]
    ShortBody {
        /// Which file.
        file: StoreFile,
        /// Announced length.
        announced: u64,
        /// Bytes present.
        held: u64,
    },
    /// Bytes after the snapshot's body.
    #[error("{file}: {extra} unexpected bytes after the {len}-byte body")]
    Trailing {
        /// Which file.
        file: StoreFile,
        /// How many.
        extra: u64,
        /// The body's length.
        len: u64,
    },
    /// A checksum does not match.
    #[error("{file} checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt")]
    Checksum {
        /// Which file.
        file: StoreFile,
        /// The stored checksum.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// The checksum matches but the body does not decode.
    #[error("{file}: the body does not decode: {reason}")]
    Undecodable {
        /// Which file.
        file: StoreFile,
        /// The decoder's error.
        reason: String,
    },
    /// The snapshot decodes but contradicts itself.
    #[error("snapshot inconsistent: {0}")]
    Inconsistent(String),
    /// A log record that is damaged (and not an interrupted write), out of sequence, or
    /// that does not fit the data before it.
    #[error("log corrupt at byte {offset}: {reason}")]
    CorruptRecord {
        /// File offset of the record's frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log starts after the snapshot: records in between are missing.
    #[error(
        "the log follows sequence number {log_base} but the snapshot ends at {snapshot_seq}: \
         they are not from the same store, or records are missing"
    )]
    Mismatch {
        /// The sequence number the log follows.
        log_base: u64,
        /// The sequence number the snapshot includes.
        snapshot_seq: u64,
    },
}

impl StoreFileError {
    /// The file the error is about.
    pub(super) fn file(&self) -> StoreFile {
        match self {
            StoreFileError::ShortHeader { file, .. }
            | StoreFileError::BadMagic { file }
            | StoreFileError::Version { file, .. }
            | StoreFileError::ShortBody { file, .. }
            | StoreFileError::Trailing { file, .. }
            | StoreFileError::Checksum { file, .. }
            | StoreFileError::Undecodable { file, .. } => *file,
            StoreFileError::Inconsistent(_) => StoreFile::Snapshot,
            StoreFileError::CorruptRecord { .. } | StoreFileError::Mismatch { .. } => {
                StoreFile::Log
            }
        }
    }
}

/// The store as recovered from its files' bytes.
#[derive(Debug)]
pub struct StoreImage {
    pub(super) data: Data,
    /// The last sequence number included (snapshot and replayed records).
    pub(super) seq: u64,
    /// Bytes of the log that are intact (header included); 0 without a log.
    pub(super) log_valid: u64,
    /// Bytes after those: the torn tail of an interrupted write.
    pub(super) torn: u64,
}

impl StoreImage {
    /// The store's revision.
    pub fn revision(&self) -> Revision {
        self.data.revision
    }

    /// How many keys it holds.
    pub fn keys(&self) -> usize {
        self.data.keys.len()
    }

    /// How many leases it holds.
    pub fn leases(&self) -> usize {
        self.data.leases.len()
    }

    /// The sequence number of the last mutation it includes.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes at the end of the log dropped as the torn tail of an interrupted write.
    pub fn torn_bytes(&self) -> u64 {
        self.torn
    }
}

/// Recovers the embedded store from its snapshot's bytes and, if there is one, its log's:
/// the snapshot, then every log record after it up to the first torn or damaged one. A torn
/// tail (an interrupted write) is reported in [`StoreImage::torn_bytes`]; any other damage
/// is an error. Records the snapshot already includes (a log left behind by a compaction
/// that was interrupted before it replaced the log) are checked and skipped.
pub fn decode_store(snapshot: &[u8], log: Option<&[u8]>) -> Result<StoreImage, StoreFileError> {
    let (mut data, snap_seq) = decode_snapshot(snapshot)?;
    let Some(log) = log else {
        return Ok(StoreImage {
            data,
            seq: snap_seq,
            log_valid: 0,
            torn: 0,
        });
    };
    let Scan {
        base,
        records,
        valid_len,
        torn,
    } = log::scan(log)?;
    if base > snap_seq {
        return Err(StoreFileError::Mismatch {
            log_base: base,
            snapshot_seq: snap_seq,
        });
    }
    let mut seq = snap_seq;
    for (offset, rec) in records {
        if rec.seq <= snap_seq {
            continue;
        }
        seq = rec.seq;
        apply(&mut data, offset, rec)?;
    }
    Ok(StoreImage {
        data,
        seq,
        log_valid: valid_len,
        torn,
    })
}

fn apply(data: &mut Data, offset: u64, rec: Record) -> Result<(), StoreFileError> {
    data.replay(rec)
        .map_err(|reason| StoreFileError::CorruptRecord {
            offset,
            reason: format!("the record does not fit the data before it: {reason}"),
        })
}
