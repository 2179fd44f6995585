//! Where the time goes, per pipeline stage: shared counters every stage adds to, summarised when a
//! run ends (and, later, exported).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Read,
    Decode,
    Resize,
    Inference,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Read, Stage::Decode, Stage::Resize, Stage::Inference, Stage::Write];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Decode => "decode",
            Stage::Resize => "resize",
            Stage::Inference => "inference",
            Stage::Write => "write",
        }
    }
}

/// Total time spent in each stage; cheap to clone and share.
#[derive(Clone, Default)]
pub struct StageTimes(Arc<[AtomicU64; 5]>);

impl StageTimes {
    pub fn add(&self, stage: Stage, d: Duration) {
        self.0[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn total(&self, stage: Stage) -> Duration {
        Duration::from_nanos(self.0[stage as usize].load(Ordering::Relaxed))
    }

    /// "read=0.1 decode=3.2 ..." in milliseconds per image.
    pub fn per_image(&self, images: u64) -> String {
        Stage::ALL
            .iter()
            .map(|s| format!("{}={:.2}", s.name(), self.total(*s).as_secs_f64() * 1e3 / images.max(1) as f64))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
