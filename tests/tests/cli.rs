//! The `egress` binary's exit statuses (design.md §3), and what `run` leaves when it is killed.
//! `exec` and `run` are root-only; `check` and `validate` read files only. DNS, where asked at all, goes to loopback or to the test's own world.
use std::{path::Path, process::Command};

use egress_tests::{
    TestCgroup, World, egress_run, egress_run_command, log_path, pin_dir, policy_dir, signal,
    target_bin, wait_for,
};

fn egress(args: &[&str]) -> (i32, String) {
    let out = Command::new(target_bin("egress"))
        .args(args)
        .output()
        .expect("run egress");
    let code = out.status.code().expect("exit code");
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

const STATIC_DB: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.40}]\n";
const BAD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 99999}]\n";

/// A world with a server on 443/TCP at host 10, which no policy here registers, and a DNS server
/// that knows no name.
fn unregistered_world() -> World {
    let mut w = World::new();
    w.host(10);
    w.tcp_server(std::net::SocketAddr::new(w.v4(10), 443));
    w.start_dns(&[], 60);
    w
}

#[test]
fn validate_exit_statuses() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    assert_eq!(
        egress(&["validate", "--policies", shipped.to_str().expect("utf8")]).0,
        0
    );
    let bad = policy_dir(BAD);
    let (code, out) = egress(&["validate", "--policies", bad.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(
        out.contains("policy.yaml:6:20: error: spec.ports[0].number: port 99999 is out of range"),
        "{out}"
    );
}

#[test]
fn check_exit_statuses() {
    let dir = policy_dir(STATIC_DB);
    let p = dir.to_str().expect("utf8");
    // Nothing listens on loopback port 9: any lookup fails at once, and stays on this machine.
    let base = [
        "--policies",
        p,
        "--dns",
        "127.0.0.1:9",
        "--mode",
        "registry-only",
    ];
    let run = |extra: &[&str]| {
        let mut a = vec!["check"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&base);
        egress(&a)
    };
    let (code, out) = run(&["192.0.2.40:5432"]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("allow tcp 192.0.2.40:5432 ServiceEntry/default/db"))
    );
    let (code, out) = run(&["192.0.2.40:5433"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("deny tcp 192.0.2.40:5433 mode registry-only"),
        "{out}"
    );
    assert_eq!(run(&["192.0.2.40:5432", "--proto", "udp"]).0, 1);
    assert_eq!(run(&["db.internal:5432"]).0, 0);
    assert_eq!(run(&["not a host"]).0, 2, "usage error");
    assert_eq!(run(&["192.0.2.40:99999"]).0, 2, "usage error");
    let bad = policy_dir(BAD);
    assert_eq!(
        egress(&[
            "check",
            "192.0.2.40:5432",
            "--policies",
            bad.to_str().expect("utf8")
        ])
        .0,
        2
    );
}

#[test]
fn check_shows_how_the_relay_serves_a_steered_destination() {
    let dir = policy_dir(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.pool.test]
  addresses: [240.0.0.50]
  ports:
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 80, name: http, protocol: HTTP}
  - {number: 5432, name: pg, protocol: TCP}
  resolution: STATIC
  endpoints: [{address: 192.0.2.50}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.pool.test]
  http:
  - match: [{port: 80, uri: {prefix: /slow}}]
    route: [{destination: {host: api.pool.test}}]
    timeout: 30s
  - route: [{destination: {host: api.pool.test}}]
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool}
spec:
  host: api.pool.test
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 2s
        idleTimeout: 30s
        tcpKeepalive: {time: 60s, interval: 10s, probes: 3}
    outlierDetection: {consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 1m, minHealthPercent: 50}
    loadBalancer: {simple: ROUND_ROBIN}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mesh}
spec:
  hosts: [mesh.pool.test]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.51}]
  subjectAltNames: ['spiffe://example.org/ns/shop/sa/api']
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh}
spec:
  host: mesh.pool.test
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: ca.pem}
    connectionPool: {http: {http1MaxPendingRequests: 5, http2MaxRequests: 50, maxConcurrentStreams: 8}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: gw}
spec:
  hosts: [gw.pool.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.52}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw}
spec:
  hosts: [gw.pool.test]
  gateways: [mesh, egress]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local}}]
  - match: [{gateways: [egress], port: 80, uri: {prefix: /v1/}}]
    route: [{destination: {host: gw.pool.test}}]
    retries: {attempts: 2}
    fault: {abort: {httpStatus: 503, percentage: {value: 25}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: moved}
spec:
  hosts: [moved.pool.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.53}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: moved}
