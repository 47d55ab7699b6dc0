//! The packet-level backstop and byte accounting.
//!
//! Two hooks run it. The TC egress program, on the interfaces of the agent's network namespace
//! that traffic leaves by; and the enforced cgroup's own packet programs (cgroup_skb), which see
//! its sockets' packets in whatever namespace they are: a pod's or a container's packets leave by
//! interfaces of their own namespace, and cross into the agent's, if at all, without their socket.
//! Each packet is judged by one of them: TC for the sockets of the agent's namespace (it names
//! the interface a packet was dropped on), the cgroup programs for every other.
//!
//! Packet sockets (AF_PACKET) send below IP, past the cgroup programs. In the agent's namespace TC
//! judges them with the rest; in a workload's own namespace TC programs on that namespace's
//! interfaces judge them alone (`frames`).
//!
//! Egress: packets of sockets in the enforced cgroup. TCP and UDP sockets were judged by the
//! socket hooks (or accepted an inbound connection), so the rest of their packets pass. Every
//! other IP packet of an enforced socket (raw sockets, ping sockets, …) is judged here by the
//! same policy map: denied ones are dropped and evented. A packet socket's frame is judged by
//! what it carries, not by the protocol the socket labelled it with.
//!
//! Bytes: the cgroup programs count every tracked flow's packets, both ways, in every namespace.
//! They run for the enforced cgroup's sockets only, and find the flow by the packet's socket; TC
//! would run for every packet of the host and, on ingress, find the flow by its addresses.
use aya_ebpf::{
    bindings::{
        __sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_hdr_start_off::{BPF_HDR_START_MAC, BPF_HDR_START_NET},
        bpf_sock,
    },
    helpers::generated::{
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        bpf_skb_load_bytes_relative,
    },
};
use egress_common::{ARPHRD_ETHER, EventKind, FlowEvent, Verdict, map_v4};

use crate::{
    CONFIG, FLOWS, HOME_SOCKETS, LINKS, decide,
    events::{self, IPPROTO_TCP, IPPROTO_UDP},
};

/// Which program handles a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC, on an interface of the agent's network namespace.
    Tc,
    /// The enforced cgroup's packet program, in any namespace.
    Cgroup,
}

/// TC: lets the packet go on to whatever runs after us (later TCX programs or classic filters):
/// a plain TC_ACT_OK would end their chain too.
pub const TC_PASS: i32 = TC_ACT_UNSPEC;
pub const TC_DROP: i32 = TC_ACT_SHOT as i32;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers walked to the transport header: hop-by-hop options, routing,
/// destination options (each 8 bytes + 8 × its length byte), and fragment (8 bytes).
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked at most (the verifier wants a bound; more is not seen in practice).
const IPV6_EXT_MAX: usize = 4;
const LOOPBACK_IFINDEX: u32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_PACKET: u32 = 17;
/// 802.1Q and 802.1ad VLAN tags, and the old QinQ value: 4 bytes each before the real type.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ: u16 = 0x9100;
/// An Ethernet header's length.
const ETH_HLEN: u32 = 14;
/// VLAN tags walked at most (the verifier wants a bound). A frame with more ends the walk on a tag
/// type and passes as a frame without IP does: such frames go no further than the link.
const VLAN_TAGS_MAX: usize = 2;

/// Where a packet's IP header is: `offset` bytes after a header the kernel tracks.
#[derive(Clone, Copy)]
struct At {
    start: u32,
    offset: u32,
}

/// At the network header the stack set.
const NETWORK: At = At {
    start: BPF_HDR_START_NET,
    offset: 0,
};

/// What the programs need from an IP packet.
#[derive(Default)]
struct Packet {
    family: u8,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port_be: u16,
    dst_port_be: u16,
    /// L4 payload bytes (of all segments, for a GSO packet).
    payload: u64,
    segments: u64,
    /// TCP only: the sequence number and the flags byte.
    seq: u32,
    tcp_flags: u8,
    /// ICMPv6 only: the message type.
    icmp6_type: u8,
}

const TCP_SYN: u8 = 0x02;

