//! In-place upgrade (issue 12): the running process starts the binary at its own path again
//! (nginx's USR2), and hands the new process, over a `SOCK_SEQPACKET` Unix socket, every
//! listening socket (SCM_RIGHTS: no re-bind, so no SYN or datagram is refused), the admin
//! listener, the sticky tables (the state file's format) and each backend's health and admin
//! state. The new process checks its command line and configuration, binds only what is new,
//! restores, starts its workers and says `ready`; only then does the old one stop accepting and
//! serve its open sessions until they end or the grace period is over. If anything fails before
//! `ready`, the new process is gone and the old one serves on as if nothing had happened.
//!
//! UDP flows are handed over too: before the hand-over every worker stops reading its UDP
//! sockets and gives a copy of each flow's connected socket; the new process's workers carry
//! the flows on from their first turn (same backend, same source port toward it). Datagrams
//! that arrive in between wait in the kernel's socket buffers. If the upgrade fails, the old
//! workers read their sockets again.
//!
//! Not handed over: established TCP sessions (they stay with the old process until they end).
//!
//! Messages, old to new: a JSON [`Hello`]; one message per descriptor, in the hello's order
//! (listeners, then the admin listener); the flows' sockets, [`proxy::MAX_FDS`] a message; the
//! state bytes in chunks. New to old: `ready`.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use serde::{Deserialize, Serialize};

/// The environment variable that tells a new process which descriptor to take over from.
pub const FD_VAR: &str = "TETHER_UPGRADE_FD";
/// Bytes of the state sent per message.
const CHUNK: usize = 60 * 1024;
/// How long the new process may take to say `ready`.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// A listening socket control keeps a descriptor of, to hand it over.
#[derive(Debug)]
pub struct HeldListener {
    pub want: SocketAddr,
    pub bound: SocketAddr,
    pub udp: bool,
    pub fd: OwnedFd,
}

/// Keep a descriptor of each distinct socket of `bound`, bound for `want` (a shared listener is
/// one socket in every worker: kept once).
pub fn hold(bound: &proxy::Bound, want: SocketAddr) -> Vec<HeldListener> {
    let mut held: Vec<HeldListener> = Vec::new();
    let mut seen = Vec::new();
    let tcp = bound.tcp.iter().flatten().map(|l| (l.try_clone().map(OwnedFd::from), false));
    let udp = bound.udp.iter().flatten().map(|s| (s.try_clone().map(OwnedFd::from), true));
    for (fd, udp) in tcp.chain(udp) {
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("keeping a listener of {want} for upgrades: {e}");
                continue;
            }
        };
        let Ok(stat) = nix::sys::stat::fstat(fd.as_raw_fd()) else { continue };
        if seen.contains(&stat.st_ino) {
            continue;
        }
        seen.push(stat.st_ino);
        let Ok(addr) =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
        else {
            continue;
        };
        let Some(bound) = sockaddr(&addr) else { continue };
        held.push(HeldListener { want, bound, udp, fd });
    }
    held
}

fn sockaddr(addr: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// One backend's state as handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthOf {
    pub service: String,
    pub backend: String,
    pub up: bool,
    pub admin: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ListenerOf {
    want: SocketAddr,
    bound: SocketAddr,
    udp: bool,
}

/// A UDP flow as handed over, its socket apart (see [`proxy::HandedFlow`]).
#[derive(Debug, Serialize, Deserialize)]
struct FlowOf {
    listener: u64,
    client: SocketAddr,
    local: SocketAddr,
    local_ip: Option<std::net::IpAddr>,
    source: SocketAddr,
    destination: SocketAddr,
    header_sent: bool,
    backend: String,
    /// A keyed flow's session key bytes (`--udp-session-key`); absent from older processes.
    #[serde(default)]
    session: Option<Vec<u8>>,
}

/// The first message of a hand-over.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    listeners: Vec<ListenerOf>,
    admin: bool,
    flows: Vec<FlowOf>,
    state_len: usize,
    health: Vec<HealthOf>,
}

