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
#![deny(clippy::unwrap_used)] // allowed in tests

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};

use config::{Config, Splice};
use conntrack::Sticky;
use proxy::{Listeners, Shared, Stats};

use admin::Admin;
use registry::Registry;
use supervisor::{signal_thread, Running, Supervisor};

mod admin;
mod checks;
mod history;
mod metrics;
mod notify;
mod offload;
mod peering;
mod preview;
pub mod probe;
mod registry;
mod reload;
mod state;
mod supervisor;
mod upgrade;

/// This build's version: the package's, and the build id given at compile time in
/// `TETHER_BUILD_ID` if any (tells two builds of one version apart, as an upgrade test does).
pub fn version() -> String {
    match option_env!("TETHER_BUILD_ID") {
        Some(id) => format!("{} ({id})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    }
}

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
    /// A `connect-from` address is not one of this host's.
    ConnectFrom(String),
    /// A system call needed to start failed.
    Os(&'static str, io::Error),
    /// The state file cannot be written.
    StateFile(std::path::PathBuf, io::Error),
    /// Taking over from the process that started this one failed.
    Upgrade(String),
    /// A worker's event loop failed.
    Worker(usize, io::Error),
    /// `--udp-offload on` and the offload cannot work here.
    Offload(String),
    /// The peers cannot start (key file, listener).
    Peers(String),
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
            RunError::ConnectFrom(e) => f.write_str(e),
            RunError::Os(what, e) => write!(f, "{what}: {e}"),
            RunError::Upgrade(why) => write!(f, "upgrade: {why}"),
            RunError::StateFile(path, e) => {
                write!(f, "--state-file {}: cannot be written ({e})", path.display())
            }
            RunError::Worker(i, e) => write!(f, "worker {i} failed: {e}"),
            RunError::Offload(why) => write!(f, "--udp-offload on: {why}"),
            RunError::Peers(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for RunError {}

/// Every `connect-from` address must be this host's: bind(2) to it must succeed.
fn check_connect_from(services: &[config::Service]) -> Result<(), String> {
    for service in services {
        for &ip in &service.connect_from {
            proxy::outgoing::is_local(ip).map_err(|e| {
                format!(
                    "connect-from {ip} (service {:?}): not an address of this host: {e}",
                    service.name
                )
            })?;
        }
    }
    Ok(())
}

/// What the fd limit allows: sessions, flows and splice pipes, with the reserve kept out.
struct Budget {
    max_conns: usize,
    max_flows: usize,
    max_pipes: usize,
    workers: usize,
}

/// Size the limits from the fd limit (raised to the hard limit first); an explicit
/// `--max-conns` or `--max-flows` that does not fit is an error naming what does.
fn budget(config: &Config, admin_limits: &admin::Limits) -> Result<Budget, RunError> {
    let nofile = raise_nofile();
    // The admin side's descriptors are its own: it can never take the last ones the data path
    // needs (issue 10).
    let admin_fds = if config.admin.is_some() { admin::fds(admin_limits) } else { 0 };
    let reserved = fd_reserve(nofile) + admin_fds;
    let usable = nofile.saturating_sub(reserved);
    let udp = config.services.iter().any(|s| s.protocol.udp());
    // UDP flows take one fd each and come first when UDP is on; TCP sessions (two fds each)
    // and splice pipes share the rest.
    let max_flows = match (udp, config.max_flows) {
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
    let splice = config.splice == Splice::Auto && proxy::pump::splice_supported();
    // Pipes get the fds the sessions cannot use: two sockets per session come first.
    let spare_fds = usable.saturating_sub(2 * max_conns as u64);
    let max_pipes = if splice { (spare_fds / 2 / workers as u64) as usize } else { 0 };
    Ok(Budget { max_conns, max_flows, max_pipes, workers })
}

/// The pins (and backend states) a new process starts with: those an upgrade handed over, or
/// the state file's, before any worker accepts a client.
fn restore_pins(
    config: &Config,
    registry: &mut Registry,
    handover: &upgrade::Handover,
    taken_over: bool,
) -> Result<(), RunError> {
    if let Some(path) = &config.state_file {
        state::check_writable(path).map_err(|e| RunError::StateFile(path.clone(), e))?;
    }
    if taken_over {
        state::restore(registry, &handover.state, "upgrade");
        registry.resume_health(&handover.health);
    } else if let Some(path) = &config.state_file {
        state::load(registry, path);
    }
    Ok(())
}

/// The admin listener: the one an upgrade handed over, else a new one.
fn bind_admin(
    config: &Config,
    inherited: Option<std::os::fd::OwnedFd>,
) -> Result<Option<admin::Bound>, RunError> {
    let fail = |e: String| RunError::Os("admin", io::Error::other(e));
    match (config.admin, inherited) {
        (Some(_), Some(fd)) => {
            let listener = std::net::TcpListener::from(fd);
            Ok(Some(admin::adopt(listener).map_err(|e| fail(e.to_string()))?))
        }
        (Some(addr), None) => Ok(Some(admin::bind(addr).map_err(fail)?)),
        (None, _) => Ok(None),
    }
}

/// Block the signals tether takes on a thread of its own (sigwait), before any thread exists:
/// threads inherit the mask.
fn block_signals() -> Result<SigSet, RunError> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR2] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| RunError::Os("blocking signals", e.into()))?;
    Ok(signals)
}

/// Start tether and block until it has shut down.
pub fn run(config: Config) -> Result<(), RunError> {
    let signals = block_signals()?;
    let exe = std::env::current_exe().ok();
    // Started by an upgrade: take over from the old process (listeners, pins, health).
    let (mut handover, taken_over) = match std::env::var(upgrade::FD_VAR) {
        Ok(raw) => {
            std::env::remove_var(upgrade::FD_VAR);
            let (handover, socket) = upgrade::receive(&raw).map_err(RunError::Upgrade)?;
            (handover, Some(socket))
        }
        Err(_) => (upgrade::Handover::default(), None),
    };

    let admin_limits =
        admin::Limits { max_conns: config.admin_max_conns, timeout: config.admin_timeout };
    let Budget { max_conns, max_flows, max_pipes, workers } = budget(&config, &admin_limits)?;
    let (offload, offload_status) =
        offload::decide(&config, max_flows).map_err(RunError::Offload)?;
    let mut shared = Shared::new(max_conns, max_pipes, max_flows, random_key(), offload);
    shared.workers = workers;
    // The session log's writer: lines go to stdout after the `ready` line.
    let session_log = if config.log_sessions {
        let format = match config.log_format {
            config::LogFormat::Logfmt => proxy::sessionlog::Format::Logfmt,
            config::LogFormat::Json => proxy::sessionlog::Format::Json,
        };
        let out = Box::new(io::stdout());
        let (log, writer) =
            proxy::sessionlog::SessionLog::start(format, out, proxy::sessionlog::CAPACITY)
                .map_err(|e| RunError::Os("spawning the session log thread", e))?;
        shared.session_log = Some(Arc::clone(&log));
        Some((log, writer))
    } else {
        None
    };
    let shared = Arc::new(shared);
    check_connect_from(&config.services).map_err(RunError::ConnectFrom)?;
    let mut registry = Registry::new(&config.services, Arc::clone(&shared), random_key())
        .map_err(RunError::Table)?;
    registry.offload = offload_status.clone();
    let (mut per_worker, announced) =
        bind_services(&config, workers, &mut registry, &mut handover)?;
    place_flows(&mut per_worker, std::mem::take(&mut handover.flows));
    restore_pins(&config, &mut registry, &handover, taken_over.is_some())?;
    // Everything that needs privileges happens before they are dropped: every listener (the
    // admin one too) is bound, the token file and the peers' key read.
    let admin_bound = bind_admin(&config, handover.admin.take())?;
    let peer_listener = match config.peers.as_ref().and_then(|p| p.listen) {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| RunError::Peers(format!("--peer-listen {addr}: {e}")))?,
        ),
        None => None,
    };
    let peer_addr = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_fd = admin_bound.as_ref().and_then(|b| b.dup().ok());
    let token = config.admin_token_file.as_deref().map(read_token).transpose()?;
    let peer_key = config.peers.as_ref().map(|p| peering::read_key(&p.key_file));
    let peer_key = peer_key.transpose().map_err(RunError::Peers)?;
    if let Some(user) = &config.user {
        drop_privileges(user)?;
    }

    let running = start_workers(&mut registry, per_worker, &shared)?;
    let registry = Arc::new(Mutex::new(registry));
    if let (Some(peers), Some(key)) = (&config.peers, peer_key) {
        let peering = peering::Peering::start(
            config.name.clone(),
            peers,
            key,
            Arc::clone(&registry),
            peer_listener,
        )
        .map_err(RunError::Peers)?;
        registry.lock().unwrap_or_else(|p| p.into_inner()).peering = Some(peering);
    }

    let (asks_tx, asks_rx) = crossbeam_channel::unbounded();
    let admin = match admin_bound {
        Some(bound) => Some(
            Admin::start(bound, Arc::clone(&registry), asks_tx.clone(), token, admin_limits)
                .map_err(|e| RunError::Os("admin", io::Error::other(e)))?,
        ),
        None => None,
    };
    let (stop_checks, checks_stop_rx) = crossbeam_channel::bounded::<()>(1);
    let checks = checks::spawn(Arc::clone(&registry), checks_stop_rx)
        .map_err(|e| RunError::Os("spawning the health-check thread", e))?;
    let (stop_saving, saving_stop_rx) = crossbeam_channel::bounded::<()>(1);
    let state_file = config.state_file.clone();
    let saving = match &state_file {
        Some(path) => {
            let (registry, path) = (Arc::clone(&registry), path.clone());
            Some(
                state::spawn(registry, path, config.state_interval, saving_stop_rx)
                    .map_err(|e| RunError::Os("spawning the state-file thread", e))?,
            )
        }
        None => None,
    };

    log::info!(
        "tether {} (pid {}): {} workers, {} services, max {} sessions, max {} flows, pump {}",
        version(),
        std::process::id(),
        workers,
        config.services.len(),
        max_conns,
        max_flows,
        if max_pipes > 0 { "copy+splice" } else { "copy" },
    );
    match (&offload_status, config.services.iter().any(|s| s.protocol.udp())) {
        (s, _) if s.enabled => log::info!("udp offload on: {}", s.reason),
        (s, true) => log::info!("udp offload off: {}", s.reason),
        (s, false) => log::debug!("udp offload off: {}", s.reason),
    }
    announce(&announced, admin.as_ref().map(|a| a.addr), peer_addr);
    let upgraded_into = taken_over.is_some();
    if let Some(socket) = taken_over {
        upgrade::ready(&socket);
    }
    let notifier = notify::Notifier::from_env(upgraded_into);
    notifier.ready(upgraded_into, &serving_status(&config));

    // Our own sender keeps the channel open even if the signal thread dies, so the supervisor's
    // timed receive never turns into a spin on `Disconnected`.
    let (signal_tx, signal_rx) = crossbeam_channel::unbounded();
    signal_thread(signals, signal_tx.clone());
    let context = Supervisor {
        registry: &registry,
        file: config.file.clone(),
        workers,
        config,
        stalled: vec![false; workers],
        exe,
        admin,
        admin_fd,
        stop_saving: Some(stop_saving),
        upgraded: false,
        notifier,
    };
    let mut running = running;
    let (result, upgraded) = context.supervise(&mut running, &signal_rx, &asks_rx);
    drop(signal_tx);
    // A reload asked for from now on fails at once instead of waiting for an answer.
    drop(asks_rx);
    let _ = stop_checks.send(());
    let _ = checks.join();
    if let Some(saving) = saving {
        let _ = saving.join();
    }
    // Every session line taken so far is written before the process exits.
    if let Some((log, writer)) = session_log {
        log.stop();
        let _ = writer.join();
    }
    // The last save, once every session has ended (after an upgrade the new process saves).
    if let (Some(path), false) = (&state_file, upgraded) {
        match state::save(&registry, path) {
            Ok(n) => log::info!("state file {}: {n} pins saved", path.display()),
            Err(e) => log::error!("state file {}: final save failed: {e}", path.display()),
        }
    }
    result
}

