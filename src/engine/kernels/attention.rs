//! Scaled dot-product attention. On the CPU (f32 and f64) it is one fused op: per head, two GEMMs
//! and a softmax read straight from the `(batch, tokens, heads·dim)` layout, and a backward pass
//! that recomputes the probabilities of large layers instead of keeping them (as flash attention
//! does), so training holds no big `tokens × tokens` tensor. Elsewhere it is composed from candle ops.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;

use crate::engine::Result;
use crate::engine::kernels::cpu::{
    Shared, contiguous_slice, cpu_float, float_dispatch, for_each_item, gemm, split_threads, with_cpu_slices,
};

/// Attention over `(batch, tokens, heads·head_dim)` queries and `(batch, keys, heads·head_dim)`
/// keys and values; `causal` hides later keys from each query (CLIP's text encoder).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let (kb, m, k_inner) = k.dims3()?;
    if kb != b || k_inner != inner || v.dims3()? != (b, m, inner) || heads == 0 || !inner.is_multiple_of(heads) {
        anyhow::bail!("attention: q {:?}, k {:?}, v {:?} with {heads} heads do not fit", q.dims(), k.dims(), v.dims());
    }
    if causal && m != n {
        anyhow::bail!("attention: a causal mask needs as many keys as queries ({m} vs {n})");
    }
    crate::engine::kernels::flops::attention(b * heads, n, m, inner / heads);
    let fusable = cpu_float(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if !fusable {
        return attention_reference(q, k, v, heads, causal);
    }
    let probabilities_bytes = b * heads * n * m * q.dtype().size_in_bytes();
    let keep = (q.track_op() || k.track_op() || v.track_op()) && probabilities_bytes <= KEEP_PROBABILITIES_BYTES;
    fused(q, k, v, heads, causal, keep)
}

/// The fused op; `keep` stores the probabilities for the backward instead of recomputing them.
fn fused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, keep: bool) -> Result<Tensor> {
    let inner = q.dim(2)?;
    let op = FusedAttention {
        heads,
        causal,
        scale: 1.0 / ((inner / heads) as f64).sqrt(),
        kept: keep.then(|| std::sync::Mutex::new(None)),
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The same attention composed from candle ops (heads split by transposes, `softmax` from
/// differentiable pieces): the fallback off the CPU, and the reference the fused op is tested
/// against.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let head_dim = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, head_dim))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if causal {
        let mask: Vec<f32> = (0..n).flat_map(|i| (0..m).map(move |j| if j > i { -1e9 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (n, m), q.device())?.to_dtype(q.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    // candle_nn::ops::softmax is composed of differentiable ops; softmax_last_dim is not.
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))?)
}

/// Training keeps a layer's probabilities from the forward pass when they take at most this much
/// (small models, where recomputing them cost more than the memory: about a tenth of a `tiny`
/// LoRA step); larger layers (SD-sized self-attention) recompute them in the backward.
const KEEP_PROBABILITIES_BYTES: usize = 16 << 20;

struct FusedAttention {
    heads: usize,
    causal: bool,
    scale: f64,
    /// `Some` when the forward keeps the probabilities, `(batch, heads, queries, keys)`.
    kept: Option<std::sync::Mutex<Option<CpuStorage>>>,
}

/// Sizes of one call: batch, queries, keys, heads, head dim.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    m: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn inner(&self) -> usize {
        self.heads * self.d
    }
    /// Query rows per block: the scores block stays around 256 KiB whatever the key count.
    fn rows(&self) -> usize {
        (65_536 / self.m.max(1)).max(16).min(self.n.max(1))
    }
    /// Offset of head `h` of batch item `b` in a `(batch, len, heads·dim)` buffer.
    fn head(&self, b: usize, len: usize, h: usize) -> usize {
        b * len * self.inner() + h * self.d
    }
}

