use shoal_meta::records::{validate_tenant, Role, DEFAULT_TENANT};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A local uid mapped to a tenant: clients of that uid that present no token act in
/// `tenant` with `role`. Written `UID=TENANT` or `UID=TENANT:ROLE` (role `admin` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidTenant {
    /// The client's uid (`SO_PEERCRED`).
    pub uid: u32,
    /// The tenant it acts in.
    pub tenant: String,
    /// What it may do there (`reader`: read only; `invoker`, `admin`: read and write).
    pub role: Role,
}

impl std::str::FromStr for UidTenant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (uid, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected UID=TENANT or UID=TENANT:ROLE"))?;
        let uid = uid
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{uid:?} is not a uid"))?;
        let (tenant, role) = match rest.split_once(':') {
            Some((t, r)) => (t, r.parse::<Role>().map_err(|e| e.to_string())?),
            None => (rest, Role::Admin),
        };
        validate_tenant(tenant).map_err(|e| e.to_string())?;
        Ok(UidTenant {
            uid,
            tenant: tenant.to_owned(),
            role,
        })
    }
}

/// Everything a dataworker needs, parsed and validated once at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of this node (used in logs, metrics and status).
    pub node_id: String,
    /// Directory for the Unix socket (`dataworker.sock`).
    pub socket_dir: PathBuf,
    /// Shared memory for objects in bytes: the arena ([`Config::arena_bytes`]) and the
    /// budget of segments together.
    pub shm_size: u64,
    /// Fault every arena page in at start.
    pub shm_populate: bool,
    /// Uids allowed to connect as the local user: each acts in the default tenant as admin,
    /// like the worker's own uid (kept for `--allow-uid`; see [`Config::tenant_uids`]).
    pub allowed_uids: Vec<u32>,
    /// Uids mapped to tenants (`--tenant-uid`). The worker's own uid maps to the default
    /// tenant as admin unless it is listed here. A client whose uid is not mapped must
    /// present a token.
    pub tenant_uids: Vec<UidTenant>,
    /// Where evicted objects go instead of being dropped.
    pub spill_dir: Option<PathBuf>,
    /// Eviction starts past this fraction of the arena.
    pub high_watermark: f64,
    /// Eviction stops at this fraction.
    pub low_watermark: f64,
    /// Largest payload accepted inline in a frame.
    pub inline_limit: u64,
    /// Where `/metrics` and `/health` are served (None: not served).
    pub http_addr: Option<SocketAddr>,
    /// Index buckets (8 slots each) of the shared index.
    pub index_buckets: u32,
    /// Clients that get a fast-path pin region (others use the socket only).
    pub fast_clients: u32,
    /// Fast pins one client may hold at once.
    pub pins_per_client: u32,
    /// Most connected clients.
    pub max_clients: usize,
    /// Most gets waiting for unsealed objects per client.
    pub max_waiting_gets: usize,
    /// Longest wait a get may ask for.
    pub max_get_timeout: Duration,
    /// Give each client a shared-memory mailbox served by a polling thread.
    pub mailbox: bool,
    /// How long the mailbox poller keeps polling after its last request before it sleeps.
    pub mailbox_spin: Duration,
    /// Cluster settings; `None` runs a standalone node.
    pub cluster: Option<ClusterConfig>,
}

/// How a dataworker takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// UDP address of the QUIC endpoint other dataworkers reach this node on (port 0 picks one).
    pub peer_addr: SocketAddr,
    /// TTL of the membership lease; a node that stops renewing it leaves the ring after this.
    pub lease_ttl: Duration,
    /// Owners of each directory entry (primary + copies), so losing a node loses no record.
    pub directory_copies: usize,
    /// Parallel QUIC streams for one large object.
    pub fetch_streams: usize,
    /// Objects below this size travel on a single stream.
    pub fetch_chunk: u64,
    /// How long a get with a zero timeout may spend pulling an object sealed elsewhere.
    pub pull_timeout: Duration,
    /// How often everything held is re-registered with the directory owners (anti-entropy).
    pub resync_interval: Duration,
    /// Pending directory updates before new ones are dropped (the next resync repairs them).
    pub outbox_capacity: usize,
    /// QUIC idle timeout: a silent peer is declared gone after this.
    pub idle_timeout: Duration,
}

