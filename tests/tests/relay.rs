//! Root-only: steering to the gateway relay, with the real programs, real clients (curl, openssl
//! s_client, rustls in egress-probe) and real TLS servers in a netns world, certificates made per
//! run.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_agent::{
    agent::{Agent, AgentConfig},
    events::Record,
    policy::Mode,
    relay::RelayConfig,
};
use egress_tests::{
    Close, HeldProbe, TestCgroup, World, assert_no_relay_record_left, at, egress_run,
    egress_run_command, log_path, loopback_server, pin_dir, port_checks, probe_in, probe_with_pid,
    records, relay_ports, relay_ports_of, relayed_count, shown, signal, target_bin,
    tls::{Pki, Seen},
    wait_for, wait_record,
};

/// Six steered hosts (a VirtualService gives them retries and a timeout):
/// tls.test at host 20 (both families), other.test at 21, retry.test at 22 (nothing listens) and
/// 23, fail.test at 24 (nothing listens), echo.test at 25 (an echo, the ClientHello first),
/// again.test at 26 (a server that asks for the hello again).
const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tls, namespace: shop}
spec:
  hosts: [tls.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: shop}
spec:
  hosts: [other.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: retry, namespace: shop}
spec:
  hosts: [retry.test, fail.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: again, namespace: shop}
spec:
  hosts: [again.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: through-relay, namespace: shop}
spec:
  hosts: [tls.test, other.test, retry.test, fail.test, echo.test, again.test]
  http:
  - route: [{destination: {host: tls.test}}]
    retries: {attempts: 2, perTryTimeout: 1s}
    timeout: 5s
"#;

struct Fixture {
    w: World,
    pki: Pki,
    /// The servers at hosts 20 (v4), 20 (v6), 21 and 23.
    tls4: Arc<Seen>,
    tls6: Arc<Seen>,
    other: Arc<Seen>,
    retry: Arc<Seen>,
    /// The echo server's connections: whether their first bytes came with the handshake.
    echo: Arc<Mutex<Vec<bool>>>,
    /// The server at host 26, which takes P-256 key shares only.
    again: Arc<Seen>,
}

fn fixture(tag: &str) -> Fixture {
    let w = World::new();
    for h in 20..=26 {
        w.host(h);
    }
    let echo = w.hello_echo(SocketAddr::new(w.v4(25), 443));
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), tag);
    let config = pki.server(&["tls.test", "other.test", "retry.test", "fail.test"]);
    let f = Fixture {
        tls4: w.tls_server(SocketAddr::new(w.v4(20), 443), Arc::clone(&config)),
        tls6: w.tls_server(SocketAddr::new(w.v6(20), 443), Arc::clone(&config)),
        other: w.tls_server(SocketAddr::new(w.v4(21), 443), Arc::clone(&config)),
        retry: w.tls_server(SocketAddr::new(w.v4(23), 443), config),
        again: w.tls_server(
            SocketAddr::new(w.v4(26), 443),
            pki.retrying_server(&["again.test"]),
        ),
        echo,
        pki,
        w,
    };
    let w = &f.w;
    let records = [
        ("tls.test", w.v4(20)),
        ("tls.test", w.v6(20)),
        ("other.test", w.v4(21)),
        ("retry.test", w.v4(22)),
        ("retry.test", w.v4(23)),
        ("fail.test", w.v4(24)),
        ("echo.test", w.v4(25)),
        ("again.test", w.v4(26)),
    ];
    let mut f = f;
    f.w.start_dns(&records, 300);
    f
}

async fn agent(f: &Fixture, cg: &TestCgroup, log: &Path) -> Agent {
    agent_with(f, cg, log, RelayConfig::default()).await
}

/// An agent whose relay has `relay`'s settings, but for a 500 ms limit on the ClientHello.
async fn agent_with(f: &Fixture, cg: &TestCgroup, log: &Path, relay: RelayConfig) -> Agent {
    Agent::start(AgentConfig {
        relay: RelayConfig {
            hello_timeout: Duration::from_millis(500),
            ..relay
        },
        ..f.w.agent_config(POLICY, Mode::RegistryOnly, cg, Some(log))
    })
    .await
    .expect("agent starts")
}

/// An agent whose relay finds new namespaces only on the kernel's hint: its scan of the cgroup
/// runs once, at the start.
async fn agent_without_scan(f: &Fixture, cg: &TestCgroup, log: &Path) -> Agent {
    let relay = RelayConfig {
        scan_interval: Duration::from_secs(3600),
        ..RelayConfig::default()
    };
    agent_with(f, cg, log, relay).await
}

/// curl in the cgroup: `https://NAME/`, NAME pinned to `ip`, trusting the run's CA.
fn curl(cg: &TestCgroup, ca: &Path, name: &str, ip: IpAddr) -> Output {
    curl_with(cg.command("curl"), ca, name, ip, &[])
}

/// As [`curl`], with `args`, run as `curl` (a curl command set up where it should run).
fn curl_with(mut curl: Command, ca: &Path, name: &str, ip: IpAddr, args: &[&str]) -> Output {
    let pin = match ip {
        IpAddr::V4(v4) => format!("{name}:443:{v4}"),
        IpAddr::V6(v6) => format!("{name}:443:[{v6}]"),
    };
    curl.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(args)
        .args(["--resolve", &pin, &format!("https://{name}/")])
        .output()
        .expect("run curl")
}

fn relay_record(log: &Path, what: &str, pred: impl Fn(&Record) -> bool) -> Record {
    wait_record(log, what, |r| r.kind == "relay" && pred(r))
}

/// `curl` (with `args`) fetches `https://tls.test/` at `ip` through the relay; the upstream there
/// (`seen`) has seen that one name. Returns the connection's relay record, outcome `ok`.
fn tls_test_through_relay(
    f: &Fixture,
    curl: Command,
    log: &Path,
    ip: IpAddr,
    seen: &Seen,
    args: &[&str],
) -> Record {
    let out = curl_with(curl, &f.pki.ca_pem, "tls.test", ip, args);
    assert!(
        out.status.success(),
        "curl {args:?} via {ip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=tls.test\n");
    assert_eq!(seen.names(), [Some("tls.test".to_owned())]);
    let dst = at(ip, 443);
    let r = relay_record(log, &format!("relay record for {dst}"), |r| {
        shown(r.dst) == dst
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steered_tls_reaches_the_upstream_with_its_server_name() {
    let f = fixture("steered");
    let cg = TestCgroup::new("relay-steered");
    let log = log_path("relay-steered");
    let a = agent(&f, &cg, &log).await;

    for (ip, seen) in [(f.w.v4(20), &f.tls4), (f.w.v6(20), &f.tls6)] {
        let r = tls_test_through_relay(&f, cg.command("curl"), &log, ip, seen, &[]);
        let dst = at(ip, 443);
        assert_eq!(r.sni.as_deref(), Some("tls.test"), "{r:?}");
        assert_eq!(shown(r.upstream), dst, "{r:?}");
        assert_eq!(r.host.as_deref(), Some("tls.test"), "{r:?}");
        assert_eq!(r.rule.as_deref(), Some("ServiceEntry/shop/tls"), "{r:?}");
        assert_eq!(r.comm.as_deref(), Some("curl"), "{r:?}");
        assert_eq!(
            r.cgroup.as_deref(),
            Some(format!("/{}", cg.path.file_name().expect("name").to_string_lossy()).as_str()),
            "{r:?}"
        );
        assert_eq!(r.attempts, Some(1), "{r:?}");
        assert!(r.bytes_up.is_some_and(|b| b > 200), "{r:?}");
        assert!(r.bytes_down.is_some_and(|b| b > 200), "{r:?}");
        let c = wait_record(&log, "steer connect", |r| {
            r.kind == "connect" && shown(r.dst) == dst
        });
        assert_eq!(c.verdict.as_deref(), Some("steer"), "{c:?}");
    }

    // openssl s_client verifies the chain and the name through the relay too.
    let out = cg
        .command("openssl")
        .args(["s_client", "-brief", "-verify_return_error", "-connect"])
        .arg(at(f.w.v4(20), 443))
        .args([
            "-servername",
            "tls.test",
            "-verify_hostname",
            "tls.test",
            "-CAfile",
        ])
        .arg(&f.pki.ca_pem)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("Verification: OK"),
        "openssl s_client: {text}"
    );

    // The workload's getpeername() names the original destination, not the relay.
    assert_eq!(
        cg.probe(&["peer", &at(f.w.v4(20), 443)]),
        format!("ok:{}", at(f.w.v4(20), 443))
    );
    assert_eq!(
        cg.probe(&["peer", &at(f.w.v6(20), 443)]),
        format!("ok:{}", at(f.w.v6(20), 443))
    );
    // curl twice, openssl s_client and the two probes. A probe is done before the relay may have
    // taken its connection, and a relay that stops ends the connections it holds unrecorded.
    wait_for("every relay record", Duration::from_secs(10), || {
        records(&log).iter().filter(|r| r.kind == "relay").count() == 5
    });
    a.shutdown().await;

    // Each connection's relay record (its end) comes after its steered connect (its start),
    // though the relay writes it at once and the kernel's event waits for the next drain. The
    // getpeername probes close at once, often before the relay takes their connections; their
    // records name them all the same (`a_steered_client_that_closes_at_once_is_refused_by_name`).
    let all = records(&log);
    let relayed: Vec<usize> = (0..all.len()).filter(|&i| all[i].kind == "relay").collect();
    assert_eq!(relayed.len(), 5, "{all:?}");
    for i in relayed {
        let r = &all[i];
        assert!(
            all[..i].iter().any(|c| c.kind == "connect"
                && c.verdict.as_deref() == Some("steer")
                && c.dst == r.dst
                && c.pid == r.pid),
            "relay record {i} before its connect: {all:#?}"
        );
    }
}

/// A socket bound to an interface (SO_BINDTODEVICE, as `curl --interface` does) could not reach
/// the relay on loopback: the kernel unbinds it as it steers it, and the relay's upstream
/// connection leaves through that interface instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_bound_to_an_interface_is_relayed_out_of_that_interface() {
    let f = fixture("bound");
    let cg = TestCgroup::new("relay-bound");
    let log = log_path("relay-bound");
    let a = agent(&f, &cg, &log).await;
    let iface = f.w.iface();
    for (ip, seen) in [(f.w.v4(20), &f.tls4), (f.w.v6(20), &f.tls6)] {
        let r = tls_test_through_relay(
            &f,
            cg.command("curl"),
            &log,
            ip,
            seen,
            &["--interface", iface],
        );
        assert_eq!(r.iface.as_deref(), Some(iface), "{r:?}");
    }
    // The binding is kept, not dropped: bound to another world's interface, which has no route
    // to this world, the upstream connection fails as the client's own would have.
    let elsewhere = World::new();
    let out = curl_with(
        cg.command("curl"),
        &f.pki.ca_pem,
        "tls.test",
        f.w.v4(20),
        &["--interface", elsewhere.iface()],
    );
    assert!(
        !out.status.success(),
        "reached upstream through the wrong interface"
    );
    let r = relay_record(&log, "relay record through the other interface", |r| {
        r.iface.as_deref() == Some(elsewhere.iface())
    });
    assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
    assert_eq!(
        f.tls4.names().len(),
        1,
        "the upstream saw another connection"
    );
    // Unbound, the record names no interface.
    let out = curl(&cg, &f.pki.ca_pem, "other.test", f.w.v4(21));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = relay_record(&log, "relay record for other.test", |r| {
        r.sni.as_deref() == Some("other.test")
    });
    assert_eq!(r.iface, None, "{r:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_not_allowed_for_the_destination_never_reaches_upstream() {
    let f = fixture("sni");
    let cg = TestCgroup::new("relay-sni");
    let log = log_path("relay-sni");
    let a = agent(&f, &cg, &log).await;
    let ip = f.w.v4(20);
    // To tls.test's address (the kernel's record): other.test is registered and steered, but
    // by another rule; evil.test is no host at all. To fail.test's address: retry.test is a host
    // of the same rule, but resolves elsewhere.
    for (name, ip, why) in [
        ("other.test", ip, "is not a host of ServiceEntry/shop/tls"),
        ("evil.test", ip, "is not a host of ServiceEntry/shop/tls"),
        (
            "retry.test",
            f.w.v4(24),
            "does not resolve to the destination",
        ),
    ] {
        let dst = at(ip, 443);
        let out = curl(&cg, &f.pki.ca_pem, name, ip);
        assert!(!out.status.success(), "curl {name} via {ip} succeeded");
        let r = relay_record(&log, &format!("refusal of {name}"), |r| {
            r.sni.as_deref() == Some(name)
        });
        assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
        assert!(
            r.reason.as_deref().is_some_and(|s| s.contains(why)),
            "{r:?}"
        );
        assert_eq!(shown(r.dst), dst, "{r:?}");
        assert_eq!(r.upstream, None, "{r:?}");
    }
    assert_eq!(
        f.tls4.accepted(),
        0,
        "a refused connection reached upstream"
    );
    assert_eq!(
        f.other.accepted(),
        0,
        "a refused connection reached upstream"
    );
    assert_eq!(
        f.retry.accepted(),
        0,
        "a refused connection reached upstream"
    );
    a.shutdown().await;
}

/// A server that takes none of the key shares a client offers first answers its ClientHello with
/// a HelloRetryRequest, and the client sends a second hello: curl (OpenSSL) and rustls both get
/// through the relay so, each asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_asked_for_again_is_relayed() {
    let f = fixture("again");
    let cg = TestCgroup::new("relay-again");
    let log = log_path("relay-again");
    let a = agent(&f, &cg, &log).await;
    let ip = f.w.v4(26);
    let out = curl(&cg, &f.pki.ca_pem, "again.test", ip);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=again.test\n");
    let ca = f.pki.ca_pem.to_string_lossy().into_owned();
    let got = cg.probe(&["tls", &at(ip, 443), "again.test", &ca]);
    assert_eq!(got, "ok:sni=again.test");
    wait_for("both connections' end", Duration::from_secs(10), || {
        f.again.read().len() == 2
    });
    assert_eq!(f.again.retries(), 2, "a client was not asked again");
    let dst = at(ip, 443);
    wait_for("both relay records", Duration::from_secs(10), || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "relay" && shown(r.dst) == dst)
            .count()
            == 2
    });
    for r in records(&log)
        .iter()
        .filter(|r| r.kind == "relay" && shown(r.dst) == dst)
    {
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
        assert_eq!(r.sni.as_deref(), Some("again.test"), "{r:?}");
    }
    a.shutdown().await;
}

