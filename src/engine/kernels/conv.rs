//! 2-D convolution, fast on the CPU both ways. Forward: im2col + one GEMM per image straight into
//! NCHW (candle 0.11.1's im2col gathers element by element with bounds checks into a zeroed buffer:
//! 19 % of a LoRA step on the `tiny` UNet). Backward: candle computes the input gradient with
//! `conv_transpose2d`, a naive loop (5–16× the forward); here it is a plain convolution of the
//! (zero-dilated) output gradient with the flipped, transposed kernel. Both ways, the large 3×3
//! stride-1 layers go through Winograd F(2×2, 3×3) instead (`winograd.rs`).

use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::engine::Result;
use crate::engine::kernels::cpu::{
    FrozenRows, Shared, Widen, contiguous_slice, cpu_float, float_dispatch, for_each_item, gemm, is_half,
    split_threads, widen_to,
};
use crate::engine::kernels::frozen::autocast;
use crate::engine::kernels::winograd;

/// `conv2d(x, w)` (square padding and stride, no dilation or groups) that trains fast on the CPU.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_bias(x, w, None, padding, stride)
}

/// `conv2d(x, w) + bias` (bias (out)): a frozen bias is added inside the GEMM, for free.
pub fn conv2d_bias(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let fusable = bias.filter(|b| !b.track_op() && b.dtype() == x.dtype() && b.dims() == [w.dims()[0]]);
    let (y, fused) = match ours(x, w, padding, stride, 1)? {
        // Records our backward (below) when x or w needs a gradient.
        Some((x, w, mut op)) => {
            op.bias = fusable.map(|b| b.contiguous()).transpose()?;
            (x.apply_op2(&w, op)?, fusable.is_some())
        }
        None => (autocast(x, w, |x, w| x.conv2d(w, padding, stride, 1, 1))?, false),
    };
    Ok(match bias {
        Some(b) if !fused => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
        _ => y,
    })
}

/// A convolution without gradient tracking: ours on the CPU for f32/f64, candle's elsewhere.
fn convolve(x: &Tensor, w: &Tensor, padding: usize, stride: usize, dilation: usize) -> candle_core::Result<Tensor> {
    match ours(x, w, padding, stride, dilation)? {
        Some((x, w, op)) => x.apply_op2_no_bwd(&w, &op),
        None => autocast(x, w, |x, w| x.conv2d(w, padding, stride, dilation, 1)),
    }
}

