//! `[model]`: the model file (TorchScript or ONNX) and the engine that runs it, its class names, its
//! input and how results are ranked. On reload: applies; a new file, `backend`, `precision`, `optimize`
//! or `crop` is test-loaded first (`needs_reload`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Limits, absolute};
use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    path: PathBuf,
    backend: Option<String>,
    name: Option<String>,
    #[serde(default = "default_labels")]
    labels: String,
    #[serde(default = "default_resize")]
    resize: u32,
    #[serde(default = "default_crop")]
    crop: u32,
    #[serde(default = "default_mean")]
    mean: [f32; 3],
    #[serde(default = "default_std")]
    std: [f32; 3],
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default)]
    precision: Precision,
    #[serde(default = "yes")]
    optimize: bool,
    #[serde(default)]
    scaled_decode: bool,
    #[serde(default)]
    labels_lang: LabelsLang,
    min_score: Option<f32>,
}

fn default_labels() -> String {
    "imagenet".into()
}
fn default_resize() -> u32 {
    256
}
fn default_crop() -> u32 {
    224
}
fn default_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}
fn default_top_k() -> usize {
    3
}
fn yes() -> bool {
    true
}

/// Numeric precision of inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float: the exact path.
    #[default]
    Fp32,
    /// bfloat16 weights and activations (AMX / AVX-512-BF16 through oneDNN); scores shift slightly.
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The engine that runs the model file in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A TorchScript file through libtorch.
    Libtorch,
    /// An ONNX file through ONNX Runtime.
    OnnxRuntime,
}

impl Engine {
    /// As rows, sidecars and the config name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Libtorch => "libtorch",
            Engine::OnnxRuntime => "onnxruntime",
        }
    }

    /// The engine a file's name implies: `.onnx` is ONNX Runtime's, anything else TorchScript.
    fn for_file(path: &Path) -> Engine {
        match path.extension() {
            Some(ext) if ext.eq_ignore_ascii_case("onnx") => Engine::OnnxRuntime,
            _ => Engine::Libtorch,
        }
    }
}

/// Language of the built-in ImageNet class names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelsLang {
    #[default]
    En,
    /// Simplified Chinese; sidecars and CSV rows then carry the English name as well.
    Zh,
}

impl LabelsLang {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelsLang::En => "en",
            LabelsLang::Zh => "zh",
        }
    }
}

/// Where class names come from.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    ImageNet,
    File(PathBuf),
}

/// (device, inode, modification time), links followed.
pub type FileId = (u64, u64, std::time::SystemTime);

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// `backend` when set, else what the file's extension says.
    pub engine: Engine,
    /// Whether `backend` was set (else a new `path` may imply another engine).
    pub engine_set: bool,
    /// Written into every sidecar and CSV row: `name`, else the model file's stem (links followed).
    pub name: String,
    pub labels: LabelSource,
    /// Shorter side scaled to this, then the centre `crop` × `crop`, normalised with `mean` and `std`.
    pub resize: u32,
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale when the result is still at least `resize`.
    pub scaled_decode: bool,
    pub top_k: usize,
    pub precision: Precision,
    /// Freeze and optimise the model's graph at load (`false`: run it exactly as loaded).
    pub optimize: bool,
    pub labels_lang: LabelsLang,
    /// Results whose top-1 score is below this are marked `confident: false`.
    pub min_score: Option<f32>,
    /// The model file as it was when the config was read: a file replaced in place, or a link
    /// pointed elsewhere, is a different model at the same path.
    pub file_id: Option<FileId>,
}

impl ModelConfig {
    /// Whether switching from `self` to `other` needs the model file loaded again.
    pub fn needs_reload(&self, other: &ModelConfig) -> bool {
        self.path != other.path
            || self.engine != other.engine
            || self.file_id != other.file_id
            || self.precision != other.precision
            || self.optimize != other.optimize
            || self.crop != other.crop
    }

    /// What preprocessing needs: this model's input, within `limits`.
    pub fn preprocess(&self, limits: &Limits) -> Preprocess {
        Preprocess {
            resize: self.resize,
            crop: self.crop,
            mean: self.mean,
            std: self.std,
            max_pixels: limits.max_pixels,
            max_file_bytes: limits.max_file_bytes,
            scaled_decode: self.scaled_decode,
        }
    }

    /// Points at another model file (classify `--model`), re-deriving the name.
    pub fn with_path(mut self, file: &Path, path: PathBuf) -> Result<ModelConfig, ConfigError> {
        check_model_file(file, &path)?;
        if !self.engine_set {
            self.engine = Engine::for_file(&path);
        }
        check_precision(file, self.engine, self.precision)?;
        self.name = model_stem(&path);
        self.file_id = file_id(&path);
        self.path = path;
        Ok(self)
    }

