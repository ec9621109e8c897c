//! The headless front end: `lora-studio <command> [flags]`. Each command parses its flags and
//! calls the engine; any error prints as one line and the process exits non-zero.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use lexopt::prelude::*;

use crate::engine::Result;
use crate::engine::adapters::formats::{Naming, match_layers, read_adapter, summarize};
use crate::engine::adapters::mix;
use crate::engine::adapters::stack::BlockWeights;
use crate::engine::bench;
use crate::engine::builtin;
use crate::engine::diffusion::sampler::SamplerKind;
use crate::engine::io::infotext::{
    AdapterUse, GenerationParameters, adapter_short_hash, extract_prompt_tags, save_png_with_parameters,
};
use crate::engine::io::weights::{WeightPrecision, all_finite, read_safetensors, write_safetensors};
use crate::engine::models::family::ModelFamily;
use crate::engine::pipeline::{GenerateRequest, ModelWeights, StableDiffusion, TextConditioning};
use crate::engine::train::trainer::TrainConfig;
use crate::job::{TrainCommand, TrainEvent, TrainJob, TrainJobSpec};

const USAGE: &str = "\
LoRA Studio — train, blend and export LoRA adapters for Stable Diffusion

usage:  (every command takes --device cpu|cuda[:N]|metal[:N] (LORA_STUDIO_DEVICE is the fallback) and
         --weights auto|f16|bf16|f32: how the model's weights are kept in memory; auto keeps f16/bf16
         files in half precision, computing in f32 either way)
  lora-studio [--model PATH]       open the window (also: lora-studio gui --model PATH)
                                   (without --model: the built-in model in assets/base, everywhere;
                                   PATH: a diffusers folder or a .safetensors checkpoint, SD 1.x / 2.x / SDXL)
  lora-studio generate [--model PATH] --prompt TEXT [--adapter FILE[:WEIGHT]]... [--allow-partial] [--negative TEXT] [--seed N] [--steps N]
                       [--guidance X] [--sampler ddim|euler-a|euler|lcm|tcd] [--width W --height H] [--clip-skip N] --out FILE.png
                       [--lora-dir DIR]
                       (defaults: the model's own size; euler for SDXL, ddim otherwise; clip skip 1, the last layer;
                        <lora:NAME:WEIGHT> in the prompt loads DIR/NAME.safetensors, or without --lora-dir the
                        example style NAME; the PNG carries the settings in A1111's `parameters` text, which
                        A1111, ComfyUI and civitai read)
                       (prompts as in A1111: (word) ×1.1, [word] ÷1.1, (word:1.3), \\( for a bracket, BREAK,
                        any length in chunks of 75 tokens; clip skip 2 reads the penultimate layer, SD 1.x / 2.x only)
  lora-studio forward [--model PATH] [--adapter FILE[:WEIGHT]]... [--allow-partial] --inputs IN.safetensors --output OUT.safetensors
                      [--check REFERENCE.safetensors [--tolerance X]]   (max|ours - ref| / max|ref| per output; default 1e-4)
  lora-studio train [--model PATH] --data DIR --out FILE.safetensors [--algo lora|locon|loha|lokr|dora|glora]
                    [--rank N --alpha X --lokr-factor N --targets PRESET --lr X --steps N --epochs N --batch N --resolution N
                     --seed N --save-every N --sample-every N --sample-prompt TEXT --trigger WORD
                     --train-text-encoder --text-encoders both|te1|te2 (SDXL) --flip --buckets --min-snr G --noise-offset X
                     --timestep-bias none|earlier|later --timestep-bias-multiplier X --timestep-bias-portion X
                     --lr-schedule constant|cosine|linear --warmup N --grad-accum N --clip-skip N (SD 1.x / 2.x)
                     --optimizer adamw|prodigy|adafactor
                     --random-crop --latent-cache DIR --no-latent-cache --gradient-checkpointing
                     --format kohya|peft --resume CKPT --overwrite --config train.toml]
                    (--epochs N: N passes over the data instead of --steps, each image as often as its folder's
                     kohya name `N_words` says (N repeats; `words` captions images without a caption file);
                     --algo full trains the model itself; --out is then a model folder; without --config an
                     SDXL model starts from SDXL's defaults: --resolution 1024, gradient checkpointing, UNet only;
                     --optimizer prodigy wants --lr 1; Prodigy's and Adafactor's own settings are the
                     [prodigy] and [adafactor] tables of train.toml)
  lora-studio export-job --config train.toml --out DIR [--gpus N] [--v2] [--v-prediction] [--zero-terminal-snr]
                       the same job for kohya sd-scripts (dataset.toml + train.sh)
  lora-studio adapter info FILE [--model PATH]
  lora-studio adapter blend A.safetensors[:W] B.safetensors[:W]... [--model PATH] --rank N --out C.safetensors
                       [--format kohya|peft] [--f16] [--allow-partial]
  lora-studio adapter merge A.safetensors[:W]... [--model DIR] --out NEW_MODEL_DIR [--allow-partial]
  lora-studio bench unet --config sd1-tiny|sd15|sd21|sdxl|PATH [--latent N] [--batch B] [--runs N] [--forward-only]
  lora-studio bench train --config sd1-tiny|small|sd15|sdxl|PATH [--latent N] [--batch B] [--rank R] [--runs N] [--checkpointing]
  lora-studio bench mix --config sd1-tiny|small|sd15|sdxl|PATH [--latent N] [--batch B] [--adapters N] [--rank R] [--runs N] [--weights f16]
  lora-studio bench generate [--model PATH] [--steps N] [--guidance X] [--runs N]
  lora-studio bench gemm --config sd1-tiny|small|sd15|sdxl|PATH [--latent N] [--batch B] [--runs N]
";

pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            // `{:#}` joins the context chain into one line: "file: what went wrong: cause".
            eprintln!("error: {e:#}");
            1
        }
    }
}

