//! systemd's readiness protocol (sd_notify(3)) in the few lines it takes: datagrams of
//! `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET` (a path, or an abstract name
//! written with a leading `@`). Without that variable every call does nothing, so tether run by
//! hand, by a test or by another supervisor behaves as before.
//!
//! What tether says and when (see docs/operations.md):
//! - `READY=1` once every listener is bound, the workers run and the admin API answers; a
//!   process started by an upgrade says `MAINPID=` its own pid first, so systemd follows it
//!   (the unit needs `NotifyAccess=all`);
//! - `RELOADING=1` with `MONOTONIC_USEC=` before a reload, `READY=1` after it (applied or refused:
//!   a refused reload leaves the old configuration serving), with a `STATUS=` line;
//! - `STOPPING=1` when it stops accepting for a shutdown;
//! - `WATCHDOG=1` from the supervisor at half the watchdog interval, only while every worker's
//!   event loop turns: a stalled worker lets the watchdog fire and systemd restart tether.
//!
//! After an upgrade has handed over, the old process says nothing more: the new one is the
//! service's main process, and a `STOPPING=1` from the old one would stop the unit.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where readiness goes, if anywhere.
#[derive(Default)]
pub(crate) struct Notifier {
    target: Option<Target>,
    /// Half of `WATCHDOG_USEC` when the watchdog is this process's to feed.
    watchdog_every: Option<Duration>,
}

struct Target {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// From the environment systemd sets. `upgraded` is true in a process an upgrade started:
    /// `WATCHDOG_PID` then names the old process, and the watchdog is still this one's to feed
    /// once it has said `MAINPID=`.
    pub(crate) fn from_env(upgraded: bool) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let target = var("NOTIFY_SOCKET").and_then(|name| match Target::open(&name) {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET {name}: {e}; systemd will not hear of readiness");
                None
            }
        });
        let ours =
            upgraded || var("WATCHDOG_PID").map_or(true, |p| p == std::process::id().to_string());
        let watchdog_every = var("WATCHDOG_USEC")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0 && ours && target.is_some())
            .map(|us| Duration::from_micros(us / 2));
        Notifier { target, watchdog_every }
    }

    /// How often to say `WATCHDOG=1`, when systemd watches.
    pub(crate) fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Sends one message (newline-separated assignments). Failures are logged, never fatal.
    pub(crate) fn send(&self, message: &str) {
        let Some(t) = &self.target else { return };
        if let Err(e) = t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            log::warn!("sd_notify {:?}: {e}", message.lines().next().unwrap_or(""));
        }
    }

    /// `READY=1`; after an upgrade, `MAINPID=` this process first.
    pub(crate) fn ready(&self, upgraded: bool, status: &str) {
        let pid =
            if upgraded { format!("MAINPID={}\n", std::process::id()) } else { String::new() };
        self.send(&format!("{pid}READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the monotonic time systemd asks for with it.
    pub(crate) fn reloading(&self) {
        let usec = offload::monotonic_ns() / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"));
    }

    /// Says nothing from now on (this process handed over to an upgrade).
    pub(crate) fn silence(&mut self) {
        self.target = None;
        self.watchdog_every = None;
    }
}

impl Target {
    fn open(name: &str) -> std::io::Result<Target> {
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(name)?,
        };
        Ok(Target { socket: UnixDatagram::unbound()?, addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listening() -> (tempdir::Dir, UnixDatagram, String) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        (dir, socket, path.display().to_string())
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "tether-notify-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir_all(&p).expect("temp dir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn messages_reach_a_path_socket_and_an_upgrade_names_its_pid() {
        let _fds = crate::test_fds::shared();
        let (_dir, socket, path) = listening();
        let n = Notifier { target: Some(Target::open(&path).expect("open")), watchdog_every: None };
        n.ready(false, "serving");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=serving");
        n.ready(true, "serving");
        assert_eq!(
            recv(&socket),
            format!("MAINPID={}\nREADY=1\nSTATUS=serving", std::process::id())
        );
        n.reloading();
        let m = recv(&socket);
        assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m}");
        let usec: u64 =
            m.lines().nth(1).and_then(|l| l.split('=').nth(1)?.parse().ok()).expect("usec");
        assert!(usec > 0);
    }

    #[test]
    fn an_abstract_socket_name_is_understood() {
        let _fds = crate::test_fds::shared();
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tether-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = Notifier {
            target: Some(Target::open(&format!("@{name}")).expect("open")),
            watchdog_every: None,
        };
        n.send("STOPPING=1");
        assert_eq!(recv(&socket), "STOPPING=1");
    }

    #[test]
    fn a_silenced_notifier_says_nothing() {
        let _fds = crate::test_fds::shared();
        let (_dir, socket, path) = listening();
        let mut n = Notifier {
            target: Some(Target::open(&path).expect("open")),
            watchdog_every: Some(Duration::from_secs(1)),
        };
        n.silence();
        n.send("STOPPING=1");
        assert_eq!(n.watchdog_every(), None);
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        assert!(socket.recv(&mut buf).is_err(), "nothing was sent");
    }
}
