//! The diffusion maths: the training noise schedule and the inference samplers.

pub mod sampler;
pub mod schedule;
