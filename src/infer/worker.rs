//! Worker threads: each owns one `Classifier` and runs batches through it, while a helper thread of
//! its own reads, decodes and resizes the next batch.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::labels::Labels;
use super::model::Classifier;
use super::preprocess::Preprocessor;
use super::{BatchDone, Outcome, Prediction};
use crate::config::{ModelConfig, WorkersConfig};
use crate::error::{Fatal, ImageError};
use crate::metrics::{Stage, StageTimes};
use crate::queue::{Batcher, QueueReceiver};
use crate::shutdown::Shutdown;

pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `cfg.count` workers and waits until each has loaded its model. Workers stop when the
    /// queue is closed and empty, or after their current batch once `shutdown` is triggered.
    pub fn start(
        model: &ModelConfig,
        cfg: &WorkersConfig,
        labels: Arc<Labels>,
        rx: QueueReceiver,
        out: Sender<BatchDone>,
        shutdown: Shutdown,
        times: StageTimes,
    ) -> Result<Workers, Fatal> {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), Fatal>>(cfg.count);
        let mut handles = Vec::new();
        for i in 0..cfg.count {
            let (model, cfg, labels, rx, out, shutdown, ready_tx, times) = (
                model.clone(),
                cfg.clone(),
                labels.clone(),
                rx.clone(),
                out.clone(),
                shutdown.clone(),
                ready_tx.clone(),
                times.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || {
                    tch::set_num_threads(cfg.threads as i32);
                    let classifier = match Classifier::load(&model.path, model.preprocess.crop, labels.len(), cfg.max_batch, model.precision) {
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
                    let worker = Worker { model, cfg, labels, classifier, times };
                    worker.run(&rx, &out, &shutdown);
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
        tracing::info!(
            model = %model.name,
            path = %model.path.display(),
            workers = cfg.count,
            threads = cfg.threads,
            max_batch = cfg.max_batch,
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

struct Worker {
    model: ModelConfig,
    cfg: WorkersConfig,
    labels: Arc<Labels>,
    classifier: Classifier,
    times: StageTimes,
}

impl Worker {
    /// Decoding overlaps inference: a helper thread prepares the next batch (read, decode, resize)
    /// while this thread runs the model on the current one. Only plain `Vec<f32>`s cross threads.
    fn run(self, rx: &QueueReceiver, out: &Sender<BatchDone>, shutdown: &Shutdown) {
        let (prepared_tx, prepared_rx) = crossbeam_channel::bounded::<Prepared>(1);
        std::thread::scope(|scope| {
            let pre = Preprocessor::with_times(self.model.preprocess.clone(), self.times.clone());
            let (max_batch, max_delay) = (self.cfg.max_batch, self.cfg.max_delay);
            let prep = std::thread::Builder::new()
                .name("decode".into())
                .spawn_scoped(scope, move || prepare_batches(pre, rx, prepared_tx, max_batch, max_delay, shutdown));
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

    fn infer(&self, batch: Prepared) -> BatchDone {
        let Prepared { files, data, mut results, prep_ms } = batch;
        let n_ok = results.iter().filter(|r| r.is_none()).count();
        let infer_started = Instant::now();
        if n_ok > 0 {
            match self.classifier.top_k(&data, n_ok, self.model.top_k) {
                Ok(tops) => {
                    let mut tops = tops.into_iter();
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        let top = tops.next().unwrap_or_default();
                        *r = Some(Ok(top
                            .into_iter()
                            .map(|(class_id, score)| Prediction {
                                class_id,
                                label: self.labels.name(class_id).to_string(),
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
        self.times.add(Stage::Inference, infer_started.elapsed());
        let infer_ms = infer_started.elapsed().as_secs_f64() * 1e3;
        let finished_at = Instant::now();
        let outcomes: Vec<Outcome> = files
            .into_iter()
            .zip(results)
            .map(|(file, r)| Outcome {
                file,
                result: r.unwrap_or_else(|| Err(ImageError::Inference("no result".into()))),
                finished_at,
            })
            .collect();
        tracing::info!(
            size = outcomes.len(),
            errors = outcomes.len() - n_ok,
            preprocess_ms = format!("{prep_ms:.1}"),
            infer_ms = format!("{infer_ms:.1}"),
            "batch"
        );
        BatchDone { outcomes }
    }
}

/// A batch ready for the model: the images' tensor data (those that decoded) and, for those that
/// did not, their error.
struct Prepared {
    files: Vec<crate::queue::ReadyFile>,
    data: Vec<f32>,
    /// `None`: decoded, waiting for inference; `Some(Err)`: failed before inference.
    results: Vec<Option<Result<Vec<Prediction>, ImageError>>>,
    prep_ms: f64,
}

fn prepare_batches(
    mut pre: Preprocessor,
    rx: &QueueReceiver,
    tx: Sender<Prepared>,
    max_batch: usize,
    max_delay: std::time::Duration,
    shutdown: &Shutdown,
) {
    let mut batcher = Batcher::new(max_batch, max_delay);
    loop {
        let files = batcher.next(rx, shutdown);
        if files.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut data = Vec::with_capacity(pre.len() * files.len());
        let results = files.iter().map(|f| pre.load(&f.path, &mut data).err().map(Err)).collect();
        let prep_ms = started.elapsed().as_secs_f64() * 1e3;
        if tx.send(Prepared { files, data, results, prep_ms }).is_err() {
            return;
        }
    }
}
