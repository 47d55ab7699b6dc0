//! Writing events to the ring buffer, and the flow table that turns a connect and its packets into
//! a close event with totals.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns,
        generated::bpf_get_current_cgroup_id,
    },
    maps::ring_buf::RingBufEntry,
};
use egress_common::{
    COUNTER_FLOWS_CLOSED, COUNTER_FLOWS_OPENED, COUNTER_LOST, COUNTER_UNTRACKED, EventKind, Flow,
    FlowEvent,
};

use crate::{COUNTERS, DENIALS, EVENTS, FLOWS, decide::Decision};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[inline(always)]
fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// Room for one event in the ring buffer; a full ring buffer is counted, never silent.
#[inline(always)]
pub fn reserve() -> Option<RingBufEntry<FlowEvent>> {
    let entry = EVENTS.reserve::<FlowEvent>(0);
    if entry.is_none() {
        count(COUNTER_LOST);
    }
    entry
}

/// Whether a submit wakes the agent. Not for every event: the agent drains the ring on a short
/// timer anyway, and a wakeup per event costs it a context switch per connection. Only once a
/// quarter of the ring is taken: then it must not wait for the timer, or the ring would fill.
#[inline(always)]
pub fn wakeup() -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if pending >= EVENTS.query(BPF_RB_RING_SIZE as u64) / 4 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Writes an event kept elsewhere (a map value); a full ring buffer is counted.
#[inline(always)]
fn emit(event: &FlowEvent) {
    if EVENTS.output::<FlowEvent>(event, wakeup()).is_err() {
        count(COUNTER_LOST);
    }
}

