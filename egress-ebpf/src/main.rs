//! Kernel side of egress: cgroup sock_addr programs that allow, deny or steer every outbound
//! connect() and unconnected sendmsg() of the processes in the enforced cgroup, packet programs
//! (TC on the agent's interfaces, cgroup_skb for the cgroup's sockets in other network namespaces)
//! that back them up and count bytes, and the flow tracking that reports each flow's end.
#![no_std]
#![no_main]
#![expect(
    internal_features,
    reason = "atomic_xadd and atomic_cxchg are unstable"
)]
#![expect(
    unstable_features,
    reason = "atomic_xadd and atomic_cxchg are unstable"
)]
#![feature(core_intrinsics)]

mod decide;
mod events;
mod packet;
mod steer;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_netns_cookie, bpf_get_smp_processor_id, bpf_get_socket_cookie},
    },
    macros::{
        cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier, map, raw_tracepoint,
        sock_ops,
    },
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{
        RawTracePointContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext,
        SockoptContext, TcContext,
    },
};
use egress_common::{
    ALIVE_WITHIN_NS, CONFIG_EVENTS_OFF, COUNTER_SLOTS, Config, EventKind, Flow, FlowEvent,
    PolicyKey, PolicyValue, RULE_AF_XDP, RULE_LOOPBACK, RULE_QDISC_BYPASS, RelayPeer, RelayPorts,
    Steered, Verdict, map_v4,
};

use crate::{
    events::{Earlier, IPPROTO_TCP, IPPROTO_UDP},
    packet::Hook,
};

/// Entries are allocated on insert (LPM tries are never preallocated), so this is only a ceiling.
const POLICY_MAX_ENTRIES: u32 = 1 << 20;

#[map(name = "EGRESS_POLICY_V1")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);

#[map(name = "EGRESS_CONFIG_V5")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "EGRESS_ALIVE_V1")]
static ALIVE: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "EGRESS_COUNTERS_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// The agent may size it differently at load; this is the default (a power-of-two page count).
#[map(name = "EGRESS_EVENTS_V2")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

const FLOWS_MAX_ENTRIES: u32 = 1 << 16;

/// Not LRU: an evicted flow's close would go unreported without a trace. A flow that finds the
/// table full is counted instead (`COUNTER_UNTRACKED`). Entries go with their sockets.
#[map(name = "EGRESS_FLOWS_V6")]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

/// Sockets whose last call was denied, by cookie: the deny's event, `connects` counting the same
/// call denied again since (see `events::deny_again`). Not LRU: an evicted denial's count would be
/// lost; one that finds the table full is not opened, and its calls get a record each.
#[map(name = "EGRESS_DENIALS_V2")]
static DENIALS: HashMap<u64, FlowEvent> = HashMap::with_max_entries(1 << 14, 0);

/// Raw, ping and other sockets that are neither TCP nor UDP are rare: a few thousand at once is
/// plenty, and one the table forgot is judged by both packet hooks, never by none.
#[map(name = "EGRESS_HOME_SOCKETS_V1")]
static HOME_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(1 << 12, 0);

/// Interfaces the TC programs are on, by index: their link type. Pods' veths may be thousands;
/// an interface missing here has its packet sockets' frames judged by their IP version alone.
#[map(name = "EGRESS_LINKS_V1")]
static LINKS: HashMap<u32, u32> = HashMap::with_max_entries(1 << 14, 0);

#[map(name = "EGRESS_STEERED_V4")]
static STEERED: LruHashMap<u64, Steered> = LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

#[map(name = "EGRESS_RELAY_PEERS_V5")]
static RELAY_PEERS: LruHashMap<RelayPeer, Steered> =
    LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

#[map(name = "EGRESS_AGENT_V1")]
static AGENT: Array<u32> = Array::with_max_entries(1, 0);

const RELAY_NETNS_MAX_ENTRIES: u32 = 1 << 14;

#[map(name = "EGRESS_RELAY_NETNS_V2")]
static RELAY_NETNS: HashMap<u64, RelayPorts> =
    HashMap::with_max_entries(RELAY_NETNS_MAX_ENTRIES, 0);

/// 64 KiB: a multiple of every page size, room for thousands of hints.
#[map(name = "EGRESS_RELAY_WANTED_V1")]
static RELAY_WANTED: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    peer_name(&ctx, 4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    peer_name(&ctx, 6)
}

#[inline(always)]
fn peer_name(ctx: &SockAddrContext, family: u8) -> i32 {
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    steer::peer_name(ctx.sock_addr, cookie, family);
    1
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    sock_call(&ctx, EventKind::Connect, 4, ctx.addr4())
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    sock_call(&ctx, EventKind::Connect, 6, ctx.addr6())
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_call(&ctx, EventKind::Sendmsg, 4, ctx.addr4())
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_call(&ctx, EventKind::Sendmsg, 6, ctx.addr6())
}

