//! Admission control for tether: which clients may open sessions and flows, and how many.
//!
//! This is a pure core, like `ring`, `conntrack` and `health`: it never reads the clock (calls
//! take `now` in milliseconds from an epoch the caller chooses), does no I/O and starts no
//! threads. It decides; the caller (`proxy`) refuses the connection or drops the datagram and
//! counts why. It does not parse config files (`config` turns text into [`Cidr`]s and a
//! [`LimitConfig`]) and does not limit backends (per-backend caps belong to the proxy).
//!
//! - [`Acl`]: allow and deny lists of [`Cidr`] ranges. Deny wins over allow; IPv4-mapped IPv6
//!   clients (`::ffff:a.b.c.d`) meet the v4 rules (FAILURE-MODES.md F14). Immutable; a lookup
//!   costs a binary search per prefix length in use, however many rules there are.
//! - [`Limiter`]: per-source open sessions, new sessions per second and new UDP flows per
//!   second, in a bounded table shared by the workers under a keyed hash (F9). When the table
//!   is full, idle sources make room and unknown sources are otherwise refused (F15).
//!
//! # Example
//!
//! A worker checks the ACL, then the limiter, before connecting to a backend, and tells the
//! limiter when the session ends; a control thread sweeps about once a second.
//!
//! ```
//! use std::net::IpAddr;
//! use std::sync::Arc;
//!
//! use tether_guard::{Acl, Cidr, LimitConfig, Limiter, Verdict};
//!
//! let acl = Acl::new(vec![], vec!["10.0.0.0/8".parse::<Cidr>()?]);
//! let mapped: IpAddr = "::ffff:10.1.2.3".parse()?;
//! assert!(!acl.allows(mapped)); // a v4 client on a dual-stack listener is still denied
//!
//! // The daemon draws the hash key at random once per process; a fixed one does for an example.
//! let config =
//!     LimitConfig { max_conns: Some(2), conn_rate: Some(10), flow_rate: None, capacity: 100_000 };
//! let limiter = Arc::new(Limiter::new(config, [7; 16]));
//! let client: IpAddr = "192.0.2.10".parse()?;
//! assert!(acl.allows(client));
//! assert_eq!(limiter.open_session(client, 0), Verdict::Allow);
//! assert_eq!(limiter.open_session(client, 0), Verdict::Allow);
//! assert_eq!(limiter.open_session(client, 0), Verdict::OverConns); // refuse and count it
//! limiter.close_session(client, 5_000);
//! assert_eq!(limiter.open_session(client, 5_000), Verdict::Allow);
//!
//! // Sessions over, buckets refilled: the source is forgotten.
//! limiter.close_session(client, 6_000);
//! limiter.close_session(client, 6_000);
//! assert_eq!(limiter.sweep(7_000), 1);
//! assert!(limiter.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acl;
mod limiter;

pub use acl::{Acl, Cidr, CidrError};
pub use limiter::{LimitConfig, Limiter, LimiterStats, Verdict};
