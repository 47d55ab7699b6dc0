//! Command line, as design.md §3 specifies.
mod check;
mod exec;
mod run;
mod validate;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};

use crate::policy::{Mode, schema::Transport};

#[derive(Debug, Parser)]
#[command(
    name = "egress",
    version,
    about = "Istio egress policy, enforced in the Linux kernel"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Policy file or directory (repeatable).
    #[arg(long = "policies", global = true, value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Overrides the policies' outboundTrafficPolicy (Istio's default is allow-any).
    #[arg(long, global = true, value_enum)]
    pub mode: Option<Mode>,
    /// Resolver to use, ADDR[:PORT] (default: the system's).
    #[arg(long, global = true, value_name = "ADDR[:PORT]", value_parser = parse_dns)]
    pub dns: Option<SocketAddr>,
}

impl Global {
    pub fn policy_paths(&self) -> Vec<PathBuf> {
        if self.policies.is_empty() {
            vec![PathBuf::from("policies")]
        } else {
            self.policies.clone()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the agent in the foreground, enforcing on a cgroup.
    Run {
        /// cgroup v2 path (absolute, or relative to the cgroup2 mount; `/` is the whole host).
        #[arg(long, default_value = "egress")]
        cgroup: PathBuf,
    },
    /// Runs one command under enforcement in its own cgroup, then cleans up.
    Exec {
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Offline: what would happen to a connection to DEST[:PORT] (port 443 if omitted).
    Check {
        #[arg(value_name = "DEST[:PORT]")]
        dest: String,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
    },
    /// Parses and compiles the policies; prints every problem as file:line:col: message.
    Validate,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl From<Proto> for Transport {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => Transport::Tcp,
            Proto::Udp => Transport::Udp,
        }
    }
}

fn parse_dns(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("`{s}` is not ADDR or ADDR:PORT"))
}

/// Parses and runs the command line. Exit statuses per design.md §3.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors: 2 (check and validate document it; exec reserves 125 for itself).
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if std::env::args().nth(1).as_deref() == Some("exec") => 125,
                _ => 2,
            };
            return ExitCode::from(code);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let Cli { global, command } = cli;
    match command {
        Command::Run { cgroup } => run::run(&global, &cgroup),
        Command::Exec { command } => exec::exec(&global, &command),
        Command::Check { dest, proto } => check::check(&global, &dest, proto.into()),
        Command::Validate => validate::validate(&global),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
