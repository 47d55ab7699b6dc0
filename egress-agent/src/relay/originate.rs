//! Steered HTTP ports: the application speaks plain HTTP/1.1 to the relay, which checks each
//! request's host against the kernel's record of the connection and sends the request on, with
//! the VirtualService's retries and timeout per request: over TLS it originates and verifies
//! (Istio's "egress TLS origination"), or as plain HTTP (an egress gateway for HTTP).
use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use egress_common::Steered;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri,
    header::{self, HeaderName},
};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    body::{Body as _, Bytes, Incoming},
    client::conn::http1::SendRequest,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, timeout},
};
use tokio_rustls::TlsConnector;

use super::{
    Activity, Attempts, Choice, Leave, Next, Shared,
    balance::{Balancer, InFlight},
    connect_own,
    health::{Health, Outcome},
    refuse, within,
};
use crate::{
    events::{Catalog, Name, Record, Word, draw},
    metrics::Status,
    policy::{
        compile::{
            Abort, Balancing, ConnectionPool, HashOn, HeaderOps, LocalAnswer, MILLION, Origination,
            Outliers, RelayRoute, RequestMatch, RequestRoute, RouteTo,
        },
        tls::TlsClient,
    },
};

type Body = BoxBody<Bytes, hyper::Error>;

/// The route a request took, and the match of it the request met (none: the route has none).
type Chosen<'a> = (&'a RequestRoute, Option<&'a RequestMatch>);

/// How long a mirrored copy may take where its route sets no timeout.
const MIRROR_LIMIT: Duration = Duration::from_secs(15);

/// Request bodies up to this size are kept so that a retry can send them again; a larger (or
/// chunked) body is streamed and its request is tried once.
const REPLAY_LIMIT: u64 = 1 << 20;

/// Serves one steered plain-HTTP connection until the client is done, and returns its record.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's parts, each once"
)]
pub(super) async fn serve(
    client: TcpStream,
    steered: &Steered,
    leave: Leave,
    origin: Origination,
    catalog: Arc<Catalog>,
    mut record: Record,
    shared: &Shared,
    timeouts: super::Timeouts,
    pool: Option<&ConnectionPool>,
    h2: bool,
) -> Record {
    record.origination = origin.tls.as_ref().map(|t| Word::Borrowed(t.mode));
    let activity = Arc::new(Activity::new());
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let io = Counted {
        io: client,
        up: Arc::clone(&up),
        down: Arc::clone(&down),
        activity: Arc::clone(&activity),
    };
    let dst = super::dst_of(steered);
    let connect_timeout = shared.config.connect_timeout;
    let dialled = Dest::new(&catalog, steered.rule_id, origin, pool, connect_timeout, h2);
    let state = Arc::new(State {
        dst,
        rule_id: steered.rule_id,
        requests: catalog.requests(steered.rule_id, dst.port()),
        leave,
        catalog,
        dialled,
        client_h2: h2,
        connect_timeout: shared.config.connect_timeout,
        health: Arc::clone(&shared.health),
        balancer: Arc::clone(&shared.balancer),
        stats: Mutex::new(Stats::default()),
        pool: Arc::clone(&shared.pool),
        status: Arc::clone(&shared.status),
    });
    let service = {
        let state = Arc::clone(&state);
        service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(state.request(req).await) }
        })
    };
    let conn: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> = if h2 {
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new());
        Box::pin(http.serve_connection(TokioIo::new(io), service))
    } else {
        let mut http = hyper::server::conn::http1::Builder::new();
        // A client may half-close once its request is sent (`nc -N`, scripts): it still waits
        // for the answer.
        http.timer(TokioTimer::new())
            .half_close(true)
            .header_read_timeout(shared.config.hello_timeout);
        Box::pin(http.serve_connection(TokioIo::new(io), service))
    };
    let ended = tokio::select! {
        done = conn => match done {
            // The header timeout also ends a kept-alive connection that waits for its next
            // request: after a request, that is a normal end.
            Err(e) if e.is_timeout() && state.stats().requests > 0 => Ok(()),
            done => done.map_err(|e| Failed::Http(e.to_string())),
        },
        () = activity.quiet(timeouts.idle) => Err(Failed::Idle),
    };

    record.bytes_up = Some(up.load(Ordering::Relaxed));
    record.bytes_down = Some(down.load(Ordering::Relaxed));
    let stats = std::mem::take(&mut *state.stats.lock().unwrap_or_else(|e| e.into_inner()));
    record.requests = Some(stats.requests);
    record.status = stats.status;
    record.attempts = Some(stats.attempts);
    record.upstream = stats.upstream;
    record.sni = stats.sni;
    if stats.host.is_some() {
        record.host = stats.host;
    }
    record.upstream_host = stats.upstream_host;
    match (stats.failure, ended) {
        (Some((outcome, reason)), _) => refuse(record, outcome, reason),
        // As a passthrough connection without a ClientHello is (a port check, mostly).
        (None, Ok(())) if stats.requests == 0 => refuse(
            record,
            "refused",
            "connection closed before a request".to_owned(),
        ),
        (None, Ok(())) => {
            record.ended("ok", None);
            record
        }
        (None, Err(Failed::Idle)) => {
            record.ended("idle-timeout", None);
            record
        }
        (None, Err(Failed::Http(e))) if stats.requests == 0 => refuse(record, "refused", e),
        (None, Err(Failed::Http(e))) => {
            record.ended("error", Some(e));
            record
        }
    }
}

/// Why the connection ended early.
enum Failed {
    Idle,
    Http(String),
}

