//! Sharing pins with peers (issue 14): every pin a worker makes or moves reaches the other
//! instances, and theirs reach this one, so a client the network moves between instances keeps
//! its backend.
//!
//! Threads, none of which a worker ever waits on:
//! - the hub: takes the workers' changes from a bounded channel (the sticky tables' [`Watch`];
//!   a full channel drops the change, counts it, and makes every peer resync), names their
//!   backends, records each pin's [`Version`] and puts the change on every peer's bounded queue
//!   (a full queue marks that peer for a resync instead);
//! - one sender per configured peer (`--peer`): dials it (back-off 100 ms doubling to 5 s),
//!   proves the key and checks the peer's proof, sends its whole table (rate-limited), then the
//!   changes as they come, a ping when idle; a write that blocks 5 s drops the connection;
//! - the acceptor on `--peer-listen`, and one reader per accepted connection: after the
//!   handshake (a known name, unless no `--peer` is given, and a valid proof), each change is
//!   applied when it is newer than what this instance has of that pin (wall-clock time, then
//!   instance name). A malformed frame or a failed proof drops the connection with a log line
//!   naming the peer, and none of its bytes reach a table.
//!
//! A connection carries one direction: the dialer's changes. Each instance lists the others
//! with `--peer`; every pair then has one connection each way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use conntrack::{AffinityKey, BackendId, Watch};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use peers::auth::{Key, NONCE};
use peers::wire::{self, Change, HealthView, Message, What};
use peers::Version;

use crate::registry::Registry;

/// Changes waiting for the hub, and per peer, at most.
const HUB_QUEUE: usize = 65_536;
const PEER_QUEUE: usize = 65_536;
/// A full transfer sends at most this many pins per second (it never starves the data path).
const SYNC_RATE: usize = 200_000;
/// How long a write may block, a handshake may take, and a connection may stay silent.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A ping goes out after this long without a change.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Reconnect back-off.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Accepted connections at once, at most.
const MAX_INBOUND: u64 = 64;

const CONNECTING: u8 = 0;
const CONNECTED: u8 = 1;
const FAILED: u8 = 2;

/// What `/api/peers` and `/metrics` show of one peer.
#[derive(Debug)]
pub struct PeerStats {
    pub name: String,
    pub addr: SocketAddr,
    state: AtomicU8,
    /// Unix ms of the last change received from it (0: none yet).
    pub last_update_unix_ms: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub resyncs: AtomicU64,
    /// Unix ms of the newest change sent to it (its version's time).
    last_sent_unix_ms: AtomicU64,
    /// Frames or handshakes of this peer refused.
    pub rejected: AtomicU64,
    queue: (Sender<Change>, Receiver<Change>),
    resync: AtomicBool,
}

impl PeerStats {
    pub fn state(&self) -> &'static str {
        match self.state.load(Relaxed) {
            CONNECTED => "connected",
            FAILED => "failed",
            _ => "connecting",
        }
    }

    /// Changes waiting to be sent to it.
    pub fn lag_entries(&self) -> usize {
        self.queue.1.len()
    }

    /// How far behind it is, in ms: 0 with nothing waiting, else the age of the newest change
    /// already sent (the oldest waiting one is younger), or since the connection when none was.
    pub fn lag_ms(&self, now_unix_ms: u64) -> u64 {
        if self.queue.1.is_empty() {
            return 0;
        }
        now_unix_ms.saturating_sub(self.last_sent_unix_ms.load(Relaxed))
    }
}

/// The peers' shared state.
pub struct Peering {
    pub name: String,
    key: Key,
    registry: Arc<Mutex<Registry>>,
    pub peers: Vec<Arc<PeerStats>>,
    /// Refused connections from unknown names, or that failed the handshake before naming one.
    pub rejected_unknown: AtomicU64,
    /// Worker changes dropped because the hub was behind.
    pub dropped: AtomicU64,
    versions: Mutex<HashMap<(usize, AffinityKey), Version>>,
    hub: (Sender<Local>, Receiver<Local>),
    inbound: AtomicU64,
    epoch: Instant,
    /// `--peer-health quorum`.
    quorum: bool,
    /// What each peer's probes last said of each (service, backend), and when it said so.
    views: Mutex<HashMap<String, (Instant, View)>>,
}

