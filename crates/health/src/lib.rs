//! Backend health: the rise/fall state machine and the admin states. Pure: no I/O, no clock.
//!
//! A backend's **health** is what probes and the data path observe (`up`/`down`); its **admin
//! state** is what the operator asked for (`ready`/`drain`/`maint`). They are independent: a
//! drained backend is still probed, and a down backend keeps its admin state.
//!
//! ```
//! use tether_health::{Checker, Health};
//! let mut c = Checker::new(2, 3); // rise 2, fall 3; starts up
//! assert_eq!(c.observe(false), None);
//! assert_eq!(c.observe(false), None);
//! assert_eq!(c.observe(false), Some(Health::Down)); // third failure in a row
//! assert_eq!(c.observe(true), None);
//! assert_eq!(c.observe(true), Some(Health::Up)); // second success in a row
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::str::FromStr;

/// What the observations say of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Taking sessions.
    Up,
    /// `fall` failures in a row: new sessions and pinned clients go elsewhere.
    Down,
}

impl Health {
    /// `up` or `down`, as the API and metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator asked of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Serving: new clients and pinned clients.
    Ready,
    /// No new clients; clients pinned to it keep coming back to it while their pin lasts, and
    /// open sessions continue. Pins end by the sticky timeout after a client's last session.
    Drain,
    /// No new sessions at all: pinned clients move to the next backend of their order (and are
    /// re-pinned there); open sessions continue.
    Maint,
}

impl AdminState {
    /// `ready`, `drain` or `maint`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// A compact form for an atomic.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The inverse of [`to_u8`](Self::to_u8); unknown values read as `Maint` (the safe side).
    pub fn from_u8(v: u8) -> AdminState {
        match v {
            0 => AdminState::Ready,
            1 => AdminState::Drain,
            _ => AdminState::Maint,
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdminState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            _ => Err(format!("unknown state {s:?} (expected ready, drain or maint)")),
        }
    }
}

/// Rise/fall counting for one backend (HAProxy's `rise`/`fall`).
///
/// Starts `Up`: a freshly configured backend takes traffic at once, and passive failures (a
/// refused connect) take it out quickly if it is not there. `fall` failures in a row take an up
/// backend down; `rise` successes in a row bring a down one back. A result that agrees with the
/// current state resets the streak of the other kind.
#[derive(Debug, Clone)]
pub struct Checker {
    rise: u32,
    fall: u32,
    state: Health,
    /// Consecutive results against the current state.
    streak: u32,
}

impl Checker {
    /// A checker that starts up. `rise` and `fall` below 1 are taken as 1.
    pub fn new(rise: u32, fall: u32) -> Checker {
        Checker { rise: rise.max(1), fall: fall.max(1), state: Health::Up, streak: 0 }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Take up where another process left off (an upgrade): this state, no streak.
    pub fn resume(&mut self, state: Health) {
        self.state = state;
        self.streak = 0;
    }

    /// Change rise and fall (a reload) without forgetting the state.
    pub fn set_limits(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Record one result (`true`: the backend answered). Returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let against = match self.state {
            Health::Up => !ok,
            Health::Down => ok,
        };
        if !against {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let limit = match self.state {
            Health::Up => self.fall,
            Health::Down => self.rise,
        };
        if self.streak < limit {
            return None;
        }
        self.streak = 0;
        self.state = match self.state {
            Health::Up => Health::Down,
            Health::Down => Health::Up,
        };
        Some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut c = Checker::new(2, 3);
        for _ in 0..10 {
            assert_eq!(c.observe(false), None);
            assert_eq!(c.observe(false), None);
            assert_eq!(c.observe(true), None);
        }
        assert_eq!(c.state(), Health::Up);
    }

    #[test]
    fn rise_one_and_fall_one_flip_on_every_change() {
        let mut c = Checker::new(1, 1);
        assert_eq!(c.observe(false), Some(Health::Down));
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), Some(Health::Up));
        let mut z = Checker::new(0, 0);
        assert_eq!(z.observe(false), Some(Health::Down));
    }

    #[test]
    fn admin_states_round_trip() {
        for s in [AdminState::Ready, AdminState::Drain, AdminState::Maint] {
            assert_eq!(AdminState::from_u8(s.to_u8()), s);
            assert_eq!(s.as_str().parse::<AdminState>(), Ok(s));
        }
        assert!("up".parse::<AdminState>().unwrap_err().contains("expected ready"));
        assert_eq!(AdminState::from_u8(200), AdminState::Maint);
    }

    proptest! {
        /// Against a model: the state flips exactly when the last `fall` (or `rise`) results
        /// all disagree with it, counting only results since the last flip.
        #[test]
        fn matches_the_streak_model(rise in 1u32..6, fall in 1u32..6,
                                    results in proptest::collection::vec(any::<bool>(), 0..200)) {
            let mut c = Checker::new(rise, fall);
            let (mut up, mut run) = (true, 0u32);
            for ok in results {
                let flipped = c.observe(ok);
                if ok != up { run += 1 } else { run = 0 }
                let limit = if up { fall } else { rise };
                let expect = if run == limit {
                    up = !up;
                    run = 0;
                    Some(if up { Health::Up } else { Health::Down })
                } else {
                    None
                };
                prop_assert_eq!(flipped, expect);
                prop_assert_eq!(c.state() == Health::Up, up);
            }
        }
    }
}
