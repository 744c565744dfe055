//! Several instances behind real kernel ECMP (issue 14): a client host routes the virtual
//! address over three balancer hosts (network namespaces, layer-4 hashing), a backend host
//! holds three backends. Instances with the same pool and seed agree on every client; with
//! peers, a failover seen by one is followed by all, and an instance taken out of the route
//! moves nobody. Needs root (namespaces), as CI has.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use common::*;
use testkit::cluster::{Cluster, PORT, VIP};

struct Rig {
    cluster: Cluster,
    backends: Vec<Backend>,
    tethers: Vec<Tether>,
    /// Each instance's command line (to start it again).
    args: Vec<Vec<String>>,
    _key_dir: Option<PathBuf>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(dir) = &self._key_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Three instances with the same pool and seed; with `peers`, each lists the other two.
fn rig(peers: bool) -> Rig {
    let cluster = Cluster::new(3).expect("namespaces (root)");
    let backends: Vec<Backend> = (0..3)
        .map(|k| {
            let addr = SocketAddr::new(Cluster::backend_ip(k), 6000);
            cluster.backend.run(|| Backend::start(&format!("b{k}"), addr).expect("backend"))
        })
        .collect();
    let key_dir = peers.then(|| {
        let dir = std::env::temp_dir().join(format!("tether-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("peer.key"), "5f".repeat(32)).unwrap();
        dir
    });
    let named: Vec<(String, SocketAddr)> =
        backends.iter().map(|b| (b.name().to_string(), b.addr())).collect();
    let key = key_dir.as_ref().map(|d| d.join("peer.key"));
    let args: Vec<Vec<String>> =
        (0..3).map(|i| Cluster::tether_args(i, 3, &named, key.as_deref())).collect();
    let tethers = (0..3)
        .map(|i| cluster.balancers[i].run(|| Tether::start(bin(), &args[i]).expect("tether")))
        .collect();
    let rig = Rig { cluster, backends, tethers, args, _key_dir: key_dir };
    if peers {
        (0..3).for_each(|i| rig.wait_peers(i));
    }
    rig
}

impl Rig {
    /// Until instance `i`'s two peers are connected.
    fn wait_peers(&self, i: usize) {
        let all_up = wait_until(DEADLINE, || {
            self.on(i, |t| {
                let reply = http(t.admin(), "GET", "/api/peers", "").unwrap();
                reply.body.matches("\"connected\"").count() == 2
            })
        });
        assert!(all_up, "lb{i}'s peers never all connected");
    }

    /// Stop instance `i` (SIGKILL: a crash) and start it again, empty.
    fn restart(&mut self, i: usize) {
        // The old one still holds the ports: it goes first.
        self.tethers[i].signal(nix::sys::signal::Signal::SIGKILL).unwrap();
        assert!(self.tethers[i].wait_exit(DEADLINE).is_some(), "lb{i} did not die");
        let args = &self.args[i];
        let new = self.cluster.balancers[i].run(|| Tether::start(bin(), args).expect("again"));
        self.tethers[i] = new;
    }

    /// Where instance `i` has client `j` pinned.
    fn pin(&self, i: usize, j: usize) -> Option<String> {
        let path = format!("/api/sticky?client={}", Cluster::client_ip(j));
        let body = self.on(i, |t| http(t.admin(), "GET", &path, "").unwrap().body);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["backend"].as_str().map(String::from)
    }

    /// Run `f` with tether `i` from inside its namespace (its admin address is there).
    fn on<T: Send>(&self, i: usize, f: impl FnOnce(&Tether) -> T + Send) -> T {
        let t = &self.tethers[i];
        self.cluster.balancers[i].run(|| f(t))
    }

    /// From the client host: client `j` through the virtual address: (backend, instance).
    fn via_vip(&self, j: usize) -> (String, usize) {
        let to = SocketAddr::new(VIP, PORT);
        let (name, from) =
            self.cluster.client.run(|| ask_peer(Cluster::client_ip(j), to)).expect("via the VIP");
        (name, Cluster::balancer_of(from.ip()).expect("a balancer's address"))
    }

    /// Client `j` through instance `i` alone: the backend.
    fn via(&self, i: usize, j: usize) -> String {
        let to = SocketAddr::new(Cluster::balancer_addr(i), PORT);
        self.cluster.client.run(|| ask_name(Cluster::client_ip(j), to)).expect("via one instance")
    }

    /// Clients `0..n` through every instance in turn: the backend each instance gave.
    fn everywhere(&self, clients: &[usize]) -> Vec<[String; 3]> {
        clients.iter().map(|&j| [0, 1, 2].map(|i| self.via(i, j))).collect()
    }
}

#[test]
fn instances_with_the_same_pool_and_seed_agree_on_every_client() {
    let rig = rig(false);
    let clients: Vec<usize> = (0..1000).collect();
    let answers = rig.everywhere(&clients);
    let split: Vec<usize> = clients
        .iter()
        .copied()
        .filter(|&j| {
            let a = &answers[j];
            a[0] != a[1] || a[1] != a[2]
        })
        .collect();
    assert!(
        split.is_empty(),
        "{} of 1000 clients got different backends: {:?}",
        split.len(),
        &split[..split.len().min(5)]
    );
    // Through the VIP, ECMP spreads them over all three, and they land where everyone agrees.
    let mut per_instance = [0; 3];
    for (j, agreed) in answers.iter().enumerate().take(300) {
        let (backend, instance) = rig.via_vip(j);
        per_instance[instance] += 1;
        assert_eq!(backend, agreed[0], "client {j}");
    }
    assert!(per_instance.iter().all(|&n| n > 30), "ECMP spread {per_instance:?}");
}

/// The failover scenario: every client once through the VIP, b0 stopped, its clients again
/// through the VIP (each fails over on whichever instance it reaches), b0 back. Returns the
/// moved clients with their new backends, and the rig.
fn fail_over(peers: bool) -> (Rig, Vec<(usize, String)>, Instant) {
    let mut rig = rig(peers);
    let clients = 0..300;
    let before: HashMap<usize, String> = clients.clone().map(|j| (j, rig.via_vip(j).0)).collect();
    let b0_addr = rig.backends[0].addr();
    rig.backends[0].stop();
    let mut moved = Vec::new();
    for j in clients.filter(|j| before[j] == "b0") {
        let (now, _) = rig.via_vip(j);
        assert_ne!(now, "b0");
        moved.push((j, now));
    }
    let repinned = Instant::now();
    rig.backends[0] = rig.cluster.backend.run(|| Backend::start("b0", b0_addr).expect("b0 back"));
    assert!(moved.len() > 30, "{} clients of 300 on b0", moved.len());
    // Every instance sees b0 up again before anyone asks: from here, only pins keep a client
    // off b0 (non-preemptive), and an instance that missed a failover sends its client back.
    for i in 0..3 {
        // Up, and past the hold that a refused connect puts on it.
        let up = wait_until(DEADLINE, || {
            rig.on(i, |t| {
                let b0 = api_backend(t.admin(), "b0");
                b0["health"] == "up" && b0["failing"] == false
            })
        });
        assert!(up, "lb{i} never saw b0 back");
    }
    (rig, moved, repinned)
}

#[test]
fn with_peers_a_failover_is_followed_everywhere_and_an_instance_leaving_moves_nobody() {
    let (mut rig, moved, repinned) = fail_over(true);
    // Every instance sends each moved client to its new backend, b0 being back or not.
    let mut stale = usize::MAX;
    let agreed = wait_until(DEADLINE, || {
        stale =
            moved.iter().filter(|(j, to)| [0, 1, 2].iter().any(|&i| rig.via(i, *j) != *to)).count();
        stale == 0
    });
    let lag = repinned.elapsed();
    assert!(agreed, "{stale} of {} moved clients still disagree", moved.len());
    eprintln!(
        "{} failed-over clients followed by all 3 instances {lag:?} after the last re-pin",
        moved.len()
    );
    // The last instance leaves the route: its clients reach the others and keep their backends.
    let all: Vec<(usize, String)> = (0..300).map(|j| (j, rig.via_vip(j).0)).collect();
    rig.cluster.route_over(&[0, 1]);
    for (j, backend) in &all {
        let (now, instance) = rig.via_vip(*j);
        assert_ne!(instance, 2, "the route still sends client {j} to lb2");
        assert_eq!(&now, backend, "client {j} moved when lb2 left");
    }
    // lb2 crashes and starts empty: its peers dial it again and send it their tables, so it
    // has every moved client's pin before it is put back in the route.
    rig.restart(2);
    let at = Instant::now();
    rig.wait_peers(2);
    let synced =
        wait_until(DEADLINE, || moved.iter().all(|(j, to)| rig.pin(2, *j).as_deref() == Some(to)));
    assert!(synced, "lb2 never got the pins back");
    eprintln!("a restarted instance had its peers' pins back {:?} after it started", at.elapsed());
    rig.cluster.route_over(&[0, 1, 2]);
    for (j, backend) in &all {
        assert_eq!(&rig.via_vip(*j).0, backend, "client {j} moved when lb2 came back");
    }
}

#[test]
fn without_peers_the_instances_that_missed_a_failover_send_its_clients_back() {
    let (rig, moved, _) = fail_over(false);
    let disagree =
        moved.iter().filter(|(j, to)| [0, 1, 2].iter().any(|&i| rig.via(i, *j) != *to)).count();
    eprintln!(
        "without peers: {disagree} of {} failed-over clients would move when the network sends them to another instance",
        moved.len()
    );
    // Each client failed over on one instance only; the two others never saw it.
    assert!(disagree > moved.len() / 2, "{disagree} of {}", moved.len());
}
