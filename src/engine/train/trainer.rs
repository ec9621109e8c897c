//! Training: LoRA / LoCon / GLoRA adapters (base weights frozen, run factored so W + BA is never
//! materialised) and full fine-tuning, with AdamW, Prodigy or Adafactor, LR schedules, min-SNR
//! weighting, gradient accumulation and clipping, exact checkpoints and resume, and validation loss.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::engine::Result;
use crate::engine::adapters::delta::Delta;
use crate::engine::adapters::formats::{Component, ExportLayer, GloraLayout, Naming, write_adapter};
use crate::engine::adapters::stack::{LayerAdapter, TargetPreset};
use crate::engine::io::diffusers_folder::write_model_folder;
use crate::engine::io::weights::{read_safetensors_with_metadata, write_safetensors};
use crate::engine::kernels::recompute::GradSink;
use crate::engine::models::family::ModelFamily;
use crate::engine::models::nn::LayerMut;
use crate::engine::pipeline::{ImageSizes, ModelWeights, StableDiffusion, TextConditioning, size_conditioning};
use crate::engine::rng::Rng;
use crate::engine::train::dataset::{
    Dataset, DatasetFolder, DatasetOptions, crop_window, decode_image, prepare_image, target_size,
};
use crate::engine::train::fresh::fresh_update;
use crate::engine::train::optim::{self, AdafactorSettings, Optimizer, ProdigySettings};
use crate::engine::train::record::{Family, RunRecord};

/// The adapter's name inside the model's adapter stacks while it trains.
pub const TRAINING_ADAPTER: &str = "training";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Low-rank updates on the targeted linear layers.
    Lora,
    /// LoRA on linear and convolution layers.
    Locon,
    /// Generalised LoRA: a learned rescaling of W plus a low-rank shift.
    Glora,
    /// LoHa (LyCORIS): ΔW is the elementwise product of two low-rank products.
    Loha,
    /// LoKr (LyCORIS): ΔW is a Kronecker product; the layer is split by `lokr_factor`.
    Lokr,
    /// DoRA: a LoRA (LoCon on convolutions) plus a learned magnitude per output row.
    Dora,
    /// Full fine-tuning: the selected base weights themselves train (how the built-in model is
    /// pretrained). The result is a whole model folder, not an adapter.
    Full,
}

impl Algorithm {
    /// Whether a new adapter of this kind trains the UNet layer at `path` (`conv`: a convolution).
    /// LoCon means "LoRA on the convolutions too", whatever the preset says; the others follow the
    /// preset (whose last option includes convolutions).
    pub fn trains_unet_layer(self, targets: TargetPreset, path: &str, conv: bool) -> bool {
        targets.targets_unet(path, conv)
            || (self == Algorithm::Locon && TargetPreset::TransformerAndConv.targets_unet(path, conv))
    }

    /// The adapter kinds offered for training, in the order the window lists them.
    pub const ADAPTERS: [Algorithm; 6] =
        [Algorithm::Lora, Algorithm::Locon, Algorithm::Loha, Algorithm::Lokr, Algorithm::Dora, Algorithm::Glora];

    pub fn label(self) -> &'static str {
        match self {
            Algorithm::Lora => "LoRA",
            Algorithm::Locon => "LoCon",
            Algorithm::Glora => "GLoRA",
            Algorithm::Loha => "LoHa",
            Algorithm::Lokr => "LoKr",
            Algorithm::Dora => "DoRA",
            Algorithm::Full => "Full fine-tune",
        }
    }

    /// Rank, α and learning rate of kohya_ss' SD 1.5 presets for the kinds whose usual settings
    /// differ from LoRA's (`presets/lora/loha-sd15.json`, `lokr-sd15.json`; LoKr's preset pairs
    /// Prodigy with rate 1, so the AdamW rate here is LoHa's).
    pub fn kohya_ss_defaults(self) -> Option<(usize, f64, f64)> {
        match self {
            Algorithm::Loha => Some((32, 16.0, 1e-4)),
            Algorithm::Lokr => Some((64, 64.0, 1e-4)),
            _ => None,
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lora" => Ok(Self::Lora),
            "locon" => Ok(Self::Locon),
            "glora" => Ok(Self::Glora),
            "loha" => Ok(Self::Loha),
            "lokr" => Ok(Self::Lokr),
            "dora" => Ok(Self::Dora),
            "full" => Ok(Self::Full),
            other => bail!("unknown algorithm `{other}` (lora, locon, loha, lokr, dora, glora or full)"),
        }
    }
}

/// SDXL has two text encoders; training either or both is common (sd-scripts'
/// `--network_te_train_targets te1 te2`). SD 1.x / 2.x have only the first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextEncoders {
    #[default]
    Both,
    /// CLIP ViT-L (`lora_te1_`).
    First,
    /// OpenCLIP ViT-bigG (`lora_te2_`).
    Second,
}

impl TextEncoders {
    pub const ALL: [TextEncoders; 3] = [TextEncoders::Both, TextEncoders::First, TextEncoders::Second];

    pub fn label(self) -> &'static str {
        match self {
            TextEncoders::Both => "both",
            TextEncoders::First => "CLIP-L (te1)",
            TextEncoders::Second => "OpenCLIP-bigG (te2)",
        }
    }

    /// Whether a text-encoder component is trained under this choice.
    pub fn includes(self, component: Component) -> bool {
        match component {
            Component::Unet => false,
            Component::TextEncoder => self != TextEncoders::Second,
            Component::TextEncoder2 => self != TextEncoders::First,
        }
    }
}

