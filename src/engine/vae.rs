//! AutoencoderKL: encodes images to latent means and decodes latents back to images, with
//! diffusers' parameter names. Forward only in practice, but built from the same layers as the UNet.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::Result;

/// diffusers' `vae/config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_three() -> usize {
    3
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid VAE config: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            bail!("block_out_channels is empty");
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                bail!("block_out_channels {c} is not divisible by norm_num_groups {}", self.norm_num_groups);
            }
        }
        Ok(())
    }

    /// Image pixels per latent pixel along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
