//! The Playground's adapter list drawn: one row per adapter (switch, slider, what it is,
//! per-block weights), the format doctor's pending checks, the mix mode and the overdrive meter.

use super::*;

pub(super) fn adapters(ui: &mut egui::Ui, p: &mut PlaygroundPanel, actions: &mut Vec<PlaygroundAction>) {
    ui.horizontal(|ui| {
        ui.strong("Adapters");
        if ui.button("Add adapter…").on_hover_text("Or drop .safetensors files here").clicked() {
            actions.push(PlaygroundAction::OpenDialog(DialogPurpose::AddAdapters));
        }
    });
    pending_checks(ui, p);
    if p.adapters.is_empty() && p.pending.is_empty() {
        ui.label(RichText::new("Drop .safetensors adapters here, or add them with the button.").weak());
    }
    let mut remove = None;
    let mut changed = false;
    for (i, row) in p.adapters.iter_mut().enumerate() {
        ui.push_id(i, |ui| {
            ui.group(|ui| {
                ui.horizontal(|ui| {
                    let name = ui.strong(&row.name).on_hover_text(row.path.display().to_string());
                    if ui.checkbox(&mut row.enabled, "on").on_hover_text("Switch this adapter on or off").changed() {
                        changed = true;
                    }
                    let slider =
                        ui.add(egui::Slider::new(&mut row.weight, -1.0..=2.0).step_by(0.05)).labelled_by(name.id);
                    if slider.changed() {
                        changed = true;
                    }
                    if ui.button("Remove").clicked() {
                        remove = Some(i);
                    }
                });
                match (&row.error, &row.info) {
                    (Some(e), _) => {
                        ui.colored_label(ui.visuals().error_fg_color, e);
                    }
                    (None, Some(info)) => {
                        ui.label(RichText::new(info).weak());
                    }
                    (None, None) => {
                        ui.label(RichText::new("reading…").weak());
                    }
                }
                if let Some(w) = &row.warning {
                    ui.label(RichText::new(format!("Warning: {w}")).color(ui.visuals().warn_fg_color));
                }
                egui::CollapsingHeader::new("Advanced").id_salt("advanced").show(ui, |ui| {
                    ui.label(RichText::new("Per-block weights (A1111 LoRA Block Weight)").weak());
                    let b = &mut row.blocks;
                    for (text, value) in [
                        ("text encoder", &mut b.text_encoder),
                        ("input blocks", &mut b.input),
                        ("middle block", &mut b.middle),
                        ("output blocks", &mut b.output),
                    ] {
                        if ui.add(egui::Slider::new(value, -1.0..=2.0).step_by(0.05).text(text)).changed() {
                            changed = true;
                        }
                    }
                });
            });
        });
    }
    if changed {
        p.mix_changed();
    }
    if let Some(i) = remove {
        p.remove_adapter(i);
    }
    if !p.adapters.is_empty() {
        ui.add_space(6.0);
        mix_controls(ui, p);
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            let label =
                ui.label("Blend rank").on_hover_text("Rank of the exported adapter: higher keeps more of the mix");
            ui.add(egui::DragValue::new(&mut p.blend_rank).range(1..=256)).labelled_by(label.id);
            if ui
                .button("Export blend…")
                .on_hover_text("Save the enabled adapters at their weights as one kohya adapter")
                .clicked()
            {
                actions.push(PlaygroundAction::OpenDialog(DialogPurpose::ExportBlend));
            }
            if ui
                .button("Merge into base…")
                .on_hover_text(
                    "Save the model with the enabled adapters folded into its weights, as a new diffusers folder",
                )
                .clicked()
            {
                actions.push(PlaygroundAction::OpenDialog(DialogPurpose::MergeIntoBase));
            }
        });
    }
    if p.adapters.len() >= 2 {
        ui.add_space(6.0);
        xy_grid(ui, p);
    }
}

