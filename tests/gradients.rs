//! Gradients through text encoder + UNet match central finite differences (f64), for a chosen
//! weight of every layer kind. This guards against candle ops that silently record no backward.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use lora_studio::engine::io::weights::WeightMap;
use lora_studio::engine::models::clip::{ClipConfig, ClipTextModel};
use lora_studio::engine::models::unet::{UNet2DConditionModel, UNetConfig};

use lora_studio::engine::kernels::cpu::{composed_ops, use_composed_ops_on_this_thread};

/// Each check runs twice: through our CPU kernels, and through the composed candle ops a GPU (any
/// non-CPU device) runs, forced on the CPU, so that path's gradients are checked without a GPU.
macro_rules! on_both_paths {
    ($($checks:ident => $kernels:ident, $composed:ident;)*) => {$(
        #[test]
        fn $kernels() {
            $checks();
        }
        #[test]
        fn $composed() {
            use_composed_ops_on_this_thread(true);
            $checks();
        }
    )*};
}

on_both_paths! {
    gradients_match_finite_differences_checks => gradients_match_finite_differences, gradients_match_finite_differences_composed;
    gradient_checkpointing_gives_the_same_gradients_checks => gradient_checkpointing_gives_the_same_gradients, gradient_checkpointing_gives_the_same_gradients_composed;
    lora_layer_gradients_match_finite_differences_checks => lora_layer_gradients_match_finite_differences, lora_layer_gradients_match_finite_differences_composed;
    loha_lokr_and_dora_gradients_match_finite_differences_checks => loha_lokr_and_dora_gradients_match_finite_differences, loha_lokr_and_dora_gradients_match_finite_differences_composed;
}

/// One tensor per layer kind the engine has (conv, 1×1 conv, linear in and out of attention,
/// GEGLU, norms, time embedding, embeddings).
const CHECKED: &[&str] = &[
    "unet:conv_in.weight",
    "unet:time_embedding.linear_1.weight",
    "unet:down_blocks.0.resnets.0.norm1.weight",
    "unet:down_blocks.0.resnets.0.conv1.weight",
    "unet:down_blocks.0.resnets.0.time_emb_proj.bias",
    "unet:down_blocks.0.attentions.0.norm.bias",
    "unet:down_blocks.0.attentions.0.proj_in.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
    "unet:down_blocks.0.downsamplers.0.conv.weight",
    "unet:mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight",
    "unet:up_blocks.0.resnets.0.conv_shortcut.weight",
    "unet:up_blocks.0.upsamplers.0.conv.weight",
    "unet:up_blocks.1.attentions.0.proj_out.weight",
    "unet:conv_norm_out.weight",
    "text:text_model.embeddings.token_embedding.weight",
    "text:text_model.embeddings.position_embedding.weight",
    "text:text_model.encoder.layers.0.layer_norm1.weight",
    "text:text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text:text_model.encoder.layers.0.self_attn.k_proj.weight",
    "text:text_model.encoder.layers.0.mlp.fc1.weight",
    "text:text_model.final_layer_norm.bias",
];

/// Named trainable tensors.
type Vars = Vec<(String, Var)>;

/// The fixture's UNet and text encoder weights in f64 with the `CHECKED` tensors made trainable.
fn checked_weights() -> (WeightMap, WeightMap, Vars, Vars) {
    let mut unet_w = component("unet", "diffusion_pytorch_model.safetensors", DType::F64);
    let mut text_w = component("text_encoder", "model.safetensors", DType::F64);
    let unet_vars = unet_w.make_trainable(|n| CHECKED.contains(&format!("unet:{n}").as_str())).unwrap();
    let text_vars = text_w.make_trainable(|n| CHECKED.contains(&format!("text:{n}").as_str())).unwrap();
    (unet_w, text_w, unet_vars, text_vars)
}

