//! Scenarios 6 and 7: a connection burst past `--max-conns`, and slow clients with idle ones.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::{http, Tether};

use crate::client::{self, Control, End, Load, Mode, Spec};
use crate::procs::{self, ChaosBackend, Verdicts};
use crate::report::Checks;
use crate::rng::Rng;
use crate::soak::metric;

const BURST_LISTEN: &str = "127.0.0.30:5030";
const BURST_ADMIN: &str = "127.0.0.30:9100";
const SLOW_LISTEN: &str = "127.0.0.31:5031";
const SLOW_ADMIN: &str = "127.0.0.31:9100";
/// The idle clients' tether: its own, since a slow reader's window may stay shut longer than
/// the short idle timeout measured here (loopback's 64 KiB segments: the client reopens it
/// only after reading tens of KiB), and tether then rightly closes it as idle.
const IDLE_LISTEN: &str = "127.0.0.32:5032";
const BACKEND_PORT: u16 = 7030;
pub const MAX_CONNS: usize = 5000;
/// Connections a burst child opens (two children: the suite's fd limit may be 20,000).
const PER_CHILD: usize = 10_000;

fn backends(verdicts: &Verdicts) -> std::io::Result<Vec<ChaosBackend>> {
    (1..=2u8)
        .map(|i| {
            ChaosBackend::start(
                &format!("h{i}"),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, i)), BACKEND_PORT),
                None,
                verdicts,
            )
        })
        .collect()
}

fn backend_args() -> Vec<String> {
    (1..=2u8)
        .flat_map(|i| ["--backend".to_string(), format!("127.0.3.{i}:{BACKEND_PORT},name=h{i}")])
        .collect()
}

/// `tether-chaos burst`: open `count` held connections from `sources` at once, wait until each
/// is served or refused, hold them `hold`, release them, and print the counts as JSON.
pub fn burst(
    to: SocketAddr,
    first_source: u8,
    count: usize,
    hold: Duration,
) -> std::io::Result<()> {
    let sources: Vec<IpAddr> =
        (1..=50).map(|i| IpAddr::V4(Ipv4Addr::new(127, 4, first_source, i))).collect();
    let load = Load {
        targets: vec![],
        max_size: 0,
        stall: Duration::from_secs(60),
        slow: 0,
        drain: Duration::from_secs(30),
        first_id: 0,
        max_open: usize::MAX,
        diagnose: None,
    };
    let control = Control::default();
    let specs = (0..count)
        .map(|i| Spec {
            id: i as u64 + 1,
            source: sources[i % sources.len()],
            to,
            up: 0,
            down: 0,
            mode: Mode::Hold,
            tag: 6,
            short: false,
        })
        .collect();
    control.push(specs);
    let epoch = Instant::now();
    let outcomes = std::thread::scope(|s| {
        let engine = s.spawn(|| client::run(&load, Rng::new(1), &control, epoch));
        std::thread::sleep(hold); // the scenario's hold time
        control.release.store(true, Relaxed);
        control.stop.store(true, Relaxed);
        engine.join().expect("engine")
    })?;
    let count_of = |e: End| outcomes.iter().filter(|o| o.end == e).count();
    let held = outcomes.iter().filter(|o| o.backend.is_some()).count();
    let v = json!({
        "opened": outcomes.len(),
        "served": held,
        "done": count_of(End::Done),
        "refused": count_of(End::NoHello),
        "connect_failed": count_of(End::ConnectFailed),
        "closed_by_peer": count_of(End::Closed),
        "broken": count_of(End::Broken),
        "cut": count_of(End::Cut),
    });
    println!("{v}");
    Ok(())
}

