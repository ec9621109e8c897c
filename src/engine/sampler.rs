//! Inference samplers over the model's noise schedule: DDIM (η = 0) and Euler ancestral, for
//! ε- and v-prediction models, plus classifier-free guidance.

use anyhow::bail;
use candle_core::Tensor;

use super::Result;
use super::rng::Rng;
use super::schedule::{NoiseSchedule, Prediction, SchedulerConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SamplerKind {
    Ddim,
    EulerAncestral,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 2] = [SamplerKind::Ddim, SamplerKind::EulerAncestral];

    pub fn label(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::EulerAncestral => "Euler a",
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler-a" | "euler_a" | "euler-ancestral" | "euler a" => Ok(SamplerKind::EulerAncestral),
            other => bail!("unknown sampler `{other}` (available: ddim, euler-a)"),
        }
    }
}

/// One sampling run: the timesteps to visit and how to step between them.
pub struct Sampler {
    kind: SamplerKind,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Euler: σ at each timestep, then 0.
    sigmas: Vec<f64>,
    /// DDIM: the gap between consecutive training timesteps.
    step_ratio: usize,
    final_alpha_cumprod: f64,
}

/// Training timesteps visited by an `n`-step run, highest first, per diffusers' spacings.
pub fn spaced_timesteps(cfg: &SchedulerConfig, n: usize) -> Result<Vec<f64>> {
    let t = cfg.num_train_timesteps;
    if n == 0 || n > t {
        bail!("steps must be between 1 and {t}");
    }
    Ok(match cfg.timestep_spacing.as_str() {
        "leading" => (0..n).rev().map(|i| (i * (t / n) + cfg.steps_offset) as f64).collect(),
        "trailing" => {
            let ratio = t as f64 / n as f64;
            (0..n).map(|i| (t as f64 - i as f64 * ratio).round() - 1.0).collect()
        }
        _ => (0..n).rev().map(|i| (t - 1) as f64 * i as f64 / (n - 1).max(1) as f64).collect(),
    })
}

impl Sampler {
    pub fn new(kind: SamplerKind, schedule: &NoiseSchedule, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let timesteps = spaced_timesteps(cfg, steps)?;
        let ac = schedule.alphas_cumprod.clone();
        let sigma_at = |t: f64| -> f64 {
            // Linear interpolation of σ(t) = √((1−ᾱ)/ᾱ) between training timesteps.
            let sigma = |i: usize| ((1.0 - ac[i]) / ac[i]).sqrt();
            let t = t.clamp(0.0, (ac.len() - 1) as f64);
            let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
            let w = t - lo as f64;
            sigma(lo) * (1.0 - w) + sigma(hi) * w
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| sigma_at(t)).collect();
        sigmas.push(0.0);
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        Ok(Self {
            kind,
            prediction: schedule.prediction,
            step_ratio: cfg.num_train_timesteps / steps,
            alphas_cumprod: ac,
            timesteps,
            sigmas,
            final_alpha_cumprod,
        })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The standard deviation of the starting latents.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SamplerKind::Ddim => 1.0,
            SamplerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                (max * max + 1.0).sqrt()
            }
        }
    }

    /// What the UNet sees at step `i` (Euler works on σ-scaled latents).
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            SamplerKind::Ddim => Ok(x.clone()),
            SamplerKind::EulerAncestral => {
                let s = self.sigmas[i];
                Ok((x / (s * s + 1.0).sqrt())?)
            }
        }
    }

    /// From x at step `i` to x at step `i + 1`, given the model output there.
    pub fn step(&self, model_output: &Tensor, i: usize, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        match self.kind {
            SamplerKind::Ddim => self.ddim_step(model_output, i, x),
            SamplerKind::EulerAncestral => self.euler_ancestral_step(model_output, i, x, rng),
        }
    }

    fn ddim_step(&self, out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let a = self.alphas_cumprod[t];
        let a_prev =
            if t >= self.step_ratio { self.alphas_cumprod[t - self.step_ratio] } else { self.final_alpha_cumprod };
        let (sa, s1a) = (a.sqrt(), (1.0 - a).sqrt());
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (((x - (out * s1a)?)? / sa)?, out.clone()),
            Prediction::V => (((x * sa)? - (out * s1a)?)?, ((out * sa)? + (x * s1a)?)?),
        };
        Ok(((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?)
    }

    fn euler_ancestral_step(&self, out: &Tensor, i: usize, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (sigma, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = match self.prediction {
            Prediction::Epsilon => (x - (out * sigma)?)?,
            Prediction::V => ((out * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (x / (sigma * sigma + 1.0))?)?,
        };
        let sigma_up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).max(0.0).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = ((x - &x0)? / sigma)?;
        let prev = (x + (derivative * (sigma_down - sigma))?)?;
        if sigma_up == 0.0 {
            return Ok(prev);
        }
        let noise = rng.randn(x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((prev + (noise * sigma_up)?)?)
    }
}

/// Classifier-free guidance: uncond + scale·(cond − uncond).
pub fn guidance(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale)?)?)
}
