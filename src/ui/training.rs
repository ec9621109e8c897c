//! The Training area: presets and every training option (each with a tooltip), Start / Pause /
//! Resume / Stop driving a `TrainJob`, progress with speed and ETA, the live loss plot, sample
//! images and checkpoints as they arrive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use egui::{Response, RichText};

use crate::engine::adapters::formats::Naming;
use crate::engine::adapters::stack::TargetPreset;
use crate::engine::device::Placement;
use crate::engine::models::family::ModelFamily;
use crate::engine::train::optim::Optimizer;
use crate::engine::train::trainer::{
    Algorithm, ExistingOutput, ExistingRun, LrSchedule, RunOutputs, TextEncoders, TimestepBias, TrainConfig,
};
use crate::job::{TrainCommand, TrainEvent, TrainJob, TrainJobSpec};

use super::loss_plot::{LossHistory, loss_plot, plot_key};

/// Starting points that set rank, alpha, learning rate and steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Quick,
    Balanced,
    Quality,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Quick, Preset::Balanced, Preset::Quality];

    pub fn label(self) -> &'static str {
        match self {
            Preset::Quick => "Quick",
            Preset::Balanced => "Balanced",
            Preset::Quality => "Quality",
        }
    }

    fn tooltip(self) -> &'static str {
        match self {
            Preset::Quick => {
                "Rank 8, alpha 8, learning rate 2e-4, 400 steps, a sample and a checkpoint every 100: a first look in minutes"
            }
            Preset::Balanced => {
                "Rank 16, alpha 8, learning rate 1e-4, 1200 steps, a sample and a checkpoint every 300: a good default for a character or style"
            }
            Preset::Quality => {
                "Rank 32, alpha 16, learning rate 5e-5, 3000 steps, a sample and a checkpoint every 750: slower, finer detail"
            }
        }
    }

    pub fn apply(self, c: &mut TrainConfig) {
        let (rank, alpha, lr, steps) = match self {
            Preset::Quick => (8, 8.0, 2e-4, 400),
            Preset::Balanced => (16, 8.0, 1e-4, 1200),
            Preset::Quality => (32, 16.0, 5e-5, 3000),
        };
        c.rank = rank;
        c.alpha = alpha;
        c.learning_rate = lr;
        c.steps = steps;
        (c.save_every, c.sample_every) = (steps / 4, steps / 4);
    }

    fn matches(self, c: &TrainConfig) -> bool {
        let mut probe = c.clone();
        self.apply(&mut probe);
        probe == *c
    }
}

/// The window's starting options for a model of `family` trained at `native_side` px: its
/// resolution, and a sample and a checkpoint every quarter of the run, so a first run shows how
/// it goes and keeps something to go back to.
pub fn first_run_config(family: ModelFamily, native_side: usize) -> TrainConfig {
    let mut c = TrainConfig::for_model(family, native_side);
    (c.save_every, c.sample_every) = (c.steps / 4, c.steps / 4);
    c
}

/// Where the run is.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    Idle,
    /// Loading the model and the images, before the first step.
    Starting,
    Running,
    Paused {
        reason: Option<String>,
    },
    /// Stop was asked for; the worker finishes the step and saves.
    Stopping,
    Finished {
        adapter: PathBuf,
        /// (step, total) when Stop ended the run early.
        stopped_at: Option<(usize, usize)>,
    },
    /// Stopped before the first step: nothing was written.
    Cancelled,
    Failed {
        error: String,
    },
}

pub struct Sample {
    pub step: usize,
    pub prompt: String,
    pub texture: egui::TextureHandle,
}

#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub step: usize,
    /// The adapter exactly as it was at this step (kept beside the run's adapter).
    pub adapter: PathBuf,
    pub validation_loss: f32,
}

pub struct TrainingPanel {
    /// The adapter file to write; empty means the default beside the dataset.
    pub output: String,
    pub naming: Naming,
    job: Option<TrainJob>,
    pub run: RunState,
    pub step: usize,
    pub total: usize,
    pub it_per_s: f64,
    pub eta: Duration,
    pub lr: f64,
    pub loss: LossHistory,
    pub log_scale: bool,
    pub samples: Vec<Sample>,
    pub checkpoints: Vec<Checkpoint>,
    /// What the worker's own pre-flight found.
    pub job_warnings: Vec<String>,
    /// Why Start did nothing (no model, no images…).
    pub message: Option<String>,
    /// What *Save now* did ("Saving…", then "Saved step N: FILE").
    pub save_notice: Option<String>,
    /// A resumed run's options, as its checkpoint gave them.
    pub resume_note: Option<String>,
    /// An earlier run's checkpoint where Start would write: the panel asks whether to resume it
    /// or start again over it.
    pub existing_run: Option<ExistingRun>,
    /// A file already where Start would write the adapter: the panel asks before replacing it.
    pub existing_output: Option<ExistingOutput>,
    /// Images encoded so far while a run starts (done, total).
    pub encoding: Option<(usize, usize)>,
    pub sample_prompt_now: String,
    /// The sample shown larger (an index into `samples`).
    pub sample_open: Option<usize>,
}

impl Default for TrainingPanel {
    fn default() -> Self {
        Self {
            output: String::new(),
            naming: Naming::Kohya,
            job: None,
            run: RunState::Idle,
            step: 0,
            total: 0,
            it_per_s: 0.0,
            eta: Duration::ZERO,
            lr: 0.0,
            loss: LossHistory::default(),
            log_scale: false,
            samples: Vec::new(),
            checkpoints: Vec::new(),
            job_warnings: Vec::new(),
            message: None,
            save_notice: None,
            resume_note: None,
            existing_run: None,
            existing_output: None,
            encoding: None,
            sample_prompt_now: String::new(),
            sample_open: None,
        }
    }
}

