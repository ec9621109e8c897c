//! How each original-layout (ldm) tensor name becomes the diffusers / transformers name our
//! models use: the UNet map (shared with kohya adapters' ldm-named keys), the VAE, CLIP and
//! OpenCLIP renamings, and the tensors a checkpoint may carry that no component needs.

use anyhow::bail;
use candle_core::Tensor;

use super::Layout;
use crate::engine::Result;

pub(super) const UNET: &str = "model.diffusion_model.";
pub(super) const VAE: &str = "first_stage_model.";
pub(super) const CLIP: &str = "cond_stage_model.transformer.";
pub(super) const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL (SGM layout): CLIP ViT-L in transformers' naming, and OpenCLIP ViT-bigG.
pub(super) const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
pub(super) const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Unet,
    Text,
    /// SDXL's second text encoder.
    Text2,
    Vae,
}

/// How one input tensor becomes zero or more output tensors.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Op {
    Copy(String),
    /// ldm stores the VAE attention projections as 1×1 convs; diffusers uses linears.
    Squeeze1x1(String),
    /// OpenCLIP packs q, k, v into one `in_proj` (rows in that order); transformers splits them.
    SplitQkv([String; 3]),
    /// OpenCLIP's `text_projection` is applied as `x @ P` (hidden, projection); transformers'
    /// linear stores its transpose.
    Transpose(String),
}

impl Op {
    pub(super) fn apply(self, t: Tensor) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            Op::Copy(n) => vec![(n, t)],
            Op::Transpose(n) => match t.rank() {
                2 => vec![(n, t.t()?.contiguous()?)],
                _ => bail!("expected a 2-D projection, found shape {:?}", t.dims()),
            },
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
pub(super) enum Target {
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
    // SGM's (SDXL) discretised noise schedule.
    "denoiser.sigmas",
    "denoiser.log_sigmas",
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
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    // SDXL's OpenCLIP: the contrastive temperature and the causal mask (rebuilt).
    "conditioner.embedders.1.model.logit_scale",
    "conditioner.embedders.1.model.attn_mask",
];
const IGNORED_PREFIXES: &[&str] = &[
    "model_ema.",
    "cond_stage_model.model.visual.",
    // The VAE's training loss (LPIPS + discriminator), shipped by some merges.
    "first_stage_model.loss.",
];

/// The diffusers name(s) for one ldm tensor name; `None` when the name is not recognised.
pub(super) fn map_key(name: &str, layout: &Layout) -> Option<Target> {
    if IGNORED.contains(&name) || IGNORED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some(Target::Ignore);
    }
    if let Some(rest) = name.strip_prefix(UNET) {
        return unet_param(rest, layout.unet_layers_per_block).map(|n| Target::Map(Part::Unet, Op::Copy(n)));
    }
    if let Some(rest) = name.strip_prefix(VAE) {
        return vae_name(rest, layout.vae_blocks).map(|op| Target::Map(Part::Vae, op));
    }
    for (prefix, part) in [(CLIP, Part::Text), (SDXL_CLIP, Part::Text)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            // Older transformers versions saved CLIPTextModel without the `text_model.` level.
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            return clip_name(rest).map(|n| Target::Map(part, Op::Copy(format!("text_model.{n}"))));
        }
    }
    if let Some(rest) = name.strip_prefix(OPEN_CLIP) {
        // SD 2.x reads the penultimate layer, so the last one never runs (diffusers drops it too).
        return open_clip_name(rest, Part::Text, Some(layout.open_clip_layers));
    }
    if let Some(rest) = name.strip_prefix(SDXL_OPEN_CLIP) {
        // SDXL's pooled embedding is the last layer's, final-normed and projected: all are kept.
        if rest == "text_projection" {
            return Some(Target::Map(Part::Text2, Op::Transpose("text_projection.weight".into())));
        }
        return open_clip_name(rest, Part::Text2, None);
    }
    None
}

/// Splits `"<prefix><number>.<rest>"` into the number and the rest.
pub(super) fn index_after<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    index_after_sep(name, prefix.strip_suffix('.')?, '.')
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
pub(super) fn unet_param(rest: &str, layers: usize) -> Option<String> {
    let module = param_module(rest)?;
    unet_module(module, '.', layers).map(|m| format!("{m}{}", &rest[module.len()..]))
}

