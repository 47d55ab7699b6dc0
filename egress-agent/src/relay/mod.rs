//! The gateway relay: steered TLS connections arrive here from the kernel, which kept each one's
//! original destination. The relay reads the ClientHello, lets the connection on only when its
//! server name is a host the policy allows for that destination, connects to that destination
//! (never to a name the client chose, never re-resolved), and carries bytes both ways. On a port
//! with TLS origination it reads plain HTTP instead and speaks TLS upstream (`originate`). Every
//! connection ends in a `relay` record.
mod balance;
mod health;
pub mod hello;
pub mod limits;
pub mod netns;
mod originate;
mod splice;

use std::{
    collections::HashMap,
    ffi::OsString,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, IntoRawFd as _},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use egress_common::{RELAY_WORKERS_MAX, RelayPeer, RelayPorts, Steered};
use jiff::Timestamp;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::SockaddrStorage,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::AsyncWriteExt as _,
    io::unix::AsyncFd,
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, sleep, timeout_at},
};

use self::{
    hello::{Detected, Hello},
    netns::{Netns, NetnsMap, NetnsMaps},
};
use crate::{
    agent::Status,
    datapath::{self, iface::LinkWatch},
    events::{Catalog, CgroupNames, Name, Record, Records, Relayed, Upstream, Word},
    policy::compile::{Carry, ConnectionPool, HashOn, Keepalive, Origination, RelayRoute},
};

/// Limits of the relay. The defaults suit production; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Port on 127.0.0.1 and ::1; 0 picks a free one.
    pub port: u16,
    /// Longest wait for a complete ClientHello.
    pub hello_timeout: Duration,
    /// Largest ClientHello accepted, with whatever came with it.
    pub hello_limit: usize,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Limit of one upstream connect when the route sets no perTryTimeout.
    pub connect_timeout: Duration,
    /// Past the first 64 KiB of a direction, move passthrough bytes with splice(2) through a
    /// pipe, never through the relay's memory; otherwise copy them all through a buffer.
    /// `cargo xtask bench relay` compares the two.
    pub splice: bool,
    /// How often the enforced cgroup is scanned for network namespaces that came or went.
    pub scan_interval: Duration,
    /// Connections the relay holds at once; `None`: as many as the descriptor limit allows
    /// ([`limits::Limits::new`]).
    pub max_connections: Option<usize>,
    /// Connections one workload (cgroup) holds at once; `None`: half of `max_connections`.
    pub max_per_workload: Option<usize>,
    /// Threads serving relayed connections, each with a listener of its own in every namespace
    /// served; `None`: one per CPU the agent may run on. At most [`RELAY_WORKERS_MAX`].
    pub workers: Option<usize>,
}

impl RelayConfig {
    /// How many workers the relay runs.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, RELAY_WORKERS_MAX)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            port: 0,
            hello_timeout: Duration::from_secs(10),
            // A ClientHello fits in 16 KiB but for exotic extensions; a few records more.
            hello_limit: 64 << 10,
            // Istio's default idle timeout for TCP.
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            splice: true,
            scan_interval: Duration::from_millis(500),
            max_connections: None,
            max_per_workload: None,
            workers: None,
        }
    }
}

/// Pause before a retry: Envoy's base retry back-off.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// The kernel's records of steered connections, by the client's end.
pub type Peers = BpfHashMap<MapData, RelayPeer, Steered>;

/// The kernel's maps the relay works with.
pub struct RelayMaps {
    pub peers: Peers,
    /// Where the relay listens, by network namespace, and where it is wanted.
    pub netns: NetnsMaps,
}

/// The running relay. Dropping it does not stop it: call [`Relay::stop`].
pub struct Relay {
    pub port: u16,
    tasks: Arc<Tasks>,
    shared: Arc<Shared>,
    workers: Workers,
}

/// The relay's worker threads, each running a runtime of its own until told to stop. A
/// connection stays on the worker whose listener took it: the kernel's steering spreads them (a
/// connect goes to the port of its CPU's worker), and a worker is woken for its own only, with
/// none of a shared runtime's hand-offs between threads (`cargo xtask bench relay`; see
/// docs/benchmarks.md).
struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Dropped, they end the workers' runtimes (the tasks left on them are dropped).
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers; returns them and their runtimes' handles.
    fn start(n: usize) -> io::Result<(Workers, Vec<tokio::runtime::Handle>)> {
        let mut workers = Workers {
            threads: Vec::with_capacity(n),
            stop: Vec::with_capacity(n),
        };
        let mut handles = Vec::with_capacity(n);
        let bound = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .is_ok_and(|allowed| binds(&allowed, n));
        if bound {
            log::info!("relay: {n} workers, each bound to its CPU");
        }
        for i in 0..n {
            // Sockets and timers only: a runtime with the signal and process drivers is woken for
            // every signal the agent gets, and looks for exited children at every wake-up.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("egress-relay-{i}"))
                .spawn(move || {
                    if bound {
                        bind_to(i);
                    }
                    let _ = runtime.block_on(stopped);
                })?;
            workers.threads.push(thread);
            workers.stop.push(stop);
        }
        Ok((workers, handles))
    }

    /// Ends the workers, and waits for them.
    async fn stop(self) {
        drop(self.stop);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Whether the workers are bound each to its CPU, worker `i` to CPU `i`: when there is one for
/// each CPU the agent may run on, and those are CPUs 0 to `n` - 1. The kernel's steering sends a
/// connect made on CPU `i` to worker `i` ([`RelayPorts::for_cpu`]), which is then woken where
/// its client runs: an idle CPU is never woken for it (an interrupt between CPUs and, in a
/// virtual machine, the waking of a halted vCPU, inside the first byte's wait), and the
/// connection's steps stay in one CPU's caches (`cargo xtask bench relay`; see
/// docs/benchmarks.md). With fewer workers (`--relay-workers`, a CPU quota) or other CPUs (a
/// cpuset) they float, as the scheduler places them: the kernel's worker for a CPU would not be
/// on it.
fn binds(allowed: &nix::sched::CpuSet, n: usize) -> bool {
    cpus_in(allowed).into_iter().eq(0..n)
}

/// The CPUs in `set`, in order.
fn cpus_in(set: &nix::sched::CpuSet) -> Vec<usize> {
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Binds the calling thread to CPU `cpu`; a failure leaves it floating, as it was.
fn bind_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let bound = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = bound {
        log::warn!("relay: binding worker {cpu} to its CPU: {e}");
    }
}

struct Shared {
    config: RelayConfig,
    /// The workers' runtimes, each serving its own listeners' connections.
    workers: Vec<tokio::runtime::Handle>,
    /// CPUs the agent may run on.
    cpus: i64,
    /// Read by every connection; written only to take out a record the relay is done with.
    peers: Mutex<Peers>,
    /// TLS origination's upstream connections between client connections.
    pool: Arc<originate::Pool>,
    /// The upstream addresses' errors in a row, and which are ejected (`outlierDetection`).
    health: Arc<health::Health>,
    /// Round robin's turns and the attempts in progress by address (`loadBalancer`).
    balancer: Arc<balance::Balancer>,
    /// The connections each workload holds, against the limits.
    admission: limits::Admission,
    /// Set as the relay stops: the connections it ends then are recorded as cut.
    stopping: AtomicBool,
    /// The records of connections ended as the relay stopped, for it to send.
    cut: Mutex<Vec<(Record, Relayed)>>,
    catalog: watch::Receiver<Arc<Catalog>>,
    records: Records,
    cgroups: Arc<Mutex<CgroupNames>>,
    status: Arc<Status>,
}

impl Shared {
    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes out the kernel's record of the connection from `key`, if it is still there.
    fn forget(&self, key: &RelayPeer) {
        match self.peers().remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => log::warn!("relay: removing a steered connection's record: {e}"),
        }
    }
}

/// How long after its client closed a record marked closed names it: far longer than a
/// connection waits in the relay's accept queue. Only a record the relay never took (the relay
/// was stopped meanwhile) is older; it may name another connection from the same address and
/// port, and is not believed.
const CLOSED_WITHIN: Duration = Duration::from_secs(10);

/// Whether the record's client closed within [`CLOSED_WITHIN`].
fn closed_lately(steered: &Steered) -> bool {
    datapath::boot_ns().saturating_sub(steered.closed_ns) < CLOSED_WITHIN.as_nanos() as u64
}

/// A listening socket of the relay, in namespace `netns`.
struct Listener {
    socket: AsyncFd<mio::net::TcpListener>,
    /// Its port: the kernel files a steered connection's record under it too.
    port: u16,
    netns: Arc<Netns>,
    /// Set before the socket is shut down, when its namespace is no longer served: its
    /// acceptor then ends instead of waiting for the next connection.
    closed: AtomicBool,
}

impl Listener {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // A listening socket shut down stops listening (its queued connections are reset), and
        // its pending accept() fails at once.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.socket),
            nix::sys::socket::Shutdown::Both,
        );
    }
}

/// How a relayed connection's upstream socket leaves: from the client's network namespace,
/// bound to the interface the client's socket was bound to (0: none).
#[derive(Clone)]
struct Leave {
    netns: Arc<Netns>,
    bound_if: u32,
    /// Send the handshake's last ACK with the relay's first bytes (see `connect_own`).
    ack_with_data: bool,
    /// TCP keepalive as the DestinationRule sets it (`connectionPool.tcp.tcpKeepalive`).
    keepalive: Option<Keepalive>,
}

