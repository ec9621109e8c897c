//! The diffusion noise schedule: diffusers' `scheduler_config.json`, the betas and cumulative alphas
//! it defines, and the training-side maths on top (noising, v-prediction targets, SNR weights).
//! The samplers in `sampler.rs` read their timesteps and coefficients from here.

use std::path::Path;

use anyhow::{anyhow, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::engine::Result;

/// What the UNet is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prediction {
    /// The added noise ε (SD 1.x, SD 2.x base 512).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768).
    #[serde(rename = "v_prediction")]
    V,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (what every Stable Diffusion uses).
    ScaledLinear,
}

/// How inference timesteps are picked from the training range (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

/// diffusers' `scheduler/scheduler_config.json`. Fields missing from a file take diffusers'
/// defaults, so a file means the same here as in Python; fields we do not use (`clip_sample`,
/// `thresholding`, `skip_prk_steps`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSchedulerConfig")]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Prediction,
    pub steps_offset: usize,
    pub timestep_spacing: TimestepSpacing,
    /// DDIM: whether the step past t = 0 uses ᾱ = 1 (true) or ᾱ₀ (false, as SD configs say).
    pub set_alpha_to_one: bool,
    /// Shift and scale √ᾱ so the last timestep is pure noise (Lin et al. 2024, "Common Diffusion
    /// Noise Schedules and Sample Steps are Flawed"); needs v-prediction.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// The file as written, before validation; defaults are diffusers' `DDIMScheduler` defaults.
#[derive(Deserialize)]
struct RawSchedulerConfig {
    #[serde(default = "default_train_timesteps")]
    num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    beta_start: f64,
    #[serde(default = "default_beta_end")]
    beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    beta_schedule: String,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    prediction_type: String,
    #[serde(default)]
    steps_offset: usize,
    #[serde(default = "default_spacing")]
    timestep_spacing: String,
    #[serde(default = "default_true")]
    set_alpha_to_one: bool,
    #[serde(default)]
    rescale_betas_zero_snr: bool,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
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

impl TryFrom<RawSchedulerConfig> for SchedulerConfig {
    type Error = String;

    fn try_from(raw: RawSchedulerConfig) -> std::result::Result<Self, String> {
        let beta_schedule = match raw.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            other => return Err(format!("beta_schedule `{other}` is not supported (only linear and scaled_linear)")),
        };
        let prediction_type = match raw.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => return Err(format!("prediction_type `{other}` is not supported (only epsilon and v_prediction)")),
        };
        let timestep_spacing = match raw.timestep_spacing.as_str() {
            "leading" => TimestepSpacing::Leading,
            "linspace" => TimestepSpacing::Linspace,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err(format!(
                    "timestep_spacing `{other}` is not supported (only leading, linspace and trailing)"
                ));
            }
        };
        let cfg = SchedulerConfig {
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type,
            steps_offset: raw.steps_offset,
            timestep_spacing,
            set_alpha_to_one: raw.set_alpha_to_one,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

/// Stable Diffusion's schedule with ε-prediction (not diffusers' class defaults, which only fill
/// fields missing from a file).
impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::stable_diffusion(Prediction::Epsilon)
    }
}

impl SchedulerConfig {
    /// The schedule every Stable Diffusion 1.x/2.x checkpoint was trained with, as its
    /// `scheduler_config.json` states it; for single-file checkpoints that carry no config.
    pub fn stable_diffusion(prediction: Prediction) -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: prediction,
            steps_offset: 1,
            timestep_spacing: TimestepSpacing::Leading,
            set_alpha_to_one: false,
            rescale_betas_zero_snr: false,
        }
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction_type
    }

    /// Single-file checkpoints decide the prediction type from the model family, not a config.
    pub fn set_prediction(&mut self, prediction: Prediction) {
        self.prediction_type = prediction;
    }

    pub fn from_json_str(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| anyhow!("invalid scheduler config: {e}"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid scheduler config: {e}", path.display()))
    }

    /// Checks the numbers (the enums are already checked by parsing).
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if t < 2 {
            bail!("num_train_timesteps must be at least 2, got {t}");
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != t {
                bail!("trained_betas has {} values but num_train_timesteps is {t}", b.len());
            }
            if b.iter().any(|b| !(*b > 0.0 && *b < 1.0)) {
                bail!("trained_betas must all lie in (0, 1)");
            }
        } else if !(self.beta_start > 0.0 && self.beta_end < 1.0 && self.beta_start <= self.beta_end) {
            bail!("beta_start {} / beta_end {} must satisfy 0 < start <= end < 1", self.beta_start, self.beta_end);
        }
        if self.rescale_betas_zero_snr && self.prediction_type == Prediction::Epsilon {
            // At zero SNR the input is pure noise, so ε is known and x₀ cannot be recovered from it.
            bail!(
                "rescale_betas_zero_snr = true needs prediction_type v_prediction (ε-prediction is undefined at zero SNR)"
            );
        }
        Ok(())
    }
}