/// What the connection's record reports.
#[derive(Default)]
struct Stats {
    requests: u64,
    attempts: u32,
    /// Of the last answer to the client.
    status: Option<u16>,
    upstream: Option<SocketAddr>,
    sni: Option<String>,
    host: Option<Name>,
    /// The host a route sent the last request to, where not the one dialled.
    upstream_host: Option<Name>,
    /// The first request that failed: outcome and reason.
    failure: Option<(&'static str, String)>,
}

struct State {
    dst: SocketAddr,
    rule_id: u32,
    /// The VirtualService's routes each request is matched against, if the port has them.
    requests: Option<Arc<[RequestRoute]>>,
    /// Where upstream connections leave from (see `connect_own`).
    leave: Leave,
    /// The policy as it was when the connection arrived.
    catalog: Arc<Catalog>,
    /// Where requests go on to unless a route sends them elsewhere: the host and port dialled.
    dialled: Dest,
    /// The client speaks HTTP/2.
    client_h2: bool,
    /// Of an upstream connect where no DestinationRule says.
    connect_timeout: Duration,
    health: Arc<Health>,
    balancer: Arc<Balancer>,
    stats: Mutex<Stats>,
    /// Where an upstream connection goes once an answer has been read whole, for the next
    /// request of this client or another.
    pool: Arc<Pool>,
    status: Arc<Status>,
}

/// Where requests go on to, with what the DestinationRule there asks for: the host and port
/// dialled, or another that a route sends a request to.
struct Dest {
    rule_id: u32,
    origin: Origination,
    connect_timeout: Duration,
    /// How long an upstream connection is kept with no request (`http.idleTimeout`).
    kept_idle: Duration,
    /// Requests sent on one upstream connection at most (`http.maxRequestsPerConnection`).
    max_requests: Option<u32>,
    /// How long one upstream connection is used (`tcp.maxConnectionDuration`).
    max_age: Option<Duration>,
    /// Upstream connections to the host and port at once, from the node
    /// (`tcp.maxConnections`): a request that would open one more waits for one.
    max_connections: Option<u32>,
    /// Requests that may wait so at once (`http.http1MaxPendingRequests`), and the
    /// DestinationRule that says so.
    max_pending: Option<(u32, String)>,
    /// Requests to the host and port in progress at once, from the node
    /// (`http.http2MaxRequests`), and the DestinationRule that says so.
    max_active: Option<(u32, String)>,
    /// Retries to the host and port in progress at once, from the node (`http.maxRetries`),
    /// and the DestinationRule that says so.
    max_retries: Option<(u32, String)>,
    /// The DestinationRule's outlier detection for the port.
    outliers: Option<Outliers>,
    balancing: Balancing,
    /// What the balancing hashes, where it does.
    hash_on: Option<HashOn>,
    /// Requests in progress on one HTTP/2 upstream connection at most
    /// (`http.maxConcurrentStreams`); more open another.
    max_streams: Option<u32>,
    /// Requests go on as HTTP/2: the client speaks it, or the DestinationRule upgrades HTTP/1.1
    /// (`h2UpgradePolicy: UPGRADE`).
    h2: bool,
}

impl Dest {
    /// Requests to `origin`'s port of rule `rule_id`'s host, under `pool` (the DestinationRule's
    /// `connectionPool` there), `connect_timeout` where it sets none; `client_h2`: the client
    /// speaks HTTP/2.
    fn new(
        catalog: &Catalog,
        rule_id: u32,
        origin: Origination,
        pool: Option<&ConnectionPool>,
        connect_timeout: Duration,
        client_h2: bool,
    ) -> Dest {
        let port = origin.port;
        Dest {
            rule_id,
            connect_timeout: pool
                .and_then(|p| p.connect_timeout)
                .unwrap_or(connect_timeout),
            kept_idle: pool.and_then(|p| p.http_idle_timeout).unwrap_or(POOL_IDLE),
            max_requests: pool.and_then(|p| p.max_requests_per_connection),
            max_age: pool.and_then(|p| p.max_connection_duration),
            max_connections: pool.and_then(|p| p.max_connections),
            // The client's HTTP/2 goes on as HTTP/2; HTTP/1.1 too where the DestinationRule
            // upgrades it.
            h2: client_h2 || pool.is_some_and(|p| p.h2_upgrade),
            max_pending: pool.and_then(|p| Some((p.max_pending_requests?, p.by.clone()))),
            max_active: pool.and_then(|p| Some((p.max_active_requests?, p.by.clone()))),
            max_retries: pool.and_then(|p| Some((p.max_retries?, p.by.clone()))),
            max_streams: pool.and_then(|p| p.max_concurrent_streams),
            outliers: catalog.outliers(rule_id, port).cloned(),
            balancing: catalog.balancing(rule_id, port),
            hash_on: catalog.hash_on(rule_id, port).cloned(),
            origin,
        }
    }
}

/// An upstream connection: what sends requests on it, and its I/O task, which ends with it.
struct Upstream {
    sender: SendRequest<Body>,
    task: tokio::task::AbortHandle,
    /// Requests sent on it.
    sent: u32,
    opened: Instant,
    /// Its place among the host's connections, where they are limited; given up with it.
    slot: Option<Slot>,
}

/// An HTTP/2 upstream connection, which carries requests side by side, of any client.
struct Upstream2 {
    sender: hyper::client::conn::http2::SendRequest<Body>,
    task: tokio::task::AbortHandle,
    /// The requests in progress on it (`Stream`).
    streams: Arc<AtomicU32>,
    /// Its place among the host's connections, where they are limited; given up with it.
    slot: Option<Slot>,
}

/// A request in progress on an HTTP/2 connection, counted until its answer has been read whole
/// or dropped; then a request waiting for room on the host's connections (`of`, where they
/// are limited) is told.
struct Stream {
    streams: Arc<AtomicU32>,
    of: Option<Arc<Slots>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        if let Some(of) = &self.of {
            of.freed.notify_waiters();
        }
    }
}

impl Drop for Upstream2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // An upstream that never answers would otherwise hold the task and its socket.
        self.task.abort();
    }
}

/// What makes upstream connections interchangeable: where they leave from (network namespace,
/// interface), where they go (address) and the TLS they were opened with, if any (server name,
/// CA, client certificate). Any request that may use one would open the same.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    netns: u64,
    bound_if: u32,
    target: SocketAddr,
    tls: Option<(ServerName<'static>, TlsClient)>,
}

/// Upstream connections of TLS origination kept between client connections (Envoy keeps its
/// upstream connections in a pool too): a client that opens a connection per request, as many
/// do, should not cost the upstream a TLS handshake each time.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Kept>>>,
    /// HTTP/2 connections, one per key, shared by the requests that would open the same.
    h2: Mutex<HashMap<PoolKey, Vec<Upstream2>>>,
    /// The limited hosts' connections (`tcp.maxConnections`), by rule, host and port.
    limits: Limits,
    /// The limited hosts' requests in progress (`http.http2MaxRequests`), so.
    active: Limits,
    /// The limited hosts' retries in progress (`http.maxRetries`), so.
    retries: Limits,
}

type Limits = Mutex<HashMap<(u32, Name, u16), Arc<Slots>>>;

/// The places of `host`'s port `port` under rule `rule` in `limits`, `max` of them.
fn places(limits: &Limits, rule: u32, host: &Name, port: u16, max: u32) -> Arc<Slots> {
    let mut limits = limits.lock().unwrap_or_else(|e| e.into_inner());
    // Those nothing holds any more, of hosts or limits gone.
    limits.retain(|_, s| Arc::strong_count(s) > 1);
    let slots = limits
        .entry((rule, Name::clone(host), port))
        .or_insert_with(|| Slots::new(max));
    if slots.max != max {
        *slots = Slots::new(max);
    }
    Arc::clone(slots)
}

/// The places for connections (or requests) to one host and port where a DestinationRule limits
/// them.
pub(super) struct Slots {
    places: Arc<tokio::sync::Semaphore>,
    /// How many there are: a reload that changes the limit starts anew.
    max: u32,
    /// Told when a connection is given up or comes back to the pool: a request waiting for a
    /// place may find one.
    freed: tokio::sync::Notify,
    /// Requests waiting so.
    waiting: std::sync::atomic::AtomicU32,
}

/// A request counted among those waiting for a place, until dropped.
struct Waiting<'a>(&'a Slots);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place taken: an open connection to a limited host.
struct Slot {
    place: Option<tokio::sync::OwnedSemaphorePermit>,
    of: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Given back before the waiters are told, or one could look too soon and wait on.
        drop(self.place.take());
        self.of.freed.notify_waiters();
    }
}

/// An idle upstream connection: since when, and for how long it may be taken.
struct Kept {
    upstream: Upstream,
    since: Instant,
    idle: Duration,
}

impl Kept {
    fn usable(&self) -> bool {
        !self.upstream.sender.is_closed() && self.since.elapsed() < self.idle
    }
}

/// Idle connections kept per key.
const POOL_PER_KEY: usize = 8;
/// How long a connection is kept idle unless a DestinationRule says (`http.idleTimeout`). Servers
/// close idle connections themselves, most within a minute; a connection they closed is not
/// taken.
const POOL_IDLE: Duration = Duration::from_secs(60);

