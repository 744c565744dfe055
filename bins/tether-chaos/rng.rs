//! Seeded randomness and the byte patterns sessions carry.
//!
//! Every byte of a session is a function of the session's id, its direction and its offset, so a
//! receiver checks each byte where it lands without keeping a copy: a wrong byte is corrupted,
//! bytes past the expected length are duplicated, an early end is truncated.

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A derived generator: the same parent seed and label always give the same stream.
    pub fn fork(&self, label: u64) -> Rng {
        Rng(mix(self.0 ^ mix(label)))
    }
}

/// The stream key of a session's direction: uploads and downloads differ.
pub fn stream_key(session: u64, download: bool) -> u64 {
    mix(session.wrapping_mul(2).wrapping_add(u64::from(download)))
}

/// Fill `buf` with the bytes at `offset..offset + buf.len()` of stream `key`.
pub fn fill(key: u64, offset: u64, buf: &mut [u8]) {
    let mut at = 0;
    let mut off = offset;
    while at < buf.len() {
        let word = mix(key ^ (off >> 3)).to_le_bytes();
        let start = (off & 7) as usize;
        let n = (8 - start).min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&word[start..start + n]);
        at += n;
        off += n as u64;
    }
}

/// How many bytes of `got`, received at `offset` of stream `key`, differ from what was sent.
pub fn count_wrong(key: u64, offset: u64, got: &[u8], scratch: &mut Vec<u8>) -> u64 {
    scratch.resize(got.len(), 0);
    fill(key, offset, scratch);
    if scratch[..] == got[..] {
        return 0;
    }
    got.iter().zip(scratch.iter()).filter(|(a, b)| a != b).count() as u64
}

/// Moves the bytes of `data` up to and including the first newline onto `line` (at most
/// `max` bytes in all); returns the rest and whether the line is complete.
pub fn take_line<'a>(
    line: &mut Vec<u8>,
    data: &'a [u8],
    max: usize,
) -> std::io::Result<(&'a [u8], bool)> {
    let nl = data.iter().position(|&b| b == b'\n');
    let take = nl.map_or(data.len(), |i| i + 1);
    line.extend_from_slice(&data[..take]);
    if line.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
    }
    Ok((&data[take..], nl.is_some()))
}

/// A transfer size: mostly small, some large, a few up to `max` (the mix a database or game
/// fleet sees: queries and state updates, now and then a dump).
pub fn size(rng: &mut Rng, max: u64) -> u64 {
    match rng.below(100) {
        0..=9 => 0,
        10..=39 => rng.range(1, 1024),
        40..=84 => rng.range(1024, 256 * 1024),
        85..=97 => rng.range(256 * 1024, 2 * 1024 * 1024),
        _ => rng.range(2 * 1024 * 1024, max.max(2 * 1024 * 1024)),
    }
    .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_at_any_offset_matches_the_whole_stream() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        for start in 0..100 {
            for len in [0, 1, 7, 8, 9, 30] {
                let end = (start + len).min(100);
                let mut part = vec![0u8; end - start];
                fill(7, start as u64, &mut part);
                assert_eq!(part, whole[start..end], "{start}+{len}");
            }
        }
    }

    #[test]
    fn wrong_bytes_are_counted_and_directions_differ() {
        let mut buf = vec![0u8; 64];
        fill(stream_key(3, false), 10, &mut buf);
        let mut scratch = Vec::new();
        assert_eq!(count_wrong(stream_key(3, false), 10, &buf, &mut scratch), 0);
        buf[5] ^= 1;
        buf[40] ^= 0x80;
        assert_eq!(count_wrong(stream_key(3, false), 10, &buf, &mut scratch), 2);
        assert!(count_wrong(stream_key(3, true), 10, &buf, &mut scratch) > 50);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<u64> = (0..20).map(|_| size(&mut a, 8 << 20)).collect();
        let ys: Vec<u64> = (0..20).map(|_| size(&mut b, 8 << 20)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x <= 8 << 20));
        let mut c = Rng::new(1);
        assert!((0..1000).all(|_| c.below(10) < 10));
    }
}
