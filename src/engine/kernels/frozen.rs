//! Ops whose second operand is frozen (a base weight, a bias, a norm's scale and shift, a time
//! embedding), fast to train through on the CPU. candle 0.11.1's backward computes and keeps a
//! gradient for every operand of a matmul or broadcast op, wanted or not: a weight-sized GEMM for
//! each frozen linear, and for each bias add a zero-filled activation-sized buffer plus an add.
//! Here the backward returns the input's gradient alone; the forward fuses the bias (or the scale
//! and shift) into one pass. Anything else (a trained operand, another device or dtype, an odd
//! broadcast) takes candle's own ops.

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::engine::Result;
use crate::engine::kernels::cpu::{
    Shared, Widen, contiguous_slice, cpu_float, float_dispatch, for_each_item, from_vec_narrowed, gemm, is_half,
    split_threads, to_vec_widened, with_cpu_data, with_cpu_slices, with_frozen_rows,
};

/// Elements below which the element-wise pass runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// `x · Wᵀ + b` over the last dimension of `x`, for W (out, in).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let inp = *dims.last().expect("linear: a scalar input");
    let out = w.dim(0)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap() = out;
    if !fast_linear(x, w, bias, inp) {
        let y = autocast(x, w, |x, w| x.reshape((x.elem_count() / inp, inp))?.matmul(&w.t()?)?.reshape(shape))?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let op = FrozenLinear { weight: w.contiguous()?, bias: contiguous(bias)?, channels_first: false };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// A 1×1 convolution as a matmul, `W · x[b] + b` for x (B, in, H, W) and W (out, in[, 1, 1]).
pub fn pointwise(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let out = w.dim(0)?;
    let w = w.reshape((out, c))?;
    if !fast_linear(x, &w, bias, c) {
        let y = autocast(x, &w, |x, w| w.broadcast_matmul(&x.reshape((b, c, h * wd))?)?.reshape((b, out, h, wd)))?;
        return Ok(match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, out, 1, 1))?)?,
            None => y,
        });
    }
    let op = FrozenLinear { weight: w.contiguous()?, bias: contiguous(bias)?, channels_first: true };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `op(x, w)` off our CPU kernels, for a weight `w` perhaps stored in half precision: then `x` is
/// cast to it and the product comes back in `x`'s dtype (autocast, as torch's: on a GPU the GEMM
/// runs on the half-precision units, while everything around it, and the gradient `x` receives, stays in
/// `x`'s dtype). Otherwise `w` is cast to `x`'s dtype (a no-op when they agree).
pub(crate) fn autocast(
    x: &Tensor,
    w: &Tensor,
    op: impl FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    // candle's CPU backend has no bf16 GEMM: there a bf16 weight is widened instead.
    let half_gemm = !(w.device().is_cpu() && w.dtype() == candle_core::DType::BF16);
    if is_half(w) && !is_half(x) && !w.track_op() && half_gemm {
        return op(&x.to_dtype(w.dtype())?, w)?.to_dtype(x.dtype());
    }
    op(x, &w.to_dtype(x.dtype())?)
}

