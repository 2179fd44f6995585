#!/usr/bin/python3
"""The models `make bench` measures, made once and kept in models/ (scripts/setup-bench.sh calls this).

- resnet18-random.pt: torchvision's resnet18 architecture with random weights (seed 0), exported the way
  users export it: `model.eval()` then a plain `torch.jit.trace` and `save` (no freeze, no optimisation).
  Speed does not depend on the weights; ImageNet weights for ResNet-18 cannot be downloaded here.
- efficientnet_lite0.pt: the real ImageNet-1k EfficientNet-Lite0 (scripts/export_model.py), exported if missing.
- *.onnx beside both: the same networks through torch.onnx.export, for the onnxruntime reference row,
  checked against the TorchScript file when onnxruntime can be imported.

A file that exists is kept; an ONNX file older than its TorchScript source is made again.

  PYTHONPATH=.deps/py:.deps/bench-py /usr/bin/python3 benches/export_models.py [--out-dir models]
"""
import argparse
import importlib.util
import os
import sys

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET18 = "resnet18-random"
LITE0 = "efficientnet_lite0"


def log(msg):
    print(f"export-models: {msg}", file=sys.stderr, flush=True)


def save(module, out):
    tmp = out + ".partial"
    module.save(tmp)
    os.replace(tmp, out)
    log(f"saved {out} ({os.path.getsize(out) // 1024} KiB)")


def resnet18_random(out):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.eval()
    save(torch.jit.trace(model, torch.rand(1, 3, 224, 224)), out)


def export_model():
    """scripts/export_model.py as a module: its exports and checks, without touching models/default.pt."""
    spec = importlib.util.spec_from_file_location("export_model", os.path.join(ROOT, "scripts", "export_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lite0(out):
    m = export_model()
    eager = m.efficientnet_lite0()
    scripted = m.to_torchscript(eager)
    m.check(eager, scripted)
    m.check_trained(scripted, os.path.join(ROOT, "tests", "data", "chelsea.png"))
    save(scripted, out)


def to_onnx(pt, out):
    """The ONNX copy of `pt`, checked against it (scripts/export_model.py's export)."""
    export_model().to_onnx(torch.jit.load(pt).eval(), out)


def stale(out, source=None):
    return not os.path.exists(out) or (source is not None and os.path.getmtime(out) < os.path.getmtime(source))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "models"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, make in ((RESNET18, resnet18_random), (LITE0, lite0)):
        pt = os.path.join(args.out_dir, f"{name}.pt")
        if stale(pt):
            make(pt)
        onnx = os.path.join(args.out_dir, f"{name}.onnx")
        if stale(onnx, pt):
            to_onnx(pt, onnx)


if __name__ == "__main__":
    main()
