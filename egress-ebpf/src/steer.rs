//! Steering: a connect to a steered destination is rewritten to the agent's relay on loopback,
//! and the original destination is kept in the kernel for the relay (by the client's address and
//! port, once known) and for getpeername (by socket cookie). Both records go when the socket does.
//!
//! The relay listens in a workload's network namespace once it has found a process of the
//! enforced cgroup there. A steered connect from a namespace it has not found yet (a process that
//! has just entered it) is pointed where the relay will listen there and held: the relay is asked
//! to serve that namespace at once, its SYN is dropped until it does, and TCP sends the SYN again
//! after a short first timeout. Nothing leaves meanwhile; a relay that never comes leaves the
//! connect to time out.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_RB_FORCE_WAKEUP, BPF_TCP_SYN_SENT, bpf_sock_addr, bpf_sock_ops},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_setsockopt,
        },
    },
};
use egress_common::{RelayPeer, RelayWanted, Steered, map_v4};

use crate::{RELAY_NETNS, RELAY_PEERS, RELAY_WANTED, STEERED};

/// 127.0.0.1 as `user_ip4` holds it (network order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const SOL_SOCKET: i32 = 1;
const SO_BINDTOIFINDEX: i32 = 62;

/// Where the relay listens for a socket: its port on loopback in the socket's network namespace.
pub struct Relay {
    pub port: u16,
    pub netns: u64,
    /// Not yet: `port` is where it will.
    pub held: bool,
}

/// Records the original destination and points the connect at the relay. False when the record
/// cannot be written: the caller refuses the connect rather than let it through unrecorded.
#[inline(always)]
pub fn redirect(
    ctx: *mut bpf_sock_addr,
    cookie: u64,
    family: u8,
    addr: [u8; 16],
    port_be: u16,
    rule_id: u32,
    relay: Relay,
) -> bool {
    // A socket bound to an interface (SO_BINDTODEVICE) cannot reach loopback: lift the binding,
    // and keep it in the record for the relay's upstream connection.
    // SAFETY: the program's own context; `sk` is a full socket in sock_addr programs.
    let bound_if = unsafe { (*(*ctx).__bindgen_anon_1.sk).bound_dev_if };
    if bound_if != 0 && bound_if != LOOPBACK_IFINDEX {
        let mut unbound: i32 = 0;
        // SAFETY: bpf_setsockopt is allowed in connect hooks; the value is an int, as
        // SO_BINDTOIFINDEX takes, on this program's stack.
        let set = unsafe {
            bpf_setsockopt(
                ctx.cast(),
                SOL_SOCKET,
                SO_BINDTOIFINDEX,
                (&raw mut unbound).cast(),
                size_of::<i32>() as i32,
            )
        };
        if set != 0 {
            return false;
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = Steered {
        dst_addr: addr,
        dst_port_be: port_be,
        family,
        pad: 0,
        rule_id,
        cookie,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        // SAFETY: no arguments; allowed in cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        bound_if: if bound_if == LOOPBACK_IFINDEX {
            0
        } else {
            bound_if
        },
        held_port: if relay.held { relay.port } else { 0 },
        relay_port: relay.port,
        netns: relay.netns,
        closed_ns: 0,
    };
    if STEERED.insert(&cookie, &record, 0).is_err() {
        return false;
    }
    // SAFETY: the program's own context; user_ip4, user_ip6 and user_port are writable in
    // connect hooks, as whole u32s.
    unsafe {
        (*ctx).user_port = (relay.port.to_be()) as u32;
        if family == 4 {
            (*ctx).user_ip4 = LOOPBACK4;
        } else if addr[..12] == map_v4([0; 4])[..12] {
            // An IPv4-mapped destination on an IPv6 socket: the relay's IPv4 listener.
            (*ctx).user_ip6 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOOPBACK4];
        } else {
            (*ctx).user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        }
    }
    true
}

/// Asks the relay to serve namespace `netns`, which the current thread's steered connect waits
/// in. A hint lost to a full ring is made good by the relay's next scan of the cgroup.
#[inline(always)]
pub fn want(netns: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let wanted = RelayWanted {
        netns,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
    };
    let _ = RELAY_WANTED.output::<RelayWanted>(&wanted, BPF_RB_FORCE_WAKEUP as u64);
}

/// Whether the socket's steered connect was held: its namespace was not served when it connected.
#[inline(always)]
pub fn is_held(cookie: u64) -> bool {
    // SAFETY: a valid map value, read once.
    STEERED
        .get_ptr(&cookie)
        .is_some_and(|r| unsafe { (*r).held_port } != 0)
}

/// Whether an outgoing packet passes the hold: anything but the SYN of a held connect passes,
/// and that SYN once the relay listens in the connect's namespace on the port it was pointed at.
/// On another port the SYN would reach whatever the workload has there: it stays held, and the
/// connect times out.
#[inline(always)]
pub fn syn_passes(skb: *mut __sk_buff) -> bool {
    // SAFETY: the program's own context; `sk` may be null, and a socket's state is readable
    // from its common part.
    let syn_sent = unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        !sk.is_null() && (*sk).state == BPF_TCP_SYN_SENT
    };
    if !syn_sent {
        return true;
    }
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    let Some(record) = STEERED.get_ptr(&cookie) else {
        return true;
    };
    // SAFETY: a valid map value.
    let (held, netns) = unsafe { ((*record).held_port, (*record).netns) };
    if held == 0 {
        return true;
    }
    // SAFETY: a valid map value, copied out.
    unsafe { RELAY_NETNS.get(&netns) }.is_some_and(|ports| ports.has(held))
}

