//! The Training area: where an adapter is trained on the dataset.

pub(super) fn ui_training(ui: &mut egui::Ui) {
    super::area_heading(
        ui,
        "Train an adapter",
        "Choose a base model and the dataset, set the rank and the number of steps, then follow the loss as it trains.",
    );
    ui.add_space(12.0);
    super::not_built_yet(ui, "Training from the window is not built yet.");
}
