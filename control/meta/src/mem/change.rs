//! One mutation's effect on the data, recorded both ways while it is applied in place:
//! forwards as [`Change`]s (the log record, replayed after a restart) and backwards as undo
//! steps (applied when the record cannot be made durable, so a failed write leaves the store
//! as it was).
//!
//! Every change goes through two primitives, [`Data::set_key`] and [`Data::set_lease`], which
//! keep each lease's key set in step with the keys that name it. Replay ([`Data::replay`])
//! applies a decoded record with the same primitives after checking it against the current
//! data, so a record that does not fit (a delete of a missing key, a put under a missing
//! lease, a revision going back) is refused instead of producing an inconsistent store.
use super::{Data, Entry, Lease};
use crate::keys;
use crate::types::{LeaseId, Revision, WatchEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One step of a mutation, as written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Change {
    /// The key now holds `entry`.
    Put { key: String, entry: Entry },
    /// The key is gone.
    Delete { key: String },
    /// A new lease.
    Grant { id: LeaseId, ttl_secs: u64 },
    /// The lease is gone (its keys were deleted by earlier changes of the same record).
    Revoke { id: LeaseId },
}

/// A log record as written: borrows the journal's changes.
#[derive(Serialize)]
pub(super) struct RecordRef<'a> {
    pub(super) seq: u64,
    pub(super) revision: Revision,
    pub(super) next_lease: LeaseId,
    pub(super) changes: &'a [Change],
}

/// A log record as read back.
#[derive(Debug, Deserialize)]
pub(super) struct Record {
    /// Position in the sequence of records (one per persisted mutation, from 1).
    pub(super) seq: u64,
    /// The store's revision after the mutation.
    pub(super) revision: Revision,
    /// The next lease id to try after the mutation.
    pub(super) next_lease: LeaseId,
    pub(super) changes: Vec<Change>,
}

enum Undo {
    Key(String, Option<Entry>),
    Lease(LeaseId, Option<Lease>),
}

/// What one mutation did so far; see the module docs.
pub(super) struct Journal {
    /// The changes to log; `None` when the store keeps no file (nothing to write).
    redo: Option<Vec<Change>>,
    undo: Vec<Undo>,
    revision: Revision,
    next_lease: LeaseId,
    /// Watch events, published once the mutation is durable.
    pub(super) events: Vec<WatchEvent>,
}

impl Journal {
    /// Starts recording a mutation of `data`; `logged` when its changes will be written.
    pub(super) fn begin(data: &Data, logged: bool) -> Journal {
        Journal {
            redo: logged.then(Vec::new),
            undo: Vec::new(),
            revision: data.revision,
            next_lease: data.next_lease,
            events: Vec::new(),
        }
    }

    /// Whether the mutation changed anything.
    pub(super) fn changed(&self, data: &Data) -> bool {
        !self.undo.is_empty()
            || data.revision != self.revision
            || data.next_lease != self.next_lease
    }

    /// The changes to log (empty when the store keeps no file).
    pub(super) fn redo(&self) -> &[Change] {
        self.redo.as_deref().unwrap_or_default()
    }

    /// Puts `data` back as it was when the journal began.
    pub(super) fn rollback(self, data: &mut Data) {
        for u in self.undo.into_iter().rev() {
            match u {
                Undo::Key(key, old) => {
                    data.raw_set_key(&key, old);
                }
                Undo::Lease(id, Some(l)) => {
                    data.leases.insert(id, l);
                }
                Undo::Lease(id, None) => {
                    data.leases.remove(&id);
                }
            }
        }
        data.revision = self.revision;
        data.next_lease = self.next_lease;
    }
}

