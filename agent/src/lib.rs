//! shoal's per-node agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
