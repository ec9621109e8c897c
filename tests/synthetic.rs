//! The synthetic world and its analyser, judged on rendered ground truth.

use lora_studio::engine::rng::Rng;
#[path = "../src/bin/pretrain/synthetic.rs"]
#[allow(dead_code)]
mod synthetic;

use synthetic::{Accuracy, Pattern, SceneSpec, Style, analyse, judge, style_scene};

fn ground_truth_accuracy(seed: u64, n: usize, size: u32) -> Accuracy {
    let mut rng = Rng::new(seed);
    let mut judgements = Vec::new();
    let mut misses = Vec::new();
    for _ in 0..n {
        let spec = SceneSpec::sample(&mut rng);
        let img = spec.render(size);
        let j = judge(&img, &spec);
        if !(j.foreground_colour && j.background_colour && j.pattern) {
            misses.push(format!("{} -> {:?}", spec.caption(), analyse(&img, &spec)));
        }
        judgements.push(j);
    }
    let acc = Accuracy::from_judgements(&judgements);
    println!("ground truth at {size}px over {n} scenes: {acc:?}");
    for m in misses.iter().take(5) {
        println!("miss: {m}");
    }
    acc
}

#[test]
fn synthetic_analyser_reads_rendered_scenes() {
    let acc = ground_truth_accuracy(2024, 200, 64);
    assert!(acc.foreground_colour >= 0.95, "{acc:?}");
    assert!(acc.background_colour >= 0.95, "{acc:?}");
    assert!(acc.pattern >= 0.95, "{acc:?}");
    // Shapes are reported, not required: small stars and triangles are only a few pixels.
    assert!(acc.shape >= 0.6, "{acc:?}");
}

#[test]
fn synthetic_analyser_works_at_other_sizes() {
    let acc = ground_truth_accuracy(7, 50, 128);
    assert!(acc.foreground_colour >= 0.95 && acc.background_colour >= 0.95, "{acc:?}");
}

#[test]
fn synthetic_every_pattern_and_shape_occurs() {
    let mut rng = Rng::new(5);
    let scenes: Vec<SceneSpec> = (0..300).map(|_| SceneSpec::sample(&mut rng)).collect();
    for p in Pattern::ALL {
        assert!(scenes.iter().any(|s| s.pattern == p), "{p:?}");
    }
    assert!(scenes.iter().all(|s| (1..=3).contains(&s.shapes.len())));
    assert!(scenes.iter().any(|s| s.shapes.len() == 3));
    let caption = scenes[0].caption();
    assert!(caption.ends_with("background"), "{caption}");
}

#[test]
fn synthetic_style_datasets_are_deterministic() {
    for style in Style::ALL {
        let (a, ca) = style_scene(style, &mut Rng::new(11));
        let (b, cb) = style_scene(style, &mut Rng::new(11));
        assert_eq!(a, b);
        assert_eq!(ca, cb);
        assert!(ca.contains(style.name()) || style == Style::Neon && ca.contains("neon"), "{ca}");
    }
}

/// Generated images are soft and noisy: the analyser should survive a blur and some noise.
fn degrade(img: &image::RgbImage, rng: &mut Rng) -> image::RgbImage {
    let (w, h) = img.dimensions();
    image::RgbImage::from_fn(w, h, |x, y| {
        let mut sum = [0f32; 3];
        let mut n = 0f32;
        for j in y.saturating_sub(1)..(y + 2).min(h) {
            for i in x.saturating_sub(1)..(x + 2).min(w) {
                let p = img.get_pixel(i, j).0;
                (0..3).for_each(|c| sum[c] += p[c] as f32);
                n += 1.0;
            }
        }
        image::Rgb(sum.map(|s| (s / n + (rng.uniform_f32() - 0.5) * 24.0).round().clamp(0.0, 255.0) as u8))
    })
}

#[test]
fn synthetic_analyser_survives_blur_and_noise() {
    let mut rng = Rng::new(99);
    let mut noise = Rng::new(100);
    let js: Vec<_> = (0..100)
        .map(|_| {
            let spec = SceneSpec::sample(&mut rng);
            judge(&degrade(&spec.render(64), &mut noise), &spec)
        })
        .collect();
    let acc = Accuracy::from_judgements(&js);
    println!("blurred + noisy ground truth over 100 scenes: {acc:?}");
    assert!(acc.shape_colour >= 0.9 && acc.background_colour >= 0.9, "{acc:?}");
}