    pub fn describe(&self) -> String {
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let labels = match &self.labels {
            LabelSource::ImageNet => "\"imagenet\"".to_string(),
            LabelSource::File(f) => q(f),
        };
        let mut s = format!("[model]\npath = {}\n", q(&self.path));
        if self.engine_set {
            s += &format!("backend = \"{}\"\n", self.engine.as_str());
        }
        s += &format!("name = {}\nlabels = {labels}\n", toml::Value::String(self.name.clone()));
        s += &format!("resize = {}\ncrop = {}\nmean = {:?}\nstd = {:?}\ntop_k = {}\n", self.resize, self.crop, self.mean, self.std, self.top_k);
        s += &format!(
            "precision = \"{}\"\noptimize = {}\nscaled_decode = {}\nlabels_lang = \"{}\"\n",
            self.precision.as_str(),
            self.optimize,
            self.scaled_decode,
            self.labels_lang.as_str()
        );
        if let Some(min) = self.min_score {
            s += &format!("min_score = {min}\n");
        }
        s
    }
}

/// Resize (shorter side) → center crop → normalize, as torchvision does it, within the `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub resize: u32,
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub max_pixels: u64,
    pub max_file_bytes: u64,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale when the result is still at least `resize` (much faster;
    /// pixels differ slightly from the exact path).
    pub scaled_decode: bool,
}

impl Default for Preprocess {
    /// The same values a config file gets when it leaves the keys out.
    fn default() -> Self {
        let limits = Limits::default();
        Preprocess {
            resize: default_resize(),
            crop: default_crop(),
            mean: default_mean(),
            std: default_std(),
            max_pixels: limits.max_pixels,
            max_file_bytes: limits.max_file_bytes,
            scaled_decode: false,
        }
    }
}

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.modified().ok()?))
}

fn model_stem(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    real.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn check_model_file(file: &Path, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::new(file, "[model] path", format!("no model file at {} (run `make model` to export the default one)", path.display())))
    }
}

/// ONNX Runtime's CPU kernels have no bfloat16 path for a classifier's operators.
fn check_precision(file: &Path, engine: Engine, precision: Precision) -> Result<(), ConfigError> {
    if engine == Engine::OnnxRuntime && precision == Precision::Bf16 {
        return Err(ConfigError::new(
            file,
            "[model] precision",
            "\"bf16\" runs only through libtorch; ONNX models run in fp32 (or as the int8 file they are): remove the key or set \"fp32\"",
        ));
    }
    Ok(())
}

