//! Helpers for the window tests: fixtures, generated images, dropped files, waiting on workers.
#![allow(dead_code)]

#[path = "../tests/support/scratch.rs"]
mod scratch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui_kittest::Harness;

pub use lora_studio::engine::builtin::fixtures_dir;

pub fn sd1_tiny() -> PathBuf {
    fixtures_dir().join("sd1-tiny")
}

/// A fresh, empty folder for one test.
pub fn tempdir(name: &str) -> PathBuf {
    scratch::fresh_dir(&format!("lora-studio-ui-{name}-"))
}

/// Three small gradient PNGs (`img0.png`…) with `.txt` captions.
pub fn make_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([i * 80, (x * 6) as u8, (y * 6) as u8]));
        img.save(dir.join(format!("img{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("img{i}.txt")), "a gradient").unwrap();
    }
}

/// A dropped file as egui-winit hands it over (its own type is crate-private).
#[derive(Debug)]
pub struct TestFile(pub PathBuf);

impl egui::DroppedFile for TestFile {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        Err("a path, not bytes".into())
    }
}

pub fn drop_paths<S>(h: &mut Harness<'_, S>, paths: &[PathBuf]) {
    for p in paths {
        h.input_mut().dropped_files.push(Arc::new(TestFile(p.clone())));
    }
    h.step();
}

/// Steps the UI (workers keep running) until `cond` holds; panics after `timeout` of wall time.
/// `h.run()` cannot be used while a spinner is showing.
pub fn run_until<S>(h: &mut Harness<'_, S>, timeout: Duration, what: &str, mut cond: impl FnMut(&S) -> bool) {
    let start = Instant::now();
    while !cond(h.state()) {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    h.step();
}

/// A Playground request the tiny fixture model draws in moments: 32 px, 3 steps, seed 7.
pub fn quick_request(p: &mut lora_studio::ui::PlaygroundPanel) {
    p.request.prompt = "a gradient".into();
    p.request.width = 32;
    p.request.height = 32;
    p.size_chosen = true;
    p.request.steps = 3;
    p.request.seed = 7;
}
