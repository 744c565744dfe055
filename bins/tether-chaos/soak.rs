//! Scenario 4, the UDP churn soak: one tether serving a UDP service for the whole run, a churn
//! of new flows, long-lived flows with sequence numbers, ten SIGHUP reloads with changed files,
//! and RSS and fd counts sampled every second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{http, Signal, Tether};

use crate::procs::{self, ChaosBackend, Verdicts};
use crate::report::{slope, Checks};
use crate::udp;

const LISTEN: &str = "127.0.0.20:6000";
const ADMIN: &str = "127.0.0.20:9100";
const RELOADS: usize = 10;

/// `[seconds, value]` samples.
pub type Samples = Vec<(f64, f64)>;

pub struct Params {
    pub duration: Duration,
    pub churn_rate: u64,
    pub long_flows: usize,
    pub idle_timeout_ms: u64,
}

fn backend_addr(i: u8) -> (SocketAddr, SocketAddr) {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 2, i));
    (SocketAddr::new(ip, 7000), SocketAddr::new(ip, 7001))
}

/// The soak's config file, variant `k`: weights and one backend change from one to the next.
fn config(k: usize, idle: u64) -> String {
    let mut s = format!(
        "admin = \"{ADMIN}\"\nmax-flows = 9000\n\n[[service]]\nname = \"game\"\nlisten = [\"{LISTEN}\"]\nprotocol = \"udp\"\nudp-idle-timeout = \"{idle}ms\"\n"
    );
    for i in 1..=5u8 {
        if i == 5 && k % 3 != 1 {
            continue;
        }
        let weight = if i == 1 { 1 + k % 2 } else { 1 };
        s += &format!(
            "[[service.backend]]\nname = \"u{i}\"\naddress = \"{}\"\nweight = {weight}\n",
            backend_addr(i).1
        );
    }
    s
}

