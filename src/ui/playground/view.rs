//! The Playground area drawn: the model row, prompt and settings, the picture; the adapter list
//! and the XY grid come from `adapters.rs` and `grid.rs`.

use super::*;

pub(in crate::ui) fn ui_playground(
    ui: &mut egui::Ui,
    p: &mut PlaygroundPanel,
    model_label: &str,
) -> Vec<PlaygroundAction> {
    let mut actions = Vec::new();
    crate::ui::area_heading(
        ui,
        "Blend adapters",
        "Load adapters, give each a weight with a slider, and generate images from the base model.",
    );
    ui.add_space(6.0);
    p.ensure_model();
    // Ctrl+Enter (⌘+Enter on a Mac) generates from anywhere in the area, the prompt box included,
    // as in A1111. Plain Enter in the prompt still starts a new line.
    let generate = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Enter);
    if p.model.is_some() && ui.ctx().input_mut(|i| i.consume_shortcut(&generate)) {
        p.generate();
    }
    egui::Panel::left("playground_settings").resizable(true).default_size(380.0).show(ui, |ui| {
        egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
            model_row(ui, p, model_label, &mut actions);
            placement_row(ui, p);
            ui.separator();
            prompt_settings(ui, p);
            ui.separator();
            adapters(ui, p, &mut actions);
        });
    });
    egui::CentralPanel::default().show(ui, |ui| image_view(ui, p, &mut actions));
    actions
}

pub(super) fn model_row(
    ui: &mut egui::Ui,
    p: &mut PlaygroundPanel,
    model_label: &str,
    actions: &mut Vec<PlaygroundAction>,
) {
    ui.horizontal(|ui| {
        ui.strong("Model:");
        let shown = if model_label.is_empty() { "none open" } else { model_label };
        ui.label(shown).on_hover_text(model_label);
    });
    ui.horizontal(|ui| {
        ui.menu_button("Open model…", |ui| {
            if ui.button("Built-in model").on_hover_text("The small model that comes with LoRA Studio").clicked() {
                actions.push(PlaygroundAction::OpenBuiltin);
                ui.close();
            }
            if ui.button("Diffusers folder…").clicked() {
                actions.push(PlaygroundAction::OpenDialog(DialogPurpose::OpenModelFolder));
                ui.close();
            }
            if ui.button("Single .safetensors file…").clicked() {
                actions.push(PlaygroundAction::OpenDialog(DialogPurpose::OpenModelFile));
                ui.close();
            }
        });
        match &p.model_state {
            ModelState::None | ModelState::Failed(_) => {}
            ModelState::Loading => {
                ui.spinner();
                ui.label("loading…");
            }
            ModelState::Ready => {
                ui.label(RichText::new("ready").weak());
            }
        }
    });
    // On its own line and wrapped: a long error must not widen the panel.
    if let ModelState::Failed(e) = &p.model_state {
        ui.add(
            egui::Label::new(RichText::new(format!("could not load: {e}")).color(ui.visuals().error_fg_color)).wrap(),
        );
    }
}

