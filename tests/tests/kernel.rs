//! Root-only: the real programs in the real kernel, real sockets, a real DNS server, and outside
//! hosts in a network namespace. Each test has its own world, cgroup and agent.
use std::{net::SocketAddr, time::Duration};

use egress_agent::{
    agent::{Agent, AgentConfig},
    policy::Mode,
};
use egress_tests::{TestCgroup, World, at, loopback_server, policy_dir, wait_for};

/// Registered: api.test (DNS) on 443/TCP and 5353/UDP; legacy-db (STATIC) on 5432/TCP.
fn policy(w: &World) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [api.test]
  ports:
  - {{number: 443, name: https, protocol: HTTPS}}
  - {{number: 5353, name: udp-svc, protocol: UDP}}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy-db}}
spec:
  hosts: [legacy-db.internal]
  ports:
  - {{number: 5432, name: postgres, protocol: TCP}}
  resolution: STATIC
  endpoints:
  - address: {}
  - address: {}
"#,
        w.v4(40),
        w.v6(40)
    )
}

/// A world with api.test at host 10 (both families) and an unregistered host 11, servers on
/// 443/TCP, 8443/TCP and 5353/UDP at both, and a database at 40/41.
fn world(ttl: u32) -> World {
    let mut w = World::new();
    for h in [10, 11, 12, 40, 41] {
        w.host(h);
        for ip in [w.v4(h), w.v6(h)] {
            w.tcp_server(SocketAddr::new(ip, 443));
            w.tcp_server(SocketAddr::new(ip, 8443));
            w.tcp_server(SocketAddr::new(ip, 5432));
            w.udp_echo(SocketAddr::new(ip, 5353));
            w.udp_echo(SocketAddr::new(ip, 443));
        }
    }
    let (a4, a6) = (w.v4(10), w.v6(10));
    w.start_dns(&[("api.test", a4), ("api.test", a6)], ttl);
    w
}

