//! Shared helpers for the black-box tests: start backends on distinct loopback addresses and the
//! real `tether` binary in front of them.

#![allow(dead_code)] // each test file uses its own subset

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

pub use testkit::*;

/// Generous: tests run on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// Backends named `b0`, `b1`, ... on 127.0.<net>.(10+i), ports from the kernel.
pub fn backends(net: u8, n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, net, 10 + i as u8));
            Backend::start(&format!("b{i}"), SocketAddr::new(ip, 0)).expect("start backend")
        })
        .collect()
}

/// `--backend ADDR,name=NAME` for each backend.
pub fn backend_args(backends: &[Backend]) -> Vec<String> {
    backends
        .iter()
        .flat_map(|b| ["--backend".to_string(), format!("{},name={}", b.addr(), b.name())])
        .collect()
}

/// Start tether listening on 127.0.<net>.1:0 with two workers, the backends, and `extra` flags.
pub fn tether(net: u8, backends: &[Backend], extra: &[&str]) -> Tether {
    let mut args =
        vec!["--listen".to_string(), format!("127.0.{net}.1:0"), "--workers".into(), "2".into()];
    args.extend(backend_args(backends));
    args.extend(extra.iter().map(|s| s.to_string()));
    Tether::start(bin(), no_probes(&args)).expect("start tether")
}

/// Index of the backend with this name.
pub fn index_of(backends: &[Backend], name: &str) -> usize {
    backends
        .iter()
        .position(|b| b.name() == name)
        .unwrap_or_else(|| panic!("unknown backend {name:?}"))
}
