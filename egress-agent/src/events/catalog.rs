//! What the kernel does not know about a destination: which ServiceEntry host it belongs to and
//! which rule that is; and which cgroup path a cgroup id is.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::HashMap as FastMap;
use ipnet::IpNet;

use egress_common::{RULE_AF_XDP, RULE_LOOPBACK, RULE_MODE, RULE_QDISC_BYPASS, RULE_RESOLVER};

use super::{
    Record,
    record::{Name, Word},
};
use crate::policy::{
    Plan,
    compile::{
        Balance, Balancing, Carry, ConnectionPool, EndpointGroup, HashOn, Origination, Outliers,
        PassRoute, RelayRoute, RequestRoute, RouteTo,
    },
};

/// A snapshot of the plan and the resolved addresses, replaced on every map sync. The relay reads
/// it too, to judge a ClientHello and to connect on.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By rule id.
    rules: FastMap<u32, Rule>,
    /// Rules that reloads removed within [`RETIRED_FOR`], by id: the kernel may have decided by
    /// them just before, and those decisions' records are written after the swap. They name
    /// such records; they judge nothing. Ids are never reused, so none names another rule.
    retired: FastMap<u32, Retired>,
    /// Why the mode decided, for the records it did.
    mode: &'static str,
    /// Resolved names of each address.
    names: FastMap<IpAddr, Vec<Name>>,
    /// Resolved addresses of each name.
    addrs: HashMap<String, Vec<IpAddr>>,
    /// The rule of each host, for route destinations: the policy's first that names it.
    by_host: FastMap<Name, u32>,
}

#[derive(Debug)]
struct Rule {
    label: Name,
    hosts: Vec<Name>,
    /// How the relay connects upstream, by steered port.
    routes: Vec<(u16, Arc<RelayRoute>)>,
    /// How the relay takes each steered port's connections.
    carry: Vec<(u16, Carry)>,
    /// The routes of each request on a steered port served as HTTP (`SteeredPort::requests`).
    requests: Vec<(u16, Arc<[RequestRoute]>)>,
    originate: Vec<Origination>,
    pools: Vec<(u16, ConnectionPool)>,
    outliers: Vec<(u16, Outliers)>,
    balance: Vec<(u16, Balance)>,
    endpoint_groups: Vec<EndpointGroup>,
    virtual_nets: Vec<IpNet>,
    /// The routes of each steered port that sends connections elsewhere
    /// (`SteeredPort::pass`).
    pass: Vec<(u16, Vec<PassRoute>)>,
}

#[derive(Debug, Clone)]
struct Retired {
    label: Name,
    hosts: Vec<Name>,
    since: Instant,
}

/// How long a removed rule still names records: far longer than a record waits to be written.
const RETIRED_FOR: Duration = Duration::from_secs(60);

/// One of a route's destinations, drawn in proportion to their weights; none of none.
pub fn draw<T>(to: &[T], weight: impl Fn(&T) -> u32) -> Option<&T> {
    if let [only] = to {
        return Some(only);
    }
    let total: u32 = to.iter().map(&weight).sum();
    if total == 0 {
        return None;
    }
    let mut left = rand::random_range(0..total);
    to.iter().find(|d| {
        let this = left < weight(d);
        left = left.saturating_sub(weight(d));
        this
    })
}

/// Where a route sends a steered connection (`Catalog::routed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The destination host's rule, whose DestinationRule's settings apply on `port`.
    pub rule: u32,
    pub host: Name,
    pub port: u16,
    /// The addresses that serve it, in the order the policy gives them.
    pub addrs: Vec<IpAddr>,
    /// The route: `VirtualService/ns/name spec.tls[i]`.
    pub by: Name,
}

/// What the relay may do with a steered connection whose ClientHello passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The registered host the server name matched (a pattern, for a wildcard host).
    pub host: Name,
    pub route: Arc<RelayRoute>,
    /// Other addresses of the same host, for retries.
    pub alternates: Vec<IpAddr>,
    /// The address dialled serves too: false for a virtual one (`RuleInfo::virtual_nets`).
    pub dialled: bool,
}