/// What the panel asks of the rest of the window.
pub enum TrainingAction {
    Start,
    ChooseOutput,
    /// Continue an earlier run from its `.checkpoint.safetensors` (a file dialog picks it).
    ChooseResume,
    /// Put this checkpoint's adapter in the Playground and go there.
    Try(PathBuf),
    /// Start again over an earlier run's outputs (the user said so).
    StartOver,
    /// Continue the earlier run found at Start.
    ResumeExisting(PathBuf),
}

impl TrainingPanel {
    pub fn is_active(&self) -> bool {
        matches!(self.run, RunState::Starting | RunState::Running | RunState::Paused { .. } | RunState::Stopping)
    }

    /// The adapter file a run will write: the typed name (`.safetensors` added when it has
    /// another or no extension; a relative name is in the dataset's folder, not wherever the app
    /// was launched), or `<folder>-lora.safetensors` beside the first image's folder.
    pub fn output_path(&self, images: &[PathBuf]) -> Option<PathBuf> {
        let typed = self.output.trim();
        let dataset_folder = images.first().and_then(|p| p.parent());
        if !typed.is_empty() {
            let mut path = PathBuf::from(typed);
            if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
                path.as_mut_os_string().push(".safetensors");
            }
            return Some(match dataset_folder {
                Some(folder) if path.is_relative() => folder.join(path),
                _ => path,
            });
        }
        let folder = dataset_folder?;
        let name = folder.file_name().map_or("my".into(), |n| n.to_string_lossy().into_owned());
        Some(folder.parent().unwrap_or(folder).join(format!("{name}-lora.safetensors")))
    }

    /// Starts a run; says why in `message` when it cannot.
    /// `resume`: an earlier run's `.checkpoint.safetensors` to continue from (same options).
    /// `in_use`: the Playground's adapter files, which the run must not write over.
    /// `overwrite`: replace an earlier run's outputs (asked for through `existing_run` first).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        ctx: &egui::Context,
        model: Option<&Path>,
        placement: &Placement,
        images: Vec<PathBuf>,
        config: &TrainConfig,
        resume: Option<PathBuf>,
        in_use: Vec<PathBuf>,
        overwrite: bool,
    ) {
        self.message = None;
        self.save_notice = None;
        self.resume_note = None;
        self.existing_run = None;
        self.existing_output = None;
        let Some(model) = model else {
            self.message = Some("Open a base model first (Playground → Open model…, or --model).".into());
            return;
        };
        if images.is_empty() {
            self.message = Some("Add training images in the Dataset area first.".into());
            return;
        }
        if let Err(e) = config.validate() {
            self.message = Some(format!("{e:#}"));
            return;
        }
        let Some(out) = self.output_path(&images) else {
            self.message = Some("Choose an output file.".into());
            return;
        };
        // The outputs are checked here too (the worker checks again) so the window can ask.
        let outputs = RunOutputs {
            out: &out,
            model,
            data: &images,
            in_use: &in_use,
            resume: resume.as_deref(),
            full_finetune: config.algorithm == Algorithm::Full,
            overwrite,
        };
        if let Err(e) = outputs.check() {
            match e.downcast::<ExistingRun>() {
                Ok(existing) => self.existing_run = Some(existing),
                Err(e) => match e.downcast::<ExistingOutput>() {
                    Ok(existing) => self.existing_output = Some(existing),
                    Err(e) => self.message = Some(format!("{e:#}")),
                },
            }
            return;
        }
        let device = match placement.device() {
            Ok(d) => d,
            Err(e) => {
                self.message = Some(format!("{e:#}"));
                return;
            }
        };
        let spec = TrainJobSpec {
            model: model.to_path_buf(),
            data: images,
            out,
            config: config.clone(),
            resume,
            naming: self.naming,
            device,
            weights: placement.weights,
            overwrite,
            in_use,
        };
        let wake = ctx.clone();
        match TrainJob::start(spec, move || wake.request_repaint()) {
            Ok(job) => self.job = Some(job),
            Err(e) => {
                self.message = Some(format!("{e:#}"));
                return;
            }
        }
        self.run = RunState::Starting;
        self.step = 0;
        self.total = config.steps;
        self.it_per_s = 0.0;
        self.eta = Duration::ZERO;
        self.loss = LossHistory::default();
        self.samples.clear();
        self.sample_open = None;
        self.checkpoints.clear();
        self.job_warnings.clear();
        self.encoding = None;
    }

    pub fn send(&mut self, command: TrainCommand) {
        if let Some(job) = &self.job {
            if matches!(command, TrainCommand::Stop) {
                self.run = RunState::Stopping;
            }
            job.send(command);
        }
    }

    /// Drains the job's events without blocking; returns adapter files written since last time.
    pub fn poll(&mut self, ctx: &egui::Context) -> Vec<PathBuf> {
        let mut written = Vec::new();
        let Some(job) = &self.job else { return written };
        let events: Vec<TrainEvent> = job.events.try_iter().collect();
        for event in events {
            match event {
                TrainEvent::Preflight { warnings, .. } => self.job_warnings = warnings,
                TrainEvent::Encoding { done, total } => self.encoding = Some((done, total)),
                TrainEvent::Started { total_steps, start_step, .. } => {
                    self.total = total_steps;
                    self.step = start_step;
                    self.run = RunState::Running;
                }
                TrainEvent::Step { step, total, loss, lr, it_per_s, eta } => {
                    self.step = step;
                    self.total = total;
                    self.lr = lr;
                    self.it_per_s = it_per_s;
                    self.eta = eta;
                    self.loss.push(step, loss);
                    if self.run == RunState::Starting {
                        self.run = RunState::Running;
                    }
                }
                TrainEvent::Sample { step, prompt, image } => {
                    let texture = super::thumbnails::rgb_texture(ctx, &format!("sample-{step}"), &image);
                    self.samples.push(Sample { step, prompt, texture });
                }
                TrainEvent::Checkpoint { step, adapter, step_adapter, validation_loss, .. } => {
                    if self.save_notice.is_some() {
                        self.save_notice = Some(format!("Saved step {step}: {}", step_adapter.display()));
                    }
                    self.loss.push_validation(step, validation_loss);
                    // A stop right after a scheduled save saves the same step again: one row.
                    self.checkpoints.retain(|c| c.step != step);
                    self.checkpoints.push(Checkpoint { step, adapter: step_adapter, validation_loss });
                    written.push(adapter);
                }
                TrainEvent::Paused { reason, .. } => {
                    if self.run != RunState::Stopping {
                        self.run = RunState::Paused { reason }
                    }
                }
                TrainEvent::Resumed { .. } => self.run = RunState::Running,
                // The playground reloads the adapter file written with each checkpoint instead.
                TrainEvent::Snapshot { .. } => {}
                TrainEvent::Finished { adapter, step } => {
                    written.push(adapter.clone());
                    let stopped_at = (step < self.total).then_some((step, self.total));
                    self.run = RunState::Finished { adapter, stopped_at };
                }
                TrainEvent::Cancelled => self.run = RunState::Cancelled,
                TrainEvent::Failed { error } => self.run = RunState::Failed { error },
            }
        }
        if self.job.as_ref().is_some_and(|j| !j.is_running()) && job_done(&self.run) {
            self.job = None; // the worker has ended: joining is immediate
        }
        written.dedup();
        written
    }
}

