//! TLS fixtures: a certificate authority made per run (rcgen) and TLS servers in the world that
//! record what each connection brought (the server name above all) and answer HTTP/1.1.
use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
    SanType,
};
use rustls::{
    RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

use crate::World;

/// A CA for one test run; its certificate is written to `ca_pem` for clients.
pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca_pem: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("egress test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        fs::create_dir_all(dir).expect("pki dir");
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca_pem, issuer.pem()).expect("write CA");
        Pki { issuer, ca_pem }
    }

    /// A certificate for `names` signed by this CA, with its chain and key. A name with `://`
    /// is a URI name (a SPIFFE id), the others DNS names or addresses.
    fn issue(&self, names: &[&str]) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let (uris, others): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.contains("://"));
        let mut params =
            CertificateParams::new(others.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("certificate params");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().expect("URI name")));
        }
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert, key)
    }

    /// A server configuration with a certificate for `names`, signed by this CA.
    pub fn server(&self, names: &[&str]) -> Arc<ServerConfig> {
        self.server_with(names, None)
    }

    /// As [`Pki::server`], but requiring a client certificate signed by `clients`.
    pub fn mutual_server(&self, names: &[&str], clients: &Pki) -> Arc<ServerConfig> {
        self.server_with(names, Some(clients))
    }

    /// As [`Pki::server`], but taking key shares for P-256 alone: a client that offers X25519
    /// first, as rustls and OpenSSL do, is asked for its hello again (a HelloRetryRequest).
    pub fn retrying_server(&self, names: &[&str]) -> Arc<ServerConfig> {
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::ring::kx_group::SECP256R1],
            ..rustls::crypto::ring::default_provider()
        };
        self.server_of(names, None, provider)
    }

    fn server_with(&self, names: &[&str], clients: Option<&Pki>) -> Arc<ServerConfig> {
        self.server_of(names, clients, rustls::crypto::ring::default_provider())
    }

    fn server_of(
        &self,
        names: &[&str],
        clients: Option<&Pki>,
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<ServerConfig> {
        let (cert, key) = self.issue(names);
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(provider);
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match clients {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.ca_der()).expect("client CA");
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A client certificate for `name`, written as PEM files (certificate chain, key) in `dir`.
    pub fn client_files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(&[name]);
        let cert_file = dir.join(format!("{name}-client.pem"));
        let key_file = dir.join(format!("{name}-client.key"));
        fs::write(&cert_file, cert.pem() + &self.issuer.pem()).expect("write client certificate");
        fs::write(&key_file, key.serialize_pem()).expect("write client key");
        (cert_file, key_file)
    }

    /// The CA certificate, for clients built in Rust.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

/// A body and then gRPC's trailer.
struct Trailed {
    data: Option<hyper::body::Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Trailed {
    fn new(body: String) -> Trailed {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Trailed {
            data: Some(body.into()),
            trailers: Some(trailers),
        }
    }
}

impl hyper::body::Body for Trailed {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let frame = match self.data.take() {
            Some(data) => Some(hyper::body::Frame::data(data)),
            None => self.trailers.take().map(hyper::body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// What a TLS server in the world saw.
#[derive(Default)]
pub struct Seen {
    /// TCP connections accepted, handshake or not.
    pub accepted: AtomicUsize,
    /// The server name of each completed handshake.
    pub names: Mutex<Vec<Option<String>>>,
    /// Where each connection came from.
    pub peers: Mutex<Vec<SocketAddr>>,
    /// Connections whose first answer was a HelloRetryRequest.
    pub retries: AtomicUsize,
    /// The bytes each ended connection read.
    pub read: Mutex<Vec<usize>>,
    /// A plain HTTP server's: each request's target.
    pub paths: Mutex<Vec<String>>,
    /// Shut: a TLS server answers no request for `/held` until it opens.
    pub gate: Gate,
}

/// A gate requests may wait at, open until shut.
#[derive(Default)]
pub struct Gate {
    shut: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    pub fn shut(&self) {
        *self.shut.lock().expect("gate") = true;
    }

    pub fn open(&self) {
        *self.shut.lock().expect("gate") = false;
        self.opened.notify_all();
    }

    /// Waits while the gate is shut, for a minute at most: a test that fails to open it must
    /// not hang.
    fn pass(&self) {
        let shut = self.shut.lock().expect("gate");
        let _ = self
            .opened
            .wait_timeout_while(shut, std::time::Duration::from_secs(60), |shut| *shut);
    }
}

impl Seen {
    pub fn retries(&self) -> usize {
        self.retries.load(Ordering::SeqCst)
    }

    pub fn read(&self) -> Vec<usize> {
        self.read.lock().expect("read").clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn names(&self) -> Vec<Option<String>> {
        self.names.lock().expect("names").clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().expect("paths").clone()
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

impl World {
    /// A TLS server at `addr` in the world. After the handshake it reads one HTTP/1.1 request
    /// and answers `200` with the body `sni=<server name>\n`, then closes.
    pub fn tls_server(&self, addr: SocketAddr, config: Arc<ServerConfig>) -> Arc<Seen> {
        self.tls_server_with(addr, config, false)
    }

    /// As [`World::tls_server`], but answering requests on a connection until the client
    /// closes it.
    pub fn tls_server_kept_alive(&self, addr: SocketAddr, config: Arc<ServerConfig>) -> Arc<Seen> {
        self.tls_server_with(addr, config, true)
    }

    fn tls_server_with(
        &self,
        addr: SocketAddr,
        config: Arc<ServerConfig>,
        keep_alive: bool,
    ) -> Arc<Seen> {
        self.serve_each(addr, move |tcp, s| {
            let Ok(conn) = ServerConnection::new(Arc::clone(&config)) else {
                return;
            };
            let mut tls = StreamOwned::new(conn, Watched::new(tcp));
            answer(&mut tls, s, keep_alive);
            let Watched { read, first, .. } = tls.sock;
            if is_retry_request(&first) {
                s.retries.fetch_add(1, Ordering::SeqCst);
            }
            s.read.lock().expect("read").push(read);
        })
    }

    /// An HTTP/2 server without TLS (prior knowledge, as gRPC's) at `addr` in the world: it
    /// answers each request `200` with the body `authority=<:authority> path=<path>
    /// scheme=<:scheme>\n` and the trailer `grpc-status: 0`, a request for `/held` once the
    /// `gate` is open. `names` holds each request's authority, `paths` its path.
    pub fn h2c_server(&self, addr: SocketAddr) -> Arc<Seen> {
        self.h2_server(addr, None)
    }

    /// As [`World::h2c_server`], over TLS with `config` (which should offer `h2`).
    pub fn h2_server(&self, addr: SocketAddr, config: Option<Arc<ServerConfig>>) -> Arc<Seen> {
        let listener = self.listen(addr);
        listener.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Seen::default());
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((tcp, _)) = listener.accept().await {
                    s.accepted.fetch_add(1, Ordering::SeqCst);
                    let s = Arc::clone(&s);
                    let config = config.clone();
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let authority = req.uri().authority().map(ToString::to_string);
                        let path = req.uri().path().to_owned();
                        s.names.lock().expect("names").push(authority.clone());
                        s.paths.lock().expect("paths").push(path.clone());
                        let body = format!(
                            "authority={} path={path} scheme={}\n",
                            authority.unwrap_or_default(),
                            req.uri().scheme_str().unwrap_or_default()
                        );
                        let s = Arc::clone(&s);
                        async move {
                            // `/held` waits at the gate, off the server's thread.
                            if path == "/held" {
                                let _ = tokio::task::spawn_blocking(move || s.gate.pass()).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Trailed::new(
                                body,
                            )))
                        }
                    });
                    let http = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    tokio::spawn(async move {
                        match config {
                            Some(config) => {
                                let Ok(tls) =
                                    tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                                else {
                                    return;
                                };
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                    .await;
                            }
                            None => {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                    .await;
                            }
                        }
                    });
                }
            });
        });
        seen
    }

    /// A plain HTTP/1.1 server at `addr` in the world: it answers each request on a connection
    /// `200` with the body `host=<Host header>\n`, then `name=value\n` for each `x-` header it
    /// got, until the client closes. `names` holds each request's Host header.
    pub fn http_server(&self, addr: SocketAddr) -> Arc<Seen> {
        self.serve_each(addr, answer_http)
    }

    /// A server at `addr` in the world: each connection it accepts, counted with its peer in the
    /// `Seen` returned, is served by `serve` on a thread of its own.
    fn serve_each(
        &self,
        addr: SocketAddr,
        serve: impl Fn(TcpStream, &Seen) + Send + Sync + 'static,
    ) -> Arc<Seen> {
        let listener = self.listen(addr);
        let seen = Arc::new(Seen::default());
        let s = Arc::clone(&seen);
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                if let Ok(peer) = tcp.peer_addr() {
                    s.peers.lock().expect("peers").push(peer);
                }
                let (s, serve) = (Arc::clone(&s), Arc::clone(&serve));
                std::thread::spawn(move || serve(tcp, &s));
            }
        });
        seen
    }
}

