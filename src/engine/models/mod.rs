//! The networks, with diffusers' / transformers' module trees and parameter names: layers (`nn`),
//! the UNet, the CLIP text encoder and its tokenizer, and the VAE.

pub mod clip;
pub mod family;
pub mod nn;
pub mod prompt;
pub mod tokenizer;
pub mod unet;
pub mod vae;
