//! Per-source limits: open sessions, new sessions per second and new UDP flows per second.
//!
//! A **source** is a client IP in canonical form ([`AffinityKey`]: v4 and its `::ffff:` mapped
//! form are one source). The limiter keeps one small record per source in a table shared by the
//! workers: 64 shards, each a `Mutex` over a vector of records plus a hash index into it, under
//! a keyed SipHash ([`KeyedHasher`]) so that clients cannot aim their addresses at one shard or
//! one bucket chain (F9). Each call takes one shard lock, except a new source arriving at a full
//! table (see [`Limiter`]).
//!
//! Rates are token buckets: a rate of N holds at most N tokens, refills N per second, and each
//! new session (or flow) takes one. Tokens are counted in thousandths, so N per second is
//! exactly N thousandths per millisecond and the arithmetic is integer and exact.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use vocab::{AffinityKey, KeyedHasher};

/// Log2 of the number of lock shards.
const SHARD_BITS: u32 = 6;

/// Lock shards. Fixed rather than per core so that the table, and a simulation of it, behaves
/// the same on every machine; 64 matches `conntrack::Sticky` (low contention for 16 workers).
const SHARDS: usize = 1 << SHARD_BITS;

/// Most records a new source visits looking for an idle one to evict when the table is full:
/// its own shard first, then the following shards. Bounds the work an unknown (possibly spoofed)
/// source can cause; a table of at most this many sources is searched exhaustively.
const EVICT_SCAN: usize = 64;

/// Thousandths per token: a bucket refilling N tokens per second gains exactly N per ms.
const MILLI: u64 = 1_000;

/// A sweep gives memory back to the allocator when a shard's vector is this many times larger
/// than it needs to be (after a flood of sources that then went away).
const SHRINK_FACTOR: usize = 4;

/// What the limiter enforces per source, and how many sources it tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitConfig {
    /// Most TCP sessions open at once per source; `None` for no limit. `Some(0)` refuses all.
    pub max_conns: Option<u32>,
    /// New TCP sessions per source: at most N in a burst, then N per second sustained.
    pub conn_rate: Option<u32>,
    /// New UDP flows per source: at most N in a burst, then N per second sustained.
    pub flow_rate: Option<u32>,
    /// Most sources tracked at once; see [`Limiter`] for what happens when it is reached.
    pub capacity: usize,
}

/// The answer to a new session or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; the session or flow has been counted.
    Allow,
    /// The source already has `max_conns` sessions open.
    OverConns,
    /// The source used up its `conn_rate` burst; a token comes back every 1000/N ms.
    OverConnRate,
    /// The source used up its `flow_rate` burst; a token comes back every 1000/N ms.
    OverFlowRate,
    /// An unknown source, and the table is full of sources that may not be forgotten.
    TableFull,
}

/// Counters since the limiter was created: refusals by verdict, and table churn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Sessions refused with [`Verdict::OverConns`].
    pub over_conns: u64,
    /// Sessions refused with [`Verdict::OverConnRate`].
    pub over_conn_rate: u64,
    /// Flows refused with [`Verdict::OverFlowRate`].
    pub over_flow_rate: u64,
    /// Sessions and flows refused with [`Verdict::TableFull`].
    pub table_full: u64,
    /// Idle sources forgotten to make room for a new one.
    pub evicted: u64,
    /// Idle sources forgotten by [`Limiter::sweep`].
    pub swept: u64,
    /// [`Limiter::close_session`] calls with no open session to close (a caller bug).
    pub unmatched_closes: u64,
}

/// One rate limit as a token bucket, in thousandths of a token.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Thousandths gained per millisecond: numerically the rate per second.
    refill: u64,
    /// Thousandths held when full: the burst, N tokens.
    full: u64,
}

impl Bucket {
    fn new(per_second: Option<u32>) -> Option<Bucket> {
        per_second.map(|n| Bucket { refill: u64::from(n), full: u64::from(n) * MILLI })
    }

    /// The level `elapsed_ms` after it was `level`. Saturating: a source quiet for ages is full.
    fn level(&self, level: u64, elapsed_ms: u64) -> u64 {
        level.saturating_add(elapsed_ms.saturating_mul(self.refill)).min(self.full)
    }
}

/// What the limiter knows of one source. 48 bytes; the index adds a 16-byte key, an 8-byte
/// position and a control byte per source (see `memory_per_source` below).
#[derive(Clone, Copy, Debug)]
struct Source {
    key: AffinityKey,
    /// Sessions open; counted only when `max_conns` is set.
    open: u32,
    /// When the buckets were last brought up to date.
    last_ms: u64,
    /// `conn_rate` bucket level, in thousandths; unused without a `conn_rate`.
    conn_tokens: u64,
    /// `flow_rate` bucket level, in thousandths; unused without a `flow_rate`.
    flow_tokens: u64,
}

/// What a source is asking for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Session,
    Flow,
}

/// One lock's worth of the table. `index` maps each key to its record's position in `sources`
/// and holds exactly the keys of `sources`: every change goes through `insert` and `remove_at`.
/// The vector gives the eviction scan a cursor (`hand`) that goes round the shard, which a hash
/// map's iteration order (always from the same end) would not.
struct Shard {
    index: HashMap<AffinityKey, usize, KeyedHasher>,
    sources: Vec<Source>,
    /// Where the next eviction scan of this shard starts.
    hand: usize,
}

impl Shard {
    fn insert(&mut self, source: Source) {
        self.index.insert(source.key, self.sources.len());
        self.sources.push(source);
    }