fn job_done(run: &RunState) -> bool {
    matches!(run, RunState::Finished { .. } | RunState::Cancelled | RunState::Failed { .. })
}

/// "1:02:03" or "2:05".
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

pub(super) struct TrainingContext<'a> {
    pub model: Option<&'a Path>,
    /// What the status bar calls the model ("built-in (…)", or its path).
    pub model_label: &'a str,
    pub images: &'a [PathBuf],
    pub warnings: Vec<String>,
    /// What "Sample now" draws: the sample prompt, else the first image's caption.
    pub sample_prompt: String,
    /// The open model's family once loaded (SDXL offers a choice of text encoders).
    pub family: Option<ModelFamily>,
    /// The dataset's images per epoch: each image times its folder's repeats (kohya's `N_name`).
    pub images_per_epoch: usize,
}

pub(super) fn ui_training(
    ui: &mut egui::Ui,
    panel: &mut TrainingPanel,
    config: &mut TrainConfig,
    cx: &TrainingContext<'_>,
) -> Vec<TrainingAction> {
    let mut actions = Vec::new();
    super::area_heading(
        ui,
        "Train an adapter",
        "Pick a preset or set the options, press Start, and follow the loss as it trains.",
    );
    ui.add_space(6.0);
    egui::Panel::left("training_settings").resizable(true).default_size(350.0).show(ui, |ui| {
        egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
            if panel.is_active() {
                ui.label(RichText::new("Options are locked while a run is in progress.").weak());
            }
            ui.add_enabled_ui(!panel.is_active(), |ui| settings(ui, panel, config, cx, &mut actions));
        });
    });
    egui::CentralPanel::default().show(ui, |ui| {
        egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
            controls(ui, panel, cx, &mut actions);
            ui.add_space(6.0);
            progress(ui, panel);
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                ui.strong("Loss");
                ui.separator();
                plot_key(ui);
                ui.separator();
                ui.checkbox(&mut panel.log_scale, "log scale")
                    .on_hover_text("Show the loss on a logarithmic axis, to see small late improvements");
            });
            // The plot takes the height left after a strip of samples and checkpoints.
            let has_strip = !panel.samples.is_empty() || !panel.checkpoints.is_empty();
            let reserve = if has_strip { STRIP_HEIGHT + 16.0 } else { 8.0 };
            loss_plot(ui, &panel.loss, panel.log_scale, (ui.available_height() - reserve).max(180.0));
            if has_strip {
                ui.add_space(6.0);
                ui.horizontal_top(|ui| {
                    let checkpoints_width = if panel.checkpoints.is_empty() { 0.0 } else { 260.0 };
                    ui.allocate_ui(egui::vec2(ui.available_width() - checkpoints_width, STRIP_HEIGHT), |ui| {
                        samples(ui, panel)
                    });
                    ui.allocate_ui(egui::vec2(checkpoints_width, STRIP_HEIGHT), |ui| {
                        checkpoints(ui, panel, &mut actions)
                    });
                });
            }
        });
    });
    enlarged_sample(ui.ctx(), panel);
    actions
}

/// A form row: label with tooltip, the widget tied to the label (screen readers, tests).
fn row(ui: &mut egui::Ui, name: &str, tip: &str, add: impl FnOnce(&mut egui::Ui) -> Response) {
    let label = ui.label(name).on_hover_text(tip);
    add(ui).labelled_by(label.id).on_hover_text(tip);
    ui.end_row();
}

fn sci(v: f64) -> String {
    format!("{v:.1e}")
}

