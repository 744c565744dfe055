//! The PROXY protocol, versions 1 and 2 (HAProxy's `doc/proxy-protocol.txt`, revision
//! 2020/03/05): parse the header a trusted proxy puts before a connection's bytes or a datagram's
//! payload, and encode the header tether sends to a backend. Pure: no I/O, no clock, no threads,
//! and no allocation when parsing (a [`Header`] borrows its TLVs from the caller's buffer).
//!
//! What this crate does not do: decide whether a header is expected (section 5 of the spec: that
//! is configuration, never guessed, and only from trusted sources), read sockets, time out a slow
//! sender (the spec asks for "at least 3 seconds"), interpret TLV values (no CRC32C check, no SSL
//! sub-TLVs), or encode TLVs.
//!
//! ```
//! use std::net::SocketAddr;
//! use tether_proxyproto::{encode_v2, parse, Header, Parsed, Transport};
//!
//! let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
//! let listener: SocketAddr = "198.51.100.1:443".parse().unwrap();
//! let mut out = [0u8; 52];
//! let len = encode_v2(Transport::Stream, client, listener, &mut out);
//!
//! // The first bytes of a connection: half a header so far, then all of it and some payload.
//! assert_eq!(parse(&out[..10]), Ok(Parsed::Incomplete { needed_at_least: 16 }));
//! let mut received = out[..len].to_vec();
//! received.extend_from_slice(b"GET / HTTP/1.1\r\n");
//! let Ok(Parsed::Complete { header, consumed }) = parse(&received) else { panic!() };
//! assert_eq!(consumed, 28);
//! let Header::Proxy { source, destination, .. } = header else { panic!() };
//! assert_eq!((source, destination), (client, listener));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::iter::FusedIterator;
use std::net::SocketAddr;

mod v1;
mod v2;

#[cfg(test)]
mod tests;

/// The longest v1 line, CRLF included (spec section 2.1: "PROXY UNKNOWN" with two full IPv6
/// addresses and ports is 107 characters).
pub const V1_MAX_LEN: usize = 107;

/// The longest header [`parse`] accepts, in bytes: a v2 header is 16 bytes plus its declared
/// length, which may say up to 65,535, and a longer one is [`ParseError::V2TooLong`].
///
/// Addresses take at most 216 bytes (AF_UNIX) and the TLVs known senders add (ALPN, authority,
/// a unique ID of at most 128 bytes, SSL version, cipher and client CN, a cloud's endpoint ID)
/// come to a few hundred more, so 4 KiB leaves room while bounding what a session must buffer
/// before it knows whose bytes it is carrying (pires/go-proxyproto#69 read headers without a
/// bound).
pub const MAX_HEADER_LEN: usize = 4096;

/// The 12 bytes every v2 header starts with (spec section 2.2).
pub const V2_SIGNATURE: [u8; 12] = v2::SIGNATURE;

/// A v2 header with the LOCAL command: what a proxy sends on a connection of its own, such as a
/// health check, so that a receiver that requires a header accepts it and uses the
/// connection's real addresses.
pub const V2_LOCAL: [u8; 16] = v2::LOCAL_HEADER;

/// The v1 line for a connection whose addresses the receiver should not take from the header:
/// the v1 counterpart of [`V2_LOCAL`].
pub const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";

/// What a PROXY protocol header says about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header<'a> {
    /// PROXY with addresses: TCP or UDP over IPv4/IPv6 (v1 `TCP4`/`TCP6` is always
    /// [`Transport::Stream`]).
    Proxy {
        /// TCP or UDP, as the sender says (v2's protocol nibble).
        transport: Transport,
        /// The client the proxy accepted.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
        /// The v2 TLVs after the addresses (empty for v1).
        tlvs: Tlvs<'a>,
    },
    /// The v2 LOCAL command (health checks from the proxy itself), or v1 `PROXY UNKNOWN`: use the
    /// connection's own addresses.
    Local {
        /// The v2 TLVs, when the family byte says where the address block ends (see
        /// [`Header::Unspecified`]); otherwise empty.
        tlvs: Tlvs<'a>,
    },
    /// v2 PROXY with family AF_UNSPEC or AF_UNIX, or a family or protocol whose addresses this
    /// crate cannot use: treat it like [`Header::Local`] (the spec says a receiver may).
    Unspecified {
        /// The v2 TLVs after the address block: AF_UNSPEC has none, AF_UNIX's is 216 bytes. For
        /// an unknown family, or a known one with protocol UNSPEC, the block's size is not
        /// defined, so the whole rest of the header is skipped and this is empty.
        tlvs: Tlvs<'a>,
    },
}

