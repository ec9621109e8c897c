//! Adapter files as users trade them. Each naming convention has its own module (`kohya`,
//! `peft`); this one holds what they share: the parsed adapter, and matching its layers against a
//! model's real module names with a compatibility report.

pub mod kohya;
pub mod peft;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::bail;
use candle_core::Tensor;

use crate::engine::Result;
use crate::engine::adapters::delta::{Delta, strength_semantics};
use crate::engine::io::single_file::unet_module;
use crate::engine::io::weights::{all_finite, parse_safetensors, read_safetensors_with_metadata};
use crate::engine::models::family::ModelFamily;

/// Which model of the pipeline a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    /// The (first) text encoder: CLIP ViT-L in SD 1.x and SDXL, OpenCLIP ViT-H in SD 2.x.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG, with its projection).
    TextEncoder2,
}

impl Component {
    /// The component's name in a diffusers folder and in PEFT keys.
    pub fn label(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    pub fn is_text_encoder(self) -> bool {
        self != Component::Unet
    }
}

/// How a file names its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Naming {
    /// kohya sd-scripts / A1111 / ComfyUI / LyCORIS: `lora_unet_down_blocks_0_…`.
    Kohya,
    /// diffusers / PEFT: `unet.down_blocks.0.….lora_A.weight`.
    Peft,
}

/// Where a parsed layer says it belongs, before matching against a model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LayerKey {
    /// A kohya name with the dots flattened to underscores, e.g. `lora_unet_mid_block_attentions_0_proj_in`.
    Flat(String),
    /// A real module path.
    Path(Component, String),
}

impl std::fmt::Display for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerKey::Flat(n) => f.write_str(n),
            LayerKey::Path(c, p) => write!(f, "{}.{p}", c.label()),
        }
    }
}

/// One layer's update as read from a file.
#[derive(Clone, Debug)]
pub struct ParsedLayer {
    pub key: LayerKey,
    pub delta: Delta,
    /// α as stored; `None` means α = rank (scale 1).
    pub alpha: Option<f64>,
}

impl ParsedLayer {
    /// α / r for the kinds α scales. A missing or zero α means α = r (scale 1), as kohya, A1111
    /// and ComfyUI read it.
    pub fn scale(&self) -> f64 {
        self.delta.scale_from_alpha(self.alpha)
    }
}

/// An adapter file, parsed but not yet matched to a model.
#[derive(Clone, Debug)]
pub struct ParsedAdapter {
    pub naming: Naming,
    /// For GLoRA files: the layout the factors were stored in (they are held in the current one).
    pub glora_layout: Option<GloraLayout>,
    pub layers: Vec<ParsedLayer>,
    pub metadata: HashMap<String, String>,
}

