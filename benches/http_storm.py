#!/usr/bin/env python3
"""labeld's HTTP endpoint under hostile load: stop time, /healthz answer times and RSS around upload storms.

Runs the real daemon (the shipped config with an `[http]` table on a loopback port) and measures:

1. Stop time: 20 clients each send the headers of a 5 MB `POST /predict` and 100 kB of its body, then hold
   the connection; SIGTERM; seconds until labeld has exited.
2. A storm: RSS at idle; then 300 connections that send half a request line and hold it, while 200
   clients post a 5 MB PNG each (all at once); /healthz is asked every 20 ms throughout (answer time, worst
   and 99th percentile); RSS sampled every 100 ms (peak) and 30 s after the storm ended.
3. Five rounds of 500 small uploads at concurrency 50, RSS after each round and 30 s after the last.

Run after `make bench` (which makes the bench models):

  /usr/bin/python3 benches/http_storm.py [--model resnet18|lite0]
"""
import argparse
import http.client
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def png(width, height, seed):
    """An RGB PNG of noise (so it does not compress): about width × height × 3 bytes."""
    rnd = bytearray(os.urandom(width * 3 * 16))
    raw = bytearray()
    for y in range(height):
        raw += b"\x00" + rnd[(y * 7 + seed) % 16 * width * 3:][:width * 3].ljust(width * 3, b"\x80")
    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw), 0)) + chunk(b"IEND", b"")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, tmp, model_path):
        self.port = free_port()
        inbox = os.path.join(tmp, "inbox")
        os.makedirs(inbox, exist_ok=True)
        self.conf = os.path.join(tmp, "storm.toml")
        bench.labeld_config(self.conf, model_path, "fp32", inbox, os.path.join(tmp, "storm.csv"))
        with open(self.conf, "a") as f:
            f.write(f'[http]\nlisten = "127.0.0.1:{self.port}"\n')
        self.log = os.path.join(tmp, "storm.log")
        self.p = subprocess.Popen([bench.BIN, "run", "--config", self.conf], stdout=subprocess.DEVNULL,
                                  stderr=open(self.log, "a"))
        deadline = time.time() + 120
        while self.get("/readyz")[0] != 200:
            if self.p.poll() is not None or time.time() > deadline:
                sys.exit(f"labeld did not become ready; log {self.log}")
            time.sleep(0.05)

    def get(self, path, timeout=5):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            return r.status, None
        except OSError as e:
            return None, e

    def post(self, body):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            c.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
            r = c.getresponse()
            r.read()
            c.close()
            return r.status
        except OSError:
            return None

    def rss(self):
        return rss_mb(self.p.pid)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=60)


def half_open_uploads(port, n, size):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n".encode()
                  + b"\0" * 100_000)
        socks.append(s)
    return socks


def stop_time(tmp, model_path):
    d = Daemon(os.path.join(tmp, "stop"), model_path)
    socks = half_open_uploads(d.port, 20, 5_000_000)
    time.sleep(1)  # the bodies reach labeld and its uploads wait for the rest
    t = time.monotonic()
    d.p.send_signal(signal.SIGTERM)
    d.p.wait(timeout=60)
    took = time.monotonic() - t
    for s in socks:
        s.close()
    return took, d.p.returncode


class Prober(threading.Thread):
    """Asks /healthz every 20 ms; keeps each answer time (a failure counts as its timeout, 5 s)."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.times, self.failed, self.done = d, [], 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            t = time.monotonic()
            status, _ = self.d.get("/healthz")
            self.times.append(time.monotonic() - t)
            if status != 200:
                self.failed += 1
            time.sleep(0.02)


class Sampler(threading.Thread):
    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.peak, self.done = d, 0.0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.d.rss() or 0)
            time.sleep(0.1)


def storm(tmp, model_path):
    d = Daemon(os.path.join(tmp, "storm"), model_path)
    time.sleep(5)  # idle: nothing arrives
    idle = d.rss()
    big = [png(1700, 1000, i) for i in range(4)]
    small = [png(320, 240, i) for i in range(4)]
    prober, sampler = Prober(d), Sampler(d)
    prober.start()
    sampler.start()
    held = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(b"GET /heal")
        held.append(s)
    t = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(lambda i: d.post(big[i % 4]), range(200)))
    storm_s = time.monotonic() - t
    for s in held:
        s.close()
    peak_storm = sampler.peak
    time.sleep(30)  # RSS 30 s after the storm
    after_storm = d.rss()
    prober.done.set()
    prober.join()
    rounds = []
    for r in range(5):
        with ThreadPoolExecutor(50) as pool:
            small_codes = list(pool.map(lambda i: d.post(small[i % 4]), range(500)))
        rounds.append((d.rss(), sum(c == 200 for c in small_codes)))
    time.sleep(30)  # RSS 30 s after the last round
    after_rounds = d.rss()
    sampler.done.set()
    d.stop()
    return {
        "idle": idle, "peak_storm": peak_storm, "after_storm": after_storm, "storm_s": storm_s,
        "codes": {c: codes.count(c) for c in set(codes)}, "big_mb": len(big[0]) / 1e6,
        "healthz": prober.times, "healthz_failed": prober.failed, "rounds": rounds, "after_rounds": after_rounds,
        "peak": sampler.peak,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=sorted(bench.MODELS))
    args = ap.parse_args()
    model = bench.MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="labeld-storm-") as tmp:
        took, rc = stop_time(tmp, model.torchscript)
        r = storm(tmp, model.torchscript)
    h = sorted(r["healthz"])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {bench.machine()}; model {model.title}, fp32; "
          f"shipped config: {bench.workers_summary()}")
    print(f"command: /usr/bin/python3 benches/http_storm.py --model {args.model}\n")
    print(f"- stop with 20 half-sent 5 MB uploads held open: SIGTERM → exit {took:.2f} s (exit code {rc})")
    print(f"- storm: 200 × {r['big_mb']:.1f} MB PNG posted at once, 300 half-open connections held: "
          f"{r['storm_s']:.1f} s, answers {r['codes']}")
    print(f"- /healthz during the storm and the 30 s after: {len(h)} asked, {r['healthz_failed']} not 200, "
          f"median {statistics.median(h) * 1000:.1f} ms, p99 {h[int(len(h) * 0.99)] * 1000:.1f} ms, "
          f"worst {h[-1] * 1000:.1f} ms")
    print(f"- RSS: idle {r['idle']:.0f} MB, storm peak {r['peak_storm']:.0f} MB, 30 s after {r['after_storm']:.0f} MB")
    print("- 5 rounds of 500 small uploads at concurrency 50, RSS after each: "
          + " → ".join(f"{m:.0f} MB ({ok} ok)" for m, ok in r["rounds"])
          + f"; 30 s after the last: {r['after_rounds']:.0f} MB; peak over all {r['peak']:.0f} MB")


if __name__ == "__main__":
    main()