/// The hello a client sends again must name the server its first named: one naming another
/// (a host the destination's server may serve too, as a CDN's does) is refused, and the
/// upstream reads nothing past the first hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_naming_another_server_never_reaches_upstream() {
    let f = fixture("again-other");
    let cg = TestCgroup::new("relay-again-other");
    let log = log_path("relay-again-other");
    let a = agent(&f, &cg, &log).await;
    let ip = f.w.v4(26);
    let got = cg.probe(&["hello-again", &at(ip, 443), "again.test", "other.test"]);
    let (first, ended) = got.split_once(' ').expect("LENGTH WORD");
    let first: usize = first.parse().expect("the first hello's length");
    assert!(
        ["closed", "error:Connection reset by peer (os error 104)"].contains(&ended)
            || ended.starts_with("error:Broken pipe"),
        "{got}"
    );
    let r = relay_record(&log, "the refusal", |r| {
        r.sni.as_deref() == Some("again.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "the ClientHello after a HelloRetryRequest names other.test, the first named \
             again.test"
        ),
        "{r:?}"
    );
    wait_for("the upstream's end", Duration::from_secs(10), || {
        f.again.read().len() == 1
    });
    assert_eq!(f.again.retries(), 1, "the upstream did not ask again");
    assert_eq!(
        f.again.read(),
        [first],
        "the upstream read past the first hello"
    );
    assert_eq!(f.again.names(), [], "a handshake completed");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_dial_of_the_relay_is_refused() {
    let f = fixture("direct");
    let cg = TestCgroup::new("relay-direct");
    let log = log_path("relay-direct");
    let a = agent(&f, &cg, &log).await;
    let relay = format!("127.0.0.1:{}", a.relay_port);
    // From the enforced cgroup (loopback is not egress) and from outside it.
    for cgroup in [Some(cg.path.as_path()), None] {
        let (got, _) = probe_with_pid(cgroup, &["tcp", &relay]);
        assert_eq!(got, "error:closed before the greeting", "dial {relay}");
    }
    // And from the address and port of a steered connection that has ended: its record went
    // with it, it does not vouch for whoever comes from there next.
    let steered = at(f.w.v4(20), 443);
    let (got, _) = probe_with_pid(Some(&cg.path), &["redial", &steered, &relay]);
    let (port, word) = got.split_once(' ').expect("PORT WORD");
    assert_eq!(
        word, "error:closed before the greeting",
        "{relay} from port {port}"
    );
    let unknown = |r: &Record, peer: &str| {
        r.kind == "relay"
            && r.outcome.as_deref() == Some("refused")
            && r.reason
                .as_deref()
                .is_some_and(|s| s.contains(&format!("no kernel record for {peer}")))
    };
    let redialed = format!("127.0.0.1:{port}");
    // The dials wait for a greeting: the relay finds them open, never steered. The reset
    // connection may have been refused too, if its record was gone first, as a client gone.
    let dial = |r: &Record, peer: &str| {
        unknown(r, peer)
            && r.reason
                .as_deref()
                .is_some_and(|s| s.ends_with(": not a steered connection"))
    };
    wait_for("the refusals", Duration::from_secs(10), || {
        let records = records(&log);
        records.iter().filter(|r| dial(r, "")).count() >= 3
            && records.iter().any(|r| dial(r, &redialed))
    });
    assert_eq!(f.tls4.accepted(), 0);
    a.shutdown().await;
}

/// A steered client that connects and closes at once (a port check) often closes before the relay
/// has taken the connection. The relay must not report it as a dial of the relay that was never
/// steered (that is an operator's alarm), and should say who it was: the kernel leaves the record
/// of such a connection, marked closed, for the relay, which refuses it and takes the record out.
///
/// Whether a check closes before the relay takes it is a race, and a check that closes with a FIN
/// may wait in FIN_WAIT2, not closed, while the relay takes it. Checks that reset their
/// connections while the agent is stopped (its listener's queue still takes them) all close first.
#[test]
fn a_steered_client_that_closes_at_once_is_refused_by_name() {
    const CHECKS: usize = 300;
    const WHILE_STOPPED: usize = 20;
    use nix::sys::signal::Signal;
    let f = fixture("port-check");
    let cg = TestCgroup::new("relay-port-check");
    let log = log_path("relay-port-check");
    let policies = egress_tests::policy_dir(POLICY);
    let mut run = egress_run_command(
        Command::new(target_bin("egress")),
        &f.w,
        &cg,
        &policies,
        &log,
    );
    run.args(["--relay-hello-timeout", "500ms"]);
    let mut agent = egress_run(run);
    let dst = at(f.w.v4(20), 443);
    let ended = |r: &Record| r.kind == "relay" && r.src.is_some();
    let all_ended = |n: usize| {
        wait_for("a relay record per check", Duration::from_secs(10), || {
            records(&log).iter().filter(|r| ended(r)).count() >= n
        });
        records(&log)
    };
    let running = port_checks(&cg.path, &dst, CHECKS, Close::Fin);
    all_ended(CHECKS);
    // Stopped well within the time after which the programs take the agent for dead.
    signal(&agent, Signal::SIGSTOP);
    // Stopped once every thread is: the signal alone leaves them running a while.
    let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
    let stop = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WUNTRACED));
    assert_eq!(
        stop.expect("wait for the agent to stop"),
        nix::sys::wait::WaitStatus::Stopped(pid, Signal::SIGSTOP)
    );
    let stopped = port_checks(&cg.path, &dst, WHILE_STOPPED, Close::Reset);
    signal(&agent, Signal::SIGCONT);
    let all = all_ended(CHECKS + WHILE_STOPPED);
    let ended: Vec<&Record> = all.iter().filter(|r| ended(r)).collect();
    assert_eq!(ended.len(), CHECKS + WHILE_STOPPED, "{ended:#?}");
    const BEFORE: &str = "the client had closed before the relay took the connection";
    let mut before_the_relay = 0;
    for r in &ended {
        assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
        assert!(r.pid == Some(running) || r.pid == Some(stopped), "{r:?}");
        assert_eq!(shown(r.dst), dst, "{r:?}");
        match r.reason.as_deref().unwrap_or_default() {
            BEFORE => before_the_relay += usize::from(r.pid == Some(stopped)),
            "connection closed before a complete ClientHello" => {}
            _ => panic!("{r:?}"),
        }
    }
    assert_eq!(
        before_the_relay, WHILE_STOPPED,
        "checks reset while the relay was stopped, refused as closed before it took them"
    );
    // No record outlives what the relay did with its connection.
    assert_no_relay_record_left(&ended);
    assert_eq!(f.tls4.accepted(), 0);
    signal(&agent, Signal::SIGTERM);
    assert!(agent.wait().expect("egress run ends").success());
}

