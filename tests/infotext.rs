//! Generation parameters in PNG files made by the other tools: images saved the way A1111 saves
//! them (Pillow's `PngInfo.add_text("parameters", …)`, `tests/fixtures/infotext/make_reference.py`)
//! read back to the right fields, and the PNGs we write read back to what we wrote.

mod common;

use common::*;
use lora_studio::engine::diffusion::sampler::SamplerKind;
use lora_studio::engine::io::infotext::{
    AdapterUse, GenerationParameters, read_png_parameters, read_png_parameters_text, save_png_with_parameters,
};

fn fixture(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("infotext").join(name)
}

/// a1111.png (tEXt) and a1111_ztxt.png (zTXt) hold the same text: every field as A1111's
/// `parse_generation_parameters` reads it.
#[test]
fn reads_the_parameters_a1111_writes() {
    for file in ["a1111.png", "a1111_ztxt.png"] {
        let p = read_png_parameters(&fixture(file)).unwrap();
        assert_eq!(p.prompt, "masterpiece, a photo of a cat on a windowsill, golden hour", "{file}");
        assert_eq!(p.negative, "blurry, lowres,\nbad anatomy, watermark", "{file}");
        assert_eq!(p.steps, Some(20));
        assert_eq!(p.sampler_kind(), Some(SamplerKind::EulerAncestral));
        assert_eq!(p.cfg_scale, Some(7.0));
        assert_eq!(p.seed, Some(1234567890));
        assert_eq!((p.width, p.height), (Some(512), Some(768)));
        assert_eq!(p.model_hash.as_deref(), Some("6ce0161689"));
        assert_eq!(p.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert_eq!(p.clip_skip, 2);
        assert_eq!(
            p.adapters,
            vec![
                AdapterUse { name: "neon_style".into(), weight: 0.8, hash: Some("1a2b3c4d5e6f".into()) },
                AdapterUse { name: "film grain".into(), weight: 0.35, hash: Some("0f9e8d7c6b5a".into()) },
            ],
            "{file}"
        );
        assert_eq!(
            p.other,
            vec![("Schedule type".to_string(), "Automatic".to_string()), ("Version".into(), "v1.10.1".into())]
        );
    }
}

/// Pillow stores a text that is not Latin-1 in an iTXt chunk.
#[test]
fn reads_parameters_from_an_itxt_chunk() {
    let p = read_png_parameters(&fixture("a1111_itxt.png")).unwrap();
    assert_eq!(p.prompt, "猫, a cat in the rain");
    assert_eq!(p.adapters, vec![AdapterUse { name: "neon_style".into(), weight: 1.0, hash: None }]);
    assert_eq!(p.sampler_kind(), Some(SamplerKind::Lcm));
    assert_eq!((p.steps, p.cfg_scale, p.seed), (Some(4), Some(1.5), Some(42)));
    assert_eq!(p.model.as_deref(), Some("dreamshaper_8"));
}

#[test]
fn a_png_without_parameters_is_refused_in_words() {
    let dir = tempdir("infotext-none");
    let plain = dir.join("plain.png");
    image::RgbImage::new(4, 4).save(&plain).unwrap();
    let e = format!("{:#}", read_png_parameters(&plain).unwrap_err());
    assert!(e.contains("plain.png has no generation parameters (it was not saved by A1111, LoRA Studio"), "{e}");
    let not_png = dir.join("notes.png");
    std::fs::write(&not_png, "hello").unwrap();
    let e = format!("{:#}", read_png_parameters(&not_png).unwrap_err());
    assert!(e.contains("notes.png: not a readable PNG image"), "{e}");
}

/// What we save reads back to the same parameters and the same pixels, in a tEXt chunk for a
/// Latin-1 text (as A1111 writes) and an iTXt one otherwise, through the atomic write (no
/// temporary file is left).
#[test]
fn saved_parameters_and_pixels_read_back() {
    let dir = tempdir("infotext-save");
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    for (name, prompt, chunk) in [("latin1.png", "a café, at night", b"tEXt"), ("utf8.png", "猫 at night", b"iTXt")] {
        let params = GenerationParameters {
            prompt: prompt.into(),
            negative: "blurry,\nlowres".into(),
            steps: Some(2),
            sampler: Some("Euler".into()),
            cfg_scale: Some(7.5),
            seed: Some(u64::from(u32::MAX) + 1),
            width: Some(8),
            height: Some(8),
            model: Some("base".into()),
            adapters: vec![AdapterUse { name: "neon".into(), weight: 0.8, hash: Some("1a2b3c4d5e6f".into()) }],
            clip_skip: 1,
            other: vec![("Schedule type".into(), "Automatic".into())],
            ..Default::default()
        };
        let path = dir.join(name);
        save_png_with_parameters(&path, &img, &params).unwrap();
        assert_eq!(read_png_parameters(&path).unwrap(), params, "{name}");
        assert_eq!(read_png_parameters_text(&path).unwrap(), params.infotext());
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.windows(4).any(|w| w == chunk), "{name}: a {} chunk", String::from_utf8_lossy(chunk));
        assert_eq!(image::open(&path).unwrap().to_rgb8(), img, "{name}: pixels");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only the two PNGs: {left:?}");
}

/// `Lora hashes` carries A1111's addnet short hash: SHA-256 of the safetensors bytes after the
/// header, 12 hex digits (these values computed with Python's hashlib over the fixture files).
#[test]
fn adapter_short_hash_is_a1111s_addnet_hash() {
    use lora_studio::engine::io::infotext::adapter_short_hash;
    assert_eq!(adapter_short_hash(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap(), "bdb6da06a20d");
    assert_eq!(adapter_short_hash(&sd1_tiny().join("lora_b_peft.safetensors")).unwrap(), "cc421b421587");
    let e = format!("{:#}", adapter_short_hash(&fixture("make_reference.py")).unwrap_err());
    assert!(e.contains("make_reference.py: not a safetensors file"), "{e}");
}

/// `Model hash` is A1111's checkpoint short hash: SHA-256 of the whole file, 10 hex digits (the
/// value computed with Python's hashlib over the fixture file).
#[test]
fn checkpoint_short_hash_is_a1111s_model_hash() {
    use lora_studio::engine::io::infotext::checkpoint_short_hash;
    let unet = sd1_tiny().join("model/unet/diffusion_pytorch_model.safetensors");
    assert_eq!(checkpoint_short_hash(&unet).unwrap(), "8dcc6e5414");
}
