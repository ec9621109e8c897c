//! diffusers / PEFT naming: `unet.<module path>.lora_A.weight` / `.lora_B.weight`,
//! `text_encoder.<module path>…`. PEFT files store no α; we read it from metadata when present
//! (ours, or diffusers' `lora_adapter_metadata`) and otherwise take α = rank.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use candle_core::Tensor;

use super::{Component, ExportLayer, LayerKey, Naming, ParsedAdapter, ParsedLayer};
use crate::engine::Result;
use crate::engine::adapters::stack::Delta;

/// Our metadata key holding a JSON map from `<component>.<path>` to α.
pub const ALPHAS_KEY: &str = "lora_studio_alphas";

pub fn parse(tensors: HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<ParsedAdapter> {
    let alphas: HashMap<String, f64> = match metadata.get(ALPHAS_KEY) {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| anyhow::anyhow!("metadata `{ALPHAS_KEY}` is not valid: {e}"))?
        }
        None => HashMap::new(),
    };
    let uniform_alpha = diffusers_alpha(&metadata);
    let mut groups: BTreeMap<(Component, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in tensors {
        let (rest, is_a) = if let Some(r) = key.strip_suffix(".lora_A.weight") {
            (r, true)
        } else if let Some(r) = key.strip_suffix(".lora_B.weight") {
            (r, false)
        } else {
            bail!("unexpected key `{key}` in a PEFT adapter");
        };
        let rest = rest.strip_prefix("base_model.model.").unwrap_or(rest);
        let (component, path) = if let Some(p) = rest.strip_prefix("unet.") {
            (Component::Unet, p)
        } else if let Some(p) = rest.strip_prefix("text_encoder.") {
            (Component::TextEncoder, p)
        } else if rest.starts_with("text_model.") {
            (Component::TextEncoder, rest)
        } else {
            (Component::Unet, rest)
        };
        let entry = groups.entry((component, path.to_string())).or_default();
        if is_a { entry.0 = Some(t) } else { entry.1 = Some(t) }
    }
    let mut layers = Vec::with_capacity(groups.len());
    for ((component, path), (a, b)) in groups {
        let (Some(down), Some(up)) = (a, b) else {
            bail!("layer `{}.{path}` has only one of lora_A / lora_B", component.label());
        };
        let key = format!("{}.{path}", component.label());
        let alpha = alphas.get(&key).copied().or(uniform_alpha);
        layers.push(ParsedLayer { key: LayerKey::Path(component, path), delta: Delta::Lora { down, up }, alpha });
    }
    Ok(ParsedAdapter { naming: Naming::Peft, glora_layout: None, layers, metadata })
}

/// α from diffusers' own adapter metadata (`lora_adapter_metadata`: a PEFT LoraConfig as JSON).
fn diffusers_alpha(metadata: &HashMap<String, String>) -> Option<f64> {
    let json: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    let find = |v: &serde_json::Value| v.get("lora_alpha").and_then(|a| a.as_f64());
    find(&json).or_else(|| json.as_object()?.values().find_map(find))
}

/// Tensors and metadata for a diffusers/PEFT file. α is kept in our metadata per layer (so the
/// file round-trips exactly) and, when uniform, in diffusers' `lora_adapter_metadata` so other
/// tools read the right strength.
pub fn to_tensors(
    layers: &[ExportLayer],
    mut metadata: HashMap<String, String>,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let mut alphas: BTreeMap<String, f64> = BTreeMap::new();
    for l in layers {
        let Delta::Lora { down, up } = &l.delta else {
            bail!("{}: GLoRA has no PEFT form; export it in the kohya/LyCORIS format", l.path);
        };
        let key = format!("{}.{}", l.component.label(), l.path);
        out.insert(format!("{key}.lora_A.weight"), down.clone());
        out.insert(format!("{key}.lora_B.weight"), up.clone());
        alphas.insert(key, l.alpha);
    }
    metadata.insert(ALPHAS_KEY.into(), serde_json::to_string(&alphas)?);
    let ranks: std::collections::BTreeSet<usize> = layers.iter().map(|l| l.delta.rank()).collect();
    let first_alpha = layers.first().map(|l| l.alpha);
    if ranks.len() == 1 && layers.iter().all(|l| Some(l.alpha) == first_alpha) {
        let r = *ranks.iter().next().unwrap();
        metadata.insert(
            "lora_adapter_metadata".into(),
            serde_json::json!({ "r": r, "lora_alpha": first_alpha }).to_string(),
        );
    }
    Ok((out, metadata))
}
