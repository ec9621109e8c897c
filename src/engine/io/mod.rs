//! Files: safetensors reading and checked writing (`weights`), diffusers folders, original-layout
//! single-file checkpoints, and the generation parameters A1111 stores in a PNG (`infotext`).

pub mod diffusers_folder;
pub mod infotext;
pub mod single_file;
pub mod weights;
