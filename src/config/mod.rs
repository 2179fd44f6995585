//! Configuration: each section is a file here that owns its raw TOML form, its validation into a
//! checked value (paths absolute, numbers in range, globs compiled), how `check-config` prints it, and
//! what a reload does with it (its module docs say). `Config` is the checked whole every later stage
//! trusts; its sections compare with `PartialEq`, which is how a reload finds what changed.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ConfigError;

mod folders;
mod http;
mod inbox;
mod limits;
mod model;
mod mqtt;
mod output;
mod remote;
mod retention;
mod route;
mod url;
mod workers;

pub use folders::check_archive_folder;
pub use http::HttpConfig;
pub use inbox::{InboxConfig, OnDone, WatchSettings, default_include, image_matcher, is_candidate_name};
pub use limits::Limits;
pub use model::{Engine, FileId, LabelSource, LabelsLang, ModelConfig, Precision, Preprocess};
pub use mqtt::{MqttConfig, Secret, hostname, topic_level_breaker};
pub use output::OutputConfig;
pub use remote::{Fallback, RemoteConfig, Server};
pub use retention::RetentionConfig;
pub use route::{Cap, PLACEHOLDERS, Route, RouteAction, Target, Verdict};
pub use workers::{WorkersConfig, cpu_budget};

pub const DEFAULT_CONFIG: &str = "config/labeld.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: model::RawModel,
    #[serde(default)]
    inbox: Vec<inbox::RawInbox>,
    #[serde(default)]
    output: output::RawOutput,
    #[serde(default)]
    workers: workers::RawWorkers,
    #[serde(default)]
    limits: limits::RawLimits,
    http: Option<http::RawHttp>,
    mqtt: Option<mqtt::RawMqtt>,
    retention: Option<retention::RawRetention>,
    remote: Option<remote::RawRemote>,
    #[serde(default)]
    route: Vec<route::RawRoute>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub model: ModelConfig,
    pub inboxes: Vec<InboxConfig>,
    pub output: OutputConfig,
    pub workers: WorkersConfig,
    pub limits: Limits,
    pub http: Option<HttpConfig>,
    /// Publishing results to an MQTT broker (`[mqtt]`); off when absent.
    pub mqtt: Option<MqttConfig>,
    /// Removing old images from done and quarantine folders (`[retention]`); off when absent.
    pub retention: Option<RetentionConfig>,
    /// Labelling on model servers (`[remote]`); on this box's CPU when absent.
    pub remote: Option<RemoteConfig>,
    /// Where labelled images go by their label (`[[route]]`), tried in order; empty: `on_done` only.
    pub routes: Vec<Route>,
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::new(file, "(file)", format!("cannot read config: {e}")))?;
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
        let model = model::from_raw(file, &base, raw.model)?;
        let limits = limits::from_raw(file, raw.limits)?;
        let inboxes = inbox::from_raw(file, &base, raw.inbox)?;
        let routes = route::from_raw(file, &base, raw.route, &inboxes)?;
        let route_folders: Vec<(String, PathBuf)> =
            routes.iter().enumerate().filter_map(|(i, r)| Some((format!("[[route]] #{} to", i + 1), r.to.as_ref()?.root.clone()))).collect();
        folders::check(&inboxes, &route_folders).map_err(|(key, reason)| ConfigError::new(file, key, reason))?;
        let workers = workers::from_raw(file, raw.workers)?;
        let output = output::from_raw(file, &base, raw.output)?;
        Ok(Config {
            file: file.to_path_buf(),
            model,
            inboxes,
            workers,
            limits,
            http: raw.http.map(|h| http::from_raw(file, h)).transpose()?,
            mqtt: raw.mqtt.map(|m| mqtt::from_raw(file, &base, m, &output.csv)).transpose()?,
            retention: raw.retention.map(|r| retention::from_raw(file, r)).transpose()?,
            remote: raw.remote.map(|r| remote::from_raw(file, &base, r)).transpose()?,
            output,
            routes,
        })
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
        self.model = self.model.with_path(&self.file, absolute(&cwd, model))?;
        Ok(self)
    }

    /// The resolved configuration, as TOML (what `check-config` prints): every section, in file order.
    pub fn describe(&self) -> String {
        let mut sections = vec![self.model.describe()];
        sections.extend(self.inboxes.iter().map(InboxConfig::describe));
        sections.extend([self.output.describe(), self.workers.describe(), self.limits.describe()]);
        sections.extend(self.http.as_ref().map(HttpConfig::describe));
        sections.extend(self.mqtt.as_ref().map(MqttConfig::describe));
        sections.extend(self.retention.as_ref().map(RetentionConfig::describe));
        sections.extend(self.remote.as_ref().map(RemoteConfig::describe));
        sections.extend(self.routes.iter().map(Route::describe));
        format!("# {} (resolved)\n{}", self.file.display(), sections.join("\n"))
    }
}

