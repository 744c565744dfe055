//! The control side's record of every service and backend, and the only writer of routing
//! snapshots. Admin requests, health results and reloads all come through here, under one
//! mutex, so two changes never race; each change that touches routing builds a new snapshot and
//! sends it to every worker.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::SystemTime;

use conntrack::{AffinityKey, BackendId, Sticky, StickyConfig};
use health::{AdminState, Checker, Health};
use proxy::{BackendState, Command, Listeners, Settings, Shared, Snapshot, Stats};

/// Events kept for the status page and `/api/events`.
const EVENTS_KEPT: usize = 200;

/// Why a change was refused; the admin API maps each to a status code. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such service or backend (404).
    NotFound(String),
    /// The request is malformed or asks for something impossible (400).
    Bad(String),
    /// It conflicts with what exists (409).
    Conflict(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotFound(m) | Refusal::Bad(m) | Refusal::Conflict(m) => f.write_str(m),
        }
    }
}

/// One thing that happened, for people.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub text: String,
}

/// How to reach the workers.
#[derive(Clone)]
pub struct Workers {
    pub links: Vec<(crossbeam_channel::Sender<Command>, Arc<mio::Waker>)>,
}

impl Workers {
    pub(crate) fn send(&self, make: impl Fn() -> Command) {
        for (tx, waker) in &self.links {
            let _ = tx.send(make());
            let _ = waker.wake();
        }
    }

    /// Wait until every worker has carried out every command sent before, for at most
    /// `timeout` (a stalled worker must not hold its caller); whether all of them did.
    pub(crate) fn sync(&self, timeout: std::time::Duration) -> bool {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.send(|| Command::Sync(tx.clone()));
        drop(tx);
        let deadline = std::time::Instant::now() + timeout;
        self.links.iter().all(|_| rx.recv_deadline(deadline).is_ok())
    }
}

/// One backend under control.
pub struct BackendCtl {
    pub state: Arc<BackendState>,
    pub weight: NonZeroU32,
    pub checker: Checker,
    /// The backend's passive-failure count already fed to the checker.
    pub failures_seen: u64,
}

/// One service under control.
pub struct ServiceCtl {
    /// As configured (backends as they are now, run-time changes included).
    pub config: config::Service,
    pub backends: Vec<BackendCtl>,
    pub sticky: Arc<Sticky>,
    /// The per-source limiter, kept while the limits stay the same.
    pub limiter: Option<Arc<guard::Limiter>>,
    pub snapshot: Arc<Snapshot>,
    /// (configured address, bound address, udp) of each listener.
    pub listeners: Vec<(SocketAddr, SocketAddr, bool)>,
}

/// Everything control steers.
pub struct Registry {
    /// By slot; `None` once a reload removed the service.
    pub services: Vec<Option<ServiceCtl>>,
    pub(crate) next_id: BackendId,
    pub shared: Arc<Shared>,
    pub stats: Vec<Arc<Stats>>,
    pub workers: Workers,
    pub events: VecDeque<Event>,
    pub(crate) sticky_key: [u8; 16],
    /// Health state changes since start.
    pub transitions: u64,
    /// What the admin server counts (shared with its thread).
    pub admin: Arc<crate::admin::Counters>,
    /// What the state file's saves and load count.
    pub state: Arc<crate::state::Counters>,
    /// When this process started (unix ms).
    pub started_unix_ms: u64,
    /// A descriptor of every listening socket, to hand them over on upgrade.
    pub held: Vec<crate::upgrade::HeldListener>,
    /// Whether UDP flows are offloaded, and why (not).
    pub offload: crate::offload::Status,
    /// Pins shared with other instances (`--peer`, `--peer-listen`).
    pub peering: Option<Arc<crate::peering::Peering>>,
    /// The last ten minutes of every backend (`GET /api/history`).
    pub history: crate::history::History,
}

/// A backend as the API shows it.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub service: String,
    pub name: String,
    pub address: SocketAddr,
    pub state: AdminState,
    pub health: Health,
    pub weight: u32,
    pub max_conns: Option<u32>,
    pub sessions: u64,
    pub sessions_total: u64,
    pub flows: u64,
    pub flows_total: u64,
    pub sticky_clients: usize,
    pub failures: u64,
    /// A refused or timed-out connect in the last `PASSIVE_HOLD` keeps new clients off it.
    pub failing: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// UDP datagrams and their payload bytes each way (kernel-forwarded ones included).
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub datagram_bytes_in: u64,
    pub datagram_bytes_out: u64,
}

