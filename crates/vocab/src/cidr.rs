//! CIDR ranges of client addresses, IPv4 and IPv6 in one 128-bit space: an IPv4 address is
//! held as its IPv4-mapped IPv6 form `::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2), so a v4
//! client on a dual-stack listener meets the same v4 ranges as on a v4 listener
//! (FAILURE-MODES F14). `guard::Acl` matches clients against lists of them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Prefix length of the IPv4-mapped range `::ffff:0:0/96`: a v4 prefix `/n` is `/(96 + n)`.
pub const V4_BASE: u8 = 96;

/// `ip` as a number in the shared space: v4 as `::ffff:a.b.c.d`, v6 as is.
pub fn canonical(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Whether `addr` lies in `::ffff:0:0/96`, i.e. is an IPv4 address.
pub fn is_mapped(addr: u128) -> bool {
    addr >> 32 == 0xffff
}

/// The network mask of a prefix length in the 128-bit space (`len <= 128`).
pub fn mask(len: u8) -> u128 {
    // A shift by 128 (len 0) is out of range for u128: `checked_shl` says so and the mask is 0.
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// A CIDR range: a network and a prefix length, either IPv4 or IPv6.
///
/// Held in the shared 128-bit space: a v4 range `a.b.c.d/n` is `::ffff:a.b.c.d/(96 + n)`, and
/// every range whose network is in `::ffff:0:0/96` with a prefix of at least 96 *is* a v4 range
/// however it was written. The host bits are always zero (parsing refuses them), so two equal
/// ranges compare equal.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: u128,
    /// Prefix length in the 128-bit space.
    len: u8,
}

impl Cidr {
    /// The network in the shared 128-bit space (v4 as `::ffff:a.b.c.d`).
    pub fn network_bits(&self) -> u128 {
        self.net
    }

    /// The prefix length in the shared 128-bit space (a v4 `/n` is `96 + n`).
    pub fn prefix_bits(&self) -> u8 {
        self.len
    }

    /// The range of `prefix_len` leading bits of `ip`, the prefix counted in `ip`'s own family
    /// (at most 32 for v4, 128 for v6). An IPv4-mapped v6 network with a prefix of 96 or more is
    /// the v4 range it maps. Host bits must be clear.
    pub fn new(ip: IpAddr, prefix_len: u8) -> Result<Cidr, CidrError> {
        let (max, base) = if ip.is_ipv4() { (32, V4_BASE) } else { (128, 0) };
        if prefix_len > max {
            return Err(CidrError::PrefixTooLong { len: u16::from(prefix_len), max });
        }
        let addr = canonical(ip);
        let len = base + prefix_len;
        let net = addr & mask(len);
        if net != addr {
            return Err(CidrError::HostBits { network: Cidr { net, len } });
        }
        Ok(Cidr { net, len })
    }

    /// Whether this is an IPv4 range (including one written in the `::ffff:` mapped form).
    pub fn is_v4(&self) -> bool {
        self.len >= V4_BASE && is_mapped(self.net)
    }

    /// The network address, as `V4` for a v4 range.
    pub fn network(&self) -> IpAddr {
        if self.is_v4() {
            // The low 32 bits of a mapped address are the v4 address: the truncation is the point.
            IpAddr::V4(Ipv4Addr::from(self.net as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.net))
        }
    }

    /// The prefix length in the range's own family: 0..=32 for v4, 0..=128 for v6.
    pub fn prefix_len(&self) -> u8 {
        if self.is_v4() {
            self.len - V4_BASE
        } else {
            self.len
        }
    }

    /// Whether `ip` is in the range. `ip` is canonicalised first (`::ffff:a.b.c.d` is the v4
    /// address `a.b.c.d`), and a range only matches addresses of its own family.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let addr = canonical(ip);
        is_mapped(addr) == self.is_v4() && addr & mask(self.len) == self.net
    }
}

/// `10.0.0.0/8`, `192.0.2.7` (a /32), `2001:db8::/32`, `::1` (a /128), or a v4 range in mapped
/// form, `::ffff:10.0.0.0/104` (the same range as `10.0.0.0/8`). No surrounding spaces.
impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| CidrError::Address(addr.to_owned()))?;
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let len = match prefix {
            None => max,
            Some(text) => {
                // Decimal digits only: `u16::from_str` would also take "+8".
                let digits = !text.is_empty() && text.len() <= 3;
                let len = text
                    .parse::<u16>()
                    .ok()
                    .filter(|_| digits && text.bytes().all(|b| b.is_ascii_digit()));
                let len = len.ok_or_else(|| CidrError::Prefix(text.to_owned()))?;
                u8::try_from(len)
                    .ok()
                    .filter(|&len| len <= max)
                    .ok_or(CidrError::PrefixTooLong { len, max })?
            }
        };
        Cidr::new(ip, len)
    }
}

/// Canonical text, which parses back to the same range: the network, `/`, the prefix length;
/// v4 ranges in v4 notation whatever form they were written in (`::ffff:10.0.0.0/104` shows as
/// `10.0.0.0/8`).
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix_len())
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cidr({self})")
    }
}

/// Why a CIDR range did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    Address(String),
    /// The part after `/` is not a decimal number of at most three digits.
    Prefix(String),
    /// The prefix is longer than the address.
    PrefixTooLong {
        /// The prefix length given.
        len: u16,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
    /// Bits past the prefix are set (`10.0.0.1/8`), which usually means a typo.
    HostBits {
        /// The range with the host bits cleared, which the error suggests.
        network: Cidr,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::Address(text) => write!(f, "not an IP address: {text:?}"),
            CidrError::Prefix(text) => write!(f, "not a prefix length: {text:?}"),
            CidrError::PrefixTooLong { len, max } => {
                let family = if *max == 32 { "IPv4" } else { "IPv6" };
                write!(f, "prefix length {len} is over {max} for {family}")
            }
            CidrError::HostBits { network } => write!(f, "host bits set; did you mean {network}?"),
        }
    }
}

impl std::error::Error for CidrError {}
