//! UNet2DConditionModel, mirroring diffusers' module tree and parameter names one-to-one so
//! diffusers folders load by name and adapters address layers by their diffusers path.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::Result;

/// An int or a per-block list, as diffusers configs allow for head counts.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
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

/// diffusers' `unet/config.json` (the fields SD 1.x / 2.x and SDXL use).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
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
    /// SDXL's micro-conditioning: `text_time` (the pooled text embedding and six size / crop
    /// numbers, through `add_embedding`, added to the time embedding). Any other kind is refused.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// The sinusoidal embedding width of each of the six `text_time` numbers.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// `add_embedding.linear_1`'s input width: the pooled text embedding plus 6 × `addition_time_embed_dim`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    // Features of other model families; present-and-set means "not supported", never silently ignored.
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
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid UNet config: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("block_out_channels, down_block_types and up_block_types must have the same non-zero length");
        }
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (None, _, _) => {}
            (Some("text_time"), Some(time_dim), Some(input)) if input > 6 * time_dim && time_dim > 0 => {}
            (Some("text_time"), _, _) => bail!(
                "addition_embed_type `text_time` needs addition_time_embed_dim and a projection_class_embeddings_input_dim larger than 6 × it"
            ),
            (Some(other), _, _) => bail!("not supported: added conditioning `{other}` (only SDXL's `text_time` is)"),
        }
        if self.encoder_hid_dim.is_some() {
            bail!(
                "not supported: this UNet projects its text input (encoder_hid_dim); only SD 1.x / 2.x / XL UNets load"
            );
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

use candle_core::Tensor;

use crate::engine::io::weights::{WeightMap, WeightScope};
use crate::engine::kernels::attention::attention;
use crate::engine::kernels::frozen;
use crate::engine::kernels::recompute::{GradSink, checkpointed};
use crate::engine::models::nn::{
    Conv2d, GroupNorm, LayerMut, LayerNorm, Linear, silu, timestep_embedding, upsample_nearest,
};

/// diffusers' `ResnetBlock2D` (also used by the VAE, without a time embedding).
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::GroupNorm(&mut self.norm1));
        f(LayerMut::Conv(&mut self.conv1));
        if let Some(p) = &mut self.time_emb_proj {
            f(LayerMut::Linear(p));
        }
        f(LayerMut::GroupNorm(&mut self.norm2));
        f(LayerMut::Conv(&mut self.conv2));
        if let Some(c) = &mut self.conv_shortcut {
            f(LayerMut::Conv(c));
        }
    }

    pub fn load(
        ws: &WeightScope,
        in_c: usize,
        out_c: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&ws.at("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::load(&ws.at("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::load(&ws.at("time_emb_proj"), t, out_c, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&ws.at("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::load(&ws.at("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::load(&ws.at("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(temb)?)?;
            let (b, c) = t.dims2()?;
            h = frozen::add(&h, &t.reshape((b, c, 1, 1))?)?;
        }
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// diffusers' `Attention` as used in transformer blocks: no q/k/v bias, biased output projection.
#[derive(Clone, Debug)]
pub struct CrossAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}

impl CrossAttention {
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for l in [&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out] {
            f(LayerMut::Linear(l));
        }
    }

    pub fn load(ws: &WeightScope, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&ws.at("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&ws.at("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&ws.at("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&ws.at("to_out.0"), inner, query_dim, true)?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let out =
            attention(&self.to_q.forward(x)?, &self.to_k.forward(ctx)?, &self.to_v.forward(ctx)?, self.heads, false)?;
        self.to_out.forward(&out)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm residuals.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: CrossAttention,
    pub norm2: LayerNorm,
    pub attn2: CrossAttention,
    pub norm3: LayerNorm,
    /// `ff.net.0.proj`: projects to twice the inner width, half of it the GELU gate.
    pub ff_in: Linear,
    /// `ff.net.2`.
    pub ff_out: Linear,
    pub only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::LayerNorm(&mut self.norm1));
        self.attn1.visit_layers(f);
        f(LayerMut::LayerNorm(&mut self.norm2));
        self.attn2.visit_layers(f);
        f(LayerMut::LayerNorm(&mut self.norm3));
        f(LayerMut::Linear(&mut self.ff_in));
        f(LayerMut::Linear(&mut self.ff_out));
    }

    pub fn load(ws: &WeightScope, dim: usize, context_dim: usize, heads: usize, only_cross: bool) -> Result<Self> {
        let head_dim = dim / heads;
        let inner_ff = dim * 4;
        let attn1_ctx = if only_cross { context_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::load(&ws.at("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(&ws.at("attn1"), dim, attn1_ctx, heads, head_dim)?,
            norm2: LayerNorm::load(&ws.at("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(&ws.at("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&ws.at("norm3"), dim, 1e-5)?,
            ff_in: Linear::load(&ws.at("ff.net.0.proj"), dim, inner_ff * 2, true)?,
            ff_out: Linear::load(&ws.at("ff.net.2"), inner_ff, dim, true)?,
            only_cross_attention: only_cross,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n1 = self.norm1.forward(x)?;
        let a1 = if self.only_cross_attention {
            self.attn1.forward(&n1, Some(context))?
        } else {
            self.attn1.forward(&n1, None)?
        };
        let x = (a1 + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let ff = self.ff_out.forward(&crate::engine::kernels::geglu::geglu(&h)?)?;
        Ok((ff + x)?)
    }
}

/// `proj_in` / `proj_out` are 1×1 convs in SD 1.x and linears in SD 2.x (`use_linear_projection`).
#[derive(Clone, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        match self {
            Projection::Conv(c) => f(LayerMut::Conv(c)),
            Projection::Linear(l) => f(LayerMut::Linear(l)),
        }
    }

    fn load(ws: &WeightScope, in_dim: usize, out_dim: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::load(ws, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(Conv2d::load(ws, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` (continuous input): GroupNorm, project in, transformer blocks, project out, residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::GroupNorm(&mut self.norm));
        self.proj_in.visit_layers(f);
        for b in &mut self.transformer_blocks {
            b.visit_layers(f);
        }
        self.proj_out.visit_layers(f);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ws: &WeightScope,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear: bool,
        only_cross: bool,
    ) -> Result<Self> {
        let blocks = (0..layers)
            .map(|k| {
                BasicTransformerBlock::load(
                    &ws.at("transformer_blocks").at(k),
                    channels,
                    context_dim,
                    heads,
                    only_cross,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&ws.at("norm"), groups, channels, 1e-6)?,
            proj_in: Projection::load(&ws.at("proj_in"), channels, channels, linear)?,
            transformer_blocks: blocks,
            proj_out: Projection::load(&ws.at("proj_out"), channels, channels, linear)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image =
            |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?) };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

/// A down or up block: resnets, optional attentions after each, optional resampler.
#[derive(Clone, Debug)]
pub struct UNetBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    /// `downsamplers.0.conv` (stride 2) or `upsamplers.0.conv` (after 2× nearest upsampling).
    pub resample: Option<Conv2d>,
}

/// diffusers' `UNet2DConditionModel` for SD 1.x / 2.x and SDXL.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    /// SDXL's `add_embedding` (linear_1, SiLU, linear_2) of the micro-conditioning.
    pub add_embedding: Option<(Linear, Linear)>,
    pub down_blocks: Vec<UNetBlock>,
    pub mid_resnets: Vec<ResnetBlock2D>,
    pub mid_attentions: Vec<Transformer2DModel>,
    pub up_blocks: Vec<UNetBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Gradient checkpointing of every resnet and transformer block (training only): the sink
    /// receives the gradients of the trainable weights inside them.
    pub checkpointing: Option<Arc<GradSink>>,
}

impl UNetBlock {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for (j, r) in self.resnets.iter_mut().enumerate() {
            r.visit_layers(f);
            if let Some(a) = self.attentions.get_mut(j) {
                a.visit_layers(f);
            }
        }
        if let Some(c) = &mut self.resample {
            f(LayerMut::Conv(c));
        }
    }
}

impl UNet2DConditionModel {
    /// `visit_layers` for work that can fail: stops at the first error and returns it.
    pub fn try_visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>) -> Result<()>) -> Result<()> {
        let mut first = super::nn::FirstError::default();
        self.visit_layers(&mut |l| first.run(|| f(l)));
        first.into_result()
    }

    /// Every linear, conv and norm layer, in module order, for attaching adapters.
    pub fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::Conv(&mut self.conv_in));
        f(LayerMut::Linear(&mut self.time_linear_1));
        f(LayerMut::Linear(&mut self.time_linear_2));
        if let Some((l1, l2)) = &mut self.add_embedding {
            f(LayerMut::Linear(l1));
            f(LayerMut::Linear(l2));
        }
        for b in &mut self.down_blocks {
            b.visit_layers(f);
        }
        self.mid_resnets[0].visit_layers(f);
        for a in &mut self.mid_attentions {
            a.visit_layers(f);
        }
        for r in &mut self.mid_resnets[1..] {
            r.visit_layers(f);
        }
        for b in &mut self.up_blocks {
            b.visit_layers(f);
        }
        f(LayerMut::GroupNorm(&mut self.conv_norm_out));
        f(LayerMut::Conv(&mut self.conv_out));
    }

    pub fn load(config: &UNetConfig, weights: &WeightMap) -> Result<Self> {
        config.validate()?;
        let ws = weights.root();
        let boc = &config.block_out_channels;
        let n = boc.len();
        let temb = boc[0] * 4;
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let ctx = config.cross_attention_dim;
        let linear = config.use_linear_projection;
        let only_cross = config.only_cross_attention;
        let lpb = config.layers_per_block;

        // The transformer at down-block level `level` (up blocks and the mid block reuse the levels).
        let transformer = |scope: &WeightScope, channels: usize, level: usize| -> Result<Transformer2DModel> {
            let layers = config.transformer_layers_per_block.for_block(level, n)?;
            Transformer2DModel::load(scope, channels, config.heads(level)?, layers, ctx, groups, linear, only_cross)
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, &block_c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = block_c;
            let bs = ws.at("down_blocks").at(i);
            let cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(&bs.at("resnets").at(j), rin, out_c, Some(temb), groups, eps)?);
                if cross {
                    attentions.push(transformer(&bs.at("attentions").at(j), out_c, i)?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::load(&bs.at("downsamplers.0.conv"), out_c, out_c, 3, 2, config.downsample_padding)?)
            } else {
                None
            };
            down_blocks.push(UNetBlock { resnets, attentions, resample });
        }

        let mid_c = boc[n - 1];
        let ms = ws.at("mid_block");
        let mid_resnets = vec![
            ResnetBlock2D::load(&ms.at("resnets.0"), mid_c, mid_c, Some(temb), groups, eps)?,
            ResnetBlock2D::load(&ms.at("resnets.1"), mid_c, mid_c, Some(temb), groups, eps)?,
        ];
        let mid_attentions = vec![transformer(&ms.at("attentions.0"), mid_c, n - 1)?];

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = boc[n - 1];
        for i in 0..n {
            let rev = n - 1 - i;
            let prev_out = out_c;
            out_c = boc[rev];
            let in_c = boc[rev.saturating_sub(1)];
            let bs = ws.at("up_blocks").at(i);
            let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=lpb {
                let skip_c = if j == lpb { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    &bs.at("resnets").at(j),
                    rin + skip_c,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross {
                    attentions.push(transformer(&bs.at("attentions").at(j), out_c, rev)?);
                }
            }
            let resample =
                if i + 1 < n { Some(Conv2d::load(&bs.at("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            up_blocks.push(UNetBlock { resnets, attentions, resample });
        }

        Ok(Self {
            config: config.clone(),
            conv_in: Conv2d::load(&ws.at("conv_in"), config.in_channels, boc[0], 3, 1, 1)?,
            time_linear_1: Linear::load(&ws.at("time_embedding.linear_1"), boc[0], temb, true)?,
            time_linear_2: Linear::load(&ws.at("time_embedding.linear_2"), temb, temb, true)?,
            add_embedding: match config
                .projection_class_embeddings_input_dim
                .filter(|_| config.addition_embed_type.is_some())
            {
                Some(input) => Some((
                    Linear::load(&ws.at("add_embedding.linear_1"), input, temb, true)?,
                    Linear::load(&ws.at("add_embedding.linear_2"), temb, temb, true)?,
                )),
                None => None,
            },
            down_blocks,
            mid_resnets,
            mid_attentions,
            up_blocks,
            conv_norm_out: GroupNorm::load(&ws.at("conv_norm_out"), groups, boc[0], eps)?,
            conv_out: Conv2d::load(&ws.at("conv_out"), boc[0], config.out_channels, 3, 1, 1)?,
            checkpointing: None,
        })
    }

    /// Predicts noise (or v) for `sample` (B, C, H, W) at `timesteps` (B or 1 values) given text
    /// embeddings `context` (B, tokens, cross_attention_dim). An SDXL UNet needs `forward_with`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None)
    }

    /// Whether the UNet takes SDXL's micro-conditioning (`forward_with`'s `added`).
    pub fn takes_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// As `forward`, with SDXL's micro-conditioning `added`: the pooled text embedding (B, pooled)
    /// and the six numbers per image (B, 6: original height and width, crop top and left, target
    /// height and width), as diffusers' `added_cond_kwargs` `text_embeds` and `time_ids`.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let dtype = sample.dtype();
        let t = if timesteps.elem_count() == 1 {
            timesteps.reshape(1)?.broadcast_as(b)?.contiguous()?
        } else {
            timesteps.clone()
        };
        let t_emb = timestep_embedding(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            dtype,
        )?;
        let mut temb = self.time_linear_2.forward(&silu(&self.time_linear_1.forward(&t_emb)?)?)?;
        match (&self.add_embedding, added) {
            (Some((l1, l2)), Some((text_embeds, time_ids))) => {
                let dim = self.config.addition_time_embed_dim.expect("validated with add_embedding");
                let time = timestep_embedding(
                    &time_ids.flatten_all()?,
                    dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                    dtype,
                )?
                .reshape((b, ()))?;
                let add = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &time], 1)?;
                temb = (temb + l2.forward(&silu(&l1.forward(&add)?)?)?)?;
            }
            (Some(_), None) => {
                bail!("this UNet (SDXL) needs its micro-conditioning: a pooled text embedding and six size numbers")
            }
            (None, Some(_)) => bail!("this UNet takes no micro-conditioning (it is not an SDXL UNet)"),
            (None, None) => {}
        }
        let temb = temb;

        // Each block directly, or checkpointed (its activations recomputed in the backward pass).
        let run_resnet = |r: &ResnetBlock2D, x: &Tensor| -> Result<Tensor> {
            match &self.checkpointing {
                Some(sink) => {
                    let r = r.clone();
                    checkpointed(Arc::new(move |x, t| r.forward(x, Some(t))), x, &temb, sink)
                }
                None => r.forward(x, Some(&temb)),
            }
        };
        let run_attention = |a: &Transformer2DModel, x: &Tensor| -> Result<Tensor> {
            match &self.checkpointing {
                Some(sink) => {
                    let a = a.clone();
                    checkpointed(Arc::new(move |x, c| a.forward(x, c)), x, context, sink)
                }
                None => a.forward(x, context),
            }
        };

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = run_resnet(resnet, &h)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = run_attention(attn, &h)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.resample {
                h = downsample(down, &h)?;
                skips.push(h.clone());
            }
        }

        h = run_resnet(&self.mid_resnets[0], &h)?;
        for (attn, resnet) in self.mid_attentions.iter().zip(&self.mid_resnets[1..]) {
            h = run_attention(attn, &h)?;
            h = run_resnet(resnet, &h)?;
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip connection per up-block resnet");
                h = run_resnet(resnet, &Tensor::cat(&[&h, &skip], 1)?)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = run_attention(attn, &h)?;
                }
            }
            if let Some(up) = &block.resample {
                // Match the next skip's size so latents not divisible by 2ⁿ still line up.
                let (th, tw) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (h.dim(2)? * 2, h.dim(3)? * 2),
                };
                h = up.forward(&upsample_nearest(&h, th, tw)?)?;
            }
        }
        self.conv_out.forward(&silu(&self.conv_norm_out.forward(&h)?)?)
    }
}

/// diffusers' `Downsample2D`: stride-2 conv; padding 0 means "pad right and bottom by one".
pub fn downsample(conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    if conv.padding == 0 {
        let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        conv.forward(&x)
    } else {
        conv.forward(x)
    }
}
