//! `cargo xtask bench connect`: the cost of connect() in an enforced cgroup against an unenforced
//! sibling, in the same run, interleaved, at 10, 10,000 and 100,000 policy entries. UDP connect()
//! runs the hook and a route lookup but sends nothing, so the hook's cost is not lost in noise.
//!
//! `cargo xtask bench events`: the highest connect rate the machine drives from an enforced
//! cgroup (one client per CPU), with flow events on against off, interleaved in the same run;
//! events lost at that rate with the default ring buffer; the agent's CPU per 10,000 events/s.
//!
//! `cargo xtask bench relay`: steered TLS through egress's relay against the direct path,
//! HAProxy (SNI passthrough) and nginx stream (ssl_preread), side by side: bulk throughput,
//! connections per second and the time to the first byte. The peers run twice: with their client
//! as they ship (the targets' comparison), and with egress enforcing on their client too, which
//! tells the relay's cost from the enforcement's.
// The agent's relay runs in this process: with the allocator the `egress` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use egress_agent::{
    agent::{Agent, AgentConfig},
    events::DRAIN_INTERVAL,
    metrics::DecisionLabels,
    policy::Mode,
    relay::RelayConfig,
};
use egress_tests::{TestCgroup, World, policy_dir, rank, relayed_count, spawn_probe};

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("connect", String::as_str);
    match which {
        "connect" => connect(),
        "events" => events(),
        "relay" => relay(&RelayOptions::parse(&args[1..])),
        _ => panic!("unknown benchmark `{which}` (known: connect, events, relay)"),
    }
}

/// CPU seconds, in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user + o.user,
            system: self.system + o.system,
        }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user - o.user,
            system: self.system - o.system,
        }
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| a + b)
    }
}

/// CPU time this process (the agent's threads: the benches run clients as child processes).
fn cpu_seconds() -> Cpu {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    Cpu {
        user: t(u.user_time()),
        system: t(u.system_time()),
    }
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// A /proc/PID/stat line's parent and CPU seconds. The name, in parentheses, may hold spaces and
/// parentheses itself: the fields follow the last `)`.
fn proc_stat(text: &str) -> Option<(i32, Cpu)> {
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let seconds =
        |i: usize| -> Option<f64> { Some(fields.get(i)?.parse::<f64>().ok()? / clock_ticks()) };
    Some((
        ppid,
        Cpu {
            user: seconds(11)?,
            system: seconds(12)?,
        },
    ))
}

/// CPU seconds of a process and of its children (nginx's workers).
fn process_tree_seconds(root: u32) -> Cpu {
    let root = root as i32;
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let (ppid, cpu) = proc_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)?;
            (pid == root || ppid == root).then_some(cpu)
        })
        .sum()
}

/// CPU seconds of the upstream servers' threads (named `upstream`) in this process.
fn upstream_seconds() -> Cpu {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "upstream")
        })
        .filter_map(|e| proc_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?))
        .map(|(_, cpu)| cpu)
        .sum()
}

/// CPU seconds of the agent this process runs: all of the process's but for the upstream
/// servers' threads; the main thread only waits for the clients.
fn agent_seconds() -> Cpu {
    cpu_seconds() - upstream_seconds()
}

/// CPU seconds a cgroup's processes have used (`cpu.stat`, kept by every cgroup v2).
fn cgroup_seconds(cgroup: &std::path::Path) -> f64 {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat")).expect("read cpu.stat");
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("usage_usec in cpu.stat")
        / 1e6
}

/// Seconds the machine's CPUs have been idle (idle and iowait, summed over the CPUs).
fn idle_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("the cpu line of /proc/stat")
        .split_whitespace()
        .map(|v| v.parse().expect("a tick count"))
        .collect();
    (ticks[3] + ticks[4]) / clock_ticks()
}

const EVENT_CONNECTS: u64 = 200_000;
const EVENT_ROUNDS: usize = 5;

/// How the clients drive connects: one UDP socket connected again and again (the highest rate
/// the machine reaches, where the issue sets the targets; the kernel counts the repeats in the
/// socket's flow), and a new socket for every connect (each a flow of its own: a connect and a
/// close event apiece), shown beside it.
const PATTERNS: [(&str, &str); 2] = [
    ("one socket, reconnected", "bench-connect"),
    ("new socket each", "bench-socket"),
];

struct EventRun {
    connects_per_sec: f64,
    events: u64,
    lost: u64,
    /// Agent CPU seconds per second, from the first connect until every event was read.
    cores: f64,
    events_per_sec: f64,
}

fn events_round(
    rt: &tokio::runtime::Runtime,
    w: &World,
    target: &str,
    probe: &str,
    on: bool,
) -> EventRun {
    let clients = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cg = TestCgroup::new("bench-events");
    // A directory of its own: the log rotates at this rate, and its rotations go with it.
    let dir = Scratch::new("events");
    let log = dir.join("flows.jsonl");
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
        .map(|_| spawn_probe(Some(&cg.path), &[probe, target, &n]))
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim().parse::<f64>().is_ok(), "{probe} failed: {text}");
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Every connect is counted, in its own record or in its flow's close, unless an event was
    // lost (counted too). Wait until all are, or, after a loss, until the reader goes quiet.
    let connects = if on {
        EVENT_CONNECTS * clients as u64
    } else {
        0
    };
    let decisions = agent
        .status
        .connections
        .get_or_create(&DecisionLabels {
            verdict: Some("allow".into()),
            host: Some("bench.test".into()),
            rule: Some("ServiceEntry/default/bench".into()),
        })
        .clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = (u64::MAX, 0);
    while Instant::now() < deadline && decisions.get() < connects {
        let seen = agent.status.events.get();
        quiet = if quiet.0 == seen {
            (seen, quiet.1 + 1)
        } else {
            (seen, 0)
        };
        if agent.status.events_lost.get() > 0 && quiet.1 >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (cpu, secs) = ((cpu_seconds() - cpu0).total(), t0.elapsed().as_secs_f64());
    let run = EventRun {
        connects_per_sec: (EVENT_CONNECTS * clients as u64) as f64 / connect_secs,
        events: agent.status.events.get(),
        lost: agent.status.events_lost.get(),
        cores: cpu / secs,
        events_per_sec: agent.status.events.get() as f64 / secs,
    };
    assert!(
        run.lost > 0 || decisions.get() == connects,
        "{} of {connects} connects reported, none lost",
        decisions.get()
    );
    rt.block_on(agent.shutdown());
    run
}

