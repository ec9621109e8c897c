//! Adapter math and file formats, checked against plain loops over `Vec<f32>` (no tensor ops),
//! and export → import round trips in every format.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::tempdir;
use lora_studio::engine::adapters::delta::Delta;
use lora_studio::engine::adapters::formats::{
    Component, ExportLayer, GloraLayout, Naming, read_adapter, write_adapter,
};
use lora_studio::engine::adapters::stack::{AdapterStack, LayerAdapter};
use lora_studio::engine::rng::Rng;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.randn(shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// C (n×m) = A (n×k) · B (k×m), row-major.
fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut c = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            c[i * m + j] = (0..k).map(|p| a[i * k + p] * b[p * m + j]).sum();
        }
    }
    c
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// ΔW for GLoRA by loops: W·a1·a2 (contracting W's input channel at each kernel position) + b1·b2.
#[allow(clippy::too_many_arguments)]
fn glora_delta_by_loops(
    w: &[f32],
    out: usize,
    inp: usize,
    kk: usize,
    a1: &[f32],
    a2: &[f32],
    b1: &[f32],
    b2: &[f32],
    r: usize,
) -> Vec<f32> {
    let m = matmul(a1, a2, inp, r, inp); // (in, in)
    let b2_flat = b2; // (r, in·kk)
    let bb = matmul(b1, b2_flat, out, r, inp * kk);
    let mut d = vec![0f32; out * inp * kk];
    for o in 0..out {
        for i in 0..inp {
            for p in 0..kk {
                let wm: f32 = (0..inp).map(|j| w[(o * inp + j) * kk + p] * m[j * inp + i]).sum();
                d[(o * inp + i) * kk + p] = wm + bb[(o * inp + i) * kk + p];
            }
        }
    }
    d
}

#[test]
fn lora_and_locon_delta_match_loops_and_merged_equals_unmerged() {
    let mut rng = Rng::new(1);
    // Linear LoRA.
    let (out, inp, r) = (6, 5, 3);
    let w = randn(&mut rng, &[out, inp]);
    let (down, up) = (randn(&mut rng, &[r, inp]), randn(&mut rng, &[out, r]));
    let delta = Delta::Lora { down: down.clone(), up: up.clone() };
    let expect = matmul(&values(&up), &values(&down), out, r, inp);
    assert!(max_diff(&values(&delta.delta_weight(&w).unwrap()), &expect) < 1e-5);
    check_modes_agree(w, delta, false);

    // Conv LoCon, 3×3 kernel.
    let w = randn(&mut rng, &[out, inp, 3, 3]);
    let (down, up) = (randn(&mut rng, &[r, inp, 3, 3]), randn(&mut rng, &[out, r, 1, 1]));
    let delta = Delta::Lora { down: down.clone(), up: up.clone() };
    let expect = matmul(&values(&up), &values(&down), out, r, inp * 9);
    assert!(max_diff(&values(&delta.delta_weight(&w).unwrap()), &expect) < 1e-5);
    check_modes_agree(w, delta, true);
}

#[test]
fn glora_delta_matches_loops_and_merged_equals_unmerged() {
    let mut rng = Rng::new(2);
    let (out, inp, r) = (7, 5, 2);
    for kernel in [None, Some(3usize)] {
        let kk = kernel.map(|k| k * k).unwrap_or(1);
        let (w, a1, a2, b1, b2) = match kernel {
            None => (
                randn(&mut rng, &[out, inp]),
                randn(&mut rng, &[inp, r]),
                randn(&mut rng, &[r, inp]),
                randn(&mut rng, &[out, r]),
                randn(&mut rng, &[r, inp]),
            ),
            Some(k) => (
                randn(&mut rng, &[out, inp, k, k]),
                randn(&mut rng, &[inp, r, 1, 1]),
                randn(&mut rng, &[r, inp, 1, 1]),
                randn(&mut rng, &[out, r, 1, 1]),
                randn(&mut rng, &[r, inp, k, k]),
            ),
        };
        let expect =
            glora_delta_by_loops(&values(&w), out, inp, kk, &values(&a1), &values(&a2), &values(&b1), &values(&b2), r);
        let delta = Delta::Glora { a1, a2, b1, b2 };
        let got = values(&delta.delta_weight(&w).unwrap());
        assert!(max_diff(&got, &expect) < 1e-4, "GLoRA ΔW (kernel {kernel:?})");
        check_modes_agree(w, delta, kernel.is_some());
    }
}

