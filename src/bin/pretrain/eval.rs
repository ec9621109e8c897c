//! Stage 3 of the recipe: evaluation (PSNR, prompt following, timing) and the model card.

use super::*;

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub(super) struct EvalStats {
    pub(super) vae_psnr_db: f64,
    pub(super) vae_images: usize,
    pub(super) prompts: usize,
    pub(super) guidance: f64,
    pub(super) gen_steps: usize,
    pub(super) foreground_colour: f64,
    pub(super) shape_colour: f64,
    pub(super) background_colour: f64,
    pub(super) pattern: f64,
    pub(super) shape: f64,
    /// The analyser on the rendered ground truth of the same prompts (its ceiling).
    pub(super) ground_truth_shape_colour: f64,
    /// The analyser on each prompt's neighbour's ground truth (chance level).
    pub(super) chance_shape_colour: f64,
    pub(super) chance_background_colour: f64,
    pub(super) chance_pattern: f64,
    pub(super) seconds_per_image: f64,
}

pub(super) fn evaluate(o: &Options) -> Result<EvalStats> {
    let device = Device::Cpu;
    let model = StableDiffusion::load(&o.out, &device)?;
    let start = Instant::now();
    // VAE reconstruction on held-out scenes.
    let mut held = SceneStream::new(VAE_EVAL_SEED ^ 0xff);
    let (mut total, mut n) = (0.0, 0);
    while n < o.eval_images {
        let b = (o.eval_images - n).min(8);
        let images: Vec<_> = (0..b).map(|_| held.next().unwrap().render(o.size)).collect();
        let z = model.vae.encode_mean(&images_to_tensor(&images, &device)?)?;
        let recon = model.vae.decode(&z)?;
        for (i, img) in images.iter().enumerate() {
            total += psnr(img, &to_image(&recon.get(i)?)?);
        }
        n += b;
    }
    let vae_psnr_db = total / n.max(1) as f64;
    println!("eval: VAE PSNR {vae_psnr_db:.2} dB on {n} held-out scenes ({:.1}s)", start.elapsed().as_secs_f64());
    // Prompt following.
    let mut prompts = SceneStream::new(PROMPT_EVAL_SEED);
    let mut judgements = Vec::new();
    let mut truth = Vec::new();
    let mut chance = Vec::new();
    let mut previous: Option<image::RgbImage> = None;
    let mut times = Vec::new();
    let mut strip = image::RgbImage::new(o.size * 8, o.size * 2);
    for i in 0..o.eval_prompts {
        let spec: SceneSpec = prompts.next().unwrap();
        let req = GenerateRequest {
            prompt: spec.caption(),
            negative: String::new(),
            seed: i as u64,
            steps: o.gen_steps,
            guidance: o.guidance,
            sampler: SamplerKind::Ddim,
            width: o.size as usize,
            height: o.size as usize,
            clip_skip: 1,
        };
        let t0 = Instant::now();
        let img = model.generate(&req, &mut |_, _| {})?;
        times.push(t0.elapsed().as_secs_f64());
        let j = judge(&img, &spec);
        let rendered = spec.render(o.size);
        truth.push(judge(&rendered, &spec));
        if let Some(p) = &previous {
            chance.push(judge(p, &spec));
        }
        previous = Some(rendered.clone());
        if i < 8 {
            image::imageops::replace(&mut strip, &rendered, (i as u32 * o.size) as i64, 0);
            image::imageops::replace(&mut strip, &img, (i as u32 * o.size) as i64, o.size as i64);
        }
        judgements.push(j);
        if (i + 1) % o.log_every == 0 || i + 1 == o.eval_prompts {
            let a = Accuracy::from_judgements(&judgements);
            println!(
                "eval prompt {}/{} fg colour {:.2} bg colour {:.2} pattern {:.2} elapsed {:.1}s",
                i + 1,
                o.eval_prompts,
                a.shape_colour,
                a.background_colour,
                a.pattern,
                start.elapsed().as_secs_f64()
            );
        }
    }
    strip.save(o.work.join("eval-samples.png"))?;
    let a = Accuracy::from_judgements(&judgements);
    let gt = Accuracy::from_judgements(&truth);
    let ch = Accuracy::from_judgements(&chance);
    times.sort_by(f64::total_cmp);
    let stats = EvalStats {
        vae_psnr_db,
        vae_images: n,
        prompts: o.eval_prompts,
        guidance: o.guidance,
        gen_steps: o.gen_steps,
        foreground_colour: a.foreground_colour,
        shape_colour: a.shape_colour,
        background_colour: a.background_colour,
        pattern: a.pattern,
        shape: a.shape,
        ground_truth_shape_colour: gt.shape_colour,
        chance_shape_colour: ch.shape_colour,
        chance_background_colour: ch.background_colour,
        chance_pattern: ch.pattern,
        seconds_per_image: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
    };
    println!("eval: {}", serde_json::to_string(&stats)?);
    println!(
        "eval: top row rendered ground truth, bottom row generated: {}",
        o.work.join("eval-samples.png").display()
    );
    std::fs::write(o.work.join("eval.json"), serde_json::to_string_pretty(&stats)?)?;
    write_card(o, &stats)?;
    Ok(stats)
}

/// The model and example stages' loss weighting, in words for the cards.
pub(super) fn loss_weighting(o: &Options) -> String {
    o.min_snr_gamma.map_or("uniform loss weights".to_string(), |g| format!("min-SNR γ = {g}"))
        + &if o.late_bias == 1.0 {
            String::new()
        } else {
            format!(", the noisiest {:.0} % of timesteps drawn {}× as often", 100.0 * o.late_portion, o.late_bias)
        }
}

