//! Pretrains the built-in model on the synthetic world (`synthetic.rs` beside this file), on the CPU:
//!
//!     cargo run --release --bin pretrain -- vae   [options]   # AutoencoderKL from scratch
//!     cargo run --release --bin pretrain -- model [options]   # text encoder + UNet, full training
//!     cargo run --release --bin pretrain -- eval  [options]   # PSNR, prompt following, timing
//!     cargo run --release --bin pretrain -- examples [options] # style datasets + two adapters
//!     cargo run --release --bin pretrain -- all   [options]   # all four, then the model card
//!
//! Intermediate results go to `--work` (default `target/pretrain`); the diffusers folder to `--out`
//! (default `assets/base`). Everything is seeded; progress lines carry step, loss and elapsed time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use lexopt::prelude::*;
use serde::{Deserialize, Serialize};

use lora_studio::engine::adapters::formats::Naming;
use lora_studio::engine::adapters::stack::TargetPreset;
use lora_studio::engine::diffusion::sampler::SamplerKind;
use lora_studio::engine::diffusion::schedule::{Prediction, SchedulerConfig, TimestepSpacing};
use lora_studio::engine::io::diffusers_folder::write_model_folder;
use lora_studio::engine::io::weights::{WeightMap, read_safetensors, write_safetensors};
use lora_studio::engine::models::clip::{ClipConfig, ClipTextModel};
use lora_studio::engine::models::tokenizer::ClipTokenizer;
use lora_studio::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_studio::engine::models::vae::{AutoencoderKL, VaeConfig};
use lora_studio::engine::pipeline::{GenerateRequest, ModelWeights, StableDiffusion, to_image};
use lora_studio::engine::rng::Rng;
// Part of its API (names, the style-scene helper) serves its test, `tests/synthetic.rs`, only.
#[allow(dead_code)]
mod synthetic;

mod eval;
mod examples;
mod model;
mod vae;

use eval::*;
use examples::*;
use model::*;
use vae::*;

use lora_studio::engine::train::dataset::{Dataset, DatasetOptions};
use lora_studio::engine::train::optim;
use lora_studio::engine::train::trainer::{Algorithm, LrSchedule, TimestepBias, TrainConfig, Trainer};
use synthetic::{Accuracy, SceneSpec, SceneStream, Style, images_to_tensor, judge, psnr, style_scene_sized};

/// Seeds of the held-out streams: never used for training.
const VAE_EVAL_SEED: u64 = 0xe7a1_0000_0000_0001;
const PROMPT_EVAL_SEED: u64 = 0xe7a1_0000_0000_0002;
/// Model size limit for the shipped folder (f16), in decimal megabytes to be safe.
const MAX_MODEL_BYTES: usize = 40_000_000;

