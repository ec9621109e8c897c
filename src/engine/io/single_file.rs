//! Original-layout ("single file": CompVis / A1111 / civitai) Stable Diffusion 1.x and 2.x
//! checkpoints: renames their tensors to the diffusers / transformers names our models use and
//! infers the configs a diffusers folder would carry, so one `.safetensors` loads like a folder.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, anyhow, bail};
use candle_core::{DType, Tensor};

use crate::engine::Result;
use crate::engine::diffusion::schedule::Prediction;
use crate::engine::models::clip::ClipConfig;
use crate::engine::models::unet::{PerBlock, UNetConfig};
use crate::engine::models::vae::VaeConfig;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";

/// Which Stable Diffusion generation a checkpoint belongs to; decided by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// OpenAI CLIP ViT-L text encoder (`cond_stage_model.transformer.*`).
    Sd1,
    /// OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`), conditioned on its penultimate layer.
    Sd2,
}

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
    /// `None` when nothing in the file points either way (SD 2.x 512-base and 768-v share shapes).
    /// What the UNet was trained to predict. Files rarely say, so this is only ever a hint.
    pub prediction_hint: Option<Prediction>,
}

/// Names the family from tensor names alone (cheap: call it on a safetensors header before
/// reading any data). Every other model kind gets a one-line "not supported: …" error.
pub fn detect<'a>(names: impl Iterator<Item = &'a str>) -> Result<ModelFamily> {
    let (mut unet, mut clip, mut open_clip, mut diffusers_names) = (false, false, false, false);
    for n in names {
        if is_adapter_key(n) {
            bail!("not supported: this is a LoRA adapter, not a base model (key `{n}`)");
        }
        if n.starts_with("conditioner.embedders.") {
            bail!("not supported: SDXL checkpoints (`conditioner.embedders.*`); only SD 1.x / 2.x load");
        }
        if n.contains("joint_blocks.") {
            bail!("not supported: SD3-style MMDiT checkpoints (`joint_blocks`); only SD 1.x / 2.x load");
        }
        if n.contains("double_blocks.") || n.contains("single_blocks.") {
            bail!("not supported: Flux-style checkpoints (`double_blocks`); only SD 1.x / 2.x load");
        }
        if n.starts_with("model.diffusion_model.label_emb.") {
            bail!("not supported: class-conditioned UNets (SDXL refiner, unCLIP, upscaler: `label_emb`)");
        }
        unet |= n.starts_with("model.diffusion_model.input_blocks.");
        clip |= n.starts_with(CLIP);
        open_clip |= n.starts_with(OPEN_CLIP);
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

    let unet_config = infer_unet(&unet, family).map_err(|e| anyhow!("{source}: UNet: {e}"))?;
    let text_config = infer_text(&text_encoder, family).map_err(|e| anyhow!("{source}: text encoder: {e}"))?;
    let vae_config = infer_vae(&vae).map_err(|e| anyhow!("{source}: VAE: {e}"))?;
    Ok(SingleFileModel { family, unet, text_encoder, vae, unet_config, text_config, vae_config, prediction_hint })
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Unet,
    Text,
    Vae,
}

/// How one input tensor becomes zero or more output tensors.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Copy(String),
    /// ldm stores the VAE attention projections as 1×1 convs; diffusers uses linears.
    Squeeze1x1(String),
    /// OpenCLIP packs q, k, v into one `in_proj` (rows in that order); transformers splits them.
    SplitQkv([String; 3]),
}

impl Op {
    fn apply(self, t: Tensor) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            Op::Copy(n) => vec![(n, t)],
            Op::Squeeze1x1(n) => match *t.dims() {
                [o, i, 1, 1] => vec![(n, t.reshape((o, i))?)],
                [_, _] => vec![(n, t)],
                ref d => bail!("expected a 1×1 conv or linear weight, found shape {d:?}"),
            },
            Op::SplitQkv(names) => {
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    bail!("packed q/k/v projection has {rows} rows, not a multiple of 3");
                }
                let d = rows / 3;
                let mut out = Vec::with_capacity(3);
                for (i, n) in names.into_iter().enumerate() {
                    out.push((n, t.narrow(0, i * d, d)?.contiguous()?));
                }
                out
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Ignore,
    Map(Part, Op),
}

/// Tensors a checkpoint may carry that no diffusers component needs.
const IGNORED: &[&str] = &[
    // The DDPM noise schedule (we rebuild it from the scheduler config) and ldm training state.
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
    // ComfyUI's empty marker tensors; `v_pred` is read for the prediction hint before this.
    "v_pred",
    "ztsnr",
    // SD 2.x conditions on OpenCLIP's hidden states; the contrastive head is never used.
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
    // A constant buffer (0..77) that transformers rebuilds itself.
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
];
const IGNORED_PREFIXES: &[&str] = &[
    "model_ema.",
    "cond_stage_model.model.visual.",
    // The VAE's training loss (LPIPS + discriminator), shipped by some merges.
    "first_stage_model.loss.",
];

/// The diffusers name(s) for one ldm tensor name; `None` when the name is not recognised.
fn map_key(name: &str, layout: &Layout) -> Option<Target> {
    if IGNORED.contains(&name) || IGNORED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some(Target::Ignore);
    }
    if let Some(rest) = name.strip_prefix(UNET) {
        return unet_name(rest, layout.unet_layers_per_block).map(|n| Target::Map(Part::Unet, Op::Copy(n)));
    }
    if let Some(rest) = name.strip_prefix(VAE) {
        return vae_name(rest, layout.vae_blocks).map(|op| Target::Map(Part::Vae, op));
    }
    if let Some(rest) = name.strip_prefix(CLIP) {
        // Older transformers versions saved CLIPTextModel without the `text_model.` level.
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        return clip_name(rest).map(|n| Target::Map(Part::Text, Op::Copy(format!("text_model.{n}"))));
    }
    if let Some(rest) = name.strip_prefix(OPEN_CLIP) {
        return open_clip_name(rest, layout.open_clip_layers);
    }
    None
}

/// Splits `"<prefix><number>.<rest>"` into the number and the rest.
fn index_after<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let tail = name.strip_prefix(prefix)?;
    let (num, rest) = tail.split_once('.')?;
    Some((num.parse().ok()?, rest))
}

/// `"module.weight"` / `"module.bias"` → `"module"`.
fn param_module(s: &str) -> Option<&str> {
    s.strip_suffix(".weight").or_else(|| s.strip_suffix(".bias"))
}

/// Renames a parameter of one module via a table, keeping its `.weight` / `.bias` leaf.
fn renamed(s: &str, table: &[(&str, &str)]) -> Option<String> {
    let module = param_module(s)?;
    let leaf = &s[module.len()..];
    table.iter().find(|(from, _)| *from == module).map(|(_, to)| format!("{to}{leaf}"))
}

