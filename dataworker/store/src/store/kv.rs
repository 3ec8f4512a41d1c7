//! The key-value side of the [`Store`]: a value is an object allocated under its key and swapped
//! in on commit (readers of the old value keep it until they release it), with an optional
//! expiry on the caller's clock (`now`, never read here).
use shoal_protocol::{Namespace, ObjectId};

use super::{Backing, ClientId, Evicted, ExternalPins, Gen, Placement, Store, StoreError};

impl Store {
    // ----- KV -----

    /// Allocates a value for `key` in the arena; it replaces the current value on
    /// [`Store::kv_commit`].
    pub fn kv_create(
        &mut self,
        key: &ObjectId,
        size: u64,
        client: ClientId,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Vec<Evicted>), StoreError> {
        self.kv_create_in(key, size, client, Backing::Arena, ext)
    }

    /// [`Store::kv_create`] with the value in `backing`.
    pub fn kv_create_in(
        &mut self,
        key: &ObjectId,
        size: u64,
        client: ClientId,
        backing: Backing,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Vec<Evicted>), StoreError> {
        let mut evicted = Vec::new();
        let p = self.new_entry(Namespace::Kv, key, size, client, backing, ext, &mut evicted)?;
        if let Some(old) = self.pending_kv.insert((client, key.clone()), p.gen) {
            self.drop_unsealed(client, old);
        }
        Ok((p, evicted))
    }

    /// Publishes a value created by `client`: binds the name, replacing (and unbinding) the
    /// old value. `ttl_ms` 0 keeps it forever. Returns the new placement and the replaced
    /// generation, if any.
    pub fn kv_commit(
        &mut self,
        key: &ObjectId,
        client: ClientId,
        ttl_ms: u64,
        now: u64,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Option<(Gen, bool)>), StoreError> {
        let gen = self
            .pending_kv
            .remove(&(client, key.clone()))
            .ok_or_else(|| StoreError::NotUnsealed(key.clone()))?;
        let old = self.names.get(&(Namespace::Kv, key.clone())).copied();
        let replaced = old.map(|g| self.unbind(g, ext));
        if let Some(e) = self.entries.get_mut(&gen) {
            e.named = true;
        }
        let p = self
            .seal_gen(gen, client, now)
            .ok_or_else(|| StoreError::NotUnsealed(key.clone()))?;
        self.names.insert((Namespace::Kv, key.clone()), gen);
        self.set_expiry(gen, ttl_ms, now);
        Ok((p, replaced))
    }

    /// Drops an uncommitted KV value.
    pub fn kv_abort(&mut self, key: &ObjectId, client: ClientId) {
        if let Some(gen) = self.pending_kv.remove(&(client, key.clone())) {
            self.drop_unsealed(client, gen);
        }
    }

    fn set_expiry(&mut self, gen: Gen, ttl_ms: u64, now: u64) {
        if let Some(e) = self.entries.get_mut(&gen) {
            if let Some(t) = e.expires_at.take() {
                self.expiry.remove(&(t, gen));
            }
            if ttl_ms > 0 {
                let t = now.saturating_add(ttl_ms);
                e.expires_at = Some(t);
                self.expiry.insert((t, gen));
            }
        }
    }

    /// Sets (or with 0 removes) a key's TTL. False if the key does not exist.
    pub fn kv_expire(&mut self, key: &ObjectId, ttl_ms: u64, now: u64) -> bool {
        self.kv_expire_gen(key, ttl_ms, now).is_some()
    }

    /// [`Store::kv_expire`], returning the generation of the key's value when it exists.
    pub fn kv_expire_gen(&mut self, key: &ObjectId, ttl_ms: u64, now: u64) -> Option<Gen> {
        if !self.contains(Namespace::Kv, key, now) {
            return None;
        }
        let gen = self.names[&(Namespace::Kv, key.clone())];
        self.set_expiry(gen, ttl_ms, now);
        Some(gen)
    }

    /// Remaining TTL in ms: `None` missing, `Some(None)` no TTL.
    pub fn kv_ttl(&self, key: &ObjectId, now: u64) -> Option<Option<u64>> {
        if !self.contains(Namespace::Kv, key, now) {
            return None;
        }
        let e = &self.entries[&self.names[&(Namespace::Kv, key.clone())]];
        Some(e.expires_at.map(|t| t.saturating_sub(now)))
    }

    /// The earliest KV deadline, for the caller's timer.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|(t, _)| *t)
    }

    /// Removes every KV entry whose deadline is `<= now`, without scanning other keys.
    /// Returns `(gen, was_spilled)` of each removed entry.
    pub fn expire_due(&mut self, now: u64, ext: &mut dyn ExternalPins) -> Vec<(Gen, bool)> {
        let mut out = Vec::new();
        while let Some(&(t, gen)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.expiry.remove(&(t, gen));
            out.push(self.unbind(gen, ext));
        }
        out
    }
}
