//! Native file dialogs (rfd) on a helper thread, so the window keeps drawing while one is open.
//! The chosen paths come back over a channel and are handled by `StudioApp::on_paths_chosen`,
//! which tests call directly (dialogs cannot be driven from kittest).

use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};

/// Why a dialog was opened; decides what the chosen paths are used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogPurpose {
    AddImages,
    AddImageFolder,
    OpenModelFolder,
    OpenModelFile,
    TrainOutput,
    ResumeCheckpoint,
    MergeIntoBase,
    AddAdapters,
    SaveImage,
    ExportBlend,
}

pub struct Dialogs {
    tx: Sender<(DialogPurpose, Vec<PathBuf>)>,
    rx: Receiver<(DialogPurpose, Vec<PathBuf>)>,
    /// A dialog is open (only one at a time, as desktops expect).
    pub open: bool,
}

impl Default for Dialogs {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self { tx, rx, open: false }
    }
}

impl Dialogs {
    /// Opens the dialog for `purpose` on a helper thread; ignored while another is open.
    pub fn open(&mut self, ctx: &egui::Context, purpose: DialogPurpose) {
        if self.open {
            return;
        }
        self.open = true;
        let tx = self.tx.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new().name("file dialog".into()).spawn(move || {
            let images = ["png", "jpg", "jpeg", "webp", "bmp"];
            let d = rfd::FileDialog::new();
            let paths: Vec<PathBuf> = match purpose {
                DialogPurpose::AddImages => {
                    d.set_title("Add training images").add_filter("Images", &images).pick_files().unwrap_or_default()
                }
                DialogPurpose::AddImageFolder => {
                    d.set_title("Add a folder of training images").pick_folders().unwrap_or_default()
                }
                DialogPurpose::OpenModelFolder => {
                    d.set_title("Open a diffusers model folder").pick_folder().into_iter().collect()
                }
                DialogPurpose::OpenModelFile => d
                    .set_title("Open a Stable Diffusion checkpoint")
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file()
                    .into_iter()
                    .collect(),
                DialogPurpose::TrainOutput => d
                    .set_title("Save the trained adapter as")
                    .add_filter("safetensors", &["safetensors"])
                    .set_file_name("my-lora.safetensors")
                    .save_file()
                    .into_iter()
                    .collect(),
                DialogPurpose::MergeIntoBase => d
                    .set_title("Save the merged model as a new folder")
                    .set_file_name("merged-model")
                    .save_file()
                    .into_iter()
                    .collect(),
                DialogPurpose::ResumeCheckpoint => d
                    .set_title("Resume training from a checkpoint")
                    .add_filter("training checkpoint", &["safetensors"])
                    .pick_file()
                    .into_iter()
                    .collect(),
                DialogPurpose::AddAdapters => d
                    .set_title("Add adapters")
                    .add_filter("safetensors", &["safetensors"])
                    .pick_files()
                    .unwrap_or_default(),
                DialogPurpose::SaveImage => d
                    .set_title("Save image")
                    .add_filter("PNG", &["png"])
                    .set_file_name("image.png")
                    .save_file()
                    .into_iter()
                    .collect(),
                DialogPurpose::ExportBlend => d
                    .set_title("Export the blend as one adapter")
                    .add_filter("safetensors", &["safetensors"])
                    .set_file_name("blend.safetensors")
                    .save_file()
                    .into_iter()
                    .collect(),
            };
            let _ = tx.send((purpose, paths));
            ctx.request_repaint();
        });
        if spawned.is_err() {
            self.open = false;
        }
    }

    /// Results of dialogs that have closed since the last call (empty paths: cancelled).
    pub fn poll(&mut self) -> Vec<(DialogPurpose, Vec<PathBuf>)> {
        let done: Vec<_> = self.rx.try_iter().collect();
        if !done.is_empty() {
            self.open = false;
        }
        done
    }
}
