//! Reading a TLS ClientHello off a connection without answering it: every byte read is kept, to be
//! sent upstream unchanged once the hello has been judged.
//!
//! The hello is read here, not by a TLS library: the relay needs two names from it, once per
//! connection, and rustls's parse of every extension was about a fifth of the relay's user time
//! per connection (21 of the connection's 30 allocations). The reading is strict where the names are concerned, so
//! that the relay judges the names the upstream will see: one server name, of the host-name type,
//! a valid DNS name; neither extension twice; every length consistent. What else the hello holds
//! is the upstream's to judge.
use std::{io, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    time::timeout_at,
};

/// What the relay needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// Every byte read so far: the hello and whatever followed it in the same reads.
    pub bytes: Vec<u8>,
    /// Where the hello's records end in `bytes`: what follows came after the hello.
    pub end: usize,
}

/// Why no ClientHello was read. The text goes into the relay event's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("not enough bytes from the client to tell its protocol within {0:?}")]
    Silent(Duration),
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
    #[error("connection closed before a complete ClientHello")]
    Closed,
    #[error("connection closed before enough bytes to tell its protocol")]
    ClosedEarly,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(&'static str),
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Bytes asked for per read.
const READ: usize = 4096;

/// Reads until a whole ClientHello has arrived, however it is split across segments and TLS
/// records, giving up after `limit` bytes or at `wait`.
pub async fn read<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: usize,
    wait: Duration,
) -> Result<Hello, HelloError> {
    // Read straight into `bytes`: a buffer held across the await would sit in every relay
    // connection's future, which is moved (copied) when the connection's task is spawned.
    read_from(
        stream,
        Vec::with_capacity(READ),
        Records::default(),
        limit,
        wait,
    )
    .await
}

/// [`read`] for a connection just accepted: what the client has sent already is taken at once,
/// without waiting. A TLS client speaks first, and by the time the relay has the connection its
/// hello has mostly arrived; the runtime reads a new socket only after its first readiness
/// event, a turn of its loop later, inside the first byte's wait.
pub async fn read_accepted(
    stream: &mut tokio::net::TcpStream,
    limit: usize,
    wait: Duration,
) -> Result<Hello, HelloError> {
    use std::os::fd::AsRawFd as _;

    use nix::{
        errno::Errno,
        sys::socket::{MsgFlags, recv},
    };

    let mut bytes = vec![0; (limit + 1).min(READ)];
    match recv(stream.as_raw_fd(), &mut bytes, MsgFlags::MSG_DONTWAIT) {
        // Also 0, the client's end closed: read again below, through the runtime, which says so.
        Ok(n) => bytes.truncate(n),
        // Nothing yet.
        Err(Errno::EAGAIN | Errno::EINTR) => bytes.clear(),
        Err(e) => return Err(HelloError::Io(e.into())),
    }
    if bytes.len() > limit {
        return Err(HelloError::TooLarge(limit));
    }
    read_from(stream, bytes, Records::default(), limit, wait).await
}

/// Reads the ClientHello a client sends in answer to a HelloRetryRequest, starting with `held`,
/// the bytes it sent after its first hello, as [`read`] reads a first one. Before it may come
/// ChangeCipherSpec records (TLS 1.3's middlebox compatibility, RFC 8446 §D.4) and early data
/// sent with the first hello, which the server skips after a HelloRetryRequest (§4.2.10); they
/// pass on with the hello.
pub async fn read_again<R: AsyncRead + Unpin>(
    stream: &mut R,
    held: Vec<u8>,
    limit: usize,
    wait: Duration,
) -> Result<Hello, HelloError> {
    let records = Records {
        after_retry: true,
        ..Records::default()
    };
    read_from(stream, held, records, limit, wait).await
}

async fn read_from<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut bytes: Vec<u8>,
    mut records: Records,
    limit: usize,
    wait: Duration,
) -> Result<Hello, HelloError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(Names { sni, alpn }) = records.feed(&bytes).map_err(HelloError::NotTls)? {
            let end = records.next;
            return Ok(Hello {
                sni,
                alpn,
                bytes,
                end,
            });
        }
        let room = (limit + 1).saturating_sub(bytes.len()).min(READ);
        bytes.reserve(room);
        let n = timeout_at(
            deadline,
            (&mut *stream).take(room as u64).read_buf(&mut bytes),
        )
        .await
        .map_err(|_| HelloError::Timeout(wait))??;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        if bytes.len() > limit {
            return Err(HelloError::TooLarge(limit));
        }
    }
}