/// Lifts the soft descriptor limit (often 1024) to the hard one: the relay holds two descriptors
/// per steered connection. Returns the limits as they were, for a child that should not inherit
/// the raise (select() breaks above 1024).
pub fn raise_nofile() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// Listens for each of `workers` on 127.0.0.1 and ::1 (the latter where the host has IPv6), on a
/// port of its own: the first on `port` (0: one the kernel picks), the others on ones the
/// kernel picks.
pub fn bind(port: u16, workers: usize) -> io::Result<Vec<Vec<std::net::TcpListener>>> {
    let (first, made) = listen_pair(port)?;
    let v6 = match made {
        Ok(()) => true,
        Err(e) => {
            log::warn!("relay: no IPv6 loopback listener ({e}); IPv6 steering will fail");
            false
        }
    };
    let mut all = vec![first];
    while all.len() < workers.max(1) {
        // Each worker listens where the first does: a port free on 127.0.0.1 may be taken on
        // ::1, and an IPv6 connect steered to it would fail. Another port, then.
        let mut tries = 0;
        let pair = loop {
            let (pair, made) = listen_pair(0)?;
            match made {
                Err(e) if v6 => {
                    tries += 1;
                    if tries == 8 {
                        return Err(e);
                    }
                }
                _ => break pair,
            }
        };
        all.push(pair);
    }
    Ok(all)
}

/// Listens on 127.0.0.1 at `port` (0: one the kernel picks) and on ::1 at the same port; with
/// whether the latter could be made.
fn listen_pair(port: u16) -> io::Result<(Vec<std::net::TcpListener>, io::Result<()>)> {
    let v4 = listen(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port))?;
    let port = v4.local_addr()?.port();
    let mut listeners = vec![v4];
    let v6 =
        listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)).map(|v6| listeners.push(v6));
    Ok((listeners, v6))
}

/// A listening socket, not yet registered with a runtime: a worker's registers it.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit it: small answers (a ServerHello, an HTTP response) go out
    // at once, without a system call per connection.
    socket.set_nodelay(true)?;
    // They inherit the congestion control too. The hop to the workload is loopback, where there
    // is nothing to control: Reno (always built in) costs least per ACK, and does not pace as BBR,
    // a common default, does without the fq qdisc (a timer per burst; the benchmark: a lower
    // rate and half the bulk throughput). Never a reason not to listen.
    if let Err(e) = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::TcpCongestion,
        &OsString::from("reno"),
    ) {
        log::warn!("relay: {addr}: keeps the default congestion control ({e})");
    }
    socket.bind(addr)?;
    // SAFETY: the socket's own descriptor, given up by it.
    let fd = unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(
            std::os::fd::IntoRawFd::into_raw_fd(socket),
        )
    };
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(1024)?)?;
    Ok(std::net::TcpListener::from(fd))
}

impl Relay {
    /// Serves `listeners`, in the agent's own network namespace, and tells the kernel (`netns`)
    /// so steered connects from there come to them; also serves the other namespaces the
    /// processes of the enforced cgroup (`cgroup`, its directory) are in, as they come and go:
    /// listens there, and puts the `datapath`'s TC programs on their interfaces.
    #[expect(clippy::too_many_arguments, reason = "the relay's parts, each once")]
    pub fn spawn(
        listeners: Vec<Vec<std::net::TcpListener>>,
        config: RelayConfig,
        datapath: datapath::Shared,
        maps: RelayMaps,
        cgroup: PathBuf,
        catalog: watch::Receiver<Arc<Catalog>>,
        records: Records,
        cgroups: Arc<Mutex<CgroupNames>>,
        status: Arc<Status>,
    ) -> io::Result<Relay> {
        let RelayMaps { peers, mut netns } = maps;
        let first = listeners
            .first()
            .and_then(|set| set.first())
            .ok_or_else(|| io::Error::other("the relay has no listener"))?;
        let port = first.local_addr()?.port();
        let home = Arc::new(Netns::home(first.as_fd())?);
        let ports = ports_of(&listeners)?;
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let limits = limits::Limits::new(config.max_connections, config.max_per_workload, nofile);
        let affordable = limits::Limits::new(None, None, nofile).connections;
        if limits.connections > affordable {
            log::warn!(
                "relay: --relay-max-connections {} takes about {} descriptors and the agent may \
                 open {nofile}; past {affordable} connections accept() may fail for want of \
                 descriptors, and steered connections wait in its queue",
                limits.connections,
                2 * limits.connections
            );
        }
        log::info!(
            "relay: holds up to {} connections, {} of one workload",
            limits.connections,
            limits.per_workload
        );
        let (workers, handles) = Workers::start(listeners.len())?;
        let shared = Arc::new(Shared {
            config,
            workers: handles,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as i64),
            peers: Mutex::new(peers),
            pool: Arc::default(),
            health: Arc::default(),
            balancer: Arc::default(),
            admission: limits::Admission::new(limits),
            stopping: AtomicBool::new(false),
            cut: Mutex::default(),
            catalog,
            records,
            cgroups,
            status,
        });
        let tasks = Arc::new(Tasks(Mutex::new(Some(JoinSet::new()))));
        accept_on(listeners, &home, &shared, &tasks)?;
        // Told once the workers listen: a steered connect finds them.
        netns
            .served
            .insert(home.cookie, ports, 0)
            .map_err(io::Error::other)?;
        let watcher = watch_namespaces(
            cgroup,
            port,
            netns,
            datapath,
            Arc::clone(&shared),
            Arc::clone(&tasks),
        );
        tasks.spawn(Box::pin(watcher));
        Ok(Relay {
            port,
            tasks,
            shared,
            workers,
        })
    }

    /// Stops accepting and ends every connection in progress; each one admitted has its record,
    /// outcome `stopped`.
    pub async fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        let set = self
            .tasks
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut set) = set {
            set.shutdown().await;
        }
        self.workers.stop().await;
        let cut = std::mem::take(&mut *self.shared.cut.lock().unwrap_or_else(|e| e.into_inner()));
        if !cut.is_empty() {
            log::info!(
                "relay: stopped with {} connection(s) in progress",
                cut.len()
            );
        }
        for (record, relayed) in cut {
            self.shared.status.observe(&record);
            self.shared.records.send_relay(record, relayed).await;
        }
    }
}

/// The ports of each worker's listeners (one port for its IPv4 and IPv6 ones), as the kernel
/// is told them.
fn ports_of(listeners: &[Vec<std::net::TcpListener>]) -> io::Result<RelayPorts> {
    let ports = listeners
        .iter()
        .map(|set| {
            let first = set
                .first()
                .ok_or_else(|| io::Error::other("a worker has no listener"))?;
            Ok(first.local_addr()?.port())
        })
        .collect::<io::Result<Vec<u16>>>()?;
    Ok(RelayPorts::new(&ports))
}

/// Starts an acceptor on each of `listeners` (a set for each worker, in namespace `netns`), on
/// its worker; returns them.
fn accept_on(
    listeners: Vec<Vec<std::net::TcpListener>>,
    netns: &Arc<Netns>,
    shared: &Arc<Shared>,
    tasks: &Arc<Tasks>,
) -> io::Result<Vec<Arc<Listener>>> {
    let mut started = Vec::new();
    for (set, worker) in listeners.into_iter().zip(&shared.workers) {
        // Registered with the worker's runtime, whose thread alone is woken for it.
        let _runtime = worker.enter();
        for socket in set {
            let port = socket.local_addr()?.port();
            let listener = Arc::new(Listener {
                socket: register(socket)?,
                port,
                netns: Arc::clone(netns),
                closed: AtomicBool::new(false),
            });
            tasks.spawn_on(
                serve_next(Arc::clone(&listener), Arc::clone(shared), Arc::clone(tasks)),
                worker,
            );
            started.push(listener);
        }
    }
    Ok(started)
}

