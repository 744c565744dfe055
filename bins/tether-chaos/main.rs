//! `tether-chaos`: the chaos and soak suite (`scripts/chaos.sh`), and the backend process it
//! starts. docs/reliability.md says what each scenario does and what its figures mean.

mod analysis;
mod backend;
mod client;
mod fleet;
mod flood;
mod limits;
mod overload;
mod procs;
mod report;
mod rng;
mod soak;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use serde_json::{json, Map, Value};

/// The chaos and soak suite for tether.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(RunArgs),
    Backend(BackendArgs),
    Burst(BurstArgs),
}

/// Open many held connections at once (started by `run`, scenario 6).
#[derive(FromArgs)]
#[argh(subcommand, name = "burst")]
struct BurstArgs {
    /// where to connect
    #[argh(option)]
    to: SocketAddr,
    /// third byte of the 127.4.x.y source addresses
    #[argh(option)]
    first_source: u8,
    /// how many connections
    #[argh(option)]
    count: usize,
    /// how long to hold them, ms
    #[argh(option)]
    hold_ms: u64,
}

/// Run every scenario and write results.json and summary.md.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// the tether binary
    #[argh(option)]
    tether: PathBuf,
    /// length of the run in minutes (default 3)
    #[argh(option, default = "3.0")]
    minutes: f64,
    /// seed of every random choice (default: from the clock; printed)
    #[argh(option)]
    seed: Option<u64>,
    /// where results.json and summary.md go
    #[argh(option, default = "PathBuf::from(\"chaos-out\")")]
    out: PathBuf,
    /// concurrent TCP sessions (default 10000)
    #[argh(option, default = "10000")]
    sessions: usize,
    /// new TCP connections a second during the chaos (default 2000)
    #[argh(option, default = "2000")]
    rate: u64,
    /// largest transfer each way, bytes (default 8 MiB)
    #[argh(option, default = "8 << 20")]
    max_size: u64,
    /// new UDP flows a second in the soak (default 10000)
    #[argh(option, default = "10000")]
    udp_rate: u64,
    /// long-lived UDP flows in the soak (default 1000)
    #[argh(option, default = "1000")]
    long_flows: usize,
    /// spoofed source addresses in the flood (default 1000000)
    #[argh(option, default = "1_000_000")]
    flood: u64,
    /// slow clients (default 1000)
    #[argh(option, default = "1000")]
    slow: usize,
    /// TCP congestion control in the run's namespace (default cubic; docs/reliability.md)
    #[argh(option, default = "String::from(\"cubic\")")]
    congestion_control: String,
}