impl std::str::FromStr for TextEncoders {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "both" => Ok(Self::Both),
            "te1" | "first" => Ok(Self::First),
            "te2" | "second" => Ok(Self::Second),
            other => bail!("unknown text encoders `{other}` (both, te1 or te2)"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

/// Which end of the noise schedule training draws more often (diffusers' `--timestep_bias_strategy`):
/// the `portion` of timesteps at that end is drawn `multiplier` times as often as the rest.
/// `Later` (the noisiest steps) is where a picture's layout and colours are decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepBias {
    #[default]
    None,
    Earlier,
    Later,
}

/// The largest training resolution accepted (SDXL trains at 1024; buckets reach 2× a side).
pub const MAX_RESOLUTION: usize = 2048;
/// The largest batch accepted (kohya's presets stay far below; the memory check refines it).
pub const MAX_BATCH: usize = 256;

/// Everything that defines a training run; saved in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub algorithm: Algorithm,
    pub rank: usize,
    pub alpha: f64,
    /// LoKr only: LyCORIS' `factor` for splitting each layer (−1: the most balanced split).
    pub lokr_factor: i64,
    pub targets: TargetPreset,
    pub train_text_encoder: bool,
    /// SDXL: which of its two text encoders `train_text_encoder` trains.
    pub text_encoders: TextEncoders,
    pub learning_rate: f64,
    /// Defaults to `learning_rate`.
    pub text_encoder_lr: Option<f64>,
    pub steps: usize,
    /// kohya's `--max_train_epochs`: when set, the run is this many epochs (each image × its
    /// folder's repeats, per epoch) and `steps` is computed from the dataset (`steps_for_epochs`).
    pub epochs: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: usize,
    /// AdamW (the default), Prodigy or Adafactor.
    pub optimizer: Optimizer,
    /// Decoupled weight decay, for every optimiser.
    pub weight_decay: f64,
    /// AdamW's and Prodigy's moment decays and denominator epsilon.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Prodigy's own settings (its learning rate is usually 1).
    pub prodigy: ProdigySettings,
    /// Adafactor's switches (kohya's LoRA setting, an explicit learning rate, by default).
    pub adafactor: AdafactorSettings,
    /// Clip the global gradient norm to this (none when absent).
    pub max_grad_norm: Option<f64>,
    /// Min-SNR-γ loss weighting (Hang et al. 2023); 5 is the usual choice.
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub timestep_bias: TimestepBias,
    /// How many times as often the biased part is drawn (used only with a bias).
    pub timestep_bias_multiplier: f64,
    /// Fraction of the schedule (at the biased end) drawn more often.
    pub timestep_bias_portion: f64,
    /// Probability of training on an empty caption (helps classifier-free guidance).
    pub caption_dropout: f64,
    /// Shuffle comma-separated tags, keeping the first `keep_tokens` in place.
    pub shuffle_tags: bool,
    pub keep_tokens: usize,
    /// kohya's `--clip_skip` (A1111's "Clip skip"): the captions are read 1 layer (the last) or
    /// more from the text encoder's end. SD 1.x / 2.x only; refused above 1 for SDXL, whose
    /// encoders are read at the penultimate layer anyway (kohya ignores it there).
    pub clip_skip: usize,
    pub dataset: DatasetOptions,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Sample image every N steps (0: never).
    pub sample_every: usize,
    pub sample_prompt: String,
    /// How many of the dataset's images (the first ones) the validation loss uses, with fixed
    /// timesteps and noise.
    pub validation_images: usize,
    /// Full fine-tuning only: train the weights whose names (`unet.…`, `text_encoder.…`) start
    /// with one of these; empty means all UNet weights (and the text encoder's when it trains).
    pub full_modules: Vec<String>,
    /// Where VAE latents are cached on disk (none: only in memory).
    pub latent_cache: Option<PathBuf>,
    /// Recompute each UNet block's activations in the backward pass instead of keeping them
    /// (kohya's `--gradient_checkpointing`): much less memory, about a third more time.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Lora,
            rank: 4,
            lokr_factor: -1,
            alpha: 4.0,
            targets: TargetPreset::Transformer,
            train_text_encoder: false,
            text_encoders: TextEncoders::Both,
            learning_rate: 1e-4,
            text_encoder_lr: None,
            steps: 500,
            epochs: None,
            batch_size: 1,
            grad_accum: 1,
            seed: 0,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            optimizer: Optimizer::AdamW,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            prodigy: ProdigySettings::default(),
            adafactor: AdafactorSettings::default(),
            max_grad_norm: Some(1.0),
            min_snr_gamma: None,
            noise_offset: 0.0,
            timestep_bias: TimestepBias::None,
            timestep_bias_multiplier: 2.0,
            timestep_bias_portion: 0.25,
            caption_dropout: 0.0,
            shuffle_tags: false,
            keep_tokens: 1,
            clip_skip: 1,
            dataset: DatasetOptions::default(),
            save_every: 0,
            sample_every: 0,
            sample_prompt: String::new(),
            validation_images: 4,
            full_modules: Vec::new(),
            latent_cache: None,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// The defaults for a model family at its usual side (SDXL 1024 px, SD 1.x / 2.x 512 px).
    /// SDXL's follow sd-scripts' SDXL guide: gradient checkpointing on, the UNet alone
    /// (`--network_train_unet_only`, so the text embeddings are computed once and cached) at 1e-4,
    /// and 1e-5 for the text encoders when they are trained.
    pub fn for_family(family: ModelFamily) -> Self {
        Self::for_model(family, if family == ModelFamily::Sdxl { 1024 } else { 512 })
    }

    /// The defaults for a model of `family` trained at `native_side` pixels: a run trains at the
    /// model's own size (64 px on the built-in model, 768 on SD 2.x-v), not at a fixed 512.
    pub fn for_model(family: ModelFamily, native_side: usize) -> Self {
        let mut c = Self::default();
        c.dataset.resolution = native_side;
        if family == ModelFamily::Sdxl {
            c.gradient_checkpointing = true;
            c.train_text_encoder = false;
            c.learning_rate = 1e-4;
            c.text_encoder_lr = Some(1e-5);
        }
        c
    }

