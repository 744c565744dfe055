//! A deterministic simulation of sessions: a real [`Session`] (its phases, its two half-pipes,
//! reset forwarding and the linger before a reset) over scripted streams and a virtual clock,
//! driven through seeded schedules of writes, slow reads, half-closes and resets from either
//! peer, with the invariants checked after every run:
//!
//! - no byte lost, duplicated or reordered: each peer reads a prefix of what the other got
//!   into tether, and all of it when the session was not cut by the reader's own abort;
//! - a peer whose partner aborted sees a reset, never a clean end of stream (FAILURE-MODES F2),
//!   and one whose partner finished sees the FIN, never a reset (F1);
//! - the session ends once both peers are done, and what it held comes back: the place under
//!   `--max-conns`, the backend's reservation and live gauge, the sticky entry's live count.
//!
//! A failure prints its seed; `SESSION_SEED=<seed> cargo test -p tether-proxy sim` replays it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conntrack::testutil::Rng;
use conntrack::{Attach, Sticky, StickyConfig};

use crate::admission::{admit, Transport};
use crate::held::{Live, Pinned, Place, Reservation};
use crate::pump::{HalfPipe, Io, Pools, Side};
use crate::routing::{BackendState, Guards, Settings};
use crate::session::{CloseReason, Drive, Open, Phase, Session};
use crate::{Shared, Snapshot};

/// Seeds of one run (each a whole session), and the most steps one may take.
const SEEDS: u64 = 300;
const MAX_STEPS: usize = 20_000;

/// One direction of a scripted connection. Bytes written sit in `in_flight` (the writer's send
/// queue, not yet acknowledged) until the network moves them to `delivered` (the reader's
/// receive queue). A reset from the writer drops what is in flight, not what was delivered:
/// the reader reads that, then the error, as from the kernel.
#[derive(Debug, Default)]
struct Wire {
    in_flight: VecDeque<u8>,
    delivered: VecDeque<u8>,
    /// Most bytes in flight and delivered together: a full wire blocks the writer.
    cap: usize,
    /// The writer shut its write side or closed (after everything in flight).
    fin: bool,
    /// The writer aborted.
    reset: bool,
    /// Bytes that reached `delivered` so far.
    delivered_total: usize,
}

impl Wire {
    fn new(cap: usize) -> Rc<RefCell<Wire>> {
        Rc::new(RefCell::new(Wire { cap, ..Wire::default() }))
    }

    /// The network moves up to `n` bytes from the send queue to the receive queue.
    fn carry(&mut self, n: usize) {
        for _ in 0..n.min(self.in_flight.len()) {
            if let Some(b) = self.in_flight.pop_front() {
                self.delivered.push_back(b);
                self.delivered_total += 1;
            }
        }
    }

    fn room(&self) -> usize {
        self.cap - self.in_flight.len() - self.delivered.len()
    }

    /// What the reader sees once `delivered` is empty: `Some(true)` a reset, `Some(false)` a
    /// FIN, `None` nothing yet. A FIN counts only once everything in flight arrived.
    fn end(&self) -> Option<bool> {
        if !self.delivered.is_empty() {
            return None;
        }
        if self.reset {
            return Some(true);
        }
        (self.fin && self.in_flight.is_empty()).then_some(false)
    }
}

/// One end of a scripted connection: tether's (an [`Io`]) or a peer's.
#[derive(Debug)]
struct End {
    inbox: Rc<RefCell<Wire>>,
    outbox: Rc<RefCell<Wire>>,
    /// A read reported the reset once; later reads see end of stream, as from the kernel.
    reset_seen: bool,
    /// Closing sends a reset (SO_LINGER 0) instead of a FIN.
    rst_on_close: Cell<bool>,
}

impl End {
    fn pair(cap_in: usize, cap_out: usize) -> (End, End) {
        let (a, b) = (Wire::new(cap_in), Wire::new(cap_out));
        let tether = End {
            inbox: Rc::clone(&a),
            outbox: Rc::clone(&b),
            reset_seen: false,
            rst_on_close: Cell::new(false),
        };
        let peer = End { inbox: b, outbox: a, reset_seen: false, rst_on_close: Cell::new(false) };
        (tether, peer)
    }
}

