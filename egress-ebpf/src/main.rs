//! Kernel side of egress: cgroup sock_addr programs that allow, deny or steer every outbound
//! connect() and unconnected sendmsg() of the processes in the enforced cgroup.
#![no_std]
#![no_main]

mod decide;

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::{Array, LpmTrie, PerCpuArray},
    programs::SockAddrContext,
};
use egress_common::{COUNTER_SLOTS, Config, PolicyKey, PolicyValue, map_v4};

/// Entries are allocated on insert (LPM tries are never preallocated), so this is only a ceiling.
const POLICY_MAX_ENTRIES: u32 = 1 << 20;

#[map(name = "EGRESS_POLICY_V1")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);

#[map(name = "EGRESS_CONFIG_V1")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "EGRESS_COUNTERS_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide::hook_return(decide::judge(ctx.proto(), ctx.port_be(), ctx.addr4()))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide::hook_return(decide::judge(ctx.proto(), ctx.port_be(), ctx.addr6()))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide::hook_return(decide::judge(ctx.proto(), ctx.port_be(), ctx.addr4()))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide::hook_return(decide::judge(ctx.proto(), ctx.port_be(), ctx.addr6()))
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
