//! The only module that touches `aya::maps`: applies desired entries to the kernel's policy map.
use std::{collections::BTreeMap, time::Duration};

use aya::{
    Ebpf,
    maps::{
        Array, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use egress_common::{
    CONFIG_EVENTS_OFF, CONFIG_MAP, COUNTER_FLOWS_CLOSED, COUNTER_FLOWS_OPENED, COUNTER_LOST,
    COUNTER_SLOTS, COUNTER_UNTRACKED, COUNTERS_MAP, Config, Mode, POLICY_MAP, PolicyKey,
    PolicyValue, Verdict,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the eBPF object has no map `{0}`")]
    Missing(&'static str),
    #[error("opening map `{name}`")]
    Open {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing map `{name}`")]
    Write {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Takes map `name` out of the loaded object as a `T`.
pub(crate) fn open<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Open { name, source })
}

/// The kernel's per-CPU counters: decisions by verdict and events lost.
pub struct Counters {
    counters: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            counters: open(ebpf, COUNTERS_MAP)?,
        })
    }

    /// Events the programs could not write (ring buffer full), summed over CPUs.
    pub fn events_lost(&self) -> Result<u64, MapsError> {
        self.counter(COUNTER_LOST)
    }

    /// Flows the kernel's flow table had no room for, summed over CPUs.
    pub fn flows_untracked(&self) -> Result<u64, MapsError> {
        self.counter(COUNTER_UNTRACKED)
    }

    /// Flows in the kernel's flow table now.
    pub fn flows_open(&self) -> Result<u64, MapsError> {
        let opened = self.counter(COUNTER_FLOWS_OPENED)?;
        Ok(opened.saturating_sub(self.counter(COUNTER_FLOWS_CLOSED)?))
    }

    /// Decisions taken so far, summed over CPUs.
    pub fn decisions(&self, verdict: Verdict) -> Result<u64, MapsError> {
        self.counter(verdict as u32)
    }

    fn counter(&self, slot: u32) -> Result<u64, MapsError> {
        debug_assert!(slot < COUNTER_SLOTS);
        let values = self
            .counters
            .get(&slot, 0)
            .map_err(|source| MapsError::Open {
                name: COUNTERS_MAP,
                source,
            })?;
        Ok(values.iter().sum())
    }
}

/// Desired policy map content: (prefix length, key) → value.
pub type Entries = BTreeMap<(u32, PolicyKey), PolicyValue>;

pub struct KernelMaps {
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    config: Array<MapData, Config>,
    /// The config last written; mode and cgroup are set separately.
    written: Config,
    /// What the kernel map holds, as far as this process wrote it.
    current: Entries,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub total: usize,
}

impl KernelMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            policy: open(ebpf, POLICY_MAP)?,
            config: open(ebpf, CONFIG_MAP)?,
            written: Config {
                mode: Mode::Unset as u32,
                cgroup_level: 0,
                cgroup_id: 0,
                flags: 0,
                relay_port: 0,
                held_syn_rto: 0,
                netns_cookie: 0,
            },
            current: Entries::new(),
        })
    }

    /// Makes the kernel map equal `desired`: new and changed entries first, stale ones after, so
    /// an address that stays allowed is never briefly denied. `current` tracks each write that
    /// succeeded, so a failed sync can simply be retried.
    pub fn sync(&mut self, desired: &Entries) -> Result<SyncStats, MapsError> {
        let write_err = |source| MapsError::Write {
            name: POLICY_MAP,
            source,
        };
        let mut stats = SyncStats::default();
        for (&(bits, key), value) in desired {
            if self.current.get(&(bits, key)) == Some(value) {
                continue;
            }
            self.policy
                .insert(&Key::new(bits, key), value, 0)
                .map_err(write_err)?;
            self.current.insert((bits, key), *value);
            stats.written += 1;
        }
        let stale: Vec<(u32, PolicyKey)> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for (bits, key) in stale {
            self.policy
                .remove(&Key::new(bits, key))
                .map_err(write_err)?;
            self.current.remove(&(bits, key));
            stats.removed += 1;
        }
        stats.total = self.current.len();
        Ok(stats)
    }

    pub fn set_mode(&mut self, mode: Mode) -> Result<(), MapsError> {
        self.write_config(Config {
            mode: mode as u32,
            ..self.written
        })
    }

    /// The cgroup whose sockets the TC programs judge: its id and depth below the cgroup2 mount.
    pub fn set_cgroup(&mut self, id: u64, level: u32) -> Result<(), MapsError> {
        self.write_config(Config {
            cgroup_id: id,
            cgroup_level: level,
            ..self.written
        })
    }

    /// The agent's own network namespace (its cookie): the one whose interfaces the TC programs
    /// are on.
    pub fn set_netns(&mut self, cookie: u64) -> Result<(), MapsError> {
        self.write_config(Config {
            netns_cookie: cookie,
            ..self.written
        })
    }

    /// Where the relay listens in a namespace it starts serving: a steered connect from a
    /// namespace not served yet is pointed there and held, its SYN sent again after
    /// [`HELD_SYN_RTO`] while the relay is not there yet.
    pub fn set_relay_port(&mut self, port: u16) -> Result<(), MapsError> {
        self.write_config(Config {
            relay_port: port,
            held_syn_rto: jiffies(HELD_SYN_RTO),
            ..self.written
        })
    }

    /// Turns the socket hooks' events and flow tracking off (the events benchmark's baseline).
    pub fn set_events_off(&mut self, off: bool) -> Result<(), MapsError> {
        let flags = if off {
            self.written.flags | CONFIG_EVENTS_OFF
        } else {
            self.written.flags & !CONFIG_EVENTS_OFF
        };
        self.write_config(Config {
            flags,
            ..self.written
        })
    }

    fn write_config(&mut self, config: Config) -> Result<(), MapsError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| MapsError::Write {
                name: CONFIG_MAP,
                source,
            })?;
        self.written = config;
        Ok(())
    }

    pub fn entries(&self) -> usize {
        self.current.len()
    }
}

/// The first SYN timeout of a held connect. Doubled at each retry, TCP's six SYN retries give the
/// relay about 1.3 s to serve the namespace (it scans every 500 ms, and is asked at once).
pub const HELD_SYN_RTO: Duration = Duration::from_millis(10);

/// `d` in the kernel's jiffies, at least one; 0 (the kernel's default) if the tick is unknown.
/// The coarse clocks advance one jiffy at a time, so their resolution is the tick.
fn jiffies(d: Duration) -> u16 {
    match nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(tick) => {
            let tick = Duration::from(tick);
            if tick.is_zero() {
                0
            } else {
                d.as_nanos()
                    .div_ceil(tick.as_nanos())
                    .clamp(1, u128::from(u16::MAX)) as u16
            }
        }
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_is_the_kernels_tick_rate_in_jiffies() {
        // CONFIG_HZ is one of these on every kernel built from Kconfig's choices.
        let hz = jiffies(Duration::from_secs(1));
        assert!([100, 250, 300, 1000].contains(&hz), "HZ {hz}");
        assert_eq!(jiffies(Duration::from_nanos(1)), 1, "at least a jiffy");
        assert_eq!(
            jiffies(HELD_SYN_RTO),
            (u32::from(hz) * 10).div_ceil(1000) as u16
        );
    }
}
