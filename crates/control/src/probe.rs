//! Active health probes: one round checks every backend at once and says, per backend, whether
//! it answered.
//!
//! A round opens one non-blocking socket per target on a single `mio::Poll`, waits at most the
//! round's timeout, and closes every socket before it returns. It keeps no state between rounds
//! besides the `Poll` and a buffer, and it does not decide what a failure means for a backend
//! (how many in a row mark it failing): the caller does, from the outcomes.

use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Registry, Token};

/// Bytes read of a UDP reply. Only a prefix is compared, so a longer datagram is truncated
/// (recv(2): excess bytes of a datagram are discarded); an `expect` longer than this never
/// matches.
const RECV_BUF: usize = 2048;
/// Replies not starting with `expect` that one UDP probe reads before it gives up: a backend
/// answers one request with about one datagram, and the cap bounds the work a flood can cause.
const MAX_WRONG_REPLIES: u32 = 16;
/// Events taken per `poll` call; more ready sockets are simply returned by the next call.
const EVENTS: usize = 256;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// TCP connect to the address; success = handshake completes within the timeout. Then
    /// send `header` (a PROXY header with the LOCAL command for backends that require one, or
    /// nothing) and close.
    Tcp { header: &'static [u8] },
    /// UDP: send `send` on a socket connected to the address; success = a datagram arrives
    /// within the timeout whose bytes start with `expect` (an empty `expect` accepts any reply).
    /// ECONNREFUSED (ICMP port unreachable) = failure at once.
    Udp { send: Vec<u8>, expect: Vec<u8> },
}

/// One address to probe and how.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub kind: ProbeKind,
}

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered as expected.
    Ok,
    /// Why not, for logs and events: "connection refused", "timed out after 1s", ...
    Failed(String),
}

/// Runs rounds of probes: all targets of a round at once on one `mio::Poll`, kept between
/// rounds so a round costs no epoll instance.
pub struct Prober {
    poll: Poll,
    events: Events,
    buf: Vec<u8>,
}

impl Prober {
    /// A prober with its own `Poll` (one file descriptor, kept until it is dropped).
    pub fn new() -> io::Result<Prober> {
        Ok(Prober {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS),
            buf: vec![0; RECV_BUF],
        })
    }

    /// Probe every target at once; one outcome per target, in order. Returns when all have
    /// answered or after `timeout` (plus scheduling slack), and closes every socket it opened.
    /// A target whose socket cannot be opened fails alone.
    pub fn round(&mut self, targets: &[Target], timeout: Duration) -> Vec<Outcome> {
        let Prober { poll, events, buf } = self;
        // No deadline only if `timeout` is too large for an `Instant`: wait for answers alone.
        let deadline = Instant::now().checked_add(timeout);
        let mut probes: Vec<Probe<'_>> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| Probe::open(t, token(i), poll.registry()))
            .collect();
        let mut poll_error = None;
        while probes.iter().any(Probe::pending) {
            let wait = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break,
                },
                None => None,
            };
            match poll.poll(events, wait) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    poll_error = Some(e);
                    break;
                }
            }
            for event in events.iter() {
                // Tokens are indexes into this round's probes; anything else is stale.
                if let Some(probe) = probes.get_mut(index(event.token())) {
                    probe.on_event(poll.registry(), buf);
                }
            }
        }
        let left = match &poll_error {
            Some(e) => Left::PollFailed(e),
            None => Left::TimedOut(timeout),
        };
        probes.into_iter().map(|p| p.close(poll.registry(), &left)).collect()
    }
}

/// The token of the `i`th target of a round; the one place that maps tokens to probes.
fn token(i: usize) -> Token {
    Token(i)
}

/// Inverse of [`token`].
fn index(token: Token) -> usize {
    token.0
}

/// One target's probe during a round.
struct Probe<'a> {
    addr: SocketAddr,
    state: State<'a>,
}

