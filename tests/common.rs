//! Shared helpers for the integration tests: where the reference fixtures live, and comparisons.
#![allow(dead_code)]

#[path = "support/ldm_names.rs"]
mod ldm_names;
#[path = "support/scratch.rs"]
mod scratch;
#[allow(unused_imports)] // only some test files rename to ldm
pub use ldm_names::ldm_unet_name;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_studio::engine::io::weights::{WeightMap, read_safetensors};

pub use lora_studio::engine::builtin::fixtures_dir;

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

/// A fresh, empty scratch folder for one test.
pub fn tempdir(name: &str) -> PathBuf {
    scratch::fresh_dir(&format!("lora-studio-test-{name}-"))
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