/// Keeps the relay serving every namespace a process of the enforced cgroup is in: scans the
/// cgroup, and serves at once a namespace the kernel says a steered connect waits in. Serves the
/// namespaces that appeared (listens there, puts the TC programs on their interfaces and on the
/// ones added later) and tells the kernel; for the ones no process is left in, tells the kernel
/// first, then closes the listeners (connections in progress go on) and takes the TC programs off.
/// Runs until the relay stops.
async fn watch_namespaces(
    cgroup: PathBuf,
    port: u16,
    maps: NetnsMaps,
    datapath: datapath::Shared,
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
) {
    let NetnsMaps {
        served: map,
        wanted,
    } = maps;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unreplaced, while AsyncFd owns it.
    let mut wanted = match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(wanted, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!(
                "relay: cannot watch for steered connects waiting on a namespace ({e}); \
                 they wait for the next scan"
            );
            None
        }
    };
    let home = match netns::inode(std::path::Path::new("/proc/thread-self/ns/net")) {
        Ok(ino) => ino,
        Err(e) => {
            log::error!("relay: the agent's own network namespace: {e}; no other is served");
            return;
        }
    };
    let (links_tx, mut links_rx) = mpsc::unbounded_channel();
    let mut w = Watcher {
        home,
        port,
        map,
        datapath,
        links: links_tx,
        served: HashMap::new(),
        failed: HashMap::new(),
        hinted: HashMap::new(),
        shared,
        tasks,
    };
    let mut tick = tokio::time::interval(w.shared.config.scan_interval);
    loop {
        let asked = async {
            match wanted.as_mut() {
                Some(fd) => fd.readable_mut().await.map(|mut guard| {
                    let mut paths = Vec::new();
                    while let Some(item) = guard.get_inner_mut().next() {
                        paths.extend(netns::wanted_path(&item));
                    }
                    guard.clear_ready();
                    paths
                }),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                w.scan(&cgroup).await;
                w.shared.pool.sweep();
            }
            Some(ino) = links_rx.recv() => w.cover(ino),
            paths = asked => match paths {
                Ok(paths) => {
                    for path in paths {
                        // A thread gone meanwhile has nothing waiting.
                        let Ok(ino) = netns::inode(&path) else { continue };
                        if ino == w.home {
                            continue;
                        }
                        w.shared.status.relay_namespace_hints.inc();
                        // A namespace that could not be served is tried again on a hint once a
                        // second at most: each steered connect from it hints, and each attempt
                        // costs the agent far more than the connect costs the workload.
                        if w
                            .failed
                            .get(&ino)
                            .is_some_and(|at| at.elapsed() < HINTED_RETRY_AFTER)
                        {
                            continue;
                        }
                        if !w.served.contains_key(&ino) {
                            if !w.serve(ino, &path) {
                                continue;
                            }
                            w.shared.status.relay_namespaces_wanted.inc();
                        }
                        w.hinted.entry(ino).or_default().insert(path);
                    }
                }
                Err(e) => {
                    log::warn!("relay: waiting on the kernel's namespace hints: {e}");
                    wanted = None;
                }
            },
        }
        w.shared
            .status
            .relay_namespaces
            .set(1 + w.served.len() as i64);
    }
}

/// How soon a hint may retry a namespace that could not be served.
const HINTED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The namespaces the relay serves besides the agent's own.
struct Watcher {
    /// The agent's own namespace (its inode), served from the start.
    home: u64,
    port: u16,
    map: NetnsMap,
    datapath: datapath::Shared,
    /// Where each served namespace's link watch says (by inode) that its interfaces changed.
    links: mpsc::UnboundedSender<u64>,
    /// By namespace inode.
    served: HashMap<u64, ServedNetns>,
    /// Namespaces that could not be served, by inode: when they last failed. Logged once,
    /// retried at every scan and on hints (at most every [`HINTED_RETRY_AFTER`]).
    failed: HashMap<u64, Instant>,
    /// By namespace inode: the threads whose hints it is served on (their namespace files). The
    /// scan sees each process's main thread only; a thread that entered a namespace alone keeps
    /// it served while it is there.
    hinted: HashMap<u64, std::collections::HashSet<PathBuf>>,
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
}

impl Watcher {
    async fn scan(&mut self, cgroup: &std::path::Path) {
        let known = self.served.keys().copied().collect();
        let (dir, home) = (cgroup.to_owned(), self.home);
        let hinted = self.hinted.clone();
        // Reading /proc for every process of a large cgroup blocks: off the runtime's workers.
        let scan = match tokio::task::spawn_blocking(move || {
            netns::scan(&dir, home, &known, hinted)
        })
        .await
        {
            Ok(scan) => scan,
            Err(e) => {
                log::error!("relay: scanning {}: {e}", cgroup.display());
                return;
            }
        };
        self.hinted = scan.hinted;
        for ino in scan.gone {
            let Some(served) = self.served.remove(&ino) else {
                continue;
            };
            if let Err(e) = self.map.remove(&served.netns.cookie) {
                log::warn!("relay: forgetting network namespace {ino}: {e}");
            }
            self.shared.pool.forget_netns(served.netns.cookie);
            for listener in served.listeners {
                listener.close();
            }
            self.uncover(ino);
            log::info!("relay: network namespace {ino} has no enforced process left; not served");
        }
        // Forget the failures of namespaces gone meanwhile: an inode may name a new one later.
        self.failed
            .retain(|ino, _| scan.new.iter().any(|(new, _)| new == ino));
        for (ino, path) in scan.new {
            self.serve(ino, &path);
        }
    }

    /// Serves namespace `ino`, opened through `path`: listens there and puts the TC programs on
    /// its interfaces, then tells the kernel. Returns whether it does.
    fn serve(&mut self, ino: u64, path: &std::path::Path) -> bool {
        let workers = self.shared.workers.len();
        let made = netns::serve(ino, path, self.port, |port| bind(port, workers)).and_then(|s| {
            let netns::Served { netns, listeners } = s;
            let covered = netns
                .within(|| {
                    // Watching before listing: an interface added in between is not missed.
                    let watch = LinkWatch::new()?;
                    let ifaces = self
                        .datapath
                        .with(|d| d.cover_netns(ino))
                        .map_err(io::Error::other)?;
                    Ok((watch, ifaces))
                })
                .and_then(|covered| {
                    let ports = ports_of(&listeners)?;
                    let listeners = accept_on(listeners, &netns, &self.shared, &self.tasks)?;
                    // Told once the workers listen: a steered connect finds them.
                    if let Err(e) = self.map.insert(netns.cookie, ports, 0) {
                        for listener in &listeners {
                            listener.close();
                        }
                        return Err(io::Error::other(e));
                    }
                    Ok((covered, ports, listeners))
                });
            if covered.is_err() {
                // Whatever was attached comes off: the namespace is not served.
                self.uncover(ino);
            }
            covered.map(|(covered, ports, listeners)| (netns, covered, ports, listeners))
        });
        match made {
            Ok((netns, (watch, ifaces), ports, listeners)) => {
                log::info!(
                    "relay: listening on port{} {} in network namespace {ino} (of {}), TC on [{}]",
                    if ports.count > 1 { "s" } else { "" },
                    ports.ports[..usize::from(ports.count)]
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    path.display(),
                    ifaces.join(", ")
                );
                self.failed.remove(&ino);
                let (stop, stopped) = tokio::sync::oneshot::channel();
                self.tasks.spawn(Box::pin(watch_links(
                    ino,
                    watch,
                    self.links.clone(),
                    stopped,
                )));
                self.served.insert(
                    ino,
                    ServedNetns {
                        netns,
                        listeners,
                        _watch: stop,
                    },
                );
                true
            }
            Err(e) => {
                self.shared.status.relay_namespace_failures.inc();
                if self.failed.insert(ino, Instant::now()).is_none() {
                    log::warn!(
                        "relay: cannot serve network namespace {ino} (of {}): {e}; its steered \
                         connections wait, then fail",
                        path.display()
                    );
                }
                false
            }
        }
    }

    /// Puts the TC programs on the interfaces added to served namespace `ino`.
    fn cover(&mut self, ino: u64) {
        let Some(served) = self.served.get(&ino) else {
            return;
        };
        let datapath = &self.datapath;
        match served.netns.within(|| {
            datapath
                .with(|d| d.cover_netns(ino))
                .map_err(io::Error::other)
        }) {
            Ok(ifaces) if ifaces.is_empty() => {}
            // Its interfaces are named by the workload.
            Ok(ifaces) => log::info!(
                "relay: TC on [{}] in network namespace {ino}",
                crate::text::printable(&ifaces.join(", "))
            ),
            Err(e) => log::error!(
                "relay: putting the TC programs on new interfaces of network namespace {ino}: \
                 {}; packet sockets there may send by them unjudged",
                crate::text::printable(&e.to_string())
            ),
        }
    }

    /// Takes the TC programs off namespace `ino`.
    fn uncover(&self, ino: u64) {
        // Detached already when the agent stops.
        let _ = self.datapath.with(|d| {
            d.uncover_netns(ino);
            Ok(())
        });
    }
}

/// A namespace the relay serves besides the agent's own.
struct ServedNetns {
    netns: Arc<Netns>,
    listeners: Vec<Arc<Listener>>,
    /// Dropped with the entry, it ends the namespace's link watch.
    _watch: tokio::sync::oneshot::Sender<()>,
}

/// Tells `changed` (with the namespace's inode `ino`) whenever `watch` sees the namespace's
/// interfaces change, until `stop`'s sender is dropped.
async fn watch_links(
    ino: u64,
    mut watch: LinkWatch,
    changed: mpsc::UnboundedSender<u64>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let watching = async {
        loop {
            if let Err(e) = watch.changed().await {
                log::error!(
                    "relay: watching the interfaces of network namespace {ino}: {e}; new ones \
                     get no TC programs"
                );
                return;
            }
            if changed.send(ino).is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = stop => {}
        () = watching => {}
    }
}

/// The relay's tasks: each listener's acceptor and every connection. `None` once stopped, so a
/// task that accepted as the relay stopped cannot spawn a successor that would outlive it.
struct Tasks(Mutex<Option<JoinSet<()>>>);

impl Tasks {
    /// Spawns `task` on the runtime the caller runs on.
    fn spawn(&self, task: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.with(|set| {
            set.spawn(task);
        });
    }

    fn spawn_on(
        &self,
        task: Pin<Box<dyn Future<Output = ()> + Send>>,
        runtime: &tokio::runtime::Handle,
    ) {
        self.with(|set| {
            set.spawn_on(task, runtime);
        });
    }

    fn with(&self, spawn: impl FnOnce(&mut JoinSet<()>)) {
        if let Some(set) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // Reap the finished ones so the set does not grow with the relay's history.
            while set.try_join_next().is_some() {}
            spawn(set);
        }
    }
}

