//! How many connections the relay holds at once, and how many of them one workload may hold.
//! Each relayed connection costs the agent two descriptors; without a share per workload, one
//! workload opening connections (or holding them before their ClientHello) could take them all,
//! and every other workload's steered connections would then fail.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use foldhash::HashMap as FastMap;

/// The relay's limits, as in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, by every workload together.
    pub connections: usize,
    /// Connections held at once by one workload (one cgroup).
    pub per_workload: usize,
}

impl Limits {
    /// The limits set, or else those that `nofile` descriptors allow: the relay's connections
    /// take what is left after a reserve for the agent's other descriptors (maps, listeners,
    /// namespaces, the flow log, origination's idle upstreams), two per connection; one workload
    /// may take half of them, so that the others always have the rest.
    pub fn new(connections: Option<usize>, per_workload: Option<usize>, nofile: u64) -> Limits {
        let connections = connections.unwrap_or_else(|| {
            let reserve = 64 + nofile / 8;
            usize::try_from(nofile.saturating_sub(reserve) / 2)
                .unwrap_or(usize::MAX)
                .max(1)
        });
        Limits {
            connections,
            per_workload: per_workload.unwrap_or(connections.div_ceil(2)),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The relay holds as many connections as it may.
    Relay(usize),
    /// The connection's workload holds as many as it may.
    Workload(usize),
}

impl Refusal {
    /// The limit's name in the metrics.
    pub fn limit(&self) -> &'static str {
        match self {
            Refusal::Relay(_) => "relay",
            Refusal::Workload(_) => "workload",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Relay(n) => write!(
                f,
                "the relay holds {n} connections, as many as it may (--relay-max-connections)"
            ),
            Refusal::Workload(n) => write!(
                f,
                "its workload holds {n} relay connections, as many as one workload may \
                 (--relay-max-per-workload)"
            ),
        }
    }
}

/// How often the log says that connections are refused for a limit: a workload at its limit
/// may try many times a second, and each refusal has its flow record already.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Refusals for one limit since the log last said so.
#[derive(Debug, Default)]
struct Warned {
    at: Option<Instant>,
    since: u64,
}

impl Warned {
    /// Counts a refusal; returns how many to report when the log is due to say so.
    fn refused(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self
            .at
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            return None;
        }
        self.at = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

#[derive(Debug, Default)]
struct Workload {
    open: usize,
    warned: Warned,
}

/// A destination's connections through the relay: by rule id, host and port.
type HostKey = (u32, crate::events::Name, u16);

/// The connections each workload holds, by cgroup id, and each destination with a limit of its
/// own (a DestinationRule's `connectionPool.tcp.maxConnections`).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    workloads: Mutex<FastMap<u64, Workload>>,
    relay_warned: Mutex<Warned>,
    hosts: Mutex<FastMap<HostKey, usize>>,
}

/// A connection counted against its destination's limit until dropped.
#[must_use]
pub struct HostAdmitted<'a> {
    admission: &'a Admission,
    key: HostKey,
}

impl Drop for HostAdmitted<'_> {
    fn drop(&mut self) {
        let mut hosts = self.admission.hosts();
        if let Some(open) = hosts.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                hosts.remove(&self.key);
            }
        }
    }
}

