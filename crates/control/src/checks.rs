//! The health-check thread: probes each service's backends every `health-interval`, folds in
//! the passive failures the workers counted since, and flips backends up or down through the
//! rise/fall state machine. It never touches a socket of the data path; a change is one atomic
//! store the workers read on their next choice.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use health::Health;

use crate::probe::{Outcome, ProbeKind, Prober, Target};
use crate::registry::Registry;

/// Longest sleep between looks at the schedule (a reload may add a service).
const TICK: Duration = Duration::from_millis(100);

/// Run until `stop` sends or disconnects.
pub fn spawn(
    registry: Arc<Mutex<Registry>>,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("tether-health".into()).spawn(move || {
        let mut prober = match Prober::new() {
            Ok(p) => p,
            Err(e) => {
                log::error!("health checks disabled: cannot make a poller: {e}");
                return;
            }
        };
        let mut due: HashMap<usize, Instant> = HashMap::new();
        loop {
            let now = Instant::now();
            // What is due, taken under the lock; probed without it.
            let rounds = plan(&registry, &mut due, now);
            for (slot, ids, targets, timeout) in rounds {
                let outcomes = prober.round(&targets, timeout);
                apply(&registry, slot, &ids, &outcomes);
            }
            let next = due.values().min().copied().unwrap_or(now + TICK);
            let wait = next.saturating_duration_since(Instant::now()).min(TICK);
            match stop.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })
}

type Round = (usize, Vec<conntrack::BackendId>, Vec<Target>, Duration);

fn plan(registry: &Mutex<Registry>, due: &mut HashMap<usize, Instant>, now: Instant) -> Vec<Round> {
    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
    let mut rounds = Vec::new();
    due.retain(|slot, _| reg.services.get(*slot).is_some_and(Option::is_some));
    for (slot, s) in reg.services.iter().enumerate() {
        let Some(s) = s else { continue };
        let h = &s.config.health;
        let kind = match &h.check {
            config::HealthCheck::Off => {
                due.remove(&slot);
                continue;
            }
            config::HealthCheck::Tcp => ProbeKind::Tcp {
                header: match h.send_proxy {
                    None => b"",
                    Some(config::ProxyVersion::V1) => proxyproto::V1_UNKNOWN,
                    Some(config::ProxyVersion::V2) => &proxyproto::V2_LOCAL,
                },
            },
            config::HealthCheck::Udp { send, expect } => {
                ProbeKind::Udp { send: send.clone(), expect: expect.clone() }
            }
        };
        let at = due.entry(slot).or_insert(now);
        if *at > now {
            continue;
        }
        *at = now + h.interval;
        let ids = s.backends.iter().map(|b| b.state.id).collect();
        let targets =
            s.backends.iter().map(|b| Target { addr: b.state.addr, kind: kind.clone() }).collect();
        rounds.push((slot, ids, targets, h.timeout));
    }
    rounds
}

fn apply(
    registry: &Mutex<Registry>,
    slot: usize,
    ids: &[conntrack::BackendId],
    outcomes: &[Outcome],
) {
    let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
    let mut events = Vec::new();
    let peering = reg.peering.clone();
    let Some(Some(s)) = reg.services.get_mut(slot) else { return };
    let service = s.config.name.clone();
    let fall = s.config.health.fall;
    let kill = s.config.health.on_down == config::OnDown::Kill;
    let mut killed = Vec::new();
    for (id, outcome) in ids.iter().zip(outcomes) {
        // The backend may have been removed while the round ran.
        let Some(b) = s.backends.iter_mut().find(|b| b.state.id == *id) else { continue };
        let failures = b.state.failures.load(Relaxed);
        let passive = failures.saturating_sub(b.failures_seen).min(u64::from(fall));
        b.failures_seen = failures;
        let mut changed = None;
        for _ in 0..passive {
            changed = b.checker.observe(false).or(changed);
        }
        changed = b.checker.observe(*outcome == Outcome::Ok).or(changed);
        // With `--peer-health quorum` the peers' probes have a say (peering.rs).
        let changed = changed
            .map(|local| match &peering {
                Some(p) => p.quorum_health(&service, &b.state.name, local).0,
                None => local,
            })
            .filter(|&health| health != b.state.health());
        if let Some(health) = changed {
            b.state.set_health(health);
            if health == Health::Down && kill {
                killed.push(b.state.id);
            }
            let why = match (health, outcome) {
                (Health::Down, Outcome::Failed(why)) => format!(": {why}"),
                (Health::Down, Outcome::Ok) => format!(": {passive} failed connects"),
                (Health::Up, _) => String::new(),
            };
            events.push(format!("{service}/{}: health {health}{why}", b.state.name));
        }
    }
    for e in events {
        reg.transitions += 1;
        reg.event(e);
    }
    for id in killed {
        reg.kill(id);
    }
}
