//! The Playground's model lives on this worker thread: loading, adapters, slider weights,
//! generation and blend export all run here, in the order asked, so the window never waits.
//! Generate requests that pile up while one runs collapse to the newest (live slider mode).
//! The worker keeps the panel's sliders and mix mode and applies the mix policy itself
//! (`MixMode::applied`), so every adapter's weight follows from one snapshot, whatever changed.
//! A panic in a command is caught: the window hears about it and the model is reloaded on the
//! next use, so one bad file or bug never leaves the Playground dead.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use crossbeam_channel::{Receiver, Sender};

use crate::engine::adapters::formats::{Naming, match_layers, read_adapter, summarize};
use crate::engine::adapters::mix::{BlendForm, BlendReport, MixMode, export_blend, overdrive};
use crate::engine::adapters::stack::BlockWeights;
use crate::engine::grid::{GridLayout, axis_labels};
use crate::engine::io::weights::dtype_name;
use crate::engine::models::family::ModelFamily;
use crate::engine::pipeline::{GenerateRequest, GenerationCancelled, ModelWeights, StableDiffusion};

pub enum ModelCommand {
    Load {
        path: PathBuf,
        placement: crate::engine::device::Placement,
    },
    /// The format doctor on a file the user chose, before it joins the list.
    Inspect(PathBuf),
    /// Loads (or reloads) an adapter at the weight its slider gets in the mix; under a budget
    /// the others are re-weighed around it.
    AddAdapter {
        path: PathBuf,
        slider: Slider,
        /// The user agreed to load only the layers that fit this model.
        allow_partial: bool,
    },
    /// Every slider and the mode at once: the worker re-merges what the new mix changes.
    SetMix(Mix),
    /// Drops an adapter and its slider; under a budget the others get its share.
    Remove(String),
    Generate(GenerateRequest),
    /// The same request at every pair of weights of two adapters, as one grid image (rows: `y`).
    /// The cells' weights are applied as given; afterwards the adapters go back to the mix.
    XyGrid {
        request: GenerateRequest,
        x: GridAxis,
        y: GridAxis,
    },
    ExportBlend {
        path: PathBuf,
        rank: usize,
        sources: Vec<String>,
        /// The enabled adapters' files, whose shared metadata the blend keeps.
        inputs: Vec<PathBuf>,
    },
    /// Writes `model` (a diffusers folder) with the live mix folded in, as a new folder `out`.
    MergeIntoBase {
        model: PathBuf,
        out: PathBuf,
    },
    /// Fault injection for tests: panics on the worker thread. Not in release builds.
    #[doc(hidden)]
    #[cfg(debug_assertions)]
    Panic,
}

/// One adapter's slider as the panel shows it; the mix policy turns it into the applied weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Slider {
    /// The adapter's name in the model's stacks.
    pub name: String,
    /// The slider's weight, 0 when the adapter is switched off.
    pub weight: f64,
    pub blocks: BlockWeights,
}

/// The panel's whole mix: every adapter's slider, in list order, and how they combine.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    pub mode: MixMode,
    pub sliders: Vec<Slider>,
}

impl Default for Mix {
    fn default() -> Self {
        Self { mode: MixMode::Sum, sliders: Vec::new() }
    }
}

impl Mix {
    /// Each slider with the weight the policy gives it.
    pub fn applied(&self) -> impl Iterator<Item = (&Slider, f64)> {
        let raw: Vec<f64> = self.sliders.iter().map(|s| s.weight).collect();
        self.sliders.iter().zip(self.mode.applied(&raw))
    }

    fn weight_of(&self, name: &str) -> f64 {
        self.applied().find(|(s, _)| s.name == name).map_or(0.0, |(_, w)| w)
    }

    /// Adds a slider, or replaces the one of the same name where it stands.
    fn upsert(&mut self, slider: Slider) {
        match self.sliders.iter_mut().find(|s| s.name == slider.name) {
            Some(s) => *s = slider,
            None => self.sliders.push(slider),
        }
    }
}

/// One axis of an XY grid: an adapter and the weights to try (its per-block weights kept).
#[derive(Clone, Debug)]
pub struct GridAxis {
    pub name: String,
    pub values: Vec<f64>,
    pub blocks: BlockWeights,
}

