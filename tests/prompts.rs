//! Prompts read the AUTOMATIC1111 way (emphasis, any length in chunks of 75 tokens, BREAK, clip
//! skip) reproduce `tests/fixtures/prompts/reference.safetensors`, which its `make_reference.py`
//! computed with transformers' CLIPTokenizer and CLIPTextModel on the sd1-tiny and sdxl-tiny
//! fixtures; a plain prompt still gives exactly the 77-token embeddings of before.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::diffusion::sampler::SamplerKind;
use lora_studio::engine::io::weights::read_safetensors_with_metadata;
use lora_studio::engine::models::prompt::PromptTokens;
use lora_studio::engine::pipeline::{GenerateRequest, StableDiffusion};
use lora_studio::engine::train::trainer::TrainConfig;

/// The reference tensors, and the prompts they were made from (the file's metadata).
fn prompt_reference() -> (HashMap<String, Tensor>, HashMap<String, String>) {
    read_safetensors_with_metadata(&fixtures_dir().join("prompts/reference.safetensors")).expect("prompt references")
}

fn sd1() -> StableDiffusion {
    StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap()
}

/// (case, clip skip) of the sd1-tiny cases: the long one is cut at a comma, `emphasis` nests
/// brackets with escapes and an unclosed one, `break` has a BREAK, `comma_20` and `comma_21` fill
/// a chunk 20 and 21 tokens after a comma (A1111's backtrack cuts the first only).
const CASES: [(&str, usize); 6] =
    [("long", 1), ("emphasis", 1), ("break", 1), ("clip_skip", 2), ("comma_20", 1), ("comma_21", 1)];

/// max|ours − ref| ≤ 1e-5 · max|ref|.
fn assert_very_close(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let diff = (ours.to_dtype(DType::F64).unwrap() - reference.to_dtype(DType::F64).unwrap()).unwrap();
    let max_diff = diff.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let max_ref = reference.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    eprintln!("{name}: max diff {max_diff:.3e}, max |ref| {max_ref:.3e}");
    assert!(max_diff <= 1e-5 * max_ref, "{name}: max diff {max_diff} exceeds 1e-5 × {max_ref}");
}

#[test]
fn chunks_and_weights_match_the_reference() {
    let (r, prompts) = prompt_reference();
    let sd = sd1();
    for (case, _) in CASES {
        let tokens = PromptTokens::new(&sd.tokenizer, &prompts[case]);
        let ids: Vec<Vec<i64>> = tokens.chunks.iter().map(|c| c.ids.iter().map(|&i| i as i64).collect()).collect();
        assert_eq!(ids, r[&format!("{case}_ids")].to_vec2::<i64>().unwrap(), "{case}: ids");
        let weights: Vec<Vec<f32>> =
            tokens.chunks.iter().map(|c| c.weights.iter().map(|&w| w as f32).collect()).collect();
        assert_eq!(weights, r[&format!("{case}_weights")].to_vec2::<f32>().unwrap(), "{case}: weights");
    }
}

#[test]
fn weighted_prompts_match_the_reference() {
    let (r, prompts) = prompt_reference();
    let sd = sd1();
    for (case, clip_skip) in CASES {
        let text = sd.encode_weighted_prompts(&[prompts[case].as_str()], clip_skip).unwrap();
        assert_very_close(case, &text.context, &r[&format!("{case}_embeddings")]);
    }
}

/// A one-chunk negative prompt beside a two-chunk prompt is padded with the empty prompt's chunk,
/// so the two batch for classifier-free guidance.
#[test]
fn a_negative_prompt_is_padded_to_the_prompts_chunks() {
    let (r, prompts) = prompt_reference();
    let text = sd1().encode_weighted_prompts(&["blurry, (ugly:1.2)", prompts["long"].as_str()], 1).unwrap();
    assert_very_close("pair", &text.context, &r["pair_embeddings"]);
}

/// A prompt of at most 75 tokens without emphasis gives bit for bit what it gave before, which
/// is transformers' `last_hidden_state` for its 77 ids.
#[test]
fn plain_prompts_give_the_embeddings_of_before() {
    let sd = sd1();
    let prompts = ["a photo of a red circle on a blue background, sks style", ""];
    let weighted = sd.encode_weighted_prompts(&prompts, 1).unwrap().context;
    let before = sd.encode_prompts(&prompts).unwrap().context;
    let same = weighted.eq(&before).unwrap().to_dtype(DType::F32).unwrap().min_all().unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 1.0, "bit-identical");
    assert_close("text_embeddings", &weighted, &reference()["text_embeddings"]);
}

