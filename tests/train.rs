//! Training on the fixture model: the loss falls, the base stays bit-identical, a resumed run
//! follows the same trajectory, and a NaN stops the step without touching the weights.

mod common;

use lora_studio::engine::io::weights::WeightPrecision;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::adapters::stack::TargetPreset;
use lora_studio::engine::io::weights::{read_safetensors, write_safetensors};
use lora_studio::engine::pipeline::{ModelWeights, StableDiffusion};
use lora_studio::engine::train::dataset::{Dataset, DatasetOptions};
use lora_studio::engine::train::optim::Optimizer;
use lora_studio::engine::train::trainer::{Algorithm, NonFiniteLoss, TrainConfig, Trainer};

/// Four 48×48 pictures of a coloured disc on a plain background, with captions.
fn make_images(dir: &Path) {
    let colours = [
        ([220u8, 40, 40], [30u8, 30, 160]),
        ([40, 200, 60], [240, 240, 240]),
        ([250, 210, 0], [20, 20, 20]),
        ([200, 60, 200], [90, 160, 220]),
    ];
    for (i, (fg, bg)) in colours.iter().enumerate() {
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            let (dx, dy) = (x as i32 - 24, y as i32 - 24);
            image::Rgb(if dx * dx + dy * dy < 14 * 14 { *fg } else { *bg })
        });
        img.save(dir.join(format!("disc{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("disc{i}.txt")), format!("a disc, colour {i}")).unwrap();
    }
}

fn config(steps: usize, algorithm: Algorithm) -> TrainConfig {
    TrainConfig {
        algorithm,
        rank: 4,
        alpha: 4.0,
        targets: if algorithm == Algorithm::Lora {
            TargetPreset::Transformer
        } else {
            TargetPreset::TransformerAndConv
        },
        learning_rate: 3e-3,
        steps,
        batch_size: 2,
        seed: 17,
        dataset: DatasetOptions { resolution: 32, flip: true, trigger: "sks".into(), ..Default::default() },
        ..Default::default()
    }
}

fn trainer(dir: &Path, cfg: TrainConfig) -> Trainer {
    let model = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let ds = Dataset::scan(&[dir.to_path_buf()], &cfg.dataset).unwrap();
    assert_eq!(ds.images.len(), 4);
    Trainer::new(model, cfg, &ds).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn forty_lora_steps_lower_the_evaluation_loss_and_leave_the_base_untouched() {
    let dir = tempdir("loss");
    make_images(&dir);
    let mut t = trainer(&dir, config(40, Algorithm::Lora));
    let base_before = values(t.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight());
    let before = t.validation_loss().unwrap();
    for _ in 0..40 {
        t.train_step().unwrap();
    }
    let after = t.validation_loss().unwrap();
    eprintln!(
        "validation loss {before:.4} → {after:.4}; {} parameters in {} layers",
        t.trainable_parameters(),
        t.trained_layers()
    );
    assert!(after < 0.9 * before, "validation loss {before} → {after}");
    let base_after = values(t.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight());
    assert_eq!(base_before, base_after, "base weights are frozen");
    // The adapter written to disk reloads onto a fresh model.
    let out = dir.join("trained.safetensors");
    t.save_adapter(&out, lora_studio::engine::adapters::formats::Naming::Kohya).unwrap();
    let mut fresh = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let report = fresh.load_adapter("trained", &out, 1.0).unwrap();
    assert_eq!(report.matched, t.trained_layers());
    check_training_record(&out, &dir);
}

/// Frozen weights kept in f16 (`--weights f16`) train the same LoRA: the adapter stays f32, the
/// base stays f16 and untouched, and after 40 steps the validation loss is within 2 % of the run
/// over f32 weights.
#[test]
fn forty_lora_steps_over_f16_weights_end_within_two_percent_of_f32() {
    let dir = tempdir("loss-f16");
    make_images(&dir);
    let ds = Dataset::scan(std::slice::from_ref(&dir), &config(40, Algorithm::Lora).dataset).unwrap();
    let run = |precision: WeightPrecision| {
        let weights = ModelWeights::load(&sd1_tiny().join("model"), DType::F32, precision, &Device::Cpu).unwrap();
        let mut t =
            Trainer::new(StableDiffusion::from_weights(weights).unwrap(), config(40, Algorithm::Lora), &ds).unwrap();
        fn layer(t: &Trainer) -> lora_studio::engine::models::nn::Linear {
            t.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.clone()
        }
        let base_before = layer(&t).weight().clone();
        let before = t.validation_loss().unwrap();
        for _ in 0..40 {
            t.train_step().unwrap();
        }
        let after = t.validation_loss().unwrap();
        let l = layer(&t);
        let base_after = l.weight();
        assert_eq!(values(&base_before), values(base_after), "{precision:?}: the base is frozen");
        for a in &l.stack.adapters {
            assert!(
                a.delta.tensors().iter().all(|t| t.dtype() == DType::F32),
                "{precision:?}: the adapter trains in f32"
            );
        }
        (base_after.dtype(), before, after)
    };
    let (dtype32, before32, after32) = run(WeightPrecision::F32);
    let (dtype16, before16, after16) = run(WeightPrecision::F16);
    assert_eq!((dtype32, dtype16), (DType::F32, DType::F16));
    let gap = (after16 - after32).abs() / after32;
    eprintln!(
        "validation loss f32 {before32:.5} → {after32:.5}, f16 weights {before16:.5} → {after16:.5}: {:.3} %",
        100.0 * gap
    );
    assert!(after16 < 0.9 * before16, "f16 weights: the loss falls ({before16} → {after16})");
    assert!(gap <= 0.02, "f16 weights end {:.2} % from f32", 100.0 * gap);
}

/// The file says what A1111, ComfyUI and civitai read, spelled as kohya sd-scripts spells it.
fn check_training_record(file: &Path, data: &Path) {
    use sha2::{Digest, Sha256};
    let (_, m) = lora_studio::engine::io::weights::read_safetensors_with_metadata(file).unwrap();
    let get = |k: &str| m.get(k).unwrap_or_else(|| panic!("`{k}` in {m:?}")).as_str();
    assert_eq!(get("ss_output_name"), "trained");
    assert_eq!(get("ss_v2"), "False");
    assert_eq!(get("ss_base_model_version"), "sd_v1");
    assert_eq!(get("ss_steps"), "40");
    assert_eq!(get("ss_lr_scheduler"), "constant");
    assert!(get("ss_optimizer").starts_with("AdamW"));
    assert!(get("ss_training_started_at").parse::<u64>().unwrap() > 1_700_000_000);
    assert_eq!(get("modelspec.sai_model_spec"), "1.0.1");
    assert_eq!(get("modelspec.architecture"), "stable-diffusion-v1/lora");
    assert_eq!(get("modelspec.resolution"), "32x32");
    assert_eq!(get("modelspec.prediction_type"), "epsilon");
    assert_eq!(get("modelspec.title"), "trained");
    assert_eq!(get("modelspec.trigger_phrase"), "sks");
    // Tags are counted per image folder, as kohya keys them.
    let folder = data.file_name().unwrap().to_string_lossy().into_owned();
    let freq: serde_json::Value = serde_json::from_str(get("ss_tag_frequency")).unwrap();
    assert_eq!(freq[&folder]["a disc"], 4, "{freq}");
    // sshs_model_hash is SHA-256 of the tensor data, as A1111's additional-networks computes it.
    let bytes = std::fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hex: String = Sha256::digest(&bytes[8 + header..]).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(get("sshs_model_hash"), hex);
    assert_eq!(get("sshs_legacy_hash").len(), 8);
}

#[test]
fn resume_follows_the_same_trajectory() {
    for algorithm in [Algorithm::Lora, Algorithm::Glora, Algorithm::Loha, Algorithm::Lokr, Algorithm::Dora] {
        let dir = tempdir(&format!("resume-{algorithm:?}"));
        make_images(&dir);
        let mut straight = trainer(&dir, config(8, algorithm));
        for _ in 0..8 {
            straight.train_step().unwrap();
        }
        let mut first = trainer(&dir, config(8, algorithm));
        for _ in 0..4 {
            first.train_step().unwrap();
        }
        let ckpt = dir.join("run.checkpoint.safetensors");
        first.save_checkpoint(&ckpt).unwrap();
        drop(first);
        let mut resumed = trainer(&dir, config(8, algorithm));
        resumed.load_checkpoint(&ckpt).unwrap();
        for _ in 0..4 {
            resumed.train_step().unwrap();
        }
        assert_eq!(resumed.step, 8);
        let (a, b) = (straight.export_layers().unwrap(), resumed.export_layers().unwrap());
        let mut worst = 0f32;
        for (x, y) in a.iter().zip(&b) {
            for (tx, ty) in x.delta.tensors().iter().zip(y.delta.tensors()) {
                for (p, q) in values(tx).iter().zip(values(ty)) {
                    worst = worst.max((p - q).abs());
                }
            }
        }
        assert!(worst <= 1e-6, "{algorithm:?}: resumed adapter differs by {worst}");
        assert_eq!(straight.losses, resumed.losses);
    }
}

/// The largest difference between two trainers' adapters.
fn adapter_gap(a: &Trainer, b: &Trainer) -> f32 {
    let (a, b) = (a.export_layers().unwrap(), b.export_layers().unwrap());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(&b) {
        for (tx, ty) in x.delta.tensors().iter().zip(y.delta.tensors()) {
            for (p, q) in values(tx).iter().zip(values(ty)) {
                worst = worst.max((p - q).abs());
            }
        }
    }
    worst
}

/// A config for `optimizer` at its usual rate, with a warmup and cosine schedule and a text
/// encoder at its own rate (Prodigy: at the one rate it finds for all), so every part of the step
/// is in play.
fn optimizer_config(steps: usize, optimizer: Optimizer) -> TrainConfig {
    let lr = if optimizer == Optimizer::Prodigy { 1.0 } else { 3e-3 };
    TrainConfig {
        optimizer,
        learning_rate: lr,
        train_text_encoder: true,
        text_encoder_lr: if optimizer == Optimizer::Prodigy { None } else { Some(lr / 2.0) },
        warmup_steps: 2,
        lr_schedule: lora_studio::engine::train::trainer::LrSchedule::Cosine,
        ..config(steps, Algorithm::Lora)
    }
}

/// Prodigy's and Adafactor's state (Prodigy's d and sums, Adafactor's row and column means and
/// step counts) survive a checkpoint: stopped at step 3 and resumed, the run ends where an
/// uninterrupted one does, bit for bit.
#[test]
fn prodigy_and_adafactor_runs_resume_exactly() {
    for optimizer in [Optimizer::Prodigy, Optimizer::Adafactor] {
        let dir = tempdir(&format!("resume-{optimizer}"));
        make_images(&dir);
        let mut straight = trainer(&dir, optimizer_config(6, optimizer));
        for _ in 0..6 {
            straight.train_step().unwrap();
        }
        let mut first = trainer(&dir, optimizer_config(6, optimizer));
        for _ in 0..3 {
            first.train_step().unwrap();
        }
        let ckpt = dir.join("run.checkpoint.safetensors");
        first.save_checkpoint(&ckpt).unwrap();
        let lr_at_stop = first.current_lr();
        drop(first);
        let mut resumed = trainer(&dir, optimizer_config(6, optimizer));
        resumed.load_checkpoint(&ckpt).unwrap();
        assert_eq!(resumed.current_lr(), lr_at_stop, "{optimizer}: the reported rate carries over");
        for _ in 0..3 {
            resumed.train_step().unwrap();
        }
        assert_eq!(adapter_gap(&straight, &resumed), 0.0, "{optimizer}: the resumed run differs");
        assert_eq!(straight.losses, resumed.losses);
        let state: Vec<String> = resumed.optimizer_tensors().map(|(name, _)| name).collect();
        let kind = if optimizer == Optimizer::Prodigy { "prodigy_p0/" } else { "adafactor_row/" };
        assert!(state.iter().any(|n| n.starts_with(kind)), "{optimizer}: {state:?}");
        // The checkpoint names its optimiser; another one cannot take its state over.
        for other in Optimizer::ALL.into_iter().filter(|&o| o != optimizer) {
            let mut wrong = trainer(&dir, optimizer_config(6, other));
            let err = wrong.load_checkpoint(&ckpt).unwrap_err().to_string();
            assert!(
                err.contains(&format!("trained with {}", optimizer.label()))
                    && err.contains(&format!("resume with {optimizer}")),
                "{err}"
            );
            assert_eq!(wrong.step, 0);
        }
    }
}

/// A checkpoint written before the optimiser could be chosen (no `optimizer` in its state or its
/// config) is AdamW's, and resumes as one.
#[test]
fn an_adamw_checkpoint_from_before_the_choice_still_resumes() {
    let dir = tempdir("old-checkpoint");
    make_images(&dir);
    let mut first = trainer(&dir, config(4, Algorithm::Lora));
    for _ in 0..2 {
        first.train_step().unwrap();
    }
    let ckpt = dir.join("run.checkpoint.safetensors");
    first.save_checkpoint(&ckpt).unwrap();
    let (tensors, mut metadata) = lora_studio::engine::io::weights::read_safetensors_with_metadata(&ckpt).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&metadata["lora_studio_checkpoint"]).unwrap();
    state.as_object_mut().unwrap().remove("optimizer").unwrap();
    for key in ["optimizer", "prodigy", "adafactor"] {
        state["config"].as_object_mut().unwrap().remove(key).unwrap();
    }
    metadata.insert("lora_studio_checkpoint".into(), state.to_string());
    write_safetensors(&ckpt, &tensors, Some(metadata)).unwrap();
    let mut resumed = trainer(&dir, config(4, Algorithm::Lora));
    resumed.load_checkpoint(&ckpt).unwrap();
    for _ in 0..2 {
        first.train_step().unwrap();
        resumed.train_step().unwrap();
    }
    assert_eq!(adapter_gap(&first, &resumed), 0.0);
}

/// A few steps of each optimiser on the fixture model: the adapter moves, the loss changes, the
/// reported rate is the one the optimiser takes (Prodigy's d·lr), and the file says which one.
#[test]
fn each_optimizer_trains_and_names_itself_in_the_metadata() {
    let dir = tempdir("optimizers");
    make_images(&dir);
    for optimizer in Optimizer::ALL {
        let mut t = trainer(&dir, optimizer_config(4, optimizer));
        let before = t.validation_loss().unwrap();
        let untrained = trainer(&dir, optimizer_config(4, optimizer));
        for _ in 0..4 {
            t.train_step().unwrap();
        }
        let after = t.validation_loss().unwrap();
        let moved = adapter_gap(&t, &untrained);
        eprintln!(
            "{optimizer}: validation loss {before:.5} → {after:.5}, adapter moved {moved:.3e}, lr {:.3e}",
            t.current_lr()
        );
        assert!(moved > 0.0 && after.is_finite() && after != before, "{optimizer}: {before} → {after}");
        let scheduled = t.config.learning_rate * t.config.lr_factor(3);
        if optimizer == Optimizer::Prodigy {
            assert!(t.current_lr() > 0.0 && t.current_lr() < scheduled, "d·lr {} vs lr {scheduled}", t.current_lr());
        } else {
            assert_eq!(t.current_lr(), scheduled);
        }
        let out = dir.join(format!("{optimizer}.safetensors"));
        t.save_adapter(&out, lora_studio::engine::adapters::formats::Naming::Kohya).unwrap();
        let (_, m) = lora_studio::engine::io::weights::read_safetensors_with_metadata(&out).unwrap();
        let expected = match optimizer {
            Optimizer::AdamW => "AdamW(betas=(0.9, 0.999)",
            Optimizer::Prodigy => "prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08,d0=1e-06",
            Optimizer::Adafactor => {
                "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,warmup_init=False"
            }
        };
        assert!(m["ss_optimizer"].starts_with(expected), "{optimizer}: {}", m["ss_optimizer"]);
    }
}

/// Two discs in `3_disc` (each shown 3 times an epoch) and two in `plain` (once), captioned.
fn make_repeat_folders(dir: &Path) {
    make_images(dir);
    for (i, folder) in ["3_disc", "3_disc", "plain", "plain"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        for ext in ["png", "txt"] {
            std::fs::rename(dir.join(format!("disc{i}.{ext}")), dir.join(folder).join(format!("disc{i}.{ext}")))
                .unwrap();
        }
    }
}

/// An epoch over `2_a` (one image) and `b` (one image) visits a's image twice and b's once, in
/// every epoch, and a run set in epochs is as many steps as sd-scripts counts.
#[test]
fn an_epoch_shows_each_image_as_often_as_its_folder_repeats() {
    let dir = tempdir("repeats-epoch");
    make_images(&dir);
    for (i, folder) in [(0, "2_a"), (1, "b")] {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        std::fs::rename(dir.join(format!("disc{i}.png")), dir.join(folder).join("disc.png")).unwrap();
    }
    let cfg = TrainConfig { batch_size: 1, epochs: Some(5), ..config(1, Algorithm::Lora) };
    let ds = Dataset::scan(&[dir.join("2_a"), dir.join("b")], &cfg.dataset).unwrap();
    let a = ds.images.iter().position(|e| e.folder == "2_a").unwrap();
    let b = ds.images.iter().position(|e| e.folder == "b").unwrap();
    assert_eq!(ds.images[a].caption, "a", "the folder's words caption an image without a caption file");
    let model = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let mut t = Trainer::new(model, cfg, &ds).unwrap();
    // 5 epochs of 3 images, batch 1.
    assert_eq!(t.config.steps, 15);
    for epoch in 0..2 {
        let order = t.epoch_order().to_vec();
        let count = |i| order.iter().filter(|&&j| j == i).count();
        assert_eq!((order.len(), count(a), count(b)), (3, 2, 1), "epoch {epoch}: {order:?}");
        for _ in 0..3 {
            t.train_step().unwrap();
        }
    }
}

/// A checkpoint taken mid-epoch over folders with repeats resumes on the same trajectory: the
/// epoch's order (with its repeated images) is restored, not drawn again.
#[test]
fn resume_with_repeats_follows_the_same_trajectory() {
    let dir = tempdir("resume-repeats");
    make_repeat_folders(&dir);
    // 2 × 3 + 2 = 8 images an epoch, batch 2: 4 steps an epoch, 2 epochs = 8 steps.
    let cfg = TrainConfig { epochs: Some(2), ..config(1, Algorithm::Lora) };
    let mut straight = trainer(&dir, cfg.clone());
    assert_eq!(straight.config.steps, 8);
    for _ in 0..8 {
        straight.train_step().unwrap();
    }
    let mut first = trainer(&dir, cfg.clone());
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    let ckpt = dir.join("run.checkpoint.safetensors");
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = trainer(&dir, cfg);
    resumed.load_checkpoint(&ckpt).unwrap();
    for _ in 0..5 {
        resumed.train_step().unwrap();
    }
    assert_eq!(straight.losses, resumed.losses);
    let (a, b) = (straight.export_layers().unwrap(), resumed.export_layers().unwrap());
    for (x, y) in a.iter().zip(&b) {
        for (tx, ty) in x.delta.tensors().iter().zip(y.delta.tensors()) {
            assert_eq!(values(tx), values(ty), "{}", x.path);
        }
    }
    // The record counts the repeats: 8 images an epoch, 2 epochs, the 3_disc folder's 3 repeats.
    let out = dir.join("trained.safetensors");
    resumed.save_adapter(&out, lora_studio::engine::adapters::formats::Naming::Kohya).unwrap();
    let (_, m) = lora_studio::engine::io::weights::read_safetensors_with_metadata(&out).unwrap();
    assert_eq!(
        (m["ss_num_train_images"].as_str(), m["ss_num_epochs"].as_str(), m["ss_epoch"].as_str()),
        ("8", "2", "2")
    );
    let dirs: serde_json::Value = serde_json::from_str(&m["ss_dataset_dirs"]).unwrap();
    assert_eq!(dirs["3_disc"], serde_json::json!({"n_repeats": 3, "img_count": 2}), "{dirs}");
}

#[test]
fn a_blow_up_stops_the_step_and_keeps_the_weights() {
    let dir = tempdir("nan");
    make_images(&dir);
    let mut cfg = config(5, Algorithm::Lora);
    cfg.learning_rate = f64::MAX / 4.0; // finite, so it passes validation, but overflows the update
    cfg.max_grad_norm = None;
    let mut t = trainer(&dir, cfg);
    let snapshot = |t: &Trainer| -> Vec<Vec<f32>> {
        t.export_layers()
            .unwrap()
            .iter()
            .flat_map(|l| l.delta.tensors().into_iter().map(values).collect::<Vec<_>>())
            .collect()
    };
    let before = snapshot(&t);
    let err = t.train_step().unwrap_err();
    assert!(err.downcast_ref::<NonFiniteLoss>().is_some(), "{err:#}");
    assert!(format!("{err}").contains("lower the learning rate"));
    assert_eq!(t.step, 0, "no step was counted");
    assert_eq!(snapshot(&t), before, "weights untouched");
}

#[test]
fn full_fine_tuning_changes_the_model_and_writes_a_loadable_folder() {
    use lora_studio::engine::pipeline::ModelWeights;
    let dir = tempdir("full");
    make_images(&dir);
    let mut cfg = config(3, Algorithm::Full);
    cfg.learning_rate = 1e-3;
    cfg.full_modules = vec!["unet.up_blocks.".into()];
    let weights =
        ModelWeights::load(&sd1_tiny().join("model"), DType::F32, WeightPrecision::Auto, &Device::Cpu).unwrap();
    let ds = Dataset::scan(std::slice::from_ref(&dir), &cfg.dataset).unwrap();
    let mut t = Trainer::new_full(weights, cfg, &ds).unwrap();
    let before = values(t.model.unet.up_blocks[0].resnets[0].conv1.weight());
    let frozen_before = values(t.model.unet.down_blocks[0].resnets[0].conv1.weight());
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    assert_ne!(values(t.model.unet.up_blocks[0].resnets[0].conv1.weight()), before, "selected weights train");
    // Full training: moments that still referenced a step's graph would keep every step's activations alive
    // (here a run grows by the activations' size each step until the machine runs out of memory).
    for (name, state) in t.optimizer_tensors() {
        assert!(!state.track_op(), "{name}: the optimiser's state holds on to the autograd graph");
    }

    assert_eq!(values(t.model.unet.down_blocks[0].resnets[0].conv1.weight()), frozen_before, "others stay frozen");
    let out = dir.join("finetuned");
    t.save_model(&out).unwrap();
    t.save_model(&out).unwrap(); // a second save replaces the first
    let reloaded = StableDiffusion::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        values(reloaded.unet.up_blocks[0].resnets[0].conv1.weight()),
        values(t.model.unet.up_blocks[0].resnets[0].conv1.weight())
    );
    // What diffusers and transformers need to read the folder: the VAE's block types (their
    // defaults describe a one-level VAE) and the tokenizer's vocabulary files.
    let vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vae/config.json")).unwrap()).unwrap();
    let levels = vae["block_out_channels"].as_array().unwrap().len();
    assert_eq!(vae["down_block_types"].as_array().map(Vec::len), Some(levels));
    assert_eq!(vae["up_block_types"].as_array().map(Vec::len), Some(levels));
    assert!(out.join("tokenizer/vocab.json").is_file() && out.join("tokenizer/merges.txt").is_file());
}

