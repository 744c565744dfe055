//! The map's key and value are plain bytes to the kernel.
#![allow(unsafe_code)]

// SAFETY: `Tuple` and `Nat` are `repr(C)` with no implicit padding (explicit `pad`, 8-byte
// fields at multiples of 8) and every bit pattern is a valid value.
unsafe impl aya::Pod for crate::Tuple {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::Nat {}
