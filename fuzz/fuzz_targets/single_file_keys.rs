//! Fuzzed tensor names and shapes as an original-layout checkpoint: `single_file::detect` on the
//! names, then `single_file::convert` (renaming, layout and config inference) on zero tensors.
//! Input: UTF-8 lines `NAME D0,D1,…` (a line without a shape is a scalar). Shapes are capped so
//! the zero tensors stay small; the mapper's logic, not memory, is under test.
#![no_main]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use lora_studio::engine::io::single_file;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut tensors = HashMap::new();
    for line in text.lines().take(4096) {
        let (name, dims) = match line.rsplit_once(' ') {
            Some((n, d)) => (n, d),
            None => (line, ""),
        };
        let shape: Vec<usize> = dims.split(',').filter_map(|d| d.trim().parse().ok()).take(5).collect();
        if shape.iter().any(|&d| d > 512) || shape.iter().product::<usize>() > 1 << 14 {
            continue;
        }
        let Ok(t) = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu) else { continue };
        tensors.insert(name.to_string(), t);
    }
    let _ = single_file::detect(tensors.keys().map(String::as_str));
    let _ = single_file::convert(tensors, "fuzz");
});
