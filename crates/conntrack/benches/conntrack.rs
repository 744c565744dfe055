//! Sticky table hot paths: lookup of a pinned client (every new session) and attach/detach
//! (session start and end), alone and with a second thread hammering the same table.
//! Target (issue 3): lookup < 100 ns. Also the UDP flow table's per-datagram lookup (issue 4),
//! by address and by session key (issue 17).

// Threads are this bench's harness (lookups under a second thread's writes), not the crate's.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tether_conntrack::{
    AffinityKey, FlowBudget, FlowKey, FlowTable, KeyedHasher, Sticky, StickyConfig,
};

const KEYS: u32 = 100_000;

fn key(i: u32) -> AffinityKey {
    AffinityKey::from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
}

fn filled() -> Arc<Sticky> {
    let sticky = Sticky::new(StickyConfig { capacity: 1 << 20, timeout_ms: 60_000 }, [7; 16]);
    for i in 0..KEYS {
        sticky.attach(key(i), i % 10, 0);
        sticky.detach(key(i), 0);
    }
    Arc::new(sticky)
}

/// Runs `f` while another thread does attach/detach on the same table (two workers).
fn contended<R>(sticky: &Arc<Sticky>, f: impl FnOnce() -> R) -> R {
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (sticky, stop) = (Arc::clone(sticky), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 7919) % KEYS;
                sticky.attach(key(i), 1, 10);
                sticky.detach(key(i), 10);
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    r
}

fn sticky(c: &mut Criterion) {
    let sticky = filled();
    let mut i = 0u32;
    // A hot set that stays in cache: the CPU cost of a lookup without memory latency.
    c.bench_function("sticky lookup, 1k hot keys of 100k", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            sticky.lookup(black_box(key(i)), 20)
        })
    });
    c.bench_function("sticky lookup, 100k entries", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            sticky.lookup(black_box(key(i)), 20)
        })
    });
    // The floor: std's HashMap (no shards, no locks) under the same keyed SipHash, same keys.
    // What it costs is the hash plus the cache and TLB misses of a table larger than L2.
    let plain: std::collections::HashMap<AffinityKey, u32, KeyedHasher> = {
        let mut map = std::collections::HashMap::with_hasher(KeyedHasher::new([7; 16]));
        map.extend((0..KEYS).map(|i| (key(i), i % 10)));
        map
    };
    c.bench_function("std HashMap lookup (baseline), 1k hot keys of 100k", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            plain.get(&black_box(key(i))).copied()
        })
    });
    c.bench_function("std HashMap lookup (baseline), 100k entries", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            plain.get(&black_box(key(i))).copied()
        })
    });
    c.bench_function("sticky attach+detach, 100k entries", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            sticky.attach(black_box(key(i)), 3, 20);
            sticky.detach(key(i), 20);
        })
    });
    contended(&sticky, || {
        c.bench_function("sticky lookup, second thread attaching", |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                sticky.lookup(black_box(key(i)), 20)
            })
        });
        c.bench_function("sticky attach+detach, second thread attaching", |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                sticky.attach(black_box(key(i)), 3, 20);
                sticky.detach(key(i), 20);
            })
        });
    });
}

fn flow_key(i: u32) -> FlowKey {
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 40_000);
    FlowKey::new(client, "192.0.2.1:53".parse().unwrap())
}

fn flows(c: &mut Criterion) {
    let budget = Arc::new(FlowBudget::new(1 << 20));
    let mut table: FlowTable<u32> = FlowTable::new(budget, 60_000, [7; 16]);
    for i in 0..KEYS {
        // Ok by construction: the budget is ten times the keys.
        let _ = table.insert(flow_key(i), i % 10, i, 0);
    }
    // Keys built up front: the bench measures the lookup, not building the key.
    let keys: Vec<FlowKey> = (0..KEYS).map(flow_key).collect();
    let mut i = 0usize;
    c.bench_function("flow get (refresh), 1k hot keys of 100k", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            table.get(black_box(&keys[i]), 20).map(|flow| *flow.value())
        })
    });
    c.bench_function("flow get (refresh), 100k flows", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS as usize;
            table.get(black_box(&keys[i]), 20).map(|flow| *flow.value())
        })
    });
}

/// The per-datagram cost of `--udp-session-key` (issue 17): a datagram's flow found by the key
/// in its payload (take the bytes, a 128-bit SipHash under the secret, then `peek` and `get`:
/// what `Udp::forward` does for a keyed service) against by its address (`FlowKey::new`,
/// `get`), both from the datagram and its peer, in tables of 100k flows.
fn session_keys(c: &mut Criterion) {
    let key = vocab::SessionKey { offset: 0, len: 8 };
    let secret = [9; 16];
    let listener: SocketAddr = "192.0.2.1:7777".parse().unwrap();
    let payload = |i: u32| {
        let mut d = [0x5au8; 64];
        d[..8].copy_from_slice(&(u64::from(i) * 0x9e37_79b9).to_be_bytes());
        d
    };
    let peer = |i: u32| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 40_000);
    let budget = Arc::new(FlowBudget::new(1 << 21));
    let mut keyed: FlowTable<u32> = FlowTable::new(Arc::clone(&budget), 60_000, [7; 16]);
    let mut by_address: FlowTable<u32> = FlowTable::new(budget, 60_000, [7; 16]);
    for i in 0..KEYS {
        let token = key.token(&payload(i)).map(|t| vocab::session::digest(t, secret));
        let _ = keyed.insert(FlowKey::session(token.unwrap()), 1, i, 0);
        let _ = by_address.insert(FlowKey::new(peer(i), listener), 1, i, 0);
    }
    let datagrams: Vec<([u8; 64], SocketAddr)> = (0..KEYS).map(|i| (payload(i), peer(i))).collect();
    let mut i = 0usize;
    // 1k hot flows (in cache: the work itself) and all 100k (cache misses on top).
    for (hot, label) in [(1000, "1k hot of 100k flows"), (KEYS as usize, "100k flows")] {
        c.bench_function(&format!("datagram's flow by address, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % hot;
                let (_, from) = black_box(&datagrams[i]);
                by_address.get(&FlowKey::new(*from, listener), 20).map(|flow| *flow.value())
            })
        });
        c.bench_function(&format!("datagram's flow by session key, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % hot;
                let (data, _) = black_box(&datagrams[i]);
                let token = key.token(data)?;
                let k = FlowKey::session(vocab::session::digest(token, secret));
                keyed.peek(&k)?;
                keyed.get(&k, 20).map(|flow| *flow.value())
            })
        });
    }
}

criterion_group!(benches, sticky, flows, session_keys);
criterion_main!(benches);
