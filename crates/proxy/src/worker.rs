//! A worker: one thread, one `mio::Poll`, its own listeners and the sessions and flows they
//! take. The loop reads like mio's `tcp_server` example: poll, dispatch on the token, let the
//! TCP side (`crate::tcp`) and the UDP side (`crate::udp`) do the work, fire timers.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Poll, Waker};

use crate::session::Which;
use crate::tcp::{self, Tcp};
use crate::token::Slot;
use crate::udp::{self, Recv, Udp};
use crate::{Command, Listeners, Shared, Snapshot, Stats};

/// Events taken from one poll.
const EVENTS: usize = 1024;

/// A UDP socket with datagrams left after its turn.
#[derive(Debug, Clone, Copy)]
enum Ready {
    Listener(usize),
    Flow(usize),
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
    tcp: Tcp,
    udp: Udp,
    /// UDP sockets to read again without waiting for an event.
    ready: VecDeque<Ready>,
    /// Set by a shutdown command: no listener left, exit when sessions end or at this deadline.
    stopping: Option<Instant>,
    /// Current time, read once per loop turn.
    now: Instant,
}

/// The TCP side's view of a worker for one call: its fields, borrowed one by one so that the
/// TCP side itself can be borrowed mutably beside them.
macro_rules! tcp_ctx {
    ($w:expr) => {
        tcp::Ctx {
            poll: &$w.poll,
            services: &$w.services,
            stats: &$w.stats,
            shared: &$w.shared,
            now: $w.now,
        }
    };
}

