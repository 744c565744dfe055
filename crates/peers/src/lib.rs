//! Peers (issue 14): tether instances behind ECMP share their sticky-table changes, so that a
//! client the network moves from one instance to another keeps its backend.
//!
//! This crate is the protocol, pure: the frames on the wire ([`wire`]), the handshake in which
//! both sides prove they know the shared key without sending it ([`auth`]), and the rule that
//! decides between two changes of one pin ([`Version`]). Sockets, threads and the sticky table
//! are the caller's.

pub mod auth;
pub mod wire;

use std::cmp::Ordering;

/// When a pin last changed and on which instance: the newest change wins, by wall-clock time,
/// then by instance name (so that every instance picks the same winner from the same two).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Unix milliseconds of the change, on the instance that made it.
    pub unix_ms: u64,
    /// That instance's name.
    pub origin: String,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.unix_ms, &self.origin).cmp(&(other.unix_ms, &other.origin))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ms: u64, origin: &str) -> Version {
        Version { unix_ms: ms, origin: origin.into() }
    }

    #[test]
    fn the_newest_change_wins_then_the_greater_name() {
        assert!(v(2, "a") > v(1, "b"), "later wins whatever the name");
        assert!(v(1, "b") > v(1, "a"), "same time: the name decides");
        assert_eq!(v(1, "a").cmp(&v(1, "a")), Ordering::Equal);
        // A re-pin after a failover (later) beats the pin it replaces.
        let mut seen = [v(5, "b"), v(7, "a"), v(6, "c")];
        seen.sort();
        assert_eq!(seen.last(), Some(&v(7, "a")));
    }
}
