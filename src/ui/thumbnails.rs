//! Thumbnails for the dataset grid: decoded and downscaled by `job::scan::ThumbnailWorker`,
//! uploaded as egui textures on the UI thread when they arrive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::job::scan::THUMBNAIL_SIDE;
use crate::job::scan::ThumbnailWorker;

enum Slot {
    Pending,
    Ready(egui::TextureHandle),
    Failed,
}

pub struct Thumbnails {
    worker: ThumbnailWorker,
    slots: HashMap<PathBuf, Slot>,
}

impl Thumbnails {
    pub fn new(ctx: &egui::Context) -> Self {
        let ctx = ctx.clone();
        Self { worker: ThumbnailWorker::start(move || ctx.request_repaint()), slots: HashMap::new() }
    }

    /// Uploads the thumbnails that arrived since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        for (path, image) in self.worker.results.try_iter() {
            let slot = match image {
                Some(img) => {
                    let size = [img.width() as usize, img.height() as usize];
                    let img = egui::ColorImage::from_rgba_unmultiplied(size, img.as_raw());
                    Slot::Ready(ctx.load_texture(path.display().to_string(), img, egui::TextureOptions::LINEAR))
                }
                None => Slot::Failed,
            };
            self.slots.insert(path, slot);
        }
    }

    /// The texture for `path` if it is ready; asks the worker for it the first time.
    pub fn get(&mut self, path: &Path) -> Option<&egui::TextureHandle> {
        if !self.slots.contains_key(path) {
            self.slots.insert(path.to_path_buf(), Slot::Pending);
            self.worker.request(path);
        }
        match self.slots.get(path) {
            Some(Slot::Ready(t)) => Some(t),
            _ => None,
        }
    }

    /// How many thumbnails were asked for (only those the grid has shown).
    pub fn requested(&self) -> usize {
        self.slots.len()
    }

    /// How many thumbnails are uploaded.
    pub fn ready(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Ready(_))).count()
    }

    pub fn is_pending(&self, path: &Path) -> bool {
        matches!(self.slots.get(path), Some(Slot::Pending))
    }
}

/// An RGB image as an egui texture (samples, generated images).
pub fn rgb_texture(ctx: &egui::Context, name: &str, image: &image::RgbImage) -> egui::TextureHandle {
    let size = [image.width() as usize, image.height() as usize];
    let color = egui::ColorImage::from_rgb(size, image.as_raw());
    // Tiny images (the test model draws 32×32) stay crisp when shown larger.
    let options = if image.width() < 128 { egui::TextureOptions::NEAREST } else { egui::TextureOptions::LINEAR };
    ctx.load_texture(name, color, options)
}
