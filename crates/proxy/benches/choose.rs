//! The cost of bounded-load choice (issue 17, `--balance-factor`) on the path of a new client
//! without a pin: `Snapshot::choose` with and without a factor, over pools of 4, 16 and 100
//! backends with uneven loads (one backend in four carries five times the others).

use std::hint::black_box;
use std::sync::Arc;

use conntrack::{Sticky, StickyConfig};
use criterion::{criterion_group, criterion_main, Criterion};
use tether_proxy::{BackendState, Guards, Settings, Snapshot};

fn snapshot(n: usize, factor: Option<f64>) -> Snapshot {
    let backends: Vec<(Arc<BackendState>, u32)> = (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:5432", i / 250, i % 250 + 1).parse().unwrap();
            let b = Arc::new(BackendState::new(i as u32, format!("b{i}"), addr));
            for _ in 0..if i % 4 == 0 { 50 } else { 10 } {
                assert!(b.try_reserve());
            }
            (b, 1)
        })
        .collect();
    let minute = std::time::Duration::from_secs(60);
    let settings = Settings { balance_factor: factor, ..Settings::basic(minute, minute) };
    let sticky = Arc::new(Sticky::new(StickyConfig { capacity: 1024, timeout_ms: 1000 }, [7; 16]));
    Snapshot::new("db".into(), 0, settings, backends, 65_537, 7, sticky, Guards::default()).unwrap()
}

fn choose(c: &mut Criterion) {
    let hashes: Vec<u64> = (0..4096u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    for n in [4, 16, 100] {
        for (label, factor) in [("off", None), ("1.25", Some(1.25))] {
            let s = snapshot(n, factor);
            let mut i = 0;
            c.bench_function(&format!("choose, {n} backends, balance factor {label}"), |b| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    s.choose(black_box(hashes[i]), 0, |_| false)
                })
            });
        }
    }
}

criterion_group!(benches, choose);
criterion_main!(benches);
