//! Worker threads: each runs batches through the loaded model (a `Backend`: libtorch or ONNX Runtime),
//! while a helper thread of its own reads, decodes and resizes the next batch.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::layout::Layout;
use super::backend::{Backend, Failure};
use super::model::Classifier;
use super::onnx::{self, OnnxModel};
use super::remote::RemoteModel;
use super::solo::{Ranked, Solo};
use crate::backoff::Backoff;
use crate::error::panic_message;
use crate::beneath::Beneath;
use super::preprocess::Preprocessor;
use super::{BatchDone, InferSettings, LiveSettings, Outcome, Prediction};
use crate::config::{Engine, WorkersConfig};
use crate::error::{Fatal, ImageError};
use crate::health::{Health, Lifeline, Slot};
use crate::metrics::{Metrics, Stage};
use crate::job::{Job, Source};
use crate::queue::{Batcher, QueueReceiver};
use crate::shutdown::Shutdown;

pub struct Workers {
    handles: Vec<JoinHandle<()>>,
    /// The solo thread, which ends after the last worker.
    solo: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts `cfg.count` workers and waits until each has loaded its model. Workers stop when the
    /// queue is closed and empty, or after their current batch once `shutdown` is triggered. Each
    /// batch uses the settings `live` holds when the batch starts; a changed model is loaded between
    /// batches. A worker thread that dies stops labeld through `shutdown` (see `Lifeline`).
    pub fn start(
        live: LiveSettings,
        cfg: &WorkersConfig,
        rx: QueueReceiver,
        out: Sender<BatchDone>,
        shutdown: Shutdown,
        metrics: Metrics,
        health: Health,
    ) -> Result<Workers, Fatal> {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), Fatal>>(cfg.count);
        let mut handles = Vec::new();
        let layout = Layout::new(cfg);
        let shared = SharedModel::default();
        // Passes on more threads than a worker's share run on the solo thread (see `solo`).
        let (solo, solo_handle) = if layout.whole() > layout.share() {
            let (solo, handle) = Solo::start(layout.whole(), rank).map_err(|e| Fatal::io("cannot start the solo inference thread", e))?;
            (Some(solo), Some(handle))
        } else {
            (None, None)
        };
        for i in 0..cfg.count {
            let solo = solo.clone();
            let (live, layout, shared, rx, out, shutdown, ready_tx, metrics, health) = (
                live.clone(),
                layout.clone(),
                shared.clone(),
                rx.clone(),
                out.clone(),
                shutdown.clone(),
                ready_tx.clone(),
                metrics.clone(),
                health.clone(),
            );
            let (infer_slot, decode_slot) = (health.slot(format!("infer-{i}")), health.slot(format!("decode-{i}")));
            let h = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || {
                    let line = health.lifeline(format!("infer-{i}"), &shutdown);
                    super::layout::set_threads(layout.share());
                    let settings = live.get();
                    let classifier = match shared.get(&settings, &metrics) {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    drop(ready_tx);
                    if let Some(solo) = solo.as_ref().filter(|_| i == 0) {
                        warm(solo, &classifier, settings.model.crop);
                    }
                    let threads = layout.share();
                    let worker = Worker {
                        settings,
                        classifier,
                        metrics,
                        slot: infer_slot,
                        health,
                        name: format!("infer-{i}"),
                        shared,
                        layout,
                        threads,
                        solo,
                        queue: rx.clone(),
                    };
                    worker.run(&live, &rx, &out, &shutdown, decode_slot, line);
                })
                .map_err(|e| Fatal::io("cannot start inference thread", e))?;
            handles.push(h);
        }
        drop(ready_tx);
        drop(solo);
        for _ in 0..cfg.count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Fatal::Other("an inference thread died while loading the model".into())),
            }
        }
        let s = live.get();
        if let Some(remote) = &s.remote {
            tracing::info!(
                model = %remote.model_name(),
                engine = "remote",
                servers = %remote.describe(),
                fallback = remote.fallback.as_str(),
                workers = cfg.count,
                max_batch = s.max_batch,
                "model found on the model servers"
            );
        }
        tracing::info!(
            model = %s.model.name,
            engine = s.model.engine.as_str(),
            path = %s.model.path.display(),
            precision = s.model.precision.as_str(),
            workers = cfg.count,
            threads = cfg.threads,
            threads_alone = cfg.threads_alone,
            max_batch = s.max_batch,
            "model loaded"
        );
        Ok(Workers { handles, solo: solo_handle })
    }

    /// Waits for the workers, then for the solo thread (which ends with the last worker).
    pub fn join(self) {
        for h in self.handles.into_iter().chain(self.solo) {
            let _ = h.join();
        }
    }
}

