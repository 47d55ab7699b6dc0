//! What the kernel does not know about a destination: which ServiceEntry host it belongs to and
//! which rule that is; and which cgroup path a cgroup id is.
use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_common::{RULE_FIRST_POLICY, RULE_LOOPBACK, RULE_MODE, RULE_RESOLVER};

use super::Record;
use crate::policy::Plan;

/// A snapshot of the plan and the resolved addresses, replaced on every map sync.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By `rule_id - RULE_FIRST_POLICY`: label and hosts.
    rules: Vec<(String, Vec<String>)>,
    mode: String,
    /// Resolved names of each address.
    names: HashMap<IpAddr, Vec<String>>,
}

impl Catalog {
    pub fn new(plan: &Plan, resolved: &HashMap<String, Vec<IpAddr>>) -> Catalog {
        let mut names: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (name, addrs) in resolved {
            for ip in addrs {
                names.entry(*ip).or_default().push(name.clone());
            }
        }
        for v in names.values_mut() {
            v.sort();
        }
        Catalog {
            rules: plan
                .rules
                .iter()
                .map(|r| (r.label.clone(), r.hosts.clone()))
                .collect(),
            mode: plan.mode.to_string(),
            names,
        }
    }

    /// Fills host, rule and reason from the rule id and destination.
    pub fn annotate(&self, r: &mut Record) {
        let Some(rule_id) = r.rule_id else { return };
        let ip = r.dst_addr().map(|sa| sa.ip());
        let names = ip.and_then(|ip| self.names.get(&ip));
        match rule_id {
            RULE_LOOPBACK => r.reason = Some("loopback".to_owned()),
            RULE_RESOLVER => r.reason = Some("resolver".to_owned()),
            RULE_MODE => r.reason = Some(format!("mode {}", self.mode)),
            _ => {}
        }
        let rule = rule_id
            .checked_sub(RULE_FIRST_POLICY)
            .and_then(|i| self.rules.get(i as usize));
        r.host = match (rule, names) {
            // The name this address was resolved from, among the rule's hosts.
            (Some((_, hosts)), Some(names)) => names
                .iter()
                .find(|n| hosts.contains(n))
                .or(hosts.first())
                .cloned(),
            // An address the rule lists itself (STATIC endpoints, CIDRs).
            (Some((_, hosts)), None) => hosts.first().cloned(),
            // No rule decided, but the address belongs to a registered name.
            (None, Some(names)) => names.first().cloned(),
            (None, None) => None,
        };
        r.rule = rule.map(|(label, _)| label.clone());
    }
}

/// cgroup id → path (relative to the cgroup2 mount, with a leading `/`), by scanning the enforced
/// subtree. A miss rescans, at most once a second; cgroups that are gone stay unknown.
pub struct CgroupNames {
    mount: PathBuf,
    root: PathBuf,
    known: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupNames {
    pub fn new(mount: PathBuf, root: PathBuf) -> CgroupNames {
        let mut names = CgroupNames {
            mount,
            root,
            known: HashMap::new(),
            last_scan: None,
        };
        names.scan();
        names
    }

    pub fn name(&mut self, id: u64) -> Option<String> {
        if !self.known.contains_key(&id)
            && self
                .last_scan
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.scan();
        }
        self.known.get(&id).cloned()
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.known.insert(meta.ino(), display(&self.mount, &dir));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

fn display(mount: &Path, dir: &Path) -> String {
    match dir.strip_prefix(mount) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}
