//! Sink: for each batch, appends the CSV rows (fsynced), then writes each image's JSON sidecar, then
//! releases the images from the in-flight set. Failed images can be moved to their inbox's quarantine.
//!
//! Output failures (disk full, read-only folder) do not lose results: what could not be written is
//! kept and retried with back-off (0.5 s doubling to 30 s), and the images stay in flight meanwhile.

pub mod record;
pub mod result_log;
pub mod sidecar;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::config::InboxConfig;
use crate::error::{Fatal, ImageError};
use crate::infer::{BatchDone, Outcome};
use crate::metrics::{Stage, StageTimes};
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
    reopen: Arc<AtomicBool>,
}

/// Set by SIGHUP: the results log is reopened before the next write.
#[derive(Clone)]
pub struct ReopenLog(Arc<AtomicBool>);

impl ReopenLog {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Sink {
    /// Opens the results log (failing here is fatal) and starts writing results as batches arrive.
    /// The sink ends when every worker has dropped its sender.
    pub fn start(
        csv: &Path,
        top_k: usize,
        model: String,
        inboxes: Vec<InboxConfig>,
        in_flight: InFlight,
        rx: Receiver<BatchDone>,
        in_flight_max: usize,
        times: StageTimes,
    ) -> Result<Sink, Fatal> {
        let log = ResultLog::open(csv, top_k)
            .map_err(|e| Fatal::io(format!("cannot open results log {} ([output] csv)", csv.display()), e))?;
        finish_interrupted_batch(&log, in_flight_max);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            log,
            model,
            inboxes,
            in_flight,
            reopen: reopen.clone(),
            rows: Vec::new(),
            sidecars: Vec::new(),
            backoff: Backoff::default(),
            totals: Totals::default(),
            times,
        };
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Fatal::io("cannot start sink thread", e))?;
        Ok(Sink { handle, reopen })
    }

    pub fn reopen_handle(&self) -> ReopenLog {
        ReopenLog(self.reopen.clone())
    }

    pub fn join(self) -> Totals {
        self.handle.join().unwrap_or_default()
    }
}

/// A crash between a batch's CSV rows and its sidecars leaves images whose row exists but whose
/// sidecar does not. Their result is in the row: write the sidecar from it instead of labelling the
/// image again (which would add a second row). Only the last `n` rows can be in that state.
fn finish_interrupted_batch(log: &ResultLog, n: usize) {
    let mut done = 0;
    for record in log.last_records(n) {
        let image = PathBuf::from(&record.path);
        let Ok(meta) = std::fs::symlink_metadata(&image) else { continue };
        if !meta.is_file() || sidecar::is_labelled(&image) {
            continue;
        }
        // The row must be about this version of the file, not one replaced since.
        let row_time = humantime::parse_rfc3339(&record.time).ok();
        if !matches!((row_time, meta.modified()), (Some(t), Ok(m)) if m <= t) {
            continue;
        }
        match sidecar::write(&record, &image) {
            Ok(_) => done += 1,
            Err(e) => tracing::warn!(path = %image.display(), error = %e, "cannot complete sidecar from the results log"),
        }
    }
    if done > 0 {
        tracing::info!(sidecars = done, "completed the sidecars of a batch interrupted by a crash, from the results log");
    }
}

#[derive(Default)]
struct Backoff {
    delay: Option<Duration>,
    next: Option<Instant>,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        let d = self.delay.map_or(Duration::from_millis(500), |d| (d * 2).min(Duration::from_secs(30)));
        self.delay = Some(d);
        self.next = Some(Instant::now() + d);
        d
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    fn due(&self) -> bool {
        self.next.is_none_or(|t| Instant::now() >= t)
    }
}

struct Writer {
    log: ResultLog,
    model: String,
    inboxes: Vec<InboxConfig>,
    in_flight: InFlight,
    reopen: Arc<AtomicBool>,
    /// CSV rows not yet written.
    rows: Vec<Record>,
    /// Sidecars not yet written: (record, image path).
    sidecars: Vec<(Record, PathBuf)>,
    backoff: Backoff,
    totals: Totals,
    times: StageTimes,
}

