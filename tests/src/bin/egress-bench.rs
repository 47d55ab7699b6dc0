//! `cargo xtask bench connect`: the cost of connect() in an enforced cgroup against an unenforced
//! sibling, in the same run, interleaved, at 10, 10,000 and 100,000 policy entries. UDP connect()
//! runs the hook and a route lookup but sends nothing, so the hook's cost is not lost in noise.
use std::{fmt::Write as _, net::SocketAddr};

use egress_agent::{
    agent::{Agent, AgentConfig},
    policy::Mode,
};
use egress_tests::{TestCgroup, World, policy_dir};

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
    assert_eq!(
        which, "connect",
        "unknown benchmark `{which}` (known: connect)"
    );
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
