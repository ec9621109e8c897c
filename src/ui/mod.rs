//! The window: a tab bar with the three areas (Dataset, Training, Playground), the selected
//! area's panel, and a status bar (base model, device, process memory, job state).
//!
//! [`StudioApp::show`] draws everything into a `Ui`; the eframe window ([`run_window`]) and the
//! kittest tests (`ui-tests/ui.rs`) both call it, so the tests exercise exactly what the window
//! shows. Each area's panel is a short free function in its own file.

mod dataset;
mod dialogs;
mod loss_plot;
mod playground;
pub mod session;
mod status;
mod thumbnails;
mod training;

use crate::engine::models::family::ModelFamily;
use std::path::{Path, PathBuf};

pub use dataset::DatasetPanel;
pub use dialogs::DialogPurpose;
pub use loss_plot::LossHistory;
pub use playground::{
    AdapterRow, GridSettings, MixMode, ModelState, PREVIEW_MIN_SIDE, PREVIEW_STEPS, PlaygroundPanel, parse_weights,
    preview_of,
};
pub use session::{SavedAdapter, Session};
pub use status::{MemorySampler, format_bytes, resident_memory_bytes};
pub use training::{Preset, RunState, TrainingPanel};

use crate::engine::builtin;
use crate::engine::pipeline::ModelWeights;
use crate::engine::train::trainer::{CheckpointSummary, TrainConfig};

/// What the caller knows when it opens the window.
#[derive(Debug, Clone, Default)]
pub struct WindowOptions {
    /// The base model shown in the status bar when no `model` path is given (e.g. "built-in").
    /// Empty means no model is loaded yet.
    pub model_label: String,
    /// The base model to open: a diffusers folder or a single `.safetensors` checkpoint
    /// (`lora-studio --model PATH`). Used for training, the Playground and token counts.
    pub model: Option<PathBuf>,
}

/// The three areas of the app, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Area {
    #[default]
    Dataset,
    Training,
    Playground,
}

impl Area {
    pub const ALL: [Area; 3] = [Area::Dataset, Area::Training, Area::Playground];

    /// The tab's label; tests find tabs by it.
    pub fn label(self) -> &'static str {
        match self {
            Area::Dataset => "Dataset",
            Area::Training => "Training",
            Area::Playground => "Playground",
        }
    }

    fn shortcut_key(self) -> egui::Key {
        match self {
            Area::Dataset => egui::Key::Num1,
            Area::Training => egui::Key::Num2,
            Area::Playground => egui::Key::Num3,
        }
    }
}

/// What the background work is doing, for the status bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobState {
    #[default]
    Idle,
    Scanning,
    TrainingStarting,
    Training {
        step: usize,
        total: usize,
    },
    TrainingPaused {
        step: usize,
        total: usize,
    },
    TrainingStopping,
    LoadingModel,
    Generating {
        step: usize,
        total: usize,
    },
}

impl JobState {
    pub fn label(self) -> String {
        match self {
            JobState::Idle => "idle".into(),
            JobState::Scanning => "scanning images".into(),
            JobState::TrainingStarting => "training: starting".into(),
            JobState::Training { step, total } => format!("training {step}/{total}"),
            JobState::TrainingPaused { step, total } => format!("training paused at {step}/{total}"),
            JobState::TrainingStopping => "training: saving".into(),
            JobState::LoadingModel => "loading model".into(),
            JobState::Generating { step, total } => format!("generating {step}/{total}"),
        }
    }
}