impl Upstream {
    /// Where attempts go, in turn: `dst` first (unless it is virtual), then the host's other
    /// addresses of the same family, on `dst`'s port.
    pub fn targets(&self, dst: SocketAddr) -> Vec<SocketAddr> {
        self.dialled
            .then_some(dst)
            .into_iter()
            .chain(
                self.alternates
                    .iter()
                    .filter(|ip| ip.is_ipv4() == dst.is_ipv4())
                    .map(|ip| SocketAddr::new(*ip, dst.port())),
            )
            .collect()
    }
}

impl Catalog {
    pub fn new(plan: &Plan, resolved: &HashMap<String, Vec<IpAddr>>) -> Catalog {
        let mut names: FastMap<IpAddr, Vec<Name>> = FastMap::default();
        for (name, addrs) in resolved {
            let name = Name::from(name.as_str());
            for ip in addrs {
                names.entry(*ip).or_default().push(Name::clone(&name));
            }
        }
        for v in names.values_mut() {
            v.sort();
        }
        let mut by_host = FastMap::default();
        for r in &plan.rules {
            for h in &r.hosts {
                by_host.entry(Name::from(h.as_str())).or_insert(r.id);
            }
        }
        Catalog {
            rules: plan
                .rules
                .iter()
                .map(|r| {
                    let rule = Rule {
                        label: r.label.as_str().into(),
                        hosts: r.hosts.iter().map(|h| h.as_str().into()).collect(),
                        routes: r
                            .steered
                            .iter()
                            .map(|s| (s.port, Arc::new(s.route.clone())))
                            .collect(),
                        carry: r.steered.iter().map(|s| (s.port, s.carry)).collect(),
                        requests: r
                            .steered
                            .iter()
                            .filter(|s| !s.requests.is_empty())
                            .map(|s| (s.port, Arc::from(s.requests.as_slice())))
                            .collect(),
                        originate: r.originate.clone(),
                        pools: r.pools.clone(),
                        outliers: r.outliers.clone(),
                        balance: r.balance.clone(),
                        endpoint_groups: r.endpoint_groups.clone(),
                        virtual_nets: r.virtual_nets.clone(),
                        pass: (r.steered.iter())
                            .filter(|s| !s.pass.is_empty())
                            .map(|s| (s.port, s.pass.clone()))
                            .collect(),
                    };
                    (r.id, rule)
                })
                .collect(),
            retired: FastMap::default(),
            mode: plan.mode.reason(),
            names,
            addrs: resolved.clone(),
            by_host,
        }
    }

