//! Inference: workers pull batches of ready files, preprocess them, run the model and hand
//! `Outcome`s to the sink.

pub mod backend;
pub mod labels;
pub mod layout;
pub mod model;
pub mod onnx;
pub mod optimize;
pub mod preprocess;
pub mod remote;
pub mod resample;
pub mod solo;
pub mod worker;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{ModelConfig, Preprocess, RemoteConfig};
use crate::error::ImageError;
use crate::job::Job;
use crate::vocab::record::{self, Record, Status, Top};
use labels::Labels;

/// One ranked class for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class_id: usize,
    pub label: String,
    /// The English name, when `label` is a translation.
    pub label_en: Option<String>,
    pub score: f32,
}

/// The result for one image.
#[derive(Debug)]
pub struct Outcome {
    pub job: Job,
    pub result: Result<Vec<Prediction>, ImageError>,
    pub finished_at: Instant,
    /// A small JPEG of the crop the model saw (only when the status page is on).
    pub thumb: Option<Vec<u8>>,
}

impl Outcome {
    /// The record of this result, made by `model` run by `engine` (with `[model] min_score`), written
    /// at `now`.
    pub fn record(&self, model: &str, engine: Option<&str>, min_score: Option<f32>, now: Instant) -> Record {
        let o = self;
        let latency = now.saturating_duration_since(o.job.ready_at).as_secs_f64() * 1e3;
        let (status, top, error) = match &o.result {
            Ok(preds) => (
                Status::Ok,
                Some(
                    preds
                        .iter()
                        .enumerate()
                        .map(|(i, p)| Top {
                            rank: i + 1,
                            class_id: p.class_id,
                            label: p.label.clone(),
                            label_en: p.label_en.clone(),
                            score: record::round(f64::from(p.score), 1e6),
                        })
                        .collect(),
                ),
                None,
            ),
            Err(e) => (Status::Error, None, Some(e.to_string())),
        };
        let confident = match (&o.result, min_score) {
            (Ok(preds), Some(min)) => Some(preds.first().is_some_and(|p| p.score >= min)),
            _ => None,
        };
        // An upload has no path: its record goes back to its client only.
        let path = o.job.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        Record {
            path,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            model: model.to_string(),
            engine: engine.map(str::to_string),
            status,
            top,
            confident,
            latency_ms: record::round(latency, 10.0),
            error,
            file: o.job.identity,
            route: None,
        }
    }
}

/// What a worker sends on after each batch.
#[derive(Debug)]
pub struct BatchDone {
    pub outcomes: Vec<Outcome>,
    /// The model that produced these results.
    pub model: Arc<str>,
    /// The engine that ran it (`None`: no model ran, e.g. a hung worker's images).
    pub engine: Option<&'static str>,
    /// `[model] min_score` in force for this batch.
    pub min_score: Option<f32>,
}

/// Everything the workers take from the config for one batch. Replaced as a whole on reload; each
/// batch uses one `InferSettings` from its first image to its result.
#[derive(Debug)]
pub struct InferSettings {
    pub model: ModelConfig,
    /// The model's input within `[limits]`.
    pub preprocess: Preprocess,
    pub labels: Arc<Labels>,
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Workers that run the model at once (`[workers] count`, restart-only).
    pub workers: usize,
    /// Intra-op threads per worker (`[workers] threads`, restart-only).
    pub threads: usize,
    /// Intra-op threads of a pass that has the box to itself (restart-only).
    pub threads_alone: usize,
    /// Make thumbnails for the status page.
    pub thumbnails: bool,
    /// The inbox roots: files are read beneath the one they lie in, never through a link.
    pub inboxes: Vec<std::path::PathBuf>,
    /// Label on model servers (`[remote]`) rather than with `model` (then only the local fallback).
    pub remote: Option<RemoteConfig>,
}

/// The settings in force now, shared by every worker.
#[derive(Clone, Debug)]
pub struct LiveSettings(Arc<RwLock<Arc<InferSettings>>>);

impl LiveSettings {
    pub fn new(s: InferSettings) -> Self {
        LiveSettings(Arc::new(RwLock::new(Arc::new(s))))
    }

    pub fn get(&self) -> Arc<InferSettings> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Workers pick the new settings up at their next batch.
    pub fn set(&self, s: InferSettings) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }
}
