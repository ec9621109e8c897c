//! The normalisation inside group norm and layer norm, `(x − mean) / √(var + ε)` over each run of
//! `chunk` contiguous elements, as one CPU op with its own backward pass. Composed from candle ops
//! it was ten tensor ops (each allocating a full activation) forward and as many backward.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::engine::Result;
use crate::engine::kernels::cpu::{contiguous_slice, cpu_float, float_dispatch, with_cpu_data};

/// `x` normalised over each run of `chunk` contiguous elements (its shape unchanged).
pub fn normalise(x: &Tensor, chunk: usize, eps: f64) -> Result<Tensor> {
    if chunk == 0 || !x.elem_count().is_multiple_of(chunk) {
        anyhow::bail!("normalise: {} elements do not split into runs of {chunk}", x.elem_count());
    }
    let x = x.contiguous()?;
    if cpu_float(&x) {
        return Ok(x.apply_op1(Normalise { chunk, eps })?);
    }
    normalise_reference(&x, chunk, eps)
}

/// The same from candle ops: the fallback off the CPU and the tests' reference.
pub fn normalise_reference(x: &Tensor, chunk: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let g = x.reshape((x.elem_count() / chunk, chunk))?;
    let mean = g.mean_keepdim(1)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?)
}

struct Normalise {
    chunk: usize,
    eps: f64,
}

/// Mean and 1/√(var + ε) of one run, accumulated in f64.
fn moments<T: Float>(xs: &[T], eps: f64) -> (T, T) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|x| x.to_f64().unwrap_or(0.0)).sum::<f64>() / n;
    let var = xs.iter().map(|x| (x.to_f64().unwrap_or(0.0) - mean).powi(2)).sum::<f64>() / n;
    (T::from(mean).unwrap(), T::from(1.0 / (var + eps).sqrt()).unwrap())
}

impl Normalise {
    fn forward<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(self.chunk).zip(x.par_chunks(self.chunk)).for_each(|(y, x)| {
            let (mean, inv) = moments(x, self.eps);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - mean) * inv;
            }
        });
        y
    }

    /// `dx = (g − mean(g) − y · mean(g·y)) / √(var + ε)` per run.
    fn backward<T: Float + Send + Sync>(&self, x: &[T], y: &[T], g: &[T]) -> Vec<T> {
        let mut dx = vec![T::zero(); x.len()];
        let n = T::from(self.chunk).unwrap();
        dx.par_chunks_mut(self.chunk)
            .zip(x.par_chunks(self.chunk))
            .zip(y.par_chunks(self.chunk).zip(g.par_chunks(self.chunk)))
            .for_each(|((dx, x), (y, g))| {
                let (_, inv) = moments(x, self.eps);
                let (mut sg, mut sgy) = (T::zero(), T::zero());
                for (&y, &g) in y.iter().zip(g) {
                    sg = sg + g;
                    sgy = sgy + g * y;
                }
                let (mg, mgy) = (sg / n, sgy / n);
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = (g - mg - y * mgy) * inv;
                }
            });
        dx
    }
}

impl CustomOp1 for Normalise {
    fn name(&self) -> &'static str {
        "normalise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(s.dtype(), "normalise", |T| {
            T::to_cpu_storage_owned(self.forward(contiguous_slice::<T>(s, l, "normalise")?))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = float_dispatch!(x.dtype(), "normalise", |T| {
            let dx = with_cpu_data::<T, _>(x, |x| {
                with_cpu_data::<T, _>(y, |y| with_cpu_data::<T, _>(g, |g| self.backward(x, y, g)))
            })???;
            Tensor::from_vec(dx, x.shape(), x.device())?
        });
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_normalise_matches_the_composed_reference() {
        let mut rng = crate::engine::rng::Rng::new(5);
        let mut v = vec![0f32; 2 * 6 * 5 * 7];
        rng.fill_normal(&mut v);
        let v: Vec<f32> = v.iter().enumerate().map(|(i, x)| x * 3.0 + (i % 11) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 6, 5, 7), &Device::Cpu).unwrap()).unwrap();
        let mut p = vec![0f32; x.elem_count()];
        rng.fill_normal(&mut p);
        let probe = Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap();
        for chunk in [7, 3 * 5 * 7, 6 * 5 * 7] {
            let fused = normalise(&x, chunk, 1e-5).unwrap();
            let reference = normalise_reference(&x, chunk, 1e-5).unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&fused, &reference) < 1e-4, "forward, chunk {chunk}");
            let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(diff(a, b) < 1e-4, "backward, chunk {chunk}: {}", diff(a, b));
        }
    }
}
