//! CLIP's byte-pair tokenizer (`instant-clip-tokenizer` over CLIP's merge rules, which ship in
//! the binary, so nothing is downloaded): a prompt becomes exactly 77 ids, `<|startoftext|>` …
//! `<|endoftext|>` then padding, as transformers' `CLIPTokenizer` produces them for Stable
//! Diffusion. It also writes `vocab.json` / `merges.txt`, so our model folders load in transformers.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail};
use candle_core::{Device, Tensor};
use instant_clip_tokenizer::Tokenizer;

use crate::engine::Result;

/// Tokens per prompt, start and end markers included.
pub const CONTEXT_LENGTH: usize = 77;
/// Room for the prompt itself: 75 tokens.
pub const MAX_PROMPT_TOKENS: usize = CONTEXT_LENGTH - 2;
pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;
/// SD 2.x pads with `!`, id 0.
pub const EXCLAMATION: u32 = 0;

/// CLIP's merge rules: the 48 894 lines of OpenAI's `bpe_simple_vocab_16e6.txt` (MIT) that CLIP
/// uses, under the `#version: 0.2` header of transformers' `merges.txt`.
const MERGES: &str = include_str!("clip-merges.txt");
/// 256 byte tokens, the same with `</w>`, the merges, and the two markers.
pub const VOCAB_SIZE: usize = 49408;

/// Building the merge table takes a while, so every `ClipTokenizer` shares one.
fn shared() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let t = Tokenizer::with_vocabulary(std::io::Cursor::new(MERGES), VOCAB_SIZE as u16);
            Arc::new(t.expect("the bundled merge rules are valid"))
        })
        .clone()
}

