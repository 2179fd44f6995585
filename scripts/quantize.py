#!/usr/bin/env python3
"""An int8 copy of an fp32 ONNX classifier, calibrated on your own images: ONNX Runtime's static
quantization to a QDQ file (int8 weights per output channel, uint8 activations), which labeld runs through
its ONNX Runtime backend like any ONNX model (`[model] path = "model.int8.onnx"`).

The calibration images go through labeld's own preprocessing (shorter side to --resize with bilinear
antialiasing as PIL does it, centre crop of --crop, RGB in [0, 1] normalised with --mean/--std), so the
ranges the quantizer measures are the ones labeld will feed. Use images like the ones the camera delivers:
a few dozen to a few hundred, covering the classes and the lighting you expect.

--weights chooses how weights are stored, which decides whether the CPU that runs the model computes
exactly. ONNX Runtime multiplies uint8 activations by int8 weights ("s8") exactly with VNNI instructions
(AVX-512 VNNI, AVX-VNNI); on CPUs without VNNI (plain AVX2 or AVX-512) its kernels add pairs of products
in 16 bits, which saturate, and a network with large weights loses labels there. "s7" (int8 weights in 7
bits, ONNX Runtime's reduce_range) cannot saturate and runs on the same kernels; "u8" (uint8 weights)
cannot either, but ONNX Runtime has no fast kernel for it on every layer. Measured on an AVX2-only EPYC,
2 threads, batch 4 (top-1 equal to fp32 on 300 photos; ms per image; fp32: Lite0 7.2, ResNet-18 22.8):
EfficientNet-Lite0 s8 78.0 % 4.9 ms, s7 87.7 % 4.8 ms, u8 94.7 % 46 ms; ResNet-18 (random weights)
s8 10.8 ms, s7 12.5 ms, u8 15.3 ms, 100 % each. "auto" (the default) takes "s8" when the CPU this script
runs on has VNNI, else "s7": quantize on the kind of CPU that will run the file, or choose.

--fp32-first N keeps the graph up to its N-th convolution in fp32: the first layers of small networks
(few channels, activations with a wide range) lose the most in int8, and cost the least to keep.

With --check DIR the script labels DIR's images with both files (ONNX Runtime, the same preprocessing) and
prints how often the int8 file's top-1 (and top-3 set) equals the fp32 file's; --min-agreement fails the
run (exit 1, nothing written) below that share.

  scripts/setup-quantize.sh     # once: onnxruntime, onnx, Pillow into .deps/quantize (cached)
  .deps/quantize/bin/python scripts/quantize.py MODEL.onnx CALIBRATION_DIR OUT.onnx \
      [--check DIR] [--min-agreement 0.99] [--count 200] [--method minmax|entropy|percentile] [--fp32-first N]
      [--weights auto|s8|u8|s7]
      [--resize 256] [--crop 224] [--mean 0.485 0.456 0.406] [--std 0.229 0.224 0.225]
"""
import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def log(msg):
    print(f"quantize: {msg}", file=sys.stderr, flush=True)


def images(folder, count):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        sys.exit(f"quantize: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    # Spread over the folder rather than its first `count` names, which may all be one scene.
    step = max(1, len(names) // count) if count else 1
    return [os.path.join(folder, n) for n in names[::step][: count or None]]


def preprocess(path, resize, crop, mean, std, nhwc):
    """One image as labeld feeds it: [1, 3, crop, crop] (or NHWC) float32."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        if w <= h:
            size = (resize, int(resize * h / w))
        else:
            size = (int(resize * w / h), resize)
        im = im.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
        im = im.crop((left, top, left + crop, top + crop))
        x = (np.asarray(im, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x[None]
    return x if nhwc else x.transpose(0, 3, 1, 2).copy()


def input_layout(path):
    import onnx

    model = onnx.load(path, load_external_data=False)
    inp = model.graph.input[0]
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    return inp.name, len(dims) == 4 and dims[3] == 3


def first_nodes(path, convs):
    """The names of the graph's nodes up to and including its `convs`-th Conv."""
    import onnx

    names, seen = [], 0
    for node in onnx.load(path, load_external_data=False).graph.node:
        if seen >= convs:
            break
        names.append(node.name)
        seen += node.op_type == "Conv"
    return names


def vnni():
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def top(session, name, x, k=3):
    logits = session.run(None, {name: x})[0][0]
    return list(np.argsort(-logits, kind="stable")[:k])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=200, help="calibration images used at most (0: all)")
    ap.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    ap.add_argument("--check", help="a folder of images to compare int8 with fp32 on")
    ap.add_argument("--fp32-first", type=int, default=0, metavar="N", help="keep nodes up to the N-th Conv in fp32")
    ap.add_argument("--weights", choices=("auto", "s8", "u8", "s7"), default="auto",
                    help="int8 weights (s8: exact on VNNI CPUs), int8 in 7 bits (s7: exact on every CPU), uint8 (u8: "
                         "exact on every CPU, slow on some layers); auto: s8 where this CPU has VNNI, else s7")
    ap.add_argument("--min-agreement", type=float, default=0.0, help="top-1 agreement on --check below this fails")
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406))
    ap.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225))
    a = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name, nhwc = input_layout(a.model)
    calibration = images(a.calibration, a.count)
    weights = a.weights if a.weights != "auto" else "s8" if vnni() else "s7"
    log(f"{a.model}: input {name!r} ({'NHWC' if nhwc else 'NCHW'}); calibrating on {len(calibration)} images of "
        f"{a.calibration} ({a.method}); weights {weights}" + (f" (this CPU {'has' if vnni() else 'has no'} VNNI)" if a.weights == "auto" else ""))
    prep = lambda p: preprocess(p, a.resize, a.crop, a.mean, a.std, nhwc)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.paths = iter(calibration)

        def get_next(self):
            p = next(self.paths, None)
            return None if p is None else {name: prep(p)}

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[a.method]
    out_dir = os.path.dirname(os.path.abspath(a.out))
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        inferred = os.path.join(tmp, "inferred.onnx")
        quant_pre_process(a.model, inferred, skip_symbolic_shape=False)
        partial = os.path.join(tmp, "int8.onnx")
        keep = first_nodes(inferred, a.fp32_first) if a.fp32_first else []
        if keep:
            log(f"keeping {len(keep)} nodes in fp32, up to convolution {a.fp32_first}")
        quantize_static(inferred, partial, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if weights == "u8" else QuantType.QInt8,
                        reduce_range=weights == "s7", calibrate_method=method,
                        nodes_to_exclude=keep, extra_options={"CalibTensorRangeSymmetric": False})
        if a.check:
            opts = ort.SessionOptions()
            fp32 = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
            int8 = ort.InferenceSession(partial, opts, providers=["CPUExecutionProvider"])
            checked = images(a.check, 0)
            same1 = same3 = 0
            for p in checked:
                x = prep(p)
                f, q = top(fp32, name, x), top(int8, name, x)
                same1 += f[0] == q[0]
                same3 += set(f) == set(q)
            n = len(checked)
            log(f"int8 vs fp32 on {n} images of {a.check}: top-1 equal {same1}/{n} ({same1 / n:.1%}), "
                f"top-3 set equal {same3}/{n} ({same3 / n:.1%})")
            if same1 / n < a.min_agreement:
                sys.exit(f"quantize: top-1 agreement {same1 / n:.1%} is below --min-agreement {a.min_agreement:.1%}; {a.out} not written")
        os.replace(partial, a.out)
    log(f"wrote {a.out} ({os.path.getsize(a.out) // 1024} KiB)")


if __name__ == "__main__":
    main()
