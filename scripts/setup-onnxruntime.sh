#!/usr/bin/env bash
# Installs ONNX Runtime's shared library (for `[model] path = "….onnx"`) into .deps/onnxruntime/lib. It
# comes from PyPI's onnxruntime wheel, which carries the same libonnxruntime.so the C/C++ release ships;
# labeld loads it at run time (the `ort` crate's load-dynamic), so nothing is downloaded at build time.
# The wheel is cached in ${XDG_CACHE_HOME:-~/.cache}/labeld/wheels (shared with setup-bench.sh); reruns
# are no-ops. The library does not depend on the Python it was packaged for.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ORT_VERSION=1.32.0
DEST="$ROOT/.deps/onnxruntime"
STAMP="$DEST/.labeld-onnxruntime-$ORT_VERSION"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" ]]; then
    exit 0
fi

# Any CPython build of the wheel holds the same library; take the one already cached, else download
# the one for this machine's python3.
wheel_glob="$CACHE/onnxruntime-$ORT_VERSION-cp*-manylinux_*_$(uname -m).whl"
if ! compgen -G "$wheel_glob" > /dev/null; then
    mkdir -p "$CACHE"
    echo "setup-onnxruntime: downloading onnxruntime==$ORT_VERSION from PyPI (~17 MB, cached in $CACHE)"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$CACHE" "onnxruntime==$ORT_VERSION"
fi
wheels=($wheel_glob)

echo "setup-onnxruntime: unpacking libonnxruntime.so.$ORT_VERSION into $DEST/lib"
rm -rf "$DEST.partial"
mkdir -p "$DEST.partial/lib"
"$PYTHON" - "${wheels[0]}" "$DEST.partial/lib" "$ORT_VERSION" <<'PY'
import os, shutil, sys, zipfile

wheel, libdir, version = sys.argv[1:]
want = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z, z.open(want) as src, open(os.path.join(libdir, os.path.basename(want)), "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
ln -s "libonnxruntime.so.$ORT_VERSION" "$DEST.partial/lib/libonnxruntime.so"
echo "$ORT_VERSION" > "$DEST.partial/build-version"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
touch "$STAMP"
echo "setup-onnxruntime: ready ($(du -sh "$DEST" | cut -f1))"
