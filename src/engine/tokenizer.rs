//! CLIP's byte-pair tokenizer (vocabulary embedded by `instant-clip-tokenizer`, nothing is
//! downloaded): prompts become exactly 77 ids, start and end marked, padded per model family.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use instant_clip_tokenizer::{Token, Tokenizer};

use super::Result;

/// Tokens the text encoder sees, including start and end markers.
pub const CONTEXT_LENGTH: usize = 77;
pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;

/// Building the merge table takes a moment; every model shares one.
fn shared_tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER.get_or_init(|| Arc::new(Tokenizer::new())).clone()
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Tokenizer>,
    /// SD 1.x pads with `<|endoftext|>` (49407), SD 2.x with `!` (id 0).
    pub pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("pad_id", &self.pad_id).finish()
    }
}

impl ClipTokenizer {
    pub fn with_pad_id(pad_id: u32) -> Self {
        Self { inner: shared_tokenizer(), pad_id }
    }

    /// Reads the padding token from a diffusers `tokenizer/` folder's `tokenizer_config.json`
    /// (or `special_tokens_map.json`); without either, SD 1.x's `<|endoftext|>`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
            // `pad_token` is either a string or `{"content": "…"}`.
            let pad = json.get("pad_token").and_then(|p| p.as_str().or_else(|| p.get("content")?.as_str()));
            if let Some(pad) = pad {
                return Ok(Self::with_pad_id(if pad == "!" { 0 } else { END_OF_TEXT }));
            }
        }
        Ok(Self::with_pad_id(END_OF_TEXT))
    }

    /// The prompt's BPE tokens, without start/end markers or truncation.
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        let mut out: Vec<Token> = Vec::new();
        self.inner.encode(text, &mut out);
        out.into_iter().map(|t| t.to_u16() as u32).collect()
    }

    /// How many tokens a caption uses; more than 75 are cut off when encoding.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokens(text).len()
    }

    /// Exactly 77 ids: start, up to 75 prompt tokens, end, padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(START_OF_TEXT);
        ids.extend(self.tokens(text).into_iter().take(CONTEXT_LENGTH - 2));
        ids.push(END_OF_TEXT);
        ids.resize(CONTEXT_LENGTH, self.pad_id);
        ids
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Vec<u32> {
        texts.iter().flat_map(|t| self.encode(t)).collect()
    }
}
