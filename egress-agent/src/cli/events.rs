//! `egress events`: reads or follows the flow log, filtered, as a table or as the raw lines.
use std::{
    borrow::Cow,
    io,
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
use crate::text::printable;

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
    outcome: Option<String>,
    cgroup: Option<String>,
    pid: Option<u32>,
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
            outcome: args.outcome.clone(),
            cgroup: args.cgroup.clone(),
            pid: args.pid,
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
        // The host dialled, or the one a route sent the connection to.
        if let Some(glob) = &self.host
            && ![&r.host, &r.upstream_host].iter().any(|h| {
                h.as_deref()
                    .is_some_and(|h| glob_match(glob, &h.to_ascii_lowercase()))
            })
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
        if self.outcome.is_some() && r.outcome.as_deref() != self.outcome.as_deref() {
            return false;
        }
        if let Some(glob) = &self.cgroup
            && !r.cgroup.as_deref().is_some_and(|c| glob_match(glob, c))
        {
            return false;
        }
        if self.pid.is_some() && r.pid != self.pid {
            return false;
        }
        self.since.is_none_or(|t| r.time >= t) && self.until.is_none_or(|t| r.time <= t)
    }
}

/// The table's columns before DETAIL: name, first width, right-aligned.
const COLUMNS: [(&str, usize, bool); 9] = [
    ("TIME", 24, false),
    ("KIND", 7, false),
    ("VERDICT", 7, false),
    ("PROTO", 6, false),
    ("DST", 30, false),
    ("HOST", 24, false),
    ("RULE", 36, false),
    ("PID", 7, true),
    ("COMM", 15, false),
];

struct Printer {
    json: bool,
    /// The columns' widths once the header is out. A value wider than its column widens it and
    /// the header is printed again, so the lines below it line up (a log read or followed is
    /// not known ahead).
    widths: Option<[usize; COLUMNS.len()]>,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer { json, widths: None }
    }

    fn line(&mut self, raw: &str, r: &Record) -> io::Result<()> {
        self.write(&mut io::stdout().lock(), raw, r)
    }

    fn write(&mut self, out: &mut impl io::Write, raw: &str, r: &Record) -> io::Result<()> {
        if self.json {
            return writeln!(out, "{raw}");
        }
        // Escaped: a workload names its own process and interfaces.
        let cells = [
            r.time.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            r.kind.to_string(),
            dash(&r.verdict),
            dash(&r.proto),
            dash(&r.dst),
            dash(&r.host),
            r.rule
                .as_deref()
                .or(r.reason.as_deref())
                .unwrap_or("-")
                .to_owned(),
            r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            dash(&r.comm),
        ]
        .map(|cell| match printable(&cell) {
            Cow::Borrowed(_) => cell,
            Cow::Owned(escaped) => escaped,
        });
        let mut widths = self.widths.unwrap_or(COLUMNS.map(|(_, w, _)| w));
        for (w, cell) in widths.iter_mut().zip(&cells) {
            *w = (*w).max(cell.chars().count());
        }
        if self.widths != Some(widths) {
            self.widths = Some(widths);
            row(out, &widths, COLUMNS.map(|(name, _, _)| name), "DETAIL")?;
        }
        row(
            out,
            &widths,
            cells.each_ref().map(String::as_str),
            &printable(&detail(r)),
        )
    }
}

/// One line of the table: the cells padded to `widths`, then the detail.
fn row(
    out: &mut impl io::Write,
    widths: &[usize; COLUMNS.len()],
    cells: [&str; COLUMNS.len()],
    detail: &str,
) -> io::Result<()> {
    for ((cell, width), (_, _, right)) in cells.iter().zip(widths).zip(COLUMNS) {
        if right {
            write!(out, "{cell:>width$} ")?;
        } else {
            write!(out, "{cell:<width$} ")?;
        }
    }
    writeln!(out, "{detail}")
}

