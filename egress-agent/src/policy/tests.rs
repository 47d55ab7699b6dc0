//! Parsing and compiling: the seeds, every shipped policy, and malformed input of many kinds.
use std::{collections::HashMap, net::IpAddr, path::Path};

use egress_common::Verdict;

use super::{
    Mode, Severity, compile,
    compile::{Carry, HeaderOp},
    load, load_str,
    schema::Transport,
};

/// Every diagnostic for one file: loading, then compiling if loading found no error.
fn diagnostics(yaml: &str) -> Vec<super::Diagnostic> {
    let (pol, mut d) = load_str(yaml, Path::new("p.yaml"));
    if !super::has_errors(&d) {
        d.extend(compile(&pol, None).1);
    }
    d
}

fn diags_of(yaml: &str) -> Vec<String> {
    diagnostics(yaml).iter().map(ToString::to_string).collect()
}

fn errors_of(yaml: &str) -> Vec<String> {
    diagnostics(yaml)
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

const SE: &str =
    "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata:\n  name: x\nspec:\n";

#[test]
fn every_shipped_policy_compiles_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (pol, d) = load(&[dir]);
    let (plan, more) = compile(&pol, None);
    let all: Vec<_> = d.iter().chain(&more).map(ToString::to_string).collect();
    assert!(all.is_empty(), "{all:#?}");
    assert_eq!(
        plan.mode,
        Mode::RegistryOnly,
        "the shipped Sidecar sets REGISTRY_ONLY"
    );
    let labels: Vec<_> = plan.rules.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "ServiceEntry/default/external-api",
            "ServiceEntry/default/legacy-db",
            "ServiceEntry/default/external-weather-api"
        ]
    );
}

#[test]
fn seeds_steer_through_the_gateway_and_for_retries() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (pol, _) = load(&[dir.join("external-api.yaml"), dir.join("weather-api.yaml")]);
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        plan.mode,
        Mode::AllowAny,
        "Istio's default without a Sidecar"
    );
    let reasons: Vec<_> = plan
        .rules
        .iter()
        .map(|r| r.steer_reason(443).unwrap_or_default().to_owned())
        .collect();
    assert!(
        reasons[0].contains(
            "VirtualService/default/route-external routes port 443 to the egress gateway"
        ),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("VirtualService/default/weather-api-vs gives port 443 retries"),
        "{reasons:?}"
    );
    let api: IpAddr = "192.0.2.10".parse().expect("ip");
    let resolved = HashMap::from([("api.thirdparty.com".to_owned(), vec![api])]);
    let entries = plan.entries(&resolved, &[]);
    assert_eq!(
        plan.decide(&entries, api, 443, Transport::Tcp).verdict,
        Verdict::Steer
    );
    // Allow-any: an undeclared port or an unknown address passes.
    assert_eq!(
        plan.decide(&entries, api, 80, Transport::Tcp).verdict,
        Verdict::Allow
    );
}

#[test]
fn registry_only_semantics() {
    let yaml = format!(
        "{SE}  hosts: [db.example, 192.0.2.7]\n  addresses: [198.51.100.0/24, 2001:db8::/64]\n  ports:\n  - {{number: 5432, name: pg, protocol: TCP}}\n  - {{number: 53, name: dns, protocol: UDP}}\n  resolution: NONE\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, Some(Mode::RegistryOnly));
    assert!(d.is_empty(), "{d:?}");
    let e = plan.entries(&HashMap::new(), &["203.0.113.53:53".parse().expect("sa")]);
    let v = |ip: &str, port, t| plan.decide(&e, ip.parse().expect("ip"), port, t).verdict;
    assert_eq!(v("198.51.100.9", 5432, Transport::Tcp), Verdict::Allow);
    assert_eq!(
        v("::ffff:198.51.100.9", 5432, Transport::Tcp),
        Verdict::Allow,
        "mapped v4 is v4"
    );
    assert_eq!(v("198.51.101.9", 5432, Transport::Tcp), Verdict::Deny);
    assert_eq!(
        v("198.51.100.9", 5433, Transport::Tcp),
        Verdict::Deny,
        "undeclared port"
    );
    assert_eq!(
        v("198.51.100.9", 5432, Transport::Udp),
        Verdict::Deny,
        "TCP port over UDP"
    );
    assert_eq!(v("198.51.100.9", 53, Transport::Udp), Verdict::Allow);
    assert_eq!(v("2001:db8::5", 53, Transport::Udp), Verdict::Allow);
    assert_eq!(
        v("192.0.2.7", 5432, Transport::Tcp),
        Verdict::Allow,
        "IP-literal host"
    );
    assert_eq!(
        v("127.0.0.1", 9, Transport::Tcp),
        Verdict::Allow,
        "loopback"
    );
    assert_eq!(v("::1", 9, Transport::Udp), Verdict::Allow, "loopback");
    assert_eq!(
        v("::ffff:127.0.0.2", 9, Transport::Udp),
        Verdict::Allow,
        "mapped loopback"
    );
    assert_eq!(
        v("203.0.113.53", 53, Transport::Udp),
        Verdict::Allow,
        "resolver"
    );
    assert_eq!(
        v("203.0.113.53", 53, Transport::Tcp),
        Verdict::Allow,
        "resolver over TCP"
    );
    assert_eq!(
        v("203.0.113.53", 80, Transport::Tcp),
        Verdict::Deny,
        "resolver, other port"
    );
}

#[test]
fn resolution_none_without_addresses_warns_and_opens_the_port() {
    let yaml = format!(
        "{SE}  hosts: ['*.example.com']\n  ports: [{{number: 443, name: https, protocol: TLS}}]\n"
    );
    let d = diags_of(&yaml);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("p.yaml:1:1: warning: ServiceEntry/default/x: resolution NONE without addresses opens port(s) 443/tcp to every IP"), "{d:?}");
    let (pol, _) = load_str(&yaml, Path::new("p.yaml"));
    let (plan, _) = compile(&pol, Some(Mode::RegistryOnly));
    let e = plan.entries(&HashMap::new(), &[]);
    assert_eq!(
        plan.decide(&e, "203.0.113.1".parse().expect("ip"), 443, Transport::Tcp)
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        plan.decide(&e, "2001:db8::1".parse().expect("ip"), 443, Transport::Tcp)
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        plan.decide(&e, "203.0.113.1".parse().expect("ip"), 80, Transport::Tcp)
            .verdict,
        Verdict::Deny
    );
}

#[test]
fn multi_document_lists_and_api_versions() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.istio.io/v1beta1\n  kind: ServiceEntry\n  metadata: {name: a, namespace: ns1}\n  spec: {hosts: [a.example], ports: [{number: 443, name: h, protocol: HTTPS}], resolution: DNS}\n---\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: b}\nspec: {hosts: [b.example], ports: [{number: 80, name: h, protocol: HTTP}], resolution: DNS_ROUND_ROBIN}\n";
    let (pol, d) = load_str(yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(pol.service_entries.len(), 2);
    assert_eq!(pol.service_entries[0].label(), "ServiceEntry/ns1/a");
    let (plan, _) = compile(&pol, None);
    let names: Vec<_> = plan.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a.example", "b.example"]);
}

