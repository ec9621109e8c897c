#!/usr/bin/env bash
# Lays out CUDA 13.4's compiler, headers and libraries from PyPI wheels as a toolkit folder (no GPU
# or driver needed), enough to compile `--features cuda`, and prints the environment the build
# needs:
#
#   eval "$(packaging/cuda-toolkit.sh /opt/cuda-wheels)"
#   cargo build --release --features cuda
#
# Why these pins: cudarc 0.19 (candle 0.11's CUDA layer) knows CUDA up to 13.4, and nvcc, its
# nvvm (cicc) and crt must be one release (a newer nvvm writes PTX the older ptxas refuses).
# The wheels ship versioned libraries only and no driver: the folder adds the unversioned names
# the linker wants and a stub libcuda.so (every driver entry point cudarc binds, empty, with the
# real driver's soname) that the driver's libcuda.so.1 replaces at run time, as CUDA's own
# lib64/stubs does. CUDA_COMPUTE_CAP sets the GPU generation of the kernels (80: A100; 90: H100).
set -euo pipefail
dir=${1:?usage: cuda-toolkit.sh DIR}
venv=$dir/wheels
root=$dir/cuda
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 \
  nvidia-cuda-runtime==13.4.92 nvidia-cuda-nvrtc==13.4.92 nvidia-cuda-cccl nvidia-cublas nvidia-curand >&2
wheels=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

rm -rf "$root"
mkdir -p "$root/lib64/stubs"
for d in bin include nvvm; do ln -s "$wheels/$d" "$root/$d"; done
for f in "$wheels"/lib/*; do ln -s "$f" "$root/lib64/"; done
for lib in "$root"/lib64/lib*.so.*; do
  base=${lib##*/}
  ln -sf "$base" "$root/lib64/${base%%.so.*}.so"
done

# The driver stub: every cu* function cudarc's driver bindings declare.
bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2> /dev/null | tail -1 || true)
if [ -z "$bindings" ]; then
  cargo fetch --quiet >&2
  bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
fi
grep -o 'fn cu[A-Za-z0-9_]*' "$bindings" | sed 's/^fn //' | sort -u | awk '{print "void " $1 "(void) {}"}' > "$root/lib64/stubs/cuda-stub.c"
cc -shared -fPIC -o "$root/lib64/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$root/lib64/stubs/cuda-stub.c"

echo "export CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root PATH=$root/bin:\$PATH CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}"