/// What a new process receives.
#[derive(Debug, Default)]
pub struct Handover {
    pub listeners: Vec<HeldListener>,
    pub admin: Option<OwnedFd>,
    /// The sticky tables in the state file's format.
    pub state: Vec<u8>,
    pub health: Vec<HealthOf>,
    /// The UDP flows, each to go to the worker that reads its listener socket.
    pub flows: Vec<proxy::HandedFlow>,
}

impl Handover {
    /// The listeners handed over for `want` of this transport, as the workers' sockets: a TCP
    /// listener in every worker's list when `shared` (each worker its own descriptor), the
    /// rest dealt out in turn. `None` if none was handed over.
    pub fn take(
        &mut self,
        want: SocketAddr,
        udp: bool,
        workers: usize,
        shared: bool,
    ) -> std::io::Result<Option<proxy::Bound>> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|h| h.want == want && h.udp == udp);
        self.listeners = rest;
        let Some(first) = mine.first() else { return Ok(None) };
        let mut bound = proxy::Bound {
            tcp: (0..workers).map(|_| Vec::new()).collect(),
            udp: (0..workers).map(|_| Vec::new()).collect(),
            ..proxy::Bound::default()
        };
        if udp {
            bound.udp_addrs.push(first.bound);
            for (i, h) in mine.into_iter().enumerate() {
                bound.udp[i % workers].push(std::net::UdpSocket::from(h.fd));
            }
        } else {
            bound.tcp_addrs.push(first.bound);
            if shared {
                let l = std::net::TcpListener::from(mine.into_iter().next().expect("first").fd);
                for w in 0..workers {
                    bound.tcp[w].push(l.try_clone()?);
                }
            } else {
                for (i, h) in mine.into_iter().enumerate() {
                    bound.tcp[i % workers].push(std::net::TcpListener::from(h.fd));
                }
            }
        }
        Ok(Some(bound))
    }
}

/// Start the binary at `exe` with this process's arguments, handing it `listeners`, the
/// admin listener, the sticky tables (`state`) and `health`; wait until it says ready. On any
/// failure the new process is killed and the reason returned: nothing of this process changed.
pub fn start(
    exe: &std::path::Path,
    listeners: &[HeldListener],
    admin: Option<&OwnedFd>,
    flows: &[proxy::HandedFlow],
    state: &[u8],
    health: Vec<HealthOf>,
) -> Result<u32, String> {
    let (ours, theirs) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| format!("socketpair: {e}"))?;
    // The new process inherits its end across exec.
    nix::fcntl::fcntl(
        theirs.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| format!("fcntl: {e}"))?;
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(FD_VAR, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    drop(theirs);
    let pid = child.id();
    let handed =
        hand_over(&ours, listeners, admin, flows, state, health).and_then(|()| wait_ready(&ours));
    match handed {
        Ok(()) => {
            // The new process lives on alone; nobody waits for it (it is reaped at our exit).
            std::mem::forget(child);
            Ok(pid)
        }
        Err(why) => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(format!("the new process ({}, pid {pid}) {why}; {status}", exe.display()))
        }
    }
}

fn hand_over(
    socket: &OwnedFd,
    listeners: &[HeldListener],
    admin: Option<&OwnedFd>,
    flows: &[proxy::HandedFlow],
    state: &[u8],
    health: Vec<HealthOf>,
) -> Result<(), String> {
    let hello = Hello {
        listeners: listeners
            .iter()
            .map(|h| ListenerOf { want: h.want, bound: h.bound, udp: h.udp })
            .collect(),
        admin: admin.is_some(),
        flows: flows
            .iter()
            .map(|f| FlowOf {
                listener: f.listener,
                client: f.client,
                local: f.local,
                local_ip: f.local_ip,
                source: f.source,
                destination: f.destination,
                header_sent: f.header_sent,
                backend: f.backend.clone(),
                session: f.session.clone(),
            })
            .collect(),
        state_len: state.len(),
        health,
    };
    let fail = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            "exited before it took the hand-over".to_string()
        }
        _ => format!("did not take the hand-over ({e})"),
    };
    let json = serde_json::to_vec(&hello).map_err(|e| format!("encoding the hand-over: {e}"))?;
    proxy::send_with_fds(socket, &json, &[]).map_err(fail)?;
    for fd in listeners.iter().map(|h| h.fd.as_fd()).chain(admin.map(|a| a.as_fd())) {
        proxy::send_with_fds(socket, b"fd", &[fd.as_raw_fd()]).map_err(fail)?;
    }
    for batch in flows.chunks(proxy::MAX_FDS) {
        let fds: Vec<_> = batch.iter().map(|f| f.socket.as_raw_fd()).collect();
        proxy::send_with_fds(socket, b"flows", &fds).map_err(fail)?;
    }
    for chunk in state.chunks(CHUNK) {
        proxy::send_with_fds(socket, chunk, &[]).map_err(fail)?;
    }
    Ok(())
}