    /// Forget the record at `i`; the last record moves into its place.
    fn remove_at(&mut self, i: usize) {
        let gone = self.sources.swap_remove(i);
        self.index.remove(&gone.key);
        if let Some(moved) = self.sources.get(i) {
            if let Some(position) = self.index.get_mut(&moved.key) {
                *position = i;
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    over_conns: AtomicU64,
    over_conn_rate: AtomicU64,
    over_flow_rate: AtomicU64,
    table_full: AtomicU64,
    evicted: AtomicU64,
    swept: AtomicU64,
    unmatched_closes: AtomicU64,
}

/// Counters only feed metrics: relaxed is enough, no ordering hangs on them.
fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Per-source session and flow limits, shared by every worker (`Send + Sync`; hold it in an
/// `Arc`). Every method takes `now` in milliseconds from an epoch the caller chooses (the same
/// for all callers) and never reads a clock. A `now` slightly behind one already seen (two
/// workers' clocks) counts as no time passing.
///
/// **Rates** are exact token buckets: after a quiet second a source may open N sessions at once,
/// the N+1st is refused, and one more is allowed every 1000/N ms after that (rounded up to the
/// millisecond: with N = 3 the next comes at 334 ms). Over any span of T ms a source gets at
/// most N + N x T / 1000: "at most N in a burst, then N per second sustained". Refused
/// attempts take no token, so hammering does not prolong a refusal.
///
/// **What is tracked.** A source gets a record on its first allowed session or flow, and only
/// for limits that are set: without `max_conns` and `conn_rate`, sessions are not tracked at all
/// (`open_session` is `Allow` and `close_session` a no-op), likewise flows without `flow_rate`;
/// open sessions are counted only with `max_conns`. A record is **idle** when it has no open
/// session and full buckets, at the latest one second after its last new session or flow: it is
/// then exactly what a new record would be, so forgetting it loses nothing.
///
/// **When the table is full** (F15) and a new source arrives (that the limits would allow), an
/// idle record is evicted to make room: the scan starts at a cursor in the new source's shard
/// and moves on to the following shards, visiting at most 64 records (all of them in a table of
/// at most 64). If none is idle the answer is [`Verdict::TableFull`]: unknown sources are
/// refused rather than let through unlimited, so a full table never silently stops limiting,
/// and known sources are limited exactly as before. A record with open sessions is never
/// evicted, so open counts stay exact. Size `capacity` for the number of distinct sources
/// expected in a second or so, not for those with open sessions only.
///
/// **Memory**: 73 bytes per tracked source when the shard vectors and indexes are exactly full
/// (a 48-byte record, a 24-byte index entry and hashbrown's control byte), up to about twice
/// that just after they grow: 7 to 15 MB for 100,000 sources. Nothing is allocated up front,
/// and `sweep` shrinks shards left more than four times too large.
pub struct Limiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: KeyedHasher,
    config: LimitConfig,
    conn_rate: Option<Bucket>,
    flow_rate: Option<Bucket>,
    /// Records in the table plus slots reserved by an insert in progress: reserved before an
    /// insert, released after a removal, so it never exceeds `capacity`.
    len: AtomicUsize,
    /// Records without open sessions, the only evictable ones. When it reads 0 a full table
    /// answers `TableFull` without scanning (every source holds sessions: a connection flood).
    sessionless: AtomicUsize,
    counters: Counters,
}

impl Limiter {
    /// An empty limiter. `hash_key` keys the SipHash-1-3 that places sources in shards and
    /// buckets; draw it at random once per process (see [`KeyedHasher`]).
    pub fn new(config: LimitConfig, hash_key: [u8; 16]) -> Limiter {
        let hasher = KeyedHasher::new(hash_key);
        let shards = (0..SHARDS)
            .map(|_| {
                let index = HashMap::with_hasher(hasher.clone());
                Mutex::new(Shard { index, sources: Vec::new(), hand: 0 })
            })
            .collect();
        Limiter {
            shards,
            hasher,
            config,
            conn_rate: Bucket::new(config.conn_rate),
            flow_rate: Bucket::new(config.flow_rate),
            len: AtomicUsize::new(0),
            sessionless: AtomicUsize::new(0),
            counters: Counters::default(),
        }
    }

    /// The configuration the limiter was built with.
    pub fn config(&self) -> LimitConfig {
        self.config
    }

    /// A TCP session from `ip` wants to start at `now_ms`. Checks `max_conns`, then `conn_rate`
    /// (so a source over both gets `OverConns`); if both pass, counts the session (one more
    /// open, one token less) and answers `Allow`. Call [`close_session`](Self::close_session)
    /// exactly once for each `Allow`, and never for a refusal.
    pub fn open_session(&self, ip: IpAddr, now_ms: u64) -> Verdict {
        if self.config.max_conns.is_none() && self.conn_rate.is_none() {
            return Verdict::Allow;
        }
        self.admit(AffinityKey::from_ip(ip), now_ms, Ask::Session)
    }

    /// A session that [`open_session`](Self::open_session) allowed has ended. A close with no
    /// open session to match is counted in [`LimiterStats::unmatched_closes`] and ignored.
    pub fn close_session(&self, ip: IpAddr, now_ms: u64) {
        if self.config.max_conns.is_none() {
            return;
        }
        let key = AffinityKey::from_ip(ip);
        let mut shard = self.lock(self.shard_of(&key));
        let Some(&i) = shard.index.get(&key) else {
            // A record with open sessions is never removed: this close matches no open.
            bump(&self.counters.unmatched_closes, 1);
            return;
        };
        // `index` holds positions in `sources` (see `Shard`), so `i` is in bounds.
        let source = &mut shard.sources[i];
        self.refill(source, now_ms);
        match source.open {
            // Unmatched: nothing to count down.
            0 => bump(&self.counters.unmatched_closes, 1),
            // Last session: the record may become idle once its buckets are full.
            1 => {
                source.open = 0;
                self.sessionless.fetch_add(1, Ordering::Relaxed);
            }
            // Sessions remain.
            _ => source.open -= 1,
        }
    }

    /// A new UDP flow from `ip` at `now_ms`: checks `flow_rate` and, if it passes, takes a token
    /// and answers `Allow`. Flows have no close: they only count against the rate.
    pub fn open_flow(&self, ip: IpAddr, now_ms: u64) -> Verdict {
        if self.flow_rate.is_none() {
            return Verdict::Allow;
        }
        self.admit(AffinityKey::from_ip(ip), now_ms, Ask::Flow)
    }

    /// Forget every idle source (no open session, buckets full: nothing younger than one second
    /// to remember); returns how many. Call about once a second. Holds one shard lock at a time,
    /// and shrinks shards left far larger than they need after a flood.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut removed = 0;
        for s in 0..SHARDS {
            let mut shard = self.lock(s);
            let mut gone = 0;
            let mut i = 0;
            while i < shard.sources.len() {
                if self.idle(&shard.sources[i], now_ms) {
                    // The last record moves to `i`: look at `i` again.
                    shard.remove_at(i);
                    gone += 1;
                } else {
                    i += 1;
                }
            }
            if shard.hand >= shard.sources.len() {
                shard.hand = 0;
            }
            let needed = shard.sources.len().max(16);
            if shard.sources.capacity() > SHRINK_FACTOR * needed {
                shard.sources.shrink_to(2 * needed);
                shard.index.shrink_to(2 * needed);
            }
            drop(shard);
            // Idle records have no open session: they leave `sessionless` too.
            self.sessionless.fetch_sub(gone, Ordering::Relaxed);
            self.release(gone);
            removed += gone;
        }
        bump(&self.counters.swept, removed);
        removed
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions of `ip` counted open (0 when untracked, or without `max_conns`), for the admin
    /// API.
    pub fn open_sessions(&self, ip: IpAddr) -> u32 {
        let key = AffinityKey::from_ip(ip);
        let shard = self.lock(self.shard_of(&key));
        shard.index.get(&key).map_or(0, |&i| shard.sources[i].open)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LimiterStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LimiterStats {
            over_conns: load(&c.over_conns),
            over_conn_rate: load(&c.over_conn_rate),
            over_flow_rate: load(&c.over_flow_rate),
            table_full: load(&c.table_full),
            evicted: load(&c.evicted),
            swept: load(&c.swept),
            unmatched_closes: load(&c.unmatched_closes),
        }
    }

    /// Check and count one session or flow of `key`, making room for a new source if the table
    /// is full (the policy of [`Limiter`]); counts refusals.
    fn admit(&self, key: AffinityKey, now: u64, ask: Ask) -> Verdict {
        let s = self.shard_of(&key);
        let mut budget = EVICT_SCAN;
        let verdict = match self.admit_in(s, key, now, ask, Some(&mut budget)) {
            Some(verdict) => verdict,
            // Nothing idle in the scanned part of its own shard: look in the next shards. The
            // slot freed there is not held for this source; if another new source takes it
            // first, this one is refused like any other.
            None if self.evict_elsewhere(s, now, budget) => {
                self.admit_in(s, key, now, ask, None).unwrap_or(Verdict::TableFull)
            }
            None => Verdict::TableFull,
        };
        match verdict {
            Verdict::Allow => {}
            Verdict::OverConns => bump(&self.counters.over_conns, 1),
            Verdict::OverConnRate => bump(&self.counters.over_conn_rate, 1),
            Verdict::OverFlowRate => bump(&self.counters.over_flow_rate, 1),
            Verdict::TableFull => bump(&self.counters.table_full, 1),
        }
        verdict
    }

    /// `admit` within shard `s` under its lock. `None`: the source is new, its ask passes the
    /// limits, the table is full and (if `scan` gives a budget) no idle record was found in this
    /// shard within it.
    fn admit_in(
        &self,
        s: usize,
        key: AffinityKey,
        now: u64,
        ask: Ask,
        scan: Option<&mut usize>,
    ) -> Option<Verdict> {
        let mut shard = self.lock(s);
        if let Some(&i) = shard.index.get(&key) {
            // `index` holds positions in `sources` (see `Shard`), so `i` is in bounds.
            let source = &mut shard.sources[i];
            let sessionless = source.open == 0;
            let verdict = self.charge(source, now, ask);
            if sessionless && source.open > 0 {
                self.sessionless.fetch_sub(1, Ordering::Relaxed);
            }
            return Some(verdict);
        }
        let mut fresh = self.fresh(key, now);
        let verdict = self.charge(&mut fresh, now, ask);
        if verdict != Verdict::Allow {
            // A refused new source would be stored as a fresh record: store nothing.
            return Some(verdict);
        }
        if self.reserve() {
            // Room in the table.
        } else if scan.is_some_and(|budget| self.evict_in(&mut shard, now, budget)) {
            // Took the evicted record's slot: `len` is unchanged.
        } else {
            return None;
        }
        if fresh.open == 0 {
            self.sessionless.fetch_add(1, Ordering::Relaxed);
        }
        shard.insert(fresh);
        Some(Verdict::Allow)
    }

    /// Evict one idle record from the shards after `s`, visiting at most `budget` records; on
    /// success its slot is released.
    fn evict_elsewhere(&self, s: usize, now: u64, mut budget: usize) -> bool {
        for step in 1..SHARDS {
            if budget == 0 || self.sessionless.load(Ordering::Relaxed) == 0 {
                return false;
            }
            let mut shard = self.lock((s + step) % SHARDS);
            if self.evict_in(&mut shard, now, &mut budget) {
                drop(shard);
                self.release(1);
                return true;
            }
        }
        false
    }

    /// Evict the first idle record found from the shard's cursor on, visiting at most `budget`
    /// records (and each at most once). The caller reuses or releases the slot in `len`.
    fn evict_in(&self, shard: &mut Shard, now: u64, budget: &mut usize) -> bool {
        if self.sessionless.load(Ordering::Relaxed) == 0 {
            return false;
        }
        for _ in 0..shard.sources.len().min(*budget) {
            *budget -= 1;
            if shard.hand >= shard.sources.len() {
                shard.hand = 0;
            }
            let i = shard.hand;
            if self.idle(&shard.sources[i], now) {
                // The last record moves to `i`; the hand stays on it for the next scan.
                shard.remove_at(i);
                self.sessionless.fetch_sub(1, Ordering::Relaxed);
                bump(&self.counters.evicted, 1);
                return true;
            }
            shard.hand += 1;
        }
        false
    }

    /// The record of a source never seen (or idle): nothing open, buckets full.
    fn fresh(&self, key: AffinityKey, now: u64) -> Source {
        Source {
            key,
            open: 0,
            last_ms: now,
            conn_tokens: self.conn_rate.map_or(0, |b| b.full),
            flow_tokens: self.flow_rate.map_or(0, |b| b.full),
        }
    }

    /// Check `ask` against the limits and, if it passes, count it. Refusals change nothing but
    /// the refill, which does not change what the record means.
    fn charge(&self, source: &mut Source, now: u64, ask: Ask) -> Verdict {
        self.refill(source, now);
        match ask {
            Ask::Session => {
                if let Some(max) = self.config.max_conns {
                    if source.open >= max {
                        return Verdict::OverConns;
                    }
                }
                if self.conn_rate.is_some() {
                    if source.conn_tokens < MILLI {
                        return Verdict::OverConnRate;
                    }
                    source.conn_tokens -= MILLI;
                }
                if self.config.max_conns.is_some() {
                    // Below `max`, a u32, so this cannot overflow.
                    source.open += 1;
                }
                Verdict::Allow
            }
            Ask::Flow => {
                if self.flow_rate.is_some() {
                    if source.flow_tokens < MILLI {
                        return Verdict::OverFlowRate;
                    }
                    source.flow_tokens -= MILLI;
                }
                Verdict::Allow
            }
        }
    }

    /// Bring the buckets up to `now`.
    fn refill(&self, source: &mut Source, now: u64) {
        let elapsed = now.saturating_sub(source.last_ms);
        if let Some(bucket) = self.conn_rate {
            source.conn_tokens = bucket.level(source.conn_tokens, elapsed);
        }
        if let Some(bucket) = self.flow_rate {
            source.flow_tokens = bucket.level(source.flow_tokens, elapsed);
        }
        source.last_ms = source.last_ms.max(now);
    }

    /// Whether the record is, at `now`, what a fresh one would be: no open session, buckets full.
    fn idle(&self, source: &Source, now: u64) -> bool {
        let elapsed = now.saturating_sub(source.last_ms);
        let full = |bucket: Option<Bucket>, tokens: u64| {
            bucket.map_or(true, |b| b.level(tokens, elapsed) == b.full)
        };
        source.open == 0
            && full(self.conn_rate, source.conn_tokens)
            && full(self.flow_rate, source.flow_tokens)
    }

    /// Reserve a slot for a new record, if the table has room.
    fn reserve(&self) -> bool {
        let capacity = self.config.capacity;
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |len| {
                (len < capacity).then_some(len + 1)
            })
            .is_ok()
    }

    /// Free the slots of `n` records that have left the table.
    fn release(&self, n: usize) {
        if n > 0 {
            self.len.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// The shard of `key`. Skips the hash's top 7 bits, which std's `HashMap` (hashbrown) uses
    /// as the tag inside the shard: taking the shard from them would leave every key of a shard
    /// with nearly the same tag (dashmap skips them for the same reason).
    fn shard_of(&self, key: &AffinityKey) -> usize {
        shard_index(&self.hasher, key)
    }

    /// The lock of shard `s`. A poisoned lock is taken anyway: nothing in this module can panic
    /// while holding one with the records half-changed (`Shard::insert` and `remove_at` keep
    /// `index` and `sources` in step, and allocation failure aborts), and traffic must not
    /// panic the process.
    fn lock(&self, s: usize) -> MutexGuard<'_, Shard> {
        self.shards[s].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shard of `key` under `hasher` (see [`Limiter::shard_of`]).
fn shard_index(hasher: &KeyedHasher, key: &AffinityKey) -> usize {
    ((hasher.hash_one(key) << 7) >> (64 - SHARD_BITS)) as usize
}

// The hash key is the flooding protection: never print it.
impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use conntrack::testutil::Rng;

    const KEY: [u8; 16] = [7; 16];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn config(
        max_conns: Option<u32>,
        conn_rate: Option<u32>,
        flow_rate: Option<u32>,
    ) -> LimitConfig {
        LimitConfig { max_conns, conn_rate, flow_rate, capacity: 1_000 }
    }

    fn limiter(config: LimitConfig) -> Limiter {
        Limiter::new(config, KEY)
    }

    /// Records per shard.
    fn loads(limiter: &Limiter) -> Vec<usize> {
        (0..SHARDS).map(|s| limiter.lock(s).sources.len()).collect()
    }

    /// `len` and the per-shard structures agree, and so do `sessionless` and the records.
    fn assert_consistent(limiter: &Limiter) {
        let mut records = 0;
        let mut sessionless = 0;
        for s in 0..SHARDS {
            let shard = limiter.lock(s);
            assert_eq!(shard.index.len(), shard.sources.len());
            for (i, source) in shard.sources.iter().enumerate() {
                assert_eq!(shard.index.get(&source.key), Some(&i));
                assert_eq!(shard_index(&limiter.hasher, &source.key), s);
            }
            records += shard.sources.len();
            sessionless += shard.sources.iter().filter(|source| source.open == 0).count();
        }
        assert_eq!(limiter.len(), records);
        assert!(records <= limiter.config.capacity);
        assert_eq!(limiter.sessionless.load(Ordering::Relaxed), sessionless);
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<Limiter>();
        let debug = format!("{:?}", limiter(config(Some(1), None, None)));
        assert!(debug.contains("len: 0") && !debug.contains("7, 7"), "{debug}");
    }

    /// The memory per source claimed in the crate docs.
    #[test]
    fn memory_per_source() {
        assert_eq!(std::mem::size_of::<Source>(), 48);
        assert_eq!(std::mem::size_of::<(AffinityKey, usize)>(), 24);
    }

    // ---- max_conns ----

    #[test]
    fn max_conns_is_exact_at_the_threshold() {
        let l = limiter(config(Some(3), None, None));
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(l.open_session(a, 0), Verdict::Allow);
        }
        assert_eq!(l.open_session(a, 0), Verdict::OverConns);
        assert_eq!(l.open_session(a, 60_000), Verdict::OverConns, "time does not close sessions");
        assert_eq!(l.open_sessions(a), 3);
        l.close_session(a, 60_001);
        assert_eq!(l.open_session(a, 60_002), Verdict::Allow);
        assert_eq!(l.open_session(a, 60_002), Verdict::OverConns);
        assert_eq!(l.stats().over_conns, 3);
        for _ in 0..3 {
            l.close_session(a, 60_003);
        }
        assert_eq!(l.open_sessions(a), 0);
        assert_consistent(&l);
    }

    #[test]
    fn unmatched_closes_are_counted_and_never_underflow() {
        let l = limiter(config(Some(1), None, None));
        let a = ip("192.0.2.1");
        l.close_session(a, 0); // never seen
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        l.close_session(a, 1);
        l.close_session(a, 2); // one too many
        assert_eq!(l.stats().unmatched_closes, 2);
        assert_eq!(l.open_sessions(a), 0);
        assert_eq!(l.open_session(a, 3), Verdict::Allow);
        assert_eq!(l.open_session(a, 3), Verdict::OverConns);
        assert_consistent(&l);
    }

    // ---- rates ----

    #[test]
    fn conn_rate_allows_a_burst_of_n_then_one_per_interval() {
        let l = limiter(config(None, Some(4), None));
        let a = ip("192.0.2.1");
        for _ in 0..4 {
            assert_eq!(l.open_session(a, 1_000), Verdict::Allow);
        }
        assert_eq!(l.open_session(a, 1_000), Verdict::OverConnRate);
        // One token every 1000 / 4 = 250 ms.
        assert_eq!(l.open_session(a, 1_249), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 1_250), Verdict::Allow);
        assert_eq!(l.open_session(a, 1_250), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 1_499), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 1_500), Verdict::Allow);
        // A quiet second refills the whole burst, and no more.
        for _ in 0..4 {
            assert_eq!(l.open_session(a, 2_500), Verdict::Allow);
        }
        assert_eq!(l.open_session(a, 2_500), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 100_000), Verdict::Allow);
        assert_eq!(l.stats().over_conn_rate, 5);
        // Without max_conns, sessions are not counted open: nothing to close.
        assert_eq!(l.open_sessions(a), 0);
    }

    #[test]
    fn rates_that_do_not_divide_a_second_recover_at_the_next_millisecond() {
        let l = limiter(config(None, Some(3), Some(7)));
        let a = ip("2001:db8::1");
        for _ in 0..3 {
            assert_eq!(l.open_session(a, 0), Verdict::Allow);
        }
        assert_eq!(l.open_session(a, 333), Verdict::OverConnRate); // 999 thousandths
        assert_eq!(l.open_session(a, 334), Verdict::Allow); // 1002
        assert_eq!(l.open_session(a, 666), Verdict::OverConnRate); // 2 + 332 x 3 = 998
        assert_eq!(l.open_session(a, 667), Verdict::Allow);
        let b = ip("2001:db8::2");
        for _ in 0..7 {
            assert_eq!(l.open_flow(b, 0), Verdict::Allow);
        }
        assert_eq!(l.open_flow(b, 142), Verdict::OverFlowRate); // 994
        assert_eq!(l.open_flow(b, 143), Verdict::Allow); // 1001
    }

    #[test]
    fn refused_attempts_take_no_token() {
        let l = limiter(config(None, Some(2), None));
        let a = ip("192.0.2.1");
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        for t in 0..500 {
            assert_eq!(l.open_session(a, t), Verdict::OverConnRate);
        }
        assert_eq!(l.open_session(a, 500), Verdict::Allow);
    }

    #[test]
    fn flow_rate_is_exact_and_independent_of_sessions() {
        let l = limiter(config(Some(1), Some(1), Some(5)));
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(l.open_flow(a, 0), Verdict::Allow);
        }
        assert_eq!(l.open_flow(a, 0), Verdict::OverFlowRate);
        // Flows used up their bucket, not the session bucket or the open count.
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        assert_eq!(l.open_session(a, 0), Verdict::OverConns);
        assert_eq!(l.open_flow(a, 199), Verdict::OverFlowRate);
        assert_eq!(l.open_flow(a, 200), Verdict::Allow);
        l.close_session(a, 200);
        assert_eq!(l.open_session(a, 200), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 1_000), Verdict::Allow);
        let s = l.stats();
        assert_eq!((s.over_flow_rate, s.over_conns, s.over_conn_rate), (2, 1, 1));
    }

    #[test]
    fn over_conns_is_reported_before_over_conn_rate() {
        let l = limiter(config(Some(1), Some(1), None));
        let a = ip("192.0.2.1");
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        assert_eq!(l.open_session(a, 0), Verdict::OverConns);
        l.close_session(a, 0);
        assert_eq!(l.open_session(a, 0), Verdict::OverConnRate);
    }

    #[test]
    fn zero_limits_refuse_everything_and_store_nothing() {
        let l = limiter(config(Some(0), None, Some(0)));
        assert_eq!(l.open_session(ip("192.0.2.1"), 0), Verdict::OverConns);
        assert_eq!(l.open_flow(ip("192.0.2.1"), 0), Verdict::OverFlowRate);
        let l2 = limiter(config(None, Some(0), None));
        assert_eq!(l2.open_session(ip("192.0.2.1"), 5_000), Verdict::OverConnRate);
        assert!(l.is_empty() && l2.is_empty());
    }

    #[test]
    fn without_limits_nothing_is_tracked() {
        let l = limiter(config(None, None, None));
        for n in 0..100 {
            assert_eq!(l.open_session(v4(n), 0), Verdict::Allow);
            assert_eq!(l.open_flow(v4(n), 0), Verdict::Allow);
            l.close_session(v4(n), 0);
        }
        assert!(l.is_empty());
        assert_eq!(l.stats(), LimiterStats::default());
        // Flows only tracked when a flow rate is set, and sessions only when a session limit is.
        let flows = limiter(config(None, None, Some(10)));
        assert_eq!(flows.open_session(v4(1), 0), Verdict::Allow);
        assert!(flows.is_empty());
        assert_eq!(flows.open_flow(v4(1), 0), Verdict::Allow);
        assert_eq!(flows.len(), 1);
    }

    // ---- sources ----

    #[test]
    fn sources_are_independent() {
        let l = limiter(config(Some(2), Some(3), Some(1)));
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        assert_eq!(l.open_session(a, 0), Verdict::Allow);
        assert_eq!(l.open_session(a, 0), Verdict::OverConns);
        assert_eq!(l.open_flow(a, 0), Verdict::Allow);
        assert_eq!(l.open_flow(a, 0), Verdict::OverFlowRate);
        assert_eq!(l.open_session(b, 0), Verdict::Allow);
        assert_eq!(l.open_session(b, 0), Verdict::Allow);
        assert_eq!(l.open_flow(b, 0), Verdict::Allow);
        assert_eq!((l.open_sessions(a), l.open_sessions(b)), (2, 2));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn v4_and_its_mapped_form_are_one_source() {
        let l = limiter(config(Some(2), None, Some(1)));
        let (plain, mapped) = (ip("192.0.2.1"), ip("::ffff:192.0.2.1"));
        assert_eq!(l.open_session(plain, 0), Verdict::Allow);
        assert_eq!(l.open_session(mapped, 0), Verdict::Allow);
        assert_eq!(l.open_session(plain, 0), Verdict::OverConns);
        assert_eq!(l.open_sessions(mapped), 2);
        l.close_session(mapped, 0);
        assert_eq!(l.open_session(plain, 0), Verdict::Allow);
        assert_eq!(l.open_flow(mapped, 0), Verdict::Allow);
        assert_eq!(l.open_flow(plain, 0), Verdict::OverFlowRate);
        // The IPv4-compatible form is another source.
        assert_eq!(l.open_flow(ip("::192.0.2.1"), 0), Verdict::Allow);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_clock_behind_counts_as_no_time() {
        let l = limiter(config(None, Some(1), None));
        let a = ip("192.0.2.1");
        assert_eq!(l.open_session(a, 10_000), Verdict::Allow);
        assert_eq!(l.open_session(a, 9_000), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 10_999), Verdict::OverConnRate);
        assert_eq!(l.open_session(a, 11_000), Verdict::Allow);
    }

    // ---- full table (F15) ----

    fn full_config(capacity: usize) -> LimitConfig {
        LimitConfig { max_conns: Some(2), conn_rate: None, flow_rate: Some(2), capacity }
    }

    #[test]
    fn idle_sources_are_evicted_for_new_ones() {
        let l = limiter(full_config(4));
        for n in 0..4 {
            assert_eq!(l.open_flow(v4(n), 0), Verdict::Allow);
        }
        // Buckets not yet full (one token of two used, back at 500 ms): nothing is idle.
        assert_eq!(l.open_flow(v4(100), 499), Verdict::TableFull);
        // Full buckets from 500 ms: each new source takes an idle one's place.
        for n in 100..104 {
            assert_eq!(l.open_flow(v4(n), 500 + u64::from(n)), Verdict::Allow, "{n}");
            assert_eq!(l.len(), 4);
        }
        // The newcomers are not idle before their own buckets refill.
        assert_eq!(l.open_flow(v4(104), 1_099), Verdict::TableFull);
        assert_eq!(l.open_flow(v4(104), 1_100), Verdict::Allow);
        let s = l.stats();
        assert_eq!((s.table_full, s.evicted), (2, 5));
        assert_consistent(&l);
    }

    #[test]
    fn sources_with_open_sessions_are_never_evicted() {
        let l = limiter(full_config(4));
        for n in 0..4 {
            assert_eq!(l.open_session(v4(n), 0), Verdict::Allow);
        }
        for t in [0, 1_000, 1_000_000] {
            assert_eq!(l.open_session(v4(100), t), Verdict::TableFull);
            assert_eq!(l.open_flow(v4(101), t), Verdict::TableFull);
        }
        assert_eq!(l.stats().evicted, 0);
        // Limits on the known sources still hold, exactly.
        assert_eq!(l.open_session(v4(0), 1_000_000), Verdict::Allow);
        assert_eq!(l.open_session(v4(0), 1_000_000), Verdict::OverConns);
        assert_eq!(l.open_flow(v4(1), 1_000_000), Verdict::Allow);
        assert_eq!(l.open_flow(v4(1), 1_000_000), Verdict::Allow);
        assert_eq!(l.open_flow(v4(1), 1_000_000), Verdict::OverFlowRate);
        for n in 0..4 {
            assert_eq!(l.open_sessions(v4(n)), if n == 0 { 2 } else { 1 });
        }
        // Once a source has closed all its sessions (and its buckets are full) it may go.
        l.close_session(v4(2), 1_000_000);
        assert_eq!(l.open_session(v4(100), 1_000_000), Verdict::Allow);
        assert_eq!(l.open_sessions(v4(2)), 0);
        assert_eq!(l.open_session(v4(101), 1_000_000), Verdict::TableFull);
        let s = l.stats();
        assert_eq!((s.table_full, s.evicted, s.over_conns, s.over_flow_rate), (7, 1, 1, 1));
        assert_consistent(&l);
    }

    #[test]
    fn a_full_table_of_many_shards_evicts_anywhere_within_the_scan() {
        // 64 idle sources fill a 64-source table: whatever shard a new source lands in, the
        // scan reaches every record.
        let l = limiter(full_config(EVICT_SCAN));
        for n in 0..EVICT_SCAN as u32 {
            assert_eq!(l.open_flow(v4(n), 0), Verdict::Allow);
        }
        // All but one hold a session: the new sources must find the single idle one.
        for n in 1..EVICT_SCAN as u32 {
            assert_eq!(l.open_session(v4(n), 0), Verdict::Allow);
        }
        assert_eq!(l.open_session(v4(1_000), 1_000), Verdict::Allow);
        assert_eq!(l.open_sessions(v4(0)), 0);
        assert_eq!(l.open_session(v4(1_001), 1_000), Verdict::TableFull);
        assert_consistent(&l);
    }

    #[test]
    fn a_large_full_table_keeps_admitting_while_sources_go_idle() {
        // New sources at half the capacity per second, no sweep: once full, the table holds
        // the last two seconds' sources, the older half idle, and a bounded scan finds them.
        let capacity = 2_000;
        let l = limiter(LimitConfig { capacity, ..full_config(0) });
        let mut next = 0u32;
        for second in 0..10u64 {
            for i in 0..capacity as u64 / 2 {
                let now = second * 1_000 + i / 4;
                assert_eq!(l.open_flow(v4(next), now), Verdict::Allow, "{second}");
                next += 1;
            }
        }
        assert_eq!(l.len(), capacity);
        assert_eq!(l.stats().evicted, 8 * capacity as u64 / 2);
        assert_eq!(l.stats().table_full, 0);
        assert_consistent(&l);
    }

    // ---- sweep ----

    #[test]
    fn sweep_forgets_idle_sources_only() {
        let l = limiter(LimitConfig { max_conns: Some(5), conn_rate: Some(2), ..full_config(100) });
        assert_eq!(l.open_session(v4(1), 0), Verdict::Allow); // open
        assert_eq!(l.open_session(v4(2), 0), Verdict::Allow);
        l.close_session(v4(2), 0); // closed, bucket refilling until 500
        assert_eq!(l.open_flow(v4(3), 200), Verdict::Allow); // flow bucket full at 700
        assert_eq!(l.sweep(499), 0);
        assert_eq!(l.sweep(500), 1);
        assert_eq!(l.sweep(699), 0);
        assert_eq!(l.sweep(700), 1);
        assert_eq!(l.sweep(1_000_000), 0);
        assert_eq!(l.len(), 1);
        assert_eq!(l.open_sessions(v4(1)), 1);
        l.close_session(v4(1), 1_000_000);
        assert_eq!(l.sweep(1_000_000), 1);
        assert!(l.is_empty());
        assert_eq!(l.stats().swept, 3);
        assert_consistent(&l);
    }

    #[test]
    fn sweep_gives_memory_back_after_a_flood() {
        let l = limiter(LimitConfig { capacity: 100_000, ..full_config(0) });
        for n in 0..50_000 {
            assert_eq!(l.open_flow(v4(n), 0), Verdict::Allow);
        }
        assert_eq!(l.sweep(1_000), 50_000);
        for s in 0..SHARDS {
            assert!(l.lock(s).sources.capacity() <= 2 * 16, "shard {s}");
        }
        assert!(l.is_empty());
        assert_consistent(&l);
    }

    // ---- threads ----

    #[test]
    fn two_threads_keep_open_counts_exact() {
        // Each thread holds at most two sessions of each source, so with max_conns 4 every open
        // must be allowed; a lost update would show as a refusal or a count left over.
        let l = limiter(LimitConfig { capacity: 8, ..config(Some(4), None, None) });
        let sources: Vec<IpAddr> = (0..4).map(v4).collect();
        std::thread::scope(|scope| {
            for thread in 0..2u64 {
                let (l, sources) = (&l, &sources);
                scope.spawn(move || {
                    for round in 0..20_000u64 {
                        let a = sources[((round + thread) % 4) as usize];
                        let now = round;
                        assert_eq!(l.open_session(a, now), Verdict::Allow);
                        assert_eq!(l.open_session(a, now), Verdict::Allow);
                        l.close_session(a, now);
                        l.close_session(a, now);
                        if thread == 1 && round % 64 == 0 {
                            l.sweep(now);
                        }
                    }
                });
            }
        });
        for &a in &sources {
            assert_eq!(l.open_sessions(a), 0);
        }
        assert_eq!(l.stats().unmatched_closes, 0);
        assert_consistent(&l);
        let left = l.len();
        assert_eq!(l.sweep(u64::MAX), left);
        assert!(l.is_empty());
    }

    // ---- hash flooding (F9) ----

    #[test]
    fn addresses_aimed_at_one_shard_under_a_known_key_spread_under_a_secret_one() {
        // The attacker knows (or guesses) a key and picks 10k addresses that share a shard.
        let known = KeyedHasher::new([0; 16]);
        let target = 0;
        let aimed: Vec<IpAddr> = (0x0a00_0000u32..)
            .map(v4)
            .filter(|&a| shard_index(&known, &AffinityKey::from_ip(a)) == target)
            .take(10_000)
            .collect();
        let flows = LimitConfig { capacity: 10_000, ..config(None, None, Some(1)) };
        // Under the key they aimed at, it works: one shard holds everything.
        let exposed = Limiter::new(flows, [0; 16]);
        for &a in &aimed {
            assert_eq!(exposed.open_flow(a, 0), Verdict::Allow);
        }
        assert_eq!(loads(&exposed)[target], 10_000);
        // Under the process's secret key the same addresses spread evenly.
        let secret =
            Limiter::new(flows, [0x5a, 0x11, 0xc3, 9, 200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        for &a in &aimed {
            assert_eq!(secret.open_flow(a, 0), Verdict::Allow);
        }
        let loads = loads(&secret);
        let average = 10_000 / SHARDS;
        let max = *loads.iter().max().unwrap();
        assert!(max <= 3 * average, "max shard load {max}, average {average}: {loads:?}");
        assert!(loads.iter().all(|&n| n > 0), "{loads:?}");
        assert_consistent(&secret);
    }

    // ---- simulation against a reference model ----

    /// The reference: every source ever seen, unbounded, with rates as GCRA (the "virtual
    /// scheduling" form of a token bucket, ITU-T I.371): a rate of N admits at `t` iff its
    /// theoretical arrival time is at most `t + (N - 1)` intervals. Time is in units of 1/N ms,
    /// so an interval (1000/N ms) is exactly 1000 units. Shares no code with the limiter.
    #[derive(Clone, Copy, Debug, Default)]
    struct ModelSource {
        open: u32,
        conn_tat: u64,
        flow_tat: u64,
    }

    struct Model {
        config: LimitConfig,
        sources: HashMap<[u8; 16], ModelSource>,
    }

    fn gcra(rate: Option<u32>, tat: &mut u64, now: u64) -> bool {
        let Some(n) = rate else { return true };
        let n = u64::from(n);
        let t = now * n;
        let start = (*tat).max(t);
        // `start - t` units of the burst are in use; N - 1 intervals may be ahead of `t`.
        if n == 0 || start - t > (n - 1) * 1_000 {
            return false;
        }
        *tat = start + 1_000;
        true
    }

    fn canonical(ip: IpAddr) -> [u8; 16] {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    impl Model {
        fn session(&mut self, ip: IpAddr, now: u64) -> Verdict {
            let c = self.config;
            let mut s = self.sources.get(&canonical(ip)).copied().unwrap_or_default();
            if c.max_conns.is_some_and(|max| s.open >= max) {
                return Verdict::OverConns;
            }
            if !gcra(c.conn_rate, &mut s.conn_tat, now) {
                return Verdict::OverConnRate;
            }
            if c.max_conns.is_some() {
                s.open += 1;
            }
            self.sources.insert(canonical(ip), s);
            Verdict::Allow
        }

        fn flow(&mut self, ip: IpAddr, now: u64) -> Verdict {
            let mut s = self.sources.get(&canonical(ip)).copied().unwrap_or_default();
            if !gcra(self.config.flow_rate, &mut s.flow_tat, now) {
                return Verdict::OverFlowRate;
            }
            self.sources.insert(canonical(ip), s);
            Verdict::Allow
        }

        fn close(&mut self, ip: IpAddr) {
            if self.config.max_conns.is_none() {
                return;
            }
            if let Some(s) = self.sources.get_mut(&canonical(ip)) {
                s.open = s.open.saturating_sub(1);
            }
        }

        /// Whether the source is what a never-seen one would be at `now`.
        fn idle(&self, ip: IpAddr, now: u64) -> bool {
            self.sources.get(&canonical(ip)).map_or(true, |s| self.idle_source(s, now))
        }

        fn idle_source(&self, s: &ModelSource, now: u64) -> bool {
            let c = self.config;
            let caught_up =
                |rate: Option<u32>, tat: u64| rate.map_or(true, |n| tat <= now * u64::from(n));
            s.open == 0 && caught_up(c.conn_rate, s.conn_tat) && caught_up(c.flow_rate, s.flow_tat)
        }

        /// Sources the limiter must be tracking at `now`.
        fn busy(&self, now: u64) -> usize {
            self.sources.values().filter(|s| !self.idle_source(s, now)).count()
        }
    }

    fn pick_limit(rng: &mut Rng) -> Option<u32> {
        match rng.below(6) {
            0 => None,
            1 => Some(0),
            n => Some(n as u32 - 1 + rng.below(3) as u32),
        }
    }

    /// One seeded run: random ops on a small pool of sources (v4, the same in mapped form, v6)
    /// against the model. The limiter must agree with the model exactly, except that it may
    /// answer `TableFull` to a source the model holds as idle, and only when it is full; with a
    /// capacity up to `EVICT_SCAN` (an exhaustive scan), only when every source it tracks is busy.
    fn simulate(seed: u64) {
        let mut rng = Rng(seed);
        let capacity = [1, 3, 8, 64, 1_000][rng.below(5) as usize];
        let config = LimitConfig {
            max_conns: pick_limit(&mut rng),
            conn_rate: pick_limit(&mut rng),
            flow_rate: pick_limit(&mut rng),
            capacity,
        };
        let limiter = Limiter::new(config, rng.next().to_le_bytes().repeat(2).try_into().unwrap());
        let mut model = Model { config, sources: HashMap::new() };
        let pool: Vec<IpAddr> = (0..1 + rng.below(40))
            .map(|n| match n % 3 {
                0 => v4(0xc000_0200 + n as u32),
                1 => IpAddr::V6(Ipv4Addr::from(0xc000_0200 + n as u32 - 1).to_ipv6_mapped()),
                _ => IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(n))),
            })
            .collect();
        let mut now = rng.below(1 << 40);
        for step in 0..3_000 {
            now += [0, 0, 1, 7, 100, 400, 1_500][rng.below(7) as usize];
            let a = pool[rng.below(pool.len() as u64) as usize];
            let context = format!("seed {seed} step {step} t {now} {a} {config:?}");
            match rng.below(10) {
                0..=3 => {
                    let got = limiter.open_session(a, now);
                    check(&limiter, &model, got, a, now, &context);
                    if got != Verdict::TableFull {
                        assert_eq!(got, model.session(a, now), "{context}");
                    }
                }
                4..=5 => {
                    limiter.close_session(a, now);
                    model.close(a);
                }
                6..=8 => {
                    let got = limiter.open_flow(a, now);
                    check(&limiter, &model, got, a, now, &context);
                    if got != Verdict::TableFull {
                        assert_eq!(got, model.flow(a, now), "{context}");
                    }
                }
                _ => {
                    limiter.sweep(now);
                    // Every idle record is gone and no busy one: exactly the model's busy set.
                    assert_eq!(limiter.len(), model.busy(now), "{context}");
                }
            }
            let expected = model.sources.get(&canonical(a)).map_or(0, |s| s.open);
            assert_eq!(limiter.open_sessions(a), expected, "{context}");
            assert!(limiter.len() <= capacity, "{context}");
        }
        assert_consistent(&limiter);
    }

    fn check(limiter: &Limiter, model: &Model, got: Verdict, a: IpAddr, now: u64, context: &str) {
        if got != Verdict::TableFull {
            return;
        }
        assert!(model.idle(a, now), "TableFull for a source that must be tracked: {context}");
        assert_eq!(limiter.len(), limiter.config.capacity, "TableFull with room: {context}");
        if limiter.config.capacity <= EVICT_SCAN {
            assert_eq!(model.busy(now), limiter.config.capacity, "idle record kept: {context}");
        }
    }

    #[test]
    fn simulation_agrees_with_the_reference_model() {
        for seed in 0..300 {
            simulate(seed);
        }
    }
}
