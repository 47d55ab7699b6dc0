//! Builds the eBPF object with aya-build and leaves it in OUT_DIR, where `datapath` embeds it.
//!
//! Toolchain: `EGRESS_EBPF_TOOLCHAIN` if set; else a rustup nightly that has rust-src (the usual
//! `-Z build-std=core` route); else `debian-web`, Debian's rustc-web linked into rustup by
//! `cargo xtask setup`, which ships a prebuilt `core` for bpfel-unknown-none.
use std::{env, path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    out.status.success()
        && Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EGRESS_EBPF_TOOLCHAIN");
    if which::which("bpf-linker").is_err() {
        bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (installs it and Debian's eBPF toolchain)"
        );
    }
    let toolchain = match env::var("EGRESS_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if nightly_has_rust_src() => "nightly".to_owned(),
        Err(_) => {
            // Debian's compiler is a stable release: aya-ebpf needs its unstable
            // `asm_experimental_arch` and our program (crate `egress`, the bin) the atomic intrinsic;
            // unstable features are enabled for those two crates only.
            // SAFETY: build scripts are single-threaded; the variable is read by the child cargo.
            unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,egress") };
            "debian-web".to_owned()
        }
    };
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| format!("building the eBPF programs with toolchain `{toolchain}`"))
}
