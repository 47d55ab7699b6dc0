//! The programs' links pinned in bpffs, so that enforcement outlives the agent. Killed, crashed or
//! out of memory, it leaves its cgroup enforced by the policy last in force (steered connections
//! are refused, the relay being gone; events are lost, and counted) until an agent takes over or
//! one stops cleanly. Only a clean stop unpins.
//!
//! One directory per enforced cgroup, `/sys/fs/bpf/egress/<cgroup path>@<cgroup id>`, holding
//! each agent's links under its own prefix.
use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use nix::fcntl::{Flock, FlockArg};

use super::cgroup;

/// Where bpffs is mounted; the agent mounts it there if nothing is.
const BPFFS: &str = "/sys/fs/bpf";
const ROOT: &str = "egress";
/// `egress exec` names its cgroups so.
const EXEC_PREFIX: &str = "egress-exec-";
/// The names of the links in workloads' namespaces: the program's name (which starts so), the
/// namespace's inode and the interface's index, between dashes.
const NETNS_PREFIX: &str = "tc_netns_";

/// One agent's pins for one cgroup.
pub struct Pins {
    dir: PathBuf,
    /// This agent's prefix: its pid and start time, unique across restarts.
    me: String,
    /// By file name, without the prefix.
    pinned: std::collections::HashMap<String, PinnedLink>,
    /// The directory, locked while this agent enforces the cgroup: a second agent started on
    /// it is refused instead of taking it over. The kernel drops the lock with the process, so
    /// an agent that died leaves nothing to clear by hand.
    _lock: Flock<fs::File>,
}

/// Why the pin directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another agent holds the directory, its pid if this pid namespace sees it: it enforces
    /// the cgroup now.
    #[error(
        "it is enforced by a running egress agent{}; stop that one first",
        .0.map_or(String::new(), |pid| format!(" (pid {pid})"))
    )]
    Enforced(Option<u32>),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Pins {
    /// The pin directory of the cgroup at `cgroup` (under the cgroup2 `mount`) with id `id`,
    /// made (and bpffs mounted) if need be. Clears the directories of cgroups that are gone.
    /// Refused while another agent enforces the cgroup ([`OpenError::Enforced`]).
    pub fn open(mount: &Path, cgroup: &Path, id: u64) -> Result<Pins, OpenError> {
        let root = Path::new(BPFFS).join(ROOT);
        mount_bpffs()?;
        fs::create_dir_all(&root)?;
        sweep(&root, mount);
        let rel = cgroup.strip_prefix(mount).map_err(io::Error::other)?;
        let dir = root.join(format!("{}@{id}", escape(rel)));
        let lock = lock(&dir)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Pins {
            dir,
            me: format!("{}-{started}-", std::process::id()),
            pinned: std::collections::HashMap::new(),
            _lock: lock,
        })
    }

    /// Pins `link` as `name`.
    pub fn pin(&mut self, name: &str, link: FdLink) -> io::Result<()> {
        let pinned = link
            .pin(self.dir.join(format!("{}{name}", self.me)))
            .map_err(io::Error::other)?;
        self.pinned.insert(name.to_owned(), pinned);
        Ok(())
    }

    /// Unpins the link pinned as `name`: it detaches.
    pub fn unpin(&mut self, name: &str) {
        if let Some(pinned) = self.pinned.remove(name)
            && let Err(e) = pinned.unpin()
        {
            log::warn!("unpinning {name} in {}: {e}", self.dir.display());
        }
    }

    /// Pins `link` as `name`: for the link types aya does not hand over as an [`FdLink`] (see
    /// [`link_create`]).
    pub fn pin_fd(&mut self, name: &str, link: &OwnedFd) -> io::Result<()> {
        let path = self.dir.join(format!("{}{name}", self.me));
        obj_pin(link, &path)?;
        self.pinned.insert(
            name.to_owned(),
            PinnedLink::from_pin(&path).map_err(io::Error::other)?,
        );
        Ok(())
    }

    /// Detaches what an agent that did not stop cleanly left for this cgroup, but for its links
    /// in workloads' namespaces (see [`Pins::release_stale_in`]): called once this one enforces,
    /// so the cgroup is never left without programs. Returns how many links.
    pub fn release_stale(&self) -> usize {
        self.release_others(|name| netns_of(name).is_none())
    }

    /// Detaches what an agent that did not stop cleanly left in the workloads' namespace with
    /// inode `ino`: called once this one covers it. Returns how many links.
    pub fn release_stale_in(&self, ino: u64) -> usize {
        self.release_others(|name| netns_of(name) == Some(ino))
    }

    /// Unpins the other agents' links whose name (without their prefix) `pick` picks.
    fn release_others(&self, pick: impl Fn(&str) -> bool) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| other_agents(&e.file_name().to_string_lossy(), &self.me).is_some_and(&pick))
            .filter(|e| unpin(&e.path()))
            .count()
    }

    /// Unpins this agent's links (each detaches as its last reference goes), and whatever
    /// another left in namespaces this one did not cover, and removes the directory. The clean
    /// stop.
    pub fn release(mut self) {
        for pinned in std::mem::take(&mut self.pinned).into_values() {
            if let Err(e) = pinned.unpin() {
                log::warn!("unpinning a link in {}: {e}", self.dir.display());
            }
        }
        self.release_others(|_| true);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Makes the pin directory `dir` if need be and locks it. An agent that stops cleanly removes
/// its directory: one locked just as it went is made anew.
fn lock(dir: &Path) -> Result<Flock<fs::File>, OpenError> {
    loop {
        match fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        let file = match fs::File::open(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            opened => opened?,
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(OpenError::Enforced(holder(dir)));
            }
            Err((_, e)) => return Err(io::Error::from(e).into()),
        };
        let still_there =
            fs::metadata(dir).is_ok_and(|m| locked.metadata().is_ok_and(|l| l.ino() == m.ino()));
        if still_there {
            return Ok(locked);
        }
    }
}

