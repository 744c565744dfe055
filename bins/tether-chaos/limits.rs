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
