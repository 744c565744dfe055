//! What a change to a pool would do, before it is made (issue 17): `POST
//! /api/services/{service}/preview` with one proposed change answers how many pinned clients
//! would move, how many open sessions would be cut, and what share of the table's slots would
//! change owner, per backend and in all. Nothing is applied.
//!
//! How each change moves clients (the same rules the data path follows):
//! - `remove`: the backend's pinned clients move (their pin names a backend that is gone); its
//!   open sessions run on; the table is rebuilt without it.
//! - `add`, `weight`: pins hold, so no pinned client moves; the table is rebuilt, and the slots
//!   that change owner are where new clients land elsewhere.
//! - `state`: into `maint`, the backend's pinned clients move and, under `on-down kill`, its
//!   sessions are cut; `drain` keeps pins; the backend's slots change hands for new clients
//!   whenever it starts or stops taking them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use health::AdminState;
use ring::{Member, Ring};

use crate::registry::{Refusal, Registry};

/// The body: exactly one of the keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposed {
    remove: Option<String>,
    add: Option<NewBackend>,
    weight: Option<BTreeMap<String, u32>>,
    state: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackend {
    address: String,
    name: Option<String>,
    weight: Option<i64>,
}

/// One backend's share of what moves.
#[derive(Debug, Default, Clone)]
struct Moves {
    pinned: u64,
    cut: u64,
}

/// The preview of `proposed` on `service`, as the API answers it.
pub fn preview(registry: &Registry, service: &str, proposed: &Proposed) -> Result<Value, Refusal> {
    let kinds = [
        proposed.remove.is_some(),
        proposed.add.is_some(),
        proposed.weight.is_some(),
        proposed.state.is_some(),
    ];
    if kinds.iter().filter(|&&k| k).count() != 1 {
        return Err(Refusal::Bad(
            "propose exactly one change: remove, add, weight or state".into(),
        ));
    }
    let s = registry.service(service)?;
    let now = registry.shared.clock_ms();
    // Pins per backend walk the whole sticky table: only the kinds that move pins need them.
    let pins = if proposed.remove.is_some() || proposed.state.is_some() {
        s.sticky.per_backend(now, registry.next_id as usize)
    } else {
        Vec::new()
    };
    let kill = s.config.health.on_down == config::OnDown::Kill;
    let names: Vec<String> = s.backends.iter().map(|b| b.state.name.clone()).collect();
    let index = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Refusal::NotFound(format!("no backend {name:?} in service {service:?}")))
    };
    let mut moves: BTreeMap<String, Moves> =
        names.iter().map(|n| (n.clone(), Moves::default())).collect();
    let mut members: Vec<Member> =
        s.backends.iter().map(|b| Member::new(b.state.name.clone(), b.weight.get())).collect();
    // Slots whose owner takes or stops taking new clients without the table changing.
    let mut handed_over: Vec<usize> = Vec::new();
    if let Some(name) = &proposed.remove {
        let i = index(name)?;
        let pinned = pins.get(s.backends[i].state.id as usize).copied().unwrap_or(0) as u64;
        moves.insert(name.clone(), Moves { pinned, cut: 0 });
        members.remove(i);
    }
    if let Some(new) = &proposed.add {
        let parts = config::BackendParts {
            address: &new.address,
            weight: new.weight,
            name: new.name.as_deref(),
            max_conns: None,
        };
        let spec = parts.spec().map_err(Refusal::Bad)?;
        if names.contains(&spec.name) {
            return Err(Refusal::Conflict(format!(
                "service {service:?} already has a backend named {:?}",
                spec.name
            )));
        }
        moves.insert(spec.name.clone(), Moves::default());
        members.push(Member::new(spec.name, spec.weight.get()));
    }
    if let Some(weights) = &proposed.weight {
        for (name, &w) in weights {
            let i = index(name)?;
            let w = config::check_weight(i64::from(w))
                .map_err(|p| Refusal::Bad(format!("weight of {name:?}: {w} {p}")))?;
            members[i] = Member::new(name.clone(), w.get());
        }
    }
    if let Some(states) = &proposed.state {
        for (name, state) in states {
            let i = index(name)?;
            let after: AdminState =
                state.parse().map_err(|e| Refusal::Bad(format!("state of {name:?}: {e}")))?;
            let b = &s.backends[i].state;
            let before = b.admin();
            if before != AdminState::Maint && after == AdminState::Maint {
                let pinned = pins.get(b.id as usize).copied().unwrap_or(0) as u64;
                let sessions = b.sessions.load(std::sync::atomic::Ordering::Relaxed);
                moves.insert(name.clone(), Moves { pinned, cut: if kill { sessions } else { 0 } });
            }
            if (before == AdminState::Ready) != (after == AdminState::Ready) {
                handed_over.push(i);
            }
        }
    }
    let slots_changing = match s.snapshot.ring.as_ref() {
        Some(now_ring) if proposed.state.is_some() => {
            let shares = now_ring.shares();
            let changed: usize = handed_over.iter().map(|&i| shares[i]).sum();
            changed as f64 / now_ring.size() as f64
        }
        _ => slots_changed(s, &members, s.config.table_size, s.config.seed)?,
    };
    Ok(answer(service, &moves, slots_changing))
}

