//! One direction of a session: read from one socket, write to the other.
//!
//! Two stores move bytes behind one interface: a pipe for `splice(2)` (Linux; bytes never enter
//! user space) and a userspace buffer. Both come from per-worker pools and go back as soon as
//! they are empty, so an idle session holds neither (memory per idle session stays small) and no
//! read allocates. The pump alternates strictly: it reads only when the store is empty and then
//! writes everything read before reading again. That is the backpressure rule (never read more
//! than the other side has taken) and it removes the one ambiguity of `splice`: an `EAGAIN` from
//! a socket into an *empty* pipe can only mean the socket has nothing to give.
//!
//! Small transfers are copied and bulk ones spliced: a direction starts in copy mode and switches
//! to splice after a read fills a whole buffer (more is waiting), and back after a splice read
//! moves less than a quarter of that. Request/response traffic (databases, games) thus costs one
//! `read` and one `write` per message, and a bulk transfer never enters user space.
//!
//! Close handling follows what `read`/`write` return, never the event flags (FAILURE-MODES F4;
//! mio documents `is_read_closed` as best effort). The one use of a flag is conservative: a copy
//! read that returns less than the buffer normally proves the socket drained (edge-triggered
//! epoll reports any later arrival), which saves the `read` that would return `EAGAIN`; but if a
//! hang-up was already reported, the read-until-`EAGAIN` rule applies, so an EOF that arrived
//! before the read is never missed.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

use crate::sys;