pub fn run(args: Vec<OsString>) -> Result<()> {
    let args = take_global_options(args)?;
    let mut parser = lexopt::Parser::from_args(args);
    let command = match parser.next()? {
        None => return crate::ui::run_window(crate::ui::WindowOptions::default()),
        Some(Value(v)) => v.string()?,
        Some(Long("help")) | Some(Short('h')) => {
            print!("{USAGE}");
            return Ok(());
        }
        Some(Long("version")) => {
            println!("lora-studio {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Some(Long("model")) => {
            let model: PathBuf = parser.value()?.into();
            return crate::ui::run_window(crate::ui::WindowOptions { model: Some(model), ..Default::default() });
        }
        Some(other) => return Err(other.unexpected().into()),
    };
    match command.as_str() {
        "generate" => generate(&mut parser),
        "forward" => forward(&mut parser),
        "bench" => bench_command(&mut parser),
        "adapter" => adapter_command(&mut parser),
        "train" => train(&mut parser),
        "gui" => {
            let mut options = crate::ui::WindowOptions::default();
            while let Some(arg) = parser.next()? {
                match arg {
                    Long("model") => options.model = Some(parser.value()?.into()),
                    _ => return Err(arg.unexpected().into()),
                }
            }
            crate::ui::run_window(options)
        }
        "export-job" => export_job(&mut parser),
        "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}` (try `lora-studio --help`)"),
    }
}

/// The compute device: `--device` (anywhere on the command line), else `LORA_STUDIO_DEVICE`, else
/// the CPU. One this build lacks is an error, not a quiet fall back to the CPU.
static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

fn device() -> Device {
    DEVICE.get().cloned().unwrap_or(Device::Cpu)
}

/// `--weights` (anywhere on the command line), else `auto`.
static WEIGHTS: std::sync::OnceLock<WeightPrecision> = std::sync::OnceLock::new();

fn weights() -> WeightPrecision {
    WEIGHTS.get().copied().unwrap_or_default()
}

/// The model at `path` on the run's device, its weights kept as `--weights` says.
fn load_model(path: &std::path::Path) -> Result<StableDiffusion> {
    StableDiffusion::from_weights(ModelWeights::load(path, DType::F32, weights(), &device())?)
}

/// Takes the options every command shares (`--device SPEC`, `--weights PRECISION`, also as
/// `--name=value`) out of the arguments and sets them for the run.
fn take_global_options(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut spec = std::env::var("LORA_STUDIO_DEVICE").ok();
    let mut precision = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.to_str() {
            Some(s @ ("--device" | "--weights")) => (s.to_string(), None),
            Some(s) if s.starts_with("--device=") || s.starts_with("--weights=") => {
                let (n, v) = s.split_once('=').expect("checked above");
                (n.to_string(), Some(v.to_string()))
            }
            _ => {
                rest.push(a);
                continue;
            }
        };
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .with_context(|| match name.as_str() {
                    "--device" => "--device needs a value: cpu, cuda[:N] or metal[:N]",
                    _ => "--weights needs a value: auto, f16, bf16 or f32",
                })?
                .to_string_lossy()
                .into_owned(),
        };
        match name.as_str() {
            "--device" => spec = Some(value),
            _ => precision = Some(WeightPrecision::parse(&value)?),
        }
    }
    let picked = crate::engine::device::parse(spec.as_deref().unwrap_or("cpu"))?;
    let _ = DEVICE.set(picked);
    if let Some(p) = precision {
        let _ = WEIGHTS.set(p);
    }
    Ok(rest)
}

fn generate(p: &mut lexopt::Parser) -> Result<()> {
    let mut model: Option<PathBuf> = None;
    let mut out: Option<PathBuf> = None;
    let mut adapters: Vec<String> = Vec::new();
    let mut req = GenerateRequest {
        prompt: String::new(),
        negative: String::new(),
        seed: 0,
        steps: 20,
        guidance: 7.5,
        sampler: SamplerKind::Ddim,
        width: 0,
        height: 0,
        clip_skip: 1,
    };
    let mut sampler: Option<SamplerKind> = None;
    let mut allow_partial = false;
    let mut lora_dir: Option<PathBuf> = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Long("prompt") => req.prompt = p.value()?.string()?,
            Long("negative") => req.negative = p.value()?.string()?,
            Long("seed") => req.seed = p.value()?.parse()?,
            Long("steps") => req.steps = p.value()?.parse()?,
            Long("guidance") => req.guidance = p.value()?.parse()?,
            Long("sampler") => sampler = Some(p.value()?.string()?.parse()?),
            Long("width") => req.width = p.value()?.parse()?,
            Long("height") => req.height = p.value()?.parse()?,
            Long("out") => out = Some(p.value()?.into()),
            Long("adapter") => adapters.push(p.value()?.string()?),
            Long("allow-partial") => allow_partial = true,
            Long("lora-dir") => lora_dir = Some(p.value()?.into()),
            Long("clip-skip") => req.clip_skip = p.value()?.parse()?,
            _ => return Err(arg.unexpected().into()),
        }
    }
    // `<lora:NAME:WEIGHT>` in the prompt, as A1111 users write it: out of the text the model
    // reads (A1111 removes them too), and loaded as adapters, so a pasted A1111 prompt works.
    let tags = extract_prompt_tags(&req.prompt);
    for note in &tags.ignored {
        eprintln!("note: {note}");
    }
    for tag in &tags.adapters {
        let file = tagged_adapter_file(&tag.name, lora_dir.as_deref())?;
        if let Some(te) = tag.text_encoder_weight {
            eprintln!(
                "note: <lora:{}>: one weight per adapter here: the UNet's {} (the text encoder's {te} is not used)",
                tag.name, tag.weight
            );
        }
        adapters.push(format!("{}:{}", file.display(), tag.weight));
    }
    req.prompt = tags.prompt;
    let model = builtin::resolve_model(model)?;
    let out = out.context("--out FILE.png is required")?;
    let mut sd = load_model(&model)?;
    load_adapters(&mut sd, &adapters, allow_partial)?;
    if let Some(note) = sd.clip_skip_note(req.clip_skip) {
        eprintln!("note: {note}");
    }
    req.sampler = sampler.unwrap_or_else(|| sd.default_sampler());
    let default_side = sd.native_side();
    if req.width == 0 {
        req.width = default_side;
    }
    if req.height == 0 {
        req.height = default_side;
    }
    let started = std::time::Instant::now();
    // Progress only for a person watching; scripts get just the result or the one-line error.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let img = sd.generate(&req, &mut |i, n| {
        if tty {
            eprint!("\rstep {i}/{n}");
        }
    });
    if tty {
        eprintln!(); // end the progress line before a result or an error
    }
    let img = img?;
    let used = adapters
        .iter()
        .map(|spec| {
            let (file, weight) = parse_adapter_spec(spec)?;
            let hash =
                file.extension().is_some_and(|e| e == "safetensors").then(|| adapter_short_hash(&file)).transpose()?;
            Ok(AdapterUse { name: file_stem(&file), weight, hash })
        })
        .collect::<Result<Vec<_>>>()?;
    // Every image carries its parameters, as A1111 writes them, so it can be remade or shared.
    let params = GenerationParameters::from_request(&req, used, Some(file_stem(&model)));
    save_png_with_parameters(&out, &img, &params)?;
    println!("wrote {} ({}×{}, {:.2} s)", out.display(), req.width, req.height, started.elapsed().as_secs_f64());
    Ok(())
}

