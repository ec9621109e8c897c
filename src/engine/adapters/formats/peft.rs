//! diffusers / PEFT naming: `unet.<module path>.lora_A.weight` / `.lora_B.weight`,
//! `text_encoder.<module path>…`. PEFT files store no α; we read it from metadata when present
//! (ours, or diffusers' `lora_adapter_metadata`) and otherwise take α = rank.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use candle_core::Tensor;

use super::{Component, ExportLayer, LayerKey, Naming, ParsedAdapter, ParsedLayer};
use crate::engine::Result;
use crate::engine::adapters::delta::Delta;

/// Our metadata key holding a JSON map from `<component>.<path>` to α.
pub const ALPHAS_KEY: &str = "lora_studio_alphas";

/// The factor a key holds, in any of diffusers' spellings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Magnitude,
}

/// Splits `<module>.<leaf>` for PEFT (`lora_A` / `lora_B` / `lora_magnitude_vector`), diffusers'
/// training scripts (`lora.down` / `lora.up`) and their text encoder (`lora_linear_layer.down` / `.up`).
fn split_key(key: &str) -> Option<(&str, Part)> {
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude),
    ];
    SUFFIXES.iter().find_map(|(s, part)| key.strip_suffix(s).map(|m| (m, *part)))
}

/// Whether a key is one of diffusers' / PEFT's adapter spellings.
pub fn is_peft_key(key: &str) -> bool {
    split_key(key).is_some()
}

/// Where a module path points: the component, and the path our models use. transformers 5
/// writes text-encoder paths without `text_model.`. Layers of a second text encoder (SDXL,
/// `text_encoder_2.`) find no home in an SD 1.x / 2.x model, which has none.
fn locate(module: &str) -> LayerKey {
    let rest = module.strip_prefix("base_model.model.").unwrap_or(module);
    let text = |c: Component, p: &str| {
        let p = if p.starts_with("text_model.") { p.to_string() } else { format!("text_model.{p}") };
        LayerKey::Path(c, p)
    };
    if let Some(p) = rest.strip_prefix("unet.") {
        LayerKey::Path(Component::Unet, p.to_string())
    } else if let Some(p) = rest.strip_prefix("text_encoder_2.") {
        text(Component::TextEncoder2, p)
    } else if let Some(p) = rest.strip_prefix("text_encoder.") {
        text(Component::TextEncoder, p)
    } else if rest.starts_with("text_model.") {
        text(Component::TextEncoder, rest)
    } else {
        LayerKey::Path(Component::Unet, rest.to_string())
    }
}

/// One component's PEFT `LoraConfig`, as diffusers stores it in `lora_adapter_metadata`.
#[derive(Clone, Debug, Default)]
struct PeftConfig {
    alpha: Option<f64>,
    rslora: bool,
    /// `alpha_pattern`: module-name suffixes with their own α.
    alpha_pattern: Vec<(String, f64)>,
}

impl PeftConfig {
    fn from_json(fields: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let mut config = PeftConfig {
            alpha: fields.get("lora_alpha").and_then(|a| a.as_f64()),
            rslora: fields.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
            ..Default::default()
        };
        if let Some(patterns) = fields.get("alpha_pattern").and_then(|p| p.as_object()) {
            for (pattern, alpha) in patterns {
                // PEFT matches patterns as regular expressions against the module name's end; plain
                // names are all anyone writes. Anything else is refused rather than guessed.
                if !pattern.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                    bail!(
                        "lora_adapter_metadata: alpha_pattern `{pattern}` is a regular expression; only module names are supported"
                    );
                }
                let alpha =
                    alpha.as_f64().ok_or_else(|| anyhow::anyhow!("alpha_pattern `{pattern}`: α is not a number"))?;
                config.alpha_pattern.push((pattern.clone(), alpha));
            }
        }
        Ok(config)
    }

    /// α for a module, so that α / r is PEFT's scale (α / √r under rsLoRA).
    fn alpha_for(&self, module: &str, rank: usize) -> Option<f64> {
        let pattern =
            self.alpha_pattern.iter().find(|(p, _)| module == p || module.ends_with(&format!(".{p}"))).map(|(_, a)| *a);
        let alpha = pattern.or(self.alpha)?;
        Some(if self.rslora { alpha * (rank as f64).sqrt() } else { alpha })
    }
}

/// Per-component configs from diffusers' `lora_adapter_metadata`: flat `unet.lora_alpha`,
/// `text_encoder.lora_alpha` keys (as diffusers writes them), nested objects, or one top-level
/// config for every component (key `None`).
fn peft_configs(metadata: &HashMap<String, String>) -> Result<HashMap<Option<Component>, PeftConfig>> {
    let mut out = HashMap::new();
    let Some(json) = metadata.get("lora_adapter_metadata") else { return Ok(out) };
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("metadata `lora_adapter_metadata` is not valid JSON: {e}"))?;
    let Some(object) = value.as_object() else { bail!("metadata `lora_adapter_metadata` is not a JSON object") };
    let component = |name: &str| match name {
        "unet" => Some(Some(Component::Unet)),
        "text_encoder" => Some(Some(Component::TextEncoder)),
        "text_encoder_2" => Some(Some(Component::TextEncoder2)),
        _ => None,
    };
    let mut grouped: HashMap<Option<Component>, serde_json::Map<String, serde_json::Value>> = HashMap::new();
    for (key, v) in object {
        if let (Some(c), Some(nested)) = (component(key), v.as_object()) {
            grouped.entry(c).or_default().extend(nested.clone());
        } else if let Some((c, field)) = key.split_once('.').and_then(|(c, f)| Some((component(c)?, f))) {
            grouped.entry(c).or_default().insert(field.to_string(), v.clone());
        } else if !key.contains('.') {
            grouped.entry(None).or_default().insert(key.clone(), v.clone());
        }
    }
    for (c, fields) in grouped {
        out.insert(c, PeftConfig::from_json(&fields)?);
    }
    Ok(out)
}

