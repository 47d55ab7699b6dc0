//! From the ring buffer to the log: a reader task that drains the ring buffer every
//! [`READ_INTERVAL`] while events come (less often while none do, see [`read_interval`]), and at
//! once when the kernel wakes it (epoll on the ring) because the ring is filling up, and a writer
//! thread. The reader only copies the events out: it runs on a runtime worker, which relayed
//! connections wait behind. The writer makes them records, counts them in the metrics and writes
//! them, at a priority that yields to everything else while traffic is light (see [`Priority`]).
//! Between the two a bounded channel: when the writer falls behind, the reader stops draining, the
//! ring fills, and the kernel counts what it cannot write; those counts are reported as `lost`
//! records. Nothing grows without bound, nothing is silent.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use egress_common::{EventKind, FlowEvent, Verdict};
use jiff::Timestamp;
use nix::time::{ClockId, clock_gettime};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    Catalog, CgroupNames, LogWriter, Record,
    priority::{Priority, STALL},
};
use crate::{agent::Status, maps::Counters};

/// Events and records in flight between reader and writer.
const CHANNEL: usize = 1024;
/// Events the reader hands on before it looks whether it should stop.
const BATCH: usize = 256;
/// How long a written record may wait in the writer's buffer, and how often kernel losses are
/// reported. Waking for each event would cost a context switch per connection (see `wakeup` in
/// the programs); a lone event is still in the file well within a second.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// How often the reader drains the ring buffer (losses are reported at [`DRAIN_INTERVAL`]).
/// Short, so that each drain is short: a drain holds a runtime worker, which relayed connections
/// wait behind; and a small batch's events are still in the CPU's caches when the writer takes
/// them (`cargo xtask bench relay`: lower proxy CPU per connection than at 100 ms in six
/// alternating pairs of seven; round medians 80–91 µs against 82–95).
const READ_INTERVAL: Duration = Duration::from_millis(10);

/// The reader's next pause after one of `last`: [`READ_INTERVAL`] once a drain found events, else
/// twice the last, up to [`DRAIN_INTERVAL`]. An idle agent then wakes ten times a second, not a
/// hundred; the first events after a quiet spell wait at most that long, and a burst wakes the
/// reader at once (the kernel's wakeup).
fn read_interval(last: Duration, found: bool) -> Duration {
    if found {
        READ_INTERVAL
    } else {
        (last * 2).min(DRAIN_INTERVAL)
    }
}

/// What the writer takes: a kernel event, made a record there, or a record made elsewhere.
enum Entry {
    Kernel(FlowEvent),
    /// Boxed: a record is four times an event's size, and most entries are events.
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
    /// sends it as the connection ends, often before the reader has drained that connect.
    pub async fn send_relay(&self, record: Record, relayed: Relayed) -> bool {
        self.hand_on(Entry::Relay(Box::new(record), relayed)).await
    }

    /// Sends `entry` to the writer, waiting while it is behind. False once the writer is gone.
    async fn hand_on(&self, entry: Entry) -> bool {
        self.lift_if_behind();
        self.tx.send(entry).await.is_ok()
    }

    /// A writer yielding the CPU with the queue half full is falling behind: it is lifted before
    /// the queue fills and senders wait (the relay's connections among them).
    fn lift_if_behind(&self) {
        if self.tx.capacity() < CHANNEL / 2 {
            self.priority.lift();
        }
    }
}

/// How long a relay record waits for its connection's `connect` record, from when the relay took
/// the connection: far longer than an event waits in the ring buffer (the reader drains it every
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
    stop: Option<oneshot::Sender<()>>,
    /// For records from elsewhere (the relay); the writer ends once every sender is gone.
    records: Records,
    cgroups: Arc<Mutex<CgroupNames>>,
    reader: JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
    poller: JoinHandle<()>,
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

