//! The data plane: per-core workers on mio that accept TCP clients, pick a backend, and move
//! bytes both ways.
//!
//! This is the only crate that touches sockets on the hot path. It does not parse flags, run
//! health probes, serve the admin API or handle signals: `control` does, and talks to workers
//! through [`Command`]s and a `mio::Waker`.
//!
//! A session's life (see docs/architecture.md for the picture):
//!
//! 1. A worker accepts on its own `SO_REUSEPORT` listener until `WouldBlock`.
//! 2. The affinity key (client IP, or the 5-tuple) is looked up in the service's sticky table;
//!    a pinned backend that may keep its clients wins, otherwise the Maglev table's fallback
//!    order picks (see [`Snapshot::choose`]).
//! 3. A non-blocking connect with a timeout; a refused or timed-out connect marks the backend as
//!    failing for a moment and the next backend of the key's order is tried.
//! 4. Established: two [`pump::HalfPipe`]s move bytes (splice or buffer), with backpressure,
//!    half-close and reset forwarding; the client is pinned to the backend it reached.
//!
//! ```no_run
//! use std::sync::Arc;
//! # fn demo(shared: Arc<tether_proxy::Shared>, listeners: Vec<std::net::TcpListener>) -> std::io::Result<()> {
//! let stats = Arc::new(tether_proxy::Stats::default());
//! let (tx, rx) = crossbeam_channel::unbounded();
//! let listeners = tether_proxy::Listeners { tcp: listeners.into_iter().map(|l| (0, l)).collect(), ..Default::default() };
//! # let services = Vec::new();
//! let (worker, waker) = tether_proxy::Worker::new(0, shared, services, listeners, stats, rx)?;
//! let handle = std::thread::spawn(move || worker.run());
//! tx.send(tether_proxy::Command::Shutdown { deadline: std::time::Instant::now() }).unwrap();
//! waker.wake()?;
//! handle.join().unwrap()?;
//! # Ok(()) }
//! ```

#![deny(unsafe_code)] // syscall wrappers in `sys` only
#![deny(clippy::unwrap_used)] // traffic never panics the process (allowed in tests)

pub mod admission;
mod held;
mod listener;
pub mod outgoing;
pub mod pump;
mod routing;
mod session;
pub mod sessionlog;
#[cfg(test)]
mod sim;
pub mod stats;
mod sys;
mod tcp;
#[cfg(test)]
mod tcp_sim;
mod timer;
mod token;
mod udp;
pub mod udp_socket;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

pub use listener::{bind, bind_all, BindError, Bound};
pub use routing::{BackendState, Guards, ProxyRules, Settings, Snapshot, PASSIVE_HOLD};
pub use stats::{Counts, Stats, STALLED_AFTER};
pub use sys::{inherited_fd, recv_with_fds, send_with_fds, MAX_FDS};
pub use udp::{socket_id, FlowView, HandedFlow};
pub use worker::Worker;

/// Listener sockets handed to one worker, each with the slot of the service it feeds, and the
/// UDP flows an upgrade handed over that arrive on its UDP sockets.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Vec<(usize, std::net::TcpListener)>,
    pub udp: Vec<(usize, std::net::UdpSocket)>,
    pub flows: Vec<HandedFlow>,
}

/// What control tells a worker.
#[derive(Debug)]
pub enum Command {
    /// Stop accepting now; let sessions run until `deadline`, then close them and return.
    Shutdown { deadline: Instant },
    /// Route new sessions and flows of service `service.slot` by this snapshot from now on.
    Publish(Arc<Snapshot>),
    /// Start accepting on these sockets too.
    Listen(Listeners),
    /// Stop accepting on these (address, is-UDP) listeners: close the sockets. Open sessions
    /// continue; UDP flows that came in on a closed socket end (their replies had no way out).
    /// Sent before any `Listen` of the same change, so new sockets on the same address are
    /// never caught by it.
    Unlisten(Vec<(SocketAddr, bool)>),
    /// End every open session (with a reset) and flow of the backend with this id: it went
    /// down or into maintenance and its service says `on-down kill`.
    Kill(conntrack::BackendId),
    /// Stop reading every UDP socket and send a copy of each flow's socket, with what another
    /// process needs to carry the flow on (an upgrade). The flows stay, unread, until
    /// `ResumeUdp` or shutdown.
    PauseUdp(crossbeam_channel::Sender<Vec<HandedFlow>>),
    /// Read the UDP sockets again (the upgrade failed).
    ResumeUdp,
    /// Describe the worker's UDP flows (of clients with this IP, if given; `limit` at most).
    Flows {
        client: Option<std::net::IpAddr>,
        limit: usize,
        reply: crossbeam_channel::Sender<Vec<FlowView>>,
    },
    /// Answer once every command sent before has been carried out (commands are taken in
    /// order): a reload's new snapshots are in force, and flows they deny are gone.
    Sync(crossbeam_channel::Sender<()>),
}

/// State every worker of a process shares (read-only apart from atomics).
#[derive(Debug)]
pub struct Shared {
    /// Sessions allowed open at once across all workers.
    pub max_conns: usize,
    /// Pipes each worker may hold for splice(2) (0: userspace buffers only).
    pub max_pipes: usize,
    /// Sessions open now across all workers.
    pub active: AtomicUsize,
    /// Origin of the millisecond clock the sticky table runs on.
    pub epoch: Instant,
    /// UDP flows allowed open at once across all workers.
    pub flow_budget: Arc<conntrack::FlowBudget>,
    /// SipHash key of the flow tables (random per process).
    pub flow_hash_key: [u8; 16],
    /// The UDP offload program and its map, when `--udp-offload` is on: each worker takes a
    /// handle on the map and hands its established flows to the program.
    pub offload: Option<offload::Offload>,
    /// The session log (`--log-sessions`), when on: set before the `Shared` is shared.
    pub session_log: Option<Arc<sessionlog::SessionLog>>,
    /// Workers, each with its own `SO_REUSEPORT` socket of every UDP listen address: the
    /// size of the groups a session key's steering program picks among (set before sharing).
    pub workers: usize,
}

impl Shared {
    /// Nothing open yet; the clock starts now.
    pub fn new(
        max_conns: usize,
        max_pipes: usize,
        max_flows: usize,
        flow_hash_key: [u8; 16],
        offload: Option<offload::Offload>,
    ) -> Shared {
        Shared {
            max_conns,
            max_pipes,
            active: AtomicUsize::new(0),
            epoch: Instant::now(),
            flow_budget: Arc::new(conntrack::FlowBudget::new(max_flows)),
            flow_hash_key,
            offload,
            session_log: None,
            workers: 1,
        }
    }

    /// Milliseconds since `epoch`: the clock handed to the pure crates.
    pub fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The same clock for a caller without an `Instant` at hand.
    pub fn clock_ms(&self) -> u64 {
        self.now_ms(Instant::now())
    }
}