impl Registry {
    /// A registry for `services` (validated), none bound yet.
    pub fn new(
        services: &[config::Service],
        shared: Arc<Shared>,
        sticky_key: [u8; 16],
    ) -> Result<Registry, ring::BuildError> {
        let mut registry = Registry {
            services: Vec::new(),
            next_id: 0,
            shared,
            stats: Vec::new(),
            workers: Workers { links: Vec::new() },
            events: VecDeque::new(),
            sticky_key,
            transitions: 0,
            admin: Arc::default(),
            state: Arc::default(),
            held: Vec::new(),
            offload: crate::offload::Status {
                mode: config::UdpOffload::Off,
                enabled: false,
                reason: "not decided".into(),
                interfaces: Vec::new(),
                attachment: None,
            },
            peering: None,
            history: crate::history::History::default(),
            started_unix_ms: vocab::time::unix_ms(SystemTime::now()),
        };
        for s in services {
            let ctl = registry.make_service(s.clone(), registry.services.len())?;
            registry.services.push(Some(ctl));
        }
        Ok(registry)
    }

    fn make_service(
        &mut self,
        config: config::Service,
        slot: usize,
    ) -> Result<ServiceCtl, ring::BuildError> {
        build_service(config, slot, &mut self.next_id, self.sticky_key)
    }

    fn new_backend(&mut self, spec: &config::BackendSpec, service: &config::Service) -> BackendCtl {
        backend_ctl(&mut self.next_id, spec, service)
    }