/// The model every worker runs, loaded once: TorchScript's forward may run on several threads at once,
/// so the workers share one copy (half the memory of a copy each with two workers, and its weights are
/// warm in the cache for whichever worker runs next); an ONNX model holds a session per worker inside
/// it. A worker that needs another model (a reload) loads it once for all; the old one goes when its
/// last worker lets go.
#[derive(Clone, Default)]
struct SharedModel(Arc<Mutex<Option<(Arc<InferSettings>, Weak<Loaded>)>>>);

impl SharedModel {
    /// The loaded model for `s`, loading it if no worker holds it (the others wait meanwhile).
    fn get(&self, s: &Arc<InferSettings>, metrics: &Metrics) -> Result<Arc<Loaded>, Fatal> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((loaded, model)) = slot.as_ref() {
            if same_model(loaded, s) {
                if let Some(c) = model.upgrade() {
                    return Ok(c);
                }
            }
        }
        let c = Arc::new(load(s, metrics)?);
        *slot = Some((s.clone(), Arc::downgrade(&c)));
        Ok(c)
    }
}

fn same_model(a: &InferSettings, b: &InferSettings) -> bool {
    !a.model.needs_reload(&b.model) && a.labels.len() == b.labels.len() && a.remote == b.remote
}

/// The model the workers run, and with `[remote] fallback = "local"` the local one that labels while
/// no model server answers. Each with the model name its rows carry.
pub struct Loaded {
    backend: Arc<dyn Backend>,
    name: String,
    fallback: Option<(Arc<dyn Backend>, String)>,
}

/// Loads the model `s` names (on the model servers of `[remote]`, if set, and the local one too with
/// `fallback = "local"`), checked against its label count and warmed up for its batch size.
pub fn load(s: &InferSettings, metrics: &Metrics) -> Result<Loaded, Fatal> {
    let Some(remote) = &s.remote else { return Ok(Loaded { backend: load_local(s)?, name: s.model.name.clone(), fallback: None }) };
    let fallback = match remote.fallback {
        crate::config::Fallback::Local => Some((load_local(s)?, s.model.name.clone())),
        crate::config::Fallback::None => None,
    };
    let backend = Arc::new(RemoteModel::connect(remote, s.model.crop, s.labels.len(), metrics)?);
    Ok(Loaded { backend, name: remote.model_name(), fallback })
}

/// Loads `[model] path` with its engine.
fn load_local(s: &InferSettings) -> Result<Arc<dyn Backend>, Fatal> {
    Ok(match s.model.engine {
        Engine::Libtorch => {
            let passes = s.model.optimize.then_some(crate::infer::optimize::PASSES);
            Arc::new(Classifier::load(&s.model.path, s.model.crop, s.labels.len(), s.max_batch, s.model.precision, passes)?)
        }
        Engine::OnnxRuntime => Arc::new(OnnxModel::load(onnx::Load {
            path: &s.model.path,
            crop: s.model.crop,
            labels: s.labels.len(),
            max_batch: s.max_batch,
            sessions: s.workers,
            threads: s.threads,
            threads_alone: s.threads_alone,
        })?),
    })
}

/// The load-time test, asked again when an image fails alone: one all-zero image must give one finite
/// row of logits. Passing, the image was at fault; failing, the model is.
fn probe(model: &dyn Backend, crop: u32) -> Result<(), Failure> {
    let zeros = vec![0f32; 3 * (crop as usize) * (crop as usize)];
    model.top_k(&zeros, 1, 1).map(drop)
}

