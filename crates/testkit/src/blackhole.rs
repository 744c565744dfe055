//! A black-holed address: connects to it neither succeed nor fail, they hang.
//!
//! Linux drops a SYN to a listener whose accept queue is full (`tcp_conn_request` in
//! net/ipv4/tcp_input.c counts it as a listen overflow) and sends nothing back, so the connecting
//! side retransmits its SYN until its own timeout. A listener with backlog 0 that never accepts
//! has a queue full after one or two handshakes, which the helper makes itself.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nix::errno::Errno;
use socket2::{Domain, Protocol, Socket, Type};

use crate::wait_until;

/// How long a filler connect may stay unestablished before its SYN counts as dropped: a
/// loopback handshake takes microseconds, so this is long even on a loaded machine.
const SETTLE: Duration = Duration::from_millis(200);
/// Filler connects tried before giving up; the kernel needs backlog + 1 or so.
const MAX_FILLERS: usize = 64;

/// A listener on `addr()` that drops every SYN. Dropping it closes the listener and fillers.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    /// Held open, never accepted from.
    _listener: Socket,
    /// The connects that fill its accept queue, plus the last one, left hanging.
    _fillers: Vec<Socket>,
}

impl Blackhole {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Makes a [`Blackhole`] on `ip` (a loopback address) and a free port.
pub fn blackhole(ip: IpAddr) -> io::Result<Blackhole> {
    let domain = Domain::for_address(SocketAddr::new(ip, 0));
    let listener = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    listener.bind(&SocketAddr::new(ip, 0).into())?;
    listener.listen(0)?;
    let addr = listener.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not inet"))?;
    let mut fillers = Vec::new();
    for _ in 0..MAX_FILLERS {
        let filler = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        filler.set_nonblocking(true)?;
        match filler.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
            Err(e) => return Err(e),
        }
        // getpeername(2) fails with ENOTCONN while the socket is still in SYN-SENT.
        let established = wait_until(SETTLE, || filler.peer_addr().is_ok());
        if let Some(e) = filler.take_error()? {
            return Err(e);
        }
        fillers.push(filler);
        if !established {
            return Ok(Blackhole { addr, _listener: listener, _fillers: fillers });
        }
    }
    Err(io::Error::other(format!("{addr}: accept queue still open after {MAX_FILLERS} connects")))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Instant;

    use std::io::ErrorKind;

    use super::*;
    use crate::client::{client_ip, connect_from};

    #[test]
    fn connect_to_a_blackhole_times_out() {
        let hole = blackhole(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))).unwrap();
        for i in 0..3 {
            let start = Instant::now();
            let error = connect_from(client_ip(i), hole.addr(), Duration::from_millis(300))
                .expect_err("connect to a black hole succeeded");
            assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
            assert!(start.elapsed() >= Duration::from_millis(250));
        }
    }

    #[test]
    fn a_dropped_blackhole_refuses() {
        let hole = blackhole(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).unwrap();
        let addr = hole.addr();
        drop(hole);
        let error = connect_from(client_ip(0), addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    }
}
