//! Version 1: one line of US-ASCII text (spec section 2.1).
//!
//! ```text
//! PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n
//! PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n
//! PROXY UNKNOWN\r\n
//! ```
//!
//! The parser is strict, as the spec asks ("any sequence which does not exactly match the
//! protocol must be discarded"): single spaces, IPv4 as four decimal numbers without leading
//! zeros, IPv6 as colon-separated groups of 1 to 4 hex digits with at most one `::` (no embedded
//! dotted IPv4), each address in the family the line names, ports 0..=65535 without sign or
//! leading zero, only printable US-ASCII, and CRLF within 107 bytes. The tail of an `UNKNOWN`
//! line is ignored, as the spec says, but must be printable too.
//!
//! It also reports an error as soon as the bytes received rule out every valid line, not only
//! once CRLF arrives: each field is checked as a possible start of a valid one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{Header, ParseError, Parsed, Tlvs, Transport, V1_MAX_LEN};

/// What a v1 line starts with.
pub(crate) const SIGNATURE: &[u8; 5] = b"PROXY";

/// The shortest valid line, `PROXY UNKNOWN\r\n`.
pub(crate) const MIN_LEN: usize = 15;

/// The protocol words a line may name.
const TCP4: &[u8] = b"TCP4";
const TCP6: &[u8] = b"TCP6";
const UNKNOWN: &[u8] = b"UNKNOWN";

/// Which address family a `TCP4`/`TCP6` line carries.
#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Parses a v1 header at the start of `buf` (whose first byte is `P`).
pub(crate) fn parse(buf: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(ParseError::NotProxy);
    }
    // CRLF must end the line by byte 107 (spec 2.1: "If the CRLF sequence is not found in the
    // first 107 characters, the receiver should declare the line invalid").
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    if let Some(end) = window.windows(2).position(|pair| pair == b"\r\n") {
        return match line(&window[..end], true)? {
            Some(header) => Ok(Parsed::Complete { header, consumed: end + 2 }),
            None => Err(malformed("line ends too early")),
        };
    }
    // No CRLF yet: what arrived must still be the start of a valid line. A final CR may be the
    // first half of CRLF, so the fields before it must then already form a whole line.
    match window.split_last() {
        Some((b'\r', body)) => line(body, true)?,
        _ => line(window, false)?,
    };
    if buf.len() >= V1_MAX_LEN {
        return Err(ParseError::V1TooLong);
    }
    Ok(Parsed::Incomplete { needed_at_least: (buf.len() + 1).max(MIN_LEN) })
}

