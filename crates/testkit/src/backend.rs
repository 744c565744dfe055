//! A named TCP test backend speaking a one-line command protocol.
//!
//! The client sends one command line ending in `\n`; what follows depends on the command:
//!
//! | command | backend |
//! | --- | --- |
//! | `name` | writes `<name>\n`, closes |
//! | `peer` | writes `<name> <peer address>\n` (who connected: the proxy's side), closes |
//! | `hold` | writes `<name>\n`, then waits until the client closes or sends anything, closes |
//! | `echo` | writes back every byte after the command line until EOF, shuts down its write side |
//! | `sink` | reads until EOF, writes `<bytes> <digest-hex>\n`, closes |
//! | `source N` | writes N [`pattern`](crate::pattern) bytes and closes at once |
//! | `source-then-read N` | writes N pattern bytes, shuts down its write side, reads until EOF |
//! | `reset` | writes `bye\n`, closes with `SO_LINGER` 0 (an RST) |
//! | `source-then-reset N` | writes up to N pattern bytes until the peer stops taking them, then sends an RST; logs how many the peer acknowledged |
//! | `await` | logs [`Outcome::Started`], reads until EOF or reset |
//! | anything else | writes `error unknown command\n` (`error bad count\n` for a bad N), closes |
//!
//! Every connection is logged as an [`Event`] with the peer address, so a test behind `tether`
//! sees which source address the proxy used and how the session ended on the backend's side.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::data::{digest_of, hex, Digest};
use crate::journal::Journal;
use crate::lock;

/// Listen backlog: deep enough that the bench's bursts of clients never see a SYN dropped.
const LISTEN_BACKLOG: i32 = 1024;
/// Longest command line read before the command is called unknown.
const MAX_COMMAND_LINE: usize = 256;
/// Read and write chunk for payloads.
const CHUNK: usize = 64 * 1024;
/// Most of what a `source-then-read` client sends that is kept for [`Outcome::ReceivedLine`].
const MAX_RECEIVED_LINE: usize = 64 * 1024;
/// Pause after an accept error that a retry cannot fix at once (out of descriptors or memory),
/// so a starved backend does not spin a core while tests run.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A running test backend: a listener and its accept thread, one thread per connection.
///
/// Dropping it [`stop`](Backend::stop)s it.
pub struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Kept to shut it down from [`Backend::stop`] while the accept thread blocks in it.
    listener: Option<Arc<TcpListener>>,
    acceptor: Option<JoinHandle<()>>,
}

/// What happened on one connection, as the backend saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Connection number, from 0 in accept order; a connection may log more than one event.
    pub conn: u64,
    /// The client's address: behind `tether`, the source address the proxy connected from.
    pub peer: SocketAddr,
    /// The command line, trimmed; empty if the connection ended before a full line.
    pub command: String,
    pub outcome: Outcome,
    pub at: Instant,
}

/// How a connection ended, or how far it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `hold` or `await` is established and now waits on the client; the connection's final
    /// event follows later.
    Started,
    /// The backend wrote its reply (`bytes` long) and closed: `name`, `source`, `reset` and
    /// unknown commands.
    Sent {
        bytes: u64,
    },
    /// The client shut down its write side after sending `bytes` bytes (after the command line,
    /// or of the partial line when `command` is empty) with this digest.
    Eof {
        bytes: u64,
        digest: u64,
    },
    /// What the client sent: after the command line for `source-then-read`, the first bytes
    /// after the command line for `hold`. Lossy UTF-8, trimmed.
    ReceivedLine(String),
    /// The client reset the connection (ECONNRESET).
    Reset,
    /// [`Backend::stop`] closed the connection.
    Stopped,
    Error(String),
}

/// State shared by the [`Backend`] handle, the accept thread and the connection threads.
struct Shared {
    name: String,
    stopping: AtomicBool,
    accepted: AtomicUsize,
    log: Journal<Event>,
    /// A clone of every open connection, so [`Backend::stop`] can shut them all down. A
    /// connection thread removes its clone before it closes, or the close would send nothing.
    open: Mutex<HashMap<u64, TcpStream>>,
}

