//! A session: one client socket, one backend socket, two half-duplex pipes and a state.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use conntrack::AffinityKey;

use crate::pump::{HalfPipe, Pools, Progress, PumpError, Side};

/// Most backends one client is tried on before it is turned away.
pub const MAX_TRIES: usize = 8;
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

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The backend's handshake is under way; the client is not read yet.
    Connecting { deadline: Instant },
    /// Bytes flow both ways (or one way after a half-close).
    Established,
    /// The other side aborted: what it sent is flushed to `survivor`, which then gets a reset.
    Resetting { survivor: Which, until: Instant },
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

/// Backends already tried for this session.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    ids: [u32; MAX_TRIES],
    len: usize,
}

impl Tried {
    pub fn push(&mut self, id: usize) {
        if self.len < MAX_TRIES {
            self.ids[self.len] = id as u32;
            self.len += 1;
        }
    }

    pub fn contains(&self, id: usize) -> bool {
        self.ids[..self.len].contains(&(id as u32))
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// One proxied TCP connection pair.
#[derive(Debug)]
pub struct Session {
    pub generation: u64,
    pub state: State,
    pub client: Side,
    pub backend: Side,
    pub peer: SocketAddr,
    /// Sticky key (source affinity) or `None` (5-tuple affinity).
    pub key: Option<AffinityKey>,
    /// Hash of the affinity key; the table's fallback order follows it.
    pub hash: u64,
    /// Backend currently connected or being connected to.
    pub target: usize,
    pub tried: Tried,
    /// A sticky entry counts this session as live.
    pub attached: bool,
    /// The target backend's active counter includes this session.
    pub counted: bool,
    pub c2b: HalfPipe,
    pub b2c: HalfPipe,
    pub last_active: Instant,
}

impl Session {
    /// Every change of state goes through here, so one trace line tells the session's story.
    pub fn set_state(&mut self, next: State) {
        log::trace!("session {} {}: {:?} => {:?}", self.generation, self.peer, self.state, next);
        self.state = next;
    }

    /// Move bytes both ways until both block, and turn errors into resets to forward.
    pub fn drive(&mut self, pools: &mut Pools, now: Instant) -> Drive {
        match self.state {
            // Not readable or writable until the handshake completes.
            State::Connecting { .. } => Drive::Wait,
            // Pump both directions.
            State::Established => {
                let before = self.c2b.moved + self.b2c.moved;
                let up = self.c2b.pump(&mut self.client, &mut self.backend, pools);
                let down = self.b2c.pump(&mut self.backend, &mut self.client, pools);
                if self.c2b.moved + self.b2c.moved != before {
                    self.last_active = now;
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
                    self.set_state(State::Resetting { survivor, until: now + LINGER_MAX });
                    return self.drive(pools, now);
                }
                match (up, down) {
                    (Ok(Progress::Done), Ok(Progress::Done)) => Drive::Close(CloseReason::Done),
                    (Ok(Progress::Yield), _) | (_, Ok(Progress::Yield)) => Drive::Yield,
                    _ => Drive::Wait,
                }
            }
            // Flush what the dead side sent, wait for the kernel to send it, then reset.
            State::Resetting { survivor, until } => {
                let (pipe, dst) = match survivor {
                    Which::Backend => (&mut self.c2b, &mut self.backend),
                    Which::Client => (&mut self.b2c, &mut self.client),
                };
                match pipe.flush(dst, pools) {
                    // The survivor died too: nothing left to tell anyone.
                    Err(_) => return Drive::Close(CloseReason::Reset),
                    Ok(false) if dst.writable => return Drive::Yield,
                    // Re-checked on the linger timer: no event may ever come from a stuck peer.
                    Ok(false) if now < until => return Drive::Linger,
                    Ok(_) => {}
                }
                if now < until && unsent(dst) > 0 {
                    return Drive::Linger;
                }
                set_reset_on_close(dst);
                Drive::Close(CloseReason::Reset)
            }
        }
    }

    /// Check a connecting backend socket after an event: `Ok(true)` connected, `Ok(false)` still
    /// in progress, `Err` failed (mio: take_error, then peer_addr).
    pub fn connect_result(&self) -> io::Result<bool> {
        if let Some(e) = self.backend.stream.take_error()? {
            return Err(e);
        }
        match self.backend.stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
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
pub fn set_reset_on_close(side: &Side) {
    let _ = socket2::SockRef::from(&side.stream).set_linger(Some(Duration::ZERO));
}

/// Bytes written to the socket that the kernel has not yet had acknowledged (TIOCOUTQ, tcp(7):
/// "SIOCOUTQ returns the amount of unsent data in the socket send queue").
fn unsent(side: &Side) -> i32 {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points at a live local; the
    // fd is owned by `side.stream` for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(side.stream.as_raw_fd(), nix::libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n
    } else {
        0
    }
}
