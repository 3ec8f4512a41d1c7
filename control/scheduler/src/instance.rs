//! The lifecycle of one function instance, as an explicit state machine. The transition
//! table is documented on [`InstanceState`].
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an instance is in its life. [`next`](Self::next) moves it on an [`InstanceEvent`]:
///
/// | from \ event | `Schedule`   | `Released` | `Bound`    | `Started` | `Exited{0}` | `Exited{n≠0}` | `Crashed` | `Stop`    | `Lost`    |
/// |--------------|--------------|------------|------------|-----------|-------------|---------------|-----------|-----------|-----------|
/// | `Pending`    | `Scheduling` | –          | –          | –         | –           | –             | –         | `Exited`  | –         |
/// | `Scheduling` | –            | `Pending`  | `Starting` | –         | –           | –             | –         | `Exited`  | `Pending` |
/// | `Starting`   | –            | –          | –          | `Running` | `Exited`    | `Failed`      | `Failed`  | `Exiting` | `Failed`  |
/// | `Running`    | –            | –          | –          | –         | `Exited`    | `Failed`      | `Failed`  | `Exiting` | `Failed`  |
/// | `Exiting`    | –            | –          | –          | –         | `Exited`    | `Exited`      | `Exited`  | `Exiting` | `Exited`  |
/// | `Failed`     | –            | –          | –          | –         | –           | –             | –         | –         | –         |
/// | `Exited`     | –            | –          | –          | –         | –           | –             | –         | –         | –         |
///
/// "–" is an [`InvalidTransition`]. `Failed` and `Exited` are terminal: nothing leaves them.
/// `Failed` means "ended without being asked to, replace it"; `Exited` means "ended on purpose
/// (or cleanly), do not replace it". A `Scheduling` instance whose reservation is released or
/// whose reserved node disappears goes back to `Pending`: nothing was started yet, so nothing
/// failed. Once `Exiting`, every way of ending is `Exited`, and a repeated `Stop` is a no-op.
///
/// Resources are held by [`holds_resources`](Self::holds_resources) states: `Scheduling` (as a
/// reservation), `Starting`, `Running` and `Exiting` (the process is still there until it has
/// exited). `Pending` has no node yet; `Failed` and `Exited` have nothing left on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Wanted, not placed yet.
    Pending,
    /// A node is reserved for it; not bound yet.
    Scheduling,
    /// Bound to a node, the process is starting.
    Starting,
    /// Serving.
    Running,
    /// Ended without being asked to (crash, non-zero exit, node lost). Terminal.
    Failed,
    /// Asked to stop, not gone yet.
    Exiting,
    /// Ended on purpose or cleanly. Terminal.
    Exited,
}

/// Something that happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceEvent {
    /// A node was reserved for it.
    Schedule,
    /// Its reservation was released or expired before it was bound.
    Released,
    /// Its reservation was bound: the node will start it.
    Bound,
    /// The node reports it ready.
    Started,
    /// Its process exited with this code.
    Exited {
        /// Exit code; 0 is a clean exit.
        code: i32,
    },
    /// Its process died (signal, OOM kill, failed health check).
    Crashed,
    /// It was asked to stop.
    Stop,
    /// Its node is gone (removed, or declared dead).
    Lost,
}

/// A transition that the [`InstanceState`] table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("invalid instance transition: {event} while {from}")]
pub struct InvalidTransition {
    /// The state the instance was in.
    pub from: InstanceState,
    /// The event that cannot happen in that state.
    pub event: InstanceEvent,
}

impl InstanceState {
    /// The state after `event`, or [`InvalidTransition`] if `event` cannot happen in `self`
    /// (see the table on [`InstanceState`]).
    pub fn next(self, event: InstanceEvent) -> Result<InstanceState, InvalidTransition> {
        use InstanceEvent as E;
        use InstanceState as S;
        let to = match (self, event) {
            (S::Pending, E::Schedule) => S::Scheduling,
            (S::Pending | S::Scheduling, E::Stop) => S::Exited,
            (S::Scheduling, E::Released | E::Lost) => S::Pending,
            (S::Scheduling, E::Bound) => S::Starting,
            (S::Starting, E::Started) => S::Running,
            (S::Starting | S::Running, E::Exited { code: 0 }) => S::Exited,
            (S::Starting | S::Running, E::Exited { .. } | E::Crashed | E::Lost) => S::Failed,
            (S::Starting | S::Running | S::Exiting, E::Stop) => S::Exiting,
            (S::Exiting, E::Exited { .. } | E::Crashed | E::Lost) => S::Exited,
            _ => return Err(InvalidTransition { from: self, event }),
        };
        Ok(to)
    }

    /// `Failed` or `Exited`: no event leaves these.
    pub fn is_terminal(self) -> bool {
        matches!(self, InstanceState::Failed | InstanceState::Exited)
    }

