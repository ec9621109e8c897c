//! The Playground area: several adapters blended on the frozen base model, one slider each.

pub(super) fn ui_playground(ui: &mut egui::Ui) {
    super::area_heading(
        ui,
        "Blend adapters",
        "Load adapters, give each a weight with a slider, and generate images from the base model.",
    );
    ui.add_space(12.0);
    super::not_built_yet(ui, "The playground is not built yet. The command line can already generate images:");
    ui.add_space(4.0);
    ui.code("lora-studio generate --model PATH --prompt TEXT --out FILE.png");
}
