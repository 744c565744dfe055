//! Turns the fleet's session outcomes, the backends' upload verdicts and the timeline of what
//! the suite did into figures: bytes corrupted, truncated or duplicated, sessions lost with and
//! without a cause, failed connects, pins broken.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use crate::client::{End, Mode, Outcome};
use crate::fleet::{Results, Timeline, HEALTH_FALL, HEALTH_INTERVAL_S, HEALTH_TIMEOUT_S, T1};
use crate::procs::Verdict;
use crate::report::Checks;

/// What became of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Completed,
    /// Ended early on a backend that was killed or frozen meanwhile.
    LostToChaos,
    /// Cut by the splice tether's restart (its grace period ended), or refused while it was
    /// down: what a restart costs, and why the upgrade exists.
    LostToRestart,
    Unexpected,
}

/// Totals over a set of sessions.
#[derive(Default, Debug)]
pub struct Tally {
    pub sessions: u64,
    pub short: u64,
    pub completed: u64,
    pub lost_to_chaos: u64,
    pub lost_to_restart: u64,
    pub unexpected: u64,
    pub failed_connects: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub corrupted: u64,
    pub truncated: u64,
    pub duplicated: u64,
    pub reasons: BTreeMap<String, u64>,
    pub examples: Vec<String>,
    pub modes: BTreeMap<String, u64>,
}

impl Tally {
    fn json(&self) -> Value {
        json!({
            "sessions": self.sessions,
            "short_sessions": self.short,
            "completed": self.completed,
            "lost_on_killed_or_stopped_backend": self.lost_to_chaos,
            "lost_to_restart": self.lost_to_restart,
            "sessions_lost_unexpected": self.unexpected,
            "failed_connects_while_healthy": self.failed_connects,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_corrupted": self.corrupted,
            "bytes_truncated": self.truncated,
            "bytes_duplicated": self.duplicated,
            "unexpected_reasons": self.reasons,
            "unexpected_examples": self.examples,
            "completed_by_mode": self.modes,
        })
    }
}

struct Ctx<'a> {
    timeline: &'a Timeline,
    verdicts: &'a HashMap<u64, Verdict>,
    /// Per source, (start, backend) of every session that learnt its backend, by start.
    seen: HashMap<IpAddr, Vec<(f64, String)>>,
    t1: SocketAddr,
}

