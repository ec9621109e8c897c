//! Arbitrary bytes as an adapter file: the safetensors reader, kohya / PEFT parsing, the summary,
//! matching against a small model index and materialising ΔW for every matched layer. Any
//! outcome but a panic (or a sanitizer report) is fine; errors are the expected answer.
#![no_main]

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use lora_studio::engine::adapters::formats::{Component, ModuleIndex, match_layers, parse_adapter_bytes, summarize};

fn index() -> ModuleIndex {
    let mut index = ModuleIndex::default();
    let t = "down_blocks.0.attentions.0.transformer_blocks.0";
    index.insert(Component::Unet, &format!("{t}.attn1.to_q"), vec![8, 8]);
    index.insert(Component::Unet, &format!("{t}.attn2.to_k"), vec![8, 4]);
    index.insert(Component::Unet, "down_blocks.0.attentions.0.proj_in", vec![8, 8, 1, 1]);
    index.insert(Component::Unet, "down_blocks.0.resnets.0.conv1", vec![8, 4, 3, 3]);
    index.insert(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", vec![4, 4]);
    index
}

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = parse_adapter_bytes(data) else { return };
    let _ = summarize(&parsed);
    for layer in &parsed.layers {
        let _ = layer.scale();
    }
    let index = index();
    let Ok((layers, report)) = match_layers(&parsed, &index) else { return };
    let _ = report.summary();
    for m in layers {
        let shape = index.shape(m.component, &m.path).expect("matched layers are indexed");
        let base = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
        let _ = m.delta.delta_weight(&base);
    }
});
