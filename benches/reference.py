#!/usr/bin/python3
"""The reference pipeline labeld replaces: PIL + torchvision transforms + PyTorch, one image at a time.

For every image in a folder: PIL open → RGB → Resize(256) → CenterCrop(224) → ToTensor → Normalize →
the same TorchScript model, batch 1 → softmax top-3 → JSON sidecar beside the image + a CSV row.
Prints one JSON line of figures (images/s, per-stage ms per image) on stdout.

With --runtime openvino, the same with OpenVINO (PyPI, .deps/bench-py) on the ONNX file. With --runtime
openvino-async, OpenVINO as its docs set up throughput: the THROUGHPUT hint and an AsyncInferQueue of the
plugin's optimal number of requests; this thread reads and preprocesses the next images while earlier ones
run, and each result's sidecar and row are written as it completes (no --gap; per-stage figures cover
this thread's own work, and "inference" is its wait for a free request).

With --runtime onnxruntime, MODEL is an ONNX file (benches/export_models.py) run by onnxruntime (PyPI,
.deps/bench-py) with the same threads, the same PIL + torchvision preprocessing and the same outputs:
the speed-up the original article suggests before rewriting anything.

With --gap SECONDS it waits that long before each image, as a service that sees one image at a time
does, and also prints each image's time from opening the file to its JSON written (p50, p90).

  /usr/bin/python3 benches/reference.py MODEL FOLDER CSV [--threads 2] [--gap S]
                                       [--runtime torch|onnxruntime|openvino|openvino-async]
"""
import argparse
import csv
import io
import json
import os
import sys
import time

import torch
from PIL import Image
from torchvision import transforms

LABELS = os.path.join(os.path.dirname(__file__), "..", "src", "infer", "imagenet_classes.txt")


def torch_model(path, threads):
    """PyTorch on the TorchScript file: a function from a 1×3×224×224 tensor to logits."""
    module = torch.jit.load(path).eval()

    def run(x):
        with torch.no_grad():
            return module(x)

    return run


def onnx_model(path, threads):
    """onnxruntime's CPU provider on the ONNX file, `threads` intra-op threads, as its docs set it up."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def openvino_model(path, threads):
    """OpenVINO's CPU plugin on the ONNX file, `threads` inference threads, latency hint, batch 1."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})

    def run(x):
        return torch.from_numpy(compiled(x.numpy())[0])

    return run


def openvino_queue(path, threads):
    """OpenVINO's CPU plugin on the ONNX file, `threads` inference threads, throughput hint, and an
    AsyncInferQueue of the plugin's optimal number of requests."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "THROUGHPUT"})
    return openvino.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("folder")
    ap.add_argument("csv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino", "openvino-async"], default="torch")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds of idleness before each image")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = open(LABELS).read().splitlines()
    queue = openvino_queue(args.model, args.threads) if args.runtime == "openvino-async" else None
    if queue is not None:
        if args.gap:
            sys.exit("reference: --gap measures one image at a time; openvino-async is for throughput")

        def model(x):  # the warm-up below, through the queue's requests
            queue.start_async(x.numpy())
            queue.wait_all()
    else:
        model = {"torch": torch_model, "onnxruntime": onnx_model, "openvino": openvino_model}[args.runtime](args.model, args.threads)
    name = os.path.splitext(os.path.basename(os.path.realpath(args.model)))[0]
    resize = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    files = sorted(
        os.path.join(args.folder, f)
        for f in os.listdir(args.folder)
        if f.lower().endswith((".jpg", ".jpeg", ".png")) and not f.startswith(".")
    )
    for _ in range(6):  # warm-up, as a long-running service would be: TorchScript optimises after a few calls
        model(torch.zeros(1, 3, 224, 224))
    stages = {"read": 0.0, "decode": 0.0, "resize": 0.0, "inference": 0.0, "write": 0.0}
    new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
    out = open(args.csv, "a", newline="")
    w = csv.writer(out)
    if new:
        w.writerow(["time", "path", "status", "class1", "label1", "score1", "class2", "label2", "score2",
                    "class3", "label3", "score3", "latency_ms", "error", "model"])
    start = time.perf_counter()
    idle = 0.0
    per_image = []

    def finish(path, logits, t0, t4):
        """Top-3 of one image's logits → its sidecar and CSV row; the write stage and its whole time."""
        top = logits.softmax(1)[0].topk(3)
        ids, scores = top.indices.tolist(), top.values.tolist()
        rec = {"path": path, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": name,
               "status": "ok",
               "top": [{"rank": i + 1, "class_id": c, "label": labels[c], "score": round(s, 6)}
                       for i, (c, s) in enumerate(zip(ids, scores))],
               "latency_ms": round((time.perf_counter() - t0) * 1e3, 1)}
        tmp = path + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path + ".json")
        row = [rec["time"], path, "ok"]
        for c, s in zip(ids, scores):
            row += [c, labels[c], f"{s:.6f}"]
        w.writerow(row + [rec["latency_ms"], "", name])
        out.flush()
        t5 = time.perf_counter()
        stages["write"] += t5 - t4
        per_image.append((t5 - t0) * 1e3)

    if queue is not None:
        # Callbacks run on OpenVINO's threads, one at a time per queue.
        queue.set_callback(lambda request, job: finish(job[0], torch.from_numpy(request.get_output_tensor(0).data.copy()),
                                                       job[1], time.perf_counter()))
    for path in files:
        if args.gap:
            time.sleep(args.gap)
            idle += args.gap
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        t1 = time.perf_counter()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        t2 = time.perf_counter()
        x = to_tensor(resize(img)).unsqueeze(0)
        t3 = time.perf_counter()
        if queue is not None:
            queue.start_async(x.numpy(), (path, t0))
            stages["inference"] += time.perf_counter() - t3
        else:
            logits = model(x)
            t4 = time.perf_counter()
            stages["inference"] += t4 - t3
            finish(path, logits, t0, t4)
        for k, a, b in (("read", t0, t1), ("decode", t1, t2), ("resize", t2, t3)):
            stages[k] += b - a
    if queue is not None:
        queue.wait_all()
    secs = time.perf_counter() - start - idle
    n = len(files)
    per_image.sort()
    print(json.dumps({"images": n, "seconds": round(secs, 3), "images_per_s": round(n / secs, 2),
                      "ms_per_image": {k: round(v / n * 1e3, 2) for k, v in stages.items()},
                      "image_ms_p50": round(per_image[n // 2], 1), "image_ms_p90": round(per_image[min(n - 1, n * 9 // 10)], 1)}))


if __name__ == "__main__":
    sys.exit(main())
