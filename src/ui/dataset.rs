//! The Dataset area: where a person gathers the images an adapter is trained on. Files and
//! folders are scanned off the UI thread (`Dataset::scan`), thumbnails come from a worker, a
//! selected image's caption is edited and saved to its sidecar, and the pre-flight report says
//! what training will find before it starts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crossbeam_channel::Receiver;
use egui::{Align, Layout, RichText, Sense, Shape, Stroke, UiBuilder, vec2};

use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::train::dataset::{Dataset, DatasetOptions, Preflight};

use super::thumbnails::{THUMBNAIL_SIDE, Thumbnails};

type ScanResult = Result<Dataset, String>;

pub struct DatasetPanel {
    /// The usable images, in the order they were added; skipped files with their reasons.
    pub dataset: Dataset,
    /// Index into `dataset.images` of the image whose caption is being edited.
    pub selected: Option<usize>,
    /// The selected image's caption as typed (saved with "Save caption").
    pub caption_edit: String,
    /// Scans in flight, one per batch of added paths.
    scans: Vec<Receiver<ScanResult>>,
    pub thumbnails: Thumbnails,
    /// The last error or note (a failed scan, a caption that could not be saved).
    pub message: Option<String>,
    /// The model's tokenizer when a model is open; otherwise captions are counted in words.
    pub tokenizer: Option<ClipTokenizer>,
    preflight: Option<(PreflightKey, Preflight)>,
    /// Bumped whenever the image set or a caption changes.
    generation: u64,
    /// The set as it was before *Clear*, while *Undo* can bring it back.
    pub cleared: Option<Dataset>,
}

#[derive(PartialEq)]
struct PreflightKey {
    generation: u64,
    options: DatasetOptions,
    tokenizer: bool,
}

/// What the panel asks of the rest of the window.
pub enum DatasetAction {
    OpenDialog(super::DialogPurpose),
}

impl DatasetPanel {
    pub fn new(ctx: &egui::Context) -> Self {
        Self {
            dataset: Dataset::default(),
            selected: None,
            caption_edit: String::new(),
            scans: Vec::new(),
            thumbnails: Thumbnails::new(ctx),
            message: None,
            tokenizer: None,
            preflight: None,
            generation: 0,
            cleared: None,
        }
    }

    /// Scans `paths` (files or folders) on a worker thread; the images join the set when done.
    pub fn add_paths(&mut self, ctx: &egui::Context, paths: Vec<PathBuf>, opts: &DatasetOptions) {
        if paths.is_empty() {
            return;
        }
        let ctx = ctx.clone();
        match crate::job::scan::scan(paths, opts.clone(), move || ctx.request_repaint()) {
            Ok(rx) => self.scans.push(rx),
            Err(e) => self.message = Some(format!("could not start scanning: {e}")),
        }
    }

    pub fn is_scanning(&self) -> bool {
        !self.scans.is_empty()
    }