impl Io for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.inbox.borrow_mut();
        if !w.delivered.is_empty() {
            let n = buf.len().min(w.delivered.len());
            for (slot, b) in buf.iter_mut().zip(w.delivered.drain(..n)) {
                *slot = b;
            }
            return Ok(n);
        }
        match w.end() {
            Some(true) if !self.reset_seen => {
                self.reset_seen = true;
                Err(io::ErrorKind::ConnectionReset.into())
            }
            Some(_) => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A write toward a peer that aborted meets its reset.
        if self.inbox.borrow().reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let mut w = self.outbox.borrow_mut();
        let n = w.room().min(buf.len());
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        w.in_flight.extend(&buf[..n]);
        Ok(n)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.outbox.borrow_mut().fin = true;
        Ok(())
    }

    fn unsent(&self) -> usize {
        self.outbox.borrow().in_flight.len()
    }

    fn reset_on_close(&self) {
        self.rst_on_close.set(true);
    }
}

impl Drop for End {
    fn drop(&mut self) {
        let mut w = self.outbox.borrow_mut();
        if self.rst_on_close.get() {
            // SO_LINGER 0: the send queue is dropped and a reset goes out.
            w.in_flight.clear();
            w.reset = true;
        } else {
            w.fin = true;
        }
    }
}

/// A peer (client or backend): sends `total` bytes of its pattern and then a FIN, reading what
/// tether sends at its own pace; unless it aborts (a reset) at `abort_at`, before its FIN.
struct Peer {
    end: Option<End>,
    /// Its connection's wires, kept when its end is gone: toward tether, and from tether.
    outbox: Rc<RefCell<Wire>>,
    total: usize,
    sent: usize,
    fin_sent: bool,
    abort_at: Option<usize>,
    aborted: bool,
    got: Vec<u8>,
    /// How the other side's stream ended, as this peer read it: `Some(true)` a reset.
    saw_end: Option<bool>,
}

impl Peer {
    fn new(end: End, rng: &mut Rng, max: usize) -> Peer {
        Peer {
            outbox: Rc::clone(&end.outbox),
            end: Some(end),
            total: rng.below(max as u64 + 1) as usize,
            sent: 0,
            fin_sent: false,
            abort_at: (rng.below(3) == 0).then(|| rng.below(300) as usize),
            aborted: false,
            got: Vec::new(),
            saw_end: None,
        }
    }

    /// One step: abort if it is time (and the FIN has not gone out), else write a chunk or the
    /// FIN, and read a chunk.
    fn step(&mut self, step: usize, salt: u8, rng: &mut Rng) {
        let Some(end) = self.end.as_mut() else { return };
        if self.abort_at.is_some_and(|at| at <= step) && !self.fin_sent {
            end.reset_on_close();
            self.end = None;
            self.aborted = true;
            return;
        }
        if self.sent < self.total {
            let want = (rng.below(8192) as usize + 1).min(self.total - self.sent);
            let chunk: Vec<u8> = (self.sent..self.sent + want).map(|i| byte(i, salt)).collect();
            if let Ok(n) = end.write(&chunk) {
                self.sent += n;
            }
        } else if !self.fin_sent {
            self.fin_sent = end.shutdown_write().is_ok();
        }
        let mut buf = vec![0u8; rng.below(16_384) as usize + 1];
        self.read(&mut buf);
    }

    fn read(&mut self, buf: &mut [u8]) -> bool {
        let Some(end) = self.end.as_mut() else { return false };
        match end.read(buf) {
            Ok(0) => {
                self.saw_end = self.saw_end.or(Some(false));
                false
            }
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.saw_end = Some(true);
                false
            }
            Err(_) => false,
        }
    }

    /// Read everything left, and how the stream ended.
    fn drain(&mut self) {
        let mut buf = vec![0u8; 65_536];
        while self.read(&mut buf) {}
        // A reset behind the end of stream is read next.
        self.read(&mut buf);
    }
}

/// The `i`th byte of a peer's stream: position-dependent, so loss, duplication and reordering
/// all show.
fn byte(i: usize, salt: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8).wrapping_add(salt)
}

/// The shared state one session draws on, to check it all comes back.
struct World {
    shared: Arc<Shared>,
    backend: Arc<BackendState>,
    snapshot: Arc<Snapshot>,
}

impl World {
    fn new() -> World {
        let shared = Arc::new(Shared::new(1, 0, 0, [0; 16], None));
        let backend = Arc::new(BackendState::new(0, "b0".into(), addr(10, 5432)));
        backend.set_max_conns(std::num::NonZeroU32::new(1));
        let settings = Settings::basic(Duration::from_secs(3600), Duration::from_secs(60));
        let sticky = Arc::new(Sticky::new(StickyConfig { capacity: 4, timeout_ms: 1000 }, [5; 16]));
        let members = vec![(Arc::clone(&backend), 1)];
        let snapshot =
            Snapshot::new("s".into(), 0, settings, members, 7, 0, sticky, Guards::default());
        World { shared, backend, snapshot: Arc::new(snapshot.expect("a one-backend table")) }
    }

