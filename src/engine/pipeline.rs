//! A whole Stable Diffusion model (text encoders, UNet, VAE, tokenizers, noise schedule) loaded
//! from a diffusers folder or a single-file checkpoint, and text-to-image generation with it.
//! SD 1.x / 2.x have one text encoder; SDXL has two, a pooled text embedding and the size
//! micro-conditioning, which `TextConditioning` and `encode_prompts` carry for every caller.
//! Generation reads prompts as AUTOMATIC1111 does (`encode_weighted_prompts`: emphasis, any length,
//! clip skip); training reads captions as kohya does (`encode_captions`: 77 tokens, clip skip).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};

use super::Result;
use super::rng::Rng;
use crate::engine::adapters::formats::{
    CompatibilityReport, Component, MatchedLayer, ModuleIndex, match_layers, read_adapter,
};
use crate::engine::adapters::stack::{BlockWeights, LayerAdapter};
use crate::engine::diffusion::sampler::{Sampler, SamplerKind, guidance};
use crate::engine::diffusion::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use crate::engine::io::single_file;
use crate::engine::io::weights::{WeightMap, WeightPrecision, all_finite, read_safetensors_each};
use crate::engine::models::clip::{ClipConfig, ClipTextModel};
use crate::engine::models::family::ModelFamily;
use crate::engine::models::nn::LayerMut;
use crate::engine::models::prompt::{PromptChunk, PromptTokens, apply_emphasis};
use crate::engine::models::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use crate::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::engine::models::vae::{AutoencoderKL, VaeConfig};

/// Largest `num_train_timesteps` a scheduler config may ask for (SD uses 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;
/// Largest image side `generate` accepts, so a config's `sample_size` or a request cannot ask
/// for an allocation the machine cannot make.
pub const MAX_GENERATE_SIDE: usize = 8192;

/// The weights of one model, before the modules are built (training makes some of them trainable).
#[derive(Clone)]
pub struct ModelWeights {
    pub unet_config: UNetConfig,
    pub text_config: ClipConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    pub tokenizer: ClipTokenizer,
    pub unet: WeightMap,
    pub text_encoder: WeightMap,
    pub vae: WeightMap,
    /// SDXL's second text encoder (its config, weights and tokenizer).
    pub text_encoder_2: Option<SecondEncoderWeights>,
    /// diffusers' `force_zeros_for_empty_prompt` (SDXL): an empty negative prompt is all zeros
    /// rather than the encoding of "".
    pub force_zeros_for_empty_prompt: bool,
}

/// SDXL's second text encoder before it is built.
#[derive(Clone)]
pub struct SecondEncoderWeights {
    pub config: ClipConfig,
    pub tokenizer: ClipTokenizer,
    pub weights: WeightMap,
}

