//! Control: turns a validated [`config::Config`] into running workers, and steers them.
//!
//! It binds every listener before any worker starts (so a bad address stops the process before
//! it serves anyone), raises the file-descriptor limit, sizes `--max-conns` from it, starts one
//! worker thread per core, sweeps expired sticky entries once a second, and handles SIGTERM /
//! SIGINT: stop accepting, let sessions finish for the grace period, exit. It does not touch a
//! session's bytes: `proxy` does.
//!
//! ```no_run
//! use argh::FromArgs;
//! let args = config::Args::from_args(&["tether"], &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]).unwrap();
//! let config = config::Config::try_from(args).unwrap();
//! tether_control::run(config).unwrap(); // returns after SIGTERM and the grace period
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};

use config::{Config, Splice};
use conntrack::{Sticky, StickyConfig};
use proxy::{Command, Shared, Snapshot, Stats};

/// File descriptors kept out of the session budget: listeners, epoll, wakers, logs, pooled
/// pipes and room for the accept back-off to recover in.
/// An eighth of the limit when that is less, so a host whose hard limit is 1024 still serves.
const FD_RESERVE: u64 = 1024;

/// File descriptors kept out of the session budget for a limit of `nofile`.
fn fd_reserve(nofile: u64) -> u64 {
    FD_RESERVE.min(nofile / 8)
}
/// Most UDP flows by default: 64k connected sockets is a busy game fleet's worth, and about
/// 7 MB of flow table plus the kernel's socket memory.
const DEFAULT_MAX_FLOWS: u64 = 65_536;
/// How often expired sticky entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why tether could not start or had to stop.
#[derive(Debug)]
pub enum RunError {
    /// A listener could not be bound.
    Bind(proxy::BindError),
    /// The backend pool cannot make a table.
    Table(ring::BuildError),
    /// `--max-conns` is more than the file-descriptor limit allows.
    MaxConns { asked: usize, allowed: usize, nofile: u64, reserved: u64 },
    /// `--max-flows` is more than the file-descriptor limit allows.
    MaxFlows { asked: usize, allowed: usize, nofile: u64 },
    /// A system call needed to start failed.
    Os(&'static str, io::Error),
    /// A worker's event loop failed.
    Worker(usize, io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Bind(e) => write!(f, "{e}"),
            RunError::Table(e) => write!(f, "--backend: {e}"),
            RunError::MaxConns { asked, allowed, nofile, reserved } => write!(
                f,
                "--max-conns {asked}: at most {allowed} fit in the file-descriptor limit of {nofile} (2 per session plus {reserved} reserved); raise `ulimit -n` or lower --max-conns"
            ),
            RunError::MaxFlows { asked, allowed, nofile } => write!(
                f,
                "--max-flows {asked}: at most {allowed} fit in the file-descriptor limit of {nofile} (one per flow, half the limit at most); raise `ulimit -n` or lower --max-flows"
            ),
            RunError::Os(what, e) => write!(f, "{what}: {e}"),
            RunError::Worker(i, e) => write!(f, "worker {i} failed: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Start tether and block until it has shut down.
pub fn run(config: Config) -> Result<(), RunError> {
    // Signals are taken by a thread of ours (sigwait), so block them before any thread exists:
    // threads inherit the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| RunError::Os("blocking signals", e.into()))?;

    let nofile = raise_nofile();
    let reserved = fd_reserve(nofile);
    let usable = nofile.saturating_sub(reserved);
    // UDP flows take one fd each and come first when UDP is on; TCP sessions (two fds each)
    // and splice pipes share the rest.
    let max_flows = match (config.protocol.udp(), config.max_flows) {
        (false, _) => 0,
        (true, Some(asked)) if asked.get() as u64 > usable / 2 => {
            return Err(RunError::MaxFlows {
                asked: asked.get(),
                allowed: (usable / 2) as usize,
                nofile,
            })
        }
        (true, Some(asked)) => asked.get(),
        (true, None) => (usable / 4).clamp(1, DEFAULT_MAX_FLOWS) as usize,
    };
    let usable = usable - max_flows as u64;
    let allowed = (usable / 2).max(1) as usize;
    let max_conns = match config.max_conns {
        Some(asked) if asked.get() > allowed => {
            return Err(RunError::MaxConns { asked: asked.get(), allowed, nofile, reserved })
        }
        Some(asked) => asked.get(),
        // Leave a third of the budget for splice pipes (pooled; a transfer falls back to a
        // buffer when none can be made).
        None => (usable / 3).max(1) as usize,
    };
    let workers = config.workers.map_or_else(cpu_count, |w| w.get());
    let routing = proxy::Routing::new(&config.backends, config.table_size, config.seed)
        .map_err(RunError::Table)?;
    let bound = proxy::bind(&config.listen, workers, config.protocol.tcp(), config.protocol.udp())
        .map_err(RunError::Bind)?;
    let splice = config.splice == Splice::Auto && proxy::pump::splice_supported();
    // Pipes get the fds the sessions cannot use: two sockets per session come first.
    let spare_fds = usable.saturating_sub(2 * max_conns as u64);
    let max_pipes = if splice { (spare_fds / 2 / workers as u64) as usize } else { 0 };
    let sticky = Sticky::new(
        StickyConfig {
            capacity: config.sticky_capacity,
            timeout_ms: config.sticky_timeout.as_millis() as u64,
        },
        random_key(),
    );
    prefill(&sticky, config.sticky_prefill, config.backends.len());
    let shared = Arc::new(Shared {
        routing,
        sticky,
        affinity: config.affinity,
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        max_conns,
        max_pipes,
        active: AtomicUsize::new(0),
        epoch: Instant::now(),
        flow_budget: Arc::new(conntrack::FlowBudget::new(max_flows)),
        udp_idle_timeout: config.udp_idle_timeout,
        flow_hash_key: random_key(),
    });

    let cpus = allowed_cpus();
    let mut running = Vec::with_capacity(workers);
    let proxy::Bound { tcp, udp, tcp_addrs, udp_addrs } = bound;
    for (i, (sockets, udp_sockets)) in tcp.into_iter().zip(udp).enumerate() {
        let stats = Arc::new(Stats::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let (worker, waker) = proxy::Worker::new(
            i,
            Arc::clone(&shared),
            sockets,
            udp_sockets,
            Arc::clone(&stats),
            rx,
        )
        .map_err(|e| RunError::Os("starting a worker", e))?;
        let cpu = cpus.get(i % cpus.len().max(1)).copied();
        let thread = std::thread::Builder::new()
            .name(format!("tether-w{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                worker.run()
            })
            .map_err(|e| RunError::Os("spawning a worker thread", e))?;
        running.push(Running { thread: Some(thread), tx, waker, stats });
    }

    log::info!(
        "tether {} workers, {} backends, max {} sessions, max {} flows, pump {}, affinity {:?}",
        workers,
        config.backends.len(),
        max_conns,
        max_flows,
        if max_pipes > 0 { "copy+splice" } else { "copy" },
        config.affinity
    );
    announce(&tcp_addrs, &udp_addrs);

    // Our own sender keeps the channel open even if the signal thread dies, so the supervisor's
    // timed receive never turns into a spin on `Disconnected`.
    let (signal_tx, signal_rx) = crossbeam_channel::unbounded();
    signal_thread(signals, signal_tx.clone());
    let result = supervise(&shared, &mut running, &signal_rx, config.grace);
    drop(signal_tx);
    result
}

/// One worker thread and how to reach it.
struct Running {
    thread: Option<JoinHandle<io::Result<()>>>,
    tx: crossbeam_channel::Sender<Command>,
    waker: Arc<mio::Waker>,
    stats: Arc<Stats>,
}

/// Sweep the sticky table, watch signals and workers; shut down on SIGTERM/SIGINT.
fn supervise(
    shared: &Shared,
    running: &mut [Running],
    signals: &Receiver<Signal>,
    grace: Duration,
) -> Result<(), RunError> {
    let mut deadline: Option<Instant> = None;
    let mut failure = None;
    loop {
        match signals.recv_timeout(SWEEP_EVERY.min(Duration::from_millis(200))) {
            Ok(Signal::SIGHUP) => log::info!("SIGHUP: reloading is not supported yet; ignored"),
            Ok(sig) => {
                // A second signal during the grace period cuts it short.
                let at = match deadline {
                    None => {
                        log::info!("{sig}: closing listeners; open sessions have {grace:?}");
                        Instant::now() + grace
                    }
                    Some(_) => {
                        log::info!("{sig} again: closing open sessions now");
                        Instant::now()
                    }
                };
                deadline = Some(at);
                tell_all(running, Command::Shutdown { deadline: at });
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        let removed = shared.sticky.sweep(shared.now_ms(Instant::now()));
        if removed > 0 {
            log::debug!("sticky sweep removed {removed} expired entries");
        }
        for (i, r) in running.iter_mut().enumerate() {
            if r.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                match r.thread.take().map(JoinHandle::join) {
                    Some(Ok(Ok(()))) | None => {}
                    Some(Ok(Err(e))) => {
                        log::error!("worker {i} failed: {e}");
                        failure.get_or_insert(RunError::Worker(i, e));
                    }
                    Some(Err(_)) => {
                        log::error!("worker {i} panicked");
                        failure.get_or_insert(RunError::Worker(i, io::Error::other("panicked")));
                    }
                }
            }
        }
        if running.iter().all(|r| r.thread.is_none()) {
            break;
        }
        if failure.is_some() && deadline.is_none() {
            // One loop gone means its share of clients goes unserved: stop everything.
            let at = Instant::now() + grace;
            deadline = Some(at);
            tell_all(running, Command::Shutdown { deadline: at });
        }
    }
    let mut total = Snapshot::default();
    for r in running.iter() {
        total += r.stats.snapshot();
    }
    let summary: Vec<String> =
        total.fields().iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    log::info!("stopped: {}", summary.join(" "));
    failure.map_or(Ok(()), Err)
}

fn tell_all(running: &[Running], cmd: Command) {
    for r in running {
        let _ = r.tx.send(cmd.clone());
        let _ = r.waker.wake();
    }
}

/// Tell whoever started us where we listen: one line per listener, then `ready`. Tests and
/// scripts read these lines (ports given as 0 are resolved here).
fn announce(tcp: &[std::net::SocketAddr], udp: &[std::net::SocketAddr]) {
    let mut out = io::stdout().lock();
    for addr in tcp {
        let _ = writeln!(out, "listening tcp {addr}");
    }
    for addr in udp {
        let _ = writeln!(out, "listening udp {addr}");
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
}

fn signal_thread(signals: SigSet, tx: crossbeam_channel::Sender<Signal>) {
    let spawned = std::thread::Builder::new().name("tether-signals".into()).spawn(move || loop {
        match signals.wait() {
            Ok(sig) => {
                if tx.send(sig).is_err() {
                    return;
                }
            }
            Err(e) => {
                log::error!("sigwait: {e}");
                return;
            }
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}; signals will not be handled");
    }
}

/// Raise the soft fd limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                return hard;
            }
            soft
        }
        Err(_) => 1024,
    }
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPUs this process may run on (respects `taskset`), in order.
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => Vec::new(),
    }
}

fn pin_to(cpu: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
            log::debug!("pinning to CPU {cpu}: {e}");
        }
    }
}

/// Benchmark aid (`--sticky-prefill`): `n` idle entries for addresses of the IPv6 documentation
/// prefix 2001:db8::/32 (RFC 3849), which no real client has.
fn prefill(sticky: &Sticky, n: usize, backends: usize) {
    for i in 0..n {
        let ip = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128);
        let key = conntrack::AffinityKey::from_ip(ip.into());
        sticky.attach(key, (i % backends.max(1)) as u32, 0);
        sticky.detach(key, 0);
    }
    if n > 0 {
        log::info!("sticky table pre-filled with {} entries", sticky.len());
    }
}

/// 128 random bits for the sticky table's SipHash key (hash flooding, FAILURE-MODES F9).
fn random_key() -> [u8; 16] {
    let mut key = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
    if read.is_err() {
        // No urandom: fall back to std's per-process random SipHash keys.
        use std::hash::{BuildHasher, Hasher};
        let s = std::collections::hash_map::RandomState::new();
        let (mut a, mut b) = (s.build_hasher(), s.build_hasher());
        a.write_u8(1);
        b.write_u8(2);
        key[..8].copy_from_slice(&a.finish().to_le_bytes());
        key[8..].copy_from_slice(&b.finish().to_le_bytes());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_fd_limits_still_leave_room_for_sessions() {
        assert_eq!(fd_reserve(1024), 128);
        assert_eq!(fd_reserve(20_000), 1024);
        assert_eq!(fd_reserve(0), 0);
    }
}