#[test]
fn static_endpoints_with_port_mapping() {
    let yaml = format!(
        "{SE}  hosts: [db.internal]\n  ports: [{{number: 5432, name: pg, protocol: TCP}}]\n  resolution: STATIC\n  endpoints:\n  - address: 192.0.2.40\n    ports: {{pg: 6432}}\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, Some(Mode::RegistryOnly));
    assert!(d.is_empty(), "{d:?}");
    let e = plan.entries(&HashMap::new(), &[]);
    let ip: IpAddr = "192.0.2.40".parse().expect("ip");
    assert_eq!(
        plan.decide(&e, ip, 5432, Transport::Tcp).verdict,
        Verdict::Allow
    );
    assert_eq!(
        plan.decide(&e, ip, 6432, Transport::Tcp).verdict,
        Verdict::Allow
    );
    assert_eq!(
        plan.decide(&e, "192.0.2.41".parse().expect("ip"), 5432, Transport::Tcp)
            .verdict,
        Verdict::Deny
    );
}

/// A STATIC entry's address that holds none of its endpoints is a virtual one, which Istio's
/// proxy takes on to the endpoints: its TCP ports are steered, for the relay to do so; the
/// endpoints and an address that holds them go direct.
#[test]
fn a_static_entrys_virtual_address_is_steered() {
    let yaml = "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata:\n  name: x\nspec:\n  hosts: [db.internal]\n  addresses: [240.0.0.10, 10.1.0.0/24]\n  ports: [{number: 5432, name: tcp, protocol: TCP}, {number: 53, name: dns, protocol: UDP}]\n  resolution: STATIC\n  endpoints: [{address: 10.1.0.1}, {address: 10.1.0.2}, {address: 10.2.0.1, ports: {tcp: 6432}}]\n";
    let (pol, d) = load_str(yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, Some(Mode::RegistryOnly));
    assert!(d.is_empty(), "{d:?}");
    let e = plan.entries(&HashMap::new(), &[]);
    let verdict = |ip: &str, port, t| plan.decide(&e, ip.parse().expect("ip"), port, t).verdict;
    assert_eq!(verdict("240.0.0.10", 5432, Transport::Tcp), Verdict::Steer);
    assert_eq!(
        verdict("240.0.0.10", 53, Transport::Udp),
        Verdict::Allow,
        "UDP"
    );
    assert_eq!(verdict("10.1.0.1", 5432, Transport::Tcp), Verdict::Allow);
    assert_eq!(verdict("10.1.0.9", 5432, Transport::Tcp), Verdict::Allow);
    let rule = &plan.rules[0];
    assert_eq!(
        rule.virtual_nets,
        ["240.0.0.10/32".parse::<ipnet::IpNet>().expect("net")]
    );
    assert!(
        rule.steer_reason(5432)
            .is_some_and(|r| r.contains("240.0.0.10/32 hold none of the endpoints")),
        "{rule:?}"
    );
    assert_eq!(
        rule.endpoint_groups
            .iter()
            .map(|g| (g.ips.len(), g.renumbers.clone()))
            .collect::<Vec<_>>(),
        [(2, vec![]), (1, vec![5432])]
    );
}

#[test]
fn unknown_fields_and_kinds_are_warnings_with_positions() {
    let yaml = format!(
        "{SE}  hosts: [a.example]\n  ports:\n  - number: 443\n    nmae: https\n  resolution: DNS\n  colour: blue\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {{}}\n"
    );
    let d = diags_of(&yaml);
    assert_eq!(
        d,
        [
            "p.yaml:9:5: warning: unknown field `spec.ports[0].nmae`; ignored",
            "p.yaml:11:3: warning: unknown field `spec.colour`; ignored",
            "p.yaml:13:1: warning: kind `AuthorizationPolicy` (security.istio.io/v1) is not enforced by egress; ignored",
        ]
    );
    // Istio's own fields that egress does not apply are named as such, where they are.
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [a.example]\n  http:\n  - match:\n    - sourceLabels: {app: shop}\n    route: [{destination: {host: a.example}}]\n    corsPolicy: {allowOrigins: []}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a.example\n  trafficPolicy:\n    proxyProtocol: {version: V1}\n    loadBalancr: {simple: RANDOM}\n";
    assert_eq!(
        diags_of(yaml),
        [
            "p.yaml:8:7: warning: `spec.http[0].match[0].sourceLabels` is not applied by egress; ignored",
            "p.yaml:10:5: warning: `spec.http[0].corsPolicy` is not applied by egress; ignored",
            "p.yaml:18:5: warning: `spec.trafficPolicy.proxyProtocol` is not applied by egress; ignored",
            "p.yaml:19:5: warning: unknown field `spec.trafficPolicy.loadBalancr`; ignored",
        ]
    );
}

#[test]
fn malformed_input_names_file_line_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            "a: [1, 2\n",
            "p.yaml:1:4: error: invalid YAML: unclosed bracket",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{number: 70000}}]\n"),
            "p.yaml:7:20: error: spec.ports[0].number: port 70000 is out of range",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{number: 0}}]\n"),
            "p.yaml:7:20: error: spec.ports[0].number: port 0 is out of range",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{number: 443, protocol: QUIC}}]\n"),
            "p.yaml:7:35: error: spec.ports[0].protocol: unknown protocol `QUIC`",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{number: 443}}]\n  resolution: MAGIC\n"),
            "p.yaml:8:15: error: spec.resolution: unknown variant `MAGIC`",
        ),
        (
            &format!("{SE}  hosts: [a]\n  addresses: [10.0.0.1/8]\n  ports: [{{number: 443}}]\n"),
            "p.yaml:7:15: error: spec.addresses[0]: `10.0.0.1/8` has host bits set",
        ),
        (
            &format!("{SE}  hosts: [a]\n  addresses: [not-an-ip]\n  ports: [{{number: 443}}]\n"),
            "p.yaml:7:15: error: spec.addresses[0]: `not-an-ip` is not an IP address",
        ),
        (
            &format!("{SE}  hosts: a.example\n  ports: [{{number: 443}}]\n"),
            "p.yaml:6:10: error: spec.hosts: expected a list, found a string",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{name: https}}]\n"),
            "p.yaml:7:11: error: spec.ports[0]: missing field `number`",
        ),
        (
            &format!("{SE}  hosts: [a]\n"),
            "p.yaml:1:1: error: ServiceEntry/default/x: spec.ports must declare at least one port",
        ),
        (
            &format!("{SE}  ports: [{{number: 443}}]\n"),
            "p.yaml:1:1: error: ServiceEntry/default/x: spec.hosts must name at least one host",
        ),
        (
            &format!("{SE}  hosts: ['*.a.com']\n  ports: [{{number: 443}}]\n  resolution: DNS\n"),
            "error: ServiceEntry/default/x: host `*.a.com`: a wildcard host cannot use resolution Dns",
        ),
        (
            &format!("{SE}  hosts: [a]\n  ports: [{{number: 443}}]\n  resolution: STATIC\n"),
            "error: ServiceEntry/default/x: resolution STATIC needs spec.endpoints",
        ),
        (
            &format!(
                "{SE}  hosts: [a]\n  ports: [{{number: 443}}]\n  resolution: STATIC\n  endpoints: [{{address: db.example}}]\n"
            ),
            "must be an IP address with resolution Static",
        ),
        (
            "apiVersion: networking.istio.io/v2\nkind: Sidecar\nmetadata: {name: s}\nspec: {}\n",
            "p.yaml:1:13: error: Sidecar needs apiVersion",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: {}\n",
            "p.yaml:1:1: error: ServiceEntry has no metadata.name",
        ),
        (
            "apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n",
            "p.yaml:1:1: error: missing `kind`",
        ),
        (
            "- just\n- a list\n",
            "p.yaml:1:1: error: expected a Kubernetes object",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\nspec:\n  outboundTrafficPolicy: {mode: BLOCK}\n",
            "p.yaml:5:33: error: spec.outboundTrafficPolicy.mode: unknown variant `BLOCK`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  http: [{timeout: 5}]\n",
            "p.yaml:5:20: error: spec.http[0].timeout: duration `5` has no unit",
        ),
        ("a: 1\na: 2\n", "error: invalid YAML"),
        ("a: &x [*x]\n", "error: invalid YAML"),
    ];
    let mut wrong = Vec::new();
    for (yaml, want) in cases {
        let errs = errors_of(yaml);
        if !errs.iter().any(|e| e.contains(want)) {
            wrong.push(format!("for {yaml:?}\n want {want:?}\n got {errs:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn alias_bombs_are_refused() {
    let mut y = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let p = if i == 0 {
            "a".to_owned()
        } else {
            format!("b{}", i - 1)
        };
        y.push_str(&format!(
            "b{i}: &b{i} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        ));
    }
    let errs = errors_of(&y);
    assert!(errs.iter().any(|e| e.contains("invalid YAML")), "{errs:?}");
}

#[test]
fn a_missing_path_is_an_error() {
    let (_, d) = load(&[Path::new("/nonexistent/egress-policies").to_owned()]);
    assert!(
        d[0].to_string()
            .starts_with("/nonexistent/egress-policies: error: cannot read policy path"),
        "{d:?}"
    );
}

#[test]
fn conflicting_sidecars_fail_closed() {
    let s = |name: &str, mode: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}}}\nspec:\n  outboundTrafficPolicy: {{mode: {mode}}}\n"
        )
    };
    let yaml = format!("{}---\n{}", s("a", "ALLOW_ANY"), s("b", "REGISTRY_ONLY"));
    let (pol, _) = load_str(&yaml, Path::new("p.yaml"));
    let (plan, d) = compile(&pol, None);
    assert_eq!(plan.mode, Mode::RegistryOnly);
    assert_eq!(d.len(), 1);
    assert_eq!(
        compile(&pol, Some(Mode::AllowAny)).0.mode,
        Mode::AllowAny,
        "the flag wins"
    );
}

#[test]
fn a_destination_rule_originates_tls_on_http_ports_and_its_files_are_checked() {
    let dir = std::env::temp_dir().join(format!("egress-origination-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("cert");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).expect("write");
    std::fs::write(dir.join("junk.pem"), "not a certificate").expect("write");
    let policy = |mode: &str, ca_file: &str, extra: &str| {
        format!(
            "{SE}  hosts: [api.test]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP, targetPort: 443}}\n  - {{number: 8443, name: tls, protocol: TLS}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api}}\nspec:\n  host: api.test\n  trafficPolicy:\n    tls: {{mode: SIMPLE}}\n    portLevelSettings:\n    - port: {{number: 80}}\n      tls: {{mode: {mode}, caCertificates: {ca_file}, sni: Origin.test{extra}}}\n"
        )
    };
    // Relative to the policy file's directory.
    let file = dir.join("p.yaml");
    let (pol, d) = load_str(&policy("SIMPLE", "ca.pem", ""), &file);
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    let d: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert_eq!(
        d,
        [format!(
            "{}:12:1: warning: DestinationRule/default/api: spec.trafficPolicy.tls: egress originates TLS for HTTP ports only; port 8443 (Tls) is relayed as the client sends it",
            file.display()
        )]
    );
    let rule = &plan.rules[0];
    assert!(
        rule.steer_reason(80)
            .is_some_and(|r| r.contains("originates TLS on port 80"))
    );
    let o: Vec<_> = rule
        .originate
        .iter()
        .map(|o| {
            let tls = o.tls.as_ref().expect("TLS originated");
            (
                o.port,
                o.target_port,
                tls.mode,
                tls.sni.as_deref(),
                tls.by.as_str(),
            )
        })
        .collect();
    assert_eq!(
        o,
        [(
            80,
            443,
            "SIMPLE",
            Some("origin.test"),
            "DestinationRule/default/api spec.trafficPolicy.portLevelSettings[0].tls"
        )]
    );

    for (mode, ca_file, extra, want) in [
        (
            "SIMPLE",
            "missing.pem",
            "",
            "spec.trafficPolicy.portLevelSettings[0].tls.caCertificates: cannot read certificates from",
        ),
        (
            "SIMPLE",
            "junk.pem",
            "",
            "spec.trafficPolicy.portLevelSettings[0].tls.caCertificates: ",
        ),
        (
            "MUTUAL",
            "ca.pem",
            "",
            "mode MUTUAL needs clientCertificate and privateKey",
        ),
        (
            "SIMPLE",
            "ca.pem",
            ", subjectAltNames: ['two words']",
            "tls.subjectAltNames[0]: `two words` is not a DNS name, an IP address or a URI",
        ),
    ] {
        let (pol, d) = load_str(&policy(mode, ca_file, extra), &file);
        assert!(!super::has_errors(&d), "{d:?}");
        let (_, d) = compile(&pol, None);
        let errors: Vec<String> = d
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(ToString::to_string)
            .collect();
        assert!(
            errors.len() == 1
                && errors[0].contains(":12:1: error: DestinationRule/default/api: ")
                && errors[0].contains(want),
            "{ca_file}{extra}: {errors:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Istio verifies an originated connection's certificate against the ServiceEntry's
/// `subjectAltNames` where the DestinationRule's TLS lists none: they are read then (once for
/// both ports), and a name that cannot be checked refuses the policy; where nothing originates
/// TLS they check nothing.
#[test]
fn a_service_entrys_subject_alt_names_are_read_where_tls_is_originated() {
    let dir = std::env::temp_dir().join(format!("egress-se-sans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("cert");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).expect("write");
    let file = dir.join("p.yaml");
    let policy = |sans: &str, dr: &str| {
        format!(
            "{SE}  hosts: [api.test]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}, {{number: 8080, name: alt, protocol: HTTP, targetPort: 443}}]\n  resolution: DNS\n  subjectAltNames: {sans}\n{dr}"
        )
    };
    let dr = |sans: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api}}\nspec:\n  host: api.test\n  trafficPolicy:\n    tls: {{mode: SIMPLE, caCertificates: ca.pem{sans}}}\n"
        )
    };
    let diags = |yaml: String| -> Vec<String> {
        let (pol, d) = load_str(&yaml, &file);
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        if !super::has_errors(&d) {
            assert_eq!(plan.rules.len(), 1);
        }
        d.iter().map(ToString::to_string).collect()
    };
    let at = file.display();
    let checks = [
        // A SPIFFE id, a DNS name and an address, used in place of the host's name.
        (
            policy(
                "['spiffe://example.org/ns/shop/sa/api', api.internal, 10.0.0.1]",
                &dr(""),
            ),
            Vec::new(),
        ),
        (
            policy("['two words']", &dr("")),
            vec![format!(
                "{at}:1:1: error: ServiceEntry/default/x: spec.subjectAltNames[0]: `two words` is not a DNS name, an IP address or a URI"
            )],
        ),
        // The DestinationRule's own names are used: the ServiceEntry's are not read.
        (
            policy("['two words']", &dr(", subjectAltNames: [api.internal]")),
            Vec::new(),
        ),
        (
            policy("['spiffe://example.org/ns/shop/sa/api']", ""),
            vec![format!(
                "{at}:1:1: warning: ServiceEntry/default/x: spec.subjectAltNames are checked where egress originates TLS (a DestinationRule with tls mode SIMPLE or MUTUAL on an HTTP port), and it does not for these hosts: their clients verify their own TLS"
            )],
        ),
    ];
    for (yaml, want) in checks {
        assert_eq!(diags(yaml.clone()), want, "{yaml}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_most_specific_destination_rule_applies_as_in_istio() {
    let dr = |name: &str, host: &str, mode: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n  host: '{host}'\n  trafficPolicy:\n    tls: {{mode: {mode}}}\n"
        )
    };
    let se = format!(
        "{SE}  hosts: [api.example.test]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]\n  resolution: DNS\n"
    );
    // The DestinationRule whose TLS settings the ServiceEntry's port 80 gets, if any.
    let chosen = |drs: &[String]| {
        let (pol, d) = load_str(&format!("{se}{}", drs.concat()), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(!super::has_errors(&d), "{d:?}");
        let rule = &plan.rules[0];
        let by = rule
            .originate
            .first()
            .and_then(|o| o.tls.as_ref())
            .map(|t| t.by.trim_end_matches(" spec.trafficPolicy.tls").to_owned());
        assert_eq!(rule.steer_reason(80).is_some(), by.is_some(), "{rule:?}");
        by
    };
    let all = [
        dr("every", "*", "DISABLE"),
        dr("test", "*.test", "DISABLE"),
        dr("example", "*.example.test", "SIMPLE"),
        dr("other", "other.example.test", "SIMPLE"),
    ];
    assert_eq!(
        chosen(&all),
        Some("DestinationRule/default/example".to_owned()),
        "the longest matching wildcard"
    );
    assert_eq!(chosen(&all[..2]), None, "*.test says DISABLE");
    assert_eq!(
        chosen(&[dr("every", "*", "SIMPLE")]),
        Some("DestinationRule/default/every".to_owned())
    );
    let mut exact = all.to_vec();
    exact.push(dr("api", "api.example.test", "DISABLE"));
    assert_eq!(chosen(&exact), None, "an exact host wins over any wildcard");
    let first = [
        dr("one", "*.example.test", "SIMPLE"),
        dr("two", "*.example.test", "DISABLE"),
    ];
    assert_eq!(
        chosen(&first),
        Some("DestinationRule/default/one".to_owned()),
        "among equals, the first"
    );
    assert_eq!(chosen(&[dr("sub", "*.api.example.test", "SIMPLE")]), None);
}

/// The plan, compiled after one with `prev`'s ids, of one ServiceEntry per (name, last octet):
/// `<name>.test` at 10.0.0.<octet>:443 (TLS). A name twice is two rules.
pub(crate) fn tls_entries(entries: &[(&str, u8)], prev: &super::RuleIds) -> super::Plan {
    let yaml: String = entries
        .iter()
        .map(|(name, octet)| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n\
                 spec:\n  hosts: [{name}.test]\n  addresses: [10.0.0.{octet}]\n  \
                 ports: [{{number: 443, name: https, protocol: TLS}}]\n  resolution: NONE\n---\n"
            )
        })
        .collect();
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = super::compile_after(&pol, None, prev);
    assert!(d.is_empty(), "{d:?}");
    plan
}

#[test]
fn a_rule_keeps_its_id_across_reloads_and_an_id_never_names_another_rule() {
    let compile_after = tls_entries;
    // Each rule's id, and the id its map entry carries, by label.
    let ids = |plan: &super::Plan| -> Vec<(String, u32, u32)> {
        plan.rules
            .iter()
            .zip(&plan.fixed)
            .map(|(r, e)| (r.label.clone(), r.id, e.rule_id))
            .collect()
    };
    let label = |n: &str| format!("ServiceEntry/default/{n}");

    let first = compile_after(
        &[("a", 1), ("b", 2), ("c", 3), ("c", 4)],
        &Default::default(),
    );
    assert_eq!(
        ids(&first),
        [
            (label("a"), 16, 16),
            (label("b"), 17, 17),
            (label("c"), 18, 18),
            (label("c"), 19, 19)
        ]
    );
    // A newcomer ahead of them, b gone, c's address changed: the others keep their ids, the
    // newcomer takes a fresh one, not b's.
    let second = compile_after(&[("x", 9), ("a", 1), ("c", 30), ("c", 4)], &first.ids);
    assert_eq!(
        ids(&second),
        [
            (label("x"), 20, 20),
            (label("a"), 16, 16),
            (label("c"), 18, 18),
            (label("c"), 19, 19)
        ]
    );
    assert_eq!(second.rule(17).map(|r| r.label.as_str()), None);
    assert_eq!(second.rule_label(18), label("c"));
    // b back: a new id, as any rule that was not in force.
    let third = compile_after(&[("b", 2), ("a", 1)], &second.ids);
    assert_eq!(ids(&third), [(label("b"), 21, 21), (label("a"), 16, 16)]);
    // A fresh compile (check, validate, a new agent) numbers from the start.
    assert_eq!(
        tls_entries(&[("b", 2)], &Default::default()).rules[0].id,
        16
    );
}

#[test]
fn zero_timeouts_and_attempts_do_nothing_as_in_istio() {
    let route = |timeouts: &str| {
        let yaml = format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 443, name: https, protocol: HTTPS}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n{timeouts}"
        );
        let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        let rule = &plan.rules[0];
        let r = rule
            .steered
            .iter()
            .find(|s| s.port == 443)
            .map(|s| s.route.clone())
            .unwrap_or_default();
        (
            (r.retries, r.per_try_timeout, r.timeout),
            rule.steer_reason(443).is_some(),
        )
    };
    let secs = |s| Some(std::time::Duration::from_secs(s));
    assert_eq!(
        route("    retries: {attempts: 2, perTryTimeout: 2s}\n    timeout: 5s\n"),
        ((2, secs(2), secs(5)), true)
    );
    assert_eq!(
        route("    retries: {attempts: 2, perTryTimeout: 0s}\n    timeout: 0s\n"),
        ((2, None, None), true),
        "0s disables a timeout; it does not fail every attempt at once"
    );
    // Settings that do nothing do not send the host through the relay.
    assert_eq!(
        route("    timeout: 0s\n"),
        ((0, None, None), false),
        "a zero timeout alone"
    );
    // Istio turns the whole retry policy off when attempts is 0 or unset, perTryTimeout included.
    for retries in ["{attempts: 0, perTryTimeout: 2s}", "{perTryTimeout: 2s}"] {
        assert_eq!(
            route(&format!("    retries: {retries}\n")),
            ((0, None, None), false),
            "{retries}"
        );
        assert_eq!(
            route(&format!("    retries: {retries}\n    timeout: 5s\n")),
            ((0, None, secs(5)), true),
            "{retries} with a timeout"
        );
    }
}

