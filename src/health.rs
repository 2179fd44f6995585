//! Is labeld ready, and are its workers making progress? Read by systemd's watchdog and by
//! /healthz and /readyz.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::job::Job;
use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct Health(Arc<Inner>);

struct Inner {
    ready: AtomicBool,
    /// Inbox folders that are gone (deleted or moved away) while watched: not ready meanwhile.
    missing: Mutex<std::collections::BTreeSet<std::path::PathBuf>>,
    epoch: Instant,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Long-lived threads that died: (thread, why).
    dead: Mutex<Vec<(String, String)>>,
    /// Why the model fails even on its test input, while it does.
    model_failing: Mutex<Option<String>>,
    /// Milliseconds since `epoch` of the last sign of progress: a batch done, or nothing in flight.
    progress_at: AtomicU64,
}

/// Held by a long-lived thread for its whole life: if the thread unwinds (a panic outside the
/// per-image boundary) or calls `died`, /healthz turns 503 and labeld shuts down with a failure, so
/// that systemd restarts it instead of a daemon that answers 200 and labels nothing.
pub struct Lifeline {
    thread: String,
    health: Health,
    shutdown: Shutdown,
}

impl Lifeline {
    /// Records that the thread stops for `reason` though labeld is not done.
    pub fn died(&self, reason: &str) {
        tracing::error!(thread = %self.thread, reason = %reason, "thread died; labeld stops and exits non-zero so that it is restarted");
        self.health.0.dead.lock().unwrap_or_else(|e| e.into_inner()).push((self.thread.clone(), reason.to_string()));
        self.shutdown.fail(&self.thread, reason);
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let what = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "see the message above".into());
            self.died(&format!("panicked: {what}"));
        }
    }
}

thread_local! {
    /// The message and place of this thread's latest panic, for its `Lifeline`.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps each panic's message for the panicking thread's `Lifeline`, so the death record says why;
/// the default hook still prints it (with a backtrace if asked for).
pub fn note_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let what = format!("{}{place}", crate::error::panic_message(info.payload()));
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(what));
            default(info);
        }));
    });
}

/// Test hook: `LABELD_TEST_PANIC_THREAD=<thread name>` (read once) makes that thread panic outside
/// any per-image boundary when it takes its first batch, so tests can check that a dead thread stops
/// labeld with a non-zero exit. Unset in production; setting it only ever crashes the named thread.
pub fn test_panic_hook(thread: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var("LABELD_TEST_PANIC_THREAD").ok());
    if target.as_deref() == Some(thread) {
        panic!("LABELD_TEST_PANIC_THREAD={thread}: panicking on purpose (test hook)");
    }
}

/// One thread that does work in steps (a decode thread, an inference thread).
pub struct Slot {
    name: String,
    /// Milliseconds since `epoch` + 1 when the current step began; 0 while idle.
    busy_since: AtomicU64,
    epoch: Instant,
    /// The images of the current step.
    work: Mutex<Vec<Job>>,
}

