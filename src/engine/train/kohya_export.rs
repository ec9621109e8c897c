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
use crate::engine::train::dataset::{DatasetFolder, IMAGE_EXTENSIONS};
use crate::engine::train::optim::Optimizer;
use crate::engine::train::record::kohya_optimizer;
use crate::engine::train::trainer::{Algorithm, LrSchedule, TextEncoders, TimestepBias, TrainConfig};

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

/// The script's own paths after the flag that takes each: the only arguments written for the
/// shell to expand. Known by position, not by look, so a value that merely looks like one of them
/// (a model path `$JOB_DIR/output`) is still quoted and arrives as written.
const SCRIPT_PATHS: [(&str, &str); 3] = [
    ("--dataset_config", "$JOB_DIR/dataset.toml"),
    ("--output_dir", "$JOB_DIR/output"),
    ("--sample_prompts", "$JOB_DIR/sample_prompts.txt"),
];

/// The LyCORIS preset argument: a `key=path` network argument whose path is ours.
const PRESET_ARG: &str = "preset=$JOB_DIR/lycoris_preset.toml";

/// `train.sh`'s arguments: our own `$SD_SCRIPTS/…` script (the first such argument: every value
/// from train.toml comes after it), `$JOB_DIR/…` paths and the LyCORIS preset argument in double
/// quotes, every other value quoted so the shell runs and expands nothing in it.
fn shell_args(cmd: &[String]) -> Vec<String> {
    let script = cmd.iter().position(|a| a.starts_with("$SD_SCRIPTS/"));
    // The flag a value belongs to: the nearest `--` argument before it.
    let flag_of = |i: usize| cmd[..i].iter().rev().find(|a| a.starts_with("--")).map(String::as_str);
    let ours = |i: usize| {
        Some(i) == script
            || i > 0 && SCRIPT_PATHS.iter().any(|(flag, path)| cmd[i - 1] == *flag && cmd[i] == *path)
            || cmd[i] == PRESET_ARG && flag_of(i) == Some("--network_args")
    };
    (0..cmd.len()).map(|i| if ours(i) { format!("\"{}\"", cmd[i]) } else { shell_quote(&cmd[i]) }).collect()
}

/// A TOML basic string: quote, backslash and every control character escaped (TOML forbids them
/// raw, DEL included), so no value can end its string or its line early.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The dataset config file kohya's `--dataset_config` reads.
pub fn dataset_toml(job: &KohyaJob) -> String {
    let c = job.config;
    let d = &c.dataset;
    let mut t = String::new();
    t += "# Written by LoRA Studio for kohya sd-scripts (--dataset_config).\n[general]\n";
    // The trigger is the caption's first tag in both (caption_prefix below), so the same
    // keep_tokens keeps it in place under shuffling.
    t += &format!(
        "shuffle_caption = {}\nkeep_tokens = {}\ncaption_extension = {}\n",
        c.shuffle_tags,
        c.keep_tokens,
        toml_string(scan_captions(job.folders).extension())
    );
    t += &format!("caption_dropout_rate = {}\n\n[[datasets]]\n", c.caption_dropout);
    t += &format!("resolution = {}\nbatch_size = {}\n", d.resolution, c.batch_size);
    t += &format!("enable_bucket = {}\n", d.buckets);
    if d.buckets {
        t += &format!("bucket_reso_steps = {}\nbucket_no_upscale = false\n", d.bucket_step);
        // Our buckets' sides run from one step to twice the resolution; kohya's default range is
        // 256..1024, which would square off SDXL's (1024 px) buckets.
        t += &format!("min_bucket_reso = {}\nmax_bucket_reso = {}\n", d.bucket_step.max(8), 2 * d.resolution);
    }
    for folder in job.folders {
        t += "\n  [[datasets.subsets]]\n";
        t += &format!(
            "  image_dir = {}\n  num_repeats = {}\n",
            toml_string(&folder.path.display().to_string()),
            folder.repeats
        );
        // kohya uses class_tokens only for images without a caption file, as our scan uses an
        // `N_words` folder's words, else the default caption.
        let class_tokens =
            if folder.class_tokens.trim().is_empty() { d.default_caption.trim() } else { folder.class_tokens.trim() };
        if !class_tokens.is_empty() {
            t += &format!("  class_tokens = {}\n", toml_string(class_tokens));
        }
        // sd-scripts writes `prefix + " " + caption`: "sks," makes our "sks, a photo".
        if !d.trigger.trim().is_empty() {
            t += &format!("  caption_prefix = {}\n", toml_string(&format!("{},", d.trigger.trim())));
        }
        t += &format!("  flip_aug = {}\n  random_crop = {}\n", d.flip, !d.center_crop);
    }
    t
}

/// What the caption files beside the job's images are: which extension sd-scripts must read, and
/// the files it would read differently from us.
#[derive(Default)]
struct CaptionScan {
    txt: Vec<PathBuf>,
    caption: Vec<PathBuf>,
    /// Several lines: sd-scripts trains on the first only.
    multi_line: Vec<PathBuf>,
    /// No lines at all: sd-scripts stops at an assertion.
    empty: Vec<PathBuf>,
    /// Not UTF-8 (our UTF-16 with a byte-order mark): sd-scripts stops at a decode error.
    not_utf8: Vec<PathBuf>,
}

impl CaptionScan {
    /// `.caption` only when no image has a `.txt` one (ours reads `.txt` first, then `.caption`).
    fn extension(&self) -> &'static str {
        if self.txt.is_empty() && !self.caption.is_empty() { ".caption" } else { ".txt" }
    }
}

/// The caption file of each image directly in each folder (folders not there are skipped: the
/// data may live only on the machine that runs the job).
fn scan_captions(folders: &[DatasetFolder]) -> CaptionScan {
    let mut scan = CaptionScan::default();
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(&folder.path) else { continue };
        let mut images: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
            })
            .collect();
        images.sort();
        for image in images {
            let Some(file) = ["txt", "caption"].iter().map(|e| image.with_extension(e)).find(|p| p.is_file()) else {
                continue;
            };
            let bytes = std::fs::read(&file).unwrap_or_default();
            match std::str::from_utf8(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes)) {
                Err(_) => scan.not_utf8.push(file.clone()),
                Ok("") => scan.empty.push(file.clone()),
                Ok(text) if text.trim().contains('\n') => scan.multi_line.push(file.clone()),
                Ok(_) => {}
            }
            if file.extension().is_some_and(|e| e == "txt") { scan.txt.push(file) } else { scan.caption.push(file) }
        }
    }
    scan
}

/// The SD UNet widths sd-scripts builds (SD 1.x / 2.x; SDXL): it loads weights into a fixed
/// architecture, whatever the model's config says.
const SD_UNET_WIDTHS: [&[u64]; 2] = [&[320, 640, 1280, 1280], &[320, 640, 1280]];

fn file_list(files: &[PathBuf]) -> String {
    let mut names: Vec<String> = files.iter().take(3).map(|f| f.display().to_string()).collect();
    if files.len() > 3 {
        names.push(format!("and {} more", files.len() - 3));
    }
    names.join(", ")
}