/// Whether an outgoing packet may leave. Handled only by the hook `hook` that owns it (see the
/// module's text); the other lets it pass.
#[inline(always)]
pub fn egress(skb: *mut __sk_buff, hook: Hook) -> bool {
    // SAFETY: the kernel hands a valid __sk_buff; `sk` is read whole, as the verifier requires.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        // No socket: forwarded traffic or the kernel's own (RST, ARP, …). Not a process's egress.
        return true;
    }
    if hook == Hook::Cgroup && on_loopback(skb) {
        return true;
    }
    let Some(config) = CONFIG.get(0) else {
        return true;
    };
    // The cgroup program runs for the enforced cgroup's sockets only; TC for every socket.
    // SAFETY: helpers allowed in both program types, given the program's own context.
    if hook == Hook::Tc
        && (config.cgroup_id == 0
            || unsafe { bpf_skb_ancestor_cgroup_id(skb, config.cgroup_level as i32) }
                != config.cgroup_id)
    {
        return true;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    if hook == Hook::Cgroup
        && let Some(flow) = FLOWS.get_ptr_mut(&cookie)
    {
        // A tracked flow's socket is TCP or UDP: counted, and passes.
        let mut pkt = Packet::default();
        if parse(skb, &mut pkt, hook).is_some() {
            // SAFETY: a valid map value; counters are added atomically as every CPU may write
            // them.
            unsafe {
                let fresh = fresh_bytes(
                    &pkt,
                    &raw mut (*flow).next_seq_out,
                    &raw mut (*flow).seq_out_known,
                );
                let event = &raw mut (*flow).event;
                events::add(&raw mut (*event).bytes_out, fresh);
                events::add(&raw mut (*event).packets_out, pkt.segments);
                if (*event).src_port_be == 0 {
                    (*event).src_port_be = pkt.src_port_be;
                    (*event).src_addr = pkt.src;
                }
            }
        }
        return true;
    }
    // SAFETY: `sk` is non-null and came from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // A request or time-wait socket: TCP, judged at connect or inbound.
        return true;
    }
    // SAFETY: a full socket the helper returned.
    if tcp_or_udp(unsafe { (*full).type_ }, unsafe { (*full).protocol }) {
        return true;
    }
    // A socket of the agent's namespace is TC's to judge; one it never saw made (it predates the
    // agent, or the table forgot it) is judged by both, alike.
    // SAFETY: a valid map value, only tested.
    if hook == Hook::Cgroup && unsafe { HOME_SOCKETS.get(&cookie) }.is_some() {
        return true;
    }
    let mut pkt = Packet::default();
    // A packet socket labels its frame with any protocol it likes; the receiver goes by the frame.
    // SAFETY: a full socket the helper returned.
    let parsed = if unsafe { (*full).family } == AF_PACKET {
        parse_frame(skb, &mut pkt, ether_link(skb))
    } else {
        parse(skb, &mut pkt, hook)
    };
    if parsed.is_none() {
        // Not IP: no policy speaks of it.
        return true;
    }
    // An interface of another namespace than the agent's cannot be named by it.
    // SAFETY: the kernel hands a valid __sk_buff.
    let ifindex = match hook {
        Hook::Tc => unsafe { (*skb).ifindex },
        Hook::Cgroup => 0,
    };
    permits(skb, &pkt, cookie, ifindex)
}

/// TC in a workload's own network namespace: whether a frame may leave. Only the enforced cgroup's
/// packet sockets are judged here, by what their frames carry (`ether`: the interface's frames
/// start with an Ethernet header); their frames pass every other hook. The cgroup's other sockets
/// are the cgroup programs' (see the module's text), everyone else's pass.
#[inline(always)]
pub fn frames(skb: *mut __sk_buff, ether: bool) -> bool {
    // SAFETY: the kernel hands a valid __sk_buff; `sk` is read whole, as the verifier requires.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return true;
    }
    // SAFETY: `sk` is non-null and came from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: a full socket the helper returned.
    if full.is_null() || unsafe { (*full).family } != AF_PACKET {
        return true;
    }
    let Some(config) = CONFIG.get(0) else {
        return true;
    };
    // SAFETY: a helper allowed in TC, given the program's own context.
    if config.cgroup_id == 0
        || unsafe { bpf_skb_ancestor_cgroup_id(skb, config.cgroup_level as i32) }
            != config.cgroup_id
    {
        return true;
    }
    let mut pkt = Packet::default();
    if parse_frame(skb, &mut pkt, ether).is_none() {
        return true;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    permits(skb, &pkt, cookie, 0)
}

