//! Scenario 5: a flood from a million spoofed source addresses at a UDP listener, inside a
//! network namespace of its own (raw sockets, its own routes and counters), while real
//! clients' long-lived flows go on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{Namespace, Tether};

use crate::procs::{self, ChaosBackend, Verdicts};
use crate::report::Checks;
use crate::soak::metric;
use crate::udp;

pub const MAX_FLOWS: u64 = 5000;
const LISTEN: &str = "127.0.0.1:6000";
const ADMIN: &str = "127.0.0.1:9100";
/// RSS tether may reach under the flood: its RSS before plus this much per flow slot.
pub const RSS_PER_FLOW_KIB: u64 = 8;
pub const RSS_BASE_KIB: u64 = 16 * 1024;

/// Packets out of `dev` in this thread's namespace (`/proc/thread-self/net/dev`).
fn tx_packets(dev: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == dev).then(|| rest.split_whitespace().nth(9)?.parse().ok())?
        })
        .unwrap_or(0)
}

/// Sends up to `count` UDP datagrams to `to`, each from the next of `count` addresses of
/// 10.0.0.0/8 (port 40000), through a raw socket that writes the IP header itself; stops
/// at `until`. Returns how many went out.
fn spoof(to: SocketAddrV4Like, count: u64, until: Instant) -> std::io::Result<u64> {
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::UDP),
    )?;
    raw.set_header_included_v4(true)?;
    let payload = b"flood";
    let mut packet = vec![0u8; 20 + 8 + payload.len()];
    let total = packet.len() as u16;
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[16..20].copy_from_slice(&to.0.octets());
    packet[20..22].copy_from_slice(&40000u16.to_be_bytes());
    packet[22..24].copy_from_slice(&to.1.to_be_bytes());
    packet[24..26].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    packet[28..].copy_from_slice(payload);
    let dest: SocketAddr = SocketAddr::new(IpAddr::V4(to.0), to.1);
    let mut sent = 0;
    for i in 0..count {
        if i % 1024 == 0 && Instant::now() >= until {
            break;
        }
        let n = (i + 1) as u32; // 10.0.0.1 onwards: a million addresses fit in 10.0.0.0/12
        let src = Ipv4Addr::from(0x0a00_0000 | n);
        packet[12..16].copy_from_slice(&src.octets());
        // The kernel fills in the IP checksum; a zero UDP checksum means none (IPv4).
        if raw.send_to(&packet, &dest.into()).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// An IPv4 address and port.
#[derive(Clone, Copy)]
struct SocketAddrV4Like(Ipv4Addr, u16);

pub fn run(
    tether: &Path,
    window: Duration,
    count: u64,
    checks: &mut Checks,
) -> std::io::Result<Value> {
    let ns = Namespace::new()?;
    // Replies to the spoofed sources would leave through fl0 (a veth: no dummy module here),
    // toward a gateway with a fixed neighbour entry, so its packet count is the amplification:
    // no ARP, no IPv6 chatter on it.
    ns.sh(
        "ip link add fl0 type veth peer name fl1 && echo 1 > /proc/sys/net/ipv6/conf/fl0/disable_ipv6 \
         && echo 1 > /proc/sys/net/ipv6/conf/fl1/disable_ipv6 && ip link set fl0 up && ip link set fl1 up \
         && ip addr add 192.168.77.1/24 dev fl0 \
         && ip neigh add 192.168.77.2 lladdr 02:00:00:00:00:02 dev fl0 nud permanent \
         && ip route add 10.0.0.0/8 via 192.168.77.2 \
         && echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && echo 0 > /proc/sys/net/ipv4/conf/lo/rp_filter",
    );
    let verdicts = Verdicts::default();
    let backends: Vec<ChaosBackend> = ns.run(|| {
        (2..=3u8)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
                ChaosBackend::start(
                    &format!("f{i}"),
                    SocketAddr::new(ip, 7000),
                    Some(SocketAddr::new(ip, 7001)),
                    &verdicts,
                )
            })
            .collect::<Result<_, _>>()
    })?;
    let args: Vec<String> = [
        "--listen",
        LISTEN,
        "--protocol",
        "udp",
        "--admin",
        ADMIN,
        "--max-flows",
        &MAX_FLOWS.to_string(),
        "--udp-idle-timeout",
        "2s",
        "--backend",
        "127.0.0.2:7001,name=f2",
        "--backend",
        "127.0.0.3:7001,name=f3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = ns.run(|| Tether::start(tether, &args))?;
    let pid = t.pid();
    let admin: SocketAddr = ADMIN.parse().expect("address");
    let listen: SocketAddr = LISTEN.parse().expect("address");
    let clients: Vec<IpAddr> = (50..=99).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let rss_before = procs::rss_kib(pid).unwrap_or(0);
    let cpu_before = procs::cpu_seconds(pid).unwrap_or(0.0);
    let tx_before = ns.run(|| tx_packets("fl0"));
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut flows_max = 0.0f64;
    let mut rss_max = rss_before;
    let nsr = &ns;
    let (long, sent, flood_seconds) = std::thread::scope(|s| {
        let long = s.spawn(|| {
            nsr.run(|| {
                udp::long_lived(
                    listen,
                    &clients,
                    100,
                    Duration::from_millis(50),
                    &stop,
                    Duration::from_secs(1),
                )
            })
        });
        // The real clients' flows first, then the flood.
        std::thread::sleep(Duration::from_millis(500)); // let the real flows be made
                                                        // Every spoofed address is sent, within a minute at most; the scenario lasts at least
                                                        // `window`.
        let cap = Instant::now() + Duration::from_secs(60);
        let flood = s.spawn(move || {
            let t0 = Instant::now();
            let n = ns_run_spoof(nsr, SocketAddrV4Like(Ipv4Addr::LOCALHOST, 6000), count, cap);
            (n, t0.elapsed().as_secs_f64())
        });
        while Instant::now() < started + window || !flood.is_finished() {
            flows_max = flows_max.max(nsr.run(|| metric(admin, "tether_flows_active")));
            rss_max = rss_max.max(procs::rss_kib(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(200)); // sampling
        }
        let (sent, secs) = flood.join().expect("flood thread");
        stop.store(true, Relaxed);
        (long.join().expect("long-lived thread"), sent, secs)
    });
    let long = long?;
    let sent = sent?;
    let cpu = procs::cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let amplified = ns.run(|| tx_packets("fl0")) - tx_before;
    let dropped_full = ns.run(|| metric(admin, "tether_datagrams_dropped_total"));
    let loss = long.sent.saturating_sub(long.received) as f64 / long.sent.max(1) as f64;
    drop(t);
    drop(backends);
    let bound = rss_before + RSS_BASE_KIB + MAX_FLOWS * RSS_PER_FLOW_KIB;
    let sc = "spoofed_flood";
    checks.add(sc, "spoofed datagrams sent", sent as f64, &format!("{count}"), sent == count);
    checks.add(
        sc,
        "flow table, most",
        flows_max,
        &format!("<= {MAX_FLOWS} (--max-flows)"),
        flows_max <= MAX_FLOWS as f64 && flows_max > 0.0,
    );
    checks.add(
        sc,
        "tether RSS, most, KiB",
        rss_max as f64,
        &format!("<= {bound} (start + 16 MiB + 8 KiB a flow slot)"),
        rss_max <= bound,
    );
    checks.add(
        sc,
        "real clients' datagrams lost, %",
        loss * 100.0,
        "<= 0.1",
        loss <= 0.001 && long.sent > 0,
    );
    checks.add(
        sc,
        "datagrams sent toward the spoofed sources",
        amplified as f64,
        "0",
        amplified == 0,
    );
    Ok(json!({
        "spoofed_sources": count,
        "spoofed_sent": sent,
        "flood_seconds": flood_seconds,
        "flood_per_second": sent as f64 / flood_seconds.max(0.001),
        "max_flows": MAX_FLOWS,
        "flows_active_max": flows_max,
        "datagrams_dropped_total": dropped_full,
        "rss_kib_start": rss_before,
        "rss_kib_max": rss_max,
        "rss_bound_kib": bound,
        "real_flows": long.flows,
        "real_sent": long.sent,
        "real_received": long.received,
        "real_loss_percent": loss * 100.0,
        "sent_toward_spoofed_sources": amplified,
        "tether_cpu_seconds": cpu,
        "tether_cpu_share": cpu / started.elapsed().as_secs_f64(),
    }))
}

fn ns_run_spoof(
    ns: &Namespace,
    to: SocketAddrV4Like,
    count: u64,
    until: Instant,
) -> std::io::Result<u64> {
    ns.run(|| spoof(to, count, until))
}
