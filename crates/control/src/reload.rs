//! A reload, all or nothing: [`prepare`] builds and checks every new service, table, limiter
//! and listener while changing nothing that runs (it holds the registry by shared reference);
//! [`commit`] applies the plan with operations that cannot fail. A refused reload leaves the
//! running configuration exactly as it was; new sockets bound for it close with the plan.

use std::net::SocketAddr;
use std::sync::Arc;

use conntrack::BackendId;
use proxy::{Command, Listeners};

use crate::registry::{self, BackendCtl, Registry, ServiceCtl};

/// Why a reload was refused; nothing changed.
#[derive(Debug)]
pub enum ReloadError {
    /// tether was started without `--config`.
    NoFile,
    /// The file is unreadable or invalid.
    Config(config::ConfigError),
    /// The file asks for what only a restart can give.
    NeedsRestart(String),
    /// A service's table cannot be built from its pool.
    Table { service: String, error: ring::BuildError },
    /// A `connect-from` address is not one of this host's.
    ConnectFrom(String),
    /// A new listener could not be bound.
    Bind(proxy::BindError),
    /// The process is stopping (SIGTERM, SIGINT, or handed over by an upgrade).
    Stopping,
    /// A fault injected at a step of `prepare` (tests).
    #[cfg(test)]
    Injected(Step),
}

impl ReloadError {
    /// The admin API's answer: 400 for what the file says, 409 for an address another socket
    /// holds, 500 for what went wrong on this host.
    pub fn status(&self) -> u16 {
        match self {
            ReloadError::NoFile
            | ReloadError::Config(_)
            | ReloadError::NeedsRestart(_)
            | ReloadError::Table { .. }
            | ReloadError::ConnectFrom(_) => 400,
            ReloadError::Bind(e) if e.error.kind() == std::io::ErrorKind::AddrInUse => 409,
            ReloadError::Bind(_) => 500,
            ReloadError::Stopping => 503,
            #[cfg(test)]
            ReloadError::Injected(_) => 500,
        }
    }
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::NoFile => {
                f.write_str("tether was started without --config: nothing to reload")
            }
            ReloadError::Config(e) => e.fmt(f),
            ReloadError::NeedsRestart(why) | ReloadError::ConnectFrom(why) => f.write_str(why),
            ReloadError::Table { service, error } => write!(f, "service {service:?}: {error}"),
            ReloadError::Bind(e) => e.fmt(f),
            ReloadError::Stopping => f.write_str(
                "this process is stopping (a signal, or an upgrade handed it over): reload the one that serves",
            ),
            #[cfg(test)]
            ReloadError::Injected(step) => write!(f, "fault injected at {step:?}"),
        }
    }
}

impl std::error::Error for ReloadError {}

/// The steps of [`prepare`] that may fail, in order, each named for fault injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The per-source limiter of a service.
    Limiter(String),
    /// The routing snapshot (Maglev table) of a service.
    Table(String),
    /// A new listener socket.
    Bind(SocketAddr),
    /// The control record of a new service.
    Registry(String),
}

/// A reload checked and built; [`commit`] applies it.
pub struct Plan {
    services: Vec<Planned>,
    /// Slots of the services the file no longer has.
    removed: Vec<usize>,
    /// New listener sockets, by worker.
    per_worker: Vec<Listeners>,
    /// (address, udp) of listeners to close.
    closing: Vec<(SocketAddr, bool)>,
    /// Listeners bound for this reload, to announce.
    announced: Vec<(SocketAddr, SocketAddr, bool)>,
    /// The registry's next backend id once the plan's new backends have theirs.
    next_id: BackendId,
    /// Descriptors of the new listeners, kept for upgrades.
    held: Vec<crate::upgrade::HeldListener>,
}

/// What happens to one service of the file.
enum Planned {
    /// A running service takes a new configuration.
    Changed(Box<Change>),
    /// A service the file adds.
    Added(Box<ServiceCtl>),
}

