//! The routes the client calls: the only place a method or a path is written.

/// Every `(method, path template)` the client calls, as `control/openapi.json` spells them
/// (`{name}` is one path segment). Each request takes its method and path from here (by
/// position, through a private enum); `tests/openapi.rs` checks each entry against the
/// OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/v1/leader"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/functions"),
    ("POST", "/v1/functions"),
    ("GET", "/v1/functions/{name}"),
    ("PUT", "/v1/functions/{name}"),
    ("DELETE", "/v1/functions/{name}"),
    ("GET", "/v1/functions/{name}/instances"),
    ("POST", "/v1/functions/{name}/invoke"),
    ("GET", "/v1/functions/{name}/logs"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/pools"),
    ("POST", "/v1/pools"),
    ("GET", "/v1/pools/{name}"),
    ("DELETE", "/v1/pools/{name}"),
];

/// A route of [`ROUTES`], by position (the variants are in the table's order; the
/// `route_names_follow_the_table` test keeps them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Health,
    Leader,
    Nodes,
    ListFunctions,
    CreateFunction,
    GetFunction,
    UpdateFunction,
    DeleteFunction,
    FunctionInstances,
    Invoke,
    Logs,
    ListInstances,
    ListPools,
    CreatePool,
    GetPool,
    DeletePool,
}

impl Route {
    /// Method and path template.
    pub(crate) fn spec(self) -> (&'static str, &'static str) {
        ROUTES[self as usize]
    }

    /// The path with `name` (percent-encoded) in place of `{name}`.
    pub(crate) fn path(self, name: Option<&str>) -> String {
        let (_, template) = self.spec();
        match name {
            Some(n) => template.replace("{name}", &encode_segment(n)),
            None => template.to_string(),
        }
    }
}

/// `s` as one path segment: every byte outside the unreserved set percent-encoded, so a name
/// can never add segments or a query.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names_follow_the_table() {
        use Route::*;
        let all = [
            (Health, "GET /health"),
            (Leader, "GET /v1/leader"),
            (Nodes, "GET /v1/nodes"),
            (ListFunctions, "GET /v1/functions"),
            (CreateFunction, "POST /v1/functions"),
            (GetFunction, "GET /v1/functions/{name}"),
            (UpdateFunction, "PUT /v1/functions/{name}"),
            (DeleteFunction, "DELETE /v1/functions/{name}"),
            (FunctionInstances, "GET /v1/functions/{name}/instances"),
            (Invoke, "POST /v1/functions/{name}/invoke"),
            (Logs, "GET /v1/functions/{name}/logs"),
            (ListInstances, "GET /v1/instances"),
            (ListPools, "GET /v1/pools"),
            (CreatePool, "POST /v1/pools"),
            (GetPool, "GET /v1/pools/{name}"),
            (DeletePool, "DELETE /v1/pools/{name}"),
        ];
        assert_eq!(all.len(), ROUTES.len());
        for (r, want) in all {
            let (m, p) = r.spec();
            assert_eq!(format!("{m} {p}"), want);
        }
    }

    #[test]
    fn names_stay_one_segment() {
        assert_eq!(
            Route::GetFunction.path(Some("hello")),
            "/v1/functions/hello"
        );
        assert_eq!(
            Route::Logs.path(Some("a/b?c")),
            "/v1/functions/a%2Fb%3Fc/logs"
        );
        assert_eq!(Route::ListPools.path(None), "/v1/pools");
    }
}
