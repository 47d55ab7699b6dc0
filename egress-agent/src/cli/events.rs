//! `egress events`: reads or follows the flow log, filtered, as a table or as the raw lines.
use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    str::FromStr as _,
    time::Duration,
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use jiff::{SignedDuration, Timestamp};

use super::EventsArgs;
use crate::events::{LogReader, Record, log::rotated};
use crate::glob::glob_match;

/// How often a follower looks for new lines and rotations.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub fn events(args: &EventsArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`egress events | head`) is the reader's choice, not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress events: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// Which destinations `--dst` selects.
enum Dst {
    Exact(SocketAddr),
    Ip(IpAddr),
    Net(IpNet),
}

struct Filter {
    verdict: Option<String>,
    kind: Option<String>,
    host: Option<String>,
    dst: Option<Dst>,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
}

/// A time: RFC 3339, `@` Unix seconds, or a duration before now (`10m`, `1h30m`, `2 days`).
fn parse_time(s: &str) -> anyhow::Result<Timestamp> {
    if let Ok(t) = Timestamp::from_str(s) {
        return Ok(t);
    }
    if let Some(secs) = s.strip_prefix('@') {
        let secs: i64 = secs
            .parse()
            .with_context(|| format!("`{s}` is not @ and Unix seconds"))?;
        return Timestamp::from_second(secs).with_context(|| format!("`{s}` is out of range"));
    }
    let ago = SignedDuration::from_str(s)
        .with_context(|| format!("`{s}` is neither an RFC 3339 time nor a duration like 10m"))?;
    Timestamp::now()
        .checked_sub(ago)
        .with_context(|| format!("`{s}` reaches before the representable past"))
}

impl Filter {
    fn new(args: &EventsArgs) -> anyhow::Result<Filter> {
        let dst = match args.dst.as_deref() {
            None => None,
            Some(s) => Some(if let Ok(sa) = s.parse() {
                Dst::Exact(sa)
            } else if let Ok(ip) = s.trim_matches(['[', ']']).parse() {
                Dst::Ip(ip)
            } else if let Ok(net) = s.parse() {
                Dst::Net(net)
            } else {
                bail!("--dst `{s}` is not ADDR, ADDR:PORT or a CIDR");
            }),
        };
        Ok(Filter {
            verdict: args.verdict.map(|v| v.as_str().to_owned()),
            kind: args.kind.clone(),
            host: args.host.as_ref().map(|h| h.to_ascii_lowercase()),
            dst,
            since: args.since.as_deref().map(parse_time).transpose()?,
            until: args.until.as_deref().map(parse_time).transpose()?,
        })
    }

    fn matches(&self, r: &Record) -> bool {
        if self.verdict.is_some() && r.verdict.as_deref() != self.verdict.as_deref() {
            return false;
        }
        if self.kind.as_ref().is_some_and(|k| *k != r.kind) {
            return false;
        }
        if let Some(glob) = &self.host
            && !r
                .host
                .as_deref()
                .is_some_and(|h| glob_match(glob, &h.to_ascii_lowercase()))
        {
            return false;
        }
        if let Some(dst) = &self.dst {
            let Some(sa) = r.dst else { return false };
            let ok = match dst {
                Dst::Exact(want) => *want == sa,
                Dst::Ip(ip) => *ip == sa.ip(),
                Dst::Net(net) => net.contains(&sa.ip()),
            };
            if !ok {
                return false;
            }
        }
        self.since.is_none_or(|t| r.time >= t) && self.until.is_none_or(|t| r.time <= t)
    }
}

struct Printer {
    json: bool,
    header_done: bool,
}