/// A DestinationRule's `outlierDetection`, by port (a port's replaces the rule-wide one),
/// with Envoy's defaults where Istio leaves them; its checks, and the fields not applied named.
#[test]
fn a_destination_rules_outlier_detection_applies_to_steered_ports() {
    use super::compile::Outliers;
    let yaml = |od: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 8443, name: alt, protocol: HTTPS}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n    timeout: 5s\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: ns}}\nspec:\n  host: api.example\n  trafficPolicy:\n{od}"
        )
    };
    let outliers = |od: &str| {
        let (pol, d) = load_str(&yaml(od), Path::new("p.yaml"));
        let (plan, more) = compile(&pol, None);
        let d: Vec<String> = d.iter().chain(&more).map(ToString::to_string).collect();
        (plan.rules[0].outliers.clone(), d)
    };
    let (o, d) = outliers(
        "    outlierDetection: {interval: 1s}\n    portLevelSettings:\n    - port: {number: 8443}\n      outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, baseEjectionTime: 3m, maxEjectionPercent: 100}\n",
    );
    assert!(d.is_empty(), "{d:?}");
    let by = "DestinationRule/ns/d".to_owned();
    assert_eq!(
        o,
        [
            (
                443,
                Outliers {
                    consecutive_5xx: 5,
                    consecutive_gateway: 0,
                    base_ejection: std::time::Duration::from_secs(30),
                    interval: std::time::Duration::from_secs(1),
                    max_ejection_percent: 10,
                    min_health_percent: 0,
                    split_local: false,
                    consecutive_local: 5,
                    by: by.clone(),
                }
            ),
            (
                8443,
                Outliers {
                    consecutive_5xx: 0,
                    consecutive_gateway: 2,
                    base_ejection: std::time::Duration::from_secs(180),
                    interval: std::time::Duration::from_secs(10),
                    max_ejection_percent: 100,
                    min_health_percent: 0,
                    split_local: false,
                    consecutive_local: 5,
                    by,
                }
            ),
        ]
    );
    let (o, d) = outliers(
        "    outlierDetection: {minHealthPercent: 50, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3}\n",
    );
    assert_eq!(o.len(), 2);
    assert_eq!(o[0].1.min_health_percent, 50);
    assert!(o[0].1.split_local);
    assert_eq!(o[0].1.consecutive_local, 3);
    assert!(d.is_empty(), "{d:?}");
    for (od, want) in [
        (
            "{maxEjectionPercent: 101}",
            "spec.trafficPolicy.outlierDetection: maxEjectionPercent 101 is not from 0 to 100",
        ),
        (
            "{minHealthPercent: -1}",
            "spec.trafficPolicy.outlierDetection: minHealthPercent -1 is not from 0 to 100",
        ),
        (
            "{baseEjectionTime: 0s}",
            "spec.trafficPolicy.outlierDetection: baseEjectionTime 0ns is under 1ms, Istio's least",
        ),
    ] {
        let (o, d) = outliers(&format!("    outlierDetection: {od}\n"));
        assert!(o.is_empty(), "{od}: {o:?}");
        assert!(d.len() == 1 && d[0].contains(want), "{od}: {d:?}");
    }
}

/// `loadBalancer.simple`, rule-wide or a port's; `LEAST_CONN` is `LEAST_REQUEST`, `UNSPECIFIED`
/// the dialled address first; what egress does not apply is said, an unknown policy refused.
#[test]
fn a_destination_rules_load_balancer_applies_to_steered_ports() {
    use super::compile::{Balance, Balancing, HashOn};
    let yaml = |lb: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 8443, name: alt, protocol: HTTPS}}\n  - {{number: 9443, name: other, protocol: HTTPS}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n    timeout: 5s\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: ns}}\nspec:\n  host: api.example\n  trafficPolicy:\n{lb}"
        )
    };
    let balance = |lb: &str| {
        let (pol, d) = load_str(&yaml(lb), Path::new("p.yaml"));
        let mut all: Vec<String> = d.iter().map(ToString::to_string).collect();
        if super::has_errors(&d) {
            return (Vec::new(), all);
        }
        let (plan, more) = compile(&pol, None);
        all.extend(more.iter().map(ToString::to_string));
        (plan.rules[0].balance.clone(), all)
    };
    let (b, d) = balance(
        "    loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}\n    portLevelSettings:\n    - port: {number: 8443}\n      loadBalancer: {simple: LEAST_CONN}\n    - port: {number: 9443}\n      loadBalancer: {simple: UNSPECIFIED}\n",
    );
    let by = || "DestinationRule/ns/d".to_owned();
    let policies: Vec<(u16, Balancing)> = b.iter().map(|(p, b)| (*p, b.policy)).collect();
    assert_eq!(
        policies,
        [
            (443, Balancing::RoundRobin),
            (8443, Balancing::LeastRequest),
            (9443, Balancing::Dialled)
        ]
    );
    assert!(b.iter().all(|(_, b)| *b
        == Balance {
            policy: b.policy,
            hash: None,
            by: by()
        }));
    assert_eq!(
        d,
        [
            "p.yaml:28:41: warning: `spec.trafficPolicy.loadBalancer.warmupDurationSecs` is not applied by egress; ignored"
        ]
    );
    // A consistent hash on one key; its table's size is Envoy's business.
    let hashed = |ch: &str| {
        let (b, d) = balance(&format!("    loadBalancer: {{consistentHash: {ch}}}\n"));
        let b: Vec<(Balancing, Option<HashOn>)> =
            b.into_iter().map(|(_, b)| (b.policy, b.hash)).collect();
        (b.first().cloned(), d)
    };
    let header = http::HeaderName::from_static("x-user");
    assert_eq!(
        hashed("{httpHeaderName: X-User}"),
        (
            Some((Balancing::Hash, Some(HashOn::Header(header)))),
            Vec::new()
        )
    );
    assert_eq!(
        hashed("{useSourceIp: true, ringHash: {minimumRingSize: 1024}}"),
        (
            Some((Balancing::Hash, Some(HashOn::SourceIp))),
            vec![
                "p.yaml:28:56: warning: `spec.trafficPolicy.loadBalancer.consistentHash.ringHash` is not applied by egress; ignored".to_owned()
            ]
        )
    );
    assert_eq!(
        hashed("{httpCookie: {name: session, path: /, ttl: 60s}}").0,
        Some((
            Balancing::Hash,
            Some(HashOn::Cookie {
                name: "session".to_owned(),
                path: Some("/".to_owned()),
                ttl: Some(std::time::Duration::from_secs(60))
            })
        ))
    );
    assert_eq!(
        hashed("{httpQueryParameterName: user}").0,
        Some((Balancing::Hash, Some(HashOn::Query("user".to_owned()))))
    );
    let error = |ch: &str| {
        let (_, d) = hashed(ch);
        assert_eq!(d.len(), 1, "{d:?}");
        d[0].clone()
    };
    assert!(error("{httpHeaderName: x, useSourceIp: true}").ends_with(
        "spec.trafficPolicy.loadBalancer: consistentHash: more than one hash key; Istio takes one"
    ));
    assert!(error("{useSourceIp: false}").contains("consistentHash: no hash key"));
    assert!(error("{httpHeaderName: \"a b\"}").contains("`a b` is not a header name"));
    let (_, d) =
        balance("    loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}\n");
    assert!(
        d.len() == 1 && d[0].contains("simple and consistentHash: only one of them may be set"),
        "{d:?}"
    );
    let (_, d) = balance("    loadBalancer: {simple: PASSTHROUGH}\n");
    assert!(d.is_empty(), "{d:?}");
    let (_, d) = balance("    loadBalancer: {simple: FASTEST}\n");
    assert!(
        d.len() == 1 && d[0].contains("loadBalancer.simple") && d[0].contains("FASTEST"),
        "{d:?}"
    );
}