/// Each of the relay's workers listens on a port of its own, in every namespace it serves, and a
/// steered connect goes to the port of its CPU's turn: each worker is woken for its own
/// connections, and takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steered_connect_goes_to_the_worker_of_its_cpu() {
    const WORKERS: usize = 3;
    let f = fixture("workers");
    let cg = TestCgroup::new("relay-workers");
    let log = log_path("relay-workers");
    // The default limit on the ClientHello: the held connections' records stay while the test
    // reads them, however slow the machine.
    let a = Agent::start(AgentConfig {
        relay: RelayConfig {
            workers: Some(WORKERS),
            ..RelayConfig::default()
        },
        ..f.w
            .agent_config(POLICY, Mode::RegistryOnly, &cg, Some(&log))
    })
    .await
    .expect("agent starts");
    let ports = relay_ports(a.relay_port);
    assert_eq!(ports.len(), WORKERS, "{ports:?}");
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), WORKERS, "{ports:?}");
    // A port of the relay's, dialled directly: a worker answers, and refuses it.
    for port in &ports {
        let (got, _) = probe_with_pid(Some(&cg.path), &["tcp", &format!("127.0.0.1:{port}")]);
        assert_eq!(got, "error:closed before the greeting", "port {port}");
    }
    let dst = at(f.w.v4(20), 443);
    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("our CPUs");
    let mut tried = Vec::new();
    for cpu in (0..nix::sched::CpuSet::count()).filter(|&c| cpus.is_set(c).unwrap_or(false)) {
        let held = HeldProbe::start_on_cpu(cpu, Some(&cg.path), &["connect-hold", &dst], "held");
        let filed: Vec<u16> = relay_ports_of(held.pid()).iter().map(|f| f.1).collect();
        assert_eq!(filed, [ports[cpu % WORKERS]], "a connect on CPU {cpu}");
        held.release();
        tried.push(cpu);
    }
    // One client address and port may connect to two workers at once (the two connections
    // differ in the relay's port): the kernel files both, each under the relay's port it took.
    let first = tried.first().copied();
    let second = tried
        .iter()
        .copied()
        .find(|c| Some(c % WORKERS) != first.map(|f| f % WORKERS));
    if let (Some(first), Some(second)) = (first, second) {
        let held = HeldProbe::start(
            Some(&cg.path),
            &["same-port", &dst, &first.to_string(), &second.to_string()],
            "held",
        );
        let mut filed = relay_ports_of(held.pid());
        filed.sort_unstable_by_key(|f| f.1);
        let mut want = [ports[first % WORKERS], ports[second % WORKERS]];
        want.sort_unstable();
        assert_eq!(filed.len(), 2, "{filed:?}");
        assert_eq!(filed[0].0, filed[1].0, "one client port: {filed:?}");
        assert_eq!([filed[0].1, filed[1].1], want, "{filed:?}");
        held.release();
    } else {
        eprintln!("CPUs {tried:?} are all one worker's: two workers' connections not tried");
    }
    assert!(!tried.is_empty());
    assert_eq!(f.tls4.accepted(), 0);
    a.shutdown().await;
}

/// A steered connect that fails before TCP takes a port leaves its record (no state change
/// forgets it). The socket's next connect, elsewhere, must not be taken for steered: getpeername
/// shows where it went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_connects_elsewhere_after_a_failed_steered_connect_is_not_steered() {
    let f = fixture("collide");
    let cg = TestCgroup::new("relay-collide");
    let log = log_path("relay-collide");
    let a = agent(&f, &cg, &log).await;
    let direct = loopback_server("127.0.0.1:0");
    let steered = at(f.w.v4(20), 443);
    let (got, _) = probe_with_pid(Some(&cg.path), &["collide", &steered, &direct.to_string()]);
    assert_eq!(
        got,
        format!("error:Cannot assign requested address (os error 99) ok:{direct}"),
        "a connect to {steered} from a taken port, then to {direct}"
    );
    // Steering itself is unchanged: getpeername shows a steered connection's destination.
    let (got, _) = probe_with_pid(Some(&cg.path), &["peer", &steered]);
    assert_eq!(got, format!("ok:{steered}"));
    a.shutdown().await;
}

#[test]
fn a_relay_in_the_cgroup_it_enforces_connects_upstream_unsteered() {
    relay_in_its_cgroup("inside", &[]);
}

/// The kernel knows the agent by its process id as the kernel counts it, which a pid namespace
/// does not change (inside one the agent is pid 1).
#[test]
fn a_relay_in_a_pid_namespace_in_the_cgroup_it_enforces_connects_upstream_unsteered() {
    relay_in_its_cgroup(
        "pidns",
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
    );
}

/// `egress run` itself in the cgroup it enforces, started by `launcher` (a program and its
/// arguments, egress's own after them) if any: its upstream connects to the steered destination
/// would be steered back to it, were they not its own. A steered call completes, and the agent
/// ends cleanly when told to.
fn relay_in_its_cgroup(tag: &str, launcher: &[&str]) {
    let f = fixture(tag);
    let cg = TestCgroup::new(&format!("relay-{tag}"));
    let log = log_path(&format!("relay-{tag}"));
    let policies = egress_tests::policy_dir(POLICY);
    let run = match launcher.split_first() {
        None => cg.command(target_bin("egress")),
        Some((program, args)) => {
            let mut run = cg.command(program);
            run.args(args).arg(target_bin("egress"));
            run
        }
    };
    let mut run = egress_run(egress_run_command(run, &f.w, &cg, &policies, &log));
    tls_test_through_relay(&f, cg.command("curl"), &log, f.w.v4(20), &f.tls4, &[]);
    // A launcher (unshare) ignores SIGTERM while its child runs: the agent, its child, is told to
    // end, and the launcher ends with it.
    let agent = if launcher.is_empty() {
        run.id() as i32
    } else {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", run.id()))
            .expect("the launcher's children")
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the agent, the launcher's child")
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the agent");
    assert!(run.wait().expect("egress run ends").success());
}

#[test]
fn a_dead_agents_programs_steer_nothing_to_whatever_takes_the_relays_port() {
    let f = fixture("dead");
    let cg = TestCgroup::new("relay-dead");
    let log = log_path("relay-dead");
    let policies = egress_tests::policy_dir(POLICY);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let mut run = egress_run_command(
        Command::new(target_bin("egress")),
        &f.w,
        &cg,
        &policies,
        &log,
    );
    run.args(["--relay-port", &port, "--relay-hello-timeout", "500ms"]);
    let mut agent = egress_run(run);
    let steered = at(f.w.v4(20), 443);
    // Relayed: the relay waits for a ClientHello that never comes, and closes.
    let probe = || probe_in(Some(&cg.path), &["tcp", &steered]);
    assert_eq!(probe(), "error:closed before the greeting");
    signal(&agent, nix::sys::signal::Signal::SIGKILL);
    agent.wait().expect("reap");
    // Its programs stay (pinned), but once its last stamp is stale they refuse steered connects
    // rather than hand them to whoever listens on the relay's port now.
    let squatter =
        std::net::TcpListener::bind(format!("127.0.0.1:{port}")).expect("take the relay's port");
    wait_for("steered connects refused", Duration::from_secs(20), || {
        probe() == "denied"
    });
    squatter.set_nonblocking(true).expect("nonblocking");
    while squatter.accept().is_ok() {}
    assert_eq!(probe(), "denied");
    assert!(
        squatter.accept().is_err(),
        "a steered connect reached the relay's port"
    );
    assert_eq!(f.tls4.accepted(), 0);
    // Enforcement stays until an agent stops cleanly, or by hand.
    std::fs::remove_dir_all(pin_dir(&cg)).expect("unpin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_mark_takes_no_one_past_the_hooks() {
    let f = fixture("mark");
    let cg = TestCgroup::new("relay-mark");
    let log = log_path("relay-mark");
    let a = agent(&f, &cg, &log).await;
    let (denied, steered) = (at(f.w.v4(99), 443), at(f.w.v4(20), 443));
    // Any mark a workload with CAP_NET_ADMIN may set, the one the relay's own connections once
    // carried among them.
    for mark in ["0x65677273", "0x4000", "1"] {
        let got = probe_in(Some(&cg.path), &["tcp-mark", &denied, mark]);
        assert_eq!(got, "denied", "{denied} with mark {mark}");
        // Steered to the relay, which waits for a ClientHello in vain: never the server itself.
        let got = probe_in(Some(&cg.path), &["tcp-mark", &steered, mark]);
        assert_eq!(
            got, "error:closed before the greeting",
            "{steered} with mark {mark}"
        );
    }
    assert_eq!(
        f.tls4.accepted(),
        0,
        "a marked socket reached the server directly"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_split_byte_by_byte_is_relayed() {
    let f = fixture("split");
    let cg = TestCgroup::new("relay-split");
    let log = log_path("relay-split");
    let a = agent(&f, &cg, &log).await;
    let ca = f.pki.ca_pem.to_string_lossy().into_owned();
    let got = cg.probe(&["tls", &at(f.w.v4(20), 443), "tls.test", &ca, "split"]);
    assert_eq!(got, "ok:sni=tls.test");
    let r = relay_record(&log, "relay record", |_| true);
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_the_relay_exactly_both_ways_with_each_half_close() {
    let f = fixture("echo");
    let cg = TestCgroup::new("relay-echo");
    let log = log_path("relay-echo");
    let a = agent(&f, &cg, &log).await;
    let dst = at(f.w.v4(25), 443);
    // Small (copied) and large (copied, then spliced past the first 64 KiB each way, and woken
    // in batches once the relay falls behind). Then a pause: a few bytes alone must come back
    // while the connection stays open, not wait for more.
    for n in [1000usize, 3 << 20] {
        let (out, pid) = probe_with_pid(
            Some(&cg.path),
            &["hello-echo", &dst, "echo.test", &n.to_string()],
        );
        assert_eq!(out, "ok", "{n} bytes");
        let r = relay_record(&log, &format!("relay record of {n} bytes"), |r| {
            r.pid == Some(pid)
        });
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
        // The ClientHello, then the bytes, each way.
        assert!(
            r.bytes_up
                .is_some_and(|b| b > n as u64 && b < n as u64 + 4096),
            "{r:?}"
        );
        assert_eq!(r.bytes_down, r.bytes_up, "{r:?}");
    }
    a.shutdown().await;
}

/// With more connections open than CPUs, the relay's first bytes upstream carry the handshake's
/// last ACK: the upstream's kernel completes the connection and queues the bytes in one step, so
/// they are there when accept() returns it. A separate ACK would hand the connection over first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_relay_sends_its_first_bytes_with_the_handshakes_last_ack() {
    let f = fixture("busy");
    let cg = TestCgroup::new("relay-busy");
    let log = log_path("relay-busy");
    let a = agent(&f, &cg, &log).await;
    let dst = at(f.w.v4(25), 443);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let held = cpus + 1;
    let holder = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &dst, "echo.test", &held.to_string()],
        "held",
    );
    wait_for(
        "the held connections upstream",
        Duration::from_secs(10),
        || f.echo.lock().expect("arrivals").len() == held,
    );
    assert_eq!(a.status.relay_open.get(), held as i64);

    // One more while they are open: the relay is busy.
    let (got, pid) = probe_with_pid(Some(&cg.path), &["hello-echo", &dst, "echo.test", "1000"]);
    assert_eq!(got, "ok");
    let r = relay_record(&log, "the echo's relay record", |r| r.pid == Some(pid));
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    let early = f.echo.lock().expect("arrivals").clone();
    assert_eq!(early.len(), held + 1);
    assert!(
        early[held],
        "the upstream had the connection before its first bytes: {early:?}"
    );

    holder.release();
    wait_for(
        "no relayed connection open",
        Duration::from_secs(10),
        || a.status.relay_open.get() == 0,
    );
    // A connection is counted before it leaves the gauge: none open means all counted (the held
    // ones end ok or, closed with the echo unread, in error).
    let counted: u64 = ["ok", "error"]
        .iter()
        .map(|outcome| relayed_count(&a.status, outcome, "echo.test"))
        .sum();
    assert_eq!(counted, held as u64 + 1);
    a.shutdown().await;
}

/// A workload holding as many relayed connections as one may is refused more, by name, and its
/// refused connections never reach the upstream; another workload's go on, up to the relay's own
/// limit. Without the share, one workload could take every descriptor the relay has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_at_its_connection_limit_leaves_the_others_theirs() {
    let f = fixture("limits");
    let cg = TestCgroup::new("relay-limits");
    let log = log_path("relay-limits");
    let relay = RelayConfig {
        max_connections: Some(6),
        max_per_workload: Some(4),
        ..RelayConfig::default()
    };
    let a = agent_with(&f, &cg, &log, relay).await;
    // Two workloads: cgroups under the enforced one, made a moment before their first
    // connections, as a new pod's are; the records name them all the same.
    let (one, two) = (cg.path.join("one"), cg.path.join("two"));
    for dir in [&one, &two] {
        std::fs::create_dir(dir).expect("a workload's cgroup");
    }
    let dst = at(f.w.v4(25), 443);
    let hold = |cgroup: &Path, n: usize| {
        HeldProbe::start(
            Some(cgroup),
            &["hello-hold", &dst, "echo.test", &n.to_string()],
            "held",
        )
    };
    let upstream = || f.echo.lock().expect("arrivals").len();
    let reached = |n: usize| {
        wait_for(
            &format!("{n} connections upstream"),
            Duration::from_secs(10),
            || upstream() == n,
        );
    };
    let echo =
        |cgroup: &Path| probe_with_pid(Some(cgroup), &["hello-echo", &dst, "echo.test", "1000"]);
    let refused = |cgroup: &Path, why: &str| {
        let (got, pid) = echo(cgroup);
        assert_ne!(got, "ok", "a connection over the limit was relayed");
        let r = relay_record(&log, "the refusal", |r| r.pid == Some(pid));
        assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
        assert!(
            r.reason.as_deref().is_some_and(|s| s.contains(why)),
            "{r:?}"
        );
        let name = cgroup.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            r.cgroup.as_deref().is_some_and(|c| c.ends_with(name)),
            "the refusal names the workload: {r:?}"
        );
        assert_eq!(r.dst.map(|d| d.to_string()), Some(dst.clone()), "{r:?}");
        r
    };

    let first = hold(&one, 4);
    reached(4);
    let by_workload = refused(&one, "its workload holds 4 relay connections");
    // The other workload is not held back by the first's connections.
    assert_eq!(echo(&two).0, "ok");
    reached(5);
    // Its connection counts until the relay has ended it.
    wait_for(
        "the echo's connection ended",
        Duration::from_secs(10),
        || a.status.relay_open.get() == 4,
    );
    let second = hold(&two, 2);
    reached(7);
    let by_relay = refused(&two, "the relay holds 6 connections");
    assert_eq!(upstream(), 7, "a refused connection reached the upstream");
    let over = |limit| {
        a.status
            .relay_over_limit
            .get_or_create(&egress_agent::metrics::LimitLabels { limit })
            .get()
    };
    assert_eq!((over("workload"), over("relay")), (1, 1));
    assert_no_relay_record_left(&[&by_workload, &by_relay]);

    first.release();
    second.release();
    wait_for(
        "no relayed connection open",
        Duration::from_secs(10),
        || a.status.relay_open.get() == 0,
    );
    // Its connections closed, the first workload has its share again.
    assert_eq!(echo(&one).0, "ok");
    a.shutdown().await;
}

