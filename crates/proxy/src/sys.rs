//! The few socket ioctls std, mio, socket2 and nix do not wrap.

use std::os::fd::AsRawFd;

/// Bytes written to a TCP socket that the peer has not yet acknowledged (tcp(7): "SIOCOUTQ
/// returns the amount of unsent data in the socket send queue"; TIOCOUTQ is the same request).
pub fn unsent(fd: &impl AsRawFd) -> i32 {
    int_ioctl(fd, nix::libc::TIOCOUTQ as _).unwrap_or(0)
}

/// Whether the next byte to read is the TCP urgent mark (tcp(7), SIOCATMARK). `splice(2)` will
/// not read across the mark (the kernel's `tcp_read_sock` stops there), so a pump that sees
/// `EAGAIN` from splice at the mark must read past it with recv(2).
pub fn at_urgent_mark(fd: &impl AsRawFd) -> bool {
    int_ioctl(fd, SIOCATMARK) == Some(1)
}

/// From linux/sockios.h (asm-generic); the libc crate does not export it.
const SIOCATMARK: nix::libc::Ioctl = 0x8905;

fn int_ioctl(fd: &impl AsRawFd, request: nix::libc::Ioctl) -> Option<i32> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: both requests write exactly one c_int through the pointer, which points at a live
    // local; the fd is borrowed from an owner that keeps it open for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), request, &mut n) };
    (rc == 0).then_some(n)
}

/// sendmsg(2) of one datagram to `to` with `src` as its source address (IP_PKTINFO's
/// `ipi_spec_dst`, ip(7); IPV6_PKTINFO, ipv6(7); an IPv4 `src` on an IPv6 socket goes as the
/// mapped address, which Linux accepts for dual-stack sockets). The control message is built on
/// the stack: nix's `sendmsg` allocates a buffer per call, and this runs per datagram.
pub fn send_from(
    fd: &impl AsRawFd,
    data: &[u8],
    to: std::net::SocketAddr,
    src: std::net::IpAddr,
) -> std::io::Result<usize> {
    use nix::libc;
    use std::mem::size_of;
    use std::net::{IpAddr, SocketAddr};

    #[repr(C, align(8))]
    struct Control([u8; 64]);

    let dest = socket2::SockAddr::from(to);
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut control = Control([0; 64]);
    let (level, kind, len) = match to {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, size_of::<libc::in_pktinfo>()),
        SocketAddr::V6(_) => {
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, size_of::<libc::in6_pktinfo>())
        }
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size; 64 bytes hold one in6_pktinfo message (40).
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
    // SAFETY: msg_control points at `control`, 8-byte aligned and at least msg_controllen long,
    // so CMSG_FIRSTHDR returns a pointer into it with room for the header and `len` bytes of
    // data; the payload is written unaligned-safe. `dest`, `iov`, `data` and `control` outlive
    // the sendmsg call, and the fd is borrowed from its owner.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
        let payload = libc::CMSG_DATA(cmsg);
        match (to, src) {
            (SocketAddr::V4(_), IpAddr::V4(ip)) => {
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(ip).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(payload as *mut libc::in_pktinfo, pi);
            }
            (SocketAddr::V4(_), IpAddr::V6(_)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "v6 source for a v4 peer",
                ))
            }
            (SocketAddr::V6(_), ip) => {
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: v6.octets() },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(payload as *mut libc::in6_pktinfo, pi);
            }
        }
        libc::sendmsg(fd.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}
