//! SIGHUP: read the config file again and work out what to apply. What each section does on reload
//! is in its module's docs (`config/<section>.rs`): inboxes, batching, output, limits, labels, the
//! model and [retention] change live; worker count, threads, queue size, [http] and [mqtt] need a
//! restart (kept as they are, with a warning). Sections are compared as checked values. A config that
//! does not validate, or whose model does not load, is rejected and the running one stays.

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
        preprocess: c.model.preprocess(&c.limits),
        labels,
        max_batch: c.workers.max_batch,
        max_delay: c.workers.max_delay,
        workers: c.workers.count,
        threads: c.workers.threads,
        threads_alone: c.workers.threads_alone,
        thumbnails,
        inboxes: c.inboxes.iter().map(|i| i.path.clone()).collect(),
        remote: c.remote.clone(),
    }
}

/// Reads `file` and checks it against the running config `old` (whose label list has `old_labels`
/// names). Blocking: loads the new model once when it changed, to be sure it works before any
/// worker switches to it.
/// Once the new config is accepted, its done and quarantine folders are pinned anew in `folders`.
pub fn prepare(old: &Config, old_labels: usize, file: &Path, thumbnails: bool, folders: &ArchiveFolders) -> Result<Reload, String> {
    let mut new = Config::load(file).map_err(|e| e.to_string())?;
    let mut at_next_restart = Vec::new();
    if old.workers.restart_only() != new.workers.restart_only() {
        at_next_restart.push("[workers] count/threads/queue");
        tracing::warn!("[workers] count, threads and queue take effect at the next restart; keeping the running values");
        new.workers = new.workers.keeping_restart_only(&old.workers);
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
    if old.model.needs_reload(&new.model) || old_labels != settings.labels.len() || old.remote != new.remote {
        // One intra-op thread: OpenMP helpers this thread grew would slow every pass while it lives
        // (see infer::solo).
        crate::infer::layout::set_threads(1);
        worker::load(&settings, &crate::metrics::Metrics::default()).map_err(|e| format!("{e}; keeping the running model"))?;
    }
    let changed = changed_sections(old, &new);
    let inboxes_changed = !old.inboxes.iter().map(|i| i.watch_settings()).eq(new.inboxes.iter().map(|i| i.watch_settings()));
    folders.pin(&new);
    Ok(Reload { output: OutputSettings::from_config(&new, &settings.labels), config: new, settings, inboxes_changed, changed, at_next_restart })
}

/// The sections of `new` that differ from `old`, for the log.
fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let differs = [
        ("[model]", old.model != new.model),
        ("[[inbox]]", old.inboxes != new.inboxes),
        ("[output]", old.output != new.output),
        ("[workers]", old.workers != new.workers),
        ("[limits]", old.limits != new.limits),
        ("[http]", old.http != new.http),
        ("[mqtt]", old.mqtt != new.mqtt),
        ("[retention]", old.retention != new.retention),
        ("[remote]", old.remote != new.remote),
        ("[[route]]", old.routes != new.routes),
    ];
    differs.iter().filter(|(_, d)| *d).map(|(name, _)| name.to_string()).collect()
}
