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
