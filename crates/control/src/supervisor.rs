//! The main thread's loop once everything runs ([`Supervisor`]): signals (reload, upgrade,
//! shutdown), the admin API's reloads and upgrades, the sticky sweeps, and the workers'
//! health; and the worker threads as it sees them ([`Running`]).

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use nix::sys::signal::{SigSet, Signal};

use config::Config;
use proxy::{Command, Counts};

use crate::admin::{Admin, Ask};
use crate::registry::Registry;
use crate::reload::{self, ReloadError};
use crate::{announce_listeners, serving_status, state, upgrade, RunError};

/// How often expired sticky entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One worker thread and how to reach it.
pub(crate) struct Running {
    pub(crate) thread: Option<JoinHandle<io::Result<()>>>,
    pub(crate) tx: crossbeam_channel::Sender<Command>,
    pub(crate) waker: Arc<mio::Waker>,
}

/// The main thread's loop: signals, reloads, sticky sweeps, worker health.
pub(crate) struct Supervisor<'a> {
    pub(crate) registry: &'a Mutex<Registry>,
    pub(crate) file: Option<std::path::PathBuf>,
    pub(crate) workers: usize,
    /// The configuration in force (process-wide settings are kept from the start).
    pub(crate) config: Config,
    /// Per worker: found stalled at the last look (its loop had not turned for a while).
    pub(crate) stalled: Vec<bool>,
    /// This binary's path at start: an upgrade starts what is there now.
    pub(crate) exe: Option<std::path::PathBuf>,
    /// The admin server, stopped once an upgrade handed over.
    pub(crate) admin: Option<Admin>,
    /// A descriptor of the admin listener, to hand over.
    pub(crate) admin_fd: Option<std::os::fd::OwnedFd>,
    /// Stops the state file's thread (an upgrade hands the pins over instead).
    pub(crate) stop_saving: Option<crossbeam_channel::Sender<()>>,
    /// An upgrade handed this process over: it serves its open sessions and exits.
    pub(crate) upgraded: bool,
    /// Readiness, reloads, stopping and the watchdog, told to systemd.
    pub(crate) notifier: crate::notify::Notifier,
}

