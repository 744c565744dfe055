//! UDP flows: each worker's own `SO_REUSEPORT` socket per listen address, and one connected
//! socket per flow toward its backend.
//!
//! A flow is (client address, address the client sent to). Its backend socket is *connected*,
//! so the kernel hands it only datagrams from that backend (anything else is dropped before
//! tether sees it) and reports the backend's ICMP errors on it alone: a dead backend or a closed
//! client port never disturbs another flow (FAILURE-MODES F12; the listener sockets are
//! unconnected and without IP_RECVERR, so ICMP about clients is not reported at all). Replies go
//! back from the address the client sent to: a listener bound to a wildcard address learns it
//! per datagram (IP_PKTINFO / IPV6_RECVPKTINFO) and sets it as the source of the reply. tether
//! never originates a datagram of its own toward a client (no amplification, F8): it only
//! forwards what a flow's backend sent, to that flow's client.
//!
//! The flow table (`conntrack::FlowTable`) caps flows process-wide; when full, new flows are
//! dropped and counted rather than evicting live ones (F5).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use conntrack::{Attach, FlowBudget, FlowKey, FlowTable};

use crate::admission::{admit_as, Transport};
use crate::held::{FlowLive, Pinned};

use crate::outgoing::{no_local_port, Sources};
use crate::sessionlog::{End, Record};
use crate::stats::{inc, ports_exhausted, Stats};
use crate::sys::{RecvBatch, BATCH};
use crate::token::Slot;
use crate::udp_socket::UdpBuffers;
use crate::{Shared, Snapshot};

mod handover;
mod kernel;
mod session;
mod steer;

pub use handover::{socket_id, HandedFlow};
pub use kernel::FlowView;
use kernel::{flush, fold, Kernel, Offloaded, SWEEP_MS};
use session::{steer_group, Session};

/// A flow table's idle timeout until its service's settings set it (on publish, before any
/// flow of the service exists).
const INITIAL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// recvmmsg(2) calls on one socket before other work gets a turn (8 x 16 datagrams).
const RECV_ROUNDS: usize = 8;

/// What the worker needs from its surroundings for one call.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    /// The session log, when `--log-sessions` is on.
    pub session_log: Option<&'a Arc<crate::sessionlog::SessionLog>>,
    /// Routing snapshots by service slot.
    pub services: &'a [Option<Arc<Snapshot>>],
    pub stats: &'a Stats,
    pub now_ms: u64,
}

/// One listen address of this worker.
struct Listener {
    socket: UdpSocket,
    /// Its [`socket_id`].
    id: u64,
    local: SocketAddr,
    /// Bound to 0.0.0.0 or [::]: the destination address comes with each datagram.
    wildcard: bool,
    /// Slot of the service it feeds.
    service: usize,
    /// The kernel's drop count for this socket when last reported (SO_RXQ_OVFL).
    drops: u32,
    /// Kernel buffers it was given.
    buffers: UdpBuffers,
}

/// One flow's state beyond what the flow table keeps.
struct Flow {
    socket: UdpSocket,
    key: FlowKey,
    listener: usize,
    client: SocketAddr,
    /// The address the client sent to (the flow key's other half, unless keyed), and its IP
    /// when the listener is a wildcard one: the source of every reply.
    local: SocketAddr,
    local_ip: Option<IpAddr>,
    /// The real client (from a trusted proxy's header, else `client`) and the address it sent
    /// to: what ACLs, limits and affinity used, and what a PROXY header to the backend says.
    source: SocketAddr,
    destination: SocketAddr,
    /// A PROXY header reached the backend's socket (with `send-proxy`: until then every
    /// datagram carries one, so a lost first send does not leave the flow without).
    header_sent: bool,
    /// The service's snapshot when the flow began, and its backend's index in it.
    service: Arc<Snapshot>,
    backend: usize,
    /// The backend's flow gauge counts it, and the client's sticky entry (`None`: 5-tuple
    /// affinity, or the table was full): held for what they give back when the flow is dropped.
    #[allow(dead_code)]
    live: FlowLive,
    #[allow(dead_code)]
    pin: Option<Pinned>,
    /// The kernel's drop count for this socket when last reported (SO_RXQ_OVFL).
    drops: u32,
    /// Its entries in the offload program's map, while the program carries it.
    offloaded: Option<Offloaded>,
    /// Offloading it was tried since it (re)entered user space: not again until then.
    offload_tried: bool,
    /// Datagrams and payload bytes each way ([`Counts`]), and what of them the backend's
    /// counters already have.
    counts: Counts,
    flushed: Counts,
    /// When it began (the proxy clock, ms), and whether its client came with a sticky pin:
    /// for the session log.
    started_ms: u64,
    pinned: bool,
    /// Its session, when keyed by a session key (`--udp-session-key`).
    session: Option<Session>,
}

impl Flow {
    /// A flow of `a`'s client on `socket`, to backend `backend` of `service`, holding its
    /// backend's flow gauge and `pin`.
    fn new(
        socket: UdpSocket,
        key: FlowKey,
        a: Arrival,
        header_sent: bool,
        service: Arc<Snapshot>,
        backend: usize,
        pin: Option<Pinned>,
    ) -> Flow {
        let live = FlowLive::new(&service.backends[backend]);
        Flow {
            socket,
            key,
            listener: a.listener,
            client: a.client,
            local: a.local,
            local_ip: a.local_ip,
            source: a.source,
            destination: a.destination,
            header_sent,
            service,
            backend,
            live,
            pin,
            drops: 0,
            offloaded: None,
            offload_tried: false,
            counts: Counts::default(),
            flushed: Counts::default(),
            started_ms: a.at_ms,
            pinned: false,
            session: None,
        }
    }

    /// Its session log record, as it ends for `end` at `now_ms`.
    fn record(&self, end: End, now_ms: u64) -> Record {
        Record {
            at: std::time::SystemTime::now(),
            udp: true,
            service: Some(Arc::clone(&self.service)),
            client: self.source,
            backend: Some(self.backend),
            bytes_in: self.counts.bytes[0],
            bytes_out: self.counts.bytes[1],
            duration: std::time::Duration::from_millis(now_ms.saturating_sub(self.started_ms)),
            end,
            pinned: self.pinned,
        }
    }
}

/// A flow's datagrams and payload bytes, client -> backend and back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    datagrams: [u64; 2],
    bytes: [u64; 2],
}