/// Two adapters at different weights: factored and merged forward passes agree to 1e-5.
fn check_modes_agree(w: Tensor, delta: Delta, conv: bool) {
    let mut rng = Rng::new(3);
    let mut stack = AdapterStack::new(w.clone());
    stack.attach(LayerAdapter { name: "x".into(), delta: delta.clone(), scale: 0.5, multiplier: 0.7 }).unwrap();
    stack.attach(LayerAdapter { name: "y".into(), delta, scale: 2.0, multiplier: -0.3 }).unwrap();
    let x = if conv { randn(&mut rng, &[2, w.dims()[1], 6, 6]) } else { randn(&mut rng, &[2, 4, w.dims()[1]]) };
    let run = |s: &AdapterStack| {
        if conv { s.forward_conv(&x, None, 1, 1).unwrap() } else { s.forward_linear(&x, None).unwrap() }
    };
    stack.merge = false;
    stack.refresh().unwrap();
    let unmerged = values(&run(&stack));
    stack.merge = true;
    stack.mark_stale();
    assert!(stack.refresh().unwrap());
    let merged = values(&run(&stack));
    let scale = unmerged.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        max_diff(&merged, &unmerged) <= 1e-5 * scale.max(1.0),
        "merged vs unmerged: {}",
        max_diff(&merged, &unmerged)
    );
}

/// A stack of plain LoRAs merges as one GEMM, and its drive comes from the factors: both must equal
/// W + Σ c·U·D and ‖Σ c·U·D‖ / ‖W‖ written as loops, for linear and conv layers, a base kept in f16,
/// and a mix with another kind (which takes the materialised route).
#[test]
fn merged_lora_stack_and_its_drive_match_the_sum_written_as_loops() {
    let mut rng = Rng::new(11);
    let (out, inp, r) = (24, 16, 3);
    for (kk, half, with_loha) in [(1, false, false), (9, false, false), (1, true, false), (1, false, true)] {
        let shape: Vec<usize> = if kk == 1 { vec![out, inp] } else { vec![out, inp, 3, 3] };
        let w = randn(&mut rng, &shape);
        let base = if half { w.to_dtype(DType::F16).unwrap() } else { w.clone() };
        let w_values = values(&base.to_dtype(DType::F32).unwrap());
        let mut stack = AdapterStack::new(base);
        let mut expect_delta = vec![0f32; out * inp * kk];
        for (i, (scale, multiplier)) in [(0.5, 0.7), (2.0, -0.3), (1.0, 1.2)].into_iter().enumerate() {
            let (up, down) = (randn(&mut rng, &[out, r]), randn(&mut rng, &[r, inp * kk]));
            let product = matmul(&values(&up), &values(&down), out, r, inp * kk);
            for (e, p) in expect_delta.iter_mut().zip(product) {
                *e += (scale * multiplier) as f32 * p;
            }
            let (up, down) = if kk == 1 {
                (up, down)
            } else {
                (up.reshape((out, r, 1, 1)).unwrap(), down.reshape((r, inp, 3, 3)).unwrap())
            };
            let delta = Delta::Lora { down, up };
            stack.attach(LayerAdapter { name: format!("lora{i}"), delta, scale, multiplier }).unwrap();
        }
        if with_loha {
            let (w1a, w1b) = (randn(&mut rng, &[out, 2]), randn(&mut rng, &[2, inp]));
            let (w2a, w2b) = (randn(&mut rng, &[out, 2]), randn(&mut rng, &[2, inp]));
            let p1 = matmul(&values(&w1a), &values(&w1b), out, 2, inp);
            let p2 = matmul(&values(&w2a), &values(&w2b), out, 2, inp);
            for ((e, a), b) in expect_delta.iter_mut().zip(p1).zip(p2) {
                *e += 0.25 * a * b;
            }
            let delta = Delta::Loha { w1a, w1b, w2a, w2b, tucker: None };
            stack.attach(LayerAdapter { name: "loha".into(), delta, scale: 0.5, multiplier: 0.5 }).unwrap();
        }
        assert!(stack.refresh().unwrap());
        let merged = stack.merged_weight().unwrap();
        assert_eq!(merged.dtype(), stack.base.dtype(), "a merged weight is stored like the base");
        let expect: Vec<f32> = w_values.iter().zip(&expect_delta).map(|(w, d)| w + d).collect();
        let scale = expect.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tolerance = if half { 1e-3 * scale } else { 1e-5 * scale };
        let got = values(&merged.to_dtype(DType::F32).unwrap());
        assert!(
            max_diff(&got, &expect) <= tolerance,
            "merged weight off by {} ({kk}, {half}, {with_loha})",
            max_diff(&got, &expect)
        );
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let expect_drive = norm(&expect_delta) / norm(&w_values);
        let drive = stack.drive().unwrap();
        assert!(
            (drive - expect_drive).abs() <= 1e-5 * expect_drive,
            "drive {drive} vs {expect_drive} ({kk}, {half}, {with_loha})"
        );
    }
}

