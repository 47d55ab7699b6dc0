//! Root-only: TLS origination. curl speaks plain HTTP from the enforced cgroup; the kernel steers
//! it to the relay, which speaks verified TLS (SIMPLE and MUTUAL) to real TLS servers in a netns
//! world, with certificates made per run.
use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use egress_agent::{
    agent::{Agent, AgentConfig},
    events::Record,
    metrics::{LimitLabels, MirrorLabels},
    policy::Mode,
    relay::RelayConfig,
};
use egress_tests::{
    Close, HeldProbe, TestCgroup, World, assert_no_relay_record_left, at, log_path, port_checks,
    probe_with_pid, records, shown,
    tls::{Pki, Seen},
    wait_for, wait_record,
};

/// Port 80 of each host is plain HTTP for the application and TLS on 443 upstream:
/// plain.test (host 20) with the run's CA; wrong-ca.test (21) whose server has a certificate of
/// another CA; wrong-name.test (25) whose certificate names another host; mutual.test (24) that wants
/// a client certificate; retry.test (22, refusing, and 23) with retries; kept.test (26) whose
/// server keeps connections open for more requests.
fn policy(ca: &Path, client: &(std::path::PathBuf, std::path::PathBuf)) -> String {
    let ca = ca.display();
    let (cert, key) = (client.0.display(), client.1.display());
    let mut yaml = String::new();
    for (name, host, tls) in [
        (
            "plain",
            "plain.test",
            format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        ),
        (
            "wrong-ca",
            "wrong-ca.test",
            format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        ),
        (
            "wrong-name",
            "wrong-name.test",
            format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        ),
        (
            "mutual",
            "mutual.test",
            format!(
                "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cert}, privateKey: {key}}}"
            ),
        ),
        (
            "retry",
            "retry.test",
            format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        ),
        (
            "kept",
            "kept.test",
            format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        ),
    ] {
        yaml += &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: shop}}
spec:
  host: {host}
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {tls}
---
"
        );
    }
    yaml += "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: retries, namespace: shop}
spec:
  hosts: [retry.test]
  http:
  - route: [{destination: {host: retry.test}}]
    retries: {attempts: 2, perTryTimeout: 2s}
    timeout: 8s
";
    yaml
}

struct Fixture {
    w: World,
    plain: Arc<Seen>,
    wrong_ca: Arc<Seen>,
    wrong_name: Arc<Seen>,
    mutual: Arc<Seen>,
    retry: Arc<Seen>,
    kept: Arc<Seen>,
    policy: String,
}

fn fixture() -> Fixture {
    let mut w = World::new();
    for h in 20..=26 {
        w.host(h);
    }
    let dir = std::env::temp_dir().join(&w.name);
    let pki = Pki::new(&dir, "trusted");
    let other = Pki::new(&dir, "other");
    let clients = Pki::new(&dir, "clients");
    let client = clients.client_files(&dir, "workload.test");
    let tls = |h: u8, config| w.tls_server(std::net::SocketAddr::new(w.v4(h), 443), config);
    let plain = tls(20, pki.server(&["plain.test"]));
    let wrong_ca = tls(21, other.server(&["wrong-ca.test"]));
    let wrong_name = tls(25, pki.server(&["elsewhere.test"]));
    let mutual = tls(24, pki.mutual_server(&["mutual.test"], &clients));
    let retry = tls(23, pki.server(&["retry.test"]));
    let kept = w.tls_server_kept_alive(
        std::net::SocketAddr::new(w.v4(26), 443),
        pki.server(&["kept.test"]),
    );
    let records = [
        ("plain.test", w.v4(20)),
        ("wrong-ca.test", w.v4(21)),
        ("wrong-name.test", w.v4(25)),
        ("mutual.test", w.v4(24)),
        ("retry.test", w.v4(22)),
        ("retry.test", w.v4(23)),
        ("kept.test", w.v4(26)),
    ];
    w.start_dns(&records, 300);
    Fixture {
        policy: policy(&pki.ca_pem, &client),
        w,
        plain,
        wrong_ca,
        wrong_name,
        mutual,
        retry,
        kept,
    }
}

async fn agent(f: &Fixture, cg: &TestCgroup, log: &Path) -> Agent {
    Agent::start(AgentConfig {
        relay: RelayConfig {
            hello_timeout: Duration::from_millis(500),
            ..RelayConfig::default()
        },
        ..f.w
            .agent_config(&f.policy, Mode::RegistryOnly, cg, Some(log))
    })
    .await
    .expect("agent starts")
}

/// curl in the cgroup: plain HTTP to each URL's host, pinned to `ip`, on one connection; status
/// codes and bodies on stdout.
fn curl(cg: &TestCgroup, ip: IpAddr, urls: &[&str], extra: &[&str]) -> Output {
    curl_command(cg, ip, urls, extra)
        .output()
        .expect("run curl")
}

/// [`curl`], to be started.
fn curl_command(cg: &TestCgroup, ip: IpAddr, urls: &[&str], extra: &[&str]) -> Command {
    let mut cmd = cg.command("curl");
    cmd.args(["-sS", "--max-time", "15", "-w", "%{http_code}\n"]);
    for url in urls {
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("host");
        cmd.args(["--resolve", &format!("{host}:80:{ip}")]);
    }
    cmd.args(extra)
        .args(urls)
        .stdout(std::process::Stdio::piped());
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn relay_record(log: &Path, host: &str) -> Record {
    wait_record(log, &format!("relay record of {host}"), |r| {
        r.kind == "relay" && r.sni.as_deref() == Some(host)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_leaves_as_verified_tls_simple_and_mutual() {
    let f = fixture();
    let cg = TestCgroup::new("originate");
    let log = log_path("originate");
    let a = agent(&f, &cg, &log).await;

    // Two requests on one client connection: the server closes after each, so the relay opens
    // a second TLS connection for the second.
    let out = curl(
        &cg,
        f.w.v4(20),
        &["http://plain.test/a", "http://plain.test/b"],
        &[],
    );
    assert_eq!(
        stdout(&out),
        "sni=plain.test\n200\nsni=plain.test\n200\n",
        "{out:?}"
    );
    assert_eq!(
        f.plain.names(),
        [Some("plain.test".to_owned()), Some("plain.test".to_owned())]
    );
    let r = relay_record(&log, "plain.test");
    let dst = at(f.w.v4(20), 80);
    assert_eq!(shown(r.dst), dst, "{r:?}");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(r.requests, Some(2), "{r:?}");
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(20), 443), "{r:?}");
    assert_eq!(r.host.as_deref(), Some("plain.test"), "{r:?}");
    assert_eq!(r.rule.as_deref(), Some("ServiceEntry/shop/plain"), "{r:?}");
    assert_eq!(r.comm.as_deref(), Some("curl"), "{r:?}");
    assert!(r.bytes_up.is_some_and(|b| b > 100), "{r:?}");
    assert!(r.bytes_down.is_some_and(|b| b > 100), "{r:?}");

    // MUTUAL: the server takes only clients with a certificate of its client CA.
    let out = curl(&cg, f.w.v4(24), &["http://mutual.test/"], &[]);
    assert_eq!(stdout(&out), "sni=mutual.test\n200\n", "{out:?}");
    assert_eq!(f.mutual.names(), [Some("mutual.test".to_owned())]);
    let r = relay_record(&log, "mutual.test");
    assert_eq!(r.origination.as_deref(), Some("MUTUAL"), "{r:?}");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");

    // A Host header of another rule's host, to plain.test's address: refused, never sent.
    let before = f.plain.accepted();
    let out = curl(
        &cg,
        f.w.v4(20),
        &["http://plain.test/"],
        &["-H", "Host: mutual.test"],
    );
    assert!(stdout(&out).ends_with("403\n"), "{out:?}");
    let r = wait_record(&log, "forged host refusal", |r| {
        r.kind == "relay" && r.outcome.as_deref() == Some("refused")
    });
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.contains("mutual.test is not a host of ServiceEntry/shop/plain")),
        "{r:?}"
    );
    assert_eq!(r.upstream, None, "{r:?}");
    assert_eq!(
        f.plain.accepted(),
        before,
        "a refused request reached upstream"
    );
    a.shutdown().await;
}

