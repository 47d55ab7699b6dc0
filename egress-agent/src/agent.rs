//! The agent: compile the policy, resolve its hostnames, fill the maps, attach, then keep the maps
//! in step with DNS and with policy reloads. Ready means attached with the maps filled.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    sync::{mpsc, oneshot},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::{
    datapath::Datapath,
    maps::KernelMaps,
    policy::{self, Mode, Plan, Severity},
    resolve::{HostTable, Refresh, Resolver},
};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub policies: Vec<PathBuf>,
    pub mode: Option<Mode>,
    pub dns: Option<SocketAddr>,
    /// The cgroup v2 directory to enforce on.
    pub cgroup: PathBuf,
}

/// Counters others can watch (tests poll them; metrics will export them).
#[derive(Debug, Default)]
pub struct Status {
    pub dns_refreshes: AtomicU64,
    pub dns_failures: AtomicU64,
    pub syncs: AtomicU64,
    pub entries: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

pub struct Agent {
    shutdown: Option<oneshot::Sender<()>>,
    reload: mpsc::Sender<()>,
    task: JoinHandle<()>,
    pub status: Arc<Status>,
    pub summary: String,
}

/// Loads and compiles the policy, logging warnings. Any error refuses the whole policy.
pub fn load_plan(policies: &[PathBuf], mode: Option<Mode>) -> anyhow::Result<Plan> {
    let (pol, mut diags) = policy::load(policies);
    let plan = if policy::has_errors(&diags) {
        None
    } else {
        let (plan, more) = policy::compile(&pol, mode);
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
        status.dns_refreshes.fetch_add(1, Ordering::Relaxed);
        match table.record(&name, result) {
            Refresh::Changed => {
                let addrs = table
                    .get(&name)
                    .map(|s| s.addrs.clone())
                    .unwrap_or_default();
                log::info!("{name} resolves to {addrs:?}");
                changed = true;
            }
            Refresh::Unchanged => {}
            Refresh::Failed(e) => {
                status.dns_failures.fetch_add(1, Ordering::Relaxed);
                let kept = table.get(&name).map_or(0, |s| s.addrs.len());
                log::warn!(
                    "resolving {name} failed ({e}); keeping its {kept} last good address(es)"
                );
            }
        }
    }
    changed
}

fn sync(
    plan: &Plan,
    table: &HostTable,
    resolver: &Resolver,
    maps: &mut KernelMaps,
    status: &Status,
) -> anyhow::Result<()> {
    let desired = plan.entries(&table.addresses(), resolver.servers());
    let stats = maps.sync(&desired).context("updating the policy map")?;
    status.syncs.fetch_add(1, Ordering::Relaxed);
    status.entries.store(stats.total as u64, Ordering::Relaxed);
    log::debug!("policy map: {stats:?}");
    Ok(())
}

impl Agent {
    /// Starts enforcing. Returns once the programs are attached with the maps filled.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        let mut plan = load_plan(&cfg.policies, cfg.mode)?;
        let resolver = Arc::new(Resolver::new(cfg.dns).context("setting up DNS resolution")?);
        let status = Arc::new(Status::default());
        let mut table = HostTable::default();
        table.retain_names(plan.hosts.iter().map(|h| h.name.as_str()));
        refresh(&resolver, &mut table, &status).await;

        let (mut datapath, mut maps) = Datapath::load().context("loading the eBPF programs")?;
        sync(&plan, &table, &resolver, &mut maps, &status)?;
        maps.set_mode(plan.mode.kernel())
            .context("writing the mode")?;
        datapath
            .attach(&cfg.cgroup)
            .context("attaching the eBPF programs")?;
        let summary = format!(
            "enforcing {} ({}) on {}: {} rule(s), {} map entries, resolvers {:?}",
            plan.mode,
            plan.mode_source,
            cfg.cgroup.display(),
            plan.rules.len(),
            maps.entries(),
            resolver.servers()
        );

        let (shutdown, mut shutdown_rx) = oneshot::channel();
        let (reload, mut reload_rx) = mpsc::channel(1);
        let st = Arc::clone(&status);
        let task = tokio::spawn(async move {
            // Holding the datapath keeps the programs attached until the loop ends.
            let _datapath = datapath;
            loop {
                let next = table
                    .next_due()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                let changed = tokio::select! {
                    _ = &mut shutdown_rx => break,
                    Some(()) = reload_rx.recv() => {
                        match load_plan(&cfg.policies, cfg.mode) {
                            Ok(new) => {
                                st.reloads.fetch_add(1, Ordering::Relaxed);
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
                                st.reload_failures.fetch_add(1, Ordering::Relaxed);
                                log::error!("{e:#}; the policy in force stays in force");
                                false
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(next) => refresh(&resolver, &mut table, &st).await,
                };
                if changed && let Err(e) = sync(&plan, &table, &resolver, &mut maps, &st) {
                    log::error!("{e:#}; will retry on the next change");
                }
            }
        });
        Ok(Agent {
            shutdown: Some(shutdown),
            reload,
            task,
            status,
            summary,
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