/// A running service's new configuration: backends matched by name and address keep their
/// state, counters and pins; new ones start ready and up; removed ones take no new session (and
/// are killed under `on-down kill`).
struct Change {
    slot: usize,
    config: config::Service,
    /// The service's backends in configured order.
    backends: Vec<Member>,
    limiter: Option<Arc<guard::Limiter>>,
    snapshot: Arc<proxy::Snapshot>,
    listeners: Vec<(SocketAddr, SocketAddr, bool)>,
    removed: Vec<(BackendId, String)>,
}

/// One backend of a changed service.
enum Member {
    /// The running backend at this index, with its new spec.
    Kept(usize, config::BackendSpec),
    Added(BackendCtl),
}

/// Build and check everything `next` needs. Calls `step` before each step that may fail (a
/// test injects faults there; tether passes `|_| Ok(())`). Binds new listeners, which close
/// again if the plan is dropped; changes nothing else.
pub fn prepare(
    reg: &Registry,
    next: &[config::Service],
    workers: usize,
    mode: config::Listeners,
    step: &mut dyn FnMut(&Step) -> Result<(), ReloadError>,
) -> Result<Plan, ReloadError> {
    if reg.shared.flow_budget.limit() == 0 && next.iter().any(|s| s.protocol.udp()) {
        return Err(ReloadError::NeedsRestart(
            "no UDP service ran at start, so no flows were budgeted from the fd limit: \
             restart tether to add the first UDP service"
                .into(),
        ));
    }
    crate::check_connect_from(next).map_err(ReloadError::ConnectFrom)?;
    let slot_of = |name: &str| {
        reg.services.iter().position(|s| s.as_ref().is_some_and(|s| s.config.name == name))
    };
    let mut plan = Plan {
        services: Vec::with_capacity(next.len()),
        removed: Vec::new(),
        per_worker: (0..workers).map(|_| Listeners::default()).collect(),
        closing: Vec::new(),
        announced: Vec::new(),
        next_id: reg.next_id,
        held: Vec::new(),
    };
    let mut new_slot = reg.services.len();
    for service in next {
        let running = slot_of(&service.name).and_then(|i| Some((i, reg.services[i].as_ref()?)));
        let slot = running.map_or_else(
            || {
                new_slot += 1;
                new_slot - 1
            },
            |(i, _)| i,
        );
        let kept = running.map_or(&[][..], |(_, s)| &s.listeners[..]);
        let listeners = plan_listeners(service, slot, kept, workers, mode, &mut plan, step)?;
        let planned = match running {
            Some((slot, running)) => {
                changed(running, slot, service, listeners, reg.sticky_key, &mut plan, step)?
            }
            None => {
                step(&Step::Registry(service.name.clone()))?;
                let mut ctl = registry::build_service(
                    service.clone(),
                    slot,
                    &mut plan.next_id,
                    reg.sticky_key,
                )
                .map_err(|error| ReloadError::Table { service: service.name.clone(), error })?;
                ctl.listeners = listeners;
                Planned::Added(Box::new(ctl))
            }
        };
        plan.services.push(planned);
    }
    for (i, s) in reg.services.iter().enumerate() {
        if let Some(s) = s.as_ref().filter(|s| !next.iter().any(|n| n.name == s.config.name)) {
            plan.closing.extend(s.listeners.iter().map(|l| (l.1, l.2)));
            plan.removed.push(i);
        }
    }
    Ok(plan)
}