/// `W + U·D` stored like W, for a frozen weight W (out, …) perhaps stored in half precision, U
/// (out, r) and D (r, the rest of W's size), summed in U's dtype: the merge of low-rank adapters
/// into a layer. On the CPU one GEMM accumulates onto a (widened) copy of W, so the only
/// weight-sized buffer made is the result; elsewhere candle's ops.
pub fn plus_low_rank(w: &Tensor, u: &Tensor, d: &Tensor) -> Result<Tensor> {
    let (out, r) = u.dims2()?;
    let (dr, rest) = d.dims2()?;
    let fits = dr == r && w.dim(0)? == out && w.elem_count() == out * rest;
    let kernel = fits && cpu_float(u) && d.dtype() == u.dtype() && w.device().is_cpu();
    if !kernel || !(w.dtype() == u.dtype() || is_half(w)) {
        let w2 = w.to_dtype(u.dtype())?.reshape((out, rest))?;
        return Ok((w2 + u.matmul(d)?)?.reshape(w.shape())?.to_dtype(w.dtype())?);
    }
    let (u, d) = (u.contiguous()?, d.contiguous()?);
    let name = "plus-low-rank";
    let run = || -> candle_core::Result<Tensor> {
        float_dispatch!(u.dtype(), name, |T| {
            let mut sum: Vec<T> = to_vec_widened(w)?;
            with_cpu_slices::<T, _, 2>([&u, &d], name, |[u, d]| {
                let threads = candle_core::utils::get_num_threads().max(1);
                // SAFETY: `sum` is (out, rest), U (out, r) and D (r, rest), all contiguous and
                // row-major; `sum` is ours alone.
                unsafe {
                    gemm(
                        (out, rest, r),
                        (sum.as_mut_ptr(), rest as isize, 1),
                        true,
                        (u.as_ptr(), r as isize, 1),
                        (d.as_ptr(), rest as isize, 1),
                        1.0,
                        threads,
                    )
                }
            })?;
            from_vec_narrowed(sum, w.dtype(), w.shape(), w.device())
        })
    };
    Ok(run()?)
}

/// Whether `linear`/`pointwise` can take the frozen path: W (out, `inp`) and the bias untrained;
/// W in `x`'s dtype or stored in half precision (widened inside the op).
fn fast_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, inp: usize) -> bool {
    let out = w.dims()[0];
    let frozen = !w.track_op() && bias.is_none_or(|b| !b.track_op());
    let bias_fits = bias.is_none_or(|b| b.dims() == [out] && b.dtype() == x.dtype());
    let weight_fits = (w.dtype() == x.dtype() || is_half(w)) && w.device().same_device(x.device());
    frozen && bias_fits && fast_kind(x) && weight_fits && w.dims() == [out, inp]
}

fn contiguous(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(t.map(|t| t.contiguous()).transpose()?)
}

/// `x · scale + shift`, with `scale` and `shift` (either may be absent) broadcast to `x`'s shape.
pub fn affine(x: &Tensor, scale: Option<&Tensor>, shift: Option<&Tensor>) -> Result<Tensor> {
    let pattern = |c: Option<&Tensor>| c.map(|c| Broadcast::of(x.dims(), c.dims()));
    let (ps, pt) = (pattern(scale), pattern(shift));
    let frozen = scale.is_none_or(|c| !c.track_op()) && shift.is_none_or(|c| !c.track_op());
    let same_dtype = [scale, shift].iter().flatten().all(|c| c.dtype() == x.dtype());
    let broadcast = match (ps, pt) {
        (Some(Some(a)), Some(Some(b))) if a == b => Some(a),
        (Some(Some(a)), None) | (None, Some(Some(a))) => Some(a),
        (None, None) => return Ok(x.clone()),
        _ => None,
    };
    let Some(broadcast) = broadcast.filter(|_| frozen && same_dtype && fast_kind(x)) else {
        let y = match scale {
            Some(s) => x.broadcast_mul(s)?,
            None => x.clone(),
        };
        return Ok(match shift {
            Some(t) => y.broadcast_add(t)?,
            None => y,
        });
    };
    let flat = |c: Option<&Tensor>| c.map(|c| c.flatten_all()?.contiguous()).transpose();
    let op = FrozenAffine { scale: flat(scale)?, shift: flat(shift)?, broadcast };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `x + c`, `c` broadcast (a bias, a time embedding).
pub fn add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    affine(x, None, Some(c))
}

/// f32/f64 on the CPU, and not empty (the kernels split the data into non-empty blocks).
fn fast_kind(x: &Tensor) -> bool {
    cpu_float(x) && x.elem_count() > 0
}