impl ModelWeights {
    /// A diffusers folder (`model_index.json` + component folders) or a single `.safetensors`
    /// checkpoint in the original Stable Diffusion layout.
    /// Weight matrices are kept as `precision` says (`Auto`: half precision where the file has
    /// it); everything is computed in `dtype`.
    pub fn load(path: &Path, dtype: DType, precision: WeightPrecision, device: &Device) -> Result<Self> {
        if path.is_dir() {
            return Self::load_diffusers(path, dtype, precision, device);
        }
        if !path.exists() {
            bail!("{}: no such file or folder", path.display());
        }
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "safetensors" => Self::load_single_file(path, dtype, precision, device),
            "ckpt" | "pt" | "pth" | "bin" => bail!(
                "{}: not supported: pickled checkpoints (.{ext}) can run arbitrary code when loaded; convert it to .safetensors first",
                path.display()
            ),
            _ => bail!(
                "{}: not supported: expected a diffusers model folder or a .safetensors checkpoint",
                path.display()
            ),
        }
    }

    fn load_diffusers(dir: &Path, dtype: DType, precision: WeightPrecision, device: &Device) -> Result<Self> {
        if !dir.join("model_index.json").exists() {
            bail!("{}: not a diffusers model folder (no model_index.json)", dir.display());
        }
        let index: serde_json::Value = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .with_context(|| format!("{}: model_index.json is not valid JSON", dir.display()))?;
        // An SDXL pipeline lists `text_encoder_2`; a refiner has only that one and is refused
        // below for its missing `text_encoder`.
        let two_encoders =
            dir.join("text_encoder_2").is_dir() || index.get("text_encoder_2").is_some_and(|v| !v.is_null());
        let mut components = vec!["unet", "text_encoder", "vae"];
        if two_encoders {
            components.push("text_encoder_2");
        }
        for component in components {
            if !dir.join(component).join("config.json").exists() {
                bail!(
                    "{}: the model folder is missing its `{component}` component ({component}/config.json)",
                    dir.display()
                );
            }
        }
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        let scheduler_config = if scheduler_file.exists() {
            SchedulerConfig::from_file(&scheduler_file)?
        } else {
            SchedulerConfig::default()
        };
        // The schedule is built as a table of this many entries; refuse absurd values up front.
        if scheduler_config.num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            bail!(
                "{}: num_train_timesteps {} is larger than the limit {MAX_TRAIN_TIMESTEPS}",
                scheduler_file.display(),
                scheduler_config.num_train_timesteps
            );
        }
        let tokenizer = ClipTokenizer::from_folder(&dir.join("tokenizer"))?;
        let load = |component: &str, stem: &str, precision: WeightPrecision| {
            WeightMap::load_with_precision(&component_files(&dir.join(component), stem)?, dtype, precision, device)
        };
        let text_encoder_2 = match two_encoders {
            true => Some(SecondEncoderWeights {
                config: ClipConfig::from_file(&dir.join("text_encoder_2/config.json"))?,
                // SDXL's second tokenizer pads with `!` (id 0); its folder says so when present.
                tokenizer: if dir.join("tokenizer_2").is_dir() {
                    ClipTokenizer::from_folder(&dir.join("tokenizer_2"))?
                } else {
                    ClipTokenizer::with_pad_id(0)
                },
                weights: load("text_encoder_2", "model", precision)?,
            }),
            false => None,
        };
        Ok(Self {
            unet_config: UNetConfig::from_file(&dir.join("unet/config.json"))?,
            text_config: ClipConfig::from_file(&dir.join("text_encoder/config.json"))?,
            vae_config: VaeConfig::from_file(&dir.join("vae/config.json"))?,
            scheduler_config,
            tokenizer,
            unet: load("unet", "diffusion_pytorch_model", precision)?,
            text_encoder: load("text_encoder", "model", precision)?,
            vae: load("vae", "diffusion_pytorch_model", vae_precision(precision, two_encoders))?,
            force_zeros_for_empty_prompt: two_encoders
                && index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true),
            text_encoder_2,
        })
    }

    fn load_single_file(path: &Path, dtype: DType, precision: WeightPrecision, device: &Device) -> Result<Self> {
        let source = path.display().to_string();
        // Each tensor is checked and put in the precision it is kept in as it is read.
        let mut tensors = HashMap::new();
        read_safetensors_each(path, |name, t| {
            let t = precision.keep(&source, &name, t, dtype)?;
            tensors.insert(name, t);
            Ok(())
        })?;
        let converted = single_file::convert(tensors, &source)?;
        let mut scheduler_config = SchedulerConfig::default();
        if let Some(p) = converted.prediction_hint {
            scheduler_config.set_prediction(p);
        }
        let sdxl = converted.family == ModelFamily::Sdxl;
        let pad_id = match converted.family {
            ModelFamily::Sd1 | ModelFamily::Sdxl => crate::engine::models::tokenizer::END_OF_TEXT,
            ModelFamily::Sd2 => 0,
        };
        Ok(Self {
            tokenizer: ClipTokenizer::with_pad_id(pad_id),
            unet_config: converted.unet_config,
            text_config: converted.text_config,
            vae_config: converted.vae_config,
            scheduler_config,
            unet: WeightMap::with_precision(converted.unet, format!("{source} (UNet)"), dtype, precision, device)?,
            text_encoder: WeightMap::with_precision(
                converted.text_encoder,
                format!("{source} (text encoder)"),
                dtype,
                precision,
                device,
            )?,
            vae: WeightMap::with_precision(
                converted.vae,
                format!("{source} (VAE)"),
                dtype,
                vae_precision(precision, sdxl),
                device,
            )?,
            text_encoder_2: match converted.text_encoder_2 {
                Some((weights, config)) => Some(SecondEncoderWeights {
                    config,
                    tokenizer: ClipTokenizer::with_pad_id(0),
                    weights: WeightMap::with_precision(
                        weights,
                        format!("{source} (second text encoder)"),
                        dtype,
                        precision,
                        device,
                    )?,
                }),
                None => None,
            },
            // As diffusers' SDXL pipeline does by default.
            force_zeros_for_empty_prompt: sdxl,
        })
    }

    /// A model's family without loading it (a folder's layout and configs, or a single file's
    /// tensor names): for choosing defaults before the model is read. `None` when it cannot tell.
    pub fn probe_family(path: &Path) -> Option<ModelFamily> {
        if path.is_dir() {
            let config = |c: &str, key: &str| -> Option<usize> {
                let text = std::fs::read_to_string(path.join(c).join("config.json")).ok()?;
                serde_json::from_str::<serde_json::Value>(&text).ok()?.get(key)?.as_u64().map(|v| v as usize)
            };
            let two = path.join("text_encoder_2").is_dir();
            return Some(family_of(
                two,
                config("unet", "cross_attention_dim").unwrap_or(0),
                config("text_encoder", "hidden_size").unwrap_or(0),
            ));
        }
        let names = crate::engine::io::weights::read_tensor_names(path).ok()??;
        single_file::detect(names.iter().map(String::as_str)).ok()
    }

    /// The side (px) a model was trained at, without loading it: a folder's UNet `sample_size`
    /// times its VAE's downscale; a single file's family's usual size (what loading infers).
    /// `None` when it cannot tell.
    pub fn probe_native_side(path: &Path) -> Option<usize> {
        let family = Self::probe_family(path)?;
        let latent_fallback = if family == ModelFamily::Sdxl { 128 } else { 64 };
        if !path.is_dir() {
            return Some(latent_fallback * 8);
        }
        let config = |c: &str| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(path.join(c).join("config.json")).ok()?).ok()
        };
        let sample_size =
            config("unet").and_then(|u| u.get("sample_size")?.as_u64()).map_or(latent_fallback, |v| v as usize);
        let vae_blocks = config("vae").and_then(|v| Some(v.get("block_out_channels")?.as_array()?.len())).unwrap_or(4);
        Some(sample_size << vae_blocks.saturating_sub(1))
    }
}

