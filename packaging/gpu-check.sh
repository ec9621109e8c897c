#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and its driver: build LoRA Studio with CUDA, check the fixture
# model's outputs computed on the GPU against diffusers' references (f32 weights to 1e-4, f16 / bf16
# weights, whose GEMMs then run in half precision, to 1e-2), then race an SD 1.5 LoRA training step
# (latent 64 = 512 px, batch 1, rank 4 on the attention projections) against diffusers + PEFT on the
# same GPU, alternating the two ROUNDS times. Prints what it checks and one JSON line per run.
#
# usage: packaging/gpu-check.sh [ROUNDS]
#   PEER=python  a Python with torch (CUDA), diffusers and peft (default: python3)
#   CUDA_COMPUTE_CAP  the GPU generation to compile for (default: what nvidia-smi reports)
#   CUDA_DIR  where packaging/cuda-toolkit.sh puts CUDA's compiler when nvcc is not installed
# Quote the ratios (ours / peer, same round) in the closing note, with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
peer_py=${PEER:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
if ! command -v nvcc >/dev/null; then
  eval "$(packaging/cuda-toolkit.sh "${CUDA_DIR:-$HOME/.cache/lora-studio-cuda}")"
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}
cargo build --release --features cuda
studio=target/release/lora-studio
fixtures=tests/fixtures/sd1-tiny
out=$(mktemp -d)

echo "# fixture outputs on the GPU against diffusers' f32 references"
for weights in f32 f16 bf16; do
  tolerance=1e-2
  [ "$weights" = f32 ] && tolerance=1e-4
  echo "## --weights $weights"
  "$studio" forward --device cuda --weights "$weights" --model "$fixtures/model" \
    --inputs "$fixtures/inputs.safetensors" --output "$out/forward-$weights.safetensors" \
    --check "$fixtures/reference.safetensors" --tolerance "$tolerance"
done

echo "# SD 1.5 LoRA step, latent 64, batch 1, rank 4: ours and diffusers + PEFT, alternating"
for round in $(seq "$rounds"); do
  echo "## round $round"
  for weights in f16 bf16 f32; do
    echo -n "ours $weights: "
    "$studio" bench train --device cuda --weights "$weights" --config sd15 --latent 64 --batch 1 --rank 4 --runs 5
    precision=${weights/f/fp}
    [ "$weights" = bf16 ] && precision=bf16
    echo -n "peer $precision: "
    "$peer_py" packaging/gpu_peer.py --res 64 --batch 1 --rank 4 --steps 10 --precision "$precision"
  done
done
rm -rf "$out"
