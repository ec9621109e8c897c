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
use crate::engine::adapters::delta::{Delta, KronFactor};

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
        let (delta, layout) = layer_delta(&name, &mut g, alpha, metadata.get(GLORA_LAYOUT_KEY).map(String::as_str))?;
        glora_layout = glora_layout.or(layout);
        if !g.is_empty() {
            let mut leaves: Vec<&String> = g.keys().collect();
            leaves.sort();
            bail!("layer `{name}` ({}): unexpected extra keys {leaves:?}", delta.algorithm());
        }
        // DoRA's α sits inside its norm (`inner_scale`); the stack's α / r is 1 for it.
        let alpha = if matches!(delta, Delta::Dora { .. }) { None } else { alpha };
        layers.push(ParsedLayer { key: LayerKey::Flat(name), delta, alpha });
    }
    Ok(ParsedAdapter { naming: Naming::Kohya, glora_layout, layers, metadata })
}

/// Every per-layer key LyCORIS, kohya and A1111 write (and those of kinds we name but refuse).
const LEAVES: &[&str] = &[
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t1",
    "lokr_t2",
    "diff",
    "diff_b",
    "oft_blocks",
    "oft_diag",
    "rescale",
    "w_norm",
    "b_norm",
    "on_input",
    "weight",
    "scalar",
];

/// The update one layer's keys describe; refuses kinds it cannot apply exactly, saying what they are.
fn layer_delta(
    name: &str,
    g: &mut HashMap<String, Tensor>,
    alpha: Option<f64>,
    glora_recorded: Option<&str>,
) -> Result<(Delta, Option<GloraLayout>)> {
    let what = |kind: &str| format!("layer `{name}`: {kind}");
    if g.contains_key("on_input") || (g.contains_key("weight") && !g.contains_key("lora_down.weight")) {
        bail!("{}, not supported (an (IA)³ adapter scales activations; no tool here applies it)", what("IA³"));
    }
    if g.contains_key("rescale") {
        bail!("{}, not supported yet (OFT with a learned rescale)", what("OFT with `rescale`"));
    }
    if g.contains_key("oft_diag") {
        bail!(
            "{}, not supported (LyCORIS' layout before 2.0, `oft_diag`); convert it with a current LyCORIS",
            what("an early LyCORIS OFT")
        );
    }
    if g.contains_key("scalar") {
        bail!(
            "{}, not supported (an unbaked LyCORIS `scalar`; LyCORIS folds it into the factors when saving)",
            what("a LyCORIS training state")
        );
    }
    let take = |g: &mut HashMap<String, Tensor>, k: &str| {
        g.remove(k).ok_or_else(|| anyhow::anyhow!("layer `{name}` lacks `{k}`"))
    };
    let mut layout = None;
    let inner = if g.contains_key("lora_down.weight") || g.contains_key("lora_up.weight") {
        let (down, up) = (take(g, "lora_down.weight")?, take(g, "lora_up.weight")?);
        match g.remove("lora_mid.weight") {
            Some(mid) => Delta::Tucker { down, mid, up },
            None => Delta::Lora { down, up },
        }
    } else if g.contains_key("a1.weight") {
        let (a1, a2, b1, b2) =
            (take(g, "a1.weight")?, take(g, "a2.weight")?, take(g, "b1.weight")?, take(g, "b2.weight")?);
        let (delta, l) = glora_from_file(name, a1, a2, b1, b2, glora_recorded)?;
        layout = Some(l);
        delta
    } else if g.contains_key("hada_w1_a") {
        let (w1a, w1b, w2a, w2b) =
            (take(g, "hada_w1_a")?, take(g, "hada_w1_b")?, take(g, "hada_w2_a")?, take(g, "hada_w2_b")?);
        let tucker = match (g.remove("hada_t1"), g.remove("hada_t2")) {
            (Some(t1), Some(t2)) => Some((t1, t2)),
            (None, None) => None,
            _ => bail!("layer `{name}`: LoHa with only one of hada_t1 / hada_t2"),
        };
        Delta::Loha { w1a, w1b, w2a, w2b, tucker }
    } else if g.contains_key("lokr_w1") || g.contains_key("lokr_w1_a") {
        let mut factor = |side: &str| -> Result<KronFactor> {
            if let Some(w) = g.remove(&format!("lokr_w{side}")) {
                return Ok(KronFactor::Whole(w));
            }
            let a = g.remove(&format!("lokr_w{side}_a"));
            let b = g.remove(&format!("lokr_w{side}_b"));
            match (a, b) {
                (Some(a), Some(b)) => Ok(KronFactor::LowRank { a, b, tucker: g.remove(&format!("lokr_t{side}")) }),
                _ => bail!("layer `{name}`: LoKr lacks lokr_w{side} (or lokr_w{side}_a and _b)"),
            }
        };
        Delta::Lokr { w1: factor("1")?, w2: factor("2")? }
    } else if g.contains_key("w_norm") {
        // LyCORIS' norm update: the norm's scale and shift move by s·w_norm, s·b_norm.
        Delta::Full { diff: take(g, "w_norm")?, diff_b: g.remove("b_norm") }
    } else if g.contains_key("diff") {
        Delta::Full { diff: take(g, "diff")?, diff_b: g.remove("diff_b") }
    } else if g.contains_key("oft_blocks") {
        let blocks = take(g, "oft_blocks")?;
        let constraint = alpha.unwrap_or(0.0);
        match blocks.rank() {
            3 => Delta::Oft { blocks, constraint },
            4 => Delta::Boft { blocks, constraint },
            _ => bail!(
                "layer `{name}`: oft_blocks of shape {:?} is neither diag-OFT (3-D) nor BOFT (4-D)",
                blocks.dims()
            ),
        }
    } else {
        let mut leaves: Vec<&String> = g.keys().collect();
        leaves.sort();
        bail!("layer `{name}`: unknown adapter type (keys {leaves:?})");
    };
    let delta = match g.remove("dora_scale") {
        Some(magnitude) => {
            if !matches!(inner, Delta::Lora { .. } | Delta::Tucker { .. } | Delta::Loha { .. } | Delta::Lokr { .. }) {
                bail!("layer `{name}`: DoRA over {} is not something any tool writes", inner.algorithm());
            }
            let inner_scale = inner.scale_from_alpha(alpha);
            Delta::Dora { inner: Box::new(inner), inner_scale, magnitude }
        }
        None => inner,
    };
    Ok((delta, layout))
}

