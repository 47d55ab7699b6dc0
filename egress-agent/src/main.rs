// The relay's per-connection allocations (its buffers, its task) from thread-local free lists:
// less CPU per connection than glibc's bins (`cargo xtask bench relay`, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    egress_agent::cli::main()
}