/// A chaos backend (started by `run`).
#[derive(FromArgs)]
#[argh(subcommand, name = "backend")]
struct BackendArgs {
    /// its name, sent first on every connection
    #[argh(option)]
    name: String,
    /// TCP address
    #[argh(option)]
    listen: SocketAddr,
    /// UDP address (echoes `L ...` datagrams)
    #[argh(option)]
    udp: Option<SocketAddr>,
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Args = argh::from_env();
    let result = match args.command {
        Command::Backend(b) => backend::run(&b.name, b.listen, b.udp).map(|()| true),
        Command::Run(r) => run(&r),
        Command::Burst(b) => {
            overload::burst(b.to, b.first_source, b.count, Duration::from_millis(b.hold_ms))
                .map(|()| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tether-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: &RunArgs) -> std::io::Result<bool> {
    let seed = a.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
    });
    println!("seed {seed} (replay with --seed {seed})");
    if !(0.5..=600.0).contains(&a.minutes) {
        return Err(std::io::Error::other(format!("--minutes {}: between 0.5 and 600", a.minutes)));
    }
    std::fs::create_dir_all(&a.out)?;
    let out = std::fs::canonicalize(&a.out)?;
    let tether = std::fs::canonicalize(&a.tether)?;
    let tcp_mem = limits::host_tcp_mem();
    let congestion_control = limits::enter_private_network(&a.congestion_control)?;
    println!("congestion control {congestion_control}");
    let fd_limit = limits::raise_fd_limit()?;
    println!("fd limit {fd_limit}");
    let rng = rng::Rng::new(seed);
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let epoch = Instant::now();
    let mut checks = report::Checks::default();
    // The fleet gets 60% of the run (a third of it without chaos), the rest goes to the
    // flood, overload and slow-client scenarios; the soak runs all along.
    let fleet_len = total.mul_f64(0.6);
    let fleet_params = fleet::Params {
        scale: fleet_len.mul_f64(0.3),
        chaos: fleet_len.mul_f64(0.7),
        sessions: a.sessions,
        rate: a.rate,
        max_size: a.max_size,
        drain: Duration::from_secs(60),
        // The soak's sockets, the admin requests and the backends' pipes keep the rest.
        max_open: (fd_limit as usize).saturating_sub(4000).max(1000),
        tcp_mem,
    };
    let soak_params = soak::Params {
        duration: total,
        churn_rate: a.udp_rate,
        long_flows: a.long_flows,
        idle_timeout_ms: 500,
    };
    let stop_soak = AtomicBool::new(false);
    let rest = total - fleet_len;
    let idle_timeout = Duration::from_secs(5);
    let (fleet, extra, soak) = std::thread::scope(|s| {
        let soak = s.spawn(|| {
            let mut c = report::Checks::default();
            soak::run(&tether, &out, &soak_params, &stop_soak, &mut c).map(|r| (r, c))
        });
        let fleet = fleet::run(&tether, &out, &fleet_params, &rng, epoch);
        // Then one at a time: the flood, the burst, the slow clients.
        let mut c = report::Checks::default();
        let extra = (|| {
            let flood = flood::run(
                &tether,
                rest.mul_f64(0.25).max(Duration::from_secs(5)),
                a.flood,
                &mut c,
            )?;
            let burst =
                overload::overload(&tether, rest.mul_f64(0.2).max(Duration::from_secs(3)), &mut c)?;
            let slow_len = rest.mul_f64(0.4).max(idle_timeout.mul_f64(1.6));
            let slow = overload::slow_clients(
                &tether,
                slow_len,
                idle_timeout,
                a.slow,
                100,
                epoch,
                &mut c,
            )?;
            Ok::<_, std::io::Error>(vec![
                ("spoofed_flood", flood),
                ("overload", burst),
                ("slow_clients", slow),
            ])
        })()
        .map(|v| (v, c));
        (fleet, extra, soak.join().expect("soak thread"))
    });
    let fleet = fleet?;
    let ((soak_value, rss, fds), soak_checks) = soak?;
    analysis::write_sessions(&out.join("sessions.csv"), &fleet)?;
    let (top_fleet, mut scenarios) = analysis::fleet(&fleet, &mut checks);
    checks.0.extend(soak_checks.0);
    scenarios.push(("udp_soak", soak_value));
    let (extra, extra_checks) = extra?;
    checks.0.extend(extra_checks.0);
    scenarios.extend(extra);

    let mut top = Map::new();
    top.insert("seed".into(), json!(seed));
    top.insert("command".into(), json!(std::env::args().collect::<Vec<_>>().join(" ")));
    top.insert("seconds".into(), json!(epoch.elapsed().as_secs_f64()));
    top.insert("machine".into(), json!(limits::machine()));
    top.insert("congestion_control".into(), json!(congestion_control));
    if let Value::Object(m) = top_fleet {
        top.extend(m);
    }
    top.insert("rss_samples".into(), json!(rss.iter().map(|(t, v)| [*t, *v]).collect::<Vec<_>>()));
    top.insert("fd_samples".into(), json!(fds.iter().map(|(t, v)| [*t, *v]).collect::<Vec<_>>()));
    report::write(&out, top, scenarios, &checks)?;
    println!("results in {}", out.join("results.json").display());
    Ok(checks.all_pass())
}