impl Supervisor<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sweep the sticky tables, watch signals and workers; shut down on SIGTERM/SIGINT.
    pub(crate) fn supervise(
        mut self,
        running: &mut [Running],
        signals: &Receiver<Signal>,
        asks: &Receiver<Ask>,
    ) -> (Result<(), RunError>, bool) {
        let mut deadline: Option<Instant> = None;
        let mut failure = None;
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut next_watchdog = Instant::now();
        let mut next_sample = Instant::now();
        loop {
            crossbeam_channel::select! {
                recv(signals) -> sig => if let Ok(sig) = sig {
                    self.on_signal(sig, running, &mut deadline);
                },
                recv(asks) -> ask => if let Ok(ask) = ask {
                    self.on_ask(ask, running, &mut deadline);
                },
                default(Duration::from_millis(200)) => {}
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + SWEEP_EVERY;
                let removed = self.lock().sweep();
                if removed > 0 {
                    log::debug!("sticky sweep removed {removed} expired entries");
                }
                self.watch_workers(running);
            }
            if Instant::now() >= next_sample {
                next_sample = Instant::now() + crate::history::EVERY;
                let mut reg = self.lock();
                let views = reg.backends();
                let unix_ms = vocab::time::unix_ms(std::time::SystemTime::now());
                reg.history.record(unix_ms, &views);
            }
            // The watchdog is fed only while every worker's loop turns: a stalled worker
            // starves it, and systemd restarts tether.
            if let Some(every) = self.notifier.watchdog_every() {
                if Instant::now() >= next_watchdog && !self.stalled.iter().any(|&s| s) {
                    self.notifier.send("WATCHDOG=1");
                    next_watchdog = Instant::now() + every.min(SWEEP_EVERY);
                }
            }
            if let Some(e) = reap(running) {
                failure.get_or_insert(e);
            }
            if running.iter().all(|r| r.thread.is_none()) {
                break;
            }
            if failure.is_some() && deadline.is_none() {
                // One loop gone means its share of clients goes unserved: stop everything.
                let at = Instant::now() + self.config.grace;
                deadline = Some(at);
                self.stop_accepting(running, at);
            }
        }
        let mut total = Counts::default();
        for stats in &self.lock().stats {
            total += stats.counts();
        }
        let summary: Vec<String> = total
            .fields()
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        log::info!("stopped: {}", summary.join(" "));
        (failure.map_or(Ok(()), Err), self.upgraded)
    }

    /// SIGHUP reloads, SIGUSR2 upgrades, SIGTERM and SIGINT stop (a second one at once).
    fn on_signal(&mut self, sig: Signal, running: &[Running], deadline: &mut Option<Instant>) {
        match sig {
            Signal::SIGHUP => match self.reload_unless_stopping(*deadline) {
                Ok(summary) => log::info!("SIGHUP: reloaded: {summary}"),
                Err(e) => log::error!("SIGHUP: reload refused, configuration unchanged: {e}"),
            },
            Signal::SIGUSR2 => match self.upgrade(running, deadline) {
                Ok(summary) => {
                    log::info!("SIGUSR2: upgraded: {summary}");
                    self.admin = None;
                }
                Err(e) => log::error!("SIGUSR2: upgrade refused, this process serves on: {e}"),
            },
            _ => {
                // A second signal during the grace period cuts it short.
                let at = match deadline {
                    None => {
                        let grace = self.config.grace;
                        log::info!("{sig}: closing listeners; open sessions have {grace:?}");
                        Instant::now() + grace
                    }
                    Some(_) => {
                        log::info!("{sig} again: closing open sessions now");
                        Instant::now()
                    }
                };
                *deadline = Some(at);
                self.stop_accepting(running, at);
            }
        }
    }

    /// What the admin API asks for: a reload or an upgrade, answered on its channel.
    fn on_ask(&mut self, ask: Ask, running: &[Running], deadline: &mut Option<Instant>) {
        match ask {
            Ask::Reload(reply) => {
                let result = self.reload_unless_stopping(*deadline);
                match &result {
                    Ok(summary) => log::info!("admin: reloaded: {summary}"),
                    Err(e) => log::error!("admin: reload refused, configuration unchanged: {e}"),
                }
                let _ = reply.send(result);
            }
            Ask::Upgrade(reply) => {
                let result = self.upgrade(running, deadline);
                match &result {
                    Ok(summary) => log::info!("admin: upgraded: {summary}"),
                    Err(e) => log::error!("admin: upgrade refused, this process serves on: {e}"),
                }
                let upgraded = result.is_ok();
                let _ = reply.send(result);
                // Stopped once the answer is on its way: it finishes it, and accepts no more.
                if upgraded {
                    self.admin = None;
                }
            }
        }
    }

    /// Tell every worker to close its listeners and end its sessions by `at`, and close the
    /// descriptors of the listeners kept here for upgrades. Those kept the sockets listening:
    /// the kernel went on completing handshakes into a backlog nobody accepted from, so a
    /// client connecting during the grace period hung until the process exited and was then
    /// reset (found by the chaos suite, issue 15), and a restarted tether binding the port
    /// with SO_REUSEPORT shared its clients with that dead socket. After an upgrade the new
    /// process holds its own descriptors.
    fn stop_accepting(&mut self, running: &[Running], at: Instant) {
        self.notifier
            .send("STOPPING=1\nSTATUS=stopping: serving open sessions until the grace period ends");
        tell_all(running, || Command::Shutdown { deadline: at });
        let closed = std::mem::take(&mut self.lock().held);
        log::debug!("closed {} kept listener descriptors", closed.len());
    }

    /// A reload, refused once the process is stopping: its listeners are closing, and a
    /// reload would bind new ones that no worker serves.
    fn reload_unless_stopping(&mut self, deadline: Option<Instant>) -> Result<String, ReloadError> {
        if deadline.is_some() {
            return Err(ReloadError::Stopping);
        }
        self.notifier.reloading();
        let result = self.reload();
        let status = match &result {
            Ok(_) => serving_status(&self.config),
            Err(e) => format!("{}; last reload refused: {e}", serving_status(&self.config))
                .replace('\n', "; "),
        };
        self.notifier.ready(false, &status);
        result
    }

    /// Start the binary at this one's path and hand it over (`upgrade`); once it serves, stop
    /// accepting, let open sessions run until they end or the grace period is over, and stop the
    /// state file's saves (the new process saves). The caller stops the admin server once it
    /// has answered (the new process serves the admin listener).
    fn upgrade(
        &mut self,
        running: &[Running],
        deadline: &mut Option<Instant>,
    ) -> Result<String, String> {
        if self.upgraded {
            return Err("an upgrade already handed this process over; it is draining".into());
        }
        if deadline.is_some() {
            return Err("this process is stopping".into());
        }
        let exe = self.exe.clone().ok_or("the path of this binary is unknown")?;
        let (state, pins) = state::encode(self.registry);
        let (held, health) = {
            let reg = self.lock();
            let held: Vec<upgrade::HeldListener> = reg
                .held
                .iter()
                .filter_map(|h| {
                    let fd = h.fd.try_clone().ok()?;
                    Some(upgrade::HeldListener { want: h.want, bound: h.bound, udp: h.udp, fd })
                })
                .collect();
            (held, reg.health_of())
        };
        // The UDP flows go along: every worker stops reading its UDP sockets and hands over
        // copies of its flows' sockets. They read again if the upgrade fails.
        let udp = held.iter().any(|h| h.udp);
        let flows = if udp { pause_udp(running)? } else { Vec::new() };
        let started = upgrade::start(&exe, &held, self.admin_fd.as_ref(), &flows, &state, health);
        let pid = started.inspect_err(|_| {
            if udp {
                tell_all(running, || Command::ResumeUdp);
            }
        })?;
        let flows = flows.len();
        self.upgraded = true;
        // The new process is the service's main process now, and says so to systemd.
        self.notifier.silence();
        // The new process serves the admin listener; this copy would keep it listening after
        // that process stops.
        self.admin_fd = None;
        let at = Instant::now() + self.config.upgrade_grace;
        *deadline = Some(at);
        self.stop_accepting(running, at);
        if let Some(stop) = self.stop_saving.take() {
            let _ = stop.send(());
        }
        self.lock().event(format!("upgraded: pid {pid} serves now"));
        Ok(format!(
            "pid {pid} serves now with {pins} pins, {flows} UDP flows and {} listeners; this \
             process (pid {}) serves its open sessions for at most {:?}",
            held.len(),
            std::process::id(),
            self.config.upgrade_grace
        ))
    }

    /// Say when a worker's event loop stops turning, and when it turns again (F10), then wake
    /// every worker: a healthy one turns at once, a stalled one is found at a later look.
    fn watch_workers(&mut self, running: &[Running]) {
        let shared_listeners = self.config.listeners == config::Listeners::Shared;
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = reg.shared.now_ms(Instant::now());
        for (i, r) in running.iter().enumerate().filter(|(_, r)| r.thread.is_some()) {
            let Some((stalled, age)) =
                reg.stats.get(i).map(|s| (s.stalled(now_ms), s.loop_age_ms(now_ms)))
            else {
                continue;
            };
            match (self.stalled[i], stalled) {
                (false, true) => reg.event(format!(
                    "worker {i} stalled: its loop has not turned for {age} ms; its sessions and flows wait{}",
                    if shared_listeners {
                        " (new TCP clients go to the other workers)"
                    } else {
                        ", and so do new TCP clients the kernel hashes to it (--listeners per-worker)"
                    }
                )),
                (true, false) => reg.event(format!("worker {i} runs again")),
                _ => {}
            }
            self.stalled[i] = stalled;
            if let Some(s) = reg.stats.get(i) {
                s.woken(now_ms);
            }
            let _ = r.waker.wake();
        }
    }

    /// Read the config file again and apply it, all or nothing (`reload::prepare` changes
    /// nothing; `reload::commit` cannot fail).
    fn reload(&mut self) -> Result<String, ReloadError> {
        let Some(path) = self.file.clone() else { return Err(ReloadError::NoFile) };
        let next = config::file::load_path(&path).map_err(ReloadError::Config)?;
        for (what, same) in [
            ("workers", next.workers == self.config.workers),
            ("max-conns", next.max_conns == self.config.max_conns),
            ("max-flows", next.max_flows == self.config.max_flows),
            ("splice", next.splice == self.config.splice),
            ("listeners", next.listeners == self.config.listeners),
            ("admin", next.admin == self.config.admin),
            ("admin-max-conns", next.admin_max_conns == self.config.admin_max_conns),
            ("admin-timeout", next.admin_timeout == self.config.admin_timeout),
        ] {
            if !same {
                log::warn!("reload: `{what}` changed; it takes effect at the next restart");
            }
        }
        let mut reg = self.lock();
        let mode = self.config.listeners;
        let plan = reload::prepare(&reg, &next.services, self.workers, mode, &mut |_| Ok(()))?;
        let (mut summary, announced) = reload::commit(&mut reg, plan);
        reg.event(format!("configuration reloaded from {}", path.display()));
        let workers = reg.workers.clone();
        drop(reg);
        // Answer once the workers have taken the new snapshots: a client the reload denies is
        // refused from the moment the reload is said to be done, its offloaded flow included.
        if !workers.sync(RELOAD_SYNC) {
            log::warn!(
                "reload: a worker has not taken the new configuration within {RELOAD_SYNC:?}"
            );
        }
        announce_listeners(&announced);
        self.config.services = next.services;
        summary.push(format!("{} services", self.config.services.len()));
        Ok(summary.join(", "))
    }
}