fn gradients_match_finite_differences_checks() {
    let dev = Device::Cpu;
    let r = reference();
    let (unet_w, text_w, unet_vars, text_vars) = checked_weights();
    assert_eq!(unet_vars.len() + text_vars.len(), CHECKED.len(), "every checked tensor exists");

    let unet_cfg = UNetConfig::from_file(&sd1_tiny().join("model/unet/config.json")).unwrap();
    let text_cfg = ClipConfig::from_file(&sd1_tiny().join("model/text_encoder/config.json")).unwrap();
    let unet = UNet2DConditionModel::load(&unet_cfg, &unet_w).unwrap();
    let text = ClipTextModel::load(&text_cfg, &text_w).unwrap();

    // Batch of one, 8×8 latents: small enough to evaluate the loss a few hundred times.
    let ids = r["input_ids"].narrow(0, 0, 1).unwrap();
    let sample = r["sample"]
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(2, 0, 8)
        .unwrap()
        .narrow(3, 0, 8)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let t = Tensor::new(&[250f64], &dev).unwrap();
    // A fixed random projection makes the loss depend on every output element differently.
    let probe: Vec<f64> = (0..sample.elem_count()).map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0).collect();
    let probe = Tensor::from_vec(probe, sample.dims(), &dev).unwrap();
    let loss = || -> Tensor {
        let ctx = text.forward(&ids).unwrap();
        let out = unet.forward(&sample, &t, &ctx).unwrap();
        (out * &probe).unwrap().sum_all().unwrap()
    };

    let grads = loss().backward().unwrap();
    let mut failures = Vec::new();
    for (name, var) in unet_vars.iter().chain(text_vars.iter()) {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient recorded"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        // Probe the element with the largest analytic gradient and two fixed ones.
        let largest = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        for idx in [largest, 0, g.len() / 2] {
            let numeric = central_difference(var, idx, &loss);
            let analytic = g[idx];
            let err = (numeric - analytic).abs();
            let scale = analytic.abs().max(numeric.abs()).max(1e-6);
            if err > 1e-5 + 1e-4 * scale {
                failures.push(format!("{name}[{idx}]: analytic {analytic:.6e}, numeric {numeric:.6e}"));
            }
        }
    }
    assert!(failures.is_empty(), "gradient mismatches:\n{}", failures.join("\n"));
}

fn central_difference(var: &Var, idx: usize, loss: &dyn Fn() -> Tensor) -> f64 {
    let h = 1e-5;
    let original = var.as_tensor().copy().unwrap();
    let shape = original.dims().to_vec();
    let base: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
    let eval = |delta: f64| -> f64 {
        let mut v = base.clone();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
        loss().to_scalar::<f64>().unwrap()
    };
    let plus = eval(h);
    let minus = eval(-h);
    var.set(&original).unwrap();
    (plus - minus) / (2.0 * h)
}

/// Gradient checkpointing changes where activations live, not the gradients: every checked
/// weight (inside blocks and outside them, and the text encoder's through the context) gets the
/// same gradient with it on, through the outer graph plus the checkpoint sink.
fn gradient_checkpointing_gives_the_same_gradients_checks() {
    use lora_studio::engine::kernels::recompute::GradSink;
    let dev = Device::Cpu;
    let r = reference();
    let (unet_w, text_w, unet_vars, text_vars) = checked_weights();
    let unet_cfg = UNetConfig::from_file(&sd1_tiny().join("model/unet/config.json")).unwrap();
    let text_cfg = ClipConfig::from_file(&sd1_tiny().join("model/text_encoder/config.json")).unwrap();
    let mut unet = UNet2DConditionModel::load(&unet_cfg, &unet_w).unwrap();
    let text = ClipTextModel::load(&text_cfg, &text_w).unwrap();
    let ids = r["input_ids"].narrow(0, 0, 2).unwrap();
    let sample = r["sample"].narrow(0, 0, 2).unwrap().to_dtype(DType::F64).unwrap();
    let t = Tensor::new(&[250f64, 700.0], &dev).unwrap();
    let probe: Vec<f64> = (0..sample.elem_count()).map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0).collect();
    let probe = Tensor::from_vec(probe, sample.dims(), &dev).unwrap();
    let all: Vec<(String, Var)> = unet_vars.into_iter().chain(text_vars).collect();
    let from_sink = std::cell::Cell::new(0);
    let grads = |unet: &UNet2DConditionModel| -> Vec<Tensor> {
        let ctx = text.forward(&ids).unwrap();
        let out = unet.forward(&sample, &t, &ctx).unwrap();
        let store = (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        all.iter()
            .map(|(name, v)| {
                let outer = store.get(v.as_tensor()).cloned();
                let inner = unet.checkpointing.as_ref().and_then(|s| s.take(v.as_tensor()));
                from_sink.set(from_sink.get() + inner.is_some() as usize);
                match (outer, inner) {
                    (Some(a), Some(b)) => (a + b).unwrap(),
                    (a, b) => a.or(b).unwrap_or_else(|| panic!("{name}: no gradient")),
                }
            })
            .collect()
    };
    let plain = grads(&unet);
    unet.checkpointing = Some(GradSink::new(all.iter().map(|(_, v)| v.clone()).collect()));
    let checkpointed = grads(&unet);
    if composed_ops() {
        // Other devices keep the blocks' activations: the same gradients, all from the graph.
        assert_eq!(from_sink.get(), 0, "the checkpoint op is CPU-only");
    } else {
        // The weights inside blocks (most of CHECKED) got theirs through the checkpoints.
        assert!(from_sink.get() >= 15, "only {} gradients came through the checkpoints", from_sink.get());
    }
    for ((name, _), (a, b)) in all.iter().zip(plain.iter().zip(&checkpointed)) {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(diff <= 1e-9 * scale.max(1.0), "{name}: differs by {diff:e} (scale {scale:e})");
    }
}

