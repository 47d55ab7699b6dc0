//! One line of the flow log, design.md §4. Keys are never renamed; new ones may be added. The
//! contract's keys are always present, null where they do not apply: `verdict`, `proto`, `dst`,
//! `host`, `rule`, `pid`, `comm` and `cgroup` in every record, and a relay record's `sni`,
//! `upstream`, `bytes_up`, `bytes_down` and `duration_ms`. Any other key is written only when it
//! has a value: a connect record takes about 300 bytes where with every key it took 650.
//!
//! Built for every event at up to hundreds of thousands a second, so a record allocates little:
//! words from a fixed set are static, names (hosts, rules, cgroups) are shared with the catalog,
//! addresses are kept as addresses and written as text only into the log line.
use std::{
    borrow::Cow,
    cell::RefCell,
    io::Write as _,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use egress_common::{EventKind, FlowEvent, Verdict};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// A word from a fixed set (`connect`, `allow`, `tcp`, `ok`, …); owned only when read back from a
/// log.
pub type Word = Cow<'static, str>;
/// A name many records share (a host, a rule, a cgroup path): cloned by reference.
pub type Name = Arc<str>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub time: Timestamp,
    /// `connect`, `sendmsg`, `packet` (judged by TC), `close` (a flow ended, with totals),
    /// `relay` (a steered connection through the relay ended), `sockopt` (a socket option
    /// refused, see `reason`), `lost` (events the kernel could not write).
    pub kind: Word,
    #[serde(default)]
    pub verdict: Option<Word>,
    #[serde(default)]
    pub proto: Option<Word>,
    #[serde(default)]
    pub src: Option<SocketAddr>,
    #[serde(default)]
    pub dst: Option<SocketAddr>,
    #[serde(default)]
    pub host: Option<Name>,
    #[serde(default)]
    pub rule: Option<Name>,
    /// Why a built-in rule decided: `loopback`, `resolver`, or the mode.
    #[serde(default)]
    pub reason: Option<Word>,
    #[serde(default)]
    pub rule_id: Option<u32>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub tid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub cgroup: Option<Name>,
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    #[serde(default)]
    pub iface: Option<String>,
    #[serde(default)]
    pub bytes_out: Option<u64>,
    #[serde(default)]
    pub bytes_in: Option<u64>,
    #[serde(default)]
    pub packets_out: Option<u64>,
    #[serde(default)]
    pub packets_in: Option<u64>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// For `close`: the connect() calls the flow stands for (a socket connected again to the same
    /// destination under the same rule is the same flow; its first connect has its own record).
    #[serde(default)]
    pub connects: Option<u64>,
    /// For `lost`: events lost since the previous report, and since the agent started.
    #[serde(default)]
    pub lost: Option<u64>,
    #[serde(default)]
    pub lost_total: Option<u64>,
    /// For `relay`: the ClientHello's server name and ALPN protocols, the upstream address the
    /// relay connected to, bytes client→upstream and back, how many connects it took, and the
    /// outcome: `ok`, `refused` (see `reason`), `upstream-failed`, `idle-timeout`, `error`.
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// For `relay`: the host a VirtualService's route sent the connection to, where it sent it
    /// elsewhere than where dialled: another host than `host`, or a subset's endpoints.
    #[serde(default)]
    pub upstream_host: Option<Name>,
    #[serde(default)]
    pub bytes_up: Option<u64>,
    #[serde(default)]
    pub bytes_down: Option<u64>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub outcome: Option<Word>,
    /// For a `relay` connection whose TLS the relay originated: `SIMPLE` or `MUTUAL`, the HTTP
    /// requests it carried and the status of the last answer.
    #[serde(default)]
    pub origination: Option<Word>,
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub status: Option<u16>,
}

impl Record {
    fn empty(time: Timestamp, kind: &'static str) -> Record {
        Record {
            time,
            kind: Cow::Borrowed(kind),
            verdict: None,
            proto: None,
            src: None,
            dst: None,
            host: None,
            rule: None,
            reason: None,
            rule_id: None,
            pid: None,
            tid: None,
            comm: None,
            cgroup: None,
            cgroup_id: None,
            iface: None,
            bytes_out: None,
            bytes_in: None,
            packets_out: None,
            packets_in: None,
            duration_ms: None,
            connects: None,
            lost: None,
            lost_total: None,
            sni: None,
            alpn: None,
            upstream: None,
            upstream_host: None,
            bytes_up: None,
            bytes_down: None,
            attempts: None,
            outcome: None,
            origination: None,
            requests: None,
            status: None,
        }
    }

