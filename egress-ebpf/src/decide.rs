//! The decision: loopback, then one LPM lookup, then the mode. See `egress_common::PolicyKey` for
//! the match precedence.
use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    KEY_FIXED_BITS, Mode, PolicyKey, PolicyValue, RULE_LOOPBACK, RULE_MODE, Verdict, is_local,
};

use crate::{CONFIG, COUNTERS, POLICY};

/// A verdict with the rule that gave it.
#[derive(Clone, Copy)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule_id: u32,
}

/// Decision for a destination, counted.
#[inline(always)]
pub fn judge(proto: u8, port_be: u16, addr: [u8; 16]) -> Decision {
    let decision = lookup(proto, port_be, addr);
    count(decision.verdict);
    decision
}

/// Counts a decision with verdict `verdict`.
#[inline(always)]
pub fn count(verdict: Verdict) {
    if let Some(slot) = COUNTERS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// Decision for a destination, not counted.
#[inline(always)]
pub fn lookup(proto: u8, port_be: u16, addr: [u8; 16]) -> Decision {
    if is_local(&addr) {
        return Decision {
            verdict: Verdict::Allow,
            rule_id: RULE_LOOPBACK,
        };
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
    if let Some(&PolicyValue { verdict, rule_id }) = POLICY.get(&key) {
        // An unknown verdict value is a corrupt entry: deny rather than guess.
        return Decision {
            verdict: Verdict::from_u32(verdict).unwrap_or(Verdict::Deny),
            rule_id,
        };
    }
    let mode = match CONFIG.get(0) {
        Some(config) => Mode::from_u32(config.mode),
        None => Mode::Unset,
    };
    Decision {
        verdict: mode.fallback(),
        rule_id: RULE_MODE,
    }
}

/// What a cgroup sock_addr program returns: 1 lets the call proceed, 0 fails it with EPERM.
#[inline(always)]
pub fn hook_return(verdict: Verdict) -> i32 {
    if verdict.permits() { 1 } else { 0 }
}
