//! The Istio resources egress reads, as Istio documents them (networking.istio.io v1alpha3,
//! v1beta1 and v1 share these shapes). Fields egress does not act on are still declared, as
//! `IgnoredAny`, so that only truly unknown fields produce warnings.
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny},
};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    pub location: Option<MeshLocation>,
    pub resolution: Option<Resolution>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<IgnoredAny>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: PortNumber,
    pub protocol: Option<Protocol>,
    pub name: Option<String>,
    pub target_port: Option<PortNumber>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MeshLocation {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, PortNumber>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub network: Option<IgnoredAny>,
    pub locality: Option<IgnoredAny>,
    pub weight: Option<IgnoredAny>,
    pub service_account: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    pub workload_selector: Option<IgnoredAny>,
    pub ingress: Option<IgnoredAny>,
    pub egress: Option<IgnoredAny>,
    pub inbound_connection_pool: Option<IgnoredAny>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    pub mode: Option<OutboundMode>,
    pub egress_proxy: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    AllowAny,
    RegistryOnly,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    pub port: GatewayPort,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<IgnoredAny>,
    pub bind: Option<IgnoredAny>,
    pub name: Option<String>,
    pub default_endpoint: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPort {
    pub number: PortNumber,
    pub name: Option<String>,
    pub protocol: Option<Protocol>,
    pub target_port: Option<PortNumber>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub retries: Option<Retries>,
    pub timeout: Option<IstioDuration>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<IgnoredAny>,
    pub rewrite: Option<HttpRewrite>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<Destination>,
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<Percent>,
    pub cors_policy: Option<IgnoredAny>,
    pub headers: Option<Headers>,
}

/// One of `mirrors`: where a copy of a share of the requests goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// `fault`: requests delayed or aborted before they are sent on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<IstioDuration>,
    pub percentage: Option<Percent>,
    /// Deprecated in Istio for `percentage`; read where that is unset, as Istio did.
    pub percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<IgnoredAny>,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<PortNumber>,
    pub derive_port: Option<IgnoredAny>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `uriRegexRewrite`: what of the path is replaced, and with what (`\1` a capture group).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    pub rewrite: Option<String>,
}

/// Istio's header operations, on the request sent upstream and the response sent back.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    pub name: Option<String>,
    pub port: Option<PortNumber>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: Option<bool>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_labels: Option<IgnoredAny>,
    pub source_namespace: Option<IgnoredAny>,
    pub stat_prefix: Option<IgnoredAny>,
}

/// Istio's StringMatch: one of `exact`, `prefix` and `regex` (RE2, matched whole); none set, on a
/// header, asks for the header's presence.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    pub attempts: Option<u32>,
    pub per_try_timeout: Option<IstioDuration>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<TlsMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    pub port: Option<PortNumber>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<Cidr>,
    pub source_labels: Option<IgnoredAny>,
    pub source_namespace: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    pub port: Option<PortNumber>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<Cidr>,
    pub source_labels: Option<IgnoredAny>,
    pub source_namespace: Option<IgnoredAny>,
    pub source_subnet: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i32>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: Option<PortNumber>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tunnel: Option<IgnoredAny>,
    pub proxy_protocol: Option<IgnoredAny>,
    pub retry_budget: Option<IgnoredAny>,
}

/// `loadBalancer`. The fields egress does not apply are read whole, as unapplied ones are named
/// by the loader.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHashLb>,
    pub locality_lb_setting: Option<IgnoredAny>,
    pub warmup_duration_secs: Option<IgnoredAny>,
    pub warmup: Option<IgnoredAny>,
}

/// `loadBalancer.consistentHash`: one hash key. The hash's table settings are read whole, as
/// unapplied ones are named by the loader.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashLb {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<IgnoredAny>,
    pub maglev: Option<IgnoredAny>,
    pub minimum_ring_size: Option<IgnoredAny>,
}

/// `consistentHash.httpCookie`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<IstioDuration>,
}

/// `loadBalancer.simple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    /// Istio's deprecated name for `LEAST_REQUEST`.
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

/// `outlierDetection`. The fields egress does not apply are read whole, as unapplied ones are
/// named by the loader.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<IstioDuration>,
    pub base_ejection_time: Option<IstioDuration>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
    pub consecutive_errors: Option<IgnoredAny>,
    pub split_external_local_origin_errors: Option<bool>,
    pub consecutive_local_origin_failures: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub tls: Option<ClientTls>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
}

/// A DestinationRule's `connectionPool`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