/// Reads an adapter file in any supported naming, telling them apart by their keys.
pub fn read_adapter(path: &Path) -> Result<ParsedAdapter> {
    let (tensors, metadata) = read_safetensors_with_metadata(path)?;
    parse_adapter(tensors, metadata).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// Parses a whole adapter file held in memory (the fuzzing entry point; `read_adapter` reads a path).
pub fn parse_adapter_bytes(bytes: &[u8]) -> Result<ParsedAdapter> {
    let (tensors, metadata) = parse_safetensors(bytes, "adapter")?;
    parse_adapter(tensors, metadata)
}

pub fn parse_adapter(tensors: HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<ParsedAdapter> {
    if tensors.is_empty() {
        bail!("the file holds no tensors");
    }
    if tensors.keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te") || k.starts_with("oft_unet_")) {
        return validated(kohya::parse(tensors, metadata)?);
    }
    if tensors.keys().any(|k| peft::is_peft_key(k)) {
        return validated(peft::parse(tensors, metadata)?);
    }
    if tensors
        .keys()
        .any(|k| k.starts_with("model.diffusion_model.") || k.starts_with("conv_in.") || k.starts_with("text_model."))
    {
        bail!("this is a base model, not an adapter");
    }
    let sample: Vec<&String> = tensors.keys().take(3).collect();
    bail!("not a recognised adapter file (keys like {sample:?})")
}

/// Refuses tensors that later code could not use safely: scalars or more than 4-D (no kind has
/// them; each kind's shapes are checked against its layer when matched), empty, or holding NaN / ∞,
/// and non-finite α.
fn validated(adapter: ParsedAdapter) -> Result<ParsedAdapter> {
    for layer in &adapter.layers {
        layer.delta.check_form().map_err(|e| anyhow::anyhow!("layer `{}`: {e}", layer.key))?;
        for t in layer.delta.tensors() {
            let dims = t.dims();
            if !(1..=4).contains(&dims.len()) {
                bail!("layer `{}`: a tensor has shape {dims:?}; expected 1 to 4 dimensions", layer.key);
            }
            if dims.contains(&0) {
                bail!("layer `{}`: a factor has an empty shape {dims:?}", layer.key);
            }
            if !t.dtype().is_float() {
                bail!("layer `{}`: factors must be floating point, found {:?}", layer.key, t.dtype());
            }
            if !all_finite(t)? {
                bail!("layer `{}`: factors contain NaN or infinite values (the file is corrupt)", layer.key);
            }
        }
        if let Some(alpha) = layer.alpha
            && !alpha.is_finite()
        {
            bail!("layer `{}`: alpha is {alpha}", layer.key);
        }
    }
    Ok(adapter)
}

/// A model's adaptable layers: component, module path and weight shape.
#[derive(Clone, Debug, Default)]
pub struct ModuleIndex {
    pub layers: BTreeMap<(Component, String), Vec<usize>>,
    flat: HashMap<String, (Component, String)>,
    /// The UNet's layers per block, to name layers the original (ldm) way too.
    pub layers_per_block: Option<usize>,
    /// The model's family, for the compatibility report's words.
    pub family: Option<ModelFamily>,
}

impl ModuleIndex {
    /// An empty index; with the UNet's layers per block it also knows the ldm names.
    pub fn new(layers_per_block: Option<usize>) -> Self {
        Self { layers_per_block, ..Default::default() }
    }

    pub fn insert(&mut self, component: Component, path: &str, shape: Vec<usize>) {
        let flat = path.replace('.', "_");
        match component {
            Component::Unet => {
                self.flat.insert(format!("lora_unet_{flat}"), (component, path.to_string()));
            }
            Component::TextEncoder => {
                // kohya spells SD 1.x/2.x text encoders `lora_te_`; SDXL-style files use `lora_te1_`.
                self.flat.insert(format!("lora_te_{flat}"), (component, path.to_string()));
                self.flat.insert(format!("lora_te1_{flat}"), (component, path.to_string()));
            }
            Component::TextEncoder2 => {
                self.flat.insert(format!("lora_te2_{flat}"), (component, path.to_string()));
            }
        }
        self.layers.insert((component, path.to_string()), shape);
    }

    pub fn resolve(&self, key: &LayerKey) -> Option<(Component, String)> {
        match key {
            LayerKey::Flat(n) => {
                // kohya's own OFT network names its layers `oft_unet_…` instead of `lora_unet_…`.
                match n.strip_prefix("oft_unet_") {
                    Some(rest) => self.resolve_flat(&format!("lora_unet_{rest}")),
                    None => self.resolve_flat(n),
                }
            }
            LayerKey::Path(c, p) => self.layers.contains_key(&(*c, p.clone())).then(|| (*c, p.clone())),
        }
    }

    fn resolve_flat(&self, n: &str) -> Option<(Component, String)> {
        self.flat.get(n).cloned().or_else(|| {
            // Older kohya files and ComfyUI name UNet layers the original (ldm) way.
            let ldm = n.strip_prefix("lora_unet_")?;
            let path = unet_module(ldm, '_', self.layers_per_block?)?;
            self.layers.contains_key(&(Component::Unet, path.clone())).then_some((Component::Unet, path))
        })
    }

    pub fn shape(&self, component: Component, path: &str) -> Option<&Vec<usize>> {
        self.layers.get(&(component, path.to_string()))
    }
}

/// A layer of an adapter matched to a model layer.
#[derive(Clone, Debug)]
pub struct MatchedLayer {
    pub component: Component,
    pub path: String,
    pub delta: Delta,
    pub scale: f64,
}

/// What matched when an adapter was checked against a model.
#[derive(Clone, Debug, Default)]
pub struct CompatibilityReport {
    pub matched: usize,
    pub total: usize,
    pub unmatched: Vec<String>,
    pub shape_mismatches: Vec<String>,
    /// The adapter's family and the model's, when they are known and differ.
    pub family_mismatch: Option<(ModelFamily, ModelFamily)>,
}

impl CompatibilityReport {
    /// Refused whatever the user says: an adapter for another family, a layer of the wrong shape
    /// or no layer that fits at all.
    pub fn refused(&self) -> bool {
        self.family_mismatch.is_some() || !self.shape_mismatches.is_empty() || self.matched == 0
    }

    /// Some layers find no home in this model: loading the rest changes the picture differently
    /// from the tools the file was made for, so it is done only when asked for.
    pub fn partial(&self) -> bool {
        self.matched < self.total
    }

    /// The refusal as an error (with the summary), for the callers that load the adapter. A
    /// partial fit is refused unless `allow_partial`.
    pub fn accept(&self, allow_partial: bool) -> Result<()> {
        if self.refused() {
            bail!("adapter does not fit this model: {}", self.summary());
        }
        if self.partial() && !allow_partial {
            bail!(
                "only part of the adapter fits this model, so nothing was loaded: {}{} (load it partially only if you mean to)",
                self.summary(),
                if self.unmatched.len() > 1 { format!("; all: {}", self.unmatched.join(", ")) } else { String::new() }
            );
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let mut s = match self.family_mismatch {
            Some((adapter, model)) => {
                format!("this adapter was trained for {}; this model is {}: ", adapter.label(), model.label())
            }
            None => String::new(),
        };
        s += &format!("{} of {} adapter layers match the model", self.matched, self.total);
        if !self.shape_mismatches.is_empty() {
            s += &format!(
                "; {} have the wrong shape (first: {})",
                self.shape_mismatches.len(),
                self.shape_mismatches[0]
            );
        }
        if !self.unmatched.is_empty() {
            s += &format!("; {} name no layer of this model (first: {})", self.unmatched.len(), self.unmatched[0]);
        }
        s
    }
}

/// Matches every layer of `adapter` against `index`: the layers that fit, and the report of how
/// the file fits the model (which `CompatibilityReport::accept` turns into the refusal, so an
/// inspection learns it from the value, not from an error).
pub fn match_layers(adapter: &ParsedAdapter, index: &ModuleIndex) -> Result<(Vec<MatchedLayer>, CompatibilityReport)> {
    let mut report = CompatibilityReport { total: adapter.layers.len(), ..Default::default() };
    if let (Some(a), Some(m)) = (adapter_family(adapter), index.family)
        && a != m
    {
        report.family_mismatch = Some((a, m));
    }
    let mut matched = Vec::new();
    for layer in &adapter.layers {
        let Some((component, path)) = index.resolve(&layer.key) else {
            report.unmatched.push(layer.key.to_string());
            continue;
        };
        let shape = index.shape(component, &path).expect("resolved layers are indexed");
        if let Err(e) = layer.delta.check_shapes(shape) {
            report.shape_mismatches.push(format!("{}: {e}{}", layer.key, shape_hint(&layer.key, &layer.delta, shape)));
            continue;
        }
        report.matched += 1;
        matched.push(MatchedLayer { component, path, scale: layer.scale(), delta: layer.delta.clone() });
    }
    Ok((matched, report))
}

/// A guess at why shapes differ, in the words a user needs.
fn shape_hint(key: &LayerKey, delta: &Delta, base: &[usize]) -> String {
    let Some(input) = delta.input_width() else { return String::new() };
    let name = key.to_string().replace('.', "_");
    let cross = name.contains("attn2_to_k") || name.contains("attn2_to_v");
    if !cross || base.get(1) == Some(&input) {
        return String::new();
    }
    let family = |w: usize| match w {
        768 => " (SD 1.x)",
        1024 => " (SD 2.x)",
        2048 => " (SDXL)",
        _ => "",
    };
    let ours = base.get(1).copied().unwrap_or(0);
    format!(
        " — this adapter was trained for a model with cross-attention {input}{}, this model's is {ours}{}",
        family(input),
        family(ours)
    )
}

/// One layer of an adapter to write: where it goes, its factors and its α.
#[derive(Clone, Debug)]
pub struct ExportLayer {
    pub component: Component,
    pub path: String,
    pub delta: Delta,
    pub alpha: f64,
}

impl From<&MatchedLayer> for ExportLayer {
    fn from(m: &MatchedLayer) -> Self {
        // scale = α / r, so α = scale · r keeps the file's effective strength.
        Self {
            component: m.component,
            path: m.path.clone(),
            alpha: m.scale * m.delta.rank() as f64,
            delta: m.delta.clone(),
        }
    }
}

/// Export options shared by the formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GloraLayout {
    /// LyCORIS today and ComfyUI: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in).
    Current,
    /// What A1111 reads: a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r).
    Legacy,
}

/// Metadata key recording the GLoRA layout, since square weights make shapes ambiguous.
pub const GLORA_LAYOUT_KEY: &str = "lora_studio_glora_layout";

/// Writes `layers` atomically in the chosen naming, as f32 or f16.
pub fn write_adapter(
    path: &Path,
    naming: Naming,
    layers: &[ExportLayer],
    metadata: HashMap<String, String>,
    dtype: candle_core::DType,
    glora_layout: GloraLayout,
) -> Result<()> {
    let (tensors, metadata) = match naming {
        Naming::Kohya => kohya::to_tensors(layers, metadata, glora_layout)?,
        Naming::Peft => peft::to_tensors(layers, metadata)?,
    };
    let mut converted = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t.to_dtype(dtype)?;
        // A NaN/∞ file would be refused on load; never write one (f16 overflows past 65504).
        if !all_finite(&t)? {
            bail!(
                "{}: tensor `{k}` would be NaN or infinite in {dtype:?} (are the weights too large?); nothing was written",
                path.display()
            );
        }
        converted.insert(k, t);
    }
    let mut metadata = metadata;
    if naming == Naming::Kohya {
        let (model, legacy) = crate::engine::io::weights::addnet_hashes(&converted, &metadata)?;
        metadata.insert("sshs_model_hash".into(), model);
        metadata.insert("sshs_legacy_hash".into(), legacy);
    }
    crate::engine::io::weights::write_safetensors(path, &converted, Some(metadata))
}

