//! Window tests through egui_kittest: they drive `StudioApp::show` by its accessibility tree,
//! headless (no display, no GPU).

mod common;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT as _, Queryable as _};
use lora_studio::ui::{Area, StudioApp, WindowOptions};

use common::*;

fn harness(model_label: &str) -> Harness<'static, StudioApp> {
    let ctx = egui::Context::default();
    let app = StudioApp::new(&ctx, WindowOptions { model_label: model_label.to_owned(), model: None });
    let mut h =
        Harness::builder().with_size([960.0, 640.0]).build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.run();
    h
}

#[test]
fn opens_on_the_dataset_area() {
    let h = harness("built-in");
    assert_eq!(h.state().area, Area::Dataset);
    h.get_by_label("Drop images or folders here");
}

#[test]
fn each_tab_shows_its_panel() {
    let mut h = harness("built-in");
    let cases = [
        ("Training", Area::Training, "Train an adapter"),
        ("Playground", Area::Playground, "Blend adapters"),
        ("Dataset", Area::Dataset, "Your training images"),
    ];
    for (tab, area, heading) in cases {
        h.get_by_role_and_label(Role::Button, tab).click();
        h.run();
        assert_eq!(h.state().area, area, "after clicking {tab}");
        h.get_by_label(heading);
    }
    // Only the selected area's panel is drawn.
    assert!(h.query_by_label("Drop images or folders here").is_some());
    assert!(h.query_by_label("Train an adapter").is_none());
}

/// In a small window the Training buttons wrap to a second line rather than run past the edge.
#[test]
fn nothing_runs_past_the_edge_of_a_small_window() {
    let mut h = harness("built-in");
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    for button in ["Start training", "Sample now", "Resume from checkpoint…"] {
        let right = h.get_by_label(button).rect().right();
        assert!(right <= 960.0 - 20.0, "{button} ends at x = {right} in a 960 px window");
    }
}

#[test]
fn keyboard_shortcuts_switch_areas() {
    let mut h = harness("built-in");
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Num3);
    h.run();
    assert_eq!(h.state().area, Area::Playground);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Num2);
    h.run();
    assert_eq!(h.state().area, Area::Training);
}

#[test]
fn status_bar_shows_model_device_memory_and_job() {
    let h = harness("built-in");
    h.get_by_label("Model: built-in");
    h.get_by_label("Device: CPU");
    h.get_by_label("Job: idle");
    let memory = h.get_by_label_contains("Memory: ");
    let text = memory.accesskit_node().value().unwrap_or_default();
    assert!(text.ends_with("MiB") || text.ends_with("GiB"), "memory shown as {text:?}");
}

#[test]
fn status_bar_says_when_no_model_is_loaded() {
    let h = harness("");
    h.get_by_label("Model: none loaded");
}

#[test]
fn long_model_paths_keep_their_file_name() {
    let path = "/home/someone/models/stable-diffusion/v1-5/v1-5-pruned-emaonly.safetensors";
    let h = harness(path);
    let model = h.get_by_label_contains("Model: …");
    let text = model.accesskit_node().value().unwrap_or_default();
    assert!(text.ends_with("v1-5-pruned-emaonly.safetensors"), "model shown as {text:?}");
}

// ---------------------------------------------------------------------------------------------
// The real panels.

use std::time::Duration;

use lora_studio::engine::grid::{GridLayout, axis_labels};
use lora_studio::ui::{DialogPurpose, GridSettings, MixMode, ModelState, RunState};

// Generous: CI runs the window tests side by side on two cores.
const SCAN: Duration = Duration::from_secs(90);
const TRAIN: Duration = Duration::from_secs(240);

fn harness_with_model() -> Harness<'static, StudioApp> {
    let ctx = egui::Context::default();
    let options = WindowOptions { model_label: String::new(), model: Some(sd1_tiny().join("model")) };
    let app = StudioApp::new(&ctx, options);
    let mut h =
        Harness::builder().with_size([1100.0, 760.0]).build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.run();
    h
}

/// A window on the tiny fixture model with the Playground open and its model loaded.
fn harness_on_playground() -> Harness<'static, StudioApp> {
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    run_until(&mut h, SCAN, "model loaded", |a| a.playground.model_state == ModelState::Ready);
    h
}

/// A window on the tiny fixture model with three captioned images (in `DIR/data`) scanned in.
fn harness_with_dataset(name: &str) -> (std::path::PathBuf, Harness<'static, StudioApp>) {
    let dir = tempdir(name);
    make_images(&dir.join("data"));
    let mut h = harness_with_model();
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![dir.join("data")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    (dir, h)
}

fn text_of<S>(h: &Harness<'_, S>, contains: &str) -> String {
    let all: Vec<String> = h
        .query_all_by_label_contains(contains)
        .map(|n| n.accesskit_node().value().or(n.accesskit_node().label()).unwrap_or_default())
        .collect();
    assert_eq!(all.len(), 1, "texts containing {contains:?}: {all:?}");
    all.into_iter().next().unwrap()
}

#[test]
fn dropped_folder_is_scanned_with_thumbnails_captions_and_warnings() {
    let dir = tempdir("dataset");
    let data = dir.join("data");
    make_images(&data);
    std::fs::copy(data.join("img0.png"), data.join("copy.png")).unwrap();
    image::RgbImage::new(16, 16).save(data.join("tiny.png")).unwrap();
    std::fs::write(data.join("broken.png"), b"not really a png").unwrap();

    let mut h = harness("");
    drop_paths(&mut h, std::slice::from_ref(&data));
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning() && !a.dataset.dataset.images.is_empty());
    assert_eq!(h.state().dataset.dataset.images.len(), 4, "3 images + 1 duplicate");
    assert_eq!(h.state().dataset.dataset.skipped.len(), 2, "tiny.png and broken.png");
    run_until(&mut h, SCAN, "thumbnails", |a| a.dataset.thumbnails.ready() == 4);
    h.run();
    let counts = text_of(&h, "4 images ·");
    assert!(counts.contains("2 skipped") && counts.contains("1 duplicate"), "{counts}");
    // The pre-flight report names skipped files with their reasons and the duplicates.
    assert!(text_of(&h, "tiny.png: skipped").contains("too small"));
    h.get_by_label_contains("identical images");
    h.get_by_label("Captions counted in words (open a model to count tokens).");

    // Select an image, edit its caption, save it to the sidecar.
    h.get_by_label("img1.png").click();
    h.run();
    assert_eq!(h.state().dataset.caption_edit, "a gradient");
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption text:").focus();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run();
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption text:").type_text("a red gradient, soft");
    h.run();
    h.get_by_label("Save caption").click();
    h.run();
    assert_eq!(std::fs::read_to_string(data.join("img1.txt")).unwrap(), "a red gradient, soft");

    // Trigger word goes in front of every caption.
    h.get_by_role_and_label(Role::TextInput, "Trigger word:").focus();
    h.run();
    h.get_by_role_and_label(Role::TextInput, "Trigger word:").type_text("sks");
    h.run();
    assert_eq!(h.state().config.dataset.trigger, "sks");
    h.get_by_label("Trained as: sks, a red gradient, soft");

    // Remove the duplicate from the set.
    h.get_by_label("copy.png").click();
    h.run();
    h.get_by_label("Remove from set").click();
    h.run();
    assert_eq!(h.state().dataset.dataset.images.len(), 3);
    assert!(text_of(&h, "3 images ·").contains("0 duplicates"));
}

