//! GEGLU, the UNet feed-forward's gate: `value · gelu(gate)` over the two halves of the last
//! dimension. On the CPU (f32, f64) it is one pass each way; composed from candle ops, the gelu's
//! backward alone is a dozen full-size tensors, and the two `narrow`s' backward two zero-padded ones.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::engine::Result;
use crate::engine::kernels::cpu::{contiguous_slice, cpu_float, float_dispatch, same_dtype};

/// `h[..., :F] · gelu_erf(h[..., F:])` for `h` of last dimension 2F.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if !cpu_float(h) || !h.dim(D::Minus1)?.is_multiple_of(2) {
        return geglu_reference(h);
    }
    Ok(h.contiguous()?.apply_op1(Geglu)?)
}

/// The same from candle's ops (other devices and dtypes; the tests' reference).
pub fn geglu_reference(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    let (value, gate) = (h.narrow(D::Minus1, 0, half)?, h.narrow(D::Minus1, half, half)?);
    Ok((value * gate.gelu_erf()?)?)
}

/// Scalar maths shared by both passes.
trait Gelu: Float + Send + Sync + 'static {
    fn erf(self) -> Self;
    /// (gelu(x), gelu'(x)).
    fn gelu_and_slope(self) -> (Self, Self) {
        let half = Self::from(0.5).unwrap();
        let cdf = half * (Self::one() + (self * Self::from(std::f64::consts::FRAC_1_SQRT_2).unwrap()).erf());
        let pdf = Self::from(0.398_942_280_401_432_7).unwrap() * (-(self * self) * half).exp();
        (self * cdf, cdf + self * pdf)
    }
}

impl Gelu for f32 {
    fn erf(self) -> f32 {
        candle_core::cpu::erf::erf_f32(self)
    }
}

impl Gelu for f64 {
    fn erf(self) -> f64 {
        candle_core::cpu::erf::erf_f64(self)
    }
}

fn forward<T: Gelu>(h: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len() / 2];
    out.par_chunks_mut(f).zip(h.par_chunks(2 * f)).for_each(|(o, row)| {
        let (value, gate) = row.split_at(f);
        for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
            *o = v * g.gelu_and_slope().0;
        }
    });
    out
}

/// d/dh of `geglu(h)` given the output's gradient: [g·gelu(gate), g·value·gelu'(gate)].
fn backward<T: Gelu>(h: &[T], grad: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len()];
    out.par_chunks_mut(2 * f).zip(h.par_chunks(2 * f)).zip(grad.par_chunks(f)).for_each(|((o, row), g)| {
        let (value, gate) = row.split_at(f);
        let (o_value, o_gate) = o.split_at_mut(f);
        for j in 0..f {
            let (gelu, slope) = gate[j].gelu_and_slope();
            o_value[j] = g[j] * gelu;
            o_gate[j] = g[j] * value[j] * slope;
        }
    });
    out
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let f = dims[dims.len() - 1] / 2;
        *dims.last_mut().unwrap() = f;
        let out = float_dispatch!(s.dtype(), "geglu", |T| {
            T::to_cpu_storage_owned(forward(contiguous_slice::<T>(s, l, "geglu")?, f))
        });
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)?))
    }
}

struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = gl.dims()[gl.dims().len() - 1];
        let out = float_dispatch!(same_dtype(hs, gs, "geglu-grad")?, "geglu-grad", |T| {
            T::to_cpu_storage_owned(backward(
                contiguous_slice::<T>(hs, hl, "geglu")?,
                contiguous_slice::<T>(gs, gl, "geglu")?,
                f,
            ))
        });
        Ok((out, hl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::engine::rng::Rng;

    #[test]
    fn matches_the_composed_form_and_its_gradient() -> Result<()> {
        let mut rng = Rng::new(5);
        for dtype in [DType::F32, DType::F64] {
            let h = Var::from_tensor(&(rng.randn((2, 5, 12), &Device::Cpu)? * 2.0)?.to_dtype(dtype)?)?;
            let probe = rng.randn((2, 5, 6), &Device::Cpu)?.to_dtype(dtype)?;
            let ours = geglu(&h)?;
            let theirs = geglu_reference(&h)?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                Ok((a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
            };
            assert!(diff(&ours, &theirs)? < 1e-5, "{dtype:?} values");
            let g1 = (ours * &probe)?.sum_all()?.backward()?;
            let g2 = (theirs * &probe)?.sum_all()?.backward()?;
            // candle's gelu derivative rounds 1/√(2π) to 0.398942: agreement to ~1e-6.
            let d = diff(g1.get(&h).unwrap(), g2.get(&h).unwrap())?;
            assert!(d < 1e-5, "{dtype:?} gradient differs by {d}");
        }
        Ok(())
    }
}
