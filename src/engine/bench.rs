//! Timing and memory figures for `lora-studio bench`. Medians over several runs, reported as
//! JSON so runs against the Python peer (`../shared/peer`) can be compared as ratios.

use std::time::Instant;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::Result;
use super::rng::Rng;
use crate::engine::io::weights::{WeightMap, WeightPrecision};
use crate::engine::kernels::flops::{self, Work};
use crate::engine::models::unet::{UNet2DConditionModel, UNetConfig};

/// UNet shapes we benchmark by name; they match the peer's `tiny`, `small`, `sd15` and `sdxl`
/// configs.
pub fn named_unet_config(name: &str) -> Option<UNetConfig> {
    let json = match name {
        "sd1-tiny" | "tiny" => {
            r#"{"in_channels":4,"out_channels":4,"block_out_channels":[32,64],"layers_per_block":1,
            "down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],
            "attention_head_dim":8,"cross_attention_dim":32,"norm_num_groups":8}"#
        }
        "small" => {
            r#"{"in_channels":4,"out_channels":4,"block_out_channels":[64,128,256],"layers_per_block":1,
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
            "attention_head_dim":8,"cross_attention_dim":256,"norm_num_groups":32}"#
        }
        "sd15" => {
            r#"{"in_channels":4,"out_channels":4,"block_out_channels":[320,640,1280,1280],"layers_per_block":2,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "attention_head_dim":8,"cross_attention_dim":768,"norm_num_groups":32,"sample_size":64}"#
        }
        "sd21" => {
            r#"{"in_channels":4,"out_channels":4,"block_out_channels":[320,640,1280,1280],"layers_per_block":2,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "attention_head_dim":[5,10,20,20],"cross_attention_dim":1024,"norm_num_groups":32,
            "use_linear_projection":true,"sample_size":96}"#
        }
        // Stable Diffusion XL base 1.0's unet/config.json (2.57 G parameters).
        "sdxl" => {
            r#"{"in_channels":4,"out_channels":4,"block_out_channels":[320,640,1280],"layers_per_block":2,
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
            "attention_head_dim":[5,10,20],"cross_attention_dim":2048,"norm_num_groups":32,
            "use_linear_projection":true,"transformer_layers_per_block":[1,2,10],
            "addition_embed_type":"text_time","addition_time_embed_dim":256,
            "projection_class_embeddings_input_dim":2816,"sample_size":128}"#
        }
        _ => return None,
    };
    Some(serde_json::from_str(json).expect("built-in configs parse"))
}

/// SDXL's extra UNet inputs for a benchmark batch (a random pooled text embedding and the size
/// numbers of an uncropped 1024 px picture, as the peer feeds them); `None` for SD 1.x / 2.x.
fn added_inputs(config: &UNetConfig, batch: usize, rng: &mut Rng, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
    let (Some(input), Some(time)) = (config.projection_class_embeddings_input_dim, config.addition_time_embed_dim)
    else {
        return Ok(None);
    };
    let pooled = rng.randn((batch, input - 6 * time), device)?;
    let sizes = Tensor::new(&[1024f32, 1024., 0., 0., 1024., 1024.], device)?.unsqueeze(0)?.repeat((batch, 1))?;
    Ok(Some((pooled, sizes)))
}

/// A named config, else a path to a `unet/config.json`.
fn unet_config(name_or_path: &str) -> Result<UNetConfig> {
    match named_unet_config(name_or_path) {
        Some(c) => Ok(c),
        None => UNetConfig::from_file(std::path::Path::new(name_or_path)),
    }
}

#[derive(Clone, Debug)]
pub struct UnetBenchOptions {
    /// A named config (`sd1-tiny`, `small`, `sd15`, `sd21`, `sdxl`) or a path to a `unet/config.json`.
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub runs: usize,
    /// Inference only: frozen weights (as generation runs them), no backward pass.
    pub forward_only: bool,
    /// How the frozen weights are kept (`--weights`); `Auto` is f32 here (the made-up weights are).
    pub weights: WeightPrecision,
}