    /// Moves settings made for a `from` model to a `to` model (each a family and its native
    /// side): each model-dependent setting (resolution, gradient checkpointing, training the text
    /// encoders and their rate) still at `from`'s default takes `to`'s; what the user changed stays.
    pub fn adopt_model(&mut self, from: (ModelFamily, usize), to: (ModelFamily, usize)) {
        let (old, new) = (Self::for_model(from.0, from.1), Self::for_model(to.0, to.1));
        if self.dataset.resolution == old.dataset.resolution {
            self.dataset.resolution = new.dataset.resolution;
        }
        if self.gradient_checkpointing == old.gradient_checkpointing {
            self.gradient_checkpointing = new.gradient_checkpointing;
        }
        if self.train_text_encoder == old.train_text_encoder {
            self.train_text_encoder = new.train_text_encoder;
        }
        if self.text_encoder_lr == old.text_encoder_lr {
            self.text_encoder_lr = new.text_encoder_lr;
        }
        // Only SDXL has a second text encoder to choose between.
        if to.0 != ModelFamily::Sdxl {
            self.text_encoders = TextEncoders::Both;
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        // NaN and ∞ pass every `<` and `>` below unnoticed, or poison the run; name the option.
        let numbers = [
            ("alpha", Some(self.alpha)),
            ("learning rate", Some(self.learning_rate)),
            ("text encoder learning rate", self.text_encoder_lr),
            ("weight decay", Some(self.weight_decay)),
            ("beta1", Some(self.beta1)),
            ("beta2", Some(self.beta2)),
            ("eps", Some(self.eps)),
            ("max gradient norm", self.max_grad_norm),
            ("min-SNR gamma", self.min_snr_gamma),
            ("noise offset", Some(self.noise_offset)),
            ("timestep bias multiplier", Some(self.timestep_bias_multiplier)),
            ("timestep bias portion", Some(self.timestep_bias_portion)),
            ("caption dropout", Some(self.caption_dropout)),
            ("Prodigy d0", Some(self.prodigy.d0)),
            ("Prodigy d_coef", Some(self.prodigy.d_coef)),
            ("Prodigy growth rate", self.prodigy.growth_rate),
        ];
        for (name, value) in numbers {
            if let Some(v) = value
                && !v.is_finite()
            {
                bail!("{name} must be a finite number, not {v}");
            }
        }
        if self.clip_skip == 0 {
            bail!("clip skip must be at least 1 (1 reads the text encoder's last layer)");
        }
        if self.rank == 0 {
            bail!("rank must be at least 1");
        }
        if self.lokr_factor == 0 || self.lokr_factor < -1 {
            bail!("the LoKr factor must be −1 (balanced) or a positive number, not {}", self.lokr_factor);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("alpha must be positive");
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.epochs == Some(0) {
            bail!("steps, epochs, batch size and gradient accumulation must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!("learning rate must be a positive number");
        }
        if self.dataset.resolution < 8 {
            bail!("resolution must be at least 8 pixels");
        }
        // Beyond what any Stable Diffusion model is trained at; the memory check says what fits.
        if self.dataset.resolution > MAX_RESOLUTION {
            bail!("resolution {} is above the limit of {MAX_RESOLUTION} pixels", self.dataset.resolution);
        }
        if self.batch_size > MAX_BATCH {
            bail!("batch size {} is above the limit of {MAX_BATCH}", self.batch_size);
        }
        if !(self.timestep_bias_multiplier > 0.0 && self.timestep_bias_multiplier.is_finite()) {
            bail!("timestep bias multiplier must be a positive number");
        }
        if !(self.timestep_bias_portion > 0.0 && self.timestep_bias_portion < 1.0) {
            bail!("timestep bias portion must be between 0 and 1");
        }
        self.validate_optimizer()
    }

    /// The chosen optimiser's own settings.
    fn validate_optimizer(&self) -> Result<()> {
        match self.optimizer {
            Optimizer::AdamW => {}
            Optimizer::Prodigy => {
                let p = &self.prodigy;
                if !(p.d0 > 0.0 && p.d_coef > 0.0) {
                    bail!("Prodigy's d0 and d_coef must be positive");
                }
                if p.growth_rate.is_some_and(|g| g < 1.0) {
                    bail!("Prodigy's growth rate must be at least 1 (or left out: unlimited)");
                }
                // prodigyopt estimates one d for all parameters and refuses groups with other
                // rates; a second rate would be our own rule, with no reference to check it.
                if self.train_text_encoder && self.text_encoder_lr.is_some_and(|r| r != self.learning_rate) {
                    bail!(
                        "Prodigy finds one learning rate for the UNet and the text encoders together: leave the text encoder's rate unset (or equal to the learning rate), or choose AdamW or Adafactor"
                    );
                }
            }
            Optimizer::Adafactor => {
                let a = &self.adafactor;
                if a.warmup_init && !a.relative_step {
                    bail!("Adafactor's warmup_init needs relative_step: its warmup is of the relative step size");
                }
                if a.relative_step && (self.lr_schedule != LrSchedule::Constant || self.warmup_steps > 0) {
                    bail!(
                        "Adafactor with relative_step sets its own rate from the step count; choose the constant schedule without warmup, or turn relative_step off"
                    );
                }
            }
        }
        Ok(())
    }

    /// Draws a training timestep in `0..len` under `timestep_bias`.
    pub fn sample_timestep(&self, rng: &mut Rng, len: usize) -> usize {
        let biased = ((len as f64 * self.timestep_bias_portion).round() as usize).clamp(1, len);
        if self.timestep_bias == TimestepBias::None || biased == len {
            return rng.below(len);
        }
        let weight = self.timestep_bias_multiplier * biased as f64;
        let in_biased = rng.uniform() * (weight + (len - biased) as f64) < weight;
        match (self.timestep_bias, in_biased) {
            (TimestepBias::Later, true) => len - biased + rng.below(biased),
            (TimestepBias::Later, false) => rng.below(len - biased),
            (_, true) => rng.below(biased),
            (_, false) => biased + rng.below(len - biased),
        }
    }

    /// The steps of `epochs` epochs over `dataset` at this batch and accumulation, as sd-scripts
    /// counts them ("10 epochs = 1200 steps"); see `Dataset::steps_for_epochs`.
    pub fn steps_for_epochs(&self, dataset: &Dataset, epochs: usize) -> usize {
        dataset.steps_for_epochs(epochs, self.batch_size, self.grad_accum)
    }

    /// This run's total of steps over `dataset`: from `epochs` when set, else `steps`.
    pub fn total_steps(&self, dataset: &Dataset) -> usize {
        self.epochs.map_or(self.steps, |e| self.steps_for_epochs(dataset, e))
    }

    /// The optimiser with this run's constants.
    pub fn optimizer_rule(&self) -> optim::Rule {
        match self.optimizer {
            Optimizer::AdamW => optim::Rule::AdamW(optim::AdamW {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            }),
            Optimizer::Prodigy => optim::Rule::Prodigy(optim::Prodigy::new(
                self.beta1,
                self.beta2,
                self.eps,
                self.weight_decay,
                self.prodigy,
            )),
            Optimizer::Adafactor => optim::Rule::Adafactor(optim::Adafactor::new(self.weight_decay, self.adafactor)),
        }
    }

    /// The learning rate of the text encoders' (`true`) or the UNet's parameters, before the schedule.
    pub fn group_lr(&self, text_encoder: bool) -> f64 {
        if text_encoder { self.text_encoder_lr.unwrap_or(self.learning_rate) } else { self.learning_rate }
    }

    /// Learning-rate factor at `step` (0-based): linear warmup, then the schedule.
    pub fn lr_factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps.min(self.steps)).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.lr_schedule {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => 1.0 - progress,
            LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// One trainable tensor (its optimiser state is the slot of the same index in `Trainer::optim`).
struct Param {
    name: String,
    var: Var,
    text_encoder: bool,
}

/// A layer's trained factors, for export.
struct TrainedLayer {
    component: Component,
    path: String,
    /// Parameter names in `Delta::tensors` order.
    params: Vec<String>,
    /// The update's kind and layout (its tensors are the variables), to rebuild it for saving.
    template: Delta,
}

/// One training example: latents (cached) and its caption.
struct Example {
    /// One latent per crop × mirror variant; a step uses one of them.
    latents: Vec<Tensor>,
    /// Per latent: SDXL's size numbers (original height and width, crop top and left, target
    /// height and width), as kohya fills them from each image's real size and crop.
    sizes: Vec<ImageSizes>,
    caption: String,
    /// The image's folder name (kohya counts caption tags per folder).
    folder: String,
    /// How many times an epoch shows it (its folder's repeats).
    repeats: usize,
}

/// Why a step did not update the weights.
#[derive(Debug)]
pub struct NonFiniteLoss {
    pub step: usize,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the loss became NaN or infinite at step {}: the weights were not updated; lower the learning rate or alpha, and check the images",
            self.step
        )
    }
}
impl std::error::Error for NonFiniteLoss {}

pub struct Trainer {
    pub config: TrainConfig,
    pub model: StableDiffusion,
    params: Vec<Param>,
    layers: Vec<TrainedLayer>,
    examples: Vec<Example>,
    /// Cached text embeddings per caption while the text encoder is frozen.
    embeddings: HashMap<String, TextConditioning>,
    rng: Rng,
    /// This epoch's examples in the order drawn: each as many times as its repeats.
    order: Vec<usize>,
    cursor: usize,
    /// The dataset's folders with their repeats, and kohya's steps per epoch (for the record).
    folders: Vec<DatasetFolder>,
    steps_per_epoch: usize,
    /// Full fine-tuning: the model's weights (trainable ones are variables shared with `model`).
    full: Option<ModelWeights>,
    /// The optimiser's state, one slot per entry of `params`.
    optim: optim::State,
    /// Optimiser steps done.
    pub step: usize,
    /// The loss of every step so far.
    pub losses: Vec<f32>,
    /// Unix seconds when the run began (kept across resumes).
    started_at: u64,
}

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Trainer {
    /// Attaches a fresh adapter to `model` per the config and loads the dataset's latents.
    pub fn new(model: StableDiffusion, config: TrainConfig, dataset: &Dataset) -> Result<Self> {
        Self::new_reporting(model, config, dataset, &|_, _| Ok(()))
    }

    /// As `new`, calling `encoded(done, total)` as the images' latents are encoded (the slow part
    /// of starting a run on a large dataset); an error from it ends the encoding there (a Stop).
    pub fn new_reporting(
        mut model: StableDiffusion,
        config: TrainConfig,
        dataset: &Dataset,
        encoded: &dyn Fn(usize, usize) -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        if dataset.images.is_empty() {
            bail!(
                "the dataset has no usable images{}",
                if dataset.skipped.is_empty() { "" } else { " (all were skipped)" }
            );
        }
        check_text_encoders(&config, model.text_encoder_2.is_some())?;
        check_clip_skip(&config, &model)?;
        let mut rng = Rng::new(config.seed);
        let mut params = Vec::new();
        let mut layers = Vec::new();
        let cfg = config.clone();
        model.try_visit_layers(&mut |component, mut layer| {
            let conv = matches!(layer, LayerMut::Conv(_));
            let wanted = match component {
                Component::Unet => cfg.algorithm.trains_unet_layer(cfg.targets, layer.path(), conv),
                // SDXL: both text encoders, as sd-scripts trains them unless told otherwise.
                Component::TextEncoder | Component::TextEncoder2 => {
                    cfg.train_text_encoder
                        && cfg.text_encoders.includes(component)
                        && TargetPreset::targets_text_encoder(layer.path())
                }
            };
            if !wanted {
                return Ok(());
            }
            let path = layer.path().to_string();
            let shape = layer.stack_ref().base.dims().to_vec();
            (|| -> Result<()> {
                let (out, inp) = (shape[0], shape[1]);
                let r = cfg.rank.min(out).min(inp).max(1);
                let base = layer.stack_ref().base_for_compute()?;
                let mut fresh = fresh_update(cfg.algorithm, &base, r, cfg.lokr_factor, &mut rng)?;
                if let Delta::Dora { inner_scale, inner, .. } = &mut fresh {
                    *inner_scale = inner.scale_from_alpha(Some(cfg.alpha));
                }
                let mut names = Vec::new();
                let mut vars = Vec::new();
                for (leaf, t) in fresh.tensor_names().into_iter().zip(fresh.tensors()) {
                    let name = format!("{}.{path}.{leaf}", component.label());
                    let var = Var::from_tensor(&t.to_dtype(model_dtype(&layer))?)?;
                    vars.push(var.as_tensor().clone());
                    params.push(Param { name: name.clone(), var, text_encoder: component.is_text_encoder() });
                    names.push(name);
                }
                let delta = fresh.with_tensors(&vars)?;
                let scale = delta.scale_from_alpha(Some(cfg.alpha));
                let stack = layer.stack();
                stack.merge = false; // factored: x·Aᵀ·Bᵀ, never W + BA per step
                let template = delta.clone();
                stack.attach(LayerAdapter { name: TRAINING_ADAPTER.into(), delta, scale, multiplier: 1.0 })?;
                layers.push(TrainedLayer { component, path, params: names, template });
                Ok(())
            })()
        })?;
        if params.is_empty() {
            bail!(
                "no layer of this model matches the targets `{}` with {:?}",
                config.targets.label(),
                config.algorithm
            );
        }
        model.refresh_merges()?;
        Self::assemble(model, config, params, layers, None, rng, dataset, encoded)
    }

    /// Full fine-tuning of `weights`: the selected tensors become variables.
    pub fn new_full(weights: ModelWeights, config: TrainConfig, dataset: &Dataset) -> Result<Self> {
        Self::new_full_reporting(weights, config, dataset, &|_, _| Ok(()))
    }

    /// As `new_full`, reporting the encoding of the images as `new_reporting` does.
    pub fn new_full_reporting(
        mut weights: ModelWeights,
        config: TrainConfig,
        dataset: &Dataset,
        encoded: &dyn Fn(usize, usize) -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        if config.algorithm != Algorithm::Full {
            bail!("new_full is for Algorithm::Full");
        }
        check_text_encoders(&config, weights.text_encoder_2.is_some())?;
        let wanted = |name: &str| {
            config.full_modules.is_empty() || config.full_modules.iter().any(|m| name.starts_with(m.as_str()))
        };
        let mut params = Vec::new();
        let mut maps = vec![("unet", &mut weights.unet), ("text_encoder", &mut weights.text_encoder)];
        if let Some(second) = weights.text_encoder_2.as_mut() {
            maps.push(("text_encoder_2", &mut second.weights));
        }
        for (component, map) in maps {
            let text = component != "unet";
            let which = if component == "text_encoder_2" { Component::TextEncoder2 } else { Component::TextEncoder };
            if text && !(config.train_text_encoder && config.text_encoders.includes(which)) {
                continue;
            }
            for (name, var) in map.make_trainable(|n| wanted(&format!("{component}.{n}")))? {
                params.push(Param { name: format!("{component}.{name}"), var, text_encoder: text });
            }
        }
        if params.is_empty() {
            bail!("no weight name starts with any of {:?}", config.full_modules);
        }
        let model = StableDiffusion::from_weights(weights.clone())?;
        let rng = Rng::new(config.seed);
        Self::assemble(model, config, params, Vec::new(), Some(weights), rng, dataset, encoded)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: StableDiffusion,
        config: TrainConfig,
        params: Vec<Param>,
        layers: Vec<TrainedLayer>,
        full: Option<ModelWeights>,
        rng: Rng,
        dataset: &Dataset,
        encoded: &dyn Fn(usize, usize) -> Result<()>,
    ) -> Result<Self> {
        if dataset.images.is_empty() {
            bail!(
                "the dataset has no usable images{}",
                if dataset.skipped.is_empty() { "" } else { " (all were skipped)" }
            );
        }
        let examples = encode_examples(&model, &config, dataset, encoded)?;
        let mut config = config;
        config.steps = config.total_steps(dataset);
        let steps_per_epoch = dataset.steps_per_epoch(config.batch_size, config.grad_accum);
        let mut model = model;
        if config.gradient_checkpointing {
            model.unet.checkpointing = Some(GradSink::new(params.iter().map(|p| p.var.clone()).collect()));
        }
        let weights: Vec<&Tensor> = params.iter().map(|p| p.var.as_tensor()).collect();
        let optim = config.optimizer_rule().start(&weights)?;
        let mut trainer = Self {
            optim,
            config,
            model,
            params,
            layers,
            examples,
            embeddings: HashMap::new(),
            rng,
            order: Vec::new(),
            cursor: 0,
            folders: dataset.folders(),
            steps_per_epoch,
            full,
            step: 0,
            losses: Vec::new(),
            started_at: unix_now(),
        };
        trainer.new_epoch();
        Ok(trainer)
    }

    pub fn is_full_finetune(&self) -> bool {
        self.full.is_some()
    }

    /// Full fine-tuning: writes the whole model as a diffusers folder (replacing an earlier save).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let weights = self.full.as_ref().context("only a full fine-tuning run has a whole model to save")?;
        for p in &self.params {
            if !p.var.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
                bail!("refusing to write {}: `{}` contains NaN or infinite values", dir.display(), p.name);
            }
        }
        write_model_folder(weights, dir, DType::F32, None, true)
    }