    /// Every current snapshot (for starting workers).
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.services.iter().flatten().map(|s| Arc::clone(&s.snapshot)).collect()
    }

    pub fn event(&mut self, text: String) {
        log::info!("{text}");
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event { at: SystemTime::now(), text });
    }

    /// Rebuild service `slot`'s snapshot from its record and send it to the workers.
    fn publish(&mut self, slot: usize) -> Result<(), Refusal> {
        let Some(s) = self.services[slot].as_mut() else { return Ok(()) };
        let snap = snapshot(&s.config, slot, members(&s.backends), &s.sticky, &s.limiter)
            .map_err(|e| Refusal::Bad(e.to_string()))?;
        s.snapshot = Arc::new(snap);
        let snap = Arc::clone(&s.snapshot);
        self.workers.send(|| Command::Publish(Arc::clone(&snap)));
        Ok(())
    }

    fn find(&self, service: &str) -> Result<usize, Refusal> {
        self.services
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.config.name == service))
            .ok_or_else(|| Refusal::NotFound(format!("no service {service:?}")))
    }

    /// The service named `service`.
    pub fn service(&self, service: &str) -> Result<&ServiceCtl, Refusal> {
        let slot = self.find(service)?;
        Ok(self.services[slot].as_ref().expect("found"))
    }

    /// The (slot, index) of backend `name` of `service`.
    pub fn find_backend(&self, service: &str, name: &str) -> Result<(usize, usize), Refusal> {
        let slot = self.find(service)?;
        let s = self.services[slot].as_ref().expect("found");
        let i = s.backends.iter().position(|b| b.state.name == name).ok_or_else(|| {
            Refusal::NotFound(format!("no backend {name:?} in service {service:?}"))
        })?;
        Ok((slot, i))
    }

    /// Set a backend's admin state.
    pub fn set_state(
        &mut self,
        service: &str,
        name: &str,
        state: AdminState,
    ) -> Result<(), Refusal> {
        let (slot, i) = self.find_backend(service, name)?;
        let s = self.services[slot].as_ref().expect("found");
        let kill = s.config.health.on_down == config::OnDown::Kill;
        let b = &s.backends[i].state;
        let (before, id) = (b.admin(), b.id);
        if before != state {
            b.set_admin(state);
            self.event(format!("{service}/{name}: state {before} -> {state}"));
            if state == AdminState::Maint && kill {
                self.kill(id);
            }
        }
        Ok(())
    }

    /// Set a backend's weight (rebuilds the table; pinned clients stay where they are).
    pub fn set_weight(
        &mut self,
        service: &str,
        name: &str,
        weight: NonZeroU32,
    ) -> Result<(), Refusal> {
        let (slot, i) = self.find_backend(service, name)?;
        let s = self.services[slot].as_mut().expect("found");
        let before = s.backends[i].weight;
        if before == weight {
            return Ok(());
        }
        s.backends[i].weight = weight;
        s.config.backends[i].weight = weight;
        if let Err(e) = self.publish(slot) {
            let s = self.services[slot].as_mut().expect("found");
            s.backends[i].weight = before;
            s.config.backends[i].weight = before;
            return Err(e);
        }
        self.event(format!("{service}/{name}: weight {before} -> {weight}"));
        Ok(())
    }

    /// Add a backend to a service.
    pub fn add_backend(&mut self, service: &str, spec: config::BackendSpec) -> Result<(), Refusal> {
        let slot = self.find(service)?;
        let s = self.services[slot].as_ref().expect("found");
        if s.backends.iter().any(|b| b.state.name == spec.name) {
            return Err(Refusal::Conflict(format!(
                "service {service:?} already has a backend named {:?}",
                spec.name
            )));
        }
        if s.backends.len() + 1 >= s.config.table_size {
            return Err(Refusal::Bad("the table size must stay larger than the pool".into()));
        }
        let from = &s.config.connect_from;
        if !config::connect_from_reaches(from, spec.addr) {
            return Err(Refusal::Bad(format!(
                "service {service:?} connects from {from:?}: none is of {}'s family",
                spec.addr
            )));
        }
        let config = s.config.clone();
        let backend = self.new_backend(&spec, &config);
        let s = self.services[slot].as_mut().expect("found");
        s.backends.push(backend);
        s.config.backends.push(spec.clone());
        if let Err(e) = self.publish(slot) {
            let s = self.services[slot].as_mut().expect("found");
            s.backends.pop();
            s.config.backends.pop();
            return Err(e);
        }
        self.event(format!(
            "{service}/{}: added at {}, weight {}",
            spec.name, spec.addr, spec.weight
        ));
        Ok(())
    }

    /// Remove a backend: no new sessions reach it; open ones run on; its pins route afresh.
    pub fn remove_backend(&mut self, service: &str, name: &str) -> Result<(), Refusal> {
        let (slot, i) = self.find_backend(service, name)?;
        let s = self.services[slot].as_mut().expect("found");
        let removed = s.backends.remove(i);
        let spec = s.config.backends.remove(i);
        if let Err(e) = self.publish(slot) {
            let s = self.services[slot].as_mut().expect("found");
            s.backends.insert(i, removed);
            s.config.backends.insert(i, spec);
            return Err(e);
        }
        let live = removed.state.sessions.load(std::sync::atomic::Ordering::Relaxed);
        let s = self.services[slot].as_ref().expect("found");
        if s.config.health.on_down == config::OnDown::Kill {
            self.kill(removed.state.id);
            self.event(format!("{service}/{name}: removed ({live} open sessions reset)"));
        } else {
            self.event(format!("{service}/{name}: removed ({live} open sessions continue)"));
        }
        Ok(())
    }

    /// Reset the open sessions and end the flows of backend `id`, on every worker.
    pub fn kill(&self, id: BackendId) {
        self.workers.send(|| Command::Kill(id));
    }

    /// Every backend of every service, with live counts.
    pub fn backends(&self) -> Vec<BackendView> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.shared.clock_ms();
        let mut out = Vec::new();
        for s in self.services.iter().flatten() {
            let pins = s.sticky.per_backend(now, self.next_id as usize);
            for b in &s.backends {
                let st = &b.state;
                out.push(BackendView {
                    service: s.config.name.clone(),
                    name: st.name.clone(),
                    address: st.addr,
                    state: st.admin(),
                    health: st.health(),
                    weight: b.weight.get(),
                    max_conns: st.max_conns(),
                    sessions: st.sessions.load(Relaxed),
                    sessions_total: st.sessions_total.load(Relaxed),
                    flows: st.flows.load(Relaxed),
                    flows_total: st.flows_total.load(Relaxed),
                    sticky_clients: pins.get(st.id as usize).copied().unwrap_or(0),
                    failures: st.failures.load(Relaxed),
                    failing: st.failing(now),
                    bytes_in: st.bytes_in.load(Relaxed),
                    bytes_out: st.bytes_out.load(Relaxed),
                    datagrams_in: st.datagrams_in.load(Relaxed),
                    datagrams_out: st.datagrams_out.load(Relaxed),
                    datagram_bytes_in: st.datagram_bytes_in.load(Relaxed),
                    datagram_bytes_out: st.datagram_bytes_out.load(Relaxed),
                });
            }
        }
        out
    }

    /// Where `client` is pinned in `service`: (backend name, live sessions, expires in ms).
    pub fn sticky(&self, service: &str, client: std::net::IpAddr) -> Result<Pin, Refusal> {
        let s = self.service(service)?;
        // Pinned by its network under `--affinity source/N`.
        Ok(self.pin_of(s, AffinityKey::from_ip_prefix(client, s.config.prefix)))
    }

    /// The pin of UDP session key bytes `token` (`--udp-session-key`) in `service`.
    pub fn sticky_session(&self, service: &str, token: &[u8]) -> Result<Pin, Refusal> {
        let s = self.service(service)?;
        Ok(self.pin_of(s, AffinityKey::from_session(token, s.config.seed)))
    }

    fn pin_of(&self, s: &ServiceCtl, key: AffinityKey) -> Pin {
        let Some(entry) = s.sticky.get(key, self.shared.clock_ms()) else {
            return Pin { backend: None, live: 0, expires_in_ms: None };
        };
        let name =
            s.backends.iter().find(|b| b.state.id == entry.backend).map(|b| b.state.name.clone());
        Pin {
            backend: Some(name.unwrap_or_else(|| "(removed)".into())),
            live: entry.live,
            expires_in_ms: entry.expires_in_ms,
        }
    }

    /// Hand new listeners to the workers (they register them at once).
    pub fn listen(&self, per_worker: Vec<Listeners>) {
        for ((tx, waker), l) in self.workers.links.iter().zip(per_worker) {
            let _ = tx.send(Command::Listen(l));
            let _ = waker.wake();
        }
    }

    /// Every backend's health and admin state, for an upgrade to hand over.
    pub fn health_of(&self) -> Vec<crate::upgrade::HealthOf> {
        let mut out = Vec::new();
        for s in self.services.iter().flatten() {
            for b in &s.backends {
                out.push(crate::upgrade::HealthOf {
                    service: s.config.name.clone(),
                    backend: b.state.name.clone(),
                    up: b.state.health() == Health::Up,
                    admin: b.state.admin().as_str().to_string(),
                });
            }
        }
        out
    }

    /// Take up the health and admin states an old process handed over (an upgrade), by service
    /// and backend name.
    pub fn resume_health(&mut self, states: &[crate::upgrade::HealthOf]) {
        for h in states {
            let Ok((slot, i)) = self.find_backend(&h.service, &h.backend) else { continue };
            let Some(s) = self.services[slot].as_mut() else { continue };
            let b = &mut s.backends[i];
            let health = if h.up { Health::Up } else { Health::Down };
            b.state.set_health(health);
            b.checker.resume(health);
            if let Ok(admin) = h.admin.parse::<AdminState>() {
                b.state.set_admin(admin);
            }
        }
    }

    /// Sweep expired sticky entries and idle per-source records of every service; returns how
    /// many sticky entries went.
    pub fn sweep(&self) -> usize {
        let now = self.shared.clock_ms();
        for limiter in self.services.iter().flatten().filter_map(|s| s.limiter.as_ref()) {
            limiter.sweep(now);
        }
        self.services.iter().flatten().map(|s| s.sticky.sweep(now)).sum()
    }
}

