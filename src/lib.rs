//! LoRA Studio: train, blend and export LoRA adapters for Stable Diffusion.
//! `engine` is the model and file-format core (no GUI); `ui` draws the window; `cli` is the
//! headless front end. They meet only through the engine's public API.

pub mod cli;
pub mod engine;
pub mod job;
pub mod ui;
