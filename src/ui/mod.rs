//! The window (being built): for now it only says how to use the command line.

#[derive(Default)]
pub struct WindowOptions {
    pub model_label: String,
}

pub fn run_window(_options: WindowOptions) -> anyhow::Result<()> {
    anyhow::bail!("the window is not built yet; see `lora-studio --help` for the command line")
}
