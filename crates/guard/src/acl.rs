//! Allow and deny lists of CIDR ranges, matched on the client IP.
//!
//! Every address is matched in one 128-bit space: an IPv4 address as its IPv4-mapped IPv6 form
//! `::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2), so a v4 client reaching a dual-stack listener
//! (where the kernel reports `::ffff:10.1.2.3`) meets the same v4 rules as on a v4 listener. Not
//! doing so is the dual-stack ACL bypass of FAILURE-MODES.md F14 (ntpd-rs#2131). The space is
//! split in two families that never match each other: v4 rules (written `10.0.0.0/8` or
//! `::ffff:10.0.0.0/104`) match only v4 clients, v6 rules match only the other v6 clients, even a
//! v6 rule such as `::/0` whose range covers `::ffff:0:0/96`. An operator who writes `::/0`
//! means "every IPv6 client"; `0.0.0.0/0` is the way to name every IPv4 client.

use std::collections::BTreeMap;
use std::net::IpAddr;

use vocab::cidr::{canonical, is_mapped, mask};
pub use vocab::cidr::{Cidr, CidrError};

/// Ranges of one family indexed for lookup: for each prefix length present, the sorted, distinct
/// networks of that length. A lookup masks the address once per length and binary-searches, so
/// it costs O(lengths x log rules): at most 33 lengths for v4 and 129 for v6, whatever the
/// number of rules. (A linear scan is as fast below a few dozen rules, but one code path that
/// the property tests cover is worth more than that.)
#[derive(Clone, Debug, Default)]
struct Index {
    by_len: Vec<(u8, Vec<u128>)>,
}

impl Index {
    fn new<'a>(rules: impl Iterator<Item = &'a Cidr>) -> Index {
        let mut by_len: BTreeMap<u8, Vec<u128>> = BTreeMap::new();
        for rule in rules {
            by_len.entry(rule.prefix_bits()).or_default().push(rule.network_bits());
        }
        let by_len = by_len
            .into_iter()
            .map(|(len, mut nets)| {
                nets.sort_unstable();
                nets.dedup();
                (len, nets)
            })
            .collect();
        Index { by_len }
    }

    /// Whether a range of this index contains `addr` (already known to be of its family).
    fn contains(&self, addr: u128) -> bool {
        self.by_len.iter().any(|(len, nets)| nets.binary_search(&(addr & mask(*len))).is_ok())
    }
}

/// One list (allow or deny): the ranges as configured and their two per-family indexes.
#[derive(Clone, Debug, Default)]
struct List {
    rules: Vec<Cidr>,
    v4: Index,
    v6: Index,
}

impl List {
    fn new(rules: Vec<Cidr>) -> List {
        let v4 = Index::new(rules.iter().filter(|rule| rule.is_v4()));
        let v6 = Index::new(rules.iter().filter(|rule| !rule.is_v4()));
        List { rules, v4, v6 }
    }

    /// Whether a range of the list contains the canonical address `addr`.
    fn contains(&self, addr: u128) -> bool {
        if is_mapped(addr) {
            self.v4.contains(addr)
        } else {
            self.v6.contains(addr)
        }
    }
}

/// An allow list and a deny list of CIDR ranges: which clients may connect.
///
/// Immutable once built; share it in the service snapshot. [`Acl::default`] allows everyone.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    allow: List,
    deny: List,
}

