//! kohya sd-scripts naming, which A1111, ComfyUI and LyCORIS read and write:
//! `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and the
//! LyCORIS GLoRA keys `.a1.weight` … `.b2.weight`, plus `ss_*` metadata.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use candle_core::Tensor;

use super::{
    Component, ExportLayer, GLORA_LAYOUT_KEY, GloraLayout, LayerKey, Naming, ParsedAdapter, ParsedLayer, alpha_scalar,
};
use crate::engine::Result;
use crate::engine::adapters::stack::Delta;

pub fn parse(tensors: HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<ParsedAdapter> {
    // Group `<layer>.<leaf>` keys by layer.
    let mut groups: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((layer, leaf)) = split_leaf(&key) else {
            bail!("unexpected key `{key}` in a kohya-style adapter");
        };
        groups.entry(layer.to_string()).or_default().insert(leaf.to_string(), t);
    }
    let mut layers = Vec::with_capacity(groups.len());
    let mut glora_layout = None;
    for (name, mut g) in groups {
        let alpha = g.remove("alpha").map(|t| alpha_scalar(&name, &t)).transpose()?.flatten();
        let delta = if let (Some(down), Some(up)) = (g.remove("lora_down.weight"), g.remove("lora_up.weight")) {
            Delta::Lora { down, up }
        } else if g.contains_key("a1.weight") {
            let mut take = |k: &str| g.remove(k).ok_or_else(|| anyhow::anyhow!("GLoRA layer `{name}` lacks `{k}`"));
            let (a1, a2, b1, b2) = (take("a1.weight")?, take("a2.weight")?, take("b1.weight")?, take("b2.weight")?);
            let (delta, layout) =
                glora_from_file(&name, a1, a2, b1, b2, metadata.get(GLORA_LAYOUT_KEY).map(String::as_str))?;
            glora_layout = Some(layout);
            delta
        } else {
            let mut leaves: Vec<&String> = g.keys().collect();
            leaves.sort();
            bail!("layer `{name}`: unsupported adapter type (keys {leaves:?}); LoRA, LoCon and GLoRA are supported");
        };
        if !g.is_empty() {
            let mut leaves: Vec<&String> = g.keys().collect();
            leaves.sort();
            bail!("layer `{name}`: unexpected extra keys {leaves:?}");
        }
        layers.push(ParsedLayer { key: LayerKey::Flat(name), delta, alpha });
    }
    Ok(ParsedAdapter { naming: Naming::Kohya, glora_layout, layers, metadata })
}

fn split_leaf(key: &str) -> Option<(&str, &str)> {
    for leaf in [
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
        "a1.weight",
        "a2.weight",
        "b1.weight",
        "b2.weight",
        "lora_mid.weight",
        "dora_scale",
        "hada_w1_a",
        "lokr_w1",
    ] {
        if let Some(layer) = key.strip_suffix(leaf).and_then(|k| k.strip_suffix('.')) {
            return Some((layer, leaf));
        }
    }
    key.split_once('.')
}

/// Puts GLoRA factors into the current layout. The legacy layout (A1111's) swaps the roles:
/// its a1/a2/b1/b2 are our a2/a1/b2/b1. Shapes tell them apart except when rank = in = out,
/// where our metadata says which it is.
fn glora_from_file(
    name: &str,
    a1: Tensor,
    a2: Tensor,
    b1: Tensor,
    b2: Tensor,
    recorded: Option<&str>,
) -> Result<(Delta, GloraLayout)> {
    let d = |t: &Tensor, i: usize| t.dims().get(i).copied().unwrap_or(0);
    // Current: a1 (in, r), a2 (r, in), b2 (r, in, …). Legacy: a1 (r, in), a2 (in, r), b1 (r, in, …).
    let current_fits = d(&a1, 0) == d(&a2, 1)
        && d(&a1, 1) == d(&a2, 0)
        && d(&b2, 0) == d(&a2, 0)
        && d(&b1, 1) == d(&a2, 0)
        && d(&b2, 1) == d(&a2, 1);
    let legacy_fits = d(&a1, 0) == d(&a2, 1)
        && d(&a1, 1) == d(&a2, 0)
        && d(&b1, 0) == d(&a1, 0)
        && d(&b2, 1) == d(&a1, 0)
        && d(&b1, 1) == d(&a1, 1);
    let legacy = match (current_fits, legacy_fits) {
        (true, false) => false,
        (false, true) => true,
        (true, true) => recorded == Some("legacy"),
        (false, false) => bail!(
            "GLoRA layer `{name}`: factor shapes {:?} {:?} {:?} {:?} fit neither layout",
            a1.dims(),
            a2.dims(),
            b1.dims(),
            b2.dims()
        ),
    };
    Ok(if legacy {
        (Delta::Glora { a1: a2, a2: a1, b1: b2, b2: b1 }, GloraLayout::Legacy)
    } else {
        (Delta::Glora { a1, a2, b1, b2 }, GloraLayout::Current)
    })
}

/// kohya's flattened layer name for a module path.
pub fn flat_name(component: Component, path: &str) -> String {
    let prefix = match component {
        Component::Unet => "lora_unet_",
        Component::TextEncoder => "lora_te_",
    };
    format!("{prefix}{}", path.replace('.', "_"))
}

/// Tensors and `ss_*` metadata for a kohya / LyCORIS file.
pub fn to_tensors(
    layers: &[ExportLayer],
    mut metadata: HashMap<String, String>,
    layout: GloraLayout,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let mut has_glora = false;
    let mut has_conv = false;
    for l in layers {
        let name = flat_name(l.component, &l.path);
        match &l.delta {
            Delta::Lora { down, up } => {
                has_conv |= down.rank() == 4;
                out.insert(format!("{name}.lora_down.weight"), down.clone());
                out.insert(format!("{name}.lora_up.weight"), up.clone());
            }
            Delta::Glora { a1, a2, b1, b2 } => {
                has_glora = true;
                let (a1, a2, b1, b2) = match layout {
                    GloraLayout::Current => (a1, a2, b1, b2),
                    GloraLayout::Legacy => (a2, a1, b2, b1),
                };
                out.insert(format!("{name}.a1.weight"), a1.clone());
                out.insert(format!("{name}.a2.weight"), a2.clone());
                out.insert(format!("{name}.b1.weight"), b1.clone());
                out.insert(format!("{name}.b2.weight"), b2.clone());
            }
        }
        let device = l.delta.tensors()[0].device().clone();
        out.insert(format!("{name}.alpha"), Tensor::new(l.alpha as f32, &device)?);
    }
    let rank = layers.iter().map(|l| l.delta.rank()).max().unwrap_or(0);
    let alpha = layers.first().map(|l| l.alpha).unwrap_or(0.0);
    metadata.insert("ss_network_dim".into(), rank.to_string());
    metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
    if has_glora {
        metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
        metadata.insert("ss_network_args".into(), r#"{"algo": "glora"}"#.into());
        metadata
            .insert(GLORA_LAYOUT_KEY.into(), if layout == GloraLayout::Legacy { "legacy" } else { "current" }.into());
    } else if has_conv {
        metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
        metadata.insert("ss_network_args".into(), r#"{"algo": "locon"}"#.into());
    } else {
        metadata.insert("ss_network_module".into(), "networks.lora".into());
    }
    Ok((out, metadata))
}
