//! Tests across both versions: a corpus of known-bad (and a few known-good) headers, round trips
//! through the encoders, and properties of `parse` on arbitrary bytes.

use std::mem::discriminant;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use crate::*;

// ---- corpus ----

/// What parsing a corpus entry must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Complete(usize),
    Incomplete,
    Error(ParseError),
}

use Expect::{Complete, Error, Incomplete};

const SIG: &str = "\r\n\r\n\0\r\nQUIT\n";

/// Known-bad headers, and the valid ones they are often confused with. Each names where it comes
/// from; "constructed" means written for this table, not taken from a report.
fn corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let v2 = |rest: &[u8]| [SIG.as_bytes(), rest].concat();
    let inet = [192, 0, 2, 1, 198, 51, 100, 2, 0xc3, 0x50, 0x01, 0xbb];
    let with_inet = |head: &[u8], tail: &[u8]| v2(&[head, &inet, tail].concat());
    let malformed = |reason| Error(ParseError::V1Malformed(reason));
    vec![
        // CVE-2019-14243, mastercactapus/proxyprotocol#1: PROXY UDP4 with length 0, the
        // addresses left out; the parser sliced past the buffer and panicked.
        ("v2 udp4 length 0", v2(&[0x21, 0x12, 0, 0]), Error(ParseError::V2LengthMismatch)),
        // The same report: "also works with 0x13, 0x21, 0x22, 0x31, 0x32".
        ("v2 family 0x13 length 0", v2(&[0x21, 0x13, 0, 0]), Error(ParseError::V2BadProtocol)),
        ("v2 tcp6 length 0", v2(&[0x21, 0x21, 0, 0]), Error(ParseError::V2LengthMismatch)),
        ("v2 udp6 length 0", v2(&[0x21, 0x22, 0, 0]), Error(ParseError::V2LengthMismatch)),
        ("v2 unix length 0", v2(&[0x21, 0x31, 0, 0]), Error(ParseError::V2LengthMismatch)),
        ("v2 unix dgram length 0", v2(&[0x21, 0x32, 0, 0]), Error(ParseError::V2LengthMismatch)),
        // Constructed: the same truncation with a length that covers all but one byte.
        (
            "v2 tcp4 block 1 byte short",
            v2(&[&[0x21, 0x11, 0, 11][..], &inet[..11]].concat()),
            Error(ParseError::V2LengthMismatch),
        ),
        // pires/go-proxyproto#60: LOCAL with AF_UNSPEC and length 0, as HAProxy's health checks
        // send it, was refused. It is valid.
        ("v2 local unspec", v2(&[0x20, 0x00, 0, 0]), Complete(16)),
        // Envoy CVE-2024-23327: a LOCAL command without an address block crashed Envoy when it
        // built the upstream header. Valid; it carries no addresses to use.
        ("v2 local inet no block", v2(&[0x20, 0x11, 0, 0]), Complete(16)),
        // HAProxy 488ee7fb6 "BUG/MAJOR: proxy_protocol: Properly validate TLV lengths": a TLV
        // longer than the header was read into the payload that followed it.
        (
            "v2 tlv overruns into payload",
            [with_inet(&[0x21, 0x11, 0, 16], &[0x02, 0, 20, b'a']), b"GET / HTTP/1.1\r\n".to_vec()]
                .concat(),
            Error(ParseError::V2TlvOverrun),
        ),
        // The same commit: "not allowing for 'stray bytes' to be ignored".
        (
            "v2 stray byte after tlv",
            with_inet(&[0x21, 0x11, 0, 17], &[0x04, 0, 1, 0, 0xff]),
            Error(ParseError::V2TlvOverrun),
        ),
        // Constructed: the largest length the field can hold.
        (
            "v2 length 0xffff",
            [v2(&[0x21, 0x11, 0xff, 0xff]), vec![0; 64]].concat(),
            Error(ParseError::V2TooLong),
        ),
        // Constructed: version 1 and 3 in the version nibble, command 0xf.
        ("v2 version 1", v2(&[0x11, 0x11, 0, 12]), Error(ParseError::V2BadVersion)),
        ("v2 version 3", v2(&[0x31, 0x11, 0, 12]), Error(ParseError::V2BadVersion)),
        ("v2 command 0xf", v2(&[0x2f, 0x11, 0, 12]), Error(ParseError::V2BadCommand)),
        // erebe/wstunnel#498: the ppp crate sent mixed families as AF_UNSPEC + STREAM with the
        // PROXY command, which go-mmproxy refused. Valid here, without addresses.
        ("v2 proxy unspec stream", v2(&[0x21, 0x01, 0, 0]), Complete(16)),
        // Constructed: a valid v2 TCP4 header with an ALPN TLV.
        ("v2 tcp4 alpn", with_inet(&[0x21, 0x11, 0, 17], &[0x01, 0, 2, b'h', b'2']), Complete(33)),
        // pires/go-proxyproto#60: "PROXY UNKNOWN\r\n" was refused. It is valid.
        ("v1 unknown", b"PROXY UNKNOWN\r\n".to_vec(), Complete(15)),
        // Spec 2.1's example.
        (
            "v1 tcp4 spec example",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n".to_vec(),
            Complete(47),
        ),
        // pires/go-proxyproto#69 (PR #71): a header read with no bound ("header overflow").
        (
            "v1 unknown without crlf",
            [&b"PROXY UNKNOWN "[..], &[b'f'; 200]].concat(),
            Error(ParseError::V1TooLong),
        ),
        // Constructed: CRLF one byte too late (a 108-byte line).
        (
            "v1 108-byte line",
            [&b"PROXY UNKNOWN "[..], &[b'f'; 92], b"\r\n"].concat(),
            Error(ParseError::V1TooLong),
        ),
        // pires/go-proxyproto#69 (PR #71), the "slow loris" half: a line that never ends. The
        // parser can only say Incomplete; the caller's header timeout ends it.
        ("v1 tcp4 no crlf yet", b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80".to_vec(), Incomplete),
        // pires/go-proxyproto#167: nginx's stream module writes an IPv4 destination in a TCP6
        // line. Outside the spec, which tether follows.
        (
            "v1 tcp6 with ipv4 destination",
            b"PROXY TCP6 2001:db8::1 192.0.2.1 51512 22\r\n".to_vec(),
            malformed("bad IPv6 address"),
        ),
        // Constructed: the other mismatch.
        (
            "v1 tcp4 with ipv6",
            b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
            malformed("bad IPv4 address"),
        ),
        // Constructed: ports past 65535, and with a sign or leading zero.
        (
            "v1 huge port",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999999999999999999 80\r\n".to_vec(),
            malformed("bad port"),
        ),
        (
            "v1 port 65536",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 80\r\n".to_vec(),
            malformed("bad port"),
        ),
        (
            "v1 signed port",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 80\r\n".to_vec(),
            malformed("bad port"),
        ),
        ("v1 port 080", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n".to_vec(), malformed("bad port")),
        // Constructed: an octal-looking address (spec 2.1 forbids leading zeros).
        (
            "v1 leading zero octet",
            b"PROXY TCP4 010.0.0.1 5.6.7.8 1 2\r\n".to_vec(),
            malformed("bad IPv4 address"),
        ),
        // Constructed: LF without CR, CR without LF, a NUL, a double space.
        (
            "v1 lf only",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET /".to_vec(),
            malformed("byte outside printable US-ASCII"),
        ),
        (
            "v1 cr only",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET /".to_vec(),
            malformed("byte outside printable US-ASCII"),
        ),
        (
            "v1 nul byte",
            b"PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n".to_vec(),
            malformed("byte outside printable US-ASCII"),
        ),
        (
            "v1 double space",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            malformed("bad IPv4 address"),
        ),
        // Constructed: a client that speaks first instead of a proxy.
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Error(ParseError::NotProxy),
        ),
        ("tls hello", vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01], Error(ParseError::NotProxy)),
        ("lowercase proxy", b"proxy TCP4 1.2.3.4".to_vec(), Error(ParseError::NotProxy)),
    ]
}

