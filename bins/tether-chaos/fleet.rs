//! Scenarios 1, 2, 3 and 8 on one TCP fleet: two tethers in front of the same backends (one
//! moving bytes with splice, one with userspace copies), thousands of sessions checking every
//! byte, then backend kills and freezes, admin operations and reloads, a binary upgrade and a
//! restart with the state file, while 2,000 new connections a second arrive.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use testkit::{http, Tether};

use crate::client::{self, Control, Load, Outcome};
use crate::procs::{self, ChaosBackend, Verdicts};
use crate::rng::Rng;
use crate::soak::metric;

pub const T1: &str = "127.0.0.10:5000";
pub const T1_ADMIN: &str = "127.0.0.10:9100";
pub const T1C: &str = "127.0.0.11:5000";
pub const T1C_ADMIN: &str = "127.0.0.11:9100";
/// Backends b1..b6 serve from the start, b7 comes and goes by reload, b8 by the API.
pub const POOL: u8 = 6;
pub const HEALTH_INTERVAL_S: f64 = 1.0;
pub const HEALTH_FALL: u32 = 2;
pub const HEALTH_TIMEOUT_S: f64 = 0.5;

pub fn backend_addr(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)), 7000)
}

pub struct Params {
    pub scale: Duration,
    pub chaos: Duration,
    pub sessions: usize,
    pub rate: u64,
    pub max_size: u64,
    pub drain: Duration,
    /// Most sessions the client load keeps open (its fd budget).
    pub max_open: usize,
    /// The host's `tcp_mem`, read before the run entered its namespace.
    pub tcp_mem: Option<[u64; 3]>,
}

/// A time (seconds since the run's epoch) window in which a backend could not serve as before.
#[derive(Clone, Debug)]
pub struct Disruption {
    pub backend: String,
    pub kind: &'static str,
    pub from: f64,
    pub to: f64,
}

#[derive(Default, Debug)]
pub struct Timeline {
    pub disruptions: Vec<Disruption>,
    /// Restarts of the splice tether: SIGTERM, its exit, the new one's `ready`.
    pub restarts: Vec<(f64, f64, f64)>,
    pub upgrades: Vec<(f64, f64)>,
    pub reloads: Vec<f64>,
    /// (time, what, succeeded).
    pub ops: Vec<(f64, String, bool)>,
    pub health: Vec<(f64, String, String)>,
    pub chaos_start: f64,
    pub chaos_end: f64,
    pub errors: Vec<String>,
}

impl Timeline {
    /// Whether `backend` had a disruption of one of `kinds` overlapping `[from, to]`.
    pub fn hit(&self, backend: &str, kinds: &[&str], from: f64, to: f64) -> bool {
        self.disruptions.iter().any(|d| {
            d.backend == backend && kinds.contains(&d.kind) && d.from <= to && d.to >= from
        })
    }
}

/// What the fleet phase leaves for the analysis.
pub struct Results {
    pub outcomes: Vec<Outcome>,
    pub verdicts: HashMap<u64, procs::Verdict>,
    pub timeline: Timeline,
    pub open_peak: usize,
    pub scale_end: f64,
    pub deferred: u64,
    /// `tether_sessions_refused_total` of both tethers at the end (the splice one's last
    /// process only).
    pub refused: f64,
    /// Connections the kernel dropped at a full accept queue (any listener of the run's
    /// namespace) during the fleet.
    pub listen_overflows: u64,
    /// Times the kernel entered TCP memory pressure during the fleet (`TCPMemoryPressures`).
    pub memory_pressures: u64,
    /// The most pages all TCP sockets held at once, sampled every 100 ms.
    pub tcp_mem_peak: u64,
    pub tcp_mem: Option<[u64; 3]>,
}

fn config(k: usize, state: &Path) -> String {
    let mut s = format!(
        "admin = \"{T1_ADMIN}\"\ngrace = \"5s\"\nupgrade-grace = \"120s\"\nmax-conns = 9000\nstate-file = \"{}\"\nstate-interval = \"1s\"\n\n[[service]]\nname = \"db\"\nlisten = [\"{T1}\"]\nprotocol = \"tcp\"\nhealth-interval = \"{HEALTH_INTERVAL_S}s\"\nhealth-timeout = \"{}ms\"\nhealth-fall = {HEALTH_FALL}\nconnect-timeout = \"2s\"\n",
        state.display(),
        (HEALTH_TIMEOUT_S * 1000.0) as u64
    );
    for i in 1..=POOL + 1 {
        if i == POOL + 1 && k % 2 == 0 {
            continue;
        }
        let weight = if i == 3 { 1 + k % 2 } else { 1 };
        s += &format!(
            "[[service.backend]]\nname = \"b{i}\"\naddress = \"{}\"\nweight = {weight}\n",
            backend_addr(i)
        );
    }
    s
}

