//! The Dataset area's background work: scanning dropped files and folders into a `Dataset`, and
//! decoding downscaled thumbnails, each on its own thread so the window never waits on a disk.

use std::path::{Path, PathBuf};

use crossbeam_channel::{Receiver, Sender};

use crate::engine::train::dataset::{Dataset, DatasetOptions, decode_image};

/// Scans `paths` on a new thread; the receiver gets the dataset (or the error, as text) once,
/// and `wake` is called then.
pub fn scan(
    paths: Vec<PathBuf>,
    opts: DatasetOptions,
    wake: impl Fn() + Send + 'static,
) -> std::io::Result<Receiver<Result<Dataset, String>>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new().name("dataset scan".into()).spawn(move || {
        let _ = tx.send(Dataset::scan(&paths, &opts).map_err(|e| format!("{e:#}")));
        wake();
    })?;
    Ok(rx)
}

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 128;

/// Decodes thumbnails on one worker thread, in the order asked; `None` for a file that does not
/// decode. The thread ends when the worker is dropped.
pub struct ThumbnailWorker {
    requests: Sender<PathBuf>,
    pub results: Receiver<(PathBuf, Option<image::RgbaImage>)>,
}

impl ThumbnailWorker {
    /// `wake` is called after each thumbnail.
    pub fn start(wake: impl Fn() + Send + 'static) -> Self {
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<PathBuf>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let _ = std::thread::Builder::new().name("thumbnails".into()).spawn(move || {
            for path in req_rx {
                let image = thumbnail(&path);
                if res_tx.send((path, image)).is_err() {
                    break;
                }
                wake();
            }
        });
        Self { requests: req_tx, results: res_rx }
    }

    pub fn request(&self, path: &Path) {
        let _ = self.requests.send(path.to_path_buf());
    }
}

fn thumbnail(path: &Path) -> Option<image::RgbaImage> {
    let bytes = std::fs::read(path).ok()?;
    let image = decode_image(path, &bytes).ok()?;
    Some(image.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgba8())
}