impl Printer {
    fn line(&mut self, raw: &str, r: &Record) -> io::Result<()> {
        let mut out = io::stdout().lock();
        if self.json {
            return writeln!(out, "{raw}");
        }
        if !self.header_done {
            self.header_done = true;
            writeln!(
                out,
                "{:<24} {:<7} {:<7} {:<6} {:<30} {:<24} {:<36} {:>7} {:<15} DETAIL",
                "TIME", "KIND", "VERDICT", "PROTO", "DST", "HOST", "RULE", "PID", "COMM"
            )?;
        }
        let rule = r.rule.as_deref().or(r.reason.as_deref());
        let detail = match &*r.kind {
            // A socket's denial that folded the same call denied again (see `connects`).
            "close" if r.verdict.as_deref() == Some("deny") => format!(
                "{} calls denied in {} ms",
                r.connects.unwrap_or(1),
                r.duration_ms.unwrap_or(0)
            ),
            "close" => {
                let mut d = format!(
                    "out {} B/{} pkt, in {} B/{} pkt, {} ms",
                    r.bytes_out.unwrap_or(0),
                    r.packets_out.unwrap_or(0),
                    r.bytes_in.unwrap_or(0),
                    r.packets_in.unwrap_or(0),
                    r.duration_ms.unwrap_or(0)
                );
                if let Some(n) = r.connects.filter(|&n| n > 1) {
                    d.push_str(&format!(", {n} connects"));
                }
                d
            }
            "lost" => format!(
                "{} event(s) lost in the kernel ({} in all)",
                r.lost.unwrap_or(0),
                r.lost_total.unwrap_or(0)
            ),
            "packet" => format!("on {}", dash(&r.iface)),
            "sockopt" => "socket option refused".to_owned(),
            "relay" => {
                let mut d = format!(
                    "{} sni {} -> {}, up {} B, down {} B, {} ms",
                    dash(&r.outcome),
                    dash(&r.sni),
                    dash(&r.upstream),
                    r.bytes_up.unwrap_or(0),
                    r.bytes_down.unwrap_or(0),
                    r.duration_ms.unwrap_or(0)
                );
                if let Some(mode) = &r.origination {
                    d.push_str(&format!(
                        ", TLS {mode} originated, {} request(s), last {}",
                        r.requests.unwrap_or(0),
                        r.status.map_or_else(|| "-".to_owned(), |s| s.to_string())
                    ));
                }
                if r.outcome.as_deref() != Some("ok")
                    && let Some(reason) = &r.reason
                {
                    d.push_str(": ");
                    d.push_str(reason);
                }
                d
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<24} {:<7} {:<7} {:<6} {:<30} {:<24} {:<36} {:>7} {:<15} {}",
            r.time.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            r.kind,
            dash(&r.verdict),
            dash(&r.proto),
            dash(&r.dst),
            dash(&r.host),
            rule.unwrap_or("-"),
            r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            dash(&r.comm),
            detail
        )
    }
}

/// A field as the table shows it: `-` when absent.
fn dash<T: std::fmt::Display>(o: &Option<T>) -> String {
    o.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// Prints the matching lines `reader` has now. Unparseable lines are counted on stderr.
fn print_available(
    reader: &mut LogReader,
    filter: &Filter,
    printer: &mut Printer,
    bad: &mut u64,
) -> anyhow::Result<()> {
    while let Some(line) = reader.next_line()? {
        match serde_json::from_str::<Record>(&line) {
            Ok(r) if filter.matches(&r) => printer.line(&line, &r)?,
            Ok(_) => {}
            Err(e) => {
                *bad += 1;
                if *bad == 1 {
                    eprintln!("egress events: skipping a line that is not a flow event: {e}");
                }
            }
        }
    }
    Ok(())
}

fn run(args: &EventsArgs) -> anyhow::Result<()> {
    let filter = Filter::new(args)?;
    let mut printer = Printer {
        json: args.json,
        header_done: false,
    };
    let mut bad = 0;
    let path: &Path = &args.file;
    if !args.follow {
        // Oldest first: the rotated files, then the live one.
        let oldest = (1..).take_while(|&n| rotated(path, n).exists()).count() as u32;
        for n in (1..=oldest).rev() {
            let mut r = LogReader::open(&rotated(path, n))?;
            print_available(&mut r, &filter, &mut printer, &mut bad)?;
        }
        let mut reader = LogReader::open(path)
            .with_context(|| format!("opening the flow log {}", path.display()))?;
        return print_available(&mut reader, &filter, &mut printer, &mut bad);
    }
    let mut reader = open_when_present(path)?;
    if filter.since.is_none() {
        reader.seek_end()?;
    }
    loop {
        print_available(&mut reader, &filter, &mut printer, &mut bad)?;
        if !reader.reopen_if_rotated()? {
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}

/// Following a log that does not exist yet waits for it, as `tail -F` does.
fn open_when_present(path: &Path) -> anyhow::Result<LogReader> {
    let mut warned = false;
    loop {
        match LogReader::open(path) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !warned {
                    eprintln!("egress events: waiting for {} to appear", path.display());
                    warned = true;
                }
                std::thread::sleep(FOLLOW_POLL);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("opening the flow log {}", path.display()));
            }
        }
    }
}

/// The default log of `egress run`.
pub fn default_log() -> PathBuf {
    PathBuf::from("/var/log/egress/flows.jsonl")
}
