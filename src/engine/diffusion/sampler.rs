//! Inference samplers (DDIM with η = 0, Euler, Euler ancestral, and the few-step LCM and TCD that
//! LCM-LoRA and TCD-LoRA need) behind one interface, following diffusers' `DDIMScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `LCMScheduler` and `TCDScheduler`
//! so that a seed's image is comparable, and classifier-free guidance. The loop: `x = randn·init_noise_sigma`, then per step
//! `out = unet(scale_model_input(x, i), timesteps[i])`, `x = step(out, i, x, rng)`.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::Result;
use crate::engine::diffusion::schedule::{NoiseSchedule, Prediction, TimestepSpacing};
use crate::engine::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    Ddim,
    EulerAncestral,
    /// diffusers' `EulerDiscreteScheduler` (no churn): deterministic, SDXL's default.
    Euler,
    /// diffusers' `LCMScheduler`: consistency steps for LCM models and LCM-LoRA (4–8 steps,
    /// guidance 1–2).
    Lcm,
    /// diffusers' `TCDScheduler` with its pipeline's default γ (η) = 0.3: for TCD-LoRA.
    Tcd,
}

/// Steps of the schedule LCM and TCD were distilled on (diffusers' `original_inference_steps`):
/// their timesteps are picked from it, so they take at most this many.
const DISTILLED_STEPS: usize = 50;
/// LCM's boundary condition: σ_data and the timestep scaling (diffusers' defaults).
const LCM_SIGMA_DATA: f64 = 0.5;
const LCM_TIMESTEP_SCALING: f64 = 10.0;
/// TCD's γ (η in diffusers' `step`, `eta` of its pipeline): how far each step goes back towards
/// the next timestep before fresh noise is added; 0.3 is the pipeline's and ComfyUI's default.
const TCD_GAMMA: f64 = 0.3;

impl SamplerKind {
    pub const ALL: [SamplerKind; 5] =
        [SamplerKind::Ddim, SamplerKind::EulerAncestral, SamplerKind::Euler, SamplerKind::Lcm, SamplerKind::Tcd];

    /// Few-step samplers for distilled models and LoRAs: run without guidance, 4–8 steps.
    pub fn is_few_step(self) -> bool {
        matches!(self, SamplerKind::Lcm | SamplerKind::Tcd)
    }

    /// Human-readable name for menus.
    pub fn label(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Euler => "Euler",
            SamplerKind::Lcm => "LCM",
            SamplerKind::Tcd => "TCD",
        }
    }

    /// The name AUTOMATIC1111 writes in an image's `Sampler:` field (its menu names, which are
    /// also ours; A1111 has no TCD, so that one is ComfyUI's and the TCD extensions' spelling).
    pub fn a1111_name(self) -> &'static str {
        self.label()
    }

    /// The sampler an A1111 `Sampler:` field names, if it is one of ours (also ComfyUI's
    /// `euler_ancestral` and our own ids); `DPM++ 2M` and the rest are not.
    pub fn from_a1111_name(name: &str) -> Option<SamplerKind> {
        name.trim().parse().ok()
    }

    /// Short name for the command line and saved settings.
    pub fn id(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::Euler => "euler",
            SamplerKind::Lcm => "lcm",
            SamplerKind::Tcd => "tcd",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for SamplerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['_', ' '], "-").as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler-a" | "euler-ancestral" | "eulera" => Ok(SamplerKind::EulerAncestral),
            "euler" => Ok(SamplerKind::Euler),
            "lcm" => Ok(SamplerKind::Lcm),
            "tcd" => Ok(SamplerKind::Tcd),
            _ => bail!("unknown sampler `{s}` (expected ddim, euler-a, euler, lcm or tcd)"),
        }
    }
}

/// Per-step coefficients, precomputed so `step` is two or three tensor ops.
#[derive(Debug, Clone)]
enum Coefficients {
    /// (ᾱ at this step's timestep, ᾱ at the previous one), per step.
    Ddim(Vec<(f64, f64)>),
    /// σ per step, plus a final 0.
    Euler(Vec<f64>),
    /// (ᾱ at this step, ᾱ at the next step's timestep, c_skip, c_out), per step.
    Lcm(Vec<(f64, f64, f64, f64)>),
    /// (ᾱ at this step, ᾱ at the next step's timestep (0 after the last), ᾱ at s = ⌊(1 − γ)·next⌋).
    Tcd(Vec<(f64, f64, f64)>),
}