/// Size of one userspace buffer; also the most one splice read asks for.
pub const BUF_SIZE: usize = 64 * 1024;
/// Reads plus writes one `pump` call may do before it yields to other sessions (sozu's
/// MAX_LOOP_ITERATIONS idea: a busy session cannot starve the others; 16 x 64 KiB = 1 MiB).
const BUDGET: usize = 16;
/// Empty buffers and pipes a worker keeps for reuse; more are freed.
const MAX_FREE: usize = 256;
/// A splice read moving less than this goes back to copying.
const BULK_MIN: usize = BUF_SIZE / 4;
/// Pipe capacity asked for with F_SETPIPE_SZ (fcntl(2)): a bigger pipe moves more per splice
/// call. The kernel may refuse (pipe-max-size, or an unprivileged user over
/// pipe-user-pages-soft); the pipe then keeps its default size, which only costs more calls.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// What the pump and a session need of a socket: tether's `TcpStream`, or a scripted stream
/// that a test drives on a virtual clock (`crate::sim`).
pub trait Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// `shutdown(Write)`: the peer reads EOF once it has read everything written.
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// Move up to `len` bytes from this socket into `pipe` (splice(2)). A stream that cannot
    /// (a scripted one) is only given buffers: pools without pipes never ask.
    fn splice_into(&mut self, _pipe: &Pipe, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Move up to `len` bytes from `pipe` into this socket.
    fn splice_from(&mut self, _pipe: &Pipe, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether the next byte to read is the TCP urgent mark (none in a scripted stream).
    fn at_urgent_mark(&self) -> bool {
        false
    }
    /// Bytes written that the peer has not acknowledged yet.
    fn unsent(&self) -> usize;
    /// Make the close send a reset (and drop what is unsent) instead of a FIN.
    fn reset_on_close(&self);
}

impl Io for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn splice_into(&mut self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        // splice(2): "SPLICE_F_NONBLOCK: do not block on I/O"; SPLICE_F_MOVE is a hint.
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        splice(self.as_fd(), None, pipe.w.as_fd(), None, len, flags).map_err(io::Error::from)
    }

    fn splice_from(&mut self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        splice(pipe.r.as_fd(), None, self.as_fd(), None, len, flags).map_err(io::Error::from)
    }

    fn at_urgent_mark(&self) -> bool {
        sys::at_urgent_mark(self)
    }

    fn unsent(&self) -> usize {
        sys::unsent(self).max(0) as usize
    }

    fn reset_on_close(&self) {
        // SO_LINGER with a zero timeout (socket(7)).
        let _ = socket2::SockRef::from(self).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// One socket of a session with the readiness the pump believes it has. Edge-triggered events
/// set a flag; only a `WouldBlock` clears it, so no edge is ever lost.
#[derive(Debug)]
pub struct Side<S = TcpStream> {
    pub stream: S,
    pub readable: bool,
    pub writable: bool,
    /// An event reported the peer's FIN or an error: read until `WouldBlock` or EOF from now on.
    pub hung_up: bool,
}

impl<S> Side<S> {
    pub fn new(stream: S) -> Self {
        Side { stream, readable: true, writable: true, hung_up: false }
    }
}

/// A pipe used as a splice buffer.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Per-worker free lists of buffers and pipes.
#[derive(Debug)]
pub struct Pools {
    bufs: Vec<Box<[u8]>>,
    pipes: Vec<Pipe>,
    /// Most pipes this worker may hold open at once (in use or pooled): its share of the fd
    /// budget left after two sockets per session. 0 turns splice off.
    max_pipes: usize,
    /// Pipes open now (in use or pooled).
    pipes_open: usize,
}

impl Pools {
    pub fn new(max_pipes: usize) -> Self {
        Pools { bufs: Vec::new(), pipes: Vec::new(), max_pipes, pipes_open: 0 }
    }

    /// A store for the next read: a pipe for a bulk transfer when one can be had, else a buffer.
    fn take(&mut self, bulk: bool) -> Store {
        if bulk {
            if let Some(pipe) = self.pipes.pop() {
                return Store::Pipe { pipe, pending: 0 };
            }
            if self.pipes_open < self.max_pipes {
                match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
                    Ok((r, w)) => {
                        // Best effort: a refused resize leaves the default 64 KiB.
                        let _ = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
                        self.pipes_open += 1;
                        return Store::Pipe { pipe: Pipe { r, w }, pending: 0 };
                    }
                    // Out of fds: this transfer uses a buffer instead; the session goes on.
                    Err(e) => log::debug!("pipe2 failed ({e}); using a buffer"),
                }
            }
        }
        let buf = self.bufs.pop().unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        Store::Buf { buf, start: 0, end: 0 }
    }

    fn give(&mut self, store: Store) {
        match store {
            Store::Empty => {}
            Store::Buf { buf, .. } => {
                if self.bufs.len() < MAX_FREE {
                    self.bufs.push(buf);
                }
            }
            // A pipe goes back only when empty, or the next user would read stale bytes.
            Store::Pipe { pipe, pending: 0 } if self.pipes.len() < MAX_FREE => {
                self.pipes.push(pipe)
            }
            // Dropped: both fds closed.
            Store::Pipe { .. } => self.pipes_open -= 1,
        }
    }
}

/// Where bytes read but not yet written wait.
#[derive(Debug)]
enum Store {
    Empty,
    Buf { buf: Box<[u8]>, start: usize, end: usize },
    Pipe { pipe: Pipe, pending: usize },
}

impl Store {
    fn pending(&self) -> usize {
        match self {
            Store::Empty => 0,
            Store::Buf { start, end, .. } => end - start,
            Store::Pipe { pending, .. } => *pending,
        }
    }
}

/// What a pump call achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for readiness on one of the sockets.
    Blocked,
    /// Budget used up with work left: call again after other sessions had their turn.
    Yield,
    /// The source hit EOF and the destination's write side is shut: this direction is over.
    Done,
}

/// Why a direction stopped for good.
#[derive(Debug)]
pub enum PumpError {
    /// Reading the source failed (a reset, or the peer vanished): forward an abort.
    Source(io::Error),
    /// Writing the destination failed: it is gone.
    Destination(io::Error),
}

