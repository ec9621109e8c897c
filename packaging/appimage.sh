#!/usr/bin/env bash
# Builds an AppImage of LoRA Studio: a release build, an AppDir holding the binary, the desktop
# entry and the icon, then appimagetool to pack it.
#
#   packaging/appimage.sh            # → target/LoRA_Studio-<version>-<arch>.AppImage
#
# Needs appimagetool (https://github.com/AppImage/appimagetool/releases) on PATH, or its path in
# $APPIMAGETOOL. Without it the script stops after assembling the AppDir and says where it is.
# The binary links only glibc; X11/Wayland and OpenGL libraries are loaded at run time from the
# host, as for any desktop app, so nothing else is bundled. Build on the oldest distribution you
# want to support (glibc is backward- but not forward-compatible).
set -euo pipefail

cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
arch="$(uname -m)"

cargo build --release --locked

appdir="$target_dir/appimage/LoRA_Studio.AppDir"
rm -rf "$appdir"
install -Dm755 "$target_dir/release/lora-studio" "$appdir/usr/bin/lora-studio"
install -Dm644 packaging/lora-studio.desktop "$appdir/usr/share/applications/lora-studio.desktop"
install -Dm644 assets/icon.png "$appdir/usr/share/icons/hicolor/256x256/apps/lora-studio.png"
# appimagetool wants the entry and its icon at the top, and AppRun as the entry point.
cp packaging/lora-studio.desktop "$appdir/lora-studio.desktop"
cp assets/icon.png "$appdir/lora-studio.png"
ln -s lora-studio.png "$appdir/.DirIcon"
cat > "$appdir/AppRun" <<'RUN'
#!/bin/sh
here="$(dirname "$(readlink -f "$0")")"
exec "$here/usr/bin/lora-studio" "$@"
RUN
chmod 755 "$appdir/AppRun"

tool="${APPIMAGETOOL:-$(command -v appimagetool || true)}"
if [ -z "$tool" ]; then
    echo "appimagetool not found (set APPIMAGETOOL); the AppDir is ready at $appdir" >&2
    exit 2
fi
out="$target_dir/LoRA_Studio-$version-$arch.AppImage"
ARCH="$arch" "$tool" "$appdir" "$out"
echo "wrote $out"