    /// Example `i`'s SDXL size numbers for each of its crop × mirror variants: (original height
    /// and width, crop top and left, target height and width), as the UNet is told them.
    pub fn size_numbers_of(&self, i: usize) -> &[ImageSizes] {
        &self.examples[i].sizes
    }

    pub fn trainable_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn trained_layers(&self) -> usize {
        self.layers.len()
    }

    /// The dataset's image indices in the order this epoch visits them: each image as many times
    /// as its folder's repeats, shuffled together (as kohya repeats them within an epoch).
    pub fn epoch_order(&self) -> &[usize] {
        &self.order
    }

    fn new_epoch(&mut self) {
        self.order = self.examples.iter().enumerate().flat_map(|(i, e)| std::iter::repeat_n(i, e.repeats)).collect();
        self.rng.shuffle(&mut self.order);
        self.cursor = 0;
    }

    fn next_example(&mut self) -> usize {
        if self.cursor >= self.order.len() {
            self.new_epoch();
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// The caption as trained: tag shuffling and caption dropout applied.
    fn training_caption(&mut self, caption: &str) -> String {
        if self.config.caption_dropout > 0.0 && self.rng.uniform() < self.config.caption_dropout {
            return String::new();
        }
        if !self.config.shuffle_tags {
            return caption.to_string();
        }
        let mut tags: Vec<&str> = caption.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
        let keep = self.config.keep_tokens.min(tags.len());
        self.rng.shuffle(&mut tags[keep..]);
        tags.join(", ")
    }

    fn text_embedding(&mut self, caption: &str) -> Result<TextConditioning> {
        if self.config.train_text_encoder {
            return self.model.encode_captions(&[caption], self.config.clip_skip);
        }
        if let Some(e) = self.embeddings.get(caption) {
            return Ok(e.clone());
        }
        let e = self.model.encode_captions(&[caption], self.config.clip_skip)?.detach();
        self.embeddings.insert(caption.to_string(), e.clone());
        Ok(e)
    }

    /// The diffusion loss for a batch, with per-sample timesteps and noise given.
    /// `sizes`: SDXL's size numbers per sample (`size_conditioning`); `None` for SD 1.x / 2.x.
    fn loss(
        &self,
        x0: &Tensor,
        text: &TextConditioning,
        sizes: Option<&Tensor>,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let schedule = &self.model.schedule;
        let x_t = schedule.add_noise(x0, noise, timesteps)?;
        let target = schedule.target(x0, noise, timesteps)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, timesteps.len(), x0.device())?.to_dtype(x0.dtype())?;
        let pred = self.model.predict(&x_t, &t, text, sizes)?;
        let per_sample = (pred - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let weights: Vec<f32> = timesteps
            .iter()
            .map(|&t| self.config.min_snr_gamma.map_or(1.0, |gamma| schedule.min_snr_weight(t, gamma)) as f32)
            .collect();
        let w = Tensor::from_vec(weights, timesteps.len(), x0.device())?.to_dtype(per_sample.dtype())?;
        Ok((per_sample * w)?.mean_all()?)
    }

    /// SDXL's size numbers for a batch (when the text conditioning has a pooled embedding).
    fn size_numbers(&self, text: &TextConditioning, rows: &[ImageSizes]) -> Result<Option<Tensor>> {
        match text.pooled {
            Some(_) => Ok(Some(size_conditioning(rows, self.model.dtype, &self.model.device)?)),
            None => Ok(None),
        }
    }

    /// One optimiser step (with gradient accumulation inside). Returns the mean loss.
    pub fn train_step(&mut self) -> Result<f32> {
        let device = self.model.device.clone();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let mut total = 0f32;
        for _ in 0..self.config.grad_accum {
            let mut x0s = Vec::new();
            let mut ctxs = Vec::new();
            let mut sizes = Vec::new();
            let mut timesteps = Vec::new();
            for _ in 0..self.config.batch_size {
                let i = self.next_example();
                let variants = self.examples[i].latents.len();
                let v = if variants > 1 { self.rng.below(variants) } else { 0 };
                x0s.push(self.examples[i].latents[v].clone());
                sizes.push(self.examples[i].sizes[v]);
                let caption = self.examples[i].caption.clone();
                let caption = self.training_caption(&caption);
                ctxs.push(self.text_embedding(&caption)?);
                timesteps.push(self.config.sample_timestep(&mut self.rng, self.model.schedule.len()));
            }
            // Stacking needs one size: a batch from several buckets trains them one at a time.
            let same_size = x0s.windows(2).all(|w| w[0].dims() == w[1].dims());
            let groups: Vec<Vec<usize>> =
                if same_size { vec![(0..x0s.len()).collect()] } else { (0..x0s.len()).map(|i| vec![i]).collect() };
            for g in groups {
                let x0 = Tensor::stack(&g.iter().map(|&i| &x0s[i]).collect::<Vec<_>>(), 0)?;
                let ctx = TextConditioning::cat(&g.iter().map(|&i| &ctxs[i]).collect::<Vec<_>>())?;
                let rows: Vec<_> = g.iter().map(|&i| sizes[i]).collect();
                let size_numbers = self.size_numbers(&ctx, &rows)?;
                let ts: Vec<usize> = g.iter().map(|&i| timesteps[i]).collect();
                let mut noise = self.rng.randn(x0.shape(), &device)?.to_dtype(x0.dtype())?;
                if self.config.noise_offset > 0.0 {
                    let (b, c, _, _) = x0.dims4()?;
                    let offset =
                        (self.rng.randn((b, c, 1, 1), &device)?.to_dtype(x0.dtype())? * self.config.noise_offset)?;
                    noise = noise.broadcast_add(&offset)?;
                }
                let loss = self.loss(&x0, &ctx, size_numbers.as_ref(), &noise, &ts)?;
                let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(NonFiniteLoss { step: self.step + 1 }.into());
                }
                let share = g.len() as f64 / (self.config.batch_size * self.config.grad_accum) as f64;
                total += value * share as f32;
                let store = (loss * share)?.backward()?;
                let sink = self.model.unet.checkpointing.clone();
                for (slot, p) in grads.iter_mut().zip(&self.params) {
                    // candle leaves a variable's gradient attached to this step's graph; the
                    // moments built from it would then keep every step's activations alive.
                    let outer = store.get(p.var.as_tensor()).map(Tensor::detach);
                    // Uses inside checkpointed blocks arrive through the sink instead.
                    let inner = sink.as_ref().and_then(|s| s.take(p.var.as_tensor()));
                    for g in [outer, inner].into_iter().flatten() {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g,
                        });
                    }
                }
            }
        }
        self.apply_gradients(grads)?;
        self.step += 1;
        self.losses.push(total);
        Ok(total)
    }

    /// The configured optimiser, after optional global-norm clipping.
    fn apply_gradients(&mut self, grads: Vec<Option<Tensor>>) -> Result<()> {
        let mut clip = 1.0;
        if let Some(max_norm) = self.config.max_grad_norm {
            let norm = optim::global_norm(grads.iter().flatten())?;
            if !norm.is_finite() {
                return Err(NonFiniteLoss { step: self.step + 1 }.into());
            }
            clip = optim::clip_factor(norm, max_norm);
        }
        let c = &self.config;
        let factor = c.lr_factor(self.step);
        let lrs: Vec<f64> = self.params.iter().map(|p| c.group_lr(p.text_encoder) * factor).collect();
        let grads: Vec<Option<Tensor>> =
            grads.into_iter().map(|g| g.map(|g| g * clip).transpose()).collect::<candle_core::Result<_>>()?;
        let weights: Vec<Tensor> = self.params.iter().map(|p| p.var.as_tensor().detach()).collect();
        // Compute every update first and commit only if all are finite, so a blow-up leaves the
        // weights and the optimiser's state exactly as they were.
        let stepped = c.optimizer_rule().step(&self.optim, &weights, &grads, &lrs, self.step + 1)?;
        for w in stepped.weights.iter().flatten() {
            if !w.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
                return Err(NonFiniteLoss { step: self.step + 1 }.into());
            }
        }
        for (p, w) in self.params.iter().zip(&stepped.weights) {
            if let Some(w) = w {
                p.var.set(w)?;
            }
        }
        self.optim = stepped.state;
        Ok(())
    }

    /// Every tensor of the optimiser's state, by checkpoint name (`adam_m/…`, `prodigy_s/…`).
    pub fn optimizer_tensors(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.params.iter().zip(&self.optim.slots).flat_map(|(p, slot)| {
            optim::slot_tensors(slot).into_iter().map(move |(kind, t)| (format!("{kind}/{}", p.name), t))
        })
    }

    /// The learning rate of the UNet group at the current step, as the optimiser takes it:
    /// Prodigy's d·lr, Adafactor's relative step when it sets its own.
    pub fn current_lr(&self) -> f64 {
        let lr = self.config.learning_rate * self.config.lr_factor(self.step.saturating_sub(1));
        self.config.optimizer_rule().effective_lr(&self.optim, lr, self.step)
    }

    /// Loss on the first `validation_images` examples with fixed timesteps and noise: comparable
    /// across checkpoints, unlike the noisy per-step loss.
    pub fn validation_loss(&mut self) -> Result<f32> {
        let n = self.config.validation_images.clamp(1, self.examples.len());
        let mut rng = Rng::new(0x005e_ed0f_7a11);
        let mut total = 0f32;
        let device = self.model.device.clone();
        let count = self.model.schedule.len();
        for i in 0..n {
            let x0 = self.examples[i].latents[0].unsqueeze(0)?;
            let size_row = self.examples[i].sizes[0];
            let caption = self.examples[i].caption.clone();
            let ctx = if self.config.train_text_encoder {
                self.model.encode_captions(&[caption.as_str()], self.config.clip_skip)?
            } else {
                self.text_embedding(&caption)?
            };
            // Spread timesteps over the schedule so every checkpoint is judged on the same mix.
            for k in 0..4 {
                let t = (count * (2 * k + 1)) / 8;
                let noise = rng.randn(x0.shape(), &device)?.to_dtype(x0.dtype())?;
                let ctx = ctx.detach();
                let size_numbers = self.size_numbers(&ctx, &[size_row])?;
                total += self
                    .loss(&x0, &ctx, size_numbers.as_ref(), &noise, &[t])?
                    .detach()
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
            }
        }
        Ok(total / (4 * n) as f32)
    }

    /// The adapter as trained so far, ready to write.
    pub fn export_layers(&self) -> Result<Vec<ExportLayer>> {
        let by_name: HashMap<&str, &Param> = self.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let t: Vec<Tensor> = l
                .params
                .iter()
                .map(|n| Ok(by_name[n.as_str()].var.as_tensor().detach().copy()?))
                .collect::<Result<_>>()?;
            let delta = l.template.with_tensors(&t)?;
            // The layer trained with scale α / r (r clamped to the layer's size), and the file's α / r
            // must give the same scale.
            let alpha = self.config.alpha;
            out.push(ExportLayer { component: l.component, path: l.path.clone(), delta, alpha });
        }
        Ok(out)
    }

    /// The training record (kohya's `ss_*`, the model spec) plus ours, so A1111, ComfyUI and
    /// civitai show what the adapter is; `output_name` is the file's name without extension.
    pub fn metadata(&self, output_name: &str) -> HashMap<String, String> {
        let mut tag_frequency: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for e in &self.examples {
            let tags = tag_frequency.entry(e.folder.clone()).or_default();
            for tag in e.caption.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                *tags.entry(tag.to_string()).or_insert(0) += 1;
            }
        }
        let record = RunRecord {
            config: &self.config,
            family: Family::of(&self.model),
            step: self.step,
            folders: &self.folders,
            steps_per_epoch: self.steps_per_epoch,
            tag_frequency: &tag_frequency,
            started_at: self.started_at,
            output_name,
        };
        let mut m = record.metadata();
        let c = &self.config;
        if !c.dataset.trigger.is_empty() {
            m.insert("lora_studio_trigger_words".into(), c.dataset.trigger.clone());
        }
        m.insert("lora_studio_algorithm".into(), format!("{:?}", c.algorithm).to_lowercase());
        m.insert("lora_studio_targets".into(), c.targets.label().into());
        m
    }

    /// Writes the adapter file (kohya layout unless told otherwise), atomically.
    pub fn save_adapter(&self, path: &Path, naming: Naming) -> Result<()> {
        let layers = self.export_layers()?;
        for l in &layers {
            for t in l.delta.tensors() {
                if t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan() {
                    bail!("refusing to write {}: the adapter contains NaN values", path.display());
                }
            }
        }
        let name = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        write_adapter(path, naming, &layers, self.metadata(&name), DType::F32, GloraLayout::Current)
    }

    /// Everything needed to continue exactly: parameters, the optimiser's state, step, RNG, epoch
    /// order, config and losses. Written atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("param/{}", p.name), p.var.as_tensor().detach());
        }
        for (name, t) in self.optimizer_tensors() {
            tensors.insert(name, t.clone());
        }
        let state = CheckpointState {
            optimizer: self.optim.scalars(),
            step: self.step,
            rng: self.rng.state(),
            order: self.order.clone(),
            cursor: self.cursor,
            losses: self.losses.clone(),
            started_at: self.started_at,
            config: self.config.clone(),
            family: Some(self.model.family()),
        };
        let mut metadata = HashMap::new();
        metadata.insert("lora_studio_checkpoint".into(), serde_json::to_string(&state)?);
        write_safetensors(path, &tensors, Some(metadata))
    }

    /// Restores a checkpoint written by `save_checkpoint` for the same model and config.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let (tensors, metadata) = read_safetensors_with_metadata(path)?;
        let state: CheckpointState = serde_json::from_str(
            metadata
                .get("lora_studio_checkpoint")
                .with_context(|| format!("{}: not a LoRA Studio checkpoint", path.display()))?,
        )
        .with_context(|| format!("{}: damaged checkpoint state", path.display()))?;
        if state.config.optimizer != self.config.optimizer {
            bail!(
                "{}: this checkpoint was trained with {}, not {}: its optimiser state cannot carry over; resume with {}, or start a new run",
                path.display(),
                state.config.optimizer.label(),
                self.config.optimizer.label(),
                state.config.optimizer.name()
            );
        }
        if state.config.algorithm != self.config.algorithm
            || state.config.rank != self.config.rank
            || state.config.targets != self.config.targets
        {
            bail!(
                "{}: this checkpoint was made with different adapter settings (algorithm, rank or targets)",
                path.display()
            );
        }
        // Trained layers that the checkpoint lacks, or has in another shape, mean another model.
        let differing = self
            .params
            .iter()
            .filter(|p| tensors.get(&format!("param/{}", p.name)).is_none_or(|t| t.dims() != p.var.dims()))
            .count();
        if differing > 0 {
            bail!(
                "{}: this checkpoint is for another model ({differing} of its {} trained weights do not fit this one); resume with the model it was trained on",
                path.display(),
                self.params.len()
            );
        }
        let device = self.model.device.clone();
        // The optimiser's state first: a damaged one leaves the run as it was.
        let weights: Vec<&Tensor> = self.params.iter().map(|p| p.var.as_tensor()).collect();
        let get = |i: usize, kind: &str| -> Result<Tensor> {
            let name = &self.params[i].name;
            let t = tensors
                .get(&format!("{kind}/{name}"))
                .with_context(|| format!("the optimiser's `{kind}` of `{name}` is missing"))?;
            Ok(t.to_device(&device)?)
        };
        let restored = optim::State::restore(&state.config.optimizer_rule(), &weights, &state.optimizer, &get)
            .with_context(|| format!("{}: damaged optimiser state", path.display()))?;
        for p in &mut self.params {
            let get = |kind: &str| -> Result<Tensor> {
                let t = tensors
                    .get(&format!("{kind}/{}", p.name))
                    .with_context(|| format!("{}: `{}` is missing", path.display(), p.name))?;
                if t.dims() != p.var.dims() {
                    bail!("{}: `{}` has the wrong shape", path.display(), p.name);
                }
                Ok(t.to_device(&device)?.to_dtype(p.var.dtype())?)
            };
            p.var.set(&get("param")?)?;
        }
        self.optim = restored;
        self.step = state.step;
        self.rng = Rng::from_state(state.rng);
        // An order for another dataset (images added or repeats changed) is drawn afresh.
        let epoch_len: usize = self.examples.iter().map(|e| e.repeats).sum();
        if state.order.len() == epoch_len && state.order.iter().all(|&i| i < self.examples.len()) {
            self.order = state.order;
            self.cursor = state.cursor;
        }
        self.losses = state.losses;
        if state.started_at > 0 {
            self.started_at = state.started_at;
        }
        // Only the schedule-independent settings are kept from the checkpoint's config: a user
        // may resume with more steps (or epochs).
        let (steps, epochs) = (self.config.steps, self.config.epochs);
        self.config = TrainConfig { steps, epochs, ..state.config };
        Ok(())
    }
}