/// A running service's listeners under `service`: the ones it keeps, and new ones bound now.
/// Those it no longer has go to `plan.closing`.
fn plan_listeners(
    service: &config::Service,
    slot: usize,
    kept: &[(SocketAddr, SocketAddr, bool)],
    workers: usize,
    mode: config::Listeners,
    plan: &mut Plan,
    step: &mut dyn FnMut(&Step) -> Result<(), ReloadError>,
) -> Result<Vec<(SocketAddr, SocketAddr, bool)>, ReloadError> {
    let keep = |want: &SocketAddr, udp: bool| {
        kept.iter().find(|(w, _, u)| w == want && *u == udp).copied()
    };
    let mut listeners = Vec::new();
    for &want in &service.listen {
        let (tcp, udp) = (service.protocol.tcp(), service.protocol.udp());
        let (tcp_kept, udp_kept) = (keep(&want, false), keep(&want, true));
        listeners.extend(tcp_kept.filter(|_| tcp));
        listeners.extend(udp_kept.filter(|_| udp));
        let need_tcp = tcp && tcp_kept.is_none();
        let need_udp = udp && udp_kept.is_none();
        if need_tcp || need_udp {
            // A port already bound by one transport is reused for the other.
            let at = tcp_kept.or(udp_kept).map_or(want, |(_, bound, _)| bound);
            step(&Step::Bind(want))?;
            let mode = need_tcp.then_some(mode);
            let udp = need_udp.then(|| registry::udp_buffers_of(service));
            let bound = proxy::bind(&[at], workers, mode, udp).map_err(ReloadError::Bind)?;
            let before = listeners.len();
            let (per_worker, held) = (&mut plan.per_worker, &mut plan.held);
            crate::hand_out(want, bound, slot, per_worker, &mut listeners, held);
            plan.announced.extend_from_slice(&listeners[before..]);
        }
    }
    for old in kept {
        if !listeners.contains(old) {
            plan.closing.push((old.1, old.2));
        }
    }
    Ok(listeners)
}

/// The plan for running service `running` at `slot` under its new configuration.
fn changed(
    running: &ServiceCtl,
    slot: usize,
    service: &config::Service,
    listeners: Vec<(SocketAddr, SocketAddr, bool)>,
    sticky_key: [u8; 16],
    plan: &mut Plan,
    step: &mut dyn FnMut(&Step) -> Result<(), ReloadError>,
) -> Result<Planned, ReloadError> {
    let mut backends = Vec::with_capacity(service.backends.len());
    let mut members = Vec::with_capacity(service.backends.len());
    for spec in &service.backends {
        let same = |b: &BackendCtl| b.state.name == spec.name && b.state.addr == spec.addr;
        match running.backends.iter().position(same) {
            Some(i) => {
                members.push((Arc::clone(&running.backends[i].state), spec.weight.get()));
                backends.push(Member::Kept(i, spec.clone()));
            }
            None => {
                let b = registry::backend_ctl(&mut plan.next_id, spec, service);
                members.push((Arc::clone(&b.state), b.weight.get()));
                backends.push(Member::Added(b));
            }
        }
    }
    let removed = running
        .backends
        .iter()
        .filter(|b| {
            !service.backends.iter().any(|s| s.name == b.state.name && s.addr == b.state.addr)
        })
        .map(|b| (b.state.id, b.state.name.clone()))
        .collect();
    step(&Step::Limiter(service.name.clone()))?;
    // New limits start counting afresh; sessions already open release on the limiter they were
    // counted on.
    let limiter =
        if registry::limits_of(&running.config.guard) == registry::limits_of(&service.guard) {
            running.limiter.clone()
        } else {
            registry::limiter_for(&service.guard, sticky_key)
        };
    step(&Step::Table(service.name.clone()))?;
    let snapshot = registry::snapshot(service, slot, members, &running.sticky, &limiter)
        .map_err(|error| ReloadError::Table { service: service.name.clone(), error })?;
    Ok(Planned::Changed(Box::new(Change {
        slot,
        config: service.clone(),
        backends,
        limiter,
        snapshot: Arc::new(snapshot),
        listeners,
        removed,
    })))
}

