//! Options of tether's UDP sockets (listeners and flows): kernel buffer sizes, and the kernel's
//! count of datagrams it dropped on a socket.
//!
//! A datagram that arrives while a socket's receive buffer is full is dropped by the kernel
//! before tether sees it. `SO_RXQ_OVFL` (socket(7)) makes the kernel attach its running count
//! of such drops to every datagram received, so the drops are counted where they happen
//! (`tether_datagrams_dropped_total{reason="kernel_rcvbuf"}`) and `--udp-rcvbuf` can be sized
//! from a figure instead of a guess.

use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// Kernel buffer sizes asked for a service's UDP sockets; `None`: the kernel's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpBuffers {
    pub rcvbuf: Option<usize>,
    pub sndbuf: Option<usize>,
}

/// A buffer size the kernel did not give as asked: it clamps to `net.core.rmem_max` /
/// `wmem_max` without CAP_NET_ADMIN, and raises sizes below its minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clamped {
    pub option: &'static str,
    pub asked: usize,
    pub got: usize,
}

impl std::fmt::Display for Clamped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = if self.got < self.asked {
            "net.core.rmem_max / wmem_max caps it unless tether runs as root"
        } else {
            "the kernel's minimum"
        };
        write!(f, "{} {}: the kernel gave {} bytes ({why})", self.option, self.asked, self.got)
    }
}

impl UdpBuffers {
    /// Set the buffers asked for on `socket` and turn drop reports on. Returns the sizes the
    /// kernel did not give as asked.
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<Vec<Clamped>> {
        setsockopt(socket, sockopt::RxqOvfl, &1)?;
        let mut clamped = Vec::new();
        if let Some(asked) = self.rcvbuf {
            let got = set_rcvbuf(socket, asked)?;
            if got != asked {
                clamped.push(Clamped { option: "udp-rcvbuf", asked, got });
            }
        }
        if let Some(asked) = self.sndbuf {
            let got = set_sndbuf(socket, asked)?;
            if got != asked {
                clamped.push(Clamped { option: "udp-sndbuf", asked, got });
            }
        }
        Ok(clamped)
    }
}

/// The `*BUFFORCE` variant first (past the sysctl cap, with CAP_NET_ADMIN), else the plain
/// one. The kernel doubles the value for its bookkeeping overhead and reports the doubled
/// value (socket(7)); half of it is what was granted.
fn set_rcvbuf(socket: &impl AsFd, bytes: usize) -> io::Result<usize> {
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        setsockopt(socket, sockopt::RcvBuf, &bytes)?;
    }
    Ok(getsockopt(socket, sockopt::RcvBuf)? / 2)
}

fn set_sndbuf(socket: &impl AsFd, bytes: usize) -> io::Result<usize> {
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        setsockopt(socket, sockopt::SndBuf, &bytes)?;
    }
    Ok(getsockopt(socket, sockopt::SndBuf)? / 2)
}

/// The drops the kernel reported since `seen`, which becomes `now`: the socket's running count
/// (a `u32` that wraps) from the last datagram received.
pub fn new_drops(seen: &mut u32, now: u32) -> u32 {
    let new = now.wrapping_sub(*seen);
    *seen = now;
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_set_and_a_tiny_one_is_raised_not_refused() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let asked = UdpBuffers { rcvbuf: Some(1), sndbuf: Some(300_000) };
        let clamped = asked.apply(&socket).unwrap();
        let rcv = clamped.iter().find(|c| c.option == "udp-rcvbuf").expect("1 byte is raised");
        assert!(rcv.got > 1, "{rcv}");
        assert!(rcv.to_string().contains("minimum"), "{rcv}");
        // 300,000 bytes is past the default wmem_max: granted as root, capped otherwise.
        let snd = getsockopt(&socket, sockopt::SndBuf).unwrap() / 2;
        match clamped.iter().find(|c| c.option == "udp-sndbuf") {
            None => assert_eq!(snd, 300_000),
            Some(c) => assert_eq!(c.got, snd),
        }
        assert_eq!(getsockopt(&socket, sockopt::RxqOvfl).unwrap(), 1);
    }

    #[test]
    fn drops_are_counted_once_and_across_wrap() {
        let mut seen = 0;
        assert_eq!([5, 5, 7].map(|now| new_drops(&mut seen, now)), [5, 0, 2]);
        let mut seen = u32::MAX - 1;
        assert_eq!(new_drops(&mut seen, 2), 4);
    }
}