/// The file a prompt's `<lora:NAME:…>` means: `NAME.safetensors` in `dir`, or without one among
/// the built-in example styles.
fn tagged_adapter_file(name: &str, dir: Option<&std::path::Path>) -> Result<PathBuf> {
    let found = match dir {
        Some(dir) => Some(dir.join(format!("{name}.safetensors"))).filter(|f| f.is_file()),
        None => builtin::example_adapters().into_iter().find(|f| file_stem(f) == name),
    };
    let looked = match dir {
        Some(dir) => dir.display().to_string(),
        None => "the built-in example styles; --lora-dir DIR looks in DIR".to_string(),
    };
    found.with_context(|| {
        format!(
            "<lora:{name}> in --prompt: no {name}.safetensors in {looked} (or pass the file: --adapter FILE:WEIGHT)"
        )
    })
}

/// A file's or folder's name without its extension: how A1111 names models and adapters.
fn file_stem(path: &std::path::Path) -> String {
    path.file_stem().unwrap_or(path.as_os_str()).to_string_lossy().into_owned()
}

fn forward(p: &mut lexopt::Parser) -> Result<()> {
    let (mut model, mut inputs, mut output): (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) = (None, None, None);
    let mut adapters: Vec<String> = Vec::new();
    let mut allow_partial = false;
    let mut check: Option<PathBuf> = None;
    let mut tolerance = 1e-4;
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Long("inputs") => inputs = Some(p.value()?.into()),
            Long("output") => output = Some(p.value()?.into()),
            Long("check") => check = Some(p.value()?.into()),
            Long("tolerance") => tolerance = p.value()?.parse()?,
            Long("adapter") => adapters.push(p.value()?.string()?),
            Long("allow-partial") => allow_partial = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let model = builtin::resolve_model(model)?;
    let inputs_path = inputs.context("--inputs IN.safetensors is required")?;
    let output = output.context("--output OUT.safetensors is required")?;
    // The output never replaces what it is made from or measured against.
    for (flag, input) in [("--inputs", Some(&inputs_path)), ("--check", check.as_ref())] {
        if input.is_some_and(|i| crate::engine::io::weights::same_file(&output, i)) {
            bail!("{}: this is the {flag} file; choose another --output", output.display());
        }
    }
    let dev = device();
    let inputs = read_safetensors(&inputs_path)?;
    let mut sd = load_model(&model)?;
    load_adapters(&mut sd, &adapters, allow_partial)?;
    let mut outputs: HashMap<String, Tensor> = HashMap::new();
    let on_device = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&dev)?) };
    let as_f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&dev)?) };
    // SD 1.x / 2.x: `input_ids` → `text_embeddings`; SDXL: `input_ids` and `input_ids_2` →
    // `prompt_embeds` and `pooled_prompt_embeds` (diffusers' names for each).
    let text = if let Some(ids) = inputs.get("input_ids") {
        let ids_2 = inputs.get("input_ids_2").map(on_device).transpose()?;
        let text = sd.encode_ids(&on_device(ids)?, ids_2.as_ref())?;
        match &text.pooled {
            Some(pooled) => {
                outputs.insert("prompt_embeds".into(), text.context.clone());
                outputs.insert("pooled_prompt_embeds".into(), pooled.clone());
            }
            None => {
                outputs.insert("text_embeddings".into(), text.context.clone());
            }
        }
        Some(text)
    } else {
        let context = ["encoder_hidden_states", "prompt_embeds"].iter().find_map(|k| inputs.get(*k));
        let pooled = ["pooled_prompt_embeds", "text_embeds"].iter().find_map(|k| inputs.get(*k));
        match context {
            Some(c) => Some(TextConditioning { context: as_f32(c)?, pooled: pooled.map(as_f32).transpose()? }),
            None => None,
        }
    };
    if let Some(sample) = inputs.get("sample") {
        let text = text.context(format!(
            "{}: has `sample` but neither `input_ids` nor `encoder_hidden_states` / `prompt_embeds`",
            inputs_path.display()
        ))?;
        let t = inputs.get("timestep").context(format!("{}: `timestep` is missing", inputs_path.display()))?;
        let sample = as_f32(sample)?;
        // SDXL's size numbers: `add_time_ids` (diffusers' name) or an uncropped picture of the
        // sample's size.
        let sizes = match ["add_time_ids", "time_ids"].iter().find_map(|k| inputs.get(*k)) {
            // Given to a model that is not SDXL, `predict` refuses them rather than ignore them.
            Some(s) => Some(as_f32(s)?),
            None => {
                let f = sd.vae.config.downscale();
                sd.uncropped_sizes(&text, sample.dim(2)? * f, sample.dim(3)? * f)?
            }
        };
        let pred = sd.predict(&sample, &as_f32(t)?, &text, sizes.as_ref())?;
        outputs.insert("noise_pred".into(), pred);
    }
    if outputs.is_empty() {
        bail!("{}: nothing to run (expected `input_ids` and/or `sample` + `timestep`)", inputs_path.display());
    }
    let outputs: HashMap<String, Tensor> =
        outputs.into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    write_safetensors(&output, &outputs, None)?;
    let mut names: Vec<_> = outputs.keys().cloned().collect();
    names.sort();
    println!("wrote {} ({})", output.display(), names.join(", "));
    if let Some(check) = check {
        compare_outputs(&outputs, &check, tolerance)?;
    }
    Ok(())
}

