//! Clients stick to one backend; the table spreads them fairly and by weight; two processes with
//! the same pool agree on every client.

mod common;

use std::collections::HashMap;

use common::*;

#[test]
fn each_source_stays_on_one_backend_and_backends_share_fairly() {
    let pool = backends(1, 3);
    let t = tether(1, &pool, &[]);
    let mut owner: HashMap<u32, String> = HashMap::new();
    for round in 0..3 {
        for i in 0..200 {
            let name = ask_name(client_ip(i), t.addr()).expect("connection through tether");
            match owner.get(&i) {
                None => {
                    owner.insert(i, name);
                }
                Some(first) => {
                    assert_eq!(&name, first, "source {} moved in round {round}", client_ip(i))
                }
            }
        }
    }
    let mut per_backend: HashMap<&str, usize> = HashMap::new();
    for name in owner.values() {
        *per_backend.entry(name).or_default() += 1;
    }
    // 200 keys over 3 equal backends: mean 66.7, sd 6.7; 40 is four sd below.
    for b in &pool {
        let got = per_backend.get(b.name()).copied().unwrap_or(0);
        assert!(got >= 40, "{} got {got} of 200 sources: {per_backend:?}", b.name());
    }
    // The backends saw the sessions tether made for them, and nothing else.
    let total: usize = pool.iter().map(Backend::connections).sum();
    assert_eq!(total, 600);
}

#[test]
fn five_tuple_affinity_spreads_one_source_over_backends() {
    let pool = backends(2, 3);
    let t = tether(2, &pool, &["--affinity", "5tuple"]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60 {
        seen.insert(ask_name(client_ip(7), t.addr()).unwrap());
    }
    // With source affinity all 60 would land on one backend; hashed per connection, the chance
    // that 60 connections all pick one of three is 3 * 3^-60.
    assert!(seen.len() >= 2, "all 60 connections of one source went to {seen:?}");
}

#[test]
fn weight_two_backend_gets_twice_the_clients() {
    let pool = backends(3, 3);
    let mut args = vec!["--listen".to_string(), "127.0.3.1:0".into()];
    for (i, b) in pool.iter().enumerate() {
        let weight = if i == 2 { 2 } else { 1 };
        args.extend([
            "--backend".to_string(),
            format!("{},name={},weight={weight}", b.addr(), b.name()),
        ]);
    }
    let t = Tether::start(bin(), no_probes(&args)).unwrap();
    let mut heavy = 0;
    let n = 400;
    for i in 0..n {
        if ask_name(client_ip(i), t.addr()).unwrap() == "b2" {
            heavy += 1;
        }
    }
    // Expected share 2/4 = 200 of 400 (sd 10).
    assert!((160..=240).contains(&heavy), "weight-2 backend got {heavy} of {n}");
}

#[test]
fn two_processes_with_the_same_pool_agree_on_every_client() {
    let pool = backends(4, 4);
    let a = tether(4, &pool, &["--seed", "42"]);
    // Same names, weights and seed, listed in another order, on another listener.
    let mut reversed =
        vec!["--listen".to_string(), "127.0.4.2:0".into(), "--seed".into(), "42".into()];
    for b in pool.iter().rev() {
        reversed.extend(["--backend".to_string(), format!("{},name={}", b.addr(), b.name())]);
    }
    let b = Tether::start(bin(), no_probes(&reversed)).unwrap();
    let other_seed = tether(4, &pool, &["--seed", "43"]);
    let mut differ_with_other_seed = 0;
    for i in 0..100 {
        let from_a = ask_name(client_ip(i), a.addr()).unwrap();
        assert_eq!(from_a, ask_name(client_ip(i), b.addr()).unwrap(), "source {}", client_ip(i));
        if ask_name(client_ip(1000 + i), other_seed.addr()).unwrap()
            != ask_name(client_ip(1000 + i), a.addr()).unwrap()
        {
            differ_with_other_seed += 1;
        }
    }
    // A different seed is a different mapping (about 3 in 4 differ with 4 backends).
    assert!(differ_with_other_seed > 40, "only {differ_with_other_seed} of 100 differ");
}