pub enum ModelEvent {
    /// `native_size`: the side the model was trained at (UNet sample size × VAE factor).
    /// `weights`: what the frozen weights are kept in (`f16`, `bf16`, `f32`).
    Loaded {
        path: PathBuf,
        seconds: f64,
        native_size: Option<usize>,
        /// What a picture's sides must be a multiple of (`StableDiffusion::size_multiple`).
        size_step: usize,
        weights: &'static str,
        family: ModelFamily,
    },
    LoadFailed {
        path: PathBuf,
        error: String,
    },
    AdapterAdded {
        name: String,
        info: String,
        warning: Option<String>,
    },
    AdapterFailed {
        name: String,
        error: String,
    },
    /// The format doctor's report on a file (`Err`: it is not an adapter we can read).
    Inspected {
        path: PathBuf,
        check: Result<AdapterCheck, String>,
    },
    /// Layers re-merged after the adapter's applied weight changed (sent only when some were).
    Remerged {
        name: String,
        layers: usize,
    },
    Progress {
        step: usize,
        total: usize,
    },
    /// The mix's measured strength, ‖Σ wᵢ·ΔWᵢ‖ / ‖W‖ at its worst layer (`mixing::overdrive`).
    Overdrive {
        ratio: f64,
    },
    Grid {
        image: image::RgbImage,
        seconds: f64,
        caption: String,
    },
    Image {
        image: image::RgbImage,
        seconds: f64,
        seed: u64,
    },
    GenerateFailed {
        error: String,
    },
    /// A generation or (`grid`) an XY grid stopped by *Cancel* (nothing drawn).
    Cancelled {
        grid: bool,
    },
    Exported {
        path: PathBuf,
        report: BlendReport,
    },
    ExportFailed {
        error: String,
    },
    Merged {
        path: PathBuf,
        tensors: usize,
    },
    /// A command panicked; the model was dropped and will be reloaded when next needed.
    Crashed {
        error: String,
    },
    /// Every command up to and including `id` is done.
    Done {
        id: u64,
    },
}

/// What the format doctor found in an adapter file, and how it fits the open model.
#[derive(Clone, Debug)]
pub struct AdapterCheck {
    pub lines: Vec<(&'static str, String)>,
    /// "56 of 56 adapter layers match the model", or why none do.
    pub fit: String,
    /// The model refuses it (wrong shapes, or no layer fits).
    pub refused: bool,
    /// Only some of its layers fit: loaded only if the user agrees.
    pub partial: bool,
}

pub struct ModelWorker {
    tx: Sender<(u64, ModelCommand)>,
    pub events: Receiver<ModelEvent>,
    /// Drawing for any command up to this id stops at its next step (*Cancel*).
    cancel_through: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ModelWorker {
    /// Starts the worker; `wake` is called after every event (the window requests a repaint).
    pub fn start(wake: impl Fn() + Send + 'static) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let cancel_through = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cancel = cancel_through.clone();
        // The thread ends when the sender is dropped; it is not joined, so closing the window
        // never waits for a generation to finish.
        let _ = std::thread::Builder::new().name("playground model".into()).spawn(move || {
            let send = |e: ModelEvent| {
                let _ = ev_tx.send(e);
                wake();
            };
            worker(&rx, &send, &cancel);
        });
        Self { tx, events: ev_rx, cancel_through }
    }

    /// Stops the drawing of every command sent up to `id` (the one running, and queued ones).
    pub fn cancel_through(&self, id: u64) {
        self.cancel_through.fetch_max(id, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn send(&self, id: u64, command: ModelCommand) {
        let _ = self.tx.send((id, command));
    }
}

fn worker(rx: &Receiver<(u64, ModelCommand)>, send: &dyn Fn(ModelEvent), cancel: &std::sync::atomic::AtomicU64) {
    let mut sd: Option<StableDiffusion> = None;
    // The panel's, not the model's: it outlives a crash and is re-applied to a reloaded model.
    let mut mix = Mix::default();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Only the newest generate request matters; it runs after everything else in the batch.
        let last_id = batch.last().map_or(0, |(id, _)| *id);
        let mut generate = None;
        let mut mix_changed = false;
        for (id, cmd) in batch {
            let stop = || cancel.load(std::sync::atomic::Ordering::Relaxed) >= id;
            match cmd {
                ModelCommand::Generate(req) => generate = Some((id, req)),
                other => {
                    mix_changed |= matches!(
                        other,
                        ModelCommand::AddAdapter { .. } | ModelCommand::SetMix(_) | ModelCommand::Remove(_)
                    );
                    guarded(&mut sd, send, |sd| handle(sd, &mut mix, other, send, &stop));
                }
            }
        }
        if mix_changed {
            guarded(&mut sd, send, |sd| {
                if let Some(ratio) = sd.as_mut().and_then(|m| overdrive(m).ok()) {
                    send(ModelEvent::Overdrive { ratio });
                }
            });
        }
        if let Some((id, req)) = generate {
            let stop = || cancel.load(std::sync::atomic::Ordering::Relaxed) >= id;
            guarded(&mut sd, send, |sd| run_generate(sd.as_ref(), &req, send, &stop));
        }
        send(ModelEvent::Done { id: last_id });
    }
}

/// Runs `f`, turning a panic into a `Crashed` event; the model, perhaps half-changed, is dropped.
fn guarded(sd: &mut Option<StableDiffusion>, send: &dyn Fn(ModelEvent), f: impl FnOnce(&mut Option<StableDiffusion>)) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(sd))) {
        let error = crate::job::panic_message(&*panic);
        *sd = None;
        send(ModelEvent::Crashed { error });
    }
}

