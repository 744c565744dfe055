//! The few socket calls std, mio, socket2 and nix do not wrap: the one module of the data
//! plane that may use `unsafe`, each block with a `// SAFETY:` comment.

#![allow(unsafe_code)]

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

/// Datagrams one recvmmsg(2) call takes at most.
pub const BATCH: usize = 16;
/// Room per datagram: the largest UDP payload (65,507 bytes) fits.
const SLOT: usize = 65_536;

/// Buffers for recvmmsg(2), reused for every call: no allocation per datagram. A call that
/// returns fewer than [`BATCH`] datagrams drained the socket (edge-triggered epoll reports any
/// later arrival), which saves the receive that would only say `EAGAIN`.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<nix::libc::sockaddr_storage>,
    name_lens: [nix::libc::socklen_t; BATCH],
    /// Control messages, 8-byte aligned, 128 bytes per datagram: a dual-stack socket may get
    /// both an IP_PKTINFO (32 bytes with its header) and an IPV6_PKTINFO (40).
    controls: Vec<[u64; 16]>,
    control_lens: [usize; BATCH],
    lens: [usize; BATCH],
}

impl RecvBatch {
    pub fn new() -> Self {
        // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
        let zero: nix::libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            names: vec![zero; BATCH],
            name_lens: [0; BATCH],
            controls: vec![[0; 16]; BATCH],
            control_lens: [0; BATCH],
            lens: [0; BATCH],
        }
    }

    /// Receive up to [`BATCH`] datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: &impl AsRawFd) -> std::io::Result<usize> {
        use nix::libc;
        // SAFETY: all-zero iovec and mmsghdr are valid empty values; every pointer set below
        // points into this struct's own heap buffers (sized BATCH slots each), which outlive
        // the call and are not otherwise borrowed during it.
        let n = unsafe {
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for i in 0..BATCH {
                iovs[i].iov_base = self.bufs.as_mut_ptr().add(i * SLOT) as *mut libc::c_void;
                iovs[i].iov_len = SLOT;
                let h = &mut hdrs[i].msg_hdr;
                h.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                h.msg_control = self.controls[i].as_mut_ptr() as *mut libc::c_void;
                h.msg_controllen = std::mem::size_of::<[u64; 16]>();
            }
            let n = libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            );
            for (i, h) in hdrs.iter().take(n.max(0) as usize).enumerate() {
                self.lens[i] = h.msg_len as usize;
                self.name_lens[i] = h.msg_hdr.msg_namelen;
                self.control_lens[i] = h.msg_hdr.msg_controllen;
            }
            n
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The kernel's running count of datagrams dropped on the socket, as the last of the `n`
    /// datagrams of the last call reported it (socket(7), SO_RXQ_OVFL; `None` if the socket
    /// did not ask for it).
    pub fn drops(&self, n: usize) -> Option<u32> {
        let i = n.checked_sub(1)?;
        let mut drops = None;
        self.control_messages(i, |level, kind, data| {
            if level == nix::libc::SOL_SOCKET && kind == nix::libc::SO_RXQ_OVFL {
                // SAFETY: an SO_RXQ_OVFL message carries a u32 (socket(7)), read unaligned.
                drops = Some(unsafe { std::ptr::read_unaligned(data as *const u32) });
            }
        });
        drops
    }

    /// Call `f(level, type, payload)` for each control message the kernel attached to datagram
    /// `i` of the last call; `payload` points into this batch's buffer (read it unaligned).
    fn control_messages(&self, i: usize, mut f: impl FnMut(i32, i32, *const u8)) {
        use nix::libc;
        // SAFETY: a msghdr describing only the control buffer the kernel filled for datagram
        // `i`; the CMSG_* macros walk it within `control_lens[i]` bytes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_control = self.controls[i].as_ptr() as *mut libc::c_void;
            msg.msg_controllen = self.control_lens[i];
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                f(c.cmsg_level, c.cmsg_type, libc::CMSG_DATA(cmsg) as *const u8);
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }

    /// Datagram `i` of the last call: payload, source address, destination address (from
    /// IP_PKTINFO / IPV6_PKTINFO, if the socket asked for it).
    pub fn get(&self, i: usize) -> (&[u8], Option<std::net::SocketAddr>, Option<std::net::IpAddr>) {
        use nix::libc;
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let data = &self.bufs[i * SLOT..i * SLOT + self.lens[i].min(SLOT)];
        // SAFETY: the kernel wrote a valid address of `name_lens[i]` bytes into `names[i]`.
        let from = unsafe { socket2::SockAddr::new(self.names[i], self.name_lens[i]) }.as_socket();
        let mut dst = None;
        self.control_messages(i, |level, kind, payload| {
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                // SAFETY: an IP_PKTINFO message carries an in_pktinfo (ip(7)), read unaligned.
                let pi: libc::in_pktinfo = unsafe { std::ptr::read_unaligned(payload as *const _) };
                dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr))));
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                // SAFETY: an IPV6_PKTINFO message carries an in6_pktinfo (ipv6(7)).
                let pi: libc::in6_pktinfo =
                    unsafe { std::ptr::read_unaligned(payload as *const _) };
                dst = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr)).to_canonical());
            }
        });
        (data, from, dst)
    }
}