/// The `STATUS=` systemd shows while tether serves.
pub(crate) fn serving_status(config: &Config) -> String {
    let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
    format!("serving {} services, {backends} backends", config.services.len())
}

/// Bind every service's listeners for every worker (before privileges are dropped), record
/// them in the registry, and prefill the first sticky table if asked. Returns each worker's
/// sockets and (configured, bound, udp) per listener to announce.
#[allow(clippy::type_complexity)]
fn bind_services(
    config: &Config,
    workers: usize,
    registry: &mut Registry,
    handover: &mut upgrade::Handover,
) -> Result<(Vec<Listeners>, Vec<(SocketAddr, SocketAddr, bool)>), RunError> {
    let mut per_worker: Vec<Listeners> = (0..workers).map(|_| Listeners::default()).collect();
    let mut announced = Vec::new();
    for (slot, service) in config.services.iter().enumerate() {
        let mode = config.listeners;
        let held = &mut registry.held;
        let bound = bind_service(service, slot, workers, mode, &mut per_worker, handover, held)?;
        announced.extend(bound.iter().copied());
        if let Some(Some(s)) = registry.services.get_mut(slot) {
            s.listeners = bound;
        }
    }
    if let Some(Some(first)) = registry.services.first() {
        prefill(&first.sticky, config.sticky_prefill, &first.snapshot);
    }

    Ok((per_worker, announced))
}

