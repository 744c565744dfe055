//! A worker: one thread, one `mio::Poll`, its own listeners and the sessions they accept.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};

use conntrack::Attach;

use crate::admission::{admit, Admitted, ConnectError, Transport};
use crate::outgoing::Sources;
use crate::pump::{HalfPipe, Pools, Side};
use crate::session::{set_reset_on_close, CloseReason, Drive, Session, State, LINGER_POLL};
use crate::stats::{inc, ports_exhausted, Stats};
use crate::timer::{Timer, TimerKind, Timers};
use crate::token::Slot;
use crate::udp::{Ctx, Recv, Udp};
use crate::{Command, Listeners, Shared, Snapshot};

/// Events taken from one poll.
const EVENTS: usize = 1024;
/// Connections accepted from one listener before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Wait before accepting again after accept(2) failed for lack of fds or memory (nginx waits
/// 500 ms; shorter here because sessions close quickly under the loads tether sees).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Work to resume without waiting for an event (its readiness is already known).
#[derive(Debug, Clone, Copy)]
enum Ready {
    Listener(usize),
    UdpListener(usize),
    Flow(usize),
    Session { slot: usize, generation: u64 },
}

/// Largest PROXY header read (the parser refuses longer ones).
const PROXY_HEADER_MAX: usize = proxyproto::MAX_HEADER_LEN;

/// A connection from a trusted proxy that has not yet sent its PROXY header: it has no backend
/// and no session yet, only a deadline.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<Snapshot>,
    generation: u64,
}

/// One event loop.
pub struct Worker {
    id: usize,
    poll: Poll,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    commands: Receiver<Command>,
    /// Routing snapshots by service slot (`None`: no such service, or retired).
    services: Vec<Option<Arc<Snapshot>>>,
    /// TCP listeners, the service slot each feeds, and the address each is bound to.
    listeners: Vec<Option<(TcpListener, usize)>>,
    /// Per listener: its bound address, `None` for a wildcard one (0.0.0.0, [::]), whose
    /// connections each learn theirs from getsockname(2) when it is needed.
    listener_addrs: Vec<Option<SocketAddr>>,
    /// Per listener: an accept retry is armed after accept(2) failed for lack of resources;
    /// events are ignored until it fires (one retry chain, not one per event).
    backing_off: Vec<bool>,
    /// Pauses of accepting in a row for lack of fds or memory, until a session gets its
    /// backend socket again (logged once when they start and once when they end, not ten
    /// times a second).
    starved: u32,
    /// Local addresses backend connects go out from, in turn.
    sources: Sources,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    /// Connections waiting for a PROXY header, and their free slots.
    pending: Vec<Option<Pending>>,
    pending_free: Vec<usize>,
    timers: Timers,
    ready: VecDeque<Ready>,
    pools: Pools,
    udp: Udp,
    next_generation: u64,
    /// Set by a shutdown command: no listener left, exit when sessions end or at this deadline.
    stopping: Option<Instant>,
    /// Current time, read once per loop turn.
    now: Instant,
}

