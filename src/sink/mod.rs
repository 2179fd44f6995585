//! Sink: for each batch, appends the CSV rows (fsynced), then writes each image's JSON sidecar, then
//! sets the image aside (ok → `on_done`, failed → the inbox's quarantine) and releases it from the
//! in-flight set. That order is the exactly-once promise (invariants I1, I4, I5 in docs/design.md): an
//! image leaves the inbox only with a durable row and sidecar, and an image with a row but no sidecar
//! (crash, stop) gets its sidecar from the row at the next start instead of a second labelling.
//!
//! Rows and sidecars keep the path the image was found at in the inbox, also for images moved to
//! `done_dir` or quarantine afterwards (possibly under a numbered name, `IMG_0001~1.jpg`).
//!
//! Output failures (disk full, read-only folder) do not lose results: what could not be written is
//! kept and retried with back-off (0.5 s doubling to 30 s), and the images stay in flight meanwhile.
//! An image that could not be set aside (its archive folder full, unavailable or replaced) stays in
//! its inbox with its row and sidecar and is tried again with back-off (0.5 s doubling to 5 min).
//!
//! The sink is one thread that blocks on its inputs: results from the workers, commands (reopen the
//! log, new settings, a stuck worker's images to record) and the deadline of the next retry.

pub mod archive;
pub mod hourly;
pub mod log_tap;
pub mod recent;
pub mod relocate;
pub mod route;
pub mod result_log;
pub mod sidecar;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::backoff::Backoff;
use crate::beneath::{self, Beneath};
use crate::vocab::Identity;
use crate::config::{Config, InboxConfig, LabelSource, LabelsLang};
use crate::error::{Fatal, ImageError};
use crate::health::Lifeline;
use crate::infer::{BatchDone, Outcome};
use crate::metrics::{Metrics, Stage};
use crate::job::{Claim, Job, Source};
use crate::config::Route;
use crate::infer::labels::Labels;
use crate::ledger::ArchiveFolders;
use recent::Recent;
use route::{DriftLabels, FolderNames};
use result_log::{LogTap, ResultLog};
use crate::vocab::results_log::Columns;
use crate::vocab::{Record, Status};

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub ok: u64,
    pub errors: u64,
}

/// What made a batch's results, as its records name it.
#[derive(Clone, Copy)]
struct MadeBy<'a> {
    model: &'a str,
    engine: Option<&'static str>,
    min_score: Option<f32>,
}

/// The parts of the config the sink uses; replaced as a whole on reload.
#[derive(Debug, Clone)]
pub struct OutputSettings {
    pub csv: PathBuf,
    pub columns: Columns,
    pub inboxes: Vec<InboxConfig>,
    /// The model's name, for records the workers did not make (a stuck worker's images).
    pub model: String,
    /// `[[route]]`, in order.
    pub routes: Vec<Route>,
    /// The folder name of each of the model's labels (`{label}`).
    pub names: Arc<FolderNames>,
    /// The label values of the drift metrics.
    pub drift: Arc<DriftLabels>,
}

impl OutputSettings {
    pub fn from_config(c: &Config, labels: &Labels) -> Self {
        let english = c.model.labels == LabelSource::ImageNet && c.model.labels_lang != LabelsLang::En;
        let names = if c.routes.is_empty() { FolderNames::default() } else { FolderNames::new((0..labels.len()).map(|i| labels.name(i))) };
        OutputSettings {
            csv: c.output.csv.clone(),
            columns: Columns { top_k: c.model.top_k, english, confident: c.model.min_score.is_some(), route: !c.routes.is_empty() },
            inboxes: c.inboxes.clone(),
            model: c.model.name.clone(),
            routes: c.routes.clone(),
            names: Arc::new(names),
            drift: Arc::new(DriftLabels::new(&c.routes, |i| labels.name(i).to_string())),
        }
    }
}

pub struct Sink {
    handle: JoinHandle<Totals>,
    control: SinkControl,
}

/// What the running sink is asked to do besides writing results; each is done between batches.
enum Command {
    /// Reopen the results log (SIGHUP, after logrotate `create`).
    Reopen,
    /// New settings from a reload.
    Reconfigure(OutputSettings),
    /// The images of a worker stuck for `secs` in thread `thread`: each gets an error record now.
    Hung { thread: String, secs: u64, jobs: Vec<Job> },
}

