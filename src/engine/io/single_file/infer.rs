//! What a diffusers folder's config files would say, read back from a converted checkpoint's
//! tensor names and shapes: the UNet, text encoder and VAE configs, and the prediction type hint.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, anyhow, bail};
use candle_core::{DType, Tensor};

use super::{Layout, ModelFamily, index_after};
use crate::engine::Result;
use crate::engine::diffusion::schedule::Prediction;
use crate::engine::models::clip::ClipConfig;
use crate::engine::models::unet::{PerBlock, UNetConfig};
use crate::engine::models::vae::VaeConfig;

/// Reads what the file itself suggests about the prediction type, before the tensors are renamed.
pub(super) fn prediction_hint(tensors: &HashMap<String, Tensor>, layout: &Layout) -> Result<Option<Prediction>> {
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

/// GroupNorm's group count is not stored in any weight. Every published SD 1.x / 2.x / SDXL model uses
/// 32 (and has ≥ 128 channels per block); tiny test models (ours included) conventionally use 8.
fn norm_groups(min_block: usize, norm_sizes: &[usize]) -> usize {
    if min_block >= 128 && norm_sizes.iter().all(|c| c % 32 == 0) {
        return 32;
    }
    [8, 4, 2, 1].into_iter().find(|g| norm_sizes.iter().all(|c| c % g == 0)).unwrap_or(1)
}

/// `pooled_width`: SDXL's pooled text embedding width (the second encoder's projection), which with
/// `add_embedding`'s input width gives the size embeddings' width.
pub(super) fn infer_unet(
    unet: &HashMap<String, Tensor>,
    family: ModelFamily,
    pooled_width: Option<usize>,
) -> Result<UNetConfig> {
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
    // Transformer layers per level (SDXL: 1, 2, 10), the same in a level's every attention block,
    // its up block's and (the last level's) the mid block's.
    let layers_in = |block: &str| {
        agreed(
            unet.keys().filter_map(|n| {
                let base = n.strip_prefix(block)?.strip_suffix(".proj_in.weight")?;
                let base = format!("{block}{base}");
                Some(count(unet, &format!("{base}.transformer_blocks."), ".norm1.weight"))
            }),
            "transformer_layers_per_block",
        )
    };
    let mut per_level = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let down = layers_in(&format!("down_blocks.{i}."))?;
        let up = layers_in(&format!("up_blocks.{}.", blocks - 1 - i))?;
        if let (Some(d), Some(u)) = (down, up)
            && d != u
        {
            bail!("not supported: {d} transformer layers in down block {i} but {u} in its up block");
        }
        per_level.push(down.or(up));
    }
    let mid = layers_in("mid_block.")?;
    if let (Some(m), Some(Some(last))) = (mid, per_level.last())
        && m != *last
    {
        bail!("not supported: {m} transformer layers in the mid block but {last} in the last level");
    }
    // Levels without attention take their neighbours' value (diffusers' configs list one per level).
    let fill = per_level.iter().flatten().next().copied().or(mid).unwrap_or(1);
    let per_level: Vec<usize> = per_level.into_iter().map(|l| l.unwrap_or(fill)).collect();
    let transformer_layers_per_block = if per_level.iter().all(|&l| l == per_level[0]) {
        PerBlock::One(per_level[0])
    } else {
        PerBlock::Each(per_level)
    };
    let add_embedding = match unet.get("add_embedding.linear_1.weight").map(|t| t.dims().to_vec()) {
        Some(d) if d.len() == 2 => {
            let pooled =
                pooled_width.context("the UNet has a size embedding (`label_emb`) but no pooled text embedding")?;
            let time = d[1].checked_sub(pooled).filter(|t| t % 6 == 0 && *t > 0).with_context(|| {
                format!("the size embedding takes {} inputs, which is not {pooled} (pooled) + 6 × a width", d[1])
            })?;
            Some((d[1], time / 6))
        }
        Some(d) => bail!("`add_embedding.linear_1.weight` has shape {d:?}, expected 2-D"),
        None => None,
    };

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
        ModelFamily::Sd2 | ModelFamily::Sdxl => {
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
        transformer_layers_per_block,
        only_cross_attention: false,
        // The training resolution is not recorded in the weights; SDXL's is 1024 px.
        sample_size: (family == ModelFamily::Sdxl).then_some(128),
        addition_embed_type: add_embedding.map(|_| "text_time".to_string()),
        addition_time_embed_dim: add_embedding.map(|(_, time)| time),
        projection_class_embeddings_input_dim: add_embedding.map(|(input, _)| input),
        class_embed_type: None,
        time_cond_proj_dim: None,
        encoder_hid_dim: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `hidden_act`: `quick_gelu` for OpenAI CLIP, `gelu` for OpenCLIP (not in the weights).
pub(super) fn infer_text(te: &HashMap<String, Tensor>, hidden_act: &str) -> Result<ClipConfig> {
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
        hidden_act: hidden_act.into(),
        layer_norm_eps: 1e-5,
        eos_token_id: crate::engine::models::tokenizer::END_OF_TEXT,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub(super) fn infer_vae(vae: &HashMap<String, Tensor>, family: ModelFamily) -> Result<VaeConfig> {
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
        // Every SD 1.x / 2.x VAE was trained with 0.18215 as its latent scale, SDXL's with
        // 0.13025; it is not stored in the file.
        scaling_factor: if family == ModelFamily::Sdxl { 0.13025 } else { 0.18215 },
        use_quant_conv: vae.contains_key("quant_conv.weight"),
        use_post_quant_conv: vae.contains_key("post_quant_conv.weight"),
        mid_block_add_attention: vae.contains_key("encoder.mid_block.attentions.0.to_q.weight"),
    };
    cfg.validate()?;
    Ok(cfg)
}
