//! What workers route by: per service, an immutable snapshot (settings, backends, the Maglev
//! table, the sticky table) that control replaces as a whole, and per backend a long-lived
//! [`BackendState`] of atomics that every snapshot naming the backend shares.
//!
//! A configuration change (add, remove, re-weight, reload) builds a new [`Snapshot`] off the hot
//! path and sends it to the workers; sessions keep the snapshot they started with (an `Arc`), so
//! a removed backend's open sessions run on and count down its gauges. A health or admin change
//! only flips an atomic of the backend, so a flapping backend never costs a table rebuild
//! (FAILURE-MODES F16).
//!
//! Sticky entries hold a backend's [`BackendId`], which is never reused within a process: after
//! a backend is removed, a client pinned to it finds no such backend in the new snapshot and is
//! routed afresh, never to whichever backend took its index.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use conntrack::{BackendId, Sticky};
use health::{AdminState, Health};
use ring::{Member, Ring};

/// How long a refused or timed-out connect keeps a backend out of new sessions' choices.
/// Short on purpose: it is a guess from one failure, and a pinned client moves for good once it
/// is re-pinned elsewhere, so a long hold would scatter clients on one transient error.
pub const PASSIVE_HOLD: Duration = Duration::from_secs(2);

/// One backend as the whole process knows it, across snapshots: identity, operator and health
/// state, and counters.
#[derive(Debug)]
pub struct BackendState {
    /// Unique within the process, never reused (what sticky entries hold).
    pub id: BackendId,
    pub name: String,
    pub addr: SocketAddr,
    admin: AtomicU8,
    up: AtomicBool,
    /// Milliseconds (on the proxy clock) until which the backend counts as failing.
    failing_until: AtomicU64,
    /// Most TCP sessions open or connecting at once (`max-conns`); 0: no limit.
    max_conns: AtomicU32,
    /// TCP sessions open or connecting now: what `max_conns` bounds.
    inflight: AtomicU64,
    /// TCP sessions established to this backend and not yet closed.
    pub sessions: AtomicU64,
    /// TCP sessions established to this backend since it was added.
    pub sessions_total: AtomicU64,
    /// UDP flows open to this backend.
    pub flows: AtomicU64,
    /// UDP flows opened to this backend since it was added.
    pub flows_total: AtomicU64,
    /// Connect attempts that were refused, unreachable or timed out, and UDP flows that met
    /// ECONNREFUSED: the passive failures that count toward `fall`.
    pub failures: AtomicU64,
    /// Bytes of TCP sessions client -> backend.
    pub bytes_in: AtomicU64,
    /// Bytes of TCP sessions backend -> client.
    pub bytes_out: AtomicU64,
    /// UDP datagrams client -> backend and backend -> client, whether tether's sockets or the
    /// offload program carried them (folded in per flow every second and when it ends).
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// Their payload bytes.
    pub datagram_bytes_in: AtomicU64,
    pub datagram_bytes_out: AtomicU64,
}