/// One direction of a session (linkerd's half-duplex `duplex` idea).
#[derive(Debug)]
pub struct HalfPipe {
    pub label: &'static str,
    store: Store,
    /// The source returned EOF.
    pub eof: bool,
    /// `shutdown(Write)` was done on the destination.
    pub shut: bool,
    /// Bytes written to the destination so far.
    pub moved: u64,
    /// The last read suggests a bulk transfer: splice the next one.
    bulk: bool,
    /// The source's end will be forwarded as a reset, not a FIN: at EOF, do not shut down the
    /// destination (a FIN before the reset would read as a clean end).
    pub abort: bool,
    /// The other direction is over: this one ending ends the session, whose close(2) sends the
    /// FIN, so the shutdown(2) can be skipped.
    pub last: bool,
}

impl HalfPipe {
    pub fn new(label: &'static str) -> Self {
        HalfPipe {
            label,
            store: Store::Empty,
            eof: false,
            shut: false,
            moved: 0,
            bulk: false,
            abort: false,
            last: false,
        }
    }

    /// Bytes read from the source and not yet written.
    pub fn pending(&self) -> usize {
        self.store.pending()
    }

    /// Move bytes until a socket blocks, the budget is spent, or the direction is done.
    pub fn pump<S: Io>(
        &mut self,
        src: &mut Side<S>,
        dst: &mut Side<S>,
        pools: &mut Pools,
    ) -> Result<Progress, PumpError> {
        for _ in 0..BUDGET {
            if self.pending() > 0 {
                if !dst.writable {
                    return Ok(Progress::Blocked);
                }
                self.write(dst, pools)?;
                continue;
            }
            if self.eof {
                if !self.shut && !self.abort {
                    self.shut = true;
                    if !self.last {
                        // The peer may already be gone; the other direction will see it.
                        let _ = dst.stream.shutdown_write();
                    }
                }
                return Ok(Progress::Done);
            }
            if !src.readable {
                return Ok(Progress::Blocked);
            }
            self.read(src, pools)?;
        }
        Ok(Progress::Yield)
    }

    /// Write what is pending without reading more (used while forwarding a reset). Returns
    /// whether everything pending has been written.
    pub fn flush<S: Io>(
        &mut self,
        dst: &mut Side<S>,
        pools: &mut Pools,
    ) -> Result<bool, PumpError> {
        for _ in 0..BUDGET {
            if self.pending() == 0 {
                return Ok(true);
            }
            if !dst.writable {
                return Ok(false);
            }
            self.write(dst, pools)?;
        }
        Ok(self.pending() == 0)
    }

    /// Give the store back (session closing). A pipe still holding bytes is closed instead.
    pub fn release(&mut self, pools: &mut Pools) {
        pools.give(std::mem::replace(&mut self.store, Store::Empty));
    }

