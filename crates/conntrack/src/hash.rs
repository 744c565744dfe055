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

    #[test]
    fn the_key_changes_the_hash() {
        let a = KeyedHasher::new([1; 16]);
        let b = KeyedHasher::new([2; 16]);
        assert_eq!(a.hash_one(42u64), KeyedHasher::new([1; 16]).hash_one(42u64));
        assert_ne!(a.hash_one(42u64), b.hash_one(42u64));
        assert!(!format!("{a:?}").contains('1'));
    }
}
