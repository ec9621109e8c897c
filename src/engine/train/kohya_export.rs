//! Exporting a training job for kohya's sd-scripts (`train_network.py`, or `sdxl_train_network.py`
//! for SDXL, under `accelerate`), for
//! users who outgrow one machine: the same data and hyperparameters as a dataset TOML and a
//! launch script. The mapping is documented in the files it writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::engine::Result;
use crate::engine::adapters::stack::TargetPreset;
use crate::engine::io::weights::write_atomic;
use crate::engine::models::family::ModelFamily;
use crate::engine::train::dataset::DatasetFolder;
use crate::engine::train::optim::Optimizer;
use crate::engine::train::record::kohya_optimizer;
use crate::engine::train::trainer::{Algorithm, LrSchedule, TextEncoders, TrainConfig};

/// What to export: the job as our trainer would run it.
pub struct KohyaJob<'a> {
    pub model: &'a Path,
    pub data: &'a [PathBuf],
    /// The image folders under `data` with their repeats (`dataset::image_folders`): one kohya
    /// subset each, since kohya reads a subset's `image_dir` without its subfolders.
    pub folders: &'a [DatasetFolder],
    pub output_name: &'a str,
    pub config: &'a TrainConfig,
    pub gpus: usize,
    /// SD 2.x bases add `--v2`; SDXL runs `sdxl_train_network.py`.
    pub family: ModelFamily,
    /// A v-prediction base (`--v_parameterization`).
    pub v_prediction: bool,
    /// A zero-terminal-SNR schedule (`--zero_terminal_snr`), as the built-in model's.
    pub zero_terminal_snr: bool,
}

/// A value quoted for POSIX sh: in single quotes nothing is special, and a single quote itself is
/// written as `'\''` (close, escaped quote, reopen). Plain words stay as they are, for reading.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script's own variables, the only arguments written for the shell to expand.
const SCRIPT_VARIABLES: [&str; 2] = ["$SD_SCRIPTS/", "$JOB_DIR/"];