spec:
  hosts: [moved.pool.test]
  tls:
  - match: [{port: 443, sniHosts: [moved.pool.test]}]
    route:
    - destination: {host: moved.pool.test}
      weight: 90
    - destination: {host: api.pool.test}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: moved}
spec:
  host: moved.pool.test
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
"#,
    );
    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("CA");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).expect("write CA");
    let check = |dest: &str| {
        let (code, out) = egress(&[
            "check",
            dest,
            "--policies",
            dir.to_str().expect("utf8"),
            "--dns",
            "127.0.0.1:9",
        ]);
        assert_eq!(code, 0, "{out}");
        out
    };
    let out = check("192.0.2.50:443");
    assert!(
        out.contains(
            "\n  relay: TLS passed through; the server name must be a host of \
             ServiceEntry/default/api\n"
        ),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "  connection pool: at most 100 connections at once, connect timeout 2s, idle \
                timeout 30s, TCP keepalive after 60s every 10s 3 probes \
                (DestinationRule/default/pool)"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "  outlier detection: an address is left out after 5 5xx answers or failed \
                connects in a row or 3 502, 503 or 504 answers or failed connects in a row, for \
                60s (longer each time, shorter again after each 1s back in), 10% of the host's \
                addresses at most (one always may be); none while fewer than 50% of them are in \
                (DestinationRule/default/pool)"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "  load balancing: the host's addresses in turn (DestinationRule/default/pool)"),
        "{out}"
    );
    let out = check("192.0.2.50:5432");
    assert!(
        out.contains("\n  relay: TCP carried as it comes (nothing in it names a host)\n"),
        "{out}"
    );
    // A virtual address of the entry, taken on to its endpoint.
    let out = check("240.0.0.50:5432");
    assert!(
        out.starts_with("steer tcp 240.0.0.50:5432 ServiceEntry/default/api\n")
            && out.contains("\n  upstream: the endpoints 192.0.2.50 (240.0.0.50 is virtual)\n"),
        "{out}"
    );
    let out = check("192.0.2.51:80");
    assert!(
        out.contains(
            "\n  relay: plain HTTP in, TLS SIMPLE out to port 443 (DestinationRule/default/mesh \
             spec.trafficPolicy.tls), \
             the certificate verified for one of spiffe://example.org/ns/shop/sa/api (the \
             ServiceEntry's subjectAltNames)\n"
        ),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "  connection pool: at most 5 requests waiting for an upstream connection, at \
                most 50 requests in progress, at most 8 requests in progress per HTTP/2 \
                connection (DestinationRule/default/mesh)"),
        "{out}"
    );
    // Routes to an egress gateway: the gateway's own routes take the requests next.
    let out = check("192.0.2.52:80");
    assert!(
        out.contains(
            "\n  at the gateway: each takes the first of its routes it matches, as the mesh's \
             route changed it, of VirtualService/default/gw spec.http[1]; one that matches none \
             is answered 404\n  fault: abort 503 for 25% of requests (VirtualService/default/gw \
             spec.http[1])\n"
        ),
        "{out}"
    );
    // A `tls` route that splits the connections between two hosts.
    let out = check("192.0.2.53:443");
    assert!(
        out.starts_with(
            "steer tcp 192.0.2.53:443 ServiceEntry/default/moved\n  why: \
             VirtualService/default/moved spec.tls[0] sends port 443's connections to \
             moved.pool.test:443 (90%), api.pool.test:443 (10%)\n"
        ) && out.contains(
            "\n  route: TLS naming moved.pool.test to moved.pool.test:443 (90%), \
             api.pool.test:443 (10%) (VirtualService/default/moved spec.tls[0])\n"
        ) && out.contains(
            "\n  load balancing: the one a hash of the workload's network namespace chooses, \
             the same for the same value (one at random without it) \
             (DestinationRule/default/moved)\n"
        ),
        "{out}"
    );
    // The plain HTTP port is served as HTTP, each request's host checked.
    let out = check("192.0.2.50:80");
    assert!(
        out.starts_with(
            "steer tcp 192.0.2.50:80 ServiceEntry/default/api\n  why: \
             VirtualService/default/api gives port 80 retries or a timeout (spec.http[0])\n  \
             relay: plain HTTP in and out to port 80; each request's host must be a host of \
             ServiceEntry/default/api\n  requests: each takes the first route it matches of \
             VirtualService/default/api spec.http[0], VirtualService/default/api spec.http[1]; \
             one that matches none is answered 404\n"
        ),
        "{out}"
    );
}

