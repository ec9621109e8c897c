//! Several adapters on one model: exporting the live mix as a single low-rank adapter (truncated
//! SVD per layer, with how much of the mix it keeps), and folding the mix into the base weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::engine::Result;
use crate::engine::adapters::formats::{Component, ExportLayer, GloraLayout, Naming, read_adapter, write_adapter};
use crate::engine::adapters::svd::{Factor, blend_low_rank};
use crate::engine::adapters::{delta::Delta, stack::AdapterStack};
use crate::engine::io::weights::{read_metadata, same_file, tidy_temporaries_beside, write_checked};
use crate::engine::pipeline::StableDiffusion;

/// How faithful a blend is to the live mix it came from.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BlendReport {
    pub layers: usize,
    pub rank: usize,
    /// Σ kept σ² / Σ σ² over all layers: 1.0 means nothing was lost.
    pub kept_energy: f64,
    /// The worst layer's kept energy.
    pub min_layer_energy: f64,
    /// max |ΔW_mix − up·down| / max |ΔW_mix| over all layers.
    pub max_weight_error: f64,
}

/// A layer's active adapters as `coefficient · up · down` factors of its flattened ΔW.
fn factors(stack: &AdapterStack) -> Result<Vec<Factor>> {
    let base = &stack.base_for_compute()?;
    let out = base.dims()[0];
    let n = base.elem_count() / out;
    let mut fs = Vec::new();
    for a in stack.adapters.iter().filter(|a| a.multiplier != 0.0) {
        let c = a.coefficient();
        match &a.delta {
            Delta::Lora { down, up } => {
                fs.push(Factor { up: up.flatten_from(1)?, down: down.flatten_from(1)?, coefficient: c })
            }
            Delta::Glora { a1, a2, b1, b2 } if base.rank() == 2 => {
                // W·a1·a2 + b1·b2 = [W·a1, b1] · [a2; b2]: rank ≤ 2r, still factored.
                fs.push(Factor { up: base.matmul(a1)?, down: a2.clone(), coefficient: c });
                fs.push(Factor { up: b1.clone(), down: b2.clone(), coefficient: c });
            }
            _ => {
                // A GLoRA convolution (W·a1·a2 mixes kernel positions), LoHa, LoKr, DoRA, OFT, full
                // diffs: no small factorisation, so the SVD gets the whole change (at the slider,
                // already scaled) with an identity on the left.
                let dw = a.weight_change(base)?.reshape((out, n))?;
                fs.push(Factor { up: Tensor::eye(out, base.dtype(), base.device())?, down: dw, coefficient: 1.0 });
            }
        }
    }
    Ok(fs)
}

/// The enabled adapters at their current weights as one LoRA/LoCon of `rank` (α = rank).
pub fn blend(sd: &mut StableDiffusion, rank: usize) -> Result<(Vec<ExportLayer>, BlendReport)> {
    let mut work: Vec<(Component, String, Vec<usize>, Vec<Factor>)> = Vec::new();
    sd.try_visit_layers(&mut |c, l| {
        let stack = l.stack_ref();
        if stack.base.rank() < 2 && stack.adapters.iter().any(|a| a.multiplier != 0.0) {
            anyhow::bail!(
                "`{}`: an adapter changes this normalisation layer, which no LoRA can carry; merge it into the model instead",
                l.path()
            );
        }
        if stack.adapters.iter().any(|a| a.multiplier != 0.0 && a.delta.bias_delta().is_some()) {
            // A LoRA changes weights only; dropping the bias change would be a different picture.
            anyhow::bail!(
                "`{}`: an adapter changes this layer's bias (a full diff), which no LoRA can carry; merge it into the model instead",
                l.path()
            );
        }
        let fs = factors(stack)?;
        if !fs.is_empty() {
            work.push((c, l.path().to_string(), stack.base.dims().to_vec(), fs));
        }
        Ok(())
    })?;
    let mut layers = Vec::with_capacity(work.len());
    let mut report = BlendReport { layers: work.len(), rank, min_layer_energy: 1.0, ..Default::default() };
    let (mut kept, mut total) = (0.0, 0.0);
    for (component, path, shape, fs) in work {
        let low = blend_low_rank(&fs, rank)?;
        let k = low.up.dims()[1];
        let energy: f64 = low.singular_values.iter().map(|s| s * s).sum();
        let kept_here: f64 = low.singular_values.iter().take(k).map(|s| s * s).sum();
        kept += kept_here;
        total += energy;
        report.min_layer_energy = report.min_layer_energy.min(low.kept_energy);
        let mix = fs.iter().try_fold(None::<Tensor>, |acc, f| -> Result<Option<Tensor>> {
            let d = (f.up.to_dtype(DType::F32)?.matmul(&f.down.to_dtype(DType::F32)?)? * f.coefficient)?;
            Ok(Some(match acc {
                Some(a) => (a + d)?,
                None => d,
            }))
        })?;
        if let Some(mix) = mix {
            let approx = low.up.matmul(&low.down)?;
            let scale = mix.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let err = (mix - approx)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            if scale > 0.0 {
                report.max_weight_error = report.max_weight_error.max(err / scale);
            }
        }
        let (down, up) = if shape.len() == 4 {
            (low.down.reshape((k, shape[1], shape[2], shape[3]))?, low.up.reshape((shape[0], k, 1, 1))?)
        } else {
            (low.down, low.up)
        };
        layers.push(ExportLayer { component, path, delta: Delta::Lora { down, up }, alpha: k as f64 });
    }
    report.kept_energy = if total > 0.0 { kept / total } else { 1.0 };
    Ok((layers, report))
}

