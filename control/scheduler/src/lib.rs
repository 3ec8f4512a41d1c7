//! shoal's scheduler: placement of function instances on nodes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
