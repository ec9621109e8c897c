//! Original-layout ("single file": CompVis / A1111 / civitai) Stable Diffusion 1.x and 2.x
//! checkpoints: renames their tensors to the diffusers / transformers names our models use and
//! infers the configs a diffusers folder would carry, so one `.safetensors` loads like a folder.

use std::collections::HashMap;

use anyhow::{Context, anyhow, bail};
use candle_core::Tensor;

use crate::engine::Result;
use crate::engine::diffusion::schedule::Prediction;
use crate::engine::models::clip::ClipConfig;
use crate::engine::models::unet::UNetConfig;
use crate::engine::models::vae::VaeConfig;

mod infer;
mod names;

use infer::{infer_text, infer_unet, infer_vae, prediction_hint};
pub(crate) use names::unet_module;
use names::{CLIP, OPEN_CLIP, Part, SDXL_CLIP, SDXL_OPEN_CLIP, Target, index_after, map_key};

pub use crate::engine::models::family::ModelFamily;

/// A checkpoint split into diffusers-named components, with the configs inferred from shapes.
#[derive(Debug)]
pub struct SingleFileModel {
    pub family: ModelFamily,
    pub unet: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub unet_config: UNetConfig,
    pub text_config: ClipConfig,
    pub vae_config: VaeConfig,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection) and its config.
    pub text_encoder_2: Option<(HashMap<String, Tensor>, ClipConfig)>,
    /// `None` when nothing in the file points either way (SD 2.x 512-base and 768-v share shapes).
    /// What the UNet was trained to predict. Files rarely say, so this is only ever a hint.
    pub prediction_hint: Option<Prediction>,
}

/// Names the family from tensor names alone (cheap: call it on a safetensors header before
/// reading any data). Every other model kind gets a one-line "not supported: …" error.
pub fn detect<'a>(names: impl Iterator<Item = &'a str>) -> Result<ModelFamily> {
    let (mut unet, mut clip, mut open_clip, mut diffusers_names) = (false, false, false, false);
    let (mut xl_clip, mut xl_open_clip, mut label_emb) = (false, false, false);
    for n in names {
        if is_adapter_key(n) {
            bail!("not supported: this is a LoRA adapter, not a base model (key `{n}`)");
        }
        if n.starts_with("conditioner.embedders.0.model.") {
            bail!(
                "not supported: the SDXL refiner (one OpenCLIP text encoder, `conditioner.embedders.0.model.*`); open an SDXL base model or finetune"
            );
        }
        if n.contains("joint_blocks.") {
            bail!("not supported: SD3-style MMDiT checkpoints (`joint_blocks`); only SD 1.x / 2.x / SDXL load");
        }
        if n.contains("double_blocks.") || n.contains("single_blocks.") {
            bail!("not supported: Flux-style checkpoints (`double_blocks`); only SD 1.x / 2.x / SDXL load");
        }
        label_emb |= n.starts_with("model.diffusion_model.label_emb.");
        unet |= n.starts_with("model.diffusion_model.input_blocks.");
        clip |= n.starts_with(CLIP);
        open_clip |= n.starts_with(OPEN_CLIP);
        xl_clip |= n.starts_with(SDXL_CLIP);
        xl_open_clip |= n.starts_with(SDXL_OPEN_CLIP);
        diffusers_names |=
            n.starts_with("down_blocks.") || n.starts_with("text_model.") || n.starts_with("encoder.down_blocks.");
    }
    if !unet {
        if diffusers_names {
            bail!(
                "not supported: this file uses diffusers names (one component of a diffusers folder); open the folder instead"
            );
        }
        bail!("not supported: no Stable Diffusion UNet weights (`model.diffusion_model.input_blocks.*`) in this file");
    }
    if xl_clip || xl_open_clip {
        if !(xl_clip && xl_open_clip && label_emb) {
            bail!(
                "not supported: an SGM-layout checkpoint without SDXL's two text encoders (`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`) and size embedding (`label_emb`)"
            );
        }
        if clip || open_clip {
            bail!("not supported: the checkpoint has both SDXL's and SD 1.x / 2.x's text encoders");
        }
        return Ok(ModelFamily::Sdxl);
    }
    if label_emb {
        bail!("not supported: class-conditioned UNets (unCLIP, upscaler: `label_emb`)");
    }
    match (clip, open_clip) {
        (true, false) => Ok(ModelFamily::Sd1),
        (false, true) => Ok(ModelFamily::Sd2),
        (false, false) => bail!(
            "not supported: the checkpoint has no text encoder (`cond_stage_model.*`); UNet-only files cannot load as a model"
        ),
        (true, true) => bail!("not supported: the checkpoint has both a CLIP and an OpenCLIP text encoder"),
    }
}

/// kohya / PEFT / LyCORIS adapter names; none of them appear in a base model.
fn is_adapter_key(n: &str) -> bool {
    n.starts_with("lora_unet_")
        || n.starts_with("lora_te")
        || [".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_", ".lokr_w1"].iter().any(|p| n.contains(p))
}

