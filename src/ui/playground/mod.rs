//! The Playground area: several adapters blended on the frozen base model, one slider each.
//! The model lives on a worker thread (`job::playground`); this file holds the view state and
//! sends it commands (`view.rs`, `adapters.rs` and `grid.rs` draw it). In Live mode a slider that
//! stops moving for 300 ms re-renders the same seed, and only the moved adapter's layers re-merge.
//! The panel sends raw sliders; the worker applies the mix policy (`MixMode`), which the panel
//! only calls to show the weights it gives.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::RichText;

pub use crate::engine::adapters::mix::MixMode;
use crate::engine::adapters::stack::BlockWeights;
use crate::engine::device::Placement;
use crate::engine::diffusion::sampler::SamplerKind;
use crate::engine::io::infotext::{
    AdapterTag, AdapterUse, GenerationParameters, adapter_short_hash, extract_prompt_tags, format_weight,
    read_png_parameters, save_png_with_parameters,
};
use crate::engine::io::weights::WeightPrecision;
use crate::engine::models::family::ModelFamily;
use crate::engine::pipeline::GenerateRequest;

use super::DialogPurpose;
use crate::job::playground::{AdapterCheck, GridAxis, Mix, ModelCommand, ModelEvent, ModelWorker, Slider};

mod adapters;
mod grid;
mod view;

use adapters::*;
use grid::*;
pub(in crate::ui) use view::ui_playground;

/// How long a slider must rest before Live mode re-renders.
pub const LIVE_DEBOUNCE: Duration = Duration::from_millis(300);

/// Quick previews: sides above this are halved (down to it), and at most `PREVIEW_STEPS` steps.
/// SD 1.5's 512 px at 20 guided steps is ~4 minutes on two cores; its preview, 256 px at 8 steps,
/// is a fifth of the UNet work per step and 8 steps instead of 20.
pub const PREVIEW_MIN_SIDE: usize = 256;
pub const PREVIEW_STEPS: usize = 8;

/// The preview of `request` for a model whose sides must be multiples of `size_step`: each side
/// above `PREVIEW_MIN_SIDE` halved (not below it), and at most `PREVIEW_STEPS` steps (few-step
/// samplers keep theirs). Prompt, seed, guidance and sampler stay, so it shows the same picture.
pub fn preview_of(request: &GenerateRequest, size_step: usize) -> GenerateRequest {
    let step = size_step.max(1);
    let side = |s: usize| {
        if s <= PREVIEW_MIN_SIDE { s } else { ((s / 2).max(PREVIEW_MIN_SIDE) / step * step).max(step) }
    };
    let steps = if request.sampler.is_few_step() { request.steps } else { request.steps.min(PREVIEW_STEPS) };
    GenerateRequest { width: side(request.width), height: side(request.height), steps, ..request.clone() }
}

pub struct AdapterRow {
    /// Unique within the list; the adapter's name in the model's stacks.
    pub name: String,
    pub path: PathBuf,
    pub enabled: bool,
    /// The slider, −1…2.
    pub weight: f64,
    pub blocks: BlockWeights,
    /// Algorithm, rank, family and trigger words, once the worker has read the file.
    pub info: Option<String>,
    pub warning: Option<String>,
    pub error: Option<String>,
    /// Layers re-merged the last time its applied weight changed.
    pub remerged: Option<usize>,
    /// The user agreed to load only the layers of this file that fit the model.
    pub allow_partial: bool,
}

impl AdapterRow {
    /// The slider as the mix sees it: 0 when switched off.
    pub fn effective_weight(&self) -> f64 {
        if self.enabled { self.weight } else { 0.0 }
    }

    fn slider(&self) -> Slider {
        Slider { name: self.name.clone(), weight: self.effective_weight(), blocks: self.blocks }
    }
}

/// An adapter file the user dropped or picked, shown with the format doctor's report until they
/// add it to the list or cancel.
pub struct PendingAdapter {
    pub path: PathBuf,
    /// `None` while the worker reads it.
    pub check: Option<Result<AdapterCheck, String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    None,
    Loading,
    Ready,
    Failed(String),
}