/// The dtype a layer's adapter trains in (f32 over a half-precision base).
fn model_dtype(layer: &LayerMut<'_>) -> DType {
    layer.stack_ref().compute_dtype()
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    rng: [u64; 4],
    order: Vec<usize>,
    cursor: usize,
    losses: Vec<f32>,
    config: TrainConfig,
    /// When the run began (0 in checkpoints older than this field).
    #[serde(default)]
    started_at: u64,
    /// The family of the model it trains (absent in checkpoints older than this field).
    #[serde(default)]
    family: Option<ModelFamily>,
    /// The optimiser's state that is not tensors (none before there was a choice: AdamW's is all tensors).
    #[serde(default)]
    optimizer: optim::Scalars,
}

/// What a checkpoint says about its run, read from its header alone (no tensors), so a resume
/// can take its options and be checked before the slow loading.
#[derive(Clone, Debug)]
pub struct CheckpointSummary {
    pub step: usize,
    pub config: TrainConfig,
    /// The family of the model it was trained on (`None` from older checkpoints).
    pub family: Option<ModelFamily>,
}

impl CheckpointSummary {
    pub fn read(path: &Path) -> Result<Self> {
        let metadata = crate::engine::io::weights::read_metadata(path)?.unwrap_or_default();
        let state: CheckpointState =
            serde_json::from_str(metadata.get("lora_studio_checkpoint").with_context(|| {
                format!("{}: not a LoRA Studio training checkpoint (`NAME.checkpoint.safetensors`)", path.display())
            })?)
            .with_context(|| format!("{}: damaged checkpoint state", path.display()))?;
        Ok(Self { step: state.step, config: state.config, family: state.family })
    }