/// `forward --check REF`: each output against the reference tensor of the same name, as
/// max|ours − ref| / max|ref|; an error when one is over `tolerance` or missing from the reference.
fn compare_outputs(outputs: &HashMap<String, Tensor>, reference: &std::path::Path, tolerance: f64) -> Result<()> {
    let refs = read_safetensors(reference)?;
    let mut names: Vec<_> = outputs.keys().collect();
    names.sort();
    let mut worst = 0f64;
    for name in names {
        let r = refs.get(name).with_context(|| format!("{}: no `{name}` to compare with", reference.display()))?;
        let (o, r) = (outputs[name].to_dtype(DType::F64)?, r.to_dtype(DType::F64)?);
        if o.dims() != r.dims() {
            bail!("`{name}`: shape {:?}, the reference's is {:?}", o.dims(), r.dims());
        }
        let max_ref = r.abs()?.max_all()?.to_scalar::<f64>()?;
        let ratio = (o - &r)?.abs()?.max_all()?.to_scalar::<f64>()? / max_ref.max(f64::MIN_POSITIVE);
        println!("{name}: max|ours - ref| / max|ref| = {ratio:.2e} (tolerance {tolerance:.0e})");
        worst = worst.max(ratio);
    }
    if worst > tolerance {
        bail!("outputs differ from {} by {worst:.2e} of their size (tolerance {tolerance:.0e})", reference.display());
    }
    Ok(())
}

fn adapter_command(p: &mut lexopt::Parser) -> Result<()> {
    let what = match p.next()? {
        Some(Value(v)) => v.string()?,
        _ => bail!("usage: lora-studio adapter info FILE [--model PATH]"),
    };
    match what.as_str() {
        "info" => adapter_info(p),
        "blend" => adapter_blend(p, false),
        "merge" => adapter_blend(p, true),
        other => bail!("unknown adapter command `{other}` (available: info, blend, merge)"),
    }
}

/// A format doctor: what kind of adapter a file is, for which model, at what strength.
fn adapter_info(p: &mut lexopt::Parser) -> Result<()> {
    let (mut file, mut model): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Value(v) if file.is_none() => file = Some(v.into()),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let file = file.context("which adapter file? usage: lora-studio adapter info FILE [--model PATH]")?;
    let parsed = read_adapter(&file)?;
    let s = summarize(&parsed);
    println!("file:       {}", file.display());
    for (label, value) in s.lines() {
        println!("{:<11} {}", format!("{label}:"), printable(&value));
    }
    for (k, v) in &s.metadata {
        let (k, v) = (printable(k), printable(v));
        let v = if v.len() > 120 {
            format!("{}…", &v[..v.char_indices().nth(120).map(|(i, _)| i).unwrap_or(v.len())])
        } else {
            v.clone()
        };
        println!("metadata:   {k} = {v}");
    }
    if let Some(model) = model {
        let mut sd = load_model(&model)?;
        let (_, report) = match_layers(&parsed, &sd.module_index())?;
        match report.accept(false) {
            Ok(()) => println!("with {}: {}", model.display(), report.summary()),
            Err(e) => println!("with {}: {e:#}", model.display()),
        }
    }
    Ok(())
}

