//! shoal's scheduler: which node runs an instance of a function, and how instances live.
//!
//! - [`ClusterState`] holds nodes ([`NodeView`]), bound instances ([`InstanceView`]) and
//!   reservations ([`Reservation`]). [`ClusterState::place`] picks a node for a [`Request`]:
//!   filters (health, pool, node selector, required [`Affinity`] and anti-affinity, free
//!   [`Resources`]), then scorers (preferred affinity weights, then [`Policy::Spread`] or
//!   [`Policy::BinPack`]), then the smallest node id.
//! - Two phases, so that concurrent requests never overbook a node: [`ClusterState::reserve`]
//!   places and holds the resources, [`ClusterState::bind`] turns the hold into a `Starting`
//!   instance; [`ClusterState::release`] and [`ClusterState::expire`] drop holds.
//! - [`InstanceState`] and [`InstanceEvent`] are the instance lifecycle as an explicit state
//!   machine ([`InstanceState::next`]); `Failed` and `Exited` are terminal.
//! - [`reconcile`] compares [`FunctionSpec`]s with the state and returns [`Action`]s: create
//!   up to the minimum, replace failed instances and those of gone or unhealthy nodes, remove
//!   above the maximum.
//!
//! Accounting: a node's allocation is the sum of its reservations (the `Scheduling` phase) and
//! its `Starting`, `Running` and `Exiting` instances. `reserve` and `bind` never make it exceed
//! the node's capacity.
//!
//! Everything here is a pure, deterministic function of its inputs: no IO, no clock (callers
//! pass `now_ms`), no randomness, no hash-ordered iteration. The same contents give the same
//! placements and actions whatever order they were added in. This crate depends on nothing
//! of shoal and holds no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cluster;
mod instance;
mod place;
mod reconcile;
mod request;
mod resources;

pub use cluster::{
    BindError, ClusterState, InstanceView, NodeRemoval, NodeView, Reservation, ReserveError,
    StateError,
};
pub use instance::{InstanceEvent, InstanceState, InvalidTransition};
pub use place::{FilterReason, Unschedulable};
pub use reconcile::{reconcile, Action, FunctionSpec, RemoveReason, ReplaceReason};
pub use request::{Affinity, Policy, Preference, Request, Term};
pub use resources::Resources;