    fn read<S: Io>(&mut self, src: &mut Side<S>, pools: &mut Pools) -> Result<(), PumpError> {
        if let Store::Empty = self.store {
            self.store = pools.take(self.bulk);
        }
        let (got, spliced) = match &mut self.store {
            Store::Empty => unreachable!("a store was just taken"),
            Store::Buf { buf, start, end } => {
                *start = 0;
                *end = 0;
                let r = src.stream.read(buf);
                if let Ok(n) = r {
                    *end = n;
                }
                (r, false)
            }
            Store::Pipe { pipe, pending } => {
                let r = src.stream.splice_into(pipe, PIPE_SIZE);
                if let Ok(n) = r {
                    *pending = n;
                }
                (r, true)
            }
        };
        // splice(2) stops at the TCP urgent mark and then says EAGAIN, or 0 if the FIN is also
        // in (the kernel's tcp_splice_read: "This might happen with URG data"). recv(2) reads
        // past the mark: copy the next read instead of taking either answer at face value.
        let nothing = matches!(&got, Ok(0))
            || matches!(&got, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        if spliced && nothing && src.stream.at_urgent_mark() {
            self.bulk = false;
            self.release(pools);
            return Ok(());
        }
        match got {
            Ok(0) => {
                self.eof = true;
                self.release(pools);
                Ok(())
            }
            Ok(n) if spliced => {
                self.bulk = n >= BULK_MIN;
                Ok(())
            }
            Ok(n) => {
                self.bulk = n == BUF_SIZE;
                // A short copy read drained the socket, unless a hang-up was reported (see the
                // module doc): skip the read that would only say EAGAIN.
                if n < BUF_SIZE && !src.hung_up {
                    src.readable = false;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.release(pools);
                src.readable = false;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => {
                // The error is reported once (the next read would say EOF): the source is over.
                self.eof = true;
                self.release(pools);
                Err(PumpError::Source(e))
            }
        }
    }

    fn write<S: Io>(&mut self, dst: &mut Side<S>, pools: &mut Pools) -> Result<(), PumpError> {
        let r = match &mut self.store {
            Store::Empty => return Ok(()),
            Store::Buf { buf, start, end } => {
                let r = dst.stream.write(&buf[*start..*end]);
                if let Ok(n) = r {
                    *start += n;
                }
                r
            }
            Store::Pipe { pipe, pending } => {
                let r = dst.stream.splice_from(pipe, *pending);
                if let Ok(n) = r {
                    *pending -= n;
                }
                r
            }
        };
        match r {
            Ok(n) => {
                self.moved += n as u64;
                if self.pending() == 0 {
                    self.release(pools);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dst.writable = false;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(PumpError::Destination(e)),
        }
    }
}

/// Whether `splice(2)` works here: try one on a throwaway pipe pair.
pub fn splice_supported() -> bool {
    let Ok((r1, w1)) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return false;
    };
    let Ok((_r2, w2)) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return false;
    };
    drop(w1);
    // Splicing from an empty pipe whose writer is closed returns 0 where splice exists, ENOSYS or
    // EINVAL where it does not.
    !matches!(
        splice(r1.as_fd(), None, w2.as_fd(), None, 1, SpliceFFlags::SPLICE_F_NONBLOCK),
        Err(Errno::ENOSYS | Errno::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream with `readable` bytes waiting (then EOF if `eof`), taking at most `room` bytes
    /// of writes; it records what it was given and whether its write side was shut.
    #[derive(Default)]
    struct Mock {
        readable: usize,
        eof: bool,
        room: usize,
        written: usize,
        read_total: usize,
        shut: bool,
    }

    impl Io for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.readable);
            if n == 0 && !self.eof {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.readable -= n;
            self.read_total += n;
            Ok(n)
        }

        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= n;
            self.written += n;
            Ok(n)
        }

        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }

        fn unsent(&self) -> usize {
            0
        }

        fn reset_on_close(&self) {}
    }

    #[test]
    fn a_slow_destination_stops_the_source_being_read_and_eof_shuts_it_after_the_data() {
        let mut pools = Pools::new(0);
        let mut pipe = HalfPipe::new("client->backend");
        let mut src = Side::new(Mock { readable: 1 << 20, eof: true, ..Mock::default() });
        let mut dst = Side::new(Mock { room: 10, ..Mock::default() });
        // The destination takes 10 bytes: the source is read once (one buffer), not more.
        assert_eq!(pipe.pump(&mut src, &mut dst, &mut pools).unwrap(), Progress::Blocked);
        assert_eq!(src.stream.read_total, BUF_SIZE);
        assert_eq!(dst.stream.written, 10);
        assert_eq!(pipe.pending(), BUF_SIZE - 10);
        // Room comes back (an event would say so): everything flows, then the FIN follows the
        // last byte.
        while !pipe.shut {
            dst.stream.room = 100_000;
            dst.writable = true;
            src.readable = true;
            pipe.pump(&mut src, &mut dst, &mut pools).unwrap();
        }
        assert_eq!(dst.stream.written, 1 << 20);
        assert_eq!(pipe.moved, 1 << 20);
        assert!(dst.stream.shut, "no FIN after the data");
    }
}
