//! Shutdown as a value: cloned into every stage; triggered once by a signal (or the end of `--once`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = tokio::sync::watch::channel(false);
        Shutdown { flag: Arc::new(AtomicBool::new(false)), tx: Arc::new(tx) }
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
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
                    tracing::warn!(signal = sig, "second signal: exiting without finishing the batch in flight");
                    std::process::exit(1);
                }
                tracing::info!(signal = sig, "stopping: no new files; finishing the batch in flight");
                me.trigger();
            }
        })?;
        Ok(())
    }
}
