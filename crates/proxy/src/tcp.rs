//! The TCP side of a worker: its listeners, the connections of trusted proxies that have not
//! sent their whole PROXY header yet, and the sessions, with the timers that bound every one of
//! them. `crate::udp` is its UDP counterpart; the worker owns one of each and dispatches.
//!
//! A client's path: accepted (a [`Place`] under `--max-conns`), maybe held until its PROXY
//! header arrives, admitted (`crate::admission`: rules, limits, affinity, backend), connected
//! to the first backend of its order that takes the connect (a [`Reservation`] per attempt),
//! established (the backend's [`Live`] gauge and the sticky entry's [`Pinned`] count), pumped,
//! and dropped. Every refusal resets the client and is counted by reason.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll};

use conntrack::Attach;

use crate::admission::{admit, Admitted, ConnectError, Transport};
use crate::held::{Live, Pinned, Place, Reservation, SourceCount};
use crate::outgoing::Sources;
use crate::pump::{HalfPipe, Pools, Side};
use crate::session::{
    set_reset_on_close, CloseReason, Drive, Open, Phase, Session, Which, LINGER_POLL,
};
use crate::sessionlog::{End, Record};
use crate::stats::{inc, ports_exhausted, Stats};
use crate::timer::{Timer, TimerKind, Timers};
use crate::token::Slot;
use crate::{Shared, Snapshot};

/// Connections accepted from one listener before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Wait before accepting again after accept(2) failed for lack of fds or memory (nginx waits
/// 500 ms; shorter here because sessions close quickly under the loads tether sees).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Largest PROXY header read (the parser refuses longer ones).
const PROXY_HEADER_MAX: usize = proxyproto::MAX_HEADER_LEN;

/// What one call needs from the worker around it.
pub struct Ctx<'a> {
    pub poll: &'a Poll,
    /// Routing snapshots by service slot.
    pub services: &'a [Option<Arc<Snapshot>>],
    pub stats: &'a Stats,
    pub shared: &'a Arc<Shared>,
    /// The time of this loop turn.
    pub now: Instant,
}

impl Ctx<'_> {
    fn now_ms(&self) -> u64 {
        self.shared.now_ms(self.now)
    }
}

/// Work to resume without waiting for an event (its readiness is already known).
#[derive(Debug, Clone, Copy)]
enum Ready {
    Listener(usize),
    Session { slot: usize, generation: u64 },
}

/// A connection from a trusted proxy that has not yet sent its PROXY header: no backend and no
/// session yet, only a deadline and its place under `--max-conns`.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<Snapshot>,
    generation: u64,
    place: Place,
}

/// Why a connect in progress failed.
#[derive(Debug)]
enum ConnectFailure {
    /// No answer within the connect timeout: the backend is blamed.
    TimedOut,
    /// The handshake failed (`SO_ERROR`).
    Error(ConnectError),
}

/// All TCP state of one worker.
pub struct Tcp {
    /// The worker's number, for logs.
    id: usize,
    /// Listeners and the service slot each feeds.
    listeners: Vec<Option<(TcpListener, usize)>>,
    /// Per listener: its bound address, `None` for a wildcard one (0.0.0.0, [::]), whose
    /// connections each learn theirs from getsockname(2) when it is needed.
    listener_addrs: Vec<Option<SocketAddr>>,
    /// Per listener: an accept retry is armed after accept(2) failed for lack of resources;
    /// events are ignored until it fires (one retry chain, not one per event).
    backing_off: Vec<bool>,
    /// Pauses of accepting in a row for lack of fds or memory, until a session gets its
    /// backend socket again (logged when they start and when they end).
    starved: u32,
    /// Local addresses backend connects go out from, in turn.
    sources: Sources,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    pending: Vec<Option<Pending>>,
    pending_free: Vec<usize>,
    timers: Timers,
    ready: VecDeque<Ready>,
    pools: Pools,
    next_generation: u64,
}

impl Tcp {
    pub fn new(id: usize, max_pipes: usize) -> Tcp {
        Tcp {
            id,
            listeners: Vec::new(),
            listener_addrs: Vec::new(),
            backing_off: Vec::new(),
            starved: 0,
            sources: Sources::default(),
            sessions: Vec::new(),
            free: Vec::new(),
            pending: Vec::new(),
            pending_free: Vec::new(),
            timers: Timers::default(),
            ready: VecDeque::new(),
            pools: Pools::new(max_pipes),
            next_generation: 0,
        }
    }