impl Coefficients {
    /// ᾱ at step `i`'s timestep, for the samplers that work in ᾱ.
    fn alpha(&self, i: usize) -> Option<f64> {
        match self {
            Coefficients::Ddim(a) => Some(a[i].0),
            Coefficients::Lcm(a) => Some(a[i].0),
            Coefficients::Tcd(a) => Some(a[i].0),
            Coefficients::Euler(_) => None,
        }
    }
}

/// A sampler set up for one number of steps. Stateless between steps (the step index is passed
/// in), so it can be shared and a run can be resumed at any step.
#[derive(Debug, Clone)]
pub struct Sampler {
    kind: SamplerKind,
    prediction: Prediction,
    timesteps: Vec<usize>,
    model_timesteps: Vec<f64>,
    coefficients: Coefficients,
    init_noise_sigma: f64,
}

/// numpy's `round` (half to even), which diffusers' timestep spacing goes through.
fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

impl Sampler {
    /// Sets up `steps` inference steps over `schedule` (its config supplies the spacing,
    /// `steps_offset`, `set_alpha_to_one` and the prediction type).
    pub fn new(kind: SamplerKind, schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        let cfg = schedule.config();
        let train = schedule.len();
        if steps == 0 || steps > train {
            bail!("{steps} sampling steps requested; must be between 1 and {train}");
        }
        let acp = schedule.alphas_cumprod();
        if kind.is_few_step() {
            return Self::few_step(kind, schedule, steps);
        }
        // Timesteps, highest first. DDIM casts them to integers; Euler keeps linspace's fractions.
        let spaced: Vec<f64> = match cfg.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = train / steps;
                (0..steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
            TimestepSpacing::Linspace => {
                // As np.linspace: i·step, with the end point set exactly.
                let last = (train - 1) as f64;
                let step = if steps == 1 { 0.0 } else { last / (steps - 1) as f64 };
                let at = |i: usize| if i + 1 == steps && steps > 1 { last } else { i as f64 * step };
                let raw = (0..steps).rev().map(at);
                match kind {
                    SamplerKind::EulerAncestral | SamplerKind::Euler => raw.map(|t| t as f32 as f64).collect(),
                    _ => raw.map(np_round).collect(),
                }
            }
            TimestepSpacing::Trailing => {
                // diffusers: round(arange(T, 0, -T/n)) - 1. Computed per index, because numpy's
                // float arange yields one value too many for some n (61, 103, …).
                let ratio = train as f64 / steps as f64;
                (0..steps).map(|i| np_round(train as f64 - i as f64 * ratio) - 1.0).collect()
            }
        };
        if let Some(&t) = spaced.iter().find(|&&t| t < 0.0 || t > (train - 1) as f64) {
            bail!("timestep {t} (from {steps} steps and steps_offset {}) is outside 0..{train}", cfg.steps_offset);
        }
        let timesteps: Vec<usize> = spaced.iter().map(|&t| np_round(t) as usize).collect();

        let (coefficients, init_noise_sigma) = match kind {
            SamplerKind::Ddim | SamplerKind::Lcm | SamplerKind::Tcd => {
                // diffusers steps to t − T/n whatever the spacing; below 0 it uses the "final" ᾱ.
                let final_alpha = if cfg.set_alpha_to_one { 1.0 } else { acp[0] };
                let jump = train / steps;
                let pairs =
                    timesteps.iter().map(|&t| (acp[t], if t >= jump { acp[t - jump] } else { final_alpha })).collect();
                (Coefficients::Ddim(pairs), 1.0)
            }
            SamplerKind::EulerAncestral | SamplerKind::Euler => {
                // σ(t) = √((1−ᾱ)/ᾱ), linearly interpolated between integer timesteps (np.interp).
                // A zero-terminal-SNR schedule's last ᾱ is 0 (σ = ∞); diffusers uses 2⁻²⁴ there.
                let sigma = |t: usize| {
                    let a = acp[t].max(2f64.powi(-24));
                    ((1.0 - a) / a).sqrt()
                };
                let mut sigmas: Vec<f64> = spaced
                    .iter()
                    .map(|&t| {
                        let lo = t.floor() as usize;
                        let hi = (lo + 1).min(train - 1);
                        let frac = t - lo as f64;
                        (sigma(lo) * (1.0 - frac) + sigma(hi) * frac) as f32 as f64
                    })
                    .collect();
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                sigmas.push(0.0);
                let init = match cfg.timestep_spacing {
                    TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                };
                (Coefficients::Euler(sigmas), init)
            }
        };
        let model_timesteps = match kind {
            SamplerKind::EulerAncestral | SamplerKind::Euler => spaced,
            _ => timesteps.iter().map(|&t| t as f64).collect(),
        };
        Ok(Self { kind, prediction: schedule.prediction(), timesteps, model_timesteps, coefficients, init_noise_sigma })
    }