impl Worker {
    /// Register the listeners and a waker. Returns the worker and the waker control uses.
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        services: Vec<Arc<Snapshot>>,
        listeners: Listeners,
        stats: Arc<Stats>,
        commands: Receiver<Command>,
    ) -> io::Result<(Worker, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), Slot::Waker.token())?);
        let pools = Pools::new(shared.max_pipes);
        let udp = Udp::new(Arc::clone(&shared.flow_budget), shared.flow_hash_key);
        let now = Instant::now();
        let mut worker = Worker {
            id,
            poll,
            shared,
            stats,
            commands,
            services: Vec::new(),
            backing_off: Vec::new(),
            starved: 0,
            sources: Sources::default(),
            listener_addrs: Vec::new(),
            listeners: Vec::new(),
            sessions: Vec::new(),
            free: Vec::new(),
            pending: Vec::new(),
            pending_free: Vec::new(),
            timers: Timers::default(),
            ready: VecDeque::new(),
            pools,
            udp,
            next_generation: 0,
            stopping: None,
            now,
        };
        for service in services {
            worker.publish(service);
        }
        worker.listen(listeners)?;
        Ok((worker, waker))
    }

    /// Route service `service.slot` by this snapshot from now on.
    fn publish(&mut self, service: Arc<Snapshot>) {
        let slot = service.slot;
        if self.services.len() <= slot {
            self.services.resize(slot + 1, None);
        }
        self.udp.set_idle_timeout(slot, service.settings.udp_idle_timeout);
        self.udp.set_buffers(slot, service.settings.udp_buffers);
        self.services[slot] = Some(service);
    }

    /// Register listener sockets (at start, and for services added later).
    fn listen(&mut self, listeners: Listeners) -> io::Result<()> {
        for (service, l) in listeners.tcp {
            let bound = l.local_addr().ok().filter(|a| !a.ip().is_unspecified());
            let l = TcpListener::from_std(l);
            let i = self.listeners.len();
            crate::sys::register_exclusive(&self.poll, &l, Slot::Listener(i).token())?;
            self.listener_addrs.push(bound);
            self.listeners.push(Some((l, service)));
            self.backing_off.push(false);
        }
        for (service, socket) in listeners.udp {
            self.udp.listen(socket, service, self.poll.registry())?;
        }
        Ok(())
    }

    /// Reset the established sessions of backend `id` and end its flows (`on-down kill`).
    /// Sessions still connecting to it are left to their connect (which fails over).
    fn kill(&mut self, id: conntrack::BackendId) {
        let mut n = 0;
        for slot in 0..self.sessions.len() {
            let Some(s) = self.sessions[slot].as_ref() else { continue };
            if s.counted && s.service.backends[s.target].id == id {
                // `close` resets both sides: the session is cut, not finished.
                inc(&self.stats.killed);
                self.close(slot, CloseReason::Killed);
                n += 1;
            }
        }
        let ctx = Ctx {
            registry: self.poll.registry(),
            services: &self.services,
            stats: &self.stats,
            now_ms: self.shared.now_ms(self.now),
        };
        let flows = self.udp.kill(id, &ctx);
        log::debug!("worker {}: backend {id} down: {n} sessions and {flows} flows ended", self.id);
    }

    /// Close the TCP listeners bound to any of the TCP `addrs`, the UDP ones to the UDP ones.
    fn unlisten(&mut self, addrs: &[(SocketAddr, bool)]) {
        for i in 0..self.listeners.len() {
            let bound = self.listeners[i].as_ref().and_then(|(l, _)| l.local_addr().ok());
            let Some(addr) = bound.filter(|&a| addrs.contains(&(a, false))) else { continue };
            let Some((l, service)) = self.listeners[i].take() else { continue };
            crate::sys::deregister(&self.poll, &l);
            // Clients already in its queue are served rather than reset by the close (F11);
            // what arrives between this and the close is not.
            let mut taken = 0;
            for _ in 0..crate::listener::BACKLOG {
                match l.accept() {
                    Ok((stream, peer)) => {
                        taken += 1;
                        self.take_client(stream, peer, i, service);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || is_resource_error(&e) => {
                        break
                    }
                    Err(_) => {} // that one connection only (aborted, interrupted)
                }
            }
            log::info!(
                "worker {}: closed listener {addr} ({taken} queued clients taken first)",
                self.id
            );
        }
        let ctx = Ctx {
            registry: self.poll.registry(),
            services: &self.services,
            stats: &self.stats,
            now_ms: self.shared.now_ms(self.now),
        };
        self.udp.unlisten(addrs, &ctx);
    }

    /// Run until shut down and every session has ended (or the grace period is over).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        log::debug!("worker {} running", self.id);
        self.stats.last_turn_ms.store(self.shared.now_ms(Instant::now()), Relaxed);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            self.stats.last_turn_ms.store(self.shared.now_ms(self.now), Relaxed);
            for event in events.iter() {
                match Slot::from_token(event.token()) {
                    Slot::Waker => self.commands(),
                    Slot::Listener(i) => self.accept(i),
                    Slot::Client(n) => self.session_event(n, true, event),
                    Slot::Backend(n) => self.session_event(n, false, event),
                    Slot::UdpListener(i) => self.udp_event(Ready::UdpListener(i)),
                    Slot::Flow(n) => self.udp_event(Ready::Flow(n)),
                    Slot::Pending(n) => self.header_event(n),
                }
            }
            self.resume_ready();
            self.fire_timers();
            let ctx = Ctx {
                registry: self.poll.registry(),
                services: &self.services,
                stats: &self.stats,
                now_ms: self.shared.now_ms(self.now),
            };
            self.udp.expire(&ctx);
            if let Some(deadline) = self.stopping {
                let live = self.sessions.len() - self.free.len();
                if live == 0 || self.now >= deadline {
                    self.close_all();
                    log::debug!("worker {} stopped ({live} sessions cut)", self.id);
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let flows = self.udp.next_expiry().map(|ms| self.shared.epoch + Duration::from_millis(ms));
        let next = [self.timers.next(), self.stopping, flows].into_iter().flatten().min();
        next.map(|t| t.saturating_duration_since(Instant::now()))
    }

    // === control ===

    fn commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                // Stop accepting; sessions get until the deadline.
                Command::Shutdown { deadline } => {
                    for (i, l) in self.listeners.iter_mut().enumerate() {
                        if let Some((l, _)) = l.take() {
                            crate::sys::deregister(&self.poll, &l);
                            log::debug!("worker {} closed listener {i}", self.id);
                        }
                    }
                    self.udp.close_listeners(self.poll.registry());
                    self.stopping = Some(deadline);
                }
                Command::Publish(service) => self.publish(service),
                Command::Listen(listeners) => {
                    if self.stopping.is_none() {
                        if let Err(e) = self.listen(listeners) {
                            log::error!("worker {}: registering new listeners: {e}", self.id);
                        }
                    }
                }
                Command::Unlisten(addrs) => self.unlisten(&addrs),
                Command::Kill(id) => self.kill(id),
            }
        }
    }

    // === accepting ===

    fn accept(&mut self, i: usize) {
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
                Ok((stream, peer)) => self.take_client(stream, peer, i, service),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_resource_error(&e) => {
                    // EMFILE/ENFILE: the connection stays in the backlog and, edge-triggered, no
                    // new event comes for it; retry on a timer rather than spin or stall (F3).
                    inc(&self.stats.accept_errors);
                    self.pause_accepting(i, &format_args!("accept failed: {e}"));
                    return;
                }
                // ECONNABORTED and the like concern one connection only.
                Err(e) => {
                    inc(&self.stats.accept_errors);
                    log::debug!("accept: {e}");
                }
            }
        }
        self.ready.push_back(Ready::Listener(i));
    }

    /// Stop accepting on listener `i` for [`ACCEPT_BACKOFF`]: this worker is out of fds or
    /// memory. New clients wait in the backlog meanwhile, where the kernel holds them for
    /// free, instead of being accepted only to be reset. `why` is logged once per shortage.
    fn pause_accepting(&mut self, i: usize, why: &dyn std::fmt::Display) {
        let open = matches!(self.listeners.get(i), Some(Some(_)));
        if !open || self.backing_off.get(i).copied().unwrap_or(true) {
            return;
        }
        if self.starved == 0 {
            log::warn!("{why}; accepting paused, retried every {ACCEPT_BACKOFF:?}");
        }
        self.starved = self.starved.saturating_add(1);
        let at = self.now + ACCEPT_BACKOFF;
        self.timers.arm(Timer { at, kind: TimerKind::Accept, slot: i, generation: 0 });
        self.backing_off[i] = true;
    }

    /// A client accepted on listener `i`, of service slot `service`.
    fn take_client(&mut self, stream: TcpStream, peer: SocketAddr, i: usize, service: usize) {
        inc(&self.stats.accepted);
        match self.services.get(service).and_then(Option::as_ref) {
            Some(service) => {
                let service = Arc::clone(service);
                let local = self.listener_addrs.get(i).copied().flatten();
                self.open(stream, peer, local, service);
            }
            None => {
                inc(&self.stats.no_backend);
                refuse(stream);
            }
        }
    }

    /// A client accepted on a listener bound to `local` (`None`: a wildcard listener).
    fn open(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        service: Arc<Snapshot>,
    ) {
        let shared = Arc::clone(&self.shared);
        let before = shared.active.fetch_add(1, AcqRel);
        if before >= shared.max_conns {
            shared.active.fetch_sub(1, AcqRel);
            inc(&self.stats.refused_max_conns);
            refuse(stream);
            return;
        }
        // TCP_NODELAY is inherited from the listener (set there once, see listener.rs).
        let rules = &service.guards.proxy;
        if rules.accept && rules.trusted.allows(peer.ip()) {
            return self.await_header(stream, peer, service);
        }
        // The address the client connected to: the listener's, unless it is a wildcard one; then
        // getsockname(2), but only when something needs it (5-tuple affinity, PROXY headers).
        let needed = service.settings.affinity == vocab::Affinity::FiveTuple
            || service.guards.proxy.send.is_some();
        let destination = match local {
            Some(addr) => addr,
            None if needed => stream.local_addr().unwrap_or(peer),
            None => peer,
        };
        self.route(stream, peer, peer, destination, service, false);
    }

    // === PROXY headers from trusted proxies ===

    /// Hold a trusted proxy's connection until its header has come, for at most the header
    /// timeout. Registering reports data already there, so nothing is missed.
    fn await_header(&mut self, mut stream: TcpStream, peer: SocketAddr, service: Arc<Snapshot>) {
        let n = self.pending_free.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        let token = Slot::Pending(n).token();
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            log::warn!("register the connection of {peer}: {e}");
            self.pending_free.push(n);
            self.shared.active.fetch_sub(1, AcqRel);
            refuse(stream);
            return;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let at = self.now + service.guards.proxy.header_timeout;
        self.timers.arm(Timer { at, kind: TimerKind::Header, slot: n, generation });
        self.pending[n] = Some(Pending { stream, peer, service, generation });
    }

    /// Bytes arrived on a pending connection: look at them without taking them (MSG_PEEK), and
    /// once a whole header is there take exactly the header and route the real client. The
    /// bytes after it stay in the socket for the session's pump.
    fn header_event(&mut self, n: usize) {
        let Some(p) = self.pending.get(n).and_then(Option::as_ref) else { return };
        let mut buf = [0u8; PROXY_HEADER_MAX];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&p.stream);
        let got = match nix::sys::socket::recv(fd, &mut buf, flags) {
            Ok(0) => return self.drop_pending(n, None), // gone before saying anything
            Ok(got) => got,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return,
            Err(e) => return self.drop_pending(n, Some(&format!("{e}"))),
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
                return self.drop_pending(n, Some("header longer than the largest accepted"))
            }
            Err(e) => return self.drop_pending(n, Some(&e.to_string())),
        };
        // Take the header off the socket: exactly the bytes just parsed.
        let mut sink = [0u8; PROXY_HEADER_MAX];
        match nix::sys::socket::recv(fd, &mut sink[..consumed], nix::sys::socket::MsgFlags::empty())
        {
            Ok(taken) if taken == consumed => {}
            other => return self.drop_pending(n, Some(&format!("reading the header: {other:?}"))),
        }
        let Some(p) = self.pending[n].take() else { return };
        self.pending_free.push(n);
        self.route(p.stream, p.peer, source, destination, p.service, true);
    }

    /// Give up on a pending connection: `why` is a header error (counted, logged), `None` a
    /// connection that closed first. It is reset and its place under --max-conns freed.
    fn drop_pending(&mut self, n: usize, why: Option<&str>) {
        let Some(p) = self.pending.get_mut(n).and_then(Option::take) else { return };
        self.pending_free.push(n);
        if let Some(why) = why {
            inc(&self.stats.proxy_header_errors);
            log::debug!("PROXY header from {}: {why}", p.peer);
        }
        self.shared.active.fetch_sub(1, AcqRel);
        refuse(p.stream);
    }

    /// Admit a client whose real address is `source` (the peer itself, or what a trusted
    /// proxy's header said) and start connecting it to a backend. `registered`: the client
    /// socket is already in the poll (it waited for a PROXY header). Every refusal resets the
    /// client, is counted by reason, and gives back the session's place under `--max-conns`.
    fn route(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        source: SocketAddr,
        destination: SocketAddr,
        service: Arc<Snapshot>,
        registered: bool,
    ) {
        let now_ms = self.shared.now_ms(self.now);
        let mut admitted = match admit(&service, Transport::Tcp, source, destination, now_ms) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                return self.turn_away(stream, refusal.counter(Transport::Tcp, &self.stats))
            }
        };
        let Some((target, backend)) = self.begin_connect(&service, &mut admitted, now_ms) else {
            release_source(&service, &admitted, source, now_ms);
            return self.turn_away(stream, &self.stats.no_backend);
        };
        if registered {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.sessions.push(None);
            self.sessions.len() - 1
        });
        self.next_generation += 1;
        let mut session = Session {
            generation: self.next_generation,
            state: State::Connecting { deadline: self.now + service.settings.connect_timeout },
            client: Side::new(stream),
            backend: Side::new(backend),
            peer,
            source,
            destination,
            service,
            admitted,
            target,
            attached: false,
            counted: false,
            reserved: true,
            c2b: HalfPipe::new("client->backend"),
            b2c: HalfPipe::new("backend->client"),
            last_active: self.now,
            linger_armed: false,
            queued: false,
        };
        if let Err(e) = self.register_session(&mut session, slot) {
            // This host's trouble (epoll out of memory): the client is reset and counted like
            // every other refusal, and no backend is blamed.
            log::warn!("register session of {peer}: {e}");
            let registry = self.poll.registry();
            let _ = registry.deregister(&mut session.client.stream);
            let _ = registry.deregister(&mut session.backend.stream);
            session.service.backends[session.target].release();
            release_source(&session.service, &session.admitted, source, now_ms);
            self.free.push(slot);
            inc(&self.stats.local_errors);
            let Session { client, .. } = session;
            return self.turn_away(client.stream, &self.stats.refused_local);
        }
        let generation = session.generation;
        if let State::Connecting { deadline } = session.state {
            self.timers.arm(Timer { at: deadline, kind: TimerKind::Connect, slot, generation });
        }
        let at = self.now + session.service.settings.idle_timeout;
        self.timers.arm(Timer { at, kind: TimerKind::Idle, slot, generation });
        self.sessions[slot] = Some(session);
    }

    /// Turn a client away: counted in `counter`, reset, its place under `--max-conns` given
    /// back.
    fn turn_away(&self, stream: TcpStream, counter: &std::sync::atomic::AtomicU64) {
        inc(counter);
        self.shared.active.fetch_sub(1, AcqRel);
        refuse(stream);
    }

    /// Put both sockets of a new session in the poll.
    fn register_session(&self, session: &mut Session, slot: usize) -> io::Result<()> {
        #[cfg(test)]
        if tests::FAIL_REGISTER.swap(false, Relaxed) {
            return Err(io::Error::from_raw_os_error(nix::libc::ENOMEM));
        }
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        registry.register(&mut session.client.stream, Slot::Client(slot).token(), both)?;
        registry.register(&mut session.backend.stream, Slot::Backend(slot).token(), both)
    }

    // === connecting ===

    /// Start a non-blocking connect to the next backend of the client's order, and to the
    /// ones after it while even starting one fails. Returns the backend, with a place under its
    /// `max-conns` taken, and its connecting socket.
    fn begin_connect(
        &mut self,
        service: &Snapshot,
        admitted: &mut Admitted,
        now_ms: u64,
    ) -> Option<(usize, TcpStream)> {
        while let Some(t) = admitted.next(service, now_ms) {
            let backend = &service.backends[t];
            // A place under its max-conns, taken for the session's whole life (released on a
            // failed connect or at close).
            if !backend.try_reserve() {
                inc(&self.stats.backend_full);
                continue;
            }
            let addr = backend.addr;
            let e = match self.sources.tcp(addr, &service.settings.connect_from, service.slot) {
                Ok(stream) => {
                    if self.starved > 0 {
                        log::warn!("fds are back after {} accept pauses", self.starved);
                        self.starved = 0;
                    }
                    // Set before the handshake, so it costs no extra call later.
                    let _ = stream.set_nodelay(true);
                    return Some((t, stream));
                }
                Err(e) => ConnectError::new(e),
            };
            backend.release();
            match &e {
                // Out of fds or memory here: no other backend would do better, none is to
                // blame, and accepting more now would only reset more clients (F3): let them
                // wait in the backlog until fds come back.
                ConnectError::Local(_) => {
                    inc(&self.stats.local_errors);
                    for i in 0..self.listeners.len() {
                        self.pause_accepting(i, &format_args!("connect to {addr}: {e}"));
                    }
                    return None;
                }
                // No port left toward this backend from any local address (F13): another
                // backend may have some, and this one is not to blame.
                ConnectError::NoPort(io) => ports_exhausted(&self.stats, addr, io),
                ConnectError::Backend(_) | ConnectError::Attempt(_) => {
                    log::debug!("connect to {addr} failed at once: {e}");
                    if e.blames_backend() {
                        backend.mark_failing(now_ms);
                    }
                    inc(&self.stats.connect_failures);
                }
            }
        }
        None
    }

    /// The connect in progress failed or timed out: mark the backend and try the next one.
    fn connect_failed(&mut self, slot: usize, failure: ConnectFailure) {
        let shared = Arc::clone(&self.shared);
        let now_ms = shared.now_ms(self.now);
        let Some(mut s) = self.sessions[slot].take() else { return };
        let service = Arc::clone(&s.service);
        // The attempt's place under max-conns goes back; the next attempt takes its own.
        if std::mem::take(&mut s.reserved) {
            service.backends[s.target].release();
        }
        let (blame, counter) = match &failure {
            ConnectFailure::TimedOut => (true, &self.stats.connect_timeouts),
            ConnectFailure::Error(e) => (e.blames_backend(), &self.stats.connect_failures),
        };
        inc(counter);
        if blame {
            service.backends[s.target].mark_failing(now_ms);
        }
        let started = self.begin_connect(&service, &mut s.admitted, now_ms);
        let registry = self.poll.registry();
        let generation = s.generation;
        match started {
            Some((target, mut stream)) => {
                inc(&self.stats.retries);
                let token = Slot::Backend(slot).token();
                let registered =
                    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE);
                s.target = target;
                s.reserved = true;
                s.backend = Side::new(stream);
                if let Err(e) = registered {
                    // This host's trouble (epoll out of memory): no backend is to blame.
                    log::warn!("register backend socket: {e}");
                    inc(&self.stats.local_errors);
                    set_reset_on_close(&s.client);
                    self.sessions[slot] = Some(s);
                    self.close(slot, CloseReason::NoBackend);
                    return;
                }
                let deadline = self.now + service.settings.connect_timeout;
                s.set_state(State::Connecting { deadline });
                self.timers.arm(Timer { at: deadline, kind: TimerKind::Connect, slot, generation });
                self.sessions[slot] = Some(s);
            }
            None => {
                inc(&self.stats.no_backend);
                set_reset_on_close(&s.client);
                self.sessions[slot] = Some(s);
                self.close(slot, CloseReason::NoBackend);
            }
        }
    }

    fn established(&mut self, slot: usize) {
        let shared = Arc::clone(&self.shared);
        let now_ms = shared.now_ms(self.now);
        let Some(s) = self.sessions[slot].as_mut() else { return };

        // The PROXY header goes first, before any byte of the client's (which is not read
        // until now). The socket's send buffer is empty: a short write means it is broken.
        if let Some(version) = s.service.guards.proxy.send {
            let mut header = [0u8; 108];
            let n = encode_proxy_header(version, s.source, s.destination, &mut header);
            match (&s.backend.stream).write(&header[..n]) {
                Ok(written) if written == n => inc(&self.stats.proxy_headers_sent),
                result => {
                    log::debug!("PROXY header to the backend of {}: {result:?}", s.source);
                    self.close(slot, CloseReason::Reset);
                    return;
                }
            }
        }
        s.set_state(State::Established);
        s.last_active = self.now;
        inc(&self.stats.established);
        let b = &s.service.backends[s.target];
        b.sessions.fetch_add(1, Relaxed);
        b.sessions_total.fetch_add(1, Relaxed);
        s.counted = true;
        if let Some(key) = s.admitted.key {
            // Pin the client to the backend it actually reached (re-pins after a failover).
            match s.service.sticky.attach(key, b.id, now_ms) {
                Attach::Full => inc(&self.stats.sticky_full),
                Attach::Pinned | Attach::Repinned { .. } => s.attached = true,
            }
        }
        // Readiness seen while connecting was not acted on; assume both sides may be ready.
        s.client.readable = true;
        s.client.writable = true;
        self.drive(slot);
    }

    // === established ===

    fn session_event(&mut self, slot: usize, client: bool, event: &mio::event::Event) {
        let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) else { return };
        // Errors and hang-ups are found out by the next read or write (F4).
        let failed = event.is_error() || event.is_read_closed() || event.is_write_closed();
        let side = if client { &mut s.client } else { &mut s.backend };
        side.readable |= event.is_readable() || failed;
        side.writable |= event.is_writable() || failed;
        side.hung_up |= failed;
        if let (State::Connecting { .. }, false) = (s.state, client) {
            match s.connect_result(event) {
                Ok(false) => {}
                Ok(true) => self.established(slot),
                Err(e) => {
                    let addr = s.service.backends[s.target].addr;
                    log::debug!("connect to {addr} failed: {e}");
                    self.connect_failed(slot, ConnectFailure::Error(ConnectError::new(e)));
                }
            }
            return;
        }
        self.drive(slot);
    }

    fn drive(&mut self, slot: usize) {
        let Some(s) = self.sessions[slot].as_mut() else { return };
        let (in_before, out_before) = (s.c2b.moved, s.b2c.moved);
        let result = s.drive(&mut self.pools, self.now);
        let (moved_in, moved_out) = (s.c2b.moved - in_before, s.b2c.moved - out_before);
        if moved_in > 0 {
            self.stats.bytes_in.fetch_add(moved_in, Relaxed);
            s.service.backends[s.target].bytes_in.fetch_add(moved_in, Relaxed);
        }
        if moved_out > 0 {
            self.stats.bytes_out.fetch_add(moved_out, Relaxed);
            s.service.backends[s.target].bytes_out.fetch_add(moved_out, Relaxed);
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
                    let at = self.now + LINGER_POLL;
                    self.timers.arm(Timer { at, kind: TimerKind::Linger, slot, generation });
                }
            }
            Drive::Close(reason) => {
                if reason == CloseReason::Reset {
                    inc(&self.stats.resets);
                }
                self.close(slot, reason);
            }
        }
    }

    // === UDP ===

    /// Datagrams waiting on a UDP listener or a flow's backend socket.
    fn udp_event(&mut self, what: Ready) {
        let ctx = Ctx {
            registry: self.poll.registry(),
            services: &self.services,
            stats: &self.stats,
            now_ms: self.shared.now_ms(self.now),
        };
        let more = match what {
            Ready::UdpListener(i) => self.udp.listener_readable(i, &ctx),
            Ready::Flow(n) => self.udp.flow_readable(n, &ctx),
            _ => Recv::Drained,
        };
        if more == Recv::Again {
            self.ready.push_back(what);
        }
    }

    fn resume_ready(&mut self) {
        for _ in 0..self.ready.len() {
            match self.ready.pop_front() {
                Some(Ready::Listener(i)) => self.accept(i),
                Some(r @ (Ready::UdpListener(_) | Ready::Flow(_))) => self.udp_event(r),
                Some(Ready::Session { slot, generation }) => {
                    if self.generation_at(slot) == Some(generation) {
                        if let Some(s) = self.sessions[slot].as_mut() {
                            s.queued = false;
                        }
                        self.drive(slot);
                    }
                }
                None => break,
            }
        }
    }

    // === timers ===

    fn fire_timers(&mut self) {
        while let Some(t) = self.timers.pop_due(self.now) {
            if t.kind == TimerKind::Accept {
                if let Some(b) = self.backing_off.get_mut(t.slot) {
                    *b = false;
                }
                self.accept(t.slot);
                continue;
            }
            if t.kind == TimerKind::Header {
                let waiting = self.pending.get(t.slot).and_then(Option::as_ref);
                if waiting.is_some_and(|p| p.generation == t.generation) {
                    self.drop_pending(t.slot, Some("no complete header before the timeout"));
                }
                continue;
            }
            if self.generation_at(t.slot) != Some(t.generation) {
                continue; // the session that armed it is gone
            }
            let Some(s) = self.sessions[t.slot].as_ref() else { continue };
            match (t.kind, s.state) {
                // Still waiting on the attempt that armed this timer.
                (TimerKind::Connect, State::Connecting { deadline }) if deadline == t.at => {
                    log::debug!("connect to {} timed out", s.service.backends[s.target].addr);
                    self.connect_failed(t.slot, ConnectFailure::TimedOut);
                }
                (TimerKind::Connect, _) => {}
                // Idle means no byte either way since last_active; otherwise re-arm.
                (TimerKind::Idle, _) => {
                    let due = s.last_active + s.service.settings.idle_timeout;
                    if due <= self.now {
                        inc(&self.stats.idle_timeouts);
                        self.close(t.slot, CloseReason::Idle);
                    } else {
                        self.timers.arm(Timer { at: due, ..t });
                    }
                }
                // A lingering reset checks the send queue again.
                (TimerKind::Linger, _) => {
                    if let Some(s) = self.sessions[t.slot].as_mut() {
                        s.linger_armed = false;
                    }
                    self.drive(t.slot);
                }
                (TimerKind::Accept | TimerKind::Header, _) => {}
            }
        }
    }

    // === closing ===

    fn generation_at(&self, slot: usize) -> Option<u64> {
        self.sessions.get(slot).and_then(Option::as_ref).map(|s| s.generation)
    }

    fn close(&mut self, slot: usize, reason: CloseReason) {
        let Some(mut s) = self.sessions.get_mut(slot).and_then(Option::take) else { return };
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
        // No deregister: closing the last fd of a socket removes it from the epoll interest
        // list (epoll(7)), and a session's sockets are never duplicated. Saves two syscalls.
        s.c2b.release(&mut self.pools);
        s.b2c.release(&mut self.pools);
        if s.counted {
            s.service.backends[s.target].sessions.fetch_sub(1, Relaxed);
        }
        if s.reserved {
            s.service.backends[s.target].release();
        }
        release_source(&s.service, &s.admitted, s.source, self.shared.now_ms(self.now));
        if let (Some(key), true) = (s.admitted.key, s.attached) {
            s.service.sticky.detach(key, self.shared.now_ms(self.now));
        }
        self.shared.active.fetch_sub(1, AcqRel);
        inc(&self.stats.closed);
        self.free.push(slot);
        self.compact_timers();
    }

    /// Drop timers of closed sessions once they outnumber the live ones: an idle timer waits
    /// the whole idle timeout (an hour by default) after its session is gone, and at thousands
    /// of sessions a second the heap would otherwise grow by millions.
    fn compact_timers(&mut self) {
        let pending = self.pending.len() - self.pending_free.len();
        let live = self.sessions.len() - self.free.len() + pending;
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

    fn close_all(&mut self) {
        for slot in 0..self.sessions.len() {
            self.close(slot, CloseReason::Shutdown);
        }
        for n in 0..self.pending.len() {
            self.drop_pending(n, None);
        }
    }
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

/// Why a connect in progress failed.
#[derive(Debug)]
enum ConnectFailure {
    /// No answer within the connect timeout: the backend is blamed.
    TimedOut,
    /// The handshake failed (`SO_ERROR`).
    Error(ConnectError),
}

/// Give back the session count the per-source limiter holds for an admitted client, if any.
fn release_source(service: &Snapshot, admitted: &Admitted, source: SocketAddr, now_ms: u64) {
    if let (true, Some(limiter)) = (admitted.limited, &service.guards.limiter) {
        limiter.close_session(source.ip(), now_ms);
    }
}

/// Turn a client away with a reset, so it sees an error rather than an empty session.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

fn is_resource_error(e: &io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use conntrack::{Sticky, StickyConfig};

    use super::*;
    use crate::routing::{BackendState, Guards, Settings};

    /// Set to make the next session registration fail as if epoll were out of memory.
    pub(super) static FAIL_REGISTER: AtomicBool = AtomicBool::new(false);

    const PATIENCE: Duration = Duration::from_secs(30);

    fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        condition()
    }

    #[test]
    fn a_session_that_cannot_be_registered_resets_its_client_and_is_counted() {
        // A backend that never accepts: the kernel completes handshakes into its backlog.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let state = Arc::new(BackendState::new(0, "b0".into(), backend.local_addr().unwrap()));
        state.set_max_conns(std::num::NonZeroU32::new(1));
        let settings = Settings {
            affinity: vocab::Affinity::Source,
            connect_timeout: PATIENCE,
            idle_timeout: PATIENCE,
            udp_idle_timeout: PATIENCE,
            connect_from: Vec::new(),
            udp_buffers: Default::default(),
        };
        let sticky = Arc::new(Sticky::new(StickyConfig { capacity: 8, timeout_ms: 1000 }, [0; 16]));
        let backends = vec![(Arc::clone(&state), 1)];
        let service =
            Snapshot::new("s".into(), 0, settings, backends, 101, 0, sticky, Guards::default());
        let shared = Arc::new(Shared {
            max_conns: 8,
            max_pipes: 0,
            active: AtomicUsize::new(0),
            epoch: Instant::now(),
            flow_budget: Arc::new(conntrack::FlowBudget::new(0)),
            flow_hash_key: [0; 16],
        });
        let (mut sockets, addrs) = crate::bind_all(&["127.0.0.1:0".parse().unwrap()], 1).unwrap();
        let listeners = Listeners { tcp: vec![(0, sockets[0].remove(0))], udp: Vec::new() };
        let stats = Arc::new(Stats::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let (worker, waker) = Worker::new(
            0,
            Arc::clone(&shared),
            vec![Arc::new(service.unwrap())],
            listeners,
            Arc::clone(&stats),
            rx,
        )
        .unwrap();
        let running = std::thread::spawn(move || worker.run());

        FAIL_REGISTER.store(true, Relaxed);
        let mut client = std::net::TcpStream::connect(addrs[0]).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let got = client.read(&mut [0u8; 1]);
        assert_eq!(got.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset), "not a reset");
        assert!(wait_until(|| stats.refused_local.load(Relaxed) == 1), "not counted");
        assert_eq!(stats.local_errors.load(Relaxed), 1);
        assert_eq!(stats.no_backend.load(Relaxed), 0);
        assert_eq!(shared.active.load(Relaxed), 0, "its place under --max-conns leaked");
        // Its place under the backend's max-conns (1) came back: the next client is served.
        let _next = std::net::TcpStream::connect(addrs[0]).unwrap();
        assert!(wait_until(|| stats.established.load(Relaxed) == 1), "the next client waits");
        assert_eq!(state.sessions.load(Relaxed), 1);

        tx.send(Command::Shutdown { deadline: Instant::now() }).unwrap();
        waker.wake().unwrap();
        running.join().unwrap().unwrap();
    }
}