    /// Sessions open now.
    pub fn live(&self) -> usize {
        self.sessions.len() - self.free.len()
    }

    /// The open sessions (the simulation checks what they hold).
    #[cfg(test)]
    pub(crate) fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.iter().flatten()
    }

    /// The earliest time something here must happen without an event: now, when work is
    /// queued, else the next timer.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.ready.is_empty() {
            self.timers.next()
        } else {
            Some(now)
        }
    }

    // === listeners ===

    /// Wait on these listeners too, each for its service slot.
    pub fn listen(
        &mut self,
        listeners: Vec<(usize, std::net::TcpListener)>,
        ctx: &Ctx<'_>,
    ) -> io::Result<()> {
        for (service, l) in listeners {
            let bound = l.local_addr().ok().filter(|a| !a.ip().is_unspecified());
            let l = TcpListener::from_std(l);
            let i = self.listeners.len();
            crate::sys::register_exclusive(ctx.poll, &l, Slot::Listener(i).token())?;
            self.listener_addrs.push(bound);
            self.listeners.push(Some((l, service)));
            self.backing_off.push(false);
        }
        Ok(())
    }

    /// Close the listeners bound to any of the TCP addresses of `addrs`.
    pub fn unlisten(&mut self, addrs: &[(SocketAddr, bool)], ctx: &Ctx<'_>) {
        for i in 0..self.listeners.len() {
            let bound = self.listeners[i].as_ref().and_then(|(l, _)| l.local_addr().ok());
            let Some(addr) = bound.filter(|&a| addrs.contains(&(a, false))) else { continue };
            let taken = self.close_listener(i, ctx);
            log::info!(
                "worker {}: closed listener {addr} ({taken} queued clients taken first)",
                self.id
            );
        }
    }

    /// Stop accepting (shutdown, or handed over by an upgrade): every listener closes, its
    /// queued clients taken first.
    pub fn close_listeners(&mut self, ctx: &Ctx<'_>) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].is_some() {
                let taken = self.close_listener(i, ctx);
                log::debug!(
                    "worker {} closed listener {i} ({taken} queued clients taken first)",
                    self.id
                );
            }
        }
    }

    /// Close listener `i`. Clients already in its queue are served rather than reset by the
    /// close (F11; at a restart they used to be reset, chaos suite): what arrives between
    /// this and the close is not. Returns how many were taken.
    fn close_listener(&mut self, i: usize, ctx: &Ctx<'_>) -> usize {
        let Some((l, service)) = self.listeners[i].take() else { return 0 };
        crate::sys::deregister(ctx.poll, &l);
        let mut taken = 0;
        for _ in 0..crate::listener::BACKLOG {
            match l.accept() {
                Ok((stream, peer)) => {
                    taken += 1;
                    self.take_client(stream, peer, i, service, ctx);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || is_resource_error(&e) => break,
                Err(_) => {} // that one connection only (aborted, interrupted)
            }
        }
        taken
    }

    // === accepting ===

    /// Accept on listener `i` until it would block or the budget is spent.
    pub fn accept(&mut self, i: usize, ctx: &Ctx<'_>) {
        if self.backing_off.get(i).copied().unwrap_or(true) {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            // A connect may have run out of fds meanwhile and paused accepting.
            if self.backing_off[i] {
                return;
            }
            let Some((listener, service)) = self.listeners.get(i).and_then(Option::as_ref) else {
                return;
            };
            let service = *service;
            match listener.accept() {
                Ok((stream, peer)) => self.take_client(stream, peer, i, service, ctx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_resource_error(&e) => {
                    // EMFILE/ENFILE: the connection stays in the backlog and, edge-triggered, no
                    // new event comes for it; retry on a timer rather than spin or stall (F3).
                    inc(&ctx.stats.accept_errors);
                    self.pause_accepting(i, &format_args!("accept failed: {e}"), ctx);
                    return;
                }
                // ECONNABORTED and the like concern one connection only.
                Err(e) => {
                    inc(&ctx.stats.accept_errors);
                    log::debug!("accept: {e}");
                }
            }
        }
        self.ready.push_back(Ready::Listener(i));
    }

    /// Stop accepting on listener `i` for [`ACCEPT_BACKOFF`]: this worker is out of fds or
    /// memory. New clients wait in the backlog meanwhile, where the kernel holds them for
    /// free, instead of being accepted only to be reset. `why` is logged once per shortage.
    fn pause_accepting(&mut self, i: usize, why: &dyn std::fmt::Display, ctx: &Ctx<'_>) {
        let open = matches!(self.listeners.get(i), Some(Some(_)));
        if !open || self.backing_off.get(i).copied().unwrap_or(true) {
            return;
        }
        if self.starved == 0 {
            log::warn!("{why}; accepting paused, retried every {ACCEPT_BACKOFF:?}");
        }
        self.starved = self.starved.saturating_add(1);
        let at = ctx.now + ACCEPT_BACKOFF;
        self.timers.arm(Timer { at, kind: TimerKind::Accept, slot: i, generation: 0 });
        self.backing_off[i] = true;
    }

    /// A client accepted on listener `i`, of service slot `service`.
    fn take_client(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        i: usize,
        service: usize,
        ctx: &Ctx<'_>,
    ) {
        inc(&ctx.stats.accepted);
        let Some(service) = ctx.services.get(service).and_then(Option::as_ref) else {
            inc(&ctx.stats.no_backend);
            return refuse(stream);
        };
        let Some(place) = Place::take(ctx.shared) else {
            inc(&ctx.stats.refused_max_conns);
            log_refusal(ctx, service, peer, End::Limited);
            return refuse(stream);
        };
        let service = Arc::clone(service);
        // TCP_NODELAY is inherited from the listener (set there once, see listener.rs).
        let rules = &service.guards.proxy;
        if rules.accept && rules.trusted.allows(peer.ip()) {
            return self.await_header(stream, peer, service, place, ctx);
        }
        // The address the client connected to: the listener's, unless it is a wildcard one;
        // then getsockname(2), but only when something needs it (5-tuple affinity, PROXY
        // headers).
        let needed = service.settings.affinity == vocab::Affinity::FiveTuple
            || service.guards.proxy.send.is_some();
        let destination = match self.listener_addrs.get(i).copied().flatten() {
            Some(addr) => addr,
            None if needed => stream.local_addr().unwrap_or(peer),
            None => peer,
        };
        self.route(stream, peer, (peer, destination), service, place, ctx);
    }

    // === PROXY headers from trusted proxies ===

    /// Hold a trusted proxy's connection until its header has come, for at most the header
    /// timeout. Registering reports data already there, so nothing is missed.
    fn await_header(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        service: Arc<Snapshot>,
        place: Place,
        ctx: &Ctx<'_>,
    ) {
        let n = self.pending_free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        let token = Slot::Pending(n).token();
        if let Err(e) = ctx.poll.registry().register(&mut stream, token, Interest::READABLE) {
            log::warn!("register the connection of {peer}: {e}");
            self.pending_free.push(n);
            inc(&ctx.stats.local_errors);
            return turn_away(stream, place, &ctx.stats.refused_local);
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let at = ctx.now + service.guards.proxy.header_timeout;
        self.timers.arm(Timer { at, kind: TimerKind::Header, slot: n, generation });
        self.pending[n] = Some(Pending { stream, peer, service, generation, place });
    }

    /// Bytes arrived on a pending connection: look at them without taking them (MSG_PEEK), and
    /// once a whole header is there take exactly the header and route the real client. The
    /// bytes after it stay in the socket for the session's pump.
    pub fn header_event(&mut self, n: usize, ctx: &Ctx<'_>) {
        let Some(p) = self.pending.get(n).and_then(Option::as_ref) else { return };
        let mut buf = [0u8; PROXY_HEADER_MAX];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&p.stream);
        let got = match nix::sys::socket::recv(fd, &mut buf, flags) {
            Ok(0) => return self.drop_pending(n, None, ctx), // gone before saying anything
            Ok(got) => got,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return,
            Err(e) => return self.drop_pending(n, Some(&format!("{e}")), ctx),
        };
        let (consumed, source, destination) = match proxyproto::parse(&buf[..got]) {
            Ok(proxyproto::Parsed::Complete { header, consumed }) => {
                let local = p.stream.local_addr().unwrap_or(p.peer);
                match header {
                    proxyproto::Header::Proxy { source, destination, .. } => {
                        (consumed, source, destination)
                    }
                    // LOCAL (the proxy's own check) or an unusable family: the connection's
                    // own addresses, as the spec says.
                    _ => (consumed, p.peer, local),
                }
            }
            Ok(proxyproto::Parsed::Incomplete { .. }) if got < buf.len() => return,
            Ok(proxyproto::Parsed::Incomplete { .. }) => {
                let why = "header longer than the largest accepted";
                return self.drop_pending(n, Some(why), ctx);
            }
            Err(e) => return self.drop_pending(n, Some(&e.to_string()), ctx),
        };
        // Take the header off the socket: exactly the bytes just parsed.
        let mut sink = [0u8; PROXY_HEADER_MAX];
        let plain = nix::sys::socket::MsgFlags::empty();
        match nix::sys::socket::recv(fd, &mut sink[..consumed], plain) {
            Ok(taken) if taken == consumed => {}
            other => {
                let why = format!("reading the header: {other:?}");
                return self.drop_pending(n, Some(&why), ctx);
            }
        }
        let Some(mut p) = self.pending[n].take() else { return };
        self.pending_free.push(n);
        // It leaves the poll as a pending connection; the session registers it anew.
        let _ = ctx.poll.registry().deregister(&mut p.stream);
        self.route(p.stream, p.peer, (source, destination), p.service, p.place, ctx);
    }

    /// Give up on a pending connection: `why` is a header error (counted, logged), `None` a
    /// connection that closed first. It is reset and its place under --max-conns freed.
    fn drop_pending(&mut self, n: usize, why: Option<&str>, ctx: &Ctx<'_>) {
        let Some(p) = self.pending.get_mut(n).and_then(Option::take) else { return };
        self.pending_free.push(n);
        if let Some(why) = why {
            inc(&ctx.stats.proxy_header_errors);
            log::debug!("PROXY header from {}: {why}", p.peer);
        }
        refuse(p.stream);
    }

    // === admission and connecting ===

    /// Admit a client whose real address and destination are `(source, destination)` (the
    /// peer's own, or what a trusted proxy's header said) and start connecting it to a backend.
    /// Every refusal resets the client and is counted by reason; its place goes with it.
    fn route(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        (source, destination): (SocketAddr, SocketAddr),
        service: Arc<Snapshot>,
        place: Place,
        ctx: &Ctx<'_>,
    ) {
        let now_ms = ctx.now_ms();
        let mut admitted = match admit(&service, Transport::Tcp, source, destination, now_ms) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                log_refusal(ctx, &service, source, refusal.end());
                return turn_away(stream, place, refusal.counter(Transport::Tcp, ctx.stats));
            }
        };
        let source_count = match (&service.guards.limiter, admitted.limited) {
            (Some(limiter), true) => {
                let clock = Arc::clone(place.shared());
                Some(SourceCount::new(Arc::clone(limiter), admitted.limit_ip, clock))
            }
            _ => None,
        };
        let Some((target, reservation, backend)) = self.begin_connect(&service, &mut admitted, ctx)
        else {
            log_refusal(ctx, &service, source, End::NoBackend);
            return turn_away(stream, place, &ctx.stats.no_backend);
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.sessions.push(None);
            self.sessions.len() - 1
        });
        self.next_generation += 1;
        let deadline = ctx.now + service.settings.connect_timeout;
        let mut session = Session {
            generation: self.next_generation,
            phase: Phase::Connecting { deadline },
            client: Side::new(stream),
            backend: Side::new(backend),
            peer,
            source,
            destination,
            service,
            admitted,
            target,
            place,
            source_count,
            reservation,
            c2b: HalfPipe::new("client->backend"),
            b2c: HalfPipe::new("backend->client"),
            last_active: ctx.now,
            linger_armed: false,
            queued: false,
            started: ctx.now,
            first_eof: None,
        };
        if let Err(e) = register_session(ctx.poll, &mut session, slot) {
            // This host's trouble (epoll out of memory): the client is reset and counted like
            // every other refusal, and no backend is blamed.
            log::warn!("register session of {peer}: {e}");
            let registry = ctx.poll.registry();
            let _ = registry.deregister(&mut session.client.stream);
            let _ = registry.deregister(&mut session.backend.stream);
            self.free.push(slot);
            inc(&ctx.stats.local_errors);
            let Session { client, place, .. } = session;
            return turn_away(client.stream, place, &ctx.stats.refused_local);
        }
        let generation = session.generation;
        self.timers.arm(Timer { at: deadline, kind: TimerKind::Connect, slot, generation });
        let at = ctx.now + session.service.settings.idle_timeout;
        self.timers.arm(Timer { at, kind: TimerKind::Idle, slot, generation });
        self.sessions[slot] = Some(session);
    }

    /// Start a non-blocking connect to the next backend of the client's order, and to the
    /// ones after it while even starting one fails. Returns the backend, its place under its
    /// `max-conns`, and its connecting socket.
    fn begin_connect(
        &mut self,
        service: &Snapshot,
        admitted: &mut Admitted,
        ctx: &Ctx<'_>,
    ) -> Option<(usize, Reservation, TcpStream)> {
        let now_ms = ctx.now_ms();
        while let Some(t) = admitted.next(service, now_ms) {
            let backend = &service.backends[t];
            let Some(reservation) = Reservation::take(backend) else {
                inc(&ctx.stats.backend_full);
                continue;
            };
            let addr = backend.addr;
            let e = match self.sources.tcp(addr, &service.settings.connect_from, service.slot) {
                Ok(stream) => {
                    if self.starved > 0 {
                        log::warn!("fds are back after {} accept pauses", self.starved);
                        self.starved = 0;
                    }
                    // Set before the handshake, so it costs no extra call later.
                    let _ = stream.set_nodelay(true);
                    return Some((t, reservation, stream));
                }
                Err(e) => ConnectError::new(e),
            };
            drop(reservation);
            match &e {
                // Out of fds or memory here: no other backend would do better, none is to
                // blame, and accepting more now would only reset more clients (F3): let them
                // wait in the backlog until fds come back.
                ConnectError::Local(_) => {
                    inc(&ctx.stats.local_errors);
                    for i in 0..self.listeners.len() {
                        self.pause_accepting(i, &format_args!("connect to {addr}: {e}"), ctx);
                    }
                    return None;
                }
                // No port left toward this backend from any local address (F13): another
                // backend may have some, and this one is not to blame.
                ConnectError::NoPort(io) => ports_exhausted(ctx.stats, addr, io),
                ConnectError::Backend(_) | ConnectError::Attempt(_) => {
                    log::debug!("connect to {addr} failed at once: {e}");
                    if e.blames_backend() {
                        backend.mark_failing(now_ms);
                    }
                    inc(&ctx.stats.connect_failures);
                }
            }
        }
        None
    }

    /// The connect in progress failed or timed out: mark the backend and try the next one.
    fn connect_failed(&mut self, slot: usize, failure: ConnectFailure, ctx: &Ctx<'_>) {
        let now_ms = ctx.now_ms();
        let Some(mut s) = self.sessions[slot].take() else { return };
        let service = Arc::clone(&s.service);
        let (blame, counter) = match &failure {
            ConnectFailure::TimedOut => (true, &ctx.stats.connect_timeouts),
            ConnectFailure::Error(e) => (e.blames_backend(), &ctx.stats.connect_failures),
        };
        inc(counter);
        if blame {
            service.backends[s.target].mark_failing(now_ms);
        }
        match self.begin_connect(&service, &mut s.admitted, ctx) {
            Some((target, reservation, mut stream)) => {
                inc(&ctx.stats.retries);
                let token = Slot::Backend(slot).token();
                let both = Interest::READABLE | Interest::WRITABLE;
                let registered = ctx.poll.registry().register(&mut stream, token, both);
                // The failed attempt's place under its backend's max-conns goes back here.
                s.target = target;
                s.reservation = reservation;
                s.backend = Side::new(stream);
                if let Err(e) = registered {
                    // This host's trouble (epoll out of memory): no backend is to blame.
                    log::warn!("register backend socket: {e}");
                    inc(&ctx.stats.local_errors);
                    set_reset_on_close(&s.client);
                    self.sessions[slot] = Some(s);
                    return self.close(slot, CloseReason::NoBackend, ctx);
                }
                let deadline = ctx.now + service.settings.connect_timeout;
                s.set_phase(Phase::Connecting { deadline });
                let generation = s.generation;
                self.timers.arm(Timer { at: deadline, kind: TimerKind::Connect, slot, generation });
                self.sessions[slot] = Some(s);
            }
            None => {
                inc(&ctx.stats.no_backend);
                set_reset_on_close(&s.client);
                self.sessions[slot] = Some(s);
                self.close(slot, CloseReason::NoBackend, ctx);
            }
        }
    }

    /// The backend's handshake completed: send the PROXY header if one is due, count the
    /// session on its backend, pin the client to the backend it reached, start pumping.
    fn established(&mut self, slot: usize, ctx: &Ctx<'_>) {
        let Some(s) = self.sessions[slot].as_mut() else { return };
        // The PROXY header goes first, before any byte of the client's (which is not read
        // until now). The socket's send buffer is empty: a short write means it is broken.
        if let Some(version) = s.service.guards.proxy.send {
            let mut header = [0u8; 108];
            let n = encode_proxy_header(version, s.source, s.destination, &mut header);
            match (&s.backend.stream).write(&header[..n]) {
                Ok(written) if written == n => inc(&ctx.stats.proxy_headers_sent),
                result => {
                    log::debug!("PROXY header to the backend of {}: {result:?}", s.source);
                    return self.close(slot, CloseReason::Reset, ctx);
                }
            }
        }
        inc(&ctx.stats.established);
        let backend = &s.service.backends[s.target];
        let live = Live::new(backend);
        // Pin the client to the backend it actually reached (re-pins after a failover).
        let pin = s.admitted.key.and_then(|key| {
            match s.service.sticky.attach(key, backend.id, ctx.now_ms()) {
                Attach::Full => {
                    inc(&ctx.stats.sticky_full);
                    None
                }
                Attach::Pinned | Attach::Repinned { .. } => {
                    let clock = Arc::clone(s.place.shared());
                    Some(Pinned::new(Arc::clone(&s.service.sticky), key, clock))
                }
            }
        });
        s.set_phase(Phase::Established(Open { live, pin }));
        s.last_active = ctx.now;
        // Readiness seen while connecting was not acted on; assume both sides may be ready.
        s.client.readable = true;
        s.client.writable = true;
        self.drive(slot, ctx);
    }

    // === established ===

    /// Readiness on one socket of the session in `slot`.
    pub fn session_event(
        &mut self,
        slot: usize,
        which: Which,
        event: &mio::event::Event,
        ctx: &Ctx<'_>,
    ) {
        let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) else { return };
        // Errors and hang-ups are found out by the next read or write (F4).
        let failed = event.is_error() || event.is_read_closed() || event.is_write_closed();
        let side = match which {
            Which::Client => &mut s.client,
            Which::Backend => &mut s.backend,
        };
        side.readable |= event.is_readable() || failed;
        side.writable |= event.is_writable() || failed;
        side.hung_up |= failed;
        if let (Phase::Connecting { .. }, Which::Backend) = (&s.phase, which) {
            match s.connect_result(event) {
                Ok(false) => {}
                Ok(true) => self.established(slot, ctx),
                Err(e) => {
                    let addr = s.service.backends[s.target].addr;
                    log::debug!("connect to {addr} failed: {e}");
                    let failure = ConnectFailure::Error(ConnectError::new(e));
                    self.connect_failed(slot, failure, ctx);
                }
            }
            return;
        }
        self.drive(slot, ctx);
    }

    fn drive(&mut self, slot: usize, ctx: &Ctx<'_>) {
        let Some(s) = self.sessions[slot].as_mut() else { return };
        let (in_before, out_before) = (s.c2b.moved, s.b2c.moved);
        let result = s.drive(&mut self.pools, ctx.now);
        let (moved_in, moved_out) = (s.c2b.moved - in_before, s.b2c.moved - out_before);
        if moved_in > 0 {
            add(&ctx.stats.bytes_in, moved_in);
            add(&s.service.backends[s.target].bytes_in, moved_in);
        }
        if moved_out > 0 {
            add(&ctx.stats.bytes_out, moved_out);
            add(&s.service.backends[s.target].bytes_out, moved_out);
        }
        let generation = s.generation;
        match result {
            Drive::Wait => {}
            Drive::Yield => {
                if !std::mem::replace(&mut s.queued, true) {
                    self.ready.push_back(Ready::Session { slot, generation });
                }
            }
            Drive::Linger => {
                if !std::mem::replace(&mut s.linger_armed, true) {
                    let at = ctx.now + LINGER_POLL;
                    self.timers.arm(Timer { at, kind: TimerKind::Linger, slot, generation });
                }
            }
            Drive::Close(reason) => {
                if reason == CloseReason::Reset {
                    inc(&ctx.stats.resets);
                }
                self.close(slot, reason, ctx);
            }
        }
    }

    /// Reset the established sessions of backend `id` (`on-down kill`); sessions still
    /// connecting to it are left to their connect, which fails over. Returns how many.
    pub fn kill(&mut self, id: conntrack::BackendId, ctx: &Ctx<'_>) -> usize {
        let mut n = 0;
        for slot in 0..self.sessions.len() {
            let Some(s) = self.sessions[slot].as_ref() else { continue };
            if s.phase.open().is_some() && s.service.backends[s.target].id == id {
                // `close` resets both sides: the session is cut, not finished.
                inc(&ctx.stats.killed);
                self.close(slot, CloseReason::Killed, ctx);
                n += 1;
            }
        }
        n
    }

    // === the work that waits for no event ===

    /// Resume what was queued: listeners with clients left, sessions with bytes left.
    pub fn resume(&mut self, ctx: &Ctx<'_>) {
        for _ in 0..self.ready.len() {
            match self.ready.pop_front() {
                Some(Ready::Listener(i)) => self.accept(i, ctx),
                Some(Ready::Session { slot, generation }) => {
                    if self.generation_at(slot) == Some(generation) {
                        if let Some(s) = self.sessions[slot].as_mut() {
                            s.queued = false;
                        }
                        self.drive(slot, ctx);
                    }
                }
                None => break,
            }
        }
    }

    /// Fire the timers that are due.
    pub fn fire_timers(&mut self, ctx: &Ctx<'_>) {
        while let Some(t) = self.timers.pop_due(ctx.now) {
            match t.kind {
                // Accept again after a pause.
                TimerKind::Accept => {
                    if let Some(b) = self.backing_off.get_mut(t.slot) {
                        *b = false;
                    }
                    self.accept(t.slot, ctx);
                }
                // A pending connection still without its header.
                TimerKind::Header => {
                    let waiting = self.pending.get(t.slot).and_then(Option::as_ref);
                    if waiting.is_some_and(|p| p.generation == t.generation) {
                        let why = "no complete header before the timeout";
                        self.drop_pending(t.slot, Some(why), ctx);
                    }
                }
                // The session that armed it may be gone: then it is stale.
                TimerKind::Connect | TimerKind::Idle | TimerKind::Linger => {
                    if self.generation_at(t.slot) == Some(t.generation) {
                        self.session_timer(t, ctx);
                    }
                }
            }
        }
    }

    /// A session's own timer `t` fired.
    fn session_timer(&mut self, t: Timer, ctx: &Ctx<'_>) {
        let Some(s) = self.sessions[t.slot].as_mut() else { return };
        match (t.kind, &s.phase) {
            // Still waiting on the attempt that armed this timer.
            (TimerKind::Connect, Phase::Connecting { deadline }) if *deadline == t.at => {
                log::debug!("connect to {} timed out", s.service.backends[s.target].addr);
                self.connect_failed(t.slot, ConnectFailure::TimedOut, ctx);
            }
            // An earlier attempt's, or the session connected since.
            (TimerKind::Connect, _) => {}
            // Idle means no byte either way since last_active; otherwise re-arm.
            (TimerKind::Idle, _) => {
                let due = s.last_active + s.service.settings.idle_timeout;
                if due <= ctx.now {
                    inc(&ctx.stats.idle_timeouts);
                    self.close(t.slot, CloseReason::Idle, ctx);
                } else {
                    self.timers.arm(Timer { at: due, ..t });
                }
            }
            // A lingering reset checks the send queue again.
            (TimerKind::Linger, _) => {
                s.linger_armed = false;
                self.drive(t.slot, ctx);
            }
            // Not a session's.
            (TimerKind::Accept | TimerKind::Header, _) => {}
        }
    }

    // === closing ===

    fn generation_at(&self, slot: usize) -> Option<u64> {
        self.sessions.get(slot).and_then(Option::as_ref).map(|s| s.generation)
    }

    /// End the session in `slot`. What it held gives itself back as it is dropped.
    fn close(&mut self, slot: usize, reason: CloseReason, ctx: &Ctx<'_>) {
        let Some(mut s) = self.sessions.get_mut(slot).and_then(Option::take) else { return };
        if let Some(log) = &ctx.shared.session_log {
            log.log(s.record(reason, ctx.now));
        }
        log::debug!(
            "session {} closed: {reason:?} ({} in, {} out)",
            s.peer,
            s.c2b.moved,
            s.b2c.moved
        );
        // Cut short (idle, shutdown, no backend) with anything unfinished: reset both sides, so
        // neither mistakes the cut for the end of the stream (a FIN would truncate silently).
        if reason != CloseReason::Done && !s.finished() {
            set_reset_on_close(&s.client);
            set_reset_on_close(&s.backend);
        }
        // The pipes go back to this worker's pool.
        s.c2b.release(&mut self.pools);
        s.b2c.release(&mut self.pools);
        // No deregister: closing the last fd of a socket removes it from the epoll interest
        // list (epoll(7)), and a session's sockets are never duplicated. Saves two syscalls.
        drop(s);
        inc(&ctx.stats.closed);
        self.free.push(slot);
        self.compact_timers();
    }

    /// Drop timers of closed sessions once they outnumber the live ones: an idle timer waits
    /// the whole idle timeout (an hour by default) after its session is gone, and at thousands
    /// of sessions a second the heap would otherwise grow by millions.
    fn compact_timers(&mut self) {
        let pending = self.pending.len() - self.pending_free.len();
        let live = self.live() + pending;
        if self.timers.len() > 4 * live + 1024 {
            let (sessions, waiting) = (&self.sessions, &self.pending);
            self.timers.retain(|t| {
                t.kind == TimerKind::Accept
                    || (t.kind == TimerKind::Header
                        && waiting
                            .get(t.slot)
                            .and_then(Option::as_ref)
                            .is_some_and(|p| p.generation == t.generation))
                    || sessions
                        .get(t.slot)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.generation == t.generation)
            });
        }
    }

    /// End every session and pending connection (the grace period is over).
    pub fn close_all(&mut self, ctx: &Ctx<'_>) {
        for slot in 0..self.sessions.len() {
            self.close(slot, CloseReason::Shutdown, ctx);
        }
        for n in 0..self.pending.len() {
            self.drop_pending(n, None, ctx);
        }
    }
}

