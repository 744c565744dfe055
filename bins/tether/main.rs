//! The tether daemon: parse flags (or a config file), validate, run. Everything else lives in
//! the crates. `tether check --config FILE` (or `tether check` with the service flags) validates
//! and exits: 0 and a one-line summary when good, 2 and the error when not. `tether man` prints
//! the man page; `tether ctl` steers a running instance through its admin API (`ctl.rs`).

use std::process::ExitCode;

mod ctl;

use argh::FromArgs;
use config::{Args, Config};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    if argv.get(1) == Some(&"ctl") {
        return ctl::main(&argv[2..]);
    }
    if argv.get(1) == Some(&"man") && argv.len() == 2 {
        // The man page, from the same flag definitions as --help (the package ships it).
        print!("{}", config::man::page(&control::version()));
        return ExitCode::SUCCESS;
    }
    let check = argv.get(1) == Some(&"check");
    let (command, rest) = if check { (&argv[..2], &argv[2..]) } else { (&argv[..1], &argv[1..]) };
    // `tether check --config FILE --admin ADDR`: the file is checked alone, then what reloading
    // it would move is asked of the instance at ADDR (its admin API's dry run).
    let mut running = None;
    let mut rest: Vec<&str> = rest.to_vec();
    if check && rest.contains(&"--config") {
        if let Some(at) = rest.iter().position(|a| *a == "--admin") {
            let Some(addr) = rest.get(at + 1).copied() else {
                eprintln!("tether: --admin: the running instance's admin address is missing");
                return ExitCode::from(2);
            };
            running = Some(addr.to_string());
            rest.drain(at..at + 2);
        }
    }
    let args = match Args::from_args(command, &rest) {
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
    let file = args.config.clone();
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            match file {
                Some(path) if !e.place.starts_with("--") => eprintln!("tether: {path}: {e}"),
                _ => eprintln!("tether: {e}"),
            }
            return ExitCode::from(2);
        }
    };
    if check {
        let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        println!(
            "ok: {} ({}), {}",
            plural(config.services.len(), "service"),
            names.join(", "),
            plural(backends, "backend")
        );
        if let (Some(admin), Some(path)) = (running, &config.file) {
            return ctl::reload_preview(&admin, path);
        }
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match control::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}