/// All state of the window. Workers (scans, thumbnails, training, the Playground's model) report
/// through channels that [`StudioApp::poll`] drains every frame without blocking.
pub struct StudioApp {
    pub area: Area,
    /// Base model shown in the status bar (the model path, or [`WindowOptions::model_label`]).
    pub model_label: String,
    /// The open base model.
    pub model: Option<PathBuf>,
    pub memory: MemorySampler,
    /// The training options (the Dataset area edits the trigger word, the Training area the rest).
    pub config: TrainConfig,
    /// The model family `config`'s family-dependent defaults were made for.
    pub settings_family: ModelFamily,
    /// The native side (px) of the model `config`'s resolution default was made for.
    pub settings_side: usize,
    pub dataset: DatasetPanel,
    pub training: TrainingPanel,
    pub playground: PlaygroundPanel,
    dialogs: dialogs::Dialogs,
    ctx: egui::Context,
    /// Start training as soon as the dataset scan is done (scripted runs: `examples/window.rs`).
    pub start_training_when_scanned: bool,
    /// A window-wide note (e.g. a dropped file that was not understood).
    pub notice: Option<String>,
    /// Where the session is autosaved (the real window only; tests leave it unset).
    pub session_file: Option<PathBuf>,
    last_saved: Option<(std::time::Instant, Session)>,
    /// The window was asked to close while training: the question is on screen.
    pub confirm_quit: bool,
    /// Close the window once the run has stopped and saved.
    pub quit_after_stop: bool,
    /// SIGINT / SIGTERM while the window is open (the real window only).
    stop_requests: Option<crossbeam_channel::Receiver<()>>,
}

impl StudioApp {
    /// `ctx` is the window's egui context: workers use it to wake the window.
    pub fn new(ctx: &egui::Context, options: WindowOptions) -> Self {
        let mut app = Self {
            area: Area::default(),
            model_label: options.model_label,
            model: None,
            memory: MemorySampler::default(),
            config: training::first_run_config(ModelFamily::Sd1, 512),
            settings_family: ModelFamily::Sd1,
            settings_side: 512,
            dataset: DatasetPanel::new(ctx),
            training: TrainingPanel::default(),
            playground: PlaygroundPanel::new(ctx),
            dialogs: dialogs::Dialogs::default(),
            ctx: ctx.clone(),
            start_training_when_scanned: false,
            notice: None,
            session_file: None,
            last_saved: None,
            confirm_quit: false,
            quit_after_stop: false,
            stop_requests: None,
        };
        if let Some(model) = options.model {
            app.set_model(model);
        }
        app
    }

    /// What the status bar calls a model.
    fn model_label_of(&self, path: &Path) -> String {
        if builtin::model_dir().is_some_and(|d| crate::engine::io::weights::same_file(&d, path)) {
            BUILTIN_LABEL.to_owned()
        } else {
            path.display().to_string()
        }
    }

    /// Opens a base model: a diffusers folder or a single `.safetensors` checkpoint.
    pub fn set_model(&mut self, path: PathBuf) {
        self.model_label = self.model_label_of(&path);
        let tokenizer_dir = path.join("tokenizer");
        self.dataset.tokenizer = Some(if tokenizer_dir.is_dir() {
            crate::engine::models::tokenizer::ClipTokenizer::from_folder(&tokenizer_dir).unwrap_or_else(|_| {
                crate::engine::models::tokenizer::ClipTokenizer::with_pad_id(
                    crate::engine::models::tokenizer::END_OF_TEXT,
                )
            })
        } else {
            crate::engine::models::tokenizer::ClipTokenizer::with_pad_id(crate::engine::models::tokenizer::END_OF_TEXT)
        });
        // The training defaults follow the model at once (read from its configs, not loaded),
        // so a first run on the 64 px built-in model trains at 64 px, not at SD's 512.
        if let Some(family) = ModelWeights::probe_family(&path)
            && let Some(side) = ModelWeights::probe_native_side(&path)
        {
            self.adopt_model_defaults(family, side);
        }
        self.playground.set_model(Some(path.clone()));
        self.model = Some(path);
    }

    /// The training settings still at the previous model's defaults take this model's.
    fn adopt_model_defaults(&mut self, family: ModelFamily, side: usize) {
        if (family, side) != (self.settings_family, self.settings_side) {
            self.config.adopt_model((self.settings_family, self.settings_side), (family, side));
            (self.settings_family, self.settings_side) = (family, side);
        }
    }