fn sample_layers(rng: &mut Rng) -> Vec<ExportLayer> {
    vec![
        ExportLayer {
            component: Component::Unet,
            path: "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k".into(),
            delta: Delta::Lora { down: randn(rng, &[4, 32]), up: randn(rng, &[32, 4]) },
            alpha: 2.0,
        },
        ExportLayer {
            component: Component::TextEncoder,
            path: "text_model.encoder.layers.0.mlp.fc1".into(),
            delta: Delta::Lora { down: randn(rng, &[4, 32]), up: randn(rng, &[69, 4]) },
            alpha: 4.0,
        },
        ExportLayer {
            component: Component::Unet,
            path: "down_blocks.0.resnets.0.conv1".into(),
            delta: Delta::Lora { down: randn(rng, &[4, 32, 3, 3]), up: randn(rng, &[32, 4, 1, 1]) },
            alpha: 1.0,
        },
    ]
}

fn glora_layer(rng: &mut Rng, square: bool) -> ExportLayer {
    // `square`: rank = in = out, where only the recorded layout can tell the layouts apart.
    let (out, inp, r) = if square { (4, 4, 4) } else { (32, 16, 4) };
    ExportLayer {
        component: Component::Unet,
        path: "mid_block.attentions.0.proj_in".into(),
        delta: Delta::Glora {
            a1: randn(rng, &[inp, r]),
            a2: randn(rng, &[r, inp]),
            b1: randn(rng, &[out, r]),
            b2: randn(rng, &[r, inp]),
        },
        alpha: 1.0,
    }
}

fn assert_same_layers(written: &[ExportLayer], path: &std::path::Path) {
    let parsed = read_adapter(path).unwrap();
    assert_eq!(parsed.layers.len(), written.len());
    for w in written {
        let key = format!("{}.{}", w.component.label(), w.path);
        let flat = lora_studio::engine::adapters::formats::kohya::flat_name(w.component, &w.path, false);
        let p = parsed
            .layers
            .iter()
            .find(|p| p.key.to_string() == key || p.key.to_string() == flat)
            .unwrap_or_else(|| panic!("{key} read back"));
        assert_eq!(p.scale() * p.delta.rank() as f64, w.alpha, "{key}: α");
        for (a, b) in p.delta.tensors().iter().zip(w.delta.tensors()) {
            assert_eq!(a.dims(), b.dims(), "{key}: shape");
            assert_eq!(values(a), values(b), "{key}: bits");
        }
    }
}

