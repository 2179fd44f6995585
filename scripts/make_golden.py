#!/usr/bin/python3
"""Golden preprocessing data for labeld's tests, made once with torchvision and committed.

For each photo in tests/data it runs torchvision's Resize(256) -> CenterCrop(224) on the PIL image
(converted to RGB as PIL does) and stores that 224x224 RGB crop losslessly as
tests/data/golden/<photo>.png: ToTensor + Normalize are a fixed function of these bytes, so the crop pins
the whole torchvision pipeline. golden.json adds, straight from torchvision: ToTensor + Normalize of
every byte value in each channel (a 3 x 256 table, which with the crop defines every element), a
64-bit FNV-1a hash of each normalized tensor's float32 bytes (CHW, little-endian), the per-channel
means and a few sampled values, and, if a model is given, PyTorch's top-3 for each photo.

Run: PYTHONPATH=.deps/py /usr/bin/python3 scripts/make_golden.py [--model models/default.pt]
"""
import argparse
import json
import os
import struct

import torch
from PIL import Image
from torchvision import transforms

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
DATA = "tests/data"
PHOTOS = ["chelsea.png", "coffee.jpg", "rocket.jpg", "camera.png", "chelsea_palette.png", "chelsea_rgba.png"]


def make_variants():
    """Palette and alpha versions of a real photo, to pin the colour conversions."""
    cat = Image.open(os.path.join(DATA, "chelsea.png")).convert("RGB")
    cat.quantize(colors=256).save(os.path.join(DATA, "chelsea_palette.png"))
    rgba = cat.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    rgba.save(os.path.join(DATA, "chelsea_rgba.png"))


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def tensor_hash(x):
    """FNV-1a of the tensor's float32 values, C order, little-endian."""
    values = x.contiguous().view(-1).tolist()
    return "%016x" % fnv1a64(struct.pack("<%df" % len(values), *values))


def normalize_table(norm):
    """ToTensor + Normalize of every byte value, per channel: [channel][value]."""
    ramp = Image.new("RGB", (256, 1))
    ramp.putdata([(v, v, v) for v in range(256)])
    x = norm(ramp)
    return [[x[c, 0, v].item() for v in range(256)] for c in range(3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    args = ap.parse_args()
    make_variants()
    os.makedirs(os.path.join(DATA, "golden"), exist_ok=True)
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    model = torch.jit.load(args.model).eval() if args.model else None
    out = {"mean": MEAN, "std": STD, "resize": 256, "crop": 224, "normalize_table": normalize_table(norm), "photos": {}}
    for name in PHOTOS:
        img = Image.open(os.path.join(DATA, name)).convert("RGB")
        cropped = crop(img)
        cropped.save(os.path.join(DATA, "golden", name.rsplit(".", 1)[0] + ".png"))
        x = norm(cropped)
        samples = [[c, y, xx, round(x[c, y, xx].item(), 6)] for c in range(3) for (y, xx) in ((0, 0), (111, 57), (223, 223))]
        entry = {
            "size": list(img.size),
            "tensor_fnv1a64": tensor_hash(x),
            "channel_means": [round(v, 6) for v in x.mean(dim=(1, 2)).tolist()],
            "samples": samples,
        }
        if model is not None:
            with torch.no_grad():
                probs = model(x.unsqueeze(0)).softmax(1)[0]
            top = probs.topk(3)
            entry["top3"] = top.indices.tolist()
            entry["top3_scores"] = [round(v, 5) for v in top.values.tolist()]
        out["photos"][name] = entry
        print(name, entry.get("top3"), entry.get("top3_scores"))
    if model is not None:
        out["model"] = os.path.splitext(os.path.basename(os.path.realpath(args.model)))[0]
    with open(os.path.join(DATA, "golden", "golden.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