fn config_dir(file: &Path) -> PathBuf {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    absolute(&cwd, parent)
}

/// `p` made absolute against `base`, `.` and `..` removed lexically (the folder may not exist yet).
fn absolute(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models/resnet18.pt"), b"x").unwrap();
        let file = dir.path().join("labeld.toml");
        (dir, file)
    }

    pub(crate) const MINIMAL: &str = "[model]\npath = \"models/resnet18.pt\"\n[[inbox]]\npath = \"inbox\"\n";

    #[test]
    fn relative_paths_resolve_against_the_config_folder_and_defaults_apply() {
        let (dir, file) = setup();
        let c = Config::parse(&file, MINIMAL).unwrap();
        assert_eq!(c.model.path, dir.path().join("models/resnet18.pt"));
        assert_eq!(c.model.name, "resnet18");
        assert_eq!(c.inboxes[0].path, dir.path().join("inbox"));
        assert_eq!(c.output.csv, dir.path().join("results.csv"));
        assert_eq!(c.model.resize, 256);
        assert_eq!(c.model.top_k, 3);
        assert_eq!(c.workers.max_batch, 8);
        assert_eq!(c.workers.queue, 1024);
        assert_eq!(c.limits.max_pixels, 100_000_000);
        assert!(!c.model.scaled_decode, "the exact decode path is the default");
        assert_eq!(c.model.preprocess(&c.limits), Preprocess::default());
        assert!(c.model.optimize, "load-time graph optimisation is on by default");
    }

    #[test]
    fn unknown_keys_are_named() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}[workers]\nbatch = 3\n")).unwrap_err();
        assert_eq!(e.key, "batch");
        assert!(e.reason.contains("unknown field"), "{e}");
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
        assert_eq!(c.output.csv, dir.path().join("results.csv"));
        assert_eq!(c.model.name, "efficientnet_lite0");
    }

    #[test]
    fn the_resolved_config_reads_back_as_the_same_config() {
        let (dir, file) = setup();
        let text = "[model]\npath = \"models/resnet18.pt\"\nmin_score = 0.25\nlabels_lang = \"zh\"\n[[inbox]]\npath = \"inbox\"\non_done = \"move\"\ndone_dir = \"inbox/.done\"\n[workers]\nthreads = 3\n[http]\nlisten = \"127.0.0.1:0\"\n[retention]\nmax_age_days = 9\n";
        let c = Config::parse(&file, text).unwrap();
        let again = Config::parse(&dir.path().join("other.toml"), &c.describe()).unwrap();
        assert_eq!(again.describe().lines().skip(1).collect::<Vec<_>>(), c.describe().lines().skip(1).collect::<Vec<_>>());
        assert_eq!(again.workers.threads, 3);
        assert_eq!((&again.model, &again.inboxes, &again.retention), (&c.model, &c.inboxes, &c.retention));
    }
}