/// An original-layout UNet parameter name (after `model.diffusion_model.`) in diffusers' naming.
pub(crate) fn unet_name(rest: &str, layers: usize) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ];
    if let Some(n) = renamed(rest, TOP) {
        return Some(n);
    }
    // Each down block is `layers` resnet(+attention) entries, then one downsampler entry.
    if let Some((k, sub)) = index_after(rest, "input_blocks.") {
        let (block, j) = ((k.checked_sub(1)?) / (layers + 1), (k - 1) % (layers + 1));
        if j == layers {
            let conv = renamed(sub, &[("0.op", "conv")])?;
            return Some(format!("down_blocks.{block}.downsamplers.0.{conv}"));
        }
        return block_member(sub, &format!("down_blocks.{block}"), j, false);
    }
    if let Some((m, sub)) = index_after(rest, "middle_block.") {
        return match m {
            0 => resnet(sub).map(|s| format!("mid_block.resnets.0.{s}")),
            1 => attention(sub).map(|s| format!("mid_block.attentions.0.{s}")),
            2 => resnet(sub).map(|s| format!("mid_block.resnets.1.{s}")),
            _ => None,
        };
    }
    // Up blocks have one resnet more than down blocks; the last entry also holds the upsampler.
    if let Some((k, sub)) = index_after(rest, "output_blocks.") {
        let (block, j) = (k / (layers + 1), k % (layers + 1));
        return block_member(sub, &format!("up_blocks.{block}"), j, j == layers);
    }
    None
}

/// `"<m>.<param>"` inside one flat ldm block entry: 0 is the resnet, then attention and/or upsampler.
fn block_member(sub: &str, block: &str, j: usize, may_upsample: bool) -> Option<String> {
    let (m, param) = sub.split_once('.')?;
    let upsampler = || {
        let conv = renamed(param, &[("conv", "conv")])?;
        may_upsample.then(|| format!("{block}.upsamplers.0.{conv}"))
    };
    match m {
        "0" => resnet(param).map(|s| format!("{block}.resnets.{j}.{s}")),
        // An entry without attention puts its upsampler at index 1; its only tensor is `conv`.
        "1" if param.starts_with("conv.") => upsampler(),
        "1" => attention(param).map(|s| format!("{block}.attentions.{j}.{s}")),
        "2" => upsampler(),
        _ => None,
    }
}

fn resnet(param: &str) -> Option<String> {
    renamed(
        param,
        &[
            ("in_layers.0", "norm1"),
            ("in_layers.2", "conv1"),
            ("emb_layers.1", "time_emb_proj"),
            ("out_layers.0", "norm2"),
            ("out_layers.3", "conv2"),
            ("skip_connection", "conv_shortcut"),
        ],
    )
}

/// SpatialTransformer parameters already carry diffusers' names; only check they are known ones.
fn attention(param: &str) -> Option<String> {
    let module = param_module(param)?;
    let known = match module {
        "norm" | "proj_in" | "proj_out" => true,
        _ => {
            let (_, inner) = index_after(module, "transformer_blocks.")?;
            matches!(inner, "norm1" | "norm2" | "norm3" | "ff.net.0.proj" | "ff.net.2")
                || inner
                    .strip_prefix("attn1.")
                    .or_else(|| inner.strip_prefix("attn2."))
                    .is_some_and(|p| matches!(p, "to_q" | "to_k" | "to_v" | "to_out.0"))
        }
    };
    known.then(|| param.to_string())
}

