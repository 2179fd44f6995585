#!/usr/bin/env python3
"""Memory over a long run: N images through `labeld run --once` with the shipped config, RSS sampled.

The inbox holds N hard links to the bench's 1920×1080 photos (cheap on disk). labeld's RSS is read from
/proc every --every seconds; the table gives the median per tenth of the run, so growth shows as a rising
median. Run after `make bench` (which makes the bench models and photos):

  /usr/bin/python3 benches/soak.py [--model resnet18|lite0] [--count 50000] [--precision fp32]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the same photos, models and shipped-config handling)


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=sorted(bench.MODELS))
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    args = ap.parse_args()
    model = bench.MODELS[args.model]
    model_path = model.torchscript
    src = bench.photos("1920x1080", 300, "1920x1080")
    files = sorted(os.path.join(src, f) for f in os.listdir(src))
    with tempfile.TemporaryDirectory(prefix="labeld-soak-") as tmp:
        inbox = os.path.join(tmp, "inbox")
        os.mkdir(inbox)
        for i in range(args.count):
            os.link(files[i % len(files)], os.path.join(inbox, f"img{i:06d}.jpg"))
        conf = os.path.join(tmp, "soak.toml")
        bench.labeld_config(conf, model_path, args.precision, inbox, os.path.join(tmp, "soak.csv"))
        started = time.time()
        p = subprocess.Popen([bench.BIN, "run", "--once", "--config", conf],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "soak.log"), "w"))
        samples = []  # (seconds, images labelled so far, RSS MB)
        while p.poll() is None:
            time.sleep(args.every)
            r = rss_mb(p.pid)
            if r is not None:
                done = sum(1 for _ in open(os.path.join(tmp, "soak.csv"))) - 1 if os.path.exists(os.path.join(tmp, "soak.csv")) else 0
                samples.append((time.time() - started, done, r))
        took = time.time() - started
        if p.returncode != 0 or not samples:
            sys.exit(f"soak: labeld exited with {p.returncode}; log in {tmp}/soak.log")
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {bench.machine()}; model {model.title}, "
              f"{args.precision}; {args.count} images in {took:.0f} s ({args.count / took:.1f} images/s); "
              f"shipped config: {bench.workers_summary()}")
        print(f"command: /usr/bin/python3 benches/soak.py --model {args.model} --count {args.count} "
              f"--precision {args.precision}\n")
        print("| images labelled | samples | median RSS MB | min | max |\n| --- | --- | --- | --- | --- |")
        step = max(1, args.count // 10)
        for lo in range(0, args.count, step):
            part = [r for _, d, r in samples if lo <= d < lo + step]
            if part:
                print(f"| {lo}–{lo + step} | {len(part)} | {statistics.median(part):.0f} | {min(part):.0f} | {max(part):.0f} |")
        print(f"\nall samples: median {statistics.median(r for *_, r in samples):.0f} MB, "
              f"max {max(r for *_, r in samples):.0f} MB")


if __name__ == "__main__":
    main()
