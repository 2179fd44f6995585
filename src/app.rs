//! Wires the stages together for each command; no stage logic lives here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Fatal;
use crate::health::Health;
use crate::infer::labels::Labels;
use crate::infer::worker::Workers;
use crate::infer::{BatchDone, LiveSettings};
use crate::ledger::ArchiveFolders;
use crate::metrics::{Metrics, PublishReport};
use crate::queue::{self, InFlight, QueueSender};
use crate::publish::Publisher;
use crate::reload;
use crate::retain::{Retention, RetentionControl};
use crate::shutdown::Shutdown;
use crate::sink::recent::Recent;
use crate::vocab::Status;
use crate::sink::result_log::LogTap;
use crate::sink::{OutputSettings, Sink, SinkControl, Totals};
use crate::systemd::Systemd;
use crate::watch::{self, Feeder, Watch};

/// `labeld run`: label the backlog, then (unless `once`) watch the inboxes until SIGTERM/SIGINT,
/// re-reading the config on SIGHUP.
pub fn run(config: Config, once: bool) -> Result<Totals, Fatal> {
    crate::health::note_panics();
    let shutdown = Shutdown::new();
    let metrics = Metrics::new();
    let health = Health::new();
    let systemd = Systemd::from_env();
    let recent = Recent::default();
    let labels = Arc::new(Labels::load(&config.model.labels, config.model.labels_lang)?);
    let thumbnails = config.http.is_some() && !once;
    let live = LiveSettings::new(reload::infer_settings(&config, labels, thumbnails));
    let in_flight = InFlight::default();
    let (queue_tx, queue_rx) = queue::bounded(config.workers.queue, in_flight.clone(), shutdown.clone());
    {
        let (depth, in_flight) = (queue_rx.clone(), in_flight.clone());
        metrics.observe_queue(move || depth.len(), move || in_flight.len());
    }
    metrics.set_model(&config.model.name, config.model.precision.as_str());
    let (done_tx, done_rx) = crossbeam_channel::bounded::<BatchDone>(config.workers.count * 2);
    // With [mqtt], the sink announces every durable row to the outbox the publisher reads.
    let tap = config.mqtt.is_some().then(LogTap::new);
    let folders = ArchiveFolders::default();
    folders.pin(&config);
    let sink = Sink::start(
        OutputSettings::from_config(&config),
        folders.clone(),
        done_rx,
        metrics.clone(),
        recent.clone(),
        health.lifeline("sink", &shutdown),
        tap.clone(),
    )?;
    let publisher = match tap {
        Some(tap) => Publisher::start(&config, tap, &metrics, health.lifeline("publisher", &shutdown), once)?,
        None => None,
    };
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let sink_control = sink.control();
    shutdown
        .trigger_on_signals(move || {
            sink_control.reopen();
            let _ = reload_tx.send(());
        })
        .map_err(|e| Fatal::io("cannot install signal handlers", e))?;
    let workers = Workers::start(
        live.clone(),
        &config.workers,
        queue_rx,
        done_tx,
        shutdown.clone(),
        metrics.clone(),
        health.clone(),
    )?;
    let upload_queue = queue_tx.clone();
    let feeder = Feeder::start(queue_tx, health.lifeline("feeder", &shutdown))?;
    // A one-off run leaves folders as they are; the daemon keeps them within [retention]'s limits.
    let retention = if once {
        None
    } else {
        let lifeline = health.lifeline("retention", &shutdown);
        let r = Retention::start(&config, folders.clone(), metrics.clone(), lifeline, shutdown.clone())
            .map_err(|e| Fatal::io("cannot start the retention thread", e))?;
        Some(r)
    };
    let stop_trimmer = Shutdown::new();
    let trimmer = crate::memory::start_trimmer(stop_trimmer.clone()).map_err(|e| Fatal::io("cannot start the memory trimmer thread", e))?;
    let started = Instant::now();

    let mut progress = None;
    if once {
        drop(upload_queue);
        let bar = crate::progress::bar(None);
        let stop_ticker = Shutdown::new();
        let ticker = bar.clone().map(|pb| spawn_progress(pb, metrics.clone(), stop_ticker.clone()));
        let found = watch::scan_backlog(&config.inboxes, &feeder.sender(), &shutdown);
        if let Some(pb) = &bar {
            pb.set_length(found as u64);
        }
        tracing::info!(images = found, "backlog queued");
        feeder.finish(); // closes the queue once everything is in it: workers drain it and stop
        workers.join();
        progress = bar.map(|pb| (pb, ticker, stop_ticker));
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("control")
            .enable_all()
            .build()
            .map_err(|e| Fatal::io("cannot start the async runtime", e))?;
        let control = Control {
            config,
            live,
            sink: sink.control(),
            feeder: feeder.sender(),
            metrics: metrics.clone(),
            systemd,
            thumbnails,
            watch: None,
            health: health.clone(),
            retention: retention.as_ref().map(Retention::control),
            folders,
        };
        runtime.block_on(serve(control, upload_queue, recent, reload_rx, shutdown.clone()))?;
        feeder.finish();
        workers.join();
    }
    if let Some(r) = retention {
        r.join();
    }
    stop_trimmer.trigger();
    if let Some(t) = trimmer {
        let _ = t.join();
    }
    let totals = sink.join();
    if let Some(p) = publisher {
        let figures = p.finish().figures();
        tracing::info!(published = figures.published, pending_rows = figures.pending, "publisher stopped");
    }
    if let Some((pb, ticker, stop_ticker)) = progress {
        stop_ticker.trigger();
        if let Some(t) = ticker {
            let _ = t.join();
        }
        pb.set_position(totals.ok + totals.errors);
        pb.finish();
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        ok = totals.ok,
        errors = totals.errors,
        seconds = format!("{secs:.2}"),
        images_per_s = format!("{:.1}", (totals.ok + totals.errors) as f64 / secs.max(1e-9)),
        "stopped"
    );
    tracing::info!("ms per image: {}", metrics.times.per_image(totals.ok + totals.errors));
    if let Some(f) = shutdown.failure() {
        return Err(Fatal::ThreadDied { thread: f.thread, reason: f.reason });
    }
    if once && shutdown.is_triggered() {
        return Err(Fatal::Unfinished("interrupted by a signal".into()));
    }
    Ok(totals)
}

