use std::{
    ffi::{CString, OsString},
    os::unix::{ffi::OsStrExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{EnforceArgs, Global, runtime};
use crate::{
    agent::{Agent, AgentConfig},
    datapath::cgroup,
};

/// egress's own failure, as `env` and container runtimes report it.
const EXIT_EGRESS_FAILED: u8 = 125;

pub fn exec(global: &Global, enforce: &EnforceArgs, command: &[OsString]) -> ExitCode {
    // The command gets the limits it was given back.
    let nofile = crate::relay::raise_nofile()
        .inspect_err(|e| log::warn!("raising the descriptor limit: {e}"))
        .ok();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("starting the async runtime: {e}");
            return ExitCode::from(EXIT_EGRESS_FAILED);
        }
    };
    let cg = match cgroup::cgroup2_mount() {
        Ok(mount) => mount.join(format!("egress-exec-{}", std::process::id())),
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_EGRESS_FAILED);
        }
    };
    let result = rt.block_on(supervise(global, enforce, &cg, command, nofile));
    // Processes the command left behind would run unenforced once the programs go: end them.
    if cg.exists()
        && let Err(e) = cgroup::kill_and_remove(&cg)
    {
        log::error!("cleaning up: {e}");
    }
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(EXIT_EGRESS_FAILED)
        }
    }
}

async fn supervise(
    global: &Global,
    enforce: &EnforceArgs,
    cg: &PathBuf,
    command: &[OsString],
    nofile: Option<(u64, u64)>,
) -> anyhow::Result<u8> {
    std::fs::create_dir(cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
    let cfg = enforce.apply(
        AgentConfig {
            policies: global.policy_paths(),
            mode: global.mode,
            dns: global.dns,
            cgroup: cg.clone(),
            ..AgentConfig::default()
        },
        None,
    )?;
    let agent = Agent::start(cfg).await?;
    log::debug!("ready: {}", agent.summary);
    let status = run_child(cg, command, nofile).await;
    agent.shutdown().await;
    status
}

/// Runs the command inside the cgroup, with the descriptor limits `nofile` if given. Only the
/// child joins the cgroup: egress itself stays outside.
async fn run_child(
    cg: &Path,
    command: &[OsString],
    nofile: Option<(u64, u64)>,
) -> anyhow::Result<u8> {
    let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path contains a NUL byte")?;
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, open, write, close)
    // are made.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((soft, hard)) = nofile {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process: the child, before it runs anything.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let name = command[0].to_string_lossy();
            // As shells and `env` report these.
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => return Err(e).with_context(|| format!("starting {name}")),
            };
            log::error!("{name}: {e}");
            return Ok(code);
        }
    };
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status?,
            _ = int.recv() => nix::sys::signal::Signal::SIGINT,
            _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
            _ = hup.recv() => nix::sys::signal::Signal::SIGHUP,
        };
        // The command decides what a signal means; egress cleans up once it has exited.
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    };
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => EXIT_EGRESS_FAILED,
    })
}