/// Add listener `fd` to the epoll instance `epoll` (a `mio::Poll`'s) for `token`,
/// edge-triggered readable, with `EPOLLEXCLUSIVE` (epoll_ctl(2)): when several workers' epolls
/// wait on one shared socket, a connection wakes one of them that is idle, not all; a worker
/// busy elsewhere is not waited for. mio's registry has no way to ask for the flag; mio reads
/// the token back from the event's `u64`, so events arrive as for any other source. A socket
/// only one epoll waits on behaves as without the flag.
pub fn register_exclusive(
    epoll: &impl AsRawFd,
    fd: &impl AsRawFd,
    token: mio::Token,
) -> std::io::Result<()> {
    use nix::libc;
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32,
        u64: token.0 as u64,
    };
    // SAFETY: both fds are borrowed from live owners; the event is a live local the kernel
    // only reads.
    let rc = unsafe {
        libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Remove `fd` from `epoll` (added by [`register_exclusive`]). Needed before closing a
/// descriptor of a shared socket: epoll keeps watching a file while any descriptor of it is
/// open, in another worker too.
pub fn deregister(epoll: &impl AsRawFd, fd: &impl AsRawFd) {
    use nix::libc;
    // SAFETY: as above; EPOLL_CTL_DEL ignores the event argument.
    unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd.as_raw_fd(),
            std::ptr::null_mut(),
        );
    }
}

/// Take ownership of descriptor `raw`, inherited across exec (an upgrade's hand-over socket),
/// after checking that it is open. Call it once per descriptor: the result closes it on drop.
pub fn inherited_fd(raw: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)?;
    // Mark it close-on-exec from now on, so that a later upgrade does not leak it.
    nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    // SAFETY: `raw` is open (F_GETFD succeeded), was handed to this process by its parent for
    // this purpose, and nothing else in the process owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Descriptors one hand-over message may carry.
pub const MAX_FDS: usize = 64;

/// Send `bytes` as one message on a `SOCK_SEQPACKET` Unix socket, with `fds` attached
/// (SCM_RIGHTS, unix(7)): the receiver gets its own descriptors of the same open files.
pub fn send_with_fds(
    socket: &impl AsRawFd,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    if sent != bytes.len() {
        return Err(std::io::Error::other(format!("sent {sent} of {} bytes", bytes.len())));
    }
    Ok(())
}

/// Receive one message (at most `buf.len()` bytes) and the descriptors attached to it; 0 bytes
/// and no descriptor is the end (the peer closed). A message longer than `buf` is an error.
pub fn recv_with_fds(
    socket: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg =
        recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS hands this process new descriptors that nothing else owns.
            fds.extend(raw.into_iter().map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other("a hand-over message was longer than expected"));
    }
    Ok((msg.bytes, fds))
}

/// Attach classic BPF `program` to the `SO_REUSEPORT` group of `socket` (socket(7),
/// SO_ATTACH_REUSEPORT_CBPF): it picks, for each datagram, the index of the group's socket
/// that gets it; an index past the group's end leaves the choice to the kernel's hash. One
/// program serves the whole group, whichever of its sockets attached it last.
pub fn attach_reuseport_cbpf(
    socket: &impl AsRawFd,
    program: &[nix::libc::sock_filter],
) -> std::io::Result<()> {
    use nix::libc;
    let len = u16::try_from(program.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "program too long"))?;
    let prog = libc::sock_fprog { len, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `program`, alive for the call; the kernel copies the
    // instructions and reads exactly `size_of::<sock_fprog>()` bytes of the option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Take the program [`attach_reuseport_cbpf`] gave `socket`'s group away (SO_DETACH_REUSEPORT_BPF,
/// Linux 5.8): the kernel's hash chooses again. No program there is not an error.
pub fn detach_reuseport_bpf(socket: &impl AsRawFd) -> std::io::Result<()> {
    use nix::libc;
    let zero: libc::c_int = 0;
    // SAFETY: the option's value is ignored by the kernel; it reads at most the c_int given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            &zero as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            e => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    #[test]
    fn descriptors_cross_a_seqpacket_socket_and_name_the_same_files() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        send_with_fds(&a, b"one", &[w.as_raw_fd()]).unwrap();
        send_with_fds(&a, b"two", &[]).unwrap();
        drop(a);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"one"[..], 1));
        // The received descriptor writes into the same socket as the sent one.
        std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap())
            .write_all(b"hi")
            .unwrap();
        let mut got = [0u8; 2];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"two"[..], 0));
        assert_eq!(recv_with_fds(&b, &mut buf).unwrap().0, 0, "the end");
        drop(w);
    }
}