/// Start one worker thread per set of listeners, each pinned to the next CPU the process may
/// use, and record how to reach it and its counters in the registry.
fn start_workers(
    registry: &mut Registry,
    per_worker: Vec<Listeners>,
    shared: &Arc<Shared>,
) -> Result<Vec<Running>, RunError> {
    let cpus = allowed_cpus();
    let mut running = Vec::with_capacity(per_worker.len());
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let stats = Arc::new(Stats::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let (worker, waker) = proxy::Worker::new(
            i,
            Arc::clone(shared),
            registry.snapshots(),
            listeners,
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
        registry.workers.links.push((tx.clone(), Arc::clone(&waker)));
        registry.stats.push(Arc::clone(&stats));
        running.push(Running { thread: Some(thread), tx, waker });
    }
    Ok(running)
}

/// Bind a service's listeners for every worker; returns (configured, bound, udp) per listener.
fn bind_service(
    service: &config::Service,
    slot: usize,
    workers: usize,
    mode: config::Listeners,
    per_worker: &mut [Listeners],
    handover: &mut upgrade::Handover,
    held: &mut Vec<upgrade::HeldListener>,
) -> Result<Vec<(SocketAddr, SocketAddr, bool)>, RunError> {
    let mut out = Vec::new();
    let shared = mode == config::Listeners::Shared;
    let took = |e| RunError::Os("taking over a listener", e);
    for &want in &service.listen {
        // Sockets an upgrade handed over are used as they are: not one SYN or datagram is
        // refused for a re-bind.
        let tcp_in = match service.protocol.tcp() {
            true => handover.take(want, false, workers, shared).map_err(took)?,
            false => None,
        };
        let udp_in = match service.protocol.udp() {
            true => handover.take(want, true, workers, shared).map_err(took)?,
            false => None,
        };
        let at = tcp_in
            .as_ref()
            .or(udp_in.as_ref())
            .map_or(want, |b| *b.tcp_addrs.first().or(b.udp_addrs.first()).unwrap_or(&want));
        let tcp = (service.protocol.tcp() && tcp_in.is_none()).then_some(mode);
        let need_udp = service.protocol.udp() && udp_in.is_none();
        let udp = need_udp.then(|| registry::udp_buffers_of(service));
        for bound in [tcp_in, udp_in].into_iter().flatten() {
            hand_out(want, bound, slot, per_worker, &mut out, held);
        }
        if tcp.is_some() || udp.is_some() {
            let bound = proxy::bind(&[at], workers, tcp, udp).map_err(RunError::Bind)?;
            hand_out(want, bound, slot, per_worker, &mut out, held);
        }
    }
    Ok(out)
}

/// Give each UDP flow an upgrade handed over to the worker that reads its listener socket (its
/// client's datagrams arrive there). A flow whose listener this configuration no longer has
/// ends here (its client's next datagram makes a new flow).
fn place_flows(per_worker: &mut [Listeners], flows: Vec<proxy::HandedFlow>) {
    let mut reader = std::collections::HashMap::new();
    for (w, listeners) in per_worker.iter().enumerate() {
        for (_, socket) in &listeners.udp {
            if let Ok(id) = proxy::socket_id(std::os::fd::AsFd::as_fd(socket)) {
                reader.insert(id, w);
            }
        }
    }
    let mut ended = 0;
    for flow in flows {
        match reader.get(&flow.listener) {
            Some(&w) => per_worker[w].flows.push(flow),
            None => ended += 1,
        }
    }
    if ended > 0 {
        log::info!("upgrade: {ended} UDP flows ended: their listener is no longer configured");
    }
}

/// Share freshly bound sockets of listen address `want` among the workers, for service `slot`,
/// and record (configured, bound, udp) for each listener.
fn hand_out(
    want: SocketAddr,
    bound: proxy::Bound,
    slot: usize,
    per_worker: &mut [Listeners],
    out: &mut Vec<(SocketAddr, SocketAddr, bool)>,
    held: &mut Vec<upgrade::HeldListener>,
) {
    held.extend(upgrade::hold(&bound, want));
    out.extend(bound.tcp_addrs.iter().map(|addr| (want, *addr, false)));
    out.extend(bound.udp_addrs.iter().map(|addr| (want, *addr, true)));
    for (w, (tcp, udp)) in bound.tcp.into_iter().zip(bound.udp).enumerate() {
        per_worker[w].tcp.extend(tcp.into_iter().map(|l| (slot, l)));
        per_worker[w].udp.extend(udp.into_iter().map(|l| (slot, l)));
    }
}

/// Tell whoever started us where we listen: one line per listener, then the admin address and
/// `ready`. Tests and scripts read these lines (ports given as 0 are resolved here).
fn announce(
    listeners: &[(SocketAddr, SocketAddr, bool)],
    admin: Option<SocketAddr>,
    peers: Option<SocketAddr>,
) {
    announce_listeners(listeners);
    let mut out = io::stdout().lock();
    if let Some(addr) = admin {
        let _ = writeln!(out, "admin http://{addr}/");
    }
    if let Some(addr) = peers {
        let _ = writeln!(out, "peers {addr}");
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
}

/// `listening tcp ADDR` / `listening udp ADDR`, TCP first, in configuration order.
pub(crate) fn announce_listeners(listeners: &[(SocketAddr, SocketAddr, bool)]) {
    let mut out = io::stdout().lock();
    for udp in [false, true] {
        for (_, addr, _) in listeners.iter().filter(|l| l.2 == udp) {
            let _ = writeln!(out, "listening {} {addr}", if udp { "udp" } else { "tcp" });
        }
    }
    let _ = out.flush();
}

/// The admin token: the file's first line, at least 16 characters.
fn read_token(path: &std::path::Path) -> Result<String, RunError> {
    let bad = |why: String| {
        RunError::Os("--admin-token-file", io::Error::other(format!("{}: {why}", path.display())))
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the token must be one line of at least 16 non-blank characters".into()));
    }
    Ok(token)
}

/// Become `spec`'s user and group for good: supplementary groups cleared, then gid, then uid
/// (that order: once the uid is gone, the gid can no longer be changed). Checked afterwards:
/// real, effective and saved ids all changed, and root cannot be taken back.
fn drop_privileges(spec: &config::UserSpec) -> Result<(), RunError> {
    use nix::unistd::{getegid, geteuid, getgid, getuid, setgid, setgroups, setuid, Group, User};
    let fail =
        |why: String| RunError::Os("--user", io::Error::other(format!("{}: {why}", spec.user)));
    let user = User::from_name(&spec.user)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("no such user".into()))?;
    let gid = match &spec.group {
        None => user.gid,
        Some(name) => {
            Group::from_name(name)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail(format!("no such group {name:?}")))?
                .gid
        }
    };
    let step = |what: &str, r: nix::Result<()>| {
        r.map_err(|e| fail(format!("{what}: {e} (run as root to use --user, or leave it out)")))
    };
    step("setgroups", setgroups(&[gid]))?;
    step("setgid", setgid(gid))?;
    step("setuid", setuid(user.uid))?;
    let dropped =
        getuid() == user.uid && geteuid() == user.uid && getgid() == gid && getegid() == gid;
    if !dropped || (!user.uid.is_root() && setuid(nix::unistd::Uid::from_raw(0)).is_ok()) {
        return Err(fail("privileges were not dropped for good".into()));
    }
    log::info!("running as user {} (uid {}, gid {})", spec.user, user.uid, gid);
    Ok(())
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
fn prefill(sticky: &Sticky, n: usize, service: &proxy::Snapshot) {
    let backends = service.backends.len().max(1);
    for i in 0..n {
        let ip = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128);
        let key = conntrack::AffinityKey::from_ip(ip.into());
        let id = service.backends.get(i % backends).map_or(0, |b| b.id);
        sticky.attach(key, id, 0);
        sticky.detach(key, 0);
    }
    if n > 0 {
        log::info!("sticky table pre-filled with {} entries", sticky.len());
    }
}

/// 128 random bits for the sticky table's SipHash key (hash flooding, FAILURE-MODES F9).
pub(crate) fn random_key() -> [u8; 16] {
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

/// This crate's tests open and close fds concurrently, in one process; the fd-leak test counts
/// them and the EMFILE test lowers the process's fd limit, so those run alone (`exclusive`)
/// while every other test that opens an fd holds `shared`.
#[cfg(test)]
pub(crate) mod test_fds {
    use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    static FDS: RwLock<()> = RwLock::new(());

    pub(crate) fn shared() -> RwLockReadGuard<'static, ()> {
        FDS.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn exclusive() -> RwLockWriteGuard<'static, ()> {
        FDS.write().unwrap_or_else(|e| e.into_inner())
    }
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