/// Judges a connect or sendmsg, reports it, and tracks a permitted connect as a flow (loopback
/// aside: it is not egress). The event is built in the ring buffer itself: the 512-byte stack has
/// no room for copies.
#[inline(always)]
fn sock_call(ctx: &SockAddrContext, kind: EventKind, family: u8, addr: [u8; 16]) -> i32 {
    let (proto, port_be) = (ctx.proto(), ctx.port_be());
    let mut decision = decide::lookup(proto, port_be, addr);
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // The relay's own upstream connect, when the relay runs in the cgroup it enforces: it
    // continues a connection judged when its client connected, and the relay reports it.
    if matches!(decision.verdict, Verdict::Steer)
        && matches!(kind, EventKind::Connect)
        && is_agent()
        && agent_alive()
    {
        return 1;
    }
    if matches!(decision.verdict, Verdict::Steer) && !agent_alive() {
        // The agent died (its programs stay, pinned): nothing listens for the relay, and
        // whatever binds its port next must not receive steered connections.
        decision.verdict = Verdict::Deny;
    }
    decide::count(decision.verdict);
    let config = CONFIG.get(0);
    if matches!(decision.verdict, Verdict::Steer) {
        // Only a TCP connect can be steered (the compiler never steers UDP). Without a relay, or
        // a record of the original destination, the connection is refused, never let through.
        // SAFETY: the program's own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        // SAFETY: a valid map value, copied out.
        let relay = match unsafe { RELAY_NETNS.get(&netns) } {
            Some(ports) => steer::Relay {
                // SAFETY: no arguments.
                port: ports.for_cpu(unsafe { bpf_get_smp_processor_id() }),
                netns,
                held: false,
            },
            // A namespace the relay does not serve yet: pointed where the relay will listen
            // there, and held until it does.
            None => steer::Relay {
                port: config.map_or(0, |c| c.relay_port),
                netns,
                held: true,
            },
        };
        let held = relay.held;
        if matches!(kind, EventKind::Connect)
            && proto == IPPROTO_TCP
            && relay.port != 0
            && steer::redirect(
                ctx.sock_addr,
                cookie,
                family,
                addr,
                port_be,
                decision.rule_id,
                relay,
            )
        {
            if held {
                steer::want(netns);
            }
        } else {
            decision.verdict = Verdict::Deny;
        }
    }
    if config.is_some_and(|c| c.flags & CONFIG_EVENTS_OFF != 0) {
        return decide::hook_return(decision.verdict);
    }
    let denied = !decision.verdict.permits();
    // The same call denied again: counted in the socket's denial, reported with its close.
    if denied && events::deny_again(cookie, kind, proto, port_be, &addr, decision.rule_id) {
        return decide::hook_return(decision.verdict);
    }
    // Steered connections are not flows: they end in a relay event, with the bytes the relay
    // carried.
    let tracked = matches!(kind, EventKind::Connect)
        && matches!(decision.verdict, Verdict::Allow)
        && decision.rule_id != RULE_LOOPBACK
        && (proto == IPPROTO_TCP || proto == IPPROTO_UDP);
    // The same flow connected again: counted in it, reported with its close.
    let earlier = if tracked {
        events::reconnect(cookie, proto, port_be, &addr, decision.rule_id)
    } else {
        Earlier::None
    };
    if matches!(earlier, Earlier::Same) {
        return decide::hook_return(decision.verdict);
    }
    let Some(mut entry) = events::reserve() else {
        // A full ring buffer loses the event (counted), never the decision nor the tracking: the
        // flow's close, or the denial's, still reports the call. Built on the stack here, one
        // at a time (it has no room for more).
        if tracked {
            events::open_flow(
                cookie,
                &events::from_task(kind, decision, proto, family, port_be, addr, cookie),
                earlier,
            );
        } else if denied {
            events::open_denial(
                cookie,
                &events::from_task(kind, decision, proto, family, port_be, addr, cookie),
            );
        }
        return decide::hook_return(decision.verdict);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the entry is FlowEvent-sized and aligned; written whole before it is read.
    unsafe {
        event.write(events::from_task(
            kind, decision, proto, family, port_be, addr, cookie,
        ))
    };
    if tracked {
        // SAFETY: initialised just above.
        events::open_flow(cookie, unsafe { &*event }, earlier);
    } else if denied {
        // SAFETY: initialised just above.
        events::open_denial(cookie, unsafe { &*event });
    }
    entry.submit(events::wakeup());
    decide::hook_return(decision.verdict)
}

/// Whether the calling process is the agent (see `whoami`).
#[inline(always)]
fn is_agent() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    AGENT
        .get(0)
        .is_some_and(|&agent| agent != 0 && agent == tgid)
}

