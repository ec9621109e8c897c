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

// ---------------------------------------------------------------------------------------------
// Stage 1: the VAE

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct VaeStats {
    steps: usize,
    batch: usize,
    seconds: f64,
    first_loss: f32,
    final_loss: f32,
    scaling_factor: f64,
    parameters: usize,
}

fn vae_dir(o: &Options) -> PathBuf {
    o.work.join("vae")
}

fn train_vae(o: &Options) -> Result<VaeStats> {
    let device = Device::Cpu;
    let (mut config, mut weights) = match &o.vae_init {
        Some(dir) => {
            let config = VaeConfig::from_file(&dir.join("config.json"))?;
            let weights =
                WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)?;
            println!("vae: continuing from {}", dir.display());
            (config, weights)
        }
        None => {
            let config = vae_config(o)?;
            let shapes = tensor_shapes(|m| AutoencoderKL::load(&config, m).map(|_| ()))?;
            let mut rng = Rng::new(o.seed ^ 0x7ae);
            let resnet_out = |n: &str| n.contains("resnets.") && n.ends_with("conv2.weight");
            (config.clone(), initialise(&shapes, &resnet_out, &mut rng, "new VAE")?)
        }
    };
    let mut total = o.vae_steps;
    let decoder_only = o.vae_decoder_only;
    let vars =
        weights.make_trainable(|n| !decoder_only || n.starts_with("decoder.") || n.starts_with("post_quant_conv."))?;
    let parameters: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let vae = AutoencoderKL::load(&config, &weights)?;
    let mut opt = AdamW::new(vars)?;
    println!(
        "vae: {parameters} parameters, blocks {:?}, {} steps of batch {} ({}px crops)",
        config.block_out_channels,
        o.vae_steps,
        o.vae_batch,
        if o.vae_crop == 0 { o.size } else { o.vae_crop.min(o.size) }
    );
    let mut scenes = SceneStream::new(o.seed ^ 0x5ce7e);
    let mut crop_rng = Rng::new(o.seed ^ 0xc0);
    let start = Instant::now();
    let (mut first, mut last, mut window) = (f32::NAN, f32::NAN, Vec::new());
    let mut done = 0;
    let mut step = 0;
    while step < total {
        let crop = if o.vae_crop == 0 || o.vae_crop >= o.size { o.size } else { o.vae_crop / 4 * 4 };
        let images: Vec<_> = (0..o.vae_batch)
            .map(|_| {
                let img = scenes.next().unwrap().render(o.size);
                let (x, y) =
                    (crop_rng.below((o.size - crop) as usize + 1), crop_rng.below((o.size - crop) as usize + 1));
                image::imageops::crop_imm(&img, x as u32, y as u32, crop, crop).to_image()
            })
            .collect();
        let t_fwd = Instant::now();
        let x = images_to_tensor(&images, &device)?;
        let z = if decoder_only { vae.encode_mean(&x)?.detach() } else { vae.encode_mean(&x)? };
        let recon = vae.decode(&z)?;
        let mse = recon.sub(&x)?.sqr()?.mean_all()?;
        let loss = (&mse + (z.sqr()?.mean_all()? * 1e-4)?)?;
        let lr = lr_at(o.vae_lr, step, 50.min(o.vae_steps / 10 + 1), total);
        let value = mse.to_scalar::<f32>()?;
        let fwd_s = t_fwd.elapsed().as_secs_f64();
        let gnorm = opt.step(&loss, lr)?;
        if step < 2 {
            println!(
                "vae step {}: forward {fwd_s:.2}s, backward + update {:.2}s",
                step + 1,
                t_fwd.elapsed().as_secs_f64() - fwd_s
            );
        }
        if step == 0 {
            first = value;
        }
        window.push(value);
        done = step + 1;
        step += 1;
        if let Some(m) = o.vae_minutes
            && done == 20
        {
            let s = start.elapsed().as_secs_f64();
            total = done + ((m * 60.0 - s).max(0.0) * done as f64 / s * 0.97) as usize;
            println!("vae: {:.3} step/s → {total} steps fit in {m} minutes", done as f64 / s);
        }
        if done % o.log_every == 0 || done == total {
            last = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let s = start.elapsed().as_secs_f64();
            println!(
                "vae step {done}/{} mse {last:.5} (psnr≈{:.1} dB) grad {gnorm:.3} lr {lr:.1e} elapsed {s:.1}s ({:.2} step/s)",
                total,
                10.0 * (4.0 / last as f64).log10(),
                done as f64 / s
            );
        }
        if over_time(start, o.vae_minutes) {
            println!("vae: time limit reached at step {done}");
            break;
        }
    }
    if !window.is_empty() {
        last = window.iter().sum::<f32>() / window.len() as f32;
    }
    let seconds = start.elapsed().as_secs_f64();
    // Latent scaling factor: 1 / std of the latents of held-out scenes.
    let mut held = SceneStream::new(VAE_EVAL_SEED);
    let mut zs = Vec::new();
    for _ in 0..8 {
        let images: Vec<_> = (0..16).map(|_| held.next().unwrap().render(o.size)).collect();
        zs.push(vae.encode_mean(&images_to_tensor(&images, &device)?)?.detach().flatten_all()?);
    }
    let z = Tensor::cat(&zs, 0)?;
    let mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let std = ((z.sqr()?.mean_all()?.to_scalar::<f32>()? as f64) - mean * mean).max(1e-12).sqrt();
    config.scaling_factor = 1.0 / std;
    println!("vae: latent mean {mean:.4} std {std:.4} → scaling factor {:.5}", config.scaling_factor);
    let dir = vae_dir(o);
    std::fs::create_dir_all(&dir)?;
    let tensors: HashMap<String, Tensor> =
        weights.names().map(|n| (n.clone(), weights.tensor(n).unwrap().detach())).collect();
    write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, None)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let stats = VaeStats {
        steps: done,
        batch: o.vae_batch,
        seconds,
        first_loss: first,
        final_loss: last,
        scaling_factor: config.scaling_factor,
        parameters,
    };
    std::fs::write(dir.join("stats.json"), serde_json::to_string_pretty(&stats)?)?;
    println!("vae: {done} steps in {seconds:.0}s, mse {first:.4} → {last:.4}; written to {}", dir.display());
    Ok(stats)
}

