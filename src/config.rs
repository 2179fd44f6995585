//! Configuration: `RawConfig` is the TOML as written; `Config` is the validated form every later stage
//! trusts (paths absolute, numbers in range, globs compiled).

use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::error::ConfigError;

mod folders;
mod mqtt;
mod retention;

pub use mqtt::{MqttConfig, Secret, hostname, topic_level_breaker};
pub use retention::RetentionConfig;

pub const DEFAULT_CONFIG: &str = "config/labeld.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: RawModel,
    #[serde(default)]
    inbox: Vec<RawInbox>,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    workers: RawWorkers,
    #[serde(default)]
    limits: RawLimits,
    http: Option<RawHttp>,
    mqtt: Option<mqtt::RawMqtt>,
    retention: Option<retention::RawRetention>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: PathBuf,
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

/// What happens to an image once it is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnDone {
    #[default]
    Keep,
    Move,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    token: Option<String>,
    #[serde(default = "default_max_body_mb")]
    max_body_mb: u64,
    #[serde(default = "default_max_uploads")]
    max_uploads: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_header_timeout_s")]
    header_timeout_s: u64,
    #[serde(default = "default_body_timeout_s")]
    body_timeout_s: u64,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbox {
    path: PathBuf,
    name: Option<String>,
    #[serde(default = "yes")]
    recursive: bool,
    #[serde(default = "default_include")]
    include: Vec<String>,
    #[serde(default = "default_settle_ms")]
    settle_ms: u64,
    quarantine: Option<PathBuf>,
    #[serde(default)]
    poll: bool,
    #[serde(default = "default_poll_interval_ms")]
    poll_interval_ms: u64,
    #[serde(default)]
    on_done: RawOnDone,
    done_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default = "default_csv")]
    csv: PathBuf,
}

impl Default for RawOutput {
    fn default() -> Self {
        RawOutput { csv: default_csv() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    count: Option<usize>,
    threads: Option<usize>,
    #[serde(default = "default_max_batch")]
    max_batch: usize,
    #[serde(default = "default_max_delay_ms")]
    max_delay_ms: u64,
    #[serde(default = "default_queue")]
    queue: usize,
}

impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers {
            count: None,
            threads: None,
            max_batch: default_max_batch(),
            max_delay_ms: default_max_delay_ms(),
            queue: default_queue(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_pixels")]
    max_pixels: u64,
    #[serde(default = "default_max_file_mb")]
    max_file_mb: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits { max_pixels: default_max_pixels(), max_file_mb: default_max_file_mb() }
    }
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
pub fn default_include() -> Vec<String> {
    ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.webp", "*.tif", "*.tiff"].iter().map(|s| s.to_string()).collect()
}
fn default_settle_ms() -> u64 {
    500
}
fn default_poll_interval_ms() -> u64 {
    1000
}
fn default_csv() -> PathBuf {
    "results.csv".into()
}
fn default_max_batch() -> usize {
    8
}
fn default_max_delay_ms() -> u64 {
    20
}
fn default_queue() -> usize {
    1024
}
fn default_max_pixels() -> u64 {
    100_000_000
}
fn default_max_file_mb() -> u64 {
    512
}
fn default_max_body_mb() -> u64 {
    32
}
fn default_max_uploads() -> usize {
    8
}
fn default_max_connections() -> usize {
    256
}
fn default_header_timeout_s() -> u64 {
    10
}
fn default_body_timeout_s() -> u64 {
    30
}

/// Where class names come from.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    ImageNet,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// Written into every sidecar and CSV row: `name`, else the model file's stem (links followed).
    pub name: String,
    pub labels: LabelSource,
    pub preprocess: Preprocess,
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

/// (device, inode, modification time), links followed.
pub type FileId = (u64, u64, std::time::SystemTime);

impl ModelConfig {
    /// Whether switching from `self` to `other` needs the model file loaded again.
    pub fn needs_reload(&self, other: &ModelConfig) -> bool {
        self.path != other.path
            || self.file_id != other.file_id
            || self.precision != other.precision
            || self.optimize != other.optimize
            || self.preprocess.crop != other.preprocess.crop
    }
}

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.modified().ok()?))
}