    /// The status bar's device: the one the window's model runs on, and what its weights are kept
    /// in once loaded ("CPU · f16 weights").
    pub fn device_status(&self) -> String {
        let p = &self.playground;
        let device = crate::engine::device::Placement::device_label(&p.placement.device);
        match p.loaded_weights {
            Some(w) => format!("{device} · {w} weights"),
            None => device,
        }
    }

    /// What the status bar says the background work is doing.
    pub fn job(&self) -> JobState {
        let t = &self.training;
        match &t.run {
            RunState::Starting => return JobState::TrainingStarting,
            RunState::Running => return JobState::Training { step: t.step, total: t.total },
            RunState::Paused { .. } => return JobState::TrainingPaused { step: t.step, total: t.total },
            RunState::Stopping => return JobState::TrainingStopping,
            _ => {}
        }
        if self.playground.model_state == ModelState::Loading {
            return JobState::LoadingModel;
        }
        if let Some((step, total)) = self.playground.progress {
            return JobState::Generating { step, total };
        }
        if self.dataset.is_scanning() {
            return JobState::Scanning;
        }
        JobState::Idle
    }

    /// Drains every worker's channel; never blocks. Called by `App::logic` and at the start of
    /// [`StudioApp::show`] (tests drive `show` alone).
    pub fn poll(&mut self, ctx: &egui::Context) {
        for (purpose, paths) in self.dialogs.poll() {
            self.on_paths_chosen(purpose, paths);
        }
        self.dataset.poll(ctx);
        for adapter in self.training.poll(ctx) {
            // A checkpoint or the finished adapter joins (or refreshes in) the Playground.
            self.playground.add_adapter(&adapter);
        }
        self.playground.poll(ctx);
        // A model that failed to open: the window goes back to the one that worked (or the
        // built-in one), so it stays usable and the session never keeps the broken path.
        if let Some((failed, error)) = self.playground.failed_model.take() {
            let fallback = self
                .playground
                .working_model
                .clone()
                .or_else(builtin::model_dir)
                .filter(|m| !crate::engine::io::weights::same_file(m, &failed));
            let back = match &fallback {
                Some(m) => format!(" Back to {}.", self.model_label_of(m)),
                None => String::new(),
            };
            self.notice = Some(format!("Could not open {}: {error}.{back}", failed.display()));
            if let Some(model) = fallback {
                self.set_model(model);
            } else if self.model.as_deref() == Some(failed.as_path()) {
                self.model = None;
                self.model_label.clear();
                self.playground.set_model(None);
            }
        }
        // A model of another family or size (when the probe could not tell): the training
        // settings still at the old model's defaults take the new one's (SDXL: 1024 px, gradient
        // checkpointing, UNet only).
        if let (Some(family), Some(side)) = (self.playground.loaded_family, self.playground.loaded_side) {
            self.adopt_model_defaults(family, side);
        }
        if self.start_training_when_scanned && !self.dataset.is_scanning() {
            self.start_training_when_scanned = false;
            self.start_training(false);
        }
    }

    /// What happens once a file dialog returns paths (tests call this directly).
    pub fn on_paths_chosen(&mut self, purpose: DialogPurpose, paths: Vec<PathBuf>) {
        let Some(first) = paths.first().cloned() else { return };
        match purpose {
            DialogPurpose::AddImages | DialogPurpose::AddImageFolder => {
                let ctx = self.ctx.clone();
                self.dataset.add_paths(&ctx, paths, &self.config.dataset);
            }
            DialogPurpose::OpenModelFolder | DialogPurpose::OpenModelFile => self.set_model(first),
            DialogPurpose::ResumeCheckpoint => self.resume_training(first),
            DialogPurpose::MergeIntoBase => self.playground.merge_into_base(first),
            DialogPurpose::TrainOutput => {
                self.training.output = with_extension(first, "safetensors").display().to_string()
            }
            DialogPurpose::AddAdapters => paths.iter().for_each(|p| self.playground.check_adapter(p)),
            DialogPurpose::SaveImage => self.playground.save_image(&with_extension(first, "png")),
            DialogPurpose::ExportBlend => self.playground.export_blend(with_extension(first, "safetensors")),
        }
    }

