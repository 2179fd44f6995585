//! Preprocessing pinned against the reference pipeline: `scripts/make_golden.py` ran PIL 9.4 +
//! torchvision's Resize(256) → CenterCrop(224) → ToTensor → Normalize on real photos and stored the
//! results in tests/data/golden. labeld must give the same bytes after resize and crop, and the same
//! float32 values after normalising, bit for bit. The decode itself is compared with PIL's, run here.

use std::path::{Path, PathBuf};
use std::process::Command;

use labeld::config::Preprocess;
use labeld::infer::preprocess::{Preprocessor, normalize_into};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(data("golden/golden.json")).unwrap()).unwrap()
}

fn preprocess_cfg(g: &Value) -> Preprocess {
    let arr = |k: &str| {
        let v: Vec<f32> = g[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        [v[0], v[1], v[2]]
    };
    Preprocess {
        resize: g["resize"].as_u64().unwrap() as u32,
        crop: g["crop"].as_u64().unwrap() as u32,
        mean: arr("mean"),
        std: arr("std"),
        scaled_decode: false, // the exact path
        ..Preprocess::default()
    }
}

/// The golden script's hash: 64-bit FNV-1a of the float32 values, little-endian.
fn fnv1a64(values: impl Iterator<Item = f32>) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in values.flat_map(f32::to_le_bytes) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// labeld's tensor for a golden photo (HWC).
fn labeld_tensor(pre: &mut Preprocessor, name: &str) -> Vec<f32> {
    let mut ours = Vec::new();
    let path = data(name);
    pre.load(path.parent().unwrap(), &path, &mut ours, &mut None).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(ours.len(), 3 * 224 * 224);
    ours
}

#[test]
fn resize_and_crop_give_torchvisions_bytes_and_the_tensor_its_floats() {
    let g = golden();
    let cfg = preprocess_cfg(&g);
    let mut pre = Preprocessor::new(cfg.clone());
    let photos = g["photos"].as_object().unwrap();
    assert!(photos.len() >= 6, "golden data covers too few photos");
    for (name, entry) in photos {
        let ours = labeld_tensor(&mut pre, name);

        // The bytes after resize and crop: torchvision's crop, bit for bit.
        let stem = name.rsplit_once('.').unwrap().0;
        let crop = image::open(data(&format!("golden/{stem}.png"))).unwrap().into_rgb8();
        let decoded = pre.decode(&std::fs::read(data(name)).unwrap()).unwrap();
        let ours_crop = pre.resize_and_crop(decoded).unwrap();
        let differing = ours_crop.iter().zip(crop.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!((ours_crop.len(), differing), (224 * 224 * 3, 0), "{name}: bytes differ from torchvision's crop");
        let mut from_crop = Vec::new();
        normalize_into(crop.as_raw(), 224, &cfg.mean, &cfg.std, &mut from_crop);
        assert!(ours.iter().zip(&from_crop).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: load() differs from decode + resize_and_crop");

        // The float32 tensor: torchvision's own, hashed in CHW order.
        let chw = (0..3).flat_map(|c| ours.iter().skip(c).step_by(3).copied());
        assert_eq!(fnv1a64(chw), entry["tensor_fnv1a64"].as_str().unwrap(), "{name}: normalized tensor differs from torchvision's");

        // Values torchvision itself printed (rounded to 6 places).
        for s in entry["samples"].as_array().unwrap() {
            let s = s.as_array().unwrap();
            let (c, y, x) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize, s[2].as_u64().unwrap() as usize);
            let want = s[3].as_f64().unwrap() as f32;
            let got = ours[(y * 224 + x) * 3 + c]; // HWC
            assert!((got - want).abs() <= 1e-6, "{name}[{c},{y},{x}]: {got} vs torchvision {want}");
        }
    }
}

#[test]
fn normalisation_equals_totensor_and_normalize_for_every_byte() {
    let g = golden();
    let cfg = preprocess_cfg(&g);
    let ramp: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
    let mut ours = Vec::new();
    normalize_into(&ramp, 16, &cfg.mean, &cfg.std, &mut ours);
    let table = g["normalize_table"].as_array().unwrap();
    for (c, row) in table.iter().enumerate() {
        for (v, want) in row.as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap() as f32; // an f32 printed exactly
            let got = ours[v * 3 + c];
            assert_eq!(got.to_bits(), want.to_bits(), "channel {c}, byte {v}: {got} vs torch {want}");
        }
    }
}

/// PIL's `Image.open(p).convert("RGB")` of each file: (width, height, bytes), run by Debian's python3.
fn pil_rgb(paths: &[PathBuf]) -> Vec<(u32, u32, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let script = "import sys\nfrom PIL import Image\nfor i, p in enumerate(sys.argv[2:]):\n    \
                  im = Image.open(p).convert('RGB')\n    \
                  open('%s/%d.rgb' % (sys.argv[1], i), 'wb').write(b'%d %d\\n' % im.size + im.tobytes())\n";
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(dir.path()).args(paths).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "PIL failed: {}", String::from_utf8_lossy(&out.stderr));
    (0..paths.len())
        .map(|i| {
            let raw = std::fs::read(dir.path().join(format!("{i}.rgb"))).unwrap();
            let nl = raw.iter().position(|&b| b == b'\n').unwrap();
            let head = std::str::from_utf8(&raw[..nl]).unwrap();
            let (w, h) = head.split_once(' ').unwrap();
            (w.parse().unwrap(), h.parse().unwrap(), raw[nl + 1..].to_vec())
        })
        .collect()
}

