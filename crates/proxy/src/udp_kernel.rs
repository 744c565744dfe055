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

use std::net::SocketAddr;

use offload::route::Routes;
use offload::{FlowMap, Tuple};

use crate::routing::canonical;
use crate::Shared;

/// How often (proxy ms) a worker reads its offloaded flows' entries: counters into `/metrics`
/// and the flows' activity into their tables.
pub const SWEEP_MS: u64 = 1000;

/// A worker's handle on the program's map, and the routes its entries need.
pub struct Kernel {
    map: FlowMap,
    routes: Routes,
    /// CLOCK_MONOTONIC (the program's clock) at the proxy clock's epoch, in ns.
    epoch_ns: i128,
    /// When the next sweep is due (proxy ms).
    pub next_sweep_ms: u64,
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
        Some(Kernel { map, routes, epoch_ns, next_sweep_ms: SWEEP_MS })
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