    /// Files or folders dropped on the window: adapters on the Playground, a model folder or
    /// checkpoint anywhere (when it is one), images everywhere else.
    pub fn on_dropped(&mut self, paths: Vec<PathBuf>) {
        let is_safetensors = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let (models, rest): (Vec<PathBuf>, Vec<PathBuf>) =
            paths.into_iter().partition(|p| p.join("model_index.json").is_file());
        if let Some(model) = models.into_iter().next() {
            self.set_model(model);
        }
        let (weights, images): (Vec<PathBuf>, Vec<PathBuf>) = rest.into_iter().partition(|p| is_safetensors(p));
        for w in weights {
            if self.area == Area::Playground {
                self.playground.check_adapter(&w);
            } else if std::fs::metadata(&w).is_ok_and(|m| m.len() > 1 << 30) {
                // Over a GiB: a full checkpoint, not an adapter.
                self.set_model(w);
            } else {
                self.notice =
                    Some(format!("{}: drop adapters on the Playground; to open a model use Open model…", w.display()));
            }
        }
        // A PNG dropped on the Playground brings back the settings saved in it (A1111's or ours).
        let (settings, images): (Vec<PathBuf>, Vec<PathBuf>) = images.into_iter().partition(|p| {
            self.area == Area::Playground && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
        });
        if let Some(png) = settings.last() {
            self.playground.restore_parameters(png);
        }
        if !images.is_empty() {
            self.area = Area::Dataset;
            let ctx = self.ctx.clone();
            self.dataset.add_paths(&ctx, images, &self.config.dataset);
        }
    }

    /// A checkpoint's adapter joins the Playground, which comes to the front.
    pub fn try_adapter(&mut self, adapter: &Path) {
        self.playground.ensure_model();
        self.playground.add_adapter(adapter);
        self.area = Area::Playground;
    }

