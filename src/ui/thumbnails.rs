//! Thumbnails for the dataset grid: decoded and downscaled on a worker thread, uploaded as egui
//! textures on the UI thread when they arrive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender};

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 128;

enum Slot {
    Pending,
    Ready(egui::TextureHandle),
    Failed,
}

pub struct Thumbnails {
    requests: Sender<PathBuf>,
    results: Receiver<(PathBuf, Option<egui::ColorImage>)>,
    slots: HashMap<PathBuf, Slot>,
}

impl Thumbnails {
    pub fn new(ctx: &egui::Context) -> Self {
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<PathBuf>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let ctx = ctx.clone();
        // Ends when `requests` is dropped with the panel.
        let _ = std::thread::Builder::new().name("thumbnails".into()).spawn(move || {
            for path in req_rx {
                let image = thumbnail(&path);
                if res_tx.send((path, image)).is_err() {
                    break;
                }
                ctx.request_repaint();
            }
        });
        Self { requests: req_tx, results: res_rx, slots: HashMap::new() }
    }

    /// Uploads the thumbnails that arrived since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        for (path, image) in self.results.try_iter() {
            let slot = match image {
                Some(img) => {
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
            let _ = self.requests.send(path.to_path_buf());
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

fn thumbnail(path: &Path) -> Option<egui::ColorImage> {
    let bytes = std::fs::read(path).ok()?;
    let image = crate::engine::train::dataset::decode_image(path, &bytes).ok()?;
    let small = image.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgba8();
    let size = [small.width() as usize, small.height() as usize];
    Some(egui::ColorImage::from_rgba_unmultiplied(size, small.as_raw()))
}

/// An RGB image as an egui texture (samples, generated images).
pub fn rgb_texture(ctx: &egui::Context, name: &str, image: &image::RgbImage) -> egui::TextureHandle {
    let size = [image.width() as usize, image.height() as usize];
    let color = egui::ColorImage::from_rgb(size, image.as_raw());
    // Tiny images (the test model draws 32×32) stay crisp when shown larger.
    let options = if image.width() < 128 { egui::TextureOptions::NEAREST } else { egui::TextureOptions::LINEAR };
    ctx.load_texture(name, color, options)
}
