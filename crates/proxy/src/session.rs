//! A session: one client socket, one backend socket, two half-duplex pipes, and a phase that
//! carries what the session holds in it. Every shared resource a session holds is a value that
//! gives itself back when dropped (`crate::held`), so a session ends by being dropped.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::held::{Live, Pinned, Place, Reservation, SourceCount};
use crate::pump::{HalfPipe, Io, Pools, Progress, PumpError, Side};
use crate::sessionlog::{End, Record};

/// How long a forwarded reset waits for the kernel to send bytes written before it. A reset
/// discards the socket's send queue (SO_LINGER 0), and data received before an abort must not be
/// lost (FAILURE-MODES F2, Envoy PR #45267).
pub const LINGER_MAX: Duration = Duration::from_secs(2);
/// How often a lingering reset re-checks the send queue.
pub const LINGER_POLL: Duration = Duration::from_millis(5);

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Client,
    Backend,
}

/// Where a session is in its life, and what it holds in that phase.
#[derive(Debug)]
pub enum Phase {
    /// The backend's handshake is under way; the client is not read yet.
    Connecting { deadline: Instant },
    /// Bytes flow both ways (or one way after a half-close).
    Established(Open),
    /// The other side aborted: what it sent is flushed to `survivor`, which then gets a reset.
    Resetting { survivor: Which, until: Instant, open: Open },
}

impl Phase {
    /// For logs: `connecting`, `established`, `resetting`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Connecting { .. } => "connecting",
            Phase::Established(_) => "established",
            Phase::Resetting { .. } => "resetting",
        }
    }

    /// What the session holds of its backend once the handshake is done, if it is.
    pub fn open(&self) -> Option<&Open> {
        match self {
            Phase::Connecting { .. } => None,
            Phase::Established(open) | Phase::Resetting { open, .. } => Some(open),
        }
    }
}

/// What a session holds from its backend's handshake on: held for what each gives back when
/// the session is dropped, never read.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Open {
    /// The backend's open-sessions gauge counts it.
    pub live: Live,
    /// The client's sticky entry counts it (`None`: 5-tuple affinity, or the table was full).
    pub pin: Option<Pinned>,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions saw EOF and were flushed.
    Done,
    /// A reset was forwarded.
    Reset,
    /// Nothing moved for the idle timeout.
    Idle,
    /// No backend could take the client.
    NoBackend,
    /// Shutdown grace period over.
    Shutdown,
    /// Its backend went down or into maintenance under `on-down kill`.
    Killed,
}

/// What driving a session led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for readiness.
    Wait,
    /// Budget spent with work left: drive again soon.
    Yield,
    /// A lingering reset must check the send queue again later.
    Linger,
    /// The session is over.
    Close(CloseReason),
}

/// One proxied TCP connection pair (over `TcpStream`s; over scripted streams in `crate::sim`).
#[derive(Debug)]
pub struct Session<S = mio::net::TcpStream> {
    pub generation: u64,
    pub phase: Phase,
    pub client: Side<S>,
    pub backend: Side<S>,
    pub peer: SocketAddr,
    /// The client's real address: `peer`, or what a trusted proxy's PROXY header said. ACLs,
    /// limits, affinity and the header sent to backends use it.
    pub source: SocketAddr,
    /// The address the client connected to (from the header when a proxy relayed it). On a
    /// wildcard listener it is looked up only when 5-tuple affinity or `send-proxy` needs it.
    pub destination: SocketAddr,
    /// The routing snapshot of the service at accept time: the session's backends, sticky table
    /// and timeouts, whatever later changes publish.
    pub service: std::sync::Arc<crate::Snapshot>,
    /// What admission decided: sticky key, hash, per-source count, backends tried.
    pub admitted: crate::admission::Admitted,
    /// Backend currently connected or being connected to (index in `service.backends`).
    pub target: usize,
    /// A place under `--max-conns`, held from accept.
    pub place: Place,
    /// The per-source limiter's count of this session, if the service limits sources (held
    /// for what it gives back when dropped).
    #[allow(dead_code)]
    pub source_count: Option<SourceCount>,
    /// A place under the target backend's `max-conns`: the attempt's, then the session's.
    pub reservation: Reservation,
    pub c2b: HalfPipe,
    pub b2c: HalfPipe,
    pub last_active: Instant,
    /// A linger timer is armed (at most one at a time).
    pub linger_armed: bool,
    /// The session is in the worker's ready queue (at most once).
    pub queued: bool,
    /// When it was accepted (the session log's duration).
    pub started: Instant,
    /// The side whose end of stream came first, for the session log.
    pub first_eof: Option<Which>,
}