/// Softmax of each row of `s` (`rows × m`, row-major) in place; in causal mode row `r` is query
/// `first + r` and sees keys `0..=first + r` only.
fn softmax_rows<T: Real>(s: &mut [T], m: usize, first: usize, causal: bool) {
    for (r, row) in s.chunks_exact_mut(m).enumerate() {
        let visible = if causal { (first + r + 1).min(m) } else { m };
        let (seen, hidden) = row.split_at_mut(visible);
        let sum = T::exp_shifted(seen, T::max_of(seen));
        let inv = T::one() / sum;
        seen.iter_mut().for_each(|x| *x *= inv);
        hidden.iter_mut().for_each(|x| *x = T::zero());
    }
}

/// The element types the fused op runs in, with the two softmax loops that dominate its own time
/// (the rest is GEMM).
pub trait Real: 'static + Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync + WithDType {
    fn max_of(xs: &[Self]) -> Self {
        xs.iter().fold(Self::neg_infinity(), |a, &x| Float::max(a, x))
    }
    /// `x ← exp(x − max)` for each element; returns the sum.
    fn exp_shifted(xs: &mut [Self], max: Self) -> Self {
        let mut sum = Self::zero();
        for x in xs {
            *x = Float::exp(*x - max);
            sum += *x;
        }
        sum
    }
}

impl Real for f64 {}

impl Real for f32 {
    fn max_of(xs: &[f32]) -> f32 {
        // Eight independent lanes (a compare-and-select the compiler vectorises); f32::max's NaN
        // rules keep a plain fold scalar.
        let mut lanes = [f32::NEG_INFINITY; 8];
        let chunks = xs.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = if x > *l { x } else { *l };
            }
        }
        tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a })
    }

    fn exp_shifted(xs: &mut [f32], max: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { exp_shifted_avx2(xs, max) };
        }
        exp_shifted_f32(xs, max)
    }
}

/// `exp_shifted_f32` in AVX2 + FMA intrinsics, the same Cephes steps. Written out because the
/// compiler kept the portable form scalar (`as i32` saturates, `clamp` minds NaNs): 17 % of a
/// LoRA step on the `tiny` UNet went there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm256_set1_ps(v);
    let (hi, lo, max8) = (c(88.3), c(-87.3), c(max));
    let mut acc = _mm256_setzero_ps();
    let mut chunks = xs.chunks_exact_mut(8);
    for ch in &mut chunks {
        // SAFETY: `ch` holds exactly eight f32s; unaligned loads and stores.
        unsafe {
            let x = _mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), max8);
            let x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
            let n = _mm256_floor_ps(_mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(0.5)));
            let r = _mm256_fmadd_ps(n, c(2.121_944_4e-4), _mm256_fnmadd_ps(n, c(0.693_359_4), x));
            let mut p = _mm256_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
            p = _mm256_fmadd_ps(p, r, c(8.333_452e-3));
            p = _mm256_fmadd_ps(p, r, c(4.166_579_6e-2));
            p = _mm256_fmadd_ps(p, r, c(1.666_666_5e-1));
            p = _mm256_fmadd_ps(p, r, c(0.5));
            let y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), c(1.0));
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            let e = _mm256_mul_ps(y, pow2);
            _mm256_storeu_ps(ch.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32s.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    let tail = chunks.into_remainder();
    sum += exp_shifted_f32(tail, max);
    sum
}

/// `exp` as Cephes' `expf` computes it (range reduction by ln 2, a degree-5 polynomial, the
/// exponent put back in the float's bits; relative error ~2e-7), written over eight lanes so it
/// vectorises, unlike libm's scalar `expf` (8 % of a LoRA training step when it was used here).
#[inline(always)]
fn exp_shifted_f32(xs: &mut [f32], max: f32) -> f32 {
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        let x = x.clamp(-87.3, 88.3);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let y = (p * r * r) + r + 1.0;
        y * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - max);
            *l += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    sum
}

impl FusedAttention {
    fn dims(&self, q: &Layout, k: &Layout) -> Dims {
        let (b, n, inner) = (q.dims()[0], q.dims()[1], q.dims()[2]);
        Dims { b, n, m: k.dims()[1], heads: self.heads, d: inner / self.heads }
    }

