//! ONNX models through ONNX Runtime, the real library from PyPI's wheel (scripts/setup-onnxruntime.sh):
//! the exported EfficientNet-Lite0 labels the golden photos as libtorch does; the hostile models that
//! ONNX can express behave as they do through libtorch (refused at load naming the mismatch, or an
//! error record for the image at fault while its batch-mates are labelled); a reload swaps between a
//! TorchScript and an ONNX model while images arrive; config errors name their key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

/// A set-up whose model is the ONNX test model `kind` at models/<kind>.onnx.
fn onnx_setup(kind: &str, workers: &str) -> Setup {
    let s = Setup::new("channel_mean", "").with_workers(workers);
    let file = s.dir.path().join(format!("models/{kind}.onnx"));
    onnx_model(&file, kind);
    s.edit_config("models/channel_mean.pt", &format!("models/{kind}.onnx"));
    s
}

fn colours(s: &Setup, copies: usize) -> Vec<(PathBuf, u64)> {
    let mut images = Vec::new();
    for i in 0..copies {
        for (name, rgb, class) in [("red", RED, 0), ("green", GREEN, 1), ("blue", BLUE, 2)] {
            let p = s.inbox.join(format!("{name}-{i}.png"));
            solid(&p, rgb, 64, 48);
            images.push((p, class));
        }
    }
    images
}

#[test]
fn lite0_through_onnx_runtime_gives_libtorchs_top3_on_every_golden_photo() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pt = std::fs::canonicalize(root.join("models/default.pt")).expect("models/default.pt: run `make model`");
    let onnx = pt.with_extension("onnx");
    assert!(onnx.exists(), "{} is missing: run `make model` (scripts/setup-model.sh exports it)", onnx.display());
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("tests/data/golden/golden.json")).unwrap()).unwrap();
    let photos: Vec<&String> = golden["photos"].as_object().unwrap().keys().collect();
    let mut by_engine = HashMap::new();
    for (engine, model) in [("libtorch", &pt), ("onnxruntime", &onnx)] {
        let s = Setup::new("channel_mean", "");
        s.edit_config("models/channel_mean.pt", model.to_str().unwrap());
        for p in &photos {
            std::fs::copy(root.join("tests/data").join(p), s.inbox.join(p)).unwrap();
        }
        let out = s.run_once();
        assert!(out.status.success(), "{engine}: {}", String::from_utf8_lossy(&out.stderr));
        let sides: Vec<serde_json::Value> = photos.iter().map(|p| read_sidecar(&s.inbox.join(p))).collect();
        assert!(sides.iter().all(|side| side["status"] == "ok" && side["engine"] == engine), "{sides:?}");
        assert_eq!(s.rows().len(), photos.len());
        by_engine.insert(engine, sides);
    }
    for (i, photo) in photos.iter().enumerate() {
        let (torch, ort) = (&by_engine["libtorch"][i]["top"], &by_engine["onnxruntime"][i]["top"]);
        for rank in 0..3 {
            assert_eq!(torch[rank]["class_id"], ort[rank]["class_id"], "{photo} rank {}: libtorch {torch}, ONNX Runtime {ort}", rank + 1);
            let (a, b) = (torch[rank]["score"].as_f64().unwrap(), ort[rank]["score"].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{photo} rank {}: score {a} (libtorch) vs {b} (ONNX Runtime)", rank + 1);
        }
    }
}

#[test]
fn nchw_nhwc_and_batch_one_models_label_a_backlog() {
    for kind in ["channel_mean", "channel_mean_nhwc", "batch1"] {
        let s = onnx_setup(kind, "count = 2\nmax_batch = 4\n");
        let images = colours(&s, 3);
        let out = s.run_once();
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        for (p, class) in &images {
            let side = read_sidecar(p);
            assert_eq!((side["status"].as_str(), top1(&side).0, side["engine"].as_str()), (Some("ok"), *class, Some("onnxruntime")), "{kind} {}", p.display());
            assert_eq!(side["model"], kind);
        }
        assert_eq!(s.rows().len(), images.len(), "{kind}");
    }
}

#[test]
fn a_model_that_fails_or_gives_nan_on_one_image_gives_that_image_an_error_and_labels_its_batch_mates() {
    for (kind, says) in [("fails_on_bright", "Gather"), ("nan_on_bright", "output has NaN or infinite values")] {
        let s = onnx_setup(kind, "count = 1\nmax_batch = 11\n");
        s.edit_config("max_delay_ms = 20", "max_delay_ms = 300");
        let images = colours(&s, 3);
        for w in ["white-0.png", "white-1.png"] {
            solid(&s.inbox.join(w), [255, 255, 255], 64, 48);
        }
        let out = s.run_once();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kind}: exit {:?}\n{log}", out.status);
        assert!(log.contains("splitting it to find the image at fault"), "{kind}: no bright image shared a batch:\n{log}");
        for w in ["white-0.png", "white-1.png"] {
            let white = read_sidecar(&s.inbox.join(w));
            assert_eq!(white["status"], "error", "{white}");
            let e = white["error"].as_str().unwrap();
            assert!(e.contains("the model failed on this image") && e.contains(says), "{kind}: {e}");
        }
        for (p, class) in &images {
            let side = read_sidecar(p);
            assert_eq!((side["status"].as_str(), top1(&side).0), (Some("ok"), *class), "{kind} {}: {side}", p.display());
        }
        assert_eq!(s.rows().len(), 11);
    }
}

