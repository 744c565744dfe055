//! The kernel's part of a worker's UDP flows (`--udp-offload`, issue 13): once a flow is
//! established in user space, two entries of the offload program's map carry its datagrams
//! (client -> listener becomes flow address -> backend, backend -> flow address becomes
//! listener -> client), and this side reads back what the program counted and when it last
//! saw each direction.
//!
//! User space keeps everything else: the flow's connected socket (its local port stays
//! reserved, and the backend's ICMP errors about rewritten datagrams still reach it, so a
//! closed backend port ends the flow as before), the flow table and its idle expiry (from the
//! program's last-seen times), the counters (folded in every [`SWEEP_MS`] and when the flow
//! ends), and every decision.
//!
//! Also here: the flows as the admin API lists them ([`FlowView`]), their counts read from the
//! program's entries when asked.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use offload::route::Routes;
use offload::{FlowMap, Tuple};

use super::{Ctx, Flow, Udp};
use crate::routing::canonical;
use crate::stats::{inc, Stats};
use crate::Shared;

/// How often (proxy ms) a worker brings its flows' counts into their backends' counters, and
/// reads its offloaded flows' entries (counts, and activity into their tables).
pub const SWEEP_MS: u64 = 1000;

/// A worker's handle on the program's map, and the routes its entries need.
pub struct Kernel {
    map: FlowMap,
    routes: Routes,
    /// CLOCK_MONOTONIC (the program's clock) at the proxy clock's epoch, in ns.
    epoch_ns: i128,
}

/// A flow's two entries, and what of their counts was already folded in.
#[derive(Debug)]
pub struct Offloaded {
    there: Tuple,
    back: Tuple,
    /// (packets, bytes) read so far: client -> backend, backend -> client.
    read: [(u64, u64); 2],
}

/// What a read of a flow's entries found since the last one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Datagrams and payload bytes client -> backend, backend -> client.
    pub datagrams: [u64; 2],
    pub bytes: [u64; 2],
    /// When the program last carried a datagram of the flow (proxy ms), if it did.
    pub last_ms: Option<u64>,
    /// An entry is gone (deleted from outside): the flow is back in user space.
    pub lost: bool,
}

impl Kernel {
    /// A handle for one worker, if the process attached the program; `None` (logged) when the
    /// map or a netlink socket cannot be had: the worker's flows stay in user space.
    pub fn new(shared: &Shared) -> Option<Kernel> {
        let offload = shared.offload.as_ref()?;
        let made = offload.flow_map().map_err(|e| e.to_string()).and_then(|map| {
            Routes::new().map(|routes| (map, routes)).map_err(|e| format!("rtnetlink: {e}"))
        });
        let (map, routes) = match made {
            Ok(made) => made,
            Err(e) => {
                log::error!("udp offload: a worker's flows stay in user space: {e}");
                return None;
            }
        };
        let since_epoch = shared.epoch.elapsed().as_nanos() as i128;
        let epoch_ns = i128::from(offload::monotonic_ns()) - since_epoch;
        Some(Kernel { map, routes, epoch_ns })
    }

    /// Hand a flow to the program: `client` sent to `listener`; its socket `flow` is connected
    /// to `backend`. The reason when it cannot be (the flow stays in user space).
    pub fn offload(
        &mut self,
        client: SocketAddr,
        listener: SocketAddr,
        flow: SocketAddr,
        backend: SocketAddr,
    ) -> Result<Offloaded, String> {
        let [client, listener, flow, backend] = [client, listener, flow, backend].map(canonical);
        if client.is_ipv4() != listener.is_ipv4() || flow.is_ipv4() != backend.is_ipv4() {
            return Err("addresses of mixed families".into());
        }
        let to_backend = self
            .routes
            .egress(flow.ip(), backend.ip())
            .map_err(|e| format!("route {flow} -> {backend}: {e}"))?;
        let to_client = self
            .routes
            .egress(listener.ip(), client.ip())
            .map_err(|e| format!("route {listener} -> {client}: {e}"))?;
        let there = Tuple::new(client, listener);
        let back = Tuple::new(backend, flow);
        // Replies first: by the time the backend sees a rewritten datagram, its answer is
        // rewritten too.
        self.map
            .insert(back, Tuple::new(listener, client), to_client.oif())
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.map.insert(there, Tuple::new(flow, backend), to_backend.oif()) {
            self.map.remove(&back);
            return Err(e.to_string());
        }
        Ok(Offloaded { there, back, read: [(0, 0); 2] })
    }