/// Scenario 6.
pub fn overload(tether: &Path, hold: Duration, checks: &mut Checks) -> std::io::Result<Value> {
    let verdicts = Verdicts::default();
    let _backends = backends(&verdicts)?;
    let mut args = vec![
        "--listen".to_string(),
        BURST_LISTEN.into(),
        "--admin".into(),
        BURST_ADMIN.into(),
        "--max-conns".into(),
        MAX_CONNS.to_string(),
    ];
    args.extend(backend_args());
    let t = Tether::start(tether, &args)?;
    let admin: SocketAddr = BURST_ADMIN.parse().expect("address");
    let pid = t.pid();
    // The baseline once the health checker's probes have come and gone.
    let mut baseline = 0;
    testkit::wait_until(Duration::from_secs(10), || {
        let now = procs::fd_count(pid).unwrap_or(0);
        let same = now == baseline;
        baseline = now;
        same
    });
    let stop = AtomicBool::new(false);
    let (children, probes) = std::thread::scope(|s| {
        let probes = s.spawn(|| {
            // The admin API and /metrics during the burst.
            let (mut ok, mut failed, mut worst) = (0u64, 0u64, 0f64);
            while !stop.load(Relaxed) {
                for path in ["/metrics", "/api/status"] {
                    let t0 = Instant::now();
                    match http(admin, "GET", path, "") {
                        Ok(r) if r.status == 200 => ok += 1,
                        _ => failed += 1,
                    }
                    worst = worst.max(t0.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(100)); // the probing clock
            }
            (ok, failed, worst)
        });
        let exe = std::env::current_exe()?;
        let spawned: Vec<_> = (0..2u8)
            .map(|i| {
                Command::new(&exe)
                    .args([
                        "burst",
                        "--to",
                        BURST_LISTEN,
                        "--first-source",
                        &i.to_string(),
                        "--count",
                        &PER_CHILD.to_string(),
                        "--hold-ms",
                        &hold.as_millis().to_string(),
                    ])
                    .stdout(Stdio::piped())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        // While the burst is held: tether's live sessions at its limit.
        let mut peak_sessions = 0.0f64;
        let held_until = Instant::now() + hold;
        while Instant::now() < held_until {
            peak_sessions = peak_sessions.max(metric(admin, "tether_sessions_active"));
            std::thread::sleep(Duration::from_millis(200)); // sampling
        }
        let outputs: Vec<Value> = spawned
            .into_iter()
            .map(|c| {
                c.wait_with_output()
                    .map(|o| serde_json::from_slice(&o.stdout).unwrap_or(Value::Null))
            })
            .collect::<Result<_, _>>()?;
        stop.store(true, Relaxed);
        let probes = probes.join().expect("probes");
        Ok::<_, std::io::Error>(((outputs, peak_sessions), probes))
    })?;
    let ((outputs, peak_sessions), (probes_ok, probes_failed, worst)) = (children, probes);
    let sum = |k: &str| outputs.iter().map(|o| o[k].as_u64().unwrap_or(0)).sum::<u64>();
    // Recovery: live sessions back to 0 and descriptors back to the baseline.
    let t0 = Instant::now();
    let drained = testkit::wait_until(Duration::from_secs(30), || {
        metric(admin, "tether_sessions_active") == 0.0
    });
    let mut fds_after = 0;
    let fds_back = testkit::wait_until(Duration::from_secs(30), || {
        fds_after = procs::fd_count(pid).unwrap_or(u64::MAX);
        fds_after <= baseline
    });
    let recovery = t0.elapsed().as_secs_f64();
    let served_after = testkit::ask_name(
        IpAddr::V4(Ipv4Addr::new(127, 4, 9, 1)),
        BURST_LISTEN.parse().expect("address"),
    )
    .is_ok();
    let refused_total = metric(admin, "tether_sessions_refused_max_conns_total");
    let sc = "overload";
    let opened = sum("opened");
    checks.add(
        sc,
        "connections opened in the burst",
        opened as f64,
        &format!(">= {}", 2 * PER_CHILD),
        opened as usize >= 2 * PER_CHILD,
    );
    checks.add(
        sc,
        "admin and /metrics requests failed during the burst",
        probes_failed as f64,
        "0",
        probes_failed == 0 && probes_ok > 0,
    );
    checks.add(
        sc,
        "sessions served at once, most",
        sum("served") as f64,
        &format!("<= {MAX_CONNS} (--max-conns)"),
        sum("served") as usize <= MAX_CONNS,
    );
    checks.add(
        sc,
        "live sessions after the burst",
        metric(admin, "tether_sessions_active"),
        "0",
        drained,
    );
    checks.add(
        sc,
        "fds after the burst over the baseline",
        fds_after as f64 - baseline as f64,
        "<= 0",
        fds_back,
    );
    checks.add(
        sc,
        "a new client served after the burst",
        f64::from(u8::from(served_after)),
        "1",
        served_after,
    );
    Ok(json!({
        "max_conns": MAX_CONNS,
        "burst": outputs,
        "sessions_active_peak": peak_sessions,
        "refused_max_conns_total": refused_total,
        "admin_requests_ok": probes_ok,
        "admin_requests_failed": probes_failed,
        "admin_slowest_s": worst,
        "fd_baseline": baseline,
        "fd_after": fds_after,
        "recovery_s": recovery,
    }))
}

/// Scenario 7: `slow` clients reading 1 KiB/s from fast backends, and `idle` clients doing
/// nothing, for `length`; tether with userspace buffers (`--splice off`) so its RSS shows them.
pub fn slow_clients(
    tether: &Path,
    length: Duration,
    idle_timeout: Duration,
    slow: usize,
    idle: usize,
    epoch: Instant,
    checks: &mut Checks,
) -> std::io::Result<Value> {
    let verdicts = Verdicts::default();
    let backends = backends(&verdicts)?;
    let mut args = vec![
        "--listen".to_string(),
        SLOW_LISTEN.into(),
        "--admin".into(),
        SLOW_ADMIN.into(),
        "--splice".into(),
        "off".into(),
        "--idle-timeout".into(),
        format!("{}ms", idle_timeout.as_millis()),
    ];
    args.extend(backend_args());
    let t = Tether::start(tether, &args)?;
    let mut idle_args = vec![
        "--listen".to_string(),
        IDLE_LISTEN.into(),
        "--idle-timeout".into(),
        format!("{}ms", idle_timeout.as_millis()),
    ];
    idle_args.extend(backend_args());
    let idle_tether = Tether::start(tether, &idle_args)?;
    let pid = t.pid();
    let rss_before = procs::rss_kib(pid).unwrap_or(0);
    let to: SocketAddr = SLOW_LISTEN.parse().expect("address");
    let idle_to: SocketAddr = IDLE_LISTEN.parse().expect("address");
    let sources: Vec<IpAddr> = (1..=100).map(|i| IpAddr::V4(Ipv4Addr::new(127, 5, 0, i))).collect();
    let mut specs: Vec<Spec> = (0..slow)
        .map(|i| Spec {
            id: i as u64 + 1,
            source: sources[i % 100],
            to,
            up: 0,
            down: 1 << 30,
            mode: Mode::SlowReader,
            tag: 7,
            short: false,
        })
        .collect();
    specs.extend((0..idle).map(|i| Spec {
        id: (slow + i) as u64 + 1,
        source: sources[i % 100],
        to: idle_to,
        up: 0,
        down: 0,
        mode: Mode::Hold,
        tag: 7,
        short: false,
    }));
    let load = Load {
        targets: vec![],
        max_size: 0,
        stall: Duration::from_secs(60),
        slow: 1024,
        drain: Duration::ZERO,
        first_id: 0,
        max_open: usize::MAX,
        diagnose: None,
    };
    let control = Control::default();
    control.push(specs);
    let mut rss_max = rss_before;
    let outcomes = std::thread::scope(|s| {
        let engine = s.spawn(|| client::run(&load, Rng::new(7), &control, epoch));
        let until = Instant::now() + length;
        while Instant::now() < until {
            rss_max = rss_max.max(procs::rss_kib(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(250)); // sampling
        }
        control.stop.store(true, Relaxed);
        engine.join().expect("engine")
    })?;
    let idle_out: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.spec.mode == Mode::Hold)
        .map(|o| if o.end == End::Closed { o.ended - o.last_rx } else { f64::NAN })
        .collect();
    let timeout = idle_timeout.as_secs_f64();
    let within = idle_out.iter().filter(|d| (**d - timeout).abs() <= timeout * 0.1).count();
    let slow_alive = outcomes
        .iter()
        .filter(|o| o.spec.mode == Mode::SlowReader && o.end == End::Cut && o.down_got > 0)
        .count();
    let mut slow_ends: std::collections::BTreeMap<String, usize> =
        std::collections::BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.spec.mode == Mode::SlowReader) {
        // The end, and for an early one what went wrong (a cut one's note is its state).
        let error = if o.end == End::Cut { "" } else { o.error.as_deref().unwrap_or("") };
        let key = format!("{:?} {error}", o.end).trim().to_string();
        *slow_ends.entry(key).or_insert(0) += 1;
    }
    let slow_bytes: u64 =
        outcomes.iter().filter(|o| o.spec.mode == Mode::SlowReader).map(|o| o.down_got).sum();
    let slow_wrong: u64 = outcomes.iter().map(|o| o.down_wrong).sum();
    // Every socket of this scenario closes: none left half-closed on either side.
    let ports = [to.port(), idle_to.port(), BACKEND_PORT];
    let mut lingering = 0;
    let clean = testkit::wait_until(Duration::from_secs(20), || {
        let states = procs::tcp_states(&ports);
        lingering = states.get("CLOSE_WAIT").copied().unwrap_or(0)
            + states.get("FIN_WAIT2").copied().unwrap_or(0);
        lingering == 0
    });
    drop(t);
    drop(idle_tether);
    drop(backends);
    // Each slow session holds at most one 64 KiB buffer a direction in tether.
    let bound = rss_before + slow as u64 * 128;
    let sc = "slow_clients";
    checks.add(
        sc,
        "slow clients still reading at the end",
        slow_alive as f64,
        &format!("{slow}"),
        slow_alive == slow,
    );
    checks.add(
        sc,
        "tether RSS, most, KiB",
        rss_max as f64,
        &format!("<= {bound} (start + 128 KiB a session)"),
        rss_max <= bound,
    );
    checks.add(
        sc,
        "idle sessions closed within 10% after the idle timeout",
        within as f64,
        &format!("{idle}"),
        within == idle,
    );
    checks.add(sc, "bytes corrupted", slow_wrong as f64, "0", slow_wrong == 0);
    checks.add(sc, "sockets left in CLOSE_WAIT or FIN_WAIT2", lingering as f64, "0", clean);
    let mut sorted: Vec<f64> = idle_out.iter().copied().filter(|d| d.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "slow_clients": slow,
        "slow_read_bytes_per_second": 1024,
        "idle_clients": idle,
        "idle_timeout_s": timeout,
        "idle_closed_after_s_min": sorted.first(),
        "idle_closed_after_s_max": sorted.last(),
        "idle_within_10_percent": within,
        "slow_bytes_read": slow_bytes,
        "slow_ends": slow_ends,
        "rss_kib_start": rss_before,
        "rss_kib_max": rss_max,
        "rss_bound_kib": bound,
        "lingering_sockets": lingering,
    }))
}