/// Reads a layer's α tensor: one number (shape `[]` or `[1]`). An empty tensor reads as no α.
/// More than one number is refused: no tool stores α per element, so the file is not what it seems.
pub(crate) fn alpha_scalar(layer: &str, t: &Tensor) -> Result<Option<f64>> {
    let values = t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match values.as_slice() {
        [] => Ok(None),
        [a] => Ok(Some(*a)),
        _ => {
            bail!("layer `{layer}`: alpha holds {} numbers (shape {:?}); it must be one number", values.len(), t.dims())
        }
    }
}

/// What `lora-studio adapter info` reports about a file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub naming: String,
    pub layers: usize,
    /// Layer count per algorithm (`lora`, `locon`, `loha`, `lokr`, `lora + dora (output axis)`, …).
    pub algorithms: BTreeMap<String, usize>,
    /// How the slider acts, for the algorithms whose strength is not a plain scale of ΔW (DoRA,
    /// OFT): each explanation with the algorithms it applies to.
    pub semantics: BTreeMap<String, Vec<String>>,
    pub glora_layout: Option<String>,
    /// "SD 1.x", "SD 2.x", "SDXL" or "unknown", from the cross-attention input width.
    pub family: String,
    /// Layer count per "rank r, scale α/r" (OFT: block size; full diffs: no rank).
    pub ranks: BTreeMap<String, usize>,
    /// Layer count per target kind (cross-attention, self-attention, feed-forward, …).
    pub targets: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
}