/// Betas and cumulative alphas of a `SchedulerConfig`, plus the forward (noising) process.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    config: SchedulerConfig,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Computes the betas as diffusers does, in f32 (`torch.linspace(..., dtype=float32)`, squared
    /// for scaled_linear) and the cumulative product with an f64 accumulator rounded to f32 (torch's
    /// CPU cumprod), so `alphas_cumprod` reproduces diffusers to within one f32 ulp.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let betas32: Vec<f32> = match (&config.trained_betas, config.beta_schedule) {
            (Some(b), _) => b.iter().map(|&b| b as f32).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(config.beta_start.sqrt() as f32, config.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
        };
        let betas32 = if config.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas32) } else { betas32 };
        let mut acc = 1f64;
        let alphas_cumprod = betas32
            .iter()
            .map(|&b| {
                acc *= (1f32 - b) as f64;
                acc as f32 as f64
            })
            .collect();
        Ok(Self { config: config.clone(), betas: betas32.iter().map(|&b| b as f64).collect(), alphas_cumprod })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    pub fn prediction(&self) -> Prediction {
        self.config.prediction_type
    }
    /// Number of training timesteps (valid `t` are `0..len()`).
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }
    /// ᾱ_t for t in `0..len()`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), for min-SNR loss weighting.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// The noise level in "sigma" (variance-exploding) terms, √((1 − ᾱ_t)/ᾱ_t) = 1/√snr.
    pub fn sigma(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        ((1.0 - a) / a).sqrt()
    }

    /// Min-SNR-γ loss weight (Hang et al. 2023) at `t` for this schedule's prediction type:
    /// min(snr, γ)/snr for ε, min(snr, γ)/(snr + 1) for v.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        match self.prediction() {
            Prediction::Epsilon => snr.min(gamma) / snr,
            Prediction::V => snr.min(gamma) / (snr + 1.0),
        }
    }

    /// Per-sample coefficients as a (B, 1, 1, …) tensor matching `like`'s rank, dtype and device.
    fn per_sample(&self, like: &Tensor, timesteps: &[usize], f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let dims = like.dims();
        if dims.is_empty() || dims[0] != timesteps.len() {
            bail!("{} timesteps given for a batch of shape {dims:?}", timesteps.len());
        }
        if let Some(&t) = timesteps.iter().find(|&&t| t >= self.len()) {
            bail!("timestep {t} is out of range (the schedule has {} steps)", self.len());
        }
        let values: Vec<f32> = timesteps.iter().map(|&t| f(self.alphas_cumprod[t]) as f32).collect();
        let mut shape = vec![1usize; dims.len()];
        shape[0] = timesteps.len();
        Ok(Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, one timestep per batch entry. Plain tensor ops, so gradients
    /// flow through `x0` and `noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a = self.per_sample(x0, timesteps, f64::sqrt)?;
        let b = self.per_sample(x0, timesteps, |a| (1.0 - a).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a = self.per_sample(x0, timesteps, f64::sqrt)?;
        let b = self.per_sample(x0, timesteps, |a| (1.0 - a).sqrt())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?)
    }

    /// What the UNet should output for this prediction type: ε itself, or v.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction() {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::V => self.velocity(x0, noise, timesteps),
        }
    }
}

/// Lin et al.'s Algorithm 1 in f32, as diffusers computes it: √ᾱ is shifted so its last value is
/// 0 and scaled so its first is unchanged, then turned back into betas (the last one becomes 1).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let sqrt_bar: Vec<f32> = betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            (acc as f32).sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let bar: Vec<f32> = sqrt_bar.iter().map(|&s| ((s - last) * (first / (first - last))).powi(2)).collect();
    std::iter::once(1.0 - bar[0]).chain(bar.windows(2).map(|w| 1.0 - w[1] / w[0])).collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: f32 arithmetic, the first half
/// counted up from `start` and the second half down from `end`.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