impl Ctx<'_> {
    /// The backend a session was on, or else the one its source was last seen on before it.
    fn backend_of(&self, o: &Outcome) -> Option<String> {
        if let Some(b) = &o.backend {
            return Some(b.clone());
        }
        let list = self.seen.get(&o.spec.source)?;
        // Strictly before: sessions started in the same turn may have gone elsewhere already.
        list.iter().rev().find(|(t, _)| *t < o.started).map(|(_, b)| b.clone())
    }

    /// The backends a session may have been on: the one that answered it; or else the one its
    /// source was last seen on before it, and every one the source was seen on while it was
    /// open or in the second before (a failover moves a source between sessions started
    /// together).
    fn candidates(&self, o: &Outcome) -> Vec<String> {
        if let Some(b) = &o.backend {
            return vec![b.clone()];
        }
        let mut out: Vec<String> = self.backend_of(o).into_iter().collect();
        if let Some(list) = self.seen.get(&o.spec.source) {
            for (t, b) in list {
                if *t >= o.started - 1.0 && *t <= o.ended && !out.contains(b) {
                    out.push(b.clone());
                }
            }
        }
        out
    }

    fn restart_hit(&self, o: &Outcome) -> bool {
        o.spec.to == self.t1
            && self
                .timeline
                .restarts
                .iter()
                .any(|(term, _, ready)| o.started <= *ready && o.ended >= *term)
    }

    fn classify(&self, o: &Outcome) -> (Class, &'static str) {
        let v = self.verdicts.get(&o.spec.id);
        let upload_ok = v.is_some_and(|v| v.clean && v.received == o.spec.up && v.wrong == 0);
        let download_ok = o.down_got == o.spec.down && o.down_wrong == 0;
        if o.end == End::Done && upload_ok && download_ok {
            return (Class::Completed, "");
        }
        // A client that ends by writing (`SendThenClose`, `BackendFirst`) is done before its
        // upload reaches the backend: a kill in the next two seconds can still lose it.
        let tail = if v.is_none() { 2.0 } else { 0.2 };
        let chaos = self
            .candidates(o)
            .iter()
            .any(|b| self.timeline.hit(b, &["kill", "stop"], o.started - 0.2, o.ended + tail));
        let reason = match (o.end, v) {
            (End::ConnectFailed, _) => "connect failed",
            (End::NoHello, _) => "closed before the backend answered",
            (End::Broken, _) => "broken after the backend answered",
            (End::Stalled, _) => "stalled",
            (End::Cut, _) => "still open at the end",
            (End::Closed, _) => "closed by the peer",
            (End::Done, None) => "upload never reached a backend's EOF",
            (End::Done, Some(v)) if !v.clean => "upload reset at the backend",
            (End::Done, Some(_)) => "bytes wrong",
        };
        if self.restart_hit(o) {
            (Class::LostToRestart, reason)
        } else if chaos && o.end != End::ConnectFailed {
            (Class::LostToChaos, reason)
        } else {
            (Class::Unexpected, reason)
        }
    }

    fn tally<'o>(&self, outcomes: impl Iterator<Item = &'o Outcome>) -> Tally {
        let mut t = Tally::default();
        for o in outcomes {
            t.sessions += 1;
            t.short += u64::from(o.spec.short);
            let (class, reason) = self.classify(o);
            let v = self.verdicts.get(&o.spec.id);
            let received = v.map_or(0, |v| v.received);
            t.bytes_up += received.min(o.spec.up);
            t.bytes_down += o.down_got.min(o.spec.down);
            match class {
                Class::Completed => {
                    t.completed += 1;
                    *t.modes.entry(format!("{:?}", o.spec.mode)).or_insert(0) += 1;
                }
                Class::LostToChaos => t.lost_to_chaos += 1,
                Class::LostToRestart => t.lost_to_restart += 1,
                Class::Unexpected => {
                    t.unexpected += 1;
                    *t.reasons.entry(reason.to_string()).or_insert(0) += 1;
                    if t.examples.len() < 20 {
                        t.examples.push(format!(
                            "id {} from {} to {} at {:.3}..{:.3}: {reason}, backend {:?} ({})",
                            o.spec.id,
                            o.spec.source,
                            o.spec.to,
                            o.started,
                            o.ended,
                            self.backend_of(o),
                            o.error.as_deref().unwrap_or("")
                        ));
                    }
                    if matches!(o.end, End::ConnectFailed | End::NoHello) {
                        t.failed_connects += 1;
                    }
                }
            }
            if matches!(class, Class::Completed | Class::Unexpected) {
                t.corrupted += o.down_wrong + v.map_or(0, |v| v.wrong);
                t.duplicated +=
                    o.down_got.saturating_sub(o.spec.down) + received.saturating_sub(o.spec.up);
                if class == Class::Unexpected && o.spec.mode != Mode::Hold {
                    t.truncated +=
                        o.spec.down.saturating_sub(o.down_got) + o.spec.up.saturating_sub(received);
                }
            }
        }
        t
    }
}