impl AdapterSummary {
    /// The format doctor's findings as labelled lines (`adapter info` and the Playground's check).
    pub fn lines(&self) -> Vec<(&'static str, String)> {
        let mut lines = vec![("naming", self.naming.clone()), ("layers", self.layers.to_string())];
        let algos: Vec<String> = self.algorithms.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        lines.push(("algorithm", algos.join(", ")));
        lines.extend(
            self.semantics.iter().map(|(how, algos)| ("strength semantics", format!("{}: {how}", algos.join(", ")))),
        );
        if let Some(layout) = &self.glora_layout {
            lines.push(("GLoRA layout", layout.clone()));
        }
        lines.push(("base model", format!("{} (guessed from shapes)", self.family)));
        lines.extend(self.ranks.iter().map(|(k, v)| ("strength", format!("{k} on {v} layers"))));
        lines.extend(self.targets.iter().map(|(k, v)| ("targets", format!("{k}: {v} layers"))));
        lines
    }
}

/// The family an adapter was made for: SDXL when it adapts a second text encoder, otherwise from
/// its cross-attention key/value input width; `None` when nothing says.
pub fn adapter_family(parsed: &ParsedAdapter) -> Option<ModelFamily> {
    let mut width = None;
    for l in &parsed.layers {
        let name = l.key.to_string().replace('.', "_");
        if name.starts_with("lora_te2_") || name.starts_with("text_encoder_2_") {
            return Some(ModelFamily::Sdxl);
        }
        if name.contains("attn2_to_k") || name.contains("attn2_to_v") {
            width = l.delta.input_width().or(width);
        }
    }
    ModelFamily::from_context_width(width?)
}

