//! Frozen weights kept in half precision (`--weights f16|bf16`, and `auto` for half-precision
//! files): the weight matrices stay f16 / bf16 in memory and the outputs stay within 1e-2 × max|ref|
//! of diffusers' f32 references. How we compare: the fixture weights are f32, so they are rounded to
//! half precision on load and the tolerance covers that rounding. On our CPU kernels a half weight is
//! widened to f32 per layer (the maths is f32); on the composed path every other device takes (forced
//! here on the CPU), the GEMMs of f16 weights run in f16 (autocast), which these tests cover too
//! (bf16 GEMMs only on a GPU: candle's CPU backend has none, so there bf16 is widened).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_studio::engine::io::weights::{WeightMap, WeightPrecision, read_safetensors, write_safetensors};
use lora_studio::engine::kernels::cpu::use_composed_ops_on_this_thread;
use lora_studio::engine::models::clip::{ClipConfig, ClipTextModel};
use lora_studio::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_studio::engine::models::vae::{AutoencoderKL, VaeConfig};
use lora_studio::engine::pipeline::{ModelWeights, StableDiffusion};

const HALF: [(WeightPrecision, DType); 2] = [(WeightPrecision::F16, DType::F16), (WeightPrecision::Bf16, DType::BF16)];

/// max|ours − ref| / max|ref|, printed; asserted ≤ 1e-2.
fn assert_within_1e2(name: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let (o, r) = (ours.to_dtype(DType::F64).unwrap(), reference.to_dtype(DType::F64).unwrap());
    let max_ref = r.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let diff = (o - &r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let ratio = diff / max_ref;
    eprintln!("{name}: max diff {diff:.3e}, max |ref| {max_ref:.3e}, ratio {ratio:.2e}");
    assert!(ratio <= 1e-2, "{name}: {diff} exceeds 1e-2 × {max_ref}");
    ratio
}

fn half_component(name: &str, file: &str, precision: WeightPrecision) -> WeightMap {
    let path = sd1_tiny().join("model").join(name).join(file);
    WeightMap::load_with_precision(&[path], DType::F32, precision, &Device::Cpu).unwrap()
}

/// Every weight matrix in `dtype`, everything of rank 1 (biases, norms) in f32.
fn assert_kept_as(map: &WeightMap, dtype: DType) {
    let mut matrices = 0;
    for name in map.names() {
        let t = map.tensor(name).unwrap();
        let expected = if t.rank() >= 2 { dtype } else { DType::F32 };
        assert_eq!(t.dtype(), expected, "{name} {:?}", t.dims());
        matrices += (t.rank() >= 2) as usize;
    }
    assert!(matrices > 10, "{matrices} weight matrices");
}

#[test]
fn half_precision_weights_match_diffusers_within_1e_2_on_both_op_paths() {
    let r = reference();
    let unet_cfg = UNetConfig::from_file(&sd1_tiny().join("model/unet/config.json")).unwrap();
    let text_cfg = ClipConfig::from_file(&sd1_tiny().join("model/text_encoder/config.json")).unwrap();
    let vae_cfg = VaeConfig::from_file(&sd1_tiny().join("model/vae/config.json")).unwrap();
    let mut worst: f64 = 0.0;
    for (precision, dtype) in HALF {
        let unet_w = half_component("unet", "diffusion_pytorch_model.safetensors", precision);
        let text_w = half_component("text_encoder", "model.safetensors", precision);
        let vae_w = half_component("vae", "diffusion_pytorch_model.safetensors", precision);
        for w in [&unet_w, &text_w, &vae_w] {
            assert_kept_as(w, dtype);
        }
        let unet = UNet2DConditionModel::load(&unet_cfg, &unet_w).unwrap();
        let text = ClipTextModel::load(&text_cfg, &text_w).unwrap();
        let vae = AutoencoderKL::load(&vae_cfg, &vae_w).unwrap();
        assert_eq!(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight().dtype(), dtype);
        assert_eq!(text.token_embedding.dtype(), dtype);
        // Our CPU kernels, then the composed candle ops every other device runs.
        for composed in [false, true] {
            use_composed_ops_on_this_thread(composed);
            let what = |o: &str| format!("{o} ({precision:?}, composed ops {composed})");
            let checks = [
                (what("text_embeddings"), text.forward(&r["input_ids"]).unwrap(), "text_embeddings"),
                (
                    what("noise_pred"),
                    unet.forward(&r["sample"], &r["timestep"], &r["text_embeddings"]).unwrap(),
                    "noise_pred",
                ),
                (what("vae_decoded"), vae.decode(&r["vae_latents"]).unwrap(), "vae_decoded"),
                (what("vae_encoded_mean"), vae.encode_mean(&r["vae_image"]).unwrap(), "vae_encoded_mean"),
            ];
            for (name, ours, key) in checks {
                assert_eq!(ours.dtype(), DType::F32, "{name}: computed in f32");
                worst = worst.max(assert_within_1e2(&name, &ours, &r[key]));
            }
            use_composed_ops_on_this_thread(false);
        }
    }
    eprintln!("worst ratio over f16 and bf16 weights: {worst:.2e}");
}

/// `auto` keeps a half-precision file in half precision (no f32 copy on the way in), `f32`
/// widens it, and an f32 file stays f32 under `auto`.
#[test]
fn auto_keeps_what_the_file_stores() {
    let dir = tempdir("half-file");
    let file = sd1_tiny().join("model/unet/diffusion_pytorch_model.safetensors");
    let halved: std::collections::HashMap<String, Tensor> =
        read_safetensors(&file).unwrap().into_iter().map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap())).collect();
    let f16_file = dir.join("unet.safetensors");
    write_safetensors(&f16_file, &halved, None).unwrap();
    let load = |p: &std::path::Path, precision| {
        WeightMap::load_with_precision(&[p.to_path_buf()], DType::F32, precision, &Device::Cpu).unwrap()
    };
    assert_kept_as(&load(&f16_file, WeightPrecision::Auto), DType::F16);
    assert_kept_as(&load(&f16_file, WeightPrecision::F32), DType::F32);
    assert_kept_as(&load(&f16_file, WeightPrecision::Bf16), DType::BF16);
    assert_kept_as(&load(&file, WeightPrecision::Auto), DType::F32);
}