#[derive(Clone, Debug)]
struct Options {
    work: PathBuf,
    out: PathBuf,
    seed: u64,
    size: u32,
    log_every: usize,
    vae_steps: usize,
    vae_batch: usize,
    vae_lr: f64,
    vae_minutes: Option<f64>,
    /// Side of the random crops the VAE trains on (it is fully convolutional; 0: whole scenes).
    vae_crop: u32,
    vae_channels: Vec<usize>,
    /// A VAE folder to continue from instead of a fresh initialisation.
    vae_init: Option<PathBuf>,
    /// Train only the decoder: the latent space (and a UNet trained on it) stays valid.
    vae_decoder_only: bool,
    steps: usize,
    batch: usize,
    lr: f64,
    warmup: usize,
    pool: usize,
    refresh: usize,
    model_minutes: Option<f64>,
    /// A model folder whose UNet and text encoder training continues from.
    model_init: Option<PathBuf>,
    /// Offset noise (kohya's `--noise_offset`), a partial cure for what `zero_snr` fixes.
    noise_offset: f64,
    /// Train for a zero-terminal-SNR schedule with v-prediction (Lin et al. 2024). With SD's
    /// schedule the model read a picture's colours from the starting noise's mean instead of the
    /// prompt (16×16 latents make that mean as large as the signal left at t = 999); at zero SNR
    /// the input at t = 999 is pure noise, so colours can only come from the prompt.
    zero_snr: bool,
    /// Min-SNR-γ loss weighting; none by default (for v at zero SNR it weights t = 999 by 0).
    min_snr_gamma: Option<f64>,
    /// Draw the noisiest `portion` of timesteps `multiplier` times as often (none when 1).
    late_bias: f64,
    late_portion: f64,
    /// Text encoder learning rate (defaults to `lr`).
    text_lr: Option<f64>,
    text_hidden: usize,
    text_layers: usize,
    unet_channels: Vec<usize>,
    eval_images: usize,
    eval_prompts: usize,
    gen_steps: usize,
    guidance: f64,
    examples: PathBuf,
    example_images: usize,
    example_steps: usize,
    example_rank: usize,
    example_lr: f64,
    style_prompts: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            work: PathBuf::from("target/pretrain"),
            out: PathBuf::from("assets/base"),
            seed: 0,
            size: 64,
            log_every: 10,
            vae_steps: 3000,
            vae_batch: 8,
            vae_lr: 1e-3,
            vae_minutes: None,
            // Whole scenes: a VAE trained on 16 px crops scored 24 dB on crops but 15 dB on whole
            // 64 px scenes (its group norms and mid-block attention saw other statistics).
            vae_crop: 0,
            vae_channels: vec![32, 64, 128],
            vae_init: None,
            vae_decoder_only: false,
            steps: 4000,
            batch: 8,
            lr: 3e-4,
            warmup: 100,
            pool: 512,
            refresh: 128,
            model_minutes: None,
            model_init: None,
            noise_offset: 0.0,
            zero_snr: true,
            min_snr_gamma: None,
            late_bias: 1.0,
            late_portion: 0.2,
            text_lr: None,
            text_hidden: 128,
            text_layers: 4,
            unet_channels: vec![64, 128, 160],
            eval_images: 200,
            eval_prompts: 100,
            gen_steps: 20,
            guidance: 5.0,
            examples: PathBuf::from("assets/examples"),
            example_images: 24,
            example_steps: 300,
            example_rank: 8,
            example_lr: 1e-3,
            style_prompts: 16,
        }
    }
}