/// SD 2.x has a 1024-wide text encoder or cross-attention; SDXL has a second text encoder.
fn family_of(two_encoders: bool, cross_attention_dim: usize, text_width: usize) -> ModelFamily {
    if two_encoders {
        ModelFamily::Sdxl
    } else if cross_attention_dim == 1024 || text_width == 1024 {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    }
}

/// SDXL's VAE overflows in f16 (diffusers' `force_upcast`), so an SDXL model keeps its VAE's
/// weights in f32 whatever the rest is kept in; SD 1.x / 2.x VAEs are fine in half precision.
fn vae_precision(precision: WeightPrecision, sdxl: bool) -> WeightPrecision {
    if sdxl { WeightPrecision::F32 } else { precision }
}

/// The safetensors files holding one component, as diffusers names them: `{base}.safetensors`, or
/// the shards its index (`{base}.safetensors.index.json`) lists; full precision before the `fp16`
/// and `bf16` variants. Other `.safetensors` files beside them (a user's backup) are never read:
/// a folder with several and none of these names is refused with the list.
fn component_files(dir: &Path, base: &str) -> Result<Vec<PathBuf>> {
    let mut safetensors = Vec::new();
    let mut pickled = false;
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read folder", dir.display()))? {
        let p = entry?.path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => safetensors.push(p),
            Some("bin") | Some("ckpt") | Some("pt") => pickled = true,
            _ => {}
        }
    }
    safetensors.sort();
    for variant in ["", ".fp16", ".bf16"] {
        // diffusers writes `{base}.safetensors.index.fp16.json`; some tools `{base}.fp16.safetensors.index.json`.
        for index in [
            dir.join(format!("{base}.safetensors.index{variant}.json")),
            dir.join(format!("{base}{variant}.safetensors.index.json")),
        ] {
            if index.is_file() {
                return shards_from_index(&index);
            }
        }
        let file = dir.join(format!("{base}{variant}.safetensors"));
        if file.is_file() {
            return Ok(vec![file]);
        }
    }
    match safetensors.len() {
        0 if pickled => bail!(
            "{}: not supported: only pickled weights (.bin) here; use a safetensors copy of the model",
            dir.display()
        ),
        0 => bail!("{}: no .safetensors weights in this component folder", dir.display()),
        1 => Ok(safetensors),
        _ => {
            let names: Vec<String> =
                safetensors.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
            bail!(
                "{}: several weight files ({}) and no {base}.safetensors or {base}.safetensors.index.json to say which to use; keep only the model's own file in the folder",
                dir.display(),
                names.join(", ")
            )
        }
    }
}

/// The shard files a `*.safetensors.index.json` lists in its `weight_map`, each checked to exist.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid shard index", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no `weight_map` in the shard index", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let name = file.as_str().with_context(|| format!("{}: `{tensor}` maps to no file name", index.display()))?;
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            bail!("{}: shard `{name}` is not a file name in this folder", index.display());
        }
        let path = dir.join(name);
        if !files.contains(&path) {
            if !path.is_file() {
                bail!("{}: shard {name} is missing", index.display());
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("{}: the shard index lists no files", index.display());
    }
    files.sort();
    Ok(files)
}

/// A model ready to run.
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (with its projection) and its tokenizer.
    pub text_encoder_2: Option<(ClipTextModel, ClipTokenizer)>,
    /// See `ModelWeights::force_zeros_for_empty_prompt`.
    pub force_zeros_for_empty_prompt: bool,
    /// The noise schedule, which also carries the scheduler config it was built from.
    pub schedule: NoiseSchedule,
    pub device: Device,
    pub dtype: DType,
    /// Keep the last prompts' text embeddings while the text encoder's weights stay as they
    /// were, so moving UNet-only sliders does not re-run it. Off by default: a trainer's model
    /// changes its text encoder behind this cache's back.
    pub cache_text_embeddings: bool,
    text_cache: TextCache,
}

/// The last prompts' embeddings, tagged with the text-encoder revision they were made at.
#[derive(Default)]
struct TextCache {
    /// Bumped whenever an adapter change reaches a text-encoder layer.
    revision: u64,
    entry: std::sync::Mutex<Option<CachedText>>,
    /// How many times the text encoder ran (diagnostics and tests).
    runs: std::sync::atomic::AtomicUsize,
}

/// One batch of prompts' conditioning, with what it was made from.
struct CachedText {
    revision: u64,
    prompts: Vec<String>,
    clip_skip: usize,
    text: TextConditioning,
}

/// What the UNet is conditioned on for a batch of prompts.
#[derive(Clone, Debug)]
pub struct TextConditioning {
    /// The text embeddings the UNet's cross-attention reads, (B, 77·k, cross_attention_dim) for
    /// prompts of k chunks: the text encoder's output, or SDXL's two penultimate hidden states side
    /// by side.
    pub context: Tensor,
    /// SDXL's pooled text embedding (B, projection_dim), from the second encoder.
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// Several conditionings as one batch, in order.
    pub fn cat(parts: &[&TextConditioning]) -> Result<Self> {
        let contexts: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
        Ok(Self { context: Tensor::cat(&contexts, 0)?, pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()? })
    }

    /// All zeros of the same shapes: SDXL's empty negative prompt (`force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }

    /// Cut from the graph (a cached embedding must not keep a training step's graph alive).
    pub fn detach(&self) -> Self {
        Self { context: self.context.detach(), pooled: self.pooled.as_ref().map(|p| p.detach()) }
    }
}

/// One image's SDXL size numbers, in pixels: original (height, width), crop (top, left), target
/// (height, width).
pub type ImageSizes = ([usize; 2], [usize; 2], [usize; 2]);

/// SDXL's six size numbers for each image of a batch (B, 6), as diffusers' `add_time_ids`.
pub fn size_conditioning(rows: &[ImageSizes], dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|(original, crop, target)| [original, crop, target])
        .flatten()
        .map(|&v| v as f32)
        .collect();
    Ok(Tensor::from_vec(values, (rows.len(), 6), device)?.to_dtype(dtype)?)
}

/// What to draw, and how.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerKind,
    pub width: usize,
    pub height: usize,
    /// A1111's "Clip skip": 1 reads the text encoder's last layer, 2 the penultimate, …
    /// (SD 1.x / 2.x; SDXL ignores it, see `StableDiffusion::clip_skip_note`).
    #[serde(default = "default_clip_skip")]
    pub clip_skip: usize,
}

/// Clip skip 1: the text encoder's last layer, as every model was read before clip skip existed.
pub fn default_clip_skip() -> usize {
    1
}

/// A batch of prompts cut into chunks, every prompt padded with empty chunks to the longest's
/// count: ids (B·k, 77), row `b·k + c` prompt b's chunk c, and their weights.
struct ChunkedPrompts {
    ids: Tensor,
    /// (B·k, 77) f32, `None` when every weight is 1 (the encoder's output is then used as it is).
    weights: Option<Tensor>,
    prompts: usize,
    chunks: usize,
}

impl ChunkedPrompts {
    fn new(tokens: &[PromptTokens], pad_id: u32, chunks: usize, device: &Device) -> Result<Self> {
        let empty = PromptChunk::empty(pad_id);
        let rows: Vec<&PromptChunk> =
            tokens.iter().flat_map(|t| t.chunks.iter().chain(std::iter::repeat(&empty)).take(chunks)).collect();
        let ids: Vec<u32> = rows.iter().flat_map(|c| c.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), CONTEXT_LENGTH), device)?;
        let weights = if tokens.iter().any(PromptTokens::is_emphasised) {
            let w: Vec<f32> = rows.iter().flat_map(|c| c.weights.iter().map(|&w| w as f32)).collect();
            Some(Tensor::from_vec(w, (rows.len(), CONTEXT_LENGTH), device)?)
        } else {
            None
        };
        Ok(Self { ids, weights, prompts: tokens.len(), chunks })
    }

    /// An encoder's output for the rows (B·k, 77, d), emphasised, as (B, 77·k, d).
    fn per_prompt(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.weights {
            Some(w) => apply_emphasis(z, w)?,
            None => z.clone(),
        };
        Ok(z.reshape((self.prompts, self.chunks * CONTEXT_LENGTH, z.dim(2)?))?)
    }
}

impl StableDiffusion {
    /// Every adaptable layer of the text encoder and the UNet.
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(Component, LayerMut<'_>)) {
        self.text_encoder.visit_layers(&mut |l| f(Component::TextEncoder, l));
        if let Some((encoder, _)) = &mut self.text_encoder_2 {
            encoder.visit_layers(&mut |l| f(Component::TextEncoder2, l));
        }
        self.unet.visit_layers(&mut |l| f(Component::Unet, l));
    }

    /// The sampler a user of this family expects when they choose none: SDXL's pipelines ship
    /// Euler (`EulerDiscreteScheduler`); SD 1.x / 2.x keep DDIM.
    pub fn default_sampler(&self) -> SamplerKind {
        match self.family() {
            ModelFamily::Sdxl => SamplerKind::Euler,
            ModelFamily::Sd1 | ModelFamily::Sd2 => SamplerKind::Ddim,
        }
    }

    /// The picture side the model was trained at (the UNet's `sample_size` in pixels): 512 for
    /// SD 1.5, 768 for SD 2.x 768-v, 1024 for SDXL.
    pub fn native_side(&self) -> usize {
        let fallback = match self.family() {
            ModelFamily::Sdxl => 128,
            _ => 64,
        };
        self.unet.config.sample_size.unwrap_or(fallback).saturating_mul(self.vae.config.downscale())
    }

    pub fn family(&self) -> ModelFamily {
        family_of(
            self.text_encoder_2.is_some(),
            self.unet.config.cross_attention_dim,
            self.text_encoder.config.hidden_size,
        )
    }