fn vae_name(rest: &str, blocks: usize) -> Option<Op> {
    if let Some(n) = renamed(rest, &[("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]) {
        return Some(Op::Copy(n));
    }
    let (side, sub) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let copy = |s: String| Some(Op::Copy(format!("{side}.{s}")));
    if let Some(n) = renamed(sub, &[("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out")]) {
        return copy(n);
    }
    if let Some(mid) = sub.strip_prefix("mid.") {
        if let Some(p) = mid.strip_prefix("block_1.") {
            return copy(format!("mid_block.resnets.0.{}", vae_resnet(p)?));
        }
        if let Some(p) = mid.strip_prefix("block_2.") {
            return copy(format!("mid_block.resnets.1.{}", vae_resnet(p)?));
        }
        let p = mid.strip_prefix("attn_1.")?;
        let n = format!(
            "{side}.mid_block.attentions.0.{}",
            renamed(
                p,
                &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
            )?
        );
        return Some(if n.ends_with(".weight") && !n.contains("group_norm") { Op::Squeeze1x1(n) } else { Op::Copy(n) });
    }
    let (dir, ours) = if side == "encoder" { ("down.", "down_blocks") } else { ("up.", "up_blocks") };
    let (i, p) = index_after(sub, dir)?;
    if i >= blocks {
        return None;
    }
    let block = if side == "encoder" { i } else { blocks - 1 - i };
    if let Some((j, p)) = index_after(p, "block.") {
        return copy(format!("{ours}.{block}.resnets.{j}.{}", vae_resnet(p)?));
    }
    let sampler = if side == "encoder" { "downsample.conv" } else { "upsample.conv" };
    let which = if side == "encoder" { "downsamplers" } else { "upsamplers" };
    copy(format!("{ours}.{block}.{which}.0.{}", renamed(p, &[(sampler, "conv")])?))
}

fn vae_resnet(p: &str) -> Option<String> {
    renamed(
        p,
        &[
            ("norm1", "norm1"),
            ("conv1", "conv1"),
            ("norm2", "norm2"),
            ("conv2", "conv2"),
            ("nin_shortcut", "conv_shortcut"),
        ],
    )
}

/// transformers' CLIPTextModel names, below `text_model.`; returned unchanged when known.
fn clip_name(rest: &str) -> Option<String> {
    let module = param_module(rest)?;
    let known = match module {
        "embeddings.token_embedding" | "embeddings.position_embedding" => rest.ends_with(".weight"),
        "final_layer_norm" => true,
        _ => index_after(module, "encoder.layers.").is_some_and(|(_, m)| {
            matches!(
                m,
                "layer_norm1"
                    | "layer_norm2"
                    | "self_attn.q_proj"
                    | "self_attn.k_proj"
                    | "self_attn.v_proj"
                    | "self_attn.out_proj"
                    | "mlp.fc1"
                    | "mlp.fc2"
            )
        }),
    };
    known.then(|| rest.to_string())
}

fn open_clip_name(rest: &str, layers: usize) -> Option<Target> {
    let text = |n: String| Some(Target::Map(Part::Text, Op::Copy(format!("text_model.{n}"))));
    match rest {
        "token_embedding.weight" => return text("embeddings.token_embedding.weight".into()),
        "positional_embedding" => return text("embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(n) = renamed(rest, &[("ln_final", "final_layer_norm")]) {
        return text(n);
    }
    let (i, p) = index_after(rest, "transformer.resblocks.")?;
    let op = open_clip_layer(p, &format!("text_model.encoder.layers.{i}"))?;
    // SD 2.x reads the penultimate layer, so the last one never runs (diffusers drops it too).
    Some(if i + 1 == layers { Target::Ignore } else { Target::Map(Part::Text, op) })
}

fn open_clip_layer(p: &str, layer: &str) -> Option<Op> {
    if let Some(leaf) = p.strip_prefix("attn.in_proj_") {
        if leaf != "weight" && leaf != "bias" {
            return None;
        }
        return Some(Op::SplitQkv(["q", "k", "v"].map(|x| format!("{layer}.self_attn.{x}_proj.{leaf}"))));
    }
    let n = renamed(
        p,
        &[
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ],
    )?;
    Some(Op::Copy(format!("{layer}.{n}")))
}

/// Reads what the file itself suggests about the prediction type, before the tensors are renamed.
fn prediction_hint(tensors: &HashMap<String, Tensor>, layout: &Layout) -> Result<Option<Prediction>> {
    // ComfyUI writes an empty `v_pred` tensor into v-prediction checkpoints it saves.
    if tensors.contains_key("v_pred") {
        return Ok(Some(Prediction::V));
    }
    if layout.open_clip_layers == 0 {
        return Ok(Some(Prediction::Epsilon));
    }
    // SD 2.x inpainting / depth UNets (extra input channels) were all trained for epsilon.
    match tensors.get("model.diffusion_model.input_blocks.0.0.weight").map(|t| t.dims().to_vec()) {
        Some(d) if d.len() == 4 && d[1] == 4 => {}
        _ => return Ok(Some(Prediction::Epsilon)),
    }
    // ComfyUI's heuristic: in 768-v models the last up block's first transformer norm has drifted
    // far from its initialisation (std > 0.09); 512-base models stay close to it.
    let blocks = tensors
        .keys()
        .filter_map(|n| index_after(n, "model.diffusion_model.output_blocks."))
        .map(|(k, _)| k.saturating_add(1))
        .max()
        .unwrap_or(0);
    let Some(last) = blocks.checked_sub(1) else { return Ok(None) };
    let key = format!("model.diffusion_model.output_blocks.{last}.1.transformer_blocks.0.norm1.bias");
    let Some(t) = tensors.get(&key) else { return Ok(None) };
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    let mean = t.mean_all()?.to_scalar::<f32>()?;
    let std = t.affine(1.0, -mean as f64)?.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
    Ok(Some(if std > 0.09 { Prediction::V } else { Prediction::Epsilon }))
}

fn dims<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a [usize]> {
    map.get(name).map(|t| t.dims()).ok_or_else(|| anyhow!("missing tensor `{name}`"))
}

fn dim(map: &HashMap<String, Tensor>, name: &str, i: usize) -> Result<usize> {
    dims(map, name)?.get(i).copied().ok_or_else(|| anyhow!("tensor `{name}` has too few dimensions"))
}

/// Counts `prefix0…`, `prefix1…` while `prefix{i}{suffix}` exists.
fn count(map: &HashMap<String, Tensor>, prefix: &str, suffix: &str) -> usize {
    (0..).take_while(|i| map.contains_key(&format!("{prefix}{i}{suffix}"))).count()
}

/// The one value every item agrees on, or an error naming the disagreement.
fn agreed(values: impl Iterator<Item = usize>, what: &str) -> Result<Option<usize>> {
    let set: BTreeSet<usize> = values.collect();
    match set.len() {
        0 => Ok(None),
        1 => Ok(set.first().copied()),
        _ => bail!("not supported: {what} differs between blocks ({set:?})"),
    }
}

/// GroupNorm's group count is not stored in any weight. Every published SD 1.x / 2.x model uses
/// 32 (and has ≥ 128 channels per block); tiny test models (ours included) conventionally use 8.
fn norm_groups(min_block: usize, norm_sizes: &[usize]) -> usize {
    if min_block >= 128 && norm_sizes.iter().all(|c| c % 32 == 0) {
        return 32;
    }
    [8, 4, 2, 1].into_iter().find(|g| norm_sizes.iter().all(|c| c % g == 0)).unwrap_or(1)
}

fn infer_unet(unet: &HashMap<String, Tensor>, family: ModelFamily) -> Result<UNetConfig> {
    let blocks = count(unet, "down_blocks.", ".resnets.0.conv1.weight");
    if blocks == 0 {
        bail!("no down blocks");
    }
    let block_out_channels = (0..blocks)
        .map(|i| dim(unet, &format!("down_blocks.{i}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let layers_per_block = count(unet, "down_blocks.0.resnets.", ".conv1.weight");
    let has_attn = |block: String| unet.contains_key(&format!("{block}.attentions.0.proj_in.weight"));
    let down_block_types = (0..blocks)
        .map(|i| if has_attn(format!("down_blocks.{i}")) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
        .collect();
    let up_block_types = (0..blocks)
        .map(|i| if has_attn(format!("up_blocks.{i}")) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
        .collect();
    if !has_attn("mid_block".into()) {
        bail!("not supported: a mid block without attention");
    }

    let ends = |suffix: &'static str| unet.iter().filter(move |(n, _)| n.ends_with(suffix)).map(|(_, t)| t.dims());
    // diffusers' rule: a 2-D proj_in is a Linear (SD 2.x), a 4-D one a 1×1 conv (SD 1.x).
    let use_linear_projection = agreed(ends(".proj_in.weight").map(|d| d.len()), "proj_in rank")? == Some(2);
    let cross_attention_dim =
        agreed(ends(".attn2.to_k.weight").map(|d| d.last().copied().unwrap_or(0)), "cross_attention_dim")?
            .context("no cross-attention (attn2) weights")?;
    let transformers = unet.keys().filter_map(|n| {
        let base = n.strip_suffix(".proj_in.weight")?;
        Some(count(unet, &format!("{base}.transformer_blocks."), ".norm1.weight"))
    });
    let transformer_layers = agreed(transformers, "transformer_layers_per_block")?.unwrap_or(1);

    // Head counts are not in the weights either (only their product with head_dim is).
    let attention_head_dim = match family {
        // SD 1.x: 8 heads in every block; halved until it divides all channel counts, for small models.
        ModelFamily::Sd1 => {
            let mut heads = 8;
            while heads > 1 && block_out_channels.iter().any(|c| c % heads != 0) {
                heads /= 2;
            }
            PerBlock::One(heads)
        }
        // SD 2.x: 64 channels per head (5, 10, 20, 20 heads); smaller models use the largest power
        // of two ≤ 64 that divides every block, listed per block as diffusers' SD 2 config does.
        ModelFamily::Sd2 => {
            let head_dim = [64, 32, 16, 8, 4, 2, 1]
                .into_iter()
                .find(|d| block_out_channels.iter().all(|c| c % d == 0))
                .unwrap_or(1);
            PerBlock::Each(block_out_channels.iter().map(|c| c / head_dim).collect())
        }
    };

    let norm_sizes: Vec<usize> = unet
        .iter()
        .filter(|(n, _)| {
            (n.contains(".resnets.") && (n.ends_with(".norm1.weight") || n.ends_with(".norm2.weight")))
                || (n.contains(".attentions.") && n.ends_with(".norm.weight"))
                || *n == "conv_norm_out.weight"
        })
        .map(|(_, t)| t.dims().first().copied().unwrap_or(0))
        .collect();
    let min_block = block_out_channels.iter().copied().min().unwrap_or(0);

    let cfg = UNetConfig {
        in_channels: dim(unet, "conv_in.weight", 1)?,
        out_channels: dim(unet, "conv_out.weight", 0)?,
        block_out_channels,
        layers_per_block,
        down_block_types,
        up_block_types,
        mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
        attention_head_dim,
        num_attention_heads: None,
        cross_attention_dim,
        use_linear_projection,
        norm_num_groups: norm_groups(min_block, &norm_sizes),
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        downsample_padding: 1,
        transformer_layers_per_block: PerBlock::One(transformer_layers),
        only_cross_attention: false,
        // The training resolution is not recorded in the weights.
        sample_size: None,
        addition_embed_type: None,
        class_embed_type: None,
        time_cond_proj_dim: None,
        encoder_hid_dim: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn infer_text(te: &HashMap<String, Tensor>, family: ModelFamily) -> Result<ClipConfig> {
    let token = dims(te, "text_model.embeddings.token_embedding.weight")?;
    let (vocab_size, hidden_size) = match *token {
        [v, h] => (v, h),
        ref d => bail!("token embedding has shape {d:?}, expected 2-D"),
    };
    let num_hidden_layers = count(te, "text_model.encoder.layers.", ".mlp.fc1.weight");
    if num_hidden_layers == 0 {
        bail!("no encoder layers");
    }
    // Heads are not in the weights: real CLIP / OpenCLIP towers use 64-channel heads (12 for
    // SD 1.x, 16 for SD 2.x); tiny test encoders use 8-channel heads (4 for hidden 32).
    let num_attention_heads = if hidden_size % 64 == 0 {
        hidden_size / 64
    } else if hidden_size % 8 == 0 {
        hidden_size / 8
    } else {
        1
    };
    let cfg = ClipConfig {
        vocab_size,
        hidden_size,
        intermediate_size: dim(te, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        num_hidden_layers,
        num_attention_heads,
        max_position_embeddings: dim(te, "text_model.embeddings.position_embedding.weight", 0)?,
        // OpenAI CLIP was trained with quick_gelu, OpenCLIP ViT-H with exact gelu.
        hidden_act: match family {
            ModelFamily::Sd1 => "quick_gelu",
            ModelFamily::Sd2 => "gelu",
        }
        .into(),
        layer_norm_eps: 1e-5,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn infer_vae(vae: &HashMap<String, Tensor>) -> Result<VaeConfig> {
    let blocks = count(vae, "encoder.down_blocks.", ".resnets.0.conv1.weight");
    if blocks == 0 {
        bail!("no encoder blocks");
    }
    let block_out_channels = (0..blocks)
        .map(|i| dim(vae, &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let norm_sizes: Vec<usize> = vae
        .iter()
        .filter(|(n, _)| {
            n.ends_with(".norm1.weight")
                || n.ends_with(".norm2.weight")
                || n.ends_with(".group_norm.weight")
                || n.ends_with("conv_norm_out.weight")
        })
        .map(|(_, t)| t.dims().first().copied().unwrap_or(0))
        .collect();
    let min_block = block_out_channels.iter().copied().min().unwrap_or(0);
    let cfg = VaeConfig {
        in_channels: dim(vae, "encoder.conv_in.weight", 1)?,
        out_channels: dim(vae, "decoder.conv_out.weight", 0)?,
        latent_channels: dim(vae, "decoder.conv_in.weight", 1)?,
        layers_per_block: count(vae, "encoder.down_blocks.0.resnets.", ".conv1.weight"),
        norm_num_groups: norm_groups(min_block, &norm_sizes),
        block_out_channels,
        // Every SD 1.x / 2.x VAE was trained with this latent scale; it is not stored in the file.
        scaling_factor: 0.18215,
        use_quant_conv: vae.contains_key("quant_conv.weight"),
        use_post_quant_conv: vae.contains_key("post_quant_conv.weight"),
        mid_block_add_attention: vae.contains_key("encoder.mid_block.attentions.0.to_q.weight"),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::io::weights::read_safetensors;

    use crate::engine::builtin::fixtures_dir as fixtures;

    struct Fixture {
        unet: HashMap<String, Tensor>,
        text: HashMap<String, Tensor>,
        vae: HashMap<String, Tensor>,
        unet_config: UNetConfig,
        text_config: ClipConfig,
        vae_config: VaeConfig,
    }

    fn fixture() -> Fixture {
        let dir = fixtures().join("sd1-tiny/model");
        Fixture {
            unet: read_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
            text: read_safetensors(&dir.join("text_encoder/model.safetensors")).unwrap(),
            vae: read_safetensors(&dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap(),
            unet_config: UNetConfig::from_file(&dir.join("unet/config.json")).unwrap(),
            text_config: ClipConfig::from_file(&dir.join("text_encoder/config.json")).unwrap(),
            vae_config: VaeConfig::from_file(&dir.join("vae/config.json")).unwrap(),
        }
    }

    // ---- An independent diffusers → ldm renaming, written from the ldm module tree. ----

    fn ldm_unet_name(name: &str, cfg: &UNetConfig) -> String {
        let l = cfg.layers_per_block;
        let mut table: Vec<(String, String)> = [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
            ("mid_block.resnets.0.", "middle_block.0."),
            ("mid_block.attentions.0.", "middle_block.1."),
            ("mid_block.resnets.1.", "middle_block.2."),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        for i in 0..cfg.block_out_channels.len() {
            for j in 0..l {
                let k = 1 + i * (l + 1) + j;
                table.push((format!("down_blocks.{i}.resnets.{j}."), format!("input_blocks.{k}.0.")));
                table.push((format!("down_blocks.{i}.attentions.{j}."), format!("input_blocks.{k}.1.")));
            }
            table.push((
                format!("down_blocks.{i}.downsamplers.0.conv."),
                format!("input_blocks.{}.0.op.", (i + 1) * (l + 1)),
            ));
            for j in 0..=l {
                let k = i * (l + 1) + j;
                table.push((format!("up_blocks.{i}.resnets.{j}."), format!("output_blocks.{k}.0.")));
                table.push((format!("up_blocks.{i}.attentions.{j}."), format!("output_blocks.{k}.1.")));
            }
            let slot = if cfg.up_block_types[i] == "CrossAttnUpBlock2D" { 2 } else { 1 };
            table.push((
                format!("up_blocks.{i}.upsamplers.0.conv."),
                format!("output_blocks.{}.{slot}.conv.", i * (l + 1) + l),
            ));
        }
        let (from, to) = table.iter().find(|(f, _)| name.starts_with(f.as_str())).unwrap_or_else(|| panic!("{name}"));
        let mut rest = name[from.len()..].to_string();
        if from.contains(".resnets.") {
            for (a, b) in [
                ("norm1.", "in_layers.0."),
                ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."),
                ("conv_shortcut.", "skip_connection."),
            ] {
                if let Some(leaf) = rest.strip_prefix(a) {
                    rest = format!("{b}{leaf}");
                    break;
                }
            }
        }
        format!("model.diffusion_model.{to}{rest}")
    }

    /// Returns the ldm name and whether the tensor is a VAE attention linear stored as a 1×1 conv.
    fn ldm_vae_name(name: &str, blocks: usize) -> (String, bool) {
        let parts: Vec<&str> = name.split('.').collect();
        let leaf = parts[parts.len() - 1];
        let res = |m: &str| if m == "conv_shortcut" { "nin_shortcut".to_string() } else { m.to_string() };
        let path = match parts[..parts.len() - 1] {
            [m] => m.to_string(),
            [side, "conv_norm_out"] => format!("{side}.norm_out"),
            [side, m] => format!("{side}.{m}"),
            [side, "mid_block", "resnets", j, m] => {
                format!("{side}.mid.block_{}.{}", j.parse::<usize>().unwrap() + 1, res(m))
            }
            [side, "mid_block", "attentions", "0", m] => format!(
                "{side}.mid.attn_1.{}",
                match m {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    other => panic!("{other}"),
                }
            ),
            [side, "mid_block", "attentions", "0", "to_out", "0"] => format!("{side}.mid.attn_1.proj_out"),
            ["encoder", "down_blocks", i, "resnets", j, m] => format!("encoder.down.{i}.block.{j}.{}", res(m)),
            ["encoder", "down_blocks", i, "downsamplers", "0", "conv"] => format!("encoder.down.{i}.downsample.conv"),
            ["decoder", "up_blocks", i, "resnets", j, m] => {
                format!("decoder.up.{}.block.{j}.{}", blocks - 1 - i.parse::<usize>().unwrap(), res(m))
            }
            ["decoder", "up_blocks", i, "upsamplers", "0", "conv"] => {
                format!("decoder.up.{}.upsample.conv", blocks - 1 - i.parse::<usize>().unwrap())
            }
            _ => panic!("unexpected VAE name {name}"),
        };
        let conv1x1 = path.contains(".attn_1.") && !path.ends_with(".norm") && leaf == "weight";
        (format!("first_stage_model.{path}.{leaf}"), conv1x1)
    }

    /// The fixture written out as an original-layout SD 1.x checkpoint, with the extras real ones carry.
    fn ldm_checkpoint(f: &Fixture) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (n, t) in &f.unet {
            assert!(out.insert(ldm_unet_name(n, &f.unet_config), t.clone()).is_none(), "{n}");
        }
        for (n, t) in &f.vae {
            let (name, conv1x1) = ldm_vae_name(n, f.vae_config.block_out_channels.len());
            let t = if conv1x1 { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t.clone() };
            assert!(out.insert(name, t).is_none(), "{n}");
        }
        for (n, t) in &f.text {
            out.insert(format!("cond_stage_model.transformer.{n}"), t.clone());
        }
        let cpu = &Device::Cpu;
        out.insert("alphas_cumprod".into(), Tensor::ones(1000, DType::F32, cpu).unwrap());
        out.insert("model_ema.decay".into(), Tensor::new(0.9999f32, cpu).unwrap());
        out.insert("model_ema.diffusion_modelinput_blocks00weight".into(), f.unet["conv_in.weight"].clone());
        out.insert(
            "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
            Tensor::arange(0i64, 77, cpu).unwrap().unsqueeze(0).unwrap(),
        );
        out
    }

    fn assert_identical(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
        let mut g: Vec<&String> = got.keys().collect();
        let mut w: Vec<&String> = want.keys().collect();
        g.sort();
        w.sort();
        assert_eq!(g, w, "{what}: tensor names differ");
        for (n, t) in want {
            let u = &got[n];
            assert_eq!(u.dims(), t.dims(), "{what}: {n} shape");
            assert_eq!(u.dtype(), t.dtype(), "{what}: {n} dtype");
            let bits = |x: &Tensor| -> Vec<u32> {
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
            };
            assert!(bits(u) == bits(t), "{what}: {n} values differ");
        }
    }

    #[test]
    fn sd1_fixture_round_trip() {
        let f = fixture();
        let m = convert(ldm_checkpoint(&f), "sd1-tiny.safetensors").unwrap();
        assert_eq!(m.family, ModelFamily::Sd1);
        assert_identical(&m.unet, &f.unet, "unet");
        assert_identical(&m.text_encoder, &f.text, "text encoder");
        assert_identical(&m.vae, &f.vae, "vae");
        // The training resolution is the one field the weights cannot tell.
        assert_eq!(m.unet_config, UNetConfig { sample_size: None, ..f.unet_config.clone() });
        assert_eq!(m.text_config, f.text_config);
        assert_eq!(m.vae_config, f.vae_config);
        assert_eq!(m.prediction_hint, Some(Prediction::Epsilon));
    }

    /// The whole path a user takes: a single `.safetensors` file on disk → the model → outputs
    /// equal to the diffusers folder's.
    #[test]
    fn single_file_model_runs_like_the_diffusers_folder() {
        let f = fixture();
        let dir = std::env::temp_dir().join(format!("lora-studio-single-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sd1-tiny.safetensors");
        crate::engine::io::weights::write_safetensors(&file, &ldm_checkpoint(&f), None).unwrap();
        let sd = crate::engine::pipeline::StableDiffusion::load(&file, &Device::Cpu).unwrap();
        let r = read_safetensors(&fixtures().join("sd1-tiny/reference.safetensors")).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        for (name, ours, theirs) in
            [("text_embeddings", &emb, &r["text_embeddings"]), ("noise_pred", &pred, &r["noise_pred"])]
        {
            let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{name}: {diff}");
        }
        assert_eq!(sd.tokenizer.pad_id(), crate::engine::models::tokenizer::END_OF_TEXT);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sd2_open_clip_round_trip() {
        let f = fixture();
        let mut ckpt = ldm_checkpoint(&f);
        ckpt.retain(|n, _| !n.starts_with("cond_stage_model."));
        // SD 2.x UNets use linear proj_in / proj_out.
        for (n, t) in ckpt.iter_mut() {
            if n.ends_with(".proj_in.weight") || n.ends_with(".proj_out.weight") {
                *t = t.flatten_from(1).unwrap();
            }
        }
        let (hidden, inner, layers, vocab) = (32usize, 48usize, 3usize, 100usize);
        let cpu = &Device::Cpu;
        // Distinct values everywhere, so a wrong split or a swapped tensor shows.
        let mut next = 0f32;
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| next + i as f32).collect();
            next += n as f32;
            Tensor::from_vec(v, shape.to_vec(), cpu).unwrap()
        };
        let p = "cond_stage_model.model.";
        let mut put = |k: String, v: Tensor| ckpt.insert(format!("{p}{k}"), v);
        put("token_embedding.weight".into(), t(&[vocab, hidden]));
        put("positional_embedding".into(), t(&[77, hidden]));
        put("ln_final.weight".into(), t(&[hidden]));
        put("ln_final.bias".into(), t(&[hidden]));
        put("text_projection".into(), t(&[hidden, hidden]));
        put("logit_scale".into(), Tensor::new(4.6f32, cpu).unwrap());
        put("visual.conv1.weight".into(), t(&[8, 3, 2, 2]));
        for i in 0..layers {
            let b = format!("transformer.resblocks.{i}.");
            for (k, shape) in [
                ("ln_1.weight", vec![hidden]),
                ("ln_1.bias", vec![hidden]),
                ("attn.in_proj_weight", vec![3 * hidden, hidden]),
                ("attn.in_proj_bias", vec![3 * hidden]),
                ("attn.out_proj.weight", vec![hidden, hidden]),
                ("attn.out_proj.bias", vec![hidden]),
                ("ln_2.weight", vec![hidden]),
                ("ln_2.bias", vec![hidden]),
                ("mlp.c_fc.weight", vec![inner, hidden]),
                ("mlp.c_fc.bias", vec![inner]),
                ("mlp.c_proj.weight", vec![hidden, inner]),
                ("mlp.c_proj.bias", vec![hidden]),
            ] {
                put(format!("{b}{k}"), t(&shape));
            }
        }
        let src = ckpt.clone();
        let m = convert(ckpt, "sd2-tiny.ckpt").unwrap();
        assert_eq!(m.family, ModelFamily::Sd2);
        assert!(m.unet_config.use_linear_projection);
        assert_eq!(m.unet_config.attention_head_dim, PerBlock::Each(vec![1, 2]));
        assert_eq!(m.unet["down_blocks.0.attentions.0.proj_in.weight"].dims(), &[32, 32]);
        assert_eq!(m.text_config.num_hidden_layers, layers - 1);
        assert_eq!(m.text_config.hidden_act, "gelu");
        assert_eq!(m.text_config.num_attention_heads, 4);
        assert_eq!(m.text_config.intermediate_size, inner);
        assert_eq!(m.text_config.vocab_size, vocab);
        assert_eq!(m.text_config.max_position_embeddings, 77);
        assert_eq!(m.text_encoder.len(), 4 + 16 * (layers - 1));
        assert!(!m.text_encoder.keys().any(|k| k.contains(&format!("layers.{}.", layers - 1))));

        let same = |ours: &str, theirs: Tensor| {
            let a = m.text_encoder[ours].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{ours}");
        };
        let s = |k: &str| src[&format!("{p}{k}")].clone();
        same("text_model.embeddings.position_embedding.weight", s("positional_embedding"));
        same("text_model.final_layer_norm.bias", s("ln_final.bias"));
        for i in 0..layers - 1 {
            let b = format!("transformer.resblocks.{i}.");
            let l = format!("text_model.encoder.layers.{i}.");
            for (j, x) in ["q", "k", "v"].iter().enumerate() {
                let w = s(&format!("{b}attn.in_proj_weight")).narrow(0, j * hidden, hidden).unwrap();
                same(&format!("{l}self_attn.{x}_proj.weight"), w);
                let bias = s(&format!("{b}attn.in_proj_bias")).narrow(0, j * hidden, hidden).unwrap();
                same(&format!("{l}self_attn.{x}_proj.bias"), bias);
            }
            same(&format!("{l}self_attn.out_proj.weight"), s(&format!("{b}attn.out_proj.weight")));
            same(&format!("{l}layer_norm1.weight"), s(&format!("{b}ln_1.weight")));
            same(&format!("{l}layer_norm2.bias"), s(&format!("{b}ln_2.bias")));
            same(&format!("{l}mlp.fc1.weight"), s(&format!("{b}mlp.c_fc.weight")));
            same(&format!("{l}mlp.fc2.bias"), s(&format!("{b}mlp.c_proj.bias")));
        }
        assert!(m.prediction_hint.is_some());
    }

    #[test]
    fn inpainting_unet_infers_in_channels() {
        let f = fixture();
        let mut ckpt = ldm_checkpoint(&f);
        let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
        let w = Tensor::zeros((32, 9, 3, 3), DType::F32, &Device::Cpu).unwrap();
        ckpt.insert(conv_in.into(), w);
        let m = convert(ckpt, "inpaint.safetensors").unwrap();
        assert_eq!(m.unet_config.in_channels, 9);
        assert_eq!(m.unet_config.out_channels, 4);
        assert_eq!(m.unet["conv_in.weight"].dims(), &[32, 9, 3, 3]);
    }

    fn err(names: &[&str]) -> String {
        detect(names.iter().copied()).unwrap_err().to_string()
    }

    #[test]
    fn other_model_kinds_are_refused_in_one_line() {
        let sdxl = err(&[
            "model.diffusion_model.input_blocks.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.ln_final.weight",
        ]);
        assert!(sdxl.starts_with("not supported: SDXL"), "{sdxl}");
        let sd3 = err(&["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]);
        assert!(sd3.contains("SD3"), "{sd3}");
        let flux = err(&["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]);
        assert!(flux.contains("Flux"), "{flux}");
        let none = err(&["first_stage_model.encoder.conv_in.weight"]);
        assert!(none.contains("no Stable Diffusion UNet"), "{none}");
        let no_text = err(&["model.diffusion_model.input_blocks.0.0.weight"]);
        assert!(no_text.contains("no text encoder"), "{no_text}");
        let folder = err(&["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"]);
        assert!(folder.contains("diffusers"), "{folder}");
        for e in [sdxl, sd3, flux, none, no_text, folder] {
            assert!(!e.contains('\n'));
        }
        assert_eq!(
            detect(
                ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"].into_iter()
            )
            .unwrap(),
            ModelFamily::Sd2
        );
    }

    #[test]
    fn lora_file_is_not_a_model() {
        let path = fixtures().join("sd1-tiny/lora_a_kohya.safetensors");
        let e = convert(read_safetensors(&path).unwrap(), "style.safetensors").unwrap_err().to_string();
        assert!(e.contains("this is a LoRA adapter, not a base model"), "{e}");
        assert!(e.starts_with("style.safetensors: not supported"), "{e}");
        let peft = err(&["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]);
        assert!(peft.contains("LoRA adapter"), "{peft}");
    }

    #[test]
    fn unknown_tensors_are_reported_not_dropped() {
        let f = fixture();
        let mut ckpt = ldm_checkpoint(&f);
        let cpu = &Device::Cpu;
        ckpt.insert(
            "model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor".into(),
            Tensor::ones(1, DType::F32, cpu).unwrap(),
        );
        ckpt.insert("embedding_manager.embedder.weight".into(), Tensor::ones(2, DType::F32, cpu).unwrap());
        let e = convert(ckpt, "odd.safetensors").unwrap_err().to_string();
        assert!(e.starts_with("odd.safetensors: not supported: 2 tensor(s)"), "{e}");
        assert!(e.contains("model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor"), "{e}");
        assert!(e.contains("embedding_manager.embedder.weight"), "{e}");
    }

    /// Real key names and shapes from SD 1.5 (`v1-5-pruned-emaonly`) and SD 2.1 (`v2-1_768-ema-pruned`).
    /// An empty expectation means "deliberately dropped".
    #[allow(clippy::type_complexity)]
    const SD15: &[(&str, &[usize], &[(&str, &[usize])])] = &[
        ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3], &[("conv_in.weight", &[320, 4, 3, 3])]),
        (
            "model.diffusion_model.time_embed.0.weight",
            &[1280, 320],
            &[("time_embedding.linear_1.weight", &[1280, 320])],
        ),
        ("model.diffusion_model.time_embed.2.bias", &[1280], &[("time_embedding.linear_2.bias", &[1280])]),
        (
            "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
            &[320],
            &[("down_blocks.0.resnets.0.norm1.weight", &[320])],
        ),
        (
            "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
            &[320, 1280],
            &[("down_blocks.0.resnets.0.time_emb_proj.weight", &[320, 1280])],
        ),
        (
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            &[320, 320, 1, 1],
            &[("down_blocks.0.attentions.0.proj_in.weight", &[320, 320, 1, 1])],
        ),
        (
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            &[320, 320],
            &[("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", &[320, 320])],
        ),
        (
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            &[320, 768],
            &[("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight", &[320, 768])],
        ),
        (
            "model.diffusion_model.input_blocks.3.0.op.weight",
            &[320, 320, 3, 3],
            &[("down_blocks.0.downsamplers.0.conv.weight", &[320, 320, 3, 3])],
        ),
        (
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            &[640, 320, 1, 1],
            &[("down_blocks.1.resnets.0.conv_shortcut.weight", &[640, 320, 1, 1])],
        ),
        (
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
            &[10240, 1280],
            &[("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight", &[10240, 1280])],
        ),
        (
            "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
            &[1280, 1280, 3, 3],
            &[("down_blocks.3.resnets.1.conv2.weight", &[1280, 1280, 3, 3])],
        ),
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.0.norm3.bias",
            &[1280],
            &[("mid_block.attentions.0.transformer_blocks.0.norm3.bias", &[1280])],
        ),
        (
            "model.diffusion_model.middle_block.2.in_layers.2.weight",
            &[1280, 1280, 3, 3],
            &[("mid_block.resnets.1.conv1.weight", &[1280, 1280, 3, 3])],
        ),
        (
            "model.diffusion_model.output_blocks.2.1.conv.weight",
            &[1280, 1280, 3, 3],
            &[("up_blocks.0.upsamplers.0.conv.weight", &[1280, 1280, 3, 3])],
        ),
        (
            "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
            &[1280, 2560, 1, 1],
            &[("up_blocks.1.resnets.0.conv_shortcut.weight", &[1280, 2560, 1, 1])],
        ),
        (
            "model.diffusion_model.output_blocks.5.2.conv.bias",
            &[1280],
            &[("up_blocks.1.upsamplers.0.conv.bias", &[1280])],
        ),
        (
            "model.diffusion_model.output_blocks.11.1.proj_out.weight",
            &[320, 320, 1, 1],
            &[("up_blocks.3.attentions.2.proj_out.weight", &[320, 320, 1, 1])],
        ),
        ("model.diffusion_model.out.0.weight", &[320], &[("conv_norm_out.weight", &[320])]),
        ("model.diffusion_model.out.2.weight", &[4, 320, 3, 3], &[("conv_out.weight", &[4, 320, 3, 3])]),
        (
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
            &[256, 128, 1, 1],
            &[("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", &[256, 128, 1, 1])],
        ),
        (
            "first_stage_model.encoder.down.3.block.1.conv2.weight",
            &[512, 512, 3, 3],
            &[("encoder.down_blocks.3.resnets.1.conv2.weight", &[512, 512, 3, 3])],
        ),
        (
            "first_stage_model.encoder.mid.attn_1.q.weight",
            &[512, 512, 1, 1],
            &[("encoder.mid_block.attentions.0.to_q.weight", &[512, 512])],
        ),
        (
            "first_stage_model.encoder.mid.attn_1.norm.weight",
            &[512],
            &[("encoder.mid_block.attentions.0.group_norm.weight", &[512])],
        ),
        (
            "first_stage_model.decoder.mid.attn_1.proj_out.bias",
            &[512],
            &[("decoder.mid_block.attentions.0.to_out.0.bias", &[512])],
        ),
        (
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
            &[512, 512, 3, 3],
            &[("decoder.up_blocks.0.resnets.0.conv1.weight", &[512, 512, 3, 3])],
        ),
        (
            "first_stage_model.decoder.up.1.upsample.conv.weight",
            &[256, 256, 3, 3],
            &[("decoder.up_blocks.2.upsamplers.0.conv.weight", &[256, 256, 3, 3])],
        ),
        (
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            &[128, 256, 1, 1],
            &[("decoder.up_blocks.3.resnets.0.conv_shortcut.weight", &[128, 256, 1, 1])],
        ),
        ("first_stage_model.encoder.norm_out.weight", &[512], &[("encoder.conv_norm_out.weight", &[512])]),
        ("first_stage_model.quant_conv.weight", &[8, 8, 1, 1], &[("quant_conv.weight", &[8, 8, 1, 1])]),
        (
            "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
            &[768, 768],
            &[("text_model.encoder.layers.11.self_attn.q_proj.weight", &[768, 768])],
        ),
        (
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            &[49408, 768],
            &[("text_model.embeddings.token_embedding.weight", &[49408, 768])],
        ),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", &[1, 77], &[]),
        ("model_ema.decay", &[], &[]),
        ("alphas_cumprod", &[1000], &[]),
    ];

    #[allow(clippy::type_complexity)]
    const SD21: &[(&str, &[usize], &[(&str, &[usize])])] = &[
        ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3], &[("conv_in.weight", &[320, 4, 3, 3])]),
        (
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            &[320, 320],
            &[("down_blocks.0.attentions.0.proj_in.weight", &[320, 320])],
        ),
        (
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            &[320, 1024],
            &[("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", &[320, 1024])],
        ),
        (
            "model.diffusion_model.input_blocks.3.0.op.bias",
            &[320],
            &[("down_blocks.0.downsamplers.0.conv.bias", &[320])],
        ),
        (
            "model.diffusion_model.middle_block.1.proj_out.weight",
            &[1280, 1280],
            &[("mid_block.attentions.0.proj_out.weight", &[1280, 1280])],
        ),
        (
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias",
            &[320],
            &[("up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias", &[320])],
        ),
        (
            "model.diffusion_model.output_blocks.8.2.conv.weight",
            &[640, 640, 3, 3],
            &[("up_blocks.2.upsamplers.0.conv.weight", &[640, 640, 3, 3])],
        ),
        (
            "first_stage_model.encoder.down.3.block.0.norm1.weight",
            &[512],
            &[("encoder.down_blocks.3.resnets.0.norm1.weight", &[512])],
        ),
        (
            "first_stage_model.decoder.mid.attn_1.v.weight",
            &[512, 512, 1, 1],
            &[("decoder.mid_block.attentions.0.to_v.weight", &[512, 512])],
        ),
        (
            "cond_stage_model.model.token_embedding.weight",
            &[49408, 1024],
            &[("text_model.embeddings.token_embedding.weight", &[49408, 1024])],
        ),
        (
            "cond_stage_model.model.positional_embedding",
            &[77, 1024],
            &[("text_model.embeddings.position_embedding.weight", &[77, 1024])],
        ),
        ("cond_stage_model.model.ln_final.weight", &[1024], &[("text_model.final_layer_norm.weight", &[1024])]),
        (
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            &[3072, 1024],
            &[
                ("text_model.encoder.layers.0.self_attn.q_proj.weight", &[1024, 1024]),
                ("text_model.encoder.layers.0.self_attn.k_proj.weight", &[1024, 1024]),
                ("text_model.encoder.layers.0.self_attn.v_proj.weight", &[1024, 1024]),
            ],
        ),
        (
            "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_bias",
            &[3072],
            &[
                ("text_model.encoder.layers.5.self_attn.q_proj.bias", &[1024]),
                ("text_model.encoder.layers.5.self_attn.k_proj.bias", &[1024]),
                ("text_model.encoder.layers.5.self_attn.v_proj.bias", &[1024]),
            ],
        ),
        (
            "cond_stage_model.model.transformer.resblocks.22.attn.out_proj.weight",
            &[1024, 1024],
            &[("text_model.encoder.layers.22.self_attn.out_proj.weight", &[1024, 1024])],
        ),
        (
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight",
            &[4096, 1024],
            &[("text_model.encoder.layers.22.mlp.fc1.weight", &[4096, 1024])],
        ),
        (
            "cond_stage_model.model.transformer.resblocks.10.mlp.c_proj.bias",
            &[1024],
            &[("text_model.encoder.layers.10.mlp.fc2.bias", &[1024])],
        ),
        (
            "cond_stage_model.model.transformer.resblocks.3.ln_2.weight",
            &[1024],
            &[("text_model.encoder.layers.3.layer_norm2.weight", &[1024])],
        ),
        ("cond_stage_model.model.transformer.resblocks.23.ln_1.weight", &[1024], &[]),
        ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", &[3072, 1024], &[]),
        ("cond_stage_model.model.text_projection", &[1024, 1024], &[]),
        ("cond_stage_model.model.logit_scale", &[], &[]),
    ];

    #[test]
    fn real_sd15_and_sd21_key_names() {
        for (family, table) in [(ModelFamily::Sd1, SD15), (ModelFamily::Sd2, SD21)] {
            let names = table.iter().map(|(n, _, _)| *n);
            assert_eq!(detect(names.clone()).unwrap(), family);
            let layout = Layout::from_names(family, names).unwrap();
            assert_eq!(layout.unet_layers_per_block, 2);
            assert_eq!(layout.vae_blocks, 4);
            assert_eq!(layout.open_clip_layers, if family == ModelFamily::Sd2 { 24 } else { 0 });
            for (name, shape, want) in table {
                let got: Vec<(String, Vec<usize>)> = match map_key(name, &layout) {
                    None => panic!("{name} not recognised"),
                    Some(Target::Ignore) => vec![],
                    Some(Target::Map(_, op)) => {
                        // Zero bytes of the real shape, so the reshape / split runs for real.
                        let t = Tensor::zeros(shape.to_vec(), DType::U8, &Device::Cpu).unwrap();
                        op.apply(t).unwrap().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect()
                    }
                };
                let want: Vec<(String, Vec<usize>)> = want.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
                assert_eq!(got, want, "{name}");
            }
        }
    }
}

/// The ldm names that `formats` derives for kohya files agree with this module's mapping.
#[cfg(test)]
mod ldm_names {
    use crate::engine::adapters::formats::ldm_unet_path;

    #[test]
    fn every_adaptable_unet_layer_maps_back_to_itself() {
        let dir = crate::engine::builtin::fixtures_dir().join("sd1-tiny/model");
        let mut sd = crate::engine::pipeline::StableDiffusion::load(&dir, &candle_core::Device::Cpu).unwrap();
        let layers = sd.unet.config.layers_per_block;
        let mut checked = 0;
        sd.unet.visit_layers(&mut |l| {
            let path = l.path().to_string();
            let ldm = ldm_unet_path(&path, layers).unwrap_or_else(|| panic!("{path} has an ldm name"));
            let back = [ldm.replace("{up}", "1"), ldm.replace("{up}", "2")]
                .iter()
                .filter_map(|n| super::unet_name(&format!("{n}.weight"), layers))
                .collect::<Vec<_>>();
            assert!(back.contains(&format!("{path}.weight")), "{path} → {ldm} → {back:?}");
            checked += 1;
        });
        assert!(checked > 40);
    }
}
