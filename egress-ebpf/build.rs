/// Rebuild when the linker changes: cargo does not know this crate links with bpf-linker.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
    // bpf-linker by default has LLVM expand memcpy only, in order (for offload JITs that match
    // the pattern), which leaves every memset, a zeroed struct or `[0; 3]`, a call to a
    // byte-at-a-time loop. Without it both become plain stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