/// The pre-flight warnings are listed once, before and during a run, and the run's buttons stay
/// where they are as lines come and go.
#[test]
fn warnings_show_once_and_the_buttons_stay_put() {
    let (dir, mut h) = harness_with_dataset("warn-once");
    {
        let app = h.state_mut();
        app.area = Area::Training;
        // 40 px images trained at 64 px: each is upscaled, which the pre-flight check warns of.
        (app.config.steps, app.config.dataset.resolution, app.config.sample_every) = (100_000, 64, 0);
        app.training.output = dir.join("w.safetensors").display().to_string();
    }
    h.run();
    let warnings = |h: &Harness<'_, StudioApp>| h.query_all_by_label_contains("Warning:").count();
    h.get_by_label_contains("Pre-flight:").click();
    h.run();
    let before = warnings(&h);
    assert!(before >= 1, "the upscaling is warned of");
    let start_at = h.get_by_label("Start training").rect().top();
    h.get_by_label("Start training").click();
    h.step();
    run_until(&mut h, TRAIN, "steps", |a| a.training.step >= 1);
    h.run_steps(3);
    assert_eq!(h.get_by_label("Start training").rect().top(), start_at, "the buttons did not move");
    if h.query_by_label_contains("Warning:").is_none() {
        h.get_by_label_contains("Pre-flight:").click();
        h.run_steps(2);
    }
    assert_eq!(warnings(&h), before, "each warning once while the run goes");
    h.get_by_label("Stop").click();
    run_until(&mut h, TRAIN, "stopped", |a| !a.training.is_active());
    h.run_steps(3);
    if h.query_by_label_contains("Warning:").is_none() {
        h.get_by_label_contains("Pre-flight:").click();
        h.run_steps(2);
    }
    assert_eq!(warnings(&h), before, "each warning once after the run");
}

/// Nothing typed or gathered is lost by a click: a caption edit is saved when another image is
/// picked, *Clear* can be undone, a file where the adapter would go is replaced only when asked,
/// and an error line goes once the next scan works.
#[test]
fn nothing_is_lost_by_a_click() {
    let dir = tempdir("no-loss");
    let data = dir.join("data");
    make_images(&data);
    let mut h = harness_with_model();
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![data.clone()]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    h.run();

    // Type into img0's caption, then click img2 without saving: the edit is kept on disk.
    h.get_by_label("img0.png").click();
    h.run();
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption text:").focus();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run();
    h.get_by_role_and_label(Role::MultilineTextInput, "Caption text:").type_text("a blue gradient");
    h.run();
    h.get_by_label("img2.png").click();
    h.run();
    assert_eq!(std::fs::read_to_string(data.join("img0.txt")).unwrap(), "a blue gradient");
    assert_eq!(h.state().dataset.caption_edit, "a gradient", "img2's own caption is shown");

    // Clear, then Undo: the set comes back whole.
    h.get_by_label("Clear").click();
    h.run();
    assert!(h.state().dataset.dataset.images.is_empty());
    h.get_by_label_contains("Cleared 3 images from the set");
    h.get_by_label("Undo").click();
    h.run();
    assert_eq!(h.state().dataset.image_paths().len(), 3);
    assert!(h.query_by_label("Undo").is_none());

    // A file of the user's where the adapter would be written: asked about, untouched until then.
    let theirs = dir.join("mine.safetensors");
    std::fs::write(&theirs, b"the user's own file").unwrap();
    {
        let app = h.state_mut();
        app.area = Area::Training;
        (app.config.steps, app.config.dataset.resolution) = (1, 32);
        app.training.output = theirs.display().to_string();
    }
    h.run();
    h.get_by_label("Start training").click();
    h.run();
    assert!(text_of(&h, "already exists").contains("a file LoRA Studio did not write"));
    assert_eq!(h.state().training.run, RunState::Idle);
    assert_eq!(std::fs::read(&theirs).unwrap(), b"the user's own file");
    h.get_by_label("Cancel").click();
    h.run();
    assert!(h.query_by_label_contains("already exists").is_none());
    h.get_by_label("Start training").click();
    h.run();
    h.get_by_label("Replace it").click();
    h.run_steps(2);
    run_until(&mut h, TRAIN, "the run", |a| matches!(a.training.run, RunState::Finished { .. }));
    assert!(lora_studio::engine::adapters::formats::read_adapter(&theirs).is_ok(), "replaced by the adapter");

    // A failed scan's red line goes when the next scan works.
    h.state_mut().area = Area::Dataset;
    h.state_mut().dataset.message = Some("an earlier error".into());
    h.state_mut().on_paths_chosen(DialogPurpose::AddImages, vec![data.join("img1.png")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    assert!(h.state().dataset.message.is_none());
}

/// A big folder: the grid asks for the thumbnails in view, not for all of them, and scrolling
/// down brings the rest.
#[test]
fn the_thumbnail_grid_loads_only_what_is_in_view() {
    let dir = tempdir("many");
    for i in 0..240 {
        let v = (i % 251) as u8;
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([v, (x * 4) as u8, (y * 4) as u8]))
            .save(dir.join(format!("img{i:03}.png")))
            .unwrap();
    }
    let mut h = harness("");
    drop_paths(&mut h, std::slice::from_ref(&dir));
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning() && !a.dataset.dataset.images.is_empty());
    assert_eq!(h.state().dataset.dataset.images.len(), 240);
    h.run();
    let asked = h.state().dataset.thumbnails.requested();
    assert!((1..60).contains(&asked), "the first screenful only, not 240: {asked}");
    h.get_by_label("img000.png");
    assert!(h.query_by_label("img239.png").is_none(), "the last row is not drawn");
    // Scroll to the end: the last rows appear and their thumbnails are asked for.
    h.get_by_label("img000.png").hover();
    h.run();
    for _ in 0..30 {
        h.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -400.0),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: egui::Modifiers::NONE,
        });
        h.run_steps(6);
    }
    h.get_by_label("img239.png");
    assert!(h.state().dataset.thumbnails.requested() > asked);
}

