//! Which interface a datagram to an address leaves by: the kernel's route lookup
//! (`ip route get DST from SRC`) over rtnetlink, for the `oif` of an entry.
//!
//! The program cannot look it up itself: `bpf_fib_lookup` answers FWD_DISABLED for every
//! destination unless forwarding is enabled on the ingress interface (measured on 6.18), and a
//! host running tether is not a router. Routes are looked up when a flow is offloaded, and kept
//! [`TTL`] per (source, destination) so a burst of new flows costs one lookup per peer.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol};

/// How long a looked-up route is used before it is looked up again.
pub const TTL: Duration = Duration::from_secs(5);
/// Cached routes at most (a burst of new clients; the oldest half goes when full).
const CACHE: usize = 4096;

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// Where a datagram from a source to a destination goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Delivered on this host.
    Local,
    /// Sent out of this interface index.
    Out(u32),
}

impl Egress {
    /// The entry's `oif`: 0 for local delivery.
    pub fn oif(self) -> u32 {
        match self {
            Egress::Local => 0,
            Egress::Out(i) => i,
        }
    }
}

/// An rtnetlink socket and the routes it found lately.
pub struct Routes {
    socket: OwnedFd,
    seq: u32,
    cache: HashMap<(IpAddr, IpAddr), (Egress, Instant)>,
}

impl Routes {
    pub fn new() -> io::Result<Routes> {
        let socket = socket::socket(
            AddressFamily::Netlink,
            socket::SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        socket::bind(socket.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // A reply that never comes must not stall a worker.
        let timeout = nix::sys::time::TimeVal::new(1, 0);
        socket::setsockopt(&socket, socket::sockopt::ReceiveTimeout, &timeout)?;
        Ok(Routes { socket, seq: 0, cache: HashMap::new() })
    }

    /// Where a datagram from `src` (an address of this host) to `dst` goes; from the cache
    /// when looked up less than [`TTL`] ago.
    pub fn egress(&mut self, src: IpAddr, dst: IpAddr) -> io::Result<Egress> {
        let now = Instant::now();
        if let Some(&(egress, at)) = self.cache.get(&(src, dst)) {
            if now.duration_since(at) < TTL {
                return Ok(egress);
            }
        }
        let egress = self.lookup(src, dst)?;
        if self.cache.len() >= CACHE {
            self.cache.retain(|_, (_, at)| now.duration_since(*at) < TTL / 2);
            if self.cache.len() >= CACHE {
                self.cache.clear();
            }
        }
        self.cache.insert((src, dst), (egress, now));
        Ok(egress)
    }

    fn lookup(&mut self, src: IpAddr, dst: IpAddr) -> io::Result<Egress> {
        self.seq = self.seq.wrapping_add(1);
        let request = request(src, dst, self.seq);
        socket::sendto(
            self.socket.as_raw_fd(),
            &request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut buf = [0u8; 4096];
        loop {
            let n = socket::recv(self.socket.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if let Some(answer) = parse(&buf[..n], self.seq) {
                return answer;
            }
            // A late answer to an earlier request (it timed out): read on.
        }
    }
}

/// `RTM_GETROUTE` for `dst` from `src`.
fn request(src: IpAddr, dst: IpAddr, seq: u32) -> Vec<u8> {
    let (family, bits, s, d) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (2u8, 32u8, s.octets().to_vec(), d.octets().to_vec()),
        (s, d) => (10u8, 128u8, v6(s).to_vec(), v6(d).to_vec()),
    };
    let attr = |kind: u16, data: &[u8]| {
        let mut a = Vec::with_capacity(4 + data.len());
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a
    };
    let mut body = vec![family, bits, bits, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    body.extend(attr(RTA_DST, &d));
    body.extend(attr(RTA_SRC, &s));
    let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
    msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The answer to request `seq` in one netlink read, if it holds it.
fn parse(buf: &[u8], seq: u32) -> Option<io::Result<Egress>> {
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, at)? as usize;
        let kind = u16_at(buf, at + 4)?;
        if len < NLMSG_HDR || at + len > buf.len() {
            return Some(Err(io::Error::other("a truncated netlink message")));
        }
        let msg = &buf[at..at + len];
        at += (len + 3) & !3;
        if u32_at(msg, 8)? != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let errno = u32_at(msg, NLMSG_HDR)? as i32;
                return Some(Err(io::Error::from_raw_os_error(-errno)));
            }
            RTM_NEWROUTE => return Some(route(&msg[NLMSG_HDR..])),
            _ => continue,
        }
    }
    None
}

/// An `RTM_NEWROUTE` body: its type and output interface.
fn route(body: &[u8]) -> io::Result<Egress> {
    let bad = || io::Error::other("a malformed route");
    let kind = *body.get(7).ok_or_else(bad)?;
    let mut oif = None;
    let mut at = RTMSG;
    while at + 4 <= body.len() {
        let len = u16_at(body, at).ok_or_else(bad)? as usize;
        let attr = u16_at(body, at + 2).ok_or_else(bad)?;
        if len < 4 || at + len > body.len() {
            return Err(bad());
        }
        if attr == RTA_OIF {
            oif = u32_at(body, at + 4);
        }
        at += (len + 3) & !3;
    }
    match (kind, oif) {
        (RTN_LOCAL, _) => Ok(Egress::Local),
        (RTN_UNICAST, Some(i)) if i > 0 => Ok(Egress::Out(i)),
        (kind, oif) => Err(io::Error::other(format!(
            "route of type {kind} (oif {oif:?}): not a unicast route out of an interface"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_local() {
        let mut routes = Routes::new().unwrap();
        let lo = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(routes.egress(lo("127.0.0.1"), lo("127.0.0.9")).unwrap(), Egress::Local);
        assert_eq!(routes.egress(lo("::1"), lo("::1")).unwrap(), Egress::Local);
        // Twice: the second answer comes from the cache.
        assert_eq!(routes.egress(lo("127.0.0.1"), lo("127.0.0.9")).unwrap(), Egress::Local);
    }

    #[test]
    fn a_route_reply_is_parsed_and_a_foreign_sequence_is_skipped() {
        // An RTM_NEWROUTE for seq 7: rtmsg (type unicast) + RTA_OIF 3.
        let mut body = vec![2, 32, 0, 0, 254, 0, 0, RTN_UNICAST, 0, 0, 0, 0];
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&RTA_OIF.to_ne_bytes());
        body.extend_from_slice(&3u32.to_ne_bytes());
        let msg = |seq: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&body);
            m
        };
        assert_eq!(parse(&msg(7), 7).unwrap().unwrap(), Egress::Out(3));
        assert!(parse(&msg(6), 7).is_none());
        let mut two = msg(6);
        two.extend(msg(7));
        assert_eq!(parse(&two, 7).unwrap().unwrap(), Egress::Out(3));
        assert!(parse(&two[..20], 7).unwrap().is_err(), "truncated");
    }
}
