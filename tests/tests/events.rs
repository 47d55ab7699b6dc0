//! Root-only: flow events, the TC backstop, byte accounting, event loss, `egress events` and the
//! metrics endpoint, with the real programs, real sockets and a netns world.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use egress_agent::{
    agent::{Agent, AgentConfig},
    datapath::Sizes,
    events::Record,
    metrics::ReasonLabels,
    policy::Mode,
    relay::RelayConfig,
};
use egress_tests::{
    HeldProbe, TestCgroup, World, at, log_path, loopback_server, probe_in, probe_with_pid, records,
    shown, target_bin, wait_for, wait_record,
};

const WAIT: Duration = Duration::from_secs(10);

/// api.test (DNS) on 443 and 9000/TCP and 5353 and 5354/UDP; steered.test (DNS) on 443, steered
/// by a VirtualService timeout.
fn policy() -> String {
    r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.test]
  ports:
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 9000, name: bulk, protocol: TCP}
  - {number: 5353, name: udp-svc, protocol: UDP}
  - {number: 5354, name: udp-alt, protocol: UDP}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: steered, namespace: shop}
spec:
  hosts: [steered.test]
  ports:
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: steered-vs, namespace: shop}
spec:
  hosts: [steered.test]
  http:
  - timeout: 3s
    route: [{destination: {host: steered.test}}]
"#
    .to_owned()
}

/// api.test at host 10, steered.test at 12, unregistered 11.
fn world() -> World {
    let mut w = World::new();
    for h in [10, 11, 12] {
        w.host(h);
        for ip in [w.v4(h), w.v6(h)] {
            w.tcp_server(SocketAddr::new(ip, 443));
            w.tcp_sink_reply(SocketAddr::new(ip, 9000));
            w.udp_echo(SocketAddr::new(ip, 5353));
        }
    }
    let (a4, a6, s4) = (w.v4(10), w.v6(10), w.v4(12));
    w.start_dns(
        &[("api.test", a4), ("api.test", a6), ("steered.test", s4)],
        300,
    );
    w
}

fn config(w: &World, cg: &TestCgroup, mode: Mode, log: Option<&Path>) -> AgentConfig {
    AgentConfig {
        relay: RelayConfig {
            // Plain TCP probes of the steered host reach the relay, which waits for a ClientHello.
            hello_timeout: Duration::from_millis(300),
            ..RelayConfig::default()
        },
        ..w.agent_config(&policy(), mode, cg, log)
    }
}

