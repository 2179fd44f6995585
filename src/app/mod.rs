//! Wires the stages together for each command; no stage logic lives here. `Daemon::start` starts the
//! pipeline (sink, publisher, workers, feeder, retention) for `labeld run`; `once` labels the backlog
//! and stops, `serve` (serve.rs) watches and answers HTTP until SIGTERM. `classify` (classify.rs) labels
//! given files to stdout and writes nothing.

mod classify;
mod serve;

use std::time::{Duration, Instant};

pub use classify::classify;

use crate::config::Config;
use crate::error::Fatal;
use crate::health::Health;
use crate::infer::labels::Labels;
use crate::infer::worker::Workers;
use crate::infer::{BatchDone, LiveSettings};
use crate::ledger::ArchiveFolders;
use crate::metrics::{Metrics, PublishReport};
use crate::publish::Publisher;
use crate::queue::{self, InFlight, QueueSender};
use crate::reload;
use crate::retain::Retention;
use crate::shutdown::Shutdown;
use crate::sink::recent::Recent;
use crate::sink::result_log::LogTap;
use crate::sink::{OutputSettings, Sink, Totals};
use crate::systemd::Systemd;
use crate::watch::{self, Feeder};

/// `labeld run`: label the backlog, then (unless `once`) watch the inboxes until SIGTERM/SIGINT,
/// re-reading the config on SIGHUP.
pub fn run(config: Config, once: bool) -> Result<Totals, Fatal> {
    let daemon = Daemon::start(config, once)?;
    if once { daemon.label_backlog() } else { daemon.serve() }
}

/// The running pipeline of `labeld run`, from the queue to the publisher, and what the drivers share.
struct Daemon {
    config: Config,
    shutdown: Shutdown,
    metrics: Metrics,
    health: Health,
    systemd: Systemd,
    recent: Recent,
    live: LiveSettings,
    thumbnails: bool,
    folders: ArchiveFolders,
    sink: Sink,
    publisher: Option<Publisher>,
    workers: Workers,
    feeder: Feeder,
    upload_queue: QueueSender,
    retention: Option<Retention>,
    reload_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    trimmer: Option<(std::thread::JoinHandle<()>, Shutdown)>,
    started: Instant,
}

impl Daemon {
    fn start(config: Config, once: bool) -> Result<Daemon, Fatal> {
        crate::health::note_panics();
        let shutdown = Shutdown::new();
        let metrics = Metrics::new();
        let health = Health::new();
        let systemd = Systemd::from_env();
        let recent = Recent::default();
        let labels = std::sync::Arc::new(Labels::load(&config.model.labels, config.model.labels_lang)?);
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
            OutputSettings::from_config(&config, &live.get().labels),
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
        let trimmer = crate::memory::start_trimmer(stop_trimmer.clone())
            .map_err(|e| Fatal::io("cannot start the memory trimmer thread", e))?
            .map(|t| (t, stop_trimmer));
        Ok(Daemon {
            config,
            shutdown,
            metrics,
            health,
            systemd,
            recent,
            live,
            thumbnails,
            folders,
            sink,
            publisher,
            workers,
            feeder,
            upload_queue,
            retention,
            reload_rx,
            trimmer,
            started: Instant::now(),
        })
    }

    /// `--once`: queues every image in the inboxes, lets the workers drain the queue, and stops.
    fn label_backlog(self) -> Result<Totals, Fatal> {
        drop(self.upload_queue);
        let bar = crate::progress::bar(None);
        let stop_ticker = Shutdown::new();
        let ticker = bar.clone().map(|pb| spawn_progress(pb, self.metrics.clone(), stop_ticker.clone()));
        let found = watch::scan_backlog(&self.config.inboxes, &self.feeder.sender(), &self.shutdown);
        if let Some(pb) = &bar {
            pb.set_length(found as u64);
        }
        tracing::info!(images = found, "backlog queued");
        self.feeder.finish(); // closes the queue once everything is in it: workers drain it and stop
        self.workers.join();
        let (shutdown, metrics, started) = (self.shutdown.clone(), self.metrics.clone(), self.started);
        let totals = finish(self.sink, self.publisher, self.retention, self.trimmer, &metrics, started);
        stop_ticker.trigger();
        if let Some(t) = ticker {
            let _ = t.join();
        }
        if let Some(pb) = bar {
            pb.set_position(totals.ok + totals.errors);
            pb.finish();
        }
        if let Some(f) = shutdown.failure() {
            return Err(Fatal::ThreadDied { thread: f.thread, reason: f.reason });
        }
        if shutdown.is_triggered() {
            return Err(Fatal::Unfinished("interrupted by a signal".into()));
        }
        Ok(totals)
    }

    /// The service: runs `serve::serve` on a small async runtime until shutdown, then drains the pipeline.
    fn serve(self) -> Result<Totals, Fatal> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("control")
            .enable_all()
            .build()
            .map_err(|e| Fatal::io("cannot start the async runtime", e))?;
        let control = serve::Control {
            config: self.config,
            live: self.live,
            sink: self.sink.control(),
            feeder: self.feeder.sender(),
            metrics: self.metrics.clone(),
            systemd: self.systemd,
            thumbnails: self.thumbnails,
            watch: None,
            health: self.health.clone(),
            retention: self.retention.as_ref().map(Retention::control),
            folders: self.folders,
        };
        let served = runtime.block_on(serve::serve(control, self.upload_queue, self.recent, self.reload_rx, self.shutdown.clone()));
        if served.is_err() {
            self.shutdown.trigger(); // a start that failed (say, the HTTP port taken) stops after the batch in flight
        }
        self.feeder.finish();
        self.workers.join();
        let totals = finish(self.sink, self.publisher, self.retention, self.trimmer, &self.metrics, self.started);
        served?;
        if let Some(f) = self.shutdown.failure() {
            return Err(Fatal::ThreadDied { thread: f.thread, reason: f.reason });
        }
        Ok(totals)
    }
}

/// Once the workers are done: the retention and trimmer threads stop, the sink writes what is left,
/// the publisher sends what it can; logs the totals.
fn finish(
    sink: Sink,
    publisher: Option<Publisher>,
    retention: Option<Retention>,
    trimmer: Option<(std::thread::JoinHandle<()>, Shutdown)>,
    metrics: &Metrics,
    started: Instant,
) -> Totals {
    if let Some(r) = retention {
        r.join();
    }
    if let Some((t, stop)) = trimmer {
        stop.trigger();
        let _ = t.join();
    }
    let totals = sink.join();
    if let Some(p) = publisher {
        let figures = p.finish().figures();
        tracing::info!(published = figures.published, pending_rows = figures.pending, "publisher stopped");
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
    totals
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

