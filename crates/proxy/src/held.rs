//! What a TCP session holds of shared resources, as values that give themselves back when
//! dropped: a session that ends by any path releases all of it, and no path has a flag to
//! forget.
//!
//! | value | held from | gives back |
//! |---|---|---|
//! | [`Place`] | accept | a place under `--max-conns` (`Shared::active`) |
//! | [`SourceCount`] | admission | the per-source limiter's count of open sessions |
//! | [`Reservation`] | each connect attempt | a place under the backend's `max-conns` |
//! | [`Live`] | the backend's handshake | the backend's open-sessions gauge |
//! | [`Pinned`] | the backend's handshake (a flow: its making) | the sticky entry's live-session count |
//! | [`FlowLive`] | a UDP flow's making | the backend's open-flows gauge |

use std::net::IpAddr;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::Arc;

use conntrack::{AffinityKey, Sticky};

use crate::{BackendState, Shared};

/// A place under `--max-conns`.
#[derive(Debug)]
pub struct Place(Arc<Shared>);

impl Place {
    /// A place, if fewer than `--max-conns` sessions (and pending connections) hold one.
    pub fn take(shared: &Arc<Shared>) -> Option<Place> {
        if shared.active.fetch_add(1, AcqRel) >= shared.max_conns {
            shared.active.fetch_sub(1, AcqRel);
            return None;
        }
        Some(Place(Arc::clone(shared)))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, AcqRel);
    }
}

/// One open session of a source, as its service's per-source limiter counts it.
#[derive(Debug)]
pub struct SourceCount {
    limiter: Arc<guard::Limiter>,
    ip: IpAddr,
    clock: Arc<Shared>,
}

impl SourceCount {
    /// Hold the count `limiter` took for `ip` (its `open_session` allowed it).
    pub fn new(limiter: Arc<guard::Limiter>, ip: IpAddr, clock: Arc<Shared>) -> SourceCount {
        SourceCount { limiter, ip, clock }
    }
}

impl Drop for SourceCount {
    fn drop(&mut self) {
        self.limiter.close_session(self.ip, self.clock.clock_ms());
    }
}

/// A place under a backend's `max-conns`, for a connect attempt and then the session.
#[derive(Debug)]
pub struct Reservation(Arc<BackendState>);

impl Reservation {
    /// A place, if the backend has room (another worker may have taken the last one).
    pub fn take(backend: &Arc<BackendState>) -> Option<Reservation> {
        backend.try_reserve().then(|| Reservation(Arc::clone(backend)))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The backend's gauge of open sessions counts this one.
#[derive(Debug)]
pub struct Live(Arc<BackendState>);

impl Live {
    pub fn new(backend: &Arc<BackendState>) -> Live {
        backend.sessions.fetch_add(1, Relaxed);
        backend.sessions_total.fetch_add(1, Relaxed);
        Live(Arc::clone(backend))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
    }
}

/// The backend's gauge of open UDP flows counts this one.
#[derive(Debug)]
pub struct FlowLive(Arc<BackendState>);

impl FlowLive {
    pub fn new(backend: &Arc<BackendState>) -> FlowLive {
        backend.flows.fetch_add(1, Relaxed);
        backend.flows_total.fetch_add(1, Relaxed);
        FlowLive(Arc::clone(backend))
    }
}

impl Drop for FlowLive {
    fn drop(&mut self) {
        self.0.flows.fetch_sub(1, Relaxed);
    }
}

/// The client's sticky entry counts this session as live (the pin cannot expire under it).
#[derive(Debug)]
pub struct Pinned {
    sticky: Arc<Sticky>,
    key: AffinityKey,
    clock: Arc<Shared>,
}

impl Pinned {
    /// Hold the live count `sticky.attach` took for `key`.
    pub fn new(sticky: Arc<Sticky>, key: AffinityKey, clock: Arc<Shared>) -> Pinned {
        Pinned { sticky, key, clock }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.sticky.detach(self.key, self.clock.clock_ms());
    }
}

#[cfg(test)]
mod tests {

    use conntrack::{Attach, StickyConfig};

    use super::*;

    fn shared(max_conns: usize) -> Arc<Shared> {
        Arc::new(Shared::new(max_conns, 0, 0, [0; 16], None))
    }

    #[test]
    fn every_value_gives_back_what_it_took_when_dropped() {
        let shared = shared(2);
        let (a, b) = (Place::take(&shared).unwrap(), Place::take(&shared).unwrap());
        assert!(Place::take(&shared).is_none(), "a third place under --max-conns 2");
        drop(a);
        let c = Place::take(&shared).unwrap();
        drop((b, c));
        assert_eq!(shared.active.load(Relaxed), 0);

        let backend = Arc::new(BackendState::new(0, "b".into(), "127.0.0.1:1".parse().unwrap()));
        backend.set_max_conns(std::num::NonZeroU32::new(1));
        let r = Reservation::take(&backend).unwrap();
        assert!(Reservation::take(&backend).is_none());
        drop(r);
        assert!(Reservation::take(&backend).is_some(), "the place came back");

        let live = Live::new(&backend);
        assert_eq!(backend.sessions.load(Relaxed), 1);
        drop(live);
        assert_eq!(backend.sessions.load(Relaxed), 0);
        assert_eq!(backend.sessions_total.load(Relaxed), 1);

        let sticky = Arc::new(Sticky::new(StickyConfig { capacity: 4, timeout_ms: 10 }, [1; 16]));
        let key = AffinityKey::from_ip("10.0.0.1".parse().unwrap());
        assert!(matches!(sticky.attach(key, 0, 0), Attach::Pinned));
        let pinned = Pinned::new(Arc::clone(&sticky), key, Arc::clone(&shared));
        assert_eq!(sticky.get(key, 0).unwrap().live, 1);
        drop(pinned);
        assert_eq!(sticky.get(key, 0).unwrap().live, 0);

        let limits = guard::LimitConfig {
            max_conns: Some(1),
            conn_rate: None,
            flow_rate: None,
            capacity: 4,
        };
        let limiter = Arc::new(guard::Limiter::new(limits, [2; 16]));
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(limiter.open_session(ip, 0), guard::Verdict::Allow);
        let count = SourceCount::new(Arc::clone(&limiter), ip, Arc::clone(&shared));
        assert_eq!(limiter.open_session(ip, 0), guard::Verdict::OverConns);
        drop(count);
        assert_eq!(limiter.open_session(ip, 0), guard::Verdict::Allow);
    }
}