#[test]
fn kohya_and_peft_files_round_trip_bit_identically() {
    let dir = tempdir("formats");
    let mut rng = Rng::new(4);
    let layers = sample_layers(&mut rng);
    for naming in [Naming::Kohya, Naming::Peft] {
        let path = dir.join(format!("{naming:?}.safetensors"));
        write_adapter(&path, naming, &layers, HashMap::new(), DType::F32, GloraLayout::Current).unwrap();
        assert_same_layers(&layers, &path);
    }
}

#[test]
fn glora_round_trips_in_both_layouts_even_when_square() {
    let dir = tempdir("glora");
    let mut rng = Rng::new(5);
    for square in [false, true] {
        let layers = vec![glora_layer(&mut rng, square)];
        for layout in [GloraLayout::Current, GloraLayout::Legacy] {
            let path = dir.join(format!("glora-{square}-{layout:?}.safetensors"));
            write_adapter(&path, Naming::Kohya, &layers, HashMap::new(), DType::F32, layout).unwrap();
            assert_same_layers(&layers, &path);
        }
    }
    // GLoRA has no PEFT form: refused with a reason, and no file is left behind.
    let path = dir.join("glora-peft.safetensors");
    let err = write_adapter(
        &path,
        Naming::Peft,
        &[glora_layer(&mut rng, false)],
        HashMap::new(),
        DType::F32,
        GloraLayout::Current,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("glora has no PEFT LoRA form"), "{err:#}");
    assert!(!path.exists());
}

#[test]
fn text_embeddings_are_reused_while_only_unet_weights_move() {
    use lora_studio::engine::adapters::stack::BlockWeights;
    use lora_studio::engine::diffusion::sampler::SamplerKind;
    use lora_studio::engine::pipeline::{GenerateRequest, StableDiffusion};
    let model = common::sd1_tiny().join("model");
    let adapter = common::sd1_tiny().join("lora_a_kohya.safetensors");
    let req = GenerateRequest {
        prompt: "a red circle".into(),
        negative: String::new(),
        seed: 3,
        steps: 2,
        guidance: 5.0,
        sampler: SamplerKind::Ddim,
        width: 32,
        height: 32,
        clip_skip: 1,
    };
    let mut sd = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    sd.cache_text_embeddings = true;
    sd.load_adapter("a", &adapter, 0.7).unwrap();
    sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(sd.text_encoder_runs(), 1);
    // Only the UNet's output blocks change: the embeddings are reused.
    let unet_only = BlockWeights { output: 0.5, ..BlockWeights::default() };
    sd.set_adapter_mix("a", 0.7, &unet_only).unwrap();
    sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(sd.text_encoder_runs(), 1, "UNet-only change");
    // The adapter's text-encoder layers change: the text encoder runs again, and the image is
    // the one an uncached model draws.
    sd.set_adapter_mix("a", 0.3, &unet_only).unwrap();
    let cached = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(sd.text_encoder_runs(), 2, "text-encoder change");
    let mut fresh = StableDiffusion::load(&model, &Device::Cpu).unwrap();
    fresh.load_adapter("a", &adapter, 0.3).unwrap();
    fresh.set_adapter_mix("a", 0.3, &unet_only).unwrap();
    assert_eq!(cached, fresh.generate(&req, &mut |_, _| {}).unwrap());
    // Removing the adapter is a text-encoder change too.
    sd.remove_adapter("a");
    sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(sd.text_encoder_runs(), 3);
}