    /// `visit_layers` for work that can fail: stops calling `f` at the first error and returns it.
    pub fn try_visit_layers(&mut self, f: &mut dyn FnMut(Component, LayerMut<'_>) -> Result<()>) -> Result<()> {
        let mut first = crate::engine::models::nn::FirstError::default();
        self.visit_layers(&mut |c, l| first.run(|| f(c, l)));
        first.into_result()
    }

    /// The model's layer names and shapes, for matching adapter files.
    pub fn module_index(&mut self) -> ModuleIndex {
        let mut index = ModuleIndex::new(Some(self.unet.config.layers_per_block));
        index.family = Some(self.family());
        self.visit_layers(&mut |c, l| index.insert(c, l.path(), l.stack_ref().base.dims().to_vec()));
        index
    }

    /// Reads an adapter file, checks it against this model and attaches it under `name` with the
    /// given slider weight. A file only part of which fits is refused (`load_adapter_partial`
    /// loads it when the user asks). Returns the compatibility report.
    pub fn load_adapter(&mut self, name: &str, path: &Path, weight: f64) -> Result<CompatibilityReport> {
        self.load_adapter_checked(name, path, weight, &BlockWeights::default(), false)
    }

    /// As `load_adapter`, with per-block weights from the start (each layer is merged once).
    pub fn load_adapter_mixed(
        &mut self,
        name: &str,
        path: &Path,
        weight: f64,
        blocks: &BlockWeights,
    ) -> Result<CompatibilityReport> {
        self.load_adapter_checked(name, path, weight, blocks, false)
    }

    /// As `load_adapter_mixed`, also when only some of the file's layers fit this model (the user
    /// asked for it); the report says which did not.
    pub fn load_adapter_partial(
        &mut self,
        name: &str,
        path: &Path,
        weight: f64,
        blocks: &BlockWeights,
    ) -> Result<CompatibilityReport> {
        self.load_adapter_checked(name, path, weight, blocks, true)
    }

    fn load_adapter_checked(
        &mut self,
        name: &str,
        path: &Path,
        weight: f64,
        blocks: &BlockWeights,
        allow_partial: bool,
    ) -> Result<CompatibilityReport> {
        let parsed = read_adapter(path)?;
        let (layers, report) = match_layers(&parsed, &self.module_index())?;
        report.accept(allow_partial).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
        self.attach_adapter_mixed(name, layers, weight, blocks)?;
        Ok(report)
    }

    /// Attaches matched layers under `name` (replacing an adapter of the same name).
    pub fn attach_adapter(&mut self, name: &str, layers: Vec<MatchedLayer>, weight: f64) -> Result<()> {
        self.attach_adapter_mixed(name, layers, weight, &BlockWeights::default())
    }

    /// As `attach_adapter`, each layer at `weight` times its block's weight.
    pub fn attach_adapter_mixed(
        &mut self,
        name: &str,
        layers: Vec<MatchedLayer>,
        weight: f64,
        blocks: &BlockWeights,
    ) -> Result<()> {
        self.remove_adapter(name);
        let mut by_layer: HashMap<(Component, String), MatchedLayer> =
            layers.into_iter().map(|l| ((l.component, l.path.clone()), l)).collect();
        let mut text_changed = false;
        let result = self.try_visit_layers(&mut |c, mut l| {
            if let Some(m) = by_layer.remove(&(c, l.path().to_string())) {
                text_changed |= c.is_text_encoder();
                let multiplier = weight * blocks.for_layer(c.is_text_encoder(), l.path());
                let adapter = LayerAdapter { name: name.to_string(), delta: m.delta, scale: m.scale, multiplier };
                l.stack().attach(adapter)?;
            }
            Ok(())
        });
        self.text_cache.revision += text_changed as u64;
        result?;
        self.refresh_merges()?;
        Ok(())
    }

    pub fn remove_adapter(&mut self, name: &str) -> bool {
        let (mut removed, mut text_changed) = (false, false);
        self.visit_layers(&mut |c, mut l| {
            let detached = l.stack().detach(name);
            removed |= detached;
            text_changed |= detached && c.is_text_encoder();
        });
        self.text_cache.revision += text_changed as u64;
        removed
    }

    /// Changes one adapter's slider weight (0 switches it off) and re-merges only the layers it
    /// touches. Returns how many layers were re-merged.
    pub fn set_adapter_weight(&mut self, name: &str, weight: f64) -> Result<usize> {
        self.set_adapter_mix(name, weight, &BlockWeights::default())
    }

    /// As `set_adapter_weight`, with per-block multipliers (A1111's LoRA Block Weight).
    pub fn set_adapter_mix(&mut self, name: &str, weight: f64, blocks: &BlockWeights) -> Result<usize> {
        let mut text_changed = false;
        self.visit_layers(&mut |c, mut l| {
            let m = weight * blocks.for_layer(c.is_text_encoder(), l.path());
            text_changed |= l.stack().set_multiplier(name, m) && c.is_text_encoder();
        });
        self.text_cache.revision += text_changed as u64;
        self.refresh_merges()
    }

    /// Merged (inference) or factored (training / comparison) evaluation of every adapter.
    pub fn set_merged(&mut self, merged: bool) -> Result<()> {
        self.visit_layers(&mut |_, mut l| {
            let s = l.stack();
            if s.merge != merged {
                s.merge = merged;
                s.mark_stale();
            }
        });
        self.refresh_merges()?;
        Ok(())
    }

    /// Folds changed adapters into the cached weights; returns the number of layers re-merged.
    pub fn refresh_merges(&mut self) -> Result<usize> {
        let mut count = 0;
        self.try_visit_layers(&mut |_, mut l| {
            count += l.stack().refresh()? as usize;
            Ok(())
        })?;
        Ok(count)
    }

    /// A model with its weight matrices kept as the file stores them (see `WeightPrecision::Auto`).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_weights(ModelWeights::load(path, DType::F32, WeightPrecision::Auto, device)?)
    }