/// Several adapters at their weights → one adapter of a chosen rank (`blend`), or a whole model
/// with them folded into its weights (`merge`).
fn adapter_blend(p: &mut lexopt::Parser, merge: bool) -> Result<()> {
    let mut specs: Vec<String> = Vec::new();
    let (mut model, mut out): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let mut rank: Option<usize> = None;
    let mut naming = Naming::Kohya;
    let mut dtype = DType::F32;
    let mut allow_partial = false;
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Long("out") => out = Some(p.value()?.into()),
            Long("rank") if !merge => rank = Some(p.value()?.parse()?),
            Long("format") if !merge => {
                naming = match p.value()?.string()?.as_str() {
                    "kohya" => Naming::Kohya,
                    "peft" | "diffusers" => Naming::Peft,
                    other => bail!("unknown format `{other}` (kohya or peft)"),
                }
            }
            Long("f16") if !merge => dtype = DType::F16,
            Long("allow-partial") => allow_partial = true,
            Value(v) => specs.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if specs.is_empty() {
        bail!("name at least one adapter file, as FILE[:WEIGHT]");
    }
    let model = builtin::resolve_model(model)?;
    let out = out.context("--out is required")?;
    let mut sd = load_model(&model)?;
    load_adapters(&mut sd, &specs, allow_partial)?;
    if merge {
        let written = crate::engine::io::diffusers_folder::write_merged_model(&mut sd, &model, &out)?;
        println!("wrote {} ({written} weights changed)", out.display());
        return Ok(());
    }
    let rank = rank.context("--rank N is required")?;
    // The live mix's output on a fixed input, to report what the blend loses end to end.
    let probe = probe_output(&sd)?;
    let mut measured = None;
    let files: Vec<PathBuf> = specs.iter().map(|s| parse_adapter_spec(s).map(|(f, _)| f)).collect::<Result<_>>()?;
    let inputs: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    let form = mix::BlendForm { rank, naming, dtype };
    let report = mix::export_blend(&mut sd, &out, form, &specs, &inputs, |sd, written| {
        // Swap the live mix for the written file; a blend that breaks the model is not kept.
        for i in 0..specs.len() {
            sd.remove_adapter(&format!("adapter{i}"));
        }
        sd.load_adapter("blend", written, 1.0)
            .map_err(|e| anyhow::anyhow!("{}: the blend does not load back: {e:#}", out.display()))?;
        let blended = probe_output(sd)?;
        if !all_finite(&blended)? {
            bail!(
                "{}: the blend makes the model's output NaN or infinite (lower the weights); nothing was written",
                out.display()
            );
        }
        let scale = probe.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (&probe - blended)?.abs()?.max_all()?.to_scalar::<f32>()?;
        measured = Some((err, scale));
        Ok(())
    })?;
    let (err, scale) = measured.expect("checked before the rename");
    println!(
        "wrote {} ({} layers, rank {rank}): kept energy {:.6} (worst layer {:.6}), max weight error {:.3e}, max UNet output error {:.3e} (relative {:.3e})",
        out.display(),
        report.layers,
        report.kept_energy,
        report.min_layer_energy,
        report.max_weight_error,
        err,
        err / scale.max(f32::MIN_POSITIVE)
    );
    Ok(())
}

/// UNet output for a seeded latent and a fixed prompt: a yardstick for comparing mixes.
fn probe_output(sd: &StableDiffusion) -> Result<Tensor> {
    let mut rng = crate::engine::rng::Rng::new(1234);
    let c = &sd.unet.config;
    let side = c.sample_size.unwrap_or(16).min(32);
    let x = rng.randn((1, c.in_channels, side, side), &sd.device)?;
    let text = sd.encode_prompts(&["a photo of a cat"])?;
    let f = sd.vae.config.downscale();
    let sizes = sd.uncropped_sizes(&text, side * f, side * f)?;
    sd.predict(&x, &Tensor::new(&[500f32], &sd.device)?, &text, sizes.as_ref())
}

/// A training job as a TOML file: the trainer's options plus where the model, data and output are.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct TrainFile {
    model: Option<PathBuf>,
    data: Vec<PathBuf>,
    out: Option<PathBuf>,
    #[serde(flatten)]
    config: TrainConfig,
}

impl TrainFile {
    /// Reads a train.toml. A key that names no option (`stepz`, `learning_rat`) is refused with the
    /// closest valid name: ignored, it would leave the default in force without a word.
    fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        // Every option's name, from the defaults (JSON keeps the `None` ones, as null).
        let mut known = serde_json::to_value(TrainConfig::default())?;
        for k in ["model", "data", "out"] {
            known[k] = serde_json::Value::Null;
        }
        check_keys(&table, &known, "").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.message()))
    }
}

