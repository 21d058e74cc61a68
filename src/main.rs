//! Thin entry point: parse arguments, run, map the outcome to an exit code.

use std::process::ExitCode;

use argh::FromArgs;
use bitfetch::cli::{self, Args};
use bitfetch::exit;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (cmd, rest) = strs
        .split_first()
        .map_or(("bitfetch", &[][..]), |(c, r)| (*c, r));
    let cmd = std::path::Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bitfetch");
    let rest = cli::lone_dash_last(rest);
    let args = match Args::from_args(&[cmd], &rest) {
        Ok(a) => a,
        Err(early) => {
            return if early.status.is_ok() {
                println!("{}", early.output);
                println!("\n{}", exit::TABLE);
                ExitCode::SUCCESS
            } else {
                bitfetch::progress::stderr_line(&format!(
                    "{}\nRun 'bitfetch --help' for usage.",
                    early.output.trim_end()
                ));
                ExitCode::from(exit::ExitCode::BadArguments.code())
            };
        }
    };
    bitfetch::storage::install_sigbus_guard();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            bitfetch::progress::stderr_line(&format!("bitfetch: error: {e}"));
            ExitCode::from(e.exit_code().code())
        }
    }
}