#[test]
fn add_images_dialog_result_joins_the_set() {
    let dir = tempdir("dialog");
    make_images(&dir);
    let mut h = harness("");
    h.state_mut().on_paths_chosen(DialogPurpose::AddImages, vec![dir.join("img0.png"), dir.join("img2.png")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    assert_eq!(h.state().dataset.dataset.images.len(), 2);
    // A model gives CLIP token counts in the pre-flight report.
    h.state_mut().on_paths_chosen(DialogPurpose::OpenModelFolder, vec![sd1_tiny().join("model")]);
    h.run();
    h.get_by_label("Captions counted in CLIP tokens.");
    assert!(h.state().model_label.ends_with("model"));
}

#[test]
fn training_runs_pauses_resumes_stops_and_writes_the_adapter() {
    let (dir, mut h) = harness_with_dataset("train");
    let out = dir.join("out/trained.safetensors");

    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    // Presets set rank / alpha / lr / steps.
    h.get_by_label("Quality").click();
    h.run();
    assert_eq!((h.state().config.rank, h.state().config.steps), (32, 3000));
    h.get_by_label("Quick").click();
    h.run();
    assert_eq!(h.state().config.rank, 8);
    h.get_by_label_contains("scale α/r = 1.000");
    {
        let app = h.state_mut();
        app.config.rank = 4;
        app.config.alpha = 2.0;
        app.config.steps = 2000;
        app.config.learning_rate = 1e-3;
        app.config.save_every = 4;
        app.config.dataset.resolution = 32;
        app.training.output = out.display().to_string();
    }
    h.run();
    h.get_by_label_contains("scale α/r = 0.500");

    h.get_by_label("Start training").click();
    h.step();
    run_until(&mut h, TRAIN, "three steps", |a| a.training.loss.raw.len() >= 3);
    assert!(text_of(&h, "Job: ").starts_with("Job: training"));
    h.get_by_label_contains("it/s");
    h.get_by_label_contains("Step ");

    h.get_by_label("Pause").click();
    h.step();
    run_until(&mut h, TRAIN, "paused", |a| matches!(a.training.run, RunState::Paused { .. }));
    let paused_at = h.state().training.step;
    std::thread::sleep(Duration::from_millis(300));
    h.step();
    assert_eq!(h.state().training.step, paused_at, "no steps while paused");
    assert!(text_of(&h, "Job: ").contains("paused"));
    // Save now, while paused, says what it did.
    h.get_by_label("Save now").click();
    h.step();
    h.get_by_label("Saving…");
    run_until(&mut h, TRAIN, "the saved checkpoint", |a| {
        a.training.save_notice.as_deref().is_some_and(|n| n.starts_with("Saved"))
    });
    h.run_steps(2);
    h.get_by_label_contains(&format!("Saved step {paused_at}: "));

    h.get_by_label("Resume").click();
    h.step();
    run_until(&mut h, TRAIN, "more steps", |a| a.training.step >= paused_at + 2);
    h.get_by_label("Sample now").click();
    h.step();
    run_until(&mut h, TRAIN, "a sample", |a| !a.training.samples.is_empty());
    run_until(&mut h, TRAIN, "a checkpoint", |a| !a.training.checkpoints.is_empty());

    h.get_by_label("Stop").click();
    h.step();
    run_until(&mut h, TRAIN, "finished", |a| matches!(a.training.run, RunState::Finished { .. }));
    let app = h.state();
    assert!(out.is_file(), "adapter written to {}", out.display());
    assert!(app.training.step < 2000, "stopped early");
    assert!(app.training.loss.raw.len() >= 5 && !app.training.loss.validation.is_empty());
    assert!(app.training.checkpoints.iter().all(|c| c.validation_loss.is_finite()));
    // The trained adapter shows up in the Playground's list.
    assert_eq!(app.playground.adapters.len(), 1);
    assert_eq!(app.playground.adapters[0].path, out);
    // Settled: no spinner, so the accessibility check runs over the whole Training area.
    run_until(&mut h, TRAIN, "playground idle", |a| !a.playground.busy());
    h.run();
    // Stopped early, and said so: "Stopped at N/2000", not "Finished".
    let step = h.state().training.step;
    assert!(matches!(h.state().training.run, RunState::Finished { stopped_at: Some((s, 2000)), .. } if s == step));
    h.get_by_label_contains(&format!("Stopped at {step}/2000: wrote"));
    h.get_by_label_contains("(best)");
    h.get_by_label("log scale").click();
    h.run();
    assert!(h.state().training.log_scale);
    // Each checkpoint kept its own adapter file (kohya's -stepNNNNNNNN naming).
    let first = h.state().training.checkpoints[0].clone();
    assert!(
        first.adapter.file_name().unwrap().to_string_lossy().ends_with(&format!("-step{:08}.safetensors", first.step))
    );
    assert!(first.adapter.is_file());

    // "Try" puts a checkpoint's adapter in the Playground and goes there.
    h.get_by_label(&format!("Try {}", first.step)).click();
    h.step();
    assert_eq!(h.state().area, Area::Playground);
    assert_eq!(h.state().playground.adapters.len(), 2);
    assert_eq!(h.state().playground.adapters[1].path, first.adapter);
    h.state_mut().playground.remove_adapter(1);
    h.state_mut().area = Area::Training;
    h.run();

    // Resume from the checkpoint file: the run continues where it stopped, toward its own total.
    let stopped_at = h.state().training.step;
    h.state_mut().config.steps = 10;
    h.state_mut()
        .on_paths_chosen(DialogPurpose::ResumeCheckpoint, vec![dir.join("out/trained.checkpoint.safetensors")]);
    h.step();
    assert_eq!(h.state().config.steps, 2000, "the checkpoint's total, not the form's");
    run_until(&mut h, TRAIN, "the resumed run", |a| a.training.step >= stopped_at + 2);
    h.get_by_label("Stop").click();
    h.step();
    run_until(&mut h, TRAIN, "stopped again", |a| matches!(a.training.run, RunState::Finished { .. }));
    let resumed_steps = h.state().training.step - stopped_at;
    assert_eq!(h.state().training.loss.raw.len(), resumed_steps, "a resumed run plots its own steps");

    // Opening the Playground loads the model there and the trained adapter onto it.
    run_until(&mut h, TRAIN, "trained adapter loaded", |a| {
        a.playground.adapters[0].info.is_some() || a.playground.adapters[0].error.is_some()
    });
    let row = &h.state().playground.adapters[0];
    assert!(row.error.is_none(), "{:?}", row.error);
    assert!(row.info.as_deref().unwrap().contains("lora"), "{:?}", row.info);
}

#[test]
fn a_nan_loss_pause_is_explained_in_words() {
    let (dir, mut h) = harness_with_dataset("nan");
    {
        let app = h.state_mut();
        app.area = Area::Training;
        app.config.steps = 50;
        app.config.learning_rate = f64::MAX / 4.0;
        app.config.max_grad_norm = None;
        app.config.dataset.resolution = 32;
        app.training.output = dir.join("nan.safetensors").display().to_string();
    }
    // Started directly: the learning-rate field would clamp this absurd rate to its range.
    h.state_mut().start_training(false);
    h.step();
    run_until(&mut h, TRAIN, "the NaN pause", |a| {
        matches!(
            a.training.run,
            RunState::Paused { reason: Some(_) } | RunState::Failed { .. } | RunState::Finished { .. }
        )
    });
    let run = &h.state().training.run;
    assert!(matches!(run, RunState::Paused { .. }), "{run:?} after steps {:?}", h.state().training.loss.raw);
    let text = text_of(&h, "Paused: ");
    assert!(text.contains("NaN") && text.contains("lower the learning rate"), "{text}");
    h.get_by_label("Stop").click();
    h.step();
    // Rolled back to step 0 the stop writes nothing; later it writes the last good adapter.
    run_until(&mut h, TRAIN, "stopped", |a| matches!(a.training.run, RunState::Finished { .. } | RunState::Cancelled));
}

#[test]
fn a_first_run_takes_its_defaults_from_the_model() {
    let builtin = lora_studio::engine::builtin::model_dir().expect("the built-in model");
    let mut h = harness("");
    {
        let c = &h.state().config;
        // Before any model: SD 1.x's size, and a sample and a checkpoint every quarter of the run.
        assert_eq!(c.dataset.resolution, 512);
        assert_eq!((c.save_every, c.sample_every), (c.steps / 4, c.steps / 4));
        assert!(c.save_every > 0);
    }
    // Opening a model sets its size at once, read from its configs before it is loaded.
    h.state_mut().set_model(builtin.clone());
    assert_eq!(h.state().config.dataset.resolution, 64);
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    h.get_by_label("Quick").click();
    h.run();
    let c = &h.state().config;
    assert_eq!((c.dataset.resolution, c.steps, c.save_every, c.sample_every), (64, 400, 100, 100));
    // Another model's size replaces the default, but not a size the user chose.
    h.state_mut().set_model(sd1_tiny().join("model"));
    assert_eq!(h.state().config.dataset.resolution, 32);
    h.state_mut().config.dataset.resolution = 48;
    h.state_mut().set_model(builtin);
    assert_eq!(h.state().config.dataset.resolution, 48);

    // With no sample prompt typed, samples use the first image's caption with the trigger word,
    // and the field shows it.
    let dir = tempdir("first-run");
    make_images(&dir.join("data"));
    h.state_mut().config.dataset.trigger = "zxq style".into();
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![dir.join("data")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    let prompt = h.state().sample_prompt();
    assert!(prompt.starts_with("zxq style") && prompt.contains("a gradient"), "{prompt}");
    // A run started so shows that prompt's samples.
    {
        let app = h.state_mut();
        app.set_model(sd1_tiny().join("model"));
        app.config.dataset.resolution = 32;
        (app.config.steps, app.config.sample_every, app.config.save_every) = (2, 1, 0);
        app.training.output = dir.join("first.safetensors").display().to_string();
    }
    h.run();
    h.get_by_label("Start training").click();
    h.step();
    run_until(&mut h, TRAIN, "a sample", |a| !a.training.samples.is_empty());
    assert_eq!(h.state().training.samples[0].prompt, prompt);
    run_until(&mut h, TRAIN, "finished", |a| matches!(a.training.run, RunState::Finished { .. }));
    // A sample opens larger on a click.
    h.run_steps(2);
    h.get_by_label("Sample at step 1").click();
    h.run_steps(2);
    assert_eq!(h.state().training.sample_open, Some(0));
    let shown = h.get_all_by_role(Role::Image).map(|n| n.rect().width()).fold(0.0f32, f32::max);
    assert!(shown >= 500.0, "the larger view is {shown} points wide");
}

#[test]
fn start_without_images_says_why() {
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    h.get_by_label("Start training").click();
    h.run();
    h.get_by_label("Add training images in the Dataset area first.");
}

#[test]
fn playground_generates_blends_live_and_exports() {
    let dir = tempdir("playground");
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    quick_request(&mut h.state_mut().playground);
    // A file dropped on the Playground first shows the format doctor's report; a model's weights
    // file is refused in words; the adapter joins the list once accepted.
    let not_adapter = sd1_tiny().join("model/unet/diffusion_pytorch_model.safetensors");
    drop_paths(&mut h, &[not_adapter.clone(), sd1_tiny().join("lora_a_kohya.safetensors")]);
    run_until(&mut h, SCAN, "the doctor's reports", |a| a.playground.pending.iter().all(|p| p.check.is_some()));
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    assert!(h.state().playground.adapters.is_empty(), "nothing joins before it is accepted");
    h.get_by_label("Check lora_a_kohya.safetensors");
    h.get_by_label_contains("kohya / A1111 / ComfyUI");
    h.get_by_label_contains("With the open model:");
    h.get_by_label_contains("Not an adapter we can use:");
    h.get_by_label("Dismiss").click();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    assert_eq!(h.state().playground.pending.len(), 1);
    // Below the settings, which have grown to the window's foot: clicked as a screen reader does.
    h.get_by_label("Add to list").click_accesskit();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    assert!(h.state().playground.pending.is_empty());
    run_until(&mut h, SCAN, "model and adapter", |a| {
        a.playground.model_state == ModelState::Ready && a.playground.adapters.first().is_some_and(|r| r.info.is_some())
    });
    let info = h.state().playground.adapters[0].info.clone().unwrap();
    assert!(info.contains("lora") && info.contains("layers"), "{info}");
    assert!(h.state().playground.adapters[0].error.is_none());

    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, SCAN, "an image", |a| a.playground.images_made >= 1);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    let first = h.state().playground.image.clone().unwrap();
    assert_eq!(first.dimensions(), (32, 32));
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle

    // The worker measured the mix's strength after the adapter joined (the fixture's random
    // adapter is far stronger than a trained one: ‖ΔW‖ ≈ 2.5 ‖W‖, so the meter warns).
    let ratio = h.state().playground.overdrive.expect("measured");
    assert!(ratio > 0.5, "{ratio}");
    h.get_by_label_contains(&format!("Overdrive {ratio:.2}: overdriven"));
    h.get_by_label("Weights add up to 1.00: images may burn.");
    // One adapter is not a stack.
    h.get_by_label_contains("Warning: the adapter overdrives the model");
    assert!(h.query_by_label_contains("stacked adapters").is_none());
    // Live mode: moving a slider re-renders the same seed once it rests, re-merging its layers,
    // as a quick preview (at most 8 steps; this 32 px model keeps its size) named as one.
    h.state_mut().playground.request.steps = 10;
    h.state_mut().playground.set_weight(0, -1.0);
    h.step();
    assert_eq!(h.state().playground.images_made, 1, "not before the slider rests");
    run_until(&mut h, SCAN, "live re-render", |a| a.playground.progress.is_some());
    assert_eq!(h.state().playground.progress.map(|p| p.1), Some(8), "the preview's steps");
    run_until(&mut h, SCAN, "live re-render", |a| a.playground.images_made >= 2);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    let info = h.state().playground.image_info.clone();
    assert!(info.starts_with("preview 32×32") && info.contains("Generate renders it in full"), "{info}");
    h.state_mut().playground.request.steps = 3;
    let row = &h.state().playground.adapters[0];
    assert!(row.remerged.is_some_and(|n| n > 0), "re-merged {:?} layers", row.remerged);
    assert_ne!(h.state().playground.image.as_ref().unwrap(), &first, "weight −1 changes the image");

    // Save the image, export the blend.
    h.state_mut().on_paths_chosen(DialogPurpose::SaveImage, vec![dir.join("picture")]);
    assert!(dir.join("picture.png").is_file());
    let blend = dir.join("blend.safetensors");
    h.state_mut().playground.blend_rank = 2;
    h.state_mut().on_paths_chosen(DialogPurpose::ExportBlend, vec![blend.clone()]);
    run_until(&mut h, SCAN, "export", |a| a.playground.message.as_deref().is_some_and(|m| m.contains("Export")));
    assert!(blend.is_file(), "{:?}", h.state().playground.message);
    let parsed = lora_studio::engine::adapters::formats::read_adapter(&blend).unwrap();
    assert!(!parsed.layers.is_empty());
    // What was mixed, with each weight as its slider shows it.
    assert_eq!(parsed.metadata.get("lora_studio_blend").map(String::as_str), Some("lora_a_kohya × -1.00"));
    // Merge into base writes a new model folder that loads.
    let merged = dir.join("merged-model");
    h.state_mut().on_paths_chosen(DialogPurpose::MergeIntoBase, vec![merged.clone()]);
    run_until(&mut h, SCAN, "merge", |a| a.playground.message.as_deref().is_some_and(|m| m.contains("Merged")));
    let m = lora_studio::engine::pipeline::StableDiffusion::load(&merged, &candle_core::Device::Cpu);
    assert!(m.is_ok(), "{:?}", h.state().playground.message);
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle

    // The switch turns an adapter off (weight 0) without losing its slider.
    h.get_by_label("on").click();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    let row = &h.state().playground.adapters[0];
    assert!(!row.enabled && row.weight == -1.0 && row.effective_weight() == 0.0);
    h.get_by_label_contains("add up to 0.00");

    // Per-block weights live under Advanced; Remove takes the adapter out.
    h.get_by_label("Advanced").click();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    h.get_by_label("Per-block weights (A1111 LoRA Block Weight)");
    for block in ["text encoder", "input blocks", "middle block", "output blocks"] {
        // The slider (its value) and its text share the label.
        let values: Vec<String> = h.get_all_by_label(block).filter_map(|n| n.value()).collect();
        assert_eq!(values, ["1.00"], "{block}: one slider, at 1");
    }
    let blocks = &h.state().playground.adapters[0].blocks;
    assert_eq!((blocks.text_encoder, blocks.input, blocks.middle, blocks.output), (1.0, 1.0, 1.0, 1.0));
    h.get_by_label("Remove").click();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    assert!(h.state().playground.adapters.is_empty());
}

/// Quick previews halve large sides (not below 256 px, on the model's size step) and cap the steps
/// at 8; LCM and TCD keep theirs. Picking LCM sets it up as its users expect (4 steps, guidance 1),
/// and leaving it puts back 20 steps and guidance 7.5.
#[test]
fn previews_and_few_step_samplers_are_set_up_as_users_expect() {
    use lora_studio::engine::diffusion::sampler::SamplerKind;
    use lora_studio::ui::preview_of;
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    run_until(&mut h, SCAN, "the model", |a| a.playground.model_state == ModelState::Ready);
    let p = &mut h.state_mut().playground;
    (p.request.width, p.request.height, p.request.steps) = (512, 768, 20);
    let live = p.live_request();
    assert_eq!((live.width, live.height, live.steps), (256, 384, 8));
    assert_eq!(
        (live.prompt.as_str(), live.seed, live.guidance),
        (p.request.prompt.as_str(), p.request.seed, p.request.guidance)
    );
    p.preview = false;
    assert_eq!(p.live_request(), p.request, "previews off: live renders in full");
    // SDXL's 1024 at a 32 px step, a 200 px side left alone, and a few-step sampler's steps kept.
    let mut r = p.request.clone();
    (r.width, r.height, r.steps, r.sampler) = (1024, 200, 6, SamplerKind::Lcm);
    let preview = preview_of(&r, 32);
    assert_eq!((preview.width, preview.height, preview.steps), (512, 200, 6));
    (r.width, r.steps, r.sampler) = (600, 30, SamplerKind::Ddim);
    assert_eq!((preview_of(&r, 64).width, preview_of(&r, 64).steps), (256, 8), "300 is not a multiple of 64");
    h.run_steps(2);

    h.get_by_label("Sampler").click();
    h.run_steps(2);
    h.get_by_label("LCM").click();
    h.run_steps(2);
    let request = &h.state().playground.request;
    assert_eq!((request.sampler, request.steps, request.guidance), (SamplerKind::Lcm, 4, 1.0));
    assert!(h.state().playground.sampler_chosen);
    h.get_by_label("Sampler").click();
    h.run_steps(2);
    h.get_by_label("Euler a").click();
    h.run_steps(2);
    let request = &h.state().playground.request;
    assert_eq!((request.sampler, request.steps, request.guidance), (SamplerKind::EulerAncestral, 20, 7.5));
}

/// Ctrl+Enter generates, also while the prompt box has the keyboard (A1111's shortcut), and adds
/// no new line to the prompt.
#[test]
fn ctrl_enter_generates_from_the_prompt_box() {
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    quick_request(&mut h.state_mut().playground);
    run_until(&mut h, SCAN, "the model", |a| a.playground.model_state == ModelState::Ready);
    h.get_by_label("Prompt").click();
    h.run_steps(2);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    h.run_steps(2);
    run_until(&mut h, SCAN, "an image", |a| a.playground.images_made >= 1);
    assert_eq!(h.state().playground.request.prompt, "a gradient", "no new line typed");
}

/// A1111's habits: `<lora:name:weight>` in the prompt sets that slider (adding the file from the
/// adapters' folder), a saved PNG carries its settings in A1111's `parameters` text, and dropping
/// such a PNG (ours, or one A1111 wrote) on the Playground puts them back.
#[test]
fn prompts_pngs_and_lora_tags_work_as_in_a1111() {
    use lora_studio::engine::io::infotext::read_png_parameters;
    let dir = tempdir("a1111");
    let mut h = harness_on_playground();
    h.state_mut().playground.add_adapter(&sd1_tiny().join("lora_b_peft.safetensors"));
    quick_request(&mut h.state_mut().playground);
    h.state_mut().playground.request.prompt = "a gradient <lora:lora_a_kohya:0.6>, (soft:1.2)".into();
    h.state_mut().playground.request.clip_skip = 2;
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, SCAN, "an image", |a| a.playground.images_made >= 1);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    {
        let p = &h.state().playground;
        // The tag left the prompt box and became the slider of the adapter it names.
        assert_eq!(p.request.prompt, "a gradient, (soft:1.2)");
        let row = p.adapters.iter().find(|r| r.name == "lora_a_kohya").expect("added from the folder");
        assert!((row.weight - 0.6).abs() < 1e-9 && row.enabled);
        assert!(row.error.is_none(), "{:?}", row.error);
    }

    // Saved with its settings, in A1111's words.
    let png = dir.join("made.png");
    h.state_mut().playground.save_image(&png);
    let saved = read_png_parameters(&png).unwrap();
    let text = saved.infotext();
    assert!(text.starts_with("a gradient, (soft:1.2), <lora:lora_b_peft:1>, <lora:lora_a_kohya:0.6>\n"), "{text}");
    assert!(text.contains("Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 32x32"), "{text}");
    assert!(text.contains("Clip skip: 2") && text.contains("Lora hashes:"), "{text}");

    // Everything changed since; dropping the PNG on the Playground brings it all back.
    {
        let p = &mut h.state_mut().playground;
        (p.request.prompt, p.request.seed, p.request.steps, p.request.clip_skip) = ("other".into(), 99, 9, 1);
        p.set_weight(1, 0.1);
    }
    drop_paths(&mut h, std::slice::from_ref(&png));
    h.run_steps(2);
    {
        let a = h.state();
        let p = &a.playground;
        assert_eq!(a.area, Area::Playground, "a PNG on the Playground is not a training image");
        assert_eq!((p.request.prompt.as_str(), p.request.seed, p.request.steps), ("a gradient, (soft:1.2)", 7, 3));
        assert_eq!(p.request.clip_skip, 2);
        assert!((p.adapters[1].weight - 0.6).abs() < 1e-9);
        assert!(p.message.as_deref().is_some_and(|m| m.starts_with("Settings restored")), "{:?}", p.message);
    }

    // A PNG A1111 saved: its settings, and its adapters named where they are not found here.
    drop_paths(&mut h, &[fixtures_dir().join("infotext/a1111.png")]);
    h.run_steps(2);
    let p = &h.state().playground;
    assert_eq!((p.request.width, p.request.height, p.request.seed), (512, 768, 1234567890));
    assert_eq!(p.request.sampler, lora_studio::engine::diffusion::sampler::SamplerKind::EulerAncestral);
    assert!(p.request.prompt.starts_with("masterpiece, a photo of a cat on a windowsill"));
    assert_eq!(p.request.negative, "blurry, lowres,\nbad anatomy, watermark");
    let message = p.message.clone().unwrap();
    assert!(message.contains("<lora:neon_style> was not found"), "{message}");
    assert!(p.adapters.iter().all(|r| !r.enabled), "the image used none of the adapters in the list");
}

/// *Cancel* stops an image and an XY grid being drawn; the window is ready for the next one.
#[test]
fn cancel_stops_an_image_and_a_grid() {
    let mut h = harness_on_playground();
    {
        let p = &mut h.state_mut().playground;
        p.add_adapter(&sd1_tiny().join("lora_a_kohya.safetensors"));
        p.add_adapter(&sd1_tiny().join("lora_b_peft.safetensors"));
        quick_request(p);
        p.request.steps = 150;
        p.live = false;
    }
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.step();
    h.get_by_label("Cancel").click();
    h.step();
    run_until(&mut h, SCAN, "cancelled", |a| a.playground.message.as_deref() == Some("Cancelled."));
    assert_eq!(h.state().playground.images_made, 0);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    assert!(h.state().playground.progress.is_none());

    h.state_mut().playground.grid = GridSettings { x: 0, y: 1, x_values: "0, 1".into(), y_values: "0, 1".into() };
    h.state_mut().playground.render_grid();
    h.step();
    h.get_by_label("Cancel").click();
    h.step();
    run_until(&mut h, SCAN, "grid cancelled", |a| a.playground.message.as_deref() == Some("Grid cancelled."));
    assert_eq!(h.state().playground.images_made, 0);

    // The next image draws as usual.
    h.state_mut().playground.request.steps = 2;
    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, SCAN, "an image", |a| a.playground.images_made == 1);
}

