//! Running one test in a network namespace of its own (`unshare -rn`): a private loopback
//! whose sysctls, such as `net.ipv4.ip_local_port_range`, a test may change without touching
//! the host or the tests running beside it.

use std::io;
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
