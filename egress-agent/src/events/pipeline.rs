//! From the ring buffer to the log, on one thread: the writer drains the ring buffer every
//! [`READ_INTERVAL`] while events come (less often while none do, see [`read_interval`]), makes
//! the events records, counts them in the metrics and writes them, beside the records others send
//! it (the relay's) through a bounded channel. It runs at a priority that yields to everything
//! else while traffic is light (see [`Priority`]), so the agent's work per event waits for CPU
//! time no workload thread and no relayed connection wants. A task on the runtime lifts it and
//! wakes it when the kernel wakes the ring's waiters (a quarter of the ring taken), and when
//! events wait and it is [`STALL`] past the end of its nap. When the writer falls behind, the
//! ring fills and the kernel counts what it cannot write; those counts are reported as `lost`
//! records. Nothing grows without bound, nothing is silent.
use std::{
    collections::VecDeque,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use egress_common::{EventKind, FlowEvent, Verdict};
use jiff::Timestamp;
use nix::time::{ClockId, clock_gettime};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    Catalog, CgroupNames, LogWriter, Record,
    priority::{Priority, STALL},
};
use crate::{agent::Status, maps::Counters};

/// Records from elsewhere in flight to the writer, and the most it takes of them, and of the
/// kernel's events, in one pass.
const CHANNEL: usize = 1024;
/// How long a written record may wait in the writer's buffer, and how often kernel losses are
/// reported. Waking for each event would cost a context switch per connection (see `wakeup` in
/// the programs); a lone event is still in the file well within a second.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// How often the writer drains the ring buffer while events come (losses are reported at
/// [`DRAIN_INTERVAL`]). Short, so that each pass is short and its events are still in the CPU's
/// caches when they are made records (`cargo xtask bench relay`: lower proxy CPU per connection
/// than at 100 ms in six alternating pairs of seven; round medians 80–91 µs against 82–95).
const READ_INTERVAL: Duration = Duration::from_millis(10);
/// How often the runtime looks whether the writer starves at `SCHED_IDLE`: events wait in the
/// ring and it is [`STALL`] past the end of its nap. Then it is lifted (see [`Priority`]). Less
/// often while the ring was found empty, so that an idle agent seldom wakes for it.
const STARVING_CHECK: Duration = Duration::from_millis(100);
const STARVING_CHECK_IDLE: Duration = Duration::from_millis(500);

/// The writer's next pause after one of `last`: [`READ_INTERVAL`] once a drain found events, else
/// twice the last, up to [`DRAIN_INTERVAL`]. An idle agent then wakes ten times a second, not a
/// hundred; the first events after a quiet spell wait at most that long, and a burst wakes the
/// writer at once (the kernel's wakeup).
fn read_interval(last: Duration, found: bool) -> Duration {
    if found {
        READ_INTERVAL
    } else {
        (last * 2).min(DRAIN_INTERVAL)
    }
}

/// What others send the writer: a record made elsewhere.
enum Entry {
    /// Boxed: a record is four times an event's size.
    Record(Box<Record>),
    /// A relay's record (see [`Records::send_relay`]).
    Relay(Box<Record>, Relayed),
}

/// The kernel's side of a relayed connection, for the writer to put its relay record after the
/// connection's `connect` record.
#[derive(Clone, Copy)]
pub struct Relayed {
    /// The client socket's cookie, as its `connect` event has it.
    pub cookie: u64,
    /// When the relay took the connection.
    pub taken: Instant,
}

/// Sends records made elsewhere (the relay's) to the flow log; they are already counted in the
/// metrics.
#[derive(Clone)]
pub struct Records {
    tx: mpsc::Sender<Entry>,
    priority: Arc<Priority>,
}

impl Records {
    /// Waits while the writer is behind. False once the log is closed.
    pub async fn send(&self, record: Record) -> bool {
        self.hand_on(Entry::Record(Box::new(record))).await
    }

    /// A relayed connection's record, written after the `connect` record of `relayed`: the relay
    /// sends it as the connection ends, often before the writer has drained that connect.
    pub async fn send_relay(&self, record: Record, relayed: Relayed) -> bool {
        self.hand_on(Entry::Relay(Box::new(record), relayed)).await
    }

