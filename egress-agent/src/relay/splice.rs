//! One direction of a relayed connection moved socket → pipe → socket with splice(2): the bytes
//! stay in the kernel's pages and never cross into the relay's memory. The first bytes of each
//! direction are copied instead: most connections carry little, and for them a pipe (made,
//! filled, emptied and closed) costs more system calls than it saves copying. Without splice
//! (`RelayConfig::splice` off, for the benchmark's comparison) a direction is copied throughout.
//!
//! A direction that streams is woken in batches: see [`Batching`].
use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd as _, AsRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    sys::{
        socket::{MsgFlags, Shutdown, send, shutdown},
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    },
    unistd::pipe2,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};

use super::{Activity, set_int};

/// The pipe's capacity asked for: /proc/sys/fs/pipe-max-size by default.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// A default pipe's capacity, when the larger one is refused.
const CHUNK: usize = 64 << 10;
/// Bytes a direction copies before it takes a pipe.
const SPLICE_AFTER: u64 = 64 << 10;
/// The copy buffer.
const COPY_BUF: usize = 16 << 10;
/// A splice that finds this much waiting finds the relay behind its sender.
const BEHIND: usize = 128 << 10;
/// The receive low-water mark of a direction that streams, at most: the kernel wakes the relay
/// once this much waits (or the stream ends, fails or fills its window). The pipe's capacity, so
/// that one splice takes a batch (in the benchmark's bulk transfer 1 MiB gave about 5.0 GB/s,
/// 512 KiB 4.0, 256 KiB 3.7, 2 MiB 5.1). A direction given a smaller pipe never finds [`BEHIND`]
/// in one splice, so it is never batched.
const BATCH: libc::c_int = PIPE_SIZE;
/// The mark first raised: it doubles with each batch that comes within the hold, up to [`BATCH`].
/// A short stream's last bytes wait for a small batch's hold, not a full one's.
const FIRST_BATCH: libc::c_int = 2 * BEHIND as libc::c_int;
/// Bounds of how long a raised mark may hold bytes back.
const HOLD_MIN: Duration = Duration::from_micros(50);
const HOLD_MAX: Duration = Duration::from_millis(1);
/// How long a held stream may stall before the relay takes what came: this share of the
/// stream's time so far (see [`Batching`]), so that its last bytes wait about twice that share of
/// its time at most...
const STALL_SHARE: u32 = 4;
/// ...and at least this long: a fast stream's segments come a few µs apart.
const STALL_MIN: Duration = Duration::from_micros(20);