struct Worker {
    /// The settings `classifier` was loaded for.
    settings: Arc<InferSettings>,
    classifier: Arc<Loaded>,
    shared: SharedModel,
    metrics: Metrics,
    slot: Arc<Slot>,
    health: Health,
    name: String,
    layout: Arc<Layout>,
    /// libtorch intra-op threads of this thread (its share; never changed, see `solo`), or of the
    /// solo thread for the latest pass that ran there (for the log).
    threads: usize,
    /// Runs passes that have the box to themselves, when a pass can have more than the share.
    solo: Option<Solo>,
    /// The queue, to see whether images are waiting.
    queue: QueueReceiver,
}

/// Back-off while the model fails on its own test input: 0.5 s doubling to 30 s.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl Worker {
    /// Decoding overlaps inference: a helper thread prepares the next batch (read, decode, resize)
    /// while this thread runs the model on the current one. Only plain `Vec<f32>`s cross threads.
    fn run(
        mut self,
        live: &LiveSettings,
        rx: &QueueReceiver,
        out: &Sender<BatchDone>,
        shutdown: &Shutdown,
        decode_slot: Arc<Slot>,
        line: Lifeline,
    ) {
        let (prepared_tx, prepared_rx) = crossbeam_channel::bounded::<Prepared>(1);
        std::thread::scope(|scope| {
            // Held in here so that a panic below triggers shutdown before the scope waits for the
            // decode thread (which only stops on shutdown or a closed queue).
            let line = line;
            let times = self.metrics.times.clone();
            let name = self.name.replace("infer", "decode");
            let decode_line = self.health.lifeline(name.clone(), shutdown);
            let prep = std::thread::Builder::new().name(name.clone()).spawn_scoped(scope, move || {
                let _line = decode_line;
                prepare_batches(live, times, rx, prepared_tx, shutdown, &decode_slot, &name);
            });
            let prep = match prep {
                Ok(h) => h,
                Err(e) => return line.died(&format!("cannot start its decode thread: {e}")),
            };
            self.consume(prepared_rx, out, shutdown, &line);
            // A panic there was recorded by the decode thread's own lifeline.
            let _ = prep.join();
        });
    }

    /// Runs the prepared batches through the model until the decode thread stops.
    fn consume(&mut self, prepared: Receiver<Prepared>, out: &Sender<BatchDone>, shutdown: &Shutdown, line: &Lifeline) {
        for batch in prepared {
            crate::health::test_panic_hook(&self.name);
            let Some(done) = self.infer(batch, shutdown) else { return };
            if out.send(done).is_err() {
                return line.died("the sink stopped taking results");
            }
            self.health.progressed();
        }
    }

    /// Swaps in the model `s` names if it differs from the one loaded. A failure is a fault of the
    /// model (the reload checked it, so the file changed since): retried like a failing model.
    fn use_settings(&mut self, s: &Arc<InferSettings>) -> Result<(), String> {
        if Arc::ptr_eq(&self.settings, s) {
            return Ok(());
        }
        if !same_model(&self.settings, s) {
            let started = Instant::now();
            let c = self.shared.get(s, &self.metrics).map_err(|e| e.to_string())?;
            if let Some(solo) = &self.solo {
                warm(solo, &c, s.model.crop);
            }
            self.classifier = c;
            tracing::info!(model = %s.model.name, ms = started.elapsed().as_millis() as u64, "worker switched model");
        }
        self.settings = s.clone();
        Ok(())
    }

    /// Ranks `n` images with `model` on `threads` intra-op threads: when that is more than this worker's
    /// share, on the solo thread if the backend runs on its caller's threads, or on the backend's own
    /// copy for a lone pass; else here.
    fn run_pass(&mut self, model: &Arc<dyn Backend>, threads: usize, crop: u32, data: &[f32], n: usize, k: usize) -> Result<Vec<Ranked>, Failure> {
        if let Some(alone) = model.alone().filter(|_| threads > self.layout.share()) {
            self.threads = threads;
            return rank(alone, crop, data, n, k);
        }
        if let Some(solo) = self.solo.as_ref().filter(|s| threads >= s.threads() && model.threads_follow_caller()) {
            if let Some(result) = solo.rank(model, crop, data, n, k) {
                self.threads = solo.threads();
                return result;
            }
            tracing::warn!(thread = %self.name, "the solo inference thread is gone; lone images run on this worker's threads");
            self.solo = None;
        }
        self.threads = self.layout.share();
        rank(&**model, crop, data, n, k)
    }

    /// Labels one batch; `None` if shutdown came while the model was failing (the images then have
    /// no record and are labelled after the restart).
    fn infer(&mut self, batch: Prepared, shutdown: &Shutdown) -> Option<BatchDone> {
        let Prepared { settings, files, data, mut results, thumbs, prep_ms } = batch;
        let n_ok = results.iter().filter(|r| r.is_none()).count();
        let infer_started = Instant::now();
        // A batch with no image to run names the model configured (its records are errors).
        let (mut engine, mut model) = (None, Arc::from(settings.model.name.as_str()));
        if n_ok > 0 {
            let (ranked, by) = self.rank_until_the_model_works(&settings, &files, &data, n_ok, shutdown)?;
            (engine, model) = (Some(by.engine), by.model);
            let labelled: Vec<Result<Vec<Prediction>, ImageError>> = ranked
                .into_iter()
                .map(|r| r.map(|top| predictions(&settings, top)).map_err(ImageError::ModelRejected))
                .collect();
            let mut labelled = labelled.into_iter();
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = labelled.next();
            }
        }
        self.metrics.times.add(Stage::Inference, infer_started.elapsed());
        self.metrics.batch(files.len());
        let infer_ms = infer_started.elapsed().as_secs_f64() * 1e3;
        let finished_at = Instant::now();
        let outcomes: Vec<Outcome> = files
            .into_iter()
            .zip(results)
            .zip(thumbs)
            .map(|((job, r), thumb)| Outcome {
                job,
                result: r.unwrap_or_else(|| Err(ImageError::Inference("no result".into()))),
                finished_at,
                thumb,
            })
            .collect();
        tracing::debug!(
            size = outcomes.len(),
            errors = outcomes.len() - n_ok,
            preprocess_ms = format!("{prep_ms:.1}"),
            infer_ms = format!("{infer_ms:.1}"),
            threads = self.threads,
            "batch"
        );
        Some(BatchDone { outcomes, model, engine, min_score: settings.model.min_score })
    }

    /// Ranks `n` images with the model `settings` name. While the model cannot be loaded or fails
    /// even on its test input (a fault of the model, not of the images) nothing is recorded: /readyz
    /// says "model failing" and the batch is tried again after a back-off, until it works or
    /// shutdown (`None`). Invariant I8 (docs/design.md): only a verdict about the image is recorded.
    /// With `[remote] fallback = "local"`, the local model labels while no model server answers.
    fn rank_until_the_model_works(
        &mut self,
        settings: &Arc<InferSettings>,
        files: &[Job],
        data: &[f32],
        n: usize,
        shutdown: &Shutdown,
    ) -> Option<(Vec<Ranked>, RankedBy)> {
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut failed = false;
        let slot = self.slot.clone();
        loop {
            // Busy only while the model runs: waiting out the back-off is not a hung worker.
            let ranked = {
                let _busy = slot.busy(files);
                let layout = self.layout.clone();
                let pass = layout.begin(self.queue.len());
                let (crop, k) = (settings.model.crop, settings.model.top_k);
                self.use_settings(settings).map_err(Failure::Model).and_then(|()| {
                    let m = self.classifier.clone();
                    let by = |b: &dyn Backend, name: &str| RankedBy { engine: b.engine(), model: Arc::from(name) };
                    match (self.run_pass(&m.backend, pass.threads, crop, data, n, k), &m.fallback) {
                        (Err(Failure::Unavailable(_)), Some((local, name))) => {
                            self.run_pass(local, pass.threads, crop, data, n, k).map(|r| (r, by(&**local, name)))
                        }
                        (r, _) => r.map(|r| (r, by(&*m.backend, &m.name))),
                    }
                })
            };
            match ranked {
                Ok(ranked) => {
                    if failed {
                        self.health.set_model_failing(None);
                        tracing::info!(thread = %self.name, "the model works again");
                    }
                    return Some(ranked);
                }
                Err(e) => {
                    failed = true;
                    self.health.set_model_failing(Some(e.to_string()));
                    let delay = backoff.failed(Instant::now());
                    let retry_in_ms = delay.as_millis() as u64;
                    match e {
                        Failure::Model(e) => tracing::error!(
                            thread = %self.name,
                            images = n,
                            retry_in_ms,
                            "the model cannot label anything ({e}): a fault of the model, not of the images; \
                             no record is written and the batch is tried again"
                        ),
                        Failure::Unavailable(e) => tracing::warn!(
                            thread = %self.name,
                            images = n,
                            retry_in_ms,
                            "the model's compute is unavailable ({e}): a fault, not of the images; \
                             no record is written and the batch is tried again"
                        ),
                    }
                    if shutdown.wait_timeout(delay) {
                        return None;
                    }
                }
            }
        }
    }

}