/// Where the model runs and how its weights are kept; a change reloads the model (and applies to
/// the next training run).
pub(super) fn placement_row(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    ui.horizontal(|ui| {
        let label = ui.label("Device");
        egui::ComboBox::from_id_salt("device")
            .selected_text(Placement::device_label(&p.placement.device))
            .show_ui(ui, |ui| {
                for spec in Placement::device_choices() {
                    let text = Placement::device_label(&spec);
                    ui.selectable_value(&mut p.placement.device, spec, text);
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text("The devices this build can use (GPUs need a build with --features cuda or metal)");
        let label = ui.label("Weights");
        egui::ComboBox::from_id_salt("weights")
            .selected_text(p.placement.weights.name())
            .show_ui(ui, |ui| {
                for w in WeightPrecision::ALL {
                    ui.selectable_value(&mut p.placement.weights, w, w.label());
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text(
                "How the base model's weights are kept in memory. f16 / bf16 halve it; the maths runs in f32 \
                 either way, and adapters always train in f32.",
            );
    });
}

pub(super) fn prompt_settings(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    let label = ui.label("Prompt");
    ui.add(egui::TextEdit::multiline(&mut p.request.prompt).desired_rows(2).desired_width(f32::INFINITY))
        .labelled_by(label.id);
    let label = ui.label("Negative prompt");
    ui.add(egui::TextEdit::singleline(&mut p.request.negative).desired_width(f32::INFINITY).hint_text("what to avoid"))
        .labelled_by(label.id);
    egui::Grid::new("generate_settings").num_columns(2).spacing([10.0, 4.0]).show(ui, |ui| {
        let label = ui.label("Seed");
        ui.horizontal(|ui| {
            ui.add(egui::DragValue::new(&mut p.request.seed)).labelled_by(label.id);
            if ui.button("Random").on_hover_text("Pick a random seed (the dice)").clicked() {
                p.request.seed = random_seed();
            }
        });
        ui.end_row();
        let label = ui.label("Steps").on_hover_text("Denoising steps; 20–30 is usual");
        ui.add(egui::DragValue::new(&mut p.request.steps).range(1..=150)).labelled_by(label.id);
        ui.end_row();
        let label =
            ui.label("Guidance").on_hover_text("How strongly the image follows the prompt (CFG scale); 1 turns it off");
        ui.add(egui::DragValue::new(&mut p.request.guidance).range(1.0..=30.0).speed(0.1)).labelled_by(label.id);
        ui.end_row();
        let label =
            ui.label("Sampler").on_hover_text("LCM and TCD are for LCM-LoRA / TCD-LoRA: 4–8 steps, guidance 1 (off)");
        egui::ComboBox::from_id_salt("sampler")
            .selected_text(p.request.sampler.label())
            .show_ui(ui, |ui| {
                for s in SamplerKind::ALL {
                    if ui.selectable_label(p.request.sampler == s, s.label()).clicked() {
                        p.choose_sampler(s);
                    }
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        if p.loaded_family != Some(ModelFamily::Sdxl) {
            let label = ui.label("Clip skip").on_hover_text(
                "Read the text encoder this many layers from its end: 2 for anime SD 1.x models (A1111's Clip skip)",
            );
            ui.add(egui::DragValue::new(&mut p.request.clip_skip).range(1..=12)).labelled_by(label.id);
            ui.end_row();
        }
        let label = ui
            .label("Size")
            .on_hover_text("Width × height in pixels; a multiple of the model's size step (8 × 2^levels)");
        ui.horizontal(|ui| {
            let w = ui.add(egui::DragValue::new(&mut p.request.width).range(8..=2048).speed(8)).labelled_by(label.id);
            ui.label("×");
            let h = ui.add(egui::DragValue::new(&mut p.request.height).range(8..=2048).speed(8)).labelled_by(label.id);
            p.size_chosen |= w.changed() || h.changed();
        });
        ui.end_row();
    });
    ui.horizontal(|ui| {
        let can = p.model.is_some();
        let shortcut =
            ui.ctx().format_shortcut(&egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Enter));
        let button = ui.add_enabled(can, egui::Button::new(RichText::new("Generate").strong()));
        if button.on_hover_text(format!("Render in full ({shortcut})")).clicked() {
            p.generate();
        }
        ui.checkbox(&mut p.live, "Live").on_hover_text("Re-render with the same seed when a slider stops moving");
        ui.add_enabled(p.live, egui::Checkbox::new(&mut p.preview, "Quick preview")).on_hover_text(format!(
            "Live re-renders at half size (sides above {PREVIEW_MIN_SIDE} px) and at most {PREVIEW_STEPS} steps; \
             Generate renders in full"
        ));
        if let Some((step, total)) = p.progress {
            ui.spinner();
            ui.label(format!("step {step}/{total}"));
        }
    });
}

pub(super) fn image_view(ui: &mut egui::Ui, p: &mut PlaygroundPanel, actions: &mut Vec<PlaygroundAction>) {
    if let Some(msg) = &p.message {
        ui.label(msg);
    }
    ui.horizontal(|ui| {
        if ui.add_enabled(p.image.is_some(), egui::Button::new("Save image…")).clicked() {
            actions.push(PlaygroundAction::OpenDialog(DialogPurpose::SaveImage));
        }
        ui.label(RichText::new(&p.image_info).weak());
    });
    if let Some((step, total)) = p.progress {
        let fraction = if total == 0 { 0.0 } else { step as f32 / total as f32 };
        ui.horizontal(|ui| {
            if ui.button("Cancel").on_hover_text("Stop drawing this image or grid").clicked() {
                p.cancel();
            }
            ui.add(egui::ProgressBar::new(fraction).text(format!("Drawing: step {step} / {total}")));
        });
    }
    // The session's images, newest first: a click shows one again with the settings that drew it.
    let strip = if p.gallery.len() > 1 { GALLERY_THUMB + 22.0 } else { 0.0 };
    match &p.texture {
        Some(tex) => {
            let side = ui.available_width().min(ui.available_height() - strip).max(64.0);
            ui.add(
                egui::Image::from_texture(tex).fit_to_exact_size(egui::vec2(side, side)).maintain_aspect_ratio(true),
            );
        }
        None => {
            ui.add_space(20.0);
            ui.label(RichText::new("The image appears here.").weak());
        }
    }
    if p.gallery.len() > 1 {
        gallery_strip(ui, p);
    }
}

/// The side of a gallery thumbnail, in points.
const GALLERY_THUMB: f32 = 56.0;

fn gallery_strip(ui: &mut egui::Ui, p: &mut PlaygroundPanel) {
    let mut open = None;
    egui::ScrollArea::horizontal().id_salt("gallery").show(ui, |ui| {
        ui.horizontal(|ui| {
            for (i, item) in p.gallery.iter().enumerate().rev() {
                let size = egui::vec2(GALLERY_THUMB, GALLERY_THUMB);
                let button = egui::Button::image(egui::Image::from_texture(&item.texture).fit_to_exact_size(size));
                let tip = format!("{}\n{}", item.params.prompt_with_tags(), item.info);
                let name = format!("Image {} of this session", i + 1);
                let response = ui.add(button);
                response.widget_info(|| egui::WidgetInfo::labeled(egui::accesskit::Role::Button, true, &name));
                if response.on_hover_text(tip).clicked() {
                    open = Some(i);
                }
            }
        });
    });
    if let Some(i) = open {
        p.open_from_gallery(i);
    }
}

pub(super) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() % 4_294_967_296
}