#[test]
fn corpus_gives_what_the_table_says() {
    for (name, bytes, expect) in corpus() {
        let got = match parse(&bytes) {
            Ok(Parsed::Complete { consumed, .. }) => Complete(consumed),
            Ok(Parsed::Incomplete { .. }) => Incomplete,
            Err(e) => Error(e),
        };
        assert_eq!(got, expect, "{name}");
        check_invariants(&bytes, b"\r\n\0xyz");
    }
}

#[test]
fn every_start_of_a_corpus_entry_is_incomplete_or_the_same_error() {
    for (name, bytes, expect) in corpus() {
        for end in 0..bytes.len() {
            match (parse(&bytes[..end]), expect) {
                (Ok(Parsed::Incomplete { .. }), _) => {}
                // Entries with bytes after the header.
                (Ok(Parsed::Complete { consumed, .. }), Complete(n))
                    if consumed == n && end >= n => {}
                (Err(e), Error(full)) if discriminant(&e) == discriminant(&full) => {}
                (other, _) => panic!("{name}, first {end} bytes: {other:?}"),
            }
        }
    }
}

#[test]
fn errors_display_one_short_lowercase_line() {
    for (_, bytes, _) in corpus() {
        if let Err(e) = parse(&bytes) {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n') && !text.ends_with('.'), "{text}");
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
        }
    }
}