pub struct PlaygroundPanel {
    /// Prompt, seed, steps, guidance, sampler and size, as the model worker takes them.
    pub request: GenerateRequest,
    /// The user set the size; a newly loaded model does not change it.
    pub size_chosen: bool,
    /// The user picked a sampler: a newly opened model's family does not change it.
    pub sampler_chosen: bool,
    /// The open model's family, once loaded (the status bar and the training defaults follow it).
    pub loaded_family: Option<ModelFamily>,
    /// The open model's native side (px), once loaded (the training defaults follow it).
    pub loaded_side: Option<usize>,
    pub adapters: Vec<AdapterRow>,
    /// Files waiting for the user to read their check.
    pub pending: Vec<PendingAdapter>,
    pub live: bool,
    /// Live re-renders are quick previews (`preview_of`); Generate always renders in full.
    pub preview: bool,
    /// The open model's size step, once loaded (previews round to it).
    size_step: Option<usize>,
    /// For each render sent and not yet drawn: whether it is a preview (shown in the image's
    /// line), and its settings (saved with the image).
    renders_sent: std::collections::VecDeque<(bool, GenerationParameters)>,
    /// The settings that drew the image shown.
    pub image_parameters: Option<GenerationParameters>,
    /// This session's images, newest last.
    pub gallery: Vec<GalleryItem>,
    pub image: Option<image::RgbImage>,
    texture: Option<egui::TextureHandle>,
    /// "seed 42 · 3.1 s".
    pub image_info: String,
    /// Images received so far (tests wait on it).
    pub images_made: usize,
    pub model_state: ModelState,
    /// The model the window has open (`None`: none yet).
    model: Option<PathBuf>,
    /// The model the worker was last told to load.
    sent_model: Option<PathBuf>,
    /// The last model that loaded: where the window goes back to when another fails to open.
    pub working_model: Option<PathBuf>,
    /// A model that failed to open, with why, for the window to go back from (taken by
    /// `StudioApp::poll`).
    pub failed_model: Option<(PathBuf, String)>,
    /// Where models run and how their weights are kept (the window's device and weights
    /// settings; training runs use them too).
    pub placement: Placement,
    /// The placement the worker's model was last loaded with.
    sent_placement: Placement,
    /// What the loaded model's frozen weights are kept in (`auto` resolves per file).
    pub loaded_weights: Option<&'static str>,
    worker: ModelWorker,
    next_id: u64,
    done_id: u64,
    /// Denoising step of the image being drawn.
    pub progress: Option<(usize, usize)>,
    last_change: Option<Instant>,
    pub message: Option<String>,
    /// Rank of an exported blend.
    pub blend_rank: usize,
    /// How slider weights combine (plain sum, or scaled into a budget).
    pub mix_mode: MixMode,
    /// A slider, switch, block weight or the mode changed since the worker last got the mix.
    mix_dirty: bool,
    /// The measured strength of the mix (‖Σ wᵢΔWᵢ‖ / ‖W‖ at the worst layer), once known.
    pub overdrive: Option<f64>,
    pub grid: GridSettings,
}

/// One image of this session, kept with the settings that drew it (the Playground's strip).
pub struct GalleryItem {
    pub image: image::RgbImage,
    pub texture: egui::TextureHandle,
    pub params: GenerationParameters,
    /// The image's line ("seed 42 · 3.1 s").
    pub info: String,
}

/// How many of the session's images the strip keeps (the oldest go first).
pub const GALLERY_SIZE: usize = 32;

/// The XY grid: two adapters (rows of `adapters`) and the weights to try for each.
#[derive(Clone, Debug, PartialEq)]
pub struct GridSettings {
    pub x: usize,
    pub y: usize,
    /// Comma-separated weights, e.g. "0, 0.5, 1".
    pub x_values: String,
    pub y_values: String,
}

impl Default for GridSettings {
    fn default() -> Self {
        Self { x: 0, y: 1, x_values: "0, 0.5, 1".into(), y_values: "0, 0.5, 1".into() }
    }
}

/// "0, 0.5, 1" → [0.0, 0.5, 1.0]; an error names the piece that is not a number.
pub fn parse_weights(text: &str) -> Result<Vec<f64>, String> {
    let values: Vec<f64> = text
        .split([',', ' ', ';'])
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse::<f64>().map_err(|_| format!("`{}` is not a number", t.trim())))
        .collect::<Result<_, _>>()?;
    match values.len() {
        0 => Err("give at least one weight".into()),
        n if n > 8 => Err("at most 8 weights an axis".into()),
        _ => Ok(values),
    }
}

