//! What the agent counts, and the Prometheus endpoint that serves it. The counters are
//! prometheus-client's own, shared (cheap clones) between the registry and the code that counts.
use std::sync::Arc;

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::events::{Name, Record, Word};

// Label values are the records' own words and shared names: counting a record allocates nothing
// but a label set seen for the first time.

/// Hashes a label set as one word: its fields through foldhash, then that word through the
/// family's SipHash (prometheus-client's map takes no other hasher). SipHash over each name
/// cost more than the rest of counting a record. Equal sets give equal words, as `Hash` needs.
macro_rules! hash_as_one_word {
    ($labels:ty: $($field:ident),+) => {
        impl std::hash::Hash for $labels {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                use std::hash::BuildHasher as _;
                state.write_u64(foldhash::fast::FixedState::default().hash_one(($(&self.$field),+)));
            }
        }
    };
}

hash_as_one_word!(DecisionLabels: verdict, host, rule);
hash_as_one_word!(BytesLabels: host, direction);
hash_as_one_word!(RelayLabels: outcome, host);

#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: Option<Word>,
    /// Empty when the destination belongs to no registered host.
    pub host: Option<Name>,
    /// Empty when no rule decided (the mode, loopback or a resolver did).
    pub rule: Option<Name>,
}

impl DecisionLabels {
    fn of(r: &Record) -> DecisionLabels {
        DecisionLabels {
            verdict: r.verdict.clone(),
            host: r.host.clone(),
            rule: r.rule.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub host: Option<Name>,
    /// `out` (sent) or `in` (received).
    pub direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// The relay record's outcome: `ok`, `refused`, `upstream-failed`, ….
    pub outcome: Option<Word>,
    pub host: Option<Name>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The record's reason: `packet-qdisc-bypass`, `af-xdp`.
    pub reason: Option<Word>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// `answered` (whatever the status), `failed` (no answer: connect, TLS, reset, time) or
    /// `refused` (nowhere to send it: no ServiceEntry, no address, no valid server name).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which limit refused a connection: `workload`, `relay` or `destination`; or a request:
    /// `pending` (waiting for an upstream connection) or `requests` (in progress); or a retry
    /// not made: `retries`.
    pub limit: &'static str,
}

/// Counters others can watch: tests poll them, `/metrics` serves them.
#[derive(Debug, Default)]
pub struct Status {
    pub dns_refreshes: Counter,
    pub dns_failures: Counter,
    pub syncs: Counter,
    pub entries: Gauge,
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub connections: Family<DecisionLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub relayed: Family<RelayLabels, Counter>,
    pub sockopts_refused: Family<ReasonLabels, Counter>,
    pub events: Counter,
    pub events_lost: Counter,
    pub flows_untracked: Counter,
    pub flows_open: Gauge,
    pub log_errors: Counter,
    pub log_writer_lifted: Counter,
    pub log_writer_yielding: Gauge,
    pub relay_namespaces: Gauge,
    pub relay_namespaces_wanted: Counter,
    pub relay_namespace_hints: Counter,
    pub relay_namespace_failures: Counter,
    pub relay_open: Gauge,
    pub relay_over_limit: Family<LimitLabels, Counter>,
    pub relay_mirrored: Family<MirrorLabels, Counter>,
    pub origination_opened: Counter,
    pub origination_reused: Counter,
    pub origination_waits: Counter,
}

impl Status {
    /// Counts a mirrored copy of a request by its `outcome`.
    pub fn mirrored(&self, outcome: &'static str) {
        self.relay_mirrored
            .get_or_create(&MirrorLabels { outcome })
            .inc();
    }

    /// Counts a connection or request refused at `limit`, or a retry not made (`retries`).
    pub fn over_limit(&self, limit: &'static str) {
        self.relay_over_limit
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Counts what a record reports.
    pub fn observe(&self, r: &Record) {
        self.events.inc();
        match &*r.kind {
            "connect" | "sendmsg" | "packet" => {
                self.connections.get_or_create(&DecisionLabels::of(r)).inc();
            }
            "close" => {
                // The flow's first connect was counted from its own record; reconnects only here.
                if let Some(again) = r.connects.and_then(|n| n.checked_sub(1)).filter(|&n| n > 0) {
                    self.connections
                        .get_or_create(&DecisionLabels::of(r))
                        .inc_by(again);
                }
                self.count_bytes(r, r.bytes_out, r.bytes_in);
            }
            "relay" => {
                self.relayed
                    .get_or_create(&RelayLabels {
                        outcome: r.outcome.clone(),
                        host: r.host.clone(),
                    })
                    .inc();
                self.count_bytes(r, r.bytes_up, r.bytes_down);
            }
            "sockopt" => {
                self.sockopts_refused
                    .get_or_create(&ReasonLabels {
                        reason: r.reason.clone(),
                    })
                    .inc();
            }
            // `events_lost` follows the kernel's counter directly (see events::pipeline).
            _ => {}
        }
    }

    fn count_bytes(&self, r: &Record, out: Option<u64>, into: Option<u64>) {
        for (direction, n) in [("out", out), ("in", into)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    host: r.host.clone(),
                    direction,
                })
                .inc_by(n.unwrap_or(0));
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("egress");
        r.register(
            "connections",
            "Decisions on connections and packets, by verdict, host and rule",
            self.connections.clone(),
        );
        r.register(
            "sockopts_refused",
            "Socket options refused to the enforced cgroup, by reason: each a way past the packet \
             backstop",
            self.sockopts_refused.clone(),
        );
        r.register(
            "bytes",
            "Payload bytes of ended flows and relayed connections, by host and direction",
            self.bytes.clone(),
        );
        r.register(
            "relay_namespaces",
            "Network namespaces the relay listens in (the agent's own included)",
            self.relay_namespaces.clone(),
        );
        r.register(
            "relay_namespaces_wanted",
            "Network namespaces the relay started serving because a steered connect waited there \
             (the others were found by its scan of the cgroup)",
            self.relay_namespaces_wanted.clone(),
        );
        r.register(
            "relay_namespace_hints",
            "Steered connects that waited in a network namespace the relay did not serve (the \
             kernel's hints)",
            self.relay_namespace_hints.clone(),
        );
        r.register(
            "relay_namespace_failures",
            "Attempts to serve a network namespace that failed: its steered connections wait, then \
             fail",
            self.relay_namespace_failures.clone(),
        );
        r.register(
            "relay_connections",
            "Steered connections the relay handled, by outcome and host",
            self.relayed.clone(),
        );
        r.register(
            "relay_connections_open",
            "Steered connections the relay holds now, from accept to their record",
            self.relay_open.clone(),
        );
        r.register(
            "relay_connections_over_limit",
            "Steered connections refused at a limit: their workload's (--relay-max-per-workload), \
             the relay's (--relay-max-connections) or their destination's (a DestinationRule's \
             connectionPool.tcp.maxConnections); and requests refused where as many already wait \
             for an upstream connection (connectionPool.http.http1MaxPendingRequests), or are \
             in progress (connectionPool.http.http2MaxRequests), as their DestinationRule allows; \
             and retries not made where as many are in progress as it allows \
             (connectionPool.http.maxRetries)",
            self.relay_over_limit.clone(),
        );
        r.register(
            "relay_mirrored_requests",
            "Copies of requests sent to a route's mirror (a VirtualService's mirror or mirrors), \
             by outcome; their answers are dropped",
            self.relay_mirrored.clone(),
        );
        r.register(
            "relay_origination_upstreams_opened",
            "TLS connections TLS origination opened upstream",
            self.origination_opened.clone(),
        );
        r.register(
            "relay_origination_upstreams_reused",
            "Requests TLS origination sent on an upstream connection an earlier request opened, \
             of the same client connection or another",
            self.origination_reused.clone(),
        );
        r.register(
            "relay_origination_upstream_waits",
            "Requests that waited for an upstream connection, their host's connections all taken \
             (a DestinationRule's connectionPool.tcp.maxConnections)",
            self.origination_waits.clone(),
        );
        r.register(
            "events",
            "Flow events, from the kernel and the relay",
            self.events.clone(),
        );
        r.register(
            "events_lost",
            "Flow events the kernel could not write (ring buffer full)",
            self.events_lost.clone(),
        );
        r.register(
            "flows_open",
            "Flows in the kernel's flow table (its size is --flow-table)",
            self.flows_open.clone(),
        );
        r.register(
            "flows_untracked",
            "Flows the kernel's flow table had no room for: a connect record each, no close",
            self.flows_untracked.clone(),
        );
        r.register(
            "log_writer_lifted",
            "Times the flow-log writer, yielding the CPU while traffic was light, found no CPU \
             time with records waiting and was lifted back to its normal priority",
            self.log_writer_lifted.clone(),
        );
        r.register(
            "log_writer_yielding",
            "1 while the flow-log writer yields the CPU to every other thread (SCHED_IDLE), as it \
             does while traffic is light",
            self.log_writer_yielding.clone(),
        );
        r.register(
            "log_write_errors",
            "Flow events that could not be written to the log file",
            self.log_errors.clone(),
        );
        r.register(
            "policy_map_entries",
            "Entries in the kernel policy map",
            self.entries.clone(),
        );
        r.register(
            "policy_map_syncs",
            "Updates of the kernel policy map",
            self.syncs.clone(),
        );
        r.register(
            "dns_refresh_successes",
            "Hostname resolutions that succeeded",
            self.dns_refreshes.clone(),
        );
        r.register(
            "dns_refresh_failures",
            "Hostname resolutions that failed (last good addresses kept)",
            self.dns_failures.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads applied",
            self.reloads.clone(),
        );
        r.register(
            "policy_reload_failures",
            "Policy reloads refused (the policy in force stayed)",
            self.reload_failures.clone(),
        );
        r
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub fn serve(listener: TcpListener, status: &Status) -> JoinHandle<()> {
    let registry = Arc::new(status.registry());
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    log::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let service = service_fn(move |req| respond(req, Arc::clone(&registry)));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    log::debug!("metrics connection: {e}");
                }
            });
        }
    })
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let response = |status, content_type, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "egress serves /metrics\n".to_owned(),
        ));
    }
    let mut body = String::new();
    Ok(match encode(&mut body, &registry) {
        Ok(()) => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        ),
        Err(e) => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics: {e}\n"),
        ),
    })
}