/// A route to a subset takes the subset's traffic policy, as Istio merges it over the rule's:
/// plain.test's rule originates TLS only in a subset, which its VirtualService's route names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_a_subset_takes_the_subsets_tls() {
    let f = fixture();
    let rule = "  host: plain.test\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n      tls:";
    let subset = "  host: plain.test\n  subsets:\n  - name: secure\n    trafficPolicy:\n      portLevelSettings:\n      - port: {number: 80}\n        tls:";
    let mut policy = f.policy.replacen(rule, subset, 1);
    assert_ne!(policy, f.policy, "plain.test's rule found");
    policy += "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: plain, namespace: shop}
spec:
  hosts: [plain.test]
  http:
  - route: [{destination: {host: plain.test, subset: secure}}]
";
    let cg = TestCgroup::new("subset");
    let log = log_path("subset");
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, f.w.v4(20), &["http://plain.test/"], &[]);
    assert_eq!(stdout(&out), "sni=plain.test\n200\n", "{out:?}");
    assert_eq!(f.plain.names(), [Some("plain.test".to_owned())]);
    let r = relay_record(&log, "plain.test");
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(20), 443), "{r:?}");
    a.shutdown().await;
}

/// A VirtualService's `http` route sends requests to another registered host, or splits them
/// by weight, request by request: to that host's addresses, under its DestinationRule (here
/// kept.test's, which names the server name to send), the Host header kept. A route to a host
/// no ServiceEntry has is answered 503 with the reason, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_route_sends_requests_to_another_host_or_splits_them_by_weight() {
    let f = fixture();
    let kept = "  host: kept.test\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: SIMPLE,";
    let mut policy = f
        .policy
        .replacen(kept, &format!("{kept} sni: kept.test,"), 1);
    assert_ne!(policy, f.policy, "kept.test's rule found");
    policy += "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: plain, namespace: shop}
spec:
  hosts: [plain.test]
  http:
  - match: [{uri: {prefix: /moved}}]
    route: [{destination: {host: kept.test}}]
  - match: [{uri: {prefix: /split}}]
    route:
    - destination: {host: plain.test}
      weight: 50
    - destination: {host: kept.test}
      weight: 50
  - match: [{uri: {prefix: /lost}}]
    route: [{destination: {host: nowhere.test}}]
  - route: [{destination: {host: plain.test}}]
";
    let cg = TestCgroup::new("originate-routed");
    let log = log_path("originate-routed");
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let plain = at(f.w.v4(20), 80);

    // Moved: kept.test's server, with the server name its DestinationRule gives.
    let out = curl(&cg, f.w.v4(20), &["http://plain.test/moved"], &[]);
    assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{out:?}");
    assert!(f.plain.names().is_empty(), "{:?}", f.plain.names());
    let r = wait_record(&log, "the moved request's record", |r| {
        r.kind == "relay" && shown(r.dst) == plain
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(26), 443), "{r:?}");
    assert_eq!(r.upstream_host.as_deref(), Some("kept.test"), "{r:?}");
    assert_eq!(r.host.as_deref(), Some("plain.test"), "{r:?}");

    // Split half and half over 24 requests on one client connection: plain.test's server
    // closes after each answer, so each of its requests is a handshake of its own.
    let urls = ["http://plain.test/split"; 24];
    let out = curl(&cg, f.w.v4(20), &urls, &[]);
    let answers = stdout(&out);
    let to_plain = answers.matches("sni=plain.test\n200\n").count();
    let to_kept = answers.matches("sni=kept.test\n200\n").count();
    assert_eq!(to_plain + to_kept, 24, "{out:?}");
    assert!(to_plain > 0 && to_kept > 0, "split {to_plain} / {to_kept}");
    assert_eq!(f.plain.names().len(), to_plain);

    // A route to a host no ServiceEntry has: 503, never sent.
    let before = (f.plain.accepted(), f.kept.accepted());
    let out = curl(&cg, f.w.v4(20), &["http://plain.test/lost"], &[]);
    assert_eq!(
        stdout(&out),
        "egress: nowhere.test is not a host of any ServiceEntry in force\n503\n",
        "{out:?}"
    );
    assert_eq!((f.plain.accepted(), f.kept.accepted()), before);
    a.shutdown().await;
}

/// A route's `mirrors`: a copy of each request goes to the mirror's host too, named `-shadow`,
/// its answer dropped; the client gets the answer of the route's destination alone. A mirror
/// no ServiceEntry has gets nothing, and each copy is counted by its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_mirror_gets_a_copy_of_each_request() {
    let f = fixture();
    f.w.host(27);
    let ip = f.w.v4(27);
    let shadow = f.w.http_server(std::net::SocketAddr::new(ip, 80));
    let policy = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow, namespace: shop}}
spec:
  hosts: [shadow.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: plain, namespace: shop}}
spec:
  hosts: [plain.test]
  http:
  - route: [{{destination: {{host: plain.test}}}}]
    mirrors:
    - destination: {{host: shadow.test}}
    - destination: {{host: nowhere.test}}
",
        f.policy
    );
    let cg = TestCgroup::new("originate-mirror");
    let log = log_path("originate-mirror");
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, f.w.v4(20), &["http://plain.test/copied?x=1"], &[]);
    assert_eq!(stdout(&out), "sni=plain.test\n200\n", "{out:?}");
    let mirrored = |outcome| {
        a.status
            .relay_mirrored
            .get_or_create(&MirrorLabels { outcome })
            .get()
    };
    wait_for("the copy's answer", Duration::from_secs(10), || {
        mirrored("answered") == 1
    });
    assert_eq!(shadow.names(), [Some("plain.test-shadow".to_owned())]);
    assert_eq!(shadow.paths(), ["/copied?x=1"]);
    assert_eq!(mirrored("refused"), 1);
    assert_eq!(mirrored("failed"), 0);
    assert_eq!(f.plain.names(), [Some("plain.test".to_owned())]);
    a.shutdown().await;
}

/// Over HTTP/2, a DestinationRule's `maxConcurrentStreams` bounds the requests in progress on
/// one upstream connection: one more opens another. Its `maxConnections` counts HTTP/2
/// connections too: where all are taken, the request waits for room on one, as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_take_another_connection_past_max_concurrent_streams() {
    let w = World::new();
    w.host(20);
    let ip = w.v4(20);
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "streams");
    let mut config = rustls::ServerConfig::clone(&pki.server(&["api.test"]));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server = w.h2_server(std::net::SocketAddr::new(ip, 8443), Some(Arc::new(config)));
    let cg = TestCgroup::new("originate-h2-streams");
    let log = log_path("originate-h2-streams");
    let agent = |pool: &str| {
        let policy = format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.test]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: shop}}
spec:
  host: api.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
    connectionPool: {pool}
",
            pki.ca_pem.display()
        );
        Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
    };
    let request = |path: &str| {
        let mut curl = cg.command("curl");
        curl.args([
            "-sS",
            "--max-time",
            "15",
            "--http1.1",
            "-w",
            "%{http_code}\n",
        ])
        .args(["--resolve", &format!("api.test:80:{ip}")])
        .arg(format!("http://api.test{path}"))
        .stdout(std::process::Stdio::piped());
        curl
    };
    let answered = |out: Output, path: &str| {
        assert_eq!(
            stdout(&out),
            format!("authority=api.test path={path} scheme=https\n200\n"),
            "{out:?}"
        );
    };
    let held = |n: usize| {
        wait_for(
            "the held request at the server",
            Duration::from_secs(10),
            || server.paths().iter().filter(|p| *p == "/held").count() == n,
        );
    };

    // One request in progress on the first connection: the next opens a second.
    let a = agent("{http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 1}}")
        .await
        .expect("agent starts");
    server.gate.shut();
    let first = request("/held").spawn().expect("curl");
    held(1);
    answered(request("/now").output().expect("curl"), "/now");
    assert_eq!(server.accepted(), 2);
    server.gate.open();
    answered(first.wait_with_output().expect("curl"), "/held");
    a.shutdown().await;

    // With one connection at most, the next waits for room on it.
    let a = agent(
        "{tcp: {maxConnections: 1}, http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 1}}",
    )
    .await
    .expect("agent starts");
    let before = server.accepted();
    server.gate.shut();
    let first = request("/held").spawn().expect("curl");
    held(2);
    let next = request("/next").spawn().expect("curl");
    wait_for("the next request to wait", Duration::from_secs(10), || {
        a.status.origination_waits.get() == 1
    });
    assert_eq!(server.accepted(), before + 1);
    server.gate.open();
    answered(first.wait_with_output().expect("curl"), "/held");
    answered(next.wait_with_output().expect("curl"), "/next");
    assert_eq!(
        server.accepted(),
        before + 1,
        "the next took the one connection"
    );
    a.shutdown().await;
}