/// Where one datagram came from and was sent to.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// Index of the listener socket it came in on.
    listener: usize,
    /// The peer that sent it (a client, or a trusted proxy).
    client: SocketAddr,
    /// The address it was sent to (the flow key's listener side).
    local: SocketAddr,
    /// `local`'s IP when the listener is a wildcard one (the source of replies).
    local_ip: Option<IpAddr>,
    /// The real client and destination (from a trusted proxy's header, else `client`, `local`).
    source: SocketAddr,
    destination: SocketAddr,
    /// When it came (the proxy clock, ms): a flow it opens began then.
    at_ms: u64,
}

/// All UDP state of one worker.
pub struct Udp {
    listeners: Vec<Option<Listener>>,
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    /// Flow tables by service slot (each service has its own idle timeout).
    tables: Vec<FlowTable<usize>>,
    budget: Arc<FlowBudget>,
    hash_key: [u8; 16],
    /// Receive buffers (taken out while a batch is handled, so the handlers may borrow self).
    batch: Option<Box<RecvBatch>>,
    /// Where a datagram with a PROXY header in front is assembled (reused, never shrunk).
    scratch: Vec<u8>,
    expired: Vec<usize>,
    /// Local addresses new flows' sockets are bound to, in turn.
    sources: Sources,
    /// The process's clock, for what a flow gives back when dropped.
    clock: Arc<Shared>,
    /// An upgrade took the sockets over: nothing is read until `resume`.
    paused: bool,
    /// The offload program's map, when `--udp-offload` is on.
    kernel: Option<Kernel>,
    /// When the flows' counts next go into their backends' counters ([`SWEEP_MS`]).
    next_sweep_ms: u64,
    /// By service slot: the session key its listeners' groups are steered by ([`steer`]).
    steered: Vec<Option<vocab::SessionKey>>,
    /// Sockets in each listen address's `SO_REUSEPORT` group: one per worker.
    workers: u32,
}

/// What a receive loop left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// Drained to `WouldBlock`: wait for the next event.
    Drained,
    /// Budget spent with datagrams left: call again after other work.
    Again,
}

impl Udp {
    /// No listeners yet: see [`listen`](Self::listen).
    pub fn new(shared: &Arc<Shared>) -> Udp {
        let (budget, hash_key) = (Arc::clone(&shared.flow_budget), shared.flow_hash_key);
        Udp {
            listeners: Vec::new(),
            flows: Vec::new(),
            free: Vec::new(),
            tables: Vec::new(),
            budget,
            hash_key,
            batch: Some(Box::new(RecvBatch::new())),
            scratch: Vec::new(),
            expired: Vec::new(),
            sources: Sources::default(),
            clock: Arc::clone(shared),
            paused: false,
            kernel: Kernel::new(shared),
            next_sweep_ms: SWEEP_MS,
            steered: Vec::new(),
            workers: shared.workers.max(1) as u32,
        }
    }

    /// Take datagrams on `socket` for service slot `service`.
    pub fn listen(
        &mut self,
        socket: std::net::UdpSocket,
        service: usize,
        registry: &Registry,
    ) -> io::Result<()> {
        let local = socket.local_addr()?;
        let id = socket_id(std::os::fd::AsFd::as_fd(&socket))?;
        let mut socket = UdpSocket::from_std(socket);
        let i = self.listeners.len();
        registry.register(&mut socket, Slot::UdpListener(i).token(), Interest::READABLE)?;
        let wildcard = local.ip().is_unspecified();
        // As bound (listener::bind applied them); a reload may change them (`set_buffers`).
        let buffers = UdpBuffers::default();
        if let Some(key) = self.steered.get(service).copied().flatten() {
            steer_group(&socket, local, Some(key), self.workers);
        }
        self.listeners.push(Some(Listener {
            socket,
            id,
            local,
            wildcard,
            service,
            drops: 0,
            buffers,
        }));
        Ok(())
    }

    /// Close the listeners bound to any of `addrs`, and end their flows (no way to reply).
    pub fn unlisten(&mut self, addrs: &[(SocketAddr, bool)], ctx: &Ctx<'_>) {
        for i in 0..self.listeners.len() {
            let Some(l) = self.listeners[i].as_ref() else { continue };
            if !addrs.contains(&(l.local, true)) {
                continue;
            }
            if let Some(mut l) = self.listeners[i].take() {
                let _ = ctx.registry.deregister(&mut l.socket);
            }
            for slot in 0..self.flows.len() {
                if let Some(flow) = self.flows[slot].as_ref().filter(|f| f.listener == i) {
                    let key = flow.key;
                    self.tables[flow.service.slot].remove(&key);
                    self.close(slot, End::ListenerClosed, ctx);
                }
            }
        }
    }

    /// End the flows of backend `id`; the next datagram of each client opens a new flow on a
    /// backend that is up. Returns how many ended.
    pub fn kill(&mut self, id: conntrack::BackendId, ctx: &Ctx<'_>) -> usize {
        let mut n = 0;
        for slot in 0..self.flows.len() {
            let Some(flow) = self.flows[slot].as_ref() else { continue };
            if flow.service.backends[flow.backend].id == id {
                let (key, table) = (flow.key, flow.service.slot);
                self.tables[table].remove(&key);
                self.close(slot, End::BackendDown, ctx);
                inc(&ctx.stats.killed);
                n += 1;
            }
        }
        n
    }

    /// The flow table of service slot `service`, made on first use.
    fn table(&mut self, service: usize) -> &mut FlowTable<usize> {
        while self.tables.len() <= service {
            let table = FlowTable::new(
                Arc::clone(&self.budget),
                INITIAL_IDLE_TIMEOUT.as_millis() as u64,
                self.hash_key,
            );
            self.tables.push(table);
        }
        &mut self.tables[service]
    }

    /// Flows of service slot `service` live `timeout` without a datagram.
    pub fn set_idle_timeout(&mut self, service: usize, timeout: Duration) {
        self.table(service).set_idle_timeout_ms(timeout.as_millis() as u64);
    }

    /// Give the listeners of service slot `service` these kernel buffers (a reload changed
    /// them; new flows read them from the service's settings).
    pub fn set_buffers(&mut self, service: usize, buffers: UdpBuffers) {
        for l in self.listeners.iter_mut().flatten() {
            if l.service != service || l.buffers == buffers {
                continue;
            }
            match buffers.apply(&l.socket) {
                Ok(clamped) => clamped.iter().for_each(|c| log::debug!("udp {}: {c}", l.local)),
                Err(e) => log::warn!("udp {}: setting buffers: {e}", l.local),
            }
            l.buffers = buffers;
        }
    }