/// An agent that stops ends the relayed connections in progress, and each has its record: a
/// connection's end is never missing from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_progress_when_the_agent_stops_have_their_records() {
    let f = fixture("stopped");
    let cg = TestCgroup::new("relay-stopped");
    let log = log_path("relay-stopped");
    let a = Agent::start(AgentConfig {
        // Long enough that the connection without a ClientHello is still waiting for it.
        relay: RelayConfig {
            hello_timeout: Duration::from_secs(60),
            ..RelayConfig::default()
        },
        ..f.w
            .agent_config(POLICY, Mode::RegistryOnly, &cg, Some(&log))
    })
    .await
    .expect("agent starts");
    let dst = at(f.w.v4(25), 443);
    // Two past their ClientHello, answered and carrying; one that has sent nothing.
    let carrying = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &dst, "echo.test", "2"],
        "held",
    );
    let waiting = HeldProbe::start(Some(&cg.path), &["connect-hold", &dst], "held");
    wait_for(
        "the relay holding all three",
        Duration::from_secs(10),
        || a.status.relay_open.get() == 3 && f.echo.lock().expect("arrivals").len() == 2,
    );
    let status = Arc::clone(&a.status);
    a.shutdown().await;

    let relayed: Vec<Record> = records(&log)
        .into_iter()
        .filter(|r| r.kind == "relay")
        .collect();
    assert_eq!(relayed.len(), 3, "{relayed:?}");
    for r in &relayed {
        assert_eq!(r.outcome.as_deref(), Some("stopped"), "{r:?}");
        assert_eq!(r.reason.as_deref(), Some("the agent stopped"), "{r:?}");
        assert_eq!(r.dst.map(|d| d.to_string()), Some(dst.clone()), "{r:?}");
        assert!(r.src.is_some() && r.duration_ms.is_some(), "{r:?}");
        assert_eq!(r.host.as_deref(), Some("echo.test"), "{r:?}");
    }
    let by = |pid| relayed.iter().filter(move |r| r.pid == Some(pid));
    for r in by(carrying.pid()) {
        assert_eq!(r.sni.as_deref(), Some("echo.test"), "{r:?}");
        assert!(r.upstream.is_some() && r.attempts == Some(1), "{r:?}");
        // The hello went up, and the upstream's answer (the hello again) came down.
        assert!(r.bytes_up.is_some_and(|n| n > 0), "{r:?}");
        assert_eq!(r.bytes_up, r.bytes_down, "{r:?}");
    }
    assert_eq!(by(carrying.pid()).count(), 2);
    let r = by(waiting.pid())
        .next()
        .expect("the record of the one without a hello");
    assert_eq!((r.sni.as_deref(), r.upstream), (None, None), "{r:?}");
    assert_eq!(
        relayed_count(&status, "stopped", "echo.test"),
        3,
        "counted in the metrics"
    );
    carrying.release();
    waiting.release();
}

/// An agent on the test's policy with `more` (YAML documents) added.
async fn agent_with_policy(f: &Fixture, cg: &TestCgroup, log: &Path, more: &str) -> Agent {
    let policy = format!("{POLICY}---\n{more}");
    Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, cg, Some(log)))
        .await
        .expect("agent starts")
}

/// A DestinationRule's `connectionPool.tcp`: `maxConnections` bounds the destination's
/// connections through the relay (a connection over it is refused and never reaches the
/// upstream), and `tcpKeepalive` is set on the relay's upstream connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_connection_pool_bounds_the_destinations_connections() {
    let f = fixture("pool");
    let cg = TestCgroup::new("relay-pool");
    let log = log_path("relay-pool");
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-pool, namespace: shop}
spec:
  host: echo.test
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 2
        tcpKeepalive: {time: 30s, interval: 5s, probes: 4}
"#,
    )
    .await;
    let dst = at(f.w.v4(25), 443);
    let upstream = || f.echo.lock().expect("arrivals").len();
    let held = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &dst, "echo.test", "2"],
        "held",
    );
    wait_for("two connections upstream", Duration::from_secs(10), || {
        upstream() == 2
    });
    // The kernel's view of the relay's upstream sockets: each has the keepalive timer, armed
    // with the DestinationRule's time.
    let ss = Command::new("ss")
        .args(["-tnoH", "state", "established", "dst", &dst])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&ss.stdout);
    let timers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("timer:(").nth(1))
        .collect();
    assert_eq!(timers.len(), 2, "{text}");
    for t in timers {
        let secs: u64 = t
            .strip_prefix("keepalive,")
            .and_then(|t| t.split("sec").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a keepalive timer: {t}"));
        assert!((25..=30).contains(&secs), "{t}");
    }

    let (got, pid) = probe_with_pid(Some(&cg.path), &["hello-echo", &dst, "echo.test", "100"]);
    assert_ne!(got, "ok", "a third connection was relayed");
    let r = relay_record(&log, "the refusal", |r| r.pid == Some(pid));
    assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "echo.test:443 has 2 connections through the relay, as many as \
             DestinationRule/shop/echo-pool allows (connectionPool.tcp.maxConnections)"
        ),
        "{r:?}"
    );
    assert_eq!(r.sni.as_deref(), Some("echo.test"), "{r:?}");
    assert_eq!(upstream(), 2, "the refused connection reached the upstream");
    assert_eq!(
        a.status
            .relay_over_limit
            .get_or_create(&egress_agent::metrics::LimitLabels {
                limit: "destination"
            })
            .get(),
        1
    );

    held.release();
    wait_for(
        "no relayed connection open",
        Duration::from_secs(10),
        || a.status.relay_open.get() == 0,
    );
    assert_eq!(
        probe_in(Some(&cg.path), &["hello-echo", &dst, "echo.test", "100"]),
        "ok"
    );
    a.shutdown().await;
}

