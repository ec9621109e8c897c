//! 2-D convolution with a faster CPU backward pass. candle 0.11.1 computes a convolution's input
//! gradient with `conv_transpose2d`, whose CPU code is a naive loop (5–16× the forward); here it is
//! a plain convolution of the (zero-dilated) output gradient with the flipped, transposed kernel,
//! which runs on candle's fast im2col + GEMM path.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Storage, Tensor};

use super::Result;

/// `conv2d(x, w)` (square padding and stride, no dilation or groups) that trains fast on the CPU.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    let needs_grad = x.track_op() || w.track_op();
    if !needs_grad || !matches!(x.device(), Device::Cpu) {
        return Ok(y);
    }
    // Re-attach the already computed output under an op whose backward is ours.
    Ok(x.apply_op2(w, FastConvGrad { output: y.detach(), padding, stride })?)
}

struct FastConvGrad {
    output: Tensor,
    padding: usize,
    stride: usize,
}

impl CustomOp2 for FastConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-fast-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.output.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("conv2d-fast-grad: the output is not on the CPU");
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("conv2d-fast-grad: the output is not contiguous");
        }
        Ok((cpu.clone(), layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let grad = grad.contiguous()?;
        // Only what the graph needs: LoRA training leaves every base kernel frozen, and the first
        // layer's input (the noisy latents) needs no gradient either.
        let (want_x, want_w) = (x.track_op(), w.track_op());

        // Kernel gradient, as candle computes it (already a fast convolution).
        let gw = if want_w {
            let gw = x.transpose(0, 1)?.conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?.transpose(0, 1)?;
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
            grad.conv_transpose2d(w, p, h - out_size, s, 1)?
        } else {
            let g = if s > 1 { dilate(&grad, s)? } else { grad };
            // Rows/columns the stride left over at the bottom/right: transposed convolution's
            // output padding, as zeros after the dilated gradient.
            let (extra_h, extra_w) = (h + 2 * p + 1 - kh - g.dim(2)?, wd + 2 * p + 1 - kw - g.dim(3)?);
            let g = g.pad_with_zeros(2, 0, extra_h)?.pad_with_zeros(3, 0, extra_w)?;
            let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            g.conv2d(&wt, kh - 1 - p, 1, 1, 1)?
        };
        Ok((Some(gx), gw))
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
    use candle_core::{Device, Tensor, Var};

    use super::conv2d;
    use crate::engine::rng::Rng;

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
        ] {
            let x = Var::from_tensor(&rng.randn((b, c, h, h), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&(rng.randn((o, c, k, k), &dev).unwrap() * 0.3).unwrap()).unwrap();
            let probe = rng.randn(x.conv2d(&w, p, s, 1, 1).unwrap().shape(), &dev).unwrap();
            let ours = conv2d(&x, &w, p, s).unwrap();
            let theirs = x.conv2d(&w, p, s, 1, 1).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&ours, &theirs) < 1e-5);
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("input", &x), ("kernel", &w)] {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(a.dims(), b.dims(), "{name} gradient shape for {:?}", (b, c, o, h, k, p, s));
                assert!(diff(a, b) < 1e-4, "{name} gradient differs by {} for {:?}", diff(a, b), (b, c, o, h, k, p, s));
            }
            // A frozen kernel (LoRA training): the input gradient alone, the same as before.
            let frozen = w.as_tensor().detach();
            let g3 = (conv2d(&x, &frozen, p, s).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g3.get(&frozen).is_none());
            assert!(diff(g3.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
        }
    }
}
