//! The state file's format: the sticky tables of every service, as bytes and back. Pure: the
//! caller reads and writes the file and supplies the clock.
//!
//! ```text
//! magic "TETHSTAT" | version u16 | reserved u16 | SipHash-2-4 of all that follows u64
//! | saved at (unix ms) u64 | payload length u64 | payload
//! payload: services u32, then per service:
//!   name (u16 length + UTF-8) | backends u16, each a name (u16 length + UTF-8) | entries u32,
//!   each 27 bytes: client key [16] | backend index u16 | last used (unix ms) u64 | live u8
//! ```
//!
//! Integers are little-endian. Backends are named, not numbered: ids are per process. A file
//! that is short, has another magic or version, or whose payload does not match its length or
//! checksum is refused whole; an entry naming a backend the service's list does not have is
//! skipped alone. The checksum is for torn and corrupted files, not for tampering: the file is
//! the operator's.

use std::hash::Hasher;

use siphasher::sip::SipHasher24;

/// What every state file starts with.
pub const MAGIC: [u8; 8] = *b"TETHSTAT";
/// The format this code writes and reads.
pub const VERSION: u16 = 1;
/// Header bytes before the payload.
const HEADER: usize = 8 + 2 + 2 + 8 + 8 + 8;
/// Where the bytes the checksum covers start (after magic, version, reserved and the sum).
const SUMMED: usize = 8 + 2 + 2 + 8;
/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 16 + 2 + 8 + 1;

/// One saved pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedEntry {
    /// The client's affinity key (`AffinityKey::to_bytes`).
    pub key: [u8; 16],
    /// Index into the service's backend names.
    pub backend: u16,
    /// When a session of the client last ended (unix ms); the save time if sessions were open.
    pub last_used_unix_ms: u64,
    /// Sessions were open when it was saved.
    pub live: bool,
}

/// One service's saved table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedService {
    /// The service's name (services are matched by name on load).
    pub name: String,
    /// Backend names; entries point into this list.
    pub backends: Vec<String>,
    /// Its pins.
    pub entries: Vec<SavedEntry>,
}

/// A whole state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedState {
    /// When it was saved (unix ms).
    pub saved_at_unix_ms: u64,
    /// Every service's table.
    pub services: Vec<SavedService>,
}

/// Why a state file was refused whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than its header, or than the payload its header announces (a torn write).
    Truncated {
        /// Bytes there are.
        len: usize,
        /// Bytes there should be.
        needed: usize,
    },
    /// Not a state file.
    Magic,
    /// Written by another format version.
    Version(u16),
    /// The payload is not what was written (corrupted).
    Checksum,
    /// The payload's structure is broken (a length running past the end, bad UTF-8).
    Malformed(&'static str),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Truncated { len, needed } => {
                write!(f, "truncated: {len} bytes, {needed} needed")
            }
            StateError::Magic => f.write_str("not a tether state file"),
            StateError::Version(v) => write!(f, "format version {v}, this build reads {VERSION}"),
            StateError::Checksum => f.write_str("checksum mismatch: the file is corrupted"),
            StateError::Malformed(what) => write!(f, "malformed: {what}"),
        }
    }
}

impl std::error::Error for StateError {}

fn checksum(payload: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_keys(0, 0);
    h.write(payload);
    h.finish()
}