fn events() {
    let w = World::new();
    w.host(10);
    let target = SocketAddr::new(w.v4(10), 5353).to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let clients = std::thread::available_parallelism().map_or(2, |n| n.get());
    for (i, (pattern, probe)) in PATTERNS.into_iter().enumerate() {
        println!(
            "{}connect rate from an enforced cgroup, {pattern}: {clients} clients x {EVENT_CONNECTS} UDP connects, flow events on vs off, {EVENT_ROUNDS} interleaved rounds\n",
            if i > 0 { "\n" } else { "" }
        );
        println!(
            "{:>5} {:>7} {:>13} {:>10} {:>8} {:>11}",
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
                let r = events_round(&rt, &w, &target, probe, events_on);
                println!(
                    "{round:>5} {:>7} {:>13.0} {:>10} {:>8} {:>10.1}%",
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
        let verdict = |met: bool| match (i, met) {
            (0, true) => "met",
            (0, false) => "MISSED",
            _ => "no target",
        };
        println!(
            "connects/s, median: events off {off:.0}, events on {on:.0}; ratio {ratio:.3} (target >= 0.90): {}",
            verdict(ratio >= 0.9)
        );
        println!(
            "events lost, default ring buffer: {lost} (target 0): {}",
            verdict(lost == 0)
        );
        // Folded reconnects write a handful of events: a per-event cost says nothing there.
        if i > 0 {
            println!("agent CPU per 10,000 events/s: {per_10k:.1}% of one core (median)");
        }
    }
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

// ---------------------------------------------------------------------------------------------
// `cargo xtask bench relay`

/// Bytes the bulk upstream sends per connection.
const BULK_BYTES: u64 = 1 << 30;
const RATE_CONNECTIONS: usize = 8000;
const RATE_CLIENTS: usize = 16;
const TTFB_CONNECTIONS: usize = 5000;
/// Connections taken one after another, where an agent enforces, while the kernel counts its eBPF
/// programs' run time (its statistics cost each run a little: not during the other phases).
const EBPF_CONNECTIONS: usize = 2000;
/// What egress's programs hook, as the eBPF table groups them (see [`ebpf_hook`]).
const EBPF_HOOKS: [&str; 4] = ["calls", "tcp states", "packets", "sockets"];

/// Which of [`EBPF_HOOKS`] egress's program `name` hooks: the socket calls, TCP's state changes,
/// the packets (the cgroup's programs and TC), or the sockets' life and options. `None` for a
/// program not egress's.
fn ebpf_hook(name: &str) -> Option<usize> {
    use egress_agent::datapath as d;
    if d::SOCK_ADDR_PROGRAMS.contains(&name) {
        Some(0)
    } else if name == d::SOCK_OPS_PROGRAM {
        Some(1)
    } else if d::SKB_PROGRAMS.iter().any(|&(skb, _)| skb == name)
        || [d::TC_PROGRAM, d::NETNS_TC_ETHER, d::NETNS_TC_BARE].contains(&name)
    {
        Some(2)
    } else if d::SOCK_PROGRAMS.contains(&name) || name == d::SOCKOPT_PROGRAM {
        Some(3)
    } else {
        None
    }
}

/// Connections a path a round in the latency phase taken in turn (see [`turns`]): many, since a
/// p99 rests on the slowest hundredth of them.
const TURNS: usize = 10_000;
/// Turns a probe takes at most: each holds a socket a path a turn, made beforehand.
const TURNS_A_PROBE: usize = 2000;
/// Exchanges on one kept-open connection, one request after another: an answer (or a request's
/// body) ends without the connection ending, so a relay that waits for more bytes before it
/// passes a batch on makes its last bytes late.
struct Exchange {
    name: &'static str,
    /// The request's body, and the answer.
    up: usize,
    down: usize,
    requests: usize,
}

const EXCHANGES: [Exchange; 3] = [
    Exchange {
        name: "512 KiB down",
        up: 0,
        down: 512 << 10,
        requests: 2000,
    },
    Exchange {
        name: "4 MiB down",
        up: 0,
        down: 4 << 20,
        requests: 250,
    },
    Exchange {
        name: "4 MiB up",
        up: 4 << 20,
        down: 64,
        requests: 250,
    },
];
const RELAY_ROUNDS: usize = 5;

/// `bench relay`'s options, for working on one figure: the defaults are the benchmark whose
/// table the README records.
struct RelayOptions {
    /// Paths run beside the direct one, by the start of their names (case aside); all if empty.
    paths: Vec<String>,
    rounds: usize,
    bulk: bool,
    /// The exchanges on a kept-open connection (not a target: left out when working on the
    /// targets' figures).
    exchanges: bool,
    rate_connections: usize,
    /// Connections a path a round in turn.
    turns: usize,
}

impl RelayOptions {
    fn parse(args: &[String]) -> RelayOptions {
        let mut o = RelayOptions {
            paths: Vec::new(),
            rounds: RELAY_ROUNDS,
            bulk: true,
            exchanges: true,
            rate_connections: RATE_CONNECTIONS,
            turns: TURNS,
        };
        let usage = "options: [--paths NAME,...] [--rounds N] [--no-bulk] [--no-exchanges] \
                     [--connections N] [--turns N]";
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .unwrap_or_else(|| panic!("{a} needs a value; {usage}"))
            };
            let number = |v: &String| -> usize {
                v.parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| panic!("{a} {v}: a positive number; {usage}"))
            };
            match a.as_str() {
                "--paths" => {
                    o.paths = value()
                        .split(',')
                        .map(|p| p.trim().to_lowercase())
                        .collect();
                }
                "--rounds" => o.rounds = number(value()),
                "--no-bulk" => o.bulk = false,
                "--no-exchanges" => o.exchanges = false,
                "--connections" => o.rate_connections = number(value()).max(RATE_CLIENTS),
                "--turns" => o.turns = number(value()).max(BLOCK_TURNS),
                _ => panic!("unknown option {a}; {usage}"),
            }
        }
        o
    }

    /// Whether a path runs: the direct one always (the other figures are relative to it).
    fn runs(&self, name: &str) -> bool {
        name == "direct"
            || self.paths.is_empty()
            || self
                .paths
                .iter()
                .any(|p| name.to_lowercase().starts_with(p.as_str()))
    }

    /// The benchmark as the README records it.
    fn is_default(&self) -> bool {
        self.paths.is_empty()
            && self.rounds == RELAY_ROUNDS
            && self.bulk
            && self.exchanges
            && self.rate_connections == RATE_CONNECTIONS
            && self.turns == TURNS
    }
}

/// A ServiceEntry for each `NAME.test` at its upstream's address, port 443 TLS, and a
/// VirtualService steering them all through the egress gateway.
fn relay_policy(hosts: &[(&str, SocketAddr)]) -> String {
    let mut y = String::new();
    for (name, at) in hosts {
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.test]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
---
",
            ip = at.ip()
        );
    }
    let names = hosts
        .iter()
        .map(|(name, _)| format!("{name}.test"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        y,
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: via-gateway}}
spec:
  hosts: [{names}]
  tls:
  - match: [{{port: 443, sniHosts: [{names}]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local}}}}]
"
    );
    y
}