/// One instance's probes' verdicts: (service, backend) -> up.
type View = HashMap<(String, String), bool>;

/// A peer's view of backend health counts while it is this fresh (it sends one a second).
const VIEW_FRESH: Duration = Duration::from_secs(5);

/// A service's table as a full transfer reads it: slot, name, pins, backend names by id.
type Table = (usize, String, Arc<conntrack::Sticky>, HashMap<BackendId, String>);

/// A change of this instance's table: service slot, key, the backend id it is now pinned to
/// (`None`: it expired), unix ms.
struct Local(usize, AffinityKey, Option<BackendId>, u64);

/// The watch on one service's sticky table.
struct ServiceWatch {
    slot: usize,
    peering: Arc<Peering>,
}

impl Watch for ServiceWatch {
    fn pinned(&self, key: AffinityKey, backend: BackendId) {
        self.send(Local(self.slot, key, Some(backend), unix_ms()));
    }

    fn expired(&self, key: AffinityKey) {
        self.send(Local(self.slot, key, None, unix_ms()));
    }
}

impl ServiceWatch {
    fn send(&self, change: Local) {
        if let Err(TrySendError::Full(_)) = self.peering.hub.0.try_send(change) {
            self.peering.dropped.fetch_add(1, Relaxed);
            for p in &self.peering.peers {
                p.resync.store(true, Relaxed);
            }
        }
    }
}

fn unix_ms() -> u64 {
    vocab::time::unix_ms(SystemTime::now())
}