/// Once TCP has chosen the source port (TCP_CONNECT_CB), files the record under the client's
/// address and port, where the relay's accept() finds it. Returns whether the socket is steered.
/// A record of an earlier connect of the socket that failed before TCP took a port (no state
/// change forgot it) is dropped here, when this connect goes elsewhere: getpeername would show
/// its destination.
#[inline(always)]
pub fn connecting(ops: *mut bpf_sock_ops, cookie: u64) -> bool {
    let Some(record) = STEERED.get_ptr(&cookie) else {
        return false;
    };
    // SAFETY: a valid map value.
    let record = unsafe { &*record };
    if !to_relay(ops, record.relay_port) {
        let _ = STEERED.remove(&cookie);
        return false;
    }
    let peer = local_end(ops, record.netns, record.relay_port);
    // A failed insert leaves the relay without a record: it refuses.
    let _ = RELAY_PEERS.insert(&peer, record, 0);
    true
}

/// Forgets a steered socket's records (it is closing, from TCP state `was`). A connection that
/// was made and carried nothing (a port check) can close before the relay has taken it from its
/// accept queue: the relay's record then stays, marked closed, for the relay to say whom it
/// refuses; the relay never serves it, and removes it.
#[inline(always)]
pub fn forget(ops: *mut bpf_sock_ops, cookie: u64, was: u32) {
    if let Some(record) = STEERED.get_ptr(&cookie) {
        // SAFETY: a valid map value.
        let (netns, relay_port) = unsafe { ((*record).netns, (*record).relay_port) };
        let peer = local_end(ops, netns, relay_port);
        // SAFETY: the program's own context; a field of full sockets, which a CLOSE callback's is.
        let sent = unsafe { core::ptr::read_volatile(&raw const (*ops).data_segs_out) };
        let kept = match RELAY_PEERS.get_ptr_mut(&peer) {
            Some(relay) if sent == 0 && was != BPF_TCP_SYN_SENT => {
                // SAFETY: a valid map value; no argument.
                unsafe { (*relay).closed_ns = bpf_ktime_get_boot_ns() };
                true
            }
            _ => false,
        };
        if !kept {
            let _ = RELAY_PEERS.remove(&peer);
        }
        let _ = STEERED.remove(&cookie);
    }
}

/// Whether the socket connects to loopback on `port`, where steering points it.
#[inline(always)]
fn to_relay(ops: *mut bpf_sock_ops, port: u16) -> bool {
    // SAFETY: the program's own context, read field by field as `local_end` does.
    let (family, port_word, ip4, ip6) = unsafe {
        use core::ptr::read_volatile as rd;
        (
            rd(&raw const (*ops).family),
            rd(&raw const (*ops).remote_port),
            rd(&raw const (*ops).remote_ip4),
            [
                rd(&raw const (*ops).remote_ip6[0]),
                rd(&raw const (*ops).remote_ip6[1]),
                rd(&raw const (*ops).remote_ip6[2]),
                rd(&raw const (*ops).remote_ip6[3]),
            ],
        )
    };
    // remote_port holds the port in network order in its upper half on little-endian hosts,
    // its lower half on big-endian ones.
    let port_be = if cfg!(target_endian = "little") {
        (port_word >> 16) as u16
    } else {
        port_word as u16
    };
    if port_be != port.to_be() {
        return false;
    }
    if family == AF_INET {
        return ip4 == LOOPBACK4;
    }
    // ::1, or 127.0.0.1 mapped (an IPv6 socket steered to the relay's IPv4 listener).
    ip6[0] == 0
        && ip6[1] == 0
        && ((ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]))
            || (ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && ip6[3] == LOOPBACK4))
}

/// The socket's local address and port in namespace `netns`, as the relay sees its peer on its
/// port `relay_port`.
#[inline(always)]
fn local_end(ops: *mut bpf_sock_ops, netns: u64, relay_port: u16) -> RelayPeer {
    // SAFETY: the program's own context; these fields are readable as whole u32s. Volatile, one
    // by one: the verifier refuses a context pointer the compiler offset and kept for later.
    let (family, ip4, ip6, port) = unsafe {
        use core::ptr::read_volatile as rd;
        (
            rd(&raw const (*ops).family),
            rd(&raw const (*ops).local_ip4),
            [
                rd(&raw const (*ops).local_ip6[0]),
                rd(&raw const (*ops).local_ip6[1]),
                rd(&raw const (*ops).local_ip6[2]),
                rd(&raw const (*ops).local_ip6[3]),
            ],
            rd(&raw const (*ops).local_port),
        )
    };
    let addr = if family == AF_INET {
        map_v4(ip4.to_ne_bytes())
    } else {
        let (a, b, c, d) = (
            ip6[0].to_ne_bytes(),
            ip6[1].to_ne_bytes(),
            ip6[2].to_ne_bytes(),
            ip6[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    };
    RelayPeer {
        addr,
        // local_port is in host order (remote_port is not): a quirk of bpf_sock_ops.
        port_be: (port as u16).to_be(),
        relay_port,
        pad2: 0,
        netns,
    }
}

const AF_INET: u32 = 2;

/// getpeername() on a steered socket: the original destination, not the relay.
#[inline(always)]
pub fn peer_name(ctx: *mut bpf_sock_addr, cookie: u64, family: u8) {
    // SAFETY: a valid map value, copied out.
    let Some(record) = (unsafe { STEERED.get(&cookie) }).copied() else {
        return;
    };
    let a = record.dst_addr;
    // SAFETY: the program's own context; getpeername hooks may write the address and port.
    unsafe {
        (*ctx).user_port = record.dst_port_be as u32;
        if family == 4 {
            (*ctx).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        } else {
            (*ctx).user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        }
    }
}
