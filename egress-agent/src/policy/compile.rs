//! Policy → Plan, Istio's semantics as data. Under REGISTRY_ONLY a destination is allowed only on
//! the ports its ServiceEntry declares, over the transport the port's protocol implies. A Plan is
//! pure: hostnames stay names until `entries` is given their resolved addresses.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use egress_common::{
    KEY_FIXED_BITS, PolicyKey, PolicyValue, RULE_FIRST_POLICY, RULE_LOOPBACK, RULE_MODE,
    RULE_RESOLVER, Verdict, is_local,
};
use ipnet::IpNet;

use crate::events::host_matches;

use super::{
    Diagnostic, Mode, Policy, Resource, Severity, Source,
    schema::{
        ClientTls, ConnectionPoolSettings, ConsistentHashLb, Destination, DestinationRuleSpec,
        HeaderOperations, Headers, HttpFault, HttpRoute, IstioDuration, LoadBalancerSettings,
        OutlierDetection, Percent, PortNumber, PortTrafficPolicy, Protocol, Resolution, Retries,
        RouteDestination, ServiceEntrySpec, ServicePort, SimpleLb, StringMatch, TlsMode,
        TrafficPolicy, Transport, VirtualServiceSpec,
    },
    tls::{AltName, TlsClient, alt_names, client_config},
};

/// An address-based map entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub net: IpNet,
    pub port: u16,
    pub transport: Transport,
    pub verdict: Verdict,
    pub rule_id: u32,
}

/// A hostname whose addresses become entries once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// Lower-case, no trailing dot.
    pub name: String,
    /// Each port with its transport and verdict (allow, or steer on the ports routed so).
    pub ports: Vec<(u16, Transport, Verdict)>,
    pub rule_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// The id the kernel's map entries, records and events carry for this rule.
    pub id: u32,
    /// `ServiceEntry/namespace/name`.
    pub label: String,
    pub hosts: Vec<String>,
    /// Declared ports with their transports, endpoint port mappings included.
    pub ports: Vec<(u16, Transport)>,
    /// The ports whose connections are steered to the relay (endpoint port mappings included);
    /// the others go direct.
    pub steered: Vec<SteeredPort>,
    /// The steered HTTP ports, which the relay serves as HTTP: with TLS it originates upstream,
    /// or plain.
    pub originate: Vec<Origination>,
    /// The DestinationRule's connection pool settings the relay applies, by declared port (only
    /// ports that have some).
    pub pools: Vec<(u16, ConnectionPool)>,
    /// The DestinationRule's outlier detection the relay applies, by declared port.
    pub outliers: Vec<(u16, Outliers)>,
    /// The DestinationRule's load balancing the relay applies, by declared port.
    pub balance: Vec<(u16, Balance)>,
    /// The endpoints, in groups that take every port on the same number (`endpoints[].ports`):
    /// the relay's retries and load balancing may take a connection to one of a group to the
    /// others. Empty: the host's resolved addresses are its endpoints.
    pub endpoint_groups: Vec<EndpointGroup>,
    /// A STATIC entry's addresses that hold none of its endpoints: connections to them are
    /// steered, and the relay takes them on to the endpoints.
    pub virtual_nets: Vec<IpNet>,
    pub source: Source,
}

/// Endpoints of a ServiceEntry that take its ports on the same numbers: addresses, and names
/// resolved by DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointGroup {
    pub ips: Vec<IpAddr>,
    pub names: Vec<String>,
    /// The declared ports its endpoints take on other numbers (`endpoints[].ports`).
    pub renumbers: Vec<u16>,
}

/// One port of a rule whose connections are steered to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteeredPort {
    pub port: u16,
    /// Why, naming the resource that asks for it.
    pub why: String,
    /// How the relay connects upstream: the route that covers the port.
    pub route: RelayRoute,
    /// How the relay takes the port's connections (an HTTP port's are served as HTTP, see
    /// `RuleInfo::originate`).
    pub carry: Carry,
    /// Where the egress gateway's own route sends this HTTP port's requests on to, in place of
    /// the port (`onward_port`): the relay sends them there, with the TLS the DestinationRule
    /// asks for on that port.
    pub onward: Option<u16>,
    /// Where the relay serves the port as HTTP, the routes that cover it, in order: each request
    /// takes the first it matches (its retries and timeout), and one that matches none is
    /// answered 404, as Envoy answers it. None: every request takes `route`.
    pub requests: Vec<RequestRoute>,
    /// Steered only where dialled at one of the ServiceEntry's virtual addresses
    /// (`RuleInfo::virtual_nets`): connections to its endpoints go direct.
    pub virtual_only: bool,
    /// The `tls` and `tcp` routes that cover the port, in order, where one of them sends
    /// connections elsewhere than where they were dialled (another host, or a split by weight);
    /// else none, and every connection goes where it was dialled.
    pub pass: Vec<PassRoute>,
}

/// A VirtualService's `tls` or `tcp` route for the mesh on a steered port, as the relay applies
/// it to a connection it passes through (TLS, or TCP carried as it comes): the first route that
/// takes the connection sends it to one of its destinations, drawn by weight, as Envoy's
/// `tcp_proxy` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassRoute {
    /// The server names it takes (its matches' `sniHosts`, lower case); none: any.
    pub sni: Vec<String>,
    /// A `tls` route, which takes TLS alone; a `tcp` route takes every connection.
    pub tls: bool,
    /// Where it sends connections; none: where they were dialled (through an egress gateway).
    pub to: Vec<RouteTo>,
    /// `VirtualService/ns/name spec.tls[i]`.
    pub by: String,
}

impl PassRoute {
    /// Its destinations, as `egress check` shows them (`shown`).
    pub fn shown(&self) -> String {
        shown(&self.to)
    }
}

/// Route destinations as `egress check` shows them: `host:port`, with each one's share where
/// there are several.
pub fn shown(to: &[RouteTo]) -> String {
    let total: u32 = to.iter().map(|d| d.weight).sum();
    let each: Vec<String> = (to.iter())
        .map(|d| match to.len() {
            1 => format!("{}:{}", d.host, d.port),
            _ => format!(
                "{}:{} ({}%)",
                d.host,
                d.port,
                u64::from(d.weight) * 100 / u64::from(total.max(1))
            ),
        })
        .collect();
    if each.is_empty() {
        "where they were dialled".to_owned()
    } else {
        each.join(", ")
    }
}

/// A route destination the relay sends connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTo {
    /// A host of a ServiceEntry (lower case).
    pub host: String,
    /// `destination.port`, else the destination's one declared port, else the port dialled.
    pub port: u16,
    /// Its share: each destination takes connections in proportion to its weight.
    pub weight: u32,
    /// The endpoints of the `subset` named, where its `labels` narrow the host's; none: all of
    /// them.
    pub subset: Option<SubsetEndpoints>,
}

/// The endpoints of a ServiceEntry whose `labels` hold all of a DestinationRule subset's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetEndpoints {
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Names resolved by DNS.
    pub names: Vec<String>,
}

/// An HTTP route of a VirtualService, as the relay applies it to each request on a port it
/// serves as HTTP: the first route one of whose matches the request meets takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRoute {
    /// The route's matches that apply to the port; none: every request.
    pub matches: Vec<RequestMatch>,
    pub route: RelayRoute,
    /// The route's header operations, then its first destination's.
    pub headers: HeaderOps,
    /// Where it sends requests elsewhere than where they were dialled (another host, or a split
    /// by weight): its destinations, each with the route's header operations and
    /// then its own; none: where dialled.
    pub to: Vec<(RouteTo, HeaderOps)>,
    /// The route's `rewrite`.
    pub rewrite: Rewrite,
    /// What the relay answers itself instead of sending the request on (`directResponse`,
    /// `redirect`).
    pub answer: Option<LocalAnswer>,
    /// The route's `fault`: applied before its answer or anything is sent on.
    pub fault: Option<Fault>,
    /// Where a copy of each request goes (`mirror`, `mirrors`), for its share of the requests
    /// in millionths: its answer is not waited for and not passed on.
    pub mirrors: Vec<(RouteTo, u32)>,
    /// Where the route goes to an egress gateway: the gateway's routes for the request, which the
    /// relay, standing in for the gateway, matches it against next, as changed by this route.
    pub then: Option<Arc<[RequestRoute]>>,
    /// `VirtualService/ns/name spec.http[i]`.
    pub by: String,
}

/// A route's `fault`, as Envoy's fault filter applies it before anything else: a delay, an
/// abort, or both (delayed, then aborted), each for its own share of the requests, in
/// millionths ([`MILLION`] is every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(std::time::Duration, u32)>,
    pub abort: Option<(Abort, u32)>,
}

/// A fault's share of the requests that is all of them.
pub const MILLION: u32 = 1_000_000;

/// How a fault answers a request it aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// With this HTTP status.
    Http(u16),
    /// With this gRPC status code, in a `200` answer's `grpc-status`, as Envoy answers it.
    Grpc(u8),
}

/// An answer the relay gives a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAnswer {
    /// `directResponse`: this status and body.
    Direct { status: u16, body: String },
    /// `redirect`: this status and a `Location` made of the request's and these parts.
    Redirect {
        status: u16,
        scheme: Option<String>,
        authority: Option<String>,
        port: Option<u16>,
        uri: Option<String>,
    },
}

impl LocalAnswer {
    /// A redirect's `Location` for a request to `host` (as the client named it, port included)
    /// with `path` and `query`.
    pub fn location(&self, host: &str, path: &str, query: Option<&str>) -> Option<String> {
        let LocalAnswer::Redirect {
            scheme,
            authority,
            port,
            uri,
            ..
        } = self
        else {
            return None;
        };
        let scheme = scheme.as_deref().unwrap_or("http");
        let mut at = authority.clone().unwrap_or_else(|| host.to_owned());
        if let Some(port) = port {
            // The port replaces the one the authority had.
            let bare = match at.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => at.as_str(),
            };
            at = format!("{bare}:{port}");
        }
        let path = uri.as_deref().unwrap_or(path);
        Some(match query {
            Some(q) if !path.contains('?') => format!("{scheme}://{at}{path}?{q}"),
            _ => format!("{scheme}://{at}{path}"),
        })
    }
}

/// A route's `rewrite` of the request sent upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// In place of the path the match's `prefix` matched, else of the whole path.
    pub uri: Option<String>,
    /// The `Host` sent upstream, and the server name TLS origination sends where the
    /// DestinationRule names none.
    pub authority: Option<http::uri::Authority>,
    /// `uriRegexRewrite`: every match in the path replaced (the query kept), as Envoy's
    /// `regex_rewrite` does.
    pub regex: Option<RegexRewrite>,
}

/// A `uriRegexRewrite`, compiled: the pattern (RE2, unanchored), and the replacement in the
/// regex crate's syntax (`${1}` for Istio's `\1`).
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    pub pattern: regex::Regex,
    pub with: String,
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &RegexRewrite) -> bool {
        self.pattern.as_str() == other.pattern.as_str() && self.with == other.with
    }
}

impl Eq for RegexRewrite {}

impl RegexRewrite {
    /// Istio's `match` and `rewrite`, checked as RE2 checks a rewrite string: `\N` names one of
    /// the pattern's groups, `\\` is a backslash, and no other backslash may appear.
    /// The error names the field at fault, `match` or `rewrite`.
    pub fn new(pattern: &str, rewrite: &str) -> Result<RegexRewrite, (&'static str, String)> {
        let pattern = regex::Regex::new(pattern).map_err(|e| {
            (
                "match",
                format!("`{pattern}` is not a regex RE2 takes: {e}"),
            )
        })?;
        let mut with = String::with_capacity(rewrite.len());
        let mut chars = rewrite.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => with.push('\\'),
                    Some(d @ '0'..='9') => {
                        let group = d as usize - '0' as usize;
                        if group >= pattern.captures_len() {
                            return Err((
                                "rewrite",
                                format!(
                                    "`{rewrite}` names group \\{group}, which the match does \
                                     not have"
                                ),
                            ));
                        }
                        with.push_str(&format!("${{{group}}}"));
                    }
                    _ => {
                        return Err((
                            "rewrite",
                            format!(
                                "`{rewrite}`: a backslash must come before a digit or another \
                                 backslash"
                            ),
                        ));
                    }
                },
                '$' => with.push_str("$$"),
                c => with.push(c),
            }
        }
        Ok(RegexRewrite { pattern, with })
    }
}

impl Rewrite {
    /// The path and query sent upstream for `path` and `query`, which `matched` matched.
    pub fn path(&self, path: &str, query: Option<&str>, matched: Option<&RequestMatch>) -> String {
        if let Some(re) = &self.regex {
            let path = re.pattern.replace_all(path, re.with.as_str());
            return match query {
                Some(q) => format!("{path}?{q}"),
                None => path.into_owned(),
            };
        }
        let Some(uri) = &self.uri else {
            return match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
        };
        let rest = match matched.and_then(|m| m.uri.as_ref()) {
            Some(Text::Prefix(p)) => path.get(p.len()..).unwrap_or(""),
            _ => "",
        };
        match query {
            Some(q) => format!("{uri}{rest}?{q}"),
            None => format!("{uri}{rest}"),
        }
    }
}

/// Header operations on a request sent upstream, or on its response: remove, then set
/// (replacing), then add (appending).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub request: Vec<HeaderOp>,
    pub response: Vec<HeaderOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    Remove(http::HeaderName),
    Set(http::HeaderName, http::HeaderValue),
    Add(http::HeaderName, http::HeaderValue),
}

impl RequestRoute {
    /// The route's changes to the request it takes: its rewrite of the authority (the `Host`
    /// sent, and `asked`, the name the upstream is asked for) and of the path (`matched` says
    /// what its match matched), and the request header operations of `ops` (its own, or those of
    /// the destination drawn, `to`). The error: a rewritten path that is no request target, to be
    /// refused.
    pub fn apply(
        &self,
        matched: Option<&RequestMatch>,
        ops: &HeaderOps,
        headers: &mut http::HeaderMap,
        uri: &mut http::Uri,
        asked: &mut String,
    ) -> Result<(), String> {
        if let Some(authority) = &self.rewrite.authority
            && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
        {
            headers.insert(http::header::HOST, v);
            *asked = authority.host().to_ascii_lowercase();
        }
        HeaderOps::apply(&ops.request, headers);
        if self.rewrite.uri.is_some() || self.rewrite.regex.is_some() {
            let path = self.rewrite.path(uri.path(), uri.query(), matched);
            *uri = path
                .parse::<http::Uri>()
                .map_err(|_| format!("the rewritten path {path} is not a request target"))?;
        }
        Ok(())
    }
}