    /// Earliest time (proxy milliseconds) a flow may expire, or the flows' counts are due to
    /// be brought into their backends' (and the offloaded ones' entries read).
    pub fn next_expiry(&self) -> Option<u64> {
        let expiry = self.tables.iter().filter_map(FlowTable::next_expiry).min();
        let sweep = (self.budget.used() > 0).then_some(self.next_sweep_ms);
        expiry.into_iter().chain(sweep).min()
    }

    /// Stop taking datagrams (shutdown): flows end with the worker.
    pub fn close_listeners(&mut self, registry: &Registry) {
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = registry.deregister(&mut l.socket);
            }
        }
    }

    // === client -> backend ===

    /// Datagrams from clients on listener `i`.
    pub fn listener_readable(&mut self, i: usize, ctx: &Ctx<'_>) -> Recv {
        if self.paused {
            return Recv::Drained;
        }
        self.with_batch(|udp, batch| udp.take_from_clients(i, batch, ctx))
    }

    /// Lend the receive buffers out of `self`, so the handler may borrow `self` mutably too.
    fn with_batch(&mut self, f: impl FnOnce(&mut Self, &mut RecvBatch) -> Recv) -> Recv {
        let Some(mut batch) = self.batch.take() else { return Recv::Drained };
        let more = f(self, &mut batch);
        self.batch = Some(batch);
        more
    }

    fn take_from_clients(&mut self, i: usize, batch: &mut RecvBatch, ctx: &Ctx<'_>) -> Recv {
        for _ in 0..RECV_ROUNDS {
            let Some(l) = self.listeners.get(i).and_then(Option::as_ref) else {
                return Recv::Drained;
            };
            let (wildcard, local, service) = (l.wildcard, l.local, l.service);
            let Some(service) = ctx.services.get(service).and_then(Option::as_ref) else {
                return Recv::Drained;
            };
            let n = match batch.recv(&l.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("udp recv on {local}: {e}");
                    }
                    return Recv::Drained;
                }
            };
            if let (Some(now), Some(Some(l))) = (batch.drops(n), self.listeners.get_mut(i)) {
                kernel_drops(&mut l.drops, now, ctx.stats);
            }
            for k in 0..n {
                let (data, from, dst) = batch.get(k);
                let Some(client) = from else { continue };
                inc(&ctx.stats.datagrams_in);
                let local_ip = if wildcard { dst } else { None };
                let to = SocketAddr::new(local_ip.unwrap_or(local.ip()), local.port());
                let arrival = Arrival {
                    listener: i,
                    client,
                    local: to,
                    local_ip,
                    source: client,
                    destination: to,
                    at_ms: ctx.now_ms,
                };
                self.client_datagram(service, arrival, data, ctx);
            }
            if n < BATCH {
                return Recv::Drained; // a short batch drained the socket
            }
        }
        Recv::Again
    }

    /// A datagram from a client, or from a trusted proxy: then a PROXY v2 header in front
    /// names the real client. It is required on the datagram that makes a flow; on a flow's
    /// later datagrams it is stripped when present (proxies send it on the first datagram only,
    /// or on every one). A datagram from a trusted proxy that needs a header and has no valid
    /// one is dropped and counted, and no flow is made.
    fn client_datagram(
        &mut self,
        service: &Arc<Snapshot>,
        mut a: Arrival,
        data: &[u8],
        ctx: &Ctx<'_>,
    ) {
        let rules = &service.guards.proxy;
        if !(rules.accept && rules.trusted.allows(a.client.ip())) {
            return self.forward(service, a, data, ctx);
        }
        let slot =
            self.table(service.slot).peek(&FlowKey::new(a.client, a.local)).map(|f| *f.value());
        let known = slot.and_then(|n| self.flows.get(n)?.as_ref()).map(|flow| flow.source);
        let refuse = |why: &dyn std::fmt::Display| {
            log::debug!("udp from trusted proxy {}: {why}", a.client);
            inc(&ctx.stats.proxy_header_errors);
            inc(&ctx.stats.datagrams_dropped);
        };
        match proxyproto::parse_datagram(data) {
            Ok((header, payload)) => {
                if let proxyproto::Header::Proxy { source, destination, .. } = header {
                    // A flow is one client: a header naming another one on it would carry that
                    // client past the rules the flow was admitted by.
                    if known.is_some_and(|s| s != source) {
                        return refuse(&format!(
                            "header names {source} on a flow of another client"
                        ));
                    }
                    a.source = source;
                    a.destination = destination;
                } else if let Some(source) = known {
                    a.source = source;
                }
                self.forward(service, a, payload, ctx);
            }
            Err(proxyproto::ParseError::NotProxy) if known.is_some() => {
                a.source = known.unwrap_or(a.source);
                self.forward(service, a, data, ctx)
            }
            Err(e) => refuse(&e),
        }
    }

    /// Send `data` from `a.client` on its flow, making the flow if needed. With a session key,
    /// the flow is the key's, wherever the datagram came from ([`Udp::arrived_from_client`]).
    fn forward(&mut self, service: &Arc<Snapshot>, a: Arrival, data: &[u8], ctx: &Ctx<'_>) {
        let token = service.settings.session_key.and_then(|k| {
            let token = k.token(data);
            if token.is_none() {
                inc(&ctx.stats.session_key_short);
            }
            token
        });
        let key = match token {
            Some(t) => self.session_flow_key(t),
            None => FlowKey::new(a.client, a.local),
        };
        // At most two rounds: a flow whose backend turned out dead is replaced once.
        for round in 0..2 {
            let found = match token {
                // Looked at, not yet touched: a datagram from elsewhere may not keep it alive.
                Some(_) => self.table(service.slot).peek(&key).map(|f| *f.value()),
                None => self.table(service.slot).get(&key, ctx.now_ms).map(|f| *f.value()),
            };
            let slot = match found {
                Some(slot) if token.is_some() => {
                    if !self.arrived_from_client(slot, &a, service, ctx) {
                        return;
                    }
                    self.tables[service.slot].get(&key, ctx.now_ms);
                    slot
                }
                Some(slot) => slot,
                None => match self.open(key, token, service, a, ctx) {
                    Some(slot) => slot,
                    None => {
                        inc(&ctx.stats.datagrams_dropped);
                        return;
                    }
                },
            };
            let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else { return };
            // The rules changed since the flow began (a reload): its client must still pass.
            if !Arc::ptr_eq(&flow.service, service) && !service.guards.acl.allows(flow.source.ip())
            {
                let table = flow.service.slot;
                self.tables[table].remove(&key);
                self.close(slot, End::Denied, ctx);
                inc(&ctx.stats.dropped_denied);
                inc(&ctx.stats.datagrams_dropped);
                return;
            }
            let rules = &flow.service.guards.proxy;
            let with_header =
                rules.send.is_some() && (!flow.header_sent || rules.send_every_datagram);
            if !with_header && !flow.offload_tried {
                // Entries before the datagram, so its reply already comes back by the program.
                self.offload(slot, ctx.stats);
            }
            let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else { return };
            let sent = if with_header {
                // PROXY v2 (UDP has no v1) in front of the payload, so the backend learns who
                // the client is.
                let mut header = [0u8; 52];
                let n = proxyproto::encode_v2(
                    proxyproto::Transport::Datagram,
                    crate::routing::canonical(flow.source),
                    crate::routing::canonical(flow.destination),
                    &mut header,
                );
                self.scratch.clear();
                self.scratch.extend_from_slice(&header[..n]);
                self.scratch.extend_from_slice(data);
                flow.socket.send(&self.scratch)
            } else {
                flow.socket.send(data)
            };
            match sent {
                Ok(_) => {
                    if let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) {
                        flow.counts.datagrams[0] += 1;
                        flow.counts.bytes[0] += data.len() as u64;
                        if with_header {
                            inc(&ctx.stats.proxy_headers_sent);
                            flow.header_sent = true;
                        }
                    }
                    if with_header {
                        // No header is due any more: the flow may go to the program now.
                        self.offload(slot, ctx.stats);
                    }
                    return;
                }
                // An ICMP error from an earlier datagram (connect(2) on UDP: the kernel reports
                // it on the next call): the backend is not there. Re-pin and resend.
                Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
                    flow.service.backends[flow.backend].mark_failing(ctx.now_ms);
                    let table = flow.service.slot;
                    self.tables[table].remove(&key);
                    self.close(slot, End::BackendReset, ctx);
                    if round == 1 {
                        inc(&ctx.stats.datagrams_dropped);
                        inc(&ctx.stats.dropped_to_backend);
                    }
                }
                Err(e) => {
                    log::debug!("udp send to backend: {e}");
                    inc(&ctx.stats.datagrams_dropped);
                    inc(&ctx.stats.dropped_to_backend);
                    return;
                }
            }
        }
    }

    /// Make a flow for `client` (keyed by session key bytes `token`, when given): pick its
    /// backend (the sticky entry shared with TCP first, or the session key's), open a socket
    /// connected to it, admit it to the table. `None` when the table is full or no socket
    /// could be had (the datagram is dropped and counted).
    fn open(
        &mut self,
        key: FlowKey,
        token: Option<&[u8]>,
        service: &Arc<Snapshot>,
        a: Arrival,
        ctx: &Ctx<'_>,
    ) -> Option<usize> {
        let (client, source) = (a.client, a.source);
        // Full and nothing of ours has expired: refuse before paying for a socket.
        let expiry_due = self.next_expiry().is_some_and(|t| t <= ctx.now_ms);
        if self.budget.available() == 0 && !expiry_due {
            inc(&ctx.stats.flows_refused);
            inc(&ctx.stats.dropped_max_flows);
            return None;
        }
        if self.budget.available() == 0 {
            self.expire(ctx);
        }
        // Access rules, the per-source flow rate, affinity and the backend, before any socket
        // is made: the same path as a TCP session's, so a client's flows and sessions agree.
        let session = token.map(|t| conntrack::AffinityKey::from_session(t, service.seed));
        let (affinity, backend, pinned) =
            match admit_as(service, Transport::Udp, source, a.destination, session, ctx.now_ms) {
                Ok(admitted) => (admitted.key, admitted.first, admitted.pinned),
                Err(refusal) => {
                    inc(refusal.counter(Transport::Udp, ctx.stats));
                    return None;
                }
            };
        let target = &service.backends[backend];
        let (socket, slot) = self.flow_socket(service, backend, ctx)?;
        match self.table(service.slot).insert(key, target.id, slot, ctx.now_ms) {
            Ok(inserted) => {
                if let Some((_, old)) = inserted.reclaimed {
                    let old_slot = *old.value();
                    self.close(old_slot, End::Reclaimed, ctx);
                }
            }
            Err(refused) => {
                log::debug!("udp flow from {client} refused: {:?}", refused.reason);
                inc(&ctx.stats.flows_refused);
                inc(&ctx.stats.dropped_max_flows);
                self.free.push(slot);
                return None;
            }
        }
        let pin = affinity.and_then(|k| self.pin(service, k, target.id, ctx));
        inc(&ctx.stats.flows_created);
        let mut flow = Flow::new(socket, key, a, false, Arc::clone(service), backend, pin);
        flow.pinned = pinned;
        flow.set_session(token);
        self.flows[slot] = Some(flow);
        Some(slot)
    }

    /// Pin `key` to backend `id` for a new flow: the pin it holds, `None` (counted) when the
    /// sticky table is full.
    fn pin(
        &self,
        service: &Snapshot,
        key: conntrack::AffinityKey,
        id: conntrack::BackendId,
        ctx: &Ctx<'_>,
    ) -> Option<Pinned> {
        match service.sticky.attach(key, id, ctx.now_ms) {
            Attach::Full => {
                inc(&ctx.stats.sticky_full);
                None
            }
            Attach::Pinned | Attach::Repinned { .. } => {
                Some(Pinned::new(Arc::clone(&service.sticky), key, Arc::clone(&self.clock)))
            }
        }
    }

    /// A socket connected to backend `backend` of `service`, in the poll under a free flow
    /// slot; `None` (counted) when this host has no socket, port or epoll room for it.
    fn flow_socket(
        &mut self,
        service: &Snapshot,
        backend: usize,
        ctx: &Ctx<'_>,
    ) -> Option<(UdpSocket, usize)> {
        let target = &service.backends[backend];
        let from = &service.settings.connect_from;
        let mut socket = match self.sources.udp(target.addr, from, service.slot) {
            Ok(s) => {
                // Best effort: the flow works without; listener::bind logged any clamp.
                if let Err(e) = service.settings.udp_buffers.apply(&s) {
                    log::debug!("udp socket toward {}: options: {e}", target.addr);
                }
                s
            }
            Err(e) => {
                if no_local_port(&e) {
                    ports_exhausted(ctx.stats, target.addr, &e);
                } else {
                    log::warn!("udp socket toward {}: {e}", target.addr);
                }
                inc(&ctx.stats.local_errors);
                inc(&ctx.stats.dropped_local);
                return None;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.flows.push(None);
            self.flows.len() - 1
        });
        if let Err(e) =
            ctx.registry.register(&mut socket, Slot::Flow(slot).token(), Interest::READABLE)
        {
            log::warn!("register udp flow: {e}");
            inc(&ctx.stats.dropped_local);
            self.free.push(slot);
            return None;
        }
        Some((socket, slot))
    }

    // === backend -> client ===

    /// Datagrams from the backend of the flow in `slot`.
    pub fn flow_readable(&mut self, slot: usize, ctx: &Ctx<'_>) -> Recv {
        if self.paused {
            return Recv::Drained;
        }
        self.with_batch(|udp, batch| udp.take_from_backend(slot, batch, ctx))
    }

    fn take_from_backend(&mut self, slot: usize, batch: &mut RecvBatch, ctx: &Ctx<'_>) -> Recv {
        for _ in 0..RECV_ROUNDS {
            let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else {
                return Recv::Drained;
            };
            let n = match batch.recv(&flow.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Recv::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNREFUSED: the backend's port is closed. The flow ends; the client's
                    // next datagram makes a new one on the next backend of its order.
                    if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) {
                        flow.service.backends[flow.backend].mark_failing(ctx.now_ms);
                    }
                    log::debug!("udp flow {}: {e}", flow.key);
                    let (key, table) = (flow.key, flow.service.slot);
                    self.tables[table].remove(&key);
                    self.close(slot, End::BackendReset, ctx);
                    return Recv::Drained;
                }
            };
            let (client, local_ip, listener, key, table) =
                (flow.client, flow.local_ip, flow.listener, flow.key, flow.service.slot);
            if let (Some(now), Some(Some(flow))) = (batch.drops(n), self.flows.get_mut(slot)) {
                kernel_drops(&mut flow.drops, now, ctx.stats);
            }
            self.tables[table].get(&key, ctx.now_ms); // activity either way keeps the flow
            let Some(l) = self.listeners.get(listener).and_then(Option::as_ref) else {
                return Recv::Drained;
            };
            let Some(Some(flow)) = self.flows.get_mut(slot) else { return Recv::Drained };
            for k in 0..n {
                let data = batch.get(k).0;
                match send_from(&l.socket, data, client, local_ip) {
                    Ok(_) => {
                        inc(&ctx.stats.datagrams_out);
                        flow.counts.datagrams[1] += 1;
                        flow.counts.bytes[1] += data.len() as u64;
                    }
                    // A full socket buffer or an unreachable client: drop this one, keep the flow.
                    Err(e) => {
                        log::debug!("udp reply to {client}: {e}");
                        inc(&ctx.stats.datagrams_dropped);
                        inc(&ctx.stats.dropped_to_client);
                    }
                }
            }
            if n < BATCH {
                return Recv::Drained;
            }
        }
        Recv::Again
    }

    // === expiry ===

    /// Close the flows idle for the idle timeout (an offloaded flow is idle when the program
    /// has not carried it either), and sweep the flows' counts when due.
    pub fn expire(&mut self, ctx: &Ctx<'_>) {
        if self.next_sweep_ms <= ctx.now_ms {
            self.sweep(ctx);
        }
        self.expired.clear();
        for table in self.tables.iter_mut() {
            self.expired.extend(table.expire(ctx.now_ms).map(|(_, flow)| *flow.value()));
        }
        let mut i = 0;
        while i < self.expired.len() {
            let slot = self.expired[i];
            i += 1;
            if self.still_active(slot, ctx) {
                continue;
            }
            inc(&ctx.stats.flows_expired);
            self.close(slot, End::IdleTimeout, ctx);
        }
    }

    /// Service slot `service` has new rules (a reload): flows whose client they deny end now.
    /// (A flow in user space would meet the check at its next datagram; an offloaded one's
    /// datagrams never come up, so every flow is checked here.)
    pub fn recheck(&mut self, service: usize, ctx: &Ctx<'_>) {
        let Some(snapshot) = ctx.services.get(service).and_then(Option::as_ref) else { return };
        for slot in 0..self.flows.len() {
            let Some(flow) = self.flows[slot].as_ref() else { continue };
            if flow.service.slot != service || snapshot.guards.acl.allows(flow.source.ip()) {
                continue;
            }
            log::debug!("udp flow {}: its client is denied since a reload: ended", flow.key);
            let key = flow.key;
            self.tables[service].remove(&key);
            self.close(slot, End::Denied, ctx);
        }
    }

    /// Forget the flow in `slot` (already out of the table): the program stops carrying it
    /// and its counts are folded in, it is dropped, its socket closes (leaving epoll with it),
    /// and its gauge and sticky count come back.
    fn close(&mut self, slot: usize, end: End, ctx: &Ctx<'_>) {
        let Some(mut flow) = self.flows.get_mut(slot).and_then(Option::take) else { return };
        self.free.push(slot);
        if let (Some(kernel), Some(mut o)) = (self.kernel.as_mut(), flow.offloaded.take()) {
            let reading = kernel.read(&mut o);
            kernel.remove(&o);
            fold(&mut flow, &reading, ctx.stats);
        }
        flush(&mut flow);
        if let Some(log) = ctx.session_log {
            log.log(flow.record(end, ctx.now_ms));
        }
    }
}

