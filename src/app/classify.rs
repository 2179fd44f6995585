//! `labeld classify`: labels the given files and folders through the same workers, prints one JSON
//! record per image to stdout in the order given, and writes nothing else.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::error::Fatal;
use crate::health::Health;
use crate::infer::labels::Labels;
use crate::infer::worker::Workers;
use crate::infer::{BatchDone, LiveSettings};
use crate::metrics::Metrics;
use crate::queue::{self, InFlight};
use crate::reload;
use crate::shutdown::Shutdown;
use crate::sink::Totals;
use crate::vocab::Status;

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
            let r = o.record(&batch.model, batch.engine, batch.min_score, Instant::now());
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
