//! The diffusion engine: models, noise schedule, samplers and file formats.
//! Nothing in here knows about the GUI; the window, the CLI and the job layer all call into it.

pub mod adapter;
pub mod attention;
pub mod bench;
pub mod blend;
pub mod builtin;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod cpu;
pub mod dataset;
pub mod diffusers_folder;
pub mod formats;
pub mod frozen;
pub mod geglu;
pub mod kohya_job;
pub mod memory;
pub mod mixing;
pub mod nn;
pub mod normalise;
pub mod pipeline;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod silu;
pub mod single_file;
pub mod synthetic;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

/// Every engine call returns this; errors carry the file and the problem in one line.
pub type Result<T> = anyhow::Result<T>;
