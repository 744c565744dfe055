//! Version 2: a binary header (spec section 2.2).
//!
//! ```text
//! bytes    what
//! 0..12    signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
//! 12       version (high nibble, must be 2) and command (low nibble: 0 LOCAL, 1 PROXY)
//! 13       address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and
//!          transport protocol (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
//! 14..16   length of the rest of the header, big-endian
//! 16..     source and destination addresses, then source and destination ports
//!          (INET 4+4+2+2 = 12 bytes, INET6 16+16+2+2 = 36, UNIX 108+108 = 216),
//!          then TLVs to the end: type (1 byte), length (2, big-endian), value
//! ```
//!
//! Where this parser chooses among what the spec allows:
//!
//! - LOCAL ignores the family byte entirely, as the spec says ("discard the protocol block
//!   including the family which is ignored"); its TLVs are kept when the family byte says where
//!   the address block ends and the length covers it, and skipped otherwise.
//! - PROXY with an unknown family (high nibble above 3) is [`Header::Unspecified`] with its length
//!   honoured, not an error (the spec says such values "must be rejected"; tether treats them
//!   like AF_UNSPEC, which a receiver may accept). With a known family, an unknown protocol
//!   nibble is [`ParseError::V2BadProtocol`].
//! - The TLVs must exactly fill the rest of the header: HAProxy's 488ee7fb6 ("BUG/MAJOR:
//!   proxy_protocol: Properly validate TLV lengths") stops TLVs at the header's end and refuses
//!   "stray bytes".

use std::net::{IpAddr, SocketAddr};

use crate::v1::mapped;
use crate::{Header, ParseError, Parsed, Tlv, Tlvs, Transport, MAX_HEADER_LEN};

/// The first 12 bytes of every v2 header.
pub(crate) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version and command, family and protocol, length.
const FIXED_LEN: usize = 16;

/// A whole v2 header with the LOCAL command and no address block (spec 2.2: "the receiver must
/// accept this connection as valid and must use the real connection endpoints").
pub(crate) const LOCAL_HEADER: [u8; FIXED_LEN] = {
    let mut h = [0u8; FIXED_LEN];
    let mut i = 0;
    while i < SIGNATURE.len() {
        h[i] = SIGNATURE[i];
        i += 1;
    }
    h[12] = (VERSION << 4) | LOCAL;
    h[13] = (AF_UNSPEC << 4) | UNSPEC;
    h
};
const VERSION: u8 = 2;

const LOCAL: u8 = 0;
const PROXY: u8 = 1;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 1;
const AF_INET6: u8 = 2;
const AF_UNIX: u8 = 3;

const UNSPEC: u8 = 0;
const STREAM: u8 = 1;
const DGRAM: u8 = 2;

/// Address block sizes (spec 2.2: "Address length is 2*4 + 2*2 = 12 bytes", and so on).
const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;
const UNIX_LEN: usize = 216;

/// A TLV's type and length.
const TLV_HEADER_LEN: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Local,
    Proxy,
}

/// What follows the fixed part, as the family and protocol byte says.
#[derive(Debug, Clone, Copy)]
enum Layout {
    Inet(Transport),
    Inet6(Transport),
    Unix,
    /// AF_UNSPEC: no address block; TLVs, if any, start right after the fixed part.
    NoAddresses,
    /// A block the spec gives no size for: the whole rest of the header is skipped.
    Opaque,
}

impl Layout {
    fn of(family_protocol: u8) -> Result<Layout, ParseError> {
        let family = family_protocol >> 4;
        let transport = match family_protocol & 0x0f {
            UNSPEC => None,
            STREAM => Some(Transport::Stream),
            DGRAM => Some(Transport::Datagram),
            // "other values are unspecified ... and must be rejected as invalid by receivers"
            _ if family <= AF_UNIX => return Err(ParseError::V2BadProtocol),
            // An unknown family with an unknown protocol: unknown, like the family alone.
            _ => return Ok(Layout::Opaque),
        };
        Ok(match (family, transport) {
            // "The receiver should ignore address information."
            (AF_UNSPEC, _) => Layout::NoAddresses,
            (AF_INET, Some(transport)) => Layout::Inet(transport),
            (AF_INET6, Some(transport)) => Layout::Inet6(transport),
            (AF_UNIX, Some(_)) => Layout::Unix,
            // Protocol UNSPEC with a real family: the spec lists no such combination and no
            // block size for it.
            (AF_INET | AF_INET6 | AF_UNIX, None) => Layout::Opaque,
            // Unknown family: treated like AF_UNSPEC, length honoured, rest skipped.
            _ => Layout::Opaque,
        })
    }