impl HeaderOps {
    /// Applies `ops` to `headers`, in order.
    pub fn apply(ops: &[HeaderOp], headers: &mut http::HeaderMap) {
        for op in ops {
            match op {
                HeaderOp::Remove(name) => {
                    headers.remove(name);
                }
                HeaderOp::Set(name, value) => {
                    headers.insert(name, value.clone());
                }
                HeaderOp::Add(name, value) => {
                    headers.append(name, value.clone());
                }
            }
        }
    }
}

/// An HTTP match's request fields that the relay judges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMatch {
    pub uri: Option<Text>,
    pub ignore_uri_case: bool,
    pub scheme: Option<Text>,
    pub method: Option<Text>,
    pub authority: Option<Text>,
    /// By lower-case name; `None`: the header is present.
    pub headers: Vec<(String, Option<Text>)>,
    /// Headers that must not match so (`withoutHeaders`).
    pub without_headers: Vec<(String, Option<Text>)>,
    /// By name, as the query has it; `None`: the parameter is present.
    pub query: Vec<(String, Option<Text>)>,
}

/// A StringMatch, compiled.
#[derive(Debug, Clone)]
pub enum Text {
    Exact(String),
    Prefix(String),
    /// Anchored: the whole text must match, as RE2's full match in Envoy.
    Regex(regex::Regex),
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        match (self, other) {
            (Text::Exact(a), Text::Exact(b)) | (Text::Prefix(a), Text::Prefix(b)) => a == b,
            (Text::Regex(a), Text::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for Text {}

impl Text {
    /// Whether `text` matches; `fold`: exact and prefix ignore ASCII case.
    fn matches(&self, text: &str, fold: bool) -> bool {
        match self {
            Text::Exact(e) if fold => e.eq_ignore_ascii_case(text),
            Text::Exact(e) => e == text,
            Text::Prefix(p) if fold => text
                .as_bytes()
                .get(..p.len())
                .is_some_and(|t| t.eq_ignore_ascii_case(p.as_bytes())),
            Text::Prefix(p) => text.starts_with(p.as_str()),
            Text::Regex(r) => r.is_match(text),
        }
    }
}

impl RequestMatch {
    /// Whether a request meets every field: `path` is the request's path without its query, as
    /// Envoy matches it; `query` its query, if any; `header` gives a header's value by lower-case
    /// name. The scheme is `http`: the relay serves plain HTTP.
    pub fn matches<'h>(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        authority: Option<&str>,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> bool {
        let has = |(name, t): &(String, Option<Text>)| match (header(name), t) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(t)) => t.matches(v, false),
        };
        let param = |name: &str| {
            query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
        };
        self.uri
            .as_ref()
            .is_none_or(|t| t.matches(path, self.ignore_uri_case))
            && self
                .scheme
                .as_ref()
                .is_none_or(|t| t.matches("http", false))
            && self
                .method
                .as_ref()
                .is_none_or(|t| t.matches(method, false))
            && self
                .authority
                .as_ref()
                .is_none_or(|t| authority.is_some_and(|a| t.matches(a, false)))
            && self.headers.iter().all(has)
            && !self.without_headers.iter().any(has)
            && self.query.iter().all(|(name, t)| match (param(name), t) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(v), Some(t)) => t.matches(v, false),
            })
    }
}

/// How the relay takes a steered port's connections, by the port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// The ClientHello is read and its server name judged (HTTPS, TLS).
    Tls,
    /// The bytes are carried as they come (TCP, MONGO, REDIS, MYSQL): nothing in them names a
    /// host, and the server may speak first. The kernel's record of the destination is what is
    /// judged, as Istio's gateway judges TCP by address and port.
    Opaque,
    /// No protocol declared, or HTTP2, GRPC, GRPC-WEB: told by the client's first bytes, as Istio
    /// detects them. A TLS handshake is read as TLS, an HTTP/1.1 request is served as HTTP/1.1,
    /// HTTP/2's preface as HTTP/2, anything else is carried as it comes.
    Detect,
}

/// A DestinationRule's `connectionPool` on one port, as the relay applies it to that port's
/// steered connections (`http`: where it originates TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    /// Connections through the relay at once (`maxConnections`): client connections where the
    /// relay passes TLS or TCP through, upstream connections where it speaks HTTP.
    pub max_connections: Option<u32>,
    /// Limit of one upstream connect (`connectTimeout`).
    pub connect_timeout: Option<std::time::Duration>,
    /// A connection with no byte either way for this long is closed (`idleTimeout`); zero: never.
    pub idle_timeout: Option<std::time::Duration>,
    /// TCP keepalive on the upstream connection (`tcpKeepalive`).
    pub keepalive: Option<Keepalive>,
    /// How long TLS origination keeps an upstream connection with no request (`http.idleTimeout`).
    pub http_idle_timeout: Option<std::time::Duration>,
    /// Requests TLS origination sends on one upstream connection (`http.maxRequestsPerConnection`).
    pub max_requests_per_connection: Option<u32>,
    /// Requests that may wait for an upstream connection at once where `max_connections` are all
    /// taken (`http.http1MaxPendingRequests`); one more is answered 503 at once.
    pub max_pending_requests: Option<u32>,
    /// Requests to the host and port in progress at once, from the node, HTTP/1.1 and HTTP/2
    /// alike (`http.http2MaxRequests`); one more is answered 503 at once.
    pub max_active_requests: Option<u32>,
    /// Retries to the host and port in progress at once, from the node (`http.maxRetries`): a
    /// request whose retry would be one more is not retried.
    pub max_retries: Option<u32>,
    /// HTTP/1.1 requests go on as HTTP/2 (`http.h2UpgradePolicy: UPGRADE`, unless
    /// `http.useClientProtocol`).
    pub h2_upgrade: bool,
    /// Requests in progress on one HTTP/2 upstream connection at most
    /// (`http.maxConcurrentStreams`): one more opens another.
    pub max_concurrent_streams: Option<u32>,
    /// How long TLS origination uses one upstream connection (`tcp.maxConnectionDuration`, which
    /// Istio gives Envoy's HTTP connections only).
    pub max_connection_duration: Option<std::time::Duration>,
    /// The DestinationRule that sets them.
    pub by: String,
}

/// A DestinationRule's `outlierDetection` on one port, as the relay applies it: an address of the
/// host that fails so many times in a row is left out of the attempts for a while, as Envoy ejects
/// an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outliers {
    /// 5xx answers (and failed connects, resets, timeouts) in a row that eject; 0: never.
    pub consecutive_5xx: u32,
    /// 502, 503 and 504 answers (and failed connects) in a row that eject; 0: never.
    pub consecutive_gateway: u32,
    /// How long the first ejection lasts; each next one of the same address lasts once more.
    pub base_ejection: std::time::Duration,
    /// Each one an address spends back in forgets one of its ejections, as Envoy's multiplier.
    pub interval: std::time::Duration,
    /// The share of the host's addresses that may be out at once; one may always be.
    pub max_ejection_percent: u32,
    /// Below this share of the host's addresses in, none is left out (Envoy's panic threshold);
    /// 0: never so.
    pub min_health_percent: u32,
    /// Failures of the relay's own (failed connects, resets, timeouts) are counted apart from
    /// the upstream's answers (`splitExternalLocalOriginErrors`): `consecutive_local` of them in
    /// a row eject; else they count as 5xx and gateway errors, as Envoy lumps them.
    pub split_local: bool,
    /// Failures of the relay's own in a row that eject, where counted apart; 0: never.
    pub consecutive_local: u32,
    /// The DestinationRule that sets it.
    pub by: String,
}

/// A DestinationRule's `loadBalancer.simple`: which of the host's addresses a steered
/// connection's first attempt (a request's, where the relay serves HTTP) goes to. Without one
/// it goes to the address the workload dialled, and retries to the host's others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub policy: Balancing,
    /// What `Balancing::Hash` hashes.
    pub hash: Option<HashOn>,
    /// The DestinationRule that sets it.
    pub by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancing {
    /// The address the workload dialled first (`UNSPECIFIED`, as without a `loadBalancer`).
    Dialled,
    /// The host's addresses in turn.
    RoundRobin,
    /// The one with fewer attempts in progress of two drawn at random (Envoy's choice of two).
    LeastRequest,
    /// One drawn at random.
    Random,
    /// The address the workload dialled alone, retries included (Envoy's original destination).
    Passthrough,
    /// The one a hash of the connection or request chooses, the same for the same hash
    /// (`consistentHash`; see `Balance::hash`); one drawn at random where it has nothing to hash.
    Hash,
}

/// What `consistentHash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The workload's network namespace, which stands for its address (`useSourceIp`).
    SourceIp,
    /// A request header's value (`httpHeaderName`).
    Header(http::HeaderName),
    /// A cookie's value; where the request has none and a `ttl` is set, the relay makes one and
    /// sets it on the answer (`httpCookie`).
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<std::time::Duration>,
    },
    /// A query parameter's value (`httpQueryParameterName`).
    Query(String),
}

/// `tcpKeepalive`: each unset field keeps the host's setting (net.ipv4.tcp_keepalive_*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<std::time::Duration>,
    pub interval: Option<std::time::Duration>,
    pub probes: Option<u32>,
}

/// A steered HTTP port: the application speaks plain HTTP/1.1 to `port`, and the relay sends
/// each request on to `target_port` of the same destination, over TLS it originates (Istio's
/// "egress TLS origination") or as plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origination {
    pub port: u16,
    /// The port the egress gateway's route sends on to (`SteeredPort::onward`), else the
    /// ServiceEntry port's `targetPort`, else `port`.
    pub target_port: u16,
    /// The TLS the relay originates; none, for HTTP that goes on as it came.
    pub tls: Option<OriginTls>,
}

/// TLS origination on a port, as a DestinationRule asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTls {
    /// `SIMPLE` or `MUTUAL`.
    pub mode: &'static str,
    /// The server name to send and verify; the request's host when unset.
    pub sni: Option<String>,
    /// Names the certificate must hold one of instead (`subjectAltNames`), and whose list they
    /// are: the DestinationRule's, else the ServiceEntry's.
    pub alt_names: Vec<AltName>,
    pub alt_from: &'static str,
    /// The same configuration offering HTTP/2, for clients that speak it.
    pub client_h2: TlsClient,
    /// The DestinationRule that asks for it.
    pub by: String,
    pub client: TlsClient,
}

/// The VirtualService settings the relay applies when it connects upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRoute {
    /// Further attempts after the first (Istio's `retries.attempts`).
    pub retries: u32,
    /// Limit of each attempt (`retries.perTryTimeout`).
    pub per_try_timeout: Option<std::time::Duration>,
    /// Limit of all attempts together (`timeout`).
    pub timeout: Option<std::time::Duration>,
    /// Which answers an originated HTTP request is retried on (`retries.retryOn`).
    pub retry_on: RetryOn,
}

/// Envoy's retry conditions, as far as they apply to HTTP/1.1. A failed connect is always
/// retried; this says what else is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// Response status codes that are retried.
    pub statuses: Vec<u16>,
    /// Every 5xx.
    pub any_5xx: bool,
    /// A connection reset or closed before the response headers.
    pub reset: bool,
}

impl Default for RetryOn {
    /// Istio's default: `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`
    /// with 503 as the retriable status.
    fn default() -> Self {
        RetryOn {
            statuses: vec![503],
            any_5xx: false,
            reset: false,
        }
    }
}

impl RetryOn {
    /// Parses Istio's comma-separated list; the words that are not understood are returned.
    pub fn parse(list: &str) -> (RetryOn, Vec<String>) {
        let mut on = RetryOn {
            statuses: Vec::new(),
            any_5xx: false,
            reset: false,
        };
        let mut unknown = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "5xx" => {
                    on.any_5xx = true;
                    on.reset = true;
                }
                "gateway-error" => on.statuses.extend([502, 503, 504]),
                "reset" | "reset-before-request" => on.reset = true,
                "retriable-status-codes" => on.statuses.push(503),
                // Connect failures are always retried; the rest are HTTP/2 and gRPC conditions.
                "connect-failure" | "refused-stream" | "unavailable" | "cancelled"
                | "deadline-exceeded" | "resource-exhausted" | "internal" => {}
                w => match w.parse::<u16>() {
                    Ok(code) if (100..600).contains(&code) => on.statuses.push(code),
                    _ => unknown.push(w.to_owned()),
                },
            }
        }
        on.statuses.sort_unstable();
        on.statuses.dedup();
        (on, unknown)
    }

    pub fn status(&self, code: u16) -> bool {
        (self.any_5xx && (500..600).contains(&code)) || self.statuses.contains(&code)
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    /// What set the mode: the flag, a Sidecar, or Istio's default.
    pub mode_source: String,
    /// In the policy's order.
    pub rules: Vec<RuleInfo>,
    pub fixed: Vec<Entry>,
    pub hosts: Vec<HostRule>,
    /// The ids of this plan's rules, for compiling the next policy.
    pub ids: RuleIds,
}

/// Rule ids by the rule's identity. A steered connection's kernel record, and the flow table's
/// events, carry the id the kernel decided with; a reload must not give that id to another rule
/// while they are in flight, or the relay would judge the connection by the wrong ServiceEntry.
/// So a rule keeps its id across reloads, and an id, once given, never names another rule.
#[derive(Debug, Clone)]
pub struct RuleIds {
    by_key: HashMap<String, u32>,
    next: u32,
}

impl Default for RuleIds {
    fn default() -> Self {
        RuleIds {
            by_key: HashMap::new(),
            next: RULE_FIRST_POLICY,
        }
    }
}

impl RuleIds {
    /// The id for `key` in a plan compiled after `prev`: the one it had there, else a new one.
    /// Only the keys asked for are kept, so the table holds the rules in force, not history;
    /// `next` never goes back, so a rule that left does not lend its id to a newcomer.
    fn assign(&mut self, prev: &RuleIds, key: String) -> u32 {
        let id = match prev.by_key.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.next;
                // Four billion rule identities in one agent's life: not a case to recover from.
                self.next = id.checked_add(1).expect("rule ids exhausted");
                id
            }
        };
        self.by_key.insert(key, id);
        id
    }
}

/// One decision, as the kernel would make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule_id: u32,
}

type Diags = Vec<Diagnostic>;

fn diag(diags: &mut Diags, severity: Severity, src: &Source, message: String) {
    diags.push(Diagnostic {
        severity,
        file: src.file.clone(),
        pos: src.pos,
        message,
    });
}

/// Compiles a policy. `mode_flag` overrides every Sidecar. Errors are in the diagnostics; the Plan
/// is only to be used when there are none.
pub fn compile(policy: &Policy, mode_flag: Option<Mode>) -> (Plan, Diags) {
    compile_after(policy, mode_flag, &RuleIds::default())
}

