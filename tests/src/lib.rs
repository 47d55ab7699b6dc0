//! Fixtures for the root-only tests: a simulated outside world in a network namespace (reached
//! over a veth pair, with its own IPv4 and IPv6 ULA addresses, a real DNS server and TCP/UDP
//! servers), test cgroups, and a client run inside them. Everything is removed on drop.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use egress_agent::{agent::AgentConfig, datapath::cgroup, events::Record, policy::Mode};

pub mod tls;

static NEXT: AtomicU32 = AtomicU32::new(1);
/// World 0 (198.18.0.0/24) is the demo's; tests take 1 and up.
static NEXT_WORLD: AtomicU32 = AtomicU32::new(1);

/// Panics unless running as root: these tests load programs and make namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests need root (run `sudo -E cargo xtask test`)"
    );
}

/// Removes, once per process before its first world or cgroup, what test processes that died
/// without cleaning up (killed, say) left behind. A world left behind keeps its addresses on the
/// host, where they collide with the next process's world of the same number.
fn sweep_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| sweep_leftovers_of(|pid| pid == std::process::id() || !alive(pid)));
}

/// Whether process `pid` runs: a zombie (killed, its parent not yet told) has left its worlds
/// and cgroups behind as a dead one has.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state …": comm may hold spaces and parentheses, the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// World `index` of process `pid`: its network namespace and the host end of its veth (which
/// keeps only part of the pid: interface names are short).
fn world_names(pid: u32, index: u32) -> (String, String) {
    (
        format!("egress-w{pid}-{index}"),
        format!("egh{}x{index}", pid % 100_000),
    )
}

