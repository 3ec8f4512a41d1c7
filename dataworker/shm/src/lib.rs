//! Shared memory for shoal: the memfd arena that holds payloads, the control region (a
//! seqlock-protected index of sealed objects plus per-client pin tables) that lets a local
//! client find and pin an object without a syscall, and `SCM_RIGHTS` fd passing.
//!
//! This is one of the two places in shoal allowed to use `unsafe` (the other is the io_uring
//! engine); every block carries a `// SAFETY:` comment. It knows nothing of sockets beyond fd
//! passing, nothing of the object lifecycle (that is `shoal-store`), and never reads the clock.
#![warn(missing_docs)]
#![allow(unsafe_code)]

mod arena;
mod ctl;
mod fdpass;
mod lane;
mod mailbox;

pub use arena::{Arena, ShmError};
pub use ctl::{
    key_hash, Ctl, CtlError, FastPin, FastReader, IndexEntry, IndexWriter, SLOTS_PER_BUCKET,
};
pub use fdpass::{recv_with_fds, send_with_fds};
pub use lane::{LaneGauge, LaneRegion, SlotState};
pub use mailbox::Mailbox;