/// The one map between the two UNet layouts: an original (ldm) module path, below
/// `model.diffusion_model.`, to its diffusers module path (always dotted). Single-file checkpoints
/// name parameters this way with `sep` `.`; kohya / ComfyUI adapters flatten the same path with `_`
/// (`lora_unet_input_blocks_1_1_proj_in`), and are read with `sep` `_`.
pub(crate) fn unet_module(ldm: &str, sep: char, layers: usize) -> Option<String> {
    const TOP: &[(&str, &str)] = &[
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        // SDXL's micro-conditioning embedding.
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ];
    if let Some(n) = lookup(TOP, ldm, sep) {
        return Some(n);
    }
    // Each down block is `layers` resnet(+attention) entries, then one downsampler entry.
    if let Some((k, sub)) = index_after_sep(ldm, "input_blocks", sep) {
        let (block, j) = ((k.checked_sub(1)?) / (layers + 1), (k - 1) % (layers + 1));
        if j == layers {
            return lookup(&[("0.op", "conv")], sub, sep).map(|c| format!("down_blocks.{block}.downsamplers.0.{c}"));
        }
        return block_member(sub, sep, &format!("down_blocks.{block}"), j, false);
    }
    if let Some((m, sub)) = index_after_sep(ldm, "middle_block", sep) {
        return match m {
            0 => resnet(sub, sep).map(|s| format!("mid_block.resnets.0.{s}")),
            1 => attention(sub, sep).map(|s| format!("mid_block.attentions.0.{s}")),
            2 => resnet(sub, sep).map(|s| format!("mid_block.resnets.1.{s}")),
            _ => None,
        };
    }
    // Up blocks have one resnet more than down blocks; the last entry also holds the upsampler.
    if let Some((k, sub)) = index_after_sep(ldm, "output_blocks", sep) {
        let (block, j) = (k / (layers + 1), k % (layers + 1));
        return block_member(sub, sep, &format!("up_blocks.{block}"), j, j == layers);
    }
    None
}

/// `"<m><sep><module>"` inside one flat ldm block entry: 0 is the resnet, then attention and/or upsampler.
fn block_member(sub: &str, sep: char, block: &str, j: usize, may_upsample: bool) -> Option<String> {
    let (m, module) = sub.split_once(sep)?;
    // An entry without attention puts its upsampler at index 1; its only module is `conv`.
    let upsampler = || (may_upsample && module == "conv").then(|| format!("{block}.upsamplers.0.conv"));
    match m {
        "0" => resnet(module, sep).map(|s| format!("{block}.resnets.{j}.{s}")),
        "1" if module == "conv" => upsampler(),
        "1" => attention(module, sep).map(|s| format!("{block}.attentions.{j}.{s}")),
        "2" => upsampler(),
        _ => None,
    }
}

fn resnet(module: &str, sep: char) -> Option<String> {
    const RESNET: &[(&str, &str)] = &[
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    lookup(RESNET, module, sep)
}

/// SpatialTransformer modules already carry diffusers' names; only known ones are accepted.
fn attention(module: &str, sep: char) -> Option<String> {
    const OUTER: &[&str] = &["norm", "proj_in", "proj_out"];
    const INNER: &[&str] = &[
        "norm1",
        "norm2",
        "norm3",
        "ff.net.0.proj",
        "ff.net.2",
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    ];
    let spelled = |name: &str| name.replace('.', &sep.to_string());
    if let Some(outer) = OUTER.iter().find(|n| spelled(n) == module) {
        return Some(outer.to_string());
    }
    let (i, inner) = index_after_sep(module, "transformer_blocks", sep)?;
    INNER.iter().find(|n| spelled(n) == inner).map(|n| format!("transformer_blocks.{i}.{n}"))
}

/// The table's right side for the entry whose left side, spelled with `sep`, is `name`.
fn lookup(table: &[(&str, &str)], name: &str, sep: char) -> Option<String> {
    let sep = sep.to_string();
    table.iter().find(|(from, _)| from.replace('.', &sep) == name).map(|(_, to)| to.to_string())
}

/// Splits `"<head><sep><number><sep><rest>"` into the number and the rest.
fn index_after_sep<'a>(name: &'a str, head: &str, sep: char) -> Option<(usize, &'a str)> {
    let tail = name.strip_prefix(head)?.strip_prefix(sep)?;
    let (num, rest) = tail.split_once(sep)?;
    Some((num.parse().ok()?, rest))
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

/// An OpenCLIP text-tower name in transformers' naming, for `part`. With `drop_last_of` (the
/// tower's layer count), its last layer is ignored: SD 2.x never runs it.
fn open_clip_name(rest: &str, part: Part, drop_last_of: Option<usize>) -> Option<Target> {
    let text = |n: String| Some(Target::Map(part, Op::Copy(format!("text_model.{n}"))));
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
    Some(if drop_last_of == Some(i + 1) { Target::Ignore } else { Target::Map(part, op) })
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
