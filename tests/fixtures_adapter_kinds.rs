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

/// `adapter merge` folds every kind into the base weights (and a full diff's bias into the biases):
/// the merged model alone reproduces the file's reference.
#[test]
fn every_kind_merges_into_the_base_model() {
    let (r, refs) = (reference(), adapters_reference());
    let dir = std::env::temp_dir().join(format!("kinds-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = sd1_tiny().join("model");
    for name in ["lyco_full", "lyco_boft", "lyco_locon_dora", "lyco_lokr", "lyco_loha", "peft_dora"] {
        let mut sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
        sd.load_adapter(name, &sd1_tiny().join(format!("adapters/{name}.safetensors")), 0.7).unwrap();
        let out = dir.join(name);
        lora_studio::engine::io::diffusers_folder::write_merged_model(&mut sd, &model, &out).unwrap();
        let merged = StableDiffusion::load(&out, &Device::Cpu).unwrap();
        let emb = merged.text_encoder.forward(&r["input_ids"]).unwrap();
        assert_close(&format!("merged {name}: text"), &emb, &refs[&format!("text_embeddings_{name}")]);
        let pred = merged.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("merged {name}: noise"), &pred, &refs[&format!("noise_pred_{name}")]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A blend at full rank turns any kind into one plain LoRA that gives the same outputs.
#[test]
fn every_kind_blends_into_one_lora() {
    use lora_studio::engine::adapters::formats::Naming;
    let (r, refs) = (reference(), adapters_reference());
    let dir = std::env::temp_dir().join(format!("kinds-blend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["lyco_boft", "lyco_locon_dora", "lyco_lokr_full", "lyco_loha"] {
        let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
        sd.load_adapter(name, &sd1_tiny().join(format!("adapters/{name}.safetensors")), 0.7).unwrap();
        let out = dir.join(format!("{name}-blend.safetensors"));
        let report = lora_studio::engine::adapters::mix::export_blend(
            &mut sd,
            &out,
            lora_studio::engine::adapters::mix::BlendForm {
                rank: 4096,
                naming: Naming::Kohya,
                dtype: candle_core::DType::F32,
            },
            &[name.to_string()],
            &[],
            |_, _| Ok(()),
        )
        .unwrap();
        assert!(report.kept_energy > 0.999_999, "{name}: {report:?}");
        let parsed = read_adapter(&out).unwrap();
        assert!(parsed.layers.iter().all(|l| l.delta.algorithm() == "lora" || l.delta.algorithm() == "locon"));
        let mut blended = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
        blended.load_adapter("blend", &out, 1.0).unwrap();
        let emb = blended.text_encoder.forward(&r["input_ids"]).unwrap();
        let pred = blended.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("blend of {name}"), &pred, &refs[&format!("noise_pred_{name}")]);
    }
    // A full diff's bias change has no LoRA form: refused, not dropped.
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    sd.load_adapter("full", &sd1_tiny().join("adapters/lyco_full.safetensors"), 0.7).unwrap();
    let e = lora_studio::engine::adapters::mix::blend(&mut sd, 8).unwrap_err();
    assert!(format!("{e:#}").contains("no LoRA can carry"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--format peft` files carry α the way diffusers' `load_lora_weights` reads it: one LoraConfig
/// per component under `unet.` / `text_encoder.` in `lora_adapter_metadata`, with `alpha_pattern`
/// for layers that differ. Read back from that metadata alone (ours removed), every scale is kept.
#[test]
fn peft_export_metadata_is_per_component_as_diffusers_reads_it() {
    use lora_studio::engine::adapters::formats::{ExportLayer, GloraLayout, Naming, match_layers, write_adapter};
    use lora_studio::engine::io::weights::{read_safetensors_with_metadata, write_safetensors};
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let parsed = read_adapter(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap();
    let (matched, _) = match_layers(&parsed, &sd.module_index()).unwrap();
    let mut layers: Vec<ExportLayer> = matched.iter().map(ExportLayer::from).collect();
    layers[0].alpha = 3.0; // one layer off the common α
    let dir = std::env::temp_dir().join(format!("peft-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-peft.safetensors");
    write_adapter(&file, Naming::Peft, &layers, HashMap::new(), candle_core::DType::F32, GloraLayout::Current).unwrap();
    let (tensors, mut metadata) = read_safetensors_with_metadata(&file).unwrap();
    let config: serde_json::Value = serde_json::from_str(&metadata["lora_adapter_metadata"]).unwrap();
    for component in ["unet", "text_encoder"] {
        for field in ["r", "lora_alpha", "target_modules", "alpha_pattern", "rank_pattern"] {
            assert!(config.get(format!("{component}.{field}")).is_some(), "{component}.{field} in {config}");
        }
    }
    assert_eq!(config["unet.r"], 4);
    assert_eq!(config["unet.lora_alpha"], 2.0);
    metadata.remove("lora_studio_alphas");
    let stripped = dir.join("a-peft-diffusers-only.safetensors");
    write_safetensors(&stripped, &tensors, Some(metadata)).unwrap();
    let back = read_adapter(&stripped).unwrap();
    let (back, _) = match_layers(&back, &sd.module_index()).unwrap();
    let scale = |path: &str, list: &[lora_studio::engine::adapters::formats::MatchedLayer]| {
        list.iter().find(|m| m.path == path).unwrap().scale
    };
    for l in &layers {
        let want = l.alpha / l.delta.rank() as f64;
        assert!((scale(&l.path, &back) - want).abs() < 1e-12, "{}: {} vs {want}", l.path, scale(&l.path, &back));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// kohya's own OFT network names its layers `oft_unet_…`; the same blocks under that name give
/// LyCORIS' diag-OFT reference.
#[test]
fn kohya_oft_names_load_as_diag_oft() {
    use lora_studio::engine::io::weights::{read_safetensors_with_metadata, write_safetensors};
    let (tensors, metadata) =
        read_safetensors_with_metadata(&sd1_tiny().join("adapters/lyco_diag_oft.safetensors")).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("lora_unet_").map_or(k.clone(), |rest| format!("oft_unet_{rest}")), t))
        .collect();
    assert!(renamed.keys().any(|k| k.starts_with("oft_unet_")));
    let dir = std::env::temp_dir().join(format!("kohya-oft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kohya_oft.safetensors");
    write_safetensors(&file, &renamed, Some(metadata)).unwrap();
    let (r, refs) = (reference(), adapters_reference());
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let report = sd.load_adapter("oft", &file, 0.7).unwrap();
    assert_eq!(report.matched, report.total);
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
    assert_close("kohya-named OFT", &pred, &refs["noise_pred_lyco_diag_oft"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// LyCORIS' norm updates (`w_norm` / `b_norm` on GroupNorm and LayerNorm layers) move the norms'
/// scale and shift by s·w_norm, s·b_norm: the same outputs as a model whose norm weights were
/// edited that way in its own files, whether applied live (merged or not) or merged into the base.
#[test]
fn norm_updates_match_a_model_with_edited_norms() {
    use lora_studio::engine::io::weights::{read_safetensors, write_safetensors};
    let model = sd1_tiny().join("model");
    let dir = std::env::temp_dir().join(format!("norms-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // (component folder, weights file, module path, kohya layer name)
    let norms = [
        ("unet", "diffusion_pytorch_model.safetensors", "down_blocks.0.resnets.0.norm1"),
        ("unet", "diffusion_pytorch_model.safetensors", "down_blocks.0.attentions.0.transformer_blocks.0.norm2"),
        ("unet", "diffusion_pytorch_model.safetensors", "conv_norm_out"),
        ("text_encoder", "model.safetensors", "text_model.encoder.layers.0.layer_norm1"),
        ("text_encoder", "model.safetensors", "text_model.final_layer_norm"),
    ];
    let s = 0.7;
    let mut adapter = HashMap::new();
    // The edited model: a copy of the folder with s·w_norm, s·b_norm added by hand.
    let edited = dir.join("edited");
    copy_dir(&model, &edited);
    for (i, (component, file, path)) in norms.iter().enumerate() {
        let weights_file = edited.join(component).join(file);
        let mut w = read_safetensors(&weights_file).unwrap();
        let base = &w[&format!("{path}.weight")];
        let n = base.dims()[0];
        let vals = |seed: usize| -> Tensor {
            let v: Vec<f32> = (0..n).map(|j| (((j + seed) * 37 % 17) as f32 - 8.0) / 20.0).collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let (dw, db) = (vals(i), vals(i + 5));
        let prefix = if *component == "unet" { "lora_unet_" } else { "lora_te_" };
        let name = format!("{prefix}{}", path.replace('.', "_"));
        adapter.insert(format!("{name}.w_norm"), dw.clone());
        adapter.insert(format!("{name}.b_norm"), db.clone());
        let new_w = (base + (dw * s).unwrap()).unwrap();
        let new_b = (&w[&format!("{path}.bias")] + (db * s).unwrap()).unwrap();
        w.insert(format!("{path}.weight"), new_w);
        w.insert(format!("{path}.bias"), new_b);
        write_safetensors(&weights_file, &w, None).unwrap();
    }
    let file = dir.join("norms.safetensors");
    write_safetensors(&file, &adapter, None).unwrap();
    let r = reference();
    let expected = StableDiffusion::load(&edited, &Device::Cpu).unwrap();
    let emb_ref = expected.text_encoder.forward(&r["input_ids"]).unwrap();
    let pred_ref = expected.unet.forward(&r["sample"], &r["timestep"], &emb_ref).unwrap();
    let mut sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    let report = sd.load_adapter("norms", &file, s).unwrap();
    assert_eq!((report.matched, report.total), (5, 5), "{}", report.summary());
    for merged in [true, false] {
        sd.set_merged(merged).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        assert_close(&format!("norm update, text (merged {merged})"), &emb, &emb_ref);
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("norm update, noise (merged {merged})"), &pred, &pred_ref);
    }
    // Merged into the base, the norms' files change as the edit did.
    sd.set_merged(true).unwrap();
    let out = dir.join("merged");
    lora_studio::engine::io::diffusers_folder::write_merged_model(&mut sd, &model, &out).unwrap();
    let merged = StableDiffusion::load(&out, &Device::Cpu).unwrap();
    let emb = merged.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("merged norm update", &merged.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap(), &pred_ref);
    // The doctor names it; a blend refuses it (no LoRA carries a norm change).
    let parsed = read_adapter(&file).unwrap();
    assert!(parsed.layers.iter().all(|l| l.delta.algorithm() == "norm"));
    let e = lora_studio::engine::adapters::mix::blend(&mut sd, 4).unwrap_err();
    assert!(format!("{e:#}").contains("normalisation layer"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