/// Compiles a policy that replaces one whose rules had the ids `prev`: the rules that stay keep
/// their ids.
pub fn compile_after(policy: &Policy, mode_flag: Option<Mode>, prev: &RuleIds) -> (Plan, Diags) {
    // Sidecars set the mode; Gateways, VirtualServices and DestinationRules decide steering.
    let Policy {
        service_entries,
        sidecars: _,
        gateways: _,
        virtual_services: _,
        destination_rules: _,
    } = policy;
    let mut diags = Vec::new();
    let (mode, mode_source) = resolve_mode(policy, mode_flag, &mut diags);
    let mut plan = Plan {
        mode,
        mode_source,
        rules: Vec::new(),
        fixed: Vec::new(),
        hosts: Vec::new(),
        ids: RuleIds {
            by_key: HashMap::new(),
            next: prev.next,
        },
    };
    for se in service_entries {
        compile_service_entry(policy, prev, se, &mut plan, &mut diags);
    }
    check_destinations(policy, &mut diags);
    (plan, diags)
}

/// Checks a VirtualService's route destinations. Weights below 0, or several destinations whose
/// weights add up to 0, are errors, as in Istio. `http` routes (per request) and `tls` and `tcp`
/// routes (per connection, `pass_routes`) send to their destinations; a destination no
/// ServiceEntry has, or without an address, is warned about, and so is another host beside an
/// egress gateway among a route's destinations (the connection goes to the gateway). Of
/// subsets, egress applies their `labels` and a port's traffic policy (`port_subset`), not each
/// subset's own.
fn check_destinations(policy: &Policy, diags: &mut Diags) {
    for vs in &policy.virtual_services {
        let own: Vec<String> = vs.spec.hosts.iter().map(|h| normalize_host(h)).collect();
        let entry = |host: &str| {
            (policy.service_entries.iter())
                .find(|se| se.spec.hosts.iter().any(|h| normalize_host(h) == host))
        };
        let registered = |host: &str| entry(host).is_some();
        let sections: [(&str, Vec<&[RouteDestination]>); 3] = [
            ("http", vs.spec.http.iter().map(|r| &r.route[..]).collect()),
            ("tls", vs.spec.tls.iter().map(|r| &r.route[..]).collect()),
            ("tcp", vs.spec.tcp.iter().map(|r| &r.route[..]).collect()),
        ];
        for (section, routes) in sections {
            let mut say = |severity, message: String| {
                diag(
                    diags,
                    severity,
                    &vs.source,
                    format!("{}: {message}", vs.label()),
                );
            };
            let mut subsets: Vec<(&str, usize)> = Vec::new();
            for (i, dests) in routes.iter().enumerate() {
                let gateway = dests
                    .iter()
                    .any(|d| is_gateway(policy, &d.destination.host));
                for (j, d) in dests.iter().enumerate() {
                    if let Some(w) = d.weight.filter(|w| *w < 0) {
                        say(
                            Severity::Error,
                            format!("spec.{section}[{i}].route[{j}].weight {w} is below 0"),
                        );
                    }
                }
                if dests.len() > 1 && dests.iter().all(|d| d.weight.is_none_or(|w| w <= 0)) {
                    say(
                        Severity::Error,
                        format!(
                            "spec.{section}[{i}].route names {} destinations whose weights add up \
                             to 0: none would take any traffic",
                            dests.len()
                        ),
                    );
                }
                // A route through an egress gateway goes there; the gateway's own routes decide.
                let applied = !gateway;
                if dests.len() > 1 && !applied {
                    say(
                        Severity::Warning,
                        format!(
                            "spec.{section}[{i}].route names {} destinations: egress does not \
                             split traffic between them (`weight` is not applied); it goes \
                             through the egress gateway if one of them is one, else as route[0] \
                             sends it",
                            dests.len()
                        ),
                    );
                }
                for (j, d) in dests.iter().enumerate() {
                    let host = normalize_host(&d.destination.host);
                    if is_gateway(policy, &host) {
                        continue;
                    }
                    let field = format!("spec.{section}[{i}].route[{j}].destination");
                    if applied {
                        // Nothing reaches a VirtualService none of whose hosts is registered.
                        if !registered(&host) && own.iter().any(|h| registered(h)) {
                            say(
                                Severity::Warning,
                                format!(
                                    "{field}.host {host} is not a host of any ServiceEntry: the \
                                     relay refuses what is routed there, as Istio has nowhere to \
                                     send it"
                                ),
                            );
                        }
                        // Routed elsewhere, a host needs addresses of its own.
                        let unaddressed = entry(&host).is_some_and(|se| {
                            se.spec.resolution.is_none_or(|r| r == Resolution::None)
                                && se.spec.endpoints.is_empty()
                        });
                        if unaddressed && !own.contains(&host) {
                            say(
                                Severity::Warning,
                                format!(
                                    "{field}.host {host} has resolution NONE: egress knows no \
                                     address of its to send to, and refuses what is routed there"
                                ),
                            );
                        }
                    } else if !own
                        .iter()
                        .any(|h| host_matches(&host, h) || host_matches(h, &host))
                    {
                        say(
                            Severity::Warning,
                            format!(
                                "{field}.host {host} is not a host of this VirtualService: egress \
                                 sends each connection to the address its workload dialled, not \
                                 to another host (not applied)"
                            ),
                        );
                    }
                    let Some(subset) = d.destination.subset.as_deref() else {
                        continue;
                    };
                    let defined = destination_rule(policy, std::slice::from_ref(&host))
                        .is_some_and(|dr| dr.spec.subsets.iter().any(|s| s.name == subset));
                    if !defined {
                        say(
                            Severity::Warning,
                            format!(
                                "{field}.subset {subset} is not defined by a DestinationRule for \
                                 {host}: Istio has nowhere to send such traffic, egress sends it \
                                 on as if no subset were named"
                            ),
                        );
                    }
                    if !subsets.iter().any(|(s, _)| *s == subset) {
                        subsets.push((subset, i));
                    }
                }
            }
            if section == "http" {
                for (i, r) in vs.spec.http.iter().enumerate() {
                    let mirrors = (r.mirror.iter().map(|d| (d, "mirror".to_owned()))).chain(
                        (r.mirrors.iter().enumerate())
                            .map(|(k, m)| (&m.destination, format!("mirrors[{k}].destination"))),
                    );
                    for (d, field) in mirrors {
                        let host = normalize_host(&d.host);
                        if !registered(&host) && own.iter().any(|h| registered(h)) {
                            say(
                                Severity::Warning,
                                format!(
                                    "spec.http[{i}].{field}.host {host} is not a host of any \
                                     ServiceEntry: the relay sends no copy there, as Istio has \
                                     nowhere to send it"
                                ),
                            );
                        }
                    }
                }
            }
            if let [(first, at), (other, then), ..] = subsets[..] {
                say(
                    Severity::Warning,
                    format!(
                        "spec.{section} names subsets {first} (spec.{section}[{at}]) and {other} \
                         (spec.{section}[{then}]): egress applies to a port the traffic policy of \
                         the subset its first covering route names, to all of its traffic"
                    ),
                );
            }
        }
    }
}

fn resolve_mode(policy: &Policy, flag: Option<Mode>, diags: &mut Diags) -> (Mode, String) {
    if let Some(mode) = flag {
        return (mode, "--mode".to_owned());
    }
    let mut found: Option<(Mode, String)> = None;
    for sc in &policy.sidecars {
        let Some(m) = sc
            .spec
            .outbound_traffic_policy
            .as_ref()
            .and_then(|o| o.mode)
        else {
            continue;
        };
        let m = match m {
            super::schema::OutboundMode::AllowAny => Mode::AllowAny,
            super::schema::OutboundMode::RegistryOnly => Mode::RegistryOnly,
        };
        match &found {
            Some((prev, by)) if *prev != m => {
                diag(
                    diags,
                    Severity::Warning,
                    &sc.source,
                    format!(
                        "{} sets outboundTrafficPolicy {m}, {by} sets {prev}; registry-only applies",
                        sc.label()
                    ),
                );
                found = Some((Mode::RegistryOnly, "conflicting Sidecars".to_owned()));
            }
            Some(_) => {}
            None => found = Some((m, sc.label())),
        }
    }
    found.unwrap_or((Mode::AllowAny, "Istio's default (ALLOW_ANY)".to_owned()))
}