/// A VirtualService that routes one port of a host to the egress gateway steers that port only:
/// the host's plain port goes direct, as it does in Istio, instead of to a relay that would wait
/// for a ClientHello it never gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_for_one_port_steers_that_port_alone() {
    let f = fixture("one-port");
    f.w.host(27);
    let ip = f.w.v4(27);
    let seen =
        f.w.tls_server(SocketAddr::new(ip, 443), f.pki.server(&["mixed.test"]));
    f.w.tcp_server(SocketAddr::new(ip, 80));
    let cg = TestCgroup::new("relay-one-port");
    let log = log_path("relay-one-port");
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mixed, namespace: shop}}
spec:
  hosts: [mixed.test]
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 443, name: tls, protocol: TLS}}
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mixed-tls, namespace: shop}}
spec:
  hosts: [mixed.test]
  gateways: [mesh, egress]
  tls:
  - match: [{{gateways: [mesh], port: 443, sniHosts: [mixed.test]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
  - match: [{{gateways: [egress], port: 443, sniHosts: [mixed.test]}}]
    route: [{{destination: {{host: mixed.test}}}}]
"#
        ),
    )
    .await;

    let plain = at(ip, 80);
    let (got, pid) = probe_with_pid(Some(&cg.path), &["tcp", &plain]);
    assert_eq!(got, "ok", "the plain port's greeting");
    let r = wait_record(&log, "the plain port's connect", |r| {
        r.kind == "connect" && r.pid == Some(pid)
    });
    assert_eq!(r.verdict.as_deref(), Some("allow"), "{r:?}");
    assert_eq!(shown(r.dst), plain, "{r:?}");

    let out = curl(&cg, &f.pki.ca_pem, "mixed.test", ip);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=mixed.test\n");
    assert_eq!(seen.names(), [Some("mixed.test".to_owned())]);
    let r = relay_record(&log, "the TLS port's relay record", |r| {
        shown(r.dst) == at(ip, 443)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert!(
        !records(&log)
            .iter()
            .any(|r| r.kind == "relay" && shown(r.dst) == plain),
        "the plain port went through the relay"
    );
    a.shutdown().await;
}

/// A VirtualService's `tls` route sends a host's connections to another registered host (its
/// one port), or splits them between two by weight, as Envoy's `tcp_proxy` does: the relay
/// connects to the addresses the policy gives that host, with the client's own server name. A
/// route to a host no ServiceEntry has is refused, never tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_route_sends_connections_to_another_host_or_splits_them_by_weight() {
    let f = fixture("routed");
    for h in 27..=30 {
        f.w.host(h);
    }
    let (moved, to, split, lost) = (f.w.v4(27), f.w.v4(28), f.w.v4(29), f.w.v4(30));
    let names = ["moved.test", "split.test", "lost.test"];
    let at_moved =
        f.w.tls_server(SocketAddr::new(moved, 443), f.pki.server(&names));
    let at_to =
        f.w.tls_server(SocketAddr::new(to, 8443), f.pki.server(&names));
    let at_split =
        f.w.tls_server(SocketAddr::new(split, 443), f.pki.server(&names));
    let at_lost =
        f.w.tls_server(SocketAddr::new(lost, 443), f.pki.server(&names));
    let cg = TestCgroup::new("relay-routed");
    let log = log_path("relay-routed");
    let entry = |name: &str, port: u16, ip: IpAddr| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, \
             namespace: shop}}\nspec:\n  hosts: [{name}.test]\n  ports: [{{number: {port}, name: \
             tls, protocol: TLS}}]\n  resolution: STATIC\n  endpoints: [{{address: {ip}}}]\n---\n"
        )
    };
    let policy = format!(
        "{}{}{}{}{}",
        entry("moved", 443, moved),
        entry("to", 8443, to),
        entry("split", 443, split),
        entry("lost", 443, lost),
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes, namespace: shop}
spec:
  hosts: [moved.test, split.test, lost.test]
  tls:
  - match: [{port: 443, sniHosts: [moved.test]}]
    route: [{destination: {host: to.test}}]
  - match: [{port: 443, sniHosts: [split.test]}]
    route:
    - destination: {host: split.test}
      weight: 50
    - destination: {host: to.test}
      weight: 50
  - match: [{port: 443, sniHosts: [lost.test]}]
    route: [{destination: {host: nowhere.test}}]
"#
    );
    let a = agent_with_policy(&f, &cg, &log, &policy).await;

    // Moved: to.test's one port, under the client's server name.
    let out = curl(&cg, &f.pki.ca_pem, "moved.test", moved);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=moved.test\n");
    assert_eq!(at_to.names(), [Some("moved.test".to_owned())]);
    assert!(at_moved.names().is_empty(), "{:?}", at_moved.names());
    let r = relay_record(&log, "the moved connection", |r| {
        shown(r.dst) == at(moved, 443)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(shown(r.upstream), at(to, 8443), "{r:?}");
    assert_eq!(r.upstream_host.as_deref(), Some("to.test"), "{r:?}");
    assert_eq!(r.host.as_deref(), Some("moved.test"), "{r:?}");

    // Split half and half: over 24 connections each side takes some (all on one side: 2^-23).
    for _ in 0..24 {
        let out = curl(&cg, &f.pki.ca_pem, "split.test", split);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=split.test\n");
    }
    let (stayed, went) = (at_split.names().len(), at_to.names().len() - 1);
    assert_eq!(stayed + went, 24);
    assert!(stayed > 0 && went > 0, "split {stayed} / {went}");
    let split_records = || {
        records(&log)
            .into_iter()
            .filter(|r| r.kind == "relay" && shown(r.dst) == at(split, 443))
            .collect::<Vec<_>>()
    };
    wait_for(
        "the split connections' records",
        Duration::from_secs(10),
        || split_records().len() == 24,
    );
    let to_records = split_records()
        .iter()
        .filter(|r| r.upstream_host.as_deref() == Some("to.test"))
        .count();
    assert_eq!(to_records, went);

    // A route to a host no ServiceEntry has: refused, and nothing reaches lost.test's server.
    let out = curl(&cg, &f.pki.ca_pem, "lost.test", lost);
    assert!(!out.status.success(), "a route to nowhere went through");
    let r = relay_record(&log, "the lost connection", |r| {
        shown(r.dst) == at(lost, 443)
    });
    assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
    assert_eq!(
        r.reason.as_deref(),
        Some("nowhere.test is not a host of any ServiceEntry in force"),
        "{r:?}"
    );
    assert!(at_lost.names().is_empty());
    assert_eq!(
        at_lost.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    a.shutdown().await;
}

/// Through an egress gateway, the gateway's own `tls` route decides where the connection goes:
/// here another registered host, as the gateway's Envoy would send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_gateways_own_tls_route_sends_connections_to_another_host() {
    let f = fixture("gateway-routed");
    f.w.host(27);
    f.w.host(28);
    let (dialled, to) = (f.w.v4(27), f.w.v4(28));
    let at_dialled =
        f.w.tls_server(SocketAddr::new(dialled, 443), f.pki.server(&["gw.test"]));
    let at_to =
        f.w.tls_server(SocketAddr::new(to, 443), f.pki.server(&["gw.test"]));
    let cg = TestCgroup::new("relay-gateway-routed");
    let log = log_path("relay-gateway-routed");
    let policy = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: gw, namespace: shop}}
spec:
  hosts: [gw.test]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: {dialled}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mirror-site, namespace: shop}}
spec:
  hosts: [mirror-site.test]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: {to}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: gw, namespace: shop}}
spec:
  hosts: [gw.test]
  gateways: [mesh, istio-egressgateway]
  tls:
  - match: [{{gateways: [mesh], port: 443, sniHosts: [gw.test]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 443}}}}}}]
  - match: [{{gateways: [istio-egressgateway], port: 443, sniHosts: [gw.test]}}]
    route: [{{destination: {{host: mirror-site.test, port: {{number: 443}}}}}}]
"#
    );
    let a = agent_with_policy(&f, &cg, &log, &policy).await;
    let out = curl(&cg, &f.pki.ca_pem, "gw.test", dialled);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(at_to.names(), [Some("gw.test".to_owned())]);
    assert!(at_dialled.names().is_empty(), "{:?}", at_dialled.names());
    let r = relay_record(&log, "the gateway's connection", |r| {
        r.sni.as_deref() == Some("gw.test")
    });
    assert_eq!(
        r.upstream_host.as_deref(),
        Some("mirror-site.test"),
        "{r:?}"
    );
    assert_eq!(shown(r.upstream), at(to, 443), "{r:?}");
    a.shutdown().await;
}

/// A route to a subset goes to the endpoints whose labels hold the subset's, as Istio selects
/// them, whichever endpoint was dialled; a split between two subsets takes each by weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_a_subset_goes_to_the_endpoints_with_its_labels() {
    let f = fixture("subsets");
    f.w.host(27);
    f.w.host(28);
    let (v1, v2) = (f.w.v4(27), f.w.v4(28));
    let names = ["canary.test", "split-canary.test"];
    let at_v1 =
        f.w.tls_server(SocketAddr::new(v1, 443), f.pki.server(&names));
    let at_v2 =
        f.w.tls_server(SocketAddr::new(v2, 443), f.pki.server(&names));
    let cg = TestCgroup::new("relay-subsets");
    let log = log_path("relay-subsets");
    let policy = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: canary, namespace: shop}}
spec:
  hosts: [canary.test, split-canary.test]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints:
  - {{address: {v1}, labels: {{version: v1, zone: a}}}}
  - {{address: {v2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: canary, namespace: shop}}
spec:
  host: canary.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: split-canary, namespace: shop}}
spec:
  host: split-canary.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: canary, namespace: shop}}
spec:
  hosts: [canary.test, split-canary.test]
  tls:
  - match: [{{port: 443, sniHosts: [canary.test]}}]
    route: [{{destination: {{host: canary.test, subset: v2}}}}]
  - match: [{{port: 443, sniHosts: [split-canary.test]}}]
    route:
    - destination: {{host: split-canary.test, subset: v1}}
      weight: 50
    - destination: {{host: split-canary.test, subset: v2}}
      weight: 50
