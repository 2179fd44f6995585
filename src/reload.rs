//! SIGHUP: read the config file again and work out what to apply. Inboxes, batching, output, labels,
//! the model and [retention] change live; worker count, threads, queue size, [http] and [mqtt] need a restart (inbox names in MQTT topics too) (kept as
//! they are, with a warning). A config that does not validate, or whose model does not load, is
//! rejected and the running one stays.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::infer::labels::Labels;
use crate::infer::{InferSettings, worker};
use crate::ledger::ArchiveFolders;
use crate::sink::OutputSettings;

/// A new config, checked and ready to apply.
pub struct Reload {
    pub config: Config,
    pub settings: InferSettings,
    pub output: OutputSettings,
    /// The watches must be set up again.
    pub inboxes_changed: bool,
    /// Sections that changed, for the log.
    pub changed: Vec<String>,
    /// Sections that changed in the file but apply only at the next restart (kept as they run).
    pub at_next_restart: Vec<&'static str>,
}

/// The workers' settings for `c`.
pub fn infer_settings(c: &Config, labels: Arc<Labels>, thumbnails: bool) -> InferSettings {
    InferSettings {
        model: c.model.clone(),
        labels,
        max_batch: c.workers.max_batch,
        max_delay: c.workers.max_delay,
        thumbnails,
        inboxes: c.inboxes.iter().map(|i| i.path.clone()).collect(),
    }
}

/// Reads `file` and checks it against the running config `old` (whose label list has `old_labels`
/// names). Blocking: loads the new model once when it changed, to be sure it works before any
/// worker switches to it.
/// Once the new config is accepted, its done and quarantine folders are pinned anew in `folders`.
pub fn prepare(old: &Config, old_labels: usize, file: &Path, thumbnails: bool, folders: &ArchiveFolders) -> Result<Reload, String> {
    let mut new = Config::load(file).map_err(|e| e.to_string())?;
    let mut at_next_restart = Vec::new();
    let w = (&old.workers, &new.workers);
    if (w.0.count, w.0.threads, w.0.queue) != (w.1.count, w.1.threads, w.1.queue) {
        at_next_restart.push("[workers] count/threads/queue");
        tracing::warn!("[workers] count, threads and queue take effect at the next restart; keeping the running values");
        new.workers.count = old.workers.count;
        new.workers.threads = old.workers.threads;
        new.workers.queue = old.workers.queue;
    }
    if old.http != new.http {
        at_next_restart.push("[http]");
        tracing::warn!("[http] takes effect at the next restart; keeping the running endpoint");
        new.http = old.http.clone();
    }
    if old.mqtt != new.mqtt {
        at_next_restart.push("[mqtt]");
        tracing::warn!("[mqtt] takes effect at the next restart; keeping the running broker connection");
        new.mqtt = old.mqtt.clone();
    }
    let labels = Arc::new(Labels::load(&new.model.labels, new.model.labels_lang).map_err(|e| e.to_string())?);
    let settings = infer_settings(&new, labels, thumbnails);
    if old.model.needs_reload(&new.model) || old_labels != settings.labels.len() {
        worker::load(&settings).map_err(|e| format!("{e}; keeping the running model"))?;
    }
    let (before, after) = (sections(&old.describe()), sections(&new.describe()));
    let changed: Vec<String> = after
        .iter()
        .filter(|(name, text)| before.iter().find(|(n, _)| n == name).map(|(_, t)| t) != Some(text))
        .map(|(name, _)| name.clone())
        .chain(before.iter().filter(|(n, _)| !after.iter().any(|(m, _)| m == n)).map(|(n, _)| n.clone()))
        .collect();
    let inboxes_changed = watch_keys(old) != watch_keys(&new);
    folders.pin(&new);
    Ok(Reload { output: OutputSettings::from_config(&new), config: new, settings, inboxes_changed, changed, at_next_restart })
}

/// What the watch stage depends on (quarantine and on_done are the sink's).
fn watch_keys(c: &Config) -> Vec<String> {
    c.inboxes
        .iter()
        .map(|i| format!("{:?} {} {:?} {:?} {} {:?}", i.path, i.recursive, i.include, i.settle, i.poll, i.poll_interval))
        .collect()
}

/// `describe()` split into its sections: ("[model]", text), ("[[inbox]]", all inboxes), ...
fn sections(described: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in described.lines().filter(|l| !l.starts_with('#')) {
        if line.starts_with('[') {
            if out.last().is_none_or(|(n, _)| n != line) {
                out.push((line.to_string(), String::new()));
            }
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}