/// Whether the policy lets the packet of an enforced socket that no socket hook judged leave; a
/// denied one is evented (on interface `ifindex`, 0 when the agent cannot name it).
#[inline(always)]
fn permits(skb: *mut __sk_buff, pkt: &Packet, cookie: u64, ifindex: u32) -> bool {
    if link_control(pkt) {
        return true;
    }
    let decision = decide::judge(pkt.proto, pkt.dst_port_be, pkt.dst);
    if decision.verdict.permits() {
        return true;
    }
    if let Some(mut entry) = events::reserve() {
        let now = events::now_ns();
        entry.write(FlowEvent {
            kind: EventKind::Packet as u32,
            verdict: Verdict::Deny as u32,
            rule_id: decision.rule_id,
            pid: 0,
            tid: 0,
            ifindex,
            proto: pkt.proto,
            family: pkt.family,
            src_port_be: pkt.src_port_be,
            dst_port_be: pkt.dst_port_be,
            pad: 0,
            // SAFETY: a helper allowed in both program types, given the program's own context.
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            cookie,
            time_ns: now,
            start_ns: now,
            bytes_out: pkt.payload,
            bytes_in: 0,
            packets_out: pkt.segments,
            packets_in: 0,
            src_addr: pkt.src,
            dst_addr: pkt.dst,
            comm: [0; 16],
            connects: 0,
        });
        entry.submit(events::wakeup());
    }
    false
}

/// Counts a packet delivered to a tracked flow's socket (the cgroup's ingress program).
#[inline(always)]
pub fn ingress(skb: *mut __sk_buff) {
    if on_loopback(skb) {
        return;
    }
    // SAFETY: the program's own context; the receiving socket is the packet's here.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let mut pkt = Packet::default();
    if let Some(flow) = FLOWS.get_ptr_mut(&cookie)
        && parse(skb, &mut pkt, Hook::Cgroup).is_some()
    {
        count_in(flow, &pkt);
    }
}

/// Whether the packet leaves or arrives by a loopback interface (index 1 in every namespace):
/// loopback is not egress, and its flows are not tracked. Most of the cgroup's packets, the
/// steered connections' among them, return here at the cost of one field read.
#[inline(always)]
fn on_loopback(skb: *mut __sk_buff) -> bool {
    // SAFETY: the kernel hands a valid __sk_buff.
    unsafe { (*skb).ifindex == LOOPBACK_IFINDEX }
}

/// Whether a socket of this type and protocol is TCP or UDP: judged by the socket hooks.
#[inline(always)]
pub fn tcp_or_udp(sock_type: u32, proto: u32) -> bool {
    (sock_type == SOCK_STREAM && proto == IPPROTO_TCP as u32)
        || (sock_type == SOCK_DGRAM && proto == IPPROTO_UDP as u32)
}

#[inline(always)]
fn count_in(flow: *mut egress_common::Flow, pkt: &Packet) {
    // SAFETY: a valid map value; counters are added atomically as every CPU may write them.
    unsafe {
        let fresh = fresh_bytes(
            pkt,
            &raw mut (*flow).next_seq_in,
            &raw mut (*flow).seq_in_known,
        );
        events::add(&raw mut (*flow).event.bytes_in, fresh);
        events::add(&raw mut (*flow).event.packets_in, pkt.segments);
    }
}

/// IPv6 neighbour discovery (router and neighbour solicitations and advertisements, redirects)
/// and multicast listener reports: link-scoped control (hop limit 255 or 1), never egress to a
/// service, and what the kernel's own control sockets send. With `--cgroup /` those sockets are in
/// the enforced cgroup; judging their packets would break IPv6 on the host.
#[inline(always)]
fn link_control(pkt: &Packet) -> bool {
    pkt.proto == IPPROTO_ICMPV6 && matches!(pkt.icmp6_type, 130..=137 | 143)
}

