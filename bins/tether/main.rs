//! The tether daemon: parse flags, validate, run. Everything else lives in the crates.

use std::process::ExitCode;

use argh::FromArgs;
use config::{Args, Config};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let args = match Args::from_args(&argv[..1], &argv[1..]) {
        Ok(args) => args,
        Err(early) if early.status.is_ok() => {
            print!("{}", early.output); // --help
            return ExitCode::SUCCESS;
        }
        Err(early) => {
            eprintln!("tether: {}", early.output.trim());
            return ExitCode::from(2);
        }
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match control::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}