/// A parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Name,
    Peer,
    Hold,
    Echo,
    Sink,
    Source(u64),
    SourceThenRead(u64),
    SourceThenReset(u64),
    Reset,
    Await,
}

/// The first line read from a connection.
enum Line {
    /// A full line, trimmed, and the bytes read after its `\n`.
    Complete { line: String, rest: Vec<u8> },
    /// The client shut down its write side before a `\n`, after sending these bytes.
    Closed(Vec<u8>),
}

impl Backend {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    pub fn start(name: &str, addr: SocketAddr) -> io::Result<Backend> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // A backend restarted on its old port must bind while that port still has connections
        // in TIME_WAIT; SO_REUSEADDR allows it (socket(7)).
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = Arc::new(TcpListener::from(socket));
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            stopping: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            log: Journal::new(),
            open: Mutex::new(HashMap::new()),
        });
        let acceptor = thread::Builder::new().name(format!("backend {name}")).spawn({
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            move || shared.accept_loop(&listener)
        })?;
        Ok(Backend { addr, shared, listener: Some(listener), acceptor: Some(acceptor) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Closes the listener, so that new connects are refused, and every open connection (the
    /// client reads EOF), then waits for all threads. Idempotent.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(listener) = &self.listener {
            // shutdown(2) on a listening socket takes it out of the listen state, so SYNs get an
            // RST from here on, and wakes the accept(2) blocked on it with EINVAL.
            if let Err(e) = SockRef::from(&**listener).shutdown(Shutdown::Both) {
                log::warn!("backend {}: shutdown of listener: {e}", self.shared.name);
            }
        }
        if acceptor.join().is_err() {
            log::error!("backend {}: accept thread panicked", self.shared.name);
        }
        self.listener = None;
        self.shared.log.close();
    }

    /// Connections accepted so far (health checks included).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.open).len()
    }

    /// Every event so far, in order.
    pub fn log(&self) -> Vec<Event> {
        self.shared.log.snapshot()
    }

    /// Waits until `pred` holds over the log (true) or `timeout` passes (false; at once if the
    /// backend is stopped and `pred` does not hold). `pred` runs under the log's lock: it must
    /// not call back into this backend.
    pub fn wait_for(&self, pred: impl FnMut(&[Event]) -> bool, timeout: Duration) -> bool {
        self.shared.log.wait_for(pred, timeout)
    }

    /// Events whose command is `command`, in order.
    pub fn events_for(&self, command: &str) -> Vec<Event> {
        self.shared.log.with(|log| log.iter().filter(|e| e.command == command).cloned().collect())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.shared.name)
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .finish()
    }
}

impl Shared {
    fn accept_loop(self: &Arc<Self>, listener: &TcpListener) {
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let mut next_conn = 0;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    let conn = next_conn;
                    next_conn += 1;
                    // Finished threads need no join; dropping their handles frees them.
                    workers.retain(|worker| !worker.is_finished());
                    if let Some(worker) = self.spawn_session(conn, peer, stream) {
                        workers.push(worker);
                    }
                }
                Err(_) if self.stopping.load(Ordering::SeqCst) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!("backend {}: accept: {e}", self.name);
                    thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
        // Stopping: wake every session (reads see EOF, writes EPIPE) and wait for its thread.
        for stream in lock(&self.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for worker in workers {
            if worker.join().is_err() {
                log::error!("backend {}: a connection thread panicked", self.name);
            }
        }
    }