impl<'a> Header<'a> {
    /// The TLVs, whichever the variant.
    pub fn tlvs(&self) -> Tlvs<'a> {
        match *self {
            Header::Proxy { tlvs, .. } | Header::Local { tlvs } | Header::Unspecified { tlvs } => {
                tlvs
            }
        }
    }
}

/// The transport a v2 header names: `SOCK_STREAM` (TCP) or `SOCK_DGRAM` (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP (v2 protocol nibble 1; every v1 line).
    Stream,
    /// UDP (v2 protocol nibble 2).
    Datagram,
}

/// The type-length-value records after a v2 header's addresses (spec section 2.2), borrowed.
///
/// A [`Header`] that [`parse`] returned has TLVs that exactly fill their bytes, so its `iter()`
/// never yields an error; one built with [`Tlvs::new`] over other bytes may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tlvs<'a> {
    bytes: &'a [u8],
}

impl<'a> Tlvs<'a> {
    /// No TLVs.
    pub const EMPTY: Tlvs<'static> = Tlvs { bytes: &[] };

    /// A view over raw TLV bytes (the part of a v2 header after its address block).
    pub fn new(bytes: &'a [u8]) -> Self {
        Tlvs { bytes }
    }

    /// The raw bytes, as received.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Whether there are no TLV bytes at all.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Each TLV in order; an overrun yields [`ParseError::V2TlvOverrun`] once and ends the walk.
    pub fn iter(&self) -> TlvIter<'a> {
        TlvIter { rest: self.bytes }
    }
}

impl<'a> IntoIterator for Tlvs<'a> {
    type Item = Result<Tlv<'a>, ParseError>;
    type IntoIter = TlvIter<'a>;

    fn into_iter(self) -> TlvIter<'a> {
        self.iter()
    }
}

/// One TLV: a type byte and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The type (`PP2_TYPE_*`; see the constants on this type).
    pub kind: u8,
    /// The value, without the 3-byte type and length.
    pub value: &'a [u8],
}

impl Tlv<'_> {
    /// `PP2_TYPE_ALPN`: the negotiated application protocol.
    pub const ALPN: u8 = 0x01;
    /// `PP2_TYPE_AUTHORITY`: the host name the client asked for (TLS SNI), UTF-8.
    pub const AUTHORITY: u8 = 0x02;
    /// `PP2_TYPE_CRC32C`: a checksum of the whole header (not verified by this crate).
    pub const CRC32C: u8 = 0x03;
    /// `PP2_TYPE_NOOP`: padding, to be ignored.
    pub const NOOP: u8 = 0x04;
    /// `PP2_TYPE_UNIQUE_ID`: an opaque connection ID of at most 128 bytes.
    pub const UNIQUE_ID: u8 = 0x05;
    /// `PP2_TYPE_SSL`: TLS details, itself holding sub-TLVs.
    pub const SSL: u8 = 0x20;
    /// `PP2_TYPE_NETNS`: the network namespace's name.
    pub const NETNS: u8 = 0x30;
}

/// The iterator of [`Tlvs::iter`].
#[derive(Debug, Clone)]
pub struct TlvIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (tlv, rest) = match v2::split_tlv(self.rest) {
            Some(split) => split,
            None => {
                self.rest = &[];
                return Some(Err(ParseError::V2TlvOverrun));
            }
        };
        self.rest = rest;
        Some(Ok(tlv))
    }
}

impl FusedIterator for TlvIter<'_> {}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole, valid header: the connection's own bytes start at `consumed`.
    Complete {
        /// What the header says.
        header: Header<'a>,
        /// The header's length in bytes.
        consumed: usize,
    },
    /// Every byte so far fits a valid header, but it has not ended yet: read more and parse the
    /// whole buffer again once it holds at least `needed_at_least` bytes (a lower bound for v1,
    /// whose end shows only when CRLF arrives; exact for v2 once its first 16 bytes are in).
    Incomplete {
        /// The buffer length below which parsing again cannot complete.
        needed_at_least: usize,
    },
}

