//! The relay in the workloads' network namespaces. A steered connect goes to loopback, and
//! loopback is the client's own namespace's: a workload in a namespace of its own (a container, a
//! pod) reaches the relay only if the relay listens there too. So the relay keeps listeners in
//! every namespace a process of the enforced cgroup is in (found by scanning the cgroup), tells
//! the kernel each one's ports (`RELAY_NETNS_MAP`, by namespace cookie), and makes each relayed
//! connection's upstream socket in the client's namespace, so it leaves as the client's own would
//! have: by that namespace's routes and interfaces, from its addresses. Serving a namespace also
//! puts the agent's TC program for packet sockets on its interfaces. A namespace the relay does
//! not serve yet (a process that has just entered it) has its steered connects held in the
//! kernel and the relay asked to serve it at once (`RELAY_WANTED_MAP`); the scan finds it too.
use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::TcpListener,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use egress_common::{RelayPorts, RelayWanted};
use nix::sched::{CloneFlags, setns};

/// The kernel's map of the namespaces the relay listens in: netns cookie → the workers' ports.
pub type NetnsMap = BpfHashMap<MapData, u64, RelayPorts>;

/// The kernel's side of the namespaces the relay serves.
pub struct NetnsMaps {
    pub served: NetnsMap,
    /// Namespaces steered connects wait in ([`RelayWanted`]).
    pub wanted: RingBuf<MapData>,
}

/// The namespace file of the thread a [`RelayWanted`] names, from the ring's bytes.
pub(super) fn wanted_path(item: &[u8]) -> Option<PathBuf> {
    if item.len() < size_of::<RelayWanted>() {
        return None;
    }
    // SAFETY: the programs write whole RelayWanteds; read unaligned from the ring's bytes.
    let wanted: RelayWanted = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    Some(PathBuf::from(format!(
        "/proc/{}/task/{}/ns/net",
        wanted.pid, wanted.tid
    )))
}

/// A network namespace the relay serves.
#[derive(Debug)]
pub struct Netns {
    /// The kernel's cookie for it (SO_NETNS_COOKIE).
    pub cookie: u64,
    /// The namespace, held open to make sockets in it; `None` for the agent's own.
    fd: Option<OwnedFd>,
}

impl Netns {
    /// The agent's own namespace, whose cookie a socket made there gives.
    pub(super) fn home(socket: BorrowedFd) -> io::Result<Netns> {
        Ok(Netns {
            cookie: cookie(socket)?,
            fd: None,
        })
    }

    /// Runs `make` (which makes sockets) in this namespace.
    pub(super) fn within<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.fd {
            None => make(),
            Some(fd) => within(fd.as_fd(), make),
        }
    }
}

/// The namespace the agent's threads live in, to return to.
fn home_fd() -> io::Result<BorrowedFd<'static>> {
    static HOME: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOME.get() {
        return Ok(fd.as_fd());
    }
    // The thread's, not the process's: they are the same until a thread moves, and none stays
    // moved.
    let fd = OwnedFd::from(fs::File::open("/proc/thread-self/ns/net")?);
    Ok(HOME.get_or_init(|| fd).as_fd())
}

/// Runs `make` with this thread in namespace `ns`, then moves it back. Sockets keep the
/// namespace they were made in. Nothing in between yields, so no other task runs on the thread
/// while it is away.
fn within<T>(ns: BorrowedFd, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = home_fd()?;
    setns(ns, CloneFlags::CLONE_NEWNET)?;
    let made = make();
    if let Err(e) = setns(home, CloneFlags::CLONE_NEWNET) {
        // The thread would go on making every later socket in a workload's namespace.
        log::error!("relay: cannot return to the agent's network namespace: {e}");
        std::process::abort();
    }
    made
}

/// The kernel's cookie for the calling thread's network namespace.
pub fn own_cookie() -> io::Result<u64> {
    // Any socket tells.
    let probe = crate::datapath::iface::query_socket()?;
    cookie(probe.as_fd())
}