struct Reader {
    lost: Arc<Lost>,
    status: Arc<Status>,
    out: Records,
    /// The kernel's total as of the last `lost` record.
    lost_logged: u64,
    /// Events handed on so far.
    taken: u64,
    /// The writer's batch count as last seen, and since when.
    writer_seen: (u64, Instant),
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
        // SAFETY: the RingBuf owns its map fd and keeps it open, unreplaced, while AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let cgroups = Arc::new(Mutex::new(cgroups));
        let (stop, stop_rx) = oneshot::channel();
        let st = Arc::clone(&status);
        let handle = tokio::runtime::Handle::current();
        let enricher = Enricher {
            catalog,
            cgroups: Arc::clone(&cgroups),
        };
        let priority = Arc::new(Priority::new(
            status.log_writer_lifted.clone(),
            status.log_writer_yielding.clone(),
        ));
        let p = Arc::clone(&priority);
        // A thread of its own: its scheduling policy changes (see [`Priority`]).
        let writer = std::thread::Builder::new()
            .name("egress-log".into())
            .spawn(move || {
                let _in = handle.enter();
                write(rx, log, &enricher, &st, &handle, &p)
            })?;
        let start = counters.events_lost().unwrap_or(0);
        let lost = Arc::new(Lost {
            counters,
            seen: Mutex::new(start),
            status: Arc::clone(&status),
        });
        let l = Arc::clone(&lost);
        let poller = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut untracked = l.counters.flows_untracked().unwrap_or(0);
            loop {
                tick.tick().await;
                l.poll();
                l.poll_flows(&mut untracked);
            }
        });
        let records = Records { tx, priority };
        let reader = Reader {
            lost,
            status,
            out: records.clone(),
            lost_logged: start,
            taken: 0,
            writer_seen: (0, Instant::now()),
        };
        let reader = tokio::spawn(reader.run(fd, stop_rx));
        Ok(Pipeline {
            stop: Some(stop),
            records,
            cgroups,
            reader,
            writer,
            poller,
        })
    }

    /// A sender of records to the log, beside the kernel's.
    pub fn records(&self) -> Records {
        self.records.clone()
    }

    /// The cgroup names the reader uses, for records from elsewhere.
    pub fn cgroup_names(&self) -> Arc<Mutex<CgroupNames>> {
        Arc::clone(&self.cgroups)
    }

    /// Drains what the kernel wrote so far, writes it, and stops. Other senders must be gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (closed, _) = mpsc::channel(1);
        let priority = Arc::clone(&self.records.priority);
        // What is left is written at once, not in CPU time others leave.
        priority.lift();
        drop(std::mem::replace(
            &mut self.records,
            Records {
                tx: closed,
                priority,
            },
        ));
        if let Err(e) = (&mut self.reader).await {
            log::error!("event reader ended abnormally: {e}");
        }
        let writer = self.writer;
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => log::error!("the event writer panicked"),
            Err(e) => log::error!("the event writer ended abnormally: {e}"),
        }
        self.poller.abort();
    }
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

impl Reader {
    async fn run(mut self, mut fd: AsyncFd<RingBuf<MapData>>, mut stop: oneshot::Receiver<()>) {
        let mut every = READ_INTERVAL;
        let mut next = tokio::time::Instant::now() + every;
        let mut reported = tokio::time::Instant::now();
        loop {
            tokio::select! {
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        // Drained to empty before readiness is cleared; tokio keeps a readiness
                        // that arrives meanwhile.
                        while self.drain(guard.get_inner_mut()).await {}
                        guard.clear_ready();
                        self.watch_writer();
                        every = READ_INTERVAL;
                        next = tokio::time::Instant::now() + every;
                    }
                    Err(e) => {
                        log::error!("waiting on the event ring buffer: {e}; events stop");
                        break;
                    }
                },
                () = tokio::time::sleep_until(next) => {
                    let before = self.taken;
                    while self.drain(fd.get_mut()).await {}
                    self.watch_writer();
                    every = read_interval(every, self.taken > before);
                    next = tokio::time::Instant::now() + every;
                    if reported.elapsed() >= DRAIN_INTERVAL {
                        reported = tokio::time::Instant::now();
                        self.report_lost().await;
                    }
                }
                _ = &mut stop => {
                    while self.drain(fd.get_mut()).await {}
                    self.report_lost().await;
                    break;
                }
            }
        }
    }

    /// Hands on up to one batch. Returns whether there may be more.
    async fn drain(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        for _ in 0..BATCH {
            let Some(item) = ring.next() else {
                return false;
            };
            if item.len() < size_of::<FlowEvent>() {
                log::warn!("short event of {} bytes ignored", item.len());
                continue;
            }
            // SAFETY: the programs write whole FlowEvents; read unaligned from the ring's bytes.
            let ev: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            if !self.hand_on(Entry::Kernel(ev)).await {
                return false;
            }
            self.taken += 1;
        }
        true
    }

    /// As [`Records::hand_on`]; and while the queue stays full, the writer is lifted whatever its
    /// flag says (see [`Priority`]) every [`STALL`].
    async fn hand_on(&mut self, entry: Entry) -> bool {
        self.out.lift_if_behind();
        let entry = match self.out.tx.try_send(entry) {
            Ok(()) => {
                // As a send that waits would: a long drain gives the worker back to the relayed
                // connections now and then.
                tokio::task::coop::consume_budget().await;
                return true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(entry)) => entry,
        };
        let tx = self.out.tx.clone();
        loop {
            match tokio::time::timeout(STALL, tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(entry);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) => self.out.priority.lift_anyway(),
            }
        }
    }

    /// Lifts the writer's priority when records wait and it has taken none for [`STALL`].
    fn watch_writer(&mut self) {
        let batches = self.out.priority.batches();
        let waiting = self.out.tx.capacity() < self.out.tx.max_capacity();
        if batches != self.writer_seen.0 || !waiting {
            self.writer_seen = (batches, Instant::now());
        } else if self.writer_seen.1.elapsed() >= STALL {
            self.out.priority.lift_anyway();
            self.writer_seen = (batches, Instant::now());
        }
    }

    async fn report_lost(&mut self) {
        let total = self.lost.poll();
        if total > self.lost_logged {
            let lost = total - self.lost_logged;
            self.lost_logged = total;
            log::warn!("{lost} flow event(s) lost in the kernel: the ring buffer was full");
            let record = Record::lost(Timestamp::now(), lost, total);
            self.status.observe(&record);
            let _ = self.hand_on(Entry::Record(Box::new(record))).await;
        }
    }
}