/// Asks the running sink to reopen its log, take new settings, or record a stuck worker's images.
#[derive(Clone)]
pub struct SinkControl {
    tx: crossbeam_channel::Sender<Command>,
}

impl SinkControl {
    pub fn reopen(&self) {
        let _ = self.tx.send(Command::Reopen);
    }

    pub fn reconfigure(&self, s: OutputSettings) {
        let _ = self.tx.send(Command::Reconfigure(s));
    }

    /// Records `jobs` as not labelled because their worker `thread` was stuck for `secs`: so that after
    /// the restart the watchdog causes they are not tried again.
    pub fn hung(&self, thread: &str, secs: u64, jobs: Vec<Job>) {
        let _ = self.tx.send(Command::Hung { thread: thread.to_string(), secs, jobs });
    }
}

impl Sink {
    /// Opens the results log (failing here is fatal), completes what a crash interrupted, and starts
    /// writing results as batches arrive. With a `tap`, every durable append is announced to the outbox. The sink ends when every worker has dropped its sender.
    pub fn start(
        settings: OutputSettings,
        folders: ArchiveFolders,
        rx: Receiver<BatchDone>,
        metrics: Metrics,
        recent: Recent,
        lifeline: Lifeline,
        tap: Option<LogTap>,
    ) -> Result<Sink, Fatal> {
        let log = ResultLog::open_tapped(&settings.csv, settings.columns, tap)
            .map_err(|e| Fatal::io(format!("cannot open results log {} ([output] csv)", settings.csv.display()), e))?;
        finish_interrupted_batches(&log, &settings.inboxes, &recent, &settings.drift);
        for ib in &settings.inboxes {
            archive::finish(ib, &folders, !settings.routes.is_empty());
        }
        metrics.track_labels(settings.drift.values());
        let (tx, commands) = crossbeam_channel::unbounded();
        let control = SinkControl { tx };
        let writer = Writer {
            log,
            inboxes: settings.inboxes,
            folders,
            model: settings.model,
            routes: settings.routes,
            names: settings.names,
            drift: settings.drift,
            rows: Vec::new(),
            sidecars: Vec::new(),
            backoff: Backoff::new(WRITE_RETRY_FIRST, WRITE_RETRY_MAX),
            asides: Vec::new(),
            totals: Totals::default(),
            metrics,
            recent,
            abandoned: HashSet::new(),
            orphans: HashMap::new(),
            faults: HashMap::new(),
        };
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let _line = lifeline;
                writer.run(rx, commands)
            })
            .map_err(|e| Fatal::io("cannot start sink thread", e))?;
        Ok(Sink { handle, control })
    }

    pub fn control(&self) -> SinkControl {
        self.control.clone()
    }

    pub fn join(self) -> Totals {
        self.handle.join().unwrap_or_default()
    }
}

/// A crash or a stop between a batch's CSV rows and its sidecars leaves images whose row exists but
/// whose sidecar does not (a stop while sidecar writes kept failing can leave any number of them).
/// Their result is in the row: write the sidecar from it instead of labelling the image again (which
/// would add a second row). Cost: one sequential read of the whole log at start and a stat per row;
/// memory holds only the rows whose image still needs its sidecar.
/// The same read fills the status page's drift chart, so it survives restarts.
fn finish_interrupted_batches(log: &ResultLog, inboxes: &[InboxConfig], recent: &Recent, drift: &DriftLabels) {
    let records = match log.records() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(csv = %log.path().display(), error = %e, "cannot read the results log back; images with a row but no sidecar will be labelled again");
            return;
        }
    };
    let started = Instant::now();
    let mut rows = 0u64;
    // The latest row of a path decides: an image labelled, replaced and labelled again has two.
    let mut missing = HashMap::<String, Record>::new();
    for record in records {
        rows += 1;
        if let Some(top) = record.top.as_ref().and_then(|t| t.first()) {
            recent.count_hour(&record, drift.of(&top.label));
        }
        if needs_sidecar(&record, inboxes) {
            missing.insert(record.path.clone(), record);
        } else {
            missing.remove(&record.path);
        }
    }
    tracing::info!(csv = %log.path().display(), rows, missing = missing.len(), seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "results log read back");
    let mut done = 0;
    for record in missing.into_values() {
        let image = PathBuf::from(&record.path);
        let root = beneath::root_of(inboxes.iter().map(|i| i.path.as_path()), &image);
        match sidecar::write(&record, root, &image) {
            Ok(_) => done += 1,
            Err(e) => tracing::warn!(path = %image.display(), error = %e, "cannot complete sidecar from the results log; the image will be labelled again"),
        }
    }
    if done > 0 {
        tracing::info!(sidecars = done, "completed sidecars from the results log (rows written before a crash or stop, sidecars not)");
    }
}