/// Count the datagrams the kernel dropped on a socket since it last said (`seen`).
fn kernel_drops(seen: &mut u32, now: u32, stats: &Stats) {
    let new = u64::from(crate::udp_socket::new_drops(seen, now));
    if new > 0 {
        stats.dropped_kernel.fetch_add(new, Relaxed);
        stats.datagrams_dropped.fetch_add(new, Relaxed);
    }
}

/// Send a reply to `to`, from `src` when the listener is a wildcard one (no allocation).
fn send_from(
    socket: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    src: Option<IpAddr>,
) -> io::Result<usize> {
    match src {
        Some(src) => crate::sys::send_from(socket, data, to, src),
        None => socket.send_to(data, to),
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket as StdSocket;
    use std::time::Duration;

    use conntrack::{AffinityKey, Sticky, StickyConfig};

    use super::session::MIGRATE_WINDOW_MS;
    use super::*;
    use crate::routing::{BackendState, Guards, Settings};

    /// One worker's UDP side with a listener, a backend socket the test answers from, and the
    /// service they form.
    struct Rig {
        udp: Udp,
        poll: mio::Poll,
        services: Vec<Option<Arc<Snapshot>>>,
        stats: Stats,
        listener: SocketAddr,
        backend: StdSocket,
        state: Arc<BackendState>,
    }

    impl Rig {
        fn new(flows: usize, guards: Guards) -> Rig {
            Rig::with_settings(flows, guards, |_| ())
        }

        /// [`Rig::new`] with settings of its own.
        fn with_settings(flows: usize, guards: Guards, set: impl FnOnce(&mut Settings)) -> Rig {
            let backend = StdSocket::bind("127.0.0.1:0").unwrap();
            backend.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let at = backend.local_addr().unwrap();
            let state = Arc::new(BackendState::new(0, "u0".into(), at));
            let mut settings = Settings::basic(Duration::from_secs(60), Duration::from_secs(60));
            set(&mut settings);
            let sticky =
                Arc::new(Sticky::new(StickyConfig { capacity: 8, timeout_ms: 1000 }, [4; 16]));
            let members = vec![(Arc::clone(&state), 1)];
            let snapshot =
                Snapshot::new("s".into(), 0, settings, members, 7, 0, sticky, guards).unwrap();
            let poll = mio::Poll::new().unwrap();
            let shared = Arc::new(Shared::new(1, 0, flows, [9; 16], None));
            let mut udp = Udp::new(&shared);
            let socket = StdSocket::bind("127.0.0.1:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            let listener = socket.local_addr().unwrap();
            udp.listen(socket, 0, poll.registry()).unwrap();
            udp.set_idle_timeout(0, Duration::from_millis(100));
            let services = vec![Some(Arc::new(snapshot))];
            Rig { udp, poll, services, stats: Stats::default(), listener, backend, state }
        }

        /// Run `f` on the UDP side with a context at `now_ms`.
        fn with<T>(&mut self, now_ms: u64, f: impl FnOnce(&mut Udp, &Ctx<'_>) -> T) -> T {
            let ctx = Ctx {
                registry: self.poll.registry(),
                session_log: None,
                services: &self.services,
                stats: &self.stats,
                now_ms,
            };
            f(&mut self.udp, &ctx)
        }

        /// A client at `ip` sends `data`; the worker takes it.
        fn send(&mut self, client: &StdSocket, data: &[u8], now_ms: u64) {
            client.send_to(data, self.listener).unwrap();
            assert_eq!(self.with(now_ms, |udp, ctx| udp.listener_readable(0, ctx)), Recv::Drained);
        }
    }

    fn client(ip: &str) -> StdSocket {
        let s = StdSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    #[test]
    fn a_flow_carries_both_ways_and_expires_giving_back_its_pin() {
        let mut rig = Rig::new(8, Guards::default());
        let a = client("127.0.0.2");
        rig.send(&a, b"hello", 0);
        let mut buf = [0u8; 64];
        let (n, flow_addr) = rig.backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(rig.stats.flows_created.load(Relaxed), 1);
        assert_eq!(rig.state.flows.load(Relaxed), 1);
        // The reply goes back to the client from the address it sent to.
        rig.backend.send_to(b"world", flow_addr).unwrap();
        assert_eq!(rig.with(1, |udp, ctx| udp.flow_readable(0, ctx)), Recv::Drained);
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"world"[..], rig.listener));
        // The client's next datagram takes the same flow (the same source port at the backend).
        rig.send(&a, b"again", 2);
        assert_eq!(rig.backend.recv_from(&mut buf).unwrap().1, flow_addr);
        assert_eq!(rig.stats.flows_created.load(Relaxed), 1);
        let key = AffinityKey::from_ip(a.local_addr().unwrap().ip());
        let sticky = Arc::clone(&rig.services[0].as_ref().unwrap().sticky);
        assert_eq!(sticky.get(key, 2).map(|e| e.live), Some(1));
        // Silent past the idle timeout: the flow ends, its gauge and pin count come back.
        rig.with(1_000, |udp, ctx| udp.expire(ctx));
        assert_eq!(rig.stats.flows_expired.load(Relaxed), 1);
        assert_eq!(rig.state.flows.load(Relaxed), 0);
        // (A dropped pin gives its count back at the real clock's time: read it at time 0.)
        assert_eq!(sticky.get(key, 0).map(|e| e.live), Some(0));
    }

    #[test]
    fn refused_datagrams_make_no_flow_and_are_counted_by_reason() {
        let acl = guard::Acl::new(Vec::new(), vec!["127.0.0.66/32".parse().unwrap()]);
        let mut rig = Rig::new(1, Guards { acl: Arc::new(acl), ..Guards::default() });
        rig.send(&client("127.0.0.66"), b"denied", 0);
        assert_eq!(rig.stats.dropped_denied.load(Relaxed), 1);
        // One flow fits: a second client is dropped, the first keeps its flow.
        let (a, b) = (client("127.0.0.2"), client("127.0.0.3"));
        rig.send(&a, b"first", 1);
        rig.send(&b, b"second", 2);
        assert_eq!(rig.stats.dropped_max_flows.load(Relaxed), 1);
        assert_eq!(rig.stats.flows_created.load(Relaxed), 1);
        let mut buf = [0u8; 64];
        let (n, _) = rig.backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        assert_eq!(rig.stats.datagrams_dropped.load(Relaxed), 2);
    }

    #[test]
    fn killing_a_backend_ends_its_flows() {
        let mut rig = Rig::new(8, Guards::default());
        for ip in ["127.0.0.2", "127.0.0.3"] {
            rig.send(&client(ip), b"x", 0);
        }
        assert_eq!(rig.state.flows.load(Relaxed), 2);
        let id = rig.state.id;
        assert_eq!(rig.with(1, |udp, ctx| udp.kill(id, ctx)), 2);
        assert_eq!(rig.state.flows.load(Relaxed), 0);
        assert_eq!(rig.stats.killed.load(Relaxed), 2);
    }

    /// A datagram of session `token` (key at 2..6) with payload byte `n`.
    fn keyed(token: &[u8; 4], n: u8) -> Vec<u8> {
        let mut d = vec![b'G', n];
        d.extend_from_slice(token);
        d
    }

    #[test]
    fn a_keyed_flow_follows_its_client_to_a_new_port_and_address_only_after_enough_datagrams() {
        let key = vocab::SessionKey { offset: 2, len: 4 };
        let acl = guard::Acl::new(Vec::new(), vec!["127.0.0.66/32".parse().unwrap()]);
        let guards = Guards { acl: Arc::new(acl), ..Guards::default() };
        let mut rig = Rig::with_settings(8, guards, |s| {
            s.session_key = Some(key);
            s.migrate_after = 2;
        });
        let mut buf = [0u8; 64];
        let backend_gets = |rig: &mut Rig, n: u8| {
            let mut buf = [0u8; 64];
            let (len, from) = rig.backend.recv_from(&mut buf).unwrap();
            assert_eq!(buf[..len][1], n, "datagram {n} did not come next");
            from
        };
        let (a, moved, spoofer) = (client("127.0.0.2"), client("127.0.0.2"), client("127.0.0.3"));
        rig.send(&a, &keyed(b"K001", 1), 0);
        let peer = backend_gets(&mut rig, 1);
        // Its pin is the key's, not the address's.
        let sticky = Arc::clone(&rig.services[0].as_ref().unwrap().sticky);
        let pin =
            conntrack::AffinityKey::from_session(b"K001", rig.services[0].as_ref().unwrap().seed);
        assert_eq!(sticky.get(pin, 0).unwrap().live, 1);
        assert!(sticky.get(AffinityKey::from_ip(a.local_addr().unwrap().ip()), 0).is_none());
        // One datagram from a new port moves nothing (dropped); the second moves the flow.
        rig.send(&moved, &keyed(b"K001", 2), 10);
        assert_eq!(rig.stats.dropped_migration_pending.load(Relaxed), 1);
        rig.send(&moved, &keyed(b"K001", 3), 20);
        assert_eq!(backend_gets(&mut rig, 3), peer, "the backend sees a new peer");
        assert_eq!(rig.stats.flow_migrations.load(Relaxed), 1);
        rig.backend.send_to(b"to-new", peer).unwrap();
        rig.with(21, |udp, ctx| udp.flow_readable(0, ctx));
        let (n, _) = moved.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"to-new", "the reply went to the old address");
        // A spoofer's one datagram with the key moves nothing; nor do two with the client
        // speaking between them; nor two further apart than the window.
        rig.send(&spoofer, &keyed(b"K001", 4), 30);
        rig.send(&moved, &keyed(b"K001", 5), 40);
        assert_eq!(backend_gets(&mut rig, 5), peer);
        rig.send(&spoofer, &keyed(b"K001", 6), 50);
        rig.send(&spoofer, &keyed(b"K001", 7), 50 + MIGRATE_WINDOW_MS);
        assert_eq!(rig.stats.flow_migrations.load(Relaxed), 1);
        assert_eq!(rig.stats.dropped_migration_pending.load(Relaxed), 4);
        rig.backend.send_to(b"still", peer).unwrap();
        rig.with(60, |udp, ctx| udp.flow_readable(0, ctx));
        let n = moved.recv_from(&mut buf).unwrap().0;
        assert_eq!(&buf[..n], b"still");
        // A denied address that sends enough does not take it either.
        let denied = client("127.0.0.66");
        rig.send(&denied, &keyed(b"K001", 8), 70);
        rig.send(&denied, &keyed(b"K001", 9), 71);
        assert_eq!(rig.stats.flow_migrations.load(Relaxed), 1);
        assert_eq!(rig.stats.dropped_denied.load(Relaxed), 1);
        // Another key is another flow; a datagram too short for a key goes by address.
        rig.send(&moved, &keyed(b"K002", 10), 80);
        assert_ne!(backend_gets(&mut rig, 10), peer);
        rig.send(&moved, b"G", 90);
        assert_eq!(rig.stats.session_key_short.load(Relaxed), 1);
        assert_ne!(rig.backend.recv_from(&mut buf).unwrap().1, peer);
        assert_eq!(rig.stats.flows_created.load(Relaxed), 3);
        let views = rig.with(91, |udp, ctx| udp.flows(None, 10, ctx));
        let keyed_views: Vec<_> = views.iter().filter(|v| v.keyed).collect();
        assert_eq!(keyed_views.len(), 2);
        let here = moved.local_addr().unwrap();
        assert!(keyed_views.iter().any(|v| v.migrations == 1 && v.client == here));
    }

    // === a seeded simulation ===

    /// The session key of the simulation's keyed runs: the datagram's second byte.
    const SIM_KEY: vocab::SessionKey = vocab::SessionKey { offset: 1, len: 1 };

    /// Key the flows by [`SIM_KEY`] (`keyed`) or not.
    fn sim_settings(settings: &mut Settings, keyed: bool) {
        settings.session_key = keyed.then_some(SIM_KEY);
    }

    /// A snapshot of service 0 with these members and rules.
    fn snapshot(
        members: &[(Arc<BackendState>, u32)],
        sticky: &Arc<Sticky>,
        guards: Guards,
        keyed: bool,
    ) -> Arc<Snapshot> {
        let mut settings = Settings::basic(Duration::from_secs(60), Duration::from_secs(60));
        sim_settings(&mut settings, keyed);
        let members = members.iter().filter(|(_, w)| *w > 0).cloned().collect();
        let sticky = Arc::clone(sticky);
        Arc::new(Snapshot::new("s".into(), 0, settings, members, 7, 0, sticky, guards).unwrap())
    }

    /// Flows against the shared counts: the budget, each backend's gauge, each client's pin.
    fn check(
        rig: &Rig,
        states: &[Arc<BackendState>],
        sticky: &Sticky,
        ips: &[IpAddr],
    ) -> Result<(), String> {
        let flows: Vec<&Flow> = rig.udp.flows.iter().flatten().collect();
        if rig.udp.budget.used() != flows.len() {
            return Err(format!("budget {} for {} flows", rig.udp.budget.used(), flows.len()));
        }
        for b in states {
            let on_it = flows.iter().filter(|f| f.service.backends[f.backend].id == b.id).count();
            if b.flows.load(Relaxed) != on_it as u64 {
                return Err(format!("{}: gauge {}, {on_it} flows", b.name, b.flows.load(Relaxed)));
            }
        }
        for &ip in ips {
            let pinned = flows
                .iter()
                .filter(|f| f.session.is_none() && f.source.ip() == ip && f.pin.is_some())
                .count();
            let live = sticky.get(AffinityKey::from_ip(ip), 0).map_or(0, |e| e.live);
            if live as usize != pinned {
                return Err(format!("{ip}: sticky live {live}, {pinned} pinned flows"));
            }
        }
        for token in SIM_TOKENS {
            let of = |f: &&&Flow| f.session.as_ref().is_some_and(|s| *s.token == [*token]);
            let (keyed, pinned) = (
                flows.iter().filter(of).count(),
                flows.iter().filter(of).filter(|f| f.pin.is_some()).count(),
            );
            let seed = rig.services[0].as_ref().unwrap().seed;
            let pin = AffinityKey::from_session(&[*token], seed);
            let live = sticky.get(pin, 0).map_or(0, |e| e.live);
            if keyed > 1 || live as usize != pinned {
                return Err(format!("key {token}: {keyed} flows, {pinned} pinned, live {live}"));
            }
        }
        Ok(())
    }

    /// The session keys of the keyed runs.
    const SIM_TOKENS: &[u8] = b"abc";

    /// One seeded run of datagrams, replies, health and admin changes, kills, reloads (new
    /// weights, a backend left out, a client denied) and expiry on a virtual clock. `keyed`:
    /// the service has a session key, and clients send one of three keys (or, one datagram in
    /// five, none) from any of their sockets, so keyed flows move between them.
    fn run(seed: u64, keyed: bool) -> Result<(usize, u64), String> {
        let mut rng = conntrack::testutil::Rng(seed);
        let mut rig = Rig::with_settings(5, Guards::default(), |s| sim_settings(s, keyed));
        let extra = StdSocket::bind("127.0.0.1:0").unwrap();
        let u1 = Arc::new(BackendState::new(1, "u1".into(), extra.local_addr().unwrap()));
        let states = [Arc::clone(&rig.state), u1];
        let sticky = Arc::clone(&rig.services[0].as_ref().unwrap().sticky);
        rig.services[0] = Some(snapshot(
            &[(Arc::clone(&states[0]), 1), (Arc::clone(&states[1]), 1)],
            &sticky,
            Guards::default(),
            keyed,
        ));
        let sockets = [&rig.backend, &extra].map(|s| s.try_clone().unwrap());
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
        }
        let ips: Vec<IpAddr> = (2..9).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let clients: Vec<StdSocket> = ips.iter().map(|ip| client(&ip.to_string())).collect();
        let mut now = 0;
        for step in 0..150 {
            match rng.below(10) {
                0..=3 => {
                    let token = SIM_TOKENS[rng.below(3) as usize];
                    let data: &[u8] = if keyed && rng.below(5) > 0 { &[b'x', token] } else { b"x" };
                    rig.send(&clients[rng.below(7) as usize], data, now)
                }
                // The backends answer what they got; the worker forwards the replies.
                4 => {
                    let mut buf = [0u8; 64];
                    for s in &sockets {
                        while let Ok((n, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                    for slot in 0..16 {
                        rig.with(now, |udp, ctx| udp.flow_readable(slot, ctx));
                    }
                }
                5 => states[rng.below(2) as usize].set_health(if rng.below(2) == 0 {
                    health::Health::Up
                } else {
                    health::Health::Down
                }),
                6 => {
                    let admin = [
                        health::AdminState::Ready,
                        health::AdminState::Drain,
                        health::AdminState::Maint,
                    ];
                    states[rng.below(2) as usize].set_admin(admin[rng.below(3) as usize]);
                }
                7 => {
                    let id = states[rng.below(2) as usize].id;
                    rig.with(now, |udp, ctx| udp.kill(id, ctx));
                }
                8 => {
                    let weights = [rng.below(3) as u32, rng.below(3) as u32];
                    let denied = ips[rng.below(7) as usize];
                    let deny = guard::Cidr::new(denied, 32).unwrap();
                    let acl = Arc::new(guard::Acl::new(Vec::new(), vec![deny]));
                    let members: Vec<_> = states.iter().cloned().zip(weights).collect();
                    let guards = Guards { acl, ..Guards::default() };
                    rig.services[0] = Some(snapshot(&members, &sticky, guards, keyed));
                }
                _ => {
                    now += rng.below(150);
                    rig.with(now, |udp, ctx| udp.expire(ctx));
                }
            }
            check(&rig, &states, &sticky, &ips).map_err(|e| format!("step {step}: {e}"))?;
        }
        let made = rig.stats.flows_created.load(Relaxed) as usize;
        let moves = rig.stats.flow_migrations.load(Relaxed);
        now += 10_000;
        rig.with(now, |udp, ctx| udp.expire(ctx));
        check(&rig, &states, &sticky, &ips).map_err(|e| format!("after expiry: {e}"))?;
        if rig.udp.budget.used() != 0 {
            return Err(format!("{} flows left after expiry", rig.udp.budget.used()));
        }
        Ok((made, moves))
    }

    #[test]
    fn flows_through_kills_health_changes_reloads_and_expiry_hold_exactly_what_they_should() {
        let seeds: Vec<u64> = match std::env::var("UDP_SIM_SEED") {
            Ok(seed) => vec![seed.parse().expect("UDP_SIM_SEED is a u64")],
            Err(_) => (0..30).collect(),
        };
        let (mut made, mut moves) = ([0, 0], 0);
        for seed in seeds {
            for keyed in [false, true] {
                match run(seed, keyed) {
                    Ok((n, m)) => {
                        made[usize::from(keyed)] += n;
                        moves += m;
                    }
                    Err(why) => {
                        panic!("seed {seed}, keyed {keyed}: {why} (replay: UDP_SIM_SEED={seed})")
                    }
                }
            }
        }
        assert!(made[0] > 0 && made[1] > 0, "no flow was ever made: {made:?}");
        assert!(moves > 0, "no keyed flow ever moved");
    }
}