/// Resize (shorter side) → center crop → normalize, as torchvision does it.
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
        Preprocess {
            resize: default_resize(),
            crop: default_crop(),
            mean: default_mean(),
            std: default_std(),
            max_pixels: default_max_pixels(),
            max_file_bytes: default_max_file_mb() * 1024 * 1024,
            scaled_decode: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InboxConfig {
    pub path: PathBuf,
    /// The inbox's name in MQTT topics and payloads (`{inbox}`): `name`, else the folder's name.
    pub name: String,
    pub recursive: bool,
    pub include: Vec<String>,
    pub matcher: GlobSet,
    /// Files that arrive without a close-write or rename event are queued once their size and mtime
    /// have been unchanged this long.
    pub settle: Duration,
    /// Failed images move here (same relative path) with their error sidecar.
    pub quarantine: Option<PathBuf>,
    /// Poll instead of inotify (network filesystems), every `poll_interval`.
    pub poll: bool,
    pub poll_interval: Duration,
    /// What to do with an image once it has its result (errors stay, or go to quarantine).
    pub on_done: OnDone,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OnDone {
    /// Image and sidecar stay in the inbox.
    Keep,
    /// Image and sidecar move to this folder (same relative path).
    Move(PathBuf),
    /// Image and sidecar are deleted; the CSV row is the record.
    Delete,
}

impl OnDone {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnDone::Keep => "keep",
            OnDone::Move(_) => "move",
            OnDone::Delete => "delete",
        }
    }
}

impl InboxConfig {
    /// An image this inbox should label: a regular name matching `include`, not one of labeld's own
    /// files (sidecars, temp files) and not a dotfile.
    pub fn wants(&self, path: &Path) -> bool {
        // Nothing under a dot-folder of the inbox (e.g. a `.quarantine` inside it).
        let hidden_dir = path
            .parent()
            .and_then(|p| p.strip_prefix(&self.path).ok())
            .is_some_and(|rel| rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')));
        !hidden_dir && is_candidate_name(path, &self.matcher)
    }
}

/// Matches on the name's raw bytes, so a name that is not UTF-8 is judged by its extension too.
pub fn is_candidate_name(path: &Path, matcher: &GlobSet) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = path.file_name() else {
        return false;
    };
    let bytes = name.as_bytes();
    !bytes.starts_with(b".") && !bytes.ends_with(b".json") && matcher.is_match(Path::new(name))
}

/// Compiles `include` patterns; they match file names, case-insensitively.
pub fn image_matcher(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for pat in patterns {
        set.add(GlobBuilder::new(pat).case_insensitive(true).literal_separator(true).build()?);
    }
    set.build()
}

#[derive(Debug, Clone)]
pub struct WorkersConfig {
    pub count: usize,
    /// Intra-op threads per worker while others may be busy.
    pub threads: usize,
    /// Intra-op threads for a lone image (see `infer::layout`); `threads` when that is set explicitly.
    pub threads_alone: usize,
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub model: ModelConfig,
    pub inboxes: Vec<InboxConfig>,
    pub csv: PathBuf,
    pub workers: WorkersConfig,
    pub http: Option<HttpConfig>,
    /// Publishing results to an MQTT broker (`[mqtt]`); off when absent.
    pub mqtt: Option<MqttConfig>,
    /// Removing old images from done and quarantine folders (`[retention]`); off when absent.
    pub retention: Option<RetentionConfig>,
}