/// The row's image is still there, has no up-to-date sidecar, and is the version the row is about.
fn needs_sidecar(record: &Record, inboxes: &[InboxConfig]) -> bool {
    let image = Path::new(&record.path);
    let Ok(meta) = std::fs::symlink_metadata(image) else { return false };
    let root = beneath::root_of(inboxes.iter().map(|i| i.path.as_path()), image);
    if !meta.is_file() || crate::labelled::is_labelled_under(root, image) {
        return false;
    }
    // Not a file replaced since the row was written.
    match record.file {
        Some(id) => id == Identity::of(&meta),
        None => {
            let row_time = humantime::parse_rfc3339(&record.time).ok();
            matches!((row_time, meta.modified()), (Some(t), Ok(m)) if m <= t)
        }
    }
}

const FAULT_RETRY_FIRST: Duration = Duration::from_millis(500);
const FAULT_RETRY_MAX: Duration = Duration::from_secs(300);
const WRITE_RETRY_FIRST: Duration = Duration::from_millis(500);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);
const MAX_FAULTS_TRACKED: usize = 100_000;

/// An image with its row and sidecar that could not be set aside yet (its archive folder full,
/// unavailable or replaced): tried again with back-off; it waits in its inbox meanwhile.
struct Aside {
    image: PathBuf,
    status: Status,
    /// Its record, whose route (if any) says where it goes.
    record: Record,
    /// The device and inode of the file that was labelled.
    expect: Option<(u64, u64)>,
    tries: u32,
    next: Instant,
}

/// A result whose sidecar is not written yet. It holds the job, and so the image's claim: the image
/// is not labelled again until its result is written.
struct Pending {
    record: Record,
    /// Where the image is now.
    image: PathBuf,
    job: Job,
}

struct Writer {
    log: ResultLog,
    inboxes: Vec<InboxConfig>,
    /// The done and quarantine folders, pinned (at start and by each reload).
    folders: ArchiveFolders,
    /// The model's name, for a stuck worker's records.
    model: String,
    routes: Vec<Route>,
    names: Arc<FolderNames>,
    drift: Arc<DriftLabels>,
    /// CSV rows not yet written.
    rows: Vec<Record>,
    /// Sidecars not yet written.
    sidecars: Vec<Pending>,
    /// When rows and sidecars that failed are written again.
    backoff: Backoff,
    asides: Vec<Aside>,
    totals: Totals,
    metrics: Metrics,
    recent: Recent,
    /// Read faults per image not yet read since, for the retry back-off.
    faults: HashMap<PathBuf, u32>,
    /// Images recorded as hung (by path and queue time): a result arriving for one later is dropped.
    abandoned: HashSet<(PathBuf, Instant)>,
    /// Rows written whose image left before its sidecar could be placed (its folder moved out and
    /// back, renamed away), by the identity of the file version: found again under another path, the
    /// same version gets its sidecar from that row instead of a second row.
    orphans: HashMap<Identity, Record>,
}

