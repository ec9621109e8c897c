//! The synthetic world and its analyser, judged on rendered ground truth.

use lora_studio::engine::rng::Rng;
use lora_studio::engine::synthetic::{Accuracy, Pattern, SceneSpec, Style, analyse, judge, style_scene};

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
