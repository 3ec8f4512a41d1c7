//! Zero-copy views of sealed objects, and writable buffers of objects being created.
//!
//! A view reads either the arena (mapped read-only at connect) or a sealed segment (mapped
//! read-only on first use and cached, see `Shared`); in both cases nobody can write the bytes
//! while the view pins them. A buffer is either this process's own memory (payloads up to the
//! inline limit: sealing sends them inline) or the client's own segment, mapped read-write
//! until sealing unmaps it; no shared memory that another process reads is ever writable here.
use crate::client::Shared;
use crate::Error;
use shoal_protocol::{ObjectId, Request, ViewDesc};
use shoal_shm::{FastPin, ReadMap, SegmentWriter};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

#[derive(Debug)]
enum Pin {
    /// Pinned in this client's pin page (no syscall to take or end).
    Fast(Option<FastPin>),
    /// Pinned by the worker for this connection; ended with a one-way `Release`.
    Socket(u64),
}

/// A read-only, zero-copy view of a sealed object or KV value in shared memory. The object
/// cannot be evicted or freed while the view lives; dropping it releases the pin.
pub struct View {
    shared: Arc<Shared>,
    /// The segment it reads (`None`: the arena).
    segment: Option<Arc<ReadMap>>,
    offset: u64,
    len: u64,
    pin: Pin,
}

impl View {
    pub(crate) fn fast(shared: Arc<Shared>, pin: FastPin, segment: Option<Arc<ReadMap>>) -> Self {
        Self {
            offset: pin.offset,
            len: pin.len,
            shared,
            segment,
            pin: Pin::Fast(Some(pin)),
        }
    }

    /// A view the worker pinned; checked against its mapping before use.
    pub(crate) fn socket(
        shared: Arc<Shared>,
        d: ViewDesc,
        segment: Option<Arc<ReadMap>>,
    ) -> Result<Self, Error> {
        let v = Self {
            shared,
            segment,
            offset: d.offset,
            len: d.len,
            pin: Pin::Socket(d.gen),
        };
        v.map().bytes(d.offset, d.len)?;
        Ok(v)
    }

    fn map(&self) -> &ReadMap {
        self.segment.as_deref().unwrap_or(&self.shared.arena)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // In bounds: checked when the view was made.
        self.map().bytes(self.offset, self.len).unwrap_or(&[])
    }

    /// Whether this view was taken without a syscall (diagnostics and benchmarks).
    pub fn is_fast(&self) -> bool {
        matches!(self.pin, Pin::Fast(_))
    }
}

impl Deref for View {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("segment", &self.segment.is_some())
            .field("fast", &self.is_fast())
            .finish()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        match &mut self.pin {
            Pin::Fast(p) => {
                if let (Some(pin), Some(fast)) = (p.take(), self.shared.fast.as_ref()) {
                    fast.release(pin);
                }
            }
            Pin::Socket(gen) => self.shared.one_way(Request::Release { gens: vec![*gen] }),
        }
    }
}

enum Buf {
    /// Process memory, sent inline on seal.
    Local(Vec<u8>),
    /// The object's own segment, mapped read-write until sealing.
    Segment(SegmentWriter),
}

/// A writable buffer for an object this client creates. Fill it, then
/// [`ObjectBuilder::seal`]; dropping it unsealed discards the object.
///
/// Up to the inline limit the buffer is this process's memory and nothing exists on the
/// worker until the seal (a taken name is then `AlreadyExists` at seal); above it the worker
/// has made the object (unsealed) and the buffer is its segment.
pub struct ObjectBuilder {
    shared: Arc<Shared>,
    id: ObjectId,
    buf: Buf,
    done: bool,
}

impl ObjectBuilder {
    /// A buffer in process memory (payloads up to the inline limit).
    pub(crate) fn local(shared: Arc<Shared>, id: ObjectId, len: usize) -> Self {
        Self {
            shared,
            id,
            buf: Buf::Local(vec![0u8; len]),
            done: false,
        }
    }

    /// The object's segment, created on the worker.
    pub(crate) fn segment(shared: Arc<Shared>, id: ObjectId, w: SegmentWriter) -> Self {
        Self {
            shared,
            id,
            buf: Buf::Segment(w),
            done: false,
        }
    }

    /// The object's id.
    pub fn id(&self) -> &ObjectId {
        &self.id
    }

    /// Payload size.
    pub fn len(&self) -> u64 {
        match &self.buf {
            Buf::Local(v) => v.len() as u64,
            Buf::Segment(w) => w.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The writable payload.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Buf::Local(v) => v,
            Buf::Segment(w) => w.as_mut_slice(),
        }
    }

    /// Copies `data` in at `at`.
    pub fn write_at(&mut self, at: u64, data: &[u8]) -> Result<(), Error> {
        let len = self.len();
        let range = at
            .checked_add(data.len() as u64)
            .filter(|e| *e <= len)
            .map(|e| at as usize..e as usize);
        let Some(range) = range else {
            return Err(Error::Remote(shoal_protocol::WireError::new(
                shoal_protocol::ErrorCode::InvalidArgument,
                format!(
                    "write of {} bytes at {at} overflows the {len}-byte buffer",
                    data.len()
                ),
            )));
        };
        self.as_mut_slice()[range].copy_from_slice(data);
        Ok(())
    }

    /// Makes the object immutable and visible to every client. A segment is unmapped first:
    /// the worker can seal it only once no writable mapping of it is left.
    pub async fn seal(mut self) -> Result<(), Error> {
        self.done = true;
        let id = self.id.clone();
        match std::mem::replace(&mut self.buf, Buf::Local(Vec::new())) {
            Buf::Local(data) => self.shared.expect_ok(Request::Put { id, data }).await,
            Buf::Segment(w) => {
                drop(w);
                self.shared.expect_ok(Request::Seal { id }).await
            }
        }
    }

    /// Discards the object.
    pub fn abort(mut self) {
        self.done = true;
        if matches!(self.buf, Buf::Segment(_)) {
            self.shared.one_way(Request::Abort {
                id: self.id.clone(),
            });
        }
    }
}

impl fmt::Debug for ObjectBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBuilder")
            .field("id", &self.id)
            .field("len", &self.len())
            .field("segment", &matches!(self.buf, Buf::Segment(_)))
            .finish()
    }
}

impl Drop for ObjectBuilder {
    fn drop(&mut self) {
        if !self.done && matches!(self.buf, Buf::Segment(_)) {
            self.shared.one_way(Request::Abort {
                id: self.id.clone(),
            });
        }
    }
}
