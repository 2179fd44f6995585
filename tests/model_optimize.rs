//! Load-time graph optimisation on models exported the ways integrators export them (a plain trace, an
//! already-frozen trace, a script with control flow; the real EfficientNet-Lite0, made by
//! tests/data/make_optimize_models.py with Debian's PyTorch): each loads optimised in fp32 and bf16 and
//! gives eager PyTorch's top-1 on the golden photos; a model whose optimised logits differ runs as loaded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::*;
use labeld::config::Precision;
use labeld::infer::backend::Backend;
use labeld::infer::model::Classifier;
use labeld::infer::optimize::{Optimisation, PASSES};
use labeld::infer::preprocess::normalize_into;
use serde_json::Value;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The test models, made once per script version and kept in cargo's test temp folder (~5 s to make).
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/make_optimize_models.py");
        let source = std::fs::read(&script).unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("optimize-models");
        let stamp = dir.join("made-by.py");
        if std::fs::read(&stamp).ok().as_ref() != Some(&source) {
            let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/py");
            let out = Command::new("/usr/bin/python3").arg(&script).arg(&dir).env("PYTHONPATH", py).output().unwrap();
            assert!(out.status.success(), "cannot make the test models: {}", String::from_utf8_lossy(&out.stderr));
            std::fs::write(&stamp, &source).unwrap();
        }
        dir
    })
}

/// (photo, eager top-1, eager top-1/top-2 logit gap) for every golden crop.
fn eager() -> Vec<(String, usize, f32)> {
    let json: Value = serde_json::from_slice(&std::fs::read(models().join("eager.json")).unwrap()).unwrap();
    let photos = json.as_object().unwrap();
    assert!(photos.len() >= 6, "too few golden photos");
    photos
        .iter()
        .map(|(name, e)| (name.clone(), e["top1"].as_u64().unwrap() as usize, e["gap"].as_f64().unwrap() as f32))
        .collect()
}

/// The golden crop of `photo`, normalised as torchvision's ToTensor + Normalize, HWC.
fn golden_input(photo: &str) -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden").join(photo);
    let crop = image::open(&path).unwrap().into_rgb8();
    let mut data = Vec::new();
    normalize_into(crop.as_raw(), 224, &MEAN, &STD, &mut data);
    data
}

fn load(model: &str, precision: Precision) -> Classifier {
    let path = models().join(model);
    Classifier::load(&path, 224, 1000, 8, precision, Some(PASSES)).unwrap_or_else(|e| panic!("{model} {precision:?}: {e}"))
}

/// Top-1 of every golden photo, one batch of all of them and each alone (the scripted model takes
/// another branch for a batch of one).
fn top1s(classifier: &Classifier, photos: &[(String, usize, f32)]) -> (Vec<usize>, Vec<usize>) {
    let inputs: Vec<Vec<f32>> = photos.iter().map(|(p, _, _)| golden_input(p)).collect();
    let batch = classifier.top_k(&inputs.concat(), inputs.len(), 1).unwrap();
    let alone = inputs.iter().map(|x| classifier.top_k(x, 1, 1).unwrap()[0][0].0).collect();
    (batch.iter().map(|r| r[0].0).collect(), alone)
}

/// Loads `model` in fp32 and bf16: optimised, fp32 top-1 equal to eager PyTorch's on every photo, bf16
/// top-1 equal where eager's margin is clear of bf16 rounding (a few 0.06 steps on logits near 16).
fn loads_optimised_with_eager_top1(model: &str) {
    let photos = eager();
    let want: Vec<usize> = photos.iter().map(|(_, id, _)| *id).collect();
    let fp32 = load(model, Precision::Fp32);
    assert!(matches!(fp32.optimisation(), Optimisation::Optimised { passes, .. } if *passes == PASSES), "{model} fp32: {}", fp32.optimisation());
    let (batch, alone) = top1s(&fp32, &photos);
    assert_eq!(batch, want, "{model} fp32 top-1 in one batch vs eager PyTorch ({photos:?})");
    assert_eq!(alone, want, "{model} fp32 top-1 one by one vs eager PyTorch");

    let bf16 = load(model, Precision::Bf16);
    assert!(matches!(bf16.optimisation(), Optimisation::Optimised { .. }), "{model} bf16: {}", bf16.optimisation());
    let (batch, alone) = top1s(&bf16, &photos);
    let clear: Vec<usize> = (0..photos.len()).filter(|&i| photos[i].2 >= 1.0).collect();
    assert!(clear.len() >= 2, "too few photos with a clear top-1: {photos:?}");
    for i in clear {
        assert_eq!((batch[i], alone[i]), (want[i], want[i]), "{model} bf16 top-1 of {} vs eager PyTorch", photos[i].0);
    }
}

