#!/usr/bin/env bash
# Crash safety: runs the CLI trainer and kills it with SIGKILL at random moments, N times, then
# checks that every adapter and checkpoint on disk still loads, that resuming finishes the job and
# tidies every temporary file, and that every `-stepN` adapter is there; then does the same to
# `adapter blend` and `adapter merge`.
#
#   packaging/kill-test.sh [RUNS] [MODEL]      (defaults: 100, tests/fixtures/sd1-tiny/model)
#
# Prints the counts at the end; exits non-zero if any file on disk failed to load.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
model=${2:-tests/fixtures/sd1-tiny/model}
bin=target/release/lora-studio
[ -x "$bin" ] || cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
# Three small images with captions, made here.
python3 - "$work/data" <<'PY'
import struct, sys, zlib
def png(path, w, h, fn):
    raw = b''.join(b'\x00' + bytes(sum((fn(x, y) for x in range(w)), ())) for y in range(h))
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    open(path, 'wb').write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
                           + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
for i, (fg, bg) in enumerate([((220, 40, 40), (30, 30, 160)), ((40, 200, 60), (240, 240, 240)), ((250, 210, 0), (20, 20, 20))]):
    png(f'{sys.argv[1]}/img{i}.png', 40, 40, lambda x, y: fg if (x - 20) ** 2 + (y - 20) ** 2 < 150 else bg)
    open(f'{sys.argv[1]}/img{i}.txt', 'w').write(f'a disc {i}')
PY
out="$work/out/style.safetensors"
ckpt="$work/out/style.checkpoint.safetensors"
train=("$bin" train --model "$model" --data "$work/data" --out "$out" --steps 150 --save-every 1 --resolution 32 --no-latent-cache)
killed=0 finished=0 bad=0 adapter_ok=0 checkpoint_ok=0
for ((i = 1; i <= runs; i++)); do
  resume=()
  [ -f "$ckpt" ] && resume=(--resume "$ckpt")
  "${train[@]}" "${resume[@]}" > /dev/null 2>&1 &
  pid=$!
  sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.2 + r / 32767 * 1.8 }')"
  if kill -9 "$pid" 2> /dev/null; then killed=$((killed + 1)); else finished=$((finished + 1)); fi
  wait "$pid" 2> /dev/null || true
  if [ -f "$out" ]; then
    if "$bin" adapter info "$out" > /dev/null 2>&1; then adapter_ok=$((adapter_ok + 1)); else bad=$((bad + 1)); echo "run $i: adapter does not load"; fi
  fi
  if [ -f "$ckpt" ]; then
    # Whole file, sane header, readable state: what `--resume` needs (the last resume proves it).
    if python3 - "$ckpt" <<'PY'
import json, struct, sys
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8 + n])
end = max(v['data_offsets'][1] for k, v in h.items() if k != '__metadata__')
assert 8 + n + end == len(b), 'size'
json.loads(h['__metadata__']['lora_studio_checkpoint'])
PY
    then checkpoint_ok=$((checkpoint_ok + 1)); else bad=$((bad + 1)); echo "run $i: checkpoint is damaged"; fi
  fi
done
# What the kills left before anything tidies: temporary files are allowed here (a kill mid-write),
# and the resume below must remove them.
tmp_before=$(find "$work/out" -name '.*.tmp-*' | wc -l)
# Resuming finishes the job.
"${train[@]}" --resume "$ckpt" > "$work/final.log" 2>&1 && done_ok=yes || done_ok=no
leftovers=$(find "$work/out" -name '.*.tmp-*' | wc -l)
# Every step before the last keeps its own adapter (--save-every 1), and each one loads.
missing=0 step_bad=0
for ((s = 1; s < 150; s++)); do
  f=$(printf '%s/out/style-step%08d.safetensors' "$work" "$s")
  if [ ! -f "$f" ]; then missing=$((missing + 1)); echo "step $s: no adapter"
  elif ! "$bin" adapter info "$f" > /dev/null 2>&1; then step_bad=$((step_bad + 1)); echo "step $s: adapter does not load"; fi
done
echo "runs: $runs, killed: $killed, finished before the kill: $finished"
echo "adapter loads: $adapter_ok, checkpoint intact: $checkpoint_ok, damaged files: $bad"
echo "temporary files before the final resume: $tmp_before, after it: $leftovers"
echo "step adapters missing: $missing, not loading: $step_bad"
echo "resume to the end: $done_ok ($(tail -1 "$work/final.log" 2> /dev/null))"

# `adapter blend` and `adapter merge`, killed at random moments: the file or folder they write is
# whole or absent, and the next run of either tidies what a killed one left.
mkdir -p "$work/mix"
blend=("$bin" adapter blend "$out:0.7" --model "$model" --rank 4 --out "$work/mix/blend.safetensors")
mix_kills=0 mix_bad=0
for ((i = 1; i <= runs / 2 + 1; i++)); do
  rm -rf "$work/mix/merged"
  for cmd in blend merge; do
    if [ "$cmd" = blend ]; then "${blend[@]}" > /dev/null 2>&1 & else
      "$bin" adapter merge "$out:0.7" --model "$model" --out "$work/mix/merged" > /dev/null 2>&1 &
    fi
    pid=$!
    sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.3f", 0.02 + r / 32767 * 0.18 }')"
    kill -9 "$pid" 2> /dev/null && mix_kills=$((mix_kills + 1))
    wait "$pid" 2> /dev/null || true
  done
  if [ -f "$work/mix/blend.safetensors" ] && ! "$bin" adapter info "$work/mix/blend.safetensors" > /dev/null 2>&1; then
    mix_bad=$((mix_bad + 1)); echo "blend $i: the blend does not load"
  fi
  if [ -d "$work/mix/merged" ] && ! "$bin" generate --model "$work/mix/merged" --prompt x --steps 1 --out "$work/mix/x.png" > /dev/null 2>&1; then
    mix_bad=$((mix_bad + 1)); echo "merge $i: the merged model does not load"
  fi
done
rm -rf "$work/mix/merged"
mix_tmp=$(find "$work/mix" -mindepth 1 -maxdepth 1 -name '.*' | wc -l)
"${blend[@]}" > /dev/null 2>&1 && "$bin" adapter merge "$out:0.7" --model "$model" --out "$work/mix/merged" > /dev/null 2>&1 \
  && mix_done=yes || mix_done=no
mix_left=$(find "$work/mix" -mindepth 1 -maxdepth 1 -name '.*' | wc -l)
echo "blend/merge kills: $mix_kills, damaged outputs: $mix_bad, temporaries the kills left: $mix_tmp, left after a clean run: $mix_left, clean run: $mix_done"
[ "$bad" -eq 0 ] && [ "$done_ok" = yes ] && [ "$leftovers" -eq 0 ] && [ "$missing" -eq 0 ] && [ "$step_bad" -eq 0 ] \
  && [ "$mix_bad" -eq 0 ] && [ "$mix_left" -eq 0 ] && [ "$mix_done" = yes ]
