//! Which interfaces the TC programs go on, and a watch for interfaces that appear later.
use std::{collections::BTreeSet, io, os::fd::OwnedFd};

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
            std::os::fd::AsRawFd::as_raw_fd(&fd),
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
                std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
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