    fn spawn_session(
        self: &Arc<Self>,
        conn: u64,
        peer: SocketAddr,
        stream: TcpStream,
    ) -> Option<JoinHandle<()>> {
        let clone = match stream.try_clone() {
            Ok(clone) => clone,
            Err(e) => {
                self.record(conn, peer, "", Outcome::Error(format!("clone: {e}")));
                return None;
            }
        };
        lock(&self.open).insert(conn, clone);
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("backend {} #{conn}", self.name))
            .spawn(move || shared.serve(conn, peer, stream));
        match spawned {
            Ok(worker) => Some(worker),
            Err(e) => {
                lock(&self.open).remove(&conn);
                self.record(conn, peer, "", Outcome::Error(format!("spawn: {e}")));
                None
            }
        }
    }

    /// Runs one connection: the whole session, then its final event, then the close.
    fn serve(&self, conn: u64, peer: SocketAddr, mut stream: TcpStream) {
        let (command, outcome) = self.session(conn, peer, &mut stream);
        let outcome = match outcome {
            Outcome::Eof { .. } | Outcome::Reset | Outcome::Error(_)
                if self.stopping.load(Ordering::SeqCst) =>
            {
                Outcome::Stopped
            }
            outcome => outcome,
        };
        // Logged before the close, so a client that saw the close finds the event in the log.
        self.record(conn, peer, &command, outcome);
        lock(&self.open).remove(&conn);
        drop(stream);
    }

    /// Reads the command line and runs the command; returns the command and its outcome.
    fn session(&self, conn: u64, peer: SocketAddr, stream: &mut TcpStream) -> (String, Outcome) {
        let (line, rest) = match read_command(stream) {
            Ok(Line::Complete { line, rest }) => (line, rest),
            Ok(Line::Closed(partial)) => {
                let outcome =
                    Outcome::Eof { bytes: partial.len() as u64, digest: digest_of(&partial) };
                return (String::new(), outcome);
            }
            Err(e) => return (String::new(), failure(e)),
        };
        let outcome = match Command::parse(&line) {
            Ok(command) => self.run(command, conn, peer, &line, rest, stream),
            Err(reason) => reply(stream, format!("error {reason}\n").as_bytes()),
        };
        (line, outcome)
    }

    fn run(
        &self,
        command: Command,
        conn: u64,
        peer: SocketAddr,
        line: &str,
        rest: Vec<u8>,
        stream: &mut TcpStream,
    ) -> Outcome {
        let result = match command {
            Command::Name => return reply(stream, format!("{}\n", self.name).as_bytes()),
            Command::Peer => return reply(stream, format!("{} {peer}\n", self.name).as_bytes()),
            Command::Hold => self.hold(conn, peer, line, rest, stream),
            Command::Echo => echo(rest, stream),
            Command::Sink => sink(rest, stream),
            Command::Source(n) => write_pattern(stream, n).map(|()| Outcome::Sent { bytes: n }),
            Command::SourceThenRead(n) => source_then_read(n, rest, stream),
            Command::SourceThenReset(n) => source_then_reset(n, stream),
            Command::Reset => reset(stream),
            Command::Await => {
                self.record(conn, peer, line, Outcome::Started);
                read_to_eof(rest, stream)
            }
        };
        result.unwrap_or_else(failure)
    }

    /// `hold`: name, then wait for the client to close or speak.
    fn hold(
        &self,
        conn: u64,
        peer: SocketAddr,
        line: &str,
        rest: Vec<u8>,
        stream: &mut TcpStream,
    ) -> io::Result<Outcome> {
        stream.write_all(format!("{}\n", self.name).as_bytes())?;
        self.record(conn, peer, line, Outcome::Started);
        if !rest.is_empty() {
            return Ok(Outcome::ReceivedLine(lossy_trimmed(&rest)));
        }
        let mut buf = [0; 4096];
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            return Ok(Outcome::Eof { bytes: 0, digest: Digest::new().finish() });
        }
        Ok(Outcome::ReceivedLine(lossy_trimmed(&buf[..n])))
    }

    fn record(&self, conn: u64, peer: SocketAddr, command: &str, outcome: Outcome) {
        let event = Event { conn, peer, command: command.to_owned(), outcome, at: Instant::now() };
        log::debug!("backend {}: {event}", self.name);
        self.log.push(event);
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} from {} {:?}: ", self.conn, self.peer, self.command)?;
        match &self.outcome {
            Outcome::Started => write!(f, "started"),
            Outcome::Sent { bytes } => write!(f, "sent {bytes} bytes"),
            Outcome::Eof { bytes, digest } => write!(f, "eof after {bytes} bytes {}", hex(*digest)),
            Outcome::ReceivedLine(line) => write!(f, "received {line:?}"),
            Outcome::Reset => write!(f, "reset"),
            Outcome::Stopped => write!(f, "stopped"),
            Outcome::Error(e) => write!(f, "error {e}"),
        }
    }
}