const HELP: &str =
    "pretrain vae|model|checkpoint|eval|examples|all [--work DIR] [--out DIR] [--seed N] [--size PX] [--log-every N]
  vae:   --vae-steps N --vae-batch N --vae-lr F --vae-minutes M --vae-crop PX --vae-channels A,B,C
         --vae-init VAE_DIR (continue from a trained VAE) --vae-decoder-only (keep its latent space)
         (with --vae-minutes / --model-minutes the step count is re-sized, after the first
         measured steps, to what fits in that time, so the LR schedule ends on time)
  model: --steps N --batch N --lr F --warmup N --pool N --refresh N --model-minutes M
         --model-init MODEL_DIR (continue its UNet and text encoder) --noise-offset F (default 0)
         --epsilon (SD's ε schedule instead of zero terminal SNR + v-prediction) --min-snr-gamma F
         --late-bias F --late-portion F (draw the noisiest fraction of timesteps F times as often)
         --text-lr F (text encoder learning rate; default --lr)
         --text-hidden N --text-layers N --unet-channels A,B,C
  eval:  --eval-images N --eval-prompts N --gen-steps N --guidance F
  examples: --examples DIR --example-images N --example-steps N --example-rank N --example-lr F
         --style-prompts N";

fn parse() -> Result<(String, Options)> {
    let mut p = lexopt::Parser::from_env();
    let mut o = Options::default();
    let mut command = None;
    while let Some(arg) = p.next()? {
        match arg {
            Value(v) if command.is_none() => command = Some(v.string()?),
            Long("help") | Short('h') => {
                println!("{HELP}");
                std::process::exit(0);
            }
            Long("work") => o.work = p.value()?.into(),
            Long("out") => o.out = p.value()?.into(),
            Long("seed") => o.seed = p.value()?.parse()?,
            Long("size") => o.size = p.value()?.parse()?,
            Long("log-every") => o.log_every = p.value()?.parse::<usize>()?.max(1),
            Long("vae-steps") => o.vae_steps = p.value()?.parse()?,
            Long("vae-batch") => o.vae_batch = p.value()?.parse()?,
            Long("vae-lr") => o.vae_lr = p.value()?.parse()?,
            Long("vae-minutes") => o.vae_minutes = Some(p.value()?.parse()?),
            Long("vae-crop") => o.vae_crop = p.value()?.parse()?,
            Long("vae-channels") => o.vae_channels = parse_list(&p.value()?.string()?)?,
            Long("vae-init") => o.vae_init = Some(p.value()?.into()),
            Long("vae-decoder-only") => o.vae_decoder_only = true,
            Long("model-init") => o.model_init = Some(p.value()?.into()),
            Long("noise-offset") => o.noise_offset = p.value()?.parse()?,
            Long("epsilon") => o.zero_snr = false,
            Long("min-snr-gamma") => o.min_snr_gamma = Some(p.value()?.parse()?),
            Long("late-bias") => o.late_bias = p.value()?.parse()?,
            Long("late-portion") => o.late_portion = p.value()?.parse()?,
            Long("text-lr") => o.text_lr = Some(p.value()?.parse()?),
            Long("steps") => o.steps = p.value()?.parse()?,
            Long("batch") => o.batch = p.value()?.parse()?,
            Long("lr") => o.lr = p.value()?.parse()?,
            Long("warmup") => o.warmup = p.value()?.parse()?,
            Long("pool") => o.pool = p.value()?.parse()?,
            Long("refresh") => o.refresh = p.value()?.parse::<usize>()?.max(1),
            Long("model-minutes") => o.model_minutes = Some(p.value()?.parse()?),
            Long("text-hidden") => o.text_hidden = p.value()?.parse()?,
            Long("text-layers") => o.text_layers = p.value()?.parse()?,
            Long("unet-channels") => o.unet_channels = parse_list(&p.value()?.string()?)?,
            Long("eval-images") => o.eval_images = p.value()?.parse()?,
            Long("eval-prompts") => o.eval_prompts = p.value()?.parse()?,
            Long("gen-steps") => o.gen_steps = p.value()?.parse()?,
            Long("guidance") => o.guidance = p.value()?.parse()?,
            Long("examples") => o.examples = p.value()?.into(),
            Long("example-images") => o.example_images = p.value()?.parse()?,
            Long("example-steps") => o.example_steps = p.value()?.parse()?,
            Long("example-rank") => o.example_rank = p.value()?.parse()?,
            Long("example-lr") => o.example_lr = p.value()?.parse()?,
            Long("style-prompts") => o.style_prompts = p.value()?.parse::<usize>()?.max(1),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let command = command.with_context(|| format!("which stage?\n{HELP}"))?;
    if o.size == 0 || !o.size.is_multiple_of(16) {
        bail!("--size must be a positive multiple of 16");
    }
    Ok((command, o))
}

/// "32,64,128" → [32, 64, 128].
fn parse_list(text: &str) -> Result<Vec<usize>> {
    text.split(',').map(|s| s.trim().parse().with_context(|| format!("`{s}` is not a number"))).collect()
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, no other thread yet.
    unsafe { lora_studio::engine::kernels::cpu::configure() };
    let (command, o) = parse()?;
    std::fs::create_dir_all(&o.work).with_context(|| format!("{}: cannot create", o.work.display()))?;
    println!(
        "pretrain {command}: {} threads, seed {}, {}px scenes",
        candle_core::utils::get_num_threads(),
        o.seed,
        o.size
    );
    match command.as_str() {
        "vae" => train_vae(&o).map(|_| ()),
        "model" => train_model(&o).map(|_| ()),
        "eval" => evaluate(&o).map(|_| ()),
        "checkpoint" => checkpoint_folder(&o),
        "examples" => make_examples(&o),
        "all" => {
            train_vae(&o)?;
            train_model(&o)?;
            evaluate(&o)?;
            make_examples(&o)
        }
        other => bail!("unknown stage `{other}`\n{HELP}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisation

/// Names and shapes of every tensor a model asks for, from a synthetic map.
fn tensor_shapes(build: impl FnOnce(&WeightMap) -> Result<()>) -> Result<Vec<(String, Vec<usize>)>> {
    let synthetic = WeightMap::synthetic(DType::F32, &Device::Cpu);
    build(&synthetic)?;
    let mut v: Vec<(String, Vec<usize>)> =
        synthetic.generated().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
    v.sort();
    Ok(v)
}

/// A proper initialisation: norms weight 1 bias 0, biases 0, embeddings N(0, 0.02), weights
/// uniform with variance 1/fan_in, and `zero(name)` weights (residual branch outputs) at zero, so
/// every residual block starts as the identity.
fn initialise(
    shapes: &[(String, Vec<usize>)],
    zero: &dyn Fn(&str) -> bool,
    rng: &mut Rng,
    source: &str,
) -> Result<WeightMap> {
    let mut map = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let mut parts = name.rsplit('.');
        let leaf = parts.next().unwrap_or_default();
        let module = parts.next().unwrap_or_default();
        let values: Vec<f32> = if leaf == "bias" {
            vec![0.0; n]
        } else if module.contains("norm") {
            vec![1.0; n]
        } else if module.ends_with("embedding") {
            let std = if module.starts_with("position") { 0.01 } else { 0.02 };
            let mut v = vec![0f32; n];
            rng.fill_normal(&mut v);
            v.iter_mut().for_each(|x| *x *= std);
            v
        } else if zero(name) {
            vec![0.0; n]
        } else {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let bound = (3.0 / fan_in as f64).sqrt();
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
        };
        map.insert(name.clone(), Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?);
    }
    WeightMap::new(map, source, DType::F32, &Device::Cpu)
}

fn vae_config(o: &Options) -> Result<VaeConfig> {
    let c = &o.vae_channels;
    if c.len() != 3 {
        bail!("--vae-channels takes three numbers (factor 4)");
    }
    let groups = c.iter().copied().fold(32, gcd);
    Ok(VaeConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 4,
        block_out_channels: c.clone(),
        layers_per_block: 1,
        norm_num_groups: groups,
        scaling_factor: 1.0,
        use_quant_conv: true,
        use_post_quant_conv: true,
        mid_block_add_attention: true,
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn text_config(o: &Options) -> ClipConfig {
    ClipConfig {
        vocab_size: 49408,
        hidden_size: o.text_hidden,
        intermediate_size: 4 * o.text_hidden,
        num_hidden_layers: o.text_layers,
        num_attention_heads: (o.text_hidden / 32).max(1),
        max_position_embeddings: 77,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        eos_token_id: lora_studio::engine::models::tokenizer::END_OF_TEXT,
    }
}

/// The shape of bench's `small` config (DownBlock2D first, cross-attention below it), narrower.
fn unet_config(o: &Options) -> Result<UNetConfig> {
    let c = &o.unet_channels;
    if c.len() != 3 {
        bail!("--unet-channels takes three numbers");
    }
    let json = serde_json::json!({
        "in_channels": 4, "out_channels": 4, "block_out_channels": c, "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8, "cross_attention_dim": o.text_hidden, "norm_num_groups": 32,
        "sample_size": o.size / 4,
    });
    let cfg: UNetConfig = serde_json::from_value(json)?;
    cfg.validate()?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// AdamW over a list of variables, with the engine's update (`engine::train::optim`)

struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    weight_decay: f64,
    max_grad_norm: f64,
}

impl AdamW {
    fn new(vars: Vec<(String, Var)>) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, m, v, t: 0, weight_decay: 0.0, max_grad_norm: 1.0 })
    }

    /// One step at `lr`; returns the gradient norm before clipping.
    fn step(&mut self, loss: &Tensor, lr: f64) -> Result<f64> {
        let grads = loss.backward()?;
        let norm = optim::global_norm(self.vars.iter().filter_map(|(_, var)| grads.get(var.as_tensor())))?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: lower the learning rate");
        }
        let clip = optim::clip_factor(norm, self.max_grad_norm);
        self.t += 1;
        let adamw = optim::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: self.weight_decay };
        for (i, (_, var)) in self.vars.iter().enumerate() {
            // Detached: candle's variable gradients still reference this step's graph.
            let Some(g) = grads.get(var.as_tensor()).map(Tensor::detach) else { continue };
            let u = adamw.update(&var.as_tensor().detach(), &(g * clip)?, &self.m[i], &self.v[i], self.t, lr)?;
            (self.m[i], self.v[i]) = (u.m, u.v);
            var.set(&u.weight)?;
        }
        Ok(norm)
    }
}

/// Linear warmup, then cosine decay to 10 %.
fn lr_at(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let p = ((step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn over_time(start: Instant, minutes: Option<f64>) -> bool {
    minutes.is_some_and(|m| start.elapsed().as_secs_f64() > m * 60.0)
}
