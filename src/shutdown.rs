//! Shutdown as a value: cloned into every stage; triggered once by a signal (or the end of `--once`),
//! or by a stage that cannot go on (`fail`), which makes labeld exit non-zero.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
    /// Dropped on trigger: threads waiting on `closed` wake at once.
    open: Arc<Mutex<Option<Sender<()>>>>,
    closed: Receiver<()>,
    /// Why a stage stopped labeld (the first reason wins).
    failure: Arc<Mutex<Option<Failure>>>,
}

/// A stage that could not go on, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub thread: String,
    pub reason: String,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = tokio::sync::watch::channel(false);
        let (open, closed) = crossbeam_channel::bounded(0);
        Shutdown {
            flag: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
            open: Arc::new(Mutex::new(Some(open))),
            closed,
            failure: Arc::new(Mutex::new(None)),
        }
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
        self.open.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Stops labeld because `thread` cannot go on; `run` then returns a `Fatal`.
    pub fn fail(&self, thread: &str, reason: &str) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(Failure { thread: thread.to_string(), reason: reason.to_string() });
        }
        drop(failure);
        self.trigger();
    }

    /// The first `fail`, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Blocks for up to `d`, returning early (true) once shutdown is triggered.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        match self.closed.recv_timeout(d) {
            Err(RecvTimeoutError::Disconnected) => true,
            _ => self.is_triggered(),
        }
    }

    /// Disconnects when shutdown is triggered: for a thread's `crossbeam_channel::select!` over its inputs.
    pub fn closed(&self) -> &Receiver<()> {
        &self.closed
    }

    /// Resolves once `trigger` has been called (immediately if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// SIGTERM / SIGINT trigger this shutdown (a second one exits at once); SIGHUP calls `on_hangup`.
    pub fn trigger_on_signals(&self, on_hangup: impl Fn() + Send + 'static) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let me = self.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::info!("SIGHUP: reloading the config and reopening the results log");
                    on_hangup();
                    continue;
                }
                if me.is_triggered() {
                    exit_now(sig);
                }
                tracing::info!(signal = sig, "stopping: no new files; finishing the batch in flight");
                me.trigger();
            }
        })?;
        Ok(())
    }
}

/// Keeps a SIGHUP that arrives while labeld starts (before `trigger_on_signals`) from killing it, as
/// the signal's default action would: the config being read then is the newest anyway.
pub fn survive_early_hangups() -> std::io::Result<()> {
    signal_hook::flag::register(signal_hook::consts::SIGHUP, std::sync::Arc::new(AtomicBool::new(false)))?;
    Ok(())
}

/// The exit code after a second SIGTERM/SIGINT: 128 + the signal, as a shell reports a process that
/// signal killed (143 for SIGTERM, 130 for SIGINT).
pub fn forced_exit_code(sig: i32) -> i32 {
    128 + sig
}

/// Exits without running atexit handlers or static destructors: `std::process::exit` runs them while
/// libtorch's threads still use that state, and crashed (SIGSEGV) every time.
fn exit_now(sig: i32) -> ! {
    let code = forced_exit_code(sig);
    tracing::warn!(
        signal = sig,
        exit_code = code,
        "second signal: exiting now without finishing the batch in flight (its images have no record yet and are labelled after the restart)"
    );
    // SAFETY: _exit only ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_thread_wakes_on_trigger_and_the_first_failure_is_kept() {
        let s = Shutdown::new();
        assert!(!s.wait_timeout(Duration::from_millis(10)));
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_timeout(Duration::from_secs(60)))
        };
        s.fail("decode-0", "panicked");
        s.fail("infer-0", "its decode thread died");
        assert!(waiter.join().unwrap());
        assert!(s.wait_timeout(Duration::from_secs(60)));
        assert_eq!(s.failure(), Some(Failure { thread: "decode-0".into(), reason: "panicked".into() }));
    }
}