impl Acl {
    /// An ACL from its two lists, in any order, duplicates allowed. Building indexes the ranges
    /// (a sort per list), so build once per config load, not per connection.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>) -> Acl {
        Acl { allow: List::new(allow), deny: List::new(deny) }
    }

    /// Whether a client at `ip` may connect.
    ///
    /// **Deny wins**: a client in any deny range is refused, whatever the allow list says; other
    /// clients are allowed if the allow list is empty, or if they are in one of its ranges. So an
    /// allow list of only v6 ranges refuses every v4 client.
    ///
    /// Why deny-wins rather than first-match (nginx `allow`/`deny`) or the most specific range:
    /// the lists have no order to get wrong, and a deny line holds on its own. Whoever adds a
    /// deny (say, during an attack) knows it takes effect without reading the allow list, and
    /// no later allow, however specific, can reopen it. The price is that "deny 10.0.0.0/8
    /// except 10.1.2.3" cannot be said; narrow the deny ranges instead.
    ///
    /// `::ffff:a.b.c.d` is matched as the v4 address `a.b.c.d` (F14); the deprecated
    /// IPv4-compatible form `::a.b.c.d` is an ordinary v6 address, as in
    /// `vocab::AffinityKey`. Allocation-free; O(prefix lengths in use x log rules).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let addr = canonical(ip);
        !self.deny.contains(addr) && (self.allow.rules.is_empty() || self.allow.contains(addr))
    }

    /// The allow list as given.
    pub fn allow(&self) -> &[Cidr] {
        &self.allow.rules
    }

    /// The deny list as given.
    pub fn deny(&self) -> &[Cidr] {
        &self.deny.rules
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use conntrack::testutil::Rng;
    use vocab::cidr::V4_BASE;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        Acl::new(allow.iter().map(|s| cidr(s)).collect(), deny.iter().map(|s| cidr(s)).collect())
    }

    /// The range of `len` leading bits of `ip`, host bits cleared.
    fn masked(ip: IpAddr, len: u8) -> Cidr {
        match Cidr::new(ip, len) {
            Ok(cidr) => cidr,
            Err(CidrError::HostBits { network }) => network,
            Err(e) => panic!("{ip}/{len}: {e}"),
        }
    }

    /// Range membership from first principles: same family after canonicalising, and the first
    /// `prefix_len` bits of the octets equal. Shares no code with `Cidr::contains`.
    fn reference_contains(rule: &Cidr, ip: IpAddr) -> bool {
        let octets = |ip: IpAddr| {
            let mut bytes = [0; 16];
            match ip {
                IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => bytes = v6.octets(),
            }
            bytes
        };
        let (net, ip) = (rule.network(), ip.to_canonical());
        if net.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let (a, b) = (octets(net), octets(ip));
        (0..usize::from(rule.prefix_len())).all(|bit| {
            let probe = 0x80 >> (bit % 8);
            a[bit / 8] & probe == b[bit / 8] & probe
        })
    }

    fn reference_allows(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
        let hit = |list: &[Cidr]| list.iter().any(|rule| reference_contains(rule, ip));
        !hit(deny) && (allow.is_empty() || hit(allow))
    }

    // ---- parsing ----

    #[test]
    fn parses_and_prints_canonical_text() {
        // (input, canonical text, is v4, prefix length in its family)
        let table = [
            ("10.0.0.0/8", "10.0.0.0/8", true, 8),
            ("192.168.1.7", "192.168.1.7/32", true, 32),
            ("192.168.1.7/32", "192.168.1.7/32", true, 32),
            ("0.0.0.0/0", "0.0.0.0/0", true, 0),
            ("2001:db8::/32", "2001:db8::/32", false, 32),
            ("2001:DB8:0:0::/48", "2001:db8::/48", false, 48),
            ("::1", "::1/128", false, 128),
            ("::/0", "::/0", false, 0),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8", true, 8),
            ("::ffff:a00:0/104", "10.0.0.0/8", true, 8),
            ("::ffff:192.0.2.7", "192.0.2.7/32", true, 32),
            ("::ffff:0:0/96", "0.0.0.0/0", true, 0),
            // Below /96 a range covering the mapped block is a v6 range.
            ("::/80", "::/80", false, 80),
            ("::fffe:0:0/95", "::fffe:0:0/95", false, 95),
            // IPv4-compatible (deprecated) is not mapped: a v6 range.
            ("::10.0.0.0/104", "::a00:0/104", false, 104),
            ("10.0.0.0/08", "10.0.0.0/8", true, 8),
        ];
        for (input, text, v4, len) in table {
            let c = cidr(input);
            assert_eq!(c.to_string(), text, "{input}");
            assert_eq!((c.is_v4(), c.prefix_len()), (v4, len), "{input}");
            assert_eq!(cidr(text), c, "{input}: canonical text must parse back");
        }
        assert_eq!(cidr("10.0.0.0/8"), cidr("::ffff:10.0.0.0/104"));
        assert_eq!(format!("{:?}", cidr("10.0.0.0/8")), "Cidr(10.0.0.0/8)");
        assert_eq!(cidr("::ffff:10.0.0.0/104").network(), ip("10.0.0.0"));
    }

    #[test]
    fn refuses_bad_ranges_with_a_clear_error() {
        let table = [
            ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8?"),
            ("192.168.1.7/24", "host bits set; did you mean 192.168.1.0/24?"),
            ("2001:db8::1/32", "host bits set; did you mean 2001:db8::/32?"),
            ("::ffff:10.0.0.1/104", "host bits set; did you mean 10.0.0.0/8?"),
            ("::ffff:0:0/80", "host bits set; did you mean ::/80?"),
            ("10.0.0.0/33", "prefix length 33 is over 32 for IPv4"),
            ("10.0.0.0/255", "prefix length 255 is over 32 for IPv4"),
            ("10.0.0.0/999", "prefix length 999 is over 32 for IPv4"),
            ("::/129", "prefix length 129 is over 128 for IPv6"),
            ("10.0.0.0/", "not a prefix length: \"\""),
            ("10.0.0.0/+8", "not a prefix length: \"+8\""),
            ("10.0.0.0/-1", "not a prefix length: \"-1\""),
            ("10.0.0.0/0008", "not a prefix length: \"0008\""),
            ("10.0.0.0/8/8", "not a prefix length: \"8/8\""),
            ("10.0.0.0/ 8", "not a prefix length: \" 8\""),
            ("10.0.0/8", "not an IP address: \"10.0.0\""),
            ("010.0.0.0/8", "not an IP address: \"010.0.0.0\""),
            ("10.0.0.256", "not an IP address: \"10.0.0.256\""),
            ("", "not an IP address: \"\""),
            ("/8", "not an IP address: \"\""),
            (" 10.0.0.0/8", "not an IP address: \" 10.0.0.0\""),
            ("example.com/8", "not an IP address: \"example.com\""),
            ("[::1]/128", "not an IP address: \"[::1]\""),
            ("fe80::1%eth0", "not an IP address: \"fe80::1%eth0\""),
        ];
        for (input, message) in table {
            let err = input.parse::<Cidr>().expect_err(input);
            assert_eq!(err.to_string(), message, "{input}");
        }
        assert_eq!(
            Cidr::new(ip("10.0.0.0"), 33),
            Err(CidrError::PrefixTooLong { len: 33, max: 32 })
        );
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits { network: cidr("10.0.0.0/8") })
        );
    }

    // ---- matching ----

    #[test]
    fn v4_rules_match_v4_clients_in_both_forms() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::ffff:11.0.0.1")));
        // IPv4-compatible is a v6 address (as for affinity keys).
        assert!(!c.contains(ip("::10.1.2.3")));
        let deny = acl(&[], &["10.0.0.0/8"]);
        assert!(!deny.allows(ip("10.1.2.3")));
        assert!(!deny.allows(ip("::ffff:10.1.2.3")), "F14: mapped form must not bypass a deny");
        assert!(deny.allows(ip("11.0.0.1")));
        assert!(deny.allows(ip("2001:db8::1")));
        // A rule written in mapped form is the same v4 rule.
        let mapped = acl(&[], &["::ffff:10.0.0.0/104"]);
        assert!(!mapped.allows(ip("10.1.2.3")));
        assert!(!mapped.allows(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn v6_rules_never_match_v4_clients() {
        for rule in ["::/0", "::/80", "::fffe:0:0/95", "::/96", "::a00:0/104"] {
            let c = cidr(rule);
            assert!(!c.is_v4(), "{rule}");
            for client in ["10.1.2.3", "::ffff:10.1.2.3", "0.0.0.0", "255.255.255.255"] {
                assert!(!c.contains(ip(client)), "{rule} must not match {client}");
            }
            assert!(!acl(&[rule], &[]).allows(ip("10.1.2.3")), "{rule}");
            assert!(acl(&[], &[rule]).allows(ip("::ffff:10.1.2.3")), "{rule}");
        }
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("::10.1.2.3")));
        assert!(cidr("::/0").contains(ip("::")));
        // ...and v4 rules never match other v6 clients, not even 0.0.0.0/0.
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::10.1.2.3")));
        assert!(cidr("0.0.0.0/0").contains(ip("::ffff:1.2.3.4")));
    }

    #[test]
    fn deny_wins_over_allow_whatever_the_prefixes() {
        // A more specific allow does not reopen a deny...
        let a = acl(&["10.1.2.3/32", "10.0.0.0/8"], &["10.0.0.0/8"]);
        assert!(!a.allows(ip("10.1.2.3")));
        assert!(!a.allows(ip("10.9.9.9")));
        // ...nor does a broader one.
        let b = acl(&["0.0.0.0/0"], &["10.1.2.3"]);
        assert!(!b.allows(ip("10.1.2.3")));
        assert!(!b.allows(ip("::ffff:10.1.2.3")));
        assert!(b.allows(ip("10.1.2.4")));
        // Order of the lists does not matter.
        let c = acl(&["10.0.0.0/8", "10.1.2.3/32"], &["10.0.0.0/8"]);
        assert_eq!(a.allows(ip("10.1.2.3")), c.allows(ip("10.1.2.3")));
    }

    #[test]
    fn empty_lists_allow_everyone_and_a_nonempty_allow_list_restricts() {
        let open = Acl::default();
        for client in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "::", "0.0.0.0"] {
            assert!(open.allows(ip(client)), "{client}");
            assert!(acl(&[], &[]).allows(ip(client)), "{client}");
        }
        let only = acl(&["192.0.2.0/24", "2001:db8::/32"], &[]);
        assert!(only.allows(ip("192.0.2.200")));
        assert!(only.allows(ip("::ffff:192.0.2.200")));
        assert!(only.allows(ip("2001:db8:1::1")));
        assert!(!only.allows(ip("192.0.3.1")));
        assert!(!only.allows(ip("2001:db9::1")));
        // An allow list of only v6 ranges refuses every v4 client.
        let v6_only = acl(&["::/0"], &[]);
        assert!(v6_only.allows(ip("2001:db8::1")));
        assert!(!v6_only.allows(ip("10.1.2.3")));
        assert_eq!(only.allow().len(), 2);
        assert!(only.deny().is_empty());
    }

    #[test]
    fn prefix_edges() {
        let c = cidr("192.0.2.128/25");
        assert!(c.contains(ip("192.0.2.128")));
        assert!(c.contains(ip("192.0.2.255")));
        assert!(!c.contains(ip("192.0.2.127")));
        assert!(!c.contains(ip("192.0.3.0")));
        let host = cidr("2001:db8::7");
        assert!(host.contains(ip("2001:db8::7")));
        assert!(!host.contains(ip("2001:db8::6")));
        let duplicates = acl(&["10.0.0.0/8", "10.0.0.0/8", "::ffff:10.0.0.0/104"], &[]);
        assert!(duplicates.allows(ip("10.255.0.1")));
        assert!(!duplicates.allows(ip("11.0.0.1")));
    }

    // ---- against a brute-force reference ----

    /// A random client: v4, v4 in mapped form, or v6, with few distinct leading bits so that
    /// rules and clients overlap often.
    fn client(rng: &mut Rng) -> IpAddr {
        let bits = rng.next();
        match rng.below(4) {
            0 => IpAddr::V4(Ipv4Addr::from((bits as u32) & 0x0f0f_ffff)),
            1 => IpAddr::V6(Ipv4Addr::from((bits as u32) & 0x0f0f_ffff).to_ipv6_mapped()),
            2 => IpAddr::V6(Ipv6Addr::from(u128::from(bits & 0x0f0f_ffff) << 96 | 1)),
            // Anywhere in v6, sometimes near the mapped block.
            _ => IpAddr::V6(Ipv6Addr::from(u128::from(bits) << (rng.below(2) * 64))),
        }
    }

    /// A random range around a random client (mapped clients give v4 ranges written in mapped
    /// form), at least `shortest` bits long in the 128-bit space (a v4 /n counts as 96 + n).
    fn rule(rng: &mut Rng, shortest: u8) -> Cidr {
        let ip = client(rng);
        let base = if ip.is_ipv4() { V4_BASE } else { 0 };
        let shortest = shortest.max(base);
        let len = shortest + rng.below(u64::from(129 - shortest)) as u8;
        masked(ip, len - base)
    }

    /// A client in or near `rule`: its network with random host bits.
    fn near(rule: &Cidr, rng: &mut Rng) -> IpAddr {
        let host =
            !mask(rule.prefix_bits()) & (u128::from(rng.next()) << 64 | u128::from(rng.next()));
        let addr = Ipv6Addr::from(rule.network_bits() | host);
        if rule.is_v4() && rng.below(2) == 0 {
            IpAddr::V4(addr.to_ipv4_mapped().unwrap())
        } else {
            IpAddr::V6(addr)
        }
    }

    fn check_against_reference(seed: u64, rules: usize, probes: usize) {
        let mut rng = Rng(seed);
        // Deny ranges narrower than allow ranges, so that clients are often allowed, often
        // denied, and often in both lists (about 45%, 55% and 18% of probes).
        let allow: Vec<Cidr> = (0..rules / 2).map(|_| rule(&mut rng, 104)).collect();
        let deny: Vec<Cidr> = (0..rules / 2).map(|_| rule(&mut rng, 116)).collect();
        let acl = Acl::new(allow.clone(), deny.clone());
        let mut allowed = 0;
        for i in 0..probes {
            let ip = match i % 3 {
                0 => client(&mut rng),
                1 => near(&allow[rng.below(allow.len() as u64) as usize], &mut rng),
                _ => near(&deny[rng.below(deny.len() as u64) as usize], &mut rng),
            };
            let expected = reference_allows(&allow, &deny, ip);
            assert_eq!(acl.allows(ip), expected, "seed {seed}: {ip}");
            allowed += usize::from(expected);
            for rule in allow.iter().take(8) {
                assert_eq!(rule.contains(ip), reference_contains(rule, ip), "{rule} {ip}");
            }
        }
        // Both answers are exercised.
        assert!(allowed > probes / 10 && allowed < probes * 9 / 10, "seed {seed}: {allowed}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

        /// 10k rules (5k allow, 5k deny) against a linear scan of first-principles matching.
        #[test]
        fn ten_thousand_rules_match_the_reference(seed in any::<u64>()) {
            check_against_reference(seed, 10_000, 400);
        }
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..64, any::<u16>())
                .prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from(hi << 24 | u32::from(lo)))),
            (0u32..64, any::<u16>()).prop_map(|(hi, lo)| IpAddr::V6(
                Ipv4Addr::from(hi << 24 | u32::from(lo)).to_ipv6_mapped()
            )),
            any::<u128>().prop_map(|bits| IpAddr::V6(Ipv6Addr::from(bits))),
            (0u128..4, any::<u32>())
                .prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from(hi << 120 | u128::from(lo)))),
        ]
    }

    fn arb_cidr() -> impl Strategy<Value = Cidr> {
        (arb_ip(), any::<u8>()).prop_map(|(ip, len)| {
            let max = if ip.is_ipv4() { 33 } else { 129 };
            masked(ip, (u16::from(len) % max) as u8)
        })
    }

    proptest! {
        #[test]
        fn small_lists_match_the_reference(
            allow in proptest::collection::vec(arb_cidr(), 0..20),
            deny in proptest::collection::vec(arb_cidr(), 0..20),
            clients in proptest::collection::vec(arb_ip(), 1..50),
        ) {
            let acl = Acl::new(allow.clone(), deny.clone());
            for ip in clients {
                prop_assert_eq!(acl.allows(ip), reference_allows(&allow, &deny, ip), "{}", ip);
            }
            for rule in allow.iter().chain(&deny) {
                let ip = rule.network();
                prop_assert_eq!(acl.allows(ip), reference_allows(&allow, &deny, ip), "{}", ip);
            }
        }

        #[test]
        fn canonical_text_round_trips(c in arb_cidr()) {
            prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
            prop_assert_eq!(Cidr::new(c.network(), c.prefix_len()), Ok(c));
        }
    }
}