    /// Takes in finished scans and thumbnails; never blocks.
    pub fn poll(&mut self, ctx: &egui::Context) {
        let mut still = Vec::new();
        for rx in std::mem::take(&mut self.scans) {
            match rx.try_recv() {
                Ok(Ok(found)) => {
                    // A scan that worked clears the error an earlier one left.
                    self.message = None;
                    self.merge(found)
                }
                Ok(Err(e)) => self.message = Some(e),
                Err(crossbeam_channel::TryRecvError::Empty) => still.push(rx),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.message = Some("the scan stopped unexpectedly".into())
                }
            }
        }
        self.scans = still;
        self.thumbnails.poll(ctx);
    }

    fn merge(&mut self, found: Dataset) {
        if !found.images.is_empty() {
            self.cleared = None;
        }
        let known: HashSet<PathBuf> = self.dataset.images.iter().map(|e| e.path.clone()).collect();
        self.dataset.images.extend(found.images.into_iter().filter(|e| !known.contains(&e.path)));
        for s in found.skipped {
            if !self.dataset.skipped.iter().any(|k| k.path == s.path) {
                self.dataset.skipped.push(s);
            }
        }
        self.generation += 1;
    }

    /// The image files training will use.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.dataset.images.iter().map(|e| e.path.clone()).collect()
    }

    /// Selects another image; an edited caption of the one before is saved first (a click
    /// elsewhere must not throw typing away). If it cannot be saved, the selection stays.
    pub fn select(&mut self, index: usize) {
        if self.selected != Some(index) && self.caption_edited() {
            self.save_caption();
            if self.caption_edited() {
                return;
            }
        }
        if let Some(entry) = self.dataset.images.get(index) {
            self.selected = Some(index);
            self.caption_edit = entry.caption.clone();
        }
    }

    /// The selected image's caption box differs from its saved caption.
    pub fn caption_edited(&self) -> bool {
        self.selected
            .and_then(|i| self.dataset.images.get(i))
            .is_some_and(|e| e.caption.trim() != self.caption_edit.trim())
    }

    /// Takes the image out of the set (the file stays on disk).
    pub fn remove(&mut self, index: usize) {
        if index < self.dataset.images.len() {
            self.dataset.images.remove(index);
            self.selected = None;
            self.caption_edit.clear();
            self.generation += 1;
        }
    }

    /// Empties the set; *Undo* brings it back until the set changes again.
    pub fn clear(&mut self) {
        if self.caption_edited() {
            self.save_caption();
        }
        self.cleared = Some(std::mem::take(&mut self.dataset));
        self.selected = None;
        self.caption_edit.clear();
        self.generation += 1;
    }

    pub fn undo_clear(&mut self) {
        if let Some(before) = self.cleared.take() {
            let added = std::mem::replace(&mut self.dataset, before);
            self.merge(added);
        }
    }

    /// Writes the edited caption to the image's sidecar (`.txt` unless it already has a
    /// `.caption`), atomically.
    pub fn save_caption(&mut self) {
        let Some(entry) = self.selected.and_then(|i| self.dataset.images.get_mut(i)) else { return };
        let file = entry.caption_file.clone().unwrap_or_else(|| entry.path.with_extension("txt"));
        let text = self.caption_edit.trim().to_string();
        match crate::engine::io::weights::write_atomic(&file, text.as_bytes()) {
            Ok(()) => {
                entry.caption = text;
                entry.caption_file = Some(file);
                self.message = None;
                self.generation += 1;
            }
            Err(e) => self.message = Some(format!("{e:#}")),
        }
    }

    /// The pre-flight report for the current set, recomputed only when something changed.
    pub fn preflight(&mut self, opts: &DatasetOptions) -> &Preflight {
        let key =
            PreflightKey { generation: self.generation, options: opts.clone(), tokenizer: self.tokenizer.is_some() };
        if self.preflight.as_ref().is_none_or(|(k, _)| *k != key) {
            let report = match &self.tokenizer {
                Some(t) => self.dataset.preflight(opts, &|c| t.count_tokens(c)),
                None => self.dataset.preflight(opts, &|c| c.split_whitespace().count()),
            };
            self.preflight = Some((key, report));
        }
        &self.preflight.as_ref().expect("just computed").1
    }

    /// One line: how many images, skipped files, duplicates and small images.
    pub fn counts_line(&mut self, opts: &DatasetOptions) -> String {
        let images = self.dataset.images.len();
        let skipped = self.dataset.skipped.len();
        let pf = self.preflight(opts);
        let duplicates: usize = pf.duplicates.iter().map(|g| g.len() - 1).sum();
        let small = pf.upscaled.len();
        let plural = crate::engine::train::dataset::counted;
        format!(
            "{} · {} · {} · {}",
            plural(images, "image", "images"),
            plural(skipped, "skipped", "skipped"),
            plural(duplicates, "duplicate", "duplicates"),
            plural(small, "smaller than the training size", "smaller than the training size"),
        )
    }
}

