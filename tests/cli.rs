//! The `lora-studio` binary as a user runs it: outputs on the fixture model, and one-line errors
//! with a non-zero exit (never a panic) for bad paths and files.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use lora_studio::engine::io::weights::read_safetensors;

fn studio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-studio")).args(args).output().expect("run lora-studio")
}

/// A failed run: exit code 1, exactly one line on stderr that mentions `needle`, and no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "`{needle}` in: {stderr}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn forward_reproduces_reference_outputs() {
    let dir = tempdir("forward");
    let out = dir.join("out.safetensors");
    let model = sd1_tiny().join("model");
    let inputs = sd1_tiny().join("inputs.safetensors");
    let run = studio(&["forward", "--model", p(&model), "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = read_safetensors(&out).unwrap();
    let r = reference();
    assert_close("text_embeddings", &got["text_embeddings"], &r["text_embeddings"]);
    assert_close("noise_pred", &got["noise_pred"], &r["noise_pred"]);

    // With both fixture adapters, as diffusers computed them.
    let a = format!("{}:0.5", p(&sd1_tiny().join("lora_a_kohya.safetensors")));
    let b = format!("{}:0.8", p(&sd1_tiny().join("lora_b_peft.safetensors")));
    let run = studio(&[
        "forward",
        "--model",
        p(&model),
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--inputs",
        p(&inputs),
        "--output",
        p(&out),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_close("noise_pred_a05_b08", &read_safetensors(&out).unwrap()["noise_pred"], &r["noise_pred_a05_b08"]);
}

/// SDXL on the command line: `forward` writes diffusers' `prompt_embeds`, `pooled_prompt_embeds`
/// and `noise_pred` (checked with `--check` against diffusers' references, and with a kohya SDXL
/// LoRA), and `generate` draws with it.
#[test]
fn forward_and_generate_run_an_sdxl_folder() {
    let dir = tempdir("forward-sdxl");
    let sdxl = fixtures_dir().join("sdxl-tiny");
    let (model, inputs, reference) =
        (sdxl.join("model"), sdxl.join("inputs.safetensors"), sdxl.join("reference.safetensors"));
    let out = dir.join("out.safetensors");
    let run = studio(&[
        "forward",
        "--model",
        p(&model),
        "--inputs",
        p(&inputs),
        "--output",
        p(&out),
        "--check",
        p(&reference),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    for name in ["prompt_embeds", "pooled_prompt_embeds", "noise_pred"] {
        assert!(stdout.contains(&format!("{name}: max|ours - ref|")), "{name} checked: {stdout}");
    }
    let lora = format!("{}:0.7", p(&sdxl.join("lora_kohya.safetensors")));
    let run =
        studio(&["forward", "--model", p(&model), "--adapter", &lora, "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (got, r) = (read_safetensors(&out).unwrap(), read_safetensors(&reference).unwrap());
    assert_close("prompt_embeds_kohya07", &got["prompt_embeds"], &r["prompt_embeds_kohya07"]);
    assert_close("pooled_kohya07", &got["pooled_prompt_embeds"], &r["pooled_kohya07"]);
    assert_close("noise_pred_kohya07", &got["noise_pred"], &r["noise_pred_kohya07"]);

    // Blended into one kohya file (rank 4 + 2 holds the mix exactly), and folded into the model.
    let blend = dir.join("blend.safetensors");
    let (k05, p08) = (
        format!("{}:0.5", p(&sdxl.join("lora_kohya.safetensors"))),
        format!("{}:0.8", p(&sdxl.join("lora_peft.safetensors"))),
    );
    let run = studio(&["adapter", "blend", &k05, &p08, "--model", p(&model), "--rank", "6", "--out", p(&blend)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let written = read_safetensors(&blend).unwrap();
    for prefix in ["lora_te1_", "lora_te2_", "lora_unet_"] {
        assert!(written.keys().any(|k| k.starts_with(prefix)), "kohya SDXL naming: {prefix}");
    }
    let run =
        studio(&["forward", "--model", p(&model), "--adapter", p(&blend), "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = read_safetensors(&out).unwrap();
    assert_close("pooled from the blend", &got["pooled_prompt_embeds"], &r["pooled_kohya05_peft08"]);
    assert_close("noise_pred from the blend", &got["noise_pred"], &r["noise_pred_kohya05_peft08"]);
    let merged = dir.join("merged");
    let run = studio(&["adapter", "merge", &lora, "--model", p(&model), "--out", p(&merged)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = studio(&["forward", "--model", p(&merged), "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = read_safetensors(&out).unwrap();
    assert_close("pooled from the merged model", &got["pooled_prompt_embeds"], &r["pooled_kohya07"]);
    assert_close("noise_pred from the merged model", &got["noise_pred"], &r["noise_pred_kohya07"]);

    // SDXL's size numbers given for an SD 1.x model are refused, not ignored.
    let mut sd1_inputs = read_safetensors(&sd1_tiny().join("inputs.safetensors")).unwrap();
    sd1_inputs.insert("add_time_ids".into(), r["add_time_ids"].clone());
    let odd = dir.join("sd1-with-sizes.safetensors");
    lora_studio::engine::io::weights::write_safetensors(&odd, &sd1_inputs, None).unwrap();
    let run = studio(&["forward", "--model", p(&sd1_tiny().join("model")), "--inputs", p(&odd), "--output", p(&out)]);
    assert_one_line_error(&run, "no pooled text embedding");

    let png = dir.join("sdxl.png");
    let run = studio(&[
        "generate",
        "--model",
        p(&model),
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        p(&png),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (32, 32));
}

#[test]
fn generate_writes_a_png() {
    let dir = tempdir("generate");
    let model = sd1_tiny().join("model");
    let mut pictures = Vec::new();
    for sampler in ["ddim", "euler-a"] {
        // Each sampler its own file, so neither run can pass on the other's picture.
        let png = dir.join(format!("image-{sampler}.png"));
        let run = studio(&[
            "generate",
            "--model",
            p(&model),
            "--prompt",
            "a red circle",
            "--steps",
            "4",
            "--seed",
            "7",
            "--sampler",
            sampler,
            "--out",
            p(&png),
        ]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32), "fixture: sample_size 16 × VAE factor 2");
        pictures.push(img.to_rgb8().into_raw());
    }
    assert_ne!(pictures[0], pictures[1], "DDIM and Euler ancestral draw different pictures");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = tempdir("errors");
    let out = dir.join("x.png");
    let generate = |model: &Path| studio(&["generate", "--model", p(model), "--prompt", "x", "--out", p(&out)]);

    assert_one_line_error(&generate(&dir.join("does-not-exist")), "no such file or folder");

    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 pickled").unwrap();
    assert_one_line_error(&generate(&ckpt), "not supported: pickled");

    let truncated = dir.join("truncated.safetensors");
    let bytes = std::fs::read(sd1_tiny().join("model/unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&generate(&truncated), "truncated.safetensors");

    // A copy of the fixture model whose UNet config lacks a required field.
    let broken = dir.join("broken-model");
    copy_dir(&sd1_tiny().join("model"), &broken);
    let cfg = broken.join("unet/config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("block_out_channels");
    std::fs::write(&cfg, json.to_string()).unwrap();
    assert_one_line_error(&generate(&broken), "missing field `block_out_channels`");

    // A model folder missing a component.
    std::fs::remove_dir_all(broken.join("vae")).unwrap();
    assert_one_line_error(&generate(&broken), "missing its `vae` component");

    assert!(!out.exists(), "no output file after a failure");
}

#[test]
fn blend_at_full_rank_and_merge_into_base_reproduce_the_live_mix() {
    let dir = tempdir("blend");
    let model = sd1_tiny().join("model");
    let inputs = sd1_tiny().join("inputs.safetensors");
    let a = sd1_tiny().join("lora_a_kohya.safetensors");
    let b = sd1_tiny().join("lora_b_peft.safetensors");
    let r = reference();

    // Rank 6 = 4 + 2 holds the mix exactly; the blend file alone must give diffusers' A·0.5 + B·0.8.
    let blend = dir.join("blend.safetensors");
    let (a05, b08) = (format!("{}:0.5", p(&a)), format!("{}:0.8", p(&b)));
    let run = studio(&["adapter", "blend", &a05, &b08, "--model", p(&model), "--rank", "6", "--out", p(&blend)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("kept energy 1.000000"));
    // A blend written over one of its own inputs would replace the user's file: refused.
    let a_copy = dir.join("a.safetensors");
    std::fs::copy(&a, &a_copy).unwrap();
    let before = std::fs::read(&a_copy).unwrap();
    let onto_input = format!("{}:0.5", p(&a_copy));
    let run =
        studio(&["adapter", "blend", &onto_input, &b08, "--model", p(&model), "--rank", "6", "--out", p(&a_copy)]);
    assert_one_line_error(&run, "this is one of the blended adapters");
    assert_eq!(std::fs::read(&a_copy).unwrap(), before, "the input is untouched");
    let out = dir.join("out.safetensors");
    let run =
        studio(&["forward", "--model", p(&model), "--adapter", p(&blend), "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_close(
        "noise_pred_a05_b08 from the blend",
        &read_safetensors(&out).unwrap()["noise_pred"],
        &r["noise_pred_a05_b08"],
    );

    // Adapter A folded into a copy of the base model at 0.7.
    let merged = dir.join("merged-model");
    let a07 = format!("{}:0.7", p(&a));
    let run = studio(&["adapter", "merge", &a07, "--model", p(&model), "--out", p(&merged)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = studio(&["forward", "--model", p(&merged), "--inputs", p(&inputs), "--output", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = read_safetensors(&out).unwrap();
    assert_close("text_embeddings_a07 from the merged model", &got["text_embeddings"], &r["text_embeddings_a07"]);
    assert_close("noise_pred_a07 from the merged model", &got["noise_pred"], &r["noise_pred_a07"]);
}

#[test]
fn adapter_of_the_wrong_shape_is_refused_with_a_report() {
    use candle_core::{Device, Tensor};
    let dir = tempdir("wrong-shape");
    // A kohya file whose cross-attention keys expect a 1024-wide text context (SD 2.x).
    let mut tensors = std::collections::HashMap::new();
    for block in ["down_blocks_0_attentions_0", "up_blocks_1_attentions_0"] {
        let name = format!("lora_unet_{block}_transformer_blocks_0_attn2_to_k");
        tensors.insert(
            format!("{name}.lora_down.weight"),
            Tensor::zeros((4, 1024), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            format!("{name}.lora_up.weight"),
            Tensor::zeros((32, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let file = dir.join("sd2.safetensors");
    lora_studio::engine::io::weights::write_safetensors(&file, &tensors, None).unwrap();
    let out = dir.join("out.safetensors");
    let run = studio(&[
        "forward",
        "--model",
        p(&sd1_tiny().join("model")),
        "--adapter",
        p(&file),
        "--inputs",
        p(&sd1_tiny().join("inputs.safetensors")),
        "--output",
        p(&out),
    ]);
    assert_one_line_error(&run, "2 have the wrong shape");
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("cross-attention 1024 (SD 2.x), this model's is 32"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!out.exists());
}

#[test]
fn train_then_info_then_generate_with_the_adapter() {
    let dir = tempdir("train");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2u8 {
        image::RgbImage::from_fn(40, 40, |x, _| image::Rgb([i * 100, x as u8 * 5, 90]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        std::fs::write(data.join(format!("{i}.txt")), "stripes").unwrap();
    }
    std::fs::write(data.join("junk.png"), "junk").unwrap();
    let adapter = dir.join("out/style.safetensors");
    let model = sd1_tiny().join("model");
    let run = studio(&[
        "train",
        "--model",
        p(&model),
        "--data",
        p(&data),
        "--out",
        p(&adapter),
        "--steps",
        "4",
        "--save-every",
        "2",
        "--resolution",
        "32",
        "--algo",
        "glora",
        "--targets",
        "attention",
        "--trigger",
        "zxc",
        "--timestep-bias",
        "later",
        "--timestep-bias-multiplier",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("junk.png: skipped"), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("validation loss") && stdout.contains("← best"), "{stdout}");

    let sideways = studio(&["train", "--timestep-bias", "sideways", "--data", p(&data), "--out", p(&adapter)]);
    assert_one_line_error(&sideways, "--timestep-bias: `sideways` (none, earlier or later)");

    let info = studio(&["adapter", "info", p(&adapter), "--model", p(&model)]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success());
    assert!(text.contains("glora ×32") && text.contains("32 of 32 adapter layers match"), "{text}");
    assert!(text.contains("lora_studio_trigger_words = zxc"), "{text}");

    let png = dir.join("styled.png");
    let with = format!("{}:1.0", p(&adapter));
    let run = studio(&[
        "generate",
        "--model",
        p(&model),
        "--adapter",
        &with,
        "--prompt",
        "zxc",
        "--steps",
        "3",
        "--out",
        p(&png),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(png.exists());
}

#[test]
fn export_job_writes_a_kohya_job_with_the_same_settings() {
    let dir = tempdir("export-job");
    let toml_file = dir.join("train.toml");
    std::fs::write(
        &toml_file,
        format!(
            "model = {:?}\ndata = [{:?}]\nout = \"style.safetensors\"\nalgorithm = \"glora\"\nrank = 8\nalpha = 4.0\nsteps = 300\n\
             lr_schedule = \"cosine\"\nmin_snr_gamma = 5.0\n[dataset]\nresolution = 512\nflip = true\ntrigger = \"sks\"\n",
            p(&sd1_tiny().join("model")),
            p(&dir)
        ),
    )
    .unwrap();
    let out = dir.join("kohya");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&out), "--gpus", "2"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(out.join("train.sh")).unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("2 GPUs: 150 steps of 2 images instead of 300 of 1"), "{stdout}");
    for expected in [
        "--multi_gpu",
        "--num_processes 2",
        "--network_module lycoris.kohya",
        "algo=glora",
        "--network_dim 8",
        "--network_alpha 4",
        // Two GPUs take two batches a step: half the steps, the same images.
        "--max_train_steps 150",
        "--lr_scheduler cosine",
        "--min_snr_gamma 5",
        "--output_name style",
    ] {
        assert!(script.contains(expected), "`{expected}` in:\n{script}");
    }
    assert!(
        Command::new("bash").arg("-n").arg(out.join("train.sh")).status().unwrap().success(),
        "train.sh is valid bash"
    );
    // An ε-prediction base gets neither schedule flag; the built-in model's schedule needs both.
    assert!(!script.contains("--v_parameterization") && !script.contains("--zero_terminal_snr"), "{script}");
    let zsnr = dir.join("kohya-zsnr");
    let run =
        studio(&["export-job", "--config", p(&toml_file), "--out", p(&zsnr), "--v-prediction", "--zero-terminal-snr"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(zsnr.join("train.sh")).unwrap();
    assert!(script.contains("--v_parameterization") && script.contains("--zero_terminal_snr"), "{script}");
    let dataset: toml::Value = toml::from_str(&std::fs::read_to_string(out.join("dataset.toml")).unwrap()).unwrap();
    let subset = &dataset["datasets"][0]["subsets"][0];
    assert_eq!(dataset["datasets"][0]["resolution"].as_integer(), Some(512));
    assert_eq!(subset["flip_aug"].as_bool(), Some(true));
    assert_eq!(subset["caption_prefix"].as_str(), Some("sks,"));
    assert!(out.join("MAPPING.md").exists());
    // train.toml's `epochs` goes to sd-scripts as epochs, and a `N_words` folder as its repeats.
    let data = dir.join("4_red disc");
    std::fs::create_dir_all(&data).unwrap();
    let text =
        std::fs::read_to_string(&toml_file).unwrap().replace(&format!("{:?}", p(&dir)), &format!("{:?}", p(&data)));
    std::fs::write(&toml_file, text.replace("steps = 300\n", "epochs = 10\n")).unwrap();
    let by_epochs = dir.join("kohya-epochs");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&by_epochs)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(by_epochs.join("train.sh")).unwrap();
    assert!(script.contains("--max_train_epochs 10") && !script.contains("--max_train_steps"), "{script}");
    let dataset: toml::Value =
        toml::from_str(&std::fs::read_to_string(by_epochs.join("dataset.toml")).unwrap()).unwrap();
    let subset = &dataset["datasets"][0]["subsets"][0];
    assert_eq!(subset["num_repeats"].as_integer(), Some(4));
    assert_eq!(subset["class_tokens"].as_str(), Some("red disc"));
}

/// export-job prints what sd-scripts would train differently as warnings and still writes the
/// job; a job sd-scripts cannot run is refused in one line naming the option, and nothing is written.
#[test]
fn export_job_warns_and_refuses_in_words() {
    let dir = tempdir("export-job-checks");
    let toml_file = dir.join("train.toml");
    let head =
        format!("model = {:?}\ndata = [{:?}]\nout = \"style.safetensors\"\n", p(&sd1_tiny().join("model")), p(&dir));
    std::fs::write(&toml_file, format!("{head}min_snr_gamma = 5.0\n")).unwrap();
    let out = dir.join("job");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&out), "--zero-terminal-snr"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("warning: `min_snr_gamma` with a zero-terminal-SNR model"), "{stderr}");
    assert!(out.join("train.sh").exists());
    std::fs::write(&toml_file, format!("{head}[dataset]\nresolution = 128\nbuckets = true\n")).unwrap();
    let refused = dir.join("refused");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&refused)]);
    assert_one_line_error(&run, "resolution 128 with buckets");
    assert!(!refused.exists(), "a refused job writes nothing");
    let builtin = lora_studio::engine::builtin::model_dir().expect("the built-in model");
    let text = format!("model = {:?}\ndata = [{:?}]\nout = \"style.safetensors\"\n", p(&builtin), p(&dir));
    std::fs::write(&toml_file, text).unwrap();
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&refused)]);
    assert_one_line_error(&run, "the built-in model cannot be trained by sd-scripts");
    assert!(!refused.exists(), "a refused job writes nothing");
}

/// sd-scripts reads a subset's own folder, not its subfolders: a nested image folder is a subset
/// of its own, with its own repeats.
#[test]
fn export_job_writes_a_subset_for_each_nested_folder() {
    let dir = tempdir("export-job-nested");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("3_red disc")).unwrap();
    std::fs::write(data.join("a.png"), b"").unwrap();
    std::fs::write(data.join("3_red disc/b.png"), b"").unwrap();
    let toml_file = dir.join("train.toml");
    let text =
        format!("model = {:?}\ndata = [{:?}]\nout = \"style.safetensors\"\n", p(&sd1_tiny().join("model")), p(&data));
    std::fs::write(&toml_file, text).unwrap();
    let out = dir.join("job");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let dataset: toml::Value = toml::from_str(&std::fs::read_to_string(out.join("dataset.toml")).unwrap()).unwrap();
    let subsets = dataset["datasets"][0]["subsets"].as_array().unwrap();
    let dirs: Vec<(&str, i64)> =
        subsets.iter().map(|s| (s["image_dir"].as_str().unwrap(), s["num_repeats"].as_integer().unwrap())).collect();
    let nested = data.join("3_red disc");
    assert_eq!(dirs, [(p(&nested), 3), (p(&data), 1)], "{dataset:?}");
}

/// The optimiser is chosen with `--optimizer` or train.toml's `optimizer` key (its own settings in
/// `[prodigy]` / `[adafactor]`): the choice reaches the kohya job; a wrong name is refused in one line.
#[test]
fn the_optimizer_is_chosen_on_the_command_line_and_in_train_toml() {
    let dir = tempdir("optimizer-choice");
    let run = studio(&["train", "--optimizer", "sgd", "--data", p(&dir), "--out", p(&dir.join("x.safetensors"))]);
    assert_one_line_error(&run, "unknown optimizer `sgd` (adamw, prodigy or adafactor)");
    let job = |name: &str, body: &str| {
        let toml_file = dir.join(format!("{name}.toml"));
        let head = format!(
            "model = {:?}\ndata = [{:?}]\nout = \"style.safetensors\"\n",
            p(&sd1_tiny().join("model")),
            p(&dir)
        );
        std::fs::write(&toml_file, head + body).unwrap();
        let out = dir.join(name);
        (studio(&["export-job", "--config", p(&toml_file), "--out", p(&out)]), out)
    };
    let (run, out) = job("prodigy", "optimizer = \"prodigy\"\nlearning_rate = 1.0\n[prodigy]\nd_coef = 0.5\n");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(out.join("train.sh")).unwrap();
    assert!(script.contains("--optimizer_type Prodigy") && script.contains(" d_coef=0.5 "), "{script}");
    let (run, out) = job("adafactor", "optimizer = \"adafactor\"\n[adafactor]\nrelative_step = true\n");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(out.join("train.sh")).unwrap();
    assert!(script.contains("--lr_scheduler adafactor") && script.contains(" relative_step=True "), "{script}");
    let (run, _) = job("typo", "optimizer = \"prodigy\"\n[prodigy]\nd_coeff = 0.5\n");
    assert_one_line_error(&run, "did you mean `prodigy.d_coef`?");
}

#[test]
fn without_model_every_command_uses_the_built_in_model_and_its_example_styles() {
    let dir = tempdir("builtin");
    let png = dir.join("x.png");
    let style = lora_studio::engine::builtin::example_adapters();
    assert_eq!(style.len(), 2, "two example adapters in assets/examples: {style:?}");
    let adapter = format!("{}:0.8", p(&style[0]));
    let out = studio(&[
        "generate",
        "--prompt",
        "a red circle on a blue background",
        "--steps",
        "4",
        "--adapter",
        &adapter,
        "--out",
        p(&png),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64), "the model's own size");
    // Not a blank or constant picture.
    let rgb = img.to_rgb8();
    let first = rgb.get_pixel(0, 0);
    assert!(rgb.pixels().any(|q| q != first));
    // The format doctor knows the example styles are for the built-in model, and they fit it.
    let info =
        studio(&["adapter", "info", p(&style[0]), "--model", p(&lora_studio::engine::builtin::model_dir().unwrap())]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("base model: LoRA Studio built-in"), "{text}");
    assert!(text.contains(": 118 of 118 adapter layers match the model"), "{text}");
    // An override folder without a model falls back to the next place searched.
    let out = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args(["generate", "--prompt", "x", "--out", p(&dir.join("y.png"))])
        .env(lora_studio::engine::builtin::ASSETS_ENV, p(&dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `--device` goes anywhere on the command line; a device this build lacks is refused in words
/// (with how to get it), never replaced by the CPU without a word.
#[test]
fn device_flag_picks_the_device_or_says_why_not() {
    let model = sd1_tiny().join("model");
    let inputs = sd1_tiny().join("inputs.safetensors");
    let dir = tempdir("device");
    let out = dir.join("out.safetensors");
    let args = |device: &str| {
        vec![
            "forward".to_string(),
            "--device".into(),
            device.into(),
            "--model".into(),
            model.display().to_string(),
            "--inputs".into(),
            inputs.display().to_string(),
            "--output".into(),
            out.display().to_string(),
        ]
    };
    let run = |a: Vec<String>| studio(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let ok = run(args("cpu"));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    if !cfg!(feature = "cuda") {
        let refused = run(args("cuda:0"));
        assert!(!refused.status.success());
        let e = String::from_utf8_lossy(&refused.stderr);
        assert!(e.contains("no cuda support") && e.contains("--features cuda"), "{e}");
    }
    let unknown = run(args("tpu"));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown device `tpu`"));
}

/// `--weights f16` (anywhere on the line) runs the model with f16 weights, and `forward --check`
/// measures the outputs against a reference: within 1e-2 of diffusers' f32 outputs, and an error
/// naming the gap when asked for more than f16 weights can give.
#[test]
fn weights_flag_and_forward_check() {
    let dir = tempdir("weights-flag");
    let (model, inputs) = (sd1_tiny().join("model"), sd1_tiny().join("inputs.safetensors"));
    let (out, reference_file) = (dir.join("out.safetensors"), sd1_tiny().join("reference.safetensors"));
    let forward = |weights: &str, tolerance: &str| {
        studio(&[
            "--weights",
            weights,
            "forward",
            "--model",
            p(&model),
            "--inputs",
            p(&inputs),
            "--output",
            p(&out),
            "--check",
            p(&reference_file),
            "--tolerance",
            tolerance,
        ])
    };
    let ok = forward("f16", "1e-2");
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(said.contains("noise_pred: max|ours - ref| / max|ref| = "), "{said}");
    let r = reference();
    let got = read_safetensors(&out).unwrap();
    let gap = |name: &str| {
        let f64 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let d = (f64(&got[name]) - f64(&r[name])).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    };
    assert!(gap("noise_pred") > 1e-6, "f16 weights are really used: the outputs move off the f32 ones");
    assert_one_line_error(&forward("f16", "1e-6"), "outputs differ from");
    // An output that would replace the reference (or the inputs) is refused before any work.
    let reference_copy = dir.join("reference.safetensors");
    std::fs::copy(&reference_file, &reference_copy).unwrap();
    let inputs_copy = dir.join("inputs.safetensors");
    std::fs::copy(&inputs, &inputs_copy).unwrap();
    let before = std::fs::read(&reference_copy).unwrap();
    for (output, flag) in [(&reference_copy, "--check"), (&inputs_copy, "--inputs")] {
        let run = studio(&[
            "forward",
            "--model",
            p(&model),
            "--inputs",
            p(&inputs_copy),
            "--output",
            p(output),
            "--check",
            p(&reference_copy),
        ]);
        assert_one_line_error(&run, &format!("this is the {flag} file"));
    }
    assert_eq!(std::fs::read(&reference_copy).unwrap(), before, "the reference is untouched");
    assert_one_line_error(&forward("f8", "1e-2"), "--weights: `f8` is not one of auto, f16, bf16, f32");
}

/// `export-job` on an SDXL model writes sd-scripts' SDXL job: `sdxl_train_network.py`, the VAE
/// kept out of half precision, cached text-encoder outputs for a UNet-only run, no `--v2`.
/// A LyCORIS job reads a preset file naming our layers, from the job's folder, however the shell
/// expands the script.
#[test]
fn export_job_writes_the_lycoris_preset_of_our_targets() {
    let dir = tempdir("export-job-preset");
    let toml_file = dir.join("train.toml");
    std::fs::write(
        &toml_file,
        format!(
            "model = {:?}\ndata = [{:?}]\nalgorithm = \"loha\"\ntargets = \"cross-attention\"\n",
            p(&sd1_tiny().join("model")),
            p(&dir)
        ),
    )
    .unwrap();
    let out = dir.join("kohya");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&out)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let preset: toml::Value =
        toml::from_str(&std::fs::read_to_string(out.join("lycoris_preset.toml")).unwrap()).unwrap();
    let names: Vec<&str> = preset["unet_target_name"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, ["*.attn2.to_q", "*.attn2.to_k", "*.attn2.to_v", "*.attn2.to_out.0"]);
    let script = std::fs::read_to_string(out.join("train.sh")).unwrap();
    let args = script.lines().find(|l| l.trim_start().starts_with("--network_args")).unwrap();
    let args = args.trim().trim_end_matches('\\');
    let expanded = Command::new("bash").arg("-c").arg(format!("JOB_DIR=/job; printf '%s\\n' {args}")).output().unwrap();
    let expanded = String::from_utf8_lossy(&expanded.stdout);
    assert!(expanded.lines().any(|l| l == "preset=/job/lycoris_preset.toml"), "{args} gives:\n{expanded}");
}

#[test]
fn export_job_writes_the_sdxl_script_for_an_sdxl_model() {
    let dir = tempdir("export-sdxl");
    let model = fixtures_dir().join("sdxl-tiny/model");
    let toml_file = dir.join("train.toml");
    let text =
        format!("model = {:?}\ndata = [{:?}]\nout = {:?}\n", p(&model), p(&dir), p(&dir.join("style.safetensors")));
    std::fs::write(&toml_file, text).unwrap();
    let job = dir.join("job");
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&job)]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(job.join("train.sh")).unwrap();
    for wanted in
        ["sdxl_train_network.py", "--no_half_vae", "--network_train_unet_only", "--cache_text_encoder_outputs"]
    {
        assert!(script.contains(wanted), "{wanted} in {script}");
    }
    assert!(!script.contains("--v2") && !script.contains(" train_network.py"), "{script}");
    // The SD 1.x fixture keeps train_network.py.
    let sd1 = std::fs::read_to_string(&toml_file).unwrap().replace(p(&model), p(&sd1_tiny().join("model")));
    std::fs::write(&toml_file, sd1).unwrap();
    let run = studio(&["export-job", "--config", p(&toml_file), "--out", p(&dir.join("job1"))]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let script = std::fs::read_to_string(dir.join("job1/train.sh")).unwrap();
    assert!(script.contains("/train_network.py") && !script.contains("sdxl_"), "{script}");
}

/// `generate --out x.png` writes the request's parameters into the PNG as A1111 does, adapters as
/// `<lora:name:weight>` with their A1111 short hash.
#[test]
fn generate_writes_its_parameters_into_the_png() {
    let dir = tempdir("generate-parameters");
    let png = dir.join("x.png");
    let style = &lora_studio::engine::builtin::example_adapters()[0];
    let adapter = format!("{}:0.8", p(style));
    let out = studio(&[
        "generate",
        "--prompt",
        "a red circle, on blue",
        "--negative",
        "green",
        "--seed",
        "77",
        "--steps",
        "2",
        "--sampler",
        "euler-a",
        "--guidance",
        "6.5",
        "--width",
        "32",
        "--height",
        "48",
        "--adapter",
        &adapter,
        "--out",
        p(&png),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let params = lora_studio::engine::io::infotext::read_png_parameters(&png).unwrap();
    assert_eq!(params.prompt, "a red circle, on blue");
    assert_eq!(params.negative, "green");
    assert_eq!((params.seed, params.steps, params.cfg_scale), (Some(77), Some(2), Some(6.5)));
    assert_eq!(params.sampler.as_deref(), Some("Euler a"));
    assert_eq!((params.width, params.height), (Some(32), Some(48)));
    assert_eq!(params.model.as_deref(), Some("base"));
    let name = style.file_stem().unwrap().to_str().unwrap();
    let hash = lora_studio::engine::io::infotext::adapter_short_hash(style).unwrap();
    assert_eq!(hash.len(), 12);
    assert_eq!(
        params.adapters,
        vec![lora_studio::engine::io::infotext::AdapterUse {
            name: name.into(),
            weight: 0.8,
            hash: Some(hash.clone())
        }]
    );
    let text = lora_studio::engine::io::infotext::read_png_parameters_text(&png).unwrap();
    assert!(text.starts_with(&format!("a red circle, on blue, <lora:{name}:0.8>\nNegative prompt: green\n")), "{text}");
    assert!(text.ends_with(&format!("Lora hashes: \"{name}: {hash}\"")), "{text}");
}

/// A pasted A1111 prompt works: `<lora:NAME:WEIGHT>` is taken out of the text and loads
/// NAME.safetensors (the example styles, or `--lora-dir`), drawing exactly what `--adapter` does;
/// a name that is nowhere is refused in one line.
#[test]
fn generate_loads_the_lora_tags_of_its_prompt() {
    let dir = tempdir("generate-tags");
    let style = &lora_studio::engine::builtin::example_adapters()[0];
    let name = style.file_stem().unwrap().to_str().unwrap();
    let common = ["generate", "--steps", "2", "--width", "32", "--height", "32", "--seed", "5"];
    let run = |extra: &[&str], png: &Path| {
        let out = studio(&[&common[..], extra, &["--out", p(png)]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        image::open(png).unwrap().to_rgb8()
    };
    let (tagged, flag, other_dir) = (dir.join("tagged.png"), dir.join("flag.png"), dir.join("dir.png"));
    let prompt = format!("a red circle, <lora:{name}:0.5>");
    let by_tag = run(&["--prompt", &prompt], &tagged);
    let by_flag = run(&["--prompt", "a red circle", "--adapter", &format!("{}:0.5", p(style))], &flag);
    assert!(by_tag == by_flag, "the tag draws what --adapter draws");
    let params = lora_studio::engine::io::infotext::read_png_parameters(&tagged).unwrap();
    assert_eq!(params.prompt, "a red circle");
    assert_eq!((params.adapters.len(), params.adapters[0].name.as_str(), params.adapters[0].weight), (1, name, 0.5));

    let lora_dir = dir.join("loras");
    std::fs::create_dir(&lora_dir).unwrap();
    std::fs::copy(style, lora_dir.join("mine.safetensors")).unwrap();
    let by_dir = run(&["--prompt", "a red circle, <lora:mine:0.5>", "--lora-dir", p(&lora_dir)], &other_dir);
    assert!(by_dir == by_flag, "--lora-dir");

    let out = studio(&[&common[..], &["--prompt", "x <lora:nowhere:1>", "--out", p(&dir.join("no.png"))]].concat());
    assert_one_line_error(&out, "<lora:nowhere> in --prompt: no nowhere.safetensors in the built-in example styles");
}