    /// A relay record: the steered connection's facts from the kernel's record; the relay fills
    /// in the rest.
    pub fn relay(time: Timestamp, steered: &egress_common::Steered) -> Record {
        let mut r = Record::empty(time, "relay");
        r.verdict = Some(Cow::Borrowed("steer"));
        r.proto = Some(Cow::Borrowed("tcp"));
        r.rule_id = Some(steered.rule_id);
        r.dst = Some(endpoint(steered.dst_addr, steered.dst_port_be));
        r.set_task(steered.pid, steered.tid, &steered.comm);
        r.cgroup_id = (steered.cgroup_id != 0).then_some(steered.cgroup_id);
        // A client bound to an interface: its relayed connection leaves through that one.
        if steered.bound_if != 0 {
            r.iface = nix::net::if_::if_indextoname(steered.bound_if)
                .ok()
                .map(|n| n.to_string_lossy().into_owned());
        }
        r
    }

    /// A relay record for a connection the kernel knows nothing of.
    pub fn relay_unknown(time: Timestamp) -> Record {
        Record::empty(time, "relay")
    }

    fn set_task(&mut self, pid: u32, tid: u32, comm: &[u8; 16]) {
        if pid != 0 {
            self.pid = Some(pid);
            self.tid = Some(tid);
            let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
            self.comm = Some(String::from_utf8_lossy(&comm[..len]).into_owned());
        }
    }

    /// The report of kernel events lost since the last one.
    pub fn lost(time: Timestamp, lost: u64, lost_total: u64) -> Record {
        Record {
            lost: Some(lost),
            lost_total: Some(lost_total),
            ..Record::empty(time, "lost")
        }
    }

    /// The kernel's facts; `time` is the event's wall-clock time. Host, rule and cgroup path are
    /// the enricher's to fill.
    pub fn from_kernel(ev: &FlowEvent, time: Timestamp) -> Record {
        let kernel_kind = EventKind::from_u32(ev.kind);
        let kind = match kernel_kind {
            Some(EventKind::Connect) => "connect",
            Some(EventKind::Sendmsg) => "sendmsg",
            Some(EventKind::Packet) => "packet",
            Some(EventKind::Close) => "close",
            Some(EventKind::Sockopt) => "sockopt",
            None => "unknown",
        };
        let mut r = Record::empty(time, kind);
        r.verdict = Some(Cow::Borrowed(verdict_name(ev.verdict)));
        r.rule_id = Some(ev.rule_id);
        r.set_task(ev.pid, ev.tid, &ev.comm);
        r.cgroup_id = (ev.cgroup_id != 0).then_some(ev.cgroup_id);
        if matches!(kernel_kind, Some(EventKind::Sockopt)) {
            // An option of a socket, not a packet: no protocol or destination to name.
            return r;
        }
        r.proto = Some(proto_name(ev.proto));
        r.dst = Some(endpoint(ev.dst_addr, ev.dst_port_be));
        if ev.src_addr != [0; 16] {
            r.src = Some(endpoint(ev.src_addr, ev.src_port_be));
        }
        if matches!(kernel_kind, Some(EventKind::Close)) {
            r.bytes_out = Some(ev.bytes_out);
            r.bytes_in = Some(ev.bytes_in);
            r.packets_out = Some(ev.packets_out);
            r.packets_in = Some(ev.packets_in);
            r.duration_ms = Some(ev.time_ns.saturating_sub(ev.start_ns) / 1_000_000);
            r.connects = Some(ev.connects);
        }
        r
    }

    /// Sets why the record ended as it did: `outcome`, and `reason` if there is one to tell.
    pub fn ended(&mut self, outcome: &'static str, reason: Option<String>) {
        self.outcome = Some(Cow::Borrowed(outcome));
        self.reason = reason.map(Cow::Owned);
    }

