//! Stage 4 of the recipe: the example style datasets, their adapters and their card.

use super::*;

/// Seed of the held-out style prompts (the figure); the datasets use `--seed`.
pub(super) const STYLE_EVAL_SEED: u64 = 0xe7a1_0000_0000_0003;
/// The styles that get a trained adapter; the third dataset is left for the user to train.
pub(super) const TRAINED_STYLES: [Style; 2] = [Style::Watercolour, Style::Neon];

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct StyleFigure {
    pub(super) style: String,
    pub(super) steps: usize,
    pub(super) seconds: f64,
    pub(super) first_loss: f32,
    pub(super) final_loss: f32,
    /// L1 distance between colour histograms (generated vs the style's own pictures) at
    /// adapter weight 0, 0.5 and 1.
    pub(super) distance: [f64; 3],
}

/// A joint RGB histogram (8 bins a channel) over all pixels of `images`, summing to 1.
pub(super) fn colour_histogram(images: &[image::RgbImage]) -> Vec<f64> {
    let mut h = vec![0f64; 512];
    let mut n = 0f64;
    for img in images {
        for p in img.pixels() {
            let [r, g, b] = p.0.map(|c| (c >> 5) as usize);
            h[r * 64 + g * 8 + b] += 1.0;
            n += 1.0;
        }
    }
    h.iter_mut().for_each(|x| *x /= n.max(1.0));
    h
}

pub(super) fn l1(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
}