impl<S: Io> Session<S> {
    /// Every change of phase goes through here, so one trace line tells the session's story.
    pub fn set_phase(&mut self, next: Phase) {
        log::trace!(
            "session {} {}: {} => {}",
            self.generation,
            self.peer,
            self.phase.name(),
            next.name()
        );
        self.phase = next;
    }

    /// Established or resetting already: a session aborted on one side starts resetting the
    /// other, keeping what it holds of its backend.
    fn start_resetting(&mut self, survivor: Which, until: Instant) {
        let placeholder = Phase::Connecting { deadline: until };
        match std::mem::replace(&mut self.phase, placeholder) {
            // The rule: only an established session pumps, so only it can see an abort.
            Phase::Established(open) | Phase::Resetting { open, .. } => {
                self.set_phase(Phase::Resetting { survivor, until, open })
            }
            // Unreachable by that rule; kept as it was.
            connecting @ Phase::Connecting { .. } => self.phase = connecting,
        }
    }

    /// Move bytes both ways until both block, and turn errors into resets to forward.
    pub fn drive(&mut self, pools: &mut Pools, now: Instant) -> Drive {
        match self.phase {
            // Not readable or writable until the handshake completes.
            Phase::Connecting { .. } => Drive::Wait,
            // Pump both directions.
            Phase::Established(_) => {
                let before = self.c2b.moved + self.b2c.moved;
                self.c2b.last = self.b2c.shut;
                let up = self.c2b.pump(&mut self.client, &mut self.backend, pools);
                self.b2c.last = self.c2b.shut;
                // After a failure, the other direction is left to `Resetting`: pumped here, a read
                // of the failed socket would say EOF (its error was reported once, by `up`) and
                // turn the abort into a FIN.
                let down = match up {
                    Err(_) => Ok(Progress::Blocked),
                    Ok(_) => self.b2c.pump(&mut self.backend, &mut self.client, pools),
                };
                if self.c2b.moved + self.b2c.moved != before {
                    self.last_active = now;
                }
                if self.first_eof.is_none() {
                    self.first_eof = match (self.c2b.shut, self.b2c.shut) {
                        (true, _) => Some(Which::Client),
                        (false, true) => Some(Which::Backend),
                        _ => None,
                    };
                }
                let dead = match (&up, &down) {
                    // Client unreadable or unwritable: it is gone, the backend survives.
                    (Err(PumpError::Source(e)), _) | (_, Err(PumpError::Destination(e))) => {
                        Some((Which::Backend, e.kind()))
                    }
                    // Backend unreadable or unwritable: the client survives.
                    (Err(PumpError::Destination(e)), _) | (_, Err(PumpError::Source(e))) => {
                        Some((Which::Client, e.kind()))
                    }
                    _ => None,
                };
                if let Some((survivor, kind)) = dead {
                    log::debug!(
                        "session {}: {:?} side failed ({kind:?}); forwarding reset",
                        self.peer,
                        other(survivor)
                    );
                    self.start_resetting(survivor, now + LINGER_MAX);
                    return self.drive(pools, now);
                }
                match (up, down) {
                    (Ok(Progress::Done), Ok(Progress::Done)) => Drive::Close(CloseReason::Done),
                    (Ok(Progress::Yield), _) | (_, Ok(Progress::Yield)) => Drive::Yield,
                    _ => Drive::Wait,
                }
            }
            // Forward what the dead side sent (its socket still holds data received before the
            // reset, and reads return it before the error), wait until the kernel has sent it,
            // then reset the survivor.
            Phase::Resetting { survivor, until, .. } => {
                let (pipe, src, dst) = match survivor {
                    Which::Backend => (&mut self.c2b, &mut self.client, &mut self.backend),
                    Which::Client => (&mut self.b2c, &mut self.backend, &mut self.client),
                };
                pipe.abort = true;
                let drained = match pipe.pump(src, dst, pools) {
                    // The dead side is read to its error: everything it had is forwarded.
                    Err(PumpError::Source(_)) | Ok(Progress::Done) => true,
                    // The survivor died too: nothing left to tell anyone.
                    Err(PumpError::Destination(_)) => return Drive::Close(CloseReason::Reset),
                    Ok(Progress::Yield) => return Drive::Yield,
                    // Not reset after all (a write to it failed, it may still be open): what it
                    // sent so far has been forwarded.
                    Ok(Progress::Blocked) => pipe.pending() == 0,
                };
                if !drained && now < until {
                    // Re-checked on the linger timer: a stuck peer may never send an event.
                    return Drive::Linger;
                }
                if now < until && dst.stream.unsent() > 0 {
                    return Drive::Linger;
                }
                set_reset_on_close(dst);
                Drive::Close(CloseReason::Reset)
            }
        }
    }