/// What a client's first bytes are, on a port whose protocol is not declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.1 request line's method.
    Http,
    /// HTTP/2 without TLS (its connection preface).
    Http2,
    /// Anything else.
    Other,
}

/// HTTP/2's connection preface, as far as it must be read to be told (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HT";

/// The methods an HTTP/1.1 request line starts with, with their space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Tells what `first` (a client's first bytes) are; `None` while they could still be the start of
/// more than one.
pub fn detect(first: &[u8]) -> Option<Detected> {
    match first.first()? {
        &HANDSHAKE => Some(Detected::Tls),
        _ if METHODS.iter().any(|m| first.starts_with(m)) => Some(Detected::Http),
        _ if first.starts_with(PREFACE) => Some(Detected::Http2),
        _ if METHODS
            .iter()
            .chain([&PREFACE])
            .any(|m| m.starts_with(first) && first.len() < m.len()) =>
        {
            None
        }
        _ => Some(Detected::Other),
    }
}

/// Waits for a client's first bytes, without taking them, until [`detect`] can tell what they
/// are, at `wait` at the latest.
pub async fn sniff(stream: &tokio::net::TcpStream, wait: Duration) -> Result<Detected, HelloError> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{MsgFlags, recv};
    use tokio::io::Interest;

    let deadline = tokio::time::Instant::now() + wait;
    // The longest method and its space, as long as the preface's part that tells it.
    let mut first = [0u8; 8];
    let mut peek = || {
        let n = recv(
            stream.as_raw_fd(),
            &mut first,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )?;
        if n == 0 {
            return Ok(None);
        }
        match detect(&first[..n]) {
            Some(d) => Ok(Some(d)),
            // A request line's start, with more on its way: waiting for readiness again, as for
            // nothing read, waits for the next bytes instead of peeking at these again.
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    };
    // Looked at before the first wait: the runtime knows a new socket readable only after its
    // first readiness event, and the client's first bytes have mostly arrived (`read_accepted`).
    let mut seen: io::Result<Option<Detected>> = peek();
    loop {
        match seen {
            Ok(Some(d)) => return Ok(d),
            Ok(None) => return Err(HelloError::ClosedEarly),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        timeout_at(deadline, stream.readable())
            .await
            .map_err(|_| HelloError::Silent(wait))??;
        seen = stream.try_io(Interest::READABLE, &mut peek);
    }
}

/// The random of a ServerHello that is a HelloRetryRequest (RFC 8446 §4.1.3).
const RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// Handshake message type of a ServerHello.
const SERVER_HELLO: u8 = 2;

/// Whether a server's first bytes are a HelloRetryRequest, which lets the client send a second
/// ClientHello; `None` until enough of them have come. The message may be split across records
/// as a hello may; anything but a handshake record first is no HelloRetryRequest.
pub fn retry_request(bytes: &[u8]) -> Option<bool> {
    // Message type, length, version and random.
    const HEAD: usize = 4 + 2 + 32;
    let mut head = [0u8; HEAD];
    let mut got = 0;
    let mut at = 0;
    while got < HEAD {
        let header = bytes.get(at..at + 5)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // Empty handshake records are forbidden (RFC 8446 §5.1); taking them would let a
        // server keep the relay reading for ever.
        if header[0] != HANDSHAKE || len == 0 {
            return Some(false);
        }
        let fragment = &bytes[(at + 5).min(bytes.len())..(at + 5 + len).min(bytes.len())];
        let take = fragment.len().min(HEAD - got);
        head[got..got + take].copy_from_slice(&fragment[..take]);
        got += take;
        if fragment.len() < len && got < HEAD {
            return None;
        }
        at += 5 + len;
    }
    Some(head[0] == SERVER_HELLO && head[6..] == RETRY_RANDOM)
}

/// The names the relay judges a connection by.
#[derive(Debug, PartialEq, Eq)]
struct Names {
    sni: Option<String>,
    alpn: Vec<String>,
}

/// The TLS records read so far. Each byte is looked at once however the hello arrives (a hello
/// sent a byte at a time, or in one-byte records, is not parsed again for each).
#[derive(Default)]
struct Records {
    /// Where the next record starts in the bytes read.
    next: usize,
    /// Where the hello's first record starts.
    first: usize,
    /// Whether ChangeCipherSpec and early data records may come before the hello.
    after_retry: bool,
    /// The handshake bytes of the records read, once the hello has outgrown the first record.
    joined: Vec<u8>,
}

/// TLS record content types.
const CHANGE_CIPHER_SPEC: u8 = 20;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Largest plaintext record (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 1 << 14;
/// Extension types (RFC 6066 §3, RFC 7301 §3.1).
const SERVER_NAME: u16 = 0;
const ALPN: u16 = 16;

impl Records {
    /// Takes the records complete in `bytes` (all bytes read so far, growing) that it has not
    /// taken yet; the names once the ClientHello is complete.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<Names>, &'static str> {
        while self.after_retry {
            let Some(header) = bytes.get(self.next..self.next + 5) else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let size = match header[0] {
                CHANGE_CIPHER_SPEC if header[1] != 3 || len != 1 => {
                    return Err("a malformed ChangeCipherSpec");
                }
                CHANGE_CIPHER_SPEC => 6,
                // Encrypted: up to 256 bytes over the plaintext limit (RFC 8446 §5.2).
                APPLICATION_DATA if header[1] != 3 || len > MAX_FRAGMENT + 256 => {
                    return Err("a malformed early data record");
                }
                APPLICATION_DATA => 5 + len,
                _ => {
                    (self.first, self.after_retry) = (self.next, false);
                    break;
                }
            };
            let Some(record) = bytes.get(self.next..self.next + size) else {
                return Ok(None);
            };
            if header[0] == CHANGE_CIPHER_SPEC && record[5] != 1 {
                return Err("a malformed ChangeCipherSpec");
            }
            self.next += size;
        }
        loop {
            let Some(header) = bytes.get(self.next..self.next + 5) else {
                return Ok(None);
            };
            if header[0] != HANDSHAKE {
                return Err("not a handshake record");
            }
            if header[1] != 3 {
                return Err("not a TLS record version");
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len == 0 || len > MAX_FRAGMENT {
                return Err("a handshake record of an impossible length");
            }
            let start = self.next + 5;
            let Some(fragment) = bytes.get(start..start + len) else {
                return Ok(None);
            };
            self.next = start + len;
            // Mostly the hello fits in its first record: read where it lies.
            if start == self.first + 5 {
                if let Some(names) = client_hello(fragment)? {
                    return Ok(Some(names));
                }
                self.joined.extend_from_slice(fragment);
            } else {
                self.joined.extend_from_slice(fragment);
                if let Some(names) = client_hello(&self.joined)? {
                    return Ok(Some(names));
                }
            }
        }
    }
}

/// The names in the ClientHello that starts `handshake`, once it is complete.
fn client_hello(handshake: &[u8]) -> Result<Option<Names>, &'static str> {
    let Some(header) = handshake.get(..4) else {
        return Ok(None);
    };
    if header[0] != CLIENT_HELLO {
        return Err("the first handshake message is not a ClientHello");
    }
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    match handshake.get(4..4 + len) {
        // A hello is alone in its flight: a message after it in its record would pass on to
        // the upstream unjudged (a second hello, read after a HelloRetryRequest).
        Some(_) if handshake.len() > 4 + len => Err("handshake data after the ClientHello"),
        Some(body) => names(body).map(Some),
        None => Ok(None),
    }
}

/// A ClientHello's body (RFC 8446 §4.1.2; TLS 1.0 to 1.2 share its layout).
fn names(body: &[u8]) -> Result<Names, &'static str> {
    const MALFORMED: &str = "a malformed ClientHello";
    let mut hello = Cursor(body);
    let version = hello.take(2).ok_or(MALFORMED)?;
    if version[0] != 3 {
        return Err("not a TLS version");
    }
    hello.take(32).ok_or(MALFORMED)?;
    let session = hello.list8().ok_or(MALFORMED)?;
    let suites = hello.list16().ok_or(MALFORMED)?;
    let compression = hello.list8().ok_or(MALFORMED)?;
    if session.len() > 32 || suites.is_empty() || suites.len() % 2 != 0 || compression.is_empty() {
        return Err(MALFORMED);
    }
    let mut found = Names {
        sni: None,
        alpn: Vec::new(),
    };
    // A hello without extensions (TLS 1.2 and older allow it) names no server.
    if hello.0.is_empty() {
        return Ok(found);
    }
    let mut extensions = Cursor(hello.list16().ok_or(MALFORMED)?);
    if !hello.0.is_empty() {
        return Err(MALFORMED);
    }
    let (mut sni_seen, mut alpn_seen) = (false, false);
    while !extensions.0.is_empty() {
        let kind = extensions.u16().ok_or(MALFORMED)?;
        let data = extensions.list16().ok_or(MALFORMED)?;
        match kind {
            SERVER_NAME if sni_seen => return Err("two server name extensions"),
            SERVER_NAME => {
                sni_seen = true;
                found.sni = Some(server_name(data)?);
            }
            ALPN if alpn_seen => return Err("two ALPN extensions"),
            ALPN => {
                alpn_seen = true;
                found.alpn = protocols(data)?;
            }
            _ => {}
        }
    }
    Ok(found)
}

