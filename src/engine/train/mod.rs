//! Training: the dataset and its pre-flight checks, the trainer (adapters or full fine-tuning,
//! checkpoints, latent cache), the memory a step needs, and the same job for kohya's sd-scripts.

pub mod dataset;
pub mod fresh;
pub mod kohya_export;
pub mod memory;
pub mod optim;
pub mod record;
pub mod trainer;
