//! Test kit for `tether`: backends, clients, data checks and a process harness for black-box
//! tests and for the `tether-bench` tool.
//!
//! This is test tooling, not the data plane: it uses std threads and blocking sockets, one thread
//! per connection, and trades speed for plain code. It talks to loopback addresses only
//! (`127.x.y.z`; distinct source addresses stand for distinct clients). It does not know how
//! `tether` balances or what its flags mean; tests say that.
//!
//! - [`Backend`]: a named TCP server speaking a one-line command protocol (`name`, `hold`,
//!   `echo`, `sink`, `source N`, `source-then-read N`, `reset`, `await`) that logs every
//!   connection as an [`Event`].
//! - Data: [`pattern`] fills a deterministic byte stream, [`Digest`] checks it for corruption.
//! - Clients: [`connect_from`] a chosen source address, [`ask_name`], [`read_to_end_digest`],
//!   [`write_pattern`], [`send_reset`], [`client_ip`].
//! - [`Tether`]: starts the real binary, waits for its `ready` line and kills it on drop.
//! - [`blackhole()`]: an address where a connect hangs, for connect-timeout tests.
//! - [`survey()`]: asks many sources for their backend over several rounds, and
//!   [`StopSignals`] waits for SIGINT or SIGTERM (both for `tether-bench`).
//!
//! Every thread or process started here is stopped by a `Drop`, and nothing waits by sleeping:
//! waits poll a condition against a deadline ([`wait_until`], [`Backend::wait_for`]).
//!
//! ```
//! use std::time::Duration;
//! use tether_testkit::{ask_name, client_ip, Backend, Outcome};
//!
//! let backend = Backend::start("alpha", "127.0.0.1:0".parse()?)?;
//! assert_eq!(ask_name(client_ip(0), backend.addr())?, "alpha");
//! let served = |log: &[tether_testkit::Event]| {
//!     log.iter().any(|e| e.command == "name" && matches!(e.outcome, Outcome::Sent { .. }))
//! };
//! assert!(backend.wait_for(served, Duration::from_secs(10)));
//! assert_eq!(backend.log()[0].peer.ip(), client_ip(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)] // one ioctl in sys.rs, allowed there

mod backend;
mod blackhole;
mod browser;
mod client;
pub mod cluster;
mod data;
mod freeze;
mod http;
mod journal;
mod load;
mod netns;
mod process;
mod signals;
mod survey;
mod sys;
mod udp;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub use backend::{Backend, Event, Outcome};
pub use blackhole::{blackhole, Blackhole};
pub use browser::{chromium, Browser};
pub use client::{
    ask_name, ask_peer, client_ip, client_ips, connect_from, hold, parse_sink_reply, read_line,
    read_to_end_digest, send_command, send_reset, write_pattern, CLIENT_IPS, CONNECT_TIMEOUT,
    IO_TIMEOUT,
};
pub use data::{digest_of, digest_of_pattern, hex, pattern, Digest};
pub use freeze::FrozenThread;
pub use http::{http, HttpReply};
pub use load::{connrate, udp_pingpong, LoadReport};
pub use netns::{
    inject_udp4, inside_own_netns, netstat, set_local_port_range, sh, snmp, udp4_checksum,
    Namespace,
};
pub use nix::sys::signal::Signal;
pub use process::{no_probes, run_to_exit, Exit, Tether, READY_TIMEOUT, TERM_GRACE};
pub use signals::StopSignals;
pub use survey::{survey, Survey, Tally};
pub use udp::{udp_ask, udp_client, UdpBackend};

/// Pause between two checks of a polled condition: short against the timeouts used in tests,
/// long enough that a waiting thread costs nothing next to the process under test.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Polls `condition` until it holds (true) or `timeout` has passed (false).
///
/// The condition is checked once more at the deadline, so a zero timeout is a single check.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// Locks `mutex` even if a thread panicked while holding it: every structure kept under a lock
/// here stays consistent between statements (a push, an insert), so the data is still good, and a
/// panicking test should not take the harness's Drop down with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