fn copy_args() -> Vec<String> {
    let mut a: Vec<String> =
        ["--listen", T1C, "--admin", T1C_ADMIN, "--splice", "off", "--max-conns", "9000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for i in 1..=POOL {
        a.push("--backend".into());
        a.push(format!("{},name=b{i}", backend_addr(i)));
    }
    for (k, v) in [
        ("--health-interval", "1s"),
        ("--health-timeout", "500ms"),
        ("--health-fall", "2"),
        ("--connect-timeout", "2s"),
    ] {
        a.push(k.into());
        a.push(v.into());
    }
    a
}

pub fn t1_sources() -> Vec<IpAddr> {
    (1..=125).map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, 0, i))).collect()
}

pub fn t1c_sources() -> Vec<IpAddr> {
    (1..=125).map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, 1, i))).collect()
}

/// The tether serving T1 now (after upgrades and restarts), and every one started.
struct Splice {
    bin: PathBuf,
    file: PathBuf,
    tethers: Vec<Tether>,
    pids: Vec<u32>,
    current: u32,
}

impl Splice {
    fn start(bin: &Path, file: &Path) -> std::io::Result<Splice> {
        let t = Tether::start(bin, ["--config".as_ref(), file.as_os_str()])?;
        let current = t.pid();
        Ok(Splice {
            bin: bin.into(),
            file: file.into(),
            pids: vec![current],
            tethers: vec![t],
            current,
        })
    }

    fn admin() -> SocketAddr {
        T1_ADMIN.parse().expect("address")
    }

    fn upgrade(&mut self) -> Result<(), String> {
        let old = self.current;
        let reply = http(Self::admin(), "POST", "/api/upgrade", "").map_err(|e| e.to_string())?;
        if reply.status != 200 {
            return Err(format!("upgrade: {} {}", reply.status, reply.body));
        }
        let mut new = None;
        testkit::wait_until(Duration::from_secs(30), || {
            new = http(Self::admin(), "GET", "/api/status", "")
                .ok()
                .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
                .and_then(|v| v["pid"].as_u64())
                .filter(|p| *p as u32 != old);
            new.is_some()
        });
        let pid = new.ok_or("no new pid within 30 s")? as u32;
        self.pids.push(pid);
        self.current = pid;
        Ok(())
    }

    /// SIGTERM, wait for the exit (grace), start again from the same file. Returns the exit
    /// and ready times.
    fn restart(&mut self, epoch: Instant) -> Result<(f64, f64), String> {
        let pid = self.current;
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
        if !testkit::wait_until(Duration::from_secs(30), || !procs::alive(pid)) {
            return Err(format!("pid {pid} still running 30 s after SIGTERM"));
        }
        let exited = epoch.elapsed().as_secs_f64();
        let t = Tether::start(&self.bin, ["--config".as_ref(), self.file.as_os_str()])
            .map_err(|e| e.to_string())?;
        self.current = t.pid();
        self.pids.push(t.pid());
        self.tethers.push(t);
        Ok((exited, epoch.elapsed().as_secs_f64()))
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        // Processes started through an upgrade are not our children: stop them by pid.
        for pid in &self.pids {
            if self.tethers.iter().all(|t| t.pid() != *pid) {
                procs::kill_pid(*pid);
            }
        }
    }
}

fn api(method: &str, path: &str, body: &str) -> bool {
    http(Splice::admin(), method, path, body).is_ok_and(|r| r.status / 100 == 2)
}