fn settings(
    ui: &mut egui::Ui,
    panel: &mut TrainingPanel,
    c: &mut TrainConfig,
    cx: &TrainingContext<'_>,
    actions: &mut Vec<TrainingAction>,
) {
    let family = cx.family;
    let sample_hint = if cx.sample_prompt.is_empty() { "a photo of sks dog" } else { cx.sample_prompt.as_str() };
    ui.strong("Preset");
    ui.horizontal(|ui| {
        for p in Preset::ALL {
            if ui.selectable_label(p.matches(c), p.label()).on_hover_text(p.tooltip()).clicked() {
                p.apply(c);
            }
        }
    });
    ui.add_space(6.0);
    egui::Grid::new("train_settings").num_columns(2).spacing([12.0, 6.0]).striped(true).show(ui, |ui| {
        row(ui, "Algorithm", "LoRA: low-rank updates of linear layers. LoCon: also convolutions. LoHa / LoKr (LyCORIS): a Hadamard or Kronecker product of small factors, more expressive per parameter. DoRA: LoRA plus a learned magnitude per output row. GLoRA: a learned rescaling of the weight plus a low-rank shift. Choosing LoHa or LoKr sets kohya_ss' rank, alpha and rate for it.", |ui| {
            let before = c.algorithm;
            let response = egui::ComboBox::from_id_salt("algorithm")
                .selected_text(c.algorithm.label())
                .show_ui(ui, |ui| {
                    for a in Algorithm::ADAPTERS {
                        ui.selectable_value(&mut c.algorithm, a, a.label());
                    }
                })
                .response;
            if c.algorithm != before
                && let Some((rank, alpha, lr)) = c.algorithm.kohya_ss_defaults()
            {
                (c.rank, c.alpha, c.learning_rate) = (rank, alpha, lr);
            }
            response
        });
        if c.algorithm == Algorithm::Lokr {
            row(ui, "LoKr factor", "How each layer is split into the two Kronecker factors (LyCORIS' factor): −1 picks the most balanced split; a small number like 4 or 8 makes the first factor that size.", |ui| {
                ui.add(egui::DragValue::new(&mut c.lokr_factor).range(-1..=64))
            });
        }
        row(ui, "Targets", "Which layers the adapter changes. Attention + feed-forward is kohya's default; add convolutions for LoCon.", |ui| {
            egui::ComboBox::from_id_salt("targets")
                .selected_text(c.targets.label())
                .show_ui(ui, |ui| {
                    for t in TargetPreset::ALL {
                        ui.selectable_value(&mut c.targets, t, t.label());
                    }
                })
                .response
        });
        row(ui, "Rank", "Size of the low-rank update. Higher learns more detail but makes bigger files and overfits sooner. 8–32 is usual.", |ui| {
            ui.add(egui::DragValue::new(&mut c.rank).range(1..=256))
        });
        row(ui, "Alpha", "Scales the update by alpha / rank. Alpha = rank gives scale 1; half the rank is a common, gentler choice.", |ui| {
            ui.horizontal(|ui| {
                let r = ui.add(egui::DragValue::new(&mut c.alpha).range(0.1..=512.0).speed(0.5));
                ui.label(RichText::new(format!("scale α/r = {:.3}", c.alpha / c.rank.max(1) as f64)).weak());
                r
            })
            .inner
        });
        row(ui, "Learning rate", "How big each update is. 1e-4 is the usual LoRA rate (Prodigy: 1); lower it if the loss jumps or samples fry.", |ui| {
            ui.add(
                // Up to 10: Prodigy's rate is a multiplier of its own estimate (1 is usual).
                egui::DragValue::new(&mut c.learning_rate)
                    .range(1e-7..=10.0)
                    .speed(1e-6)
                    .custom_formatter(|v, _| sci(v))
                    .custom_parser(|s| s.trim().parse().ok()),
            )
        });
        row(ui, "Optimizer", "AdamW: the usual choice. Prodigy finds its own step size (learning rate 1). Adafactor: less memory, kohya's choice for large models.", |ui| {
            let before = c.optimizer;
            let response = egui::ComboBox::from_id_salt("optimizer")
                .selected_text(c.optimizer.label())
                .show_ui(ui, |ui| {
                    for o in Optimizer::ALL {
                        ui.selectable_value(&mut c.optimizer, o, o.label()).on_hover_text(o.tooltip());
                    }
                })
                .response;
            if c.optimizer != before {
                // Each optimiser's rate means something else (Prodigy's is a multiplier of its own).
                c.learning_rate = c.optimizer.usual_learning_rate();
                if c.optimizer == Optimizer::Prodigy {
                    c.text_encoder_lr = None;
                }
            }
            response
        });
        row(ui, "Epochs", "Count the run in epochs, as kohya does: one epoch shows each image once for every repeat its folder asks (a folder named 10_name: 10 times).", |ui| {
            ui.horizontal(|ui| {
                let mut on = c.epochs.is_some();
                let r = ui.checkbox(&mut on, "count in epochs");
                let mut epochs = c.epochs.unwrap_or(10);
                ui.add_enabled(on, egui::DragValue::new(&mut epochs).range(1..=10_000)).labelled_by(r.id);
                c.epochs = on.then_some(epochs);
                if let Some(e) = c.epochs {
                    let per_epoch = crate::engine::train::dataset::steps_per_epoch(cx.images_per_epoch, c.batch_size, c.grad_accum);
                    c.steps = (e * per_epoch).max(1);
                    ui.label(RichText::new(format!("{} images an epoch", cx.images_per_epoch)).weak());
                }
                r
            })
            .inner
        });
        row(ui, "Steps", "How many optimiser steps to take in total (set by the epochs when they are counted).", |ui| {
            ui.add_enabled(c.epochs.is_none(), egui::DragValue::new(&mut c.steps).range(1..=100_000).speed(10))
        });
        row(ui, "Batch size", "Images per step. Larger is smoother but uses more memory.", |ui| {
            ui.add(egui::DragValue::new(&mut c.batch_size).range(1..=64))
        });
        row(ui, "Gradient accumulation", "Add up the gradients of this many batches before each step: a larger effective batch without the memory.", |ui| {
            ui.add(egui::DragValue::new(&mut c.grad_accum).range(1..=64))
        });
        row(ui, "Resolution", "Training size in pixels (the square's side). 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL.", |ui| {
            ui.add(egui::DragValue::new(&mut c.dataset.resolution).range(8..=2048).speed(8))
        });
        row(ui, "Seed", "Fixes the noise and the image order, so a run can be repeated exactly.", |ui| {
            ui.add(egui::DragValue::new(&mut c.seed))
        });
        row(ui, "Flip images", "Mirror images left-right at random: doubles the variety, but not for text or asymmetric subjects.", |ui| {
            ui.checkbox(&mut c.dataset.flip, "mirror at random")
        });
        row(ui, "Aspect-ratio buckets", "Train each image at a size near its own shape (sides in steps of 64 px, about the resolution's area) instead of a square crop, as kohya's enable_bucket.", |ui| {
            ui.checkbox(&mut c.dataset.buckets, "keep each image's shape")
        });
        row(ui, "Caption dropout", "The share of steps trained on an empty caption: helps the adapter work without its trigger and with guidance. 0.05–0.1 is usual.", |ui| {
            ui.add(egui::DragValue::new(&mut c.caption_dropout).range(0.0..=1.0).speed(0.01))
        });
        row(ui, "Shuffle tags", "Shuffle the comma-separated tags of each caption every time (booru-style captions), keeping the first N in place (your trigger word).", |ui| {
            ui.horizontal(|ui| {
                let r = ui.checkbox(&mut c.shuffle_tags, "shuffle, keep first");
                ui.add_enabled(c.shuffle_tags, egui::DragValue::new(&mut c.keep_tokens).range(0..=16)).labelled_by(r.id);
                r
            })
            .inner
        });
        if family != Some(ModelFamily::Sdxl) {
            row(ui, "Clip skip", "Read the text encoder this many layers from its end: 1 is the last layer, 2 the penultimate (what anime SD 1.x models expect, as A1111's Clip skip). Written to the adapter as ss_clip_skip.", |ui| {
                ui.add(egui::DragValue::new(&mut c.clip_skip).range(1..=12))
            });
        }
        row(ui, "Train text encoder", "Also adapt the CLIP text encoder: learns new words faster, overfits faster.", |ui| {
            ui.checkbox(&mut c.train_text_encoder, "also adapt CLIP")
        });
        if c.train_text_encoder && c.optimizer != Optimizer::Prodigy {
            row(ui, "Text encoder rate", "The text encoder's own learning rate; kohya users often set it lower than the UNet's (e.g. half). Unticked: the same as the learning rate.", |ui| {
                ui.horizontal(|ui| {
                    let mut own = c.text_encoder_lr.is_some();
                    let r = ui.checkbox(&mut own, "own rate");
                    let mut rate = c.text_encoder_lr.unwrap_or(c.learning_rate / 2.0);
                    ui.add_enabled(
                        own,
                        egui::DragValue::new(&mut rate)
                            .range(1e-7..=1e-1)
                            .speed(1e-6)
                            .custom_formatter(|v, _| sci(v))
                            .custom_parser(|s| s.trim().parse().ok()),
                    )
                    .labelled_by(r.id);
                    c.text_encoder_lr = own.then_some(rate);
                    r
                })
                .inner
            });
        }
        if family == Some(ModelFamily::Sdxl) && c.train_text_encoder {
            row(ui, "Text encoders", "SDXL has two: CLIP-L (te1) and OpenCLIP-bigG (te2). Train both, or one of them.", |ui| {
                egui::ComboBox::from_id_salt("text_encoders")
                    .selected_text(c.text_encoders.label())
                    .show_ui(ui, |ui| {
                        for choice in TextEncoders::ALL {
                            ui.selectable_value(&mut c.text_encoders, choice, choice.label());
                        }
                    })
                    .response
            });
        }
        row(ui, "Min-SNR γ", "Re-weights the loss by noise level (Hang et al. 2023); 5 is usual. Often converges faster.", |ui| {
            ui.horizontal(|ui| {
                let mut on = c.min_snr_gamma.is_some();
                let r = ui.checkbox(&mut on, "use");
                let mut gamma = c.min_snr_gamma.unwrap_or(5.0);
                ui.add_enabled(on, egui::DragValue::new(&mut gamma).range(0.1..=20.0).speed(0.1)).labelled_by(r.id);
                c.min_snr_gamma = on.then_some(gamma);
                r
            })
            .inner
        });
        row(ui, "Gradient checkpointing", "Recompute activations in the backward pass instead of keeping them: far less memory (SD 1.5 at 512 px), about a third slower.", |ui| {
            ui.checkbox(&mut c.gradient_checkpointing, "save memory")
        });
        row(ui, "Noise offset", "Adds a small constant to the noise so the model learns very dark and very bright images. 0.05–0.1 is usual.", |ui| {
            ui.add(egui::DragValue::new(&mut c.noise_offset).range(0.0..=1.0).speed(0.005))
        });
        row(ui, "Timestep bias", "Train the noisiest steps (later: composition and colours) or the least noisy ones (earlier: fine detail) more often: that quarter of the schedule is drawn this many times as often.", |ui| {
            ui.horizontal(|ui| {
                let r = egui::ComboBox::from_id_salt("timestep_bias")
                    .selected_text(format!("{:?}", c.timestep_bias).to_lowercase())
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut c.timestep_bias, TimestepBias::None, "none");
                        ui.selectable_value(&mut c.timestep_bias, TimestepBias::Earlier, "earlier");
                        ui.selectable_value(&mut c.timestep_bias, TimestepBias::Later, "later");
                    })
                    .response;
                let on = c.timestep_bias != TimestepBias::None;
                ui.add_enabled(on, egui::DragValue::new(&mut c.timestep_bias_multiplier).range(1.0..=10.0).speed(0.1).suffix("×"));
                r
            })
            .inner
        });
        row(ui, "LR schedule", "How the learning rate changes over the run, after warmup.", |ui| {
            egui::ComboBox::from_id_salt("lr_schedule")
                .selected_text(format!("{:?}", c.lr_schedule).to_lowercase())
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut c.lr_schedule, LrSchedule::Constant, "constant");
                    ui.selectable_value(&mut c.lr_schedule, LrSchedule::Cosine, "cosine");
                    ui.selectable_value(&mut c.lr_schedule, LrSchedule::Linear, "linear");
                })
                .response
        });
        row(ui, "Warmup steps", "Steps over which the learning rate rises from 0, avoiding an early jolt.", |ui| {
            ui.add(egui::DragValue::new(&mut c.warmup_steps).range(0..=100_000))
        });
        row(ui, "Save every", "Write the adapter and a checkpoint (with validation loss) every N steps; 0 saves only at the end.", |ui| {
            ui.add(egui::DragValue::new(&mut c.save_every).range(0..=100_000).suffix(" steps"))
        });
        row(ui, "Sample every", "Draw a sample image with the prompt below every N steps; 0 never.", |ui| {
            ui.add(egui::DragValue::new(&mut c.sample_every).range(0..=100_000).suffix(" steps"))
        });
        row(ui, "Sample prompt", "The prompt for sample images. Empty: the first image's caption with the trigger word.", |ui| {
            ui.add(egui::TextEdit::singleline(&mut c.sample_prompt).hint_text(sample_hint).desired_width(180.0))
        });
        row(ui, "Output file", "Where the adapter is written. Empty: beside the dataset folder.", |ui| {
            ui.horizontal(|ui| {
                let r = ui.add(egui::TextEdit::singleline(&mut panel.output).hint_text("beside the dataset").desired_width(140.0));
                if ui.button("Choose…").on_hover_text("Choose where to save the adapter").clicked() {
                    actions.push(TrainingAction::ChooseOutput);
                }
                r
            })
            .inner
        });
        row(ui, "File format", "kohya: for A1111, ComfyUI, kohya and LyCORIS. PEFT: for diffusers.", |ui| {
            egui::ComboBox::from_id_salt("naming")
                .selected_text(match panel.naming {
                    Naming::Kohya => "kohya / A1111",
                    Naming::Peft => "diffusers / PEFT",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut panel.naming, Naming::Kohya, "kohya / A1111");
                    ui.selectable_value(&mut panel.naming, Naming::Peft, "diffusers / PEFT");
                })
                .response
        });
    });
}

