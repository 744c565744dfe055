//! The last ten minutes of every backend, for the status page's sparklines and drain
//! estimates (`GET /api/history`): a sample every [`EVERY`] of each backend's open sessions,
//! session and byte totals, flows and pinned clients, kept in a ring of [`KEEP`] samples. The
//! supervisor takes a sample from its one-second loop; nothing on the data path changes.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};

use crate::registry::BackendView;

/// Time between two samples.
pub const EVERY: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes.
pub const KEEP: usize = 120;

/// One backend at one sample.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    service: String,
    name: String,
    state: &'static str,
    sessions: u64,
    sessions_total: u64,
    bytes_total: u64,
    flows: u64,
    flows_total: u64,
    sticky_clients: u64,
}

/// Samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<(u64, Vec<Point>)>,
}

impl History {
    /// Records the backends as they are at `unix_ms`; the oldest sample goes past [`KEEP`].
    pub fn record(&mut self, unix_ms: u64, backends: &[BackendView]) {
        let points = backends
            .iter()
            .map(|b| Point {
                service: b.service.clone(),
                name: b.name.clone(),
                state: b.state.as_str(),
                sessions: b.sessions,
                sessions_total: b.sessions_total,
                bytes_total: b.bytes_in + b.bytes_out + b.datagram_bytes_in + b.datagram_bytes_out,
                flows: b.flows,
                flows_total: b.flows_total,
                sticky_clients: b.sticky_clients as u64,
            })
            .collect();
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back((unix_ms, points));
    }

    /// `GET /api/history`: the sample times, and per backend (every one seen in the window,
    /// in order of first appearance) a series per figure, `null` where it did not exist.
    /// Rates are per second over the interval before each sample (`null` for the first).
    pub fn json(&self) -> Value {
        let times: Vec<u64> = self.samples.iter().map(|(t, _)| *t).collect();
        let mut keys: Vec<(String, String)> = Vec::new();
        let mut seen: std::collections::HashSet<(&str, &str)> = Default::default();
        for (_, points) in &self.samples {
            for p in points {
                if seen.insert((p.service.as_str(), p.name.as_str())) {
                    keys.push((p.service.clone(), p.name.clone()));
                }
            }
        }
        // Each sample indexed once: a lookup per (sample, backend) would otherwise scan the
        // sample, and the registry lock is held while this runs.
        let indexed: Vec<HashMap<(&str, &str), &Point>> = self
            .samples
            .iter()
            .map(|(_, points)| {
                points.iter().map(|p| ((p.service.as_str(), p.name.as_str()), p)).collect()
            })
            .collect();
        let at = |i: usize, key: &(String, String)| {
            indexed[i].get(&(key.0.as_str(), key.1.as_str())).copied()
        };
        let backends: Vec<Value> = keys
            .iter()
            .map(|key| {
                let gauge = |f: fn(&Point) -> u64| -> Vec<Value> {
                    (0..self.samples.len())
                        .map(|i| at(i, key).map_or(Value::Null, |p| json!(f(p))))
                        .collect()
                };
                let rate = |f: fn(&Point) -> u64| -> Vec<Value> {
                    (0..self.samples.len())
                        .map(|i| {
                            let (Some(now), Some(before)) =
                                (at(i, key), i.checked_sub(1).and_then(|j| at(j, key)))
                            else {
                                return Value::Null;
                            };
                            let seconds = (times[i].saturating_sub(times[i - 1])) as f64 / 1000.0;
                            if seconds <= 0.0 {
                                return Value::Null;
                            }
                            json!((f(now).saturating_sub(f(before))) as f64 / seconds)
                        })
                        .collect()
                };
                let state = (0..self.samples.len()).rev().find_map(|i| at(i, key)).map(|p| p.state);
                json!({
                    "service": key.0,
                    "name": key.1,
                    "state": state,
                    "sessions": gauge(|p| p.sessions),
                    "sticky_clients": gauge(|p| p.sticky_clients),
                    "flows": gauge(|p| p.flows),
                    "new_sessions_per_second": rate(|p| p.sessions_total),
                    "new_flows_per_second": rate(|p| p.flows_total),
                    "bytes_per_second": rate(|p| p.bytes_total),
                })
            })
            .collect();
        json!({
            "interval_ms": EVERY.as_millis() as u64,
            "times_unix_ms": times,
            "backends": backends,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        name: &str,
        sessions: u64,
        total: u64,
        bytes: u64,
        state: health::AdminState,
    ) -> BackendView {
        BackendView {
            service: "db".into(),
            name: name.into(),
            address: "127.0.0.1:1".parse().expect("addr"),
            state,
            health: health::Health::Up,
            weight: 1,
            max_conns: None,
            sessions,
            sessions_total: total,
            flows: 0,
            flows_total: 0,
            sticky_clients: sessions as usize * 2,
            failures: 0,
            failing: false,
            bytes_in: bytes,
            bytes_out: bytes,
            datagrams_in: 0,
            datagrams_out: 0,
            datagram_bytes_in: 0,
            datagram_bytes_out: 0,
        }
    }

    #[test]
    fn rates_come_from_consecutive_totals_and_a_missing_backend_is_null() {
        use health::AdminState::{Drain, Ready};
        let mut h = History::default();
        h.record(10_000, &[view("b1", 3, 100, 1000, Ready)]);
        h.record(15_000, &[view("b1", 4, 150, 6000, Ready), view("b2", 1, 10, 0, Ready)]);
        h.record(20_000, &[view("b1", 2, 160, 6000, Drain)]);
        let j = h.json();
        assert_eq!(j["times_unix_ms"], json!([10_000, 15_000, 20_000]));
        let b1 = &j["backends"][0];
        assert_eq!(b1["name"], "b1");
        assert_eq!(b1["state"], "drain", "the latest state");
        assert_eq!(b1["sessions"], json!([3, 4, 2]));
        assert_eq!(b1["sticky_clients"], json!([6, 8, 4]));
        assert_eq!(b1["new_sessions_per_second"], json!([null, 10.0, 2.0]));
        assert_eq!(b1["bytes_per_second"], json!([null, 2000.0, 0.0]), "both directions");
        let b2 = &j["backends"][1];
        assert_eq!(b2["sessions"], json!([null, 1, null]));
        assert_eq!(b2["new_sessions_per_second"], json!([null, null, null]));
    }

    #[test]
    fn the_ring_keeps_ten_minutes() {
        let mut h = History::default();
        for i in 0..(KEEP as u64 + 30) {
            h.record(i * 5000, &[view("b1", i, i, 0, health::AdminState::Ready)]);
        }
        let j = h.json();
        let times = j["times_unix_ms"].as_array().expect("times");
        assert_eq!(times.len(), KEEP);
        assert_eq!(times[0], json!(30 * 5000));
        assert_eq!(j["backends"][0]["sessions"][KEEP - 1], json!(KEEP as u64 + 29));
    }
}
