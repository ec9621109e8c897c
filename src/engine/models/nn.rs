//! The layers our models are made of. Every op here has a backward pass (no candle
//! `softmax_last_dim`, no candle fused layer norm: the norms use our `normalise` op), and every
//! linear/conv knows its module path so adapters can be attached by name.

use candle_core::{D, DType, Tensor};

use crate::engine::Result;
use crate::engine::adapters::stack::AdapterStack;
use crate::engine::io::weights::WeightScope;
use crate::engine::kernels::flops;
use crate::engine::kernels::frozen::affine;
use crate::engine::kernels::normalise::normalise;

/// A fully connected layer, `y = x Wᵀ + b`, applied over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    /// diffusers / transformers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`.
    pub path: String,
    /// The frozen weight (out, in) and whatever adapters are attached to it.
    pub stack: AdapterStack,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(ws: &WeightScope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        // Frozen weights stay as the map keeps them (perhaps f16); the ops widen them per use.
        let weight = ws.get_stored("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(ws.get("bias", &[out_dim])?) } else { None };
        Ok(Self { path: ws.path().to_string(), stack: AdapterStack::new(weight), bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.stack.base
    }
    pub fn in_dim(&self) -> usize {
        self.weight().dims()[1]
    }
    pub fn out_dim(&self) -> usize {
        self.weight().dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        flops::linear(x.elem_count() / self.in_dim().max(1), self.in_dim(), self.out_dim());
        self.stack.forward_linear(x, self.bias.as_ref())
    }
}

/// A 2-D convolution (NCHW), square kernel, symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub path: String,
    /// The frozen weight (out, in, k, k) and whatever adapters are attached to it.
    pub stack: AdapterStack,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn load(
        ws: &WeightScope,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = ws.get_stored("weight", &[out_c, in_c, kernel, kernel])?;
        let bias = Some(ws.get("bias", &[out_c])?);
        Ok(Self { path: ws.path().to_string(), stack: AdapterStack::new(weight), bias, stride, padding })
    }

    pub fn weight(&self) -> &Tensor {
        &self.stack.base
    }
    pub fn out_channels(&self) -> usize {
        self.weight().dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (Ok((b, _, h, w)), &[o, c, kh, kw]) = (x.dims4(), self.weight().dims()) {
            let side = |n: usize, k: usize| (n + 2 * self.padding).saturating_sub(k) / self.stride + 1;
            flops::conv(b, o, c * kh * kw, side(h, kh) * side(w, kw));
        }
        self.stack.forward_conv(x, self.bias.as_ref(), self.padding, self.stride)
    }
}

/// The first error of fallible work done inside a layer walk (whose callback returns nothing):
/// once one is held, later work is skipped. The one place "collect the first error of a visitor"
/// lives; the models' `try_visit_layers` use it.
#[derive(Default)]
pub struct FirstError(Option<anyhow::Error>);

impl FirstError {
    pub fn run(&mut self, work: impl FnOnce() -> Result<()>) {
        if self.0.is_none()
            && let Err(e) = work()
        {
            self.0 = Some(e);
        }
    }

    pub fn into_result(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// A layer adapters can attach to, as the model walkers hand them out: linears and convolutions
/// (every kind of update) and the norms' scales (LyCORIS' norm updates only).
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
    GroupNorm(&'a mut GroupNorm),
    LayerNorm(&'a mut LayerNorm),
}

impl LayerMut<'_> {
    pub fn path(&self) -> &str {
        match self {
            LayerMut::Linear(l) => &l.path,
            LayerMut::Conv(c) => &c.path,
            LayerMut::GroupNorm(n) => &n.path,
            LayerMut::LayerNorm(n) => &n.path,
        }
    }
    pub fn stack(&mut self) -> &mut AdapterStack {
        match self {
            LayerMut::Linear(l) => &mut l.stack,
            LayerMut::Conv(c) => &mut c.stack,
            LayerMut::GroupNorm(n) => &mut n.stack,
            LayerMut::LayerNorm(n) => &mut n.stack,
        }
    }
    pub fn stack_ref(&self) -> &AdapterStack {
        match self {
            LayerMut::Linear(l) => &l.stack,
            LayerMut::Conv(c) => &c.stack,
            LayerMut::GroupNorm(n) => &n.stack,
            LayerMut::LayerNorm(n) => &n.stack,
        }
    }
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            LayerMut::Linear(l) => l.bias.as_ref(),
            LayerMut::Conv(c) => c.bias.as_ref(),
            LayerMut::GroupNorm(n) => Some(&n.bias),
            LayerMut::LayerNorm(n) => Some(&n.bias),
        }
    }
    /// A norm's scale (one number per channel): only full-difference updates fit it.
    pub fn is_norm(&self) -> bool {
        matches!(self, LayerMut::GroupNorm(_) | LayerMut::LayerNorm(_))
    }
}

/// GroupNorm over NC… tensors (the normalisation is our fused op, which has a backward pass).
/// Its scale sits in an adapter stack, so LyCORIS' norm updates (`w_norm` / `b_norm`) apply to it.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub path: String,
    /// The frozen scale (channels) and whatever adapters are attached to it.
    pub stack: AdapterStack,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(ws: &WeightScope, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            path: ws.path().to_string(),
            stack: AdapterStack::new(ws.get("weight", &[channels])?),
            bias: ws.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        // In NC… order each (item, group) is one contiguous run.
        let normed = normalise(x, x.elem_count() / (b * self.groups), self.eps)?;
        let mut shape = vec![1; dims.len()];
        shape[1] = c;
        let (weight, bias) = self.stack.adapted_affine(&self.bias)?;
        affine(&normed, Some(&weight.reshape(shape.as_slice())?), Some(&bias.reshape(shape.as_slice())?))
    }
}

/// LayerNorm over the last dimension (not candle's fused kernel, which has no backward pass; ours
/// has). Its scale sits in an adapter stack, as GroupNorm's does.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub path: String,
    pub stack: AdapterStack,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(ws: &WeightScope, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            path: ws.path().to_string(),
            stack: AdapterStack::new(ws.get("weight", &[dim])?),
            bias: ws.get("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = normalise(x, x.dim(D::Minus1)?, self.eps)?;
        let (weight, bias) = self.stack.adapted_affine(&self.bias)?;
        affine(&normed, Some(&weight), Some(&bias))
    }
}

/// `x·σ(1.702x)`, CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Nearest-neighbour upsampling to `(h, w)`; the exact 2× case uses broadcasting so it trains.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c, xh, xw) = x.dims4()?;
    if h == 2 * xh && w == 2 * xw {
        let y = x.reshape((b, c, xh, 1, xw, 1))?.broadcast_as((b, c, xh, 2, xw, 2))?;
        return Ok(y.reshape((b, c, h, w))?);
    }
    Ok(x.upsample_nearest2d(h, w)?)
}

/// Sinusoidal timestep embedding as diffusers' `Timesteps` module computes it.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    dtype: DType,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> =
        (0..half).map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.reshape((timesteps.elem_count(), 1))?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    Ok(emb.to_dtype(dtype)?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    crate::engine::kernels::silu::silu(x)
}