/// The strip of this session's images: a click shows one again and puts back its settings.
#[test]
fn the_gallery_strip_brings_back_an_image_and_its_settings() {
    let mut h = harness_on_playground();
    quick_request(&mut h.state_mut().playground);
    h.state_mut().playground.live = false;
    for (n, (seed, prompt)) in [(11, "a red gradient"), (22, "a blue gradient")].into_iter().enumerate() {
        (h.state_mut().playground.request.seed, h.state_mut().playground.request.prompt) = (seed, prompt.into());
        h.run_steps(2);
        h.get_by_label("Generate").click();
        h.step();
        run_until(&mut h, SCAN, "an image", |a| a.playground.images_made == n + 1);
    }
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    h.run_steps(2);
    let second = h.state().playground.image.clone().unwrap();
    h.get_by_label("Image 1 of this session").click();
    h.run_steps(2);
    let p = &h.state().playground;
    assert_eq!((p.request.seed, p.request.prompt.as_str()), (11, "a red gradient"));
    assert!(p.image_info.starts_with("seed 11"), "{}", p.image_info);
    assert_ne!(p.image.as_ref().unwrap(), &second, "the first image is shown again");
    assert_eq!(p.gallery.len(), 2);
    // Shown as it was drawn, not drawn again by Live mode.
    h.state_mut().playground.live = true;
    h.get_by_label("Image 2 of this session").click();
    h.run_steps(2);
    std::thread::sleep(std::time::Duration::from_millis(600));
    h.run_steps(3);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    assert_eq!(h.state().playground.images_made, 2, "no re-render");
    assert_eq!(h.state().playground.image.as_ref(), Some(&second));
}