/// A listener registered with the runtime the caller runs on, for [`accept`].
fn register(listener: std::net::TcpListener) -> io::Result<AsyncFd<mio::net::TcpListener>> {
    listener.set_nonblocking(true)?;
    // SAFETY: the mio listener owns its descriptor, and AsyncFd owns the listener.
    let registered = unsafe {
        AsyncFd::register_with_interest(
            mio::net::TcpListener::from_std(listener),
            tokio::io::Interest::READABLE,
        )
    }?;
    Ok(registered)
}

/// The next connection of `listener`, taken one per wake-up. accept(2) makes a socket (inode,
/// file, descriptor) before it looks at the queue, and frees it through RCU when the queue is
/// empty. Accepting until that happens, as tokio's TcpListener does, pays it for every connection
/// that comes alone, and the frees come back in batches in the softirq of the CPU the relay and
/// its client share. poll(2) asks whether another waits and allocates nothing.
async fn accept(listener: &AsyncFd<mio::net::TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        let Ok(accepted) = ready.try_io(|socket| socket.get_ref().accept()) else {
            continue;
        };
        let (stream, peer) = accepted?;
        if !waiting(listener) {
            // Only if no wake-up came meanwhile: tokio compares the readiness's tick.
            ready.clear_ready();
        }
        let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(stream));
        return Ok((TcpStream::from_std(stream)?, peer));
    }
}

/// Whether a connection waits in `listener`'s accept queue. When poll(2) fails it says yes: an
/// accept() more is cheaper than a connection left waiting.
fn waiting(listener: &impl std::os::fd::AsFd) -> bool {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).map_or(true, |n| n > 0)
}

/// Accepts one connection, hands the listener on to a new task, and serves the connection
/// itself: its first steps (the kernel record, the ClientHello, the upstream connect) run at once,
/// ahead of the next accept() and of a spawned task's scheduling.
fn serve_next(
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let (stream, peer) = loop {
            match accept(&listener.socket).await {
                Ok(accepted) => break accepted,
                Err(_) if listener.closed.load(Ordering::Acquire) => return,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    log::warn!("relay: accept failed: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        };
        keep_wheel();
        let (netns, port) = (Arc::clone(&listener.netns), listener.port);
        tasks.spawn(serve_next(
            listener,
            Arc::clone(&shared),
            Arc::clone(&tasks),
        ));
        let taken = std::time::Instant::now();
        let open = Open::new(&shared.status.relay_open);
        let mut cookie = None;
        let record = handle(stream, peer, port, netns, &shared, &mut cookie).await;
        // Counted before the gauge falls: with no connection open, every one has been counted.
        shared.status.observe(&record);
        drop(open);
        let _ = match cookie {
            Some(cookie) => {
                let relayed = Relayed { cookie, taken };
                shared.records.send_relay(record, relayed).await
            }
            None => shared.records.send(record).await,
        };
    })
}

/// How long a worker keeps a timer of its own after its last connection, and how often that
/// timer wakes the worker while it serves.
const WHEEL_KEPT: Duration = Duration::from_secs(1);

thread_local! {
    /// On a relay worker: whether its [`wheel_kept`] runs, and whether a connection came since it
    /// last looked.
    static WHEEL: std::cell::Cell<(bool, bool)> = const { std::cell::Cell::new((false, false)) };
}

/// Notes a connection on this worker; starts [`wheel_kept`] if it is not running.
fn keep_wheel() {
    let (running, _) = WHEEL.get();
    WHEEL.set((true, true));
    if !running {
        tokio::spawn(wheel_kept());
    }
}

/// Keeps a timer on the worker's wheel, earlier than a connection's idle limit, while the worker
/// serves. To register a timer earlier than all it has, tokio wakes its own thread: an eventfd
/// write and one more turn of its loop, inside the first byte's wait (after the hello goes
/// upstream, where an upstream woken on this CPU waits for the worker to sleep). Ends after
/// [`WHEEL_KEPT`] without a connection, so that an idle agent is not woken.
async fn wheel_kept() {
    loop {
        sleep(WHEEL_KEPT).await;
        let (_, served) = WHEEL.get();
        WHEEL.set((served, false));
        if !served {
            return;
        }
    }
}

/// One connection counted in the open-connections gauge, until dropped (also when the relay
/// stops and its task is cancelled).
struct Open<'a>(&'a Gauge);

impl<'a> Open<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The kernel's key for a client end seen by accept() in the namespace with cookie `netns`.
fn peer_key(peer: SocketAddr, relay_port: u16, netns: u64) -> RelayPeer {
    let addr = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    RelayPeer {
        addr,
        port_be: peer.port().to_be(),
        relay_port,
        pad2: 0,
        netns,
    }
}

fn dst_of(steered: &Steered) -> SocketAddr {
    let v6 = Ipv6Addr::from(steered.dst_addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be(steered.dst_port_be))
}

fn refuse(mut record: Record, outcome: &'static str, reason: String) -> Record {
    log::info!(
        "relay: {outcome} {} ({}): {reason}",
        record.dst.map_or("?".to_owned(), |d| d.to_string()),
        crate::text::printable(record.comm.as_deref().unwrap_or("?"))
    );
    record.ended(outcome, Some(reason));
    record
}

/// A steered connection's record, before the connection's fate is known: the kernel's facts,
/// the policy's names for them, and the client's cgroup.
fn base_record(at: Timestamp, steered: &Steered, catalog: &Catalog, shared: &Shared) -> Record {
    let mut record = Record::relay(at, steered);
    catalog.annotate(&mut record);
    record.cgroup = record.cgroup_id.and_then(|id| {
        shared
            .cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .name(id)
    });
    record
}

/// What an admitted connection has come to. Should the relay stop while the connection is in
/// progress (its task is then dropped), this makes its record, outcome `stopped`, for
/// [`Relay::stop`] to send: every steered connection the relay took has an end in the log.
struct Cut<'a> {
    shared: &'a Shared,
    steered: &'a Steered,
    /// The client's end.
    peer: SocketAddr,
    at: Timestamp,
    catalog: &'a Catalog,
    moved: &'a Moved,
    sni: OnceLock<String>,
    /// The TLS origination's mode, on a port with one.
    origination: OnceLock<&'static str>,
    /// Where the upstream connection went, and in how many attempts.
    upstream: OnceLock<(SocketAddr, u32)>,
    taken: std::time::Instant,
    armed: bool,
}

impl Cut<'_> {
    /// The connection ended on its own, with its own record.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        // Only a stopping relay drops a connection's task; a task that panicked has no record
        // to write here.
        if !self.armed || !self.shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let mut record = base_record(self.at, self.steered, self.catalog, self.shared);
        record.src = Some(self.peer);
        record.sni = self.sni.take();
        record.origination = self.origination.get().map(|&mode| Word::Borrowed(mode));
        if let Some(&(upstream, attempts)) = self.upstream.get() {
            record.upstream = Some(upstream);
            record.attempts = Some(attempts);
            record.bytes_up = Some(self.moved.up.load(Ordering::Relaxed));
            record.bytes_down = Some(self.moved.down.load(Ordering::Relaxed));
        }
        record.duration_ms = Some(self.taken.elapsed().as_millis() as u64);
        record.ended("stopped", Some("the agent stopped".to_owned()));
        let relayed = Relayed {
            cookie: self.steered.cookie,
            taken: self.taken,
        };
        self.shared
            .cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((record, relayed));
    }
}

