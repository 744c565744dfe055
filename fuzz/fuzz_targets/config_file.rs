//! The TOML config file: `load_str` on any text returns a config or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tether_config::file::load_str(text);
    }
});
