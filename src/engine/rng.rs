//! Our own seeded random numbers (xoshiro256++ seeded by SplitMix64): candle's CPU device cannot
//! be seeded, and training must checkpoint and resume its noise stream exactly, so every random
//! draw in the engine comes from here and the whole state is four `u64`s.

use candle_core::{Device, Shape, Tensor};

use super::Result;

/// xoshiro256++ (Blackman & Vigna): fast, 256 bits of state, passes BigCrush; not cryptographic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// SplitMix64 step: spreads a seed over the state so nearby seeds give unrelated streams.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let s = [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)];
        Self::from_state(s)
    }

    /// The complete generator state; `from_state(state())` continues the exact same stream.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a saved state. The all-zero state is a fixed point of xoshiro (it would emit zeros
    /// forever) and never produced by `new`, so it is treated as seed 0 instead.
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] { Self::new(0) } else { Self { s } }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) with 24 random bits (every value exactly representable, never 1.0).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift with rejection, so unbiased).
    /// Panics if `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// Two independent standard normals (Box–Muller on 53-bit uniforms, computed in f64).
    fn normal_pair(&mut self) -> (f64, f64) {
        // 1 - u lies in (0, 1], so the log is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        (r * cos, r * sin)
    }

    /// One standard normal. The pair's second value is dropped rather than cached, so that the
    /// state stays exactly the four words `state()` returns.
    pub fn normal(&mut self) -> f64 {
        self.normal_pair().0
    }

    pub fn normal_f32(&mut self) -> f32 {
        self.normal() as f32
    }

    /// Fills `out` with standard normals, using both values of each Box–Muller pair.
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b) = self.normal_pair();
            pair[0] = a as f32;
            pair[1] = b as f32;
        }
        if let [last] = chunks.into_remainder() {
            *last = self.normal_pair().0 as f32;
        }
    }

    /// An f32 tensor of standard normals, generated on the CPU and moved to `device`, so the same
    /// seed gives the same noise on every backend.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let mut v = vec![0f32; shape.elem_count()];
        self.fill_normal(&mut v);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
    }

    /// A new generator seeded from this one, for an independent sub-stream (e.g. per worker).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_first_output() {
        // Reference values of the published xoshiro256++ on state [1, 2, 3, 4].
        let mut r = Rng::from_state([1, 2, 3, 4]);
        assert_eq!(r.next_u64(), 41943041);
        assert_eq!(r.next_u64(), 58720359);
        assert_eq!(r.next_u64(), 3588806011781223);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let (mut a, mut b, mut c) = (Rng::new(42), Rng::new(42), Rng::new(43));
        let xa: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..100).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn state_round_trip_resumes_exactly() {
        let mut a = Rng::new(7);
        for _ in 0..13 {
            a.normal();
        }
        let saved = a.state();
        let mut ta = vec![0f32; 1001];
        a.fill_normal(&mut ta);
        let mut b = Rng::from_state(saved);
        let mut tb = vec![0f32; 1001];
        b.fill_normal(&mut tb);
        assert_eq!(ta, tb);
        assert_eq!(a, b);
        assert_ne!(Rng::from_state([0; 4]).state(), [0; 4]);
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut r = Rng::new(1);
        let mut v = vec![0f32; 100_000];
        r.fill_normal(&mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // Standard errors are 1/sqrt(n) ≈ 0.003 (mean) and sqrt(2/n) ≈ 0.0045 (variance).
        assert!(mean.abs() < 0.015, "mean {mean}");
        assert!((var - 1.0).abs() < 0.025, "variance {var}");
        let singles: Vec<f64> = (0..100_000).map(|_| r.normal()).collect();
        let mean = singles.iter().sum::<f64>() / n;
        let var = singles.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.015 && (var - 1.0).abs() < 0.025, "single draws: mean {mean}, var {var}");
    }

    #[test]
    fn uniforms_and_integers_stay_in_range() {
        let mut r = Rng::new(3);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            let u = r.uniform_f32();
            assert!((0.0..1.0).contains(&u));
            let f = r.uniform();
            assert!((0.0..1.0).contains(&f));
            counts[r.below(5)] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        let mut items: Vec<u32> = (0..50).collect();
        r.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(items, sorted);
    }

    #[test]
    fn randn_tensor_matches_fill_normal() -> Result<()> {
        let t = Rng::new(5).randn((2, 3, 4), &Device::Cpu)?;
        assert_eq!(t.dims(), &[2, 3, 4]);
        assert_eq!(t.dtype(), candle_core::DType::F32);
        let mut v = vec![0f32; 24];
        Rng::new(5).fill_normal(&mut v);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, v);
        Ok(())
    }
}
