//! Running one test in a network namespace of its own (`unshare -rn`): a private loopback
//! whose sysctls, such as `net.ipv4.ip_local_port_range`, a test may change without touching
//! the host or the tests running beside it.

use std::io;
use std::net::SocketAddr;
use std::process::Command;

/// Set in the environment of a test re-run inside its namespace.
const INSIDE: &str = "TETHER_TEST_IN_NETNS";

/// Whether the caller is already inside (true: go on with the test). Otherwise re-run test
/// `name` of this test binary alone in a new user and network namespace, panic with its output
/// unless it passed, and return false: the caller returns.
pub fn inside_own_netns(name: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        loopback_up().expect("bring lo up in the test's namespace");
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .expect("run unshare(1) (util-linux)");
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} failed in its own network namespace:\n{said}");
    assert!(said.contains("1 passed"), "{name} did not run in its namespace:\n{said}");
    false
}

/// Local ports the kernel picks from for connect(2) and bind(2) to port 0 in this namespace.
pub fn set_local_port_range(first: u16, last: u16) -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", format!("{first} {last}"))
}

/// A new network namespace's `lo` is down: bring it up (SIOCSIFFLAGS, netdevice(7)).
#[allow(unsafe_code)]
fn loopback_up() -> io::Result<()> {
    use nix::libc;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: an all-zero ifreq is valid; the name is copied within its 16 bytes.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: both requests read and write the ifreq, a live local, and nothing else.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A network namespace of a test's own (root: CAP_SYS_ADMIN), held by a parked thread, so
/// several can exist at once (a client host, a balancer host, a backend host joined by veth
/// pairs). It ends with the value.
pub struct Namespace {
    ns: std::fs::File,
    /// A thread in it: `ip link set X netns <tid>` moves an interface there.
    pub tid: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Namespace {
    /// A new namespace with `lo` up.
    pub fn new() -> io::Result<Namespace> {
        use std::sync::atomic::Ordering::Relaxed;
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| loopback_up())
                .and_then(|()| std::fs::File::open("/proc/thread-self/ns/net"))
                .map(|ns| (ns, nix::unistd::gettid().as_raw()));
            let failed = made.is_err();
            let _ = tx.send(made);
            while !failed && !stopped.load(Relaxed) {
                std::thread::park();
            }
        });
        let (ns, tid) = rx.recv().map_err(io::Error::other)??;
        Ok(Namespace { ns, tid, stop, thread: Some(thread) })
    }

    /// Run `f` on a thread inside (sockets it makes, and processes it starts, live here).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&self.ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the test's namespace");
                f()
            })
            .join()
            .expect("a thread in the namespace panicked")
        })
    }

    /// Run a shell script inside; panics with its output unless it succeeds.
    pub fn sh(&self, script: &str) {
        self.run(|| sh(script));
    }

    /// A counter of `/proc/net/snmp` (or `snmp6` for a name starting with `Udp6`/`Ip6`) here,
    /// e.g. `("Udp", "InCsumErrors")`.
    pub fn snmp(&self, group: &str, name: &str) -> u64 {
        self.run(|| snmp(group, name))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Run a shell script (in the caller's thread's namespace); panics with its output unless it
/// succeeds.
pub fn sh(script: &str) {
    let out = Command::new("sh").args(["-ec", script]).output().expect("run sh");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A counter of the calling thread's namespace: `/proc/thread-self/net/snmp` for `("Udp",
/// "InCsumErrors")`, `snmp6` for `("Udp6", "InCsumErrors")`.
pub fn snmp(group: &str, name: &str) -> u64 {
    if group.ends_with('6') {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp6").expect("snmp6");
        let key = format!("{group}{name}");
        return text
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key.as_str())).then(|| it.next()?.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no {key} in snmp6"));
    }
    paired_counter("snmp", group, name).unwrap_or_else(|| panic!("no {group} {name} in snmp"))
}

/// A counter of the calling thread's namespace's `/proc/thread-self/net/netstat`, e.g.
/// `("TcpExt", "ListenOverflows")`.
pub fn netstat(group: &str, name: &str) -> u64 {
    paired_counter("netstat", group, name).unwrap_or_else(|| panic!("no {group} {name} in netstat"))
}

/// `name` of `group` in `/proc/thread-self/net/FILE`, whose groups are two lines each: the
/// names (`Udp: InDatagrams ...`), then the values (`Udp: 12 ...`).
fn paired_counter(file: &str, group: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).ok()?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The UDP checksum of `payload` from `src` to `dst` (IPv4 pseudo-header), as a sender
/// computing it in software would.
pub fn udp4_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src);
    add(&dst);
    add(&[0, 17]);
    add(&(udp.len() as u16).to_be_bytes());
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// A UDP datagram with a checksum computed here, sent from `from` to `to` through a raw socket
/// (the kernel adds the IP header, and leaves the UDP checksum as given).
pub fn inject_udp4(from: SocketAddr, to: SocketAddr, payload: &[u8], break_checksum: bool) {
    let (SocketAddr::V4(f), SocketAddr::V4(t)) = (from, to) else { panic!("IPv4 only") };
    let mut udp = Vec::new();
    udp.extend_from_slice(&f.port().to_be_bytes());
    udp.extend_from_slice(&t.port().to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut sum = udp4_checksum(f.ip().octets(), t.ip().octets(), &udp);
    if break_checksum {
        sum ^= 0x0101;
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )
    .expect("a raw socket (root)");
    raw.bind(&from.into()).unwrap();
    raw.send_to(&udp, &to.into()).expect("send through the raw socket");
}