    /// The catalog that replaces this one, at `now`: for `plan` and `resolved`, naming too the
    /// rules that this one had and `plan` has not (see `retired`).
    pub fn next(
        &self,
        plan: &Plan,
        resolved: &HashMap<String, Vec<IpAddr>>,
        now: Instant,
    ) -> Catalog {
        let mut next = Catalog::new(plan, resolved);
        let removed = self.rules.iter().map(|(id, rule)| {
            let retired = Retired {
                label: Name::clone(&rule.label),
                hosts: rule.hosts.clone(),
                since: now,
            };
            (*id, retired)
        });
        let still = self
            .retired
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.since) < RETIRED_FOR)
            .map(|(id, r)| (*id, r.clone()));
        next.retired = still
            .chain(removed)
            .filter(|(id, _)| !next.rules.contains_key(id))
            .collect();
        next
    }

    /// Whether a steered connection to `dst`, decided by `rule_id`, may go on with this TLS
    /// server name: the name must be one of the rule's hosts, and a host resolved by DNS must
    /// have resolved to `dst` (the kernel's record, never the client's word). Hosts with fixed
    /// addresses or endpoints of their own, and wildcard hosts, match by name: every endpoint
    /// serves every host of its ServiceEntry. The error says why not. With the route of `dst`'s
    /// port.
    pub fn upstream(&self, rule_id: u32, sni: &str, dst: SocketAddr) -> Result<Upstream, String> {
        let Rule {
            label,
            hosts,
            routes,
            endpoint_groups,
            ..
        } = self
            .rule(rule_id)
            .ok_or_else(|| format!("rule #{rule_id} is not in the policy in force"))?;
        let sni = sni.trim_end_matches('.');
        let host = hosts.iter().find(|h| host_matches(h, sni)).ok_or_else(|| {
            format!(
                "server name {} is not a host of {label}",
                sni.to_ascii_lowercase()
            )
        })?;
        let (dst, port) = (dst.ip(), dst.port());
        if endpoint_groups.is_empty()
            && let Some(addrs) = self.addrs.get(&**host)
            && !addrs.contains(&dst)
        {
            return Err(format!(
                "server name {} does not resolve to the destination {dst}",
                sni.to_ascii_lowercase()
            ));
        }
        let (alternates, dialled) = self.alternates(rule_id, host, SocketAddr::new(dst, port));
        Ok(Upstream {
            host: host.clone(),
            route: route_of(routes, port),
            alternates,
            dialled,
        })
    }

    /// The other addresses that may serve a connection to `dst` of `host`, decided by `rule_id`:
    /// those of `dst`'s group of endpoints (`RuleInfo::endpoint_groups`), resolved where they are
    /// names, else the host's resolved addresses; for a virtual `dst`, the endpoints that take
    /// its port on its own number. With whether `dst` serves itself.
    fn alternates(&self, rule_id: u32, host: &str, dst: SocketAddr) -> (Vec<IpAddr>, bool) {
        let port = dst.port();
        let resolved = |name: &str| self.addrs.get(name).into_iter().flatten().copied();
        let Some(rule) = self.rule(rule_id) else {
            return (Vec::new(), true);
        };
        let members = |g: &EndpointGroup| {
            g.ips
                .iter()
                .copied()
                .chain(g.names.iter().flat_map(|n| resolved(n)))
                .collect::<Vec<_>>()
        };
        if rule.virtual_nets.iter().any(|net| net.contains(&dst.ip())) {
            let endpoints = (rule.endpoint_groups.iter()).filter(|g| !g.renumbers.contains(&port));
            return (endpoints.flat_map(members).collect(), false);
        }
        let all: Vec<IpAddr> = if rule.endpoint_groups.is_empty() {
            resolved(host).collect()
        } else {
            rule.endpoint_groups
                .iter()
                .map(members)
                .find(|g| g.contains(&dst.ip()))
                .unwrap_or_default()
        };
        (all.into_iter().filter(|a| *a != dst.ip()).collect(), true)
    }

    /// Where a route sends a connection to `port` of `host`, decided by `rule_id`, with this
    /// server name (none: not TLS), where it sends it to another host: the first of the port's
    /// routes (`SteeredPort::pass`) that takes it, to one of its destinations drawn by weight.
    /// None: where it was dialled. The error says why the
    /// destination cannot be reached.
    pub fn routed(
        &self,
        rule_id: u32,
        port: u16,
        sni: Option<&str>,
        host: &str,
    ) -> Option<Result<Routed, String>> {
        let routes = &self.rule(rule_id)?.pass.iter().find(|(p, _)| *p == port)?.1;
        let route = routes.iter().find(|r| match sni {
            Some(name) => r.sni.is_empty() || r.sni.iter().any(|s| host_matches(s, name)),
            None => !r.tls,
        })?;
        let to = draw(&route.to, |d| d.weight)?;
        // Its own host, all of its endpoints: where dialled (another port of it, as the port's
        // `targetPort` says).
        if to.host == host && to.subset.is_none() {
            return None;
        }
        Some(self.routed_to(to, &route.by))
    }

    /// Where route `by` sends a connection or request it drew `to`: the destination host's
    /// rule and the addresses that serve it. The error says why it cannot be reached.
    pub fn routed_to(&self, to: &RouteTo, by: &str) -> Result<Routed, String> {
        self.destination(to).map(|(rule, addrs)| Routed {
            rule,
            host: Name::from(to.host.as_str()),
            port: to.port,
            addrs,
            by: Name::from(by),
        })
    }

    /// The rule of a route's destination host and the addresses that serve it on its port: its
    /// endpoints (those of its subset, where that narrows them), resolved where they are names,
    /// else the host's resolved addresses.
    fn destination(&self, to: &RouteTo) -> Result<(u32, Vec<IpAddr>), String> {
        let unknown = || format!("{} is not a host of any ServiceEntry in force", to.host);
        let id = self.by_host.get(to.host.as_str()).ok_or_else(unknown)?;
        let rule = self.rules.get(id).ok_or_else(unknown)?;
        let resolved = |name: &str| self.addrs.get(name).into_iter().flatten().copied();
        if let Some(subset) = &to.subset {
            let addrs: Vec<IpAddr> = (subset.ips.iter().copied())
                .chain(subset.names.iter().flat_map(|n| resolved(n)))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "no endpoint of {} has the labels of its subset {}",
                    to.host, subset.name
                ));
            }
            return Ok((*id, addrs));
        }
        let addrs: Vec<IpAddr> = if rule.endpoint_groups.is_empty() {
            resolved(&to.host).collect()
        } else {
            (rule.endpoint_groups.iter())
                .filter(|g| !g.renumbers.contains(&to.port))
                .flat_map(|g| {
                    g.ips
                        .iter()
                        .copied()
                        .chain(g.names.iter().flat_map(|n| resolved(n)))
                })
                .collect()
        };
        if addrs.is_empty() {
            return Err(format!(
                "{} has no address egress knows to send to (not resolved, or no endpoint takes \
                 port {} on its own number)",
                to.host, to.port
            ));
        }
        Ok((*id, addrs))
    }

    /// How the relay takes a steered connection to `port`, decided by `rule_id`: as TLS unless
    /// the policy says otherwise.
    pub fn carry(&self, rule_id: u32, port: u16) -> Carry {
        self.rule(rule_id)
            .and_then(|r| r.carry.iter().find(|(p, _)| *p == port))
            .map_or(Carry::Tls, |(_, c)| *c)
    }

    /// Where a steered connection to `dst`, decided by `rule_id`, goes when its bytes are carried
    /// as they come (`Carry::Opaque`): to `dst` alone, under the name the rule's host has there
    /// (a host that resolved to it, else the rule's first). The error says why not.
    pub fn carried(&self, rule_id: u32, dst: SocketAddr) -> Result<Upstream, String> {
        let rule = self
            .rule(rule_id)
            .ok_or_else(|| format!("rule #{rule_id} is not in the policy in force"))?;
        let host = (self.names.get(&dst.ip()).into_iter().flatten())
            .find(|n| rule.hosts.contains(n))
            .or(rule.hosts.first())
            .ok_or_else(|| format!("{} has no host", rule.label))?;
        let (alternates, dialled) = self.alternates(rule_id, host, dst);
        Ok(Upstream {
            host: Name::clone(host),
            route: route_of(&rule.routes, dst.port()),
            alternates,
            dialled,
        })
    }

    /// The routes each request on a steered connection to `port`, decided by `rule_id`, is
    /// matched against, where the relay serves it as HTTP; none: every request takes the port's.
    pub fn requests(&self, rule_id: u32, port: u16) -> Option<Arc<[RequestRoute]>> {
        self.rule(rule_id)?
            .requests
            .iter()
            .find_map(|(p, r)| (*p == port).then(|| Arc::clone(r)))
    }

    /// The TLS origination a steered connection to `port`, decided by `rule_id`, gets, if any.
    pub fn origination(&self, rule_id: u32, port: u16) -> Option<&Origination> {
        self.rule(rule_id)?
            .originate
            .iter()
            .find(|o| o.port == port)
    }

    /// The connection pool settings for steered connections to `port`, decided by `rule_id`.
    pub fn pool(&self, rule_id: u32, port: u16) -> Option<&ConnectionPool> {
        self.rule(rule_id)?
            .pools
            .iter()
            .find_map(|(p, pool)| (*p == port).then_some(pool))
    }

    /// The outlier detection steered connections to `port`, decided by `rule_id`, get.
    pub fn outliers(&self, rule_id: u32, port: u16) -> Option<&Outliers> {
        self.rule(rule_id)?
            .outliers
            .iter()
            .find_map(|(p, o)| (*p == port).then_some(o))
    }

    /// How steered connections to `port`, decided by `rule_id`, choose among the host's
    /// addresses: the address dialled first, unless a DestinationRule's `loadBalancer` says.
    /// What a steered connection to `port`, decided by `rule_id`, is hashed on, where its load
    /// balancing is a consistent hash.
    pub fn hash_on(&self, rule_id: u32, port: u16) -> Option<&HashOn> {
        self.rule(rule_id)?
            .balance
            .iter()
            .find(|(p, _)| *p == port)?
            .1
            .hash
            .as_ref()
    }

    pub fn balancing(&self, rule_id: u32, port: u16) -> Balancing {
        self.rule(rule_id)
            .and_then(|r| r.balance.iter().find(|(p, _)| *p == port))
            .map_or(Balancing::Dialled, |(_, b)| b.policy)
    }

    /// Fills host, rule and reason from the rule id and destination.
    pub fn annotate(&self, r: &mut Record) {
        let Some(rule_id) = r.rule_id else { return };
        let names = r.dst.and_then(|sa| self.names.get(&sa.ip()));
        let reason = match rule_id {
            RULE_LOOPBACK => Some("loopback"),
            RULE_RESOLVER => Some("resolver"),
            RULE_QDISC_BYPASS => Some("packet-qdisc-bypass"),
            RULE_AF_XDP => Some("af-xdp"),
            RULE_MODE => Some(self.mode),
            _ => None,
        };
        if let Some(reason) = reason {
            r.reason = Some(Word::Borrowed(reason));
        }
        let rule = match self.rule(rule_id) {
            Some(Rule { label, hosts, .. }) => Some((label, hosts)),
            None => self.retired.get(&rule_id).map(|r| (&r.label, &r.hosts)),
        };
        r.host = match (rule, names) {
            // The name this address was resolved from, among the rule's hosts.
            (Some((_, hosts)), Some(names)) => names
                .iter()
                .find(|n| hosts.contains(n))
                .or(hosts.first())
                .cloned(),
            // An address the rule lists itself (STATIC endpoints, CIDRs).
            (Some((_, hosts)), None) => hosts.first().cloned(),
            // No rule decided, but the address belongs to a registered name.
            (None, Some(names)) => names.first().cloned(),
            (None, None) => None,
        };
        r.rule = rule.map(|(label, _)| Name::clone(label));
    }

    fn rule(&self, rule_id: u32) -> Option<&Rule> {
        self.rules.get(&rule_id)
    }
}

