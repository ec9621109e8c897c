//! Adafactor (Shazeer & Stern 2018) as `transformers.optimization.Adafactor` computes it, without
//! a first moment (`beta1=None`, kohya's use): the second moment of a tensor of two or more dims
//! is kept as row and column means over its last two dims, the update is clipped by its RMS, and
//! the rate is given or, with `relative_step`, follows the step count.

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::Result;

/// Adafactor's switches in a run's config. The defaults are kohya's usual LoRA setting, an
/// explicit learning rate (transformers' own defaults turn `scale_parameter` and
/// `relative_step` on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdafactorSettings {
    /// Multiply the rate by the tensor's RMS (at least 1e-3).
    pub scale_parameter: bool,
    /// The rate is min(1e-2, 1/√step) and the learning rate and its schedule are not used.
    pub relative_step: bool,
    /// With `relative_step`: min(1e-6·step, 1/√step), a linear warmup.
    pub warmup_init: bool,
}

/// Adafactor's constants (transformers' defaults: eps (1e-30, 1e-3), clip 1, decay −0.8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adafactor {
    /// Added to the squared gradient.
    pub eps1: f64,
    /// The least parameter scale (`scale_parameter`).
    pub eps2: f64,
    /// The largest RMS of an update before the learning rate.
    pub clip_threshold: f64,
    /// The second moment's decay at step t is 1 − t^decay_rate.
    pub decay_rate: f64,
    /// Decoupled, scaled by the rate.
    pub weight_decay: f64,
    pub settings: AdafactorSettings,
}

/// A tensor's second moment: factored (two or more dims) or whole (one dim).
#[derive(Clone, Debug)]
pub enum SecondMoment {
    /// Means over the last dim (shape[..-1]) and over the one before it (shape[..-2] + shape[-1]).
    Factored {
        row: Tensor,
        col: Tensor,
    },
    Full(Tensor),
}

/// One tensor's Adafactor state.
#[derive(Clone, Debug)]
pub struct AdafactorSlot {
    /// Steps this tensor has taken.
    pub step: usize,
    pub second: SecondMoment,
}

fn rms(t: &Tensor) -> Result<f64> {
    let sq = t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok(sq.sqrt() / (t.elem_count() as f64).sqrt())
}

impl Adafactor {
    pub fn new(weight_decay: f64, settings: AdafactorSettings) -> Self {
        Self { eps1: 1e-30, eps2: 1e-3, clip_threshold: 1.0, decay_rate: -0.8, weight_decay, settings }
    }

    /// A fresh slot for weight `w`.
    pub fn slot(&self, w: &Tensor) -> Result<AdafactorSlot> {
        let dims = w.dims();
        let second = if dims.len() >= 2 {
            let n = dims.len();
            let mut col = dims[..n - 2].to_vec();
            col.push(dims[n - 1]);
            SecondMoment::Factored {
                row: Tensor::zeros(&dims[..n - 1], w.dtype(), w.device())?,
                col: Tensor::zeros(col, w.dtype(), w.device())?,
            }
        } else {
            SecondMoment::Full(w.zeros_like()?)
        };
        Ok(AdafactorSlot { step: 0, second })
    }

    /// The rate before the parameter scale at a tensor's `step` (1 for the first): `lr`, or with
    /// `relative_step` the step count's.
    pub fn relative_rate(&self, step: usize, lr: f64) -> f64 {
        if !self.settings.relative_step {
            return lr;
        }
        let step = step as f64;
        let cap = if self.settings.warmup_init { 1e-6 * step } else { 1e-2 };
        cap.min(1.0 / step.sqrt())
    }

    /// The update of weight `w` with gradient `g` (already clipped) and `slot`, at learning rate
    /// `lr` (unused with `relative_step`). Nothing is written: the caller commits the result.
    pub fn update(&self, w: &Tensor, g: &Tensor, slot: &AdafactorSlot, lr: f64) -> Result<(AdafactorSlot, Tensor)> {
        let step = slot.step + 1;
        let mut rate = self.relative_rate(step, lr);
        if self.settings.scale_parameter {
            rate *= self.eps2.max(rms(w)?);
        }
        let beta2t = 1.0 - (step as f64).powf(self.decay_rate);
        let sq = (g.sqr()? + self.eps1)?;
        let (second, update) = match &slot.second {
            SecondMoment::Factored { row, col } => {
                let row = ((row * beta2t)? + (sq.mean(D::Minus1)? * (1.0 - beta2t))?)?;
                let col = ((col * beta2t)? + (sq.mean(D::Minus2)? * (1.0 - beta2t))?)?;
                // v ≈ row·col / mean(row), as an outer product over the last two dims.
                let r = row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
                let c = col.unsqueeze(D::Minus2)?.sqrt()?.recip()?;
                let update = r.broadcast_mul(&c)?.broadcast_mul(g)?;
                (SecondMoment::Factored { row, col }, update)
            }
            SecondMoment::Full(v) => {
                let v = ((v * beta2t)? + (sq * (1.0 - beta2t))?)?;
                let update = (v.sqrt()?.recip()? * g)?;
                (SecondMoment::Full(v), update)
            }
        };
        let clip = (rms(&update)? / self.clip_threshold).max(1.0);
        let update = (update / clip)?;
        let update = (update * rate)?;
        let mut w = w.clone();
        if self.weight_decay != 0.0 {
            w = (&w + (&w * (-self.weight_decay * rate))?)?;
        }
        Ok((AdafactorSlot { step, second }, (w - update)?))
    }
}