/// Put both sockets of a new session in the poll.
fn register_session(poll: &Poll, session: &mut Session, slot: usize) -> io::Result<()> {
    #[cfg(test)]
    if crate::worker::tests::FAIL_REGISTER.swap(false, std::sync::atomic::Ordering::Relaxed) {
        return Err(io::Error::from_raw_os_error(nix::libc::ENOMEM));
    }
    let registry = poll.registry();
    let both = Interest::READABLE | Interest::WRITABLE;
    registry.register(&mut session.client.stream, Slot::Client(slot).token(), both)?;
    registry.register(&mut session.backend.stream, Slot::Backend(slot).token(), both)
}

/// A PROXY protocol header for a TCP session from `source` to `destination`, in `out`.
fn encode_proxy_header(
    version: vocab::ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut [u8; 108],
) -> usize {
    let (source, destination) =
        (crate::routing::canonical(source), crate::routing::canonical(destination));
    match version {
        vocab::ProxyVersion::V1 => proxyproto::encode_v1(source, destination, out),
        vocab::ProxyVersion::V2 => {
            let mut v2 = [0u8; 52];
            let n =
                proxyproto::encode_v2(proxyproto::Transport::Stream, source, destination, &mut v2);
            out[..n].copy_from_slice(&v2[..n]);
            n
        }
    }
}

/// Turn a client away: counted in `counter`, reset; its place under `--max-conns` goes back as
/// it is dropped.
fn turn_away(stream: TcpStream, place: Place, counter: &AtomicU64) {
    inc(counter);
    drop(place);
    refuse(stream);
}

/// The session log's line for a client turned away before it had a session.
fn log_refusal(ctx: &Ctx<'_>, service: &Arc<Snapshot>, client: SocketAddr, end: End) {
    if let Some(log) = &ctx.shared.session_log {
        log.log(Record::refused(false, Some(service), client, end));
    }
}

/// Reset a client, so it sees an error rather than an empty session.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}