    /// Appends the record as one JSON object: what its `Serialize` writes, less the null keys
    /// outside the contract (see the module's comment), in a quarter of the time. Every record
    /// in the flow log is written here, at up to hundreds of thousands a second (serde_json,
    /// generic over the field types, took about 630 ns for a typical record, this about 180).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Destructured whole: a field added to the record and not written here does not compile.
        let Record {
            time,
            kind,
            verdict,
            proto,
            src,
            dst,
            host,
            rule,
            reason,
            rule_id,
            pid,
            tid,
            comm,
            cgroup,
            cgroup_id,
            iface,
            bytes_out,
            bytes_in,
            packets_out,
            packets_in,
            duration_ms,
            connects,
            lost,
            lost_total,
            sni,
            alpn,
            upstream,
            upstream_host,
            bytes_up,
            bytes_down,
            attempts,
            outcome,
            origination,
            requests,
            status,
        } = self;
        out.extend_from_slice(b"{\"time\":\"");
        json_time(out, *time);
        out.extend_from_slice(b"\",\"kind\":");
        json_str(out, kind);
        let relay = kind == "relay";
        // Each key with whether it stays when null, spelled out so that it costs no comparison;
        // the tests' `kept_when_null` states the rule and holds this to it.
        macro_rules! fields {
            ($($name:ident: $write:ident, $kept:expr);* $(;)?) => {$(
                let key = concat!(",\"", stringify!($name), "\":").as_bytes();
                match $name {
                    Some(v) => {
                        out.extend_from_slice(key);
                        $write(out, v);
                    }
                    None if $kept => {
                        out.extend_from_slice(key);
                        out.extend_from_slice(b"null");
                    }
                    None => {}
                }
            )*};
        }
        fields!(
            verdict: json_str, true;
            proto: json_str, true;
            src: json_addr, false;
            dst: json_addr, true;
            host: json_str, true;
            rule: json_str, true;
            reason: json_str, false;
            rule_id: json_number, false;
            pid: json_number, true;
            tid: json_number, false;
            comm: json_str, true;
            cgroup: json_str, true;
            cgroup_id: json_number, false;
            iface: json_str, false;
            bytes_out: json_number, false;
            bytes_in: json_number, false;
            packets_out: json_number, false;
            packets_in: json_number, false;
            duration_ms: json_number, relay;
            connects: json_number, false;
            lost: json_number, false;
            lost_total: json_number, false;
            sni: json_str, relay;
            alpn: json_strs, false;
            upstream: json_addr, relay;
            upstream_host: json_str, false;
            bytes_up: json_number, relay;
            bytes_down: json_number, relay;
            attempts: json_number, false;
            outcome: json_str, false;
            origination: json_str, false;
            requests: json_number, false;
            status: json_number, false;
        );
        out.push(b'}');
    }
}

/// A timestamp as jiff prints it (`2026-11-23T02:28:49.623692409Z`: the fraction with as many
/// digits as it needs, none when whole), with the part up to the second printed once per second
/// on each thread: records come many to a second, and jiff's printer cost more than the rest of
/// a line's words together.
fn json_time(out: &mut Vec<u8>, time: Timestamp) {
    thread_local! {
        /// The second last printed, and its text without the `Z`.
        static SECOND: RefCell<(i64, Vec<u8>)> = const { RefCell::new((i64::MIN, Vec::new())) };
    }
    let (second, nanos) = (time.as_second(), time.subsec_nanosecond());
    let whole = Timestamp::from_second(second);
    let (Ok(whole), false) = (whole, second < 0 || nanos < 0) else {
        // Before 1970 (tests): jiff's own printer. Into a Vec, which cannot fail.
        let _ = write!(out, "{time}");
        return;
    };
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            text.clear();
            let _ = write!(text, "{whole}");
            text.pop();
            *cached = second;
        }
        out.extend_from_slice(text);
    });
    if nanos > 0 {
        let mut digits = [b'0'; 10];
        digits[0] = b'.';
        let mut n = nanos as u32;
        for d in digits[1..].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let len = digits.iter().rposition(|&d| d != b'0').map_or(1, |i| i + 1);
        out.extend_from_slice(&digits[..len]);
    }
    out.push(b'Z');
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Without an early exit, so that the compiler checks many bytes at a time: each line's
    // names pass here.
    let escaped = s
        .as_bytes()
        .iter()
        .map(|&b| u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\'))
        .fold(0, |found, b| found | b);
    if escaped != 0 {
        // Rare (a process name, a server name or a reason with quotes or control characters):
        // serde_json's escapes, exactly.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn json_strs(out: &mut Vec<u8>, list: &[String]) {
    out.push(b'[');
    for (i, s) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, s);
    }
    out.push(b']');
}

fn json_number(out: &mut Vec<u8>, n: &impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
}

