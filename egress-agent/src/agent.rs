//! The agent: compile the policy, resolve its hostnames, fill the maps, attach, then keep the maps
//! in step with DNS and with policy reloads. Ready means attached with the maps filled.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

pub use crate::metrics::Status;
use crate::{
    datapath::{
        self, Datapath, Heartbeat, Loaded, Sizes, cgroup,
        iface::{self, LinkWatch},
    },
    events::{Catalog, CgroupNames, LogWriter, Pipeline, Rotation},
    maps::KernelMaps,
    metrics,
    policy::{self, Mode, Plan, RuleIds, Severity},
    relay::{self, Relay, RelayConfig},
    resolve::{HostTable, Refresh, Resolver},
};

#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    pub policies: Vec<PathBuf>,
    pub mode: Option<Mode>,
    pub dns: Option<SocketAddr>,
    /// The cgroup v2 directory to enforce on.
    pub cgroup: PathBuf,
    /// Interfaces for the TC programs; `None`: every interface that is up, loopback aside.
    pub ifaces: Option<Vec<String>>,
    /// The flow log (JSON lines, appended); `None`: events feed the metrics only.
    pub events: Option<PathBuf>,
    pub rotation: Rotation,
    /// The kernel's event ring buffer and flow table.
    pub sizes: Sizes,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// No kernel events at all (decisions unchanged): the events benchmark's baseline only.
    pub kernel_events_off: bool,
    /// The gateway relay steered connections go to.
    pub relay: RelayConfig,
}

pub struct Agent {
    shutdown: Option<oneshot::Sender<()>>,
    reload: mpsc::Sender<()>,
    task: JoinHandle<()>,
    pub status: Arc<Status>,
    pub summary: String,
    /// The metrics endpoint's bound address (a port 0 request gets a real port here).
    pub metrics_addr: Option<SocketAddr>,
    /// The relay's port on 127.0.0.1 and ::1.
    pub relay_port: u16,
}