/// The process holding a lock on `dir`, from /proc/locks, as this pid namespace numbers it:
/// `None` where it does not see it.
fn holder(dir: &Path) -> Option<u32> {
    let meta = fs::metadata(dir).ok()?;
    let dev = meta.dev();
    // As the kernel writes it: "MAJ:MIN:INODE", the device numbers in hex.
    let file = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    lock_holder(&fs::read_to_string("/proc/locks").ok()?, &file)
}

/// The pid holding a FLOCK lock on `file` by `locks` (the text of /proc/locks), where a line
/// is "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...", and "N: -> ..." one waiting for it.
fn lock_holder(locks: &str, file: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip(1);
        if words.next()? != "FLOCK" {
            return None;
        }
        let (pid, at) = (words.nth(2)?, words.next()?);
        // 0: a process this pid namespace does not see.
        (at == file)
            .then(|| pid.parse().ok())
            .flatten()
            .filter(|&pid| pid != 0)
    })
}

/// The name of another agent's link pinned as `file` (without its prefix: its pid and start
/// time); `None` for this agent's (`me` is its prefix).
fn other_agents<'a>(file: &'a str, me: &str) -> Option<&'a str> {
    if file.starts_with(me) {
        return None;
    }
    file.splitn(3, '-').nth(2)
}

/// The namespace (inode) of a link named `name` in a workload's namespace, `None` for the others.
fn netns_of(name: &str) -> Option<u64> {
    name.strip_prefix(NETNS_PREFIX)?
        .split('-')
        .nth(1)?
        .parse()
        .ok()
}

/// Mounts bpffs where it belongs, unless it is there. One agent at a time, in this process or
/// another, where /run takes the lock file: a second mount would hide the first one's pins.
fn mount_bpffs() -> io::Result<()> {
    let _only = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/egress-bpffs.lock")
        .ok()
        .and_then(|f| Flock::lock(f, FlockArg::LockExclusive).ok());
    let mounted = nix::sys::statfs::statfs(BPFFS)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("mounting bpffs on {BPFFS}: {e}")))
}