    /// The run's adapter options in words: "LoRA, rank 8, alpha 4, attention + feed-forward,
    /// step 120 of 400" (", Prodigy (learning-rate free)" before the step when not AdamW).
    pub fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "{}, rank {}, alpha {}, {}{}{}, step {} of {}",
            c.algorithm.label(),
            c.rank,
            c.alpha,
            c.targets.label(),
            if c.train_text_encoder { ", text encoder too" } else { "" },
            // AdamW, the usual one, goes without saying.
            if c.optimizer == Optimizer::AdamW { String::new() } else { format!(", {}", c.optimizer.label()) },
            self.step,
            c.steps
        )
    }
}

/// Choosing one of SDXL's two text encoders means nothing on a model with one: refused, rather
/// than training a different encoder than asked.
fn check_text_encoders(config: &TrainConfig, two: bool) -> Result<()> {
    if config.train_text_encoder && config.text_encoders != TextEncoders::Both && !two {
        bail!(
            "text encoders `{}` asks for one of SDXL's two text encoders, but this model has one; choose `both`",
            config.text_encoders.label()
        );
    }
    Ok(())
}

/// Clip skip must fit the text encoder; on SDXL it would be silently ignored (as kohya does), so
/// it is refused in words instead.
fn check_clip_skip(config: &TrainConfig, model: &StableDiffusion) -> Result<()> {
    if config.clip_skip > 1 && model.family() == ModelFamily::Sdxl {
        bail!(
            "clip skip {} does not apply to SDXL, whose text encoders are read at the penultimate layer already (kohya ignores it there); set it to 1",
            config.clip_skip
        );
    }
    model.effective_clip_skip(config.clip_skip).map(|_| ())
}