/// Istio host matching: exact, or `*.suffix` for any name below the suffix. Names match in any
/// case (hosts are lower case).
pub fn host_matches(host: &str, name: &str) -> bool {
    let name = name.as_bytes();
    match host.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            name.len() > suffix.len()
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
        Some(_) => host == "*",
        None => name.eq_ignore_ascii_case(host.as_bytes()),
    }
}

/// The route of a steered port; none (the defaults) for a port the policy in force does not steer.
fn route_of(routes: &[(u16, Arc<RelayRoute>)], port: u16) -> Arc<RelayRoute> {
    routes
        .iter()
        .find(|(p, _)| *p == port)
        .map_or_else(Arc::default, |(_, r)| Arc::clone(r))
}

/// cgroup id → path (relative to the cgroup2 mount, with a leading `/`). An id not known yet is
/// opened by its id (cgroup2 hands out file handles that are the id), so a cgroup made a moment
/// ago, a new pod's, is named in its first records; where that is refused, a miss rescans the
/// enforced subtree, at most once a second. Cgroups that are gone stay unknown.
pub struct CgroupNames {
    mount: PathBuf,
    /// The mount, open: where ids are opened.
    mount_dir: Option<std::fs::File>,
    root: PathBuf,
    known: FastMap<u64, Name>,
    last_scan: Option<Instant>,
}