impl ClusterConfig {
    /// Defaults with the QUIC endpoint on `peer_addr`.
    pub fn new(peer_addr: SocketAddr) -> Self {
        Self {
            peer_addr,
            lease_ttl: Duration::from_secs(10),
            directory_copies: 2,
            fetch_streams: 4,
            fetch_chunk: 4 << 20,
            pull_timeout: Duration::from_secs(60),
            resync_interval: Duration::from_secs(30),
            outbox_capacity: 65_536,
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// A setting that cannot work, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The setting's name as a user writes it.
    pub setting: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl Config {
    /// Defaults for a node whose socket lives in `socket_dir`.
    pub fn new(socket_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id: "node-0".into(),
            socket_dir: socket_dir.into(),
            shm_size: 1 << 30,
            shm_populate: false,
            allowed_uids: Vec::new(),
            tenant_uids: Vec::new(),
            spill_dir: None,
            high_watermark: 0.9,
            low_watermark: 0.8,
            inline_limit: 64 << 10,
            http_addr: None,
            index_buckets: 1 << 14,
            fast_clients: 256,
            pins_per_client: 1024,
            max_clients: 4096,
            max_waiting_gets: 1024,
            max_get_timeout: Duration::from_secs(3600),
            mailbox: true,
            mailbox_spin: Duration::from_micros(50),
            cluster: None,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: String| Err(ConfigError { setting, reason });
        if self.shm_size < 1 << 20 {
            return bad(
                "--shm-size",
                format!("{} bytes is below the 1 MiB minimum", self.shm_size),
            );
        }
        if self.shm_size / shoal_store::UNIT > u64::from(u32::MAX) {
            return bad("--shm-size", "at most 256 GiB".into());
        }
        if !(0.0 < self.low_watermark
            && self.low_watermark < self.high_watermark
            && self.high_watermark <= 1.0)
        {
            return bad(
                "--high-watermark/--low-watermark",
                format!(
                    "need 0 < low ({}) < high ({}) <= 1",
                    self.low_watermark, self.high_watermark
                ),
            );
        }
        if self.inline_limit > 16 << 20 {
            return bad("--inline-limit", "at most 16 MiB".into());
        }
        if self.node_id.is_empty() || self.node_id.len() > 128 {
            return bad("--node-id", "1 to 128 characters".into());
        }
        if self.mailbox_spin > Duration::from_millis(100) {
            return bad(
                "--mailbox-spin",
                "at most 100ms (it burns a core while it lasts)".into(),
            );
        }
        if let Some(c) = &self.cluster {
            if c.lease_ttl < Duration::from_secs(1) || c.lease_ttl > Duration::from_secs(3600) {
                return bad("--lease-ttl", "between 1s and 1h".into());
            }
            if !(1..=64).contains(&c.fetch_streams) {
                return bad("--fetch-streams", "between 1 and 64".into());
            }
            if c.directory_copies == 0 || c.directory_copies > 5 {
                return bad("--directory-copies", "between 1 and 5".into());
            }
            if c.fetch_chunk < 64 << 10 {
                return bad("--fetch-chunk", "at least 64KiB".into());
            }
        }
        for m in &self.tenant_uids {
            if let Err(e) = validate_tenant(&m.tenant) {
                return bad("--tenant-uid", e.to_string());
            }
            if self.tenant_uids.iter().filter(|o| o.uid == m.uid).count() > 1 {
                return bad("--tenant-uid", format!("uid {} is mapped twice", m.uid));
            }
        }
        if self.pins_per_client == 0 || self.index_buckets == 0 {
            return bad(
                "--pins-per-client/--index-buckets",
                "must be positive".into(),
            );
        }
        Ok(())
    }

    /// Who each mapped uid is: `tenant_uids`, then `allowed_uids` and the worker's own uid
    /// (`own_uid`) as the default tenant's admin where not mapped otherwise.
    pub fn uid_map(&self, own_uid: u32) -> Vec<UidTenant> {
        let mut m = self.tenant_uids.clone();
        for uid in self.allowed_uids.iter().copied().chain([own_uid]) {
            if !m.iter().any(|x| x.uid == uid) {
                m.push(UidTenant {
                    uid,
                    tenant: DEFAULT_TENANT.into(),
                    role: Role::Admin,
                });
            }
        }
        m
    }

    /// Bytes of the arena: the worker-written part of `shm_size` (inline puts, KV values,
    /// names, small restores and replicas), a quarter of it (at least half of it, up to
    /// 1 MiB, for small sizes). The rest is the budget of segments, the payloads clients
    /// write themselves. Together they never pass `shm_size`.
    pub fn arena_bytes(&self) -> u64 {
        let a = (self.shm_size / 4).max((self.shm_size / 2).min(1 << 20));
        a / shoal_store::UNIT * shoal_store::UNIT
    }

    /// The socket clients connect to.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join("dataworker.sock")
    }

    /// Largest frame body the worker accepts: an inline payload plus room for the request.
    pub(crate) fn max_frame(&self) -> usize {
        self.inline_limit as usize + (64 << 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let mut c = Config::new("/tmp");
        assert!(c.validate().is_ok());
        c.low_watermark = 0.95;
        assert!(c.validate().unwrap_err().to_string().contains("watermark"));
        let mut c = Config::new("/tmp");
        c.shm_size = 10;
        assert!(c.validate().unwrap_err().to_string().contains("--shm-size"));
        let mut c = Config::new("/tmp");
        c.tenant_uids = vec!["5=team-a".parse().unwrap(), "5=team-b".parse().unwrap()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--tenant-uid"));
    }

    #[test]
    fn uid_mappings_parse_and_default_to_the_own_uid() {
        let m: UidTenant = "1001=team-a:reader".parse().unwrap();
        assert_eq!(
            (m.uid, m.tenant.as_str(), m.role),
            (1001, "team-a", Role::Reader)
        );
        let m: UidTenant = "7=team-b".parse().unwrap();
        assert_eq!(m.role, Role::Admin);
        for bad in ["x=team", "7", "7=Team", "7=team:root", "7="] {
            assert!(bad.parse::<UidTenant>().is_err(), "{bad}");
        }
        let mut c = Config::new("/tmp");
        c.allowed_uids = vec![9];
        c.tenant_uids = vec!["0=team-z".parse().unwrap()];
        let map = c.uid_map(0);
        let find = |uid| map.iter().find(|m| m.uid == uid).map(|m| m.tenant.as_str());
        assert_eq!(
            find(0),
            Some("team-z"),
            "an explicit mapping of the own uid wins"
        );
        assert_eq!(find(9), Some(DEFAULT_TENANT));
        assert_eq!(find(5), None);
        assert_eq!(Config::new("/tmp").uid_map(42)[0].tenant, DEFAULT_TENANT);
    }
}