/// The table's last column: what the record's kind says beyond the columns.
fn detail(r: &Record) -> String {
    match &*r.kind {
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
            // A connection carried as it came, or served as plain HTTP, has no server name.
            let sni = r
                .sni
                .as_deref()
                .map_or_else(String::new, |s| format!(" sni {s}"));
            // Where a route sent it to another host, that host.
            let routed = r
                .upstream_host
                .as_deref()
                .map_or_else(String::new, |h| format!("{h} "));
            let mut d = format!(
                "{}{sni} -> {routed}{}, up {} B, down {} B, {} ms",
                dash(&r.outcome),
                dash(&r.upstream),
                r.bytes_up.unwrap_or(0),
                r.bytes_down.unwrap_or(0),
                r.duration_ms.unwrap_or(0)
            );
            if let Some(requests) = r.requests {
                let status = r.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
                match &r.origination {
                    Some(mode) => d.push_str(&format!(", TLS {mode} originated")),
                    None => d.push_str(", plain HTTP"),
                }
                d.push_str(&format!(", {requests} request(s), last {status}"));
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
    let mut printer = Printer::new(args.json);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(line: &str) -> Record {
        serde_json::from_str(line).expect("a flow record")
    }

    /// A value wider than its column widens it, and the header is printed again above the
    /// lines that follow: every line's columns start where its header's do.
    #[test]
    fn a_wide_value_widens_its_column_under_a_new_header() {
        let short = r#"{"time":"2026-01-01T10:00:00Z","kind":"connect","verdict":"allow","proto":"tcp","dst":"198.18.0.10:443","host":"api.example.com","rule":"ServiceEntry/default/api","pid":7,"comm":"curl"}"#;
        let long = r#"{"time":"2026-01-01T10:00:01Z","kind":"connect","verdict":"steer","proto":"tcp","dst":"[fd00:e9e5:aaaa:bbbb:cccc:dddd:eeee:ffff]:443","host":"api.example.com","rule":"ServiceEntry/default/external-weather-api","pid":4194304,"comm":"curl"}"#;
        let mut printer = Printer::new(false);
        let mut out = Vec::new();
        for line in [short, long, short] {
            printer.write(&mut out, line, &record(line)).expect("write");
        }
        let out = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "two headers and three lines:\n{out}");
        assert!(
            lines[0].starts_with("TIME") && lines[2].starts_with("TIME"),
            "{out}"
        );
        // Where each column starts, from the header above the line.
        let starts = |header: &str| -> Vec<usize> {
            COLUMNS
                .iter()
                .map(|(name, _, _)| header.find(&format!(" {name} ")).map_or(0, |i| i + 1))
                .collect()
        };
        let (first, second) = (starts(lines[0]), starts(lines[2]));
        assert!(
            second[4] == first[4] && second[5] > first[5],
            "DST widened:\n{out}"
        );
        for (line, starts) in [(lines[1], &first), (lines[3], &second), (lines[4], &second)] {
            // COMM is left-aligned: its value starts at its column.
            assert_eq!(line.find(" curl ").map(|i| i + 1), Some(starts[8]), "{out}");
            // PID is right-aligned: it ends one before COMM.
            let pid = if line == lines[3] { "4194304" } else { "7" };
            assert_eq!(
                line.find(&format!(" {pid} ")).map(|i| i + 1 + pid.len()),
                Some(starts[8] - 1),
                "{out}"
            );
            // The rule starts at RULE's column.
            assert_eq!(
                line.find(" ServiceEntry/").map(|i| i + 1),
                Some(starts[6]),
                "{out}"
            );
        }
        // The widths stay: a narrow line after a wide one keeps the wide columns, no new header.
        assert_eq!(lines[3].find(" curl "), lines[4].find(" curl "), "{out}");
    }

    /// A process's own name cannot reach the reader's terminal as an escape sequence.
    #[test]
    fn the_table_escapes_what_workloads_name() {
        let line = r#"{"time":"2026-01-01T10:00:00Z","kind":"packet","verdict":"deny","proto":"icmp","dst":"198.18.0.66:0","pid":7,"comm":"\u001b]0;owned\u0007x","iface":"eth\u001b[2J"}"#;
        let mut out = Vec::new();
        Printer::new(false)
            .write(&mut out, line, &record(line))
            .expect("write");
        let out = String::from_utf8(out).expect("utf8");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        let row = out.lines().nth(1).expect("a row");
        assert!(row.contains(" \\u{1b}]0;owned\\u{7}x "), "{row}");
        assert!(row.ends_with("on eth\\u{1b}[2J"), "{row}");
    }

    /// A relay record's detail: the server name where there was one, and the requests where the
    /// relay served HTTP.
    #[test]
    fn relay_details_say_what_the_relay_saw() {
        let detail_of = |line: &str| {
            let mut out = Vec::new();
            Printer::new(false)
                .write(&mut out, line, &record(line))
                .expect("write");
            let out = String::from_utf8(out).expect("utf8");
            let row = out.lines().nth(1).expect("a row").to_owned();
            row.split("  ").last().expect("detail").trim().to_owned()
        };
        let base = r#"{"time":"2026-01-01T10:00:00Z","kind":"relay","verdict":"steer","proto":"tcp","dst":"198.18.0.10:443","upstream":"198.18.0.10:443","bytes_up":10,"bytes_down":20,"duration_ms":3,"outcome":"ok""#;
        assert_eq!(
            detail_of(&format!(r#"{base},"sni":"a.test"}}"#)),
            "ok sni a.test -> 198.18.0.10:443, up 10 B, down 20 B, 3 ms"
        );
        assert_eq!(
            detail_of(&format!(r#"{base}}}"#)),
            "ok -> 198.18.0.10:443, up 10 B, down 20 B, 3 ms"
        );
        assert_eq!(
            detail_of(&format!(r#"{base},"requests":2,"status":200}}"#)),
            "ok -> 198.18.0.10:443, up 10 B, down 20 B, 3 ms, plain HTTP, 2 request(s), last 200"
        );
        assert_eq!(
            detail_of(&format!(
                r#"{base},"sni":"a.test","origination":"SIMPLE","requests":1,"status":503}}"#
            )),
            "ok sni a.test -> 198.18.0.10:443, up 10 B, down 20 B, 3 ms, TLS SIMPLE originated, 1 request(s), last 503"
        );
        assert_eq!(
            detail_of(&format!(
                r#"{base},"sni":"a.test","upstream_host":"b.test"}}"#
            )),
            "ok sni a.test -> b.test 198.18.0.10:443, up 10 B, down 20 B, 3 ms"
        );
    }

    #[test]
    fn json_prints_the_line_as_logged() {
        let line = r#"{"time":"2026-01-01T10:00:00Z","kind":"connect"}"#;
        let mut out = Vec::new();
        Printer::new(true)
            .write(&mut out, line, &record(line))
            .expect("write");
        assert_eq!(String::from_utf8(out).expect("utf8"), format!("{line}\n"));
    }
}
