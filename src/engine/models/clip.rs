//! CLIPTextModel (the Stable Diffusion text encoder) and CLIPTextModelWithProjection (SDXL's second
//! one, whose projected end-of-text state is the pooled embedding), with transformers' parameter
//! names (`text_model.encoder.layers.N.self_attn.q_proj.weight`, …). Differentiable end to end.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::Result;

/// transformers' `text_encoder/config.json` (CLIPTextConfig).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
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
    /// The end-of-text id whose position is pooled (transformers reads the first one; the legacy
    /// value 2 of old configs means "the highest id", which end-of-text is).
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_eos() -> u32 {
    crate::engine::models::tokenizer::END_OF_TEXT
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
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        match self.hidden_act.as_str() {
            "quick_gelu" | "gelu" => Ok(()),
            other => bail!("not supported: text encoder activation {other}"),
        }
    }
}

use candle_core::{DType, Tensor};

use crate::engine::io::weights::{WeightMap, WeightScope};
use crate::engine::kernels::attention::attention;
use crate::engine::models::nn::{LayerMut, LayerNorm, Linear, quick_gelu};

#[derive(Clone, Debug)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl ClipEncoderLayer {
    fn load(ws: &WeightScope, c: &ClipConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let attn = ws.at("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(&ws.at("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&attn.at("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.at("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.at("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.at("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&ws.at("layer_norm2"), d, eps)?,
            fc1: Linear::load(&ws.at("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::load(&ws.at("mlp.fc2"), c.intermediate_size, d, true)?,
        })
    }
}

/// transformers' `CLIPTextModel`, returning `last_hidden_state` (after the final layer norm).
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub config: ClipConfig,
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (projection_dim, hidden), no bias: present in CLIPTextModelWithProjection.
    pub text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Every linear layer, in module order, for attaching adapters.
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for l in &mut self.layers {
            f(LayerMut::LayerNorm(&mut l.layer_norm1));
            for lin in [&mut l.q_proj, &mut l.k_proj, &mut l.v_proj, &mut l.out_proj, &mut l.fc1, &mut l.fc2] {
                f(LayerMut::Linear(lin));
            }
            f(LayerMut::LayerNorm(&mut l.layer_norm2));
        }
        f(LayerMut::LayerNorm(&mut self.final_layer_norm));
    }

    pub fn load(config: &ClipConfig, weights: &WeightMap) -> Result<Self> {
        config.validate()?;
        let ws = weights.root().at("text_model");
        let emb = ws.at("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&ws.at("encoder.layers").at(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            // The largest tensor of the text encoder, kept as the map keeps it (perhaps f16): only
            // the rows a prompt uses are widened.
            token_embedding: emb.get_stored("token_embedding.weight", &[config.vocab_size, config.hidden_size])?,
            position_embedding: emb
                .get("position_embedding.weight", &[config.max_position_embeddings, config.hidden_size])?,
            layers,
            final_layer_norm: LayerNorm::load(&ws.at("final_layer_norm"), config.hidden_size, config.layer_norm_eps)?,
            // CLIPTextModelWithProjection has it; every CLIP config names a projection_dim, so the
            // weights decide.
            text_projection: match weights.tensor("text_projection.weight") {
                Some(t) => {
                    Some(Linear::load(&weights.root().at("text_projection"), config.hidden_size, t.dim(0)?, false)?)
                }
                None => None,
            },
        })
    }

    /// The pooled embedding's width: the projection's output, or the hidden size without one.
    pub fn pooled_width(&self) -> usize {
        self.text_projection.as_ref().map_or(self.config.hidden_size, |p| p.out_dim())
    }

    /// `input_ids` (B, T) of integer token ids → hidden states (B, T, hidden).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_clip_skip(input_ids, 1)
    }

    /// As `forward`, stopping `clip_skip` − 1 layers before the last (A1111's "Clip skip", kohya's
    /// `--clip_skip`: 1 is the last layer, 2 the penultimate): transformers'
    /// `hidden_states[-clip_skip]`, then the final layer norm.
    pub fn forward_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if clip_skip == 0 || clip_skip > n {
            bail!("clip skip {clip_skip} is out of range: this text encoder has {n} layers (1 is the last layer)");
        }
        let (last, _) = self.run(input_ids, n + 1 - clip_skip)?;
        self.final_layer_norm.forward(&last)
    }

    /// SDXL's reading of this encoder: the penultimate hidden state (the output of every layer but
    /// the last, before the final norm: transformers' `hidden_states[-2]`, (B, T, hidden)) and the
    /// pooled embedding (B, projection_dim or hidden): the final-normed state at each row's first
    /// end-of-text token, through `text_projection` when the model has one.
    pub fn penultimate_and_pooled(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        if n < 2 {
            bail!("a text encoder with {n} layer(s) has no penultimate hidden state");
        }
        let (last, penultimate) = self.run(input_ids, n)?;
        let normed = self.final_layer_norm.forward(&last)?;
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(i, row)| {
                // As transformers: the first end-of-text token (the first token where there is
                // none); with the legacy id 2, the highest id's first position.
                let at = if self.config.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max).unwrap_or(0)
                } else {
                    row.iter().position(|&id| id == self.config.eos_token_id).unwrap_or(0)
                };
                normed.get(i)?.get(at)?.unsqueeze(0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok((penultimate.expect("two layers or more"), pooled))
    }

    /// The residual stream after the first `layers` encoder layers (no final norm), and the one
    /// before the last of them.
    fn run(&self, input_ids: &Tensor, layers: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            bail!("{t} tokens exceed the text encoder's {} positions", self.config.max_position_embeddings);
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let d = self.config.hidden_size;
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let tokens = self.token_embedding.index_select(&ids, 0)?.to_dtype(positions.dtype())?.reshape((b, t, d))?;
        let mut h = tokens.broadcast_add(&positions)?;
        let heads = self.config.num_attention_heads;
        let mut before = None;
        for layer in &self.layers[..layers] {
            before = Some(h.clone());
            let n = layer.layer_norm1.forward(&h)?;
            let a = attention(
                &layer.q_proj.forward(&n)?,
                &layer.k_proj.forward(&n)?,
                &layer.v_proj.forward(&n)?,
                heads,
                true,
            )?;
            h = (layer.out_proj.forward(&a)? + h)?;
            let n = layer.layer_norm2.forward(&h)?;
            let m = layer.fc1.forward(&n)?;
            let m = if self.config.hidden_act == "gelu" { m.gelu_erf()? } else { quick_gelu(&m)? };
            h = (layer.fc2.forward(&m)? + h)?;
        }
        // `before` is the input of the last layer run: the penultimate hidden state.
        Ok((h, before.filter(|_| layers >= 2)))
    }
}