    /// An established session between `client` and `backend` ends, holding what a real one
    /// holds by then.
    fn session(&self, client: End, backend: End, now: Instant) -> Session<End> {
        let source = addr(1, 40000);
        let admitted = admit(&self.snapshot, Transport::Tcp, source, addr(2, 5432), 0)
            .expect("one usable backend");
        let place = Place::take(&self.shared).expect("a place under --max-conns");
        let reservation = Reservation::take(&self.backend).expect("room under max-conns");
        let key = admitted.key.expect("source affinity");
        let pin = match self.snapshot.sticky.attach(key, self.backend.id, 0) {
            Attach::Full => None,
            Attach::Pinned | Attach::Repinned { .. } => {
                Some(Pinned::new(Arc::clone(&self.snapshot.sticky), key, Arc::clone(&self.shared)))
            }
        };
        Session {
            generation: 1,
            phase: Phase::Established(Open { live: Live::new(&self.backend), pin }),
            client: Side::new(client),
            backend: Side::new(backend),
            peer: source,
            source,
            destination: addr(2, 5432),
            service: Arc::clone(&self.snapshot),
            admitted,
            target: 0,
            place,
            source_count: None,
            reservation,
            c2b: HalfPipe::new("client->backend"),
            b2c: HalfPipe::new("backend->client"),
            last_active: now,
            linger_armed: false,
            queued: false,
            started: now,
            first_eof: None,
        }
    }

    /// Whether everything the session held came back.
    fn released(&self) -> Result<(), String> {
        let key = vocab::AffinityKey::from_ip(addr(1, 0).ip());
        let live = self.snapshot.sticky.get(key, 0).map_or(0, |e| e.live);
        let checks = [
            (self.shared.active.load(Relaxed) == 0, "the place under --max-conns"),
            (self.backend.has_room(), "the backend's max-conns reservation"),
            (self.backend.sessions.load(Relaxed) == 0, "the backend's live gauge"),
            (live == 0, "the sticky entry's live count"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(format!("{what} was not given back")),
            None => Ok(()),
        }
    }
}

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, last], port))
}

/// What one run went through, to show the runs took every path.
#[derive(Debug, Default, Clone, Copy)]
struct Paths {
    steps: usize,
    done: usize,
    reset: usize,
    client_aborts: usize,
    backend_aborts: usize,
    /// A reset waited for the kernel to send what was written before it.
    lingered: usize,
    bytes: usize,
}

impl std::ops::AddAssign for Paths {
    fn add_assign(&mut self, o: Paths) {
        self.steps += o.steps;
        self.done += o.done;
        self.reset += o.reset;
        self.client_aborts += o.client_aborts;
        self.backend_aborts += o.backend_aborts;
        self.lingered += o.lingered;
        self.bytes += o.bytes;
    }
}

