//! The training noise schedule: betas, ᾱ (alphas_cumprod), noising x₀ to x_t, the v-prediction
//! target and SNR. One place owns it; the samplers and the trainer both read it from here.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::Result;

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768-v).
    V,
}

/// diffusers' `scheduler/scheduler_config.json` (the fields that define the schedule).
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(default = "default_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
}

fn default_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_true() -> bool {
    true
}

impl Default for SchedulerConfig {
    /// Stable Diffusion 1.x / 2.x's schedule.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            set_alpha_to_one: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid scheduler config: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            bail!("num_train_timesteps must be at least 2");
        }
        match self.beta_schedule.as_str() {
            "scaled_linear" | "linear" => {}
            other => bail!("not supported: beta_schedule {other}"),
        }
        match self.prediction_type.as_str() {
            "epsilon" | "v_prediction" => {}
            other => bail!("not supported: prediction_type {other}"),
        }
        match self.timestep_spacing.as_str() {
            "leading" | "linspace" | "trailing" => Ok(()),
            other => bail!("not supported: timestep_spacing {other}"),
        }
    }

    pub fn prediction(&self) -> Prediction {
        if self.prediction_type == "v_prediction" { Prediction::V } else { Prediction::Epsilon }
    }

    pub fn set_prediction(&mut self, p: Prediction) {
        self.prediction_type = match p {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        }
        .into();
    }
}

/// Betas and ᾱ for every training timestep.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.num_train_timesteps;
        let lerp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (n - 1) as f64;
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            // "scaled_linear": linear in √β, as Stable Diffusion was trained.
            "scaled_linear" => (0..n).map(|i| lerp(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), i).powi(2)).collect(),
            _ => (0..n).map(|i| lerp(cfg.beta_start, cfg.beta_end, i)).collect(),
        };
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        Ok(Self { betas, alphas_cumprod, prediction: cfg.prediction() })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Per-sample (√ᾱ, √(1−ᾱ)) as (B, 1, 1, 1) tensors for broadcasting.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut a = Vec::with_capacity(timesteps.len());
        let mut s = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let ac = *self.alphas_cumprod.get(t).with_context(|| format!("timestep {t} is outside the schedule"))?;
            a.push(ac.sqrt() as f32);
            s.push((1.0 - ac).sqrt() as f32);
        }
        let shape = (timesteps.len(), 1, 1, 1);
        let make =
            |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?) };
        Ok((make(a)?, make(s)?))
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, one timestep per batch element.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// What the model should output for this (x₀, ε, t).
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::V => self.velocity(x0, noise, timesteps),
        }
    }

    /// Signal-to-noise ratio ᾱ/(1−ᾱ) at t (for min-SNR loss weighting).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t.min(self.len() - 1)];
        a / (1.0 - a)
    }

    /// ᾱ as an f32 tensor (for comparison with references).
    pub fn alphas_cumprod_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = self.alphas_cumprod.iter().map(|&a| a as f32).collect();
        Ok(Tensor::from_vec(v, self.len(), device)?.to_dtype(DType::F32)?)
    }
}