/// Apply `plan` to the registry and tell the workers. Nothing here can fail. Returns a summary
/// for logs and the API, and the listeners bound for it.
pub fn commit(
    reg: &mut Registry,
    plan: Plan,
) -> (Vec<String>, Vec<(SocketAddr, SocketAddr, bool)>) {
    let mut summary = Vec::new();
    reg.next_id = plan.next_id;
    for planned in plan.services {
        match planned {
            Planned::Changed(change) => {
                let Change { slot, config, backends, limiter, snapshot, listeners, removed } =
                    *change;
                let name = config.name.clone();
                let mut added = Vec::new();
                let Some(Some(s)) = reg.services.get_mut(slot) else { continue };
                let mut old: Vec<Option<BackendCtl>> =
                    std::mem::take(&mut s.backends).into_iter().map(Some).collect();
                for member in backends {
                    match member {
                        Member::Kept(i, spec) => {
                            // `prepare` matched each running backend to one spec at most.
                            let Some(mut b) = old.get_mut(i).and_then(Option::take) else {
                                continue;
                            };
                            b.weight = spec.weight;
                            b.state.set_max_conns(spec.max_conns);
                            b.checker.set_limits(config.health.rise, config.health.fall);
                            s.backends.push(b);
                        }
                        Member::Added(b) => {
                            added.push((b.state.name.clone(), b.state.addr));
                            s.backends.push(b);
                        }
                    }
                }
                let kill = config.health.on_down == config::OnDown::Kill;
                s.config = config;
                s.limiter = limiter;
                s.snapshot = Arc::clone(&snapshot);
                s.listeners = listeners;
                reg.workers.send(|| Command::Publish(Arc::clone(&snapshot)));
                for (b, addr) in added {
                    reg.event(format!("{name}/{b}: added at {addr} by reload"));
                }
                for (id, b) in removed {
                    reg.event(format!("{name}/{b}: removed by reload"));
                    if kill {
                        reg.kill(id);
                    }
                }
            }
            Planned::Added(ctl) => {
                let snapshot = Arc::clone(&ctl.snapshot);
                summary.push(format!("service {:?} added", ctl.config.name));
                let slot = snapshot.slot;
                if reg.services.len() <= slot {
                    reg.services.resize_with(slot + 1, || None);
                }
                reg.services[slot] = Some(*ctl);
                reg.workers.send(|| Command::Publish(Arc::clone(&snapshot)));
            }
        }
    }
    for i in plan.removed {
        let name = reg.services[i].take().map(|s| s.config.name).unwrap_or_default();
        reg.event(format!("service {name:?} removed by reload"));
        summary.push(format!("service {name:?} removed"));
    }
    // Closed listeners are not handed over any more; new ones are.
    reg.held.retain(|h| !plan.closing.contains(&(h.bound, h.udp)));
    reg.held.extend(plan.held);
    // Old sockets close before new ones open: a new socket on an address a closing one shares
    // (SO_REUSEPORT) must not be caught by the close.
    if !plan.closing.is_empty() {
        reg.workers.send(|| Command::Unlisten(plan.closing.clone()));
    }
    reg.listen(plan.per_worker);
    (summary, plan.announced)
}

#[cfg(test)]
mod tests {

    use super::*;

    const RUNNING: &str = r#"
        [[service]]
        name = "a"
        listen = ["127.0.0.1:0"]
        health-check = "off"
        max-conns-per-source = 5
        [[service.backend]]
        address = "127.0.0.1:9001"
        name = "a1"
        [[service.backend]]
        address = "127.0.0.1:9002"
        name = "a2"

        [[service]]
        name = "b"
        listen = ["127.0.0.2:0"]
        health-check = "off"
        [[service.backend]]
        address = "127.0.0.1:9003"
    "#;

    /// `a` re-weights a1, drops a2, adds a3 and changes its limits; `b` goes; `c` comes.
    const NEXT: &str = r#"
        [[service]]
        name = "a"
        listen = ["127.0.0.1:0"]
        health-check = "off"
        max-conns-per-source = 6
        [[service.backend]]
        address = "127.0.0.1:9001"
        name = "a1"
        weight = 3
        [[service.backend]]
        address = "127.0.0.1:9004"
        name = "a3"

        [[service]]
        name = "c"
        listen = ["127.0.0.3:0"]
        health-check = "off"
        [[service.backend]]
        address = "127.0.0.1:9005"
    "#;

    /// A registry of `RUNNING` with one worker link; returns it and the worker's end.
    fn running() -> (Registry, crossbeam_channel::Receiver<Command>, mio::Poll) {
        let config = config::file::load_str(RUNNING).unwrap();
        let shared = Arc::new(proxy::Shared::new(8, 0, 0, [0; 16], None));
        let mut reg = Registry::new(&config.services, shared, [3; 16]).unwrap();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        reg.workers.links.push((tx, waker));
        (reg, rx, poll)
    }

    /// A service as a reload may change it: configuration, backends (id, weight), snapshot.
    type ServiceView = (config::Service, Vec<(BackendId, u32)>, usize);

