#!/usr/bin/env bash
# Screenshots of the real window under Xvfb, one per area, for looking at the UI by eye.
# Needs: apt-get install xvfb imagemagick xdotool. Usage: ui-tests/screenshot.sh [OUT_DIR]
# With MODEL=PATH and IMAGES=DIR it also shoots the Training area TRAIN_WAIT seconds (default 100)
# into a real run of TRAIN_STEPS steps (default 200) at 32 px: window-training-run.png.
# The window comes from `examples/window.rs`; the tabs are clicked at their positions in a
# 960×640 window with egui's default fonts (move them if the tab bar changes).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/screenshots}
mkdir -p "$out"
display=:${XVFB_DISPLAY:-77}
cargo build --example window
bin=${CARGO_TARGET_DIR:-target}/debug/examples/window

Xvfb "$display" -screen 0 960x640x24 -nolisten tcp &
xvfb=$!
trap 'kill "$app" "$xvfb" 2>/dev/null || true' EXIT
sleep 1.5
DISPLAY=$display "$bin" "${MODEL_LABEL:-built-in}" &
app=$!
sleep 4

shoot() { # AREA X: click the tab at x (y = 14), wait for a frame, save the screen
  DISPLAY=$display xdotool mousemove "$2" 14 click 1 mousemove 950 300
  sleep 1
  DISPLAY=$display /usr/bin/import -window root "$out/window-$1.png"
}
shoot training 215
shoot playground 305
shoot dataset 139
echo "wrote $out/window-{dataset,training,playground}.png"

if [[ -n "${MODEL:-}" && -n "${IMAGES:-}" ]]; then
  kill "$app"
  DISPLAY=$display "$bin" --model "$MODEL" --images "$IMAGES" --train "${TRAIN_STEPS:-200}" &
  app=$!
  sleep "${TRAIN_WAIT:-100}"
  DISPLAY=$display /usr/bin/import -window root "$out/window-training-run.png"
  echo "wrote $out/window-training-run.png"
fi