/// A connection admitted, counted against its workload until dropped.
#[must_use]
pub struct Admitted<'a> {
    admission: &'a Admission,
    cgroup: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut workloads = self.admission.workloads();
        if let Some(w) = workloads.get_mut(&self.cgroup) {
            w.open -= 1;
            if w.open == 0 {
                workloads.remove(&self.cgroup);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            workloads: Mutex::default(),
            relay_warned: Mutex::default(),
            hosts: Mutex::default(),
        }
    }

    fn workloads(&self) -> std::sync::MutexGuard<'_, FastMap<u64, Workload>> {
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, FastMap<HostKey, usize>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection to `host`:`port` under rule `rule_id`, which may have `max` at once;
    /// else returns how many it has.
    pub fn admit_host(
        &self,
        rule_id: u32,
        host: &crate::events::Name,
        port: u16,
        max: u32,
    ) -> Result<HostAdmitted<'_>, usize> {
        let key = (rule_id, crate::events::Name::clone(host), port);
        let mut hosts = self.hosts();
        let open = hosts.entry(key.clone()).or_default();
        if *open >= max as usize {
            let open = *open;
            if open == 0 {
                hosts.remove(&key);
            }
            return Err(open);
        }
        *open += 1;
        Ok(HostAdmitted {
            admission: self,
            key,
        })
    }

    /// Admits a connection of the workload in cgroup `cgroup` while the relay holds `open`
    /// connections, this one among them. On a refusal, also returns how many refusals of that
    /// kind to log, when the log is due to say so.
    pub fn admit(&self, cgroup: u64, open: usize) -> Result<Admitted<'_>, (Refusal, Option<u64>)> {
        let now = Instant::now();
        if open > self.limits.connections {
            let warn = self
                .relay_warned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refused(now);
            return Err((Refusal::Relay(self.limits.connections), warn));
        }
        let mut workloads = self.workloads();
        let w = workloads.entry(cgroup).or_default();
        if w.open >= self.limits.per_workload {
            return Err((Refusal::Workload(w.open), w.warned.refused(now)));
        }
        w.open += 1;
        Ok(Admitted {
            admission: self,
            cgroup,
        })
    }

    /// Connections the workload in `cgroup` holds.
    #[cfg(test)]
    fn open(&self, cgroup: u64) -> usize {
        self.workloads().get(&cgroup).map_or(0, |w| w.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_follow_the_descriptor_limit() {
        // Debian's usual hard limit: a reserve of 128 K descriptors, the rest two a connection.
        let l = Limits::new(None, None, 1 << 20);
        assert_eq!(l.connections, ((1 << 20) - 64 - (1 << 17)) / 2);
        assert_eq!(l.per_workload, l.connections / 2);
        // A soft limit never raised.
        assert_eq!(
            Limits::new(None, None, 1024),
            Limits {
                connections: 416,
                per_workload: 208
            }
        );
        // Nothing left after the reserve: one connection still, never none.
        assert_eq!(
            Limits::new(None, None, 10),
            Limits {
                connections: 1,
                per_workload: 1
            }
        );
        // Set ones are kept as set; the share follows a set relay-wide limit.
        assert_eq!(
            Limits::new(Some(10), None, 1024),
            Limits {
                connections: 10,
                per_workload: 5
            }
        );
        assert_eq!(Limits::new(None, Some(3), 1024).per_workload, 3);
    }

    #[test]
    fn a_workload_at_its_limit_leaves_the_others_theirs() {
        let a = Admission::new(Limits {
            connections: 5,
            per_workload: 2,
        });
        let first = a.admit(1, 1).expect("first");
        let second = a.admit(1, 2).expect("second");
        let (refusal, warn) = a.admit(1, 3).err().expect("third refused");
        assert_eq!(refusal, Refusal::Workload(2));
        assert_eq!(warn, Some(1), "the first refusal is logged");
        assert_eq!(
            a.admit(1, 3).err().map(|e| e.1),
            Some(None),
            "not again at once"
        );
        let other = a.admit(2, 3).expect("another workload");
        drop(first);
        assert_eq!(a.open(1), 1);
        let again = a.admit(1, 3).expect("a place freed");
        drop((second, again, other));
        assert_eq!(a.open(1), 0);
        assert!(
            a.workloads().is_empty(),
            "no entry for a workload with none open"
        );
    }

    #[test]
    fn the_relay_wide_limit_counts_every_connection() {
        let a = Admission::new(Limits {
            connections: 2,
            per_workload: 2,
        });
        let (refusal, warn) = a.admit(7, 3).err().expect("over the relay's limit");
        assert_eq!(refusal, Refusal::Relay(2));
        assert_eq!(warn, Some(1));
        assert_eq!(a.open(7), 0, "a refused connection is not counted");
        assert!(a.admit(7, 2).is_ok());
    }

    #[test]
    fn a_destination_has_its_own_limit() {
        let a = Admission::new(Limits {
            connections: 10,
            per_workload: 10,
        });
        let host: crate::events::Name = "api.example.com".into();
        let first = a.admit_host(1, &host, 443, 1).expect("first");
        assert_eq!(a.admit_host(1, &host, 443, 1).err(), Some(1));
        // Another port, another rule: other destinations.
        let other_port = a.admit_host(1, &host, 8443, 1).expect("another port");
        let other_rule = a.admit_host(2, &host, 443, 1).expect("another rule");
        drop(first);
        let again = a.admit_host(1, &host, 443, 1).expect("a place freed");
        drop((other_port, other_rule, again));
        assert!(
            a.hosts().is_empty(),
            "no entry for a destination with none open"
        );
    }

    #[test]
    fn refusals_are_logged_once_a_minute_with_their_count() {
        let mut w = Warned::default();
        let t0 = Instant::now();
        assert_eq!(w.refused(t0), Some(1));
        assert_eq!(w.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.refused(t0 + Duration::from_secs(59)), None);
        assert_eq!(w.refused(t0 + WARN_EVERY), Some(3));
        assert_eq!(w.refused(t0 + WARN_EVERY), None);
    }
}