/// Each file waiting to join: the format doctor's report, then Add to list or Cancel.
pub(super) fn pending_checks(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    let (mut accept, mut dismiss) = (None, None);
    for (i, pending) in p.pending.iter().enumerate() {
        ui.push_id(("pending", i), |ui| {
            ui.group(|ui| {
                let name = pending.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                ui.strong(format!("Check {name}")).on_hover_text(pending.path.display().to_string());
                match &pending.check {
                    None => {
                        ui.label(RichText::new("reading…").weak());
                    }
                    Some(Err(e)) => {
                        ui.colored_label(ui.visuals().error_fg_color, format!("Not an adapter we can use: {e}"));
                        if ui.button("Dismiss").clicked() {
                            dismiss = Some(i);
                        }
                    }
                    Some(Ok(check)) => {
                        egui::Grid::new("doctor").num_columns(2).show(ui, |ui| {
                            for (label, value) in &check.lines {
                                ui.label(RichText::new(*label).weak());
                                ui.label(value);
                                ui.end_row();
                            }
                        });
                        let fit = format!("With the open model: {}", check.fit);
                        if check.refused {
                            ui.colored_label(ui.visuals().error_fg_color, format!("{fit}. It cannot be used with it."));
                        } else if check.partial {
                            ui.colored_label(
                                ui.visuals().warn_fg_color,
                                format!(
                                    "{fit}. Only part of it fits this model: loaded, it changes the picture differently \
                                     from the model it was made for."
                                ),
                            );
                        } else {
                            ui.label(fit);
                        }
                        ui.horizontal(|ui| {
                            let add = if check.partial { "Add only the layers that fit" } else { "Add to list" };
                            if ui.add_enabled(!check.refused, egui::Button::new(add)).clicked() {
                                accept = Some(i);
                            }
                            if ui.button("Cancel").clicked() {
                                dismiss = Some(i);
                            }
                        });
                    }
                }
            });
        });
    }
    if let Some(i) = accept {
        p.accept_pending(i);
    }
    if let Some(i) = dismiss {
        p.dismiss_pending(i);
    }
}

/// Sum or budget mode, and the overdrive meter.
pub(super) fn mix_controls(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    ui.horizontal(|ui| {
        let label = ui.label("Mix").on_hover_text(
            "Sum: each adapter at its slider weight. Budget: the weights are scaled down together so their \
             absolute values add up to at most the budget, so stacking styles cannot fry the image.",
        );
        let mut budget_on = matches!(p.mix_mode, MixMode::Budget(_));
        let mut budget = match p.mix_mode {
            MixMode::Budget(b) => b,
            MixMode::Sum => 1.0,
        };
        let before = p.mix_mode;
        egui::ComboBox::from_id_salt("mix_mode")
            .selected_text(if budget_on { "normalise to a budget" } else { "sum" })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut budget_on, false, "sum");
                ui.selectable_value(&mut budget_on, true, "normalise to a budget");
            })
            .response
            .labelled_by(label.id);
        if budget_on {
            let l = ui.label("budget");
            ui.add(egui::DragValue::new(&mut budget).range(0.1..=4.0).speed(0.05)).labelled_by(l.id);
        }
        let mode = if budget_on { MixMode::Budget(budget) } else { MixMode::Sum };
        if mode != before {
            p.set_mix_mode(mode);
        }
    });
    let enabled = p.adapters.iter().filter(|r| r.effective_weight() != 0.0).count();
    overdrive_meter(ui, p.total_strength(), p.overdrive, enabled);
}

/// How hard the adapters push the model. Measured as ‖Σ wᵢ·ΔWᵢ‖ / ‖W‖ at the worst layer the
/// adapters touch (the worker computes it after each change); until then, the sum of |weight|.
/// `enabled`: adapters with a weight (the warning speaks of one adapter or of a stack).
pub(super) fn overdrive_meter(ui: &mut egui::Ui, total: f64, measured: Option<f64>, enabled: usize) {
    // Around 0.1 styles blend; past about 0.5 the weights are more adapter than model.
    let level = measured.map_or(total / 1.5 * 0.25, |r| r);
    let (color, word, advice) = if level <= 0.25 {
        (egui::Color32::from_rgb(80, 160, 90), "normal", "styles blend")
    } else if level <= 0.5 {
        (egui::Color32::from_rgb(220, 170, 50), "strong", "watch for artefacts")
    } else {
        (egui::Color32::from_rgb(210, 70, 60), "overdriven", "images may burn")
    };
    // The bar's text cannot wrap, so it stays short; the sum and the advice go below it.
    let text = match measured {
        Some(r) => format!("Overdrive {r:.2}: {word}"),
        None => format!("Overdrive: {word}"),
    };
    // Plain words: the UI font has no ‖ or Σ glyphs (they drew as boxes). The words sit beside
    // the bar, not on it: an empty bar's rounded end covered the first letter.
    let tip = "How big the adapters' combined change to a layer's weights is, relative to the weights \
               themselves, at the layer they change most: around 0.1 styles blend, past 0.5 images tend \
               to burn. Lower the weights or use a budget.";
    ui.horizontal(|ui| {
        ui.add(egui::ProgressBar::new((level / 0.75).min(1.0) as f32).fill(color).desired_width(110.0))
            .on_hover_text(tip);
        ui.label(text).on_hover_text(tip);
    });
    ui.small(format!("Weights add up to {total:.2}: {advice}."));
    if level > 0.5 {
        let warning = if enabled <= 1 {
            "Warning: the adapter overdrives the model; lower its weight."
        } else {
            "Warning: stacked adapters overdrive the model; lower the weights or switch Mix to a budget."
        };
        ui.colored_label(ui.visuals().warn_fg_color, warning);
    }
}