/// Writes the three style datasets (PNG + caption sidecar) and trains a LoRA on two of them with
/// our own trainer; measures how far each moves generated pictures toward its style.
pub(super) fn make_examples(o: &Options) -> Result<()> {
    let device = Device::Cpu;
    std::fs::create_dir_all(&o.examples)?;
    for style in Style::ALL {
        let dir = o.examples.join(style.name());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut rng = Rng::new(o.seed ^ 0x571e ^ style as u64);
        for i in 0..o.example_images {
            let (img, caption) = style_scene_sized(style, &mut rng, o.size);
            img.save(dir.join(format!("{i:03}.png")))?;
            std::fs::write(dir.join(format!("{i:03}.txt")), caption)?;
        }
        println!("examples: {} images of `{}` in {}", o.example_images, style.name(), dir.display());
    }
    let mut figures = Vec::new();
    for style in TRAINED_STYLES {
        let name = style.name();
        let config = TrainConfig {
            algorithm: Algorithm::Lora,
            rank: o.example_rank,
            alpha: o.example_rank as f64,
            targets: TargetPreset::TransformerAndConv,
            learning_rate: o.example_lr,
            steps: o.example_steps,
            batch_size: 4,
            seed: o.seed,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: o.example_steps / 20,
            // With zero terminal SNR, min-SNR weights t = 999 by 0, and that step is where a
            // style's overall palette (watercolour's white paper) has to come from.
            min_snr_gamma: o.min_snr_gamma,
            timestep_bias: if o.late_bias == 1.0 { TimestepBias::None } else { TimestepBias::Later },
            timestep_bias_multiplier: o.late_bias,
            timestep_bias_portion: o.late_portion,
            noise_offset: o.noise_offset,
            caption_dropout: 0.05,
            dataset: DatasetOptions {
                resolution: o.size as usize,
                center_crop: true,
                flip: false,
                trigger: name.to_owned(),
                min_side: 16,
                ..Default::default()
            },
            ..Default::default()
        };
        let ds = Dataset::scan(&[o.examples.join(name)], &config.dataset)?;
        let mut trainer = Trainer::new(StableDiffusion::load(&o.out, &device)?, config.clone(), &ds)?;
        let start = Instant::now();
        while trainer.step < config.steps {
            trainer.train_step()?;
            if trainer.step.is_multiple_of(o.log_every) {
                let k = o.log_every.min(trainer.losses.len());
                let mean = trainer.losses[trainer.losses.len() - k..].iter().sum::<f32>() / k as f32;
                println!("examples {name}: step {}/{} loss {mean:.4}", trainer.step, config.steps);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let file = o.examples.join(format!("{name}.safetensors"));
        trainer.save_adapter(&file, Naming::Kohya)?;
        let losses = &trainer.losses;
        let k = (losses.len() / 10).max(1);
        let avg = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        let (first_loss, final_loss) = (avg(&losses[..k]), avg(&losses[losses.len() - k..]));
        drop(trainer);

        // The figure: held-out captions of this style, generated at three adapter weights.
        let mut rng = Rng::new(STYLE_EVAL_SEED ^ style as u64);
        let held: Vec<(image::RgbImage, String)> =
            (0..o.style_prompts).map(|_| style_scene_sized(style, &mut rng, o.size)).collect();
        let reference = colour_histogram(&held.iter().map(|(img, _)| img.clone()).collect::<Vec<_>>());
        let mut sd = StableDiffusion::load(&o.out, &device)?;
        sd.load_adapter(name, &file, 0.0)?;
        let mut distance = [0.0; 3];
        let mut strip = image::RgbImage::new(o.size * 8, o.size * 3);
        for (wi, w) in [0.0, 0.5, 1.0].into_iter().enumerate() {
            sd.set_adapter_weight(name, w)?;
            let mut images = Vec::new();
            for (i, (_, caption)) in held.iter().enumerate() {
                let req = GenerateRequest {
                    prompt: format!("{name}, {caption}"),
                    negative: String::new(),
                    seed: i as u64,
                    steps: o.gen_steps,
                    guidance: o.guidance,
                    sampler: SamplerKind::Ddim,
                    width: o.size as usize,
                    height: o.size as usize,
                    clip_skip: 1,
                };
                let img = sd.generate(&req, &mut |_, _| {})?;
                if i < 8 {
                    image::imageops::replace(&mut strip, &img, (i as u32 * o.size) as i64, (wi as u32 * o.size) as i64);
                }
                images.push(img);
            }
            distance[wi] = l1(&colour_histogram(&images), &reference);
            println!("examples {name}: weight {w}: colour-histogram distance to the style {:.3}", distance[wi]);
        }
        strip.save(o.work.join(format!("examples-{name}.png")))?;
        figures.push(StyleFigure {
            style: name.to_owned(),
            steps: config.steps,
            seconds,
            first_loss,
            final_loss,
            distance,
        });
    }
    std::fs::write(o.work.join("examples.json"), serde_json::to_string_pretty(&figures)?)?;
    write_examples_card(o, &figures)
}

pub(super) fn write_examples_card(o: &Options, figures: &[StyleFigure]) -> Result<()> {
    let mut rows = String::new();
    for f in figures {
        let fall = 100.0 * (1.0 - f.distance[2] / f.distance[0]);
        rows += &format!(
            "| `{0}.safetensors` | {1} steps, {2:.0} s, loss {3:.3} → {4:.3} | {5:.3} | {6:.3} | {7:.3} | {fall:.0} % |\n",
            f.style, f.steps, f.seconds, f.first_loss, f.final_loss, f.distance[0], f.distance[1], f.distance[2]
        );
    }
    let card = format!(
        r#"# Example styles

Three small style datasets drawn by `src/engine/synthetic.rs` ({n} pictures each, {size}×{size},
every picture with a `.txt` caption sidecar, kohya's convention), and LoRA adapters trained on two
of them with LoRA Studio's own trainer on the built-in model (`assets/base`), so the Playground has
styles to blend on first launch. `mosaic/` has no adapter: it is there for you to train.

| folder | what it looks like |
|---|---|
| `watercolour/` | pastel washes, slightly offset and darker where they overlap, on white paper |
| `neon/` | bright outlines with a dim glow on black |
| `mosaic/` | the scene as square tiles with dark grout and per-tile colour jitter |

Made by `cargo run --release --bin pretrain -- examples` (seeded; LoRA rank {rank}, α = rank,
attention + feed-forward + convolutions, AdamW lr {lr:e} with a cosine schedule, batch 4,
{weighting}; the style's name is the trigger word). Both files are in the kohya format
(`lora_unet_…`), so A1111 and ComfyUI read them too. The watercolour paper is white, not cream:
the built-in VAE decodes a cream such as (250, 242, 225) as (239, 239, 240), so no adapter on the
UNet could draw it.

## Does an adapter move pictures toward its style?

{prompts} held-out captions of each style, generated with the built-in model ({steps} DDIM steps,
guidance {g}, the same seeds) at adapter weight 0, 0.5 and 1. Each cell is the L1 distance between
the joint RGB colour histogram (8 bins a channel) of the generated pictures and that of the
style's own pictures for the same captions (0: the same colours; 2: nothing in common).

| adapter | training | weight 0 | weight 0.5 | weight 1 | fall at weight 1 |
|---|---|---|---|---|---|
{rows}"#,
        n = o.example_images,
        size = o.size,
        rank = o.example_rank,
        lr = o.example_lr,
        weighting = loss_weighting(o),
        prompts = o.style_prompts,
        steps = o.gen_steps,
        g = o.guidance,
    );
    std::fs::write(o.examples.join("README.md"), card)?;
    println!("examples: card written to {}", o.examples.join("README.md").display());
    Ok(())
}