/// A STATIC entry's virtual address on a port where egress originates TLS: the requests leave
/// as verified TLS to its endpoint (plain.test's server, host 20), as Istio's proxy sends them;
/// host 98 is the virtual address, where nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_virtual_address_leave_for_its_endpoint() {
    let f = fixture();
    let policy = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: virtual, namespace: shop}}
spec:
  hosts: [plain.test]
  addresses: [{}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: STATIC
  endpoints: [{{address: {}}}]
",
        f.policy,
        f.w.v4(98),
        f.w.v4(20)
    );
    let cg = TestCgroup::new("originate-virtual");
    let log = log_path("originate-virtual");
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, f.w.v4(98), &["http://plain.test/"], &[]);
    assert_eq!(stdout(&out), "sni=plain.test\n200\n", "{out:?}");
    let r = relay_record(&log, "plain.test");
    assert_eq!(
        r.rule.as_deref(),
        Some("ServiceEntry/shop/virtual"),
        "{r:?}"
    );
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(shown(r.dst), at(f.w.v4(98), 80), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(20), 443), "{r:?}");
    a.shutdown().await;
}

/// Istio's egress gateway for HTTP: a VirtualService routes a host's plain HTTP port to the
/// gateway. The relay serves it as HTTP: each request's host is checked against the kernel's
/// record, each takes the route its path matches, and goes on as plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_routed_to_the_gateway_goes_on_as_plain_http() {
    let f = fixture();
    f.w.host(27);
    let ip = f.w.v4(27);
    let web = f.w.http_server(std::net::SocketAddr::new(ip, 80));
    let cg = TestCgroup::new("originate-http");
    let log = log_path("originate-http");
    let policy = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-via-gateway, namespace: shop}}
spec:
  hosts: [web.test]
  gateways: [mesh, egress]
  http:
  - match: [{{gateways: [mesh], port: 80, uri: {{regex: '/[ab]?'}}}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
    timeout: 5s
  - match: [{{gateways: [mesh], port: 80, uri: {{prefix: /admin}}}}]
    route: [{{destination: {{host: web.test}}}}]
    directResponse: {{status: 403, body: {{string: no admin through the gateway}}}}
  - match: [{{gateways: [mesh], port: 80, uri: {{exact: /moved}}}}]
    route: [{{destination: {{host: web.test}}}}]
    redirect: {{uri: /new, redirectCode: 302}}
  - match: [{{gateways: [mesh], port: 80, uri: {{prefix: /old/}}}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
    rewrite: {{uri: /new/, authority: web.test:8080}}
  - match: [{{gateways: [mesh], port: 80, uri: {{prefix: /re/}}}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
    rewrite: {{uriRegexRewrite: {{match: '^/re/(\\w+)/(\\w+)', rewrite: '/\\2/\\1'}}}}
  - match: [{{gateways: [mesh], port: 80, uri: {{exact: /headers}}}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
    headers:
      request: {{set: {{x-egress: relayed}}, remove: [x-secret]}}
      response: {{add: {{x-route: headers}}}}
  - match: [{{gateways: [egress], port: 80}}]
    route: [{{destination: {{host: web.test}}}}]
",
        f.policy
    );
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");

    let out = curl(&cg, ip, &["http://web.test/a", "http://web.test/b"], &[]);
    assert_eq!(
        stdout(&out),
        "host=web.test\n200\nhost=web.test\n200\n",
        "{out:?}"
    );
    assert_eq!(
        web.names(),
        [Some("web.test".to_owned()), Some("web.test".to_owned())]
    );
    let r = wait_record(&log, "the relay record of web.test", |r| {
        r.kind == "relay" && r.host.as_deref() == Some("web.test")
    });
    assert_eq!(shown(r.dst), at(ip, 80), "{r:?}");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.origination, None, "{r:?}");
    assert_eq!(r.sni, None, "{r:?}");
    assert_eq!(r.requests, Some(2), "{r:?}");
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(shown(r.upstream), at(ip, 80), "{r:?}");
    assert_eq!(
        web.accepted(),
        1,
        "the second request went on the first's upstream connection"
    );
    // A client that half-closes once its request is sent still gets its answer.
    let (got, pid) = probe_with_pid(
        Some(&cg.path),
        &["http-half-close", &at(ip, 80), "web.test"],
    );
    assert_eq!(got, "ok:host=web.test");
    let r = wait_record(&log, "the half-closing client's record", |r| {
        r.kind == "relay" && r.pid == Some(pid)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.requests, Some(1), "{r:?}");

    // Another rule's host, to web.test's address: refused, never sent.
    let out = curl(&cg, ip, &["http://web.test/"], &["-H", "Host: plain.test"]);
    assert!(stdout(&out).ends_with("403\n"), "{out:?}");
    let r = wait_record(&log, "the forged host's refusal", |r| {
        r.kind == "relay" && r.outcome.as_deref() == Some("refused")
    });
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.contains("plain.test is not a host of ServiceEntry/shop/web")),
        "{r:?}"
    );
    assert_eq!(web.names().len(), 3, "a refused request reached upstream");
    // A target in absolute form names the host checked, and that is the host sent: a Host
    // header naming another does not reach the upstream.
    let out = curl(
        &cg,
        ip,
        &["http://web.test/"],
        &[
            "--request-target",
            "http://web.test/a",
            "-H",
            "Host: plain.test",
        ],
    );
    assert_eq!(stdout(&out), "host=web.test\n200\n", "{out:?}");
    // Nor does a second Host header (written by hand: curl sends one).
    let (got, _) = probe_with_pid(
        Some(&cg.path),
        &[
            "http-half-close",
            &at(ip, 80),
            "web.test\r\nHost: plain.test",
        ],
    );
    assert_eq!(got, "ok:host=web.test");
    assert_eq!(web.names().len(), 5);

    // A route's header operations, on the request sent on and on its answer.
    let out = curl(
        &cg,
        ip,
        &["http://web.test/headers"],
        &["-H", "x-secret: 1", "-H", "x-kept: 2", "-D", "-"],
    );
    let text = stdout(&out);
    assert!(
        text.ends_with("host=web.test\nx-kept=2\nx-egress=relayed\n200\n"),
        "{out:?}"
    );
    assert!(text.contains("\r\nx-route: headers\r\n"), "{out:?}");

    // A route's rewrite: the matched prefix and the authority, the query kept.
    let out = curl(&cg, ip, &["http://web.test/old/x?q=1"], &[]);
    assert_eq!(stdout(&out), "host=web.test:8080\n200\n", "{out:?}");
    assert_eq!(web.paths().last().map(String::as_str), Some("/new/x?q=1"));
    // A regex rewrite of the path: its groups swapped, the query kept.
    let out = curl(&cg, ip, &["http://web.test/re/a/b?q=1"], &[]);
    assert_eq!(stdout(&out), "host=web.test\n200\n", "{out:?}");
    assert_eq!(web.paths().last().map(String::as_str), Some("/b/a?q=1"));

    // Answers the relay gives itself: nothing sent on.
    let out = curl(&cg, ip, &["http://web.test/admin/users"], &[]);
    assert_eq!(stdout(&out), "no admin through the gateway403\n", "{out:?}");
    let out = curl(&cg, ip, &["http://web.test/moved?x=1"], &["-D", "-"]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 302 Found\r\n"), "{out:?}");
    assert!(
        text.contains("\r\nlocation: http://web.test/new?x=1\r\n"),
        "{out:?}"
    );
    assert_eq!(
        web.names().len(),
        8,
        "a locally answered request reached upstream"
    );

    // A path no route of the mesh's matches: 404, as Envoy answers it, and nothing sent on.
    let out = curl(&cg, ip, &["http://web.test/c"], &[]);
    assert!(stdout(&out).ends_with("404\n"), "{out:?}");
    let r = wait_record(&log, "the unrouted request's refusal", |r| {
        r.kind == "relay" && r.status == Some(404)
    });
    assert_eq!(
        r.reason.as_deref(),
        Some("no route of VirtualService/shop/web-via-gateway matches GET /c"),
        "{r:?}"
    );
    assert_eq!(web.names().len(), 8, "an unrouted request reached upstream");
    a.shutdown().await;
}

/// A VirtualService whose routes match some paths only, and ask nothing else of them, leaves the
/// other paths unrouted: Envoy answers them 404. The port is served by the relay for that alone,
/// and the matched paths go on as plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_route_matches_are_answered_404_where_routes_match_some_only() {
    let w = World::new();
    w.host(20);
    let ip = w.v4(20);
    let web = w.http_server(std::net::SocketAddr::new(ip, 80));
    let cg = TestCgroup::new("originate-unrouted");
    let log = log_path("originate-unrouted");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-v1, namespace: shop}}
spec:
  hosts: [api.test]
  http:
  - match: [{{uri: {{prefix: /v1/}}}}, {{uri: {{exact: /health}}, method: {{exact: GET}}}}]
    route: [{{destination: {{host: api.test}}}}]
"
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(
        &cg,
        ip,
        &["http://api.test/v1/items", "http://api.test/health"],
        &[],
    );
    assert_eq!(
        stdout(&out),
        "host=api.test\n200\nhost=api.test\n200\n",
        "{out:?}"
    );
    assert_eq!(web.paths(), ["/v1/items", "/health"]);
    for (path, method) in [("/admin", "GET"), ("/health", "POST")] {
        let out = curl(
            &cg,
            ip,
            &[&format!("http://api.test{path}")],
            &["-X", method],
        );
        assert!(stdout(&out).ends_with("404\n"), "{path}: {out:?}");
        let want = format!("no route of VirtualService/shop/api-v1 matches {method} {path}");
        let r = wait_record(&log, "the unrouted request's record", |r| {
            r.kind == "relay" && r.reason.as_deref() == Some(want.as_str())
        });
        assert_eq!(r.status, Some(404), "{r:?}");
    }
    assert_eq!(web.paths().len(), 2, "an unrouted request reached upstream");
    a.shutdown().await;
}

/// A DestinationRule's `h2UpgradePolicy: UPGRADE`: a client's HTTP/1.1 requests go on as HTTP/2
/// over the TLS egress originates (ALPN `h2`), here to a server that speaks HTTP/2 alone, and
/// the answers come back as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_go_on_as_http2_where_a_destination_rule_upgrades_them() {
    let w = World::new();
    w.host(20);
    let ip = w.v4(20);
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "upgrade");
    let mut config = rustls::ServerConfig::clone(&pki.server(&["api.test"]));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server = w.h2_server(std::net::SocketAddr::new(ip, 8443), Some(Arc::new(config)));
    let cg = TestCgroup::new("originate-h2-upgrade");
    let log = log_path("originate-h2-upgrade");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.test]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: shop}}
