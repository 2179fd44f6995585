//! The result for one image, as written to its JSON sidecar, its CSV row and its MQTT message, and
//! printed by `classify`.

use serde::{Deserialize, Serialize};

use super::Identity;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub path: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub model: String,
    /// What ran the model ("libtorch", "onnxruntime", or "remote": a model server): in sidecars, `classify` output and upload
    /// replies; not a CSV column, so absent from records read back from the log (and MQTT messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
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
    /// With `[[route]]`: where the first matching route sends the image, decided before the row is
    /// written (so a restart after a crash completes the same route). Absent: no route matched and
    /// `on_done` applies, or the image failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Routed>,
}

/// A route's decision for one image, as rows, sidecars and MQTT messages carry it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Routed {
    /// `move`, `copy`, `link` or `keep`.
    pub action: String,
    /// The folder the image goes to (absent for `keep`). A taken name there gets `~1`, `~2`, … before
    /// the extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Where the copy or link was made, in the inbox's sidecar once it is made (`copy`, `link`): a
    /// restart does not make it again, even after retention removed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl Routed {
    /// The CSV `route` field: `<action>:<folder>` (`keep:` for keep).
    pub fn to_field(&self) -> String {
        format!("{}:{}", self.action, self.to.as_deref().unwrap_or(""))
    }

    /// The CSV `route` field read back; `None` for an empty or unknown one.
    pub fn from_field(s: &str) -> Option<Routed> {
        let (action, to) = s.split_once(':')?;
        if !["move", "copy", "link", "keep"].contains(&action) {
            return None;
        }
        Some(Routed { action: action.to_string(), to: (!to.is_empty()).then(|| to.to_string()), at: None })
    }
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
    /// A record for tests.
    #[doc(hidden)]
    pub fn example() -> Record {
        Record {
            path: "/in/a.jpg".into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            model: "m".into(),
            engine: None,
            status: Status::Ok,
            top: Some(vec![Top { rank: 1, class_id: 0, label: "tench".into(), label_en: None, score: 0.5 }]),
            confident: None,
            latency_ms: 1.0,
            error: None,
            file: None,
            route: None,
        }
    }
}

/// `v` rounded to `1/scale`: scores to 6 decimals, latencies to 0.1 ms.
pub fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}
