//! Maglev hot paths: hashing a client address and picking its backend (per new session), and
//! building the table (per configuration change). Targets (issue 3): lookup < 20 ns, build of
//! 100 backends < 5 ms.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tether_ring::{Member, Ring, DEFAULT_SIZE};

fn pool(n: usize) -> Vec<Member> {
    (0..n).map(|i| Member::new(format!("10.0.{}.{}:5432", i / 250, i % 250 + 1), 1)).collect()
}

fn lookup(c: &mut Criterion) {
    let ring = Ring::build(&pool(100), DEFAULT_SIZE, 7).unwrap();
    let keys: Vec<[u8; 16]> =
        (0..4096u128).map(|i| (i * 0x9e37_79b9_7f4a_7c15).to_le_bytes()).collect();
    let mut i = 0;
    c.bench_function("hash_key + pick, 16-byte key, 100 backends", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let h = ring.hash_key(black_box(&keys[i]));
            ring.pick(h, |_| true)
        })
    });
    let hashes: Vec<u64> = keys.iter().map(|k| ring.hash_key(k)).collect();
    c.bench_function("pick (hash given), 100 backends", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            ring.pick(black_box(hashes[i]), |_| true)
        })
    });
    c.bench_function("pick (hash given), 10% of backends down", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            ring.pick(black_box(hashes[i]), |m| m % 10 != 0)
        })
    });
}

fn build(c: &mut Criterion) {
    let members = pool(100);
    c.bench_function("build, 100 backends, M=65537", |b| {
        b.iter(|| Ring::build(black_box(&members), DEFAULT_SIZE, 7).unwrap())
    });
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