/// A thread stuck in one step.
#[derive(Debug, Clone)]
pub struct Stall {
    pub thread: String,
    pub for_: Duration,
    /// When the step began (identifies it across checks).
    pub since_ms: u64,
    pub files: Vec<Job>,
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
    pub fn busy(&self, files: &[Job]) -> Busy<'_> {
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
            dead: Mutex::new(Vec::new()),
            model_failing: Mutex::new(None),
            progress_at: AtomicU64::new(0),
        }))
    }

    /// A worker finished a batch.
    pub fn progressed(&self) {
        self.0.progress_at.store(self.0.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long images have been in flight with none completed, if longer than `limit`. Asked once a
    /// second by the supervisor; with nothing in flight there is nothing to wait for.
    pub fn starved(&self, in_flight: usize, limit: Duration) -> Option<Duration> {
        if in_flight == 0 {
            self.progressed();
            return None;
        }
        let since = Duration::from_millis(self.0.progress_at.load(Ordering::Relaxed));
        Some(self.0.epoch.elapsed().saturating_sub(since)).filter(|d| *d > limit)
    }

    /// A guard for the long-lived thread `thread`; see `Lifeline`.
    pub fn lifeline(&self, thread: impl Into<String>, shutdown: &Shutdown) -> Lifeline {
        Lifeline { thread: thread.into(), health: self.clone(), shutdown: shutdown.clone() }
    }

    /// The first long-lived thread that died, and why.
    pub fn dead_thread(&self) -> Option<(String, String)> {
        self.0.dead.lock().unwrap_or_else(|e| e.into_inner()).first().cloned()
    }

    /// Why /healthz fails: a dead thread, a thread stuck in one step for more than `limit`, or
    /// `in_flight` images with none completed for more than `limit` (liveness is progress).
    pub fn unhealthy(&self, limit: Duration, in_flight: usize) -> Option<String> {
        if let Some((thread, reason)) = self.dead_thread() {
            return Some(format!("thread {thread} died: {reason}"));
        }
        if let Some((thread, d)) = self.stalled(limit) {
            return Some(format!("{thread} stuck for {} s", d.as_secs()));
        }
        self.starved(in_flight, limit)
            .map(|d| format!("no progress: {in_flight} images in flight and none completed for {} s", d.as_secs()))
    }

    /// The model fails on its own test input (`Some(why)`), or works again (`None`).
    pub fn set_model_failing(&self, why: Option<String>) {
        *self.0.model_failing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why /readyz fails, if it does.
    pub fn not_ready(&self) -> Option<String> {
        if let Some((thread, reason)) = self.dead_thread() {
            return Some(format!("thread {thread} died: {reason}"));
        }
        if let Some(why) = self.0.model_failing.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(format!("model failing: {why}; retrying"));
        }
        let missing = self.missing_inboxes();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            return Some(format!("inbox folder missing (recreate it): {}", list.join(", ")));
        }
        (!self.0.ready.load(Ordering::SeqCst)).then(|| "loading the model or setting up watches".to_string())
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

    /// Ready, the model working and no thread dead.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_none()
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
        let in_flight = crate::job::InFlight::default();
        let claim = in_flight.claim(std::path::Path::new("/in/a.jpg"), None).unwrap();
        let busy = a.busy(&[Job::inbox(claim, std::time::Instant::now())]);
        std::thread::sleep(Duration::from_millis(30));
        let (name, d) = h.stalled(Duration::from_millis(10)).unwrap();
        assert_eq!(name, "infer-0");
        assert!(d >= Duration::from_millis(30));
        let stall = &h.stalls(Duration::from_millis(10))[0];
        assert_eq!(stall.files[0].path(), Some(std::path::Path::new("/in/a.jpg")));
        assert_eq!(h.stalled(Duration::from_secs(5)), None);
        drop(busy);
        assert_eq!(h.stalled(Duration::ZERO), None);
    }

    #[test]
    fn a_thread_that_panics_makes_labeld_unhealthy_and_fails_the_shutdown() {
        let (h, shutdown) = (Health::new(), Shutdown::new());
        h.set_ready(true);
        let line = h.lifeline("decode-0", &shutdown);
        note_panics();
        let _ = std::thread::spawn(move || {
            let _line = line;
            panic!("boom");
        })
        .join();
        let why = h.unhealthy(Duration::from_secs(60), 0).unwrap();
        assert!(why.contains("decode-0 died: panicked: boom at src/health.rs"), "{why}");
        assert!(!h.is_ready());
        assert!(shutdown.is_triggered());
        assert_eq!(shutdown.failure().unwrap().thread, "decode-0");
        // A thread that returns normally is not a death.
        let (h, shutdown) = (Health::new(), Shutdown::new());
        drop(h.lifeline("sink", &shutdown));
        assert_eq!(h.unhealthy(Duration::from_secs(60), 0), None);
        assert!(!shutdown.is_triggered());
    }

    #[test]
    fn images_in_flight_with_none_completed_for_too_long_is_unhealthy() {
        let h = Health::new();
        let limit = Duration::from_millis(20);
        assert_eq!(h.unhealthy(limit, 0), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(h.unhealthy(limit, 0), None, "idle is not a stall");
        assert_eq!(h.starved(3, limit), None, "the wait starts when the images arrive");
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.unhealthy(limit, 3).unwrap().starts_with("no progress: 3 images in flight"));
        h.progressed();
        assert_eq!(h.unhealthy(limit, 3), None);
    }

    #[test]
    fn a_failing_model_makes_labeld_not_ready_until_it_works_again() {
        let h = Health::new();
        h.set_ready(true);
        h.set_model_failing(Some("probe: boom".into()));
        assert!(h.not_ready().unwrap().starts_with("model failing: probe: boom"));
        h.set_model_failing(None);
        assert!(h.is_ready());
    }
}
