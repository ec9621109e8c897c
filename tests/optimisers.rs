//! The optimisers against their references: prodigyopt's `Prodigy`, transformers' `Adafactor` and
//! torch's `AdamW` stepped on a small problem (`tests/fixtures/optimisers`, made by its
//! `make_reference.py`); ours is fed the same gradients and learning rates and must land on the
//! same weights, step by step, and for Prodigy on the same d.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, IndexOp, Tensor};
use lora_studio::engine::io::weights::read_safetensors_with_metadata;
use lora_studio::engine::train::optim::{AdafactorSettings, Optimizer, ProdigySettings};
use lora_studio::engine::train::trainer::TrainConfig;

const STEPS: usize = 12;
const TENSORS: usize = 3;

fn fixture() -> (HashMap<String, Tensor>, serde_json::Map<String, serde_json::Value>) {
    let root = std::env::var_os("LORA_STUDIO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let (tensors, metadata) = read_safetensors_with_metadata(&root.join("optimisers/reference.safetensors")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&metadata["cases"]).unwrap();
    (tensors, cases.as_object().unwrap().clone())
}

/// The run config that gives the case's optimiser with its settings (the reference's own defaults
/// where the case names none: no weight decay for Prodigy and Adafactor).
fn config_of(case: &serde_json::Value) -> TrainConfig {
    let s = &case["settings"];
    let num = |k: &str, default: f64| s.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
    let flag = |k: &str| s.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let betas = s.get("betas").map_or((0.9, 0.999), |b| (b[0].as_f64().unwrap(), b[1].as_f64().unwrap()));
    TrainConfig {
        optimizer: case["optimizer"].as_str().unwrap().parse().unwrap(),
        weight_decay: num("weight_decay", 0.0),
        beta1: betas.0,
        beta2: betas.1,
        eps: num("eps", 1e-8),
        prodigy: ProdigySettings {
            d0: 1e-6,
            d_coef: num("d_coef", 1.0),
            growth_rate: s.get("growth_rate").and_then(|v| v.as_f64()),
            use_bias_correction: flag("use_bias_correction"),
            safeguard_warmup: flag("safeguard_warmup"),
        },
        adafactor: AdafactorSettings {
            scale_parameter: flag("scale_parameter"),
            relative_step: flag("relative_step"),
            warmup_init: flag("warmup_init"),
        },
        ..Default::default()
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Per case: the worst over steps and tensors of max |ours − ref| / max |ref| (each tensor at
/// each step), and for Prodigy the worst relative error of d.
fn replay(name: &str, case: &serde_json::Value, t: &HashMap<String, Tensor>) -> (f64, f64) {
    let get = |k: String| t.get(&k).unwrap_or_else(|| panic!("`{k}` in the fixture")).clone();
    let config = config_of(case);
    let rule = config.optimizer_rule();
    let lrs: Vec<f64> = get(format!("{name}/lr")).to_vec1().unwrap();
    let scale: Vec<f64> = get(format!("{name}/lr_scale")).to_vec1().unwrap();
    let mut weights: Vec<Tensor> = (0..TENSORS).map(|i| get(format!("{name}/w0/{i}"))).collect();
    let mut state = rule.start(&weights.iter().collect::<Vec<_>>()).unwrap();
    let (mut worst_w, mut worst_d) = (0f64, 0f64);
    for step in 0..STEPS {
        let grads: Vec<Option<Tensor>> =
            (0..TENSORS).map(|i| Some(get(format!("{name}/grad/{i}")).i(step).unwrap())).collect();
        let lr: Vec<f64> = scale.iter().map(|s| lrs[step] * s).collect();
        let stepped = rule.step(&state, &weights, &grads, &lr, step + 1).unwrap();
        for (w, next) in weights.iter_mut().zip(stepped.weights) {
            *w = next.expect("every tensor moves");
        }
        state = stepped.state;
        for (i, w) in weights.iter().enumerate() {
            let reference = get(format!("{name}/w/{i}")).i(step).unwrap();
            let err = max_abs(&(w - &reference).unwrap()) / max_abs(&reference);
            worst_w = worst_w.max(err);
        }
        if config.optimizer == Optimizer::Prodigy {
            let d_ref: Vec<f64> = get(format!("{name}/d")).to_vec1().unwrap();
            let d = state.prodigy.unwrap().d;
            worst_d = worst_d.max((d - d_ref[step]).abs() / d_ref[step]);
        }
    }
    (worst_w, worst_d)
}

fn check(optimizer: Optimizer) {
    let (tensors, cases) = fixture();
    let mut seen = 0;
    for (name, case) in &cases {
        if case["optimizer"].as_str() != Some(optimizer.name()) {
            continue;
        }
        seen += 1;
        let (w, d) = replay(name, case, &tensors);
        let d_note = if optimizer == Optimizer::Prodigy { format!(", d within {d:.2e}") } else { String::new() };
        eprintln!("{name}: weights within {w:.2e} of the reference (relative){d_note}");
        assert!(w <= 1e-6, "{name}: weights differ from the reference by {w:.3e} (relative)");
        assert!(d <= 1e-6, "{name}: d differs from the reference by {d:.3e} (relative)");
    }
    assert!(seen > 0, "the fixture has no {optimizer} case");
}

#[test]
fn prodigy_matches_prodigyopt() {
    check(Optimizer::Prodigy);
}

#[test]
fn adafactor_matches_transformers() {
    check(Optimizer::Adafactor);
}

#[test]
fn adamw_matches_torch() {
    check(Optimizer::AdamW);
}

/// The same in f64: the optimisers are written once for any float type. (Not Prodigy: its estimate
/// of d subtracts weights that have barely moved, where the reference's f32 rounding is large.)
#[test]
fn the_optimisers_step_f64_weights_too() {
    let (tensors, cases) = fixture();
    let f64_tensors: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F64).unwrap())).collect();
    for name in ["adafactor_lr", "adamw_wd_cosine"] {
        let (w, _) = replay(name, &cases[name], &f64_tensors);
        eprintln!("{name} in f64: within {w:.2e} of the f32 reference");
        assert!(w <= 1e-6, "{name} in f64: {w:.3e}");
    }
}
