//! `tether-bench`: run test backends and clients by hand, against a running `tether`.
//!
//! ```text
//! tether-bench backend --listen 127.0.0.1:7001 --name alpha
//! tether-bench clients --connect 127.0.0.1:7000 --sources 100 --rounds 3
//! ```
//!
//! The logic lives in `tether-testkit`; this file only parses flags and wires.

use std::io::{self, BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use testkit::{client_ips, survey, Backend, StopSignals};

/// Test backends and clients for tether.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Backend(BackendArgs),
    Clients(ClientsArgs),
    Connrate(ConnrateArgs),
}

/// Open connections as fast as possible, each from the next of many source addresses; each
/// sends an HTTP/1.0 request and reads the reply to EOF. Prints one JSON line.
#[derive(FromArgs)]
#[argh(subcommand, name = "connrate")]
struct ConnrateArgs {
    /// address to connect to
    #[argh(option)]
    connect: SocketAddr,
    /// number of distinct source addresses (127.2.0.1 upward)
    #[argh(option)]
    sources: usize,
    /// client threads (default 8)
    #[argh(option, default = "8")]
    threads: usize,
    /// seconds to run (default 5)
    #[argh(option, default = "5")]
    seconds: u64,
}

/// Run one named test backend until SIGINT or SIGTERM.
#[derive(FromArgs)]
#[argh(subcommand, name = "backend")]
struct BackendArgs {
    /// address to listen on (port 0 picks one)
    #[argh(option)]
    listen: SocketAddr,
    /// name the backend answers with
    #[argh(option)]
    name: String,
}

/// Ask every source address for its backend, over several rounds, and print who got whom.
#[derive(FromArgs)]
#[argh(subcommand, name = "clients")]
struct ClientsArgs {
    /// address of tether's listener
    #[argh(option)]
    connect: SocketAddr,
    /// number of distinct source addresses
    #[argh(option)]
    sources: usize,
    /// first source address (default 127.1.0.1)
    #[argh(option, default = "Ipv4Addr::new(127, 1, 0, 1)")]
    first: Ipv4Addr,
    /// rounds over all sources (default 1)
    #[argh(option, default = "1")]
    rounds: usize,
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Args = argh::from_env();
    let result = match args.command {
        Command::Backend(args) => backend(args),
        Command::Clients(args) => clients(args),
        Command::Connrate(args) => connrate(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn backend(args: BackendArgs) -> io::Result<ExitCode> {
    // Before any thread starts, so that all of them inherit the blocked mask.
    let signals = StopSignals::block()?;
    let mut backend = Backend::start(&args.name, args.listen)?;
    println!("backend {} listening {}", backend.name(), backend.addr());
    io::stdout().flush()?;
    let signal = signals.wait()?;
    log::info!("{signal}: stopping after {} connections", backend.connections());
    backend.stop();
    Ok(ExitCode::SUCCESS)
}

fn clients(args: ClientsArgs) -> io::Result<ExitCode> {
    let sources = client_ips(args.first, args.sources)?;
    let survey = survey(args.connect, &sources, args.rounds);
    let mut out = BufWriter::new(io::stdout().lock());
    survey.write_table(&mut out)?;
    out.flush()?;
    Ok(if survey.failures() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn connrate(args: ConnrateArgs) -> io::Result<ExitCode> {
    let sources = client_ips(Ipv4Addr::new(127, 2, 0, 1), args.sources)?;
    let duration = Duration::from_secs(args.seconds);
    let r = testkit::connrate(
        args.connect,
        &sources,
        args.threads,
        duration,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    println!(
        "{{\"conns\": {}, \"errors\": {}, \"seconds\": {:.3}, \"conn_s\": {:.1}, \"p50_us\": {}, \"p99_us\": {}}}",
        r.conns,
        r.errors,
        r.seconds,
        r.rate(),
        r.p50_us,
        r.p99_us
    );
    Ok(if r.conns > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
