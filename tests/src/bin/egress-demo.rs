//! `cargo xtask demo`: the shipped policies (policies/) enforced by `egress run` on a cgroup, with
//! a simulated outside world in a network namespace, and live calls from inside the cgroup.
use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use egress_agent::datapath::cgroup;
use egress_tests::{World, loopback_server, probe_in, target_bin, tls::Pki};

fn main() {
    let mut w = World::with_index(0);
    let hosts = [
        ("api.thirdparty.com", 10u8),
        ("api.weather.com", 20),
        ("tracker.example", 66),
    ];
    // The steered hosts serve real TLS, with certificates from a CA made for this run.
    let pki = Pki::new(&std::env::temp_dir().join(&w.name), "demo");
    let tls = pki.server(&["api.thirdparty.com", "api.weather.com"]);
    let mut records = Vec::new();
    for (name, h) in hosts {
        w.host(h);
        records.push((name, w.v4(h)));
        records.push((name, w.v6(h)));
    }
    for h in [10, 20, 66, 40, 41] {
        if h == 40 || h == 41 {
            w.host(h);
        }
        for ip in [w.v4(h), w.v6(h)] {
            for port in [443, 80, 5432] {
                if port == 443 && (h == 10 || h == 20) {
                    w.tls_server(SocketAddr::new(ip, port), Arc::clone(&tls));
                } else {
                    w.tcp_server(SocketAddr::new(ip, port));
                }
            }
            w.udp_echo(SocketAddr::new(ip, 443));
        }
    }
    w.start_dns(&records, 30);
    let dns = w.dns_addr();

    let cg_name = format!("egress-demo-{}", std::process::id());
    let egress = target_bin("egress");
    let log = std::env::temp_dir().join(format!("egress-demo-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    println!(
        "== egress demo: policies/ enforced on cgroup {cg_name}; the outside world is network namespace {} ==\n",
        w.name
    );
    let mut agent = Command::new(&egress)
        .args([
            "run",
            "--cgroup",
            &cg_name,
            "--policies",
            "policies",
            "--dns",
            &dns.to_string(),
            "--iface",
            w.iface(),
            "--events",
        ])
        .arg(&log)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start egress run");
    let (tx, rx) = mpsc::channel();
    let stderr = agent.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("  agent | {line}");
            if line.contains("ready:") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("egress run did not become ready");
    let cg = cgroup::cgroup2_mount().expect("cgroup2").join(&cg_name);

    let resolve = |name: &str| -> Vec<IpAddr> {
        let out = probe_in(Some(&cg), &["dns", &dns.to_string(), name]);
        println!("  {:<44} {out}", format!("dns {name} (via {dns})"));
        out.strip_prefix("ok:")
            .map(|s| s.split(',').filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default()
    };
    let ca = pki.ca_pem.to_string_lossy().into_owned();
    let call = |what: &str, kind: &str, addr: String, why: &str| {
        // A steered host gets a real TLS call (GET /), which the relay checks and carries.
        let name = what.split(':').next().unwrap_or(what);
        let out = if kind == "tls" {
            probe_in(Some(&cg), &[kind, &addr, name, &ca])
        } else {
            probe_in(Some(&cg), &[kind, &addr])
        };
        let shown = match out.as_str() {
            "ok" => "ALLOWED".to_owned(),
            "denied" => "DENIED (EPERM)".to_owned(),
            other if other.starts_with("ok:sni=") => {
                format!("ALLOWED, via relay (upstream saw SNI {})", &other[7..])
            }
            other => other.to_owned(),
        };
        println!(
            "  {:<44} {shown:<15} {why}",
            format!("{kind} {what} [{addr}]")
        );
    };
    // The live flow log, as `egress events --follow` shows it, beside the calls.
    let mut follower = Command::new(&egress)
        .args(["events", "--follow", "--since", &format!("@{started}")])
        .arg("--file")
        .arg(&log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("egress events --follow");
    let out = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  flows | {line}");
        }
    });
    println!("\n-- calls from a process inside the enforced cgroup --");
    let api = resolve("api.thirdparty.com");
    let weather = resolve("api.weather.com");
    let tracker = resolve("tracker.example");
    let at =
        |ips: &[IpAddr], i: usize, port: u16| SocketAddr::new(ips[i % ips.len()], port).to_string();
    call(
        "api.thirdparty.com:443",
        "tls",
        at(&api, 0, 443),
        "ServiceEntry external-api, steered: VirtualService route-external",
    );
    call(
        "api.thirdparty.com:443",
        "tls",
        at(&api, 1, 443),
        "same host over IPv6",
    );
    call(
        "api.weather.com:443",
        "tls",
        at(&weather, 0, 443),
        "steered: weather-api-vs gives retries and a timeout",
    );
    call(
        "api.weather.com:80",
        "tcp",
        at(&weather, 0, 80),
        "port 80 is not declared",
    );
    call(
        "api.weather.com:443",
        "udp",
        at(&weather, 0, 443),
        "443 is declared HTTPS, i.e. TCP only",
    );
    call(
        "legacy-db:5432",
        "tcp",
        "198.18.0.40:5432".into(),
        "STATIC endpoint of legacy-db",
    );
    call(
        "legacy-db:5432",
        "tcp",
        "[fd00:e9e5::28]:5432".into(),
        "STATIC endpoint, IPv6",
    );
    call(
        "198.18.0.41:5432",
        "tcp",
        "198.18.0.41:5432".into(),
        "not an endpoint",
    );
    call(
        "tracker.example:443",
        "tcp",
        at(&tracker, 0, 443),
        "not registered: registry-only denies",
    );
    let mapped = format!(
        "[::ffff:{}]:443",
        tracker.first().map(|ip| ip.to_string()).unwrap_or_default()
    );
    call(
        "tracker.example:443",
        "tcp",
        mapped,
        "IPv4-mapped IPv6 is judged as IPv4",
    );
    call(
        "loopback",
        "tcp",
        loopback_server("127.0.0.1:0").to_string(),
        "loopback is not egress",
    );

    call(
        "tracker.example",
        "ping",
        w.v4(66).to_string(),
        "a raw socket: no socket hook sees it, TC drops it",
    );

    println!("\n-- egress check (offline) --");
    for dest in [
        "api.thirdparty.com",
        "api.weather.com:80",
        "198.18.0.40:5432",
        "tracker.example",
    ] {
        let out = Command::new(&egress)
            .args([
                "check",
                dest,
                "--policies",
                "policies",
                "--dns",
                &dns.to_string(),
            ])
            .output()
            .expect("egress check");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  $ egress check {dest:<20} {line}");
        }
    }
    println!("\n-- stopping the agent (SIGINT) --");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signal agent");
    let status = agent.wait().expect("wait agent");
    println!("  egress run exited with {status}");
    let _ = follower.kill();
    let _ = follower.wait();
    println!(
        "\nThe flow log is {} (JSON lines; `egress events --file` reads it).",
        log.display()
    );
    if let Err(e) = cgroup::kill_and_remove(&cg) {
        eprintln!("removing {}: {e}", cg.display());
    }
}
