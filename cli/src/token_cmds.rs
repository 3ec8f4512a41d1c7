//! `shoal token ...` and `shoal tenant quota ...`: who may use control's API, and how much
//! each tenant may take. Both go through control's REST API with the user's token (an admin
//! token for tokens; the operator's for setting quotas).
use crate::args::{ControlConn, QuotaOp, TenantOp, TokenOp};
use crate::fn_cmds::{client, with_control};
use anyhow::Context;
use shoal_control_client::{Quota, QuotaStatus, TokenInfo, TokenRequest};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// `shoal token`.
pub(crate) fn token(conn: &ControlConn, op: TokenOp) -> anyhow::Result<ExitCode> {
    with_control(conn, token_async(conn, op))
}

async fn token_async(conn: &ControlConn, op: TokenOp) -> anyhow::Result<ExitCode> {
    let c = client(conn)?;
    match op {
        TokenOp::Create {
            role,
            tenant,
            ttl,
            description,
            json,
        } => {
            let ttl_secs = match ttl {
                Some(t) if t < Duration::from_secs(1) => {
                    anyhow::bail!("--ttl {t:?}: at least one second")
                }
                t => t.map(|t| t.as_secs()),
            };
            let req = TokenRequest {
                tenant,
                role,
                description,
                ttl_secs,
            };
            let issued = c.create_token(&req).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"token": issued.token, "record": issued.record})
                );
            } else {
                println!("{}", issued.token);
                let r = &issued.record;
                eprintln!(
                    "token {} of tenant {} with role {}, {}. It is shown only now: keep it in a \
                     file only you can read and point SHOAL_TOKEN_FILE at it.",
                    r.id,
                    r.tenant,
                    r.role,
                    expiry(r.expires_ms)
                );
            }
        }
        TokenOp::Ls { tenant, json } => {
            let tokens = c.tokens(tenant.as_deref()).await?;
            if json {
                println!("{}", serde_json::json!({ "tokens": tokens }));
            } else {
                print_tokens(&tokens);
            }
        }
        TokenOp::Revoke { id } => {
            c.revoke_token(&id).await?;
            println!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// When a token stops working, for people.
fn expiry(expires_ms: Option<u64>) -> String {
    match expires_ms {
        None => "never expires".into(),
        Some(ms) => format!("expires {}", when(ms)),
    }
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_tokens(tokens: &[TokenInfo]) {
    println!(
        "{:<16}  {:<16} {:<8} {:<20} {:<20}  description",
        "id", "tenant", "role", "created", "expires"
    );
    for t in tokens {
        let description = match &t.instance {
            Some(b) => format!("instance {} of {}", b.instance, b.function),
            None => t.description.clone(),
        };
        println!(
            "{:<16}  {:<16} {:<8} {:<20} {:<20}  {}",
            t.id,
            t.tenant,
            t.role,
            when(t.created_ms),
            t.expires_ms.map_or_else(|| "never".into(), when),
            description
        );
    }
}

/// `shoal tenant`.
pub(crate) fn tenant(conn: &ControlConn, op: TenantOp) -> anyhow::Result<ExitCode> {
    with_control(conn, tenant_async(conn, op))
}

async fn tenant_async(conn: &ControlConn, op: TenantOp) -> anyhow::Result<ExitCode> {
    let c = client(conn)?;
    let TenantOp::Quota { op } = op;
    match op {
        QuotaOp::Get { tenant, json } => {
            let q = c.quota(&tenant).await?;
            if json {
                println!("{}", serde_json::to_string(&q)?);
            } else {
                print_quota(&q);
            }
        }
        QuotaOp::Set {
            tenant,
            arena_bytes,
            spill_bytes,
            instances,
            cpu_milli,
            mem_mib,
            calls_in_flight,
            unset,
        } => {
            let mut q = c.quota(&tenant).await?.quota;
            for (slot, v) in [
                (&mut q.arena_bytes, arena_bytes),
                (&mut q.spill_bytes, spill_bytes),
                (&mut q.instances, instances),
                (&mut q.cpu_milli, cpu_milli),
                (&mut q.mem_mib, mem_mib),
                (&mut q.calls_in_flight, calls_in_flight),
            ] {
                if v.is_some() {
                    *slot = v;
                }
            }
            for name in &unset {
                *limit_named(&mut q, name).with_context(|| {
                    format!(
                        "--unset {name}: one of arena_bytes, spill_bytes, instances, cpu_milli, \
                         mem_mib, calls_in_flight"
                    )
                })? = None;
            }
            print_quota(&c.set_quota(&tenant, &q).await?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn limit_named<'q>(q: &'q mut Quota, name: &str) -> Option<&'q mut Option<u64>> {
    Some(match name.trim() {
        "arena_bytes" => &mut q.arena_bytes,
        "spill_bytes" => &mut q.spill_bytes,
        "instances" => &mut q.instances,
        "cpu_milli" => &mut q.cpu_milli,
        "mem_mib" => &mut q.mem_mib,
        "calls_in_flight" => &mut q.calls_in_flight,
        _ => return None,
    })
}

/// The quota and use of the tenant the user's token deploys to.
pub(crate) async fn own_quota(conn: &ControlConn) -> anyhow::Result<QuotaStatus> {
    let c = client(conn)?;
    let me = c.whoami().await?;
    Ok(c.quota(&me.home_tenant).await?)
}

/// A tenant's quota and use, for people.
pub(crate) fn print_quota(q: &QuotaStatus) {
    let limit = |l: Option<u64>, show: &dyn Fn(u64) -> String| {
        l.map_or_else(|| "unlimited".to_string(), show)
    };
    let plain = |n: u64| n.to_string();
    let milli = |n: u64| format!("{n}m");
    let mib = |n: u64| bytesize::ByteSize::mib(n).to_string();
    let bytes = |n: u64| bytesize::ByteSize(n).to_string();
    let (u, l) = (&q.usage, &q.quota);
    println!("tenant     {}", q.tenant);
    println!(
        "quota      instances {} of {}, cpu {} of {}, memory {} of {}",
        u.instances,
        limit(l.instances, &plain),
        milli(u.cpu_milli),
        limit(l.cpu_milli, &milli),
        mib(u.mem_mib),
        limit(l.mem_mib, &mib)
    );
    println!(
        "           per node: arena {}, spill {}, calls in flight {}",
        limit(l.arena_bytes, &bytes),
        limit(l.spill_bytes, &bytes),
        limit(l.calls_in_flight, &plain)
    );
}