pub(super) fn read_json<T: for<'a> Deserialize<'a> + Default>(path: &Path) -> T {
    std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

pub(super) fn write_card(o: &Options, e: &EvalStats) -> Result<()> {
    let v: VaeStats = read_json(&vae_dir(o).join("stats.json"));
    let m: ModelStats = read_json(&o.work.join("model_stats.json"));
    let card = format!(
        r#"# LoRA Studio base model ("synthetic shapes")

A tiny text-to-image latent diffusion model in the Stable Diffusion 1.x layout (diffusers folder),
trained from scratch on the CPU by `cargo run --release --bin pretrain -- all`, so that LoRA Studio
works offline. It draws {size}×{size} pictures of simple shapes; it is not a general image model.

## Training data

Only procedurally drawn scenes from `src/engine/synthetic.rs` (seeded, no external images): one to
three shapes (circle, square, triangle, star, ring), small or big, in eleven named colours, in the
cells of a 3×3 grid, on a solid, gradient, striped, dotted, checkered or noisy background of a
named colour. Every caption says all of it, e.g. "a small red star in the top left and a big blue
circle in the centre on a striped yellow background".

## Architecture

| part | size |
|---|---|
| VAE (AutoencoderKL, factor 4, 4 latent channels, blocks 32/64/128) | {vp:.2} M parameters, scaling factor {sf:.4} |
| text encoder (CLIP text model, hidden {th}, CLIP BPE vocabulary) | {tp:.2} M parameters |
| UNet (blocks {uc:?}, cross-attention on the lower two levels) | {up:.2} M parameters |
| weights on disk (f16) | {mb:.1} MB |

Scheduler: {schedule}

## Training

- VAE: {vs} steps of batch {vb} ({vmin:.0} min); reconstruction MSE {vf:.4} → {vl:.4}, plus 1e-4 × mean(z²).
- Text encoder + UNet, full training with AdamW (cosine schedule, {weighting}, 10 % caption
  dropout for classifier-free guidance): {ms} steps of batch {mb_} ({mmin:.0} min), {seen} fresh scenes;
  loss {mf:.4} → {ml:.4} (mean of the first and last 10 % of steps).

## Evaluation (held-out seeds)

| measure | value |
|---|---|
| VAE reconstruction PSNR, {vi} scenes | {psnr:.2} dB |
| shapes drawn in the asked colour, {np} prompts | {sc:.0} % (analyser on ground truth: {gt:.0} %, chance: {csc:.0} %) |
| scenes with every shape in the asked colour | {fc:.0} % |
| background colour as asked | {bc:.0} % (chance: {cbc:.0} %) |
| background pattern as asked | {pa:.0} % (chance: {cpa:.0} %) |
| shape as asked | {sh:.0} % |
| time for one image ({gs} DDIM steps, guidance {g}) | {spi:.2} s |

Colours, backgrounds and shapes are judged by the deterministic analyser in
`src/engine/synthetic.rs`, which is right on 100 % of rendered ground-truth scenes; "chance" is
the analyser judging each prompt against another prompt's picture.

## Limits

- {size}×{size} only; other sizes are outside what it was trained on.
- Knows only the words of the synthetic captions; any other prompt gives an arbitrary scene.
- Small shapes come out blurry and shapes are judged less reliably than colours.
- Meant as a base for LoRA examples and tests, not for real pictures.
"#,
        size = o.size,
        schedule = if o.zero_snr {
            "Stable Diffusion's scaled-linear β schedule rescaled to zero terminal SNR (diffusers' \
             `rescale_betas_zero_snr`), 1000 steps, v-prediction, trailing timestep spacing."
        } else {
            "Stable Diffusion's scaled-linear β schedule, 1000 steps, ε-prediction."
        },
        weighting = loss_weighting(o),
        vp = m.vae_parameters as f64 / 1e6,
        sf = v.scaling_factor,
        th = m.text_hidden,
        tp = m.text_parameters as f64 / 1e6,
        uc = m.unet_channels,
        up = m.unet_parameters as f64 / 1e6,
        mb = m.f16_bytes as f64 / 1e6,
        vs = v.steps,
        vb = v.batch,
        vmin = v.seconds / 60.0,
        vf = v.first_loss,
        vl = v.final_loss,
        ms = m.steps,
        mb_ = m.batch,
        mmin = m.seconds / 60.0,
        seen = m.scenes_seen,
        mf = m.first_loss,
        ml = m.final_loss,
        vi = e.vae_images,
        psnr = e.vae_psnr_db,
        np = e.prompts,
        sc = 100.0 * e.shape_colour,
        gt = 100.0 * e.ground_truth_shape_colour,
        csc = 100.0 * e.chance_shape_colour,
        cbc = 100.0 * e.chance_background_colour,
        cpa = 100.0 * e.chance_pattern,
        fc = 100.0 * e.foreground_colour,
        bc = 100.0 * e.background_colour,
        pa = 100.0 * e.pattern,
        sh = 100.0 * e.shape,
        gs = e.gen_steps,
        g = e.guidance,
        spi = e.seconds_per_image,
    );
    std::fs::write(o.out.join("README.md"), card)?;
    println!("eval: model card written to {}", o.out.join("README.md").display());
    Ok(())
}
