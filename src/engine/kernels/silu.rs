//! SiLU, `x·σ(x)`, the UNet's and VAE's activation, as one pass each way on the CPU (f32, f64).
//! candle 0.11.1's backward for it builds ten full-size tensors (neg, exp, add, recip, …); here
//! the slope comes from the saved input in the same loop that applies the incoming gradient.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::engine::Result;
use crate::engine::kernels::cpu::{contiguous_slice, cpu_float, float_dispatch, same_dtype};

/// Elements per work item (small tensors stay on one thread).
const CHUNK: usize = 1 << 14;

/// `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !cpu_float(x) {
        return Ok(x.silu()?);
    }
    Ok(x.contiguous()?.apply_op1(Silu)?)
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn forward<T: Float + Send + Sync>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * sigmoid(x);
        }
    });
    y
}

/// `g · silu'(x)`, silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
fn backward<T: Float + Send + Sync>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(o, (x, g))| {
        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
            let s = sigmoid(x);
            *o = g * s * (T::one() + x * (T::one() - s));
        }
    });
    out
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = float_dispatch!(s.dtype(), "silu", |T| {
            T::to_cpu_storage_owned(forward(contiguous_slice::<T>(s, l, "silu")?))
        });
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SiluGrad)?))
    }
}

/// (x, incoming gradient) → the input's gradient.
struct SiluGrad;

impl CustomOp2 for SiluGrad {
    fn name(&self) -> &'static str {
        "silu-fused-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(same_dtype(xs, gs, "silu gradient")?, "silu gradient", |T| {
            T::to_cpu_storage_owned(backward(
                contiguous_slice::<T>(xs, xl, "silu")?,
                contiguous_slice::<T>(gs, gl, "silu")?,
            ))
        });
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::silu;
    use crate::engine::rng::Rng;

    #[test]
    fn matches_candle_forward_and_backward() {
        let mut rng = Rng::new(9);
        for dtype in [DType::F32, DType::F64] {
            // Large enough for several work items, with values far into both tails.
            let x = (rng.randn((3, 7, 41, 37), &Device::Cpu).unwrap() * 6.0).unwrap().to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let probe = rng.randn(x.shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (ours, theirs) = (silu(&x).unwrap(), x.silu().unwrap());
            let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert!(diff(&ours, &theirs) < 1e-5);
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
        }
    }
}
