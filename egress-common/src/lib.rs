//! Types shared by the eBPF programs and the agent. Every type here crosses the kernel boundary:
//! `#[repr(C)]`, no implicit padding, byte order in field names, layouts asserted below.
#![no_std]

/// Name of the policy LPM trie. A change to [`PolicyKey`] or [`PolicyValue`] gets a new version.
pub const POLICY_MAP: &str = "EGRESS_POLICY_V1";
/// Name of the single-entry [`Config`] array.
pub const CONFIG_MAP: &str = "EGRESS_CONFIG_V1";
/// Name of the per-CPU decision counters, indexed by [`Verdict`].
pub const COUNTERS_MAP: &str = "EGRESS_COUNTERS_V1";

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
    /// Routed through the gateway relay. Until the relay exists, allowed directly.
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
    pub pad: u32,
}

/// Counter slots in [`COUNTERS_MAP`]: one per verdict value, slot 0 unused.
pub const COUNTER_SLOTS: u32 = 4;

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
    assert!(core::mem::size_of::<Config>() == 8);
    assert!(KEY_FIXED_BITS as usize == core::mem::offset_of!(PolicyKey, addr) * 8);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), Copy, and have no padding (asserted above), so every bit pattern
    // the kernel hands back is a valid value.
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::Config {}
}