pub(super) fn from_raw(file: &Path, base: &Path, m: RawModel) -> Result<ModelConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[model] {key}"), reason);
    let path = absolute(base, &m.path);
    check_model_file(file, &path)?;
    let engine = match m.backend.as_deref() {
        None => Engine::for_file(&path),
        Some("libtorch") => Engine::Libtorch,
        Some("onnxruntime") => Engine::OnnxRuntime,
        Some(other) => return Err(err("backend", format!("must be \"libtorch\" or \"onnxruntime\", got {other:?}"))),
    };
    check_precision(file, engine, m.precision)?;
    let name = match m.name {
        Some(n) if n.trim().is_empty() => return Err(err("name", "must not be empty".into())),
        Some(n) => n,
        None => model_stem(&path),
    };
    let labels = match m.labels.as_str() {
        "imagenet" => LabelSource::ImageNet,
        _ if m.labels_lang != LabelsLang::En => {
            return Err(err(
                "labels_lang",
                "selects a language of the built-in ImageNet labels; with a label file of your own, write the file in the language you want".into(),
            ));
        }
        p => {
            let labels = absolute(base, Path::new(p));
            if !labels.is_file() {
                return Err(err("labels", format!("\"imagenet\" or a label file; no file at {}", labels.display())));
            }
            LabelSource::File(labels)
        }
    };
    if m.crop == 0 || m.crop > 4096 {
        return Err(err("crop", format!("must be 1..=4096, got {}", m.crop)));
    }
    if m.resize < m.crop || m.resize > 8192 {
        return Err(err("resize", format!("must be at least crop ({}) and at most 8192, got {}", m.crop, m.resize)));
    }
    if m.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(err("std", format!("every value must be > 0, got {:?}", m.std)));
    }
    if m.mean.iter().any(|s| !s.is_finite()) {
        return Err(err("mean", format!("values must be finite, got {:?}", m.mean)));
    }
    if m.top_k == 0 || m.top_k > 100 {
        return Err(err("top_k", format!("must be 1..=100, got {}", m.top_k)));
    }
    if let Some(min) = m.min_score.filter(|min| !(0.0..=1.0).contains(min)) {
        return Err(err("min_score", format!("must be between 0 and 1 (a probability), got {min}")));
    }
    Ok(ModelConfig {
        file_id: file_id(&path),
        path,
        engine,
        engine_set: m.backend.is_some(),
        name,
        labels,
        resize: m.resize,
        crop: m.crop,
        mean: m.mean,
        std: m.std,
        scaled_decode: m.scaled_decode,
        top_k: m.top_k,
        precision: m.precision,
        optimize: m.optimize,
        labels_lang: m.labels_lang,
        min_score: m.min_score,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;

    #[test]
    fn optimize_can_be_turned_off_and_must_be_a_bool() {
        let (_dir, file) = setup();
        let off = MINIMAL.replace("[model]\n", "[model]\noptimize = false\n");
        assert!(!Config::parse(&file, &off).unwrap().model.optimize);
        let wrong = MINIMAL.replace("[model]\n", "[model]\noptimize = \"no\"\n");
        let err = Config::parse(&file, &wrong).unwrap_err().to_string();
        assert!(err.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn model_name_follows_a_link_to_the_real_file() {
        let (dir, file) = setup();
        std::os::unix::fs::symlink("resnet18.pt", dir.path().join("models/default.pt")).unwrap();
        let c = Config::parse(&file, "[model]\npath = \"models/default.pt\"\n").unwrap();
        assert_eq!(c.model.name, "resnet18");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\ncrop = 300\n").unwrap_err();
        assert_eq!(e.key, "[model] resize");
        let e = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\nstd = [0.2, 0.0, 0.2]\n").unwrap_err();
        assert_eq!(e.key, "[model] std");
    }

    #[test]
    fn missing_model_and_label_files_are_config_errors() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, "[model]\npath = \"models/nope.pt\"\n").unwrap_err();
        assert_eq!(e.key, "[model] path");
        assert!(e.reason.contains("make model"));
        let e = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\nlabels = \"x.txt\"\n").unwrap_err();
        assert_eq!(e.key, "[model] labels");
    }

    #[test]
    fn the_engine_follows_the_extension_unless_backend_names_it() {
        let (dir, file) = setup();
        std::fs::write(dir.path().join("models/lite0.onnx"), b"").unwrap();
        let onnx = Config::parse(&file, "[model]\npath = \"models/lite0.onnx\"\n").unwrap();
        assert_eq!(onnx.model.engine, Engine::OnnxRuntime);
        let pt = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\n").unwrap();
        assert_eq!(pt.model.engine, Engine::Libtorch);
        let named = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\nbackend = \"onnxruntime\"\n").unwrap();
        assert_eq!(named.model.engine, Engine::OnnxRuntime);
        assert!(named.model.describe().contains("backend = \"onnxruntime\""));
        let e = Config::parse(&file, "[model]\npath = \"models/resnet18.pt\"\nbackend = \"tensorflow\"\n").unwrap_err();
        assert_eq!(e.key, "[model] backend");
        assert!(e.reason.contains("\"libtorch\" or \"onnxruntime\""), "{}", e.reason);
        let e = Config::parse(&file, "[model]\npath = \"models/lite0.onnx\"\nprecision = \"bf16\"\n").unwrap_err();
        assert_eq!(e.key, "[model] precision");
        assert!(e.reason.contains("libtorch"), "{}", e.reason);
    }

    #[test]
    fn min_score_and_label_language_are_checked() {
        let (_dir, file) = setup();
        let m = "[model]\npath = \"models/resnet18.pt\"\n";
        let e = Config::parse(&file, &format!("{m}min_score = 1.5\n")).unwrap_err();
        assert_eq!(e.key, "[model] min_score");
        let c = Config::parse(&file, &format!("{m}min_score = 0.4\nlabels_lang = \"zh\"\n")).unwrap();
        assert_eq!((c.model.min_score, c.model.labels_lang), (Some(0.4), LabelsLang::Zh));
        std::fs::write(file.with_file_name("l.txt"), "a\n").unwrap();
        let e = Config::parse(&file, &format!("{m}labels = \"l.txt\"\nlabels_lang = \"zh\"\n")).unwrap_err();
        assert_eq!(e.key, "[model] labels_lang");
    }
}