/// Run once by the agent, never attached: notes its process id as the socket hooks see it
/// ([`egress_common::AGENT_MAP`]).
#[raw_tracepoint]
pub fn whoami(_ctx: RawTracePointContext) -> i32 {
    if let Some(slot) = AGENT.get_ptr_mut(0) {
        // SAFETY: a valid map value.
        unsafe { *slot = (bpf_get_current_pid_tgid() >> 32) as u32 };
    }
    0
}

/// Whether the agent stamped that it is alive lately (see `egress_common::ALIVE_MAP`).
#[inline(always)]
fn agent_alive() -> bool {
    ALIVE
        .get(0)
        .is_some_and(|&stamp| events::now_ns().wrapping_sub(stamp) < ALIVE_WITHIN_NS)
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc_verdict(packet::egress(ctx.skb.skb, Hook::Tc))
}

/// TC egress on an Ethernet interface of a workload's own namespace (see `packet::frames`).
#[classifier]
pub fn tc_netns_ether(ctx: TcContext) -> i32 {
    tc_verdict(packet::frames(ctx.skb.skb, true))
}

/// TC egress on an interface without link header (tun, WireGuard, …) of a workload's own
/// namespace.
#[classifier]
pub fn tc_netns_bare(ctx: TcContext) -> i32 {
    tc_verdict(packet::frames(ctx.skb.skb, false))
}

#[inline(always)]
fn tc_verdict(passes: bool) -> i32 {
    if passes {
        packet::TC_PASS
    } else {
        packet::TC_DROP
    }
}

/// Files a steered connection's record for the relay once its source port is known, asks for TCP
/// state changes of tracked and steered sockets, and at CLOSE reports the flow (by then every
/// byte it carried has passed the cgroup's packet programs) and forgets the steering records.
#[sock_ops]
pub fn tcp_state(ctx: SockOpsContext) -> u32 {
    // Fetched only by the callbacks that use it: most of a connection's callbacks use nothing.
    // SAFETY: the program's own context.
    let cookie = || unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cookie = cookie();
            if steer::connecting(ctx.ops, cookie) || FLOWS.get_ptr(&cookie).is_some() {
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                // Without the CLOSE callback nothing would end the flow (sock_release ends only
                // closed ones): it ends now, its bytes uncounted.
                if ctx.set_cb_flags(flags as i32).is_err() {
                    events::close_flow(cookie);
                }
            }
        }
        // Before the first SYN: a held connect's is dropped until the relay serves its
        // namespace, so TCP should send it again soon.
        BPF_SOCK_OPS_TIMEOUT_INIT if steer::is_held(cookie()) => {
            if let Some(rto) = CONFIG.get(0).map(|c| c.held_syn_rto).filter(|&r| r != 0) {
                ctx.set_reply(u32::from(rto));
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let cookie = cookie();
            steer::forget(ctx.ops, cookie, ctx.arg(0));
            events::close_flow(cookie);
        }
        _ => {}
    }
    1
}

/// Every packet the enforced cgroup's sockets send, in any network namespace: holds the SYN of a
/// steered connect from a namespace the relay did not serve when it connected, counts tracked
/// flows, and is the packet backstop for sockets outside the agent's namespace (see `packet`).
#[cgroup_skb(egress)]
pub fn cgroup_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    i32::from(steer::syn_passes(skb) && packet::egress(skb, Hook::Cgroup))
}

/// Every packet delivered to the enforced cgroup's sockets: counted for tracked flows.
#[cgroup_skb(ingress)]
pub fn cgroup_ingress(ctx: SkBuffContext) -> i32 {
    packet::ingress(ctx.skb.skb);
    1
}

/// Notes the sockets that are neither TCP nor UDP made in the agent's own namespace: TC judges
/// their packets (see `packet`).
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the program's own context; a valid socket.
    let (kind, proto) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if packet::tcp_or_udp(kind, proto) {
        return 1;
    }
    // SAFETY: the program's own context.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.sock.cast()),
            bpf_get_socket_cookie(ctx.sock.cast()),
        )
    };
    if CONFIG
        .get(0)
        .is_some_and(|c| c.in_agent_netns(netns) == Some(true))
    {
        // A full table forgets the oldest: that socket's packets are then judged twice.
        let _ = HOME_SOCKETS.insert(&cookie, &0, 0);
    }
    1
}

