//! Deterministic payloads and a streaming digest to check them end to end.
//!
//! A test writes [`pattern`] bytes on one side and compares [`Digest`]s on the other: a byte
//! lost, duplicated, reordered or corrupted by the proxy changes the digest. The digest is
//! SipHash-1-3 with a zero key, a corruption check and not a MAC.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// Fills `buf` with the pattern bytes at stream offsets `offset..offset + buf.len()`.
///
/// Byte `p` of the stream is byte `p % 8` (little endian) of `splitmix64(p / 8)`, so any
/// chunking of the stream yields the same bytes, and generation runs 8 bytes at a time.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut rest = buf;
    let skew = (pos % 8) as usize;
    if skew != 0 && !rest.is_empty() {
        let word = word(pos / 8).to_le_bytes();
        let n = (8 - skew).min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&word[skew..skew + n]);
        rest = tail;
        pos += n as u64;
    }
    let mut words = rest.chunks_exact_mut(8);
    for chunk in &mut words {
        chunk.copy_from_slice(&word(pos / 8).to_le_bytes());
        pos += 8;
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&word(pos / 8).to_le_bytes()[..n]);
}

/// The `index`th output of splitmix64 seeded with 0 (Steele, Lea and Flood, "Fast splittable
/// pseudorandom number generators", OOPSLA 2014): consecutive words look unrelated, so a shifted
/// or repeated block never matches by accident.
fn word(index: u64) -> u64 {
    let mut z = index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A streaming digest: feeding bytes in any chunking gives the same [`Digest::finish`].
#[derive(Clone, Debug)]
pub struct Digest {
    hasher: SipHasher13,
    bytes: u64,
}

impl Digest {
    pub fn new() -> Self {
        Digest { hasher: SipHasher13::new_with_keys(0, 0), bytes: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.write(data);
        self.bytes += data.len() as u64;
    }

    /// The digest of everything fed so far; feeding may go on afterwards.
    pub fn finish(&self) -> u64 {
        self.hasher.finish()
    }

    /// How many bytes were fed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// [`Digest::finish`] as 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex(self.finish())
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new()
    }
}

/// A digest as 16 lowercase hex digits, the form the `sink` command replies with.
pub fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// The digest of `data`.
pub fn digest_of(data: &[u8]) -> u64 {
    let mut digest = Digest::new();
    digest.update(data);
    digest.finish()
}

/// The digest of the first `n` bytes of the [`pattern`] stream.
pub fn digest_of_pattern(n: u64) -> u64 {
    // Writing to io::sink cannot fail.
    crate::client::write_pattern(&mut std::io::sink(), n).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        pattern(0, &mut buf);
        buf
    }

    #[test]
    fn pattern_is_the_same_in_any_chunking() {
        let reference = whole(1000);
        for chunk in [1, 2, 3, 5, 7, 8, 9, 13, 64, 999, 1000] {
            let mut pieced = vec![0; 1000];
            let mut offset = 0;
            for piece in pieced.chunks_mut(chunk) {
                pattern(offset, piece);
                offset += piece.len() as u64;
            }
            assert_eq!(pieced, reference, "chunk {chunk}");
        }
    }

    #[test]
    fn pattern_at_an_offset_is_a_slice_of_the_stream() {
        let reference = whole(300);
        for start in 0..40 {
            for len in [0, 1, 7, 8, 9, 100] {
                let mut buf = vec![0; len];
                pattern(start as u64, &mut buf);
                assert_eq!(buf, reference[start..start + len], "start {start} len {len}");
            }
        }
    }

    #[test]
    fn pattern_does_not_repeat_itself() {
        let stream = whole(4096);
        let words: std::collections::HashSet<&[u8]> = stream.chunks(8).collect();
        assert_eq!(words.len(), 512);
    }

    #[test]
    fn digest_is_the_same_in_any_chunking() {
        let stream = whole(200_000);
        let reference = digest_of(&stream);
        assert_eq!(reference, digest_of_pattern(200_000));
        for chunk in [1, 3, 8, 1000, 65_536, 65_537] {
            let mut digest = Digest::new();
            for piece in stream.chunks(chunk) {
                digest.update(piece);
            }
            assert_eq!(digest.finish(), reference, "chunk {chunk}");
            assert_eq!(digest.bytes(), 200_000);
        }
    }

    #[test]
    fn digest_sees_a_changed_length_or_byte() {
        let mut stream = whole(1000);
        let reference = digest_of(&stream);
        assert_ne!(digest_of(&stream[..999]), reference);
        stream[500] ^= 1;
        assert_ne!(digest_of(&stream), reference);
        assert_ne!(digest_of_pattern(0), digest_of_pattern(1));
    }

    #[test]
    fn hex_is_sixteen_digits() {
        assert_eq!(hex(0xab), "00000000000000ab");
        assert_eq!(Digest::new().hex().len(), 16);
    }
}
