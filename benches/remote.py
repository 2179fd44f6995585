#!/usr/bin/python3
"""Remote inference on loopback vs the local model: images/s, the time a batch spends in the model (local
libtorch vs a round trip to MLServer running the same network's ONNX copy with onnxruntime), and bytes
per image on the wire. The server runs on the same box and shares its cores with labeld: the figures
show the protocol's cost, not what a GPU server would give.

Needs a release build, models/efficientnet_lite0.pt, scripts/setup-mlserver.sh (.deps/mlserver).

  /usr/bin/python3 benches/remote.py [--images 200] [--batch 8]
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/labeld")
MODEL = os.path.join(ROOT, "models/efficientnet_lite0.pt")
PHOTOS = ["chelsea.png", "coffee.jpg", "rocket.jpg", "camera.png"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work, onnx):
    grpc, http = free_port(), free_port()
    folder = os.path.join(work, "server", "lite0")
    os.makedirs(folder)
    shutil.copy(onnx, os.path.join(folder, "model.onnx"))
    shutil.copy(os.path.join(ROOT, "tests/data/remote/onnx_runtime.py"), folder)
    json.dump({"name": "lite0", "implementation": "onnx_runtime.OnnxModel", "parameters": {"uri": "./model.onnx"},
               "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
               "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]},
              open(os.path.join(folder, "model-settings.json"), "w"))
    json.dump({"host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "parallel_workers": 0,
               "metrics_endpoint": None, "grpc_max_message_length": 104857600},
              open(os.path.join(work, "server", "settings.json"), "w"))
    log = open(os.path.join(work, "mlserver.log"), "w")
    proc = subprocess.Popen([os.path.join(ROOT, ".deps/mlserver/bin/mlserver"), "start", os.path.join(work, "server")],
                            stdout=log, stderr=log)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/lite0/ready", timeout=1)
            return proc, grpc
        except Exception:
            time.sleep(0.2)
    proc.kill()
    sys.exit("mlserver did not become ready; see " + log.name)


def run(work, name, images, batch, remote):
    inbox = os.path.join(work, name, "inbox")
    os.makedirs(inbox)
    for i in range(images):
        p = PHOTOS[i % len(PHOTOS)]
        shutil.copy(os.path.join(ROOT, "tests/data", p), os.path.join(inbox, f"{i:05d}{os.path.splitext(p)[1]}"))
    config = os.path.join(work, name, "labeld.toml")
    with open(config, "w") as f:
        f.write(f'[model]\npath = "{MODEL}"\n[[inbox]]\npath = "inbox"\n[output]\ncsv = "results.csv"\n'
                f"[workers]\nmax_batch = {batch}\n{remote}")
    started = time.monotonic()
    out = subprocess.run([BIN, "run", "--once", "--config", config], capture_output=True, text=True,
                         env=dict(os.environ, LABELD_LOG="info"))
    wall = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(out.stderr)
    stopped = re.search(r"stopped ok=(\d+) errors=(\d+) seconds=([\d.]+) images_per_s=([\d.]+)", out.stderr)
    per_image = re.search(r"inference=([\d.]+)", out.stderr)
    return {"ok": int(stopped[1]), "errors": int(stopped[2]), "images_per_s": float(stopped[4]),
            "inference_ms_per_image": float(per_image[1]), "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="labeld-remote-bench-")
    try:
        onnx = os.path.splitext(MODEL)[0] + ".onnx"  # `make model` exports it beside the TorchScript file
        server, port = start_server(work, onnx)
        try:
            local = run(work, "local", a.images, a.batch, "")
            remote = run(work, "remote", a.images, a.batch,
                         f'[remote]\nservers = ["grpc://127.0.0.1:{port}"]\nmodel = "lite0"\n')
        finally:
            server.kill()
        tensor = 3 * 224 * 224 * 4
        print(f"{os.cpu_count()} CPUs, shared by labeld and MLServer 1.7.1 (onnxruntime, 1 thread); "
              f"EfficientNet-Lite0, {a.images} images, max_batch {a.batch}")
        print("| backend | images/s | model time per image (ms) | bytes per image on the wire |")
        print("| --- | --- | --- | --- |")
        print(f"| local libtorch | {local['images_per_s']:.1f} | {local['inference_ms_per_image']:.1f} | 0 |")
        print(f"| remote (gRPC, loopback) | {remote['images_per_s']:.1f} | {remote['inference_ms_per_image']:.1f} | "
              f"{tensor:,} up + {1000 * 4:,} down (raw FP32; gRPC/HTTP/2 framing adds < 0.1%) |")
        per_batch = lambda r: r["inference_ms_per_image"] * a.batch
        print(f"a batch of {a.batch} in the model: local {per_batch(local):.0f} ms, remote {per_batch(remote):.0f} ms "
              f"(encoding, the loopback round trip and the server's compute): added {per_batch(remote) - per_batch(local):+.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
