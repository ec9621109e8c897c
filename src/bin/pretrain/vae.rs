//! Stage 1 of the recipe: the VAE, trained from scratch on synthetic scenes.

use super::*;

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(super) struct VaeStats {
    pub(super) steps: usize,
    pub(super) batch: usize,
    pub(super) seconds: f64,
    pub(super) first_loss: f32,
    pub(super) final_loss: f32,
    pub(super) scaling_factor: f64,
    pub(super) parameters: usize,
}

pub(super) fn vae_dir(o: &Options) -> PathBuf {
    o.work.join("vae")
}

pub(super) fn train_vae(o: &Options) -> Result<VaeStats> {
    let device = Device::Cpu;
    let (mut config, mut weights) = match &o.vae_init {
        Some(dir) => {
            let config = VaeConfig::from_file(&dir.join("config.json"))?;
            let weights =
                WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)?;
            println!("vae: continuing from {}", dir.display());
            (config, weights)
        }
        None => {
            let config = vae_config(o)?;
            let shapes = tensor_shapes(|m| AutoencoderKL::load(&config, m).map(|_| ()))?;
            let mut rng = Rng::new(o.seed ^ 0x7ae);
            let resnet_out = |n: &str| n.contains("resnets.") && n.ends_with("conv2.weight");
            (config.clone(), initialise(&shapes, &resnet_out, &mut rng, "new VAE")?)
        }
    };
    let mut total = o.vae_steps;
    let decoder_only = o.vae_decoder_only;
    let vars =
        weights.make_trainable(|n| !decoder_only || n.starts_with("decoder.") || n.starts_with("post_quant_conv."))?;
    let parameters: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let vae = AutoencoderKL::load(&config, &weights)?;
    let mut opt = AdamW::new(vars)?;
    println!(
        "vae: {parameters} parameters, blocks {:?}, {} steps of batch {} ({}px crops)",
        config.block_out_channels,
        o.vae_steps,
        o.vae_batch,
        if o.vae_crop == 0 { o.size } else { o.vae_crop.min(o.size) }
    );
    let mut scenes = SceneStream::new(o.seed ^ 0x5ce7e);
    let mut crop_rng = Rng::new(o.seed ^ 0xc0);
    let start = Instant::now();
    let (mut first, mut last, mut window) = (f32::NAN, f32::NAN, Vec::new());
    let mut done = 0;
    let mut step = 0;
    while step < total {
        let crop = if o.vae_crop == 0 || o.vae_crop >= o.size { o.size } else { o.vae_crop / 4 * 4 };
        let images: Vec<_> = (0..o.vae_batch)
            .map(|_| {
                let img = scenes.next().unwrap().render(o.size);
                let (x, y) =
                    (crop_rng.below((o.size - crop) as usize + 1), crop_rng.below((o.size - crop) as usize + 1));
                image::imageops::crop_imm(&img, x as u32, y as u32, crop, crop).to_image()
            })
            .collect();
        let t_fwd = Instant::now();
        let x = images_to_tensor(&images, &device)?;
        let z = if decoder_only { vae.encode_mean(&x)?.detach() } else { vae.encode_mean(&x)? };
        let recon = vae.decode(&z)?;
        let mse = recon.sub(&x)?.sqr()?.mean_all()?;
        let loss = (&mse + (z.sqr()?.mean_all()? * 1e-4)?)?;
        let lr = lr_at(o.vae_lr, step, 50.min(o.vae_steps / 10 + 1), total);
        let value = mse.to_scalar::<f32>()?;
        let fwd_s = t_fwd.elapsed().as_secs_f64();
        let gnorm = opt.step(&loss, lr)?;
        if step < 2 {
            println!(
                "vae step {}: forward {fwd_s:.2}s, backward + update {:.2}s",
                step + 1,
                t_fwd.elapsed().as_secs_f64() - fwd_s
            );
        }
        if step == 0 {
            first = value;
        }
        window.push(value);
        done = step + 1;
        step += 1;
        if let Some(m) = o.vae_minutes
            && done == 20
        {
            let s = start.elapsed().as_secs_f64();
            total = done + ((m * 60.0 - s).max(0.0) * done as f64 / s * 0.97) as usize;
            println!("vae: {:.3} step/s → {total} steps fit in {m} minutes", done as f64 / s);
        }
        if done % o.log_every == 0 || done == total {
            last = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let s = start.elapsed().as_secs_f64();
            println!(
                "vae step {done}/{} mse {last:.5} (psnr≈{:.1} dB) grad {gnorm:.3} lr {lr:.1e} elapsed {s:.1}s ({:.2} step/s)",
                total,
                10.0 * (4.0 / last as f64).log10(),
                done as f64 / s
            );
        }
        if over_time(start, o.vae_minutes) {
            println!("vae: time limit reached at step {done}");
            break;
        }
    }
    if !window.is_empty() {
        last = window.iter().sum::<f32>() / window.len() as f32;
    }
    let seconds = start.elapsed().as_secs_f64();
    // Latent scaling factor: 1 / std of the latents of held-out scenes.
    let mut held = SceneStream::new(VAE_EVAL_SEED);
    let mut zs = Vec::new();
    for _ in 0..8 {
        let images: Vec<_> = (0..16).map(|_| held.next().unwrap().render(o.size)).collect();
        zs.push(vae.encode_mean(&images_to_tensor(&images, &device)?)?.detach().flatten_all()?);
    }
    let z = Tensor::cat(&zs, 0)?;
    let mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let std = ((z.sqr()?.mean_all()?.to_scalar::<f32>()? as f64) - mean * mean).max(1e-12).sqrt();
    config.scaling_factor = 1.0 / std;
    println!("vae: latent mean {mean:.4} std {std:.4} → scaling factor {:.5}", config.scaling_factor);
    let dir = vae_dir(o);
    std::fs::create_dir_all(&dir)?;
    let tensors: HashMap<String, Tensor> =
        weights.names().map(|n| (n.clone(), weights.tensor(n).unwrap().detach())).collect();
    write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, None)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let stats = VaeStats {
        steps: done,
        batch: o.vae_batch,
        seconds,
        first_loss: first,
        final_loss: last,
        scaling_factor: config.scaling_factor,
        parameters,
    };
    std::fs::write(dir.join("stats.json"), serde_json::to_string_pretty(&stats)?)?;
    println!("vae: {done} steps in {seconds:.0}s, mse {first:.4} → {last:.4}; written to {}", dir.display());
    Ok(stats)
}

pub(super) fn load_trained_vae(o: &Options) -> Result<(VaeConfig, WeightMap)> {
    let dir = vae_dir(o);
    let config = VaeConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("no trained VAE in {} (run `pretrain vae` first)", dir.display()))?;
    let weights = WeightMap::load(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)?;
    Ok((config, weights))
}