/// Training captions stay 77 tokens and take the clip skip.
#[test]
fn captions_take_clip_skip() {
    let (r, prompts) = prompt_reference();
    let text = sd1().encode_captions(&[prompts["caption_clip_skip"].as_str()], 2).unwrap();
    assert_very_close("caption_clip_skip", &text.context, &r["caption_clip_skip_embeddings"]);
    // Older configs and checkpoints, without the field, read the last layer.
    let old: TrainConfig = serde_json::from_str(r#"{"rank": 8}"#).unwrap();
    assert_eq!((old.rank, old.clip_skip), (8, 1));
}

/// SDXL: both encoders chunked alike (the second pads with `!`), emphasis on each, the pooled
/// embedding from the first chunk; clip skip does not apply and says so.
#[test]
fn sdxl_weighted_prompts_match_the_reference() {
    let (r, prompts) = prompt_reference();
    let sd = StableDiffusion::load(&fixtures_dir().join("sdxl-tiny/model"), &Device::Cpu).unwrap();
    let prompt = prompts["sdxl"].as_str();
    let ids = |tokenizer| -> Vec<Vec<i64>> {
        let t = PromptTokens::new(tokenizer, prompt);
        t.chunks.iter().map(|c| c.ids.iter().map(|&i| i as i64).collect()).collect()
    };
    assert_eq!(ids(&sd.tokenizer), r["sdxl_ids"].to_vec2::<i64>().unwrap());
    assert_eq!(ids(&sd.text_encoder_2.as_ref().unwrap().1), r["sdxl_ids_2"].to_vec2::<i64>().unwrap());
    let text = sd.encode_weighted_prompts(&[prompt], 1).unwrap();
    assert_very_close("sdxl", &text.context, &r["sdxl_embeddings"]);
    assert_very_close("sdxl_pooled", text.pooled.as_ref().unwrap(), &r["sdxl_pooled"]);
    let skipped = sd.encode_weighted_prompts(&[prompt], 2).unwrap();
    assert_eq!(skipped.context.to_vec3::<f32>().unwrap(), text.context.to_vec3::<f32>().unwrap());
    assert!(sd.clip_skip_note(2).unwrap().contains("SDXL"));
    assert!(sd.clip_skip_note(1).is_none());
}

/// Generation takes prompts of several chunks with a shorter negative, and clip skip; the
/// cached embeddings are not reused across clip skips; a clip skip out of range is refused.
#[test]
fn generation_reads_long_prompts_and_clip_skip() {
    let (_, prompts) = prompt_reference();
    let mut sd = sd1();
    sd.cache_text_embeddings = true;
    let mut req = GenerateRequest {
        prompt: prompts["long"].clone(),
        negative: "blurry".into(),
        seed: 3,
        steps: 2,
        guidance: 7.5,
        sampler: SamplerKind::EulerAncestral,
        width: 32,
        height: 32,
        clip_skip: 1,
    };
    let last = sd.generate(&req, &mut |_, _| {}).unwrap();
    req.clip_skip = 2;
    let penultimate = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(sd.text_encoder_runs(), 2, "a new clip skip re-encodes");
    assert_ne!(last, penultimate);
    assert!(sd.clip_skip_note(2).is_none());
    for bad in [0, 3] {
        req.clip_skip = bad;
        let e = format!("{:#}", sd.generate(&req, &mut |_, _| {}).unwrap_err());
        assert!(e.contains("clip skip"), "{e}");
    }
    // Requests saved before clip skip existed read the last layer.
    let mut json = serde_json::to_value(&req).unwrap();
    json.as_object_mut().unwrap().remove("clip_skip");
    assert_eq!(serde_json::from_value::<GenerateRequest>(json).unwrap().clip_skip, 1);
}

/// The trainer reads captions at its clip skip, and refuses one the model cannot take: beyond
/// the text encoder's layers, or any on SDXL.
#[test]
fn training_reads_captions_at_its_clip_skip() {
    use lora_studio::engine::train::dataset::{Dataset, DatasetOptions};
    use lora_studio::engine::train::trainer::Trainer;
    let dir = tempdir("prompts-train");
    for i in 0..2u8 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([60 * i, (x * 7) as u8, (y * 7) as u8]));
        img.save(dir.join(format!("p{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("p{i}.txt")), format!("a picture, number {i}")).unwrap();
    }
    let config = |clip_skip| TrainConfig {
        clip_skip,
        steps: 1,
        validation_images: 2,
        dataset: DatasetOptions { resolution: 32, ..Default::default() },
        ..TrainConfig::default()
    };
    let dataset = Dataset::scan(std::slice::from_ref(&dir), &config(1).dataset).unwrap();
    let loss = |clip_skip| Trainer::new(sd1(), config(clip_skip), &dataset).unwrap().validation_loss().unwrap();
    let (last, penultimate) = (loss(1), loss(2));
    assert!(last.is_finite() && penultimate.is_finite());
    assert_ne!(last, penultimate, "clip skip 2 changes what the UNet is conditioned on");
    let e = format!("{:#}", Trainer::new(sd1(), config(3), &dataset).err().unwrap());
    assert!(e.contains("clip skip 3"), "{e}");
    let sdxl = StableDiffusion::load(&fixtures_dir().join("sdxl-tiny/model"), &Device::Cpu).unwrap();
    let e = format!("{:#}", Trainer::new(sdxl, config(2), &dataset).err().unwrap());
    assert!(e.contains("SDXL"), "{e}");
}
