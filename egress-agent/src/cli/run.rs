use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{EnforceArgs, Global, events::default_log, runtime};
use crate::{
    agent::{Agent, AgentConfig},
    datapath::cgroup,
};

pub fn run(global: &Global, cgroup_arg: &Path, enforce: &EnforceArgs) -> ExitCode {
    if let Err(e) = crate::relay::raise_nofile() {
        log::warn!("raising the descriptor limit: {e}");
    }
    match runtime()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(serve(global, cgroup_arg, enforce)))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(global: &Global, cgroup_arg: &Path, enforce: &EnforceArgs) -> anyhow::Result<()> {
    let cgroup = cgroup::resolve(cgroup_arg).context("preparing the cgroup")?;
    let cfg = enforce.apply(
        AgentConfig {
            policies: global.policy_paths(),
            mode: global.mode,
            dns: global.dns,
            cgroup,
            ..AgentConfig::default()
        },
        Some(default_log()),
    )?;
    let agent = Agent::start(cfg).await?;
    log::info!("ready: {}", agent.summary);
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                log::info!("SIGHUP: reloading the policy");
                agent.reload().await;
            }
        }
    }
    log::info!("stopping: programs detached");
    agent.shutdown().await;
    Ok(())
}