#[test]
fn dice_picks_a_new_seed() {
    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    let before = h.state().playground.request.seed;
    h.get_by_label("Random").click();
    h.run_steps(2);
    assert_ne!(h.state().playground.request.seed, before);
}

#[test]
#[cfg(debug_assertions)] // the fault injection exists in debug builds only
fn a_failed_training_job_and_a_crashed_playground_worker_leave_the_window_usable() {
    let dir = tempdir("survive");
    make_images(&dir.join("data"));
    let broken = dir.join("broken-model");
    std::fs::create_dir_all(broken.join("unet")).unwrap();
    std::fs::write(broken.join("model_index.json"), "{}").unwrap();
    let mut h = harness_with_model();
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![dir.join("data")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    {
        let app = h.state_mut();
        app.area = Area::Training;
        app.config.steps = 2;
        app.config.dataset.resolution = 32;
        app.training.output = dir.join("out.safetensors").display().to_string();
        app.set_model(broken);
    }
    // A job that cannot load its model fails in words, and the window can start another.
    h.state_mut().start_training(false);
    h.step();
    run_until(&mut h, TRAIN, "the failure", |a| matches!(a.training.run, RunState::Failed { .. }));
    h.run();
    let RunState::Failed { error } = &h.state().training.run else { unreachable!() };
    assert!(error.contains("broken-model"), "{error}");
    h.state_mut().set_model(sd1_tiny().join("model"));
    h.get_by_label("Start training").click();
    h.step();
    run_until(&mut h, TRAIN, "the restarted run", |a| matches!(a.training.run, RunState::Finished { .. }));
    assert!(dir.join("out.safetensors").is_file());

    // The Playground's worker panics: the window says so, reloads the model and draws again.
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    {
        let p = &mut h.state_mut().playground;
        p.request.prompt = "a gradient".into();
        (p.request.width, p.request.height, p.request.steps) = (32, 32, 2);
        p.size_chosen = true;
    }
    h.state_mut().playground.add_adapter(&sd1_tiny().join("lora_b_peft.safetensors"));
    run_until(&mut h, SCAN, "model ready", |a| {
        a.playground.model_state == ModelState::Ready && a.playground.adapters.iter().all(|r| r.info.is_some())
    });
    h.state_mut().playground.inject_worker_panic();
    run_until(&mut h, SCAN, "the crash report", |a| {
        a.playground.message.as_deref().is_some_and(|m| m.contains("worker failed"))
    });
    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, SCAN, "an image after the crash", |a| a.playground.images_made >= 1);
    assert_eq!(h.state().playground.image.as_ref().unwrap().dimensions(), (32, 32));
    assert!(h.state().playground.adapters.iter().all(|r| r.error.is_none()), "adapters re-added after the reload");

    // Two adapters: budget mode scales them into the budget; the XY grid draws 2 × 3 cells.
    {
        let p = &mut h.state_mut().playground;
        p.set_mix_mode(MixMode::Budget(1.0));
        assert_eq!(p.mix_weights(), vec![0.5, 0.5]);
        p.grid = GridSettings { x: 0, y: 1, x_values: "0, 1".into(), y_values: "0, 0.5, 1".into() };
        p.render_grid();
    }
    run_until(&mut h, SCAN, "the grid", |a| a.playground.images_made >= 2);
    // The cells, 4 px apart, after the margins that label each column and row.
    let (x_name, y_name) =
        (h.state().playground.adapters[0].name.clone(), h.state().playground.adapters[1].name.clone());
    let layout = GridLayout::new(32, 32, &axis_labels(&x_name, &[0.0, 1.0]), &axis_labels(&y_name, &[0.0, 0.5, 1.0]));
    assert_eq!(
        h.state().playground.image.as_ref().unwrap().dimensions(),
        (layout.left + 2 * 32 + 4, layout.top + 3 * 32 + 2 * 4)
    );
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    h.run();
    h.get_by_label_contains("grid · columns");
    // A typo in the grid's weights is named.
    h.state_mut().playground.grid.x_values = "0, x".into();
    h.state_mut().playground.render_grid();
    assert_eq!(h.state().playground.message.as_deref(), Some("Grid: `x` is not a number"));
}