fn json_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            // `"255.255.255.255:65535"` at most: made on the stack byte by byte (no copy call
            // per piece), added to the line at once.
            let mut text = [b'"'; 23];
            let mut at = 1;
            let mut number = |n: u16, then: u8| {
                let mut digits = [0u8; 5];
                let (mut n, mut first) = (n, digits.len());
                loop {
                    first -= 1;
                    digits[first] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                for &d in &digits[first..] {
                    text[at] = d;
                    at += 1;
                }
                text[at] = then;
                at += 1;
            };
            let [a, b, c, d] = v4.ip().octets();
            number(a.into(), b'.');
            number(b.into(), b'.');
            number(c.into(), b'.');
            number(d.into(), b':');
            number(v4.port(), b'"');
            out.extend_from_slice(&text[..at]);
        }
        // IPv6's shortest form has rules of its own: the standard library's.
        SocketAddr::V6(v6) => {
            let _ = write!(out, "\"{v6}\"");
        }
    }
}

pub fn verdict_name(v: u32) -> &'static str {
    match Verdict::from_u32(v) {
        Some(Verdict::Allow) => "allow",
        Some(Verdict::Deny) => "deny",
        Some(Verdict::Steer) => "steer",
        None => "unknown",
    }
}

fn proto_name(proto: u8) -> Word {
    Cow::Borrowed(match proto {
        6 => "tcp",
        17 => "udp",
        1 => "icmp",
        58 => "icmpv6",
        132 => "sctp",
        n => return Cow::Owned(format!("ip-proto-{n}")),
    })
}