/// How a blend is written: its rank (α = rank), naming and stored dtype.
#[derive(Clone, Copy, Debug)]
pub struct BlendForm {
    pub rank: usize,
    pub naming: Naming,
    pub dtype: DType,
}

/// The live mix written as one adapter file of `rank` (α = rank), the same way from the window
/// and the command line: blended, written under a temporary name, read back (every layer parses,
/// nothing is NaN or ∞), given to `check` (the command line measures the model's output with it),
/// and only then renamed over `out`. `sources` says what was mixed, in the file's metadata; the
/// metadata the `inputs` files agree on is kept.
pub fn export_blend(
    sd: &mut StableDiffusion,
    out: &Path,
    form: BlendForm,
    sources: &[String],
    inputs: &[&Path],
    check: impl FnOnce(&mut StableDiffusion, &Path) -> Result<()>,
) -> Result<BlendReport> {
    // The blend never replaces one of the files it is made from.
    if let Some(input) = inputs.iter().find(|p| same_file(out, p)) {
        anyhow::bail!("{}: this is one of the blended adapters; choose another output", input.display());
    }
    let BlendForm { rank, naming, dtype } = form;
    let (layers, report) = blend(sd, rank)?;
    if layers.is_empty() {
        anyhow::bail!("no enabled adapter with a non-zero weight to export");
    }
    let mut inputs_metadata = Vec::with_capacity(inputs.len());
    for path in inputs {
        inputs_metadata.push(read_metadata(path)?.unwrap_or_default());
    }
    let mut metadata = agreed_metadata(&inputs_metadata);
    metadata.insert("ss_network_dim".into(), rank.to_string());
    metadata.insert("ss_network_alpha".into(), rank.to_string());
    metadata.insert("lora_studio_blend".into(), sources.join("; "));
    tidy_temporaries_beside(out);
    write_checked(
        out,
        |tmp| write_adapter(tmp, naming, &layers, metadata, dtype, GloraLayout::Current),
        |tmp| {
            read_adapter(tmp).map_err(|e| anyhow::anyhow!("{}: the blend does not read back: {e:#}", out.display()))?;
            check(sd, tmp)
        },
    )?;
    Ok(report)
}