impl BackendState {
    /// A new backend: ready, up, no counts.
    pub fn new(id: BackendId, name: String, addr: SocketAddr) -> BackendState {
        BackendState {
            id,
            name,
            addr,
            admin: AtomicU8::new(AdminState::Ready.to_u8()),
            up: AtomicBool::new(true),
            failing_until: AtomicU64::new(0),
            max_conns: AtomicU32::new(0),
            inflight: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            sessions_total: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            flows_total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            datagrams_in: AtomicU64::new(0),
            datagrams_out: AtomicU64::new(0),
            datagram_bytes_in: AtomicU64::new(0),
            datagram_bytes_out: AtomicU64::new(0),
        }
    }

    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Relaxed))
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state.to_u8(), Relaxed);
    }

    pub fn health(&self) -> Health {
        if self.up.load(Relaxed) {
            Health::Up
        } else {
            Health::Down
        }
    }

    /// Set by health checking. Coming up also clears a passive failure mark: probes that just
    /// succeeded `rise` times are fresher news than a refused connect from before.
    pub fn set_health(&self, health: Health) {
        self.up.store(health == Health::Up, Relaxed);
        if health == Health::Up {
            self.failing_until.store(0, Relaxed);
        }
    }

    /// Set `max-conns` (`None`: no limit). Sessions over a lowered limit run on; new ones wait
    /// until the count is below it.
    pub fn set_max_conns(&self, max: Option<std::num::NonZeroU32>) {
        self.max_conns.store(max.map_or(0, |n| n.get()), Relaxed);
    }

    /// `max-conns`, if any.
    pub fn max_conns(&self) -> Option<u32> {
        Some(self.max_conns.load(Relaxed)).filter(|&n| n > 0)
    }

    /// Whether a new session would fit under `max-conns` now.
    pub fn has_room(&self) -> bool {
        match self.max_conns() {
            None => true,
            Some(max) => self.inflight.load(Relaxed) < u64::from(max),
        }
    }

    /// Take a place under `max-conns` for a session about to connect; `false` when full (another
    /// worker may have taken the last place since `has_room`). Give it back with `release`.
    pub fn try_reserve(&self) -> bool {
        let Some(max) = self.max_conns() else {
            self.inflight.fetch_add(1, Relaxed);
            return true;
        };
        self.inflight
            .fetch_update(Relaxed, Relaxed, |n| (n < u64::from(max)).then_some(n + 1))
            .is_ok()
    }

    /// Places under `max-conns` taken now (the simulation checks them).
    #[cfg(test)]
    pub fn reserved(&self) -> u64 {
        self.inflight.load(Relaxed)
    }

    /// What bounded-load choice weighs (`--balance-factor`): TCP sessions open or connecting,
    /// and UDP flows.
    pub fn load(&self) -> u64 {
        self.inflight.load(Relaxed) + self.flows.load(Relaxed)
    }

    /// A session that reserved a place ended or moved on.
    pub fn release(&self) {
        self.inflight.fetch_sub(1, Relaxed);
    }

    /// Whether a recent passive failure keeps it out at `now_ms`.
    pub fn failing(&self, now_ms: u64) -> bool {
        self.failing_until.load(Relaxed) > now_ms
    }

    /// Record a refused or timed-out connect: keep the backend out of choices for a while, and
    /// count a passive failure (health checking reads the count).
    pub fn mark_failing(&self, now_ms: u64) {
        self.failures.fetch_add(1, Relaxed);
        self.failing_until.fetch_max(now_ms + PASSIVE_HOLD.as_millis() as u64, Relaxed);
    }

    /// May take a client that is not pinned to it.
    fn accepts_new(&self, now_ms: u64) -> bool {
        self.admin() == AdminState::Ready
            && self.up.load(Relaxed)
            && !self.failing(now_ms)
            && self.has_room()
    }

    /// May take a client pinned to it (draining backends keep theirs; a full one is skipped
    /// like a down one).
    fn keeps_pinned(&self, now_ms: u64) -> bool {
        self.admin() != AdminState::Maint
            && self.up.load(Relaxed)
            && !self.failing(now_ms)
            && self.has_room()
    }
}

/// Per-service settings a session or flow reads when it starts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub affinity: vocab::Affinity,
    /// With source affinity, how much of the address pins a client (`source/24,64`).
    pub prefix: vocab::Prefix,
    /// The per-source limits count per `prefix` network rather than per address.
    pub limit_per_prefix: bool,
    /// Bounded-load choice for clients without a pin (`--balance-factor`, at least 1).
    pub balance_factor: Option<f64>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// UDP flows and pins keyed by these payload bytes (`--udp-session-key`).
    pub session_key: Option<vocab::SessionKey>,
    /// Datagrams a new address sends with a flow's key before the flow moves to it.
    pub migrate_after: u32,
    /// Local IPs backend sockets are bound to, in turn (empty: the kernel chooses).
    pub connect_from: Vec<std::net::IpAddr>,
    /// Kernel buffers of the service's UDP sockets.
    pub udp_buffers: crate::udp_socket::UdpBuffers,
}

impl Settings {
    /// Source affinity, 1 s to connect, these idle timeouts, nothing else set: a plain
    /// service for tests and benches (the daemon builds its settings from the config).
    pub fn basic(idle: Duration, udp_idle: Duration) -> Settings {
        Settings {
            affinity: vocab::Affinity::Source,
            prefix: vocab::Prefix::HOST,
            limit_per_prefix: false,
            balance_factor: None,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: idle,
            udp_idle_timeout: udp_idle,
            session_key: None,
            migrate_after: 2,
            connect_from: Vec::new(),
            udp_buffers: Default::default(),
        }
    }
}

/// One service's routing snapshot. Immutable apart from the atomics of its backends.
#[derive(Debug)]
pub struct Snapshot {
    pub name: String,
    /// Where workers keep it (the same for every snapshot of this service).
    pub slot: usize,
    pub settings: Settings,
    /// Table member `i` is `backends[i]`.
    pub backends: Vec<Arc<BackendState>>,
    pub weights: Vec<u32>,
    /// `None` when the pool is empty (every backend removed at run time).
    pub ring: Option<Ring>,
    /// Shared by every snapshot of the service: changes never clear it.
    pub sticky: Arc<Sticky>,
    /// Who may connect and how much.
    pub guards: Guards,
    /// The table's seed (`--seed`): session keys' pins are hashed under it too.
    pub seed: u64,
    by_id: HashMap<BackendId, usize>,
}