/// A layer training one LoRA runs it fused with its frozen base weight (`frozen::lora_linear`):
/// the gradients of its input and both factors match central differences.
fn lora_layer_gradients_match_finite_differences_checks() {
    use lora_studio::engine::adapters::delta::Delta;
    use lora_studio::engine::adapters::stack::{AdapterStack, LayerAdapter};
    let dev = Device::Cpu;
    let values = |n: usize, seed: usize| -> Vec<f64> {
        (0..n).map(|i| (((i + seed) * 7919) % 1000) as f64 / 500.0 - 1.0).collect()
    };
    let tensor =
        |shape: &[usize], seed: usize| Tensor::from_vec(values(shape.iter().product(), seed), shape, &dev).unwrap();
    let x = Var::from_tensor(&tensor(&[2, 3, 6], 1)).unwrap();
    let down = Var::from_tensor(&tensor(&[2, 6], 2)).unwrap();
    let up = Var::from_tensor(&tensor(&[5, 2], 3)).unwrap();
    let bias = tensor(&[5], 4);
    let probe = tensor(&[2, 3, 5], 5);
    let weight = tensor(&[5, 6], 6);
    // The fused op applies to this layer (it falls back to the composed form with `None`).
    let fused = lora_studio::engine::kernels::frozen::lora_linear(&x, &weight, Some(&bias), &down, &up, 0.75).unwrap();
    if composed_ops() {
        assert!(fused.is_none(), "the composed path does not take the fused op");
    } else {
        assert!(fused.is_some(), "the fused LoRA op is taken for an f64 linear layer");
    }
    let mut stack = AdapterStack::new(weight);
    stack.merge = false;
    let delta = Delta::Lora { down: down.as_tensor().clone(), up: up.as_tensor().clone() };
    stack.attach(LayerAdapter { name: "trained".into(), delta, scale: 0.5, multiplier: 1.5 }).unwrap();
    let loss = || (stack.forward_linear(&x, Some(&bias)).unwrap() * &probe).unwrap().sum_all().unwrap();
    let grads = loss().backward().unwrap();
    for (name, var) in [("x", &x), ("down", &down), ("up", &up)] {
        let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for idx in [0, g.len() / 2, g.len() - 1] {
            let numeric = central_difference(var, idx, &loss);
            assert!(
                (numeric - g[idx]).abs() < 1e-6 + 1e-6 * numeric.abs(),
                "{name}[{idx}]: analytic {}, numeric {numeric}",
                g[idx]
            );
        }
    }
}