fn controls(ui: &mut egui::Ui, panel: &mut TrainingPanel, cx: &TrainingContext<'_>, actions: &mut Vec<TrainingAction>) {
    // Wrapped: in a narrow window the last buttons go to a second line instead of past the edge.
    ui.horizontal_wrapped(|ui| {
        let can_start = !panel.is_active();
        if ui
            .add_enabled(can_start, egui::Button::new(RichText::new("Start training").strong()))
            .on_hover_text("Train with these options on the dataset")
            .clicked()
        {
            actions.push(TrainingAction::Start);
        }
        let running = panel.run == RunState::Running;
        let paused = matches!(panel.run, RunState::Paused { .. });
        if paused {
            if ui.button("Resume").clicked() {
                panel.send(TrainCommand::Resume);
            }
        } else if ui.add_enabled(running, egui::Button::new("Pause")).clicked() {
            panel.send(TrainCommand::Pause);
        }
        let stoppable = running || paused || panel.run == RunState::Starting;
        if ui
            .add_enabled(stoppable, egui::Button::new("Stop"))
            .on_hover_text("Finish the current step, save the adapter and end")
            .clicked()
        {
            panel.send(TrainCommand::Stop);
        }
        if ui
            .add_enabled(running || paused, egui::Button::new("Save now"))
            .on_hover_text("Write the adapter and a checkpoint now")
            .clicked()
        {
            panel.send(TrainCommand::SaveNow);
            panel.save_notice = Some("Saving…".into());
        }
        if ui
            .add_enabled(running || paused, egui::Button::new("Sample now"))
            .on_hover_text(format!("Draw a sample with the adapter as it is now: \"{}\"", cx.sample_prompt))
            .clicked()
        {
            panel.send(TrainCommand::SampleNow(cx.sample_prompt.clone()));
        }
        if ui
            .add_enabled(can_start, egui::Button::new("Resume from checkpoint…"))
            .on_hover_text("Continue a stopped or crashed run from its .checkpoint.safetensors, with the same options")
            .clicked()
        {
            actions.push(TrainingAction::ChooseResume);
        }
    });
    // Below the buttons, so that lines coming and going never move them.
    let model = if cx.model.is_none() { "no model open" } else { cx.model_label };
    let out = panel.output_path(cx.images).map_or("—".to_owned(), |p| p.display().to_string());
    let images = crate::engine::train::dataset::counted(cx.images.len(), "image", "images");
    ui.label(format!("{images} · model: {model}"));
    ui.label(RichText::new(format!("Writes {out}")).weak());
    // One list: the Dataset area's check before a run, the worker's own once it has started.
    let warnings = if panel.is_active() { &panel.job_warnings } else { &cx.warnings };
    if !warnings.is_empty() {
        let counted = crate::engine::train::dataset::counted(warnings.len(), "warning", "warnings");
        egui::CollapsingHeader::new(format!("Pre-flight: {counted}")).id_salt("preflight").show(ui, |ui| {
            for w in warnings {
                ui.label(RichText::new(format!("Warning: {w}")).color(ui.visuals().warn_fg_color));
            }
        });
    }
    if let Some(msg) = &panel.message {
        ui.colored_label(ui.visuals().error_fg_color, msg);
    }
    if let Some(note) = &panel.resume_note {
        ui.label(note);
    }
    if let Some(notice) = panel.save_notice.as_ref().filter(|_| panel.is_active()) {
        ui.label(notice);
    }
    if let Some(existing) = &panel.existing_output {
        let what = if existing.ours { "an adapter from an earlier run" } else { "a file LoRA Studio did not write" };
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!("{} already exists ({what}). Replace it with this run's adapter?", existing.path.display()),
        );
        ui.horizontal(|ui| {
            if ui.button("Replace it").on_hover_text("Train, and write the adapter over that file").clicked() {
                actions.push(TrainingAction::StartOver);
            }
            if ui.button("Cancel").on_hover_text("Keep the file; choose another output name").clicked() {
                panel.existing_output = None;
            }
        });
    }
    if let Some(existing) = &panel.existing_run {
        let checkpoint = existing.checkpoint.clone();
        ui.colored_label(
            ui.visuals().warn_fg_color,
            format!(
                "An earlier run of {} steps is saved at {}. Resume it, or start again and replace it?",
                existing.step,
                checkpoint.display()
            ),
        );
        ui.horizontal(|ui| {
            if ui.button("Resume it").on_hover_text("Continue the earlier run from its checkpoint").clicked() {
                actions.push(TrainingAction::ResumeExisting(checkpoint));
            }
            if ui
                .button("Start again")
                .on_hover_text("Train from scratch; the earlier run's adapter and checkpoint are replaced")
                .clicked()
            {
                actions.push(TrainingAction::StartOver);
            }
            if ui.button("Cancel").clicked() {
                panel.existing_run = None;
            }
        });
    }
}

