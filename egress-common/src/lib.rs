//! Types shared by the eBPF programs and the agent. Every type here crosses the kernel boundary:
//! `#[repr(C)]`, no implicit padding, byte order in field names, layouts asserted below.
#![no_std]

/// Name of the policy LPM trie. A change to [`PolicyKey`] or [`PolicyValue`] gets a new version.
pub const POLICY_MAP: &str = "EGRESS_POLICY_V1";
/// Name of the single-entry [`Config`] array.
pub const CONFIG_MAP: &str = "EGRESS_CONFIG_V5";
/// Name of the per-CPU counters: slot 0 counts events lost, slots 1..=3 decisions by [`Verdict`].
pub const COUNTERS_MAP: &str = "EGRESS_COUNTERS_V1";
/// Name of the one-entry array where the agent stamps that it is alive (CLOCK_BOOTTIME ns, every
/// [`ALIVE_EVERY_NS`]). The programs outlive a dead agent (pinned); with no stamp newer than
/// [`ALIVE_WITHIN_NS`] they refuse steered connects, which only the agent's relay may take.
pub const ALIVE_MAP: &str = "EGRESS_ALIVE_V1";
pub const ALIVE_EVERY_NS: u64 = 1_000_000_000;
pub const ALIVE_WITHIN_NS: u64 = 5 * ALIVE_EVERY_NS;
/// Name of the ring buffer of [`FlowEvent`]s.
pub const EVENTS_MAP: &str = "EGRESS_EVENTS_V2";
/// Name of the hash of open flows: socket cookie → [`Flow`].
pub const FLOWS_MAP: &str = "EGRESS_FLOWS_V6";
/// Name of the LRU hash of steered connections by socket cookie → [`Steered`]: written at
/// connect, read by getpeername, removed when the socket closes.
pub const STEERED_MAP: &str = "EGRESS_STEERED_V4";
/// Name of the LRU hash the relay reads: the client's end of a steered connection ([`RelayPeer`],
/// as the relay's accept() sees it) → [`Steered`]. Written once the source port is known (sock_ops
/// TCP_CONNECT_CB), removed when the client's socket closes: a record never outlives its
/// connection. A connection that closes having carried nothing (a port check) may still wait in
/// the relay's accept queue: its record stays, marked closed ([`Steered::closed_ns`]), until the
/// relay takes the connection.
pub const RELAY_PEERS_MAP: &str = "EGRESS_RELAY_PEERS_V5";
/// Name of the hash of the network namespaces the relay listens in: netns cookie → its workers'
/// ports on 127.0.0.1 and ::1 there ([`RelayPorts`]). A steered connect from a namespace without
/// an entry is pointed at [`Config::relay_port`] there and held (see [`Steered::held_port`]).
pub const RELAY_NETNS_MAP: &str = "EGRESS_RELAY_NETNS_V2";
/// The most relay workers, each with a listener of its own in every namespace the relay serves.
pub const RELAY_WORKERS_MAX: usize = 64;

/// Where the relay listens in one network namespace: a port per worker (host order), the first
/// `count` of `ports`. A steered connect goes to the worker of its CPU's turn, so that each
/// worker is woken for its own connections only; every port is the relay's alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayPorts {
    pub ports: [u16; RELAY_WORKERS_MAX],
    pub count: u16,
}

impl RelayPorts {
    /// `ports`, the first [`RELAY_WORKERS_MAX`] of them.
    pub fn new(ports: &[u16]) -> RelayPorts {
        let mut all = [0; RELAY_WORKERS_MAX];
        let count = ports.len().min(RELAY_WORKERS_MAX);
        all[..count].copy_from_slice(&ports[..count]);
        RelayPorts {
            ports: all,
            count: count as u16,
        }
    }

    /// The port for a connect made on CPU `cpu`; 0 when there is none.
    #[inline(always)]
    pub fn for_cpu(&self, cpu: u32) -> u16 {
        let count = u32::from(self.count);
        if count == 0 {
            return 0;
        }
        self.ports.get((cpu % count) as usize).copied().unwrap_or(0)
    }