#[test]
fn the_session_is_saved_and_restored_and_a_broken_file_is_set_aside() {
    use lora_studio::ui::session;
    let (dir, mut h) = harness_with_dataset("session");
    let file = dir.join("config/session.json");
    {
        let app = h.state_mut();
        app.config.rank = 7;
        app.config.dataset.trigger = "sks".into();
        app.training.output = dir.join("style.safetensors").display().to_string();
        app.playground.request.prompt = "a red circle".into();
        app.playground.add_adapter(&sd1_tiny().join("lora_a_kohya.safetensors"));
        app.playground.set_weight(0, 0.3);
        app.playground.set_mix_mode(MixMode::Budget(0.8));
        app.session_file = Some(file.clone());
        app.autosave(true);
    }
    assert!(file.is_file());

    // A fresh window restores all of it.
    let (saved, warning) = session::load(&file);
    assert!(warning.is_none());
    let mut h2 = harness("");
    h2.state_mut().restore(saved);
    run_until(&mut h2, SCAN, "scan", |a| !a.dataset.is_scanning());
    let app = h2.state();
    assert_eq!(app.model.as_deref(), Some(sd1_tiny().join("model").as_path()));
    assert_eq!(app.dataset.image_paths().len(), 3);
    assert_eq!((app.config.rank, app.config.dataset.trigger.as_str()), (7, "sks"));
    assert_eq!(app.playground.request.prompt, "a red circle");
    assert_eq!(app.playground.mix_mode, MixMode::Budget(0.8));
    let row = &app.playground.adapters[0];
    assert_eq!((row.weight, row.enabled), (0.3, true));
    assert!(app.notice.is_none());

    // A file from a moved folder: what is gone is named, the rest restored.
    std::fs::remove_file(dir.join("data/img1.png")).unwrap();
    let (saved, _) = session::load(&file);
    let mut h3 = harness("");
    h3.state_mut().restore(saved);
    run_until(&mut h3, SCAN, "scan", |a| !a.dataset.is_scanning());
    assert_eq!(h3.state().dataset.image_paths().len(), 2);
    assert!(h3.state().notice.as_deref().is_some_and(|n| n.contains("img1.png")), "{:?}", h3.state().notice);

    // A broken file is set aside with a warning; the defaults are used.
    std::fs::write(&file, "{ not json").unwrap();
    let (saved, warning) = session::load(&file);
    assert_eq!(saved, session::Session::default());
    let warning = warning.expect("a warning");
    assert!(warning.contains("unreadable") && warning.contains("session.json.broken"), "{warning}");
    assert!(!file.exists() && dir.join("config/session.json.broken").is_file());
}