fn progress(ui: &mut egui::Ui, panel: &TrainingPanel) {
    let state = match &panel.run {
        RunState::Idle => "Not started.".to_owned(),
        RunState::Starting => match panel.encoding {
            Some((done, total)) => format!("Encoding image {done}/{total}…"),
            None => "Loading the model and the images…".to_owned(),
        },
        RunState::Running => "Training.".to_owned(),
        RunState::Paused { reason: None } => "Paused.".to_owned(),
        RunState::Paused { reason: Some(r) } => {
            format!("Paused: {r}. Resume continues from there; Stop saves and ends the run.")
        }
        RunState::Stopping => "Stopping: saving the adapter…".to_owned(),
        RunState::Finished { adapter, stopped_at: None } => format!("Finished: wrote {}", adapter.display()),
        RunState::Finished { adapter, stopped_at: Some((step, total)) } => {
            format!("Stopped at {step}/{total}: wrote {}", adapter.display())
        }
        RunState::Cancelled => "Stopped before the first step: nothing was written.".to_owned(),
        RunState::Failed { error } => format!("Training failed: {error}"),
    };
    let color = match panel.run {
        RunState::Failed { .. } | RunState::Paused { reason: Some(_) } => ui.visuals().error_fg_color,
        _ => ui.visuals().text_color(),
    };
    ui.horizontal(|ui| {
        if matches!(panel.run, RunState::Starting | RunState::Running | RunState::Stopping) {
            ui.spinner();
        }
        ui.colored_label(color, state);
    });
    if panel.total > 0 && panel.run != RunState::Idle {
        let fraction = panel.step as f32 / panel.total as f32;
        ui.add(egui::ProgressBar::new(fraction).text(format!("Step {} / {}", panel.step, panel.total)));
        let mut parts = vec![format!("{:.2} it/s", panel.it_per_s)];
        if panel.run == RunState::Running {
            parts.push(format!("ETA {}", format_duration(panel.eta)));
        }
        if let Some(&[_, loss]) = panel.loss.raw.last() {
            parts.push(format!("loss {loss:.4}"));
        }
        if let Some(avg) = panel.loss.smoothed() {
            parts.push(format!("average {avg:.4}"));
        }
        parts.push(format!("lr {}", sci(panel.lr)));
        ui.label(parts.join(" · "));
    }
}