    /// The size of the address block, when the spec defines one.
    fn address_len(self) -> Option<usize> {
        match self {
            Layout::Inet(_) => Some(INET_LEN),
            Layout::Inet6(_) => Some(INET6_LEN),
            Layout::Unix => Some(UNIX_LEN),
            Layout::NoAddresses => Some(0),
            Layout::Opaque => None,
        }
    }
}

/// Parses a v2 header at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(ParseError::NotProxy);
    }
    let fixed_part_missing = Ok(Parsed::Incomplete { needed_at_least: FIXED_LEN });
    let Some(&version_command) = buf.get(12) else { return fixed_part_missing };
    if version_command >> 4 != VERSION {
        return Err(ParseError::V2BadVersion);
    }
    let command = match version_command & 0x0f {
        LOCAL => Command::Local,
        PROXY => Command::Proxy,
        // "Receivers must drop connections presenting unexpected values here."
        _ => return Err(ParseError::V2BadCommand),
    };
    let Some(&family_protocol) = buf.get(13) else { return fixed_part_missing };
    let layout = match command {
        Command::Proxy => Layout::of(family_protocol)?,
        Command::Local => Layout::of(family_protocol).unwrap_or(Layout::Opaque),
    };
    let Some(&[high, low]) = buf.get(14..16) else { return fixed_part_missing };
    let declared = usize::from(u16::from_be_bytes([high, low]));
    let total = FIXED_LEN + declared;
    if total > MAX_HEADER_LEN {
        return Err(ParseError::V2TooLong);
    }
    let address_len = match layout.address_len() {
        Some(len) if len <= declared => Some(len),
        // CVE-2019-14243 (mastercactapus/proxyprotocol): a length too short for the addresses.
        Some(_) if command == Command::Proxy => return Err(ParseError::V2LengthMismatch),
        // LOCAL ignores the family, so a block too short for it is skipped like an unknown one.
        Some(_) | None => None,
    };
    // Checked over what has arrived, so that an overrun shows as soon as its length does.
    if let Some(len) = address_len {
        let start = FIXED_LEN + len;
        let arrived = buf.get(start..total.min(buf.len())).unwrap_or(&[]);
        check_tlvs(arrived, total - start)?;
    }
    let Some(header_bytes) = buf.get(..total) else {
        return Ok(Parsed::Incomplete { needed_at_least: total });
    };
    let body = &header_bytes[FIXED_LEN..];
    let tlvs = match address_len {
        // `len <= declared == body.len()`, checked above.
        Some(len) => Tlvs::new(&body[len..]),
        None => Tlvs::EMPTY,
    };
    let header = match (command, layout) {
        (Command::Local, _) => Header::Local { tlvs },
        (Command::Proxy, Layout::Inet(transport)) => {
            let (source, destination) = addresses::<4>(body).ok_or(ParseError::V2LengthMismatch)?;
            Header::Proxy { transport, source, destination, tlvs }
        }
        (Command::Proxy, Layout::Inet6(transport)) => {
            let (source, destination) =
                addresses::<16>(body).ok_or(ParseError::V2LengthMismatch)?;
            Header::Proxy { transport, source, destination, tlvs }
        }
        // AF_UNIX paths, no addresses, or addresses of unknown shape: nothing tether can use.
        (Command::Proxy, Layout::Unix | Layout::NoAddresses | Layout::Opaque) => {
            Header::Unspecified { tlvs }
        }
    };
    Ok(Parsed::Complete { header, consumed: total })
}

/// Reads two `N`-byte addresses and two ports from the start of the address block. `None` only
/// if the block is short, which the length check before the call rules out.
fn addresses<const N: usize>(block: &[u8]) -> Option<(SocketAddr, SocketAddr)>
where
    IpAddr: From<[u8; N]>,
{
    let (source, rest) = block.split_first_chunk::<N>()?;
    let (destination, rest) = rest.split_first_chunk::<N>()?;
    let (source_port, rest) = rest.split_first_chunk::<2>()?;
    let (destination_port, _) = rest.split_first_chunk::<2>()?;
    Some((
        SocketAddr::new(IpAddr::from(*source), u16::from_be_bytes(*source_port)),
        SocketAddr::new(IpAddr::from(*destination), u16::from_be_bytes(*destination_port)),
    ))
}