/// The sampler the Playground starts with for a family: Euler a for SD 1.x / 2.x (A1111's
/// default), Euler for SDXL (the scheduler SDXL's pipelines ship).
pub fn window_sampler(family: ModelFamily) -> SamplerKind {
    match family {
        ModelFamily::Sdxl => SamplerKind::Euler,
        ModelFamily::Sd1 | ModelFamily::Sd2 => SamplerKind::EulerAncestral,
    }
}

impl PlaygroundPanel {
    pub fn new(ctx: &egui::Context) -> Self {
        Self {
            request: GenerateRequest {
                prompt: String::new(),
                negative: String::new(),
                seed: 42,
                steps: 20,
                guidance: 7.5,
                sampler: window_sampler(ModelFamily::Sd1),
                width: 512,
                height: 512,
                clip_skip: 1,
            },
            size_chosen: false,
            sampler_chosen: false,
            loaded_family: None,
            loaded_side: None,
            adapters: Vec::new(),
            pending: Vec::new(),
            live: true,
            preview: true,
            size_step: None,
            renders_sent: std::collections::VecDeque::new(),
            image_parameters: None,
            gallery: Vec::new(),
            image: None,
            texture: None,
            image_info: String::new(),
            images_made: 0,
            model_state: ModelState::None,
            model: None,
            sent_model: None,
            working_model: None,
            failed_model: None,
            placement: Placement::default(),
            sent_placement: Placement::default(),
            loaded_weights: None,
            worker: {
                let ctx = ctx.clone();
                ModelWorker::start(move || ctx.request_repaint())
            },
            next_id: 0,
            done_id: 0,
            progress: None,
            last_change: None,
            message: None,
            blend_rank: 16,
            mix_mode: MixMode::Sum,
            mix_dirty: false,
            overdrive: None,
            grid: GridSettings::default(),
        }
    }

    /// The window's model changed; the worker loads it the next time it is needed.
    pub fn set_model(&mut self, model: Option<PathBuf>) {
        self.model = model;
    }

    /// Loads the window's model on the worker if it is not loaded (or another one is), then
    /// re-adds the adapters to it.
    pub fn ensure_model(&mut self) {
        if self.model == self.sent_model && self.placement == self.sent_placement {
            return;
        }
        let Some(model) = self.model.clone() else { return };
        self.sent_model = Some(model.clone());
        self.sent_placement = self.placement.clone();
        self.model_state = ModelState::Loading;
        self.loaded_weights = None;
        self.loaded_family = None;
        self.loaded_side = None;
        self.push(ModelCommand::Load { path: model, placement: self.placement.clone() });
        for i in 0..self.adapters.len() {
            self.send_add(i);
        }
    }

    fn push(&mut self, command: ModelCommand) {
        self.next_id += 1;
        self.worker.send(self.next_id, command);
    }

    fn send(&mut self, command: ModelCommand) {
        self.ensure_model();
        self.push(command);
    }

    fn send_add(&mut self, i: usize) {
        // The worker weighs a newcomer against the mix it knows: bring that up to date first.
        if self.mix_dirty {
            self.mix_dirty = false;
            self.push(ModelCommand::SetMix(self.mix()));
        }
        let row = &mut self.adapters[i];
        row.error = None;
        let cmd =
            ModelCommand::AddAdapter { path: row.path.clone(), slider: row.slider(), allow_partial: row.allow_partial };
        self.push(cmd);
    }

    /// The worker has commands it has not finished.
    pub fn busy(&self) -> bool {
        self.done_id < self.next_id
    }

    /// The worker has (or is loading) the window's model.
    fn model_sent(&self) -> bool {
        self.sent_model.is_some() && self.sent_model == self.model
    }

    /// Adds an adapter file (or reloads it if it is already in the list, e.g. a new checkpoint).
    /// Until the Playground has loaded its model (when first shown) the row just waits, so a
    /// training run does not load a second copy of the model behind the user's back.
    pub fn add_adapter(&mut self, path: &Path) {
        self.add_adapter_as(path, false)
    }

