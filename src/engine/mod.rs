//! The diffusion engine: models, noise schedule, samplers, adapters, file formats and training.
//! Nothing in here knows about the GUI; the window, the CLI and the job layer all call into it.
//! One folder per concept (see ARCHITECTURE.md): the data flows dataset → latents → trainer →
//! adapter file → adapter stack → sampler → image.

pub mod adapters;
pub mod bench;
pub mod builtin;
pub mod device;
pub mod diffusion;
pub mod grid;
pub mod io;
pub mod kernels;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod train;

/// Every engine call returns this; errors carry the file and the problem in one line.
pub type Result<T> = anyhow::Result<T>;