/// A service's access rules and per-source limits.
#[derive(Debug, Clone, Default)]
pub struct Guards {
    pub acl: Arc<guard::Acl>,
    /// `None` when no per-source limit is set. Kept across snapshots while the limits stay the
    /// same, so open-session counts stay exact; each session releases on the limiter it
    /// counted on.
    pub limiter: Option<Arc<guard::Limiter>>,
    /// PROXY protocol settings.
    pub proxy: ProxyRules,
}

/// The PROXY protocol as a snapshot applies it.
#[derive(Debug, Clone, Default)]
pub struct ProxyRules {
    pub send: Option<vocab::ProxyVersion>,
    pub send_every_datagram: bool,
    /// Sources whose header is required and believed (empty: none read).
    pub trusted: Arc<guard::Acl>,
    pub accept: bool,
    pub header_timeout: Duration,
}

impl Snapshot {
    /// A snapshot of `backends` (with their weights) under a table of `table_size` slots.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        slot: usize,
        settings: Settings,
        backends: Vec<(Arc<BackendState>, u32)>,
        table_size: usize,
        seed: u64,
        sticky: Arc<Sticky>,
        guards: Guards,
    ) -> Result<Snapshot, ring::BuildError> {
        let members: Vec<Member> =
            backends.iter().map(|(b, w)| Member { name: b.name.clone(), weight: *w }).collect();
        let ring =
            if members.is_empty() { None } else { Some(Ring::build(&members, table_size, seed)?) };
        let by_id = backends.iter().enumerate().map(|(i, (b, _))| (b.id, i)).collect();
        let (backends, weights) = backends.into_iter().unzip();
        Ok(Snapshot { name, slot, settings, backends, weights, ring, sticky, guards, seed, by_id })
    }

    /// The index of the backend with `id` in this snapshot.
    pub fn index_of(&self, id: BackendId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// The hash of an affinity key's bytes under this service's table (0 for an empty pool).
    pub fn hash_key(&self, key: &[u8]) -> u64 {
        self.ring.as_ref().map_or(0, |r| r.hash_key(key))
    }

    /// The backend a client pinned to `id` should go back to, if that backend still may take
    /// it: present, not in maintenance, up and not failing. Draining backends keep their pins.
    pub fn pinned(&self, id: BackendId, now_ms: u64) -> Option<usize> {
        self.index_of(id).filter(|&i| self.backends[i].keeps_pinned(now_ms))
    }

    /// First backend of the key's fallback order that takes new clients and is not excluded;
    /// if none does, the first `ready` one not excluded with room under its `max-conns`,
    /// whatever its health (a probe or a failure mark can be wrong, and trying beats turning
    /// everyone away). Never a draining or maintained backend, never a full one.
    pub fn choose(
        &self,
        hash: u64,
        now_ms: u64,
        excluded: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let ring = self.ring.as_ref()?;
        // With a balance factor, `None` means no backend takes new clients (one under the
        // bound always does otherwise): the plain pick would find none either.
        let first = match self.settings.balance_factor {
            Some(factor) => self.choose_bounded(hash, now_ms, &excluded, factor),
            None => ring.pick(hash, |i| !excluded(i) && self.backends[i].accepts_new(now_ms)),
        };
        first.or_else(|| {
            ring.pick(hash, |i| {
                let b = &self.backends[i];
                !excluded(i) && b.admin() == AdminState::Ready && b.has_room()
            })
        })
    }
}

