//! The last results, newest first, with thumbnails: what the status page shows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::hourly::{Hourly, hour_now};
use crate::vocab::Record;

/// How many results the status page keeps.
pub const KEEP: usize = 50;

#[derive(Clone, Default)]
pub struct Recent(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    next_id: u64,
    items: VecDeque<RecentResult>,
    /// The drift chart's counts, from the results log and every row since.
    hourly: Hourly,
}

#[derive(Clone, Serialize)]
pub struct RecentResult {
    pub id: u64,
    #[serde(flatten)]
    pub record: Record,
    pub has_thumb: bool,
    #[serde(skip)]
    pub thumb: Option<Arc<Vec<u8>>>,
}

impl Recent {
    pub fn push(&self, record: Record, thumb: Option<Vec<u8>>) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let id = inner.next_id;
        inner.next_id += 1;
        inner.items.push_front(RecentResult { id, record, has_thumb: thumb.is_some(), thumb: thumb.map(Arc::new) });
        inner.items.truncate(KEEP);
    }

    /// Counts a written row in the drift chart under `label` (a drift metrics value).
    pub fn count_hour(&self, record: &Record, label: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).hourly.add(record, label);
    }

    /// The drift chart, as inline SVG.
    pub fn drift_svg(&self) -> String {
        let hourly = self.0.lock().unwrap_or_else(|e| e.into_inner()).hourly.clone();
        hourly.svg(hour_now())
    }

    /// Newest first.
    pub fn list(&self) -> Vec<RecentResult> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).items.iter().cloned().collect()
    }

    /// The thumbnail of a result still in the list.
    pub fn thumb(&self, id: u64) -> Option<Arc<Vec<u8>>> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.items.iter().find(|r| r.id == id).and_then(|r| r.thumb.clone())
    }
}
