//! The `egress` binary's exit statuses (design.md §3). `exec` is root-only; `check` and `validate`
//! read files only. DNS, where asked at all, goes to loopback or to the test's own world.
use std::{path::Path, process::Command};

use egress_tests::{World, policy_dir, target_bin};

fn egress(args: &[&str]) -> (i32, String) {
    let out = Command::new(target_bin("egress"))
        .args(args)
        .output()
        .expect("run egress");
    let code = out.status.code().expect("exit code");
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

const STATIC_DB: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.40}]\n";
const BAD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.internal]\n  ports: [{number: 99999}]\n";

#[test]
fn validate_exit_statuses() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    assert_eq!(
        egress(&["validate", "--policies", shipped.to_str().expect("utf8")]).0,
        0
    );
    let bad = policy_dir(BAD);
    let (code, out) = egress(&["validate", "--policies", bad.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(
        out.contains("policy.yaml:6:20: error: spec.ports[0].number: port 99999 is out of range"),
        "{out}"
    );
}

#[test]
fn check_exit_statuses() {
    let dir = policy_dir(STATIC_DB);
    let p = dir.to_str().expect("utf8");
    // Nothing listens on loopback port 9: any lookup fails at once, and stays on this machine.
    let base = [
        "--policies",
        p,
        "--dns",
        "127.0.0.1:9",
        "--mode",
        "registry-only",
    ];
    let run = |extra: &[&str]| {
        let mut a = vec!["check"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&base);
        egress(&a)
    };
    let (code, out) = run(&["192.0.2.40:5432"]);
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("allow tcp 192.0.2.40:5432 ServiceEntry/default/db"))
    );
    let (code, out) = run(&["192.0.2.40:5433"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("deny tcp 192.0.2.40:5433 mode registry-only"),
        "{out}"
    );
    assert_eq!(run(&["192.0.2.40:5432", "--proto", "udp"]).0, 1);
    assert_eq!(run(&["db.internal:5432"]).0, 0);
    assert_eq!(run(&["not a host"]).0, 2, "usage error");
    assert_eq!(run(&["192.0.2.40:99999"]).0, 2, "usage error");
    let bad = policy_dir(BAD);
    assert_eq!(
        egress(&[
            "check",
            "192.0.2.40:5432",
            "--policies",
            bad.to_str().expect("utf8")
        ])
        .0,
        2
    );
}

#[test]
fn exec_exit_statuses_and_enforcement() {
    let mut w = World::new();
    w.host(10);
    w.tcp_server(std::net::SocketAddr::new(w.v4(10), 443));
    w.start_dns(&[], 60);
    let dir = policy_dir(STATIC_DB);
    let dns = w.dns_addr().to_string();
    let exec = |mode: &str, cmd: &[&str]| {
        let mut a = vec![
            "exec",
            "--policies",
            dir.to_str().expect("utf8"),
            "--dns",
            &dns,
            "--mode",
            mode,
            "--",
        ];
        a.extend_from_slice(cmd);
        egress(&a)
    };
    let probe = target_bin("egress-probe");
    let probe = probe.to_str().expect("utf8");
    let dest = format!("{}:443", w.v4(10));
    assert_eq!(
        exec("registry-only", &[probe, "tcp", &dest]),
        (0, "denied\n".into())
    );
    assert_eq!(
        exec("allow-any", &[probe, "tcp", &dest]),
        (0, "ok\n".into())
    );
    assert_eq!(
        exec("allow-any", &["sh", "-c", "exit 7"]).0,
        7,
        "the command's status"
    );
    assert_eq!(
        exec("allow-any", &["sh", "-c", "kill -TERM $$"]).0,
        128 + 15,
        "killed by a signal"
    );
    assert_eq!(exec("allow-any", &["/nonexistent/command"]).0, 127);
    let bad = policy_dir(BAD);
    let (code, _) = egress(&[
        "exec",
        "--policies",
        bad.to_str().expect("utf8"),
        "--",
        "true",
    ]);
    assert_eq!(code, 125, "egress's own failure");
    // The command runs in egress's cgroup; egress itself (its parent) does not.
    let (code, out) = exec(
        "allow-any",
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo ---; cat /proc/$PPID/cgroup",
        ],
    );
    assert_eq!(code, 0);
    let (child, parent) = out.split_once("---").expect("two parts");
    assert!(child.contains("/egress-exec-"), "{child}");
    assert!(
        !parent.contains("egress-exec-"),
        "the caller is not enforced: {parent}"
    );
    // The cgroup is gone afterwards, and nothing is left in it.
    let mount = egress_agent::datapath::cgroup::cgroup2_mount().expect("mount");
    let leftovers: Vec<_> = std::fs::read_dir(&mount)
        .expect("list cgroups")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("egress-exec-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