    /// As `add_adapter`; `allow_partial` loads only the layers that fit (the user agreed to it).
    fn add_adapter_as(&mut self, path: &Path, allow_partial: bool) {
        if let Some(i) = self.adapters.iter().position(|r| r.path == path) {
            self.adapters[i].allow_partial |= allow_partial;
            if self.model_sent() {
                self.send_add(i);
                self.mark_changed();
            }
            return;
        }
        let stem = path.file_stem().map_or("adapter".into(), |s| s.to_string_lossy().into_owned());
        let mut name = stem.clone();
        let mut n = 2;
        while self.adapters.iter().any(|r| r.name == name) {
            name = format!("{stem} ({n})");
            n += 1;
        }
        self.adapters.push(AdapterRow {
            name,
            path: path.to_path_buf(),
            enabled: true,
            weight: 1.0,
            blocks: BlockWeights::default(),
            info: None,
            warning: None,
            error: None,
            remerged: None,
            allow_partial,
        });
        if self.model_sent() {
            self.send_add(self.adapters.len() - 1);
            self.mark_changed();
        }
    }

    /// A file the user chose: the worker runs the format doctor on it and the report is shown; it
    /// joins the list when the user accepts (`accept_pending`). A file already listed reloads.
    pub fn check_adapter(&mut self, path: &Path) {
        if self.adapters.iter().any(|r| r.path == path) {
            return self.add_adapter(path);
        }
        if self.pending.iter().any(|p| p.path == path) {
            return;
        }
        self.ensure_model();
        self.pending.push(PendingAdapter { path: path.to_path_buf(), check: None });
        self.push(ModelCommand::Inspect(path.to_path_buf()));
    }

    pub fn accept_pending(&mut self, i: usize) {
        if i < self.pending.len() {
            let p = self.pending.remove(i);
            // A file the doctor found fits only in part is accepted knowing that.
            let partial = matches!(&p.check, Some(Ok(check)) if check.partial);
            self.add_adapter_as(&p.path, partial);
        }
    }

    pub fn dismiss_pending(&mut self, i: usize) {
        if i < self.pending.len() {
            self.pending.remove(i);
        }
    }

    /// Lists an adapter switched off, for the user to try (the example styles on first launch).
    pub fn offer_adapter(&mut self, path: &Path) {
        self.add_adapter(path);
        if let Some(i) = self.adapters.iter().position(|r| r.path == path) {
            self.adapters[i].enabled = false;
            self.mix_dirty = true;
        }
    }

    /// Fault injection for tests: makes the worker thread panic. Not in release builds.
    #[doc(hidden)]
    #[cfg(debug_assertions)]
    pub fn inject_worker_panic(&mut self) {
        self.push(ModelCommand::Panic);
    }

    /// The adapter files in the list (a training run must not write over them).
    pub fn adapter_paths(&self) -> Vec<PathBuf> {
        self.adapters.iter().map(|a| a.path.clone()).collect()
    }

    pub fn remove_adapter(&mut self, i: usize) {
        if i < self.adapters.len() {
            let row = self.adapters.remove(i);
            self.send(ModelCommand::Remove(row.name));
            self.mark_changed();
        }
    }

    /// Moves a slider (as the UI does): the row is re-merged on the next render.
    pub fn set_weight(&mut self, i: usize, weight: f64) {
        if let Some(row) = self.adapters.get_mut(i) {
            row.weight = weight;
            self.mix_changed();
        }
    }

    /// A slider, switch or block weight moved: the mix goes out before the next render.
    fn mix_changed(&mut self) {
        self.mix_dirty = true;
        self.mark_changed();
    }

    fn mark_changed(&mut self) {
        self.last_change = Some(Instant::now());
    }

    /// The mix as the worker takes it: every row's raw slider and the mode.
    fn mix(&self) -> Mix {
        Mix { mode: self.mix_mode, sliders: self.adapters.iter().map(AdapterRow::slider).collect() }
    }

    fn flush_weights(&mut self) {
        // One snapshot, whatever moved: the worker works out which adapters' weights changed.
        if self.mix_dirty {
            self.mix_dirty = false;
            let mix = self.mix();
            self.send(ModelCommand::SetMix(mix));
        }
    }

