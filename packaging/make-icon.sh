#!/usr/bin/env bash
# Draws assets/icon.png (256×256): three overlapping translucent rounded squares, one per
# blended adapter, on a transparent background. Needs ImageMagick 6 (`apt-get install imagemagick`).
# Debian's binary is called explicitly: some images put a different `convert` first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
CONVERT=${CONVERT:-/usr/bin/convert}

"$CONVERT" -size 256x256 xc:none \
  -stroke none \
  -fill 'rgba(56,189,248,0.80)'  -draw 'roundrectangle 20,20 160,160 26,26' \
  -fill 'rgba(232,121,249,0.72)' -draw 'roundrectangle 96,58 236,198 26,26' \
  -fill 'rgba(251,191,36,0.72)'  -draw 'roundrectangle 50,100 190,240 26,26' \
  -strip -depth 8 -define png:color-type=6 assets/icon.png
echo "wrote assets/icon.png"