#[test]
fn latents_are_cached_on_disk_and_reused() {
    let dir = tempdir("cache");
    make_images(&dir);
    let cache = dir.join("cache");
    let mut cfg = config(1, Algorithm::Lora);
    cfg.latent_cache = Some(cache.clone());
    cfg.dataset.center_crop = false; // four random crops × two mirrors per image
    let mut first = trainer(&dir, cfg.clone());
    let files = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(files, 4 * 4 * 2);
    let a = first.validation_loss().unwrap();
    let mut second = trainer(&dir, cfg.clone());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), files, "nothing new was encoded");
    assert_eq!(second.validation_loss().unwrap(), a, "cached latents are the same latents");
    // The cache is really read: entries replaced by other (valid) latents change the loss.
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        let latents = read_safetensors(&path).unwrap()["latents"].clone();
        let other = (latents.ones_like().unwrap() * 0.5).unwrap();
        write_safetensors(&path, &std::collections::HashMap::from([("latents".to_string(), other)]), None).unwrap();
    }
    let mut third = trainer(&dir, cfg);
    assert_ne!(third.validation_loss().unwrap(), a, "the altered cache entries were used");
}

/// LoHa, LoKr and DoRA train (the loss falls), and the file they write is in LyCORIS' layout, loads
/// whole onto a fresh model and gives the trained model's output there.
#[test]
fn loha_lokr_and_dora_train_and_write_what_lycoris_reads() {
    use lora_studio::engine::adapters::formats::{Naming, read_adapter};
    let r = reference();
    for (algorithm, key, kind) in [
        (Algorithm::Loha, "hada_w1_a", "loha"),
        (Algorithm::Lokr, "lokr_w1", "lokr"),
        (Algorithm::Dora, "dora_scale", "dora"),
    ] {
        let dir = tempdir(&format!("kinds-{algorithm:?}"));
        make_images(&dir);
        let mut t = trainer(&dir, config(30, algorithm));
        let before = t.validation_loss().unwrap();
        for _ in 0..30 {
            t.train_step().unwrap();
        }
        let after = t.validation_loss().unwrap();
        assert!(after < before, "{algorithm:?}: validation loss {before} → {after}");
        let out = dir.join("trained.safetensors");
        t.save_adapter(&out, Naming::Kohya).unwrap();
        let keys = read_safetensors(&out).unwrap();
        assert!(keys.keys().any(|k| k.ends_with(key)), "{algorithm:?}: `{key}` keys in the file");
        let parsed = read_adapter(&out).unwrap();
        assert!(parsed.layers.iter().all(|l| l.delta.algorithm().contains(kind)), "{algorithm:?}");
        let mut fresh = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
        let report = fresh.load_adapter("trained", &out, 1.0).unwrap();
        assert_eq!(report.matched, t.trained_layers());
        let emb = fresh.text_encoder.forward(&r["input_ids"]).unwrap();
        let ours = fresh.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        let trained = t.model.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("{algorithm:?} file vs trainer"), &ours, &trained);
    }
}