/// Has the solo thread run `loaded`'s models once (see `Solo::warm`).
fn warm(solo: &Solo, loaded: &Loaded, crop: u32) {
    for model in std::iter::once(&loaded.backend).chain(loaded.fallback.as_ref().map(|(m, _)| m)) {
        if model.threads_follow_caller() {
            solo.warm(model, crop);
        }
    }
}

/// What ranked a batch: the engine and the model name its records carry.
struct RankedBy {
    engine: &'static str,
    model: Arc<str>,
}

/// Ranks `n` images of `crop`×`crop` with `model`; a batch the model fails on is split in halves until
/// the images at fault are found, so their batch-mates are labelled. An image that fails alone is at
/// fault only if the model still passes its test input; otherwise the model is (`Err`). Compute that is
/// away (`Failure::Unavailable`) says nothing about the images: no split, no probe.
pub(super) fn rank(model: &dyn Backend, crop: u32, data: &[f32], n: usize, k: usize) -> Result<Vec<Ranked>, Failure> {
    match model.top_k(data, n, k) {
        Ok(tops) => Ok(tops.into_iter().map(Ok).collect()),
        Err(away @ Failure::Unavailable(_)) => Err(away),
        Err(Failure::Model(e)) if n == 1 => match probe(model, crop) {
            Ok(()) => {
                tracing::warn!(error = %e, "the model failed on one image and passes its test input: the image gets an error record");
                Ok(vec![Err(e)])
            }
            Err(Failure::Unavailable(probe)) => Err(Failure::Unavailable(format!("{e}; on its test input: {probe}"))),
            Err(Failure::Model(probe)) => Err(Failure::Model(format!("{e}; on its test input: {probe}"))),
        },
        Err(Failure::Model(e)) => {
            tracing::warn!(images = n, error = %e, "the model failed on a batch; splitting it to find the image at fault");
            let (half, per_image) = (n / 2, data.len() / n);
            let mut ranked = rank(model, crop, &data[..half * per_image], half, k)?;
            ranked.extend(rank(model, crop, &data[half * per_image..], n - half, k)?);
            Ok(ranked)
        }
    }
}