#[test]
fn a_destination_rules_connection_pool_applies_to_steered_ports() {
    // api.example is steered (its VirtualService gives it a timeout); plain.example is not.
    let yaml = |pool: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 8443, name: alt, protocol: HTTPS}}\n  - {{number: 80, name: http, protocol: HTTP}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n    timeout: 5s\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: ns}}\nspec:\n  host: api.example\n  trafficPolicy:\n{pool}"
        )
    };
    let pools = |pool: &str| {
        let (pol, d) = load_str(&yaml(pool), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        let d: Vec<String> = d.iter().map(ToString::to_string).collect();
        (plan.rules[0].pools.clone(), d)
    };
    let secs = |s| Some(std::time::Duration::from_secs(s));
    let (p, d) = pools(
        "    connectionPool:\n      tcp:\n        maxConnections: 100\n        connectTimeout: 2s\n        idleTimeout: 0s\n        tcpKeepalive: {time: 60s, interval: 10s, probes: 3}\n    portLevelSettings:\n    - port: {number: 8443}\n      connectionPool: {tcp: {maxConnections: 5}}\n",
    );
    assert!(d.is_empty(), "{d:?}");
    let wide = super::compile::ConnectionPool {
        max_connections: Some(100),
        connect_timeout: secs(2),
        idle_timeout: Some(std::time::Duration::ZERO),
        keepalive: Some(super::compile::Keepalive {
            time: secs(60),
            interval: secs(10),
            probes: Some(3),
        }),
        by: "DestinationRule/ns/d".to_owned(),
        ..Default::default()
    };
    // A port-level pool replaces the rule-wide one, as in Istio.
    let port = super::compile::ConnectionPool {
        max_connections: Some(5),
        by: "DestinationRule/ns/d".to_owned(),
        ..Default::default()
    };
    assert_eq!(p, vec![(443, wide.clone()), (8443, port), (80, wide)]);

    // Istio's 0 is unset.
    let (p, d) = pools(
        "    connectionPool:\n      tcp: {maxConnections: 0, maxConnectionDuration: 1h}\n      http: {http1MaxPendingRequests: 0, http2MaxRequests: 0, maxRetries: 0, maxConcurrentStreams: 0}\n",
    );
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(p[0].1.max_connections, None);
    assert_eq!(p[0].1.max_pending_requests, None);
    assert_eq!(p[0].1.max_active_requests, None);
    assert_eq!(p[0].1.max_retries, None);
    assert_eq!(p[0].1.max_concurrent_streams, None);
    assert_eq!(p[0].1.max_connection_duration, secs(3600));
    let (p, _) = pools("    connectionPool: {http: {maxConcurrentStreams: 3}}\n");
    assert_eq!(p[0].1.max_concurrent_streams, Some(3));
    let (_, d) = pools("    connectionPool: {http: {maxConcurrentStreams: -1}}\n");
    assert!(
        d.len() == 1 && d[0].contains("http.maxConcurrentStreams -1 is not a count of requests"),
        "{d:?}"
    );
    let (p, d) = pools("    connectionPool: {http: {http2MaxRequests: 100, maxRetries: 4}}\n");
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(p[0].1.max_active_requests, Some(100));
    assert_eq!(p[0].1.max_retries, Some(4));
    // HTTP/1.1 upgraded to HTTP/2 where asked, unless the client's protocol is to be kept.
    for (http, upgrade) in [
        ("{h2UpgradePolicy: UPGRADE}", true),
        ("{h2UpgradePolicy: UPGRADE, useClientProtocol: true}", false),
        ("{h2UpgradePolicy: DO_NOT_UPGRADE}", false),
        ("{useClientProtocol: false}", false),
    ] {
        let (p, d) = pools(&format!("    connectionPool: {{http: {http}}}\n"));
        assert!(d.is_empty(), "{http}: {d:?}");
        assert_eq!(p[0].1.h2_upgrade, upgrade, "{http}");
    }
    let (_, d) = pools("    connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}\n");
    assert!(
        d.iter().any(|d| d
            .contains("http.h2UpgradePolicy SOMETIMES is not DEFAULT, DO_NOT_UPGRADE or UPGRADE")),
        "{d:?}"
    );
    let (_, d) = pools("    connectionPool: {http: {http2MaxRequests: 5000000000}}\n");
    assert!(
        d.iter()
            .any(|d| d.contains("http.http2MaxRequests 5000000000 is not a count of requests")),
        "{d:?}"
    );
    let (p, d) = pools("    connectionPool: {http: {http1MaxPendingRequests: 10}}\n");
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(p[0].1.max_pending_requests, Some(10));
    let (_, d) = pools("    connectionPool: {http: {http1MaxPendingRequests: -1}}\n");
    assert!(
        d.iter()
            .any(|d| d.contains("http.http1MaxPendingRequests -1 is not a count of requests")),
        "{d:?}"
    );

    // connectionPool.http applies to TLS origination's upstream connections.
    let (p, d) =
        pools("    connectionPool: {http: {idleTimeout: 90s, maxRequestsPerConnection: 1}}\n");
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        (p[0].1.http_idle_timeout, p[0].1.max_requests_per_connection),
        (secs(90), Some(1))
    );

    // Where egress originates TLS, maxConnections limits the upstream connections (requests
    // over it wait, as Envoy queues them).
    let (p, d) = pools("    tls: {mode: SIMPLE}\n    connectionPool: {tcp: {maxConnections: 5}}\n");
    assert_eq!(p.len(), 3);
    assert!(!d.iter().any(|d| d.contains("maxConnections")), "{d:?}");
    assert!(p.iter().all(|(_, pool)| pool.max_connections == Some(5)));

    // Values Istio or the kernel would refuse are errors, naming the field.
    for (pool, error) in [
        (
            "{maxConnections: -1}",
            "tcp.maxConnections -1 is not a count",
        ),
        (
            "{connectTimeout: 500us}",
            "tcp.connectTimeout 500µs is under 1ms",
        ),
        (
            "{tcpKeepalive: {time: 500ms}}",
            "tcp.tcpKeepalive.time 500ms is not a whole number",
        ),
        (
            "{tcpKeepalive: {interval: 40000s}}",
            "tcp.tcpKeepalive.interval 40000s is not",
        ),
        (
            "{tcpKeepalive: {probes: 0}}",
            "tcp.tcpKeepalive.probes 0 is not from 1 to 127",
        ),
    ] {
        let (p, d) = pools(&format!("    connectionPool: {{tcp: {pool}}}\n"));
        assert!(p.is_empty(), "{pool}: {p:?}");
        assert!(
            d.len() == 1
                && d[0]
                    .contains("error: DestinationRule/ns/d: spec.trafficPolicy.connectionPool: ")
                && d[0].contains(error),
            "{pool}: {d:?}"
        );
    }

    // On a host that goes direct it does nothing, and says so.
    let direct =
        yaml("    connectionPool: {tcp: {maxConnections: 5}}\n").replace("    timeout: 5s\n", "");
    let (pol, _) = load_str(&direct, Path::new("p.yaml"));
    let (plan, d) = compile(&pol, None);
    assert!(plan.rules[0].pools.is_empty());
    assert!(
        d.iter().any(|d| d
            .to_string()
            .contains("connectionPool applies to connections through the relay")),
        "{d:?}"
    );
}

/// A port is steered only when the route that covers it, as Istio matches routes for the mesh,
/// goes to the gateway; the host's other ports go direct.
#[test]
fn routes_steer_the_ports_their_matches_cover() {
    let vs = |routes: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  gateways: [mesh, egress]\n{routes}"
        )
    };
    const GW: &str = "{destination: {host: istio-egressgateway.istio-system.svc.cluster.local}}";
    const UP: &str = "{destination: {host: api.example}}";
    let se = format!(
        "{SE}  hosts: [api.example]\n  addresses: [192.0.2.0/28]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 8443, name: admin, protocol: TLS}}\n  resolution: STATIC\n  endpoints:\n  - address: 192.0.2.8\n    ports: {{https: 9443}}\n"
    );
    // The ports steered, the verdict of each address and port in the kernel's map agreeing.
    let steered = |extra: &str| -> Vec<u16> {
        let (pol, d) = load_str(&format!("{se}{extra}"), Path::new("p.yaml"));
        assert!(!super::has_errors(&d), "{d:?}");
        let (plan, d) = compile(&pol, Some(Mode::RegistryOnly));
        assert!(d.is_empty(), "{d:?}");
        let rule = &plan.rules[0];
        let e = plan.entries(&HashMap::new(), &[]);
        for (ip, port) in [
            ("192.0.2.7", 80),
            ("192.0.2.7", 443),
            ("192.0.2.7", 8443),
            ("192.0.2.8", 443),
            ("192.0.2.8", 9443),
        ] {
            let verdict = plan
                .decide(&e, ip.parse().expect("ip"), port, Transport::Tcp)
                .verdict;
            assert_eq!(
                verdict == Verdict::Steer,
                rule.steer_reason(port).is_some(),
                "{ip}:{port} {verdict:?}, {extra}"
            );
            assert_ne!(verdict, Verdict::Deny, "{ip}:{port}");
        }
        rule.steered.iter().map(|s| s.port).collect()
    };
    // The seed's shape: the mesh's TLS on 443 to the gateway, the gateway's on to the host.
    let tls = vs(&format!(
        "  tls:\n  - match: [{{gateways: [mesh], port: 443, sniHosts: [api.example]}}]\n    route: [{GW}]\n  - match: [{{gateways: [egress], port: 443, sniHosts: [api.example]}}]\n    route: [{UP}]\n"
    ));
    assert_eq!(
        steered(&tls),
        [443, 9443],
        "an endpoint's number as its port"
    );
    // A match without a port covers every port; a match for the gateway alone, none of the mesh's.
    assert_eq!(
        steered(&vs(&format!(
            "  tcp:\n  - match: [{{gateways: [egress]}}]\n    route: [{UP}]\n  - route: [{GW}]\n"
        ))),
        [80, 443, 8443, 9443]
    );
    // The first route that covers a port decides it.
    assert_eq!(
        steered(&vs(&format!(
            "  tcp:\n  - match: [{{port: 8443}}]\n    route: [{UP}]\n  - route: [{GW}]\n"
        ))),
        [80, 443, 9443]
    );
    // Another host's server name is not this host's route.
    assert_eq!(
        steered(&vs(&format!(
            "  tls:\n  - match: [{{port: 443, sniHosts: [other.example]}}]\n    route: [{GW}]\n"
        ))),
        [] as [u16; 0]
    );
    assert_eq!(
        steered(&vs(&format!(
            "  tls:\n  - match: [{{port: 443, sniHosts: ['*.example']}}]\n    route: [{GW}]\n"
        ))),
        [443, 9443]
    );
    // Each port takes the retries of the route that covers it.
    let (pol, _) = load_str(
        &format!(
            "{se}{}",
            vs(&format!(
                "  tls:\n  - match: [{{port: 443, sniHosts: [api.example]}}]\n    route: [{GW}]\n  http:\n  - match: [{{port: 8443}}]\n    route: [{UP}]\n    retries: {{attempts: 3}}\n  - route: [{UP}]\n    timeout: 2s\n"
            ))
        ),
        Path::new("p.yaml"),
    );
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let routes: Vec<_> = plan.rules[0]
        .steered
        .iter()
        .map(|s| (s.port, s.route.retries, s.route.timeout))
        .collect();
    let secs = |n| Some(std::time::Duration::from_secs(n));
    assert_eq!(
        routes,
        [
            (80, 0, secs(2)),
            (443, 0, None),
            (8443, 3, None),
            (9443, 0, None)
        ]
    );
    // HTTP retries on the plain port only; a path match covers its whole port (each request
    // then takes the route it matches).
    assert_eq!(
        steered(&vs(&format!(
            "  http:\n  - match: [{{port: 80, uri: {{prefix: /api}}}}]\n    route: [{UP}]\n    retries: {{attempts: 2}}\n"
        ))),
        [80]
    );
}

