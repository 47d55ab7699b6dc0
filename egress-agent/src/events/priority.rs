//! The flow-log writer's CPU priority. While traffic is light the writer runs at `SCHED_IDLE`:
//! it works through each batch in time no other thread wants, and never holds up a relayed
//! connection. At its normal priority, each batch (gathered over a nap) took a CPU for long enough
//! to delay the connections that came meanwhile: in `cargo xtask bench relay` a third of the
//! relay's slowest 2 % of first bytes fell in step with the writer's naps (and moved with them
//! when the nap was changed), and none did at `SCHED_IDLE`.
//!
//! A thread at `SCHED_IDLE` can starve on busy CPUs, so:
//! - the writer yields only at a light batch that does not follow a heavy one (one gathered over
//!   a nap, or all there was), and takes back its fair share at a heavy batch;
//! - whoever sends it a record lifts it once the queue to it is half full (waiting 50 ms for that
//!   lost events in `cargo xtask bench events`; waiting for a full queue cost the relay's
//!   connection rate in four alternating pairs of four);
//! - a task at normal priority lifts it whatever its flag says when the kernel wakes the ring's
//!   waiters (a quarter of the ring taken) or events wait in the ring and it is [`STALL`] past
//!   the end of its nap, and a sender does when the queue stays full that long: a writer
//!   preempted between its switch to `SCHED_IDLE` and its flag can be at `SCHED_IDLE` with the
//!   flag saying otherwise (seen: a round of the events benchmark lost 65,000 events to it);
//! - a writer lifted for starving keeps its share for [`HOLD`];
//! - every lift wakes it from its nap.
//!
//! Lifting a thread from `SCHED_IDLE` needs CAP_SYS_NICE (or an RLIMIT_NICE that allows nice 0);
//! without it the writer stays at its normal priority throughout.
use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    },
    thread::Thread,
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

/// How long a sender waits on a full queue before it lifts the writer whatever its flag says: far
/// longer than a writer at its normal priority ever takes (its nap and a batch).
pub const STALL: Duration = Duration::from_millis(50);

/// How long a writer lifted for starving keeps its share before it may yield again, so that it
/// does not go back to starving at its next light batches. One lifted for a half-full queue is
/// not held: the traffic was heavy, and it yields again only at a light batch after a light one.
const HOLD: Duration = Duration::from_secs(1);

pub struct Priority {
    /// Whether the writer may go to `SCHED_IDLE`: whether it can be lifted back.
    allowed: bool,
    /// The writer thread's id, once it runs (0 before).
    tid: AtomicI32,
    /// The writer thread, to wake from its nap.
    thread: OnceLock<Thread>,
    /// Whether the writer may be at `SCHED_IDLE`: set before it asks for it.
    idle: AtomicBool,
    /// Whether its last batch was light.
    light: AtomicBool,
    /// When the writer means to take its next batch (ms since `epoch`): the end of its nap, or
    /// at once. Past it, with events waiting, it starves.
    due: AtomicU64,
    /// Until when (ms since `epoch`) a lifted writer keeps its share.
    held_until: AtomicU64,
    epoch: Instant,
    /// Lifts that found the writer at `SCHED_IDLE`.
    lifted: Counter,
    /// 1 while the writer is at `SCHED_IDLE`.
    yielding: Gauge,
}

impl Priority {
    pub fn new(lifted: Counter, yielding: Gauge) -> Priority {
        Priority {
            allowed: may_lift(),
            tid: AtomicI32::new(0),
            thread: OnceLock::new(),
            idle: AtomicBool::new(false),
            light: AtomicBool::new(true),
            due: AtomicU64::new(0),
            held_until: AtomicU64::new(0),
            epoch: Instant::now(),
            lifted,
            yielding,
        }
    }

    /// On the writer's thread, before its first batch.
    pub fn writer_started(&self) {
        self.tid
            .store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
        let _ = self.thread.set(std::thread::current());
    }

    /// On the writer's thread, after a batch: a heavy one takes its share back; a light one not
    /// right after a heavy one lets it yield, unless it was lifted lately. (A light batch right
    /// after a heavy one says nothing: the writer took it without a nap.)
    pub fn after_batch(&self, light: bool) {
        let was_light = self.light.swap(light, Ordering::Relaxed);
        let idle = match (light, was_light) {
            (false, _) => false,
            (true, false) => return,
            (true, true) => {
                self.allowed && self.held_until.load(Ordering::Relaxed) <= self.now_ms()
            }
        };
        if idle {
            if !self.idle.load(Ordering::SeqCst) {
                // Before the switch: from the switch on the writer may not run for a while.
                self.idle.store(true, Ordering::SeqCst);
                self.yielding.set(1);
                if !set_policy(0, true) {
                    self.idle.store(false, Ordering::SeqCst);
                    self.yielding.set(0);
                }
            }
        } else {
            // The kernel's word, not the flag's (see `lift_anyway`): one call a heavy batch.
            if is_idle(0) {
                set_policy(0, false);
            }
            self.idle.store(false, Ordering::SeqCst);
            self.yielding.set(0);
        }
    }