/// Start where an earlier run saved asks "resume or start again" instead of resetting it, and
/// closing the window during a run asks before anything is lost.
#[test]
fn an_earlier_run_is_replaced_only_when_asked_and_closing_mid_run_asks_first() {
    let dir = tempdir("existing-run");
    make_images(&dir.join("data"));
    let out = dir.join("style.safetensors");
    let ckpt = dir.join("style.checkpoint.safetensors");
    let mut h = harness_with_model();
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![dir.join("data")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    {
        let app = h.state_mut();
        app.area = Area::Training;
        app.config.steps = 2;
        app.config.dataset.resolution = 32;
        app.training.output = out.display().to_string();
    }
    h.state_mut().start_training(false);
    run_until(&mut h, TRAIN, "the first run", |a| matches!(a.training.run, RunState::Finished { .. }));
    let saved = std::fs::read(&ckpt).unwrap();

    // Start again on the same output: a question, and nothing written.
    h.get_by_label("Start training").click();
    h.run();
    let question = text_of(&h, "An earlier run of 2 steps");
    assert!(question.contains("style.checkpoint.safetensors"), "{question}");
    assert!(matches!(h.state().training.run, RunState::Finished { .. }), "no run started");
    assert!(std::fs::read(&ckpt).unwrap() == saved, "the checkpoint is untouched");
    h.get_by_label("Cancel").click();
    h.run();
    assert!(h.state().training.existing_run.is_none());

    // "Start again" replaces it, with a long run this time.
    h.state_mut().config.steps = 100_000;
    h.get_by_label("Start training").click();
    h.run();
    h.get_by_label("Start again").click();
    h.run_steps(2);
    run_until(&mut h, TRAIN, "the new run steps", |a| a.training.step >= 1 && a.training.run == RunState::Running);

    // Closing the window now asks; "Keep training" keeps it running.
    let close = |h: &mut Harness<'static, StudioApp>| {
        h.input_mut().viewports.entry(egui::ViewportId::ROOT).or_default().events.push(egui::ViewportEvent::Close);
        h.run_steps(2);
    };
    close(&mut h);
    assert!(h.state().confirm_quit, "the window asks before closing");
    h.get_by_label("Training is running");
    h.get_by_label("Keep training").click();
    h.run_steps(2);
    assert!(!h.state().confirm_quit && h.state().training.is_active(), "still training");
    // "Stop, save and quit" stops and saves the run, then lets the window close.
    close(&mut h);
    h.get_by_label("Stop, save and quit").click();
    h.run_steps(2);
    assert!(h.state().quit_after_stop);
    run_until(&mut h, TRAIN, "the run stopped", |a| !a.training.is_active());
    h.run_steps(2);
    let step = lora_studio::engine::train::trainer::checkpoint_step(&ckpt).unwrap();
    assert!((1..100_000).contains(&step), "the checkpoint holds the stopped run (step {step})");
    assert!(!h.state().quit_after_stop, "the close went ahead once the run had stopped");
}

/// A model that cannot be opened leaves the one that worked in place (and in the session), says
/// why on a wrapped line, and *Open model…* offers the built-in model.
#[test]
fn a_model_that_fails_to_open_leaves_the_working_one_in_place() {
    let dir = tempdir("bad-model");
    let mut h = harness_with_model();
    let good = sd1_tiny().join("model");
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    run_until(&mut h, SCAN, "model loaded", |a| a.playground.model_state == ModelState::Ready);

    // A file with a long name that is not a model at all.
    let broken = dir.join(format!("{}.safetensors", "a-very-long-checkpoint-name-".repeat(6)));
    std::fs::write(&broken, b"these bytes are not a safetensors file").unwrap();
    h.state_mut().on_paths_chosen(DialogPurpose::OpenModelFile, vec![broken.clone()]);
    run_until(&mut h, SCAN, "the failure", |a| a.notice.is_some());
    run_until(&mut h, SCAN, "the working model again", |a| a.playground.model_state == ModelState::Ready);
    let a = h.state();
    assert_eq!(a.model.as_deref(), Some(good.as_path()));
    assert_eq!(a.session().model.as_deref(), Some(good.as_path()), "the session keeps the working model");
    let notice = a.notice.clone().unwrap();
    assert!(notice.starts_with("Could not open") && notice.contains("Back to"), "{notice}");
    // The line wraps inside the window instead of widening it.
    let shown = h.get_by_label_contains("Could not open");
    assert!(shown.rect().width() <= 1100.0, "{:?}", shown.rect());

    // Open model… → Built-in model.
    h.get_by_label("Open model…").click();
    h.run();
    h.get_by_label("Built-in model").click();
    h.run_steps(2);
    let builtin = lora_studio::engine::builtin::model_dir().unwrap();
    assert_eq!(h.state().model.as_deref(), Some(builtin.as_path()));
    run_until(&mut h, SCAN, "the built-in model", |a| a.playground.model_state == ModelState::Ready);
}

/// Resuming takes the checkpoint's options into the form and says so; a file that is not a
/// checkpoint is refused before anything loads.
#[test]
fn resume_from_checkpoint_uses_and_shows_the_checkpoints_options() {
    let (dir, mut h) = harness_with_dataset("resume-form");
    let ckpt = dir.join("style.checkpoint.safetensors");
    {
        let app = h.state_mut();
        app.area = Area::Training;
        (app.config.steps, app.config.rank, app.config.dataset.resolution) = (2, 2, 32);
        app.training.output = dir.join("style.safetensors").display().to_string();
    }
    h.state_mut().start_training(false);
    run_until(&mut h, TRAIN, "the first run", |a| matches!(a.training.run, RunState::Finished { .. }));

    // Not a checkpoint: refused in words, nothing started.
    h.state_mut().on_paths_chosen(DialogPurpose::ResumeCheckpoint, vec![sd1_tiny().join("lora_a_kohya.safetensors")]);
    h.run();
    let refusal = text_of(&h, "Cannot resume");
    assert!(refusal.contains("not a LoRA Studio training checkpoint"), "{refusal}");
    assert!(matches!(h.state().training.run, RunState::Finished { .. }));

    // The run finished its 2 steps: resuming it needs a higher total.
    h.state_mut().on_paths_chosen(DialogPurpose::ResumeCheckpoint, vec![ckpt.clone()]);
    h.run();
    assert!(text_of(&h, "finished all its 2 steps").contains("set Steps above 2"));

    // The form has moved on (rank 12, 4 steps); the resume goes on at the checkpoint's rank 2, to
    // the form's 4 steps.
    (h.state_mut().config.rank, h.state_mut().config.steps) = (12, 4);
    h.state_mut().on_paths_chosen(DialogPurpose::ResumeCheckpoint, vec![ckpt]);
    h.run_steps(2);
    assert_eq!((h.state().config.rank, h.state().config.steps), (2, 4));
    h.get_by_label_contains(
        "Resuming with the checkpoint's options: LoRA, rank 2, alpha 4, attention + feed-forward, step 2 of 4",
    );
    run_until(&mut h, TRAIN, "the resumed run", |a| !a.training.is_active());
    assert!(matches!(h.state().training.run, RunState::Finished { .. }), "{:?}", h.state().training.run);
    assert_eq!(h.state().training.step, 4);
}

/// The algorithm list offers every kind we train; LoHa and LoKr bring kohya_ss' rank, alpha and
/// rate with them, and LoKr shows its factor.
#[test]
fn choosing_loha_or_lokr_sets_kohya_ss_defaults() {
    use lora_studio::engine::train::trainer::Algorithm;
    let mut h = harness("built-in");
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    assert!(h.query_by_label("LoKr factor").is_none(), "the factor shows only for LoKr");
    for (label, algorithm, rank, alpha) in [("LoHa", Algorithm::Loha, 32, 16.0), ("LoKr", Algorithm::Lokr, 64, 64.0)] {
        let current = h.state().config.algorithm.label();
        h.get_by_value(current).click();
        h.run();
        h.get_by_label(label).click();
        h.run();
        let c = &h.state().config;
        assert_eq!((c.algorithm, c.rank, c.alpha), (algorithm, rank, alpha), "{label}");
    }
    h.get_by_label("LoKr factor");
    let current = h.state().config.algorithm.label();
    h.get_by_value(current).click();
    h.run();
    h.get_by_label("DoRA").click();
    h.run();
    assert_eq!(h.state().config.algorithm, Algorithm::Dora);
    assert_eq!(h.state().config.rank, 64, "DoRA keeps the rank it had");
}