impl Pool {
    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Kept>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection places of `host`'s port `port` under rule `rule`, `max` of them.
    fn slots(&self, rule: u32, host: &Name, port: u16, max: u32) -> Arc<Slots> {
        places(&self.limits, rule, host, port, max)
    }

    /// The request places of `host`'s port `port` under rule `rule`, `max` of them.
    fn active(&self, rule: u32, host: &Name, port: u16, max: u32) -> Arc<Slots> {
        places(&self.active, rule, host, port, max)
    }

    /// The retry places of `host`'s port `port` under rule `rule`, `max` of them.
    fn retries(&self, rule: u32, host: &Name, port: u16, max: u32) -> Arc<Slots> {
        places(&self.retries, rule, host, port, max)
    }

    /// Closes one idle connection that holds a place of `slots`, if there is one: a request
    /// that needs a connection another key's idle one holds the place of takes its place.
    fn evict(&self, slots: &Arc<Slots>) -> bool {
        let mut idle = self.idle();
        let holds = |k: &Kept| {
            k.upstream
                .slot
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(&s.of, slots))
        };
        let found = idle.iter_mut().find_map(|(key, kept)| {
            let at = kept.iter().position(holds)?;
            Some((key.clone(), kept.remove(at)))
        });
        match found {
            Some((key, evicted)) => {
                if idle.get(&key).is_some_and(Vec::is_empty) {
                    idle.remove(&key);
                }
                drop(idle);
                drop(evicted);
                true
            }
            None => {
                drop(idle);
                self.evict_h2(slots)
            }
        }
    }

    /// Closes an HTTP/2 connection that holds one of `slots` and carries nothing, if there is
    /// one, as `evict` closes an idle HTTP/1.1 one.
    fn evict_h2(&self, slots: &Arc<Slots>) -> bool {
        let mut shared = self.shared();
        let idle = |u: &Upstream2| {
            u.streams.load(Ordering::Relaxed) == 0
                && (u.slot.as_ref()).is_some_and(|s| Arc::ptr_eq(&s.of, slots))
        };
        let found = shared.values_mut().find_map(|open| {
            let at = open.iter().position(idle)?;
            Some(open.remove(at))
        });
        shared.retain(|_, open| !open.is_empty());
        drop(shared);
        found.is_some()
    }

    /// The connection used last for `key`, if one is open.
    fn take(&self, key: &PoolKey) -> Option<Upstream> {
        let mut idle = self.idle();
        let kept = idle.get_mut(key)?;
        let found = std::iter::from_fn(|| kept.pop()).find(Kept::usable);
        if kept.is_empty() {
            idle.remove(key);
        }
        found.map(|k| k.upstream)
    }

    /// Keeps `upstream` for the next request that would open the same, for `for_up_to`.
    fn put(&self, key: PoolKey, upstream: Upstream, for_up_to: Duration) {
        self.sweep();
        let slots = upstream.slot.as_ref().map(|s| Arc::clone(&s.of));
        let mut idle = self.idle();
        let kept = idle.entry(key).or_default();
        let oldest = (kept.len() == POOL_PER_KEY).then(|| kept.remove(0));
        kept.push(Kept {
            upstream,
            since: Instant::now(),
            idle: for_up_to,
        });
        drop(idle);
        drop(oldest);
        if let Some(slots) = slots {
            slots.freed.notify_waiters();
        }
    }

    /// Lets go of what has been idle too long or was closed meanwhile.
    pub(super) fn sweep(&self) {
        self.idle().retain(|_, kept| {
            kept.retain(Kept::usable);
            !kept.is_empty()
        });
    }

    /// Lets go of the connections made from network namespace `netns` (no longer served): they
    /// would keep it alive.
    pub(super) fn forget_netns(&self, netns: u64) {
        self.idle().retain(|key, _| key.netns != netns);
        self.shared().retain(|key, _| key.netns != netns);
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Upstream2>>> {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open HTTP/2 connection for `key`, if there is one.
    /// A request's place on one of `key`'s HTTP/2 connections that has room for one more
    /// (`max`: requests in progress on one at most, `maxConcurrentStreams`), counted from now.
    fn stream(
        &self,
        key: &PoolKey,
        max: Option<u32>,
    ) -> Option<(hyper::client::conn::http2::SendRequest<Body>, Stream)> {
        let mut shared = self.shared();
        shared.retain(|_, open| {
            open.retain(|u| !u.sender.is_closed());
            !open.is_empty()
        });
        let u = (shared.get(key)?.iter())
            .find(|u| max.is_none_or(|max| u.streams.load(Ordering::Relaxed) < max))?;
        u.streams.fetch_add(1, Ordering::Relaxed);
        let stream = Stream {
            streams: Arc::clone(&u.streams),
            of: u.slot.as_ref().map(|s| Arc::clone(&s.of)),
        };
        Some((u.sender.clone(), stream))
    }
}

impl Slots {
    fn new(max: u32) -> Arc<Slots> {
        Arc::new(Slots {
            places: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            max,
            freed: tokio::sync::Notify::new(),
            waiting: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn take(self: &Arc<Self>) -> Option<Slot> {
        let place = Arc::clone(&self.places).try_acquire_owned().ok()?;
        Some(Slot {
            place: Some(place),
            of: Arc::clone(self),
        })
    }
}

/// Why an attempt failed, and so whether another may follow.
enum Failure {
    /// TCP or TLS connect failed: always retried.
    Connect(String),
    /// The upstream's certificate did not verify: never retried.
    Certificate(String),
    /// The connection broke before the answer's headers.
    Reset(String),
    /// The attempt's time ran out.
    Timeout,
    /// As many requests as may wait for an upstream connection already do.
    Overflow(u32),
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A local answer that ends the connection, noted as the connection's failure.
    fn fail(&self, status: StatusCode, outcome: &'static str, reason: String) -> Response<Body> {
        let body = format!("egress: {reason}\n");
        let mut stats = self.stats();
        stats.status = Some(status.as_u16());
        stats.failure.get_or_insert((outcome, reason));
        let mut response = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    /// The answer a route gives itself (`directResponse`, `redirect`), with the route's response
    /// header operations. Nothing is sent upstream.
    fn local(
        &self,
        answer: &LocalAnswer,
        host: &str,
        path: &str,
        query: Option<&str>,
        ops: &HeaderOps,
    ) -> Response<Body> {
        let (status, body) = match answer {
            LocalAnswer::Direct { status, body } => (*status, body.clone()),
            LocalAnswer::Redirect { status, .. } => (*status, String::new()),
        };
        self.stats().status = Some(status);
        let mut response = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        if matches!(answer, LocalAnswer::Direct { body, .. } if !body.is_empty()) {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if let Some(location) = answer.location(host, path, query)
            && let Ok(v) = HeaderValue::from_str(&location)
        {
            response.headers_mut().insert(header::LOCATION, v);
        }
        HeaderOps::apply(&ops.response, response.headers_mut());
        response
    }

    /// What a route does before anything is sent on: its fault first, as Envoy's fault filter
    /// runs before its router, then its own answer, if it gives one (`host`, `path` and `query`
    /// those of the request as it reached the route, for a redirect).
    async fn ahead(
        &self,
        r: &RequestRoute,
        host: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<Response<Body>> {
        if let Some(fault) = r.fault {
            if let Some((delay, share)) = fault.delay
                && befalls(share)
            {
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, share)) = fault.abort
                && befalls(share)
            {
                return Some(self.aborted(abort));
            }
        }
        let answer = r.answer.as_ref()?;
        Some(self.local(answer, host, path, query, &r.headers))
    }

    /// A fault's abort, answered as Envoy's fault filter answers it. Nothing is sent on.
    fn aborted(&self, abort: Abort) -> Response<Body> {
        let (status, grpc) = match abort {
            Abort::Http(status) => (status, None),
            Abort::Grpc(code) => (200, Some(code)),
        };
        self.stats().status = Some(status);
        let body = match grpc {
            Some(_) => Bytes::new(),
            None => Bytes::from_static(b"fault filter abort"),
        };
        let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let headers = response.headers_mut();
        match grpc {
            Some(code) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
            }
            None => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
        }
        response
    }

    async fn request(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        self.stats().requests += 1;
        let Some(host) = request_host(&req) else {
            return self.fail(
                StatusCode::BAD_REQUEST,
                "refused",
                "request without a host".to_owned(),
            );
        };
        // The host must be one the policy allows for the kernel's destination, as a ClientHello's
        // server name must be.
        let upstream = match self.catalog.upstream(self.rule_id, &host, self.dst) {
            Ok(u) => u,
            Err(reason) => return self.fail(StatusCode::FORBIDDEN, "refused", reason),
        };
        self.stats().host = Some(upstream.host.clone());
        let (parts, body) = req.into_parts();
        let (route, chosen) = match self.route(&parts, &upstream) {
            Ok(chosen) => chosen,
            Err(reason) => return self.fail(StatusCode::NOT_FOUND, "refused", reason),
        };
        if let Some((r, _)) = chosen {
            let named = named_authority(&parts).unwrap_or_default();
            if let Some(answer) = self
                .ahead(r, named, parts.uri.path(), parts.uri.query())
                .await
            {
                return answer;
            }
        }

        let mut headers = forwarded_headers(&parts.headers, &host);
        // The host checked is the host sent, alone: a target in absolute form names it (RFC
        // 9112 §3.2.2: its host wins over a Host header's), else the first Host header, and no
        // other Host header may reach the upstream.
        let checked = match parts.uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => parts.headers.get(header::HOST).cloned(),
        };
        if let Some(v) = checked {
            headers.insert(header::HOST, v);
        }
        let mut uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        // The host the upstream is asked for: the client's, or a route's rewrite of it.
        let mut asked = host.clone();
        // The routes' response header operations, in the order the answer passes them.
        let mut ops: Vec<&HeaderOps> = Vec::new();
        let mut through = None;
        // The destination the route that sends the request on drew, where it sends requests
        // elsewhere than dialled.
        let mut drawn = None;
        // The egress gateway's route the request took, where the mesh's sent it there.
        let mut at_gateway = None;
        if let Some((r, m)) = chosen {
            drawn = draw(&r.to, |(d, _)| d.weight).map(|d| (d, r.by.as_str()));
            let r_ops = drawn.map_or(&r.headers, |((_, ops), _)| ops);
            if let Err(reason) = r.apply(m, r_ops, &mut headers, &mut uri, &mut asked) {
                return self.fail(StatusCode::BAD_REQUEST, "refused", reason);
            }
            ops.push(r_ops);
            // The route goes to an egress gateway: the relay stands in for it, and its routes
            // take the request as this one changed it, as they would at the gateway.
            if let Some(then) = &r.then {
                let named = headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let Some((g, gm)) = pick(then, parts.method.as_str(), &uri, Some(&named), &headers)
                else {
                    let by = then.first().map_or("", |r| r.by.as_str());
                    let vs = by.split(" spec.").next().unwrap_or(by);
                    return self.fail(
                        StatusCode::NOT_FOUND,
                        "refused",
                        format!(
                            "no route of {vs} at the egress gateway matches {} {}",
                            parts.method,
                            uri.path()
                        ),
                    );
                };
                if let Some(answer) = self.ahead(g, &named, uri.path(), uri.query()).await {
                    return answer;
                }
                drawn = draw(&g.to, |(d, _)| d.weight).map(|d| (d, g.by.as_str()));
                let g_ops = drawn.map_or(&g.headers, |((_, ops), _)| ops);
                if let Err(reason) = g.apply(gm, g_ops, &mut headers, &mut uri, &mut asked) {
                    return self.fail(StatusCode::BAD_REQUEST, "refused", reason);
                }
                // The answer passes the gateway first.
                ops.insert(0, g_ops);
                at_gateway = Some(g);
                through = Some(through_gateway(route, &g.route));
            }
        }
        let route = through.as_ref().unwrap_or(route);
        // Another host that the route sends the request to: the addresses the policy gives it,
        // under its DestinationRule there.
        let routed;
        let (dest, upstream) = match drawn {
            // Its own host goes where dialled, to the port's `targetPort` (or the gateway's),
            // unless a subset narrows its endpoints.
            Some(((to, _), by)) if *to.host != *upstream.host || to.subset.is_some() => {
                match self.routed(to, by, &upstream) {
                    Ok(there) => {
                        self.stats().upstream_host = Some(Name::clone(&there.1.host));
                        routed = there;
                        (&routed.0, &routed.1)
                    }
                    Err(reason) => {
                        return self.fail(StatusCode::SERVICE_UNAVAILABLE, "refused", reason);
                    }
                }
            }
            _ => {
                self.stats().upstream_host = None;
                (&self.dialled, &upstream)
            }
        };
        // The host's requests in progress, where a DestinationRule limits them: one more is
        // answered at once, never sent and not retried, as Envoy answers an overflow.
        let active = match &dest.max_active {
            None => None,
            Some((max, by)) => {
                let port = dest.origin.target_port;
                match self
                    .pool
                    .active(dest.rule_id, &upstream.host, port, *max)
                    .take()
                {
                    Some(place) => Some(place),
                    None => {
                        self.status.over_limit("requests");
                        return self.fail(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "refused",
                            format!(
                                "{}:{port}: {max} request(s) already in progress, as many as \
                                 {by} allows (connectionPool.http.http2MaxRequests)",
                                upstream.host
                            ),
                        );
                    }
                }
            }
        };
        let tls = match &dest.origin.tls {
            Some(tls) => {
                let sni = tls.sni.clone().unwrap_or_else(|| asked.clone());
                let Ok(name) = ServerName::try_from(sni.clone()) else {
                    return self.fail(
                        StatusCode::BAD_REQUEST,
                        "refused",
                        format!("{sni} is not a valid server name"),
                    );
                };
                self.stats().sni = Some(sni);
                let client = if dest.h2 { &tls.client_h2 } else { &tls.client };
                Some((name, client.clone()))
            }
            None => None,
        };
        let hint = body.size_hint().exact();
        let (replay, mut streamed) = match hint {
            Some(n) if n <= REPLAY_LIMIT => match body.collect().await {
                Ok(b) => (Some(b.to_bytes()), None),
                Err(e) => {
                    return self.fail(
                        StatusCode::BAD_REQUEST,
                        "error",
                        format!("reading the request body: {e}"),
                    );
                }
            },
            _ => (None, Some(body)),
        };
        // A copy to each mirror the request befalls, where its body is at hand (a larger one is
        // streamed once, and not mirrored).
        if let Some(bytes) = &replay {
            let routes = chosen.map(|(r, _)| r).into_iter().chain(at_gateway);
            for (to, share) in routes.flat_map(|r| &r.mirrors) {
                if befalls(*share) {
                    let copy = (&parts.method, &uri, &headers, bytes, asked.as_str());
                    self.mirror(to, upstream, copy, route.timeout);
                }
            }
        }
        // HTTP/2 names the host in the request's target (`:authority`), not in a header.
        if dest.h2 {
            // The host checked (or the route's rewrite of it), port and all, as set above.
            let authority = headers
                .remove(header::HOST)
                .and_then(|v| v.to_str().ok().map(str::to_owned))
                .unwrap_or_else(|| host.clone());
            // `:scheme` names the upstream hop's: https where egress originates TLS.
            let scheme = if dest.origin.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let target = format!(
                "{scheme}://{authority}{}",
                uri.path_and_query().map_or("/", |pq| pq.as_str())
            );
            match target.parse::<Uri>() {
                Ok(absolute) => uri = absolute,
                Err(_) => {
                    return self.fail(
                        StatusCode::BAD_REQUEST,
                        "refused",
                        format!("{target} is not a request target"),
                    );
                }
            }
        }
        let build = |body: Body| {
            let mut r = Request::new(body);
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = uri.clone();
            *r.headers_mut() = headers.clone();
            if dest.h2 {
                *r.version_mut() = http::Version::HTTP_2;
            }
            r
        };

        let tries = if replay.is_some() {
            route.retries.saturating_add(1)
        } else {
            1
        };
        let first = SocketAddr::new(self.dst.ip(), dest.origin.target_port);
        // The request's hash, where the balancing hashes; and the cookie made for it, if any.
        let (key, made) = self.hash_key(dest, (&parts.headers, &parts.uri));
        let choice = self.choice(dest, key);
        let (ordered, targets) = choice.order(upstream.targets(first));
        if ordered.is_empty() {
            return self.fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-failed",
                super::NO_TARGET.to_owned(),
            );
        }
        let mut attempts = Attempts::new(route, tries, route.per_try_timeout, ordered);
        // The host's connections, where a DestinationRule limits them: counted over its
        // addresses, as Envoy counts a cluster's.
        let slots = dest.max_connections.map(|max| {
            self.pool
                .slots(dest.rule_id, &upstream.host, dest.origin.target_port, max)
        });
        let mut last = String::new();
        // An answer to be retried, while the retry may still be refused a place: then it is the
        // answer, as Envoy answers a retry overflow.
        let mut retried: Option<(SocketAddr, Response<Body>)> = None;
        // The place the retry in progress holds among the host's, where they are limited.
        let mut retrying = None;
        loop {
            let (target, limit) = match attempts.next().await {
                Next::Try { target, limit } => (target, limit),
                Next::TimedOut => {
                    return self.fail(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream-failed",
                        format!(
                            "route timeout reached after {} attempt(s); {last}",
                            attempts.made
                        ),
                    );
                }
                Next::Spent => break,
            };
            if attempts.made > 1
                && let Some((max, by)) = &dest.max_retries
            {
                let port = dest.origin.target_port;
                let places = self.pool.retries(dest.rule_id, &upstream.host, port, *max);
                drop(retrying.take());
                retrying = places.take();
                if retrying.is_none() {
                    self.status.over_limit("retries");
                    if let Some((target, response)) = retried.take() {
                        let answer = self.answer(target, response, &ops, (active, None));
                        return with_cookie(answer, made);
                    }
                    return self.fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-failed",
                        format!(
                            "{} attempt(s) failed; last: {last}; not retried: {}:{port} has {max} \
                             retries in progress, as many as {by} allows \
                             (connectionPool.http.maxRetries)",
                            attempts.made - 1,
                            upstream.host
                        ),
                    );
                }
            }
            drop(retried.take());
            self.stats().attempts += 1;
            let body = match (&replay, streamed.take()) {
                (Some(bytes), _) => Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
                (None, Some(body)) => body.boxed(),
                (None, None) => break,
            };
            // Counted from the attempt until its answer has been passed on whole.
            let in_flight = self.balancer.start(dest.rule_id, dest.balancing, target);
            let result = within(
                limit,
                self.attempt(dest, target, &tls, slots.as_ref(), build(body)),
            )
            .await
            .unwrap_or(Err(Failure::Timeout));
            let outcome = match &result {
                Ok(response) => Some(Outcome::Answered(response.status().as_u16())),
                // Refused before it was sent: says nothing of the address.
                Err(Failure::Overflow(_)) => None,
                Err(_) => Some(Outcome::Failed),
            };
            if let Some(outcome) = outcome {
                choice.note(target, &targets, outcome);
            }
            match result {
                Ok(response)
                    if attempts.made < tries
                        && route.retry_on.status(response.status().as_u16()) =>
                {
                    last = format!("{target} answered {}", response.status());
                    if dest.max_retries.is_some() {
                        retried = Some((target, response));
                    }
                }
                Ok(response) => {
                    let answer = self.answer(target, response, &ops, (active, in_flight));
                    return with_cookie(answer, made);
                }
                Err(Failure::Certificate(e)) => {
                    return self.fail(StatusCode::SERVICE_UNAVAILABLE, "upstream-failed", e);
                }
                // Not retried, as Envoy does not retry an overflow.
                Err(Failure::Overflow(n)) => {
                    let by = dest.max_pending.as_ref().map_or("", |(_, by)| by.as_str());
                    self.status.over_limit("pending");
                    return self.fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "refused",
                        format!(
                            "{}:{}: {n} request(s) already wait for an upstream connection, as \
                             many as {by} allows (connectionPool.http.http1MaxPendingRequests)",
                            upstream.host, dest.origin.target_port
                        ),
                    );
                }
                Err(Failure::Reset(e)) if !route.retry_on.reset => {
                    return self.fail(StatusCode::SERVICE_UNAVAILABLE, "upstream-failed", e);
                }
                Err(Failure::Connect(e) | Failure::Reset(e)) => last = e,
                Err(Failure::Timeout) => last = format!("{target}: no answer in time"),
            }
        }
        let status = if last.ends_with("no answer in time") {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        self.fail(
            status,
            "upstream-failed",
            format!("{} attempt(s) failed; last: {last}", attempts.made),
        )
    }

    /// The route a request takes: the first of the VirtualService's routes it matches, as
    /// Envoy picks it; the port's own where it has none. The error says that none matches.
    fn route<'a>(
        &'a self,
        parts: &http::request::Parts,
        upstream: &'a crate::events::Upstream,
    ) -> Result<(&'a RelayRoute, Option<Chosen<'a>>), String> {
        let Some(requests) = &self.requests else {
            return Ok((&upstream.route, None));
        };
        let path = parts.uri.path();
        let method = parts.method.as_str();
        pick(
            requests,
            method,
            &parts.uri,
            named_authority(parts),
            &parts.headers,
        )
        .map(|(r, m)| (&r.route, Some((r, m))))
        .ok_or_else(|| {
            let by = requests.first().map_or("", |r| r.by.as_str());
            let vs = by.split(" spec.").next().unwrap_or(by);
            format!("no route of {vs} matches {method} {path}")
        })
    }

    /// One try: an idle connection to the same target with the same name from the pool (the
    /// one this client used last, if it is there), if it is still good, else a new one. Where
    /// the host's connections are limited (`slots`) and all are taken, the request waits for
    /// one to come back or close, as Envoy queues it.
    async fn attempt(
        &self,
        dest: &Dest,
        target: SocketAddr,
        tls: &Option<(ServerName<'static>, TlsClient)>,
        slots: Option<&Arc<Slots>>,
        req: Request<Body>,
    ) -> Result<Response<Body>, Failure> {
        let key = PoolKey {
            netns: self.leave.netns.cookie,
            bound_if: self.leave.bound_if,
            target,
            tls: tls.clone(),
        };
        if dest.h2 {
            return self.attempt_h2(dest, key, slots, req).await;
        }
        let mut waiting = None;
        let mut upstream = loop {
            let freed = slots.map(|s| s.freed.notified());
            tokio::pin!(freed);
            if let Some(freed) = freed.as_mut().as_pin_mut() {
                // Told from now on, before the pool and the places are looked at.
                freed.enable();
            }
            if let Some(mut u) = self
                .pool
                .take(&key)
                .filter(|u| reusable(u, dest.max_requests, dest.max_age))
                && timeout(Duration::from_millis(5), u.sender.ready())
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                self.status.origination_reused.inc();
                break u;
            }
            let slot = match slots {
                None => None,
                Some(slots) => {
                    let taken = self.take_place(dest, slots, &mut waiting, freed.as_pin_mut());
                    let Some(slot) = taken.await? else { continue };
                    Some(slot)
                }
            };
            drop(waiting.take());
            let u = self.open(dest, target, tls.clone(), slot).await?;
            self.status.origination_opened.inc();
            break u;
        };
        drop(waiting);
        upstream.sent += 1;
        let response = upstream
            .sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Reset(format!("{target}: {e}")))?;
        let (parts, body) = response.into_parts();
        let body = Returning {
            body,
            ended: false,
            back: Some(Back {
                upstream,
                key,
                pool: Arc::clone(&self.pool),
                idle: dest.kept_idle,
                max_requests: dest.max_requests,
                max_age: dest.max_age,
            }),
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// One try over HTTP/2: on a connection to the same target from the same place that
    /// requests share, with room for one more where the DestinationRule bounds the requests on
    /// one (`maxConcurrentStreams`), else on one it opens. Where the host's connections are
    /// limited (`slots`) and all are taken, the request waits for one, as over HTTP/1.1.
    async fn attempt_h2(
        &self,
        dest: &Dest,
        key: PoolKey,
        slots: Option<&Arc<Slots>>,
        req: Request<Body>,
    ) -> Result<Response<Body>, Failure> {
        let target = key.target;
        let mut waiting = None;
        let (mut sender, stream) = loop {
            let freed = slots.map(|s| s.freed.notified());
            tokio::pin!(freed);
            if let Some(freed) = freed.as_mut().as_pin_mut() {
                // Told from now on, before the connections and the places are looked at.
                freed.enable();
            }
            if let Some(found) = self.pool.stream(&key, dest.max_streams) {
                self.status.origination_reused.inc();
                break found;
            }
            let slot = match slots {
                None => None,
                Some(slots) => {
                    let taken = self.take_place(dest, slots, &mut waiting, freed.as_pin_mut());
                    let Some(slot) = taken.await? else { continue };
                    Some(slot)
                }
            };
            drop(waiting.take());
            let (sender, task) = http2(target, self.dial(dest, target, &key.tls).await?).await?;
            self.status.origination_opened.inc();
            let streams = Arc::new(AtomicU32::new(0));
            let opened = Upstream2 {
                sender,
                task,
                streams,
                slot,
            };
            // Without a bound on its requests, another request may have opened one meanwhile:
            // the first stays, and this one, which carries nothing yet, closes.
            let mut shared = self.pool.shared();
            let open = shared.entry(key.clone()).or_default();
            if dest.max_streams.is_some() || open.iter().all(|u| u.sender.is_closed()) {
                open.push(opened);
            }
            drop(shared);
            if let Some(found) = self.pool.stream(&key, dest.max_streams) {
                break found;
            }
        };
        drop(waiting);
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Reset(format!("{target}: {e}")))?;
        Ok(response.map(|body| {
            Holding {
                body,
                _held: stream,
            }
            .boxed()
        }))
    }

    /// A place for one more connection where the host's connections are limited: a free one;
    /// else one made by closing a connection that carries nothing; else one waited for (see
    /// `wait_place`). `None`: the pool may have changed meanwhile, so look at it again first.
    async fn take_place<'s>(
        &self,
        dest: &Dest,
        slots: &'s Arc<Slots>,
        waiting: &mut Option<Waiting<'s>>,
        freed: Option<Pin<&mut tokio::sync::futures::Notified<'_>>>,
    ) -> Result<Option<Slot>, Failure> {
        if let Some(slot) = slots.take() {
            return Ok(Some(slot));
        }
        if !self.pool.evict(slots) {
            self.wait_place(dest, slots, waiting, freed).await?;
        }
        Ok(None)
    }

    /// Where the host's connections are all taken: counts the request as waiting for one (once;
    /// refused past `http1MaxPendingRequests`, as Envoy refuses an overflow) and waits until
    /// one is given up or comes back to the pool.
    async fn wait_place<'s>(
        &self,
        dest: &Dest,
        slots: &'s Slots,
        waiting: &mut Option<Waiting<'s>>,
        freed: Option<Pin<&mut tokio::sync::futures::Notified<'_>>>,
    ) -> Result<(), Failure> {
        if waiting.is_none() {
            let before = slots.waiting.fetch_add(1, Ordering::Relaxed);
            let counted = Waiting(slots);
            if let Some((max, _)) = &dest.max_pending
                && before >= *max
            {
                return Err(Failure::Overflow(before));
            }
            *waiting = Some(counted);
            self.status.origination_waits.inc();
        }
        if let Some(freed) = freed {
            freed.await;
        }
        Ok(())
    }

    /// A connection to `target` from where the client's would leave, with the TLS egress
    /// originates, if any.
    async fn dial(
        &self,
        dest: &Dest,
        target: SocketAddr,
        tls: &Option<(ServerName<'static>, TlsClient)>,
    ) -> Result<Box<dyn Wire>, Failure> {
        let tcp = timeout(dest.connect_timeout, connect_own(target, &self.leave))
            .await
            .map_err(|_| Failure::Connect(format!("{target}: connect timed out")))?
            .map_err(|e| Failure::Connect(format!("{target}: {e}")))?;
        Ok(match tls {
            Some((name, client)) => Box::new(
                TlsConnector::from(Arc::clone(&client.0))
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| tls_failure(target, e))?,
            ),
            None => Box::new(tcp),
        })
    }

    async fn open(
        &self,
        dest: &Dest,
        target: SocketAddr,
        tls: Option<(ServerName<'static>, TlsClient)>,
        slot: Option<Slot>,
    ) -> Result<Upstream, Failure> {
        let (sender, task) = http1(target, self.dial(dest, target, &tls).await?).await?;
        Ok(Upstream {
            sender,
            task,
            sent: 0,
            opened: Instant::now(),
            slot,
        })
    }

    /// What a request to `dest` is hashed on, where its DestinationRule's load balancing hashes
    /// (`consistentHash`): the workload's network namespace, a header's value, a query
    /// parameter's, or a cookie's. A cookie with a `ttl` that the request lacks is made, and
    /// returned to be set on the answer, as Envoy makes it.
    fn hash_key(
        &self,
        dest: &Dest,
        (headers, uri): (&HeaderMap, &Uri),
    ) -> (Option<u64>, Option<HeaderValue>) {
        let Some(on) = &dest.hash_on else {
            return (None, None);
        };
        let key = |value: &[u8]| Some(super::balance::hash(&value));
        match on {
            HashOn::SourceIp => (Some(super::balance::hash(&self.leave.netns.cookie)), None),
            HashOn::Header(name) => (headers.get(name).and_then(|v| key(v.as_bytes())), None),
            HashOn::Query(name) => {
                let value = (uri.query().unwrap_or_default().split('&'))
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find_map(|(n, v)| (n == name).then_some(v));
                (value.and_then(|v| key(v.as_bytes())), None)
            }
            HashOn::Cookie { name, path, ttl } => {
                let value = (headers.get_all(header::COOKIE).iter())
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| c.trim().split_once('='))
                    .find_map(|(n, v)| (n == name).then_some(v));
                match (value, ttl) {
                    (Some(v), _) => (key(v.as_bytes()), None),
                    (None, Some(ttl)) => {
                        let made = format!("{:016x}", rand::random::<u64>());
                        let mut cookie = format!("{name}={made}; Max-Age={}", ttl.as_secs());
                        if let Some(path) = path {
                            cookie.push_str(&format!("; Path={path}"));
                        }
                        cookie.push_str("; HttpOnly");
                        (key(made.as_bytes()), HeaderValue::from_str(&cookie).ok())
                    }
                    (None, None) => (None, None),
                }
            }
        }
    }

    /// Sends a copy of a request to a route's mirror `to`, its host named `-shadow` as Envoy
    /// names it, under the DestinationRule there, once, within the route's timeout (else
    /// [`MIRROR_LIMIT`]). Its answer is read and dropped: the client neither waits for it nor
    /// sees it. Counted by outcome.
    fn mirror(
        self: &Arc<Self>,
        to: &RouteTo,
        dialled: &crate::events::Upstream,
        (method, uri, headers, body, asked): (&http::Method, &Uri, &HeaderMap, &Bytes, &str),
        limit: Option<Duration>,
    ) {
        let Ok((dest, upstream)) = self.routed(to, "mirror", dialled) else {
            self.status.mirrored("refused");
            return;
        };
        // A copy is hashed as its request would be there, on what the routes made of it.
        let key = self.hash_key(&dest, (headers, uri)).0;
        let mut headers = headers.clone();
        let authority = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(shadow);
        let pq = uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let tls = dest.origin.tls.as_ref().and_then(|tls| {
            let sni = tls.sni.clone().unwrap_or_else(|| asked.to_owned());
            let client = if dest.h2 { &tls.client_h2 } else { &tls.client };
            Some((ServerName::try_from(sni).ok()?, client.clone()))
        });
        if dest.origin.tls.is_some() && tls.is_none() {
            self.status.mirrored("refused");
            return;
        }
        let mut req = Request::new(
            Full::new(body.clone())
                .map_err(|never| match never {})
                .boxed(),
        );
        *req.method_mut() = method.clone();
        let target = match (&authority, dest.h2) {
            // HTTP/2 names the host in the request's target.
            (Some(a), true) => {
                headers.remove(header::HOST);
                *req.version_mut() = http::Version::HTTP_2;
                let scheme = if tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{a}{pq}").parse::<Uri>().ok()
            }
            (Some(a), false) => HeaderValue::from_str(a).ok().and_then(|v| {
                headers.insert(header::HOST, v);
                pq.parse::<Uri>().ok()
            }),
            (None, _) => None,
        };
        let Some(target_uri) = target else {
            self.status.mirrored("refused");
            return;
        };
        *req.uri_mut() = target_uri;
        *req.headers_mut() = headers;
        let state = Arc::clone(self);
        tokio::spawn(async move {
            let first = SocketAddr::new(state.dst.ip(), dest.origin.target_port);
            let (ordered, _) = state.choice(&dest, key).order(upstream.targets(first));
            let Some(&target) = ordered.first() else {
                state.status.mirrored("refused");
                return;
            };
            let slots = dest.max_connections.map(|max| {
                let port = dest.origin.target_port;
                state.pool.slots(dest.rule_id, &upstream.host, port, max)
            });
            let sent = state.attempt(&dest, target, &tls, slots.as_ref(), req);
            let outcome = match timeout(limit.unwrap_or(MIRROR_LIMIT), sent).await {
                Ok(Ok(answer)) => match answer.into_body().collect().await {
                    Ok(_) => "answered",
                    Err(_) => "failed",
                },
                _ => "failed",
            };
            state.status.mirrored(outcome);
        });
    }

    /// How requests to `dest` choose among its addresses; `key`: the request's hash.
    fn choice<'a>(&'a self, dest: &'a Dest, key: Option<u64>) -> Choice<'a> {
        Choice {
            rule: dest.rule_id,
            balancer: &self.balancer,
            balancing: dest.balancing,
            key,
            health: &self.health,
            outliers: dest.outliers.as_ref(),
        }
    }

    /// Where a route sends a request it drew `to` (route `by`), where that is not the host
    /// dialled: the settings there and the addresses that serve it, with `dialled`'s
    /// retries. The error says why it cannot be reached.
    fn routed(
        &self,
        to: &RouteTo,
        by: &str,
        dialled: &crate::events::Upstream,
    ) -> Result<(Dest, crate::events::Upstream), String> {
        let there = self.catalog.routed_to(to, by)?;
        // Its HTTP port as the relay would serve it, else plain HTTP to the port.
        let origin =
            (self.catalog.origination(there.rule, there.port).cloned()).unwrap_or(Origination {
                port: there.port,
                target_port: there.port,
                tls: None,
            });
        let pool = self.catalog.pool(there.rule, there.port);
        let dest = Dest::new(
            &self.catalog,
            there.rule,
            origin,
            pool,
            self.connect_timeout,
            self.client_h2,
        );
        let upstream = crate::events::Upstream {
            host: there.host,
            route: Arc::clone(&dialled.route),
            alternates: there.addrs,
            dialled: false,
        };
        Ok((dest, upstream))
    }

    /// The upstream's answer as the client gets it, holding (`held`) the request's place among
    /// the host's requests in progress and its count at `target`, where they are kept.
    fn answer(
        &self,
        target: SocketAddr,
        response: Response<Body>,
        ops: &[&HeaderOps],
        held: (Option<Slot>, Option<InFlight>),
    ) -> Response<Body> {
        {
            let mut stats = self.stats();
            stats.status = Some(response.status().as_u16());
            stats.upstream = Some(target);
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        for ops in ops {
            HeaderOps::apply(&ops.response, &mut parts.headers);
        }
        let body = match held {
            (None, None) => body,
            held => Holding { body, _held: held }.boxed(),
        };
        Response::from_parts(parts, body)
    }
}