    /// The weight each adapter gets in the model, for display: the worker applies the same
    /// policy to the sliders it was sent.
    pub fn mix_weights(&self) -> Vec<f64> {
        let raw: Vec<f64> = self.adapters.iter().map(AdapterRow::effective_weight).collect();
        self.mix_mode.applied(&raw)
    }

    /// Switches between summing and budget mode: every adapter is re-weighted.
    pub fn set_mix_mode(&mut self, mode: MixMode) {
        if self.mix_mode != mode {
            self.mix_mode = mode;
            self.mix_changed();
        }
    }

    /// Sum of |weight| over the adapters as mixed.
    pub fn total_strength(&self) -> f64 {
        self.mix_weights().iter().map(|w| w.abs()).sum()
    }

    /// Renders the XY grid of `grid.x` × `grid.y` on the worker.
    pub fn render_grid(&mut self) {
        let axis = |i: usize, values: &str, rows: &[AdapterRow]| -> Result<GridAxis, String> {
            let row = rows.get(i).ok_or("pick two adapters for the grid")?;
            Ok(GridAxis { name: row.name.clone(), values: parse_weights(values)?, blocks: row.blocks })
        };
        let axes = axis(self.grid.x, &self.grid.x_values, &self.adapters)
            .and_then(|x| Ok((x, axis(self.grid.y, &self.grid.y_values, &self.adapters)?)));
        let (x, y) = match axes {
            Ok((x, y)) if x.name != y.name => (x, y),
            Ok(_) => return self.message = Some("Pick two different adapters for the grid.".into()),
            Err(e) => return self.message = Some(format!("Grid: {e}")),
        };
        self.message = None;
        self.last_change = None; // the grid is the render the change asked for
        self.flush_weights();
        let total = x.values.len() * y.values.len() * self.request.steps;
        // The worker puts the adapters back at the mix's weights once the grid is drawn.
        self.send(ModelCommand::XyGrid { request: self.request.clone(), x, y });
        self.progress = Some((0, total));
    }

    /// Renders the request in full (the Generate button).
    pub fn generate(&mut self) {
        self.render(false);
    }

    /// The image just drawn joins the strip, with its texture, line and settings.
    fn keep_in_gallery(&mut self, image: &image::RgbImage) {
        let (Some(texture), Some(params)) = (self.texture.clone(), self.image_parameters.clone()) else { return };
        if self.gallery.len() == GALLERY_SIZE {
            self.gallery.remove(0);
        }
        self.gallery.push(GalleryItem { image: image.clone(), texture, params, info: self.image_info.clone() });
    }

    /// Stops the image or grid being drawn (at its next step) and any render queued behind it.
    pub fn cancel(&mut self) {
        self.last_change = None;
        self.worker.cancel_through(self.next_id);
    }

    /// What a live re-render draws: the preview when previews are on, else the full request.
    pub fn live_request(&self) -> GenerateRequest {
        match self.size_step {
            Some(step) if self.preview => preview_of(&self.request, step),
            _ => self.request.clone(),
        }
    }

    fn render(&mut self, live: bool) {
        if self.model.is_none() {
            self.message = Some("Open a base model first.".into());
            return;
        }
        self.message = None;
        self.apply_prompt_tags();
        self.last_change = None;
        self.flush_weights();
        let request = if live { self.live_request() } else { self.request.clone() };
        let preview = request != self.request;
        self.progress = Some((0, request.steps));
        let params = self.parameters(&request);
        self.renders_sent.push_back((preview, params));
        self.send(ModelCommand::Generate(request));
    }

    /// Picks a sampler as a user of A1111 / ComfyUI would set it up: LCM and TCD (for LCM-LoRA and
    /// TCD-LoRA) at 4 steps without guidance, unless steps and guidance are already in their
    /// range; back to 20 steps and guidance 7.5 when leaving them from there.
    pub fn choose_sampler(&mut self, sampler: SamplerKind) {
        let (was, now) = (self.request.sampler.is_few_step(), sampler.is_few_step());
        self.request.sampler = sampler;
        self.sampler_chosen = true;
        if now && !was {
            if self.request.steps > PREVIEW_STEPS {
                self.request.steps = 4;
            }
            if self.request.guidance > 2.0 {
                self.request.guidance = 1.0;
            }
        } else if was && !now {
            if self.request.steps <= PREVIEW_STEPS {
                self.request.steps = 20;
            }
            if self.request.guidance <= 2.0 {
                self.request.guidance = 7.5;
            }
        }
    }