/// Where a probe stands. Every variant but `Done` owns an open, registered socket.
#[derive(Debug)]
enum State<'a> {
    /// TCP handshake in flight; `header` goes out once it completes.
    Connecting { stream: TcpStream, header: &'static [u8] },
    /// UDP request sent; waiting for a reply starting with `expect`.
    Waiting { socket: UdpSocket, expect: &'a [u8], wrong: u32 },
    /// Finished; the socket is closed.
    Done(Outcome),
}

/// Why probes still pending at the end of a round stopped.
enum Left<'e> {
    TimedOut(Duration),
    PollFailed(&'e io::Error),
}

impl<'a> Probe<'a> {
    /// Open and register the socket, and send the request for UDP. A failure here (no socket,
    /// EMFILE, refused at once) makes this probe `Done` and leaves the others alone.
    fn open(target: &'a Target, token: Token, registry: &Registry) -> Probe<'a> {
        let opened = match &target.kind {
            ProbeKind::Tcp { header } => open_tcp(target.addr, header, token, registry),
            ProbeKind::Udp { send, expect } => open_udp(target.addr, send, expect, token, registry),
        };
        let state = opened.unwrap_or_else(State::Done);
        log::trace!("probe {}: opened => {:?}", target.addr, state);
        Probe { addr: target.addr, state }
    }

    fn pending(&self) -> bool {
        !matches!(self.state, State::Done(_))
    }

    /// React to readiness of this probe's socket.
    fn on_event(&mut self, registry: &Registry, buf: &mut [u8]) {
        let finished = match &mut self.state {
            // mio's connect procedure (`TcpStream::connect` docs): on an event, check
            // `take_error`, then `peer_addr`.
            State::Connecting { stream, header } => connected(stream, header),
            // Read until WouldBlock; the first reply with the right prefix passes.
            State::Waiting { socket, expect, wrong } => replied(socket, expect, wrong, buf),
            // Socket closed already: the event is stale.
            State::Done(_) => None,
        };
        if let Some(outcome) = finished {
            self.finish(registry, outcome);
        }
    }

    /// Every change of state goes through here: log it, then close the socket.
    fn finish(&mut self, registry: &Registry, outcome: Outcome) {
        log::trace!("probe {}: {:?} => {:?}", self.addr, self.state, outcome);
        match std::mem::replace(&mut self.state, State::Done(outcome)) {
            // Deregister, then drop to close: a closed socket leaves epoll anyway, but this
            // keeps the Poll's view exact. Errors cannot matter: the socket is going away.
            State::Connecting { mut stream, .. } => drop(registry.deregister(&mut stream)),
            State::Waiting { mut socket, .. } => drop(registry.deregister(&mut socket)),
            State::Done(_) => {}
        }
    }

    /// End of the round: fail what is still pending, close it, hand back the outcome.
    fn close(mut self, registry: &Registry, left: &Left<'_>) -> Outcome {
        let outcome = match (&self.state, left) {
            // Answered in time.
            (State::Done(outcome), _) => return outcome.clone(),
            // The poll itself broke: nobody can tell, so say why.
            (_, Left::PollFailed(e)) => Outcome::Failed(format!("poll: {e}")),
            // Replies came, none of them right: that is the more useful thing to report.
            (State::Waiting { wrong, .. }, Left::TimedOut(t)) if *wrong > 0 => {
                Outcome::Failed(format!("reply did not match ({wrong} replies in {t:?})"))
            }
            // Silence.
            (State::Connecting { .. } | State::Waiting { .. }, Left::TimedOut(t)) => {
                Outcome::Failed(format!("timed out after {t:?}"))
            }
        };
        self.finish(registry, outcome.clone());
        outcome
    }
}

/// Start a non-blocking connect and wait for writable.
fn open_tcp<'a>(
    addr: SocketAddr,
    header: &'static [u8],
    token: Token,
    registry: &Registry,
) -> Result<State<'a>, Outcome> {
    // socket(2) and connect(2) in one call; EINPROGRESS is not an error here.
    let mut stream = TcpStream::connect(addr).map_err(|e| failed("connect", &e))?;
    registry
        .register(&mut stream, token, Interest::WRITABLE)
        .map_err(|e| failed("register", &e))?;
    Ok(State::Connecting { stream, header })
}

/// Send the request on a connected UDP socket and wait for readable.
fn open_udp<'a>(
    addr: SocketAddr,
    send: &[u8],
    expect: &'a [u8],
    token: Token,
    registry: &Registry,
) -> Result<State<'a>, Outcome> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut socket = UdpSocket::bind(local).map_err(|e| failed("bind", &e))?;
    // Connected, so the kernel filters replies from other addresses and reports ICMP port
    // unreachable as ECONNREFUSED on the next recv (udp(7), "ERROR HANDLING").
    socket.connect(addr).map_err(|e| failed("connect", &e))?;
    // The first datagram on a fresh socket does not block: its send buffer is empty. So a
    // WouldBlock here is reported, not waited for.
    socket.send(send).map_err(|e| failed("send", &e))?;
    // Registering after sending loses nothing: epoll reports a reply that is already queued.
    registry
        .register(&mut socket, token, Interest::READABLE)
        .map_err(|e| failed("register", &e))?;
    Ok(State::Waiting { socket, expect, wrong: 0 })
}