/// Test helpers shared by the engine's fixture tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Tensor};

    pub(crate) use crate::engine::builtin::fixtures_dir;

    /// `crate::engine::io::weights::read_safetensors` of `sd1-tiny/reference.safetensors`.
    pub(crate) fn sd1_reference() -> std::collections::HashMap<String, Tensor> {
        let path = fixtures_dir().join("sd1-tiny/reference.safetensors");
        crate::engine::io::weights::read_safetensors(&path).unwrap_or_else(|e| panic!("fixtures missing: {e:#}"))
    }

    /// Asserts max|ours − ref| ≤ 1e-4 · max|ref| (the fixtures' stated tolerance).
    pub(crate) fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
        assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
        let o = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let r = reference.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let max_ref = r.iter().fold(0f64, |m, v| m.max(v.abs()));
        let max_diff = o.iter().zip(&r).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(max_diff <= 1e-4 * max_ref, "{what}: max diff {max_diff:e} vs max |ref| {max_ref:e}");
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::test_util::*;
    use super::*;

    fn sd1_config() -> SchedulerConfig {
        SchedulerConfig::from_file(&fixtures_dir().join("sd1-tiny/model/scheduler/scheduler_config.json")).unwrap()
    }

    #[test]
    fn reads_the_fixture_config() {
        let cfg = sd1_config();
        let mut expected = SchedulerConfig::default();
        assert_eq!(cfg, expected);
        expected.set_prediction(Prediction::V);
        assert_eq!(expected.prediction(), Prediction::V);
        let json = serde_json::to_string(&expected).unwrap();
        assert!(json.contains("\"v_prediction\"") && json.contains("\"scaled_linear\""), "{json}");
        assert_eq!(SchedulerConfig::from_json_str(&json).unwrap(), expected);
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        let cfg = SchedulerConfig::from_json_str("{}").unwrap();
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!(cfg.beta_schedule, BetaSchedule::Linear);
        assert_eq!(cfg.prediction_type, Prediction::Epsilon);
        assert_eq!(cfg.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(cfg.steps_offset, 0);
        assert!(cfg.set_alpha_to_one);
    }

    #[test]
    fn unsupported_settings_are_one_line_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("lora-studio-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scheduler_config.json");
        std::fs::write(&path, r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap();
        let err = format!("{:#}", SchedulerConfig::from_file(&path).unwrap_err());
        assert!(err.contains("scheduler_config.json") && err.contains("not supported"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        std::fs::write(&path, r#"{"prediction_type": "sample"}"#).unwrap();
        let err = format!("{:#}", SchedulerConfig::from_file(&path).unwrap_err());
        assert!(err.contains("prediction_type `sample` is not supported"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = format!("{:#}", SchedulerConfig::from_file(&dir.join("nope.json")).unwrap_err());
        assert!(err.contains("nope.json: cannot read"), "{err}");
    }

    #[test]
    fn alphas_cumprod_matches_diffusers() {
        let schedule = NoiseSchedule::new(&sd1_config()).unwrap();
        let reference = &sd1_reference()["alphas_cumprod"];
        let ours = Tensor::new(schedule.alphas_cumprod(), &Device::Cpu).unwrap();
        assert_close(&ours, reference, "alphas_cumprod");
        // Computed the way torch does, the f32 values agree to within one ulp (torch's vectorised
        // kernels round slightly differently in places).
        let r = reference.to_vec1::<f32>().unwrap();
        let worst = schedule.alphas_cumprod().iter().zip(&r).map(|(a, b)| (*a as f32 - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 6e-8, "worst f32 difference {worst:e}");
    }

    #[test]
    fn linear_schedule_endpoints() {
        let mut cfg = SchedulerConfig::stable_diffusion(Prediction::Epsilon);
        cfg.beta_schedule = BetaSchedule::Linear;
        let s = NoiseSchedule::new(&cfg).unwrap();
        assert!((s.betas()[0] - 0.00085).abs() < 1e-9 && (s.betas()[999] - 0.012).abs() < 1e-9);
        assert!(s.alphas_cumprod().windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn add_noise_velocity_and_snr_are_consistent() -> Result<()> {
        let dev = Device::Cpu;
        let s = NoiseSchedule::new(&SchedulerConfig::stable_diffusion(Prediction::V))?;
        let mut rng = crate::engine::rng::Rng::new(9);
        let x0 = rng.randn((3, 4, 5, 5), &dev)?;
        let eps = rng.randn((3, 4, 5, 5), &dev)?;
        let ts = [0usize, 499, 999];
        let xt = s.add_noise(&x0, &eps, &ts)?;
        let v = s.target(&x0, &eps, &ts)?;
        for (i, &t) in ts.iter().enumerate() {
            let a = s.alphas_cumprod()[t];
            let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
            let want = ((x0.get(i)? * sa)? + (eps.get(i)? * sb)?)?;
            assert_close(&xt.get(i)?, &want, "x_t");
            // x₀ = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v recover the inputs.
            let x0_back = ((xt.get(i)? * sa)? - (v.get(i)? * sb)?)?;
            let eps_back = ((xt.get(i)? * sb)? + (v.get(i)? * sa)?)?;
            assert_close(&x0_back, &x0.get(i)?, "x0 from v");
            assert_close(&eps_back, &eps.get(i)?, "eps from v");
            assert!((s.snr(t) - a / (1.0 - a)).abs() < 1e-12);
            assert!((s.sigma(t) - 1.0 / s.snr(t).sqrt()).abs() < 1e-9);
        }
        // v-prediction: min(snr, γ)/(snr + 1); γ caps the weight of the nearly clean timesteps.
        let (lo, hi) = (s.snr(999), s.snr(0));
        assert!((s.min_snr_weight(999, 5.0) - lo / (lo + 1.0)).abs() < 1e-12);
        assert!((s.min_snr_weight(0, 5.0) - 5.0 / (hi + 1.0)).abs() < 1e-12);
        // Half precision inputs keep their dtype; a batch/timestep mismatch is an error.
        assert_eq!(s.add_noise(&x0.to_dtype(DType::F16)?, &eps.to_dtype(DType::F16)?, &ts)?.dtype(), DType::F16);
        assert!(s.add_noise(&x0, &eps, &[1, 2]).is_err());
        assert!(s.add_noise(&x0, &eps, &[1, 2, 1000]).is_err());
        Ok(())
    }

    /// Zero-terminal-SNR: ᾱ from diffusers 0.42.1's `DDIMScheduler(scaled_linear 0.00085–0.012,
    /// rescale_betas_zero_snr=True)`, printed by the peer's Python.
    #[test]
    fn zero_terminal_snr_matches_diffusers() {
        let mut cfg = SchedulerConfig::stable_diffusion(Prediction::V);
        cfg.rescale_betas_zero_snr = true;
        let s = NoiseSchedule::new(&cfg).unwrap();
        let diffusers = [
            (0, 0.9991499781608582),
            (1, 0.9982334971427917),
            (100, 0.8867610692977905),
            (500, 0.2410186380147934),
            (900, 0.002960391342639923),
            (998, 1.9679633567193378e-07),
        ];
        for (t, want) in diffusers {
            let got = s.alphas_cumprod()[t];
            assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "ᾱ[{t}] = {got}, diffusers {want}");
        }
        assert_eq!(s.alphas_cumprod()[999], 0.0);
        assert_eq!(s.snr(999), 0.0);
        // The weights stay finite: v at zero SNR is −x₀, which min-SNR weights by 0.
        assert_eq!(s.min_snr_weight(999, 5.0), 0.0);
        // Written and read back with the flag; ε-prediction cannot use it.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"rescale_betas_zero_snr\":true"), "{json}");
        assert_eq!(SchedulerConfig::from_json_str(&json).unwrap(), cfg);
        let err = SchedulerConfig::from_json_str(r#"{"rescale_betas_zero_snr": true}"#).unwrap_err().to_string();
        assert!(err.contains("needs prediction_type v_prediction"), "{err}");
    }

    #[test]
    fn add_noise_is_differentiable() -> Result<()> {
        let s = NoiseSchedule::new(&SchedulerConfig::stable_diffusion(Prediction::Epsilon))?;
        let x0 = candle_core::Var::ones((2, 1, 2, 2), DType::F32, &Device::Cpu)?;
        let eps = Tensor::zeros((2, 1, 2, 2), DType::F32, &Device::Cpu)?;
        let grads = s.add_noise(x0.as_tensor(), &eps, &[10, 900])?.sum_all()?.backward()?;
        let g = grads.get(x0.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let (a10, a900) = (s.alphas_cumprod()[10].sqrt() as f32, s.alphas_cumprod()[900].sqrt() as f32);
        assert!(g[..4].iter().all(|&v| (v - a10).abs() < 1e-6) && g[4..].iter().all(|&v| (v - a900).abs() < 1e-6));
        Ok(())
    }
}