/// One steered connection, from `peer` to the relay's `port` in `netns`, start to end. Returns
/// its record; sets `cookie` to the client socket's, where the kernel steered it.
async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    netns: Arc<Netns>,
    shared: &Shared,
    cookie: &mut Option<u64>,
) -> Record {
    let started = Instant::now();
    let finish = |mut r: Record| {
        r.src = Some(peer);
        r.duration_ms = Some(started.elapsed().as_millis() as u64);
        r
    };
    let key = peer_key(peer, port, netns.cookie);
    let found = shared.peers().get(&key, 0).ok();
    // A record marked closed is never served: its client closed having sent nothing (a port
    // check), and the kernel left the record for the relay to say whom it refuses.
    let closed = found.is_some_and(|s| s.closed_ns != 0);
    if closed {
        shared.forget(&key);
    }
    let gone = (found.is_none() || closed) && client_gone(&client);
    let Some(steered) = found.filter(|s| !closed || (gone && closed_lately(s))) else {
        // The kernel forgets the record of a steered socket that closes having sent something:
        // such a client can be gone before the relay looks.
        let why = if gone {
            "the client had closed before the relay took the connection"
        } else {
            "not a steered connection"
        };
        return finish(refuse(
            Record::relay_unknown(Timestamp::now()),
            "refused",
            format!("no kernel record for {peer}: {why}"),
        ));
    };
    *cookie = Some(steered.cookie);
    let leave = Leave {
        netns,
        bound_if: steered.bound_if,
        // Only when more connections are open than there are CPUs: then they are busy and a
        // packet and a wakeup fewer is throughput. On an idle machine the upstream's wakeup by
        // that ACK overlaps with the relay's own, and holding it back adds to the first byte's
        // wait (measured in `cargo xtask bench relay`).
        ack_with_data: shared.status.relay_open.get() > shared.cpus,
        keepalive: None,
    };
    let at = Timestamp::now();
    let catalog = Arc::clone(&shared.catalog.borrow());
    // Built when the connection no longer waits on the relay: no byte waits for its record.
    let new_record = || base_record(at, &steered, &catalog, shared);

    if closed {
        return finish(refuse(
            new_record(),
            "refused",
            "the client had closed before the relay took the connection".to_owned(),
        ));
    }
    let open = usize::try_from(shared.status.relay_open.get()).unwrap_or(0);
    // Held to the connection's end, however it ends.
    let _admitted = match shared.admission.admit(steered.cgroup_id, open) {
        Ok(admitted) => admitted,
        Err((refusal, warn)) => {
            // Nothing of the client's is read: it may close having sent nothing.
            shared.forget(&key);
            shared.status.over_limit(refusal.limit());
            let mut record = new_record();
            if let Some(n) = warn {
                log::warn!(
                    "relay: refused a connection of {} (cgroup {}): {refusal}; {n} refused so \
                     since this was last logged",
                    crate::text::printable(record.comm.as_deref().unwrap_or("?")),
                    crate::text::printable(record.cgroup.as_deref().unwrap_or("?")),
                );
            }
            // Logged above, not once per refusal: a workload at its limit may try many times
            // a second.
            record.ended("refused", Some(refusal.to_string()));
            return finish(record);
        }
    };

    let moved = Moved::default();
    let cut = Cut {
        shared,
        steered: &steered,
        peer,
        at,
        catalog: &catalog,
        moved: &moved,
        sni: OnceLock::new(),
        origination: OnceLock::new(),
        upstream: OnceLock::new(),
        taken: std::time::Instant::now(),
        armed: true,
    };
    let record = relay_admitted(
        client,
        &key,
        &steered,
        leave,
        &catalog,
        &new_record,
        shared,
        &cut,
    )
    .await;
    cut.disarm();
    finish(record)
}

/// A connection admitted, from its kernel record on: returns its record. What it has come to is
/// noted in `cut`, for its record should the relay stop meanwhile.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's parts, each once"
)]
async fn relay_admitted(
    mut client: TcpStream,
    key: &RelayPeer,
    steered: &Steered,
    mut leave: Leave,
    catalog: &Arc<Catalog>,
    new_record: &(dyn Fn() -> Record + Sync),
    shared: &Shared,
    cut: &Cut<'_>,
) -> Record {
    let dst = dst_of(steered);
    let moved = cut.moved;
    let pool = catalog.pool(steered.rule_id, dst.port());
    leave.keepalive = pool.and_then(|p| p.keepalive);
    let timeouts = Timeouts::of(pool, &shared.config);
    let mut taken = catalog.carry(steered.rule_id, dst.port());
    let mut origin = catalog.origination(steered.rule_id, dst.port()).cloned();
    let mut h2 = false;
    if taken == Carry::Detect {
        // No protocol declared, or gRPC/HTTP2: the client's first bytes tell, as Istio's
        // sniffing does.
        let plain = || Origination {
            port: dst.port(),
            target_port: dst.port(),
            tls: None,
        };
        match hello::sniff(&client, shared.config.hello_timeout).await {
            // The client's own TLS, passed through, even where a DestinationRule would have
            // egress originate it.
            Ok(Detected::Tls) => {
                taken = Carry::Tls;
                origin = None;
            }
            Ok(Detected::Http) => {
                origin.get_or_insert_with(plain);
            }
            // Served as HTTP/2, each request's host checked: carried unread, they could reach
            // another host of the destination's server.
            Ok(Detected::Http2) => {
                h2 = true;
                origin.get_or_insert_with(plain);
            }
            Ok(Detected::Other) if origin.is_some() => {
                return refuse(
                    new_record(),
                    "refused",
                    "neither TLS nor HTTP, on a port where a DestinationRule asks egress to \
                     originate TLS: it would leave in the clear"
                        .to_owned(),
                );
            }
            Ok(Detected::Other) => taken = Carry::Opaque,
            Err(e) => {
                shared.forget(key);
                return refuse(new_record(), "refused", e.to_string());
            }
        }
    }
    if let Some(origin) = origin {
        if let Some(tls) = &origin.tls {
            let _ = cut.origination.set(tls.mode);
        }
        // Boxed: its state machine would otherwise enlarge every connection's future, moved
        // whole when the connection's task is spawned.
        let record = Box::pin(originate::serve(
            client,
            steered,
            leave,
            origin,
            Arc::clone(catalog),
            new_record(),
            shared,
            timeouts,
            pool,
            h2,
        ))
        .await;
        if record.requests == Some(0) {
            // As for a hello that never came.
            shared.forget(key);
        }
        return record;
    }

    // A TCP port's bytes are carried as they come: nothing in them names a host, and the server
    // may speak first. The kernel's record of the destination is what is judged.
    let (upstream, hello) = match taken {
        Carry::Opaque => match catalog.carried(steered.rule_id, dst) {
            Ok(upstream) => (upstream, None),
            Err(reason) => return refuse(new_record(), "refused", reason),
        },
        Carry::Tls | Carry::Detect => {
            let hello = match hello::read_accepted(
                &mut client,
                shared.config.hello_limit,
                shared.config.hello_timeout,
            )
            .await
            {
                Ok(h) => h,
                Err(e) => {
                    // The client may have sent nothing: closing so, it would leave its record
                    // to the relay, which is done with it.
                    shared.forget(key);
                    return refuse(new_record(), "refused", e.to_string());
                }
            };
            if let Some(name) = &hello.sni {
                let _ = cut.sni.set(name.clone());
            }
            let named = |mut record: Record, hello: Hello| {
                record.sni = hello.sni;
                record.alpn = Some(hello.alpn);
                record
            };
            let Some(name) = hello.sni.as_deref() else {
                return refuse(
                    named(new_record(), hello),
                    "refused",
                    "ClientHello without a server name".to_owned(),
                );
            };
            match catalog.upstream(steered.rule_id, name, dst) {
                Ok(u) => (u, Some(hello)),
                Err(reason) => return refuse(named(new_record(), hello), "refused", reason),
            }
        }
    };
    // A VirtualService's route may send the connection to another host: to the
    // addresses the policy gives that host, never to the client's word, under that host's
    // DestinationRule there.
    let host = Name::clone(&upstream.host);
    let sni = hello.as_ref().and_then(|h| h.sni.as_deref());
    let (rule, port, upstream, routed) =
        match catalog.routed(steered.rule_id, dst.port(), sni, &upstream.host) {
            None => (steered.rule_id, dst.port(), upstream, None),
            Some(Ok(to)) => {
                let upstream = Upstream {
                    host: Name::clone(&to.host),
                    route: upstream.route,
                    alternates: to.addrs,
                    dialled: false,
                };
                (to.rule, to.port, upstream, Some(to.host))
            }
            Some(Err(reason)) => {
                let mut record = new_record();
                if let Some(hello) = hello {
                    record.sni = hello.sni;
                    record.alpn = Some(hello.alpn);
                }
                record.host = Some(host);
                return refuse(record, "refused", reason);
            }
        };
    let (pool, timeouts) = if routed.is_some() {
        let pool = catalog.pool(rule, port);
        leave.keepalive = pool.and_then(|p| p.keepalive);
        (pool, Timeouts::of(pool, &shared.config))
    } else {
        (pool, timeouts)
    };
    let opaque = hello.is_none();
    if opaque {
        // The server may speak first: its accept() must not wait for bytes of the client's.
        leave.ack_with_data = false;
    }
    // The hello's names move into the record the connection ends with; what the client sent
    // after its hello waits for the upstream's answer (`answer`).
    let (sni, alpn, bytes, held) = match hello {
        Some(Hello {
            sni,
            alpn,
            mut bytes,
            end,
        }) => {
            let held = bytes.split_off(end);
            (sni, Some(alpn), bytes, held)
        }
        None => (None, None, Vec::new(), Vec::new()),
    };
    let with_upstream = |attempts, sni, alpn| {
        let mut record = new_record();
        record.sni = sni;
        record.alpn = alpn;
        record.host = Some(Name::clone(&host));
        record.upstream_host = routed.clone();
        record.attempts = Some(attempts);
        record
    };
    // Held to the connection's end, as Envoy counts a cluster's connections.
    let _pooled = match pool.and_then(|p| Some((p, p.max_connections?))) {
        Some((pool, max)) => match shared.admission.admit_host(rule, &upstream.host, port, max) {
            Ok(admitted) => Some(admitted),
            Err(open) => {
                shared.status.over_limit("destination");
                let reason = format!(
                    "{}:{} has {open} connections through the relay, as many as {} allows \
                     (connectionPool.tcp.maxConnections)",
                    upstream.host, port, pool.by
                );
                return refuse(with_upstream(0, sni, alpn), "refused", reason);
            }
        },
        None => None,
    };

    let choice = Choice {
        rule,
        balancer: &shared.balancer,
        balancing: catalog.balancing(rule, port),
        // A connection passed through has no request to hash: its source alone.
        key: match catalog.hash_on(rule, port) {
            Some(HashOn::SourceIp) => Some(balance::hash(&leave.netns.cookie)),
            _ => None,
        },
        health: &shared.health,
        outliers: catalog.outliers(rule, port),
    };
    let to = SocketAddr::new(dst.ip(), port);
    let (mut server, connected, attempts) =
        match connect(to, &upstream, &leave, timeouts.connect, &choice).await {
            Ok(ok) => ok,
            Err((attempts, reason)) => {
                let record = with_upstream(attempts, sni, alpn);
                return refuse(record, "upstream-failed", reason);
            }
        };
    // Held to the connection's end: the least request counts connections in progress.
    let _in_flight = shared.balancer.start(rule, choice.balancing, connected);
    let _ = cut.upstream.set((connected, attempts));
    let sent = if opaque {
        Ok(())
    } else {
        write_now(&mut server, &bytes).await
    };
    let mut record = with_upstream(attempts, sni, alpn);
    record.upstream = Some(connected);
    let hello_len = bytes.len() as u64;
    // Not held for the connection's life.
    drop(bytes);
    let outcome = match sent {
        Ok(()) => {
            moved.up.fetch_add(hello_len, Ordering::Relaxed);
            let name = record.sni.as_deref().unwrap_or_default();
            let config = &shared.config;
            // One idle limit from the hello on, the upstream's answer included: one timer.
            let activity = Activity::new();
            let relayed = async {
                let mut upstream_ended = false;
                // A TCP port's server may speak first: its bytes are carried as they come.
                if !opaque {
                    match answer(
                        &mut client,
                        &mut server,
                        held,
                        name,
                        moved,
                        config,
                        &activity,
                    )
                    .await
                    {
                        Ok(Answered::Carry { upstream_ended: e }) => upstream_ended = e,
                        Ok(Answered::Refused(reason)) => return Err(Stop::Refused(reason)),
                        Err(e) => return Err(Stop::Io(e)),
                    }
                }
                carry(&client, &server, moved, config, &activity, upstream_ended)
                    .await
                    .map(|()| Ended::Closed)
                    .map_err(Stop::Io)
            };
            let ended = tokio::select! {
                ended = relayed => ended,
                () = activity.quiet(timeouts.idle) => Ok(Ended::Idle),
            };
            // The end's work (both sockets closed, the record) waits for the worker's other ready
            // work, which the runtime polls for first: a client's next connection, come with
            // this one's end, then takes its first steps before it (`cargo xtask bench relay`;
            // see docs/benchmarks.md).
            tokio::task::yield_now().await;
            // Closed at once: the second direction to end leaves its FIN to the close.
            drop((client, server));
            ended
        }
        Err(e) => Err(Stop::Io(e)),
    };
    record.bytes_up = Some(moved.up.load(Ordering::Relaxed));
    record.bytes_down = Some(moved.down.load(Ordering::Relaxed));
    match outcome {
        Ok(Ended::Closed) => record.ended("ok", None),
        Ok(Ended::Idle) => record.ended("idle-timeout", None),
        Err(Stop::Refused(reason)) => return refuse(record, "refused", reason),
        Err(Stop::Io(e)) => record.ended("error", Some(e.to_string())),
    }
    record
}