/// An answer's body that holds what its request holds until the relay is done with it (read
/// whole and sent, or dropped): its place among the host's requests in progress
/// (`http2MaxRequests`) and its count among the address's (the least request), or its `Stream`
/// on an HTTP/2 connection.
struct Holding<B, H> {
    body: B,
    _held: H,
}

impl<B, H> hyper::body::Body for Holding<B, H>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    H: Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The answer, with the cookie made for the request's hash, if any, set on it.
fn with_cookie(mut answer: Response<Body>, made: Option<HeaderValue>) -> Response<Body> {
    if let Some(cookie) = made {
        answer.headers_mut().append(header::SET_COOKIE, cookie);
    }
    answer
}

/// A mirrored request's authority: `-shadow` after the host, before any port, as Envoy names it.
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// The authority a request names, port and all: its target's in absolute form, else its Host.
fn named_authority(parts: &http::request::Parts) -> Option<&str> {
    match parts.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    }
}

/// The first of `routes` a request matches, with the match it met (none: the route has none),
/// as Envoy picks a route.
fn pick<'a>(
    routes: &'a [RequestRoute],
    method: &str,
    uri: &Uri,
    authority: Option<&str>,
    headers: &HeaderMap,
) -> Option<Chosen<'a>> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let meets = |m: &&RequestMatch| m.matches(method, uri.path(), uri.query(), authority, header);
    routes.iter().find_map(|r| {
        if r.matches.is_empty() {
            return Some((r, None));
        }
        r.matches.iter().find(meets).map(|m| (r, Some(m)))
    })
}