/// `connectionPool.http`. The fields egress does not apply are read whole (not as ignored
/// fields, which would be reported as unknown) so that the compiler names them itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    pub idle_timeout: Option<IstioDuration>,
    pub max_requests_per_connection: Option<i64>,
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_retries: Option<i64>,
    pub h2_upgrade_policy: Option<String>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<IstioDuration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<IstioDuration>,
    pub idle_timeout: Option<IstioDuration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<IstioDuration>,
    pub interval: Option<IstioDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: Option<TlsMode>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// A TCP/UDP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortNumber(pub u16);

// Checks run inside the visitor, so an error is raised while the value's own node is being read
// and carries that node's position, not its parent's.
impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortNumber;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortNumber, E> {
                match u16::try_from(n) {
                    Ok(p) if p != 0 => Ok(PortNumber(p)),
                    _ => Err(E::custom(format!("port {n} is out of range (1-65535)"))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortNumber, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_i64(V)
    }
}

/// Reads a string and parses it with `FromStr`, inside the visitor (see above).
fn parse_str<'de, D: Deserializer<'de>, T: FromStr<Err = String>>(d: D) -> Result<T, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<T: FromStr<Err = String>> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            s.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(std::marker::PhantomData))
}

/// A port's application protocol, as Istio names them (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    Tls,
    Tcp,
    Mongo,
    Redis,
    Mysql,
    Udp,
}

/// Transport protocol, with its IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp = 6,
    Udp = 17,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

impl Protocol {
    /// Whether its requests are HTTP (1.1 or 2), which the relay can serve and route.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Every protocol Istio names runs over TCP, except UDP.
    pub fn transport(self) -> Transport {
        match self {
            Protocol::Udp => Transport::Udp,
            _ => Transport::Tcp,
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTPS" => Protocol::Https,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "GRPC-WEB" => Protocol::GrpcWeb,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "MONGO" => Protocol::Mongo,
            "REDIS" => Protocol::Redis,
            "MYSQL" => Protocol::Mysql,
            "UDP" => Protocol::Udp,
            _ => {
                return Err(format!(
                    "unknown protocol `{s}` (expected HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS, TCP, MONGO, REDIS, MYSQL or UDP)"
                ));
            }
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d)
    }
}

/// An IP address or CIDR block; a bare address is a host prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Cidr(IpNet::from(ip)));
        }
        match s.parse::<IpNet>() {
            // Host bits set (10.0.0.1/8) are almost always a typo for something else.
            Ok(net) if net.trunc() != net => Err(format!(
                "`{s}` has host bits set; did you mean {}?",
                net.trunc()
            )),
            Ok(net) => Ok(Cidr(net)),
            Err(_) => Err(format!("`{s}` is not an IP address or CIDR block")),
        }
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d)
    }
}

/// A duration as Istio writes them: `5s`, `250ms`, `1.5s`, `2m`, `1h`, `100us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioDuration(pub Duration);

impl FromStr for IstioDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration `{s}` has no unit (use ms, s, m or h)"))?;
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration"))?;
        let secs = match unit {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1e3,
            "us" | "µs" => value / 1e6,
            "ns" => value / 1e9,
            _ => return Err(format!("duration `{s}` has unknown unit `{unit}`")),
        };
        Duration::try_from_secs_f64(secs)
            .map(IstioDuration)
            .map_err(|_| format!("duration `{s}` is out of range"))
    }
}

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("2s".parse(), Ok(IstioDuration(Duration::from_secs(2))));
        assert_eq!(
            "250ms".parse(),
            Ok(IstioDuration(Duration::from_millis(250)))
        );
        assert_eq!("1m".parse(), Ok(IstioDuration(Duration::from_secs(60))));
        assert!("5".parse::<IstioDuration>().is_err());
        assert!("5x".parse::<IstioDuration>().is_err());
    }

    #[test]
    fn cidrs() {
        assert!("10.0.0.0/8".parse::<Cidr>().is_ok());
        assert!("2001:db8::1".parse::<Cidr>().is_ok());
        assert!("10.0.0.1/8".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
    }

    #[test]
    fn protocols_map_to_transports() {
        for p in ["HTTP", "https", "TLS", "TCP", "GRPC", "HTTP2", "MONGO"] {
            assert_eq!(
                p.parse::<Protocol>().map(Protocol::transport),
                Ok(Transport::Tcp)
            );
        }
        assert_eq!(
            "UDP".parse::<Protocol>().map(Protocol::transport),
            Ok(Transport::Udp)
        );
        assert!("QUIC".parse::<Protocol>().is_err());
    }
}
