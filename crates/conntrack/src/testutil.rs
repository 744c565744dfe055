//! Test helpers shared by the modules' tests, and by the tests of crates built on this one
//! (`guard`): not part of the API.

/// SplitMix64 (Steele, Lea & Flood 2014): enough randomness for a seeded simulation, no
/// dependency.
pub struct Rng(pub u64);

impl Rng {
    // A generator, not an iterator: `next` reads as what it does in the simulations.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
