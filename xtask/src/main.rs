//! Project tasks. `cargo xtask setup` installs what a fresh Debian machine lacks; `test`, `demo`
//! and `bench` run it first. This crate depends on nothing that needs the eBPF toolchain, so it
//! builds before that toolchain exists.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Installs the Debian packages and bpf-linker the build and tests need (idempotent).
    Setup,
    /// Builds the release `egress` binary.
    Build,
    /// Runs every test: unit tests and the root-only kernel tests.
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The shipped policies against a simulated outside world, with live calls.
    Demo,
    /// Benchmarks, printed as ratios against a baseline measured in the same run.
    Bench {
        #[arg(value_parser = ["connect", "events", "relay"], default_value = "connect")]
        which: String,
        /// Passed to the benchmark (`relay`: --paths NAME,... --rounds N --no-bulk
        /// --no-exchanges --connections N, for working on one figure).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages: Debian's rustc with a prebuilt `core` for bpfel (no rust-src needed), the LLVM
/// bpf-linker builds against, and the DNS server the tests and the demo run.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "dnsmasq-base",
    "iproute2",
    "nftables",
    // Real TLS clients for the relay tests.
    "curl",
    "openssl",
];
/// The peers `bench relay` runs beside egress's relay.
const RELAY_BENCH_PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream"];
const TOOLCHAIN: &str = "debian-web";
const BPF_LINKER_VERSION: &str = "0.13";

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&["build", "--release", "--package", "egress-agent"])
        }
        Task::Test { args } => {
            setup()?;
            require_root("the kernel tests load eBPF programs and create network namespaces")?;
            cargo(&["build", "--bins"])?;
            let mut a = vec!["test"];
            a.extend(args.iter().map(String::as_str));
            in_scratch("test", |tmp| run(cargo_command(&a).env("TMPDIR", tmp)))
        }
        Task::Demo => {
            setup()?;
            require_root("the demo attaches eBPF programs and creates a network namespace")?;
            cargo(&["build", "--release", "--bins"])?;
            // Its flow log stays in /tmp for the reader: the demo names it at the end.
            run(Command::new(target_dir()?.join("release/egress-demo"))
                .current_dir(workspace_root()))
        }
        Task::Bench { which, args } => {
            setup()?;
            require_root("the benchmark attaches eBPF programs")?;
            if which == "relay" {
                install(RELAY_BENCH_PACKAGES)?;
            }
            cargo(&["build", "--release", "--bins"])?;
            let bench = target_dir()?.join("release/egress-bench");
            in_scratch("bench", |tmp| {
                run(Command::new(&bench)
                    .arg(&which)
                    .args(&args)
                    .current_dir(workspace_root())
                    .env("TMPDIR", tmp))
            })
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(match env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target"),
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{why}: run as root, e.g. `sudo -E env PATH=$PATH cargo xtask ...`");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(&mut cargo_command(args))
}

/// Runs `f` with a fresh scratch directory under the target directory, removed afterwards
/// whatever the outcome. It becomes the tests' TMPDIR, so their flow logs, policies and worlds'
/// files never pile up in /tmp, even when a test panics before cleaning up after itself.
fn in_scratch(task: &str, f: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = target_dir()?
        .join("scratch")
        .join(format!("{task}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Installs the Debian packages of `packages` that are missing.
fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        let cmd = format!(
            "apt-get update && apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
        if !is_root() {
            bail!("missing Debian packages; run: sudo sh -c '{cmd}'");
        }
        println!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "setup knows Debian only. Elsewhere install: a Rust toolchain that can build for \
             bpfel-unknown-none (a rustup nightly with rust-src), LLVM 22, \
             `cargo install bpf-linker`, dnsmasq and iproute2"
        );
    }
    install(PACKAGES)?;
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running `rustup toolchain list` (rustup is needed)")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN))
    {
        println!("setup: linking Debian's rustc as rustup toolchain `{TOOLCHAIN}`");
        run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        run(Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("installing bpf-linker; by hand: LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22")?;
    }
    Ok(())
}
