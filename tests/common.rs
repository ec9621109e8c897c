//! Shared helpers for the integration tests: where the reference fixtures live, and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_studio::engine::weights::{WeightMap, read_safetensors};

/// `../shared/fixtures` beside the repository (as CI lays it out), or `LORA_STUDIO_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LORA_STUDIO_FIXTURES") {
        return PathBuf::from(dir);
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if beside.exists() { beside } else { PathBuf::from("/work/shared/fixtures") }
}

pub fn sd1_tiny() -> PathBuf {
    fixtures_dir().join("sd1-tiny")
}

pub fn reference() -> HashMap<String, Tensor> {
    read_safetensors(&sd1_tiny().join("reference.safetensors")).expect("reference tensors")
}

pub fn component(name: &str, file: &str, dtype: DType) -> WeightMap {
    WeightMap::load(&[sd1_tiny().join("model").join(name).join(file)], dtype, &Device::Cpu).expect("component weights")
}

/// Asserts max|ours − ref| ≤ 1e-4 · max|ref| (the fixtures' README tolerance).
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let max_ref = reference.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let max_diff = (ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    eprintln!("{name}: max diff {max_diff:.3e}, max |ref| {max_ref:.3e}, ratio {:.2e}", max_diff / max_ref);
    assert!(max_diff <= 1e-4 * max_ref, "{name}: max diff {max_diff} exceeds 1e-4 × {max_ref}");
}

/// Tests leave their folders for a look after a failure; those of test processes that have
/// ended are removed here, so repeated runs do not fill the temp folder (a full run left ~1 GB).
fn remove_stale(prefix: &str) {
    // Whether a process has ended is read from /proc; without it nothing is removed.
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh, empty scratch folder for one test (per process, so parallel test binaries never meet).
pub fn tempdir(name: &str) -> PathBuf {
    let base = format!("lora-studio-test-{name}-");
    remove_stale(&base);
    let d = std::env::temp_dir().join(format!("{base}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a folder tree; the copies are writable even when the fixtures are not.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let mut perms = std::fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&target, perms).unwrap();
        }
    }
}
