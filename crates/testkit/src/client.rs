//! Blocking client helpers: connect from a chosen source address, speak the backend protocol,
//! move and check pattern data.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::data::{pattern, Digest};

/// Connect timeout of [`ask_name`] and [`hold`]: far above a loopback handshake, even through
/// a proxy that first connects to its backend on a loaded 2-core machine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout set by [`connect_from`], so a hung test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How many distinct addresses [`client_ip`] gives: 127.1.0.1 to 127.1.255.254, skipping last
/// octets 0 and 255.
pub const CLIENT_IPS: u32 = 254 * 256;

/// Longest reply [`ask_name`] and [`read_line`] accept.
const MAX_LINE: usize = 4096;
/// Read size of a slow reader in [`read_to_end_digest`].
const SLOW_CHUNK: usize = 4096;
/// Read and write size otherwise.
const CHUNK: usize = 64 * 1024;

/// Connects from `source` (port chosen by the kernel at connect(2), per destination, as
/// `IP_BIND_ADDRESS_NO_PORT` lets it) to `to` within `timeout`; the stream gets
/// [`IO_TIMEOUT`] as read and write timeout.
pub fn connect_from(source: IpAddr, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `peer` from `source` through `to`: the backend's name and the address the backend saw
/// the connection come from (which proxy carried it).
pub fn ask_peer(source: IpAddr, to: SocketAddr) -> io::Result<(String, SocketAddr)> {
    let mut stream = connect_from(source, to, CONNECT_TIMEOUT)?;
    send_command(&mut stream, "peer")?;
    let mut reply = String::new();
    (&mut stream).take(MAX_LINE as u64).read_to_string(&mut reply)?;
    let bad = || {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("expected `<name> <addr>\\n`, got {reply:?}"),
        )
    };
    let (name, addr) = reply.trim_end().split_once(' ').ok_or_else(bad)?;
    Ok((name.to_string(), addr.parse().map_err(|_| bad())?))
}

/// Sends `name` from `source` through `to` and returns the backend's name.
///
/// A connection closed without a full `<name>\n` reply is an `UnexpectedEof` error.
pub fn ask_name(source: IpAddr, to: SocketAddr) -> io::Result<String> {
    let mut stream = connect_from(source, to, CONNECT_TIMEOUT)?;
    send_command(&mut stream, "name")?;
    let mut reply = Vec::new();
    (&mut stream).take(MAX_LINE as u64).read_to_end(&mut reply)?;
    match reply.strip_suffix(b"\n") {
        Some(name) if !name.is_empty() && !name.contains(&b'\n') => {
            String::from_utf8(name.to_vec()).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
        }
        _ => Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("expected `<name>\\n`, got {:?}", String::from_utf8_lossy(&reply)),
        )),
    }
}

/// Opens a `hold` session from `source` through `to`: returns the open stream and the name of
/// the backend holding it. The session lasts until the stream is closed or written to.
pub fn hold(source: IpAddr, to: SocketAddr) -> io::Result<(TcpStream, String)> {
    let mut stream = connect_from(source, to, CONNECT_TIMEOUT)?;
    send_command(&mut stream, "hold")?;
    let name = read_line(&mut stream)?;
    Ok((stream, name))
}

/// Writes `command` and a `\n`.
pub fn send_command(stream: &mut impl Write, command: &str) -> io::Result<()> {
    stream.write_all(format!("{command}\n").as_bytes())
}

/// Reads one line, without its `\n`, one byte at a time so that nothing after it is consumed.
///
/// EOF before the `\n` is an `UnexpectedEof` error.
pub fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0; 1];
    while line.len() < MAX_LINE {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("EOF after {:?} without a newline", String::from_utf8_lossy(&line)),
                ))
            }
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(ErrorKind::InvalidData, format!("line longer than {MAX_LINE} bytes")))
}

/// Parses a `sink` reply, `<bytes> <digest-hex>`, into (bytes, digest).
pub fn parse_sink_reply(line: &str) -> Option<(u64, u64)> {
    let (bytes, digest) = line.trim().split_once(' ')?;
    Some((bytes.parse().ok()?, u64::from_str_radix(digest, 16).ok()?))
}

/// Reads until EOF; returns how many bytes came and their digest.
///
/// With `slow`, reads at most 4 KiB at a time and pauses `slow` after each read: a slow
/// consumer, to make the proxy buffer and apply back-pressure.
pub fn read_to_end_digest(
    stream: &mut impl Read,
    slow: Option<Duration>,
) -> io::Result<(u64, u64)> {
    let mut digest = Digest::new();
    let mut buf = vec![0; if slow.is_some() { SLOW_CHUNK } else { CHUNK }];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((digest.bytes(), digest.finish())),
            Ok(n) => digest.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(pause) = slow {
            thread::sleep(pause);
        }
    }
}

