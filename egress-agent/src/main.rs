fn main() -> std::process::ExitCode {
    egress_agent::cli::main()
}
