//! Wires the stages together for each command; no stage logic lives here.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::error::Fatal;
use crate::infer::BatchDone;
use crate::infer::labels::Labels;
use crate::infer::worker::Workers;
use crate::metrics::StageTimes;
use crate::queue::{self, InFlight};
use crate::shutdown::Shutdown;
use crate::sink::record::{Record, Status};
use crate::sink::{Sink, Totals};
use crate::watch::{self, Feeder, Watch};

/// `labeld run`: label the backlog, then (unless `once`) watch the inboxes until SIGTERM/SIGINT.
pub fn run(config: Config, once: bool) -> Result<Totals, Fatal> {
    let shutdown = Shutdown::new();
    let times = StageTimes::default();
    let labels = Arc::new(Labels::load(&config.model.labels)?);
    let in_flight = InFlight::default();
    let (queue_tx, queue_rx) = queue::bounded(config.workers.queue, in_flight.clone(), shutdown.clone());
    let (done_tx, done_rx) = crossbeam_channel::bounded::<BatchDone>(config.workers.count * 2);
    let sink = Sink::start(
        &config.csv,
        config.model.top_k,
        config.model.name.clone(),
        config.inboxes.clone(),
        in_flight,
        done_rx,
        config.workers.count * config.workers.max_batch * 2,
        times.clone(),
    )?;
    let reopen = sink.reopen_handle();
    shutdown
        .trigger_on_signals(move || reopen.request())
        .map_err(|e| Fatal::io("cannot install signal handlers", e))?;
    let workers =
        Workers::start(&config.model, &config.workers, labels, queue_rx, done_tx, shutdown.clone(), times.clone())?;
    let feeder = Feeder::start(queue_tx)?;
    let started = Instant::now();

    if once {
        let found = watch::scan_backlog(&config.inboxes, &feeder.sender(), &shutdown);
        tracing::info!(images = found, "backlog queued");
        feeder.finish(); // closes the queue once everything is in it: workers drain it and stop
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("control")
            .enable_all()
            .build()
            .map_err(|e| Fatal::io("cannot start the async runtime", e))?;
        runtime.block_on(async {
            let watch = Watch::start(config.inboxes.clone(), feeder.sender(), shutdown.clone())?;
            tracing::info!("ready");
            shutdown.wait().await;
            watch.join().await;
            Ok::<(), Fatal>(())
        })?;
        feeder.finish();
    }
    workers.join();
    let totals = sink.join();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        ok = totals.ok,
        errors = totals.errors,
        seconds = format!("{secs:.2}"),
        images_per_s = format!("{:.1}", (totals.ok + totals.errors) as f64 / secs.max(1e-9)),
        "stopped"
    );
    tracing::info!(model = %config.model.name, precision = config.model.precision.as_str(), "ms per image: {}", times.per_image(totals.ok + totals.errors));
    Ok(totals)
}

/// `labeld classify`: label files and folders now, print one JSON record per image to stdout, write
/// nothing else. Returns how many images could not be labelled.
pub fn classify(config: Config, paths: &[PathBuf]) -> Result<Totals, Fatal> {
    let shutdown = Shutdown::new();
    let labels = Arc::new(Labels::load(&config.model.labels)?);
    let files = expand(&config, paths)?;
    let (queue_tx, queue_rx) = queue::bounded(config.workers.queue, InFlight::default(), shutdown.clone());
    let (done_tx, done_rx) = crossbeam_channel::bounded::<BatchDone>(config.workers.count * 2);
    let workers =
        Workers::start(&config.model, &config.workers, labels, queue_rx, done_tx, shutdown, StageTimes::default())?;
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
            let r = Record::new(o, &config.model.name, Instant::now());
            match r.status {
                Status::Ok => totals.ok += 1,
                Status::Error => totals.errors += 1,
            }
            let line = serde_json::to_string(&r).map_err(|e| Fatal::Other(e.to_string()))?;
            writeln!(out, "{line}").map_err(|e| Fatal::io("cannot write to stdout", e))?;
        }
        out.flush().map_err(|e| Fatal::io("cannot write to stdout", e))?;
    }
    let _ = feeder.join();
    workers.join();
    Ok(totals)
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
