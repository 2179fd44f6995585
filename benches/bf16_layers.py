#!/usr/bin/env python3
"""Which layers in fp32 would lift bf16's top-1 agreement with fp32? EfficientNet-Lite0 (genuine weights), the
bench's 300 photos, PIL + torchvision preprocessing, batch norms folded into their convolutions in fp32 first
(as labeld's load-time optimisation does), then rounded to bf16 except the layers named in each row.

    PYTHONPATH=.deps/py /usr/bin/python3 benches/bf16_layers.py   # ~30 s; after `make bench` made the photos

Prints the agreement per variant and the fp32 top-1 minus top-2 probability of the images that differ.
"""
import copy
import glob
import os
import sys

import torch
import torchvision.transforms as T
from PIL import Image
from torch.nn.utils.fusion import fuse_conv_bn_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from export_model import efficientnet_lite0  # noqa: E402

PHOTOS = os.path.expanduser("~/.cache/labeld/bench/1920x1080-300")


def folded(model):
    """`model` with every convolution/batch-norm pair folded in fp32."""
    def fuse(mod, conv, bn):
        setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
        setattr(mod, bn, torch.nn.Identity())
    e = model.inner
    fuse(e, "_conv_stem", "_bn0")
    fuse(e, "_conv_head", "_bn1")
    for b in e._blocks:
        if hasattr(b, "_expand_conv"):
            fuse(b, "_expand_conv", "_bn0")
        fuse(b, "_depthwise_conv", "_bn1")
        fuse(b, "_project_conv", "_bn2")
    return model


def in_fp32(layer, output_bf16=True):
    """Runs `layer` in fp32 inside a bf16 network: its input goes up to fp32, its output back to bf16
    (the classifier's logits stay fp32)."""
    layer.float()
    layer.register_forward_pre_hook(lambda mod, i: (i[0].float(),))
    if output_bf16:
        layer.register_forward_hook(lambda mod, i, o: o.bfloat16())


def main():
    torch.set_num_threads(2)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted(glob.glob(os.path.join(PHOTOS, "*.jpg")))
    if not files:
        sys.exit(f"no photos in {PHOTOS}: run `make bench` once first")
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    model = folded(efficientnet_lite0().eval())

    def run(m, kind):
        with torch.no_grad():
            return torch.cat([m(x[i:i + 20].to(kind)).float() for i in range(0, len(x), 20)])

    fp32 = run(model, torch.float32).softmax(1)
    ref = fp32.argmax(1)
    top2 = fp32.topk(2, 1).values
    e = lambda m: m.inner  # noqa: E731
    variants = {
        "all bf16": lambda m: [],
        "stem (input affine + first conv) fp32": lambda m: [e(m)._conv_stem],
        "classifier fp32": lambda m: [e(m)._fc],
        "stem + classifier fp32": lambda m: [e(m)._conv_stem, e(m)._fc],
        "depthwise convs fp32": lambda m: [b._depthwise_conv for b in e(m)._blocks],
        "project convs fp32": lambda m: [b._project_conv for b in e(m)._blocks],
        "expand convs fp32": lambda m: [b._expand_conv for b in e(m)._blocks if hasattr(b, "_expand_conv")],
    }
    print(f"EfficientNet-Lite0, {len(files)} photos, bf16 top-1 agreement with fp32:")
    for name, layers in variants.items():
        v = copy.deepcopy(model).bfloat16()
        chosen = layers(v)
        stem = any(layer is e(v)._conv_stem for layer in chosen)
        if stem:  # the input affine before the stem stays fp32 as well
            v.scale, v.shift = v.scale.float(), v.shift.float()
        for layer in chosen:
            in_fp32(layer, output_bf16=layer is not e(v)._fc)
            if stem and layer is e(v)._conv_stem:
                layer._forward_pre_hooks.clear()
        pred = run(v, torch.float32 if stem else torch.bfloat16).argmax(1)
        differ = (pred != ref).nonzero().flatten().tolist()
        margins = ", ".join(f"{(top2[i, 0] - top2[i, 1]).item():.4f}" for i in differ)
        print(f"  {name}: {100 * (1 - len(differ) / len(files)):.1f}% ({len(differ)} differ; fp32 top-1 − top-2: {margins})")
    print(f"  median fp32 top-1 − top-2 over all photos: {(top2[:, 0] - top2[:, 1]).median().item():.4f}")


if __name__ == "__main__":
    main()
