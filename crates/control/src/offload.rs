//! Whether this process hands established UDP flows to the kernel (`--udp-offload`), decided
//! once at start: the program is loaded and attached before privileges are dropped, to every
//! interface that is up and carries Ethernet frames (loopback included), since a flow's
//! client and backend may be behind any of them.

use config::{Config, UdpOffload};

/// What `/api/status` and `/metrics` say of the offload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub mode: UdpOffload,
    pub enabled: bool,
    /// Why it is off, or where it is attached.
    pub reason: String,
    pub interfaces: Vec<String>,
    /// `tcx` or `clsact` when enabled.
    pub attachment: Option<&'static str>,
}

/// The offload to give the workers (if any) and its status; an error (the start fails) only
/// when `--udp-offload on` cannot work.
pub fn decide(
    config: &Config,
    max_flows: usize,
) -> Result<(Option<offload::Offload>, Status), String> {
    let off = |reason: String| Status {
        mode: config.udp_offload,
        enabled: false,
        reason,
        interfaces: Vec::new(),
        attachment: None,
    };
    if config.udp_offload == UdpOffload::Off {
        return Ok((None, off("--udp-offload off".into())));
    }
    if !config.services.iter().any(|s| s.protocol.udp()) {
        return Ok((None, off("no UDP service".into())));
    }
    let attached = capabilities().and_then(|()| {
        let interfaces = interfaces()?;
        let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
        // Two entries per flow.
        let entries = u32::try_from(max_flows.saturating_mul(2)).unwrap_or(u32::MAX);
        offload::Offload::attach(&names, entries).map_err(|e| e.to_string())
    });
    match attached {
        Ok(o) => {
            let attachment = match o.attachment() {
                offload::Attachment::Tcx => "tcx",
                offload::Attachment::Clsact => "clsact",
            };
            let interfaces = o.interfaces().to_vec();
            let reason = format!("attached ({attachment}) to {}", interfaces.join(", "));
            let status = Status {
                mode: config.udp_offload,
                enabled: true,
                reason,
                interfaces,
                attachment: Some(attachment),
            };
            Ok((Some(o), status))
        }
        Err(why) if config.udp_offload == UdpOffload::On => Err(why),
        Err(why) => Ok((None, off(why))),
    }
}

/// CAP_NET_ADMIN (to attach) and CAP_BPF or CAP_SYS_ADMIN (to load) in the effective set.
fn capabilities() -> Result<(), String> {
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    const BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or("no CapEff in /proc/self/status")?;
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(BPF) && !has(SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "tether lacks {} (run as root, or grant CAP_BPF and CAP_NET_ADMIN)",
            missing.join(" and ")
        ))
    }
}

/// The interfaces that are up and carry Ethernet frames (ARPHRD_ETHER) or are loopback
/// (ARPHRD_LOOPBACK): the program reads an Ethernet header first. The hardware type comes
/// with each interface's link-layer entry of getifaddrs(3) (not /sys, which shows the network
/// namespace sysfs was mounted in).
fn interfaces() -> Result<Vec<String>, String> {
    const ETHER: u16 = 1;
    const LOOPBACK: u16 = 772;
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    for a in addrs {
        let up = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        let kind = a.address.as_ref().and_then(|s| s.as_link_addr()).map(|l| l.hatype());
        if up && matches!(kind, Some(ETHER | LOOPBACK)) && !names.contains(&a.interface_name) {
            names.push(a.interface_name);
        }
    }
    if names.is_empty() {
        return Err("no interface is up".into());
    }
    Ok(names)
}