    /// Whether an instance in this state counts against its node's capacity:
    /// `Scheduling`, `Starting`, `Running`, `Exiting`.
    pub fn holds_resources(self) -> bool {
        matches!(
            self,
            InstanceState::Scheduling
                | InstanceState::Starting
                | InstanceState::Running
                | InstanceState::Exiting
        )
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceState::Pending => "pending",
            InstanceState::Scheduling => "scheduling",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Failed => "failed",
            InstanceState::Exiting => "exiting",
            InstanceState::Exited => "exited",
        })
    }
}

impl fmt::Display for InstanceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceEvent::Schedule => f.write_str("schedule"),
            InstanceEvent::Released => f.write_str("released"),
            InstanceEvent::Bound => f.write_str("bound"),
            InstanceEvent::Started => f.write_str("started"),
            InstanceEvent::Exited { code } => write!(f, "exited with code {code}"),
            InstanceEvent::Crashed => f.write_str("crashed"),
            InstanceEvent::Stop => f.write_str("stop"),
            InstanceEvent::Lost => f.write_str("lost"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use InstanceEvent as E;
    use InstanceState as S;

    const STATES: [S; 7] = [
        S::Pending,
        S::Scheduling,
        S::Starting,
        S::Running,
        S::Failed,
        S::Exiting,
        S::Exited,
    ];
    const EVENTS: [E; 9] = [
        E::Schedule,
        E::Released,
        E::Bound,
        E::Started,
        E::Exited { code: 0 },
        E::Exited { code: 3 },
        E::Crashed,
        E::Stop,
        E::Lost,
    ];

    /// The module table, row by row, in `EVENTS` order; `None` is "–".
    fn table(from: S) -> [Option<S>; 9] {
        match from {
            S::Pending => [
                Some(S::Scheduling),
                None,
                None,
                None,
                None,
                None,
                None,
                Some(S::Exited),
                None,
            ],
            S::Scheduling => [
                None,
                Some(S::Pending),
                Some(S::Starting),
                None,
                None,
                None,
                None,
                Some(S::Exited),
                Some(S::Pending),
            ],
            S::Starting => [
                None,
                None,
                None,
                Some(S::Running),
                Some(S::Exited),
                Some(S::Failed),
                Some(S::Failed),
                Some(S::Exiting),
                Some(S::Failed),
            ],
            S::Running => [
                None,
                None,
                None,
                None,
                Some(S::Exited),
                Some(S::Failed),
                Some(S::Failed),
                Some(S::Exiting),
                Some(S::Failed),
            ],
            S::Exiting => [
                None,
                None,
                None,
                None,
                Some(S::Exited),
                Some(S::Exited),
                Some(S::Exited),
                Some(S::Exiting),
                Some(S::Exited),
            ],
            S::Failed | S::Exited => [None; 9],
        }
    }

    #[test]
    fn every_transition_matches_the_documented_table() {
        for from in STATES {
            for (event, want) in EVENTS.into_iter().zip(table(from)) {
                let got = from.next(event);
                match want {
                    Some(to) => assert_eq!(got, Ok(to), "{from} on {event}"),
                    None => assert_eq!(
                        got,
                        Err(InvalidTransition { from, event }),
                        "{from} on {event}"
                    ),
                }
            }
        }
    }

    #[test]
    fn invalid_transitions_are_rejected_with_a_message() {
        let err = S::Running.next(E::Bound).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid instance transition: bound while running"
        );
        assert!(S::Pending.next(E::Started).is_err());
        assert!(S::Starting.next(E::Schedule).is_err());
        assert!(S::Exited.next(E::Stop).is_err());
        assert!(S::Failed.next(E::Started).is_err());
    }

    #[test]
    fn terminal_and_resource_holding_states() {
        for s in STATES {
            assert_eq!(s.is_terminal(), matches!(s, S::Failed | S::Exited));
            assert_eq!(
                s.holds_resources(),
                matches!(s, S::Scheduling | S::Starting | S::Running | S::Exiting)
            );
        }
    }

    proptest! {
        /// From `Pending`, any event sequence only ever moves along the table: once terminal,
        /// every further event is rejected and the state stays put; a bound instance never goes
        /// back to an unbound state.
        #[test]
        fn terminal_states_are_final(events in proptest::collection::vec(0..EVENTS.len(), 0..40)) {
            let mut state = S::Pending;
            let mut bound = false;
            for i in events {
                let event = EVENTS[i];
                match state.next(event) {
                    Ok(to) => {
                        prop_assert!(!state.is_terminal());
                        if bound {
                            prop_assert!(!matches!(to, S::Pending | S::Scheduling));
                        }
                        bound |= matches!(to, S::Starting | S::Running | S::Exiting);
                        state = to;
                    }
                    Err(e) => prop_assert_eq!(e, InvalidTransition { from: state, event }),
                }
            }
        }
    }
}
