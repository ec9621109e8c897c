"""The GPU side of the race in packaging/gpu-check.sh: diffusers + PEFT training a LoRA on an SD 1.5
UNet (random weights, the shape of SD 1.5's unet/config.json) on one CUDA GPU, as kohya / diffusers
users run it: frozen weights in half precision with autocast (--precision fp16|bf16) or f32.

A step is forward + backward + AdamW on PEFT LoRA factors (r = --rank on to_q/to_k/to_v/to_out.0,
kept in f32, as diffusers' train_text_to_image_lora.py keeps them), DDPM noise-prediction MSE at
latent --res, batch --batch, random text context [B, 77, 768]. Prints one JSON line: median step
seconds (torch.cuda.synchronize around each step) and peak GPU memory allocated (MiB).

usage: python gpu_peer.py [--res 64] [--batch 1] [--rank 4] [--steps 10] [--warmup 3] [--precision fp16]
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    a = ap.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    dev = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.precision]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=a.res, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet.requires_grad_(False)
    unet.to(dev, dtype=dtype)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # f32 master factors
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    unet.train()
    g = torch.Generator(device=dev).manual_seed(1)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        x0 = torch.randn((a.batch, 4, a.res, a.res), generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        t = torch.randint(0, 1000, (a.batch,), generator=g, device=dev)
        ctx = torch.randn((a.batch, 77, 768), generator=g, device=dev)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=a.precision != "fp32"):
            pred = unet(sched.add_noise(x0, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(0), "precision": a.precision, "res": a.res, "batch": a.batch,
        "rank": a.rank, "steps": a.steps, "train_step_s_median": round(statistics.median(times), 4),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
