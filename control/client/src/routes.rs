//! The routes the client calls: the only place a method or a path is written.

/// Every `(method, path template)` the client calls, as `control/openapi.json` spells them
/// (each `{param}` is one path segment; a template has at most one). Each request takes its method and path from here (by
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
    ("GET", "/v1/whoami"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("GET", "/v1/tenants/{tenant}/quota"),
    ("PUT", "/v1/tenants/{tenant}/quota"),
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
    WhoAmI,
    CreateToken,
    ListTokens,
    RevokeToken,
    GetQuota,
    SetQuota,
}

impl Route {
    /// Method and path template.
    pub(crate) fn spec(self) -> (&'static str, &'static str) {
        ROUTES[self as usize]
    }

    /// The path with `param` (percent-encoded) in place of its `{param}`.
    pub(crate) fn path(self, param: Option<&str>) -> String {
        let (_, template) = self.spec();
        let slot = template
            .find('{')
            .and_then(|start| Some((start, start + template[start..].find('}')? + 1)));
        match (param, slot) {
            (Some(p), Some((start, end))) => {
                format!(
                    "{}{}{}",
                    &template[..start],
                    encode_segment(p),
                    &template[end..]
                )
            }
            _ => template.to_string(),
        }
    }
}

/// `s` as one path segment: every byte outside the unreserved set percent-encoded, so a name
/// can never add segments or a query; `.` too, so no segment is a `..` that URL
/// normalisation would resolve.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
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
            (WhoAmI, "GET /v1/whoami"),
            (CreateToken, "POST /v1/tokens"),
            (ListTokens, "GET /v1/tokens"),
            (RevokeToken, "DELETE /v1/tokens/{id}"),
            (GetQuota, "GET /v1/tenants/{tenant}/quota"),
            (SetQuota, "PUT /v1/tenants/{tenant}/quota"),
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
        assert_eq!(
            Route::GetQuota.path(Some("team-a")),
            "/v1/tenants/team-a/quota"
        );
        assert_eq!(
            Route::RevokeToken.path(Some("../x")),
            "/v1/tokens/%2E%2E%2Fx"
        );
    }
}