"#
    );
    let a = agent_with_policy(&f, &cg, &log, &policy).await;

    // Dialled at v1's endpoint, taken to v2's.
    let out = curl(&cg, &f.pki.ca_pem, "canary.test", v1);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(at_v2.names(), [Some("canary.test".to_owned())]);
    assert!(at_v1.names().is_empty(), "{:?}", at_v1.names());
    let r = relay_record(&log, "the canary's connection", |r| {
        r.sni.as_deref() == Some("canary.test")
    });
    assert_eq!(shown(r.upstream), at(v2, 443), "{r:?}");

    // Half and half over 24 connections, all dialled at v1's endpoint.
    for _ in 0..24 {
        let out = curl(&cg, &f.pki.ca_pem, "split-canary.test", v1);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let split = |seen: &Seen| {
        (seen.names().iter())
            .filter(|n| n.as_deref() == Some("split-canary.test"))
            .count()
    };
    let (to_v1, to_v2) = (split(&at_v1), split(&at_v2));
    assert_eq!(to_v1 + to_v2, 24);
    assert!(to_v1 > 0 && to_v2 > 0, "split {to_v1} / {to_v2}");
    a.shutdown().await;
}

/// Istio's egress gateway for TCP: a route sends a host's TCP ports to the gateway. Their bytes
/// carry no host name and the server may speak first (MySQL's greeting), so the relay carries
/// them as they come, to the destination the kernel recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_port_routed_to_the_gateway_is_carried_as_it_comes() {
    let f = fixture("tcp-port");
    f.w.host(28);
    let ip = f.w.v4(28);
    // A server that speaks first, and one that answers what it was sent.
    f.w.tcp_server(SocketAddr::new(ip, 3306));
    f.w.tcp_sink_reply(SocketAddr::new(ip, 7000));
    let cg = TestCgroup::new("relay-tcp-port");
    let log = log_path("relay-tcp-port");
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: shop}}
spec:
  hosts: [db.test]
  ports:
  - {{number: 3306, name: mysql, protocol: MYSQL}}
  - {{number: 7000, name: raw, protocol: TCP}}
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db-via-gateway, namespace: shop}}
spec:
  hosts: [db.test]
  tcp:
  - route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
"#
        ),
    )
    .await;

    for (port, mode) in [(3306, "tcp"), (7000, "transfer")] {
        let dst = at(ip, port);
        let mut args = vec![mode, &dst];
        if mode == "transfer" {
            args.push("100000");
        }
        let (got, pid) = probe_with_pid(Some(&cg.path), &args);
        assert_eq!(got, "ok", "{mode} to {dst}");
        let r = relay_record(&log, &format!("the relay record of {dst}"), |r| {
            r.pid == Some(pid)
        });
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
        assert_eq!(r.verdict.as_deref(), Some("steer"), "{r:?}");
        assert_eq!(shown(r.upstream), dst, "{r:?}");
        assert_eq!(r.host.as_deref(), Some("db.test"), "{r:?}");
        assert_eq!(r.sni, None, "{r:?}");
        if mode == "transfer" {
            assert_eq!(r.bytes_up, Some(100_000), "{r:?}");
            assert_eq!(r.bytes_down, Some(100_000), "{r:?}");
        } else {
            assert_eq!(r.bytes_down, Some(6), "the greeting: {r:?}");
        }
    }
    a.shutdown().await;
}

/// A steered port without a declared protocol is told by the client's first bytes, as Istio
/// detects it: TLS is read as TLS (its server name judged), HTTP/1.1 is served as HTTP (each
/// request's host judged), anything else is carried as it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_without_a_protocol_is_told_by_its_first_bytes() {
    let f = fixture("detect");
    f.w.host(29);
    let ip = f.w.v4(29);
    let tls =
        f.w.tls_server(SocketAddr::new(ip, 443), f.pki.server(&["auto.test"]));
    let web = f.w.http_server(SocketAddr::new(ip, 8080));
    f.w.tcp_sink_reply(SocketAddr::new(ip, 7000));
    let cg = TestCgroup::new("relay-detect");
    let log = log_path("relay-detect");
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: auto, namespace: shop}}
spec:
  hosts: [auto.test]
  ports:
  - {{number: 443, name: a}}
  - {{number: 8080, name: b}}
  - {{number: 7000, name: c}}
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: auto-via-gateway, namespace: shop}}
spec:
  hosts: [auto.test]
  tcp:
  - route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
"#
        ),
    )
    .await;

    let out = curl(&cg, &f.pki.ca_pem, "auto.test", ip);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sni=auto.test\n",
        "{out:?}"
    );
    assert_eq!(tls.names(), [Some("auto.test".to_owned())]);
    let r = relay_record(&log, "the TLS connection's record", |r| {
        shown(r.dst) == at(ip, 443)
    });
    assert_eq!(r.sni.as_deref(), Some("auto.test"), "{r:?}");
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");

    let http = |host: &str| {
        cg.command("curl")
            .args(["-sS", "--max-time", "10", "-H", &format!("Host: {host}")])
            .arg(format!("http://{}/", at(ip, 8080)))
            .output()
            .expect("run curl")
    };
    let out = http("auto.test:8080");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "host=auto.test:8080\n",
        "{out:?}"
    );
    let r = relay_record(&log, "the HTTP connection's record", |r| {
        shown(r.dst) == at(ip, 8080)
    });
    assert_eq!((r.requests, r.status), (Some(1), Some(200)), "{r:?}");
    let out = http("other.test");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("egress: "),
        "{out:?}"
    );
    assert_eq!(
        web.names().len(),
        1,
        "a request for another host reached the upstream"
    );
    // HTTP/2 without TLS is served as HTTP/2, each request's host checked as well.
    let out = cg
        .command("curl")
        .args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
        .args([
            "-w",
            "%{http_code} %{http_version}\n",
            "-H",
            "host: other.test",
        ])
        .arg(format!("http://{}/", at(ip, 8080)))
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "egress: server name other.test is not a host of ServiceEntry/shop/auto\n403 2\n",
        "{out:?}"
    );
    let r = relay_record(&log, "the HTTP/2 refusal", |r| {
        r.reason
            .as_deref()
            .is_some_and(|s| s.starts_with("server name other.test is not a host"))
    });
    assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
    assert_eq!(
        web.accepted(),
        1,
        "the HTTP/2 connection reached the upstream"
    );

    let (got, pid) = probe_with_pid(Some(&cg.path), &["transfer", &at(ip, 7000), "100000"]);
    assert_eq!(got, "ok");
    let r = relay_record(&log, "the other connection's record", |r| {
        r.pid == Some(pid)
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(
        (r.bytes_up, r.bytes_down),
        (Some(100_000), Some(100_000)),
        "{r:?}"
    );
    assert_eq!(r.sni, None, "{r:?}");
    a.shutdown().await;
}

/// A DestinationRule's `connectionPool.tcp.idleTimeout` replaces the relay's own for its host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_idle_timeout_closes_a_quiet_connection() {
    let f = fixture("pool-idle");
    let cg = TestCgroup::new("relay-pool-idle");
    let log = log_path("relay-pool-idle");
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-idle, namespace: shop}
spec:
  host: echo.test
  trafficPolicy:
    connectionPool: {tcp: {idleTimeout: 300ms}}
"#,
    )
    .await;
    let dst = at(f.w.v4(25), 443);
    let held = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &dst, "echo.test", "1"],
        "held",
    );
    let r = relay_record(&log, "the quiet connection's end", |r| {
        r.pid == Some(held.pid())
    });
    assert_eq!(r.outcome.as_deref(), Some("idle-timeout"), "{r:?}");
    // The relay's own idle timeout is an hour.
    assert!(
        r.duration_ms.is_some_and(|d| (300..10_000).contains(&d)),
        "{r:?}"
    );
    held.release();
    a.shutdown().await;
}

/// The idle limit holds from the ClientHello on: an upstream that takes the hello and never
/// answers is cut at it as a quiet connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_the_hello_is_cut_at_the_idle_timeout() {
    let f = fixture("mute");
    let cg = TestCgroup::new("relay-mute");
    let log = log_path("relay-mute");
    // Reads what it is sent to the end before it answers: never, while the client holds on.
    f.w.host(27);
    let ip = f.w.v4(27);
    f.w.tcp_sink_reply(SocketAddr::new(ip, 443));
    let a = agent_with_policy(
        &f,
        &cg,
        &log,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mute, namespace: shop}}
spec:
  hosts: [mute.test]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: "{ip}"}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mute-through-relay, namespace: shop}}
spec:
  hosts: [mute.test]
  http:
  - route: [{{destination: {{host: mute.test}}}}]
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mute-idle, namespace: shop}}
spec:
  host: mute.test
  trafficPolicy:
    connectionPool: {{tcp: {{idleTimeout: 300ms}}}}
"#
        ),
    )
    .await;
    let held = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &at(ip, 443), "mute.test", "1"],
        "held",
    );
    let r = relay_record(&log, "the unanswered connection's end", |r| {
        r.pid == Some(held.pid())
    });
    assert_eq!(r.outcome.as_deref(), Some("idle-timeout"), "{r:?}");
    assert_eq!(shown(r.upstream), at(ip, 443), "{r:?}");
    assert_eq!(r.bytes_down, Some(0), "{r:?}");
    assert!(
        r.bytes_up.is_some_and(|n| n > 0),
        "the hello went up: {r:?}"
    );
    // The relay's own idle timeout is an hour.
    assert!(
        r.duration_ms.is_some_and(|d| (300..10_000).contains(&d)),
        "{r:?}"
    );
    held.release();
    a.shutdown().await;
}

