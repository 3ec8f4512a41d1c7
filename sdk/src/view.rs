//! Zero-copy views of sealed objects, and writable buffers of objects being created.
use crate::client::Shared;
use crate::Error;
use shoal_protocol::{ObjectId, Request, ViewDesc};
use shoal_shm::FastPin;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

#[derive(Debug)]
enum Pin {
    /// Pinned in this client's shared pin table (no syscall to take or end).
    Fast(Option<FastPin>),
    /// Pinned by the worker for this connection; ended with a one-way `Release`.
    Socket(u64),
}

/// A read-only, zero-copy view of a sealed object or KV value in shared memory. The object
/// cannot be evicted or freed while the view lives; dropping it releases the pin.
pub struct View {
    shared: Arc<Shared>,
    offset: u64,
    len: u64,
    pin: Pin,
}

impl View {
    pub(crate) fn fast(shared: Arc<Shared>, pin: FastPin) -> Self {
        Self {
            offset: pin.offset,
            len: pin.len,
            shared,
            pin: Pin::Fast(Some(pin)),
        }
    }

    /// A view the worker pinned; checked against the mapping before use.
    pub(crate) fn socket(shared: Arc<Shared>, d: ViewDesc) -> Result<Self, Error> {
        let v = Self {
            shared,
            offset: d.offset,
            len: d.len,
            pin: Pin::Socket(d.gen),
        };
        v.shared.arena.bytes(d.offset, d.len)?;
        Ok(v)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // In bounds: checked when the view was made.
        self.shared
            .arena
            .bytes(self.offset, self.len)
            .unwrap_or(&[])
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

/// A writable buffer in shared memory for an object this client created. Fill it, then
/// [`ObjectBuilder::seal`]; dropping it unsealed discards the object.
pub struct ObjectBuilder {
    shared: Arc<Shared>,
    id: ObjectId,
    offset: u64,
    len: u64,
    done: bool,
}

impl ObjectBuilder {
    pub(crate) fn new(shared: Arc<Shared>, id: ObjectId, d: ViewDesc) -> Result<Self, Error> {
        shared.arena.bytes(d.offset, d.len)?;
        Ok(Self {
            shared,
            id,
            offset: d.offset,
            len: d.len,
            done: false,
        })
    }

    /// The object's id.
    pub fn id(&self) -> &ObjectId {
        &self.id
    }

    /// Payload size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The writable payload.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        #[allow(unsafe_code)]
        // SAFETY: the worker allocated [offset, offset+len) for this client's create and gives
        // it to no one else until it is sealed or aborted; this builder is the only handle to
        // it (not Clone), and `&mut self` makes this slice the only live borrow. Bounds were
        // checked in `new`.
        let s = unsafe { self.shared.arena.bytes_mut(self.offset, self.len) };
        s.unwrap_or(&mut [])
    }

    /// Copies `data` in at `at`.
    pub fn write_at(&mut self, at: u64, data: &[u8]) -> Result<(), Error> {
        let end = at.checked_add(data.len() as u64).filter(|e| *e <= self.len);
        if end.is_none() {
            return Err(Error::Remote(shoal_protocol::WireError::new(
                shoal_protocol::ErrorCode::InvalidArgument,
                format!(
                    "write of {} bytes at {at} overflows the {}-byte buffer",
                    data.len(),
                    self.len
                ),
            )));
        }
        self.shared.arena.write(self.offset + at, data)?;
        Ok(())
    }

    /// Makes the object immutable and visible to every client.
    pub async fn seal(mut self) -> Result<(), Error> {
        self.done = true;
        let id = self.id.clone();
        self.shared.expect_ok(Request::Seal { id }).await
    }

    /// Discards the object.
    pub fn abort(mut self) {
        self.done = true;
        self.shared.one_way(Request::Abort {
            id: self.id.clone(),
        });
    }

    pub(crate) fn disarm(&mut self) {
        self.done = true;
    }
}

impl fmt::Debug for ObjectBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBuilder")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for ObjectBuilder {
    fn drop(&mut self) {
        if !self.done {
            self.shared.one_way(Request::Abort {
                id: self.id.clone(),
            });
        }
    }
}