/// An upstream in the world: reads one whole TLS record (the ClientHello, however the proxy in
/// front passes it on), answers `reply` bytes, half-closes and drains. With `requests`, it then
/// answers requests until the client half-closes: each the number of bytes to answer with and
/// the length of the body that follows (four bytes each, big-endian), then the body. (The
/// answer to the hello comes first, as a TLS server's does: a relay may wait for it before it
/// passes the client's next bytes on.)
fn hello_server(
    rt: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    reply: u64,
    requests: bool,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    listener.set_nonblocking(true).expect("nonblocking");
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    rt.spawn(async move {
        static ZEROS: [u8; 256 << 10] = [0; 256 << 10];
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut head = [0u8; 5];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let mut record = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
                if s.read_exact(&mut record).await.is_err() {
                    return;
                }
                let mut left = reply;
                loop {
                    while left > 0 {
                        let n = left.min(ZEROS.len() as u64) as usize;
                        if s.write_all(&ZEROS[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let mut request = [0u8; 8];
                    if !requests || s.read_exact(&mut request).await.is_err() {
                        break;
                    }
                    let [a, b, c, d, e, f, g, h] = request;
                    left = u64::from(u32::from_be_bytes([a, b, c, d]));
                    let body = u64::from(u32::from_be_bytes([e, f, g, h]));
                    let mut body_in = (&mut s).take(body);
                    match tokio::io::copy(&mut body_in, &mut tokio::io::sink()).await {
                        Ok(n) if n == body => {}
                        _ => return,
                    }
                }
                let _ = s.shutdown().await;
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A directory of the benchmark's own, removed on drop: also when a run fails, which would
/// otherwise leave its logs behind.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("egress-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A peer proxy run for the benchmark, killed on drop.
struct Peer {
    child: std::process::Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its workers too.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Waits until something accepts on 127.0.0.1:`port`.
fn wait_listening(port: u16, what: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// HAProxy in TCP mode, routing by the ClientHello's SNI, one thread per CPU.
fn haproxy(dir: &std::path::Path, port: u16, up: &Upstreams) -> Peer {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global
  maxconn 8000
  nbthread {threads}
  log stdout format raw local0 info
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend sni
  bind 127.0.0.1:{port}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend small if {{ req.ssl_sni -i small.test }}
  use_backend bulk if {{ req.ssl_sni -i bulk.test }}
  use_backend replies if {{ req.ssl_sni -i replies.test }}
backend small
  server s {small}
backend bulk
  server b {bulk}
backend replies
  server r {replies}
",
            small = up.small,
            bulk = up.bulk,
            replies = up.replies,
        ),
    )
    .expect("haproxy config");
    let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
    let mut child = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdout(log)
        .spawn()
        .expect("run haproxy (Debian package haproxy)");
    wait_listening(port, "haproxy", &mut child);
    Peer { child }
}

/// nginx stream with ssl_preread, routing by SNI, one worker per CPU.
fn nginx(dir: &std::path::Path, port: u16, up: &Upstreams) -> Peer {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 8000; }}
stream {{
  log_format sni '$remote_addr [$time_local] $status $bytes_sent $bytes_received '
                 '$session_time $ssl_preread_server_name $upstream_addr';
  access_log {dir}/nginx-access.log sni;
  map $ssl_preread_server_name $upstream {{
    small.test {small};
    bulk.test {bulk};
    replies.test {replies};
  }}
  server {{
    listen 127.0.0.1:{port};
    ssl_preread on;
    proxy_pass $upstream;
  }}
}}
",
            dir = dir.display(),
            small = up.small,
            bulk = up.bulk,
            replies = up.replies,
        ),
    )
    .expect("nginx config");
    let mut child = std::process::Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run nginx (Debian packages nginx, libnginx-mod-stream)");
    wait_listening(port, "nginx", &mut child);
    Peer { child }
}

/// Where a client connects for each upstream host.
#[derive(Clone, Copy, PartialEq)]
struct Upstreams {
    small: SocketAddr,
    bulk: SocketAddr,
    replies: SocketAddr,
}

impl Upstreams {
    /// All three through one proxy's port.
    fn via(port: SocketAddr) -> Upstreams {
        Upstreams {
            small: port,
            bulk: port,
            replies: port,
        }
    }
}

/// One way to the upstreams: where the client connects for each host, and from which cgroup.
struct Path<'a> {
    name: &'static str,
    cgroup: &'a TestCgroup,
    up: Upstreams,
    /// Whether an egress agent enforces on `cgroup` meanwhile, and if so whether its relay
    /// splices.
    agent: Option<bool>,
    /// The peer proxy's process.
    peer: Option<u32>,
    /// Where the agent's steering sends connections in place of its relay: a peer's port.
    steer_to: Option<u16>,
}

#[derive(Default)]
struct Figures {
    mb_per_sec: Vec<f64>,
    conns_per_sec: Vec<f64>,
    /// The proxy's CPU time per connection in the connection-rate phase (the peer's processes,
    /// the agent with its relay, or both; the agent's until it has written the phase's last
    /// record): steadier than the rate, which the whole machine's load moves.
    proxy_us: Vec<f64>,
    /// The part of it in user space: what the proxies' own code costs, beside the kernel's work
    /// for their system calls and the packets they handle.
    proxy_user_us: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    /// The time from a request's first byte on a kept-open connection to its answer's last, per
    /// exchange of [`EXCHANGES`].
    exchange_p50_us: [Vec<f64>; EXCHANGES.len()],
    exchange_p99_us: [Vec<f64>; EXCHANGES.len()],
    /// The time to the first byte with the paths taken in turn, connection by connection: each
    /// round's p99, and every time, in turn order over all rounds.
    turns_p99_us: Vec<f64>,
    turns_us: Vec<u32>,
    /// The rest of the machine's time per connection in the connection-rate phase: the client's
    /// CPU (its cgroup's), the upstream servers', and the CPUs' idle time. With the proxy's they
    /// add up to the machine's time per connection, nearly all of it.
    client_us: Vec<f64>,
    upstream_us: Vec<f64>,
    idle_us: Vec<f64>,
    /// Where an agent enforces: its eBPF programs' run time per connection, ns, by
    /// [`EBPF_HOOKS`], over [`EBPF_CONNECTIONS`] connections one after another.
    ebpf_ns: Vec<[f64; EBPF_HOOKS.len()]>,
}

/// egress's eBPF programs' run time so far, ns, by [`EBPF_HOOKS`]: counted by the kernel while
/// its statistics are on.
fn ebpf_ns() -> [u64; EBPF_HOOKS.len()] {
    let mut ns = [0; EBPF_HOOKS.len()];
    for info in aya::programs::loaded_programs() {
        let info = info.expect("a loaded eBPF program's information");
        if let Some(i) = ebpf_hook(info.name_as_str().unwrap_or_default()) {
            ns[i] += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        }
    }
    ns
}

/// The relay records of the flow log in `dir` whose outcome is not `ok`; removes the log and its
/// rotations, so that each agent's are read whole.
fn relay_records_not_ok(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("flows.jsonl")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        found.extend(
            text.lines()
                .filter(|line| line.contains("\"relay\""))
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .is_ok_and(|record| record["kind"] == "relay" && record["outcome"] != "ok")
                })
                .map(str::to_owned),
        );
        let _ = std::fs::remove_file(&path);
    }
    found
}

