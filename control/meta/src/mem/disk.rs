//! The store's two files and the steps that keep them: a snapshot (`path`) and the log of
//! mutations since it (`path` + `.log`).
//!
//! - **Commit**: a mutation is one log record, appended and fsynced (`fdatasync`) before the
//!   mutation becomes visible. If the append fails, the file is cut back to where it was (so a
//!   half-written record never sits before later ones) and the caller undoes the mutation. If
//!   even that fails, the log is not appended to again: the next commit writes a snapshot.
//! - **Compaction**: once the log is larger than both [`MemStoreOptions::log_min_bytes`] and
//!   [`MemStoreOptions::log_ratio`] times the snapshot, the data is written as a new snapshot
//!   (temporary file `0600`, `O_EXCL|O_NOFOLLOW`, fsync, rename, fsync of the directory), then
//!   a new empty log replaces the old one the same way. Work per mutation is thus one record
//!   plus, amortised, `1 / log_ratio` of a snapshot. A crash between the two renames leaves a
//!   snapshot that already includes the old log's records: recovery skips them by sequence
//!   number. A mutation too large for one record is persisted by a compaction.
//! - **Open**: the pure [`decode_store`] over both files' bytes; a torn tail is cut off the
//!   log (and logged), any other damage refuses to open, naming the file.
//!
//! [`MemStoreOptions::log_min_bytes`]: super::MemStoreOptions::log_min_bytes
//! [`MemStoreOptions::log_ratio`]: super::MemStoreOptions::log_ratio
use super::change::Change;
use super::change::RecordRef;
use super::files;
use super::image::{decode_store, StoreFile};
use super::log::{self, MAX_RECORD};
use super::snapshot::encode_snapshot;
use super::{Data, MemStoreOptions};
use crate::types::MetaError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files of a persisted store and where they stand.
#[derive(Debug)]
pub(super) struct Disk {
    path: PathBuf,
    log_path: PathBuf,
    tmp: PathBuf,
    log_tmp: PathBuf,
    /// The log, open for appending; `None` when it must be replaced before the next append.
    log: Option<File>,
    /// Sequence number of the last durable mutation.
    seq: u64,
    log_len: u64,
    snapshot_len: u64,
    /// Compact once the log is longer than this.
    compact_at: u64,
    min_log: u64,
    ratio: u64,
    frame: Vec<u8>,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> MetaError {
    MetaError::Backend(format!("{what} {}: {e}", path.display()))
}

impl Disk {
    /// Opens (or creates, when neither file exists) the store at `path`; returns its data.
    pub(super) fn open(path: &Path, options: &MemStoreOptions) -> Result<(Disk, Data), MetaError> {
        let sibling = |suffix| {
            files::sibling(path, suffix).map_err(|e| MetaError::InvalidArgument(e.to_string()))
        };
        let mut disk = Disk {
            path: path.to_path_buf(),
            log_path: sibling(".log")?,
            tmp: sibling(".tmp")?,
            log_tmp: sibling(".log.tmp")?,
            log: None,
            seq: 0,
            log_len: 0,
            snapshot_len: 0,
            compact_at: 0,
            min_log: options.log_min_bytes,
            ratio: u64::from(options.log_ratio.max(1)),
            frame: Vec::new(),
        };
        let read = |p: &Path| {
            files::read(p).map_err(|e| {
                MetaError::Backend(format!(
                    "metadata file {}: cannot read it: {e}",
                    p.display()
                ))
            })
        };
        let snapshot = read(path)?;
        let log = read(&disk.log_path)?;
        let data = match snapshot {
            None if log.is_some() => {
                return Err(MetaError::Backend(format!(
                    "metadata file {} is missing but its log {} exists; refusing to start from \
                     a partial store (restore the snapshot from a backup, or move the log away \
                     to start empty)",
                    path.display(),
                    disk.log_path.display()
                )))
            }
            None => {
                let data = Data::empty();
                disk.write_snapshot(&data, 0)?;
                disk.replace_log()?;
                data
            }
            Some(snapshot) => {
                let image = decode_store(&snapshot, log.as_deref()).map_err(|e| {
                    let file = match e.file() {
                        StoreFile::Snapshot => path,
                        StoreFile::Log => &disk.log_path,
                    };
                    MetaError::Backend(format!(
                        "metadata file {}: {e}; refusing to start from a damaged store (restore \
                         it from a backup, or move it away to start empty)",
                        file.display()
                    ))
                })?;
                disk.seq = image.seq;
                disk.snapshot_len = snapshot.len() as u64;
                if log.is_none() {
                    disk.replace_log()?;
                } else {
                    let f = files::open_append(&disk.log_path)
                        .map_err(|e| io_error("opening metadata log", &disk.log_path, e))?;
                    if image.torn > 0 {
                        tracing::warn!(
                            log = %disk.log_path.display(),
                            bytes = image.torn,
                            "cutting off the torn tail of the metadata log (a write interrupted by a crash)"
                        );
                        f.set_len(image.log_valid)
                            .and_then(|()| f.sync_all())
                            .map_err(|e| io_error("truncating metadata log", &disk.log_path, e))?;
                    }
                    disk.log = Some(f);
                    disk.log_len = image.log_valid;
                    disk.set_compact_at();
                }
                image.data
            }
        };
        if disk.log_len > disk.compact_at {
            if let Err(e) = disk.compact(&data) {
                tracing::warn!(error = %e, "compacting the metadata log failed; will retry");
                disk.back_off();
            }
        }
        Ok((disk, data))
    }

