//! The Dataset area: where a person gathers the images an adapter is trained on.

use egui::{Align, Layout, RichText, Sense, Shape, Stroke, UiBuilder, vec2};

pub(super) fn ui_dataset(ui: &mut egui::Ui) {
    super::area_heading(ui, "Your training images", "Gather the pictures an adapter should learn from.");
    ui.add_space(16.0);
    drop_zone(ui);
}

/// A dashed, rounded box over the rest of the panel that says where files go. The words are real
/// labels (not painted text) so that screen readers and tests can find them.
fn drop_zone(ui: &mut egui::Ui) {
    let height = ui.available_height().max(160.0);
    let (rect, _) = ui.allocate_exact_size(vec2(ui.available_width(), height), Sense::hover());
    let visuals = ui.visuals();
    let r = rect.shrink(1.0);
    let outline = [r.left_top(), r.right_top(), r.right_bottom(), r.left_bottom(), r.left_top()];
    ui.painter().rect_filled(r, 6.0, visuals.faint_bg_color);
    ui.painter().extend(Shape::dashed_line(&outline, Stroke::new(1.5, visuals.weak_text_color()), 8.0, 6.0));

    // Three lines of text, centred; a child Ui so the parent's layout is not touched again.
    let text_height = 72.0;
    let inner = rect.shrink2(vec2(16.0, ((rect.height() - text_height) / 2.0).max(8.0)));
    let mut child = ui.new_child(UiBuilder::new().max_rect(inner).layout(Layout::top_down(Align::Center)));
    child.label(RichText::new("Drop images or folders here").size(18.0));
    child.label(RichText::new("PNG, JPEG, WebP or BMP").weak());
    child.add_space(10.0);
    super::not_built_yet(&mut child, "Importing is not built yet: dropping files here does nothing for now.");
}