/// How many random crops of each image are encoded when random cropping is on: latents are
/// cached, so "random" means one of these per step (kohya, too, cannot cache a fresh crop).
pub const RANDOM_CROPS: usize = 4;

/// VAE latents (× scaling factor) for every image: one per crop and mirror variant. With a cache
/// folder, latents are stored there under a key of the file's bytes, the crop, the flip and the
/// VAE, so a second run on the same images skips the VAE entirely.
fn encode_examples(
    model: &StableDiffusion,
    config: &TrainConfig,
    dataset: &Dataset,
    encoded: &dyn Fn(usize, usize) -> Result<()>,
) -> Result<Vec<Example>> {
    let opts = &config.dataset;
    let f = model.vae.config.downscale();
    let vae_key = model.vae.fingerprint()?;
    let mut out = Vec::with_capacity(dataset.images.len());
    for (i, e) in dataset.images.iter().enumerate() {
        encoded(i, dataset.images.len())?;
        let (w, h) = target_size(e.width, e.height, opts);
        let (w, h) = ((w / f * f).max(f), (h / f * f).max(f));
        let crops: Vec<(f64, f64)> = if opts.center_crop {
            vec![(0.5, 0.5)]
        } else {
            let mut rng = Rng::new(config.seed ^ e.content_hash);
            (0..RANDOM_CROPS).map(|_| (rng.uniform(), rng.uniform())).collect()
        };
        let flips = if opts.flip { vec![false, true] } else { vec![false] };
        let mut img = None;
        let mut latents = Vec::new();
        let mut sizes = Vec::new();
        for &crop in &crops {
            let (iw, ih) = (e.width as usize, e.height as usize);
            let (_, _, left, top) = crop_window(iw, ih, w, h, crop);
            for &flip in &flips {
                sizes.push(([ih, iw], [top, left], [h, w]));
                let key = format!(
                    "{:016x}-{w}x{h}-{:.4}-{:.4}-{}-{vae_key:016x}",
                    e.content_hash,
                    crop.0,
                    crop.1,
                    if flip { "flip" } else { "plain" }
                );
                let cached = config.latent_cache.as_ref().map(|dir| dir.join(format!("{key}.safetensors")));
                if let Some(path) = cached.as_ref().filter(|p| p.exists()) {
                    // A damaged entry (unreadable, another shape, NaN or ∞) is encoded again and
                    // replaced; used, it would train on garbage or blame the learning rate for a NaN.
                    let expected = [model.vae.config.latent_channels, h / f, w / f];
                    if let Ok(t) = crate::engine::io::weights::read_safetensors(path)
                        && let Some(l) = t.get("latents")
                        && l.dims() == expected
                        && crate::engine::io::weights::all_finite(l)?
                    {
                        latents.push(l.to_device(&model.device)?.to_dtype(model.dtype)?);
                        continue;
                    }
                }
                if img.is_none() {
                    let bytes = std::fs::read(&e.path).with_context(|| format!("{}: cannot read", e.path.display()))?;
                    img = Some(decode_image(&e.path, &bytes)?);
                }
                let pixels =
                    prepare_image(img.as_ref().unwrap(), w, h, crop, flip, &model.device)?.to_dtype(model.dtype)?;
                let lat = (model.vae.encode_mean(&pixels.unsqueeze(0)?)? * model.vae.config.scaling_factor)?;
                let lat = lat.squeeze(0)?.detach();
                if let Some(path) = &cached {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
                    }
                    let tensors = HashMap::from([("latents".to_string(), lat.to_dtype(DType::F32)?)]);
                    write_safetensors(path, &tensors, None)?;
                }
                latents.push(lat);
            }
        }
        let folder = e.folder.clone();
        out.push(Example { latents, sizes, caption: e.full_caption(&opts.trigger), folder, repeats: e.repeats });
    }
    encoded(dataset.images.len(), dataset.images.len())?;
    Ok(out)
}

/// Default file names for a run's outputs beside `out`.
/// The adapter as it was at an intermediate `step`, beside the final one: kohya's naming,
/// `style-step00000050.safetensors`.
pub fn step_adapter_path(out: &Path, step: usize) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    out.with_file_name(format!("{stem}-step{step:08}.safetensors"))
}

pub fn checkpoint_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    out.with_file_name(format!("{stem}.checkpoint.safetensors"))
}

/// Whether `path` is an adapter LoRA Studio wrote (training, blends and exports mark their files
/// with `lora_studio_*` metadata): how an output we may replace is told from a user's own file.
pub fn is_our_adapter(path: &Path) -> bool {
    let metadata = crate::engine::io::weights::read_metadata(path).ok().flatten().unwrap_or_default();
    !metadata.contains_key("lora_studio_checkpoint") && metadata.keys().any(|k| k.starts_with("lora_studio_"))
}

/// An earlier run's checkpoint where a new run would write its own: the caller decides whether to
/// go on (`--resume`) or start again (`--overwrite`).
#[derive(Debug)]
pub struct ExistingRun {
    pub checkpoint: PathBuf,
    pub step: usize,
}

impl std::fmt::Display for ExistingRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: a run of {} steps exists: --resume {} to go on, --overwrite to start again",
            self.checkpoint.display(),
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for ExistingRun {}

/// A file where a run would write its adapter, with no run to resume: replaced only when the
/// caller says so (`--overwrite`, or the window's question).
#[derive(Debug)]
pub struct ExistingOutput {
    pub path: PathBuf,
    /// An adapter LoRA Studio wrote (else any other file).
    pub ours: bool,
}

impl std::fmt::Display for ExistingOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.ours { "an adapter from an earlier run" } else { "a file LoRA Studio did not write" };
        write!(
            f,
            "{}: already exists ({what}); choose another output, or --overwrite to replace it",
            self.path.display()
        )
    }
}

impl std::error::Error for ExistingOutput {}

/// The step an existing checkpoint file reached, if it is one of ours.
pub fn checkpoint_step(path: &Path) -> Option<usize> {
    let metadata = crate::engine::io::weights::read_metadata(path).ok()??;
    let state: serde_json::Value = serde_json::from_str(metadata.get("lora_studio_checkpoint")?).ok()?;
    state.get("step")?.as_u64().map(|s| s as usize)
}

/// Where a run will write, checked before any slow work so that nothing a user owns is replaced:
/// the adapter (or, for full fine-tuning, the model folder) `out`, its checkpoint and step adapters.
pub struct RunOutputs<'a> {
    pub out: &'a Path,
    pub model: &'a Path,
    /// Dataset folders or image files.
    pub data: &'a [PathBuf],
    /// Files that are in use elsewhere (adapters loaded in the Playground).
    pub in_use: &'a [PathBuf],
    pub resume: Option<&'a Path>,
    pub full_finetune: bool,
    /// Replace an existing output or run.
    pub overwrite: bool,
}

