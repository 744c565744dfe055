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
    Cluster(ClusterArgs),
    UdpBackend(UdpBackendArgs),
    UdpPingpong(UdpPingpongArgs),
}

/// Run one UDP echo backend (answers `name` with its name) until SIGINT or SIGTERM.
#[derive(FromArgs)]
#[argh(subcommand, name = "udp-backend")]
struct UdpBackendArgs {
    /// address to listen on (port 0 picks one)
    #[argh(option)]
    listen: SocketAddr,
    /// name the backend answers with
    #[argh(option)]
    name: String,
}

/// Ping-pong 64-byte datagrams from several clients at once, each from its own source address
/// (127.3.0.1 upward) with its own 8-byte token first (for `--udp-session-key 0:8`). Prints
/// one JSON line.
#[derive(FromArgs)]
#[argh(subcommand, name = "udp-pingpong")]
struct UdpPingpongArgs {
    /// address to send to
    #[argh(option)]
    connect: SocketAddr,
    /// clients, each a thread (default 4)
    #[argh(option, default = "4")]
    clients: usize,
    /// seconds to run (default 5)
    #[argh(option, default = "5")]
    seconds: u64,
}

/// The cluster demo (root): three tether instances behind a kernel ECMP route in network
/// namespaces, sharing pins; prints who went where through a failover and an instance leaving.
#[derive(FromArgs)]
#[argh(subcommand, name = "cluster")]
struct ClusterArgs {
    /// the tether binary
    #[argh(option)]
    tether: std::path::PathBuf,
    /// client addresses (default 12)
    #[argh(option, default = "12")]
    clients: usize,
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
        Command::Cluster(args) => cluster(args),
        Command::UdpBackend(args) => udp_backend(args),
        Command::UdpPingpong(args) => udp_pingpong(args),
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
    report(&r, "conns", "conn_s")
}

/// `r` as one JSON line, its count and rate under these names; success when it counted any.
fn report(r: &testkit::LoadReport, count: &str, rate: &str) -> io::Result<ExitCode> {
    println!(
        "{{\"{count}\": {}, \"errors\": {}, \"seconds\": {:.3}, \"{rate}\": {:.1}, \"p50_us\": {}, \"p99_us\": {}}}",
        r.conns,
        r.errors,
        r.seconds,
        r.rate(),
        r.p50_us,
        r.p99_us
    );
    Ok(if r.conns > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn udp_backend(args: UdpBackendArgs) -> io::Result<ExitCode> {
    let signals = StopSignals::block()?;
    let mut backend = testkit::UdpBackend::start(&args.name, args.listen)?;
    println!("udp backend {} listening {}", backend.name(), backend.addr());
    io::stdout().flush()?;
    signals.wait()?;
    backend.stop();
    Ok(ExitCode::SUCCESS)
}

fn udp_pingpong(args: UdpPingpongArgs) -> io::Result<ExitCode> {
    let sources = client_ips(Ipv4Addr::new(127, 3, 0, 1), args.clients)?;
    let r = testkit::udp_pingpong(args.connect, &sources, Duration::from_secs(args.seconds));
    report(&r, "round_trips", "rt_s")
}

/// See [`ClusterArgs`].
fn cluster(args: ClusterArgs) -> io::Result<ExitCode> {
    use testkit::cluster::{Cluster, PORT, VIP};
    let n = 3;
    let cluster = Cluster::new(n)?;
    let mut backends: Vec<Backend> = (0..3)
        .map(|k| {
            let addr = SocketAddr::new(Cluster::backend_ip(k), 6000);
            cluster.backend.run(|| Backend::start(&format!("b{k}"), addr))
        })
        .collect::<io::Result<_>>()?;
    let dir = std::env::temp_dir().join(format!("tether-cluster-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("peer.key");
    std::fs::write(&key, testkit::cluster::random_hex_key()?)?;
    let named: Vec<(String, SocketAddr)> =
        backends.iter().map(|b| (b.name().to_string(), b.addr())).collect();
    let tethers: Vec<testkit::Tether> = (0..n)
        .map(|i| {
            let argv = Cluster::tether_args(i, n, &named, Some(&key));
            cluster.balancers[i].run(|| testkit::Tether::start(&args.tether, &argv))
        })
        .collect::<io::Result<_>>()?;
    for (i, t) in tethers.iter().enumerate() {
        let up = testkit::wait_until(Duration::from_secs(30), || {
            cluster.balancers[i].run(|| {
                testkit::http(t.admin(), "GET", "/api/peers", "")
                    .is_ok_and(|r| r.body.matches("\"connected\"").count() == n - 1)
            })
        });
        if !up {
            return Err(io::Error::other(format!("lb{i}'s peers did not connect")));
        }
    }
    println!("== {n} tether instances (lb0..lb{}) share {VIP}:{PORT} behind an ECMP route", n - 1);
    let vip = SocketAddr::new(VIP, PORT);
    let ask = |j: usize| -> io::Result<(String, String)> {
        let (backend, from) =
            cluster.client.run(|| testkit::ask_peer(Cluster::client_ip(j), vip))?;
        let lb = Cluster::balancer_of(from.ip()).map_or("?".into(), |i| format!("lb{i}"));
        Ok((lb, backend))
    };
    let round = |title: &str| -> io::Result<Vec<String>> {
        println!("{title}");
        let mut backends = Vec::new();
        for j in 0..args.clients {
            let seen: Vec<(String, String)> = (0..3).map(|_| ask(j)).collect::<io::Result<_>>()?;
            let line: Vec<String> = seen.iter().map(|(lb, b)| format!("{lb} -> {b}")).collect();
            println!("  client {:<12} {}", Cluster::client_ip(j), line.join(", "));
            backends.push(seen[0].1.clone());
        }
        Ok(backends)
    };
    let moved = |before: &[String], after: &[String]| {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    };
    let first = round("-- each client three times (ECMP picks the instance per connection):")?;
    let b0 = backends[0].addr();
    backends[0].stop();
    let failed = round("-- b0 stopped: its clients fail over on whichever instance they reach:")?;
    println!("  moved: {} (b0's clients only)", moved(&first, &failed));
    backends[0] = cluster.backend.run(|| Backend::start("b0", b0))?;
    for (i, t) in tethers.iter().enumerate() {
        testkit::wait_until(Duration::from_secs(30), || {
            cluster.balancers[i].run(|| {
                testkit::http(t.admin(), "GET", "/api/backends", "").is_ok_and(|r| {
                    !r.body.contains("\"failing\":true") && !r.body.contains("\"health\":\"down\"")
                })
            })
        });
    }
    let back = round("-- b0 back: pins hold on every instance (non-preemptive, shared by peers):")?;
    println!("  moved: {}", moved(&failed, &back));
    cluster.route_over(&[0, 1]);
    let left = round("-- lb2 taken out of the route: its clients reach lb0 and lb1:")?;
    println!("  moved: {}", moved(&back, &left));
    drop(tethers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