    /// LCM and TCD: `steps` timesteps picked evenly (by index) from the 50-step schedule they were
    /// distilled on, (1..=50)·(T/50) − 1 from the top, whatever the model's own spacing.
    fn few_step(kind: SamplerKind, schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        if steps > DISTILLED_STEPS {
            bail!(
                "{} takes at most {DISTILLED_STEPS} steps (the schedule it was distilled on); {steps} requested",
                kind.label()
            );
        }
        let acp = schedule.alphas_cumprod();
        let jump = schedule.len() / DISTILLED_STEPS;
        if jump == 0 {
            bail!(
                "{} needs a schedule of at least {DISTILLED_STEPS} training timesteps; this model's has {}",
                kind.label(),
                schedule.len()
            );
        }
        let origin: Vec<usize> = (1..=DISTILLED_STEPS).rev().map(|i| i * jump - 1).collect();
        // np.floor(np.linspace(0, 50, steps, endpoint=False)).
        let timesteps: Vec<usize> = (0..steps).map(|i| origin[i * DISTILLED_STEPS / steps]).collect();
        let next = |i: usize| timesteps.get(i + 1).copied();
        let coefficients = match kind {
            SamplerKind::Lcm => Coefficients::Lcm(
                (0..steps)
                    .map(|i| {
                        let t = timesteps[i];
                        let scaled = t as f64 * LCM_TIMESTEP_SCALING;
                        let c_skip = LCM_SIGMA_DATA.powi(2) / (scaled * scaled + LCM_SIGMA_DATA.powi(2));
                        let c_out = scaled / (scaled * scaled + LCM_SIGMA_DATA.powi(2)).sqrt();
                        // After the last step diffusers reuses the step's own timestep (unused:
                        // the last step returns the denoised latents).
                        (acp[t], acp[next(i).unwrap_or(t)], c_skip, c_out)
                    })
                    .collect(),
            ),
            _ => Coefficients::Tcd(
                (0..steps)
                    .map(|i| {
                        let prev = next(i).unwrap_or(0);
                        let s = ((1.0 - TCD_GAMMA) * prev as f64).floor() as usize;
                        (acp[timesteps[i]], acp[prev], acp[s])
                    })
                    .collect(),
            ),
        };
        let model_timesteps = timesteps.iter().map(|&t| t as f64).collect();
        Ok(Self {
            kind,
            prediction: schedule.prediction(),
            timesteps,
            model_timesteps,
            coefficients,
            init_noise_sigma: 1.0,
        })
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The training timestep of each step, highest first.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep to give the UNet at step `i`. Equal to `timesteps()[i]` except for Euler with
    /// "linspace" spacing, where diffusers feeds fractional timesteps (`timesteps()` rounds them).
    pub fn model_timestep(&self, i: usize) -> f64 {
        self.model_timesteps[i]
    }

    /// Multiplier for the initial standard-normal latents.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The sampler's noise level at step `i` in σ terms (Euler); for DDIM √((1−ᾱ)/ᾱ) of the step.
    pub fn sigma(&self, i: usize) -> f64 {
        match (&self.coefficients, self.coefficients.alpha(i)) {
            (Coefficients::Euler(s), _) => s[i],
            (_, Some(a)) => ((1.0 - a) / a).sqrt(),
            (_, None) => unreachable!("every sampler but Euler works in ᾱ"),
        }
    }

    /// What the UNet sees at step `i`: Euler's latents live at scale √(σ²+1) and are brought back to
    /// the unit-variance input the model was trained on; DDIM's already are.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match &self.coefficients {
            Coefficients::Euler(s) => Ok((x * (1.0 / (s[i] * s[i] + 1.0).sqrt()))?),
            _ => Ok(x.clone()),
        }
    }

    /// Noises clean latents `x0` to the level of step `i` (img2img starts there).
    pub fn noise_to(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        match (&self.coefficients, self.coefficients.alpha(i)) {
            (Coefficients::Euler(s), _) => Ok((x0 + (noise * s[i])?)?),
            (_, Some(a)) => Ok(((x0 * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?),
            (_, None) => unreachable!("every sampler but Euler works in ᾱ"),
        }
    }

    /// One denoising step from step `i`'s latents `x` given the UNet's output there. Computed in
    /// f32 (half-precision latents drift otherwise) and returned in `x`'s dtype. `rng` supplies
    /// the fresh noise of Euler ancestral, LCM and TCD; DDIM (η = 0) and Euler draw nothing.
    pub fn step(&self, model_output: &Tensor, i: usize, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.step_with(model_output, i, x, |shape, device| rng.randn(shape, device))
    }

    /// `step`, with the fresh noise (when the step adds any) from `noise`.
    pub(crate) fn step_with(
        &self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        noise: impl FnOnce(&candle_core::Shape, &candle_core::Device) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            bail!("step {i} is past the last of {} steps", self.timesteps.len());
        }
        let m = model_output.to_dtype(DType::F32)?;
        let xf = x.to_dtype(DType::F32)?;
        let last = i + 1 == self.timesteps.len();
        // x̂₀ = ux·x + um·m and ε̂ = ex·x + em·m at ᾱ = a.
        let estimates = |a: f64| {
            let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
            match self.prediction {
                Prediction::Epsilon => ((1.0 / sa, -sb / sa), (0.0, 1.0)),
                Prediction::V => ((sa, -sb), (sb, sa)),
            }
        };
        // Every update below is linear: prev = cx·x + cm·m (+ σ_up·noise).
        let (cx, cm, sigma_up) = match &self.coefficients {
            Coefficients::Ddim(pairs) => {
                let (a, a_prev) = pairs[i];
                let (pa, pb) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
                // prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂.
                let ((ux, um), (ex, em)) = estimates(a);
                (pa * ux + pb * ex, pa * um + pb * em, 0.0)
            }
            Coefficients::Lcm(steps) => {
                let (a, a_next, c_skip, c_out) = steps[i];
                // The consistency function's output c_out·x̂₀ + c_skip·x; then, but for the last
                // step, noised afresh to the next timestep.
                let ((ux, um), _) = estimates(a);
                let (dx, dm) = (c_out * ux + c_skip, c_out * um);
                if last { (dx, dm, 0.0) } else { (a_next.sqrt() * dx, a_next.sqrt() * dm, (1.0 - a_next).sqrt()) }
            }
            Coefficients::Tcd(steps) => {
                let (a, a_next, a_s) = steps[i];
                // x̂ at s: √ᾱ_s·x̂₀ + √(1−ᾱ_s)·ε̂; then, but for the last step, forward to the next
                // timestep with fresh noise.
                let ((ux, um), (ex, em)) = estimates(a);
                let (ps, qs) = (a_s.sqrt(), (1.0 - a_s).sqrt());
                let (sx, sm) = (ps * ux + qs * ex, ps * um + qs * em);
                if last || TCD_GAMMA == 0.0 {
                    (sx, sm, 0.0)
                } else {
                    let keep = (a_next / a_s).sqrt();
                    (keep * sx, keep * sm, (1.0 - a_next / a_s).max(0.0).sqrt())
                }
            }
            Coefficients::Euler(sigmas) => {
                let (s, s_next) = (sigmas[i], sigmas[i + 1]);
                // x̂₀ = ux·x + um·m.
                let (ux, um) = match self.prediction {
                    Prediction::Epsilon => (1.0, -s),
                    Prediction::V => (1.0 / (s * s + 1.0), -s / (s * s + 1.0).sqrt()),
                };
                // Euler a splits the move to σ_next into a deterministic part down to σ_down and
                // fresh noise of size σ_up, with σ_down² + σ_up² = σ_next²; Euler goes all the
                // way deterministically (σ_up = 0).
                let up = match self.kind {
                    SamplerKind::Euler => 0.0,
                    _ => (s_next * s_next * (s * s - s_next * s_next) / (s * s)).max(0.0).sqrt(),
                };
                let down = (s_next * s_next - up * up).max(0.0).sqrt();
                // prev = x + (x − x̂₀)/σ · (σ_down − σ) = x̂₀ + r·(x − x̂₀) with r = σ_down/σ.
                let r = down / s;
                ((1.0 - r) * ux + r, (1.0 - r) * um, up)
            }
        };
        let mut prev = ((&xf * cx)? + (&m * cm)?)?;
        if sigma_up > 0.0 {
            let noise = noise(xf.shape(), xf.device())?.to_dtype(DType::F32)?;
            prev = (prev + (noise * sigma_up)?)?;
        }
        Ok(prev.to_dtype(x.dtype())?)
    }
}