    pub fn export_blend(&mut self, path: PathBuf) {
        self.flush_weights();
        let sources = self
            .adapters
            .iter()
            .filter(|r| r.effective_weight() != 0.0)
            // As the slider shows it (two decimals), not f64 noise like 0.6000000000000001.
            .map(|r| format!("{} × {:.2}", r.name, r.effective_weight()))
            .collect();
        let inputs = self.adapters.iter().filter(|r| r.effective_weight() != 0.0).map(|r| r.path.clone()).collect();
        self.send(ModelCommand::ExportBlend { path, rank: self.blend_rank, sources, inputs });
    }

    /// Writes the open model with the enabled adapters folded in, as a new diffusers folder.
    pub fn merge_into_base(&mut self, out: PathBuf) {
        let Some(model) = self.model.clone() else {
            self.message = Some("Open a base model first.".into());
            return;
        };
        self.flush_weights();
        self.send(ModelCommand::MergeIntoBase { model, out });
    }

    /// Saves the image as a PNG carrying the settings that drew it, in A1111's `parameters`
    /// text (A1111's PNG Info, ComfyUI and civitai read it; dropping it here restores them).
    pub fn save_image(&mut self, path: &Path) {
        let Some(img) = &self.image else { return };
        let mut params = self.image_parameters.clone().unwrap_or_else(|| self.parameters(&self.request));
        // Hashed only now: a file's hash reads all of it, too slow for every render.
        for a in &mut params.adapters {
            let row = self.adapters.iter().find(|r| file_stem(&r.path) == a.name);
            a.hash = row.and_then(|r| adapter_short_hash(&r.path).ok());
        }
        self.message = Some(match save_png_with_parameters(path, img, &params) {
            Ok(()) => format!("Saved {} with its settings", path.display()),
            Err(e) => format!("{}: cannot save: {e:#}", path.display()),
        });
    }

    /// The settings of `request` with the sliders as they are, as A1111 writes them.
    pub fn parameters(&self, request: &GenerateRequest) -> GenerationParameters {
        let adapters = self
            .adapters
            .iter()
            .filter(|r| r.effective_weight() != 0.0)
            .map(|r| AdapterUse { name: file_stem(&r.path), weight: r.effective_weight(), hash: None })
            .collect();
        GenerationParameters::from_request(request, adapters, self.model.as_deref().map(file_stem))
    }

    /// Folders where a prompt's `<lora:NAME>` is looked for: those of the adapters in the list,
    /// then the example styles.
    fn adapter_folders(&self) -> Vec<PathBuf> {
        let mut folders: Vec<PathBuf> = Vec::new();
        let examples = crate::engine::builtin::example_adapters();
        for dir in self.adapters.iter().map(|r| &r.path).chain(&examples).filter_map(|p| p.parent()) {
            if !folders.iter().any(|f| f == dir) {
                folders.push(dir.to_path_buf());
            }
        }
        folders
    }

    /// Takes A1111's `<lora:name:weight>` tags out of the prompt box and sets those sliders (adding
    /// an adapter found in `adapter_folders`), as typing them in A1111 does; what cannot be used is
    /// said in the message line.
    pub fn apply_prompt_tags(&mut self) {
        let tags = extract_prompt_tags(&self.request.prompt);
        if tags.adapters.is_empty() && tags.ignored.is_empty() {
            return;
        }
        self.request.prompt = tags.prompt;
        let mut notes = tags.ignored;
        notes.extend(self.set_sliders(&tags.adapters));
        if !notes.is_empty() {
            self.message = Some(notes.join("; "));
        }
    }