/// Points the running agent's steering from the agent's own network namespace at `port` on
/// loopback, in place of its relay's (which then takes no connection).
fn steer_to(port: u16) {
    let netns = egress_agent::relay::netns::own_cookie().expect("the namespace's cookie");
    let mut pointed = 0;
    for data in egress_tests::agents_maps(egress_common::RELAY_NETNS_MAP) {
        let mut map: aya::maps::HashMap<_, u64, egress_common::RelayPorts> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
                .expect("the relay's namespaces");
        if map.get(&netns, 0).is_ok() {
            map.insert(netns, egress_common::RelayPorts::new(&[port]), 0)
                .expect("steer to the port");
            pointed += 1;
        }
    }
    assert_eq!(pointed, 1, "one agent's steering to point at port {port}");
}

/// Waits until the relay holds no connection: it ends a connection, and counts it, a little after
/// the client has gone.
fn relay_done(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.status.relay_open.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "the relay still holds {} connection(s)",
            agent.status.relay_open.get()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the agent has caught up with a phase: no new flow record for longer than its
/// reader's drain interval, which also covers the writer's flush. So its work after the phase
/// counts towards that phase's CPU, and the next phase starts on a machine as quiet as a peer's.
fn settle(agent: &Agent) {
    let quiet = DRAIN_INTERVAL * 3 / 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (agent.status.events.get(), Instant::now());
    while last.1.elapsed() < quiet {
        assert!(
            Instant::now() < deadline,
            "the agent's events never settled"
        );
        std::thread::sleep(Duration::from_millis(10));
        let seen = agent.status.events.get();
        if seen != last.0 {
            last = (seen, Instant::now());
        }
    }
}

fn measure(path: &Path, agent: Option<&Agent>, options: &RelayOptions, figures: &mut Figures) {
    let probe = |args: &[&str]| {
        let out = path.cgroup.probe(args);
        let nums: Vec<f64> = out
            .split_whitespace()
            .map(|w| w.parse().unwrap_or(f64::NAN))
            .collect();
        assert!(
            !nums.is_empty() && nums.iter().all(|n| n.is_finite()),
            "{} {args:?}: {out}",
            path.name
        );
        nums
    };
    if options.bulk {
        let bulk = probe(&["hello-bulk", &path.up.bulk.to_string(), "bulk.test"]);
        assert_eq!(bulk[0] as u64, BULK_BYTES, "{}: short transfer", path.name);
        figures.mb_per_sec.push(bulk[0] / bulk[1] / 1e6);
    }
    let proxy_seconds = || {
        path.peer.map_or_else(Cpu::default, process_tree_seconds)
            + if path.agent.is_some() {
                agent_seconds()
            } else {
                Cpu::default()
            }
    };
    let proxy = proxy_seconds();
    let (client, upstream, idle) = (
        cgroup_seconds(&path.cgroup.path),
        upstream_seconds(),
        idle_seconds(),
    );
    let rate = probe(&[
        "hello-rate",
        &path.up.small.to_string(),
        "small.test",
        &options.rate_connections.to_string(),
        &RATE_CLIENTS.to_string(),
    ]);
    let n = options.rate_connections as f64;
    figures.conns_per_sec.push(n / rate[0]);
    figures
        .client_us
        .push((cgroup_seconds(&path.cgroup.path) - client) / n * 1e6);
    figures
        .upstream_us
        .push((upstream_seconds() - upstream).total() / n * 1e6);
    figures.idle_us.push((idle_seconds() - idle) / n * 1e6);
    if let Some(agent) = agent {
        settle(agent);
    }
    if path.peer.is_some() || path.agent.is_some() {
        let used = proxy_seconds() - proxy;
        figures.proxy_us.push(used.total() / n * 1e6);
        figures.proxy_user_us.push(used.user / n * 1e6);
    }
    let ttfb = probe(&[
        "hello-rate",
        &path.up.small.to_string(),
        "small.test",
        &TTFB_CONNECTIONS.to_string(),
        "1",
    ]);
    figures.p50_us.push(ttfb[1]);
    figures.p99_us.push(ttfb[2]);
    if path.agent.is_some() {
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("eBPF statistics");
        let before = ebpf_ns();
        probe(&[
            "hello-rate",
            &path.up.small.to_string(),
            "small.test",
            &EBPF_CONNECTIONS.to_string(),
            "1",
        ]);
        let after = ebpf_ns();
        drop(stats);
        figures.ebpf_ns.push(std::array::from_fn(|i| {
            // Saturating: programs unloaded meanwhile (another agent's) take their counts along.
            after[i].saturating_sub(before[i]) as f64 / EBPF_CONNECTIONS as f64
        }));
    }
    for (i, exchange) in EXCHANGES.iter().enumerate().filter(|_| options.exchanges) {
        let took = probe(&[
            "hello-replies",
            &path.up.replies.to_string(),
            "replies.test",
            &exchange.requests.to_string(),
            &exchange.up.to_string(),
            &exchange.down.to_string(),
        ]);
        figures.exchange_p50_us[i].push(took[0]);
        figures.exchange_p99_us[i].push(took[1]);
    }
}

/// The latency phase again with the paths taken in turn, connection by connection, by one client
/// (`hello-turns`), while egress's agent runs: each path's connection starts on the machine as
/// the others' do, so the load of a small shared machine, which moves separate phases apart by
/// more than the paths differ, falls on all of them alike. So does the agent's own work, which
/// in the separate phases falls on egress's alone. `paths`: each path's index in `figures` (or
/// `None` for `again`: the shipped relay taken a second time, as a path of its own), its cgroup
/// and the address its client dials. `n` turns, by probes of at most [`TURNS_A_PROBE`].
fn turns(
    paths: &[(Option<usize>, &TestCgroup, SocketAddr)],
    n: usize,
    figures: &mut [Figures],
    again: &mut Figures,
) {
    let mut took: Vec<Vec<u32>> = vec![Vec::with_capacity(n); paths.len()];
    for start in (0..n).step_by(TURNS_A_PROBE) {
        let count = TURNS_A_PROBE.min(n - start);
        let mut args = vec![
            "hello-turns".to_owned(),
            "small.test".to_owned(),
            count.to_string(),
        ];
        args.extend(
            paths
                .iter()
                .map(|(_, cgroup, addr)| format!("{}={addr}", cgroup.path.display())),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = egress_tests::probe_in(None, &args);
        let lines: Vec<Option<Vec<u32>>> = out
            .lines()
            .map(|line| line.split_whitespace().map(|w| w.parse().ok()).collect())
            .collect();
        assert!(
            lines.len() == paths.len()
                && lines
                    .iter()
                    .all(|l| l.as_ref().is_some_and(|l| l.len() == count)),
            "in turn: {}",
            out.chars().take(200).collect::<String>()
        );
        for (all, line) in took.iter_mut().zip(lines.into_iter().flatten()) {
            all.extend(line);
        }
    }
    for ((k, _, _), took) in paths.iter().zip(took) {
        let f = match k {
            Some(k) => &mut figures[*k],
            None => &mut *again,
        };
        f.turns_p99_us.push(quantiles(&mut took.clone())[1]);
        f.turns_us.extend(took);
    }
}

/// The p50 and p99 of `v` (reordered), each a sample's value (see [`rank`]).
fn quantiles(v: &mut [u32]) -> [f64; 2] {
    [0.50, 0.99].map(|p| f64::from(*v.select_nth_unstable(rank(v.len(), p)).1))
}

/// Turns resampled together in [`Resampled`]: machine bursts span consecutive turns, so
/// resampling turns one by one would take their times as independent and claim too narrow an
/// interval. 200 turns of the in-turn phase's seven paths last about a quarter of a second.
const BLOCK_TURNS: usize = 200;
/// Resamples drawn for each interval.
const RESAMPLES: usize = 2000;

/// The paths' first-byte times taken in turn, pooled over the rounds, with the p50 and p99 of
/// each over all of them and over each of [`RESAMPLES`] block bootstrap resamples: blocks of
/// [`BLOCK_TURNS`] turns drawn with replacement, the same blocks for every path, so that the
/// moments a turn shared stay shared. The spread of a difference over the resamples is how far
/// the phase can tell two paths apart; the same path taken twice checks it.
struct Resampled {
    /// Per path: its quantiles over all its times, then over each resample.
    all: Vec<[f64; 2]>,
    drawn: Vec<Vec<[f64; 2]>>,
}

impl Resampled {
    /// `times`: each path's times in turn order, all of one length, a whole number of blocks.
    fn new(times: &[&[u32]]) -> Self {
        use rand::RngExt as _;
        let blocks = times.first().map_or(0, |t| t.len() / BLOCK_TURNS);
        let all = times.iter().map(|t| quantiles(&mut t.to_vec())).collect();
        let mut drawn = vec![Vec::with_capacity(RESAMPLES); times.len()];
        let mut rng = rand::rng();
        let mut picked = vec![0; blocks];
        let mut buf = Vec::with_capacity(blocks * BLOCK_TURNS);
        for _ in 0..RESAMPLES {
            picked.fill_with(|| rng.random_range(0..blocks));
            for (t, d) in times.iter().zip(&mut drawn) {
                buf.clear();
                for &b in &picked {
                    buf.extend_from_slice(&t[b * BLOCK_TURNS..(b + 1) * BLOCK_TURNS]);
                }
                d.push(quantiles(&mut buf));
            }
        }
        Resampled { all, drawn }
    }

    /// Path `a`'s p50 and p99 less path `b`'s: over all times, and the 2.5th and 97.5th
    /// percentiles of the difference over the resamples (a 95 % interval).
    fn gap(&self, a: usize, b: usize) -> [Gap; 2] {
        [0, 1].map(|q| {
            let mut d: Vec<f64> = self.drawn[a]
                .iter()
                .zip(&self.drawn[b])
                .map(|(x, y)| x[q] - y[q])
                .collect();
            d.sort_by(f64::total_cmp);
            let at = |p: f64| d[rank(d.len(), p)];
            Gap {
                by: self.all[a][q] - self.all[b][q],
                low: at(0.025),
                high: at(0.975),
            }
        })
    }
}

/// One figure of a path less another's, with a 95 % interval.
struct Gap {
    by: f64,
    low: f64,
    high: f64,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:+.0} us ({:+.0} to {:+.0})",
            self.by, self.low, self.high
        )
    }
}