/// An agent as `config` makes it, its kernel tables sized by `sizes`.
async fn agent_sized(w: &World, cg: &TestCgroup, mode: Mode, log: &Path, sizes: Sizes) -> Agent {
    Agent::start(AgentConfig {
        sizes,
        ..config(w, cg, mode, Some(log))
    })
    .await
    .expect("agent starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verdict_is_logged_with_process_destination_host_and_rule() {
    let w = world();
    let cg = TestCgroup::new("verdicts");
    let log = log_path("events-verdicts");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let cgroup_name = format!("/{}", cg.path.file_name().expect("name").to_string_lossy());

    let cases = [
        (
            "tcp",
            at(w.v4(10), 443),
            "ok",
            "connect",
            "allow",
            Some("api.test"),
        ),
        (
            "tcp",
            at(w.v6(10), 443),
            "ok",
            "connect",
            "allow",
            Some("api.test"),
        ),
        (
            "udp-sendto",
            at(w.v4(10), 5353),
            "ok",
            "sendmsg",
            "allow",
            Some("api.test"),
        ),
        ("tcp", at(w.v4(11), 443), "denied", "connect", "deny", None),
        (
            "udp-sendto",
            at(w.v6(11), 5353),
            "denied",
            "sendmsg",
            "deny",
            None,
        ),
        // Steered to the relay, which closes a connection that sends no ClientHello.
        (
            "tcp",
            at(w.v4(12), 443),
            "error:closed before the greeting",
            "connect",
            "steer",
            Some("steered.test"),
        ),
    ];
    for (mode, dst, want, kind, verdict, host) in cases {
        let (got, pid) = probe_with_pid(Some(&cg.path), &[mode, &dst]);
        assert_eq!(got, want, "egress-probe {mode} {dst}");
        let r = wait_record(&log, &format!("{kind} event for {dst}"), |r| {
            r.pid == Some(pid) && r.kind == kind && shown(r.dst) == dst
        });
        assert_eq!(r.verdict.as_deref(), Some(verdict), "{r:?}");
        assert_eq!(r.comm.as_deref(), Some("egress-probe"), "{r:?}");
        assert_eq!(r.host.as_deref(), host, "{r:?}");
        assert_eq!(r.cgroup.as_deref(), Some(cgroup_name.as_str()), "{r:?}");
        match host {
            Some("api.test") => assert_eq!(r.rule.as_deref(), Some("ServiceEntry/shop/api")),
            Some(_) => assert_eq!(r.rule.as_deref(), Some("ServiceEntry/shop/steered")),
            None => {
                assert_eq!(r.rule, None, "{r:?}");
                assert_eq!(r.reason.as_deref(), Some("mode registry-only"), "{r:?}");
            }
        }
        let proto = if mode == "tcp" { "tcp" } else { "udp" };
        assert_eq!(r.proto.as_deref(), Some(proto), "{r:?}");
    }
    // Loopback is not egress, but the decision is still seen.
    let lo = loopback_server("127.0.0.1:0");
    let (got, pid) = probe_with_pid(Some(&cg.path), &["tcp", &lo.to_string()]);
    assert_eq!(got, "ok");
    let r = wait_record(&log, "loopback connect event", |r| r.pid == Some(pid));
    assert_eq!(
        (r.verdict.as_deref(), r.reason.as_deref()),
        (Some("allow"), Some("loopback"))
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_icmp_from_the_cgroup_is_dropped_and_logged_outside_untouched() {
    let w = world();
    let cg = TestCgroup::new("icmp");
    let log = log_path("events-icmp");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    for ip in [w.v4(11), w.v6(11)] {
        // No socket hook sees a raw socket's packets: only TC stands between it and the world.
        assert_eq!(cg.probe(&["ping", &ip.to_string()]), "timeout", "ping {ip}");
        let dst = at(ip, 0);
        let r = wait_record(&log, &format!("packet event for {ip}"), |r| {
            r.kind == "packet" && shown(r.dst) == dst
        });
        let proto = if ip.is_ipv4() { "icmp" } else { "icmpv6" };
        assert_eq!(r.verdict.as_deref(), Some("deny"), "{r:?}");
        assert_eq!(r.proto.as_deref(), Some(proto), "{r:?}");
        assert_eq!(r.iface.as_deref(), Some(w.iface()), "{r:?}");
        assert!(r.cgroup.is_some(), "{r:?}");
        // The same packet from outside the enforced cgroup passes.
        assert_eq!(
            probe_in(None, &["ping", &ip.to_string()]),
            "ok",
            "ping {ip}"
        );
    }
    // Neighbour discovery is link control, not egress: it passes (with `--cgroup /` the kernel's
    // own solicitations come from the enforced cgroup). A ping after it is the barrier: the
    // solicitation was judged first, so a drop of it would be in the log before the ping's.
    let (neighbour, unregistered) = (w.v6(10), w.v6(11));
    assert_eq!(cg.probe(&["solicit", &neighbour.to_string()]), "sent");
    // Dropped: a timeout, or ENOBUFS now that the neighbour is resolved and TC runs in sendto.
    let ping = cg.probe(&["ping", &unregistered.to_string()]);
    assert_ne!(ping, "ok", "ping {unregistered}");
    let pings = at(unregistered, 0);
    wait_for("the second ping's packet event", WAIT, || {
        records(&log)
            .iter()
            .filter(|r| r.kind == "packet" && shown(r.dst) == pings)
            .count()
            == 2
    });
    let solicitation = at(neighbour, 0);
    let dropped: Vec<_> = records(&log)
        .into_iter()
        .filter(|r| r.kind == "packet" && shown(r.dst) == solicitation)
        .collect();
    assert!(
        dropped.is_empty(),
        "neighbour solicitation dropped: {dropped:?}"
    );
    a.shutdown().await;
}

/// A packet socket (AF_PACKET) sends whole frames below IP, past the socket hooks: TC judges what
/// a frame carries, whatever protocol the socket labels it with (the receiver goes by the frame),
/// and the socket may not skip the queueing layer, where TC is (PACKET_QDISC_BYPASS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_socket_frames_are_judged_by_what_they_carry_and_cannot_skip_tc() {
    let w = world();
    let cg = TestCgroup::new("frames");
    let log = log_path("events-frames");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let (src, dst) = (w.v4(1).to_string(), w.v4(11).to_string());
    let dst_at = at(w.v4(11), 0);
    let dropped = |r: &Record| r.kind == "packet" && shown(r.dst) == dst_at;
    let drops = || records(&log).iter().filter(|r| dropped(r)).count();
    for (n, label) in ["ip", "arp"].into_iter().enumerate() {
        let frame = ["frame-ping", w.iface(), &src, &dst, label];
        // Dropped by TC inside sendto().
        assert_eq!(cg.probe(&frame), "dropped", "{label}-labelled frame");
        wait_for(
            &format!("the {label}-labelled frame's packet event"),
            WAIT,
            || drops() == n + 1,
        );
        // The same frame from outside the enforced cgroup reaches the host, which answers.
        assert_eq!(probe_in(None, &frame), "ok", "{label}-labelled frame");
    }
    let r = wait_record(&log, "a frame's packet event", dropped);
    assert_eq!(r.verdict.as_deref(), Some("deny"), "{r:?}");
    assert_eq!(r.proto.as_deref(), Some("icmp"), "{r:?}");
    assert_eq!(r.iface.as_deref(), Some(w.iface()), "{r:?}");
    // A VLAN-tagged frame is judged by the IP packet inside the tag. (This kernel has no VLAN
    // devices, so nothing answers a tagged frame: outside the cgroup it leaves, unanswered.)
    let tagged = ["frame-ping", w.iface(), &src, &dst, "arp", "7"];
    assert_eq!(cg.probe(&tagged), "dropped", "tagged frame");
    wait_for("the tagged frame's packet event", WAIT, || drops() == 3);
    assert_eq!(probe_in(None, &tagged), "timeout", "tagged frame");

    // PACKET_QDISC_BYPASS may be turned off, not on; other options pass untouched, a value
    // larger than a page included.
    // Nor may it set up an AF_XDP socket, which hands frames to the driver past TC.
    let (out, pid) = probe_with_pid(Some(&cg.path), &["sockopts"]);
    assert_eq!(out, "on:denied off:ok xdp:denied large:ok");
    for reason in ["packet-qdisc-bypass", "af-xdp"] {
        let r = wait_record(&log, &format!("the {reason} event"), |r| {
            r.kind == "sockopt" && r.reason.as_deref() == Some(reason)
        });
        assert_eq!(r.verdict.as_deref(), Some("deny"), "{r:?}");
        assert_eq!(r.pid, Some(pid), "{r:?}");
        assert_eq!(r.comm.as_deref(), Some("egress-probe"), "{r:?}");
        assert!(r.cgroup.is_some(), "{r:?}");
        assert_eq!(r.dst, None, "{r:?}");
        let refused = a
            .status
            .sockopts_refused
            .get_or_create(&ReasonLabels {
                reason: Some((*reason).into()),
            })
            .get();
        assert_eq!(refused, 1, "egress_sockopts_refused_total for {reason}");
    }
    assert_eq!(
        probe_in(None, &["sockopts"]),
        "on:ok off:ok xdp:ok large:ok"
    );
    a.shutdown().await;
}

/// A workload in a network namespace of its own (a pod, a container) sends by that namespace's
/// interfaces, where the agent's TC program judges packet sockets only, and its packets reach the
/// agent's interfaces, if at all, without their socket: the cgroup's own packet programs judge its
/// raw packets and count its flows' bytes. The pod here is linked to the world directly, past the agent's interfaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_in_its_own_namespace_is_backstopped_and_counted_there() {
    let w = world();
    let pod = w.pod();
    let ns = pod.path();
    let cg = TestCgroup::new("pod-packets");
    let log = log_path("events-pod-packets");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    for ip in [w.v4(11), w.v6(11)] {
        let to = ip.to_string();
        // The packet is refused as it is sent: the socket call fails.
        assert_eq!(
            cg.probe(&["--netns", &ns, "ping", &to]),
            "denied",
            "ping {ip} from the pod"
        );
        let dst = at(ip, 0);
        let r = wait_record(&log, &format!("packet event for {ip}"), |r| {
            r.kind == "packet" && shown(r.dst) == dst
        });
        assert_eq!(r.verdict.as_deref(), Some("deny"), "{r:?}");
        // The pod's interface is not one the agent's namespace can name.
        assert_eq!(r.iface, None, "{r:?}");
        assert!(r.cgroup.is_some(), "{r:?}");
        // From the same namespace, outside the enforced cgroup: untouched.
        assert_eq!(
            probe_in(None, &["--netns", &ns, "ping", &to]),
            "ok",
            "ping {ip} from the pod, not enforced"
        );
    }
    const N: usize = 1 << 20;
    for (ip, from) in [(w.v4(10), pod.v4()), (w.v6(10), pod.v6())] {
        let dst = at(ip, 9000);
        let (got, pid) = probe_with_pid(
            Some(&cg.path),
            &["--netns", &ns, "transfer", &dst, &N.to_string()],
        );
        assert_eq!(got, "ok", "transfer to {dst} from the pod");
        let r = wait_record(&log, &format!("close event for {dst}"), |r| {
            r.kind == "close" && r.pid == Some(pid)
        });
        assert_eq!(r.bytes_out, Some(N as u64), "{r:?}");
        assert_eq!(r.bytes_in, Some(N as u64), "{r:?}");
        assert_eq!(r.src.map(|s| s.ip()), Some(from), "{r:?}");
    }
    a.shutdown().await;
}

/// A packet socket in a workload's own namespace sends frames by that namespace's interfaces, past
/// the cgroup's packet programs and the agent's TC. The agent puts a TC program on that
/// namespace's interfaces (those added later too, by their link type) as the relay starts serving
/// it, and takes it off when no process of the cgroup is left there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_sockets_in_a_pod_are_judged_by_tc_on_the_pods_interfaces() {
    let w = world();
    let pod = w.pod();
    let ns = pod.path();
    let cg = TestCgroup::new("pod-frames");
    let log = log_path("events-pod-frames");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let served = |n| {
        wait_for(&format!("{n} namespace(s) served"), WAIT, || {
            a.status.relay_namespaces.get() == n
        });
    };
    let iface = pod.iface();
    let (src, dst) = (pod.v4().to_string(), w.v4(11).to_string());
    let frame = |cgroup: Option<&TestCgroup>, iface: &str, label: &str| {
        let args = ["--netns", &ns, "frame-ping", iface, &src, &dst, label];
        probe_in(cgroup.map(|c| c.path.as_path()), &args)
    };
    served(1);
    assert!(
        pod.tcx_egress(&iface).is_empty(),
        "no program before the pod is served"
    );

    let workload = pod.workload(&cg);
    served(2);
    assert_eq!(pod.tcx_egress(&iface), ["tc_netns_ether"]);
    let dst_at = at(w.v4(11), 0);
    let dropped = |r: &Record| r.kind == "packet" && shown(r.dst) == dst_at;
    for label in ["ip", "arp"] {
        assert_eq!(
            frame(Some(&cg), &iface, label),
            "dropped",
            "{label}-labelled frame"
        );
        // From the same namespace, outside the enforced cgroup: answered.
        assert_eq!(
            frame(None, &iface, label),
            "ok",
            "{label}-labelled frame, not enforced"
        );
    }
    let r = wait_record(&log, "a pod frame's packet event", dropped);
    assert_eq!(r.verdict.as_deref(), Some("deny"), "{r:?}");
    assert_eq!(r.proto.as_deref(), Some("icmp"), "{r:?}");
    // The pod's interface is not one the agent's namespace can name.
    assert_eq!(r.iface, None, "{r:?}");
    assert!(r.cgroup.is_some(), "{r:?}");

    // A tun device added to the pod later (no link header: the IP packet alone) gets the
    // program for such links. Nothing reads the tun, so what leaves by it goes unanswered.
    let tun = format!("egt{}", std::process::id() % 100_000);
    pod.exec(&["ip", "tuntap", "add", "mode", "tun", "name", &tun]);
    pod.exec(&["ip", "link", "set", &tun, "up"]);
    wait_for("the program on the pod's tun", WAIT, || {
        pod.tcx_egress(&tun) == ["tc_netns_bare"]
    });
    assert_eq!(
        frame(Some(&cg), &tun, "ip"),
        "dropped",
        "a packet by the pod's tun"
    );
    wait_for("the tun packet's event", WAIT, || {
        records(&log).iter().filter(|r| dropped(r)).count() == 3
    });
    assert_eq!(
        frame(None, &tun, "ip"),
        "timeout",
        "a packet by the tun, not enforced"
    );

    // No process of the cgroup is left in the pod: the programs come off. The agent closes
    // their links as the namespace stops being served; a link goes when its last descriptor
    // does, and a process another test thread is forking holds a copy until its exec.
    workload.leave();
    served(1);
    wait_for("the programs off the pod's veth and tun", WAIT, || {
        pod.tcx_egress(&iface).is_empty() && pod.tcx_egress(&tun).is_empty()
    });
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interface_that_appears_later_gets_the_backstop() {
    let w = world();
    let cg = TestCgroup::new("late-iface");
    let log = log_path("events-late-iface");
    // A second world made after the agent started: its host-side veth matches the pattern.
    const LATE: u32 = 200;
    let pattern = format!("egh{}x{LATE}*", std::process::id() % 100_000);
    let a = Agent::start(AgentConfig {
        ifaces: Some(vec![w.iface().to_owned(), pattern]),
        ..config(&w, &cg, Mode::RegistryOnly, Some(&log))
    })
    .await
    .expect("agent starts");
    let late = World::with_index(LATE);
    late.host(5);
    let ip = late.v4(5);
    let dst = at(ip, 0);
    // Pings pass until the agent has put the programs on the new interface; then one is dropped
    // there and evented.
    wait_for("a ping dropped on the new interface", WAIT, || {
        cg.probe(&["ping", &ip.to_string()]);
        records(&log).iter().any(|r| {
            r.kind == "packet" && shown(r.dst) == dst && r.iface.as_deref() == Some(late.iface())
        })
    });
    a.shutdown().await;
}

/// While traffic is light the flow-log writer yields the CPU (SCHED_IDLE). On CPUs that other
/// threads keep busy it would starve: it is lifted back to its share and every record comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_writer_yields_while_light_and_is_lifted_when_starved() {
    const CONNECTS: usize = 200;
    let w = world();
    let cg = TestCgroup::new("writer-lifted");
    let log = log_path("events-writer-lifted");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let api = at(w.v4(10), 443);
    let (out, pid) = probe_with_pid(Some(&cg.path), &["tcp", &api]);
    assert_eq!(out, "ok", "tcp");
    wait_record(&log, "the first connect", |r| {
        r.kind == "connect" && r.pid == Some(pid)
    });
    // Light traffic meanwhile: the writer yields at a light batch (a loaded machine may have
    // lifted it and held it a second first).
    wait_for("the writer yielding", WAIT, || {
        assert_eq!(probe_in(Some(&cg.path), &["tcp", &api]), "ok", "tcp");
        a.status.log_writer_yielding.get() == 1
    });
    // Lifts so far (a loaded machine's): the starving below must add one.
    let lifted_before = a.status.log_writer_lifted.get();

    // Twice as many threads as CPUs spinning at normal priority: a thread at SCHED_IDLE gets a
    // few milliseconds a second.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The spinners stop however the test ends: a failed assert must not leave them to the rest.
    struct Stop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop = Stop(std::sync::Arc::clone(&stop));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..2 * cpus)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // Rounds of connects until the starved writer is lifted: at SCHED_IDLE it still gets a slice
    // now and then, and a round it keeps up with need not find it starving.
    let deadline = std::time::Instant::now() + 3 * WAIT;
    let mut pids = Vec::new();
    loop {
        let (out, pid) =
            probe_with_pid(Some(&cg.path), &["tcp-repeat", &api, &CONNECTS.to_string()]);
        assert_eq!(out, "done\nok", "tcp-repeat");
        pids.push(pid);
        if a.status.log_writer_lifted.get() > lifted_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the starved writer was not lifted"
        );
    }
    let connects = || {
        pids.iter()
            .map(|&pid| {
                records_of(&log, pid)
                    .iter()
                    .filter(|r| r.kind == "connect")
                    .count()
            })
            .sum::<usize>()
    };
    wait_for("every connect's record", WAIT, || {
        connects() == CONNECTS * pids.len()
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().expect("spinner");
    }
    assert_eq!(a.status.events_lost.get(), 0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_ends_with_its_byte_totals() {
    let w = world();
    let cg = TestCgroup::new("bytes");
    let log = log_path("events-bytes");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    const N: usize = 3 << 20;
    // Lose segments both ways, outgoing ones after they were counted: their retransmissions must
    // not count again.
    let loss = w.lossy(9000, 8);
    for ip in [w.v4(10), w.v6(10)] {
        let dst = at(ip, 9000);
        let (got, pid) = probe_with_pid(Some(&cg.path), &["transfer", &dst, &N.to_string()]);
        assert_eq!(got, "ok", "transfer to {dst}");
        let r = wait_record(&log, &format!("close event for {dst}"), |r| {
            r.kind == "close" && r.pid == Some(pid)
        });
        assert_eq!(shown(r.dst), dst, "{r:?}");
        assert_eq!(r.host.as_deref(), Some("api.test"), "{r:?}");
        // Every payload byte once each way: retransmissions are not counted again.
        assert_eq!(r.bytes_out, Some(N as u64), "{r:?}");
        assert_eq!(r.bytes_in, Some(N as u64), "{r:?}");
        // At most one MTU's payload per packet, plus the handshake and teardown.
        let min_packets = (N / 1500) as u64;
        assert!(r.packets_out.is_some_and(|p| p >= min_packets), "{r:?}");
        assert!(r.packets_in.is_some_and(|p| p >= min_packets), "{r:?}");
        assert!(r.src.is_some() && r.duration_ms.is_some(), "{r:?}");
    }
    let (into_world, into_host) = loss.dropped();
    assert!(
        into_world > 0 && into_host > 0,
        "no segment was lost ({into_world} out, {into_host} in): retransmission went untested"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_tcp_packets_are_counted_whole() {
    let w = world();
    // Packets of up to 185,000 bytes: an IP header's length field reads 0 for them.
    w.big_tcp(185_000);
    let cg = TestCgroup::new("big-tcp");
    let log = log_path("events-big-tcp");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    const N: usize = 8 << 20;
    for ip in [w.v4(10), w.v6(10)] {
        let dst = at(ip, 9000);
        let (got, pid) = probe_with_pid(Some(&cg.path), &["transfer", &dst, &N.to_string()]);
        assert_eq!(got, "ok", "transfer to {dst}");
        let r = wait_record(&log, &format!("the close for {dst}"), |r| {
            r.kind == "close" && r.pid == Some(pid)
        });
        assert_eq!(r.bytes_out, Some(N as u64), "{r:?}");
        assert_eq!(r.bytes_in, Some(N as u64), "{r:?}");
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_connected_again_is_one_flow_with_a_count() {
    let w = world();
    let cg = TestCgroup::new("reconnect");
    let log = log_path("events-reconnect");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let (api, other) = (at(w.v4(10), 5353), at(w.v4(10), 5354));
    let (out, pid) = probe_with_pid(Some(&cg.path), &["bench-connect", &api, "1000"]);
    assert!(out.parse::<f64>().is_ok(), "bench-connect: {out}");
    let close = wait_record(&log, "the flow's close", |r| {
        r.kind == "close" && r.pid == Some(pid)
    });
    assert_eq!(close.connects, Some(1000), "{close:?}");
    assert_eq!(shown(close.dst), api, "{close:?}");
    assert_eq!(close.host.as_deref(), Some("api.test"), "{close:?}");
    let connects = |pid| {
        records(&log)
            .into_iter()
            .filter(|r| r.kind == "connect" && r.pid == Some(pid))
            .count()
    };
    assert_eq!(connects(pid), 1, "the first connect has its own record");
    // Another destination is another flow: each connect has a record, each flow a close.
    let (out, pid) = probe_with_pid(Some(&cg.path), &["udp-alternate", &api, &other, "3"]);
    assert_eq!(out, "ok", "udp-alternate");
    let mut closes = Vec::new();
    wait_for("six closes", WAIT, || {
        closes = records(&log)
            .into_iter()
            .filter(|r| r.kind == "close" && r.pid == Some(pid))
            .collect();
        closes.len() == 6
    });
    assert!(closes.iter().all(|r| r.connects == Some(1)), "{closes:?}");
    assert_eq!(connects(pid), 6);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_denied_again_is_counted_in_one_denial() {
    let w = world();
    let cg = TestCgroup::new("denied-again");
    let log = log_path("events-denied-again");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let (unregistered, other) = (at(w.v4(11), 5353), at(w.v4(11), 5354));
    let of = |pid: u32, kind: &str| -> Vec<Record> {
        records(&log)
            .into_iter()
            .filter(|r| r.kind == kind && r.pid == Some(pid))
            .collect()
    };
    // A thousand sends to a denied destination from one socket: its first deny has a record,
    // the rest are counted in the socket's denial, reported by a close when the socket goes.
    let (out, pid) = probe_with_pid(Some(&cg.path), &["sendto-repeat", &unregistered, "1000"]);
    assert_eq!(out, "denied:1000", "sendto-repeat");
    let close = wait_record(&log, "the denial's close", |r| {
        r.kind == "close" && r.pid == Some(pid)
    });
    assert_eq!(close.verdict.as_deref(), Some("deny"), "{close:?}");
    assert_eq!(close.connects, Some(1000), "{close:?}");
    assert_eq!(shown(close.dst), unregistered, "{close:?}");
    assert_eq!(close.rule, of(pid, "sendmsg")[0].rule, "{close:?}");
    assert_eq!(close.bytes_out, Some(0), "{close:?}");
    assert_eq!(
        of(pid, "sendmsg").len(),
        1,
        "the first deny has its own record"
    );
    // Past the fold's second the same call opens a new denial: the old one is closed first.
    let (out, pid) = probe_with_pid(
        Some(&cg.path),
        &["sendto-repeat", &unregistered, "5", "1200"],
    );
    assert_eq!(out, "denied:10", "sendto-repeat with a pause");
    wait_for("two denials closed", WAIT, || of(pid, "close").len() == 2);
    assert!(
        of(pid, "close").iter().all(|r| r.connects == Some(5)),
        "{:?}",
        of(pid, "close")
    );
    assert_eq!(of(pid, "sendmsg").len(), 2);
    // A lone deny is its record alone.
    let (out, pid) = probe_with_pid(Some(&cg.path), &["udp-sendto", &other]);
    assert_eq!(out, "denied", "udp-sendto");
    wait_record(&log, "the lone deny", |r| {
        r.kind == "sendmsg" && r.pid == Some(pid)
    });
    a.shutdown().await;
    let closes = records(&log)
        .into_iter()
        .filter(|r| r.kind == "close" && r.verdict.as_deref() == Some("deny"))
        .count();
    assert_eq!(closes, 3, "no close for a denial nothing was folded into");
}

/// More sockets in denial at once than the kernel's denial table holds (16,384): every call is
/// still counted. A socket whose denial finds the table full gets a record per call instead of
/// one folded close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_denials_at_once_than_the_table_holds_lose_no_call() {
    const SOCKETS: u64 = 17_000;
    const CALLS: u64 = 3;
    let w = world();
    let cg = TestCgroup::new("many-denials");
    let log = log_path("events-many-denials");
    // Room for every record of the burst of closes as the probe exits.
    let sizes = Sizes {
        ring_bytes: Some(32 << 20),
        ..Sizes::default()
    };
    let a = agent_sized(&w, &cg, Mode::RegistryOnly, &log, sizes).await;
    let unregistered = at(w.v4(11), 5353);
    let sockets = SOCKETS.to_string();
    let calls = CALLS.to_string();
    let (out, pid) = probe_with_pid(
        Some(&cg.path),
        &["udp-many", &unregistered, &sockets, &calls],
    );
    assert_eq!(out, format!("denied:{}", SOCKETS * CALLS), "udp-many");
    // Each folded denial's first call has its record and its close counts them all; an unfolded
    // call is its record alone.
    let accounted = || {
        let (mut calls, mut records) = (0, 0);
        for r in records_of(&log, pid) {
            match &*r.kind {
                "connect" => {
                    calls += 1;
                    records += 1;
                }
                "close" => calls += r.connects.unwrap_or(1) - 1,
                _ => {}
            }
        }
        (calls, records)
    };
    wait_for("every denied call accounted for", WAIT, || {
        accounted().0 == SOCKETS * CALLS
    });
    assert!(
        accounted().1 > SOCKETS,
        "the table never filled: {:?}",
        accounted()
    );
    assert_eq!(a.status.events_lost.get(), 0);
    a.shutdown().await;
}

/// More flows at once than the flow table holds: each connect beyond is counted untracked (its
/// record stands, no close follows), every tracked flow is closed with its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_beyond_the_flow_table_are_counted_untracked() {
    const TABLE: u64 = 1000;
    const SOCKETS: u64 = 1200;
    let w = world();
    let cg = TestCgroup::new("many-flows");
    let log = log_path("events-many-flows");
    let sizes = Sizes {
        flows: Some(TABLE as u32),
        ..Sizes::default()
    };
    // Allow-any: a flow to a port nothing listens on is tracked too, and ends refused.
    let a = agent_sized(&w, &cg, Mode::AllowAny, &log, sizes).await;
    let api = at(w.v4(10), 5353);
    let sockets = SOCKETS.to_string();
    let (out, pid) = probe_with_pid(Some(&cg.path), &["udp-many", &api, &sockets, "2"]);
    assert_eq!(out, format!("ok:{}", SOCKETS * 2), "udp-many");
    // The first sockets fill the table, each reconnect counted in its flow. Past them a
    // reconnect finds no flow: a connect record of its own, untracked too.
    let beyond = SOCKETS - TABLE;
    let count = |kind: &str| {
        records_of(&log, pid)
            .iter()
            .filter(|r| r.kind == kind)
            .count() as u64
    };
    wait_for("every tracked flow closed", WAIT, || {
        count("close") == TABLE
    });
    wait_for("the untracked ones counted", WAIT, || {
        a.status.flows_untracked.get() == 2 * beyond
    });
    let records = records_of(&log, pid);
    assert!(
        records
            .iter()
            .filter(|r| r.kind == "close")
            .all(|r| r.connects == Some(2)),
        "a tracked flow counts its reconnect"
    );
    assert_eq!(count("connect"), TABLE + 2 * beyond);
    assert_eq!(a.status.events_lost.get(), 0);
    // The table empties as the sockets go, however their flows ended: it is not LRU, a flow
    // left behind would stay for good. One held open shows the count live; once it goes, none
    // of those that ended meanwhile may be left.
    let held = HeldProbe::start(
        Some(&cg.path),
        &["tcp-hold", &at(w.v4(10), 443)],
        "connected",
    );
    wait_for("the held flow counted", WAIT, || {
        a.status.flows_open.get() == 1
    });
    assert_eq!(cg.probe(&["tcp", &at(w.v4(11), 444)]), "refused");
    assert_eq!(cg.probe(&["transfer", &at(w.v4(10), 9000), "100000"]), "ok");
    assert_eq!(cg.probe(&["udp-many", &api, "1", "3"]), "ok:3");
    held.release();
    wait_for("the flow table empty again", WAIT, || {
        a.status.flows_open.get() == 0
    });
    a.shutdown().await;
}

fn records_of(log: &Path, pid: u32) -> Vec<Record> {
    records(log)
        .into_iter()
        .filter(|r| r.pid == Some(pid))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_open_across_a_reload_keeps_its_rule() {
    let w = world();
    let cg = TestCgroup::new("reload-flow");
    let log = log_path("events-reload-flow");
    let cfg = config(&w, &cg, Mode::RegistryOnly, Some(&log));
    let dir = cfg.policies[0].clone();
    let a = Agent::start(cfg).await.expect("agent starts");
    let dst = at(w.v4(10), 443);
    let held = HeldProbe::start(Some(&cg.path), &["tcp-hold", &dst], "connected");
    let pid = held.pid();

    // While the flow is open, a ServiceEntry comes in ahead of api's: the kernel's flow table
    // keeps the id it decided with, which must still name api when the flow closes.
    let first = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {name: first, namespace: shop}\n\
                 spec: {hosts: [first.test], ports: [{number: 443, name: https, protocol: HTTPS}], \
                 resolution: DNS}\n---\n";
    let syncs = a.status.syncs.get();
    fs::write(dir.join("policy.yaml"), format!("{first}{}", policy())).expect("write policy");
    a.reload().await;
    wait_for("the new policy in force", WAIT, || {
        a.status.reloads.get() == 1 && a.status.syncs.get() > syncs
    });
    held.release();
    let close = wait_record(&log, "the flow's close", |r| {
        r.kind == "close" && r.pid == Some(pid)
    });
    assert_eq!(
        close.rule.as_deref(),
        Some("ServiceEntry/shop/api"),
        "{close:?}"
    );
    assert_eq!(close.host.as_deref(), Some("api.test"), "{close:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ring_buffer_is_counted_and_reported() {
    let w = world();
    let cg = TestCgroup::new("lost");
    let dir = log_path("events-lost");
    fs::create_dir_all(dir.parent().expect("dir")).expect("log dir");
    // A FIFO nobody reads yet: the writer blocks, the pipeline backs up, the ring fills.
    let fifo = dir.with_extension("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open fifo");
    let sizes = Sizes {
        ring_bytes: Some(4096),
        ..Sizes::default()
    };
    let a = agent_sized(&w, &cg, Mode::RegistryOnly, &fifo, sizes).await;
    let target = at(w.v4(10), 5353);
    // Until the pipeline has stalled: every event of a round lost, none drained meanwhile (the
    // writer blocked, the queue full, the reader waiting on it). New sockets: a connect and a
    // close event apiece (reconnects would fold into one flow).
    wait_for("the pipeline to stall", 3 * WAIT, || {
        let before = a.status.events_lost.get();
        cg.probe(&["bench-socket", &target, "1000"]);
        // The metric follows the kernel's counter within a second.
        let polled = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < polled && a.status.events_lost.get() < before + 2000 {
            std::thread::sleep(Duration::from_millis(20));
        }
        a.status.events_lost.get() >= before + 2000
    });
    // A flow opened while the ring is full: its connect event is lost, not its tracking.
    let lost_before = a.status.events_lost.get();
    let held = HeldProbe::start(
        Some(&cg.path),
        // The sink keeps the connection until the probe closes it (the 443 server closes at once).
        &["hello-hold", &at(w.v4(10), 9000), "api.test", "1"],
        "held",
    );
    let held_pid = held.pid();
    wait_for("the held connect's event lost", WAIT, || {
        a.status.events_lost.get() > lost_before
    });
    // Now read: the loss appears in the log as a `lost` record.
    let deadline = Instant::now() + WAIT;
    let mut text = String::new();
    let mut read_until = |what: &str, done: &dyn Fn(&[Record]) -> bool| loop {
        let (complete, _) = text.rsplit_once('\n').unwrap_or(("", ""));
        let records: Vec<Record> = complete
            .lines()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
            .collect();
        if done(&records) {
            return records;
        }
        assert!(Instant::now() < deadline, "{what}: not in the log");
        let mut buf = vec![0u8; 1 << 16];
        match reader.read(&mut buf) {
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reading the fifo: {e}"),
        }
    };
    let lost_logged = |records: &[Record]| -> u64 {
        records
            .iter()
            .filter(|r| r.kind == "lost")
            .map(|r| r.lost.expect("lost count"))
            .sum()
    };
    let records = read_until("a complete lost report", &|records| {
        let logged = lost_logged(records);
        logged > 0 && logged >= a.status.events_lost.get()
    });
    assert_eq!(lost_logged(&records), a.status.events_lost.get());
    // The ring has room again: the held flow ends with its close, though its connect went
    // unreported.
    held.release();
    let records = read_until("the held flow's close", &|records| {
        records
            .iter()
            .any(|r| r.kind == "close" && r.pid == Some(held_pid))
    });
    let close = records
        .iter()
        .find(|r| r.kind == "close" && r.pid == Some(held_pid))
        .expect("close");
    assert_eq!(close.host.as_deref(), Some("api.test"), "{close:?}");
    assert!(close.bytes_out.is_some_and(|b| b > 0), "{close:?}");
    assert!(
        !records
            .iter()
            .any(|r| r.kind == "connect" && r.pid == Some(held_pid)),
        "the held connect's own event was lost"
    );
    // Keep reading until the agent has stopped and closed its end.
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("reading the fifo: {e}"),
            }
        }
    });
    a.shutdown().await;
    drain.join().expect("fifo drained");
    let _ = fs::remove_file(&fifo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_shows_new_events() {
    let w = world();
    let cg = TestCgroup::new("follow");
    let log = log_path("events-follow");
    let a = Agent::start(config(&w, &cg, Mode::RegistryOnly, Some(&log)))
        .await
        .expect("agent starts");
    let mut follower = Command::new(target_bin("egress"))
        .args([
            "events",
            "--follow",
            "--verdict",
            "deny",
            "--host",
            "*",
            "--file",
        ])
        .arg(&log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("egress events --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let denied = at(w.v4(10), 8443);
    let mut seen = Vec::new();
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "egress events --follow showed nothing about {denied}: {seen:?}"
        );
        // Keep making events until the follower (which starts at the end) shows one.
        assert_eq!(cg.probe(&["tcp", &denied]), "denied");
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains(&denied) {
                assert!(line.contains("deny") && line.contains("api.test"), "{line}");
                break 'outer;
            }
            seen.push(line);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    a.shutdown().await;
}

/// `egress_connections_total` samples: (verdict, host, rule) → count.
fn scrape(addr: SocketAddr) -> (BTreeMap<(String, String, String), u64>, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: egress\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("egress_connections_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').expect("sample");
        let get = |k: &str| {
            let start = labels.find(&format!("{k}=\"")).expect("label") + k.len() + 2;
            labels[start..].split('"').next().expect("value").to_owned()
        };
        out.insert(
            (get("verdict"), get("host"), get("rule")),
            value.parse().expect("count"),
        );
    }
    (out, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_log() {
    let w = world();
    let cg = TestCgroup::new("metrics");
    let log = log_path("events-metrics");
    let a = Agent::start(AgentConfig {
        metrics: Some("127.0.0.1:0".parse().expect("addr")),
        ..config(&w, &cg, Mode::RegistryOnly, Some(&log))
    })
    .await
    .expect("agent starts");
    let addr = a.metrics_addr.expect("metrics address");
    for (mode, dst) in [
        ("tcp", at(w.v4(10), 443)),
        ("tcp", at(w.v4(10), 443)),
        ("tcp", at(w.v4(11), 443)),
        ("udp-sendto", at(w.v6(10), 5353)),
        ("transfer", at(w.v4(10), 9000)),
        ("bench-connect", at(w.v4(10), 5353)),
        ("sendto-repeat", at(w.v4(11), 5353)),
    ] {
        let mut args = vec![mode, dst.as_str()];
        match mode {
            "transfer" => args.push("100000"),
            "bench-connect" => args.push("50"),
            "sendto-repeat" => args.push("70"),
            _ => {}
        }
        cg.probe(&args);
    }
    wait_record(&log, "the reconnects' close event", |r| {
        r.kind == "close" && r.connects == Some(50)
    });
    wait_record(&log, "the repeated denial's close event", |r| {
        r.kind == "close" && r.connects == Some(70)
    });
    let from_log = || {
        let mut m = BTreeMap::new();
        let mut bytes = 0;
        for r in records(&log) {
            let key = || {
                let text = |v: Option<&str>| v.unwrap_or_default().to_owned();
                (
                    text(r.verdict.as_deref()),
                    text(r.host.as_deref()),
                    text(r.rule.as_deref()),
                )
            };
            if matches!(&*r.kind, "connect" | "sendmsg" | "packet") {
                *m.entry(key()).or_insert(0u64) += 1;
            }
            // A flow's reconnects: decisions too, counted in its close.
            if r.kind == "close" && r.connects.is_some_and(|n| n > 1) {
                *m.entry(key()).or_insert(0u64) += r.connects.unwrap_or(1) - 1;
            }
            if r.kind == "close" && r.host.as_deref() == Some("api.test") {
                bytes += r.bytes_out.unwrap_or(0);
            }
        }
        (m, bytes)
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let (metrics, text) = scrape(addr);
        let (logged, bytes_out) = from_log();
        let bytes_line =
            format!("egress_bytes_total{{host=\"api.test\",direction=\"out\"}} {bytes_out}");
        if metrics == logged && text.contains(&bytes_line) {
            assert!(text.contains("egress_events_lost_total 0"), "{text}");
            assert!(
                text.contains("egress_dns_refresh_successes_total"),
                "{text}"
            );
            assert!(text.contains("egress_policy_map_entries"), "{text}");
            let allow = (
                "allow".to_owned(),
                "api.test".to_owned(),
                "ServiceEntry/shop/api".to_owned(),
            );
            assert!(metrics.get(&allow).is_some_and(|&n| n >= 53), "{metrics:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics {metrics:?} never agreed with the log {logged:?}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    a.shutdown().await;
}
