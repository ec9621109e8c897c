//! Opens the window on its own, for looking at the UI while the command line is elsewhere in
//! progress: `cargo run --example window [MODEL_LABEL]`.

fn main() -> anyhow::Result<()> {
    let model_label = std::env::args().nth(1).unwrap_or_else(|| "built-in".to_owned());
    lora_studio::ui::run_window(lora_studio::ui::WindowOptions { model_label })
}
