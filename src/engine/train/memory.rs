//! How much memory a training step will need, estimated from the model's shapes before any slow
//! work, so that an impossible batch or resolution is refused with the largest that fits instead
//! of aborting mid-run ("memory allocation of … failed").

use anyhow::bail;

use crate::engine::Result;
use crate::engine::models::unet::UNetConfig;
use crate::engine::models::vae::VaeConfig;
use crate::engine::train::trainer::TrainConfig;

/// Environment variable that caps the memory a run may plan for (bytes), below what the system
/// has free: for sharing a machine, and for tests.
pub const MEMORY_LIMIT_VAR: &str = "LORA_STUDIO_MEMORY_LIMIT";

/// Bytes of f32 activations kept for the backward pass of one UNet step. The CPU attention works
/// in blocks of query rows (`engine::kernels::attention`), so no `tokens × tokens` buffer is counted; the
/// composed attention other devices use would need one per layer on top.
pub fn unet_step_bytes(
    unet: &UNetConfig,
    vae: &VaeConfig,
    batch: usize,
    height: usize,
    width: usize,
    checkpointing: bool,
) -> f64 {
    let f = vae.downscale().max(1);
    let (lh, lw) = ((height / f).max(1) as f64, (width / f).max(1) as f64);
    let levels = unet.block_out_channels.len();
    let lpb = unet.layers_per_block as f64;
    // Tensors of C×HW kept per layer: a ResNet block (norms, activations, convolutions) about 6
    // (8 on the way up, where its input is a concatenation); a transformer block (three norms,
    // q/k/v and outputs of two attentions, the GEGLU feed-forward at 4C and 8C) about 28.
    let (resnet, resnet_up, transformer) = (6.0, 8.0, 28.0);
    let mut elements = 0.0;
    for (l, &c) in unet.block_out_channels.iter().enumerate() {
        let hw = (lh / (1u64 << l) as f64).ceil() * (lw / (1u64 << l) as f64).ceil();
        let down_attn = unet.down_block_types.get(l).is_some_and(|t| t.contains("Attn"));
        let up_attn = unet.up_block_types.get(levels - 1 - l).is_some_and(|t| t.contains("Attn"));
        let depth = unet.transformer_layers_per_block.for_block(l, levels).unwrap_or(1) as f64;
        let down = lpb * (resnet + if down_attn { transformer * depth } else { 0.0 });
        let up = (lpb + 1.0) * (resnet_up + if up_attn { transformer * depth } else { 0.0 });
        elements += hw * c as f64 * (down + up);
    }
    let mut bytes = elements * batch as f64 * 4.0;
    if checkpointing {
        // Only block inputs are kept; one block's activations are rebuilt at a time.
        bytes /= levels.max(1) as f64 * 2.0;
    }
    // Gradients of the kept activations, and the allocator's slack, live alongside them during
    // the backward pass. Checked against measured peaks: sd1-tiny at 128 and 256 px (193 and
    // 580 MB RSS), SD 1.5 at 512 px (2560 MiB over the weights; this gives 3102, see the test).
    bytes * 2.0
}

/// Bytes the VAE needs to encode one image of `height`×`width` (the latent cache is filled one
/// image at a time): its widest activations at full resolution, a few at once.
pub fn vae_encode_bytes(vae: &VaeConfig, height: usize, width: usize) -> f64 {
    let c = vae.block_out_channels.first().copied().unwrap_or(128) as f64;
    (height * width) as f64 * c * 4.0 * 6.0
}

/// Memory the process may still take: the system's available memory, or the limit in
/// `LORA_STUDIO_MEMORY_LIMIT` when that is lower. `None` where neither can be read.
pub fn available_bytes() -> Option<f64> {
    let limit = std::env::var(MEMORY_LIMIT_VAR).ok().and_then(|v| v.trim().parse::<f64>().ok());
    let system = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024.0)
    });
    match (limit, system) {
        (Some(l), Some(s)) => Some(l.min(s)),
        (l, s) => l.or(s),
    }
}

fn gib(bytes: f64) -> String {
    if bytes < (1u64 << 30) as f64 {
        format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    }
}

/// Refuses a run whose step would not fit in `available` bytes (beyond the weights already
/// loaded), saying what it would need and the largest batch and resolution that would fit.
pub fn check_training_fits(unet: &UNetConfig, vae: &VaeConfig, config: &TrainConfig, available: f64) -> Result<()> {
    let res = config.dataset.resolution;
    let step_with = |batch: usize, res: usize, checkpointing: bool| {
        unet_step_bytes(unet, vae, batch, res, res, checkpointing).max(vae_encode_bytes(vae, res, res))
    };
    let step = |batch: usize, res: usize| step_with(batch, res, config.gradient_checkpointing);
    let need = step(config.batch_size, res);
    if need <= available {
        return Ok(());
    }
    let largest_batch = (1..config.batch_size).rev().find(|&b| step(b, res) <= available);
    let multiple = 64;
    let largest_res_at =
        |batch: usize| (1..=res / multiple).rev().map(|k| k * multiple).find(|&r| step(batch, r) <= available);
    let largest_res = largest_res_at(config.batch_size);
    let mut advice = Vec::new();
    if let Some(b) = largest_batch {
        advice.push(format!("--batch {b} fits at {res} px"));
    }
    if let Some(r) = largest_res {
        advice.push(format!("--resolution {r} fits at batch {}", config.batch_size));
    }
    if largest_batch.is_none()
        && largest_res.is_none()
        && config.batch_size > 1
        && let Some(r) = largest_res_at(1)
    {
        advice.push(format!("--batch 1 --resolution {r} fits"));
    }
    if !config.gradient_checkpointing && step_with(config.batch_size, res, true) <= available {
        advice.push("--gradient-checkpointing makes it fit".into());
    }
    if advice.is_empty() {
        advice.push("no batch or resolution of this run fits; free memory or use a smaller model".into());
    }
    bail!(
        "a training step at batch {} and {res} px needs about {}, but only {} is free: {}",
        config.batch_size,
        gib(need),
        gib(available),
        advice.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate against measured peaks (peak RSS minus the f32 weights, `bench train`, CPU,
    /// 2 threads, 2026-12-05): SD 1.5 at 512 px, batch 1, no checkpointing: 5839 − 3279 MiB. It
    /// may err on the generous side, not by more than a small factor either way.
    #[test]
    fn the_estimate_is_near_a_measured_sd15_step() {
        let unet = crate::engine::bench::named_unet_config("sd15").unwrap();
        let vae: VaeConfig = serde_json::from_str(
            r#"{"latent_channels":4,"block_out_channels":[128,256,512,512],"layers_per_block":2}"#,
        )
        .unwrap();
        let measured = (5839.0 - 3279.0) * 1024.0 * 1024.0;
        let estimated = unet_step_bytes(&unet, &vae, 1, 512, 512, false);
        let ratio = estimated / measured;
        eprintln!("SD 1.5, 512 px: estimate {:.0} MiB, {ratio:.2}× the measured step", estimated / 1048576.0);
        assert!(
            (0.8..=1.6).contains(&ratio),
            "estimate {:.0} MiB is {ratio:.2}× the measured step",
            estimated / 1048576.0
        );
        // Linear in the batch, and far less with checkpointing.
        assert!((unet_step_bytes(&unet, &vae, 4, 512, 512, false) / estimated - 4.0).abs() < 1e-9);
        assert!(unet_step_bytes(&unet, &vae, 1, 512, 512, true) < estimated / 4.0);
    }
}