/// The server name extension's one host name (RFC 6066 §3: one name per type, and no type but
/// the host name was ever defined; OpenSSL refuses anything else too).
fn server_name(data: &[u8]) -> Result<String, &'static str> {
    const MALFORMED: &str = "a malformed server name extension";
    let mut ext = Cursor(data);
    let mut list = Cursor(ext.list16().ok_or(MALFORMED)?);
    if !ext.0.is_empty() {
        return Err(MALFORMED);
    }
    if list.u8().ok_or(MALFORMED)? != 0 {
        return Err("a server name that is not a host name");
    }
    let name = list.list16().ok_or(MALFORMED)?;
    if !list.0.is_empty() {
        return Err("more than one server name");
    }
    if !is_dns_name(name) {
        return Err("a server name that is not a DNS name");
    }
    // ASCII (checked above), and in lower case as TLS servers compare it.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// The ALPN extension's protocols, in the client's order.
fn protocols(data: &[u8]) -> Result<Vec<String>, &'static str> {
    const MALFORMED: &str = "a malformed ALPN extension";
    let mut ext = Cursor(data);
    let mut list = Cursor(ext.list16().ok_or(MALFORMED)?);
    if !ext.0.is_empty() || list.0.is_empty() {
        return Err(MALFORMED);
    }
    let mut protocols = Vec::new();
    while !list.0.is_empty() {
        let name = list.list8().filter(|n| !n.is_empty()).ok_or(MALFORMED)?;
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

/// A DNS name as TLS libraries take one for SNI: at most 253 bytes, labels of 1 to 63 letters,
/// digits, hyphens (not first or last) and underscores, an optional final dot, and a last label
/// that is not all digits (which would be an IPv4 address, not a name).
fn is_dns_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    let mut last_numeric = false;
    for label in name.split(|&b| b == b'.') {
        let well_formed = (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with(b"-")
            && !label.ends_with(b"-");
        if !well_formed {
            return false;
        }
        last_numeric = label.iter().all(u8::is_ascii_digit);
    }
    !last_numeric
}

/// Reads big-endian fields and length-prefixed lists off a slice; None when it runs short.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn list8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    fn list16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request line split after its first bytes is told once the rest comes; bytes that never
    /// tell give up at the limit. Nothing is taken off the socket.
    #[tokio::test]
    async fn sniffing_waits_for_the_bytes_that_tell() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("address");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        client.write_all(b"GE").await.expect("send");
        let more = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"T / HTTP/1.1\r\n").await.expect("send");
        };
        let (told, ()) = tokio::join!(sniff(&server, Duration::from_secs(5)), more);
        assert_eq!(told.expect("told"), Detected::Http);
        let mut line = [0u8; 16];
        server.read_exact(&mut line).await.expect("read");
        assert_eq!(
            &line, b"GET / HTTP/1.1\r\n",
            "the bytes stay for the server"
        );

        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(b"P").await.expect("send");
        let started = std::time::Instant::now();
        let told = sniff(&server, Duration::from_millis(200)).await;
        assert!(matches!(told, Err(HelloError::Silent(_))), "{told:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn a_clients_first_bytes_tell_its_protocol_once_they_can() {
        for (first, want) in [
            (&b"\x16\x03\x01"[..], Some(Detected::Tls)),
            (b"\x16", Some(Detected::Tls)),
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http)),
            (b"OPTIONS ", Some(Detected::Http)),
            (b"PATCH /x", Some(Detected::Http)),
            (b"PRI * HTTP/2.0\r\n", Some(Detected::Http2)),
            (b"PRI * HT", Some(Detected::Http2)),
            (b"PRI *", None),
            (b"PRX", Some(Detected::Other)),
            (b"GETX", Some(Detected::Other)),
            (b"\x00\x00", Some(Detected::Other)),
            (b"*1\r\n", Some(Detected::Other)),
            (b"", None),
            (b"P", None),
            (b"PO", None),
            (b"OPTIONS", None),
        ] {
            assert_eq!(detect(first), want, "{first:?}");
        }
    }

    /// A real ClientHello, as rustls's client writes it.
    fn client_hello(name: &str) -> Vec<u8> {
        hello_with(name, &[b"h2", b"http/1.1"], false)
    }

    fn hello_with(name: &str, alpn: &[&[u8]], tls12: bool) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider);
        let builder = if tls12 {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            builder.with_safe_default_protocol_versions()
        };
        let mut config = builder
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_owned().try_into().expect("server name"),
        )
        .expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    /// The names rustls's server side reads from `bytes`.
    fn rustls_names(bytes: &[u8]) -> Names {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rest = bytes;
        while !rest.is_empty() {
            acceptor.read_tls(&mut rest).expect("read");
        }
        let accepted = acceptor.accept().ok().flatten().expect("a whole hello");
        let hello = accepted.client_hello();
        Names {
            sni: hello.server_name().map(str::to_owned),
            alpn: hello
                .alpn()
                .into_iter()
                .flatten()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Option<Names>, &'static str> {
        Records::default().feed(bytes)
    }

    /// The hello's handshake message re-framed into records of `size` bytes each.
    fn reframed(bytes: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        let mut out = Vec::new();
        for chunk in bytes[5..5 + len].chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A TLS 1.2 ClientHello record built by hand with `extensions` (type, data), or none at all.
    fn crafted(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        if let Some(extensions) = extensions {
            let mut all = Vec::new();
            for (kind, data) in extensions {
                all.extend_from_slice(&kind.to_be_bytes());
                all.extend_from_slice(&(data.len() as u16).to_be_bytes());
                all.extend_from_slice(data);
            }
            body.extend_from_slice(&(all.len() as u16).to_be_bytes());
            body.extend_from_slice(&all);
        }
        let mut handshake = vec![CLIENT_HELLO, 0];
        handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![HANDSHAKE, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    /// A server name extension's data listing `names` as (type, name).
    fn sni_data(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    fn alpn_data(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    /// The relay reads the names rustls reads, from hellos of TLS 1.3 and 1.2 clients, with and
    /// without ALPN, in one record or spread over many.
    #[test]
    fn reads_the_names_rustls_reads() {
        for (name, alpn, tls12) in [
            ("api.example.com", &[&b"h2"[..], b"http/1.1"][..], false),
            ("a.b", &[][..], false),
            ("UPPER-case_under.example.org", &[&b"x"[..]][..], true),
            (
                "very.long.name.with.many.labels.example.com",
                &[&b"http/1.1"[..]][..],
                true,
            ),
        ] {
            let bytes = hello_with(name, alpn, tls12);
            let expected = rustls_names(&bytes);
            assert_eq!(expected.sni, Some(name.to_lowercase()));
            assert_eq!(parse(&bytes), Ok(Some(expected)), "{name}");
            for size in [1, 2, 7, 100] {
                let split = reframed(&bytes, size);
                assert_eq!(
                    parse(&split),
                    Ok(Some(rustls_names(&split))),
                    "{name} in {size}"
                );
            }
        }
    }

    /// Bytes arriving one at a time: nothing is judged before the hello is whole, and nothing
    /// panics on any prefix.
    #[test]
    fn every_prefix_waits_for_more() {
        for bytes in [
            client_hello("prefix.example.com"),
            reframed(&client_hello("x.y"), 3),
        ] {
            let mut records = Records::default();
            for end in 0..bytes.len() {
                assert_eq!(records.feed(&bytes[..end]), Ok(None), "at {end}");
                assert_eq!(parse(&bytes[..end]), Ok(None), "at {end} at once");
            }
            assert!(matches!(records.feed(&bytes), Ok(Some(_))));
        }
    }

    /// Whatever would let the relay and the upstream read different names is refused.
    #[test]
    fn ambiguous_and_malformed_hellos_are_refused() {
        let name = &b"api.example.com"[..];
        let ok = crafted(Some(&[(SERVER_NAME, sni_data(&[(0, name)]))]));
        assert_eq!(
            parse(&crafted(Some(&[(
                SERVER_NAME,
                sni_data(&[(0, b"API.Example.com")])
            )]))),
            Ok(Some(Names {
                sni: Some("api.example.com".to_owned()),
                alpn: Vec::new()
            }))
        );
        assert_eq!(
            parse(&crafted(None)),
            Ok(Some(Names {
                sni: None,
                alpn: Vec::new()
            }))
        );
        let refused = |extensions: &[(u16, Vec<u8>)]| parse(&crafted(Some(extensions)));
        for (what, extensions) in [
            (
                "two server name extensions",
                vec![
                    (SERVER_NAME, sni_data(&[(0, name)])),
                    (SERVER_NAME, sni_data(&[(0, b"other.example.com")])),
                ],
            ),
            (
                "more than one server name",
                vec![(
                    SERVER_NAME,
                    sni_data(&[(0, name), (0, b"other.example.com")]),
                )],
            ),
            (
                "a server name that is not a host name",
                vec![(SERVER_NAME, sni_data(&[(1, name)]))],
            ),
            (
                "a malformed server name extension",
                vec![(SERVER_NAME, sni_data(&[]))],
            ),
            (
                "two ALPN extensions",
                vec![(ALPN, alpn_data(&[b"h2"])), (ALPN, alpn_data(&[b"h2"]))],
            ),
            (
                "a malformed ALPN extension",
                vec![(ALPN, alpn_data(&[b""]))],
            ),
            ("a malformed ALPN extension", vec![(ALPN, alpn_data(&[]))]),
        ] {
            assert_eq!(refused(&extensions), Err(what));
        }
        for bad in [
            &b"10.0.0.1"[..],
            b"",
            b"a..b",
            b"-a.b",
            b"a-.b",
            b"a b.c",
            b"caf\xc3\xa9.com",
            b"a.b\0",
            &[b'a'; 64][..],
        ] {
            assert_eq!(
                refused(&[(SERVER_NAME, sni_data(&[(0, bad)]))]),
                Err("a server name that is not a DNS name"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A length that runs past its container.
        let mut short = ok.clone();
        let last = short.len() - name.len() - 2;
        short[last] = 0xff;
        assert!(parse(&short).is_err());
        // Bytes after the extensions inside the hello.
        let mut trailing = ok.clone();
        trailing.push(0);
        trailing[4] += 1;
        trailing[8] += 1;
        assert_eq!(parse(&trailing), Err("a malformed ClientHello"));
        // Not a handshake, not a ClientHello, not TLS.
        let mut alert = ok.clone();
        alert[0] = 21;
        assert_eq!(parse(&alert), Err("not a handshake record"));
        let mut server_hello = ok.clone();
        server_hello[5] = 2;
        assert_eq!(
            parse(&server_hello),
            Err("the first handshake message is not a ClientHello")
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err("not a handshake record")
        );
    }

    /// Hellos with bytes changed at random: the reader never panics, and where both it and
    /// rustls's server side read a hello, they read the same server name (or both none). The
    /// cases built to be ambiguous are in the test above.
    #[test]
    fn changed_hellos_never_yield_a_name_rustls_reads_otherwise() {
        // xorshift64: a fixed sequence, so a failure repeats.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let hellos = [
            client_hello("mutate.example.com"),
            hello_with("a.b", &[], true),
            crafted(Some(&[
                (SERVER_NAME, sni_data(&[(0, b"crafted.example.com")])),
                (ALPN, alpn_data(&[b"h2"])),
            ])),
        ];
        let mut agreed = 0;
        for round in 0..6000 {
            let mut bytes = hellos[round % hellos.len()].clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let Ok(Some(ours)) = parse(&bytes) else {
                continue;
            };
            let mut acceptor = rustls::server::Acceptor::default();
            let mut rest = &bytes[..];
            while !rest.is_empty() && acceptor.read_tls(&mut rest).is_ok() {}
            if let Ok(Some(accepted)) = acceptor.accept() {
                let theirs = accepted.client_hello().server_name().map(str::to_owned);
                assert_eq!(ours.sni, theirs, "{bytes:02x?}");
                agreed += 1;
            }
        }
        // Most changes fall outside the names: both read them, and agree.
        assert!(agreed > 1500, "only {agreed} hellos read by both");
    }

    /// A server that takes key shares for P-256 only: rustls's client offers one for X25519
    /// first, so the server answers its hello with a HelloRetryRequest.
    fn p256_server(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ServerConnection {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::ring::kx_group::SECP256R1],
            ..rustls::crypto::ring::default_provider()
        };
        let cert = rcgen::generate_simple_self_signed(vec!["api.example.com".to_owned()])
            .expect("certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        rustls::ServerConnection::new(std::sync::Arc::new(config)).expect("server")
    }

    /// What a server writes in answer to `hello`.
    fn answer_to(server: &mut rustls::ServerConnection, hello: &[u8]) -> Vec<u8> {
        let mut rest = hello;
        while !rest.is_empty() {
            server.read_tls(&mut rest).expect("read");
        }
        // A hello refused leaves an alert to write.
        let _ = server.process_new_packets();
        let mut out = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut out).expect("write");
        }
        out
    }

    /// A record holding `handshake`, a handshake message.
    fn record(handshake: &[u8]) -> Vec<u8> {
        let mut out = vec![HANDSHAKE, 3, 3];
        out.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        out.extend_from_slice(handshake);
        out
    }

    /// A HelloRetryRequest is told from a ServerHello however its records split it, and only
    /// once enough of it has come.
    #[test]
    fn a_hello_retry_request_is_told_from_a_server_hello() {
        use rustls::version::{TLS12, TLS13};
        let retry = answer_to(
            &mut p256_server(&[&TLS13, &TLS12]),
            &client_hello("api.example.com"),
        );
        assert_eq!(retry_request(&retry), Some(true));
        // TLS 1.2 has no retry: its hello gets a ServerHello, or an alert from a server
        // without TLS 1.2.
        let tls12 = hello_with("api.example.com", &[], true);
        let server_hello = answer_to(&mut p256_server(&[&TLS13, &TLS12]), &tls12);
        assert_eq!(server_hello[5], SERVER_HELLO);
        assert_eq!(retry_request(&server_hello), Some(false));
        let alert = answer_to(&mut p256_server(&[&TLS13]), &tls12);
        assert_eq!(alert[0], 21);
        assert_eq!(retry_request(&alert), Some(false));
        for bytes in [retry.clone(), reframed(&retry, 1), reframed(&retry, 5)] {
            let whole = retry_request(&bytes);
            assert_eq!(whole, Some(true));
            let needed = (0..bytes.len())
                .find(|&end| retry_request(&bytes[..end]).is_some())
                .expect("told before the end");
            assert!(
                (0..needed).all(|end| retry_request(&bytes[..end]).is_none()),
                "told at {needed}"
            );
            assert_eq!(retry_request(&bytes[..needed]), Some(true));
        }
        // A ServerHello with any other random, a message of another type, an empty record.
        let mut server_hello = retry.clone();
        server_hello[20] ^= 1;
        assert_eq!(retry_request(&server_hello), Some(false));
        let mut other = retry.clone();
        other[5] = CLIENT_HELLO;
        assert_eq!(retry_request(&other), Some(false));
        let mut empty_first = vec![HANDSHAKE, 3, 3, 0, 0];
        empty_first.extend_from_slice(&retry);
        assert_eq!(retry_request(&empty_first), Some(false));
    }

    /// The hello a client sends again is read after ChangeCipherSpecs and early data or without
    /// them, from the bytes held back and those still to come.
    #[tokio::test]
    async fn a_second_hello_is_read_past_change_cipher_specs_and_early_data() {
        let hello = client_hello("again.example.com");
        let ccs = [CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1];
        for (held, rest) in [
            (Vec::new(), [&ccs[..], &hello].concat()),
            (ccs[..3].to_vec(), [&ccs[3..], &hello].concat()),
            ([&ccs[..], &hello[..10]].concat(), hello[10..].to_vec()),
            (Vec::new(), hello.clone()),
        ] {
            let again = read_again(&mut &rest[..], held.clone(), 65536, Duration::from_secs(1))
                .await
                .expect("hello");
            assert_eq!(again.sni.as_deref(), Some("again.example.com"));
            assert_eq!(again.end, held.len() + rest.len());
        }
        // Early data sent with the first hello, and ChangeCipherSpecs around it, pass on.
        let early = [APPLICATION_DATA, 3, 3, 0, 3, 7, 7, 7];
        let before = [&ccs[..], &early, &early, &ccs, &hello].concat();
        for split in [0, 7, 9, 20] {
            let again = read_again(
                &mut &before[split..],
                before[..split].to_vec(),
                65536,
                Duration::from_secs(1),
            )
            .await
            .expect("hello");
            assert_eq!(again.sni.as_deref(), Some("again.example.com"));
            assert_eq!(again.end, before.len());
        }
        for (bad, why) in [
            (
                [&[CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 2][..], &hello].concat(),
                "a malformed ChangeCipherSpec",
            ),
            (
                [&[CHANGE_CIPHER_SPEC, 3, 3, 0, 2, 1, 1][..], &hello].concat(),
                "a malformed ChangeCipherSpec",
            ),
            (
                [&[APPLICATION_DATA, 3, 3, 0x48, 0x01][..], &hello].concat(),
                "a malformed early data record",
            ),
            // An alert, not a hello.
            (
                [&[21, 3, 3, 0, 2, 2, 40][..], &hello].concat(),
                "not a handshake record",
            ),
        ] {
            match read_again(&mut &bad[..], Vec::new(), 65536, Duration::from_secs(1)).await {
                Err(HelloError::NotTls(e)) => assert_eq!(e, why),
                other => panic!("{why}: {other:?}"),
            }
        }
        // None of that before a first hello.
        let first = [&ccs[..], &hello].concat();
        assert!(matches!(
            read(&mut &first[..], 65536, Duration::from_secs(1)).await,
            Err(HelloError::NotTls("not a handshake record"))
        ));
    }

    /// A message after the hello in the hello's own record would reach the upstream unjudged.
    #[test]
    fn handshake_data_after_the_hello_in_its_record_is_refused() {
        let hello = client_hello("api.example.com");
        let message = &hello[5..];
        let two = record(&[message, message].concat());
        assert_eq!(parse(&two), Err("handshake data after the ClientHello"));
        // Split over records, the second message starting in the hello's last record.
        let joined = reframed(&two, 100);
        assert_eq!(parse(&joined), Err("handshake data after the ClientHello"));
        // In a record of its own it is after the hello's end, held back.
        let apart = [&hello[..], &hello].concat();
        let mut records = Records::default();
        assert!(matches!(records.feed(&apart), Ok(Some(_))));
        assert_eq!(records.next, hello.len());
    }

    #[tokio::test]
    async fn reads_sni_and_alpn_and_keeps_every_byte() {
        let mut bytes = client_hello("api.example.com");
        bytes.extend_from_slice(b"trailing");
        let hello = read(&mut &bytes[..], 65536, Duration::from_secs(1))
            .await
            .expect("hello");
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        assert!(bytes.starts_with(&hello.bytes));
        assert_eq!(hello.end, bytes.len() - b"trailing".len());
    }

    #[tokio::test]
    async fn a_hello_split_byte_by_byte_is_read() {
        let bytes = client_hello("split.example.com");
        let (mut client, mut server) = tokio::io::duplex(1);
        let sender = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            for b in bytes {
                client.write_all(&[b]).await.expect("write");
            }
            client
        });
        let hello = read(&mut server, 65536, Duration::from_secs(5))
            .await
            .expect("hello");
        assert_eq!(hello.sni.as_deref(), Some("split.example.com"));
        drop(sender.await);
    }

    /// Waits until `stream` has `n` bytes to read, without taking them.
    async fn queued(stream: &tokio::net::TcpStream, n: usize) {
        let mut peek = vec![0; n];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stream.peek(&mut peek).await.expect("peek") < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} bytes never came"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_accepted_connection_is_read_from_what_has_come_and_then_as_it_comes() {
        use tokio::io::AsyncWriteExt as _;
        let bytes = client_hello("accepted.example.com");
        // Come whole before the relay reads, half of it, or nothing: the rest comes later.
        for come in [bytes.len(), bytes.len() / 2, 0] {
            let (mut client, mut relay) = super::super::splice::tests::pair(None).await;
            client.write_all(&bytes[..come]).await.expect("write");
            if come > 0 {
                queued(&relay, come).await;
            }
            let rest = bytes[come..].to_vec();
            let late = tokio::spawn(async move {
                tokio::task::yield_now().await;
                client.write_all(&rest).await.expect("write");
                client
            });
            let hello = read_accepted(&mut relay, 65536, Duration::from_secs(5))
                .await
                .expect("hello");
            assert_eq!(
                hello.sni.as_deref(),
                Some("accepted.example.com"),
                "{come} come"
            );
            assert_eq!(hello.bytes, bytes, "{come} come");
            drop(late.await);
        }
    }

    #[tokio::test]
    async fn an_accepted_connection_over_the_limit_or_closed_early_is_refused() {
        use tokio::io::AsyncWriteExt as _;
        let bytes = client_hello("accepted.example.com");
        // More than the limit has come at once: refused, whole hello or not.
        let (mut client, mut relay) = super::super::splice::tests::pair(None).await;
        client.write_all(&bytes).await.expect("write");
        queued(&relay, bytes.len()).await;
        assert!(matches!(
            read_accepted(&mut relay, bytes.len() - 1, Duration::from_secs(5)).await,
            Err(HelloError::TooLarge(_))
        ));
        // Closed having sent part of a hello, or nothing.
        for sent in [&bytes[..20], &[][..]] {
            let (mut client, mut relay) = super::super::splice::tests::pair(None).await;
            client.write_all(sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            queued(&relay, sent.len()).await;
            assert!(matches!(
                read_accepted(&mut relay, 65536, Duration::from_secs(5)).await,
                Err(HelloError::Closed)
            ));
        }
    }

    #[tokio::test]
    async fn plain_text_and_oversized_and_short_input_are_refused() {
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(
            read(&mut &http[..], 65536, Duration::from_secs(1)).await,
            Err(HelloError::NotTls(_))
        ));
        let hello = client_hello("api.example.com");
        assert!(matches!(
            read(&mut &hello[..], 100, Duration::from_secs(1)).await,
            Err(HelloError::TooLarge(100))
        ));
        assert!(matches!(
            read(&mut &hello[..20], 65536, Duration::from_secs(1)).await,
            Err(HelloError::Closed)
        ));
    }
}