    pub fn from_weights(w: ModelWeights) -> Result<Self> {
        let unet = UNet2DConditionModel::load(&w.unet_config, &w.unet)?;
        let text_encoder = ClipTextModel::load(&w.text_config, &w.text_encoder)?;
        let text_encoder_2 = match &w.text_encoder_2 {
            Some(second) => Some((ClipTextModel::load(&second.config, &second.weights)?, second.tokenizer.clone())),
            None => None,
        };
        check_conditioning_widths(&unet, &text_encoder, text_encoder_2.as_ref().map(|(e, _)| e))?;
        Ok(Self {
            unet,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: w.force_zeros_for_empty_prompt,
            vae: AutoencoderKL::load(&w.vae_config, &w.vae)?,
            tokenizer: w.tokenizer,
            schedule: NoiseSchedule::new(&w.scheduler_config)?,
            device: w.unet.device().clone(),
            dtype: w.unet.dtype(),
            cache_text_embeddings: false,
            text_cache: TextCache::default(),
        })
    }

    /// How many times the text encoder has run for `generate` / `encode_prompts`.
    pub fn text_encoder_runs(&self) -> usize {
        self.text_cache.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `encode_weighted_prompts`, from the cache when the prompts, the clip skip and the text
    /// encoder are unchanged.
    fn prompt_context(&self, prompts: &[&str], clip_skip: usize) -> Result<TextConditioning> {
        if !self.cache_text_embeddings {
            return self.encode_weighted_prompts(prompts, clip_skip);
        }
        let key: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
        let revision = self.text_cache.revision;
        let mut entry = self.text_cache.entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = entry.as_ref()
            && cached.revision == revision
            && cached.prompts == key
            && cached.clip_skip == clip_skip
        {
            return Ok(cached.text.clone());
        }
        let text = self.encode_weighted_prompts(prompts, clip_skip)?;
        *entry = Some(CachedText { revision, prompts: key, clip_skip, text: text.clone() });
        Ok(text)
    }

    /// The clip skip the text encoding uses when `clip_skip` is asked for: as asked for SD 1.x /
    /// 2.x (kohya applies it to 2.x too; A1111 only to 1.x); 1 for SDXL, which already reads its
    /// encoders' penultimate layer (A1111 and kohya ignore clip skip there too). 0 and more than
    /// the encoder's layers are refused.
    pub fn effective_clip_skip(&self, clip_skip: usize) -> Result<usize> {
        let layers = self.text_encoder.layers.len();
        if clip_skip == 0 || clip_skip > layers {
            bail!("clip skip {clip_skip} is out of range: 1 (the last layer) to {layers} for this text encoder");
        }
        Ok(if self.family() == ModelFamily::Sdxl { 1 } else { clip_skip })
    }

    /// A prompt as generation reads it (its chunks; `token_count` / `capacity` make A1111's
    /// "80/150" counter for a prompt box).
    pub fn prompt_tokens(&self, prompt: &str) -> PromptTokens {
        PromptTokens::new(&self.tokenizer, prompt)
    }

    /// What to tell the user when `clip_skip` is not used as asked (SDXL); `None` when it is.
    pub fn clip_skip_note(&self, clip_skip: usize) -> Option<String> {
        (clip_skip > 1 && self.family() == ModelFamily::Sdxl).then(|| {
            format!(
                "clip skip {clip_skip} is ignored: SDXL already reads its text encoders' penultimate layer (A1111 and kohya ignore clip skip for SDXL too)"
            )
        })
    }

    pub fn prediction(&self) -> Prediction {
        self.schedule.prediction()
    }

    /// What the UNet is conditioned on for the prompts, read as plain text cut to 75 tokens: text
    /// embeddings (B, 77, d), and SDXL's pooled embedding. `encode_captions` at clip skip 1.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<TextConditioning> {
        self.encode_captions(prompts, 1)
    }

    /// Training captions as kohya reads them (its default `max_token_length` of 75): plain text
    /// cut to 75 tokens, one 77-token row each, at `clip_skip` (see `effective_clip_skip`).
    pub fn encode_captions(&self, captions: &[&str], clip_skip: usize) -> Result<TextConditioning> {
        self.text_cache.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ids = self.tokenizer.input_ids(captions, &self.device)?;
        let ids_2 = match &self.text_encoder_2 {
            Some((_, tokenizer)) => Some(tokenizer.input_ids(captions, &self.device)?),
            None => None,
        };
        self.encode_ids_at_clip_skip(&ids, ids_2.as_ref(), clip_skip)
    }

