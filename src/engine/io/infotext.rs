//! An image's generation parameters the way AUTOMATIC1111 writes them ("infotext": the prompt,
//! `Negative prompt: …`, then one line of `Key: value` pairs), stored in a PNG text chunk with the
//! keyword `parameters`, which A1111, ComfyUI and civitai all read; and the `<lora:name:weight>`
//! tags A1111 users put in prompts.

use std::path::Path;

use anyhow::{Context, bail};

use crate::engine::Result;
use crate::engine::diffusion::sampler::SamplerKind;
use crate::engine::io::weights::write_atomic;
use crate::engine::pipeline::GenerateRequest;

/// The PNG text keyword A1111 stores the infotext under.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// One adapter an image was made with: the name A1111 users type in `<lora:NAME:WEIGHT>` (the
/// file name without its extension), its weight, and A1111's short hash of the file if known.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUse {
    pub name: String,
    pub weight: f64,
    /// The first 12 hex digits of the file's addnet hash (`Lora hashes:`), which civitai uses to
    /// find the adapter; see `adapter_short_hash`.
    pub hash: Option<String>,
}

/// An image's generation parameters, as A1111's infotext holds them. Fields a file did not carry
/// are `None`; keys we have no field for are kept, in order, in `other`, and written back.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    /// The prompt without its `<lora:…>` tags (they are in `adapters`).
    pub prompt: String,
    pub negative: String,
    pub steps: Option<usize>,
    /// A1111's sampler name as written (`Euler a`); `sampler_kind` says whether it is one of ours.
    pub sampler: Option<String>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// The checkpoint's name (A1111: the file name without its extension).
    pub model: Option<String>,
    /// A1111's short model hash (the first 10 hex digits of the checkpoint file's SHA-256).
    pub model_hash: Option<String>,
    pub adapters: Vec<AdapterUse>,
    /// Text-encoder layers skipped from the end; 1 (none skipped) is A1111's default and unwritten.
    pub clip_skip: usize,
    /// Tags in the prompt that are not adapters we can load (`<hypernet:…>`, a weight that is not a
    /// number), each with why, in words; they are left out of `prompt`, as A1111 leaves them out.
    pub ignored_tags: Vec<String>,
    /// Every other `Key: value` pair, in the order read, values unquoted.
    pub other: Vec<(String, String)>,
}

impl Default for GenerationParameters {
    /// Nothing known: empty prompts, no settings, A1111's clip skip of 1.
    fn default() -> Self {
        GenerationParameters {
            prompt: String::new(),
            negative: String::new(),
            steps: None,
            sampler: None,
            cfg_scale: None,
            seed: None,
            width: None,
            height: None,
            model: None,
            model_hash: None,
            adapters: Vec::new(),
            clip_skip: 1,
            ignored_tags: Vec::new(),
            other: Vec::new(),
        }
    }
}

impl GenerationParameters {
    /// The parameters of a generation we ran; `adapters` are the loaded adapters with their
    /// weights, `model` the checkpoint's name.
    pub fn from_request(req: &GenerateRequest, adapters: Vec<AdapterUse>, model: Option<String>) -> Self {
        GenerationParameters {
            prompt: req.prompt.clone(),
            negative: req.negative.clone(),
            steps: Some(req.steps),
            sampler: Some(req.sampler.a1111_name().to_string()),
            cfg_scale: Some(req.guidance),
            seed: Some(req.seed),
            width: Some(req.width),
            height: Some(req.height),
            model,
            adapters,
            clip_skip: req.clip_skip,
            ..Default::default()
        }
    }

    /// Our sampler for the `Sampler:` field, if it names one of ours.
    pub fn sampler_kind(&self) -> Option<SamplerKind> {
        self.sampler.as_deref().and_then(SamplerKind::from_a1111_name)
    }