/// Why the bytes are not a valid PROXY protocol header. Every error is final: more bytes cannot
/// make the header valid, and the connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The first bytes match neither the v1 `PROXY` nor the v2 signature.
    NotProxy,
    /// No CRLF within the first [`V1_MAX_LEN`] bytes of a v1 line.
    V1TooLong,
    /// A v1 line that is not exactly `PROXY TCP4|TCP6 src dst sport dport` or `PROXY UNKNOWN..`
    /// with single spaces, canonical addresses of the named family and decimal ports.
    V1Malformed(&'static str),
    /// The v2 version nibble is not 2.
    V2BadVersion,
    /// The v2 command nibble is neither LOCAL (0) nor PROXY (1).
    V2BadCommand,
    /// A v2 PROXY header whose protocol nibble is not UNSPEC, STREAM or DGRAM, for a known
    /// address family.
    V2BadProtocol,
    /// A v2 PROXY header whose declared length is too short for its family's addresses (12 bytes
    /// for IPv4, 36 for IPv6, 216 for AF_UNIX).
    V2LengthMismatch,
    /// A v2 TLV runs past the end of the header, or the header ends in 1 or 2 stray bytes.
    V2TlvOverrun,
    /// A v2 header longer than [`MAX_HEADER_LEN`].
    V2TooLong,
    /// A v1 header at the start of a datagram (v1 is for TCP only).
    V1InDatagram,
    /// A datagram that ends before its v2 header does.
    DatagramTruncated,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotProxy => f.write_str("not a PROXY protocol header"),
            ParseError::V1TooLong => write!(f, "v1 line without CRLF in {V1_MAX_LEN} bytes"),
            ParseError::V1Malformed(reason) => write!(f, "malformed v1 line: {reason}"),
            ParseError::V2BadVersion => f.write_str("v2 header with a version other than 2"),
            ParseError::V2BadCommand => f.write_str("v2 command neither LOCAL nor PROXY"),
            ParseError::V2BadProtocol => f.write_str("v2 transport protocol unknown"),
            ParseError::V2LengthMismatch => {
                f.write_str("v2 length too short for the family's addresses")
            }
            ParseError::V2TlvOverrun => f.write_str("v2 TLV runs past the end of the header"),
            ParseError::V2TooLong => write!(f, "v2 header longer than {MAX_HEADER_LEN} bytes"),
            ParseError::V1InDatagram => f.write_str("v1 header in a datagram"),
            ParseError::DatagramTruncated => f.write_str("datagram ends inside its v2 header"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses the header at the start of `buf`, the bytes received so far on a TCP connection.
///
/// Returns [`Parsed::Incomplete`] only while more bytes could still make a valid header: an
/// error is reported as soon as the bytes seen rule every valid header out (`PROXX`, an IPv4
/// address in a `TCP6` line, a v2 length too short for its addresses, a TLV that overruns).
pub fn parse(buf: &[u8]) -> Result<Parsed<'_>, ParseError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete { needed_at_least: v1::MIN_LEN }),
        Some(&b) if b == v1::SIGNATURE[0] => v1::parse(buf),
        Some(&b) if b == v2::SIGNATURE[0] => v2::parse(buf),
        Some(_) => Err(ParseError::NotProxy),
    }
}

/// Parses a whole datagram: a v2 header, which must end inside it, then the payload. A v1 header
/// is refused ([`ParseError::V1InDatagram`]): v1 describes TCP only.
pub fn parse_datagram(dgram: &[u8]) -> Result<(Header<'_>, &[u8]), ParseError> {
    let seen = dgram.len().min(v1::SIGNATURE.len());
    if seen > 0 && dgram[..seen] == v1::SIGNATURE[..seen] {
        return Err(ParseError::V1InDatagram);
    }
    match v2::parse(dgram)? {
        Parsed::Complete { header, consumed } => Ok((header, &dgram[consumed..])),
        Parsed::Incomplete { .. } => Err(ParseError::DatagramTruncated),
    }
}

/// Encodes a v1 line into `out` and returns its length (at most 104 bytes).
///
/// Two IPv4 addresses give `TCP4`. Otherwise the line is `TCP6`, and an IPv4 address (a v4
/// client on a dual-stack listener, say) is written as its IPv4-mapped IPv6 form `::ffff:a.b.c.d`,
/// in hex: v1 needs both addresses in one family (spec 2.1) and every receiver that takes `TCP6`
/// can read that form. So `PROXY UNKNOWN` is never needed. IPv6 flow labels and scope IDs are not
/// carried.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr, out: &mut [u8; 108]) -> usize {
    v1::encode(source, destination, out)
}

/// Encodes a v2 PROXY header (command PROXY, the given transport, no TLVs) into `out` and returns
/// its length: 28 bytes for IPv4 (16 + 12), 52 for IPv6 (16 + 36). Mixed families are sent as
/// IPv6, the IPv4 address mapped to `::ffff:a.b.c.d`. IPv6 flow labels and scope IDs are not
/// carried.
pub fn encode_v2(
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut [u8; 52],
) -> usize {
    v2::encode(transport, source, destination, out)
}