/// `y = x·Wᵀ + b` on rows of `x`, or with `channels_first` `y[b] = W·x[b] + b` on (B, in, S).
struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    channels_first: bool,
}

impl FrozenLinear {
    /// `x` holds `items` rows of `inp` (channels last), or `items` (in, `plane`) blocks.
    fn run<T: Widen>(&self, x: &[T], items: usize, plane: usize) -> candle_core::Result<Vec<T>> {
        let (out, inp) = self.weight.dims2()?;
        let len = items * out * plane;
        let mut y = if self.bias.is_some() { vec![T::zero(); len] } else { Vec::with_capacity(len) };
        if let Some(b) = &self.bias {
            with_cpu_data::<T, _>(b, |b| {
                if self.channels_first {
                    for (o, row) in y.chunks_exact_mut(plane).enumerate() {
                        row.fill(b[o % out]);
                    }
                } else {
                    y.chunks_exact_mut(out).for_each(|row| row.copy_from_slice(b));
                }
            })?;
        }
        let accumulate = self.bias.is_some();
        let dst = Shared(y.as_mut_ptr());
        with_frozen_rows::<T, _>(&self.weight, |w| {
            // Output features `first..first + n` from rows `first..` of W (all of them at once
            // unless W is widened from half precision block by block).
            w.for_each_block(inp, |first, w| {
                let n = w.len() / inp;
                if !self.channels_first {
                    let threads = candle_core::utils::get_num_threads().max(1);
                    // SAFETY: x is (items, in), this block of W is (n, in) read as its transpose,
                    // and it writes columns first..first+n of y (items, out); all distinct.
                    unsafe {
                        gemm(
                            (items, n, inp),
                            (dst.at(first), out as isize, 1),
                            accumulate,
                            (x.as_ptr(), inp as isize, 1),
                            (w.as_ptr(), 1, inp as isize),
                            T::one(),
                            threads,
                        )
                    }
                    return;
                }
                let (parallel, threads) = split_threads(items);
                for_each_item(items, parallel, |i| {
                    // SAFETY: item i writes rows first..first+n of its own (out, plane) block of
                    // y; this block of W is (n, in) and x's block i is (in, plane), all contiguous.
                    unsafe {
                        gemm(
                            (n, plane, inp),
                            (dst.at(i * out * plane + first * plane), plane as isize, 1),
                            accumulate,
                            (w.as_ptr(), inp as isize, 1),
                            (x.as_ptr().add(i * inp * plane), plane as isize, 1),
                            T::one(),
                            threads,
                        )
                    }
                });
            })
        })?;
        // SAFETY: the GEMMs above wrote all `len` elements (through raw pointers: no reference
        // to uninitialised memory was made).
        unsafe { y.set_len(len) };
        Ok(y)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.weight.dim(0)?;
        let mut dims = l.dims().to_vec();
        let (items, plane) = if self.channels_first {
            dims[1] = out;
            (dims[0], dims[2..].iter().product())
        } else {
            let rows = dims[..dims.len() - 1].iter().product();
            *dims.last_mut().unwrap() = out;
            (rows, 1)
        };
        let y = float_dispatch!(s.dtype(), self.name(), |T| {
            T::to_cpu_storage_owned(self.run(contiguous_slice::<T>(s, l, self.name())?, items, plane)?)
        });
        Ok((y, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        let gx = if self.channels_first {
            // Wᵀ·g[b] per image through the same op (candle's broadcast_matmul copies W per image).
            let op = FrozenLinear { weight: self.weight.t()?.contiguous()?, bias: None, channels_first: true };
            grad.contiguous()?.apply_op1_no_bwd(&op)?
        } else {
            let grad = grad.reshape((grad.elem_count() / out, out))?;
            if is_half(&self.weight) { input_gradient(&grad, &self.weight)? } else { grad.matmul(&self.weight)? }
        };
        Ok(Some(gx.reshape(x.shape())?))
    }
}

/// `g · W` for g (rows, out) and a half-precision W (out, in), widened block by block: the input
/// gradient of a linear layer whose weight is kept in half precision.
fn input_gradient(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, out), inp) = (g.dims2()?, w.dim(1)?);
    let g = g.contiguous()?;
    float_dispatch!(g.dtype(), "frozen-linear backward", |T| {
        let gx = with_cpu_data::<T, _>(&g, |g| {
            with_frozen_rows::<T, _>(w, |w| gemm_rows_by_frozen(g, (rows, out, inp), &w))
        })??;
        Tensor::from_vec(gx, (rows, inp), g.device())
    })
}

