//! Hostname resolution with hickory-resolver: A and AAAA, refreshed when each answer's TTL runs
//! out; a failed lookup keeps the last good addresses.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use tokio::time::Instant;

/// Answers with a TTL below this are refreshed this often, not in a busy loop.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Answers are re-checked at least this often, whatever their TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Retry delay after a failure, doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("reading the system resolver configuration (/etc/resolv.conf)")]
    SystemConf(#[source] hickory_resolver::net::NetError),
    #[error("building the resolver")]
    Build(#[source] hickory_resolver::net::NetError),
    #[error("the system resolver configuration names no name server; pass --dns")]
    NoServers,
}

pub struct Resolver {
    inner: TokioResolver,
    servers: Vec<SocketAddr>,
}

impl Resolver {
    /// A resolver using `dns` if given, else the system's name servers.
    pub fn new(dns: Option<SocketAddr>) -> Result<Self, ResolveError> {
        let (config, mut opts) = match dns {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                (
                    ResolverConfig::from_name_servers(vec![ns]),
                    ResolverOpts::default(),
                )
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(ResolveError::SystemConf)?,
        };
        let servers: Vec<SocketAddr> = config
            .name_servers()
            .iter()
            .flat_map(|ns| {
                ns.connections
                    .iter()
                    .map(|c| SocketAddr::new(ns.ip, c.port))
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if servers.is_empty() {
            return Err(ResolveError::NoServers);
        }
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The refresh schedule below is the cache; hickory's would answer from memory.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Names in policies are fully qualified; never try search domains.
        opts.ndots = 0;
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        *builder.options_mut() = opts;
        let inner = builder.build().map_err(ResolveError::Build)?;
        Ok(Self { inner, servers })
    }

    /// The name servers this resolver asks; they stay reachable for enforced processes.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Addresses of `name` and when to ask again.
    pub async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Instant), String> {
        // A trailing dot makes the name absolute.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut ips: Vec<IpAddr> = lookup.iter().collect();
                ips.sort();
                ips.dedup();
                let now = Instant::now();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                Ok((ips, now + ttl.clamp(MIN_REFRESH, MAX_REFRESH)))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What is known of one hostname.
#[derive(Debug, Clone)]
pub struct HostState {
    /// The last good answer; empty until one arrives.
    pub addrs: Vec<IpAddr>,
    pub next: Instant,
    retry: Duration,
    pub last_error: Option<String>,
}

/// The outcome of refreshing one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    Changed,
    Unchanged,
    Failed(String),
}

/// Every hostname the plan needs, with its schedule.
#[derive(Debug, Default)]
pub struct HostTable {
    hosts: HashMap<String, HostState>,
}

impl HostTable {
    /// Keeps exactly `names`, keeping what is known of names that stay.
    pub fn retain_names<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let now = Instant::now();
        let mut next = HashMap::new();
        for n in names {
            let state = self.hosts.remove(n).unwrap_or(HostState {
                addrs: Vec::new(),
                next: now,
                retry: FIRST_RETRY,
                last_error: None,
            });
            next.insert(n.to_owned(), state);
        }
        self.hosts = next;
    }

    pub fn due(&self, now: Instant) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, s)| s.next <= now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.hosts.values().map(|s| s.next).min()
    }

    /// Records a lookup's outcome. A failure keeps the last good addresses.
    pub fn record(
        &mut self,
        name: &str,
        result: Result<(Vec<IpAddr>, Instant), String>,
    ) -> Refresh {
        let Some(state) = self.hosts.get_mut(name) else {
            return Refresh::Unchanged;
        };
        match result {
            Ok((addrs, next)) => {
                state.next = next;
                state.retry = FIRST_RETRY;
                state.last_error = None;
                if state.addrs == addrs {
                    Refresh::Unchanged
                } else {
                    state.addrs = addrs;
                    Refresh::Changed
                }
            }
            Err(e) => {
                state.next = Instant::now() + state.retry;
                state.retry = (state.retry * 2).min(MAX_RETRY);
                state.last_error = Some(e.clone());
                Refresh::Failed(e)
            }
        }
    }

    pub fn addresses(&self) -> HashMap<String, Vec<IpAddr>> {
        self.hosts
            .iter()
            .map(|(n, s)| (n.clone(), s.addrs.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&HostState> {
        self.hosts.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_keeps_last_good_and_backs_off() {
        let mut t = HostTable::default();
        t.retain_names(["a.example"]);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            t.record("a.example", Ok((vec![ip], later))),
            Refresh::Changed
        );
        assert_eq!(
            t.record("a.example", Ok((vec![ip], later))),
            Refresh::Unchanged
        );
        assert!(matches!(
            t.record("a.example", Err("timeout".into())),
            Refresh::Failed(_)
        ));
        assert_eq!(t.addresses()["a.example"], vec![ip]);
        let first = t.get("a.example").expect("state").next;
        t.record("a.example", Err("timeout".into()));
        assert!(
            t.get("a.example").expect("state").next > first,
            "retry backs off"
        );
        t.retain_names(["b.example"]);
        assert!(t.get("a.example").is_none());
    }
}
