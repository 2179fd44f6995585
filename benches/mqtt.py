#!/usr/bin/env python3
"""Publishing to a real local Mosquitto: does it keep up with labelling, how fast does a backlog drain after
an outage, and what does a long outage cost in memory.

  1. Throughput: `labeld run --once` over --count hard links to the bench's 1920×1080 photos with the shipped
     config plus `[mqtt]` (QoS 1) and a live broker; a persistent QoS-1 subscriber counts the messages.
     Reports labelling images/s, messages/s and how far publishing trailed labelling.
  2. Outage: a daemon runs while the broker is down and its results log holds --backlog rows the broker has
     not seen (rows of run 1, appended to the log while labeld was stopped, after its checkpoint); RSS is
     sampled during the outage, then the broker starts and the time until every row is acknowledged
     (`labeld_mqtt_pending_rows` = 0) gives the replay speed.

Needs mosquitto (scripts/setup-system.sh) and the bench photos/models (`make bench` once):

  /usr/bin/python3 benches/mqtt.py [--count 5000] [--backlog 10000,100000] [--model resnet18|lite0]
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp, port):
        self.port, self.dir = port, os.path.join(tmp, "broker")
        os.makedirs(self.dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {self.dir}/\nmax_queued_messages 0\nmax_inflight_messages 0\n"
                    f"log_dest file {self.dir}/mosquitto.log\n")
        self.p = None

    def start(self):
        self.p = subprocess.Popen(["/usr/sbin/mosquitto", "-c", self.conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.p:
            self.p.terminate()
            self.p.wait()
            self.p = None


class Subscriber:
    """mosquitto_sub with a persistent session, one output line per message."""

    def __init__(self, tmp, port):
        self.out = os.path.join(tmp, "sub.txt")
        self.port = port
        self.p = None

    def start(self):
        self.p = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-c", "-i", "bench-sub",
                                   "-q", "1", "-t", "labeld/+/+/result", "-F", "%I"],
                                  stdout=open(self.out, "a"), stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def count(self):
        try:
            with open(self.out, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def stop(self):
        if self.p:
            self.p.terminate()
            self.p.wait()


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"labeld_{name} ") or line.startswith(f"labeld_{name}_total "):
                return float(line.split()[-1])
    return None


def config(path, model, inbox, csv_path, broker_port, http_port=None):
    bench.labeld_config(path, model, "fp32", inbox, csv_path)
    with open(path, "a") as f:
        f.write(f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\nhost = "bench"\nqos = 1\n')
        if http_port:
            f.write(f'\n[http]\nlisten = "127.0.0.1:{http_port}"\n')


def throughput(tmp, model, count, files):
    port = free_port()
    broker, sub = Broker(tmp, port), Subscriber(tmp, port)
    broker.start()
    sub.start()
    inbox = os.path.join(tmp, "inbox")
    os.mkdir(inbox)
    for i in range(count):
        os.link(files[i % len(files)], os.path.join(inbox, f"img{i:06d}.jpg"))
    conf, csv_path = os.path.join(tmp, "run.toml"), os.path.join(tmp, "results.csv")
    config(conf, model, inbox, csv_path, port)
    started = time.time()
    p = subprocess.run([bench.BIN, "run", "--once", "--config", conf], capture_output=True, text=True)
    labelled_at = time.time()
    while sub.count() < count and time.time() - labelled_at < 60:
        time.sleep(0.1)
    got = sub.count()
    last = time.time()
    sub.stop()
    broker.stop()
    ips = re.search(r'images_per_s="([0-9.]+)"', p.stderr)
    print(f"| run --once over {count} images, broker up | labelling {ips.group(1) if ips else '?'} images/s "
          f"in {labelled_at - started:.1f} s | {got} messages received; the last {last - labelled_at:.1f} s after "
          f"labeld exited (its stop publishes until caught up) | {got / (last - started):.0f} messages/s end to end |")
    return csv_path


def outage(tmp, model, source_csv, backlog):
    """A daemon with `backlog` unpublished rows and no broker, then the broker comes."""
    port, http = free_port(), free_port()
    d = os.path.join(tmp, f"outage-{backlog}")
    os.makedirs(os.path.join(d, "inbox"))
    conf, csv_path = os.path.join(d, "run.toml"), os.path.join(d, "results.csv")
    config(conf, model, os.path.join(d, "inbox"), csv_path, port, http)
    log = open(os.path.join(d, "labeld.log"), "w")
    # First start: creates the log and a checkpoint at its end. Then, while labeld is stopped, the backlog
    # is appended: rows labelled earlier and never published.
    p = subprocess.Popen([bench.BIN, "run", "--config", conf], stdout=log, stderr=log)
    wait_ready(http)
    p.terminate()
    p.wait()
    with open(source_csv) as f:
        rows = f.read().splitlines(keepends=True)[1:]
    with open(csv_path, "a") as f:
        for i in range(backlog):
            f.write(rows[i % len(rows)])
    p = subprocess.Popen([bench.BIN, "run", "--config", conf], stdout=log, stderr=log)
    wait_ready(http)
    samples = []
    for _ in range(20):
        samples.append(rss_mb(p.pid))
        time.sleep(0.5)
    pending_before = metric(http, "mqtt_pending_rows")
    broker = Broker(d, port)
    broker.start()
    t_up = time.time()
    while metric(http, "mqtt_connected") != 1 and time.time() - t_up < 120:
        samples.append(rss_mb(p.pid))
        time.sleep(0.05)
    t0 = time.time()
    while True:
        pending = metric(http, "mqtt_pending_rows")
        samples.append(rss_mb(p.pid))
        if pending == 0 or time.time() - t0 > 600:
            break
        time.sleep(0.05)
    took = time.time() - t0
    published = metric(http, "mqtt_published")
    p.terminate()
    p.wait()
    broker.stop()
    print(f"| outage with {backlog} rows waiting | RSS during the outage: median {statistics.median(samples[:20]):.0f} MB, "
          f"max {max(samples):.0f} MB over the outage and the replay | pending before the broker came: "
          f"{pending_before:.0f}; reconnected {t0 - t_up:.1f} s after the broker came back (back-off) | replayed "
          f"{published:.0f} rows in {took:.1f} s once connected: {published / took:.0f} rows/s |")


def wait_ready(http):
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("labeld did not become ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--backlog", default="10000,100000")
    ap.add_argument("--model", default="resnet18", choices=sorted(bench.MODELS))
    args = ap.parse_args()
    model = bench.MODELS[args.model].torchscript
    src = bench.photos("1920x1080", 300, "1920x1080")
    files = sorted(os.path.join(src, f) for f in os.listdir(src))
    with tempfile.TemporaryDirectory(prefix="labeld-mqtt-bench-") as tmp:
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {bench.machine()}; labeld {bench.revision()}; "
              f"model {os.path.basename(model)} fp32, shipped config + [mqtt] qos 1 to Mosquitto on loopback; "
              f"command: `/usr/bin/python3 benches/mqtt.py --count {args.count} --backlog {args.backlog}`\n")
        print("| run | labelling | publishing | |\n| --- | --- | --- | --- |")
        csv_path = throughput(tmp, model, args.count, files)
        for n in [int(x) for x in args.backlog.split(",") if x]:
            outage(tmp, model, csv_path, n)


if __name__ == "__main__":
    main()