/// `g · W` for g (rows, out) and a frozen W (out, in): a new (rows, in) buffer.
fn gemm_rows_by_frozen<T: Widen>(
    g: &[T],
    (rows, out, inp): (usize, usize, usize),
    w: &crate::engine::kernels::cpu::FrozenRows<'_, T>,
) -> Vec<T> {
    let threads = candle_core::utils::get_num_threads().max(1);
    // SAFETY: g is (rows, out); each block of W holds rows first..first+n (n, in); gx (rows, in)
    // is written in full by the first block's GEMM and accumulated into by the others.
    unsafe {
        written(rows * inp, |gx| {
            w.for_each_block(inp, |first, w| {
                let n = w.len() / inp;
                gemm(
                    (rows, inp, n),
                    (gx, inp as isize, 1),
                    first > 0,
                    (g.as_ptr().add(first), out as isize, 1),
                    (w.as_ptr(), inp as isize, 1),
                    T::one(),
                    threads,
                )
            })
        })
    }
}

/// `x · Wᵀ + b + c · (x · Aᵀ) · Bᵀ`: a frozen linear layer with one LoRA (down A (r, in), up
/// B (out, r)) in a single op. Composed from candle ops, the branch costs three output-sized
/// tensors forward (up-projection, scaled, sum) and as many zero-filled gradient buffers and
/// adds backward; at the small widths of attention layers those passes cost more than the GEMMs.
/// `None` when the fused path does not apply (the caller composes the layer itself).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    down: &Tensor,
    up: &Tensor,
    c: f64,
) -> Result<Option<Tensor>> {
    let inp = *x.dims().last().expect("lora_linear: a scalar input");
    let r = down.dim(0)?;
    // Every size non-zero: the kernels write their outputs through GEMMs alone.
    let fits = fast_linear(x, w, bias, inp)
        && r > 0
        && inp > 0
        && w.dim(0)? > 0
        && down.dims() == [r, inp]
        && up.dims() == [w.dim(0)?, r]
        && down.dtype() == x.dtype()
        && up.dtype() == x.dtype();
    if !fits {
        return Ok(None);
    }
    let op = FrozenLora { weight: w.contiguous()?, bias: contiguous(bias)?, coefficient: c };
    Ok(Some(x.contiguous()?.apply_op3(&down.contiguous()?, &up.contiguous()?, op)?))
}

struct FrozenLora {
    weight: Tensor,
    bias: Option<Tensor>,
    coefficient: f64,
}

/// Sizes of one `FrozenLora` call: `rows` of `inp` in, `out` out, rank `r`.
#[derive(Clone, Copy)]
struct LoraDims {
    rows: usize,
    inp: usize,
    out: usize,
    r: usize,
}

/// A vector of `len` elements that `fill` writes in full through the pointer it is given.
///
/// # Safety
/// `fill` must write every element.
unsafe fn written<T>(len: usize, fill: impl FnOnce(*mut T)) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: the caller's `fill` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

impl FrozenLora {
    fn dims(&self, x: &Layout, down: &Layout) -> LoraDims {
        let inp = *x.dims().last().unwrap_or(&0);
        LoraDims { rows: x.shape().elem_count() / inp.max(1), inp, out: self.weight.dims()[0], r: down.dims()[0] }
    }

