//! The service driver: HTTP, the inbox watch and systemd notifications on a small async runtime, and
//! SIGHUP reloads applied through `Control`, until shutdown.

use std::sync::Arc;

use crate::config::Config;
use crate::error::Fatal;
use crate::health::Health;
use crate::infer::LiveSettings;
use crate::ledger::ArchiveFolders;
use crate::metrics::Metrics;
use crate::queue::{self, QueueSender};
use crate::reload;
use crate::retain::RetentionControl;
use crate::shutdown::Shutdown;
use crate::sink::SinkControl;
use crate::sink::recent::Recent;
use crate::systemd::Systemd;
use crate::watch::Watch;

/// The running service: watches, HTTP and systemd notifications; applies SIGHUP reloads until
/// shutdown.
pub(super) async fn serve(
    mut control: Control,
    upload_queue: QueueSender,
    recent: Recent,
    mut reload_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    shutdown: Shutdown,
) -> Result<(), Fatal> {
    let health = control.health.clone();
    let http = match control.config.http.clone() {
        Some(cfg) => {
            let state = crate::http::HttpState {
                metrics: control.metrics.clone(),
                health: health.clone(),
                recent,
                queue: upload_queue,
                live: control.live.clone(),
                stall_limit: Systemd::stall_limit(),
                token: cfg.token.as_deref().map(Arc::from),
                shutdown: shutdown.clone(),
                uploads: crate::http::UploadLimits::new(&cfg),
                review: crate::http::Review::new(
                    control.folders.clone(),
                    control.config.routes.iter().filter(|r| r.review).filter_map(|r| Some(r.to.as_ref()?.root.clone())).collect(),
                    crate::http::review::corrections_path(&control.config.output.csv),
                ),
            };
            Some(crate::http::serve(&cfg, state, shutdown.clone()).await?)
        }
        None => {
            drop(upload_queue);
            None
        }
    };
    control.start_watch().await?;
    health.set_ready(true);
    tracing::info!("ready");
    control.systemd.ready(&crate::systemd::summary(&control.metrics));
    let supervisor =
        control.systemd.supervise(health.clone(), control.metrics.clone(), control.sink.clone(), shutdown.clone());
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some(()) = reload_rx.recv() => control.reload().await,
            () = control.watch_ended() => control.watch_died(&shutdown),
        }
    }
    control.systemd.stopping();
    health.set_ready(false);
    control.stop_watch().await;
    if let Some(h) = http {
        // Open requests end at once or within the server's stop grace (http/connections.rs).
        let _ = h.await;
    }
    if let Some(s) = supervisor {
        let _ = tokio::task::spawn_blocking(move || s.join()).await;
    }
    Ok(())
}

/// What a reload touches.
pub(super) struct Control {
    pub(super) config: Config,
    pub(super) live: LiveSettings,
    pub(super) sink: SinkControl,
    pub(super) feeder: crossbeam_channel::Sender<queue::ReadyFile>,
    pub(super) metrics: Metrics,
    pub(super) systemd: Systemd,
    pub(super) thumbnails: bool,
    pub(super) watch: Option<(Watch, Shutdown)>,
    /// Not ready while the inboxes are not watched.
    pub(super) health: Health,
    pub(super) retention: Option<RetentionControl>,
    pub(super) folders: ArchiveFolders,
}

impl Control {
    /// Starts the watch stage off the async runtime (creating and watching folders blocks).
    async fn start_watch(&mut self) -> Result<(), Fatal> {
        let stop = Shutdown::new();
        let (inboxes, feeder, health, s) = (self.config.inboxes.clone(), self.feeder.clone(), self.health.clone(), stop.clone());
        let watch = tokio::task::spawn_blocking(move || Watch::start(inboxes, feeder, health, s))
            .await
            .map_err(|e| Fatal::Other(format!("the inbox watch start failed: {e}")))??;
        self.watch = Some((watch, stop));
        Ok(())
    }

    /// Resolves when the running watch thread ends; pending while none runs.
    async fn watch_ended(&mut self) {
        match &mut self.watch {
            Some((watch, _)) => watch.ended().await,
            None => std::future::pending().await,
        }
    }

    /// A watch thread that ended without being stopped (a panic) stops labeld with a failure.
    fn watch_died(&self, shutdown: &Shutdown) {
        if self.watch.as_ref().is_some_and(|(_, stop)| !stop.is_triggered()) {
            self.health.lifeline("watcher", shutdown).died("the inbox watch thread ended unexpectedly (a panic is logged above)");
        }
    }

    async fn stop_watch(&mut self) {
        if let Some((watch, stop)) = self.watch.take() {
            stop.trigger();
            watch.join().await;
        }
    }

    /// SIGHUP: reopen the results log, then re-read the config and apply it, or keep the running one.
    async fn reload(&mut self) {
        self.systemd.reloading();
        let (old, thumbnails) = (self.config.clone(), self.thumbnails);
        let file = old.file.clone();
        let labels_now = self.live.get().labels.len();
        let folders = self.folders.clone();
        let prepared = tokio::task::spawn_blocking(move || reload::prepare(&old, labels_now, &file, thumbnails, &folders))
            .await
            .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
        let r = match prepared {
            Ok(r) => r,
            Err(reason) => {
                tracing::error!(config = %self.config.file.display(), reason = %reason, "config reload rejected, the running config stays");
                self.metrics.reload("rejected");
                self.systemd.ready(&crate::systemd::summary(&self.metrics));
                return;
            }
        };
        self.live.set(r.settings);
        self.sink.reconfigure(r.output);
        if let Some(ret) = &self.retention {
            ret.reconfigure(&r.config);
        }
        self.metrics.set_model(&r.config.model.name, r.config.model.precision.as_str());
        self.config = r.config;
        if r.inboxes_changed || self.watch.is_none() {
            self.stop_watch().await;
            match self.start_watch().await {
                Ok(()) => self.health.set_ready(true),
                Err(e) => {
                    // The queue, workers and sink keep running; files arriving now are found by the
                    // next reload's or restart's scan. /readyz says so meanwhile.
                    tracing::error!(error = %e, "cannot watch the new inboxes; not ready until a reload or restart watches them");
                    self.health.set_ready(false);
                }
            }
        }
        self.metrics.reload("applied");
        let changed = if r.changed.is_empty() { "nothing".to_string() } else { r.changed.join(" ") };
        if r.at_next_restart.is_empty() {
            tracing::info!(changed = %changed, "config reloaded");
        } else {
            tracing::info!(changed = %changed, at_next_restart = %r.at_next_restart.join(" "), "config reloaded");
        }
        self.systemd.ready(&crate::systemd::summary(&self.metrics));
    }
}