/// A port's own `tls` replaces the DestinationRule's rule-wide one in deciding whether it is
/// steered for origination; a connection pool on a port that goes direct is said to do nothing.
/// The mesh's `tls` and `tcp` routes are applied whole: one that sends connections elsewhere than
/// dialled (another host or port, or a split by weight) steers its port, with the routes in
/// order; one that sends each to where it was dialled leaves the port alone.
#[test]
fn tls_and_tcp_routes_to_other_destinations_steer_their_ports() {
    let entry = |name: &str, ports: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n\
             spec:\n  hosts: [{name}.example]\n  ports: [{ports}]\n  resolution: DNS\n---\n"
        )
    };
    let yaml = format!(
        "{}{}{}{}",
        entry(
            "a",
            "{number: 443, name: tls, protocol: TLS}, {number: 5432, name: db, protocol: TCP}"
        ),
        entry("b", "{number: 8443, name: tls, protocol: TLS}"),
        entry(
            "c",
            "{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP}"
        ),
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [a.example, c.example]
  tls:
  - match: [{port: 443, sniHosts: [a.example]}]
    route:
    - destination: {host: a.example}
      weight: 80
    - destination: {host: b.example}
      weight: 20
    - destination: {host: c.example}
  - match: [{port: 443, sniHosts: [c.example]}]
    route: [{destination: {host: c.example}}]
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: b.example, port: {number: 5433}}}]
  - route: [{destination: {host: c.example}}]
"#
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let rule = |host: &str| plan.rules.iter().find(|r| r.hosts == [host]).expect("rule");
    let a = rule("a.example");
    let steered: Vec<(u16, &str)> = a.steered.iter().map(|s| (s.port, s.why.as_str())).collect();
    assert_eq!(
        steered,
        [
            (
                443,
                "VirtualService/default/v spec.tls[0] sends port 443's connections to \
                 a.example:443 (80%), b.example:8443 (20%)"
            ),
            (
                5432,
                "VirtualService/default/v spec.tcp[0] sends port 5432's connections to \
                 b.example:5433"
            ),
        ]
    );
    // A destination without a weight among several takes nothing; b.example's one port is
    // where its connections go; the routes stay in order, the `tcp` ones after the `tls` ones,
    // and a `tls` route for another host's server names is not among them.
    let pass = &a.steered[0].pass;
    let to: Vec<Vec<(&str, u16, u32)>> = pass
        .iter()
        .map(|r| {
            r.to.iter()
                .map(|d| (d.host.as_str(), d.port, d.weight))
                .collect()
        })
        .collect();
    assert_eq!(
        to,
        [
            vec![("a.example", 443, 80), ("b.example", 8443, 20)],
            vec![("c.example", 443, 1)],
        ]
    );
    let shape: Vec<(bool, Vec<&str>, &str)> = pass
        .iter()
        .map(|r| {
            (
                r.tls,
                r.sni.iter().map(String::as_str).collect(),
                r.by.as_str(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (
                true,
                vec!["a.example"],
                "VirtualService/default/v spec.tls[0]"
            ),
            (false, vec![], "VirtualService/default/v spec.tcp[1]"),
        ]
    );
    // c.example's TLS goes where it was dialled, and its HTTP port is routed request by request:
    // neither is steered.
    assert!(rule("c.example").steered.is_empty());
    assert!(rule("b.example").steered.is_empty());

    // A route through an egress gateway sends connections where they were dialled.
    let via_gateway = yaml.replace(
        "    - destination: {host: c.example}\n  - match",
        "    - destination: {host: istio-egressgateway.istio-system.svc.cluster.local}\n  - match",
    );
    let (pol, _) = load_str(&via_gateway, Path::new("p.yaml"));
    let (plan, _) = compile(&pol, None);
    let a = plan
        .rules
        .iter()
        .find(|r| r.hosts == ["a.example"])
        .expect("rule");
    assert!(
        a.steered[0].why.contains("egress gateway"),
        "{}",
        a.steered[0].why
    );
    assert!(a.steered[0].pass[0].to.is_empty());
}

/// An `http` route that sends requests elsewhere than dialled steers its HTTP port, and each of
/// its destinations carries the route's header operations and then its own.
#[test]
fn http_routes_to_other_destinations_steer_their_ports() {
    let yaml = format!(
        "{SE}  hosts: [a.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  \
         resolution: DNS\n---\n{SE}  hosts: [b.example]\n  ports: [{{number: 8080, name: http, \
         protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: \
         VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [a.example]\n  http:\n  - \
         headers: {{request: {{set: {{x-route: r}}}}}}\n    route:\n    - destination: {{host: \
         a.example}}\n      weight: 90\n      headers: {{request: {{set: {{x-to: a}}}}}}\n    - \
         destination: {{host: b.example}}\n      weight: 10\n      headers: {{request: {{set: \
         {{x-to: b}}}}}}\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let s = &plan.rules[0].steered[0];
    assert_eq!(
        s.why,
        "VirtualService/default/v sends port 80's requests to a.example:80 (90%), \
         b.example:8080 (10%) (spec.http[0])"
    );
    let set = |name: &str, value: &str| {
        HeaderOp::Set(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            http::HeaderValue::from_str(value).expect("value"),
        )
    };
    let r = &s.requests[0];
    let to: Vec<(&str, u16, u32, &[HeaderOp])> = (r.to.iter())
        .map(|(d, ops)| (d.host.as_str(), d.port, d.weight, &ops.request[..]))
        .collect();
    assert_eq!(
        to,
        [
            (
                "a.example",
                80,
                90,
                &[set("x-route", "r"), set("x-to", "a")][..]
            ),
            (
                "b.example",
                8080,
                10,
                &[set("x-route", "r"), set("x-to", "b")][..]
            ),
        ]
    );
    // Without a draw (where dialled), the route's and its first destination's.
    assert_eq!(r.headers.request, [set("x-route", "r"), set("x-to", "a")]);
    assert!(plan.rules[1].steered.is_empty());
}

/// A route's `mirror` (with `mirrorPercentage`) or `mirrors` steer its HTTP port; each copy's
/// share is in millionths, 100 % unless its percentage says less, and the two forms together,
/// a share outside 0–100 or a mirror no ServiceEntry has are told.
#[test]
fn a_routes_mirrors_are_read_as_istio_reads_them() {
    let yaml = |route: &str| {
        format!(
            "{SE}  hosts: [a.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  \
             resolution: DNS\n---\n{SE}  hosts: [b.example]\n  ports: [{{number: 80, name: \
             http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: \
             networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  \
             hosts: [a.example]\n  http:\n  - route: [{{destination: {{host: a.example}}}}]\n{route}"
        )
    };
    let mirrors = |route: &str| {
        let (pol, d) = load_str(&yaml(route), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        let s = &plan.rules[0].steered[0];
        assert!(s.why.ends_with("or a mirror (spec.http[0])"), "{}", s.why);
        (s.requests[0].mirrors.iter())
            .map(|(to, share)| (to.host.clone(), to.port, *share))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        mirrors("    mirror: {host: b.example}\n"),
        [("b.example".to_owned(), 80, 1_000_000)]
    );
    assert_eq!(
        mirrors("    mirror: {host: b.example}\n    mirrorPercentage: {value: 12.5}\n"),
        [("b.example".to_owned(), 80, 125_000)]
    );
    assert_eq!(
        mirrors(
            "    mirrors:\n    - destination: {host: b.example, port: {number: 8080}}\n      \
             percentage: {value: 50}\n    - destination: {host: b.example}\n"
        ),
        [
            ("b.example".to_owned(), 8080, 500_000),
            ("b.example".to_owned(), 80, 1_000_000)
        ]
    );
    assert_eq!(
        errors_of(&yaml(
            "    mirror: {host: b.example}\n    mirrors: [{destination: {host: b.example}}]\n"
        )),
        [
            "p.yaml:19:1: error: VirtualService/default/v: spec.http[0].mirror and mirrors: only one of them may be set"
        ]
    );
    assert_eq!(
        errors_of(&yaml(
            "    mirrors: [{destination: {host: b.example}, percentage: {value: 101}}]\n"
        )),
        [
            "p.yaml:19:1: error: VirtualService/default/v: spec.http[0].mirrors[0].percentage: 101 is not from 0 to 100"
        ]
    );
    assert_eq!(
        diags_of(&yaml("    mirror: {host: nowhere.example}\n")),
        [
            "p.yaml:19:1: warning: VirtualService/default/v: spec.http[0].mirror.host nowhere.example is not a host of any ServiceEntry: the relay sends no copy there, as Istio has nowhere to send it"
        ]
    );
}

/// A route's subset narrows its host's endpoints to those whose labels hold all of the
/// subset's; a subset without labels, or one no DestinationRule defines, narrows nothing.
#[test]
fn a_subsets_labels_choose_the_endpoints_a_route_goes_to() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1, zone: a}}
  - {address: 10.0.0.2, labels: {version: v2, zone: a}}
  - {address: db-v1.internal, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db.internal
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v1a, labels: {version: v1, zone: a}}
  - {name: all}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db.internal]
  tcp:
  - route:
    - {destination: {host: db.internal, subset: v1}, weight: 1}
    - {destination: {host: db.internal, subset: v1a}, weight: 1}
    - {destination: {host: db.internal, subset: all}, weight: 1}
";
    let (pol, d) = load_str(yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.iter().all(|d| d.severity != Severity::Error), "{d:?}");
    let to = &plan.rules[0].steered[0].pass[0].to;
    let subset = |name: &str, ips: &[&str], names: &[&str]| {
        Some(super::compile::SubsetEndpoints {
            name: name.to_owned(),
            ips: ips.iter().map(|ip| ip.parse().expect("address")).collect(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        })
    };
    let subsets: Vec<_> = to.iter().map(|d| d.subset.clone()).collect();
    assert_eq!(
        subsets,
        [
            subset("v1", &["10.0.0.1"], &["db-v1.internal"]),
            subset("v1a", &["10.0.0.1"], &[]),
            None,
        ]
    );
}

