//! Is labeld ready, and are its workers making progress? Read by systemd's watchdog and by
//! /healthz and /readyz.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Health(Arc<Inner>);

struct Inner {
    ready: AtomicBool,
    epoch: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// One thread that does work in steps (a decode thread, an inference thread).
pub struct Slot {
    name: String,
    /// Milliseconds since `epoch` + 1 when the current step began; 0 while idle.
    busy_since: AtomicU64,
    epoch: Instant,
}

/// Marks a slot busy until dropped.
pub struct Busy<'a>(&'a Slot);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Relaxed);
    }
}

impl Slot {
    pub fn busy(&self) -> Busy<'_> {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(now, Ordering::Relaxed);
        Busy(self)
    }

    fn busy_for(&self) -> Option<Duration> {
        let since = self.busy_since.load(Ordering::Relaxed);
        (since != 0).then(|| self.epoch.elapsed().saturating_sub(Duration::from_millis(since - 1)))
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Health(Arc::new(Inner { ready: AtomicBool::new(false), epoch: Instant::now(), slots: Mutex::new(Vec::new()) }))
    }

    pub fn slot(&self, name: impl Into<String>) -> Arc<Slot> {
        let slot = Arc::new(Slot { name: name.into(), busy_since: AtomicU64::new(0), epoch: self.0.epoch });
        self.0.slots.lock().unwrap_or_else(|e| e.into_inner()).push(slot.clone());
        slot
    }

    /// Model loaded and every inbox watched.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst)
    }

    /// The thread that has been stuck in one step the longest, if any for more than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<(String, Duration)> {
        let slots = self.0.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(|s| s.busy_for().map(|d| (s.name.clone(), d)))
            .filter(|(_, d)| *d > limit)
            .max_by_key(|(_, d)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_that_runs_too_long_is_reported_and_an_idle_slot_never_is() {
        let h = Health::new();
        let a = h.slot("infer-0");
        let _idle = h.slot("decode-0");
        assert_eq!(h.stalled(Duration::ZERO), None);
        let busy = a.busy();
        std::thread::sleep(Duration::from_millis(30));
        let (name, d) = h.stalled(Duration::from_millis(10)).unwrap();
        assert_eq!(name, "infer-0");
        assert!(d >= Duration::from_millis(30));
        assert_eq!(h.stalled(Duration::from_secs(5)), None);
        drop(busy);
        assert_eq!(h.stalled(Duration::ZERO), None);
    }
}
