//! Worker threads: each owns one `Classifier` and loops batch → preprocess → infer → send.

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
use crate::queue::{QueueReceiver, next_batch};
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
    ) -> Result<Workers, Fatal> {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), Fatal>>(cfg.count);
        let mut handles = Vec::new();
        for i in 0..cfg.count {
            let (model, cfg, labels, rx, out, shutdown, ready_tx) =
                (model.clone(), cfg.clone(), labels.clone(), rx.clone(), out.clone(), shutdown.clone(), ready_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || {
                    tch::set_num_threads(cfg.threads as i32);
                    let classifier = match Classifier::load(&model.path, model.preprocess.crop, labels.len(), cfg.max_batch) {
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
                    let worker = Worker { model, cfg, labels, classifier };
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
}

impl Worker {
    fn run(self, rx: &QueueReceiver, out: &Sender<BatchDone>, shutdown: &Shutdown) {
        let mut pre = Preprocessor::new(self.model.preprocess.clone());
        let mut data: Vec<f32> = Vec::with_capacity(pre.len() * self.cfg.max_batch);
        loop {
            let batch = next_batch(rx, self.cfg.max_batch, self.cfg.max_delay, shutdown);
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            data.clear();
            // Preprocess everything first; images that fail get their error now and skip inference.
            let mut results: Vec<Option<Result<Vec<Prediction>, ImageError>>> = Vec::with_capacity(batch.len());
            for file in &batch {
                match pre.load(&file.path, &mut data) {
                    Ok(()) => results.push(None),
                    Err(e) => results.push(Some(Err(e))),
                }
            }
            let prep_ms = started.elapsed().as_secs_f64() * 1e3;
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
            let infer_ms = infer_started.elapsed().as_secs_f64() * 1e3;
            let finished_at = Instant::now();
            let outcomes: Vec<Outcome> = batch
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
            if out.send(BatchDone { outcomes }).is_err() {
                return;
            }
        }
    }
}
