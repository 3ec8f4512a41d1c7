//! The request body handlers read: hyper's body, cut off at the body deadline and at the size
//! limit, telling the server loop which bound tripped (so it answers 408 or 413 whatever the
//! handler made of the error).
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is larger than the server takes.
    #[error("request body is over the limit of {0} bytes")]
    TooLarge(u64),
    /// The body did not arrive in time.
    #[error("request body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The connection failed.
    #[error("reading the request body: {0}")]
    Read(#[from] hyper::Error),
}

/// A bound a request's body tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tripped {
    TooLarge = 1,
    TimedOut = 2,
}

/// Which bound a request's body tripped, if any, shared with the server loop.
#[derive(Debug, Default)]
pub(crate) struct Verdict(AtomicU8);

impl Verdict {
    fn set(&self, t: Tripped) {
        self.0.store(t as u8, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<Tripped> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Tripped::TooLarge),
            2 => Some(Tripped::TimedOut),
            _ => None,
        }
    }
}

/// A request body bounded in size and time; see the module docs.
#[derive(Debug)]
pub struct Body {
    inner: Incoming,
    read: u64,
    max: u64,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    verdict: Arc<Verdict>,
    failed: bool,
}

impl Body {
    pub(crate) fn new(inner: Incoming, max: u64, timeout: Duration, verdict: Arc<Verdict>) -> Body {
        Body {
            inner,
            read: 0,
            max,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            verdict,
            failed: false,
        }
    }

    fn fail(
        &mut self,
        verdict: Tripped,
        e: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.failed = true;
        self.verdict.set(verdict);
        Poll::Ready(Some(Err(e)))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read = this.read.saturating_add(data.len() as u64);
                    if this.read > this.max {
                        return this.fail(Tripped::TooLarge, BodyError::TooLarge(this.max));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(BodyError::Read(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return this.fail(Tripped::TimedOut, BodyError::TimedOut(this.timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
