//! Which Stable Diffusion generation a model is: decided by its text encoders, and named in the
//! words users know (and in the `ss_base_model_version` / model-spec strings adapter files carry).

/// A Stable Diffusion generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ModelFamily {
    /// OpenAI CLIP ViT-L text encoder, 768-wide cross-attention.
    Sd1,
    /// OpenCLIP ViT-H text encoder (read at its penultimate layer), 1024-wide cross-attention.
    Sd2,
    /// Two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, 768 + 1280 = 2048 wide), pooled text
    /// embedding and size micro-conditioning.
    Sdxl,
}

impl ModelFamily {
    pub fn label(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
            ModelFamily::Sdxl => "SDXL",
        }
    }

    /// The family an adapter was trained for, from its cross-attention key/value input width (the
    /// text embedding width: 768, 1024, 2048); `None` for other widths.
    pub fn from_context_width(width: usize) -> Option<Self> {
        match width {
            768 => Some(ModelFamily::Sd1),
            1024 => Some(ModelFamily::Sd2),
            2048 => Some(ModelFamily::Sdxl),
            _ => None,
        }
    }
}
