//! Which interfaces the TC programs go on, and a watch for interfaces that appear later.
use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::{
    ifaddrs::getifaddrs,
    net::if_::InterfaceFlags,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::glob::{glob_match, is_pattern};

/// Every interface that is up, loopback aside (loopback is not egress), whose name one of
/// `patterns` matches (every one without patterns).
pub fn egress_interfaces(patterns: Option<&[String]>) -> nix::Result<Vec<String>> {
    let mut names = BTreeSet::new();
    for ifa in getifaddrs()? {
        if ifa.flags.contains(InterfaceFlags::IFF_UP)
            && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            && patterns.is_none_or(|p| p.iter().any(|p| glob_match(p, &ifa.interface_name)))
        {
            names.insert(ifa.interface_name);
        }
    }
    Ok(names.into_iter().collect())
}

/// The interfaces `--iface` names outright (no pattern): they must all be there at start.
pub fn named(list: &[String]) -> impl Iterator<Item = &String> {
    list.iter().filter(|n| !is_pattern(n))
}

/// An unbound UDP socket in the calling thread's namespace, to ask the kernel about that
/// namespace: it takes no port and needs no address.
pub fn query_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// The link type (ARPHRD_*) of interface `iface` of the calling thread's namespace. Asked of the
/// kernel: sysfs shows the namespace it was mounted in, whatever the thread's.
pub fn link_type(iface: &str) -> io::Result<u32> {
    let probe = query_socket()?;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (to, &from) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *to = from as libc::c_char;
    }
    // SAFETY: a valid socket and an ifreq naming the interface, as SIOCGIFHWADDR takes.
    if unsafe { libc::ioctl(probe.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled in the hardware address, whose family is the link type.
    Ok(u32::from(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family }))
}

/// Whether interfaces may appear later that the programs must go on: by default every one,
/// with `--iface` those its patterns match.
pub fn watched(list: Option<&[String]>) -> bool {
    list.is_none_or(|l| l.iter().any(|n| is_pattern(n)))
}

/// The kernel's link notifications (rtnetlink's link group): readable whenever an interface is
/// added or changes (comes up, is renamed). Only a wakeup: the interfaces are listed afresh.
pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LinkWatch {
    pub fn new() -> io::Result<LinkWatch> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
        )?;
        // SAFETY: the AsyncFd owns the descriptor and keeps it open, unreplaced, while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(LinkWatch { fd })
    }

    /// Returns once something changed, with every pending notification read.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        let mut buf = [0u8; 8192];
        loop {
            match recv(
                guard.get_inner().as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    guard.clear_ready();
                    return Ok(());
                }
                // Notifications were dropped (the socket's buffer overflowed): the caller lists
                // every interface anyway.
                Err(nix::errno::Errno::ENOBUFS) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
