//! Connection tracking for tether: the sticky table that pins each client to a backend, and the
//! per-worker UDP flow table.
//!
//! This is a pure core, like `ring` and `health`: it never reads the clock (every call takes
//! `now` in milliseconds from an epoch the caller chooses), does no I/O and starts no threads.
//! It does not choose backends (the Maglev table in `ring` does), does not know whether a
//! backend is healthy (`health`), and does not own sockets (`proxy`: a flow holds whatever value
//! the worker gives it, e.g. the slot of its backend socket).
//!
//! - [`AffinityKey`]: a client IP in canonical form (v4 and `::ffff:` mapped v4 are one key).
//! - [`Sticky`]: affinity key -> backend, shared by all workers as an `Arc<Sticky>`. Entries
//!   count their client's live sessions and expire `timeout_ms` after the last one closes; the
//!   table is capped and, when full, reclaims expired then idle entries, never live ones.
//! - [`FlowTable`]: one worker's UDP flows, (client, listener) -> backend and the caller's value,
//!   with idle expiry. All workers' tables share one process-wide cap, an `Arc<`[`FlowBudget`]`>`;
//!   when it is exhausted a new flow may take the slot of an expired flow, never an active one.
//! - [`KeyedHasher`]: SipHash-1-3 under a per-process random key, against hash flooding.
//!
//! # Example
//!
//! A worker consults the table on a new session, attaches the session it opens and detaches it
//! when it closes; a control thread sweeps about once a second.
//!
//! ```
//! use std::net::IpAddr;
//! use std::sync::Arc;
//!
//! use tether_conntrack::{AffinityKey, Attach, Sticky, StickyConfig};
//!
//! // The daemon draws the hash key at random once per process; a fixed one does for an example.
//! let config = StickyConfig { capacity: 100_000, timeout_ms: 30_000 };
//! let sticky = Arc::new(Sticky::new(config, [7; 16]));
//!
//! let client = AffinityKey::from_ip("192.0.2.10".parse::<IpAddr>().unwrap());
//! assert_eq!(sticky.lookup(client, 0), None); // unknown client: the Maglev walk picks, say, 3
//! assert_eq!(sticky.attach(client, 3, 0), Attach::Pinned);
//!
//! // The same client on a dual-stack listener lands on the same entry.
//! let mapped = AffinityKey::from_ip("::ffff:192.0.2.10".parse::<IpAddr>().unwrap());
//! assert_eq!(sticky.lookup(mapped, 5_000), Some(3));
//!
//! // The session closes at t = 10 s: the pin lives 30 s more, then a sweep removes it.
//! sticky.detach(client, 10_000);
//! assert_eq!(sticky.lookup(client, 39_999), Some(3));
//! assert_eq!(sticky.lookup(client, 40_000), None);
//! assert_eq!(sticky.sweep(40_000), 1);
//! assert!(sticky.is_empty());
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod flow;
pub mod state;
mod sticky;
#[doc(hidden)]
pub mod testutil;

pub use flow::{
    Admit, Expired, Flow, FlowBudget, FlowKey, FlowStats, FlowTable, Inserted, Refused,
};
pub use sticky::{Attach, EntryView, Sticky, StickyConfig, StickyStats, Watch};
pub use vocab::{AffinityKey, BackendId, KeyedHasher};