    /// `x·Aᵀ` (rows, r): what the up-projection sees, recomputed in the backward (it is small).
    fn hidden<T: WithDType + Float>(d: LoraDims, x: &[T], a: &[T], threads: usize) -> Vec<T> {
        // SAFETY: x is (rows, in), A (r, in) read as Aᵀ, h (rows, r) written in full.
        unsafe {
            written(d.rows * d.r, |h| {
                gemm(
                    (d.rows, d.r, d.inp),
                    (h, d.r as isize, 1),
                    false,
                    (x.as_ptr(), d.inp as isize, 1),
                    (a.as_ptr(), 1, d.inp as isize),
                    T::one(),
                    threads,
                )
            })
        }
    }

    fn forward<T: Widen>(&self, d: LoraDims, x: &[T], a: &[T], b: &[T]) -> candle_core::Result<Vec<T>> {
        let threads = candle_core::utils::get_num_threads().max(1);
        let c = T::from(self.coefficient).expect("a finite coefficient");
        let h = Self::hidden(d, x, a, threads);
        let mut y = match &self.bias {
            Some(bias) => with_cpu_data::<T, _>(bias, |bias| bias.repeat(d.rows))?,
            None => Vec::with_capacity(d.rows * d.out),
        };
        let accumulate = self.bias.is_some();
        with_frozen_rows::<T, _>(&self.weight, |w| {
            let y = y.as_mut_ptr();
            // SAFETY: y is (rows, out); x (rows, in); each block of W (rows first..first+n of
            // (out, in)) read as its transpose writes columns first..first+n of y; h (rows, r);
            // B (out, r) read as Bᵀ. The blocks write all of y (or add to the bias rows), the
            // last GEMM adds.
            unsafe {
                w.for_each_block(d.inp, |first, w| {
                    gemm(
                        (d.rows, w.len() / d.inp, d.inp),
                        (y.add(first), d.out as isize, 1),
                        accumulate,
                        (x.as_ptr(), d.inp as isize, 1),
                        (w.as_ptr(), 1, d.inp as isize),
                        T::one(),
                        threads,
                    )
                });
                gemm(
                    (d.rows, d.out, d.r),
                    (y, d.out as isize, 1),
                    true,
                    (h.as_ptr(), d.r as isize, 1),
                    (b.as_ptr(), 1, d.r as isize),
                    c,
                    threads,
                );
            }
        })?;
        // SAFETY: written in full above (the bias rows, or the first GEMM without accumulation).
        unsafe { y.set_len(d.rows * d.out) };
        Ok(y)
    }