    /// Sends `entry` to the writer, waiting while it is behind; while the queue stays full, the
    /// writer is lifted whatever its flag says (see [`Priority`]) every [`STALL`]. False once the
    /// writer is gone.
    async fn hand_on(&self, entry: Entry) -> bool {
        self.lift_if_behind();
        let entry = match self.tx.try_send(entry) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(entry)) => entry,
        };
        loop {
            match tokio::time::timeout(STALL, self.tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(entry);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) => self.priority.lift_anyway(),
            }
        }
    }

    /// A writer yielding the CPU with the queue half full is falling behind: it is lifted (and
    /// woken from its nap) before the queue fills and senders wait (the relay's connections among
    /// them).
    fn lift_if_behind(&self) {
        if self.tx.capacity() < CHANNEL / 2 {
            self.priority.lift();
        }
    }
}

/// How long a relay record waits for its connection's `connect` record, from when the relay took
/// the connection: far longer than an event waits in the ring buffer (the writer drains it every
/// [`READ_INTERVAL`]). A connection that lasted longer had its connect written long before; an
/// event that never comes (lost to a full ring) holds its relay record no longer.
const CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Puts each relay record after its connection's `connect` record.
#[derive(Default)]
struct Order {
    /// Steered connects written within [`CONNECT_WAIT`] whose relay record has not come, by
    /// cookie (a socket's, so each connects once).
    connects: foldhash::HashSet<u64>,
    /// When each of them was written, oldest first, to forget them.
    written: VecDeque<(Instant, u64)>,
    /// Relay records waiting for their connect, by cookie, with when they stop waiting.
    held: foldhash::HashMap<u64, (Box<Record>, Instant)>,
}

impl Order {
    /// A steered connect was just written: its relay record, if it waits, goes now.
    fn connect_written(&mut self, cookie: u64, now: Instant, put: impl FnOnce(&Record)) {
        match self.held.remove(&cookie) {
            Some((record, _)) => put(&record),
            None => {
                self.connects.insert(cookie);
                self.written.push_back((now, cookie));
            }
        }
    }

    /// A relay record came: written now if its connect was, or long ago; else held.
    fn relay(
        &mut self,
        record: Box<Record>,
        relayed: Relayed,
        now: Instant,
        put: impl FnOnce(&Record),
    ) {
        let until = relayed.taken + CONNECT_WAIT;
        if self.connects.remove(&relayed.cookie) || until <= now {
            put(&record);
        } else {
            self.held.insert(relayed.cookie, (record, until));
        }
    }

    /// Forgets the connects written too long ago to wait for, and writes the relay records that
    /// have waited long enough (`None`: all of them, at the end).
    fn expire(&mut self, now: Option<Instant>, mut put: impl FnMut(&Record)) {
        while let Some(&(at, cookie)) = self.written.front() {
            if now.is_some_and(|now| now.saturating_duration_since(at) < CONNECT_WAIT) {
                break;
            }
            self.written.pop_front();
            self.connects.remove(&cookie);
        }
        let mut due: Vec<_> = self
            .held
            .extract_if(|_, (_, until)| now.is_none_or(|now| *until <= now))
            .map(|(_, held)| held)
            .collect();
        due.sort_by_key(|(_, until)| *until);
        for (record, _) in due {
            put(&record);
        }
    }

    /// When the next held record stops waiting.
    fn deadline(&self) -> Option<Instant> {
        self.held.values().map(|(_, until)| *until).min()
    }
}

pub struct Pipeline {
    /// Tells the writer to drain the ring to the end and finish.
    stop: Arc<AtomicBool>,
    /// For records from elsewhere (the relay); the writer ends once every sender is gone.
    records: Records,
    cgroups: Arc<Mutex<CgroupNames>>,
    writer: std::thread::JoinHandle<()>,
    watcher: JoinHandle<()>,
}