    /// Continues an earlier run from its checkpoint, writing to the adapter it belongs to
    /// (`style.checkpoint.safetensors` → `style.safetensors`), never over another run's adapter.
    /// The run goes on with the checkpoint's own options (adapter kind, rank, targets, steps…),
    /// which the form then shows; a checkpoint that cannot be read is refused before any loading.
    pub fn resume_training(&mut self, checkpoint: PathBuf) {
        let summary = match CheckpointSummary::read(&checkpoint) {
            Ok(s) => s,
            Err(e) => {
                self.training.message = Some(format!("Cannot resume: {e:#}"));
                return;
            }
        };
        let name = checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".checkpoint.safetensors") {
            self.training.output = checkpoint.with_file_name(format!("{stem}.safetensors")).display().to_string();
        }
        // A run that finished all its steps goes on to the form's total, when that is more.
        let mut config = summary.config.clone();
        if summary.step >= config.steps {
            if self.config.steps <= summary.step {
                self.training.message = Some(format!(
                    "{}: this run finished all its {} steps; set Steps above {} to train on",
                    checkpoint.display(),
                    summary.step,
                    summary.step
                ));
                return;
            }
            config.steps = self.config.steps;
        }
        self.config = config;
        self.start_run(Some(checkpoint), false);
        if self.training.is_active() {
            let summary = CheckpointSummary { config: self.config.clone(), ..summary };
            self.training.resume_note = Some(format!("Resuming with the checkpoint's options: {}", summary.describe()));
        }
    }

    /// Starts training with the current options on the dataset's images. `overwrite`: replace an
    /// earlier run's outputs (only after the panel asked).
    pub fn start_training(&mut self, overwrite: bool) {
        self.start_run(None, overwrite);
    }

    /// A run on the dataset's images with the current options, on the window's device and weight
    /// precision, never writing over an adapter the Playground has open.
    fn start_run(&mut self, resume: Option<PathBuf>, overwrite: bool) {
        let images = self.dataset.image_paths();
        let in_use = self.playground.adapter_paths();
        let placement = self.playground.placement.clone();
        let mut config = self.config.clone();
        config.sample_prompt = self.sample_prompt();
        self.training.start(&self.ctx, self.model.as_deref(), &placement, images, &config, resume, in_use, overwrite);
    }

    /// The prompt of the run's samples: the one typed, or else the first image's caption with
    /// the trigger word (what the adapter is being taught to answer to).
    pub fn sample_prompt(&self) -> String {
        if self.config.sample_prompt.trim().is_empty() {
            let trigger = &self.config.dataset.trigger;
            self.dataset.dataset.images.first().map_or(trigger.clone(), |i| i.full_caption(trigger))
        } else {
            self.config.sample_prompt.clone()
        }
    }

    /// Draws the whole window into `ui`: tab bar, status bar, then the selected area.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.guard_close(&ctx);
        self.quit_dialog(&ctx);
        self.handle_shortcuts(ui);
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        if !dropped.is_empty() {
            self.on_dropped(dropped);
        }

        egui::Panel::top("area_tabs").show(ui, |ui| {
            ui.add_space(4.0);
            self.tab_bar(ui);
            ui.add_space(2.0);
        });
        egui::Panel::bottom("status_bar").show(ui, |ui| {
            let now = ui.input(|i| i.time);
            self.memory.refresh(now);
            // Keep the memory figure fresh: each second while work runs, every few seconds when
            // nothing does (each frame costs CPU; an idle window should cost next to none).
            let job = self.job();
            let idle = matches!(job, JobState::Idle);
            ui.ctx().request_repaint_after(if idle { MemorySampler::IDLE_INTERVAL } else { MemorySampler::INTERVAL });
            let job = job.label();
            let device = self.device_status();
            let model = match self.playground.loaded_family {
                Some(family) if !self.model_label.is_empty() => format!("{} · {}", self.model_label, family.label()),
                _ => self.model_label.clone(),
            };
            status::status_bar(ui, &model, &device, &job, &self.memory);
        });
        let margin = egui::Frame::central_panel(ui.style()).inner_margin(egui::Margin::symmetric(20, 12));
        egui::CentralPanel::default().frame(margin).show(ui, |ui| {
            if let Some(notice) = self.notice.clone() {
                // Wrapped: a long path or error must not widen the window.
                ui.horizontal_top(|ui| {
                    if ui.small_button("Dismiss").clicked() {
                        self.notice = None;
                    }
                    ui.add(egui::Label::new(egui::RichText::new(notice).color(ui.visuals().warn_fg_color)).wrap());
                });
            }
            self.area_panel(ui);
        });
        drop_hint(&ctx);
    }

    fn area_panel(&mut self, ui: &mut egui::Ui) {
        let mut dialogs = Vec::new();
        match self.area {
            Area::Dataset => {
                for action in dataset::ui_dataset(ui, &mut self.dataset, &mut self.config.dataset) {
                    let dataset::DatasetAction::OpenDialog(p) = action;
                    dialogs.push(p);
                }
            }
            Area::Training => {
                let images = self.dataset.image_paths();
                let warnings = self.dataset.preflight(&self.config.dataset).warnings();
                let sample_prompt = self.sample_prompt();
                let cx = training::TrainingContext {
                    model: self.model.as_deref(),
                    model_label: &self.model_label,
                    images: &images,
                    warnings,
                    sample_prompt,
                    family: self.playground.loaded_family,
                    images_per_epoch: self.dataset.dataset.images_per_epoch(),
                };
                for action in training::ui_training(ui, &mut self.training, &mut self.config, &cx) {
                    match action {
                        training::TrainingAction::Start => self.start_training(false),
                        training::TrainingAction::StartOver => self.start_training(true),
                        training::TrainingAction::ResumeExisting(checkpoint) => self.resume_training(checkpoint),
                        training::TrainingAction::ChooseOutput => dialogs.push(DialogPurpose::TrainOutput),
                        training::TrainingAction::ChooseResume => dialogs.push(DialogPurpose::ResumeCheckpoint),
                        training::TrainingAction::Try(adapter) => self.try_adapter(&adapter),
                    }
                }
            }
            Area::Playground => {
                for action in playground::ui_playground(ui, &mut self.playground, &self.model_label) {
                    match action {
                        playground::PlaygroundAction::OpenDialog(p) => dialogs.push(p),
                        playground::PlaygroundAction::OpenBuiltin => match builtin::model_dir() {
                            Some(dir) => self.set_model(dir),
                            None => {
                                self.notice = Some("The built-in model is not installed beside this program.".into())
                            }
                        },
                    }
                }
            }
        }
        for purpose in dialogs {
            self.dialogs.open(ui.ctx(), purpose);
        }
    }

    fn handle_shortcuts(&mut self, ui: &egui::Ui) {
        for area in Area::ALL {
            let shortcut = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, area.shortcut_key());
            if ui.ctx().input_mut(|i| i.consume_shortcut(&shortcut)) {
                self.area = area;
            }
        }
    }

    fn tab_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.add_space(4.0);
            ui.label(egui::RichText::new("LoRA Studio").strong());
            ui.separator();
            for area in Area::ALL {
                let shortcut = egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, area.shortcut_key());
                let text = egui::RichText::new(area.label()).size(15.0);
                let response =
                    ui.selectable_label(self.area == area, text).on_hover_text(ui.ctx().format_shortcut(&shortcut));
                if response.clicked() {
                    self.area = area;
                }
            }
        });
    }
}

