//! The TCP client load: one mio loop holding thousands of sessions through tether, each
//! checking every byte it receives and recording how it ended.
//!
//! A session connects from one of its target's source addresses, reads the backend's name,
//! sends its header and upload and reads its download, in one of five shapes ([`Mode`]). The
//! loop keeps `concurrent` long sessions open (a finished one is replaced at once) and starts
//! `rate` short ones a second; explicit sessions come through [`Control::push`].

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::rng::{count_wrong, fill, size, stream_key, take_line, Rng};

const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Upload, shut the write side, read the download to EOF.
    ClientFirst,
    /// Read the download to the backend's EOF, then upload and shut down.
    BackendFirst,
    /// Read the name, upload, close at once without reading anything more.
    SendThenClose,
    /// Like `ClientFirst`, reading at most `slow` bytes a second.
    SlowReader,
    /// Send the header and wait: closed by the peer (an idle timeout) or by [`Control::release`].
    Hold,
}

impl Mode {
    fn letter(self) -> char {
        match self {
            Mode::ClientFirst => 'C',
            Mode::BackendFirst => 'B',
            Mode::SendThenClose => 'X',
            Mode::SlowReader => 'S',
            Mode::Hold => 'H',
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub id: u64,
    pub source: IpAddr,
    pub to: SocketAddr,
    pub up: u64,
    pub down: u64,
    pub mode: Mode,
    /// Which phase or group started it (the driver's label).
    pub tag: u8,
    /// A short session of the arrival rate rather than one of the pool.
    pub short: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Every byte came, in order, and the upload was sent.
    Done,
    /// The TCP handshake with tether failed.
    ConnectFailed,
    /// Reset or closed before the backend's name arrived.
    NoHello,
    /// Reset, or closed before the whole download, after the name.
    Broken,
    /// No byte moved for the stall timeout.
    Stalled,
    /// Still open when the load stopped.
    Cut,
    /// A `Hold` session closed by the peer.
    Closed,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub spec: Spec,
    pub started: f64,
    pub ended: f64,
    pub last_rx: f64,
    pub backend: Option<String>,
    pub end: End,
    pub down_got: u64,
    pub down_wrong: u64,
    pub error: Option<String>,
}

/// Shared knobs of a running load.
#[derive(Default)]
pub struct Control {
    pub tag: AtomicU8,
    pub concurrent: AtomicUsize,
    /// Short sessions a second, times 1000.
    pub rate_milli: AtomicU64,
    /// Stop starting sessions; finish the open ones (until the drain deadline).
    pub stop: AtomicBool,
    /// `Hold` sessions shut their write side and finish.
    pub release: AtomicBool,
    pub open: AtomicUsize,
    /// Short sessions not started because `max_open` sessions were open (the harness's own
    /// descriptor budget, not tether's).
    pub deferred: AtomicU64,
    pushed: Mutex<Vec<Spec>>,
}

impl Control {
    pub fn push(&self, specs: Vec<Spec>) {
        self.pushed.lock().unwrap_or_else(|e| e.into_inner()).extend(specs);
    }
}

/// What the pool and the arrivals are made of.
#[derive(Clone)]
pub struct Load {
    /// Where sessions go, and from: each pair is equally likely.
    pub targets: Vec<(SocketAddr, IpAddr)>,
    pub max_size: u64,
    pub stall: Duration,
    /// Bytes a second a `SlowReader` reads.
    pub slow: u64,
    /// How long open sessions may take to finish once stopped.
    pub drain: Duration,
    pub first_id: u64,
    /// Most sessions open at once in this process (its fd limit less a reserve).
    pub max_open: usize,
    /// Where to write `ss -tinm` of the sessions still open halfway through the drain.
    pub diagnose: Option<std::path::PathBuf>,
}

struct Sess {
    spec: Spec,
    stream: TcpStream,
    started: Instant,
    connected: bool,
    hello: Vec<u8>,
    backend: Option<String>,
    header: Vec<u8>,
    header_sent: usize,
    up_sent: u64,
    down_got: u64,
    down_wrong: u64,
    eof: bool,
    shut: bool,
    last_progress: Instant,
    last_rx: Instant,
    allowance: f64,
    refilled: Instant,
    /// Stopped at its turn's budget with more to do: visited again next turn (the sockets are
    /// edge-triggered, so no event would come for what is already there).
    more: bool,
}

/// Passes through a session's reads and writes in one turn (at most 64 KiB each way a pass):
/// one big transfer must not hold up thousands of small ones.
const PASSES_PER_TURN: usize = 4;

pub fn run(
    load: &Load,
    mut rng: Rng,
    control: &Control,
    epoch: Instant,
) -> io::Result<Vec<Outcome>> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut sessions: HashMap<usize, Sess> = HashMap::new();
    let mut outcomes = Vec::new();
    let (mut buf, mut scratch) = (vec![0u8; CHUNK], Vec::new());
    let mut next_token = 0usize;
    let mut next_id = load.first_id;
    let mut pool_open = 0usize;
    let mut arrivals = 0.0f64;
    let mut last_tick = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut again: Vec<usize> = Vec::new();
    let mut diagnosed = false;
    let mut stalls_diagnosed = 0;
    let since = |t: Instant| t.duration_since(epoch).as_secs_f64();
    loop {
        let now = Instant::now();
        let stopping = control.stop.load(Relaxed);
        if stopping && stopped_at.is_none() {
            stopped_at = Some(now);
        }
        let mut starts: Vec<Spec> =
            std::mem::take(&mut *control.pushed.lock().unwrap_or_else(|e| e.into_inner()));
        if !stopping {
            // The pool refills at most a tenth of itself a tick (a ramp, not one burst).
            let want = control.concurrent.load(Relaxed);
            let free = load.max_open.saturating_sub(sessions.len());
            let room = want.saturating_sub(pool_open).min(want / 10 + 1).min(free);
            for _ in 0..room {
                starts.push(pool_spec(&mut rng, load, &mut next_id, control.tag.load(Relaxed)));
            }
            let rate = control.rate_milli.load(Relaxed) as f64 / 1000.0;
            arrivals += rate * now.duration_since(last_tick).as_secs_f64();
            while arrivals >= 1.0 {
                arrivals -= 1.0;
                if sessions.len() + starts.len() >= load.max_open {
                    control.deferred.fetch_add(1, Relaxed);
                    continue;
                }
                starts.push(short_spec(&mut rng, load, &mut next_id, control.tag.load(Relaxed)));
            }
        }
        last_tick = now;
        for spec in starts {
            if !spec.short && spec.mode != Mode::Hold {
                pool_open += 1;
            }
            match open(&spec) {
                Ok(mut stream) => {
                    let token = next_token;
                    next_token += 1;
                    poll.registry().register(
                        &mut stream,
                        Token(token),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    let header =
                        format!("S {} {} {} {}\n", spec.id, spec.up, spec.down, spec.mode.letter())
                            .into_bytes();
                    sessions.insert(
                        token,
                        Sess {
                            spec,
                            stream,
                            started: now,
                            connected: false,
                            hello: Vec::new(),
                            backend: None,
                            header,
                            header_sent: 0,
                            up_sent: 0,
                            down_got: 0,
                            down_wrong: 0,
                            eof: false,
                            shut: false,
                            last_progress: now,
                            last_rx: now,
                            allowance: 0.0,
                            refilled: now,
                            more: false,
                        },
                    );
                }
                Err(e) => {
                    if !spec.short && spec.mode != Mode::Hold {
                        pool_open -= 1;
                    }
                    outcomes.push(Outcome {
                        spec,
                        started: since(now),
                        ended: since(now),
                        last_rx: since(now),
                        backend: None,
                        end: End::ConnectFailed,
                        down_got: 0,
                        down_wrong: 0,
                        error: Some(e.to_string()),
                    });
                }
            }
        }
        control.open.store(sessions.len(), Relaxed);
        if stopping
            && sessions.is_empty()
            && control.pushed.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
        {
            return Ok(outcomes);
        }
        let wait = if again.is_empty() { Duration::from_millis(20) } else { Duration::ZERO };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let mut touched: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        touched.append(&mut again);
        // Sessions that wait on a clock: slow readers, holds being released, stall checks.
        let now = Instant::now();
        let release = control.release.load(Relaxed);
        for (t, s) in &sessions {
            if s.spec.mode == Mode::SlowReader || (release && s.spec.mode == Mode::Hold) {
                touched.push(*t);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for t in touched {
            let Some(s) = sessions.get_mut(&t) else { continue };
            let result = advance(s, load, release, &mut buf, &mut scratch);
            let end = match result {
                Ok(None) => None,
                Ok(Some(end)) => Some((end, None)),
                Err(e) => Some((failure(s), Some(e.to_string()))),
            };
            if let Some((end, error)) = end {
                let s = sessions.remove(&t).expect("present");
                outcomes.push(finish(s, end, error, epoch, &mut pool_open));
            } else if std::mem::take(&mut s.more) {
                again.push(t);
            }
        }
        // Stalls, and the drain deadline after a stop.
        let cut = stopped_at.is_some_and(|at| now.duration_since(at) > load.drain);
        if let (Some(at), Some(path)) = (stopped_at, &load.diagnose) {
            if !diagnosed && now.duration_since(at) > load.drain / 2 && !sessions.is_empty() {
                diagnosed = true;
                let ports: Vec<u16> = sessions
                    .values()
                    .filter_map(|s| s.stream.local_addr().ok())
                    .map(|a| a.port())
                    .collect();
                let _ = diagnose(path, &ports);
            }
        }
        let stalled: Vec<usize> = sessions
            .iter()
            .filter(|(_, s)| {
                cut || (s.spec.mode != Mode::Hold
                    && now.duration_since(s.last_progress) > load.stall)
            })
            .map(|(t, _)| *t)
            .collect();
        for t in stalled {
            let mut s = sessions.remove(&t).expect("present");
            let end = if cut {
                End::Cut
            } else if !s.connected {
                End::ConnectFailed
            } else {
                End::Stalled
            };
            // Where the bytes wait: readable here already (this loop missed a wake-up) or not
            // (they are upstream, in tether or a backend).
            let waiting = match s.stream.read(&mut buf) {
                Ok(0) => "EOF readable here".to_string(),
                Ok(n) => format!("{n} bytes readable here"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => "nothing readable here".to_string(),
                Err(e) => format!("read: {e}"),
            };
            if end == End::Stalled && stalls_diagnosed < 5 {
                // What the kernel says of this client's socket and tether's end of it.
                stalls_diagnosed += 1;
                if let (Some(path), Ok(local)) = (&load.diagnose, s.stream.local_addr()) {
                    let _ = diagnose(
                        &path.with_file_name(format!("stall-{}.txt", s.spec.id)),
                        &[local.port()],
                    );
                }
            }
            let ago = now.duration_since(s.last_progress).as_secs_f64();
            let note = format!("no progress for {ago:.1} s; {waiting}; more={}", s.more);
            outcomes.push(finish(s, end, Some(note), epoch, &mut pool_open));
        }
    }
}

fn failure(s: &Sess) -> End {
    if !s.connected {
        End::ConnectFailed
    } else if s.backend.is_none() {
        End::NoHello
    } else if s.spec.mode == Mode::Hold {
        // Closed by the peer with a reset rather than a FIN (tether's idle timeout resets).
        End::Closed
    } else {
        End::Broken
    }
}

fn finish(
    s: Sess,
    end: End,
    error: Option<String>,
    epoch: Instant,
    pool_open: &mut usize,
) -> Outcome {
    if !s.spec.short && s.spec.mode != Mode::Hold {
        *pool_open -= 1;
    }
    let since = |t: Instant| t.duration_since(epoch).as_secs_f64();
    Outcome {
        started: since(s.started),
        ended: since(Instant::now()),
        last_rx: since(s.last_rx),
        backend: s.backend,
        end,
        down_got: s.down_got,
        down_wrong: s.down_wrong,
        error,
        spec: s.spec,
    }
}

fn open(spec: &Spec) -> io::Result<TcpStream> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(spec.to), socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(spec.source, 0).into())?;
    match socket.connect(&spec.to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn pool_spec(rng: &mut Rng, load: &Load, next_id: &mut u64, tag: u8) -> Spec {
    let (to, source) = load.targets[rng.below(load.targets.len() as u64) as usize];
    let mode = match rng.below(100) {
        0..=44 => Mode::ClientFirst,
        45..=64 => Mode::BackendFirst,
        65..=84 => Mode::SendThenClose,
        _ => Mode::SlowReader,
    };
    let up = size(rng, load.max_size);
    let down = match mode {
        Mode::SendThenClose => 0,
        // A slow reader's download takes at most a few seconds at its pace.
        Mode::SlowReader => size(rng, load.max_size).min(load.slow * 4),
        _ => size(rng, load.max_size),
    };
    *next_id += 1;
    Spec { id: *next_id, source, to, up, down, mode, tag, short: false }
}

fn short_spec(rng: &mut Rng, load: &Load, next_id: &mut u64, tag: u8) -> Spec {
    let (to, source) = load.targets[rng.below(load.targets.len() as u64) as usize];
    *next_id += 1;
    let (up, down) = (rng.below(4097), rng.below(4097));
    Spec { id: *next_id, source, to, up, down, mode: Mode::ClientFirst, tag, short: true }
}

/// Moves a session until it would block: `Some(end)` once it is over.
fn advance(
    s: &mut Sess,
    load: &Load,
    release: bool,
    buf: &mut [u8],
    scratch: &mut Vec<u8>,
) -> io::Result<Option<End>> {
    if !s.connected {
        if let Some(e) = s.stream.take_error()? {
            // A reset (not a refusal) means the handshake completed: tether accepted, then
            // closed before the backend's name came.
            if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) {
                s.connected = true;
            }
            return Err(io::Error::new(e.kind(), format!("connect: {e}")));
        }
        match s.stream.peer_addr() {
            Ok(_) => s.connected = true,
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("peer_addr: {e}"))),
        }
    }
    let now = Instant::now();
    for _ in 0..PASSES_PER_TURN {
        let mut progress = false;
        // Writes: the header, the upload, the shutdown.
        let may_send = match s.spec.mode {
            Mode::SendThenClose => s.backend.is_some(),
            _ => true,
        };
        if may_send && s.header_sent < s.header.len() {
            match s.stream.write(&s.header[s.header_sent..]) {
                Ok(n) => {
                    s.header_sent += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("write header: {e}"))),
            }
        }
        let may_upload = s.header_sent == s.header.len()
            && match s.spec.mode {
                Mode::BackendFirst => s.eof,
                _ => true,
            };
        if may_upload && s.up_sent < s.spec.up {
            let n = ((s.spec.up - s.up_sent) as usize).min(buf.len());
            fill(stream_key(s.spec.id, false), s.up_sent, &mut buf[..n]);
            match s.stream.write(&buf[..n]) {
                Ok(w) => {
                    s.up_sent += w as u64;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("write upload: {e}"))),
            }
        }
        let uploaded = may_upload && s.up_sent == s.spec.up;
        if uploaded && s.spec.mode == Mode::SendThenClose {
            // Close with the upload perhaps still in the socket's buffer: tether must deliver it.
            return Ok(Some(End::Done));
        }
        let shut_now = uploaded && !s.shut && (s.spec.mode != Mode::Hold || release);
        if shut_now {
            s.stream
                .shutdown(Shutdown::Write)
                .map_err(|e| io::Error::new(e.kind(), format!("shutdown: {e}")))?;
            s.shut = true;
            progress = true;
        }
        // Reads: the name, then the download.
        let mut want = buf.len();
        if s.spec.mode == Mode::SlowReader && s.backend.is_some() {
            s.allowance = (s.allowance
                + load.slow as f64 * now.duration_since(s.refilled).as_secs_f64())
            .min(load.slow as f64);
            s.refilled = now;
            want = want.min(s.allowance as usize);
        }
        let reads =
            !s.eof && want > 0 && !(s.spec.mode == Mode::SendThenClose && s.backend.is_some());
        if reads {
            match s.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    s.eof = true;
                    progress = true;
                    if s.backend.is_none() {
                        return Ok(Some(End::NoHello));
                    }
                    if s.spec.mode == Mode::Hold && !release {
                        return Ok(Some(End::Closed));
                    }
                    if s.down_got < s.spec.down {
                        return Ok(Some(End::Broken));
                    }
                }
                Ok(n) => {
                    progress = true;
                    s.last_rx = now;
                    if s.spec.mode == Mode::SlowReader && s.backend.is_some() {
                        s.allowance -= n as f64;
                    }
                    let mut data = &buf[..n];
                    if s.backend.is_none() {
                        let (rest, complete) = take_line(&mut s.hello, data, 64)?;
                        data = rest;
                        if complete {
                            let name =
                                String::from_utf8_lossy(&s.hello[..s.hello.len() - 1]).into_owned();
                            s.backend = Some(name);
                        }
                    }
                    if !data.is_empty() {
                        let inside = (s.spec.down.saturating_sub(s.down_got)).min(data.len() as u64)
                            as usize;
                        s.down_wrong += count_wrong(
                            stream_key(s.spec.id, true),
                            s.down_got,
                            &data[..inside],
                            scratch,
                        );
                        s.down_got += data.len() as u64;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("read: {e}"))),
            }
        }
        if progress {
            s.last_progress = now;
        }
        if s.eof && s.shut && s.backend.is_some() {
            return Ok(Some(End::Done));
        }
        if !progress {
            return Ok(None);
        }
    }
    s.more = true;
    Ok(None)
}

/// Writes what the kernel says of the client sockets on `ports` and of their peers (`ss -tinm`:
/// windows, queues, retransmissions).
fn diagnose(path: &std::path::Path, ports: &[u16]) -> io::Result<()> {
    let out = std::process::Command::new("ss").args(["-tinmHO"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let wanted: Vec<String> = ports.iter().map(|p| format!(":{p} ")).collect();
    // The sessions' own sockets, and every socket toward a backend (port 7000) with bytes
    // queued: the other leg of a stalled session is among them.
    let queued = |l: &str| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 4
            && (f[1] != "0" || f[2] != "0")
            && (f[3].ends_with(":7000") || f[4].ends_with(":7000"))
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| wanted.iter().any(|w| l.contains(w.as_str())) || queued(l))
        .collect();
    // Whether the kernel was short of TCP memory (it then drops segments on every socket).
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pressures = testkit::netstat("TcpExt", "TCPMemoryPressures");
    let head = format!("{sockstat}TCPMemoryPressures {pressures}\n");
    std::fs::write(path, head + &lines.join("\n") + "\n")
}