/// The optional HTTP endpoint: metrics, health, /predict and the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: std::net::SocketAddr,
    /// Bearer token every request except /healthz and /readyz must carry. Required off loopback.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// `POST /predict` requests being read or labelled at once; more are answered 503 unread.
    pub max_uploads: usize,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request's headers (or the next one on a kept-alive connection) must arrive within this.
    pub header_timeout: Duration,
    /// An upload's whole body must arrive within this, else 408.
    pub body_timeout: Duration,
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, "(file)", format!("cannot read config: {e}")))?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text` as if it were the contents of `file` (relative paths resolve
    /// against `file`'s folder).
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let key = e.span().map(|s| text[s].trim().to_string()).unwrap_or_default();
            ConfigError::new(file, if key.is_empty() { "(toml)".into() } else { key }, e.message().to_string())
        })?;
        let base = config_dir(file);
        validate(file, &base, raw)
    }

    /// The config `classify` uses when no config file exists: built-in defaults around one model file.
    pub fn for_model(model: &Path) -> Result<Config, ConfigError> {
        let text = format!("[model]\npath = {}\n", toml::Value::String(model.to_string_lossy().into_owned()));
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self::parse(&cwd.join("(command line)"), &text)
    }

    /// Replaces the model path (classify `--model`), re-deriving the model name.
    pub fn with_model(mut self, model: &Path) -> Result<Config, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let path = absolute(&cwd, model);
        check_model_file(&self.file, &path)?;
        self.model.name = model_stem(&path);
        self.model.file_id = file_id(&path);
        self.model.path = path;
        Ok(self)
    }
}

impl Config {
    /// The resolved configuration, as TOML (what `check-config` prints).
    pub fn describe(&self) -> String {
        let m = &self.model;
        let p = &m.preprocess;
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let labels = match &m.labels {
            LabelSource::ImageNet => "\"imagenet\"".to_string(),
            LabelSource::File(f) => q(f),
        };
        let mut s = format!("# {} (resolved)\n[model]\npath = {}\nname = {}\nlabels = {labels}\n", self.file.display(), q(&m.path), toml::Value::String(m.name.clone()));
        s += &format!("resize = {}\ncrop = {}\nmean = {:?}\nstd = {:?}\ntop_k = {}\n", p.resize, p.crop, p.mean, p.std, m.top_k);
        s += &format!("precision = \"{}\"\noptimize = {}\nscaled_decode = {}\nlabels_lang = \"{}\"\n", m.precision.as_str(), m.optimize, p.scaled_decode, m.labels_lang.as_str());
        if let Some(min) = m.min_score {
            s += &format!("min_score = {min}\n");
        }
        for ib in &self.inboxes {
            let include: Vec<String> = ib.include.iter().map(|i| toml::Value::String(i.clone()).to_string()).collect();
            s += &format!(
                "\n[[inbox]]\npath = {}\nname = {}\nrecursive = {}\ninclude = [{}]\nsettle_ms = {}\npoll = {}\npoll_interval_ms = {}\n",
                q(&ib.path),
                toml::Value::String(ib.name.clone()),
                ib.recursive,
                include.join(", "),
                ib.settle.as_millis(),
                ib.poll,
                ib.poll_interval.as_millis()
            );
            if let Some(qd) = &ib.quarantine {
                s += &format!("quarantine = {}\n", q(qd));
            }
            s += &format!("on_done = \"{}\"\n", ib.on_done.as_str());
            if let OnDone::Move(d) = &ib.on_done {
                s += &format!("done_dir = {}\n", q(d));
            }
        }
        let w = &self.workers;
        s += &format!("\n[output]\ncsv = {}\n", q(&self.csv));
        let alone = if w.threads_alone != w.threads { format!("   # {} for a lone image", w.threads_alone) } else { String::new() };
        s += &format!(
            "\n[workers]\ncount = {}\nthreads = {}{alone}\nmax_batch = {}\nmax_delay_ms = {}\nqueue = {}\n",
            w.count, w.threads, w.max_batch, w.max_delay.as_millis(), w.queue
        );
        s += &format!("\n[limits]\nmax_pixels = {}\nmax_file_mb = {}\n", p.max_pixels, p.max_file_bytes / (1024 * 1024));
        if let Some(h) = &self.http {
            s += &format!(
                "\n[http]\nlisten = \"{}\"\nmax_body_mb = {}\nmax_uploads = {}\nmax_connections = {}\nheader_timeout_s = {}\nbody_timeout_s = {}\n",
                h.listen,
                h.max_body_bytes / (1024 * 1024),
                h.max_uploads,
                h.max_connections,
                h.header_timeout.as_secs(),
                h.body_timeout.as_secs()
            );
            if h.token.is_some() {
                s += "token = \"(set, not shown)\"\n";
            }
        }
        if let Some(m) = &self.mqtt {
            s += &m.describe();
        }
        if let Some(r) = &self.retention {
            s += &r.describe();
        }
        s
    }
}

fn config_dir(file: &Path) -> PathBuf {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    absolute(&cwd, parent)
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    // Lexical clean-up only: the inbox may not exist yet, so no canonicalize here.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn model_stem(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    real.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn check_model_file(file: &Path, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::new(
            file,
            "[model] path",
            format!("no model file at {} (run `make model` to export the default one)", path.display()),
        ))
    }
}

fn validate(file: &Path, base: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, key, reason);

    let m = raw.model;
    let model_path = absolute(base, &m.path);
    check_model_file(file, &model_path)?;
    let name = match m.name {
        Some(n) if n.trim().is_empty() => return Err(err("[model] name", "must not be empty".into())),
        Some(n) => n,
        None => model_stem(&model_path),
    };
    let labels = match m.labels.as_str() {
        "imagenet" => LabelSource::ImageNet,
        _ if m.labels_lang != LabelsLang::En => {
            return Err(err(
                "[model] labels_lang",
                "selects a language of the built-in ImageNet labels; with a label file of your own, write the file in the language you want".into(),
            ));
        }
        p => {
            let path = absolute(base, Path::new(p));
            if !path.is_file() {
                return Err(err(
                    "[model] labels",
                    format!("\"imagenet\" or a label file; no file at {}", path.display()),
                ));
            }
            LabelSource::File(path)
        }
    };
    if m.crop == 0 || m.crop > 4096 {
        return Err(err("[model] crop", format!("must be 1..=4096, got {}", m.crop)));
    }
    if m.resize < m.crop || m.resize > 8192 {
        return Err(err("[model] resize", format!("must be at least crop ({}) and at most 8192, got {}", m.crop, m.resize)));
    }
    if m.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(err("[model] std", format!("every value must be > 0, got {:?}", m.std)));
    }
    if m.mean.iter().any(|s| !s.is_finite()) {
        return Err(err("[model] mean", format!("values must be finite, got {:?}", m.mean)));
    }
    if m.top_k == 0 || m.top_k > 100 {
        return Err(err("[model] top_k", format!("must be 1..=100, got {}", m.top_k)));
    }
    if let Some(min) = m.min_score {
        if !(0.0..=1.0).contains(&min) {
            return Err(err("[model] min_score", format!("must be between 0 and 1 (a probability), got {min}")));
        }
    }
    if raw.limits.max_pixels == 0 {
        return Err(err("[limits] max_pixels", "must be > 0".into()));
    }
    if raw.limits.max_file_mb == 0 {
        return Err(err("[limits] max_file_mb", "must be > 0".into()));
    }

    let mut inboxes: Vec<InboxConfig> = Vec::new();
    for (i, ib) in raw.inbox.into_iter().enumerate() {
        let key = |k: &str| format!("[[inbox]] #{} {k}", i + 1);
        let path = absolute(base, &ib.path);
        if path.exists() && !path.is_dir() {
            return Err(err(&key("path"), format!("{} exists and is not a directory", path.display())));
        }
        if let Some(other) = inboxes.iter().find(|o| path.starts_with(&o.path) || o.path.starts_with(&path)) {
            return Err(err(
                &key("path"),
                format!("{} overlaps the inbox {}; list each folder once", path.display(), other.path.display()),
            ));
        }
        if ib.include.is_empty() {
            return Err(err(&key("include"), "needs at least one pattern, e.g. \"*.jpg\"".into()));
        }
        let matcher = image_matcher(&ib.include).map_err(|e| err(&key("include"), format!("bad pattern: {e}")))?;
        if ib.settle_ms > 600_000 {
            return Err(err(&key("settle_ms"), format!("must be at most 600000, got {}", ib.settle_ms)));
        }
        let quarantine = ib.quarantine.map(|q| absolute(base, &q));
        let on_done = match (ib.on_done, ib.done_dir) {
            (RawOnDone::Move, Some(d)) => OnDone::Move(absolute(base, &d)),
            (RawOnDone::Move, None) => {
                return Err(err(&key("done_dir"), "on_done = \"move\" needs done_dir, the folder labelled images move to".into()));
            }
            (_, Some(_)) => {
                return Err(err(&key("done_dir"), "is only used with on_done = \"move\"".into()));
            }
            (RawOnDone::Keep, None) => OnDone::Keep,
            (RawOnDone::Delete, None) => OnDone::Delete,
        };
        if ib.poll_interval_ms < 50 || ib.poll_interval_ms > 3_600_000 {
            return Err(err(&key("poll_interval_ms"), format!("must be 50..=3600000, got {}", ib.poll_interval_ms)));
        }
        let name = match ib.name {
            Some(n) => n,
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "inbox".into()),
        };
        if name.is_empty() {
            return Err(err(&key("name"), "must not be empty".into()));
        }
        if let Some(bad) = topic_level_breaker(&name) {
            return Err(err(&key("name"), format!("\"{name}\" contains {bad}; it is one MQTT topic level")));
        }
        if let Some(other) = inboxes.iter().find(|o| o.name == name) {
            return Err(err(&key("name"), format!("\"{name}\" is also the name of the inbox {}; set name = \"...\" to tell them apart", other.path.display())));
        }
        inboxes.push(InboxConfig {
            path,
            name,
            recursive: ib.recursive,
            include: ib.include,
            matcher,
            settle: Duration::from_millis(ib.settle_ms),
            quarantine,
            poll: ib.poll,
            poll_interval: Duration::from_millis(ib.poll_interval_ms),
            on_done,
        });
    }

    folders::check(&inboxes).map_err(|(key, reason)| err(&key, reason))?;

    let w = raw.workers;
    // Two workers overlap one image's decoding with another's inference.
    let count = w.count.unwrap_or(cpu_budget().min(2));
    if count == 0 || count > 64 {
        return Err(err("[workers] count", format!("must be 1..=64, got {count}")));
    }
    let threads = w.threads.unwrap_or_else(|| (cpu_budget() / count).max(1));
    let threads_alone = if w.threads.is_some() { threads } else { cpu_budget().max(threads) };
    if threads == 0 || threads > 256 {
        return Err(err("[workers] threads", format!("must be 1..=256, got {threads}")));
    }
    if w.max_batch == 0 || w.max_batch > 256 {
        return Err(err("[workers] max_batch", format!("must be 1..=256, got {}", w.max_batch)));
    }
    if w.max_delay_ms > 10_000 {
        return Err(err("[workers] max_delay_ms", format!("must be at most 10000, got {}", w.max_delay_ms)));
    }
    if w.queue == 0 || w.queue > 1_000_000 {
        return Err(err("[workers] queue", format!("must be 1..=1000000, got {}", w.queue)));
    }

    let csv = absolute(base, &raw.output.csv);
    if csv.is_dir() {
        return Err(err("[output] csv", format!("{} is a directory; name a file", csv.display())));
    }

    let http = match raw.http {
        None => None,
        Some(h) => {
            let listen: std::net::SocketAddr = h.listen.parse().map_err(|_| {
                err("[http] listen", format!("\"{}\" is not an address:port such as \"127.0.0.1:9187\"", h.listen))
            })?;
            let token = h.token.filter(|t| !t.is_empty());
            if !listen.ip().is_loopback() && token.is_none() {
                return Err(err(
                    "[http] token",
                    format!("{listen} is reachable from other machines: set token = \"...\" (clients send Authorization: Bearer ...) or listen on 127.0.0.1"),
                ));
            }
            if h.max_body_mb == 0 || h.max_body_mb > 1024 {
                return Err(err("[http] max_body_mb", format!("must be 1..=1024, got {}", h.max_body_mb)));
            }
            let within = |key: &str, v: u64, max: u64| {
                if (1..=max).contains(&v) { Ok(v) } else { Err(err(key, format!("must be 1..={max}, got {v}"))) }
            };
            Some(HttpConfig {
                listen,
                token,
                max_body_bytes: (h.max_body_mb * 1024 * 1024) as usize,
                max_uploads: within("[http] max_uploads", h.max_uploads as u64, 1024)? as usize,
                max_connections: within("[http] max_connections", h.max_connections as u64, 65536)? as usize,
                header_timeout: Duration::from_secs(within("[http] header_timeout_s", h.header_timeout_s, 3600)?),
                body_timeout: Duration::from_secs(within("[http] body_timeout_s", h.body_timeout_s, 3600)?),
            })
        }
    };

    let mqtt = raw.mqtt.map(|m| mqtt::from_raw(file, base, m, &csv)).transpose()?;
    let retention = raw.retention.map(|r| retention::from_raw(file, r)).transpose()?;

    let file_id = file_id(&model_path);
    Ok(Config {
        file: file.to_path_buf(),
        model: ModelConfig {
            path: model_path,
            name,
            labels,
            preprocess: Preprocess {
                resize: m.resize,
                crop: m.crop,
                mean: m.mean,
                std: m.std,
                max_pixels: raw.limits.max_pixels,
                max_file_bytes: raw.limits.max_file_mb.saturating_mul(1024 * 1024),
                scaled_decode: m.scaled_decode,
            },
            top_k: m.top_k,
            precision: m.precision,
            optimize: m.optimize,
            labels_lang: m.labels_lang,
            min_score: m.min_score,
            file_id,
        },
        inboxes,
        csv,
        workers: WorkersConfig {
            count,
            threads,
            threads_alone,
            max_batch: w.max_batch,
            max_delay: Duration::from_millis(w.max_delay_ms),
            queue: w.queue,
        },
        http,
        mqtt,
        retention,
    })
}

/// CPUs this process may use: the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`; systemd's
/// CPUQuota= sets it) when one is set, else the CPUs it may run on. The standard library reads both.
pub fn cpu_budget() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/resnet18.pt"), b"x").unwrap();
        let file = dir.path().join("labeld.toml");
        (dir, file)
    }

    const MINIMAL: &str = "[model]\npath = \"models/resnet18.pt\"\n[[inbox]]\npath = \"inbox\"\n";

    #[test]
    fn relative_paths_resolve_against_the_config_folder_and_defaults_apply() {
        let (dir, file) = setup();
        let c = Config::parse(&file, MINIMAL).unwrap();
        assert_eq!(c.model.path, dir.path().join("models/resnet18.pt"));
        assert_eq!(c.model.name, "resnet18");
        assert_eq!(c.inboxes[0].path, dir.path().join("inbox"));
        assert_eq!(c.csv, dir.path().join("results.csv"));
        assert_eq!(c.model.preprocess.resize, 256);
        assert_eq!(c.model.top_k, 3);
        assert_eq!(c.workers.max_batch, 8);
        assert_eq!(c.workers.queue, 1024);
        assert_eq!(c.model.preprocess.max_pixels, 100_000_000);
        assert!(!c.model.preprocess.scaled_decode, "the exact decode path is the default");
        assert_eq!(c.model.preprocess, Preprocess::default());
        assert!(c.model.optimize, "load-time graph optimisation is on by default");
    }

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
    fn unknown_keys_are_named() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}[workers]\nbatch = 3\n")).unwrap_err();
        assert_eq!(e.key, "batch");
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn out_of_range_numbers_name_their_key() {
        let (_dir, file) = setup();
        for (extra, key) in [
            ("[workers]\nmax_batch = 0\n", "[workers] max_batch"),
            ("[workers]\nqueue = 0\n", "[workers] queue"),
            ("[workers]\ncount = 0\n", "[workers] count"),
        ] {
            let e = Config::parse(&file, &format!("{MINIMAL}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
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
    fn overlapping_inboxes_are_rejected() {
        let (_dir, file) = setup();
        let text = format!("{MINIMAL}[[inbox]]\npath = \"inbox/sub\"\n");
        let e = Config::parse(&file, &text).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #2 path");
    }

    #[test]
    fn include_is_case_insensitive_and_skips_own_files() {
        let (_dir, file) = setup();
        let c = Config::parse(&file, MINIMAL).unwrap();
        let ib = &c.inboxes[0];
        assert!(ib.wants(Path::new("/x/CAT.JPG")));
        assert!(ib.wants(Path::new("/x/a.webp")));
        assert!(!ib.wants(Path::new("/x/a.jpg.json")));
        assert!(!ib.wants(Path::new("/x/.a.jpg")));
        assert!(!ib.wants(Path::new("/x/notes.txt")));
        assert!(ib.wants(&ib.path.join("cam1/a.jpg")));
        use std::os::unix::ffi::OsStrExt;
        assert!(ib.wants(Path::new(std::ffi::OsStr::from_bytes(b"/x/caf\xe9.JPG"))), "a Latin-1 name is an image too");
        assert!(!ib.wants(Path::new(std::ffi::OsStr::from_bytes(b"/x/caf\xe9.txt"))));
        assert!(!ib.wants(&ib.path.join(".quarantine/cam1/a.jpg")));
    }

    #[test]
    fn quarantine_must_be_outside_the_inbox_or_hidden() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}quarantine = \"inbox/bad\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 quarantine");
        assert!(Config::parse(&file, &format!("{MINIMAL}quarantine = \"inbox/.quarantine\"\n")).is_ok());
        assert!(Config::parse(&file, &format!("{MINIMAL}quarantine = \"rejects\"\n")).is_ok());
    }

    #[test]
    fn the_shipped_default_config_is_valid_where_its_model_exists() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/labeld.toml")).unwrap();
        let (dir, _) = setup();
        let cfg_dir = dir.path().join("config");
        std::fs::create_dir(&cfg_dir).unwrap();
        std::fs::write(dir.path().join("models/efficientnet_lite0.pt"), b"x").unwrap();
        std::os::unix::fs::symlink("efficientnet_lite0.pt", dir.path().join("models/default.pt")).unwrap();
        let c = Config::parse(&cfg_dir.join("labeld.toml"), &text).unwrap();
        assert_eq!(c.inboxes.len(), 1);
        assert_eq!(c.inboxes[0].path, dir.path().join("inbox"));
        assert_eq!(c.csv, dir.path().join("results.csv"));
        assert_eq!(c.model.name, "efficientnet_lite0");
    }

    #[test]
    fn on_done_move_needs_a_done_dir_outside_the_inbox() {
        let (dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 done_dir");
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"inbox/done\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 done_dir");
        let e = Config::parse(&file, &format!("{MINIMAL}done_dir = \"archive\"\n")).unwrap_err();
        assert!(e.reason.contains("only used with"), "{e}");
        let c = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"archive\"\n")).unwrap();
        assert_eq!(c.inboxes[0].on_done, OnDone::Move(dir.path().join("archive")));
        let c = Config::parse(&file, &format!("{MINIMAL}on_done = \"delete\"\n")).unwrap();
        assert_eq!(c.inboxes[0].on_done, OnDone::Delete);
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"shred\"\n")).unwrap_err();
        assert!(e.reason.contains("unknown variant"), "{e}");
    }

    #[test]
    fn http_off_loopback_needs_a_token() {
        let (_dir, file) = setup();
        let c = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"127.0.0.1:9187\"\n")).unwrap();
        assert_eq!(c.http.unwrap().listen.port(), 9187);
        let e = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"0.0.0.0:9187\"\n")).unwrap_err();
        assert_eq!(e.key, "[http] token");
        let c = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"0.0.0.0:9187\"\ntoken = \"s3cret\"\n")).unwrap();
        assert_eq!(c.http.unwrap().token.as_deref(), Some("s3cret"));
        let e = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"localhost\"\n")).unwrap_err();
        assert_eq!(e.key, "[http] listen");
    }

    #[test]
    fn http_limits_have_defaults_and_are_checked() {
        let (_dir, file) = setup();
        let http = "[http]\nlisten = \"127.0.0.1:0\"\n";
        let h = Config::parse(&file, &format!("{MINIMAL}{http}")).unwrap().http.unwrap();
        assert_eq!((h.max_uploads, h.max_connections), (8, 256));
        assert_eq!((h.header_timeout, h.body_timeout), (Duration::from_secs(10), Duration::from_secs(30)));
        let shown = Config::parse(&file, &format!("{MINIMAL}{http}")).unwrap().describe();
        assert!(shown.contains("max_uploads = 8\nmax_connections = 256\nheader_timeout_s = 10\nbody_timeout_s = 30\n"), "{shown}");
        for (key, bad) in [("max_uploads", 0), ("max_connections", 0), ("header_timeout_s", 0), ("body_timeout_s", 3601)] {
            let e = Config::parse(&file, &format!("{MINIMAL}{http}{key} = {bad}\n")).unwrap_err();
            assert_eq!(e.key, format!("[http] {key}"));
            assert!(e.reason.contains(&format!("got {bad}")), "{e}");
        }
        let h = Config::parse(&file, &format!("{MINIMAL}{http}max_uploads = 2\nbody_timeout_s = 1\n")).unwrap().http.unwrap();
        assert_eq!((h.max_uploads, h.body_timeout), (2, Duration::from_secs(1)));
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

    #[test]
    fn the_resolved_config_reads_back_as_the_same_config() {
        let (dir, file) = setup();
        let text = format!(
            "[model]\npath = \"models/resnet18.pt\"\nmin_score = 0.25\nlabels_lang = \"zh\"\n[[inbox]]\npath = \"inbox\"\non_done = \"move\"\ndone_dir = \"inbox/.done\"\n[workers]\nthreads = 3\n[http]\nlisten = \"127.0.0.1:0\"\n"
        );
        let c = Config::parse(&file, &text).unwrap();
        let again = Config::parse(&dir.path().join("other.toml"), &c.describe()).unwrap();
        assert_eq!(again.describe().lines().skip(1).collect::<Vec<_>>(), c.describe().lines().skip(1).collect::<Vec<_>>());
        assert_eq!(again.workers.threads, 3);
    }
}