    /// Sets the fields of `req` these parameters carry (prompt and negative always; the others
    /// when present and usable) and returns, in words, what could not be applied: a sampler that
    /// is not ours, ignored tags. The adapters are the caller's to load.
    pub fn apply_to(&self, req: &mut GenerateRequest) -> Vec<String> {
        let mut notes = Vec::new();
        req.prompt = self.prompt.clone();
        req.negative = self.negative.clone();
        if let Some(steps) = self.steps {
            req.steps = steps;
        }
        match (&self.sampler, self.sampler_kind()) {
            (_, Some(kind)) => req.sampler = kind,
            (Some(name), None) => {
                notes.push(format!("sampler `{name}` is not one of ours; kept {}", req.sampler.a1111_name()))
            }
            (None, None) => {}
        }
        if let Some(cfg) = self.cfg_scale {
            req.guidance = cfg;
        }
        if let Some(seed) = self.seed {
            req.seed = seed;
        }
        if let (Some(w), Some(h)) = (self.width, self.height) {
            (req.width, req.height) = (w, h);
        }
        req.clip_skip = self.clip_skip.max(1);
        notes.extend(self.ignored_tags.iter().cloned());
        notes
    }

    /// The prompt as an A1111 user writes it: the prompt, then a `<lora:name:weight>` tag per
    /// adapter (what the window's prompt box shows).
    pub fn prompt_with_tags(&self) -> String {
        let mut out = self.prompt.clone();
        for a in &self.adapters {
            if !out.trim().is_empty() {
                out.push_str(", ");
            }
            out.push_str(&format!("<lora:{}:{}>", a.name, format_weight(a.weight)));
        }
        out
    }

    /// The infotext, as A1111 writes it: prompt (with adapter tags), `Negative prompt: …` when
    /// there is one, and the `Key: value` line (values with a comma, colon or line break quoted).
    pub fn infotext(&self) -> String {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                pairs.push((k.to_string(), v));
            }
        };
        put("Steps", self.steps.map(|s| s.to_string()));
        put("Sampler", self.sampler.clone());
        put("CFG scale", self.cfg_scale.map(|c| c.to_string()));
        put("Seed", self.seed.map(|s| s.to_string()));
        put("Size", self.width.zip(self.height).map(|(w, h)| format!("{w}x{h}")));
        put("Model hash", self.model_hash.clone());
        put("Model", self.model.clone());
        put("Clip skip", (self.clip_skip > 1).then(|| self.clip_skip.to_string()));
        // A1111 strips the separators from the names here so the list stays parseable.
        let hashes: Vec<String> = self
            .adapters
            .iter()
            .filter_map(|a| a.hash.as_ref().map(|h| format!("{}: {h}", a.name.replace([':', ','], ""))))
            .collect();
        put("Lora hashes", (!hashes.is_empty()).then(|| hashes.join(", ")));
        pairs.extend(self.other.iter().cloned());
        let line = pairs.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect::<Vec<_>>().join(", ");
        let negative =
            if self.negative.is_empty() { String::new() } else { format!("\nNegative prompt: {}", self.negative) };
        format!("{}{negative}\n{line}", self.prompt_with_tags()).trim().to_string()
    }

    /// Reads an infotext as A1111's `parse_generation_parameters` does: the last line holds the
    /// `Key: value` pairs when it has at least three (otherwise it is part of the prompt); lines
    /// up to one starting `Negative prompt:` are the prompt, the rest the negative prompt, each
    /// line trimmed; `Size: WxH` gives width and height. `<lora:…>` tags leave the prompt for
    /// `adapters`, with their hashes from `Lora hashes` (hashes of adapters the prompt does not
    /// name are dropped; a tag's own text-encoder weight is not kept, see `extract_prompt_tags`).
    pub fn parse(text: &str) -> Self {
        let text = text.trim();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let last = lines.pop().unwrap_or("");
        let mut pairs = key_values(last);
        if pairs.len() < 3 {
            lines.push(last);
            pairs.clear();
        }
        let (mut prompt, mut negative) = (String::new(), String::new());
        let mut in_negative = false;
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                in_negative = true;
                line = rest.trim();
            }
            let target = if in_negative { &mut negative } else { &mut prompt };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        let tags = extract_prompt_tags(&prompt);
        let mut p = GenerationParameters {
            prompt: tags.prompt,
            negative,
            adapters: tags
                .adapters
                .into_iter()
                .map(|t| AdapterUse { name: t.name, weight: t.weight, hash: None })
                .collect(),
            ignored_tags: tags.ignored,
            ..Default::default()
        };
        for (key, value) in pairs {
            // A1111 drops a pair with an empty value (its `v[0]` fails and the pair is skipped).
            if value.is_empty() {
                continue;
            }
            let v = value.trim();
            let used = match key.as_str() {
                "Steps" => v.parse().map(|s| p.steps = Some(s)).is_ok(),
                "Sampler" => {
                    p.sampler = Some(v.to_string());
                    true
                }
                "CFG scale" => v.parse().map(|c| p.cfg_scale = Some(c)).is_ok(),
                "Seed" => v.parse().map(|s| p.seed = Some(s)).is_ok(),
                "Size" => match image_size(v) {
                    Some((w, h)) => {
                        (p.width, p.height) = (Some(w), Some(h));
                        true
                    }
                    None => false,
                },
                "Model hash" => {
                    p.model_hash = Some(v.to_string());
                    true
                }
                "Model" => {
                    p.model = Some(v.to_string());
                    true
                }
                "Clip skip" => v.parse().map(|c| p.clip_skip = c).is_ok(),
                "Lora hashes" => {
                    for entry in v.split(',') {
                        let Some((name, hash)) = entry.split_once(':') else { continue };
                        if let Some(a) = p.adapters.iter_mut().find(|a| a.name.replace([':', ','], "") == name.trim()) {
                            a.hash = Some(hash.trim().to_string());
                        }
                    }
                    true
                }
                _ => false,
            };
            if !used {
                p.other.push((key, value));
            }
        }
        p
    }
}