    /// Sets each named adapter's slider (switching it on), adding the file from
    /// `adapter_folders` when it is not in the list; returns what could not be done, in words.
    fn set_sliders(&mut self, tags: &[AdapterTag]) -> Vec<String> {
        let mut notes = Vec::new();
        for tag in tags {
            let found = self.adapters.iter().position(|r| r.name == tag.name || file_stem(&r.path) == tag.name);
            let i = match found {
                Some(i) => i,
                None => {
                    let folders = self.adapter_folders();
                    let file =
                        folders.iter().map(|d| d.join(format!("{}.safetensors", tag.name))).find(|f| f.is_file());
                    let Some(file) = file else {
                        let looked: Vec<String> = folders.iter().map(|d| d.display().to_string()).collect();
                        notes.push(format!("<lora:{}> was not found (looked in {})", tag.name, looked.join(", ")));
                        continue;
                    };
                    self.add_adapter(&file);
                    self.adapters.len() - 1
                }
            };
            self.adapters[i].enabled = true;
            self.set_weight(i, tag.weight);
            if let Some(te) = tag.text_encoder_weight.filter(|&w| w != tag.weight) {
                notes.push(format!(
                    "{}: one weight per adapter here; {} is used (the text encoder's {te} is not)",
                    tag.name,
                    format_weight(tag.weight)
                ));
            }
        }
        notes
    }

    /// A PNG's saved settings (A1111's, or ours) put back: prompt, sizes, sampler, seed, and
    /// each adapter's slider (added from `adapter_folders` when it is not in the list).
    pub fn restore_parameters(&mut self, png: &Path) {
        match read_png_parameters(png) {
            Ok(params) => self.restore_settings(&params, &png.display().to_string()),
            Err(e) => self.message = Some(format!("{e:#}")),
        }
    }

    /// Shows the gallery's image `i` again and puts back the settings that drew it.
    pub fn open_from_gallery(&mut self, i: usize) {
        let Some(item) = self.gallery.get(i) else { return };
        let (image, texture, info, params) =
            (item.image.clone(), item.texture.clone(), item.info.clone(), item.params.clone());
        self.image = Some(image);
        self.texture = Some(texture);
        self.image_info = info;
        self.image_parameters = Some(params.clone());
        self.restore_settings(&params, "this image");
        // The image these settings drew is already on screen: no live re-render of it.
        self.last_change = None;
    }

    /// Puts `params` back: prompt, sizes, sampler, seed, clip skip and each adapter's slider.
    fn restore_settings(&mut self, params: &GenerationParameters, source: &str) {
        let mut notes = params.apply_to(&mut self.request);
        self.size_chosen = true;
        self.sampler_chosen = true;
        // Adapters the image did not use are switched off, so the next render is the image's; the
        // prompt is kept exactly as saved (its adapters were taken out of it when it was read).
        for row in &mut self.adapters {
            row.enabled = params.adapters.iter().any(|a| a.name == row.name || a.name == file_stem(&row.path));
        }
        self.mix_changed();
        let tags: Vec<AdapterTag> = params
            .adapters
            .iter()
            .map(|a| AdapterTag { name: a.name.clone(), weight: a.weight, text_encoder_weight: None })
            .collect();
        notes.extend(self.set_sliders(&tags));
        self.message = Some(if notes.is_empty() {
            format!("Settings restored from {source}")
        } else {
            format!("Settings restored from {source} ({})", notes.join("; "))
        });
    }