/// What the kernel could not record, carried into the metrics: lost events (polled on their own
/// schedule too, so the metrics show a loss while the pipeline itself is backed up) and flows the
/// flow table had no room for.
struct Lost {
    counters: Counters,
    seen: Mutex<u64>,
    status: Arc<Status>,
}

impl Lost {
    /// The kernel's total; the metrics catch up with it.
    fn poll(&self) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match self.counters.events_lost() {
            Ok(total) if total > *seen => {
                self.status.events_lost.inc_by(total - *seen);
                *seen = total;
            }
            Ok(_) => {}
            Err(e) => log::error!("reading the lost-event counter: {e}"),
        }
        *seen
    }

    /// The flow table: how full it is, and the flows it had no room for since `seen` (counted,
    /// and logged once a poll).
    fn poll_flows(&self, seen: &mut u64) {
        match self.counters.flows_open() {
            Ok(open) => {
                self.status
                    .flows_open
                    .set(i64::try_from(open).unwrap_or(i64::MAX));
            }
            Err(e) => log::error!("reading the flow table's counters: {e}"),
        }
        match self.counters.flows_untracked() {
            Ok(total) if total > *seen => {
                let new = total - *seen;
                self.status.flows_untracked.inc_by(new);
                log::warn!(
                    "the kernel's flow table is full: {new} more flows untracked (each has its \
                     connect record but will have no close, nor bytes counted)"
                );
                *seen = total;
            }
            Ok(_) => {}
            Err(e) => log::error!("reading the untracked-flow counter: {e}"),
        }
    }
}

impl Pipeline {
    pub fn spawn(
        ring: RingBuf<MapData>,
        counters: Counters,
        catalog: watch::Receiver<Arc<Catalog>>,
        cgroups: CgroupNames,
        log: Option<LogWriter>,
        status: Arc<Status>,
    ) -> std::io::Result<Pipeline> {
        // The writer drains the ring; the runtime only hears the kernel's wakeups, on a
        // descriptor of its own for the same ring.
        let copy = ring.as_fd().try_clone_to_owned()?;
        // SAFETY: `copy` owns its descriptor and keeps it open, unreplaced, while AsyncFd owns it.
        let woken = unsafe { AsyncFd::register_with_interest(copy, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let cgroups = Arc::new(Mutex::new(cgroups));
        let stop = Arc::new(AtomicBool::new(false));
        let priority = Arc::new(Priority::new(
            status.log_writer_lifted.clone(),
            status.log_writer_yielding.clone(),
        ));
        let start = counters.events_lost().unwrap_or(0);
        let lost = Arc::new(Lost {
            counters,
            seen: Mutex::new(start),
            status: Arc::clone(&status),
        });
        let writer = Writer {
            ring,
            rx,
            out: Out {
                log,
                unflushed: None,
            },
            enricher: Enricher {
                catalog,
                cgroups: Arc::clone(&cgroups),
            },
            status,
            lost: Arc::clone(&lost),
            lost_logged: start,
            priority: Arc::clone(&priority),
            stop: Arc::clone(&stop),
        };
        // A thread of its own: its scheduling policy changes (see [`Priority`]).
        let writer = std::thread::Builder::new()
            .name("egress-log".into())
            .spawn(move || writer.run())?;
        let p = Arc::clone(&priority);
        let watcher = tokio::spawn(async move {
            let mut woken = Some(woken);
            let mut counters = tokio::time::interval(Duration::from_secs(1));
            let check = tokio::time::sleep(STARVING_CHECK_IDLE);
            tokio::pin!(check);
            let mut untracked = lost.counters.flows_untracked().unwrap_or(0);
            loop {
                tokio::select! {
                    Some(ready) = async { Some(woken.as_ref()?.readable().await) } => {
                        match ready {
                            // A quarter of the ring is taken: the writer must not wait for CPU
                            // time others leave, nor for the end of its nap.
                            Ok(mut guard) => {
                                guard.clear_ready();
                                p.lift_anyway();
                            }
                            Err(e) => {
                                log::error!(
                                    "waiting on the event ring buffer: {e}; the flow-log writer \
                                     drains it on its timer only"
                                );
                                woken = None;
                            }
                        }
                    }
                    () = &mut check => {
                        let waiting = woken.as_ref().is_none_or(has_events);
                        if waiting && p.overdue() >= STALL {
                            p.lift_anyway();
                        }
                        let next = if waiting { STARVING_CHECK } else { STARVING_CHECK_IDLE };
                        check.as_mut().reset(tokio::time::Instant::now() + next);
                    }
                    _ = counters.tick() => {
                        lost.poll();
                        lost.poll_flows(&mut untracked);
                    }
                }
            }
        });
        Ok(Pipeline {
            stop,
            records: Records { tx, priority },
            cgroups,
            writer,
            watcher,
        })
    }

    /// A sender of records to the log, beside the kernel's.
    pub fn records(&self) -> Records {
        self.records.clone()
    }

    /// The cgroup names the writer uses, for records from elsewhere.
    pub fn cgroup_names(&self) -> Arc<Mutex<CgroupNames>> {
        Arc::clone(&self.cgroups)
    }

    /// Drains what the kernel wrote so far, writes it, and stops. Other senders must be gone.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (closed, _) = mpsc::channel(1);
        let priority = Arc::clone(&self.records.priority);
        // What is left is written at once, not in CPU time others leave.
        priority.lift_anyway();
        drop(std::mem::replace(
            &mut self.records,
            Records {
                tx: closed,
                priority,
            },
        ));
        let writer = self.writer;
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => log::error!("the event writer panicked"),
            Err(e) => log::error!("the event writer ended abnormally: {e}"),
        }
        self.watcher.abort();
    }
}

