#!/usr/bin/env python3
"""`make bench`: labeld against the reference Python pipeline, same machine, same model, same files.

Prints a markdown table: images/s of both and the ratio, per-stage ms per image, top-1/top-3 agreement of
the faster variants with the exact fp32 path, p50/p99 latency (file ready → sidecar) at 5 images/s,
and peak RSS. Inputs are camera-like JPEGs made from real photographs (scripts/make_photos.py),
cached in ~/.cache/labeld/bench.

  python3 benches/bench.py [--count 300] [--big 30] [--latency-images 100] [--soak N]
"""
import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "labeld")
MODEL = os.path.join(ROOT, "models", "default.pt")
CACHE = os.path.expanduser("~/.cache/labeld/bench")
# config/labeld.toml's [workers] settings (the shipped default).
WORKERS = "count = 2\nthreads = 1\nmax_batch = 1\n"


def photos(name, count, size):
    d = os.path.join(CACHE, f"{name}-{count}")
    if not os.path.isdir(d) or len(os.listdir(d)) < count:
        subprocess.check_call(["/usr/bin/python3", os.path.join(ROOT, "scripts", "make_photos.py"), d,
                               "--count", str(count), "--size", size])
    return d


def timed(cmd, **kw):
    """Runs cmd under /usr/bin/time -v; returns (stdout, stderr, peak RSS in MB)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return p.stdout, p.stderr, rss


def config(path, inbox, csv_path, precision="fp32", scaled=False, extra=""):
    with open(path, "w") as f:
        f.write(f'[model]\npath = "{MODEL}"\nprecision = "{precision}"\nscaled_decode = {str(scaled).lower()}\n'
                f'[[inbox]]\npath = "{inbox}"\n[output]\ncsv = "{csv_path}"\n[workers]\n{WORKERS}{extra}')


def run_labeld(src, tmp, name, **cfg):
    inbox = os.path.join(tmp, name)
    shutil.copytree(src, inbox)
    csv_path = os.path.join(tmp, f"{name}.csv")
    conf = os.path.join(tmp, f"{name}.toml")
    config(conf, inbox, csv_path, **cfg)
    _, err, rss = timed([BIN, "run", "--once", "--config", conf])
    ips = float(re.search(r'images_per_s="?([0-9.]+)', err).group(1))
    stages = dict(re.findall(r"(read|decode|resize|inference|write)=([0-9.]+)", err.split("ms per image:")[-1]))
    return {"images_per_s": ips, "rss_mb": rss, "stages": {k: float(v) for k, v in stages.items()}, "csv": csv_path}


def run_reference(src, tmp):
    inbox = os.path.join(tmp, "reference")
    shutil.copytree(src, inbox)
    csv_path = os.path.join(tmp, "reference.csv")
    out, _, rss = timed(["/usr/bin/python3", os.path.join(ROOT, "benches", "reference.py"), MODEL, inbox, csv_path])
    r = json.loads(out.strip().splitlines()[-1])
    return {"images_per_s": r["images_per_s"], "rss_mb": rss, "stages": r["ms_per_image"], "csv": csv_path}


def tops(csv_path):
    with open(csv_path) as f:
        return {os.path.basename(r["path"]): (r["class1"], r["class2"], r["class3"]) for r in csv.DictReader(f)}


def agreement(a, b):
    ta, tb = tops(a), tops(b)
    keys = ta.keys() & tb.keys()
    top1 = sum(ta[k][0] == tb[k][0] for k in keys) / len(keys)
    top3 = sum(ta[k] == tb[k] for k in keys) / len(keys)
    return top1, top3


def latency(src, tmp, n, rate=5.0):
    """A running daemon, images renamed into its inbox at `rate` per second; latency from sidecars."""
    inbox, staging = os.path.join(tmp, "lat-inbox"), os.path.join(tmp, "lat-staging")
    os.makedirs(inbox)
    os.makedirs(staging)
    conf, csv_path = os.path.join(tmp, "lat.toml"), os.path.join(tmp, "lat.csv")
    config(conf, inbox, csv_path)
    log = open(os.path.join(tmp, "lat.log"), "w")
    d = subprocess.Popen([BIN, "run", "--config", conf], stderr=log)
    try:
        for _ in range(300):
            if "ready" in open(log.name).read():
                break
            time.sleep(0.05)
        files = sorted(os.listdir(src))[:n]
        for f in files:
            shutil.copy(os.path.join(src, f), os.path.join(staging, f))
        t0 = time.monotonic()
        for i, f in enumerate(files):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            os.rename(os.path.join(staging, f), os.path.join(inbox, f))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(os.path.exists(os.path.join(inbox, f + ".json")) for f in files):
            time.sleep(0.05)
        lat = [json.load(open(os.path.join(inbox, f + ".json")))["latency_ms"] for f in files]
    finally:
        d.terminate()
        d.wait()
    lat.sort()
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--big", type=int, default=30)
    ap.add_argument("--latency-images", type=int, default=100)
    args = ap.parse_args()
    hd = photos("1920x1080", args.count, "1920x1080")
    big = photos("4000x3000", args.big, "4000x3000")
    machine = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2; nproc"],
                             capture_output=True, text=True).stdout.split("\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_reference(hd, tmp)
        exact = run_labeld(hd, tmp, "fp32", precision="fp32")
        bf16 = run_labeld(hd, tmp, "bf16", precision="bf16")
        scaled = run_labeld(hd, tmp, "fp32-scaled", precision="fp32", scaled=True)
        bf16s = run_labeld(hd, tmp, "bf16-scaled", precision="bf16", scaled=True)
        big_ref = run_reference(big, os.path.join(tmp, "big") if os.makedirs(os.path.join(tmp, "big")) is None else tmp)
        big_lab = run_labeld(big, os.path.join(tmp, "big"), "fp32", precision="fp32")
        p50, p99 = latency(hd, tmp, args.latency_images)
        for name, r in [("reference (PIL + torchvision + PyTorch, batch 1)", ref), ("labeld fp32 (exact path)", exact),
                        ("labeld bf16", bf16), ("labeld fp32 + scaled JPEG decode", scaled),
                        ("labeld bf16 + scaled JPEG decode", bf16s)]:
            agree = "—" if r in (ref, exact) else "%.1f%% / %.1f%%" % tuple(100 * x for x in agreement(exact["csv"], r["csv"]))
            if r is ref:
                agree = "%.1f%% / %.1f%%" % tuple(100 * x for x in agreement(exact["csv"], ref["csv"]))
            s = r["stages"]
            rows.append(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / ref['images_per_s']:.2f}× | "
                        f"{s.get('read', 0):.2f} / {s.get('decode', 0):.2f} / {s.get('resize', 0):.2f} / "
                        f"{s.get('inference', 0):.2f} / {s.get('write', 0):.2f} | {agree} | {r['rss_mb']:.0f} |")
    model = os.path.splitext(os.path.basename(os.path.realpath(MODEL)))[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine[0].strip()}, {machine[1].strip()} cores; model {model}; "
          f"{args.count} JPEGs 1920×1080 q90 from real photos\n")
    print("| pipeline | images/s | vs reference | ms/image read / decode / resize / inference / write | top-1 / top-3 same as labeld fp32 | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\n4000×3000 ({args.big} JPEGs): reference {big_ref['images_per_s']:.2f} images/s, labeld fp32 "
          f"{big_lab['images_per_s']:.2f} images/s ({big_lab['images_per_s'] / big_ref['images_per_s']:.2f}×)")
    print(f"Latency file ready → sidecar at 5 images/s (labeld fp32, {args.latency_images} images): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