/// Runs one command; `stop` says when *Cancel* has asked a drawing to end.
fn handle(
    sd: &mut Option<StableDiffusion>,
    mix: &mut Mix,
    cmd: ModelCommand,
    send: &dyn Fn(ModelEvent),
    stop: &dyn Fn() -> bool,
) {
    match cmd {
        ModelCommand::Load { path, placement } => {
            let t = Instant::now();
            *sd = None; // free the old model first
            let loaded = placement.device().and_then(|device| {
                StableDiffusion::from_weights(ModelWeights::load(&path, DType::F32, placement.weights, &device)?)
            });
            match loaded {
                Ok(mut m) => {
                    m.cache_text_embeddings = true; // only this worker changes its adapters
                    let native_size = Some(m.native_side());
                    let size_step = m.size_multiple();
                    let weights = dtype_name(m.unet.conv_in.weight().dtype());
                    let family = m.family();
                    *sd = Some(m);
                    send(ModelEvent::Loaded {
                        path,
                        seconds: t.elapsed().as_secs_f64(),
                        native_size,
                        size_step,
                        weights,
                        family,
                    });
                }
                Err(e) => send(ModelEvent::LoadFailed { path, error: format!("{e:#}") }),
            }
        }
        ModelCommand::Inspect(path) => {
            let check = read_adapter(&path).map(|parsed| {
                let (fit, refused, partial) = match sd.as_mut() {
                    // The report says how the file fits; nothing is loaded.
                    Some(model) => match match_layers(&parsed, &model.module_index()) {
                        Ok((_, report)) => match report.accept(false) {
                            Ok(()) => (report.summary(), false, false),
                            Err(e) if report.refused() => (format!("{e:#}"), true, false),
                            Err(_) => {
                                let fit = format!(
                                    "{} of {} adapter layers match the model; {} have no home in it: {}",
                                    report.matched,
                                    report.total,
                                    report.unmatched.len(),
                                    report.unmatched.join(", ")
                                );
                                (fit, false, true)
                            }
                        },
                        Err(e) => (format!("{e:#}"), true, false),
                    },
                    None => ("no model is open to check it against".into(), false, false),
                };
                AdapterCheck { lines: summarize(&parsed).lines(), fit, refused, partial }
            });
            send(ModelEvent::Inspected { path, check: check.map_err(|e| format!("{e:#}")) });
        }
        ModelCommand::AddAdapter { path, slider, allow_partial } => {
            let (name, blocks) = (slider.name.clone(), slider.blocks);
            // A file that fails to load keeps its slider, as the panel's list keeps its row.
            mix.upsert(slider);
            let Some(model) = sd.as_mut() else {
                return send(ModelEvent::AdapterFailed { name, error: "no model is open".into() });
            };
            let info = read_adapter(&path).map(|parsed| describe(&summarize(&parsed)));
            let result = info.and_then(|info| {
                // Merged once, at its share of the mix.
                let weight = mix.weight_of(&name);
                let report = if allow_partial {
                    model.load_adapter_partial(&name, &path, weight, &blocks)?
                } else {
                    model.load_adapter_mixed(&name, &path, weight, &blocks)?
                };
                Ok((info, report))
            });
            match result {
                Ok((info, report)) => {
                    let warning = report.partial().then(|| format!("partial load, as asked: {}", report.summary()));
                    send(ModelEvent::AdapterAdded { name, info, warning })
                }
                Err(e) => send(ModelEvent::AdapterFailed { name, error: format!("{e:#}") }),
            }
            apply_mix(model, mix, send);
        }
        ModelCommand::SetMix(new) => {
            *mix = new;
            if let Some(model) = sd.as_mut() {
                apply_mix(model, mix, send);
            }
        }
        ModelCommand::Remove(name) => {
            mix.sliders.retain(|s| s.name != name);
            if let Some(model) = sd.as_mut() {
                model.remove_adapter(&name);
                // Its layers first, so the re-merge counts below are the others' own.
                let _ = model.refresh_merges();
                apply_mix(model, mix, send);
            }
        }
        ModelCommand::Generate(_) => unreachable!("generate requests are batched"),
        #[cfg(debug_assertions)]
        ModelCommand::Panic => panic!("injected fault (test)"),
        ModelCommand::MergeIntoBase { model, out } => {
            let Some(sd) = sd.as_mut() else {
                return send(ModelEvent::ExportFailed { error: "no model is open".into() });
            };
            match crate::engine::io::diffusers_folder::write_merged_model(sd, &model, &out) {
                Ok(tensors) => send(ModelEvent::Merged { path: out, tensors }),
                Err(e) => send(ModelEvent::ExportFailed { error: format!("{e:#}") }),
            }
        }
        ModelCommand::XyGrid { request, x, y } => {
            let Some(model) = sd.as_mut() else {
                return send(ModelEvent::GenerateFailed { error: "no model is open".into() });
            };
            let t = Instant::now();
            let grid = xy_grid(model, &request, &x, &y, send, stop);
            apply_mix(model, mix, send);
            match grid {
                Ok(image) => {
                    let caption = format!(
                        "columns: {} at {}; rows: {} at {} (seed {})",
                        x.name,
                        list(&x.values),
                        y.name,
                        list(&y.values),
                        request.seed
                    );
                    send(ModelEvent::Grid { image, seconds: t.elapsed().as_secs_f64(), caption })
                }
                Err(e) if e.is::<GenerationCancelled>() => send(ModelEvent::Cancelled { grid: true }),
                Err(e) => send(ModelEvent::GenerateFailed { error: format!("{e:#}") }),
            }
        }
        ModelCommand::ExportBlend { path, rank, sources, inputs } => {
            let Some(model) = sd.as_mut() else {
                return send(ModelEvent::ExportFailed { error: "no model is open".into() });
            };
            let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
            let result = export_blend(
                model,
                &path,
                BlendForm { rank, naming: Naming::Kohya, dtype: DType::F32 },
                &sources,
                &inputs,
                |_, _| Ok(()),
            );
            match result {
                Ok(report) => send(ModelEvent::Exported { path, report }),
                Err(e) => send(ModelEvent::ExportFailed { error: format!("{e:#}") }),
            }
        }
    }
}

