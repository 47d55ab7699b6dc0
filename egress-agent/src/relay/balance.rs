//! Load balancing (a DestinationRule's `loadBalancer`: `simple`, or `consistentHash`): which of a
//! host's addresses a steered connection's first attempt goes to, or a request's where the relay
//! serves HTTP. The attempts after it take the host's other addresses in turn, as retries do
//! without it.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher as _},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::policy::compile::Balancing;

/// The turns of round robin, by rule and port, and the attempts in progress at each address, by
/// rule, for the least request.
#[derive(Default)]
pub(super) struct Balancer {
    turns: Mutex<HashMap<(u32, u16), usize>>,
    in_flight: Arc<Mutex<HashMap<(u32, SocketAddr), usize>>>,
}

/// An attempt in progress at an address, counted until dropped.
pub(super) struct InFlight {
    of: Arc<Mutex<HashMap<(u32, SocketAddr), usize>>>,
    key: (u32, SocketAddr),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut of = lock(&self.of);
        if let Some(n) = of.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                of.remove(&self.key);
            }
        }
    }
}

/// A hash that stays the same for the same value for the agent's life, and across its restarts
/// on one build (SipHash with fixed keys), so that a key keeps its address.
pub(super) fn hash<T: Hash>(value: &T) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Balancer {
    /// `targets` (the address the workload dialled, then the host's others on its port) in the
    /// order the attempts take them under `policy`; `key`: the connection's or request's hash,
    /// for `Balancing::Hash`.
    pub(super) fn order(
        &self,
        rule: u32,
        policy: Balancing,
        key: Option<u64>,
        mut targets: Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        let n = targets.len();
        match policy {
            Balancing::Dialled => return targets,
            Balancing::Passthrough => {
                targets.truncate(1);
                return targets;
            }
            _ if n < 2 => return targets,
            _ => {}
        }
        // One order of the host's addresses, whichever of them the workload dialled.
        targets.sort_unstable();
        let first = match policy {
            Balancing::RoundRobin => {
                let mut turns = lock(&self.turns);
                let turn = turns.entry((rule, targets[0].port())).or_default();
                let first = *turn % n;
                *turn = turn.wrapping_add(1);
                first
            }
            Balancing::Random => rand::random_range(0..n),
            // Rendezvous hashing: the address whose hash with the key is highest, which stays
            // the key's while it stays among the host's (Envoy's ring hash keeps the same
            // promise). Without a key, as Envoy's ring hash without one: any.
            Balancing::Hash => match key {
                Some(key) => (0..n)
                    .max_by_key(|&i| hash(&(key, targets[i])))
                    .unwrap_or(0),
                None => rand::random_range(0..n),
            },
            // Envoy's choice of two: the one with fewer in progress of two drawn at random.
            _ => {
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let in_flight = lock(&self.in_flight);
                let count = |i: usize| in_flight.get(&(rule, targets[i])).copied().unwrap_or(0);
                if count(b) < count(a) { b } else { a }
            }
        };
        targets.rotate_left(first);
        targets
    }

    /// Counts an attempt at `addr` in progress until the guard is dropped, where `policy` needs
    /// it (the least request).
    pub(super) fn start(&self, rule: u32, policy: Balancing, addr: SocketAddr) -> Option<InFlight> {
        if policy != Balancing::LeastRequest {
            return None;
        }
        *lock(&self.in_flight).entry((rule, addr)).or_default() += 1;
        Some(InFlight {
            of: Arc::clone(&self.in_flight),
            key: (rule, addr),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::Balancer;
    use crate::policy::compile::Balancing;

    fn addrs(hosts: &[u8]) -> Vec<SocketAddr> {
        hosts
            .iter()
            .map(|h| SocketAddr::from(([192, 0, 2, *h], 443)))
            .collect()
    }

    /// Round robin takes the host's addresses in turn, whichever was dialled; each attempt after
    /// the first takes the next.
    #[test]
    fn round_robin_takes_each_address_in_turn() {
        let b = Balancer::default();
        let firsts: Vec<SocketAddr> = (0..6)
            .map(|i| {
                let dialled = if i % 2 == 0 { [3, 1, 2] } else { [1, 2, 3] };
                b.order(1, Balancing::RoundRobin, None, addrs(&dialled))[0]
            })
            .collect();
        assert_eq!(firsts, addrs(&[1, 2, 3, 1, 2, 3]));
        assert_eq!(
            b.order(1, Balancing::RoundRobin, None, addrs(&[2, 1, 3])),
            addrs(&[1, 2, 3]),
            "the rest follow in turn"
        );
        assert_eq!(
            b.order(2, Balancing::RoundRobin, None, addrs(&[2, 1, 3]))[0],
            addrs(&[1])[0],
            "another rule's turns are its own"
        );
    }

    /// The dialled address alone for passthrough; first, and the rest as they were, unbalanced.
    #[test]
    fn passthrough_keeps_the_dialled_address_alone() {
        let b = Balancer::default();
        assert_eq!(
            b.order(1, Balancing::Passthrough, None, addrs(&[3, 1, 2])),
            addrs(&[3])
        );
        assert_eq!(
            b.order(1, Balancing::Dialled, None, addrs(&[3, 1, 2])),
            addrs(&[3, 1, 2])
        );
    }

    /// Random draws each address first at times; the others follow in turn after it.
    #[test]
    fn random_draws_the_first_and_the_rest_follow_in_turn() {
        let b = Balancer::default();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..300 {
            let order = b.order(1, Balancing::Random, None, addrs(&[3, 1, 2]));
            let at = addrs(&[1, 2, 3])
                .iter()
                .position(|a| *a == order[0])
                .expect("one of them");
            let mut expected = addrs(&[1, 2, 3]);
            expected.rotate_left(at);
            assert_eq!(order, expected);
            firsts.insert(order[0]);
        }
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }

    /// A hash takes the same address first for the same key, whichever was dialled, and keeps
    /// it while it stays among the host's; other keys take the others too.
    #[test]
    fn a_hash_takes_the_same_address_for_the_same_key() {
        let b = Balancer::default();
        let mut firsts = std::collections::HashSet::new();
        for key in 0..64u64 {
            let first = b.order(1, Balancing::Hash, Some(key), addrs(&[3, 1, 2]))[0];
            let again = b.order(1, Balancing::Hash, Some(key), addrs(&[2, 3, 1]));
            assert_eq!(again[0], first, "key {key}");
            // An address gone that was not the key's leaves the key where it was.
            let rest: Vec<SocketAddr> = addrs(&[1, 2, 3])
                .into_iter()
                .filter(|a| *a == first || a.ip() != addrs(&[2])[0].ip())
                .collect();
            assert_eq!(b.order(1, Balancing::Hash, Some(key), rest)[0], first);
            firsts.insert(first);
        }
        assert_eq!(firsts.len(), 3, "{firsts:?}");
        // Without a key: any, as Envoy's ring hash without one.
        let keyless: std::collections::HashSet<SocketAddr> = (0..200)
            .map(|_| b.order(1, Balancing::Hash, None, addrs(&[1, 2]))[0])
            .collect();
        assert_eq!(keyless.len(), 2);
    }

    /// Of two addresses, the least request takes the one with nothing in progress while the
    /// other has; once that is done, both again.
    #[test]
    fn least_request_takes_the_address_with_fewer_in_progress() {
        let b = Balancer::default();
        let [one, two] = addrs(&[1, 2])[..] else {
            unreachable!()
        };
        let busy = b.start(1, Balancing::LeastRequest, one);
        assert!(b.start(1, Balancing::RoundRobin, one).is_none());
        for _ in 0..20 {
            assert_eq!(
                b.order(1, Balancing::LeastRequest, None, vec![one, two]),
                [two, one]
            );
        }
        drop(busy);
        let firsts: Vec<SocketAddr> = (0..200)
            .map(|_| b.order(1, Balancing::LeastRequest, None, vec![one, two])[0])
            .collect();
        assert!(firsts.contains(&one) && firsts.contains(&two), "{firsts:?}");
        assert!(b.in_flight.lock().expect("lock").is_empty());
    }
}
