//! Loading the embedded eBPF object and attaching its programs: the cgroup hooks to the enforced
//! cgroup, the TC programs to the interfaces traffic leaves by.
pub mod cgroup;
pub mod iface;
mod pins;

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader, RawTracePointRunOptions, TestRun as _,
    maps::{MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, ProgramError, RawTracePoint, SchedClassifier, SockOps, TcAttachType,
        tc::{self, SchedClassifierLinkId},
    },
    sys::SyscallError,
    util::KernelVersion,
};
use egress_common::{
    ALIVE_EVERY_NS, ALIVE_MAP, ARPHRD_ETHER, EVENTS_MAP, FLOWS_MAP, LINKS_MAP, RELAY_NETNS_MAP,
    RELAY_PEERS_MAP, RELAY_WANTED_MAP, WHOAMI_PROGRAM,
};

use crate::{
    maps::{self, Counters, KernelMaps, MapsError},
    relay::{RelayMaps, netns::NetnsMaps},
};

/// The cgroup sock_addr programs, by their function names in egress-ebpf.
pub const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "getpeername4",
    "getpeername6",
];
pub const SOCK_OPS_PROGRAM: &str = "tcp_state";
/// The cgroup_sock programs (each attaches where its section says).
pub const SOCK_PROGRAMS: [&str; 2] = ["sock_create", "sock_release"];
/// The cgroup's packet programs (cgroup_skb) and where each attaches.
pub const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("cgroup_egress", CgroupSkbAttachType::Egress),
    ("cgroup_ingress", CgroupSkbAttachType::Ingress),
];
/// The cgroup_sockopt program (setsockopt).
pub const SOCKOPT_PROGRAM: &str = "setsockopt";
/// Its attach type (uapi `enum bpf_attach_type`).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
/// TC egress in the agent's namespace, the packet backstop (the cgroup's programs count bytes).
pub const TC_PROGRAM: &str = "tc_egress";
/// TC egress in a workload's own namespace, on Ethernet interfaces and on the others.
pub const NETNS_TC_ETHER: &str = "tc_netns_ether";
pub const NETNS_TC_BARE: &str = "tc_netns_bare";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("ring buffer size {0} is not a power of two multiple of the page size")]
    RingSize(u32),
    #[error("a flow table of no entries")]
    FlowTable,
    #[error("loading program `{name}` into the kernel")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {cgroup}")]
    Enforced {
        cgroup: String,
        #[source]
        source: pins::OpenError,
    },
    #[error("attaching `{name}` to {target}")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("adding the clsact qdisc to {iface}")]
    Clsact {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("listing the network interfaces")]
    Interfaces(#[source] nix::Error),
    #[error("the link type of {iface}")]
    LinkType {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning the link of `{name}`")]
    Pin {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the thread that stamps the agent alive")]
    Heartbeat(#[source] std::io::Error),
    #[error("the programs were detached")]
    Detached,
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// The sizes of the kernel's tables the agent may choose; `None` keeps the object's default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    /// The event ring buffer, in bytes: a power-of-two multiple of the page size (4 MiB).
    pub ring_bytes: Option<u32>,
    /// Flows tracked at once (65,536); a connect beyond is counted untracked.
    pub flows: Option<u32>,
}

/// The loaded programs. Dropping it leaves every pinned link attached (the cgroup's, the TC links
/// on the agent's interfaces and in the workloads' namespaces; see `pins`) until
/// [`Shared::detach`]: an agent that dies leaves the cgroup enforced. Unpinned ones go with it.
pub struct Datapath {
    ebpf: Ebpf,
    /// Where the links are pinned; `None` where they cannot be.
    pins: Option<pins::Pins>,
    /// Interfaces (by index: a name may be reused) the TC programs are on.
    ifaces: std::collections::BTreeSet<u32>,
    /// Their link types, for the TC programs (`LINKS_MAP`).
    links: aya::maps::HashMap<MapData, u32, u32>,
    /// Workloads' own namespaces (by inode) the TC programs are in: by interface index, the
    /// program on it and its link.
    netns: HashMap<u64, HashMap<u32, TcLink>>,
}

/// A TC link in a workload's namespace: aya's, or pinned (its name among the pins).
enum TcLink {
    Owned(&'static str, SchedClassifierLinkId),
    Pinned(String),
}

/// The datapath, shared by the agent (its own namespace's interfaces) and the relay (the
/// workloads' namespaces it serves). Empty once detached.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Option<Datapath>>>);

impl Shared {
    pub fn new(datapath: Datapath) -> Shared {
        Shared(Arc::new(Mutex::new(Some(datapath))))
    }

    /// Runs `f` on the datapath; fails once it is detached.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Datapath) -> Result<T, DatapathError>,
    ) -> Result<T, DatapathError> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(datapath) => f(datapath),
            None => Err(DatapathError::Detached),
        }
    }

    /// Detaches every program, for every holder: the clean stop.
    pub fn detach(&self) {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut datapath) = taken
            && let Some(pins) = datapath.pins.take()
        {
            pins.release();
        }
    }

    /// Detaches what an agent that did not stop cleanly left on the cgroup: once this one
    /// enforces there. Returns how many links.
    pub fn release_stale(&self) -> usize {
        self.with(|d| Ok(d.pins.as_ref().map_or(0, pins::Pins::release_stale)))
            .unwrap_or(0)
    }
}

