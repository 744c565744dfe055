//! A named UDP test backend: answers `name` with its name and echoes everything else.

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often the receive loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// A running UDP backend. A datagram `name` gets the backend's name back; any other datagram
/// (the empty one and 65,507-byte ones included) is echoed unchanged. Every source address is
/// remembered, so a test can see which source ports tether used (a new port = a new flow).
pub struct UdpBackend {
    name: String,
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    /// Binds `addr` (port 0 picks a free port) and starts answering.
    pub fn start(name: &str, addr: SocketAddr) -> io::Result<UdpBackend> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_read_timeout(Some(STOP_POLL))?;
        let addr = socket.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (name, stopping, seen) =
                (name.to_owned(), Arc::clone(&stopping), Arc::clone(&seen));
            thread::Builder::new().name(format!("udp-{name}")).spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stopping.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(from);
                    let reply: &[u8] =
                        if &buf[..n] == b"name" { name.as_bytes() } else { &buf[..n] };
                    let _ = socket.send_to(reply, from);
                }
            })?
        };
        Ok(UdpBackend { name: name.to_owned(), addr, stopping, seen, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every datagram's source address, in arrival order.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Distinct source addresses seen.
    pub fn sources(&self) -> BTreeSet<SocketAddr> {
        self.seen().into_iter().collect()
    }

    /// Stops answering and closes the socket (datagrams to it then draw ICMP port unreachable).
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A UDP client bound to `source:0`, connected to nothing: `ask` sends one datagram to `to`
/// and waits up to `timeout` for one back, returning it with the address it came from.
pub fn udp_client(source: std::net::IpAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(source, 0))
}

/// Sends `payload` to `to` from `socket` and returns the first reply and its source, or a
/// `TimedOut`/`WouldBlock` error after `timeout`.
pub fn udp_ask(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<(Vec<u8>, SocketAddr)> {
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(payload, to)?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = socket.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok((buf, from))
}