/// Walks a TLV region `len` bytes long of which `arrived` is the start, failing as soon as a
/// TLV is seen to run past the region's end or fewer than 3 bytes are left for one.
fn check_tlvs(arrived: &[u8], len: usize) -> Result<(), ParseError> {
    let mut at = 0;
    while at < len {
        if len - at < TLV_HEADER_LEN {
            return Err(ParseError::V2TlvOverrun);
        }
        let (value_len, known) = match *arrived.get(at..).unwrap_or(&[]) {
            [_, high, low, ..] => (usize::from(u16::from_be_bytes([high, low])), true),
            // Only the length's high byte so far: the value is at least `high * 256` bytes.
            [_, high] => (usize::from(high) << 8, false),
            _ => (0, false),
        };
        at += TLV_HEADER_LEN + value_len;
        if at > len {
            return Err(ParseError::V2TlvOverrun);
        }
        if !known {
            return Ok(()); // the rest of this TLV's length has not arrived yet
        }
    }
    Ok(())
}

/// Splits the first TLV off `bytes`; `None` if it overruns them.
pub(crate) fn split_tlv(bytes: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&[kind, high, low], rest) = bytes.split_first_chunk::<TLV_HEADER_LEN>()?;
    let len = usize::from(u16::from_be_bytes([high, low]));
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((Tlv { kind, value }, rest))
}