/// Reports UDP flows when their socket is released, and TCP ones that never left CLOSE (a connect
/// that failed before sending anything); other TCP flows end in `tcp_state`. Closes the socket's
/// denial, if any.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the program's own context; a valid socket.
    let (cookie, kind, proto, state) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock.cast()),
            (*ctx.sock).type_,
            (*ctx.sock).protocol,
            (*ctx.sock).state,
        )
    };
    // Any socket the connect hooks judge: ICMP ping sockets too.
    events::close_denial(cookie);
    if !packet::tcp_or_udp(kind, proto) {
        let _ = HOME_SOCKETS.remove(&cookie);
        return 1;
    }
    if proto != IPPROTO_TCP as u32 {
        events::close_flow(cookie);
    } else if state == BPF_TCP_CLOSE {
        events::close_flow(cookie);
        // A steered connect that failed before TCP chose a port left only this record. Any other
        // steered socket is not closed yet: its records go at CLOSE (`tcp_state`), the relay's
        // with the socket's, which is found through this one.
        let _ = STEERED.remove(&cookie);
    }
    1
}

const SOL_PACKET: i32 = 263;
const PACKET_QDISC_BYPASS: i32 = 20;
const SOL_XDP: i32 = 283;
/// The smallest page size: beyond a page the program sees only the first one, and a kernel
/// before 6.5 fails the call unless the program hands the caller's own buffer on (`optlen` 0).
const OPTLEN_SEEN_MAX: i32 = 4096;

/// Every setsockopt() of the enforced cgroup's sockets: refuses to turn on PACKET_QDISC_BYPASS,
/// which sends a packet socket's frames past the queueing layer and with it past TC, the only hook
/// that sees them; and refuses every AF_XDP option, without which an AF_XDP socket has no memory
/// or rings to send from (it hands frames to the driver, past TC too). Every other option passes
/// untouched.
#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    let opt = ctx.sockopt;
    // SAFETY: the program's own context; these fields are readable.
    let (level, name, len) = unsafe { ((*opt).level, (*opt).optname, (*opt).optlen) };
    if level == SOL_PACKET && name == PACKET_QDISC_BYPASS && turns_on(opt) {
        refuse_option(RULE_QDISC_BYPASS);
        return 0;
    }
    if level == SOL_XDP {
        refuse_option(RULE_AF_XDP);
        return 0;
    }
    if len > OPTLEN_SEEN_MAX {
        // SAFETY: the program's own context; optlen is writable in setsockopt programs.
        unsafe { (*opt).optlen = 0 };
    }
    1
}

/// Whether the option's value is a non-zero int. The kernel refuses a value of another size.
#[inline(always)]
fn turns_on(opt: *mut aya_ebpf::bindings::bpf_sockopt) -> bool {
    // SAFETY: the program's own context; optval..optval_end is the value's readable copy.
    unsafe {
        let value = (*opt).__bindgen_anon_2.optval.cast::<u8>();
        let end = (*opt).__bindgen_anon_3.optval_end.cast::<u8>();
        if value.wrapping_add(size_of::<i32>()) > end {
            return false;
        }
        core::ptr::read_unaligned(value.cast::<i32>()) != 0
    }
}

/// Reports a refused socket option of the current task's.
#[inline(always)]
fn refuse_option(rule_id: u32) {
    if CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_EVENTS_OFF != 0)
    {
        return;
    }
    if let Some(mut entry) = events::reserve() {
        let decision = decide::Decision {
            verdict: Verdict::Deny,
            rule_id,
        };
        entry.write(events::from_task(
            EventKind::Sockopt,
            decision,
            0,
            0,
            0,
            [0; 16],
            0,
        ));
        entry.submit(events::wakeup());
    }
}

/// Reads of the destination from `struct bpf_sock_addr`. Every field is read as a whole u32: the
/// verifier rejects other access sizes for user_ip6.
trait Destination {
    fn proto(&self) -> u8;
    fn port_be(&self) -> u16;
    fn addr4(&self) -> [u8; 16];
    fn addr6(&self) -> [u8; 16];
}

impl Destination for SockAddrContext {
    #[inline(always)]
    fn proto(&self) -> u8 {
        // SAFETY: the kernel hands every sock_addr program a valid context.
        let proto = unsafe { (*self.sock_addr).protocol };
        // Protocols above 255 do not exist; map any such value to 255, which no entry uses.
        if proto > 255 { 255 } else { proto as u8 }
    }

    #[inline(always)]
    fn port_be(&self) -> u16 {
        // SAFETY: as above. user_port holds sin_port (network order) in its low 16 bits.
        unsafe { (*self.sock_addr).user_port as u16 }
    }

    #[inline(always)]
    fn addr4(&self) -> [u8; 16] {
        // SAFETY: as above. user_ip4 is in network order, so its memory bytes are the address.
        map_v4(unsafe { (*self.sock_addr).user_ip4 }.to_ne_bytes())
    }

    #[inline(always)]
    fn addr6(&self) -> [u8; 16] {
        // SAFETY: as above.
        let w = unsafe { (*self.sock_addr).user_ip6 };
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
