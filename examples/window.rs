//! Opens the window on its own: `cargo run --example window [--model PATH] [--images DIR]
//! [--train STEPS] [--label TEXT]`. With `--images` the folder is added to the dataset; with
//! `--train` a run of that many steps starts as soon as the scan is done (for screenshots of the
//! Training area mid-run). `--check FILE` (repeatable) opens the Playground with the format
//! doctor's report on each adapter file.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut options = lora_studio::ui::WindowOptions { model_label: "built-in".into(), model: None };
    let mut images: Option<PathBuf> = None;
    let mut train: Option<usize> = None;
    let mut check: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => options.model = args.next().map(PathBuf::from),
            "--images" => images = args.next().map(PathBuf::from),
            "--train" => train = args.next().and_then(|s| s.parse().ok()),
            "--label" => options.model_label = args.next().unwrap_or_default(),
            "--check" => check.extend(args.next().map(PathBuf::from)),
            other => options.model_label = other.to_owned(),
        }
    }
    lora_studio::ui::run_window_with(options, move |app| {
        if let Some(dir) = images {
            app.on_paths_chosen(lora_studio::ui::DialogPurpose::AddImageFolder, vec![dir]);
        }
        if !check.is_empty() {
            app.area = lora_studio::ui::Area::Playground;
            for file in &check {
                app.playground.check_adapter(file);
            }
        }
        // The model's own size and the samples' prompt (the first caption with the trigger word)
        // come from the window's defaults, as for a user.
        if let Some(steps) = train {
            app.config.steps = steps;
            app.config.save_every = (steps / 10).max(1);
            app.config.sample_every = (steps / 10).max(1);
            app.area = lora_studio::ui::Area::Training;
            app.start_training_when_scanned = true;
        }
    })
}
