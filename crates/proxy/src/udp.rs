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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use conntrack::{AffinityKey, Attach, FlowBudget, FlowKey, FlowTable};

use crate::stats::{inc, Stats};
use crate::sys::{RecvBatch, BATCH};
use crate::token::Slot;
use crate::Shared;

/// recvmmsg(2) calls on one socket before other work gets a turn (8 x 16 datagrams).
const RECV_ROUNDS: usize = 8;

/// What the worker needs from its surroundings for one call.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub shared: &'a Shared,
    pub stats: &'a Stats,
    pub now_ms: u64,
}

/// One listen address of this worker.
struct Listener {
    socket: UdpSocket,
    local: SocketAddr,
    /// Bound to 0.0.0.0 or [::]: the destination address comes with each datagram.
    wildcard: bool,
}

/// One flow's state beyond what the flow table keeps.
struct Flow {
    socket: UdpSocket,
    key: FlowKey,
    listener: usize,
    client: SocketAddr,
    /// The address the client sent to: the source of every reply.
    local_ip: Option<IpAddr>,
    backend: usize,
    affinity: Option<AffinityKey>,
    attached: bool,
}

/// All UDP state of one worker.
pub struct Udp {
    listeners: Vec<Option<Listener>>,
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    table: FlowTable<usize>,
    /// Receive buffers (taken out while a batch is handled, so the handlers may borrow self).
    batch: Option<Box<RecvBatch>>,
    expired: Vec<usize>,
}

/// What a receive loop left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum More {
    /// Drained to `WouldBlock`.
    No,
    /// Budget spent: call again after other work.
    Yes,
}

impl Udp {
    /// Register this worker's UDP listener sockets.
    pub fn new(
        sockets: Vec<std::net::UdpSocket>,
        registry: &Registry,
        budget: Arc<FlowBudget>,
        idle_timeout_ms: u64,
        hash_key: [u8; 16],
    ) -> io::Result<Udp> {
        let mut listeners = Vec::with_capacity(sockets.len());
        for (i, s) in sockets.into_iter().enumerate() {
            let local = s.local_addr()?;
            let mut socket = UdpSocket::from_std(s);
            registry.register(&mut socket, Slot::UdpListener(i).token(), Interest::READABLE)?;
            listeners.push(Some(Listener { socket, local, wildcard: local.ip().is_unspecified() }));
        }
        Ok(Udp {
            listeners,
            flows: Vec::new(),
            free: Vec::new(),
            table: FlowTable::new(budget, idle_timeout_ms, hash_key),
            batch: Some(Box::new(RecvBatch::new())),
            expired: Vec::new(),
        })
    }

