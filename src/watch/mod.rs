//! Watch: turns inbox activity into "this file is completely written" and feeds the queue.
//!
//! Sources of ready files: the start-up scan (backlog), close-after-write and rename-into events
//! (immediately ready), and any other sign of a new file (create/modify events, files still changing at
//! start-up), which waits until size and mtime are unchanged for the inbox's `settle_ms`. Symbolic
//! links are never followed below an inbox's configured path; folders that go away and come back are
//! watched and scanned again.
//!
//! The stage runs on its own threads, never on the runtime that answers HTTP: one thread handles the
//! events (`stage.rs`), blocking on them, on scan results, on shutdown and on the settler's next
//! deadline; one thread per inbox scans (`scan.rs`); the decisions about settling are a pure state
//! machine (`settle.rs`) with the stat and read calls beside it (`look.rs`).

mod feeder;
mod folders;
mod look;
mod mounts;
mod notices;
mod scan;
mod settle;
mod stage;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

pub use feeder::Feeder;
pub use look::{looks_complete, open_regular};
pub use scan::{Scan, scan};
pub use settle::{Check, Seen, Settler};

use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::health::Health;
use crate::queue::ReadyFile;
use crate::shutdown::Shutdown;

/// The running watch stage: its thread, which owns the inotify watches and handles their events.
pub struct Watch {
    thread: JoinHandle<()>,
    /// Closed when the thread ends (normally or by a panic); taken once that has been seen.
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Watch {
    /// Creates missing inboxes, watches them, then queues the backlog. Returns once every inbox is
    /// watched (the backlog is still being queued). The file-system work happens on the watch thread;
    /// this only waits for it to say that every inbox is watched.
    pub fn start(inboxes: Vec<InboxConfig>, feeder: Sender<ReadyFile>, health: Health, shutdown: Shutdown) -> Result<Watch, Fatal> {
        let (up_tx, up_rx) = crossbeam_channel::bounded::<Result<(), Fatal>>(1);
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watcher".into())
            .spawn(move || {
                let _ended = ended_tx;
                let stage = match stage::Stage::start(Arc::new(inboxes), feeder, health, &shutdown) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = up_tx.send(Err(e));
                        return;
                    }
                };
                let _ = up_tx.send(Ok(()));
                stage.run(&shutdown);
            })
            .map_err(|e| Fatal::io("cannot start the inbox watcher thread", e))?;
        match up_rx.recv() {
            Ok(Ok(())) => Ok(Watch { thread, ended: Some(ended) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Fatal::Other("the inbox watcher thread ended while starting (a panic is logged above)".into()))
            }
        }
    }

    /// Resolves when the watch thread ends (only its shutdown should end it); after that has been
    /// seen once, never again.
    pub async fn ended(&mut self) {
        match self.ended.as_mut() {
            Some(rx) => {
                let _ = rx.await;
                self.ended = None;
            }
            None => std::future::pending().await,
        }
    }

    /// Waits, without blocking the async runtime, for the watch thread to end (it ends on shutdown).
    pub async fn join(self) {
        if let Some(rx) = self.ended {
            let _ = rx.await;
        }
        let _ = self.thread.join();
    }
}

/// inotify's ENOSPC: out of watches (fs.inotify.max_user_watches).
fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

/// For `--once`: scans every inbox, waits for still-changing files to settle, and hands everything to
/// `feeder`. Returns the number of images found.
pub fn scan_backlog(inboxes: &[InboxConfig], feeder: &Sender<ReadyFile>, shutdown: &Shutdown) -> usize {
    let mut settler = Settler::default();
    let mut notices = notices::Notices::default();
    let mut total = 0;
    for ib in inboxes {
        if !ib.path.is_dir() {
            tracing::warn!(inbox = %ib.path.display(), "inbox does not exist; nothing to do there");
            continue;
        }
        let found = scan(ib, &ib.path, shutdown);
        tracing::info!(inbox = %ib.path.display(), backlog = found.ready.len() + found.unsettled.len(), "scan done");
        total += found.ready.len() + found.unsettled.len();
        for p in &found.links {
            notices.link(p);
        }
        for (p, why) in &found.unreadable {
            notices.unreadable(p, why);
        }
        for p in found.ready {
            let _ = feeder.send(ReadyFile::new(p));
        }
        for p in found.unsettled {
            look::observe(&mut settler, p, ib.settle, Instant::now());
        }
    }
    while let Some(next) = settler.next_check() {
        if shutdown.wait_timeout(next.saturating_duration_since(Instant::now())) {
            break;
        }
        for p in look::settled(&mut settler, Instant::now()) {
            let _ = feeder.send(ReadyFile::new(p));
        }
    }
    total
}