fn normalize_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn compile_service_entry(
    policy: &Policy,
    prev: &RuleIds,
    se: &Resource<ServiceEntrySpec>,
    plan: &mut Plan,
    diags: &mut Diags,
) {
    let label = se.label();
    let spec = &se.spec;
    let src = &se.source;
    let mut ok = true;
    let mut err = |diags: &mut Diags, msg: String| {
        diag(diags, Severity::Error, src, format!("{label}: {msg}"));
        ok = false;
    };
    if spec.hosts.is_empty() {
        err(diags, "spec.hosts must name at least one host".to_owned());
    }
    if spec.ports.is_empty() {
        err(
            diags,
            "spec.ports must declare at least one port".to_owned(),
        );
    }
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    let dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
    for h in &spec.hosts {
        if h.contains('*') && dns {
            err(
                diags,
                format!("host `{h}`: a wildcard host cannot use resolution {resolution:?}"),
            );
        }
    }
    if resolution == Resolution::Static && spec.endpoints.is_empty() {
        err(diags, "resolution STATIC needs spec.endpoints".to_owned());
    }
    let mut endpoint_ips = Vec::new();
    let mut endpoint_names = Vec::new();
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let Some(addr) = ep.address.as_deref() else {
            err(diags, format!("spec.endpoints[{i}] has no address"));
            continue;
        };
        if addr.starts_with("unix://") {
            continue;
        }
        match addr.parse::<IpAddr>() {
            Ok(ip) => endpoint_ips.push((i, ip)),
            Err(_) if dns => endpoint_names.push((i, normalize_host(addr))),
            Err(_) => err(
                diags,
                format!(
                    "spec.endpoints[{i}].address `{addr}` must be an IP address with resolution {resolution:?}"
                ),
            ),
        }
        for name in ep.ports.keys() {
            if !spec.ports.iter().any(|p| p.name.as_deref() == Some(name)) {
                err(
                    diags,
                    format!(
                        "spec.endpoints[{i}].ports names `{name}`, which no spec.ports entry declares"
                    ),
                );
            }
        }
    }
    if !ok {
        return;
    }

    // A rule is its ServiceEntry; the same name twice (in two files) is told apart by its order.
    let key = (0..)
        .map(|n| format!("{label}#{n}"))
        .find(|k| !plan.ids.by_key.contains_key(k))
        .expect("an unused key");
    let rule_id = plan.ids.assign(prev, key);
    let hosts: Vec<String> = spec.hosts.iter().map(|h| normalize_host(h)).collect();
    // A STATIC entry's addresses that hold none of its endpoints are virtual: Istio's proxy takes
    // connections to them on to the endpoints, and so does the relay (nothing may answer there).
    let virtual_nets: Vec<IpNet> = if resolution == Resolution::Static {
        spec.addresses
            .iter()
            .map(|a| a.0)
            .filter(|net| !endpoint_ips.iter().any(|(_, ip)| net.contains(ip)))
            .collect()
    } else {
        Vec::new()
    };
    let mut steered = steered_ports(policy, spec, &hosts, &virtual_nets, diags);
    let ports: Vec<(u16, Transport)> = spec
        .ports
        .iter()
        .map(|p| {
            (
                p.number.0,
                p.protocol.map_or(Transport::Tcp, Protocol::transport),
            )
        })
        .collect();
    let mut all_ports = ports.clone();
    for ep in &spec.endpoints {
        for (name, number) in &ep.ports {
            if let Some(p) = spec.ports.iter().find(|p| p.name.as_deref() == Some(name)) {
                all_ports.push((
                    number.0,
                    p.protocol.map_or(Transport::Tcp, Protocol::transport),
                ));
                // An endpoint's number for a port is steered as the port is.
                if let Some(s) = steered.iter().find(|s| s.port == p.number.0) {
                    let mapped = SteeredPort {
                        port: number.0,
                        ..s.clone()
                    };
                    steered.push(mapped);
                }
            }
        }
    }
    all_ports.sort();
    all_ports.dedup();
    steered.sort_by_key(|s| s.port);
    steered.dedup_by_key(|s| s.port);
    let verdict = |port: u16| {
        if steered.iter().any(|s| s.port == port && !s.virtual_only) {
            Verdict::Steer
        } else {
            Verdict::Allow
        }
    };
    let with_verdicts = |ports: &[(u16, Transport)]| -> Vec<(u16, Transport, Verdict)> {
        ports.iter().map(|&(p, t)| (p, t, verdict(p))).collect()
    };
    let mut originate = originations(policy, se, &hosts, &steered, diags);
    // The other steered HTTP ports: the relay speaks HTTP to the application there too, as an
    // egress gateway would, and sends the requests on as plain HTTP.
    for port in &spec.ports {
        let n = port.number.0;
        let Some(s) = steered.iter().find(|s| s.port == n) else {
            continue;
        };
        if port.protocol == Some(Protocol::Http) && !originate.iter().any(|o| o.port == n) {
            originate.push(Origination {
                port: n,
                target_port: s
                    .onward
                    .unwrap_or(port.target_port.unwrap_or(port.number).0),
                tls: None,
            });
        }
    }
    let pools = per_port(
        policy,
        spec,
        &hosts,
        &steered,
        diags,
        "connectionPool",
        (
            |tp| tp.connection_pool.as_ref(),
            |pl| pl.connection_pool.as_ref(),
        ),
        connection_pool,
    );
    let outliers = per_port(
        policy,
        spec,
        &hosts,
        &steered,
        diags,
        "outlierDetection",
        (
            |tp| tp.outlier_detection.as_ref(),
            |pl| pl.outlier_detection.as_ref(),
        ),
        outlier_detection,
    );
    let balance = per_port(
        policy,
        spec,
        &hosts,
        &steered,
        diags,
        "loadBalancer",
        (
            |tp| tp.load_balancer.as_ref(),
            |pl| pl.load_balancer.as_ref(),
        ),
        load_balancer,
    );
    plan.rules.push(RuleInfo {
        id: rule_id,
        label: label.clone(),
        hosts: hosts.clone(),
        ports: all_ports,
        steered: steered.clone(),
        originate,
        pools,
        outliers,
        balance,
        endpoint_groups: endpoint_groups(spec, &endpoint_ips, &endpoint_names),
        virtual_nets: virtual_nets.clone(),
        source: src.clone(),
    });
    let push_fixed = |plan: &mut Plan, net: IpNet, ports: &[(u16, Transport)]| {
        for &(port, transport) in ports {
            let verdict = verdict(port);
            plan.fixed.push(Entry {
                net,
                port,
                transport,
                verdict,
                rule_id,
            });
        }
    };
    for a in &spec.addresses {
        if virtual_nets.contains(&a.0) {
            for &(port, transport) in &ports {
                let verdict = match transport {
                    Transport::Tcp => Verdict::Steer,
                    Transport::Udp => verdict(port),
                };
                plan.fixed.push(Entry {
                    net: a.0,
                    port,
                    transport,
                    verdict,
                    rule_id,
                });
            }
        } else {
            push_fixed(plan, a.0, &ports);
        }
    }
    // Hosts that are IP literals stand for themselves, whatever the resolution.
    let mut names = Vec::new();
    for h in &hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => push_fixed(plan, IpNet::from(ip), &ports),
            Err(_) => names.push(h.clone()),
        }
    }
    match resolution {
        Resolution::None => {
            if spec.addresses.is_empty() && !hosts.iter().any(|h| h.parse::<IpAddr>().is_ok()) {
                diag(
                    diags,
                    Severity::Warning,
                    src,
                    format!(
                        "{label}: resolution NONE without addresses opens port(s) {} to every IP address, as in Istio; add spec.addresses or use resolution DNS",
                        ports
                            .iter()
                            .map(|(p, t)| format!("{p}/{t}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                push_fixed(plan, IpNet::V6("::/0".parse().expect("valid")), &ports);
            }
        }
        Resolution::Static => {
            for (i, ip) in &endpoint_ips {
                // An endpoint may take a port on another number (`ports: {https: 8443}`).
                let mut ep_ports = ports.clone();
                for (name, number) in &spec.endpoints[*i].ports {
                    if let Some(p) = spec.ports.iter().find(|p| p.name.as_deref() == Some(name)) {
                        ep_ports.push((
                            number.0,
                            p.protocol.map_or(Transport::Tcp, Protocol::transport),
                        ));
                    }
                }
                push_fixed(plan, IpNet::from(*ip), &ep_ports);
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            for (_, ip) in &endpoint_ips {
                push_fixed(plan, IpNet::from(*ip), &ports);
            }
            // With endpoints, Istio connects to the endpoints, not to the hosts.
            let targets = if spec.endpoints.is_empty() {
                names
            } else {
                endpoint_names.into_iter().map(|(_, name)| name).collect()
            };
            for name in targets {
                plan.hosts.push(HostRule {
                    name,
                    ports: with_verdicts(&ports),
                    rule_id,
                });
            }
        }
    }
}

/// A ServiceEntry's endpoints grouped by their port numbers (`endpoints[].ports`), in order:
/// those that are addresses (`ips`) and names (`names`), each with its index in the list.
fn endpoint_groups(
    spec: &ServiceEntrySpec,
    ips: &[(usize, IpAddr)],
    names: &[(usize, String)],
) -> Vec<EndpointGroup> {
    let mut all: Vec<(usize, Result<IpAddr, &String>)> = (ips.iter().map(|(i, ip)| (*i, Ok(*ip))))
        .chain(names.iter().map(|(i, name)| (*i, Err(name))))
        .collect();
    all.sort_by_key(|(i, _)| *i);
    let mut groups: Vec<(&BTreeMap<String, PortNumber>, EndpointGroup)> = Vec::new();
    for (i, addr) in all {
        let ep = &spec.endpoints[i];
        let at = match groups.iter().position(|(ports, _)| **ports == ep.ports) {
            Some(at) => at,
            None => {
                let renumbers = spec
                    .ports
                    .iter()
                    .filter(|p| {
                        p.name
                            .as_ref()
                            .and_then(|name| ep.ports.get(name))
                            .is_some_and(|number| *number != p.number)
                    })
                    .map(|p| p.number.0)
                    .collect();
                let group = EndpointGroup {
                    renumbers,
                    ..EndpointGroup::default()
                };
                groups.push((&ep.ports, group));
                groups.len() - 1
            }
        };
        let group = &mut groups[at].1;
        match addr {
            Ok(ip) => group.ips.push(ip),
            Err(name) => group.names.push(name.clone()),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// The ports of a ServiceEntry whose traffic Istio would send through an egress gateway (or have
/// the sidecar originate TLS, retry or time out, which egress does in its relay), each with why.
/// As in Istio, a port takes the first route of a mesh-bound VirtualService whose `match` covers
/// it (its `port`, its `gateways`, a TLS match's `sniHosts`); a route without `match` covers every
/// port. Of a match, only those fields are judged: an HTTP match on a path or a header covers its
/// whole port, since egress steers connections, not requests.
fn steered_ports(
    policy: &Policy,
    spec: &ServiceEntrySpec,
    hosts: &[String],
    virtual_nets: &[IpNet],
    diags: &mut Diags,
) -> Vec<SteeredPort> {
    // Each route compiled once, however many ports it covers (its diagnostics with it).
    let mut compiled: Vec<(*const HttpRoute, Compiled)> = Vec::new();
    let mut compile = |vs: &Resource<VirtualServiceSpec>, i: usize, r: &HttpRoute| {
        let key = std::ptr::from_ref(r);
        if let Some((_, c)) = compiled.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let c = compile_route(vs, i, r, diags);
        compiled.push((key, c.clone()));
        c
    };
    let mut out = Vec::new();
    for p in &spec.ports {
        let port = p.number.0;
        // HTTP/2 and gRPC too: their requests are served as HTTP/2.
        let served_as_http = p.protocol.is_none_or(Protocol::is_http);
        let mut virtual_only = false;
        // An HTTP port's requests are routed one by one (`requests`); the others' connections
        // whole.
        let pass = if p.protocol == Some(Protocol::Http) {
            Vec::new()
        } else {
            pass_routes(policy, hosts, port)
        };
        let (why, http, onward) = match route_reason(policy, hosts, port, served_as_http) {
            Some(r) => (r.why, r.http, r.onward),
            None => match origination_reason(policy, hosts, p) {
                Some(why) => (why, http_route(policy, hosts, port), None),
                None if !pass.is_empty() => {
                    let why = pass
                        .iter()
                        .find(|r| elsewhere(&r.sni, &r.to, hosts))
                        .map(|r| {
                            format!("{} sends port {port}'s connections to {}", r.by, r.shown())
                        })
                        .unwrap_or_default();
                    (why, http_route(policy, hosts, port), None)
                }
                // The relay carries TCP.
                None if !virtual_nets.is_empty()
                    && p.protocol.map_or(Transport::Tcp, Protocol::transport) == Transport::Tcp =>
                {
                    virtual_only = true;
                    let nets: Vec<String> = virtual_nets.iter().map(ToString::to_string).collect();
                    let why = format!(
                        "spec.addresses {} hold none of the endpoints (virtual): the relay takes \
                         connections to port {port} there on to the endpoints, as Istio's proxy \
                         does",
                        nets.join(", ")
                    );
                    (why, http_route(policy, hosts, port), None)
                }
                None => continue,
            },
        };
        let route = match http {
            Some((vs, i, r)) => compile(vs, i, r).route,
            None => RelayRoute::default(),
        };
        // The requests' routes: those of the VirtualService whose route covers the port. Where
        // one goes to an egress gateway, the gateway's routes on the port it goes to follow it
        // (one list per gateway port, shared).
        let mut at_gateways: Vec<(u16, Option<Arc<[RequestRoute]>>)> = Vec::new();
        let requests = match http.or_else(|| http_route(policy, hosts, port)) {
            Some((vs, _, _)) if served_as_http => vs
                .spec
                .http
                .iter()
                .enumerate()
                .filter(|(_, r)| http_covers(r, port))
                .map(|(i, r)| {
                    let then = gateway_destination(policy, &r.route, port).and_then(|(_, at)| {
                        if let Some((_, then)) = at_gateways.iter().find(|(a, _)| *a == at) {
                            return then.clone();
                        }
                        let routes: Vec<RequestRoute> = gateway_routes(policy, hosts, at)
                            .map(|(gvs, gi, gr)| {
                                let c = compile(gvs, gi, gr);
                                request_route((policy, hosts), (c, gvs, gi, gr), at, true, None)
                            })
                            .collect();
                        let then = (!routes.is_empty()).then(|| Arc::from(routes));
                        at_gateways.push((at, then.clone()));
                        then
                    });
                    let c = compile(vs, i, r);
                    request_route((policy, hosts), (c, vs, i, r), port, false, then)
                })
                .collect(),
            _ => Vec::new(),
        };
        let carry = match p.protocol {
            Some(Protocol::Tcp | Protocol::Mongo | Protocol::Redis | Protocol::Mysql) => {
                Carry::Opaque
            }
            // gRPC and HTTP/2 come as HTTP/2 without TLS (served, and sent on with TLS where a
            // DestinationRule asks for it), or with TLS (passed through).
            None | Some(Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb) => Carry::Detect,
            Some(_) => Carry::Tls,
        };
        out.push(SteeredPort {
            port,
            why,
            route,
            carry,
            onward,
            requests,
            virtual_only,
            pass,
        });
    }
    out
}

/// The `tls` and `tcp` routes that cover `port` of these hosts, in order (each VirtualService's
/// `tls` routes, then its `tcp` routes), where one of them sends connections elsewhere than where
/// they were dialled (`elsewhere`); else none. The mesh's first; where one goes to an egress
/// gateway, the gateway's own routes for the port it goes to take its connections next, and
/// those none of them takes go where they were dialled.
fn pass_routes(policy: &Policy, hosts: &[String], port: u16) -> Vec<PassRoute> {
    let to = |dests: &[RouteDestination]| -> Vec<RouteTo> {
        (route_to(policy, dests, port).into_iter())
            .map(|(d, _)| d)
            .collect()
    };
    let mut out = Vec::new();
    for (sni, tls, dests, by) in l4_routes(policy, hosts, port, false) {
        let Some((_, at)) = gateway_destination(policy, dests, port) else {
            out.push(PassRoute {
                sni,
                tls,
                to: to(dests),
                by,
            });
            continue;
        };
        for (at_sni, at_tls, at_dests, at_by) in l4_routes(policy, hosts, at, true) {
            let Some(both) = narrowed(&sni, &at_sni) else {
                continue;
            };
            out.push(PassRoute {
                sni: both,
                tls: tls || at_tls,
                to: to(at_dests),
                by: at_by,
            });
        }
        out.push(PassRoute {
            sni,
            tls,
            to: Vec::new(),
            by,
        });
    }
    if !out.iter().any(|r| elsewhere(&r.sni, &r.to, hosts)) {
        out.clear();
    }
    out
}

/// A `tls` or `tcp` route as `pass_routes` takes it: the server names it takes (none: any),
/// whether it takes TLS alone, its destinations, and its name.
type L4Route<'a> = (Vec<String>, bool, &'a [RouteDestination], String);

/// The `tls` and `tcp` routes of these hosts' VirtualServices that cover `port`, in order: the
/// mesh's, or (`gateway_stage`) an egress gateway's own, but for one that would send them to
/// the gateway again.
fn l4_routes<'a>(
    policy: &'a Policy,
    hosts: &[String],
    port: u16,
    gateway_stage: bool,
) -> Vec<L4Route<'a>> {
    let mut out = Vec::new();
    for vs in policy
        .virtual_services
        .iter()
        .filter(|vs| names_host(vs, hosts))
    {
        // A match's own gateways, else its VirtualService's.
        let bound = |gateways: &[String]| {
            let gateways = if gateways.is_empty() {
                &vs.spec.gateways[..]
            } else {
                gateways
            };
            if gateway_stage {
                at_gateway(gateways)
            } else {
                at_mesh(gateways)
            }
        };
        let sends_back = |dests: &[RouteDestination]| {
            gateway_stage && gateway_destination(policy, dests, port).is_some()
        };
        for (i, r) in vs.spec.tls.iter().enumerate() {
            let matches: Vec<_> = (r.matches.iter())
                .filter(|m| bound(&m.gateways) && on_port(m.port.as_ref(), port))
                .collect();
            let unmatched = r.matches.is_empty() && bound(&[]);
            if r.route.is_empty() || sends_back(&r.route) || (!unmatched && matches.is_empty()) {
                continue;
            }
            let sni: Vec<String> = if unmatched || matches.iter().any(|m| m.sni_hosts.is_empty()) {
                Vec::new()
            } else {
                (matches.iter())
                    .flat_map(|m| m.sni_hosts.iter().map(|h| normalize_host(h)))
                    .collect()
            };
            if !sni.is_empty() && !names_sni(&sni, hosts) {
                continue;
            }
            out.push((
                sni,
                true,
                &r.route[..],
                format!("{} spec.tls[{i}]", vs.label()),
            ));
        }
        for (i, r) in vs.spec.tcp.iter().enumerate() {
            let covers = (r.matches.is_empty() && bound(&[]))
                || (r.matches.iter()).any(|m| bound(&m.gateways) && on_port(m.port.as_ref(), port));
            if r.route.is_empty() || sends_back(&r.route) || !covers {
                continue;
            }
            out.push((
                Vec::new(),
                false,
                &r.route[..],
                format!("{} spec.tcp[{i}]", vs.label()),
            ));
        }
    }
    out
}

/// The server names both of two routes take (none: any), or none at all where they take no name
/// in common.
fn narrowed(a: &[String], b: &[String]) -> Option<Vec<String>> {
    match (a, b) {
        ([], b) => Some(b.to_vec()),
        (a, []) => Some(a.to_vec()),
        (a, b) => {
            let both: Vec<String> = (a.iter())
                .flat_map(|x| b.iter().map(move |y| (x, y)))
                .filter_map(|(x, y)| {
                    if host_matches(x, y) {
                        Some(y.clone())
                    } else if host_matches(y, x) {
                        Some(x.clone())
                    } else {
                        None
                    }
                })
                .collect();
            (!both.is_empty()).then_some(both)
        }
    }
}

/// A route's destinations for connections or requests to `port`, those that take any (a single
/// one takes everything; of several, one without a weight takes nothing), each with its index
/// among them; none where one is an egress gateway, which sends them on where they were
/// dialled.
fn route_to(policy: &Policy, dests: &[RouteDestination], port: u16) -> Vec<(RouteTo, usize)> {
    if dests
        .iter()
        .any(|d| is_gateway(policy, &d.destination.host))
    {
        return Vec::new();
    }
    let one = dests.len() == 1;
    let to = dests.iter().enumerate().map(|(j, d)| {
        let weight = if one {
            1
        } else {
            d.weight.map_or(0, |w| w.max(0).unsigned_abs())
        };
        let to = RouteTo {
            host: normalize_host(&d.destination.host),
            port: destination_port(policy, &d.destination, port),
            weight,
            subset: subset_endpoints(policy, &d.destination),
        };
        (to, j)
    });
    to.filter(|(d, _)| d.weight > 0).collect()
}

/// The endpoints a destination's `subset` narrows its host's to, by the subset's `labels` (an
/// endpoint is one of them where its labels hold them all, as Istio selects); none where the
/// subset has no labels or no DestinationRule defines it: all of the host's.
fn subset_endpoints(policy: &Policy, d: &Destination) -> Option<SubsetEndpoints> {
    let name = d.subset.as_deref()?;
    let host = normalize_host(&d.host);
    let dr = destination_rule(policy, std::slice::from_ref(&host))?;
    let labels = &dr.spec.subsets.iter().find(|s| s.name == name)?.labels;
    if labels.is_empty() {
        return None;
    }
    let mut out = SubsetEndpoints {
        name: name.to_owned(),
        ips: Vec::new(),
        names: Vec::new(),
    };
    let entry = (policy.service_entries.iter())
        .find(|se| se.spec.hosts.iter().any(|h| normalize_host(h) == host));
    let endpoints = entry.into_iter().flat_map(|se| &se.spec.endpoints);
    for ep in endpoints.filter(|ep| labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v))) {
        match ep.address.as_deref() {
            Some(a) if a.starts_with("unix://") => {}
            Some(a) => match a.parse::<IpAddr>() {
                Ok(ip) => out.ips.push(ip),
                Err(_) => out.names.push(normalize_host(a)),
            },
            None => {}
        }
    }
    Some(out)
}

/// Whether a route sends some connections to these hosts elsewhere than where they were
/// dialled: to several destinations, to a host other than one it takes, or to a subset of the
/// host's endpoints. Its host's own other
/// port is where the port's `targetPort` (or the gateway's route, `onward_port`) says.
fn elsewhere(sni: &[String], to: &[RouteTo], hosts: &[String]) -> bool {
    match to {
        [] => false,
        [d] => {
            d.subset.is_some()
                || hosts.iter().any(|h| {
                    let taken = sni.is_empty()
                        || sni.iter().any(|s| host_matches(s, h) || host_matches(h, s));
                    taken && *h != d.host
                })
        }
        _ => true,
    }
}

/// The port a route destination takes connections to `dialled` on: its `port`, else the one
/// port its ServiceEntry declares, else the port dialled, as Istio picks a service's port.
fn destination_port(policy: &Policy, d: &Destination, dialled: u16) -> u16 {
    if let Some(n) = d.port.as_ref().and_then(|p| p.number) {
        return n.0;
    }
    let host = normalize_host(&d.host);
    let entry = policy
        .service_entries
        .iter()
        .find(|se| se.spec.hosts.iter().any(|h| normalize_host(h) == host));
    match entry.map(|se| &se.spec.ports[..]) {
        Some([only]) => only.number.0,
        _ => dialled,
    }
}

/// A compiled route as requests to `port` are matched against it, at an egress gateway or at
/// the mesh.
fn request_route(
    (policy, hosts): (&Policy, &[String]),
    (c, vs, i, r): (Compiled, &Resource<VirtualServiceSpec>, usize, &HttpRoute),
    port: u16,
    at_gateway: bool,
    then: Option<Arc<[RequestRoute]>>,
) -> RequestRoute {
    let drawn = route_to(policy, &r.route, port);
    let dests: Vec<RouteTo> = drawn.iter().map(|(d, _)| d.clone()).collect();
    let to = if elsewhere(&[], &dests, hosts) {
        (drawn.into_iter())
            .map(|(d, j)| (d, c.each[j].clone()))
            .collect()
    } else {
        Vec::new()
    };
    let mirrors = (c.mirrors.iter())
        .map(|(d, share)| {
            let to = RouteTo {
                host: normalize_host(&d.host),
                port: destination_port(policy, d, port),
                weight: 1,
                subset: subset_endpoints(policy, d),
            };
            (to, *share)
        })
        .collect();
    RequestRoute {
        to,
        mirrors,
        matches: c
            .matches
            .into_iter()
            .filter(|(at, _, bound)| {
                (if at_gateway {
                    bound.gateway
                } else {
                    bound.mesh
                }) && on_port(at.as_ref(), port)
            })
            .map(|(_, m, _)| m)
            .collect(),
        route: c.route,
        headers: c.headers,
        rewrite: c.rewrite,
        answer: c.answer,
        fault: c.fault,
        then,
        by: format!("{} spec.http[{i}]", vs.label()),
    }
}

/// An HTTP route of a VirtualService, with the VirtualService and its index.
type HttpAt<'a> = (&'a Resource<VirtualServiceSpec>, usize, &'a HttpRoute);

/// The HTTP route that covers `port` of these hosts for the mesh, if any.
fn http_route<'a>(policy: &'a Policy, hosts: &[String], port: u16) -> Option<HttpAt<'a>> {
    mesh_services(policy, hosts).find_map(|vs| {
        vs.spec
            .http
            .iter()
            .enumerate()
            .find(|(_, r)| http_covers(r, port))
            .map(|(i, r)| (vs, i, r))
    })
}

