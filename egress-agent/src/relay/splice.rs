//! One direction of a relayed connection moved socket → pipe → socket with splice(2): the bytes
//! stay in the kernel's pages and never cross into the relay's memory. The first bytes of each
//! direction are copied instead: most connections carry little, and for them a pipe (made,
//! filled, emptied and closed) costs more system calls than it saves copying. Without splice
//! (`RelayConfig::splice` off, for the benchmark's comparison) a direction is copied throughout.
use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    sys::socket::{Shutdown, shutdown},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::Activity;

/// The pipe's capacity asked for: /proc/sys/fs/pipe-max-size by default.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// A default pipe's capacity, when the larger one is refused.
const CHUNK: usize = 64 << 10;
/// Bytes a direction copies before it takes a pipe.
const SPLICE_AFTER: u64 = 64 << 10;
/// The copy buffer.
const COPY_BUF: usize = 16 << 10;

thread_local! {
    /// The copy phase's buffer, shared by the connections this thread serves: bytes sit in it
    /// only between a read and the write that follows without waiting (two 16 KiB buffers made
    /// and freed per connection were a visible share of the relay's own CPU).
    static COPY: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`: unless the other
/// direction has already ended (`ended`), for then both sockets close right after, with the FIN.
/// Copies the first [`SPLICE_AFTER`] bytes, then splices the rest if `then_splice`.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    bytes: &AtomicU64,
    activity: &Activity,
    ended: &AtomicBool,
    then_splice: bool,
) -> io::Result<()> {
    let copy_until = if then_splice { SPLICE_AFTER } else { u64::MAX };
    let mut copied = 0u64;
    // What a write took only in part; allocated only then.
    let mut rest = Vec::new();
    while copied < copy_until {
        from.readable().await?;
        let read = COPY.with_borrow_mut(|buf| -> io::Result<Option<usize>> {
            let n = match from.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                read => read?,
            };
            if n == 0 {
                return Ok(Some(0));
            }
            let sent = match to.try_write(&buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                written => written?,
            };
            rest.extend_from_slice(&buf[sent..n]);
            Ok(Some(n))
        })?;
        let Some(n) = read else { continue };
        if n == 0 {
            return end(to, ended);
        }
        while !rest.is_empty() {
            to.writable().await?;
            match to.try_write(&rest) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => drop(rest.drain(..written?)),
            }
        }
        copied += n as u64;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
    drop(rest);
    let (pipe_rd, pipe_wr): (OwnedFd, OwnedFd) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A pipe holds 16 buffers by default, each a fragment of an skb however small; a larger one
    // moves more per call (the benchmark: 1.4x the bulk throughput). The default still works.
    let chunk = fcntl(&pipe_wr, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).map_or(CHUNK, |n| n as usize);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so "would block" can only mean the socket has nothing.
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_wr.as_fd(), None, chunk, flags)
                    .map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return end(to, ended);
        }
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

/// `from` has ended. The first direction to end passes the half-close on (the other goes on);
/// the second leaves the FIN to the close that follows.
fn end(to: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    match shutdown(to.as_raw_fd(), Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpSocket, TcpStream},
    };

    use super::{Activity, pump};

    /// A connected pair on loopback: (the end dialled from, the accepted end).
    async fn pair(buffer: Option<u32>) -> (TcpStream, TcpStream) {
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
            pump(&from, &to, &bytes, &activity, &ended, then_splice),
            send,
            receive
        );
        carried.expect("pump");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes out of order or changed");
        assert_eq!(bytes.into_inner(), data.len() as u64);
        assert!(ended.into_inner(), "the first direction to end marks it");
    }
}
