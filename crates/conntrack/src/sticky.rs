//! The sticky table: which backend each client is pinned to, shared by every worker.
//!
//! One entry per affinity key holds the backend, the number of live sessions of that client and,
//! once the last session has closed, the time the pin expires. An entry with live sessions never
//! expires and is never evicted; an idle one lives `timeout_ms` after its last session closed.
//!
//! The table is a [`DashMap`] under a keyed SipHash ([`KeyedHasher`]): workers take one shard
//! lock per operation and nothing else. Counters are relaxed atomics.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::{DashMap, Entry};

use vocab::KeyedHasher;
use vocab::{AffinityKey, BackendId};

/// Lock shards. A fixed number rather than dashmap's default (4 x cores) so that the table, and a
/// simulation of it, behaves the same on every machine; 64 keeps contention low for 16 workers
/// at 4 shards each and costs 64 cache lines of lock padding.
const SHARDS: usize = 64;

/// Entries allocated up front at most. Sizing the table for its whole capacity at start spreads
/// even a small table over the full allocation (66 MB at 1M entries), so every lookup misses
/// the cache: 400 ns against 170 ns measured for 100k entries (benches/conntrack.rs). Growing on
/// demand costs a rehash of one shard (1/64 of the table, under a millisecond at 1M entries)
/// now and then instead.
const MAX_PREALLOCATED: usize = 1 << 14;

/// A reclaim pass aims to free `capacity / RECLAIM_DIVISOR` entries (at least one), so that its
/// two scans of the table are paid for by that many new keys: at most 2 x 64 entry visits per
/// key admitted, whatever the table size.
const RECLAIM_DIVISOR: usize = 64;

/// A reclaim pass that cannot free a whole batch (fewer idle entries than the batch) runs at most
/// once per this many milliseconds; in between, new keys get [`Attach::Full`]. It matches the
/// once-a-second `sweep` cadence: at worst one extra table scan per second.
const RECLAIM_BACKOFF_MS: u64 = 1_000;

/// Resolution of the idle-entry histogram that picks which idle entries a reclaim pass evicts:
/// the batch is taken from the entries that expire soonest, to within `timeout_ms / 64`.
const IDLE_BINS: usize = 64;

/// Size and expiry of a sticky table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StickyConfig {
    /// Most entries the table holds; a new client beyond it is served unpinned.
    pub capacity: usize,
    /// How long a pin outlives its client's last session, in milliseconds.
    pub timeout_ms: u64,
}

/// What [`Sticky::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// The key is pinned to the requested backend: a new pin, a renewed expired one, or one more
    /// session on the existing pin.
    Pinned,
    /// The key was pinned to another backend and now points at the requested one.
    Repinned {
        /// The backend the key was pinned to before.
        from: BackendId,
    },
    /// The table is full of entries that may not be reclaimed; nothing was stored. Serve the
    /// session unpinned and do not call [`Sticky::detach`] for it.
    Full,
}

/// One entry as seen by the admin side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryView {
    /// The backend the key is pinned to.
    pub backend: BackendId,
    /// Open sessions of this key.
    pub live: u32,
    /// Time left before the pin expires; `None` while sessions are open.
    pub expires_in_ms: Option<u64>,
}

/// Counters since the table was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StickyStats {
    /// New pins (including a pin renewed after it had expired but before it was swept).
    pub inserts: u64,
    /// Pins moved to another backend.
    pub repins: u64,
    /// Expired entries removed by `attach` to make room.
    pub evicted_expired: u64,
    /// Idle, unexpired entries removed by `attach` to make room.
    pub evicted_idle: u64,
    /// Attaches refused with [`Attach::Full`].
    pub full: u64,
    /// Expired entries removed by [`Sticky::sweep`].
    pub swept: u64,
    /// Idle entries removed by [`Sticky::forget_backend`].
    pub forgotten: u64,
}

/// The value stored per key. 16 bytes with 8-byte alignment, so a bucket is the 16-byte key plus
/// this, 32 bytes, and one control byte (see the memory test below).
#[derive(Clone, Copy, Debug)]
struct Slot {
    backend: BackendId,
    live: u32,
    /// When the pin expires; meaningful only while `live == 0`.
    expires: u64,
}

impl Slot {
    fn new(backend: BackendId) -> Self {
        Self { backend, live: 1, expires: 0 }
    }

    /// Whether the pin still holds at `now`. Its negation is exactly what `sweep` removes, so a
    /// lookup and a sweep at the same instant agree on the boundary (`expires == now` is gone).
    fn pinned(&self, now: u64) -> bool {
        self.live > 0 || self.expires > now
    }
}

#[derive(Default)]
struct Counters {
    inserts: AtomicU64,
    repins: AtomicU64,
    evicted_expired: AtomicU64,
    evicted_idle: AtomicU64,
    full: AtomicU64,
    swept: AtomicU64,
    forgotten: AtomicU64,
}

/// Counters only feed metrics: relaxed is enough, no ordering hangs on them.
fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Told of every pin a worker makes or moves (not of pins put in by [`Sticky::pin_remote`]):
/// how peers learn of them. Called under the key's shard lock: it must only hand the change on
/// (a bounded channel's `try_send`), never wait.
pub trait Watch: Send + Sync {
    /// `key` is now pinned to `backend` (a new pin, a renewed expired one, or a move).
    fn pinned(&self, key: AffinityKey, backend: BackendId);

    /// `key`'s pin expired and [`Sticky::sweep`] removed it.
    fn expired(&self, _key: AffinityKey) {}
}

/// The sticky table: affinity key -> backend, with live-session counts and expiry.
///
/// `Send + Sync`; share it as an `Arc<Sticky>`. Every method takes `now` in milliseconds from an
/// epoch the caller chooses (the same for all callers) and never reads a clock.
///
/// Call [`detach`](Self::detach) exactly once for every [`attach`](Self::attach) that returned
/// `Pinned` or `Repinned`, when that session closes.
pub struct Sticky {
    map: DashMap<AffinityKey, Slot, KeyedHasher>,
    config: StickyConfig,
    /// Entries in the map plus slots reserved by an insert in progress. A slot is reserved before
    /// an insert and released after a removal, so `map.len() <= len <= capacity` at every
    /// instant, and `len == map.len()` whenever no call is in flight.
    len: AtomicUsize,
    /// Entries with `live == 0`, i.e. the reclaimable ones (expired entries are idle too). Kept
    /// by the same rule as `len`, so it never undercounts: when it reads 0 nothing can be
    /// reclaimed, and a full table answers `Full` in O(1).
    idle: AtomicUsize,
    /// Set while one worker runs a reclaim pass; others answer `Full` rather than queue behind it
    /// or scan the table a second time.
    reclaiming: AtomicBool,
    /// Earliest `now` at which a short reclaim pass (one that cannot free a whole batch) may run.
    next_short_pass: AtomicU64,
    counters: Counters,
    watch: OnceLock<Arc<dyn Watch>>,
}

