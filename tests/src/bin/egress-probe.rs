//! A client the tests run inside an enforced cgroup. Prints one word for what the socket saw:
//! `ok`, `denied` (EPERM from the hooks), `refused`, `timeout`, `dropped` (ENOBUFS: dropped
//! below the socket as it was sent), or `error:<detail>`.
//!
//!   egress-probe tcp ADDR:PORT            connect, read the server's greeting
//!   egress-probe tcp-mark ADDR:PORT MARK  as `tcp`, from a socket with firewall mark MARK
//!                                         (decimal or 0x hex)
//!   egress-probe redial ADDR:PORT THEN:PORT   connect to ADDR and reset that connection, then
//!                                         connect to THEN from the same port, as `tcp`;
//!                                         prints `PORT WORD`
//!   egress-probe udp ADDR:PORT            connect, send, wait for the echo
//!   egress-probe udp-sendto ADDR:PORT     unconnected sendto, wait for the echo
//!   egress-probe dns SERVER NAME          A/AAAA lookup through SERVER (port 53)
//!   egress-probe bench-connect ADDR:PORT N   N UDP connect() calls; prints ns per call
//!   egress-probe sendto-repeat ADDR:PORT N [PAUSE_MS]   one UDP socket, N unconnected sendto()
//!                                         calls (N more after PAUSE_MS if given); prints each
//!                                         outcome's word with its count, `denied:N`
//!   egress-probe udp-many ADDR:PORT SOCKETS N   SOCKETS UDP sockets open at once, each
//!                                         connected N times, then closed; as sendto-repeat
//!   egress-probe udp-alternate A:PORT B:PORT N   one UDP socket connected to A, then
//!                                         B, N times over; `ok`
//!   egress-probe bench-socket ADDR:PORT N    N times a new UDP socket, connect(), close; prints
//!                                         ns per round
//!   egress-probe ping ADDR                ICMP echo from a raw socket (no socket hook sees it)
//!   egress-probe frame-ping IFACE SRC4 DST4 ip|arp [VLAN]   an ICMP echo as a whole Ethernet
//!                                         frame (the IP packet alone on a tun) from a packet
//!                                         socket on IFACE, labelled ip or arp, tagged with VLAN
//!                                         if given
//!   egress-probe sockopts                 PACKET_QDISC_BYPASS on and off, an AF_XDP socket's
//!                                         memory (XDP_UMEM_REG), and a larger than a
//!                                         page option value; `on:W off:W xdp:W large:W`
//!   egress-probe solicit ADDR6            an ICMPv6 neighbour solicitation for ADDR6, sent to it
//!                                         from a raw socket; `sent`
//!   egress-probe transfer ADDR:PORT N     send N bytes, half-close, expect N bytes back
//!   egress-probe http-half-close ADDR:PORT HOST   `GET /` for HOST, half-close, read to EOF;
//!                                         prints `ok:<the answer's last line>`
//!   egress-probe tls ADDR:PORT NAME CA [split]   TLS to NAME (CA: PEM file), GET /; prints
//!                                         `ok:<body>`. `split` sends the ClientHello byte by byte
//!   egress-probe tls-hold ADDR:PORT NAME CA N    N handshakes held open together, then a GET on
//!                                         each; `ok` when every answer came
//!   egress-probe peer ADDR:PORT           connect; print what getpeername() says
//!   egress-probe same-port ADDR:PORT CPU CPU   two connections from one local port, the first
//!                                         connected on the first CPU, the second on the
//!                                         second; says `held`, keeps them until a line
//!                                         comes on stdin
//!   egress-probe tcp-repeat ADDR:PORT N [reset]   N connects, whatever their outcome, each
//!                                         closed (`reset`: with a reset), then says `done`
//!                                         and waits for a line on stdin
//!   egress-probe collide ADDR:PORT THEN:PORT   a connect to ADDR from a taken address and port
//!                                         fails; the socket connects to THEN; prints the
//!                                         failure's word and getpeername() as `peer`
//!   egress-probe hello-bulk ADDR:PORT NAME    send a ClientHello for NAME, read to EOF; prints
//!                                         `BYTES SECONDS`
//!   egress-probe hello-again ADDR:PORT NAME SECOND   a ClientHello for NAME, then, once the
//!                                         server has answered, one for SECOND; prints the first
//!                                         hello's length and how the connection ended
//!   egress-probe hello-echo ADDR:PORT NAME N   send a ClientHello for NAME and N patterned
//!                                         bytes, expect them back; then a short message, its
//!                                         echo while the connection stays open, a half-close
//!                                         and EOF
//!   egress-probe hello-hold ADDR:PORT NAME N   N connections, each sent a ClientHello for NAME;
//!                                         says `held`, keeps them open until a line comes on
//!                                         stdin, then closes them; `ok`
//!   egress-probe hello-rate ADDR:PORT NAME N C   N connections (C at a time), each a ClientHello
//!                                         and a read to EOF; prints `SECONDS P50_US P99_US` of
//!                                         the time from connect() to the first byte back
//!   egress-probe hello-replies ADDR:PORT NAME N UP DOWN   one connection: a ClientHello and
//!                                         its 64-byte answer, then N + 1 requests one after
//!                                         another, each DOWN and UP as four big-endian bytes
//!                                         and a body of UP bytes, answered with DOWN bytes;
//!                                         prints `P50_US P99_US` of the time from a request's
//!                                         first byte to its answer's last, the first left out
//!   egress-probe hello-turns NAME N CGROUP=ADDR:PORT...   N connections to each ADDR, made in
//!                                         its CGROUP, taken in turn (in a new random order
//!                                         every turn), each a ClientHello for NAME and a read
//!                                         to EOF; prints a line per path, in the order given:
//!                                         its N times from connect() to the first byte, in
//!                                         µs, turn by turn
//!   egress-probe --netns PATH MODE ...   enters network namespace PATH (setns), then runs MODE
//!   egress-probe --thread-netns PATH MODE ...   runs MODE on a thread that alone entered PATH;
//!                                         the process's main thread stays where it was
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn word(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "denied".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => "timeout".into(),
        // A packet dropped below the socket as it was sent (TC).
        Some(libc::ENOBUFS) => "dropped".into(),
        _ if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            "timeout".into()
        }
        _ => format!("error:{e}"),
    }
}