fn predictions(settings: &InferSettings, top: Vec<(usize, f32)>) -> Vec<Prediction> {
    top.into_iter()
        .map(|(class_id, score)| Prediction {
            class_id,
            label: settings.labels.name(class_id).to_string(),
            label_en: settings.labels.english(class_id).map(str::to_string),
            score,
        })
        .collect()
}

/// A batch ready for the model: the images' tensor data (those that decoded) and, for those that
/// did not, their error.
struct Prepared {
    settings: Arc<InferSettings>,
    files: Vec<Job>,
    data: Vec<f32>,
    /// `None`: decoded, waiting for inference; `Some(Err)`: failed before inference.
    results: Vec<Option<Result<Vec<Prediction>, ImageError>>>,
    thumbs: Vec<Option<Vec<u8>>>,
    prep_ms: f64,
}

fn prepare_batches(
    live: &LiveSettings,
    times: crate::metrics::StageTimes,
    rx: &QueueReceiver,
    tx: Sender<Prepared>,
    shutdown: &Shutdown,
    slot: &Slot,
    thread: &str,
) {
    let mut settings = live.get();
    let mut pre = Preprocessor::with_times(settings.preprocess.clone(), times.clone());
    let mut batcher = Batcher::new(settings.max_batch, settings.max_delay);
    loop {
        let mut files = batcher.next(rx, shutdown);
        if files.is_empty() {
            return;
        }
        crate::health::test_panic_hook(thread);
        let busy = slot.busy(&files);
        let now = live.get();
        if !Arc::ptr_eq(&now, &settings) {
            settings = now;
            if pre.config() != &settings.preprocess {
                pre = Preprocessor::with_times(settings.preprocess.clone(), times.clone());
            }
            batcher = Batcher::new(settings.max_batch, settings.max_delay);
        }
        pre.set_thumbnails(settings.thumbnails);
        let started = Instant::now();
        let mut data = Vec::with_capacity(pre.len() * files.len());
        let mut results = Vec::with_capacity(files.len());
        let mut thumbs = Vec::with_capacity(files.len());
        for f in &mut files {
            let loaded = contained(&mut data, |data| prepare_one(&mut pre, f, &settings.inboxes, data));
            if let Err(ImageError::Crashed(panic)) = &loaded {
                tracing::error!(image = %f.describe(), %panic, "preprocessing panicked on an image: it gets an error record; rebuilding the preprocessor");
                // Its scratch buffers may be in any state after the unwind.
                pre = Preprocessor::with_times(settings.preprocess.clone(), times.clone());
                pre.set_thumbnails(settings.thumbnails);
            }
            results.push(loaded.err().map(Err));
            thumbs.push(pre.take_thumb());
        }
        let prep_ms = started.elapsed().as_secs_f64() * 1e3;
        drop(busy);
        if tx.send(Prepared { settings: settings.clone(), files, data, results, thumbs, prep_ms }).is_err() {
            return;
        }
    }
}

