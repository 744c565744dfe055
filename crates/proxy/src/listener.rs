//! Binding listeners, all before any worker starts, so a bad address or a port in use stops the
//! process before it serves anyone. TCP: one socket per address that every worker waits on
//! (each holds its own descriptor of it), or one `SO_REUSEPORT` socket per worker per address
//! ([`vocab::Listeners`]). UDP: always one `SO_REUSEPORT` socket per worker, so each client's
//! datagrams reach the one worker that holds its flow.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::udp_socket::UdpBuffers;

/// Pending connections the kernel may queue per listener socket.
pub(crate) const BACKLOG: i32 = 4096;

/// A listener that could not be bound.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub udp: bool,
    pub error: io::Error,
}

/// Every listener socket of every worker, and the addresses they are bound to.
#[derive(Debug, Default)]
pub struct Bound {
    /// `tcp[worker][listener]`
    pub tcp: Vec<Vec<std::net::TcpListener>>,
    /// `udp[worker][listener]`
    pub udp: Vec<Vec<std::net::UdpSocket>>,
    pub tcp_addrs: Vec<SocketAddr>,
    pub udp_addrs: Vec<SocketAddr>,
}

/// Bind the sockets of every worker for each address and each transport asked for (UDP with
/// these kernel buffers). A port 0 is resolved by the first bind and reused by the others (TCP
/// first, then UDP on the same port).
pub fn bind(
    addrs: &[SocketAddr],
    workers: usize,
    tcp: Option<vocab::Listeners>,
    udp: Option<UdpBuffers>,
) -> Result<Bound, BindError> {
    let mut bound = Bound {
        tcp: (0..workers).map(|_| Vec::new()).collect(),
        udp: (0..workers).map(|_| Vec::new()).collect(),
        ..Bound::default()
    };
    for &want in addrs {
        let mut addr = want;
        if let Some(mode) = tcp {
            let (sockets, at) = match mode {
                vocab::Listeners::PerWorker => bind_all(&[addr], workers)?,
                vocab::Listeners::Shared => bind_shared(addr, workers)?,
            };
            for (w, mut s) in sockets.into_iter().enumerate() {
                bound.tcp[w].append(&mut s);
            }
            addr = at[0];
            bound.tcp_addrs.push(addr);
        }
        if let Some(buffers) = udp {
            for (w, sockets) in bound.udp.iter_mut().enumerate() {
                let s = bind_udp(addr, &buffers, w == 0).map_err(|error| BindError {
                    addr: want,
                    udp: true,
                    error,
                })?;
                addr =
                    s.local_addr().map_err(|error| BindError { addr: want, udp: true, error })?;
                sockets.push(s);
            }
            bound.udp_addrs.push(addr);
        }
    }
    Ok(bound)
}

/// One worker's UDP socket on `addr`. What the kernel did not give of `buffers` is logged when
/// `log` (once per address: every worker's socket gets the same).
fn bind_udp(addr: SocketAddr, buffers: &UdpBuffers, log: bool) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for clamped in buffers.apply(&socket)? {
        if log {
            log::warn!("udp listener {addr}: {clamped}");
        }
    }
    socket.set_reuse_address(true)?;
    // The kernel hashes each client's 4-tuple to one of the workers' sockets, so a flow stays
    // on one worker (socket(7), SO_REUSEPORT).
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    if addr.ip().is_unspecified() {
        // Learn each datagram's destination address, to reply from it (ip(7) IP_PKTINFO,
        // ipv6(7) IPV6_RECVPKTINFO; a dual-stack [::] socket gets IPv4 traffic's as well).
        use nix::sys::socket::{setsockopt, sockopt};
        if addr.is_ipv4() {
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        } else {
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
            let _ = setsockopt(&socket, sockopt::Ipv4PacketInfo, &true);
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.error.kind() {
            io::ErrorKind::AddrInUse => "address in use".to_string(),
            io::ErrorKind::AddrNotAvailable => "address not available on this host".to_string(),
            io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".to_string()
            }
            _ => self.error.to_string(),
        };
        let proto = if self.udp { " (udp)" } else { "" };
        write!(f, "--listen {}{proto}: {}", self.addr, what)
    }
}

