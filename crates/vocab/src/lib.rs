//! tether's vocabulary: the small types the other crates share, so that no logic crate depends
//! on another only for a type (docs/lexicon.md names each thing once).
//!
//! - [`AffinityKey`]: what a client is pinned by (its IP, v4 held as `::ffff:a.b.c.d`), and
//!   [`BackendId`], a backend's identity within a process;
//! - [`KeyedHasher`]: the keyed SipHash every table of attacker-chosen keys uses (F9);
//! - [`Cidr`]: a range of client addresses;
//! - [`duration`]: durations as the flags and the config file write them (`250ms`, `1h30m`);
//! - the settings' enums: [`Affinity`], [`Protocol`], [`Splice`], [`Listeners`],
//!   [`ProxyVersion`], [`OnDown`].
//!
//! It does no I/O, reads no clock and parses no file.
//!
//! ```
//! use tether_vocab::{AffinityKey, Cidr};
//!
//! let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
//! let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
//! assert_eq!(AffinityKey::from_ip(v4), AffinityKey::from_ip(mapped));
//! let net: Cidr = "10.0.0.0/8".parse().unwrap();
//! assert!(net.contains(v4));
//! ```

#![forbid(unsafe_code)]

pub mod cidr;
pub mod duration;
mod hash;
mod key;
pub mod session;
pub mod time;

pub use cidr::{Cidr, CidrError};
pub use hash::KeyedHasher;
pub use key::{AffinityKey, BackendId, Prefix};
pub use session::SessionKey;

/// What a client is pinned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Every connection of one client IP goes to one backend (sticky table).
    Source,
    /// Each connection is hashed on its own 5-tuple; no sticky entry.
    FiveTuple,
}

/// Which transports a service's listeners take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Both,
}

impl Protocol {
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Both)
    }

    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Both)
    }
}

/// Which byte pump sessions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// `splice(2)` through a pipe per direction where the kernel supports it.
    Auto,
    /// Userspace buffers only.
    Off,
}

/// Whether established UDP flows are forwarded by the kernel (the offload program).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpOffload {
    /// Where the kernel and tether's privileges allow it; otherwise user space, and the log,
    /// `/api/status` and `/metrics` say why.
    Auto,
    /// Required: the start fails, with the reason, if it cannot work.
    On,
    /// Every datagram through tether's sockets.
    Off,
}

/// How the workers share a TCP listen address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listeners {
    /// One socket, in every worker's epoll with `EPOLLEXCLUSIVE`: the kernel wakes one idle
    /// worker per connection, so a stalled or busy worker holds no one up.
    Shared,
    /// One `SO_REUSEPORT` socket per worker: the kernel hashes each connection to one of them,
    /// whether or not that worker is free.
    PerWorker,
}

/// What happens to a backend's open sessions and flows when it goes down (health) or into
/// `maint` (admin), like HAProxy's `on-marked-down shutdown-sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDown {
    /// They run on until they end by themselves (the default: never cut a live session).
    Keep,
    /// They are reset at once, so clients notice and reconnect to a backend that is up.
    Kill,
}

/// A PROXY protocol version (haproxy's spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}