/// Runs the soak; returns its scenario object and adds its checks. `samples` gets the
/// `[seconds, value]` RSS (KiB) and fd samples of the soak's tether.
pub fn run(
    tether: &Path,
    out: &Path,
    p: &Params,
    stop_all: &AtomicBool,
    checks: &mut Checks,
) -> std::io::Result<(Value, Samples, Samples)> {
    let verdicts = Verdicts::default();
    let backends: Vec<ChaosBackend> = (1..=5u8)
        .map(|i| {
            let (tcp, udp) = backend_addr(i);
            ChaosBackend::start(&format!("u{i}"), tcp, Some(udp), &verdicts)
        })
        .collect::<Result<_, _>>()?;
    let file = out.join("soak.toml");
    std::fs::write(&file, config(0, p.idle_timeout_ms))?;
    let mut t2 = Tether::start(tether, ["--config".as_ref(), file.as_os_str()])?;
    let admin: SocketAddr = ADMIN.parse().expect("address");
    let listen: SocketAddr = LISTEN.parse().expect("address");
    let pid = t2.pid();
    let churn_sources: Vec<IpAddr> =
        (1..=64).map(|i| IpAddr::V4(Ipv4Addr::new(127, 2, 0, i))).collect();
    let long_sources: Vec<IpAddr> = (0..250u32)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 3, (i / 200) as u8, (i % 200 + 1) as u8)))
        .collect();
    let drops_before = udp::kernel_drops();
    let created_before = metric(admin, "tether_worker_flows_created_total");
    let cpu_before = procs::cpu_seconds(pid).unwrap_or(0.0);
    let stop = AtomicBool::new(false);
    let churn_sent = AtomicU64::new(0);
    let start = Instant::now();
    let (mut rss, mut fds, mut flows_max) = (Vec::new(), Vec::new(), 0u64);
    let mut reloads_ok = 0usize;
    let mut reload_errors = Vec::new();
    let long = std::thread::scope(|s| {
        s.spawn(|| udp::churn(listen, &churn_sources, p.churn_rate, &stop, &churn_sent));
        let long = s.spawn(|| {
            udp::long_lived(
                listen,
                &long_sources,
                p.long_flows,
                Duration::from_millis(100),
                &stop,
                Duration::from_secs(2),
            )
        });
        let mut next_sample = 0u64;
        let mut reloads = 0usize;
        while start.elapsed() < p.duration && !stop_all.load(Relaxed) {
            let t = start.elapsed().as_secs_f64();
            if t >= next_sample as f64 {
                next_sample += 1;
                if let (Some(r), Some(f)) = (procs::rss_kib(pid), procs::fd_count(pid)) {
                    rss.push((t, r as f64));
                    fds.push((t, f as f64));
                }
                flows_max = flows_max.max(metric(admin, "tether_flows_active") as u64);
            }
            // Reload k at (k + 0.5) tenths of the run.
            if reloads < RELOADS
                && t >= (reloads as f64 + 0.5) * p.duration.as_secs_f64() / RELOADS as f64
            {
                reloads += 1;
                match reload(&mut t2, &file, reloads, p.idle_timeout_ms, admin) {
                    Ok(()) => reloads_ok += 1,
                    Err(e) => reload_errors.push(format!("reload {reloads}: {e}")),
                }
            }
            std::thread::sleep(Duration::from_millis(50)); // the sampling clock
        }
        stop.store(true, Relaxed);
        long.join().expect("long-lived flows thread")
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let drops = udp::kernel_drops() - drops_before;
    let created = metric(admin, "tether_worker_flows_created_total") - created_before;
    let cpu = procs::cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let lost = long.sent.saturating_sub(long.received);
    let half = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
        v.iter().copied().filter(|(t, _)| *t >= seconds / 2.0).collect()
    };
    let (rss_half, fd_half) = (half(&rss), half(&fds));
    let mean = |v: &[(f64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len().max(1) as f64;
    let rss_growth = slope(&rss_half) * seconds / 2.0;
    let fd_growth = slope(&fd_half) * seconds / 2.0;
    let sc = "udp_soak";
    checks.add(
        sc,
        "long-lived datagrams lost beyond the kernel's UDP drops",
        lost.saturating_sub(drops) as f64,
        "0",
        lost <= drops,
    );
    checks.add(
        sc,
        "long-lived flows that changed backend",
        long.changed_backend as f64,
        "0",
        long.changed_backend == 0,
    );
    checks.add(sc, "long-lived flows never answered", long.silent as f64, "0", long.silent == 0);
    checks.add(
        sc,
        "reloads applied",
        reloads_ok as f64,
        &format!("{RELOADS}"),
        reloads_ok == RELOADS,
    );
    let rss_bound = (mean(&rss_half) * 0.05).max(4096.0);
    checks.add(
        sc,
        "RSS growth over the second half, KiB (regression)",
        rss_growth,
        &format!("<= {rss_bound:.0} (5% of mean, at least 4 MiB)"),
        rss_growth <= rss_bound,
    );
    let fd_bound = mean(&fd_half) * 0.10 + 100.0;
    checks.add(
        sc,
        "fd growth over the second half (regression)",
        fd_growth,
        &format!("<= {fd_bound:.0} (10% of mean + 100)"),
        fd_growth <= fd_bound,
    );
    let churn = churn_sent.load(Relaxed);
    let rate_ok = churn as f64 / seconds >= p.churn_rate as f64 * 0.9;
    checks.add(
        sc,
        "new flows sent per second",
        churn as f64 / seconds,
        &format!(">= {}", p.churn_rate * 9 / 10),
        rate_ok,
    );
    drop(t2);
    drop(backends);
    let value = json!({
        "seconds": seconds,
        "churn_rate_goal": p.churn_rate,
        "churn_datagrams_sent": churn,
        "churn_per_second": churn as f64 / seconds,
        "flows_created_by_tether": created,
        "flows_active_max": flows_max,
        "udp_idle_timeout_ms": p.idle_timeout_ms,
        "long_lived_flows": long.flows,
        "long_lived_sent": long.sent,
        "long_lived_received": long.received,
        "long_lived_lost": lost,
        "kernel_udp_drops": drops,
        "flows_changed_backend": long.changed_backend,
        "reloads": reloads_ok,
        "reload_errors": reload_errors,
        "rss_kib_first": rss.first().map(|x| x.1),
        "rss_kib_last": rss.last().map(|x| x.1),
        "rss_kib_max": rss.iter().map(|x| x.1).fold(0.0, f64::max),
        "rss_growth_second_half_kib": rss_growth,
        "fd_growth_second_half": fd_growth,
        "tether_cpu_seconds": cpu,
    });
    Ok((value, rss, fds))
}

/// Writes variant `k` and sends SIGHUP; done when `/api/backends` shows the new weight of u1.
fn reload(
    t2: &mut Tether,
    file: &Path,
    k: usize,
    idle: u64,
    admin: SocketAddr,
) -> std::io::Result<()> {
    std::fs::write(file, config(k, idle))?;
    t2.signal(Signal::SIGHUP)?;
    let want = format!("\"weight\":{}", 1 + k % 2);
    let has_u5 = k % 3 == 1;
    let applied = testkit::wait_until(Duration::from_secs(10), || {
        http(admin, "GET", "/api/backends", "").is_ok_and(|r| {
            let list: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            let items = list.as_array().cloned().unwrap_or_default();
            let u1 = items.iter().find(|b| b["name"] == "u1");
            let u5 = items.iter().any(|b| b["name"] == "u5");
            u1.is_some_and(|b| b.to_string().contains(&want)) && u5 == has_u5
        })
    });
    if applied {
        Ok(())
    } else {
        Err(std::io::Error::other("not applied within 10 s"))
    }
}

/// The sum of a metric's samples in `/metrics` (0 when unreachable).
pub fn metric(admin: SocketAddr, name: &str) -> f64 {
    let Ok(reply) = http(admin, "GET", "/metrics", "") else { return 0.0 };
    reply
        .body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
