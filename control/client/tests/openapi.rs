//! The OpenAPI document is the contract: every route the client calls is an operation of
//! `control/openapi.json`, with the same method and path template.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use shoal_control_client::ROUTES;
use std::collections::BTreeSet;

const OPENAPI: &str = include_str!("../../openapi.json");

#[test]
fn every_client_route_is_documented() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        let op = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is not in openapi.json"))[method.to_lowercase()];
        assert!(
            op.is_object(),
            "{method} {path} is not an operation of openapi.json"
        );
    }
}

#[test]
fn routes_are_listed_once() {
    let unique: BTreeSet<_> = ROUTES.iter().collect();
    assert_eq!(unique.len(), ROUTES.len());
}