    /// Whether the relay listens on `port`.
    #[inline(always)]
    pub fn has(&self, port: u16) -> bool {
        let mut i = 0;
        while i < RELAY_WORKERS_MAX {
            if i >= usize::from(self.count) {
                return false;
            }
            if self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}
/// Name of the ring buffer of [`RelayWanted`]: namespaces a steered connect waits in, for the
/// relay to serve at once rather than at its next scan. A hint: one lost to a full ring is
/// found by that scan.
pub const RELAY_WANTED_MAP: &str = "EGRESS_RELAY_WANTED_V1";
/// Name of the one-slot array of the agent's process id as the kernel counts it (its tgid in the
/// initial pid namespace, whatever namespace the agent runs in), written by [`WHOAMI_PROGRAM`]. A
/// steered destination's connect by the agent itself (the relay's upstream connection) is let
/// through as it is: it continues a connection judged when its client connected, and steering it
/// would bring it back to the relay when the relay runs in the cgroup it enforces. Only the
/// kernel writes the slot, and only for the process that runs the program.
pub const AGENT_MAP: &str = "EGRESS_AGENT_V1";
/// The program that writes [`AGENT_MAP`]: never attached, run once by the agent (BPF_PROG_TEST_RUN
/// runs a raw tracepoint program in the caller's own context).
pub const WHOAMI_PROGRAM: &str = "whoami";

/// Name of the LRU hash of the enforced cgroup's sockets that are neither TCP nor UDP (raw, ping,
/// …) and were made in the agent's own network namespace: socket cookie → 0. Their packets leave
/// by interfaces the TC programs are on, and TC judges them; every other such socket's packets
/// are judged by the cgroup's packet program. Written at socket creation, removed at release.
pub const HOME_SOCKETS_MAP: &str = "EGRESS_HOME_SOCKETS_V1";
/// Name of the hash of the interfaces the TC programs are on: ifindex → link type (ARPHRD_*),
/// which says where a packet socket's frame puts its network header.
pub const LINKS_MAP: &str = "EGRESS_LINKS_V1";
/// The link type of Ethernet interfaces (veth, bridges, most NICs).
pub const ARPHRD_ETHER: u32 = 1;

/// Bits of [`PolicyKey`] before the address: protocol (8), pad (8) and port (16). An LPM entry
/// always covers them completely, so protocol and port match exactly.
pub const KEY_FIXED_BITS: u32 = 32;

/// Data part of a policy LPM trie key (aya's `lpm_trie::Key` adds the prefix length in bits).
///
/// Match precedence, as the programs apply it:
/// 1. Loopback and unspecified destinations (127.0.0.0/8, ::1, 0.0.0.0, ::, and their
///    IPv4-mapped forms) are not egress: allowed before any lookup.
/// 2. One LPM lookup with (protocol, port, address). Every entry's prefix covers protocol and port
///    in full ([`KEY_FIXED_BITS`]) plus a prefix of the address, so protocol and port are exact
///    matches and, among them, the longest address prefix wins.
/// 3. No entry: the mode in [`Config`] decides (allow-any allows, registry-only and an agent that
///    never wrote the config deny).
///
/// IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`, a /32 becomes a /128), so connect4, connect6 with
/// a mapped address and sendmsg all take the same path to the same entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// IP protocol number: 6 for TCP, 17 for UDP.
    pub proto: u8,
    pub pad: u8,
    pub port_be: u16,
    /// Destination address in network order, IPv4 mapped into IPv6.
    pub addr: [u8; 16],
}

/// What the programs do with a connection. Stable numbers: they appear in maps and events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow = 1,
    Deny = 2,
    /// TCP: rewritten to the agent's gateway relay, which checks the TLS SNI and connects on.
    Steer = 3,
}

impl Verdict {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Allow),
            2 => Some(Self::Deny),
            3 => Some(Self::Steer),
            _ => None,
        }
    }

    /// Whether the connection proceeds.
    pub const fn permits(self) -> bool {
        matches!(self, Self::Allow | Self::Steer)
    }
}

