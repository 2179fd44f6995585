//! Inference: workers pull batches of ready files, preprocess them, run the model and hand
//! `Outcome`s to the sink.

pub mod labels;
pub mod model;
pub mod preprocess;
pub mod worker;

use std::time::Instant;

use crate::error::ImageError;
use crate::queue::ReadyFile;

/// One ranked class for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class_id: usize,
    pub label: String,
    pub score: f32,
}

/// The result for one image.
#[derive(Debug)]
pub struct Outcome {
    pub file: ReadyFile,
    pub result: Result<Vec<Prediction>, ImageError>,
    pub finished_at: Instant,
}

/// What a worker sends on after each batch.
#[derive(Debug)]
pub struct BatchDone {
    pub outcomes: Vec<Outcome>,
}