    /// Prompts as AUTOMATIC1111 reads them: emphasis and `BREAK` (`prompt::parse_prompt_attention`),
    /// any length in chunks of 75 tokens each encoded alone, its emphasis applied to each chunk,
    /// the chunks side by side: (B, 77·k, d), every prompt padded with empty-prompt chunks to the
    /// longest's k, so a prompt and its negative batch together (A1111's "Pad prompt/negative
    /// prompt" option; without it A1111 runs the two through the UNet apart). SDXL's pooled
    /// embedding is the first chunk's. A plain prompt of at most 75 tokens gives exactly
    /// `encode_prompts`' numbers.
    pub fn encode_weighted_prompts(&self, prompts: &[&str], clip_skip: usize) -> Result<TextConditioning> {
        let clip_skip = self.effective_clip_skip(clip_skip)?;
        self.text_cache.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tokens: Vec<PromptTokens> = prompts.iter().map(|p| PromptTokens::new(&self.tokenizer, p)).collect();
        let tokens_2: Option<Vec<PromptTokens>> = self
            .text_encoder_2
            .as_ref()
            .map(|(_, tokenizer)| prompts.iter().map(|p| PromptTokens::new(tokenizer, p)).collect());
        // Both tokenizers cut alike (the same tokens); the most chunks of either, to be sure.
        let chunks = tokens.iter().chain(tokens_2.iter().flatten()).map(|t| t.chunks.len()).max().unwrap_or(1);
        let first = ChunkedPrompts::new(&tokens, self.tokenizer.pad_id(), chunks, &self.device)?;
        match (&self.text_encoder_2, tokens_2) {
            (Some((second, tokenizer)), Some(tokens_2)) => {
                let other = ChunkedPrompts::new(&tokens_2, tokenizer.pad_id(), chunks, &self.device)?;
                let (a, _) = self.text_encoder.penultimate_and_pooled(&first.ids)?;
                let (b, pooled) = second.penultimate_and_pooled(&other.ids)?;
                let context = Tensor::cat(&[&first.per_prompt(&a)?, &other.per_prompt(&b)?.to_dtype(a.dtype())?], 2)?;
                let pooled = pooled.reshape((prompts.len(), chunks, pooled.dim(1)?))?.narrow(1, 0, 1)?.squeeze(1)?;
                Ok(TextConditioning { context, pooled: Some(pooled) })
            }
            _ => {
                let z = self.text_encoder.forward_clip_skip(&first.ids, clip_skip)?;
                Ok(TextConditioning { context: first.per_prompt(&z)?, pooled: None })
            }
        }
    }

    /// `encode_prompts` from token ids: `ids` for the first text encoder, `ids_2` for SDXL's
    /// second (its tokenizer pads differently).
    pub fn encode_ids(&self, ids: &Tensor, ids_2: Option<&Tensor>) -> Result<TextConditioning> {
        self.encode_ids_at_clip_skip(ids, ids_2, 1)
    }

    /// `encode_ids` at `clip_skip` (see `effective_clip_skip`).
    pub fn encode_ids_at_clip_skip(
        &self,
        ids: &Tensor,
        ids_2: Option<&Tensor>,
        clip_skip: usize,
    ) -> Result<TextConditioning> {
        let clip_skip = self.effective_clip_skip(clip_skip)?;
        match (&self.text_encoder_2, ids_2) {
            (None, None) => {
                Ok(TextConditioning { context: self.text_encoder.forward_clip_skip(ids, clip_skip)?, pooled: None })
            }
            // SDXL reads both encoders at their penultimate layer, side by side on the channel
            // axis; the pooled embedding is the second's.
            (Some((second, _)), Some(ids_2)) => {
                let (first, _) = self.text_encoder.penultimate_and_pooled(ids)?;
                let (other, pooled) = second.penultimate_and_pooled(ids_2)?;
                let context = Tensor::cat(&[&first, &other.to_dtype(first.dtype())?], 2)?;
                Ok(TextConditioning { context, pooled: Some(pooled) })
            }
            (Some(_), None) => bail!("this model (SDXL) has two text encoders: token ids for the second are missing"),
            (None, Some(_)) => bail!("this model has one text encoder: it takes no second set of token ids"),
        }
    }

    /// SDXL's size numbers for drawing a `height`×`width` image from an uncropped original of the
    /// same size (diffusers' default) for every row of `text`; `None` for SD 1.x / 2.x.
    pub fn uncropped_sizes(&self, text: &TextConditioning, height: usize, width: usize) -> Result<Option<Tensor>> {
        if text.pooled.is_none() {
            return Ok(None);
        }
        let row = ([height, width], [0, 0], [height, width]);
        Ok(Some(size_conditioning(&vec![row; text.context.dim(0)?], self.dtype, &self.device)?))
    }

