//! Prodigy (Mishchenko & Defazio 2023; the `prodigyopt` package, 1.1): Adam whose step size d is
//! estimated from the distance travelled, so the learning rate stays near 1. The estimate is a
//! sum over every trained tensor, so a step reads them all before it moves any.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::Result;

/// Prodigy's own settings in a run's config (the betas, eps and weight decay are the run's).
/// Defaults are `prodigyopt`'s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProdigySettings {
    /// The first estimate of d.
    pub d0: f64,
    /// Scales every estimate of d (the knob the authors suggest turning, e.g. 0.5 or 2).
    pub d_coef: f64,
    /// The most d may grow by in one step (none: unlimited).
    pub growth_rate: Option<f64>,
    /// Adam's bias correction folded into the step size.
    pub use_bias_correction: bool,
    /// Leave the learning rate out of the estimate's denominator (for long warmups).
    pub safeguard_warmup: bool,
}

impl Default for ProdigySettings {
    fn default() -> Self {
        Self { d0: 1e-6, d_coef: 1.0, growth_rate: None, use_bias_correction: false, safeguard_warmup: false }
    }
}

/// Prodigy's constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prodigy {
    pub beta1: f64,
    pub beta2: f64,
    /// The decay of the estimate's sums (`prodigyopt`: √beta2 unless given).
    pub beta3: f64,
    pub eps: f64,
    /// Decoupled (AdamW-style), scaled by the step size d·lr.
    pub weight_decay: f64,
    pub settings: ProdigySettings,
}

/// The run-wide part of Prodigy's state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProdigyGlobals {
    /// The current estimate of the step size.
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
    /// Steps taken.
    pub k: usize,
}

/// One tensor's Prodigy state.
#[derive(Clone, Debug)]
pub struct ProdigySlot {
    /// The decayed sum of gradients the estimate's denominator is taken from.
    pub s: Tensor,
    /// The tensor's value before the first step (the estimate measures the distance from it).
    pub p0: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// One tensor's part in a step: its weight, clipped gradient, state and learning rate.
pub struct ProdigyInput<'a> {
    pub weight: &'a Tensor,
    pub grad: &'a Tensor,
    pub slot: &'a ProdigySlot,
    pub lr: f64,
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

impl Prodigy {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64, settings: ProdigySettings) -> Self {
        Self { beta1, beta2, beta3: beta2.sqrt(), eps, weight_decay, settings }
    }

    pub fn start(&self) -> ProdigyGlobals {
        let d0 = self.settings.d0;
        ProdigyGlobals { d: d0, d_max: d0, d_numerator: 0.0, k: 0 }
    }

    /// A fresh slot for weight `w`.
    pub fn slot(&self, w: &Tensor) -> Result<ProdigySlot> {
        let zeros = w.zeros_like()?;
        Ok(ProdigySlot { s: zeros.clone(), p0: w.detach().copy()?, exp_avg: zeros.clone(), exp_avg_sq: zeros })
    }

    /// One step over all tensors that have a gradient: the new globals, and per input its new
    /// slot and weight (no weight when the step moves nothing: all gradients zero, or a zero
    /// learning rate). `prodigyopt` allows one learning rate for all groups; here each tensor
    /// moves by d·(its lr) while d is estimated with the largest, which is `prodigyopt` exactly
    /// when the rates are equal (the text encoder's rate may differ).
    #[allow(clippy::type_complexity)]
    pub fn update(
        &self,
        globals: &ProdigyGlobals,
        inputs: &[ProdigyInput],
    ) -> Result<(ProdigyGlobals, Vec<(ProdigySlot, Option<Tensor>)>)> {
        let (b1, b2, b3) = (self.beta1, self.beta2, self.beta3);
        let set = &self.settings;
        let k = globals.k as i32;
        let bias_correction =
            if set.use_bias_correction { (1.0 - b2.powi(k + 1)).sqrt() / (1.0 - b1.powi(k + 1)) } else { 1.0 };
        let lr = inputs.iter().map(|i| i.lr).fold(0.0, f64::max);
        let d = globals.d;
        let dlr = d * lr * bias_correction;
        let d_numerator = globals.d_numerator * b3;
        let (mut delta_numerator, mut d_denom) = (0.0, 0.0);
        // First pass: the moments and the estimate's sums.
        let mut slots = Vec::with_capacity(inputs.len());
        for i in inputs {
            if i.lr <= 0.0 {
                slots.push(i.slot.clone());
                continue;
            }
            let g = i.grad;
            // d / d0 keeps the sums away from tiny values.
            let displacement = (&i.slot.p0 - i.weight)?;
            delta_numerator += (d / set.d0) * dlr * sum_f64(&(g * &displacement)?)?;
            let exp_avg = ((&i.slot.exp_avg * b1)? + (g * (d * (1.0 - b1)))?)?;
            let exp_avg_sq = ((&i.slot.exp_avg_sq * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
            let s_rate = (d / set.d0) * if set.safeguard_warmup { d } else { dlr };
            let s = ((&i.slot.s * b3)? + (g * s_rate)?)?;
            d_denom += sum_f64(&s.abs()?)?;
            slots.push(ProdigySlot { s, p0: i.slot.p0.clone(), exp_avg, exp_avg_sq });
        }
        // No gradient at all: the moments decay, nothing else moves (as `prodigyopt` returns early).
        if d_denom == 0.0 {
            return Ok((*globals, slots.into_iter().map(|s| (s, None)).collect()));
        }
        let d_numerator = d_numerator + delta_numerator;
        let d_hat = set.d_coef * d_numerator / d_denom;
        let mut new_d = d;
        if d == set.d0 {
            new_d = d.max(d_hat);
        }
        let d_max = globals.d_max.max(d_hat);
        new_d = d_max.min(new_d * set.growth_rate.unwrap_or(f64::INFINITY));
        // Second pass: the steps, of size d·lr (the d the moments were built with) over √v + d'·eps.
        let mut out = Vec::with_capacity(inputs.len());
        for (i, slot) in inputs.iter().zip(slots) {
            if i.lr <= 0.0 {
                out.push((slot, None));
                continue;
            }
            let step = d * i.lr * bias_correction;
            let denom = (slot.exp_avg_sq.sqrt()? + new_d * self.eps)?;
            let mut w = i.weight.clone();
            if self.weight_decay != 0.0 {
                w = (&w + (&w * (-self.weight_decay * step))?)?;
            }
            let w = (w - ((&slot.exp_avg / denom)? * step)?)?;
            out.push((slot, Some(w)));
        }
        let globals = ProdigyGlobals { d: new_d, d_max, d_numerator, k: globals.k + 1 };
        Ok((globals, out))
    }
}