/// Rule ids below this value are reserved for built-in decisions.
pub const RULE_FIRST_POLICY: u32 = 16;
/// No rule matched: the mode decided.
pub const RULE_MODE: u32 = 0;
/// Loopback or unspecified destination.
pub const RULE_LOOPBACK: u32 = 1;
/// A configured DNS resolver on port 53.
pub const RULE_RESOLVER: u32 = 2;
/// A packet socket asked to skip the queueing layer (PACKET_QDISC_BYPASS), where TC is.
pub const RULE_QDISC_BYPASS: u32 = 3;
/// An AF_XDP socket being set up (any SOL_XDP option): its frames go to the driver past TC.
pub const RULE_AF_XDP: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    /// A [`Verdict`] as u32; an unknown value is treated as deny.
    pub verdict: u32,
    /// Index into the agent's rule table; see `RULE_*`.
    pub rule_id: u32,
}

/// Outbound traffic mode. Zero is "not configured", which denies: a program running before the
/// agent wrote its config fails closed.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Unset = 0,
    AllowAny = 1,
    RegistryOnly = 2,
}

impl Mode {
    pub const fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::AllowAny,
            2 => Self::RegistryOnly,
            _ => Self::Unset,
        }
    }

    /// Verdict for a destination no entry matched.
    pub const fn fallback(self) -> Verdict {
        match self {
            Self::AllowAny => Verdict::Allow,
            Self::RegistryOnly | Self::Unset => Verdict::Deny,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A [`Mode`] as u32.
    pub mode: u32,
    /// Depth of the enforced cgroup below the cgroup2 root (0: the root, the whole host).
    pub cgroup_level: u32,
    /// Id (inode number) of the enforced cgroup. The TC programs judge only packets of sockets
    /// whose cgroup is it or below it; 0 means nothing is enforced there.
    pub cgroup_id: u64,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// The port the relay takes in a namespace it starts serving (where free): a steered connect
    /// from a namespace not served yet is pointed there and held. 0: no relay, such connects are
    /// refused.
    pub relay_port: u16,
    /// The first SYN timeout of a held connect, in jiffies (0: the kernel's, 1 s): short, so the
    /// connect goes on soon after the relay serves its namespace.
    pub held_syn_rto: u16,
    /// Cookie of the agent's own network namespace, where the TC programs are. Packets of sockets
    /// in other namespaces (a pod's, a container's) never pass them with their socket; the
    /// cgroup's packet programs judge those instead.
    pub netns_cookie: u64,
}

impl Config {
    /// Whether a socket in namespace `netns` (its cookie) is in the agent's own namespace, where
    /// the TC programs are; `None` while the agent has not said which namespace that is.
    pub const fn in_agent_netns(&self, netns: u64) -> Option<bool> {
        if self.netns_cookie == 0 {
            None
        } else {
            Some(self.netns_cookie == netns)
        }
    }
}

/// [`Config::flags`]: the socket hooks write no events and track no flows (decisions are
/// unchanged). Only the events benchmark's baseline sets it; zero, the default, reports.
pub const CONFIG_EVENTS_OFF: u32 = 1;

/// Slots in [`COUNTERS_MAP`]: [`COUNTER_LOST`], one per verdict value, [`COUNTER_UNTRACKED`],
/// [`COUNTER_FLOWS_OPENED`], [`COUNTER_FLOWS_CLOSED`].
pub const COUNTER_SLOTS: u32 = 7;
/// Events the programs could not write to the ring buffer (it was full).
pub const COUNTER_LOST: u32 = 0;
/// Flows the flow table had no room for: their connect has its record, their close none.
pub const COUNTER_UNTRACKED: u32 = 4;
/// Flows put in the flow table and taken out: the difference is how full it is.
pub const COUNTER_FLOWS_OPENED: u32 = 5;
pub const COUNTER_FLOWS_CLOSED: u32 = 6;

/// What an event reports. Stable numbers: they cross the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connect() judged by the connect4/connect6 hooks.
    Connect = 1,
    /// An unconnected sendmsg() judged by the sendmsg4/sendmsg6 hooks.
    Sendmsg = 2,
    /// A packet no socket hook judged (a raw socket's, say), judged by TC egress.
    Packet = 3,
    /// A tracked flow ended; carries its byte and packet totals.
    Close = 4,
    /// A socket option refused (see [`RULE_QDISC_BYPASS`], [`RULE_AF_XDP`]); no destination.
    Sockopt = 5,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Connect),
            2 => Some(Self::Sendmsg),
            3 => Some(Self::Packet),
            4 => Some(Self::Close),
            5 => Some(Self::Sockopt),
            _ => None,
        }
    }
}