/// The process id in a name `PREFIX<pid>-…`.
fn owner(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Removes the worlds (their processes, veths and namespaces), cgroups and pinned links that
/// processes for which `gone(pid)` holds made.
fn sweep_leftovers_of(gone: impl Fn(u32) -> bool) {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in names(Path::new("/run/netns")) {
        let Some(pid) = owner(&name, "egress-w").filter(|&p| gone(p)) else {
            continue;
        };
        let out = Command::new("ip")
            .args(["netns", "pids", &name])
            .output()
            .expect("ip netns pids");
        for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = p.parse() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // The host end, named as `World` names it, if its peer is in this namespace: the name
        // keeps only part of the pid, so a live world may have it.
        if let Some(index) = name.rsplit('-').next().and_then(|i| i.parse().ok()) {
            let (_, veth) = world_names(pid, index);
            let link = Command::new("ip")
                .args(["-o", "link", "show", "dev", &veth])
                .output()
                .expect("ip link show");
            let text = String::from_utf8_lossy(&link.stdout);
            let words: Vec<&str> = text.split_whitespace().collect();
            if words.windows(2).any(|w| w == ["link-netns", name.as_str()]) {
                let _ = Command::new("ip").args(["link", "del", &veth]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = fs::remove_dir_all(std::env::temp_dir().join(&name));
    }
    if let Ok(mount) = cgroup::cgroup2_mount() {
        for name in names(&mount) {
            if owner(&name, "egress-test-").is_some_and(&gone)
                && let Err(e) = cgroup::kill_and_remove(&mount.join(&name))
            {
                eprintln!("removing a test cgroup left behind: {e}");
            }
        }
    }
    let pins = Path::new("/sys/fs/bpf/egress");
    for name in names(pins) {
        if owner(&name, "egress-test-").is_some_and(&gone) {
            let _ = fs::remove_dir_all(pins.join(&name));
        }
    }
}

/// Polls `cond` until it holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace standing for the outside world: `198.18.N.0/24` and `fd00:e9e5:N::/64`
/// (N in hex there), the host side `.1`/`::1`, the world `.2`/`::2` (its DNS server) and whatever
/// [`World::host`] adds. These addresses exist only inside the namespace the test made.
pub struct World {
    pub name: String,
    pub index: u32,
    veth_host: String,
    veth_world: String,
    dns: Option<Child>,
    dir: PathBuf,
}

impl World {
    pub fn new() -> World {
        let index = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        assert!(index < 250, "too many worlds in one test process");
        World::with_index(index)
    }

    /// World number `index` (0 is the demo's, whose addresses the shipped policies use).
    pub fn with_index(index: u32) -> World {
        require_root();
        sweep_leftovers();
        let (name, veth_host) = world_names(std::process::id(), index);
        let veth_world = format!("egw{}x{index}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("world temp dir");
        sh(&["ip", "netns", "add", &name]);
        let w = World {
            name,
            index,
            veth_host,
            veth_world,
            dns: None,
            dir,
        };
        sh(&[
            "ip",
            "link",
            "add",
            &w.veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &w.veth_world,
        ]);
        sh(&["ip", "link", "set", &w.veth_world, "netns", &w.name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{index}.1/24"),
            "dev",
            &w.veth_host,
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            // Hexadecimal, as `v6` builds the world's addresses.
            &format!("fd00:e9e5:{index:x}::1/64"),
            "dev",
            &w.veth_host,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &w.veth_host, "up"]);
        w.exec(&["ip", "link", "set", "lo", "up"]);
        w.exec(&["ip", "link", "set", &w.veth_world, "up"]);
        w.host(2);
        w
    }

    /// The host side of the world's veth: where traffic to the world leaves (the TC programs'
    /// interface in tests).
    pub fn iface(&self) -> &str {
        &self.veth_host
    }

    /// Lets TCP over the veth send and receive packets of up to `size` bytes (BIG TCP: larger than
    /// an IP header's length field can say), IPv4 and IPv6, both ways. For connections made
    /// afterwards.
    pub fn big_tcp(&self, size: u32) {
        let text = size.to_string();
        let set = ["gso_max_size", &text, "gro_max_size", &text];
        sh(&[&["ip", "link", "set", "dev", &self.veth_host][..], &set].concat());
        self.exec(&[&["ip", "link", "set", "dev", &self.veth_world][..], &set].concat());
        // IPv4's own limits (kernel 6.3): Debian's iproute2 6.1 cannot set them.
        let v4 = [
            (IFLA_GSO_IPV4_MAX_SIZE, size),
            (IFLA_GRO_IPV4_MAX_SIZE, size),
        ];
        set_link_u32(&self.veth_host, &v4);
        let world = self.veth_world.clone();
        in_netns(format!("/run/netns/{}", self.name), move || {
            set_link_u32(&world, &v4)
        });
    }

    /// Runs a command inside the world.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Drops every `every`-th data-carrying TCP packet to and from `port` at netfilter input, on
    /// each side of the veth: an outgoing one after the host's programs saw it leave, so the
    /// sender has to retransmit it.
    /// Undone when the guard is dropped.
    pub fn lossy(&self, port: u16, every: u32) -> Lossy {
        let table = format!("egress_lossy_{}", self.veth_host);
        // Only segments that carry data (a lost ACK proves nothing), and not the first ones: a
        // lost SYN costs a second.
        let rule = |dir: &str| {
            format!(
                "tcp {dir} {port} meta length > 1000 numgen inc mod {every} {} counter drop",
                every / 2
            )
        };
        // Into the world: segments the host sent. Into the host, from this world only: replies.
        nft_input(&["ip", "netns", "exec", &self.name], &table, &rule("dport"));
        nft_input(
            &[],
            &table,
            &format!("iifname {} {}", self.veth_host, rule("sport")),
        );
        Lossy {
            netns: self.name.clone(),
            table,
        }
    }

    /// Drops the SYNs that reach `to` in the world at netfilter input: all of them, or with
    /// `first_only` the first one (TCP sends it again a second later). Undone when the guard is
    /// dropped.
    pub fn syn_drops(&self, to: SocketAddr, first_only: bool) -> Lossy {
        let table = format!("egress_syns_{}", self.veth_host);
        let family = if to.is_ipv4() { "ip" } else { "ip6" };
        let first = if first_only {
            " numgen inc mod 2 0"
        } else {
            ""
        };
        let rule = format!(
            "{family} daddr {} tcp dport {} tcp flags & (syn | ack) == syn{first} counter drop",
            to.ip(),
            to.port()
        );
        nft_input(&["ip", "netns", "exec", &self.name], &table, &rule);
        Lossy {
            netns: self.name.clone(),
            table,
        }
    }

    pub fn v4(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.index as u8, host))
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0xe9e5,
            self.index as u16,
            0,
            0,
            0,
            0,
            host as u16,
        ))
    }

    /// Adds host number `host` (both families) to the world.
    pub fn host(&self, host: u8) {
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.v4(host)),
            "dev",
            &self.veth_world,
        ]);
        self.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.v6(host)),
            "dev",
            &self.veth_world,
            "nodad",
        ]);
    }

    /// Runs `f` on a thread that lives in the world's network namespace, so the sockets it makes
    /// belong there.
    fn in_world<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(format!("/run/netns/{}", self.name), f)
    }

    /// An agent's configuration for this world: `policy` (YAML) in a fresh directory, `mode`,
    /// the world's resolver and interface, enforcing on `cg`, the flow log at `log` if given.
    pub fn agent_config(
        &self,
        policy: &str,
        mode: Mode,
        cg: &TestCgroup,
        log: Option<&Path>,
    ) -> AgentConfig {
        AgentConfig {
            policies: vec![policy_dir(policy)],
            mode: Some(mode),
            dns: Some(self.dns_addr()),
            cgroup: cg.path.clone(),
            ifaces: Some(vec![self.iface().to_owned()]),
            events: log.map(Path::to_owned),
            ..AgentConfig::default()
        }
    }

    /// A TCP listener bound at `addr` in the world, for servers of the caller's own.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.in_world(move || TcpListener::bind(addr).expect("bind in world"))
    }

    /// A server at `addr` in the world that reads one TLS record (a ClientHello) and sends it
    /// back, then every byte that follows it until the client half-closes, then closes its side:
    /// what a
    /// relay does with either direction and with each end's half-close shows, byte for byte.
    /// Returns, for each connection in the order accepted, whether its first bytes had arrived
    /// when accept() returned it.
    pub fn hello_echo(&self, addr: SocketAddr) -> Arc<Mutex<Vec<bool>>> {
        let l = self.listen(addr);
        let early = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&early);
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                // The kernel hands a connection to accept() only once the segment that completed
                // its handshake is processed: bytes that came with it are there already.
                let waiting = s.set_nonblocking(true).is_ok() && s.peek(&mut [0u8; 1]).is_ok();
                let _ = s.set_nonblocking(false);
                seen.lock().expect("arrivals").push(waiting);
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut head = [0u8; 5];
                    s.read_exact(&mut head)?;
                    let len = u16::from_be_bytes([head[3], head[4]]);
                    // The hello is answered before anything else is read, as a TLS server
                    // answers one: with itself.
                    s.write_all(&head)?;
                    std::io::copy(&mut (&s).take(u64::from(len)), &mut &s)?;
                    std::io::copy(&mut &s, &mut &s)?;
                    s.shutdown(std::net::Shutdown::Write)
                });
            }
        });
        early
    }

    /// A TCP server at `addr` in the world that greets every connection with "hello".
    pub fn tcp_server(&self, addr: SocketAddr) {
        let l = self.listen(addr);
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(b"hello\n");
            }
        });
    }

    /// A TCP server at `addr` in the world that reads to the end of what it is sent, then sends
    /// as many bytes back and closes.
    pub fn tcp_sink_reply(&self, addr: SocketAddr) {
        let l = self.listen(addr);
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    if s.read_to_end(&mut got).is_ok() {
                        let _ = s.write_all(&got);
                    }
                });
            }
        });
    }

    /// A UDP echo server at `addr` in the world.
    pub fn udp_echo(&self, addr: SocketAddr) {
        let s = self.in_world(move || UdpSocket::bind(addr).expect("bind udp in world"));
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        });
    }

    /// The world's DNS server address.
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::new(self.v4(2), 53)
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// Starts (or restarts) dnsmasq answering `records` (name, address) with the given TTL.
    pub fn start_dns(&mut self, records: &[(&str, IpAddr)], ttl: u32) {
        self.stop_dns();
        self.set_records(records);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--group=root",
                "--pid-file",
            ])
            .arg(format!("--addn-hosts={}", self.hosts_file().display()))
            .arg(format!("--listen-address={},{}", self.v4(2), self.v6(2)))
            .arg(format!("--local-ttl={ttl}"))
            .arg("--port=53")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base; `cargo xtask setup` installs it)");
        self.dns = Some(child);
        let addr = self.dns_addr();
        wait_for("dnsmasq to listen", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
    }

    /// Replaces the DNS records and makes dnsmasq re-read them.
    pub fn set_records(&self, records: &[(&str, IpAddr)]) {
        let text: String = records
            .iter()
            .map(|(n, ip)| format!("{ip} {n}\n"))
            .collect();
        fs::write(self.hosts_file(), text).expect("write hosts");
        if let Some(c) = &self.dns {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .expect("SIGHUP dnsmasq");
        }
    }

    pub fn stop_dns(&mut self) {
        if let Some(mut c) = self.dns.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A workload's own network namespace beside a [`World`] (a container's, a pod's): linked to the
/// world by a veth pair, its default routes through it. Its addresses are `100.64.N.2` and
/// `fd00:e9e6:N::2` (N the world's index, in hex there), the world's end `.1`/`::1`.
pub struct Pod {
    pub name: String,
    index: u32,
}

impl Pod {
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(100, 64, self.index as u8, 2))
    }

    pub fn v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0xe9e6,
            self.index as u16,
            0,
            0,
            0,
            0,
            2,
        ))
    }

    /// The namespace's file, for setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Its end of the veth pair to the world.
    pub fn iface(&self) -> String {
        format!("egp{}x{}", std::process::id() % 100_000, self.index)
    }

    /// A process of `cgroup` that stays in this namespace (a pod's long-lived process) until it
    /// leaves.
    pub fn workload(&self, cgroup: &TestCgroup) -> Workload {
        let child = self
            .command(Some(cgroup), "sleep")
            .arg("60")
            .spawn()
            .expect("run sleep");
        Workload(child)
    }

    /// Runs `args` (a command and its arguments) in this namespace; panics unless it succeeds.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// The names of the programs attached to `iface` of this namespace as TCX egress links.
    pub fn tcx_egress(&self, iface: &str) -> Vec<String> {
        let iface = iface.to_owned();
        in_netns(self.path(), move || {
            let (_, programs) = aya::programs::SchedClassifier::query_tcx(
                &iface,
                aya::programs::TcAttachType::Egress,
            )
            .expect("query the TCX programs");
            programs
                .iter()
                .filter_map(|p| p.name_as_str().map(str::to_owned))
                .collect()
        })
    }

    /// A listener on `addr` in this namespace, made by the test itself (no workload).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        in_netns(self.path(), move || {
            let l = TcpListener::bind(addr).expect("bind in pod");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
    }

    /// `program` set up to run in this namespace, inside `cgroup` if given.
    pub fn command(&self, cgroup: Option<&TestCgroup>, program: impl AsRef<Path>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program.as_ref())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cg) = cgroup {
            join_cgroup(&mut cmd, &cg.path);
        }
        cmd
    }
}

