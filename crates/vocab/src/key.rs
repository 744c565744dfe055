//! Affinity keys: what stickiness is keyed on.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Index of a backend in the routing snapshot's backend list.
pub type BackendId = u32;

/// Canonical affinity key: a client IP held as the 16 bytes of an IPv6 address.
///
/// An IPv4 client is stored as its IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291
/// section 2.5.5.2), so a client that reaches a v4 listener and a dual-stack v6 listener gets
/// one key and one backend. Every other IPv6 address, including the deprecated
/// IPv4-compatible form `::a.b.c.d`, is its own key. Any 16 bytes are a valid key, so
/// [`AffinityKey::from_bytes`] and [`AffinityKey::to_bytes`] are exact inverses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AffinityKey([u8; 16]);

impl AffinityKey {
    /// The key of a client address; v4 and its `::ffff:` mapped form give the same key.
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => Self(v6.octets()),
        }
    }

    /// The key of the network of `ip` under `prefix`: every client of one IPv4 /24 (or one
    /// IPv6 /64) shares it with `Prefix { v4: 24, v6: 64 }`. A v4-mapped IPv6 client is an IPv4
    /// client here too, so it takes the IPv4 length.
    pub fn from_ip_prefix(ip: IpAddr, prefix: Prefix) -> Self {
        Self::from_ip(prefix.network(ip))
    }

    /// The key of a UDP session key's bytes (`--udp-session-key`) in a service seeded `seed`:
    /// an address of `100::/64`, the discard-only prefix (RFC 6666) no client sends from, so it
    /// never meets a client's own key, whose low 64 bits are the token's SipHash-1-3 under the
    /// seed. Never the token itself: pins go to the state file, to peers and to the admin API,
    /// and a token is what takes a flow over. The seed, not a per-process secret, so every
    /// process with the service's seed (every instance behind ECMP, the process after a
    /// restart) derives the same pin; a private `--seed` keeps it from being computed by
    /// others. Two tokens that share a key share a backend, nothing more: flows are told apart
    /// by the whole token.
    pub fn from_session(token: &[u8], seed: u64) -> Self {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..].copy_from_slice(b"session!");
        let mut h = siphasher::sip::SipHasher13::new_with_key(&key);
        h.write(token);
        let mut bytes = [0; 16];
        bytes[0] = 1;
        bytes[8..].copy_from_slice(&h.finish().to_be_bytes());
        Self(bytes)
    }

    /// The key whose [`to_bytes`](Self::to_bytes) is `bytes` (e.g. read back from the admin API).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The canonical 16-byte form: IPv6 octets, v4 clients as `::ffff:a.b.c.d`.
    pub fn to_bytes(&self) -> [u8; 16] {
        self.0
    }

    /// The client address in canonical form: `V4` for a mapped address, `V6` otherwise.
    pub fn ip(&self) -> IpAddr {
        Ipv6Addr::from(self.0).to_canonical()
    }
}

/// How much of a client's address pins it (`--affinity source/24,64`): prefix lengths for IPv4
/// and IPv6 clients. The default, [`Prefix::HOST`], is the whole address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    /// 1..=32.
    pub v4: u8,
    /// 1..=128.
    pub v6: u8,
}

impl Prefix {
    /// Every address its own: /32 and /128.
    pub const HOST: Prefix = Prefix { v4: 32, v6: 128 };

    /// The network address of `ip` (canonical: a v4-mapped address as IPv4).
    pub fn network(self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & mask32(self.v4);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & mask128(self.v6);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        }
    }

    /// Whether it keys on whole addresses.
    pub fn is_host(self) -> bool {
        self == Prefix::HOST
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Prefix::HOST
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.v4, self.v6)
    }
}

fn mask32(len: u8) -> u32 {
    match len {
        0 => 0,
        n if n >= 32 => u32::MAX,
        n => u32::MAX << (32 - u32::from(n)),
    }
}

fn mask128(len: u8) -> u128 {
    match len {
        0 => 0,
        n if n >= 128 => u128::MAX,
        n => u128::MAX << (128 - u32::from(n)),
    }
}

impl From<IpAddr> for AffinityKey {
    fn from(ip: IpAddr) -> Self {
        Self::from_ip(ip)
    }
}

// Written by hand rather than derived: the derived impl hashes the array as a slice, which
// feeds SipHash an extra 8-byte length prefix on every lookup. One 16-byte write hashes the same
// bytes `Eq` compares, so the two stay consistent.
impl Hash for AffinityKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

impl fmt::Debug for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AffinityKey({})", self.ip())
    }
}

impl fmt::Display for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_keys_a_network_and_a_mapped_client_as_ipv4() {
        let p = Prefix { v4: 24, v6: 64 };
        let k = |s: &str| AffinityKey::from_ip_prefix(s.parse().unwrap(), p);
        assert_eq!(k("198.51.100.7"), k("198.51.100.250"));
        assert_ne!(k("198.51.100.7"), k("198.51.101.7"));
        assert_eq!(k("::ffff:198.51.100.9"), k("198.51.100.7"), "v4-mapped takes the v4 length");
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::2"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("198.51.100.7").ip(), "198.51.100.0".parse::<IpAddr>().unwrap());
        let host = |s: &str| AffinityKey::from_ip_prefix(s.parse().unwrap(), Prefix::HOST);
        assert_eq!(host("198.51.100.7"), AffinityKey::from_ip("198.51.100.7".parse().unwrap()));
        assert_eq!(host("2001:db8::1"), AffinityKey::from_ip("2001:db8::1".parse().unwrap()));
        let odd = Prefix { v4: 1, v6: 1 };
        assert_eq!(
            odd.network("200.1.2.3".parse().unwrap()),
            "128.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(odd.network("fe80::1".parse().unwrap()), "8000::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_session_key_is_a_hash_in_the_discard_prefix_never_the_token() {
        let token = [0xde, 0xad, 0xbe, 0xef];
        let key = AffinityKey::from_session(&token, 7);
        // The same in every process with the seed; another token or seed, another key.
        assert_eq!(key, AffinityKey::from_session(&token, 7));
        assert_ne!(key, AffinityKey::from_session(&[0xde, 0xad, 0xbe, 0xee], 7));
        assert_ne!(key, AffinityKey::from_session(&token, 8));
        let discard: crate::Cidr = "100::/64".parse().unwrap();
        assert!(discard.contains(key.ip()));
        // The token's bytes are nowhere in it.
        assert!(!key.to_bytes().windows(2).any(|w| w == [0xbe, 0xef]), "{key}");
    }

    fn key(s: &str) -> AffinityKey {
        AffinityKey::from_ip(s.parse().unwrap())
    }

    #[test]
    fn v4_and_mapped_v6_are_one_key() {
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"));
        assert_eq!(key("::ffff:192.0.2.7").ip(), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(key("192.0.2.7").to_bytes()[10..], [0xff, 0xff, 192, 0, 2, 7]);
    }

    #[test]
    fn v6_keys_are_distinct() {
        assert_ne!(key("2001:db8::1"), key("2001:db8::2"));
        assert_ne!(key("2001:db8::1"), key("192.0.2.1"));
        // The deprecated IPv4-compatible form is not the mapped form: a different client.
        assert_ne!(key("::192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8::1").ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bytes_round_trip() {
        let k = key("2001:db8::42");
        assert_eq!(AffinityKey::from_bytes(k.to_bytes()), k);
        assert_eq!(format!("{k} {k:?}"), "2001:db8::42 AffinityKey(2001:db8::42)");
    }
}