fn tcp(addr: SocketAddr) -> String {
    match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => greeting(s),
        Err(e) => word(&e),
    }
}

/// Ok only once the server's greeting arrived: the connection really reached it.
fn greeting(mut s: TcpStream) -> String {
    let _ = s.set_read_timeout(Some(TIMEOUT));
    match s.read(&mut [0u8; 64]) {
        Ok(0) => "error:closed before the greeting".into(),
        Ok(_) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// A socket of `addr`'s family, for options to be set before it connects.
fn socket_for(
    addr: SocketAddr,
    kind: nix::sys::socket::SockType,
) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket;
    let family = match addr {
        SocketAddr::V4(_) => socket::AddressFamily::Inet,
        SocketAddr::V6(_) => socket::AddressFamily::Inet6,
    };
    Ok(socket::socket(
        family,
        kind,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The unspecified address of `addr`'s family, with `port`.
fn unspecified(addr: SocketAddr, port: u16) -> nix::sys::socket::SockaddrStorage {
    let any: std::net::IpAddr = match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(any, port).into()
}

/// Each outcome's word with its count, `denied:3 ok:2`.
fn tally(seen: &std::collections::BTreeMap<String, u64>) -> String {
    seen.iter()
        .map(|(w, c)| format!("{w}:{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A TCP socket of `addr`'s family, for options to be set before it connects.
fn stream_socket(addr: SocketAddr) -> io::Result<std::os::fd::OwnedFd> {
    socket_for(addr, nix::sys::socket::SockType::Stream)
}

/// `sockets` UDP sockets open at once, each connected `calls` times to `addr`, then all closed;
/// prints the outcomes' tally as `sendto-repeat`. The sockets share one local port
/// (SO_REUSEADDR), so their number is not bounded by the ephemeral port range.
fn udp_many(addr: SocketAddr, sockets: u64, calls: u64) -> String {
    use nix::sys::{
        resource::{Resource, setrlimit},
        socket::{self, SockType, SockaddrStorage, sockopt},
    };
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    let mut run = || -> io::Result<()> {
        let room = sockets + 64;
        setrlimit(Resource::RLIMIT_NOFILE, room, room)?;
        let to = SockaddrStorage::from(addr);
        let mut local = unspecified(addr, 0);
        let mut open = Vec::new();
        for i in 0..sockets {
            let fd = socket_for(addr, SockType::Datagram)?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            socket::bind(fd.as_raw_fd(), &local)?;
            if i == 0 {
                local = socket::getsockname(fd.as_raw_fd())?;
            }
            for _ in 0..calls {
                let outcome = match socket::connect(fd.as_raw_fd(), &to) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => word(&e.into()),
                };
                *seen.entry(outcome).or_default() += 1;
            }
            open.push(fd);
        }
        Ok(())
    };
    match run() {
        Ok(()) => tally(&seen),
        Err(e) => word(&e),
    }
}

/// As `tcp`, from a socket carrying firewall mark `mark` (SO_MARK).
fn tcp_mark(addr: SocketAddr, mark: u32) -> String {
    use nix::sys::socket::{self, sockopt};
    let run = || -> io::Result<String> {
        let fd = stream_socket(addr)?;
        socket::setsockopt(&fd, sockopt::Mark, &mark)?;
        socket::connect(fd.as_raw_fd(), &socket::SockaddrStorage::from(addr))?;
        Ok(greeting(TcpStream::from(fd)))
    };
    run().unwrap_or_else(|e| word(&e))
}

/// Connects to `addr`, resets that connection (so its port is free at once, no TIME_WAIT), then
/// connects to `then` from the same address and port; prints that port and what the second
/// connection saw, as `tcp`.
fn redial(addr: SocketAddr, then: SocketAddr) -> String {
    use nix::sys::socket::{self, sockopt};
    // Another process may take the port between the two connections (tests run side by side):
    // then the whole is tried again, from another port.
    let taken = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
        )
    };
    let run = || -> io::Result<String> {
        let first = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        let local = first.local_addr()?;
        abort(first)?;
        let fd = stream_socket(local)?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::bind(fd.as_raw_fd(), &socket::SockaddrStorage::from(local))?;
        socket::connect(fd.as_raw_fd(), &socket::SockaddrStorage::from(then))?;
        Ok(format!(
            "{} {}",
            local.port(),
            greeting(TcpStream::from(fd))
        ))
    };
    let mut tries = 5;
    loop {
        tries -= 1;
        match run() {
            Err(e) if taken(&e) && tries > 0 => {}
            done => return done.unwrap_or_else(|e| word(&e)),
        }
    }
}

/// Connects to `addr` and keeps that connection. A second socket bound to the first's port
/// (SO_REUSEADDR) connects to `addr` too, which fails before TCP takes a port (that address and
/// port pair is taken), then to `then`. Prints the failure's word and, as `peer`, the second
/// socket's peer name.
fn collide(addr: SocketAddr, then: SocketAddr) -> String {
    use nix::sys::socket::{self, SockaddrStorage, sockopt};
    let run = || -> io::Result<String> {
        let bound = |port| -> io::Result<std::os::fd::OwnedFd> {
            let fd = stream_socket(addr)?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            socket::bind(fd.as_raw_fd(), &unspecified(addr, port))?;
            Ok(fd)
        };
        let first = bound(0)?;
        socket::connect(first.as_raw_fd(), &SockaddrStorage::from(addr))?;
        let port = TcpStream::from(first.try_clone()?).local_addr()?.port();
        let second = bound(port)?;
        let failed = match socket::connect(second.as_raw_fd(), &SockaddrStorage::from(addr)) {
            Ok(()) => "ok".to_owned(),
            Err(e) => word(&e.into()),
        };
        socket::connect(second.as_raw_fd(), &SockaddrStorage::from(then))?;
        Ok(format!(
            "{failed} ok:{}",
            TcpStream::from(second).peer_addr()?
        ))
    };
    run().unwrap_or_else(|e| word(&e))
}

/// As `tcp`, then says `connected` and keeps the connection open until a line comes on stdin:
/// a flow that lives across whatever the caller does meanwhile.
fn tcp_hold(addr: SocketAddr) -> String {
    let run = || -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        if s.read(&mut [0u8; 64])? == 0 {
            return Err(io::Error::other("closed before the greeting"));
        }
        hold("connected")
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// Connects to `addr`, says `held` and keeps the connection, sending nothing, until released.
fn connect_hold(addr: SocketAddr) -> String {
    let run = || -> io::Result<()> {
        let _held = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        hold("held")
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// Two connections to `addr` from one local port (SO_REUSEADDR), the first connected on CPU
/// `first`, the second on CPU `second`; says `held PORT` and keeps them, sending nothing, until
/// released.
fn same_port(addr: SocketAddr, first: usize, second: usize) -> String {
    use nix::sys::socket::{self, SockaddrStorage, sockopt};
    let on = |cpu: usize| -> io::Result<()> {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        Ok(())
    };
    let run = || -> io::Result<()> {
        let mut port = 0;
        let mut held = Vec::new();
        for cpu in [first, second] {
            on(cpu)?;
            let fd = stream_socket(addr)?;
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            let local = match addr {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
            };
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(local))?;
            socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
            let stream = TcpStream::from(fd);
            port = stream.local_addr()?.port();
            held.push(stream);
        }
        hold("held")
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// Closes `stream` with a reset: no FIN, no TIME_WAIT, the socket closed at once.
fn abort(stream: TcpStream) -> io::Result<()> {
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &abort)?;
    Ok(())
}

/// `n` TCP connects to `addr`, each from a new socket and whatever their outcome (each reset, if
/// `reset`); then says `done` and stays (as `hold`), so the thread that made them is still there
/// to be looked at.
fn tcp_repeat(addr: SocketAddr, n: u64, reset: bool) -> String {
    for _ in 0..n {
        if let Ok(stream) = TcpStream::connect_timeout(&addr, TIMEOUT)
            && reset
            && let Err(e) = abort(stream)
        {
            return word(&e);
        }
    }
    match hold("done") {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// Says `word`, then waits for a line on stdin: the caller's cue that what the mode holds open
/// may go.
fn hold(word: &str) -> io::Result<()> {
    println!("{word}");
    io::stdout().flush()?;
    io::stdin().read_line(&mut String::new())?;
    Ok(())
}

fn bind_for(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = if addr.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")?
    } else {
        UdpSocket::bind("[::]:0")?
    };
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn udp(addr: SocketAddr, connected: bool) -> String {
    let run = || -> io::Result<()> {
        let s = bind_for(addr)?;
        if connected {
            s.connect(addr)?;
            s.send(b"ping")?;
            let mut buf = [0u8; 16];
            s.recv(&mut buf)?;
        } else {
            s.send_to(b"ping", addr)?;
            let mut buf = [0u8; 16];
            s.recv_from(&mut buf)?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

fn dns(server: SocketAddr, name: &str) -> String {
    use hickory_resolver::{
        TokioResolver,
        config::{NameServerConfig, ResolverConfig, ResolverOpts},
        net::runtime::TokioRuntimeProvider,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("error:{e}"),
    };
    rt.block_on(async {
        let mut ns = NameServerConfig::udp(server.ip());
        for c in &mut ns.connections {
            c.port = server.port();
        }
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        let mut opts = ResolverOpts::default();
        opts.timeout = TIMEOUT;
        opts.attempts = 1;
        *b.options_mut() = opts;
        let r = match b.build() {
            Ok(r) => r,
            Err(e) => return format!("error:{e}"),
        };
        match r.lookup_ip(format!("{name}.")).await {
            Ok(l) => {
                let mut ips: Vec<_> = l.iter().collect();
                ips.sort();
                format!(
                    "ok:{}",
                    ips.iter()
                        .map(|ip| ip.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            Err(e) if e.to_string().contains("Operation not permitted") => "denied".into(),
            Err(e) => format!("error:{e}"),
        }
    })
}

fn bench_connect(addr: SocketAddr, n: u64) -> String {
    let run = || -> io::Result<f64> {
        let s = bind_for(addr)?;
        let start = Instant::now();
        for _ in 0..n {
            s.connect(addr)?;
        }
        Ok(start.elapsed().as_nanos() as f64 / n as f64)
    };
    match run() {
        Ok(ns) => format!("{ns:.1}"),
        Err(e) => word(&e),
    }
}

fn sendto_repeat(addr: SocketAddr, n: u64, pause: Option<Duration>) -> String {
    let s = match bind_for(addr) {
        Ok(s) => s,
        Err(e) => return word(&e),
    };
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    let mut send = || {
        for _ in 0..n {
            let outcome = match s.send_to(b"again", addr) {
                Ok(_) => "ok".to_owned(),
                Err(e) => word(&e),
            };
            *seen.entry(outcome).or_default() += 1;
        }
    };
    send();
    if let Some(pause) = pause {
        std::thread::sleep(pause);
        send();
    }
    tally(&seen)
}

fn udp_alternate(a: SocketAddr, b: SocketAddr, n: u64) -> String {
    let run = || -> io::Result<()> {
        let s = bind_for(a)?;
        for _ in 0..n {
            s.connect(a)?;
            s.connect(b)?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

fn bench_socket(addr: SocketAddr, n: u64) -> String {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let to = SockaddrStorage::from(addr);
    let run = || -> nix::Result<f64> {
        let start = Instant::now();
        for _ in 0..n {
            let s = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
            connect(s.as_raw_fd(), &to)?;
        }
        Ok(start.elapsed().as_nanos() as f64 / n as f64)
    };
    match run() {
        Ok(ns) => format!("{ns:.1}"),
        Err(e) => word(&io::Error::from(e)),
    }
}

/// A unicast neighbour solicitation (RFC 4861 §4.3) from a raw socket, hop limit 255.
fn solicit(ip: IpAddr) -> String {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, sendto,
        setsockopt, socket, sockopt::Ipv6Ttl,
    };
    let IpAddr::V6(target) = ip else {
        return "error:an IPv6 address is needed".into();
    };
    let run = || -> nix::Result<()> {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::IcmpV6,
        )?;
        setsockopt(&fd, Ipv6Ttl, &255)?;
        // Type, code, checksum (the kernel's), reserved, target.
        let mut msg = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&target.octets());
        let to = SockaddrStorage::from(SocketAddr::new(ip, 0));
        sendto(fd.as_raw_fd(), &msg, &to, MsgFlags::empty())?;
        Ok(())
    };
    match run() {
        Ok(()) => "sent".into(),
        Err(e) => word(&io::Error::from(e)),
    }
}

/// One ICMP echo from a raw socket; `ok` once the matching reply arrives.
fn ping(ip: IpAddr) -> String {
    use nix::sys::socket::{MsgFlags, SockaddrStorage, sendto};
    let run = || -> nix::Result<bool> {
        let fd = echo_socket(ip)?;
        let msg = echo_request(ip);
        let to = SockaddrStorage::from(SocketAddr::new(ip, 0));
        sendto(fd.as_raw_fd(), &msg, &to, MsgFlags::empty())?;
        echo_reply(&fd, ip)
    };
    match run() {
        Ok(true) => "ok".into(),
        Ok(false) => "timeout".into(),
        Err(e) => word(&io::Error::from(e)),
    }
}

/// A raw ICMP socket of `ip`'s family, which sees every echo reply the host receives.
fn echo_socket(ip: IpAddr) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket,
        sockopt::ReceiveTimeout,
    };
    let (family, proto) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let fd = socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto)?;
    setsockopt(
        &fd,
        ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 200_000),
    )?;
    Ok(fd)
}

/// This process's echo identifier.
fn echo_id() -> u16 {
    (std::process::id() & 0xffff) as u16
}

/// An ICMP echo request to `ip`, checksummed for IPv4 (the kernel does ICMPv6's).
fn echo_request(ip: IpAddr) -> Vec<u8> {
    let request = if ip.is_ipv4() { 8u8 } else { 128 };
    let mut msg = vec![request, 0, 0, 0];
    msg.extend_from_slice(&echo_id().to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(b"egress-probe");
    if ip.is_ipv4() {
        let sum = checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    msg
}

/// Whether `fd` (an [`echo_socket`]) gets our echo reply from `ip` in time.
fn echo_reply(fd: &std::os::fd::OwnedFd, ip: IpAddr) -> nix::Result<bool> {
    use nix::sys::socket::{SockaddrStorage, recvfrom};
    let reply = if ip.is_ipv4() { 0u8 } else { 129 };
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let (n, from) = match recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf) {
            Ok(r) => r,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(e),
        };
        let from_ip = from.and_then(|f| {
            f.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| f.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        });
        // IPv4 raw sockets receive the IP header too.
        let icmp = if ip.is_ipv4() {
            &buf[((buf[0] & 0x0f) as usize * 4).min(n)..n]
        } else {
            &buf[..n]
        };
        if from_ip == Some(ip)
            && icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == echo_id().to_be_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An ICMP echo request from `src` to `dst`, as a whole Ethernet frame (to the broadcast address,
/// tagged with `vlan` if given; on a link without Ethernet header, such as tun, the IP packet
/// alone) sent from a packet socket on `iface`, labelled with protocol
/// `label` (`ip` or `arp`) whatever it carries: the receiver goes by the frame. `ok` once the
/// reply comes (to a raw socket).
fn frame_ping(
    iface: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    label: &str,
    vlan: Option<u16>,
) -> String {
    let label: u16 = match label {
        "ip" => libc::ETH_P_IP as u16,
        "arp" => libc::ETH_P_ARP as u16,
        _ => return "error:label is ip or arp".into(),
    };
    let run = || -> io::Result<bool> {
        let index = nix::net::if_::if_nametoindex(iface)?;
        // From the namespace itself: sysfs shows the one it was mounted in. Links other than
        // Ethernet, such as tun, carry the IP packet alone.
        let ether =
            egress_agent::datapath::iface::link_type(iface)? == u32::from(libc::ARPHRD_ETHER);
        let mac = if ether {
            Some(
                nix::ifaddrs::getifaddrs()?
                    .filter(|ifa| ifa.interface_name == iface)
                    .find_map(|ifa| ifa.address?.as_link_addr()?.addr())
                    .ok_or_else(|| io::Error::other("no link address"))?,
            )
        } else {
            None
        };
        let replies = echo_socket(IpAddr::V4(dst))?;
        let icmp = echo_request(IpAddr::V4(dst));
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(20 + icmp.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_ICMP as u8, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut frame = Vec::new();
        if let Some(mac) = mac {
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&mac);
            if let Some(id) = vlan {
                frame.extend_from_slice(&(libc::ETH_P_8021Q as u16).to_be_bytes());
                frame.extend_from_slice(&id.to_be_bytes());
            }
            frame.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
        }
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&icmp);
        // Protocol 0: it receives nothing, it only sends.
        let fd = packet_socket()?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = label.to_be();
        to.sll_ifindex = index as i32;
        if mac.is_some() {
            to.sll_halen = 6;
            to.sll_addr[..6].fill(0xff);
        }
        // SAFETY: the frame and the address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(echo_reply(&replies, IpAddr::V4(dst))?)
    };
    match run() {
        Ok(true) => "ok".into(),
        Ok(false) => "timeout".into(),
        Err(e) => word(&e),
    }
}

/// A packet socket of protocol 0: it receives nothing until bound to a protocol.
fn packet_socket() -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Socket options: PACKET_QDISC_BYPASS turned on and off on a packet socket, and an option with
/// a value larger than a page (SO_BINDTODEVICE, which reads only a name's worth of it) on a UDP
/// socket; prints `on:WORD off:WORD large:WORD`.
fn sockopts() -> String {
    let set = |fd: i32, level: i32, name: i32, value: &[u8]| -> String {
        // SAFETY: the value is valid for its length.
        let got =
            unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as u32) };
        if got == 0 {
            "ok".into()
        } else {
            word(&io::Error::last_os_error())
        }
    };
    let udp = || {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
    };
    let (packet, udp) = match (packet_socket(), udp()) {
        (Ok(packet), Ok(udp)) => (packet, udp),
        (Err(e), _) | (_, Err(e)) => return word(&io::Error::from(e)),
    };
    let bypass = |on: i32| {
        set(
            packet.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &on.to_ne_bytes(),
        )
    };
    let mut large = vec![0u8; 3 * 4096];
    large[..2].copy_from_slice(b"lo");
    format!(
        "on:{} off:{} xdp:{} large:{}",
        bypass(1),
        bypass(0),
        xdp_umem(&set),
        set(
            udp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            &large
        )
    )
}

/// Registers 16 pages as an AF_XDP socket's memory (XDP_UMEM_REG), the first step of setting one
/// up; the word `set` gives for it.
fn xdp_umem(set: &impl Fn(i32, i32, i32, &[u8]) -> String) -> String {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const LEN: usize = 16 * 4096;
    // nix has no AF_XDP family.
    // SAFETY: plain socket(2); the descriptor is owned below at once.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return word(&io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Page-aligned, as the kernel wants it; kept until the process ends.
    let memory: &'static mut [u8] = Vec::leak(vec![0u8; LEN + 4096]);
    let offset = memory.as_ptr().align_offset(4096);
    // SAFETY: all-zero is a valid xdp_umem_reg.
    let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
    reg.addr = memory[offset..].as_ptr() as u64;
    reg.len = LEN as u64;
    reg.chunk_size = 4096;
    // SAFETY: the struct is plain data, viewed as its bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&raw const reg).cast::<u8>(),
            size_of::<libc::xdp_umem_reg>(),
        )
    };
    set(socket.as_raw_fd(), libc::SOL_XDP, libc::XDP_UMEM_REG, bytes)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `n` bytes, half-closes, and reads the reply to its end: `ok` when it is `n` bytes.
fn transfer(addr: SocketAddr, n: usize) -> String {
    let run = || -> io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(&vec![0x5a; n])?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back.len())
    };
    match run() {
        Ok(got) if got == n => "ok".into(),
        Ok(got) => format!("error:got {got} bytes back"),
        Err(e) => word(&e),
    }
}

/// One HTTP/1.1 request whose sender half-closes once it is sent, as `nc -N` and scripts do;
/// the answer is read to its end.
fn http_half_close(addr: SocketAddr, host: &str) -> String {
    let run = || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        s.shutdown(Shutdown::Write)?;
        let mut back = String::new();
        s.read_to_string(&mut back)?;
        Ok(back)
    };
    match run() {
        Ok(back) if back.starts_with("HTTP/1.1 200 ") => {
            format!("ok:{}", back.lines().last().unwrap_or_default())
        }
        Ok(back) => format!(
            "error:answered {:?}",
            back.lines().next().unwrap_or_default()
        ),
        Err(e) => word(&e),
    }
}

fn tls_config(ca: &str) -> io::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(io::Error::other)? {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes a TLS handshake; with `split`, the ClientHello leaves one byte per
/// segment.
fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
    split: bool,
) -> io::Result<Tls> {
    let mut tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    tcp.set_read_timeout(Some(TIMEOUT * 3))?;
    tcp.set_nodelay(true)?;
    let server =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::clone(config), server)
        .map_err(io::Error::other)?;
    if split {
        let mut hello = Vec::new();
        conn.write_tls(&mut hello)?;
        for b in hello {
            tcp.write_all(&[b])?;
            // Let each byte leave in its own segment.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

fn tls_get(tls: &mut Tls, name: &str) -> io::Result<String> {
    write!(
        tls,
        "GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A peer that closes without close_notify still sent its answer.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&response);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_owned())
}

fn tls(addr: SocketAddr, name: &str, ca: &str, split: bool) -> String {
    let run = || -> io::Result<String> {
        let config = tls_config(ca)?;
        let mut tls = tls_connect(addr, name, &config, split)?;
        tls_get(&mut tls, name)
    };
    match run() {
        Ok(body) => format!("ok:{body}"),
        Err(e) => word(&e),
    }
}

fn tls_hold(addr: SocketAddr, name: &str, ca: &str, n: usize) -> String {
    let run = || -> io::Result<()> {
        egress_agent::relay::raise_nofile().map_err(io::Error::from)?;
        let config = tls_config(ca)?;
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            open.push(tls_connect(addr, name, &config, false)?);
        }
        for tls in &mut open {
            let body = tls_get(tls, name)?;
            if body != format!("sni={name}") {
                return Err(io::Error::other(format!("answer {body:?}")));
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

/// A real ClientHello for `name`, as bytes: the proxies under benchmark read no further.
fn client_hello(name: &str) -> io::Result<Vec<u8>> {
    client_hello_with(name, rustls::crypto::ring::default_provider())
}

/// As [`client_hello`], from a client with `provider`'s algorithms.
fn client_hello_with(name: &str, provider: rustls::crypto::CryptoProvider) -> io::Result<Vec<u8>> {
    let provider = std::sync::Arc::new(provider);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server)
        .map_err(io::Error::other)?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    Ok(hello)
}

/// Connects, sends the hello, reads to EOF. Returns the bytes read and when the first came.
fn hello_exchange(addr: SocketAddr, hello: &[u8], buf: &mut [u8]) -> io::Result<(u64, Instant)> {
    exchange(TcpStream::connect_timeout(&addr, TIMEOUT)?, hello, buf)
}

/// [`hello_exchange`] on a connected stream.
fn exchange(mut s: TcpStream, hello: &[u8], buf: &mut [u8]) -> io::Result<(u64, Instant)> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(hello)?;
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = s.read(buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let first = first.ok_or_else(|| io::Error::other("closed before the first byte"))?;
    Ok((total, first))
}

fn hello_bulk(addr: SocketAddr, name: &str) -> String {
    let run = || -> io::Result<String> {
        let hello = client_hello(name)?;
        let mut buf = vec![0u8; 256 << 10];
        let t0 = Instant::now();
        let (bytes, _) = hello_exchange(addr, &hello, &mut buf)?;
        Ok(format!("{bytes} {:.6}", t0.elapsed().as_secs_f64()))
    };
    run().unwrap_or_else(|e| word(&e))
}

/// A ClientHello for `name` (offering an X25519 key share first, as rustls does), then, once the
/// server has answered, one for `second` offering P-256 alone, as a client asked again would
/// send. Prints the first hello's length and how the connection ended.
fn hello_again(addr: SocketAddr, name: &str, second: &str) -> String {
    let run = || -> io::Result<String> {
        let first = client_hello(name)?;
        let again = client_hello_with(
            second,
            rustls::crypto::CryptoProvider {
                kx_groups: vec![rustls::crypto::ring::kx_group::SECP256R1],
                ..rustls::crypto::ring::default_provider()
            },
        )?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT * 3))?;
        s.write_all(&first)?;
        let mut buf = [0u8; 4096];
        if s.read(&mut buf)? == 0 {
            return Ok(format!("{} closed before an answer", first.len()));
        }
        // The relay may have closed already: what the write meets is part of the outcome.
        let ended = match s.write_all(&again) {
            Err(e) => word(&e),
            Ok(()) => loop {
                match s.read(&mut buf) {
                    Ok(0) => break "closed".to_owned(),
                    Ok(_) => {}
                    Err(e) => break word(&e),
                }
            },
        };
        Ok(format!("{} {ended}", first.len()))
    };
    run().unwrap_or_else(|e| word(&e))
}

fn hello_hold(addr: SocketAddr, name: &str, n: usize) -> String {
    let run = || -> io::Result<()> {
        let hello = client_hello(name)?;
        let held = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
                s.write_all(&hello)?;
                Ok(s)
            })
            .collect::<io::Result<Vec<_>>>()?;
        hold("held")?;
        drop(held);
        Ok(())
    };
    match run() {
        Ok(()) => "ok".into(),
        Err(e) => word(&e),
    }
}

fn hello_echo(addr: SocketAddr, name: &str, n: usize) -> String {
    let run = || -> io::Result<String> {
        let hello = client_hello(name)?;
        let pattern: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let expected = [&hello[..], &pattern].concat();
        // After a stream, a pause: these bytes come alone, and nothing follows until their echo.
        let tail = b"and after a pause, a few bytes more";
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut writer = s.try_clone()?;
        let sent = pattern.clone();
        let (echoed, all_back) = std::sync::mpsc::channel::<()>();
        // Written while the echo is read: neither side's buffers have to hold it all.
        let send = std::thread::spawn(move || -> io::Result<()> {
            writer.write_all(&hello)?;
            writer.write_all(&sent)?;
            if all_back.recv().is_ok() {
                writer.write_all(tail)?;
            }
            if all_back.recv().is_ok() {
                writer.shutdown(Shutdown::Write)?;
            }
            Ok(())
        });
        let mut back = vec![0; expected.len()];
        let got = read_full(&s, &mut back)?;
        back.truncate(got);
        if back == expected {
            let _ = echoed.send(());
            let mut echo = [0u8; 64];
            let echo = &mut echo[..tail.len()];
            let got = read_full(&s, echo)?;
            if echo[..got] != tail[..] {
                drop(echoed);
                let _ = send.join();
                return Ok(format!("error:the pause's {got} bytes back differ"));
            }
            let _ = echoed.send(());
            let mut rest = Vec::new();
            (&s).read_to_end(&mut rest)?;
            back.extend_from_slice(&rest);
        }
        drop(echoed);
        send.join()
            .map_err(|_| io::Error::other("sender panicked"))??;
        Ok(if back == expected {
            "ok".to_owned()
        } else {
            let at = back
                .iter()
                .zip(&expected)
                .take_while(|(a, b)| a == b)
                .count();
            format!(
                "error:{} bytes back of {}, first difference at {at}",
                back.len(),
                expected.len()
            )
        })
    };
    run().unwrap_or_else(|e| word(&e))
}

/// Reads until `buf` is full or the stream ends; returns how much came.
fn read_full(mut s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn hello_rate(addr: SocketAddr, name: &str, n: usize, clients: usize) -> String {
    let run = || -> io::Result<String> {
        let hello = client_hello(name)?;
        let t0 = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|i| {
                let hello = hello.clone();
                let count = n / clients + usize::from(i < n % clients);
                std::thread::spawn(move || -> io::Result<Vec<u64>> {
                    let mut buf = vec![0u8; 4096];
                    let mut ttfb = Vec::with_capacity(count);
                    for _ in 0..count {
                        let start = Instant::now();
                        let (_, first) = hello_exchange(addr, &hello, &mut buf)?;
                        ttfb.push((first - start).as_micros() as u64);
                    }
                    Ok(ttfb)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for t in threads {
            all.extend(
                t.join()
                    .map_err(|_| io::Error::other("client panicked"))??,
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| all[egress_tests::rank(all.len(), p)];
        Ok(format!("{secs:.6} {} {}", pct(0.50), pct(0.99)))
    };
    run().unwrap_or_else(|e| word(&e))
}

/// Connections to several paths in turn, each from its own cgroup: `n` a path, in a new random
/// order every turn, so that each path follows each other alike. Every path meets the machine as
/// it is at the same moments, so noise that moves separate runs apart moves them alike. The
/// sockets are made first, each path's in its cgroup (the probe moves itself between them), and
/// each is timed from connect() to the first byte.
fn hello_turns(name: &str, n: usize, paths: &[(String, SocketAddr)]) -> String {
    use nix::sys::{
        resource::{Resource, setrlimit},
        socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket},
    };
    let run = || -> io::Result<String> {
        let hello = client_hello(name)?;
        let fds = (n * paths.len() + 64) as u64;
        setrlimit(Resource::RLIMIT_NOFILE, fds, fds).map_err(io::Error::from)?;
        let mut sockets = Vec::with_capacity(paths.len());
        for (cgroup, addr) in paths {
            std::fs::write(std::path::Path::new(cgroup).join("cgroup.procs"), "0")?;
            let family = match addr {
                SocketAddr::V4(_) => AddressFamily::Inet,
                SocketAddr::V6(_) => AddressFamily::Inet6,
            };
            let made = (0..n)
                .map(|_| socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None))
                .collect::<Result<Vec<_>, _>>()?;
            sockets.push(made.into_iter());
        }
        let to: Vec<SockaddrStorage> = paths.iter().map(|(_, a)| (*a).into()).collect();
        let mut buf = vec![0u8; 4096];
        let mut took = vec![Vec::with_capacity(n); paths.len()];
        let mut order: Vec<usize> = (0..paths.len()).collect();
        for _ in 0..n {
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut rand::rng());
            for &k in &order {
                let fd = sockets[k]
                    .next()
                    .ok_or_else(|| io::Error::other("no socket left"))?;
                let start = Instant::now();
                connect(fd.as_raw_fd(), &to[k])?;
                let (_, first) = exchange(TcpStream::from(fd), &hello, &mut buf)?;
                took[k].push((first - start).as_micros() as u64);
            }
        }
        // Each time, not a summary: the i-th of every line was taken in the same turn, so the
        // bench can resample whole turns to tell how far apart two paths really are.
        let lines: Vec<String> = took
            .iter()
            .map(|t| t.iter().map(u64::to_string).collect::<Vec<_>>().join(" "))
            .collect();
        Ok(lines.join("\n"))
    };
    run().unwrap_or_else(|e| word(&e))
}

/// Requests and answers that end while the connection stays open, as a kept-alive HTTP
/// connection's do: the last bytes of each must come without waiting for more behind them.
fn hello_replies(addr: SocketAddr, name: &str, n: usize, up: usize, down: usize) -> String {
    let run = || -> io::Result<String> {
        let hello = client_hello(name)?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let size = |bytes: usize| {
            u32::try_from(bytes)
                .map(u32::to_be_bytes)
                .map_err(|_| io::Error::other("too large"))
        };
        let mut request = [size(down)?, size(up)?].concat();
        request.resize(8 + up, 0);
        s.write_all(&hello)?;
        // The server's answer to the hello.
        s.read_exact(&mut [0u8; 64])?;
        let mut answer = vec![0u8; down];
        let mut took = Vec::with_capacity(n + 1);
        for _ in 0..=n {
            let start = Instant::now();
            s.write_all(&request)?;
            s.read_exact(&mut answer)?;
            took.push(start.elapsed().as_micros() as u64);
        }
        // The first went with the connection's setup.
        took.remove(0);
        s.shutdown(Shutdown::Write)?;
        if s.read(&mut answer)? != 0 {
            return Err(io::Error::other("more than was asked for"));
        }
        took.sort_unstable();
        let pct = |p: f64| took[egress_tests::rank(took.len(), p)];
        Ok(format!("{} {}", pct(0.50), pct(0.99)))
    };
    run().unwrap_or_else(|e| word(&e))
}

fn peer(addr: SocketAddr) -> String {
    match TcpStream::connect_timeout(&addr, TIMEOUT).and_then(|s| s.peer_addr()) {
        Ok(p) => format!("ok:{p}"),
        Err(e) => word(&e),
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let flag = args.first().cloned();
    match flag.as_deref() {
        Some(flag @ ("--netns" | "--thread-netns")) => {
            let Some(path) = args.get(1).cloned() else {
                return usage();
            };
            args.drain(..2);
            if flag == "--netns" {
                return enter(&path).map_or_else(|code| code, |()| run(&args));
            }
            // setns(2) moves the calling thread only.
            std::thread::spawn(move || enter(&path).map_or_else(|code| code, |()| run(&args)))
                .join()
                .unwrap_or(ExitCode::FAILURE)
        }
        _ => run(&args),
    }
}

/// Moves the calling thread into network namespace `path`: the mode's sockets are made there.
fn enter(path: &str) -> Result<(), ExitCode> {
    let entered = std::fs::File::open(path).and_then(|ns| {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    });
    entered.map_err(|e| {
        println!("error:entering {path}: {e}");
        ExitCode::FAILURE
    })
}

/// Runs the mode `args` name.
fn run(args: &[String]) -> ExitCode {
    let addr = |i: usize| -> Option<SocketAddr> { args.get(i)?.parse().ok() };
    let out = match (args.first().map(String::as_str), addr(1)) {
        (Some("tcp"), Some(a)) => tcp(a),
        (Some("tcp-hold"), Some(a)) => tcp_hold(a),
        (Some("connect-hold"), Some(a)) => connect_hold(a),
        (Some("same-port"), Some(a)) if args.len() == 4 => {
            match (args[2].parse(), args[3].parse()) {
                (Ok(first), Ok(second)) => same_port(a, first, second),
                _ => return usage(),
            }
        }
        (Some("tcp-mark"), Some(a)) if args.len() == 3 => match parse_u32(&args[2]) {
            Some(mark) => tcp_mark(a, mark),
            None => return usage(),
        },
        (Some("redial"), Some(a)) if args.len() == 3 => match args[2].parse() {
            Ok(then) => redial(a, then),
            Err(_) => return usage(),
        },
        (Some("udp"), Some(a)) => udp(a, true),
        (Some("udp-sendto"), Some(a)) => udp(a, false),
        (Some("dns"), Some(a)) if args.len() == 3 => dns(a, &args[2]),
        (Some("bench-connect"), Some(a)) if args.len() == 3 => match args[2].parse() {
            Ok(n) => bench_connect(a, n),
            Err(_) => return usage(),
        },
        (Some("sendto-repeat"), Some(a)) if matches!(args.len(), 3 | 4) => {
            let pause = args.get(3).map(|p| p.parse().map(Duration::from_millis));
            match (args[2].parse(), pause.transpose()) {
                (Ok(n), Ok(pause)) => sendto_repeat(a, n, pause),
                _ => return usage(),
            }
        }
        (Some("udp-many"), Some(a)) if args.len() == 4 => {
            match (args[2].parse(), args[3].parse()) {
                (Ok(sockets), Ok(calls)) => udp_many(a, sockets, calls),
                _ => return usage(),
            }
        }
        (Some("udp-alternate"), Some(a)) if args.len() == 4 => {
            match (args[2].parse(), args[3].parse()) {
                (Ok(b), Ok(n)) => udp_alternate(a, b, n),
                _ => return usage(),
            }
        }
        (Some("bench-socket"), Some(a)) if args.len() == 3 => match args[2].parse() {
            Ok(n) => bench_socket(a, n),
            Err(_) => return usage(),
        },
        (Some("tls"), Some(a)) if args.len() == 4 || args.len() == 5 => tls(
            a,
            &args[2],
            &args[3],
            args.get(4).map(String::as_str) == Some("split"),
        ),
        (Some("tls-hold"), Some(a)) if args.len() == 5 => match args[4].parse() {
            Ok(n) => tls_hold(a, &args[2], &args[3], n),
            Err(_) => return usage(),
        },
        (Some("peer"), Some(a)) => peer(a),
        (Some("tcp-repeat"), Some(a)) if matches!(args.len(), 3 | 4) => {
            match (args[2].parse(), args.get(3).map(String::as_str)) {
                (Ok(n), None) => tcp_repeat(a, n, false),
                (Ok(n), Some("reset")) => tcp_repeat(a, n, true),
                _ => return usage(),
            }
        }
        (Some("collide"), Some(a)) if args.len() == 3 => match args[2].parse() {
            Ok(then) => collide(a, then),
            Err(_) => return usage(),
        },
        (Some("solicit"), _) => match args.get(1).and_then(|a| a.parse().ok()) {
            Some(ip) => solicit(ip),
            None => return usage(),
        },
        (Some("hello-bulk"), Some(a)) if args.len() == 3 => hello_bulk(a, &args[2]),
        (Some("hello-again"), Some(a)) if args.len() == 4 => hello_again(a, &args[2], &args[3]),
        (Some("hello-echo"), Some(a)) if args.len() == 4 => match args[3].parse() {
            Ok(n) => hello_echo(a, &args[2], n),
            Err(_) => return usage(),
        },
        (Some("hello-hold"), Some(a)) if args.len() == 4 => match args[3].parse() {
            Ok(n) => hello_hold(a, &args[2], n),
            Err(_) => return usage(),
        },
        (Some("hello-rate"), Some(a)) if args.len() == 5 => {
            match (args[3].parse(), args[4].parse()) {
                (Ok(n), Ok(c)) if c > 0 && n >= c => hello_rate(a, &args[2], n, c),
                _ => return usage(),
            }
        }
        (Some("hello-turns"), _) if args.len() > 3 => {
            let paths: Option<Vec<(String, SocketAddr)>> = args[3..]
                .iter()
                .map(|p| {
                    let (cgroup, addr) = p.rsplit_once('=')?;
                    Some((cgroup.to_owned(), addr.parse().ok()?))
                })
                .collect();
            match (args[2].parse(), paths) {
                (Ok(n), Some(paths)) if n > 0 => hello_turns(&args[1], n, &paths),
                _ => return usage(),
            }
        }
        (Some("hello-replies"), Some(a)) if args.len() == 6 => {
            match (args[3].parse(), args[4].parse(), args[5].parse()) {
                (Ok(n), Ok(up), Ok(down)) if n > 0 && down > 0 => {
                    hello_replies(a, &args[2], n, up, down)
                }
                _ => return usage(),
            }
        }
        (Some("http-half-close"), Some(a)) if args.len() == 3 => http_half_close(a, &args[2]),
        (Some("transfer"), Some(a)) if args.len() == 3 => match args[2].parse() {
            Ok(n) => transfer(a, n),
            Err(_) => return usage(),
        },
        (Some("ping"), _) if args.len() == 2 => match args[1].parse() {
            Ok(ip) => ping(ip),
            Err(_) => return usage(),
        },
        (Some("frame-ping"), _) if args.len() == 5 || args.len() == 6 => {
            let vlan = args.get(5).map(|v| v.parse());
            match (args[2].parse(), args[3].parse(), vlan) {
                (Ok(src), Ok(dst), None) => frame_ping(&args[1], src, dst, &args[4], None),
                (Ok(src), Ok(dst), Some(Ok(id))) => {
                    frame_ping(&args[1], src, dst, &args[4], Some(id))
                }
                _ => return usage(),
            }
        }
        (Some("sockopts"), _) => sockopts(),
        _ => return usage(),
    };
    println!("{out}");
    ExitCode::SUCCESS
}

/// A decimal or `0x` hexadecimal u32.
fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: egress-probe [--netns|--thread-netns PATH] MODE, MODE one of: \
         tcp|tcp-hold|connect-hold|udp|udp-sendto ADDR:PORT | tcp-mark ADDR:PORT MARK | \
         redial|collide ADDR:PORT THEN:PORT | tcp-repeat ADDR:PORT N [reset] | same-port ADDR:PORT CPU CPU | \
         sendto-repeat ADDR:PORT N [PAUSE_MS] | udp-many ADDR:PORT SOCKETS N | \
         dns SERVER:PORT NAME | \
         bench-connect ADDR:PORT N | ping ADDR | frame-ping IFACE SRC4 DST4 ip|arp [VLAN] | sockopts | transfer ADDR:PORT N | \
         tls ADDR:PORT NAME CA [split] | tls-hold ADDR:PORT NAME CA N | peer ADDR:PORT | \
         hello-bulk ADDR:PORT NAME | hello-again ADDR:PORT NAME SECOND | \
         hello-echo|hello-hold ADDR:PORT NAME N | \
         hello-rate ADDR:PORT NAME N C | hello-replies ADDR:PORT NAME N UP DOWN | \
         hello-turns NAME N CGROUP=ADDR:PORT..."
    );
    ExitCode::from(2)
}
