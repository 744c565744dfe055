//! The routing snapshot workers read: backends, the Maglev table and per-backend live state.
//!
//! The snapshot is immutable apart from atomics (passive-failure marks and counters), shared by
//! every worker behind an `Arc`. A configuration change builds a new snapshot off the hot path;
//! a health change only flips an atomic, so a flapping backend never costs a table rebuild
//! (FAILURE-MODES F16).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ring::{Member, Ring};

/// How long a refused or timed-out connect keeps a backend out of new sessions' choices.
/// Short on purpose: it is a guess from one failure, and a pinned client moves for good once it
/// is re-pinned elsewhere, so a long hold would scatter clients on one transient error.
pub const PASSIVE_HOLD: Duration = Duration::from_secs(2);

/// One backend of the snapshot.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Milliseconds (on the proxy clock) until which the backend counts as failing.
    failing_until: AtomicU64,
    /// Sessions established to this backend and not yet closed.
    pub active: AtomicU64,
    /// Sessions established to this backend since start.
    pub total: AtomicU64,
    /// Connect attempts that were refused or timed out.
    pub connect_failures: AtomicU64,
}

/// Backends plus the table that maps keys to them.
#[derive(Debug)]
pub struct Routing {
    pub backends: Vec<Backend>,
    pub ring: Ring,
}

impl Routing {
    /// Build a snapshot from configured backends.
    pub fn new(
        specs: &[config::BackendSpec],
        table_size: usize,
        seed: u64,
    ) -> Result<Self, ring::BuildError> {
        let members: Vec<Member> =
            specs.iter().map(|b| Member { name: b.name.clone(), weight: b.weight.get() }).collect();
        let ring = Ring::build(&members, table_size, seed)?;
        let backends = specs
            .iter()
            .map(|b| Backend {
                name: b.name.clone(),
                addr: b.addr,
                weight: b.weight.get(),
                failing_until: AtomicU64::new(0),
                active: AtomicU64::new(0),
                total: AtomicU64::new(0),
                connect_failures: AtomicU64::new(0),
            })
            .collect();
        Ok(Routing { backends, ring })
    }

    /// Whether new sessions may be sent to backend `i` at `now_ms`.
    pub fn usable(&self, i: usize, now_ms: u64) -> bool {
        self.backends[i].failing_until.load(Relaxed) <= now_ms
    }

    /// Record a refused or timed-out connect: keep the backend out of choices for a while.
    pub fn mark_failing(&self, i: usize, now_ms: u64) {
        let b = &self.backends[i];
        b.connect_failures.fetch_add(1, Relaxed);
        b.failing_until.fetch_max(now_ms + PASSIVE_HOLD.as_millis() as u64, Relaxed);
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
