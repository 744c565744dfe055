//! UDP session keys (`--udp-session-key offset:length`): bytes of a datagram's payload that
//! name the client's session (a game's session token, a QUIC connection ID), so its flow and
//! its pin follow those bytes rather than the address they came from.

use std::fmt;
use std::str::FromStr;

/// Where a service's session key sits in each datagram's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Bytes of payload before the key.
    pub offset: u16,
    /// The key's length, 1..=[`SessionKey::MAX_LEN`].
    pub len: u8,
}

impl SessionKey {
    /// Longest key: room for a QUIC connection ID (20 bytes) or a 256-bit token twice over.
    pub const MAX_LEN: u8 = 64;
    /// Largest UDP payload over IPv4 (65,535 - 20 - 8): a key must end within it.
    pub const MAX_END: usize = 65_507;

    /// Payload bytes a datagram needs to hold the key.
    pub fn end(&self) -> usize {
        usize::from(self.offset) + usize::from(self.len)
    }

    /// The key's bytes in `payload`, `None` when it is too short to hold them.
    pub fn token<'a>(&self, payload: &'a [u8]) -> Option<&'a [u8]> {
        payload.get(usize::from(self.offset)..self.end())
    }
}

/// A 128-bit SipHash-1-3 of `token` under `secret`: what a flow table tells sessions apart
/// by. Under a secret key no client can make two tokens collide, so none can land in another's
/// flow except by sending its very token.
pub fn digest(token: &[u8], secret: [u8; 16]) -> [u8; 16] {
    use std::hash::Hasher;
    let mut h = siphasher::sip128::SipHasher13::new_with_key(&secret);
    h.write(token);
    siphasher::sip128::Hasher128::finish128(&h).as_bytes()
}

impl FromStr for SessionKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let form = "expected OFFSET:LENGTH in bytes, e.g. 4:8";
        let (offset, len) = s.split_once(':').ok_or(form)?;
        let offset: usize = offset.trim().parse().map_err(|_| form)?;
        let len: usize = len.trim().parse().map_err(|_| form)?;
        if len == 0 || len > usize::from(Self::MAX_LEN) {
            return Err(format!("the length must be 1 to {} bytes", Self::MAX_LEN));
        }
        if offset + len > Self::MAX_END {
            return Err(format!("the key must end within {} bytes of payload", Self::MAX_END));
        }
        Ok(SessionKey { offset: offset as u16, len: len as u8 })
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.offset, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_its_bytes() {
        let k: SessionKey = "2:4".parse().unwrap();
        assert_eq!(k, SessionKey { offset: 2, len: 4 });
        assert_eq!(k.to_string(), "2:4");
        assert_eq!(k.token(b"..abcd!"), Some(&b"abcd"[..]));
        assert_eq!(k.token(b"..abcd"), Some(&b"abcd"[..]));
        assert_eq!(k.token(b"..abc"), None);
        assert_eq!(k.token(b""), None);
        assert_eq!("0:64".parse::<SessionKey>().unwrap().end(), 64);
    }

    #[test]
    fn digests_differ_by_token_and_by_secret() {
        let d = digest(b"token-1", [1; 16]);
        assert_eq!(d, digest(b"token-1", [1; 16]));
        assert_ne!(d, digest(b"token-2", [1; 16]));
        assert_ne!(d, digest(b"token-1", [2; 16]));
    }

    #[test]
    fn refuses_every_bad_form() {
        for (bad, says) in [
            ("8", "OFFSET:LENGTH"),
            ("a:4", "OFFSET:LENGTH"),
            ("4:", "OFFSET:LENGTH"),
            ("-1:4", "OFFSET:LENGTH"),
            ("4:0", "1 to 64"),
            ("4:65", "1 to 64"),
            ("65500:8", "end within 65507"),
            ("99999999999999999999:4", "OFFSET:LENGTH"),
        ] {
            let e = bad.parse::<SessionKey>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