pub fn run(
    tether: &Path,
    out: &Path,
    p: &Params,
    rng: &Rng,
    epoch: Instant,
) -> std::io::Result<Results> {
    let now = || epoch.elapsed().as_secs_f64();
    let verdicts = Verdicts::default();
    let mut backends: Vec<ChaosBackend> = (1..=POOL + 2)
        .map(|i| ChaosBackend::start(&format!("b{i}"), backend_addr(i), None, &verdicts))
        .collect::<Result<_, _>>()?;
    let file = out.join("fleet.toml");
    let state = out.join("fleet.state");
    // A state file of an earlier run would pin clients before this one starts.
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(out.join("slow-sessions.txt"));
    std::fs::write(&file, config(0, &state))?;
    let overflows_before = testkit::netstat("TcpExt", "ListenOverflows");
    let pressures_before = testkit::netstat("TcpExt", "TCPMemoryPressures");
    let mut splice = Splice::start(tether, &file)?;
    let copy = Tether::start(tether, copy_args())?;
    let mut targets: Vec<(SocketAddr, IpAddr)> =
        t1_sources().into_iter().map(|s| (T1.parse().expect("addr"), s)).collect();
    targets.extend(t1c_sources().into_iter().map(|s| (T1C.parse().expect("addr"), s)));
    let load = Load {
        targets,
        max_size: p.max_size,
        stall: Duration::from_secs(20),
        slow: 256 * 1024,
        drain: p.drain,
        first_id: 0,
        max_open: p.max_open,
        diagnose: Some(out.join("slow-sessions.txt")),
    };
    let control = Control::default();
    control.tag.store(1, Relaxed);
    control.concurrent.store(p.sessions, Relaxed);
    let timeline = Mutex::new(Timeline::default());
    let chaos_on = AtomicBool::new(false);
    let chaos_done = AtomicBool::new(false);
    let mut open_peak = 0usize;
    let mut tcp_mem_peak = 0u64;
    let mut scale_end = 0.0;
    let outcomes = std::thread::scope(|s| -> std::io::Result<Vec<Outcome>> {
        let engine = s.spawn(|| client::run(&load, rng.fork(1), &control, epoch));
        let started = Instant::now();
        // Scenario 1: the pool alone.
        while started.elapsed() < p.scale {
            open_peak = open_peak.max(control.open.load(Relaxed));
            tcp_mem_peak = tcp_mem_peak.max(crate::limits::tcp_mem_pages());
            std::thread::sleep(Duration::from_millis(100)); // sampling the open count
        }
        scale_end = now();
        // Scenarios 2, 3 and 8: arrivals, chaos, operations.
        control.tag.store(2, Relaxed);
        control.rate_milli.store(p.rate * 1000, Relaxed);
        timeline.lock().expect("timeline").chaos_start = now();
        chaos_on.store(true, Relaxed);
        let chaos_end = started + p.scale + p.chaos;
        let backends = &mut backends;
        let splice = &mut splice;
        let (file, state, timeline) = (&file, &state, &timeline);
        let kills = s.spawn(move || chaos(backends, rng.fork(2), chaos_end, timeline, epoch));
        let ops = s.spawn(move || {
            operations(splice, file, state, rng.fork(3), chaos_end, p.chaos, timeline, epoch)
        });
        let monitor = s.spawn(|| monitor(&chaos_done, timeline, epoch));
        while Instant::now() < chaos_end {
            open_peak = open_peak.max(control.open.load(Relaxed));
            tcp_mem_peak = tcp_mem_peak.max(crate::limits::tcp_mem_pages());
            std::thread::sleep(Duration::from_millis(100)); // sampling the open count
        }
        control.stop.store(true, Relaxed);
        let _ = kills.join();
        let _ = ops.join();
        timeline.lock().expect("timeline").chaos_end = now();
        let outcomes = engine.join().expect("client engine")?;
        chaos_done.store(true, Relaxed);
        let _ = monitor.join();
        Ok(outcomes)
    })?;
    // The backends report uploads when they see the client's EOF: wait for the last ones.
    let expected = outcomes.iter().filter(|o| o.end == client::End::Done).count();
    testkit::wait_until(Duration::from_secs(15), || {
        let v = verdicts.lock().expect("verdicts");
        outcomes.iter().filter(|o| o.end == client::End::Done && v.contains_key(&o.spec.id)).count()
            >= expected
    });
    let listen_overflows = testkit::netstat("TcpExt", "ListenOverflows") - overflows_before;
    let memory_pressures = testkit::netstat("TcpExt", "TCPMemoryPressures") - pressures_before;
    let refused = metric(Splice::admin(), "tether_sessions_refused_total")
        + metric(T1C_ADMIN.parse().expect("address"), "tether_sessions_refused_total");
    // What each tether said and counted, for looking into a figure.
    for (name, admin) in
        [("splice", Splice::admin()), ("copy", T1C_ADMIN.parse().expect("address"))]
    {
        if let Ok(r) = http(admin, "GET", "/metrics", "") {
            std::fs::write(out.join(format!("fleet-{name}.metrics")), r.body)?;
        }
    }
    std::fs::write(out.join("fleet-copy.log"), copy.stderr_text())?;
    let logs: Vec<String> = splice.tethers.iter().map(Tether::stderr_text).collect();
    std::fs::write(out.join("fleet-splice.log"), logs.join("\n--- next process ---\n"))?;
    drop(copy);
    drop(splice);
    drop(backends);
    let verdicts = std::mem::take(&mut *verdicts.lock().expect("verdicts"));
    let timeline = timeline.into_inner().expect("timeline");
    Ok(Results {
        outcomes,
        verdicts,
        timeline,
        open_peak,
        scale_end,
        deferred: control.deferred.load(Relaxed),
        refused,
        listen_overflows,
        memory_pressures,
        tcp_mem_peak,
        tcp_mem: p.tcp_mem,
    })
}

