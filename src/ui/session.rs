//! The last session, saved as JSON in the config directory (from `directories`) and restored on
//! launch: model, dataset files, training options, adapters with their weights, prompt. A file
//! that cannot be read is set aside with a warning, never fatal.

use crate::engine::models::family::ModelFamily;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::adapters::formats::Naming;
use crate::engine::adapters::mix::MixMode;
use crate::engine::adapters::stack::BlockWeights;
use crate::engine::device::Placement;
use crate::engine::pipeline::GenerateRequest;
use crate::engine::train::trainer::TrainConfig;

use super::StudioApp;

/// Overrides where the session file lives (tests, portable installs).
pub const CONFIG_DIR_ENV: &str = "LORA_STUDIO_CONFIG_DIR";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    pub model: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub config: TrainConfig,
    /// The model family `config`'s family-dependent defaults were made for.
    pub settings_family: ModelFamily,
    /// The native side (px) of the model `config`'s resolution default was made for.
    pub settings_side: usize,
    /// The user picked the Playground's sampler.
    pub sampler_chosen: bool,
    pub output: String,
    pub naming: Naming,
    pub adapters: Vec<SavedAdapter>,
    pub request: Option<GenerateRequest>,
    pub size_chosen: bool,
    pub live: bool,
    /// Live re-renders are quick previews.
    pub preview: bool,
    pub mix_mode: MixMode,
    pub blend_rank: usize,
    /// The device and weight precision picked in the window.
    pub placement: Placement,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            model: None,
            images: Vec::new(),
            config: super::training::first_run_config(ModelFamily::Sd1, 512),
            settings_family: ModelFamily::Sd1,
            settings_side: 512,
            sampler_chosen: false,
            output: String::new(),
            naming: Naming::Kohya,
            adapters: Vec::new(),
            request: None,
            size_chosen: false,
            live: true,
            preview: true,
            mix_mode: MixMode::Sum,
            blend_rank: 16,
            placement: Placement::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedAdapter {
    pub path: PathBuf,
    pub enabled: bool,
    pub weight: f64,
    #[serde(default)]
    pub blocks: BlockWeights,
}

/// `session.json` in the platform's config directory (e.g. `~/.config/lora-studio/`).
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV) {
        return Some(PathBuf::from(dir).join("session.json"));
    }
    directories::ProjectDirs::from("", "", "lora-studio").map(|d| d.config_dir().join("session.json"))
}

/// What loading found: a session (default when there was none) and, for a broken file, a
/// warning saying where it was moved.
pub fn load(path: &Path) -> (Session, Option<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Session::default(), None),
        Err(e) => return (Session::default(), Some(format!("{}: cannot read the last session: {e}", path.display()))),
    };
    match serde_json::from_str(&text) {
        Ok(s) => (s, None),
        Err(e) => {
            let aside = path.with_extension("json.broken");
            let moved = std::fs::rename(path, &aside);
            let note = match moved {
                Ok(()) => format!("set aside as {}", aside.display()),
                Err(m) => format!("could not set it aside: {m}"),
            };
            (Session::default(), Some(format!("{}: the last session is unreadable ({e}); {note}", path.display())))
        }
    }
}

/// Writes atomically, creating the folder; returns the error in words.
pub fn save(path: &Path, session: &Session) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(session).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    crate::engine::io::weights::write_atomic(path, &json).map_err(|e| format!("{e:#}"))
}

impl StudioApp {
    /// The state worth keeping across launches.
    pub fn session(&self) -> Session {
        let p = &self.playground;
        Session {
            model: self.model.clone(),
            images: self.dataset.image_paths(),
            config: self.config.clone(),
            settings_family: self.settings_family,
            settings_side: self.settings_side,
            sampler_chosen: p.sampler_chosen,
            output: self.training.output.clone(),
            naming: self.training.naming,
            adapters: p
                .adapters
                .iter()
                .map(|r| SavedAdapter { path: r.path.clone(), enabled: r.enabled, weight: r.weight, blocks: r.blocks })
                .collect(),
            request: Some(p.request.clone()),
            size_chosen: p.size_chosen,
            live: p.live,
            preview: p.preview,
            mix_mode: p.mix_mode,
            blend_rank: p.blend_rank,
            placement: p.placement.clone(),
        }
    }

    /// Puts a saved session back. Files that have gone since are left out, with a note.
    pub fn restore(&mut self, s: Session) {
        let mut missing = Vec::new();
        if let Some(model) = s.model {
            if model.exists() { self.set_model(model) } else { missing.push(model) }
        }
        self.config = s.config;
        (self.settings_family, self.settings_side) = (s.settings_family, s.settings_side);
        self.training.output = s.output;
        self.training.naming = s.naming;
        let (images, gone): (Vec<PathBuf>, Vec<PathBuf>) = s.images.into_iter().partition(|p| p.exists());
        missing.extend(gone);
        if !images.is_empty() {
            let ctx = self.ctx.clone();
            self.dataset.add_paths(&ctx, images, &self.config.dataset);
        }
        let p = &mut self.playground;
        if let Some(request) = s.request {
            p.request = request;
        }
        p.size_chosen = s.size_chosen;
        p.sampler_chosen = s.sampler_chosen;
        p.live = s.live;
        p.preview = s.preview;
        p.blend_rank = s.blend_rank.max(1);
        p.placement = s.placement.clone();
        p.set_mix_mode(s.mix_mode);
        for a in s.adapters {
            if !a.path.exists() {
                missing.push(a.path);
                continue;
            }
            p.add_adapter(&a.path);
            if let Some(i) = p.adapters.iter().position(|r| r.path == a.path) {
                let row = &mut p.adapters[i];
                (row.enabled, row.blocks) = (a.enabled, a.blocks);
                p.set_weight(i, a.weight);
            }
        }
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            self.notice = Some(format!("Not found since the last session: {}", names.join(", ")));
        }
    }
}