/// A container's or pod's process: loopback is its own namespace's, so the relay must listen
/// there, and the upstream connection must leave from there as the workload's own would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_in_its_own_network_namespace_is_relayed_from_there() {
    let f = fixture("netns");
    let cg = TestCgroup::new("relay-netns");
    let log = log_path("relay-netns");
    let pod = f.w.pod();
    let a = agent(&f, &cg, &log).await;
    let served = |n| {
        wait_for(
            &format!("the relay listening in {n} namespace(s)"),
            Duration::from_secs(10),
            || a.status.relay_namespaces.get() == n,
        );
    };
    served(1);
    // A direct dial of the relay's port in the pod's namespace, from outside the cgroup.
    let relay = format!("127.0.0.1:{}", a.relay_port);
    let dial = || {
        let out = pod
            .command(None, target_bin("egress-probe"))
            .args(["tcp", &relay])
            .output()
            .expect("run egress-probe");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        dial(),
        "refused",
        "the relay listens in the pod before any workload"
    );

    let workload = pod.workload(&cg);
    served(2);
    assert_eq!(
        dial(),
        "error:closed before the greeting",
        "the relay's listener in the pod refuses a dial without a kernel record"
    );
    for (ip, seen, from) in [
        (f.w.v4(20), &f.tls4, pod.v4()),
        (f.w.v6(20), &f.tls6, pod.v6()),
    ] {
        let curl = pod.command(Some(&cg), "curl");
        let r = tls_test_through_relay(&f, curl, &log, ip, seen, &[]);
        let peers: Vec<IpAddr> = seen.peers().iter().map(SocketAddr::ip).collect();
        assert_eq!(peers, [from], "the upstream connection left from the pod");
        let dst = at(ip, 443);
        assert_eq!(shown(r.upstream), dst, "{r:?}");
        assert_eq!(r.comm.as_deref(), Some("curl"), "{r:?}");
    }

    // No process of the cgroup is left in the pod's namespace: the relay stops listening there.
    workload.leave();
    served(1);
    assert_eq!(
        dial(),
        "refused",
        "the relay's listener in the pod is closed"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steered_connect_from_a_namespace_not_served_yet_waits_for_the_relay() {
    let f = fixture("netns-new");
    let cg = TestCgroup::new("relay-netns-new");
    let log = log_path("relay-netns-new");
    let pod = f.w.pod();
    let a = agent_without_scan(&f, &cg, &log).await;
    let ca = f.pki.ca_pem.to_string_lossy().into_owned();
    // The probe joins the cgroup, enters the pod's namespace and connects at once: the relay has
    // not found the namespace (it does not scan again), and before the hold the kernel refused
    // the connect ("denied").
    let dst = at(f.w.v4(20), 443);
    let got = cg.probe(&["--netns", &pod.path(), "tls", &dst, "tls.test", &ca]);
    assert_eq!(got, "ok:sni=tls.test");
    wait_for(
        "the pod's namespace served on the kernel's word",
        Duration::from_secs(5),
        || a.status.relay_namespaces_wanted.get() == 1 && a.status.relay_namespaces.get() == 2,
    );
    let r = relay_record(&log, "relay record", |r| shown(r.dst) == dst);
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(shown(r.upstream), dst, "{r:?}");
    let peers: Vec<IpAddr> = f.tls4.peers().iter().map(SocketAddr::ip).collect();
    assert_eq!(
        peers,
        [pod.v4()],
        "the upstream connection left from the pod"
    );
    a.shutdown().await;
}

/// A namespace the relay cannot serve (its loopback has no 127.0.0.1: nothing can listen there)
/// is tried again on the kernel's hints once a second at most, however many steered connects
/// hint: each attempt costs the agent far more than the connect costs the workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_cannot_be_served_is_tried_again_once_a_second_at_most() {
    let f = fixture("netns-unservable");
    let cg = TestCgroup::new("relay-netns-unservable");
    let log = log_path("relay-netns-unservable");
    let pod = f.w.pod();
    // Without a default route either, a connect there fails at once (ENETUNREACH).
    for args in [
        &["addr", "del", "127.0.0.1/8", "dev", "lo"][..],
        &["route", "del", "default"],
    ] {
        let done = std::process::Command::new("ip")
            .args(["-n", &pod.name])
            .args(args)
            .status()
            .expect("ip");
        assert!(done.success(), "ip {args:?}");
    }
    let a = agent_without_scan(&f, &cg, &log).await;
    let dst = at(f.w.v4(20), 443);
    let status = &a.status;
    // Twenty steered connects at once, from a thread that stays there: twenty hints, one attempt.
    let held = HeldProbe::start(
        Some(&cg.path),
        &["--netns", &pod.path(), "tcp-repeat", &dst, "20"],
        "done",
    );
    wait_for("the twenty hints", Duration::from_secs(5), || {
        status.relay_namespace_hints.get() == 20
    });
    assert_eq!(status.relay_namespace_failures.get(), 1, "one attempt");
    assert_eq!(status.relay_namespaces.get(), 1, "the pod is not served");
    // A second later a hint tries again.
    wait_for("a second attempt", Duration::from_secs(5), || {
        let hints = status.relay_namespace_hints.get();
        let again = HeldProbe::start(
            Some(&cg.path),
            &["--netns", &pod.path(), "tcp-repeat", &dst, "1"],
            "done",
        );
        wait_for("its hint", Duration::from_secs(5), || {
            status.relay_namespace_hints.get() > hints
        });
        again.release();
        status.relay_namespace_failures.get() == 2
    });
    held.release();
    assert!(f.tls4.names().is_empty(), "nothing reached the upstream");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_a_thread_entered_alone_stays_served_while_the_thread_is_there() {
    let f = fixture("netns-thread");
    let cg = TestCgroup::new("relay-netns-thread");
    let log = log_path("relay-netns-thread");
    let pod = f.w.pod();
    let other = World::new();
    let other_pod = other.pod();
    let a = agent_with(
        &f,
        &cg,
        &log,
        RelayConfig {
            scan_interval: Duration::from_millis(50),
            ..RelayConfig::default()
        },
    )
    .await;
    let served = |n, what: &str| {
        wait_for(what, Duration::from_secs(10), || {
            a.status.relay_namespaces.get() == n
        });
    };
    // Only the probe's second thread enters the pod's namespace, so the scan, which reads each
    // process's main thread, does not find it there; its connect is held and hinted.
    let dst = at(f.w.v4(25), 443);
    // It says `held` once its connect went through.
    let thread = HeldProbe::start(
        Some(&cg.path),
        &[
            "--thread-netns",
            &pod.path(),
            "hello-hold",
            &dst,
            "echo.test",
            "1",
        ],
        "held",
    );
    wait_for(
        "the pod's namespace served on the thread's hint",
        Duration::from_secs(5),
        || a.status.relay_namespaces_wanted.get() == 1 && a.status.relay_namespaces.get() == 2,
    );
    // A process of the cgroup in a third namespace: once the scan has found it, it has also
    // judged the pod's, and kept it for the thread still there.
    let workload = other_pod.workload(&cg);
    served(3, "the pod's namespace kept beside the new one");
    assert_eq!(a.status.relay_namespaces_wanted.get(), 1, "served once");

    // The thread ends: the pod's namespace is no longer served; the other one still is.
    thread.release();
    served(2, "the pod's namespace dropped with its thread");
    workload.leave();
    served(1, "only the agent's own namespace served");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connect_never_reaches_what_the_workload_has_on_the_relays_port() {
    let f = fixture("netns-taken");
    let cg = TestCgroup::new("relay-netns-taken");
    let log = log_path("relay-netns-taken");
    let pod = f.w.pod();
    let a = agent_without_scan(&f, &cg, &log).await;
    let ca = f.pki.ca_pem.to_string_lossy().into_owned();
    // Something in the pod already listens where the relay would: the relay serves the pod on
    // another port, and the connect held on this one must not be let through to it.
    let squatter = pod.listen(SocketAddr::from(([127, 0, 0, 1], a.relay_port)));
    let untouched = || {
        assert_eq!(
            squatter.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "the workload's listener got the steered connection"
        );
    };
    let dst = at(f.w.v4(20), 443);
    let got = cg.probe(&["--netns", &pod.path(), "tls", &dst, "tls.test", &ca]);
    assert_eq!(got, "timeout", "the held connect waits, then fails");
    untouched();
    assert!(f.tls4.names().is_empty(), "nothing reached the upstream");
    // The pod is served on the other port now (on the hint): the next connect goes through the
    // relay.
    wait_for("the pod's namespace served", Duration::from_secs(5), || {
        a.status.relay_namespaces_wanted.get() == 1 && a.status.relay_namespaces.get() == 2
    });
    let got = cg.probe(&["--netns", &pod.path(), "tls", &dst, "tls.test", &ca]);
    assert_eq!(got, "ok:sni=tls.test");
    untouched();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_hello_is_cut_at_the_limit() {
    let f = fixture("silent");
    let cg = TestCgroup::new("relay-silent");
    let log = log_path("relay-silent");
    let a = agent(&f, &cg, &log).await;
    // The probe waits 2 s for a greeting; the relay's limit is 500 ms.
    let got = cg.probe(&["tcp", &at(f.w.v4(20), 443)]);
    assert_eq!(got, "error:closed before the greeting");
    let r = relay_record(&log, "relay record", |_| true);
    assert_eq!(r.outcome.as_deref(), Some("refused"), "{r:?}");
    assert_eq!(
        r.reason.as_deref(),
        Some("no complete ClientHello within 500ms"),
        "{r:?}"
    );
    assert_eq!(f.tls4.accepted(), 0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_is_retried_as_configured_then_fails_cleanly() {
    let f = fixture("retry");
    let cg = TestCgroup::new("relay-retry");
    let log = log_path("relay-retry");
    let a = agent(&f, &cg, &log).await;

    // retry.test's first address refuses; the retry goes to its other address.
    let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(22));
    assert!(
        out.status.success(),
        "curl retry.test: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=retry.test\n");
    let r = relay_record(&log, "retried relay", |r| {
        r.sni.as_deref() == Some("retry.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(23), 443), "{r:?}");
    assert_eq!(f.retry.names(), [Some("retry.test".to_owned())]);

    // fail.test's only address refuses: 1 + 2 attempts, then the client's connection is closed.
    let out = curl(&cg, &f.pki.ca_pem, "fail.test", f.w.v4(24));
    assert!(!out.status.success(), "curl fail.test succeeded");
    let r = relay_record(&log, "failed relay", |r| {
        r.sni.as_deref() == Some("fail.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
    assert_eq!(r.attempts, Some(3), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.contains("3 attempt(s) failed") && s.contains("refused")),
        "{r:?}"
    );
    a.shutdown().await;
}

/// An upstream connect that is not made at once: its first SYN lost, the relay waits for TCP to
/// send it again, then carries the connection; every SYN lost, each attempt ends at the route's
/// per-try timeout and the connection at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connect_that_waits_is_carried_or_timed_out() {
    let f = fixture("slow-connect");
    let cg = TestCgroup::new("relay-slow-connect");
    let log = log_path("relay-slow-connect");
    // Longer than TCP's first wait before it sends a SYN again (1 s).
    let policy = POLICY.replace("perTryTimeout: 1s", "perTryTimeout: 3s");
    assert_ne!(policy, POLICY);
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let upstream = SocketAddr::new(f.w.v4(21), 443);

    let lost = f.w.syn_drops(upstream, true);
    let out = curl(&cg, &f.pki.ca_pem, "other.test", f.w.v4(21));
    assert!(
        out.status.success(),
        "curl other.test: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=other.test\n");
    assert_eq!(lost.dropped().0, 1, "the first SYN is lost");
    drop(lost);
    let r = relay_record(&log, "the relay after a lost SYN", |r| {
        r.sni.as_deref() == Some("other.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(r.attempts, Some(1), "{r:?}");
    assert_eq!(f.other.names(), [Some("other.test".to_owned())]);

    let lost = f.w.syn_drops(upstream, false);
    let out = curl(&cg, &f.pki.ca_pem, "other.test", f.w.v4(21));
    assert!(!out.status.success(), "curl other.test with every SYN lost");
    let r = relay_record(&log, "the relay with every SYN lost", |r| {
        r.sni.as_deref() == Some("other.test") && r.outcome.as_deref() != Some("ok")
    });
    assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
    // The first attempt ends at 3 s, the second at the route's 5 s.
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert!(
        r.reason.as_deref().is_some_and(
            |s| s.starts_with("route timeout reached") && s.ends_with("connect timed out")
        ),
        "{r:?}"
    );
    assert!(lost.dropped().0 >= 2, "SYNs lost: {:?}", lost.dropped());
    assert_eq!(
        f.other.names().len(),
        1,
        "nothing more reached the upstream"
    );
    a.shutdown().await;
}

/// A DestinationRule's `outlierDetection` on a passed-through port: an address whose connects
/// failed as many times in a row as it allows is left out of the next connections' attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_address_is_ejected_from_the_attempts() {
    let f = fixture("outliers");
    let cg = TestCgroup::new("relay-outliers");
    let log = log_path("relay-outliers");
    let policy = format!(
        "{POLICY}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: retry, namespace: shop}}
spec:
  host: retry.test
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, baseEjectionTime: 5m, maxEjectionPercent: 100}}
"
    );
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    // retry.test's first address refuses: ejected after the first connection's first attempt.
    for (attempts, what) in [(2, "the first connection"), (1, "the next connection")] {
        let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(22));
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = relay_record(&log, what, |r| {
            r.sni.as_deref() == Some("retry.test") && r.attempts == Some(attempts)
        });
        assert_eq!(shown(r.upstream), at(f.w.v4(23), 443), "{what}: {r:?}");
    }
    a.shutdown().await;

    // With `minHealthPercent: 100`, one address of two out is below the panic threshold: none is
    // left out, and every connection tries the refusing address first.
    let log = log_path("relay-outliers-panic");
    let policy = policy.replace(
        "maxEjectionPercent: 100}",
        "maxEjectionPercent: 100, minHealthPercent: 100}",
    );
    assert!(policy.contains("minHealthPercent"));
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    for _ in 0..2 {
        let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(22));
        assert!(out.status.success(), "{out:?}");
    }
    wait_for("both records", Duration::from_secs(10), || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "relay" && r.attempts == Some(2))
            .count()
            == 2
    });
    a.shutdown().await;
}

/// A STATIC entry's endpoints serve each other's retries: tls.test's endpoints are hosts 22
/// (nothing listens) and 23, and a connection dialled to 22 is retried at 23.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_entrys_other_endpoint_serves_a_retry() {
    let f = fixture("static");
    let cg = TestCgroup::new("relay-static");
    let log = log_path("relay-static");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: static, namespace: shop}}
spec:
  hosts: [tls.test]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: {}}}, {{address: {}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: static, namespace: shop}}
