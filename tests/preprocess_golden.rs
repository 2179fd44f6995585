//! Preprocessing pinned against torchvision: `scripts/make_golden.py` ran
//! Resize(256) → CenterCrop(224) → ToTensor → Normalize on real photos and stored the results in
//! tests/data/golden. labeld must agree within 0.02 per element of the normalized tensor.

use std::path::{Path, PathBuf};

use labeld::config::Preprocess;
use labeld::infer::preprocess::{Preprocessor, normalize_into};
use serde_json::Value;

const TOLERANCE: f32 = 0.02;

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

#[test]
fn labeld_matches_torchvision_on_real_photos() {
    let g = golden();
    let cfg = preprocess_cfg(&g);
    let mut pre = Preprocessor::new(cfg.clone());
    let photos = g["photos"].as_object().unwrap();
    assert!(photos.len() >= 6, "golden data covers too few photos");
    for (name, entry) in photos {
        let mut ours = Vec::new();
        let path = data(name);
        pre.load(path.parent().unwrap(), &path, &mut ours, &mut None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ours.len(), 3 * 224 * 224);

        // torchvision's crop, normalized with the same formula ToTensor + Normalize use.
        let stem = name.rsplit_once('.').unwrap().0;
        let crop = image::open(data(&format!("golden/{stem}.png"))).unwrap().into_rgb8();
        let mut theirs = Vec::new();
        normalize_into(crop.as_raw(), 224, &cfg.mean, &cfg.std, &mut theirs);

        let max_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let mean_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f32>() / ours.len() as f32;
        eprintln!("{name}: max |diff| {max_diff:.4}, mean |diff| {mean_diff:.5}");
        assert!(max_diff <= TOLERANCE, "{name}: max abs difference {max_diff} > {TOLERANCE}");

        // Values torchvision itself printed, independent of our normalize_into.
        for s in entry["samples"].as_array().unwrap() {
            let s = s.as_array().unwrap();
            let (c, y, x) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize, s[2].as_u64().unwrap() as usize);
            let want = s[3].as_f64().unwrap() as f32;
            let got = ours[(y * 224 + x) * 3 + c]; // HWC
            assert!((got - want).abs() <= TOLERANCE, "{name}[{c},{y},{x}]: {got} vs torchvision {want}");
        }
        for (c, want) in entry["channel_means"].as_array().unwrap().iter().enumerate() {
            let got = ours.iter().skip(c).step_by(3).sum::<f32>() / (224.0 * 224.0);
            let want = want.as_f64().unwrap() as f32;
            assert!((got - want).abs() <= 0.005, "{name} channel {c} mean {got} vs torchvision {want}");
        }
    }
}
