//! UNet2DConditionModel, mirroring diffusers' module tree and parameter names one-to-one so
//! diffusers folders load by name and adapters address layers by their diffusers path.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::Result;

/// An int or a per-block list, as diffusers configs allow for head counts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn for_block(&self, i: usize, blocks: usize) -> Result<usize> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) if v.len() == blocks => Ok(v[i]),
            PerBlock::Each(v) => bail!("per-block list has {} entries for {blocks} blocks", v.len()),
        }
    }
}

/// diffusers' `unet/config.json` (the fields SD 1.x / 2.x use).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// diffusers' historical misnomer: when `num_attention_heads` is absent this is the head count.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    // Features of other model families; present-and-set means "not supported", never silently ignored.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
}

fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_transformer_layers() -> PerBlock {
    PerBlock::One(1)
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid UNet config: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("block_out_channels, down_block_types and up_block_types must have the same non-zero length");
        }
        if self.addition_embed_type.is_some() || self.encoder_hid_dim.is_some() {
            bail!("not supported: this UNet has added conditioning (SDXL or another family); only SD 1.x / 2.x UNets load");
        }
        if self.class_embed_type.is_some() || self.time_cond_proj_dim.is_some() {
            bail!("not supported: class or time-condition embeddings (upscaler / LCM UNets)");
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("not supported: down block type {t}");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("not supported: up block type {t}");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => bail!("not supported: mid block type {t}"),
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                bail!("block_out_channels {c} is not divisible by norm_num_groups {}", self.norm_num_groups);
            }
        }
        for i in 0..n {
            self.heads(i)?;
            self.transformer_layers_per_block.for_block(i, n)?;
        }
        Ok(())
    }

    /// Attention heads in down block `i` (up blocks use the reversed list).
    pub fn heads(&self, i: usize) -> Result<usize> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.for_block(i, n),
            None => self.attention_head_dim.for_block(i, n),
        }
    }
}