    /// Gradients of x, A and B from the output's gradient `g` (rows, out).
    #[allow(clippy::type_complexity)]
    fn backward<T: Widen>(
        &self,
        d: LoraDims,
        x: &[T],
        a: &[T],
        b: &[T],
        g: &[T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let threads = candle_core::utils::get_num_threads().max(1);
        let c = T::from(self.coefficient).expect("a finite coefficient");
        let (inp, out, r) = (d.inp as isize, d.out as isize, d.r as isize);
        let h = Self::hidden(d, x, a, threads);
        // SAFETY (all GEMMs below): every view addresses its own contiguous buffer with the sizes
        // named; each output is written in full by its first GEMM.
        let gh = unsafe {
            written(d.rows * d.r, |gh| {
                gemm(
                    (d.rows, d.r, d.out),
                    (gh, r, 1),
                    false,
                    (g.as_ptr(), out, 1),
                    (b.as_ptr(), r, 1),
                    T::one(),
                    threads,
                )
            })
        };
        let mut gx = with_frozen_rows::<T, _>(&self.weight, |w| gemm_rows_by_frozen(g, (d.rows, d.out, d.inp), &w))?;
        unsafe {
            gemm(
                (d.rows, d.inp, d.r),
                (gx.as_mut_ptr(), inp, 1),
                true,
                (gh.as_ptr(), r, 1),
                (a.as_ptr(), inp, 1),
                c,
                threads,
            )
        };
        let ga = unsafe {
            written(d.r * d.inp, |ga| {
                gemm((d.r, d.inp, d.rows), (ga, inp, 1), false, (gh.as_ptr(), 1, r), (x.as_ptr(), inp, 1), c, threads)
            })
        };
        let gb = unsafe {
            written(d.out * d.r, |gb| {
                gemm((d.out, d.r, d.rows), (gb, r, 1), false, (g.as_ptr(), 1, out), (h.as_ptr(), r, 1), c, threads)
            })
        };
        Ok((gx, ga, gb))
    }
}

impl CustomOp3 for FrozenLora {
    fn name(&self) -> &'static str {
        "frozen-lora"
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
        let d = self.dims(l1, l2);
        let name = self.name();
        let y = float_dispatch!(s1.dtype(), name, |T| {
            T::to_cpu_storage_owned(self.forward(
                d,
                contiguous_slice::<T>(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
            )?)
        });
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().unwrap() = d.out;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, down, up, g) = (x.contiguous()?, down.contiguous()?, up.contiguous()?, grad.contiguous()?);
        let d = self.dims(x.layout(), down.layout());
        let dev = x.device();
        let (gx, ga, gb) = float_dispatch!(x.dtype(), self.name(), |T| {
            let (gx, ga, gb) = with_cpu_slices::<T, _, 4>([&x, &down, &up, &g], self.name(), |[x, a, b, g]| {
                self.backward(d, x, a, b, g)
            })??;
            (
                Tensor::from_vec(gx, x.shape(), dev)?,
                Tensor::from_vec(ga, down.shape(), dev)?,
                Tensor::from_vec(gb, up.shape(), dev)?,
            )
        });
        Ok((Some(gx), Some(ga), Some(gb)))
    }
}

/// How a broadcast operand lines up with the input: its elements, in order, are the input's
/// dimensions `j..=k`, so input element `i` takes operand element `(i / inner) % len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Broadcast {
    len: usize,
    inner: usize,
}

impl Broadcast {
    /// `None` when `c` varies along dimensions that are not one contiguous run of `x`'s.
    fn of(x: &[usize], c: &[usize]) -> Option<Self> {
        if c.len() > x.len() {
            return None;
        }
        let padded: Vec<usize> = std::iter::repeat_n(1, x.len() - c.len()).chain(c.iter().copied()).collect();
        let varying: Vec<usize> = (0..x.len()).filter(|&i| padded[i] != 1).collect();
        let (Some(&j), Some(&k)) = (varying.first(), varying.last()) else {
            return Some(Self { len: 1, inner: x.iter().product() });
        };
        if (j..=k).any(|i| padded[i] != x[i]) {
            return None;
        }
        Some(Self { len: x[j..=k].iter().product(), inner: x[k + 1..].iter().product() })
    }
}

struct FrozenAffine {
    scale: Option<Tensor>,
    shift: Option<Tensor>,
    broadcast: Broadcast,
}

/// `y = x·scale + shift` for one block of `len · inner` elements.
fn affine_block<T: Float>(y: &mut [T], x: &[T], scale: Option<&[T]>, shift: Option<&[T]>, inner: usize) {
    for (l, (ys, xs)) in y.chunks_exact_mut(inner).zip(x.chunks_exact(inner)).enumerate() {
        let s = scale.map_or(T::one(), |s| s[l]);
        let t = shift.map_or(T::zero(), |t| t[l]);
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = x * s + t;
        }
    }
}

