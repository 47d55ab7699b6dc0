//! The packet-level backstop and byte accounting, on the interfaces traffic leaves by.
//!
//! Egress: packets of sockets in the enforced cgroup. A tracked flow's packets are counted. TCP and
//! UDP sockets were judged by the socket hooks (or accepted an inbound connection), so the rest of
//! their packets pass. Every other IP packet of an enforced socket (raw sockets, ping sockets, …)
//! is judged here by the same policy map: denied ones are dropped and evented.
//! Ingress: packets of tracked flows are counted; nothing is judged.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        bpf_skb_load_bytes_relative,
    },
    programs::TcContext,
};
use egress_common::{EventKind, FlowEvent, FlowTuple, Verdict, map_v4};

use crate::{
    CONFIG, FLOWS, TUPLES, decide,
    events::{self, IPPROTO_TCP, IPPROTO_UDP},
};

/// Lets the packet go on to whatever runs after us (later TCX programs or classic filters): a
/// plain TC_ACT_OK would end their chain too.
const PASS: i32 = TC_ACT_UNSPEC;

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
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

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

#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel hands a valid __sk_buff; `sk` is read whole, as the verifier requires.
    let sk: *mut bpf_sock = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        // No socket: forwarded traffic or the kernel's own (RST, ARP, …). Not a process's egress.
        return PASS;
    }
    let Some(config) = CONFIG.get(0) else {
        return PASS;
    };
    // SAFETY: helpers allowed in sched_cls, given the program's own context.
    if config.cgroup_id == 0
        || unsafe { bpf_skb_ancestor_cgroup_id(skb, config.cgroup_level as i32) }
            != config.cgroup_id
    {
        return PASS;
    }
    let mut pkt = Packet::default();
    if parse(ctx, &mut pkt).is_none() {
        // Not IP: no policy speaks of it.
        return PASS;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    if let Some(flow) = FLOWS.get_ptr_mut(&cookie) {
        // SAFETY: a valid map value; counters are added atomically as every CPU may write them.
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
                let _ = TUPLES.insert(&events::tuple(&*event), &cookie, 0);
            }
        }
        return PASS;
    }
    // SAFETY: `sk` is non-null and came from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // A request or time-wait socket: TCP, judged at connect or inbound.
        return PASS;
    }
    // SAFETY: a full socket the helper returned.
    let (sock_type, sock_proto) = unsafe { ((*full).type_, (*full).protocol) };
    if (sock_type == SOCK_STREAM && sock_proto == IPPROTO_TCP as u32)
        || (sock_type == SOCK_DGRAM && sock_proto == IPPROTO_UDP as u32)
    {
        return PASS;
    }
    if link_control(&pkt) {
        return PASS;
    }
    let decision = decide::judge(pkt.proto, pkt.dst_port_be, pkt.dst);
    if decision.verdict.permits() {
        return PASS;
    }
    if let Some(mut entry) = events::reserve() {
        let now = events::now_ns();
        entry.write(FlowEvent {
            kind: EventKind::Packet as u32,
            verdict: Verdict::Deny as u32,
            rule_id: decision.rule_id,
            pid: 0,
            tid: 0,
            // SAFETY: as above.
            ifindex: unsafe { (*skb).ifindex },
            proto: pkt.proto,
            family: pkt.family,
            src_port_be: pkt.src_port_be,
            dst_port_be: pkt.dst_port_be,
            pad: 0,
            // SAFETY: as above.
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
    TC_ACT_SHOT as i32
}

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let mut pkt = Packet::default();
    if parse(ctx, &mut pkt).is_none() {
        return PASS;
    }
    let tuple = FlowTuple {
        proto: pkt.proto,
        pad: [0; 3],
        local_port_be: pkt.dst_port_be,
        remote_port_be: pkt.src_port_be,
        local_addr: pkt.dst,
        remote_addr: pkt.src,
    };
    // SAFETY: map values are valid while the program runs.
    if let Some(&cookie) = unsafe { TUPLES.get(&tuple) }
        && let Some(flow) = FLOWS.get_ptr_mut(&cookie)
    {
        // SAFETY: as in egress.
        unsafe {
            let fresh = fresh_bytes(
                &pkt,
                &raw mut (*flow).next_seq_in,
                &raw mut (*flow).seq_in_known,
            );
            events::add(&raw mut (*flow).event.bytes_in, fresh);
            events::add(&raw mut (*flow).event.packets_in, pkt.segments);
        }
    }
    PASS
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

/// Loads `buf.len()` bytes at `offset` from the network header, whatever link header precedes.
#[inline(always)]
fn load(ctx: &TcContext, offset: u32, buf: &mut [u8]) -> Option<()> {
    // SAFETY: the helper writes at most buf.len() bytes into buf.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast(),
            offset,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            BPF_HDR_START_NET,
        )
    };
    (ret == 0).then_some(())
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Fills `pkt` in place (addresses are loaded straight into it: the stack is small).
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Option<()> {
    // SAFETY: the kernel hands a valid __sk_buff.
    let (protocol_be, gso_segs) = unsafe { ((*ctx.skb.skb).protocol, (*ctx.skb.skb).gso_segs) };
    pkt.segments = if gso_segs > 1 { gso_segs as u64 } else { 1 };
    let (l4, total, first_fragment) = match u16::from_be(protocol_be as u16) {
        ETH_P_IP => {
            let mut h = [0u8; 20];
            load(ctx, 0, &mut h)?;
            pkt.family = 4;
            pkt.proto = h[9];
            pkt.src = map_v4([h[12], h[13], h[14], h[15]]);
            pkt.dst = map_v4([h[16], h[17], h[18], h[19]]);
            let frag_offset = be16(h[6], h[7]) & 0x1fff;
            (
                ((h[0] & 0x0f) as u32) * 4,
                be16(h[2], h[3]) as u32,
                frag_offset == 0,
            )
        }
        ETH_P_IPV6 => {
            let mut h = [0u8; 8];
            load(ctx, 0, &mut h)?;
            load(ctx, 8, &mut pkt.src)?;
            load(ctx, 24, &mut pkt.dst)?;
            pkt.family = 6;
            let total = 40 + be16(h[4], h[5]) as u32;
            let (mut next, mut offset, mut first_fragment) = (h[6], 40u32, true);
            let mut i = 0;
            while i < IPV6_EXT_MAX {
                let mut ext = [0u8; 4];
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        load(ctx, offset, &mut ext)?;
                        next = ext[0];
                        offset += 8 + ext[1] as u32 * 8;
                    }
                    IPV6_FRAGMENT => {
                        load(ctx, offset, &mut ext)?;
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
        load(ctx, l4, &mut ports)?;
        pkt.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
        pkt.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
        l4_header = match pkt.proto {
            IPPROTO_TCP => {
                // Sequence number (4), acknowledgment number (4), data offset, flags.
                let mut h = [0u8; 10];
                load(ctx, l4 + 4, &mut h)?;
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
        load(ctx, l4, &mut t)?;
        pkt.icmp6_type = t[0];
    }
    pkt.payload = total.saturating_sub(l4 + l4_header) as u64;
    Some(())
}
