//! Call lanes: a caller and a function instance on the same node talk over shared memory
//! instead of through the proxy (two socket hops and two wake-ups fewer per call, none at all
//! while both sides are busy). The proxy stays the router: it tells callers which local
//! instances offer a lane, stops naming an instance once it drains, and carries every call a
//! lane cannot (no room, another node, a lane gone).
//!
//! - The instance runs a lane thread: it listens on a Unix socket next to the proxy's, hands
//!   each caller connection a [`LaneRegion`] and the instance's [`LaneGauge`] (two memfds),
//!   then polls the slots of all its lanes; once idle for a while (200 µs by default,
//!   [`crate::FunctionInstance::poll_after_call`]) it sleeps in `poll(2)` on the sockets.
//! - A handler runs on the lane thread until it first awaits, then moves to the instance's
//!   runtime; a call holds one of the instance's concurrency units (shared with calls from
//!   the proxy) until it answers or its deadline passes.
//! - A caller posts into a free slot of the least-busy lane with room, spins briefly for the
//!   reply, then sleeps until the instance rings the lane's socket.
//! - A call the instance never started (it drains, or its lane closed) goes through the proxy
//!   instead. A call that started and lost its lane fails with `InstanceFailed`, as through
//!   the proxy.
//! - Who may open a lane: a caller presents the instance's lane key (`KEY_MAGIC` and the
//!   key, before anything else), which only the proxy hands out, and only to callers of the
//!   function's tenant; its uid must be the instance's own (`SO_PEERCRED`). Anyone else is
//!   closed without a lane and calls through the proxy.
//! - The gauge a caller maps is a mirror: the instance admits by its own counts and limit,
//!   which no caller can write.
//! - An object result keeps its slot done until the caller has viewed it; when the caller
//!   frees the slot (or its lane closes) the instance deletes the object, in its own tenant.
//!
//! Layout: `instance` (the lane thread, its listener and admission), `caller` (a caller's lanes
//! and the calls it posts); this file holds the limits and the framing both sides share.
use shoal_protocol::{encode_frame, CallerFrame, Payload, WireError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

mod caller;
mod instance;

pub(crate) use caller::{CallerLane, LaneOutcome, LaneSet, SlotHold};
pub(crate) use instance::{run_holding, Admission, CallFn, LaneListener, LaneServer, ReleaseFn};

#[cfg(doc)]
use shoal_shm::{LaneGauge, LaneRegion};

/// Slots per lane: calls one caller connection can have in flight on one instance through
/// it (more go through the proxy).
const SLOTS: u32 = 16;
/// Room for a frame's own bytes beside its payload.
const FRAME_SLACK: u64 = 1024;
/// Largest slot: payloads above this travel through the proxy (or as objects).
const MAX_SLOT: u64 = 1 << 20;
/// Lanes one instance serves at most; further callers go through the proxy.
const MAX_LANES: usize = 1024;
/// How often a busy lane thread still looks at its sockets (new lanes, closed ones).
const SOCKET_CHECK: Duration = Duration::from_millis(1);
/// Magic of the hello an instance sends with a lane's two fds.
const HELLO_MAGIC: &[u8; 8] = b"SHOALLN1";
/// Magic of what a caller sends first: this, then the lane key (`HELLO_LEN` bytes in all).
const KEY_MAGIC: &[u8; 8] = b"SHOALLK1";
const HELLO_LEN: usize = 24;
/// Callers that connected but have not presented their key yet, at most.
const MAX_PENDING: usize = 64;
/// A caller waits this long at most for an instance's lane hello.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A slot's capacity for an inline limit: every inline payload fits with its framing.
pub(crate) fn slot_capacity(inline_limit: u64) -> u64 {
    (inline_limit.min(MAX_SLOT) + FRAME_SLACK).next_multiple_of(64)
}

/// One step of a polling loop: a pure spin for the first `pure` steps, then the thread
/// yields (so other threads on a busy machine run first).
fn poll_step(spins: &mut u32, pure: u32) {
    *spins = spins.saturating_add(1);
    if *spins < pure {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn encode_result(id: u64, result: Result<Payload, WireError>, out: &mut Vec<u8>) {
    out.clear();
    if encode_frame(&CallerFrame::Result { id, result }, out).is_err() {
        out.clear();
    }
}