spec:
  host: api.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
    connectionPool: {{http: {{h2UpgradePolicy: UPGRADE}}}}
",
        pki.ca_pem.display()
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = cg
        .command("curl")
        .args(["-sS", "--max-time", "15", "--http1.1"])
        .args(["-w", "%{http_code} %{http_version}\n"])
        .args(["--resolve", &format!("api.test:80:{ip}")])
        .args(["http://api.test/items", "http://api.test/more"])
        .output()
        .expect("run curl");
    assert_eq!(
        stdout(&out),
        "authority=api.test path=/items scheme=https\n200 1.1\n\
         authority=api.test path=/more scheme=https\n200 1.1\n",
        "{out:?}"
    );
    assert_eq!(
        server.accepted(),
        1,
        "the requests shared one HTTP/2 connection"
    );
    a.shutdown().await;
}

/// Where the mesh's route sends requests to an egress gateway, the relay stands in for it: each
/// request, as the mesh's route changed it, takes the first of the gateway's own routes it
/// matches, with that route's rewrite, header operations and own answers; one that matches none
/// is answered 404, as the gateway would answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_routes_take_the_requests_the_mesh_sends_it() {
    let w = World::new();
    w.host(22);
    let ip = w.v4(22);
    let web = w.http_server(std::net::SocketAddr::new(ip, 80));
    let cg = TestCgroup::new("originate-gateway-routes");
    let log = log_path("originate-gateway-routes");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-via-gateway, namespace: shop}}
spec:
  hosts: [web.test]
  gateways: [mesh, egress]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
    headers: {{request: {{set: {{x-mesh: '1'}}}}}}
  - match: [{{gateways: [egress], port: 80, uri: {{prefix: /blocked}}}}]
    directResponse: {{status: 403, body: {{string: blocked at the gateway}}}}
  - match: [{{gateways: [egress], port: 80, uri: {{prefix: /hdr}}, headers: {{x-mesh: {{exact: '1'}}}}}}]
    directResponse: {{status: 200, body: {{string: the mesh's header seen}}}}
  - match: [{{gateways: [egress], port: 80, uri: {{prefix: /v1/}}}}]
    route: [{{destination: {{host: web.test}}}}]
    rewrite: {{uri: /v2/}}
    headers:
      request: {{set: {{x-gateway: '1'}}}}
      response: {{add: {{x-gateway: answered}}}}
"
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, ip, &["http://web.test/v1/items?q=1"], &["-D", "-"]);
    let text = stdout(&out);
    assert!(
        text.ends_with("host=web.test\nx-mesh=1\nx-gateway=1\n200\n"),
        "{out:?}"
    );
    assert!(text.contains("\r\nx-gateway: answered\r\n"), "{out:?}");
    assert_eq!(web.paths(), ["/v2/items?q=1"]);

    let out = curl(&cg, ip, &["http://web.test/blocked"], &[]);
    assert_eq!(stdout(&out), "blocked at the gateway403\n", "{out:?}");
    let out = curl(&cg, ip, &["http://web.test/hdr"], &[]);
    assert_eq!(stdout(&out), "the mesh's header seen200\n", "{out:?}");
    let out = curl(&cg, ip, &["http://web.test/other"], &[]);
    assert!(stdout(&out).ends_with("404\n"), "{out:?}");
    let r = wait_record(&log, "the request no gateway route takes", |r| {
        r.kind == "relay" && r.status == Some(404)
    });
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "no route of VirtualService/shop/web-via-gateway at the egress gateway matches GET /other"
        ),
        "{r:?}"
    );
    assert_eq!(
        web.paths().len(),
        1,
        "a request the gateway answered was sent on"
    );
    a.shutdown().await;
}

/// A route's `fault`, as Envoy's fault filter applies it: an abort answered by the relay and
/// never sent on (an HTTP status, or a gRPC status in a 200's `grpc-status`), a delay before the
/// request goes on, and a fault for no share of the requests never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_fault_delays_or_aborts_its_requests() {
    let w = World::new();
    w.host(21);
    let ip = w.v4(21);
    let web = w.http_server(std::net::SocketAddr::new(ip, 80));
    let cg = TestCgroup::new("originate-fault");
    let log = log_path("originate-fault");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-faults, namespace: shop}}