/// Converts an original-layout checkpoint. Every input tensor is either renamed or deliberately
/// dropped (EMA copies, the noise schedule, OpenCLIP's unused last layer and projection); anything
/// else is an error, so a new variant is reported instead of loading half-right.
pub fn convert(tensors: HashMap<String, Tensor>, source: &str) -> Result<SingleFileModel> {
    let family = detect(tensors.keys().map(String::as_str)).map_err(|e| anyhow!("{source}: {e}"))?;
    let layout =
        Layout::from_names(family, tensors.keys().map(String::as_str)).map_err(|e| anyhow!("{source}: {e}"))?;
    let prediction_hint = prediction_hint(&tensors, &layout).map_err(|e| anyhow!("{source}: {e}"))?;

    let mut entries: Vec<(String, Tensor)> = tensors.into_iter().collect();
    // Sorted so the "unrecognised" list and duplicate errors are the same on every run.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut unet, mut text_encoder, mut vae) = (HashMap::new(), HashMap::new(), HashMap::new());
    let mut text_encoder_2 = HashMap::new();
    let mut unknown = Vec::new();
    for (name, t) in entries {
        let (part, op) = match map_key(&name, &layout) {
            None => {
                unknown.push(name);
                continue;
            }
            Some(Target::Ignore) => continue,
            Some(Target::Map(part, op)) => (part, op),
        };
        let out = match part {
            Part::Unet => &mut unet,
            Part::Text => &mut text_encoder,
            Part::Text2 => &mut text_encoder_2,
            Part::Vae => &mut vae,
        };
        for (new_name, t) in op.apply(t).with_context(|| format!("{source}: tensor `{name}`"))? {
            if out.insert(new_name.clone(), t).is_some() {
                bail!("{source}: two tensors map to `{new_name}` (the second is `{name}`); unknown checkpoint layout");
            }
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
        bail!(
            "{source}: not supported: {} tensor(s) this loader does not recognise, e.g. {}",
            unknown.len(),
            shown.join(", ")
        );
    }
    if vae.is_empty() {
        bail!("{source}: not supported: the checkpoint has no VAE (`first_stage_model.*`)");
    }

    // OpenAI CLIP was trained with quick_gelu, OpenCLIP with exact gelu.
    let text_act = if family == ModelFamily::Sd2 { "gelu" } else { "quick_gelu" };
    let text_config = infer_text(&text_encoder, text_act).map_err(|e| anyhow!("{source}: text encoder: {e}"))?;
    let text_encoder_2 = match family {
        ModelFamily::Sdxl => {
            let config = infer_text(&text_encoder_2, "gelu")
                .map_err(|e| anyhow!("{source}: second text encoder (OpenCLIP): {e}"))?;
            Some((text_encoder_2, config))
        }
        _ => None,
    };
    // SDXL's size embedding: `add_embedding` takes the pooled text embedding and six size
    // embeddings, whose width follows from the two.
    let pooled_width = text_encoder_2
        .as_ref()
        .map(|(t, c)| t.get("text_projection.weight").and_then(|p| p.dims().first().copied()).unwrap_or(c.hidden_size));
    let unet_config = infer_unet(&unet, family, pooled_width).map_err(|e| anyhow!("{source}: UNet: {e}"))?;
    let vae_config = infer_vae(&vae, family).map_err(|e| anyhow!("{source}: VAE: {e}"))?;
    Ok(SingleFileModel {
        family,
        unet,
        text_encoder,
        vae,
        unet_config,
        text_config,
        vae_config,
        text_encoder_2,
        prediction_hint,
    })
}

/// Real SD UNets have 2 (SD 1.x / 2.x) or 3 resnets per block; far more means a broken file.
const MAX_LAYERS_PER_BLOCK: usize = 64;

/// The few structural facts the renaming needs, all readable from names alone.
#[derive(Debug, Clone)]
struct Layout {
    /// ldm numbers UNet blocks flatly (`input_blocks.4`); this undoes the flattening.
    unet_layers_per_block: usize,
    /// The ldm decoder counts its up blocks from the bottom; diffusers from the top.
    vae_blocks: usize,
    /// Layers in the OpenCLIP tower (0 for SD 1.x); the last is unused by SD 2.x.
    open_clip_layers: usize,
}

impl Layout {
    fn from_names<'a>(family: ModelFamily, names: impl Iterator<Item = &'a str>) -> Result<Self> {
        let (mut first_op, mut max_input, mut vae_blocks, mut open_clip_layers) = (None::<usize>, 0, 0, 0);
        for n in names {
            if let Some((k, rest)) = index_after(n, "model.diffusion_model.input_blocks.") {
                max_input = max_input.max(k);
                if rest.starts_with("0.op.") {
                    first_op = Some(first_op.map_or(k, |f| f.min(k)));
                }
            } else if let Some((i, _)) = index_after(n, "first_stage_model.encoder.down.") {
                vae_blocks = vae_blocks.max(i.saturating_add(1));
            } else if let Some((i, _)) = index_after(n, "cond_stage_model.model.transformer.resblocks.") {
                open_clip_layers = open_clip_layers.max(i.saturating_add(1));
            }
        }
        // The first downsampler sits right after the first block's resnets; a one-block UNet has none.
        let unet_layers_per_block = first_op.map_or(max_input, |k| k.saturating_sub(1));
        if unet_layers_per_block == 0 {
            bail!("not supported: the UNet has no resnet blocks in `input_blocks`");
        }
        if unet_layers_per_block > MAX_LAYERS_PER_BLOCK {
            bail!("not supported: {unet_layers_per_block} layers per UNet block (limit {MAX_LAYERS_PER_BLOCK})");
        }
        if family == ModelFamily::Sd2 && open_clip_layers < 2 {
            bail!("the OpenCLIP text encoder needs at least 2 layers (SD 2.x uses the penultimate one)");
        }
        Ok(Self { unet_layers_per_block, vae_blocks, open_clip_layers })
    }
}

#[cfg(test)]
mod tests;