#[test]
fn a_plain_trace_loads_optimised_with_eager_top1() {
    loads_optimised_with_eager_top1("traced.pt");
}

#[test]
fn an_already_frozen_model_loads_optimised_with_eager_top1_in_bf16_too() {
    loads_optimised_with_eager_top1("frozen.pt");
}

#[test]
fn a_script_with_control_flow_loads_optimised_with_eager_top1() {
    loads_optimised_with_eager_top1("scripted.pt");
}

/// With optimisation off, an already-frozen model still runs in bf16: its folded weights are graph
/// constants, which the conversion reaches too.
#[test]
fn an_already_frozen_model_runs_in_bf16_unoptimised_too() {
    let photos = eager();
    let path = models().join("frozen.pt");
    let bf16 = Classifier::load(&path, 224, 1000, 8, Precision::Bf16, None).unwrap_or_else(|e| panic!("frozen.pt bf16: {e}"));
    assert_eq!(bf16.optimisation(), &Optimisation::Off);
    let (batch, _) = top1s(&bf16, &photos);
    for (i, (name, want, gap)) in photos.iter().enumerate() {
        if *gap >= 1.0 {
            assert_eq!(batch[i], *want, "frozen.pt bf16 unoptimised top-1 of {name} vs eager PyTorch");
        }
    }
}

/// A model with noise in its output gives other logits on every run, so the probe check refuses the
/// optimisation; the model itself still loads and labels.
#[test]
fn a_model_whose_optimised_logits_differ_runs_as_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("noisy.pt");
    let py = dir.path().join("noisy.py");
    std::fs::write(
        &py,
        r#"
import sys, torch
class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 1000)
    def forward(self, x):
        return self.fc(self.conv(x).mean([2, 3])) + torch.rand(x.size(0), 1000)
torch.jit.script(Noisy().eval()).save(sys.argv[1])
"#,
    )
    .unwrap();
    let out = Command::new("/usr/bin/python3").arg(&py).arg(&model).output().unwrap();
    assert!(out.status.success(), "cannot script the noisy model: {}", String::from_utf8_lossy(&out.stderr));
    for precision in [Precision::Fp32, Precision::Bf16] {
        let classifier = Classifier::load(&model, 224, 1000, 8, precision, Some(PASSES)).unwrap_or_else(|e| panic!("{precision:?}: {e}"));
        match classifier.optimisation() {
            Optimisation::Unoptimised { reason } => assert!(reason.contains("differ"), "{precision:?}: {reason}"),
            other => panic!("{precision:?}: a noisy model was optimised: {other}"),
        }
        assert_eq!(classifier.top_k(&golden_input("camera.png"), 1, 3).unwrap()[0].len(), 3);
    }
}

/// The operator sees in the log that the model was optimised, with which passes, and can turn it off.
#[test]
fn the_daemon_logs_that_it_optimised_the_model_unless_told_not_to() {
    let s = Setup::new("channel_mean", "");
    std::fs::copy(models().join("traced.pt"), &s.model).unwrap();
    let out = s.run_once();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "labeld run --once failed: {log}");
    let line = format!("model optimised ({}) in ", PASSES.names().join(", "));
    assert!(log.contains(&line), "no {line:?} in the log:\n{log}");

    s.edit_config("[model]\n", "[model]\noptimize = false\n");
    let out = s.run_once();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "labeld run --once failed: {log}");
    assert!(log.contains("model not optimised ([model] optimize = false)"), "no opt-out line in the log:\n{log}");
    assert!(!log.contains("model optimised"), "optimised although told not to:\n{log}");
}