fn relay(options: &RelayOptions) {
    // The peers inherit it; each holds two descriptors per connection.
    egress_agent::relay::raise_nofile().expect("raise the descriptor limit");
    let mut w = World::new();
    w.host(10);
    w.host(11);
    w.host(12);
    let up = Upstreams {
        small: SocketAddr::new(w.v4(10), 443),
        bulk: SocketAddr::new(w.v4(11), 443),
        replies: SocketAddr::new(w.v4(12), 443),
    };
    // Named, so the agent's CPU (the rest of this process) can be told from theirs.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .thread_name("upstream")
        .enable_all()
        .build()
        .expect("server runtime");
    hello_server(&servers, w.listen(up.small), 64, false);
    hello_server(&servers, w.listen(up.bulk), BULK_BYTES, false);
    hello_server(&servers, w.listen(up.replies), 64, true);
    // The policy names no DNS host; the resolver is never asked.
    w.start_dns(&[], 300);

    let dir = Scratch::new("relay");
    let (hp, np) = (free_port(), free_port());
    let haproxy = haproxy(&dir, hp, &up);
    let nginx = nginx(&dir, np, &up);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let enforced = TestCgroup::new("bench-relay");
    let plain = TestCgroup::new("bench-relay-base");
    // small.test answers 64 bytes, bulk.test `BULK_BYTES`, replies.test what each request asks
    // for; all steered.
    let policy = policy_dir(&relay_policy(&[
        ("small", up.small),
        ("bulk", up.bulk),
        ("replies", up.replies),
    ]));
    // An agent as `egress run` runs, flow log included, with the relay copying or splicing.
    let start_agent = |splice: bool| {
        rt.block_on(Agent::start(AgentConfig {
            policies: vec![policy.clone()],
            mode: Some(Mode::RegistryOnly),
            dns: Some(w.dns_addr()),
            cgroup: enforced.path.clone(),
            ifaces: Some(vec![w.iface().to_owned()]),
            events: Some(dir.join("flows.jsonl")),
            relay: RelayConfig {
                splice,
                ..RelayConfig::default()
            },
            ..AgentConfig::default()
        }))
        .expect("agent")
    };
    let relayed_ok = |agent: &Agent| -> u64 {
        ["small.test", "bulk.test", "replies.test"]
            .iter()
            .map(|host| relayed_count(&agent.status, "ok", host))
            .sum()
    };
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let egress = |name, splice| Path {
        name,
        cgroup: &enforced,
        up,
        agent: Some(splice),
        peer: None,
        steer_to: None,
    };
    // A peer's client as the peers ship (nothing enforced), and enforced by egress as well (the
    // connect hook, the flow events and their log, the TC backstop on the upstream's interface):
    // the same work egress's client does, so that the relays alone compare.
    let peer = |name, (port, pid), enforce: bool| Path {
        name,
        cgroup: if enforce { &enforced } else { &plain },
        up: Upstreams::via(local(port)),
        agent: enforce.then_some(true),
        peer: Some(pid),
        steer_to: None,
    };
    let paths = [
        Path {
            name: "direct",
            cgroup: &plain,
            up,
            agent: None,
            peer: None,
            steer_to: None,
        },
        egress("egress copy", false),
        egress("egress splice", true),
        peer("HAProxy", (hp, haproxy.child.id()), false),
        peer("nginx stream", (np, nginx.child.id()), false),
        peer("HAProxy, client enforced", (hp, haproxy.child.id()), true),
        peer("nginx, client enforced", (np, nginx.child.id()), true),
        // egress's steering and enforcement with nginx in its relay's place: the client dials the
        // upstreams, the connect hook sends it to nginx. What a relay as lean as nginx's would
        // reach behind them, and what they cost against nginx as it ships.
        Path {
            name: "nginx as egress's relay",
            cgroup: &enforced,
            up,
            agent: Some(true),
            peer: Some(nginx.child.id()),
            steer_to: Some(np),
        },
    ];
    let rounds = options.rounds;
    let rate_n = options.rate_connections;
    println!(
        "TLS passthrough by SNI, side by side, median of {rounds} interleaved rounds: bulk \
         (one connection, {} MiB down), connections/s ({rate_n}, {RATE_CLIENTS} at a \
         time), time from connect() to the first byte ({TTFB_CONNECTIONS} one after another), \
         time from a request's first byte to its answer's last on a kept-open connection ({}). The \
         upstream answers after the whole ClientHello, without TLS, so only the proxies' costs \
         differ.\n",
        BULK_BYTES >> 20,
        EXCHANGES
            .map(|e| format!("{} requests of {}", e.requests, e.name))
            .join(", ")
    );
    if !options.is_default() {
        println!("Options differ from the benchmark the README records.\n");
    }
    let runs: Vec<bool> = paths.iter().map(|p| options.runs(p.name)).collect();
    // The relay as shipped (`RelayConfig::default()`), against the peers.
    let shipped = if RelayConfig::default().splice { 2 } else { 1 };
    // The other relay, which runs the same code on these connections.
    let other = 3 - shipped;
    // Taken in turn while the shipped relay's agent runs: every path but the other relay and
    // the steering pointed elsewhere (the agent steers to its own relay then); and egress's
    // again, one path measured twice, whose two figures differ by the phase's own spread.
    let mut in_turn: Vec<(Option<usize>, &TestCgroup, SocketAddr)> = (0..paths.len())
        .filter(|&k| runs[k] && k != other && paths[k].steer_to.is_none())
        .map(|k| (Some(k), paths[k].cgroup, paths[k].up.small))
        .collect();
    if runs[shipped] {
        in_turn.push((None, paths[shipped].cgroup, paths[shipped].up.small));
    }
    let mut figures: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    let mut again = Figures::default();
    let (mut relayed, mut expected) = (0, 0);
    let mut not_ok = Vec::new();
    for round in 0..rounds {
        // Rotate the order, so no path always runs first.
        for i in 0..paths.len() {
            let k = (i + round) % paths.len();
            if !runs[k] {
                continue;
            }
            let agent = paths[k].agent.map(start_agent);
            if let Some(port) = paths[k].steer_to {
                steer_to(port);
            }
            measure(&paths[k], agent.as_ref(), options, &mut figures[k]);
            if k == shipped && in_turn.len() > 3 {
                turns(&in_turn, options.turns, &mut figures, &mut again);
                expected += 2 * options.turns as u64;
            }
            if let Some(agent) = agent {
                relay_done(&agent);
                relayed += relayed_ok(&agent);
                rt.block_on(agent.shutdown());
                not_ok.extend(
                    relay_records_not_ok(&dir)
                        .into_iter()
                        .map(|line| format!("{}: {line}", paths[k].name)),
                );
            }
            // Egress's own paths go through the relay; the peers' enforced clients dial loopback,
            // and the steering pointed at nginx leaves the relay nothing (a connection it took
            // would make the count too high).
            if paths[k].agent.is_some() && paths[k].up == up && paths[k].steer_to.is_none() {
                expected +=
                    u64::from(options.bulk) + (rate_n + TTFB_CONNECTIONS + EBPF_CONNECTIONS) as u64;
                if options.exchanges {
                    expected += EXCHANGES.len() as u64;
                }
            }
        }
    }

    // Medians; NaN where a figure was not measured (a path or the bulk left out).
    let med = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            median(v.to_vec())
        }
    };
    // The exchanges' p50 and p99 at 6 + 2i and 7 + 2i.
    let m: Vec<[f64; 6 + 2 * EXCHANGES.len()]> = figures
        .iter()
        .map(|f| {
            let mut m = [f64::NAN; 6 + 2 * EXCHANGES.len()];
            m[..6].copy_from_slice(&[
                med(&f.mb_per_sec),
                med(&f.conns_per_sec),
                med(&f.p50_us),
                med(&f.p99_us),
                med(&f.proxy_us),
                med(&f.proxy_user_us),
            ]);
            for i in 0..EXCHANGES.len() {
                m[6 + 2 * i] = med(&f.exchange_p50_us[i]);
                m[7 + 2 * i] = med(&f.exchange_p99_us[i]);
            }
            m
        })
        .collect();
    let direct = m[0];
    let num = |x: f64, width: usize, decimals: usize| {
        if x.is_finite() {
            format!("{x:>width$.decimals$}")
        } else {
            format!("{:>width$}", "-")
        }
    };
    println!(
        "{:<24} {:>9} {:>6} {:>7} {:>8} {:>7} {:>8} {:>9} {:>9}",
        "path",
        "bulk MB/s",
        "vs dir",
        "conn/s",
        "proxy us",
        "user us",
        "TTFB p50",
        "added p50",
        "added p99"
    );
    for (k, f) in m.iter().enumerate().filter(|(k, _)| runs[*k]) {
        println!(
            "{:<24} {} {} {} {} {} {}us {}us {}us",
            paths[k].name,
            num(f[0], 9, 0),
            num(f[0] / direct[0], 6, 2),
            num(f[1], 7, 0),
            num(f[4], 8, 0),
            num(f[5], 7, 0),
            num(f[2], 6, 0),
            num(f[2] - direct[2], 7, 0),
            num(f[3] - direct[3], 7, 0)
        );
    }
    println!(
        "(proxy us: the proxy's CPU time per connection in the connection-rate phase, the \
         agent's included where it runs; user us: the part of it in user space)"
    );
    // The paths in turn (see `turns`): p50 and p99 over every round's connections, and each
    // path's difference to egress's with its interval. `None` is egress's path taken again.
    let taken: Vec<Option<usize>> = (0..paths.len())
        .filter(|&k| !figures[k].turns_us.is_empty())
        .flat_map(|k| {
            let second = (k == shipped && !again.turns_us.is_empty()).then_some(None);
            std::iter::once(Some(k)).chain(second)
        })
        .collect();
    let times = |k: &Option<usize>| match k {
        Some(k) => &figures[*k],
        None => &again,
    };
    let resampled = Resampled::new(
        &taken
            .iter()
            .map(|k| &times(k).turns_us[..])
            .collect::<Vec<_>>(),
    );
    let in_turn_at = |k: Option<usize>| taken.iter().position(|&t| t == k);
    let named = |k: Option<usize>| match k {
        Some(k) => paths[k].name.to_owned(),
        None => format!("{}, again", paths[shipped].name),
    };
    if let (Some(d), Some(e)) = (in_turn_at(Some(0)), in_turn_at(Some(shipped))) {
        println!(
            "\nin turn, connection by connection ({} a path a round, in a new random order \
             every turn, egress's agent running throughout), from connect() on a socket made \
             beforehand to the first byte, us (p50 and p99 of all {} rounds' connections):",
            options.turns,
            figures[0].turns_p99_us.len()
        );
        println!(
            "{:<24} {:>8} {:>9} {:>9}  added p99 by round",
            "path", "TTFB p50", "added p50", "added p99"
        );
        let [d50, d99] = resampled.all[d];
        for (i, &k) in taken.iter().enumerate() {
            let [p50, p99] = resampled.all[i];
            let f = times(&k);
            let by_round: Vec<String> = f
                .turns_p99_us
                .iter()
                .zip(&figures[0].turns_p99_us)
                .map(|(x, d)| format!("{:.0}", x - d))
                .collect();
            println!(
                "{:<24} {}us {}us {}us  {}",
                named(k),
                num(p50, 6, 0),
                num(p50 - d50, 7, 0),
                num(p99 - d99, 7, 0),
                by_round.join(" ")
            );
        }
        println!(
            "{} less each path in turn, p50 and p99 with 95 % intervals (a bootstrap of blocks of \
             {BLOCK_TURNS} turns; the path taken again shows the phase's own resolution):",
            paths[shipped].name
        );
        for (i, &k) in taken.iter().enumerate().filter(|&(i, _)| i != e && i != d) {
            let [p50, p99] = resampled.gap(e, i);
            println!("  {:<48} p50 {p50}, p99 {p99}", named(k));
        }
    }
    if options.exchanges {
        println!(
            "\nexchanges on a kept-open connection, from the request's first byte to the \
             answer's last, us (medians): p50, added p50, added p99 for each"
        );
        print!("{:<24}", "path");
        for e in &EXCHANGES {
            print!(" | {:>12} {:>9} {:>9}", e.name, "added p50", "added p99");
        }
        println!();
        for (k, f) in m.iter().enumerate().filter(|(k, _)| runs[*k]) {
            print!("{:<24}", paths[k].name);
            for i in 0..EXCHANGES.len() {
                let (p50, p99) = (6 + 2 * i, 7 + 2 * i);
                print!(
                    " | {} {} {}",
                    num(f[p50], 12, 0),
                    num(f[p50] - direct[p50], 9, 0),
                    num(f[p99] - direct[p99], 9, 0)
                );
            }
            println!();
        }
    }
    // Where the machine's time per connection went: a path's rate is the CPUs' time over it.
    println!(
        "\nthe machine's time per connection in the connection-rate phase, us (medians): the \
         client's CPU (its cgroup's), the proxy's (above), the upstream servers', the CPUs' idle \
         time"
    );
    println!(
        "{:<24} {:>7} {:>7} {:>8} {:>6} {:>6}",
        "path", "client", "proxy", "upstream", "idle", "sum"
    );
    for (k, f) in figures.iter().enumerate().filter(|(k, _)| runs[*k]) {
        let proxy = if m[k][4].is_finite() { m[k][4] } else { 0.0 };
        let parts = [
            med(&f.client_us),
            proxy,
            med(&f.upstream_us),
            med(&f.idle_us),
        ];
        println!(
            "{:<24} {} {} {} {} {}",
            paths[k].name,
            num(parts[0], 7, 0),
            num(m[k][4], 7, 0),
            num(parts[2], 8, 0),
            num(parts[3], 6, 0),
            num(parts.iter().sum(), 6, 0)
        );
    }
    // What the enforcement itself costs a connection in the kernel, program by program: part of
    // the client's time above, and of the first byte's wait.
    println!(
        "\negress's eBPF programs' run time per connection where it enforces, ns (the kernel's \
         statistics over {EBPF_CONNECTIONS} connections one after another, after the other \
         phases; medians): the socket calls' hooks, TCP's state changes, the packets' programs, \
         the sockets' life and options"
    );
    println!(
        "{:<24} {}  {:>7}",
        "path",
        EBPF_HOOKS.map(|hook| format!("{hook:>10}")).join(" "),
        "total"
    );
    for (k, f) in figures
        .iter()
        .enumerate()
        .filter(|(k, f)| runs[*k] && !f.ebpf_ns.is_empty())
    {
        let hooks: [f64; EBPF_HOOKS.len()] =
            std::array::from_fn(|i| med(&f.ebpf_ns.iter().map(|r| r[i]).collect::<Vec<_>>()));
        println!(
            "{:<24} {}  {}",
            paths[k].name,
            hooks.map(|ns| num(ns, 10, 0)).join(" "),
            num(hooks.iter().sum(), 7, 0)
        );
    }
    // The spread behind each median: on a small shared machine it is often wider than the
    // differences between the paths.
    // The exchanges' part only where they ran: `--no-exchanges` leaves no empty column.
    println!(
        "\nby round (as run): bulk MB/s | connections/s | proxy CPU us per connection (user) | \
         idle us per connection | added TTFB p99 us{}",
        if options.exchanges {
            " | exchanges' p50 us"
        } else {
            ""
        }
    );
    for (k, f) in figures.iter().enumerate().filter(|(k, _)| runs[*k]) {
        let list = |v: &[f64], sub: f64| -> String {
            v.iter()
                .map(|x| format!("{:.0}", x - sub))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let exchanges = if options.exchanges {
            let each = f.exchange_p50_us.each_ref().map(|v| list(v, 0.0));
            format!("  |  {}", each.join(" / "))
        } else {
            String::new()
        };
        println!(
            "{:<24} {}  |  {}  |  {} ({})  |  {}  |  {}{exchanges}",
            paths[k].name,
            list(&f.mb_per_sec, 0.0),
            list(&f.conns_per_sec, 0.0),
            list(&f.proxy_us, 0.0),
            list(&f.proxy_user_us, 0.0),
            list(&f.idle_us, 0.0),
            list(&f.p99_us, direct[3]),
        );
    }
    println!("\nrelayed connections with outcome ok: {relayed} of {expected}");
    for line in &not_ok {
        println!("not ok: {line}");
    }
    assert_eq!(
        relayed, expected,
        "the relay did not carry every connection"
    );

    if !runs[shipped] {
        return;
    }
    let egress = m[shipped];
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    // In how many rounds path `ka`'s rate was above path `kb`'s. Each round ran both, minutes
    // apart at most, where the machine's load moves the medians of runs on different days by
    // more than a change under test.
    let paired = |ka: usize, kb: usize| {
        let rates = figures[ka]
            .conns_per_sec
            .iter()
            .zip(&figures[kb].conns_per_sec);
        let higher = rates.clone().filter(|(x, y)| x > y).count();
        format!("higher in {higher} of {} rounds", rates.count())
    };
    if runs[other] {
        let bulk = if options.bulk {
            format!("bulk {:.2}x, ", egress[0] / m[other][0])
        } else {
            String::new()
        };
        // The two run the same code on a connection's first 64 KiB each way, which is all of
        // the rate and first-byte phases': what their figures differ by is the run's own noise,
        // the resolution of the comparisons below.
        println!(
            "shipped relay: {}; {} vs {}: {bulk}conn/s {:.2}x ({}), added TTFB p50 {:.0} vs {:.0} \
             us, p99 {:.0} vs {:.0} us (the same code in those phases: the run's own spread)",
            paths[shipped].name,
            paths[shipped].name,
            paths[other].name,
            egress[1] / m[other][1],
            paired(shipped, other),
            egress[2] - direct[2],
            m[other][2] - direct[2],
            egress[3] - direct[3],
            m[other][3] - direct[3],
        );
    }
    // The same path twice: how far apart the phase puts two measurements of one path.
    if let (Some(d), Some(a), Some(b)) = (
        in_turn_at(Some(0)),
        in_turn_at(Some(shipped)),
        in_turn_at(None),
    ) {
        let added = |i: usize, q: usize| resampled.all[i][q] - resampled.all[d][q];
        let [g50, g99] = resampled.gap(a, b);
        println!(
            "{} in turn, measured twice: added TTFB p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us \
             (the phase's own spread; the first less the second: p50 {g50}, p99 {g99})",
            paths[shipped].name,
            added(a, 0),
            added(b, 0),
            added(a, 1),
            added(b, 1),
        );
    }
    if options.bulk {
        println!(
            "egress bulk vs direct: {:.2} (target >= 0.80): {}",
            egress[0] / direct[0],
            verdict(egress[0] >= 0.8 * direct[0])
        );
    }
    // Path `ka`'s rate, proxy CPU and added time to first byte against path `kb`'s.
    let against = |ka: usize, kb: usize| {
        let (a, b) = (&m[ka], &m[kb]);
        format!(
            "conn/s {:.2}x ({}; proxy CPU {:.0} vs {:.0} us per connection, {:.0} vs {:.0} in user space), added TTFB p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us",
            a[1] / b[1],
            paired(ka, kb),
            a[4],
            b[4],
            a[5],
            b[5],
            a[2] - direct[2],
            b[2] - direct[2],
            a[3] - direct[3],
            b[3] - direct[3],
        )
    };
    // Against the peers as they ship (the targets), then with their client enforced by egress as
    // well (not a target: how much of the difference is the enforcement their clients skip).
    for (k, name, target) in [
        (3, "HAProxy", true),
        (4, "nginx stream", true),
        (
            5,
            "HAProxy with the client enforced by egress as well",
            false,
        ),
        (6, "nginx with the client enforced by egress as well", false),
        (
            7,
            "nginx in its relay's place, behind egress's steering",
            false,
        ),
    ] {
        if !runs[k] {
            continue;
        }
        let p = m[k];
        let outcome = if !target {
            String::new()
        } else if options.bulk {
            format!(
                ": {}",
                verdict(
                    egress[0] >= p[0]
                        && egress[1] >= p[1]
                        && egress[2] <= p[2]
                        && egress[3] <= p[3]
                )
            )
        } else {
            ": (no verdict without the bulk figure)".to_owned()
        };
        let bulk = if options.bulk {
            format!("bulk {:.2}x, ", egress[0] / p[0])
        } else {
            String::new()
        };
        // Not among the targets: a check that batching a stream holds no answer back.
        let exchanges = EXCHANGES
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (p50, p99) = (6 + 2 * i, 7 + 2 * i);
                format!(
                    "{} p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us",
                    e.name,
                    egress[p50] - direct[p50],
                    p[p50] - direct[p50],
                    egress[p99] - direct[p99],
                    p[p99] - direct[p99]
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let exchanges = if options.exchanges {
            format!("; added to an exchange: {exchanges}")
        } else {
            String::new()
        };
        // Not among the targets either: the same figure with the paths in turn.
        let in_turn = match (
            in_turn_at(Some(0)),
            in_turn_at(Some(shipped)),
            in_turn_at(Some(k)),
        ) {
            (Some(d), Some(e), Some(p)) => {
                let [[d50, d99], [e50, e99], [p50, p99]] = [d, e, p].map(|i| resampled.all[i]);
                let [g50, g99] = resampled.gap(e, p);
                format!(
                    "; in turn, added TTFB p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us \
                     (egress less it: p50 {g50}, p99 {g99})",
                    e50 - d50,
                    p50 - d50,
                    e99 - d99,
                    p99 - d99
                )
            }
            _ => String::new(),
        };
        println!(
            "egress vs {name}: {bulk}{}{outcome}{exchanges}{in_turn}",
            against(shipped, k)
        );
    }
    // What egress's steering and enforcement cost whatever relays behind them: nginx behind them
    // against nginx as it ships.
    if runs[4] && runs[7] {
        println!("{} vs {}: {}", paths[7].name, paths[4].name, against(7, 4));
    }
}

#[cfg(test)]
mod tests {
    use super::{BLOCK_TURNS, Resampled, quantiles};

    #[test]
    fn quantiles_take_the_sample_at_their_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        // Ranks (100 - 1) * p, rounded: 50 (49.5) and 98.
        assert_eq!(quantiles(&mut v), [51.0, 99.0]);
    }

    /// Every resample takes the same turns of every path: a path that is another one shifted by a
    /// constant differs from it by exactly that constant in each, so the interval is a point.
    /// Resampled apart, the difference would spread.
    #[test]
    fn resamples_keep_a_turn_s_times_together() {
        let n = 20 * BLOCK_TURNS;
        // A spread-out series: an uneven pattern, with a slow turn now and then.
        let a: Vec<u32> = (0..n as u32)
            .map(|i| 100 + (i * 37) % 61 + if i % 97 == 0 { 400 } else { 0 })
            .collect();
        let b: Vec<u32> = a.iter().map(|t| t + 7).collect();
        let r = Resampled::new(&[&a, &b]);
        for gap in r.gap(1, 0) {
            assert_eq!((gap.by, gap.low, gap.high), (7.0, 7.0, 7.0));
        }
        // A path against itself resampled: the quantiles themselves do move between resamples.
        let p99s: Vec<f64> = r.drawn[0].iter().map(|q| q[1]).collect();
        assert!(p99s.iter().any(|&q| q != p99s[0]), "{p99s:?}");
    }
}