/// Checks a line without its CRLF. With `whole`, the line has ended and `Ok(Some(header))` is
/// what it says; without, `bytes` is what has arrived of a line and `Ok(None)` means it may
/// still become a valid one.
fn line(bytes: &[u8], whole: bool) -> Result<Option<Header<'static>>, ParseError> {
    // Also rules out a lone CR or LF (spec 2.1: "must not tolerate a single CR or LF character
    // to end the line"), NUL and any byte above 0x7e.
    if bytes.iter().any(|b| !(0x20..=0x7e).contains(b)) {
        return Err(malformed("byte outside printable US-ASCII"));
    }
    let rest = match field(bytes, whole) {
        Field::Spaced(b"PROXY", rest) => rest,
        Field::Partial(word) if SIGNATURE.starts_with(word) => return Ok(None),
        _ => return Err(malformed("does not start with \"PROXY \"")),
    };
    let (family, rest) = match field(rest, whole) {
        Field::Spaced(TCP4, rest) => (Family::V4, rest),
        Field::Spaced(TCP6, rest) => (Family::V6, rest),
        // "the receiver must ignore anything presented before the CRLF is found"
        Field::Spaced(UNKNOWN, _) | Field::Last(UNKNOWN) => {
            return Ok(whole.then_some(Header::Local { tlvs: Tlvs::EMPTY }));
        }
        Field::Partial(word) if [TCP4, TCP6, UNKNOWN].iter().any(|p| p.starts_with(word)) => {
            return Ok(None);
        }
        Field::Last(TCP4 | TCP6) => return Err(malformed("missing addresses and ports")),
        _ => return Err(malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let (source_ip, rest) = match field(rest, whole) {
        Field::Spaced(text, rest) => (address(family, text)?, rest),
        Field::Partial(text) => return address_start(family, text).map(|()| None),
        Field::Last(_) => return Err(malformed("missing destination address and ports")),
    };
    let (destination_ip, rest) = match field(rest, whole) {
        Field::Spaced(text, rest) => (address(family, text)?, rest),
        Field::Partial(text) => return address_start(family, text).map(|()| None),
        Field::Last(_) => return Err(malformed("missing ports")),
    };
    let (source_port, rest) = match field(rest, whole) {
        Field::Spaced(text, rest) => (port(text)?, rest),
        Field::Partial(text) => return port_start(text).map(|()| None),
        Field::Last(_) => return Err(malformed("missing destination port")),
    };
    let destination_port = match field(rest, whole) {
        Field::Last(text) => port(text)?,
        Field::Partial(text) => return port_start(text).map(|()| None),
        Field::Spaced(..) => return Err(malformed("more than six fields")),
    };
    Ok(Some(Header::Proxy {
        transport: Transport::Stream,
        source: SocketAddr::new(source_ip, source_port),
        destination: SocketAddr::new(destination_ip, destination_port),
        tlvs: Tlvs::EMPTY,
    }))
}

fn malformed(reason: &'static str) -> ParseError {
    ParseError::V1Malformed(reason)
}

/// One space-separated field of a line.
enum Field<'a> {
    /// A field followed by a space, and what follows the space.
    Spaced(&'a [u8], &'a [u8]),
    /// The last field of a whole line.
    Last(&'a [u8]),
    /// The last bytes received of a line that has not ended: the start of a field.
    Partial(&'a [u8]),
}

fn field(bytes: &[u8], whole: bool) -> Field<'_> {
    match bytes.iter().position(|&b| b == b' ') {
        Some(space) => Field::Spaced(&bytes[..space], &bytes[space + 1..]),
        None if whole => Field::Last(bytes),
        None => Field::Partial(bytes),
    }
}

fn address(family: Family, text: &[u8]) -> Result<IpAddr, ParseError> {
    match family {
        Family::V4 => ipv4(text).map(IpAddr::V4).ok_or(malformed("bad IPv4 address")),
        Family::V6 => ipv6(text).map(IpAddr::V6).ok_or(malformed("bad IPv6 address")),
    }
}

/// Whether `text` can still grow into an address of `family`.
fn address_start(family: Family, text: &[u8]) -> Result<(), ParseError> {
    match family {
        Family::V4 if ipv4_start(text) => Ok(()),
        Family::V4 => Err(malformed("bad IPv4 address")),
        Family::V6 if ipv6_start(text) => Ok(()),
        Family::V6 => Err(malformed("bad IPv6 address")),
    }
}

fn port(text: &[u8]) -> Result<u16, ParseError> {
    decimal(text, u16::MAX.into())
        .and_then(|value| u16::try_from(value).ok())
        .ok_or(malformed("bad port"))
}

fn port_start(text: &[u8]) -> Result<(), ParseError> {
    // Every start of a valid number is empty or itself a valid number.
    match text.is_empty() || decimal(text, u16::MAX.into()).is_some() {
        true => Ok(()),
        false => Err(malformed("bad port")),
    }
}

/// A decimal number in `0..=max`: digits only, no sign, no leading zero (spec 2.1: "Heading
/// zeroes are not permitted in front of numbers in order to avoid any possible confusion with
/// octal numbers").
fn decimal(text: &[u8], max: u32) -> Option<u32> {
    let leading_zero = text.len() > 1 && text[0] == b'0';
    if text.is_empty() || text.len() > 5 || leading_zero {
        return None;
    }
    let mut value = 0u32;
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(b - b'0');
    }
    (value <= max).then_some(value)
}

fn ipv4(text: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for octet in &mut octets {
        *octet = u8::try_from(decimal(parts.next()?, 255)?).ok()?;
    }
    match parts.next() {
        None => Some(Ipv4Addr::from(octets)),
        Some(_) => None,
    }
}