/// The VirtualServices that name one of these hosts and are bound to the mesh.
fn mesh_services<'a>(
    policy: &'a Policy,
    hosts: &[String],
) -> impl Iterator<Item = &'a Resource<VirtualServiceSpec>> {
    policy
        .virtual_services
        .iter()
        .filter(move |vs| names_host(vs, hosts) && at_mesh(&vs.spec.gateways))
}

/// Whether a VirtualService names one of these hosts.
fn names_host(vs: &Resource<VirtualServiceSpec>, hosts: &[String]) -> bool {
    vs.spec
        .hosts
        .iter()
        .any(|h| hosts.contains(&normalize_host(h)))
}

/// Whether a list of gateways (a match's own, which replace its VirtualService's, or a
/// VirtualService's) takes in the sidecars: `mesh`, which is also what none means.
fn at_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// The egress gateway among a route's destinations (`istio-egressgateway…`, or a service a
/// Gateway's `selector` names), and the gateway's port that `port`'s requests go to on it.
fn gateway_destination<'a>(
    policy: &Policy,
    dests: &'a [RouteDestination],
    port: u16,
) -> Option<(&'a str, u16)> {
    let d = dests
        .iter()
        .find(|d| is_gateway(policy, &d.destination.host))?;
    let at = d.destination.port.as_ref().and_then(|p| p.number);
    Some((&d.destination.host, at.map_or(port, |n| n.0)))
}

/// Whether a route's destination host is an egress gateway: `istio-egressgateway…`, or a service
/// a Gateway's `selector` names.
fn is_gateway(policy: &Policy, host: &str) -> bool {
    let first = host.split('.').next().unwrap_or(host);
    first == "istio-egressgateway"
        || policy
            .gateways
            .iter()
            .flat_map(|g| g.spec.selector.values())
            .any(|s| first == s || first == format!("istio-{s}"))
}

/// Whether a list of gateways takes in an egress gateway: any gateway but `mesh`.
fn at_gateway(gateways: &[String]) -> bool {
    gateways.iter().any(|g| g != "mesh")
}

/// Where a route's match applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bound {
    mesh: bool,
    gateway: bool,
}

/// Whether an HTTP route of `vs` covers `port` at an egress gateway.
fn gateway_covers(vs: &Resource<VirtualServiceSpec>, r: &HttpRoute, port: u16) -> bool {
    if r.matches.is_empty() {
        return at_gateway(&vs.spec.gateways);
    }
    r.matches.iter().any(|m| {
        let gateways = if m.gateways.is_empty() {
            &vs.spec.gateways[..]
        } else {
            &m.gateways[..]
        };
        at_gateway(gateways) && on_port(m.port.as_ref(), port)
    })
}

/// Whether an HTTP route covers `port` for the mesh.
fn http_covers(r: &HttpRoute, port: u16) -> bool {
    r.matches.is_empty()
        || r.matches
            .iter()
            .any(|m| at_mesh(&m.gateways) && on_port(m.port.as_ref(), port))
}

/// Whether a match's `port` covers `port` (one unset covers all).
fn on_port(matched: Option<&PortNumber>, port: u16) -> bool {
    matched.is_none_or(|p| p.0 == port)
}

/// How a mesh-bound VirtualService's route steers a port.
struct Routed<'a> {
    why: String,
    /// The HTTP route that does it, whose retries and timeout the relay applies.
    http: Option<HttpAt<'a>>,
    /// The port the egress gateway sends an HTTP route's requests on to (`onward_port`).
    onward: Option<u16>,
}

/// Why a mesh-bound VirtualService's routes steer connections to `port` of these hosts, if they
/// do; `served_as_http`: the relay would serve the port as HTTP (declared HTTP, or no protocol).
fn route_reason<'a>(
    policy: &'a Policy,
    hosts: &[String],
    port: u16,
    served_as_http: bool,
) -> Option<Routed<'a>> {
    // With the gateway's port it goes to.
    let to_gateway = |vs: &Resource<VirtualServiceSpec>, section, i, dests: &[RouteDestination]| {
        gateway_destination(policy, dests, port).map(|(gateway, at)| {
            let why = format!(
                "{} routes port {port} to the egress gateway {gateway} (spec.{section}[{i}])",
                vs.label(),
            );
            (why, at)
        })
    };
    let passed = |(why, _)| Routed {
        why,
        http: None,
        onward: None,
    };
    for vs in mesh_services(policy, hosts) {
        let tls = vs.spec.tls.iter().enumerate().find(|(_, r)| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    at_mesh(&m.gateways)
                        && on_port(m.port.as_ref(), port)
                        && names_sni(&m.sni_hosts, hosts)
                })
        });
        if let Some(to) = tls.and_then(|(i, r)| to_gateway(vs, "tls", i, &r.route)) {
            return Some(passed(to));
        }
        let tcp = vs.spec.tcp.iter().enumerate().find(|(_, r)| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| at_mesh(&m.gateways) && on_port(m.port.as_ref(), port))
        });
        if let Some(to) = tcp.and_then(|(i, r)| to_gateway(vs, "tcp", i, &r.route)) {
            return Some(passed(to));
        }
        // On a port the relay serves as HTTP it routes each request, so any covering route that
        // asks for what only the relay does steers the port; elsewhere the first decides.
        let covering = vs
            .spec
            .http
            .iter()
            .enumerate()
            .filter(|(_, r)| http_covers(r, port))
            .take(if served_as_http { usize::MAX } else { 1 });
        for (i, r) in covering {
            let routed = |why, onward| Routed {
                why,
                http: Some((vs, i, r)),
                onward,
            };
            if let Some((why, at)) = to_gateway(vs, "http", i, &r.route) {
                return Some(routed(why, onward_port(policy, hosts, at)));
            }
            if retries_or_timeout(r) {
                let why = format!(
                    "{} gives port {port} retries or a timeout (spec.http[{i}])",
                    vs.label()
                );
                return Some(routed(why, None));
            }
            let to: Vec<RouteTo> = (route_to(policy, &r.route, port).into_iter())
                .map(|(d, _)| d)
                .collect();
            if served_as_http && elsewhere(&[], &to, hosts) {
                let why = format!(
                    "{} sends port {port}'s requests to {} (spec.http[{i}])",
                    vs.label(),
                    shown(&to)
                );
                return Some(routed(why, None));
            }
            if served_as_http && acts_on_requests(r) {
                let why = format!(
                    "{} gives port {port}'s requests a fault, a direct response, a redirect, a \
                     rewrite, header operations or a mirror (spec.http[{i}])",
                    vs.label()
                );
                return Some(routed(why, None));
            }
        }
        // Routes that each match some requests only leave the others unrouted: Envoy answers
        // them 404, and so must the relay, or they would leave unchecked.
        if served_as_http {
            let mut covering = vs
                .spec
                .http
                .iter()
                .enumerate()
                .filter(|(_, r)| http_covers(r, port));
            if let Some((i, r)) = covering.next()
                && !takes_every_request(r, port)
                && !covering.any(|(_, r)| takes_every_request(r, port))
            {
                return Some(Routed {
                    why: format!(
                        "{} routes some of port {port}'s requests only: the others are answered \
                         404, as Envoy answers them (spec.http)",
                        vs.label()
                    ),
                    http: Some((vs, i, r)),
                    onward: None,
                });
            }
        }
    }
    None
}

/// Whether a TLS match's `sniHosts` name one of these hosts (wildcards either way); none do.
fn names_sni(sni: &[String], hosts: &[String]) -> bool {
    sni.is_empty()
        || sni.iter().any(|s| {
            let s = normalize_host(s);
            hosts
                .iter()
                .any(|h| host_matches(&s, h) || host_matches(h, &s))
        })
}

/// The destinations of the route that covers `port` of these hosts for the mesh, taken in
/// `route_reason`'s order (a VirtualService's `tls`, then `tcp`, then `http` routes); where that
/// route goes to an egress gateway, those of the gateway's own route for the port it goes to.
fn port_destinations<'a>(
    policy: &'a Policy,
    hosts: &[String],
    port: u16,
) -> Option<&'a [RouteDestination]> {
    // Of a VirtualService's first route, in each section, one of whose matches `covers`; a
    // route without `match` covers every port.
    let first = |vs: &'a Resource<VirtualServiceSpec>,
                 covers: Covers<'_>|
     -> Option<&'a [RouteDestination]> {
        let tls = vs.spec.tls.iter().find(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| covers(&m.gateways, m.port.as_ref(), &m.sni_hosts))
        });
        let tcp = || {
            vs.spec.tcp.iter().find(|r| {
                r.matches.is_empty()
                    || r.matches
                        .iter()
                        .any(|m| covers(&m.gateways, m.port.as_ref(), &[]))
            })
        };
        let http = || {
            vs.spec.http.iter().find(|r| {
                r.matches.is_empty()
                    || r.matches
                        .iter()
                        .any(|m| covers(&m.gateways, m.port.as_ref(), &[]))
            })
        };
        tls.map(|r| &r.route[..])
            .or_else(|| tcp().map(|r| &r.route[..]))
            .or_else(|| http().map(|r| &r.route[..]))
    };
    let mesh = mesh_services(policy, hosts).find_map(|vs| {
        first(vs, &|gateways, at, sni| {
            at_mesh(gateways) && on_port(at, port) && names_sni(sni, hosts)
        })
    })?;
    let Some((_, at)) = gateway_destination(policy, mesh, port) else {
        return Some(mesh);
    };
    policy
        .virtual_services
        .iter()
        .filter(|vs| names_host(vs, hosts))
        .filter_map(|vs| {
            first(vs, &|gateways, p, sni| {
                let gateways = if gateways.is_empty() {
                    &vs.spec.gateways[..]
                } else {
                    gateways
                };
                at_gateway(gateways) && on_port(p, at) && names_sni(sni, hosts)
            })
        })
        .find(|dests| gateway_destination(policy, dests, at).is_none())
}