/// Plain HTTP/1.1 requests answered `200` with the body `host=<Host header>\n` and the `x-`
/// headers, each until the client closes (see [`World::http_server`]).
fn answer_http(tcp: TcpStream, s: &Seen) {
    let Ok(mut out) = tcp.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(tcp);
    loop {
        let (mut line, mut host, mut lines) = (String::new(), None, 0);
        let mut extra = String::new();
        let mut target = None;
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            lines += 1;
            if line == "\r\n" {
                break;
            }
            if lines == 1 {
                target = line.split(' ').nth(1).map(str::to_owned);
            } else if let Some((name, value)) = line.split_once(':') {
                let name = name.to_ascii_lowercase();
                if name == "host" {
                    host = Some(value.trim().to_owned());
                } else if name.starts_with("x-") {
                    extra += &format!("{name}={}\n", value.trim());
                }
            }
            line.clear();
        }
        if lines == 0 {
            return;
        }
        s.names.lock().expect("names").push(host.clone());
        s.paths
            .lock()
            .expect("paths")
            .push(target.unwrap_or_default());
        let body = format!("host={}\n{extra}", host.unwrap_or_default());
        let answered = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if answered.is_err() {
            return;
        }
    }
}

/// The handshake, then HTTP/1.1 requests answered `200` with the body `sni=<server name>\n`: one,
/// or with `keep_alive` each until the client closes. A request for `/status/N` is answered `N`.
fn answer(tls: &mut StreamOwned<ServerConnection, Watched>, s: &Seen, keep_alive: bool) {
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    let name = tls.conn.server_name().map(str::to_owned);
    s.names.lock().expect("names").push(name.clone());
    let body = format!("sni={}\n", name.unwrap_or_default());
    let connection = if keep_alive { "keep-alive" } else { "close" };
    loop {
        let mut reader = BufReader::new(&mut *tls);
        let mut line = String::new();
        let mut lines = 0;
        let mut held = false;
        let mut status = 200u16;
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            lines += 1;
            if line == "\r\n" {
                break;
            }
            if lines == 1 {
                held = line.starts_with("GET /held ");
                if let Some(n) = line
                    .strip_prefix("GET /status/")
                    .and_then(|rest| rest.split(' ').next()?.parse().ok())
                {
                    status = n;
                }
            }
            line.clear();
        }
        drop(reader);
        if lines == 0 && keep_alive {
            return;
        }
        if held {
            s.gate.pass();
        }
        let _ = write!(
            tls,
            "HTTP/1.1 {status} Status\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        if !keep_alive {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return;
        }
        let _ = tls.flush();
    }
}

/// A server's socket, counting the bytes it reads and keeping the first it writes.
struct Watched {
    tcp: TcpStream,
    read: usize,
    first: Vec<u8>,
}

/// A record header, a ServerHello's type, length and version, and its random.
const ANSWER_HEAD: usize = 5 + 4 + 2 + 32;

impl Watched {
    fn new(tcp: TcpStream) -> Watched {
        Watched {
            tcp,
            read: 0,
            first: Vec::with_capacity(ANSWER_HEAD),
        }
    }
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tcp.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf)?;
        let keep = n.min(ANSWER_HEAD - self.first.len());
        self.first.extend_from_slice(&buf[..keep]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Whether a server's first bytes are a HelloRetryRequest: a ServerHello (in a handshake
/// record) with the random RFC 8446 §4.1.3 sets apart.
fn is_retry_request(first: &[u8]) -> bool {
    const RETRY_RANDOM: [u8; 32] = [
        0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8,
        0x91, 0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8,
        0x33, 0x9c,
    ];
    first.len() == ANSWER_HEAD && first[0] == 22 && first[5] == 2 && first[11..] == RETRY_RANDOM
}