/// `POST /api/reload?dry_run=1`: what reloading `text` (a whole configuration file) would do
/// to each service, applying nothing. A backend kept by name keeps its pins; one left out
/// loses them (its open sessions run on, as a reload keeps every established session); a
/// service left out loses every pin; a changed affinity (or prefix) changes every client's
/// key, so every pin of the service moves.
pub fn reload_preview(registry: &Registry, text: &str) -> Result<Value, Refusal> {
    let next = config::file::load_str(text).map_err(|e| Refusal::Bad(e.to_string()))?;
    let now = registry.shared.clock_ms();
    let mut services = Vec::new();
    let (mut pinned, mut cut) = (0u64, 0u64);
    for s in registry.services.iter().flatten() {
        let pins = s.sticky.per_backend(now, registry.next_id as usize);
        let pins_of = |b: &crate::registry::BackendCtl| {
            pins.get(b.state.id as usize).copied().unwrap_or(0) as u64
        };
        let next_service = next.services.iter().find(|n| n.name == s.config.name);
        let keys_change = next_service
            .map_or(true, |n| n.affinity != s.config.affinity || n.prefix != s.config.prefix);
        let mut moves: BTreeMap<String, Moves> = BTreeMap::new();
        for b in &s.backends {
            let kept =
                next_service.is_some_and(|n| n.backends.iter().any(|x| x.name == b.state.name));
            let pinned = if kept && !keys_change { 0 } else { pins_of(b) };
            moves.insert(b.state.name.clone(), Moves { pinned, cut: 0 });
        }
        let slots = match next_service {
            None => 1.0,
            Some(n) => {
                for x in &n.backends {
                    moves.entry(x.name.clone()).or_default();
                }
                let members: Vec<Member> = n
                    .backends
                    .iter()
                    .map(|x| Member::new(x.name.clone(), x.weight.get()))
                    .collect();
                slots_changed(s, &members, n.table_size, n.seed)?
            }
        };
        let mut v = answer(&s.config.name, &moves, slots);
        v["removed"] = json!(next_service.is_none());
        pinned += v["pinned_clients_moving"].as_u64().unwrap_or(0);
        cut += v["sessions_cut"].as_u64().unwrap_or(0);
        services.push(v);
    }
    let known = |name: &str| registry.services.iter().flatten().any(|s| s.config.name == name);
    let added: Vec<&str> =
        next.services.iter().map(|n| n.name.as_str()).filter(|n| !known(n)).collect();
    Ok(json!({
        "dry_run": true,
        "pinned_clients_moving": pinned,
        "sessions_cut": cut,
        "services": services,
        "services_added": added,
    }))
}

/// The share of `s`'s table slots whose owner (by name) differs in a table of `members`.
fn slots_changed(
    s: &crate::registry::ServiceCtl,
    members: &[Member],
    size: usize,
    seed: u64,
) -> Result<f64, Refusal> {
    let Some(now_ring) = s.snapshot.ring.as_ref() else { return Ok(1.0) };
    let next = Ring::build(members, size, seed)
        .map_err(|e| Refusal::Bad(format!("the pool after the change: {e}")))?;
    let before = now_ring.owners().map(|m| s.snapshot.backends[m].name.as_str());
    let after = next.owners().map(|m| members[m].name.as_str());
    let mut changed = before.zip(after).filter(|(a, b)| a != b).count();
    // A table of another size: every slot past the shorter one counts as changed.
    changed += now_ring.size().abs_diff(next.size());
    Ok(changed as f64 / now_ring.size().max(next.size()) as f64)
}

fn answer(service: &str, moves: &BTreeMap<String, Moves>, slots_changing: f64) -> Value {
    let backends: Vec<Value> = moves
        .iter()
        .map(|(name, m)| json!({ "name": name, "pinned_clients_moving": m.pinned, "sessions_cut": m.cut }))
        .collect();
    json!({
        "service": service,
        "pinned_clients_moving": moves.values().map(|m| m.pinned).sum::<u64>(),
        "sessions_cut": moves.values().map(|m| m.cut).sum::<u64>(),
        "slots_changing": slots_changing,
        "backends": backends,
    })
}
