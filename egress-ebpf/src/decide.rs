//! The decision: loopback, then one LPM lookup, then the mode. See `egress_common::PolicyKey` for
//! the match precedence.
use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{KEY_FIXED_BITS, Mode, PolicyKey, Verdict, is_local};

use crate::{CONFIG, COUNTERS, POLICY};

/// Verdict for a destination, counted.
#[inline(always)]
pub fn judge(proto: u8, port_be: u16, addr: [u8; 16]) -> Verdict {
    let verdict = lookup(proto, port_be, addr);
    if let Some(slot) = COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
    verdict
}

#[inline(always)]
fn lookup(proto: u8, port_be: u16, addr: [u8; 16]) -> Verdict {
    if is_local(&addr) {
        return Verdict::Allow;
    }
    let key = Key::new(
        KEY_FIXED_BITS + 128,
        PolicyKey {
            proto,
            pad: 0,
            port_be,
            addr,
        },
    );
    if let Some(value) = POLICY.get(&key) {
        // An unknown verdict value is a corrupt entry: deny rather than guess.
        return Verdict::from_u32(value.verdict).unwrap_or(Verdict::Deny);
    }
    let mode = match CONFIG.get(0) {
        Some(config) => Mode::from_u32(config.mode),
        None => Mode::Unset,
    };
    mode.fallback()
}

/// What a cgroup sock_addr program returns: 1 lets the call proceed, 0 fails it with EPERM.
#[inline(always)]
pub fn hook_return(verdict: Verdict) -> i32 {
    if verdict.permits() { 1 } else { 0 }
}