/// Where a client is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub backend: Option<String>,
    pub live: u32,
    pub expires_in_ms: Option<u64>,
}

/// The limits part of a guard config, to tell whether a reload changed them.
pub(crate) fn limits_of(g: &config::GuardConfig) -> (Option<u32>, Option<u32>, Option<u32>, usize) {
    (g.max_conns_per_source, g.conn_rate_per_source, g.flow_rate_per_source, g.tracked_sources)
}

pub(crate) fn limiter_for(g: &config::GuardConfig, key: [u8; 16]) -> Option<Arc<guard::Limiter>> {
    g.limits().then(|| {
        Arc::new(guard::Limiter::new(
            guard::LimitConfig {
                max_conns: g.max_conns_per_source,
                conn_rate: g.conn_rate_per_source,
                flow_rate: g.flow_rate_per_source,
                capacity: g.tracked_sources,
            },
            key,
        ))
    })
}

/// A new service's control record with fresh backends, ids taken from `next_id`. Changes
/// nothing else: a reload builds its new services with this before committing to anything.
pub(crate) fn build_service(
    config: config::Service,
    slot: usize,
    next_id: &mut BackendId,
    sticky_key: [u8; 16],
) -> Result<ServiceCtl, ring::BuildError> {
    let sticky = Arc::new(Sticky::new(
        StickyConfig {
            capacity: config.sticky_capacity,
            timeout_ms: config.sticky_timeout.as_millis() as u64,
        },
        sticky_key,
    ));
    let backends: Vec<BackendCtl> =
        config.backends.iter().map(|b| backend_ctl(next_id, b, &config)).collect();
    let limiter = limiter_for(&config.guard, sticky_key);
    let snapshot = Arc::new(snapshot(&config, slot, members(&backends), &sticky, &limiter)?);
    Ok(ServiceCtl { config, backends, sticky, limiter, snapshot, listeners: Vec::new() })
}