async fn agent(w: &World, cg: &TestCgroup, mode: Mode) -> Agent {
    Agent::start(w.agent_config(&policy(w), mode, cg, None))
        .await
        .expect("agent starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_enforces_hosts_ports_and_transports() {
    let w = world(300);
    let cg = TestCgroup::new("registry");
    let a = agent(&w, &cg, Mode::RegistryOnly).await;
    let (api4, api6, other4, other6) = (w.v4(10), w.v6(10), w.v4(11), w.v6(11));
    let cases = [
        // registered host, declared port, both families and transports
        ("tcp", at(api4, 443), "ok"),
        ("tcp", at(api6, 443), "ok"),
        ("udp", at(api4, 5353), "ok"),
        ("udp", at(api6, 5353), "ok"),
        ("udp-sendto", at(api4, 5353), "ok"),
        ("udp-sendto", at(api6, 5353), "ok"),
        // unregistered host
        ("tcp", at(other4, 443), "denied"),
        ("tcp", at(other6, 443), "denied"),
        ("udp", at(other4, 5353), "denied"),
        ("udp-sendto", at(other6, 5353), "denied"),
        // undeclared port
        ("tcp", at(api4, 8443), "denied"),
        ("tcp", at(api6, 8443), "denied"),
        // UDP to a TCP-only port, TCP to a UDP-only port
        ("udp", at(api4, 443), "denied"),
        ("udp-sendto", at(api6, 443), "denied"),
        ("tcp", at(api4, 5353), "denied"),
        // STATIC endpoints, and a neighbour that is not one
        ("tcp", at(w.v4(40), 5432), "ok"),
        ("tcp", at(w.v6(40), 5432), "ok"),
        ("tcp", at(w.v4(41), 5432), "denied"),
    ];
    for (kind, addr, want) in &cases {
        assert_eq!(&cg.probe(&[kind, addr]), want, "egress-probe {kind} {addr}");
    }
    // IPv4-mapped IPv6 is judged as the IPv4 address, on a dual-stack socket (connect6 hook).
    assert_eq!(cg.probe(&["tcp", &format!("[::ffff:{api4}]:443")]), "ok");
    assert_eq!(
        cg.probe(&["tcp", &format!("[::ffff:{other4}]:443")]),
        "denied"
    );
    assert_eq!(
        cg.probe(&["udp-sendto", &format!("[::ffff:{other4}]:5353")]),
        "denied"
    );
    assert_eq!(
        cg.probe(&["tcp", &format!("[::ffff:{api4}]:8443")]),
        "denied"
    );
    // Loopback is not egress.
    let lo4 = loopback_server("127.0.0.1:0");
    let lo6 = loopback_server("[::1]:0");
    assert_eq!(cg.probe(&["tcp", &lo4.to_string()]), "ok");
    assert_eq!(cg.probe(&["tcp", &lo6.to_string()]), "ok");
    // The resolver stays reachable on port 53, so registered names still resolve.
    let dns = w.dns_addr().to_string();
    assert_eq!(
        cg.probe(&["dns", &dns, "api.test"]),
        format!("ok:{api4},{api6}")
    );
    // The same destinations from outside the cgroup are untouched.
    assert_eq!(
        egress_tests::probe_in(None, &["tcp", &at(other4, 443)]),
        "ok"
    );
    a.shutdown().await;
    // Detached: the cgroup is no longer enforced.
    assert_eq!(cg.probe(&["tcp", &at(other4, 443)]), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_allows_unregistered_destinations() {
    let w = world(300);
    let cg = TestCgroup::new("allowany");
    let a = agent(&w, &cg, Mode::AllowAny).await;
    for (kind, addr, want) in [
        ("tcp", at(w.v4(11), 443), "ok"),
        ("tcp", at(w.v6(11), 8443), "ok"),
        ("udp", at(w.v4(11), 443), "ok"),
        ("tcp", at(w.v4(10), 443), "ok"),
    ] {
        assert_eq!(cg.probe(&[kind, &addr]), want, "egress-probe {kind} {addr}");
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dns_answer_is_followed_after_its_ttl() {
    let w = world(1);
    let cg = TestCgroup::new("ttl");
    let a = agent(&w, &cg, Mode::RegistryOnly).await;
    let (old, new) = (at(w.v4(10), 443), at(w.v4(12), 443));
    assert_eq!(cg.probe(&["tcp", &old]), "ok");
    assert_eq!(cg.probe(&["tcp", &new]), "denied");
    w.set_records(&[("api.test", w.v4(12)), ("api.test", w.v6(12))]);
    wait_for(
        "the new address to be allowed",
        Duration::from_secs(20),
        || cg.probe(&["tcp", &new]) == "ok",
    );
    assert_eq!(
        cg.probe(&["tcp", &old]),
        "denied",
        "the stale address is removed"
    );
    assert_eq!(cg.probe(&["tcp", &at(w.v6(12), 443)]), "ok");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_goes_away_leaves_the_last_good_answer() {
    let mut w = world(1);
    let cg = TestCgroup::new("dnsgone");
    let a = agent(&w, &cg, Mode::RegistryOnly).await;
    assert_eq!(cg.probe(&["tcp", &at(w.v4(10), 443)]), "ok");
    w.stop_dns();
    let failures = a.status.dns_failures.get();
    wait_for("a failed DNS refresh", Duration::from_secs(30), || {
        a.status.dns_failures.get() > failures
    });
    assert_eq!(cg.probe(&["tcp", &at(w.v4(10), 443)]), "ok");
    assert_eq!(cg.probe(&["tcp", &at(w.v6(10), 443)]), "ok");
    assert_eq!(cg.probe(&["tcp", &at(w.v4(11), 443)]), "denied");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_policy_in_force() {
    let w = world(300);
    let cg = TestCgroup::new("reload");
    let dir = policy_dir(&policy(&w));
    let a = Agent::start(AgentConfig {
        policies: vec![dir.clone()],
        mode: Some(Mode::RegistryOnly),
        dns: Some(w.dns_addr()),
        cgroup: cg.path.clone(),
        ifaces: Some(vec![w.iface().to_owned()]),
        ..AgentConfig::default()
    })
    .await
    .expect("agent starts");
    std::fs::write(dir.join("policy.yaml"), "kind: ServiceEntry\napiVersion: networking.istio.io/v1\nmetadata: {name: x}\nspec: {ports: [{number: 0}]}\n")
        .expect("write bad policy");
    a.reload().await;
    wait_for("the reload to be refused", Duration::from_secs(10), || {
        a.status.reload_failures.get() == 1
    });
    assert_eq!(cg.probe(&["tcp", &at(w.v4(10), 443)]), "ok");
    assert_eq!(cg.probe(&["tcp", &at(w.v4(11), 443)]), "denied");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_behind() {
    let w = world(300);
    let cg = TestCgroup::new("failed-start");
    let relay_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // The programs attach to the cgroup, then the TC backstop fails on an interface that is not
    // there: everything started by then must be undone.
    let mut cfg = w.agent_config(&policy(&w), Mode::RegistryOnly, &cg, None);
    cfg.ifaces = Some(vec![w.iface().to_owned(), "egress-absent0".to_owned()]);
    cfg.relay.port = relay_port;
    let err = match Agent::start(cfg).await {
        Ok(_) => panic!("started with an interface that does not exist"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("attaching the TC backstop"), "{err}");
    // No hook judges the cgroup any more, and the relay's port is free again.
    assert_eq!(cg.probe(&["tcp", &at(w.v4(11), 443)]), "ok");
    std::net::TcpListener::bind(("127.0.0.1", relay_port)).expect("the relay's port is free");
}

/// Another process making and dropping links at the same moment must not fail a start: the
/// kernel lists half-made links, which cannot be opened yet (EAGAIN), and links about to go
/// (ENOENT). A link on a cgroup with many descendants stays half-made while the kernel recomputes
/// each one's programs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_start_while_links_are_being_made_elsewhere() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use egress_agent::datapath::Datapath;
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    let busy = TestCgroup::new("busy");
    let targets: Vec<_> = (0..8)
        .map(|i| {
            let target = busy.path.join(format!("t{i}"));
            for j in 0..200 {
                std::fs::create_dir_all(target.join(format!("d{j}"))).expect("a cgroup");
            }
            target
        })
        .collect();
    // Each round holds its 12 links' descriptors until a fresh load frees them, and a cgroup
    // takes 64 programs of a kind.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let rounds_per_load = (hard / 4 / 12).min(targets.len() as u64 * 60);
    let stop = Arc::new(AtomicBool::new(false));
    let churn = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut made = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut loaded = Datapath::load(&Default::default()).expect("loads");
                for target in targets.iter().cycle().take(rounds_per_load as usize) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    loaded.datapath.attach_cgroup(target).expect("attaches");
                    made += 12;
                }
            }
            made
        }
    });
    let w = world(300);
    for _ in 0..5 {
        let cg = TestCgroup::new("beside-churn");
        let a = agent(&w, &cg, Mode::RegistryOnly).await;
        assert_eq!(cg.probe(&["tcp", &at(w.v4(11), 443)]), "denied");
        a.shutdown().await;
    }
    stop.store(true, Ordering::Relaxed);
    let made = churn.join().expect("the churn thread");
    assert!(made > 0, "no link was made beside the starts");
}