/// Whether events wait in the ring (its poll is level-triggered on the data there).
fn has_events(ring: &AsyncFd<std::os::fd::OwnedFd>) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        ring.get_ref().as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// CLOCK_REALTIME minus CLOCK_BOOTTIME, to date the kernel's boot-time stamps. Taken per batch:
/// the wall clock may be stepped.
fn boot_to_wall() -> i128 {
    let ns = |id| {
        clock_gettime(id).map_or(0, |t| {
            t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
        })
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME)
}

fn wall(boot_ns: u64, offset: i128) -> Timestamp {
    Timestamp::from_nanosecond(boot_ns as i128 + offset).unwrap_or_else(|_| Timestamp::now())
}

/// After a pass this small (events and records together) the writer naps before it looks again
/// (see [`read_interval`]), so that events gather in the ring and records in the channel: waking
/// for each one would cost the relay a context switch per connection. Under load passes are
/// large and there is no nap.
const FEW: usize = CHANNEL / 4;

/// What only the agent knows of a kernel event: host, rule and cgroup path.
struct Enricher {
    catalog: watch::Receiver<Arc<Catalog>>,
    cgroups: Arc<Mutex<CgroupNames>>,
}

impl Enricher {
    /// `ev` as a record, dated by `offset` (see [`boot_to_wall`]).
    fn record(&self, ev: &FlowEvent, offset: i128, catalog: &Catalog) -> Record {
        let mut record = Record::from_kernel(ev, wall(ev.time_ns, offset));
        catalog.annotate(&mut record);
        record.cgroup = record.cgroup_id.and_then(|id| {
            self.cgroups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .name(id)
        });
        if ev.ifindex != 0 {
            record.iface = nix::net::if_::if_indextoname(ev.ifindex)
                .ok()
                .map(|n| n.to_string_lossy().into_owned());
        }
        record
    }
}

/// The flow log as the writer fills it: buffered, and flushed once the oldest unflushed record
/// is [`DRAIN_INTERVAL`] old, so a burst costs one write per batch and every record is on disk
/// within that interval.
struct Out {
    log: Option<LogWriter>,
    /// When the oldest record not yet flushed was written.
    unflushed: Option<Instant>,
}

impl Out {
    fn put(&mut self, status: &Status, record: &Record) {
        if let Some(out) = self.log.as_mut() {
            if let Err(e) = out.write(record) {
                failed(out, status, &e);
            }
            self.unflushed.get_or_insert_with(Instant::now);
        }
    }