/// The peers' key from `--peer-key-file` (read before privileges are dropped, like the admin
/// token: the file may be readable by root only).
pub fn read_key(path: &std::path::Path) -> Result<Key, String> {
    let bad = |e: &dyn std::fmt::Display| format!("--peer-key-file {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    Key::parse(&text).map_err(|e| bad(&e))
}

impl Peering {
    /// Start every thread, with the key and the listener had while privileged.
    pub fn start(
        name: String,
        config: &config::Peers,
        key: Key,
        registry: Arc<Mutex<Registry>>,
        listener: Option<TcpListener>,
    ) -> Result<Arc<Peering>, String> {
        let epoch = registry.lock().unwrap_or_else(|p| p.into_inner()).shared.epoch;
        let peers = config
            .peers
            .iter()
            .map(|p| {
                Arc::new(PeerStats {
                    name: p.name.clone(),
                    addr: p.addr,
                    state: AtomicU8::new(CONNECTING),
                    last_update_unix_ms: AtomicU64::new(0),
                    received: AtomicU64::new(0),
                    sent: AtomicU64::new(0),
                    resyncs: AtomicU64::new(0),
                    last_sent_unix_ms: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                    queue: crossbeam_channel::bounded(PEER_QUEUE),
                    resync: AtomicBool::new(false),
                })
            })
            .collect();
        let peering = Arc::new(Peering {
            name,
            key,
            registry,
            peers,
            rejected_unknown: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            versions: Mutex::new(HashMap::new()),
            hub: crossbeam_channel::bounded(HUB_QUEUE),
            inbound: AtomicU64::new(0),
            epoch,
            quorum: config.health == config::PeerHealth::Quorum,
            views: Mutex::new(HashMap::new()),
        });
        peering.watch_services();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map(|_| ())
        };
        let p = Arc::clone(&peering);
        spawn("tether-peer-hub".into(), Box::new(move || p.hub())).map_err(|e| e.to_string())?;
        for peer in &peering.peers {
            let (p, peer) = (Arc::clone(&peering), Arc::clone(peer));
            spawn(format!("tether-peer-{}", peer.name), Box::new(move || p.sender(&peer)))
                .map_err(|e| e.to_string())?;
        }
        if let Some(listener) = listener {
            let p = Arc::clone(&peering);
            spawn("tether-peer-accept".into(), Box::new(move || p.accept(listener)))
                .map_err(|e| e.to_string())?;
        }
        Ok(peering)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Put the watch on every service's table (a service a reload added gets it within a
    /// second: the hub calls this again).
    fn watch_services(self: &Arc<Self>) {
        let reg = self.registry();
        for (slot, s) in reg.services.iter().enumerate() {
            if let Some(s) = s {
                s.sticky.set_watch(Arc::new(ServiceWatch { slot, peering: Arc::clone(self) }));
            }
        }
    }

    // === the hub ===

    fn hub(self: Arc<Self>) {
        let (mut last_watch, mut last_touch) = (Instant::now(), Instant::now());
        loop {
            let first = match self.hub.1.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => Some(c),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(_) => return,
            };
            if last_watch.elapsed() >= Duration::from_secs(1) {
                self.watch_services();
                self.apply_quorum();
                last_watch = Instant::now();
            }
            if last_touch.elapsed() >= self.touch_every() {
                let touches = self.touches();
                self.fan_out(&touches);
                last_touch = Instant::now();
            }
            let Some(first) = first else { continue };
            let batch: Vec<Local> =
                std::iter::once(first).chain(self.hub.1.try_iter().take(4095)).collect();
            let changes = self.name_changes(&batch);
            self.fan_out(&changes);
        }
    }

    /// Queue `changes` for every peer (a full queue marks the peer for a resync).
    fn fan_out(&self, changes: &[Change]) {
        for peer in &self.peers {
            for c in changes {
                if peer.queue.0.try_send(c.clone()).is_err() {
                    peer.resync.store(true, Relaxed);
                    break;
                }
            }
        }
    }

    /// How often pins with open sessions here are sent again: a quarter of the shortest
    /// sticky timeout, at least a second, so a peer's copy never expires while they last.
    fn touch_every(&self) -> Duration {
        let reg = self.registry();
        let shortest = reg.services.iter().flatten().map(|s| s.config.sticky_timeout).min();
        (shortest.unwrap_or(Duration::from_secs(60)) / 4).max(Duration::from_secs(1))
    }

    /// The pins this instance made that have sessions open here, with their versions
    /// unchanged: a peer that has that version renews its copy's expiry (a touch).
    fn touches(&self) -> Vec<Change> {
        let tables = self.tables();
        let now = self.now_ms();
        let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (slot, service, sticky, ids) in &tables {
            for (key, id, left) in sticky.export(now) {
                let Some(version) = versions.get(&(*slot, key)) else { continue };
                if left.is_some() || version.origin != self.name {
                    continue;
                }
                let Some(backend) = ids.get(&id) else { continue };
                out.push(Change {
                    service: service.clone(),
                    key: key.to_bytes(),
                    what: What::Pin { backend: backend.clone(), left_ms: None },
                    version: version.clone(),
                });
            }
        }
        out
    }

    /// What this instance's own probes say of every backend (not the quorum's verdict: that
    /// would count a peer's vote twice).
    fn local_views(&self) -> Vec<HealthView> {
        let reg = self.registry();
        let mut out = Vec::new();
        for s in reg.services.iter().flatten() {
            for b in &s.backends {
                out.push(HealthView {
                    service: s.config.name.clone(),
                    backend: b.state.name.clone(),
                    up: b.checker.state() == health::Health::Up,
                });
            }
        }
        out.truncate(wire::MAX_CHANGES);
        out
    }

    /// With `--peer-health quorum`: the health a backend has here, given what this instance's
    /// probes say (`local`) and what the peers that reported on it lately say: down when more
    /// than half of those instances, this one included, see it down. Also how many see it down
    /// and how many voted.
    pub fn quorum_health(
        &self,
        service: &str,
        backend: &str,
        local: health::Health,
    ) -> (health::Health, usize, usize) {
        let (mut down, mut voters) = (usize::from(local == health::Health::Down), 1);
        if !self.quorum {
            return (local, down, voters);
        }
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let key = (service.to_string(), backend.to_string());
        for (at, view) in views.values() {
            if at.elapsed() > VIEW_FRESH {
                continue;
            }
            if let Some(&up) = view.get(&key) {
                voters += 1;
                down += usize::from(!up);
            }
        }
        let health = if down * 2 > voters { health::Health::Down } else { health::Health::Up };
        // This instance's own "down" stands whatever the peers say.
        let health = if local == health::Health::Down { local } else { health };
        (health, down, voters)
    }

    /// Set every backend's health from the quorum (once a second, and as views come and go).
    fn apply_quorum(&self) {
        if !self.quorum {
            return;
        }
        let mut reg = self.registry();
        let mut events = Vec::new();
        let mut killed = Vec::new();
        for s in reg.services.iter().flatten() {
            let kill = s.config.health.on_down == config::OnDown::Kill;
            for b in &s.backends {
                let local = b.checker.state();
                let (health, down, voters) =
                    self.quorum_health(&s.config.name, &b.state.name, local);
                if b.state.health() != health {
                    b.state.set_health(health);
                    events.push(format!(
                        "{}/{}: health {health} (down on {down} of {voters} instances)",
                        s.config.name, b.state.name
                    ));
                    if health == health::Health::Down && kill {
                        killed.push(b.state.id);
                    }
                }
            }
        }
        for e in events {
            reg.transitions += 1;
            reg.event(e);
        }
        for id in killed {
            reg.kill(id);
        }
    }

    /// Every service's table, name and backend names by id.
    fn tables(&self) -> Vec<Table> {
        let reg = self.registry();
        reg.services
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let s = s.as_ref()?;
                let ids = s.backends.iter().map(|b| (b.state.id, b.state.name.clone()));
                Some((slot, s.config.name.clone(), Arc::clone(&s.sticky), ids.collect()))
            })
            .collect()
    }

    /// The workers' changes as the wire names them, with their versions recorded.
    fn name_changes(&self, batch: &[Local]) -> Vec<Change> {
        let names: Vec<Option<(String, HashMap<BackendId, String>)>> = {
            let reg = self.registry();
            reg.services
                .iter()
                .map(|s| {
                    s.as_ref().map(|s| {
                        let ids = s.backends.iter().map(|b| (b.state.id, b.state.name.clone()));
                        (s.config.name.clone(), ids.collect())
                    })
                })
                .collect()
        };
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(batch.len());
        for &Local(slot, key, backend, at) in batch {
            let Some(Some((service, ids))) = names.get(slot) else { continue };
            let Some(backend) = backend else {
                // Expired here: forget its version; a pin this instance made expires on the
                // peers too (one learned from a peer expires there on its own).
                let Some(version) = versions.remove(&(slot, key)) else { continue };
                if version.origin == self.name {
                    out.push(Change {
                        service: service.clone(),
                        key: key.to_bytes(),
                        what: What::Expire,
                        version,
                    });
                }
                continue;
            };
            let Some(backend) = ids.get(&backend) else { continue };
            let version = Version { unix_ms: at, origin: self.name.clone() };
            versions.insert((slot, key), version.clone());
            out.push(Change {
                service: service.clone(),
                key: key.to_bytes(),
                what: What::Pin { backend: backend.clone(), left_ms: None },
                version,
            });
        }
        out
    }

    // === sending ===

    fn sender(self: Arc<Self>, peer: &PeerStats) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            peer.state.store(CONNECTING, Relaxed);
            match self.send_to(peer) {
                Ok(()) => backoff = BACKOFF_FIRST,
                Err(e) => {
                    log::warn!("peer {}: {e}", peer.name);
                    peer.state.store(FAILED, Relaxed);
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection to `peer`: handshake, full transfer, then changes until an error or a
    /// resync. `Ok` when it ended for a resync.
    fn send_to(&self, peer: &PeerStats) -> io::Result<()> {
        let stream = TcpStream::connect_timeout(&peer.addr, HANDSHAKE_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut conn = Conn { stream, buf: Vec::new() };
        let their = self.handshake(&mut conn, true, Some(&peer.name)).inspect_err(|_| {
            peer.rejected.fetch_add(1, Relaxed);
        })?;
        debug_assert_eq!(their, peer.name);
        peer.state.store(CONNECTED, Relaxed);
        peer.last_sent_unix_ms.store(unix_ms(), Relaxed);
        // Whatever waits in the queue is in the full transfer too.
        peer.resync.store(false, Relaxed);
        while peer.queue.1.try_recv().is_ok() {}
        let sent = self.full_transfer(&mut conn)?;
        log::info!("peer {}: connected, {sent} pins sent", peer.name);
        peer.sent.fetch_add(sent as u64, Relaxed);
        let mut out = Vec::new();
        // The receiver answers each ping with one: a peer that stops reading (or answering)
        // is dropped after IDLE_TIMEOUT, even while the socket buffers still take frames.
        conn.stream.set_read_timeout(Some(Duration::from_millis(1)))?;
        let (mut last_ping, mut heard) = (Instant::now(), Instant::now());
        loop {
            if last_ping.elapsed() >= PING_EVERY {
                out.clear();
                wire::encode(&Message::Health(self.local_views()), &mut out);
                wire::encode(&Message::Ping, &mut out);
                conn.stream.write_all(&out)?;
                last_ping = Instant::now();
                if conn.poll_pings()? > 0 {
                    heard = Instant::now();
                } else if heard.elapsed() > IDLE_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer for {IDLE_TIMEOUT:?}: dropped"),
                    ));
                }
            }
            if peer.resync.swap(false, Relaxed) {
                peer.resyncs.fetch_add(1, Relaxed);
                log::warn!(
                    "peer {}: its queue overflowed: sending the whole table again",
                    peer.name
                );
                return Ok(());
            }
            let wait = PING_EVERY.saturating_sub(last_ping.elapsed());
            let Ok(first) = peer.queue.1.recv_timeout(wait) else { continue };
            let batch: Vec<Change> = std::iter::once(first)
                .chain(peer.queue.1.try_iter().take(wire::CHANGES_PER_FRAME - 1))
                .collect();
            out.clear();
            let n = batch.len() as u64;
            let newest = batch.iter().map(|c| c.version.unix_ms).max().unwrap_or(0);
            wire::encode(&Message::Changes(batch), &mut out);
            conn.stream.write_all(&out)?;
            peer.sent.fetch_add(n, Relaxed);
            peer.last_sent_unix_ms.fetch_max(newest, Relaxed);
        }
    }

    /// Every pin of every service, at most [`SYNC_RATE`] a second. Returns how many.
    fn full_transfer(&self, conn: &mut Conn) -> io::Result<usize> {
        let mut out = Vec::new();
        wire::encode(&Message::SyncStart, &mut out);
        conn.stream.write_all(&out)?;
        let tables = self.tables();
        let started = Instant::now();
        let mut sent = 0;
        for (slot, service, sticky, ids) in tables {
            let pins = sticky.export(self.now_ms());
            for chunk in pins.chunks(wire::CHANGES_PER_FRAME) {
                let changes: Vec<Change> = {
                    let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
                    chunk
                        .iter()
                        .filter_map(|&(key, id, left)| {
                            let backend = ids.get(&id)?.clone();
                            let version = versions
                                .get(&(slot, key))
                                .cloned()
                                .unwrap_or(Version { unix_ms: 0, origin: String::new() });
                            Some(Change {
                                service: service.clone(),
                                key: key.to_bytes(),
                                what: What::Pin { backend, left_ms: left },
                                version,
                            })
                        })
                        .collect()
                };
                sent += changes.len();
                out.clear();
                wire::encode(&Message::Changes(changes), &mut out);
                conn.stream.write_all(&out)?;
                // Rate limit: never ahead of SYNC_RATE pins a second.
                let due = Duration::from_secs_f64(sent as f64 / SYNC_RATE as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        out.clear();
        wire::encode(&Message::SyncEnd { entries: sent as u64 }, &mut out);
        conn.stream.write_all(&out)?;
        Ok(sent)
    }

    // === the handshake ===

    /// Hellos, then proofs, both ways. Returns the other side's name; `expect`: the name the
    /// dialer expects. The acceptor takes a name it knows (any, when no `--peer` is given).
    fn handshake(&self, conn: &mut Conn, dialer: bool, expect: Option<&str>) -> io::Result<String> {
        let mut nonce = [0u8; NONCE];
        fill_random(&mut nonce);
        let mut out = Vec::new();
        let hello = Message::Hello { protocol: wire::PROTOCOL, name: self.name.clone(), nonce };
        wire::encode(&hello, &mut out);
        conn.stream.write_all(&out)?;
        let (name, theirs) = match conn.read()? {
            Message::Hello { protocol: wire::PROTOCOL, name, nonce } => (name, nonce),
            Message::Hello { protocol, .. } => {
                return Err(refused(format!("protocol {protocol} (this side speaks 1)")))
            }
            other => return Err(refused(format!("expected a hello, got {}", kind(&other)))),
        };
        if let Some(expect) = expect {
            if name != expect {
                return Err(refused(format!("it calls itself {name:?}")));
            }
        } else if name == self.name {
            return Err(refused(format!("{name:?} is this instance's own name")));
        } else if !self.peers.is_empty() && !self.peers.iter().any(|p| p.name == name) {
            return Err(refused(format!("{name:?} is not a configured peer")));
        }
        let proof = self.key.proof(dialer, &nonce, &theirs, &self.name, &name);
        out.clear();
        wire::encode(&Message::Proof(proof), &mut out);
        conn.stream.write_all(&out)?;
        match conn.read()? {
            Message::Proof(p)
                if self.key.verify(&p, !dialer, &theirs, &nonce, &name, &self.name) =>
            {
                Ok(name)
            }
            Message::Proof(_) => Err(refused(format!("{name:?} does not hold the key"))),
            other => Err(refused(format!("expected a proof, got {}", kind(&other)))),
        }
    }

    // === receiving ===

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("peer listener: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if self.inbound.load(Relaxed) >= MAX_INBOUND {
                self.rejected_unknown.fetch_add(1, Relaxed);
                continue;
            }
            self.inbound.fetch_add(1, Relaxed);
            let p = Arc::clone(&self);
            let spawned =
                std::thread::Builder::new().name("tether-peer-in".into()).spawn(move || {
                    let from = stream.peer_addr().ok();
                    if let Err(e) = p.receive(stream) {
                        log::warn!("peer connection from {from:?}: {e}");
                    }
                    p.inbound.fetch_sub(1, Relaxed);
                });
            if spawned.is_err() {
                self.inbound.fetch_sub(1, Relaxed);
            }
        }
    }

    fn receive(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut conn = Conn { stream, buf: Vec::new() };
        let name = match self.handshake(&mut conn, false, None) {
            Ok(name) => name,
            Err(e) => {
                self.rejected_unknown.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        let stats = self.peers.iter().find(|p| p.name == name).cloned();
        conn.stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
        log::info!("peer {name}: accepted");
        loop {
            let msg = match conn.read() {
                Ok(m) => m,
                Err(e) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        if let Some(s) = &stats {
                            s.rejected.fetch_add(1, Relaxed);
                        }
                    }
                    return Err(io::Error::new(e.kind(), format!("peer {name}: {e}")));
                }
            };
            match msg {
                Message::Changes(changes) => {
                    let n = self.apply(&changes);
                    if let Some(s) = &stats {
                        s.received.fetch_add(n as u64, Relaxed);
                        s.last_update_unix_ms.store(unix_ms(), Relaxed);
                    }
                }
                Message::Ping => {
                    let mut out = Vec::new();
                    wire::encode(&Message::Ping, &mut out);
                    conn.stream.write_all(&out)?;
                }
                Message::SyncStart => {}
                Message::Health(views) => {
                    let views = views.into_iter().map(|v| ((v.service, v.backend), v.up)).collect();
                    let mut all = self.views.lock().unwrap_or_else(|p| p.into_inner());
                    all.insert(name.clone(), (Instant::now(), views));
                }
                Message::SyncEnd { entries } => log::info!("peer {name}: {entries} pins received"),
                other => {
                    if let Some(s) = &stats {
                        s.rejected.fetch_add(1, Relaxed);
                    }
                    return Err(refused(format!("peer {name}: unexpected {}", kind(&other))));
                }
            }
        }
    }

    /// Apply the changes newer than what this instance has; returns how many were applied.
    fn apply(&self, changes: &[Change]) -> usize {
        let now = self.now_ms();
        let reg = self.registry();
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut applied = 0;
        for c in changes {
            let Some((slot, s)) = reg.services.iter().enumerate().find_map(|(i, s)| {
                s.as_ref().filter(|s| s.config.name == c.service).map(|s| (i, s))
            }) else {
                continue;
            };
            let key = AffinityKey::from_bytes(c.key);
            // Older than what this instance has: ignored. The same version again (a touch, or a
            // full transfer): its expiry is renewed.
            if versions.get(&(slot, key)).is_some_and(|v| *v > c.version) {
                continue;
            }
            let (backend, left_ms) = match &c.what {
                What::Pin { backend, left_ms } => (backend, left_ms),
                // Expired where it was made: gone here too, unless it changed since or has
                // sessions open here.
                What::Expire => {
                    if versions.get(&(slot, key)) == Some(&c.version) && s.sticky.remove_idle(key) {
                        versions.remove(&(slot, key));
                        applied += 1;
                    }
                    continue;
                }
                What::Touch { .. } => continue,
            };
            let Some(b) = s.backends.iter().find(|b| &b.state.name == backend) else { continue };
            if s.sticky.pin_remote(key, b.state.id, *left_ms, now) {
                versions.insert((slot, key), c.version.clone());
                applied += 1;
            }
        }
        applied
    }
}

/// A connection and what was read of it.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// The pings that have arrived (on a socket with a short read timeout): anything else
    /// from the receiver is an error.
    fn poll_pings(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        let mut pings = 0;
        while let Some((msg, used)) = wire::decode(&self.buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            self.buf.drain(..used);
            match msg {
                Message::Ping => pings += 1,
                other => return Err(refused(format!("the receiver sent {}", kind(&other)))),
            }
        }
        Ok(pings)
    }

    /// The next whole message (a malformed one is `InvalidData`).
    fn read(&mut self) -> io::Result<Message> {
        loop {
            match wire::decode(&self.buf) {
                Ok(Some((msg, used))) => {
                    self.buf.drain(..used);
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "a hello",
        Message::Proof(_) => "a proof",
        Message::Changes(_) => "changes",
        Message::SyncStart => "a sync start",
        Message::SyncEnd { .. } => "a sync end",
        Message::Ping => "a ping",
        Message::Resync => "a resync request",
        Message::Health(_) => "health",
    }
}

fn fill_random(out: &mut [u8]) {
    for chunk in out.chunks_mut(16) {
        let key = crate::random_key();
        chunk.copy_from_slice(&key[..chunk.len()]);
    }
}