/// One decision or flow end, as the programs write it to [`EVENTS_MAP`]. Also the value of
/// [`FLOWS_MAP`], where the counters grow while the flow lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// A [`Verdict`] as u32.
    pub verdict: u32,
    /// See `RULE_*` and the agent's rule table.
    pub rule_id: u32,
    /// Process id (the kernel's tgid); 0 when the program cannot know it (TC).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Interface index, for events from TC; 0 otherwise.
    pub ifindex: u32,
    /// IP protocol number.
    pub proto: u8,
    /// 4 or 6: the family of the socket call (an IPv4-mapped address on an IPv6 socket is 6).
    pub family: u8,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub pad: u16,
    pub cgroup_id: u64,
    /// Socket cookie; 0 when the packet had no socket.
    pub cookie: u64,
    /// CLOCK_BOOTTIME of the event.
    pub time_ns: u64,
    /// CLOCK_BOOTTIME of the flow's connect, for [`EventKind::Close`].
    pub start_ns: u64,
    /// L4 payload bytes (TCP: each sequence byte once, retransmissions aside) and packets (GSO
    /// segments counted one by one, retransmitted ones too) the cgroup's packet programs saw.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
    /// Addresses in network order, IPv4 mapped into IPv6; the source is zero until known.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// The task's comm, NUL padded.
    pub comm: [u8; 16],
    /// For a flow: the connect() calls it stands for. A socket connected again to the same
    /// destination with the same verdict and rule (a UDP client's reconnect loop) adds one here
    /// instead of writing another connect and close; the close reports the total. 1 in a connect
    /// or sendmsg event, 0 in a packet event.
    pub connects: u64,
}

/// A tracked flow, the value of [`FLOWS_MAP`]: its connect event, whose counters the cgroup's
/// packet programs grow, and how far each direction's TCP sequence has been counted, so that a
/// retransmitted segment adds no bytes a second time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub event: FlowEvent,
    /// Sequence number after the last payload byte counted out, and in (a u32 held in a u64: the
    /// programs move it by compare-and-swap, which BPF has for 64 bits only on every CPU version).
    pub next_seq_out: u64,
    pub next_seq_in: u64,
    /// Whether `next_seq_out` and `next_seq_in` hold a value yet. One byte each: the two
    /// directions are counted on different CPUs, so they never share a word they write.
    pub seq_out_known: u8,
    pub seq_in_known: u8,
    pub pad: [u8; 6],
}

/// The original destination of a steered connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steered {
    /// Network order, IPv4 mapped into IPv6.
    pub dst_addr: [u8; 16],
    pub dst_port_be: u16,
    /// 4 or 6: the family of the connect call.
    pub family: u8,
    pub pad: u8,
    pub rule_id: u32,
    /// The client socket's cookie.
    pub cookie: u64,
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
    /// The interface the client's socket was bound to (SO_BINDTODEVICE), or 0. The kernel lifts
    /// the binding so the socket reaches the relay on loopback; the relay's upstream connection
    /// takes it over.
    pub bound_if: u32,
    /// Non-zero while the relay did not serve the client's namespace when it connected: the relay
    /// port the connect was pointed at there ([`Config::relay_port`]). Its SYN is dropped (and
    /// retried by TCP) until the relay serves that namespace on that port.
    pub held_port: u16,
    /// The relay port the connect was pointed at: a later connect of the same socket elsewhere
    /// (after this one failed before TCP took a port) shows the record to be stale.
    pub relay_port: u16,
    /// The cookie of the client's network namespace, where the relay listens for it.
    pub netns: u64,
    /// 0 while the client's socket is open. Set (CLOCK_BOOTTIME ns) in the relay's record when it
    /// closed having sent nothing, before the relay may have taken the connection: the relay
    /// never serves such a record, it only names whom it refuses, and removes it.
    pub closed_ns: u64,
}