/// How long a reload waits for the workers to take it before it answers anyway.
const RELOAD_SYNC: Duration = Duration::from_secs(2);

/// Join the worker threads that ended; the first failure among them, if any.
fn reap(running: &mut [Running]) -> Option<RunError> {
    let mut failure = None;
    for (i, r) in running.iter_mut().enumerate() {
        if !r.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            continue;
        }
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
    failure
}

/// Stop every worker reading its UDP sockets and collect its flows (for an upgrade). A worker
/// that does not answer within 5 s fails the upgrade, and every worker reads again.
fn pause_udp(running: &[Running]) -> Result<Vec<proxy::HandedFlow>, String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let live: Vec<&Running> = running.iter().filter(|r| r.thread.is_some()).collect();
    for r in &live {
        let _ = r.tx.send(Command::PauseUdp(tx.clone()));
        let _ = r.waker.wake();
    }
    let mut flows = Vec::new();
    for _ in &live {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(mine) => flows.extend(mine),
            Err(_) => {
                tell_all(running, || Command::ResumeUdp);
                return Err("a worker did not hand over its UDP flows within 5s".into());
            }
        }
    }
    Ok(flows)
}

fn tell_all(running: &[Running], cmd: impl Fn() -> Command) {
    for r in running {
        let _ = r.tx.send(cmd());
        let _ = r.waker.wake();
    }
}

pub(crate) fn signal_thread(signals: SigSet, tx: crossbeam_channel::Sender<Signal>) {
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