/// The retries and timeouts of a request the mesh's route sends to an egress gateway and the
/// gateway's route sends on, in the one hop the relay makes: the gateway's retries, which are
/// nearest the upstream (the mesh's where it has none), and the shorter of the two timeouts.
fn through_gateway(mesh: &RelayRoute, gateway: &RelayRoute) -> RelayRoute {
    let retrying = if gateway.retries > 0 { gateway } else { mesh };
    RelayRoute {
        retries: retrying.retries,
        per_try_timeout: retrying.per_try_timeout,
        retry_on: retrying.retry_on.clone(),
        timeout: match (mesh.timeout, gateway.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

/// Whether a request is among a fault's `share` of them (millionths).
fn befalls(share: u32) -> bool {
    share >= MILLION || (share > 0 && rand::random_range(0..MILLION) < share)
}

/// Whether another request may go on `upstream`: it is open, has carried fewer than
/// `http.maxRequestsPerConnection`, and is younger than `tcp.maxConnectionDuration`. One that may
/// not is closed once its last answer is read.
fn reusable(upstream: &Upstream, max_requests: Option<u32>, max_age: Option<Duration>) -> bool {
    !upstream.sender.is_closed()
        && max_requests.is_none_or(|max| upstream.sent < max)
        && max_age.is_none_or(|max| upstream.opened.elapsed() < max)
}

/// An answer's body that puts its connection back in the pool once it has been read whole:
/// from then on the connection may carry another request, this client's or another's (Envoy
/// returns its connections to the pool so). A body not read whole closes its connection.
struct Returning {
    body: Incoming,
    ended: bool,
    back: Option<Back>,
}

/// Where a connection goes back to, and whether it may.
struct Back {
    upstream: Upstream,
    key: PoolKey,
    pool: Arc<Pool>,
    idle: Duration,
    max_requests: Option<u32>,
    max_age: Option<Duration>,
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(back) = self.back.take()
            && (self.ended || self.body.is_end_stream())
            && reusable(&back.upstream, back.max_requests, back.max_age)
        {
            back.pool.put(back.key, back.upstream, back.idle);
        }
    }
}

/// An upstream connection's bytes: TCP, or the TLS egress originates over it.
trait Wire: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Wire for T {}

/// Runs a client connection's I/O until it ends or the handle aborts it.
fn driven(
    conn: impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let _ = conn.await;
    })
    .abort_handle()
}

