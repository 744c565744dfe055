//! The one socket ioctl the test backends need and no crate wraps.

use std::os::fd::AsRawFd;

/// Bytes written to a TCP socket that the peer has not acknowledged yet (tcp(7), SIOCOUTQ).
#[allow(unsafe_code)]
pub fn unsent(fd: &impl AsRawFd) -> i32 {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points at a live local; the
    // fd is borrowed from an owner that keeps it open for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n
    } else {
        -1
    }
}
