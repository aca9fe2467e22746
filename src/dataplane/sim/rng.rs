//! The simulator's only source of randomness: SplitMix64, seeded per run,
//! so a seed replays every decision exactly. Written here (a dozen lines)
//! rather than taken from a crate whose stream could change with a version.

/// A SplitMix64 generator (Steele, Lea and Flood, 2014).
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Mix the seed once so seeds 0, 1, 2… start far apart.
        let mut r = Self {
            state: seed ^ 0x6A09_E667_F3BC_C909,
        };
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0). The modulo bias is far below
    /// anything a simulation run could notice.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A size in `1..=max`, spread evenly over orders of magnitude so that
    /// 1-byte reads and reads of the whole limit are both common.
    pub fn size(&mut self, max: usize) -> usize {
        if max <= 1 {
            return 1;
        }
        let bits = usize::BITS - max.leading_zeros();
        let top = 1usize << self.range(0, bits as usize);
        self.range(1, top.min(max))
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_sizes_stay_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let va: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        let mut r = Rng::new(7);
        let sizes: Vec<usize> = (0..2000).map(|_| r.size(5000)).collect();
        assert!(sizes.iter().all(|&s| (1..=5000).contains(&s)));
        assert!(sizes.contains(&1), "small sizes occur");
        assert!(sizes.iter().any(|&s| s > 2500), "large sizes occur");
    }
}