/// How a connection stopped short of its end.
enum Stop {
    Refused(String),
    Io(io::Error),
}

/// What the upstream's first answer leaves to the connection.
#[derive(Debug, PartialEq, Eq)]
enum Answered {
    /// Bytes may flow on; whether the upstream has ended, and its end been passed on.
    Carry { upstream_ended: bool },
    /// The connection is refused, for this reason.
    Refused(String),
}

/// Passes the upstream's first answer to the client, then `held` (what the client sent after
/// its hello) to the upstream. Bytes that move count in `activity`, whose idle limit the caller
/// keeps. After a HelloRetryRequest the client sends a second ClientHello, which must name the
/// server its first named (RFC 8446 §4.1.2): it is read and judged as the first was, or a client
/// could name an allowed host first and another host of the same destination's server (a CDN's)
/// second, and reach that one.
async fn answer(
    client: &mut TcpStream,
    server: &mut TcpStream,
    held: Vec<u8>,
    name: &str,
    moved: &Moved,
    config: &RelayConfig,
    activity: &Activity,
) -> io::Result<Answered> {
    let mut first = Vec::with_capacity(16 << 10);
    let mut ended = false;
    let retry = loop {
        // The socket's one reader waker, not a waiter added to and taken off its list: fewer
        // steps a wait (only this task reads the socket).
        std::future::poll_fn(|cx| server.poll_read_ready(cx)).await?;
        if first.len() == first.capacity() {
            first.reserve(4096);
        }
        match server.try_read_buf(&mut first) {
            // An upstream that closed at once answered nothing to judge; its end is passed on
            // below.
            Ok(0) => {
                ended = true;
                break false;
            }
            Ok(_) => {
                activity.touch();
                if let Some(retry) = hello::retry_request(&first) {
                    break retry;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    };
    // Whether the upstream's end came right behind its answer (a server that answers and
    // closes): then the FIN goes to the client with the answer, at once, whatever the client's
    // bytes to the upstream wait for. After a HelloRetryRequest the server waits for the client.
    let mut failed = None;
    while !retry && !ended && first.len() < first.capacity() {
        match server.try_read_buf(&mut first) {
            Ok(0) => ended = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // The answer that came before it still goes on.
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let mut left = &first[..];
    while !left.is_empty() {
        std::future::poll_fn(|cx| client.poll_write_ready(cx)).await?;
        match splice::send_then(client, left, ended) {
            Ok(n) => left = &left[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    moved.down.fetch_add(first.len() as u64, Ordering::Relaxed);
    drop(first);
    if let Some(e) = failed {
        return Err(e);
    }
    if ended {
        splice::half_close(client)?;
    }
    let onward = if retry {
        let again =
            match hello::read_again(client, held, config.hello_limit, config.hello_timeout).await {
                Ok(again) => again,
                Err(e) => {
                    return Ok(Answered::Refused(format!("after a HelloRetryRequest: {e}")));
                }
            };
        if again.sni.as_deref() != Some(name) {
            return Ok(Answered::Refused(format!(
                "the ClientHello after a HelloRetryRequest names {}, the first named {name}",
                again.sni.as_deref().unwrap_or("no server")
            )));
        }
        again.bytes
    } else {
        held
    };
    if !onward.is_empty() {
        server.write_all(&onward).await?;
        moved.up.fetch_add(onward.len() as u64, Ordering::Relaxed);
        activity.touch();
    }
    Ok(Answered::Carry {
        upstream_ended: ended,
    })
}

/// The attempts a route allows, shared by passthrough connects and originated requests: each
/// after Envoy's back-off, to the destination first and then the host's other addresses in
/// turn, limited by the per-try timeout and the route's timeout.
struct Attempts {
    tries: u32,
    made: u32,
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    targets: Vec<SocketAddr>,
}

enum Next {
    /// Try `target`, giving up at `limit` if there is one.
    Try {
        target: SocketAddr,
        limit: Option<Instant>,
    },
    /// Every try allowed has been made.
    Spent,
    /// The route's timeout has passed.
    TimedOut,
}

impl Attempts {
    fn new(
        route: &RelayRoute,
        tries: u32,
        per_try: Option<Duration>,
        targets: Vec<SocketAddr>,
    ) -> Self {
        Attempts {
            tries,
            made: 0,
            per_try,
            deadline: route.timeout.map(|t| Instant::now() + t),
            targets,
        }
    }

    async fn next(&mut self) -> Next {
        if self.made >= self.tries || self.targets.is_empty() {
            return Next::Spent;
        }
        if self.made > 0 {
            sleep(RETRY_BACKOFF).await;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Next::TimedOut;
        }
        let target = self.targets[self.made as usize % self.targets.len()];
        self.made += 1;
        let limit = self
            .per_try
            .map(|t| Instant::now() + t)
            .into_iter()
            .chain(self.deadline)
            .min();
        Next::Try { target, limit }
    }
}

/// Runs `work` until `limit`, if there is one: `None` when the limit came first.
async fn within<F: Future>(limit: Option<Instant>, work: F) -> Option<F::Output> {
    match limit {
        Some(limit) => timeout_at(limit, work).await.ok(),
        None => Some(work.await),
    }
}

/// Why a connection to a virtual address has nowhere to go: its ServiceEntry's endpoints all
/// take the port on other numbers.
const NO_TARGET: &str = "no endpoint of the ServiceEntry takes this port on its own number, and the address dialled is virtual";

/// How a connection's attempts choose among the host's addresses: its rule's load balancing and
/// outlier detection, with what the relay keeps of each.
struct Choice<'a> {
    rule: u32,
    balancer: &'a balance::Balancer,
    balancing: crate::policy::compile::Balancing,
    /// The connection's or request's hash, where the balancing hashes (`consistentHash`).
    key: Option<u64>,
    health: &'a health::Health,
    outliers: Option<&'a crate::policy::compile::Outliers>,
}

impl Choice<'_> {
    /// The host's addresses (`targets`, the dialled one first) in the order attempts take them:
    /// as the load balancing says, without those out (`outlierDetection`). With the addresses
    /// kept for outlier detection's share (none without it).
    fn order(&self, targets: Vec<SocketAddr>) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        match self.outliers {
            Some(o) => {
                let ordered =
                    (self.balancer).order(self.rule, self.balancing, self.key, targets.clone());
                (self.health.order(self.rule, ordered, &targets, o), targets)
            }
            None => (
                self.balancer
                    .order(self.rule, self.balancing, self.key, targets),
                Vec::new(),
            ),
        }
    }

    /// Notes how an attempt at `target`, one of the host's addresses `of`, went, where outlier
    /// detection counts it.
    fn note(&self, target: SocketAddr, of: &[SocketAddr], outcome: health::Outcome) {
        if let Some(o) = self.outliers {
            self.health.note(self.rule, target, of, outcome, o);
        }
    }
}

/// Connects to the original destination, retrying as the route says: the first attempt goes to
/// the destination the client dialled, later ones may go to other addresses of the same host,
/// unless the DestinationRule's load balancing chooses otherwise. Returns the stream, the
/// address it reached and the number of attempts, or the attempts made and why the last
/// failed. Where a DestinationRule asks for outlier detection, the addresses out are left out
/// of the attempts, and each attempt's outcome counts.
async fn connect(
    dst: SocketAddr,
    upstream: &Upstream,
    leave: &Leave,
    connect_timeout: Duration,
    choice: &Choice<'_>,
) -> Result<(TcpStream, SocketAddr, u32), (u32, String)> {
    let route = &upstream.route;
    // A connect is bounded by the connect timeout, as Envoy's are, whatever the per-try timeout.
    let per_try = route
        .per_try_timeout
        .map_or(connect_timeout, |t| t.min(connect_timeout));
    let (ordered, targets) = choice.order(upstream.targets(dst));
    if ordered.is_empty() {
        return Err((0, NO_TARGET.to_owned()));
    }
    let mut attempts = Attempts::new(
        route,
        route.retries.saturating_add(1),
        Some(per_try),
        ordered,
    );
    let mut last = String::new();
    let note = |target, outcome| choice.note(target, &targets, outcome);
    loop {
        match attempts.next().await {
            Next::Try { target, limit } => match within(limit, connect_own(target, leave)).await {
                Some(Ok(stream)) => {
                    note(target, health::Outcome::Connected);
                    return Ok((stream, target, attempts.made));
                }
                Some(Err(e)) => {
                    note(target, health::Outcome::Failed);
                    last = format!("{target}: {e}");
                }
                None => {
                    note(target, health::Outcome::Failed);
                    last = format!("{target}: connect timed out");
                }
            },
            Next::TimedOut => {
                return Err((attempts.made, format!("route timeout reached; {last}")));
            }
            Next::Spent => {
                let made = attempts.made;
                return Err((made, format!("{made} attempt(s) failed; last: {last}")));
            }
        }
    }
}

/// A connect the kernel hooks let through as it is: the connection it continues was judged when
/// the client connected. Made in the client's network namespace, and bound to the interface the
/// client's socket was bound to until the kernel steered it, if any.
async fn connect_own(target: SocketAddr, leave: &Leave) -> io::Result<TcpStream> {
    let socket = leave.netns.within(|| match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    })?;
    if leave.bound_if != 0 {
        set_int(
            &socket,
            libc::SOL_SOCKET,
            libc::SO_BINDTOIFINDEX,
            leave.bound_if as i32,
        )?;
    }
    if leave.ack_with_data {
        // The relay speaks first (a ClientHello), at once: the handshake's last ACK waits for
        // those bytes and goes out with them, one packet and one wakeup of the upstream fewer.
        // The kernel keeps this for the handshake only (HAProxy's tcp-smart-connect).
        set_int(&socket, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0)?;
    }
    if let Some(k) = leave.keepalive {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&socket, sockopt::KeepAlive, &true)?;
        // Bounds checked as the policy was compiled.
        if let Some(t) = k.time {
            setsockopt(&socket, sockopt::TcpKeepIdle, &(t.as_secs() as u32))?;
        }
        if let Some(t) = k.interval {
            setsockopt(&socket, sockopt::TcpKeepInterval, &(t.as_secs() as u32))?;
        }
        if let Some(n) = k.probes {
            setsockopt(&socket, sockopt::TcpKeepCount, &n)?;
        }
    }
    // Not `TcpSocket::connect`, which waits for the runtime to see the socket writable: the
    // runtime first runs every other task that is ready, then polls for events. On loopback and
    // veth the handshake is done inside connect(2), and the connection goes on at once.
    match nix::sys::socket::connect(socket.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    // SAFETY: the descriptor is the socket's own, given up by it; tokio made it non-blocking.
    let std = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let stream = TcpStream::from_std(std)?;
    let mut made = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    let at_once = match poll(&mut made, PollTimeout::ZERO) {
        Ok(n) if n > 0 => made[0].revents(),
        Ok(_) | Err(Errno::EINTR) => {
            stream.writable().await?;
            None
        }
        Err(e) => return Err(e.into()),
    };
    // Writable alone is made; with an error or hang-up, or after a wait, take_error tells.
    if at_once != Some(PollFlags::POLLOUT)
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `bytes` to `stream`: at once what the socket takes, then the rest as it drains. The
/// runtime has not seen a socket just connected writable yet, and would wait for its next poll
/// for events (see [`connect_own`]).
async fn write_now(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let flags = nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_NOSIGNAL);
    let sent = match nix::sys::socket::send(stream.as_raw_fd(), bytes, flags) {
        Ok(n) => n,
        Err(Errno::EAGAIN | Errno::EINTR) => 0,
        Err(e) => return Err(e.into()),
    };
    stream.write_all(&bytes[sent..]).await
}

/// A connection's timeouts: the DestinationRule's connection pool settings for its port, else
/// the relay's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timeouts {
    /// Of one upstream connect.
    connect: Duration,
    /// With no byte either way.
    idle: Duration,
}

impl Timeouts {
    fn of(pool: Option<&ConnectionPool>, config: &RelayConfig) -> Timeouts {
        let idle = match pool.and_then(|p| p.idle_timeout) {
            // Istio: 0s turns the idle timeout off.
            Some(Duration::ZERO) => Duration::MAX,
            Some(idle) => idle,
            None => config.idle_timeout,
        };
        Timeouts {
            connect: pool
                .and_then(|p| p.connect_timeout)
                .unwrap_or(config.connect_timeout),
            idle,
        }
    }
}

/// TCP states, as TCP_INFO gives them (include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;

/// Whether the client end has closed or reset its connection already (the kernel's TCP state
/// of the accepted socket).
fn client_gone(stream: &TcpStream) -> bool {
    tcp_info(stream).is_ok_and(|info| matches!(info.tcpi_state, TCP_CLOSE | TCP_CLOSE_WAIT))
}

/// The kernel's TCP_INFO of a socket.
fn tcp_info(stream: &TcpStream) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; all zeroes is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    // SAFETY: TCP_INFO takes a tcp_info (a shorter one from an older kernel leaves the rest 0).
    unsafe { netns::get_option(stream.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut info) }?;
    Ok(info)
}

/// An int socket option nix has no type for.
fn set_int(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket and an int option value that outlives the call.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

enum Ended {
    Closed,
    Idle,
}

/// When bytes last moved on a connection, to cut it after a quiet spell.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `idle`.
    async fn quiet(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            sleep(idle - quiet).await;
        }
    }
}

/// Bytes a connection moved: client to upstream, and back.
#[derive(Default)]
struct Moved {
    up: AtomicU64,
    down: AtomicU64,
}

/// Carries bytes both ways until both sides have finished (each EOF passed on as a half-close)
/// or a side fails (both end). Bytes that move count in `activity`, whose idle limit the caller
/// keeps. Where the upstream has ended already (`upstream_ended`, its end passed on with its
/// answer), only the client's direction is left.
async fn carry(
    client: &TcpStream,
    server: &TcpStream,
    moved: &Moved,
    config: &RelayConfig,
    activity: &Activity,
    upstream_ended: bool,
) -> io::Result<()> {
    let ended = AtomicBool::new(upstream_ended);
    tokio::try_join!(
        splice::pump(
            client,
            server,
            &moved.up,
            &moved.down,
            activity,
            &ended,
            config.splice
        ),
        async {
            if upstream_ended {
                return Ok(());
            }
            splice::pump(
                server,
                client,
                &moved.down,
                &moved.up,
                activity,
                &ended,
                config.splice,
            )
            .await
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 443);
    const B: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)), 443);

    /// Drives `attempts` to its end: each try's target, its start and limit (from the first
    /// start), and how it ended.
    async fn schedule(mut attempts: Attempts) -> (Vec<(SocketAddr, u64, Option<u64>)>, bool) {
        let start = Instant::now();
        let ms = |t: Instant| (t - start).as_millis() as u64;
        let mut tries = Vec::new();
        loop {
            match attempts.next().await {
                Next::Try { target, limit } => {
                    tries.push((target, ms(Instant::now()), limit.map(ms)));
                }
                Next::Spent => return (tries, false),
                Next::TimedOut => return (tries, true),
            }
        }
    }

    #[tokio::test]
    async fn a_destination_rules_timeouts_replace_the_relays_and_zero_idle_is_none() {
        let config = RelayConfig::default();
        let pool = |connect, idle| ConnectionPool {
            connect_timeout: connect,
            idle_timeout: idle,
            ..ConnectionPool::default()
        };
        assert_eq!(
            Timeouts::of(None, &config),
            Timeouts {
                connect: config.connect_timeout,
                idle: config.idle_timeout
            }
        );
        let second = Duration::from_secs(1);
        assert_eq!(
            Timeouts::of(Some(&pool(Some(second), Some(second))), &config),
            Timeouts {
                connect: second,
                idle: second
            }
        );
        let none = Timeouts::of(Some(&pool(None, Some(Duration::ZERO))), &config);
        assert_eq!(none.idle, Duration::MAX);
        // Waiting that long is waiting for ever, not an overflow.
        let activity = Activity::new();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), activity.quiet(none.idle))
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(none.idle, std::future::ready(()))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_take_turns_over_the_targets_after_the_back_off_within_the_route_timeout() {
        let route = |timeout| RelayRoute {
            timeout,
            ..RelayRoute::default()
        };
        let second = Duration::from_secs(1);
        assert_eq!(
            schedule(Attempts::new(&route(None), 3, Some(second), vec![A, B])).await,
            (
                vec![(A, 0, Some(1000)), (B, 25, Some(1025)), (A, 50, Some(1050))],
                false
            )
        );
        // The route's timeout bounds each try and ends the tries.
        assert_eq!(
            schedule(Attempts::new(
                &route(Some(Duration::from_millis(60))),
                9,
                Some(second),
                vec![A]
            ))
            .await,
            (
                vec![(A, 0, Some(60)), (A, 25, Some(60)), (A, 50, Some(60))],
                true
            )
        );
        // No limit at all: only the count ends them.
        assert_eq!(
            schedule(Attempts::new(&route(None), 2, None, vec![A, B])).await,
            (vec![(A, 0, None), (B, 25, None)], false)
        );
    }

    /// `answer` for a client that sent nothing after its hello, under the relay's defaults.
    async fn answer_alone(
        client: &mut TcpStream,
        server: &mut TcpStream,
        moved: &Moved,
        activity: &Activity,
    ) -> io::Result<Answered> {
        let config = RelayConfig::default();
        answer(
            client,
            server,
            Vec::new(),
            "a.test",
            moved,
            &config,
            activity,
        )
        .await
    }

    /// An upstream that answers the hello and closes at once: its answer and its end, come
    /// together, reach the client together, in one segment, and before the relay carries
    /// anything more (what the client sent after its hello may wait for the upstream).
    #[tokio::test]
    async fn an_answer_with_the_end_behind_it_reaches_the_client_in_one_segment() {
        use tokio::io::AsyncReadExt as _;
        let (mut server, upstream) = splice::tests::pair(None).await;
        let (mut client, mut accepted) = splice::tests::pair(None).await;
        // Not a TLS record: no HelloRetryRequest to wait behind.
        let answered = [0u8; 64];
        splice::tests::arrive_with_end(&upstream, &server, &answered).await;
        let before = splice::tests::segments_in(&client);
        let (moved, config, activity) = (Moved::default(), RelayConfig::default(), Activity::new());
        let left = answer_alone(&mut accepted, &mut server, &moved, &activity)
            .await
            .expect("answer");
        assert_eq!(
            left,
            Answered::Carry {
                upstream_ended: true
            }
        );
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the answer and the end, without carrying")
            .expect("receive");
        assert_eq!(got, answered);
        assert_eq!(
            splice::tests::segments_in(&client) - before,
            1,
            "the answer and the FIN in one segment"
        );
        let ((), carried) = tokio::join!(
            async { client.shutdown().await.expect("half-close") },
            carry(&accepted, &server, &moved, &config, &activity, true)
        );
        carried.expect("carry");
        assert_eq!(moved.down.into_inner(), answered.len() as u64);
    }

    /// An upstream that answers the hello and resets the connection: the answer still reaches
    /// the client, and the reset is the connection's error.
    #[tokio::test]
    async fn an_answer_before_a_reset_still_reaches_the_client() {
        use tokio::io::AsyncReadExt as _;
        let (mut server, upstream) = splice::tests::pair(None).await;
        let (mut client, mut accepted) = splice::tests::pair(None).await;
        let answered = [0u8; 64];
        splice::tests::arrive_with_reset(upstream, &server, &answered).await;
        let (moved, activity) = (Moved::default(), Activity::new());
        let failed = answer_alone(&mut accepted, &mut server, &moved, &activity)
            .await
            .expect_err("the reset");
        assert_eq!(failed.kind(), io::ErrorKind::ConnectionReset);
        drop(accepted);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("receive");
        assert_eq!(got, answered);
        assert_eq!(moved.down.into_inner(), answered.len() as u64);
    }

    /// What the listeners set, their accepted connections have, in the real kernel: no delay,
    /// and the congestion control for the loopback hop (whatever the host's default is).
    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_loopback_settings() {
        use nix::sys::socket::{getsockopt, sockopt};
        for listener in bind(0, 2).expect("bind").into_iter().flatten() {
            let addr = listener.local_addr().expect("address");
            let listener = register(listener).expect("register");
            let (client, accepted) = tokio::join!(TcpStream::connect(addr), accept(&listener));
            let (accepted, _) = accepted.expect("accept");
            assert!(accepted.nodelay().expect("TCP_NODELAY"));
            assert_eq!(
                getsockopt(&accepted, sockopt::TcpCongestion).expect("TCP_CONGESTION"),
                "reno"
            );
            drop(client);
        }
    }

    /// The acceptor takes every connection that waits without another wake-up, and once none
    /// waits it waits for the next wake-up instead of calling accept() again; the next
    /// connection wakes it.
    #[tokio::test]
    async fn the_acceptor_takes_what_waits_then_waits_for_the_next_arrival() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let listener = register(listener).expect("register");
        let take = || async {
            let (stream, peer) = tokio::time::timeout(Duration::from_secs(5), accept(&listener))
                .await
                .expect("a waiting connection taken")
                .expect("accept");
            assert_eq!(stream.peer_addr().expect("peer"), peer);
            peer
        };
        // On loopback connect() returns with the handshake done: both wait in the queue, and
        // the listener's readiness comes as one event.
        let clients: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut peers = vec![take().await, take().await];
        peers.sort();
        let mut expected: Vec<_> = clients
            .iter()
            .map(|c| c.local_addr().expect("address"))
            .collect();
        expected.sort();
        assert_eq!(peers, expected);
        assert!(
            tokio::time::timeout(Duration::ZERO, listener.readable())
                .await
                .is_err(),
            "readiness kept with nothing to accept"
        );
        let late = std::net::TcpStream::connect(addr).expect("connect");
        assert_eq!(take().await, late.local_addr().expect("address"));
    }

    #[test]
    fn workers_are_bound_only_one_to_each_cpu_from_the_first() {
        let set = |cpus: &[usize]| {
            let mut set = nix::sched::CpuSet::new();
            for &cpu in cpus {
                set.set(cpu).expect("cpu");
            }
            set
        };
        assert!(binds(&set(&[0, 1]), 2));
        assert!(binds(&set(&[0]), 1));
        // Fewer workers than CPUs (a quota, or `--relay-workers`): the kernel's choice of
        // worker by CPU would not land on the CPU's own.
        assert!(!binds(&set(&[0, 1]), 1));
        assert!(!binds(&set(&[0, 1, 2, 3]), 2));
        // CPUs the agent may not run on (a cpuset): worker `i` cannot be on CPU `i`.
        assert!(!binds(&set(&[2, 3]), 2));
        assert!(!binds(&set(&[0, 2]), 2));
    }

    #[tokio::test]
    async fn each_worker_runs_on_its_own_cpu_when_there_is_one_for_each() {
        use nix::{sched::sched_getaffinity, unistd::Pid};
        let allowed = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
        let cpus = cpus_in(&allowed).len();
        let on = |n: usize| async move {
            let (workers, handles) = Workers::start(n).expect("workers");
            let mut sets = Vec::new();
            for handle in &handles {
                let set = handle
                    .spawn(async { sched_getaffinity(Pid::from_raw(0)).expect("affinity") })
                    .await
                    .expect("worker");
                sets.push(set);
            }
            workers.stop().await;
            sets
        };
        for (i, set) in on(cpus).await.iter().enumerate() {
            if binds(&allowed, cpus) {
                assert_eq!(cpus_in(set), [i], "worker {i}");
            } else {
                assert_eq!(*set, allowed, "worker {i} floats");
            }
        }
        if cpus > 1 {
            for set in on(cpus - 1).await {
                assert_eq!(set, allowed, "fewer workers than CPUs float");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_keeps_a_timer_while_it_serves_and_none_once_idle() {
        // The test's runtime runs on this thread, as a worker's does.
        keep_wheel();
        assert_eq!(WHEEL.get(), (true, true));
        sleep(WHEEL_KEPT / 2).await;
        keep_wheel();
        sleep(WHEEL_KEPT).await;
        assert_eq!(WHEEL.get(), (true, false), "served in the last period");
        sleep(WHEEL_KEPT).await;
        assert_eq!(WHEEL.get(), (false, false), "ended after a quiet period");
        keep_wheel();
        assert_eq!(WHEEL.get(), (true, true), "started again by a connection");
    }
}
