//! Is labeld ready, and are its workers making progress? Read by systemd's watchdog and by
//! /healthz and /readyz.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::queue::ReadyFile;

#[derive(Clone)]
pub struct Health(Arc<Inner>);

struct Inner {
    ready: AtomicBool,
    /// Inbox folders that are gone (deleted or moved away) while watched: not ready meanwhile.
    missing: Mutex<std::collections::BTreeSet<std::path::PathBuf>>,
    epoch: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// One thread that does work in steps (a decode thread, an inference thread).
pub struct Slot {
    name: String,
    /// Milliseconds since `epoch` + 1 when the current step began; 0 while idle.
    busy_since: AtomicU64,
    epoch: Instant,
    /// The images of the current step.
    work: Mutex<Vec<ReadyFile>>,
}

/// A thread stuck in one step.
#[derive(Debug, Clone)]
pub struct Stall {
    pub thread: String,
    pub for_: Duration,
    /// When the step began (identifies it across checks).
    pub since_ms: u64,
    pub files: Vec<ReadyFile>,
}

/// Marks a slot busy until dropped.
pub struct Busy<'a>(&'a Slot);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Relaxed);
        self.0.work.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Slot {
    /// Marks the slot busy with `files` until the returned guard is dropped.
    pub fn busy(&self, files: &[ReadyFile]) -> Busy<'_> {
        *self.work.lock().unwrap_or_else(|e| e.into_inner()) = files.to_vec();
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
        Health(Arc::new(Inner {
            ready: AtomicBool::new(false),
            missing: Mutex::default(),
            epoch: Instant::now(),
            slots: Mutex::new(Vec::new()),
        }))
    }

    pub fn slot(&self, name: impl Into<String>) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            name: name.into(),
            busy_since: AtomicU64::new(0),
            epoch: self.0.epoch,
            work: Mutex::new(Vec::new()),
        });
        self.0.slots.lock().unwrap_or_else(|e| e.into_inner()).push(slot.clone());
        slot
    }

    /// Model loaded and every inbox watched.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst) && self.missing_inboxes().is_empty()
    }

    /// Marks an inbox folder as gone (or back).
    pub fn set_inbox_missing(&self, inbox: &std::path::Path, missing: bool) {
        let mut m = self.0.missing.lock().unwrap_or_else(|e| e.into_inner());
        if missing {
            m.insert(inbox.to_path_buf());
        } else {
            m.remove(inbox);
        }
    }

    /// Inbox folders that are gone right now.
    pub fn missing_inboxes(&self) -> Vec<std::path::PathBuf> {
        self.0.missing.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Every thread stuck in one step for more than `limit`, longest first.
    pub fn stalls(&self, limit: Duration) -> Vec<Stall> {
        let slots = self.0.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Stall> = slots
            .iter()
            .filter_map(|s| {
                let for_ = s.busy_for().filter(|d| *d > limit)?;
                Some(Stall {
                    thread: s.name.clone(),
                    for_,
                    since_ms: s.busy_since.load(Ordering::Relaxed),
                    files: s.work.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.for_));
        out
    }

    /// The thread stuck the longest, if any for more than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<(String, Duration)> {
        self.stalls(limit).into_iter().next().map(|s| (s.thread, s.for_))
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
        let busy = a.busy(&[ReadyFile::new("/in/a.jpg".into())]);
        std::thread::sleep(Duration::from_millis(30));
        let (name, d) = h.stalled(Duration::from_millis(10)).unwrap();
        assert_eq!(name, "infer-0");
        assert!(d >= Duration::from_millis(30));
        let stall = &h.stalls(Duration::from_millis(10))[0];
        assert_eq!(stall.files[0].path, std::path::PathBuf::from("/in/a.jpg"));
        assert_eq!(h.stalled(Duration::from_secs(5)), None);
        drop(busy);
        assert_eq!(h.stalled(Duration::ZERO), None);
    }
}
