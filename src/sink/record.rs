//! The result for one image, as written to its JSON sidecar and printed by `classify`.

use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::beneath::Identity;
use crate::infer::Outcome;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub path: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub model: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<Vec<Top>>,
    /// With `[model] min_score`: whether the top-1 score reached it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confident: Option<bool>,
    /// From the file being ready to its result being written.
    pub latency_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The version of the image file this record describes (absent for uploads and files never read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<Identity>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Top {
    pub rank: usize,
    pub class_id: usize,
    pub label: String,
    /// The English class name, when `label` is a translation (`labels_lang`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_en: Option<String>,
    /// Softmax probability in [0, 1].
    pub score: f64,
}

impl Record {
    pub fn new(o: &Outcome, model: &str, min_score: Option<f32>, now: Instant) -> Record {
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
                            score: round(f64::from(p.score), 1e6),
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
            status,
            top,
            confident,
            latency_ms: round(latency, 10.0),
            error,
            file: o.job.identity,
        }
    }

    #[cfg(test)]
    pub fn example() -> Record {
        Record {
            path: "/in/a.jpg".into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            model: "m".into(),
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: 0, label: "tench".into(), label_en: None, score: 0.5 }]),
            confident: None,
            latency_ms: 1.0,
            error: None,
            file: None,
        }
    }
}

fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}
