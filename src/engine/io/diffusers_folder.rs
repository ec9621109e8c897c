//! Writing a model as a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`,
//! `scheduler/`, `tokenizer/`), the layout diffusers and our own loader read. Reading lives in
//! `pipeline::ModelWeights::load`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::DType;
use serde::Serialize;

use crate::engine::Result;
use crate::engine::io::weights::{write_atomic, write_safetensors};
use crate::engine::pipeline::{ModelWeights, StableDiffusion};

fn config_json<T: Serialize>(config: &T, class: &str) -> Result<String> {
    let mut v = serde_json::to_value(config)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("_class_name".into(), class.into());
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

/// The VAE's config with the block types spelled out: diffusers' defaults name one block, so a
/// folder without them builds a one-level VAE there and fails on the first picture.
fn vae_config_json(config: &crate::engine::models::vae::VaeConfig) -> Result<String> {
    let mut v = serde_json::to_value(config)?;
    if let Some(o) = v.as_object_mut() {
        let n = config.block_out_channels.len();
        o.insert("_class_name".into(), "AutoencoderKL".into());
        o.insert("down_block_types".into(), vec!["DownEncoderBlock2D"; n].into());
        o.insert("up_block_types".into(), vec!["UpDecoderBlock2D"; n].into());
        o.insert("act_fn".into(), "silu".into());
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

/// Writes `weights` to a new folder `dir`, whole or not at all: everything goes to a temporary
/// folder beside it that is renamed at the end. `tokenizer_source`, when given, is a `tokenizer/`
/// folder to copy (its vocabulary files let diffusers read the result too).
/// With `replace`, an existing folder at `dir` is swapped out for the new one (kept as
/// `.<name>.old` until the new one is in place).
pub fn write_model_folder(
    weights: &ModelWeights,
    dir: &Path,
    dtype: DType,
    tokenizer_source: Option<&Path>,
    replace: bool,
) -> Result<()> {
    if dir.exists() && !replace {
        bail!("{}: already exists; choose a new folder", dir.display());
    }
    let name = dir.file_name().with_context(|| format!("{}: needs a folder name", dir.display()))?;
    let tmp = partial_path(dir, name);
    let result = (|| -> Result<()> {
        let second = weights.text_encoder_2.as_ref();
        let mut subs = vec!["unet", "text_encoder", "vae", "scheduler", "tokenizer"];
        if second.is_some() {
            subs.extend(["text_encoder_2", "tokenizer_2"]);
        }
        for sub in subs {
            std::fs::create_dir_all(tmp.join(sub)).with_context(|| format!("{}: cannot create", tmp.display()))?;
        }
        let mut index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        });
        if let Some(second) = second {
            index["_class_name"] = "StableDiffusionXLPipeline".into();
            index["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
            index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
            index["force_zeros_for_empty_prompt"] = weights.force_zeros_for_empty_prompt.into();
            index["scheduler"] = serde_json::json!(["diffusers", "EulerDiscreteScheduler"]);
            let mut text = clip_config_json(&second.config, "CLIPTextModelWithProjection")?;
            if let Some(projection) = second.weights.tensor("text_projection.weight") {
                text["projection_dim"] = projection.dim(0)?.into();
            }
            write_atomic(&tmp.join("text_encoder_2/config.json"), serde_json::to_string_pretty(&text)?.as_bytes())?;
            write_tokenizer_config(&tmp.join("tokenizer_2"), second.tokenizer.pad_id())?;
            complete_tokenizer(&tmp.join("tokenizer_2"))?;
        }
        write_atomic(&tmp.join("model_index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
        write_atomic(
            &tmp.join("unet/config.json"),
            config_json(&weights.unet_config, "UNet2DConditionModel")?.as_bytes(),
        )?;
        write_atomic(&tmp.join("vae/config.json"), vae_config_json(&weights.vae_config)?.as_bytes())?;
        let text = clip_config_json(&weights.text_config, "CLIPTextModel")?;
        write_atomic(&tmp.join("text_encoder/config.json"), serde_json::to_string_pretty(&text)?.as_bytes())?;
        write_atomic(
            &tmp.join("scheduler/scheduler_config.json"),
            config_json(
                &weights.scheduler_config,
                if second.is_some() { "EulerDiscreteScheduler" } else { "DDIMScheduler" },
            )?
            .as_bytes(),
        )?;
        match tokenizer_source.filter(|p| p.is_dir()) {
            Some(src) => {
                for entry in std::fs::read_dir(src).with_context(|| format!("{}: cannot read", src.display()))? {
                    let p = entry.with_context(|| format!("{}: cannot read", src.display()))?.path();
                    if let (true, Some(name)) = (p.is_file(), p.file_name()) {
                        let target = tmp.join("tokenizer").join(name);
                        std::fs::copy(&p, &target)
                            .with_context(|| format!("{}: cannot copy to {}", p.display(), target.display()))?;
                    }
                }
            }
            None => write_tokenizer_config(&tmp.join("tokenizer"), weights.tokenizer.pad_id())?,
        }
        complete_tokenizer(&tmp.join("tokenizer"))?;
        let mut components = vec![
            ("unet", "diffusion_pytorch_model.safetensors", &weights.unet),
            ("text_encoder", "model.safetensors", &weights.text_encoder),
            ("vae", "diffusion_pytorch_model.safetensors", &weights.vae),
        ];
        if let Some(second) = second {
            components.push(("text_encoder_2", "model.safetensors", &second.weights));
        }
        for (sub, file, map) in components {
            let mut tensors = HashMap::with_capacity(map.len());
            for name in map.names() {
                let t = map.tensor(name).expect("listed").detach();
                tensors.insert(name.clone(), t.to_dtype(dtype)?);
            }
            write_safetensors(&tmp.join(sub).join(file), &tensors, None)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let old = dir.with_file_name(format!(".{}.old", name.to_string_lossy()));
            if dir.exists() {
                let _ = std::fs::remove_dir_all(&old);
                std::fs::rename(dir, &old).with_context(|| format!("{}: cannot replace", dir.display()))?;
            }
            std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Copies a diffusers model folder to `out` with the live mix folded into the UNet and text
/// encoder weights. Written to a temporary folder first and renamed, so `out` is whole or absent.
/// A text encoder's `config.json` as transformers reads it, for `architecture`.
fn clip_config_json(config: &crate::engine::models::clip::ClipConfig, architecture: &str) -> Result<serde_json::Value> {
    let mut text = serde_json::to_value(config)?;
    text["architectures"] = serde_json::json!([architecture]);
    text["model_type"] = "clip_text_model".into();
    Ok(text)
}

/// A tokenizer folder's `tokenizer_config.json`: CLIP's, padding with `!` (id 0) or end-of-text.
fn write_tokenizer_config(dir: &Path, pad_id: u32) -> Result<()> {
    let pad = if pad_id == 0 { "!" } else { "<|endoftext|>" };
    let cfg = serde_json::json!({ "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer" });
    write_atomic(&dir.join("tokenizer_config.json"), cfg.to_string().as_bytes())
}

/// Adds `vocab.json` and `merges.txt` where a tokenizer folder lacks them: earlier folders of ours
/// had neither (the vocabulary lives in the binary), and transformers cannot tokenize without them.
fn complete_tokenizer(dir: &Path) -> Result<()> {
    if dir.join("vocab.json").is_file() {
        return Ok(());
    }
    crate::engine::models::tokenizer::write_vocabulary(dir, write_atomic)
}

/// The folder a model is written into before it is renamed to `dir`: `.NAME.partial-PID`, so
/// that a killed run's leftovers are recognised and tidied by the next command that writes here.
fn partial_path(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    crate::engine::io::weights::tidy_temporaries_beside(dir);
    let tmp = dir.with_file_name(format!(
        ".{}{}{}",
        name.to_string_lossy(),
        crate::engine::io::weights::PARTIAL_MARK,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    tmp
}

pub fn write_merged_model(sd: &mut StableDiffusion, model: &Path, out: &Path) -> Result<usize> {
    if !model.is_dir() {
        bail!(
            "{}: merging into a single-file checkpoint is not supported yet; use a diffusers folder",
            model.display()
        );
    }
    if out.exists() {
        bail!("{}: already exists; choose a new folder", out.display());
    }
    let changes = crate::engine::adapters::mix::weight_changes(sd)?;
    let expected: usize = changes.values().map(HashMap::len).sum();
    let tmp = partial_path(out, out.file_name().context("the merged model needs a folder name")?);
    let result = (|| -> Result<usize> {
        copy_tree(model, &tmp)?;
        for tokenizer in ["tokenizer", "tokenizer_2"] {
            if tmp.join(tokenizer).is_dir() {
                complete_tokenizer(&tmp.join(tokenizer))?;
            }
        }
        let mut changed = 0;
        for (component, weights) in &changes {
            let dir = tmp.join(component.label());
            for file in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot read", dir.display()))? {
                let path = file.with_context(|| format!("{}: cannot read", dir.display()))?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                    continue;
                }
                let (mut tensors, metadata) = crate::engine::io::weights::read_safetensors_with_metadata(&path)?;
                let mut touched = false;
                for (name, change) in weights {
                    if let Some(old) = tensors.get_mut(name) {
                        // Added to the file's own values (not to the copy in memory, which may be
                        // kept in half precision), then stored in the file's dtype.
                        let sum = (old.to_dtype(change.dtype())? + change)?;
                        let stored = sum.to_dtype(old.dtype())?;
                        if !crate::engine::io::weights::all_finite(&stored)? {
                            bail!(
                                "{}: the mix makes `{name}` NaN or infinite in {:?} (lower the adapter weights); nothing was written",
                                out.display(),
                                old.dtype()
                            );
                        }
                        *old = stored;
                        touched = true;
                        changed += 1;
                    }
                }
                if touched {
                    write_safetensors(&path, &tensors, Some(metadata))?;
                }
            }
        }
        if changed != expected {
            // A merged tensor with no place in the model's files would be lost without a word.
            bail!(
                "{}: only {changed} of the {expected} merged tensors have a place in the model's files; nothing was written",
                out.display()
            );
        }
        Ok(changed)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot create", out.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let entry = entry.with_context(|| format!("{}: cannot read", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type().with_context(|| format!("{}: cannot read", entry.path().display()))?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| format!("{}: cannot copy", target.display()))?;
        }
    }
    Ok(())
}