    fn flush(&mut self, status: &Status) {
        if let Some(out) = self.log.as_mut()
            && let Err(e) = out.flush()
        {
            failed(out, status, &e);
        }
        self.unflushed = None;
    }

    /// When the buffered records are due on disk.
    fn due(&self) -> Option<Instant> {
        self.unflushed.map(|t| t + DRAIN_INTERVAL)
    }
}

/// The writer thread: drains the kernel's events, makes them records and counts them, and writes
/// them with every record sent to it.
struct Writer {
    ring: RingBuf<MapData>,
    rx: mpsc::Receiver<Entry>,
    out: Out,
    enricher: Enricher,
    status: Arc<Status>,
    lost: Arc<Lost>,
    /// The kernel's total of lost events as of the last `lost` record.
    lost_logged: u64,
    priority: Arc<Priority>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        self.priority.writer_started();
        let mut order = Order::default();
        let mut events: Vec<FlowEvent> = Vec::with_capacity(CHANNEL);
        let mut batch = Vec::with_capacity(CHANNEL);
        let mut every = READ_INTERVAL;
        let mut reported = Instant::now();
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            let now = Instant::now();
            order.expire(Some(now), |r| self.out.put(&self.status, r));
            if self.out.due().is_some_and(|due| due <= now) {
                self.out.flush(&self.status);
            }
            let more = self.drain(&mut events);
            while batch.len() < CHANNEL {
                match self.rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
            let got = events.len() + batch.len();
            self.take(&mut order, &mut events, &mut batch);
            if stopping || reported.elapsed() >= DRAIN_INTERVAL {
                reported = Instant::now();
                self.report_lost();
            }
            if stopping && !more {
                break;
            }
            let light = got < FEW;
            self.priority.after_batch(light);
            every = read_interval(every, got > 0);
            if light && !stopping {
                let wake = [self.out.due(), order.deadline()]
                    .into_iter()
                    .flatten()
                    .fold(Instant::now() + every, Instant::min);
                self.priority.next_batch_at(wake);
                std::thread::park_timeout(wake.saturating_duration_since(Instant::now()));
            } else {
                self.priority.next_batch_at(Instant::now());
            }
        }
        // The ring is drained; the other senders' records, until the last sender is gone.
        while self.rx.blocking_recv_many(&mut batch, CHANNEL) > 0 {
            self.take(&mut order, &mut events, &mut batch);
        }
        order.expire(None, |r| self.out.put(&self.status, r));
        self.out.flush(&self.status);
    }

    /// Copies up to [`CHANNEL`] events out of the ring. Returns whether there may be more.
    fn drain(&mut self, events: &mut Vec<FlowEvent>) -> bool {
        while events.len() < CHANNEL {
            let Some(item) = self.ring.next() else {
                return false;
            };
            if item.len() < size_of::<FlowEvent>() {
                log::warn!("short event of {} bytes ignored", item.len());
                continue;
            }
            // SAFETY: the programs write whole FlowEvents; read unaligned from the ring's bytes.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        true
    }

    /// Makes the kernel's events records and writes them, then the records sent.
    fn take(&mut self, order: &mut Order, events: &mut Vec<FlowEvent>, batch: &mut Vec<Entry>) {
        // Per pass: the wall clock may be stepped, and the policy reloaded.
        let offset = boot_to_wall();
        let catalog = Arc::clone(&self.enricher.catalog.borrow());
        let now = Instant::now();
        let (out, status) = (&mut self.out, &*self.status);
        for ev in events.drain(..) {
            let record = self.enricher.record(&ev, offset, &catalog);
            status.observe(&record);
            out.put(status, &record);
            if ev.kind == EventKind::Connect as u32 && ev.verdict == Verdict::Steer as u32 {
                order.connect_written(ev.cookie, now, |r| out.put(status, r));
            }
        }
        for entry in batch.drain(..) {
            match entry {
                Entry::Record(record) => out.put(status, &record),
                Entry::Relay(record, relayed) => {
                    order.relay(record, relayed, now, |r| out.put(status, r));
                }
            }
        }
    }

    fn report_lost(&mut self) {
        let total = self.lost.poll();
        if total > self.lost_logged {
            let lost = total - self.lost_logged;
            self.lost_logged = total;
            log::warn!("{lost} flow event(s) lost in the kernel: the ring buffer was full");
            let record = Record::lost(Timestamp::now(), lost, total);
            self.status.observe(&record);
            self.out.put(&self.status, &record);
        }
    }
}