impl Command {
    /// Parses a trimmed command line; the error is the reply's reason.
    fn parse(line: &str) -> Result<Command, &'static str> {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let count = words.next();
        if words.next().is_some() {
            return Err("unknown command");
        }
        let parse_count = |n: &str| n.parse::<u64>().map_err(|_| "bad count");
        match (verb, count) {
            ("name", None) => Ok(Command::Name),
            ("peer", None) => Ok(Command::Peer),
            ("hold", None) => Ok(Command::Hold),
            ("echo", None) => Ok(Command::Echo),
            ("sink", None) => Ok(Command::Sink),
            ("source", Some(n)) => parse_count(n).map(Command::Source),
            ("source-then-read", Some(n)) => parse_count(n).map(Command::SourceThenRead),
            ("source-then-reset", Some(n)) => parse_count(n).map(Command::SourceThenReset),
            ("reset", None) => Ok(Command::Reset),
            ("await", None) => Ok(Command::Await),
            _ => Err("unknown command"),
        }
    }
}

/// Reads up to the first `\n`; a line longer than [`MAX_COMMAND_LINE`] is returned whole (and
/// will not parse).
fn read_command(stream: &mut impl Read) -> io::Result<Line> {
    let mut line = Vec::with_capacity(512);
    let mut buf = [0; 512];
    loop {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            return Ok(Line::Closed(line));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            let rest = line.split_off(end + 1);
            return Ok(Line::Complete { line: lossy_trimmed(&line), rest });
        }
        if line.len() > MAX_COMMAND_LINE {
            return Ok(Line::Complete { line: lossy_trimmed(&line), rest: Vec::new() });
        }
    }
}

/// `echo`: everything back until EOF, then FIN.
fn echo(rest: Vec<u8>, stream: &mut TcpStream) -> io::Result<Outcome> {
    let mut digest = Digest::new();
    digest.update(&rest);
    stream.write_all(&rest)?;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(Outcome::Eof { bytes: digest.bytes(), digest: digest.finish() })
}

/// `sink`: read until EOF, then reply with the count and digest.
fn sink(rest: Vec<u8>, stream: &mut TcpStream) -> io::Result<Outcome> {
    let outcome = read_to_eof(rest, stream)?;
    if let Outcome::Eof { bytes, digest } = &outcome {
        stream.write_all(format!("{bytes} {}\n", hex(*digest)).as_bytes())?;
    }
    Ok(outcome)
}

/// `source-then-read`: N pattern bytes, FIN, then whatever the client answers until its FIN.
fn source_then_read(n: u64, rest: Vec<u8>, stream: &mut TcpStream) -> io::Result<Outcome> {
    write_pattern(stream, n)?;
    stream.shutdown(Shutdown::Write)?;
    let mut received = rest;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            break;
        }
        let room = MAX_RECEIVED_LINE.saturating_sub(received.len());
        received.extend_from_slice(&buf[..n.min(room)]);
    }
    Ok(Outcome::ReceivedLine(lossy_trimmed(&received)))
}

/// `source-then-reset`: up to N pattern bytes, as many as the peer takes until the pipeline
/// stalls (a write blocks for 300 ms), then an RST once the send queue has settled. Whatever the
/// peer's kernel acknowledged (`written - unsent`) sits in its receive queue or beyond when the
/// reset arrives: the case of FAILURE-MODES F2, data before a reset. Logs `Sent` with that
/// acknowledged count; the unacknowledged rest dies with the reset here, not in the peer.
fn source_then_reset(n: u64, stream: &mut TcpStream) -> io::Result<Outcome> {
    stream.set_write_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = vec![0; CHUNK];
    let mut written = 0u64;
    while written < n {
        let len = (n - written).min(CHUNK as u64) as usize;
        crate::pattern(written, &mut buf[..len]);
        match stream.write(&buf[..len]) {
            Ok(k) => written += k as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Settled: the unsent count has not changed over three checks 50 ms apart.
    let mut last = -1;
    let mut same = 0;
    let settled = crate::wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(50)); // the settling interval itself
        let now = crate::sys::unsent(stream);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        same >= 3
    });
    let unsent = crate::sys::unsent(stream).max(0) as u64;
    SockRef::from(&*stream).set_linger(Some(Duration::ZERO))?;
    if !settled {
        return Ok(Outcome::Error("send queue never settled".into()));
    }
    Ok(Outcome::Sent { bytes: written - unsent })
}