fn wait_ready(socket: &OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::TimeValLike;
    let within = nix::sys::time::TimeVal::milliseconds(READY_WITHIN.as_millis() as i64);
    setsockopt(socket, ReceiveTimeout, &within).map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let mut buf = [0u8; 16];
    match proxy::recv_with_fds(socket, &mut buf) {
        Ok((n, _)) if &buf[..n] == b"ready" => Ok(()),
        Ok((0, _)) => Err("exited before it was ready".into()),
        Ok((n, _)) => Err(format!("said {:?}", String::from_utf8_lossy(&buf[..n]))),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(format!("did not say ready within {READY_WITHIN:?}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Err("exited before it was ready".into())
        }
        Err(e) => Err(format!("hand-over socket: {e}")),
    }
}

/// In a new process started by an upgrade: take over from the old one through descriptor
/// `raw` (from [`FD_VAR`]). Returns what was handed over and the socket to say ready on.
pub fn receive(raw: &str) -> Result<(Handover, OwnedFd), String> {
    let raw: i32 = raw.parse().map_err(|_| format!("{FD_VAR}={raw}: not a descriptor"))?;
    let socket = proxy::inherited_fd(raw).map_err(|e| format!("{FD_VAR}={raw}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let (n, _) = proxy::recv_with_fds(&socket, &mut buf).map_err(|e| format!("hand-over: {e}"))?;
    let hello: Hello =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("hand-over message: {e}"))?;
    let fd = || -> Result<OwnedFd, String> {
        let mut small = [0u8; 8];
        let (_, mut fds) =
            proxy::recv_with_fds(&socket, &mut small).map_err(|e| format!("hand-over: {e}"))?;
        fds.pop().ok_or_else(|| "hand-over: a descriptor is missing".to_string())
    };
    let mut handover = Handover { health: hello.health, ..Handover::default() };
    for l in &hello.listeners {
        handover.listeners.push(HeldListener {
            want: l.want,
            bound: l.bound,
            udp: l.udp,
            fd: fd()?,
        });
    }
    if hello.admin {
        handover.admin = Some(fd()?);
    }
    let mut sockets: Vec<OwnedFd> = Vec::with_capacity(hello.flows.len());
    while sockets.len() < hello.flows.len() {
        let mut small = [0u8; 8];
        let (_, fds) =
            proxy::recv_with_fds(&socket, &mut small).map_err(|e| format!("hand-over: {e}"))?;
        if fds.is_empty() {
            return Err("hand-over: the flows' sockets are missing".into());
        }
        sockets.extend(fds);
    }
    for (f, fd) in hello.flows.into_iter().zip(sockets) {
        handover.flows.push(proxy::HandedFlow {
            socket: std::net::UdpSocket::from(fd),
            listener: f.listener,
            client: f.client,
            local: f.local,
            local_ip: f.local_ip,
            source: f.source,
            destination: f.destination,
            header_sent: f.header_sent,
            backend: f.backend,
            session: f.session,
        });
    }
    let mut chunk = vec![0u8; CHUNK];
    while handover.state.len() < hello.state_len {
        let (n, _) =
            proxy::recv_with_fds(&socket, &mut chunk).map_err(|e| format!("hand-over: {e}"))?;
        if n == 0 {
            return Err("hand-over: the state ended early".into());
        }
        handover.state.extend_from_slice(&chunk[..n]);
    }
    Ok((handover, socket))
}

/// Tell the old process this one serves.
pub fn ready(socket: &OwnedFd) {
    if let Err(e) = proxy::send_with_fds(socket, b"ready", &[]) {
        log::error!("upgrade: telling the old process we are ready: {e}");
    }
}
