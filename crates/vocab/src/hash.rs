//! Keyed hashing for tables that clients can fill.

use std::fmt;
use std::hash::BuildHasher;

use siphasher::sip::SipHasher13;

/// A [`BuildHasher`] for SipHash-1-3 under a 128-bit key chosen by the caller.
///
/// Clients choose their own addresses, so a table keyed by them must not use a hash an attacker
/// can predict, or one client could aim every entry at one bucket chain (hash flooding; the
/// reason SipHash exists, Aumasson & Bernstein 2012). The daemon draws the key at random once per
/// process. There is deliberately no `Default` and no built-in key: a fixed key would be public.
/// SipHash-1-3 is the round count std's own `HashMap` uses: the flooding protection at about
/// half the cost of SipHash-2-4.
#[derive(Clone)]
pub struct KeyedHasher {
    key: [u8; 16],
}

impl KeyedHasher {
    /// A hasher builder for `key`, which should come from a CSPRNG.
    pub fn new(key: [u8; 16]) -> Self {
        Self { key }
    }
}

impl BuildHasher for KeyedHasher {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_key(&self.key)
    }
}

// Never print the key: it is the whole of the flooding protection.
impl fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyedHasher { key: <redacted> }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hash flooding (FAILURE-MODES F9): an attacker who knew the key could pick client
    /// addresses whose hashes share their low bits, which is what both tables index buckets by
    /// (hashbrown: low bits pick the group, high 7 bits the tag), and turn every lookup into a
    /// walk along one chain. The test builds such a set for one key, checks it really collides
    /// under that key, then shows that under another key (what a process draws at random) the
    /// same addresses spread like random ones: as many distinct buckets and no longer chains.
    /// That is the cost a lookup pays, so the chosen keys cost no more than random keys.
    #[test]
    fn addresses_chosen_to_collide_under_one_key_spread_under_another() {
        use crate::AffinityKey;
        use std::net::{IpAddr, Ipv4Addr};

        const BITS: u32 = 10;
        const N: usize = 1 << BITS;
        let mask = (1u64 << BITS) - 1;
        let attacker = KeyedHasher::new([0x41; 16]);
        let key =
            |i: u32| AffinityKey::from_ip(IpAddr::V4(Ipv4Addr::from(i.wrapping_add(0x0a00_0000))));
        // Every address whose hash under the attacker's key has low bits 0.
        let chosen: Vec<AffinityKey> =
            (0..).map(key).filter(|k| attacker.hash_one(k) & mask == 0).take(N).collect();
        let spread = |h: &KeyedHasher, keys: &[AffinityKey]| {
            let mut load = vec![0usize; N];
            for k in keys {
                load[(h.hash_one(k) & mask) as usize] += 1;
            }
            let distinct = load.iter().filter(|&&n| n > 0).count();
            (distinct, load.into_iter().max().unwrap_or(0))
        };
        assert_eq!(spread(&attacker, &chosen), (1, N), "the chosen set must collide");
        let random: Vec<AffinityKey> =
            (0..N as u32).map(|i| key(i.wrapping_mul(2_654_435_761))).collect();
        for seed in 1..=8u8 {
            let process = KeyedHasher::new([seed; 16]);
            let (distinct, longest) = spread(&process, &chosen);
            let (random_distinct, random_longest) = spread(&process, &random);
            // N balls in N bins fill about 63% of them, the fullest holding 5 or 6.
            assert!(distinct > N / 2, "key {seed}: {distinct} buckets for the chosen set");
            assert!(longest <= 10, "key {seed}: a chain of {longest} for the chosen set");
            assert!(distinct + N / 16 >= random_distinct, "{distinct} vs {random_distinct}");
            assert!(longest <= random_longest + 4, "{longest} vs {random_longest}");
        }
    }

    #[test]
    fn the_key_changes_the_hash() {
        let a = KeyedHasher::new([1; 16]);
        let b = KeyedHasher::new([2; 16]);
        assert_eq!(a.hash_one(42u64), KeyedHasher::new([1; 16]).hash_one(42u64));
        assert_ne!(a.hash_one(42u64), b.hash_one(42u64));
        assert!(!format!("{a:?}").contains('1'));
    }
}