/// `WxH` → (W, H), as A1111's size pattern reads it (digits only).
fn image_size(v: &str) -> Option<(usize, usize)> {
    let (w, h) = v.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return None;
    }
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// A1111's quoting of a value: as a JSON string when it holds a comma, colon or line break (so
/// the line splits back into the same pairs), as-is otherwise.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) { serde_json::to_string(v).expect("a string serialises") } else { v.to_string() }
}

/// A weight as a user types it: the shortest decimal that reads back to the same number, as an
/// f32 when it is one (a slider's 0.8 is written `0.8`, not `0.800000011920929`).
pub fn format_weight(w: f64) -> String {
    if (w as f32) as f64 == w { format!("{}", w as f32) } else { format!("{w}") }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every `Key: value` pair of a line, found as A1111's `re_param` finds them (`findall` of
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`): the key is a word character then at
/// least one more of word characters, spaces, `-` and `/`; the value a quoted string ending at a
/// comma or the line's end, or else everything up to the next comma. Where no pair starts, the
/// search moves on one character. Quoted values come back unquoted (as JSON strings).
fn key_values(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        match key_value_at(line, i) {
            Some((key, value, end)) => {
                out.push((key, value));
                i = end;
            }
            None => i += line[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    out
}

/// The pair starting at byte `start`, and the byte after it (past its comma).
fn key_value_at(line: &str, start: usize) -> Option<(String, String, usize)> {
    let rest = &line[start..];
    let key_start = start + (rest.len() - rest.trim_start().len());
    let mut chars = line[key_start..].char_indices();
    let (_, first) = chars.next()?;
    if !is_word(first) {
        return None;
    }
    let mut key_end = key_start + first.len_utf8();
    for (o, c) in chars {
        if is_word(c) || matches!(c, ' ' | '-' | '/') {
            key_end = key_start + o + c.len_utf8();
        } else {
            break;
        }
    }
    // At least two characters, then the colon.
    if line[key_start..key_end].chars().count() < 2 || !line[key_end..].starts_with(':') {
        return None;
    }
    let key = line[key_start..key_end].to_string();
    let after_colon = &line[key_end + 1..];
    let value_start = key_end + 1 + (after_colon.len() - after_colon.trim_start().len());
    let value_text = &line[value_start..];
    let len = match quoted_len(value_text) {
        Some(len) if value_text[len..].is_empty() || value_text[len..].starts_with(',') => len,
        _ => value_text.find(',').unwrap_or(value_text.len()),
    };
    let end = value_start + len + usize::from(len < value_text.len());
    Some((key, unquote(&value_text[..len]), end))
}

/// A value in double quotes read as the JSON string it is (A1111's `unquote`); anything else,
/// including a quoted value that is not valid JSON, as written.
fn unquote(v: &str) -> String {
    let quoted = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
    quoted.then(|| serde_json::from_str::<String>(v).ok()).flatten().unwrap_or_else(|| v.to_string())
}

/// The length of a `"…"` string at the start of `s` (backslash escapes inside; at least one
/// character between the quotes), if there is one.
fn quoted_len(s: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut escaped = false;
    for (o, c) in chars {
        match (escaped, c) {
            (true, '\n') => return None,
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return (o > 1).then_some(o + 1),
            _ => {}
        }
    }
    None
}

/// One `<lora:…>` (or `<lyco:…>`) tag of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterTag {
    pub name: String,
    /// The UNet's weight, the one we apply: our adapters take one weight for all their layers.
    pub weight: f64,
    /// A text-encoder weight the tag gave that differs from `weight` (`<lora:name:te:unet>`):
    /// A1111 applies it to the adapter's text-encoder layers; we cannot, and say so.
    pub text_encoder_weight: Option<f64>,
}

/// A prompt with its A1111 extra-network tags taken out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptTags {
    /// The prompt without any `<type:…>` tag, and without the separators left dangling where they
    /// were (A1111 also removes every tag before encoding).
    pub prompt: String,
    pub adapters: Vec<AdapterTag>,
    /// The tags that are not adapters we can use, each with why, in words.
    pub ignored: Vec<String>,
}

/// Takes A1111's extra-network tags (`<TYPE:ARG:ARG…>`, TYPE a word) out of a prompt.
/// `<lora:name>` is weight 1; `<lora:name:0.7>` weight 0.7; `<lora:name:te:unet>` (or
/// `te=…`/`unet=…`) gives the text encoder and the UNet their own weights: we apply the UNet's
/// to the whole adapter (the UNet carries a LoRA's style; many have no text-encoder layers at
/// all) and report the text encoder's in `text_encoder_weight` when it differs. `<lyco:…>` (the
/// old LyCORIS extension's tag) reads as `<lora:…>`. Other tags (`<hypernet:…>`) are removed and
/// listed in `ignored`, as A1111 skips networks it does not know.
pub fn extract_prompt_tags(prompt: &str) -> PromptTags {
    let mut out = PromptTags::default();
    let mut kept = String::new();
    let mut rest = prompt;
    let mut removed_any = false;
    while let Some(open) = rest.find('<') {
        let Some((kind, args, len)) = tag_at(&rest[open..]) else {
            kept.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            continue;
        };
        kept.push_str(&rest[..open]);
        let tag = &rest[open..open + len];
        rest = &rest[open + len..];
        removed_any = true;
        // `a <lora:x> b` leaves one space, not two.
        if kept.ends_with(' ') {
            rest = rest.trim_start_matches(' ');
        }
        if kind == "lora" || kind == "lyco" {
            match adapter_tag(args) {
                Ok(t) => out.adapters.push(t),
                Err(why) => out.ignored.push(format!("`{tag}` left out: {why}")),
            }
        } else if kind == "hypernet" {
            out.ignored.push(format!("`{tag}` left out: hypernetworks are not supported"));
        } else {
            out.ignored.push(format!("`{tag}` left out: `{kind}` is not a network LoRA Studio knows"));
        }
    }
    kept.push_str(rest);
    // A prompt without tags is left exactly as written.
    out.prompt = if removed_any { tidy_separators(&kept) } else { kept };
    out
}

/// `<WORD:NOT_GT+>` at the start of `s` (A1111's `<(\w+):([^>]+)>`): (type, arguments, length).
fn tag_at(s: &str) -> Option<(&str, &str, usize)> {
    let body = s.strip_prefix('<')?;
    let colon = body.find(':')?;
    let kind = &body[..colon];
    if kind.is_empty() || !kind.chars().all(is_word) {
        return None;
    }
    let close = body.find('>')?;
    let args = body.get(colon + 1..close)?;
    if args.is_empty() {
        return None;
    }
    Some((kind, args, close + 2))
}

/// A lora tag's arguments (after `lora:`) as A1111's Lora extension reads them: name, then the
/// text encoder's weight (default 1), then the UNet's (default: the text encoder's); `te=`,
/// `unet=` may name them; `dyn=` (a rank limit) is not something we have.
fn adapter_tag(args: &str) -> std::result::Result<AdapterTag, String> {
    let mut positional = Vec::new();
    let (mut te, mut unet) = (None, None);
    for part in args.split(':') {
        match part.split_once('=') {
            Some(("te", v)) => te = Some(v),
            Some(("unet", v)) => unet = Some(v),
            Some(("dyn", _)) => return Err("a `dyn=` rank limit is not supported".into()),
            Some((k, _)) => return Err(format!("unknown setting `{k}=`")),
            None => positional.push(part),
        }
    }
    let name = positional.first().map(|n| n.trim()).filter(|n| !n.is_empty()).ok_or("no adapter name")?;
    let number = |s: &str| -> std::result::Result<f64, String> {
        s.trim().parse::<f64>().ok().filter(|w| w.is_finite()).ok_or(format!("`{s}` is not a weight"))
    };
    let te = number(te.or(positional.get(1).copied()).unwrap_or("1"))?;
    let unet = match unet.or(positional.get(2).copied()) {
        Some(u) => number(u)?,
        None => te,
    };
    if positional.len() > 4 {
        return Err("too many `:` parts".into());
    }
    if positional.len() == 4 {
        return Err("a rank limit (fourth part) is not supported".into());
    }
    Ok(AdapterTag { name: name.to_string(), weight: unet, text_encoder_weight: (te != unet).then_some(te) })
}

/// The separators removed tags leave behind: `a, , b` → `a, b`, and none at either end.
fn tidy_separators(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // `a <lora:x>, b` leaves `a , b`: no space before a comma.
    for piece in s.split(',').filter(|p| !p.trim().is_empty()) {
        if out.is_empty() {
            out.push_str(piece.trim());
        } else {
            out.push(',');
            out.push_str(piece.trim_end());
        }
    }
    out.trim_end().to_string()
}

/// A PNG of `image` carrying `params` in a `parameters` text chunk (tEXt as A1111 writes it; iTXt
/// when the text is not Latin-1, as PIL does), plus `Software`.
pub fn encode_png_with_parameters(image: &image::RgbImage, params: &GenerationParameters) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let text = params.infotext();
    if text.chars().all(|c| (c as u32) < 0x100) {
        encoder.add_text_chunk(PARAMETERS_KEYWORD.into(), text)?;
    } else {
        encoder.add_itxt_chunk(PARAMETERS_KEYWORD.into(), text)?;
    }
    encoder.add_text_chunk("Software".into(), format!("LoRA Studio {}", env!("CARGO_PKG_VERSION")))?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(bytes)
}

/// Saves `image` as a PNG at `path` with its generation parameters, atomically (a temporary
/// name, then a rename): what the CLI's `generate --out` and the window's Save write.
pub fn save_png_with_parameters(path: &Path, image: &image::RgbImage, params: &GenerationParameters) -> Result<()> {
    let bytes =
        encode_png_with_parameters(image, params).with_context(|| format!("{}: cannot encode", path.display()))?;
    write_atomic(path, &bytes)
}

/// The `parameters` text of a PNG file, from a tEXt, zTXt or iTXt chunk, before or after the image.
pub fn read_png_parameters_text(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_ignore_text_chunk(false);
    let mut reader =
        decoder.read_info().map_err(|e| anyhow::anyhow!("{}: not a readable PNG image ({e})", path.display()))?;
    // Text after the image data is only seen once the rest is read; a damaged tail is no reason
    // to lose the chunks before it.
    if find_parameters(reader.info())?.is_none() {
        let _ = reader.finish();
    }
    match find_parameters(reader.info())? {
        Some(text) => Ok(text),
        None => bail!(
            "{} has no generation parameters (it was not saved by A1111, LoRA Studio or a tool that writes them)",
            path.display()
        ),
    }
}

fn find_parameters(info: &png::Info) -> Result<Option<String>> {
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info.compressed_latin1_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return Ok(Some(t.get_text().map_err(|e| anyhow::anyhow!("its `parameters` chunk is damaged ({e})"))?));
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return Ok(Some(t.get_text().map_err(|e| anyhow::anyhow!("its `parameters` chunk is damaged ({e})"))?));
    }
    Ok(None)
}

/// The generation parameters stored in a PNG (what dropping an image on the Playground restores).
pub fn read_png_parameters(path: &Path) -> Result<GenerationParameters> {
    Ok(GenerationParameters::parse(&read_png_parameters_text(path)?))
}

/// A1111's short hash of an adapter file, as its `Lora hashes:` field and civitai use it: the first
/// 12 hex digits of the SHA-256 of a safetensors file's bytes after its header (the "addnet" hash).
pub fn adapter_short_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let header = bytes.get(..8).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let start = (u64::from_le_bytes(header.try_into().expect("8 bytes")) as usize).saturating_add(8);
    let data = bytes.get(start..).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let digest = Sha256::digest(data);
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

/// A1111's short hash of a checkpoint file, its `Model hash:` field: the first 10 hex digits of
/// the whole file's SHA-256. Reads the whole file (seconds for a multi-gigabyte model), so a caller
/// computes it once per model, off the window's thread.
pub fn checkpoint_short_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(hasher.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from A1111's own docstring and a typical v1.10 line, field by field.
    const EXAMPLE: &str = "a photo of a cat, <lora:neon:0.8>\n\
        Negative prompt: blurry\n\
        Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, \
        Model: v1-5-pruned-emaonly, Lora hashes: \"neon: 1a2b3c4d5e6f\", Version: v1.10.1";

    #[test]
    fn an_a1111_infotext_reads_into_its_fields() {
        let p = GenerationParameters::parse(EXAMPLE);
        assert_eq!(p.prompt, "a photo of a cat");
        assert_eq!(p.negative, "blurry");
        assert_eq!(p.steps, Some(20));
        assert_eq!(p.sampler.as_deref(), Some("Euler a"));
        assert_eq!(p.sampler_kind(), Some(SamplerKind::EulerAncestral));
        assert_eq!(p.cfg_scale, Some(7.0));
        assert_eq!(p.seed, Some(1234));
        assert_eq!((p.width, p.height), (Some(512), Some(768)));
        assert_eq!(p.model_hash.as_deref(), Some("6ce0161689"));
        assert_eq!(p.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert_eq!(p.clip_skip, 1, "missing means 1, as A1111 reads it");
        assert_eq!(
            p.adapters,
            vec![AdapterUse { name: "neon".into(), weight: 0.8, hash: Some("1a2b3c4d5e6f".into()) }]
        );
        assert_eq!(p.other, vec![("Version".to_string(), "v1.10.1".to_string())]);
        assert!(p.ignored_tags.is_empty());
    }

    /// A1111 writes no `Negative prompt:` line when there is none, and the prompt and the negative
    /// prompt may span lines (each line trimmed, joined with line breaks).
    #[test]
    fn negative_prompt_may_be_missing_or_span_lines() {
        let p = GenerationParameters::parse("a cat\nSteps: 4, Sampler: DDIM, Seed: 1");
        assert_eq!((p.prompt.as_str(), p.negative.as_str()), ("a cat", ""));
        assert_eq!(p.steps, Some(4));

        let p = GenerationParameters::parse(
            "  a cat,\n  on a mat  \nNegative prompt: blurry,\n lowres \nSteps: 4, Sampler: DDIM, Seed: 1\n",
        );
        assert_eq!(p.prompt, "a cat,\non a mat");
        assert_eq!(p.negative, "blurry,\nlowres");
    }

    /// `len(re_param.findall(lastline)) < 3`: a last line with fewer than three pairs is prompt.
    #[test]
    fn a_last_line_with_fewer_than_three_pairs_is_part_of_the_prompt() {
        let p = GenerationParameters::parse("a cat\nstyle: watercolor, mood: calm");
        assert_eq!(p.prompt, "a cat\nstyle: watercolor, mood: calm");
        assert_eq!(p.steps, None);
        assert!(p.other.is_empty());
        // A prompt alone.
        let p = GenerationParameters::parse("just a prompt");
        assert_eq!(p.prompt, "just a prompt");
        assert_eq!(GenerationParameters::parse("").prompt, "");
    }

    /// Quoted values (JSON strings) keep their commas and colons and are unescaped; a quote that
    /// is not followed by a comma or the end reads as a plain value up to the next comma, as the
    /// regex's second alternative does; a one-letter key is no key (`\w[\w \-/]+`).
    #[test]
    fn key_values_follow_a1111s_pattern() {
        assert_eq!(
            key_values(r#"Lora hashes: "x, y: z", Note: "say \"hi\"", Steps: 3, A: 1"#),
            vec![
                ("Lora hashes".into(), "x, y: z".into()),
                ("Note".into(), "say \"hi\"".into()),
                ("Steps".into(), "3".into())
            ]
        );
        assert_eq!(
            key_values(r#"Note: "a" b, Steps: 2"#),
            vec![("Note".into(), "\"a\" b".into()), ("Steps".into(), "2".into())]
        );
        assert_eq!(
            key_values("x: 1, Hires upscaler: Latent (nearest-exact), Token merging/ratio: 0.5"),
            vec![
                ("Hires upscaler".into(), "Latent (nearest-exact)".into()),
                ("Token merging/ratio".into(), "0.5".into())
            ]
        );
        assert_eq!(key_values("Empty: , Seed: 5"), vec![("Empty".into(), "".into()), ("Seed".into(), "5".into())]);
    }

    /// Every `WxH` value splits in A1111, but only `Size` is ours; the rest are kept as written.
    #[test]
    fn size_gives_width_and_height_and_unknown_keys_are_kept() {
        let p = GenerationParameters::parse(
            "x\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, Size: 1024x576, Hires resize: 2048x1152, Clip skip: 2",
        );
        assert_eq!((p.width, p.height), (Some(1024), Some(576)));
        assert_eq!(p.sampler_kind(), None);
        assert_eq!(p.clip_skip, 2);
        assert_eq!(
            p.other,
            vec![("Schedule type".into(), "Karras".into()), ("Hires resize".into(), "2048x1152".into())]
        );
        // A size that is not WxH stays a value of its own; an empty value is dropped, as in A1111.
        let p = GenerationParameters::parse("x\nSteps: 3, Seed: 1, Size: big, Denoising strength: ");
        assert_eq!((p.width, p.other.clone()), (None, vec![("Size".into(), "big".into())]));
    }

    #[test]
    fn infotext_is_written_as_a1111_writes_it_and_reads_back() {
        let req = GenerateRequest {
            prompt: "a photo of a cat".into(),
            negative: "blurry, lowres".into(),
            seed: 1234,
            steps: 20,
            guidance: 7.0,
            sampler: SamplerKind::EulerAncestral,
            width: 512,
            height: 512,
            clip_skip: 2,
        };
        let adapters = vec![
            AdapterUse { name: "neon".into(), weight: 0.8f32 as f64, hash: Some("1a2b3c4d5e6f".into()) },
            AdapterUse { name: "grain".into(), weight: 1.0, hash: None },
        ];
        let mut p = GenerationParameters::from_request(&req, adapters, Some("v1-5-pruned-emaonly".into()));
        p.model_hash = Some("6ce0161689".into());
        assert_eq!(
            p.infotext(),
            "a photo of a cat, <lora:neon:0.8>, <lora:grain:1>\n\
             Negative prompt: blurry, lowres\n\
             Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, \
             Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: \"neon: 1a2b3c4d5e6f\""
        );
        // Read back, the f32 slider weight is the 0.8 the text says.
        let mut expected = p.clone();
        expected.adapters[0].weight = 0.8;
        assert_eq!(GenerationParameters::parse(&p.infotext()), expected);

        let mut q = GenerateRequest { prompt: String::new(), negative: String::new(), ..req.clone() };
        (q.seed, q.steps, q.sampler, q.clip_skip) = (0, 1, SamplerKind::Ddim, 1);
        assert!(p.apply_to(&mut q).is_empty());
        assert_eq!(q, req);
    }

    /// What cannot be applied to a request is said in words, and leaves the request's own value.
    #[test]
    fn apply_to_names_what_it_cannot_use() {
        let p = GenerationParameters::parse("a <hypernet:anime:1> cat\nSteps: 30, Sampler: DPM++ 2M, Clip skip: 2");
        let mut req = GenerateRequest {
            prompt: String::new(),
            negative: String::new(),
            seed: 9,
            steps: 1,
            guidance: 7.5,
            sampler: SamplerKind::Euler,
            width: 64,
            height: 64,
            clip_skip: 1,
        };
        let notes = p.apply_to(&mut req);
        assert_eq!((req.prompt.as_str(), req.steps, req.sampler, req.seed), ("a cat", 30, SamplerKind::Euler, 9));
        assert_eq!(req.clip_skip, 2, "clip skip is applied");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("`DPM++ 2M` is not one of ours"), "{notes:?}");
        assert!(notes[1].contains("hypernetworks are not supported"), "{notes:?}");
    }

    fn tag(name: &str, weight: f64, te: Option<f64>) -> AdapterTag {
        AdapterTag { name: name.into(), weight, text_encoder_weight: te }
    }

    #[test]
    fn lora_tags_come_out_of_the_prompt_with_their_weights() {
        let t = extract_prompt_tags(
            "<lora:a>, a cat <lora:b:0.7>, <lora:c:0.5:1>, <lora:d:te=0.2:unet=0.9>, <lyco:e:0.6>, <lora:f:0.3:0.3>",
        );
        assert_eq!(t.prompt, "a cat");
        assert_eq!(
            t.adapters,
            vec![
                tag("a", 1.0, None),
                tag("b", 0.7, None),
                tag("c", 1.0, Some(0.5)),
                tag("d", 0.9, Some(0.2)),
                tag("e", 0.6, None),
                tag("f", 0.3, None),
            ]
        );
        assert!(t.ignored.is_empty());
        // Names may hold spaces and dots; a tag in the middle leaves one space.
        let t = extract_prompt_tags("a <lora:film grain v1.5:-0.25> b");
        assert_eq!((t.prompt.as_str(), t.adapters.clone()), ("a b", vec![tag("film grain v1.5", -0.25, None)]));
    }

    #[test]
    fn tags_we_cannot_use_are_removed_and_reported_in_words() {
        let t = extract_prompt_tags("a cat, <hypernet:anime:1>, <lora:x:abc>, <lora:y:1:1:8>, <foo:bar>");
        assert_eq!(t.prompt, "a cat");
        assert!(t.adapters.is_empty());
        assert_eq!(t.ignored.len(), 4, "{:?}", t.ignored);
        assert!(t.ignored[0].contains("`<hypernet:anime:1>` left out: hypernetworks are not supported"));
        assert!(t.ignored[1].contains("`abc` is not a weight"));
        assert!(t.ignored[2].contains("rank limit"));
        assert!(t.ignored[3].contains("`foo` is not a network"));
    }

    /// Only `<WORD:…>` is a tag: emphasis, comparisons and broken tags stay, and a prompt without
    /// tags is left exactly as written.
    #[test]
    fn text_that_is_not_a_tag_is_left_alone() {
        for prompt in ["a < b, c > d", "(cat:1.2), <lora:>", "<:x>", "< lora:x:1>", "a,, b ,", "<lora:x:1"] {
            let t = extract_prompt_tags(prompt);
            assert_eq!((t.prompt.as_str(), t.adapters.len(), t.ignored.len()), (prompt, 0, 0), "{prompt}");
        }
    }

    #[test]
    fn weights_are_written_as_typed() {
        assert_eq!(format_weight(0.8f32 as f64), "0.8");
        assert_eq!(format_weight(0.8), "0.8");
        assert_eq!(format_weight(1.0), "1");
        assert_eq!(format_weight(-0.35), "-0.35");
        assert_eq!(format_weight(0.1 + 0.2), "0.30000000000000004", "not an f32: exact");
    }

    #[test]
    fn samplers_have_a1111s_names_both_ways() {
        let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.a1111_name()).collect();
        assert_eq!(names, ["DDIM", "Euler a", "Euler", "LCM", "TCD"]);
        for k in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_a1111_name(k.a1111_name()), Some(k));
        }
        assert_eq!(SamplerKind::from_a1111_name("euler_ancestral"), Some(SamplerKind::EulerAncestral));
        assert_eq!(SamplerKind::from_a1111_name("DPM++ 2M"), None);
    }
}