/// `reset`: `bye\n`, then an RST instead of a FIN: with SO_LINGER on and a zero timeout,
/// close(2) aborts the connection (socket(7), SO_LINGER; RFC 9293 section 3.10.4, ABORT).
fn reset(stream: &mut TcpStream) -> io::Result<Outcome> {
    stream.write_all(b"bye\n")?;
    SockRef::from(&*stream).set_linger(Some(Duration::ZERO))?;
    Ok(Outcome::Sent { bytes: 4 })
}

/// Reads until EOF, counting and digesting `rest` and everything after it.
fn read_to_eof(rest: Vec<u8>, stream: &mut TcpStream) -> io::Result<Outcome> {
    let mut digest = Digest::new();
    digest.update(&rest);
    let mut buf = vec![0; CHUNK];
    loop {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            return Ok(Outcome::Eof { bytes: digest.bytes(), digest: digest.finish() });
        }
        digest.update(&buf[..n]);
    }
}

/// Writes the first `n` pattern bytes.
fn write_pattern(stream: &mut TcpStream, n: u64) -> io::Result<()> {
    crate::client::write_pattern(stream, n).map(drop)
}

/// Writes a whole reply; the caller then closes.
fn reply(stream: &mut TcpStream, bytes: &[u8]) -> Outcome {
    match stream.write_all(bytes) {
        Ok(()) => Outcome::Sent { bytes: bytes.len() as u64 },
        Err(e) => failure(e),
    }
}

/// One read, retried on EINTR.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

fn failure(e: io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionReset => Outcome::Reset,
        _ => Outcome::Error(e.to_string()),
    }
}