/// Height of the row of samples and checkpoints under the plot.
const STRIP_HEIGHT: f32 = 140.0;
const SAMPLE_SIDE: f32 = 96.0;

fn samples(ui: &mut egui::Ui, panel: &mut TrainingPanel) {
    ui.vertical(|ui| {
        ui.strong("Samples");
        if panel.samples.is_empty() {
            ui.label(RichText::new("Set \"Sample every\" and a prompt to see images as it trains.").weak());
        }
        samples_row(ui, panel);
    });
}

fn samples_row(ui: &mut egui::Ui, panel: &mut TrainingPanel) {
    let mut open = None;
    egui::ScrollArea::horizontal().id_salt("samples").show(ui, |ui| {
        ui.horizontal(|ui| {
            for (i, s) in panel.samples.iter().enumerate().rev() {
                ui.vertical(|ui| {
                    let image = egui::Image::from_texture(&s.texture)
                        .fit_to_exact_size(egui::vec2(SAMPLE_SIDE, SAMPLE_SIDE))
                        .sense(egui::Sense::click());
                    let response = ui.add(image);
                    let name = format!("Sample at step {}", s.step);
                    response.widget_info(|| egui::WidgetInfo::labeled(egui::accesskit::Role::Button, true, &name));
                    if response.on_hover_text(format!("{}\n(click to see it larger)", s.prompt)).clicked() {
                        open = Some(i);
                    }
                    ui.label(format!("step {}", s.step));
                });
            }
        });
    });
    if open.is_some() {
        panel.sample_open = open;
    }
}

