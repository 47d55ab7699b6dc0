//! `cargo xtask bench connect`: the cost of connect() in an enforced cgroup against an unenforced
//! sibling, in the same run, interleaved, at 10, 10,000 and 100,000 policy entries. UDP connect()
//! runs the hook and a route lookup but sends nothing, so the hook's cost is not lost in noise.
//!
//! `cargo xtask bench events`: the highest connect rate the machine drives from an enforced
//! cgroup (one client per CPU), with flow events on against off, interleaved in the same run;
//! events lost at that rate with the default ring buffer; the agent's CPU per 10,000 events/s.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use egress_agent::{
    agent::{Agent, AgentConfig},
    policy::Mode,
};
use egress_tests::{TestCgroup, World, policy_dir, spawn_probe};

const ITERATIONS: &str = "200000";
const ROUNDS: usize = 7;

/// A ServiceEntry with `n` addresses on UDP 5353, the last one the benchmark's target.
fn policy(n: usize, target: std::net::IpAddr) -> String {
    let mut y = String::from(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bench}\nspec:\n  hosts: [bench.test]\n  ports: [{number: 5353, name: u, protocol: UDP}]\n  resolution: STATIC\n  endpoints: [{address: ",
    );
    let _ = writeln!(y, "{target}}}]\n  addresses:");
    // Reserved 240.0.0.0/4: never routed, only map keys.
    for i in 0..n.saturating_sub(1) {
        let _ = writeln!(
            y,
            "  - 240.{}.{}.{}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    y
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sample(cg: &TestCgroup, addr: &str) -> f64 {
    let out = cg.probe(&["bench-connect", addr, ITERATIONS]);
    out.parse()
        .unwrap_or_else(|_| panic!("bench-connect in {}: {out}", cg.path.display()))
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "connect".into());
    match which.as_str() {
        "connect" => connect(),
        "events" => events(),
        _ => panic!("unknown benchmark `{which}` (known: connect, events)"),
    }
}

/// CPU time this process (the agent's threads: the benches run clients as child processes).
fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

const EVENT_CONNECTS: u64 = 200_000;
const EVENT_ROUNDS: usize = 5;

struct EventRun {
    connects_per_sec: f64,
    events: u64,
    lost: u64,
    /// Agent CPU seconds per second, from the first connect until every event was read.
    cores: f64,
    events_per_sec: f64,
}

fn events_round(rt: &tokio::runtime::Runtime, w: &World, target: &str, on: bool) -> EventRun {
    let clients = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cg = TestCgroup::new("bench-events");
    let log = std::env::temp_dir().join(format!("egress-bench-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let agent = rt
        .block_on(Agent::start(AgentConfig {
            policies: vec![policy_dir(&policy(10, w.v4(10)))],
            mode: Some(Mode::RegistryOnly),
            dns: Some(SocketAddr::new(w.v4(2), 53)),
            cgroup: cg.path.clone(),
            ifaces: Some(vec![w.iface().to_owned()]),
            events: Some(log.clone()),
            kernel_events_off: !on,
            ..AgentConfig::default()
        }))
        .expect("agent");
    let n = EVENT_CONNECTS.to_string();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let children: Vec<_> = (0..clients)
        .map(|_| spawn_probe(Some(&cg.path), &["bench-connect", target, &n]))
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.trim().parse::<f64>().is_ok(),
            "bench-connect failed: {text}"
        );
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Every connect is an event or a counted loss (a lost connect also takes its flow's close
    // with it: the flow was never tracked). Then wait for the reader to go quiet.
    let connects = if on {
        EVENT_CONNECTS * clients as u64
    } else {
        0
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (u64::MAX, 0);
    while Instant::now() < deadline {
        let seen = agent.status.events.get();
        if seen + agent.status.events_lost.get() >= connects {
            last = if last.0 == seen {
                (seen, last.1 + 1)
            } else {
                (seen, 0)
            };
            if last.1 >= 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (cpu, secs) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    let run = EventRun {
        connects_per_sec: (EVENT_CONNECTS * clients as u64) as f64 / connect_secs,
        events: agent.status.events.get(),
        lost: agent.status.events_lost.get(),
        cores: cpu / secs,
        events_per_sec: agent.status.events.get() as f64 / secs,
    };
    rt.block_on(agent.shutdown());
    let _ = std::fs::remove_file(&log);
    run
}

fn events() {
    let w = World::new();
    w.host(10);
    let target = SocketAddr::new(w.v4(10), 5353).to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let clients = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "connect rate from an enforced cgroup, {clients} clients x {EVENT_CONNECTS} UDP connects, flow events on vs off, {EVENT_ROUNDS} interleaved rounds\n"
    );
    println!(
        "{:>5} {:>7} {:>13} {:>10} {:>6} {:>11}",
        "round", "events", "connects/s", "events", "lost", "agent CPU"
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut lost = 0;
    let mut per_10k = Vec::new();
    for round in 0..EVENT_ROUNDS {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for events_on in order {
            let r = events_round(&rt, &w, &target, events_on);
            println!(
                "{round:>5} {:>7} {:>13.0} {:>10} {:>6} {:>10.1}%",
                if events_on { "on" } else { "off" },
                r.connects_per_sec,
                r.events,
                r.lost,
                r.cores * 100.0
            );
            if events_on {
                on.push(r.connects_per_sec);
                lost += r.lost;
                per_10k.push(r.cores * 100.0 / (r.events_per_sec / 10_000.0));
            } else {
                off.push(r.connects_per_sec);
            }
        }
    }
    let (off, on, per_10k) = (median(off), median(on), median(per_10k));
    let ratio = on / off;
    println!();
    println!(
        "connects/s, median: events off {off:.0}, events on {on:.0}; ratio {ratio:.3} (target >= 0.90): {}",
        if ratio >= 0.9 { "met" } else { "MISSED" }
    );
    println!(
        "events lost at that rate, default ring buffer: {lost} (target 0): {}",
        if lost == 0 { "met" } else { "MISSED" }
    );
    println!("agent CPU per 10,000 events/s: {per_10k:.1}% of one core (median)");
}

fn connect() {
    let w = World::new();
    w.host(10);
    let target = SocketAddr::new(w.v4(10), 5353).to_string();
    let base = TestCgroup::new("bench-base");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "connect() cost, median of {ROUNDS} rounds of {ITERATIONS} UDP connects, enforced vs unenforced cgroup in the same run\n"
    );
    println!(
        "{:>8} {:>9} {:>13} {:>11} {:>9} {:>7} {:>12}",
        "rules", "entries", "unenforced ns", "enforced ns", "added ns", "ratio", "vs 10 rules"
    );
    let mut first_enforced = None;
    let mut verdicts = Vec::new();
    for n in [10usize, 10_000, 100_000] {
        let cg = TestCgroup::new("bench");
        let agent = rt
            .block_on(Agent::start(AgentConfig {
                policies: vec![policy_dir(&policy(n, w.v4(10)))],
                mode: Some(Mode::RegistryOnly),
                dns: Some(SocketAddr::new(w.v4(2), 53)),
                cgroup: cg.path.clone(),
                ifaces: Some(vec![w.iface().to_owned()]),
                ..AgentConfig::default()
            }))
            .expect("agent");
        let entries = agent.status.entries.get();
        // Warm-up, and proof that the target is allowed (a denied connect would not parse).
        sample(&cg, &target);
        let (mut b, mut e) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            b.push(sample(&base, &target));
            e.push(sample(&cg, &target));
        }
        let (b, e) = (median(b), median(e));
        let first = *first_enforced.get_or_insert(e);
        println!(
            "{n:>8} {entries:>9} {b:>13.1} {e:>11.1} {:>9.1} {:>7.3} {:>12.3}",
            e - b,
            e / b,
            e / first
        );
        if n == 100_000 {
            verdicts.push(format!(
                "added per connect at 100,000 rules: {:.0} ns (target <= 1000 ns): {}",
                e - b,
                if e - b <= 1000.0 { "met" } else { "MISSED" }
            ));
            verdicts.push(format!(
                "100,000-rule cost vs 10-rule cost: {:.3} (target <= 1.10): {}",
                e / first,
                if e / first <= 1.10 { "met" } else { "MISSED" }
            ));
        }
        rt.block_on(agent.shutdown());
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
}