#[test]
fn exec_exit_statuses_and_enforcement() {
    let w = unregistered_world();
    let dir = policy_dir(STATIC_DB);
    let dns = w.dns_addr().to_string();
    let exec = |mode: &str, cmd: &[&str]| {
        let mut a = vec![
            "exec",
            "--policies",
            dir.to_str().expect("utf8"),
            "--dns",
            &dns,
            "--mode",
            mode,
            "--",
        ];
        a.extend_from_slice(cmd);
        egress(&a)
    };
    let probe = target_bin("egress-probe");
    let probe = probe.to_str().expect("utf8");
    let dest = format!("{}:443", w.v4(10));
    assert_eq!(
        exec("registry-only", &[probe, "tcp", &dest]),
        (0, "denied\n".into())
    );
    assert_eq!(
        exec("allow-any", &[probe, "tcp", &dest]),
        (0, "ok\n".into())
    );
    assert_eq!(
        exec("allow-any", &["sh", "-c", "exit 7"]).0,
        7,
        "the command's status"
    );
    assert_eq!(
        exec("allow-any", &["sh", "-c", "kill -TERM $$"]).0,
        128 + 15,
        "killed by a signal"
    );
    assert_eq!(exec("allow-any", &["/nonexistent/command"]).0, 127);
    let bad = policy_dir(BAD);
    let (code, _) = egress(&[
        "exec",
        "--policies",
        bad.to_str().expect("utf8"),
        "--",
        "true",
    ]);
    assert_eq!(code, 125, "egress's own failure");
    // The command runs in egress's cgroup; egress itself (its parent) does not.
    let (code, out) = exec(
        "allow-any",
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo ---; cat /proc/$PPID/cgroup",
        ],
    );
    assert_eq!(code, 0);
    let (child, parent) = out.split_once("---").expect("two parts");
    assert!(child.contains("/egress-exec-"), "{child}");
    assert!(
        !parent.contains("egress-exec-"),
        "the caller is not enforced: {parent}"
    );
    // egress raises its own descriptor limit for the relay; the command keeps the one it was
    // given.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    assert!(
        hard > 1024,
        "the test needs a hard descriptor limit above 1024"
    );
    let args = [
        "exec",
        "--policies",
        dir.to_str().expect("utf8"),
        "--dns",
        &dns,
        "--",
        "sh",
        "-c",
    ];
    // SAFETY: between fork and exec the child only calls setrlimit, async-signal-safe.
    let out = unsafe {
        use std::os::unix::process::CommandExt as _;
        Command::new(target_bin("egress"))
            .args(args)
            .arg("ulimit -Sn; ulimit -Hn; grep 'Max open files' /proc/$PPID/limits")
            .pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: hard,
                };
                match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            })
            .output()
            .expect("run egress")
    };
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() == 3, "{out}");
    let hard = hard.to_string();
    assert_eq!(lines[..2], ["1024", &hard], "the command's limits: {out}");
    let egress_limits: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(egress_limits[3..5], [&hard, &hard], "egress's own: {out}");
    // The cgroup is gone afterwards, and nothing is left in it.
    let mount = egress_agent::datapath::cgroup::cgroup2_mount().expect("mount");
    let leftovers: Vec<_> = std::fs::read_dir(&mount)
        .expect("list cgroups")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("egress-exec-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_killed_agent_leaves_its_cgroup_enforced_until_another_takes_over_and_a_live_one_is_not_taken_over()
 {
    let w = unregistered_world();
    let dir = policy_dir(STATIC_DB);
    let cg = TestCgroup::new("cli-pinned");
    let log = log_path("cli-pinned");
    let run = || {
        egress_run(egress_run_command(
            Command::new(target_bin("egress")),
            &w,
            &cg,
            &dir,
            &log,
        ))
    };
    let pins = pin_dir(&cg);
    let pinned = || -> Vec<String> {
        std::fs::read_dir(&pins)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let dest = format!("{}:443", w.v4(10));
    // A workload of the cgroup in a namespace of its own: the TC program on its interface.
    let pod = w.pod();
    let _workload = pod.workload(&cg);
    let pod_iface = pod.iface();
    let wait = std::time::Duration::from_secs(10);
    let pod_programs = |n| {
        wait_for(
            &format!("{n} program(s) on the pod's interface"),
            wait,
            || pod.tcx_egress(&pod_iface).len() == n,
        );
    };

    let mut first = run();
    assert_eq!(cg.probe(&["tcp", &dest]), "denied");
    pod_programs(1);
    // The cgroup's 12 programs, the TC programs on the world's interface and on the pod's (that
    // one pinned just after it is attached).
    wait_for("the first agent's 14 pins", wait, || pinned().len() == 14);

    // A second agent on the cgroup while the first lives is refused, and touches nothing.
    let mut refused = egress_run_command(Command::new(target_bin("egress")), &w, &cg, &dir, &log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a second egress run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while refused.try_wait().expect("poll").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            panic!("a second agent on an enforced cgroup did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = refused.wait_with_output().expect("reap");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "is enforced by a running egress agent (pid {}); stop that one first",
            first.id()
        )),
        "{said}"
    );
    let firsts = format!("{}-", first.id());
    let left = pinned();
    assert!(
        left.len() == 14 && left.iter().all(|p| p.starts_with(&firsts)),
        "{left:?}"
    );
    assert_eq!(cg.probe(&["tcp", &dest]), "denied");
    assert_eq!(pod.tcx_egress(&pod_iface), ["tc_netns_ether"]);

    signal(&first, nix::sys::signal::Signal::SIGKILL);
    first.wait().expect("reap");
    assert_eq!(
        cg.probe(&["tcp", &dest]),
        "denied",
        "the policy in force stays when the agent dies"
    );
    assert_eq!(pod.tcx_egress(&pod_iface), ["tc_netns_ether"]);

    let mut second = run();
    assert_eq!(cg.probe(&["tcp", &dest]), "denied");
    let mine = format!("{}-", second.id());
    wait_for("the new agent's pins alone", wait, || {
        let left = pinned();
        left.len() == 14 && left.iter().all(|p| p.starts_with(&mine))
    });
    assert_eq!(pod.tcx_egress(&pod_iface), ["tc_netns_ether"]);
    signal(&second, nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait().expect("reap").success());
    assert!(!pins.exists(), "a clean stop leaves nothing pinned");
    assert!(pod.tcx_egress(&pod_iface).is_empty());
    assert_eq!(
        cg.probe(&["tcp", &dest]),
        "ok",
        "a clean stop detaches everything"
    );
}

/// A flow log as the agent writes it (two rotations' worth: FILE.1 holds the older lines).
fn sample_log() -> std::path::PathBuf {
    let line = |time: &str, kind: &str, verdict: &str, dst: &str, host: Option<&str>| {
        format!(
            r#"{{"time":"{time}","kind":"{kind}","verdict":"{verdict}","proto":"tcp","dst":"{dst}","host":{},"rule":null,"pid":42,"comm":"curl","cgroup":"/egress"}}"#,
            host.map_or("null".to_owned(), |h| format!("\"{h}\""))
        )
    };
    let dir = policy_dir("");
    let path = dir.join("flows.jsonl");
    let old = [
        line(
            "2026-01-01T10:00:00Z",
            "connect",
            "allow",
            "198.18.0.10:443",
            Some("api.example.com"),
        ),
        line(
            "2026-01-01T10:00:01Z",
            "connect",
            "deny",
            "198.18.0.11:443",
            None,
        ),
    ];
    let new = [
        line(
            "2026-01-01T11:00:00Z",
            "connect",
            "allow",
            "[fd00:e9e5::10]:443",
            Some("api.example.com"),
        ),
        line(
            "2026-01-01T11:00:01Z",
            "sendmsg",
            "deny",
            "198.18.0.12:53",
            None,
        ),
        "not json".to_owned(),
        line(
            "2026-01-01T11:00:02Z",
            "connect",
            "steer",
            "198.18.0.20:443",
            Some("weather.example.org"),
        ),
    ];
    std::fs::write(path.with_extension("jsonl.1"), old.join("\n") + "\n").expect("write");
    std::fs::write(&path, new.join("\n") + "\n").expect("write");
    path
}

#[test]
fn events_filters_relay_records_by_outcome_workload_and_process() {
    let lines = [
        r#"{"time":"2026-01-01T10:00:00Z","kind":"relay","verdict":"steer","dst":"198.18.0.20:443","host":"a.test","upstream_host":"b.test","pid":7,"comm":"curl","cgroup":"/kubepods/pod-a/c1","outcome":"ok"}"#,
        r#"{"time":"2026-01-01T10:00:01Z","kind":"relay","verdict":"steer","dst":"198.18.0.20:443","pid":8,"comm":"curl","cgroup":"/kubepods/pod-b/c1","outcome":"refused","reason":"its workload holds 4 relay connections, as many as one workload may (--relay-max-per-workload)"}"#,
        r#"{"time":"2026-01-01T10:00:02Z","kind":"relay","verdict":"steer","dst":"198.18.0.20:443","pid":8,"comm":"curl","cgroup":"/kubepods/pod-b/c1","outcome":"stopped","reason":"the agent stopped"}"#,
        r#"{"time":"2026-01-01T10:00:03Z","kind":"connect","verdict":"allow","dst":"198.18.0.21:443","pid":9,"comm":"wget","cgroup":"/system.slice/x.service"}"#,
    ];
    let path = policy_dir("").join("relay.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    let f = path.to_str().expect("utf8");
    let count = |args: &[&str]| events_json_lines(f, args);
    assert_eq!(count(&["--outcome", "refused"]), 1);
    assert_eq!(count(&["--outcome", "stopped"]), 1);
    assert_eq!(count(&["--cgroup", "/kubepods/*"]), 3);
    assert_eq!(count(&["--cgroup", "/kubepods/pod-b/*"]), 2);
    assert_eq!(count(&["--cgroup", "*.service"]), 1);
    assert_eq!(count(&["--pid", "8"]), 2);
    assert_eq!(count(&["--pid", "8", "--outcome", "refused"]), 1);
    // The host dialled, or the one a route sent the connection to.
    assert_eq!(count(&["--host", "a.test"]), 1);
    assert_eq!(count(&["--host", "b.*"]), 1);
    // A record without the field does not match a filter on it.
    assert_eq!(count(&["--outcome", "ok", "--kind", "connect"]), 0);
}

/// The lines `egress events --json --file FILE ARGS` prints; it must succeed.
fn events_json_lines(file: &str, args: &[&str]) -> usize {
    let mut all = vec!["events", "--json", "--file", file];
    all.extend_from_slice(args);
    let (code, out) = egress(&all);
    assert_eq!(code, 0, "{args:?}");
    out.lines().count()
}

#[test]
fn events_reads_filters_and_prints() {
    let log = sample_log();
    let f = log.to_str().expect("utf8");
    let count = |args: &[&str]| events_json_lines(f, args);
    // Rotated lines first; the bad line skipped (and said so on stderr).
    assert_eq!(count(&[]), 5);
    assert_eq!(count(&["--verdict", "deny"]), 2);
    assert_eq!(count(&["--host", "*.example.com"]), 2);
    assert_eq!(count(&["--host", "weather.*"]), 1);
    assert_eq!(count(&["--dst", "198.18.0.0/24"]), 4);
    assert_eq!(count(&["--dst", "fd00:e9e5::10"]), 1);
    assert_eq!(count(&["--dst", "198.18.0.12:53"]), 1);
    assert_eq!(count(&["--kind", "sendmsg"]), 1);
    assert_eq!(count(&["--since", "2026-01-01T10:30:00Z"]), 3);
    assert_eq!(count(&["--until", "2026-01-01T10:30:00Z"]), 2);
    assert_eq!(count(&["--since", "1h"]), 0);
    // --json prints the lines exactly as logged.
    let (_, out) = egress(&["events", "--json", "--kind", "sendmsg", "--file", f]);
    assert!(
        out.starts_with(r#"{"time":"2026-01-01T11:00:01Z","kind":"sendmsg""#),
        "{out}"
    );
    // The table: a header and aligned columns.
    let (code, out) = egress(&["events", "--file", f, "--verdict", "allow"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("VERDICT"),
        "{out}"
    );
    let col = |l: &str| l.find("api.example.com");
    assert_eq!(col(lines[1]), col(lines[2]), "host column aligned:\n{out}");
    assert!(
        lines[2].contains("[fd00:e9e5::10]:443") && lines[2].contains("curl"),
        "{out}"
    );
    // Bad arguments are usage errors.
    assert_eq!(egress(&["events", "--file", f, "--dst", "nowhere"]).0, 2);
    assert_eq!(
        egress(&["events", "--file", f, "--since", "yesterday-ish"]).0,
        2
    );
}