    /// Scores block `S = scale · Q[rows] · Kᵀ` for one head, softmaxed, written in full to `s`
    /// (`rows × m`, which may be uninitialised).
    ///
    /// # Safety
    /// `q` and `k` must be the head's base pointers inside buffers of the sizes in `dims`; `s`
    /// must be valid for `rows × m` writes that nothing else touches.
    unsafe fn probabilities<T: Real>(
        &self,
        dims: Dims,
        (q, k): (*const T, *const T),
        (first, rows): (usize, usize),
        s: *mut T,
        threads: usize,
    ) {
        let ld = dims.inner() as isize;
        let scale = T::from(self.scale).unwrap();
        unsafe {
            gemm(
                (rows, dims.m, dims.d),
                (s, dims.m as isize, 1),
                false,
                (q.add(first * dims.inner()), ld, 1),
                (k, 1, ld),
                scale,
                threads,
            );
        }
        // SAFETY: the GEMM above wrote all `rows × m` elements.
        softmax_rows(unsafe { std::slice::from_raw_parts_mut(s, rows * dims.m) }, dims.m, first, self.causal);
    }

    /// The output, and the probabilities when `self.kept` asks for them.
    fn forward<T: Real>(&self, dims: Dims, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Option<Vec<T>>) {
        let kept_len = dims.b * dims.heads * dims.n * dims.m;
        if dims.m == 0 || dims.d == 0 {
            // No key to attend to: the GEMMs below would write nothing.
            return (vec![T::zero(); q.len()], self.kept.as_ref().map(|_| vec![T::zero(); kept_len]));
        }
        // Filled in full by the loop below (every query row of every head), so not zeroed first.
        let mut out = Vec::with_capacity(q.len());
        let dst = Shared(out.as_mut_ptr());
        let mut kept = self.kept.as_ref().map(|_| Vec::with_capacity(kept_len));
        let kept_at = kept.as_mut().map(|p: &mut Vec<T>| Shared(p.as_mut_ptr()));
        let rows = dims.rows();
        let blocks = dims.n.div_ceil(rows);
        let items = dims.b * dims.heads * blocks;
        let (parallel, threads) = split_threads(items);
        let ld = dims.inner() as isize;
        for_each_item(items, parallel, |item| {
            let (bh, block) = (item / blocks, item % blocks);
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let first = block * rows;
            let r = rows.min(dims.n - first);
            let mut scratch = Vec::new();
            let s: *mut T = match kept_at {
                // SAFETY: rows `first..first + r` of head (b, h) in the (b, heads, n, m) buffer,
                // written by this item alone.
                Some(p) => unsafe { p.at((bh * dims.n + first) * dims.m) },
                None => {
                    scratch.reserve_exact(r * dims.m);
                    scratch.as_mut_ptr()
                }
            };
            // SAFETY: the offsets stay inside the (b, len, heads·d) buffers; each item writes its
            // own rows of its own head.
            unsafe {
                let (qh, kh, vh) = (
                    q.as_ptr().add(dims.head(b, dims.n, h)),
                    k.as_ptr().add(dims.head(b, dims.m, h)),
                    v.as_ptr().add(dims.head(b, dims.m, h)),
                );
                self.probabilities(dims, (qh, kh), (first, r), s, threads);
                let o = dst.at(dims.head(b, dims.n, h) + first * dims.inner());
                gemm((r, dims.d, dims.m), (o, ld, 1), false, (s, dims.m as isize, 1), (vh, ld, 1), T::one(), threads);
            }
        });
        // SAFETY: the loop wrote every element of both (through raw pointers).
        unsafe {
            out.set_len(q.len());
            if let Some(p) = kept.as_mut() {
                p.set_len(kept_len);
            }
        }
        (out, kept)
    }