    /// Earliest time (proxy milliseconds) a flow may expire.
    pub fn next_expiry(&self) -> Option<u64> {
        self.table.next_expiry()
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
    pub fn listener_readable(&mut self, i: usize, ctx: &Ctx<'_>) -> More {
        self.with_batch(|udp, batch| udp.take_from_clients(i, batch, ctx))
    }

    /// Lend the receive buffers out of `self`, so the handler may borrow `self` mutably too.
    fn with_batch(&mut self, f: impl FnOnce(&mut Self, &mut RecvBatch) -> More) -> More {
        let Some(mut batch) = self.batch.take() else { return More::No };
        let more = f(self, &mut batch);
        self.batch = Some(batch);
        more
    }

    fn take_from_clients(&mut self, i: usize, batch: &mut RecvBatch, ctx: &Ctx<'_>) -> More {
        for _ in 0..RECV_ROUNDS {
            let Some(l) = self.listeners.get(i).and_then(Option::as_ref) else { return More::No };
            let (wildcard, local) = (l.wildcard, l.local);
            let n = match batch.recv(&l.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("udp recv on {local}: {e}");
                    }
                    return More::No;
                }
            };
            for k in 0..n {
                let (data, from, dst) = batch.get(k);
                let Some(client) = from else { continue };
                inc(&ctx.stats.datagrams_in);
                let local_ip = if wildcard { dst } else { None };
                let to = SocketAddr::new(local_ip.unwrap_or(local.ip()), local.port());
                self.forward(i, client, to, local_ip, data, ctx);
            }
            if n < BATCH {
                return More::No; // a short batch drained the socket
            }
        }
        More::Yes
    }

    /// Send `data` from `client` on its flow, making the flow if needed.
    fn forward(
        &mut self,
        i: usize,
        client: SocketAddr,
        local: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
        ctx: &Ctx<'_>,
    ) {
        let key = FlowKey::new(client, local);
        // At most two rounds: a flow whose backend turned out dead is replaced once.
        for _ in 0..2 {
            let slot = match self.table.get(&key, ctx.now_ms) {
                Some(flow) => *flow.value(),
                None => match self.open(key, i, client, local_ip, ctx) {
                    Some(slot) => slot,
                    None => return,
                },
            };
            let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else { return };
            match flow.socket.send(data) {
                Ok(_) => return,
                // An ICMP error from an earlier datagram (connect(2) on UDP: the kernel reports
                // it on the next call): the backend is not there. Re-pin and resend.
                Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
                    ctx.shared.routing.mark_failing(flow.backend, ctx.now_ms);
                    self.table.remove(&key);
                    self.close(slot, ctx);
                }
                Err(e) => {
                    log::debug!("udp send to backend: {e}");
                    inc(&ctx.stats.datagrams_dropped);
                    return;
                }
            }
        }
    }

    /// Make a flow for `client`: pick its backend (the sticky entry shared with TCP first),
    /// open a socket connected to it, admit it to the table. `None` when the table is full or
    /// no socket could be had (the datagram is dropped and counted).
    fn open(
        &mut self,
        key: FlowKey,
        i: usize,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
        ctx: &Ctx<'_>,
    ) -> Option<usize> {
        // Full and nothing of ours has expired: refuse before paying for a socket.
        let expiry_due = self.table.next_expiry().is_some_and(|t| t <= ctx.now_ms);
        if self.table.budget().available() == 0 && !expiry_due {
            inc(&ctx.stats.flows_refused);
            return None;
        }
        let shared = ctx.shared;
        let routing = &shared.routing;
        let (affinity, hash) = match shared.affinity {
            config::Affinity::Source => {
                let k = AffinityKey::from_ip(client.ip());
                (Some(k), routing.ring.hash_key(&k.to_bytes()))
            }
            config::Affinity::FiveTuple => {
                let tuple = crate::routing::five_tuple(17, client, key.listener()); // IPPROTO_UDP
                (None, routing.ring.hash_key(&tuple))
            }
        };
        let usable = |b: usize| routing.usable(b, ctx.now_ms);
        let pinned = affinity
            .and_then(|k| shared.sticky.lookup(k, ctx.now_ms))
            .map(|b| b as usize)
            .filter(|&b| b < routing.backends.len() && usable(b));
        let backend = pinned
            .or_else(|| routing.ring.pick(hash, usable))
            .or_else(|| routing.ring.pick(hash, |_| true))?;
        let mut socket = match connected_socket(routing.backends[backend].addr) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("udp socket toward {}: {e}", routing.backends[backend].addr);
                inc(&ctx.stats.local_errors);
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
            self.free.push(slot);
            return None;
        }
        match self.table.insert(key, backend as u32, slot, ctx.now_ms) {
            Ok(inserted) => {
                if let Some((_, old)) = inserted.reclaimed {
                    let old_slot = *old.value();
                    self.close(old_slot, ctx);
                }
            }
            Err(refused) => {
                log::debug!("udp flow from {client} refused: {:?}", refused.reason);
                inc(&ctx.stats.flows_refused);
                self.free.push(slot);
                return None;
            }
        }
        let attached = match affinity {
            Some(k) => match shared.sticky.attach(k, backend as u32, ctx.now_ms) {
                Attach::Full => {
                    inc(&ctx.stats.sticky_full);
                    false
                }
                Attach::Pinned | Attach::Repinned { .. } => true,
            },
            None => false,
        };
        inc(&ctx.stats.flows_created);
        routing.backends[backend].active.fetch_add(1, Relaxed);
        routing.backends[backend].total.fetch_add(1, Relaxed);
        self.flows[slot] =
            Some(Flow { socket, key, listener: i, client, local_ip, backend, affinity, attached });
        Some(slot)
    }

    // === backend -> client ===

    /// Datagrams from the backend of the flow in `slot`.
    pub fn flow_readable(&mut self, slot: usize, ctx: &Ctx<'_>) -> More {
        self.with_batch(|udp, batch| udp.take_from_backend(slot, batch, ctx))
    }

    fn take_from_backend(&mut self, slot: usize, batch: &mut RecvBatch, ctx: &Ctx<'_>) -> More {
        for _ in 0..RECV_ROUNDS {
            let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else { return More::No };
            let n = match batch.recv(&flow.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return More::No,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNREFUSED: the backend's port is closed. The flow ends; the client's
                    // next datagram makes a new one on the next backend of its order.
                    if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) {
                        ctx.shared.routing.mark_failing(flow.backend, ctx.now_ms);
                    }
                    log::debug!("udp flow {}: {e}", flow.key);
                    let key = flow.key;
                    self.table.remove(&key);
                    self.close(slot, ctx);
                    return More::No;
                }
            };
            let (client, local_ip, listener, key) =
                (flow.client, flow.local_ip, flow.listener, flow.key);
            self.table.get(&key, ctx.now_ms); // activity either way keeps the flow
            let Some(l) = self.listeners.get(listener).and_then(Option::as_ref) else {
                return More::No;
            };
            for k in 0..n {
                match send_from(&l.socket, batch.get(k).0, client, local_ip) {
                    Ok(_) => inc(&ctx.stats.datagrams_out),
                    // A full socket buffer or an unreachable client: drop this one, keep the flow.
                    Err(e) => {
                        log::debug!("udp reply to {client}: {e}");
                        inc(&ctx.stats.datagrams_dropped);
                    }
                }
            }
            if n < BATCH {
                return More::No;
            }
        }
        More::Yes
    }

    // === expiry ===

    /// Close the flows idle for the idle timeout.
    pub fn expire(&mut self, ctx: &Ctx<'_>) {
        self.expired.clear();
        self.expired.extend(self.table.expire(ctx.now_ms).map(|(_, flow)| *flow.value()));
        for i in 0..self.expired.len() {
            inc(&ctx.stats.flows_expired);
            self.close(self.expired[i], ctx);
        }
    }

    /// Forget the flow in `slot` (already out of the table): its socket closes (leaving epoll
    /// with it), its sticky entry loses a live session.
    fn close(&mut self, slot: usize, ctx: &Ctx<'_>) {
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::take) else { return };
        ctx.shared.routing.backends[flow.backend].active.fetch_sub(1, Relaxed);
        if let (Some(k), true) = (flow.affinity, flow.attached) {
            ctx.shared.sticky.detach(k, ctx.now_ms);
        }
        self.free.push(slot);
    }
}

/// A non-blocking UDP socket connected to `backend`, on an ephemeral port.
fn connected_socket(backend: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket))
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
