#!/usr/bin/env bash
# Crash safety: runs the CLI trainer and kills it with SIGKILL at random moments, N times, then
# checks that every adapter and checkpoint on disk still loads, and that resuming finishes the job.
#
#   packaging/kill-test.sh [RUNS] [MODEL]      (defaults: 100, ../shared/fixtures/sd1-tiny/model)
#
# Prints the counts at the end; exits non-zero if any file on disk failed to load.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
model=${2:-../shared/fixtures/sd1-tiny/model}
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
# Resuming finishes the job.
"${train[@]}" --resume "$ckpt" > "$work/final.log" 2>&1 && done_ok=yes || done_ok=no
leftovers=$(find "$work/out" -name '.*.tmp-*' | wc -l)
echo "runs: $runs, killed: $killed, finished before the kill: $finished"
echo "adapter loads: $adapter_ok, checkpoint intact: $checkpoint_ok, damaged files: $bad, temporary files left: $leftovers"
echo "resume to the end: $done_ok ($(tail -1 "$work/final.log" 2> /dev/null))"
[ "$bad" -eq 0 ] && [ "$done_ok" = yes ]