impl Sticky {
    /// An empty table. `hash_key` keys the SipHash-1-3 of the affinity keys; draw it at random
    /// once per process (see [`KeyedHasher`]).
    ///
    /// Buckets for a small number of entries are allocated here; the table grows with use (see
    /// `MAX_PREALLOCATED`).
    pub fn new(config: StickyConfig, hash_key: [u8; 16]) -> Sticky {
        let map = DashMap::with_capacity_and_hasher_and_shard_amount(
            config.capacity.min(MAX_PREALLOCATED),
            KeyedHasher::new(hash_key),
            SHARDS,
        );
        Sticky {
            map,
            config,
            len: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            reclaiming: AtomicBool::new(false),
            next_short_pass: AtomicU64::new(0),
            counters: Counters::default(),
            watch: OnceLock::new(),
        }
    }

    /// Tell `watch` of every new or moved pin from now on (once; later calls are ignored).
    pub fn set_watch(&self, watch: Arc<dyn Watch>) {
        let _ = self.watch.set(watch);
    }

    fn changed(&self, key: AffinityKey, backend: BackendId) {
        if let Some(w) = self.watch.get() {
            w.pinned(key, backend);
        }
    }

    /// Remove `key`'s pin if no session of it is open here (a peer's pin of it expired there);
    /// returns whether it was removed.
    pub fn remove_idle(&self, key: AffinityKey) -> bool {
        let removed = self.map.remove_if(&key, |_, slot| slot.live == 0).is_some();
        if removed {
            self.release(1);
        }
        removed
    }