/// Consecutive sessions of one source on two backends, the first not disrupted in between.
fn pins_broken(
    ctx: &Ctx,
    sources: &[IpAddr],
    from: f64,
    to: f64,
    examples: &mut Vec<String>,
) -> (u64, u64, u64) {
    let (mut broken, mut explained, mut across_restart) = (0, 0, 0);
    for s in sources {
        let Some(list) = ctx.seen.get(s) else { continue };
        for pair in list.windows(2) {
            let ((t0, a), (t1, b)) = (&pair[0], &pair[1]);
            if a == b || *t1 < from || *t1 > to {
                continue;
            }
            let kinds = ["kill", "stop", "maint", "removed"];
            // Sessions started within a second of each other reach tether in any order: a move
            // either way between them is explained by a disruption of either backend.
            let near = t1 - t0 < 1.0 && ctx.timeline.hit(b, &kinds, t0 - 0.5, t1 + 0.5);
            if near || ctx.timeline.hit(a, &kinds, t0 - 0.5, t1 + 0.5) {
                explained += 1;
            } else {
                broken += 1;
                if examples.len() < 20 {
                    examples.push(format!("{s}: {a} at {t0:.3} s, {b} at {t1:.3} s"));
                }
                if ctx.timeline.restarts.iter().any(|(term, _, _)| t0 <= term && t1 >= term) {
                    across_restart += 1;
                }
            }
        }
    }
    (broken, explained, across_restart)
}