/// A sample clicked in the strip, at up to 512 points in a window of its own.
fn enlarged_sample(ctx: &egui::Context, panel: &mut TrainingPanel) {
    let Some(s) = panel.sample_open.and_then(|i| panel.samples.get(i)) else { return };
    let mut open = true;
    let [w, h] = s.texture.size();
    let size = egui::vec2(w as f32, h as f32) * (512.0 / w.max(h).max(1) as f32);
    egui::Window::new(format!("Sample at step {}", s.step)).open(&mut open).collapsible(false).resizable(false).show(
        ctx,
        |ui| {
            ui.add(egui::Image::from_texture(&s.texture).fit_to_exact_size(size));
            ui.label(RichText::new(&s.prompt).weak());
        },
    );
    if !open {
        panel.sample_open = None;
    }
}

fn checkpoints(ui: &mut egui::Ui, panel: &TrainingPanel, actions: &mut Vec<TrainingAction>) {
    if panel.checkpoints.is_empty() {
        return;
    }
    ui.vertical(|ui| {
        ui.strong("Checkpoints");
        egui::ScrollArea::vertical()
            .id_salt("checkpoints")
            .max_height(STRIP_HEIGHT - 24.0)
            .show(ui, |ui| checkpoint_grid(ui, panel, actions));
    });
}

fn checkpoint_grid(ui: &mut egui::Ui, panel: &TrainingPanel, actions: &mut Vec<TrainingAction>) {
    let best = panel.loss.best_validation().map(|p| p[0] as usize);
    egui::Grid::new("checkpoints").striped(true).num_columns(3).show(ui, |ui| {
        ui.label("step");
        ui.label("validation loss");
        ui.label("");
        ui.end_row();
        // Newest first; each row's adapter file is kept (kohya's `-stepNNNNNNNN` naming).
        for c in panel.checkpoints.iter().rev() {
            ui.label(c.step.to_string()).on_hover_text(c.adapter.display().to_string());
            let text = format!("{:.4}", c.validation_loss);
            if Some(c.step) == best {
                ui.label(RichText::new(format!("{text}  (best)")).strong());
            } else {
                ui.label(text);
            }
            if ui
                .button(format!("Try {}", c.step))
                .on_hover_text("Load this step's adapter in the Playground and go there")
                .clicked()
            {
                actions.push(TrainingAction::Try(c.adapter.clone()));
            }
            ui.end_row();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_set_rank_alpha_lr_and_steps() {
        let mut c = TrainConfig::default();
        for (preset, expected) in [
            (Preset::Quick, (8, 8.0, 2e-4, 400)),
            (Preset::Balanced, (16, 8.0, 1e-4, 1200)),
            (Preset::Quality, (32, 16.0, 5e-5, 3000)),
        ] {
            preset.apply(&mut c);
            assert_eq!((c.rank, c.alpha, c.learning_rate, c.steps), expected, "{preset:?}");
            assert!(Preset::ALL.iter().all(|&p| p.matches(&c) == (p == preset)), "{preset:?} alone matches");
        }
    }

    #[test]
    fn durations_read_as_clock_times() {
        assert_eq!(format_duration(Duration::from_secs(125)), "2:05");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1:02:03");
    }

    #[test]
    fn default_output_sits_beside_the_dataset_folder() {
        let p = TrainingPanel::default();
        let out = p.output_path(&[PathBuf::from("/data/cats/a.png")]).unwrap();
        assert_eq!(out, PathBuf::from("/data/cats-lora.safetensors"));
    }

    /// A typed name gets `.safetensors` unless it has it, and a relative one lands in the dataset's
    /// folder (not the folder the app was launched from); an absolute one stays.
    #[test]
    fn typed_output_names_get_the_extension_and_the_dataset_folder() {
        let images = [PathBuf::from("/data/cats/a.png")];
        let mut p = TrainingPanel::default();
        for (typed, expect) in [
            ("my-style", "/data/cats/my-style.safetensors"),
            ("my.v2", "/data/cats/my.v2.safetensors"),
            (" out/Style.SAFETENSORS ", "/data/cats/out/Style.SAFETENSORS"),
            ("/elsewhere/x", "/elsewhere/x.safetensors"),
        ] {
            p.output = typed.into();
            assert_eq!(p.output_path(&images).unwrap(), PathBuf::from(expect), "{typed:?}");
        }
        p.output = "loose".into();
        assert_eq!(p.output_path(&[]).unwrap(), PathBuf::from("loose.safetensors"), "no dataset yet");
    }
}