/// Route weights are checked as Istio checks them, and a route of the mesh to a host no
/// ServiceEntry has is warned about: its connections are refused.
#[test]
fn route_weights_and_destinations_are_checked() {
    let yaml = |route: &str| {
        format!(
            "{SE}  hosts: [a.example]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  \
             resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: v}}\nspec:\n  hosts: [a.example]\n  tls:\n  - route:\n{route}"
        )
    };
    assert_eq!(
        errors_of(&yaml(
            "    - destination: {host: a.example}\n      weight: -1\n    - destination: {host: a.example}\n"
        )),
        [
            "p.yaml:10:1: error: VirtualService/default/v: spec.tls[0].route[0].weight -1 is below 0",
            "p.yaml:10:1: error: VirtualService/default/v: spec.tls[0].route names 2 destinations whose weights add up to 0: none would take any traffic",
        ]
    );
    // Subsets without labels select the same endpoints: one's traffic policy applies; a host
    // with resolution NONE has no address to send to.
    let more = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a.example\n  subsets: [{name: v1}, {name: v2}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: none}\nspec:\n  hosts: [n.example]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n";
    let d = diags_of(
        &(yaml(
            "    - destination: {host: a.example, subset: v1}\n      weight: 90\n    - destination: {host: a.example, subset: v2}\n      weight: 10\n  - route: [{destination: {host: n.example}}]\n",
        ) + more),
    );
    assert_eq!(
        d,
        [
            "p.yaml:30:1: warning: ServiceEntry/default/none: resolution NONE without addresses opens port(s) 443/tcp to every IP address, as in Istio; add spec.addresses or use resolution DNS",
            "p.yaml:10:1: warning: VirtualService/default/v: spec.tls[1].route[0].destination.host n.example has resolution NONE: egress knows no address of its to send to, and refuses what is routed there",
            "p.yaml:10:1: warning: VirtualService/default/v: spec.tls names subsets v1 (spec.tls[0]) and v2 (spec.tls[0]): egress applies to a port the traffic policy of the subset its first covering route names, to all of its traffic",
        ]
    );
    assert_eq!(
        diags_of(&yaml("    - destination: {host: nowhere.example}\n")),
        [
            "p.yaml:10:1: warning: VirtualService/default/v: spec.tls[0].route[0].destination.host nowhere.example is not a host of any ServiceEntry: the relay refuses what is routed there, as Istio has nowhere to send it"
        ]
    );
}

#[test]
fn origination_steers_the_ports_it_applies_to() {
    let yaml = format!(
        "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP, targetPort: 443}}\n  - {{number: 8080, name: alt, protocol: HTTP}}\n  - {{number: 8443, name: tls, protocol: TLS}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: api.example\n  trafficPolicy:\n    tls: {{mode: SIMPLE}}\n    connectionPool: {{tcp: {{maxConnections: 5}}}}\n    portLevelSettings:\n    - port: {{number: 8080}}\n      tls: {{mode: DISABLE}}\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    let d: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert!(
        d.iter()
            .any(|d| d.contains("connectionPool applies to connections through the relay; this host's port(s) 8080 go direct")),
        "{d:?}"
    );
    let rule = &plan.rules[0];
    let why: Vec<_> = rule
        .steered
        .iter()
        .map(|s| format!("{}: {}", s.port, s.why))
        .collect();
    assert_eq!(
        why,
        [
            "80: DestinationRule/default/d originates TLS on port 80 (spec.trafficPolicy.tls)",
            "8443: DestinationRule/default/d asks for TLS origination on port 8443, which is not HTTP: its TLS is passed through (spec.trafficPolicy.tls)"
        ]
    );
    let pooled: Vec<u16> = rule.pools.iter().map(|(p, _)| *p).collect();
    assert_eq!(pooled, [80, 8443]);
    let http: Vec<_> = rule
        .originate
        .iter()
        .map(|o| (o.port, o.target_port, o.tls.as_ref().map(|t| t.mode)))
        .collect();
    assert_eq!(http, [(80, 443, Some("SIMPLE"))], "8080 goes direct");
    let hosts: Vec<_> = plan.hosts[0]
        .ports
        .iter()
        .map(|&(p, _, v)| (p, v))
        .collect();
    assert_eq!(
        hosts,
        [
            (80, Verdict::Steer),
            (8080, Verdict::Allow),
            (8443, Verdict::Steer)
        ]
    );
}

/// A route to a subset takes the subset's traffic policy over the rule's, field by field, a port's
/// entry before the policy's own, as Istio merges them: here the subset's TLS origination and
/// connection pool. What egress does not do with destinations is said.
#[test]
fn a_subsets_traffic_policy_applies_to_the_ports_its_route_covers() {
    let yaml = |dests: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP, targetPort: 443}}\n  - {{number: 8080, name: alt, protocol: HTTP, targetPort: 443}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - match: [{{port: 80}}]\n    route:\n{dests}    timeout: 5s\n  - route: [{{destination: {{host: api.example}}}}]\n    timeout: 5s\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: api.example\n  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: 10}}}}\n  subsets:\n  - name: tls\n    trafficPolicy:\n      tls: {{mode: SIMPLE}}\n      connectionPool: {{tcp: {{maxConnections: 5}}}}\n  - name: plain\n    trafficPolicy:\n      tls: {{mode: SIMPLE}}\n      portLevelSettings:\n      - port: {{number: 80}}\n        tls: {{mode: DISABLE}}\n"
        )
    };
    let compiled = |dests: &str| {
        let (pol, d) = load_str(&yaml(dests), Path::new("p.yaml"));
        assert!(!super::has_errors(&d), "{d:?}");
        let (plan, d) = compile(&pol, None);
        let d: Vec<String> = d.iter().map(ToString::to_string).collect();
        let rule = plan.rules[0].clone();
        let tls: Vec<_> = rule
            .originate
            .iter()
            .map(|o| (o.port, o.tls.is_some()))
            .collect();
        let pools: Vec<_> = rule
            .pools
            .iter()
            .map(|(p, c)| (*p, c.max_connections))
            .collect();
        let why: Vec<_> = rule.steered.iter().map(|s| s.why.clone()).collect();
        (tls, pools, why, d)
    };
    // Port 80's route sends to subset `tls`: TLS is originated there, and its pool is the
    // subset's; port 8080's route names no subset and takes the rule's.
    let (tls, pools, _, d) = compiled("    - destination: {host: api.example, subset: tls}\n");
    assert_eq!(tls, [(80, true), (8080, false)]);
    assert_eq!(pools, [(80, Some(5)), (8080, Some(10))]);
    assert!(d.is_empty(), "{d:?}");

    // Without a route there, the subset's TLS steers the port by itself.
    let (pol, _) = load_str(
        &yaml("    - destination: {host: api.example, subset: tls}\n")
            .replace("    timeout: 5s\n", ""),
        Path::new("p.yaml"),
    );
    let (plan, _) = compile(&pol, None);
    let why: Vec<_> = plan.rules[0].steered.iter().map(|s| &s.why).collect();
    assert_eq!(
        why[0],
        "DestinationRule/default/d originates TLS on port 80 (spec.subsets[0].trafficPolicy.tls)"
    );

    // The subset's port entry turns the subset's own TLS off on port 80.
    let (tls, pools, _, _) = compiled("    - destination: {host: api.example, subset: plain}\n");
    assert_eq!(tls, [(80, false), (8080, false)]);
    assert_eq!(pools, [(80, Some(10)), (8080, Some(10))]);

    // Two destinations, one of them another host and one an undefined subset.
    let (_, _, _, d) = compiled(
        "    - destination: {host: api.example, subset: gone}\n      weight: 90\n    - destination: {host: other.example}\n      weight: 10\n",
    );
    assert_eq!(
        d,
        [
            "p.yaml:12:1: warning: VirtualService/default/v: spec.http[0].route[0].destination.subset gone is not defined by a DestinationRule for api.example: Istio has nowhere to send such traffic, egress sends it on as if no subset were named",
            "p.yaml:12:1: warning: VirtualService/default/v: spec.http[0].route[1].destination.host other.example is not a host of any ServiceEntry: the relay refuses what is routed there, as Istio has nowhere to send it",
        ]
    );

    // Routes of one VirtualService that name different subsets.
    let (pol, _) = load_str(
        &yaml("    - destination: {host: api.example, subset: tls}\n").replace(
            "  - route: [{destination: {host: api.example}}]",
            "  - route: [{destination: {host: api.example, subset: plain}}]",
        ),
        Path::new("p.yaml"),
    );
    let d: Vec<String> = compile(&pol, None)
        .1
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        d,
        [
            "p.yaml:12:1: warning: VirtualService/default/v: spec.http names subsets tls (spec.http[0]) and plain (spec.http[1]): egress applies to a port the traffic policy of the subset its first covering route names, to all of its traffic"
        ]
    );
}

/// A steered HTTP port without TLS origination is still served as HTTP: the relay checks each
/// request's host and sends it on as plain HTTP, with the route's retries. A TCP port's bytes are
/// carried as they come; a gRPC port's and one without protocol are told by them; the others
/// are passed through as TLS.
#[test]
fn a_steered_http_port_is_served_as_http() {
    let yaml = format!(
        "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n  - {{number: 8080, name: alt, protocol: HTTP, targetPort: 8081}}\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 9000, name: grpc, protocol: GRPC}}\n  - {{number: 5432, name: pg, protocol: TCP}}\n  - {{number: 7000, name: any}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - match: [{{port: 8080}}]\n    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]\n  - route: [{{destination: {{host: api.example}}}}]\n    retries: {{attempts: 2}}\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let rule = &plan.rules[0];
    let steered: Vec<_> = rule.steered.iter().map(|s| s.port).collect();
    assert_eq!(steered, [80, 443, 5432, 7000, 8080, 9000]);
    let carry: Vec<_> = rule.steered.iter().map(|s| (s.port, s.carry)).collect();
    assert_eq!(
        carry,
        [
            (80, Carry::Tls),
            (443, Carry::Tls),
            (5432, Carry::Opaque),
            (7000, Carry::Detect),
            (8080, Carry::Tls),
            (9000, Carry::Detect)
        ],
        "a TCP port's bytes carried as they come, a gRPC port's and one without protocol told \
         by them; HTTP ports are served as HTTP whatever this says"
    );
    let http: Vec<_> = rule
        .originate
        .iter()
        .map(|o| (o.port, o.target_port, o.tls.is_some()))
        .collect();
    assert_eq!(http, [(80, 80, false), (8080, 8081, false)]);
}

/// Istio's "Egress Gateways with TLS Origination", as documented: the mesh's port 80 goes to the
/// gateway, whose own route sends it on to port 443, where the DestinationRule asks for TLS. The
/// relay originates that TLS, to port 443.
#[test]
fn an_egress_gateway_that_originates_tls_on_another_port() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cnn}
spec:
  hosts: [edition.cnn.com]
  ports:
  - {number: 80, name: http-port, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egressgateway}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: https-port-for-tls-origination, protocol: HTTPS}
    hosts: [edition.cnn.com]
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: direct-cnn-through-egress-gateway}
spec:
  hosts: [edition.cnn.com]
  gateways: [istio-egressgateway, mesh]
  http:
  - match:
    - gateways: [mesh]
      port: 80
    route:
    - destination:
        host: istio-egressgateway.istio-system.svc.cluster.local
        subset: cnn
        port: {number: 80}
      weight: 100
  - match:
    - gateways: [istio-egressgateway]
      port: 80
    route:
    - destination:
        host: edition.cnn.com
        port: {number: 443}
      weight: 100
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: originate-tls-for-edition-cnn-com}
spec:
  host: edition.cnn.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE}