/// Adds the fleet's checks; returns the top-level figures and the scenario objects.
pub fn fleet(r: &Results, checks: &mut Checks) -> (Value, Vec<(&'static str, Value)>) {
    let mut seen: HashMap<IpAddr, Vec<(f64, String)>> = HashMap::new();
    for o in &r.outcomes {
        if let Some(b) = &o.backend {
            seen.entry(o.spec.source).or_default().push((o.started, b.clone()));
        }
    }
    for list in seen.values_mut() {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let ctx = Ctx {
        timeline: &r.timeline,
        verdicts: &r.verdicts,
        seen,
        t1: T1.parse().expect("address"),
    };
    let tl = &r.timeline;
    let scale = ctx.tally(r.outcomes.iter().filter(|o| o.spec.tag == 1));
    let chaos = ctx.tally(r.outcomes.iter().filter(|o| o.spec.tag == 2));
    let all: Vec<&Outcome> = r.outcomes.iter().collect();
    let mut sources: Vec<IpAddr> = all.iter().map(|o| o.spec.source).collect();
    sources.sort();
    sources.dedup();
    let mut examples = Vec::new();
    let (pins_scale, _, _) = pins_broken(&ctx, &sources, 0.0, r.scale_end, &mut examples);
    let (pins_chaos, pins_explained, pins_restart) =
        pins_broken(&ctx, &sources, r.scale_end, f64::MAX, &mut examples);

    // Scenario 1.
    let mut s1 = scale.json();
    s1["concurrent_sessions_peak"] = json!(r.open_peak);
    s1["pins_broken"] = json!(pins_scale);
    let sc = "byte_exact";
    checks.add(sc, "bytes corrupted", scale.corrupted as f64, "0", scale.corrupted == 0);
    checks.add(sc, "bytes truncated", scale.truncated as f64, "0", scale.truncated == 0);
    checks.add(sc, "bytes duplicated", scale.duplicated as f64, "0", scale.duplicated == 0);
    checks.add(
        sc,
        "sessions not completed, with no cause (those open when the chaos began count in its figures)",
        scale.unexpected as f64,
        "0",
        scale.unexpected == 0 && scale.completed > 0,
    );
    checks.add(sc, "pins broken", pins_scale as f64, "0", pins_scale == 0);

    // Scenario 2.
    let kills: Vec<_> = tl.disruptions.iter().filter(|d| d.kind == "kill").collect();
    let mut to_down = Vec::new();
    let mut not_seen_down = 0;
    for d in &kills {
        let down =
            tl.health.iter().find(|(t, n, h)| *t >= d.from && n == &d.backend && h == "down");
        match down {
            Some((t, _, _)) if *t <= d.to => to_down.push(((t - d.from) * 1000.0).round()),
            _ => not_seen_down += 1,
        }
    }
    let worst = to_down.iter().copied().fold(0.0, f64::max);
    let bound_ms = (HEALTH_INTERVAL_S * f64::from(HEALTH_FALL) + HEALTH_TIMEOUT_S + 1.0) * 1000.0;
    let chaos_seconds = (tl.chaos_end - tl.chaos_start).max(0.001);
    let mut s2 = chaos.json();
    s2["seconds"] = json!(chaos_seconds);
    s2["new_connections_per_second"] = json!(chaos.short as f64 / chaos_seconds);
    s2["kills"] = json!(kills.len());
    s2["arrivals_deferred_by_the_harness_fd_budget"] = json!(r.deferred);
    s2["tether_sessions_refused_total"] = json!(r.refused);
    s2["kernel_listen_overflows"] = json!(r.listen_overflows);
    s2["kernel_tcp_memory_pages_peak"] = json!(r.tcp_mem_peak);
    s2["kernel_tcp_mem"] = json!(r.tcp_mem);
    s2["kernel_tcp_memory_pressures"] = json!(r.memory_pressures);
    s2["stops"] = json!(tl.disruptions.iter().filter(|d| d.kind == "stop").count());
    s2["pins_broken"] = json!(pins_chaos);
    s2["pin_moves_by_failover_or_operator"] = json!(pins_explained);
    s2["time_to_mark_down_ms"] = json!(to_down);
    s2["kills_not_seen_down"] = json!(not_seen_down);
    s2["errors"] = json!(tl.errors);
    s2["pins_broken_examples"] = json!(examples);
    s2["disruptions"] = json!(tl
        .disruptions
        .iter()
        .map(|d| format!("{} {} {:.3}..{:.3}", d.kind, d.backend, d.from, d.to))
        .collect::<Vec<_>>());
    s2["restarts"] = json!(tl.restarts);
    s2["health_changes"] =
        json!(tl.health.iter().map(|(t, n, h)| format!("{t:.3} {n} {h}")).collect::<Vec<_>>());
    let sc = "backend_chaos";
    checks.add(
        sc,
        "failed client connects while a backend was healthy",
        chaos.failed_connects as f64,
        "0",
        chaos.failed_connects == 0,
    );
    checks.add(
        sc,
        "sessions lost other than on a killed or stopped backend",
        chaos.unexpected as f64,
        "0",
        chaos.unexpected == 0,
    );
    checks.add(
        sc,
        "bytes corrupted, truncated or duplicated",
        (chaos.corrupted + chaos.truncated + chaos.duplicated) as f64,
        "0",
        chaos.corrupted + chaos.truncated + chaos.duplicated == 0,
    );
    checks.add(sc, "pins broken other than by a failover", pins_chaos as f64, "0", pins_chaos == 0);
    checks.add(
        sc,
        "slowest time to mark a killed backend down, ms",
        worst,
        &format!("<= {bound_ms:.0} (interval x fall + timeout + 1 s)"),
        worst <= bound_ms && !to_down.is_empty(),
    );
    checks.add(sc, "kills never seen down", not_seen_down as f64, "0", not_seen_down == 0);
    checks.add(
        sc,
        "suite errors (restarts of backends)",
        tl.errors.len() as f64,
        "0",
        tl.errors.is_empty(),
    );
    // Under TCP memory pressure the kernel drops segments on every socket and backs off for
    // tens of seconds: the figures would measure the harness's load on the kernel, not tether.
    checks.add(
        sc,
        "times the kernel entered TCP memory pressure (the run's own sockets too big)",
        r.memory_pressures as f64,
        "0",
        r.memory_pressures == 0,
    );

    // Scenario 3.
    let refused_near = |times: &[(f64, f64)]| {
        r.outcomes
            .iter()
            .filter(|o| {
                matches!(o.end, End::ConnectFailed | End::NoHello)
                    && ctx.classify(o).0 == Class::Unexpected
            })
            .filter(|o| times.iter().any(|(a, b)| o.started >= a - 1.0 && o.started <= b + 2.0))
            .count()
    };
    let reload_windows: Vec<(f64, f64)> = tl.reloads.iter().map(|t| (*t, *t)).collect();
    let refused_reload = refused_near(&reload_windows);
    let mut kinds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (_, what, ok) in &tl.ops {
        let kind = what.split(' ').next().unwrap_or("").to_string();
        let e = kinds.entry(kind).or_insert((0, 0));
        e.0 += 1;
        e.1 += u64::from(!ok);
    }
    let failed_ops: u64 = kinds.values().map(|v| v.1).sum();
    let s3 = json!({
        "operations": kinds.iter().map(|(k, (n, f))| (k.clone(), json!({"done": n, "failed": f}))).collect::<serde_json::Map<_, _>>(),
        "reloads": tl.reloads.len(),
        "refused_connects_across_reloads": refused_reload,
    });
    let sc = "operations";
    checks.add(
        sc,
        "refused connections across reloads",
        refused_reload as f64,
        "0",
        refused_reload == 0,
    );
    checks.add(
        sc,
        "operations the API or a reload refused",
        failed_ops as f64,
        "0",
        failed_ops == 0,
    );
    checks.add(sc, "reloads done", tl.reloads.len() as f64, ">= 1", !tl.reloads.is_empty());

    // Scenario 8.
    let refused_upgrade = refused_near(&tl.upgrades);
    let gap: Vec<f64> =
        tl.restarts.iter().map(|(term, _, ready)| ((ready - term) * 1000.0).round()).collect();
    let s8 = json!({
        "upgrades": tl.upgrades.len(),
        "refused_connects_across_upgrade": refused_upgrade,
        "restarts": tl.restarts.len(),
        "restart_gap_ms": gap,
        "sessions_lost_to_restart": chaos.lost_to_restart,
        "pins_broken_across_restart": pins_restart,
    });
    let sc = "restart_and_upgrade";
    checks.add(
        sc,
        "upgrades done",
        tl.upgrades.len() as f64,
        "1",
        tl.upgrades.len() == 1 && !tl.ops.iter().any(|o| o.1 == "upgrade" && !o.2),
    );
    checks.add(
        sc,
        "refused connections across the upgrade",
        refused_upgrade as f64,
        "0",
        refused_upgrade == 0,
    );
    checks.add(sc, "restarts done", tl.restarts.len() as f64, "1", tl.restarts.len() == 1);
    checks.add(
        sc,
        "pins broken across the restart (state file)",
        pins_restart as f64,
        "0",
        pins_restart == 0,
    );

    let top = json!({
        "bytes_corrupted": scale.corrupted + chaos.corrupted,
        "bytes_truncated": scale.truncated + chaos.truncated,
        "bytes_duplicated": scale.duplicated + chaos.duplicated,
        "failed_connects_while_healthy": scale.failed_connects + chaos.failed_connects,
        "sessions_lost_unexpected": scale.unexpected + chaos.unexpected,
    });
    (
        top,
        vec![
            ("byte_exact", s1),
            ("backend_chaos", s2),
            ("operations", s3),
            ("restart_and_upgrade", s8),
        ],
    )
}

/// Every session of the fleet, one line each, for looking into a failed figure.
pub fn write_sessions(path: &std::path::Path, r: &Results) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "id,tag,short,target,source,mode,up,down,started,ended,end,backend,down_got,down_wrong,up_received,up_wrong,up_clean,error")?;
    for o in &r.outcomes {
        let v = r.verdicts.get(&o.spec.id);
        writeln!(
            f,
            "{},{},{},{},{},{:?},{},{},{:.3},{:.3},{:?},{},{},{},{},{},{},{}",
            o.spec.id,
            o.spec.tag,
            o.spec.short,
            o.spec.to,
            o.spec.source,
            o.spec.mode,
            o.spec.up,
            o.spec.down,
            o.started,
            o.ended,
            o.end,
            o.backend.as_deref().unwrap_or(""),
            o.down_got,
            o.down_wrong,
            v.map_or(String::new(), |v| v.received.to_string()),
            v.map_or(String::new(), |v| v.wrong.to_string()),
            v.map_or(String::new(), |v| v.clean.to_string()),
            o.error.as_deref().unwrap_or("").replace(',', ";"),
        )?;
    }
    f.flush()
}