    /// Whether both directions ended cleanly with nothing left to write.
    pub fn finished(&self) -> bool {
        self.c2b.shut && self.b2c.shut && self.c2b.pending() == 0 && self.b2c.pending() == 0
    }

    /// How it ended, in the session log's words.
    pub fn end(&self, reason: CloseReason) -> End {
        match reason {
            CloseReason::Done if self.first_eof == Some(Which::Backend) => End::BackendFin,
            CloseReason::Done => End::ClientFin,
            // The survivor is reset after the dead side: the dead side reset first.
            CloseReason::Reset => match &self.phase {
                Phase::Resetting { survivor: Which::Backend, .. } => End::ClientReset,
                _ => End::BackendReset,
            },
            CloseReason::Idle => End::IdleTimeout,
            CloseReason::NoBackend => End::NoBackend,
            CloseReason::Shutdown => End::Grace,
            CloseReason::Killed => End::BackendDown,
        }
    }

    /// Its session log record, as it closes for `reason` at `now`.
    pub fn record(&self, reason: CloseReason, now: Instant) -> Record {
        Record {
            at: std::time::SystemTime::now(),
            udp: false,
            service: Some(std::sync::Arc::clone(&self.service)),
            client: self.source,
            backend: (reason != CloseReason::NoBackend).then_some(self.target),
            bytes_in: self.c2b.moved,
            bytes_out: self.b2c.moved,
            duration: now.saturating_duration_since(self.started),
            end: self.end(reason),
            pinned: self.admitted.pinned,
        }
    }
}

impl Session {
    /// Check a connecting backend socket after an event: `Ok(true)` connected, `Ok(false)`
    /// still connecting, `Err` failed. A connecting socket becomes writable only once the
    /// handshake is over (connect(2), EINPROGRESS), and a failed one also reports an error or
    /// hang-up; so a plain writable event means connected without asking `SO_ERROR`.
    pub fn connect_result(&self, event: &mio::event::Event) -> io::Result<bool> {
        let failed = event.is_error() || event.is_read_closed() || event.is_write_closed();
        if !failed {
            return Ok(event.is_writable());
        }
        match self.backend.stream.take_error()? {
            Some(e) => Err(e),
            // A hang-up without an error: let a read find out what happened.
            None => Ok(true),
        }
    }
}

fn other(w: Which) -> Which {
    match w {
        Which::Client => Which::Backend,
        Which::Backend => Which::Client,
    }
}

/// Close with a reset instead of a FIN (SO_LINGER with a zero timeout, socket(7)).
pub fn set_reset_on_close<S: Io>(side: &Side<S>) {
    side.stream.reset_on_close();
}
