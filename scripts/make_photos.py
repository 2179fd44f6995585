#!/usr/bin/python3
"""Camera-like test images from real photographs: scikit-image's sample photos (from its PyPI wheel),
scaled and cropped to 1920x1080 (or --size) at random offsets, JPEG quality ~90.

  /usr/bin/python3 scripts/make_photos.py OUT_DIR [--count 300] [--size 1920x1080] [--seed 1]
"""
import argparse
import glob
import io
import os
import random
import subprocess
import sys
import zipfile

from PIL import Image

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "camera.png"]


def sources(cache):
    wheels = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
    if not wheels:
        os.makedirs(cache, exist_ok=True)
        pip = [sys.executable, "-m", "pip"]
        if subprocess.call(pip + ["--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0:
            pip = ["python3", "-m", "pip"]
        subprocess.check_call(pip + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", cache, "scikit-image"])
        wheels = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
    with zipfile.ZipFile(sorted(wheels)[-1]) as z:
        names = {os.path.basename(n): n for n in z.namelist() if "/data/" in n}
        return [(p, Image.open(io.BytesIO(z.read(names[p]))).convert("RGB")) for p in PHOTOS if p in names]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/labeld/wheels"))
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    rng = random.Random(args.seed)
    src = sources(args.cache)
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.count):
        name, img = src[i % len(src)]
        # Scale so the frame fits with a random margin, then crop a random window: every file differs.
        scale = max(w / img.width, h / img.height) * rng.uniform(1.0, 1.3)
        big = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        x, y = rng.randint(0, big.width - w), rng.randint(0, big.height - h)
        frame = big.crop((x, y, x + w, y + h))
        frame.save(os.path.join(args.out, f"{i:05d}_{name.rsplit('.', 1)[0]}.jpg"), quality=args.quality)
    print(f"make-photos: {args.count} images {w}x{h} in {args.out}")


if __name__ == "__main__":
    main()