impl RunOutputs<'_> {
    /// Refuses an output that is an input (the model's files, a dataset image or caption, the
    /// checkpoint being resumed, an adapter in use), a folder where a file goes, a file that is not
    /// an adapter we wrote, and an earlier run's checkpoint (`ExistingRun`) unless `overwrite`; then
    /// makes sure the output folder exists and can be written.
    pub fn check(&self) -> Result<()> {
        let out = self.out;
        let shown = out.display();
        // Paths compared as the file system sees them (symlinks, `..`); an output that does not
        // exist yet is its folder's real path plus its name.
        let real = |p: &Path| -> PathBuf {
            if let Ok(c) = p.canonicalize() {
                return c;
            }
            match (p.parent().filter(|d| !d.as_os_str().is_empty()), p.file_name()) {
                (Some(dir), Some(name)) => dir.canonicalize().map(|d| d.join(name)).unwrap_or_else(|_| p.to_path_buf()),
                (None, Some(name)) => std::env::current_dir().map(|d| d.join(name)).unwrap_or_else(|_| p.to_path_buf()),
                _ => p.to_path_buf(),
            }
        };
        let ckpt = checkpoint_path(out);
        let mut written = vec![(real(out), out.to_path_buf())];
        if !self.full_finetune {
            written.push((real(&ckpt), ckpt.clone()));
        }
        let model = real(self.model);
        for (target, shown) in &written {
            if target == &model || target.starts_with(&model) && model.is_dir() {
                bail!("{}: this is the base model's own file; choose another output", shown.display());
            }
            for input in self.data {
                let input = real(input);
                // An image given alone brings its caption files with it.
                let captions = if input.is_file() {
                    vec![input.with_extension("txt"), input.with_extension("caption")]
                } else {
                    vec![]
                };
                let inside =
                    target == &input || captions.contains(target) || input.is_dir() && target.starts_with(&input);
                let ext = target.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                let dataset_file = crate::engine::train::dataset::IMAGE_EXTENSIONS.contains(&ext.as_str())
                    || ext == "txt"
                    || ext == "caption";
                if inside && (dataset_file || target.is_dir()) {
                    bail!("{}: this is part of the training data; choose another output", shown.display());
                }
            }
            // An adapter of ours in the list is an earlier run's (the run-exists check covers it).
            if self.in_use.iter().any(|u| &real(u) == target) && !is_our_adapter(target) {
                bail!("{}: this adapter is in use in the Playground; choose another output", shown.display());
            }
            if self.resume.is_some_and(|r| &real(r) == target && shown != &ckpt) {
                bail!("{}: this is the checkpoint being resumed; choose another output", shown.display());
            }
        }
        if !self.full_finetune {
            if out.is_dir() {
                bail!(
                    "{shown}: is a folder; the output is an adapter file, such as {}",
                    out.join("style.safetensors").display()
                );
            }
            if out.exists() && !self.overwrite && !is_our_adapter(out) {
                return Err(ExistingOutput { path: out.to_path_buf(), ours: false }.into());
            }
            if self.resume.is_none() && !self.overwrite && ckpt.exists() {
                let step = checkpoint_step(&ckpt).unwrap_or(0);
                return Err(ExistingRun { checkpoint: ckpt, step }.into());
            }
            // An adapter of an earlier run without its checkpoint is still the user's file.
            if self.resume.is_none() && !self.overwrite && out.exists() {
                return Err(ExistingOutput { path: out.to_path_buf(), ours: true }.into());
            }
        } else if out.exists() && !self.overwrite && self.resume.is_none() {
            bail!("{shown}: already exists; choose a new folder, or --overwrite to replace it");
        }
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
        }
        // A write that would fail at the end of the run fails now instead.
        let probe = crate::engine::io::weights::temporary_path(&ckpt)?;
        std::fs::write(&probe, b"").with_context(|| format!("{shown}: cannot write there"))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_of_late_steps(bias: TimestepBias, multiplier: f64) -> f64 {
        let config = TrainConfig {
            timestep_bias: bias,
            timestep_bias_multiplier: multiplier,
            timestep_bias_portion: 0.2,
            ..Default::default()
        };
        let mut rng = Rng::new(7);
        let draws = 40_000;
        let late = (0..draws).filter(|_| config.sample_timestep(&mut rng, 1000) >= 800).count();
        late as f64 / draws as f64
    }

    #[test]
    fn configs_without_an_optimizer_load_as_adamw_and_others_name_theirs() {
        // A train.toml or checkpoint from before the choice existed.
        let old: TrainConfig = serde_json::from_str(r#"{"rank": 8, "learning_rate": 0.0002}"#).unwrap();
        assert_eq!((old.optimizer, old.rank), (Optimizer::AdamW, 8));
        let new: TrainConfig = toml::from_str(
            "optimizer = \"prodigy\"\nlearning_rate = 1.0\n[prodigy]\nd_coef = 0.5\ngrowth_rate = 1.02\n",
        )
        .unwrap();
        assert_eq!(new.optimizer, Optimizer::Prodigy);
        assert_eq!((new.prodigy.d_coef, new.prodigy.growth_rate, new.prodigy.d0), (0.5, Some(1.02), 1e-6));
        new.validate().unwrap();
        // Through a checkpoint's JSON and back, unchanged.
        let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        let adafactor: TrainConfig = toml::from_str("optimizer = \"adafactor\"").unwrap();
        assert_eq!(adafactor.adafactor, AdafactorSettings::default());
        assert!(!adafactor.adafactor.relative_step && !adafactor.adafactor.scale_parameter);
    }

    #[test]
    fn optimiser_settings_that_cannot_work_are_refused_in_words() {
        let relative = |schedule, warmup| TrainConfig {
            optimizer: Optimizer::Adafactor,
            adafactor: AdafactorSettings { relative_step: true, ..Default::default() },
            lr_schedule: schedule,
            warmup_steps: warmup,
            ..Default::default()
        };
        relative(LrSchedule::Constant, 0).validate().unwrap();
        for config in [relative(LrSchedule::Cosine, 0), relative(LrSchedule::Constant, 10)] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("sets its own rate from the step count"), "{err}");
        }
        let warmup_init = TrainConfig {
            optimizer: Optimizer::Adafactor,
            adafactor: AdafactorSettings { warmup_init: true, ..Default::default() },
            ..Default::default()
        };
        assert!(warmup_init.validate().unwrap_err().to_string().contains("needs relative_step"));
        let mut prodigy = TrainConfig { optimizer: Optimizer::Prodigy, ..Default::default() };
        prodigy.prodigy.growth_rate = Some(0.5);
        assert!(prodigy.validate().unwrap_err().to_string().contains("growth rate must be at least 1"));
        prodigy.prodigy.growth_rate = None;
        prodigy.prodigy.d0 = 0.0;
        assert!(prodigy.validate().unwrap_err().to_string().contains("d0 and d_coef must be positive"));
        prodigy.prodigy.d0 = 1e-6;
        (prodigy.train_text_encoder, prodigy.learning_rate, prodigy.text_encoder_lr) = (true, 1.0, Some(0.5));
        assert!(prodigy.validate().unwrap_err().to_string().contains("one learning rate for the UNet and the text"));
        prodigy.text_encoder_lr = None;
        prodigy.validate().unwrap();
    }

    #[test]
    fn timestep_bias_draws_the_chosen_end_more_often() {
        // Last 20 % drawn 4× as often: 0.8 / (0.8 + 0.8) = one half of all draws.
        assert!((share_of_late_steps(TimestepBias::Later, 4.0) - 0.5).abs() < 0.015);
        assert!((share_of_late_steps(TimestepBias::None, 4.0) - 0.2).abs() < 0.015);
        // Earlier: the first 20 % gets half, so the last 20 % gets 0.2 / 1.6 of all draws.
        assert!((share_of_late_steps(TimestepBias::Earlier, 4.0) - 0.125).abs() < 0.015);
        let mut rng = Rng::new(1);
        let config = TrainConfig { timestep_bias: TimestepBias::Later, ..Default::default() };
        assert!((0..1000).all(|_| config.sample_timestep(&mut rng, 1000) < 1000));
    }
}
