//! The run's own network namespace and limits: every address it uses is its own, the kernel's
//! counters count only its traffic, and its sysctls change nothing outside.

use std::io;
use std::process::Command;

use serde_json::{json, Value};

/// Moves this process into a new network namespace with `lo` up and sysctls sized for tens of
/// thousands of connections. Call before any thread starts: threads and children inherit it.
pub fn enter_private_network(congestion_control: &str) -> io::Result<String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        io::Error::other(format!("a network namespace of its own (needs root): {e}"))
    })?;
    let status = Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
    if !status.success() {
        return Err(io::Error::other("ip link set lo up failed"));
    }
    for (key, value) in [
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/core/somaxconn", "65535"),
        ("net/ipv4/tcp_max_syn_backlog", "65535"),
        // Per-socket buffer ceilings, so that the fleet's ~40,000 sockets stay under the
        // kernel's TCP memory pressure threshold (`tcp_mem`, host-wide, about 1.5 GiB here).
        // With the namespace defaults (6 MiB receive, 4 MiB send) they reached 2.3 GiB, past
        // even the hard limit: the kernel then dropped segments on every socket, retransmission
        // back-off grew to 28 s, and a few sessions stalled for 20 s. At 1 MiB the peak was 93%
        // of the threshold; at 512 KiB 86% in one run and 99.7% (one pressure episode) in the
        // next. 256 KiB is still more than a loopback path needs for full speed.
        ("net/ipv4/tcp_rmem", "4096 131072 262144"),
        ("net/ipv4/tcp_wmem", "4096 16384 262144"),
    ] {
        std::fs::write(format!("/proc/sys/{key}"), value)
            .map_err(|e| io::Error::other(format!("sysctl {key}: {e}")))?;
    }
    // The host's default may be BBR (this one's is). Over loopback, once a slow reader's
    // receive queue dropped segments, BBR's pacing rate fell to ~150 kbit/s and stayed there
    // for minutes (ss: 40% of the bytes retransmitted): sessions crawled until the drain cut
    // them. Linux's default, cubic, unless asked otherwise; where a namespace may not choose
    // it (not in the host's tcp_allowed_congestion_control), reno.
    let key = "/proc/sys/net/ipv4/tcp_congestion_control";
    for cc in [congestion_control, "reno"] {
        if std::fs::write(key, cc).is_ok() {
            return Ok(cc.to_string());
        }
    }
    Err(io::Error::other(format!("{key}: neither {congestion_control} nor reno may be set")))
}

/// The host's `tcp_mem` (pages: below it no pressure, pressure from the second value, hard
/// limit at the third). Shared by every namespace, and readable only outside them: call before
/// [`enter_private_network`].
pub fn host_tcp_mem() -> Option<[u64; 3]> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    let v: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    Some([*v.first()?, *v.get(1)?, *v.get(2)?])
}

/// Pages all TCP sockets of the host hold now (`/proc/net/sockstat`, `TCP: ... mem N`).
pub fn tcp_mem_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("TCP:"))?;
            let mut words = line.split_whitespace();
            words.find(|w| *w == "mem")?;
            words.next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Raises the soft fd limit to the hard one (children inherit it), and returns it. Raising the
/// hard limit needs CAP_SYS_RESOURCE, which some containers withhold: the run sizes itself
/// from what it gets.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::other)?;
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return Ok(nr_open);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| io::Error::other(format!("raise RLIMIT_NOFILE to {hard}: {e}")))?;
    Ok(hard)
}

/// CPUs, memory and kernel of this machine, for the figures' context.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok()
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let (_, fds) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((0, 0));
    json!({"cpus": cpus, "memory_gib": mem_kib / (1 << 20), "kernel": kernel.trim(), "fd_limit": fds})
}