/// What loading hands to the agent: the maps it writes and the event stream it reads.
pub struct Loaded {
    pub datapath: Datapath,
    pub maps: KernelMaps,
    pub counters: Counters,
    pub events: RingBuf<MapData>,
    /// The relay's: steered connections and the namespaces it serves.
    pub relay: RelayMaps,
    /// Where the agent stamps that it is alive ([`Heartbeat`]).
    pub alive: aya::maps::Array<MapData, u64>,
}

/// Now on the programs' clock (`bpf_ktime_get_boot_ns`, CLOCK_BOOTTIME), in ns.
pub fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Stamps, every [`ALIVE_EVERY_NS`], that the agent is alive (see `egress_common::ALIVE_MAP`), on
/// a thread of its own: a busy runtime must not make the programs think the agent is dead. Stops
/// when dropped.
pub struct Heartbeat {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Heartbeat {
    /// Stamps once, then keeps stamping.
    pub fn start(mut map: aya::maps::Array<MapData, u64>) -> Result<Heartbeat, DatapathError> {
        let mut stamp = move || {
            map.set(0, boot_ns(), 0).map_err(|source| {
                DatapathError::Maps(MapsError::Write {
                    name: ALIVE_MAP,
                    source,
                })
            })
        };
        stamp()?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let every = std::time::Duration::from_nanos(ALIVE_EVERY_NS);
        std::thread::Builder::new()
            .name("egress-alive".to_owned())
            .spawn(move || {
                let mut failed = false;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    if let Err(e) = stamp()
                        && !std::mem::replace(&mut failed, true)
                    {
                        log::error!("{e}: steered connects are refused while it fails");
                    }
                }
            })
            .map_err(DatapathError::Heartbeat)?;
        Ok(Heartbeat { _stop: stop })
    }
}

/// The pins for the enforced cgroup at `cgroup`, or `None` (logged) where the kernel cannot keep
/// them: its programs then end with the agent. Refused while another agent enforces the cgroup.
pub fn open_pins(cgroup: &Path) -> Result<Option<pins::Pins>, DatapathError> {
    let opened = if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(5, 7, 0)) {
        Err(pins::OpenError::Io(std::io::Error::other(
            "the kernel has no cgroup bpf_links (5.7)",
        )))
    } else {
        cgroup::cgroup2_mount()
            .and_then(|mount| Ok((cgroup::identity(&mount, cgroup)?.0, mount)))
            .map_err(|e| pins::OpenError::Io(std::io::Error::other(e)))
            .and_then(|(id, mount)| pins::Pins::open(&mount, cgroup, id))
    };
    match opened {
        Ok(pins) => Ok(Some(pins)),
        Err(e @ pins::OpenError::Enforced(_)) => Err(DatapathError::Enforced {
            cgroup: cgroup.display().to_string(),
            source: e,
        }),
        Err(e) => {
            log::error!(
                "the programs cannot be pinned ({e}): if the agent dies, {} is no longer enforced",
                cgroup.display()
            );
            Ok(None)
        }
    }
}

