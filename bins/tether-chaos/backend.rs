//! A chaos backend: one process, one mio loop, so the suite can SIGKILL or SIGSTOP it.
//!
//! TCP: on accept it sends its name and a newline, then reads the client's header
//! `S <id> <up> <down> <mode>\n`, checks every upload byte against the session's pattern and
//! sends `down` bytes of the download pattern. Mode `B` (backend first) shuts its write side
//! down once the download is sent and reads on; every other mode closes after the client's EOF
//! and the whole download. At the client's EOF (or a reset) it prints
//! `R <id> <received> <wrong> <ok|err>` on stdout, which the driver reads.
//!
//! UDP (`--udp`): a datagram starting with `L ` is echoed back prefixed with the name and a
//! space; anything else (churn, flood) is counted and dropped.

use std::collections::HashMap;
use std::io::{self, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::rng::{count_wrong, fill, stream_key, take_line};

const LISTENER: Token = Token(0);
const UDP: Token = Token(1);
const CHUNK: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    hello: Vec<u8>,
    hello_sent: usize,
    header: Vec<u8>,
    session: Option<Session>,
    eof: bool,
    shut: bool,
}

struct Session {
    id: u64,
    down: u64,
    backend_first: bool,
    received: u64,
    wrong: u64,
    sent: u64,
}

pub fn run(name: &str, listen: SocketAddr, udp: Option<SocketAddr>) -> io::Result<()> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(listen), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(65535)?;
    let mut listener = TcpListener::from_std(socket.into());
    let mut poll = Poll::new()?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut udp = match udp {
        Some(addr) => {
            let mut s = UdpSocket::bind(addr)?;
            poll.registry().register(&mut s, UDP, Interest::READABLE)?;
            Some(s)
        }
        None => None,
    };
    let mut out = BufWriter::new(io::stdout().lock());
    writeln!(out, "ready {}", listener.local_addr()?)?;
    out.flush()?;
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 2usize;
    let mut events = Events::with_capacity(1024);
    let (mut buf, mut scratch) = (vec![0u8; CHUNK], Vec::new());
    let hello = format!("{name}\n").into_bytes();
    loop {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(200))) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let token = Token(next);
                            next += 1;
                            poll.registry().register(
                                &mut stream,
                                token,
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            let conn = Conn {
                                stream,
                                hello: hello.clone(),
                                hello_sent: 0,
                                header: Vec::new(),
                                session: None,
                                eof: false,
                                shut: false,
                            };
                            conns.insert(token.0, conn);
                            // Send the name at once: the client learns its backend even if
                            // this process dies before reading anything.
                            step(&mut conns, token.0, &mut buf, &mut scratch, &mut out)?;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if is_transient(&e) => break,
                        Err(e) => return Err(e),
                    }
                },
                UDP => {
                    if let Some(s) = udp.as_mut() {
                        echo_udp(s, name, &mut buf)?;
                    }
                }
                Token(t) => step(&mut conns, t, &mut buf, &mut scratch, &mut out)?,
            }
        }
        out.flush()?;
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            nix::libc::EMFILE
                | nix::libc::ENFILE
                | nix::libc::ENOBUFS
                | nix::libc::ENOMEM
                | nix::libc::ECONNABORTED
        )
    )
}

fn echo_udp(socket: &UdpSocket, name: &str, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match socket.recv_from(buf) {
            Ok((n, from)) => {
                if n >= 2 && &buf[..2] == b"L " {
                    let mut reply = Vec::with_capacity(name.len() + 1 + n);
                    reply.extend_from_slice(name.as_bytes());
                    reply.push(b' ');
                    reply.extend_from_slice(&buf[..n]);
                    // A full send buffer drops the echo: the client counts it lost, and the
                    // kernel's counters say why.
                    let _ = socket.send_to(&reply, from);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves connection `t` as far as it goes; removes it when it is done.
fn step(
    conns: &mut HashMap<usize, Conn>,
    t: usize,
    buf: &mut [u8],
    scratch: &mut Vec<u8>,
    out: &mut impl Write,
) -> io::Result<()> {
    let Some(conn) = conns.get_mut(&t) else { return Ok(()) };
    let done = match advance(conn, buf, scratch) {
        Ok(done) => done,
        Err(_) => {
            if let Some(s) = &conn.session {
                writeln!(out, "R {} {} {} err", s.id, s.received, s.wrong)?;
                out.flush()?;
            }
            true
        }
    };
    if done {
        if let Some(conn) = conns.remove(&t) {
            if let (Some(s), true) = (&conn.session, conn.eof) {
                // Before the close: a verdict must not die in a buffer with a killed process
                // after its client saw the session end.
                writeln!(out, "R {} {} {} ok", s.id, s.received, s.wrong)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Reads and writes until both would block; true when the connection is finished.
fn advance(conn: &mut Conn, buf: &mut [u8], scratch: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let mut progress = false;
        // Write: the name, then the download.
        if conn.hello_sent < conn.hello.len() {
            match conn.stream.write(&conn.hello[conn.hello_sent..]) {
                Ok(n) => {
                    conn.hello_sent += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        } else if let Some(s) = conn.session.as_mut() {
            if s.sent < s.down {
                let n = ((s.down - s.sent) as usize).min(buf.len());
                fill(stream_key(s.id, true), s.sent, &mut buf[..n]);
                match conn.stream.write(&buf[..n]) {
                    Ok(w) => {
                        s.sent += w as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if s.sent == s.down && s.backend_first && !conn.shut {
                conn.stream.shutdown(Shutdown::Write)?;
                conn.shut = true;
            }
        }
        // Read: the header, then the upload.
        if !conn.eof {
            match conn.stream.read(buf) {
                Ok(0) => {
                    conn.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    progress = true;
                    let mut data = &buf[..n];
                    if conn.session.is_none() {
                        let (rest, complete) = take_line(&mut conn.header, data, 128)?;
                        data = rest;
                        if complete {
                            conn.session = Some(parse_header(&conn.header)?);
                        }
                    }
                    if let (Some(s), false) = (conn.session.as_mut(), data.is_empty()) {
                        s.wrong += count_wrong(stream_key(s.id, false), s.received, data, scratch);
                        s.received += data.len() as u64;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let sent_all = conn.hello_sent == conn.hello.len()
            && conn.session.as_ref().map_or(true, |s| s.sent == s.down);
        if conn.eof && sent_all {
            return Ok(true);
        }
        if !progress {
            return Ok(false);
        }
    }
}

fn parse_header(line: &[u8]) -> io::Result<Session> {
    let bad = || io::Error::new(ErrorKind::InvalidData, "bad header");
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut it = text.split_whitespace();
    if it.next() != Some("S") {
        return Err(bad());
    }
    let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
    let (id, _up, down) = (num()?, num()?, num()?);
    let backend_first = it.next() == Some("B");
    Ok(Session { id, down, backend_first, received: 0, wrong: 0, sent: 0 })
}
