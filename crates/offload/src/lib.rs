//! UDP offload (issue 13, in progress): a tc ingress program (`bpf/udp_nat.bpf.c`) that
//! rewrites the datagrams of established flows in the kernel, and the user-space side that
//! loads it, attaches it to an interface and keeps its flow map.
//!
//! A flow is two entries: client -> listener becomes flow address -> backend, and backend ->
//! flow address becomes listener -> client. The program touches no packet that matches no
//! entry; it counts packets and payload bytes per entry and stamps when it last saw one.
//!
//! Attachment: a tcx link (kernel 6.6+) owned by this process's descriptor, so that a process
//! killed with SIGKILL leaves nothing attached; a clsact filter on older kernels, with filters
//! of the same program name left by an earlier process removed first. One program and one map
//! serve every interface it is attached to; each worker holds its own handle on the map
//! ([`FlowMap`]), so no lock is shared.
//!
//! Where a rewritten datagram goes: delivered on this host when its new destination is local
//! (entry `oif` 0), else redirected to the interface the route leaves by ([`route::egress`],
//! looked up by user space when the entry is made: the kernel's `bpf_fib_lookup` answers
//! FWD_DISABLED for every destination unless forwarding is enabled on the ingress interface).

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use aya::maps::{HashMap, MapData};
use aya::programs::tc::{self, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, SchedClassifier};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};

pub mod route;
mod sys;

/// The program's function name (also its name in the kernel and in tc).
const PROGRAM: &str = "tether_udp";
/// The flow map's name in the object.
const MAP: &str = "FLOWS";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp_nat.bpf.o"));

/// One direction of a flow as the program sees it (`struct tuple` in the C source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Network byte order.
    sport: [u8; 2],
    dport: [u8; 2],
    /// 4 or 6.
    family: u8,
    pad: [u8; 3],
}

impl Tuple {
    /// A datagram from `src` to `dst`; both must be of one family (IPv4-mapped IPv6 counts as
    /// IPv4, as the kernel sends it).
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Tuple {
        let (s, sf) = addr(src);
        let (d, df) = addr(dst);
        debug_assert_eq!(sf, df, "{src} and {dst} are of different families");
        Tuple {
            saddr: s,
            daddr: d,
            sport: src.port().to_be_bytes(),
            dport: dst.port().to_be_bytes(),
            family: sf,
            pad: [0; 3],
        }
    }
}

fn addr(a: SocketAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match a {
        SocketAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.ip().octets());
            (out, 4)
        }
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                (out, 4)
            }
            None => (v6.ip().octets(), 6),
        },
    }
}

/// An entry's value (`struct nat`): what the datagram becomes, and what the program saw.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Nat {
    to: Tuple,
    /// 0: delivered here; else the interface index to redirect to.
    oif: u32,
    pad: u32,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
}

/// What the program saw of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last packet (0: none yet).
    pub last_seen_ns: u64,
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A tcx link owned by this process (kernel 6.6+).
    Tcx,
    /// A clsact qdisc filter.
    Clsact,
}

/// Why offload cannot work here.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err(what: &str) -> impl FnOnce(&dyn fmt::Display) -> Error + '_ {
    move |e| Error(format!("{what}: {e}"))
}

/// The program, attached at the ingress of some interfaces, and its flow map. Dropping it
/// detaches and unloads the program (a handle a worker still holds keeps only the map).
pub struct Offload {
    map: MapData,
    attachment: Attachment,
    interfaces: Vec<String>,
    // Last: the program outlives the map handle while both drop.
    _ebpf: Ebpf,
}

impl Offload {
    /// Load the program with room for `max_entries` entries and attach it at the ingress of
    /// each of `interfaces` (at least one).
    pub fn attach(interfaces: &[&str], max_entries: u32) -> Result<Offload, Error> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP, max_entries.max(1))
            .load(OBJECT)
            .map_err(|e| err("loading the BPF object")(&e))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| Error(format!("the BPF object has no program {PROGRAM}")))?
            .try_into()
            .map_err(|e| err("the BPF program")(&e))?;
        program.load().map_err(|e| err("loading the BPF program (verifier)")(&e))?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let attachment = if tcx { Attachment::Tcx } else { Attachment::Clsact };
        for &iface in interfaces {
            attach_one(program, iface, attachment)?;
        }
        let map = ebpf.take_map(MAP).ok_or_else(|| Error(format!("no map {MAP}")))?;
        let aya::maps::Map::HashMap(map) = map else {
            return Err(Error(format!("{MAP} is not a hash map")));
        };
        let interfaces = interfaces.iter().map(|i| i.to_string()).collect();
        Ok(Offload { map, attachment, interfaces, _ebpf: ebpf })
    }

    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// A handle on the flow map of one's own (each worker holds one).
    pub fn flow_map(&self) -> Result<FlowMap, Error> {
        let fd = self.map.fd().as_fd().try_clone_to_owned().map_err(|e| err("the map's fd")(&e))?;
        let data = MapData::from_fd(fd).map_err(|e| err("the flow map")(&e))?;
        let flows = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| err("the flow map")(&e))?;
        Ok(FlowMap { flows })
    }
}

