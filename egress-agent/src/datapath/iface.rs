//! Which interfaces the TC programs go on.
use std::collections::BTreeSet;

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};

/// Every interface that is up, loopback aside (loopback is not egress).
pub fn egress_interfaces() -> nix::Result<Vec<String>> {
    let mut names = BTreeSet::new();
    for ifa in getifaddrs()? {
        if ifa.flags.contains(InterfaceFlags::IFF_UP)
            && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        {
            names.insert(ifa.interface_name);
        }
    }
    Ok(names.into_iter().collect())
}
