//! Thin entry point: the CLI parses the arguments, runs the command and picks the exit code.

fn main() -> std::process::ExitCode {
    bitfetch::cli::main()
}
