//! A new adapter for one layer, of each kind we train, initialised as LyCORIS and kohya do so that
//! ΔW = 0 at step 0 (training starts exactly at the base model) while every factor still gets a
//! gradient.

use candle_core::{DType, Tensor};

use crate::engine::Result;
use crate::engine::adapters::delta::{Delta, KronFactor};
use crate::engine::rng::Rng;
use crate::engine::train::trainer::Algorithm;

/// Kaiming-uniform initialisation bound for a fan-in, as torch.nn.Linear uses.
fn kaiming_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

fn uniform(rng: &mut Rng, shape: &[usize], bound: f64, device: &candle_core::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

fn normal(rng: &mut Rng, shape: &[usize], std: f64, device: &candle_core::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// LyCORIS' split of a dimension into m ≤ n with m·n = dim for LoKr: `factor` > 0 divides it when it
/// can; otherwise m grows through the divisors of dim while m < n and m ≤ factor (−1: no bound).
pub fn factorization(dim: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dim.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dim / factor as usize);
        return if m > n { (n, m) } else { (m, n) };
    }
    let bound = if factor < 0 { dim } else { factor as usize };
    let (mut m, mut n) = (1, dim);
    while m < n {
        let mut next = m + 1;
        while !dim.is_multiple_of(next) {
            next += 1;
        }
        if next > bound {
            break;
        }
        (m, n) = (next, dim / next);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// A fresh update of `algorithm` for a layer whose frozen weight is `base` ((out, in) or
/// (out, in, kh, kw)), of rank `rank` (already clamped to the layer). LoKr splits the layer by
/// `lokr_factor` (LyCORIS' `factor`, −1 for the most balanced split).
pub fn fresh_update(
    algorithm: Algorithm,
    base: &Tensor,
    rank: usize,
    lokr_factor: i64,
    rng: &mut Rng,
) -> Result<Delta> {
    let device = base.device().clone();
    let shape = base.dims().to_vec();
    let (out, inp) = (shape[0], shape[1]);
    let kernel = &shape[2..];
    let kk: usize = kernel.iter().product();
    let ones = vec![1usize; kernel.len()];
    let with = |a: usize, b: usize, tail: &[usize]| -> Vec<usize> { [&[a, b][..], tail].concat() };
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &device);
    let r = rank;
    Ok(match algorithm {
        // A random, B zero.
        Algorithm::Lora | Algorithm::Locon | Algorithm::Full => Delta::Lora {
            down: uniform(rng, &with(r, inp, kernel), kaiming_bound(inp * kk), &device)?,
            up: zeros(&with(out, r, &ones))?,
        },
        // GLoRA (LyCORIS): a1, b1 random, a2, b2 zero.
        Algorithm::Glora => Delta::Glora {
            a1: uniform(rng, &with(inp, r, &ones), kaiming_bound(r), &device)?,
            a2: zeros(&with(r, inp, &ones))?,
            b1: uniform(rng, &with(out, r, &ones), kaiming_bound(r), &device)?,
            b2: zeros(&with(r, inp, kernel))?,
        },
        // LoHa (LyCORIS): w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a zero.
        Algorithm::Loha => Delta::Loha {
            w1a: normal(rng, &[out, r], 0.1, &device)?,
            w1b: normal(rng, &[r, inp * kk], 1.0, &device)?,
            w2a: zeros(&[out, r])?,
            w2b: normal(rng, &[r, inp * kk], 1.0, &device)?,
            tucker: None,
        },
        // LoKr (LyCORIS): w1 (o1, i1) whole and random; w2 (o2, i2·k) low-rank with b zero when the
        // rank is under half its larger side, else whole and zero.
        Algorithm::Lokr => {
            let (o1, o2) = factorization(out, lokr_factor);
            let (i1, i2) = factorization(inp, lokr_factor);
            let w1 = KronFactor::Whole(uniform(rng, &[o1, i1], kaiming_bound(i1), &device)?);
            let w2 = if 2 * r < o2.max(i2) {
                KronFactor::LowRank {
                    a: uniform(rng, &[o2, r], kaiming_bound(r), &device)?,
                    b: zeros(&[r, i2 * kk])?,
                    tucker: None,
                }
            } else {
                KronFactor::Whole(zeros(&with(o2, i2, kernel))?)
            };
            Delta::Lokr { w1, w2 }
        }
        // DoRA: a LoRA (LoCon on a convolution) and the magnitude ‖W‖ per output row, so D = W.
        Algorithm::Dora => {
            let inner = fresh_update(Algorithm::Lora, base, rank, lokr_factor, rng)?;
            let rows = base.to_dtype(DType::F32)?.reshape((out, inp * kk))?;
            let magnitude = rows.sqr()?.sum_keepdim(1)?.sqrt()?.reshape(with(out, 1, &ones))?;
            // The inner scale is set by the trainer, which knows α.
            Delta::Dora { inner: Box::new(inner), inner_scale: 1.0, magnitude }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::factorization;

    /// What LyCORIS' own `factorization` returns (`lycoris/functional/general.py` at f49d30d, run
    /// with factor −1, 2, 4, 8, 16; its docstring's table is stale for 360).
    #[test]
    fn factorization_matches_lycoris() {
        let table: [(usize, [(usize, usize); 5]); 10] = [
            (127, [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127)]),
            (128, [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)]),
            (250, [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)]),
            (360, [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)]),
            (320, [(16, 20), (2, 160), (4, 80), (8, 40), (16, 20)]),
            (768, [(24, 32), (2, 384), (4, 192), (8, 96), (16, 48)]),
            (1280, [(32, 40), (2, 640), (4, 320), (8, 160), (16, 80)]),
            (32, [(4, 8), (2, 16), (4, 8), (4, 8), (2, 16)]),
            (64, [(8, 8), (2, 32), (4, 16), (8, 8), (4, 16)]),
            (96, [(8, 12), (2, 48), (4, 24), (8, 12), (6, 16)]),
        ];
        for (dim, row) in table {
            for (factor, want) in [-1i64, 2, 4, 8, 16].into_iter().zip(row) {
                assert_eq!(factorization(dim, factor), want, "{dim} with factor {factor}");
            }
        }
    }
}