/// The options kohya users set every day are in the form: the optimiser (its usual rate comes
/// with it), gradient accumulation, buckets, caption dropout, tag shuffle with keep-N, clip skip
/// and the text encoder's own rate.
#[test]
fn kohya_training_options_are_in_the_form() {
    use lora_studio::engine::train::optim::Optimizer;
    // Tall enough for the whole form (rows scrolled out of view are not in the tree).
    let ctx = egui::Context::default();
    let app = StudioApp::new(&ctx, WindowOptions { model_label: "built-in".into(), model: None });
    let mut h =
        Harness::builder().with_size([960.0, 1600.0]).build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.run();
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    h.get_by_value("AdamW").click();
    h.run();
    h.get_by_label("Prodigy (learning-rate free)").click();
    h.run();
    assert_eq!((h.state().config.optimizer, h.state().config.learning_rate), (Optimizer::Prodigy, 1.0));
    h.get_by_value("Prodigy (learning-rate free)").click();
    h.run();
    h.get_by_label("Adafactor").click();
    h.run();
    assert_eq!((h.state().config.optimizer, h.state().config.learning_rate), (Optimizer::Adafactor, 1e-4));
    h.get_by_role_and_label(Role::CheckBox, "Aspect-ratio buckets").click();
    h.run();
    assert!(h.state().config.dataset.buckets);
    h.get_by_role_and_label(Role::CheckBox, "Shuffle tags").click();
    h.run();
    assert!(h.state().config.shuffle_tags);
    for name in ["Gradient accumulation", "Caption dropout", "Clip skip"] {
        h.get_by_label(name);
    }
    assert!(h.query_by_label("Text encoder rate").is_none(), "shown only when the text encoder trains");
    h.get_by_role_and_label(Role::CheckBox, "Train text encoder").click();
    h.run();
    h.get_by_role_and_label(Role::CheckBox, "Text encoder rate").click();
    h.run();
    let c = &h.state().config;
    assert_eq!(c.text_encoder_lr, Some(c.learning_rate / 2.0));
}

/// kohya's `N_name` folders repeat their images; the run can be counted in epochs of them.
#[test]
fn folder_repeats_and_epochs_are_shown_and_set_the_steps() {
    let dir = tempdir("repeats");
    make_images(&dir.join("data/3_sks dog"));
    make_images(&dir.join("data/plain"));
    let ctx = egui::Context::default();
    let app = StudioApp::new(&ctx, WindowOptions { model_label: "built-in".into(), model: None });
    let mut h =
        Harness::builder().with_size([960.0, 1600.0]).build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.state_mut().on_paths_chosen(DialogPurpose::AddImageFolder, vec![dir.join("data")]);
    run_until(&mut h, SCAN, "scan", |a| !a.dataset.is_scanning());
    h.run();
    let repeats = text_of(&h, "Repeats:");
    assert!(repeats.contains("3_sks dog: 3 images × 3") && repeats.contains("12 images per epoch"), "{repeats}");
    h.get_by_role_and_label(Role::Button, "Training").click();
    h.run();
    h.get_by_role_and_label(Role::CheckBox, "Epochs").click();
    h.run_steps(2);
    let c = &h.state().config;
    // 10 epochs (the default) of 3 × 3 + 3 images at batch 1.
    assert_eq!((c.epochs, c.steps), (Some(10), 120));
    h.get_by_label_contains("12 images an epoch");
}

/// A file only part of which fits the model is never loaded unasked: the doctor says so and offers
/// to add only the layers that fit; once asked, the row loads and says it is partial.
#[test]
fn a_partly_fitting_adapter_is_added_only_when_asked() {
    use lora_studio::engine::io::weights::{read_safetensors_with_metadata, write_safetensors};
    let dir = tempdir("partial");
    let (mut tensors, metadata) = read_safetensors_with_metadata(&sd1_tiny().join("lora_a_kohya.safetensors")).unwrap();
    let foreign = "lora_unet_double_blocks_0_img_attn_qkv";
    let down = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].clone();
    let up = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"].clone();
    tensors.insert(format!("{foreign}.lora_down.weight"), down);
    tensors.insert(format!("{foreign}.lora_up.weight"), up);
    let file = dir.join("mostly.safetensors");
    write_safetensors(&file, &tensors, Some(metadata)).unwrap();

    let mut h = harness_with_model();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    drop_paths(&mut h, std::slice::from_ref(&file));
    run_until(&mut h, SCAN, "the doctor's report", |a| a.playground.pending.iter().all(|p| p.check.is_some()));
    h.run_steps(3);
    h.get_by_label_contains("Only part of it fits this model");
    h.get_by_label_contains(foreign);
    assert!(h.query_by_label("Add to list").is_none(), "no plain add for a partial file");
    // The long report can push the button below the fold.
    h.get_by_label("Add only the layers that fit").scroll_to_me();
    h.run_steps(3);
    h.get_by_label("Add only the layers that fit").click();
    h.run_steps(3);
    assert!(h.state().playground.pending.is_empty(), "accepted");
    run_until(&mut h, SCAN, "the adapter", |a| {
        a.playground.adapters.first().is_some_and(|r| r.info.is_some() || r.error.is_some())
    });
    let row = &h.state().playground.adapters[0];
    assert!(row.error.is_none(), "{:?}", row.error);
    assert!(row.warning.as_deref().is_some_and(|w| w.contains("partial load, as asked")), "{:?}", row.warning);
}

/// The Playground's device and weights settings: the status bar says where the model runs and what
/// its weights are kept in; choosing f16 reloads the model with half-precision weights.
#[test]
fn choosing_f16_weights_reloads_the_model_in_half_precision() {
    let mut h = harness_on_playground();
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    h.get_by_label("Device: CPU · f32 weights");
    h.get_by_value("CPU");
    h.get_by_value("auto").click();
    h.run_steps(3);
    h.get_by_label("f16 (half the memory)").click();
    h.step(); // the reload starts (its spinner keeps the window repainting)
    assert_eq!(h.state().playground.placement.weights, lora_studio::engine::io::weights::WeightPrecision::F16);
    run_until(&mut h, SCAN, "model reloaded", |a| {
        a.playground.model_state == ModelState::Ready && a.playground.loaded_weights == Some("f16")
    });
    h.run_steps(3);
    h.get_by_label("Device: CPU · f16 weights");
}

/// An SDXL model in the window: the status bar names the family, the Playground starts at its size
/// with Euler, the training settings take SDXL's defaults (1024 px, gradient checkpointing, UNet
/// only), an SDXL LoRA joins the list and a picture is drawn with it.
#[test]
fn an_sdxl_model_opens_with_its_familys_defaults_and_draws_with_an_sdxl_lora() {
    let sdxl = fixtures_dir().join("sdxl-tiny");
    let ctx = egui::Context::default();
    let options = WindowOptions { model_label: String::new(), model: Some(sdxl.join("model")) };
    let app = StudioApp::new(&ctx, options);
    let mut h =
        Harness::builder().with_size([1100.0, 760.0]).build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    h.run();
    h.get_by_role_and_label(Role::Button, "Playground").click();
    h.run_steps(2);
    run_until(&mut h, SCAN, "model loaded", |a| a.playground.model_state == ModelState::Ready);
    h.run_steps(3); // the worker's events may repaint at any time: step, not settle
    h.get_by_label_contains("· SDXL");
    let a = h.state();
    // The UNet's sample_size (8) × the VAE's factor (2), for generation and training alike.
    assert_eq!((a.playground.request.width, a.playground.request.height), (16, 16));
    assert_eq!(a.playground.request.sampler, lora_studio::engine::diffusion::sampler::SamplerKind::Euler);
    assert_eq!(a.config.dataset.resolution, 16);
    assert!(a.config.gradient_checkpointing && !a.config.train_text_encoder);

    h.state_mut().playground.add_adapter(&sdxl.join("lora_kohya.safetensors"));
    run_until(&mut h, SCAN, "adapter", |a| a.playground.adapters.first().is_some_and(|r| r.info.is_some()));
    assert!(h.state().playground.adapters[0].error.is_none(), "{:?}", h.state().playground.adapters[0].error);
    quick_request(&mut h.state_mut().playground);
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.step();
    run_until(&mut h, SCAN, "an image", |a| a.playground.images_made >= 1);
    run_until(&mut h, SCAN, "idle", |a| !a.playground.busy());
    assert_eq!(h.state().playground.image.as_ref().unwrap().dimensions(), (32, 32));
}
