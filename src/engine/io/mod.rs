//! Model files: safetensors reading and checked writing (`weights`), diffusers folders, and
//! original-layout single-file checkpoints.

pub mod diffusers_folder;
pub mod single_file;
pub mod weights;
