//! Adapters loaded from the fixture's kohya and PEFT files reproduce diffusers' outputs with the
//! adapters applied (`tests/fixtures/sd1-tiny/reference.safetensors`), merged and unmerged.

mod common;

use candle_core::Device;
use common::*;
use lora_studio::engine::pipeline::StableDiffusion;

fn model() -> StableDiffusion {
    StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap()
}

#[test]
fn kohya_adapter_at_weight_07_matches_reference() {
    let r = reference();
    let mut sd = model();
    let report = sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.7).unwrap();
    assert_eq!(report.matched, report.total, "every layer of the fixture adapter matches: {}", report.summary());
    for merged in [true, false] {
        sd.set_merged(merged).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        assert_close(&format!("text_embeddings_a07 (merged {merged})"), &emb, &r["text_embeddings_a07"]);
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("noise_pred_a07 (merged {merged})"), &pred, &r["noise_pred_a07"]);
    }
}

#[test]
fn kohya_and_peft_adapters_blend_like_reference() {
    let r = reference();
    let mut sd = model();
    sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.5).unwrap();
    sd.load_adapter("b", &sd1_tiny().join("lora_b_peft.safetensors"), 0.8).unwrap();
    for merged in [true, false] {
        sd.set_merged(merged).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("noise_pred_a05_b08 (merged {merged})"), &pred, &r["noise_pred_a05_b08"]);
    }
}

#[test]
fn moving_one_slider_remerges_only_its_layers() {
    let r = reference();
    let mut sd = model();
    sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.0).unwrap();
    sd.load_adapter("b", &sd1_tiny().join("lora_b_peft.safetensors"), 0.8).unwrap();
    // B touches 32 UNet attention layers and nothing in the text encoder.
    assert_eq!(sd.set_adapter_weight("b", 0.8).unwrap(), 0, "an unchanged weight re-merges nothing");
    assert_eq!(sd.set_adapter_weight("b", 0.3).unwrap(), 32);
    sd.set_adapter_weight("a", 0.7).unwrap();
    sd.set_adapter_weight("b", 0.0).unwrap();
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("text_embeddings_a07 via sliders", &emb, &r["text_embeddings_a07"]);
    let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
    assert_close("noise_pred_a07 via sliders", &pred, &r["noise_pred_a07"]);
}

#[test]
fn per_block_weights_scale_each_part_of_the_model() {
    use lora_studio::engine::adapters::stack::BlockWeights;
    let r = reference();
    let mut sd = model();
    sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.7).unwrap();
    // Text encoder on, every UNet block off: the UNet is the base model fed the adapted text.
    let te_only = BlockWeights { text_encoder: 1.0, input: 0.0, middle: 0.0, output: 0.0 };
    sd.set_adapter_mix("a", 0.7, &te_only).unwrap();
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("text encoder keeps its adapter", &emb, &r["text_embeddings_a07"]);
    let base = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let expect = base.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
    assert_close("UNet blocks off", &sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap(), &expect);
    // All blocks at 1 is the plain slider.
    sd.set_adapter_mix("a", 0.7, &BlockWeights::default()).unwrap();
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("all blocks on", &sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap(), &r["noise_pred_a07"]);
}

/// Older kohya files and ComfyUI name UNet layers the original (ldm) way; they load the same.
#[test]
fn kohya_files_with_ldm_layer_names_load_the_same() {
    use lora_studio::engine::io::weights::{read_safetensors_with_metadata, write_safetensors};
    let r = reference();
    let mut sd = model();
    let config = sd.unet.config.clone();
    let mut renames = std::collections::HashMap::new();
    sd.unet.visit_layers(&mut |l| {
        let ldm = ldm_unet_name(&format!("{}.weight", l.path()), config.layers_per_block, &config.up_block_types);
        let ldm = ldm.strip_prefix("model.diffusion_model.").unwrap().strip_suffix(".weight").unwrap();
        renames.insert(
            format!("lora_unet_{}", l.path().replace('.', "_")),
            format!("lora_unet_{}", ldm.replace('.', "_")),
        );
    });
    let (tensors, metadata) = read_safetensors_with_metadata(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap();
    let mut renamed = std::collections::HashMap::new();
    let mut changed = 0;
    for (key, t) in tensors {
        let (layer, leaf) = key.split_once('.').unwrap();
        let new = renames.get(layer).cloned().unwrap_or_else(|| layer.to_string());
        changed += (new != layer) as usize;
        renamed.insert(format!("{new}.{leaf}"), t);
    }
    assert!(changed > 100, "UNet keys were renamed ({changed})");
    let file = std::env::temp_dir().join(format!("ldm-named-{}.safetensors", std::process::id()));
    write_safetensors(&file, &renamed, Some(metadata)).unwrap();
    let report = sd.load_adapter("a", &file, 0.7).unwrap();
    assert_eq!(report.matched, report.total, "{}", report.summary());
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close(
        "noise_pred_a07 from ldm names",
        &sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap(),
        &r["noise_pred_a07"],
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn overdrive_grows_with_the_sliders() {
    use lora_studio::engine::adapters::mix::overdrive;
    let mut sd = model();
    assert_eq!(overdrive(&mut sd).unwrap(), 0.0, "no adapters");
    sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.5).unwrap();
    let half = overdrive(&mut sd).unwrap();
    sd.set_adapter_weight("a", 1.0).unwrap();
    let full = overdrive(&mut sd).unwrap();
    assert!(half > 0.0 && (full / half - 2.0).abs() < 1e-6, "linear in the weight: {half} → {full}");
}
