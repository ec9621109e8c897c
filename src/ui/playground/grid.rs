//! The Playground's XY grid drawn: two adapters' weights against each other with one seed.

use super::*;

/// Two adapters' weights against each other, rendered with the same seed as one image.
pub(super) fn xy_grid(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    egui::CollapsingHeader::new("XY grid").id_salt("xy_grid").show(ui, |ui| {
        let names: Vec<String> = p.adapters.iter().map(|r| r.name.clone()).collect();
        let g = &mut p.grid;
        g.x = g.x.min(names.len() - 1);
        g.y = g.y.min(names.len() - 1);
        egui::Grid::new("xy_grid_settings").num_columns(3).show(ui, |ui| {
            for (axis, index, values) in
                [("X (columns)", &mut g.x, &mut g.x_values), ("Y (rows)", &mut g.y, &mut g.y_values)]
            {
                let label = ui.label(axis);
                egui::ComboBox::from_id_salt(axis)
                    .selected_text(names[*index].as_str())
                    .show_ui(ui, |ui| {
                        for (i, n) in names.iter().enumerate() {
                            ui.selectable_value(index, i, n);
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.add(egui::TextEdit::singleline(values).desired_width(110.0).hint_text("0, 0.5, 1"))
                    .on_hover_text("Weights to try, separated by commas")
                    .labelled_by(label.id);
                ui.end_row();
            }
        });
        if ui.add_enabled(p.model.is_some(), egui::Button::new("Render grid")).clicked() {
            p.render_grid();
        }
    });
}