/// While files are dragged over the window, a veil that says they can be dropped anywhere.
fn drop_hint(ctx: &egui::Context) {
    let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let painter = ctx.layer_painter(egui::LayerId::new(egui::Order::Foreground, egui::Id::unique("drop_hint")));
    let rect = ctx.content_rect();
    painter.rect_filled(rect, 0.0, egui::Color32::from_black_alpha(160));
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        "Drop images, folders, adapters or a model",
        egui::FontId::proportional(22.0),
        egui::Color32::WHITE,
    );
}

impl StudioApp {
    /// Saves the session when it changed, at most every two seconds (`force`: now).
    pub fn autosave(&mut self, force: bool) {
        let Some(path) = self.session_file.clone() else { return };
        if !force && self.last_saved.as_ref().is_some_and(|(t, _)| t.elapsed() < std::time::Duration::from_secs(2)) {
            return;
        }
        let now = self.session();
        if self.last_saved.as_ref().is_some_and(|(_, s)| *s == now) {
            self.last_saved = Some((std::time::Instant::now(), now));
            return;
        }
        if let Err(e) = session::save(&path, &now) {
            self.notice = Some(format!("Could not save the session: {e}"));
            self.session_file = None; // say it once, not every two seconds
        }
        self.last_saved = Some((std::time::Instant::now(), now));
    }
}