    /// Drains the worker's events; in Live mode, re-renders once the sliders have rested.
    pub fn poll(&mut self, ctx: &egui::Context) {
        for event in self.worker.events.try_iter().collect::<Vec<_>>() {
            match event {
                ModelEvent::Loaded { path, seconds, native_size, size_step, weights, family } => {
                    self.model_state = ModelState::Ready;
                    self.size_step = Some(size_step);
                    self.loaded_weights = Some(weights);
                    self.loaded_family = Some(family);
                    self.loaded_side = native_size;
                    self.working_model = Some(path.clone());
                    // Start at the model's own size and its family's sampler unless the user
                    // already chose them.
                    if let Some(side) = native_size.filter(|_| !self.size_chosen) {
                        self.request.width = side;
                        self.request.height = side;
                    }
                    if !self.sampler_chosen {
                        self.request.sampler = window_sampler(family);
                    }
                    self.image_info = format!("Loaded {} in {seconds:.1} s", path.display());
                }
                ModelEvent::LoadFailed { path, error } => {
                    self.model_state = ModelState::Failed(error.clone());
                    self.failed_model = Some((path, error));
                }
                ModelEvent::AdapterAdded { name, info, warning } => {
                    if let Some(row) = self.adapters.iter_mut().find(|r| r.name == name) {
                        row.info = Some(info);
                        row.warning = warning;
                    }
                }
                ModelEvent::Inspected { path, check } => {
                    if let Some(p) = self.pending.iter_mut().find(|p| p.path == path) {
                        p.check = Some(check);
                    }
                }
                ModelEvent::AdapterFailed { name, error } => {
                    if let Some(row) = self.adapters.iter_mut().find(|r| r.name == name) {
                        row.error = Some(error);
                    }
                }
                ModelEvent::Remerged { name, layers } => {
                    if let Some(row) = self.adapters.iter_mut().find(|r| r.name == name) {
                        row.remerged = Some(layers);
                    }
                }
                ModelEvent::Progress { step, total } => self.progress = Some((step, total)),
                ModelEvent::Overdrive { ratio } => self.overdrive = Some(ratio),
                ModelEvent::Grid { image, seconds, caption } => {
                    self.image_parameters = Some(self.parameters(&self.request));
                    self.texture = Some(super::thumbnails::rgb_texture(ctx, "playground-image", &image));
                    self.image_info = format!("grid · {caption} · {seconds:.1} s");
                    self.keep_in_gallery(&image);
                    self.image = Some(image);
                    self.images_made += 1;
                    self.progress = None;
                }
                ModelEvent::Crashed { error } => {
                    // The worker dropped its model; it reloads (with the adapters) when next needed.
                    self.message = Some(format!(
                        "The Playground's worker failed ({error}); the model is reloaded for the next image."
                    ));
                    self.sent_model = None;
                    self.model_state = ModelState::None;
                    self.overdrive = None;
                    self.progress = None;
                    self.renders_sent.clear();
                }
                ModelEvent::Image { image, seconds, seed } => {
                    self.texture = Some(super::thumbnails::rgb_texture(ctx, "playground-image", &image));
                    let (preview, params) = self.renders_sent.pop_front().unzip();
                    self.image_parameters = params;
                    let preview = preview.unwrap_or(false);
                    self.image_info = if preview {
                        let (w, h) = image.dimensions();
                        format!("preview {w}×{h} · seed {seed} · {seconds:.1} s · Generate renders it in full")
                    } else {
                        format!("seed {seed} · {seconds:.1} s")
                    };
                    if !preview {
                        self.keep_in_gallery(&image);
                    }
                    self.image = Some(image);
                    self.images_made += 1;
                    self.progress = None;
                }
                ModelEvent::Cancelled { grid } => {
                    if !grid {
                        self.renders_sent.pop_front();
                    }
                    self.message = Some(if grid { "Grid cancelled." } else { "Cancelled." }.into());
                    self.progress = None;
                }
                ModelEvent::GenerateFailed { error } => {
                    self.renders_sent.pop_front();
                    self.message = Some(format!("Could not generate: {error}"));
                    self.progress = None;
                }
                ModelEvent::Exported { path, report } => {
                    self.message = Some(format!(
                        "Exported {} (rank {}, keeps {:.1}% of the mix)",
                        path.display(),
                        report.rank,
                        report.kept_energy * 100.0
                    ))
                }
                ModelEvent::ExportFailed { error } => self.message = Some(format!("Could not export: {error}")),
                ModelEvent::Merged { path, tensors } => {
                    self.message =
                        Some(format!("Merged into a new model: {} ({tensors} weights changed)", path.display()))
                }
                ModelEvent::Done { id } => self.done_id = self.done_id.max(id),
            }
        }
        if !self.busy() {
            self.progress = None;
        }
        if let Some(t) = self.last_change {
            let rested = t.elapsed();
            if !self.live || self.model.is_none() || self.images_made == 0 {
                self.last_change = None;
            } else if rested >= LIVE_DEBOUNCE {
                self.render(true);
            } else {
                ctx.request_repaint_after(LIVE_DEBOUNCE - rested);
            }
        }
    }
}

/// "neon" for `…/neon.safetensors`: the name A1111's `<lora:…>` tags use.
fn file_stem(path: &Path) -> String {
    path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

/// What the panel asks of the rest of the window.
pub enum PlaygroundAction {
    OpenDialog(DialogPurpose),
    /// Open the built-in model again.
    OpenBuiltin,
}