/// An event about the current task's socket call.
#[inline(always)]
pub fn from_task(
    kind: EventKind,
    decision: Decision,
    proto: u8,
    family: u8,
    dst_port_be: u16,
    dst_addr: [u8; 16],
    cookie: u64,
) -> FlowEvent {
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = now_ns();
    FlowEvent {
        kind: kind as u32,
        verdict: decision.verdict as u32,
        rule_id: decision.rule_id,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        ifindex: 0,
        proto,
        family,
        src_port_be: 0,
        dst_port_be,
        pad: 0,
        // SAFETY: no arguments; allowed in cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        time_ns: now,
        start_ns: now,
        bytes_out: 0,
        bytes_in: 0,
        packets_out: 0,
        packets_in: 0,
        src_addr: [0; 16],
        dst_addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        connects: 1,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Starts tracking a permitted connect. A socket connected again reports its previous flow first
/// (`earlier`, from [`reconnect`]). `cookie` is the event's, passed on the stack: the verifier
/// refuses a key and a value that both point into one ring buffer entry ("more than one arg with
/// ref_obj_id").
#[inline(always)]
pub fn open_flow(cookie: u64, event: &FlowEvent, earlier: Earlier) {
    if matches!(earlier, Earlier::Other) {
        close_flow(cookie);
    }
    let flow = Flow {
        event: *event,
        next_seq_out: 0,
        next_seq_in: 0,
        seq_out_known: 0,
        seq_in_known: 0,
        pad: [0; 6],
    };
    // A full table: the flow's connect has its record, its close will have none.
    if FLOWS.insert(&cookie, &flow, 0).is_ok() {
        count(COUNTER_FLOWS_OPENED);
    } else {
        count(COUNTER_UNTRACKED);
    }
}

/// A socket's tracked flow, as an allowed connect finds it.
#[derive(Clone, Copy)]
pub enum Earlier {
    /// None: the socket's first connect, mostly.
    None,
    /// To this same destination under this same rule: the connect is counted in it.
    Same,
    /// Elsewhere: it ends when the new one opens.
    Other,
}

/// The socket's tracked flow against this connect; one to the same destination under the same
/// rule counts the connect. A UDP client may connect its socket again before every datagram:
/// one flow with a count, not a connect and a close per call. Only an allowed connect gets here,
/// and a flow is only ever opened by one, so the verdict matches too.
#[inline(always)]
pub fn reconnect(cookie: u64, proto: u8, port_be: u16, addr: &[u8; 16], rule_id: u32) -> Earlier {
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return Earlier::None;
    };
    // SAFETY: a valid map value; `connects` is added to atomically (two threads may share the
    // socket), the rest was written once when the flow was opened.
    unsafe {
        let event = &raw mut (*flow).event;
        if !same_call(event, proto, port_be, addr, rule_id) {
            return Earlier::Other;
        }
        add(&raw mut (*event).connects, 1);
    }
    Earlier::Same
}

/// Whether `event` was about this destination under this rule.
///
/// # Safety
/// `event` points to a valid FlowEvent (a map value).
#[inline(always)]
unsafe fn same_call(
    event: *const FlowEvent,
    proto: u8,
    port_be: u16,
    addr: &[u8; 16],
    rule_id: u32,
) -> bool {
    // SAFETY: as the caller promises.
    unsafe {
        (*event).proto == proto
            && (*event).dst_port_be == port_be
            && (*event).rule_id == rule_id
            && same_addr(&(*event).dst_addr, addr)
    }
}

/// How long a socket's denial folds the same call denied again: a loop retrying a denied
/// destination writes about two records a second, not one per call, and the log still shows
/// every second that it goes on.
const DENIAL_FOLD_NS: u64 = 1_000_000_000;

/// Whether the socket's last denied call, within [`DENIAL_FOLD_NS`], was this same call (kind,
/// destination, rule); if so it is counted in that denial. Otherwise the denial is closed and the
/// call gets its own record. A deny flood from one socket then cannot fill the ring buffer and
/// crowd out other records; every call is still counted (`connects` in the denial's close).
#[inline(always)]
pub fn deny_again(
    cookie: u64,
    kind: EventKind,
    proto: u8,
    port_be: u16,
    addr: &[u8; 16],
    rule_id: u32,
) -> bool {
    let Some(denial) = DENIALS.get_ptr_mut(&cookie) else {
        return false;
    };
    // SAFETY: a valid map value; `connects` is added to atomically (two threads may share the
    // socket), the rest was written once when the denial was opened.
    unsafe {
        if (*denial).kind == kind as u32
            && same_call(denial, proto, port_be, addr, rule_id)
            && now_ns().wrapping_sub((*denial).start_ns) < DENIAL_FOLD_NS
        {
            add(&raw mut (*denial).connects, 1);
            return true;
        }
    }
    close_denial(cookie);
    false
}

/// Remembers a denied call's event, to fold the same call denied again into it.
#[inline(always)]
pub fn open_denial(cookie: u64, event: &FlowEvent) {
    // A full table: nothing is folded into this denial, the same call again gets its own record.
    let _ = DENIALS.insert(&cookie, event, 0);
}

/// Ends the socket's denial: when calls were folded into it, a `close` with their count.
#[inline(always)]
pub fn close_denial(cookie: u64) {
    let Some(denial) = DENIALS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: a valid map value.
    let denial = unsafe { &mut *denial };
    if denial.connects > 1 {
        denial.kind = EventKind::Close as u32;
        denial.time_ns = now_ns();
        emit(denial);
    }
    let _ = DENIALS.remove(&cookie);
}

/// Two addresses compared as two words: a slice comparison would call memcmp, which BPF lacks.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let word = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    word(a, 0) == word(b, 0) && word(a, 8) == word(b, 8)
}

/// Reports a tracked flow's end with its totals and forgets it. The event is written from the
/// map value itself, turned into a close event in place: no copy on the stack.
#[inline(always)]
pub fn close_flow(cookie: u64) {
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: a valid map value; a packet program may still add to its counters, a benign race.
    let flow = unsafe { &mut (*flow).event };
    flow.kind = EventKind::Close as u32;
    flow.time_ns = now_ns();
    emit(flow);
    if FLOWS.remove(&cookie).is_ok() {
        count(COUNTER_FLOWS_CLOSED);
    }
}

/// Atomic add: every CPU may count the same flow. core's AtomicU64 has no fetch_add on BPF (no
/// compare-and-swap there), so the intrinsic it would use, as aya's own tests do.
#[inline(always)]
pub unsafe fn add(counter: *mut u64, n: u64) {
    // SAFETY: the caller passes an aligned u64 inside a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}