impl FrozenAffine {
    fn run<T: WithDType + Float>(&self, x: &[T]) -> candle_core::Result<Vec<T>> {
        let data = |c: &Option<Tensor>| c.as_ref().map(|c| with_cpu_data::<T, _>(c, |d| d.to_vec())).transpose();
        let (scale, shift) = (data(&self.scale)?, data(&self.shift)?);
        let (scale, shift) = (scale.as_deref(), shift.as_deref());
        let Broadcast { len, inner } = self.broadcast;
        let mut y = vec![T::zero(); x.len()];
        let block = len * inner;
        if inner == 1 {
            // Along the last dimension: one row of `len` per block.
            let row = |(ys, xs): (&mut [T], &[T])| {
                for (i, (y, &x)) in ys.iter_mut().zip(xs).enumerate() {
                    *y = x * scale.map_or(T::one(), |s| s[i]) + shift.map_or(T::zero(), |t| t[i]);
                }
            };
            if x.len() >= PARALLEL_MIN {
                y.par_chunks_exact_mut(block).zip(x.par_chunks_exact(block)).for_each(row);
            } else {
                y.chunks_exact_mut(block).zip(x.chunks_exact(block)).for_each(row);
            }
        } else if x.len() >= PARALLEL_MIN {
            y.par_chunks_exact_mut(block)
                .zip(x.par_chunks_exact(block))
                .for_each(|(ys, xs)| affine_block(ys, xs, scale, shift, inner));
        } else {
            y.chunks_exact_mut(block)
                .zip(x.chunks_exact(block))
                .for_each(|(ys, xs)| affine_block(ys, xs, scale, shift, inner));
        }
        Ok(y)
    }
}