/// Encodes a v2 PROXY header (see [`crate::encode_v2`]).
pub(crate) fn encode(
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut [u8; 52],
) -> usize {
    let protocol = match transport {
        Transport::Stream => STREAM,
        Transport::Datagram => DGRAM,
    };
    let (family, block_len) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            (AF_INET, INET_LEN)
        }
        (s, d) => {
            out[16..32].copy_from_slice(&mapped(s).octets());
            out[32..48].copy_from_slice(&mapped(d).octets());
            (AF_INET6, INET6_LEN)
        }
    };
    let ports = FIXED_LEN + block_len - 4;
    out[ports..ports + 2].copy_from_slice(&source.port().to_be_bytes());
    out[ports + 2..ports + 4].copy_from_slice(&destination.port().to_be_bytes());
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION << 4 | PROXY;
    out[13] = family << 4 | protocol;
    // 12 or 36: fits.
    out[14..16].copy_from_slice(&(block_len as u16).to_be_bytes());
    FIXED_LEN + block_len
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// A v2 header: signature, the given version/command and family/protocol bytes, a length
    /// that matches `body`, then `body`.
    fn v2(version_command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family_protocol);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const INET_BLOCK: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0xc3, 0x50, 0x01, 0xbb];

    fn inet6_block() -> Vec<u8> {
        let mut block = Ipv6Addr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]).octets().to_vec();
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0, 80, 0xff, 0xff]);
        block
    }

    fn complete(buf: &[u8]) -> (Header<'_>, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("{other:?}"),
        }
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    // ---- PROXY ----

    #[test]
    fn tcp_and_udp_over_ipv4() {
        for (family_protocol, transport) in [(0x11, Transport::Stream), (0x12, Transport::Datagram)]
        {
            let buf = v2(0x21, family_protocol, &INET_BLOCK);
            let header = Header::Proxy {
                transport,
                source: "192.0.2.1:50000".parse().unwrap(),
                destination: "198.51.100.2:443".parse().unwrap(),
                tlvs: Tlvs::EMPTY,
            };
            assert_eq!(complete(&buf), (header, 28));
        }
    }

    #[test]
    fn tcp_and_udp_over_ipv6() {
        for (family_protocol, transport) in [(0x21, Transport::Stream), (0x22, Transport::Datagram)]
        {
            let buf = v2(0x21, family_protocol, &inet6_block());
            let header = Header::Proxy {
                transport,
                source: "[2001:db8::1]:80".parse().unwrap(),
                destination: "[::1]:65535".parse().unwrap(),
                tlvs: Tlvs::EMPTY,
            };
            assert_eq!(complete(&buf), (header, 52));
        }
    }

    #[test]
    fn tlvs_follow_the_addresses_and_the_payload_follows_them() {
        let mut body = INET_BLOCK.to_vec();
        body.extend(tlv(Tlv::ALPN, b"h2"));
        body.extend(tlv(Tlv::NOOP, b""));
        body.extend(tlv(0xea, &[7; 300]));
        let mut buf = v2(0x21, 0x11, &body);
        let header_len = buf.len();
        buf.extend_from_slice(b"payload");
        let (header, consumed) = complete(&buf);
        assert_eq!(consumed, header_len);
        let tlvs: Vec<_> = header.tlvs().iter().map(Result::unwrap).collect();
        assert_eq!(
            tlvs,
            [
                Tlv { kind: Tlv::ALPN, value: b"h2" },
                Tlv { kind: Tlv::NOOP, value: b"" },
                Tlv { kind: 0xea, value: &[7; 300] },
            ]
        );
    }

    #[test]
    fn unspec_and_unix_families_are_unspecified_with_their_tlvs() {
        let alpn = tlv(Tlv::ALPN, b"h2");
        let buf = v2(0x21, 0x00, &alpn);
        assert_eq!(complete(&buf).0, Header::Unspecified { tlvs: Tlvs::new(&alpn) });
        // AF_UNSPEC with a transport, as the ppp crate sent for mixed families
        // (erebe/wstunnel#498): no addresses either.
        let buf = v2(0x21, 0x01, &[]);
        assert_eq!(complete(&buf).0, Header::Unspecified { tlvs: Tlvs::EMPTY });
        for family_protocol in [0x31, 0x32] {
            let mut body = vec![0u8; 216];
            body.extend_from_slice(&alpn);
            let buf = v2(0x21, family_protocol, &body);
            assert_eq!(complete(&buf).0, Header::Unspecified { tlvs: Tlvs::new(&alpn) });
        }
    }

    #[test]
    fn unknown_family_or_unspec_protocol_skips_the_rest() {
        // The block's size is not defined, so even bytes that are no TLVs are skipped.
        for family_protocol in [0x10, 0x20, 0x30, 0x40, 0x41, 0x4f, 0xff] {
            let buf = v2(0x21, family_protocol, &[1, 2]);
            assert_eq!(complete(&buf), (Header::Unspecified { tlvs: Tlvs::EMPTY }, 18));
        }
    }

    #[test]
    fn bad_protocol_with_a_known_family() {
        for family_protocol in [0x03, 0x13, 0x1f, 0x23, 0x3f] {
            let buf = v2(0x21, family_protocol, &INET_BLOCK);
            assert_eq!(parse(&buf), Err(ParseError::V2BadProtocol), "{family_protocol:#x}");
            assert_eq!(parse(&buf[..14]), Err(ParseError::V2BadProtocol));
        }
    }

    #[test]
    fn length_too_short_for_the_addresses() {
        for (family_protocol, len) in [(0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216)]
        {
            let buf = v2(0x21, family_protocol, &vec![0; len - 1]);
            assert_eq!(parse(&buf), Err(ParseError::V2LengthMismatch));
            // Known from the length field alone.
            assert_eq!(parse(&buf[..16]), Err(ParseError::V2LengthMismatch));
            let buf = v2(0x21, family_protocol, &vec![0; len]);
            assert!(matches!(parse(&buf), Ok(Parsed::Complete { .. })));
        }
    }

    // ---- LOCAL ----

    #[test]
    fn local_without_addresses() {
        // HAProxy's health checks; the exact bytes of pires/go-proxyproto#60.
        let buf = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00,
            0x00, 0x00,
        ];
        assert_eq!(complete(&buf), (Header::Local { tlvs: Tlvs::EMPTY }, 16));
        // Envoy CVE-2024-23327: LOCAL with an INET family byte and no address block.
        let buf = v2(0x20, 0x11, &[]);
        assert_eq!(complete(&buf), (Header::Local { tlvs: Tlvs::EMPTY }, 16));
    }

    #[test]
    fn local_ignores_the_family_but_honours_the_length() {
        let mut body = INET_BLOCK.to_vec();
        let unique_id = tlv(Tlv::UNIQUE_ID, b"abc");
        body.extend_from_slice(&unique_id);
        let buf = v2(0x20, 0x11, &body);
        assert_eq!(complete(&buf), (Header::Local { tlvs: Tlvs::new(&unique_id) }, buf.len()));
        // Family bytes a PROXY header may not carry are fine for LOCAL, and skipped whole.
        for family_protocol in [0x13, 0xff, 0x10] {
            let buf = v2(0x20, family_protocol, &[9; 5]);
            assert_eq!(complete(&buf), (Header::Local { tlvs: Tlvs::EMPTY }, 21));
        }
        // A block too short for the family: skipped, not an error.
        let buf = v2(0x20, 0x21, &[9; 5]);
        assert_eq!(complete(&buf), (Header::Local { tlvs: Tlvs::EMPTY }, 21));
    }

    #[test]
    fn local_tlvs_are_checked_when_they_can_be_found() {
        let buf = v2(0x20, 0x00, &[Tlv::NOOP, 0, 5, 1]);
        assert_eq!(parse(&buf), Err(ParseError::V2TlvOverrun));
    }

    // ---- fixed part errors ----

    #[test]
    fn signature_mismatch_at_any_byte_is_not_proxy() {
        for at in 0..SIGNATURE.len() {
            let mut buf = v2(0x21, 0x11, &INET_BLOCK);
            buf[at] ^= 0x40;
            assert_eq!(crate::parse(&buf[..at + 1]), Err(ParseError::NotProxy), "byte {at}");
        }
    }

    #[test]
    fn version_other_than_2() {
        for version_command in [0x01, 0x11, 0x31, 0xf1, 0x10] {
            let buf = v2(version_command, 0x11, &INET_BLOCK);
            assert_eq!(parse(&buf[..13]), Err(ParseError::V2BadVersion));
        }
    }

    #[test]
    fn command_other_than_local_or_proxy() {
        for version_command in [0x22, 0x23, 0x2f] {
            let buf = v2(version_command, 0x11, &INET_BLOCK);
            assert_eq!(parse(&buf[..13]), Err(ParseError::V2BadCommand));
        }
    }

    #[test]
    fn length_cap() {
        let fits = MAX_HEADER_LEN - FIXED_LEN;
        let buf = v2(0x20, 0x00, &tlv(Tlv::NOOP, &vec![0; fits - 3]));
        assert_eq!(complete(&buf).1, MAX_HEADER_LEN);
        let buf = v2(0x20, 0x00, &tlv(Tlv::NOOP, &vec![0; fits - 2]));
        assert_eq!(parse(&buf[..16]), Err(ParseError::V2TooLong));
        let mut buf = v2(0x21, 0x11, &INET_BLOCK);
        buf[14..16].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(parse(&buf), Err(ParseError::V2TooLong));
    }

    // ---- TLV errors ----

    #[test]
    fn tlv_running_past_the_header() {
        let mut body = INET_BLOCK.to_vec();
        body.extend_from_slice(&[Tlv::AUTHORITY, 0, 10]);
        body.extend_from_slice(b"short");
        let mut buf = v2(0x21, 0x11, &body);
        // What follows the header must not complete the TLV (HAProxy 488ee7fb6).
        buf.extend_from_slice(b"GET / HTTP/1.1");
        assert_eq!(parse(&buf), Err(ParseError::V2TlvOverrun));
        // Known as soon as the TLV's length arrives.
        assert_eq!(parse(&buf[..16 + 12 + 3]), Err(ParseError::V2TlvOverrun));
        assert_eq!(parse(&buf[..16 + 12 + 2]), Ok(Parsed::Incomplete { needed_at_least: 36 }));
    }

    #[test]
    fn tlv_length_high_byte_alone_can_show_an_overrun() {
        let mut body = INET_BLOCK.to_vec();
        body.extend_from_slice(&[Tlv::AUTHORITY, 1, 0]);
        body.extend_from_slice(&[b'a'; 200]);
        let buf = v2(0x21, 0x11, &body);
        // 256 or more bytes of value cannot fit in the 200 left.
        assert_eq!(parse(&buf[..16 + 12 + 2]), Err(ParseError::V2TlvOverrun));
        let fits = v2(0x21, 0x11, &[&INET_BLOCK[..], &[Tlv::AUTHORITY, 1, 0], &[0; 256]].concat());
        let expected = Ok(Parsed::Incomplete { needed_at_least: fits.len() });
        assert_eq!(parse(&fits[..16 + 12 + 2]), expected);
    }

    #[test]
    fn stray_bytes_after_the_last_tlv() {
        for stray in [&[0u8][..], &[0, 0]] {
            let mut body = INET_BLOCK.to_vec();
            body.extend(tlv(Tlv::NOOP, b"x"));
            body.extend_from_slice(stray);
            let buf = v2(0x21, 0x11, &body);
            assert_eq!(parse(&buf), Err(ParseError::V2TlvOverrun));
            // Known from the first TLV's length, before the stray bytes arrive.
            assert_eq!(parse(&buf[..16 + 12 + 3]), Err(ParseError::V2TlvOverrun));
        }
    }

    #[test]
    fn tlvs_iter_reports_an_overrun_once() {
        let bytes = [Tlv::ALPN, 0, 1, b'x', Tlv::AUTHORITY, 0, 9, b'y'];
        let got: Vec<_> = Tlvs::new(&bytes).iter().collect();
        assert_eq!(got, [Ok(Tlv { kind: Tlv::ALPN, value: b"x" }), Err(ParseError::V2TlvOverrun)]);
        let got: Vec<_> = Tlvs::new(&[1, 0]).into_iter().collect();
        assert_eq!(got, [Err(ParseError::V2TlvOverrun)]);
    }

    // ---- incomplete ----

    #[test]
    fn every_truncation_is_incomplete() {
        let mut body = inet6_block();
        body.extend(tlv(Tlv::AUTHORITY, b"example.com"));
        for buf in [
            v2(0x21, 0x11, &INET_BLOCK),
            v2(0x21, 0x22, &body),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x31, &[0; 216]),
            v2(0x21, 0x4f, &[1, 2, 3]),
        ] {
            for end in 0..buf.len() {
                // Nothing at all could still be a v1 line, whose shortest form is 15 bytes.
                let needed = match end {
                    0 => crate::v1::MIN_LEN,
                    1..16 => 16,
                    _ => buf.len(),
                };
                let expected = Ok(Parsed::Incomplete { needed_at_least: needed });
                assert_eq!(crate::parse(&buf[..end]), expected, "{end} of {buf:?}");
            }
            assert!(matches!(crate::parse(&buf), Ok(Parsed::Complete { .. })));
        }
    }

    // ---- datagrams ----

    #[test]
    fn datagram_header_then_payload() {
        let mut dgram = v2(0x21, 0x12, &INET_BLOCK);
        dgram.extend_from_slice(b"dns query");
        let (header, payload) = crate::parse_datagram(&dgram).unwrap();
        assert!(matches!(header, Header::Proxy { transport: Transport::Datagram, .. }));
        assert_eq!(payload, b"dns query");
        let (_, payload) = crate::parse_datagram(&dgram[..28]).unwrap();
        assert_eq!(payload, b"");
    }

    #[test]
    fn datagram_errors() {
        let dgram = v2(0x21, 0x12, &INET_BLOCK);
        assert_eq!(crate::parse_datagram(&dgram[..27]), Err(ParseError::DatagramTruncated));
        assert_eq!(crate::parse_datagram(&dgram[..3]), Err(ParseError::DatagramTruncated));
        assert_eq!(crate::parse_datagram(b""), Err(ParseError::DatagramTruncated));
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\npayload";
        assert_eq!(crate::parse_datagram(v1), Err(ParseError::V1InDatagram));
        assert_eq!(crate::parse_datagram(b"PRO"), Err(ParseError::V1InDatagram));
        assert_eq!(crate::parse_datagram(b"PRX"), Err(ParseError::NotProxy));
        assert_eq!(crate::parse_datagram(b"\x16\x03\x01"), Err(ParseError::NotProxy));
        let bad = v2(0x21, 0x13, &INET_BLOCK);
        assert_eq!(crate::parse_datagram(&bad), Err(ParseError::V2BadProtocol));
    }

    // ---- encoding ----

    #[test]
    fn encodes_ipv4_tcp_byte_for_byte() {
        let mut out = [0u8; 52];
        let len = encode(
            Transport::Stream,
            "192.0.2.1:50000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            &mut out,
        );
        assert_eq!(&out[..len], &v2(0x21, 0x11, &INET_BLOCK)[..]);
    }

    #[test]
    fn encodes_ipv6_udp_byte_for_byte() {
        let mut out = [0u8; 52];
        let len = encode(
            Transport::Datagram,
            "[2001:db8::1]:80".parse().unwrap(),
            "[::1]:65535".parse().unwrap(),
            &mut out,
        );
        assert_eq!(&out[..len], &v2(0x21, 0x22, &inet6_block())[..]);
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let mut out = [0u8; 52];
        let source: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let destination: SocketAddr = "[2001:db8::2]:2".parse().unwrap();
        let len = encode(Transport::Stream, source, destination, &mut out);
        assert_eq!((len, out[13]), (52, 0x21));
        let Header::Proxy { source: got, .. } = complete(&out[..len]).0 else { panic!() };
        assert_eq!(got, "[::ffff:192.0.2.1]:1".parse().unwrap());
    }
}