/// What stops the job from running under sd-scripts (an error naming the option or file, and what
/// to do), and the warnings for what it would train differently.
pub fn check(job: &KohyaJob) -> Result<Vec<String>> {
    let c = job.config;
    let d = &c.dataset;
    let mut warnings = Vec::new();
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if crate::engine::builtin::model_dir().is_some_and(|b| same(&b, job.model)) {
        bail!(
            "{}: the built-in model cannot be trained by sd-scripts, which builds a fixed SD 1.x/2.x/SDXL UNet and cannot load this small one; export a job for an SD 1.5, SD 2.x or SDXL model",
            job.model.display()
        );
    }
    // Other shapes only warn: a small stand-in model (the tests' fixtures) still writes a job to
    // read, if not to run.
    let unet_config = job.model.join("unet/config.json");
    if let Ok(text) = std::fs::read_to_string(&unet_config) {
        let widths: Option<Vec<u64>> = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["block_out_channels"].as_array().map(|a| a.iter().filter_map(|w| w.as_u64()).collect()));
        if let Some(widths) = widths.filter(|w| !SD_UNET_WIDTHS.contains(&w.as_slice())) {
            warnings.push(format!(
                "{}: block_out_channels {widths:?} is not an SD 1.x/2.x/SDXL UNet; sd-scripts builds those shapes only and will fail to load this model; export the job for an SD 1.5, SD 2.x or SDXL model",
                unet_config.display()
            ));
        }
    }
    if d.buckets && d.resolution < 256 {
        bail!(
            "resolution {} with buckets: sd-scripts' smallest bucket is 256 pixels and it stops at an assertion below it; set `resolution` to 256 or more, or turn `buckets` off",
            d.resolution
        );
    }
    let scan = scan_captions(job.folders);
    if !scan.empty.is_empty() {
        bail!(
            "empty caption files ({}): sd-scripts stops at an assertion on them; write a caption in each, or delete them",
            file_list(&scan.empty)
        );
    }
    if !scan.not_utf8.is_empty() {
        bail!(
            "caption files that are not UTF-8 ({}): sd-scripts reads UTF-8 only and stops at them; re-save them as UTF-8",
            file_list(&scan.not_utf8)
        );
    }
    if !scan.txt.is_empty() && !scan.caption.is_empty() {
        warnings.push(format!(
            "`.caption` files ({}) beside `.txt` ones: sd-scripts reads one extension (`.txt` here), so those images train without their captions; rename them to `.txt`",
            file_list(&scan.caption)
        ));
    }
    if !scan.multi_line.is_empty() {
        warnings.push(format!(
            "captions on several lines ({}): sd-scripts trains on the first line only; put each caption on one line",
            file_list(&scan.multi_line)
        ));
    }
    // sd-scripts keeps a caption's first line only, prefix and class tokens included.
    for (key, value) in [("trigger", &d.trigger), ("default_caption", &d.default_caption)] {
        if value.trim().contains('\n') {
            warnings.push(format!(
                "`{key}` has several lines: sd-scripts trains on its first line only; put it on one line"
            ));
        }
    }
    if c.timestep_bias != TimestepBias::None {
        warnings.push(
            "`timestep_bias`: sd-scripts has no timestep bias, so the job draws timesteps uniformly; remove it from train.toml to train the same recipe here".into(),
        );
    }
    if job.zero_terminal_snr && c.min_snr_gamma.is_some() {
        warnings.push(
            "`min_snr_gamma` with a zero-terminal-SNR model: sd-scripts computes its SNR table before rescaling the schedule, so its weights differ from ours at high timesteps (v-prediction, γ 5: t = 900, 0.0142 against our 0.0030; t = 999, 0.0047 against 0); see MAPPING.md".into(),
        );
    }
    let prompt = &c.sample_prompt;
    if c.sample_every > 0 && (prompt.contains('\n') || prompt.contains(" --")) {
        warnings.push(
            "`sample_prompt`: sd-scripts reads each line of sample_prompts.txt as a prompt and ` --x` inside one as an option (` --n`: the negative prompt), so this prompt is split; keep it on one line without ` --`".into(),
        );
    }
    Ok(warnings)
}

/// The precision the job trains in, given to accelerate and to train_network.py alike.
const PRECISION: &str = "bf16";

/// The LyCORIS preset file a `lycoris.kohya` job reads (`preset=` in `--network_args`).
const LYCORIS_PRESET: &str = "lycoris_preset.toml";

/// The network sd-scripts builds: `--network_module` and its `--network_args`, chosen so kohya or
/// LyCORIS trains exactly the layers our trainer trains (`Algorithm::trains_unet_layer`; MAPPING.md
/// lists them). Plain LoRA on our default targets is kohya's own `networks.lora`; the LyCORIS
/// kinds read a preset file naming our layers, as no built-in preset equals each of our sets.
fn network(c: &TrainConfig) -> Result<(&'static str, Vec<String>)> {
    let algo = match c.algorithm {
        Algorithm::Full => {
            bail!("full fine-tuning maps to kohya's train_db.py / fine_tune.py, not train_network.py")
        }
        Algorithm::Lora if c.targets == TargetPreset::Transformer => return Ok(("networks.lora", Vec::new())),
        Algorithm::Lora | Algorithm::Dora => "algo=lora",
        Algorithm::Locon => "algo=locon",
        Algorithm::Loha => "algo=loha",
        Algorithm::Lokr => "algo=lokr",
        // LyCORIS' "GLoRA: only train transformer" override never fires (it compares the algo's
        // name with the module class), so GLoRA follows the preset like the others.
        Algorithm::Glora => "algo=glora",
    };
    let mut args = vec![algo.to_string(), format!("preset=$JOB_DIR/{LYCORIS_PRESET}")];
    if c.algorithm == Algorithm::Lokr {
        args.push(format!("factor={}", c.lokr_factor));
    }
    if c.algorithm == Algorithm::Dora {
        args.push("dora_wd=True".into());
    }
    if unet_targets(c) == TargetPreset::TransformerAndConv {
        args.extend([format!("conv_dim={}", c.rank), format!("conv_alpha={}", c.alpha)]);
    }
    Ok(("lycoris.kohya", args))
}

/// The preset our trainer applies to the UNet: LoCon adds the convolutions to any preset.
fn unet_targets(c: &TrainConfig) -> TargetPreset {
    if c.algorithm == Algorithm::Locon { TargetPreset::TransformerAndConv } else { c.targets }
}

