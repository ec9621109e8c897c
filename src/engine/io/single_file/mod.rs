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
mod tests;