/// Whether a connect has finished, and how; `None` if still in flight. Once it has, `header`
/// is sent: it fits a fresh socket's empty send buffer, so a short send is a failure.
fn connected(stream: &TcpStream, header: &[u8]) -> Option<Outcome> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Some(failed("connect", &e)),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) if header.is_empty() => Some(Outcome::Ok),
        Ok(_) => match (&*stream).write(header) {
            Ok(n) if n == header.len() => Some(Outcome::Ok),
            Ok(n) => Some(Outcome::Failed(format!("sent {n} of {} header bytes", header.len()))),
            Err(e) => Some(failed("send", &e)),
        },
        // Not connected yet: a spurious wake-up, wait for the next event.
        Err(e)
            if e.kind() == io::ErrorKind::NotConnected
                || e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) =>
        {
            None
        }
        Err(e) => Some(failed("connect", &e)),
    }
}

/// Read replies until one matches or the socket would block; `None` to keep waiting. Bounded by
/// [`MAX_WRONG_REPLIES`].
fn replied(socket: &UdpSocket, expect: &[u8], wrong: &mut u32, buf: &mut [u8]) -> Option<Outcome> {
    loop {
        match socket.recv(buf) {
            Ok(n) if buf[..n].starts_with(expect) => return Some(Outcome::Ok),
            Ok(_) => {
                *wrong += 1;
                if *wrong >= MAX_WRONG_REPLIES {
                    return Some(Outcome::Failed(format!(
                        "reply did not match ({wrong} replies, none starting with the expected bytes)"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(failed("recv", &e)),
        }
    }
}

/// The outcome for an I/O error at `step`; a refusal reads the same whichever step saw it.
fn failed(step: &str, e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Failed("connection refused".into()),
        _ => Outcome::Failed(format!("{step}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, TcpListener};
    use std::thread::JoinHandle;

    use super::*;

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
    /// For rounds expected to end early: generous, since it is only paid on failure.
    const LONG: Duration = Duration::from_secs(5);
    /// For rounds expected to time out.
    const SHORT: Duration = Duration::from_millis(300);
    /// Allowed lateness of a round past its timeout.
    const SLACK: Duration = Duration::from_secs(2);

    use crate::test_fds::{exclusive, shared};

    fn tcp(addr: SocketAddr) -> Target {
        Target { addr, kind: ProbeKind::Tcp { header: b"" } }
    }

    fn udp(addr: SocketAddr, send: &[u8], expect: &[u8]) -> Target {
        Target { addr, kind: ProbeKind::Udp { send: send.to_vec(), expect: expect.to_vec() } }
    }

    /// A listener that never accepts: the kernel completes handshakes into its backlog.
    fn tcp_up(ip: IpAddr) -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// A port the kernel just handed out and nobody listens on any more.
    fn tcp_closed(ip: IpAddr) -> SocketAddr {
        TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
    }

    fn udp_closed(ip: IpAddr) -> SocketAddr {
        std::net::UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap()
    }

    /// Receives (into its buffer) but never replies.
    fn udp_silent(ip: IpAddr) -> (std::net::UdpSocket, SocketAddr) {
        let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr)
    }

    /// Answers each of `requests` datagrams with every datagram of `replies`, then exits; gives
    /// up after 10 s of silence so a broken test cannot hang.
    fn udp_server(ip: IpAddr, requests: usize, replies: &[&[u8]]) -> (SocketAddr, JoinHandle<()>) {
        let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let addr = s.local_addr().unwrap();
        let replies: Vec<Vec<u8>> = replies.iter().map(|r| r.to_vec()).collect();
        let thread = std::thread::spawn(move || {
            let mut buf = [0; 64];
            for _ in 0..requests {
                let Ok((_, from)) = s.recv_from(&mut buf) else { return };
                for r in &replies {
                    s.send_to(r, from).unwrap();
                }
            }
        });
        (addr, thread)
    }

    /// Run one round and time it.
    fn timed(targets: &[Target], timeout: Duration) -> (Vec<Outcome>, Duration) {
        let mut prober = Prober::new().unwrap();
        let start = Instant::now();
        let outcomes = prober.round(targets, timeout);
        (outcomes, start.elapsed())
    }

    fn assert_timed_out_in_time(elapsed: Duration, timeout: Duration) {
        assert!(elapsed >= timeout, "round ended early: {elapsed:?} < {timeout:?}");
        assert!(elapsed < timeout + SLACK, "round ended late: {elapsed:?}");
    }

    fn failed_with(outcome: &Outcome, start: &str) -> bool {
        matches!(outcome, Outcome::Failed(why) if why.starts_with(start))
    }

    // ---- TCP ----

    #[test]
    fn tcp_listening_port_is_ok() {
        let _fds = shared();
        let (_l, addr) = tcp_up(V4);
        let (outcomes, elapsed) = timed(&[tcp(addr)], LONG);
        assert_eq!(outcomes, [Outcome::Ok]);
        assert!(elapsed < LONG);
    }

    #[test]
    fn tcp_probe_sends_its_header_and_then_closes() {
        let _fds = shared();
        for header in [&proxyproto::V2_LOCAL[..], proxyproto::V1_UNKNOWN] {
            let (l, addr) = tcp_up(V4);
            let target = Target { addr, kind: ProbeKind::Tcp { header } };
            let (outcomes, _) = timed(&[target], LONG);
            assert_eq!(outcomes, [Outcome::Ok]);
            // The round is over, so the probe's socket is closed: the backend reads the header
            // and then end of stream.
            let (mut conn, _) = l.accept().unwrap();
            conn.set_read_timeout(Some(LONG)).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut conn, &mut got).unwrap();
            assert_eq!(got, header);
        }
    }

    #[test]
    fn tcp_closed_port_is_refused_at_once() {
        let _fds = shared();
        let (outcomes, elapsed) = timed(&[tcp(tcp_closed(V4))], LONG);
        assert_eq!(outcomes, [Outcome::Failed("connection refused".into())]);
        assert!(elapsed < LONG);
    }

    // ---- UDP ----

    #[test]
    fn udp_matching_reply_is_ok() {
        let _fds = shared();
        let (addr, server) = udp_server(V4, 1, &[b"pong and more"]);
        let (outcomes, elapsed) = timed(&[udp(addr, b"ping", b"pong")], LONG);
        assert_eq!(outcomes, [Outcome::Ok]);
        assert!(elapsed < LONG);
        server.join().unwrap();
    }

    #[test]
    fn udp_empty_expect_accepts_any_reply() {
        let _fds = shared();
        let (addr, server) = udp_server(V4, 1, &[b""]);
        let (outcomes, _) = timed(&[udp(addr, b"ping", b"")], LONG);
        assert_eq!(outcomes, [Outcome::Ok]);
        server.join().unwrap();
    }

    #[test]
    fn udp_wrong_reply_keeps_waiting_then_fails() {
        let _fds = shared();
        let (addr, server) = udp_server(V4, 1, &[b"nope"]);
        let (outcomes, elapsed) = timed(&[udp(addr, b"ping", b"pong")], SHORT);
        assert!(failed_with(&outcomes[0], "reply did not match"), "{outcomes:?}");
        assert_timed_out_in_time(elapsed, SHORT);
        server.join().unwrap();
    }

    #[test]
    fn udp_wrong_then_right_reply_is_ok() {
        let _fds = shared();
        let (addr, server) = udp_server(V4, 1, &[b"nope", b"pong"]);
        let (outcomes, elapsed) = timed(&[udp(addr, b"ping", b"pong")], LONG);
        assert_eq!(outcomes, [Outcome::Ok]);
        assert!(elapsed < LONG);
        server.join().unwrap();
    }

    #[test]
    fn udp_flood_of_wrong_replies_fails_before_the_timeout() {
        let _fds = shared();
        let flood = [b"nope".as_slice(); MAX_WRONG_REPLIES as usize];
        let (addr, server) = udp_server(V4, 1, &flood);
        let (outcomes, elapsed) = timed(&[udp(addr, b"ping", b"pong")], LONG);
        assert!(failed_with(&outcomes[0], "reply did not match"), "{outcomes:?}");
        assert!(elapsed < LONG);
        server.join().unwrap();
    }

    #[test]
    fn udp_silent_server_times_out() {
        let _fds = shared();
        let (_s, addr) = udp_silent(V4);
        let (outcomes, elapsed) = timed(&[udp(addr, b"ping", b"")], SHORT);
        assert_eq!(outcomes, [Outcome::Failed(format!("timed out after {SHORT:?}"))]);
        assert_timed_out_in_time(elapsed, SHORT);
    }

    #[test]
    fn udp_closed_port_is_refused_at_once() {
        let _fds = shared();
        let (outcomes, elapsed) = timed(&[udp(udp_closed(V4), b"ping", b"")], LONG);
        assert_eq!(outcomes, [Outcome::Failed("connection refused".into())]);
        assert!(elapsed < LONG);
    }

    // ---- rounds ----

    #[test]
    fn no_targets_no_outcomes() {
        let _fds = shared();
        let (outcomes, elapsed) = timed(&[], LONG);
        assert!(outcomes.is_empty());
        assert!(elapsed < LONG);
    }

    #[test]
    fn ipv6_targets_work() {
        let _fds = shared();
        if TcpListener::bind((V6, 0)).is_err() || std::net::UdpSocket::bind((V6, 0)).is_err() {
            eprintln!("skipped: cannot bind [::1]");
            return;
        }
        let (_l, up) = tcp_up(V6);
        let (echo, server) = udp_server(V6, 1, &[b"pong"]);
        let targets = [
            tcp(up),
            tcp(tcp_closed(V6)),
            udp(echo, b"ping", b"pong"),
            udp(udp_closed(V6), b"ping", b""),
        ];
        let (outcomes, elapsed) = timed(&targets, LONG);
        let refused = Outcome::Failed("connection refused".into());
        assert_eq!(outcomes, [Outcome::Ok, refused.clone(), Outcome::Ok, refused]);
        assert!(elapsed < LONG);
        server.join().unwrap();
    }

    #[test]
    fn twenty_mixed_targets_finish_in_one_timeout() {
        let _fds = shared();
        let (_l, up) = tcp_up(V4);
        let (echo, server) = udp_server(V4, 5, &[b"pong"]);
        let (_s, silent) = udp_silent(V4);
        let mut targets = Vec::new();
        let mut expected = Vec::new();
        let timed_out = Outcome::Failed(format!("timed out after {SHORT:?}"));
        let refused = Outcome::Failed("connection refused".into());
        for i in 0..5 {
            targets.extend([tcp(up), tcp(tcp_closed(V4)), udp(echo, b"ping", b"pong")]);
            expected.extend([Outcome::Ok, refused.clone(), Outcome::Ok]);
            // Two closed UDP ports, three silent ones.
            if i < 2 {
                targets.push(udp(udp_closed(V4), b"ping", b""));
                expected.push(refused.clone());
            } else {
                targets.push(udp(silent, b"", b""));
                expected.push(timed_out.clone());
            }
        }
        assert_eq!(targets.len(), 20);
        let (outcomes, elapsed) = timed(&targets, SHORT);
        assert_eq!(outcomes, expected);
        assert_timed_out_in_time(elapsed, SHORT);
        server.join().unwrap();
    }

    #[test]
    fn fifty_rounds_leak_no_fds() {
        let _fds = exclusive();
        let count = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let (_l, up) = tcp_up(V4);
        let (_s, silent) = udp_silent(V4);
        let mut prober = Prober::new().unwrap();
        // Counted before the server opens its socket and after it has exited (and closed it).
        let before = count();
        let (echo, server) = udp_server(V4, 50, &[b"pong"]);
        let targets = [
            tcp(up),
            tcp(tcp_closed(V4)),
            udp(echo, b"ping", b"pong"),
            udp(udp_closed(V4), b"ping", b""),
            udp(silent, b"ping", b""),
        ];
        for _ in 0..50 {
            // Outcomes are not checked: with a short timeout a slow machine may fail some.
            assert_eq!(prober.round(&targets, Duration::from_millis(20)).len(), targets.len());
        }
        server.join().unwrap();
        assert_eq!(count(), before);
    }

    // ---- sockets that cannot be opened ----

    /// Puts the soft fd limit back however the test ends.
    struct RestoreLimit(u64, u64);

    impl Drop for RestoreLimit {
        fn drop(&mut self) {
            let _ = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                self.0,
                self.1,
            );
        }
    }

    /// Lowering the fd limit affects the whole process: the test holds the fd lock alone, so
    /// no other probe test opens sockets meanwhile, and puts the limit back before it returns.
    #[test]
    fn emfile_fails_only_the_targets_without_a_socket() {
        use std::os::fd::AsRawFd;

        use nix::sys::resource::{getrlimit, setrlimit, Resource};

        let _fds = exclusive();
        let mut prober = Prober::new().unwrap();
        let (_l, up) = tcp_up(V4);
        // Allow exactly one more fd: the lowest free one (the next a socket would get).
        let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd() as u64;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let _restore = RestoreLimit(soft, hard);
        setrlimit(Resource::RLIMIT_NOFILE, lowest_free + 1, hard).unwrap();
        let targets = [tcp(up), tcp(up), udp(up, b"ping", b"")];
        let outcomes = prober.round(&targets, LONG);
        assert_eq!(outcomes[0], Outcome::Ok);
        let emfile = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        assert_eq!(outcomes[1], Outcome::Failed(format!("connect: {emfile}")));
        assert_eq!(outcomes[2], Outcome::Failed(format!("bind: {emfile}")));
    }
}
