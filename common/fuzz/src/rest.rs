//! `rest_bodies`: the JSON bodies control's REST API reads (`POST /v1/functions`, `POST
//! /v1/pools`, `PUT /v1/tenants/{t}/quota`, `POST /v1/tokens`), decoded with the same serde
//! types and then handed, as the router hands them, to the real `Registry` over an in-memory
//! store. What the registry accepts must be what the type's own `validate` accepts, must read
//! back unchanged, must survive a JSON round trip, and every name in it that becomes a key,
//! a path component or a header must be a plain name.
use crate::meta::block_on;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_control::fuzz_support::TokenRequest;
use shoal_control::Registry;
use shoal_meta::records::{CodeSource, FunctionSpec, Pool, Principal, Quota};
use shoal_meta::{MemStore, MetaStore};
use shoal_protocol::ObjectId;
use std::fmt::Debug;
use std::sync::Arc;

/// The tenant a quota is set for.
const TENANT: &str = "fuzz";

/// The first byte picks the body's route; the rest is the body.
pub fn rest_bodies(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    match route % 4 {
        0 => {
            if let Some(spec) = decode::<FunctionSpec>(body) {
                function(spec);
            }
        }
        1 => {
            if let Some(pool) = decode::<Pool>(body) {
                pool_body(pool);
            }
        }
        2 => {
            if let Some(q) = decode::<Quota>(body) {
                quota(q);
            }
        }
        _ => {
            // Its checks run against the caller's principal in the handler; decoding is the
            // part that reads the outside bytes.
            let _ = serde_json::from_slice::<TokenRequest>(body);
        }
    }
}

/// Decodes a body as the router does; a decoded value survives a JSON round trip.
fn decode<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let json = serde_json::to_vec(&v).unwrap_or_else(|e| panic!("encode {v:?}: {e}"));
    match serde_json::from_slice::<T>(&json) {
        Ok(back) => assert_eq!(back, v, "JSON round trip changed the body"),
        Err(e) => panic!("a decoded body does not decode again ({e}): {v:?}"),
    }
    Some(v)
}

/// A registry over a fresh in-memory store, and the operator (who may do everything).
async fn registry() -> (Registry, MemStore, Principal) {
    let store = MemStore::open(None, "shoal/").unwrap_or_else(|e| panic!("MemStore: {e}"));
    let reg = Registry::new(Arc::new(store.clone()) as Arc<dyn MetaStore>);
    (reg, store, Principal::system_admin())
}

fn function(spec: FunctionSpec) {
    let valid = spec.validate().is_ok();
    block_on(async {
        let (reg, store, admin) = registry().await;
        let created = reg.create_function(&admin, spec.clone()).await;
        assert_eq!(
            created.is_ok(),
            valid,
            "the registry and FunctionSpec::validate disagree: {created:?} for {spec:?}"
        );
        if let Ok(stored) = created {
            assert!(stored.validate().is_ok(), "a stored spec does not validate");
            plain_name(&stored.name);
            plain_name(stored.tenant());
            for n in stored.affinity.iter().chain(&stored.anti_affinity) {
                plain_name(n);
            }
            if let Some(p) = &stored.pool {
                plain_name(p);
            }
            if let CodeSource::Object { id } = &stored.code {
                assert!(ObjectId::new(id.as_str()).is_ok(), "code id {id:?}");
            }
            for k in stored.env.keys() {
                assert!(!k.is_empty() && !k.contains(['=', '\0']), "env name {k:?}");
            }
            match reg.get_function(&admin, &stored.name).await {
                Ok(read) => assert_eq!(read, stored, "a function reads back changed"),
                Err(e) => panic!("a created function does not read back: {e}"),
            }
        }
        store.close().await;
    });
}

fn pool_body(pool: Pool) {
    let valid = pool.validate().is_ok();
    block_on(async {
        let (reg, store, _) = registry().await;
        let created = reg.create_pool(pool.clone()).await;
        assert_eq!(
            created.is_ok(),
            valid,
            "the registry and Pool::validate disagree: {created:?} for {pool:?}"
        );
        if created.is_ok() {
            plain_name(&pool.name);
            match reg.get_pool(&pool.name).await {
                Ok(read) => assert_eq!(read, pool, "a pool reads back changed"),
                Err(e) => panic!("a created pool does not read back: {e}"),
            }
        }
        store.close().await;
    });
}

fn quota(q: Quota) {
    let valid = q.validate().is_ok();
    block_on(async {
        let (reg, store, _) = registry().await;
        let set = reg.set_quota(TENANT, q.clone()).await;
        assert_eq!(
            set.is_ok(),
            valid,
            "the registry and Quota::validate disagree: {set:?} for {q:?}"
        );
        if set.is_ok() {
            match reg.quota(TENANT).await {
                Ok(read) => assert_eq!(read, q, "a quota reads back changed"),
                Err(e) => panic!("a set quota does not read back: {e}"),
            }
        }
        store.close().await;
    });
}

/// A name that ends up in keys, paths and headers: one path component of `a-z0-9-`, bounded.
fn plain_name(n: &str) {
    assert!(
        !n.is_empty()
            && n.len() <= 63
            && n != "."
            && n != ".."
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "a stored name is not a plain name: {n:?}"
    );
}
