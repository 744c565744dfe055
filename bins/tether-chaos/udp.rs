//! The UDP soak: a churn of short flows (one datagram each, left to idle out) and long-lived
//! flows carrying sequence numbers that the backends echo with their name.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

/// Sends one datagram from a fresh socket (a fresh source port: a new flow) `rate` times a
/// second, from `sources` in turn, until `stop`. Returns how many were sent.
pub fn churn(to: SocketAddr, sources: &[IpAddr], rate: u64, stop: &AtomicBool, sent: &AtomicU64) {
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if n >= due {
            std::thread::sleep(Duration::from_millis(1)); // pacing, not synchronisation
            continue;
        }
        let batch_end = due.min(n + 1000);
        while n < batch_end {
            let source = sources[(n % sources.len() as u64) as usize];
            if let Ok(socket) = std::net::UdpSocket::bind(SocketAddr::new(source, 0)) {
                if socket.send_to(b"churn", to).is_ok() {
                    sent.fetch_add(1, Relaxed);
                }
            }
            n += 1;
        }
    }
}

/// What the long-lived flows saw.
#[derive(Debug, Default, Clone)]
pub struct LongReport {
    pub flows: usize,
    pub sent: u64,
    pub received: u64,
    /// Flows whose replies came from more than one backend.
    pub changed_backend: usize,
    /// Flows that never got a reply.
    pub silent: usize,
}

struct Flow {
    socket: UdpSocket,
    seq: u64,
    received: u64,
    backends: Vec<String>,
}

/// `flows` sockets (bound to `sources` in turn, port 0) each sending `L <flow> <seq>` every
/// `interval` to `to` until `stop`, then waiting `linger` for the last replies.
pub fn long_lived(
    to: SocketAddr,
    sources: &[IpAddr],
    flows: usize,
    interval: Duration,
    stop: &AtomicBool,
    linger: Duration,
) -> io::Result<LongReport> {
    let mut poll = Poll::new()?;
    let mut all = Vec::with_capacity(flows);
    for i in 0..flows {
        let mut socket = UdpSocket::bind(SocketAddr::new(sources[i % sources.len()], 0))?;
        poll.registry().register(&mut socket, Token(i), Interest::READABLE)?;
        all.push(Flow { socket, seq: 0, received: 0, backends: Vec::new() });
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut stopped: Option<Instant> = None;
    let per_flow = interval.as_secs_f64();
    loop {
        let now = Instant::now();
        if stopped.is_none() && stop.load(Relaxed) {
            stopped = Some(now);
        }
        if let Some(at) = stopped {
            if now.duration_since(at) > linger {
                break;
            }
        } else {
            // Flow i sends its k-th datagram at (k + i / flows) * interval.
            let elapsed = now.duration_since(start).as_secs_f64() / per_flow;
            for (i, f) in all.iter_mut().enumerate() {
                let due = (elapsed - i as f64 / flows as f64).max(0.0) as u64 + 1;
                while f.seq < due {
                    let msg = format!("L {i} {}", f.seq);
                    match f.socket.send_to(msg.as_bytes(), to) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                        Err(e) => return Err(e),
                    }
                    f.seq += 1;
                    sent += 1;
                }
            }
        }
        match poll.poll(&mut events, Some(Duration::from_millis(5))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let f = &mut all[event.token().0];
            loop {
                match f.socket.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        let name = text.split(' ').next().unwrap_or("").to_string();
                        f.received += 1;
                        if !f.backends.contains(&name) {
                            f.backends.push(name);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(LongReport {
        flows,
        sent,
        received: all.iter().map(|f| f.received).sum(),
        changed_backend: all.iter().filter(|f| f.backends.len() > 1).count(),
        silent: all.iter().filter(|f| f.received == 0).count(),
    })
}

/// The kernel's UDP drop counters of this namespace: receive-buffer and send-buffer errors.
pub fn kernel_drops() -> u64 {
    testkit::snmp("Udp", "RcvbufErrors") + testkit::snmp("Udp", "SndbufErrors")
}
