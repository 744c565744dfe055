//! A cluster on one machine (issue 14): a client host, N balancer hosts sharing one virtual
//! address, and a backend host, each a network namespace of its own (root), joined by veth
//! pairs. The client host reaches the virtual address over a kernel ECMP route with layer-4
//! hashing, as a router in front of several instances would.
//!
//! | what | address |
//! |---|---|
//! | virtual address (on every balancer's `lo`) | 10.99.0.1 |
//! | clients (any address of the range, AnyIP) | 10.20.0.0/16 |
//! | balancer i, client side / client host's end | 10.10.i.1 / 10.10.i.2 |
//! | balancer i, backend side / backend host's end | 10.31.i.1 / 10.31.i.2 |
//! | backends (any address of the range, AnyIP) | 10.30.0.0/24 |
//!
//! Balancers reach each other through the backend host (it forwards), at their 10.31.i.1.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use crate::netns::Namespace;

/// The virtual address every balancer answers on.
pub const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
/// The port every instance listens on (each in a namespace of its own: nobody else is there).
pub const PORT: u16 = 5000;
/// The port peers connect to.
pub const PEER_PORT: u16 = 7946;

/// The namespaces and their links.
pub struct Cluster {
    pub client: Namespace,
    /// Balancer i is `balancers[i]` (1-based in its addresses: 10.10.(i+1).1).
    pub balancers: Vec<Namespace>,
    pub backend: Namespace,
}

impl Cluster {
    /// Client host, `n` balancer hosts, backend host, all links up, the ECMP route over all.
    pub fn new(n: usize) -> io::Result<Cluster> {
        assert!((1..=200).contains(&n));
        let client = Namespace::new()?;
        let backend = Namespace::new()?;
        let mut balancers = Vec::with_capacity(n);
        client.sh("ip route add local 10.20.0.0/16 dev lo
             sysctl -qw net.ipv4.fib_multipath_hash_policy=1");
        backend.sh("ip route add local 10.30.0.0/24 dev lo
             sysctl -qw net.ipv4.ip_forward=1");
        for i in 1..=n {
            let lb = Namespace::new()?;
            lb.sh(&format!(
                "ip link add l0 type veth peer name c{i} netns {c}
                 ip link add b0 type veth peer name e{i} netns {b}
                 ip addr add 10.10.{i}.1/24 dev l0; ip link set l0 up
                 ip addr add 10.31.{i}.1/24 dev b0; ip link set b0 up
                 ip addr add {VIP}/32 dev lo
                 ip route add 10.20.0.0/16 via 10.10.{i}.2
                 ip route add 10.30.0.0/24 via 10.31.{i}.2
                 ip route add 10.31.0.0/16 via 10.31.{i}.2",
                c = client.tid,
                b = backend.tid,
            ));
            client.sh(&format!("ip addr add 10.10.{i}.2/24 dev c{i}; ip link set c{i} up"));
            backend.sh(&format!("ip addr add 10.31.{i}.2/24 dev e{i}; ip link set e{i} up"));
            balancers.push(lb);
        }
        let cluster = Cluster { client, balancers, backend };
        cluster.route_over(&(0..n).collect::<Vec<_>>());
        Ok(cluster)
    }

    /// The client host's route to the virtual address: ECMP over these balancers (indices).
    pub fn route_over(&self, members: &[usize]) {
        let hops: Vec<String> = members
            .iter()
            .map(|i| format!("nexthop via 10.10.{n}.1 dev c{n} weight 1", n = i + 1))
            .collect();
        self.client.sh(&format!("ip route replace {VIP}/32 {}", hops.join(" ")));
    }

    /// Balancer `i`'s client-side address (to reach that instance alone).
    pub fn balancer_addr(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 10, i as u8 + 1, 1))
    }

    /// Balancer `i`'s backend-side address: where its peers reach it, and where its
    /// connections to backends come from.
    pub fn balancer_inner(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 31, i as u8 + 1, 1))
    }

    /// Which balancer an address of [`balancer_inner`](Self::balancer_inner) belongs to.
    pub fn balancer_of(inner: IpAddr) -> Option<usize> {
        match inner {
            IpAddr::V4(v4) if v4.octets()[..2] == [10, 31] && v4.octets()[3] == 1 => {
                Some(v4.octets()[2] as usize - 1)
            }
            _ => None,
        }
    }

    /// Instance `i`'s command line (of `n`): listening on every address at [`PORT`], an admin
    /// address on its own loopback, the backends `(name, address)`, fast TCP probes (a stopped
    /// backend is down everywhere within a few hundred milliseconds, and back up likewise),
    /// and with `key` (a key file) the other instances as peers.
    pub fn tether_args(
        i: usize,
        n: usize,
        backends: &[(String, SocketAddr)],
        key: Option<&Path>,
    ) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("0.0.0.0:{PORT}"),
            "--workers".into(),
            "1".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--name".into(),
            format!("lb{i}"),
        ];
        for (flag, value) in [
            ("--health-check", "tcp"),
            ("--health-interval", "200ms"),
            ("--health-timeout", "150ms"),
            ("--health-rise", "1"),
            ("--health-fall", "1"),
        ] {
            args.extend([flag.to_string(), value.to_string()]);
        }
        for (name, addr) in backends {
            args.extend(["--backend".into(), format!("{addr},name={name}")]);
        }
        if let Some(key) = key {
            let inner = Self::balancer_inner(i);
            args.extend(["--peer-listen".into(), format!("{inner}:{PEER_PORT}")]);
            args.extend(["--peer-allow-remote".into(), "--peer-key-file".into()]);
            args.push(key.display().to_string());
            for j in (0..n).filter(|&j| j != i) {
                let addr = Self::balancer_inner(j);
                args.extend(["--peer".into(), format!("lb{j}={addr}:{PEER_PORT}")]);
            }
        }
        args
    }

    /// Client `j`'s address (j < 65,000).
    pub fn client_ip(j: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 20, (j / 250) as u8, (j % 250) as u8 + 1))
    }

    /// Backend `k`'s address.
    pub fn backend_ip(k: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 30, 0, 11 + k as u8))
    }
}

/// A fresh peer key: 64 hex characters from /dev/urandom.
pub fn random_hex_key() -> io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