/// The payload bytes of `pkt` its flow has not carried yet in this direction. For TCP that is how
/// far the segment moves the highest sequence number seen so far, so retransmissions and overlaps
/// add nothing, and a segment overtaken by a later one was counted with it (both directions may
/// be handled on two CPUs at once, so segments can reach TC out of order). Other protocols have
/// no such notion and count every packet.
#[inline(always)]
unsafe fn fresh_bytes(pkt: &Packet, next: *mut u64, known: *mut u8) -> u64 {
    if pkt.proto != IPPROTO_TCP {
        return pkt.payload;
    }
    // The SYN takes one sequence number before any data (with TCP Fast Open, data follows it).
    let start = pkt.seq.wrapping_add((pkt.tcp_flags & TCP_SYN != 0) as u32);
    let end = start.wrapping_add(pkt.payload as u32);
    // SAFETY: the caller passes fields of a live map value.
    unsafe {
        if *known == 0 {
            // The first segment, normally the SYN: it opens the count.
            *next = end as u64;
            *known = 1;
            return pkt.payload;
        }
        if pkt.payload == 0 {
            // A bare ACK or FIN: after our FIN its sequence number is one past the data.
            return 0;
        }
        // Two CPUs may move the mark at once: compare-and-swap, retried a bounded number of times
        // (the verifier wants loops bounded; losing every round costs a miscount, not safety).
        let mut round = 0;
        while round < 4 {
            let current = core::ptr::read_volatile(next);
            // Serial-number arithmetic (RFC 1982): ahead when the difference is positive.
            let ahead = end.wrapping_sub(current as u32) as i32;
            if ahead <= 0 {
                return 0;
            }
            let (_, swapped) = core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::Relaxed },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(next, current, end as u64);
            if swapped {
                return ahead as u64;
            }
            round += 1;
        }
        0
    }
}

/// Loads `buf.len()` bytes at `offset` from the IP header at `at`.
#[inline(always)]
fn load(skb: *mut __sk_buff, at: At, offset: u32, buf: &mut [u8]) -> Option<()> {
    // SAFETY: the helper writes at most buf.len() bytes into buf.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            skb.cast(),
            at.offset + offset,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            at.start,
        )
    };
    (ret == 0).then_some(())
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Whether the agent's-namespace interface TC runs on has Ethernet framing (`EGRESS_LINKS_V1`).
#[inline(always)]
fn ether_link(skb: *mut __sk_buff) -> bool {
    // Copied: a map key may not point into the context.
    // SAFETY: the kernel hands a valid __sk_buff.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: a valid map value, copied out.
    let kind = unsafe { LINKS.get(&ifindex) };
    kind == Some(&ARPHRD_ETHER)
}

/// Fills `pkt` from the packet's network header, as the stack labelled it.
#[inline(always)]
fn parse(skb: *mut __sk_buff, pkt: &mut Packet, hook: Hook) -> Option<()> {
    // SAFETY: the kernel hands a valid __sk_buff.
    let protocol_be = unsafe { (*skb).protocol };
    parse_at(
        skb,
        pkt,
        u16::from_be(protocol_be as u16),
        NETWORK,
        || match hook {
            // The cgroup's programs see the packet from its network header on.
            Hook::Cgroup => 0,
            // TC from its link header: Ethernet's, or none.
            Hook::Tc => {
                if ether_link(skb) {
                    ETH_HLEN
                } else {
                    0
                }
            }
        },
    )
}

/// Fills `pkt` from a packet socket's frame, by what the frame carries whatever its label: on an
/// Ethernet interface (`ether`) the frame's own type (after any VLAN tags), elsewhere (no link
/// header: tun, WireGuard, IP tunnels) the IP version. TC only: packet sockets bypass the IP stack.
#[inline(always)]
fn parse_frame(skb: *mut __sk_buff, pkt: &mut Packet, ether: bool) -> Option<()> {
    if ether {
        // The type field after the two addresses; at TC the link header is where data starts.
        let mut at = At {
            start: BPF_HDR_START_MAC,
            offset: 12,
        };
        let mut kind = [0u8; 2];
        load(skb, at, 0, &mut kind)?;
        let mut i = 0;
        while i < VLAN_TAGS_MAX
            && matches!(
                be16(kind[0], kind[1]),
                ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ
            )
        {
            at.offset += 4;
            load(skb, at, 0, &mut kind)?;
            i += 1;
        }
        at.offset += 2;
        return parse_at(skb, pkt, be16(kind[0], kind[1]), at, || at.offset);
    }
    let mut first = [0u8; 1];
    load(skb, NETWORK, 0, &mut first)?;
    let ethertype = match first[0] >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return None,
    };
    parse_at(skb, pkt, ethertype, NETWORK, || 0)
}

