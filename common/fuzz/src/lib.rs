//! shoal's fuzz targets, as plain functions: one `pub fn <target>(data: &[u8])` for every
//! decoder of bytes that come from outside the process. Each one feeds `data` to the real
//! decoder (and, where the decoded value drives a pure core, to that core) and asserts what
//! must hold, panicking otherwise:
//!
//! | target | bytes from | asserts |
//! | --- | --- | --- |
//! | [`client_frames`] | a local client (hello, requests) and a dataworker (replies), on its Unix socket | framing is split-invariant; `encode(decode(x))` round-trips and is stable; ids decoded are valid ids; a hello that passes `check` is within bounds |
//! | [`proxy_frames`] | callers, instances and other proxies, and the proxy's answers | the same, for `CallerFrame` / `ProxyFrame` |
//! | [`peer_messages`] | another dataworker over QUIC | frame bodies round-trip; directory updates applied to the pure `Directory` keep its invariants |
//! | [`meta_protocol`] | a node talking to control's metadata API, and control's replies | the same framing checks; every request runs against a real in-memory `MemStore`, its reply round-trips, and the store stays within its limits |
//! | [`rest_bodies`] | JSON bodies of control's REST API | decode + validate never panic; what validates round-trips through JSON and still validates, and its names are safe path components |
//! | [`package_unpack`] | a function's code package (`.tar` / `.tar.gz`) | unpacking never writes outside the instance directory, symlinks included |
//! | [`package_entries`] | the same, as a short list of entries the target writes as a tar archive | the same |
//! | [`meta_file`] | the embedded `MemStore`'s file on disk | opening any file gives a store or an error, never a panic, and a store that opened is usable |
//!
//! The same functions serve two drivers: the cargo-fuzz project in `fuzz/` (one-line
//! binaries, coverage-guided, see `scripts/fuzz.sh`) and this crate's `replay` test, which
//! runs every saved input under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
//! through them in `cargo test`. [`seeds`] builds the small seed corpus from real encoders.
//!
//! Every target is deterministic (no clock, no randomness decides an assertion) and bounds
//! its own work, so one input costs milliseconds. This crate is test code: it may unwrap on
//! its own setup (a temporary directory, a runtime), never on the input.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod dataworker;
mod meta;
mod package;
mod peer;
mod proxy;
mod rest;
mod seeds;
mod stream;

pub use dataworker::client_frames;
pub use meta::{meta_file, meta_protocol};
pub use package::{package_entries, package_unpack};
pub use peer::peer_messages;
pub use proxy::proxy_frames;
pub use rest::rest_bodies;
pub use seeds::seeds;

/// A fuzz target: takes any bytes, panics when what must hold does not.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its cargo-fuzz binary and of its corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("client_frames", client_frames),
    ("proxy_frames", proxy_frames),
    ("peer_messages", peer_messages),
    ("meta_protocol", meta_protocol),
    ("rest_bodies", rest_bodies),
    ("package_unpack", package_unpack),
    ("package_entries", package_entries),
    ("meta_file", meta_file),
];

/// The target called `name`, if there is one.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