    /// A pin another instance made (a peer): `key` on `backend` from now on, keeping the live
    /// sessions this instance has of the key; with none, it expires `left_ms` after `now`
    /// (`None`: the sticky timeout). A new key is stored if the table has room (nothing is
    /// evicted for it): returns whether the pin is in the table. The watch is not told.
    pub fn pin_remote(
        &self,
        key: AffinityKey,
        backend: BackendId,
        left_ms: Option<u64>,
        now: u64,
    ) -> bool {
        let expires = now.saturating_add(left_ms.unwrap_or(self.config.timeout_ms));
        match self.map.entry(key) {
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                if slot.backend != backend {
                    slot.backend = backend;
                    bump(&self.counters.repins, 1);
                }
                if slot.live == 0 {
                    slot.expires = slot.expires.max(expires);
                }
                true
            }
            Entry::Vacant(vacant) => {
                let capacity = self.config.capacity;
                let reserved = self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                    (len < capacity).then_some(len + 1)
                });
                if reserved.is_err() {
                    return false;
                }
                vacant.insert(Slot { backend, live: 0, expires });
                self.idle.fetch_add(1, Ordering::Relaxed);
                bump(&self.counters.inserts, 1);
                true
            }
        }
    }

    /// The configuration the table was built with.
    pub fn config(&self) -> StickyConfig {
        self.config
    }

    /// Backend the key is pinned to, if an unexpired entry exists (live sessions > 0, or expiry
    /// > now). One shard read lock, no allocation.
    pub fn lookup(&self, key: AffinityKey, now: u64) -> Option<BackendId> {
        let slot = self.map.get(&key)?;
        slot.pinned(now).then_some(slot.backend)
    }

    /// A session of `key` was established to `backend`: pin the key and count one live session.
    ///
    /// - An unexpired entry for the same backend gains a session: `Pinned`.
    /// - An unexpired entry for another backend is re-pinned: `Repinned { from }`. Its live count
    ///   keeps the sessions still open to `from`: they are sessions of this client, and their
    ///   detaches must not drive the count to zero under the new session.
    /// - An expired entry not yet swept is logically absent: it is renewed in place as a new pin,
    ///   `Pinned`, whatever backend it held.
    /// - A new key is inserted, `Pinned`, if the table has room.
    ///
    /// **When the table is full and the key is new**, room is reclaimed, never from entries with
    /// live sessions. If no entry is idle (an exact count, kept as entries change), the answer
    /// is `Full` at once. Otherwise one worker runs a reclaim pass: a scan that removes every
    /// expired entry and, if that frees fewer than a batch of `capacity / 64` (at least 1),
    /// a second scan that evicts the rest of the batch from the idle entries that expire soonest
    /// (the client who left longest ago goes first). A pass that is sure to free a whole batch
    /// always runs, so its cost is amortised over the batch; a pass that cannot (fewer idle
    /// entries than a batch) runs at most once a second, and between such passes, or while
    /// another worker is reclaiming, a new key gets `Full`. `Full` stores nothing: serve the
    /// session unpinned and do not detach it. Attaching an existing key never allocates.
    pub fn attach(&self, key: AffinityKey, backend: BackendId, now: u64) -> Attach {
        if let Some(done) = self.try_attach(key, backend, now) {
            return done;
        }
        if self.reclaim(now) > 0 {
            // Another worker may take the room first; then this key is refused like any other.
            if let Some(done) = self.try_attach(key, backend, now) {
                return done;
            }
        }
        bump(&self.counters.full, 1);
        Attach::Full
    }

    /// `attach` without reclaiming: `None` when the key is new and the table is full. Holds the
    /// key's shard lock throughout, and returns it before the caller reclaims (a reclaim pass
    /// locks every shard in turn, this one included).
    fn try_attach(&self, key: AffinityKey, backend: BackendId, now: u64) -> Option<Attach> {
        match self.map.entry(key) {
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                if slot.live == 0 {
                    self.idle.fetch_sub(1, Ordering::Relaxed);
                }
                let done = if !slot.pinned(now) {
                    // Expired, not yet swept: a new pin that happens to reuse the bucket.
                    *slot = Slot::new(backend);
                    bump(&self.counters.inserts, 1);
                    self.changed(key, backend);
                    Attach::Pinned
                } else if slot.backend != backend {
                    let from = slot.backend;
                    slot.backend = backend;
                    slot.live = slot.live.saturating_add(1);
                    bump(&self.counters.repins, 1);
                    self.changed(key, backend);
                    Attach::Repinned { from }
                } else {
                    // Saturating: u32::MAX open sessions of one client cannot exist (file
                    // descriptors run out long before), so this never loses a count.
                    slot.live = slot.live.saturating_add(1);
                    Attach::Pinned
                };
                Some(done)
            }
            Entry::Vacant(vacant) => {
                let capacity = self.config.capacity;
                let reserved = self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                    (len < capacity).then_some(len + 1)
                });
                if reserved.is_err() {
                    return None;
                }
                vacant.insert(Slot::new(backend));
                bump(&self.counters.inserts, 1);
                self.changed(key, backend);
                Some(Attach::Pinned)
            }
        }
    }

    /// A session of `key` closed: one live session fewer; when none is left the pin expires at
    /// `now + timeout_ms`. A no-op if the entry is gone or has no live sessions (an unmatched
    /// detach never underflows and never extends an expiry).
    pub fn detach(&self, key: AffinityKey, now: u64) {
        let Some(mut slot) = self.map.get_mut(&key) else {
            return;
        };
        match slot.live {
            // Unmatched detach: nothing to count down.
            0 => {}
            // Last session: the pin starts to age.
            1 => {
                slot.live = 0;
                slot.expires = now.saturating_add(self.config.timeout_ms);
                self.idle.fetch_add(1, Ordering::Relaxed);
            }
            // Other sessions remain: still pinned, no expiry.
            _ => slot.live -= 1,
        }
    }

    /// Remove expired entries (no live sessions and expiry <= `now`); returns how many.
    ///
    /// Meant to run about once a second from a control thread. It visits every entry but holds
    /// one shard's lock at a time (1/64 of the table), so no worker waits on it for long.
    pub fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        let watch = self.watch.get();
        self.map.retain(|key, slot| {
            let keep = slot.pinned(now);
            removed += usize::from(!keep);
            if let (false, Some(w)) = (keep, watch) {
                w.expired(*key);
            }
            keep
        });
        self.release(removed);
        bump(&self.counters.swept, removed);
        removed
    }

    /// Entries in the table, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry for `key` if it is pinned at `now`, for the admin API.
    pub fn get(&self, key: AffinityKey, now: u64) -> Option<EntryView> {
        let slot = self.map.get(&key)?;
        // `pinned` with `live == 0` means `expires > now`: the subtraction cannot underflow.
        slot.pinned(now).then(|| EntryView {
            backend: slot.backend,
            live: slot.live,
            expires_in_ms: (slot.live == 0).then(|| slot.expires - now),
        })
    }

    /// Every pinned entry at `now`: its key, backend, and time left (`None` while sessions are
    /// open), for saving the table (a state file, an upgrade). Visits every entry under one
    /// shard read lock at a time; entries changing meanwhile are seen before or after.
    pub fn export(&self, now: u64) -> Vec<(AffinityKey, BackendId, Option<u64>)> {
        let mut out = Vec::with_capacity(self.len());
        for entry in self.map.iter() {
            let slot = entry.value();
            if slot.pinned(now) {
                let left = (slot.live == 0).then(|| slot.expires - now);
                out.push((*entry.key(), slot.backend, left));
            }
        }
        out
    }

    /// Put back a saved pin: `key` on `backend`, idle, expiring `left_ms` after `now`. A key
    /// already in the table keeps what it has (it is fresher), and nothing is evicted for a
    /// restored entry: returns whether it was stored.
    pub fn restore(&self, key: AffinityKey, backend: BackendId, left_ms: u64, now: u64) -> bool {
        if left_ms == 0 {
            return false;
        }
        let Entry::Vacant(vacant) = self.map.entry(key) else { return false };
        let capacity = self.config.capacity;
        let reserved = self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
            (len < capacity).then_some(len + 1)
        });
        if reserved.is_err() {
            return false;
        }
        vacant.insert(Slot { backend, live: 0, expires: now.saturating_add(left_ms) });
        self.idle.fetch_add(1, Ordering::Relaxed);
        bump(&self.counters.inserts, 1);
        true
    }

    /// Pinned entries per backend (sticky clients per backend), indexed by backend id, for
    /// `backends` backends; pins to ids beyond that (a stale snapshot) are not counted. Visits
    /// every entry under one shard read lock at a time.
    pub fn per_backend(&self, now: u64, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for entry in self.map.iter() {
            let slot = entry.value();
            if slot.pinned(now) {
                if let Some(count) = counts.get_mut(slot.backend as usize) {
                    *count += 1;
                }
            }
        }
        counts
    }

    /// Drop the pins to `backend` that have no live sessions (its clients re-hash on their next
    /// session); returns how many. Pins with live sessions stay until those sessions close.
    pub fn forget_backend(&self, backend: BackendId) -> usize {
        let mut removed = 0;
        self.map.retain(|_, slot| {
            let keep = slot.backend != backend || slot.live > 0;
            removed += usize::from(!keep);
            keep
        });
        self.release(removed);
        bump(&self.counters.forgotten, removed);
        removed
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StickyStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StickyStats {
            inserts: load(&c.inserts),
            repins: load(&c.repins),
            evicted_expired: load(&c.evicted_expired),
            evicted_idle: load(&c.evicted_idle),
            full: load(&c.full),
            swept: load(&c.swept),
            forgotten: load(&c.forgotten),
        }
    }

    /// Account for `n` idle entries that have left the map. Called after the removing scan, so
    /// `len` and `idle` stay upper bounds while it runs.
    fn release(&self, n: usize) {
        if n > 0 {
            self.len.fetch_sub(n, Ordering::Relaxed);
            self.idle.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Batch a reclaim pass aims to free.
    fn reclaim_batch(&self) -> usize {
        (self.config.capacity / RECLAIM_DIVISOR).max(1)
    }

    /// Make room in a full table by the policy of [`attach`](Self::attach); returns how many
    /// entries were removed.
    fn reclaim(&self, now: u64) -> usize {
        let idle = self.idle.load(Ordering::Relaxed);
        if idle == 0 {
            // Every entry has live sessions: nothing may go.
            return 0;
        }
        if self.reclaiming.swap(true, Ordering::Acquire) {
            return 0;
        }
        let _running = Running(&self.reclaiming);
        let batch = self.reclaim_batch();
        if idle < batch {
            // This pass frees less than a batch, so it is not paid for: rate-limit it.
            if now < self.next_short_pass.load(Ordering::Relaxed) {
                return 0;
            }
            let next = now.saturating_add(RECLAIM_BACKOFF_MS);
            self.next_short_pass.store(next, Ordering::Relaxed);
        }
        self.reclaim_pass(now, batch)
    }

    /// Remove every expired entry, then idle ones soonest-to-expire first until `batch` entries
    /// are gone in all. Two scans at most, one shard lock at a time.
    fn reclaim_pass(&self, now: u64, batch: usize) -> usize {
        // Idle entries expire in (now, now + timeout]; bin `i` holds those expiring within
        // (i * width, (i + 1) * width] of now. Clamped, in case callers' clocks disagree.
        let width = self.config.timeout_ms / IDLE_BINS as u64 + 1;
        let bin = |expires: u64| (((expires - now - 1) / width) as usize).min(IDLE_BINS - 1);

        let mut expired = 0;
        let mut histogram = [0usize; IDLE_BINS];
        self.map.retain(|_, slot| {
            if slot.live > 0 {
                return true;
            }
            if slot.expires <= now {
                expired += 1;
                return false;
            }
            histogram[bin(slot.expires)] += 1;
            true
        });

        let mut evicted = 0;
        if expired < batch {
            let need = batch - expired;
            // The fewest bins, soonest first, that hold `need` entries (all of them if fewer).
            let mut cut = IDLE_BINS - 1;
            let mut sum = 0;
            for (i, n) in histogram.iter().enumerate() {
                sum += n;
                if sum >= need {
                    cut = i;
                    break;
                }
            }
            if sum > 0 {
                self.map.retain(|_, slot| {
                    if slot.live > 0 {
                        return true;
                    }
                    if slot.expires <= now {
                        // Went idle and expired since the first scan (a caller's clock lags).
                        expired += 1;
                        return false;
                    }
                    if evicted < need && bin(slot.expires) <= cut {
                        evicted += 1;
                        return false;
                    }
                    true
                });
            }
        }

        self.release(expired + evicted);
        bump(&self.counters.evicted_expired, expired);
        bump(&self.counters.evicted_idle, evicted);
        expired + evicted
    }
}

impl std::fmt::Debug for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sticky")
            .field("config", &self.config)
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Clears the `reclaiming` flag when a pass ends, however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::hash::BuildHasher;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use std::thread;

    use proptest::prelude::*;

    use super::*;

    fn k(i: u32) -> AffinityKey {
        AffinityKey::from_ip(IpAddr::V4(Ipv4Addr::from(i)))
    }

    fn table(capacity: usize, timeout_ms: u64) -> Sticky {
        Sticky::new(StickyConfig { capacity, timeout_ms }, [0x5a; 16])
    }

    impl Sticky {
        /// The counters against the map itself; only meaningful when no call is in flight.
        fn check_counters(&self) {
            assert_eq!(self.len(), self.map.len(), "len counter");
            let idle = self.map.iter().filter(|e| e.value().live == 0).count();
            assert_eq!(self.idle.load(Ordering::Relaxed), idle, "idle counter");
        }
    }

    /// What a watch was told.
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(AffinityKey, BackendId)>>);

    impl Watch for Seen {
        fn pinned(&self, key: AffinityKey, backend: BackendId) {
            self.0.lock().unwrap().push((key, backend));
        }

        fn expired(&self, key: AffinityKey) {
            self.0.lock().unwrap().push((key, u32::MAX));
        }
    }

    #[test]
    fn the_watch_hears_expiries_and_an_idle_pin_can_be_removed() {
        let t = table(4, 100);
        let seen = Arc::new(Seen::default());
        t.set_watch(seen.clone());
        assert_eq!(t.attach(k(1), 7, 0), Attach::Pinned);
        t.detach(k(1), 0);
        assert_eq!(t.sweep(100), 1);
        assert_eq!(*seen.0.lock().unwrap(), [(k(1), 7), (k(1), u32::MAX)]);
        assert_eq!(t.attach(k(2), 7, 0), Attach::Pinned);
        assert!(!t.remove_idle(k(2)), "a session is open");
        t.detach(k(2), 1);
        assert!(t.remove_idle(k(2)));
        assert!(!t.remove_idle(k(2)));
        assert_eq!(t.len(), 0);
        t.check_counters();
    }

    #[test]
    fn the_watch_hears_new_and_moved_pins_and_not_remote_ones() {
        let t = table(2, 100);
        let seen = Arc::new(Seen::default());
        t.set_watch(seen.clone());
        assert_eq!(t.attach(k(1), 7, 0), Attach::Pinned);
        assert_eq!(t.attach(k(1), 7, 1), Attach::Pinned, "one more session: not a change");
        assert_eq!(t.attach(k(1), 8, 2), Attach::Repinned { from: 7 });
        assert!(t.pin_remote(k(2), 9, None, 3));
        assert_eq!(*seen.0.lock().unwrap(), [(k(1), 7), (k(1), 8)]);
        t.check_counters();
    }

    #[test]
    fn a_remote_pin_moves_the_key_keeps_its_sessions_and_never_evicts() {
        let t = table(2, 100);
        assert_eq!(t.attach(k(1), 7, 0), Attach::Pinned);
        // Moved elsewhere by a peer: the open session stays counted, no expiry while it lives.
        assert!(t.pin_remote(k(1), 8, Some(5), 1));
        assert_eq!(t.get(k(1), 1), Some(EntryView { backend: 8, live: 1, expires_in_ms: None }));
        t.detach(k(1), 10);
        assert_eq!(t.get(k(1), 10).map(|e| e.expires_in_ms), Some(Some(100)));
        // A new key, idle: the time left it came with, else the timeout.
        assert!(t.pin_remote(k(2), 9, Some(30), 10));
        assert_eq!(t.get(k(2), 10).map(|e| (e.backend, e.expires_in_ms)), Some((9, Some(30))));
        // Full: a remote pin takes no room from anyone.
        assert!(!t.pin_remote(k(3), 9, None, 10));
        assert_eq!(t.len(), 2);
        t.check_counters();
    }

    use crate::testutil::Rng;

    // ---- keys and hashing ------------------------------------------------------------------

    #[test]
    fn v4_and_mapped_v6_share_an_entry() {
        let sticky = table(10, 1_000);
        let v4 = AffinityKey::from_ip("198.51.100.9".parse().unwrap());
        let mapped = AffinityKey::from_ip("::ffff:198.51.100.9".parse().unwrap());
        let v6 = AffinityKey::from_ip("2001:db8::9".parse().unwrap());
        assert_eq!(sticky.attach(v4, 2, 0), Attach::Pinned);
        assert_eq!(sticky.lookup(mapped, 0), Some(2));
        assert_eq!(sticky.lookup(v6, 0), None);
        assert_eq!(sticky.len(), 1);
    }

    #[test]
    fn the_hash_key_moves_every_key() {
        let a = Sticky::new(StickyConfig { capacity: 1, timeout_ms: 1 }, [1; 16]);
        let b = Sticky::new(StickyConfig { capacity: 1, timeout_ms: 1 }, [2; 16]);
        let same = Sticky::new(StickyConfig { capacity: 1, timeout_ms: 1 }, [1; 16]);
        for i in 0..100 {
            let (ha, hb) = (a.map.hasher().hash_one(k(i)), b.map.hasher().hash_one(k(i)));
            assert_ne!(ha, hb, "key {i}");
            assert_eq!(ha, same.map.hasher().hash_one(k(i)));
        }
        // The shard (top bits) and bucket (low bits) both depend on the key: over 100 keys the
        // two tables agree on a shard for about 100/64 of them, not all.
        let shard = |t: &Sticky, i| t.map.hasher().hash_one(k(i)) >> (64 - 6);
        let agree = (0..100).filter(|&i| shard(&a, i) == shard(&b, i)).count();
        assert!(agree < 20, "{agree} of 100 keys in the same shard under both keys");
    }

    #[test]
    fn sticky_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<Sticky>();
    }

    // ---- pin, lookup, expiry ---------------------------------------------------------------

    #[test]
    fn a_live_entry_never_expires() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 4, 0);
        sticky.attach(k(1), 4, 50);
        sticky.detach(k(1), 60);
        assert_eq!(sticky.lookup(k(1), u64::MAX), Some(4));
        assert_eq!(sticky.sweep(u64::MAX), 0);
        let view = sticky.get(k(1), 1 << 40).unwrap();
        assert_eq!(view, EntryView { backend: 4, live: 1, expires_in_ms: None });
    }

    #[test]
    fn an_idle_entry_lives_exactly_the_timeout() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 4, 0);
        sticky.detach(k(1), 1_000);
        let view = sticky.get(k(1), 1_000).unwrap();
        assert_eq!(view, EntryView { backend: 4, live: 0, expires_in_ms: Some(100) });
        assert_eq!(sticky.get(k(1), 1_099).unwrap().expires_in_ms, Some(1));
        assert_eq!(sticky.lookup(k(1), 1_099), Some(4));
        assert_eq!(sticky.lookup(k(1), 1_100), None);
        assert_eq!(sticky.get(k(1), 1_100), None);
    }

    #[test]
    fn lookup_and_sweep_agree_at_the_boundary() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 4, 0);
        sticky.detach(k(1), 0);
        assert_eq!(sticky.sweep(99), 0);
        assert_eq!(sticky.lookup(k(1), 99), Some(4));
        assert_eq!(sticky.lookup(k(1), 100), None);
        assert_eq!(sticky.sweep(100), 1);
        assert!(sticky.is_empty());
        assert_eq!(sticky.stats().swept, 1);
    }

    #[test]
    fn a_zero_timeout_expires_at_the_last_detach() {
        let sticky = table(10, 0);
        sticky.attach(k(1), 4, 7);
        sticky.detach(k(1), 7);
        assert_eq!(sticky.lookup(k(1), 7), None);
        assert_eq!(sticky.sweep(7), 1);
    }

    #[test]
    fn repin_reports_the_previous_backend() {
        let sticky = table(10, 100);
        assert_eq!(sticky.attach(k(1), 4, 0), Attach::Pinned);
        sticky.detach(k(1), 0);
        assert_eq!(sticky.attach(k(1), 5, 10), Attach::Repinned { from: 4 });
        assert_eq!(sticky.lookup(k(1), 10), Some(5));
        assert_eq!(sticky.attach(k(1), 5, 10), Attach::Pinned);
        assert_eq!(sticky.stats().repins, 1);
        assert_eq!(sticky.stats().inserts, 1);
    }

    #[test]
    fn repin_keeps_sessions_to_the_old_backend_counted() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 4, 0);
        sticky.attach(k(1), 5, 0);
        // The session to 4 closes; the one to 5 is still open, so the pin must not age.
        sticky.detach(k(1), 10);
        assert_eq!(sticky.get(k(1), 1_000).unwrap().live, 1);
        sticky.detach(k(1), 20);
        assert_eq!(sticky.get(k(1), 20).unwrap().expires_in_ms, Some(100));
    }

    #[test]
    fn an_expired_unswept_entry_is_renewed_as_a_new_pin() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 4, 0);
        sticky.detach(k(1), 0);
        // Expired at 100 but still in the map: a new pin, not a re-pin from a stale backend.
        assert_eq!(sticky.attach(k(1), 5, 100), Attach::Pinned);
        assert_eq!(sticky.get(k(1), 100).unwrap().live, 1);
        assert_eq!(sticky.stats().inserts, 2);
        assert_eq!(sticky.stats().repins, 0);
        sticky.check_counters();
    }

    #[test]
    fn an_unmatched_detach_is_a_no_op() {
        let sticky = table(10, 100);
        sticky.detach(k(1), 0);
        assert!(sticky.is_empty());
        sticky.attach(k(1), 4, 0);
        sticky.detach(k(1), 0);
        sticky.detach(k(1), 50);
        let view = sticky.get(k(1), 50).unwrap();
        assert_eq!((view.live, view.expires_in_ms), (0, Some(50)), "no underflow, no extension");
        sticky.check_counters();
    }

    #[test]
    fn per_backend_counts_pinned_entries() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 0, 0);
        sticky.attach(k(2), 2, 0);
        sticky.attach(k(3), 2, 0);
        sticky.attach(k(4), 9, 0); // beyond the snapshot: not counted
        sticky.attach(k(5), 1, 0);
        sticky.detach(k(5), 0); // expired at 100
        assert_eq!(sticky.per_backend(50, 3), vec![1, 1, 2]);
        assert_eq!(sticky.per_backend(100, 3), vec![1, 0, 2]);
    }

    #[test]
    fn forget_backend_drops_only_idle_pins() {
        let sticky = table(10, 100);
        sticky.attach(k(1), 2, 0);
        sticky.attach(k(2), 2, 0);
        sticky.attach(k(3), 3, 0);
        sticky.detach(k(1), 0);
        sticky.detach(k(3), 0);
        assert_eq!(sticky.forget_backend(2), 1);
        assert_eq!(sticky.lookup(k(1), 0), None);
        assert_eq!(sticky.lookup(k(2), 0), Some(2));
        assert_eq!(sticky.lookup(k(3), 0), Some(3));
        assert_eq!(sticky.stats().forgotten, 1);
        sticky.check_counters();
    }

    // ---- capacity and reclaim --------------------------------------------------------------

    #[test]
    fn a_full_table_reclaims_expired_then_idle_never_live() {
        let sticky = table(4, 1_000);
        for i in 1..=4 {
            sticky.attach(k(i), i, 0);
        }
        sticky.detach(k(1), 0); // expires at 1000
        sticky.detach(k(2), 500); // expires at 1500
        assert_eq!(sticky.attach(k(5), 5, 1_200), Attach::Pinned);
        assert_eq!(sticky.lookup(k(2), 1_200), Some(2), "the expired entry went first");
        assert_eq!(sticky.attach(k(6), 6, 1_200), Attach::Pinned);
        assert_eq!(sticky.lookup(k(2), 1_200), None, "then the idle one");
        assert_eq!(sticky.attach(k(7), 7, 1_200), Attach::Full);
        assert_eq!(sticky.len(), 4);
        for i in 3..=6 {
            assert_eq!(sticky.lookup(k(i), 1_200), Some(i), "live entry {i} kept");
        }
        assert_eq!(sticky.lookup(k(7), 1_200), None);
        let stats = sticky.stats();
        assert_eq!((stats.evicted_expired, stats.evicted_idle, stats.full), (1, 1, 1));
        sticky.check_counters();
    }

    #[test]
    fn an_all_live_table_refuses_new_keys_but_serves_known_ones() {
        let sticky = table(3, 1_000);
        for i in 0..3 {
            sticky.attach(k(i), 0, 0);
        }
        for i in 3..100 {
            assert_eq!(sticky.attach(k(i), 0, i as u64), Attach::Full);
        }
        assert_eq!(sticky.attach(k(0), 1, 100), Attach::Repinned { from: 0 });
        assert_eq!(sticky.len(), 3);
        assert_eq!(sticky.stats().full, 97);
        assert_eq!(sticky.stats().evicted_expired + sticky.stats().evicted_idle, 0);
    }

    #[test]
    fn a_zero_capacity_table_pins_nothing() {
        let sticky = table(0, 1_000);
        assert_eq!(sticky.attach(k(1), 0, 0), Attach::Full);
        sticky.detach(k(1), 0);
        assert!(sticky.is_empty());
    }

    #[test]
    fn a_short_reclaim_runs_at_most_once_per_backoff() {
        // Batch 2: one idle entry is not a whole batch, so freeing it is rate-limited.
        let sticky = table(128, 100_000);
        for i in 0..128 {
            sticky.attach(k(i), 0, 0);
        }
        sticky.detach(k(0), 0);
        assert_eq!(sticky.attach(k(1_000), 0, 0), Attach::Pinned);
        sticky.detach(k(1), 10);
        assert_eq!(sticky.attach(k(1_001), 0, 10), Attach::Full);
        assert_eq!(sticky.attach(k(1_001), 0, RECLAIM_BACKOFF_MS - 1), Attach::Full);
        assert_eq!(sticky.attach(k(1_001), 0, RECLAIM_BACKOFF_MS), Attach::Pinned);
        // Two idle entries are a whole batch: reclaimed at once, no backoff.
        sticky.detach(k(2), RECLAIM_BACKOFF_MS);
        sticky.detach(k(3), RECLAIM_BACKOFF_MS);
        assert_eq!(sticky.attach(k(1_002), 0, RECLAIM_BACKOFF_MS), Attach::Pinned);
        assert_eq!(sticky.attach(k(1_003), 0, RECLAIM_BACKOFF_MS), Attach::Pinned);
        assert_eq!(sticky.len(), 128);
        sticky.check_counters();
    }

    #[test]
    fn a_reclaim_batch_evicts_the_idle_entries_that_expire_soonest() {
        let sticky = table(640, 100_000); // batch 10
        for i in 0..640 {
            sticky.attach(k(i), 0, 0);
        }
        // Twenty clients leave 5 s apart; none has expired by 95 s.
        for i in 0..20 {
            sticky.detach(k(i), u64::from(i) * 5_000);
        }
        assert_eq!(sticky.attach(k(1_000), 0, 95_000), Attach::Pinned);
        for i in 0..20 {
            let kept = sticky.lookup(k(i), 95_000).is_some();
            assert_eq!(kept, i >= 10, "client {i} left at {} s", i * 5);
        }
        assert_eq!(sticky.stats().evicted_idle, 10);
        assert_eq!(sticky.len(), 631);
        sticky.check_counters();
    }

    // ---- simulation against a reference model ----------------------------------------------

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Attach { key: u32, backend: u32 },
        Detach { key: u32 },
        Sweep,
        Advance { ms: u64 },
        Forget { backend: u32 },
    }

    const BACKENDS: u32 = 4;

    #[derive(Clone, Copy, Debug)]
    struct Model {
        backend: u32,
        live: u32,
        expires: u64,
    }

    impl Model {
        fn fresh(backend: u32) -> Self {
            Self { backend, live: 1, expires: 0 }
        }

        fn pinned(&self, now: u64) -> bool {
            self.live > 0 || self.expires > now
        }
    }

    /// Runs `ops` on a table and on a plain `HashMap` model of it, checking after every step that
    /// they agree. The model cannot know which idle entries a reclaim picks, so it learns
    /// evictions from the table and checks only that they were allowed: idle, counted, expired
    /// ones first, and `Full` only when the policy permits it.
    fn simulate(config: StickyConfig, keys: u32, ops: &[Op]) -> Result<StickyStats, String> {
        let sticky = Sticky::new(config, [0xa5; 16]);
        let batch = sticky.reclaim_batch();
        let mut model: HashMap<u32, Model> = HashMap::new();
        let mut now = 0u64;
        for (step, &op) in ops.iter().enumerate() {
            macro_rules! ensure {
                ($cond:expr, $($what:tt)*) => {
                    if !$cond {
                        return Err(format!("step {step} {op:?} at t={now}: {}", format!($($what)*)));
                    }
                };
            }
            let before = sticky.stats();
            match op {
                Op::Attach { key, backend } => {
                    let idle = model.values().filter(|e| e.live == 0).count();
                    let len = sticky.len();
                    let got = sticky.attach(k(key), backend, now);
                    match model.get_mut(&key) {
                        Some(entry) if entry.pinned(now) => {
                            let want = if entry.backend == backend {
                                Attach::Pinned
                            } else {
                                Attach::Repinned { from: entry.backend }
                            };
                            ensure!(got == want, "known key: got {got:?}, want {want:?}");
                            entry.backend = backend;
                            entry.live += 1;
                        }
                        Some(entry) => {
                            ensure!(got == Attach::Pinned, "expired key: got {got:?}");
                            *entry = Model::fresh(backend);
                        }
                        None if got == Attach::Pinned => {
                            ensure!(len < config.capacity || idle > 0, "pinned past capacity");
                            model.insert(key, Model::fresh(backend));
                        }
                        None => {
                            ensure!(got == Attach::Full, "new key: got {got:?}");
                            ensure!(len == config.capacity, "full at len {len}");
                            ensure!(idle < batch, "full with {idle} idle, batch {batch}");
                        }
                    }
                }
                Op::Detach { key } => {
                    sticky.detach(k(key), now);
                    if let Some(entry) = model.get_mut(&key) {
                        if entry.live == 1 {
                            entry.expires = now + config.timeout_ms;
                        }
                        entry.live = entry.live.saturating_sub(1);
                    }
                }
                Op::Sweep => {
                    let removed = sticky.sweep(now);
                    let want = model.len();
                    model.retain(|_, e| e.pinned(now));
                    ensure!(removed == want - model.len(), "swept {removed}");
                }
                Op::Advance { ms } => now += ms,
                Op::Forget { backend } => {
                    let removed = sticky.forget_backend(backend);
                    let want = model.len();
                    model.retain(|_, e| e.backend != backend || e.live > 0);
                    ensure!(removed == want - model.len(), "forgot {removed}");
                }
            }

            if let Op::Attach { key, .. } | Op::Detach { key } = op {
                let backend = sticky.get(k(key), now).map(|v| v.backend);
                ensure!(sticky.lookup(k(key), now) == backend, "lookup and get disagree");
            }
            let mut evicted = 0;
            for key in 0..keys {
                let in_map = sticky.map.contains_key(&k(key));
                let view = sticky.get(k(key), now);
                let Some(&entry) = model.get(&key) else {
                    ensure!(!in_map, "key {key} in the table, not in the model");
                    continue;
                };
                if !in_map {
                    ensure!(entry.live == 0, "key {key} evicted with {} live", entry.live);
                    model.remove(&key);
                    evicted += 1;
                    continue;
                }
                let want = entry.pinned(now).then(|| EntryView {
                    backend: entry.backend,
                    live: entry.live,
                    expires_in_ms: (entry.live == 0).then(|| entry.expires - now),
                });
                ensure!(view == want, "key {key}: table {view:?}, model {want:?}");
            }
            let after = sticky.stats();
            let counted = (after.evicted_expired - before.evicted_expired)
                + (after.evicted_idle - before.evicted_idle);
            ensure!(counted == evicted, "evicted {evicted}, counted {counted}");
            if after.evicted_idle > before.evicted_idle {
                let expired = model.values().filter(|e| !e.pinned(now)).count();
                ensure!(expired == 0, "idle evicted while {expired} expired remain");
            }
            ensure!(sticky.len() <= config.capacity, "len {} > capacity", sticky.len());
            ensure!(sticky.len() == model.len(), "len {} vs model {}", sticky.len(), model.len());
            ensure!(sticky.map.len() == sticky.len(), "map len {}", sticky.map.len());
            let idle = model.values().filter(|e| e.live == 0).count();
            let counted_idle = sticky.idle.load(Ordering::Relaxed);
            ensure!(counted_idle == idle, "idle counter {counted_idle}, model {idle}");
            let mut per_backend = vec![0; BACKENDS as usize];
            for entry in model.values().filter(|e| e.pinned(now)) {
                per_backend[entry.backend as usize] += 1;
            }
            ensure!(sticky.per_backend(now, BACKENDS as usize) == per_backend, "per_backend");
        }
        Ok(sticky.stats())
    }

    fn random_op(rng: &mut Rng, keys: u32, timeout_ms: u64) -> Op {
        match rng.below(20) {
            0..=8 => Op::Attach {
                key: rng.below(u64::from(keys)) as u32,
                backend: rng.below(u64::from(BACKENDS)) as u32,
            },
            9..=15 => Op::Detach { key: rng.below(u64::from(keys)) as u32 },
            16 => Op::Sweep,
            17 => Op::Forget { backend: rng.below(u64::from(BACKENDS)) as u32 },
            _ => Op::Advance { ms: rng.below(timeout_ms / 2 + 2) },
        }
    }

    /// Seeded runs over small and batch-sized tables. A failure names its seed; rerun just that
    /// one with `STICKY_SEED=<seed> cargo test -p tether-conntrack simulation`.
    #[test]
    fn simulation_agrees_with_the_model() {
        let replay = std::env::var("STICKY_SEED").ok();
        let seeds: Vec<u64> = match &replay {
            Some(seed) => vec![seed.parse().expect("STICKY_SEED is a u64")],
            None => (0..24).collect(),
        };
        let mut total = StickyStats::default();
        for seed in seeds {
            let mut rng = Rng(seed);
            // 128 and up reclaim in batches of 2 or more, so short passes and backoff happen.
            let capacity = [1, 3, 16, 128][(seed % 4) as usize];
            let keys = capacity as u32 * 5 / 4 + 4;
            let timeout_ms = rng.below(3_000);
            let config = StickyConfig { capacity, timeout_ms };
            let ops: Vec<Op> = (0..1_000).map(|_| random_op(&mut rng, keys, timeout_ms)).collect();
            // A panic inside the table is a failure too, and must also name its seed.
            let run = std::panic::catch_unwind(|| simulate(config, keys, &ops));
            match run.unwrap_or_else(|_| Err("panicked (message above)".into())) {
                Ok(stats) => {
                    total.inserts += stats.inserts;
                    total.repins += stats.repins;
                    total.evicted_expired += stats.evicted_expired;
                    total.evicted_idle += stats.evicted_idle;
                    total.full += stats.full;
                    total.swept += stats.swept;
                    total.forgotten += stats.forgotten;
                }
                Err(failure) => panic!("seed {seed} ({config:?}): {failure}"),
            }
        }
        // Every path was taken somewhere, or the runs prove little. That holds over the whole
        // seed set, not for each seed: a replayed seed passes on its own when it agrees.
        if replay.is_some() {
            return;
        }
        let t = total;
        let paths = [t.inserts, t.repins, t.evicted_expired, t.evicted_idle, t.full, t.swept];
        assert!(paths.iter().all(|&n| n > 0) && t.forgotten > 0, "{total:?}");
    }

    fn op_strategy(keys: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..keys, 0..BACKENDS).prop_map(|(key, backend)| Op::Attach { key, backend }),
            3 => (0..keys).prop_map(|key| Op::Detach { key }),
            1 => Just(Op::Sweep),
            1 => (0..BACKENDS).prop_map(|backend| Op::Forget { backend }),
            2 => (0..1_500u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn operations_agree_with_the_model(
            capacity in 0usize..12,
            timeout_ms in 0u64..2_000,
            ops in proptest::collection::vec(op_strategy(20), 0..200),
        ) {
            let config = StickyConfig { capacity, timeout_ms };
            if let Err(failure) = simulate(config, 20, &ops) {
                return Err(TestCaseError::fail(failure));
            }
        }
    }

    // ---- saving and restoring ----

    #[test]
    fn exported_pins_restore_with_their_time_left_and_never_over_fresher_ones() {
        let from = Sticky::new(StickyConfig { capacity: 8, timeout_ms: 1_000 }, [1; 16]);
        assert!(matches!(from.attach(k(1), 3, 0), Attach::Pinned));
        assert!(matches!(from.attach(k(2), 4, 0), Attach::Pinned));
        from.detach(k(2), 100); // expires at 1,100
        assert!(matches!(from.attach(k(3), 5, 0), Attach::Pinned));
        from.detach(k(3), 0); // expires at 1,000
        let mut saved = from.export(500);
        saved.sort_by_key(|(_, backend, _)| *backend);
        assert_eq!(saved, vec![(k(1), 3, None), (k(2), 4, Some(600)), (k(3), 5, Some(500))]);
        assert!(from.export(1_000).iter().all(|(key, _, _)| *key != k(3)), "expired ones go");

        let into = Sticky::new(StickyConfig { capacity: 2, timeout_ms: 1_000 }, [2; 16]);
        assert!(matches!(into.attach(k(2), 9, 0), Attach::Pinned)); // fresher than the file
        assert!(!into.restore(k(2), 4, 600, 0), "a live key keeps its own pin");
        assert!(into.restore(k(3), 5, 500, 0));
        assert!(!into.restore(k(1), 3, 500, 0), "no room: nothing evicted for a restore");
        assert!(!into.restore(k(4), 3, 0, 0), "no time left");
        let view = into.get(k(3), 100).unwrap();
        assert_eq!(view, EntryView { backend: 5, live: 0, expires_in_ms: Some(400) });
        assert_eq!(into.get(k(2), 100).unwrap().backend, 9);
        assert!(into.get(k(3), 500).is_none(), "it keeps its time left, not a new timeout");
        // A restored entry is an idle one: a full table can reclaim it.
        assert_eq!(into.len(), 2);
        assert!(matches!(into.attach(k(5), 1, 600), Attach::Pinned));
    }

    // ---- concurrency -----------------------------------------------------------------------

    #[test]
    #[allow(clippy::disallowed_methods)] // threads are the test's harness
    fn two_threads_on_overlapping_keys_keep_live_counts() {
        const KEYS: u64 = 64;
        const STEPS: u64 = 20_000;
        let sticky = Arc::new(table(1_000, 500));
        let workers: Vec<_> = (0..2)
            .map(|seed| {
                let sticky = Arc::clone(&sticky);
                thread::spawn(move || {
                    let mut rng = Rng(seed);
                    let mut open = Vec::new();
                    for now in 0..STEPS {
                        if open.is_empty() || rng.below(2) == 0 {
                            let key = rng.below(KEYS) as u32;
                            let backend = rng.below(4) as u32;
                            assert_ne!(sticky.attach(k(key), backend, now), Attach::Full);
                            open.push(key);
                        } else {
                            let key = open.swap_remove(rng.below(open.len() as u64) as usize);
                            sticky.detach(k(key), now);
                        }
                    }
                    open
                })
            })
            .collect();
        let open: Vec<u32> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();

        sticky.check_counters();
        for key in 0..KEYS as u32 {
            let want = open.iter().filter(|&&o| o == key).count() as u32;
            let live = sticky.get(k(key), STEPS).map_or(0, |v| v.live);
            assert_eq!(live, want, "key {key}");
        }
        for &key in &open {
            sticky.detach(k(key), STEPS);
        }
        sticky.check_counters();
        for key in 0..KEYS as u32 {
            assert_eq!(sticky.get(k(key), STEPS).map_or(0, |v| v.live), 0, "key {key}");
        }
        let len = sticky.len();
        assert_eq!(sticky.sweep(STEPS + 500), len, "every entry expires after the timeout");
        assert!(sticky.is_empty());
        sticky.check_counters();
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // threads are the test's harness
    fn capacity_holds_under_concurrent_attach_and_sweep() {
        const CAPACITY: usize = 64;
        let sticky = Arc::new(table(CAPACITY, 20));
        let mut threads: Vec<_> = (0..3)
            .map(|seed| {
                let sticky = Arc::clone(&sticky);
                thread::spawn(move || {
                    let mut rng = Rng(100 + seed);
                    let mut open = Vec::new();
                    for now in 0..20_000 {
                        if open.is_empty() || rng.below(3) > 0 {
                            let key = rng.below(1_000) as u32;
                            if sticky.attach(k(key), 0, now) != Attach::Full {
                                open.push(key);
                            }
                        } else {
                            let key = open.swap_remove(rng.below(open.len() as u64) as usize);
                            sticky.detach(k(key), now);
                        }
                        assert!(sticky.len() <= CAPACITY, "len {}", sticky.len());
                    }
                    for key in open {
                        sticky.detach(k(key), 20_000);
                    }
                })
            })
            .collect();
        let sweeper = Arc::clone(&sticky);
        threads.push(thread::spawn(move || {
            for now in (0..20_000).step_by(50) {
                sweeper.sweep(now);
                assert!(sweeper.len() <= CAPACITY);
            }
        }));
        for thread in threads {
            thread.join().unwrap();
        }
        sticky.check_counters();
        let stats = sticky.stats();
        assert!(stats.full > 0 && stats.evicted_expired + stats.evicted_idle > 0, "{stats:?}");
        sticky.sweep(20_020);
        assert!(sticky.is_empty());
        sticky.check_counters();
    }

    // ---- memory ----------------------------------------------------------------------------

    /// hashbrown's probe group: SSE2 width, and the number of control bytes it adds to each
    /// table after the one per bucket.
    const GROUP_WIDTH: usize = 16;

    /// A shard's header: its lock and the table's pointer and counters, padded to a cache line
    /// pair by crossbeam's `CachePadded` (128 bytes on x86-64). The type is private to dashmap.
    const SHARD_HEADER: usize = 128;

    #[test]
    fn an_entry_costs_at_most_80_bytes_at_one_million() {
        const N: usize = 1_000_000;
        // A bucket is the (key, value) pair and one control byte (hashbrown's SwissTable).
        let pair = std::mem::size_of::<(AffinityKey, Slot)>();
        assert_eq!(pair, 32, "a 16-byte key and a 16-byte value, no padding");
        let bucket = pair + 1;
        // Worst case at any fill: a table just grown, 7/16 full (hashbrown grows at 7/8 load
        // and doubles).
        assert!(bucket * 16 / 7 <= 80, "worst case {} bytes", bucket * 16 / 7);

        let sticky = table(N, 1_000);
        for i in 0..N as u32 {
            if sticky.attach(k(i), i % 7, 0) != Attach::Pinned {
                panic!("key {i} refused");
            }
        }
        assert_eq!(sticky.len(), N);
        // Nothing was removed, so each shard's capacity() is exactly 7/8 of its buckets.
        let buckets = sticky.map.capacity() / 7 * 8;
        let bytes = buckets * bucket + SHARDS * (GROUP_WIDTH + SHARD_HEADER);
        let per_entry = bytes as f64 / N as f64;
        eprintln!("{buckets} buckets, {bytes} bytes: {per_entry:.1} bytes per entry");
        assert!(per_entry <= 80.0, "{per_entry:.1} bytes per entry");
    }
}