/// Fills `pkt` in place from an IP header of type `ethertype` at `at` (addresses are loaded
/// straight into it: the stack is small). `link_len`: what precedes that header in the skb's
/// length, asked for only for a BIG TCP packet.
#[inline(always)]
fn parse_at(
    skb: *mut __sk_buff,
    pkt: &mut Packet,
    ethertype: u16,
    at: At,
    link_len: impl Fn() -> u32,
) -> Option<()> {
    // SAFETY: the kernel hands a valid __sk_buff.
    let (gso_segs, skb_len) = unsafe { ((*skb).gso_segs, (*skb).len) };
    pkt.segments = if gso_segs > 1 { gso_segs as u64 } else { 1 };
    // BIG TCP: a GSO packet longer than an IP header's length field can say has 0 there (IPv4's
    // total length, IPv6's payload length); its length is then the skb's from the IP header on.
    let big = |stated: u32| {
        if stated == 0 && gso_segs > 1 {
            Some(skb_len.saturating_sub(link_len()))
        } else {
            None
        }
    };
    let (l4, total, first_fragment) = match ethertype {
        ETH_P_IP => {
            let mut h = [0u8; 20];
            load(skb, at, 0, &mut h)?;
            pkt.family = 4;
            pkt.proto = h[9];
            pkt.src = map_v4([h[12], h[13], h[14], h[15]]);
            pkt.dst = map_v4([h[16], h[17], h[18], h[19]]);
            let frag_offset = be16(h[6], h[7]) & 0x1fff;
            let stated = be16(h[2], h[3]) as u32;
            (
                ((h[0] & 0x0f) as u32) * 4,
                big(stated).unwrap_or(stated),
                frag_offset == 0,
            )
        }
        ETH_P_IPV6 => {
            let mut h = [0u8; 8];
            load(skb, at, 0, &mut h)?;
            load(skb, at, 8, &mut pkt.src)?;
            load(skb, at, 24, &mut pkt.dst)?;
            pkt.family = 6;
            let stated = be16(h[4], h[5]) as u32;
            let total = big(stated).unwrap_or(40 + stated);
            let (mut next, mut offset, mut first_fragment) = (h[6], 40u32, true);
            let mut i = 0;
            while i < IPV6_EXT_MAX {
                let mut ext = [0u8; 4];
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        load(skb, at, offset, &mut ext)?;
                        next = ext[0];
                        offset += 8 + ext[1] as u32 * 8;
                    }
                    IPV6_FRAGMENT => {
                        load(skb, at, offset, &mut ext)?;
                        next = ext[0];
                        first_fragment = be16(ext[2], ext[3]) & 0xfff8 == 0;
                        offset += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            // Beyond the walk's bound the header's own number is judged, without ports.
            pkt.proto = next;
            (offset, total, first_fragment)
        }
        _ => return None,
    };
    let mut l4_header = 0;
    if first_fragment && matches!(pkt.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        let mut ports = [0u8; 4];
        load(skb, at, l4, &mut ports)?;
        pkt.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
        pkt.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
        l4_header = match pkt.proto {
            IPPROTO_TCP => {
                // Sequence number (4), acknowledgment number (4), data offset, flags.
                let mut h = [0u8; 10];
                load(skb, at, l4 + 4, &mut h)?;
                pkt.seq = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                pkt.tcp_flags = h[9];
                ((h[8] >> 4) as u32) * 4
            }
            IPPROTO_UDP => 8,
            _ => 12,
        };
    }
    if first_fragment && pkt.proto == IPPROTO_ICMPV6 {
        let mut t = [0u8; 1];
        load(skb, at, l4, &mut t)?;
        pkt.icmp6_type = t[0];
    }
    pkt.payload = total.saturating_sub(l4 + l4_header) as u64;
    Some(())
}