impl std::error::Error for BindError {}

/// Bind `workers` sockets for each address. Returns `sockets[worker][listener]` and the bound
/// addresses (a port 0 is resolved by the first bind and reused by the others).
pub fn bind_all(
    addrs: &[SocketAddr],
    workers: usize,
) -> Result<(Vec<Vec<std::net::TcpListener>>, Vec<SocketAddr>), BindError> {
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for &want in addrs {
        let mut addr = want;
        for sockets in per_worker.iter_mut() {
            let l = bind_one(addr).map_err(|error| BindError { addr: want, udp: false, error })?;
            addr = l.local_addr().map_err(|error| BindError { addr: want, udp: false, error })?;
            sockets.push(l);
        }
        bound.push(addr);
    }
    Ok((per_worker, bound))
}

/// One socket at `addr`, and a descriptor of it for each worker (`sockets[worker][0]`).
fn bind_shared(
    addr: SocketAddr,
    workers: usize,
) -> Result<(Vec<Vec<std::net::TcpListener>>, Vec<SocketAddr>), BindError> {
    let fail = |error| BindError { addr, udp: false, error };
    let socket = bind_one(addr).map_err(fail)?;
    let bound = socket.local_addr().map_err(fail)?;
    let mut per_worker = Vec::with_capacity(workers);
    for _ in 1..workers {
        per_worker.push(vec![socket.try_clone().map_err(fail)?]);
    }
    per_worker.push(vec![socket]);
    Ok((per_worker, vec![bound]))
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A listener on [::] follows the system default (Linux: dual-stack), so IPv4 clients arrive
    // as ::ffff:a.b.c.d; affinity keys canonicalise those to the IPv4 address.
    // Inherited by every accepted socket (Linux copies the listener's options into the child),
    // so clients get TCP_NODELAY without one setsockopt per session.
    socket.set_nodelay(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_resolves_once_for_all_workers() {
        let (sockets, bound) = bind_all(&["127.0.0.1:0".parse().unwrap()], 3).unwrap();
        assert_ne!(bound[0].port(), 0);
        for w in &sockets {
            assert_eq!(w[0].local_addr().unwrap(), bound[0]);
        }
    }

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let (sockets, bound) = bind_all(&["127.0.0.1:0".parse().unwrap()], 1).unwrap();
        let _client = std::net::TcpStream::connect(bound[0]).unwrap();
        sockets[0][0].set_nonblocking(false).unwrap();
        let (accepted, _) = sockets[0][0].accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_shared_listener_is_one_socket_in_every_worker() {
        let want: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound = bind(&[want], 3, Some(vocab::Listeners::Shared), None).unwrap();
        assert_eq!(bound.tcp.len(), 3);
        let client = std::net::TcpStream::connect(bound.tcp_addrs[0]).unwrap();
        let last = &bound.tcp[2][0];
        last.set_nonblocking(false).unwrap();
        assert_eq!(last.accept().unwrap().1, client.local_addr().unwrap());
        // O_NONBLOCK belongs to the socket, not the descriptor: every worker's is blocking now.
        bound.tcp[0][0].set_nonblocking(true).unwrap();
        assert!(last.accept().is_err(), "the descriptors do not share their flags");
        // Taken through one worker's descriptor, it is gone from the others': one queue.
        for sockets in &bound.tcp[..2] {
            assert_eq!(sockets[0].local_addr().unwrap(), bound.tcp_addrs[0]);
            let e = sockets[0].accept().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
    }

    #[test]
    fn port_in_use_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_all(&[addr], 2).unwrap_err();
        assert_eq!(err.to_string(), format!("--listen {addr}: address in use"));
    }
}