thread_local! {
    /// The copy phase's buffer, shared by the connections this thread serves: bytes sit in it
    /// only between a read and the write that follows without waiting (two 16 KiB buffers made
    /// and freed per connection were a visible share of the relay's own CPU).
    static COPY: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`: unless the other
/// direction has already ended (`ended`), for then both sockets close right after, with the FIN.
/// Copies the first [`SPLICE_AFTER`] bytes, then splices the rest if `then_splice`. Counts them in
/// `bytes`; `other` is the other direction's count.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    other: &AtomicU64,
    activity: &Activity,
    ended: &AtomicBool,
    then_splice: bool,
) -> io::Result<()> {
    let copy_until = if then_splice { SPLICE_AFTER } else { u64::MAX };
    let mut copied = 0u64;
    // What a write took only in part; allocated only then.
    let mut rest = Vec::new();
    while copied < copy_until {
        // The direction's own waker (this pump alone reads `from` and writes `to`), not a waiter
        // added to and taken off the socket's list: fewer steps a wait.
        std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let read = COPY.with_borrow_mut(
            |buf| -> io::Result<Option<(usize, bool, Option<io::Error>)>> {
                // Read until the socket has nothing more (the same calls as reading once, writing,
                // and finding nothing on the next read), so that an end that came with the bytes is
                // known before they are written.
                let (mut n, mut eof, mut failed) = (0, false, None);
                while n < buf.len() {
                    match from.try_read(&mut buf[n..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if n == 0 => return Err(e),
                        // The bytes that came before it still go on.
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if n == 0 {
                    return Ok(eof.then_some((0, true, None)));
                }
                let sent = match send_then(to, &buf[..n], eof) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    written => written?,
                };
                rest.extend_from_slice(&buf[sent..n]);
                Ok(Some((n, eof, failed)))
            },
        )?;
        let Some((n, eof, failed)) = read else {
            continue;
        };
        while !rest.is_empty() {
            std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
            match to.try_write(&rest) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => drop(rest.drain(..written?)),
            }
        }
        copied += n as u64;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            activity.touch();
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if eof {
            return end(to, ended);
        }
    }
    drop(rest);
    let (pipe_rd, pipe_wr): (OwnedFd, OwnedFd) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A pipe holds 16 buffers by default, each a fragment of an skb however small; a larger one
    // moves more per call (the benchmark: 1.4x the bulk throughput). The default still works.
    let chunk = fcntl(&pipe_wr, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).map_or(CHUNK, |n| n as usize);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut batching = Batching::new(other.load(Ordering::Relaxed));
    loop {
        // The pipe is empty here, so "would block" can only mean the socket has nothing.
        let take = || {
            splice(from.as_fd(), None, pipe_wr.as_fd(), None, chunk, flags).map_err(io::Error::from)
        };
        let n = loop {
            match from.try_io(Interest::READABLE, take) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                read => break read?,
            }
            if batching.wait(from).await? == Woken::Held {
                // Bytes wait below the mark, which the runtime has not been told of.
                match take() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    read => break read?,
                }
            }
        };
        if n == 0 {
            return end(to, ended);
        }
        batching.took(from, n, other.load(Ordering::Relaxed));
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_rd.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Wake-ups of a direction in batches while it streams. A wake-up costs the relay a switch on a
/// CPU that the sender and the receiver need too: woken for every segment that arrives, the relay
/// falls behind a fast sender, whose window then closes (the benchmark's bulk transfer: the
/// sender limited by the window 40 % of the time, the relay woken every 100 KB). Once a splice
/// finds [`BEHIND`] bytes waiting, the socket's receive low-water mark is raised to
/// [`FIRST_BATCH`], and doubled up to [`BATCH`] with each batch that comes in time, so that the
/// kernel wakes the relay when a batch has come (or the stream ends, fails or fills its window).
///
/// Bytes below the mark are held back while they keep coming, and at most `hold`: twice the time
/// a batch takes at the rate the last one came, within [`HOLD_MIN`] and [`HOLD_MAX`]. A stream
/// that stalls for a [`STALL_SHARE`] of its time so far (at least [`STALL_MIN`]) may have ended:
/// the relay takes what came then. The mark stays if that was [`BEHIND`] or more (the batch was
/// only slow), else it drops to one byte until the relay is behind again. A stream is what a
/// direction carries between the other direction's bytes (a request, whose answer is a stream of
/// its own) and between pauses (nothing at all came within the stall). So an answer's last bytes
/// wait two stalls at most (the first check still sees them come), about half its time, once per
/// pause: in the benchmark a 512 KiB answer on a kept-open connection took about 1,070 µs when
/// only the hold bounded that wait, against 250 unbatched and 160–180 now. A direction the relay
/// keeps up with is never held.
pub(super) struct Batching {
    /// The mark while raised, else 0; the timer exists while it is raised.
    mark: libc::c_int,
    hold: Duration,
    /// When the stream began: at a pause's end, or its first take after the other direction's
    /// bytes.
    began: Instant,
    /// The other direction's count of bytes when last looked at.
    other: u64,
    timer: Option<AsyncFd<Timer>>,
}

/// A timerfd, for a hold finer than the runtime's millisecond timers.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Twice the time `mark` bytes take to come at the rate `bytes` came in `took`, within the bounds.
fn hold_for(took: Duration, bytes: usize, mark: libc::c_int) -> Duration {
    let ratio = 2.0 * f64::from(mark) / bytes.max(1) as f64;
    took.mul_f64(ratio).clamp(HOLD_MIN, HOLD_MAX)
}

impl Batching {
    /// For a direction whose spliced phase begins now, while the other has carried `other` bytes.
    pub(super) fn new(other: u64) -> Batching {
        Batching {
            mark: 0,
            hold: HOLD_MAX,
            began: Instant::now(),
            other,
            timer: None,
        }
    }

    /// A splice took `n` bytes from `from`, with the other direction's count at `other`.
    pub(super) fn took(&mut self, from: &TcpStream, n: usize, other: u64) {
        if other != self.other {
            // The other direction spoke: what comes now answers it, a stream timed anew. The mark
            // stays: answers as long as the last come in batches from their first bytes (dropped
            // here, a 4 MiB answer took 1,440-1,490 µs in the benchmark against 780-820).
            self.other = other;
            self.began = Instant::now();
            return;
        }
        if self.mark != 0 || n < BEHIND {
            return;
        }
        // Without a timer nothing would bound the hold, so no mark is raised then.
        if self.timer.is_none() {
            let timer = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            );
            // SAFETY: the Timer owns its descriptor and always gives that one.
            self.timer = timer.ok().and_then(|t| {
                unsafe { AsyncFd::register_with_interest(Timer(t), Interest::READABLE) }.ok()
            });
            if self.timer.is_none() {
                return;
            }
        }
        if set_mark(from, FIRST_BATCH).is_ok() {
            self.mark = FIRST_BATCH;
            // No batch has come yet to tell the rate by; a stall still ends the wait.
            self.hold = HOLD_MAX;
        }
    }

    /// Waits until `from` has bytes to take: a batch, or with the mark raised, whatever has come
    /// once bytes stop coming or the hold ends.
    pub(super) async fn wait(&mut self, from: &TcpStream) -> io::Result<Woken> {
        let timer = match &self.timer {
            Some(timer) if self.mark != 0 => timer,
            _ => return from.readable().await.map(|()| Woken::Ready),
        };
        let began = Instant::now();
        let stall = (self.began.elapsed() / STALL_SHARE)
            .min(self.hold)
            .max(STALL_MIN);
        let mut seen = 0;
        loop {
            let left = self.hold.saturating_sub(began.elapsed());
            timer.get_ref().0.set(
                Expiration::OneShot(TimeSpec::from_duration(stall.min(left).max(STALL_MIN))),
                TimerSetTimeFlags::empty(),
            )?;
            tokio::select! {
                biased;
                ready = from.readable() => {
                    ready?;
                    // Disarmed, so that it cannot wake the relay's worker for nothing later.
                    timer.get_ref().0.unset()?;
                    let came = self.mark;
                    let next = (2 * self.mark).min(BATCH);
                    if next > self.mark
                        && set_mark(from, next).is_ok()
                    {
                        self.mark = next;
                    }
                    self.hold = hold_for(began.elapsed(), came as usize, self.mark);
                    return Ok(Woken::Ready);
                }
                expired = expired(timer) => {
                    expired?;
                    let waiting = queued(from)?;
                    if waiting > seen && began.elapsed() < self.hold {
                        // Still coming.
                        seen = waiting;
                        continue;
                    }
                    if waiting < BEHIND {
                        set_mark(from, 1)?;
                        self.mark = 0;
                    } else {
                        self.hold = hold_for(began.elapsed(), waiting, self.mark);
                    }
                    if waiting == 0 {
                        // A pause: the stream has ended.
                        self.began = Instant::now();
                        return from.readable().await.map(|()| Woken::Ready);
                    }
                    return Ok(Woken::Held);
                }
            }
        }
    }
}

/// Sets `socket`'s receive low-water mark.
fn set_mark(socket: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Why [`Batching::wait`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Woken {
    /// The socket is ready as the runtime knows it.
    Ready,
    /// The hold ended with bytes waiting that the runtime was not told of.
    Held,
}

/// Bytes in `socket`'s receive queue.
fn queued(socket: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &raw mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Returns once `timer` has expired since it was last set (setting it resets its count).
async fn expired(timer: &AsyncFd<Timer>) -> io::Result<()> {
    loop {
        let mut ready = timer.readable().await?;
        if let Ok(read) = ready.try_io(|t| t.get_ref().0.wait().map_err(io::Error::from)) {
            return read;
        }
    }
}

/// Sends what it can of `bytes` now; where their sender has ended (`last`), holds them back
/// (`MSG_MORE`) for the FIN that the caller sends next ([`half_close`], or the close), which then
/// goes out with them in one segment: one packet fewer, and the peer woken once for the bytes and
/// the end.
pub(super) fn send_then(to: &TcpStream, bytes: &[u8], last: bool) -> io::Result<usize> {
    // nix names no MSG_MORE.
    let more = if last { libc::MSG_MORE } else { 0 };
    let flags = MsgFlags::from_bits_retain(more | libc::MSG_NOSIGNAL);
    to.try_io(Interest::WRITABLE, || {
        send(to.as_raw_fd(), bytes, flags).map_err(io::Error::from)
    })
}

/// `from` has ended. The first direction to end passes the half-close on (the other goes on);
/// the second leaves the FIN to the close that follows.
fn end(to: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    half_close(to)
}

/// Sends `to` the FIN, with whatever [`send_then`] held back; a connection already gone is no
/// error.
pub(super) fn half_close(to: &TcpStream) -> io::Result<()> {
    match shutdown(to.as_raw_fd(), Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        io,
        os::fd::{AsFd as _, AsRawFd as _},
        sync::atomic::{AtomicBool, AtomicU64, Ordering},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpSocket, TcpStream},
    };

    use super::{
        super::{TCP_CLOSE, TCP_CLOSE_WAIT, netns, tcp_info},
        Activity, BEHIND, Batching, FIRST_BATCH, STALL_MIN, Woken, pump, send_then,
    };

    /// A connected pair on loopback: (the end dialled from, the accepted end).
    pub(in super::super) async fn pair(buffer: Option<u32>) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = buffer {
            socket.set_send_buffer_size(size).expect("SO_SNDBUF");
        }
        let (dialled, accepted) = tokio::join!(
            socket.connect(listener.local_addr().expect("address")),
            listener.accept()
        );
        (dialled.expect("connect"), accepted.expect("accept").0)
    }

    /// Sends `bytes` and the end from `peer` in one segment, and waits until `at`, its other end,
    /// has them.
    pub(in super::super) async fn arrive_with_end(peer: &TcpStream, at: &TcpStream, bytes: &[u8]) {
        assert_eq!(send_then(peer, bytes, true).expect("send"), bytes.len());
        nix::sys::socket::shutdown(peer.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .expect("half-close");
        reach_state(at, TCP_CLOSE_WAIT, "the bytes and the end arrive").await;
    }

    /// Waits until `socket` is in TCP state `state`.
    async fn reach_state(socket: &TcpStream, state: u8, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while tcp_info(socket).expect("TCP_INFO").tcpi_state != state {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect(what);
    }

    /// Sends `bytes` from `peer`, then resets the connection, and waits until `at`, its other
    /// end, has both.
    pub(in super::super) async fn arrive_with_reset(peer: TcpStream, at: &TcpStream, bytes: &[u8]) {
        assert_eq!(send_then(&peer, bytes, false).expect("send"), bytes.len());
        // A zero linger: the close resets the connection, at once.
        let reset = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::Linger, &reset)
            .expect("SO_LINGER");
        drop(peer);
        reach_state(at, TCP_CLOSE, "the bytes and the reset arrive").await;
    }

    /// Segments `socket` has received, by the kernel's count.
    pub(in super::super) fn segments_in(socket: &TcpStream) -> u32 {
        tcp_info(socket).expect("TCP_INFO").tcpi_segs_in
    }

    /// Bytes and an end that reach the relay together leave it together: the last bytes and the
    /// FIN in one segment, a packet fewer and the receiver woken once for both.
    #[tokio::test]
    async fn the_last_bytes_and_the_end_leave_in_one_segment() {
        let (upstream, from) = pair(None).await;
        let (to, mut client) = pair(None).await;
        let last = b"the last bytes";
        arrive_with_end(&upstream, &from, last).await;
        let before = segments_in(&client);
        let (bytes, activity, ended) = (AtomicU64::new(0), Activity::new(), AtomicBool::new(false));
        let other = AtomicU64::new(0);
        pump(&from, &to, &bytes, &other, &activity, &ended, true)
            .await
            .expect("pump");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("receive");
        assert_eq!(got, last);
        assert_eq!(bytes.into_inner(), last.len() as u64);
        assert_eq!(
            segments_in(&client) - before,
            1,
            "the last bytes and the FIN in one segment"
        );
    }

    /// Bytes that came before a reset still go on, and then the reset is the pump's error.
    #[tokio::test]
    async fn the_bytes_before_a_reset_still_go_on() {
        let (upstream, from) = pair(None).await;
        let (to, mut client) = pair(None).await;
        let last = b"the bytes before the reset";
        arrive_with_reset(upstream, &from, last).await;
        let (bytes, activity, ended) = (AtomicU64::new(0), Activity::new(), AtomicBool::new(false));
        let other = AtomicU64::new(0);
        let failed = pump(&from, &to, &bytes, &other, &activity, &ended, true)
            .await
            .expect_err("the reset");
        assert_eq!(failed.kind(), io::ErrorKind::ConnectionReset);
        drop(to);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("receive");
        assert_eq!(got, last);
        assert_eq!(bytes.into_inner(), last.len() as u64);
    }

    /// Through a tiny send buffer and a slow reader, writes take the bytes only in part: what they
    /// left must follow, in order, through the copy phase and then the pipe, or through the copy
    /// phase alone.
    #[tokio::test]
    async fn bytes_that_a_write_took_in_part_follow_in_order() {
        for then_splice in [true, false] {
            partial_writes(then_splice).await;
        }
    }

    async fn partial_writes(then_splice: bool) {
        let (mut client, from) = pair(None).await;
        let (to, mut reader) = pair(Some(4096)).await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (bytes, activity, ended) = (AtomicU64::new(0), Activity::new(), AtomicBool::new(false));
        let other = AtomicU64::new(0);
        let send = async {
            client.write_all(&data).await.expect("send");
            client.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = reader.read(&mut chunk).await.expect("receive");
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
        };
        let (carried, (), got) = tokio::join!(
            pump(&from, &to, &bytes, &other, &activity, &ended, then_splice),
            send,
            receive
        );
        carried.expect("pump");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes out of order or changed");
        assert_eq!(bytes.into_inner(), data.len() as u64);
        assert!(ended.into_inner(), "the first direction to end marks it");
    }

    /// The socket's receive low-water mark, as the kernel holds it.
    fn mark(socket: &TcpStream) -> libc::c_int {
        let mut value: libc::c_int = 0;
        // SAFETY: SO_RCVLOWAT is an int.
        unsafe {
            netns::get_option(
                socket.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                &mut value,
            )
        }
        .expect("SO_RCVLOWAT");
        value
    }

    /// With the mark raised, a few bytes do not wake the relay; once they stop coming the relay
    /// takes them, and the mark drops to one byte. A batch that comes doubles the mark.
    #[tokio::test]
    async fn a_raised_mark_holds_a_few_bytes_back_until_they_stop_coming() {
        let (mut peer, from) = pair(None).await;
        let mut batching = Batching::new(0);
        batching.took(&from, BEHIND - 1, 0);
        assert_eq!(mark(&from), 1, "a direction that keeps up is not batched");
        batching.took(&from, BEHIND, 0);
        assert_eq!(mark(&from), FIRST_BATCH, "a direction behind its sender is");
        let waited = held(&mut batching, &mut peer, &from).await;
        assert!(waited >= STALL_MIN, "woken after {waited:?}");
        assert_eq!(
            mark(&from),
            1,
            "the mark drops after a hold that found little"
        );

        // The next time the relay is behind it is raised again; a batch that comes doubles it.
        batching.took(&from, BEHIND, 0);
        assert_eq!(mark(&from), FIRST_BATCH);
        let nothing = from.try_read(&mut [0u8; 256]).expect_err("all taken");
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        let batch = vec![1u8; FIRST_BATCH as usize];
        tokio::time::timeout(Duration::from_secs(5), peer.write_all(&batch))
            .await
            .expect("a batch fits the buffers")
            .expect("send a batch");
        let woken = tokio::time::timeout(Duration::from_secs(5), batching.wait(&from))
            .await
            .expect("the batch ends the wait")
            .expect("wait");
        assert_eq!(woken, Woken::Ready);
        assert_eq!(
            mark(&from),
            2 * FIRST_BATCH,
            "a batch in time doubles the mark"
        );

        // The other direction's bytes (a request): what comes next is a stream of its own (timed
        // anew: see the next test), in batches of the same size.
        batching.took(&from, BEHIND, 4);
        assert_eq!(mark(&from), 2 * FIRST_BATCH, "the mark stays at a request");
    }

    /// With nothing waiting in `from`, `peer` sends 100 bytes: the mark holds them back until the
    /// wait ends, then they are read. How long the wait took.
    async fn held(batching: &mut Batching, peer: &mut TcpStream, from: &TcpStream) -> Duration {
        // The pump waits only after a read found nothing, which clears the readiness.
        let mut buf = [0u8; 256];
        let nothing = from.try_read(&mut buf).expect_err("all taken");
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        peer.write_all(&[7; 100]).await.expect("send");
        let began = std::time::Instant::now();
        let woken = tokio::time::timeout(Duration::from_secs(5), batching.wait(from))
            .await
            .expect("the wait ends")
            .expect("wait");
        assert_eq!(woken, Woken::Held, "the mark held the bytes back");
        from.readable().await.expect("readable");
        assert_eq!(from.try_read(&mut buf).expect("read"), 100);
        began.elapsed()
    }

    /// How long a stall may last before the relay takes what came is a share of the stream's
    /// time: an answer to a request, a new stream, is held far less than a stream of long
    /// standing, whose stall the hold ends.
    #[tokio::test]
    async fn a_stall_ends_a_hold_sooner_the_younger_the_stream() {
        let (mut peer, from) = pair(None).await;
        let mut batching = Batching::new(0);
        let hold = Duration::from_secs(1);
        // A quarter of a 40 s stream is longer than the hold.
        batching.began -= Duration::from_secs(40);
        batching.took(&from, BEHIND, 0);
        assert_eq!(mark(&from), FIRST_BATCH);
        batching.hold = hold;
        let waited = held(&mut batching, &mut peer, &from).await;
        assert!(waited >= hold, "held {waited:?}");
        // An answer: a stall of a few µs ends it.
        batching.took(&from, BEHIND, 0);
        batching.took(&from, BEHIND, 4);
        assert_eq!(mark(&from), FIRST_BATCH);
        batching.hold = hold;
        let waited = held(&mut batching, &mut peer, &from).await;
        assert!(waited < hold / 2, "held {waited:?}");
    }

    /// A stream that pauses after a burst: its last bytes, below the mark, still arrive (after the
    /// hold) while the connection stays open, in order.
    #[tokio::test]
    async fn the_last_bytes_before_a_pause_arrive() {
        let (mut client, from) = pair(None).await;
        let (to, mut reader) = pair(None).await;
        let burst: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8).collect();
        let tail = b"the last bytes before a pause";
        let total = burst.len() + tail.len();
        let (bytes, activity, ended) = (AtomicU64::new(0), Activity::new(), AtomicBool::new(false));
        let other = AtomicU64::new(0);
        let raised = std::cell::Cell::new(false);
        let done = std::cell::Cell::new(false);
        let send = async {
            client.write_all(&burst).await.expect("send the burst");
            // The tail comes once the relay has taken the burst and waits for more.
            while bytes.load(Ordering::Relaxed) < burst.len() as u64 {
                tokio::task::yield_now().await;
            }
            client.write_all(tail).await.expect("send the tail");
            // Open until everything has arrived: nothing but the hold can deliver the tail.
            while !done.get() {
                tokio::task::yield_now().await;
            }
            client.shutdown().await.expect("half-close");
        };
        let receive = async {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            while got.len() < total {
                let n = reader.read(&mut chunk).await.expect("receive");
                assert!(n > 0, "ended early");
                got.extend_from_slice(&chunk[..n]);
            }
            done.set(true);
            got
        };
        // Looks at the mark between the pump's steps.
        let watch = async {
            while !done.get() {
                raised.set(raised.get() || mark(&from) >= FIRST_BATCH);
                tokio::task::yield_now().await;
            }
        };
        let ((carried, got), ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(
                async {
                    tokio::join!(
                        pump(&from, &to, &bytes, &other, &activity, &ended, true),
                        async {
                            let ((), got) = tokio::join!(send, receive);
                            got
                        }
                    )
                },
                watch
            )
        })
        .await
        .expect("the tail arrives while the connection is open");
        carried.expect("pump");
        assert!(raised.get(), "the burst raised the mark");
        assert_eq!(got.len(), total);
        assert!(got[..burst.len()] == burst[..] && &got[burst.len()..] == tail);
    }
}