/// The metadata every input file agrees on (same key, same value), minus what describes one file
/// rather than its kind (its hashes, name, rank, α, format bookkeeping): a blend of adapters for
/// the same base model keeps saying which model that is.
pub fn agreed_metadata(inputs: &[HashMap<String, String>]) -> HashMap<String, String> {
    const PER_FILE: &[&str] = &[
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_module",
        "ss_network_args",
        "ss_output_name",
        "sshs_model_hash",
        "sshs_legacy_hash",
        "modelspec.title",
        "modelspec.hash_sha256",
        "lora_adapter_metadata",
        "lora_studio_blend",
        "lora_studio_alphas",
        "lora_studio_glora_layout",
        "format",
    ];
    let Some((first, rest)) = inputs.split_first() else { return HashMap::new() };
    first
        .iter()
        .filter(|(k, v)| !PER_FILE.contains(&k.as_str()) && rest.iter().all(|m| m.get(*k) == Some(v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The live mix's change to the base weights, by parameter name per component (`unet` /
/// `text_encoder`), for writing a merged model: each adapted layer's `.weight` change Σ cᵢ·ΔWᵢ, and
/// its `.bias` change when an adapter makes one (full diffs). The writer adds them to the file's own
/// values, so a model kept in half precision in memory still merges at the file's precision.
pub fn weight_changes(sd: &mut StableDiffusion) -> Result<BTreeMap<Component, HashMap<String, Tensor>>> {
    let mut out: BTreeMap<Component, HashMap<String, Tensor>> = BTreeMap::new();
    sd.try_visit_layers(&mut |c, l| {
        let stack = l.stack_ref();
        let active: Vec<_> = stack.adapters.iter().filter(|a| a.multiplier != 0.0).collect();
        if active.is_empty() {
            return Ok(());
        }
        let weights = out.entry(c).or_default();
        if let Some(delta) = stack.delta_sum()? {
            weights.insert(format!("{}.weight", l.path()), delta);
        }
        let bias_changes: Vec<Tensor> = active
            .iter()
            .filter_map(|a| a.delta.bias_delta().map(|d| d.flatten_all().and_then(|d| d * a.coefficient())))
            .collect::<candle_core::Result<_>>()?;
        if !bias_changes.is_empty() {
            let Some(bias) = l.bias() else {
                anyhow::bail!(
                    "`{}` has no bias in this model, but an adapter changes one; a merged model cannot store that",
                    l.path()
                );
            };
            let mut change = bias.zeros_like()?;
            for d in bias_changes {
                change = (change + d.to_dtype(bias.dtype())?)?;
            }
            weights.insert(format!("{}.bias", l.path()), change);
        }
        Ok(())
    })?;
    Ok(out)
}

/// How hard the live mix pushes the model: the largest ‖Σ wᵢ·ΔWᵢ‖ / ‖W‖ (Frobenius) over the
/// layers the adapters touch. Around 0.1 styles blend; past about 0.5 images tend to fry.
pub fn overdrive(sd: &mut StableDiffusion) -> Result<f64> {
    // Merged stacks measured their drive when they merged, so a slider move costs only the
    // layers it re-merged, not a rebuild of every layer's ΔW.
    let mut worst = 0f64;
    sd.try_visit_layers(&mut |_, l| {
        worst = worst.max(l.stack_ref().drive()?);
        Ok(())
    })?;
    Ok(worst)
}

/// "Normalise to a budget": scales slider weights so their absolute values sum to `budget`
/// (weights already within it are left alone), so stacking styles cannot overdrive the model.
fn normalise_to_budget(weights: &[f64], budget: f64) -> Vec<f64> {
    let total: f64 = weights.iter().map(|w| w.abs()).sum();
    if total <= budget || total == 0.0 {
        return weights.to_vec();
    }
    weights.iter().map(|w| w * budget / total).collect()
}

/// How the adapters' slider weights combine into the weights the model applies: the one owner of
/// this policy (the Playground's worker applies it; the window only shows what it gives). Saved
/// in sessions as `"Sum"` or `{"Budget": b}`, so keep the variants' names.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum MixMode {
    /// Each adapter at its own slider weight.
    Sum,
    /// Weights scaled down together so their absolute values sum to at most the budget.
    Budget(f64),
}

impl MixMode {
    /// The weight each adapter gets from its slider (0 for one switched off), in slider order.
    /// Under a budget every weight depends on all the sliders.
    pub fn applied(self, sliders: &[f64]) -> Vec<f64> {
        match self {
            MixMode::Sum => sliders.to_vec(),
            MixMode::Budget(budget) => normalise_to_budget(sliders, budget),
        }
    }
}

#[cfg(test)]
mod agreed_metadata_tests {
    use super::agreed_metadata;
    use std::collections::HashMap;

    #[test]
    fn a_blend_keeps_what_its_inputs_agree_on_and_nothing_about_one_file() {
        let file = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let a = file(&[
            ("ss_base_model_version", "sd_v1"),
            ("ss_v2", "False"),
            ("ss_seed", "1"),
            ("sshs_model_hash", "aa"),
        ]);
        let b = file(&[
            ("ss_base_model_version", "sd_v1"),
            ("ss_v2", "False"),
            ("ss_seed", "2"),
            ("sshs_model_hash", "aa"),
        ]);
        let kept = agreed_metadata(&[a.clone(), b]);
        assert_eq!(kept, file(&[("ss_base_model_version", "sd_v1"), ("ss_v2", "False")]));
        assert_eq!(agreed_metadata(&[a]).len(), 3, "one input keeps all but its own hash");
        assert!(agreed_metadata(&[]).is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::{MixMode, normalise_to_budget};

    #[test]
    fn budget_scales_only_when_exceeded() {
        assert_eq!(normalise_to_budget(&[0.3, 0.2], 1.0), vec![0.3, 0.2]);
        let w = normalise_to_budget(&[1.0, -1.0, 2.0], 2.0);
        assert!((w.iter().map(|x| x.abs()).sum::<f64>() - 2.0).abs() < 1e-12);
        assert!((w[2] / w[0] - 2.0).abs() < 1e-12, "proportions kept");
    }

    #[test]
    fn mix_mode_applies_its_policy_and_keeps_its_saved_form() {
        assert_eq!(MixMode::Sum.applied(&[1.0, 1.0]), vec![1.0, 1.0]);
        assert_eq!(MixMode::Budget(1.0).applied(&[1.0, 1.0, 0.0]), vec![0.5, 0.5, 0.0]);
        // Sessions written before the mode moved here must still load.
        assert_eq!(serde_json::to_string(&MixMode::Sum).unwrap(), r#""Sum""#);
        assert_eq!(serde_json::from_str::<MixMode>(r#"{"Budget":0.8}"#).unwrap(), MixMode::Budget(0.8));
    }
}
