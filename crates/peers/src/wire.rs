//! The peers' frames: a 4-byte big-endian length (of what follows), a kind byte, the body.
//! Strings are a length byte and UTF-8; numbers big-endian. Every frame is checked whole before
//! anything of it is used: a frame over [`MAX_FRAME`], an unknown kind, a string that is not
//! UTF-8, a count beyond what the frame holds or bytes left over are errors, and the caller
//! drops the connection.

use std::fmt;

use crate::auth::{NONCE, PROOF};
use crate::Version;

/// Largest frame body (kind byte included).
pub const MAX_FRAME: usize = 64 * 1024;
/// Most changes in one frame.
pub const MAX_CHANGES: usize = 1024;
/// Protocol version in the hello.
pub const PROTOCOL: u8 = 1;

const HELLO: u8 = 1;
const PROOF_KIND: u8 = 2;
const CHANGES: u8 = 3;
const SYNC_START: u8 = 4;
const SYNC_END: u8 = 5;
const PING: u8 = 6;
const RESYNC: u8 = 7;
const HEALTH: u8 = 8;

const PIN: u8 = 1;
const TOUCH: u8 = 2;
const EXPIRE: u8 = 3;

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First from each side: who it is, and a fresh nonce for the other's proof.
    Hello {
        protocol: u8,
        name: String,
        nonce: [u8; NONCE],
    },
    /// Second from each side: [`crate::auth::Key::proof`] over both hellos.
    Proof([u8; PROOF]),
    /// Changes of pins, oldest first.
    Changes(Vec<Change>),
    /// A full transfer of the sender's table follows (in `Changes`), then `SyncEnd`.
    SyncStart,
    SyncEnd {
        entries: u64,
    },
    /// The connection is alive (sent when nothing else was for a while).
    Ping,
    /// The sender missed changes (its queue overflowed): send it a full transfer.
    Resync,
    /// What the sender's own probes say of each backend (for `--peer-health quorum`).
    Health(Vec<HealthView>),
}

/// One backend as one instance's probes see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthView {
    pub service: String,
    pub backend: String,
    pub up: bool,
}

/// One change of one pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: String,
    /// The client's affinity key (16 bytes: an IPv4 address as mapped IPv6, or a prefix).
    pub key: [u8; 16],
    pub what: What,
    /// The pin's version: when and where its backend was last set.
    pub version: Version,
}

/// What happened to a pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// Pinned (or re-pinned) to `backend`, by name; `left_ms`: time before it expires, `None`
    /// while the client has sessions open on the sender.
    Pin { backend: String, left_ms: Option<u64> },
    /// Still pinned as at `version`: its expiry starts again (`left_ms` as above).
    Touch { left_ms: Option<u64> },
    /// Gone on the sender (expired).
    Expire,
}

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    TooLarge(usize),
    UnknownKind(u8),
    Truncated(&'static str),
    NotUtf8(&'static str),
    TooMany(usize),
    Trailing(usize),
    Empty,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLarge(n) => write!(f, "a frame of {n} bytes (at most {MAX_FRAME})"),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::Truncated(what) => write!(f, "the frame ends inside {what}"),
            WireError::NotUtf8(what) => write!(f, "{what} is not UTF-8"),
            WireError::TooMany(n) => write!(f, "{n} changes in one frame (at most {MAX_CHANGES})"),
            WireError::Trailing(n) => write!(f, "{n} bytes after the frame's content"),
            WireError::Empty => f.write_str("an empty frame"),
        }
    }
}

impl std::error::Error for WireError {}