";
    let (pol, d) = load_str(yaml, Path::new("p.yaml"));
    assert!(!super::has_errors(&d), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let rule = &plan.rules[0];
    let o: Vec<_> = rule
        .originate
        .iter()
        .map(|o| {
            (
                o.port,
                o.target_port,
                o.tls.as_ref().map(|t| (t.mode, t.by.as_str())),
            )
        })
        .collect();
    assert_eq!(
        o,
        [(
            80,
            443,
            Some((
                "SIMPLE",
                "DestinationRule/default/originate-tls-for-edition-cnn-com \
                 spec.trafficPolicy.portLevelSettings[0].tls"
            ))
        )]
    );
    assert!(
        rule.steer_reason(80).is_some_and(|r| r
            .contains("direct-cnn-through-egress-gateway routes port 80 to the egress gateway")),
        "{rule:?}"
    );

    // The relay stands in for the gateway: requests the mesh's route sends there are matched
    // against the gateway's own routes next, with their retries, timeout and header operations.
    let gateway = &rule.steered[0].requests[0].then;
    assert_eq!(
        gateway
            .as_ref()
            .map(|g| g.iter().map(|r| r.by.as_str()).collect::<Vec<_>>()),
        Some(vec![
            "VirtualService/default/direct-cnn-through-egress-gateway spec.http[1]"
        ])
    );
    let more = yaml.replace(
        "        port: {number: 443}\n      weight: 100\n",
        "        port: {number: 443}\n      weight: 100\n    retries: {attempts: 3}\n    timeout: 5s\n    headers: {request: {set: {x-via: gateway}}}\n",
    );
    assert_ne!(more, yaml);
    let (pol, d) = load_str(&more, Path::new("p.yaml"));
    assert!(!super::has_errors(&d), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let mesh = &plan.rules[0].steered[0].requests[0];
    assert_eq!(mesh.route.retries, 0);
    let gateway = &mesh.then.as_ref().expect("the gateway's routes")[0];
    assert_eq!(
        (gateway.route.retries, gateway.route.timeout),
        (3, Some(std::time::Duration::from_secs(5)))
    );
    assert_eq!(gateway.headers.request.len(), 1);
    assert_eq!(gateway.matches.len(), 1, "the gateway's match on port 80");
}

/// A route bound to the mesh and the gateway alike that sends requests to the gateway is not one
/// of the gateway's own routes (it would send them there again); the gateway's own follow it.
#[test]
fn a_route_to_the_gateway_is_not_one_of_the_gateways_own() {
    let yaml = |extra: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  gateways: [mesh, egress]\n  http:\n  - route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]\n{extra}"
        )
    };
    let then = |extra: &str| {
        let (pol, d) = load_str(&yaml(extra), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        plan.rules[0].steered[0].requests[0]
            .then
            .as_ref()
            .map(|t| t.iter().map(|r| r.by.clone()).collect::<Vec<_>>())
    };
    assert_eq!(then(""), None);
    assert_eq!(
        then(
            "  - match: [{gateways: [egress], port: 80}]\n    route: [{destination: {host: api.example}}]\n"
        ),
        Some(vec!["VirtualService/default/v spec.http[1]".to_owned()])
    );
}

/// On a port the relay serves as HTTP, each request takes the first route it matches: by path
/// (exact, prefix, regex, case folded or not), method, authority and headers.
#[test]
fn requests_take_the_first_route_they_match() {
    let yaml = format!(
        "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - match: [{{uri: {{prefix: /Slow}}, ignoreUriCase: true}}]\n    route: [{{destination: {{host: api.example}}}}]\n    timeout: 1s\n  - match:\n    - method: {{exact: POST}}\n      headers: {{X-Retry: {{}}}}\n    - uri: {{regex: '/r/[0-9]+'}}\n      authority: {{prefix: api.}}\n    route: [{{destination: {{host: api.example}}}}]\n    retries: {{attempts: 3}}\n  - match: [{{uri: {{exact: /}}}}, {{headers: {{tier: {{exact: gold}}}}}}]\n    route: [{{destination: {{host: api.example}}}}]\n  - match: [{{queryParams: {{v: {{regex: '[12]'}}, debug: {{}}}}, withoutHeaders: {{canary: {{}}}}, scheme: {{exact: http}}}}]\n    route: [{{destination: {{host: api.example}}}}]\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let requests = &plan.rules[0].steered[0].requests;
    assert_eq!(requests.len(), 4);
    // Which route a request takes: its index, or none.
    let route = |method: &str, path: &str, authority: &str, headers: &[(&str, &str)]| {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        requests.iter().position(|r| {
            r.matches.iter().any(|m| {
                m.matches(method, path, query, Some(authority), |n| {
                    headers.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
                })
            })
        })
    };
    assert_eq!(route("GET", "/slow/x", "api.example", &[]), Some(0));
    assert_eq!(route("GET", "/SLOW", "api.example", &[]), Some(0));
    assert_eq!(
        route("POST", "/x", "api.example", &[("x-retry", "")]),
        Some(1)
    );
    assert_eq!(route("POST", "/x", "api.example", &[]), None, "no header");
    assert_eq!(route("GET", "/r/12", "api.example:80", &[]), Some(1));
    assert_eq!(
        route("GET", "/r/12/x", "api.example", &[]),
        None,
        "regex matched whole"
    );
    assert_eq!(route("GET", "/r/12", "other", &[]), None);
    assert_eq!(route("GET", "/", "api.example", &[]), Some(2));
    assert_eq!(
        route("GET", "/x", "api.example", &[("tier", "gold")]),
        Some(2)
    );
    assert_eq!(route("GET", "/x", "api.example", &[("tier", "Gold")]), None);
    assert_eq!(route("GET", "/q?v=2&debug", "api.example", &[]), Some(3));
    assert_eq!(route("GET", "/q?debug=&v=1", "api.example", &[]), Some(3));
    assert_eq!(route("GET", "/q?v=3&debug", "api.example", &[]), None, "v");
    assert_eq!(route("GET", "/q?v=2", "api.example", &[]), None, "no debug");
    assert_eq!(
        route("GET", "/q?v=2&debug", "api.example", &[("canary", "1")]),
        None,
        "without the canary header only"
    );
    assert_eq!(
        requests
            .iter()
            .map(|r| (r.route.retries, r.route.timeout))
            .collect::<Vec<_>>(),
        [
            (0, Some(std::time::Duration::from_secs(1))),
            (3, None),
            (0, None),
            (0, None)
        ]
    );
    assert_eq!(requests[2].by, "VirtualService/default/v spec.http[2]");

    // A regex that does not compile, and a match that sets two kinds: errors naming the field.
    let bad = yaml
        .replace("'/r/[0-9]+'", "'/r/[0-9'")
        .replace("{exact: gold}", "{exact: gold, prefix: g}");
    let errors = errors_of(&bad);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("VirtualService/default/v: spec.http[1].match[1].uri: regex `/r/[0-9`"),
        "{errors:?}"
    );
    assert!(
        errors[1]
            .contains("spec.http[2].match[1].headers.tier: set one of exact, prefix and regex"),
        "{errors:?}"
    );
}

/// A route's header operations, and its first destination's, in order; fields the relay must
/// set itself, and names or values that are not HTTP's, are errors naming the field.
#[test]
fn header_operations_compile_in_order_and_bad_ones_are_errors() {
    let yaml = |ops: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route:\n    - destination: {{host: api.example}}\n      headers: {{request: {{add: {{x-b: '2'}}}}}}\n    timeout: 1s\n    headers: {ops}\n"
        )
    };
    let (pol, d) = load_str(
        &yaml("{request: {set: {x-a: '1'}, remove: [x-c]}, response: {add: {x-d: '4'}}}"),
        Path::new("p.yaml"),
    );
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let ops = &plan.rules[0].steered[0].requests[0].headers;
    let name = |n: &'static str| http::HeaderName::from_static(n);
    let value = |v: &'static str| http::HeaderValue::from_static(v);
    assert_eq!(
        ops.request,
        [
            HeaderOp::Remove(name("x-c")),
            HeaderOp::Set(name("x-a"), value("1")),
            HeaderOp::Add(name("x-b"), value("2"))
        ]
    );
    assert_eq!(ops.response, [HeaderOp::Add(name("x-d"), value("4"))]);
    for (ops, want) in [
        (
            "{request: {set: {host: evil.example}}}",
            "spec.http[0].headers.request.set: `host` is not a header egress sets",
        ),
        (
            "{response: {add: {'bad name': x}}}",
            "spec.http[0].headers.response.add: `bad name` is not a header name",
        ),
        (
            "{request: {set: {x-a: \"a\\nb\"}}}",
            "spec.http[0].headers.request.set.x-a: not a header value",
        ),
    ] {
        let errors = errors_of(&yaml(ops));
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{ops}: {errors:?}"
        );
    }
}

/// A route's `rewrite`: the prefix its match matched, else the whole path, the query kept; a
/// value that is no path or host is an error naming the field.
#[test]
fn a_rewrite_replaces_what_the_match_matched() {
    let yaml = |rewrite: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - match: [{{uri: {{prefix: /v1/}}}}, {{uri: {{exact: /old}}}}]\n    route: [{{destination: {{host: api.example}}}}]\n    timeout: 1s\n    rewrite: {rewrite}\n"
        )
    };
    let (pol, d) = load_str(
        &yaml("{uri: /v2/, authority: 'api.example:8080'}"),
        Path::new("p.yaml"),
    );
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let route = &plan.rules[0].steered[0].requests[0];
    let rw = &route.rewrite;
    assert_eq!(
        rw.authority.as_ref().map(|a| a.as_str()),
        Some("api.example:8080")
    );
    let (prefix, exact) = (Some(&route.matches[0]), Some(&route.matches[1]));
    assert_eq!(rw.path("/v1/users", Some("a=1"), prefix), "/v2/users?a=1");
    assert_eq!(rw.path("/old", None, exact), "/v2/");
    assert_eq!(rw.path("/any", None, None), "/v2/");
    let none = super::compile::Rewrite::default();
    assert_eq!(none.path("/v1/users", Some("a=1"), prefix), "/v1/users?a=1");

    // uriRegexRewrite: every match in the path, capture groups as RE2 writes them, the query
    // kept; a `$` is a dollar sign, not a group.
    let (pol, d) = load_str(
        &yaml(r"{uriRegexRewrite: {match: '^/v1/([^/]+)/(\w+)', rewrite: '/v2/\2/\1$\\'}}"),
        Path::new("p.yaml"),
    );
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let rw = &plan.rules[0].steered[0].requests[0].rewrite;
    assert_eq!(
        rw.path("/v1/users/list/x", Some("a=1"), prefix),
        r"/v2/list/users$\/x?a=1"
    );
    let (pol, _) = load_str(
        &yaml("{uriRegexRewrite: {match: '-', rewrite: _}}"),
        Path::new("p.yaml"),
    );
    let rw = &compile(&pol, None).0.rules[0].steered[0].requests[0].rewrite;
    assert_eq!(rw.path("/a-b/c-d", None, None), "/a_b/c_d");

    for (rewrite, want) in [
        ("{uri: v2}", "spec.http[0].rewrite.uri: `v2` is not a path"),
        (
            "{authority: 'bad host'}",
            "spec.http[0].rewrite.authority: `bad host` is not a host",
        ),
        (
            "{uri: /v2/, uriRegexRewrite: {match: a, rewrite: b}}",
            "spec.http[0].rewrite.uriRegexRewrite: a rewrite has a uri or a uriRegexRewrite, not both",
        ),
        (
            "{uriRegexRewrite: {rewrite: b}}",
            "spec.http[0].rewrite.uriRegexRewrite.match: required",
        ),
        (
            "{uriRegexRewrite: {match: '(a'}}",
            "spec.http[0].rewrite.uriRegexRewrite.rewrite: required",
        ),
        (
            "{uriRegexRewrite: {match: '(a', rewrite: b}}",
            "spec.http[0].rewrite.uriRegexRewrite.match: `(a` is not a regex RE2 takes",
        ),
        (
            r"{uriRegexRewrite: {match: '(a)', rewrite: '\2'}}",
            r"spec.http[0].rewrite.uriRegexRewrite.rewrite: `\2` names group \2, which the match does not have",
        ),
        (
            r"{uriRegexRewrite: {match: '(a)', rewrite: '\n'}}",
            r"spec.http[0].rewrite.uriRegexRewrite.rewrite: `\n`: a backslash must come before a digit or another backslash",
        ),
    ] {
        let errors = errors_of(&yaml(rewrite));
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{rewrite}: {errors:?}"
        );
    }
}

