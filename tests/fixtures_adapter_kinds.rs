//! Every adapter kind people share, as LyCORIS and diffusers/PEFT write it, reproduces the
//! reference outputs computed from the file by the tools' own formulas
//! (`tests/fixtures/sd1-tiny/adapters`, see its README): merged and unmerged, at the fixture's
//! weight 0.7 and, for the kinds whose strength is not a plain scale (DoRA, OFT, BOFT), at 1.0.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use lora_studio::engine::adapters::formats::{read_adapter, summarize};
use lora_studio::engine::io::weights::read_safetensors;
use lora_studio::engine::pipeline::StableDiffusion;
use std::collections::HashMap;

fn adapters_reference() -> HashMap<String, Tensor> {
    read_safetensors(&sd1_tiny().join("adapters/reference.safetensors")).expect("adapter references")
}

/// Loads `name` alone at `weight` and compares both outputs with `<output>_<name><suffix>`.
fn check(name: &str, weight: f64, suffix: &str) {
    let (r, refs) = (reference(), adapters_reference());
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let file = sd1_tiny().join(format!("adapters/{name}.safetensors"));
    let report = sd.load_adapter(name, &file, weight).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(report.matched, report.total, "{name}: every layer finds its home: {}", report.summary());
    for merged in [true, false] {
        sd.set_merged(merged).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        let what = format!("{name} at {weight} (merged {merged})");
        assert_close(&format!("text_embeddings: {what}"), &emb, &refs[&format!("text_embeddings_{name}{suffix}")]);
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("noise_pred: {what}"), &pred, &refs[&format!("noise_pred_{name}{suffix}")]);
    }
}

#[test]
fn loha_matches_lycoris() {
    check("lyco_loha", 0.7, "");
}

#[test]
fn lokr_low_rank_and_full_match_lycoris() {
    check("lyco_lokr", 0.7, "");
    check("lyco_lokr_full", 0.7, "");
}

#[test]
fn locon_with_tucker_core_matches_lycoris() {
    check("lyco_locon_tucker", 0.7, "");
}

#[test]
fn full_diff_with_bias_matches_lycoris() {
    check("lyco_full", 0.7, "");
}

#[test]
fn lycoris_dora_matches_at_both_strengths() {
    check("lyco_locon_dora", 0.7, "");
    check("lyco_locon_dora", 1.0, "_w1");
}

#[test]
fn diag_oft_matches_at_both_strengths() {
    check("lyco_diag_oft", 0.7, "");
    check("lyco_diag_oft", 1.0, "_w1");
}

#[test]
fn boft_matches_at_both_strengths() {
    check("lyco_boft", 0.7, "");
    check("lyco_boft", 1.0, "_w1");
}

#[test]
fn lycoris_locon_and_glora_controls_match() {
    check("lyco_locon", 0.7, "");
    check("lyco_glora", 0.7, "");
}

#[test]
fn peft_alpha_from_diffusers_metadata_per_component() {
    check("peft_lora_alpha", 0.7, "");
}

#[test]
fn peft_text_encoder_without_text_model_prefix() {
    check("peft_lora_alpha_te5", 0.7, "");
}

#[test]
fn peft_dora_magnitude_vector_matches_at_both_strengths() {
    check("peft_dora", 0.7, "");
    check("peft_dora", 1.0, "_w1");
}

#[test]
fn diffusers_training_script_spelling() {
    check("diffusers_train", 0.7, "");
}

/// The format doctor names each kind and, where tools differ, the strength semantics.
#[test]
fn the_doctor_names_every_kind() {
    let expect = [
        ("lyco_loha", "loha"),
        ("lyco_lokr", "lokr"),
        ("lyco_locon_tucker", "locon (tucker)"),
        ("lyco_full", "full"),
        ("lyco_locon_dora", "+ dora (output axis)"),
        ("lyco_diag_oft", "diag-oft"),
        ("lyco_boft", "boft"),
        ("peft_dora", "lora + dora (output axis)"),
    ];
    for (name, algo) in expect {
        let parsed = read_adapter(&sd1_tiny().join(format!("adapters/{name}.safetensors"))).unwrap();
        let lines = summarize(&parsed).lines();
        let text: Vec<String> = lines.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let text = text.join("\n");
        assert!(text.contains(algo), "{name}: {text}");
        if name.contains("dora") || name.contains("oft") {
            assert!(text.contains("toward identity") || text.contains("(D − W)"), "{name}: semantics named: {text}");
        }
    }
}
