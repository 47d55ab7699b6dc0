//! Outlier detection (a DestinationRule's `outlierDetection`): an address of a host that has
//! failed so many times in a row is left out of the relay's attempts for a while, as Envoy ejects
//! an endpoint. Kept per rule and address, shared by every connection the relay serves, for the
//! addresses the host has and those still out.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::policy::compile::Outliers;

/// How an attempt at an address went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// An HTTP answer with this status.
    Answered(u16),
    /// A connection made, where the relay passes bytes through.
    Connected,
    /// No answer: the connect failed, the connection broke, or the time ran out.
    Failed,
}

/// The addresses' errors in a row and ejections, by rule and address.
#[derive(Default)]
pub(super) struct Health {
    by: Mutex<HashMap<(u32, SocketAddr), Record>>,
}

#[derive(Debug, Default)]
struct Record {
    errors: u32,
    gateway_errors: u32,
    /// Failures of the relay's own in a row, where counted apart (`Outliers::split_local`).
    local_errors: u32,
    /// The end of the last ejection, moved on by the intervals that forgot one (`settle`).
    out_until: Option<Instant>,
    /// Ejections not forgotten: the next lasts once more the base time than the last.
    times: u32,
}

impl Record {
    fn out(&self, now: Instant) -> bool {
        self.out_until.is_some_and(|until| now < until)
    }

    /// Forgets one ejection for each `interval` the address has been back in, as Envoy lowers
    /// its ejection multiplier while a host stays healthy.
    fn settle(&mut self, now: Instant, interval: Duration) {
        let Some(until) = self.out_until else {
            return;
        };
        if now < until || interval.is_zero() {
            return;
        }
        let passed = (now - until).as_nanos() / interval.as_nanos();
        let forgotten = u32::try_from(passed).unwrap_or(u32::MAX).min(self.times);
        self.times -= forgotten;
        self.out_until = (self.times > 0).then(|| until + interval * forgotten);
    }

    fn clean(&self) -> bool {
        self.errors == 0
            && self.gateway_errors == 0
            && self.local_errors == 0
            && self.times == 0
            && self.out_until.is_none()
    }
}