/// Variants of a real photo in the layouts PIL opens differently, written by PIL itself (JPEG chroma
/// subsamplings, progressive, grayscale, Adobe CMYK; PNG gray+alpha, palette with transparency,
/// 1-bit; BMP, TIFF, WebP lossless and lossy, GIF) and by the image crate (16-bit RGB and RGBA PNGs,
/// which PIL cannot write). 16-bit grayscale is the one documented difference (see tests/decode.rs).
fn variants(dir: &Path) -> Vec<PathBuf> {
    let script = "import sys, os\nfrom PIL import Image\nd = sys.argv[1]\n\
                  src = Image.open(sys.argv[2]).convert('RGB')\n\
                  src.save(os.path.join(d, 'j420.jpg'), quality=90)\n\
                  src.save(os.path.join(d, 'j422.jpg'), quality=90, subsampling=1)\n\
                  src.save(os.path.join(d, 'j444.jpg'), quality=90, subsampling=0)\n\
                  src.save(os.path.join(d, 'jprog.jpg'), quality=85, progressive=True)\n\
                  src.crop((0, 0, 333, 211)).save(os.path.join(d, 'odd.jpg'), quality=75)\n\
                  src.convert('L').save(os.path.join(d, 'gray.jpg'), quality=90)\n\
                  src.convert('CMYK').save(os.path.join(d, 'cmyk.jpg'), quality=90)\n\
                  src.convert('LA').save(os.path.join(d, 'la.png'))\n\
                  src.quantize(colors=64).save(os.path.join(d, 'trns.png'), transparency=3)\n\
                  src.convert('1').save(os.path.join(d, 'bw.png'))\n\
                  src.save(os.path.join(d, 'rgb.bmp'))\n\
                  src.save(os.path.join(d, 'rgb.tif'))\n\
                  src.save(os.path.join(d, 'lossless.webp'), lossless=True)\n\
                  src.save(os.path.join(d, 'lossy.webp'), quality=80)\n\
                  src.save(os.path.join(d, 'dither.gif'))\n";
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(dir).arg(data("rocket.jpg")).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "PIL failed: {}", String::from_utf8_lossy(&out.stderr));
    let cat = image::open(data("chelsea.png")).unwrap().into_rgb8();
    // Low bytes that differ from the high ones, so that rounding and truncating to 8 bits disagree.
    let deep = |v: u8, salt: u16| u16::from(v) << 8 | (u16::from(v) * 37 + salt) & 0xFF;
    image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(cat.width(), cat.height(), |x, y| {
        let p = cat.get_pixel(x, y);
        image::Rgb([deep(p[0], 1), deep(p[1], 2), deep(p[2], 3)])
    })
    .save(dir.join("rgb16.png"))
    .unwrap();
    image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(cat.width(), cat.height(), |x, y| {
        let p = cat.get_pixel(x, y);
        image::Rgba([deep(p[0], 4), deep(p[1], 5), deep(p[2], 6), (x * 100) as u16])
    })
    .save(dir.join("rgba16.png"))
    .unwrap();
    let names = [
        "j420.jpg", "j422.jpg", "j444.jpg", "jprog.jpg", "odd.jpg", "gray.jpg", "cmyk.jpg", "la.png", "trns.png", "bw.png",
        "rgb16.png", "rgba16.png", "rgb.bmp", "rgb.tif", "lossless.webp", "lossy.webp", "dither.gif",
    ];
    names.iter().map(|n| dir.join(n)).collect()
}

#[test]
fn decode_gives_pils_rgb_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths: Vec<PathBuf> = ["coffee.jpg", "rocket.jpg", "coffee_cmyk.jpg", "chelsea.png", "camera.png", "chelsea_palette.png", "chelsea_rgba.png"]
        .iter()
        .map(|n| data(n))
        .collect();
    paths.extend(variants(dir.path()));
    let mut pre = Preprocessor::new(preprocess_cfg(&golden()));
    for (path, (w, h, want)) in paths.iter().zip(pil_rgb(&paths)) {
        let name = path.file_name().unwrap().to_string_lossy();
        let got = pre.decode(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dimensions(), (w, h), "{name}");
        let differing = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} bytes differ from PIL's convert(\"RGB\")");
    }
}