/// A route's `directResponse` or `redirect`: checked as Istio checks them, and a redirect's
/// `Location` made from the request's parts and its own.
#[test]
fn local_answers_are_checked_and_redirects_located() {
    let yaml = |action: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n    timeout: 1s\n{action}"
        )
    };
    let answer = |action: &str| {
        let (pol, d) = load_str(&yaml(action), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        plan.rules[0].steered[0].requests[0]
            .answer
            .clone()
            .expect("an answer")
    };
    let r = answer("    redirect: {scheme: https, port: 8443}\n");
    assert_eq!(
        r.location("api.example:80", "/a", Some("q=1")).as_deref(),
        Some("https://api.example:8443/a?q=1")
    );
    let r = answer("    redirect: {authority: other.example, uri: /b?x=2}\n");
    assert_eq!(
        r.location("api.example", "/a", Some("q=1")).as_deref(),
        Some("http://other.example/b?x=2"),
        "a redirect's own query replaces the request's"
    );
    assert_eq!(
        answer("    directResponse: {status: 503, body: {string: down}}\n"),
        super::compile::LocalAnswer::Direct {
            status: 503,
            body: "down".to_owned()
        }
    );
    for (action, want) in [
        (
            "    directResponse: {status: 700}\n",
            "spec.http[0].directResponse.status: 700 is not from 200 to 599",
        ),
        (
            "    directResponse: {status: 200}\n    redirect: {uri: /x}\n",
            "a route has a redirect or a direct response, not both",
        ),
        (
            "    redirect: {redirectCode: 200}\n",
            "spec.http[0].redirect.redirectCode: 200 is not a redirect status",
        ),
        (
            "    redirect: {scheme: ftp}\n",
            "spec.http[0].redirect.scheme: `ftp` is not http or https",
        ),
    ] {
        let errors = errors_of(&yaml(action));
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{action}: {errors:?}"
        );
    }
}

/// A route's `fault`: checked as Istio checks it, its shares in millionths, and a route that
/// has one steers its HTTP port (only the relay can delay or abort a request).
#[test]
fn faults_are_checked_and_steer_an_http_port() {
    use super::compile::{Abort, Fault};
    use std::time::Duration;
    let yaml = |fault: &str| {
        format!(
            "{SE}  hosts: [api.example]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - route: [{{destination: {{host: api.example}}}}]\n    fault: {fault}\n"
        )
    };
    let fault = |f: &str| {
        let (pol, d) = load_str(&yaml(f), Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        let steered = &plan.rules[0].steered;
        assert_eq!(steered.len(), 1, "{f}: the port is steered");
        assert!(
            steered[0].why.contains("gives port 80's requests a fault"),
            "{}",
            steered[0].why
        );
        steered[0].requests[0].fault.expect("a fault")
    };
    assert_eq!(
        fault("{abort: {httpStatus: 503, percentage: {value: 12.5}}}"),
        Fault {
            delay: None,
            abort: Some((Abort::Http(503), 125_000)),
        }
    );
    assert_eq!(
        fault(
            "{delay: {fixedDelay: 2s, percentage: {value: 100}}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.0001}}}"
        ),
        Fault {
            delay: Some((Duration::from_secs(2), 1_000_000)),
            abort: Some((Abort::Grpc(14), 1)),
        }
    );
    // Istio's deprecated integer percent, where no percentage is given.
    assert_eq!(
        fault("{delay: {fixedDelay: 5ms, percent: 50}}").delay,
        Some((Duration::from_millis(5), 500_000))
    );
    // Unset, as in Istio: no request; said.
    let d = diags_of(&yaml("{abort: {httpStatus: 500}}"));
    assert_eq!(
        d,
        [
            "p.yaml:10:1: warning: VirtualService/default/v: spec.http[0].fault.abort.percentage is unset: as in Istio, no request is aborted (`percentage: {value: 100}` takes every one)"
        ]
    );
    for (f, want) in [
        ("{}", "spec.http[0].fault: neither a delay nor an abort"),
        (
            "{abort: {httpStatus: 700, percentage: {value: 1}}}",
            "spec.http[0].fault.abort.httpStatus: 700 is not from 200 to 599",
        ),
        (
            "{abort: {grpcStatus: BROKEN, percentage: {value: 1}}}",
            "spec.http[0].fault.abort.grpcStatus: `BROKEN` is not a gRPC status",
        ),
        (
            "{abort: {httpStatus: 503, grpcStatus: INTERNAL, percentage: {value: 1}}}",
            "spec.http[0].fault.abort: one of httpStatus, grpcStatus and http2Error, not several",
        ),
        (
            "{abort: {http2Error: REFUSED_STREAM, percentage: {value: 1}}}",
            "spec.http[0].fault.abort.http2Error: not supported, as in Istio (use httpStatus)",
        ),
        (
            "{abort: {percentage: {value: 1}}}",
            "spec.http[0].fault.abort: needs an httpStatus or a grpcStatus",
        ),
        (
            "{abort: {httpStatus: 503, percentage: {value: 101}}}",
            "spec.http[0].fault.abort.percentage: 101 is not from 0 to 100",
        ),
        (
            "{delay: {percentage: {value: 1}}}",
            "spec.http[0].fault.delay.fixedDelay: required",
        ),
        (
            "{delay: {fixedDelay: 0s, percentage: {value: 1}}}",
            "spec.http[0].fault.delay.fixedDelay: 0ns is under 1ms, Istio's least",
        ),
    ] {
        let errors = errors_of(&yaml(f));
        assert!(
            errors.len() == 1 && errors[0].contains(want),
            "{f}: {errors:?}"
        );
    }
}

/// On a port served as HTTP, a route that answers some requests itself steers the port even
/// when the first route goes direct: else its answer could not be given. On a TLS port it does
/// not: the relay would pass the TLS through.
#[test]
fn a_route_that_answers_requests_steers_an_http_port() {
    let yaml = format!(
        "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n  - {{number: 443, name: https, protocol: HTTPS}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n  - match: [{{uri: {{prefix: /public}}}}]\n    route: [{{destination: {{host: api.example}}}}]\n  - match: [{{uri: {{prefix: /admin}}}}]\n    directResponse: {{status: 403}}\n  - route: [{{destination: {{host: api.example}}}}]\n"
    );
    let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
    assert!(d.is_empty(), "{d:?}");
    let (plan, d) = compile(&pol, None);
    assert!(d.is_empty(), "{d:?}");
    let rule = &plan.rules[0];
    let steered: Vec<_> = rule
        .steered
        .iter()
        .map(|s| (s.port, s.why.as_str()))
        .collect();
    assert_eq!(
        steered,
        [(
            80,
            "VirtualService/default/v gives port 80's requests a fault, a direct response, a \
             redirect, a rewrite, header operations or a mirror (spec.http[1])"
        )]
    );
    assert_eq!(rule.steered[0].requests.len(), 3);
}

/// On a port served as HTTP, routes that each match some requests only leave the rest unrouted,
/// which Envoy answers 404: the port is steered for the relay to answer them. A route without a
/// request condition (no match, a match on the port alone, `uri` prefix `/`) takes every request
/// and nothing is left to answer; on a TLS port HTTP routes do not apply.
#[test]
fn routes_that_match_some_requests_only_steer_an_http_port() {
    let steered = |routes: &str| -> Vec<(u16, String)> {
        let yaml = format!(
            "{SE}  hosts: [api.example]\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n  - {{number: 443, name: https, protocol: HTTPS}}\n  - {{number: 8080, name: other, protocol: HTTP}}\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [api.example]\n  http:\n{routes}"
        );
        let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        plan.rules[0]
            .steered
            .iter()
            .map(|s| (s.port, s.why.clone()))
            .collect()
    };
    let why = |port: u16| {
        (
            port,
            format!(
                "VirtualService/default/v routes some of port {port}'s requests only: the others \
                 are answered 404, as Envoy answers them (spec.http)"
            ),
        )
    };
    let route = "    route: [{destination: {host: api.example}}]\n";
    let only = |matches: &str| format!("  - match: {matches}\n{route}");
    assert_eq!(
        steered(&only("[{uri: {prefix: /v1/}}, {method: {exact: GET}}]")),
        [why(80), why(8080)]
    );
    assert_eq!(
        steered(&only("[{port: 80, headers: {x-team: {exact: a}}}]")),
        [why(80)],
        "port 8080 has no route at all: Istio's default route takes it"
    );
    for every in [
        "",
        "match: [{port: 80}, {port: 8080}]\n    ",
        "match: [{uri: {prefix: /}}]\n    ",
    ] {
        let routes = format!(
            "{}  - {every}{}",
            only("[{uri: {prefix: /v1/}}]"),
            route.trim_start()
        );
        assert_eq!(steered(&routes), [], "{routes}");
    }
    // A catch-all for port 80 alone leaves 8080's requests to the first route.
    assert_eq!(
        steered(&format!(
            "{}  - match: [{{port: 80}}]\n{route}",
            only("[{uri: {prefix: /v1/}}]")
        )),
        [why(8080)]
    );
}

/// A gRPC port is told by its client's first bytes, plain HTTP/2 served; where a
/// DestinationRule asks for TLS, its requests leave with the TLS egress originates.
#[test]
fn a_grpc_port_takes_plain_http2_and_a_destination_rules_tls() {
    let compiled = |dr: &str| {
        let yaml = format!(
            "{SE}  hosts: [grpc.example]\n  ports: [{{number: 9000, name: grpc, protocol: GRPC}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [grpc.example]\n  http:\n  - route: [{{destination: {{host: grpc.example}}}}]\n    timeout: 5s\n{dr}"
        );
        let (pol, d) = load_str(&yaml, Path::new("p.yaml"));
        assert!(d.is_empty(), "{d:?}");
        let (plan, d) = compile(&pol, None);
        assert!(d.is_empty(), "{d:?}");
        let rule = &plan.rules[0];
        let carry: Vec<_> = rule.steered.iter().map(|s| s.carry).collect();
        let tls: Vec<_> = rule
            .originate
            .iter()
            .map(|o| (o.port, o.tls.as_ref().map(|t| t.mode)))
            .collect();
        (carry, tls)
    };
    assert_eq!(compiled(""), (vec![Carry::Detect], vec![]));
    assert_eq!(
        compiled(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: grpc.example\n  trafficPolicy: {tls: {mode: SIMPLE}}\n"
        ),
        (vec![Carry::Detect], vec![(9000, Some("SIMPLE"))])
    );
}
