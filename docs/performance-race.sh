#!/usr/bin/env bash
# Ours against the Python peer (diffusers + PEFT on torch, ../shared/peer), run alternately in one
# session so the ratios mean something on a shared, noisy machine. Prints one JSON line a run.
# Usage: docs/performance-race.sh [ROUNDS] (PEER=path/to/python, SD15=1 to include SD 1.5, SDXL=1
# for SDXL base's UNet: 10.3 GB of f32 weights a side, so each side runs alone, ~20 GB of memory).
# SD 1.5 at 512 px with gradient checkpointing (memory; one run, ~2 min):
#   target/release/lora-studio bench train --config sd15 --latent 64 --batch 1 --runs 1 --checkpointing
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
peer_py=${PEER:-/opt/peer/bin/python}
peer=(nice -n 0 "$peer_py" ../shared/peer/bench_lora_train.py --rank 4 --steps 5 --warmup 1)
studio=target/release/lora-studio
cargo build --release --quiet
for round in $(seq "$rounds"); do
  echo "# round $round"
  echo -n "ours tiny train: "; $studio bench train --config sd1-tiny --latent 16 --batch 8 --rank 4 --runs 5
  echo -n "peer tiny train: "; "${peer[@]}" --config tiny --res 16 --batch 8 --mode train 2>/dev/null
  echo -n "ours built-in train: "; $studio bench train --config assets/base/unet/config.json --latent 16 --batch 8 --rank 4 --runs 5
  echo -n "peer built-in train: "; "${peer[@]}" --model-dir assets/base --res 16 --batch 8 --mode train 2>/dev/null
  echo -n "ours built-in mix: "; $studio bench mix --config assets/base/unet/config.json --latent 16 --batch 2 --adapters 8
  echo -n "peer built-in lora infer: "; "${peer[@]}" --model-dir assets/base --res 16 --mode lora 2>/dev/null
  echo -n "ours built-in image: "; $studio bench generate --steps 20 --guidance 7.5 --runs 5
  if [ "${SD15:-0}" = 1 ]; then
    # The machine's f32 GEMM rate on the SD 1.5 forward's own shapes (bench unet/train also
    # report their achieved FLOP/s against the best of the largest shapes, timed in the same run).
    echo -n "ours sd15 gemm: "; $studio bench gemm --config sd15 --latent 64 --runs 3
    echo -n "ours sd15 train: "; $studio bench train --config sd15 --latent 32 --batch 1 --rank 4 --runs 2
    echo -n "peer sd15 train: "; "${peer[@]}" --config sd15 --res 32 --batch 1 --mode train 2>/dev/null
    echo -n "ours sd15 train, f16 weights: "; $studio bench train --config sd15 --latent 32 --batch 1 --rank 4 --runs 2 --weights f16
    echo -n "ours sd15 infer b1: "; $studio bench unet --config sd15 --latent 64 --batch 1 --runs 2 --forward-only
    echo -n "peer sd15 infer: "; "${peer[@]}" --config sd15 --res 64 --mode infer --infer-reps 2 2>/dev/null
    # The peer's inference runs batch 1 then 2 (guidance) in one process: its peak is batch 2's.
    echo -n "ours sd15 infer b2, f16 weights: "; $studio bench unet --config sd15 --latent 64 --batch 2 --runs 2 --forward-only --weights f16
    echo -n "ours sd15 mix: "; $studio bench mix --config sd15 --latent 8 --batch 1 --adapters 8 --runs 3
    echo -n "ours sd15 mix, f16 weights: "; $studio bench mix --config sd15 --latent 8 --batch 1 --adapters 8 --runs 3 --weights f16
  fi
  if [ "${SDXL:-0}" = 1 ]; then
    # 512 px (latent 64), batch 1, LoRA rank 4 on attention, as the issue races it.
    echo -n "ours sdxl train: "; $studio bench train --config sdxl --latent 64 --batch 1 --rank 4 --runs 2
    echo -n "peer sdxl train: "; "${peer[@]}" --config sdxl --res 64 --batch 1 --mode train --steps 2 2>/dev/null
    echo -n "ours sdxl train, f16 weights: "; $studio bench train --config sdxl --latent 64 --batch 1 --rank 4 --runs 2 --weights f16
    echo -n "ours sdxl infer b1: "; $studio bench unet --config sdxl --latent 64 --batch 1 --runs 2 --forward-only
    echo -n "peer sdxl infer: "; "${peer[@]}" --config sdxl --res 64 --mode infer --infer-reps 2 2>/dev/null
    echo -n "ours sdxl infer b2, f16 weights: "; $studio bench unet --config sdxl --latent 64 --batch 2 --runs 2 --forward-only --weights f16
  fi
done