/// The UDP side's, likewise.
macro_rules! udp_ctx {
    ($w:expr) => {
        udp::Ctx {
            registry: $w.poll.registry(),
            session_log: $w.shared.session_log.as_ref(),
            services: &$w.services,
            stats: &$w.stats,
            now_ms: $w.shared.now_ms($w.now),
        }
    };
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
        let tcp = Tcp::new(id, shared.max_pipes);
        let udp = Udp::new(&shared);
        let mut worker = Worker {
            id,
            poll,
            shared,
            stats,
            commands,
            services: Vec::new(),
            tcp,
            udp,
            ready: VecDeque::new(),
            stopping: None,
            now: Instant::now(),
        };
        for service in services {
            worker.publish(service);
        }
        worker.listen(listeners)?;
        Ok((worker, waker))
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
                let ctx = tcp_ctx!(self);
                match Slot::from_token(event.token()) {
                    // In event order: a reload's Unlisten seen before its listener's event takes
                    // the clients queued on it first (F11).
                    Slot::Waker => self.commands(),
                    Slot::Listener(i) => self.tcp.accept(i, &ctx),
                    Slot::Client(n) => self.tcp.session_event(n, Which::Client, event, &ctx),
                    Slot::Backend(n) => self.tcp.session_event(n, Which::Backend, event, &ctx),
                    Slot::Pending(n) => self.tcp.header_event(n, &ctx),
                    Slot::UdpListener(i) => self.udp_event(Ready::Listener(i)),
                    Slot::Flow(n) => self.udp_event(Ready::Flow(n)),
                }
            }
            self.resume_udp();
            self.tcp.resume(&tcp_ctx!(self));
            self.tcp.fire_timers(&tcp_ctx!(self));
            self.udp.expire(&udp_ctx!(self));
            if let Some(deadline) = self.stopping {
                let live = self.tcp.live();
                if live == 0 || self.now >= deadline {
                    self.tcp.close_all(&tcp_ctx!(self));
                    log::debug!("worker {} stopped ({live} sessions cut)", self.id);
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let flows = self.udp.next_expiry().map(|ms| self.shared.epoch + Duration::from_millis(ms));
        let next = [self.tcp.deadline(now), self.stopping, flows].into_iter().flatten().min();
        next.map(|t| t.saturating_duration_since(now))
    }

    // === control ===

    fn commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                // Stop accepting; sessions get until the deadline.
                Command::Shutdown { deadline } => {
                    self.tcp.close_listeners(&tcp_ctx!(self));
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
                Command::PauseUdp(reply) => {
                    let flows = self.udp.pause(self.poll.registry(), &self.stats);
                    log::debug!("worker {}: UDP paused, {} flows handed", self.id, flows.len());
                    let _ = reply.send(flows);
                }
                Command::ResumeUdp => self.udp.resume(self.poll.registry()),
                Command::Sync(reply) => {
                    let _ = reply.send(());
                }
                Command::Flows { client, limit, reply } => {
                    self.now = Instant::now();
                    let _ = reply.send(self.udp.flows(client, limit, &udp_ctx!(self)));
                }
            }
        }
    }

    /// Route service `service.slot` by this snapshot from now on.
    fn publish(&mut self, service: Arc<Snapshot>) {
        let slot = service.slot;
        if self.services.len() <= slot {
            self.services.resize(slot + 1, None);
        }
        self.udp.set_idle_timeout(slot, service.settings.udp_idle_timeout);
        self.udp.set_buffers(slot, service.settings.udp_buffers);
        self.udp.set_session_key(slot, service.settings.session_key, &self.stats);
        self.services[slot] = Some(service);
        self.udp.recheck(slot, &udp_ctx!(self));
    }

    /// Register listener sockets (at start, and for services added later).
    fn listen(&mut self, listeners: Listeners) -> io::Result<()> {
        self.tcp.listen(listeners.tcp, &tcp_ctx!(self))?;
        for (service, socket) in listeners.udp {
            self.udp.listen(socket, service, self.poll.registry())?;
        }
        let (mut adopted, mut lost) = (0, 0);
        for flow in listeners.flows {
            let (client, backend) = (flow.client, flow.backend.clone());
            match self.udp.adopt(flow, &udp_ctx!(self)) {
                Ok(()) => adopted += 1,
                Err(why) => {
                    lost += 1;
                    log::info!("udp flow of {client} to {backend} not taken over: {why}");
                }
            }
        }
        if adopted + lost > 0 {
            log::info!("worker {}: {adopted} UDP flows taken over, {lost} not", self.id);
        }
        Ok(())
    }

    /// Close the TCP listeners bound to any of the TCP `addrs`, the UDP ones to the UDP ones.
    fn unlisten(&mut self, addrs: &[(SocketAddr, bool)]) {
        self.tcp.unlisten(addrs, &tcp_ctx!(self));
        self.udp.unlisten(addrs, &udp_ctx!(self));
    }

    /// Reset the established sessions of backend `id` and end its flows (`on-down kill`).
    fn kill(&mut self, id: conntrack::BackendId) {
        let sessions = self.tcp.kill(id, &tcp_ctx!(self));
        let flows = self.udp.kill(id, &udp_ctx!(self));
        log::debug!(
            "worker {}: backend {id} down: {sessions} sessions and {flows} flows ended",
            self.id
        );
    }

    // === UDP ===

    /// Datagrams waiting on a UDP listener or a flow's backend socket.
    fn udp_event(&mut self, what: Ready) {
        let ctx = udp_ctx!(self);
        let recv = match what {
            Ready::Listener(i) => self.udp.listener_readable(i, &ctx),
            Ready::Flow(n) => self.udp.flow_readable(n, &ctx),
        };
        if recv == Recv::Again {
            self.ready.push_back(what);
        }
    }

    /// Read again the UDP sockets whose budget ran out last turn.
    fn resume_udp(&mut self) {
        for _ in 0..self.ready.len() {
            match self.ready.pop_front() {
                Some(what) => self.udp_event(what),
                None => break,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::sync::atomic::AtomicBool;

    use conntrack::{Sticky, StickyConfig};

    use super::*;
    use crate::routing::{BackendState, Guards, Settings};

    /// Set to make the next session registration fail as if epoll were out of memory.
    pub(crate) static FAIL_REGISTER: AtomicBool = AtomicBool::new(false);

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
        let settings =
            Settings { connect_timeout: PATIENCE, ..Settings::basic(PATIENCE, PATIENCE) };
        let sticky = Arc::new(Sticky::new(StickyConfig { capacity: 8, timeout_ms: 1000 }, [0; 16]));
        let backends = vec![(Arc::clone(&state), 1)];
        let service =
            Snapshot::new("s".into(), 0, settings, backends, 101, 0, sticky, Guards::default());
        let shared = Arc::new(Shared::new(8, 0, 0, [0; 16], None));
        let (mut sockets, addrs) = crate::bind_all(&["127.0.0.1:0".parse().unwrap()], 1).unwrap();
        let listeners = Listeners { tcp: vec![(0, sockets[0].remove(0))], ..Listeners::default() };
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
