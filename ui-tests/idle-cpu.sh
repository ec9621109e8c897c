#!/usr/bin/env bash
# How much CPU the window uses while nothing happens: the share of one core it used over SECONDS
# (default 30) on each area, under Xvfb, with the example dataset and the built-in model open.
# Needs: apt-get install xvfb xdotool. Usage: ui-tests/idle-cpu.sh [SECONDS]
# The tabs are clicked at their positions in the default window (move them if the tab bar changes).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
display=:${XVFB_DISPLAY:-78}
cargo build --example window
bin=${CARGO_TARGET_DIR:-target}/debug/examples/window
config=$(mktemp -d)
Xvfb "$display" -screen 0 1024x700x24 -nolisten tcp &
xvfb=$!
trap 'kill "$app" "$xvfb" 2>/dev/null || true; rm -rf "$config"' EXIT
sleep 1.5
LORA_STUDIO_CONFIG_DIR=$config DISPLAY=$display "$bin" --images assets/examples/neon &
app=$!
sleep 8
ticks() { awk '{print $14 + $15}' "/proc/$app/stat"; }
for tab in "305 playground" "215 training" "139 dataset"; do
  set -- $tab
  DISPLAY=$display xdotool mousemove "$1" 16 click 1 mousemove 950 600
  sleep 8 # the area's first frames and the model's loading are not idle
  t0=$(ticks)
  sleep "$seconds"
  t1=$(ticks)
  awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v s="$seconds" -v a="$2" \
    'BEGIN { printf "%s: %.2f%% of a core over %d s idle\n", a, 100 * t / hz / s, s }'
done