impl Default for UnetBenchOptions {
    fn default() -> Self {
        Self {
            config: "sd1-tiny".into(),
            latent: 16,
            batch: 8,
            runs: 5,
            forward_only: false,
            weights: WeightPrecision::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct UnetBenchReport {
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub runs: usize,
    pub params_millions: f64,
    /// With `forward_only` the weights are frozen, as in generation; else they are variables.
    pub forward_s_median: f64,
    /// Forward plus backward to every UNet weight (the cost of a full fine-tuning step's
    /// gradients); none with `forward_only`.
    pub forward_backward_s_median: Option<f64>,
    pub peak_rss_mib: f64,
    pub threads: usize,
    /// The frozen weights' precision (`f32`, `f16`, `bf16`).
    pub weights: &'static str,
    /// The forward's nominal work (`kernels::flops`), what the median forward achieved, and the
    /// best rate an f32 GEMM of the forward's largest shapes reaches alone on this machine.
    pub forward_gflop: f64,
    pub forward_gflops_achieved: f64,
    pub best_gemm_gflops: f64,
    /// achieved / best GEMM rate.
    pub forward_of_best_gemm: f64,
}

/// Times the UNet with random weights of the configured shape.
pub fn unet(opts: &UnetBenchOptions, device: &Device) -> Result<UnetBenchReport> {
    if opts.runs == 0 || opts.batch == 0 || opts.latent == 0 {
        bail!("--runs, --batch and --latent must be positive");
    }
    let config = unet_config(&opts.config)?;
    let synthetic = WeightMap::synthetic_with_precision(DType::F32, opts.weights, device);
    let frozen = UNet2DConditionModel::load(&config, &synthetic)?;
    let weights_kept = kept_precision(&frozen);
    let (model, params) = if opts.forward_only {
        (frozen, synthetic.generated().values().map(Tensor::elem_count).sum::<usize>())
    } else {
        // The same weights as variables, so backward computes what a full fine-tuning step would.
        drop(frozen);
        let mut weights = WeightMap::new(synthetic.generated(), "benchmark weights", DType::F32, device)?;
        let vars = weights.make_trainable(|_| true)?;
        (UNet2DConditionModel::load(&config, &weights)?, vars.iter().map(|(_, v)| v.elem_count()).sum())
    };

    let mut rng = Rng::new(0);
    let sample = rng.randn((opts.batch, config.in_channels, opts.latent, opts.latent), device)?;
    let context = rng.randn((opts.batch, 77, config.cross_attention_dim), device)?;
    let added = added_inputs(&config, opts.batch, &mut rng, device)?;
    let added = added.as_ref().map(|(p, s)| (p, s));
    let t = Tensor::new(&[500f32], device)?;

    let mut fwd = Vec::new();
    let mut fwd_bwd = Vec::new();
    let mut work = Work::default();
    // One untimed warm-up of each (which also counts the work), then `runs` timed repetitions.
    for i in 0..=opts.runs {
        let start = Instant::now();
        let (out, counted) = flops::count(|| model.forward_with(&sample, &t, &context, added));
        if i == 0 {
            work = counted;
        }
        let _ = out?.sum_all()?.to_scalar::<f32>()?;
        let f = start.elapsed().as_secs_f64();
        if i > 0 {
            fwd.push(f);
        }
        if opts.forward_only {
            continue;
        }
        let start = Instant::now();
        let loss = model.forward_with(&sample, &t, &context, added)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        drop(grads);
        device.synchronize()?; // a GPU runs asynchronously: time the work, not its queueing
        if i > 0 {
            fwd_bwd.push(start.elapsed().as_secs_f64());
        }
    }
    drop(model);
    let forward_s_median = median(&mut fwd);
    let best_gemm = best_gemm_gflops(&work, device)?;
    let achieved = work.forward() / 1e9 / forward_s_median;
    Ok(UnetBenchReport {
        config: opts.config.clone(),
        latent: opts.latent,
        batch: opts.batch,
        runs: opts.runs,
        params_millions: params as f64 / 1e6,
        forward_s_median,
        forward_backward_s_median: (!fwd_bwd.is_empty()).then(|| median(&mut fwd_bwd)),
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        weights: weights_kept,
        forward_gflop: work.forward() / 1e9,
        forward_gflops_achieved: achieved,
        best_gemm_gflops: best_gemm,
        forward_of_best_gemm: achieved / best_gemm,
    })
}

/// What the model's frozen weight matrices are stored in (for the report).
fn kept_precision(model: &UNet2DConditionModel) -> &'static str {
    crate::engine::io::weights::dtype_name(model.conv_in.weight().dtype())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub rank: usize,
    pub runs: usize,
    pub checkpointing: bool,
    /// How the frozen weights are kept (`--weights`); `Auto` is f32 here (the made-up weights are).
    pub weights: WeightPrecision,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        Self {
            config: "sd1-tiny".into(),
            latent: 16,
            batch: 8,
            rank: 4,
            runs: 5,
            checkpointing: false,
            weights: WeightPrecision::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainBenchReport {
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub rank: usize,
    pub runs: usize,
    pub lora_parameters: usize,
    /// Forward, backward and an AdamW update of the LoRA factors (the peer's step).
    pub train_step_s_median: f64,
    pub peak_rss_mib: f64,
    pub threads: usize,
    pub checkpointing: bool,
    /// The frozen weights' precision (`f32`, `f16`, `bf16`).
    pub weights: &'static str,
    /// The step's nominal work (`flops::Work::frozen_training_step`), what the median step
    /// achieved, and the best f32 GEMM rate of its largest shapes here.
    pub step_gflop: f64,
    pub step_gflops_achieved: f64,
    pub best_gemm_gflops: f64,
    pub step_of_best_gemm: f64,
}

/// A LoRA training step on attention projections (to_q/k/v/out.0), random frozen weights of
/// the configured shape — what `../shared/peer/bench_lora_train.py` measures.
pub fn train_step(opts: &TrainBenchOptions, device: &Device) -> Result<TrainBenchReport> {
    use crate::engine::adapters::delta::Delta;
    use crate::engine::adapters::stack::{LayerAdapter, TargetPreset};
    if opts.runs == 0 || opts.batch == 0 || opts.latent == 0 || opts.rank == 0 {
        bail!("--runs, --batch, --latent and --rank must be positive");
    }
    let config = unet_config(&opts.config)?;
    let mut model =
        UNet2DConditionModel::load(&config, &WeightMap::synthetic_with_precision(DType::F32, opts.weights, device))?;
    let weights_kept = kept_precision(&model);
    let mut rng = Rng::new(0);
    let mut vars = Vec::new();
    model.try_visit_layers(&mut |mut layer| {
        if !TargetPreset::Attention.targets_unet(layer.path(), false) {
            return Ok(());
        }
        let shape = layer.stack_ref().base.dims().to_vec();
        {
            let down = candle_core::Var::from_tensor(&(rng.randn((opts.rank, shape[1]), device)? * 0.01)?)?;
            let up = candle_core::Var::zeros((shape[0], opts.rank), DType::F32, device)?;
            let stack = layer.stack();
            stack.merge = false;
            stack.attach(LayerAdapter {
                name: "bench".into(),
                delta: Delta::Lora { down: down.as_tensor().clone(), up: up.as_tensor().clone() },
                scale: 1.0,
                multiplier: 1.0,
            })?;
            vars.push(down);
            vars.push(up);
            Ok(())
        }
    })?;
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    if opts.checkpointing {
        model.checkpointing = Some(crate::engine::kernels::recompute::GradSink::new(vars.clone()));
    }
    let mut moments: Vec<(Tensor, Tensor)> =
        vars.iter().map(|v| Ok((v.zeros_like()?, v.zeros_like()?))).collect::<Result<_>>()?;
    let sample = rng.randn((opts.batch, config.in_channels, opts.latent, opts.latent), device)?;
    let noise = rng.randn(sample.shape(), device)?;
    let context = rng.randn((opts.batch, 77, config.cross_attention_dim), device)?;
    let added = added_inputs(&config, opts.batch, &mut rng, device)?;
    let added = added.as_ref().map(|(p, s)| (p, s));
    let t = Tensor::new(&[500f32], device)?;
    let mut times = Vec::new();
    let mut work = Work::default();
    for i in 0..=opts.runs {
        let start = Instant::now();
        let (out, counted) = flops::count(|| model.forward_with(&sample, &t, &context, added));
        if i == 0 {
            work = counted;
        }
        let loss = (out? - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        for (v, (m, s)) in vars.iter().zip(moments.iter_mut()) {
            // Detached, as the trainer does: otherwise the moments keep each step's graph alive.
            let inner = model.checkpointing.as_ref().and_then(|s| s.take(v.as_tensor()));
            let g = match (grads.get(v.as_tensor()).map(Tensor::detach), inner) {
                (Some(a), Some(b)) => (a + b)?,
                (a, b) => match a.or(b) {
                    Some(g) => g,
                    None => continue,
                },
            };
            *m = ((&*m * 0.9)? + (&g * 0.1)?)?;
            *s = ((&*s * 0.999)? + (g.sqr()? * 0.001)?)?;
            let update = (&*m / (s.sqrt()? + 1e-8)?)?;
            v.set(&(v.as_tensor().detach() - (update * 1e-4)?)?)?;
        }
        device.synchronize()?; // a GPU runs asynchronously: time the work, not its queueing
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    drop((model, moments, vars));
    let train_step_s_median = median(&mut times);
    let best_gemm = best_gemm_gflops(&work, device)?;
    let achieved = work.frozen_training_step() / 1e9 / train_step_s_median;
    Ok(TrainBenchReport {
        config: opts.config.clone(),
        latent: opts.latent,
        batch: opts.batch,
        rank: opts.rank,
        runs: opts.runs,
        lora_parameters: params,
        train_step_s_median,
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        checkpointing: opts.checkpointing,
        weights: weights_kept,
        step_gflop: work.frozen_training_step() / 1e9,
        step_gflops_achieved: achieved,
        best_gemm_gflops: best_gemm,
        step_of_best_gemm: achieved / best_gemm,
    })
}

#[derive(Clone, Debug)]
pub struct MixBenchOptions {
    /// A named config or a path to a `unet/config.json`, as for `bench unet`.
    pub config: String,
    pub latent: usize,
    /// 2: one image with classifier-free guidance.
    pub batch: usize,
    pub adapters: usize,
    pub rank: usize,
    pub runs: usize,
    /// How the frozen weights are kept (`--weights`); `Auto` is f32 here (the made-up weights are).
    pub weights: WeightPrecision,
}

impl Default for MixBenchOptions {
    fn default() -> Self {
        Self {
            config: "sd1-tiny".into(),
            latent: 16,
            batch: 2,
            adapters: 8,
            rank: 4,
            runs: 5,
            weights: WeightPrecision::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MixBenchReport {
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub adapters: usize,
    pub rank: usize,
    /// Layers each adapter touches (attention projections, as kohya's default LoRA).
    pub layers_per_adapter: usize,
    /// One sampling step (a UNet forward) with no adapter, and with all of them merged.
    pub step_s_median_base: f64,
    pub step_s_median_merged: f64,
    /// merged / base: the extra cost of sampling with the adapters (merging aims at 1.0).
    pub step_ratio: f64,
    /// Moving one adapter's slider: re-merging the layers it touches.
    pub slider_remerge_ms_median: f64,
    pub layers_remerged: usize,
    pub peak_rss_mib: f64,
    pub threads: usize,
    /// The frozen weights' precision (`f32`, `f16`, `bf16`).
    pub weights: &'static str,
}

/// Sampling cost with `adapters` random LoRAs merged into a random UNet, and the cost of
/// moving one slider (`AdapterStack` re-merges only the layers that adapter touches).
pub fn mix(opts: &MixBenchOptions, device: &Device) -> Result<MixBenchReport> {
    use crate::engine::adapters::delta::Delta;
    use crate::engine::adapters::stack::{LayerAdapter, TargetPreset};
    use crate::engine::models::nn::LayerMut;
    if opts.runs == 0 || opts.batch == 0 || opts.latent == 0 || opts.rank == 0 {
        bail!("--runs, --batch, --latent and --rank must be positive");
    }
    let config = unet_config(&opts.config)?;
    let synthetic = WeightMap::synthetic_with_precision(DType::F32, opts.weights, device);
    let mut model = UNet2DConditionModel::load(&config, &synthetic)?;
    let weights_kept = kept_precision(&model);
    let mut rng = Rng::new(1);
    let sample = rng.randn((opts.batch, config.in_channels, opts.latent, opts.latent), device)?;
    let context = rng.randn((opts.batch, 77, config.cross_attention_dim), device)?;
    let added = added_inputs(&config, opts.batch, &mut rng, device)?;
    let added = added.as_ref().map(|(p, s)| (p, s));
    let t = Tensor::new(&[500f32], device)?;
    let time_steps = |model: &UNet2DConditionModel| -> Result<f64> {
        let mut v = Vec::new();
        for i in 0..=opts.runs {
            let start = Instant::now();
            let _ = model.forward_with(&sample, &t, &context, added)?.sum_all()?.to_scalar::<f32>()?;
            if i > 0 {
                v.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(median(&mut v))
    };
    let base = time_steps(&model)?;

    // Random adapters of a trained LoRA's size: ‖ΔW‖ a few per cent of ‖W‖.
    let mut layers_per_adapter = 0;
    model.try_visit_layers(&mut |mut l: LayerMut<'_>| {
        let conv = matches!(l, LayerMut::Conv(_));
        if !TargetPreset::Attention.targets_unet(l.path(), conv) {
            return Ok(());
        }
        layers_per_adapter += 1;
        let dims = l.stack_ref().base.dims().to_vec();
        let (out, inp) = (dims[0], dims[1]);
        for k in 0..opts.adapters {
            let down = (rng.randn((opts.rank, inp), device)? * (1.0 / (inp as f64).sqrt()))?;
            let up = (rng.randn((out, opts.rank), device)? * 0.01)?;
            let delta = Delta::Lora { down, up };
            l.stack().attach(LayerAdapter { name: format!("style{k}"), delta, scale: 1.0, multiplier: 0.5 })?;
        }
        Ok(())
    })?;
    let refresh = |model: &mut UNet2DConditionModel| -> Result<usize> {
        let mut count = 0;
        model.try_visit_layers(&mut |mut l| {
            count += l.stack().refresh()? as usize;
            Ok(())
        })?;
        Ok(count)
    };
    refresh(&mut model)?;
    let merged = time_steps(&model)?;

    let mut remerge = Vec::new();
    let mut layers_remerged = 0;
    for i in 0..=opts.runs {
        let weight = 0.3 + 0.1 * i as f64;
        let start = Instant::now();
        model.visit_layers(&mut |mut l| {
            l.stack().set_multiplier("style0", weight);
        });
        layers_remerged = refresh(&mut model)?;
        if i > 0 {
            remerge.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(MixBenchReport {
        config: opts.config.clone(),
        latent: opts.latent,
        batch: opts.batch,
        adapters: opts.adapters,
        rank: opts.rank,
        layers_per_adapter,
        step_s_median_base: base,
        step_s_median_merged: merged,
        step_ratio: merged / base,
        slider_remerge_ms_median: median(&mut remerge),
        layers_remerged,
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        weights: weights_kept,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateBenchReport {
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub runs: usize,
    /// Prompt to PNG-ready pixels: text encoder, `steps` UNet steps (two with guidance), VAE decode.
    pub image_s_median: f64,
    pub peak_rss_mib: f64,
    pub threads: usize,
}

/// Time for one image at the model's own size, as the Playground makes it.
pub fn generate(
    model: &std::path::Path,
    steps: usize,
    guidance: f64,
    runs: usize,
    device: &Device,
) -> Result<GenerateBenchReport> {
    use super::pipeline::{GenerateRequest, StableDiffusion};
    if runs == 0 || steps == 0 {
        bail!("--runs and --steps must be positive");
    }
    let sd = StableDiffusion::load(model, device)?;
    let side = sd.unet.config.sample_size.unwrap_or(64) * sd.vae.config.downscale();
    let mut times = Vec::new();
    for i in 0..=runs {
        let req = GenerateRequest {
            prompt: "a big red circle on a striped blue background".into(),
            negative: String::new(),
            seed: i as u64,
            steps,
            guidance,
            sampler: crate::engine::diffusion::sampler::SamplerKind::Ddim,
            width: side,
            height: side,
            clip_skip: 1,
        };
        let start = Instant::now();
        sd.generate(&req, &mut |_, _| {})?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(GenerateBenchReport {
        model: model.display().to_string(),
        width: side,
        height: side,
        steps,
        guidance,
        runs,
        image_s_median: median(&mut times),
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
    })
}

/// One GEMM shape of a forward pass, timed alone.
#[derive(Clone, Debug, Serialize)]
pub struct GemmShapeRate {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// How many times the forward runs it, and its share of the forward's FLOPs.
    pub count: usize,
    pub share: f64,
    /// The best of the timed runs, f32, every thread on the one GEMM.
    pub gflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GemmBenchReport {
    pub config: String,
    pub latent: usize,
    pub batch: usize,
    pub forward_gflop: f64,
    /// The fastest shape's rate: the machine's f32 GEMM limit on this model's shapes.
    pub best_gflops: f64,
    /// The forward's FLOPs over the time its GEMMs take when each runs alone at its best: the rate
    /// a forward would reach with nothing but GEMMs.
    pub gemm_only_forward_gflops: f64,
    pub shapes: Vec<GemmShapeRate>,
    pub threads: usize,
}

/// The f32 GEMM rate of every shape a UNet forward runs (`lora-studio bench gemm`), through the
/// same GEMM call our kernels make (the `gemm` crate, its AVX-512 kernels where the CPU has them).
pub fn gemm(config_name: &str, latent: usize, batch: usize, runs: usize, device: &Device) -> Result<GemmBenchReport> {
    let work = forward_work(config_name, latent, batch, device)?;
    let total = work.forward();
    let mut shapes = Vec::new();
    let mut gemm_time = 0.0;
    for (&(m, n, k), &count) in &work.shapes {
        let gflops = time_gemm((m, n, k), runs)?;
        gemm_time += 2.0 * (m * n * k * count) as f64 / 1e9 / gflops;
        let share = 2.0 * (m * n * k * count) as f64 / total;
        shapes.push(GemmShapeRate { m, n, k, count, share, gflops });
    }
    shapes.sort_by(|a, b| b.share.total_cmp(&a.share));
    Ok(GemmBenchReport {
        config: config_name.into(),
        latent,
        batch,
        forward_gflop: total / 1e9,
        best_gflops: shapes.iter().map(|s| s.gflops).fold(0.0, f64::max),
        gemm_only_forward_gflops: total / 1e9 / gemm_time,
        shapes,
        threads: candle_core::utils::get_num_threads(),
    })
}

/// The work of one frozen forward of a random-weight UNet of the named config.
fn forward_work(config_name: &str, latent: usize, batch: usize, device: &Device) -> Result<Work> {
    if latent == 0 || batch == 0 {
        bail!("--batch and --latent must be positive");
    }
    let config = unet_config(config_name)?;
    let model = UNet2DConditionModel::load(&config, &WeightMap::synthetic(DType::F32, device))?;
    let mut rng = Rng::new(0);
    let sample = rng.randn((batch, config.in_channels, latent, latent), device)?;
    let context = rng.randn((batch, 77, config.cross_attention_dim), device)?;
    let added = added_inputs(&config, batch, &mut rng, device)?;
    let t = Tensor::new(&[500f32], device)?;
    let (out, work) = flops::count(|| model.forward_with(&sample, &t, &context, added.as_ref().map(|(p, s)| (p, s))));
    out?;
    Ok(work)
}

/// Shapes timed for a bench run's "best GEMM rate": the forward's largest by FLOPs.
const BEST_GEMM_SHAPES: usize = 4;

/// The best f32 GEMM rate among the forward's largest shapes (0 off the CPU, where our GEMM call
/// is not the one that runs).
fn best_gemm_gflops(work: &Work, device: &Device) -> Result<f64> {
    if !device.is_cpu() {
        return Ok(0.0);
    }
    let mut by_flops: Vec<_> = work.shapes.iter().map(|(s, c)| (s.0 * s.1 * s.2 * c, *s)).collect();
    by_flops.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut best = 0f64;
    for (_, shape) in by_flops.into_iter().take(BEST_GEMM_SHAPES) {
        best = best.max(time_gemm(shape, 3)?);
    }
    Ok(best)
}

/// GFLOP/s of the best of `runs` (after one warm-up) f32 GEMMs C = A·B of shape (m, n, k),
/// row-major, every thread on it.
fn time_gemm((m, n, k): (usize, usize, usize), runs: usize) -> Result<f64> {
    let mut rng = Rng::new(7);
    let values =
        |len: usize, rng: &mut Rng| -> Result<Vec<f32>> { Ok(rng.randn(len, &Device::Cpu)?.to_vec1::<f32>()?) };
    let (a, b) = (values(m * k, &mut rng)?, values(k * n, &mut rng)?);
    let mut c = vec![0f32; m * n];
    let threads = candle_core::utils::get_num_threads().max(1);
    let mut best = f64::INFINITY;
    for i in 0..=runs.max(1) {
        let start = Instant::now();
        // SAFETY: a, b and c are row-major buffers of exactly these sizes, c ours alone.
        unsafe {
            crate::engine::kernels::cpu::gemm(
                (m, n, k),
                (c.as_mut_ptr(), n as isize, 1),
                false,
                (a.as_ptr(), k as isize, 1),
                (b.as_ptr(), n as isize, 1),
                1.0,
                threads,
            )
        };
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (m * n * k) as f64 / 1e9 / best)
}