fn lossy_trimmed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::client::{
        ask_name, client_ip, connect_from, hold, parse_sink_reply, read_line, read_to_end_digest,
        send_command, send_reset, CONNECT_TIMEOUT,
    };
    use crate::data::{digest_of_pattern, pattern};

    const WAIT: Duration = Duration::from_secs(10);

    fn backend(name: &str) -> Backend {
        Backend::start(name, "127.0.0.1:0".parse().unwrap()).unwrap()
    }

    fn connect(backend: &Backend, client: u32) -> TcpStream {
        connect_from(client_ip(client), backend.addr(), CONNECT_TIMEOUT).unwrap()
    }

    /// Waits for the final event of the session with `command` and returns its outcome.
    fn outcome_of(backend: &Backend, command: &str) -> Outcome {
        let done = |e: &Event| e.command == command && e.outcome != Outcome::Started;
        assert!(backend.wait_for(|log| log.iter().any(done), WAIT), "{:#?}", backend.log());
        backend.log().into_iter().find(done).unwrap().outcome
    }

    fn reply_to(backend: &Backend, command: &str) -> Vec<u8> {
        let mut stream = connect(backend, 0);
        send_command(&mut stream, command).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        reply
    }

    // --- one-shot replies ---

    #[test]
    fn name_replies_and_logs_the_peer() {
        let backend = backend("alpha");
        assert_eq!(ask_name(client_ip(3), backend.addr()).unwrap(), "alpha");
        assert_eq!(outcome_of(&backend, "name"), Outcome::Sent { bytes: 6 });
        let event = &backend.log()[0];
        assert_eq!(event.peer.ip(), client_ip(3));
        assert_eq!(event.conn, 0);
        assert_eq!(backend.connections(), 1);
        assert_eq!(backend.name(), "alpha");
    }

    #[test]
    fn unknown_command_is_an_error_reply() {
        let backend = backend("b");
        assert_eq!(reply_to(&backend, "dance"), b"error unknown command\n");
        assert_eq!(reply_to(&backend, "source x"), b"error bad count\n");
        assert_eq!(reply_to(&backend, "name please"), b"error unknown command\n");
        assert_eq!(backend.events_for("dance")[0].outcome, Outcome::Sent { bytes: 22 });
    }

    #[test]
    fn overlong_command_line_is_unknown() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        send_command(&mut stream, &"x".repeat(1000)).unwrap();
        // The backend closes with the rest of the line unread, so an RST may follow the reply.
        assert_eq!(read_line(&mut stream).unwrap(), "error unknown command");
    }

    #[test]
    fn connection_without_a_command_is_logged() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        stream.write_all(b"na").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let outcome = outcome_of(&backend, "");
        assert_eq!(outcome, Outcome::Eof { bytes: 2, digest: digest_of(b"na") });
    }

    #[test]
    fn source_sends_the_pattern_then_closes() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        send_command(&mut stream, "source 1000003").unwrap();
        let received = read_to_end_digest(&mut stream, None).unwrap();
        assert_eq!(received, (1_000_003, digest_of_pattern(1_000_003)));
        assert_eq!(outcome_of(&backend, "source 1000003"), Outcome::Sent { bytes: 1_000_003 });
    }

    #[test]
    fn reset_sends_bye_then_rst() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        send_command(&mut stream, "reset").unwrap();
        assert_eq!(read_line(&mut stream).unwrap(), "bye");
        let mut buf = [0; 16];
        let error = stream.read(&mut buf).expect_err("read after reset succeeded");
        assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    }

    // --- sessions that read ---

    #[test]
    fn echo_returns_every_byte() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        let mut reader = stream.try_clone().unwrap();
        let reading = thread::spawn(move || read_to_end_digest(&mut reader, None).unwrap());
        // The command and the first data in one write: the backend must split them.
        stream.write_all(b"echo\nhello").unwrap();
        let rest = crate::client::write_pattern(&mut stream, 500_000).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let (bytes, digest) = reading.join().unwrap();
        let mut expected = Digest::new();
        expected.update(b"hello");
        let mut pattern_bytes = vec![0; 500_000];
        pattern(0, &mut pattern_bytes);
        expected.update(&pattern_bytes);
        assert_eq!((bytes, digest), (500_005, expected.finish()));
        assert_ne!(rest, 0);
        let outcome = outcome_of(&backend, "echo");
        assert_eq!(outcome, Outcome::Eof { bytes: 500_005, digest: expected.finish() });
    }

    #[test]
    fn sink_replies_count_and_digest_after_half_close() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        send_command(&mut stream, "sink").unwrap();
        let digest = crate::client::write_pattern(&mut stream, 300_000).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let reply = read_line(&mut stream).unwrap();
        assert_eq!(parse_sink_reply(&reply), Some((300_000, digest)));
        assert_eq!(digest, digest_of_pattern(300_000));
        assert_eq!(outcome_of(&backend, "sink"), Outcome::Eof { bytes: 300_000, digest });
    }

    #[test]
    fn source_then_read_receives_the_line_after_eof() {
        let backend = backend("b");
        let mut stream = connect(&backend, 0);
        send_command(&mut stream, "source-then-read 70000").unwrap();
        let (bytes, digest) = read_to_end_digest(&mut stream, None).unwrap();
        assert_eq!((bytes, digest), (70_000, digest_of_pattern(70_000)));
        stream.write_all(format!("{bytes} {}\n", hex(digest)).as_bytes()).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let expected = format!("70000 {}", hex(digest));
        assert_eq!(outcome_of(&backend, "source-then-read 70000"), Outcome::ReceivedLine(expected));
    }

    #[test]
    fn hold_keeps_the_session_until_the_client_speaks() {
        let backend = backend("holder");
        let (mut stream, name) = hold(client_ip(1), backend.addr()).unwrap();
        assert_eq!(name, "holder");
        assert!(backend.wait_for(|log| log.iter().any(|e| e.outcome == Outcome::Started), WAIT));
        assert_eq!(backend.open_connections(), 1);
        stream.write_all(b"done\n").unwrap();
        assert_eq!(read_to_end_digest(&mut stream, None).unwrap().0, 0);
        assert_eq!(outcome_of(&backend, "hold"), Outcome::ReceivedLine("done".into()));
        assert!(crate::wait_until(WAIT, || backend.open_connections() == 0));
    }

    #[test]
    fn hold_ends_when_the_client_closes() {
        let backend = backend("holder");
        let (stream, _) = hold(client_ip(1), backend.addr()).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let outcome = outcome_of(&backend, "hold");
        assert_eq!(outcome, Outcome::Eof { bytes: 0, digest: Digest::new().finish() });
    }

    #[test]
    fn await_sees_eof_or_reset() {
        let backend = backend("b");
        let mut clean = connect(&backend, 0);
        send_command(&mut clean, "await").unwrap();
        clean.write_all(b"abc").unwrap();
        clean.shutdown(Shutdown::Write).unwrap();

        let mut reset = connect(&backend, 1);
        send_command(&mut reset, "await").unwrap();
        let started = |log: &[Event]| {
            log.iter().any(|e| e.peer.ip() == client_ip(1) && e.outcome == Outcome::Started)
        };
        assert!(backend.wait_for(started, WAIT));
        send_reset(reset).unwrap();

        let ended = |ip: IpAddr| {
            let final_of = |e: &&Event| e.peer.ip() == ip && e.outcome != Outcome::Started;
            assert!(backend.wait_for(|log| log.iter().any(|e| final_of(&e)), WAIT));
            backend.log().iter().find(final_of).unwrap().outcome.clone()
        };
        assert_eq!(ended(client_ip(0)), Outcome::Eof { bytes: 3, digest: digest_of(b"abc") });
        assert_eq!(ended(client_ip(1)), Outcome::Reset);
    }

    // --- stopping ---

    #[test]
    fn stop_refuses_new_connects_and_closes_open_ones() {
        let mut backend = backend("b");
        let addr = backend.addr();
        let (mut held, _) = hold(client_ip(0), addr).unwrap();
        let mut waiting = connect(&backend, 1);
        send_command(&mut waiting, "await").unwrap();
        // A reader that never reads: the backend blocks writing into a full window.
        let mut stalled = connect(&backend, 2);
        send_command(&mut stalled, "source 100000000").unwrap();
        let idle = connect(&backend, 3);
        let all_started =
            |log: &[Event]| log.iter().filter(|e| e.outcome == Outcome::Started).count() == 2;
        assert!(backend.wait_for(all_started, WAIT));
        assert!(crate::wait_until(WAIT, || backend.open_connections() == 4));

        let start = Instant::now();
        backend.stop();
        assert!(start.elapsed() < Duration::from_secs(5), "stop took {:?}", start.elapsed());
        backend.stop();

        let error = connect_from(client_ip(0), addr, CONNECT_TIMEOUT).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
        assert_eq!(read_to_end_digest(&mut held, None).unwrap().0, 0);
        assert_eq!(read_to_end_digest(&mut waiting, None).unwrap().0, 0);
        let stalled_end = read_to_end_digest(&mut stalled, None);
        assert!(matches!(stalled_end, Ok((n, _)) if n < 100_000_000), "{stalled_end:?}");
        drop(idle);
        assert_eq!(backend.open_connections(), 0);
        let stopped = backend.log().iter().filter(|e| e.outcome == Outcome::Stopped).count();
        assert_eq!(stopped, 4, "{:#?}", backend.log());
        // The log is closed: waiting for something that will never come returns at once.
        assert!(!backend.wait_for(|_| false, Duration::from_secs(60)));
    }

    #[test]
    fn restart_on_the_same_port() {
        let mut first = backend("one");
        let addr = first.addr();
        assert_eq!(ask_name(client_ip(0), addr).unwrap(), "one");
        first.stop();
        let second = Backend::start("two", addr).unwrap();
        assert_eq!(ask_name(client_ip(0), addr).unwrap(), "two");
        drop(second);
    }

    #[test]
    fn drop_with_open_sessions_does_not_hang() {
        let backend = backend("b");
        let sessions: Vec<_> =
            (0..20).map(|i| hold(client_ip(i), backend.addr()).unwrap()).collect();
        let start = Instant::now();
        drop(backend);
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(sessions);
    }

    #[test]
    fn command_lines_parse() {
        assert_eq!(Command::parse("source 5"), Ok(Command::Source(5)));
        assert_eq!(Command::parse("source-then-read 0"), Ok(Command::SourceThenRead(0)));
        assert_eq!(Command::parse("source"), Err("unknown command"));
        assert_eq!(Command::parse("source -1"), Err("bad count"));
        assert_eq!(Command::parse(""), Err("unknown command"));
    }
}