impl Snapshot {
    /// Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018; HAProxy's
    /// `hash-balance-factor`): the first backend of the key's fallback order that takes new
    /// clients and whose load is under its capacity, `ceil(factor x (load of all + 1) x its
    /// weight / all weights)` over the backends that take new clients. One is always under it
    /// when `factor >= 1` (the least loaded for its weight is at most the average); `None`
    /// when no backend takes new clients. Deterministic given the loads: instances with the
    /// same view agree.
    fn choose_bounded(
        &self,
        hash: u64,
        now_ms: u64,
        excluded: &impl Fn(usize) -> bool,
        factor: f64,
    ) -> Option<usize> {
        let ring = self.ring.as_ref()?;
        let usable = |i: usize| !excluded(i) && self.backends[i].accepts_new(now_ms);
        let (mut load, mut weight) = (0u64, 0u64);
        for i in (0..self.backends.len()).filter(|&i| usable(i)) {
            load += self.backends[i].load();
            weight += u64::from(self.weights[i]);
        }
        if weight == 0 {
            return None;
        }
        let per_weight = factor * (load + 1) as f64 / weight as f64;
        ring.pick(hash, |i| {
            let capacity = (per_weight * f64::from(self.weights[i])).ceil() as u64;
            usable(i) && self.backends[i].load() < capacity
        })
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports
/// for IPv4 peers) turned into IPv4, so PROXY headers say TCP4/UDP4 for IPv4 clients.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Bytes of a connection's or flow's 5-tuple, for `5tuple` affinity: protocol number, client
/// address and port, listener address and port (addresses in canonical 16-byte form).
pub fn five_tuple(protocol: u8, peer: SocketAddr, local: SocketAddr) -> [u8; 37] {
    let mut out = [0u8; 37];
    out[0] = protocol;
    out[1..17].copy_from_slice(&conntrack::AffinityKey::from_ip(peer.ip()).to_bytes());
    out[17..19].copy_from_slice(&peer.port().to_be_bytes());
    out[19..35].copy_from_slice(&conntrack::AffinityKey::from_ip(local.ip()).to_bytes());
    out[35..37].copy_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use conntrack::StickyConfig;

    fn service(states: &[AdminState]) -> Snapshot {
        let backends = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let b = BackendState::new(
                    100 + i as u32,
                    format!("b{i}"),
                    SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                );
                b.set_admin(*s);
                (Arc::new(b), 1)
            })
            .collect();
        let settings = Settings::basic(Duration::from_secs(1), Duration::from_secs(1));
        let sticky =
            Arc::new(Sticky::new(StickyConfig { capacity: 16, timeout_ms: 1000 }, [1; 16]));
        Snapshot::new("s".into(), 0, settings, backends, 13, 0, sticky, Guards::default()).unwrap()
    }

    #[test]
    fn drain_keeps_pins_and_takes_no_one_new() {
        let s = service(&[AdminState::Drain, AdminState::Ready]);
        assert_eq!(s.pinned(100, 0), Some(0));
        for hash in 0..200u64 {
            assert_eq!(s.choose(hash.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, |_| false), Some(1));
        }
    }

    #[test]
    fn maint_loses_pins_and_is_never_a_last_resort() {
        let s = service(&[AdminState::Maint, AdminState::Maint]);
        assert_eq!(s.pinned(100, 0), None);
        assert_eq!(s.choose(7, 0, |_| false), None);
    }

    #[test]
    fn down_backends_are_a_last_resort_only() {
        let s = service(&[AdminState::Ready, AdminState::Ready]);
        s.backends[0].set_health(Health::Down);
        assert_eq!(s.pinned(100, 0), None);
        for hash in 0..50u64 {
            assert_eq!(s.choose(hash.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, |_| false), Some(1));
        }
        s.backends[1].set_health(Health::Down);
        assert!(s.choose(7, 0, |_| false).is_some(), "all down: try one anyway");
        s.backends[1].mark_failing(0);
        assert!(s.backends[1].failing(1));
        assert!(!s.backends[1].failing(PASSIVE_HOLD.as_millis() as u64));
    }

    #[test]
    fn ids_survive_reordering_and_unknown_ids_route_afresh() {
        let s = service(&[AdminState::Ready, AdminState::Ready]);
        assert_eq!(s.index_of(101), Some(1));
        assert_eq!(s.pinned(999, 0), None);
    }

    #[test]
    fn a_full_backend_is_skipped_until_a_place_frees() {
        let s = service(&[AdminState::Ready, AdminState::Ready]);
        s.backends[0].set_max_conns(std::num::NonZeroU32::new(2));
        assert!(s.backends[0].try_reserve() && s.backends[0].try_reserve());
        assert!(!s.backends[0].try_reserve(), "a third place under max-conns 2");
        assert_eq!(s.pinned(100, 0), None, "a full backend loses its pinned clients for now");
        for hash in 0..50u64 {
            assert_eq!(s.choose(hash.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, |_| false), Some(1));
        }
        s.backends[1].set_health(Health::Down);
        assert_eq!(s.choose(7, 0, |_| false), Some(1), "the last resort is never a full one");
        s.backends[0].release();
        assert_eq!(s.pinned(100, 0), Some(0));
        assert!(s.backends[0].try_reserve());
        s.backends[0].set_max_conns(None);
        assert!(s.backends[0].try_reserve(), "no limit");
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:80".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn an_empty_pool_routes_nowhere() {
        let s = service(&[]);
        assert_eq!(s.choose(1, 0, |_| false), None);
        assert_eq!(s.hash_key(b"x"), 0);
    }
}
