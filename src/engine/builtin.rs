//! Where the built-in base model (`assets/base`, see its README) and the example styles
//! (`assets/examples`) live on this machine, so the window and every command work with no
//! `--model` and nothing to download.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::Result;

/// Overrides the search below (a folder holding `base/` and `examples/`).
pub const ASSETS_ENV: &str = "LORA_STUDIO_ASSETS";

/// Folders that may hold our assets, most specific first: the environment override, next to the
/// executable (an unpacked archive or AppImage), `../share/lora-studio` beside the executable (a
/// .deb or `make install` layout), and the source tree this binary was built from (`cargo run`,
/// `cargo install --path .`).
pub fn asset_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(dir) = std::env::var_os(ASSETS_ENV) {
        roots.push(PathBuf::from(dir));
    }
    if let Some(bin) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        roots.push(bin.join("assets"));
        roots.push(bin.join("../share/lora-studio"));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"));
    roots
}

/// The built-in model's diffusers folder, when it is installed (has weights, not just a card).
pub fn model_dir() -> Option<PathBuf> {
    asset_roots().into_iter().map(|r| r.join("base")).find(|d| is_model(d))
}

fn is_model(dir: &Path) -> bool {
    dir.join("model_index.json").is_file() && dir.join("unet/diffusion_pytorch_model.safetensors").is_file()
}

/// The example style adapters (`assets/examples/*.safetensors`), sorted by name.
pub fn example_adapters() -> Vec<PathBuf> {
    let Some(dir) = asset_roots().into_iter().map(|r| r.join("examples")).find(|d| d.is_dir()) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// `explicit` when given, else the built-in model; an error that says what to do when neither.
pub fn resolve_model(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    match model_dir() {
        Some(dir) => Ok(dir),
        None => bail!(
            "no --model given and the built-in model is not installed (looked for base/ in: {}); \
             pass --model PATH (a diffusers folder or a .safetensors checkpoint) or set {ASSETS_ENV}",
            asset_roots().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The reference fixtures the tests compare against (tensors computed with diffusers,
/// transformers, PEFT and LyCORIS, see `tests/fixtures/README.md`): the copy in the repository's
/// `tests/fixtures`, or the folder `LORA_STUDIO_FIXTURES` names. The one place tests find them.
#[doc(hidden)]
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LORA_STUDIO_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}