fn split_leaf(key: &str) -> Option<(&str, &str)> {
    for leaf in LEAVES {
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

/// kohya's flattened layer name for a module path. A model with two text encoders (SDXL) names
/// them `lora_te1_` / `lora_te2_`, as sd-scripts, A1111 and ComfyUI read them.
pub fn flat_name(component: Component, path: &str, two_text_encoders: bool) -> String {
    let prefix = match component {
        Component::Unet => "lora_unet_",
        Component::TextEncoder if two_text_encoders => "lora_te1_",
        Component::TextEncoder => "lora_te_",
        Component::TextEncoder2 => "lora_te2_",
    };
    format!("{prefix}{}", path.replace('.', "_"))
}

/// LyCORIS' `algo` name for a kind (what its `ss_network_args` says).
fn lycoris_algo(delta: &Delta) -> &'static str {
    match delta {
        Delta::Lora { .. } | Delta::Tucker { .. } => "locon",
        Delta::Glora { .. } => "glora",
        Delta::Loha { .. } => "loha",
        Delta::Lokr { .. } => "lokr",
        Delta::Full { .. } => "full",
        Delta::Dora { inner, .. } => lycoris_algo(inner),
        Delta::Oft { .. } => "diag-oft",
        Delta::Boft { .. } => "boft",
    }
}

/// One layer's keys (after `<layer>.`) as LyCORIS writes them; α where the kind has one.
fn layer_tensors(delta: &Delta, alpha: f64, layout: GloraLayout) -> Result<Vec<(String, Tensor)>> {
    let device = delta.tensors()[0].device().clone();
    let number = |a: f64| Tensor::new(a as f32, &device);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut put = |k: &str, t: &Tensor| out.push((k.to_string(), t.clone()));
    match delta {
        Delta::Lora { down, up } => {
            put("lora_down.weight", down);
            put("lora_up.weight", up);
        }
        Delta::Tucker { down, mid, up } => {
            put("lora_down.weight", down);
            put("lora_mid.weight", mid);
            put("lora_up.weight", up);
        }
        Delta::Glora { a1, a2, b1, b2 } => {
            let (a1, a2, b1, b2) = match layout {
                GloraLayout::Current => (a1, a2, b1, b2),
                GloraLayout::Legacy => (a2, a1, b2, b1),
            };
            put("a1.weight", a1);
            put("a2.weight", a2);
            put("b1.weight", b1);
            put("b2.weight", b2);
        }
        Delta::Loha { w1a, w1b, w2a, w2b, tucker } => {
            put("hada_w1_a", w1a);
            put("hada_w1_b", w1b);
            put("hada_w2_a", w2a);
            put("hada_w2_b", w2b);
            if let Some((t1, t2)) = tucker {
                put("hada_t1", t1);
                put("hada_t2", t2);
            }
        }
        Delta::Lokr { w1, w2 } => {
            for (side, f) in [("1", w1), ("2", w2)] {
                match f {
                    KronFactor::Whole(t) => put(&format!("lokr_w{side}"), t),
                    KronFactor::LowRank { a, b, tucker } => {
                        put(&format!("lokr_w{side}_a"), a);
                        put(&format!("lokr_w{side}_b"), b);
                        if let Some(t) = tucker {
                            put(&format!("lokr_t{side}"), t);
                        }
                    }
                }
            }
        }
        Delta::Full { diff, diff_b } => {
            let (w, b) = if diff.rank() == 1 { ("w_norm", "b_norm") } else { ("diff", "diff_b") };
            put(w, diff);
            if let Some(bias) = diff_b {
                put(b, bias);
            }
            return Ok(out); // no α: a full diff has no rank to scale by
        }
        Delta::Dora { inner, inner_scale, magnitude } => {
            let mut keys = layer_tensors(inner, inner_scale * inner.rank() as f64, layout)?;
            keys.push(("dora_scale".into(), magnitude.clone()));
            return Ok(keys);
        }
        Delta::Oft { blocks, constraint } | Delta::Boft { blocks, constraint } => {
            put("oft_blocks", blocks);
            // For OFT kinds α is the rotation constraint, not a strength.
            out.push(("alpha".into(), number(*constraint)?));
            return Ok(out);
        }
    }
    out.push(("alpha".into(), number(alpha)?));
    Ok(out)
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
    let mut algos = std::collections::BTreeSet::new();
    // An SDXL file says so in its metadata even when it adapts only the first text encoder.
    let two_text_encoders = layers.iter().any(|l| l.component == Component::TextEncoder2)
        || metadata.get("ss_base_model_version").is_some_and(|v| v.starts_with("sdxl"));
    for l in layers {
        let name = flat_name(l.component, &l.path, two_text_encoders);
        has_glora |= matches!(l.delta, Delta::Glora { .. });
        has_conv |= matches!(&l.delta, Delta::Lora { down, .. } if down.rank() == 4);
        if !matches!(l.delta, Delta::Lora { .. } | Delta::Glora { .. }) {
            algos.insert(lycoris_algo(&l.delta));
        }
        for (leaf, t) in layer_tensors(&l.delta, l.alpha, layout)? {
            out.insert(format!("{name}.{leaf}"), t);
        }
    }
    let rank = layers.iter().map(|l| l.delta.rank()).max().unwrap_or(0);
    let alpha = layers.first().map(|l| l.alpha).unwrap_or(0.0);
    metadata.insert("ss_network_dim".into(), rank.to_string());
    metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
    if let Some(algo) = algos.iter().next() {
        metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
        metadata.insert("ss_network_args".into(), serde_json::json!({ "algo": algo }).to_string());
    } else if has_glora {
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