    /// What a reload may change, to compare before and after.
    fn view(reg: &Registry) -> Vec<Option<ServiceView>> {
        reg.services
            .iter()
            .map(|s| {
                let s = s.as_ref()?;
                let ids = s.backends.iter().map(|b| (b.state.id, b.weight.get())).collect();
                Some((s.config.clone(), ids, Arc::as_ptr(&s.snapshot) as usize))
            })
            .collect()
    }

    #[test]
    fn a_failure_at_any_step_of_prepare_changes_nothing() {
        let _fds = crate::test_fds::shared();
        let (mut reg, rx, _poll) = running();
        let next = config::file::load_str(NEXT).unwrap().services;
        let mode = config::Listeners::Shared;
        let mut steps = Vec::new();
        let clean = prepare(&reg, &next, 1, mode, &mut |s| {
            steps.push(s.clone());
            Ok(())
        });
        drop(clean.unwrap());
        let kinds = |f: fn(&Step) -> bool| steps.iter().filter(|s| f(s)).count();
        assert_eq!(kinds(|s| matches!(s, Step::Bind(_))), 2, "{steps:?}");
        assert_eq!(kinds(|s| matches!(s, Step::Limiter(_))), 1, "{steps:?}");
        assert_eq!(kinds(|s| matches!(s, Step::Table(_))), 1, "{steps:?}");
        assert_eq!(kinds(|s| matches!(s, Step::Registry(_))), 1, "{steps:?}");
        let before = view(&reg);
        let next_id = reg.next_id;
        for (k, at) in steps.iter().enumerate() {
            let mut n = 0;
            let failed = prepare(&reg, &next, 1, mode, &mut |s| {
                n += 1;
                if n - 1 == k {
                    return Err(ReloadError::Injected(s.clone()));
                }
                Ok(())
            });
            match failed {
                Err(ReloadError::Injected(step)) => assert_eq!(&step, at),
                Err(other) => panic!("step {k} ({at:?}): {other}"),
                Ok(_) => panic!("step {k} ({at:?}): the fault was ignored"),
            }
            assert!(view(&reg) == before, "step {k} ({at:?}) changed the registry");
            assert_eq!(reg.next_id, next_id);
            assert!(rx.try_recv().is_err(), "step {k} ({at:?}) told the workers something");
        }
        // The same reload without a fault commits: a1 re-weighted, a2 gone, a3 new, b gone, c
        // new, and the workers hear of it.
        let plan = prepare(&reg, &next, 1, mode, &mut |_| Ok(())).unwrap();
        let (summary, announced) = commit(&mut reg, plan);
        let a = reg.services[0].as_ref().unwrap();
        let names: Vec<(&str, u32)> =
            a.backends.iter().map(|b| (b.state.name.as_str(), b.weight.get())).collect();
        assert_eq!(names, [("a1", 3), ("a3", 1)]);
        assert_eq!(a.backends[0].state.id, 0, "a1 kept its identity");
        assert_eq!(a.backends[1].state.id, next_id, "a3 took the next id");
        assert!(reg.services[1].is_none(), "b removed");
        assert_eq!(reg.services[2].as_ref().unwrap().config.name, "c");
        assert_eq!(announced.len(), 2);
        assert!(summary.iter().any(|s| s.contains("\"c\" added")), "{summary:?}");
        let told: Vec<Command> = rx.try_iter().collect();
        let published = told.iter().filter(|c| matches!(c, Command::Publish(_))).count();
        assert_eq!(published, 2, "{told:?}");
        assert!(told.iter().any(|c| matches!(c, Command::Listen(_))));
    }

    #[test]
    fn reload_errors_answer_the_right_status() {
        let _fds = crate::test_fds::shared();
        let in_use = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = in_use.local_addr().unwrap();
        let bind = proxy::bind(&[addr], 1, Some(config::Listeners::PerWorker), None).unwrap_err();
        assert_eq!(ReloadError::Bind(bind).status(), 409);
        assert_eq!(ReloadError::NoFile.status(), 400);
        let bad = config::file::load_str("workers = 0").unwrap_err();
        assert_eq!(ReloadError::Config(bad).status(), 400);
        assert_eq!(ReloadError::NeedsRestart("x".into()).status(), 400);
    }
}