    /// On the writer's thread: when it means to take its next batch.
    pub fn next_batch_at(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.due.store(ms, Ordering::Relaxed);
    }

    /// How long the writer is past the time it meant to take its next batch.
    pub fn overdue(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.due.load(Ordering::Relaxed)),
        )
    }

    /// The writer is falling behind: if it yields, it gets its share back; if it naps, it wakes.
    /// From any thread; where it neither yields nor naps, a load, a swap and a return.
    pub fn lift(&self) {
        // One sender lifts; the others, seeing the flag down, go on.
        if self
            .idle
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            self.lift_now(false);
        }
        self.wake();
    }

    /// As [`Priority::lift`], whatever the flag says (the kernel's word on the writer's policy),
    /// and a writer found yielding is held for [`HOLD`]: it starves. (One at its normal priority,
    /// only slow on a loaded machine, is not held: it may yield at its next light batch.)
    pub fn lift_anyway(&self) {
        self.lift_now(true);
        self.wake();
    }

    fn wake(&self) {
        if let Some(writer) = self.thread.get() {
            writer.unpark();
        }
    }

    fn lift_now(&self, hold: bool) {
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 || !self.allowed {
            return;
        }
        if is_idle(tid) {
            if hold {
                // Before the switch, so that the writer cannot yield again in between.
                self.held_until
                    .store(self.now_ms() + HOLD.as_millis() as u64, Ordering::Relaxed);
            }
            if set_policy(tid, false) {
                self.lifted.inc();
            }
        }
        // A writer that yields again between the switch and this store is left with the flag
        // down: `lift` no longer sees it, `lift_anyway` still does.
        self.idle.store(false, Ordering::SeqCst);
        self.yielding.set(0);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Whether thread `tid` (0: the calling thread) is at `SCHED_IDLE`.
fn is_idle(tid: i32) -> bool {
    // SAFETY: no pointer arguments.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_IDLE }
}

/// Sets thread `tid`'s policy (0: the calling thread) to `SCHED_IDLE`, or back to `SCHED_OTHER`.
fn set_policy(tid: i32, idle: bool) -> bool {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param; an unknown or exited tid is an error, not undefined behaviour.
    let done = unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0;
    if !done {
        log::warn!(
            "the flow-log writer's scheduling policy: {}",
            std::io::Error::last_os_error()
        );
    }
    done
}

/// Whether this process may lift a thread from `SCHED_IDLE` to `SCHED_OTHER` at nice 0:
/// CAP_SYS_NICE in its effective set, or an RLIMIT_NICE of 20 or more.
fn may_lift() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let cap = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << CAP_SYS_NICE) != 0);
    let rlimit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE)
        .is_ok_and(|(soft, _)| soft >= 20);
    cap || rlimit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of(tid: i32) -> i32 {
        // SAFETY: no pointer arguments.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// The writer yields on light batches, takes its share back on a heavy one, and another
    /// thread lifts it and holds it there. Runs as root (CAP_SYS_NICE), as the agent
    /// does.
    #[test]
    fn writer_yields_while_light_and_is_lifted() {
        let p = Priority::new(Counter::default(), Gauge::default());
        assert!(p.allowed, "the unit tests run as root");
        let (yielded, lifted) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                p.writer_started();
                let tid = p.tid.load(Ordering::Relaxed);
                // A writer at its normal priority is not held by a lift.
                p.lift_anyway();
                p.after_batch(true);
                assert_eq!(policy_of(tid), libc::SCHED_IDLE);
                p.after_batch(false);
                assert_eq!(policy_of(tid), libc::SCHED_OTHER);
                p.after_batch(true);
                assert_eq!(policy_of(tid), libc::SCHED_OTHER, "light after heavy");
                p.after_batch(true);
                assert_eq!(policy_of(tid), libc::SCHED_IDLE);
                assert_eq!(p.yielding.get(), 1);
                yielded.wait();
                lifted.wait();
                // Lifted for a half-full queue: yields again at its next light batch.
                assert_eq!(policy_of(tid), libc::SCHED_OTHER);
                p.after_batch(true);
                assert_eq!(policy_of(tid), libc::SCHED_IDLE);
                yielded.wait();
                lifted.wait();
                // Lifted for starving: held.
                assert_eq!(policy_of(tid), libc::SCHED_OTHER);
                p.after_batch(true);
                p.after_batch(true);
                assert_eq!(policy_of(tid), libc::SCHED_OTHER, "held after the lift");
            });
            yielded.wait();
            p.lift();
            lifted.wait();
            yielded.wait();
            p.lift_anyway();
            lifted.wait();
            writer.join().expect("writer");
        });
        assert_eq!(p.lifted.get(), 2);
        assert_eq!(p.yielding.get(), 0);
    }
}