/// Append `msg` as one frame to `out`. Strings over 255 bytes are cut (names are at most 64
/// by configuration); a `Changes` of more than [`MAX_CHANGES`] must be split by the caller.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match msg {
        Message::Hello { protocol, name, nonce } => {
            out.push(HELLO);
            out.push(*protocol);
            put_str(out, name);
            out.extend_from_slice(nonce);
        }
        Message::Proof(proof) => {
            out.push(PROOF_KIND);
            out.extend_from_slice(proof);
        }
        Message::Changes(changes) => {
            debug_assert!(changes.len() <= MAX_CHANGES);
            out.push(CHANGES);
            out.extend_from_slice(&(changes.len() as u16).to_be_bytes());
            for c in changes {
                put_str(out, &c.service);
                out.extend_from_slice(&c.key);
                out.extend_from_slice(&c.version.unix_ms.to_be_bytes());
                put_str(out, &c.version.origin);
                match &c.what {
                    What::Pin { backend, left_ms } => {
                        out.push(PIN);
                        put_str(out, backend);
                        put_left(out, *left_ms);
                    }
                    What::Touch { left_ms } => {
                        out.push(TOUCH);
                        put_left(out, *left_ms);
                    }
                    What::Expire => out.push(EXPIRE),
                }
            }
        }
        Message::SyncStart => out.push(SYNC_START),
        Message::SyncEnd { entries } => {
            out.push(SYNC_END);
            out.extend_from_slice(&entries.to_be_bytes());
        }
        Message::Ping => out.push(PING),
        Message::Resync => out.push(RESYNC),
        Message::Health(views) => {
            debug_assert!(views.len() <= MAX_CHANGES);
            out.push(HEALTH);
            out.extend_from_slice(&(views.len() as u16).to_be_bytes());
            for v in views {
                put_str(out, &v.service);
                put_str(out, &v.backend);
                out.push(u8::from(v.up));
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Changes a sender puts in one frame: a change takes at most 16 + 8 + 3 x 256 + 10 bytes, so
/// 64 of them stay under [`MAX_FRAME`].
pub const CHANGES_PER_FRAME: usize = 64;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// `None` as u64::MAX (live sessions on the sender).
fn put_left(out: &mut Vec<u8>, left: Option<u64>) {
    out.extend_from_slice(&left.unwrap_or(u64::MAX).to_be_bytes());
}

/// The first whole frame of `buf` and the bytes it took, `None` if `buf` holds only part of one
/// (a length over [`MAX_FRAME`] is an error at once, before its bytes arrive).
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(head) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
    let mut r = Reader(body);
    let kind = r.u8("the kind").map_err(|_| WireError::Empty)?;
    let msg = match kind {
        HELLO => {
            let protocol = r.u8("the protocol")?;
            let name = r.string("the name")?;
            Message::Hello { protocol, name, nonce: r.array("the nonce")? }
        }
        PROOF_KIND => Message::Proof(r.array("the proof")?),
        CHANGES => {
            let n = r.u16("the count")? as usize;
            if n > MAX_CHANGES {
                return Err(WireError::TooMany(n));
            }
            let mut changes = Vec::with_capacity(n);
            for _ in 0..n {
                changes.push(r.change()?);
            }
            Message::Changes(changes)
        }
        SYNC_START => Message::SyncStart,
        SYNC_END => Message::SyncEnd { entries: r.u64("the count")? },
        PING => Message::Ping,
        RESYNC => Message::Resync,
        HEALTH => {
            let n = r.u16("the count")? as usize;
            if n > MAX_CHANGES {
                return Err(WireError::TooMany(n));
            }
            let mut views = Vec::with_capacity(n);
            for _ in 0..n {
                let service = r.string("a service name")?;
                let backend = r.string("a backend name")?;
                let up = match r.u8("a health")? {
                    0 => false,
                    1 => true,
                    other => return Err(WireError::UnknownKind(other)),
                };
                views.push(HealthView { service, backend, up });
            }
            Message::Health(views)
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(Some((msg, 4 + len)))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8(what))
    }

    fn left(&mut self) -> Result<Option<u64>, WireError> {
        let v = self.u64("a time left")?;
        Ok((v != u64::MAX).then_some(v))
    }

    fn change(&mut self) -> Result<Change, WireError> {
        let service = self.string("a service name")?;
        let key = self.array("a client key")?;
        let unix_ms = self.u64("a change's time")?;
        let origin = self.string("an instance name")?;
        let what = match self.u8("a change's kind")? {
            PIN => {
                let backend = self.string("a backend name")?;
                What::Pin { backend, left_ms: self.left()? }
            }
            TOUCH => What::Touch { left_ms: self.left()? },
            EXPIRE => What::Expire,
            other => return Err(WireError::UnknownKind(other)),
        };
        Ok(Change { service, key, what, version: Version { unix_ms, origin } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(i: u8, what: What) -> Change {
        Change {
            service: "game".into(),
            key: [i; 16],
            what,
            version: Version { unix_ms: 1_700_000_000_000 + u64::from(i), origin: "a".into() },
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { protocol: PROTOCOL, name: "edge-1".into(), nonce: [9; NONCE] },
            Message::Proof([7; PROOF]),
            Message::Changes(vec![
                change(1, What::Pin { backend: "db-1".into(), left_ms: None }),
                change(2, What::Pin { backend: "db-2".into(), left_ms: Some(30_000) }),
                change(3, What::Touch { left_ms: Some(5) }),
                change(4, What::Expire),
            ]),
            Message::Changes(Vec::new()),
            Message::SyncStart,
            Message::SyncEnd { entries: 123_456 },
            Message::Ping,
            Message::Resync,
            Message::Health(vec![
                HealthView { service: "game".into(), backend: "b0".into(), up: false },
                HealthView { service: "game".into(), backend: "b1".into(), up: true },
            ]),
        ]
    }

    #[test]
    fn every_message_round_trips_and_a_stream_splits_into_its_frames() {
        let mut stream = Vec::new();
        for m in samples() {
            let mut one = Vec::new();
            encode(&m, &mut one);
            assert_eq!(decode(&one), Ok(Some((m.clone(), one.len()))));
            // Every proper prefix is incomplete, not an error.
            for cut in 0..one.len() {
                assert_eq!(decode(&one[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
            stream.extend(one);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, used)) = decode(&stream[at..]).unwrap() {
            got.push(m);
            at += used;
        }
        assert_eq!((got, at), (samples(), stream.len()));
    }

    #[test]
    fn bad_frames_are_refused_with_the_reason() {
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(decode(&huge), Err(WireError::TooLarge(MAX_FRAME + 1)), "before the bytes come");
        assert_eq!(decode(&frame(&[])), Err(WireError::Empty));
        assert_eq!(decode(&frame(&[99])), Err(WireError::UnknownKind(99)));
        assert_eq!(decode(&frame(&[PING, 0])), Err(WireError::Trailing(1)));
        assert_eq!(decode(&frame(&[PROOF_KIND, 1, 2])), Err(WireError::Truncated("the proof")));
        let mut hello = vec![HELLO, 1, 2, 0xff, 0xfe];
        hello.extend_from_slice(&[0; NONCE]);
        assert_eq!(decode(&frame(&hello)), Err(WireError::NotUtf8("the name")));
        let many = [CHANGES, 0xff, 0xff];
        assert_eq!(decode(&frame(&many)), Err(WireError::TooMany(65_535)));
        assert_eq!(decode(&frame(&[CHANGES, 0, 1])), Err(WireError::Truncated("a service name")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_a_decoded_frame_encodes_back(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            if let Ok(Some((m, used))) = decode(&bytes) {
                let mut again = Vec::new();
                encode(&m, &mut again);
                prop_assert_eq!(&again[..], &bytes[..used]);
            }
        }

        #[test]
        fn changes_round_trip(
            entries in proptest::collection::vec(
                ("[a-z]{0,12}", any::<[u8; 16]>(), any::<u64>(), "[a-z0-9-]{1,20}",
                 0u8..3, "[a-z0-9.:-]{0,30}", proptest::option::of(0u64..u64::MAX)),
                0..40)
        ) {
            let changes: Vec<Change> = entries.into_iter().map(|(s, key, ms, origin, k, b, left)| {
                let what = match k {
                    0 => What::Pin { backend: b, left_ms: left },
                    1 => What::Touch { left_ms: left },
                    _ => What::Expire,
                };
                Change { service: s, key, what, version: Version { unix_ms: ms, origin } }
            }).collect();
            let m = Message::Changes(changes);
            let mut buf = Vec::new();
            encode(&m, &mut buf);
            prop_assert_eq!(decode(&buf), Ok(Some((m, buf.len()))));
        }
    }
}