/// Classifier-free guidance: uncond + scale·(cond − uncond).
pub fn guidance(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale)?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::engine::diffusion::schedule::test_util::*;
    use crate::engine::diffusion::schedule::{SchedulerConfig, TimestepSpacing};

    fn sd1_schedule(prediction: Prediction, spacing: TimestepSpacing) -> NoiseSchedule {
        let path = fixtures_dir().join("sd1-tiny/model/scheduler/scheduler_config.json");
        let mut cfg = SchedulerConfig::from_file(&path).unwrap();
        cfg.prediction_type = prediction;
        cfg.timestep_spacing = spacing;
        NoiseSchedule::new(&cfg).unwrap()
    }

    #[test]
    fn ddim_timesteps_match_diffusers() {
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Leading);
        let ddim = Sampler::new(SamplerKind::Ddim, &s, 20).unwrap();
        let reference = sd1_reference()["ddim_timesteps_20"].to_vec1::<i64>().unwrap();
        let ours: Vec<i64> = ddim.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(ours, reference);
        assert_eq!(ddim.init_noise_sigma(), 1.0);
        // Euler a with "leading" uses the same timesteps.
        let euler = Sampler::new(SamplerKind::EulerAncestral, &s, 20).unwrap();
        assert_eq!(euler.timesteps(), ddim.timesteps());
    }

    #[test]
    fn other_spacings() {
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Trailing);
        let t = Sampler::new(SamplerKind::Ddim, &s, 20).unwrap();
        assert_eq!(t.timesteps(), (0..20).rev().map(|i| i * 50 + 49).collect::<Vec<_>>().as_slice());
        // n = 61 is one of the step counts where numpy's float arange would add a 62nd timestep.
        let t = Sampler::new(SamplerKind::Ddim, &s, 61).unwrap();
        assert_eq!((t.timesteps().len(), t.timesteps()[0], t.timesteps()[60]), (61, 999, 15));
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Linspace);
        let l = Sampler::new(SamplerKind::Ddim, &s, 4).unwrap();
        assert_eq!(l.timesteps(), &[999, 666, 333, 0]);
        let e = Sampler::new(SamplerKind::EulerAncestral, &s, 4).unwrap();
        assert_eq!(e.model_timestep(1), 666.0);
        let e = Sampler::new(SamplerKind::EulerAncestral, &s, 7).unwrap();
        assert_eq!((e.timesteps()[1], e.model_timestep(1)), (832, 832.5));
        // σ interpolates halfway between the integer timesteps; init σ is σ_max for linspace.
        let acp = s.alphas_cumprod();
        let sig = |t: usize| ((1.0 - acp[t]) / acp[t]).sqrt();
        assert!((e.sigma(1) - (sig(832) + sig(833)) / 2.0).abs() < 1e-5);
        assert!((e.init_noise_sigma() - sig(999)).abs() < 1e-5);
        assert!(Sampler::new(SamplerKind::Ddim, &s, 0).is_err());
        assert!(Sampler::new(SamplerKind::Ddim, &s, 1001).is_err());
    }

    /// diffusers' Euler ancestral on a zero-terminal-SNR schedule caps ᾱ at 2⁻²⁴: σ_max = 4096.
    #[test]
    fn euler_a_on_zero_terminal_snr() {
        let mut cfg = SchedulerConfig::stable_diffusion(Prediction::V);
        cfg.rescale_betas_zero_snr = true;
        cfg.timestep_spacing = TimestepSpacing::Trailing;
        let s = NoiseSchedule::new(&cfg).unwrap();
        let e = Sampler::new(SamplerKind::EulerAncestral, &s, 20).unwrap();
        assert_eq!(&e.timesteps()[..3], &[999, 949, 899]);
        // diffusers 0.42.1: init_noise_sigma 4096, sigmas 4096, 40.392, 18.130.
        assert!((e.init_noise_sigma() - 4096.0).abs() < 1e-3, "{}", e.init_noise_sigma());
        assert!((e.sigma(1) - 40.3923).abs() < 2e-3 && (e.sigma(2) - 18.1301).abs() < 2e-3);
        let d = Sampler::new(SamplerKind::Ddim, &s, 20).unwrap();
        assert_eq!(d.timesteps()[0], 999);
    }

    #[test]
    fn ddim_step_matches_diffusers() -> Result<()> {
        let r = sd1_reference();
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Leading);
        let ddim = Sampler::new(SamplerKind::Ddim, &s, 20)?;
        let t = r["ddim_step_t"].to_vec1::<i64>()?[0] as usize;
        let i = ddim.timesteps().iter().position(|&x| x == t).expect("fixture timestep among the 20");
        let x = r["sample"].i(0..1)?;
        let eps = r["noise_pred"].i(0..1)?;
        let prev = ddim.step(&eps, i, &x, &mut Rng::new(0))?;
        assert_close(&prev, &r["ddim_step_prev_sample"], "ddim step");

        // The same step by a v-prediction model: v = (ε − √(1−ᾱ)·x)/√ᾱ must land on the same latents.
        let a = s.alphas_cumprod()[t];
        let v = ((&eps - (&x * (1.0 - a).sqrt())?)? * (1.0 / a.sqrt()))?;
        let sv = sd1_schedule(Prediction::V, TimestepSpacing::Leading);
        let prev_v = Sampler::new(SamplerKind::Ddim, &sv, 20)?.step(&v, i, &x, &mut Rng::new(0))?;
        assert_close(&prev_v, &r["ddim_step_prev_sample"], "ddim step, v-prediction");

        // Half precision in, half precision out.
        let half = ddim.step(&eps.to_dtype(DType::F16)?, i, &x.to_dtype(DType::F16)?, &mut Rng::new(0))?;
        assert_eq!(half.dtype(), DType::F16);
        Ok(())
    }

    /// LCM and TCD against diffusers' `LCMScheduler` / `TCDScheduler` (tests/fixtures/few_step):
    /// the timesteps for several step counts, and every step of a 4-step run, ε and v, fed the
    /// same fresh noise as diffusers' step drew.
    #[test]
    fn lcm_and_tcd_match_diffusers() -> Result<()> {
        let path = fixtures_dir().join("few_step/reference.safetensors");
        let r = crate::engine::io::weights::read_safetensors(&path)?;
        for (kind, name) in [(SamplerKind::Lcm, "lcm"), (SamplerKind::Tcd, "tcd")] {
            let schedule = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Leading);
            for n in [1, 2, 3, 4, 6, 8, 50] {
                let sampler = Sampler::new(kind, &schedule, n)?;
                let expect = r[&format!("{name}_timesteps_{n}")].to_vec1::<i64>()?;
                let ours: Vec<i64> = sampler.timesteps().iter().map(|&t| t as i64).collect();
                assert_eq!(ours, expect, "{name} timesteps for {n} steps");
                assert_eq!(sampler.init_noise_sigma(), 1.0);
            }
            assert!(Sampler::new(kind, &schedule, 51).is_err(), "{name} beyond its distilled 50 steps");
            let mut short = SchedulerConfig::stable_diffusion(Prediction::Epsilon);
            short.num_train_timesteps = 20;
            assert!(Sampler::new(kind, &NoiseSchedule::new(&short)?, 4).is_err(), "{name} on 20 timesteps");
            for (prediction, pname) in [(Prediction::Epsilon, "epsilon"), (Prediction::V, "v_prediction")] {
                let sampler = Sampler::new(kind, &sd1_schedule(prediction, TimestepSpacing::Leading), 4)?;
                for i in 0..4 {
                    let x = sampler.scale_model_input(&r["sample"], i)?;
                    let prev = sampler.step_with(&r["model_output"], i, &x, |_, _| Ok(r["noise"].clone()))?;
                    assert_close(&prev, &r[&format!("{name}_{pname}_step_{i}")], &format!("{name} {pname} step {i}"));
                }
            }
        }
        Ok(())
    }

    /// The exact denoiser for Gaussian data x₀ ~ N(μ, s²): what a perfectly trained UNet outputs
    /// (ε or v) for VP-scaled input `xt` at timestep `t`.
    fn gaussian_denoiser(xt: &Tensor, t: f64, s: &NoiseSchedule, mu: f64, sd: f64, p: Prediction) -> Tensor {
        let acp = s.alphas_cumprod();
        let lo = t.floor() as usize;
        let frac = t - lo as f64;
        let a = acp[lo] * (1.0 - frac) + acp[(lo + 1).min(acp.len() - 1)] * frac;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let gain = sa * sd * sd / (a * sd * sd + 1.0 - a);
        let x0 = ((xt - sa * mu).unwrap() * gain).unwrap() + mu;
        let x0 = x0.unwrap();
        let eps = ((xt - (&x0 * sa).unwrap()).unwrap() * (1.0 / sb)).unwrap();
        match p {
            Prediction::Epsilon => eps,
            Prediction::V => ((eps * sa).unwrap() - (x0 * sb).unwrap()).unwrap(),
        }
    }

    fn sample(kind: SamplerKind, s: &NoiseSchedule, steps: usize, seed: u64, mu: f64, sd: f64) -> Result<Tensor> {
        let sampler = Sampler::new(kind, s, steps)?;
        let mut rng = Rng::new(seed);
        let mut x = (rng.randn((1, 4, 64, 64), &Device::Cpu)? * sampler.init_noise_sigma())?;
        for i in 0..sampler.num_steps() {
            let input = sampler.scale_model_input(&x, i)?;
            let out = gaussian_denoiser(&input, sampler.model_timestep(i), s, mu, sd, s.prediction());
            x = sampler.step(&out, i, &x, &mut rng)?;
        }
        Ok(x)
    }

    fn mean_std(t: &Tensor) -> (f64, f64) {
        let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt())
    }

    /// The spread a sampler should produce for N(μ, s²) data under the ideal denoiser, from the
    /// update rules written out independently on scalars: each step maps the centred latents
    /// linearly (variance × k²) and Euler a adds σ_up² of fresh noise. It is below s because few
    /// large steps lose variance, a property of DDIM and Euler a themselves.
    fn expected_std(kind: SamplerKind, s: &NoiseSchedule, ts: &[usize], init_var: f64, sd: f64) -> f64 {
        let acp = s.alphas_cumprod();
        let jump = acp.len() / ts.len();
        let mut var = init_var;
        match kind {
            SamplerKind::Ddim => {
                for &t in ts {
                    let a = acp[t];
                    let ap = if t >= jump { acp[t - jump] } else { acp[0] };
                    let g = a.sqrt() * sd * sd / (a * sd * sd + 1.0 - a);
                    let k = ap.sqrt() * g + (1.0 - ap).sqrt() * (1.0 - a.sqrt() * g) / (1.0 - a).sqrt();
                    var *= k * k;
                }
            }
            SamplerKind::EulerAncestral | SamplerKind::Euler => {
                let mut sig: Vec<f64> = ts.iter().map(|&t| ((1.0 - acp[t]) / acp[t]).sqrt()).collect();
                sig.push(0.0);
                for w in sig.windows(2) {
                    let (s0, s1) = (w[0], w[1]);
                    let c = sd * sd / (sd * sd + s0 * s0);
                    let up2 = if kind == SamplerKind::Euler { 0.0 } else { s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0) };
                    let r = (s1 * s1 - up2).sqrt() / s0;
                    var = ((1.0 - r) * c + r).powi(2) * var + up2;
                }
            }
            SamplerKind::Lcm | SamplerKind::Tcd => {
                // The centred x̂₀ is g·x; LCM's output c_out·x̂₀ + c_skip·x, TCD's the DDIM jump to
                // s = ⌊0.7·next⌋; then, but at the end, noised afresh to the next timestep.
                for (i, &t) in ts.iter().enumerate() {
                    let a = acp[t];
                    let g = a.sqrt() * sd * sd / (a * sd * sd + 1.0 - a);
                    let next = ts.get(i + 1).copied();
                    let (k, from) = if kind == SamplerKind::Lcm {
                        let scaled = t as f64 * 10.0;
                        let (c_skip, c_out) =
                            (0.25 / (scaled * scaled + 0.25), scaled / (scaled * scaled + 0.25).sqrt());
                        (c_out * g + c_skip, 1.0)
                    } else {
                        let a_s = acp[(0.7 * next.unwrap_or(0) as f64).floor() as usize];
                        (a_s.sqrt() * g + (1.0 - a_s).sqrt() * (1.0 - a.sqrt() * g) / (1.0 - a).sqrt(), a_s)
                    };
                    var *= k * k;
                    if let Some(n) = next {
                        var = var * acp[n] / from + (1.0 - acp[n] / from);
                    }
                }
            }
        }
        var.sqrt()
    }

    #[test]
    fn samplers_reproduce_the_data_distribution() -> Result<()> {
        // With the ideal denoiser for N(0.3, 0.5²) data the samples' spread must match the
        // closed-form value: too much or too little ancestral noise, a wrong input scale or a
        // wrong ᾱ_prev all show here. 16k samples give the std to about ±0.003.
        let (mu, sd) = (0.3, 0.5);
        for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            for p in [Prediction::Epsilon, Prediction::V] {
                let s = sd1_schedule(p, spacing);
                for kind in SamplerKind::ALL {
                    let sampler = Sampler::new(kind, &s, 30)?;
                    let init_var = sampler.init_noise_sigma().powi(2);
                    let want = expected_std(kind, &s, sampler.timesteps(), init_var, sd);
                    let x = sample(kind, &s, 30, 1, mu, sd)?;
                    let (m, d) = mean_std(&x);
                    assert!((d - want).abs() < 0.012, "{kind} {spacing:?} {p:?}: std {d}, expected {want}");
                    assert!((m - mu).abs() < 0.03, "{kind} {spacing:?} {p:?}: mean {m}");
                }
            }
        }
        // Linspace (fractional Euler timesteps) and many steps: close to the data itself (LCM and
        // TCD take at most 50 steps, and their last step keeps the denoiser's shrinkage).
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Linspace);
        for kind in SamplerKind::ALL.into_iter().filter(|k| !k.is_few_step()) {
            let (m, d) = mean_std(&sample(kind, &s, 200, 2, mu, sd)?);
            assert!((m - mu).abs() < 0.02 && (d - sd).abs() < 0.03, "{kind} linspace: mean {m}, std {d}");
        }
        Ok(())
    }

    #[test]
    fn euler_a_converges_to_a_known_image_and_is_seeded() -> Result<()> {
        // A point mass (std 0) is a perfect denoiser for one known x₀: sampling must return it.
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Leading);
        let x = sample(SamplerKind::EulerAncestral, &s, 20, 3, 0.7, 0.0)?;
        let (m, d) = mean_std(&x);
        assert!((m - 0.7).abs() < 1e-4 && d < 1e-4, "mean {m}, std {d}");
        // Same seed, same image; another seed, another image.
        let a = sample(SamplerKind::EulerAncestral, &s, 10, 42, 0.0, 1.0)?;
        let b = sample(SamplerKind::EulerAncestral, &s, 10, 42, 0.0, 1.0)?;
        let c = sample(SamplerKind::EulerAncestral, &s, 10, 43, 0.0, 1.0)?;
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        assert!((a - c)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.1);
        Ok(())
    }

    #[test]
    fn euler_a_init_sigma_and_input_scale() -> Result<()> {
        let s = sd1_schedule(Prediction::Epsilon, TimestepSpacing::Leading);
        let e = Sampler::new(SamplerKind::EulerAncestral, &s, 20)?;
        let acp = s.alphas_cumprod()[951];
        let sigma = ((1.0 - acp) / acp).sqrt();
        assert!((e.init_noise_sigma() - (sigma * sigma + 1.0).sqrt()).abs() < 1e-4);
        let x = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu)?;
        let scaled = e.scale_model_input(&x, 0)?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        assert!((scaled - acp.sqrt()).abs() < 1e-5, "1/√(σ²+1) = √ᾱ");
        Ok(())
    }

    #[test]
    fn guidance_and_names() -> Result<()> {
        let u = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let c = Tensor::new(&[2f32, 0.0], &Device::Cpu)?;
        assert_eq!(guidance(&u, &c, 7.5)?.to_vec1::<f32>()?, vec![8.5, -13.0]);
        assert_eq!(guidance(&u, &c, 1.0)?.to_vec1::<f32>()?, vec![2.0, 0.0]);
        for k in SamplerKind::ALL {
            assert_eq!(k.id().parse::<SamplerKind>()?, k);
        }
        assert_eq!("Euler_A".parse::<SamplerKind>()?, SamplerKind::EulerAncestral);
        assert!("pndm".parse::<SamplerKind>().is_err());
        Ok(())
    }

    /// SDXL's default sampler (diffusers' `EulerDiscreteScheduler` with "leading" spacing and a
    /// steps_offset of one) against the sdxl-tiny fixture: timesteps, σs, the initial noise scale,
    /// the input scaling and one deterministic step x + (σ_next − σ)·ε.
    #[test]
    fn euler_matches_diffusers_on_sdxl_schedule() -> Result<()> {
        let dir = fixtures_dir().join("sdxl-tiny");
        let cfg = SchedulerConfig::from_file(&dir.join("model/scheduler/scheduler_config.json"))?;
        let r = crate::engine::io::weights::read_safetensors(&dir.join("reference.safetensors"))?;
        let s = Sampler::new(SamplerKind::Euler, &NoiseSchedule::new(&cfg)?, 30)?;
        let timesteps: Vec<f32> = r["euler_timesteps_30"].to_vec1()?;
        let ours: Vec<f32> = (0..30).map(|i| s.model_timestep(i) as f32).collect();
        assert_eq!(ours, timesteps);
        let sigmas: Vec<f32> = r["euler_sigmas_30"].to_vec1()?;
        for (i, want) in sigmas.iter().enumerate().take(30) {
            assert!((s.sigma(i) as f32 - want).abs() <= 1e-5 * want.max(1.0), "σ[{i}] {} vs {want}", s.sigma(i));
        }
        let init = r["euler_init_noise_sigma"].to_vec1::<f32>()?[0];
        assert!((s.init_noise_sigma() as f32 - init).abs() <= 1e-5 * init);
        let i = 10; // the fixture's timestep is the 11th of 30
        assert_eq!(s.model_timestep(i) as f32, r["timestep"].to_vec1::<f32>()?[0]);
        let sample = r["sample"].i(0..1)?;
        let close = |name: &str, ours: &Tensor| -> Result<()> {
            let want = &r[name];
            let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-4 * scale, "{name}: {diff} of {scale}");
            Ok(())
        };
        close("euler_scaled_sample", &s.scale_model_input(&sample, i)?)?;
        let prev = s.step(&r["noise_pred"].i(0..1)?, i, &sample, &mut Rng::new(0))?;
        close("euler_step_prev_sample", &prev)
    }
}