impl Writer {
    fn run(mut self, rx: Receiver<BatchDone>, mut commands: Receiver<Command>) -> Totals {
        loop {
            let retry = self.next_retry().map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            crossbeam_channel::select! {
                recv(rx) -> batch => match batch {
                    Ok(batch) => {
                        self.accept(batch);
                        crate::memory::busy();
                    }
                    Err(_) => break, // every worker is done
                },
                recv(commands) -> command => match command {
                    Ok(c) => self.command(c),
                    Err(_) => commands = crossbeam_channel::never(),
                },
                recv(retry) -> _ => {}
            }
            let now = Instant::now();
            if self.backoff.due(now) {
                self.flush();
            }
            self.retry_asides(now);
        }
        self.flush();
        if !self.rows.is_empty() || !self.sidecars.is_empty() {
            tracing::error!(
                rows = self.rows.len(),
                sidecars = self.sidecars.len(),
                "stopping with results that could not be written; images with a row get their sidecar from the results log at the next start, images without one are labelled again"
            );
        }
        self.totals
    }

    /// When the sink must wake without input: rows or sidecars to write again, or an image to set aside.
    fn next_retry(&self) -> Option<Instant> {
        let writes = (!self.rows.is_empty() || !self.sidecars.is_empty()).then(|| self.backoff.next()).flatten();
        writes.into_iter().chain(self.asides.iter().map(|a| a.next)).min()
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Reopen => {
                if let Err(e) = self.log.reopen() {
                    tracing::error!(csv = %self.log.path().display(), error = %e, "cannot reopen results log");
                }
            }
            Command::Reconfigure(next) => self.reconfigure(next),
            Command::Hung { thread, secs, jobs } => {
                let now = Instant::now();
                let outcomes = jobs
                    .into_iter()
                    .map(|job| Outcome { job, result: Err(ImageError::Hung { thread: thread.clone(), secs }), finished_at: now, thumb: None })
                    .collect();
                self.accept(BatchDone { outcomes, model: Arc::from(self.model.as_str()), engine: None, min_score: None });
            }
        }
    }

    /// New settings from a reload. Rows not yet written go to the new log.
    fn reconfigure(&mut self, next: OutputSettings) {
        self.model = next.model.clone();
        if next.csv != self.log.path() || next.columns != self.log.columns() {
            match ResultLog::open_tapped(&next.csv, next.columns, self.log.tap()) {
                Ok(log) => {
                    tracing::info!(csv = %next.csv.display(), "results log now {}", next.csv.display());
                    self.log = log;
                }
                Err(e) => tracing::error!(csv = %next.csv.display(), error = %e, "cannot open the new results log; still writing to {}", self.log.path().display()),
            }
        }
        // Also with unchanged settings: a reload may have made an archive folder usable again, and
        // images labelled while it was not are still in their inbox.
        for ib in &next.inboxes {
            archive::finish(ib, &self.folders, !next.routes.is_empty());
        }
        self.inboxes = next.inboxes;
        self.routes = next.routes;
        self.names = next.names;
        self.metrics.track_labels(next.drift.values());
        self.drift = next.drift;
    }

    fn accept(&mut self, batch: BatchDone) {
        let BatchDone { outcomes, model, engine, min_score } = batch;
        let made_by = MadeBy { model: &model, engine, min_score };
        for o in outcomes {
            match &o.job.source {
                // An HTTP upload's result goes back to its client only: no row, no sidecar.
                Source::Upload(u) => {
                    let record = self.count(&o, made_by);
                    let _ = u.reply.try_send(record);
                }
                Source::Inbox(claim) => {
                    let path = claim.path().to_path_buf();
                    let key = (path.clone(), o.job.ready_at);
                    if matches!(o.result, Err(ImageError::Hung { .. })) {
                        self.abandoned.insert(key);
                    } else if self.abandoned.remove(&key) {
                        tracing::warn!(path = %path.display(), "a stuck worker finished after all; its image already has a hung record, result dropped");
                        continue;
                    }
                    if let Err(ImageError::Fault(e)) = &o.result {
                        self.retry_later(claim, e);
                        continue;
                    }
                    self.faults.remove(&path);
                    self.keep(o, made_by);
                }
            }
            // Dropping the outcome here releases its image's claim, unless a pending sidecar holds it.
        }
        self.flush();
    }

    /// Counts a result in the metrics and the status page's recent list; returns its record.
    fn count(&self, o: &Outcome, by: MadeBy) -> Record {
        let now = Instant::now();
        let record = o.record(by.model, by.engine, by.min_score, now);
        self.metrics.image_done(record.status.as_str(), now.saturating_duration_since(o.job.ready_at));
        self.recent.push(record.clone(), o.thumb.clone());
        record
    }

    /// A passing fault is not a verdict on the image: no record; the image is tried again after a
    /// back-off that doubles per failure (0.5 s to 5 min), so a permission fixed later is picked up.
    /// Invariant I8 (docs/design.md): only a verdict about the image is a permanent record.
    fn retry_later(&mut self, claim: &Claim, error: &str) {
        let tries = self.faults.entry(claim.path().to_path_buf()).or_insert(0);
        *tries += 1;
        let delay = Backoff::new(FAULT_RETRY_FIRST, FAULT_RETRY_MAX).delay_after(*tries);
        self.metrics.read_faults.inc();
        tracing::warn!(path = %claim.path().display(), error, tries = *tries, retry_in = ?delay, "cannot read image now; not recorded, retried");
        claim.retry_after(delay);
        if self.faults.len() > MAX_FAULTS_TRACKED {
            // Only the back-off length is lost: a forgotten path restarts at the first delay.
            self.faults.clear();
        }
    }

    /// Where the job's image is now: its path, or, if its folder was renamed while it was in flight,
    /// the same name in the folder's new place. `None` once it is gone (deleted, moved out of the
    /// inbox, its folder deleted); only "not found" counts as gone.
    fn locate(&self, job: &Job) -> Option<PathBuf> {
        let path = job.path()?;
        let root = beneath::root_of(self.inboxes.iter().map(|i| i.path.as_path()), path);
        let here = match &job.folder {
            Some(dir) => beneath::folder_path(dir, root)?.join(path.file_name()?),
            None => path.to_path_buf(),
        };
        match Beneath::new(root, &here).and_then(|b| b.metadata()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            _ => Some(here),
        }
    }

    /// Queues an inbox image's row and sidecar for writing, under the path the image has now.
    fn keep(&mut self, o: Outcome, made_by: MadeBy) {
        let found = o.job.path().map(Path::to_path_buf).unwrap_or_default();
        // A file that vanished before it was read, or since (deleted, or moved away: a file moved
        // within the inbox is queued again under its new path), gets no row and no sidecar.
        let here = match (&o.result, self.locate(&o.job)) {
            (Err(ImageError::Vanished), _) | (_, None) => {
                tracing::info!(path = %found.display(), "gone from its path before its result was written; no row");
                return;
            }
            (_, Some(here)) => here,
        };
        if here != found {
            tracing::info!(path = %found.display(), now = %here.display(), "its folder was renamed while it was labelled; recorded under its new path");
        }
        if let Some(row) = o.job.identity.and_then(|id| self.orphans.remove(&id)) {
            tracing::info!(path = %here.display(), row = %row.path, "this file already has a row (written before it moved); its sidecar is written from that row, no second row");
            self.sidecars.push(Pending { record: row, image: here, job: o.job });
            return;
        }
        let mut record = self.count(&o, made_by);
        record.path = here.to_string_lossy().into_owned();
        // Decided now, from the record alone, and written with the row: a restart completes the same route.
        if let Some(ib) = self.inboxes.iter().find(|ib| here.starts_with(&ib.path)) {
            let decided = route::decide(&self.routes, &record, &ib.name, &self.names);
            let unsure = decided.as_ref().is_some_and(|(i, _)| self.routes.get(*i).is_some_and(route::is_for_unsure));
            record.route = decided.map(|(_, r)| r);
            if let Some(top) = record.top.as_ref().and_then(|t| t.first()).filter(|_| record.status == Status::Ok) {
                self.metrics.top1(self.drift.of(&top.label), top.score, unsure);
                self.recent.count_hour(&record, self.drift.of(&top.label));
            }
        }
        match &o.result {
            Ok(_) => self.totals.ok += 1,
            Err(e) => {
                self.totals.errors += 1;
                tracing::warn!(path = %here.display(), error = %e, "image not labelled");
            }
        }
        self.sidecars.push(Pending { record: record.clone(), image: here, job: o.job });
        self.rows.push(record);
    }

    /// Writes pending rows, then pending sidecars (only once their rows are safely in the log).
    /// Invariant I1 (docs/design.md): a row is durable before its sidecar.
    fn flush(&mut self) {
        let t = Instant::now();
        self.write_pending();
        self.metrics.times.add(Stage::Write, t.elapsed());
    }

    fn write_pending(&mut self) {
        if !self.rows.is_empty() {
            match self.log.append(&self.rows) {
                Ok(()) => self.rows.clear(),
                Err(e) => {
                    self.metrics.csv_write_errors.inc();
                    let retry = self.backoff.failed(Instant::now());
                    tracing::error!(csv = %self.log.path().display(), error = %e, rows = self.rows.len(), retry_in = ?retry, "cannot write to results log");
                }
            }
        }
        if self.sidecars.is_empty() {
            return;
        }
        let pending_rows: BTreeSet<&str> = self.rows.iter().map(|r| r.path.as_str()).collect();
        let mut dirs = BTreeMap::<PathBuf, OwnedFd>::new();
        let mut failed = Vec::new();
        let mut done = Vec::new();
        let mut first_error = None;
        let mut orphans = Vec::new();
        for mut p in std::mem::take(&mut self.sidecars) {
            if pending_rows.contains(p.record.path.as_str()) {
                failed.push(p);
                continue;
            }
            let written = self.write_sidecar(&mut p);
            match written {
                Ok(dir) => {
                    if let Some(d) = p.image.parent() {
                        dirs.insert(d.to_path_buf(), dir);
                    }
                    done.push(p);
                }
                // The image's folder is gone or became a link: its row stands; a sidecar cannot be placed.
                Err(e @ sidecar::WriteError::NoFolder(_)) => {
                    tracing::warn!(path = %p.image.display(), error = %e, "no sidecar written; the CSV row stands");
                    orphans.push(p);
                }
                Err(e) => {
                    self.metrics.sidecar_write_errors.inc();
                    first_error.get_or_insert_with(|| (p.image.clone(), e.to_string()));
                    failed.push(p);
                }
            }
        }
        for (d, fd) in dirs {
            if let Err(e) = beneath::sync_dir(&fd) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot sync folder");
            }
        }
        // Invariant I4 (docs/design.md): recorded for good (row fsynced, sidecar written and synced), only
        // now may the image leave the inbox, and only then is its claim released (when `p` is dropped).
        for p in done {
            self.set_aside(&p);
        }
        for p in orphans {
            self.remember_orphan(p);
        }
        self.sidecars = failed;
        if let Some((image, e)) = first_error {
            let retry = self.backoff.failed(Instant::now());
            tracing::error!(path = %image.display(), error = %e, pending = self.sidecars.len(), retry_in = ?retry, "cannot write sidecar");
        } else if self.rows.is_empty() {
            self.backoff.succeeded();
        }
    }

    /// Writes the sidecar beside the job's image. Through the folder the image was read from, while
    /// that folder is inside the inbox and still holds the image: so a folder renamed (or swapped with
    /// another of the same layout) after the row was written cannot put it beside another image.
    /// Invariant I7 (docs/design.md): nothing is written outside the configured folders.
    /// `p.image` becomes where the image is now. By path only for a job without a held folder.
    fn write_sidecar(&self, p: &mut Pending) -> Result<OwnedFd, sidecar::WriteError> {
        let gone = |why: &str| sidecar::WriteError::NoFolder(std::io::Error::new(std::io::ErrorKind::NotFound, why.to_string()));
        let (Some(dir), Some(path), Some(id)) = (&p.job.folder, p.job.path(), p.job.identity) else {
            let root = beneath::root_of(self.inboxes.iter().map(|i| i.path.as_path()), &p.image);
            return sidecar::write(&p.record, root, &p.image);
        };
        let name = path.file_name().unwrap_or_default();
        let root = beneath::root_of(self.inboxes.iter().map(|i| i.path.as_path()), path);
        let folder = beneath::folder_path(dir, root).ok_or_else(|| gone("its folder left the inbox or was deleted"))?;
        if beneath::key_in(dir, name).ok() != Some((id.dev, id.inode)) {
            return Err(gone("the image left its folder or was replaced"));
        }
        let here = folder.join(name);
        if here != p.image {
            tracing::info!(path = %p.image.display(), now = %here.display(), "its folder was renamed after its row was written; sidecar written beside it");
            p.image = here;
        }
        sidecar::write_in(&p.record, dir, name)?;
        Ok(dir.try_clone()?)
    }

    /// An ok image goes per its inbox's on_done, a failed one to its quarantine (both with their sidecar).
    fn remember_orphan(&mut self, p: Pending) {
        let Some(id) = p.job.identity else { return };
        if self.orphans.len() >= MAX_FAULTS_TRACKED {
            // Only the second-row protection for long-gone images is lost.
            self.orphans.clear();
        }
        self.orphans.insert(id, p.record);
    }

    /// Only the very file that was labelled is moved or deleted: if another file took its path
    /// meanwhile (folders renamed or swapped), it is left alone (invariant I4, docs/design.md). One
    /// that cannot be set aside now is tried again with back-off.
    fn set_aside(&mut self, p: &Pending) {
        let expect = p.job.identity.map(|id| (id.dev, id.inode));
        let mut aside = Aside { image: p.image.clone(), status: p.record.status, record: p.record.clone(), expect, tries: 0, next: Instant::now() };
        if !self.try_aside(&mut aside) {
            self.asides.push(aside);
            if self.asides.len() > MAX_FAULTS_TRACKED {
                // Those forgotten wait in their inbox until the next start or reload sets them aside.
                self.asides.remove(0);
            }
        }
    }

    /// Images whose set-aside failed, once their wait is over.
    fn retry_asides(&mut self, now: Instant) {
        if self.asides.iter().all(|a| a.next > now) {
            return;
        }
        let mut waiting = std::mem::take(&mut self.asides);
        waiting.retain_mut(|a| a.next > now || !self.try_aside(a));
        self.asides = waiting;
    }

    /// Sets `a` aside; false when it should be tried again later (its wait set).
    fn try_aside(&self, a: &mut Aside) -> bool {
        let image = a.image.as_path();
        let Some(ib) = self.inboxes.iter().find(|ib| image.starts_with(&ib.path)) else { return true };
        let routed = a.status == Status::Ok && a.record.route.is_some();
        if !ib.sets_aside() && !routed {
            return true;
        }
        if let Some(id) = a.expect {
            let now = Beneath::new(&ib.path, image).and_then(|b| b.metadata()).map(|m| (m.dev(), m.ino()));
            match now {
                Ok(now) if now == id => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.tries > 0 => return true, // set aside meanwhile (a reload, a start)
                _ => {
                    tracing::warn!(path = %image.display(), "another file took this path after it was labelled; not moved or deleted");
                    return true;
                }
            }
        }
        let result = match a.status {
            Status::Ok => archive::route(ib, &self.folders, image, a.expect, &a.record, a.tries > 0),
            Status::Error => archive::quarantine(ib, &self.folders, image, a.expect),
        };
        match result {
            Ok(Some(dest)) if a.status == Status::Error => {
                tracing::info!(from = %image.display(), to = %dest.display(), "moved to quarantine");
                true
            }
            Ok(Some(dest)) => {
                let action = a.record.route.as_ref().map_or("", |r| r.action.as_str());
                tracing::debug!(from = %image.display(), to = %dest.display(), action, "routed");
                true
            }
            Ok(None) => true,
            Err(e) => {
                a.tries += 1;
                let wait = Backoff::new(FAULT_RETRY_FIRST, FAULT_RETRY_MAX).delay_after(a.tries);
                a.next = Instant::now() + wait;
                let what = match (&a.status, &a.record.route) {
                    (Status::Ok, Some(r)) => r.action.as_str(),
                    (Status::Ok, None) => ib.on_done.as_str(),
                    _ => "quarantine",
                };
                tracing::error!(path = %image.display(), to = what, error = %e, tries = a.tries, retry_in = ?wait, "cannot set the image aside; it stays in the inbox with its row and sidecar and is tried again");
                false
            }
        }
    }
}