// ---- invariants on any input ----

/// What must hold for any `buf` and any bytes `more` appended to it.
fn check_invariants(buf: &[u8], more: &[u8]) {
    let longer = [buf, more].concat();
    match parse(buf) {
        Ok(Parsed::Complete { header, consumed }) => {
            assert!(0 < consumed && consumed <= buf.len());
            assert!(consumed <= MAX_HEADER_LEN);
            // The header alone parses the same, and so does the header with more bytes after it.
            let alone = parse(&buf[..consumed]);
            assert_eq!(alone, Ok(Parsed::Complete { header, consumed }));
            assert_eq!(parse(&longer), Ok(Parsed::Complete { header, consumed }));
            // TLVs were checked at parse time.
            let mut tlv_bytes = 0;
            for tlv in header.tlvs() {
                tlv_bytes += 3 + tlv.expect("parse accepted an overrunning TLV").value.len();
            }
            assert_eq!(tlv_bytes, header.tlvs().bytes().len());
        }
        Ok(Parsed::Incomplete { needed_at_least }) => {
            assert!(needed_at_least > buf.len());
            assert!(needed_at_least <= MAX_HEADER_LEN);
            if longer.len() < needed_at_least {
                assert!(!matches!(parse(&longer), Ok(Parsed::Complete { .. })));
            }
        }
        // Every error is final (the v1 reason may name a later check).
        Err(e) => match parse(&longer) {
            Err(later) => assert_eq!(discriminant(&later), discriminant(&e), "{e} then {later}"),
            other => panic!("{e}, then with more bytes: {other:?}"),
        },
    }
    // A datagram's header is what parse finds in the same bytes.
    if let Ok((header, payload)) = parse_datagram(buf) {
        let consumed = buf.len() - payload.len();
        assert_eq!(parse(buf), Ok(Parsed::Complete { header, consumed }));
    }
}

/// Bytes that make up headers, so random tails get past the first checks now and then.
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        2 => proptest::sample::select(b"0123456789abcdef:. \r\n".to_vec()),
        1 => proptest::sample::select(vec![0u8, 1, 2, 3, 0x11, 0x12, 0x21, 0x22, 0x20]),
    ]
}

fn start() -> impl Strategy<Value = Vec<u8>> {
    let mut starts: Vec<Vec<u8>> = [
        "",
        "P",
        "PROXY ",
        "PROXY TCP4 ",
        "PROXY TCP4 1.2.3.4 ",
        "PROXY TCP6 ",
        "PROXY TCP6 ::1 ",
        "PROXY UNKNOWN",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for rest in [&[][..], &[0x21], &[0x21, 0x11], &[0x20, 0x00], &[0x21, 0x22, 0x00]] {
        starts.push([SIG.as_bytes(), rest].concat());
    }
    proptest::sample::select(starts)
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 4]>().prop_map(|v4| IpAddr::V6(std::net::Ipv4Addr::from(v4).to_ipv6_mapped())),
        (any::<u128>(), any::<u8>()).prop_map(|(bits, zeros)| {
            // Zero some groups so that "::" shows up often in v1.
            let mut groups = Ipv6Addr::from(bits).segments();
            for (i, group) in groups.iter_mut().enumerate() {
                if zeros >> i & 1 == 1 {
                    *group = 0;
                }
            }
            IpAddr::V6(Ipv6Addr::from(groups))
        }),
    ]
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// What a receiver sees for a pair sent in mixed families: both as IPv6.
fn as_sent(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => (source, destination),
        _ => {
            let v6 = |a: SocketAddr| SocketAddr::new(IpAddr::V6(v1::mapped(a.ip())), a.port());
            (v6(source), v6(destination))
        }
    }
}

/// Family and protocol bytes of each kind: AF_UNSPEC, INET, INET6, UNIX, an unknown family.
const FAMILY_PROTOCOLS: [u8; 8] = [0x00, 0x01, 0x11, 0x12, 0x21, 0x22, 0x31, 0x41];