/// The kinds trained through their whole weight change (LoHa, LoKr, DoRA) get gradients that
/// match central differences, on a linear layer and a 3×3 convolution, with a base that moves
/// nothing (f64, the stack run factored as in training).
fn loha_lokr_and_dora_gradients_match_finite_differences_checks() {
    use lora_studio::engine::adapters::delta::{Delta, KronFactor};
    use lora_studio::engine::adapters::stack::{AdapterStack, LayerAdapter};
    let dev = Device::Cpu;
    let values = |n: usize, seed: usize| -> Vec<f64> {
        (0..n).map(|i| (((i + seed) * 7919) % 1000) as f64 / 500.0 - 1.0).collect()
    };
    let tensor =
        |shape: &[usize], seed: usize| Tensor::from_vec(values(shape.iter().product(), seed), shape, &dev).unwrap();
    let var = |shape: &[usize], seed: usize| Var::from_tensor(&tensor(shape, seed)).unwrap();
    for conv in [false, true] {
        let (out, inp) = (6, 4);
        let kernel: &[usize] = if conv { &[3, 3] } else { &[] };
        let kk: usize = kernel.iter().product();
        let base = tensor(&[&[out, inp][..], kernel].concat(), 11);
        let x = if conv { tensor(&[2, inp, 5, 5], 12) } else { tensor(&[2, 3, inp], 12) };
        let probe_shape = if conv { vec![2, out, 5, 5] } else { vec![2, 3, out] };
        let probe = tensor(&probe_shape, 13);
        // Every factor of each kind is a variable.
        let loha = [var(&[out, 2], 1), var(&[2, inp * kk], 2), var(&[out, 2], 3), var(&[2, inp * kk], 4)];
        let lokr = [var(&[2, 2], 5), var(&[3, 2], 6), var(&[2, 2 * kk], 7)];
        let lora =
            [var(&[&[2, inp][..], kernel].concat(), 8), var(&[&[out, 2][..], &vec![1; kernel.len()]].concat(), 9)];
        let magnitude = var(&[&[out, 1][..], &vec![1; kernel.len()]].concat(), 10);
        let t = |v: &Var| v.as_tensor().clone();
        let cases: Vec<(&str, Delta, Vec<&Var>)> = vec![
            (
                "loha",
                Delta::Loha { w1a: t(&loha[0]), w1b: t(&loha[1]), w2a: t(&loha[2]), w2b: t(&loha[3]), tucker: None },
                loha.iter().collect(),
            ),
            (
                "lokr",
                Delta::Lokr {
                    w1: KronFactor::Whole(t(&lokr[0])),
                    w2: KronFactor::LowRank { a: t(&lokr[1]), b: t(&lokr[2]), tucker: None },
                },
                lokr.iter().collect(),
            ),
            (
                "dora",
                Delta::Dora {
                    inner: Box::new(Delta::Lora { down: t(&lora[0]), up: t(&lora[1]) }),
                    inner_scale: 0.5,
                    magnitude: t(&magnitude),
                },
                vec![&lora[0], &lora[1], &magnitude],
            ),
        ];
        for (name, delta, vars) in cases {
            let mut stack = AdapterStack::new(base.clone());
            stack.merge = false;
            stack.attach(LayerAdapter { name: "trained".into(), delta, scale: 0.75, multiplier: 1.0 }).unwrap();
            let bias = tensor(&[out], 14);
            let loss = || {
                let y = if conv {
                    stack.forward_conv(&x, Some(&bias), 1, 1).unwrap()
                } else {
                    stack.forward_linear(&x, Some(&bias)).unwrap()
                };
                (y * &probe).unwrap().sum_all().unwrap()
            };
            let grads = loss().backward().unwrap();
            for (i, v) in vars.iter().enumerate() {
                let g: Vec<f64> = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: tensor {i} gets a gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for idx in [0, g.len() / 2, g.len() - 1] {
                    let numeric = central_difference(v, idx, &loss);
                    assert!(
                        (numeric - g[idx]).abs() < 1e-5 + 1e-5 * numeric.abs(),
                        "{name} (conv {conv}) tensor {i}[{idx}]: analytic {}, numeric {numeric}",
                        g[idx]
                    );
                }
            }
        }
    }
}
