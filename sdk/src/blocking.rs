//! A blocking client for code without an async runtime (benchmarks, CLI tools, FFI).
//!
//! Requests use a plain blocking socket (two syscalls per request); a small single-threaded
//! runtime only drives the shared async code, which never waits on it.
use crate::{ConnectOptions, Error, ListEntry, ObjectBuilder, SetOptions, StatusInfo, View};
use std::path::Path;
use std::time::Duration;

/// A blocking connection to the node's dataworker.
#[derive(Debug)]
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: crate::Client,
}

impl Client {
    /// Connects to the dataworker on `socket`.
    pub fn connect(socket: impl AsRef<Path>) -> Result<Client, Error> {
        Self::connect_with(ConnectOptions::new(socket.as_ref()))
    }

    /// Connects with options.
    pub fn connect_with(opts: ConnectOptions) -> Result<Client, Error> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let inner = crate::Client::connect_blocking(&opts)?;
        Ok(Client { rt, inner })
    }

    /// Requests sent through the shared-memory mailbox so far (diagnostics).
    pub fn mailbox_calls(&self) -> u64 {
        self.rt.block_on(self.inner.mailbox_calls())
    }

    /// The tenant this connection acts in.
    pub fn tenant(&self) -> &str {
        self.inner.tenant()
    }

    /// The async client underneath.
    pub fn inner(&self) -> &crate::Client {
        &self.inner
    }

    /// See [`crate::Client::create`].
    pub fn create(&self, id: &str, size: u64) -> Result<ObjectBuilder, Error> {
        self.rt.block_on(self.inner.create(id, size))
    }

    /// Seals a buffer from [`Client::create`].
    pub fn seal(&self, b: ObjectBuilder) -> Result<(), Error> {
        self.rt.block_on(b.seal())
    }

    /// See [`crate::Client::put`].
    pub fn put(&self, id: &str, data: &[u8]) -> Result<(), Error> {
        self.rt.block_on(self.inner.put(id, data))
    }

    /// See [`crate::Client::get`].
    pub fn get(&self, id: &str, timeout: Duration) -> Result<View, Error> {
        self.rt.block_on(self.inner.get(id, timeout))
    }

    /// See [`crate::Client::get_many`].
    pub fn get_many(
        &self,
        ids: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Result<View, Error>>, Error> {
        self.rt.block_on(self.inner.get_many(ids, timeout))
    }

    /// See [`crate::Client::delete`].
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        self.rt.block_on(self.inner.delete(id))
    }

    /// See [`crate::Client::contains`].
    pub fn contains(&self, id: &str) -> Result<bool, Error> {
        self.rt.block_on(self.inner.contains(id))
    }

    /// See [`crate::Client::list`].
    pub fn list(&self, prefix: &str, limit: u32) -> Result<Vec<ListEntry>, Error> {
        self.rt.block_on(self.inner.list(prefix, limit))
    }

    /// See [`crate::Client::status`].
    pub fn status(&self) -> Result<StatusInfo, Error> {
        self.rt.block_on(self.inner.status())
    }

    /// See [`crate::Client::kv_set`].
    pub fn kv_set(&self, key: &str, value: &[u8], opts: SetOptions) -> Result<bool, Error> {
        self.rt.block_on(self.inner.kv_set(key, value, opts))
    }

    /// See [`crate::Client::kv_get`].
    pub fn kv_get(&self, key: &str) -> Result<Option<View>, Error> {
        self.rt.block_on(self.inner.kv_get(key))
    }

    /// See [`crate::Client::kv_mget`].
    pub fn kv_mget(&self, keys: &[&str]) -> Result<Vec<Option<View>>, Error> {
        self.rt.block_on(self.inner.kv_mget(keys))
    }

    /// See [`crate::Client::kv_del`].
    pub fn kv_del(&self, keys: &[&str]) -> Result<u64, Error> {
        self.rt.block_on(self.inner.kv_del(keys))
    }

    /// See [`crate::Client::kv_exists`].
    pub fn kv_exists(&self, key: &str) -> Result<bool, Error> {
        self.rt.block_on(self.inner.kv_exists(key))
    }

    /// See [`crate::Client::kv_expire`].
    pub fn kv_expire(&self, key: &str, ttl: Option<Duration>) -> Result<bool, Error> {
        self.rt.block_on(self.inner.kv_expire(key, ttl))
    }

    /// See [`crate::Client::kv_ttl`].
    pub fn kv_ttl(&self, key: &str) -> Result<Option<Option<Duration>>, Error> {
        self.rt.block_on(self.inner.kv_ttl(key))
    }
}