spec:
  hosts: [tls.test]
  http:
  - route: [{{destination: {{host: tls.test}}}}]
    retries: {{attempts: 2, perTryTimeout: 1s}}
",
        f.w.v4(22),
        f.w.v4(23)
    );
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, &f.pki.ca_pem, "tls.test", f.w.v4(22));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=tls.test\n");
    let r = relay_record(&log, "the retried connection", |r| {
        r.sni.as_deref() == Some("tls.test")
    });
    assert_eq!(r.attempts, Some(2), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(23), 443), "{r:?}");
    assert_eq!(f.retry.names(), [Some("tls.test".to_owned())]);
    a.shutdown().await;
}

/// A STATIC entry's virtual address (one that holds none of its endpoints, where nothing
/// answers) is taken on to the endpoints, as Istio's proxy takes it: tls.test at host 99, its
/// endpoint host 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_entrys_virtual_address_is_taken_on_to_its_endpoints() {
    let f = fixture("virtual");
    let cg = TestCgroup::new("relay-virtual");
    let log = log_path("relay-virtual");
    let policy = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: virtual, namespace: shop}}
spec:
  hosts: [tls.test]
  addresses: [{}]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: {}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: renumbered, namespace: shop}}
spec:
  hosts: [other.test]
  addresses: [{}]
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: {}, ports: {{https: 8443}}}}]
",
        f.w.v4(99),
        f.w.v4(20),
        f.w.v4(98),
        f.w.v4(21)
    );
    let a = Agent::start(f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log)))
        .await
        .expect("agent starts");
    let out = curl(&cg, &f.pki.ca_pem, "tls.test", f.w.v4(99));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sni=tls.test\n");
    let r = relay_record(&log, "the virtual address's connection", |r| {
        r.sni.as_deref() == Some("tls.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    assert_eq!(shown(r.dst), at(f.w.v4(99), 443), "{r:?}");
    assert_eq!(shown(r.upstream), at(f.w.v4(20), 443), "{r:?}");
    assert_eq!(r.attempts, Some(1), "{r:?}");
    assert_eq!(f.tls4.names(), [Some("tls.test".to_owned())]);

    // other.test's only endpoint takes 443 on 8443: nowhere to take 443 of its virtual address.
    let out = curl(&cg, &f.pki.ca_pem, "other.test", f.w.v4(98));
    assert!(!out.status.success(), "{out:?}");
    let r = relay_record(&log, "the refused connection", |r| {
        r.sni.as_deref() == Some("other.test")
    });
    assert_eq!(r.outcome.as_deref(), Some("upstream-failed"), "{r:?}");
    assert_eq!(r.attempts, Some(0), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.contains("no endpoint of the ServiceEntry takes this port")),
        "{r:?}"
    );
    assert_eq!(f.other.accepted(), 0);
    a.shutdown().await;
}

/// A DestinationRule's `loadBalancer.simple` on a passed-through port chooses the first
/// attempt's address among the host's, where without one it is the address dialled: here
/// retry.test's first address (22), which refuses, while its other one (23) serves, so a
/// connection's attempts tell where it went first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_load_balancer_chooses_the_first_attempts_address() {
    let f = fixture("balance");
    let cg = TestCgroup::new("relay-balance");
    let agent = |tag: &str, simple: &str| {
        let log = log_path(tag);
        let lb = if simple.starts_with('{') {
            simple.to_owned()
        } else {
            format!("{{simple: {simple}}}")
        };
        let rule = format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: retry, namespace: shop}}
spec:
  host: retry.test
  trafficPolicy:
    loadBalancer: {lb}
"
        );
        let policy = format!("{POLICY}---\n{rule}");
        let config =
            f.w.agent_config(&policy, Mode::RegistryOnly, &cg, Some(&log));
        async move { (Agent::start(config).await.expect("agent starts"), log) }
    };
    let attempts = |log: &Path, n: usize| {
        wait_for("the relay records", Duration::from_secs(10), || {
            records(log)
                .iter()
                .filter(|r| r.kind == "relay" && r.sni.as_deref() == Some("retry.test"))
                .count()
                == n
        });
        records(log)
            .into_iter()
            .filter(|r| r.kind == "relay" && r.sni.as_deref() == Some("retry.test"))
            .map(|r| {
                (
                    r.attempts.unwrap_or(0),
                    r.outcome.unwrap_or_default().into_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let ok = |n: u32| (n, "ok".to_owned());

    // Round robin: the host's addresses in turn, 22 then 23, whichever was dialled.
    let (a, log) = agent("balance-rr", "ROUND_ROBIN").await;
    for _ in 0..3 {
        let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(22));
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(attempts(&log, 3), [ok(2), ok(1), ok(2)]);
    a.shutdown().await;

    // Passthrough: the dialled address alone, retries too; 23 is never tried.
    let (a, log) = agent("balance-passthrough", "PASSTHROUGH").await;
    let before = f.retry.accepted();
    let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(22));
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(attempts(&log, 1), [(3, "upstream-failed".to_owned())]);
    assert_eq!(f.retry.accepted(), before, "23 reached");
    a.shutdown().await;

    // Least request: with one connection held open at 23, of the two addresses the next takes
    // 22, which has none, first, though it dialled 23.
    let (a, log) = agent("balance-least", "LEAST_REQUEST").await;
    let before = f.retry.accepted();
    let holder = HeldProbe::start(
        Some(&cg.path),
        &["hello-hold", &at(f.w.v4(23), 443), "retry.test", "1"],
        "held",
    );
    wait_for(
        "the held connection upstream",
        Duration::from_secs(10),
        || f.retry.accepted() == before + 1,
    );
    for _ in 0..2 {
        let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(23));
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(attempts(&log, 2), [ok(2), ok(2)]);
    holder.release();
    a.shutdown().await;

    // A consistent hash on the source: every connection of the workload first takes the one
    // address its network namespace hashes to, whichever it dialled; without it each would take
    // the one dialled first (2 attempts at 22, 1 at 23).
    let (a, log) = agent("balance-hash", "{consistentHash: {useSourceIp: true}}").await;
    for ip in [22, 23, 22, 23] {
        let out = curl(&cg, &f.pki.ca_pem, "retry.test", f.w.v4(ip));
        assert!(out.status.success(), "{out:?}");
    }
    let each = attempts(&log, 4);
    assert!(each.iter().all(|a| *a == each[0]), "{each:?}");
    a.shutdown().await;
}

/// Descriptors a leaked relay connection would hold: pipes, and TCP sockets of this network
/// namespace that are not listening. The world's servers (other tests' worlds too, which keep
/// their listeners) live in their own namespaces and are not counted.
fn connection_fds() -> usize {
    let mut open = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Field 3 is the state (0A: LISTEN), field 9 the socket's inode.
            if f.len() > 9 && f[3] != "0A" {
                open.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("pipe:") || open.contains(l))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_relayed_connections_leave_no_descriptor_behind() {
    // This process holds the agent and the world's servers: room for both ends of each.
    egress_agent::relay::raise_nofile().expect("raise the descriptor limit");
    let f = fixture("many");
    let cg = TestCgroup::new("relay-many");
    let log = log_path("relay-many");
    let a = agent(&f, &cg, &log).await;
    let before = connection_fds();
    const N: usize = 3000;
    let ca = f.pki.ca_pem.to_string_lossy().into_owned();
    let got = probe_in(
        Some(&cg.path),
        &[
            "tls-hold",
            &at(f.w.v4(20), 443),
            "tls.test",
            &ca,
            &N.to_string(),
        ],
    );
    assert_eq!(got, "ok");
    assert_eq!(f.tls4.names().len(), N);
    wait_for("every relay record", Duration::from_secs(20), || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "relay" && r.outcome.as_deref() == Some("ok"))
            .count()
            == N
    });
    // The world's server threads close their ends on their own schedule: poll.
    wait_for(
        "descriptors back to where they were",
        Duration::from_secs(20),
        || connection_fds() <= before,
    );
    a.shutdown().await;
}