/// SDXL: a LoRA on the UNet and both text encoders trains (the validation loss falls), each image's
/// real size and crop reach the UNet's micro-conditioning, and the file is kohya's SDXL naming
/// (`lora_te1_`, `lora_te2_`) with SDXL's metadata, which loads back onto the model. UNet-only
/// training (SDXL's default) runs each caption through the text encoders once.
#[test]
fn sdxl_lora_trains_both_text_encoders_with_each_images_size() {
    let dir = tempdir("sdxl-train");
    // Portrait pictures (48 wide, 64 high): cropped to a square, so the crop's top is not 0.
    for i in 0..4u8 {
        let img = image::RgbImage::from_fn(48, 64, |x, y| image::Rgb([40 * i, (x * 5) as u8, (y * 3) as u8]));
        img.save(dir.join(format!("p{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("p{i}.txt")), format!("a picture, number {i}")).unwrap();
    }
    let sdxl = fixtures_dir().join("sdxl-tiny/model");
    let cfg = TrainConfig {
        train_text_encoder: true,
        learning_rate: 1e-2,
        text_encoder_lr: Some(1e-2),
        dataset: DatasetOptions { resolution: 32, trigger: "sks".into(), ..Default::default() },
        // The convolutions too: in this tiny UNet most of the weights are in its resnets.
        ..config(30, Algorithm::Locon)
    };
    let model = StableDiffusion::load(&sdxl, &Device::Cpu).unwrap();
    let ds = Dataset::scan(&[dir.to_path_buf()], &cfg.dataset).unwrap();
    let mut t = Trainer::new(model, cfg.clone(), &ds).unwrap();
    // Resized to 32×43 and cut at the centre: top (43 − 32) / 2 rounded, left 0.
    assert_eq!(t.size_numbers_of(0)[0], ([64, 48], [6, 0], [32, 32]));
    let before = t.validation_loss().unwrap();
    for _ in 0..30 {
        t.train_step().unwrap();
    }
    let after = t.validation_loss().unwrap();
    eprintln!("SDXL validation loss {before} → {after}");
    assert!(after < 0.9 * before, "validation loss {before} → {after}");
    let out = dir.join("sdxl-style.safetensors");
    t.save_adapter(&out, lora_studio::engine::adapters::formats::Naming::Kohya).unwrap();
    let (tensors, metadata) = lora_studio::engine::io::weights::read_safetensors_with_metadata(&out).unwrap();
    for prefix in ["lora_unet_", "lora_te1_", "lora_te2_"] {
        assert!(tensors.keys().any(|k| k.starts_with(prefix)), "{prefix} layers");
    }
    assert!(!tensors.keys().any(|k| k.starts_with("lora_te_")), "SDXL names its encoders te1 / te2");
    assert_eq!(metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(metadata["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
    let mut fresh = StableDiffusion::load(&sdxl, &Device::Cpu).unwrap();
    let report = fresh.load_adapter("trained", &out, 1.0).unwrap();
    assert_eq!(report.matched, t.trained_layers());

    // One of the two encoders, as sd-scripts' --network_te_train_targets; refused on a model with one.
    use lora_studio::engine::adapters::formats::Component;
    use lora_studio::engine::train::trainer::TextEncoders;
    for (choice, wanted) in
        [(TextEncoders::First, Component::TextEncoder), (TextEncoders::Second, Component::TextEncoder2)]
    {
        let model = StableDiffusion::load(&sdxl, &Device::Cpu).unwrap();
        let t = Trainer::new(model, TrainConfig { text_encoders: choice, ..cfg.clone() }, &ds).unwrap();
        let text: Vec<Component> =
            t.export_layers().unwrap().into_iter().map(|l| l.component).filter(|c| *c != Component::Unet).collect();
        assert!(!text.is_empty() && text.iter().all(|c| *c == wanted), "{choice:?}: {text:?}");
    }
    let sd1 = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let e = Trainer::new(sd1, TrainConfig { text_encoders: TextEncoders::Second, ..cfg.clone() }, &ds).err().unwrap();
    assert!(format!("{e:#}").contains("this model has one"), "{e:#}");

    // The UNet alone: the text encoders run once per caption, however many steps.
    let unet_only = TrainConfig { train_text_encoder: false, ..cfg };
    let model = StableDiffusion::load(&sdxl, &Device::Cpu).unwrap();
    let mut t = Trainer::new(model, unet_only, &ds).unwrap();
    for _ in 0..6 {
        t.train_step().unwrap();
    }
    assert!(t.model.text_encoder_runs() <= 4, "{} text encoder runs", t.model.text_encoder_runs());
    // A UNet-only file on this custom-width model: `adapter info` names the family from its metadata.
    let unet_only = dir.join("unet-only.safetensors");
    t.save_adapter(&unet_only, lora_studio::engine::adapters::formats::Naming::Kohya).unwrap();
    let parsed = lora_studio::engine::adapters::formats::read_adapter(&unet_only).unwrap();
    assert_eq!(lora_studio::engine::adapters::formats::summarize(&parsed).family, "SDXL");
}