/// CLIP's vocabulary in id order, as OpenAI builds it: the byte alphabet (printable bytes first,
/// then the rest mapped above U+0100), the same with `</w>`, each merge's result, the markers.
fn vocabulary() -> Vec<String> {
    let printable: Vec<u32> = (0x21..=0x7e).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut alphabet: Vec<char> = printable.iter().filter_map(|&b| char::from_u32(b)).collect();
    alphabet.extend(
        (0..256u32).filter(|b| !printable.contains(b)).enumerate().filter_map(|(n, _)| char::from_u32(256 + n as u32)),
    );
    let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    vocab.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    vocab.extend(MERGES.lines().skip(1).take(VOCAB_SIZE - 514).map(|l| l.replace(' ', "")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    vocab
}

/// Writes `vocab.json` and `merges.txt` into `dir`, the files transformers' `CLIPTokenizer` reads.
pub fn write_vocabulary(dir: &Path, write: impl Fn(&Path, &[u8]) -> Result<()>) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> =
        vocabulary().into_iter().enumerate().map(|(id, token)| (token, id.into())).collect();
    write(&dir.join("vocab.json"), serde_json::to_string(&map)?.as_bytes())?;
    write(&dir.join("merges.txt"), MERGES.as_bytes())
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Tokenizer>,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("pad_id", &self.pad_id).finish()
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClipTokenizer {
    /// SD 1.x behaviour: padding with `<|endoftext|>`.
    pub fn new() -> Self {
        Self::with_pad_id(END_OF_TEXT)
    }

    pub fn with_pad_id(pad_id: u32) -> Self {
        Self { inner: shared(), pad_id }
    }

    /// Takes the padding token from a diffusers `tokenizer/` folder's `tokenizer_config.json`
    /// (`"<|endoftext|>"` in SD 1.x, `"!"` in SD 2.x). Without that file, SD 1.x padding.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::new());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
        // Older files spell tokens as {"content": "…", "__type": "AddedToken", …}.
        let pad = match json.get("pad_token") {
            None | Some(serde_json::Value::Null) => return Ok(Self::new()),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                Some(s) => s.to_string(),
                None => bail!("{}: pad_token is neither a string nor {{\"content\": …}}", path.display()),
            },
        };
        let id = match pad.as_str() {
            "<|endoftext|>" => END_OF_TEXT,
            "<|startoftext|>" => START_OF_TEXT,
            "!" => EXCLAMATION,
            other => lookup_vocab(&dir.join("vocab.json"), other).map_err(|e| anyhow!("{}: {e}", path.display()))?,
        };
        Ok(Self::with_pad_id(id))
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The prompt's own tokens, no markers, not truncated.
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // transformers treats the literal special tokens in a prompt as those tokens.
        let mut rest = text;
        while !rest.is_empty() {
            let next = ["<|startoftext|>", "<|endoftext|>"]
                .iter()
                .zip([START_OF_TEXT, END_OF_TEXT])
                .filter_map(|(m, id)| rest.find(m).map(|at| (at, m.len(), id)))
                .min_by_key(|&(at, _, _)| at);
            match next {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// BPE of text without special tokens. The crate turns `<start_of_text>`/`<end_of_text>` (its own
    /// spelling) into markers, which transformers does not; cutting the text right after such a
    /// `<` gives transformers' words, since a letter ends a punctuation run anyway.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let lower = text.to_lowercase();
        let mut rest = lower.as_str();
        let mut buf = Vec::new();
        loop {
            let cut = ["<start_of_text>", "<end_of_text>"].iter().filter_map(|m| rest.find(m)).min();
            let (piece, tail) = match cut {
                Some(at) => rest.split_at(at + 1),
                None => (rest, ""),
            };
            buf.clear();
            self.inner.encode(piece, &mut buf);
            out.extend(buf.iter().map(|t| u32::from(t.to_u16())));
            if tail.is_empty() {
                break;
            }
            rest = tail;
        }
    }

    /// How many tokens the prompt takes; over `MAX_PROMPT_TOKENS` `encode` cuts the rest off
    /// (generation reads on in chunks instead: `prompt::PromptTokens`).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokens(text).len()
    }

    /// Exactly `CONTEXT_LENGTH` ids: start, at most 75 prompt tokens, end, padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(START_OF_TEXT);
        let tokens = self.tokens(text);
        ids.extend(&tokens[..tokens.len().min(MAX_PROMPT_TOKENS)]);
        ids.push(END_OF_TEXT);
        ids.resize(CONTEXT_LENGTH, self.pad_id);
        ids
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    /// The text encoder's input: a (texts.len(), 77) u32 tensor.
    pub fn input_ids(&self, texts: &[&str], device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = texts.iter().flat_map(|t| self.encode(t)).collect();
        Ok(Tensor::from_vec(ids, (texts.len(), CONTEXT_LENGTH), device)?)
    }
}

/// A token's id from a transformers `vocab.json`, for unusual `pad_token`s.
fn lookup_vocab(vocab: &Path, token: &str) -> Result<u32> {
    let text = std::fs::read_to_string(vocab)
        .map_err(|e| anyhow!("pad_token `{token}` is unusual and {} cannot be read: {e}", vocab.display()))?;
    let map: std::collections::HashMap<String, u32> =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid vocabulary: {e}", vocab.display()))?;
    map.get(token).copied().ok_or_else(|| anyhow!("pad_token `{token}` is not in {}", vocab.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::schedule::test_util::*;

    /// The written vocabulary gives every token the id our tokenizer gives it.
    #[test]
    fn written_vocabulary_matches_the_tokenizer() {
        let dir = std::env::temp_dir().join(format!("lora-studio-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_vocabulary(&dir, |p, b| Ok(std::fs::write(p, b)?)).unwrap();
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).unwrap()).unwrap();
        assert_eq!(vocab.len(), VOCAB_SIZE);
        assert_eq!(vocab["<|startoftext|>"], START_OF_TEXT);
        assert_eq!(vocab["<|endoftext|>"], END_OF_TEXT);
        assert_eq!(vocab["!"], EXCLAMATION);
        let tok = ClipTokenizer::new();
        for word in ["a", "red", "circle", "watercolour", "background", "striped", "lora"] {
            let ids = tok.tokens(word);
            let pieces: Vec<String> = (0..ids.len()).map(|i| tok.inner.decode([tok_token(&tok, ids[i])])).collect();
            let joined: Vec<u32> = pieces
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let key = if i + 1 == pieces.len() { format!("{}</w>", p.trim_end()) } else { p.clone() };
                    vocab[&key]
                })
                .collect();
            assert_eq!(joined, ids, "{word}");
        }
        assert_eq!(lookup_vocab(&dir.join("vocab.json"), "<|endoftext|>").unwrap(), END_OF_TEXT);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tok_token(tok: &ClipTokenizer, id: u32) -> instant_clip_tokenizer::Token {
        instant_clip_tokenizer::Token::from_u16(id as u16, &tok.inner).unwrap()
    }

    #[test]
    fn fixture_prompts_match_transformers() {
        let tok = ClipTokenizer::from_folder(&fixtures_dir().join("sd1-tiny/model/tokenizer")).unwrap();
        assert_eq!(tok.pad_id(), END_OF_TEXT);
        let reference =
            sd1_reference()["input_ids"].to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let prompts = ["a photo of a red circle on a blue background, sks style", ""];
        let ours = tok.encode_batch(&prompts);
        for (o, r) in ours.iter().zip(&reference) {
            assert_eq!(o.iter().map(|&x| x as i64).collect::<Vec<_>>(), *r);
        }
        let t = tok.input_ids(&prompts, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 77]);
        assert_eq!(t.to_vec2::<u32>().unwrap(), ours);
        assert_eq!(tok.count_tokens(prompts[0]), 13);
        assert_eq!(tok.count_tokens(""), 0);
    }

    #[test]
    fn long_prompts_are_cut_to_75_tokens() {
        let tok = ClipTokenizer::with_pad_id(EXCLAMATION);
        let long = "red ".repeat(100);
        assert_eq!(tok.count_tokens(&long), 100);
        let ids = tok.encode(&long);
        assert_eq!(ids.len(), CONTEXT_LENGTH);
        assert_eq!((ids[0], ids[1], ids[75], ids[76]), (START_OF_TEXT, 736, 736, END_OF_TEXT));
        let short = tok.encode("Red");
        assert_eq!(&short[..4], &[START_OF_TEXT, 736, END_OF_TEXT, 0]);
        assert!(short[3..].iter().all(|&x| x == 0));
    }

    #[test]
    fn special_token_spellings() {
        let tok = ClipTokenizer::new();
        // transformers' spelling is the real marker…
        assert_eq!(tok.tokens("red<|endoftext|>red"), vec![736, END_OF_TEXT, 736]);
        // …the crate's own spelling is ordinary text, as in transformers.
        let t = tok.tokens("a <START_OF_TEXT> b");
        assert!(!t.contains(&START_OF_TEXT));
        let mut want = tok.tokens("a <");
        want.extend(tok.tokens("start_of_text> b"));
        assert_eq!(t, want);
    }

    #[test]
    fn pad_token_from_tokenizer_config() {
        let dir = std::env::temp_dir().join(format!("lora-studio-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(ClipTokenizer::from_folder(&dir).unwrap().pad_id(), END_OF_TEXT);
        let cfg = dir.join("tokenizer_config.json");
        std::fs::write(&cfg, r#"{"pad_token": "!"}"#).unwrap();
        assert_eq!(ClipTokenizer::from_folder(&dir).unwrap().pad_id(), 0);
        std::fs::write(&cfg, r#"{"pad_token": {"__type": "AddedToken", "content": "<|endoftext|>"}}"#).unwrap();
        assert_eq!(ClipTokenizer::from_folder(&dir).unwrap().pad_id(), END_OF_TEXT);
        std::fs::write(&cfg, r#"{"pad_token": "<pad>"}"#).unwrap();
        let err = format!("{:#}", ClipTokenizer::from_folder(&dir).unwrap_err());
        assert!(err.contains("tokenizer_config.json") && err.contains("<pad>"), "{err}");
        std::fs::write(&cfg, "{").unwrap();
        assert!(ClipTokenizer::from_folder(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