/// Pins the link `taken` from program `name` as `file`.
fn pin<L>(
    pins: &mut pins::Pins,
    name: &'static str,
    file: &str,
    taken: Result<L, ProgramError>,
) -> Result<(), DatapathError>
where
    aya::programs::links::FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let pin_err = |source| DatapathError::Pin { name, source };
    let link = aya::programs::links::FdLink::try_from(taken.map_err(loading(name))?)
        .map_err(|e| pin_err(std::io::Error::other(e)))?;
    pins.pin(file, link).map_err(pin_err)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(loading(name))
}

/// The error of loading program `name`.
fn loading(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

impl Datapath {
    /// Loads and verifies every program, its maps sized by `sizes`; attaches nothing yet.
    pub fn load(sizes: &Sizes) -> Result<Loaded, DatapathError> {
        let mut loader = EbpfLoader::new();
        if let Some(size) = sizes.ring_bytes {
            let page = page_size();
            if !size.is_power_of_two() || size < page {
                return Err(DatapathError::RingSize(size));
            }
            loader.map_max_entries(EVENTS_MAP, size);
        }
        if let Some(flows) = sizes.flows {
            if flows == 0 {
                return Err(DatapathError::FlowTable);
            }
            loader.map_max_entries(FLOWS_MAP, flows);
        }
        let mut ebpf = loader
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/egress"
            )))
            .map_err(DatapathError::Load)?;
        for name in SOCK_ADDR_PROGRAMS {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(loading(name))?;
        }
        program::<SockOps>(&mut ebpf, SOCK_OPS_PROGRAM)?
            .load()
            .map_err(loading(SOCK_OPS_PROGRAM))?;
        for name in SOCK_PROGRAMS {
            program::<CgroupSock>(&mut ebpf, name)?
                .load()
                .map_err(loading(name))?;
        }
        for (name, _) in SKB_PROGRAMS {
            program::<CgroupSkb>(&mut ebpf, name)?
                .load()
                .map_err(loading(name))?;
        }
        program::<CgroupSockopt>(&mut ebpf, SOCKOPT_PROGRAM)?
            .load()
            .map_err(loading(SOCKOPT_PROGRAM))?;
        for name in [TC_PROGRAM, NETNS_TC_ETHER, NETNS_TC_BARE] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(loading(name))?;
        }
        // Before anything is attached: the hooks know the relay's own connects by it.
        let whoami = program::<RawTracePoint>(&mut ebpf, WHOAMI_PROGRAM)?;
        whoami.load().map_err(loading(WHOAMI_PROGRAM))?;
        whoami
            .test_run(RawTracePointRunOptions::new())
            .map_err(loading(WHOAMI_PROGRAM))?;
        let links = maps::open(&mut ebpf, LINKS_MAP)?;
        let maps = KernelMaps::take(&mut ebpf)?;
        let counters = Counters::take(&mut ebpf)?;
        let events = maps::open(&mut ebpf, EVENTS_MAP)?;
        let alive = maps::open(&mut ebpf, ALIVE_MAP)?;
        let relay = RelayMaps {
            peers: maps::open(&mut ebpf, RELAY_PEERS_MAP)?,
            netns: NetnsMaps {
                served: maps::open(&mut ebpf, RELAY_NETNS_MAP)?,
                wanted: maps::open(&mut ebpf, RELAY_WANTED_MAP)?,
            },
        };
        Ok(Loaded {
            datapath: Self {
                ebpf,
                pins: None,
                ifaces: Default::default(),
                links,
                netns: HashMap::new(),
            },
            maps,
            counters,
            events,
            relay,
            alive,
        })
    }

    /// Pins the links attached from now on with `pins` (see [`open_pins`]).
    pub fn pin_with(&mut self, pins: Option<pins::Pins>) {
        self.pins = pins;
    }

    /// Attaches the cgroup programs as bpf_links, pinned (see `pins`). The kernel attaches links
    /// in multi mode (and rejects an explicit BPF_F_ALLOW_MULTI, hence `Single`): they run for the
    /// cgroup's descendants too, which cannot override them, beside other tools' programs.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let target = format!("cgroup {}", cgroup.display());
        let file = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let attach_err = |name| {
            let target = target.clone();
            move |source| DatapathError::Attach {
                name,
                target,
                source,
            }
        };
        let pins = &mut self.pins;
        for name in SOCK_ADDR_PROGRAMS {
            let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let link = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(attach_err(name))?;
            if let Some(pins) = pins {
                pin(pins, name, name, prog.take_link(link))?;
            }
        }
        let prog = program::<SockOps>(&mut self.ebpf, SOCK_OPS_PROGRAM)?;
        let link = prog
            .attach(&file, CgroupAttachMode::Single)
            .map_err(attach_err(SOCK_OPS_PROGRAM))?;
        if let Some(pins) = pins {
            pin(
                pins,
                SOCK_OPS_PROGRAM,
                SOCK_OPS_PROGRAM,
                prog.take_link(link),
            )?;
        }
        for name in SOCK_PROGRAMS {
            let prog = program::<CgroupSock>(&mut self.ebpf, name)?;
            let link = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(attach_err(name))?;
            if let Some(pins) = pins {
                pin(pins, name, name, prog.take_link(link))?;
            }
        }
        for (name, attach) in SKB_PROGRAMS {
            let prog = program::<CgroupSkb>(&mut self.ebpf, name)?;
            let link = prog
                .attach(&file, attach, CgroupAttachMode::Single)
                .map_err(attach_err(name))?;
            if let Some(pins) = pins {
                pin(pins, name, name, prog.take_link(link))?;
            }
        }
        let prog = program::<CgroupSockopt>(&mut self.ebpf, SOCKOPT_PROGRAM)?;
        match pins {
            // aya keeps this link type to itself: made here, to be pinned.
            Some(pins) => {
                let program = prog.fd().map_err(loading(SOCKOPT_PROGRAM))?;
                let link = pins::link_create(program.as_fd(), file.as_fd(), BPF_CGROUP_SETSOCKOPT)
                    .map_err(|io_error| {
                        attach_err(SOCKOPT_PROGRAM)(
                            SyscallError {
                                call: "bpf_link_create",
                                io_error,
                            }
                            .into(),
                        )
                    })?;
                pins.pin_fd(SOCKOPT_PROGRAM, &link)
                    .map_err(|source| DatapathError::Pin {
                        name: SOCKOPT_PROGRAM,
                        source,
                    })?;
            }
            None => {
                prog.attach(&file, CgroupAttachMode::Single)
                    .map_err(attach_err(SOCKOPT_PROGRAM))?;
            }
        }
        Ok(())
    }

    /// The interfaces the TC programs are on, by their names now.
    pub fn ifaces(&self) -> Vec<String> {
        self.ifaces
            .iter()
            .filter_map(|&i| nix::net::if_::if_indextoname(i).ok())
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    /// Whether the TC programs are on the interface now called `iface`.
    pub fn has_iface(&self, iface: &str) -> bool {
        nix::net::if_::if_nametoindex(iface).is_ok_and(|i| self.ifaces.contains(&i))
    }

    /// Attaches the TC programs to `iface` (as TCX links where the kernel has them, 6.6+, else
    /// under a clsact qdisc); nothing to do when they are on it already.
    pub fn attach_iface(&mut self, iface: &str) -> Result<(), DatapathError> {
        if self.has_iface(iface) {
            return Ok(());
        }
        let link = self.attach_tc(TC_PROGRAM, iface)?;
        let index = nix::net::if_::if_nametoindex(iface);
        // TCX links (6.6+) are pinned with the cgroup's; a clsact filter stays anyway until it
        // is taken off.
        if let Some(pins) = self.pins.as_mut()
            && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
        {
            let taken = program::<SchedClassifier>(&mut self.ebpf, TC_PROGRAM)?.take_link(link);
            // bpffs takes no dots in names.
            let file = format!("{TC_PROGRAM}-{}", index.unwrap_or(0));
            pin(pins, TC_PROGRAM, &file, taken)?;
        }
        if let Ok(index) = index {
            self.ifaces.insert(index);
            // Unknown, the programs judge a packet socket's frames by their IP version alone.
            if let Ok(kind) = iface::link_type(iface) {
                let _ = self.links.insert(index, kind, 0);
            }
        }
        Ok(())
    }

    /// Puts the TC egress program for a workload's namespace on every interface of the calling
    /// thread's namespace (inode `ino`) that lacks it, loopback aside, up or not: the one for
    /// Ethernet framing or the one for none, by the interface's link type. Forgets the interfaces
    /// gone (their links went with them). Returns the names of the interfaces it attached to, or
    /// the first failure (after trying every interface).
    pub fn cover_netns(&mut self, ino: u64) -> Result<Vec<String>, DatapathError> {
        let mut found = HashMap::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(DatapathError::Interfaces)? {
            if ifa
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            {
                continue;
            }
            // An interface gone meanwhile has no index: nothing leaves by it.
            if let Ok(index) = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()) {
                found.entry(index).or_insert(ifa.interface_name);
            }
        }
        let (mut links, gone): (HashMap<_, _>, HashMap<_, _>) = self
            .netns
            .remove(&ino)
            .unwrap_or_default()
            .into_iter()
            .partition(|(index, _)| found.contains_key(index));
        self.detach_tc(gone.into_values());
        let mut attached = Vec::new();
        let mut result = Ok(());
        for (index, iface) in found {
            if links.contains_key(&index) {
                continue;
            }
            let gone = || nix::net::if_::if_nametoindex(iface.as_str()) != Ok(index);
            // Never guessed: the program for the wrong framing would misread every frame.
            let name = match iface::link_type(&iface) {
                Ok(ARPHRD_ETHER) => NETNS_TC_ETHER,
                Ok(_) => NETNS_TC_BARE,
                Err(_) if gone() => continue,
                Err(source) => {
                    result = result.and(Err(DatapathError::LinkType { iface, source }));
                    continue;
                }
            };
            match self
                .attach_tc(name, &iface)
                .and_then(|link| self.keep(name, ino, index, link))
            {
                Ok(link) => {
                    links.insert(index, link);
                    attached.push(iface);
                }
                Err(_) if gone() => {}
                Err(e) => result = result.and(Err(e)),
            }
        }
        self.netns.insert(ino, links);
        // Covered now: what an agent that died left here can go.
        if result.is_ok()
            && let Some(pins) = self.pins.as_ref()
        {
            let stale = pins.release_stale_in(ino);
            if stale > 0 {
                log::info!("network namespace {ino}: detached {stale} link(s) a dead agent left");
            }
        }
        result.map(|()| attached)
    }

    /// Takes the TC programs off a workload's namespace (inode `ino`).
    pub fn uncover_netns(&mut self, ino: u64) {
        let links = self.netns.remove(&ino).unwrap_or_default();
        self.detach_tc(links.into_values());
    }

    /// Pins TCX link `link` of program `name`, on interface `index` of namespace `ino`, where
    /// the agent pins its links: the program then outlives the agent, as the cgroup's do.
    fn keep(
        &mut self,
        name: &'static str,
        ino: u64,
        index: u32,
        link: SchedClassifierLinkId,
    ) -> Result<TcLink, DatapathError> {
        let Some(pins) = self.pins.as_mut() else {
            return Ok(TcLink::Owned(name, link));
        };
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
            return Ok(TcLink::Owned(name, link));
        }
        let file = format!("{name}-{ino}-{index}");
        let taken = program::<SchedClassifier>(&mut self.ebpf, name)?.take_link(link);
        pin(pins, name, &file, taken)?;
        Ok(TcLink::Pinned(file))
    }

    /// Detaches TC links, each from its program or its pin.
    fn detach_tc(&mut self, links: impl Iterator<Item = TcLink>) {
        for link in links {
            match link {
                TcLink::Owned(name, link) => {
                    if let Ok(program) = program::<SchedClassifier>(&mut self.ebpf, name) {
                        // An interface gone took its link with it: what is left is closing our
                        // end.
                        let _ = program.detach(link);
                    }
                }
                TcLink::Pinned(file) => {
                    if let Some(pins) = self.pins.as_mut() {
                        pins.unpin(&file);
                    }
                }
            }
        }
    }

    /// Attaches TC program `name` to `iface` of the calling thread's namespace, in `direction`.
    fn attach_tc(
        &mut self,
        name: &'static str,
        iface: &str,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(DatapathError::Clsact {
                        iface: iface.to_owned(),
                        source,
                    });
                }
            }
        }
        program::<SchedClassifier>(&mut self.ebpf, name)?
            .attach(iface, TcAttachType::Egress)
            .map_err(|source| DatapathError::Attach {
                name,
                target: format!("interface {iface}"),
                source,
            })
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}