    fn set_compact_at(&mut self) {
        self.compact_at = self
            .min_log
            .max(self.snapshot_len.saturating_mul(self.ratio));
    }

    /// After a failed compaction: try again once the log has grown by another minimum.
    fn back_off(&mut self) {
        self.compact_at = self.log_len.saturating_add(self.min_log.max(1));
    }

    /// Appends go to `f` from now on (tests: a file whose writes fail).
    #[cfg(test)]
    pub(super) fn set_log_for_test(&mut self, f: File) {
        self.log = Some(f);
    }

    /// Bytes of the snapshot and of the log.
    pub(super) fn sizes(&self) -> (u64, u64) {
        (self.snapshot_len, self.log_len)
    }

    /// Makes one mutation durable: `data` is the state after it, `changes` what it did.
    /// On error nothing of it is durable and the caller undoes it.
    pub(super) fn commit(&mut self, data: &Data, changes: &[Change]) -> Result<(), MetaError> {
        let seq = self.seq + 1;
        let payload = postcard::to_stdvec(&RecordRef {
            seq,
            revision: data.revision,
            next_lease: data.next_lease,
            changes,
        })
        .map_err(|e| MetaError::Backend(format!("encoding a metadata log record: {e}")))?;
        let Some(file) = self.log.as_mut().filter(|_| payload.len() <= MAX_RECORD) else {
            // No usable log, or a record too large for it: the mutation goes into a snapshot.
            self.write_snapshot(data, seq)?;
            if let Err(e) = self.replace_log() {
                // The old log lacks this mutation: appending after it would leave a gap.
                self.log = None;
                tracing::warn!(error = %e, "replacing the metadata log failed; the next mutation writes a snapshot again");
            }
            return Ok(());
        };
        self.frame.clear();
        log::encode_frame(&payload, &mut self.frame);
        let appended = file.write_all(&self.frame).and_then(|()| file.sync_data());
        if let Err(e) = appended {
            // Cut the partial record off, so that a later record never follows it.
            if file
                .set_len(self.log_len)
                .and_then(|()| file.sync_all())
                .is_err()
            {
                self.log = None;
            }
            return Err(io_error("appending to metadata log", &self.log_path, e));
        }
        self.seq = seq;
        self.log_len += self.frame.len() as u64;
        if self.log_len > self.compact_at {
            if let Err(e) = self.compact(data) {
                tracing::warn!(error = %e, "compacting the metadata log failed; will retry");
                self.back_off();
            }
        }
        Ok(())
    }

    /// Writes `data` (everything up to the last durable mutation) as the snapshot and starts
    /// an empty log. If only the log replacement fails, the old log stays in use (the new
    /// snapshot includes its records, so it is still consistent with it).
    pub(super) fn compact(&mut self, data: &Data) -> Result<(), MetaError> {
        self.write_snapshot(data, self.seq)?;
        self.replace_log()
    }

    fn write_snapshot(&mut self, data: &Data, seq: u64) -> Result<(), MetaError> {
        let bytes = encode_snapshot(data, seq)?;
        files::write_atomic(&self.tmp, &self.path, &bytes)
            .map_err(|e| io_error("writing metadata file", &self.path, e))?;
        self.seq = seq;
        self.snapshot_len = bytes.len() as u64;
        Ok(())
    }

    /// Replaces the log with an empty one following the snapshot of `self.seq`.
    fn replace_log(&mut self) -> Result<(), MetaError> {
        let header = log::encode_header(self.seq);
        match files::write_atomic(&self.log_tmp, &self.log_path, &header) {
            Ok(f) => {
                self.log = Some(f);
                self.log_len = header.len() as u64;
                self.set_compact_at();
                Ok(())
            }
            Err(e) => Err(io_error("replacing metadata log", &self.log_path, e)),
        }
    }
}