/// Refuses keys of `table` that `known` (an object of option names) lacks, recursing into tables.
fn check_keys(table: &toml::Table, known: &serde_json::Value, prefix: &str) -> Result<()> {
    let names: Vec<&String> = known.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    for (key, value) in table {
        match known.get(key) {
            None => {
                // Only a near miss is suggested (a third of the letters wrong at most).
                let closest = names
                    .iter()
                    .map(|n| (edit_distance(key, n), n))
                    .min()
                    .filter(|(d, _)| *d <= (key.chars().count() / 3).max(2))
                    .map(|(_, n)| format!("; did you mean `{prefix}{n}`?"));
                bail!("unknown option `{prefix}{key}`{}", closest.unwrap_or_default());
            }
            Some(inner @ serde_json::Value::Object(_)) => {
                if let toml::Value::Table(t) = value {
                    check_keys(t, inner, &format!("{prefix}{key}."))?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Levenshtein distance, for suggesting the option a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn train(p: &mut lexopt::Parser) -> Result<()> {
    // A --config file first, then flags override it, whatever their order on the line.
    let mut args = Vec::new();
    let mut file = TrainFile::default();
    let mut config_file = false;
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => {
                let path: PathBuf = p.value()?.into();
                file = TrainFile::read(&path)?;
                config_file = true;
            }
            Long(name) => {
                let name = name.to_string();
                let flag = matches!(
                    name.as_str(),
                    "train-text-encoder"
                        | "flip"
                        | "buckets"
                        | "random-crop"
                        | "no-latent-cache"
                        | "gradient-checkpointing"
                        | "overwrite"
                );
                let value = if flag { None } else { Some(p.value()?.string()?) };
                args.push((name, value));
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    // Without a --config file, the defaults are the model family's (SDXL: 1024 px, …); flags
    // override them.
    if !config_file {
        let model = args.iter().find(|(n, _)| n == "model").and_then(|(_, v)| v.clone()).map(PathBuf::from);
        if let Some(family) = builtin::resolve_model(model).ok().and_then(|m| ModelWeights::probe_family(&m)) {
            file.config = crate::engine::train::trainer::TrainConfig::for_family(family);
        }
    }
    let mut naming = Naming::Kohya;
    let mut resume = None;
    let mut no_cache = false;
    let mut overwrite = false;
    let c = &mut file.config;
    for (name, value) in args {
        let v = value.unwrap_or_default();
        let num = |v: &str| -> Result<f64> {
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                Ok(_) => bail!("--{name}: `{v}` is not a finite number"),
                Err(_) => bail!("--{name}: `{v}` is not a number"),
            }
        };
        let int = |v: &str| -> Result<usize> {
            v.parse::<usize>().with_context(|| format!("--{name}: `{v}` is not a whole number"))
        };
        match name.as_str() {
            "model" => file.model = Some(v.into()),
            "data" => file.data.push(v.into()),
            "out" => file.out = Some(v.into()),
            "algo" => c.algorithm = v.parse()?,
            "rank" => c.rank = int(&v)?,
            "alpha" => c.alpha = num(&v)?,
            "lokr-factor" => {
                c.lokr_factor =
                    v.parse().with_context(|| format!("--lokr-factor: `{v}` is not a whole number (−1: balanced)"))?
            }
            "targets" => c.targets = serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                anyhow::anyhow!(
                    "--targets: unknown preset `{v}` (cross-attention, attention, transformer, transformer-and-conv)"
                )
            })?,
            "lr" => c.learning_rate = num(&v)?,
            "text-lr" => c.text_encoder_lr = Some(num(&v)?),
            "train-text-encoder" => c.train_text_encoder = true,
            "text-encoders" => {
                c.text_encoders = v.parse()?;
                c.train_text_encoder = true;
            }
            "steps" => c.steps = int(&v)?,
            "epochs" => c.epochs = Some(int(&v)?),
            "batch" => c.batch_size = int(&v)?,
            "grad-accum" => c.grad_accum = int(&v)?,
            "resolution" => c.dataset.resolution = int(&v)?,
            "seed" => c.seed = v.parse().with_context(|| format!("--seed: `{v}` is not a whole number"))?,
            "save-every" => c.save_every = int(&v)?,
            "sample-every" => c.sample_every = int(&v)?,
            "sample-prompt" => c.sample_prompt = v,
            "trigger" => c.dataset.trigger = v,
            "flip" => c.dataset.flip = true,
            "buckets" => c.dataset.buckets = true,
            "random-crop" => c.dataset.center_crop = false,
            "min-snr" => c.min_snr_gamma = Some(num(&v)?),
            "noise-offset" => c.noise_offset = num(&v)?,
            "clip-skip" => c.clip_skip = int(&v)?,
            "timestep-bias" => {
                c.timestep_bias = serde_json::from_value(serde_json::Value::String(v.clone()))
                    .map_err(|_| anyhow::anyhow!("--timestep-bias: `{v}` (none, earlier or later)"))?
            }
            "timestep-bias-multiplier" => c.timestep_bias_multiplier = num(&v)?,
            "timestep-bias-portion" => c.timestep_bias_portion = num(&v)?,
            "gradient-checkpointing" => c.gradient_checkpointing = true,
            "warmup" => c.warmup_steps = int(&v)?,
            "optimizer" => c.optimizer = v.parse().map_err(|e| anyhow::anyhow!("--optimizer: {e}"))?,
            "lr-schedule" => {
                c.lr_schedule = serde_json::from_value(serde_json::Value::String(v.clone()))
                    .map_err(|_| anyhow::anyhow!("--lr-schedule: `{v}` (constant, cosine or linear)"))?
            }
            "format" => {
                naming = match v.as_str() {
                    "kohya" => Naming::Kohya,
                    "peft" | "diffusers" => Naming::Peft,
                    other => bail!("--format: unknown format `{other}` (kohya or peft)"),
                }
            }
            "resume" => resume = Some(PathBuf::from(v)),
            "latent-cache" => c.latent_cache = Some(PathBuf::from(v)),
            "no-latent-cache" => no_cache = true,
            "overwrite" => overwrite = true,
            other => bail!("unknown option --{other} for train"),
        }
    }
    let model = builtin::resolve_model(file.model)?;
    let out = file.out.context("--out FILE.safetensors is required")?;
    if file.data.is_empty() {
        bail!("--data DIR is required (a folder of images with .txt captions)");
    }
    if file.config.latent_cache.is_none() && !no_cache {
        file.config.latent_cache =
            directories::ProjectDirs::from("", "", "lora-studio").map(|d| d.cache_dir().join("latents"));
    }
    if let Some(ckpt) = &resume {
        // The job takes the checkpoint's options (all but the total of steps): say which.
        let summary = crate::engine::train::trainer::CheckpointSummary::read(ckpt)?;
        let summary = crate::engine::train::trainer::CheckpointSummary {
            config: crate::engine::train::trainer::TrainConfig {
                steps: file.config.steps,
                epochs: file.config.epochs,
                ..summary.config.clone()
            },
            ..summary
        };
        eprintln!("resuming with the checkpoint's options: {}", summary.describe());
    }
    let spec = TrainJobSpec {
        model,
        data: file.data,
        out,
        config: file.config,
        resume,
        naming,
        device: device(),
        weights: weights(),
        overwrite,
        in_use: Vec::new(),
    };
    let checkpoint = crate::engine::train::trainer::checkpoint_path(&spec.out);
    let job = TrainJob::start(spec, || {})?;
    let mut checkpoints = Vec::new();
    let mut failed = None;
    // Ctrl-C / SIGTERM: stop and save instead of losing the run (a second one quits at once).
    let stop_requests = crate::job::signals::stop_requests().unwrap_or_else(crossbeam_channel::never);
    let mut signalled = false;
    let mut last_step = (0, 0);
    loop {
        let event = crossbeam_channel::select! {
            recv(job.events) -> event => match event {
                Ok(event) => event,
                Err(_) => break,
            },
            recv(stop_requests) -> _ => {
                signalled = true;
                job.send(TrainCommand::Stop);
                continue;
            }
        };
        match event {
            TrainEvent::Preflight { images, buckets, repeats, epochs, warnings } => {
                eprintln!("{images} images; {buckets}");
                eprintln!("{repeats}; {epochs}");
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            TrainEvent::Encoding { done, total } => {
                eprint!("\rencoding images {done}/{total}");
                if done == total {
                    eprintln!();
                }
            }
            TrainEvent::Started { total_steps, start_step, parameters, layers } => {
                last_step = (start_step, total_steps);
                eprintln!("training {parameters} parameters in {layers} layers, steps {start_step}→{total_steps}");
            }
            TrainEvent::Step { step, total, loss, lr, it_per_s, eta } => {
                last_step = (step, total);
                let bar = progress_bar(step, total, 24);
                let eta = eta.as_secs();
                eprint!(
                    "\r{bar} {step}/{total}  loss {loss:.4}  lr {lr:.2e}  {it_per_s:.2} it/s  ETA {}:{:02}:{:02} ",
                    eta / 3600,
                    eta / 60 % 60,
                    eta % 60
                );
            }
            TrainEvent::Checkpoint { step, validation_loss, .. } => {
                eprintln!("\ncheckpoint at step {step}: validation loss {validation_loss:.5}");
                checkpoints.push((step, validation_loss));
            }
            TrainEvent::Sample { step, .. } => eprintln!("\nsample at step {step}"),
            TrainEvent::Paused { reason, .. } => {
                // Unattended: a pause only ever comes from a NaN; report it and stop.
                let reason = reason.unwrap_or_else(|| "paused".into());
                failed = Some(reason);
                job.send(TrainCommand::Stop);
            }
            TrainEvent::Resumed { .. } | TrainEvent::Snapshot { .. } => {}
            TrainEvent::Finished { step, adapter } => {
                eprintln!();
                println!("wrote {} after {step} steps", adapter.display());
                if signalled && step < last_step.1 {
                    failed = Some(format!(
                        "stopped at step {step} of {} by a signal; saved: --resume {} to go on",
                        last_step.1,
                        checkpoint.display()
                    ));
                }
            }
            TrainEvent::Cancelled => {
                eprintln!();
                failed = Some("stopped before the first step; nothing was written".into());
            }
            TrainEvent::Failed { error } => failed = Some(error),
        }
    }
    job.join();
    if !checkpoints.is_empty() {
        let best = checkpoints.iter().map(|c| c.1).fold(f32::INFINITY, f32::min);
        println!("step      validation loss");
        for (step, loss) in &checkpoints {
            println!("{step:<9} {loss:.5}{}", if *loss == best { "  ← best" } else { "" });
        }
    }
    match failed {
        Some(e) => bail!("{e}"),
        None => Ok(()),
    }
}

/// Writes a train.toml job as a kohya sd-scripts job, for running on a GPU cluster.
fn export_job(p: &mut lexopt::Parser) -> Result<()> {
    let (mut config, mut out): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let (mut gpus, mut v2, mut v_pred, mut zero_snr) = (1usize, false, false, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => config = Some(p.value()?.into()),
            Long("out") => out = Some(p.value()?.into()),
            Long("gpus") => gpus = p.value()?.parse()?,
            Long("v2") => v2 = true,
            Long("v-prediction") => v_pred = true,
            Long("zero-terminal-snr") => zero_snr = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let config = config.context("--config train.toml is required")?;
    let out = out.context("--out DIR is required")?;
    let file = TrainFile::read(&config)?;
    file.config.validate().map_err(|e| anyhow::anyhow!("{}: {e:#}", config.display()))?;
    let model = file.model.context(format!("{}: `model` is missing", config.display()))?;
    if file.data.is_empty() {
        bail!("{}: `data` is missing", config.display());
    }
    // The family from the folder or the file's names; a diffusers folder also says whether it is
    // v-prediction, a single file cannot cheaply.
    let mut family = ModelWeights::probe_family(&model).unwrap_or(ModelFamily::Sd1);
    if v2 && family == ModelFamily::Sd1 {
        family = ModelFamily::Sd2;
    }
    if model.join("unet/config.json").exists() {
        let sched = model.join("scheduler/scheduler_config.json");
        if sched.exists() {
            let sched = crate::engine::diffusion::schedule::SchedulerConfig::from_file(&sched)?;
            v_pred |= sched.prediction() == crate::engine::diffusion::schedule::Prediction::V;
            zero_snr |= sched.rescale_betas_zero_snr;
        }
    }
    let name = file
        .out
        .as_ref()
        .and_then(|o| o.file_stem())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "adapter".into());
    let folders = crate::engine::train::dataset::image_folders(&file.data)?;
    let job = crate::engine::train::kohya_export::KohyaJob {
        model: &model,
        data: &file.data,
        folders: &folders,
        output_name: &name,
        config: &file.config,
        gpus,
        family,
        v_prediction: v_pred,
        zero_terminal_snr: zero_snr,
    };
    for w in crate::engine::train::kohya_export::write(&job, &out)? {
        eprintln!("warning: {w}");
    }
    if let Some(note) = crate::engine::train::kohya_export::gpu_note(&job) {
        println!("{note}");
    }
    println!("wrote {} (dataset.toml, train.sh, sample_prompts.txt, MAPPING.md)", out.display());
    Ok(())
}

fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Attaches `FILE[:WEIGHT]` adapters as `adapter0`, `adapter1`, …. A file only part of which
/// fits the model is refused unless `allow_partial` (`--allow-partial`), and then says so.
fn load_adapters(sd: &mut StableDiffusion, specs: &[String], allow_partial: bool) -> Result<()> {
    for (i, spec) in specs.iter().enumerate() {
        let (file, weight) = parse_adapter_spec(spec)?;
        let name = format!("adapter{i}");
        let report = if allow_partial {
            sd.load_adapter_partial(&name, &file, weight, &BlockWeights::default())?
        } else {
            sd.load_adapter(&name, &file, weight).map_err(|e| {
                let hint = if format!("{e:#}").contains("only part of the adapter fits") {
                    " — --allow-partial loads the layers that fit"
                } else {
                    ""
                };
                anyhow::anyhow!("{e:#}{hint}")
            })?
        };
        if report.partial() {
            eprintln!("note: {}: partial load as asked: {}", file.display(), report.summary());
        }
    }
    Ok(())
}

/// `FILE[:WEIGHT]`; the weight defaults to 1. A colon followed by something that is not a number
/// belongs to the file name.
fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((file, w)) = spec.rsplit_once(':') {
        if let Ok(weight) = w.parse::<f64>() {
            if !weight.is_finite() {
                bail!("adapter weight in `{spec}` must be a finite number");
            }
            return Ok((PathBuf::from(file), weight));
        }
        // `style.safetensors:0,5`: a decimal comma, not part of a file name that exists.
        if !std::path::Path::new(spec).exists() && w.replace(',', ".").parse::<f64>().is_ok() {
            bail!("adapter weight `{w}` in `{spec}` is not a number (use a dot: {})", w.replace(',', "."));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Text from a file (metadata of a downloaded adapter) made safe to print: control characters,
/// which could move the cursor or recolour the terminal, are shown as `\u{…}` escapes.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

fn bench_command(p: &mut lexopt::Parser) -> Result<()> {
    let what = match p.next()? {
        Some(Value(v)) => v.string()?,
        _ => {
            bail!(
                "usage: lora-studio bench unet --config sd1-tiny|sd15|sd21|PATH [--latent N] [--batch B] [--runs N] [--forward-only]"
            )
        }
    };
    if what == "train" {
        let mut opts = bench::TrainBenchOptions { weights: weights(), ..Default::default() };
        while let Some(arg) = p.next()? {
            match arg {
                Long("config") => opts.config = p.value()?.string()?,
                Long("latent") => opts.latent = p.value()?.parse()?,
                Long("batch") => opts.batch = p.value()?.parse()?,
                Long("rank") => opts.rank = p.value()?.parse()?,
                Long("runs") => opts.runs = p.value()?.parse()?,
                Long("checkpointing") => opts.checkpointing = true,
                _ => return Err(arg.unexpected().into()),
            }
        }
        println!("{}", serde_json::to_string(&bench::train_step(&opts, &device())?)?);
        return Ok(());
    }
    if what == "generate" {
        let (mut model, mut steps, mut guidance, mut runs) = (None, 20, 7.5, 5);
        while let Some(arg) = p.next()? {
            match arg {
                Long("model") => model = Some(p.value()?.into()),
                Long("steps") => steps = p.value()?.parse()?,
                Long("guidance") => guidance = p.value()?.parse()?,
                Long("runs") => runs = p.value()?.parse()?,
                _ => return Err(arg.unexpected().into()),
            }
        }
        let model = builtin::resolve_model(model)?;
        println!("{}", serde_json::to_string(&bench::generate(&model, steps, guidance, runs, &device())?)?);
        return Ok(());
    }
    if what == "gemm" {
        let (mut config, mut latent, mut batch, mut runs) = ("sd15".to_string(), 64, 1, 3);
        while let Some(arg) = p.next()? {
            match arg {
                Long("config") => config = p.value()?.string()?,
                Long("latent") => latent = p.value()?.parse()?,
                Long("batch") => batch = p.value()?.parse()?,
                Long("runs") => runs = p.value()?.parse()?,
                _ => return Err(arg.unexpected().into()),
            }
        }
        println!("{}", serde_json::to_string(&bench::gemm(&config, latent, batch, runs, &device())?)?);
        return Ok(());
    }
    if what == "mix" {
        let mut opts = bench::MixBenchOptions { weights: weights(), ..Default::default() };
        while let Some(arg) = p.next()? {
            match arg {
                Long("config") => opts.config = p.value()?.string()?,
                Long("latent") => opts.latent = p.value()?.parse()?,
                Long("batch") => opts.batch = p.value()?.parse()?,
                Long("adapters") => opts.adapters = p.value()?.parse()?,
                Long("rank") => opts.rank = p.value()?.parse()?,
                Long("runs") => opts.runs = p.value()?.parse()?,
                _ => return Err(arg.unexpected().into()),
            }
        }
        println!("{}", serde_json::to_string(&bench::mix(&opts, &device())?)?);
        return Ok(());
    }
    if what != "unet" {
        bail!("unknown benchmark `{what}` (available: unet, train, mix, generate, gemm)");
    }
    let mut opts = bench::UnetBenchOptions { weights: weights(), ..Default::default() };
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => opts.config = p.value()?.string()?,
            Long("latent") => opts.latent = p.value()?.parse()?,
            Long("batch") => opts.batch = p.value()?.parse()?,
            Long("runs") => opts.runs = p.value()?.parse()?,
            Long("forward-only") => opts.forward_only = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let report = bench::unet(&opts, &device())?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