/// An HTTP/2 client connection over `io`: what sends requests on it, and its I/O task.
async fn http2(
    target: SocketAddr,
    io: Box<dyn Wire>,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<Body>,
        tokio::task::AbortHandle,
    ),
    Failure,
> {
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Connect(format!("{target}: {e}")))?;
    Ok((sender, driven(conn)))
}

/// An HTTP/1.1 client connection over `io`: what sends requests on it, and its I/O task.
async fn http1(
    target: SocketAddr,
    io: Box<dyn Wire>,
) -> Result<(SendRequest<Body>, tokio::task::AbortHandle), Failure> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Connect(format!("{target}: {e}")))?;
    Ok((sender, driven(conn)))
}

fn tls_failure(target: SocketAddr, e: io::Error) -> Failure {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        // rustls shows a verifier's own error by its Debug form; its message reads better.
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            Failure::Certificate(format!(
                "{target}: TLS: invalid peer certificate: {}",
                other.0
            ))
        }
        Some(rustls::Error::InvalidCertificate(_)) => {
            Failure::Certificate(format!("{target}: TLS: {e}"))
        }
        _ => Failure::Connect(format!("{target}: TLS: {e}")),
    }
}

/// The request's host without its port: from an absolute URI, else from the Host header.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            value
                .parse::<http::uri::Authority>()
                .ok()?
                .host()
                .to_owned()
        }
    };
    let host = authority.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.trim_end_matches('.').to_ascii_lowercase())
}

