#!/usr/bin/env bash
# What `make bench` needs beyond `make setup`: onnxruntime from PyPI for the reference's onnxruntime row
# (unpacked into .deps/bench-py for Debian's /usr/bin/python3, which supplies numpy as python3-numpy), and
# the bench models in models/ (benches/export_models.py: a plain-traced ResNet-18 with random weights,
# ONNX copies of it and of EfficientNet-Lite0). The wheel is cached in ~/.cache/labeld/wheels; reruns are
# no-ops once everything is there.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
ORT_VERSION=1.32.0
PYTHON=/usr/bin/python3
DEST="$ROOT/.deps/bench-py"
STAMP="$DEST/.labeld-onnxruntime-$ORT_VERSION"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"

if ! "$PYTHON" -c 'import numpy' 2> /dev/null; then
    echo "setup-bench: $PYTHON has no numpy; install Debian's python3-numpy (apt-get install python3-numpy)" >&2
    exit 1
fi

if [[ ! -f "$STAMP" ]]; then
    # The wheel must fit the Python that runs the reference, whichever pip downloads it.
    pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
    wheel_glob="$CACHE/onnxruntime-$ORT_VERSION-cp$pyver-cp$pyver-manylinux_*_$(uname -m).whl"
    if ! compgen -G "$wheel_glob" > /dev/null; then
        mkdir -p "$CACHE"
        PIP=("$PYTHON" -m pip)
        "${PIP[@]}" --version > /dev/null 2>&1 || PIP=(python3 -m pip)
        echo "setup-bench: downloading onnxruntime==$ORT_VERSION for Python $pyver from PyPI (~28 MB, cached in $CACHE)"
        "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$CACHE" \
            --python-version "$pyver" --implementation cp --abi "cp$pyver" \
            --platform "manylinux_2_28_$(uname -m)" --platform "manylinux_2_27_$(uname -m)" \
            --platform "manylinux_2_17_$(uname -m)" "onnxruntime==$ORT_VERSION"
    fi
    rm -rf "$DEST" && mkdir -p "$DEST"
    wheels=($wheel_glob)
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${wheels[0]}" "$DEST"
    # onnxruntime's other requirements (flatbuffers, protobuf, packaging) serve its tools, not inference.
    if ! err="$(PYTHONPATH="$DEST" "$PYTHON" -c 'import onnxruntime' 2>&1)"; then
        echo "setup-bench: onnxruntime $ORT_VERSION does not import with $PYTHON (numpy" \
            "$("$PYTHON" -c 'import numpy; print(numpy.__version__)')): $(tail -1 <<< "$err")" >&2
        exit 1
    fi
    touch "$STAMP"
fi

# OpenVINO, the reference's strongest CPU runtime, beside onnxruntime (its wheel imports with Debian's numpy).
OV_VERSION=2026.4.1
if [[ ! -f "$DEST/.labeld-openvino-$OV_VERSION" ]]; then
    pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
    ov_glob="$CACHE/openvino-$OV_VERSION-*-cp$pyver-cp$pyver-manylinux_*_$(uname -m).whl"
    if ! compgen -G "$ov_glob" > /dev/null; then
        PIP=("$PYTHON" -m pip)
        "${PIP[@]}" --version > /dev/null 2>&1 || PIP=(python3 -m pip)
        echo "setup-bench: downloading openvino==$OV_VERSION for Python $pyver from PyPI (~60 MB, cached in $CACHE)"
        "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$CACHE" \
            --python-version "$pyver" --implementation cp --abi "cp$pyver" \
            --platform "manylinux_2_28_$(uname -m)" --platform "manylinux_2_17_$(uname -m)" "openvino==$OV_VERSION"
    fi
    wheels=($ov_glob)
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${wheels[0]}" "$DEST"
    PYTHONPATH="$DEST" "$PYTHON" -c 'import openvino; openvino.Core()'
    touch "$DEST/.labeld-openvino-$OV_VERSION"
fi

for stem in resnet18-random efficientnet_lite0; do
    if [[ ! -f "models/$stem.pt" || ! "models/$stem.onnx" -nt "models/$stem.pt" ]]; then
        PYTHONPATH="$ROOT/.deps/py:$DEST" "$PYTHON" benches/export_models.py --out-dir models
        break
    fi
done

# The int8 rows: each ONNX copy quantized by scripts/quantize.py (ONNX Runtime static QDQ), calibrated on
# 100 photos made apart from the ones the bench measures (another seed), as a user would calibrate on
# their own camera's images.
scripts/setup-quantize.sh
CALIBRATION="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/bench/calibration-100"
if [[ ! -d $CALIBRATION ]]; then
    "$PYTHON" scripts/make_photos.py "$CALIBRATION.partial" --count 100 --seed 7
    mv "$CALIBRATION.partial" "$CALIBRATION"
fi
for stem in resnet18-random efficientnet_lite0; do
    if [[ ! "models/$stem.int8.onnx" -nt "models/$stem.onnx" || ! "models/$stem.int8.onnx" -nt scripts/quantize.py ]]; then
        .deps/quantize/bin/python scripts/quantize.py "models/$stem.onnx" "$CALIBRATION" "models/$stem.int8.onnx"
    fi
done