    /// What the program carried of `o` since the last read.
    pub fn read(&mut self, o: &mut Offloaded) -> Reading {
        let mut reading = Reading::default();
        let mut last_ns = 0;
        for (i, key) in [o.there, o.back].iter().enumerate() {
            let Some(seen) = self.map.seen(key) else {
                reading.lost = true;
                continue;
            };
            let (packets, bytes) = o.read[i];
            reading.datagrams[i] = seen.packets.saturating_sub(packets);
            reading.bytes[i] = seen.bytes.saturating_sub(bytes);
            o.read[i] = (seen.packets, seen.bytes);
            last_ns = last_ns.max(seen.last_seen_ns);
        }
        if last_ns > 0 {
            // Signed: the program's time may be later than the epoch's reading suggests.
            let ms = (i128::from(last_ns) - self.epoch_ns).max(0) / 1_000_000;
            reading.last_ms = Some(ms as u64);
        }
        reading
    }

    /// Take a flow back from the program (it ends, or needs user space again).
    pub fn remove(&mut self, o: &Offloaded) {
        self.map.remove(&o.there);
        self.map.remove(&o.back);
    }
}

/// One UDP flow as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowView {
    pub service: String,
    /// The client, and the address it sent to.
    pub client: SocketAddr,
    pub listener: SocketAddr,
    /// The flow socket's address (what the backend sees) and the backend.
    pub local: Option<SocketAddr>,
    pub backend: String,
    pub backend_address: SocketAddr,
    /// The offload program carries it.
    pub offloaded: bool,
    /// Keyed by its session key (`--udp-session-key`), and how often it moved to a new client
    /// address since it began.
    pub keyed: bool,
    pub migrations: u32,
    /// Datagrams and payload bytes client -> backend and back, whoever carried them.
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Since its last datagram (as the flow table knows it: the program's are read every
    /// second and now).
    pub idle_ms: u64,
}

impl Udp {
    /// The flows (of clients with IP `client`, if given), at most `limit`, their counts
    /// brought up to date from the program's entries.
    pub fn flows(&mut self, client: Option<IpAddr>, limit: usize, ctx: &Ctx<'_>) -> Vec<FlowView> {
        let mut out = Vec::new();
        for slot in 0..self.flows.len() {
            if out.len() >= limit {
                break;
            }
            let Some(flow) = self.flows[slot].as_mut() else { continue };
            if client.is_some_and(|ip| flow.client.ip().to_canonical() != ip) {
                continue;
            }
            if let (Some(kernel), Some(o)) = (self.kernel.as_mut(), flow.offloaded.as_mut()) {
                let reading = kernel.read(o);
                if let Some(last) = reading.last_ms {
                    self.tables[flow.service.slot].get(&flow.key, last);
                }
                fold(flow, &reading, ctx.stats);
            }
            let last = self.tables[flow.service.slot].peek(&flow.key).map(|f| f.last_active());
            let b = &flow.service.backends[flow.backend];
            out.push(FlowView {
                service: flow.service.name.clone(),
                client: flow.client,
                listener: flow.local,
                local: flow.socket.local_addr().ok(),
                backend: b.name.clone(),
                backend_address: b.addr,
                offloaded: flow.offloaded.is_some(),
                keyed: flow.session.is_some(),
                migrations: flow.session.as_ref().map_or(0, |s| s.migrations),
                datagrams_in: flow.counts.datagrams[0],
                datagrams_out: flow.counts.datagrams[1],
                bytes_in: flow.counts.bytes[0],
                bytes_out: flow.counts.bytes[1],
                idle_ms: last.map_or(0, |t| ctx.now_ms.saturating_sub(t)),
            });
        }
        out
    }

