//! The path every non-CPU device takes (composed candle ops, candle's backward; our CPU kernels
//! and the checkpoint op switched off), forced on the CPU: the fixture model still reproduces
//! diffusers' outputs through it, with and without adapters, so a GPU build starts from ops
//! that are right. (`tests/gradients.rs` checks the same path's gradients.)

mod common;

use candle_core::Device;
use common::*;
use lora_studio::engine::kernels::cpu::use_composed_ops_on_this_thread;
use lora_studio::engine::pipeline::StableDiffusion;

#[test]
fn the_composed_path_reproduces_the_reference_outputs() {
    use_composed_ops_on_this_thread(true);
    let r = reference();
    let mut sd = StableDiffusion::load(&sd1_tiny().join("model"), &Device::Cpu).unwrap();
    let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
    assert_close("composed: text_embeddings", &emb, &r["text_embeddings"]);
    let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
    assert_close("composed: noise_pred", &pred, &r["noise_pred"]);
    assert_close("composed: vae_decoded", &sd.vae.decode(&r["vae_latents"]).unwrap(), &r["vae_decoded"]);
    assert_close("composed: vae_encoded_mean", &sd.vae.encode_mean(&r["vae_image"]).unwrap(), &r["vae_encoded_mean"]);
    // With an adapter, factored (as training runs it) and merged.
    sd.load_adapter("a", &sd1_tiny().join("lora_a_kohya.safetensors"), 0.7).unwrap();
    for merged in [true, false] {
        sd.set_merged(merged).unwrap();
        let emb = sd.text_encoder.forward(&r["input_ids"]).unwrap();
        assert_close(&format!("composed: text_embeddings_a07 (merged {merged})"), &emb, &r["text_embeddings_a07"]);
        let pred = sd.unet.forward(&r["sample"], &r["timestep"], &emb).unwrap();
        assert_close(&format!("composed: noise_pred_a07 (merged {merged})"), &pred, &r["noise_pred_a07"]);
    }
}