/// An address as the kernel stores it (IPv4 mapped), shown in its own family; port 0 for
/// protocols without ports is shown too, to keep `ip:port` parseable.
fn endpoint(addr: [u8; 16], port_be: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, u16::from_be(port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys design.md §4 names for every record, and those it adds for a relay record.
    const EVERY: [&str; 8] = [
        "verdict", "proto", "dst", "host", "rule", "pid", "comm", "cgroup",
    ];
    const RELAY: [&str; 5] = ["sni", "upstream", "bytes_up", "bytes_down", "duration_ms"];

    /// Whether a record of `kind` writes `key` as null when it has no value.
    fn kept_when_null(kind: &str, key: &str) -> bool {
        EVERY.contains(&key) || (kind == "relay" && RELAY.contains(&key))
    }

    fn line(r: &Record) -> String {
        let mut out = Vec::new();
        r.write_json(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    /// The contract's shape (design.md §4): its keys present, null where they do not apply, the
    /// relay's too in a relay record; any other key only with a value; addresses as `ip:port`
    /// text, IPv6 in brackets; and a line read back is the record written.
    #[test]
    fn a_line_has_the_contracts_keys_and_addresses_as_text() {
        let mut r = Record::relay_unknown(Timestamp::UNIX_EPOCH);
        r.dst = Some("[2001:db8::1]:443".parse().expect("address"));
        r.src = Some("192.0.2.1:40000".parse().expect("address"));
        r.host = Some("api.test".into());
        r.ended("refused", Some("no kernel record".to_owned()));
        let relay = line(&r);
        let v: serde_json::Value = serde_json::from_str(&relay).expect("parse");
        assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["kind"], "relay");
        assert_eq!(v["dst"], "[2001:db8::1]:443");
        assert_eq!(v["src"], "192.0.2.1:40000");
        assert_eq!(v["host"], "api.test");
        assert_eq!(v["outcome"], "refused");
        assert_eq!(v["reason"], "no kernel record");
        let keys = v.as_object().expect("an object");
        let null = |key: &str| keys.get(key).is_some_and(|v| v.is_null());
        for key in [
            "verdict",
            "proto",
            "rule",
            "pid",
            "comm",
            "cgroup",
            "sni",
            "upstream",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(null(key), "{key} in {relay}");
        }
        for key in [
            "tid",
            "cgroup_id",
            "iface",
            "bytes_out",
            "alpn",
            "lost",
            "status",
        ] {
            assert!(!keys.contains_key(key), "{key} in {relay}");
        }
        assert_eq!(serde_json::from_str::<Record>(&relay).expect("record"), r);

        // Another kind leaves the relay's keys out while they have no value.
        r.kind = Cow::Borrowed("connect");
        let connect = line(&r);
        let v: serde_json::Value = serde_json::from_str(&connect).expect("parse");
        let keys = v.as_object().expect("an object");
        assert!(keys.get("rule").is_some_and(|v| v.is_null()), "{connect}");
        for key in RELAY {
            assert!(!keys.contains_key(key), "{key} in {connect}");
        }
        assert_eq!(serde_json::from_str::<Record>(&connect).expect("record"), r);
    }

    /// The flow log's writer and the record's `Serialize` agree byte for byte, but for the null
    /// keys the writer leaves out: on every field set and none, on text that must be escaped, on
    /// both address families and extreme numbers.
    #[test]
    fn the_fast_line_is_the_serialized_line_without_its_null_keys() {
        let full = |text: &str, v6: bool| {
            let addr = |s: &str, v: &str| -> Option<SocketAddr> {
                Some((if v6 { v } else { s }).parse().expect("address"))
            };
            Record {
                time: "2026-11-23T02:28:49.623692409Z".parse().expect("time"),
                kind: Cow::Owned(format!("k{text}")),
                verdict: Some(Cow::Borrowed("steer")),
                proto: Some(Cow::Owned("ip-proto-99".to_owned())),
                src: addr("0.0.0.0:0", "[::]:0"),
                dst: addr("255.255.255.255:65535", "[2001:db8::1%7]:443"),
                host: Some(format!("h{text}").into()),
                rule: Some("ServiceEntry/default/x".into()),
                reason: Some(Cow::Owned(text.to_owned())),
                rule_id: Some(u32::MAX),
                pid: Some(1),
                tid: Some(0),
                comm: Some(text.to_owned()),
                cgroup: Some("/".into()),
                cgroup_id: Some(u64::MAX),
                iface: Some(String::new()),
                bytes_out: Some(0),
                bytes_in: Some(9),
                packets_out: Some(10),
                packets_in: Some(99_999),
                duration_ms: Some(1 << 40),
                connects: Some(3),
                lost: Some(4),
                lost_total: Some(5),
                sni: Some(text.to_owned()),
                alpn: Some(vec!["h2".to_owned(), text.to_owned(), String::new()]),
                upstream: addr("10.0.0.1:443", "[::ffff:10.0.0.1]:443"),
                upstream_host: Some(format!("u{text}").into()),
                bytes_up: Some(7),
                bytes_down: Some(8),
                attempts: Some(2),
                outcome: Some(Cow::Borrowed("ok")),
                origination: Some(Cow::Borrowed("MUTUAL")),
                requests: Some(12),
                status: Some(u16::MAX),
            }
        };
        let mut records = vec![
            Record::relay_unknown(Timestamp::UNIX_EPOCH),
            Record::lost(Timestamp::now(), 1, 2),
            Record {
                alpn: Some(Vec::new()),
                ..Record::relay_unknown(Timestamp::UNIX_EPOCH)
            },
            // Octets and ports of every length of digits.
            Record {
                src: Some("1.22.103.9:80".parse().expect("address")),
                dst: Some("100.7.20.250:1024".parse().expect("address")),
                upstream: Some("9.99.199.10:9".parse().expect("address")),
                ..Record::relay_unknown(Timestamp::UNIX_EPOCH)
            },
        ];
        for text in [
            "plain",
            "",
            "say \"hi\"",
            "C:\\dir",
            "line\nbreak",
            "unit\u{1f}separator",
            "caf\u{e9} \u{1f600} /slash \u{7f}",
        ] {
            records.push(full(text, false));
            records.push(full(text, true));
        }
        // The time's text is kept per second: the same second twice, the next, fractions with
        // and without trailing zeros, and times before 1970.
        for (r, time) in records.iter_mut().zip(
            [
                "2026-11-23T02:28:49.623692409Z",
                "2026-11-23T02:28:49.5Z",
                "2026-11-23T02:28:50Z",
                "2026-11-23T02:28:50.000000001Z",
                "2026-11-23T02:28:50.12Z",
                "1969-12-31T23:59:59.75Z",
                "1969-12-31T23:59:59Z",
                "2026-11-23T02:28:49.100000Z",
                "1970-01-01T00:00:00Z",
            ]
            .into_iter()
            .cycle(),
        ) {
            r.time = time.parse().expect("time");
        }
        // Every kind, for the keys kept by kind.
        let kinds = ["relay", "connect", "close", "lost", "sockopt"];
        for r in records.clone() {
            for kind in kinds {
                let r = Record {
                    kind: Cow::Borrowed(kind),
                    ..r.clone()
                };
                records.push(r);
            }
        }
        for r in &records {
            // `,"key":null` cannot occur inside a string, whose quotes are escaped.
            let mut expected = serde_json::to_string(r).expect("json");
            let full: serde_json::Value = serde_json::from_str(&expected).expect("parse");
            for (key, value) in full.as_object().expect("an object") {
                if value.is_null() && !kept_when_null(&r.kind, key) {
                    expected = expected.replacen(&format!(",\"{key}\":null"), "", 1);
                }
            }
            assert_eq!(line(r), expected);
        }
    }
}