/// Whether a match covers a port: by its `gateways`, `port` and `sniHosts` (none for HTTP and
/// TCP).
type Covers<'c> = &'c dyn Fn(&[String], Option<&PortNumber>, &[String]) -> bool;

/// The subset of these hosts that `port`'s route sends to (`port_destinations`): that of its
/// first destination that is one of the hosts.
fn port_subset<'a>(policy: &'a Policy, hosts: &[String], port: u16) -> Option<&'a str> {
    port_destinations(policy, hosts, port)?
        .iter()
        .find(|d| hosts.contains(&normalize_host(&d.destination.host)))?
        .destination
        .subset
        .as_deref()
}

/// A DestinationRule's traffic policies for one port of its host, most specific first: that of
/// the subset the port's route sends to, where the rule defines it with one, then the rule's own.
/// Each with its place among the rule's policies (0 the rule's own, k + 1 that of
/// `subsets[k]`) and its field.
fn layers<'a>(
    dr: &'a Resource<DestinationRuleSpec>,
    subset: Option<&str>,
) -> Vec<(usize, &'a TrafficPolicy, String)> {
    let mut out = Vec::new();
    if let Some(name) = subset
        && let Some((k, tp)) = dr.spec.subsets.iter().enumerate().find_map(|(k, s)| {
            (s.name == name)
                .then_some(s.traffic_policy.as_ref())
                .flatten()
                .map(|tp| (k, tp))
        })
    {
        out.push((k + 1, tp, format!("spec.subsets[{k}].trafficPolicy")));
    }
    if let Some(tp) = &dr.spec.traffic_policy {
        out.push((0, tp, "spec.trafficPolicy".to_owned()));
    }
    out
}

/// Where a setting is among a DestinationRule's traffic policies: the policy's place (`layers`),
/// and the index of its port entry, if it is in one.
type Place = (usize, Option<usize>);

/// A setting `name` for `port`, as Istio merges a subset's policy over its rule's: from the
/// first of `layers` that has it, a port's entry before the policy's own. With its place (a
/// layer's, and the port entry's index) and its field.
fn setting_at<'a, S>(
    layers: &[(usize, &'a TrafficPolicy, String)],
    port: u16,
    name: &str,
    (rule_wide, at_port): Where<S>,
) -> Option<(&'a S, Place, String)> {
    layers.iter().find_map(|(layer, tp, field)| {
        let level = tp
            .port_level_settings
            .iter()
            .enumerate()
            .find_map(|(i, pl)| {
                let set = at_port(pl)?;
                (pl.port.as_ref().and_then(|p| p.number).map(|n| n.0) == Some(port)).then(|| {
                    (
                        set,
                        (*layer, Some(i)),
                        format!("{field}.portLevelSettings[{i}].{name}"),
                    )
                })
            });
        level.or_else(|| Some((rule_wide(tp)?, (*layer, None), format!("{field}.{name}"))))
    })
}

/// Whether an HTTP route that covers `port` takes every request to it: it has no match, or a
/// match for the port with no condition on the request (a `uri` prefix `/` is none).
fn takes_every_request(r: &HttpRoute, port: u16) -> bool {
    r.matches.is_empty()
        || r.matches.iter().any(|m| {
            at_mesh(&m.gateways)
                && on_port(m.port.as_ref(), port)
                && m.uri.as_ref().is_none_or(|u| {
                    u.prefix.as_deref() == Some("/") && u.exact.is_none() && u.regex.is_none()
                })
                && m.scheme.is_none()
                && m.method.is_none()
                && m.authority.is_none()
                && m.headers.is_empty()
                && m.query_params.is_empty()
                && m.without_headers.is_empty()
        })
}

/// Whether an HTTP route does to requests what only the relay can do for them.
fn acts_on_requests(r: &HttpRoute) -> bool {
    r.fault.is_some()
        || r.mirror.is_some()
        || !r.mirrors.is_empty()
        || r.direct_response.is_some()
        || r.redirect.is_some()
        || r.rewrite.is_some()
        || r.headers.is_some()
        || r.route.iter().any(|d| d.headers.is_some())
}

/// The port an egress gateway sends HTTP on to, when a mesh route sent it there on `at`: that of
/// the destination among these hosts of an HTTP route bound to a gateway (not the mesh) that
/// covers `at`. Istio's "egress gateway with TLS origination" sends port 80 on to 443, where a
/// DestinationRule asks for TLS.
fn onward_port(policy: &Policy, hosts: &[String], at: u16) -> Option<u16> {
    gateway_routes(policy, hosts, at)
        .flat_map(|(_, _, r)| &r.route)
        .find(|d| hosts.contains(&normalize_host(&d.destination.host)))
        .and_then(|d| d.destination.port.as_ref()?.number)
        .map(|n| n.0)
}

/// The HTTP routes an egress gateway takes these hosts' requests on its port `at` by, in order:
/// those of the VirtualServices that name one of the hosts that cover the port at a gateway,
/// but for one that would send them to the gateway again (a route bound to the mesh and the
/// gateway alike, which the mesh's requests took to get there).
fn gateway_routes<'a>(
    policy: &'a Policy,
    hosts: &'a [String],
    at: u16,
) -> impl Iterator<Item = HttpAt<'a>> {
    policy
        .virtual_services
        .iter()
        .filter(move |vs| names_host(vs, hosts))
        .flat_map(|vs| {
            vs.spec
                .http
                .iter()
                .enumerate()
                .map(move |(i, r)| (vs, i, r))
        })
        .filter(move |(vs, _, r)| {
            gateway_covers(vs, r, at) && gateway_destination(policy, &r.route, at).is_none()
        })
}

/// Why `port` of these hosts is steered for TLS origination, if its DestinationRule asks for it
/// there: the port's own `tls`, else the rule-wide one. On a port that is not HTTP the relay
/// passes the client's TLS through instead (`originations` warns).
fn origination_reason(policy: &Policy, hosts: &[String], port: &ServicePort) -> Option<String> {
    let protocol = port.protocol;
    let port = port.number.0;
    let dr = destination_rule(policy, hosts)?;
    let layers = layers(dr, port_subset(policy, hosts, port));
    let (tls, _, field) = setting_at(&layers, port, "tls", TLS)?;
    if !matches!(tls.mode, Some(TlsMode::Simple | TlsMode::Mutual)) {
        return None;
    }
    Some(if protocol.is_some_and(Protocol::is_http) {
        format!("{} originates TLS on port {port} ({field})", dr.label())
    } else {
        format!(
            "{} asks for TLS origination on port {port}, which is not HTTP: its TLS is passed through ({field})",
            dr.label()
        )
    })
}

/// Where a DestinationRule's `tls` is.
const TLS: Where<ClientTls> = (|tp| tp.tls.as_ref(), |pl| pl.tls.as_ref());

/// The DestinationRule for a ServiceEntry with these hosts, chosen as Istio chooses: one naming a
/// host exactly, else the wildcard that matches a host most specifically (`*.b.example.com`
/// before `*.example.com` before `*`); among equals, the first.
fn destination_rule<'a>(
    policy: &'a Policy,
    hosts: &[String],
) -> Option<&'a Resource<DestinationRuleSpec>> {
    let specificity = |dr: &Resource<DestinationRuleSpec>| {
        let host = normalize_host(&dr.spec.host);
        if hosts.contains(&host) {
            return Some(usize::MAX);
        }
        // "*.example.com" matches any name below example.com; "*" matches every name.
        let suffix = host.strip_prefix('*')?;
        hosts
            .iter()
            .any(|h| h.len() > suffix.len() && h.ends_with(suffix))
            .then_some(suffix.len())
    };
    let mut best: Option<(usize, &Resource<DestinationRuleSpec>)> = None;
    for dr in &policy.destination_rules {
        if let Some(s) = specificity(dr)
            && best.is_none_or(|(b, _)| s > b)
        {
            best = Some((s, dr));
        }
    }
    best.map(|(_, dr)| dr)
}

/// An HTTP route compiled: its retries and timeout, and its matches for the mesh with the port
/// each is for.
#[derive(Clone)]
struct Compiled {
    route: RelayRoute,
    /// With the port each is for, and where it applies: at the mesh, at a gateway.
    matches: Vec<(Option<PortNumber>, RequestMatch, Bound)>,
    headers: HeaderOps,
    /// The route's header operations, then each destination's, by destination.
    each: Vec<HeaderOps>,
    /// Its mirrors, with their shares in millionths.
    mirrors: Vec<(Destination, u32)>,
    rewrite: Rewrite,
    answer: Option<LocalAnswer>,
    fault: Option<Fault>,
}

fn compile_route(
    vs: &Resource<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
    diags: &mut Diags,
) -> Compiled {
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let bound = Bound {
            mesh: at_mesh(&m.gateways),
            gateway: at_gateway(if m.gateways.is_empty() {
                &vs.spec.gateways
            } else {
                &m.gateways
            }),
        };
        if !bound.mesh && !bound.gateway {
            continue;
        }
        let mut error = |field: String, e: String| {
            diag(
                diags,
                Severity::Error,
                &vs.source,
                format!("{}: spec.http[{i}].match[{j}].{field}: {e}", vs.label()),
            );
        };
        let mut text = |field: &str, sm: Option<&StringMatch>| match sm.map(string_match) {
            Some(Err(e)) => {
                error(field.to_owned(), e);
                None
            }
            Some(Ok(t)) => t,
            None => None,
        };
        let mut compiled = RequestMatch {
            uri: text("uri", m.uri.as_ref()),
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
            scheme: text("scheme", m.scheme.as_ref()),
            method: text("method", m.method.as_ref()),
            authority: text("authority", m.authority.as_ref()),
            ..RequestMatch::default()
        };
        for (name, sm) in &m.headers {
            let t = text(&format!("headers.{name}"), Some(sm));
            compiled.headers.push((name.to_ascii_lowercase(), t));
        }
        for (name, sm) in &m.without_headers {
            let t = text(&format!("withoutHeaders.{name}"), Some(sm));
            compiled
                .without_headers
                .push((name.to_ascii_lowercase(), t));
        }
        for (name, sm) in &m.query_params {
            let t = text(&format!("queryParams.{name}"), Some(sm));
            compiled.query.push((name.clone(), t));
        }
        matches.push((m.port, compiled, bound));
    }
    let mut level = |ops: Option<&Headers>, field: String| {
        let mut out = HeaderOps::default();
        let Some(ops) = ops else { return out };
        for (ops, to, part) in [
            (&ops.request, &mut out.request, "request"),
            (&ops.response, &mut out.response, "response"),
        ] {
            let Some(ops) = ops else { continue };
            if let Err(e) = header_ops(ops, to) {
                diag(
                    diags,
                    Severity::Error,
                    &vs.source,
                    format!("{}: {field}.{part}.{e}", vs.label()),
                );
            }
        }
        out
    };
    let own = level(r.headers.as_ref(), format!("spec.http[{i}].headers"));
    let each: Vec<HeaderOps> = (r.route.iter().enumerate())
        .map(|(j, d)| {
            let theirs = level(
                d.headers.as_ref(),
                format!("spec.http[{i}].route[{j}].headers"),
            );
            HeaderOps {
                request: [&own.request[..], &theirs.request[..]].concat(),
                response: [&own.response[..], &theirs.response[..]].concat(),
            }
        })
        .collect();
    let headers = each.first().cloned().unwrap_or(own);
    let mut rewrite = Rewrite::default();
    if let Some(rw) = &r.rewrite {
        let mut error = |field: &str, e: String| {
            diag(
                diags,
                Severity::Error,
                &vs.source,
                format!("{}: spec.http[{i}].rewrite.{field}: {e}", vs.label()),
            );
        };
        if let Some(uri) = &rw.uri {
            if uri.starts_with('/') && uri.parse::<http::uri::PathAndQuery>().is_ok() {
                rewrite.uri = Some(uri.clone());
            } else {
                error("uri", format!("`{uri}` is not a path"));
            }
        }
        if let Some(a) = &rw.authority {
            match a.parse::<http::uri::Authority>() {
                Ok(a) => rewrite.authority = Some(a),
                Err(_) => error("authority", format!("`{a}` is not a host")),
            }
        }
        if let Some(re) = &rw.uri_regex_rewrite {
            match (&rw.uri, &re.pattern, &re.rewrite) {
                (Some(_), _, _) => error(
                    "uriRegexRewrite",
                    "a rewrite has a uri or a uriRegexRewrite, not both".to_owned(),
                ),
                (None, Some(pattern), Some(with)) => match RegexRewrite::new(pattern, with) {
                    Ok(re) => rewrite.regex = Some(re),
                    Err((field, e)) => error(&format!("uriRegexRewrite.{field}"), e),
                },
                (None, None, _) => error("uriRegexRewrite.match", "required".to_owned()),
                (None, _, None) => error("uriRegexRewrite.rewrite", "required".to_owned()),
            }
        }
    }
    let answer = local_answer(r).unwrap_or_else(|e| {
        diag(
            diags,
            Severity::Error,
            &vs.source,
            format!("{}: spec.http[{i}].{e}", vs.label()),
        );
        None
    });
    let fault = r.fault.as_ref().and_then(|f| {
        for (unset, what, field) in [
            (
                f.delay
                    .as_ref()
                    .is_some_and(|d| d.percentage.is_none() && d.percent.is_none()),
                "delayed",
                "delay",
            ),
            (
                f.abort.as_ref().is_some_and(|a| a.percentage.is_none()),
                "aborted",
                "abort",
            ),
        ] {
            if unset {
                diag(
                    diags,
                    Severity::Warning,
                    &vs.source,
                    format!(
                        "{}: spec.http[{i}].fault.{field}.percentage is unset: as in Istio, no \
                         request is {what} (`percentage: {{value: 100}}` takes every one)",
                        vs.label()
                    ),
                );
            }
        }
        fault(f)
            .map_err(|e| {
                diag(
                    diags,
                    Severity::Error,
                    &vs.source,
                    format!("{}: spec.http[{i}].{e}", vs.label()),
                );
            })
            .ok()
    });
    Compiled {
        route: relay_route(vs, i, r, diags),
        matches,
        headers,
        each,
        mirrors: mirrors(vs, i, r, diags),
        rewrite,
        answer,
        fault,
    }
}

