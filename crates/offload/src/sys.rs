//! The map's key and value are plain bytes to the kernel; the program's clock.
#![allow(unsafe_code)]

// SAFETY: `Tuple` and `Nat` are `repr(C)` with no implicit padding (explicit `pad`, 8-byte
// fields at multiples of 8) and every bit pattern is a valid value.
unsafe impl aya::Pod for crate::Tuple {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::Nat {}

/// CLOCK_MONOTONIC in nanoseconds (the program stamps CLOCK_MONOTONIC_COARSE, the same clock
/// up to a tick behind).
pub fn monotonic_ns() -> u64 {
    let mut ts = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