/// Contiguous inputs and our op, when it covers this convolution (else candle's own, which also
/// gives candle's error messages for bad shapes).
fn ours(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> candle_core::Result<Option<(Tensor, Tensor, Im2ColConv)>> {
    // A frozen kernel stored in half precision is widened inside the op, a block of rows at a time.
    let kernel_fits = x.dtype() == w.dtype() || (is_half(w) && !w.track_op());
    if !cpu_float(x) || !kernel_fits || !w.device().is_cpu() || x.rank() != 4 || w.rank() != 4 {
        return Ok(None);
    }
    let (_, c, h, wd) = x.dims4()?;
    let (_, wc, kh, kw) = w.dims4()?;
    let span = |k: usize| dilation * (k - 1) + 1;
    if wc != c || h + 2 * padding < span(kh) || wd + 2 * padding < span(kw) || stride == 0 || dilation == 0 {
        return Ok(None);
    }
    Ok(Some((x.contiguous()?, w.contiguous()?, Im2ColConv { padding, stride, dilation, bias: None })))
}

/// Largest im2col buffer one image's convolution fills at a time.
const COL_TILE_BYTES: usize = 4 << 20;

/// Convolution as im2col + GEMM (see the module docs); inputs contiguous.
struct Im2ColConv {
    padding: usize,
    stride: usize,
    dilation: usize,
    /// A frozen bias (out), the output's starting value.
    bias: Option<Tensor>,
}

/// Sizes of one convolution.
#[derive(Clone, Copy)]
pub(super) struct ConvDims {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

#[cfg(test)]
thread_local! {
    /// Tests: `Some(on)` forces Winograd on or off (where it applies) for convolutions on this
    /// thread, instead of `winograd::wins`.
    static FORCE_WINOGRAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: convolutions on this thread that went through Winograd.
    static WINOGRAD_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn forced_winograd() -> Option<bool> {
    FORCE_WINOGRAD.with(|f| f.get())
}

#[cfg(not(test))]
fn forced_winograd() -> Option<bool> {
    None
}

impl Im2ColConv {
    /// im2col of one image, for output rows `first_row..`: row (ci, ki, kj) holds, for each of
    /// those output pixels, the input pixel that kernel tap sees (0 in the padding). With stride 1
    /// each output row is one shifted copy.
    fn fill_row<T: Copy + num_traits::Zero>(&self, d: ConvDims, img: &[T], r: usize, first_row: usize, row: &mut [T]) {
        let (ci, ki, kj) = (r / (d.kh * d.kw), (r / d.kw) % d.kh, r % d.kw);
        let (p, s, dl) = (self.padding as isize, self.stride as isize, self.dilation as isize);
        let plane = &img[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for (oy, out) in row.chunks_exact_mut(d.wo).enumerate() {
            let iy = (first_row + oy) as isize * s + ki as isize * dl - p;
            if iy < 0 || iy >= d.h as isize {
                out.fill(T::zero());
                continue;
            }
            let line = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
            let shift = kj as isize * dl - p;
            if s == 1 {
                // Output x reads input x + shift: zeros, one copied run, zeros.
                let first = (-shift).clamp(0, d.wo as isize) as usize;
                let end = (d.w as isize - shift).clamp(first as isize, d.wo as isize) as usize;
                out[..first].fill(T::zero());
                let src = (first as isize + shift) as usize;
                out[first..end].copy_from_slice(&line[src..src + end - first]);
                out[end..].fill(T::zero());
            } else {
                for (ox, v) in out.iter_mut().enumerate() {
                    let ix = ox as isize * s + shift;
                    *v = if ix < 0 || ix >= d.w as isize { T::zero() } else { line[ix as usize] };
                }
            }
        }
    }

    /// Whether this convolution goes through Winograd F(2×2, 3×3).
    fn winograd(&self, d: ConvDims) -> bool {
        let fits = d.kh == 3 && d.kw == 3 && self.stride == 1 && self.dilation == 1 && d.c > 0 && d.o > 0;
        let on = fits && forced_winograd().unwrap_or_else(|| winograd::wins(d));
        #[cfg(test)]
        WINOGRAD_RUNS.with(|n| n.set(n.get() + usize::from(on)));
        on
    }

    fn run<T: Widen + Send + Sync>(
        &self,
        d: ConvDims,
        b: usize,
        x: &[T],
        k: &FrozenRows<'_, T>,
    ) -> candle_core::Result<Vec<T>> {
        let bias = self.bias.as_ref().map(|t| t.to_vec1::<T>()).transpose()?;
        if self.winograd(d) {
            return Ok(winograd::conv3x3(d, self.padding, b, x, k, bias.as_deref()));
        }
        let (ckk, hw) = (d.c * d.kh * d.kw, d.ho * d.wo);
        // Starts as the bias, or uninitialised: the GEMMs then write every element through raw
        // pointers (gemm zeroes its destination itself when told not to read it).
        let len = b * d.o * hw;
        let mut out = if bias.is_some() { vec![T::zero(); len] } else { Vec::with_capacity(len) };
        if let Some(bias) = &bias {
            for (o, plane) in out.chunks_exact_mut(hw).enumerate() {
                plane.fill(bias[o % d.o]);
            }
        }
        let dst = Shared(out.as_mut_ptr());
        // Several images: one per thread, each with a one-thread GEMM; one image: every thread on
        // its im2col rows, then on its GEMM.
        let (parallel, threads) = split_threads(b);
        // Output rows per im2col tile: a whole-image im2col of an SD 1.5 layer at 512 px is 47 MB,
        // which glibc maps fresh (page faults, zeroed pages) on every call; tiles stay in the heap.
        let tile_rows = (COL_TILE_BYTES / (ckk * d.wo * std::mem::size_of::<T>()).max(1)).clamp(1, d.ho);
        for_each_item(b, parallel, |i| {
            let img = &x[i * d.c * d.h * d.w..(i + 1) * d.c * d.h * d.w];
            let mut col = vec![T::zero(); ckk * tile_rows * d.wo];
            for first in (0..d.ho).step_by(tile_rows) {
                let cols = (tile_rows.min(d.ho - first)) * d.wo;
                let col = &mut col[..ckk * cols];
                if parallel {
                    col.chunks_exact_mut(cols).enumerate().for_each(|(r, row)| self.fill_row(d, img, r, first, row));
                } else {
                    col.par_chunks_exact_mut(cols)
                        .enumerate()
                        .for_each(|(r, row)| self.fill_row(d, img, r, first, row));
                }
                // Output channels `o0..` from rows `o0..` of the kernel (all at once unless it is
                // widened from half precision block by block).
                k.for_each_block(ckk, |o0, k| {
                    // SAFETY: image i's output block is written by this item alone, each tile its
                    // own columns and each kernel block its own rows; the views match the buffers.
                    unsafe {
                        gemm(
                            (k.len() / ckk, cols, ckk),
                            (dst.at(i * d.o * hw + o0 * hw + first * d.wo), hw as isize, 1),
                            bias.is_some(),
                            (k.as_ptr(), ckk as isize, 1),
                            (col.as_ptr(), cols as isize, 1),
                            T::one(),
                            threads,
                        );
                    }
                });
            }
        });
        // SAFETY: image i's GEMM wrote its whole (o, hw) block, so all `len` elements.
        unsafe { out.set_len(len) };
        Ok(out)
    }
}

impl CustomOp2 for Im2ColConv {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (o, _, kh, kw) = wl.shape().dims4()?;
        let out_side = |n: usize, k: usize| (n + 2 * self.padding - self.dilation * (k - 1) - 1) / self.stride + 1;
        let d = ConvDims { c, h, w, o, kh, kw, ho: out_side(h, kh), wo: out_side(w, kw) };
        let shape = Shape::from((b, o, d.ho, d.wo));
        let name = self.name();
        let out = float_dispatch!(xs.dtype(), name, |T| {
            let (x, k) = (contiguous_slice::<T>(xs, xl, name)?, FrozenRows::<T>::of(ws, wl, name)?);
            T::to_cpu_storage_owned(self.run(d, b, x, &k)?)
        });
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.dilation != 1 {
            candle_core::bail!("conv2d-im2col: no backward for dilated convolutions");
        }
        let (p, s) = (self.padding, self.stride);
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let grad = grad.contiguous()?;
        // Only what the graph needs: LoRA training leaves every base kernel frozen, and the first
        // layer's input (the noisy latents) needs no gradient either.
        let (want_x, want_w) = (x.track_op(), w.track_op());

        // Kernel gradient, as candle computes it (already a fast convolution).
        let gw = if want_w {
            let gw = convolve(&x.transpose(0, 1)?, &grad.transpose(0, 1)?, p, 1, s)?.transpose(0, 1)?;
            Some(if gw.dim(2)? != kh || gw.dim(3)? != kw { gw.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { gw })
        } else {
            None
        };
        if !want_x {
            return Ok((None, gw));
        }

        // Input gradient: dilate the output gradient by the stride, then a stride-1 convolution
        // with the spatially flipped kernel, its in/out channels swapped.
        let gx = if p + 1 > kh || p + 1 > kw || kh != kw {
            // Outside what the flipped form covers: candle's own route.
            let out_size = (grad.dim(2)? - 1) * s + kh - 2 * p;
            grad.conv_transpose2d(&widen_to(w, x.dtype())?, p, h - out_size, s, 1)?
        } else {
            let g = if s > 1 { dilate(&grad, s)? } else { grad };
            // Rows/columns the stride left over at the bottom/right: transposed convolution's
            // output padding, as zeros after the dilated gradient.
            let (extra_h, extra_w) = (h + 2 * p + 1 - kh - g.dim(2)?, wd + 2 * p + 1 - kw - g.dim(3)?);
            let g = g.pad_with_zeros(2, 0, extra_h)?.pad_with_zeros(3, 0, extra_w)?;
            // A half-precision kernel stays half: the convolution widens it block by block.
            let wt = w.apply_op1_no_bwd(&FlipTranspose)?;
            convolve(&g, &wt, kh - 1 - p, 1, 1)?
        };
        Ok((Some(gx), gw))
    }
}

/// A kernel (out, in, kh, kw) → (in, out, kh, kw) flipped in both spatial axes, in one pass
/// (candle's `flip` gathers through `index_select`, then `contiguous` copies again: 30 % of an
/// SD 1.5 LoRA step).
struct FlipTranspose;

impl FlipTranspose {
    fn run<T: Copy + Send + Sync + num_traits::Zero>(w: &[T], (o, i, kk): (usize, usize, usize)) -> Vec<T> {
        let mut out = vec![T::zero(); w.len()];
        out.par_chunks_exact_mut(o * kk).enumerate().for_each(|(ii, dst)| {
            for (oo, block) in dst.chunks_exact_mut(kk).enumerate() {
                let src = &w[(oo * i + ii) * kk..(oo * i + ii + 1) * kk];
                for (d, s) in block.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        });
        out
    }
}

impl candle_core::CustomOp1 for FlipTranspose {
    fn name(&self) -> &'static str {
        "conv-kernel-flip-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o, i, kh, kw) = l.shape().dims4()?;
        let dims = (o, i, kh * kw);
        let name = self.name();
        let out = match s.dtype() {
            // A frozen kernel kept in half precision is flipped as it is.
            candle_core::DType::F16 => CpuStorage::F16(Self::run(contiguous_slice(s, l, name)?, dims)),
            candle_core::DType::BF16 => CpuStorage::BF16(Self::run(contiguous_slice(s, l, name)?, dims)),
            dtype => float_dispatch!(dtype, name, |T| {
                T::to_cpu_storage_owned(Self::run(contiguous_slice::<T>(s, l, name)?, dims))
            }),
        };
        Ok((out, Shape::from((i, o, kh, kw))))
    }
}

/// Inserts `s - 1` zeros between neighbouring pixels: (h, w) → ((h-1)·s+1, (w-1)·s+1).
fn dilate(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    let g = g.reshape((b, c, h, 1, w, 1))?.pad_with_zeros(3, 0, s - 1)?.pad_with_zeros(5, 0, s - 1)?;
    g.reshape((b, c, h * s, w * s))?.narrow(2, 0, (h - 1) * s + 1)?.narrow(3, 0, (w - 1) * s + 1)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{FORCE_WINOGRAD, WINOGRAD_RUNS, conv2d, conv2d_bias, convolve};
    use crate::engine::rng::Rng;

    /// Runs `f` with Winograd forced on or off on this thread, and counts the convolutions that
    /// went through it.
    fn forcing<R>(on: bool, f: impl FnOnce() -> R) -> (R, usize) {
        FORCE_WINOGRAD.with(|c| c.set(Some(on)));
        let before = WINOGRAD_RUNS.with(|n| n.get());
        let r = f();
        FORCE_WINOGRAD.with(|c| c.set(None));
        (r, WINOGRAD_RUNS.with(|n| n.get()) - before)
    }

    /// Largest |a - b|, and largest |b|, in f64.
    fn diff_and_scale(a: &Tensor, b: &Tensor) -> (f64, f64) {
        let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>();
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        (max(&(&a - &b).unwrap()).unwrap(), max(&b).unwrap())
    }

    /// The forward pass alone on shapes the models do not use: non-square, dilated, strided.
    #[test]
    fn im2col_forward_matches_candle_on_odd_shapes() {
        let mut rng = Rng::new(2);
        // (batch, in, out, height, width, kernel h, kernel w, padding, stride, dilation)
        for &(b, c, o, h, w, kh, kw, p, s, d) in &[
            (3usize, 2usize, 4usize, 5usize, 11usize, 3usize, 3usize, 1usize, 1usize, 1usize),
            (1, 3, 2, 12, 7, 3, 1, 2, 1, 2),
            (2, 2, 3, 9, 6, 2, 3, 0, 3, 1),
            (1, 4, 2, 6, 6, 6, 6, 1, 1, 1),
            // Large enough for several im2col tiles (28 output rows each), one image and two.
            (1, 64, 8, 64, 64, 3, 3, 1, 1, 1),
            (2, 64, 4, 64, 48, 3, 3, 1, 2, 1),
        ] {
            let x = rng.randn((b, c, h, w), &Device::Cpu).unwrap();
            let k = rng.randn((o, c, kh, kw), &Device::Cpu).unwrap();
            let ours = convolve(&x, &k, p, s, d).unwrap();
            let theirs = x.conv2d(&k, p, s, d, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // f32 sums of up to 576 products: relative, not absolute, agreement.
            assert!(diff < 1e-5 * scale, "{diff} (largest {scale}) for {:?}", (b, c, o, h, w, kh, kw, p, s, d));
        }
    }

    /// Same outputs and gradients as candle's own convolution, for the shapes our models use.
    #[test]
    fn matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(1);
        for &(b, c, o, h, k, p, s) in &[
            (2usize, 3usize, 5usize, 9usize, 3usize, 1usize, 1usize),
            (2, 4, 6, 8, 3, 1, 2),
            (1, 4, 4, 9, 3, 1, 2),
            (2, 4, 6, 9, 3, 0, 2),
            (2, 5, 3, 7, 1, 0, 1),
            (1, 3, 4, 10, 3, 0, 1),
            // Channels and sizes for which `winograd::wins` picks Winograd (forward and input
            // gradient; checked below).
            (1, 64, 64, 32, 3, 1, 1),
            (2, 64, 64, 34, 3, 0, 1),
        ] {
            let winograd_runs = WINOGRAD_RUNS.with(|n| n.get());
            let x = Var::from_tensor(&rng.randn((b, c, h, h), &dev).unwrap()).unwrap();
            // Outputs of about one size for the wide layers too (the tolerances are absolute).
            let gain = 0.3 / (c as f64 / 8.0).max(1.0).sqrt();
            let w = Var::from_tensor(&(rng.randn((o, c, k, k), &dev).unwrap() * gain).unwrap()).unwrap();
            let probe = rng.randn(x.conv2d(&w, p, s, 1, 1).unwrap().shape(), &dev).unwrap();
            let ours = conv2d(&x, &w, p, s).unwrap();
            let theirs = x.conv2d(&w, p, s, 1, 1).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-5, "{} for {:?}", diff(&ours, &theirs), (b, c, o, h, k, p, s));
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("input", &x), ("kernel", &w)] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(a.dims(), b.dims(), "{name} gradient shape for {:?}", (b, c, o, h, k, p, s));
                // Relative beyond 1: the wide layers' kernel gradients sum 2048 products (about 50).
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
                let case = (b, c, o, h, k, p, s);
                assert!(diff(a, b) < 1e-4 * scale, "{name} gradient differs by {} for {case:?}", diff(a, b));
            }
            let winograd_runs = WINOGRAD_RUNS.with(|n| n.get()) - winograd_runs;
            assert_eq!(winograd_runs, if c >= 64 { 2 } else { 0 }, "Winograd runs for {:?}", (b, c, o, h, k, p, s));
            // A frozen kernel (LoRA training): the input gradient alone, the same as before.
            let frozen = w.as_tensor().detach();
            let g3 = (conv2d(&x, &frozen, p, s).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g3.get(&frozen).is_none());
            assert!(diff(g3.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
        }
    }

    /// A frozen bias is fused into the GEMM; a trained one still gets its gradient.
    #[test]
    fn bias_fused_or_not_matches_candle() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for batch in [1, 3] {
            let x = Var::from_tensor(&rng.randn((batch, 3, 6, 6), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&rng.randn((4, 3, 3, 3), &dev).unwrap()).unwrap();
            let b = rng.randn(4, &dev).unwrap();
            let probe = rng.randn((batch, 4, 3, 3), &dev).unwrap();
            let theirs = x.conv2d(&w, 1, 2, 1, 1).unwrap().broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for trained in [false, true] {
                let bias = if trained { Var::from_tensor(&b).unwrap().as_tensor().clone() } else { b.clone() };
                let ours = conv2d_bias(&x, &w, Some(&bias), 1, 2).unwrap();
                assert!(diff(&ours, &theirs) < 1e-5);
                let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
                assert!(diff(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-4);
                assert_eq!(g1.get(&bias).is_some(), trained);
            }
        }
    }

    /// Winograd against a direct convolution in f64 (im2col on f64 inputs): f32 within 1e-5 of the
    /// output's scale, f64 within 1e-12; odd and even sizes, one image and several, paddings 0–2,
    /// with and without a fused bias, and more tiles than one block holds.
    #[test]
    fn winograd_matches_f64_direct() {
        let mut rng = Rng::new(11);
        // (batch, in, out, height, width, padding, bias)
        for &(b, c, o, h, w, p, bias) in &[
            (1usize, 16usize, 24usize, 7usize, 9usize, 1usize, false),
            (3, 16, 8, 8, 8, 1, true),
            (1, 8, 16, 9, 7, 0, true),
            (3, 12, 16, 8, 8, 2, false),
            (2, 16, 16, 6, 5, 1, true),
            (1, 24, 8, 3, 4, 0, false),
            // 144 tiles, 128 to a block (512 channels): a block ends inside a row of tiles.
            (1, 512, 16, 24, 24, 1, true),
            (2, 16, 512, 23, 23, 1, false),
            // SD 1.5 widths (F32 errors 5e-7 of the scale here; F(4×4, 3×3) gave 1e-5).
            (1, 320, 320, 32, 32, 1, true),
            (1, 1280, 64, 16, 16, 1, true),
        ] {
            let x = rng.randn((b, c, h, w), &Device::Cpu).unwrap();
            let k = (rng.randn((o, c, 3, 3), &Device::Cpu).unwrap() / (9.0 * c as f64).sqrt()).unwrap();
            let bias = bias.then(|| rng.randn(o, &Device::Cpu).unwrap());
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let conv = |x: &Tensor, k: &Tensor, bias: Option<&Tensor>| conv2d_bias(x, k, bias, p, 1).unwrap();
            let (direct, runs) = forcing(false, || conv(&f64s(&x), &f64s(&k), bias.as_ref().map(f64s).as_ref()));
            assert_eq!(runs, 0);
            let case = (b, c, o, h, w, p);
            for dtype in [DType::F32, DType::F64] {
                let to = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (ours, runs) = forcing(true, || conv(&to(&x), &to(&k), bias.as_ref().map(to).as_ref()));
                assert_eq!(runs, 1, "Winograd did not run for {case:?}");
                assert_eq!(ours.dims(), direct.dims());
                let (diff, scale) = diff_and_scale(&ours, &direct);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(diff < tolerance * scale, "{dtype:?}: {diff} (largest {scale}) for {case:?}");
            }
        }
    }

    /// A frozen kernel kept in f16 / bf16 gives what it gives widened to f32 beforehand, forward
    /// and input gradient.
    #[test]
    fn winograd_half_kernel_matches_widened() {
        let mut rng = Rng::new(12);
        let x = Var::from_tensor(&rng.randn((2, 16, 9, 8), &Device::Cpu).unwrap()).unwrap();
        let probe = rng.randn((2, 24, 9, 8), &Device::Cpu).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let half = (rng.randn((24, 16, 3, 3), &Device::Cpu).unwrap() * 0.1).unwrap().to_dtype(dtype).unwrap();
            let run = |k: &Tensor| {
                let y = conv2d(&x, k, 1, 1).unwrap();
                let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(&x).unwrap().clone())
            };
            let ((y_half, g_half), runs) = forcing(true, || run(&half.detach()));
            assert_eq!(runs, 2, "forward and input gradient through Winograd");
            let ((y_wide, g_wide), _) = forcing(true, || run(&half.to_dtype(DType::F32).unwrap().detach()));
            for (ours, wide) in [(y_half, y_wide), (g_half, g_wide)] {
                let (diff, scale) = diff_and_scale(&ours, &wide);
                assert!(diff <= 1e-6 * scale, "{dtype:?}: {diff} (largest {scale})");
            }
        }
    }

    /// Outputs and both gradients through Winograd (the input gradient is itself a 3×3 stride-1
    /// convolution) against candle's own convolution.
    #[test]
    fn winograd_gradients_match_candle() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(13);
        // (batch, in, out, size, padding): the input gradient's padding is 2 - padding.
        for &(b, c, o, h, p) in &[(1usize, 32usize, 24usize, 9usize, 1usize), (2, 16, 32, 8, 1), (2, 24, 16, 7, 0)] {
            let x = Var::from_tensor(&rng.randn((b, c, h, h), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&(rng.randn((o, c, 3, 3), &dev).unwrap() * 0.1).unwrap()).unwrap();
            let theirs = x.conv2d(&w, p, 1, 1, 1).unwrap();
            let probe = rng.randn(theirs.shape(), &dev).unwrap();
            let (ours, runs) = forcing(true, || {
                let y = conv2d(&x, &w, p, 1).unwrap();
                (y.clone(), (y * &probe).unwrap().sum_all().unwrap().backward().unwrap())
            });
            // Forward and input gradient (the kernel gradient's "kernel" is the output gradient).
            assert_eq!(runs, 2, "Winograd runs for {:?}", (b, c, o, h, p));
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (y, g1) = ours;
            assert!(diff_and_scale(&y, &theirs).0 < 1e-5);
            for (name, v) in [("input", &x), ("kernel", &w)] {
                let (diff, scale) = diff_and_scale(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(diff < 1e-5 * scale, "{name} gradient differs by {diff} for {:?}", (b, c, o, h, p));
            }
        }
    }

    /// Microbenchmark: im2col and Winograd alternately on the 3×3 layers of the UNets, median
    /// milliseconds. `RAYON_NUM_THREADS=2 cargo test --release --lib winograd_speed -- --ignored
    /// --nocapture`; it sets `winograd::wins`.
    #[test]
    #[ignore]
    fn winograd_speed() {
        assert!(std::env::var_os("RAYON_NUM_THREADS").is_some() && std::env::var_os("CANDLE_NUM_THREADS").is_some());
        // SAFETY: both variables are set (asserted), so this only sets glibc's allocation
        // parameters, as the program does (blocks up to 256 MiB reused from the heap).
        unsafe { crate::engine::kernels::cpu::configure() };
        let mut rng = Rng::new(3);
        // (in, out, size) at batch 1 and 2: SD 1.5 at latent 64 and 32, SDXL, the small models.
        let sd15 = |s: usize| {
            [
                (320, 320, s),
                (640, 640, s / 2),
                (1280, 1280, s / 4),
                (1280, 1280, s / 8),
                (320, 640, s / 2),
                (4, 320, s),
                (320, 4, s),
            ]
        };
        let mut shapes: Vec<(usize, usize, usize)> = [sd15(64), sd15(32)].concat();
        shapes.extend([(1280, 1280, 32), (640, 640, 64), (32, 32, 16), (64, 64, 8), (128, 128, 8)]);
        shapes.extend([(64, 64, 16), (64, 64, 32), (128, 128, 16), (256, 256, 8), (640, 320, 64), (960, 320, 64)]);
        shapes.extend([(32, 32, 32), (32, 32, 64)]);
        println!("batch in out size: im2col ms, winograd ms, ratio");
        for b in [1, 2] {
            for &(c, o, s) in &shapes {
                if b == 2 && c * o * s * s > 640 * 640 * 32 * 32 {
                    continue;
                }
                let x = rng.randn((b, c, s, s), &Device::Cpu).unwrap();
                let k = rng.randn((o, c, 3, 3), &Device::Cpu).unwrap();
                let mut times = [Vec::new(), Vec::new()];
                for round in 0..6 {
                    for (path, on) in [false, true].into_iter().enumerate() {
                        let start = std::time::Instant::now();
                        let (y, runs) = forcing(on, || convolve(&x, &k, 1, 1, 1).unwrap());
                        assert_eq!(runs, usize::from(on));
                        drop(y);
                        if round > 0 {
                            times[path].push(start.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                let [a, w] = times.map(|mut t| {
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
                });
                println!("{b} {c} {o} {s}x{s}: {a:.2} {w:.2} {:.2}", a / w);
            }
        }
    }
}
