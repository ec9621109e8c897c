//! The headless front end: `lora-studio <command> [flags]`. Each command parses its flags and
//! calls the engine; any error prints as one line and the process exits non-zero.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use lexopt::prelude::*;

use crate::engine::Result;
use crate::engine::bench;
use crate::engine::formats::{match_layers, read_adapter, summarize};
use crate::engine::pipeline::{GenerateRequest, ModelWeights, StableDiffusion};
use crate::engine::sampler::SamplerKind;
use crate::engine::weights::{read_safetensors, write_safetensors};

const USAGE: &str = "\
LoRA Studio — train, blend and export LoRA adapters for Stable Diffusion

usage:
  lora-studio                      open the window
  lora-studio generate --model PATH --prompt TEXT [--negative TEXT] [--seed N] [--steps N]
                       [--guidance X] [--sampler ddim|euler-a] [--width W --height H] --out FILE.png
  lora-studio forward --model PATH [--adapter FILE[:WEIGHT]]... --inputs IN.safetensors --output OUT.safetensors
  lora-studio adapter info FILE [--model PATH]
  lora-studio bench unet --config sd1-tiny|sd15|sd21|PATH [--latent N] [--batch B] [--runs N]
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
        Some(other) => return Err(other.unexpected().into()),
    };
    match command.as_str() {
        "generate" => generate(&mut parser),
        "forward" => forward(&mut parser),
        "bench" => bench_command(&mut parser),
        "adapter" => adapter_command(&mut parser),
        "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}` (try `lora-studio --help`)"),
    }
}

fn device() -> Device {
    Device::Cpu
}