pub fn summarize(parsed: &ParsedAdapter) -> AdapterSummary {
    let mut algorithms = BTreeMap::new();
    let mut semantics: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ranks = BTreeMap::new();
    let mut targets = BTreeMap::new();
    let mut context_width = None;
    for l in &parsed.layers {
        *algorithms.entry(l.delta.algorithm()).or_insert(0) += 1;
        if matches!(l.delta, Delta::Dora { .. } | Delta::Oft { .. } | Delta::Boft { .. }) {
            let algos = semantics.entry(strength_semantics(&l.delta).to_string()).or_default();
            if !algos.contains(&l.delta.algorithm()) {
                algos.push(l.delta.algorithm());
            }
        }
        let strength = match l.delta {
            Delta::Oft { .. } | Delta::Boft { .. } => format!("blocks of {} rows", l.delta.rank()),
            Delta::Full { .. } => "a full weight difference".to_string(),
            Delta::Dora { inner_scale, .. } => {
                format!("rank {}, scale {inner_scale} inside the DoRA norm", l.delta.rank())
            }
            _ => format!("rank {}, scale {}", l.delta.rank(), l.scale()),
        };
        *ranks.entry(strength).or_insert(0) += 1;
        let name = l.key.to_string().replace('.', "_");
        let kind = if name.starts_with("lora_te") || name.starts_with("text_encoder") {
            "text encoder"
        } else if name.contains("attn2") {
            "cross-attention"
        } else if name.contains("attn1") {
            "self-attention"
        } else if name.contains("_ff_") {
            "feed-forward"
        } else if name.contains("proj_in") || name.contains("proj_out") {
            "transformer projection"
        } else if l.delta.algorithm() == "norm" {
            "normalisation"
        } else {
            "convolution / other"
        };
        *targets.entry(kind.to_string()).or_insert(0) += 1;
        if name.contains("attn2_to_k") || name.contains("attn2_to_v") {
            context_width = l.delta.input_width().or(context_width);
        }
    }
    // What the file says (sd-scripts' `ss_base_model_version`) only where the shapes say nothing:
    // a custom-width model's adapter, or one without cross-attention layers.
    let declared = parsed.metadata.get("ss_base_model_version").and_then(|v| {
        let v = v.to_ascii_lowercase();
        if v.starts_with("sdxl") {
            Some(ModelFamily::Sdxl)
        } else if v.starts_with("sd_v2") {
            Some(ModelFamily::Sd2)
        } else if v.starts_with("sd_v1") {
            Some(ModelFamily::Sd1)
        } else {
            None
        }
    });
    let family = match (adapter_family(parsed), context_width, declared) {
        (Some(f), _, _) => f.label(),
        // assets/base: the built-in model's text encoder is 128 wide.
        (None, Some(128), _) => "LoRA Studio built-in",
        (None, _, Some(f)) => f.label(),
        (None, Some(_), None) => "other (custom cross-attention width)",
        (None, None, None) => "unknown (no cross-attention layers)",
    };

    let glora_layout = parsed.glora_layout.map(|l| match l {
        GloraLayout::Current => "current (LyCORIS, ComfyUI)".to_string(),
        GloraLayout::Legacy => "legacy (A1111)".to_string(),
    });
    AdapterSummary {
        naming: match parsed.naming {
            Naming::Kohya => "kohya / A1111 / ComfyUI / LyCORIS".into(),
            Naming::Peft => "diffusers / PEFT".into(),
        },
        layers: parsed.layers.len(),
        algorithms,
        semantics,
        glora_layout,
        family: family.into(),
        ranks,
        targets,
        metadata: parsed.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}
