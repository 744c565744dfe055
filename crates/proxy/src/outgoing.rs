//! The backend side's sockets: from the kernel's choice of local address, or from a service's
//! `connect-from` addresses in turn (F13).
//!
//! One local IP reaches one backend `IP:port` from at most the ephemeral port range (about 28k
//! ports by default), TIME_WAIT included. With several `connect-from` addresses, each connect
//! takes the next address of the backend's family, and moves on to the one after while an
//! address has no port left toward that backend. TCP sockets set `IP_BIND_ADDRESS_NO_PORT`
//! (ip(7)) before binding, so the port is chosen at connect(2) per destination rather than
//! reserved for every destination at bind(2).

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::{TcpStream, UdpSocket};
use nix::libc::{EADDRINUSE, EADDRNOTAVAIL, EINPROGRESS};
use socket2::{Domain, Protocol, Socket, Type};

/// Whether `e` says a local address had no port (or is not this host's any more): the next
/// address may do better, and the backend is not to blame.
pub fn no_local_port(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EADDRNOTAVAIL | EADDRINUSE))
}

/// Local addresses taken in turn; one per worker, with a turn for each service and family
/// (a connect of one never skips another's next address).
#[derive(Debug, Default)]
pub struct Sources {
    next: Vec<usize>,
}

impl Sources {
    /// A non-blocking TCP connect to `to` in progress, for service slot `service`.
    pub fn tcp(
        &mut self,
        to: SocketAddr,
        from: &[IpAddr],
        service: usize,
    ) -> io::Result<TcpStream> {
        self.each(to, from, service, |ip| match ip {
            None => TcpStream::connect(to),
            Some(ip) => {
                let socket = bound_no_port(ip, to)?;
                match socket.connect(&to.into()) {
                    Err(e) if e.raw_os_error() != Some(EINPROGRESS) => return Err(e),
                    _ => {}
                }
                Ok(TcpStream::from_std(socket.into()))
            }
        })
    }

    /// A non-blocking UDP socket connected to `to`, on an ephemeral port, for service slot
    /// `service`.
    pub fn udp(
        &mut self,
        to: SocketAddr,
        from: &[IpAddr],
        service: usize,
    ) -> io::Result<UdpSocket> {
        self.each(to, from, service, |ip| {
            let socket = new_socket(to, Type::DGRAM, Protocol::UDP)?;
            let ip = ip.unwrap_or(match to {
                SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            });
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            socket.connect(&to.into())?;
            Ok(UdpSocket::from_std(socket.into()))
        })
    }

    /// `open` from each address of `from` in `to`'s family, starting at the next in turn,
    /// until one is not short of ports; from the kernel's choice when `from` has none.
    fn each<T>(
        &mut self,
        to: SocketAddr,
        from: &[IpAddr],
        service: usize,
        mut open: impl FnMut(Option<IpAddr>) -> io::Result<T>,
    ) -> io::Result<T> {
        let family = || from.iter().filter(|ip| ip.is_ipv4() == to.is_ipv4());
        let n = family().count();
        if n == 0 {
            return open(None);
        }
        let turn = 2 * service + usize::from(to.is_ipv4());
        if self.next.len() <= turn {
            self.next.resize(turn + 1, 0);
        }
        let start = self.next[turn];
        self.next[turn] = start.wrapping_add(1);
        let mut last = None;
        for &ip in family().cycle().skip(start % n).take(n) {
            match open(Some(ip)) {
                Err(e) if no_local_port(&e) => last = Some(e),
                done => return done,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(EADDRNOTAVAIL)))
    }
}

fn new_socket(to: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    Socket::new(Domain::for_address(to), kind.nonblocking().cloexec(), Some(protocol))
}

/// A TCP socket toward `to` bound to `ip`, its port left to connect(2).
fn bound_no_port(ip: IpAddr, to: SocketAddr) -> io::Result<Socket> {
    let socket = new_socket(to, Type::STREAM, Protocol::TCP)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    Ok(socket)
}

/// Whether `ip` can be connected from: an address of this host (bind(2) succeeds).
pub fn is_local(ip: IpAddr) -> io::Result<()> {
    bound_no_port(ip, SocketAddr::new(ip, 0)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connects_come_from_each_address_in_turn() {
        let listener = TcpListener::bind("127.0.77.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let from = [ip("127.0.77.2"), ip("::1"), ip("127.0.77.3")];
        let mut sources = Sources::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let _stream = sources.tcp(to, &from, 0).unwrap();
            let (_, peer) = listener.accept().unwrap();
            seen.push(peer.ip());
        }
        let want: Vec<IpAddr> =
            ["127.0.77.2", "127.0.77.3", "127.0.77.2", "127.0.77.3"].map(ip).to_vec();
        assert_eq!(seen, want, "the IPv6 address is skipped for an IPv4 backend");
        // Each service takes its own turn: connects of service 1 in between change nothing.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let _stream = sources.tcp(to, &from, 0).unwrap();
            let _other = sources.tcp(to, &from, 1).unwrap();
            seen.push(listener.accept().unwrap().1.ip());
            listener.accept().unwrap();
        }
        assert_eq!(seen, want);
    }

    #[test]
    fn udp_flows_come_from_each_address_in_turn() {
        let backend = std::net::UdpSocket::bind("127.0.77.1:0").unwrap();
        let to = backend.local_addr().unwrap();
        let from = [ip("127.0.77.4"), ip("127.0.77.5")];
        let mut sources = Sources::default();
        for want in ["127.0.77.4", "127.0.77.5", "127.0.77.4"] {
            let socket = sources.udp(to, &from, 0).unwrap();
            assert_eq!(socket.local_addr().unwrap().ip(), ip(want));
            assert_eq!(socket.peer_addr().unwrap(), to);
        }
    }

    #[test]
    fn without_an_address_of_its_family_the_kernel_chooses() {
        let listener = TcpListener::bind("127.0.77.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let _stream = Sources::default().tcp(to, &[ip("::1")], 0).unwrap();
        assert_eq!(listener.accept().unwrap().1.ip(), ip("127.0.0.1"));
    }

    #[test]
    fn an_address_that_is_not_local_is_skipped_and_reported() {
        let listener = TcpListener::bind("127.0.77.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        // 192.0.2.1 (TEST-NET-1) is never bound here: bind(2) fails, the next address serves.
        let from = [ip("192.0.2.1"), ip("127.0.77.6")];
        let mut sources = Sources::default();
        for _ in 0..2 {
            let _stream = sources.tcp(to, &from, 0).unwrap();
            assert_eq!(listener.accept().unwrap().1.ip(), ip("127.0.77.6"));
        }
        let e = Sources::default().tcp(to, &from[..1], 0).unwrap_err();
        assert!(no_local_port(&e), "{e}");
        assert!(is_local(ip("192.0.2.1")).is_err());
        assert!(is_local(ip("127.0.77.6")).is_ok());
    }
}