/// The kernel's cookie for the namespace of `socket`.
fn cookie(socket: BorrowedFd) -> io::Result<u64> {
    let mut value = 0u64;
    // SAFETY: the cookie options take a u64, which any bytes are.
    unsafe { get_option(socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, &mut value) }?;
    Ok(value)
}

/// Reads a socket option nix has no type for into `value`.
///
/// # Safety
/// `T` must be the option's type, and valid whatever bytes the kernel writes (plain integers).
pub(super) unsafe fn get_option<T>(
    socket: BorrowedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &mut T,
) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: a valid socket, and an out-value of `len` bytes of the option's type (the caller's
    // promise).
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(value).cast(),
            &raw mut len,
        )
    };
    if got == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The inode of a namespace file (`/proc/PID/ns/net`, or an open one): its identity.
pub(super) fn inode(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The namespaces the processes of cgroup `dir` and its descendants are in, each with the
/// namespace file of one process in it.
fn namespaces_in(dir: &Path) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        // A cgroup removed meanwhile has no processes left to find.
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.parse::<u32>().ok()) {
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(ino) = inode(&path) {
                    found.entry(ino).or_insert(path);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

/// Listeners the relay holds in one namespace: a set for each worker.
pub(super) struct Served {
    pub netns: Arc<Netns>,
    pub listeners: Vec<Vec<TcpListener>>,
}

/// Opens namespace `ino` through a process's namespace file `path` (checking the process did not
/// move meanwhile) and makes the relay's listeners in it (`listen`), the first on `port` if free
/// there, else on one the kernel picks.
pub(super) fn serve(
    ino: u64,
    path: &Path,
    port: u16,
    listen: impl Fn(u16) -> io::Result<Vec<Vec<TcpListener>>>,
) -> io::Result<Served> {
    let file = fs::File::open(path)?;
    if file.metadata()?.ino() != ino {
        return Err(io::Error::other("the process moved to another namespace"));
    }
    let fd = OwnedFd::from(file);
    let listeners = within(fd.as_fd(), || match listen(port) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && port != 0 => listen(0),
        made => made,
    })?;
    let first = listeners
        .first()
        .and_then(|set| set.first())
        .ok_or_else(|| io::Error::other("no listener"))?;
    let cookie = cookie(first.as_fd())?;
    Ok(Served {
        netns: Arc::new(Netns {
            cookie,
            fd: Some(fd),
        }),
        listeners,
    })
}

/// What a scan changes: the namespaces to serve (inode, a process's namespace file) and the ones
/// no process of the cgroup is in any more; and of the hinting threads, those still in the
/// namespace they hinted.
pub(super) struct Scan {
    pub new: Vec<(u64, PathBuf)>,
    pub gone: Vec<u64>,
    pub hinted: HashMap<u64, HashSet<PathBuf>>,
}

/// Compares the cgroup's namespaces with the ones served (`served`), the agent's own (`home`)
/// aside. The processes' namespaces are their main threads'; a namespace served on the hint of
/// a thread (`hinted`: its namespace file, by namespace) stays served while that thread is in it.
pub(super) fn scan(
    cgroup: &Path,
    home: u64,
    served: &HashSet<u64>,
    hinted: HashMap<u64, HashSet<PathBuf>>,
) -> Scan {
    let mut found = namespaces_in(cgroup);
    found.remove(&home);
    let hinted: HashMap<u64, HashSet<PathBuf>> = hinted
        .into_iter()
        .filter_map(|(ino, mut threads)| {
            threads.retain(|path| inode(path).is_ok_and(|now| now == ino));
            (!threads.is_empty()).then_some((ino, threads))
        })
        .collect();
    let gone = served
        .iter()
        .filter(|ino| !found.contains_key(ino) && !hinted.contains_key(ino))
        .copied()
        .collect();
    let new = found
        .into_iter()
        .filter(|(ino, _)| !served.contains(ino))
        .collect();
    Scan { new, gone, hinted }
}