/// Writes the first `n` bytes of the [`pattern`] stream; returns their digest.
pub fn write_pattern(stream: &mut impl Write, n: u64) -> io::Result<u64> {
    let mut digest = Digest::new();
    let mut buf = vec![0; CHUNK];
    let mut offset = 0;
    while offset < n {
        let len = (n - offset).min(CHUNK as u64) as usize;
        pattern(offset, &mut buf[..len]);
        stream.write_all(&buf[..len])?;
        digest.update(&buf[..len]);
        offset += len as u64;
    }
    Ok(digest.finish())
}

/// Closes `stream` with an RST: SO_LINGER on with a zero timeout makes close(2) abort the
/// connection (socket(7), SO_LINGER).
pub fn send_reset(stream: TcpStream) -> io::Result<()> {
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    drop(stream);
    Ok(())
}

/// The `i`th client address, 127.1.0.1 upward, skipping last octets 0 and 255 so that no
/// address looks like a network or broadcast address.
///
/// # Panics
///
/// If `i >= CLIENT_IPS`.
pub fn client_ip(i: u32) -> IpAddr {
    assert!(i < CLIENT_IPS, "client_ip({i}): there are only {CLIENT_IPS} client addresses");
    // i / 254 < 256 and i % 254 + 1 < 255 by the assertion: both casts are lossless.
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 254) as u8, (i % 254 + 1) as u8))
}

/// `n` client addresses from `first` upward, skipping last octets 0 and 255 and staying in
/// 127.0.0.0/8; an `InvalidInput` error if `first` is outside it or there are not enough.
pub fn client_ips(first: Ipv4Addr, n: usize) -> io::Result<Vec<IpAddr>> {
    let invalid = |why: String| io::Error::new(ErrorKind::InvalidInput, why);
    if first.octets()[0] != 127 {
        return Err(invalid(format!("{first} is not a loopback address")));
    }
    let mut ips = Vec::with_capacity(n);
    let mut next = u32::from(first);
    while ips.len() < n {
        let ip = Ipv4Addr::from(next);
        if ip.octets()[0] != 127 {
            return Err(invalid(format!("only {} client addresses from {first}", ips.len())));
        }
        if !matches!(ip.octets()[3], 0 | 255) {
            ips.push(IpAddr::V4(ip));
        }
        next += 1;
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::TcpListener;

    use super::*;
    use crate::data::digest_of_pattern;

    #[test]
    fn client_ips_are_distinct_loopback_host_addresses() {
        let ips: HashSet<IpAddr> = (0..CLIENT_IPS).map(client_ip).collect();
        assert_eq!(ips.len(), CLIENT_IPS as usize);
        for ip in &ips {
            let IpAddr::V4(v4) = ip else { panic!("{ip} is not IPv4") };
            assert!(v4.is_loopback(), "{ip}");
            assert!(!matches!(v4.octets()[3], 0 | 255), "{ip}");
        }
        assert_eq!(client_ip(0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(client_ip(254), IpAddr::V4(Ipv4Addr::new(127, 1, 1, 1)));
    }

    #[test]
    fn client_ips_from_the_first_address_match_client_ip() {
        let ips = client_ips(Ipv4Addr::new(127, 1, 0, 1), 1000).unwrap();
        assert_eq!(ips, (0..1000).map(client_ip).collect::<Vec<_>>());
        assert!(client_ips(Ipv4Addr::new(127, 255, 255, 250), 10).is_err());
        assert!(client_ips(Ipv4Addr::new(10, 0, 0, 1), 1).is_err());
    }

    #[test]
    fn connect_from_uses_the_source_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream =
            connect_from(client_ip(77), listener.local_addr().unwrap(), CONNECT_TIMEOUT).unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), client_ip(77));
        assert_eq!(stream.local_addr().unwrap(), peer);
    }

    #[test]
    fn sink_reply_parses() {
        assert_eq!(parse_sink_reply("12 00000000000000ff\n"), Some((12, 255)));
        assert_eq!(parse_sink_reply("12"), None);
        assert_eq!(parse_sink_reply("x 00"), None);
    }

    #[test]
    fn write_pattern_and_read_digest_agree() {
        let mut written = Vec::new();
        let digest = write_pattern(&mut written, 300_001).unwrap();
        assert_eq!(digest, digest_of_pattern(300_001));
        let slow = read_to_end_digest(&mut &written[..], Some(Duration::ZERO)).unwrap();
        assert_eq!(slow, (300_001, digest));
        assert_eq!(read_to_end_digest(&mut &written[..], None).unwrap(), (300_001, digest));
    }

    #[test]
    fn read_line_stops_at_the_newline() {
        let mut input = &b"alpha\nrest"[..];
        assert_eq!(read_line(&mut input).unwrap(), "alpha");
        assert_eq!(input, b"rest");
        assert_eq!(read_line(&mut input).unwrap_err().kind(), ErrorKind::UnexpectedEof);
    }
}
