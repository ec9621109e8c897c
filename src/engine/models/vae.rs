//! AutoencoderKL: encodes images to latent means and decodes latents back to images, with
//! diffusers' parameter names. Forward only in practice, but built from the same layers as the UNet.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::Result;

/// diffusers' `vae/config.json`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
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

use candle_core::Tensor;

use crate::engine::io::weights::{WeightMap, WeightScope};
use crate::engine::kernels::attention::attention;
use crate::engine::models::nn::{Conv2d, GroupNorm, Linear, silu, upsample_nearest};
use crate::engine::models::unet::{ResnetBlock2D, downsample};

const VAE_EPS: f64 = 1e-6;

/// The single-head spatial self-attention in the VAE's mid block.
#[derive(Clone, Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl VaeAttention {
    fn load(ws: &WeightScope, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::load(&ws.at("group_norm"), groups, c, VAE_EPS)?,
            to_q: Linear::load(&ws.at("to_q"), c, c, true)?,
            to_k: Linear::load(&ws.at("to_k"), c, c, true)?,
            to_v: Linear::load(&ws.at("to_v"), c, c, true)?,
            to_out: Linear::load(&ws.at("to_out.0"), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let a = attention(&self.to_q.forward(&t)?, &self.to_k.forward(&t)?, &self.to_v.forward(&t)?, 1, false)?;
        let out = self.to_out.forward(&a)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Clone, Debug)]
pub struct VaeMidBlock {
    pub resnet0: ResnetBlock2D,
    pub attention: Option<VaeAttention>,
    pub resnet1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn load(ws: &WeightScope, c: usize, groups: usize, with_attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::load(&ws.at("resnets.0"), c, c, None, groups, VAE_EPS)?,
            attention: if with_attention { Some(VaeAttention::load(&ws.at("attentions.0"), c, groups)?) } else { None },
            resnet1: ResnetBlock2D::load(&ws.at("resnets.1"), c, c, None, groups, VAE_EPS)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

#[derive(Clone, Debug)]
pub struct VaeBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub resample: Option<Conv2d>,
}

/// diffusers' `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<VaeBlock>,
    enc_mid: VaeMidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: VaeMidBlock,
    dec_blocks: Vec<VaeBlock>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl AutoencoderKL {
    pub fn load(config: &VaeConfig, weights: &WeightMap) -> Result<Self> {
        config.validate()?;
        let ws = weights.root();
        let boc = &config.block_out_channels;
        let n = boc.len();
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let attn = config.mid_block_add_attention;

        let enc = ws.at("encoder");
        let mut enc_blocks = Vec::new();
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bs = enc.at("down_blocks").at(i);
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &bs.at("resnets").at(j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        None,
                        g,
                        VAE_EPS,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(Conv2d::load(&bs.at("downsamplers.0.conv"), out_c, out_c, 3, 2, 0)?)
            } else {
                None
            };
            enc_blocks.push(VaeBlock { resnets, resample });
        }

        let dec = ws.at("decoder");
        let mut dec_blocks = Vec::new();
        let mut out_c = boc[n - 1];
        for i in 0..n {
            let prev = out_c;
            out_c = boc[n - 1 - i];
            let bs = dec.at("up_blocks").at(i);
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &bs.at("resnets").at(j),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        None,
                        g,
                        VAE_EPS,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample =
                if i + 1 < n { Some(Conv2d::load(&bs.at("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            dec_blocks.push(VaeBlock { resnets, resample });
        }

        Ok(Self {
            config: config.clone(),
            enc_conv_in: Conv2d::load(&enc.at("conv_in"), config.in_channels, boc[0], 3, 1, 1)?,
            enc_blocks,
            enc_mid: VaeMidBlock::load(&enc.at("mid_block"), boc[n - 1], g, attn)?,
            enc_norm_out: GroupNorm::load(&enc.at("conv_norm_out"), g, boc[n - 1], VAE_EPS)?,
            enc_conv_out: Conv2d::load(&enc.at("conv_out"), boc[n - 1], 2 * lat, 3, 1, 1)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&ws.at("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(&ws.at("post_quant_conv"), lat, lat, 1, 1, 0)?)
            } else {
                None
            },
            dec_conv_in: Conv2d::load(&dec.at("conv_in"), lat, boc[n - 1], 3, 1, 1)?,
            dec_mid: VaeMidBlock::load(&dec.at("mid_block"), boc[n - 1], g, attn)?,
            dec_blocks,
            dec_norm_out: GroupNorm::load(&dec.at("conv_norm_out"), g, boc[0], VAE_EPS)?,
            dec_conv_out: Conv2d::load(&dec.at("conv_out"), boc[0], config.out_channels, 3, 1, 1)?,
        })
    }

    /// A hash of the encoder's first convolution: tells VAEs apart for latent cache keys.
    pub fn fingerprint(&self) -> Result<u64> {
        let v: Vec<f32> = self.enc_conv_in.weight().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(crate::engine::train::dataset::fnv1a(&bytes))
    }

    /// Images in [-1, 1] (B, 3, H, W) → the latent distribution's mean (B, latent, H/f, W/f),
    /// without the scaling factor.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let mut h = self.enc_conv_in.forward(images)?;
        for block in &self.enc_blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &block.resample {
                h = downsample(d, &h)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self.enc_conv_out.forward(&silu(&self.enc_norm_out.forward(&h)?)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        Ok(h.narrow(1, 0, self.config.latent_channels)?)
    }

    /// Latents (unscaled) → images, roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        h = self.dec_conv_in.forward(&h)?;
        h = self.dec_mid.forward(&h)?;
        for block in &self.dec_blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &block.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&upsample_nearest(&h, hh * 2, ww * 2)?)?;
            }
        }
        self.dec_conv_out.forward(&silu(&self.dec_norm_out.forward(&h)?)?)
    }
}
