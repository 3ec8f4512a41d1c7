//! The worker's handles on segments (payloads in a memfd of their own, see `shoal_shm`'s
//! `segment` module), and the two ways bytes of a pinned object leave the node or reach it:
//! what the peer service streams, and where a pulled replica is written.
//!
//! A [`Seg`] is owned by the local store's segment table (keyed by generation) and dropped
//! when the store frees the entry (`Store::take_freed_segments`); views handed to peers hold
//! an `Arc` of its read-only mapping, so a drop while one streams only ends the memory when
//! it is done.
use shoal_shm::{Arena, ReadMap, Segment, ShmError};
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

/// One segment of a live entry.
#[derive(Debug)]
pub(crate) struct Seg {
    pub(crate) seg: Segment,
    /// Payload length (the memfd is rounded up to pages).
    pub(crate) len: u64,
    map: OnceLock<Arc<ReadMap>>,
    ro: OnceLock<OwnedFd>,
}

impl Seg {
    pub(crate) fn new(seg: Segment, len: u64) -> Self {
        Self {
            seg,
            len,
            map: OnceLock::new(),
            ro: OnceLock::new(),
        }
    }

    /// The worker's read-only mapping of the sealed segment (made on first use: spills and
    /// peers only).
    pub(crate) fn map(&self) -> Result<Arc<ReadMap>, ShmError> {
        if let Some(m) = self.map.get() {
            return Ok(m.clone());
        }
        let m = Arc::new(self.seg.map(self.len)?);
        Ok(self.map.get_or_init(|| m).clone())
    }

    /// A read-only fd of the sealed segment, for a reader.
    pub(crate) fn reader_fd(&self) -> Result<OwnedFd, ShmError> {
        if self.ro.get().is_none() {
            let fd = self.seg.read_only_fd()?;
            let _ = self.ro.set(fd);
        }
        match self.ro.get() {
            Some(fd) => fd
                .try_clone()
                .map_err(|source| ShmError::Map { size: 0, source }),
            None => Err(ShmError::Invalid("no read-only fd".into())),
        }
    }

    /// The read-write fd, for the one client that writes it (before it is sealed).
    pub(crate) fn writer_fd(&self) -> Result<OwnedFd, ShmError> {
        self.seg
            .fd()
            .try_clone_to_owned()
            .map_err(|source| ShmError::Map { size: 0, source })
    }
}

/// Bytes of a pinned object, as the peer service streams them.
#[derive(Debug)]
pub(crate) enum PinnedData {
    /// An arena object, copied out (arena objects are small: at most the inline limit).
    Copied(Vec<u8>),
    /// A range of a sealed segment, mapped read-only.
    Mapped {
        map: Arc<ReadMap>,
        offset: u64,
        len: u64,
    },
}

impl PinnedData {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            PinnedData::Copied(v) => v,
            PinnedData::Mapped { map, offset, len } => map.bytes(*offset, *len).unwrap_or(&[]),
        }
    }
}

/// Where a replica being pulled is written.
#[derive(Debug, Clone)]
pub(crate) enum ReplicaTarget {
    /// The arena, at this offset (small objects).
    Arena(u64),
    /// A segment of its own, written with `pwrite`.
    Segment(Arc<Seg>),
}

impl ReplicaTarget {
    /// Writes `bytes` at `off` of the replica's payload.
    pub(crate) fn write_at(&self, arena: &Arena, off: u64, bytes: &[u8]) -> Result<(), ShmError> {
        match self {
            ReplicaTarget::Arena(base) => {
                let at = base.checked_add(off).ok_or(ShmError::OutOfBounds {
                    offset: off,
                    len: bytes.len() as u64,
                    size: arena.size(),
                })?;
                arena.write(at, bytes)
            }
            ReplicaTarget::Segment(s) => s.seg.write_at(off, bytes),
        }
    }
}