/// The headers to send upstream: the client's, less those meant for the hop to the relay, with
/// a Host header.
fn forwarded_headers(headers: &HeaderMap, host: &str) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    if !out.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        out.insert(header::HOST, v);
    }
    out
}

/// RFC 9110 §7.6.1: connection-specific headers, and those the Connection header names, are not
/// forwarded. Framing is hyper's to set for each hop.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The client's socket, counting bytes each way and noting activity for the idle limit.
struct Counted {
    io: TcpStream,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.up.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll
            && n > 0
        {
            self.down.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_comes_from_the_uri_or_the_header_without_its_port() {
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            b.body(()).expect("request")
        };
        assert_eq!(
            request_host(&req("/x", Some("API.Example.com:80"))).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            request_host(&req("http://a.test:8080/x", Some("b.test"))).as_deref(),
            Some("a.test")
        );
        assert_eq!(
            request_host(&req("/", Some("[fd00::1]:80"))).as_deref(),
            Some("fd00::1")
        );
        assert_eq!(request_host(&req("/", None)), None);
        assert_eq!(request_host(&req("/", Some(""))), None);
    }

    /// Through an egress gateway, the gateway's retries (nearest the upstream) and the shorter
    /// timeout; the mesh's retries where the gateway's route has none.
    #[test]
    fn a_gateways_retries_and_the_shorter_timeout_apply_through_it() {
        use crate::policy::compile::RelayRoute;
        let secs = |n| Some(Duration::from_secs(n));
        let mesh = RelayRoute {
            retries: 2,
            per_try_timeout: secs(1),
            timeout: secs(10),
            ..RelayRoute::default()
        };
        let gateway = RelayRoute {
            retries: 5,
            per_try_timeout: secs(2),
            timeout: secs(4),
            ..RelayRoute::default()
        };
        let r = super::through_gateway(&mesh, &gateway);
        assert_eq!(
            (r.retries, r.per_try_timeout, r.timeout),
            (5, secs(2), secs(4))
        );
        let r = super::through_gateway(&mesh, &RelayRoute::default());
        assert_eq!(
            (r.retries, r.per_try_timeout, r.timeout),
            (2, secs(1), secs(10))
        );
        let r = super::through_gateway(&RelayRoute::default(), &gateway);
        assert_eq!(r.timeout, secs(4));
    }

    /// A mirrored request's host is named `-shadow` before its port, as Envoy names it.
    #[test]
    fn a_shadow_authority_keeps_its_port() {
        assert_eq!(super::shadow("api.example"), "api.example-shadow");
        assert_eq!(super::shadow("api.example:8080"), "api.example-shadow:8080");
        assert_eq!(super::shadow("[2001:db8::1]:80"), "[2001:db8::1]-shadow:80");
    }

    #[test]
    fn connection_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        let out = forwarded_headers(&h, "a.test");
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-kept"]);
        assert_eq!(out[header::HOST], "a.test");
    }
}