/// The Tucker forms no fixture file covers (LoHa with hada_t1/t2, LoKr with lokr_t2), against
/// LyCORIS' einsum definitions written out as loops: rebuild[p, q, k] = Σᵢⱼ t[i, j, k]·a[i, p]·b[j, q].
#[test]
fn tucker_loha_and_lokr_match_the_einsum_written_as_loops() {
    use lora_studio::engine::adapters::delta::KronFactor;
    let mut rng = Rng::new(9);
    let rebuild = |t: &[f32], a: &[f32], b: &[f32], r1: usize, r2: usize, p: usize, q: usize, kk: usize| {
        let mut out = vec![0f32; p * q * kk];
        for pi in 0..p {
            for qi in 0..q {
                for k in 0..kk {
                    let mut s = 0f32;
                    for i in 0..r1 {
                        for j in 0..r2 {
                            s += t[(i * r2 + j) * kk + k] * a[i * p + pi] * b[j * q + qi];
                        }
                    }
                    out[(pi * q + qi) * kk + k] = s;
                }
            }
        }
        out
    };
    // LoHa with Tucker cores on a 3×3 conv (out 5, in 4, rank 2).
    let (out, inp, r, kk) = (5, 4, 2, 9);
    let w = randn(&mut rng, &[out, inp, 3, 3]);
    let (t1, a1, b1) = (randn(&mut rng, &[r, r, 3, 3]), randn(&mut rng, &[r, out]), randn(&mut rng, &[r, inp]));
    let (t2, a2, b2) = (randn(&mut rng, &[r, r, 3, 3]), randn(&mut rng, &[r, out]), randn(&mut rng, &[r, inp]));
    let p1 = rebuild(&values(&t1), &values(&a1), &values(&b1), r, r, out, inp, kk);
    let p2 = rebuild(&values(&t2), &values(&a2), &values(&b2), r, r, out, inp, kk);
    let expect: Vec<f32> = p1.iter().zip(&p2).map(|(x, y)| x * y).collect();
    let delta = Delta::Loha { w1a: a1, w1b: b1, w2a: a2, w2b: b2, tucker: Some((t1, t2)) };
    delta.check_shapes(w.dims()).unwrap();
    assert!(max_diff(&values(&delta.delta_weight(&w).unwrap()), &expect) < 1e-4, "Tucker LoHa");
    check_modes_agree(w, delta, true);

    // LoKr: w1 (2, 2) whole ⊗ w2 rebuilt from a Tucker core (o2 3, i2 2, rank 2) on a 3×3 conv.
    let (o1, i1, o2, i2) = (2, 2, 3, 2);
    let w = randn(&mut rng, &[o1 * o2, i1 * i2, 3, 3]);
    let w1 = randn(&mut rng, &[o1, i1]);
    let (t, a, b) = (randn(&mut rng, &[r, r, 3, 3]), randn(&mut rng, &[r, o2]), randn(&mut rng, &[r, i2]));
    let w2 = rebuild(&values(&t), &values(&a), &values(&b), r, r, o2, i2, kk);
    let w1v = values(&w1);
    let mut expect = vec![0f32; o1 * o2 * i1 * i2 * kk];
    for (x, y, c, d, k) in nested_indices(o1, o2, i1, i2, kk) {
        expect[((x * o2 + y) * (i1 * i2) + (c * i2 + d)) * kk + k] = w1v[x * i1 + c] * w2[(y * i2 + d) * kk + k];
    }
    let delta = Delta::Lokr { w1: KronFactor::Whole(w1), w2: KronFactor::LowRank { a, b, tucker: Some(t) } };
    delta.check_shapes(w.dims()).unwrap();
    assert!(max_diff(&values(&delta.delta_weight(&w).unwrap()), &expect) < 1e-4, "Tucker LoKr");
    check_modes_agree(w, delta, true);
}

/// Every index of a 5-deep loop nest.
fn nested_indices(a: usize, b: usize, c: usize, d: usize, e: usize) -> Vec<(usize, usize, usize, usize, usize)> {
    let mut v = Vec::new();
    for x in 0..a {
        for y in 0..b {
            for z in 0..c {
                for w in 0..d {
                    for k in 0..e {
                        v.push((x, y, z, w, k));
                    }
                }
            }
        }
    }
    v
}