/// A process held in a [`Pod`]; it ends when it leaves or is dropped.
pub struct Workload(Child);

impl Workload {
    /// Ends the process and waits for it: no process of its cgroup is left in the namespace.
    pub fn leave(mut self) {
        self.0.kill().expect("kill sleep");
        self.0.wait().expect("wait for sleep");
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread that lives in network namespace `path`, so the sockets it makes belong
/// there.
/// linux/if_link.h, not in the libc crate for Linux.
const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;

/// Sets u32 attributes of link `iface` in the calling thread's namespace (an RTM_NEWLINK request
/// by rtnetlink), and checks the kernel's answer.
fn set_link_u32(iface: &str, attrs: &[(u16, u32)]) {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    let index = nix::net::if_::if_nametoindex(iface).expect("interface index");
    let len = 16 + 16 + 8 * attrs.len();
    let mut msg = Vec::with_capacity(len);
    // nlmsghdr: length, type, flags, sequence, port.
    msg.extend((len as u32).to_ne_bytes());
    msg.extend(libc::RTM_NEWLINK.to_ne_bytes());
    msg.extend(((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    // ifinfomsg: family, padding, type, index, flags, change.
    msg.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend((index as i32).to_ne_bytes());
    msg.extend([0u8; 8]);
    for &(kind, value) in attrs {
        msg.extend(8u16.to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(value.to_ne_bytes());
    }
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .expect("rtnetlink socket");
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .expect("send to rtnetlink");
    let mut answer = [0u8; 1024];
    let n = recv(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &mut answer,
        MsgFlags::empty(),
    )
    .expect("rtnetlink's answer");
    // An NLMSG_ERROR whose error is 0 acknowledges the request.
    assert!(n >= 20, "short rtnetlink answer");
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    let error = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
    assert!(
        kind == libc::NLMSG_ERROR as u16 && error == 0,
        "setting {attrs:?} on {iface}: {}",
        std::io::Error::from_raw_os_error(-error)
    );
}

fn in_netns<T: Send + 'static>(path: String, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = fs::File::open(&path).expect("open netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl World {
    /// A workload namespace linked to this world (one per world).
    pub fn pod(&self) -> Pod {
        let pod = Pod {
            name: format!("egress-p{}-{}", std::process::id(), self.index),
            index: self.index,
        };
        let (in_pod, in_world) = (
            pod.iface(),
            format!("egq{}x{}", std::process::id() % 100_000, self.index),
        );
        let i = self.index;
        sh(&["ip", "netns", "add", &pod.name]);
        let pod_ip = |args: &[&str]| {
            let mut full = vec!["ip"];
            full.extend_from_slice(args);
            pod.exec(&full);
        };
        pod_ip(&[
            "link", "add", &in_pod, "type", "veth", "peer", "name", &in_world,
        ]);
        pod_ip(&["link", "set", &in_world, "netns", &self.name]);
        for (ip, dev) in [
            (format!("100.64.{i}.2/24"), in_pod.as_str()),
            (format!("fd00:e9e6:{i:x}::2/64"), in_pod.as_str()),
        ] {
            pod_ip(&["addr", "add", &ip, "dev", dev, "nodad"]);
        }
        for link in ["lo", in_pod.as_str()] {
            pod_ip(&["link", "set", link, "up"]);
        }
        pod_ip(&["route", "add", "default", "via", &format!("100.64.{i}.1")]);
        pod_ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:e9e6:{i:x}::1"),
        ]);
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("100.64.{i}.1/24"),
            "dev",
            &in_world,
        ]);
        self.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("fd00:e9e6:{i:x}::1/64"),
            "dev",
            &in_world,
            "nodad",
        ]);
        self.exec(&["ip", "link", "set", &in_world, "up"]);
        pod
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_dns();
        // Deleting the host end removes the pair, even while world sockets keep the netns alive.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth_host])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Adds `rule` to an input chain of nftables table `table`, made if need be, running the `nft`
/// commands after `prefix` (in a network namespace: `ip netns exec NAME`).
fn nft_input(prefix: &[&str], table: &str, rule: &str) {
    let nft = |args: &[&str]| sh(&[prefix, &["nft"], args].concat());
    nft(&["add", "table", "inet", table]);
    nft(&[
        "add",
        "chain",
        "inet",
        table,
        "input",
        "{ type filter hook input priority 0; }",
    ]);
    let mut add = vec!["add", "rule", "inet", table, "input"];
    add.extend(rule.split(' '));
    nft(&add);
}

/// Loss injected by [`World::lossy`] or [`World::syn_drops`].
pub struct Lossy {
    netns: String,
    table: String,
}

impl Lossy {
    /// Segments dropped so far into the world and into the host.
    pub fn dropped(&self) -> (u64, u64) {
        let count = |prefix: &[&str]| {
            let mut cmd: Vec<&str> = prefix.to_vec();
            cmd.extend(["nft", "list", "table", "inet", &self.table]);
            let out = Command::new(cmd[0])
                .args(&cmd[1..])
                .output()
                .expect("nft list");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (count(&["ip", "netns", "exec", &self.netns]), count(&[]))
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "nft",
                "delete",
                "table",
                "inet",
            ])
            .arg(&self.table)
            .output();
    }
}