impl Writer {
    fn run(mut self, rx: Receiver<BatchDone>) -> Totals {
        loop {
            let wait = if self.rows.is_empty() && self.sidecars.is_empty() {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(100)
            };
            match rx.recv_timeout(wait) {
                Ok(batch) => self.accept(batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.reopen.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.log.reopen() {
                    tracing::error!(csv = %self.log.path().display(), error = %e, "cannot reopen results log");
                }
            }
            if self.backoff.due() {
                self.flush();
            }
        }
        self.flush();
        if !self.rows.is_empty() || !self.sidecars.is_empty() {
            tracing::error!(
                rows = self.rows.len(),
                sidecars = self.sidecars.len(),
                "stopping with results that could not be written; images without a sidecar are labelled again at the next start"
            );
        }
        self.totals
    }

    fn accept(&mut self, batch: BatchDone) {
        for o in batch.outcomes {
            let o = self.quarantine(o);
            let record = Record::new(&o, &self.model, Instant::now());
            match &o.result {
                Ok(_) => self.totals.ok += 1,
                Err(e) => {
                    self.totals.errors += 1;
                    tracing::warn!(path = %o.file.path.display(), error = %e, "image not labelled");
                }
            }
            // A file that vanished before it was read gets its CSV row but no sidecar beside nothing.
            if !matches!(o.result, Err(ImageError::Vanished)) {
                self.sidecars.push((record.clone(), o.file.path.clone()));
            } else {
                self.in_flight.done(&o.file.path);
            }
            self.rows.push(record);
        }
        self.flush();
    }

    /// Writes pending rows, then pending sidecars (only once their rows are safely in the log).
    fn flush(&mut self) {
        let t = Instant::now();
        self.write_pending();
        self.times.add(Stage::Write, t.elapsed());
    }

    fn write_pending(&mut self) {
        if !self.rows.is_empty() {
            match self.log.append(&self.rows) {
                Ok(()) => self.rows.clear(),
                Err(e) => {
                    let retry = self.backoff.failed();
                    tracing::error!(csv = %self.log.path().display(), error = %e, rows = self.rows.len(), retry_in = ?retry, "cannot write to results log");
                }
            }
        }
        if self.sidecars.is_empty() {
            return;
        }
        let pending_rows: BTreeSet<&str> = self.rows.iter().map(|r| r.path.as_str()).collect();
        let mut dirs = BTreeSet::<PathBuf>::new();
        let mut failed = Vec::new();
        let mut first_error = None;
        for (record, image) in std::mem::take(&mut self.sidecars) {
            if pending_rows.contains(record.path.as_str()) {
                failed.push((record, image));
                continue;
            }
            match sidecar::write(&record, &image) {
                Ok(_) => {
                    if let Some(d) = image.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                    self.in_flight.done(&image);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| (image.clone(), e.to_string()));
                    failed.push((record, image));
                }
            }
        }
        for d in dirs {
            if let Err(e) = sidecar::sync_dir(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot sync folder");
            }
        }
        self.sidecars = failed;
        if let Some((image, e)) = first_error {
            let retry = self.backoff.failed();
            tracing::error!(path = %image.display(), error = %e, pending = self.sidecars.len(), retry_in = ?retry, "cannot write sidecar");
        } else if self.rows.is_empty() {
            self.backoff.succeeded();
        }
    }

    /// Moves a failed image into its inbox's quarantine folder (same relative path), if one is set.
    fn quarantine(&self, mut o: Outcome) -> Outcome {
        let Err(err) = &o.result else { return o };
        if matches!(err, ImageError::Vanished) {
            return o;
        }
        let Some(ib) = self.inboxes.iter().find(|ib| o.file.path.starts_with(&ib.path)) else { return o };
        let Some(q) = &ib.quarantine else { return o };
        let Ok(rel) = o.file.path.strip_prefix(&ib.path) else { return o };
        let dest = q.join(rel);
        let moved = dest.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| move_file(&o.file.path, &dest));
        match moved {
            Ok(()) => {
                tracing::info!(from = %o.file.path.display(), to = %dest.display(), "moved to quarantine");
                let old = std::mem::replace(&mut o.file.path, dest);
                // The image left the inbox: release its old path too.
                self.in_flight.done(&old);
            }
            Err(e) => tracing::error!(path = %o.file.path.display(), quarantine = %q.display(), error = %e, "cannot move to quarantine; error sidecar stays beside the image"),
        }
        o
    }
}

fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: quarantine on another filesystem.
            std::fs::copy(from, to)?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}