/// Kills (and restarts) or freezes (and thaws) one backend at a time, at seeded moments.
fn chaos(
    backends: &mut [ChaosBackend],
    mut rng: Rng,
    end: Instant,
    timeline: &Mutex<Timeline>,
    epoch: Instant,
) {
    let now = || epoch.elapsed().as_secs_f64();
    let pause = |d: f64| std::thread::sleep(Duration::from_secs_f64(d)); // the schedule's clock
    pause(0.5 + rng.below(1000) as f64 / 1000.0);
    let mut first = true;
    // A backend is not chosen again until the probes may have brought it back up (its
    // disruption's end): a kill of a backend still down would have nothing to mark.
    let mut busy_until = vec![0.0f64; backends.len()];
    while Instant::now() + Duration::from_secs(5) < end {
        let i = rng.below(u64::from(POOL)) as usize;
        if busy_until[i] > now() {
            pause(0.2);
            continue;
        }
        let name = backends[i].name.clone();
        let t0 = now();
        // The first event is a kill, so that every run has a time to mark one down.
        if first || rng.chance(0.5) {
            first = false;
            backends[i].kill();
            // Longer than the probes need to see it (interval x fall + timeout), so that
            // every kill has a time to mark it down; the data path keeps clients off it from
            // the first refused connect.
            pause(3.5 + rng.below(2500) as f64 / 1000.0);
            let restarted = backends[i].restart();
            let t1 = now();
            let mut tl = timeline.lock().expect("timeline");
            if let Err(e) = restarted {
                tl.errors.push(format!("restart {name}: {e}"));
            }
            // Until the probes bring it back (rise 2 x interval), clients keep moving off it.
            busy_until[i] = t1 + 3.0 * HEALTH_INTERVAL_S + 1.0;
            tl.disruptions.push(Disruption {
                backend: name,
                kind: "kill",
                from: t0,
                to: busy_until[i],
            });
        } else {
            backends[i].signal_stop(true);
            pause(1.0 + rng.below(3000) as f64 / 1000.0);
            backends[i].signal_stop(false);
            let t1 = now();
            busy_until[i] = t1 + 1.0;
            timeline.lock().expect("timeline").disruptions.push(Disruption {
                backend: name,
                kind: "stop",
                from: t0,
                to: t1,
            });
        }
        pause(0.5 + rng.below(2000) as f64 / 1000.0);
    }
}

