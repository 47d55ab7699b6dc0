//! Command line, as design.md §3 specifies.
mod check;
mod events;
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
        #[command(flatten)]
        enforce: EnforceArgs,
    },
    /// Runs one command under enforcement in its own cgroup, then cleans up.
    Exec {
        #[command(flatten)]
        enforce: EnforceArgs,
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
    /// Reads or follows the flow log, filtered.
    Events(EventsArgs),
}

/// What `run` and `exec` share besides the policy options.
#[derive(Debug, Clone, Args)]
pub struct EnforceArgs {
    /// Flow log, JSON lines, appended (`run` default: /var/log/egress/flows.jsonl).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Rotate the flow log when it reaches SIZE (bytes; K, M and G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "100M", value_parser = parse_size)]
    pub events_max_size: u64,
    /// Rotated flow logs to keep (FILE.1 … FILE.N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub events_keep: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Interface for the TC backstop, a name or a pattern with * and ? (repeatable; default:
    /// every interface that is up, loopback aside). Interfaces that come up later and match get
    /// it too.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Event ring buffer size (a power of two, at least a page; K and M suffixes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ring_size: Option<u64>,
    /// Flows the kernel tracks at once, for their close records and byte counts (default 65536);
    /// flows beyond are counted in egress_flows_untracked_total.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_table: Option<u32>,
    /// Port of the gateway relay on 127.0.0.1 and ::1, where steered connections go (default: a
    /// free port, which the kernel programs are told); its first worker's, the others listen on
    /// free ports.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub relay_port: u16,
    /// The relay's worker threads (default: one per CPU the agent may run on; at most 64). A
    /// steered connection goes to worker (CPU it connected on) modulo N: more workers than the
    /// node's CPUs leaves the extra ones idle.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=egress_common::RELAY_WORKERS_MAX as i64))]
    pub relay_workers: Option<u16>,
    /// Longest wait for a steered connection's TLS ClientHello.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub relay_hello_timeout: std::time::Duration,
    /// Close a relayed connection after this long without a byte either way.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub relay_idle_timeout: std::time::Duration,
    /// Relayed connections held at once (default: half the descriptors the agent may open, less
    /// a reserve); more are refused.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub relay_max_connections: Option<u32>,
    /// Relayed connections one workload (a cgroup) holds at once (default: half of
    /// --relay-max-connections); more are refused, so one workload cannot take the others'.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub relay_max_per_workload: Option<u32>,
}

/// `500ms`, `10s`, `5m`, `1h`: as Istio writes durations.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<crate::policy::schema::IstioDuration>()
        .map(|d| d.0)
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// The flow log to read.
    #[arg(long, value_name = "FILE", default_value_os_t = events::default_log())]
    pub file: PathBuf,
    /// Keep reading as events arrive (across rotations). Starts at the end unless --since.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
    /// `connect`, `sendmsg`, `packet`, `close`, `lost`, …
    #[arg(long)]
    pub kind: Option<String>,
    /// Host glob (`*.example.com`): the destination's host, or the host a route sent a relayed
    /// connection to.
    #[arg(long, value_name = "GLOB")]
    pub host: Option<String>,
    /// Destination: ADDR, ADDR:PORT or a CIDR.
    #[arg(long, value_name = "DEST")]
    pub dst: Option<String>,
    /// Relay records' outcome: `ok`, `refused`, `upstream-failed`, `idle-timeout`, `error`,
    /// `stopped`.
    #[arg(long, value_name = "WORD")]
    pub outcome: Option<String>,
    /// The workload's cgroup path glob (`/kubepods/*`).
    #[arg(long, value_name = "GLOB")]
    pub cgroup: Option<String>,
    /// The process id.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Events at or after TIME: RFC 3339, @UNIX-SECONDS, or a duration ago (`10m`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Events at or before TIME.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Print the raw JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VerdictArg {
    Allow,
    Deny,
    Steer,
}