/// After a batch this small the writer naps for [`NAP`] before it looks again, so that records
/// gather in the channel: waking for each one would cost the relay a context switch per
/// connection. Under load batches are large and there is no nap; a nap fills at most a quarter
/// of the channel at the rate that ended it.
const FEW: usize = CHANNEL / 4;
const NAP: Duration = Duration::from_millis(10);

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

/// The writer thread: makes the kernel's events records and counts them, and writes every
/// record; buffered, and flushed once the oldest unflushed record is [`DRAIN_INTERVAL`] old, so
/// a burst costs one write per batch and every record is on disk within that interval.
fn write(
    mut rx: mpsc::Receiver<Entry>,
    mut log: Option<LogWriter>,
    enricher: &Enricher,
    status: &Status,
    runtime: &tokio::runtime::Handle,
    priority: &Priority,
) {
    priority.writer_started();
    // When the oldest record not yet flushed was written.
    let mut unflushed: Option<Instant> = None;
    let put = |log: &mut Option<LogWriter>, unflushed: &mut Option<Instant>, record: &Record| {
        if let Some(out) = log.as_mut() {
            if let Err(e) = out.write(record) {
                failed(out, status, &e);
            }
            unflushed.get_or_insert_with(Instant::now);
        }
    };
    let mut order = Order::default();
    let mut batch = Vec::with_capacity(CHANNEL);
    loop {
        let now = Instant::now();
        order.expire(Some(now), |r| put(&mut log, &mut unflushed, r));
        if unflushed.is_some_and(|t| now.saturating_duration_since(t) >= DRAIN_INTERVAL) {
            flush(&mut log, status);
            unflushed = None;
        }
        let wake = unflushed
            .map(|t| t + DRAIN_INTERVAL)
            .into_iter()
            .chain(order.deadline())
            .min();
        let got = match wake {
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                match runtime.block_on(tokio::time::timeout(
                    left,
                    rx.recv_many(&mut batch, CHANNEL),
                )) {
                    Ok(got) => got,
                    Err(_) => continue,
                }
            }
            None => rx.blocking_recv_many(&mut batch, CHANNEL),
        };
        if got == 0 {
            break;
        }
        // Per batch: the wall clock may be stepped, and the policy reloaded.
        let offset = boot_to_wall();
        let catalog = Arc::clone(&enricher.catalog.borrow());
        let now = Instant::now();
        for entry in batch.drain(..) {
            match entry {
                Entry::Kernel(ev) => {
                    let record = enricher.record(&ev, offset, &catalog);
                    status.observe(&record);
                    put(&mut log, &mut unflushed, &record);
                    if ev.kind == EventKind::Connect as u32 && ev.verdict == Verdict::Steer as u32 {
                        order.connect_written(ev.cookie, now, |r| {
                            put(&mut log, &mut unflushed, r);
                        });
                    }
                }
                Entry::Record(record) => put(&mut log, &mut unflushed, &record),
                Entry::Relay(record, relayed) => {
                    order.relay(record, relayed, now, |r| put(&mut log, &mut unflushed, r));
                }
            }
        }
        priority.after_batch(got < FEW);
        if got < FEW {
            std::thread::sleep(NAP);
        }
    }
    order.expire(None, |r| put(&mut log, &mut unflushed, r));
    flush(&mut log, status);
}

fn flush(log: &mut Option<LogWriter>, status: &Status) {
    if let Some(out) = log.as_mut()
        && let Err(e) = out.flush()
    {
        failed(out, status, &e);
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
    fn the_reader_waits_longer_while_no_event_comes() {
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
