//! Window tests through egui_kittest: they drive `StudioApp::show` by its accessibility tree,
//! headless (no display, no GPU).

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT as _, Queryable as _};
use lora_studio::ui::{Area, StudioApp, WindowOptions};

fn harness(model_label: &str) -> Harness<'static, StudioApp> {
    let app = StudioApp::new(WindowOptions { model_label: model_label.to_owned() });
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