/// The running service: watches, HTTP and systemd notifications; applies SIGHUP reloads until
/// shutdown.
async fn serve(
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
struct Control {
    config: Config,
    live: LiveSettings,
    sink: SinkControl,
    feeder: crossbeam_channel::Sender<queue::ReadyFile>,
    metrics: Metrics,
    systemd: Systemd,
    thumbnails: bool,
    watch: Option<(Watch, Shutdown)>,
    /// Not ready while the inboxes are not watched.
    health: Health,
    retention: Option<RetentionControl>,
    folders: ArchiveFolders,
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

/// Redraws `pb` from the metrics ten times a second (a display refresh, not a wait for events) until
/// shutdown, which ends it at once.
fn spawn_progress(pb: indicatif::ProgressBar, metrics: Metrics, shutdown: Shutdown) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        loop {
            pb.set_position(metrics.images("ok") + metrics.images("error"));
            if shutdown.wait_timeout(Duration::from_millis(100)) {
                pb.set_position(metrics.images("ok") + metrics.images("error"));
                return;
            }
        }
    })
}

/// `labeld classify`: label files and folders now, print one JSON record per image to stdout, write
/// nothing else. Returns how many images could not be labelled.
pub fn classify(config: Config, paths: &[PathBuf]) -> Result<Totals, Fatal> {
    crate::health::note_panics();
    let shutdown = Shutdown::new();
    let labels = Arc::new(Labels::load(&config.model.labels, config.model.labels_lang)?);
    let files = expand(&config, paths)?;
    let progress = crate::progress::bar(Some(files.len() as u64));
    let (queue_tx, queue_rx) = queue::bounded(config.workers.queue, InFlight::default(), shutdown.clone());
    let (done_tx, done_rx) = crossbeam_channel::bounded::<BatchDone>(config.workers.count * 2);
    let live = LiveSettings::new(reload::infer_settings(&config, labels, false));
    let workers = Workers::start(live, &config.workers, queue_rx, done_tx, shutdown.clone(), Metrics::new(), Health::new())?;
    let mut printer = InOrder::new(&files);
    let feeder = std::thread::spawn(move || {
        for f in files {
            queue_tx.push(queue::ReadyFile::new(f));
        }
    });
    let mut totals = Totals::default();
    let stdout = std::io::stdout();
    for batch in done_rx {
        let mut out = stdout.lock();
        for o in &batch.outcomes {
            let r = o.record(&batch.model, batch.min_score, Instant::now());
            match r.status {
                Status::Ok => totals.ok += 1,
                Status::Error => totals.errors += 1,
            }
            let line = serde_json::to_string(&r).map_err(|e| Fatal::Other(e.to_string()))?;
            printer.print(r.path, line, &mut out).map_err(|e| Fatal::io("cannot write to stdout", e))?;
        }
        out.flush().map_err(|e| Fatal::io("cannot write to stdout", e))?;
        if let Some(pb) = &progress {
            pb.inc(batch.outcomes.len() as u64);
        }
    }
    printer.finish(&mut stdout.lock()).map_err(|e| Fatal::io("cannot write to stdout", e))?;
    if let Some(pb) = progress {
        pb.finish();
    }
    let _ = feeder.join();
    workers.join();
    if let Some(f) = shutdown.failure() {
        return Err(Fatal::ThreadDied { thread: f.thread, reason: f.reason });
    }
    Ok(totals)
}