impl CustomOp1 for FrozenAffine {
    fn name(&self) -> &'static str {
        "frozen-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = float_dispatch!(s.dtype(), self.name(), |T| {
            T::to_cpu_storage_owned(self.run(contiguous_slice::<T>(s, l, self.name())?)?)
        });
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match &self.scale {
            None => Ok(Some(grad.clone())),
            Some(scale) => {
                let op = FrozenAffine { scale: Some(scale.clone()), shift: None, broadcast: self.broadcast };
                Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::engine::rng::Rng;

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn broadcast_patterns() {
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[1, 3, 1, 1]), Some(Broadcast { len: 3, inner: 20 }));
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some(Broadcast { len: 6, inner: 20 }));
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[5]), Some(Broadcast { len: 5, inner: 1 }));
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[3, 1, 1]), Some(Broadcast { len: 3, inner: 20 }));
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[1]), Some(Broadcast { len: 1, inner: 120 }));
        // Varies along dimensions 1 and 3 but not 2: not one run.
        assert_eq!(Broadcast::of(&[2, 3, 4, 5], &[3, 1, 5]), None);
        assert_eq!(Broadcast::of(&[2, 3], &[2, 3, 1]), None);
        // Empty inputs take candle's path instead of splitting into empty blocks.
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(add(&empty, &bias).unwrap().dims(), [0, 3]);
        assert_eq!(
            linear(&empty, &Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(), None).unwrap().dims(),
            [0, 2]
        );
    }

    /// Same values and input gradients as candle's ops; frozen operands get no gradient.
    #[test]
    fn match_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
            let x = Var::from_tensor(&rng.randn((2, 3, 4, 5), &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let probe = rng.randn((2, 3, 4, 7), &dev).unwrap().to_dtype(dtype).unwrap();
            let w = rng.randn((7, 5), &dev).unwrap().to_dtype(dtype).unwrap();
            let b = rng.randn(7, &dev).unwrap().to_dtype(dtype).unwrap();
            for bias in [None, Some(&b)] {
                let ours = linear(&x, &w, bias).unwrap();
                let mut theirs = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                if let Some(b) = bias {
                    theirs = theirs.broadcast_add(b).unwrap();
                }
                assert!(diff(&ours, &theirs) < tol);
                let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol);
                assert!(g1.get(&w).is_none());
            }
            // A 1×1 convolution on NCHW (batch 2 and 1: per-image and all-threads GEMMs).
            for batch in [2, 1] {
                let x = Var::from_tensor(&x.narrow(0, 0, batch).unwrap()).unwrap();
                let probe = rng.randn((batch, 6, 4, 5), &dev).unwrap().to_dtype(dtype).unwrap();
                let w = rng.randn((6, 3, 1, 1), &dev).unwrap().to_dtype(dtype).unwrap();
                let b = rng.randn(6, &dev).unwrap().to_dtype(dtype).unwrap();
                for bias in [None, Some(&b)] {
                    let ours = pointwise(&x, &w, bias).unwrap();
                    let mut theirs = x.conv2d(&w, 0, 1, 1, 1).unwrap();
                    if let Some(b) = bias {
                        theirs = theirs.broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap()).unwrap();
                    }
                    assert!(diff(&ours, &theirs) < tol);
                    let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol);
                }
            }
            let probe = rng.randn((2, 3, 4, 5), &dev).unwrap().to_dtype(dtype).unwrap();
            for shape in [vec![1usize, 3, 1, 1], vec![2, 3, 1, 1], vec![5], vec![4, 5]] {
                let s = rng.randn(shape.as_slice(), &dev).unwrap().to_dtype(dtype).unwrap();
                let t = rng.randn(shape.as_slice(), &dev).unwrap().to_dtype(dtype).unwrap();
                for (scale, shift) in [(Some(&s), Some(&t)), (None, Some(&t)), (Some(&s), None)] {
                    let ours = affine(&x, scale, shift).unwrap();
                    let mut theirs = x.as_tensor().clone();
                    if let Some(s) = scale {
                        theirs = theirs.broadcast_mul(s).unwrap();
                    }
                    if let Some(t) = shift {
                        theirs = theirs.broadcast_add(t).unwrap();
                    }
                    assert!(diff(&ours, &theirs) < tol, "{shape:?}");
                    let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol, "{shape:?}");
                }
            }
        }
    }

    /// The fused LoRA layer: same values and gradients (input, down, up) as the composed form.
    #[test]
    fn lora_linear_matches_composed() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
            let t = |rng: &mut Rng, shape: &[usize]| rng.randn(shape, &dev).unwrap().to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&t(&mut rng, &[2, 3, 5])).unwrap();
            let down = Var::from_tensor(&t(&mut rng, &[4, 5])).unwrap();
            let up = Var::from_tensor(&t(&mut rng, &[7, 4])).unwrap();
            let (w, b, probe) = (t(&mut rng, &[7, 5]), t(&mut rng, &[7]), t(&mut rng, &[2, 3, 7]));
            for bias in [None, Some(&b)] {
                let ours = lora_linear(&x, &w, bias, &down, &up, 0.75).unwrap().expect("the fused path");
                let branch =
                    x.broadcast_matmul(&down.t().unwrap()).unwrap().broadcast_matmul(&up.t().unwrap()).unwrap();
                let mut theirs = (x.broadcast_matmul(&w.t().unwrap()).unwrap() + (branch * 0.75).unwrap()).unwrap();
                if let Some(b) = bias {
                    theirs = theirs.broadcast_add(b).unwrap();
                }
                assert!(diff(&ours, &theirs) < tol);
                let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [x.as_tensor(), down.as_tensor(), up.as_tensor()] {
                    assert!(diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < tol);
                }
            }
        }
    }

    /// A trained weight or bias keeps candle's path, so its gradient still arrives.
    #[test]
    fn trained_operands_still_get_gradients() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(4);
        let x = rng.randn((3, 5), &dev).unwrap();
        let w = Var::from_tensor(&rng.randn((2, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.randn(2, &dev).unwrap()).unwrap();
        let g = linear(&x, &w, Some(&b)).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_some() && g.get(&b).is_some());
        let s = Var::from_tensor(&rng.randn(5, &dev).unwrap()).unwrap();
        let g = affine(&x, Some(&s), None).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&s).is_some());
    }
}