/// A child cgroup for one test, removed (with anything left in it) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        require_root();
        sweep_leftovers();
        let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = mount.join(format!("egress-test-{}-{n}-{tag}", std::process::id()));
        fs::create_dir(&path).expect("create test cgroup");
        TestCgroup { path }
    }

    /// `program` set up to run inside this cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        join_cgroup(&mut cmd, &self.path);
        cmd
    }

    /// Runs `egress-probe ARGS` inside this cgroup and returns its one-word answer.
    pub fn probe(&self, args: &[&str]) -> String {
        probe_in(Some(&self.path), args)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = cgroup::kill_and_remove(&self.path) {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}

/// Runs `egress-probe ARGS`, inside `cgroup` if given (only the child joins it).
pub fn probe_in(cgroup: Option<&Path>, args: &[&str]) -> String {
    probe_with_pid(cgroup, args).0
}

/// As [`probe_in`], also returning the probe's process id.
pub fn probe_with_pid(cgroup: Option<&Path>, args: &[&str]) -> (String, u32) {
    let child = spawn_probe(cgroup, args);
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for egress-probe");
    assert!(
        out.status.success(),
        "egress-probe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).trim().to_owned(), pid)
}

/// Starts `egress-probe ARGS` (inside `cgroup` if given) with its output piped.
pub fn spawn_probe(cgroup: Option<&Path>, args: &[&str]) -> Child {
    probe_command(cgroup, args)
        .spawn()
        .expect("run egress-probe")
}

/// How a port check closes its connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// close(): a FIN; the socket may linger in FIN_WAIT2.
    Fin,
    /// A reset: the socket is closed when close() returns.
    Reset,
}

/// `n` port checks of `dst` (connect, close as `close` says) from a process of `cgroup`; returns
/// the process id once it has made them all.
pub fn port_checks(cgroup: &Path, dst: &str, n: usize, close: Close) -> u32 {
    let n = n.to_string();
    let mut args = vec!["tcp-repeat", dst, &n];
    if close == Close::Reset {
        args.push("reset");
    }
    let checks = HeldProbe::start(Some(cgroup), &args, "done");
    let pid = checks.pid();
    checks.release();
    pid
}

/// An egress-probe in a holding mode (`tcp-hold`, `hello-hold`): it has said its word and keeps
/// what it opened until released.
pub struct HeldProbe {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl HeldProbe {
    /// Starts `egress-probe ARGS` (inside `cgroup` if given) and waits until it says `word`.
    pub fn start(cgroup: Option<&Path>, args: &[&str], word: &str) -> HeldProbe {
        Self::start_with(probe_command(cgroup, args), args, word)
    }

    /// As [`HeldProbe::start`], the probe running on CPU `cpu` alone.
    pub fn start_on_cpu(cpu: usize, cgroup: Option<&Path>, args: &[&str], word: &str) -> HeldProbe {
        let mut cmd = probe_command(cgroup, args);
        // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                Ok(())
            });
        }
        Self::start_with(cmd, args, word)
    }

    fn start_with(mut cmd: Command, args: &[&str], word: &str) -> HeldProbe {
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("run egress-probe");
        let mut out = BufReader::new(child.stdout.take().expect("probe stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read the probe");
        assert_eq!(line.trim(), word, "egress-probe {args:?}");
        HeldProbe { child, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tells the probe to close what it holds; asserts it ends saying `ok`.
    pub fn release(mut self) {
        writeln!(self.child.stdin.take().expect("probe stdin"), "close").expect("tell the probe");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read the probe");
        assert_eq!(line.trim(), "ok");
        assert!(self.child.wait().expect("probe ends").success());
    }
}

/// The relay's count of connections to `host` that ended with `outcome`, from its metrics.
pub fn relayed_count(
    status: &egress_agent::metrics::Status,
    outcome: &'static str,
    host: &str,
) -> u64 {
    status
        .relayed
        .get_or_create(&egress_agent::metrics::RelayLabels {
            outcome: Some(outcome.into()),
            host: Some(host.into()),
        })
        .get()
}

/// `egress-probe ARGS`, inside `cgroup` if given, with its output piped.
pub fn probe_command(cgroup: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(target_bin("egress-probe"));
    cmd.args(args);
    if let Some(cg) = cgroup {
        join_cgroup(&mut cmd, cg);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Where quantile `p` of `len` sorted samples lies: `(len - 1) * p`, rounded. The probe's figures
/// and the benchmark's own take it alike.
pub fn rank(len: usize, p: f64) -> usize {
    ((len - 1) as f64 * p).round() as usize
}

/// How long the tests wait for a log record to appear.
pub const LOG_WAIT: Duration = Duration::from_secs(10);

/// A fresh flow-log path for one test (its directory emptied).
pub fn log_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("egress-log-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir.join("flows.jsonl")
}

/// Every loaded agent's map named `name` (tests run side by side, each with an agent of its own).
pub fn agents_maps(name: &str) -> impl Iterator<Item = aya::maps::MapData> + '_ {
    // The kernel keeps a map's name to 15 bytes.
    let name = &name[..15];
    aya::maps::loaded_maps()
        .flatten()
        .filter(move |info| info.name_as_str() == Some(name))
        // A map of an agent that stopped meanwhile is gone.
        .filter_map(|info| aya::maps::MapData::from_id(info.id()).ok())
}

/// Every agent's kernel records for the relay.
fn relay_peers() -> impl Iterator<Item = (egress_common::RelayPeer, egress_common::Steered)> {
    agents_maps(egress_common::RELAY_PEERS_MAP).flat_map(|data| {
        let map = egress_agent::relay::Peers::try_from(aya::maps::Map::LruHashMap(data))
            .expect("the relay's records");
        map.iter().flatten().collect::<Vec<_>>()
    })
}

/// The client ports of the kernel's records for the relay from 127.0.0.1, with the pid of the
/// process that connected, in every agent's map (tests run side by side: another test's
/// connection may have taken a port again since).
pub fn relay_records() -> Vec<(u16, u32)> {
    let loopback = std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
    relay_peers()
        .filter(|(k, _)| k.addr == loopback)
        .map(|(k, v)| (u16::from_be(k.port_be), v.pid))
        .collect()
}

/// The relay's ports, a worker's each, in this process's network namespace, as the kernel has
/// them from the agent whose first worker listens on `relay_port` (tests run side by side).
pub fn relay_ports(relay_port: u16) -> Vec<u16> {
    let netns = egress_agent::relay::netns::own_cookie().expect("the namespace's cookie");
    for data in agents_maps(egress_common::RELAY_NETNS_MAP) {
        let map: aya::maps::HashMap<_, u64, egress_common::RelayPorts> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
                .expect("the relay's namespaces");
        if let Ok(ports) = map.get(&netns, 0)
            && ports.ports[0] == relay_port
        {
            return ports.ports[..usize::from(ports.count)].to_vec();
        }
    }
    panic!("no agent's relay listens on port {relay_port} here")
}

/// The open steered connections of process `pid` as the kernel filed them for the relay: their
/// client ports, and the relay ports they were pointed at.
pub fn relay_ports_of(pid: u32) -> Vec<(u16, u16)> {
    relay_peers()
        .filter(|(_, v)| v.pid == pid)
        .map(|(k, v)| (u16::from_be(k.port_be), v.relay_port))
        .collect()
}

/// Asserts that the kernel holds no relay record of these relay records' connections (by their
/// client ports, and their process where the record names it): none outlives what the relay did
/// with its connection.
pub fn assert_no_relay_record_left(relayed: &[&Record]) {
    let left: Vec<(u16, u32)> = relay_records()
        .into_iter()
        .filter(|&(port, pid)| {
            relayed
                .iter()
                .any(|r| r.src.is_some_and(|s| s.port() == port) && r.pid.is_none_or(|p| p == pid))
        })
        .collect();
    assert!(
        left.is_empty(),
        "records left behind, from ports and pids {left:?}"
    );
}

/// Every complete record in a flow log.
pub fn records(path: &Path) -> Vec<Record> {
    let text = fs::read_to_string(path).unwrap_or_default();
    // The agent may be writing the last line as we read: take complete lines only, as
    // `egress events --follow` does.
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect()
}

/// Polls the log until a record satisfies `pred`.
pub fn wait_record(path: &Path, what: &str, pred: impl Fn(&Record) -> bool) -> Record {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        if let Some(r) = records(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in {} within {LOG_WAIT:?}; the log has:\n{}",
            path.display(),
            fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ip:port`, IPv6 bracketed.
pub fn at(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// An address of a flow record as the log writes it (empty when it has none), to compare with
/// [`at`].
pub fn shown(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(String::new, |a| a.to_string())
}

/// Makes the child join `cgroup` before it runs its program (only the child joins it).
fn join_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: the closure only opens and writes a file before exec.
    unsafe {
        cmd.pre_exec(move || fs::write(&procs, "0"));
    }
}

/// A TCP listener on loopback that greets like the world's servers.
pub fn loopback_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind loopback");
    let a = l.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"hello\n");
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        }
    });
    a
}

/// Writes policy YAML into a fresh directory and returns it.
pub fn policy_dir(yaml: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("egress-policy-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("policy dir");
    fs::write(dir.join("policy.yaml"), yaml).expect("write policy");
    dir
}

/// Where the agents enforcing `cgroup` pin their links: its path under the cgroup2 mount and
/// its id (bpffs takes no dots or slashes in a name).
pub fn pin_dir(cgroup: &TestCgroup) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
    let rel = cgroup.path.strip_prefix(&mount).expect("under the mount");
    let ino = fs::metadata(&cgroup.path).expect("cgroup").ino();
    Path::new("/sys/fs/bpf/egress").join(format!(
        "{}@{ino}",
        rel.to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F")
            .replace('.', "%2E")
    ))
}

/// `cmd` (the `egress` binary, maybe set to run in a cgroup) made `egress run` enforcing
/// registry-only on `cgroup` with the policies in `policies`, this world's DNS and interface, and
/// its flow log at `log`.
pub fn egress_run_command(
    mut cmd: Command,
    world: &World,
    cgroup: &TestCgroup,
    policies: &Path,
    log: &Path,
) -> Command {
    cmd.args(["run", "--cgroup"])
        .arg(&cgroup.path)
        .arg("--policies")
        .arg(policies)
        .args(["--dns", &world.dns_addr().to_string()])
        .args(["--mode", "registry-only", "--iface", world.iface()])
        .arg("--events")
        .arg(log);
    cmd
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal the child");
}

/// An `egress run` a test started. Should the test fail first, it is told to end (resumed, if
/// the test had stopped it), and killed if it does not: no agent outlives its test.
pub struct EgressRun(Child);

impl std::ops::Deref for EgressRun {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for EgressRun {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for EgressRun {
    fn drop(&mut self) {
        use nix::sys::signal::Signal;
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        signal(&self.0, Signal::SIGCONT);
        signal(&self.0, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `egress run` as `cmd` (the binary, its arguments, maybe a cgroup to run in) and returns
/// once it says it is ready. Its log is discarded after that.
pub fn egress_run(mut cmd: Command) -> EgressRun {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start egress run");
    let stderr = child.stderr.take().expect("stderr");
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        match heard.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("ready:") => return EgressRun(child),
            Ok(line) => log.push(line),
            Err(e) => panic!("egress run did not become ready ({e}):\n{}", log.join("\n")),
        }
    }
}

/// A workspace binary built beside this test (`cargo xtask test` builds them first).
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/<name>
    let mut dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile dir");
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bins` (cargo xtask test does)",
        bin.display()
    );
    bin
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::Path,
        process::{Command, Stdio},
    };

    use egress_agent::datapath::cgroup;

    use super::{join_cgroup, sh, sweep_leftovers_of, world_names};

    /// A process that has exited but not been waited for (a zombie) counts as gone, a running one
    /// as alive, one that does not exist as gone.
    #[test]
    fn a_zombie_test_process_counts_as_gone() {
        let mut running = Command::new("sleep").arg("600").spawn().expect("sleep");
        assert!(super::alive(running.id()));
        let mut zombie = Command::new("true").spawn().expect("spawn");
        let pid = zombie.id();
        // Not waited for: it stays a zombie until it is.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} still counts as alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "a zombie");
        zombie.wait().expect("wait");
        assert!(!super::alive(pid));
        running.kill().expect("kill");
        running.wait().expect("wait");
    }

    /// A world, a cgroup and pins of a test process that died, each with a process in it, are
    /// removed; a world of a live process is not.
    #[test]
    fn what_a_dead_test_process_left_behind_is_swept_and_a_live_ones_world_stays() {
        super::require_root();
        let dead = {
            let mut c = Command::new("true").spawn().expect("spawn");
            let pid = c.id();
            c.wait().expect("wait");
            pid
        };
        // Quiet, so that none holds the harness's output open if the test fails.
        let quiet = |mut cmd: Command| {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd
        };
        let sleeper = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("600");
            quiet(cmd)
        };
        let mut live = sleeper().spawn().expect("sleep");
        // A veth pair whose other end is in namespace `netns`.
        let pair = |host: &str, netns: &str| {
            let peer = format!("{host}p");
            sh(&[
                "ip", "link", "add", host, "type", "veth", "peer", "name", &peer,
            ]);
            sh(&["ip", "link", "set", &peer, "netns", netns]);
        };
        let world = |pid: u32| {
            let (name, veth) = world_names(pid, 249);
            sh(&["ip", "netns", "add", &name]);
            pair(&veth, &name);
            (name, veth)
        };
        let (dead_world, dead_veth) = world(dead);
        let (live_world, live_veth) = world(live.id());
        // A dead world whose veth's name a live world's veth has (names keep part of the pid).
        let (bare, taken) = world_names(dead, 248);
        sh(&["ip", "netns", "add", &bare]);
        pair(&taken, &live_world);
        let mut in_world = Command::new("ip");
        in_world.args(["netns", "exec", &dead_world, "sleep", "600"]);
        let mut inside = quiet(in_world).spawn().expect("a process in the world");
        let mount = cgroup::cgroup2_mount().expect("cgroup2 mount");
        let cg = mount.join(format!("egress-test-{dead}-0-sweep"));
        fs::create_dir(&cg).expect("cgroup");
        let mut cmd = sleeper();
        join_cgroup(&mut cmd, &cg);
        let mut in_cg = cmd.spawn().expect("a process in the cgroup");
        let pins = Path::new("/sys/fs/bpf/egress").join(format!("egress-test-{dead}-0-sweep@1"));
        fs::create_dir_all(&pins).expect("pin dir");

        sweep_leftovers_of(|pid| !super::alive(pid));

        let exists = |p: &str| Path::new(p).exists();
        assert!(!exists(&format!("/run/netns/{dead_world}")), "dead world");
        assert!(!exists(&format!("/sys/class/net/{dead_veth}")), "its veth");
        assert!(
            !inside.wait().expect("wait").success(),
            "its process killed"
        );
        assert!(!cg.exists(), "the dead process's cgroup");
        assert!(!in_cg.wait().expect("wait").success(), "its process killed");
        assert!(!pins.exists(), "its pins");
        assert!(
            !exists(&format!("/run/netns/{bare}")),
            "the bare dead world"
        );
        let stayed = exists(&format!("/run/netns/{live_world}"))
            && exists(&format!("/sys/class/net/{live_veth}"))
            && exists(&format!("/sys/class/net/{taken}"));
        for del in [
            ["link", "del", &live_veth],
            ["link", "del", &taken],
            ["netns", "del", &live_world],
        ] {
            let _ = Command::new("ip").args(del).output();
        }
        let _ = live.kill();
        let _ = live.wait();
        assert!(stayed, "a live process's world stays");
    }
}
