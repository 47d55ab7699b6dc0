use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use egress_common::Verdict;

use super::{Global, runtime};
use crate::{
    events::host_matches,
    policy::{self, Decision, Plan, Severity, compile::Carry, schema::Transport},
    resolve::Resolver,
};

/// A destination as given: an address or a name, with a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Ip(IpAddr, u16),
    Name(String, u16),
}

/// `DEST[:PORT]`: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:443`, `2001:db8::1`, `host`, `host:80`.
pub fn parse_dest(s: &str, default_port: u16) -> Result<Dest, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(Dest::Ip(sa.ip(), sa.port()));
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(Dest::Ip(ip, default_port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))?,
        ),
        None => (s, default_port),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(format!("`{host}` is not a host name or IP address"));
    }
    Ok(Dest::Name(
        host.trim_end_matches('.').to_ascii_lowercase(),
        port,
    ))
}

pub fn check(global: &Global, dest: &str, transport: Transport) -> ExitCode {
    let dest = match parse_dest(dest, 443) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("egress check: {e}");
            return ExitCode::from(2);
        }
    };
    let (pol, mut diags) = policy::load(&global.policy_paths());
    let plan = (!policy::has_errors(&diags)).then(|| {
        let (plan, more) = policy::compile(&pol, global.mode);
        diags.extend(more);
        plan
    });
    for d in diags.iter().filter(|d| d.severity == Severity::Error) {
        eprintln!("{d}");
    }
    let Some(plan) = plan.filter(|_| !policy::has_errors(&diags)) else {
        return ExitCode::from(2);
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("egress check: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let (decision, shown, notes) = rt.block_on(decide(global, &plan, &dest, transport));
    let verdict = match decision.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Steer => "steer",
    };
    println!(
        "{verdict} {transport} {shown} {}",
        plan.rule_label(decision.rule_id)
    );
    let port = match dest {
        Dest::Ip(_, port) | Dest::Name(_, port) => port,
    };
    if decision.verdict == Verdict::Steer
        && let Some(rule) = plan.rule(decision.rule_id)
    {
        if let Some(reason) = rule.steer_reason(port) {
            println!("  why: {reason}");
        }
        match rule.originate.iter().find(|o| o.port == port) {
            Some(o) => match &o.tls {
                Some(tls) => {
                    let names = if tls.alt_names.is_empty() {
                        tls.sni
                            .clone()
                            .unwrap_or_else(|| "the request's host".to_owned())
                    } else {
                        let listed: Vec<String> =
                            tls.alt_names.iter().map(ToString::to_string).collect();
                        format!("one of {} ({})", listed.join(", "), tls.alt_from)
                    };
                    println!(
                        "  relay: plain HTTP in, TLS {} out to port {} ({}), the certificate \
                         verified for {names}",
                        tls.mode, o.target_port, tls.by
                    );
                }
                None => println!(
                    "  relay: plain HTTP in and out to port {}; each request's host must be a host of {}",
                    o.target_port, rule.label
                ),
            },
            None => match rule
                .steered
                .iter()
                .find(|s| s.port == port)
                .map(|s| s.carry)
            {
                Some(Carry::Opaque) => {
                    println!("  relay: TCP carried as it comes (nothing in it names a host)")
                }
                Some(Carry::Detect) => println!(
                    "  relay: told by the client's first bytes: TLS passed through (the server \
                     name must be a host of {}), HTTP/1.1 and HTTP/2 served as such (each \
                     request's host checked), anything else carried as it comes",
                    rule.label
                ),
                _ => println!(
                    "  relay: TLS passed through; the server name must be a host of {}",
                    rule.label
                ),
            },
        }
        let steered = rule.steered.iter().find(|s| s.port == port);
        let requests = steered.map_or(&[][..], |s| &s.requests[..]);
        if requests.iter().any(|r| !r.matches.is_empty()) {
            println!(
                "  requests: each takes the first route it matches of {}; one that matches none is \
                 answered 404",
                requests
                    .iter()
                    .map(|r| r.by.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // The gateway's own routes, where the mesh's send requests to an egress gateway.
        let mut seen: Vec<&[crate::policy::compile::RequestRoute]> = Vec::new();
        for then in requests.iter().filter_map(|r| r.then.as_deref()) {
            if seen.iter().any(|s| std::ptr::eq(*s, then)) {
                continue;
            }
            seen.push(then);
            println!(
                "  at the gateway: each takes the first of its routes it matches, as the mesh's \
                 route changed it, of {}; one that matches none is answered 404",
                then.iter()
                    .map(|r| r.by.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // The mesh's routes, then each gateway's once.
        let routes: Vec<_> = (requests.iter())
            .chain(seen.iter().flat_map(|then| then.iter()))
            .collect();
        // Where the connections go, where a route sends them elsewhere than where dialled.
        let pass = steered.map_or(&[][..], |s| &s.pass[..]);
        for r in &routes {
            if !r.to.is_empty() {
                let to: Vec<_> = r.to.iter().map(|(d, _)| d.clone()).collect();
                println!(
                    "  route: requests to {} ({})",
                    crate::policy::compile::shown(&to),
                    r.by
                );
            }
            for (to, share) in &r.mirrors {
                println!(
                    "  mirror: a copy of {}% of the requests to {}:{}, its answer dropped ({})",
                    f64::from(*share) / 10_000.0,
                    to.host,
                    to.port,
                    r.by
                );
            }
        }
        for r in pass {
            let takes = match (r.tls, &r.sni[..]) {
                (false, _) => "every connection".to_owned(),
                (true, []) => "TLS".to_owned(),
                (true, names) => format!("TLS naming {}", names.join(", ")),
            };
            println!("  route: {takes} to {} ({})", r.shown(), r.by);
        }
        if let Dest::Ip(ip, _) = dest
            && rule.virtual_nets.iter().any(|net| net.contains(&ip))
        {
            let endpoints: Vec<String> = rule
                .endpoint_groups
                .iter()
                .filter(|g| !g.renumbers.contains(&port))
                .flat_map(|g| g.ips.iter().map(ToString::to_string).chain(g.names.clone()))
                .collect();
            println!(
                "  upstream: the endpoints {} ({ip} is virtual)",
                endpoints.join(", ")
            );
        }
        // Faults, which a request may meet without its client knowing why.
        let mut told: Vec<&str> = Vec::new();
        for r in &routes {
            if let Some(fault) = r.fault
                && !told.contains(&r.by.as_str())
            {
                told.push(&r.by);
                println!("  fault: {} ({})", fault_text(fault), r.by);
            }
        }
        if let Some((_, pool)) = rule.pools.iter().find(|(p, _)| *p == port) {
            println!("  connection pool: {} ({})", pool_text(pool), pool.by);
        }
        if let Some((_, o)) = rule.outliers.iter().find(|(p, _)| *p == port) {
            println!("  outlier detection: {} ({})", outliers_text(o), o.by);
        }
        if let Some((_, b)) = rule.balance.iter().find(|(p, _)| *p == port) {
            use crate::policy::compile::Balancing;
            let how = match b.policy {
                Balancing::Dialled => {
                    "the address the workload dialled first, then the host's others".to_owned()
                }
                Balancing::RoundRobin => "the host's addresses in turn".to_owned(),
                Balancing::LeastRequest => {
                    "of two of the host's addresses drawn at random, the one with fewer in progress"
                        .to_owned()
                }
                Balancing::Random => "one of the host's addresses drawn at random".to_owned(),
                Balancing::Passthrough => {
                    "the address the workload dialled alone, retries too".to_owned()
                }
                Balancing::Hash => {
                    use crate::policy::compile::HashOn;
                    let of = match &b.hash {
                        Some(HashOn::SourceIp) => "the workload's network namespace".to_owned(),
                        Some(HashOn::Header(name)) => format!("the request's header {name}"),
                        Some(HashOn::Cookie { name, ttl, .. }) => match ttl {
                            Some(ttl) => {
                                format!("the request's cookie {name} (made for {ttl:?} if absent)")
                            }
                            None => format!("the request's cookie {name}"),
                        },
                        Some(HashOn::Query(name)) => {
                            format!("the request's query parameter {name}")
                        }
                        None => "nothing".to_owned(),
                    };
                    format!(
                        "the one a hash of {of} chooses, the same for the same value (one at \
                         random without it)"
                    )
                }
            };
            println!("  load balancing: {how} ({})", b.by);
        }
    }
    for n in notes {
        println!("  note: {n}");
    }
    if decision.verdict.permits() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A DestinationRule's outlier detection, in words.
fn outliers_text(o: &crate::policy::compile::Outliers) -> String {
    let mut after = Vec::new();
    // The relay's own failures count as such answers unless counted apart.
    let failed = if o.split_local {
        ""
    } else {
        " or failed connects"
    };
    if o.consecutive_5xx > 0 {
        after.push(format!(
            "{} 5xx answers{failed} in a row",
            o.consecutive_5xx
        ));
    }
    if o.consecutive_gateway > 0 {
        after.push(format!(
            "{} 502, 503 or 504 answers{failed} in a row",
            o.consecutive_gateway
        ));
    }
    if o.split_local && o.consecutive_local > 0 {
        after.push(format!(
            "{} failed connects, resets or timeouts in a row (counted apart from the answers)",
            o.consecutive_local
        ));
    }
    if after.is_empty() {
        return "nothing ejects an address (every count is 0)".to_owned();
    }
    let panic = match o.min_health_percent {
        0 => String::new(),
        n => format!("; none while fewer than {n}% of them are in"),
    };
    format!(
        "an address is left out after {}, for {:?} (longer each time, shorter again after each \
         {:?} back in), {}% of the host's addresses at most (one always may be){panic}",
        after.join(" or "),
        o.base_ejection,
        o.interval,
        o.max_ejection_percent
    )
}

/// A route's fault, in words: what, and for which share of the requests.
fn fault_text(fault: crate::policy::compile::Fault) -> String {
    use crate::policy::compile::{Abort, MILLION};
    let share = |n: u32| format!("{}% of requests", f64::from(n) * 100.0 / f64::from(MILLION));
    let mut parts = Vec::new();
    if let Some((delay, n)) = fault.delay {
        parts.push(format!("{delay:?} delay for {}", share(n)));
    }
    match fault.abort {
        Some((Abort::Http(status), n)) => parts.push(format!("abort {status} for {}", share(n))),
        Some((Abort::Grpc(code), n)) => {
            parts.push(format!("abort with grpc-status {code} for {}", share(n)));
        }
        None => {}
    }
    parts.join(", ")
}

/// The settings a DestinationRule's connection pool gives the relay, in words.
fn pool_text(pool: &crate::policy::compile::ConnectionPool) -> String {
    let mut parts = Vec::new();
    if let Some(n) = pool.max_connections {
        parts.push(format!("at most {n} connections at once"));
    }
    if let Some(t) = pool.connect_timeout {
        parts.push(format!("connect timeout {t:?}"));
    }
    match pool.idle_timeout {
        Some(std::time::Duration::ZERO) => parts.push("no idle timeout".to_owned()),
        Some(t) => parts.push(format!("idle timeout {t:?}")),
        None => {}
    }
    if let Some(k) = pool.keepalive {
        let mut words = vec!["TCP keepalive".to_owned()];
        if let Some(t) = k.time {
            words.push(format!("after {t:?}"));
        }
        if let Some(t) = k.interval {
            words.push(format!("every {t:?}"));
        }
        if let Some(n) = k.probes {
            words.push(format!("{n} probes"));
        }
        parts.push(words.join(" "));
    }
    if let Some(n) = pool.max_pending_requests {
        parts.push(format!(
            "at most {n} requests waiting for an upstream connection"
        ));
    }
    if let Some(n) = pool.max_active_requests {
        parts.push(format!("at most {n} requests in progress"));
    }
    if let Some(n) = pool.max_retries {
        parts.push(format!("at most {n} retries in progress"));
    }
    if pool.h2_upgrade {
        parts.push("HTTP/1.1 requests sent on as HTTP/2".to_owned());
    }
    if let Some(n) = pool.max_concurrent_streams {
        parts.push(format!(
            "at most {n} requests in progress per HTTP/2 connection"
        ));
    }
    if let Some(n) = pool.max_requests_per_connection {
        parts.push(format!("at most {n} requests per upstream connection"));
    }
    if let Some(t) = pool.http_idle_timeout {
        parts.push(format!("upstream connections kept idle for {t:?}"));
    }
    if let Some(t) = pool.max_connection_duration {
        parts.push(format!("upstream connections used for {t:?} at most"));
    }
    if parts.is_empty() {
        "nothing egress applies".to_owned()
    } else {
        parts.join(", ")
    }
}

async fn decide(
    global: &Global,
    plan: &Plan,
    dest: &Dest,
    transport: Transport,
) -> (Decision, String, Vec<String>) {
    let mut notes = Vec::new();
    let resolver = match Resolver::new(global.dns) {
        Ok(r) => Some(r),
        Err(e) => {
            notes.push(format!(
                "no DNS ({e}): names are judged by the policy alone"
            ));
            None
        }
    };
    let servers = resolver
        .as_ref()
        .map(|r| r.servers().to_vec())
        .unwrap_or_default();
    match dest {
        Dest::Name(name, port) => {
            // A registered name is judged by its ServiceEntry, as the kernel judges its addresses.
            if let Some(rule) = plan
                .rules
                .iter()
                .find(|r| r.hosts.iter().any(|h| host_matches(h, name)))
            {
                let rule_id = rule.id;
                let decision = if rule.ports.contains(&(*port, transport)) {
                    Decision {
                        verdict: if rule.steer_reason(*port).is_some() {
                            Verdict::Steer
                        } else {
                            Verdict::Allow
                        },
                        rule_id,
                    }
                } else {
                    notes.push(format!(
                        "{} declares {} only",
                        rule.label,
                        rule.ports
                            .iter()
                            .map(|(p, t)| format!("{p}/{t}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    plan.fallback()
                };
                return (decision, format!("{name}:{port}"), notes);
            }
            let Some(resolver) = &resolver else {
                return (plan.fallback(), format!("{name}:{port}"), notes);
            };
            match resolver.lookup(name).await {
                Ok((ips, _)) if !ips.is_empty() => {
                    let entries =
                        plan.entries(&resolve_all(resolver, plan, &mut notes).await, &servers);
                    // The strictest verdict over the name's addresses is what a client can rely on.
                    let worst = ips
                        .iter()
                        .map(|ip| (plan.decide(&entries, *ip, *port, transport), *ip))
                        .max_by_key(|(d, _)| {
                            (d.verdict == Verdict::Deny, d.verdict == Verdict::Steer)
                        })
                        .expect("non-empty");
                    notes.push(format!("{name} resolves to {ips:?}"));
                    (worst.0, format!("{name}:{port}"), notes)
                }
                Ok(_) | Err(_) => {
                    notes.push(format!("{name} is not registered and does not resolve"));
                    (plan.fallback(), format!("{name}:{port}"), notes)
                }
            }
        }
        Dest::Ip(ip, port) => {
            let resolved = match &resolver {
                Some(r) => resolve_all(r, plan, &mut notes).await,
                None => HashMap::new(),
            };
            let entries = plan.entries(&resolved, &servers);
            (
                plan.decide(&entries, *ip, *port, transport),
                SocketAddr::new(*ip, *port).to_string(),
                notes,
            )
        }
    }
}

/// Addresses of every name in the plan, so an IP can be matched to its host.
async fn resolve_all(
    resolver: &Resolver,
    plan: &Plan,
    notes: &mut Vec<String>,
) -> HashMap<String, Vec<IpAddr>> {
    let mut out = HashMap::new();
    for h in &plan.hosts {
        if out.contains_key(&h.name) {
            continue;
        }
        match resolver.lookup(&h.name).await {
            Ok((ips, _)) => {
                out.insert(h.name.clone(), ips);
            }
            Err(e) => notes.push(format!("could not resolve {}: {e}", h.name)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(parse_dest("1.2.3.4", 443), Ok(Dest::Ip(ip("1.2.3.4"), 443)));
        assert_eq!(
            parse_dest("1.2.3.4:80", 443),
            Ok(Dest::Ip(ip("1.2.3.4"), 80))
        );
        assert_eq!(
            parse_dest("[2001:db8::1]:53", 443),
            Ok(Dest::Ip(ip("2001:db8::1"), 53))
        );
        assert_eq!(
            parse_dest("2001:db8::1", 443),
            Ok(Dest::Ip(ip("2001:db8::1"), 443))
        );
        assert_eq!(
            parse_dest("API.Example.com.", 443),
            Ok(Dest::Name("api.example.com".into(), 443))
        );
        assert_eq!(
            parse_dest("a.example:8080", 443),
            Ok(Dest::Name("a.example".into(), 8080))
        );
        assert!(parse_dest("a.example:0", 443).is_err());
        assert!(parse_dest("a b", 443).is_err());
        assert!(parse_dest("", 443).is_err());
    }
}