pub(super) fn ui_dataset(ui: &mut egui::Ui, panel: &mut DatasetPanel, opts: &mut DatasetOptions) -> Vec<DatasetAction> {
    let mut actions = Vec::new();
    super::area_heading(ui, "Your training images", "Gather the pictures an adapter should learn from.");
    ui.add_space(8.0);
    if let Some(before) = &panel.cleared {
        let n = crate::engine::train::dataset::counted(before.images.len(), "image", "images");
        ui.horizontal(|ui| {
            ui.label(format!("Cleared {n} from the set (the files stay on disk)."));
            if ui.button("Undo").on_hover_text("Put the images back in the set").clicked() {
                panel.undo_clear();
            }
        });
    }
    ui.horizontal(|ui| {
        if ui.button("Add images…").on_hover_text("Pick image files to add").clicked() {
            actions.push(DatasetAction::OpenDialog(super::DialogPurpose::AddImages));
        }
        if ui.button("Add folder…").on_hover_text("Add every image in a folder and its subfolders").clicked() {
            actions.push(DatasetAction::OpenDialog(super::DialogPurpose::AddImageFolder));
        }
        if !panel.dataset.images.is_empty()
            && ui.button("Clear").on_hover_text("Empty the set (files stay on disk)").clicked()
        {
            panel.clear();
        }
        ui.separator();
        let label = ui.label("Trigger word:");
        ui.add(egui::TextEdit::singleline(&mut opts.trigger).desired_width(160.0).hint_text("e.g. sks style"))
            .labelled_by(label.id)
            .on_hover_text("Put in front of every caption, so the adapter answers to this word in prompts");
        if panel.is_scanning() {
            ui.spinner();
            ui.label("Scanning…");
        }
    });
    if let Some(msg) = &panel.message {
        ui.colored_label(ui.visuals().error_fg_color, msg);
    }
    if panel.dataset.images.is_empty() && panel.dataset.skipped.is_empty() {
        ui.add_space(8.0);
        drop_zone(ui, panel.is_scanning());
        return actions;
    }
    let counts = panel.counts_line(opts);
    ui.label(RichText::new(counts).strong());
    ui.add_space(4.0);

    egui::Panel::right("dataset_side").resizable(true).default_size(320.0).show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            caption_editor(ui, panel, &opts.trigger);
            ui.add_space(8.0);
            preflight_report(ui, panel, opts);
        });
    });
    egui::CentralPanel::default().show(ui, |ui| thumbnail_grid(ui, panel));
    actions
}

/// The grid draws (and asks the thumbnail worker for) only the rows in view, so a folder of
/// thousands of images costs no more per frame, nor decodes more up front, than a screenful.
fn thumbnail_grid(ui: &mut egui::Ui, panel: &mut DatasetPanel) {
    let mut clicked = None;
    let cell = vec2(THUMBNAIL_SIDE as f32 + 8.0, THUMBNAIL_SIDE as f32 + 30.0);
    let spacing = ui.spacing().item_spacing;
    let columns = (((ui.available_width() - 8.0 + spacing.x) / (cell.x + spacing.x)).floor() as usize).max(1);
    let count = panel.dataset.images.len();
    let rows = count.div_ceil(columns);
    egui::ScrollArea::vertical().auto_shrink([false, false]).show_rows(ui, cell.y, rows, |ui, visible| {
        for row in visible {
            ui.horizontal(|ui| {
                ui.add_space(4.0); // room for the selection outline
                for i in row * columns..((row + 1) * columns).min(count) {
                    let entry = &panel.dataset.images[i];
                    let selected = panel.selected == Some(i);
                    let name = file_name(&entry.path);
                    ui.allocate_ui(cell, |ui| {
                        ui.vertical_centered(|ui| {
                            let side = vec2(THUMBNAIL_SIDE as f32, THUMBNAIL_SIDE as f32);
                            let image = match panel.thumbnails.get(&entry.path) {
                                Some(tex) => {
                                    ui.add(egui::Image::from_texture(tex).max_size(side).sense(Sense::click()))
                                }
                                None => {
                                    let (rect, r) = ui.allocate_exact_size(side, Sense::click());
                                    ui.painter().rect_filled(rect, 4.0, ui.visuals().faint_bg_color);
                                    r
                                }
                            };
                            if selected {
                                let stroke = Stroke::new(2.0, ui.visuals().selection.stroke.color);
                                ui.painter().rect_stroke(
                                    image.rect.expand(2.0),
                                    4.0,
                                    stroke,
                                    egui::StrokeKind::Outside,
                                );
                            }
                            let short: String = name.chars().take(18).collect();
                            let label =
                                ui.selectable_label(selected, short).on_hover_text(entry.path.display().to_string());
                            if image.clicked() || label.clicked() {
                                clicked = Some(i);
                            }
                        });
                    });
                }
            });
        }
    });
    if let Some(i) = clicked {
        panel.select(i);
    }
}

