//! Worker threads: each owns one `Classifier` and runs batches through it, while a helper thread of
//! its own reads, decodes and resizes the next batch.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::model::Classifier;
use super::preprocess::Preprocessor;
use super::{BatchDone, InferSettings, LiveSettings, Outcome, Prediction};
use crate::config::WorkersConfig;
use crate::error::{Fatal, ImageError};
use crate::health::{Health, Slot};
use crate::metrics::{Metrics, Stage};
use crate::queue::{Batcher, QueueReceiver};
use crate::shutdown::Shutdown;

pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `cfg.count` workers and waits until each has loaded its model. Workers stop when the
    /// queue is closed and empty, or after their current batch once `shutdown` is triggered. Each
    /// batch uses the settings `live` holds when the batch starts; a changed model is loaded between
    /// batches.
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
        for i in 0..cfg.count {
            let (live, threads, rx, out, shutdown, ready_tx, metrics) =
                (live.clone(), cfg.threads, rx.clone(), out.clone(), shutdown.clone(), ready_tx.clone(), metrics.clone());
            let (infer_slot, decode_slot) = (health.slot(format!("infer-{i}")), health.slot(format!("decode-{i}")));
            let h = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || {
                    tch::set_num_threads(threads as i32);
                    let settings = live.get();
                    let classifier = match load(&settings) {
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
                    let worker = Worker { settings, classifier, metrics, slot: infer_slot };
                    worker.run(&live, &rx, &out, &shutdown, decode_slot);
                })
                .map_err(|e| Fatal::io("cannot start inference thread", e))?;
            handles.push(h);
        }
        drop(ready_tx);
        for _ in 0..cfg.count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Fatal::Other("an inference thread died while loading the model".into())),
            }
        }
        let s = live.get();
        tracing::info!(
            model = %s.model.name,
            path = %s.model.path.display(),
            precision = s.model.precision.as_str(),
            workers = cfg.count,
            threads = cfg.threads,
            max_batch = s.max_batch,
            "model loaded"
        );
        Ok(Workers { handles })
    }

    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Loads the model `s` names, checked against its label count and warmed up for its batch size.
pub fn load(s: &InferSettings) -> Result<Classifier, Fatal> {
    Classifier::load(&s.model.path, s.model.preprocess.crop, s.labels.len(), s.max_batch, s.model.precision)
}

struct Worker {
    /// The settings `classifier` was loaded for.
    settings: Arc<InferSettings>,
    classifier: Classifier,
    metrics: Metrics,
    slot: Arc<Slot>,
}

impl Worker {
    /// Decoding overlaps inference: a helper thread prepares the next batch (read, decode, resize)
    /// while this thread runs the model on the current one. Only plain `Vec<f32>`s cross threads.
    fn run(mut self, live: &LiveSettings, rx: &QueueReceiver, out: &Sender<BatchDone>, shutdown: &Shutdown, decode_slot: Arc<Slot>) {
        let (prepared_tx, prepared_rx) = crossbeam_channel::bounded::<Prepared>(1);
        std::thread::scope(|scope| {
            let times = self.metrics.times.clone();
            let name = std::thread::current().name().unwrap_or("infer").replace("infer", "decode");
            let prep = std::thread::Builder::new()
                .name(name)
                .spawn_scoped(scope, move || prepare_batches(live, times, rx, prepared_tx, shutdown, &decode_slot));
            if let Err(e) = prep {
                tracing::error!(error = %e, "cannot start decode thread");
                return;
            }
            for batch in prepared_rx {
                if out.send(self.infer(batch)).is_err() {
                    return;
                }
            }
        });
    }

    /// Swaps in the model `s` names if it differs from the one loaded. On failure the batch gets
    /// error records (the reload was checked beforehand, so this is a model file changed since).
    fn use_settings(&mut self, s: &Arc<InferSettings>) -> Result<(), String> {
        if Arc::ptr_eq(&self.settings, s) {
            return Ok(());
        }
        if self.settings.model.needs_reload(&s.model) || self.settings.labels.len() != s.labels.len() {
            let started = Instant::now();
            let c = load(s).map_err(|e| e.to_string())?;
            self.classifier = c;
            tracing::info!(model = %s.model.name, ms = started.elapsed().as_millis() as u64, "worker switched model");
        }
        self.settings = s.clone();
        Ok(())
    }

    fn infer(&mut self, batch: Prepared) -> BatchDone {
        let Prepared { settings, files, data, mut results, thumbs, prep_ms } = batch;
        let slot = self.slot.clone();
        let busy = slot.busy(&files);
        let swapped = self.use_settings(&settings);
        let n_ok = results.iter().filter(|r| r.is_none()).count();
        let infer_started = Instant::now();
        if n_ok > 0 {
            let tops = swapped.and_then(|()| self.classifier.top_k(&data, n_ok, settings.model.top_k));
            match tops {
                Ok(tops) => {
                    let mut tops = tops.into_iter();
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        let top = tops.next().unwrap_or_default();
                        *r = Some(Ok(top
                            .into_iter()
                            .map(|(class_id, score)| Prediction {
                                class_id,
                                label: settings.labels.name(class_id).to_string(),
                                label_en: settings.labels.english(class_id).map(str::to_string),
                                score,
                            })
                            .collect()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, images = n_ok, "inference failed for a batch");
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(ImageError::Inference(e.clone())));
                    }
                }
            }
        }
        drop(busy);
        self.metrics.times.add(Stage::Inference, infer_started.elapsed());
        self.metrics.batch(files.len());
        let infer_ms = infer_started.elapsed().as_secs_f64() * 1e3;
        let finished_at = Instant::now();
        let outcomes: Vec<Outcome> = files
            .into_iter()
            .zip(results)
            .zip(thumbs)
            .map(|((file, r), thumb)| Outcome {
                file,
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
            "batch"
        );
        BatchDone { outcomes, model: Arc::from(settings.model.name.as_str()), min_score: settings.model.min_score }
    }
}

/// A batch ready for the model: the images' tensor data (those that decoded) and, for those that
/// did not, their error.
struct Prepared {
    settings: Arc<InferSettings>,
    files: Vec<crate::queue::ReadyFile>,
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
) {
    let mut settings = live.get();
    let mut pre = Preprocessor::with_times(settings.model.preprocess.clone(), times.clone());
    let mut batcher = Batcher::new(settings.max_batch, settings.max_delay);
    loop {
        let mut files = batcher.next(rx, shutdown);
        if files.is_empty() {
            return;
        }
        let busy = slot.busy(&files);
        let now = live.get();
        if !Arc::ptr_eq(&now, &settings) {
            settings = now;
            if pre.config() != &settings.model.preprocess {
                pre = Preprocessor::with_times(settings.model.preprocess.clone(), times.clone());
            }
            batcher = Batcher::new(settings.max_batch, settings.max_delay);
        }
        pre.set_thumbnails(settings.thumbnails);
        let started = Instant::now();
        let mut data = Vec::with_capacity(pre.len() * files.len());
        let mut results = Vec::with_capacity(files.len());
        let mut thumbs = Vec::with_capacity(files.len());
        for f in &mut files {
            let loaded = match &f.upload {
                Some(u) => pre.process(&u.bytes, &mut data),
                None => {
                    let root = crate::beneath::root_of(settings.inboxes.iter().map(PathBuf::as_path), &f.path);
                    pre.load(root, &f.path, &mut data, &mut f.identity)
                }
            };
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