/// A backend's control record, with the next id of `next_id`.
pub(crate) fn backend_ctl(
    next_id: &mut BackendId,
    spec: &config::BackendSpec,
    service: &config::Service,
) -> BackendCtl {
    let id = *next_id;
    *next_id += 1;
    let state = BackendState::new(id, spec.name.clone(), spec.addr);
    state.set_max_conns(spec.max_conns);
    BackendCtl {
        state: Arc::new(state),
        weight: spec.weight,
        checker: Checker::new(service.health.rise, service.health.fall),
        failures_seen: 0,
    }
}

/// What a service's sessions and flows read of its settings.
pub(crate) fn settings_of(service: &config::Service) -> Settings {
    Settings {
        affinity: service.affinity,
        prefix: service.prefix,
        limit_per_prefix: service.guard.limit_per_prefix,
        balance_factor: service.balance_factor,
        connect_timeout: service.connect_timeout,
        idle_timeout: service.idle_timeout,
        udp_idle_timeout: service.udp_idle_timeout,
        session_key: service.udp_session_key,
        migrate_after: service.udp_migrate_after,
        connect_from: service.connect_from.clone(),
        udp_buffers: udp_buffers_of(service),
    }
}

/// The kernel buffers asked for a service's UDP sockets.
pub(crate) fn udp_buffers_of(service: &config::Service) -> proxy::udp_socket::UdpBuffers {
    proxy::udp_socket::UdpBuffers { rcvbuf: service.udp_rcvbuf, sndbuf: service.udp_sndbuf }
}

/// The table members of `backends`: each one's shared state and weight.
pub(crate) fn members(backends: &[BackendCtl]) -> Vec<(Arc<BackendState>, u32)> {
    backends.iter().map(|b| (Arc::clone(&b.state), b.weight.get())).collect()
}

/// A routing snapshot of service `config` at `slot` with these table members.
pub(crate) fn snapshot(
    config: &config::Service,
    slot: usize,
    members: Vec<(Arc<BackendState>, u32)>,
    sticky: &Arc<Sticky>,
    limiter: &Option<Arc<guard::Limiter>>,
) -> Result<Snapshot, ring::BuildError> {
    let p = &config.proxy;
    let guards = proxy::Guards {
        acl: Arc::new(guard::Acl::new(config.guard.allow.clone(), config.guard.deny.clone())),
        limiter: limiter.clone(),
        proxy: proxy::ProxyRules {
            send: p.send,
            send_every_datagram: p.send_every_datagram,
            accept: !p.trusted.is_empty(),
            trusted: Arc::new(guard::Acl::new(p.trusted.clone(), Vec::new())),
            header_timeout: p.header_timeout,
        },
    };
    Snapshot::new(
        config.name.clone(),
        slot,
        settings_of(config),
        members,
        config.table_size,
        config.seed,
        Arc::clone(sticky),
        guards,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link to a worker that is only a channel: the test plays the worker.
    fn link() -> (
        (crossbeam_channel::Sender<Command>, Arc<mio::Waker>),
        crossbeam_channel::Receiver<Command>,
        mio::Poll,
    ) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        ((tx, waker), rx, poll)
    }

    /// A worker that answers every sync, until its link is dropped.
    fn answering(rx: crossbeam_channel::Receiver<Command>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while let Ok(command) = rx.recv() {
                if let Command::Sync(reply) = command {
                    let _ = reply.send(());
                }
            }
        })
    }

    #[test]
    fn sync_waits_for_every_worker_and_gives_up_on_a_silent_one() {
        let _fds = crate::test_fds::shared();
        let (a, a_rx, _pa) = link();
        let (b, b_rx, _pb) = link();
        let (ta, tb) = (answering(a_rx), answering(b_rx));
        let both = Workers { links: vec![a, b] };
        assert!(both.sync(std::time::Duration::from_secs(30)));
        drop(both);
        ta.join().unwrap();
        tb.join().unwrap();
        // One worker answers, the other never reads its link: the sync gives up.
        let (c, c_rx, _pc) = link();
        let (d, _d_rx, _pd) = link();
        let tc = answering(c_rx);
        let one_silent = Workers { links: vec![c, d] };
        assert!(!one_silent.sync(std::time::Duration::from_millis(100)));
        drop(one_silent);
        tc.join().unwrap();
    }
}
