#!/usr/bin/python3
"""Test models for tests/model_optimize.rs, made with Debian's PyTorch 1.13 the way integrators export them.

The real EfficientNet-Lite0 (trained weights, so the golden photos get different classes), built by
scripts/export_model.py, as
  traced.pt   plain torch.jit.trace
  frozen.pt   torch.jit.freeze of that trace (conv/bn already folded)
  scripted.pt torch.jit.script of a wrapper whose forward has control flow
and eager.json: eager PyTorch's fp32 top-1 and top-1/top-2 logit gap for every golden crop.
With --resnet18 it also writes resnet18.pt: torchvision resnet18, random weights (seed 0), plain trace,
the model examples/optimize_speed.rs times.

Run: PYTHONPATH=.deps/py /usr/bin/python3 tests/data/make_optimize_models.py OUT_DIR [--resnet18]
"""
import json
import os
import sys

import torch
import torchvision
from PIL import Image
from torchvision import transforms

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class Branchy(torch.nn.Module):
    """Control flow a trace cannot capture: a batch of one takes another (equivalent) path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.size(0) == 1:
            return self.inner(x.contiguous())
        out = []
        for i in range(x.size(0)):
            out.append(self.inner(x[i : i + 1]))
        return torch.cat(out, 0)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    from export_model import efficientnet_lite0

    torch.manual_seed(0)
    example = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        if "--resnet18" in sys.argv:
            resnet = torchvision.models.resnet18(weights=None).eval()
            torch.jit.trace(resnet, example).save(os.path.join(out_dir, "resnet18.pt"))
        net = efficientnet_lite0().eval()
        traced = torch.jit.trace(net, example, check_trace=False)
        traced.save(os.path.join(out_dir, "traced.pt"))
        torch.jit.freeze(torch.jit.trace(net, example, check_trace=False)).save(os.path.join(out_dir, "frozen.pt"))
        # The EfficientNet port is not scriptable itself; the wrapper's control flow is what matters.
        torch.jit.script(Branchy(traced).eval()).save(os.path.join(out_dir, "scripted.pt"))
        norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        eager = {}
        for name in sorted(os.listdir(GOLDEN)):
            if not name.endswith(".png"):
                continue
            x = norm(Image.open(os.path.join(GOLDEN, name)).convert("RGB")).unsqueeze(0)
            top = net(x)[0].topk(2)
            eager[name] = {"top1": int(top.indices[0]), "gap": float(top.values[0] - top.values[1])}
    with open(os.path.join(out_dir, "eager.json"), "w") as f:
        json.dump(eager, f, indent=1)


if __name__ == "__main__":
    main()