#[test]
fn models_that_do_not_fit_are_refused_at_load_naming_the_mismatch() {
    let cases = [
        ("output_rank3", "found output \"logits\" f32 [?, 1000, 1]"),
        ("input_112", "found input \"input\" f32 [?, 3, 112, 112]"),
        ("input_flat", "found input \"input\" f32 [?, 150528]"),
        ("ten_classes", "model has 10 classes but the label list has 1000"),
        ("not_onnx", "ONNX Runtime cannot load it"),
    ];
    for (kind, says) in cases {
        let s = if kind == "not_onnx" {
            let s = onnx_setup("channel_mean", "count = 1\n");
            std::fs::write(s.dir.path().join("models/channel_mean.onnx"), b"this is a TorchScript file, honest").unwrap();
            s
        } else {
            onnx_setup(kind, "count = 1\n")
        };
        solid(&s.inbox.join("red.png"), RED, 32, 32);
        let out = s.run_once();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind} was accepted:\n{err}");
        assert!(err.contains("cannot load model") && err.contains(says), "{kind}:\n{err}");
        assert!(!sidecar(&s.inbox.join("red.png")).exists(), "{kind}: a refused model labelled an image");
    }
}

#[test]
fn a_missing_onnx_runtime_library_is_a_fatal_error_saying_where_it_looked() {
    let s = onnx_setup("channel_mean", "count = 1\n");
    let out = s.labeld().env("LABELD_ONNXRUNTIME", "/nonexistent/libonnxruntime.so").args(["run", "--once", "--config"]).arg(&s.config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("LABELD_ONNXRUNTIME=/nonexistent/libonnxruntime.so is not a file"), "{err}");
    // A TorchScript model never needs the library.
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("red.png"), RED, 32, 32);
    let out = s.labeld().env("LABELD_ONNXRUNTIME", "/nonexistent/libonnxruntime.so").args(["run", "--once", "--config"]).arg(&s.config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_sidecar(&s.inbox.join("red.png"))["engine"], "libtorch");
}

#[test]
fn bf16_with_onnx_and_an_unknown_backend_are_config_errors_naming_the_key() {
    let s = onnx_setup("channel_mean", "count = 1\n");
    let check = |edit: (&str, &str), says: &str| {
        let original = std::fs::read_to_string(&s.config).unwrap();
        s.edit_config(edit.0, edit.1);
        let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
        std::fs::write(&s.config, original).unwrap();
    };
    check(("[model]\n", "[model]\nprecision = \"bf16\"\n"), "[model] precision");
    check(("[model]\n", "[model]\nbackend = \"tensorrt\"\n"), "[model] backend");
    // A file of another name runs through ONNX Runtime when `backend` says so.
    let renamed = s.dir.path().join("models/channel_mean.model");
    std::fs::rename(s.dir.path().join("models/channel_mean.onnx"), &renamed).unwrap();
    s.edit_config("models/channel_mean.onnx\"", "models/channel_mean.model\"\nbackend = \"onnxruntime\"");
    solid(&s.inbox.join("red.png"), RED, 32, 32);
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_sidecar(&s.inbox.join("red.png"))["engine"], "onnxruntime");
}

#[test]
fn sighup_swaps_torchscript_for_onnx_and_back_while_images_arrive() {
    let s = Setup::new("channel_mean", "").with_workers("count = 2\nmax_batch = 4\n");
    onnx_model(&s.dir.path().join("models/shifted.onnx"), "shifted");
    let d = s.spawn_daemon();
    let writer = {
        let inbox = s.inbox.clone();
        std::thread::spawn(move || {
            for i in 0..90 {
                solid(&inbox.join(format!("img-{i:03}.png")), RED, 32, 32);
                // The pace of a camera, so images keep arriving across both reloads.
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let wait_for = |n: usize| d.eventually(&format!("{n} rows"), WAIT, || s.rows_so_far().len() >= n);
    wait_for(15);
    s.edit_config("models/channel_mean.pt", "models/shifted.onnx");
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);
    let after_first = s.rows_so_far().len();
    wait_for(after_first + 15);
    s.edit_config("models/shifted.onnx", "models/channel_mean.pt");
    d.signal(1);
    d.wait_for_log_count("config reloaded", 2, WAIT);
    writer.join().unwrap();
    let rows = settled_rows(&s, Duration::from_secs(2));
    assert_eq!(d.stop().code(), Some(0));
    let mut seen = HashMap::new();
    for r in &rows {
        *seen.entry(r[1].to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 90, "every image has a row");
    assert!(seen.values().all(|&n| n == 1), "an image labelled twice: {seen:?}");
    let mut engines = HashMap::new();
    for i in 0..90 {
        let side = read_sidecar(&s.inbox.join(format!("img-{i:03}.png")));
        let engine = side["engine"].as_str().unwrap().to_string();
        // Each engine's model answers its own way: the TorchScript one red → 0, the ONNX one red → 7.
        let want = if engine == "onnxruntime" { (7, "shifted") } else { (0, "channel_mean") };
        assert_eq!((top1(&side).0, side["model"].as_str().unwrap()), want, "img-{i:03}: {side}");
        *engines.entry(engine).or_insert(0) += 1;
    }
    assert!(engines.len() == 2, "both engines labelled: {engines:?}");
    let row_models: std::collections::HashSet<&str> = rows.iter().map(|r| &r[r.len() - 2]).collect();
    assert!(row_models.contains("shifted") && row_models.contains("channel_mean"), "{row_models:?}");
    // The last images came after the swap back: libtorch again.
    assert_eq!(read_sidecar(&s.inbox.join("img-089.png"))["engine"], "libtorch");
}
