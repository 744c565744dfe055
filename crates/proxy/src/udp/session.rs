//! UDP sessions keyed by what the client sends (`--udp-session-key`, issue 17): a keyed
//! flow's session, the moves of a flow to its client's new address, and the steering of each
//! key to one worker. The threat model is in docs/security.md.

use std::net::SocketAddr;

use conntrack::FlowKey;
use mio::net::UdpSocket;

use super::{fold, steer, Arrival, Ctx, Flow, Udp};
use crate::stats::{inc, Stats};
use crate::Snapshot;

/// A keyed flow moves to a new address once that address has sent `--udp-migrate-after`
/// datagrams with its key within this long (and none came from the flow's address meanwhile).
pub const MIGRATE_WINDOW_MS: u64 = 5_000;

/// A keyed flow's session: what it is keyed by, and an address that would take it over.
pub(super) struct Session {
    /// The key's bytes: an upgrade hands them on, and the next process keys the flow by them.
    pub(super) token: Box<[u8]>,
    /// A new address sending the key, until it has sent `--udp-migrate-after` datagrams.
    candidate: Option<Candidate>,
    /// Times the flow moved to a new address.
    pub(super) migrations: u32,
}

/// An address sending a keyed flow's key that is not the flow's client's.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    from: SocketAddr,
    /// Datagrams it sent with the key since `since_ms`.
    seen: u32,
    since_ms: u64,
}

impl Flow {
    /// Key it by session key bytes `token` (`None`: by its client's address). Like every flow
    /// of a keyed service, it is never offloaded (`Udp::offload`).
    pub(super) fn set_session(&mut self, token: Option<&[u8]>) {
        self.session = token.map(|t| Session { token: t.into(), candidate: None, migrations: 0 });
    }
}

impl Udp {
    /// The flow key of session key bytes `token`: their 128-bit SipHash under this process's
    /// secret (a handed-over flow is keyed again under the new process's).
    pub(super) fn session_flow_key(&self, token: &[u8]) -> FlowKey {
        FlowKey::session(vocab::session::digest(token, self.hash_key))
    }

    /// Key the flows of service slot `service` by this session key from now on (its
    /// listeners' groups steer each key to one worker); flows made before keep their keying.
    pub fn set_session_key(
        &mut self,
        service: usize,
        key: Option<vocab::SessionKey>,
        stats: &Stats,
    ) {
        if self.steered.len() <= service {
            self.steered.resize(service + 1, None);
        }
        if self.steered[service] == key {
            return;
        }
        self.steered[service] = key;
        for l in self.listeners.iter().flatten().filter(|l| l.service == service) {
            steer_group(&l.socket, l.local, key, self.workers);
        }
        // The offload program finds flows by address; a keyed service's datagrams must all
        // come up to be looked at by key (`Udp::offload` offloads none of its flows now).
        if let (Some(_), Some(kernel)) = (key, self.kernel.as_mut()) {
            for flow in self.flows.iter_mut().flatten().filter(|f| f.service.slot == service) {
                if let Some(mut o) = flow.offloaded.take() {
                    let reading = kernel.read(&mut o);
                    kernel.remove(&o);
                    fold(flow, &reading, stats);
                }
            }
        }
    }

    /// Whether a datagram of keyed flow `slot` from `a` goes on: it does from the flow's
    /// client, and from a new address once that address has sent `--udp-migrate-after` of
    /// them within [`MIGRATE_WINDOW_MS`] with none from the client between; the flow then
    /// moves to it (replies go there, the backend socket stays). Until then they are dropped
    /// and counted, so one spoofed datagram carrying another's key moves nothing.
    pub(super) fn arrived_from_client(
        &mut self,
        slot: usize,
        a: &Arrival,
        service: &Snapshot,
        ctx: &Ctx<'_>,
    ) -> bool {
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else { return false };
        let Some(session) = flow.session.as_mut() else { return true };
        if flow.client == a.client {
            session.candidate = None; // the client is still there: a candidate starts over
            return true;
        }
        let seen = match &mut session.candidate {
            Some(c)
                if c.from == a.client
                    && ctx.now_ms.saturating_sub(c.since_ms) < MIGRATE_WINDOW_MS =>
            {
                c.seen += 1;
                c.seen
            }
            c => {
                *c = Some(Candidate { from: a.client, seen: 1, since_ms: ctx.now_ms });
                1
            }
        };
        if seen < service.settings.migrate_after {
            inc(&ctx.stats.dropped_migration_pending);
            inc(&ctx.stats.datagrams_dropped);
            return false;
        }
        session.candidate = None;
        if !service.guards.acl.allows(a.source.ip()) {
            inc(&ctx.stats.dropped_denied);
            inc(&ctx.stats.datagrams_dropped);
            return false;
        }
        session.migrations += 1;
        log::info!(
            "udp {}: keyed flow to {} moved from {} to {} ({} datagrams from it)",
            service.name,
            flow.service.backends[flow.backend].name,
            flow.client,
            a.client,
            seen
        );
        flow.client = a.client;
        flow.local = a.local;
        flow.local_ip = a.local_ip;
        flow.listener = a.listener;
        flow.source = a.source;
        flow.destination = a.destination;
        // With --send-proxy, the next datagram carries a header naming the new address: a
        // backend that reads them sees every move, and may check the new path (QUIC's
        // PATH_CHALLENGE, a game's re-authentication) before sending it much.
        flow.header_sent = false;
        inc(&ctx.stats.flow_migrations);
        true
    }
}

/// Steer the `SO_REUSEPORT` group of listener `socket` (at `local`) by session key `key`, or
/// hand it back to the kernel's hash (`None`). A group left unsteered still serves; the key's
/// clients then keep their flow only while their address does, so it is logged loudly.
pub(super) fn steer_group(
    socket: &UdpSocket,
    local: SocketAddr,
    key: Option<vocab::SessionKey>,
    workers: u32,
) {
    let done = match key {
        Some(key) => crate::sys::attach_reuseport_cbpf(socket, &steer::program(key, workers)),
        None => crate::sys::detach_reuseport_bpf(socket),
    };
    if let Err(e) = done {
        log::error!("udp {local}: steering datagrams by session key: {e}");
    }
}