impl Data {
    /// Sets (`Some`) or removes (`None`) a key, updating the leases' key sets; returns the
    /// previous entry. The one place keys change.
    fn raw_set_key(&mut self, key: &str, new: Option<Entry>) -> Option<Entry> {
        let new_lease = new.as_ref().and_then(|e| e.lease);
        let old = match new {
            Some(e) => self.keys.insert(key.to_owned(), e),
            None => self.keys.remove(key),
        };
        let old_lease = old.as_ref().and_then(|e| e.lease);
        if old_lease != new_lease {
            if let Some(l) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            if let Some(l) = new_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.insert(key.to_owned());
            }
        }
        old
    }

    /// Sets or removes a key as part of the journaled mutation.
    pub(super) fn set_key(&mut self, key: String, new: Option<Entry>, j: &mut Journal) {
        if let Some(redo) = &mut j.redo {
            redo.push(match &new {
                Some(e) => Change::Put {
                    key: key.clone(),
                    entry: e.clone(),
                },
                None => Change::Delete { key: key.clone() },
            });
        }
        let old = self.raw_set_key(&key, new);
        j.undo.push(Undo::Key(key, old));
    }

    /// Creates (`Some(ttl)`) or removes (`None`) a lease as part of the journaled mutation.
    /// A removed lease must hold no keys any more (delete them first).
    pub(super) fn set_lease(&mut self, id: LeaseId, ttl_secs: Option<u64>, j: &mut Journal) {
        if let Some(redo) = &mut j.redo {
            redo.push(match ttl_secs {
                Some(ttl_secs) => Change::Grant { id, ttl_secs },
                None => Change::Revoke { id },
            });
        }
        let old = match ttl_secs {
            Some(ttl_secs) => self.leases.insert(
                id,
                Lease {
                    ttl_secs,
                    keys: BTreeSet::new(),
                },
            ),
            None => self.leases.remove(&id),
        };
        j.undo.push(Undo::Lease(id, old));
    }

    /// Applies a record read from the log, checking that it fits the current data; the error
    /// says what does not. On error the data may be partly changed (the caller drops it).
    pub(super) fn replay(&mut self, rec: Record) -> Result<(), String> {
        if rec.revision < self.revision {
            return Err(format!(
                "revision goes back from {} to {}",
                self.revision, rec.revision
            ));
        }
        if rec.next_lease < 1 {
            return Err(format!("next lease id {} is not positive", rec.next_lease));
        }
        let before = self.revision;
        let mut keys_changed = false;
        for change in rec.changes {
            keys_changed |= matches!(change, Change::Put { .. } | Change::Delete { .. });
            match change {
                Change::Put { key, entry } => {
                    if key.is_empty()
                        || entry.create_revision < 1
                        || entry.create_revision > entry.mod_revision
                        || entry.mod_revision != rec.revision
                    {
                        return Err(format!("revisions of key {key:?}"));
                    }
                    if let Some(id) = entry.lease {
                        if !self.leases.contains_key(&id) {
                            return Err(format!("key {key:?} names missing lease {id}"));
                        }
                    }
                    self.raw_set_key(&key, Some(entry));
                }
                Change::Delete { key } => {
                    if self.raw_set_key(&key, None).is_none() {
                        return Err(format!("deletes missing key {key:?}"));
                    }
                }
                Change::Grant { id, ttl_secs } => {
                    if id <= 0 || ttl_secs == 0 || ttl_secs > keys::MAX_LEASE_TTL.as_secs() {
                        return Err(format!("lease {id} with a TTL of {ttl_secs} s"));
                    }
                    if self.leases.contains_key(&id) {
                        return Err(format!("grants lease {id} twice"));
                    }
                    self.leases.insert(
                        id,
                        Lease {
                            ttl_secs,
                            keys: BTreeSet::new(),
                        },
                    );
                }
                Change::Revoke { id } => match self.leases.get(&id) {
                    None => return Err(format!("revokes missing lease {id}")),
                    Some(l) if !l.keys.is_empty() => {
                        return Err(format!("revokes lease {id} while it holds keys"))
                    }
                    Some(_) => {
                        self.leases.remove(&id);
                    }
                },
            }
        }
        if keys_changed && rec.revision == before {
            return Err(format!("keys change without a new revision ({before})"));
        }
        self.revision = rec.revision;
        self.next_lease = rec.next_lease;
        Ok(())
    }
}