/// Gives every adapter the weight the policy gives its slider; `set_adapter_mix` re-merges only
/// the layers of adapters whose multiplier changed.
fn apply_mix(model: &mut StableDiffusion, mix: &Mix, send: &dyn Fn(ModelEvent)) {
    for (slider, weight) in mix.applied() {
        let name = slider.name.clone();
        match model.set_adapter_mix(&name, weight, &slider.blocks) {
            Ok(0) => {}
            Ok(layers) => send(ModelEvent::Remerged { name, layers }),
            Err(e) => send(ModelEvent::AdapterFailed { name, error: format!("{e:#}") }),
        }
    }
}

fn list(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(", ")
}

/// Renders `request` at every (x, y) weight pair into one image, labelled as A1111 labels its
/// X/Y plot (`engine::grid`: each column's and row's "adapter: weight" in white margins).
fn xy_grid(
    model: &mut StableDiffusion,
    request: &GenerateRequest,
    x: &GridAxis,
    y: &GridAxis,
    send: &dyn Fn(ModelEvent),
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<image::RgbImage> {
    if x.name == y.name || x.values.is_empty() || y.values.is_empty() {
        anyhow::bail!("pick two different adapters and at least one weight for each");
    }
    let layout = GridLayout::new(
        request.width as u32,
        request.height as u32,
        &axis_labels(&x.name, &x.values),
        &axis_labels(&y.name, &y.values),
    );
    let mut grid = layout.canvas();
    let total = x.values.len() * y.values.len() * request.steps;
    for (r, &wy) in y.values.iter().enumerate() {
        model.set_adapter_mix(&y.name, wy, &y.blocks)?;
        for (c, &wx) in x.values.iter().enumerate() {
            model.set_adapter_mix(&x.name, wx, &x.blocks)?;
            let done = (r * x.values.len() + c) * request.steps;
            let img = model.generate_until(request, &mut |step, _| {
                send(ModelEvent::Progress { step: done + step, total });
                !stop()
            })?;
            layout.place(&mut grid, c, r, &img);
        }
    }
    Ok(grid)
}

fn run_generate(
    sd: Option<&StableDiffusion>,
    req: &GenerateRequest,
    send: &dyn Fn(ModelEvent),
    stop: &dyn Fn() -> bool,
) {
    let Some(model) = sd else {
        return send(ModelEvent::GenerateFailed { error: "no model is open".into() });
    };
    let t = Instant::now();
    let mut on_step = |step, total| {
        send(ModelEvent::Progress { step, total });
        !stop()
    };
    match model.generate_until(req, &mut on_step) {
        Ok(image) => send(ModelEvent::Image { image, seconds: t.elapsed().as_secs_f64(), seed: req.seed }),
        Err(e) if e.is::<GenerationCancelled>() => send(ModelEvent::Cancelled { grid: false }),
        Err(e) => send(ModelEvent::GenerateFailed { error: format!("{e:#}") }),
    }
}

/// "LoRA · rank 4 · SD 1.x · triggers: sks" from an adapter file's summary.
fn describe(s: &crate::engine::adapters::formats::AdapterSummary) -> String {
    let algorithms: Vec<&str> = s.algorithms.keys().map(String::as_str).collect();
    let ranks: std::collections::BTreeSet<String> =
        s.ranks.keys().filter_map(|k| k.split(',').next().map(|r| r.trim().to_string())).collect();
    let mut parts =
        vec![algorithms.join("+"), ranks.into_iter().collect::<Vec<_>>().join("/"), format!("{} layers", s.layers)];
    parts.push(s.family.clone());
    if let Some(t) = s.metadata.get("lora_studio_trigger_words").filter(|t| !t.is_empty()) {
        parts.push(format!("trigger: {t}"));
    } else if let Some(tags) = top_tags(s.metadata.get("ss_tag_frequency")) {
        parts.push(format!("tags: {tags}"));
    }
    parts.join(" · ")
}

/// The three most frequent tags of kohya's `ss_tag_frequency` ({"dataset": {"tag": n}}).
fn top_tags(json: Option<&String>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json?).ok()?;
    let mut tags: Vec<(String, u64)> = v
        .as_object()?
        .values()
        .filter_map(|d| d.as_object())
        .flat_map(|d| d.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))))
        .collect();
    tags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let top: Vec<String> = tags.into_iter().take(3).map(|t| t.0).collect();
    (!top.is_empty()).then(|| top.join(", "))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::engine::builtin::fixtures_dir;

    /// The worker's command handler on the sd1-tiny fixture model, with the events it sent.
    struct Bench {
        sd: Option<StableDiffusion>,
        mix: Mix,
        events: RefCell<Vec<ModelEvent>>,
    }

    impl Bench {
        fn new() -> Self {
            let mut b = Self { sd: None, mix: Mix::default(), events: RefCell::new(Vec::new()) };
            b.run(ModelCommand::Load { path: fixtures_dir().join("sd1-tiny/model"), placement: Default::default() });
            assert!(b.sd.is_some(), "the fixture model loads");
            b
        }

        fn run(&mut self, cmd: ModelCommand) {
            let events = &self.events;
            handle(&mut self.sd, &mut self.mix, cmd, &|e| events.borrow_mut().push(e), &|| false);
        }

        fn add(&mut self, file: &str, name: &str, weight: f64) {
            let slider = Slider { name: name.into(), weight, blocks: BlockWeights::default() };
            self.run(ModelCommand::AddAdapter {
                path: fixtures_dir().join("sd1-tiny").join(file),
                slider,
                allow_partial: false,
            });
            let failed = self.events.borrow().iter().any(|e| matches!(e, ModelEvent::AdapterFailed { .. }));
            assert!(!failed, "{name} loads");
        }

        /// The distinct multipliers `name` has in the model's layers.
        fn multipliers(&mut self, name: &str) -> Vec<f64> {
            let mut all = Vec::new();
            self.sd.as_mut().unwrap().visit_layers(&mut |_, l| {
                all.extend(l.stack_ref().adapters.iter().filter(|a| a.name == name).map(|a| a.multiplier));
            });
            assert!(!all.is_empty(), "{name} is attached");
            all.dedup();
            all
        }

        /// Layers re-merged per adapter since the last call.
        fn remerged(&self) -> Vec<(String, usize)> {
            let mut events = self.events.borrow_mut();
            let out = events
                .iter()
                .filter_map(|e| match e {
                    ModelEvent::Remerged { name, layers } => Some((name.clone(), *layers)),
                    _ => None,
                })
                .collect();
            events.clear();
            out
        }
    }

    fn budget_of_one() -> Mix {
        Mix { mode: MixMode::Budget(1.0), sliders: Vec::new() }
    }

    #[test]
    fn the_worker_applies_the_budget_to_every_adapter() {
        let mut b = Bench::new();
        b.run(ModelCommand::SetMix(budget_of_one()));
        b.add("lora_a_kohya.safetensors", "a", 1.0);
        assert_eq!(b.multipliers("a"), vec![1.0], "alone, within the budget");
        b.remerged();
        // The newcomer is merged at its share, and the first adapter re-merged at its own.
        b.add("lora_b_peft.safetensors", "b", 1.0);
        assert_eq!((b.multipliers("a"), b.multipliers("b")), (vec![0.5], vec![0.5]));
        let remerged = b.remerged();
        assert!(remerged.iter().any(|(n, l)| n == "a" && *l > 0), "{remerged:?}");

        // A snapshot with one slider switched off gives the other the whole budget.
        let blocks = BlockWeights::default();
        let sliders =
            vec![Slider { name: "a".into(), weight: 2.0, blocks }, Slider { name: "b".into(), weight: 0.0, blocks }];
        b.run(ModelCommand::SetMix(Mix { mode: MixMode::Budget(1.0), sliders: sliders.clone() }));
        assert_eq!((b.multipliers("a"), b.multipliers("b")), (vec![1.0], vec![0.0]));
        // Summing: each at its slider.
        b.run(ModelCommand::SetMix(Mix { mode: MixMode::Sum, sliders }));
        assert_eq!((b.multipliers("a"), b.multipliers("b")), (vec![2.0], vec![0.0]));
    }

    #[test]
    fn removing_an_adapter_under_a_budget_gives_the_others_its_share() {
        let mut b = Bench::new();
        b.run(ModelCommand::SetMix(budget_of_one()));
        b.add("lora_a_kohya.safetensors", "a", 1.0);
        b.add("lora_b_peft.safetensors", "b", 1.0);
        assert_eq!(b.multipliers("a"), vec![0.5]);
        b.remerged();
        b.run(ModelCommand::Remove("b".into()));
        assert_eq!(b.multipliers("a"), vec![1.0]);
        let remerged = b.remerged();
        assert!(matches!(remerged.as_slice(), [(n, l)] if n == "a" && *l > 0), "{remerged:?}");
    }

    #[test]
    fn after_an_xy_grid_the_adapters_return_to_the_mix() {
        let mut b = Bench::new();
        b.run(ModelCommand::SetMix(budget_of_one()));
        b.add("lora_a_kohya.safetensors", "a", 1.0);
        b.add("lora_b_peft.safetensors", "b", 1.0);
        let request = GenerateRequest {
            prompt: "a gradient".into(),
            negative: String::new(),
            seed: 1,
            steps: 1,
            guidance: 7.5,
            sampler: crate::engine::diffusion::sampler::SamplerKind::EulerAncestral,
            width: 32,
            height: 32,
            clip_skip: 1,
        };
        let axis = |name: &str| GridAxis { name: name.into(), values: vec![0.0, 2.0], blocks: BlockWeights::default() };
        b.run(ModelCommand::XyGrid { request, x: axis("a"), y: axis("b") });
        let grid = b.events.borrow().iter().find_map(|e| match e {
            ModelEvent::Grid { image, .. } => Some(image.clone()),
            _ => None,
        });
        let grid = grid.expect("the grid is drawn");
        // 2 × 2 cells of 32 px, 4 px apart, after the labels' margins (white, as A1111's).
        let labels = |name: &str| crate::engine::grid::axis_labels(name, &[0.0, 2.0]);
        let layout = GridLayout::new(32, 32, &labels("a"), &labels("b"));
        assert!(layout.top > 0 && layout.left > 0);
        assert_eq!(grid.dimensions(), (layout.left + 2 * 32 + 4, layout.top + 2 * 32 + 4));
        assert_eq!(*grid.get_pixel(0, 0), image::Rgb([255; 3]), "the margins' corner is white");
        if let Ok(path) = std::env::var("LORA_STUDIO_GRID_PNG") {
            grid.save(path).unwrap();
        }
        assert_eq!((b.multipliers("a"), b.multipliers("b")), (vec![0.5], vec![0.5]));
    }
}