    /// Gradients of q, k, v from the output `o` and its gradient `g`; the probabilities are
    /// recomputed unless the forward `kept` them.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(
        &self,
        dims: Dims,
        (q, k, v): (&[T], &[T], &[T]),
        o: &[T],
        g: &[T],
        kept: Option<&[T]>,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        if dims.n == 0 || dims.m == 0 || dims.d == 0 {
            return (vec![T::zero(); q.len()], vec![T::zero(); k.len()], vec![T::zero(); v.len()]);
        }
        // Filled in full below (dQ by each block, dK and dV by the first), so not zeroed first.
        let (mut dq, mut dk, mut dv) =
            (Vec::with_capacity(q.len()), Vec::with_capacity(k.len()), Vec::with_capacity(v.len()));
        let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        let rows = dims.rows();
        let blocks = dims.n.div_ceil(rows);
        // dK and dV sum over every query block, so one item is a whole head.
        let items = dims.b * dims.heads;
        let (parallel, threads) = split_threads(items);
        let (ld, m) = (dims.inner() as isize, dims.m as isize);
        let scale = T::from(self.scale).unwrap();
        for_each_item(items, parallel, |bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let (qo, ko) = (dims.head(b, dims.n, h), dims.head(b, dims.m, h));
            let mut scratch: Vec<T> = Vec::with_capacity(if kept.is_none() { rows * dims.m } else { 0 });
            let mut dp = vec![T::zero(); rows * dims.m];
            for block in 0..blocks {
                let first = block * rows;
                let r = rows.min(dims.n - first);
                let dp = &mut dp[..r * dims.m];
                let row0 = first * dims.inner();
                // SAFETY: offsets stay inside their buffers; each item writes only its own head.
                unsafe {
                    let (qh, kh, vh) = (q.as_ptr().add(qo), k.as_ptr().add(ko), v.as_ptr().add(ko));
                    let gh = g.as_ptr().add(qo + row0);
                    let p: &[T] = match kept {
                        Some(all) => &all[(bh * dims.n + first) * dims.m..][..r * dims.m],
                        None => {
                            self.probabilities(dims, (qh, kh), (first, r), scratch.as_mut_ptr(), threads);
                            std::slice::from_raw_parts(scratch.as_ptr(), r * dims.m)
                        }
                    };
                    // dP = dO · Vᵀ
                    gemm(
                        (r, dims.m, dims.d),
                        (dp.as_mut_ptr(), m, 1),
                        false,
                        (gh, ld, 1),
                        (vh, 1, ld),
                        T::one(),
                        threads,
                    );
                    // dS = P ⊙ (dP − rowsum(dO ⊙ O)), in place of dP.
                    for i in 0..r {
                        let at = qo + row0 + i * dims.inner();
                        let delta = (0..dims.d).fold(T::zero(), |acc, c| acc + g[at + c] * o[at + c]);
                        let (pr, dr) = (&p[i * dims.m..(i + 1) * dims.m], &mut dp[i * dims.m..(i + 1) * dims.m]);
                        for (x, &pj) in dr.iter_mut().zip(pr) {
                            *x = pj * (*x - delta);
                        }
                    }
                    let acc = block > 0;
                    // dV += Pᵀ · dO
                    gemm(
                        (dims.m, dims.d, r),
                        (dv_p.at(ko), ld, 1),
                        acc,
                        (p.as_ptr(), 1, m),
                        (gh, ld, 1),
                        T::one(),
                        threads,
                    );
                    // dQ[rows] = scale · dS · K
                    gemm(
                        (r, dims.d, dims.m),
                        (dq_p.at(qo + row0), ld, 1),
                        false,
                        (dp.as_ptr(), m, 1),
                        (kh, ld, 1),
                        scale,
                        threads,
                    );
                    // dK += scale · dSᵀ · Q[rows]
                    gemm(
                        (dims.m, dims.d, r),
                        (dk_p.at(ko), ld, 1),
                        acc,
                        (dp.as_ptr(), 1, m),
                        (qh.add(row0), ld, 1),
                        scale,
                        threads,
                    );
                }
            }
        });
        // SAFETY: the loop wrote every element of all three (through raw pointers).
        unsafe {
            dq.set_len(q.len());
            dk.set_len(k.len());
            dv.set_len(v.len());
        }
        (dq, dk, dv)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2);
        let name = "fused attention";
        let (storage, kept) = float_dispatch!(s1.dtype(), name, |T| {
            let (out, kept) = self.forward(
                dims,
                contiguous_slice::<T>(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
            );
            (T::to_cpu_storage_owned(out), kept.map(T::to_cpu_storage_owned))
        });
        if let (Some(slot), Some(kept)) = (&self.kept, kept) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        }
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o, g) =
            (q.contiguous()?, k.contiguous()?, v.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let dims = Dims { b: q.dim(0)?, n: q.dim(1)?, m: k.dim(1)?, heads: self.heads, d: q.dim(2)? / self.heads };
        let (dq, dk, dv) = float_dispatch!(q.dtype(), "fused attention", |T| {
            let kept = self.kept.as_ref().map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()));
            let kept = match kept.as_deref() {
                Some(Some(p)) => Some(p.as_slice::<T>()?),
                _ => None,
            };
            let (dq, dk, dv) =
                with_cpu_slices::<T, _, 5>([&q, &k, &v, &o, &g], "fused attention", |[q, k, v, o, g]| {
                    self.backward(dims, (q, k, v), o, g, kept)
                })?;
            let dev = q.device();
            (
                Tensor::from_vec(dq, q.shape(), dev)?,
                Tensor::from_vec(dk, k.shape(), dev)?,
                Tensor::from_vec(dv, v.shape(), dev)?,
            )
        });
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::engine::rng::Rng::new(seed);
        let n = shape.0 * shape.1 * shape.2;
        let mut v = vec![0f32; n];
        rng.fill_normal(&mut v);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn vectorised_softmax_pieces_match_libm() {
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.377).sin() * 40.0 - 30.0).collect();
        let max = <f32 as Real>::max_of(&xs);
        assert_eq!(max, xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut ys = xs.clone();
        let sum = <f32 as Real>::exp_shifted(&mut ys, max);
        let mut want = 0f64;
        for (x, y) in xs.iter().zip(&ys) {
            let e = ((*x - max) as f64).exp();
            want += e;
            assert!((*y as f64 - e).abs() <= 3e-7 * e + 1e-38, "exp({}) = {y}, want {e}", x - max);
        }
        assert!((sum as f64 - want).abs() < 1e-5 * want);
    }

    /// Values and all three gradients agree with the composed reference: self- and cross-attention,
    /// several heads, a causal mask, and more queries than one row block.
    #[test]
    fn fused_attention_matches_the_composed_reference() {
        for &(b, n, m, heads, d, causal) in
            &[(2, 7, 7, 2, 8, true), (2, 300, 77, 4, 10, false), (1, 1100, 1100, 1, 8, false), (3, 16, 5, 1, 3, false)]
        {
            let q = Var::from_tensor(&random((b, n, heads * d), 1)).unwrap();
            let k = Var::from_tensor(&random((b, m, heads * d), 2)).unwrap();
            let v = Var::from_tensor(&random((b, m, heads * d), 3)).unwrap();
            let probe = random((b, n, heads * d), 4);
            for keep in [true, false] {
                let fused = fused(&q, &k, &v, heads, causal, keep).unwrap();
                let reference = attention_reference(&q, &k, &v, heads, causal).unwrap();
                assert!(max_diff(&fused, &reference) < 1e-4, "forward {:?}", (b, n, m, heads, d, causal));
                let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (a, r) = (gf.get(var).unwrap(), gr.get(var).unwrap());
                    let scale =
                        r.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
                    assert!(
                        max_diff(a, r) / scale < 1e-4,
                        "d{name} {:?}: {}",
                        (b, n, m, heads, d, causal, keep),
                        max_diff(a, r)
                    );
                }
            }
        }
    }
}
