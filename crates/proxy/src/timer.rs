//! Per-worker timers: a min-heap of deadlines with lazy cancellation.
//!
//! Entries are never removed early. Each names a session slot and the generation of the session
//! that armed it; when it fires, the worker checks that the same session still wants it (quinn's
//! "timeouts are data" idea with a heap instead of a wheel: a session arms at most one idle entry
//! at a time and re-arms it only when it fires early, so the heap stays near the session count).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The backend connect of the session has taken too long.
    Connect,
    /// Check whether the session has been idle for the idle timeout.
    Idle,
    /// A reset is waiting for the kernel to send what was written before it.
    Linger,
    /// Retry accepting on a listener after accept(2) failed (EMFILE back-off).
    Accept,
    /// A trusted proxy's connection has not sent its whole PROXY header in time.
    Header,
}

/// One armed timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at: Instant,
    pub kind: TimerKind,
    /// Session slot, or listener index for [`TimerKind::Accept`].
    pub slot: usize,
    pub generation: u64,
}

/// Deadlines in order.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
}

impl Timers {
    pub fn arm(&mut self, timer: Timer) {
        self.heap.push(Reverse(timer));
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(t)| t.at)
    }

    /// Remove and return the earliest timer if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse(t)) if t.at <= now => self.heap.pop().map(|Reverse(t)| t),
            _ => None,
        }
    }

    /// Keep only the timers `keep` accepts (O(n); the caller amortises it).
    pub fn retain(&mut self, mut keep: impl FnMut(&Timer) -> bool) {
        self.heap.retain(|Reverse(t)| keep(t));
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        for (i, ms) in [30u64, 10, 20].into_iter().enumerate() {
            let at = t0 + Duration::from_millis(ms);
            timers.arm(Timer { at, kind: TimerKind::Idle, slot: i, generation: 0 });
        }
        assert_eq!(timers.next(), Some(t0 + Duration::from_millis(10)));
        assert!(timers.pop_due(t0).is_none());
        let due: Vec<usize> = std::iter::from_fn(|| timers.pop_due(t0 + Duration::from_millis(25)))
            .map(|t| t.slot)
            .collect();
        assert_eq!(due, vec![1, 2]);
        assert_eq!(timers.len(), 1);
    }
}
