//! An append-only record that threads push to and tests wait on.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::lock;

/// Items in arrival order, plus a condition variable so that waiting never polls.
pub(crate) struct Journal<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

struct State<T> {
    items: Vec<T>,
    /// No more items will come (the writer went away).
    closed: bool,
}

impl<T: Clone> Journal<T> {
    pub(crate) fn new() -> Self {
        Journal {
            state: Mutex::new(State { items: Vec::new(), closed: false }),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn push(&self, item: T) {
        lock(&self.state).items.push(item);
        self.changed.notify_all();
    }

    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    pub(crate) fn snapshot(&self) -> Vec<T> {
        lock(&self.state).items.clone()
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&[T]) -> R) -> R {
        f(&lock(&self.state).items)
    }

    /// Waits until `pred` holds over all items so far (true), or until the journal is closed
    /// without it holding, or `timeout` passes (false). `pred` runs under the journal's lock.
    pub(crate) fn wait_for(&self, mut pred: impl FnMut(&[T]) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        loop {
            if pred(&state.items) {
                return true;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