impl StudioApp {
    /// A close of the window (or SIGINT / SIGTERM) while a run trains: never drop the run. The
    /// window asks first; a signal stops and saves at once. The window closes once the run ends.
    pub fn guard_close(&mut self, ctx: &egui::Context) {
        let signalled = self.stop_requests.as_ref().is_some_and(|rx| rx.try_recv().is_ok());
        if signalled {
            if self.training.is_active() {
                self.training.send(crate::job::TrainCommand::Stop);
                self.quit_after_stop = true;
            } else {
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
        }
        if ctx.input(|i| i.viewport().close_requested()) && self.training.is_active() && !self.quit_after_stop {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.confirm_quit = true;
        }
        if self.quit_after_stop && !self.training.is_active() {
            self.quit_after_stop = false;
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    /// The question asked when the window is closed during a run.
    fn quit_dialog(&mut self, ctx: &egui::Context) {
        if !self.confirm_quit {
            return;
        }
        let modal = egui::Modal::new(egui::Id::unique("quit_while_training")).show(ctx, |ui| {
            ui.heading("Training is running");
            ui.label(format!(
                "Step {} of {}. Closing now would lose the steps since the last save.",
                self.training.step, self.training.total
            ));
            ui.add_space(8.0);
            ui.horizontal(|ui| {
                if ui
                    .button("Stop, save and quit")
                    .on_hover_text("Finish this step, save the adapter and a checkpoint, then close")
                    .clicked()
                {
                    self.training.send(crate::job::TrainCommand::Stop);
                    self.quit_after_stop = true;
                    self.confirm_quit = false;
                }
                if ui.button("Keep training").clicked() {
                    self.confirm_quit = false;
                }
            });
        });
        if modal.should_close() {
            self.confirm_quit = false;
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.poll(ctx);
        self.autosave(false);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.autosave(true);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

/// The app icon, decoded from `assets/icon.png` (embedded in the binary).
fn icon() -> Option<egui::IconData> {
    let image = image::load_from_memory(include_bytes!("../../assets/icon.png")).ok()?.into_rgba8();
    let (width, height) = image.dimensions();
    Some(egui::IconData { rgba: image.into_raw(), width, height })
}

/// What the status bar calls the built-in model.
pub const BUILTIN_LABEL: &str = "built-in (synthetic shapes, 64 px)";

/// Opens the native window and blocks until it is closed. With no model given it opens the
/// built-in one and offers the example styles in the Playground (switched off).
pub fn run_window(options: WindowOptions) -> anyhow::Result<()> {
    run_window_with(options, |_| {})
}

/// As [`run_window`], with `setup` run on the app before the first frame (examples, scripts).
pub fn run_window_with(options: WindowOptions, setup: impl FnOnce(&mut StudioApp) + 'static) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("LoRA Studio")
        .with_app_id("lora-studio")
        .with_inner_size([960.0, 640.0])
        .with_min_inner_size([560.0, 360.0]);
    if let Some(icon) = icon() {
        viewport = viewport.with_icon(icon);
    }
    let native_options = eframe::NativeOptions { viewport, renderer: eframe::Renderer::Glow, ..Default::default() };
    eframe::run_native(
        "LoRA Studio",
        native_options,
        Box::new(|cc| {
            // Dark or light, as the desktop says (this is egui's default; stated so it stays so).
            cc.egui_ctx.set_theme(egui::ThemePreference::System);
            let explicit_model = options.model.is_some();
            let mut app = StudioApp::new(&cc.egui_ctx, options);
            let (saved, warning) = match session::default_path() {
                Some(path) => {
                    app.session_file = Some(path.clone());
                    session::load(&path)
                }
                None => (Session::default(), None),
            };
            let first_launch = saved == Session::default();
            let mut saved = saved;
            if explicit_model {
                saved.model = None; // `--model` wins over the last session's
            }
            app.restore(saved);
            if app.model.is_none()
                && let Some(dir) = builtin::model_dir()
            {
                app.set_model(dir);
            }
            if first_launch && app.model.as_deref() == builtin::model_dir().as_deref() {
                for example in builtin::example_adapters() {
                    app.playground.offer_adapter(&example);
                }
            }
            if let Some(w) = warning {
                app.notice = Some(w);
            }
            app.last_saved = Some((std::time::Instant::now(), app.session()));
            app.stop_requests = crate::job::signals::stop_requests();
            setup(&mut app);
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// The title and one-line purpose at the top of each area.
fn area_heading(ui: &mut egui::Ui, title: &str, purpose: &str) {
    ui.add_space(4.0);
    ui.heading(title);
    ui.label(purpose);
}

/// `chosen.png` stays; `chosen` becomes `chosen.<ext>` (save dialogs do not always add it).
fn with_extension(path: PathBuf, ext: &str) -> PathBuf {
    if path.extension().is_some() { path } else { path.with_extension(ext) }
}