    /// The UNet's prediction for latents `x` at `timesteps` under `text`; SDXL also takes each
    /// image's size numbers (`size_conditioning`), `sizes` (B, 6).
    pub fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        text: &TextConditioning,
        sizes: Option<&Tensor>,
    ) -> Result<Tensor> {
        match (&text.pooled, sizes) {
            (Some(pooled), Some(sizes)) => self.unet.forward_with(x, timesteps, &text.context, Some((pooled, sizes))),
            (None, None) => self.unet.forward(x, timesteps, &text.context),
            (Some(_), None) => bail!("an SDXL prediction needs each image's size numbers"),
            (None, Some(_)) => bail!("size numbers were given, but there is no pooled text embedding (not SDXL)"),
        }
    }

    /// Pixel size that latents must be a multiple of, so every UNet level has whole pixels.
    pub fn size_multiple(&self) -> usize {
        self.vae.config.downscale() * (1 << (self.unet.config.block_out_channels.len() - 1))
    }

    /// Runs the sampler and decodes; `on_step(i, total)` reports progress.
    pub fn generate(&self, req: &GenerateRequest, on_step: &mut dyn FnMut(usize, usize)) -> Result<image::RgbImage> {
        self.generate_until(req, &mut |i, total| {
            on_step(i, total);
            true
        })
    }

    /// As `generate`, stopping with [`GenerationCancelled`] after a step where `on_step` returns
    /// false (a Cancel button).
    pub fn generate_until(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<image::RgbImage> {
        let m = self.size_multiple();
        if req.width == 0 || req.height == 0 || !req.width.is_multiple_of(m) || !req.height.is_multiple_of(m) {
            bail!("image size {}×{} must be a positive multiple of {m} for this model", req.width, req.height);
        }
        if req.width > MAX_GENERATE_SIDE || req.height > MAX_GENERATE_SIDE {
            bail!(
                "image size {}×{} is larger than the limit of {MAX_GENERATE_SIDE} pixels a side",
                req.width,
                req.height
            );
        }
        if req.steps == 0 {
            bail!("steps must be at least 1");
        }
        if !req.guidance.is_finite() {
            bail!("guidance must be a finite number, not {}", req.guidance);
        }
        let guided = req.guidance > 1.0;
        let skip = req.clip_skip;
        let text = if !guided {
            self.prompt_context(&[req.prompt.as_str()], skip)?
        } else if self.force_zeros_for_empty_prompt && req.negative.trim().is_empty() {
            // SDXL (as diffusers' pipeline): no negative prompt is zeros, not the encoding of "".
            let positive = self.prompt_context(&[req.prompt.as_str()], skip)?;
            TextConditioning::cat(&[&positive.zeros_like()?, &positive])?
        } else {
            self.prompt_context(&[req.negative.as_str(), req.prompt.as_str()], skip)?
        };
        let sizes = self.uncropped_sizes(&text, req.height, req.width)?;
        let f = self.vae.config.downscale();
        let shape = (1, self.vae.config.latent_channels, req.height / f, req.width / f);
        let mut rng = Rng::new(req.seed);
        let sampler = Sampler::new(req.sampler, &self.schedule, req.steps)?;
        let mut x = (rng.randn(shape, &self.device)?.to_dtype(self.dtype)? * sampler.init_noise_sigma())?;
        let total = sampler.timesteps().len();
        for i in 0..total {
            let input = sampler.scale_model_input(&x, i)?;
            let input = if guided { Tensor::cat(&[&input, &input], 0)? } else { input };
            // Euler with "linspace" spacing visits fractional timesteps.
            let t_tensor = Tensor::new(&[sampler.model_timestep(i) as f32], &self.device)?.to_dtype(self.dtype)?;
            let out = self.predict(&input, &t_tensor, &text, sizes.as_ref())?;
            let out = if guided { guidance(&out.narrow(0, 0, 1)?, &out.narrow(0, 1, 1)?, req.guidance)? } else { out };
            x = sampler.step(&out, i, &x, &mut rng)?;
            if !on_step(i + 1, total) {
                return Err(GenerationCancelled.into());
            }
        }
        // NaN or ∞ would clamp to a flat, meaningless picture; refuse instead of writing one.
        if !all_finite(&x)? {
            bail!(
                "generation failed: the UNet produced NaN or infinite values (the model's weights or an adapter are broken, or overflow in {:?})",
                self.dtype
            );
        }
        let decoded = self.vae.decode(&(x / self.vae.config.scaling_factor)?)?;
        if !all_finite(&decoded)? {
            bail!(
                "generation failed: the VAE decoder produced NaN or infinite values (its weights are broken, or overflow in {:?})",
                self.dtype
            );
        }
        to_image(&decoded.get(0)?)
    }
}

/// A generation its caller stopped between two steps.
#[derive(Debug)]
pub struct GenerationCancelled;

impl std::fmt::Display for GenerationCancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for GenerationCancelled {}

/// The text encoders' widths must add up to the UNet's cross-attention width, and an SDXL UNet's
/// `add_embedding` must take the second encoder's pooled width plus the six size embeddings: a
/// mismatch is a broken model folder, said here instead of as a shape error mid-generation.
fn check_conditioning_widths(
    unet: &UNet2DConditionModel,
    first: &ClipTextModel,
    second: Option<&ClipTextModel>,
) -> Result<()> {
    let widths = first.config.hidden_size + second.map_or(0, |s| s.config.hidden_size);
    if widths != unet.config.cross_attention_dim {
        bail!(
            "the text encoder{} ({widths} wide) and the UNet's cross-attention ({} wide) do not fit together",
            if second.is_some() { "s together" } else { "" },
            unet.config.cross_attention_dim
        );
    }
    match (unet.takes_added_conditioning(), second) {
        (true, None) => bail!("the UNet takes SDXL's micro-conditioning, but the model has no second text encoder"),
        (false, Some(_)) => bail!("the model has a second text encoder, but its UNet takes no pooled text embedding"),
        (true, Some(second)) => {
            let pooled = second.pooled_width();
            let expected = unet.config.projection_class_embeddings_input_dim.unwrap_or(0);
            let time = 6 * unet.config.addition_time_embed_dim.unwrap_or(0);
            if pooled + time != expected {
                bail!(
                    "the second text encoder's pooled embedding ({pooled} wide) and six size embeddings ({time}) do not add up to the UNet's add_embedding input ({expected})"
                );
            }
            Ok(())
        }
        (false, None) => Ok(()),
    }
}

/// (3, H, W) in [-1, 1] → an 8-bit RGB image.
pub fn to_image(t: &Tensor) -> Result<image::RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        bail!("expected 3 colour channels, got {c}");
    }
    let pixels = ((t.to_dtype(DType::F32)? + 1.0)? * 127.5)?.clamp(0f32, 255f32)?.round()?;
    let data: Vec<u8> =
        pixels.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|v| v as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, data).context("image buffer size")
}