fn load_trained_vae(o: &Options) -> Result<(VaeConfig, WeightMap)> {
    let dir = vae_dir(o);
    let config = VaeConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("no trained VAE in {} (run `pretrain vae` first)", dir.display()))?;
    let weights = WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok((config, weights))
}

// ---------------------------------------------------------------------------------------------
// Stage 2: text encoder + UNet

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct ModelStats {
    steps: usize,
    batch: usize,
    seconds: f64,
    scenes_seen: usize,
    first_loss: f32,
    final_loss: f32,
    unet_parameters: usize,
    text_parameters: usize,
    vae_parameters: usize,
    f16_bytes: usize,
    text_hidden: usize,
    unet_channels: Vec<usize>,
}

/// Writes `count` fresh scenes (PNG + caption) into `dir`, replacing what was there.
fn write_pool(dir: &Path, scenes: &mut SceneStream, count: usize, size: u32) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for i in 0..count {
        let s = scenes.next().unwrap();
        s.render(size).save(dir.join(format!("{i:05}.png")))?;
        std::fs::write(dir.join(format!("{i:05}.txt")), s.caption())?;
    }
    Ok(())
}

/// The weights as trained so far: the base (VAE, configs) with a checkpoint's parameters.
fn weights_from_checkpoint(base: &ModelWeights, checkpoint: &Path) -> Result<ModelWeights> {
    let mut w = base.clone();
    for (name, t) in read_safetensors(checkpoint)? {
        if let Some(n) = name.strip_prefix("param/unet.") {
            w.unet.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("param/text_encoder.") {
            w.text_encoder.insert(n.to_string(), t);
        }
    }
    Ok(w)
}

/// The noise schedule the model trains for and ships with.
fn schedule(o: &Options) -> SchedulerConfig {
    if !o.zero_snr {
        return SchedulerConfig::default();
    }
    let mut s = SchedulerConfig::stable_diffusion(Prediction::V);
    s.rescale_betas_zero_snr = true;
    // Trailing spacing starts sampling at t = 999, the one step that is pure noise.
    s.timestep_spacing = TimestepSpacing::Trailing;
    s.steps_offset = 0;
    s
}

fn count(map: &WeightMap) -> usize {
    map.names().map(|n| map.tensor(n).unwrap().elem_count()).sum()
}

/// The model training starts from: the trained VAE, and a new or continued UNet and text
/// encoder, with the schedule of `o`.
fn base_weights(o: &Options) -> Result<ModelWeights> {
    let (vae_config, vae) = load_trained_vae(o)?;
    let unet_config = unet_config(o)?;
    let text_config = text_config(o);
    let mut rng = Rng::new(o.seed ^ 0x0de1);
    let unet_shapes = tensor_shapes(|m| UNet2DConditionModel::load(&unet_config, m).map(|_| ()))?;
    let text_shapes = tensor_shapes(|m| ClipTextModel::load(&text_config, m).map(|_| ()))?;
    // Zero-init the UNet's output conv and every residual branch's last layer.
    let unet_zero = |n: &str| {
        n == "conv_out.weight"
            || (n.contains("resnets.") && n.ends_with("conv2.weight"))
            || n.ends_with("proj_out.weight")
    };
    let base = match &o.model_init {
        Some(dir) => {
            let init = ModelWeights::load(dir, DType::F32, &Device::Cpu)?;
            println!("model: continuing the UNet and text encoder of {}", dir.display());
            ModelWeights { vae, vae_config, ..init }
        }
        None => ModelWeights {
            unet: initialise(&unet_shapes, &unet_zero, &mut rng, "new UNet")?,
            text_encoder: initialise(&text_shapes, &|_| false, &mut rng, "new text encoder")?,
            vae,
            unet_config: unet_config.clone(),
            text_config: text_config.clone(),
            vae_config,
            scheduler_config: SchedulerConfig::default(),
            tokenizer: ClipTokenizer::new(),
        },
    };
    Ok(ModelWeights { scheduler_config: schedule(o), ..base })
}

/// Writes the running (or last) model training's checkpoint as a model folder at `--out`, to
/// evaluate a run in progress.
fn checkpoint_folder(o: &Options) -> Result<()> {
    let base = base_weights(o)?;
    let trained = weights_from_checkpoint(&base, &o.work.join("model.checkpoint.safetensors"))?;
    write_model_folder(&trained, &o.out, DType::F16, None, true)?;
    println!("checkpoint: written to {}", o.out.display());
    Ok(())
}

fn train_model(o: &Options) -> Result<ModelStats> {
    let base = base_weights(o)?;
    let (pu, pt, pv) = (count(&base.unet), count(&base.text_encoder), count(&base.vae));
    let f16_bytes = 2 * (pu + pt + pv);
    println!(
        "model: UNet {:.2}M, text encoder {:.2}M, VAE {:.2}M parameters = {:.1} MB in f16 (limit {:.0} MB)",
        pu as f64 / 1e6,
        pt as f64 / 1e6,
        pv as f64 / 1e6,
        f16_bytes as f64 / 1e6,
        MAX_MODEL_BYTES as f64 / 1e6
    );
    if f16_bytes > MAX_MODEL_BYTES {
        bail!("the model is over the size limit; use smaller --unet-channels or --text-hidden");
    }
    let mut config = TrainConfig {
        algorithm: Algorithm::Full,
        train_text_encoder: true,
        learning_rate: o.lr,
        steps: o.steps,
        batch_size: o.batch,
        seed: o.seed,
        lr_schedule: LrSchedule::Cosine,
        warmup_steps: o.warmup.min(o.steps / 2),
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        min_snr_gamma: o.min_snr_gamma,
        noise_offset: o.noise_offset,
        timestep_bias: if o.late_bias == 1.0 { TimestepBias::None } else { TimestepBias::Later },
        timestep_bias_multiplier: o.late_bias,
        timestep_bias_portion: o.late_portion,
        text_encoder_lr: o.text_lr,
        caption_dropout: 0.1,
        dataset: DatasetOptions {
            resolution: o.size as usize,
            center_crop: true,
            flip: false, // captions say left and right
            min_side: 16,
            ..Default::default()
        },
        validation_images: 4,
        ..Default::default()
    };
    let pool_dir = o.work.join("pool");
    let checkpoint = o.work.join("model.checkpoint.safetensors");
    let mut scenes = SceneStream::new(o.seed ^ 0x7a1e);
    let build = |config: &TrainConfig, resume: bool| -> Result<Trainer> {
        let ds = Dataset::scan(std::slice::from_ref(&pool_dir), &config.dataset)?;
        let mut t = Trainer::new_full(base.clone(), config.clone(), &ds)?;
        if resume {
            t.load_checkpoint(&checkpoint)?;
        }
        Ok(t)
    };
    let start = Instant::now();
    write_pool(&pool_dir, &mut scenes, o.pool, o.size)?;
    let mut trainer = build(&config, false)?;
    println!(
        "model: {} trainable parameters; {} steps of batch {}, a fresh pool of {} scenes every {} steps ({:.1}s to set up)",
        trainer.trainable_parameters(),
        o.steps,
        o.batch,
        o.pool,
        o.refresh,
        start.elapsed().as_secs_f64()
    );
    let mut scenes_seen = o.pool;
    let mut window = Vec::new();
    let mut refresh_s = 0.0;
    while trainer.step < config.steps {
        if trainer.step > 0 && trainer.step.is_multiple_of(o.refresh) {
            if let Some(m) = o.model_minutes
                && trainer.step == o.refresh
            {
                let s = start.elapsed().as_secs_f64();
                let rate = trainer.step as f64 / s;
                config.steps = trainer.step + ((m * 60.0 - s).max(0.0) * rate * 0.97) as usize;
                config.warmup_steps = config.warmup_steps.min(config.steps / 5);
                println!("model: {rate:.3} step/s → {} steps fit in {m} minutes", config.steps);
            }
            let t0 = Instant::now();
            trainer.save_checkpoint(&checkpoint)?;
            drop(trainer);
            write_pool(&pool_dir, &mut scenes, o.pool, o.size)?;
            trainer = build(&config, true)?;
            scenes_seen += o.pool;
            refresh_s += t0.elapsed().as_secs_f64();
        }
        let loss = trainer.train_step()?;
        window.push(loss);
        let step = trainer.step;
        if step.is_multiple_of(o.log_every) || step == config.steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let s = start.elapsed().as_secs_f64();
            println!(
                "model step {step}/{} loss {mean:.4} lr {:.1e} elapsed {s:.1}s ({:.2} step/s, {refresh_s:.0}s in pool refreshes)",
                config.steps,
                trainer.current_lr(),
                step as f64 / s
            );
        }
        if over_time(start, o.model_minutes) {
            println!("model: time limit reached at step {step}");
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let losses = trainer.losses.clone();
    let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let k = (losses.len() / 10).max(1);
    let (first_loss, final_loss) =
        (avg(&losses[..k.min(losses.len())]), avg(&losses[losses.len().saturating_sub(k)..]));
    println!("model: validation loss {:.4}", trainer.validation_loss()?);
    trainer.save_checkpoint(&checkpoint)?;
    let trained = weights_from_checkpoint(&base, &checkpoint)?;
    write_model_folder(&trained, &o.out, DType::F16, None, true)?;
    let stats = ModelStats {
        steps: trainer.step,
        batch: o.batch,
        seconds,
        scenes_seen,
        first_loss,
        final_loss,
        unet_parameters: pu,
        text_parameters: pt,
        vae_parameters: pv,
        f16_bytes,
        text_hidden: o.text_hidden,
        unet_channels: o.unet_channels.clone(),
    };
    std::fs::write(o.work.join("model_stats.json"), serde_json::to_string_pretty(&stats)?)?;
    let _ = std::fs::remove_dir_all(&pool_dir);
    println!(
        "model: {} steps in {seconds:.0}s, loss {first_loss:.4} → {final_loss:.4} (first/last 10 %); written to {}",
        trainer.step,
        o.out.display()
    );
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Stage 3: evaluation and the model card

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct EvalStats {
    vae_psnr_db: f64,
    vae_images: usize,
    prompts: usize,
    guidance: f64,
    gen_steps: usize,
    foreground_colour: f64,
    shape_colour: f64,
    background_colour: f64,
    pattern: f64,
    shape: f64,
    /// The analyser on the rendered ground truth of the same prompts (its ceiling).
    ground_truth_shape_colour: f64,
    /// The analyser on each prompt's neighbour's ground truth (chance level).
    chance_shape_colour: f64,
    chance_background_colour: f64,
    chance_pattern: f64,
    seconds_per_image: f64,
}

fn evaluate(o: &Options) -> Result<EvalStats> {
    let device = Device::Cpu;
    let model = StableDiffusion::load(&o.out, &device)?;
    let start = Instant::now();
    // VAE reconstruction on held-out scenes.
    let mut held = SceneStream::new(VAE_EVAL_SEED ^ 0xff);
    let (mut total, mut n) = (0.0, 0);
    while n < o.eval_images {
        let b = (o.eval_images - n).min(8);
        let images: Vec<_> = (0..b).map(|_| held.next().unwrap().render(o.size)).collect();
        let z = model.vae.encode_mean(&images_to_tensor(&images, &device)?)?;
        let recon = model.vae.decode(&z)?;
        for (i, img) in images.iter().enumerate() {
            total += psnr(img, &to_image(&recon.get(i)?)?);
        }
        n += b;
    }
    let vae_psnr_db = total / n.max(1) as f64;
    println!("eval: VAE PSNR {vae_psnr_db:.2} dB on {n} held-out scenes ({:.1}s)", start.elapsed().as_secs_f64());
    // Prompt following.
    let mut prompts = SceneStream::new(PROMPT_EVAL_SEED);
    let mut judgements = Vec::new();
    let mut truth = Vec::new();
    let mut chance = Vec::new();
    let mut previous: Option<image::RgbImage> = None;
    let mut times = Vec::new();
    let mut strip = image::RgbImage::new(o.size * 8, o.size * 2);
    for i in 0..o.eval_prompts {
        let spec: SceneSpec = prompts.next().unwrap();
        let req = GenerateRequest {
            prompt: spec.caption(),
            negative: String::new(),
            seed: i as u64,
            steps: o.gen_steps,
            guidance: o.guidance,
            sampler: SamplerKind::Ddim,
            width: o.size as usize,
            height: o.size as usize,
        };
        let t0 = Instant::now();
        let img = model.generate(&req, &mut |_, _| {})?;
        times.push(t0.elapsed().as_secs_f64());
        let j = judge(&img, &spec);
        let rendered = spec.render(o.size);
        truth.push(judge(&rendered, &spec));
        if let Some(p) = &previous {
            chance.push(judge(p, &spec));
        }
        previous = Some(rendered.clone());
        if i < 8 {
            image::imageops::replace(&mut strip, &rendered, (i as u32 * o.size) as i64, 0);
            image::imageops::replace(&mut strip, &img, (i as u32 * o.size) as i64, o.size as i64);
        }
        judgements.push(j);
        if (i + 1) % o.log_every == 0 || i + 1 == o.eval_prompts {
            let a = Accuracy::from_judgements(&judgements);
            println!(
                "eval prompt {}/{} fg colour {:.2} bg colour {:.2} pattern {:.2} elapsed {:.1}s",
                i + 1,
                o.eval_prompts,
                a.shape_colour,
                a.background_colour,
                a.pattern,
                start.elapsed().as_secs_f64()
            );
        }
    }
    strip.save(o.work.join("eval-samples.png"))?;
    let a = Accuracy::from_judgements(&judgements);
    let gt = Accuracy::from_judgements(&truth);
    let ch = Accuracy::from_judgements(&chance);
    times.sort_by(f64::total_cmp);
    let stats = EvalStats {
        vae_psnr_db,
        vae_images: n,
        prompts: o.eval_prompts,
        guidance: o.guidance,
        gen_steps: o.gen_steps,
        foreground_colour: a.foreground_colour,
        shape_colour: a.shape_colour,
        background_colour: a.background_colour,
        pattern: a.pattern,
        shape: a.shape,
        ground_truth_shape_colour: gt.shape_colour,
        chance_shape_colour: ch.shape_colour,
        chance_background_colour: ch.background_colour,
        chance_pattern: ch.pattern,
        seconds_per_image: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
    };
    println!("eval: {}", serde_json::to_string(&stats)?);
    println!(
        "eval: top row rendered ground truth, bottom row generated: {}",
        o.work.join("eval-samples.png").display()
    );
    std::fs::write(o.work.join("eval.json"), serde_json::to_string_pretty(&stats)?)?;
    write_card(o, &stats)?;
    Ok(stats)
}

/// The model and example stages' loss weighting, in words for the cards.
fn loss_weighting(o: &Options) -> String {
    o.min_snr_gamma.map_or("uniform loss weights".to_string(), |g| format!("min-SNR γ = {g}"))
        + &if o.late_bias == 1.0 {
            String::new()
        } else {
            format!(", the noisiest {:.0} % of timesteps drawn {}× as often", 100.0 * o.late_portion, o.late_bias)
        }
}

fn read_json<T: for<'a> Deserialize<'a> + Default>(path: &Path) -> T {
    std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

fn write_card(o: &Options, e: &EvalStats) -> Result<()> {
    let v: VaeStats = read_json(&vae_dir(o).join("stats.json"));
    let m: ModelStats = read_json(&o.work.join("model_stats.json"));
    let card = format!(
        r#"# LoRA Studio base model ("synthetic shapes")

A tiny text-to-image latent diffusion model in the Stable Diffusion 1.x layout (diffusers folder),
trained from scratch on the CPU by `cargo run --release --bin pretrain -- all`, so that LoRA Studio
works offline. It draws {size}×{size} pictures of simple shapes; it is not a general image model.

## Training data

Only procedurally drawn scenes from `src/engine/synthetic.rs` (seeded, no external images): one to
three shapes (circle, square, triangle, star, ring), small or big, in eleven named colours, in the
cells of a 3×3 grid, on a solid, gradient, striped, dotted, checkered or noisy background of a
named colour. Every caption says all of it, e.g. "a small red star in the top left and a big blue
circle in the centre on a striped yellow background".

## Architecture

| part | size |
|---|---|
| VAE (AutoencoderKL, factor 4, 4 latent channels, blocks 32/64/128) | {vp:.2} M parameters, scaling factor {sf:.4} |
| text encoder (CLIP text model, hidden {th}, CLIP BPE vocabulary) | {tp:.2} M parameters |
| UNet (blocks {uc:?}, cross-attention on the lower two levels) | {up:.2} M parameters |
| weights on disk (f16) | {mb:.1} MB |

Scheduler: {schedule}

## Training

- VAE: {vs} steps of batch {vb} ({vmin:.0} min); reconstruction MSE {vf:.4} → {vl:.4}, plus 1e-4 × mean(z²).
- Text encoder + UNet, full training with AdamW (cosine schedule, {weighting}, 10 % caption
  dropout for classifier-free guidance): {ms} steps of batch {mb_} ({mmin:.0} min), {seen} fresh scenes;
  loss {mf:.4} → {ml:.4} (mean of the first and last 10 % of steps).

## Evaluation (held-out seeds)

| measure | value |
|---|---|
| VAE reconstruction PSNR, {vi} scenes | {psnr:.2} dB |
| shapes drawn in the asked colour, {np} prompts | {sc:.0} % (analyser on ground truth: {gt:.0} %, chance: {csc:.0} %) |
| scenes with every shape in the asked colour | {fc:.0} % |
| background colour as asked | {bc:.0} % (chance: {cbc:.0} %) |
| background pattern as asked | {pa:.0} % (chance: {cpa:.0} %) |
| shape as asked | {sh:.0} % |
| time for one image ({gs} DDIM steps, guidance {g}) | {spi:.2} s |

Colours, backgrounds and shapes are judged by the deterministic analyser in
`src/engine/synthetic.rs`, which is right on 100 % of rendered ground-truth scenes; "chance" is
the analyser judging each prompt against another prompt's picture.

## Limits

- {size}×{size} only; other sizes are outside what it was trained on.
- Knows only the words of the synthetic captions; any other prompt gives an arbitrary scene.
- Small shapes come out blurry and shapes are judged less reliably than colours.
- Meant as a base for LoRA examples and tests, not for real pictures.
"#,
        size = o.size,
        schedule = if o.zero_snr {
            "Stable Diffusion's scaled-linear β schedule rescaled to zero terminal SNR (diffusers' \
             `rescale_betas_zero_snr`), 1000 steps, v-prediction, trailing timestep spacing."
        } else {
            "Stable Diffusion's scaled-linear β schedule, 1000 steps, ε-prediction."
        },
        weighting = loss_weighting(o),
        vp = m.vae_parameters as f64 / 1e6,
        sf = v.scaling_factor,
        th = m.text_hidden,
        tp = m.text_parameters as f64 / 1e6,
        uc = m.unet_channels,
        up = m.unet_parameters as f64 / 1e6,
        mb = m.f16_bytes as f64 / 1e6,
        vs = v.steps,
        vb = v.batch,
        vmin = v.seconds / 60.0,
        vf = v.first_loss,
        vl = v.final_loss,
        ms = m.steps,
        mb_ = m.batch,
        mmin = m.seconds / 60.0,
        seen = m.scenes_seen,
        mf = m.first_loss,
        ml = m.final_loss,
        vi = e.vae_images,
        psnr = e.vae_psnr_db,
        np = e.prompts,
        sc = 100.0 * e.shape_colour,
        gt = 100.0 * e.ground_truth_shape_colour,
        csc = 100.0 * e.chance_shape_colour,
        cbc = 100.0 * e.chance_background_colour,
        cpa = 100.0 * e.chance_pattern,
        fc = 100.0 * e.foreground_colour,
        bc = 100.0 * e.background_colour,
        pa = 100.0 * e.pattern,
        sh = 100.0 * e.shape,
        gs = e.gen_steps,
        g = e.guidance,
        spi = e.seconds_per_image,
    );
    std::fs::write(o.out.join("README.md"), card)?;
    println!("eval: model card written to {}", o.out.join("README.md").display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stage 4: example styles

/// Seed of the held-out style prompts (the figure); the datasets use `--seed`.
const STYLE_EVAL_SEED: u64 = 0xe7a1_0000_0000_0003;
/// The styles that get a trained adapter; the third dataset is left for the user to train.
const TRAINED_STYLES: [Style; 2] = [Style::Watercolour, Style::Neon];

#[derive(Serialize, Deserialize, Clone, Debug)]
struct StyleFigure {
    style: String,
    steps: usize,
    seconds: f64,
    first_loss: f32,
    final_loss: f32,
    /// L1 distance between colour histograms (generated vs the style's own pictures) at
    /// adapter weight 0, 0.5 and 1.
    distance: [f64; 3],
}

/// A joint RGB histogram (8 bins a channel) over all pixels of `images`, summing to 1.
fn colour_histogram(images: &[image::RgbImage]) -> Vec<f64> {
    let mut h = vec![0f64; 512];
    let mut n = 0f64;
    for img in images {
        for p in img.pixels() {
            let [r, g, b] = p.0.map(|c| (c >> 5) as usize);
            h[r * 64 + g * 8 + b] += 1.0;
            n += 1.0;
        }
    }
    h.iter_mut().for_each(|x| *x /= n.max(1.0));
    h
}

fn l1(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
}

/// Writes the three style datasets (PNG + caption sidecar) and trains a LoRA on two of them with
/// our own trainer; measures how far each moves generated pictures toward its style.
fn make_examples(o: &Options) -> Result<()> {
    let device = Device::Cpu;
    std::fs::create_dir_all(&o.examples)?;
    for style in Style::ALL {
        let dir = o.examples.join(style.name());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut rng = Rng::new(o.seed ^ 0x571e ^ style as u64);
        for i in 0..o.example_images {
            let (img, caption) = style_scene_sized(style, &mut rng, o.size);
            img.save(dir.join(format!("{i:03}.png")))?;
            std::fs::write(dir.join(format!("{i:03}.txt")), caption)?;
        }
        println!("examples: {} images of `{}` in {}", o.example_images, style.name(), dir.display());
    }
    let mut figures = Vec::new();
    for style in TRAINED_STYLES {
        let name = style.name();
        let config = TrainConfig {
            algorithm: Algorithm::Lora,
            rank: o.example_rank,
            alpha: o.example_rank as f64,
            targets: TargetPreset::TransformerAndConv,
            learning_rate: o.example_lr,
            steps: o.example_steps,
            batch_size: 4,
            seed: o.seed,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: o.example_steps / 20,
            // With zero terminal SNR, min-SNR weights t = 999 by 0, and that step is where a
            // style's overall palette (watercolour's white paper) has to come from.
            min_snr_gamma: o.min_snr_gamma,
            timestep_bias: if o.late_bias == 1.0 { TimestepBias::None } else { TimestepBias::Later },
            timestep_bias_multiplier: o.late_bias,
            timestep_bias_portion: o.late_portion,
            noise_offset: o.noise_offset,
            caption_dropout: 0.05,
            dataset: DatasetOptions {
                resolution: o.size as usize,
                center_crop: true,
                flip: false,
                trigger: name.to_owned(),
                min_side: 16,
                ..Default::default()
            },
            ..Default::default()
        };
        let ds = Dataset::scan(&[o.examples.join(name)], &config.dataset)?;
        let mut trainer = Trainer::new(StableDiffusion::load(&o.out, &device)?, config.clone(), &ds)?;
        let start = Instant::now();
        while trainer.step < config.steps {
            trainer.train_step()?;
            if trainer.step.is_multiple_of(o.log_every) {
                let k = o.log_every.min(trainer.losses.len());
                let mean = trainer.losses[trainer.losses.len() - k..].iter().sum::<f32>() / k as f32;
                println!("examples {name}: step {}/{} loss {mean:.4}", trainer.step, config.steps);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let file = o.examples.join(format!("{name}.safetensors"));
        trainer.save_adapter(&file, Naming::Kohya)?;
        let losses = &trainer.losses;
        let k = (losses.len() / 10).max(1);
        let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        let (first_loss, final_loss) = (avg(&losses[..k]), avg(&losses[losses.len() - k..]));
        drop(trainer);

        // The figure: held-out captions of this style, generated at three adapter weights.
        let mut rng = Rng::new(STYLE_EVAL_SEED ^ style as u64);
        let held: Vec<(image::RgbImage, String)> =
            (0..o.style_prompts).map(|_| style_scene_sized(style, &mut rng, o.size)).collect();
        let reference = colour_histogram(&held.iter().map(|(img, _)| img.clone()).collect::<Vec<_>>());
        let mut sd = StableDiffusion::load(&o.out, &device)?;
        sd.load_adapter(name, &file, 0.0)?;
        let mut distance = [0.0; 3];
        let mut strip = image::RgbImage::new(o.size * 8, o.size * 3);
        for (wi, w) in [0.0, 0.5, 1.0].into_iter().enumerate() {
            sd.set_adapter_weight(name, w)?;
            let mut images = Vec::new();
            for (i, (_, caption)) in held.iter().enumerate() {
                let req = GenerateRequest {
                    prompt: format!("{name}, {caption}"),
                    negative: String::new(),
                    seed: i as u64,
                    steps: o.gen_steps,
                    guidance: o.guidance,
                    sampler: SamplerKind::Ddim,
                    width: o.size as usize,
                    height: o.size as usize,
                };
                let img = sd.generate(&req, &mut |_, _| {})?;
                if i < 8 {
                    image::imageops::replace(&mut strip, &img, (i as u32 * o.size) as i64, (wi as u32 * o.size) as i64);
                }
                images.push(img);
            }
            distance[wi] = l1(&colour_histogram(&images), &reference);
            println!("examples {name}: weight {w}: colour-histogram distance to the style {:.3}", distance[wi]);
        }
        strip.save(o.work.join(format!("examples-{name}.png")))?;
        figures.push(StyleFigure {
            style: name.to_owned(),
            steps: config.steps,
            seconds,
            first_loss,
            final_loss,
            distance,
        });
    }
    std::fs::write(o.work.join("examples.json"), serde_json::to_string_pretty(&figures)?)?;
    write_examples_card(o, &figures)
}

fn write_examples_card(o: &Options, figures: &[StyleFigure]) -> Result<()> {
    let mut rows = String::new();
    for f in figures {
        let fall = 100.0 * (1.0 - f.distance[2] / f.distance[0]);
        rows += &format!(
            "| `{0}.safetensors` | {1} steps, {2:.0} s, loss {3:.3} → {4:.3} | {5:.3} | {6:.3} | {7:.3} | {fall:.0} % |\n",
            f.style, f.steps, f.seconds, f.first_loss, f.final_loss, f.distance[0], f.distance[1], f.distance[2]
        );
    }
    let card = format!(
        r#"# Example styles

Three small style datasets drawn by `src/engine/synthetic.rs` ({n} pictures each, {size}×{size},
every picture with a `.txt` caption sidecar, kohya's convention), and LoRA adapters trained on two
of them with LoRA Studio's own trainer on the built-in model (`assets/base`), so the Playground has
styles to blend on first launch. `mosaic/` has no adapter: it is there for you to train.

| folder | what it looks like |
|---|---|
| `watercolour/` | pastel washes, slightly offset and darker where they overlap, on white paper |
| `neon/` | bright outlines with a dim glow on black |
| `mosaic/` | the scene as square tiles with dark grout and per-tile colour jitter |

Made by `cargo run --release --bin pretrain -- examples` (seeded; LoRA rank {rank}, α = rank,
attention + feed-forward + convolutions, AdamW lr {lr:e} with a cosine schedule, batch 4,
{weighting}; the style's name is the trigger word). Both files are in the kohya format
(`lora_unet_…`), so A1111 and ComfyUI read them too. The watercolour paper is white, not cream:
the built-in VAE decodes a cream such as (250, 242, 225) as (239, 239, 240), so no adapter on the
UNet could draw it.

## Does an adapter move pictures toward its style?

{prompts} held-out captions of each style, generated with the built-in model ({steps} DDIM steps,
guidance {g}, the same seeds) at adapter weight 0, 0.5 and 1. Each cell is the L1 distance between
the joint RGB colour histogram (8 bins a channel) of the generated pictures and that of the
style's own pictures for the same captions (0: the same colours; 2: nothing in common).

| adapter | training | weight 0 | weight 0.5 | weight 1 | fall at weight 1 |
|---|---|---|---|---|---|
{rows}"#,
        n = o.example_images,
        size = o.size,
        rank = o.example_rank,
        lr = o.example_lr,
        weighting = loss_weighting(o),
        prompts = o.style_prompts,
        steps = o.gen_steps,
        g = o.guidance,
    );
    std::fs::write(o.examples.join("README.md"), card)?;
    println!("examples: card written to {}", o.examples.join("README.md").display());
    Ok(())
}