/// Whether `text` is the start of an IPv4 address: at most 4 parts, each but the last a valid
/// number, the last empty or a valid number.
fn ipv4_start(text: &[u8]) -> bool {
    let parts = text.split(|&b| b == b'.').count();
    parts <= 4
        && text
            .split(|&b| b == b'.')
            .enumerate()
            .all(|(i, part)| (i + 1 == parts && part.is_empty()) || decimal(part, 255).is_some())
}

/// One group of an IPv6 address: 1 to 4 hex digits.
fn hex_group(text: &[u8]) -> Option<u16> {
    if text.is_empty() || text.len() > 4 {
        return None;
    }
    let mut value = 0u16;
    for &b in text {
        let digit = char::from(b).to_digit(16)?;
        value = value << 4 | digit as u16;
    }
    Some(value)
}

/// Parses `a:b:c` into `out`, returning how many groups there were (none for empty text).
fn hex_groups(text: &[u8], out: &mut [u16; 8]) -> Option<usize> {
    if text.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for group in text.split(|&b| b == b':') {
        *out.get_mut(n)? = hex_group(group)?;
        n += 1;
    }
    Some(n)
}

fn double_colon(text: &[u8]) -> Option<usize> {
    text.windows(2).position(|pair| pair == b"::")
}

/// An IPv6 address as RFC 4291 section 2.2 writes it in forms 1 and 2: eight groups, or fewer
/// with one `::` standing for at least one zero group. Form 3 (a dotted IPv4 tail) is refused:
/// spec 2.1 asks for "sets of 4 hexadecimal digits".
fn ipv6(text: &[u8]) -> Option<Ipv6Addr> {
    let mut groups = [0u16; 8];
    match double_colon(text) {
        None => (hex_groups(text, &mut groups)? == 8).then(|| Ipv6Addr::from(groups)),
        Some(at) => {
            let mut tail = [0u16; 8];
            let head_len = hex_groups(&text[..at], &mut groups)?;
            let tail_len = hex_groups(&text[at + 2..], &mut tail)?;
            if head_len + tail_len > 7 {
                return None;
            }
            groups[8 - tail_len..].copy_from_slice(&tail[..tail_len]);
            Some(Ipv6Addr::from(groups))
        }
    }
}

/// Whether `text` is the start of an IPv6 address that [`ipv6`] accepts.
fn ipv6_start(text: &[u8]) -> bool {
    // The groups of a started address: each but the last a valid group, the last empty or a
    // valid group. Returns how many there are, the last counted even if empty.
    fn started_groups(text: &[u8]) -> Option<usize> {
        let count = text.split(|&b| b == b':').count();
        let valid = text
            .split(|&b| b == b':')
            .enumerate()
            .all(|(i, group)| (i + 1 == count && group.is_empty()) || hex_group(group).is_some());
        valid.then_some(count)
    }
    if text == b":" {
        return true; // the start of a leading "::"
    }
    match double_colon(text) {
        // Up to 8 groups; a trailing ':' is the start of another group or of "::", which needs
        // at most 7 groups around it.
        None => started_groups(text).is_some_and(|count| count <= 8),
        Some(at) => {
            let mut head = [0u16; 8];
            let Some(head_len) = hex_groups(&text[..at], &mut head) else { return false };
            let tail = &text[at + 2..];
            // A tail that has started (even with only ':') commits to one more group.
            let tail_len = match tail.is_empty() {
                true => Some(0),
                false => started_groups(tail),
            };
            tail_len.is_some_and(|tail_len| head_len + tail_len <= 7)
        }
    }
}

/// Encodes a v1 line (see [`crate::encode_v1`]).
pub(crate) fn encode(source: SocketAddr, destination: SocketAddr, out: &mut [u8; 108]) -> usize {
    let mut w = Writer { out, len: 0 };
    w.put(b"PROXY ");
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.put(TCP4);
            w.put(b" ");
            w.ipv4(s);
            w.put(b" ");
            w.ipv4(d);
        }
        (s, d) => {
            w.put(TCP6);
            w.put(b" ");
            w.ipv6(mapped(s));
            w.put(b" ");
            w.ipv6(mapped(d));
        }
    }
    w.put(b" ");
    w.decimal(source.port());
    w.put(b" ");
    w.decimal(destination.port());
    w.put(b"\r\n");
    w.len
}