/// Names kept at most: cgroups come and go with workloads, and a gone one's name is wanted only
/// for its last records.
const NAMES_KEPT: usize = 16 << 10;

impl CgroupNames {
    pub fn new(mount: PathBuf, root: PathBuf) -> CgroupNames {
        let mut names = CgroupNames {
            mount_dir: std::fs::File::open(&mount).ok(),
            mount,
            root,
            known: FastMap::default(),
            last_scan: None,
        };
        names.scan();
        names
    }

    pub fn name(&mut self, id: u64) -> Option<Name> {
        if let Some(name) = self.known.get(&id) {
            return Some(name.clone());
        }
        if let Some(dir) = self.mount_dir.as_ref().and_then(|m| cgroup_path(m, id)) {
            let name: Name = display(&self.mount, &dir).into();
            if self.known.len() >= NAMES_KEPT {
                self.known.clear();
            }
            self.known.insert(id, name.clone());
            return Some(name);
        }
        if self
            .last_scan
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.scan();
        }
        self.known.get(&id).cloned()
    }

    /// Names every cgroup of the enforced subtree, and forgets the ones gone.
    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.known.clear();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.known
                .insert(meta.ino(), display(&self.mount, &dir).into());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

/// The path of the cgroup with id `id`, on the cgroup2 mount open as `mount`: the id is the
/// cgroup's file handle (kernfs's, type `FILEID_KERNFS`). `None` if the cgroup is gone or the
/// agent may not open handles (it needs CAP_DAC_READ_SEARCH).
fn cgroup_path(mount: &std::fs::File, id: u64) -> Option<PathBuf> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    /// `struct file_handle` with the 8 bytes of a kernfs handle.
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a file_handle header followed by its `handle_bytes` bytes, alive for
    // the call; the kernel only reads it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut handle).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