/// Runs one image's preprocessing `step` inside a panic boundary: a panic becomes that image's error
/// (`Crashed`), and a failed step leaves no partial tensor data in `data`.
fn contained(data: &mut Vec<f32>, step: impl FnOnce(&mut Vec<f32>) -> Result<(), ImageError>) -> Result<(), ImageError> {
    let mark = data.len();
    let done = std::panic::catch_unwind(AssertUnwindSafe(|| step(data)))
        .unwrap_or_else(|payload| Err(ImageError::Crashed(panic_message(&*payload))));
    if done.is_err() {
        data.truncate(mark);
    }
    done
}

/// Read → decode → resize → normalize for one image, appending its tensor data to `data`.
fn prepare_one(pre: &mut Preprocessor, job: &mut Job, inboxes: &[PathBuf], data: &mut Vec<f32>) -> Result<(), ImageError> {
    match &job.source {
        Source::Upload(u) => pre.process(&u.bytes, data),
        Source::Inbox(claim) => {
            let path = claim.path();
            let root = crate::beneath::root_of(inboxes.iter().map(PathBuf::as_path), path);
            // Opened before the read, so the result can follow the image if its folder is renamed
            // meanwhile (without it, a vanished path simply gets no row).
            job.folder = Beneath::new(root, path).and_then(|b| b.open_parent()).ok().map(Arc::new);
            pre.load(root, path, data, &mut job.identity)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_preprocessing_is_that_images_error_and_leaves_no_partial_data() {
        let mut data = vec![1.0, 2.0, 3.0];
        let r = contained(&mut data, |d| {
            d.extend([4.0, 5.0]);
            panic!("resize target overflow");
        });
        assert_eq!(r, Err(ImageError::Crashed("resize target overflow".into())));
        assert!(r.unwrap_err().to_string().contains("preprocessing crashed on this image (resize target overflow)"));
        assert_eq!(data, [1.0, 2.0, 3.0]);
        assert_eq!(contained(&mut data, |d| {
            d.push(4.0);
            Err(ImageError::Empty)
        }), Err(ImageError::Empty));
        assert_eq!(data, [1.0, 2.0, 3.0]);
        assert_eq!(contained(&mut data, |d| Ok(d.push(4.0))), Ok(()));
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0]);
    }
}