/// `lycoris_preset.toml`, or `None` when the job reads none: our UNet targets as LyCORIS module
/// classes (of sd-scripts' own UNet) and fnmatch names, our text-encoder targets as CLIP's
/// attention and MLP modules (LyCORIS' `attn-only` preset would drop the MLP).
pub fn lycoris_preset(c: &TrainConfig) -> Option<String> {
    let (module, _) = network(c).ok()?;
    if module != "lycoris.kohya" {
        return None;
    }
    let attention = |blocks: &[&str]| -> Vec<String> {
        let leaves = ["to_q", "to_k", "to_v", "to_out.0"];
        blocks.iter().flat_map(|b| leaves.map(|l| format!("*.{b}.{l}"))).collect()
    };
    let targets = unet_targets(c);
    let (modules, names) = match targets {
        TargetPreset::CrossAttention => (vec![], attention(&["attn2"])),
        TargetPreset::Attention => (vec![], attention(&["attn1", "attn2"])),
        TargetPreset::Transformer => (vec!["Transformer2DModel"], vec![]),
        // By name, not ResnetBlock2D as a class: that would train its time_emb_proj, which we don't.
        TargetPreset::TransformerAndConv => (
            vec!["Transformer2DModel"],
            [
                "*.resnets.*.conv1",
                "*.resnets.*.conv2",
                "*.resnets.*.conv_shortcut",
                "*.downsamplers.*.conv",
                "*.upsamplers.*.conv",
            ]
            .map(String::from)
            .to_vec(),
        ),
    };
    let list = |items: Vec<String>| items.iter().map(|i| toml_string(i)).collect::<Vec<_>>().join(", ");
    Some(format!(
        "# Written by LoRA Studio: the layers it trains, for LyCORIS (preset= in --network_args).\n\
         enable_conv = {}\nuse_fnmatch = true\nunet_target_module = [{}]\nunet_target_name = [{}]\n\
         text_encoder_target_module = [\"CLIPAttention\", \"CLIPSdpaAttention\", \"CLIPMLP\"]\n\
         text_encoder_target_name = []\n",
        targets == TargetPreset::TransformerAndConv,
        list(modules.into_iter().map(String::from).collect()),
        list(names),
    ))
}

/// A count of our steps as steps on `gpus` GPUs, each of which takes `gpus` batches: the same
/// images (rounded up to whole steps).
fn per_gpus(steps: usize, gpus: usize) -> usize {
    steps.div_ceil(gpus.max(1))
}

/// What several GPUs change, in words for the export to print; `None` on one GPU.
pub fn gpu_note(job: &KohyaJob) -> Option<String> {
    let (c, n) = (job.config, job.gpus);
    if n <= 1 {
        return None;
    }
    let batch = c.batch_size * c.grad_accum;
    let length = match c.epochs {
        Some(e) => format!("{e} epochs as set (sd-scripts divides each epoch's steps by the GPUs)"),
        None => format!("{} steps of {} images instead of {} of {batch}", per_gpus(c.steps, n), n * batch, c.steps),
    };
    Some(format!(
        "{n} GPUs: {length}; the learning rate schedule and its warmup follow the images, as on one GPU; \
         each update averages {n}× the images (the learning rate is not scaled)"
    ))
}

