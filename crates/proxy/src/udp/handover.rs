//! Handing UDP flows to another process (an upgrade) and taking them over: the flow's
//! connected socket goes along, so it keeps its source port toward the backend.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use conntrack::FlowKey;

use super::{flush, fold, Arrival, Ctx, Flow, Udp};
use crate::stats::Stats;
use crate::token::Slot;

/// A UDP flow as one process hands it to another (an upgrade): a descriptor of its connected
/// socket (so the flow keeps its source port toward the backend: a game server sees the same
/// peer) and what the worker that takes it over needs.
#[derive(Debug)]
pub struct HandedFlow {
    pub socket: std::net::UdpSocket,
    /// [`socket_id`] of the listener socket its client's datagrams arrive on: the same socket
    /// in both processes, so the flow goes to the worker that reads it.
    pub listener: u64,
    pub client: SocketAddr,
    /// The address the client sent to (the flow key's other half).
    pub local: SocketAddr,
    pub local_ip: Option<IpAddr>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub header_sent: bool,
    /// The backend's name (ids are per process).
    pub backend: String,
    /// A keyed flow's session key bytes (`--udp-session-key`): the flow and its pin are
    /// keyed by them again.
    pub session: Option<Vec<u8>>,
}

/// What tells one socket from another across processes: its inode (a descriptor passed with
/// SCM_RIGHTS names the same socket, with the same inode).
pub fn socket_id(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let stat = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(stat.st_ino)
}

impl Udp {
    /// Stop reading every socket (an upgrade hands them to another process) and return a copy
    /// of each flow's socket with what the other process needs. The flows stay here, unread,
    /// until [`resume`](Self::resume) (the upgrade failed) or shutdown; datagrams meanwhile
    /// wait in the kernel's buffers for whichever process reads next.
    pub fn pause(&mut self, registry: &Registry, stats: &Stats) -> Vec<HandedFlow> {
        self.paused = true;
        // The other process reads the sockets from now on: the program must not carry these
        // flows past it (it offloads them again in its own map).
        if let Some(kernel) = self.kernel.as_mut() {
            for flow in self.flows.iter_mut().flatten() {
                if let Some(mut o) = flow.offloaded.take() {
                    let reading = kernel.read(&mut o);
                    kernel.remove(&o);
                    fold(flow, &reading, stats);
                }
                flow.offload_tried = false;
                flush(flow);
            }
        }
        for l in self.listeners.iter_mut().flatten() {
            let _ = registry.deregister(&mut l.socket);
        }
        let mut handed = Vec::new();
        for flow in self.flows.iter_mut().flatten() {
            let _ = registry.deregister(&mut flow.socket);
            let Some(listener) = self.listeners.get(flow.listener).and_then(Option::as_ref) else {
                continue;
            };
            let socket = match std::os::fd::AsFd::as_fd(&flow.socket).try_clone_to_owned() {
                Ok(fd) => std::net::UdpSocket::from(fd),
                Err(e) => {
                    log::warn!("udp flow {}: keeping a copy of its socket: {e}", flow.key);
                    continue;
                }
            };
            handed.push(HandedFlow {
                socket,
                listener: listener.id,
                client: flow.client,
                local: flow.local,
                local_ip: flow.local_ip,
                source: flow.source,
                destination: flow.destination,
                header_sent: flow.header_sent,
                backend: flow.service.backends[flow.backend].name.clone(),
                session: flow.session.as_ref().map(|s| s.token.to_vec()),
            });
        }
        handed
    }

    /// Read the sockets again after [`pause`](Self::pause).
    pub fn resume(&mut self, registry: &Registry) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            let token = Slot::UdpListener(i).token();
            if let Err(e) = registry.register(&mut l.socket, token, Interest::READABLE) {
                log::error!("udp listener {}: reading it again: {e}", l.local);
            }
        }
        for (slot, flow) in self.flows.iter_mut().enumerate() {
            let Some(flow) = flow else { continue };
            let token = Slot::Flow(slot).token();
            if let Err(e) = registry.register(&mut flow.socket, token, Interest::READABLE) {
                log::error!("udp flow {}: reading it again: {e}", flow.key);
            }
        }
    }

    /// Carry on a flow another process handed over (an upgrade), before the first datagram
    /// is read: same socket (same source port toward the backend), same backend, same client
    /// and reply address. Its idle time starts again. The reason when it cannot be.
    pub fn adopt(&mut self, handed: HandedFlow, ctx: &Ctx<'_>) -> Result<(), String> {
        let listener = self
            .listeners
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.id == handed.listener))
            .ok_or("its listener is not this worker's")?;
        let slot_of_service = self.listeners[listener].as_ref().map_or(0, |l| l.service);
        let service = ctx
            .services
            .get(slot_of_service)
            .and_then(Option::as_ref)
            .cloned()
            .ok_or("its service is gone")?;
        let backend = service
            .backends
            .iter()
            .position(|b| b.name == handed.backend)
            .ok_or("its backend is gone")?;
        let target = &service.backends[backend];
        let mut socket = UdpSocket::from_std(handed.socket);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.flows.push(None);
            self.flows.len() - 1
        });
        let key = match &handed.session {
            Some(token) => self.session_flow_key(token),
            None => FlowKey::new(handed.client, handed.local),
        };
        if let Err(refused) = self.table(service.slot).insert(key, target.id, slot, ctx.now_ms) {
            self.free.push(slot);
            return Err(format!("{:?}", refused.reason));
        }
        if let Err(e) =
            ctx.registry.register(&mut socket, Slot::Flow(slot).token(), Interest::READABLE)
        {
            self.tables[service.slot].remove(&key);
            self.free.push(slot);
            return Err(format!("epoll: {e}"));
        }
        let pin = match (&handed.session, service.settings.affinity) {
            (Some(token), _) => {
                let k = conntrack::AffinityKey::from_session(token, service.seed);
                self.pin(&service, k, target.id, ctx)
            }
            (None, vocab::Affinity::Source) => {
                let k = conntrack::AffinityKey::from_ip_prefix(
                    handed.source.ip(),
                    service.settings.prefix,
                );
                self.pin(&service, k, target.id, ctx)
            }
            (None, vocab::Affinity::FiveTuple) => None,
        };
        let a = Arrival {
            listener,
            client: handed.client,
            local: handed.local,
            local_ip: handed.local_ip,
            source: handed.source,
            destination: handed.destination,
            at_ms: ctx.now_ms,
        };
        let mut flow = Flow::new(socket, key, a, handed.header_sent, service, backend, pin);
        flow.set_session(handed.session.as_deref());
        self.flows[slot] = Some(flow);
        Ok(())
    }
}
