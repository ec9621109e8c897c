//! The UNet, text encoder and VAE reproduce the reference diffusers/transformers outputs
//! stored in `tests/fixtures/sd1-tiny` (see its README).

mod common;

use candle_core::DType;
use common::*;
use lora_studio::engine::models::clip::{ClipConfig, ClipTextModel};
use lora_studio::engine::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_studio::engine::models::vae::{AutoencoderKL, VaeConfig};

#[test]
fn text_encoder_matches_reference() {
    let r = reference();
    let cfg = ClipConfig::from_file(&sd1_tiny().join("model/text_encoder/config.json")).unwrap();
    let model = ClipTextModel::load(&cfg, &component("text_encoder", "model.safetensors", DType::F32)).unwrap();
    let out = model.forward(&r["input_ids"]).unwrap();
    assert_close("text_embeddings", &out, &r["text_embeddings"]);
}

#[test]
fn unet_matches_reference() {
    let r = reference();
    let cfg = UNetConfig::from_file(&sd1_tiny().join("model/unet/config.json")).unwrap();
    let model = UNet2DConditionModel::load(&cfg, &component("unet", "diffusion_pytorch_model.safetensors", DType::F32))
        .unwrap();
    let out = model.forward(&r["sample"], &r["timestep"], &r["text_embeddings"]).unwrap();
    assert_close("noise_pred", &out, &r["noise_pred"]);
}

#[test]
fn vae_matches_reference() {
    let r = reference();
    let cfg = VaeConfig::from_file(&sd1_tiny().join("model/vae/config.json")).unwrap();
    let model =
        AutoencoderKL::load(&cfg, &component("vae", "diffusion_pytorch_model.safetensors", DType::F32)).unwrap();
    assert_close("vae_decoded", &model.decode(&r["vae_latents"]).unwrap(), &r["vae_decoded"]);
    assert_close("vae_encoded_mean", &model.encode_mean(&r["vae_image"]).unwrap(), &r["vae_encoded_mean"]);
}