/// The `accelerate launch train_network.py …` (SDXL: `sdxl_train_network.py`) command line.
pub fn command_line(job: &KohyaJob) -> Result<Vec<String>> {
    let c = job.config;
    let sdxl = job.family == ModelFamily::Sdxl;
    let mut a: Vec<String> = vec!["accelerate".into(), "launch".into()];
    if job.gpus > 1 {
        a.extend(["--multi_gpu".into(), "--num_processes".into(), job.gpus.to_string()]);
    }
    if sdxl && c.dataset.buckets && !c.dataset.bucket_step.is_multiple_of(32) {
        // sdxl_train_network.py L42 (`verify_bucket_reso_steps(32)`).
        bail!(
            "sd-scripts' SDXL training takes bucket steps in multiples of 32; set the bucket step ({}) to 32 or 64 to export this job",
            c.dataset.bucket_step
        );
    }
    let script = if sdxl { "$SD_SCRIPTS/sdxl_train_network.py" } else { "$SD_SCRIPTS/train_network.py" };
    a.extend(["--mixed_precision".into(), PRECISION.into(), script.into()]);
    let mut flag = |k: &str, v: String| {
        a.push(format!("--{k}"));
        if !v.is_empty() {
            a.push(v);
        }
    };
    // train_network.py's own `--mixed_precision` (default "no") is what its Accelerator gets,
    // over accelerate launch's.
    flag("mixed_precision", PRECISION.into());
    flag("pretrained_model_name_or_path", job.model.display().to_string());
    flag("dataset_config", "$JOB_DIR/dataset.toml".into());
    flag("output_dir", "$JOB_DIR/output".into());
    flag("output_name", job.output_name.into());
    flag("save_model_as", "safetensors".into());
    flag("network_dim", c.rank.to_string());
    flag("network_alpha", c.alpha.to_string());
    let (module, net_args) = network(c)?;
    flag("network_module", module.into());
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
        // sd-scripts cannot cache random crops (it refuses both together); ours caches a few, so
        // not caching keeps the recipe.
        if c.dataset.center_crop {
            flag("cache_latents", String::new());
        }
        // As our trainer: each caption through the frozen text encoders once. sd-scripts refuses the
        // cache for captions that change from step to step (sdxl_train_network.py L34-37); then
        // the encoders run each step, to the same numbers.
        if sdxl && !c.shuffle_tags && c.caption_dropout <= 0.0 {
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
        None => flag("max_train_steps", per_gpus(c.steps, job.gpus).to_string()),
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
    // Not divided by the GPUs: sd-scripts' scheduler already counts N steps per step on N GPUs.
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
        flag("save_every_n_steps", per_gpus(c.save_every, job.gpus).to_string());
    }
    if c.sample_every > 0 && !c.sample_prompt.is_empty() {
        flag("sample_every_n_steps", per_gpus(c.sample_every, job.gpus).to_string());
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

/// Writes `dataset.toml`, `train.sh`, `sample_prompts.txt` and `MAPPING.md` into `dir` (and
/// `lycoris_preset.toml` for a LyCORIS network), or refuses a job sd-scripts cannot run; returns
/// the warnings of `check` for the caller to show.
pub fn write(job: &KohyaJob, dir: &Path) -> Result<Vec<String>> {
    let warnings = check(job)?;
    let cmd = command_line(job)?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    // One flag and its values per line.
    let mut lines: Vec<String> = Vec::new();
    for arg in shell_args(&cmd) {
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
    if let Some(preset) = lycoris_preset(job.config) {
        write_atomic(&dir.join(LYCORIS_PRESET), preset.as_bytes())?;
    }
    Ok(warnings)
}

/// sd-scripts lines cited below are at commit 48d368fa557731ad0488c07304dfeba8c07910eb.
const MAPPING: &str = "\
# LoRA Studio → kohya sd-scripts

Checked against kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb; `file:line`
below are at that commit.

| LoRA Studio | sd-scripts |
|---|---|
| rank, alpha | `--network_dim`, `--network_alpha` (with convolutions also `conv_dim`/`conv_alpha`) |
| LoRA, targets attention + feed-forward | `--network_module networks.lora` (its default targets) |
| any other algorithm or targets | `--network_module lycoris.kohya`, `algo=lora` / `locon` / `loha` / `lokr` / `glora` (DoRA: `algo=lora dora_wd=True`), `preset=$JOB_DIR/lycoris_preset.toml` |
| learning rate, text encoder lr | `--unet_lr`, `--text_encoder_lr`; UNet only: `--network_train_unet_only` |
| steps (or epochs), batch, gradient accumulation | `--max_train_steps` (`--max_train_epochs`), `batch_size` in dataset.toml, `--gradient_accumulation_steps` |
| an `N_words` folder: N repeats, `words` for images without a caption file | a subset per image folder, `num_repeats = N`, `class_tokens = \"words\"` (sd-scripts uses class_tokens only for images without a caption file, library/train_util.py:2070-2078, as we do) |
| default caption (images without a caption file outside `N_words` folders) | that subset's `class_tokens` |
| trigger word, prepended to every caption as `sks, caption` | `caption_prefix = \"sks,\"` on every subset: sd-scripts writes `prefix + \" \" + caption` (library/train_util.py:823-824), the same `sks, caption` |
| tag shuffle, keep tokens | `shuffle_caption`, the same `keep_tokens`: both split at commas and keep the first tags (library/train_util.py:884-888), so the trigger stays first |
| caption dropout | `caption_dropout_rate` (the whole caption, trigger included, in both: library/train_util.py:829-837) |
| `.txt` captions (or `.caption` when no image has a `.txt`) | `caption_extension`: sd-scripts reads that one extension only (library/train_util.py:1953) |
| image folders, nested ones too | one subset per folder: sd-scripts does not look into a subset's subfolders (`glob_images`, library/train_util.py:2847-2852) |
| LR schedule, warmup | `--lr_scheduler`, `--lr_warmup_steps` |
| optimiser: AdamW, Prodigy, Adafactor; betas, weight decay, eps, their own settings | `--optimizer_type AdamW` / `Prodigy` (prodigyopt) / `Adafactor` (transformers), `--optimizer_args` |
| Adafactor with relative step | `--lr_scheduler adafactor` (the rate follows the step count in both) |
| gradient clipping | `--max_grad_norm` |
| min-SNR γ, noise offset, gradient checkpointing | `--min_snr_gamma`, `--noise_offset`, `--gradient_checkpointing` |
| clip skip (above 1) | `--clip_skip` |
| resolution, buckets, flip, random crop | dataset.toml |
| latents cached (UNet only) | `--cache_latents` with centre crops only: sd-scripts refuses cached latents with random crops (train_network.py:581-584, library/train_util.py:1100). We cache a few random crops per image; sd-scripts cannot, so a random-crop job encodes each crop afresh: the same recipe, slower |
| bf16 | `--mixed_precision bf16` to accelerate and to train_network.py: the script's own option (default \"no\", library/train_util.py:3980-3985) is what its Accelerator gets (library/train_util.py:5494-5496) |
| several GPUs | `accelerate launch --multi_gpu --num_processes N`; steps (and save / sample intervals) ÷ N, warmup as is (below) |
| buckets | `bucket_reso_steps`, and sides from one step to twice the resolution (`min_bucket_reso`, `max_bucket_reso`; kohya's default 256..1024 would square off SDXL's) |
| an SDXL base | `sdxl_train_network.py`, `--no_half_vae`; UNet only also `--network_train_unet_only`, and `--cache_text_encoder_outputs` (the text encoders run once per caption, as ours) unless tags are shuffled or captions dropped, which sd-scripts refuses to cache; bucket steps in multiples of 32 (sd-scripts refuses others). Each image's size and crop feed SDXL's size conditioning in both |

## The layers each job trains

The same layers as LoRA Studio, checked by a test that applies kohya's and LyCORIS' selection
rules (below) to real SD 1.5 and SD 2.1 UNet names and to SDXL's block layout. Counts are SD 1.5's
UNet; in the text encoders (when trained) every `q/k/v/out_proj` and `fc1/fc2`, as kohya's
`CLIPAttention` + `CLIPMLP` targets (networks/lora.py L869).

| targets (algorithm) | trained UNet layers | SD 1.5 |
|---|---|---|
| cross-attention only | `attn2.to_q/to_k/to_v/to_out.0` | 64 |
| all attention | `attn1` and `attn2` projections | 128 |
| attention + feed-forward (LoRA's default) | those, `ff.net.0.proj`, `ff.net.2`, `proj_in`, `proj_out` (1×1 convolutions in SD 1.x, linear in SD 2.x and SDXL): every layer of each Transformer2DModel | 192 |
| + convolutions (and LoCon with any targets) | those, each resnet's `conv1`, `conv2`, `conv_shortcut`, each down/upsampler's `conv` (not the resnets' `time_emb_proj`, `conv_in`/`conv_out` or the time embedding) | 256 |

How, in sd-scripts 48d368fa and LyCORIS f49d30d6:
- kohya's `networks.lora` trains every Linear and Conv2d inside a `Transformer2DModel`
  (networks/lora.py L867, L963-1001): our attention + feed-forward, proj_in/out included (kohya
  LoRAs of SD 1.x carry them, so ours trains them too). Its `conv_dim` would add whole
  `ResnetBlock2D`s (L868, L1038-1040), their `time_emb_proj` included, so LoRA with convolutions
  goes to LyCORIS instead.
- LyCORIS' presets: the default, `full`, adds `conv_in`, `conv_out`, the time embedding and every
  resnet's `time_emb_proj` (282 layers on SD 1.5; lycoris/config.py L2-41); `attn-only` drops the
  text encoder's MLP (L107-124). So the job writes its own preset, `lycoris_preset.toml`, read by
  `preset=` (lycoris/kohya.py L95-101): `Transformer2DModel` as a module class, or our attention
  and convolution layers by name (`use_fnmatch`, L304-305, L478-494); `enable_conv` only with
  convolutions (L338-339: 3×3 convolutions train only then; 1×1 ones always, L393).
- GLoRA follows the preset too: LyCORIS' \"only train transformer\" override for GLoRA
  (lycoris/kohya.py L498) compares the algorithm's name with the module class and never applies.

## Several GPUs

On N GPUs each step takes N batches (one per GPU), and sd-scripts steps its learning-rate
scheduler N times per step: `get_scheduler_fix` counts `max_train_steps * num_processes` scheduler
steps (library/train_util.py L5274-5277) and accelerate's prepared scheduler steps once per
process. So the job divides our steps by N (rounded up) and keeps the warmup as it is: the rate
after each image is the one-GPU run's, over the same images (a warmup divided by N would end N×
too early). What does change: each update averages N× the images; the learning rate is not
scaled. The export prints this. A run set in epochs needs nothing: sd-scripts divides an epoch's
steps by the GPUs itself (train_network.py L800-802).

## Refused (the job could not run)

- The built-in model: sd-scripts rebuilds a fixed SD UNet (library/train_util.py:5552-5559,
  library/original_unet.py:123) and cannot load it. Other models whose `unet/config.json` widths
  are not SD 1.x/2.x/SDXL's get a warning.
- Buckets below 256 pixels: sd-scripts' smallest bucket is 256 (library/train_util.py:4591-4594)
  and it asserts the resolution is not below it (library/train_util.py:766-768).
- Empty caption files (library/train_util.py:1964 asserts) and captions that are not UTF-8
  (library/train_util.py:1958-1963 stops).

## Warned (the job runs, but trains differently)

- `.caption` files beside `.txt` ones: those images train without their captions.
- Captions on several lines (caption files, the trigger, the default caption): sd-scripts trains on
  the first line (library/train_util.py:1968, 865); we train on all of it.
- Timestep bias: sd-scripts has none; it draws timesteps uniformly.
- A sample prompt with a newline or ` --`: each line is a prompt and ` --n` starts its negative
  prompt (library/train_util.py:6256).
- Min-SNR on a zero-terminal-SNR schedule: sd-scripts computes its SNR table before it rescales
  the schedule (train_network.py:249-251; library/custom_train_functions.py:16-27, 68-72), so its
  weights are the unrescaled schedule's. With v-prediction and γ = 5, at t = 900 its weight is
  0.0142 against our 0.0030, at t = 999 0.0047 against 0: sd-scripts trains the noisiest steps more.

## Other differences

- An image without a caption file, class tokens or default caption trains on `sks, ` in sd-scripts
  (the prefix, a space and the empty caption) and on `sks` here.
- kohya's sampler and data loader order differ from ours, so the two runs are the same recipe, not
  the same numbers.
";

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::engine::train::optim::{AdafactorSettings, Optimizer};

    fn args(config: &TrainConfig) -> Result<String> {
        let job = KohyaJob { output_name: "style", ..job(config, &[], Path::new("/models/sd15")) };
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
            let job = job(config, &folders, Path::new("model"));
            (dataset_toml(&job), command_line(&job).unwrap().join(" "))
        };
        let (toml, steps) = files(&config);
        let subsets: Vec<&str> = toml.split("[[datasets.subsets]]").skip(1).collect();
        assert_eq!(subsets.len(), 2, "{toml}");
        assert!(subsets[0].contains("image_dir = \"/data/10_sks dog\"\n  num_repeats = 10\n"), "{toml}");
        assert!(subsets[0].contains("class_tokens = \"sks dog\""), "{toml}");
        assert!(subsets[1].contains("num_repeats = 1\n") && !subsets[1].contains("class_tokens"), "{toml}");
        assert!(steps.contains(" --max_train_steps 500 ") && !steps.contains("epochs"), "{steps}");
        config.epochs = Some(10);
        let (_, epochs) = files(&config);
        assert!(epochs.contains(" --max_train_epochs 10 ") && !epochs.contains("max_train_steps"), "{epochs}");
    }

    /// A job over `folders` with `config`, as the CLI builds it.
    fn job<'a>(config: &'a TrainConfig, folders: &'a [DatasetFolder], model: &'a Path) -> KohyaJob<'a> {
        KohyaJob {
            model,
            data: &[],
            folders,
            output_name: "x",
            config,
            gpus: 1,
            family: ModelFamily::Sd1,
            v_prediction: false,
            zero_terminal_snr: false,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lora-studio-kohya-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn folder_at(path: &Path, class_tokens: &str) -> DatasetFolder {
        DatasetFolder {
            path: path.into(),
            name: path.file_name().unwrap().to_string_lossy().into(),
            repeats: 1,
            images: 1,
            class_tokens: class_tokens.into(),
        }
    }

    /// sd-scripts' own `--mixed_precision` (default "no") is what its Accelerator gets: it must
    /// say bf16 too, not only `accelerate launch`.
    #[test]
    fn kohya_export_gives_train_network_the_mixed_precision() {
        let line = args(&TrainConfig::default()).unwrap();
        assert!(line.contains("train_network.py --mixed_precision bf16 --"), "{line}");
    }

    /// sd-scripts refuses cached latents with random crops: a UNet-only job caches only centre crops.
    #[test]
    fn kohya_export_caches_latents_only_without_random_crop() {
        let mut config = TrainConfig { train_text_encoder: false, ..Default::default() };
        config.dataset.center_crop = true;
        assert!(args(&config).unwrap().contains("--cache_latents"));
        config.dataset.center_crop = false;
        let line = args(&config).unwrap();
        assert!(!line.contains("--cache_latents"), "{line}");
    }

    /// The trigger reaches every caption through `caption_prefix`; sd-scripts joins it as
    /// `prefix + " " + caption`, which must give our `full_caption`. An `N_words` folder's words
    /// (else the default caption) caption the images without a caption file, as in our scan.
    #[test]
    fn kohya_export_writes_the_trigger_as_a_caption_prefix() {
        let mut config = TrainConfig { keep_tokens: 1, ..Default::default() };
        config.dataset.trigger = " sks ".into();
        config.dataset.default_caption = "a thing".into();
        let folders = [folder_at(Path::new("/d/10_red disc"), "red disc"), folder_at(Path::new("/d/plain"), "")];
        let text = dataset_toml(&job(&config, &folders, Path::new("m")));
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        let subsets = parsed["datasets"][0]["subsets"].as_array().unwrap();
        let prefix = subsets[0]["caption_prefix"].as_str().unwrap();
        let entry = |caption: &str| crate::engine::train::dataset::ImageEntry {
            path: "x.png".into(),
            caption: caption.into(),
            caption_file: None,
            width: 1,
            height: 1,
            content_hash: 0,
            folder: String::new(),
            repeats: 1,
        };
        assert_eq!(format!("{prefix} a photo"), entry("a photo").full_caption(&config.dataset.trigger));
        assert_eq!(subsets[1]["caption_prefix"].as_str(), Some(prefix));
        assert_eq!(subsets[0]["class_tokens"].as_str(), Some("red disc"));
        assert_eq!(subsets[1]["class_tokens"].as_str(), Some("a thing"));
        // keep_tokens 1 keeps the trigger, the first tag, in both.
        assert_eq!(parsed["general"]["keep_tokens"].as_integer(), Some(1));
        config.dataset.trigger.clear();
        assert!(!dataset_toml(&job(&config, &folders, Path::new("m"))).contains("caption_prefix"));
    }

    /// No value can end its TOML string early: quotes, backslashes, newlines, control characters.
    #[test]
    fn kohya_export_toml_strings_hold_any_value() {
        let hostile = "a\"b\\c\nd'e\u{7f}\u{1}\ttail = 1\n[x]";
        let mut config = TrainConfig::default();
        config.dataset.trigger = hostile.into();
        let folders = [folder_at(&PathBuf::from(format!("/d/{hostile}")), hostile)];
        let text = dataset_toml(&job(&config, &folders, Path::new("m")));
        let parsed: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let subset = &parsed["datasets"][0]["subsets"][0];
        assert_eq!(subset["image_dir"].as_str().unwrap(), format!("/d/{hostile}"));
        assert_eq!(subset["class_tokens"].as_str().unwrap(), hostile.trim());
        assert_eq!(subset["caption_prefix"].as_str().unwrap(), format!("{},", hostile.trim()));
    }

    /// Only our own `$JOB_DIR/…` paths, in their place, are left for the shell to expand.
    #[test]
    fn kohya_export_expands_only_its_own_paths() {
        let cmd: Vec<String> =
            ["accelerate", "$SD_SCRIPTS/train_network.py", "--pretrained_model_name_or_path", "$JOB_DIR/output"]
                .into_iter()
                .chain(["--output_dir", "$JOB_DIR/output", "--output_name", "$SD_SCRIPTS/x"])
                .map(String::from)
                .collect();
        let quoted = shell_args(&cmd);
        assert_eq!(quoted[1], "\"$SD_SCRIPTS/train_network.py\"");
        assert_eq!(quoted[3], "'$JOB_DIR/output'");
        assert_eq!(quoted[5], "\"$JOB_DIR/output\"");
        assert_eq!(quoted[7], "'$SD_SCRIPTS/x'");
    }

    /// The min-SNR weights differ from ours under zero terminal SNR: the export says so.
    #[test]
    fn kohya_export_warns_of_min_snr_under_zero_terminal_snr() {
        let config = TrainConfig { min_snr_gamma: Some(5.0), ..Default::default() };
        let mut j = job(&config, &[], Path::new("/nowhere"));
        assert!(check(&j).unwrap().is_empty());
        j.zero_terminal_snr = true;
        let warnings = check(&j).unwrap();
        assert!(
            warnings.len() == 1 && warnings[0].contains("`min_snr_gamma` with a zero-terminal-SNR"),
            "{warnings:?}"
        );
        let without = TrainConfig { min_snr_gamma: None, ..Default::default() };
        assert!(check(&KohyaJob { config: &without, ..j }).unwrap().is_empty());
    }

    /// Jobs sd-scripts cannot run are refused in words naming what to change.
    #[test]
    fn kohya_export_refuses_what_sd_scripts_cannot_run() {
        let mut config = TrainConfig::default();
        config.dataset.buckets = true;
        config.dataset.resolution = 128;
        let err = check(&job(&config, &[], Path::new("/nowhere"))).unwrap_err().to_string();
        assert!(err.contains("resolution 128 with buckets") && err.contains("256 or more"), "{err}");
        config.dataset.resolution = 256;
        assert!(check(&job(&config, &[], Path::new("/nowhere"))).is_ok());
        config.dataset.buckets = false;
        config.dataset.resolution = 128;
        assert!(check(&job(&config, &[], Path::new("/nowhere"))).is_ok());

        let builtin = crate::engine::builtin::model_dir().expect("the built-in model is in assets/base");
        let err = check(&job(&TrainConfig::default(), &[], &builtin)).unwrap_err().to_string();
        assert!(err.contains("the built-in model cannot be trained by sd-scripts"), "{err}");

        let dir = scratch("refusals");
        std::fs::write(dir.join("a.png"), b"").unwrap();
        std::fs::write(dir.join("a.txt"), b"").unwrap();
        let folders = [folder_at(&dir, "")];
        let err = check(&job(&TrainConfig::default(), &folders, Path::new("/nowhere"))).unwrap_err().to_string();
        assert!(err.contains("empty caption files") && err.contains("a.txt"), "{err}");
        std::fs::write(dir.join("a.txt"), [0xFF, 0xFE, b'a', 0]).unwrap();
        let err = check(&job(&TrainConfig::default(), &folders, Path::new("/nowhere"))).unwrap_err().to_string();
        assert!(err.contains("not UTF-8") && err.contains("a.txt"), "{err}");
        std::fs::write(dir.join("a.txt"), "fine\n").unwrap();
        assert!(check(&job(&TrainConfig::default(), &folders, Path::new("/nowhere"))).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What sd-scripts would train differently is named in a warning; `.caption` captions are
    /// read as such when no image has a `.txt` one.
    #[test]
    fn kohya_export_warns_of_what_would_train_differently() {
        let dir = scratch("warnings");
        let folders = [folder_at(&dir, "")];
        std::fs::write(dir.join("a.png"), b"").unwrap();
        std::fs::write(dir.join("a.caption"), "one\n").unwrap();
        let config = TrainConfig::default();
        let j = job(&config, &folders, Path::new("/nowhere"));
        assert!(check(&j).unwrap().is_empty());
        assert!(dataset_toml(&j).contains("caption_extension = \".caption\"\n"), "{}", dataset_toml(&j));
        std::fs::write(dir.join("b.png"), b"").unwrap();
        std::fs::write(dir.join("b.txt"), "first\nsecond\n").unwrap();
        assert!(dataset_toml(&j).contains("caption_extension = \".txt\"\n"));
        let warnings = check(&j).unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("`.caption` files") && warnings[0].contains("a.caption"), "{warnings:?}");
        assert!(warnings[1].contains("several lines") && warnings[1].contains("b.txt"), "{warnings:?}");
        let _ = std::fs::remove_dir_all(&dir);

        let mut lines = TrainConfig::default();
        lines.dataset.trigger = "sks\nstyle".into();
        let warnings = check(&job(&lines, &[], Path::new("/nowhere"))).unwrap();
        assert!(warnings.len() == 1 && warnings[0].contains("`trigger` has several lines"), "{warnings:?}");
        lines.dataset.trigger = "sks".into();
        lines.dataset.default_caption = "a\nb".into();
        let warnings = check(&job(&lines, &[], Path::new("/nowhere"))).unwrap();
        assert!(warnings.len() == 1 && warnings[0].contains("`default_caption` has several lines"), "{warnings:?}");
        let bias = TrainConfig { timestep_bias: TimestepBias::Later, ..Default::default() };
        let warnings = check(&job(&bias, &[], Path::new("/nowhere"))).unwrap();
        assert!(warnings.len() == 1 && warnings[0].contains("`timestep_bias`"), "{warnings:?}");
        for prompt in ["a cat --n dog", "a cat\na dog"] {
            let sample = TrainConfig { sample_every: 10, sample_prompt: prompt.into(), ..Default::default() };
            let warnings = check(&job(&sample, &[], Path::new("/nowhere"))).unwrap();
            assert!(warnings.len() == 1 && warnings[0].contains("`sample_prompt`"), "{prompt:?}: {warnings:?}");
        }
        let sample = TrainConfig { sample_every: 10, sample_prompt: "a cat, --".into(), ..Default::default() };
        assert!(!check(&job(&sample, &[], Path::new("/nowhere"))).unwrap().is_empty());
        let fine = TrainConfig { sample_every: 10, sample_prompt: "a cat-dog".into(), ..Default::default() };
        assert!(check(&job(&fine, &[], Path::new("/nowhere"))).unwrap().is_empty());
        // A UNet whose widths are not SD's is named.
        let model = scratch("unet");
        std::fs::create_dir_all(model.join("unet")).unwrap();
        std::fs::write(model.join("unet/config.json"), r#"{"block_out_channels": [32, 64, 128]}"#).unwrap();
        let warnings = check(&job(&config, &[], &model)).unwrap();
        assert!(warnings.len() == 1 && warnings[0].contains("block_out_channels [32, 64, 128]"), "{warnings:?}");
        std::fs::write(model.join("unet/config.json"), r#"{"block_out_channels": [320, 640, 1280, 1280]}"#).unwrap();
        assert!(check(&job(&config, &[], &model)).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&model);
    }

    /// The class of the module at `path` in sd-scripts' own UNet (`library/original_unet.py`,
    /// `sdxl_original_unet.py`, whose module names are diffusers'), from its place in the tree.
    /// `holds_weights`: a layer with parameters of its own, not a container.
    fn sd_scripts_class(path: &str, holds_weights: bool, proj_is_conv: bool) -> &'static str {
        let segments: Vec<&str> = path.split('.').collect();
        let (parent, leaf) = (segments.iter().rev().nth(1).copied().unwrap_or(""), *segments.last().unwrap());
        match (parent, leaf) {
            ("attentions", _) => "Transformer2DModel",
            ("resnets", _) => "ResnetBlock2D",
            ("downsamplers", _) => "Downsample2D",
            ("upsamplers", _) => "Upsample2D",
            (_, "attn1" | "attn2") => "CrossAttention",
            _ if !holds_weights => "Module",
            (_, "conv_shortcut") => "Conv2d1x1",
            (_, "proj_in" | "proj_out") if proj_is_conv => "Conv2d1x1",
            (_, "conv_in" | "conv_out" | "conv1" | "conv2" | "conv") => "Conv2d3x3",
            _ if leaf.starts_with("norm") => "Norm",
            _ => "Linear",
        }
    }

    /// fnmatch with `*` only (what our preset's names use).
    fn fnmatch(pattern: &str, name: &str) -> bool {
        let parts: Vec<&str> = pattern.split('*').collect();
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if parts.len() == 1 {
            return pattern == name;
        }
        let mut rest = match name.strip_prefix(first) {
            Some(r) => r,
            None => return false,
        };
        for mid in &parts[1..parts.len() - 1] {
            match rest.find(mid) {
                Some(i) => rest = &rest[i + mid.len()..],
                None => return false,
            }
        }
        rest.ends_with(last)
    }

    /// The UNet layers kohya or LyCORIS would train given our `--network_module` and
    /// `--network_args` (and our preset file), by their published selection rules:
    /// - kohya `networks/lora.py` (L867-868, L963-1001, L1038-1040 at 48d368f): every Linear and
    ///   Conv2d inside a Transformer2DModel, plus ResnetBlock2D / Downsample2D / Upsample2D when
    ///   `conv_dim` is given; 3×3 convolutions only with `conv_dim`.
    /// - LyCORIS `lycoris/kohya.py` (L95-101, L338-339, L385-401, L460-494 at f49d30d): the
    ///   preset's module classes (every Linear / Conv inside) and names (fnmatch); 3×3
    ///   convolutions only with `enable_conv`. (Its GLoRA override at L498 compares the algo's name,
    ///   a string, with `GLoRAModule`, so it never applies.)
    fn kohya_trains(c: &TrainConfig, layers: &[(String, &'static str)]) -> BTreeSet<String> {
        let (module, args) = network(c).unwrap();
        let has = |prefix: &str| args.iter().any(|a| a.starts_with(prefix));
        let (modules, names, conv3x3): (Vec<String>, Vec<String>, bool) = if module == "networks.lora" {
            let mut m = vec!["Transformer2DModel".to_string()];
            if has("conv_dim=") {
                m.extend(["ResnetBlock2D", "Downsample2D", "Upsample2D"].map(String::from));
            }
            (m, vec![], has("conv_dim="))
        } else if !has("preset=") {
            // LyCORIS' default preset, "full" (lycoris/config.py L2-41).
            let modules = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"];
            let names = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"];
            (modules.map(String::from).to_vec(), names.map(String::from).to_vec(), true)
        } else {
            assert!(has(&format!("preset=$JOB_DIR/{LYCORIS_PRESET}")), "{args:?}");
            let preset: toml::Table = lycoris_preset(c).unwrap().parse().unwrap();
            let strings = |k: &str| -> Vec<String> {
                preset[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
            };
            assert_eq!(preset["use_fnmatch"].as_bool(), Some(true));
            (strings("unet_target_module"), strings("unet_target_name"), preset["enable_conv"].as_bool().unwrap())
        };
        let trainable = |class: &str| class == "Linear" || class == "Conv2d1x1" || (conv3x3 && class == "Conv2d3x3");
        let class_of: BTreeMap<&str, &str> = layers.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        layers
            .iter()
            .filter(|(path, class)| {
                let in_target_module = (1..path.split('.').count()).any(|n| {
                    let ancestor = path.split('.').take(n).collect::<Vec<_>>().join(".");
                    class_of.get(ancestor.as_str()).is_some_and(|c| modules.iter().any(|m| m == c))
                });
                let named = names.iter().any(|n| fnmatch(n, path));
                (in_target_module || named) && trainable(class)
            })
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// Every module of a UNet with its sd-scripts class, from its parameter names.
    fn unet_modules(params: impl Iterator<Item = String>, proj_is_conv: bool) -> Vec<(String, &'static str)> {
        let (mut paths, mut layers) = (BTreeSet::new(), BTreeSet::new());
        for p in params {
            let path = p.strip_suffix(".weight").or(p.strip_suffix(".bias")).unwrap_or(&p).to_string();
            let segments: Vec<&str> = path.split('.').collect();
            for n in 1..=segments.len() {
                paths.insert(segments[..n].join("."));
            }
            layers.insert(path);
        }
        paths.into_iter().map(|p| (p.clone(), sd_scripts_class(&p, layers.contains(&p), proj_is_conv))).collect()
    }

    /// Our trained set on those modules: the trainer's rule, a layer being a Linear or Conv.
    fn we_train(c: &TrainConfig, layers: &[(String, &'static str)]) -> BTreeSet<String> {
        layers
            .iter()
            .filter(|(_, class)| matches!(*class, "Linear" | "Conv2d1x1" | "Conv2d3x3"))
            .filter(|(path, class)| c.algorithm.trains_unet_layer(c.targets, path, *class != "Linear"))
            .map(|(path, _)| path.clone())
            .collect()
    }

    fn fixture_unet(file: &str) -> Vec<String> {
        let path = crate::engine::builtin::fixtures_dir().join("unet_names").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        text.lines().filter_map(|l| l.split('\t').nth(1)).map(String::from).collect()
    }

    /// For each adapter kind and target preset, on real SD 1.5 (proj_in/out 1×1 convolutions) and
    /// SD 2.1 (linear) UNet names, kohya / LyCORIS train exactly the layers we train.
    #[test]
    fn kohya_export_trains_our_layers_for_each_algorithm_and_preset() {
        for (file, proj_is_conv) in [("sd15.tsv", true), ("sd21.tsv", false)] {
            let layers = unet_modules(fixture_unet(file).into_iter(), proj_is_conv);
            for algorithm in Algorithm::ADAPTERS {
                for targets in TargetPreset::ALL {
                    let c = TrainConfig { algorithm, targets, ..TrainConfig::default() };
                    let (ours, theirs) = (we_train(&c, &layers), kohya_trains(&c, &layers));
                    assert!(!ours.is_empty());
                    assert_eq!(
                        ours,
                        theirs,
                        "{file} {algorithm:?} {targets:?}: only ours {:?}, only theirs {:?}",
                        ours.difference(&theirs).collect::<Vec<_>>(),
                        theirs.difference(&ours).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    /// The text encoders: kohya's CLIPAttention + CLIPMLP (and so every LyCORIS preset we write)
    /// train q/k/v/out_proj and fc1/fc2, as we do, whatever the UNet preset.
    #[test]
    fn kohya_export_text_encoder_targets_match_ours() {
        for targets in TargetPreset::ALL {
            let c = TrainConfig { algorithm: Algorithm::Loha, targets, ..TrainConfig::default() };
            let preset: toml::Table = lycoris_preset(&c).unwrap().parse().unwrap();
            let modules = preset["text_encoder_target_module"].as_array().unwrap();
            for class in ["CLIPAttention", "CLIPMLP"] {
                assert!(modules.iter().any(|m| m.as_str() == Some(class)), "{targets:?}: {modules:?}");
            }
        }
        // transformers' CLIPAttention holds q/k/v/out_proj, CLIPMLP fc1/fc2: all ours.
        for leaf in
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
        {
            assert!(TargetPreset::targets_text_encoder(&format!("text_model.encoder.layers.0.{leaf}")));
        }
    }

    /// The learning rate sd-scripts' scheduler gives after `t` of its own steps (transformers'
    /// constant-with-warmup and cosine-with-warmup formulas).
    fn scheduled_lr(schedule: LrSchedule, t: usize, warmup: usize, total: usize) -> f64 {
        if t < warmup {
            return t as f64 / warmup.max(1) as f64;
        }
        match schedule {
            LrSchedule::Cosine => {
                let progress = (t - warmup) as f64 / (total - warmup).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            _ => 1.0,
        }
    }

    fn flag_value(line: &str, flag: &str) -> Option<usize> {
        let rest = line.split(&format!("--{flag} ")).nth(1)?;
        rest.split(' ').next()?.parse().ok()
    }

    /// On N GPUs each step takes N batches, and sd-scripts steps its scheduler N times per step
    /// (`get_scheduler_fix` counts `max_train_steps * num_processes`; accelerate's prepared
    /// scheduler steps once per process): so our steps are divided by N and the warmup is kept, and
    /// the rate after each image matches the one-GPU run's, over the same number of images.
    #[test]
    fn kohya_export_gpus_keep_the_schedule_per_image() {
        let c = TrainConfig {
            steps: 500,
            warmup_steps: 50,
            save_every: 100,
            lr_schedule: LrSchedule::Cosine,
            batch_size: 2,
            ..TrainConfig::default()
        };
        let line = |gpus| {
            let job = KohyaJob { output_name: "style", gpus, ..job(&c, &[], Path::new("/models/sd15")) };
            (command_line(&job).unwrap().join(" "), gpu_note(&job))
        };
        let ours = |images: usize| scheduled_lr(c.lr_schedule, images / c.batch_size, c.warmup_steps, c.steps);
        for gpus in [1, 2, 4] {
            let (line, note) = line(gpus);
            let steps = flag_value(&line, "max_train_steps").unwrap();
            let warmup = flag_value(&line, "lr_warmup_steps").unwrap();
            assert_eq!(steps * gpus * c.batch_size, c.steps * c.batch_size, "{gpus} GPUs: same images");
            assert_eq!(flag_value(&line, "save_every_n_steps"), Some(100 / gpus), "{line}");
            for step in 0..=steps {
                let images = step * gpus * c.batch_size;
                let theirs = scheduled_lr(c.lr_schedule, step * gpus, warmup, steps * gpus);
                assert!(
                    (theirs - ours(images)).abs() < 1e-12,
                    "{gpus} GPUs, step {step}: {theirs} vs {}",
                    ours(images)
                );
            }
            assert_eq!(note.is_some(), gpus > 1);
        }
        assert!(line(4).1.unwrap().contains("125 steps of 8 images instead of 500 of 2"), "{:?}", line(4).1);
    }

    /// An SDXL job runs sdxl_train_network.py with SDXL's arguments, caches the text encoders'
    /// outputs only when they are frozen, trains at 1024 with buckets, and its targets (proj_in /
    /// proj_out linear, as in SD 2.x) are kohya's.
    #[test]
    fn kohya_export_sdxl_job_has_sdxl_arguments_and_our_targets() {
        let mut frozen = TrainConfig::for_family(ModelFamily::Sdxl);
        frozen.dataset.buckets = true;
        let files = |config: &TrainConfig| {
            let job = KohyaJob { family: ModelFamily::Sdxl, ..job(config, &[], Path::new("/models/sdxl")) };
            (dataset_toml(&job), command_line(&job).unwrap().join(" ") + " ")
        };
        let (toml, line) = files(&frozen);
        assert!(line.contains("$SD_SCRIPTS/sdxl_train_network.py "), "{line}");
        for arg in [" --no_half_vae ", " --network_train_unet_only ", " --cache_text_encoder_outputs "] {
            assert!(line.contains(arg), "{arg}: {line}");
        }
        assert!(!line.contains("--v2 ") && !line.contains("--text_encoder_lr"), "{line}");
        assert!(toml.contains("resolution = 1024\n") && toml.contains("enable_bucket = true\n"), "{toml}");
        assert!(toml.contains("bucket_reso_steps = 64\n"), "{toml}");
        assert!(toml.contains("min_bucket_reso = 64\nmax_bucket_reso = 2048\n"), "{toml}");
        // Captions that change per step cannot be cached in sd-scripts; odd bucket steps are refused.
        let shuffled = TrainConfig { shuffle_tags: true, ..frozen.clone() };
        let (_, line) = files(&shuffled);
        assert!(
            line.contains(" --network_train_unet_only ") && !line.contains("--cache_text_encoder_outputs"),
            "{line}"
        );
        let mut odd = frozen.clone();
        odd.dataset.bucket_step = 48;
        let job = KohyaJob { family: ModelFamily::Sdxl, ..job(&odd, &[], Path::new("/models/sdxl")) };
        let err = command_line(&job).unwrap_err().to_string();
        assert!(err.contains("multiples of 32"), "{err}");
        let trained = TrainConfig { train_text_encoder: true, ..frozen.clone() };
        let (_, line) = files(&trained);
        assert!(line.contains(" --no_half_vae ") && line.contains(" --text_encoder_lr "), "{line}");
        assert!(
            !line.contains("--cache_text_encoder_outputs") && !line.contains("--network_train_unet_only"),
            "{line}"
        );
        // SDXL's block layout (diffusers' sdxl unet): 2 and 10 transformer blocks per attention,
        // linear proj_in/out, no attention in the first down block.
        let mut params = vec!["conv_in.weight".to_string(), "time_embedding.linear_1.weight".into()];
        for (block, depth) in [("down_blocks.1.attentions.0", 2), ("mid_block.attentions.0", 10)] {
            params.extend(["proj_in", "proj_out", "norm"].map(|l| format!("{block}.{l}.weight")));
            for t in 0..depth {
                let tb = format!("{block}.transformer_blocks.{t}");
                for leaf in
                    ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2", "norm1"]
                {
                    params.push(format!("{tb}.{leaf}.weight"));
                }
            }
        }
        for leaf in ["conv1", "conv2", "time_emb_proj", "conv_shortcut", "norm1"] {
            params.push(format!("down_blocks.1.resnets.0.{leaf}.weight"));
        }
        params.push("down_blocks.0.downsamplers.0.conv.weight".into());
        let layers = unet_modules(params.into_iter(), false);
        for algorithm in Algorithm::ADAPTERS {
            for targets in TargetPreset::ALL {
                let c = TrainConfig { algorithm, targets, ..frozen.clone() };
                let (ours, theirs) = (we_train(&c, &layers), kohya_trains(&c, &layers));
                assert_eq!(ours, theirs, "SDXL {algorithm:?} {targets:?}");
                assert_eq!(
                    ours.contains("mid_block.attentions.0.proj_in"),
                    targets != TargetPreset::CrossAttention && targets != TargetPreset::Attention
                        || algorithm == Algorithm::Locon,
                    "{algorithm:?} {targets:?}"
                );
            }
        }
    }
}