/// One seeded session from start to end; `Err` names the broken invariant.
fn run(seed: u64) -> Result<Paths, String> {
    let mut rng = Rng(seed);
    let world = World::new();
    let caps = [64, 1500, 16_384, 65_536];
    let mut cap = || caps[rng.below(4) as usize];
    let (client_end, client_app) = End::pair(cap(), cap());
    let (backend_end, backend_app) = End::pair(cap(), cap());
    let mut client = Peer::new(client_app, &mut rng, 100_000);
    let mut backend = Peer::new(backend_app, &mut rng, 100_000);
    let wires = [
        Rc::clone(&client.outbox),
        Rc::clone(&client_end.outbox),
        Rc::clone(&backend.outbox),
        Rc::clone(&backend_end.outbox),
    ];
    let mut now = Instant::now();
    let mut pools = Pools::new(0);
    let mut session = world.session(client_end, backend_end, now);
    let mut steps = 0;
    let mut lingered = 0;
    let (reason, until) = loop {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(format!("the session never ended in {MAX_STEPS} steps"));
        }
        client.step(steps, 1, &mut rng);
        backend.step(steps, 2, &mut rng);
        // The network carries a random share of each of the four directions.
        for wire in &wires {
            wire.borrow_mut().carry(rng.below(70_000) as usize);
        }
        now += Duration::from_millis(rng.below(60));
        // Readiness as events would report it: the pump clears what it finds untrue.
        for side in [&mut session.client, &mut session.backend] {
            side.readable = true;
            side.writable = true;
        }
        match session.drive(&mut pools, now) {
            Drive::Close(reason) => match &session.phase {
                Phase::Resetting { until, .. } => break (reason, Some(*until)),
                _ => break (reason, None),
            },
            Drive::Linger => lingered = 1,
            Drive::Wait | Drive::Yield => {}
        }
    };
    // A reset forwarded before its linger ran out waited until everything was sent.
    let flushed = until.map_or(true, |until| now < until);
    // As tether closes a session: cut short, it resets both sides.
    if reason != CloseReason::Done && !session.finished() {
        session.client.stream.reset_on_close();
        session.backend.stream.reset_on_close();
    }
    session.c2b.release(&mut pools);
    session.b2c.release(&mut pools);
    drop(session);
    for wire in &wires {
        wire.borrow_mut().carry(usize::MAX);
    }
    client.drain();
    backend.drain();
    world.released()?;
    check(&client, &backend, 1, "client->backend", reason, flushed)?;
    check(&backend, &client, 2, "backend->client", reason, flushed)?;
    Ok(Paths {
        steps,
        done: usize::from(reason == CloseReason::Done),
        reset: usize::from(reason == CloseReason::Reset),
        client_aborts: usize::from(client.aborted),
        backend_aborts: usize::from(backend.aborted),
        lingered,
        bytes: client.got.len() + backend.got.len(),
    })
}

/// What `reader` got of `writer`'s stream through tether: a prefix of it; if the writer
/// aborted, a reset at the end, after all that reached tether unless the linger ran out
/// (`flushed`); all of it and a FIN if both ended cleanly.
fn check(
    writer: &Peer,
    reader: &Peer,
    salt: u8,
    dir: &str,
    reason: CloseReason,
    flushed: bool,
) -> Result<(), String> {
    for (i, &b) in reader.got.iter().enumerate() {
        if b != byte(i, salt) {
            let want = byte(i, salt);
            return Err(format!("{dir}: byte {i} is {b}, not {want}: lost, repeated or reordered"));
        }
    }
    let reached_tether = writer.outbox.borrow().delivered_total;
    if reader.got.len() > reached_tether {
        return Err(format!("{dir}: {} bytes read, {reached_tether} sent", reader.got.len()));
    }
    match (writer.aborted, reader.aborted) {
        // The reader stopped by its own choice: nothing more is owed to it.
        (_, true) => Ok(()),
        // The writer aborted: its partner sees a reset, never a clean end (F2), after every
        // byte that reached tether before the abort.
        (true, false) if reader.saw_end == Some(true) => {
            if flushed && reader.got.len() != reached_tether {
                return Err(format!(
                    "{dir}: the writer aborted after {reached_tether} bytes, {} arrived before \
                     the reset",
                    reader.got.len()
                ));
            }
            Ok(())
        }
        (true, false) => {
            Err(format!("{dir}: the writer aborted, the reader saw {:?}", reader.saw_end))
        }
        // Both ended cleanly: every byte arrived, then the FIN (F1).
        (false, false) => {
            if reader.got.len() != writer.total || reader.saw_end != Some(false) {
                return Err(format!(
                    "{dir}: {} of {} bytes, then {:?} ({reason:?})",
                    reader.got.len(),
                    writer.total,
                    reader.saw_end
                ));
            }
            Ok(())
        }
    }
}

#[test]
fn sessions_keep_every_byte_and_every_reset_and_give_back_what_they_held() {
    let seeds: Vec<u64> = match std::env::var("SESSION_SEED") {
        Ok(seed) => vec![seed.parse().expect("SESSION_SEED is a u64")],
        Err(_) => (0..SEEDS).collect(),
    };
    let replay = seeds.len() == 1;
    let mut total = Paths::default();
    for seed in seeds {
        match run(seed) {
            Ok(paths) => total += paths,
            Err(why) => panic!("seed {seed}: {why} (replay: SESSION_SEED={seed})"),
        }
    }
    eprintln!("{total:?}");
    // Every path was taken somewhere over the seed set, or the runs prove little (a replayed
    // seed passes on its own when it agrees).
    if !replay {
        let t = total;
        assert!(t.steps >= 10_000, "only {} steps", t.steps);
        let paths = [t.done, t.reset, t.client_aborts, t.backend_aborts, t.lingered];
        assert!(paths.iter().all(|&n| n > 0), "{t:?}");
    }
}