/// Counted; only the first is logged (a full disk would flood the log).
fn failed(out: &LogWriter, status: &Status, e: &std::io::Error) {
    if status.log_errors.inc() == 0 {
        log::error!("writing {}: {e}", out.path().display());
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use jiff::Timestamp;

    use super::{CONNECT_WAIT, Order, READ_INTERVAL, Record, Relayed, read_interval};

    /// A relay record told apart by its pid.
    fn relay(pid: u32) -> Box<Record> {
        let mut record = Record::relay_unknown(Timestamp::now());
        record.pid = Some(pid);
        Box::new(record)
    }

    /// Short pauses while events come; doubling to the drain interval while none do.
    #[test]
    fn the_writer_waits_longer_while_no_event_comes() {
        let mut every = READ_INTERVAL;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            every = read_interval(every, false);
            pauses.push(every.as_millis());
        }
        assert_eq!(pauses, [20, 40, 80, 100, 100, 100]);
        assert_eq!(read_interval(every, true), READ_INTERVAL);
    }

    #[test]
    fn a_relay_record_follows_its_connect_whichever_comes_first() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let taken = |cookie, at| Relayed { cookie, taken: at };
        let mut order = Order::default();
        let mut out: Vec<String> = Vec::new();

        // The relay's record first: held until its connect is written, then right after it.
        order.relay(relay(1), taken(10, ms(0)), ms(2), |r| {
            out.push(format!("relay {:?}", r.pid));
        });
        assert!(out.is_empty());
        assert_eq!(order.deadline(), Some(t0 + CONNECT_WAIT));
        order.connect_written(11, ms(5), |r| out.push(format!("relay {:?}", r.pid)));
        assert!(out.is_empty(), "another connection's connect");
        order.connect_written(10, ms(9), |r| out.push(format!("relay {:?}", r.pid)));
        assert_eq!(out, ["relay Some(1)"]);

        // The connect first: its record goes at once.
        order.relay(relay(2), taken(11, ms(6)), ms(12), |r| {
            out.push(format!("relay {:?}", r.pid));
        });
        assert_eq!(out, ["relay Some(1)", "relay Some(2)"]);

        // A connection taken longer ago than the wait: its connect went long before.
        let late = t0 + CONNECT_WAIT + Duration::from_millis(1);
        order.relay(relay(3), taken(12, ms(0)), late, |r| {
            out.push(format!("relay {:?}", r.pid));
        });
        assert_eq!(out.len(), 3);

        // A connect that never comes holds its record only until the wait is over.
        order.relay(relay(4), taken(13, ms(20)), ms(21), |r| {
            out.push(format!("relay {:?}", r.pid));
        });
        order.expire(Some(ms(500)), |r| out.push(format!("relay {:?}", r.pid)));
        assert_eq!(out.len(), 3);
        order.expire(Some(ms(20) + CONNECT_WAIT), |r| {
            out.push(format!("relay {:?}", r.pid));
        });
        assert_eq!(out.last().map(String::as_str), Some("relay Some(4)"));
        assert_eq!(order.deadline(), None);

        // Connects are forgotten after the wait: a record for one is held, not matched.
        order.connect_written(14, ms(30), |_| unreachable!("nothing waits"));
        order.expire(Some(ms(30) + CONNECT_WAIT), |_| {
            unreachable!("nothing held")
        });
        assert!(order.connects.is_empty() && order.written.is_empty());

        // At the end everything held is written.
        order.relay(relay(5), taken(15, late), late, |_| unreachable!("held"));
        order.expire(None, |r| out.push(format!("relay {:?}", r.pid)));
        assert_eq!(out.last().map(String::as_str), Some("relay Some(5)"));
    }
}