spec:
  hosts: [api.test]
  http:
  - match: [{{uri: {{prefix: /abort}}}}]
    route: [{{destination: {{host: api.test}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
  - match: [{{uri: {{prefix: /grpc}}}}]
    route: [{{destination: {{host: api.test}}}}]
    fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}
  - match: [{{uri: {{prefix: /slow}}}}]
    route: [{{destination: {{host: api.test}}}}]
    fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}
  - match: [{{uri: {{prefix: /never}}}}]
    route: [{{destination: {{host: api.test}}}}]
    fault: {{abort: {{httpStatus: 500, percentage: {{value: 0}}}}}}
"
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, ip, &["http://api.test/abort/x"], &[]);
    assert_eq!(stdout(&out), "fault filter abort503\n", "{out:?}");
    let r = wait_record(&log, "the aborted request's record", |r| {
        r.kind == "relay" && r.status == Some(503)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    let out = curl(
        &cg,
        ip,
        &["http://api.test/grpc.Health/Check"],
        &["-D", "-"],
    );
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{out:?}");
    assert!(text.contains("\r\ngrpc-status: 14\r\n"), "{out:?}");
    assert!(
        text.contains("\r\ngrpc-message: fault filter abort\r\n"),
        "{out:?}"
    );
    assert!(web.paths().is_empty(), "an aborted request was sent on");

    let out = curl(&cg, ip, &["http://api.test/never"], &[]);
    assert_eq!(stdout(&out), "host=api.test\n200\n", "{out:?}");
    let started = std::time::Instant::now();
    let out = curl(&cg, ip, &["http://api.test/slow"], &[]);
    let took = started.elapsed();
    assert_eq!(stdout(&out), "host=api.test\n200\n", "{out:?}");
    assert!(
        took >= Duration::from_millis(300),
        "answered in {took:?}, before the delay"
    );
    assert_eq!(web.paths(), ["/never", "/slow"]);
    a.shutdown().await;
}

/// gRPC without TLS (HTTP/2's preface, on a port declared GRPC) is served as HTTP/2: each
/// request's `:authority` is checked as a Host would be, and the request goes on as HTTP/2, on
/// a connection other clients' requests share, its trailers passed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_without_tls_is_served_as_http2_each_requests_host_checked() {
    let w = World::new();
    w.host(20);
    let ip = w.v4(20);
    let server = w.h2c_server(std::net::SocketAddr::new(ip, 8080));
    let cg = TestCgroup::new("originate-h2c");
    let log = log_path("originate-h2c");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpc, namespace: shop}}
spec:
  hosts: [grpc.test]
  ports: [{{number: 8080, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: grpc, namespace: shop}}
spec:
  hosts: [grpc.test]
  http:
  - match: [{{headers: {{x-fault: {{exact: abort}}}}}}]
    route: [{{destination: {{host: grpc.test}}}}]
    fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}
  - route: [{{destination: {{host: grpc.test}}}}]
    timeout: 5s
"
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let grpc = |extra: &[&str]| {
        cg.command("curl")
            .args(["-sS", "-v", "--max-time", "15", "--http2-prior-knowledge"])
            .args(["-w", "%{http_code} %{http_version}\n"])
            .args(["--resolve", &format!("grpc.test:8080:{ip}")])
            .args(["-H", "content-type: application/grpc"])
            .args(extra)
            // One request a run: curl 7.88 fails a second one on an HTTP/2 connection it
            // reuses, whatever the server.
            .arg("http://grpc.test:8080/shop.Catalog/List")
            .output()
            .expect("run curl")
    };
    let out = grpc(&[]);
    assert_eq!(
        stdout(&out),
        "authority=grpc.test:8080 path=/shop.Catalog/List scheme=http\n200 2\n",
        "{out:?}"
    );
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(
        verbose.contains("< grpc-status: 0"),
        "the trailer: {verbose}"
    );
    let r = wait_record(&log, "the gRPC client's record", |r| {
        r.kind == "relay" && r.requests == Some(1)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(r.sni, None, "{r:?}");
    // Another client's request goes on the same HTTP/2 connection, as Envoy shares one.
    let out = grpc(&[]);
    assert!(stdout(&out).ends_with("200 2\n"), "{out:?}");
    assert_eq!(
        server.accepted(),
        1,
        "a second HTTP/2 connection was opened"
    );

    // Another host, to grpc.test's address: refused, never sent.
    let out = grpc(&["-H", "host: other.test"]);
    assert!(stdout(&out).starts_with("egress: "), "{out:?}");
    assert!(stdout(&out).contains("403 2\n"), "{out:?}");
    assert_eq!(
        server.paths().len(),
        2,
        "a refused request reached the upstream"
    );

    // A fault's gRPC abort: a 200 whose headers end the stream with the status, nothing sent.
    let out = grpc(&["-H", "x-fault: abort"]);
    assert_eq!(stdout(&out), "200 2\n", "{out:?}");
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(verbose.contains("< grpc-status: 14"), "{verbose}");
    assert_eq!(
        server.paths().len(),
        2,
        "an aborted request reached the upstream"
    );
    a.shutdown().await;
}

/// TLS origination for gRPC: the client speaks HTTP/2 without TLS to a GRPC port whose
/// DestinationRule asks for TLS, and its requests leave as HTTP/2 over verified TLS (ALPN `h2`)
/// to the port's `targetPort`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_without_tls_leaves_as_http2_over_tls_where_a_destination_rule_asks() {
    let w = World::new();
    w.host(20);
    let ip = w.v4(20);
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "grpcs");
    let mut config = rustls::ServerConfig::clone(&pki.server(&["grpcs.test"]));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server = w.h2_server(std::net::SocketAddr::new(ip, 8443), Some(Arc::new(config)));
    let cg = TestCgroup::new("originate-h2-tls");
    let log = log_path("originate-h2-tls");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpcs, namespace: shop}}
spec:
  hosts: [grpcs.test]
  ports: [{{number: 8080, name: grpc, protocol: GRPC, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: grpcs, namespace: shop}}
spec:
  host: grpcs.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
",
        pki.ca_pem.display()
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = cg
        .command("curl")
        .args(["-sS", "-v", "--max-time", "15", "--http2-prior-knowledge"])
        .args(["-w", "%{http_code} %{http_version}\n"])
        .args(["--resolve", &format!("grpcs.test:8080:{ip}")])
        .arg("http://grpcs.test:8080/shop.Catalog/List")
        .output()
        .expect("run curl");
    assert_eq!(
        stdout(&out),
        "authority=grpcs.test:8080 path=/shop.Catalog/List scheme=https\n200 2\n",
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("< grpc-status: 0"),
        "{out:?}"
    );
    let r = wait_record(&log, "the gRPC client's record", |r| {
        r.kind == "relay" && r.requests == Some(1)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(r.sni.as_deref(), Some("grpcs.test"), "{r:?}");
    assert_eq!(shown(r.upstream), at(ip, 8443), "{r:?}");
    assert_eq!(server.accepted(), 1);
    a.shutdown().await;
}

/// Istio's "egress gateway with TLS origination" as documented: the mesh's port 80 goes to the
/// gateway, whose route sends it on to port 443 with the TLS a DestinationRule asks for there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_route_to_port_443_takes_that_ports_tls() {
    let mut w = World::new();
    w.host(20);
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "gateway");
    let ip = w.v4(20);
    let seen = w.tls_server(
        std::net::SocketAddr::new(ip, 443),
        pki.server(&["edition.test"]),
    );
    w.start_dns(&[("edition.test", ip)], 300);
    let cg = TestCgroup::new("originate-gateway");
    let log = log_path("originate-gateway");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: edition, namespace: shop}}
spec:
  hosts: [edition.test]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: direct-through-egress-gateway, namespace: shop}}
spec:
  hosts: [edition.test]
  gateways: [istio-egressgateway, mesh]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-egressgateway], port: 80}}]
    route: [{{destination: {{host: edition.test, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls, namespace: shop}}
spec:
  host: edition.test
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {}}}
",
        pki.ca_pem.display()
    );
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, ip, &["http://edition.test/"], &[]);
    assert_eq!(stdout(&out), "sni=edition.test\n200\n", "{out:?}");
    assert_eq!(seen.names(), [Some("edition.test".to_owned())]);
    let r = relay_record(&log, "edition.test");
    assert_eq!(shown(r.dst), at(ip, 80), "{r:?}");
    assert_eq!(shown(r.upstream), at(ip, 443), "{r:?}");
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_the_request() {
    let f = fixture();
    let cg = TestCgroup::new("originate-bad");
    let log = log_path("originate-bad");
    let a = agent(&f, &cg, &log).await;
    for (host, ip, seen, why) in [
        ("wrong-ca.test", f.w.v4(21), &f.wrong_ca, "UnknownIssuer"),
        (
            "wrong-name.test",
            f.w.v4(25),
            &f.wrong_name,
            "not valid for name",
        ),
    ] {
        let out = curl(&cg, ip, &[&format!("http://{host}/")], &[]);
        assert!(stdout(&out).ends_with("503\n"), "{host}: {out:?}");
        let r = relay_record(&log, host);
        assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
        assert!(
            r.reason.as_deref().is_some_and(|s| s.contains(why)),
            "{host}: {r:?}"
        );
        // A certificate failure is not retried, and the server never got a request.
        assert_eq!(r.attempts, Some(1), "{r:?}");
        assert_eq!(seen.accepted(), 1, "{host}");
        assert!(seen.names().is_empty(), "{host}: the handshake completed");
    }
    a.shutdown().await;
}