/// A route's `mirror` (with `mirrorPercentage`) or `mirrors`, checked as Istio checks them: one
/// or the other, each for 100 % of the requests unless its percentage says less.
fn mirrors(
    vs: &Resource<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
    diags: &mut Diags,
) -> Vec<(Destination, u32)> {
    let mut error = |message: String| {
        diag(
            diags,
            Severity::Error,
            &vs.source,
            format!("{}: spec.http[{i}].{message}", vs.label()),
        );
    };
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        error("mirror and mirrors: only one of them may be set".to_owned());
        return Vec::new();
    }
    let mut share = |field: String, p: Option<&Percent>| {
        let value = p.map_or(100.0, |p| p.value);
        if (0.0..=100.0).contains(&value) {
            // Millionths, as Envoy counts them.
            Some((value * 10_000.0).round() as u32)
        } else {
            error(format!("{field}: {value} is not from 0 to 100"));
            None
        }
    };
    let mut out = Vec::new();
    if let Some(d) = &r.mirror
        && let Some(s) = share("mirrorPercentage".to_owned(), r.mirror_percentage.as_ref())
    {
        out.push((d.clone(), s));
    }
    for (k, m) in r.mirrors.iter().enumerate() {
        if let Some(s) = share(format!("mirrors[{k}].percentage"), m.percentage.as_ref()) {
            out.push((m.destination.clone(), s));
        }
    }
    out.retain(|(_, s)| *s > 0);
    out
}

/// A route's `fault`, checked as Istio checks it.
fn fault(f: &HttpFault) -> Result<Fault, String> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err("fault: neither a delay nor an abort".to_owned());
    }
    let share = |field: &str, percentage: Option<&Percent>, percent: Option<i64>| {
        let value = match (percentage, percent) {
            (Some(p), _) => p.value,
            (None, Some(n)) => n as f64,
            (None, None) => 0.0,
        };
        if (0.0..=100.0).contains(&value) {
            // Millionths, as Envoy counts them.
            Ok((value * 10_000.0).round() as u32)
        } else {
            Err(format!(
                "fault.{field}.percentage: {value} is not from 0 to 100"
            ))
        }
    };
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let Some(IstioDuration(t)) = d.fixed_delay else {
                return Err("fault.delay.fixedDelay: required".to_owned());
            };
            if t < std::time::Duration::from_millis(1) {
                return Err(format!(
                    "fault.delay.fixedDelay: {t:?} is under 1ms, Istio's least"
                ));
            }
            Some((t, share("delay", d.percentage.as_ref(), d.percent)?))
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let how = match (a.http_status, &a.grpc_status, &a.http2_error) {
                (Some(s), None, None) => Abort::Http(
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .ok_or_else(|| {
                            format!("fault.abort.httpStatus: {s} is not from 200 to 599")
                        })?,
                ),
                (None, Some(g), None) => Abort::Grpc(grpc_code(g).ok_or_else(|| {
                    format!("fault.abort.grpcStatus: `{g}` is not a gRPC status")
                })?),
                (None, None, Some(_)) => {
                    return Err(
                        "fault.abort.http2Error: not supported, as in Istio (use httpStatus)"
                            .to_owned(),
                    );
                }
                (None, None, None) => {
                    return Err("fault.abort: needs an httpStatus or a grpcStatus".to_owned());
                }
                _ => {
                    return Err(
                        "fault.abort: one of httpStatus, grpcStatus and http2Error, not several"
                            .to_owned(),
                    );
                }
            };
            Some((how, share("abort", a.percentage.as_ref(), None)?))
        }
    };
    Ok(Fault { delay, abort })
}

/// A gRPC status code by its name, as Istio's `grpcStatus` names it.
fn grpc_code(name: &str) -> Option<u8> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    CODES.iter().position(|c| *c == name).map(|i| i as u8)
}

/// A route's `directResponse` or `redirect`, checked as Istio checks them.
fn local_answer(r: &HttpRoute) -> Result<Option<LocalAnswer>, String> {
    match (&r.direct_response, &r.redirect) {
        (Some(_), Some(_)) => {
            Err("directResponse: a route has a redirect or a direct response, not both".to_owned())
        }
        (Some(d), None) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| {
                    format!("directResponse.status: {} is not from 200 to 599", d.status)
                })?;
            let body = d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .unwrap_or_default();
            Ok(Some(LocalAnswer::Direct { status, body }))
        }
        (None, Some(rd)) => {
            let status = match rd.redirect_code {
                None => 301,
                Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
                Some(c) => {
                    return Err(format!(
                        "redirect.redirectCode: {c} is not a redirect status"
                    ));
                }
            };
            if let Some(a) = &rd.authority
                && a.parse::<http::uri::Authority>().is_err()
            {
                return Err(format!("redirect.authority: `{a}` is not a host"));
            }
            if let Some(u) = &rd.uri
                && !(u.starts_with('/') && u.parse::<http::uri::PathAndQuery>().is_ok())
            {
                return Err(format!("redirect.uri: `{u}` is not a path"));
            }
            if let Some(s) = &rd.scheme
                && !matches!(s.as_str(), "http" | "https")
            {
                return Err(format!("redirect.scheme: `{s}` is not http or https"));
            }
            Ok(Some(LocalAnswer::Redirect {
                status,
                scheme: rd.scheme.clone(),
                authority: rd.authority.clone(),
                port: rd.port.map(|p| p.0),
                uri: rd.uri.clone(),
            }))
        }
        (None, None) => Ok(None),
    }
}

/// Header operations compiled onto `to`: removes, sets, adds. Names and values must be valid
/// HTTP/1.1 fields; `Host` and framing headers are the relay's to set.
fn header_ops(ops: &HeaderOperations, to: &mut Vec<HeaderOp>) -> Result<(), String> {
    let name = |field: &str, n: &str| {
        let name = http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("{field}: `{n}` is not a header name"))?;
        if [
            http::header::HOST,
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
            http::header::CONNECTION,
        ]
        .contains(&name)
        {
            return Err(format!("{field}: `{n}` is not a header egress sets"));
        }
        Ok(name)
    };
    let value = |field: &str, n: &str, v: &str| {
        http::HeaderValue::from_str(v).map_err(|_| format!("{field}.{n}: not a header value"))
    };
    for n in &ops.remove {
        to.push(HeaderOp::Remove(name("remove", n)?));
    }
    for (n, v) in &ops.set {
        to.push(HeaderOp::Set(name("set", n)?, value("set", n, v)?));
    }
    for (n, v) in &ops.add {
        to.push(HeaderOp::Add(name("add", n)?, value("add", n, v)?));
    }
    Ok(())
}

/// A StringMatch: none set is `None` (any text; a header's presence).
fn string_match(sm: &StringMatch) -> Result<Option<Text>, String> {
    match (&sm.exact, &sm.prefix, &sm.regex) {
        (None, None, None) => Ok(None),
        (Some(e), None, None) => Ok(Some(Text::Exact(e.clone()))),
        (None, Some(p), None) => Ok(Some(Text::Prefix(p.clone()))),
        (None, None, Some(r)) => regex::Regex::new(&format!("^(?:{r})$"))
            .map(|r| Some(Text::Regex(r)))
            .map_err(|e| format!("regex `{r}`: {e}")),
        _ => Err("set one of exact, prefix and regex".to_owned()),
    }
}

/// The retries and timeout of an HTTP route, as the relay applies them.
fn relay_route(
    vs: &Resource<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
    diags: &mut Diags,
) -> RelayRoute {
    let retries = retries(r);
    let retry_on = match retries.and_then(|x| x.retry_on.as_deref()) {
        Some(list) => {
            let (on, unknown) = RetryOn::parse(list);
            if !unknown.is_empty() {
                diag(
                    diags,
                    Severity::Warning,
                    &vs.source,
                    format!(
                        "{}: spec.http[{i}].retries.retryOn: `{}` not understood; ignored",
                        vs.label(),
                        unknown.join("`, `")
                    ),
                );
            }
            on
        }
        None => RetryOn::default(),
    };
    RelayRoute {
        retries: retries.and_then(|x| x.attempts).unwrap_or(0),
        per_try_timeout: retries.and_then(|x| nonzero(x.per_try_timeout.as_ref())),
        timeout: nonzero(r.timeout.as_ref()),
        retry_on,
    }
}

/// As in Envoy, a zero timeout is no timeout (Istio documents `timeout: 0s` to disable one).
fn nonzero(d: Option<&IstioDuration>) -> Option<std::time::Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}

/// A route's retries as Istio applies them: with `attempts` 0 or unset it turns the whole retry
/// policy off, its perTryTimeout included.
fn retries(r: &HttpRoute) -> Option<&Retries> {
    r.retries.as_ref().filter(|x| x.attempts.unwrap_or(0) > 0)
}

/// Whether a route's retries or timeout do anything, and so call for the relay.
fn retries_or_timeout(r: &HttpRoute) -> bool {
    retries(r).is_some() || nonzero(r.timeout.as_ref()).is_some()
}

/// The ports of a ServiceEntry on which its DestinationRule (`destination_rule`) asks for TLS
/// origination. A port-level `tls` overrides the rule-wide one, as in Istio. The certificate is
/// verified against the TLS settings' `subjectAltNames`, else the ServiceEntry's, else the host.
fn originations(
    policy: &Policy,
    se: &Resource<ServiceEntrySpec>,
    hosts: &[String],
    steered: &[SteeredPort],
    diags: &mut Diags,
) -> Vec<Origination> {
    let spec = &se.spec;
    let (out, asked) = destination_rule(policy, hosts)
        .map(|dr| originations_of(policy, hosts, dr, se, steered, diags))
        .unwrap_or_default();
    if !spec.subject_alt_names.is_empty() && !asked {
        diag(
            diags,
            Severity::Warning,
            &se.source,
            format!(
                "{}: spec.subjectAltNames are checked where egress originates TLS (a \
                 DestinationRule with tls mode SIMPLE or MUTUAL on an HTTP port), and it does not \
                 for these hosts: their clients verify their own TLS",
                se.label()
            ),
        );
    }
    out
}

/// Also says whether TLS origination was asked for on any port, well formed or not.
fn originations_of(
    policy: &Policy,
    hosts: &[String],
    dr: &Resource<DestinationRuleSpec>,
    se: &Resource<ServiceEntrySpec>,
    steered: &[SteeredPort],
    diags: &mut Diags,
) -> (Vec<Origination>, bool) {
    let spec = &se.spec;
    let mut asked = false;
    // Read once, however many ports use them: an error is told once.
    let mut se_names: Option<Result<Vec<AltName>, ()>> = None;
    let label = dr.label();
    let mut out = Vec::new();
    for port in &spec.ports {
        // Requests an egress gateway sends on to another port take that port's TLS.
        let onward = steered
            .iter()
            .find(|s| s.port == port.number.0)
            .and_then(|s| s.onward);
        let at = onward.unwrap_or(port.number.0);
        let layers = layers(dr, port_subset(policy, hosts, port.number.0));
        let Some((tls, _, field)) = setting_at(&layers, at, "tls", TLS) else {
            continue;
        };
        let mode = match tls.mode {
            Some(TlsMode::Simple) => "SIMPLE",
            Some(TlsMode::Mutual) => "MUTUAL",
            _ => continue,
        };
        let mut warn = |message: String| {
            diag(
                diags,
                Severity::Warning,
                &dr.source,
                format!("{label}: {field}: {message}"),
            );
        };
        let protocol = port.protocol.unwrap_or(Protocol::Tcp);
        let http = protocol.is_http();
        // The TLS of a port the gateway sends another port's requests on to is theirs.
        let onward_of_another = steered.iter().any(|s| s.onward == Some(port.number.0));
        if !http && onward_of_another {
            continue;
        }
        if !http {
            warn(format!(
                "egress originates TLS for HTTP ports only; port {} ({protocol:?}) is relayed as the client sends it",
                port.number.0
            ));
            continue;
        }
        if tls.insecure_skip_verify == Some(true) {
            warn(
                "insecureSkipVerify is ignored: egress always verifies the upstream's certificate"
                    .to_owned(),
            );
        }
        asked = true;
        // As Istio: the ServiceEntry's names where the TLS settings list none.
        let alt = if tls.subject_alt_names.is_empty() {
            se_names
                .get_or_insert_with(|| {
                    alt_names(&spec.subject_alt_names, "spec.subjectAltNames").map_err(|e| {
                        diag(
                            diags,
                            Severity::Error,
                            &se.source,
                            format!("{}: {e}", se.label()),
                        );
                    })
                })
                .clone()
        } else {
            alt_names(&tls.subject_alt_names, &format!("{field}.subjectAltNames")).map_err(|e| {
                diag(diags, Severity::Error, &dr.source, format!("{label}: {e}"));
            })
        };
        let Ok(alt) = alt else {
            continue;
        };
        let alt_from = if tls.subject_alt_names.is_empty() {
            "the ServiceEntry's subjectAltNames"
        } else {
            "the DestinationRule's subjectAltNames"
        };
        match client_config(tls, alt.clone(), &field, &dr.source.file) {
            Ok(client) => out.push(Origination {
                port: port.number.0,
                target_port: onward.unwrap_or(port.target_port.unwrap_or(port.number).0),
                tls: Some(OriginTls {
                    mode,
                    sni: tls.sni.as_deref().map(normalize_host),
                    alt_names: alt,
                    alt_from,
                    client_h2: client.for_h2(),
                    by: format!("{label} {field}"),
                    client,
                }),
            }),
            Err(e) => diag(diags, Severity::Error, &dr.source, format!("{label}: {e}")),
        }
    }
    (out, asked)
}

/// Where a DestinationRule's setting is: in the traffic policy, and in a port's.
type Where<S> = (
    fn(&TrafficPolicy) -> Option<&S>,
    fn(&PortTrafficPolicy) -> Option<&S>,
);