/// Releases the directories of cgroups that are gone (an agent's cgroup removed after it died),
/// and of `egress exec` cgroups whose egress died and whose command has ended (removing the
/// cgroup too).
fn sweep(root: &Path, mount: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        let Some((rel, id)) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('@'))
            .and_then(|(rel, id)| Some((unescape(rel), id.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let path = mount.join(&rel);
        let alive = fs::metadata(&path).is_ok_and(|m| m.ino() == id);
        let abandoned = alive
            && rel
                .strip_prefix(EXEC_PREFIX)
                .and_then(|pid| pid.parse::<i32>().ok())
                .is_some_and(|pid| {
                    // Unknown counts as populated: a command may still run there.
                    !process_alive(pid) && !cgroup::populated(&path).unwrap_or(true)
                });
        if alive && !abandoned {
            continue;
        }
        if let Ok(pins) = fs::read_dir(&dir) {
            for pin in pins.flatten() {
                unpin(&pin.path());
            }
        }
        let _ = fs::remove_dir(&dir);
        if abandoned && let Err(e) = cgroup::kill_and_remove(&path) {
            log::warn!("removing the abandoned cgroup {}: {e}", path.display());
        }
        log::info!("released the programs left on cgroup {}", path.display());
    }
}

fn unpin(path: &Path) -> bool {
    match PinnedLink::from_pin(path).map(PinnedLink::unpin) {
        Ok(Ok(_detached)) => true,
        Ok(Err(e)) => {
            log::warn!("unpinning {}: {e}", path.display());
            false
        }
        Err(e) => {
            log::warn!("opening the pinned link {}: {e}", path.display());
            false
        }
    }
}

fn process_alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// A cgroup path relative to the mount as one directory name ("" for the root). bpffs refuses
/// dots in names (EPERM), and a directory name has no slash.
fn escape(rel: &Path) -> String {
    rel.to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace('.', "%2E")
}

fn unescape(name: &str) -> String {
    name.replace("%2E", ".")
        .replace("%2F", "/")
        .replace("%25", "%")
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// bpf(2) command `cmd` with `attr`, the command's part of bpf_attr (a `repr(C)` struct).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live value of its full size, which is what the kernel reads.
    let got =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if got < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(got)
    }
}

/// A new link of `program` to `target` for `attach_type` (BPF_LINK_CREATE), attached until
/// its last reference goes: for the link types aya keeps to itself, made here rather than found
/// among the kernel's links, where other processes' links, half-made (EAGAIN) or going (ENOENT),
/// fail the search.
pub fn link_create(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // The command's part of bpf_attr.
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: a descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the BPF object `fd` at `path` (BPF_OBJ_PIN).
fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    // The command's part of bpf_attr.
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = Pin {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // `path` outlives the call.
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_agents_links_are_told_by_prefix_and_namespace_links_by_inode() {
        let me = "42-1000-";
        assert_eq!(other_agents("42-1000-connect4", me), None);
        assert_eq!(other_agents("7-999-connect4", me), Some("connect4"));
        assert_eq!(other_agents("7-999-tc_egress-3", me), Some("tc_egress-3"));
        assert_eq!(netns_of("tc_netns_ether-4026532000-7"), Some(4_026_532_000));
        assert_eq!(netns_of("tc_netns_bare-12-3"), Some(12));
        assert_eq!(netns_of("tc_egress-3"), None);
        assert_eq!(netns_of("connect4"), None);
    }

    #[test]
    fn the_lock_holder_is_read_from_the_flock_line_on_the_file() {
        let locks = "1: POSIX  ADVISORY  WRITE 311 00:1e:120 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 99 00:1e:1200 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 0 00:1f:120 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 20615 00:1e:120 0 EOF\n\
                     4: -> FLOCK  ADVISORY  WRITE 777 00:1e:120 0 EOF\n";
        assert_eq!(lock_holder(locks, "00:1e:120"), Some(20615));
        assert_eq!(lock_holder(locks, "00:1f:120"), None, "not seen here");
        assert_eq!(lock_holder(locks, "00:1e:12"), None);
        assert_eq!(lock_holder("", "00:1e:120"), None);
    }

    #[test]
    fn cgroup_paths_make_one_directory_name_and_back() {
        for rel in [
            "",
            "egress",
            "kubepods/burstable/pod1",
            "system.slice/egress.service",
            "odd%2Fname/x%2E",
        ] {
            let name = escape(Path::new(rel));
            assert!(!name.contains('/') && !name.contains('.'), "{name}");
            assert_eq!(unescape(&name), rel);
        }
    }
}