fn caption_editor(ui: &mut egui::Ui, panel: &mut DatasetPanel, trigger: &str) {
    ui.heading("Caption");
    let Some(index) = panel.selected.filter(|&i| i < panel.dataset.images.len()) else {
        ui.label(RichText::new("Select an image to edit its caption.").weak());
        return;
    };
    let entry = &panel.dataset.images[index];
    ui.label(format!("{} ({}×{})", file_name(&entry.path), entry.width, entry.height));
    let sidecar = entry.caption_file.clone().unwrap_or_else(|| entry.path.with_extension("txt"));
    let preview = entry.full_caption(trigger);
    let label = ui.label("Caption text:");
    ui.add(egui::TextEdit::multiline(&mut panel.caption_edit).desired_rows(3).desired_width(f32::INFINITY))
        .labelled_by(label.id)
        .on_hover_text(format!("Saved to {}", sidecar.display()));
    ui.label(RichText::new(format!("Trained as: {preview}")).weak());
    let changed = panel.caption_edit.trim() != entry.caption.trim();
    ui.horizontal(|ui| {
        if ui.add_enabled(changed, egui::Button::new("Save caption")).clicked() {
            panel.save_caption();
        }
        if ui.button("Remove from set").on_hover_text("Leave this image out of training (the file is kept)").clicked() {
            panel.remove(index);
        }
    });
}

fn preflight_report(ui: &mut egui::Ui, panel: &mut DatasetPanel, opts: &DatasetOptions) {
    let counted_by = if panel.tokenizer.is_some() { "CLIP tokens" } else { "words (open a model to count tokens)" };
    let pf = panel.preflight(opts).clone();
    ui.heading("Pre-flight check");
    ui.label(format!("Captions counted in {counted_by}."));
    if !pf.buckets.is_empty() {
        let sizes: Vec<String> = pf.buckets.iter().map(|(size, n)| format!("{size}: {n}")).collect();
        ui.label(format!("Training sizes: {}", sizes.join(", ")));
    }
    // kohya's `N_name` folders: each image N times an epoch.
    if pf.folders.iter().any(|f| f.repeats > 1) {
        ui.label(format!("Repeats: {}", pf.repeats_summary()));
    }
    let warnings = pf.warnings();
    if warnings.is_empty() {
        ui.label("No problems found.");
    } else {
        ui.label(if warnings.len() == 1 { "1 warning:".to_owned() } else { format!("{} warnings:", warnings.len()) });
        for w in warnings {
            ui.label(RichText::new(format!("Warning: {w}")).color(ui.visuals().warn_fg_color));
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// A dashed, rounded box over the rest of the panel that says where files go. The words are real
/// labels (not painted text) so that screen readers and tests can find them.
fn drop_zone(ui: &mut egui::Ui, scanning: bool) {
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
    child.label(RichText::new("PNG, JPEG, WebP or BMP, with optional .txt captions beside them").weak());
    if scanning {
        child.add_space(10.0);
        child.spinner();
    }
}