impl SavedState {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let entries: usize = self.services.iter().map(|s| s.entries.len()).sum();
        let mut payload = Vec::with_capacity(4 + entries * ENTRY_BYTES + 64 * self.services.len());
        payload.extend_from_slice(&(self.services.len() as u32).to_le_bytes());
        for s in &self.services {
            put_str(&mut payload, &s.name);
            payload.extend_from_slice(&(s.backends.len() as u16).to_le_bytes());
            for b in &s.backends {
                put_str(&mut payload, b);
            }
            payload.extend_from_slice(&(s.entries.len() as u32).to_le_bytes());
            for e in &s.entries {
                payload.extend_from_slice(&e.key);
                payload.extend_from_slice(&e.backend.to_le_bytes());
                payload.extend_from_slice(&e.last_used_unix_ms.to_le_bytes());
                payload.push(u8::from(e.live));
            }
        }
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // the checksum, once what it covers is written
        out.extend_from_slice(&self.saved_at_unix_ms.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        let sum = checksum(&out[SUMMED..]);
        out[SUMMED - 8..SUMMED].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// A state from a file's bytes; entries naming no backend of their service are dropped
    /// (counted in the second value).
    pub fn decode(bytes: &[u8]) -> Result<(SavedState, usize), StateError> {
        if bytes.len() < HEADER {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                return Err(StateError::Magic);
            }
            return Err(StateError::Truncated { len: bytes.len(), needed: HEADER });
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(StateError::Magic);
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let _reserved = r.u16()?;
        let sum = r.u64()?;
        let saved_at_unix_ms = r.u64()?;
        let len = r.u64()?;
        let needed = usize::try_from(len).ok().and_then(|l| l.checked_add(HEADER));
        let Some(needed) = needed.filter(|&n| n <= bytes.len()) else {
            let needed = needed.unwrap_or(usize::MAX);
            return Err(StateError::Truncated { len: bytes.len(), needed });
        };
        if needed != bytes.len() {
            return Err(StateError::Malformed("bytes after the payload"));
        }
        if checksum(&bytes[SUMMED..]) != sum {
            return Err(StateError::Checksum);
        }
        let payload = &bytes[HEADER..];
        let mut r = Reader { bytes: payload, at: 0 };
        let mut skipped = 0;
        let count = r.u32()?;
        let mut services = Vec::new();
        for _ in 0..count {
            let name = r.string()?;
            let backends = (0..r.u16()?).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
            let n = r.u32()? as usize;
            if n.checked_mul(ENTRY_BYTES).map_or(true, |b| b > r.left()) {
                return Err(StateError::Malformed("an entry count past the end"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let key: [u8; 16] =
                    r.take(16)?.try_into().map_err(|_| StateError::Malformed("key"))?;
                let entry = SavedEntry {
                    key,
                    backend: r.u16()?,
                    last_used_unix_ms: r.u64()?,
                    live: r.take(1)?[0] != 0,
                };
                if usize::from(entry.backend) < backends.len() {
                    entries.push(entry);
                } else {
                    skipped += 1;
                }
            }
            services.push(SavedService { name, backends, entries });
        }
        if r.left() != 0 {
            return Err(StateError::Malformed("bytes after the last service"));
        }
        Ok((SavedState { saved_at_unix_ms, services }, skipped))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over the bytes; every read is bounded.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.left() {
            return Err(StateError::Malformed("a length past the end"));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn string(&mut self) -> Result<String, StateError> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| StateError::Malformed("a name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        let entry = |i: u8, backend: u16| SavedEntry {
            key: [i; 16],
            backend,
            last_used_unix_ms: 1_700_000_000_000 + u64::from(i),
            live: i % 2 == 0,
        };
        SavedState {
            saved_at_unix_ms: 1_700_000_000_999,
            services: vec![
                SavedService {
                    name: "pg".into(),
                    backends: vec!["db-1".into(), "[fd00::2]:5432".into()],
                    entries: (0..10).map(|i| entry(i, u16::from(i % 2))).collect(),
                },
                SavedService { name: "game".into(), backends: vec![], entries: vec![] },
            ],
        }
    }

    #[test]
    fn a_state_round_trips_at_27_bytes_an_entry() {
        let state = sample();
        let bytes = state.encode();
        assert_eq!(SavedState::decode(&bytes), Ok((state, 0)));
        let empty = SavedState { services: vec![SavedService::default()], ..SavedState::default() };
        let one_more = SavedState {
            services: vec![SavedService {
                entries: vec![SavedEntry {
                    key: [0; 16],
                    backend: 0,
                    last_used_unix_ms: 0,
                    live: false,
                }],
                backends: vec![String::new()],
                ..SavedService::default()
            }],
            ..SavedState::default()
        };
        // One backend name (2 bytes for its empty length) plus one entry.
        assert_eq!(one_more.encode().len() - empty.encode().len(), 2 + ENTRY_BYTES);
        const { assert!(ENTRY_BYTES <= 40) };
    }

    #[test]
    fn every_torn_corrupted_or_foreign_file_is_refused_whole() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let got = SavedState::decode(&bytes[..cut]);
            assert!(got.is_err(), "a file cut at {cut} of {} bytes was read", bytes.len());
        }
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x40;
            // The reserved field is not checked; every other byte is.
            if (10..12).contains(&i) {
                continue;
            }
            assert!(SavedState::decode(&flipped).is_err(), "byte {i} flipped was read");
        }
        let mut other = bytes.clone();
        other[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(SavedState::decode(&other).unwrap_err(), StateError::Version(2));
        assert_eq!(SavedState::decode(b"GIF89a\0\0 not state").unwrap_err(), StateError::Magic);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SavedState::decode(&longer).is_err());
    }

    #[test]
    fn an_entry_naming_no_backend_is_skipped_alone() {
        let mut state = sample();
        state.services[0].entries[3].backend = 7;
        let (read, skipped) = SavedState::decode(&state.encode()).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(read.services[0].entries.len(), 9);
    }
}