/// As Istio verifies an originated connection: against the DestinationRule's `subjectAltNames`,
/// else the ServiceEntry's, else the host. spiffe.test's certificate names a SPIFFE id and
/// another host, not spiffe.test; strict.test's names strict.test but not the id its
/// ServiceEntry lists; rule.test's DestinationRule lists its own name, which the certificate holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_entrys_subject_alt_names_are_verified_where_the_rule_lists_none() {
    const ID: &str = "spiffe://example.org/ns/shop/sa/api";
    let mut w = World::new();
    for h in 20..=22 {
        w.host(h);
    }
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "sans");
    let server = |h: u8, names: &[&str]| {
        w.tls_server(std::net::SocketAddr::new(w.v4(h), 443), pki.server(names))
    };
    let spiffe = server(20, &[ID, "api.internal"]);
    let strict = server(21, &["strict.test"]);
    let rule = server(22, &["rule.test"]);
    w.start_dns(
        &[
            ("spiffe.test", w.v4(20)),
            ("strict.test", w.v4(21)),
            ("rule.test", w.v4(22)),
        ],
        300,
    );
    let ca = pki.ca_pem.display();
    let mut policy = String::new();
    for (name, se_names, dr_names) in [
        ("spiffe", format!("['{ID}']"), ""),
        (
            "strict",
            "['spiffe://example.org/ns/shop/sa/other']".to_owned(),
            "",
        ),
        (
            "rule",
            "['spiffe://example.org/ns/shop/sa/other']".to_owned(),
            ", subjectAltNames: [rule.test]",
        ),
    ] {
        policy += &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{name}.test]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
  subjectAltNames: {se_names}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: shop}}
spec:
  host: {name}.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}{dr_names}}}
---
"
        );
    }
    let cg = TestCgroup::new("originate-sans");
    let log = log_path("originate-sans");
    let a = Agent::start(w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");

    let out = curl(&cg, w.v4(20), &["http://spiffe.test/"], &[]);
    assert_eq!(stdout(&out), "sni=spiffe.test\n200\n", "{out:?}");
    assert_eq!(
        relay_record(&log, "spiffe.test").outcome.as_deref(),
        Some("ok")
    );
    assert_eq!(spiffe.names(), [Some("spiffe.test".to_owned())]);

    // The host's own name is not enough where the ServiceEntry lists others.
    let out = curl(&cg, w.v4(21), &["http://strict.test/"], &[]);
    assert!(stdout(&out).ends_with("503\n"), "{out:?}");
    let r = relay_record(&log, "strict.test");
    assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
    assert!(
        r.reason.as_deref().is_some_and(|s| s.contains(
            "the certificate names none of subjectAltNames [spiffe://example.org/ns/shop/sa/other]"
        )),
        "{r:?}"
    );
    assert_eq!(strict.accepted(), 1);
    assert!(strict.names().is_empty(), "the handshake completed");

    let out = curl(&cg, w.v4(22), &["http://rule.test/"], &[]);
    assert_eq!(stdout(&out), "sni=rule.test\n200\n", "{out:?}");
    assert_eq!(rule.names(), [Some("rule.test".to_owned())]);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_originated_request_is_retried_on_the_hosts_other_address() {
    let f = fixture();
    let cg = TestCgroup::new("originate-retry");
    let log = log_path("originate-retry");
    let a = agent(&f, &cg, &log).await;
    // retry.test's first address refuses on 443; the retry goes to its other address.
    let out = curl(&cg, f.w.v4(22), &["http://retry.test/"], &[]);
    assert_eq!(stdout(&out), "sni=retry.test\n200\n", "{out:?}");
    let r = relay_record(&log, "retry.test");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(23), 443), "{r:?}");
    assert_eq!(f.retry.names(), [Some("retry.test".to_owned())]);
    a.shutdown().await;
}

/// A DestinationRule's `loadBalancer.simple` chooses each request's first address: round robin
/// takes retry.test's addresses in turn (22, which refuses, then 23), where without it every
/// request tries the dialled 22 first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_takes_the_next_address_under_round_robin() {
    let f = fixture();
    let cg = TestCgroup::new("originate-balance");
    let log = log_path("originate-balance");
    let a = agent_with(
        &f,
        &cg,
        &log,
        "retry.test",
        "loadBalancer: {simple: ROUND_ROBIN}",
    )
    .await;
    let urls = [
        "http://retry.test/a",
        "http://retry.test/b",
        "http://retry.test/c",
    ];
    let out = curl(&cg, f.w.v4(22), &urls, &[]);
    assert_eq!(stdout(&out), "sni=retry.test\n200\n".repeat(3), "{out:?}");
    let r = relay_record(&log, "retry.test");
    assert_eq!(r.requests, Some(3), "{r:?}");
    assert_eq!(r.attempts, Some(2 + 1 + 2), "{r:?}");
    a.shutdown().await;
}

/// A DestinationRule's `consistentHash`: each request goes first to the address its hash
/// chooses, the same for the same header value, whichever address was dialled; other values
/// take the other address. retry.test's 22 refuses, so a request there takes two attempts.
/// With `httpCookie` and a `ttl`, a request without the cookie gets one made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_hash_sends_the_same_key_to_the_same_address() {
    let f = fixture();
    let cg = TestCgroup::new("originate-hash");
    let log = log_path("originate-hash");
    let a = agent_with(
        &f,
        &cg,
        &log,
        "retry.test",
        "loadBalancer: {consistentHash: {httpHeaderName: x-user}}",
    )
    .await;
    let urls = ["http://retry.test/a", "http://retry.test/b"];
    for user in 0..12 {
        let header = format!("x-user: user-{user}");
        let out = curl(&cg, f.w.v4(22), &urls, &["-H", &header]);
        assert_eq!(stdout(&out), "sni=retry.test\n200\n".repeat(2), "{out:?}");
    }
    let attempts = || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "relay" && r.sni.as_deref() == Some("retry.test"))
            .map(|r| r.attempts.unwrap_or(0))
            .collect::<Vec<_>>()
    };
    wait_for("the twelve records", Duration::from_secs(10), || {
        attempts().len() == 12
    });
    let attempts = attempts();
    // Both requests of a user went first to one address: 1 + 1 or 2 + 2 attempts, never 3.
    assert!(attempts.iter().all(|&n| n == 2 || n == 4), "{attempts:?}");
    assert!(
        attempts.contains(&2) && attempts.contains(&4),
        "one address took every user: {attempts:?}"
    );
    a.shutdown().await;

    let a = agent_with(
        &f,
        &cg,
        &log,
        "retry.test",
        "loadBalancer: {consistentHash: {httpCookie: {name: affinity, path: /, ttl: 60s}}}",
    )
    .await;
    let out = curl(&cg, f.w.v4(22), &["http://retry.test/"], &["-D", "-"]);
    let answer = stdout(&out);
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: affinity="))
        .unwrap_or_else(|| panic!("no cookie made: {answer}"));
    let (value, rest) = cookie.split_once(';').expect("attributes");
    assert!(
        value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit()),
        "{value}"
    );
    assert_eq!(rest.trim(), "Max-Age=60; Path=/; HttpOnly");
    // With the cookie, none is made.
    let sent = format!("Cookie: affinity={value}");
    let out = curl(
        &cg,
        f.w.v4(22),
        &["http://retry.test/"],
        &["-D", "-", "-H", &sent],
    );
    assert!(!stdout(&out).contains("set-cookie"), "{out:?}");
    a.shutdown().await;
}