/// Prints classify's records in the order the files were given, though workers finish them in any
/// order; a record no file is waiting for is held until the end.
struct InOrder {
    order: Vec<String>,
    next: usize,
    held: Vec<(String, String)>,
}

impl InOrder {
    fn new(files: &[PathBuf]) -> InOrder {
        // Records carry their path the same lossy way.
        InOrder { order: files.iter().map(|f| f.to_string_lossy().into_owned()).collect(), next: 0, held: Vec::new() }
    }

    fn print(&mut self, path: String, line: String, out: &mut impl Write) -> std::io::Result<()> {
        self.held.push((path, line));
        while let Some(i) = self.order.get(self.next).and_then(|want| self.held.iter().position(|(p, _)| p == want)) {
            writeln!(out, "{}", self.held.remove(i).1)?;
            self.next += 1;
        }
        Ok(())
    }

    fn finish(self, out: &mut impl Write) -> std::io::Result<()> {
        for (_, line) in self.held {
            writeln!(out, "{line}")?;
        }
        out.flush()
    }
}

/// Files as given, plus every image under given folders (names matching the first inbox's `include`,
/// or the default patterns). Order is stable: as given, each folder's files sorted.
fn expand(config: &Config, paths: &[PathBuf]) -> Result<Vec<PathBuf>, Fatal> {
    let wants: Box<dyn Fn(&std::path::Path) -> bool> = match config.inboxes.first() {
        Some(ib) => {
            let ib = ib.clone();
            Box::new(move |p| ib.wants(p))
        }
        None => {
            let m = crate::config::image_matcher(&crate::config::default_include())
                .map_err(|e| Fatal::Other(e.to_string()))?;
            Box::new(move |p| crate::config::is_candidate_name(p, &m))
        }
    };
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
                .follow_links(false)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file() && wants(e.path()))
                .map(|e| e.into_path())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            // A link named on the command line is followed; a missing file gets an error record.
            out.push(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
        }
    }
    Ok(out)
}
