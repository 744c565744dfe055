//! PROXY protocol headers: `parse` and `parse_datagram` on any bytes never panic, and what they
//! return is consistent with the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proxyproto::{parse, parse_datagram, Parsed, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Complete { header, consumed }) => {
            assert!(0 < consumed && consumed <= data.len() && consumed <= MAX_HEADER_LEN);
            // The header alone parses the same.
            assert_eq!(parse(&data[..consumed]), Ok(Parsed::Complete { header, consumed }));
            // parse accepted the TLVs, so walking them finds no overrun.
            assert!(header.tlvs().iter().all(|tlv| tlv.is_ok()));
        }
        Ok(Parsed::Incomplete { needed_at_least }) => assert!(needed_at_least > data.len()),
        Err(_) => {}
    }
    if let Ok((header, payload)) = parse_datagram(data) {
        let consumed = data.len() - payload.len();
        assert_eq!(parse(data), Ok(Parsed::Complete { header, consumed }));
    }
});