fn tlv_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![Just(Transport::Stream), Just(Transport::Datagram)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(
        buf in proptest::collection::vec(any::<u8>(), 0..300),
        more in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        check_invariants(&buf, &more);
    }

    #[test]
    fn parse_never_panics_after_a_valid_start(
        start in start(),
        tail in proptest::collection::vec(header_byte(), 0..300),
        more in proptest::collection::vec(header_byte(), 0..20),
    ) {
        check_invariants(&[start, tail].concat(), &more);
    }

    #[test]
    fn parse_never_panics_on_v2_with_a_valid_fixed_part(
        command in 0x20u8..=0x21,
        family_protocol in proptest::sample::select(FAMILY_PROTOCOLS.to_vec()),
        len in 0u16..600,
        tail in proptest::collection::vec(header_byte(), 0..600),
        more in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let buf = [SIG.as_bytes(), &[command, family_protocol], &len.to_be_bytes(), &tail].concat();
        check_invariants(&buf, &more);
    }

    #[test]
    fn v2_with_random_tlvs_round_trips(
        kinds_and_values in proptest::collection::vec((any::<u8>(), tlv_value()), 0..8),
    ) {
        let mut tlvs = Vec::new();
        for (kind, value) in &kinds_and_values {
            tlvs.push(*kind);
            tlvs.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
            tlvs.extend_from_slice(value);
        }
        let len = u16::try_from(12 + tlvs.len()).unwrap();
        let buf = [SIG.as_bytes(), &[0x21, 0x11], &len.to_be_bytes(), &[0; 12], &tlvs].concat();
        let Ok(Parsed::Complete { header, consumed }) = parse(&buf) else { panic!() };
        prop_assert_eq!(consumed, buf.len());
        let got: Vec<_> =
            header.tlvs().iter().map(|t| t.map(|t| (t.kind, t.value.to_vec()))).collect();
        let expected: Vec<_> = kinds_and_values.into_iter().map(Ok).collect();
        prop_assert_eq!(got, expected);
    }

    // ---- round trips ----

    #[test]
    fn v1_round_trips_and_every_truncation_is_incomplete(
        source in addr(),
        destination in addr(),
        payload in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let mut out = [0u8; 108];
        let len = encode_v1(source, destination, &mut out);
        prop_assert!(len <= 104);
        let (source, destination) = as_sent(source, destination);
        let transport = Transport::Stream;
        let expected = Header::Proxy { transport, source, destination, tlvs: Tlvs::EMPTY };
        let buf = [&out[..len], &payload].concat();
        prop_assert_eq!(parse(&buf), Ok(Parsed::Complete { header: expected, consumed: len }));
        for end in 0..len {
            let got = parse(&buf[..end]);
            prop_assert!(
                matches!(got, Ok(Parsed::Incomplete { needed_at_least }) if needed_at_least > end),
                "{:?}: {:?}", String::from_utf8_lossy(&buf[..end]), got
            );
        }
    }

    #[test]
    fn v2_round_trips_and_every_truncation_is_incomplete(
        transport in transport(),
        source in addr(),
        destination in addr(),
        payload in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut out = [0u8; 52];
        let len = encode_v2(transport, source, destination, &mut out);
        let (source, destination) = as_sent(source, destination);
        prop_assert_eq!(len, if source.is_ipv4() { 28 } else { 52 });
        let expected = Header::Proxy { transport, source, destination, tlvs: Tlvs::EMPTY };
        let buf = [&out[..len], &payload].concat();
        prop_assert_eq!(parse(&buf), Ok(Parsed::Complete { header: expected, consumed: len }));
        prop_assert_eq!(parse_datagram(&buf), Ok((expected, &payload[..])));
        for end in 0..len {
            let needed_at_least = match end {
                0 => v1::MIN_LEN,
                1..16 => 16,
                _ => len,
            };
            prop_assert_eq!(parse(&buf[..end]), Ok(Parsed::Incomplete { needed_at_least }));
            prop_assert_eq!(parse_datagram(&buf[..end]), Err(ParseError::DatagramTruncated));
        }
    }
}

// ---- headers of the proxy's own connections ----

#[test]
fn local_headers_parse_as_local_and_whole() {
    for header in [&V2_LOCAL[..], V1_UNKNOWN] {
        match parse(header) {
            Ok(Parsed::Complete { header: Header::Local { tlvs }, consumed }) => {
                assert_eq!(consumed, header.len(), "{header:?}");
                assert!(tlvs.is_empty());
            }
            other => panic!("{header:?} parsed as {other:?}"),
        }
    }
    // Byte for byte: signature, version 2 with command LOCAL, AF_UNSPEC/UNSPEC, no block.
    assert_eq!(&V2_LOCAL[..12], &V2_SIGNATURE);
    assert_eq!(&V2_LOCAL[12..], &[0x20, 0x00, 0x00, 0x00]);
}