fn display(mount: &Path, dir: &Path) -> String {
    match dir.strip_prefix(mount) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::SocketAddr,
        time::{Duration, Instant},
    };

    use jiff::Timestamp;

    use super::{Catalog, host_matches};
    use crate::{
        events::Record,
        policy::{RuleIds, tests::tls_entries as plan},
    };

    /// The host and rule `catalog` names for a decision by rule `id` on `dst`.
    fn named(catalog: &Catalog, id: u32, dst: SocketAddr) -> (Option<String>, Option<String>) {
        let mut record = Record::relay_unknown(Timestamp::now());
        record.rule_id = Some(id);
        record.dst = Some(dst);
        catalog.annotate(&mut record);
        (
            record.host.map(|h| h.to_string()),
            record.rule.map(|r| r.to_string()),
        )
    }

    /// A route sends a connection by its server name (TLS) or whole (TCP, where `tls` routes
    /// take nothing), to a destination drawn by weight, at the addresses the policy gives that
    /// host: its endpoints, or its resolved addresses. Where the draw is the host and port
    /// dialled, nothing changes; a destination without addresses is an error, never a guess.
    #[test]
    fn a_route_sends_a_connection_to_a_destination_drawn_by_weight() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a}
spec:
  hosts: [a.test]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  ports: [{number: 5433, name: pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}, {address: 10.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b}
spec:
  hosts: [b.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [a.test]
  tls:
  - match: [{port: 443, sniHosts: [a.test]}]
    route:
    - destination: {host: a.test}
      weight: 1
    - destination: {host: b.test}
      weight: 3
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: db.internal}}]
";
        let (policy, d) = crate::policy::load_str(yaml, std::path::Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = crate::policy::compile(&policy, None);
        assert!(d.is_empty(), "{d:?}");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
        let resolved = HashMap::from([("a.test".to_owned(), vec![ip("192.0.2.1")])]);
        let catalog = Catalog::new(&plan, &resolved);
        let (a, db, b) = (plan.rules[0].id, plan.rules[1].id, plan.rules[2].id);

        // TCP to the database's endpoints on its port; a `tls` route takes no connection
        // without a server name.
        let to = catalog.routed(a, 5432, None, "a.test").expect("routed");
        let to = to.expect("the database has endpoints");
        assert_eq!((to.rule, &*to.host, to.port), (db, "db.internal", 5433));
        assert_eq!(to.addrs, [ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(&*to.by, "VirtualService/default/v spec.tcp[0]");
        // The same route for TLS: `tcp` routes take every connection.
        assert!(catalog.routed(a, 5432, Some("a.test"), "a.test").is_some());

        // TLS, a quarter where dialled, three quarters to b.test, which has not resolved: an
        // error, each time it is drawn.
        let (mut stayed, mut refused) = (0, 0);
        for _ in 0..4000 {
            match catalog.routed(a, 443, Some("a.test"), "a.test") {
                None => stayed += 1,
                Some(Err(reason)) => {
                    assert_eq!(
                        reason,
                        "b.test has no address egress knows to send to (not resolved, or no \
                         endpoint takes port 443 on its own number)"
                    );
                    refused += 1;
                }
                Some(Ok(to)) => panic!("{to:?}"),
            }
        }
        // 1,000 expected; the bounds are 8 standard deviations (27) away.
        assert!((780..1220).contains(&stayed), "{stayed} of 4000 stayed");
        assert_eq!(stayed + refused, 4000);

        let resolved = HashMap::from([("b.test".to_owned(), vec![ip("192.0.2.9")])]);
        let catalog = Catalog::new(&plan, &resolved);
        let drawn = (0..100)
            .filter_map(|_| catalog.routed(a, 443, Some("a.test"), "a.test"))
            .map(|to| to.expect("b.test resolved"))
            .find(|to| to.rule == b)
            .expect("b.test drawn in 100 tries");
        assert_eq!((&*drawn.host, drawn.port), ("b.test", 443));
        assert_eq!(drawn.addrs, [ip("192.0.2.9")]);
        // Another server name, or a port without routes: where dialled.
        assert!(
            catalog
                .routed(a, 443, Some("other.test"), "a.test")
                .is_none()
        );
        assert!(catalog.routed(b, 443, Some("b.test"), "b.test").is_none());
    }

    /// Retries and load balancing may take a connection to the other addresses of its host:
    /// a STATIC entry's endpoints that take the port on the same number, or a DNS host's
    /// resolved addresses; for TLS and for TCP carried as it comes alike. A connection to a
    /// virtual address goes to the endpoints alone.
    #[test]
    fn a_connections_alternates_are_its_endpoints_group_or_its_hosts_addresses() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  addresses: [240.0.0.10]
  ports: [{number: 5432, name: pg, protocol: TCP}, {number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints:
  - address: 10.0.0.1
  - address: 10.0.0.2
  - {address: 10.0.0.3, ports: {pg: 6432}}
  - address: 10.0.0.4
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
";
        let (policy, d) = crate::policy::load_str(yaml, std::path::Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = crate::policy::compile(&policy, None);
        assert!(d.is_empty(), "{d:?}");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
        let resolved = HashMap::from([(
            "api.test".to_owned(),
            vec![ip("192.0.2.1"), ip("192.0.2.2")],
        )]);
        let catalog = Catalog::new(&plan, &resolved);
        let (db, api) = (plan.rules[0].id, plan.rules[1].id);
        let at = |s: &str, port| SocketAddr::new(ip(s), port);
        let alternates = |u: super::Upstream| u.alternates;
        assert_eq!(
            alternates(catalog.carried(db, at("10.0.0.2", 5432)).expect("carried")),
            [ip("10.0.0.1"), ip("10.0.0.4")],
            "10.0.0.3 takes the port on another number"
        );
        assert_eq!(
            alternates(catalog.carried(db, at("10.0.0.3", 6432)).expect("carried")),
            Vec::<std::net::IpAddr>::new()
        );
        assert_eq!(
            alternates(
                catalog
                    .upstream(db, "db.internal", at("10.0.0.1", 443))
                    .expect("allowed")
            ),
            [ip("10.0.0.2"), ip("10.0.0.4")]
        );
        assert_eq!(
            alternates(
                catalog
                    .upstream(api, "api.test", at("192.0.2.2", 443))
                    .expect("allowed")
            ),
            [ip("192.0.2.1")]
        );
        assert_eq!(
            alternates(catalog.carried(api, at("192.0.2.1", 443)).expect("carried")),
            [ip("192.0.2.2")]
        );
        // A virtual address: the endpoints that take the port on its own number, itself not.
        let vip = catalog
            .carried(db, at("240.0.0.10", 5432))
            .expect("carried");
        assert_eq!(
            vip.targets(at("240.0.0.10", 5432)),
            [
                at("10.0.0.1", 5432),
                at("10.0.0.2", 5432),
                at("10.0.0.4", 5432)
            ]
        );
        let vip = (catalog.upstream(db, "db.internal", at("240.0.0.10", 443))).expect("allowed");
        assert_eq!(
            vip.targets(at("240.0.0.10", 443)),
            [
                at("10.0.0.1", 443),
                at("10.0.0.2", 443),
                at("10.0.0.4", 443),
                at("10.0.0.3", 443)
            ],
            "10.0.0.3 takes 443 on its own number"
        );
        let dialled = catalog.carried(db, at("10.0.0.4", 5432)).expect("carried");
        assert_eq!(
            dialled.targets(at("10.0.0.4", 5432))[0],
            at("10.0.0.4", 5432)
        );
    }

    #[test]
    fn a_removed_rule_names_the_records_of_its_last_decisions_for_a_while_and_judges_nothing() {
        let first = plan(&[("a", 1), ("b", 2)], &RuleIds::default());
        let second = plan(&[("a", 1)], &first.ids);
        let b = first.rules[1].id;
        let dst: SocketAddr = "10.0.0.2:443".parse().expect("address");
        let none = HashMap::new();
        let at = Instant::now();
        let b_named = (
            Some("b.test".to_owned()),
            Some("ServiceEntry/default/b".to_owned()),
        );

        let before = Catalog::new(&first, &none);
        assert_eq!(named(&before, b, dst), b_named);
        let after = before.next(&second, &none, at);
        assert_eq!(
            named(&after, b, dst),
            b_named,
            "a decision made just before"
        );
        assert_eq!(
            after.upstream(b, "b.test", dst),
            Err(format!("rule #{b} is not in the policy in force"))
        );
        assert_eq!(
            named(
                &after,
                second.rules[0].id,
                "10.0.0.1:443".parse().expect("address")
            )
            .1,
            Some("ServiceEntry/default/a".to_owned())
        );
        // Carried through the syncs that follow, until it has been gone for a minute.
        let later = after.next(&second, &none, at + Duration::from_secs(59));
        assert_eq!(named(&later, b, dst), b_named);
        let gone = later.next(&second, &none, at + Duration::from_secs(61));
        assert_eq!(named(&gone, b, dst), (None, None));
    }

    #[test]
    fn wildcards_and_case() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "A.Example.COM"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("a.example.com", "a.example.com"));
        assert!(host_matches("a.example.com", "A.EXAMPLE.com"));
        assert!(!host_matches("a.example.com", "b.example.com"));
        assert!(host_matches("*", "anything.test"));
    }
}
