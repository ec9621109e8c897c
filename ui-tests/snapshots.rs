//! Snapshot images of the window's three areas, rendered by wgpu and compared with the PNGs in
//! `ui-tests/snapshots/`. Built only with `--features snapshots`; with no wgpu adapter on the
//! machine (no Vulkan and no EGL) each test says so and passes without comparing.
//! Update the images: `UPDATE_SNAPSHOTS=1 cargo test --features snapshots --test snapshots`.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use egui_kittest::kittest::Queryable as _;
use egui_kittest::wgpu::WgpuTestRenderer;
use egui_kittest::{Harness, SnapshotOptions};
use lora_studio::ui::{Area, ModelState, StudioApp, WindowOptions};

use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// kittest's renderer, or `None` (with a note) where wgpu finds no adapter.
fn renderer() -> Option<WgpuTestRenderer> {
    // kittest panics when wgpu has no adapter; that is a machine without graphics, not a failure.
    match std::panic::catch_unwind(AssertUnwindSafe(WgpuTestRenderer::new)) {
        Ok(r) => Some(r),
        Err(_) => {
            eprintln!("snapshot skipped: wgpu found no adapter (install mesa-vulkan-drivers or libegl-mesa0)");
            None
        }
    }
}

fn harness(model: Option<PathBuf>) -> Option<Harness<'static, StudioApp>> {
    let renderer = renderer()?;
    let ctx = egui::Context::default();
    // A fixed label: the model's path differs between machines and would show in the status bar.
    let app = StudioApp::new(&ctx, WindowOptions { model_label: "sd1-tiny".into(), model });
    let mut h = Harness::builder()
        .with_size([1100.0, 720.0])
        .renderer(renderer)
        .build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.run();
    Some(h)
}

/// Compares with `ui-tests/snapshots/<name>.png`. Masked: the status bar's memory reading and
/// model, and texts with `masked` in them (timings).
fn snapshot(h: &mut Harness<'_, StudioApp>, name: &str, masked: &[&str]) {
    h.run();
    let mut rects = vec![h.get_by_label_contains("Memory: ").rect(), h.get_by_label_contains("Model: ").rect()];
    rects.extend(masked.iter().map(|m| h.get_by_label_contains(m).rect()));
    for r in rects {
        h.mask(r);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui-tests/snapshots");
    // A few pixels of slack for llvmpipe on another CPU; one changed word is more than that.
    h.snapshot_options(name, &SnapshotOptions::new().output_path(dir).max_failed_pixels(24));
}

/// A folder of a fixed name, so the paths the panels show are the same on every machine.
fn fixed_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("lora-studio-snapshots").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn dataset_area() {
    let Some(mut h) = harness(None) else { return };
    let data = fixed_dir("dataset").join("data");
    make_images(&data);
    drop_paths(&mut h, std::slice::from_ref(&data));
    run_until(&mut h, WAIT, "scan", |a| !a.dataset.is_scanning() && a.dataset.dataset.images.len() == 3);
    run_until(&mut h, WAIT, "thumbnails", |a| a.dataset.thumbnails.ready() == 3);
    h.get_by_label("img1.png").click();
    h.run();
    snapshot(&mut h, "dataset_area", &[]);
}

#[test]
fn training_area_with_a_loss_curve() {
    let Some(mut h) = harness(None) else { return };
    {
        let app = h.state_mut();
        app.area = Area::Training;
        app.training.output = "my-style.safetensors".into();
        // A made-up, deterministic run: a falling, noisy loss and three validation points.
        for step in 1..=120usize {
            let s = step as f32;
            let wobble = ((s * 1.7).sin() * 0.5 + (s * 0.37).cos() * 0.5) * 0.03;
            app.training.loss.push(step, 0.05 + 0.25 * (-s / 30.0).exp() + wobble);
        }
        for (step, loss) in [(40, 0.12), (80, 0.085), (120, 0.075)] {
            app.training.loss.push_validation(step, loss);
        }
    }
    snapshot(&mut h, "training_area", &[]);
}

#[test]
fn playground_with_two_adapters_and_an_image() {
    // The panel shows the model's path: a copy in a fixed place keeps it the same everywhere.
    let model = fixed_dir("model");
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&sd1_tiny().join("model").join(part), &model.join(part));
    }
    std::fs::copy(sd1_tiny().join("model/model_index.json"), model.join("model_index.json")).unwrap();
    let Some(mut h) = harness(Some(model)) else { return };
    h.state_mut().area = Area::Playground;
    quick_request(&mut h.state_mut().playground);
    h.run_steps(2);
    for file in ["lora_a_kohya.safetensors", "lora_b_peft.safetensors"] {
        h.state_mut().try_adapter(&sd1_tiny().join(file));
    }
    run_until(&mut h, WAIT, "model and adapters", |a| {
        a.playground.model_state == ModelState::Ready
            && a.playground.adapters.len() == 2
            && a.playground.adapters.iter().all(|r| r.info.is_some())
    });
    h.state_mut().playground.set_weight(1, 0.5);
    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, WAIT, "an image", |a| a.playground.images_made >= 1);
    run_until(&mut h, WAIT, "idle", |a| !a.playground.busy());
    snapshot(&mut h, "playground_area", &["seed 7 ·"]);
}
