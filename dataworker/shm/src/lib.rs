//! Shared memory for shoal: the memfd arena that holds small payloads and every name, the
//! per-object segments that hold what clients write themselves, the index of sealed objects
//! that lets a local client find and pin an object without a syscall, each client's pin
//! page, the mailboxes and call lanes, and `SCM_RIGHTS` fd passing.
//!
//! Trust: memory a client may only read (the arena, the index, sealed segments) is sealed so
//! that no route (its mapping, `write(2)`, `ftruncate`, a read-write reopen of the fd) can
//! change it; memory a client may write (its pin page, its mailbox, the doorbell page, its
//! unsealed segment) is read by the worker as untrusted input, each value bounded before use,
//! and no memfd can be resized by anyone. See [`probe`] for the routes and ARCHITECTURE.md
//! ("Local clients: threat model") for the design.
//!
//! This is one of the two places in shoal allowed to use `unsafe` (the other is the io_uring
//! engine); every block carries a `// SAFETY:` comment, and the lock-free protocols are
//! written once over [`sync::Model`] so that loom checks them in `cargo test`. It knows
//! nothing of sockets beyond fd passing, nothing of the object lifecycle (that is
//! `shoal-store`), and never reads the clock.
#![warn(missing_docs)]
#![allow(unsafe_code)]

mod arena;
mod ctl;
mod fdpass;
mod lane;
mod mailbox;
mod pins;
pub mod probe;
mod segment;
pub mod sync;

pub use arena::{available_memory, seals_of, Arena, ReadMap, ShmError, PAGE};
pub use ctl::{
    key_hash, Ctl, CtlError, FastPin, FastReader, IndexEntry, IndexWriter, READ_RING,
    SLOTS_PER_BUCKET,
};
pub use fdpass::{recv_with_fds, send_with_fds, MAX_FDS_PER_MESSAGE};
pub use lane::{LaneGauge, LaneRegion, SlotState};
pub use mailbox::Mailbox;
pub use pins::PinPage;
pub use segment::{Segment, SegmentPool, SegmentWriter};