/// Admin changes and reloads at seeded moments, a reload first; one upgrade at 35% and one
/// restart at 70% of the chaos phase.
#[allow(clippy::too_many_arguments)]
fn operations(
    splice: &mut Splice,
    file: &Path,
    state: &Path,
    mut rng: Rng,
    end: Instant,
    length: Duration,
    timeline: &Mutex<Timeline>,
    epoch: Instant,
) {
    let now = || epoch.elapsed().as_secs_f64();
    let pause = |d: f64| std::thread::sleep(Duration::from_secs_f64(d)); // the schedule's clock
    let start = Instant::now();
    let (mut upgraded, mut restarted, mut reloads) = (false, false, 0usize);
    let mut first = true;
    let record =
        |what: String, ok: bool| timeline.lock().expect("timeline").ops.push((now(), what, ok));
    let path = |b: &str| format!("/api/services/db/backends/{b}");
    while Instant::now() + Duration::from_secs(3) < end {
        let progress = start.elapsed().as_secs_f64() / length.as_secs_f64();
        if !upgraded && progress >= 0.35 {
            upgraded = true;
            let t0 = now();
            let r = splice.upgrade();
            let mut tl = timeline.lock().expect("timeline");
            tl.upgrades.push((t0, now()));
            tl.ops.push((t0, "upgrade".into(), r.is_ok()));
            if let Err(e) = r {
                tl.errors.push(format!("upgrade: {e}"));
            }
            continue;
        }
        if !restarted && progress >= 0.70 {
            restarted = true;
            let t0 = now();
            let r = splice.restart(epoch);
            let mut tl = timeline.lock().expect("timeline");
            match r {
                Ok((exited, ready)) => tl.restarts.push((t0, exited, ready)),
                Err(e) => tl.errors.push(format!("restart: {e}")),
            }
            let ok = tl.restarts.len() == 1;
            tl.ops.push((t0, "restart".into(), ok));
            continue;
        }
        let b = format!("b{}", 1 + rng.below(u64::from(POOL)));
        // The first operation is always a reload, so even the one-minute run proves a reload
        // under load refuses nobody (five kinds at random left none in about one run in six).
        let kind = if first { 4 } else { rng.below(5) };
        first = false;
        match kind {
            0 => {
                let ok = api("PUT", &path(&b), r#"{"state":"drain"}"#);
                record(format!("drain {b}"), ok);
                pause(1.0 + rng.below(2000) as f64 / 1000.0);
                record(format!("ready {b}"), api("PUT", &path(&b), r#"{"state":"ready"}"#));
            }
            1 => {
                let t0 = now();
                let ok = api("PUT", &path(&b), r#"{"state":"maint"}"#);
                record(format!("maint {b}"), ok);
                pause(1.0 + rng.below(2000) as f64 / 1000.0);
                let ready = api("PUT", &path(&b), r#"{"state":"ready"}"#);
                record(format!("ready {b}"), ready);
                timeline.lock().expect("timeline").disruptions.push(Disruption {
                    backend: b,
                    kind: "maint",
                    from: t0,
                    to: now(),
                });
            }
            2 => {
                let w = 1 + rng.below(5);
                record(
                    format!("weight {b} {w}"),
                    api("PUT", &path(&b), &format!("{{\"weight\":{w}}}")),
                );
            }
            3 => {
                let body =
                    format!("{{\"address\":\"{}\",\"name\":\"b8\"}}", backend_addr(POOL + 2));
                record("add b8".into(), api("POST", "/api/services/db/backends", &body));
                pause(1.0 + rng.below(2000) as f64 / 1000.0);
                let t0 = now();
                record("remove b8".into(), api("DELETE", &path("b8"), ""));
                timeline.lock().expect("timeline").disruptions.push(Disruption {
                    backend: "b8".into(),
                    kind: "removed",
                    from: t0,
                    to: f64::MAX,
                });
            }
            _ => {
                reloads += 1;
                let t0 = now();
                let ok = reload(splice, file, state, reloads);
                let mut tl = timeline.lock().expect("timeline");
                tl.reloads.push(t0);
                tl.ops.push((t0, format!("reload {reloads}"), ok));
                if reloads % 2 == 0 {
                    tl.disruptions.push(Disruption {
                        backend: format!("b{}", POOL + 1),
                        kind: "removed",
                        from: t0,
                        to: f64::MAX,
                    });
                }
            }
        }
        pause(0.5 + rng.below(1500) as f64 / 1000.0);
    }
}

/// Writes variant `k` and sends SIGHUP; true once `/api/backends` shows b7 present or not as
/// the variant says.
fn reload(splice: &Splice, file: &Path, state: &Path, k: usize) -> bool {
    if std::fs::write(file, config(k, state)).is_err() {
        return false;
    }
    if kill(Pid::from_raw(splice.current as i32), Signal::SIGHUP).is_err() {
        return false;
    }
    let want_b7 = k % 2 == 1;
    testkit::wait_until(Duration::from_secs(10), || {
        http(Splice::admin(), "GET", "/api/backends", "").is_ok_and(|r| {
            let list: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            let has = list.as_array().is_some_and(|l| l.iter().any(|b| b["name"] == "b7"));
            let b3 = list.as_array().and_then(|l| l.iter().find(|b| b["name"] == "b3").cloned());
            has == want_b7 && b3.is_some_and(|b| b["weight"].as_u64() == Some(1 + k as u64 % 2))
        })
    })
}

/// Records every health change the splice tether reports, every 100 ms.
fn monitor(done: &AtomicBool, timeline: &Mutex<Timeline>, epoch: Instant) {
    let mut last: HashMap<String, String> = HashMap::new();
    while !done.load(Relaxed) {
        if let Ok(r) = http(Splice::admin(), "GET", "/api/backends", "") {
            let list: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
            for b in list.as_array().into_iter().flatten() {
                let (Some(name), Some(health)) = (b["name"].as_str(), b["health"].as_str()) else {
                    continue;
                };
                if last.get(name).map(String::as_str) != Some(health) {
                    last.insert(name.into(), health.into());
                    let t = epoch.elapsed().as_secs_f64();
                    timeline.lock().expect("timeline").health.push((t, name.into(), health.into()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100)); // the sampling clock
    }
}