/// A value half precision cannot hold is refused with the setting that would hold it, not turned
/// into an infinity the model then computes with.
#[test]
fn a_weight_too_large_for_f16_is_refused_in_words() {
    let dir = tempdir("half-overflow");
    let mut tensors = read_safetensors(&sd1_tiny().join("model/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let name = "conv_in.weight";
    let big = (tensors[name].ones_like().unwrap() * 1e6).unwrap();
    tensors.insert(name.into(), big);
    let file = dir.join("unet.safetensors");
    write_safetensors(&file, &tensors, None).unwrap();
    let err =
        WeightMap::load_with_precision(std::slice::from_ref(&file), DType::F32, WeightPrecision::F16, &Device::Cpu)
            .err()
            .expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("conv_in.weight") && msg.contains("--weights f32"), "{msg}");
    // bf16 has f32's range: it holds the value.
    WeightMap::load_with_precision(&[file], DType::F32, WeightPrecision::Bf16, &Device::Cpu).unwrap();
}

/// Adapters over half-precision weights: they stay f32, merged and unmerged give the LyCORIS / PEFT
/// references within 1e-2, and merging keeps the merged weight in half precision.
#[test]
fn adapters_over_half_precision_weights_match_their_references() {
    let r = reference();
    let refs = read_safetensors(&sd1_tiny().join("adapters/reference.safetensors")).unwrap();
    let weights =
        ModelWeights::load(&sd1_tiny().join("model"), DType::F32, WeightPrecision::F16, &Device::Cpu).unwrap();
    let mut sd = StableDiffusion::from_weights(weights).unwrap();
    for (name, weight, suffix) in
        [("lyco_loha", 0.7, ""), ("lyco_lokr", 0.7, ""), ("peft_dora", 1.0, "_w1"), ("lyco_boft", 1.0, "_w1")]
    {
        let file = sd1_tiny().join(format!("adapters/{name}.safetensors"));
        sd.load_adapter(name, &file, weight).unwrap();
        for merged in [true, false] {
            sd.set_merged(merged).unwrap();
            let layer = &sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k;
            assert_eq!(layer.weight().dtype(), DType::F16);
            let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
            let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
            let what = format!("{name} at {weight}, merged {merged}");
            assert_within_1e2(
                &format!("text_embeddings: {what}"),
                &emb,
                &refs[&format!("text_embeddings_{name}{suffix}")],
            );
            assert_within_1e2(&format!("noise_pred: {what}"), &pred, &refs[&format!("noise_pred_{name}{suffix}")]);
        }
        assert!(sd.remove_adapter(name));
    }
}

/// Training a LoRA over an f16 base, a linear layer and a 3×3 convolution: on our CPU kernels the
/// base is widened exactly, so every gradient equals the one over the same values in f32; on the
/// composed path (every other device's) the base's GEMMs run in f16 (autocast) and the gradients
/// stay within 1e-2 of those, flowing back to the f32 factors through the casts.
#[test]
fn lora_gradients_over_an_f16_base_on_both_op_paths() {
    use candle_core::Var;
    use lora_studio::engine::adapters::delta::Delta;
    use lora_studio::engine::adapters::stack::{AdapterStack, LayerAdapter};
    let dev = Device::Cpu;
    let tensor = |shape: &[usize], seed: usize| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    // (input, weight, down, up, probe) shapes: a linear layer, then a 3×3 convolution.
    type Shapes = [&'static [usize]; 5];
    // The last two are larger than one widening block (2 MB of f32 rows): the CPU kernels then
    // widen and multiply them in several blocks of rows.
    let cases: [(&str, Shapes); 4] = [
        ("linear", [&[2, 5, 16], &[12, 16], &[3, 16], &[12, 3], &[2, 5, 12]]),
        ("conv", [&[2, 8, 6, 6], &[10, 8, 3, 3], &[3, 8, 3, 3], &[10, 3, 1, 1], &[2, 10, 6, 6]]),
        ("linear", [&[2, 3, 2048], &[300, 2048], &[4, 2048], &[300, 4], &[2, 3, 300]]),
        ("conv", [&[1, 256, 5, 5], &[300, 256, 3, 3], &[4, 256, 3, 3], &[300, 4, 1, 1], &[1, 300, 5, 5]]),
    ];
    for (kind, [xs, ws, ds, us, ps]) in cases {
        let half = tensor(ws, 6).to_dtype(DType::F16).unwrap();
        let grads = |base: &Tensor, composed: bool| -> Vec<Vec<f32>> {
            use_composed_ops_on_this_thread(composed);
            let x = Var::from_tensor(&tensor(xs, 1)).unwrap();
            let down = Var::from_tensor(&(tensor(ds, 2) * 0.3).unwrap()).unwrap();
            let up = Var::from_tensor(&(tensor(us, 3) * 0.3).unwrap()).unwrap();
            let mut stack = AdapterStack::new(base.clone());
            stack.merge = false;
            let delta = Delta::Lora { down: down.as_tensor().clone(), up: up.as_tensor().clone() };
            stack.attach(LayerAdapter { name: "trained".into(), delta, scale: 0.5, multiplier: 1.0 }).unwrap();
            let bias = tensor(&ws[..1], 4);
            let y = if kind == "conv" {
                stack.forward_conv(x.as_tensor(), Some(&bias), 1, 1).unwrap()
            } else {
                stack.forward_linear(x.as_tensor(), Some(&bias)).unwrap()
            };
            assert_eq!(y.dtype(), DType::F32);
            let g = (y * tensor(ps, 5)).unwrap().sum_all().unwrap().backward().unwrap();
            use_composed_ops_on_this_thread(false);
            [&x, &down, &up]
                .iter()
                .map(|v| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let exact = grads(&half.to_dtype(DType::F32).unwrap(), false);
        for (composed, tolerance) in [(false, 1e-5), (true, 1e-2)] {
            let ours = grads(&half, composed);
            for ((name, a), b) in ["x", "down", "up"].iter().zip(&ours).zip(&exact) {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                eprintln!("{kind} {name} (composed {composed}): max diff {diff:.2e} of {scale:.2e}");
                assert!(diff <= tolerance * scale, "{kind}: gradient of {name} (composed {composed}) off by {diff}");
            }
        }
    }
}
