//! Sink: writes each image's JSON sidecar and CSV row, then releases it from the in-flight set.

pub mod record;
pub mod result_log;
pub mod sidecar;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::error::Fatal;
use crate::infer::BatchDone;
use crate::queue::InFlight;
use record::Record;
use result_log::ResultLog;

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub ok: u64,
    pub errors: u64,
}

pub struct Sink {
    handle: JoinHandle<Totals>,
}

impl Sink {
    /// Opens the results log (failing here is fatal) and starts writing results as batches arrive.
    /// The sink ends when every worker has dropped its sender.
    pub fn start(
        csv: &std::path::Path,
        top_k: usize,
        model: String,
        in_flight: InFlight,
        rx: Receiver<BatchDone>,
    ) -> Result<Sink, Fatal> {
        let log = ResultLog::open(csv, top_k)
            .map_err(|e| Fatal::io(format!("cannot open results log {} ([output] csv)", csv.display()), e))?;
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || run(log, model, in_flight, rx))
            .map_err(|e| Fatal::io("cannot start sink thread", e))?;
        Ok(Sink { handle })
    }

    pub fn join(self) -> Totals {
        self.handle.join().unwrap_or_default()
    }
}

fn run(mut log: ResultLog, model: String, in_flight: InFlight, rx: Receiver<BatchDone>) -> Totals {
    let mut totals = Totals::default();
    for batch in rx {
        let mut dirs = BTreeSet::<PathBuf>::new();
        for o in &batch.outcomes {
            let record = Record::new(o, &model, Instant::now());
            match &o.result {
                Ok(_) => totals.ok += 1,
                Err(e) => {
                    totals.errors += 1;
                    tracing::warn!(path = %o.file.path.display(), error = %e, "image not labelled");
                }
            }
            match sidecar::write(&record, &o.file.path) {
                Ok(_) => {
                    if let Some(d) = o.file.path.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                }
                Err(e) => tracing::error!(path = %o.file.path.display(), error = %e, "cannot write sidecar"),
            }
            if let Err(e) = log.append(&record) {
                tracing::error!(csv = %log.path().display(), error = %e, "cannot append to results log");
            }
        }
        if let Err(e) = log.flush() {
            tracing::error!(csv = %log.path().display(), error = %e, "cannot flush results log");
        }
        for d in dirs {
            if let Err(e) = sidecar::sync_dir(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot sync folder");
            }
        }
        for o in &batch.outcomes {
            in_flight.done(&o.file.path);
        }
    }
    if let Err(e) = log.flush() {
        tracing::error!(csv = %log.path().display(), error = %e, "cannot flush results log");
    }
    totals
}