/// Envoy's longest ejection, unless the base time is longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, SocketAddr), Record>> {
        self.by.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `targets` in their order without the addresses that are out now, unless that leaves none,
    /// or fewer of the host's addresses (`of`) in than `outliers` ask for (Envoy's panic
    /// threshold, `minHealthPercent`): then all of them.
    pub(super) fn order(
        &self,
        rule: u32,
        targets: Vec<SocketAddr>,
        of: &[SocketAddr],
        outliers: &Outliers,
    ) -> Vec<SocketAddr> {
        let now = Instant::now();
        let by = self.lock();
        let out = |t: &SocketAddr| by.get(&(rule, *t)).is_some_and(|r| r.out(now));
        let healthy = of.iter().filter(|a| !out(a)).count();
        if healthy * 100 < of.len() * outliers.min_health_percent as usize {
            return targets;
        }
        let kept: Vec<SocketAddr> = targets.iter().copied().filter(|t| !out(t)).collect();
        if kept.is_empty() { targets } else { kept }
    }

    /// Notes how an attempt at `addr`, one of the host's addresses `of`, went; ejects it when that
    /// makes as many errors in a row as `outliers` allow and not too many of `of` are out already.
    /// Whether it was ejected.
    pub(super) fn note(
        &self,
        rule: u32,
        addr: SocketAddr,
        of: &[SocketAddr],
        outcome: Outcome,
        outliers: &Outliers,
    ) -> bool {
        self.note_at(Instant::now(), rule, addr, of, outcome, outliers)
    }

    fn note_at(
        &self,
        now: Instant,
        rule: u32,
        addr: SocketAddr,
        of: &[SocketAddr],
        outcome: Outcome,
        outliers: &Outliers,
    ) -> bool {
        // A failure of the relay's own counts as a 5xx and a gateway error, unless counted apart;
        // an answer or a connection made ends a run of them.
        let split = outliers.split_local;
        let (error, gateway, local) = match outcome {
            Outcome::Answered(status) => (
                Some(status >= 500),
                Some(matches!(status, 502..=504)),
                false,
            ),
            Outcome::Connected if split => (None, None, false),
            Outcome::Connected => (Some(false), Some(false), false),
            Outcome::Failed if split => (None, None, true),
            Outcome::Failed => (Some(true), Some(true), false),
        };
        let mut by = self.lock();
        // What the host's addresses on this port no longer hold is forgotten once it is back in;
        // so are the others' ejections as their intervals pass.
        by.retain(|&(r, a), record| {
            if r != rule || a.port() != addr.port() {
                return true;
            }
            record.settle(now, outliers.interval);
            record.out(now) || (of.contains(&a) && !record.clean())
        });
        let r = by.entry((rule, addr)).or_default();
        let count = |n: u32, error: bool| if error { n.saturating_add(1) } else { 0 };
        if let Some(error) = error {
            r.errors = count(r.errors, error);
        }
        if let Some(gateway) = gateway {
            r.gateway_errors = count(r.gateway_errors, gateway);
        }
        r.local_errors = count(r.local_errors, local);
        if r.clean() {
            by.remove(&(rule, addr));
            return false;
        }
        let due = (outliers.consecutive_5xx > 0 && r.errors >= outliers.consecutive_5xx)
            || (outliers.consecutive_gateway > 0
                && r.gateway_errors >= outliers.consecutive_gateway)
            || (split
                && outliers.consecutive_local > 0
                && r.local_errors >= outliers.consecutive_local);
        if !due || r.out(now) {
            return false;
        }
        // One address may always be out; more up to the share.
        let out = of
            .iter()
            .filter(|a| **a != addr && by.get(&(rule, **a)).is_some_and(|r| r.out(now)))
            .count();
        let allowed = (of.len() * outliers.max_ejection_percent as usize / 100).max(1);
        if out >= allowed {
            return false;
        }
        let r = by.entry((rule, addr)).or_default();
        r.times += 1;
        r.errors = 0;
        r.gateway_errors = 0;
        r.local_errors = 0;
        let longest = MAX_EJECTION.max(outliers.base_ejection);
        let lasts = outliers
            .base_ejection
            .checked_mul(r.times)
            .unwrap_or(longest);
        r.out_until = Some(now + lasts.min(longest));
        true
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::{Health, Outcome};
    use crate::policy::compile::Outliers;

    /// Port 443 of 192.0.2.`host`.
    fn addr(host: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, host], 443))
    }

    fn outliers(consecutive_5xx: u32, consecutive_gateway: u32, percent: u32) -> Outliers {
        Outliers {
            consecutive_5xx,
            consecutive_gateway,
            base_ejection: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            max_ejection_percent: percent,
            min_health_percent: 0,
            split_local: false,
            consecutive_local: 5,
            by: "DestinationRule/ns/d".to_owned(),
        }
    }

    /// Errors in a row eject; an answer that is no error starts the count again; the ejected
    /// address is left out of the attempts, unless every one is out.
    #[test]
    fn errors_in_a_row_eject_an_address_from_the_attempts() {
        let (a, b) = (addr(1), addr(2));
        let of = [a, b];
        let h = Health::default();
        let o = outliers(3, 0, 100);
        assert!(!h.note(1, a, &of, Outcome::Answered(500), &o));
        assert!(!h.note(1, a, &of, Outcome::Failed, &o));
        assert!(
            !h.note(1, a, &of, Outcome::Answered(404), &o),
            "a 4xx is no error"
        );
        assert!(!h.note(1, a, &of, Outcome::Answered(503), &o));
        assert!(!h.note(1, a, &of, Outcome::Answered(503), &o));
        assert_eq!(h.order(1, of.to_vec(), &of, &o), [a, b]);
        assert!(h.note(1, a, &of, Outcome::Answered(503), &o));
        assert_eq!(h.order(1, of.to_vec(), &of, &o), [b]);
        assert_eq!(h.order(2, of.to_vec(), &of, &o), [a, b], "another rule's");
        // The other one too: allowed at 100 %, and then both are tried.
        for _ in 0..3 {
            h.note(1, b, &of, Outcome::Failed, &o);
        }
        assert_eq!(h.order(1, of.to_vec(), &of, &o), [a, b]);
    }

    /// Gateway errors counted apart; at most the share of the addresses out, but one always.
    #[test]
    fn gateway_errors_and_the_share_that_may_be_out() {
        let of: Vec<SocketAddr> = (1..=4).map(addr).collect();
        let h = Health::default();
        let o = outliers(0, 2, 10);
        assert!(!h.note(1, of[0], &of, Outcome::Answered(502), &o));
        assert!(
            !h.note(1, of[0], &of, Outcome::Answered(500), &o),
            "a 500 is no gateway error: the count starts again"
        );
        assert!(!h.note(1, of[0], &of, Outcome::Answered(502), &o));
        assert!(
            h.note(1, of[0], &of, Outcome::Answered(504), &o),
            "one may always be out"
        );
        assert!(!h.note(1, of[1], &of, Outcome::Failed, &o));
        assert!(
            !h.note(1, of[1], &of, Outcome::Failed, &o),
            "10 % of 4: no second one"
        );
        assert_eq!(h.order(1, of.clone(), &of, &o), of[1..]);
        // Below the panic threshold (`minHealthPercent`) none is left out: 3 of 4 is 75 %.
        let panicky = Outliers {
            min_health_percent: 80,
            ..o.clone()
        };
        assert_eq!(h.order(1, of.clone(), &of, &panicky), of);
        let calm = Outliers {
            min_health_percent: 75,
            ..o
        };
        assert_eq!(h.order(1, of.clone(), &of, &calm), of[1..]);
    }

    /// With failures of the relay's own counted apart, they eject by their own count, and an
    /// upstream's 5xx by its: neither ends or adds to the other's run; a connection made ends
    /// the relay's.
    #[test]
    fn failures_of_the_relays_own_counted_apart() {
        let (a, b) = (addr(1), addr(2));
        let of = [a, b];
        let h = Health::default();
        let o = Outliers {
            split_local: true,
            consecutive_local: 2,
            ..outliers(2, 0, 100)
        };
        assert!(!h.note(1, a, &of, Outcome::Failed, &o));
        assert!(!h.note(1, a, &of, Outcome::Answered(503), &o));
        assert!(
            !h.note(1, a, &of, Outcome::Connected, &o),
            "a connection made ends the relay's run"
        );
        assert!(!h.note(1, a, &of, Outcome::Failed, &o));
        assert!(
            h.note(1, a, &of, Outcome::Answered(500), &o),
            "the second 5xx in a row, a failure between them"
        );
        assert!(!h.note(1, b, &of, Outcome::Failed, &o));
        assert!(
            h.note(1, b, &of, Outcome::Failed, &o),
            "two of the relay's own"
        );
        // Lumped together, as by default: a failure is a 5xx.
        let lumped = outliers(2, 0, 100);
        let h = Health::default();
        assert!(!h.note(1, a, &of, Outcome::Failed, &lumped));
        assert!(h.note(1, a, &of, Outcome::Answered(503), &lumped));
    }

    /// Each interval back in forgets one ejection, so the next is shorter again; an address the
    /// host no longer has is forgotten once it is back in.
    #[test]
    fn ejections_are_forgotten_as_intervals_pass_and_gone_addresses_with_them() {
        let (a, b, c) = (addr(1), addr(2), addr(3));
        let of = [a, b];
        let h = Health::default();
        let o = outliers(1, 0, 100);
        let t0 = std::time::Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let out_until = |addr| {
            h.lock()
                .get(&(1, addr))
                .and_then(|r| r.out_until)
                .map(|u| u.duration_since(t0).as_secs())
        };
        assert!(h.note_at(at(0), 1, a, &of, Outcome::Failed, &o));
        assert_eq!(out_until(a), Some(30), "30 s the first time");
        assert!(h.note_at(at(30), 1, a, &of, Outcome::Failed, &o));
        assert_eq!(out_until(a), Some(90), "twice the base the second");
        // Back in at 90; 10 s later one ejection is forgotten: the next lasts the base once more.
        assert!(h.note_at(at(105), 1, a, &of, Outcome::Failed, &o));
        assert_eq!(out_until(a), Some(105 + 60));
        // Back in at 165; three intervals forget all: the next lasts the base.
        assert!(h.note_at(at(200), 1, a, &of, Outcome::Failed, &o));
        assert_eq!(out_until(a), Some(230));

        // `c` fails once and leaves the host's addresses (a DNS answer changed): forgotten at the
        // next attempt at another address. `b` stays while it is out.
        let o = outliers(2, 0, 100);
        let all = [a, b, c];
        assert!(!h.note_at(at(300), 1, c, &all, Outcome::Failed, &o));
        assert!(!h.note_at(at(300), 1, b, &all, Outcome::Failed, &o));
        assert!(h.note_at(at(300), 1, b, &all, Outcome::Failed, &o));
        assert!(!h.note_at(at(301), 1, a, &[a], Outcome::Answered(200), &o));
        assert!(h.lock().get(&(1, c)).is_none(), "c forgotten");
        assert!(h.lock().get(&(1, b)).is_some(), "b kept while out");
        assert!(!h.note_at(at(400), 1, a, &[a], Outcome::Answered(200), &o));
        assert!(h.lock().is_empty(), "b forgotten once back in");
    }
}