/// A DestinationRule's `outlierDetection`: an address that failed as many times in a row as it
/// allows is left out of the next requests' attempts, which go to the host's other address at
/// once, as Envoy ejects an endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_fails_in_a_row_is_ejected_from_the_attempts() {
    let f = fixture();
    let cg = TestCgroup::new("originate-outliers");
    let log = log_path("originate-outliers");
    let a = agent_with(
        &f,
        &cg,
        &log,
        "retry.test",
        "outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 5m, maxEjectionPercent: 100}",
    )
    .await;
    // retry.test's first address refuses: ejected after the first request's first attempt.
    for (attempts, what) in [(2, "the first request"), (1, "the next request")] {
        let (got, pid) = probe_with_pid(
            Some(&cg.path),
            &["http-half-close", &at(f.w.v4(22), 80), "retry.test"],
        );
        assert!(got.starts_with("ok:"), "{what}: {got}");
        let r = wait_record(&log, what, |r| r.kind == "relay" && r.pid == Some(pid));
        assert_eq!(r.attempts, Some(attempts), "{what}: {r:?}");
        assert_eq!(shown(r.upstream), at(f.w.v4(23), 443), "{what}: {r:?}");
    }
    a.shutdown().await;
}

/// Upstream connections outlive the client connections they were opened for, as in Envoy's pool:
/// a client that connects per request (curl run three times) costs the upstream one TLS
/// handshake. They are kept per network namespace: a workload in a pod gets its own, from the
/// pod, and it goes when the relay stops serving the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_one_after_another_share_an_upstream_connection() {
    let f = fixture();
    let cg = TestCgroup::new("originate-pool");
    let log = log_path("originate-pool");
    let pod = f.w.pod();
    let a = agent(&f, &cg, &log).await;
    let ip = f.w.v4(26);
    for _ in 0..3 {
        let out = curl(&cg, ip, &["http://kept.test/"], &[]);
        assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{out:?}");
    }
    assert_eq!(
        f.kept.accepted(),
        1,
        "a client connection had an upstream of its own"
    );
    assert_eq!(f.kept.names(), [Some("kept.test".to_owned())]);
    wait_for("three relay records", Duration::from_secs(10), || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "relay" && r.outcome.as_deref() == Some("ok"))
            .count()
            == 3
    });
    for r in records(&log).iter().filter(|r| r.kind == "relay") {
        assert_eq!(r.requests, Some(1), "{r:?}");
        assert_eq!(shown(r.upstream), at(ip, 443), "{r:?}");
    }

    let workload = pod.workload(&cg);
    wait_for("the relay in the pod", Duration::from_secs(10), || {
        a.status.relay_namespaces.get() == 2
    });
    let mut from_pod = pod.command(Some(&cg), "curl");
    from_pod.args([
        "-sS",
        "--max-time",
        "15",
        "--resolve",
        &format!("kept.test:80:{ip}"),
        "http://kept.test/",
    ]);
    let out = from_pod.output().expect("run curl");
    assert_eq!(stdout(&out), "sni=kept.test\n", "{out:?}");
    assert_eq!(
        f.kept.accepted(),
        2,
        "the pod's request took the host's connection"
    );
    let peers: Vec<IpAddr> = f.kept.peers().iter().map(|p| p.ip()).collect();
    assert_eq!(
        peers,
        [f.w.v4(1), pod.v4()],
        "where the upstream connections came from"
    );
    assert_eq!(f.kept.read().len(), 0, "a kept connection ended");
    workload.leave();
    wait_for(
        "the pod's connection to end",
        Duration::from_secs(10),
        || f.kept.read().len() == 1,
    );
    // The host's is still kept: a fourth request from the host takes it.
    let out = curl(&cg, ip, &["http://kept.test/"], &[]);
    assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{out:?}");
    assert_eq!(f.kept.accepted(), 2);
    a.shutdown().await;
}

/// An agent on the fixture's policy, with kept.test's DestinationRule given `pool` as its
/// `connectionPool` (YAML flow style).
async fn agent_with_kept_pool(f: &Fixture, cg: &TestCgroup, log: &Path, pool: &str) -> Agent {
    agent_with(f, cg, log, "kept.test", &format!("connectionPool: {pool}")).await
}

/// An agent on the fixture's policy, with `host`'s DestinationRule's traffic policy given
/// `setting` (`field: value`, YAML flow style).
async fn agent_with(f: &Fixture, cg: &TestCgroup, log: &Path, host: &str, setting: &str) -> Agent {
    let rule = format!("  host: {host}\n  trafficPolicy:\n");
    let policy = f.policy.replace(&rule, &format!("{rule}    {setting}\n"));
    assert_ne!(policy, f.policy, "the {host} rule found");
    Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, cg, Some(log)))
        .await
        .expect("agent starts")
}

/// A DestinationRule's `connectionPool.http.maxRequestsPerConnection` caps the requests an
/// upstream connection carries, across client connections: three requests, two at most on one,
/// open two upstream connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_carries_no_more_requests_than_its_destination_rule_allows() {
    let f = fixture();
    let cg = TestCgroup::new("originate-pool-max");
    let log = log_path("originate-pool-max");
    let a = agent_with_kept_pool(&f, &cg, &log, "{http: {maxRequestsPerConnection: 2}}").await;
    let ip = f.w.v4(26);
    // Two requests on one client connection, then one on another.
    let out = curl(&cg, ip, &["http://kept.test/", "http://kept.test/"], &[]);
    assert_eq!(
        stdout(&out),
        "sni=kept.test\n200\nsni=kept.test\n200\n",
        "{out:?}"
    );
    assert_eq!(f.kept.accepted(), 1);
    let out = curl(&cg, ip, &["http://kept.test/"], &[]);
    assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{out:?}");
    assert_eq!(
        f.kept.accepted(),
        2,
        "the first upstream connection carried a third request"
    );
    assert_eq!(
        (
            a.status.origination_opened.get(),
            a.status.origination_reused.get()
        ),
        (2, 1)
    );
    a.shutdown().await;
}

/// A DestinationRule's `tcp.maxConnections` where egress originates TLS: a request that would
/// open one more upstream connection waits for one to come back, as Envoy queues it, and goes on
/// it; one more than `http.http1MaxPendingRequests` is answered 503 at once. The first request
/// is held at the server until the second is seen waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_connections_wait_for_an_upstream_connection_up_to_a_limit() {
    let f = fixture();
    let cg = TestCgroup::new("originate-pool-limit");
    let log = log_path("originate-pool-limit");
    let a = agent_with_kept_pool(
        &f,
        &cg,
        &log,
        "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}",
    )
    .await;
    let ip = f.w.v4(26);
    f.kept.gate.shut();
    let held = curl_command(&cg, ip, &["http://kept.test/held"], &[])
        .spawn()
        .expect("start curl");
    wait_for(
        "the held request's upstream connection",
        Duration::from_secs(10),
        || f.kept.names().len() == 1,
    );
    let waiting = curl_command(&cg, ip, &["http://kept.test/a", "http://kept.test/b"], &[])
        .spawn()
        .expect("start curl");
    wait_for(
        "the second client's request to wait",
        Duration::from_secs(10),
        || a.status.origination_waits.get() == 1,
    );
    // One waits already: the next is refused, and never sent.
    let out = curl(&cg, ip, &["http://kept.test/c"], &[]);
    assert_eq!(
        stdout(&out),
        "egress: kept.test:443: 1 request(s) already wait for an upstream connection, as many \
         as DestinationRule/shop/kept allows (connectionPool.http.http1MaxPendingRequests)\n503\n",
        "{out:?}"
    );
    f.kept.gate.open();
    let held = held.wait_with_output().expect("curl");
    let waiting = waiting.wait_with_output().expect("curl");
    assert_eq!(stdout(&held), "sni=kept.test\n200\n", "{held:?}");
    assert_eq!(
        stdout(&waiting),
        "sni=kept.test\n200\nsni=kept.test\n200\n",
        "{waiting:?}"
    );
    assert_eq!(
        f.kept.accepted(),
        1,
        "a second upstream connection was opened"
    );
    assert_eq!(
        (
            a.status.origination_opened.get(),
            a.status.origination_reused.get(),
            a.status.origination_waits.get(),
        ),
        (1, 2, 1)
    );
    a.shutdown().await;
}

