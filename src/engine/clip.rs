//! CLIPTextModel (the Stable Diffusion text encoder), with transformers' parameter names
//! (`text_model.encoder.layers.N.self_attn.q_proj.weight`, …). Differentiable end to end.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::Result;

/// transformers' `text_encoder/config.json` (CLIPTextConfig).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid text encoder config: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads);
        }
        match self.hidden_act.as_str() {
            "quick_gelu" | "gelu" => Ok(()),
            other => bail!("not supported: text encoder activation {other}"),
        }
    }
}