/// Loads and compiles the policy, logging warnings. Any error refuses the whole policy. Rules
/// `prev` has keep their ids.
pub fn load_plan(policies: &[PathBuf], mode: Option<Mode>, prev: &RuleIds) -> anyhow::Result<Plan> {
    let (pol, mut diags) = policy::load(policies);
    let plan = if policy::has_errors(&diags) {
        None
    } else {
        let (plan, more) = policy::compile_after(&pol, mode, prev);
        diags.extend(more);
        Some(plan)
    };
    for d in &diags {
        match d.severity {
            Severity::Error => log::error!("{d}"),
            Severity::Warning => log::warn!("{d}"),
        }
    }
    match plan {
        Some(plan) if !policy::has_errors(&diags) => Ok(plan),
        _ => bail!(
            "the policy in {} has errors",
            policies
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Resolves every due name at once and records the outcomes.
async fn refresh(resolver: &Arc<Resolver>, table: &mut HostTable, status: &Status) -> bool {
    let mut set = JoinSet::new();
    for name in table.due(Instant::now()) {
        let r = Arc::clone(resolver);
        set.spawn(async move {
            let result = r.lookup(&name).await;
            (name, result)
        });
    }
    let mut changed = false;
    while let Some(joined) = set.join_next().await {
        let Ok((name, result)) = joined else { continue };
        match table.record(&name, result) {
            Refresh::Changed => {
                status.dns_refreshes.inc();
                let addrs = table
                    .get(&name)
                    .map(|s| s.addrs.clone())
                    .unwrap_or_default();
                log::info!("{name} resolves to {addrs:?}");
                changed = true;
            }
            Refresh::Unchanged => {
                status.dns_refreshes.inc();
            }
            Refresh::Failed(e) => {
                status.dns_failures.inc();
                let kept = table.get(&name).map_or(0, |s| s.addrs.len());
                log::warn!(
                    "resolving {name} failed ({e}); keeping its {kept} last good address(es)"
                );
            }
        }
    }
    changed
}

/// Brings the kernel map and the event catalog in step with the plan and the addresses.
fn sync(
    plan: &Plan,
    table: &HostTable,
    resolver: &Resolver,
    maps: &mut KernelMaps,
    catalog: &watch::Sender<Arc<Catalog>>,
    status: &Status,
) -> anyhow::Result<()> {
    let resolved = table.addresses();
    let desired = plan.entries(&resolved, resolver.servers());
    // The catalog first: an event about a new address may follow the map write at once.
    let next = catalog
        .borrow()
        .next(plan, &resolved, std::time::Instant::now());
    catalog.send_replace(Arc::new(next));
    let stats = maps.sync(&desired).context("updating the policy map")?;
    status.syncs.inc();
    status.entries.set(stats.total as i64);
    log::debug!("policy map: {stats:?}");
    Ok(())
}

/// Puts the TC programs on every interface that is up and matches `--iface` (every one without
/// it) and does not have them yet. One that vanished meanwhile is no way around the backstop.
fn attach_found(datapath: &datapath::Shared, patterns: Option<&[String]>) -> anyhow::Result<()> {
    let found = iface::egress_interfaces(patterns).context("listing network interfaces")?;
    for name in found {
        if datapath.with(|d| Ok(d.has_iface(&name)))? {
            continue;
        }
        match datapath.with(|d| d.attach_iface(&name)) {
            Ok(()) => log::info!("TC backstop on {name}"),
            Err(e) if nix::net::if_::if_nametoindex(name.as_str()).is_err() => {
                log::debug!("interface {name} went away before the TC programs: {e}");
            }
            Err(e) => return Err(e).with_context(|| format!("attaching to interface {name}")),
        }
    }
    Ok(())
}

async fn start_relay(
    cfg: &AgentConfig,
    datapath: &datapath::Shared,
    maps: relay::RelayMaps,
    catalog: &watch::Sender<Arc<Catalog>>,
    pipeline: &Pipeline,
    status: &Arc<Status>,
) -> anyhow::Result<Relay> {
    let listeners = relay::bind(cfg.relay.port, cfg.relay.workers())
        .with_context(|| format!("listening for the relay on port {}", cfg.relay.port))?;
    Relay::spawn(
        listeners,
        cfg.relay,
        datapath.clone(),
        maps,
        cfg.cgroup.clone(),
        catalog.subscribe(),
        pipeline.records(),
        pipeline.cgroup_names(),
        Arc::clone(status),
    )
    .context("starting the relay")
}

/// A task aborted when dropped, unless defused: a failed start leaves none behind.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    fn defuse(mut self) -> Option<JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Agent {
    /// Starts enforcing. Returns once the programs are attached with the maps filled.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let mut plan = load_plan(&cfg.policies, cfg.mode, &RuleIds::default())?;
        // Before anything runs: a cgroup another agent enforces is refused, untouched.
        let pins = datapath::open_pins(&cfg.cgroup)?;
        let resolver = Arc::new(Resolver::new(cfg.dns).context("setting up DNS resolution")?);
        let status = Arc::new(Status::default());
        let mut table = HostTable::default();
        table.retain_names(plan.hosts.iter().map(|h| h.name.as_str()));
        refresh(&resolver, &mut table, &status).await;

        let Loaded {
            mut datapath,
            mut maps,
            counters,
            events,
            relay: relay_maps,
            alive,
        } = Datapath::load(&cfg.sizes).context("loading the eBPF programs")?;
        let (catalog, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
        sync(&plan, &table, &resolver, &mut maps, &catalog, &status)?;
        maps.set_mode(plan.mode.kernel())
            .context("writing the mode")?;
        let mount = cgroup::cgroup2_mount().context("finding the cgroup2 mount")?;
        let (cgroup_id, cgroup_level) =
            cgroup::identity(&mount, &cfg.cgroup).context("identifying the enforced cgroup")?;
        datapath.pin_with(pins);
        maps.set_cgroup(cgroup_id, cgroup_level)
            .context("writing the enforced cgroup")?;
        let netns = relay::netns::own_cookie().context("the agent's network namespace")?;
        maps.set_netns(netns)
            .context("writing the agent's network namespace")?;
        maps.set_events_off(cfg.kernel_events_off)
            .context("writing the event switch")?;
        // Stamped before anything is attached: the programs steer only while the agent is alive.
        let heartbeat = Heartbeat::start(alive).context("stamping the agent alive")?;

        // The reader runs before anything is attached, so the first decision is reported.
        let log = match &cfg.events {
            Some(path) => Some(
                LogWriter::open(path, cfg.rotation)
                    .with_context(|| format!("opening the flow log {}", path.display()))?,
            ),
            None => None,
        };
        let pipeline = Pipeline::spawn(
            events,
            counters,
            catalog_rx,
            CgroupNames::new(mount, cfg.cgroup.clone()),
            log,
            Arc::clone(&status),
        )
        .context("watching the event ring buffer")?;
        // The relay listens before anything is attached: the first steered connect finds it. It
        // puts the TC programs in the workloads' namespaces it serves. Pinned, as everything
        // attached from here on.
        let datapath = datapath::Shared::new(datapath);
        let relay =
            match start_relay(&cfg, &datapath, relay_maps, &catalog, &pipeline, &status).await {
                Ok(relay) => relay,
                Err(e) => {
                    datapath.detach();
                    pipeline.stop().await;
                    return Err(e);
                }
            };
        let relay_port = relay.port;
        let attached = async {
            maps.set_relay_port(relay_port)
                .context("writing the relay's port")?;
            let (metrics_task, metrics_addr) = match cfg.metrics {
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("listening for metrics on {addr}"))?;
                    let bound = listener.local_addr().context("metrics listener address")?;
                    (Some(metrics::serve(listener, &status)), Some(bound))
                }
                None => (None, None),
            };
            let metrics_task = AbortOnDrop(metrics_task);
            // Watching before listing: an interface added in between is not missed.
            let watch = match iface::watched(cfg.ifaces.as_deref()) {
                true => Some(LinkWatch::new().context("watching for new network interfaces")?),
                false => None,
            };
            datapath
                .with(|d| d.attach_cgroup(&cfg.cgroup))
                .context("attaching the eBPF programs")?;
            for name in iface::named(cfg.ifaces.as_deref().unwrap_or_default()) {
                datapath
                    .with(|d| d.attach_iface(name))
                    .context("attaching the TC backstop")?;
            }
            if watch.is_some() {
                attach_found(&datapath, cfg.ifaces.as_deref())
                    .context("attaching the TC backstop")?;
            }
            let ifaces = datapath.with(|d| Ok(d.ifaces())).unwrap_or_default();
            anyhow::Ok((metrics_task.defuse(), metrics_addr, ifaces, watch))
        }
        .await;
        let (metrics_task, metrics_addr, ifaces, mut watch) = match attached {
            Ok(ok) => ok,
            Err(e) => {
                // Nothing may outlive a failed start: detach what was attached, stop the tasks.
                datapath.detach();
                relay.stop().await;
                pipeline.stop().await;
                return Err(e);
            }
        };
        // Enforcing now: what an agent that died left on the cgroup can go.
        let stale = datapath.release_stale();
        if stale > 0 {
            log::warn!(
                "took over {}: detached {stale} link(s) an agent that did not stop cleanly left",
                cfg.cgroup.display()
            );
        }
        let summary = format!(
            "enforcing {} ({}) on {}: {} rule(s), {} map entries, resolvers {:?}, TC on [{}], \
             relay on port {relay_port}, flow log {}",
            plan.mode,
            plan.mode_source,
            cfg.cgroup.display(),
            plan.rules.len(),
            maps.entries(),
            resolver.servers(),
            ifaces.join(", "),
            cfg.events
                .as_ref()
                .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
        );

        let (shutdown, mut shutdown_rx) = oneshot::channel();
        let (reload, mut reload_rx) = mpsc::channel(1);
        let st = Arc::clone(&status);
        let task = tokio::spawn(async move {
            // The programs stay attached until the loop ends.
            loop {
                let next = table
                    .next_due()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                let changed = tokio::select! {
                    _ = &mut shutdown_rx => break,
                    Some(()) = reload_rx.recv() => {
                        match load_plan(&cfg.policies, cfg.mode, &plan.ids) {
                            Ok(new) => {
                                st.reloads.inc();
                                table.retain_names(new.hosts.iter().map(|h| h.name.as_str()));
                                refresh(&resolver, &mut table, &st).await;
                                if let Err(e) = maps.set_mode(new.mode.kernel()) {
                                    log::error!("{e:#}");
                                }
                                plan = new;
                                log::info!("policy reloaded: {} rule(s), mode {}", plan.rules.len(), plan.mode);
                                true
                            }
                            Err(e) => {
                                st.reload_failures.inc();
                                log::error!("{e:#}; the policy in force stays in force");
                                false
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(next) => refresh(&resolver, &mut table, &st).await,
                    changed = async {
                        match watch.as_mut() {
                            Some(w) => w.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        match changed {
                            Ok(()) => {
                                if let Err(e) = attach_found(&datapath, cfg.ifaces.as_deref()) {
                                    log::error!("{e:#}; packets leaving by it are not judged");
                                }
                            }
                            Err(e) => {
                                log::error!("watching for new network interfaces: {e}; new ones get no TC backstop");
                                watch = None;
                            }
                        }
                        false
                    }
                };
                if changed && let Err(e) = sync(&plan, &table, &resolver, &mut maps, &catalog, &st)
                {
                    log::error!("{e:#}; will retry on the next change");
                }
            }
            // Detach first, then end the relay's connections, then drain: every decision taken
            // is in the log before we return.
            datapath.detach();
            drop(heartbeat);
            relay.stop().await;
            pipeline.stop().await;
            if let Some(task) = metrics_task {
                task.abort();
            }
        });
        Ok(Agent {
            shutdown: Some(shutdown),
            reload,
            task,
            status,
            summary,
            metrics_addr,
            relay_port,
        })
    }

    /// Asks the agent to re-read its policy files.
    pub async fn reload(&self) {
        let _ = self.reload.send(()).await;
    }

    /// Stops enforcing: detaches the programs.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Err(e) = (&mut self.task).await {
            log::error!("agent task ended abnormally: {e}");
        }
    }
}