/// A steered connect waits in network namespace `netns`, which the relay does not serve yet;
/// `pid`/`tid` is the thread that made it (in that namespace at the time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayWanted {
    pub netns: u64,
    pub pid: u32,
    pub tid: u32,
}

/// The client's end of a steered connection: its local address and port, in its network
/// namespace (two namespaces may hold the same address and port), and the relay's port it
/// connected to (one address and port may connect to two of the relay's workers at once).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayPeer {
    /// Network order, IPv4 mapped into IPv6.
    pub addr: [u8; 16],
    pub port_be: u16,
    /// The relay's port, host order.
    pub relay_port: u16,
    pub pad2: u32,
    /// Cookie of the namespace.
    pub netns: u64,
}

/// Whether an IPv6 (or IPv4-mapped) address is loopback or unspecified, which is not egress.
pub const fn is_local(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    let mut zero_prefix = true;
    while i < 10 {
        if addr[i] != 0 {
            zero_prefix = false;
        }
        i += 1;
    }
    if !zero_prefix {
        return false;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        // IPv4-mapped: 127.0.0.0/8 or 0.0.0.0.
        return addr[12] == 127
            || (addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0);
    }
    // ::1 or ::
    addr[10] == 0
        && addr[11] == 0
        && addr[12] == 0
        && addr[13] == 0
        && addr[14] == 0
        && (addr[15] == 1 || addr[15] == 0)
}

/// IPv4 address (network order bytes) as its IPv4-mapped IPv6 form.
pub const fn map_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

const _: () = {
    assert!(core::mem::size_of::<PolicyKey>() == 20);
    assert!(core::mem::align_of::<PolicyKey>() == 2);
    assert!(core::mem::offset_of!(PolicyKey, proto) == 0);
    assert!(core::mem::offset_of!(PolicyKey, port_be) == 2);
    assert!(core::mem::offset_of!(PolicyKey, addr) == 4);
    assert!(core::mem::size_of::<PolicyValue>() == 8);
    assert!(core::mem::size_of::<Config>() == 32);
    assert!(core::mem::offset_of!(Config, netns_cookie) == 24);
    assert!(core::mem::offset_of!(Config, flags) == 16);
    assert!(core::mem::offset_of!(Config, cgroup_id) == 8);
    assert!(core::mem::offset_of!(Config, held_syn_rto) == 22);
    assert!(core::mem::size_of::<FlowEvent>() == 152);
    assert!(core::mem::offset_of!(FlowEvent, connects) == 144);
    assert!(core::mem::offset_of!(FlowEvent, proto) == 24);
    assert!(core::mem::offset_of!(FlowEvent, cgroup_id) == 32);
    assert!(core::mem::offset_of!(FlowEvent, src_addr) == 96);
    assert!(core::mem::offset_of!(FlowEvent, comm) == 128);
    assert!(core::mem::size_of::<Flow>() == 176);
    assert!(core::mem::size_of::<Steered>() == 88);
    assert!(core::mem::offset_of!(Steered, closed_ns) == 80);
    assert!(core::mem::offset_of!(Steered, netns) == 72);
    assert!(core::mem::offset_of!(Steered, cookie) == 24);
    assert!(core::mem::offset_of!(Steered, held_port) == 68);
    assert!(core::mem::size_of::<RelayWanted>() == 16);
    assert!(core::mem::size_of::<RelayPeer>() == 32);
    assert!(core::mem::size_of::<RelayPorts>() == 2 * RELAY_WORKERS_MAX + 2);
    assert!(core::mem::offset_of!(RelayPeer, netns) == 24);
    assert!(KEY_FIXED_BITS as usize == core::mem::offset_of!(PolicyKey, addr) * 8);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, and have no padding (asserted above), so every bit pattern
    // the kernel hands back is a valid value.
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Steered {}
    unsafe impl aya::Pod for super::RelayPeer {}
    unsafe impl aya::Pod for super::RelayWanted {}
    unsafe impl aya::Pod for super::RelayPorts {}
}
