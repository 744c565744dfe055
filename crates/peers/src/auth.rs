//! The handshake's proof: each side sends a fresh random nonce with its name, then
//! `HMAC-SHA256(key, context | role | nonce of the prover | nonce of the verifier | prover's name
//! | verifier's name)`. The key never crosses the wire; a proof made for one connection (its two
//! nonces), one direction and one pair of names is worth nothing on another, so a recorded or
//! reflected proof is refused.
//!
//! The key: `--peer-key-file`, one line of 64 hex characters (32 random bytes).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce and of a proof.
pub const NONCE: usize = 32;
pub const PROOF: usize = 32;

/// The shared key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key file's text: one line of 64 hex characters (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Key, String> {
        let hex = text.trim();
        if hex.len() != 64 {
            return Err(format!("expected 64 hex characters (32 bytes), found {}", hex.len()));
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            let pair = &hex[2 * i..2 * i + 2];
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|_| format!("{pair:?} at character {} is not hex", 2 * i + 1))?;
        }
        Ok(Key(key))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The proof that the side named `prover`, which sent `prover_nonce`, knows the key, for
    /// the side named `verifier`, which sent `verifier_nonce`. `dialer`: the prover opened the
    /// connection.
    pub fn proof(
        &self,
        dialer: bool,
        prover_nonce: &[u8; NONCE],
        verifier_nonce: &[u8; NONCE],
        prover: &str,
        verifier: &str,
    ) -> [u8; PROOF] {
        self.mac(dialer, prover_nonce, verifier_nonce, prover, verifier)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the one [`proof`](Self::proof) makes for these inputs (compared in
    /// constant time).
    pub fn verify(
        &self,
        proof: &[u8],
        dialer: bool,
        prover_nonce: &[u8; NONCE],
        verifier_nonce: &[u8; NONCE],
        prover: &str,
        verifier: &str,
    ) -> bool {
        self.mac(dialer, prover_nonce, verifier_nonce, prover, verifier).verify_slice(proof).is_ok()
    }

    fn mac(
        &self,
        dialer: bool,
        prover_nonce: &[u8; NONCE],
        verifier_nonce: &[u8; NONCE],
        prover: &str,
        verifier: &str,
    ) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"tether-peers-v1");
        mac.update(&[u8::from(dialer)]);
        mac.update(prover_nonce);
        mac.update(verifier_nonce);
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        for name in [prover, verifier] {
            mac.update(&(name.len() as u32).to_be_bytes());
            mac.update(name.as_bytes());
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_key_file_is_64_hex_characters() {
        assert!(Key::parse(HEX).is_ok());
        assert!(Key::parse(&format!("  {HEX}\n")).is_ok());
        assert!(Key::parse(&HEX[..62]).unwrap_err().contains("found 62"));
        let bad = format!("zz{}", &HEX[2..]);
        assert!(Key::parse(&bad).unwrap_err().contains("not hex"));
        assert_eq!(format!("{:?}", Key::parse(HEX).unwrap()), "Key(..)", "never printed");
    }

    #[test]
    fn a_proof_holds_only_for_its_key_nonces_direction_and_names() {
        let key = Key::parse(HEX).unwrap();
        let other = Key::from_bytes([7; 32]);
        let (a, b) = ([1u8; NONCE], [2u8; NONCE]);
        let p = key.proof(true, &a, &b, "alpha", "beta");
        assert!(key.verify(&p, true, &a, &b, "alpha", "beta"));
        assert!(!other.verify(&p, true, &a, &b, "alpha", "beta"), "another key");
        assert!(!key.verify(&p, false, &a, &b, "alpha", "beta"), "reflected: the other role");
        assert!(!key.verify(&p, true, &b, &a, "alpha", "beta"), "nonces swapped");
        assert!(!key.verify(&p, true, &a, &[3; NONCE], "alpha", "beta"), "another connection");
        assert!(!key.verify(&p, true, &a, &b, "alph", "abeta"), "names shifted");
        assert!(!key.verify(&p[..31], true, &a, &b, "alpha", "beta"), "truncated");
    }
}