impl VerdictArg {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictArg::Allow => "allow",
            VerdictArg::Deny => "deny",
            VerdictArg::Steer => "steer",
        }
    }
}

/// Bytes with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{s}` is not a size like 4096, 64K or 100M"))
}

impl EnforceArgs {
    /// The agent's settings for these options; `default_log` applies when --events is absent.
    fn apply(
        &self,
        cfg: crate::agent::AgentConfig,
        default_log: Option<PathBuf>,
    ) -> anyhow::Result<crate::agent::AgentConfig> {
        let ring_bytes = match self.ring_size {
            Some(n) => Some(
                u32::try_from(n).map_err(|_| anyhow::anyhow!("--ring-size {n} is too large"))?,
            ),
            None => None,
        };
        Ok(crate::agent::AgentConfig {
            ifaces: (!self.ifaces.is_empty()).then(|| self.ifaces.clone()),
            events: self.events.clone().or(default_log),
            rotation: crate::events::Rotation {
                max_bytes: self.events_max_size,
                keep: self.events_keep,
            },
            sizes: crate::datapath::Sizes {
                ring_bytes,
                flows: self.flow_table,
            },
            metrics: self.metrics,
            relay: crate::relay::RelayConfig {
                port: self.relay_port,
                hello_timeout: self.relay_hello_timeout,
                idle_timeout: self.relay_idle_timeout,
                max_connections: self.relay_max_connections.map(|n| n as usize),
                max_per_workload: self.relay_max_per_workload.map(|n| n as usize),
                workers: self.relay_workers.map(usize::from),
                ..cfg.relay
            },
            ..cfg
        })
    }
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
        Command::Run { cgroup, enforce } => run::run(&global, &cgroup, &enforce),
        Command::Exec { enforce, command } => exec::exec(&global, &enforce, &command),
        Command::Check { dest, proto } => check::check(&global, &dest, proto.into()),
        Command::Validate => validate::validate(&global),
        Command::Events(args) => events::events(&args),
    }
}

/// One worker per CPU (tokio's default), as the peers run a worker per CPU: the relay's
/// connections spread over the node's cores. Idle workers sleep.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_of(args: &[&str]) -> Result<crate::relay::RelayConfig, clap::Error> {
        let cli = Cli::try_parse_from(["egress", "run"].iter().chain(args))?;
        let Command::Run { enforce, .. } = cli.command else {
            unreachable!("parsed as run")
        };
        let cfg = enforce
            .apply(crate::agent::AgentConfig::default(), None)
            .expect("settings");
        Ok(cfg.relay)
    }

    #[test]
    fn the_relays_limits_are_set_or_left_to_the_descriptor_limit() {
        let relay = relay_of(&[]).expect("defaults");
        assert_eq!(
            (relay.max_connections, relay.max_per_workload),
            (None, None)
        );
        let relay = relay_of(&[
            "--relay-max-connections",
            "1000",
            "--relay-max-per-workload",
            "100",
        ])
        .expect("limits");
        assert_eq!(
            (relay.max_connections, relay.max_per_workload),
            (Some(1000), Some(100))
        );
        // No limit of none: that would refuse every steered connection.
        assert!(relay_of(&["--relay-max-per-workload", "0"]).is_err());
        assert!(relay_of(&["--relay-max-connections", "0"]).is_err());
    }

    #[test]
    fn the_relays_workers_are_one_per_cpu_or_as_many_as_asked_within_the_kernels_table() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(relay_of(&[]).expect("defaults").workers(), cpus.min(64));
        let relay = relay_of(&["--relay-workers", "3"]).expect("three");
        assert_eq!((relay.workers, relay.workers()), (Some(3), 3));
        assert_eq!(
            relay_of(&["--relay-workers", "64"]).expect("64").workers(),
            64
        );
        assert!(relay_of(&["--relay-workers", "0"]).is_err());
        assert!(relay_of(&["--relay-workers", "65"]).is_err());
    }
}
