#!/usr/bin/env bash
# Installs a CPU libtorch 2.13.0 (the version tch 0.26.0 is built against) into .deps/libtorch.
#
# With internet, the official CPU zip from the PyTorch site works too: unzip it anywhere and export
# LIBTORCH=/path/to/libtorch before building; this script then does nothing.
#
# Without it (only package registries reachable), libtorch comes from PyPI's torch==2.13.0 wheel. That
# wheel is the CUDA build, but its libtorch_cpu.so runs CPU-only and needs only the CUDA runtime and
# CUPTI stubs to load, which PyPI ships as nvidia-cuda-runtime / nvidia-cuda-cupti. We unpack just the
# headers and the CPU libraries, and replace libtorch.so (which would drag in libtorch_cuda.so) with a
# linker script. Downloads are cached in ${XDG_CACHE_HOME:-~/.cache}/labeld; reruns are no-ops.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.deps/libtorch"
STAMP="$DEST/.labeld-complete"
TORCH_VERSION=2.13.0
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
PYTHON="${PYTHON:-python3}"

if [[ -n "${LIBTORCH:-}" ]]; then
    echo "setup-libtorch: using LIBTORCH=$LIBTORCH (set by you)"
    exit 0
fi
if [[ -f "$STAMP" ]]; then
    exit 0
fi

mkdir -p "$CACHE"
have_wheel() { compgen -G "$CACHE/$1-*.whl" > /dev/null; }
if ! have_wheel "torch-$TORCH_VERSION" || ! have_wheel nvidia_cuda_runtime || ! have_wheel nvidia_cuda_cupti; then
    echo "setup-libtorch: downloading torch==$TORCH_VERSION and CUDA runtime stubs from PyPI (~540 MB, cached in $CACHE)"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$CACHE" \
        "torch==$TORCH_VERSION" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85"
fi

echo "setup-libtorch: unpacking into $DEST"
rm -rf "$DEST.partial"
mkdir -p "$DEST.partial/lib"
"$PYTHON" - "$CACHE" "$DEST.partial" "$TORCH_VERSION" <<'PY'
import glob, os, shutil, sys, zipfile

cache, dest, version = sys.argv[1:]
libdir = os.path.join(dest, "lib")

def extract(wheel, want):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            target = want(info.filename)
            if target is None or info.is_dir():
                continue
            out = os.path.join(dest, target)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)

cpu_libs = {"libc10.so", "libtorch_cpu.so", "libgomp.so.1", "libshm.so", "libtorch_global_deps.so"}

def from_torch(name):
    if name.startswith("torch/include/"):
        return name[len("torch/"):]
    if name.startswith("torch/lib/") and os.path.basename(name) in cpu_libs:
        return "lib/" + os.path.basename(name)
    return None

def from_nvidia(name):
    base = os.path.basename(name)
    if base.startswith(("libcudart.so.", "libcupti.so.")) and "/lib/" in name:
        return "lib/" + base
    return None

(torch_wheel,) = glob.glob(os.path.join(cache, f"torch-{version}-*.whl"))
extract(torch_wheel, from_torch)
for pattern in ("nvidia_cuda_runtime-*.whl", "nvidia_cuda_cupti-*.whl"):
    (wheel,) = glob.glob(os.path.join(cache, pattern))
    extract(wheel, from_nvidia)

# torch-sys links -ltorch; the CPU part is all we need.
with open(os.path.join(libdir, "libtorch.so"), "w") as f:
    f.write("INPUT(AS_NEEDED(libtorch_cpu.so))\n")
with open(os.path.join(dest, "build-version"), "w") as f:
    f.write(version + "+cpu\n")
PY

for lib in libcudart.so.13 libcupti.so.13 libtorch_cpu.so libc10.so; do
    [[ -e "$DEST.partial/lib/$lib" ]] || { echo "setup-libtorch: $lib missing from the wheels" >&2; exit 1; }
done
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
touch "$STAMP"
echo "setup-libtorch: ready ($(du -sh "$DEST" | cut -f1))"
