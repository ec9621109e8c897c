//! Stage 2 of the recipe: the text encoder and UNet, by full fine-tuning on an endless stream
//! of synthetic scenes.

use super::*;

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(super) struct ModelStats {
    pub(super) steps: usize,
    pub(super) batch: usize,
    pub(super) seconds: f64,
    pub(super) scenes_seen: usize,
    pub(super) first_loss: f32,
    pub(super) final_loss: f32,
    pub(super) unet_parameters: usize,
    pub(super) text_parameters: usize,
    pub(super) vae_parameters: usize,
    pub(super) f16_bytes: usize,
    pub(super) text_hidden: usize,
    pub(super) unet_channels: Vec<usize>,
}

/// Writes `count` fresh scenes (PNG + caption) into `dir`, replacing what was there.
pub(super) fn write_pool(dir: &Path, scenes: &mut SceneStream, count: usize, size: u32) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for i in 0..count {
        let s = scenes.next().unwrap();
        s.render(size).save(dir.join(format!("{i:05}.png")))?;
        std::fs::write(dir.join(format!("{i:05}.txt")), s.caption())?;
    }
    Ok(())
}

/// The weights as trained so far: the base (VAE, configs) with a checkpoint's parameters.
pub(super) fn weights_from_checkpoint(base: &ModelWeights, checkpoint: &Path) -> Result<ModelWeights> {
    let mut w = base.clone();
    for (name, t) in read_safetensors(checkpoint)? {
        if let Some(n) = name.strip_prefix("param/unet.") {
            w.unet.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("param/text_encoder.") {
            w.text_encoder.insert(n.to_string(), t);
        }
    }
    Ok(w)
}

/// The noise schedule the model trains for and ships with.
pub(super) fn schedule(o: &Options) -> SchedulerConfig {
    if !o.zero_snr {
        return SchedulerConfig::default();
    }
    let mut s = SchedulerConfig::stable_diffusion(Prediction::V);
    s.rescale_betas_zero_snr = true;
    // Trailing spacing starts sampling at t = 999, the one step that is pure noise.
    s.timestep_spacing = TimestepSpacing::Trailing;
    s.steps_offset = 0;
    s
}

pub(super) fn count(map: &WeightMap) -> usize {
    map.names().map(|n| map.tensor(n).unwrap().elem_count()).sum()
}

/// The model training starts from: the trained VAE, and a new or continued UNet and text
/// encoder, with the schedule of `o`.
pub(super) fn base_weights(o: &Options) -> Result<ModelWeights> {
    let (vae_config, vae) = load_trained_vae(o)?;
    let unet_config = unet_config(o)?;
    let text_config = text_config(o);
    let mut rng = Rng::new(o.seed ^ 0x0de1);
    let unet_shapes = tensor_shapes(|m| UNet2DConditionModel::load(&unet_config, m).map(|_| ()))?;
    let text_shapes = tensor_shapes(|m| ClipTextModel::load(&text_config, m).map(|_| ()))?;
    // Zero-init the UNet's output conv and every residual branch's last layer.
    let unet_zero = |n: &str| {
        n == "conv_out.weight"
            || (n.contains("resnets.") && n.ends_with("conv2.weight"))
            || n.ends_with("proj_out.weight")
    };
    let base = match &o.model_init {
        Some(dir) => {
            let init = ModelWeights::load(
                dir,
                DType::F32,
                lora_studio::engine::io::weights::WeightPrecision::F32,
                &Device::Cpu,
            )?;
            println!("model: continuing the UNet and text encoder of {}", dir.display());
            ModelWeights { vae, vae_config, ..init }
        }
        None => ModelWeights {
            unet: initialise(&unet_shapes, &unet_zero, &mut rng, "new UNet")?,
            text_encoder: initialise(&text_shapes, &|_| false, &mut rng, "new text encoder")?,
            vae,
            unet_config: unet_config.clone(),
            text_config: text_config.clone(),
            vae_config,
            scheduler_config: SchedulerConfig::default(),
            tokenizer: ClipTokenizer::new(),
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
        },
    };
    Ok(ModelWeights { scheduler_config: schedule(o), ..base })
}

/// Writes the running (or last) model training's checkpoint as a model folder at `--out`, to
/// evaluate a run in progress.
pub(super) fn checkpoint_folder(o: &Options) -> Result<()> {
    let base = base_weights(o)?;
    let trained = weights_from_checkpoint(&base, &o.work.join("model.checkpoint.safetensors"))?;
    write_model_folder(&trained, &o.out, DType::F16, None, true)?;
    println!("checkpoint: written to {}", o.out.display());
    Ok(())
}

pub(super) fn train_model(o: &Options) -> Result<ModelStats> {
    let base = base_weights(o)?;
    let (pu, pt, pv) = (count(&base.unet), count(&base.text_encoder), count(&base.vae));
    let f16_bytes = 2 * (pu + pt + pv);
    println!(
        "model: UNet {:.2}M, text encoder {:.2}M, VAE {:.2}M parameters = {:.1} MB in f16 (limit {:.0} MB)",
        pu as f64 / 1e6,
        pt as f64 / 1e6,
        pv as f64 / 1e6,
        f16_bytes as f64 / 1e6,
        MAX_MODEL_BYTES as f64 / 1e6
    );
    if f16_bytes > MAX_MODEL_BYTES {
        bail!("the model is over the size limit; use smaller --unet-channels or --text-hidden");
    }
    let mut config = TrainConfig {
        algorithm: Algorithm::Full,
        train_text_encoder: true,
        learning_rate: o.lr,
        steps: o.steps,
        batch_size: o.batch,
        seed: o.seed,
        lr_schedule: LrSchedule::Cosine,
        warmup_steps: o.warmup.min(o.steps / 2),
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        min_snr_gamma: o.min_snr_gamma,
        noise_offset: o.noise_offset,
        timestep_bias: if o.late_bias == 1.0 { TimestepBias::None } else { TimestepBias::Later },
        timestep_bias_multiplier: o.late_bias,
        timestep_bias_portion: o.late_portion,
        text_encoder_lr: o.text_lr,
        caption_dropout: 0.1,
        dataset: DatasetOptions {
            resolution: o.size as usize,
            center_crop: true,
            flip: false, // captions say left and right
            min_side: 16,
            ..Default::default()
        },
        validation_images: 4,
        ..Default::default()
    };
    let pool_dir = o.work.join("pool");
    let checkpoint = o.work.join("model.checkpoint.safetensors");
    let mut scenes = SceneStream::new(o.seed ^ 0x7a1e);
    let build = |config: &TrainConfig, resume: bool| -> Result<Trainer> {
        let ds = Dataset::scan(std::slice::from_ref(&pool_dir), &config.dataset)?;
        let mut t = Trainer::new_full(base.clone(), config.clone(), &ds)?;
        if resume {
            t.load_checkpoint(&checkpoint)?;
        }
        Ok(t)
    };
    let start = Instant::now();
    write_pool(&pool_dir, &mut scenes, o.pool, o.size)?;
    let mut trainer = build(&config, false)?;
    println!(
        "model: {} trainable parameters; {} steps of batch {}, a fresh pool of {} scenes every {} steps ({:.1}s to set up)",
        trainer.trainable_parameters(),
        o.steps,
        o.batch,
        o.pool,
        o.refresh,
        start.elapsed().as_secs_f64()
    );
    let mut scenes_seen = o.pool;
    let mut window = Vec::new();
    let mut refresh_s = 0.0;
    while trainer.step < config.steps {
        if trainer.step > 0 && trainer.step.is_multiple_of(o.refresh) {
            if let Some(m) = o.model_minutes
                && trainer.step == o.refresh
            {
                let s = start.elapsed().as_secs_f64();
                let rate = trainer.step as f64 / s;
                config.steps = trainer.step + ((m * 60.0 - s).max(0.0) * rate * 0.97) as usize;
                config.warmup_steps = config.warmup_steps.min(config.steps / 5);
                println!("model: {rate:.3} step/s → {} steps fit in {m} minutes", config.steps);
            }
            let t0 = Instant::now();
            trainer.save_checkpoint(&checkpoint)?;
            drop(trainer);
            write_pool(&pool_dir, &mut scenes, o.pool, o.size)?;
            trainer = build(&config, true)?;
            scenes_seen += o.pool;
            refresh_s += t0.elapsed().as_secs_f64();
        }
        let loss = trainer.train_step()?;
        window.push(loss);
        let step = trainer.step;
        if step.is_multiple_of(o.log_every) || step == config.steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let s = start.elapsed().as_secs_f64();
            println!(
                "model step {step}/{} loss {mean:.4} lr {:.1e} elapsed {s:.1}s ({:.2} step/s, {refresh_s:.0}s in pool refreshes)",
                config.steps,
                trainer.current_lr(),
                step as f64 / s
            );
        }
        if over_time(start, o.model_minutes) {
            println!("model: time limit reached at step {step}");
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let losses = trainer.losses.clone();
    let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let k = (losses.len() / 10).max(1);
    let (first_loss, final_loss) =
        (avg(&losses[..k.min(losses.len())]), avg(&losses[losses.len().saturating_sub(k)..]));
    println!("model: validation loss {:.4}", trainer.validation_loss()?);
    trainer.save_checkpoint(&checkpoint)?;
    let trained = weights_from_checkpoint(&base, &checkpoint)?;
    write_model_folder(&trained, &o.out, DType::F16, None, true)?;
    let stats = ModelStats {
        steps: trainer.step,
        batch: o.batch,
        seconds,
        scenes_seen,
        first_loss,
        final_loss,
        unet_parameters: pu,
        text_parameters: pt,
        vae_parameters: pv,
        f16_bytes,
        text_hidden: o.text_hidden,
        unet_channels: o.unet_channels.clone(),
    };
    std::fs::write(o.work.join("model_stats.json"), serde_json::to_string_pretty(&stats)?)?;
    let _ = std::fs::remove_dir_all(&pool_dir);
    println!(
        "model: {} steps in {seconds:.0}s, loss {first_loss:.4} → {final_loss:.4} (first/last 10 %); written to {}",
        trainer.step,
        o.out.display()
    );
    Ok(stats)
}
