//! shoal's per-node function proxy.
#![warn(missing_docs)]