fn generate(p: &mut lexopt::Parser) -> Result<()> {
    let mut model: Option<PathBuf> = None;
    let mut out: Option<PathBuf> = None;
    let mut req = GenerateRequest {
        prompt: String::new(),
        negative: String::new(),
        seed: 0,
        steps: 20,
        guidance: 7.5,
        sampler: SamplerKind::Ddim,
        width: 0,
        height: 0,
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Long("prompt") => req.prompt = p.value()?.string()?,
            Long("negative") => req.negative = p.value()?.string()?,
            Long("seed") => req.seed = p.value()?.parse()?,
            Long("steps") => req.steps = p.value()?.parse()?,
            Long("guidance") => req.guidance = p.value()?.parse()?,
            Long("sampler") => req.sampler = p.value()?.string()?.parse()?,
            Long("width") => req.width = p.value()?.parse()?,
            Long("height") => req.height = p.value()?.parse()?,
            Long("out") => out = Some(p.value()?.into()),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let model = model.context("--model PATH is required")?;
    let out = out.context("--out FILE.png is required")?;
    let sd = StableDiffusion::load(&model, &device())?;
    let default_side = sd.unet.config.sample_size.unwrap_or(64) * sd.vae.config.downscale();
    if req.width == 0 {
        req.width = default_side;
    }
    if req.height == 0 {
        req.height = default_side;
    }
    let started = std::time::Instant::now();
    let img = sd.generate(&req, &mut |i, n| eprint!("\rstep {i}/{n}"))?;
    eprintln!();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::engine::weights::write_atomic(&out, &png)?;
    println!("wrote {} ({}×{}, {:.2} s)", out.display(), req.width, req.height, started.elapsed().as_secs_f64());
    Ok(())
}

fn forward(p: &mut lexopt::Parser) -> Result<()> {
    let (mut model, mut inputs, mut output): (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) = (None, None, None);
    let mut adapters: Vec<String> = Vec::new();
    while let Some(arg) = p.next()? {
        match arg {
            Long("model") => model = Some(p.value()?.into()),
            Long("inputs") => inputs = Some(p.value()?.into()),
            Long("output") => output = Some(p.value()?.into()),
            Long("adapter") => adapters.push(p.value()?.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let model = model.context("--model PATH is required")?;
    let inputs_path = inputs.context("--inputs IN.safetensors is required")?;
    let output = output.context("--output OUT.safetensors is required")?;
    let dev = device();
    let inputs = read_safetensors(&inputs_path)?;
    let mut sd = StableDiffusion::from_weights(ModelWeights::load(&model, DType::F32, &dev)?)?;
    for (i, spec) in adapters.iter().enumerate() {
        let (file, weight) = parse_adapter_spec(spec)?;
        let report = sd.load_adapter(&format!("adapter{i}"), &file, weight)?;
        if !report.unmatched.is_empty() {
            eprintln!("warning: {}: {}", file.display(), report.summary());
        }
    }
    let mut outputs: HashMap<String, Tensor> = HashMap::new();
    let context = if let Some(ids) = inputs.get("input_ids") {
        let emb = sd.text_encoder.forward(&ids.to_device(&dev)?)?;
        outputs.insert("text_embeddings".into(), emb.clone());
        Some(emb)
    } else {
        inputs.get("encoder_hidden_states").map(|t| t.to_dtype(DType::F32)).transpose()?
    };
    if let Some(sample) = inputs.get("sample") {
        let context = context.context(format!(
            "{}: has `sample` but neither `input_ids` nor `encoder_hidden_states`",
            inputs_path.display()
        ))?;
        let t = inputs.get("timestep").context(format!("{}: `timestep` is missing", inputs_path.display()))?;
        let pred = sd.unet.forward(&sample.to_dtype(DType::F32)?, &t.to_dtype(DType::F32)?, &context)?;
        outputs.insert("noise_pred".into(), pred);
    }
    if outputs.is_empty() {
        bail!("{}: nothing to run (expected `input_ids` and/or `sample` + `timestep`)", inputs_path.display());
    }
    write_safetensors(&output, &outputs, None)?;
    let mut names: Vec<_> = outputs.keys().cloned().collect();
    names.sort();
    println!("wrote {} ({})", output.display(), names.join(", "));
    Ok(())
}

fn adapter_command(p: &mut lexopt::Parser) -> Result<()> {
    let what = match p.next()? {
        Some(Value(v)) => v.string()?,
        _ => bail!("usage: lora-studio adapter info FILE [--model PATH]"),
    };
    match what.as_str() {
        "info" => adapter_info(p),
        other => bail!("unknown adapter command `{other}` (available: info)"),
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
    println!("naming:     {}", s.naming);
    println!("layers:     {}", s.layers);
    let algos: Vec<String> = s.algorithms.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    println!("algorithm:  {}", algos.join(", "));
    if let Some(layout) = &s.glora_layout {
        println!("GLoRA layout: {layout}");
    }
    println!("base model: {} (guessed from shapes)", s.family);
    for (k, v) in &s.ranks {
        println!("strength:   {k} on {v} layers");
    }
    for (k, v) in &s.targets {
        println!("targets:    {k}: {v} layers");
    }
    for (k, v) in &s.metadata {
        let v = if v.len() > 120 {
            format!("{}…", &v[..v.char_indices().nth(120).map(|(i, _)| i).unwrap_or(v.len())])
        } else {
            v.clone()
        };
        println!("metadata:   {k} = {v}");
    }
    if let Some(model) = model {
        let mut sd = StableDiffusion::load(&model, &device())?;
        match match_layers(&parsed, &sd.module_index()) {
            Ok((_, report)) => println!("with {}: {}", model.display(), report.summary()),
            Err(e) => println!("with {}: {e:#}", model.display()),
        }
    }
    Ok(())
}

/// `FILE[:WEIGHT]`; the weight defaults to 1. A colon followed by something that is not a number
/// belongs to the file name.
fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((file, w)) = spec.rsplit_once(':')
        && let Ok(weight) = w.parse::<f64>()
    {
        if !weight.is_finite() {
            bail!("adapter weight in `{spec}` must be a finite number");
        }
        return Ok((PathBuf::from(file), weight));
    }
    Ok((PathBuf::from(spec), 1.0))
}

fn bench_command(p: &mut lexopt::Parser) -> Result<()> {
    let what = match p.next()? {
        Some(Value(v)) => v.string()?,
        _ => {
            bail!("usage: lora-studio bench unet --config sd1-tiny|sd15|sd21|PATH [--latent N] [--batch B] [--runs N]")
        }
    };
    if what != "unet" {
        bail!("unknown benchmark `{what}` (available: unet)");
    }
    let mut opts = bench::UnetBenchOptions::default();
    while let Some(arg) = p.next()? {
        match arg {
            Long("config") => opts.config = p.value()?.string()?,
            Long("latent") => opts.latent = p.value()?.parse()?,
            Long("batch") => opts.batch = p.value()?.parse()?,
            Long("runs") => opts.runs = p.value()?.parse()?,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let report = bench::unet(&opts, &device())?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