pub fn parse(tensors: HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<ParsedAdapter> {
    let alphas: HashMap<String, f64> = match metadata.get(ALPHAS_KEY) {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| anyhow::anyhow!("metadata `{ALPHAS_KEY}` is not valid: {e}"))?
        }
        None => HashMap::new(),
    };
    let configs = peft_configs(&metadata)?;
    let mut groups: BTreeMap<LayerKey, [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((module, part)) = split_key(&key) else {
            bail!("unexpected key `{key}` in a diffusers / PEFT adapter");
        };
        let slot = &mut groups.entry(locate(module)).or_default()[part as usize];
        if slot.replace(t).is_some() {
            bail!("layer `{module}` is stored twice (two spellings of the same factor)");
        }
    }
    let mut layers = Vec::with_capacity(groups.len());
    for (key, [down, up, magnitude]) in groups {
        let (Some(down), Some(up)) = (down, up) else {
            bail!("layer `{key}` lacks its down (lora_A) or up (lora_B) factor");
        };
        let rank = down.dims().first().copied().unwrap_or(1);
        let alpha = alphas.get(&key.to_string()).copied().or_else(|| {
            let (component, path) = match &key {
                LayerKey::Path(c, p) => (Some(*c), p.as_str()),
                LayerKey::Flat(p) => (None, p.as_str()),
            };
            configs.get(&component).or(configs.get(&None))?.alpha_for(path, rank)
        });
        let lora = Delta::Lora { down, up };
        let (delta, alpha) = match magnitude {
            // PEFT's DoRA: α / r belongs inside the norm.
            Some(magnitude) => {
                let inner_scale = lora.scale_from_alpha(alpha);
                (Delta::Dora { inner: Box::new(lora), inner_scale, magnitude }, None)
            }
            None => (lora, alpha),
        };
        layers.push(ParsedLayer { key, delta, alpha });
    }
    Ok(ParsedAdapter { naming: Naming::Peft, glora_layout: None, layers, metadata })
}

/// Tensors and metadata for a diffusers/PEFT file. α is kept in our metadata per layer (so the
/// file round-trips exactly) and in diffusers' `lora_adapter_metadata` as `load_lora_weights`
/// reads it: one PEFT `LoraConfig` per component under `unet.` / `text_encoder.` (`r`,
/// `lora_alpha`, `target_modules`, and `rank_pattern` / `alpha_pattern` for layers that differ).
pub fn to_tensors(
    layers: &[ExportLayer],
    mut metadata: HashMap<String, String>,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let mut alphas: BTreeMap<String, f64> = BTreeMap::new();
    // Per component: (module path, rank, α).
    let mut per_component: BTreeMap<&'static str, Vec<(&str, usize, f64)>> = BTreeMap::new();
    for l in layers {
        let Delta::Lora { down, up } = &l.delta else {
            bail!("{}: {} has no PEFT LoRA form; export it in the kohya/LyCORIS format", l.path, l.delta.algorithm());
        };
        let key = format!("{}.{}", l.component.label(), l.path);
        out.insert(format!("{key}.lora_A.weight"), down.clone());
        out.insert(format!("{key}.lora_B.weight"), up.clone());
        alphas.insert(key, l.alpha);
        per_component.entry(l.component.label()).or_default().push((&l.path, l.delta.rank(), l.alpha));
    }
    metadata.insert(ALPHAS_KEY.into(), serde_json::to_string(&alphas)?);
    let mut config = serde_json::Map::new();
    for (component, modules) in per_component {
        let most_common = |values: Vec<String>| -> String {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            values.into_iter().for_each(|v| *counts.entry(v).or_default() += 1);
            counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v).unwrap_or_default()
        };
        let r: usize = most_common(modules.iter().map(|m| m.1.to_string()).collect()).parse().unwrap_or(1);
        let alpha: f64 = most_common(modules.iter().map(|m| m.2.to_string()).collect()).parse().unwrap_or(r as f64);
        let rank_pattern: serde_json::Map<String, serde_json::Value> =
            modules.iter().filter(|m| m.1 != r).map(|m| (m.0.to_string(), m.1.into())).collect();
        let alpha_pattern: serde_json::Map<String, serde_json::Value> =
            modules.iter().filter(|m| m.2 != alpha).map(|m| (m.0.to_string(), m.2.into())).collect();
        let targets: Vec<&str> = modules.iter().map(|m| m.0).collect();
        let fields = serde_json::json!({
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": targets,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": false,
            "use_rslora": false,
            "init_lora_weights": true,
        });
        for (k, v) in fields.as_object().into_iter().flatten() {
            config.insert(format!("{component}.{k}"), v.clone());
        }
    }
    metadata.insert("lora_adapter_metadata".into(), serde_json::to_string_pretty(&config)?);
    Ok((out, metadata))
}