/// A DestinationRule's `connectionPool.http.http2MaxRequests` where egress originates TLS: with
/// one request in progress (held at the server), the next is answered 503 at once and never
/// sent; once the first has been answered, its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_http2_max_requests_is_refused_at_once() {
    let f = fixture();
    let cg = TestCgroup::new("originate-active-limit");
    let log = log_path("originate-active-limit");
    let a = agent_with_kept_pool(&f, &cg, &log, "{http: {http2MaxRequests: 1}}").await;
    let ip = f.w.v4(26);
    f.kept.gate.shut();
    let held = curl_command(&cg, ip, &["http://kept.test/held"], &[])
        .spawn()
        .expect("start curl");
    wait_for(
        "the held request's upstream connection",
        Duration::from_secs(10),
        || f.kept.names().len() == 1,
    );
    let out = curl(&cg, ip, &["http://kept.test/over"], &[]);
    assert_eq!(
        stdout(&out),
        "egress: kept.test:443: 1 request(s) already in progress, as many as \
         DestinationRule/shop/kept allows (connectionPool.http.http2MaxRequests)\n503\n",
        "{out:?}"
    );
    let refused = a
        .status
        .relay_over_limit
        .get_or_create(&LimitLabels { limit: "requests" })
        .get();
    assert_eq!(refused, 1);
    f.kept.gate.open();
    let held = held.wait_with_output().expect("curl");
    assert_eq!(stdout(&held), "sni=kept.test\n200\n", "{held:?}");
    let out = curl(&cg, ip, &["http://kept.test/after"], &[]);
    assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{out:?}");
    // The refused request would have needed a connection of its own, the one open being busy.
    assert_eq!(f.kept.accepted(), 1, "the refused request was sent");
    a.shutdown().await;
}

/// A DestinationRule's `connectionPool.http.maxRetries`: while one request's retry is in
/// progress (held at the server), another request's retry is not made and its failure stands,
/// as Envoy answers a retry overflow; once the first has been answered, retries are made again.
/// retry.test's first address refuses, so each request is retried on its other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_over_max_retries_is_not_made() {
    let f = fixture();
    let cg = TestCgroup::new("originate-retry-limit");
    let log = log_path("originate-retry-limit");
    let a = agent_with(
        &f,
        &cg,
        &log,
        "retry.test",
        "connectionPool: {http: {maxRetries: 1}}",
    )
    .await;
    let ip = f.w.v4(22);
    f.retry.gate.shut();
    let held = curl_command(&cg, ip, &["http://retry.test/held"], &[])
        .spawn()
        .expect("start curl");
    wait_for(
        "the held request's retry at the server",
        Duration::from_secs(10),
        || f.retry.names().len() == 1,
    );
    let out = curl(&cg, ip, &["http://retry.test/"], &[]);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "egress: 1 attempt(s) failed; last: {}: ",
            at(ip, 443)
        )) && text.ends_with(
            "; not retried: retry.test:443 has 1 retries in progress, as many as \
                 DestinationRule/shop/retry allows (connectionPool.http.maxRetries)\n503\n"
        ),
        "{out:?}"
    );
    let refused_retries = || {
        a.status
            .relay_over_limit
            .get_or_create(&LimitLabels { limit: "retries" })
            .get()
    };
    assert_eq!(refused_retries(), 1);
    // An answer to be retried, where the retry is refused a place: that answer is the answer,
    // as Envoy answers a retry overflow (straight to the address that answers 503).
    let out = curl(&cg, f.w.v4(23), &["http://retry.test/status/503"], &[]);
    assert_eq!(stdout(&out), "sni=retry.test\n503\n", "{out:?}");
    assert_eq!(refused_retries(), 2);
    f.retry.gate.open();
    let held = held.wait_with_output().expect("curl");
    assert_eq!(stdout(&held), "sni=retry.test\n200\n", "{held:?}");
    let out = curl(&cg, ip, &["http://retry.test/"], &[]);
    assert_eq!(stdout(&out), "sni=retry.test\n200\n", "{out:?}");
    // The held request's retry, the 503's one attempt, the last request's retry: the refused
    // retries never reached the server.
    assert_eq!(f.retry.names().len(), 3);
    a.shutdown().await;
}

/// A DestinationRule's `connectionPool.http.idleTimeout` bounds how long an upstream connection
/// waits for the next client, and its `tcp.maxConnectionDuration` how long one is used at all: at
/// 1ms, either is past before curl runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_past_its_destination_rules_limits_is_not_taken() {
    let f = fixture();
    for (i, pool) in [
        "{http: {idleTimeout: 1ms}}",
        "{tcp: {maxConnectionDuration: 1ms}}",
    ]
    .into_iter()
    .enumerate()
    {
        let cg = TestCgroup::new("originate-pool-age");
        let log = log_path(&format!("originate-pool-age-{i}"));
        let a = agent_with_kept_pool(&f, &cg, &log, pool).await;
        let ip = f.w.v4(26);
        let before = f.kept.accepted();
        for _ in 0..2 {
            let out = curl(&cg, ip, &["http://kept.test/"], &[]);
            assert_eq!(stdout(&out), "sni=kept.test\n200\n", "{pool}: {out:?}");
        }
        assert_eq!(
            f.kept.accepted() - before,
            2,
            "{pool}: an upstream connection past its limit was taken"
        );
        assert_eq!(a.status.origination_reused.get(), 0, "{pool}");
        a.shutdown().await;
    }
}

/// A connection to a port with TLS origination, still waiting for its request when the agent
/// stops, has its record, which says it was to be originated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_originated_connection_in_progress_when_the_agent_stops_has_its_record() {
    let f = fixture();
    let cg = TestCgroup::new("originate-stopped");
    let log = log_path("originate-stopped");
    // The relay's own limit on the request's headers (10 s): still waiting at the stop.
    let a = Agent::start(f.w.agent_config(&f.policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let dst = at(f.w.v4(20), 80);
    let waiting = HeldProbe::start(Some(&cg.path), &["connect-hold", &dst], "held");
    wait_for("the relay holding it", Duration::from_secs(10), || {
        a.status.relay_open.get() == 1
    });
    a.shutdown().await;
    let relayed: Vec<_> = records(&log)
        .into_iter()
        .filter(|r| r.kind == "relay")
        .collect();
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    let r = &relayed[0];
    assert_eq!(r.outcome.as_deref(), Some("stopped"), "{r:?}");
    assert_eq!(r.origination.as_deref(), Some("SIMPLE"), "{r:?}");
    assert_eq!(r.pid, Some(waiting.pid()), "{r:?}");
    assert_eq!(r.host.as_deref(), Some("plain.test"), "{r:?}");
    waiting.release();
}

/// Port checks of a port with TLS origination (connect, close): each relay record names the
/// checker, and no kernel record of those connections is left behind, whether the client closed
/// before the relay took its connection or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_checks_of_an_originated_port_leave_no_record_behind() {
    const CHECKS: usize = 100;
    let f = fixture();
    let cg = TestCgroup::new("originate-port-check");
    let log = log_path("originate-port-check");
    let a = agent(&f, &cg, &log).await;
    let dst = at(f.w.v4(20), 80);
    let pid = port_checks(&cg.path, &dst, CHECKS, Close::Fin);
    wait_for("a relay record per check", Duration::from_secs(10), || {
        records(&log).iter().filter(|r| r.kind == "relay").count() >= CHECKS
    });
    let all = records(&log);
    let relayed: Vec<&Record> = all.iter().filter(|r| r.kind == "relay").collect();
    assert_eq!(relayed.len(), CHECKS, "{relayed:#?}");
    for r in &relayed {
        assert_eq!(r.pid, Some(pid), "{r:?}");
        assert_eq!(shown(r.dst), dst, "{r:?}");
        assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
        assert!(
            [
                "the client had closed before the relay took the connection",
                "connection closed before a request",
            ]
            .contains(&r.reason.as_deref().unwrap_or_default()),
            "{r:?}"
        );
    }
    assert_no_relay_record_left(&relayed);
    assert_eq!(f.plain.accepted(), 0, "a port check reached upstream");
    a.shutdown().await;
}
