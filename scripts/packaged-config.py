#!/usr/bin/python3
"""Writes a packaged labeld config from config/labeld.toml, the one config labeld ships: the same keys,
values and comments, with only the paths (and the comments about paths) of the place it is installed to.
So the .deb's /etc/labeld/labeld.toml, the container image's and what `make run` and `make bench` run
cannot drift apart (tests/packaging.rs checks the outputs differ from the source only in paths).

  scripts/packaged-config.py system    > labeld.toml   # the .deb's /etc/labeld/labeld.toml
  scripts/packaged-config.py container > labeld.toml   # the container image's
  scripts/packaged-config.py checkout --set output.csv=/tmp/r.csv ...   # any paths (the bench, tests)

A path key is `section.key` (`model.path`, `inbox.path`, `inbox.done_dir`, `inbox.quarantine`,
`output.csv`); a commented example line (`# done_dir = "../done"`) gets its new path too and stays a
comment. The comment lines right above a path key are its comment and may be replaced by the profile.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "config", "labeld.toml")

PATH_KEYS = ("model.path", "inbox.path", "inbox.done_dir", "inbox.quarantine", "output.csv")

# Where the .deb and the container image put labeld's model and folders.
INSTALLED = {
    "model.path": "/usr/share/labeld/models/default.pt",
    "inbox.path": "/var/lib/labeld/inbox",
    "inbox.quarantine": "/var/lib/labeld/rejects",
    "inbox.done_dir": "/var/lib/labeld/done",
}

PROFILES = {
    "checkout": {"header": None, "paths": {}, "comments": {}},
    "system": {
        "header": [
            "# labeld system configuration, installed by the .deb as /etc/labeld/labeld.toml (a conffile: your",
            "# edits survive upgrades). Apply changes with `systemctl reload labeld`; check them first with",
            "#   labeld check-config --config /etc/labeld/labeld.toml",
            "# Everything but the paths is config/labeld.toml of labeld's source, as `make run` runs it.",
        ],
        "paths": dict(INSTALLED, **{"output.csv": "/var/log/labeld/results.csv"}),
        "comments": {
            "model.path": [
                "# TorchScript or ONNX (.onnx) classifier: input N x 3 x crop x crop float (normalized as below), output",
                "# N x classes logits. The package ships the ImageNet-1k model it was built with; put your own under",
                "# /var/lib/labeld/models (readable by the labeld user) and name it here. Results name the model by",
                "# the real file's stem.",
            ],
        },
    },
    "container": {
        "header": [
            "# labeld in a container: the image's /etc/labeld/labeld.toml (`make image`). Everything labeld writes is",
            "# under the volume /var/lib/labeld; mount your own config folder at /etc/labeld to change any of it.",
            "# Check a config with the image's own binary:",
            "#   docker run --rm -v /srv/labeld-config:/etc/labeld:ro --entrypoint labeld labeld:<version> check-config",
            "# Everything but the paths is config/labeld.toml of labeld's source, as `make run` runs it.",
        ],
        # Everything labeld writes is in the image's one volume, /var/lib/labeld.
        "paths": dict(INSTALLED, **{"output.csv": "/var/lib/labeld/results.csv"}),
        "comments": {
            "model.path": [
                "# TorchScript or ONNX (.onnx) classifier: input N x 3 x crop x crop float (normalized as below), output",
                "# N x classes logits. The image ships the ImageNet-1k model it was built with; mount your own (e.g. at",
                "# /models) and name it here. Results name the model by the real file's stem.",
            ],
        },
    },
}

SECTION = re.compile(r"^\s*(?:#\s*)?\[\[?([A-Za-z_]+)\]\]?(\s|$)")
KEY = re.compile(r'^(\s*(?:#\s*)?)([A-Za-z_]+)(\s*=\s*)"([^"]*)"(.*)$')


def generate(text, header, paths, comments):
    """`text` with the header replaced, the values of the keys in `paths` replaced and the comment blocks
    right above the keys in `comments` replaced."""
    lines = text.split("\n")
    out = []
    first_section = next(i for i, l in enumerate(lines) if SECTION.match(l) and not l.lstrip().startswith("#"))
    if header is None:
        out += lines[:first_section]
    else:
        out += header + [""]
    section = None
    for line in lines[first_section:]:
        m = SECTION.match(line)
        if m:
            section = m.group(1)
        k = KEY.match(line)
        name = f"{section}.{k.group(2)}" if k else None
        if name in paths:
            prefix, key, eq, _, rest = k.groups()
            value = f"{prefix}{key}{eq}\"{paths[name]}\""
            comment = rest.lstrip()
            # The trailing comment stays in its column where the new value leaves room.
            column = len(line) - len(comment)
            line = value + (" " * max(column - len(value), 2) + comment if comment else rest)
            if name in comments:
                while out and out[-1].lstrip().startswith("#") and not SECTION.match(out[-1]):
                    out.pop()
                out += comments[name]
        out.append(line)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", choices=sorted(PROFILES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=PATH",
                    help=f"a path key's value ({', '.join(PATH_KEYS)}); overrides the profile's")
    ap.add_argument("--source", default=SOURCE)
    args = ap.parse_args()
    profile = PROFILES[args.profile]
    paths = dict(profile["paths"])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in PATH_KEYS:
            sys.exit(f"packaged-config: --set {item}: expected KEY=PATH with KEY one of {', '.join(PATH_KEYS)}")
        paths[key] = value
    with open(args.source, encoding="utf-8") as f:
        sys.stdout.write(generate(f.read(), profile["header"], paths, profile["comments"]))


if __name__ == "__main__":
    main()