/// A setting of a ServiceEntry's DestinationRule (`destination_rule`) by port, `name` in a traffic
/// policy (`rule_wide`) or a port's (`at_port`), which replaces it, as in Istio; the policy of
/// the subset a port's route sends to before the rule's own (`setting_at`). Each setting is
/// compiled once by `compile`, which names the fields set that egress does not apply, whether
/// a port takes it or not. The relay applies them to steered connections; on a port that is not
/// steered they do nothing, and say so.
#[expect(
    clippy::too_many_arguments,
    reason = "the rule, and where the setting is and how it compiles"
)]
fn per_port<S, T: Clone>(
    policy: &Policy,
    spec: &ServiceEntrySpec,
    hosts: &[String],
    steered: &[SteeredPort],
    diags: &mut Diags,
    name: &str,
    place: Where<S>,
    compile: impl Fn(&S, &str) -> Result<(T, Vec<&'static str>), String>,
) -> Vec<(u16, T)> {
    let (rule_wide, at_port) = place;
    let Some(dr) = destination_rule(policy, hosts) else {
        return Vec::new();
    };
    let label = dr.label();
    let mut warn = |severity, message: String| {
        diag(diags, severity, &dr.source, format!("{label}: {message}"));
    };
    // Every policy of the rule: its own (0) and its subsets' (k + 1), as `layers` numbers them.
    let policies = dr
        .spec
        .traffic_policy
        .iter()
        .map(|tp| (0, tp, "spec.trafficPolicy".to_owned()))
        .chain(dr.spec.subsets.iter().enumerate().filter_map(|(k, s)| {
            let tp = s.traffic_policy.as_ref()?;
            Some((k + 1, tp, format!("spec.subsets[{k}].trafficPolicy")))
        }));
    // Each setting once, however many ports take it.
    let mut settings = Vec::new();
    for (layer, tp, field) in policies {
        if let Some(set) = rule_wide(tp) {
            settings.push(((layer, None), format!("{field}.{name}"), set));
        }
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            if let Some(set) = at_port(pl) {
                let field = format!("{field}.portLevelSettings[{i}].{name}");
                settings.push(((layer, Some(i)), field, set));
            }
        }
    }
    if settings.is_empty() {
        return Vec::new();
    }
    if steered.is_empty() {
        warn(
            Severity::Warning,
            format!(
                "{name} applies to connections through the relay; this host's go direct (route \
                 them to an egress gateway to apply it)"
            ),
        );
        return Vec::new();
    }
    let mut compiled = Vec::new();
    for (at, field, set) in &settings {
        match compile(set, &label) {
            Ok((set, unapplied)) => {
                for name in unapplied {
                    warn(
                        Severity::Warning,
                        format!("{field}.{name} is not applied by egress; ignored"),
                    );
                }
                compiled.push((*at, set));
            }
            Err(e) => warn(Severity::Error, format!("{field}: {e}")),
        }
    }
    let mut out = Vec::new();
    let mut direct = Vec::new();
    for port in &spec.ports {
        let n = port.number.0;
        let layers = layers(dr, port_subset(policy, hosts, n));
        let Some((_, at, _)) = setting_at(&layers, n, name, place) else {
            continue;
        };
        // A setting that did not compile is told as an error: the plan is not used.
        let Some((_, set)) = compiled.iter().find(|(a, _)| *a == at) else {
            continue;
        };
        if !steered.iter().any(|s| s.port == n) {
            direct.push(n.to_string());
            continue;
        }
        out.push((n, set.clone()));
    }
    if !direct.is_empty() {
        warn(
            Severity::Warning,
            format!(
                "{name} applies to connections through the relay; this host's port(s) {} go \
                 direct",
                direct.join(", ")
            ),
        );
    }
    out
}

/// One `outlierDetection` compiled, with Envoy's defaults where Istio leaves them to it.
fn outlier_detection(
    od: &OutlierDetection,
    label: &str,
) -> Result<(Outliers, Vec<&'static str>), String> {
    let at_least_1ms = |field: &str, d: Option<IstioDuration>| match d {
        Some(IstioDuration(d)) if d < std::time::Duration::from_millis(1) => {
            Err(format!("{field} {d:?} is under 1ms, Istio's least"))
        }
        other => Ok(other.map(|d| d.0)),
    };
    let interval = at_least_1ms("interval", od.interval)?;
    let base = at_least_1ms("baseEjectionTime", od.base_ejection_time)?;
    let percent = |field: &str, value: Option<i64>, default: u32| match value {
        None => Ok(default),
        Some(n @ 0..=100) => Ok(n as u32),
        Some(n) => Err(format!("{field} {n} is not from 0 to 100")),
    };
    let max_ejection_percent = percent("maxEjectionPercent", od.max_ejection_percent, 10)?;
    let min_health_percent = percent("minHealthPercent", od.min_health_percent, 0)?;
    Ok((
        Outliers {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
            base_ejection: base.unwrap_or(std::time::Duration::from_secs(30)),
            interval: interval.unwrap_or(std::time::Duration::from_secs(10)),
            max_ejection_percent,
            min_health_percent,
            split_local: od.split_external_local_origin_errors.unwrap_or(false),
            consecutive_local: od.consecutive_local_origin_failures.unwrap_or(5),
            by: label.to_owned(),
        },
        Vec::new(),
    ))
}

/// One `loadBalancer` compiled.
fn load_balancer(
    lb: &LoadBalancerSettings,
    label: &str,
) -> Result<(Balance, Vec<&'static str>), String> {
    let hash = match &lb.consistent_hash {
        None => None,
        Some(_) if lb.simple.is_some() => {
            return Err("simple and consistentHash: only one of them may be set".to_owned());
        }
        Some(ch) => Some(hash_on(ch)?),
    };
    let policy = match lb.simple {
        None if hash.is_some() => Balancing::Hash,
        None | Some(SimpleLb::Unspecified) => Balancing::Dialled,
        Some(SimpleLb::RoundRobin) => Balancing::RoundRobin,
        Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) => Balancing::LeastRequest,
        Some(SimpleLb::Random) => Balancing::Random,
        Some(SimpleLb::Passthrough) => Balancing::Passthrough,
    };
    // Its other fields are named by the loader.
    Ok((
        Balance {
            policy,
            hash,
            by: label.to_owned(),
        },
        Vec::new(),
    ))
}

/// A `consistentHash`'s one hash key, checked as Istio checks it.
fn hash_on(ch: &ConsistentHashLb) -> Result<HashOn, String> {
    let mut keys = Vec::new();
    if let Some(name) = &ch.http_header_name {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("consistentHash.httpHeaderName: `{name}` is not a header name"))?;
        keys.push(HashOn::Header(name));
    }
    if let Some(c) = &ch.http_cookie {
        if c.name.is_empty() {
            return Err("consistentHash.httpCookie.name: required".to_owned());
        }
        keys.push(HashOn::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.map(|d| d.0).filter(|d| !d.is_zero()),
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashOn::SourceIp);
    }
    if let Some(name) = &ch.http_query_parameter_name {
        keys.push(HashOn::Query(name.clone()));
    }
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 => Err(
            "consistentHash: no hash key (httpHeaderName, httpCookie, useSourceIp or \
                  httpQueryParameterName)"
                .to_owned(),
        ),
        _ => Err("consistentHash: more than one hash key; Istio takes one".to_owned()),
    }
}

/// One `connectionPool` compiled; with the names of the fields set that egress does not apply.
fn connection_pool(
    pool: &ConnectionPoolSettings,
    label: &str,
) -> Result<(ConnectionPool, Vec<&'static str>), String> {
    let unapplied = Vec::new();
    let mut compiled = ConnectionPool {
        by: label.to_owned(),
        ..ConnectionPool::default()
    };
    if let Some(http) = &pool.http {
        // Istio: 0 is unset, which Envoy takes as 2^31 - 1.
        compiled.max_concurrent_streams = match http.max_concurrent_streams {
            None | Some(0) => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                format!("http.maxConcurrentStreams {n} is not a count of requests")
            })?),
        };
        compiled.http_idle_timeout = http.idle_timeout.map(|d| d.0);
        // The client's protocol wins, as in Istio; else HTTP/1.1 goes on as HTTP/2 if asked.
        compiled.h2_upgrade = match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT" | "DO_NOT_UPGRADE") => false,
            Some("UPGRADE") => http.use_client_protocol != Some(true),
            Some(other) => {
                return Err(format!(
                    "http.h2UpgradePolicy {other} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"
                ));
            }
        };
        // Istio: 0 is unset, which Envoy takes as 2^32 - 1.
        compiled.max_pending_requests = match http.http1_max_pending_requests {
            None | Some(0) => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                format!("http.http1MaxPendingRequests {n} is not a count of requests")
            })?),
        };
        // Istio: 0 is unset, which Envoy takes as 2^32 - 1.
        compiled.max_active_requests = match http.http2_max_requests {
            None | Some(0) => None,
            Some(n) => Some(
                u32::try_from(n)
                    .map_err(|_| format!("http.http2MaxRequests {n} is not a count of requests"))?,
            ),
        };
        // Istio: 0 is unset, which Envoy takes as 2^32 - 1.
        compiled.max_retries = match http.max_retries {
            None | Some(0) => None,
            Some(n) => Some(
                u32::try_from(n)
                    .map_err(|_| format!("http.maxRetries {n} is not a count of retries"))?,
            ),
        };
        // Istio: 0 is unlimited.
        compiled.max_requests_per_connection = match http.max_requests_per_connection {
            None | Some(0) => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                format!("http.maxRequestsPerConnection {n} is not a count of requests")
            })?),
        };
    }
    let Some(tcp) = &pool.tcp else {
        return Ok((compiled, unapplied));
    };
    // Istio: 0 is unset, which Envoy takes as 2^32 - 1.
    let max_connections = match tcp.max_connections {
        None | Some(0) => None,
        Some(n) => Some(
            u32::try_from(n)
                .map_err(|_| format!("tcp.maxConnections {n} is not a count of connections"))?,
        ),
    };
    let connect_timeout = match tcp.connect_timeout {
        Some(IstioDuration(d)) if d < std::time::Duration::from_millis(1) => {
            return Err(format!(
                "tcp.connectTimeout {d:?} is under 1ms, Istio's least"
            ));
        }
        other => other.map(|d| d.0),
    };
    let keepalive = tcp.tcp_keepalive.as_ref().map(|k| Keepalive {
        time: k.time.map(|d| d.0),
        interval: k.interval.map(|d| d.0),
        probes: k.probes,
    });
    if let Some(k) = &keepalive {
        // The kernel's bounds (TCP_KEEPIDLE, TCP_KEEPINTVL: 1 to 32767 s; TCP_KEEPCNT: 1 to 127).
        let seconds = 1..=32767;
        for (name, d) in [("time", k.time), ("interval", k.interval)] {
            if let Some(d) = d
                && (!seconds.contains(&d.as_secs()) || d.subsec_nanos() != 0)
            {
                return Err(format!(
                    "tcp.tcpKeepalive.{name} {d:?} is not a whole number of seconds from 1 to 32767"
                ));
            }
        }
        if let Some(p) = k.probes
            && !(1..=127).contains(&p)
        {
            return Err(format!("tcp.tcpKeepalive.probes {p} is not from 1 to 127"));
        }
    }
    Ok((
        ConnectionPool {
            max_connections,
            connect_timeout,
            idle_timeout: tcp.idle_timeout.map(|d| d.0),
            keepalive,
            // Istio: 0s is none.
            max_connection_duration: tcp
                .max_connection_duration
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            ..compiled
        },
        unapplied,
    ))
}

impl RuleInfo {
    /// Why connections to `port` are steered, if they are.
    pub fn steer_reason(&self, port: u16) -> Option<&str> {
        self.steered
            .iter()
            .find(|s| s.port == port)
            .map(|s| s.why.as_str())
    }
}

impl Plan {
    pub fn rule(&self, rule_id: u32) -> Option<&RuleInfo> {
        self.rules.iter().find(|r| r.id == rule_id)
    }

    /// Human label for a rule id, built-in ones included.
    pub fn rule_label(&self, rule_id: u32) -> String {
        match rule_id {
            RULE_MODE => format!("mode {} ({})", self.mode, self.mode_source),
            RULE_LOOPBACK => "loopback (not egress)".to_owned(),
            RULE_RESOLVER => "configured DNS resolver".to_owned(),
            id => self
                .rule(id)
                .map_or_else(|| format!("rule #{id}"), |r| r.label.clone()),
        }
    }

    /// The kernel map's content: fixed entries, resolved hosts and the resolvers. Where two rules
    /// claim one key, steer wins over allow, so a shared address is never a way around the relay.
    pub fn entries(
        &self,
        resolved: &HashMap<String, Vec<IpAddr>>,
        resolvers: &[SocketAddr],
    ) -> BTreeMap<(u32, PolicyKey), PolicyValue> {
        let mut out = BTreeMap::new();
        let mut put = |net: IpNet, port: u16, transport: Transport, verdict: Verdict, rule_id| {
            // The relay speaks TCP: a steered host's UDP ports are allowed directly.
            let verdict = match (verdict, transport) {
                (Verdict::Steer, Transport::Udp) => Verdict::Allow,
                _ => verdict,
            };
            let key = lpm_key(net, port, transport);
            let value = PolicyValue {
                verdict: verdict as u32,
                rule_id,
            };
            out.entry(key)
                .and_modify(|v: &mut PolicyValue| {
                    if verdict == Verdict::Steer && v.verdict != Verdict::Steer as u32 {
                        *v = value;
                    }
                })
                .or_insert(value);
        };
        for e in &self.fixed {
            put(e.net, e.port, e.transport, e.verdict, e.rule_id);
        }
        for h in &self.hosts {
            for ip in resolved.get(&h.name).into_iter().flatten() {
                for &(port, transport, verdict) in &h.ports {
                    put(IpNet::from(*ip), port, transport, verdict, h.rule_id);
                }
            }
        }
        for r in resolvers {
            for t in [Transport::Udp, Transport::Tcp] {
                put(
                    IpNet::from(r.ip()),
                    r.port(),
                    t,
                    Verdict::Allow,
                    RULE_RESOLVER,
                );
            }
        }
        out
    }

    /// The decision for a destination no entry matches: the mode's.
    pub fn fallback(&self) -> Decision {
        Decision {
            verdict: self.mode.kernel().fallback(),
            rule_id: RULE_MODE,
        }
    }

    /// The kernel's decision, made in userspace over `entries`: loopback, longest prefix among
    /// entries of the same protocol and port, then the mode.
    pub fn decide(
        &self,
        entries: &BTreeMap<(u32, PolicyKey), PolicyValue>,
        ip: IpAddr,
        port: u16,
        transport: Transport,
    ) -> Decision {
        let addr = mapped(ip);
        if is_local(&addr) {
            return Decision {
                verdict: Verdict::Allow,
                rule_id: RULE_LOOPBACK,
            };
        }
        let best = entries
            .iter()
            .filter(|((_, k), _)| k.proto == transport as u8 && k.port_be == port.to_be())
            .filter(|((bits, k), _)| prefix_contains(&k.addr, bits - KEY_FIXED_BITS, &addr))
            .max_by_key(|((bits, _), _)| *bits);
        match best {
            Some((_, v)) => Decision {
                verdict: Verdict::from_u32(v.verdict).unwrap_or(Verdict::Deny),
                rule_id: v.rule_id,
            },
            None => self.fallback(),
        }
    }
}

/// An address in the kernel's form: IPv4 mapped into IPv6.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The LPM key (prefix length in bits, data) for a network, port and transport.
pub fn lpm_key(net: IpNet, port: u16, transport: Transport) -> (u32, PolicyKey) {
    let (addr, bits) = match net {
        IpNet::V4(n) => (
            n.network().to_ipv6_mapped().octets(),
            96 + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    };
    (
        KEY_FIXED_BITS + bits,
        PolicyKey {
            proto: transport as u8,
            pad: 0,
            port_be: port.to_be(),
            addr,
        },
    )
}

fn prefix_contains(net: &[u8; 16], bits: u32, addr: &[u8; 16]) -> bool {
    let a = u128::from_be_bytes(*net);
    let b = u128::from_be_bytes(*addr);
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    a & mask == b & mask
}
