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
//! Close handling follows what `read`/`write` return, never the event flags (FAILURE-MODES F4;
//! mio documents `is_read_closed` as best effort).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};

/// Size of one userspace buffer; also the most one splice read asks for.
pub const BUF_SIZE: usize = 64 * 1024;
/// Reads plus writes one `pump` call may do before it yields to other sessions (sozu's
/// MAX_LOOP_ITERATIONS idea: a busy session cannot starve the others; 16 x 64 KiB = 1 MiB).
const BUDGET: usize = 16;
/// Empty buffers and pipes a worker keeps for reuse; more are freed.
const MAX_FREE: usize = 256;

/// One socket of a session with the readiness the pump believes it has. Edge-triggered events
/// set a flag; only a `WouldBlock` clears it, so no edge is ever lost.
#[derive(Debug)]
pub struct Side {
    pub stream: TcpStream,
    pub readable: bool,
    pub writable: bool,
}

impl Side {
    pub fn new(stream: TcpStream) -> Self {
        Side { stream, readable: true, writable: true }
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
    splice: bool,
}

impl Pools {
    pub fn new(splice: bool) -> Self {
        Pools { bufs: Vec::new(), pipes: Vec::new(), splice }
    }

    /// Whether the splice path is in use (it may be off by flag, or unsupported).
    pub fn splice(&self) -> bool {
        self.splice
    }

    fn take(&mut self) -> Store {
        if self.splice {
            if let Some(pipe) = self.pipes.pop() {
                return Store::Pipe { pipe, pending: 0 };
            }
            match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
                Ok((r, w)) => return Store::Pipe { pipe: Pipe { r, w }, pending: 0 },
                // Out of fds: this transfer uses a buffer instead; the session goes on.
                Err(e) => log::debug!("pipe2 failed ({e}); using a buffer"),
            }
        }
        let buf = self.bufs.pop().unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        Store::Buf { buf, start: 0, end: 0 }
    }

    fn give(&mut self, store: Store) {
        match store {
            Store::Empty => {}
            Store::Buf { buf, .. } if self.bufs.len() < MAX_FREE => self.bufs.push(buf),
            // A pipe goes back only when empty, or the next user would read stale bytes.
            Store::Pipe { pipe, pending: 0 } if self.pipes.len() < MAX_FREE => {
                self.pipes.push(pipe)
            }
            _ => {}
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
}

impl HalfPipe {
    pub fn new(label: &'static str) -> Self {
        HalfPipe { label, store: Store::Empty, eof: false, shut: false, moved: 0 }
    }

    /// Bytes read from the source and not yet written.
    pub fn pending(&self) -> usize {
        self.store.pending()
    }

    /// Move bytes until a socket blocks, the budget is spent, or the direction is done.
    pub fn pump(
        &mut self,
        src: &mut Side,
        dst: &mut Side,
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
                if !self.shut {
                    self.shut = true;
                    // The peer may already be gone; the other direction will see it.
                    let _ = dst.stream.shutdown(Shutdown::Write);
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
    pub fn flush(&mut self, dst: &mut Side, pools: &mut Pools) -> Result<bool, PumpError> {
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

    fn read(&mut self, src: &mut Side, pools: &mut Pools) -> Result<(), PumpError> {
        if let Store::Empty = self.store {
            self.store = pools.take();
        }
        let got = match &mut self.store {
            Store::Empty => unreachable!("a store was just taken"),
            Store::Buf { buf, start, end } => {
                *start = 0;
                *end = 0;
                let r = (&src.stream).read(buf);
                if let Ok(n) = r {
                    *end = n;
                }
                r
            }
            Store::Pipe { pipe, pending } => {
                // splice(2): "SPLICE_F_NONBLOCK: do not block on I/O"; SPLICE_F_MOVE is a hint.
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                let r = splice(src.stream.as_fd(), None, pipe.w.as_fd(), None, BUF_SIZE, flags)
                    .map_err(io::Error::from);
                if let Ok(n) = r {
                    *pending = n;
                }
                r
            }
        };
        match got {
            Ok(0) => {
                self.eof = true;
                self.release(pools);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                src.readable = false;
                self.release(pools);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => {
                self.release(pools);
                Err(PumpError::Source(e))
            }
        }
    }

    fn write(&mut self, dst: &mut Side, pools: &mut Pools) -> Result<(), PumpError> {
        let r = match &mut self.store {
            Store::Empty => return Ok(()),
            Store::Buf { buf, start, end } => {
                let r = (&dst.stream).write(&buf[*start..*end]);
                if let Ok(n) = r {
                    *start += n;
                }
                r
            }
            Store::Pipe { pipe, pending } => {
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                let r = splice(pipe.r.as_fd(), None, dst.stream.as_fd(), None, *pending, flags)
                    .map_err(io::Error::from);
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
