//! Stable Diffusion XL: the tiny SDXL-shaped model in `tests/fixtures/sdxl-tiny` (computed with
//! diffusers' `StableDiffusionXLPipeline`; see its README) is reproduced to ≤ 1e-4 × max|ref|.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::io::weights::{WeightMap, read_safetensors};
use lora_studio::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_studio::engine::pipeline::StableDiffusion;

fn sdxl_tiny() -> std::path::PathBuf {
    fixtures_dir().join("sdxl-tiny")
}

fn reference() -> HashMap<String, Tensor> {
    read_safetensors(&sdxl_tiny().join("reference.safetensors")).expect("SDXL reference tensors")
}

fn unet() -> UNet2DConditionModel {
    let dir = sdxl_tiny().join("model/unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    UNet2DConditionModel::load(&cfg, &weights).unwrap()
}

/// The UNet with micro-conditioning: three levels (no attention in the first), two transformer
/// layers at the last level and in the mid block, linear projections, and the pooled text
/// embedding with six size numbers per image through `add_embedding`.
#[test]
fn sdxl_unet_matches_diffusers() {
    let r = reference();
    let unet = unet();
    assert!(unet.takes_added_conditioning());
    let added = (&r["pooled_prompt_embeds"], &r["add_time_ids"]);
    let out = unet.forward_with(&r["sample"], &r["timestep"], &r["prompt_embeds"], Some(added)).unwrap();
    assert_close("noise_pred", &out, &r["noise_pred"]);
    // Without its micro-conditioning an SDXL UNet refuses, in words.
    let e = unet.forward(&r["sample"], &r["timestep"], &r["prompt_embeds"]).unwrap_err().to_string();
    assert!(e.contains("micro-conditioning"), "{e}");
}

fn pipeline() -> StableDiffusion {
    StableDiffusion::load(&sdxl_tiny().join("model"), &Device::Cpu).expect("the SDXL folder loads")
}

const PROMPTS: [&str; 2] = ["a photo of a red circle on a blue background, sks style", ""];

/// The whole pipeline from the diffusers folder, with `suffix`'s references (`""` for the plain
/// model): the prompts through both tokenizers and text encoders give `prompt_embeds` and the pooled
/// embedding, and the UNet with the fixture's size numbers gives `noise_pred`.
fn assert_pipeline_matches(sd: &StableDiffusion, r: &HashMap<String, Tensor>, embeds: &str, pooled: &str, noise: &str) {
    let text = sd.encode_prompts(&PROMPTS).unwrap();
    assert_close(embeds, &text.context, &r[embeds]);
    assert_close(pooled, text.pooled.as_ref().expect("SDXL has a pooled embedding"), &r[pooled]);
    let out = sd.predict(&r["sample"], &r["timestep"], &text, Some(&r["add_time_ids"])).unwrap();
    assert_close(noise, &out, &r[noise]);
}

/// An SDXL diffusers folder loads as one model: both text encoders and tokenizers, the pooled
/// embedding, and the UNet's micro-conditioning, matching diffusers' pipeline end to end.
#[test]
fn an_sdxl_folder_runs_as_diffusers_pipeline_does() {
    let r = reference();
    let sd = pipeline();
    assert_eq!(sd.family(), lora_studio::engine::models::family::ModelFamily::Sdxl);
    assert!(sd.force_zeros_for_empty_prompt, "model_index.json asks for zeros for an empty negative prompt");
    assert_pipeline_matches(&sd, &r, "prompt_embeds", "pooled_prompt_embeds", "noise_pred");
    // From token ids too (as `forward` runs them).
    let text = sd.encode_ids(&r["input_ids"], Some(&r["input_ids_2"])).unwrap();
    assert_close("prompt_embeds (ids)", &text.context, &r["prompt_embeds"]);
    // The size numbers as diffusers' `_get_add_time_ids` makes them for an uncropped picture.
    let sizes = sd.uncropped_sizes(&text, 64, 64).unwrap().unwrap();
    assert_close("add_time_ids row 0", &sizes.get(0).unwrap(), &r["add_time_ids"].get(0).unwrap());
}

/// kohya SDXL LoRAs name the first encoder `lora_te1_`, the second `lora_te2_` and the UNet in the
/// SGM layout; loaded through the pipeline at 0.7, every layer of all three finds its home and the
/// embeddings and noise prediction are diffusers'.
#[test]
fn a_kohya_sdxl_lora_adapts_both_text_encoders_and_the_unet() {
    let r = reference();
    let mut sd = pipeline();
    let report = sd.load_adapter("kohya", &sdxl_tiny().join("lora_kohya.safetensors"), 0.7).unwrap();
    assert_eq!((report.matched, report.total), (192 + 18 + 18, 192 + 18 + 18), "{}", report.summary());
    assert_pipeline_matches(&sd, &r, "prompt_embeds_kohya07", "pooled_kohya07", "noise_pred_kohya07");
}

/// A kohya file and a diffusers/PEFT file (`text_encoder_2.` keys for the second encoder) mixed
/// at 0.5 and 0.8, as diffusers' `set_adapters` mixes them.
#[test]
fn kohya_and_peft_sdxl_loras_mix_like_diffusers() {
    let r = reference();
    let mut sd = pipeline();
    sd.load_adapter("kohya", &sdxl_tiny().join("lora_kohya.safetensors"), 0.5).unwrap();
    let report = sd.load_adapter("peft", &sdxl_tiny().join("lora_peft.safetensors"), 0.8).unwrap();
    assert_eq!((report.matched, report.total), (136 + 12 + 12, 136 + 12 + 12), "{}", report.summary());
    assert_pipeline_matches(
        &sd,
        &r,
        "prompt_embeds_kohya05_peft08",
        "pooled_kohya05_peft08",
        "noise_pred_kohya05_peft08",
    );
}

/// Generation runs on SDXL (with guidance, so the zeroed empty negative prompt is used), gives a
/// picture, and the negative prompt changes it.
#[test]
fn sdxl_generates_with_and_without_a_negative_prompt() {
    use lora_studio::engine::diffusion::sampler::SamplerKind;
    use lora_studio::engine::pipeline::GenerateRequest;
    let sd = pipeline();
    let mut req = GenerateRequest {
        prompt: PROMPTS[0].into(),
        negative: String::new(),
        seed: 7,
        steps: 3,
        guidance: 5.0,
        sampler: SamplerKind::Euler,
        width: 32,
        height: 32,
        clip_skip: 1,
    };
    let plain = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(plain.dimensions(), (32, 32));
    req.negative = "blurry".into();
    let negative = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_ne!(plain, negative, "the negative prompt changes the picture");
    // No negative prompt is zeros (model_index.json's force_zeros_for_empty_prompt), not "".
    req.negative = String::new();
    let mut sd = sd;
    sd.force_zeros_for_empty_prompt = false;
    assert_ne!(sd.generate(&req, &mut |_, _| {}).unwrap(), plain, "zeros, not the encoding of \"\"");
}

fn text_encoder(name: &str) -> lora_studio::engine::models::clip::ClipTextModel {
    use lora_studio::engine::models::clip::{ClipConfig, ClipTextModel};
    let dir = sdxl_tiny().join("model").join(name);
    let cfg = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = WeightMap::load(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    ClipTextModel::load(&cfg, &weights).unwrap()
}

/// SDXL's two text encoders, each read at its penultimate hidden state and joined on the channel
/// axis, and the second one's projected end-of-text state as the pooled embedding.
#[test]
fn sdxl_text_encoders_give_diffusers_prompt_and_pooled_embeddings() {
    let r = reference();
    let (first, _) = text_encoder("text_encoder").penultimate_and_pooled(&r["input_ids"]).unwrap();
    let second = text_encoder("text_encoder_2");
    assert!(second.text_projection.is_some(), "CLIPTextModelWithProjection's projection is loaded");
    let (second_hidden, pooled) = second.penultimate_and_pooled(&r["input_ids_2"]).unwrap();
    let prompt_embeds = Tensor::cat(&[&first, &second_hidden], 2).unwrap();
    assert_close("prompt_embeds", &prompt_embeds, &r["prompt_embeds"]);
    assert_close("pooled_prompt_embeds", &pooled, &r["pooled_prompt_embeds"]);
}

/// A kohya SDXL LoRA names its UNet layers in the original SGM layout
/// (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `…middle_block_1…`,
/// `…output_blocks_…`): every one of its 192 UNet modules finds its diffusers layer through the one
/// ldm ↔ diffusers map, and merged at 0.7 the UNet gives diffusers' `noise_pred_kohya07` (fed
/// diffusers' embeddings from the LoRA'd text encoders; their own LoRA layers wait for the SDXL
/// pipeline's second text encoder).
#[test]
fn a_kohya_sdxl_lora_in_sgm_names_finds_every_unet_layer() {
    use lora_studio::engine::adapters::formats::{Component, ModuleIndex, match_layers, read_adapter};
    use lora_studio::engine::adapters::stack::LayerAdapter;
    let r = reference();
    let mut unet = unet();
    let mut index = ModuleIndex::new(Some(unet.config.layers_per_block));
    unet.visit_layers(&mut |l| index.insert(Component::Unet, l.path(), l.stack_ref().base.dims().to_vec()));
    let parsed = read_adapter(&sdxl_tiny().join("lora_kohya.safetensors")).unwrap();
    let (layers, report) = match_layers(&parsed, &index).unwrap();
    assert!(report.shape_mismatches.is_empty(), "{:?}", report.shape_mismatches);
    let unet_keys = report.unmatched.iter().filter(|k| k.contains("lora_unet_")).collect::<Vec<_>>();
    assert!(unet_keys.is_empty(), "UNet layers without a home: {unet_keys:?}");
    assert_eq!(layers.len(), 192, "{}", report.summary());
    let mut by_path: HashMap<String, _> = layers.into_iter().map(|l| (l.path.clone(), l)).collect();
    unet.visit_layers(&mut |mut l| {
        if let Some(m) = by_path.remove(l.path()) {
            let adapter = LayerAdapter { name: "kohya".into(), delta: m.delta, scale: m.scale, multiplier: 0.7 };
            l.stack().attach(adapter).unwrap();
            l.stack().refresh().unwrap();
        }
    });
    assert!(by_path.is_empty());
    let added = (&r["pooled_kohya07"], &r["add_time_ids"]);
    let out = unet.forward_with(&r["sample"], &r["timestep"], &r["prompt_embeds_kohya07"], Some(added)).unwrap();
    assert_close("noise_pred_kohya07", &out, &r["noise_pred_kohya07"]);
}

/// SDXL's VAE (here two levels, its scaling factor read from the config, not applied by the VAE).
#[test]
fn sdxl_vae_matches_diffusers() {
    use lora_studio::engine::models::vae::{AutoencoderKL, VaeConfig};
    let r = reference();
    let dir = sdxl_tiny().join("model/vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    let vae = AutoencoderKL::load(&cfg, &weights).unwrap();
    assert_close("vae_decoded", &vae.decode(&r["vae_latents"]).unwrap(), &r["vae_decoded"]);
    assert_close("vae_encoded_mean", &vae.encode_mean(&r["vae_image"]).unwrap(), &r["vae_encoded_mean"]);
}

/// SDXL's two tokenizers: the same CLIP BPE, the first padding with end-of-text (49407), the second
/// with `!` (id 0), as the fixture's `input_ids` and `input_ids_2` were made.
#[test]
fn sdxl_tokenizers_pad_as_diffusers_does() {
    use lora_studio::engine::models::tokenizer::{ClipTokenizer, END_OF_TEXT};
    let r = reference();
    let prompts = ["a photo of a red circle on a blue background, sks style", ""];
    for (tokenizer, key) in
        [(ClipTokenizer::with_pad_id(END_OF_TEXT), "input_ids"), (ClipTokenizer::with_pad_id(0), "input_ids_2")]
    {
        let ours: Vec<Vec<i64>> =
            tokenizer.encode_batch(&prompts).into_iter().map(|row| row.into_iter().map(i64::from).collect()).collect();
        assert_eq!(ours, r[key].to_vec2::<i64>().unwrap(), "{key}");
    }
}

/// An SDXL LoRA on an SD 1.x model (and the reverse check in `adapter info`) is refused in the
/// words a user needs: which family the adapter was made for and which the model is.
#[test]
fn an_sdxl_lora_on_an_sd1_model_is_refused_naming_both_families() {
    use lora_studio::engine::adapters::formats::{read_adapter, summarize};
    let mut sd1 = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let e = sd1.load_adapter("xl", &sdxl_tiny().join("lora_kohya.safetensors"), 1.0).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("this adapter was trained for SDXL; this model is SD 1.x"), "{msg}");
    for file in ["lora_kohya.safetensors", "lora_peft.safetensors"] {
        let summary = summarize(&read_adapter(&sdxl_tiny().join(file)).unwrap());
        assert_eq!(summary.family, "SDXL", "{file}");
    }
}

/// An SDXL model written as a diffusers folder (full fine-tuning's output) reads back as the same
/// pipeline: both encoders and tokenizers, and diffusers' outputs.
#[test]
fn an_sdxl_model_written_as_a_folder_reads_back() {
    use lora_studio::engine::io::diffusers_folder::write_model_folder;
    use lora_studio::engine::io::weights::WeightPrecision;
    use lora_studio::engine::pipeline::ModelWeights;
    let r = reference();
    let w = ModelWeights::load(&sdxl_tiny().join("model"), DType::F32, WeightPrecision::Auto, &Device::Cpu).unwrap();
    let out = tempdir("sdxl-written").join("model");
    write_model_folder(&w, &out, DType::F32, None, false).unwrap();
    for part in ["text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json", "model_index.json"] {
        assert!(out.join(part).is_file(), "{part}");
    }
    let sd = StableDiffusion::load(&out, &Device::Cpu).unwrap();
    assert_eq!(sd.text_encoder_2.as_ref().unwrap().1.pad_id(), 0, "the second tokenizer pads with `!`");
    assert!(sd.force_zeros_for_empty_prompt);
    assert_pipeline_matches(&sd, &r, "prompt_embeds", "pooled_prompt_embeds", "noise_pred");
}