    /// Hand the flow in `slot` to the offload program, if it may go there: a client that is
    /// not a trusted proxy (whose datagrams may carry a header each), no PROXY header left to
    /// send, and a service without a session key (the program finds flows by address: an
    /// address flow of a keyed service, made by a datagram too short for the key, would take
    /// that address's keyed datagrams too). Tried once per stay in user space.
    pub(super) fn offload(&mut self, slot: usize, stats: &Stats) {
        let Some(kernel) = self.kernel.as_mut() else { return };
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else { return };
        if flow.offload_tried || flow.offloaded.is_some() {
            return;
        }
        flow.offload_tried = true;
        if self.steered.get(flow.service.slot).copied().flatten().is_some() {
            return;
        }
        let rules = &flow.service.guards.proxy;
        let header_due = rules.send.is_some() && (rules.send_every_datagram || !flow.header_sent);
        let from_proxy = rules.accept && rules.trusted.allows(flow.client.ip());
        if header_due || from_proxy {
            return;
        }
        let backend = flow.service.backends[flow.backend].addr;
        let local = match flow.socket.local_addr() {
            Ok(local) => local,
            Err(e) => return log::debug!("udp flow {}: not offloaded: {e}", flow.key),
        };
        match kernel.offload(flow.client, flow.local, local, backend) {
            Ok(o) => {
                flow.offloaded = Some(o);
                inc(&stats.flows_offloaded);
            }
            Err(e) => log::debug!("udp flow {}: not offloaded: {e}", flow.key),
        }
    }

    /// Every [`SWEEP_MS`], offload or not: every flow's counts reach its backend's. With the
    /// offload, first read what the program carried of every offloaded flow: counters folded
    /// in, activity into the flow tables; a flow whose entries went missing is back in user
    /// space (and offloaded again at its next datagram).
    pub(super) fn sweep(&mut self, ctx: &Ctx<'_>) {
        self.next_sweep_ms = ctx.now_ms + SWEEP_MS;
        let mut kernel = self.kernel.as_mut();
        for flow in self.flows.iter_mut().flatten() {
            if let (Some(kernel), Some(o)) = (kernel.as_deref_mut(), flow.offloaded.as_mut()) {
                let reading = kernel.read(o);
                if reading.lost {
                    log::debug!("udp flow {}: its entries are gone: back in user space", flow.key);
                    kernel.remove(o);
                    flow.offloaded = None;
                    flow.offload_tried = false;
                }
                if let Some(last) = reading.last_ms {
                    self.tables[flow.service.slot].get(&flow.key, last);
                }
                fold(flow, &reading, ctx.stats);
            }
            flush(flow);
        }
    }

    /// Whether the offloaded flow in `slot`, just expired from its table, was in fact active
    /// within the idle timeout (the program carried it): then it goes back into the table,
    /// active at that time.
    pub(super) fn still_active(&mut self, slot: usize, ctx: &Ctx<'_>) -> bool {
        let Some(kernel) = self.kernel.as_mut() else { return false };
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else { return false };
        let Some(o) = flow.offloaded.as_mut() else { return false };
        let reading = kernel.read(o);
        fold(flow, &reading, ctx.stats);
        let table = &mut self.tables[flow.service.slot];
        let timeout = table.idle_timeout_ms();
        let Some(last) = reading.last_ms.filter(|&t| ctx.now_ms.saturating_sub(t) < timeout) else {
            return false;
        };
        let id = flow.service.backends[flow.backend].id;
        match table.insert(flow.key, id, slot, last) {
            Ok(inserted) => {
                if let Some((_, old)) = inserted.reclaimed {
                    // Full: the slot of another expired flow of this table came with it.
                    self.expired.push(*old.value());
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// Add what the program carried of `flow` to its counts and the worker's counters.
pub(super) fn fold(flow: &mut Flow, reading: &Reading, stats: &Stats) {
    for i in 0..2 {
        flow.counts.datagrams[i] += reading.datagrams[i];
        flow.counts.bytes[i] += reading.bytes[i];
    }
    let [there, back] = reading.datagrams;
    if there + back > 0 {
        stats.datagrams_in.fetch_add(there, Relaxed);
        stats.datagrams_out.fetch_add(back, Relaxed);
        stats.offloaded_datagrams.fetch_add(there + back, Relaxed);
    }
}

/// Bring the backend's datagram counters up to `flow`'s counts.
pub(super) fn flush(flow: &mut Flow) {
    if flow.counts == flow.flushed {
        return;
    }
    let b = &flow.service.backends[flow.backend];
    let (now, then) = (flow.counts, flow.flushed);
    b.datagrams_in.fetch_add(now.datagrams[0] - then.datagrams[0], Relaxed);
    b.datagrams_out.fetch_add(now.datagrams[1] - then.datagrams[1], Relaxed);
    b.datagram_bytes_in.fetch_add(now.bytes[0] - then.bytes[0], Relaxed);
    b.datagram_bytes_out.fetch_add(now.bytes[1] - then.bytes[1], Relaxed);
    flow.flushed = now;
}