pub(crate) fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends to the 108-byte line buffer. The longest line written is 104 bytes (`TCP6` with two
/// 39-character addresses and two 5-digit ports), so `put` never indexes past the end.
struct Writer<'a> {
    out: &'a mut [u8; 108],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn decimal(&mut self, value: u16) {
        let mut digits = [0u8; 5];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.put(&digits[start..]);
    }

    fn ipv4(&mut self, ip: Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.put(b".");
            }
            self.decimal(octet.into());
        }
    }

    /// RFC 5952 section 4: lowercase hex without leading zeros, the longest run of two or more
    /// zero groups (the first, on a tie) as `::`. Never the dotted form std's `Display` uses for
    /// IPv4-mapped addresses, which a strict v1 receiver (this one) refuses.
    fn ipv6(&mut self, ip: Ipv6Addr) {
        let groups = ip.segments();
        let (mut run_start, mut run_len) = (0, 0);
        let mut i = 0;
        while i < groups.len() {
            let len = groups[i..].iter().take_while(|&&g| g == 0).count();
            if len > run_len {
                (run_start, run_len) = (i, len);
            }
            i += len.max(1);
        }
        if run_len < 2 {
            run_len = 0;
        }
        for (i, &group) in groups.iter().enumerate() {
            if run_len > 0 && i == run_start {
                self.put(b"::");
            }
            if run_len > 0 && (run_start..run_start + run_len).contains(&i) {
                continue;
            }
            if i > 0 && !(run_len > 0 && i == run_start + run_len) {
                self.put(b":");
            }
            self.hex(group);
        }
    }

    fn hex(&mut self, group: u16) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut started = false;
        for shift in [12, 8, 4, 0] {
            let digit = usize::from(group >> shift & 0xf);
            if digit != 0 || started || shift == 0 {
                self.put(&DIGITS[digit..digit + 1]);
                started = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use proptest::prelude::*;

    use super::*;

    fn parse_str(s: &str) -> Result<Parsed<'_>, ParseError> {
        crate::parse(s.as_bytes())
    }

    fn proxy(transport: Transport, source: &str, destination: &str) -> Header<'static> {
        Header::Proxy {
            transport,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            tlvs: Tlvs::EMPTY,
        }
    }

    fn complete(header: Header<'static>, consumed: usize) -> Result<Parsed<'static>, ParseError> {
        Ok(Parsed::Complete { header, consumed })
    }

    fn bad(reason: &'static str) -> Result<Parsed<'static>, ParseError> {
        Err(ParseError::V1Malformed(reason))
    }

    // ---- valid lines ----

    #[test]
    fn tcp4_line_from_the_spec() {
        let line = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        let header = proxy(Transport::Stream, "192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(parse_str(line), complete(header, 47));
    }

    #[test]
    fn tcp6_line() {
        let line = "PROXY TCP6 2001:db8::1 ::ffff:c000:201 0 65535\r\n";
        let header = proxy(Transport::Stream, "[2001:db8::1]:0", "[::ffff:192.0.2.1]:65535");
        assert_eq!(parse_str(line), complete(header, line.len()));
    }

    #[test]
    fn longest_lines_fit() {
        let v4 = "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(v4.len(), 56);
        assert!(matches!(parse_str(v4), Ok(Parsed::Complete { consumed: 56, .. })));
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let v6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(v6.len(), 104);
        assert!(matches!(parse_str(&v6), Ok(Parsed::Complete { consumed: 104, .. })));
        let unknown = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX_LEN);
        let local = Header::Local { tlvs: Tlvs::EMPTY };
        assert_eq!(parse_str(&unknown), complete(local, V1_MAX_LEN));
    }

    #[test]
    fn unknown_short_and_long_forms_are_local() {
        let local = Header::Local { tlvs: Tlvs::EMPTY };
        assert_eq!(parse_str("PROXY UNKNOWN\r\n"), complete(local, 15));
        // The receiver ignores the rest of an UNKNOWN line, whatever it says.
        let long = "PROXY UNKNOWN ffff::1 not-an-address 1 99999\r\n";
        assert_eq!(parse_str(long), complete(local, long.len()));
    }

    #[test]
    fn only_the_first_crlf_ends_the_line() {
        let buf = "PROXY UNKNOWN\r\nPROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        assert!(matches!(parse_str(buf), Ok(Parsed::Complete { consumed: 15, .. })));
    }

    #[test]
    fn zero_is_a_number_not_a_leading_zero() {
        let header = proxy(Transport::Stream, "0.0.0.0:0", "0.10.100.0:0");
        let line = "PROXY TCP4 0.0.0.0 0.10.100.0 0 0\r\n";
        assert_eq!(parse_str(line), complete(header, line.len()));
    }

    // ---- incomplete ----

    #[test]
    fn every_start_of_a_valid_line_is_incomplete() {
        for line in [
            "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "PROXY TCP6 ::1 1:2:3:4:5:6:7:8 1 65535\r\n",
            "PROXY TCP6 1:: a:b::c:d 10 10\r\n",
            "PROXY UNKNOWN\r\n",
            "PROXY UNKNOWN whatever\r\n",
        ] {
            for end in 0..line.len() {
                let got = parse_str(&line[..end]);
                let needed = match got {
                    Ok(Parsed::Incomplete { needed_at_least }) => needed_at_least,
                    _ => panic!("{:?}: {got:?}", &line[..end]),
                };
                assert!(needed > end);
            }
        }
    }

    #[test]
    fn incomplete_asks_for_at_least_the_shortest_line() {
        assert_eq!(parse_str("P"), Ok(Parsed::Incomplete { needed_at_least: MIN_LEN }));
        let buf = "PROXY TCP4 1.2.3.4 5.6.7.8 1 2";
        assert_eq!(parse_str(buf), Ok(Parsed::Incomplete { needed_at_least: buf.len() + 1 }));
    }

    // ---- errors, as soon as the bytes show them ----

    #[test]
    fn not_proxy_at_the_first_wrong_byte() {
        assert_eq!(parse_str("PROXX"), Err(ParseError::NotProxy));
        assert_eq!(parse_str("PR0"), Err(ParseError::NotProxy));
        assert_eq!(parse_str("GET / HTTP/1.1\r\n"), Err(ParseError::NotProxy));
        assert_eq!(parse_str("proxy TCP4"), Err(ParseError::NotProxy));
    }

    #[test]
    fn words_and_spaces_are_exact() {
        let start = "does not start with \"PROXY \"";
        assert_eq!(parse_str("PROXYTCP4"), bad(start));
        assert_eq!(parse_str("PROXY\r\n"), bad(start));
        assert_eq!(parse_str("PROXY\tTCP4"), bad("byte outside printable US-ASCII"));
        let protocol = "protocol is not TCP4, TCP6 or UNKNOWN";
        assert_eq!(parse_str("PROXY  TCP4"), bad(protocol));
        assert_eq!(parse_str("PROXY TCP5"), bad(protocol));
        assert_eq!(parse_str("PROXY tcp4"), bad(protocol));
        assert_eq!(parse_str("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"), bad(protocol));
        assert_eq!(parse_str("PROXY UNKNOWNX\r\n"), bad(protocol));
        assert_eq!(parse_str("PROXY TCP4  1.2.3.4"), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"), bad("more than six fields"));
        let double = "PROXY TCP4 1.2.3.4 5.6.7.8 1  2";
        assert_eq!(parse_str(double), bad("more than six fields"));
    }

    #[test]
    fn missing_fields() {
        assert_eq!(parse_str("PROXY TCP4\r\n"), bad("missing addresses and ports"));
        let missing = bad("missing destination address and ports");
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4\r\n"), missing);
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8\r\n"), bad("missing ports"));
        let missing = bad("missing destination port");
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), missing);
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n"), bad("bad port"));
    }

    #[test]
    fn addresses_in_the_wrong_family_are_refused() {
        assert_eq!(parse_str("PROXY TCP4 ::1 ::1 1 2\r\n"), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 ::1"), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP6 1.2.3.4 ::1 1 2\r\n"), bad("bad IPv6 address"));
        // Mixed families as nginx's stream module emits them (pires/go-proxyproto#167): the
        // spec says both addresses match the named family.
        let mixed = "PROXY TCP6 2001:db8::1 192.0.2.1 51512 22\r\n";
        assert_eq!(parse_str(mixed), bad("bad IPv6 address"));
        // The dotted tail of RFC 4291's third form is not hex groups.
        assert_eq!(parse_str("PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"), bad("bad IPv6 address"));
    }

    #[test]
    fn ipv4_forms_std_or_inet_aton_might_take_are_refused() {
        for address in [
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.",
            "0x1.2.3.4",
            "1..3.4",
            "+1.2.3.4",
        ] {
            let line = format!("PROXY TCP4 {address} 5.6.7.8 1 2\r\n");
            assert_eq!(parse_str(&line), bad("bad IPv4 address"), "{address}");
        }
    }

    #[test]
    fn ipv6_forms_are_checked() {
        for address in [
            "1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:8:9",
            "1::2::3",
            ":::1",
            ":1::",
            "1:2:3:4:5:6:7:8::",
            "::1:2:3:4:5:6:7:8",
            "12345::",
            "g::",
            "[::1]",
            "fe80::1%eth0",
        ] {
            let line = format!("PROXY TCP6 {address} ::1 1 2\r\n");
            assert_eq!(parse_str(&line), bad("bad IPv6 address"), "{address}");
        }
    }

    #[test]
    fn ports_are_plain_decimal() {
        for port in ["65536", "99999", "100000", "007", "+1", "-1", "1e3", "0x10", "１"] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {port} 2\r\n");
            assert!(matches!(parse_str(&line), Err(ParseError::V1Malformed(_))), "{port}");
        }
    }

    #[test]
    fn errors_come_before_the_line_ends() {
        assert_eq!(parse_str("PROXY TCP4 256"), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4."), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP4 01"), bad("bad IPv4 address"));
        assert_eq!(parse_str("PROXY TCP6 1:2:3:4:5:6:7:8:"), bad("bad IPv6 address"));
        assert_eq!(parse_str("PROXY TCP6 1::2:3:4:5:6:7:"), bad("bad IPv6 address"));
        assert_eq!(parse_str("PROXY TCP6 1::2::"), bad("bad IPv6 address"));
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 65536"), bad("bad port"));
        let zero = "PROXY TCP4 1.2.3.4 5.6.7.8 0";
        assert_eq!(parse_str(zero), Ok(Parsed::Incomplete { needed_at_least: zero.len() + 1 }));
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 00"), bad("bad port"));
        // A final CR must be followed by LF, so the fields before it must already be whole.
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1\r"), bad("missing destination port"));
    }

    #[test]
    fn lone_cr_lf_and_nul_are_refused() {
        let printable = bad("byte outside printable US-ASCII");
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), printable);
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n"), printable);
        assert_eq!(parse_str("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"), printable);
        assert_eq!(parse_str("PROXY UNKNOWN \0\r\n"), printable);
        assert_eq!(parse_str("PROXY UNKNOWN \n\r\n"), printable);
        assert_eq!(crate::parse(b"PROXY UNKNOWN \xc3\xa9\r\n"), printable);
    }

    #[test]
    fn a_line_without_crlf_in_107_bytes_is_too_long() {
        let mut line = "PROXY UNKNOWN ".to_string();
        line.push_str(&"a".repeat(V1_MAX_LEN - line.len()));
        assert_eq!(line.len(), V1_MAX_LEN);
        assert_eq!(parse_str(&line[..106]), Ok(Parsed::Incomplete { needed_at_least: 107 }));
        assert_eq!(parse_str(&line), Err(ParseError::V1TooLong));
        // CRLF at bytes 107 and 108 makes a 108-byte line.
        let mut long = line[..106].to_string();
        long.push_str("\r\n");
        assert_eq!(long.len(), 108);
        assert_eq!(parse_str(&long[..107]), Err(ParseError::V1TooLong));
        assert_eq!(parse_str(&long), Err(ParseError::V1TooLong));
    }

    // ---- encoding ----

    fn encoded(source: &str, destination: &str) -> String {
        let mut out = [0u8; 108];
        let len = encode(source.parse().unwrap(), destination.parse().unwrap(), &mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn encodes_tcp4_and_tcp6() {
        let line = encoded("192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(line, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let line = encoded("[2001:db8::1]:0", "[2001:db8:0:0:1:0:0:1]:65535");
        assert_eq!(line, "PROXY TCP6 2001:db8::1 2001:db8::1:0:0:1 0 65535\r\n");
    }

    #[test]
    fn mixed_families_are_sent_as_tcp6_in_hex() {
        let line = encoded("192.0.2.1:1000", "[2001:db8::2]:443");
        assert_eq!(line, "PROXY TCP6 ::ffff:c000:201 2001:db8::2 1000 443\r\n");
        let line = encoded("[::1]:1", "10.0.0.1:2");
        assert_eq!(line, "PROXY TCP6 ::1 ::ffff:a00:1 1 2\r\n");
    }

    #[test]
    fn longest_encoding_is_104_bytes() {
        let full = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        assert_eq!(encoded(full, full).len(), 104);
    }

    #[test]
    fn ipv6_text_follows_rfc_5952() {
        for (ip, text) in [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            ("abcd:ef01:2345:6789:abcd:ef01:2345:6789", "abcd:ef01:2345:6789:abcd:ef01:2345:6789"),
            ("::ffff:1.2.3.4", "::ffff:102:304"),
        ] {
            let mut out = [0u8; 108];
            let mut w = Writer { out: &mut out, len: 0 };
            w.ipv6(ip.parse().unwrap());
            let len = w.len;
            assert_eq!(std::str::from_utf8(&out[..len]).unwrap(), text, "{ip}");
        }
    }

    // ---- the address grammar against std ----

    proptest! {
        // On strings of hex digits and colons, ipv6() agrees with std (which also takes the
        // dotted form and nothing else that these strings could hold), and every start of an
        // accepted string is accepted by ipv6_start().
        #[test]
        fn ipv6_agrees_with_std(text in "[0-9a-fA-F:]{0,41}") {
            let ours = ipv6(text.as_bytes());
            prop_assert_eq!(ours, Ipv6Addr::from_str(&text).ok());
            if ours.is_some() {
                for end in 0..=text.len() {
                    prop_assert!(ipv6_start(&text.as_bytes()[..end]), "{}", &text[..end]);
                }
            }
        }

        #[test]
        fn ipv6_text_round_trips(bits in any::<u128>(), zeros in any::<u8>()) {
            // Zero some groups so that "::" shows up often.
            let mut groups = Ipv6Addr::from(bits).segments();
            for (i, group) in groups.iter_mut().enumerate() {
                if zeros >> i & 1 == 1 {
                    *group = 0;
                }
            }
            let ip = Ipv6Addr::from(groups);
            let mut out = [0u8; 108];
            let mut w = Writer { out: &mut out, len: 0 };
            w.ipv6(ip);
            let len = w.len;
            prop_assert_eq!(ipv6(&out[..len]), Some(ip));
            let ours = std::str::from_utf8(&out[..len]).unwrap();
            if !ip.to_string().contains('.') {
                prop_assert_eq!(ours, ip.to_string());
            }
        }

        #[test]
        fn ipv4_agrees_with_std(text in "[0-9.]{0,17}") {
            let ours = ipv4(text.as_bytes());
            prop_assert_eq!(ours, Ipv4Addr::from_str(&text).ok());
            if ours.is_some() {
                for end in 0..=text.len() {
                    prop_assert!(ipv4_start(&text.as_bytes()[..end]), "{}", &text[..end]);
                }
            }
        }
    }
}