/// One argument of `train.sh`: our own `$SD_SCRIPTS/…` / `$JOB_DIR/…` paths in double quotes (the
/// rest of such a path is ours too), every other value quoted so the shell runs nothing in it.
fn shell_arg(arg: &str) -> String {
    let ours = SCRIPT_VARIABLES.iter().any(|v| arg.starts_with(v))
        && arg.chars().all(|c| c.is_ascii_alphanumeric() || "$_-./".contains(c));
    if ours { format!("\"{arg}\"") } else { shell_quote(arg) }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

/// The dataset config file kohya's `--dataset_config` reads.
pub fn dataset_toml(job: &KohyaJob) -> String {
    let c = job.config;
    let d = &c.dataset;
    let mut t = String::new();
    t += "# Written by LoRA Studio for kohya sd-scripts (--dataset_config).\n[general]\n";
    t += &format!(
        "shuffle_caption = {}\nkeep_tokens = {}\ncaption_extension = \".txt\"\n",
        c.shuffle_tags, c.keep_tokens
    );
    t += &format!("caption_dropout_rate = {}\n\n[[datasets]]\n", c.caption_dropout);
    t += &format!("resolution = {}\nbatch_size = {}\n", d.resolution, c.batch_size);
    t += &format!("enable_bucket = {}\n", d.buckets);
    if d.buckets {
        t += &format!("bucket_reso_steps = {}\nbucket_no_upscale = false\n", d.bucket_step);
    }
    for folder in job.folders {
        t += "\n  [[datasets.subsets]]\n";
        t += &format!(
            "  image_dir = {}\n  num_repeats = {}\n",
            toml_string(&folder.path.display().to_string()),
            folder.repeats
        );
        // kohya uses class_tokens only for images without a caption file: an `N_words` folder's
        // words, as our scan uses them; else the trigger, which we prepend to every caption, so
        // MAPPING.md asks users to put it in their captions.
        let class_tokens =
            if folder.class_tokens.trim().is_empty() { d.trigger.as_str() } else { folder.class_tokens.trim() };
        if !class_tokens.is_empty() {
            t += &format!("  class_tokens = {}\n", toml_string(class_tokens));
        }
        t += &format!("  flip_aug = {}\n  random_crop = {}\n", d.flip, !d.center_crop);
    }
    t
}

/// The `accelerate launch train_network.py …` (SDXL: `sdxl_train_network.py`) command line.
pub fn command_line(job: &KohyaJob) -> Result<Vec<String>> {
    let c = job.config;
    let sdxl = job.family == ModelFamily::Sdxl;
    let mut a: Vec<String> = vec!["accelerate".into(), "launch".into()];
    if job.gpus > 1 {
        a.extend(["--multi_gpu".into(), "--num_processes".into(), job.gpus.to_string()]);
    }
    let script = if sdxl { "$SD_SCRIPTS/sdxl_train_network.py" } else { "$SD_SCRIPTS/train_network.py" };
    a.extend(["--mixed_precision".into(), "bf16".into(), script.into()]);
    let mut flag = |k: &str, v: String| {
        a.push(format!("--{k}"));
        if !v.is_empty() {
            a.push(v);
        }
    };
    flag("pretrained_model_name_or_path", job.model.display().to_string());
    flag("dataset_config", "$JOB_DIR/dataset.toml".into());
    flag("output_dir", "$JOB_DIR/output".into());
    flag("output_name", job.output_name.into());
    flag("save_model_as", "safetensors".into());
    flag("network_dim", c.rank.to_string());
    flag("network_alpha", c.alpha.to_string());
    let mut net_args: Vec<String> = Vec::new();
    match (c.algorithm, c.targets) {
        (Algorithm::Full, _) => {
            bail!("full fine-tuning maps to kohya's train_db.py / fine_tune.py, not train_network.py")
        }
        (Algorithm::Lora, TargetPreset::Transformer) => flag("network_module", "networks.lora".into()),
        (Algorithm::Lora, TargetPreset::TransformerAndConv) | (Algorithm::Locon, _) => {
            flag("network_module", "lycoris.kohya".into());
            net_args.extend(["algo=locon".into(), format!("conv_dim={}", c.rank), format!("conv_alpha={}", c.alpha)]);
        }
        (Algorithm::Glora, _) => {
            flag("network_module", "lycoris.kohya".into());
            net_args.push("algo=glora".into());
        }
        (Algorithm::Loha | Algorithm::Lokr | Algorithm::Dora, targets) => {
            flag("network_module", "lycoris.kohya".into());
            net_args.push(match c.algorithm {
                Algorithm::Loha => "algo=loha".into(),
                Algorithm::Lokr => "algo=lokr".into(),
                _ => "algo=lora".into(),
            });
            if c.algorithm == Algorithm::Lokr {
                net_args.push(format!("factor={}", c.lokr_factor));
            }
            if c.algorithm == Algorithm::Dora {
                net_args.push("dora_wd=True".into());
            }
            if targets == TargetPreset::TransformerAndConv {
                net_args.extend([format!("conv_dim={}", c.rank), format!("conv_alpha={}", c.alpha)]);
            }
        }
        (Algorithm::Lora, _) => {
            // LyCORIS' closest preset: attention only (kohya has no cross-attention-only switch).
            flag("network_module", "lycoris.kohya".into());
            net_args.extend(["algo=lora".into(), "preset=attn-only".into()]);
        }
    }
    if c.algorithm == Algorithm::Glora && c.targets == TargetPreset::TransformerAndConv {
        net_args.push(format!("conv_dim={}", c.rank));
    }
    if !net_args.is_empty() {
        a.push("--network_args".into());
        a.extend(net_args);
    }
    let mut flag = |k: &str, v: String| {
        a.push(format!("--{k}"));
        if !v.is_empty() {
            a.push(v);
        }
    };
    let optimizer = kohya_optimizer(c);
    // prodigyopt refuses parameter groups with different rates (its d is one estimate for all).
    if c.optimizer == Optimizer::Prodigy
        && c.train_text_encoder
        && c.text_encoder_lr.is_some_and(|te| te != c.learning_rate)
    {
        bail!(
            "sd-scripts' Prodigy (prodigyopt) takes one learning rate for the UNet and the text encoders; set the text encoder's rate to the UNet's ({}) to export this job",
            c.learning_rate
        );
    }
    flag("learning_rate", c.learning_rate.to_string());
    flag("unet_lr", c.learning_rate.to_string());
    if c.train_text_encoder {
        flag("text_encoder_lr", c.text_encoder_lr.unwrap_or(c.learning_rate).to_string());
        if sdxl && c.text_encoders != TextEncoders::Both {
            let target = if c.text_encoders == TextEncoders::First { "te1" } else { "te2" };
            flag("network_te_train_targets", target.into());
        }
    } else {
        flag("network_train_unet_only", String::new());
        flag("cache_latents", String::new());
        if sdxl {
            // As our trainer: each caption through the frozen text encoders once.
            flag("cache_text_encoder_outputs", String::new());
        }
    }
    // Absent means the last layer, as our clip skip 1.
    if c.clip_skip > 1 {
        flag("clip_skip", c.clip_skip.to_string());
    }
    // sd-scripts turns epochs into steps itself, from its own count of images × repeats.
    match c.epochs {
        Some(epochs) => flag("max_train_epochs", epochs.to_string()),
        None => flag("max_train_steps", c.steps.to_string()),
    }
    flag("gradient_accumulation_steps", c.grad_accum.to_string());
    flag("seed", c.seed.to_string());
    flag(
        "lr_scheduler",
        match c.lr_schedule {
            _ if optimizer.own_schedule => "adafactor",
            LrSchedule::Constant if c.warmup_steps > 0 => "constant_with_warmup",
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
            LrSchedule::Linear => "linear",
        }
        .into(),
    );
    if c.warmup_steps > 0 {
        flag("lr_warmup_steps", c.warmup_steps.to_string());
    }
    flag("optimizer_type", optimizer.optimizer_type.into());
    a.push("--optimizer_args".into());
    a.extend(optimizer.args.iter().map(|arg| format!("{}={}", arg.key, arg.literal)));
    let mut flag = |k: &str, v: String| {
        a.push(format!("--{k}"));
        if !v.is_empty() {
            a.push(v);
        }
    };
    flag("max_grad_norm", c.max_grad_norm.unwrap_or(0.0).to_string());
    if let Some(g) = c.min_snr_gamma {
        flag("min_snr_gamma", g.to_string());
    }
    if c.noise_offset > 0.0 {
        flag("noise_offset", c.noise_offset.to_string());
    }
    if c.gradient_checkpointing {
        flag("gradient_checkpointing", String::new());
    }
    if c.save_every > 0 {
        flag("save_every_n_steps", c.save_every.to_string());
    }
    if c.sample_every > 0 && !c.sample_prompt.is_empty() {
        flag("sample_every_n_steps", c.sample_every.to_string());
        flag("sample_prompts", "$JOB_DIR/sample_prompts.txt".into());
        flag("sample_sampler", if sdxl { "euler" } else { "ddim" }.into());
    }
    if job.family == ModelFamily::Sd2 {
        flag("v2", String::new());
    }
    if sdxl {
        // SDXL's VAE overflows in half precision; ours stays f32 too.
        flag("no_half_vae", String::new());
    }
    if job.v_prediction {
        flag("v_parameterization", String::new());
    }
    if job.zero_terminal_snr {
        flag("zero_terminal_snr", String::new());
    }
    flag("max_data_loader_n_workers", "2".into());
    Ok(a)
}

/// Writes `dataset.toml`, `train.sh`, `sample_prompts.txt` and `MAPPING.md` into `dir`.
pub fn write(job: &KohyaJob, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    let cmd = command_line(job)?;
    // One flag and its values per line.
    let mut lines: Vec<String> = Vec::new();
    for arg in &cmd {
        let arg = shell_arg(arg);
        match lines.last_mut() {
            Some(line) if !arg.starts_with("--") || line == "accelerate" => {
                line.push(' ');
                line.push_str(&arg);
            }
            _ => lines.push(arg),
        }
    }
    let script = format!(
        "#!/usr/bin/env bash\n# Written by LoRA Studio; see MAPPING.md for how each setting carries over.\n# Run with kohya sd-scripts' Python environment active: SD_SCRIPTS=/path/to/sd-scripts ./train.sh\nset -euo pipefail\nJOB_DIR=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\nSD_SCRIPTS=\"${{SD_SCRIPTS:-.}}\"\n{}\n",
        lines.join(" \\\n  ")
    );
    write_atomic(&dir.join("dataset.toml"), dataset_toml(job).as_bytes())?;
    write_atomic(&dir.join("train.sh"), script.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("train.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("{}: cannot make it executable", script.display()))?;
    }
    let res = job.config.dataset.resolution;
    let prompt = format!("{} --w {res} --h {res} --d {} --s 20 --l 7.5\n", job.config.sample_prompt, job.config.seed);
    write_atomic(&dir.join("sample_prompts.txt"), prompt.as_bytes())?;
    write_atomic(&dir.join("MAPPING.md"), MAPPING.as_bytes())?;
    Ok(())
}

const MAPPING: &str = "\
# LoRA Studio → kohya sd-scripts

| LoRA Studio | sd-scripts |
|---|---|
| rank, alpha | `--network_dim`, `--network_alpha` (LoCon also `conv_dim`/`conv_alpha`) |
| LoRA, targets attention + feed-forward | `--network_module networks.lora` (its default targets) |
| LoRA, attention or cross-attention only | `lycoris.kohya` with `preset=attn-only` (kohya has no cross-attention-only switch: this trains self-attention too) |
| LoCon, or LoRA + convolutions | `lycoris.kohya`, `algo=locon` |
| GLoRA | `lycoris.kohya`, `algo=glora` |
| learning rate, text encoder lr | `--unet_lr`, `--text_encoder_lr`; UNet only: `--network_train_unet_only` |
| steps (or epochs), batch, gradient accumulation | `--max_train_steps` (`--max_train_epochs`), `batch_size` in dataset.toml, `--gradient_accumulation_steps` |
| an `N_words` folder: N repeats, `words` for images without a caption file | a subset per image folder, `num_repeats = N`, `class_tokens = \"words\"` |
| LR schedule, warmup | `--lr_scheduler`, `--lr_warmup_steps` |
| optimiser: AdamW, Prodigy, Adafactor; betas, weight decay, eps, their own settings | `--optimizer_type AdamW` / `Prodigy` (prodigyopt) / `Adafactor` (transformers), `--optimizer_args` |
| Adafactor with relative step | `--lr_scheduler adafactor` (the rate follows the step count in both) |
| gradient clipping | `--max_grad_norm` |
| min-SNR γ, noise offset, gradient checkpointing | `--min_snr_gamma`, `--noise_offset`, `--gradient_checkpointing` |
| clip skip (above 1) | `--clip_skip` |
| caption dropout, tag shuffle, keep tokens | `caption_dropout_rate`, `shuffle_caption`, `keep_tokens` in dataset.toml |
| resolution, buckets, flip, random crop | dataset.toml |
| trigger word | `class_tokens` (kohya uses it for images without captions; put it in your captions too) |
| several GPUs | `accelerate launch --multi_gpu --num_processes N` |
| an SDXL base | `sdxl_train_network.py`, `--no_half_vae`; UNet only also `--cache_text_encoder_outputs`. Each image's size and crop feed SDXL's size conditioning in both |

Differences: kohya's sampler, mixed precision (bf16 here) and data loader order differ from
ours, so the two runs are the same recipe, not the same numbers.
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::train::optim::{AdafactorSettings, Optimizer};

    fn args(config: &TrainConfig) -> Result<String> {
        let job = KohyaJob {
            model: Path::new("/models/sd15"),
            data: &[],
            folders: &[],
            output_name: "style",
            config,
            gpus: 1,
            family: ModelFamily::Sd1,
            v_prediction: false,
            zero_terminal_snr: false,
        };
        Ok(command_line(&job)?.join(" "))
    }

    #[test]
    fn each_optimiser_is_written_as_sd_scripts_takes_it() {
        let adamw = args(&TrainConfig::default()).unwrap();
        assert!(
            adamw.contains("--optimizer_type AdamW --optimizer_args weight_decay=0.01 betas=0.9,0.999 eps=0.00000001")
        );
        let prodigy = TrainConfig { optimizer: Optimizer::Prodigy, learning_rate: 1.0, ..Default::default() };
        let line = args(&prodigy).unwrap();
        assert!(
            line.contains(
                "--optimizer_type Prodigy --optimizer_args weight_decay=0.01 betas=0.9,0.999 eps=1e-08 d0=1e-06 d_coef=1.0 use_bias_correction=False safeguard_warmup=False --"
            ),
            "{line}"
        );
        assert!(line.contains("--learning_rate 1 --unet_lr 1"), "{line}");
        let adafactor = TrainConfig { optimizer: Optimizer::Adafactor, weight_decay: 0.0, ..Default::default() };
        let line = args(&adafactor).unwrap();
        assert!(line.contains("--lr_scheduler constant "), "{line}");
        assert!(
            line.contains("--optimizer_type Adafactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False --"),
            "{line}"
        );
        let relative = TrainConfig {
            optimizer: Optimizer::Adafactor,
            adafactor: AdafactorSettings { scale_parameter: true, relative_step: true, warmup_init: false },
            ..Default::default()
        };
        let line = args(&relative).unwrap();
        assert!(line.contains("--lr_scheduler adafactor "), "{line}");
        assert!(line.contains("scale_parameter=True relative_step=True warmup_init=False weight_decay=0.01"), "{line}");
    }

    #[test]
    fn prodigy_with_a_separate_text_encoder_rate_is_refused_in_words() {
        let config = TrainConfig {
            optimizer: Optimizer::Prodigy,
            learning_rate: 1.0,
            train_text_encoder: true,
            text_encoder_lr: Some(0.5),
            ..Default::default()
        };
        let err = args(&config).unwrap_err().to_string();
        assert!(err.contains("one learning rate for the UNet and the text encoders"), "{err}");
        let same = TrainConfig { text_encoder_lr: Some(1.0), ..config };
        assert!(args(&same).is_ok());
    }

    #[test]
    fn clip_skip_becomes_kohyas_option() {
        let run = |clip_skip| args(&TrainConfig { clip_skip, ..TrainConfig::default() }).unwrap();
        assert!(!run(1).contains("--clip_skip"));
        assert!(run(2).contains(" --clip_skip 2 "), "{}", run(2));
    }

    /// Each image folder is a subset with its repeats; an `N_words` folder's words are its class
    /// tokens (the trigger elsewhere); epochs go to sd-scripts as epochs.
    #[test]
    fn folders_become_subsets_with_their_repeats() {
        let folder = |path: &str, repeats, class_tokens: &str| DatasetFolder {
            path: path.into(),
            name: path.rsplit('/').next().unwrap().into(),
            repeats,
            images: 4,
            class_tokens: class_tokens.into(),
        };
        let folders = [folder("/data/10_sks dog", 10, "sks dog"), folder("/data/extra", 1, "")];
        let mut config = TrainConfig::default();
        config.dataset.trigger = "sks".into();
        // The job's files for a config: dataset.toml and the command line.
        let files = |config: &TrainConfig| {
            let job = KohyaJob {
                model: Path::new("model"),
                data: &[],
                folders: &folders,
                output_name: "x",
                config,
                gpus: 1,
                family: ModelFamily::Sd1,
                v_prediction: false,
                zero_terminal_snr: false,
            };
            (dataset_toml(&job), command_line(&job).unwrap().join(" "))
        };
        let (toml, steps) = files(&config);
        let subsets: Vec<&str> = toml.split("[[datasets.subsets]]").skip(1).collect();
        assert_eq!(subsets.len(), 2, "{toml}");
        assert!(subsets[0].contains("image_dir = \"/data/10_sks dog\"\n  num_repeats = 10\n"), "{toml}");
        assert!(subsets[0].contains("class_tokens = \"sks dog\""), "{toml}");
        assert!(subsets[1].contains("num_repeats = 1\n") && subsets[1].contains("class_tokens = \"sks\""), "{toml}");
        assert!(steps.contains(" --max_train_steps 500 ") && !steps.contains("epochs"), "{steps}");
        config.epochs = Some(10);
        let (_, epochs) = files(&config);
        assert!(epochs.contains(" --max_train_epochs 10 ") && !epochs.contains("max_train_steps"), "{epochs}");
    }
}