fn attach_one(
    program: &mut SchedClassifier,
    iface: &str,
    attachment: Attachment,
) -> Result<(), Error> {
    // A filter an earlier process left (killed before it could detach) would go on rewriting
    // with maps nobody updates: remove it, whichever way we attach.
    match tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM) {
        Ok(()) => {
            log::warn!("{iface}: removed a stale {PROGRAM} filter left by an earlier process")
        }
        Err(e) => log::debug!("{iface}: no stale {PROGRAM} filter ({e})"),
    }
    match attachment {
        Attachment::Tcx => {
            let order = TcAttachOptions::TcxOrder(LinkOrder::first());
            program
                .attach_with_options(iface, TcAttachType::Ingress, order)
                .map_err(|e| Error(format!("attaching to {iface} with tcx: {e}")))?;
        }
        Attachment::Clsact => {
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                log::debug!("{iface}: clsact: {e} (already there?)");
            }
            let options = TcAttachOptions::Netlink(tc::NlOptions::default());
            program
                .attach_with_options(iface, TcAttachType::Ingress, options)
                .map_err(|e| Error(format!("attaching a clsact filter to {iface}: {e}")))?;
        }
    }
    Ok(())
}

/// One handle on the flow map.
pub struct FlowMap {
    flows: HashMap<MapData, Tuple, Nat>,
}

impl FlowMap {
    /// Rewrite datagrams matching `from` into `to` from now on, delivered here (`oif` 0) or
    /// redirected to interface `oif`. Replaces an entry of `from` (its counts start again).
    pub fn insert(&mut self, from: Tuple, to: Tuple, oif: u32) -> Result<(), Error> {
        let nat = Nat { to, oif, pad: 0, last_seen_ns: 0, packets: 0, bytes: 0 };
        self.flows.insert(from, nat, 0).map_err(|e| err("adding a flow entry")(&e))
    }

    /// Stop rewriting `from` (its datagrams go up to the sockets again). `false` if there was
    /// no such entry.
    pub fn remove(&mut self, from: &Tuple) -> bool {
        self.flows.remove(from).is_ok()
    }

    /// What the program saw of `from`'s entry, if there is one.
    pub fn seen(&self, from: &Tuple) -> Option<Seen> {
        let nat = self.flows.get(from, 0).ok()?;
        Some(Seen { packets: nat.packets, bytes: nat.bytes, last_seen_ns: nat.last_seen_ns })
    }
}

impl FlowMap {
    /// The flow map of id `id` (a process's: see [`held_by`]), to look at or clear from
    /// outside (tests; diagnosis). Needs CAP_BPF or CAP_SYS_ADMIN.
    pub fn open(id: u32) -> Result<FlowMap, Error> {
        let data = MapData::from_id(id).map_err(|e| err("opening the map")(&e))?;
        let flows = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| err("the flow map")(&e))?;
        Ok(FlowMap { flows })
    }

    /// Remove every entry (their flows' datagrams go up to the sockets again). How many.
    pub fn clear(&mut self) -> usize {
        let keys: Vec<Tuple> = self.flows.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| self.remove(k)).count()
    }

    /// Entries in the map now.
    pub fn len(&self) -> usize {
        self.flows.keys().filter_map(Result::ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ids of the BPF objects process `pid` holds descriptors of, from `/proc/PID/fdinfo`:
/// `map_id`s and `prog_id`s (a link's fdinfo names its program).
pub fn held_by(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut maps, mut progs) = (Vec::new(), Vec::new());
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return (maps, progs) };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        for line in text.lines() {
            let id = |prefix: &str| line.strip_prefix(prefix)?.trim().parse::<u32>().ok();
            if let Some(id) = id("map_id:") {
                maps.push(id);
            } else if let Some(id) = id("prog_id:") {
                progs.push(id);
            }
        }
    }
    maps.sort_unstable();
    maps.dedup();
    progs.sort_unstable();
    progs.dedup();
    (maps, progs)
}

/// Whether a BPF program of this id is loaded (anywhere on the host).
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs().flatten().any(|p| p.id() == id)
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of [`Seen::last_seen_ns`].
pub fn monotonic_ns() -> u64 {
    sys::monotonic_ns()
}

impl fmt::Debug for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offload")
            .field("attachment", &self.attachment)
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}
