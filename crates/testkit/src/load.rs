//! A connection-rate load from many source addresses (`tether-bench connrate`).
//!
//! Unlike `wrk`, which connects from one address, every connection here comes from the next of
//! a set of source addresses, so a balancer with source affinity looks up (and pins) a different
//! client each time: the load that shows what a large sticky table costs.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::connect_from;

/// What a [`connrate`] run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Connections that completed (request sent, a reply read to EOF).
    pub conns: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Connect-to-EOF latency percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.conns as f64 / self.seconds
    }
}

/// Opens connections to `to` from `sources` in turn on `threads` threads for `duration`; each
/// sends `request` and reads the reply to EOF.
pub fn connrate(
    to: SocketAddr,
    sources: &[IpAddr],
    threads: usize,
    duration: Duration,
    request: &[u8],
) -> LoadReport {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(Vec<u32>, u64)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|t| {
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    let mut next = t;
                    let mut buf = [0u8; 4096];
                    while Instant::now() < deadline {
                        let source = sources[next % sources.len()];
                        next += threads;
                        let began = Instant::now();
                        let ok =
                            connect_from(source, to, Duration::from_secs(5)).and_then(|mut s| {
                                s.write_all(request)?;
                                let mut got = 0;
                                loop {
                                    match s.read(&mut buf)? {
                                        0 => return Ok(got),
                                        n => got += n,
                                    }
                                }
                            });
                        match ok {
                            Ok(n) if n > 0 => latencies.push(began.elapsed().as_micros() as u32),
                            _ => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    report(start, results)
}

/// Ping-pong of 64-byte datagrams to `to` from one client per address of `sources` (a thread
/// each) for `duration`: each sends, waits for the echo (up to 1 s: past it, an error), and
/// sends again. Each client's datagrams begin with its own 8-byte token (its index and the
/// process id, big endian), the rest fixed: what a game's session token looks like to `--udp-session-key 0:8`.
/// A round trip is a "connection" of the report.
pub fn udp_pingpong(to: SocketAddr, sources: &[IpAddr], duration: Duration) -> LoadReport {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(Vec<u32>, u64)> = thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(i, &source)| {
                scope.spawn(move || {
                    let (mut latencies, mut errors) = (Vec::new(), 0);
                    let Ok(socket) = std::net::UdpSocket::bind((source, 0)) else {
                        return (latencies, 1);
                    };
                    let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut datagram = [0x5au8; 64];
                    // Its index and this process's id: a later run's clients are new
                    // sessions, not old ones come back from new ports (which would move).
                    let token = u64::from(std::process::id()) << 32 | i as u64;
                    datagram[..8].copy_from_slice(&token.to_be_bytes());
                    let mut buf = [0u8; 128];
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        let ok = socket.send_to(&datagram, to).and_then(|_| socket.recv(&mut buf));
                        match ok {
                            Ok(64) => latencies.push(began.elapsed().as_micros() as u32),
                            _ => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    report(start, results)
}

/// Latencies and errors of each thread, as one report.
fn report(start: Instant, results: Vec<(Vec<u32>, u64)>) -> LoadReport {
    let seconds = start.elapsed().as_secs_f64();
    let errors = results.iter().map(|(_, e)| e).sum();
    let mut all: Vec<u32> = results.into_iter().flat_map(|(l, _)| l).collect();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            f64::from(all[((all.len() - 1) as f64 * p) as usize])
        }
    };
    LoadReport { conns: all.len() as u64, errors, seconds, p50_us: pct(0.5), p99_us: pct(0.99) }
}
