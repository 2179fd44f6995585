//! What the results log tells its one reader, the MQTT outbox: which file it appends to (a shared
//! handle, so a renamed-away file stays readable), how much of it is durable, and when that file's life
//! ended (rotated away, or emptied in place by `copytruncate`). Only fsynced bytes are announced: a
//! failed write that is cut back is never seen by the reader (invariant I9 in docs/design.md).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use crate::vocab::results_log::{FINGERPRINT_LEN, Fingerprint};

/// Rotated-away files the reader has not taken yet; beyond this the oldest are dropped (the outbox then
/// looks for them beside the log by fingerprint).
const MAX_RETIRED: usize = 64;


/// One file's life as the log: from when the writer opened it (or found it emptied) until it moved on.
#[derive(Debug, Clone)]
pub struct Announced {
    /// Counts up with every new file or truncation, in the order written.
    pub epoch: u64,
    pub file: Arc<File>,
    pub path: PathBuf,
    pub dev: u64,
    pub inode: u64,
    /// Its length when the writer opened it: rows before this were there before (re)start.
    pub opened_len: u64,
    /// Bytes written and fsynced; never a torn row.
    pub durable: u64,
    pub fingerprint: Option<Fingerprint>,
    /// Ended by being emptied in place: its bytes are no longer in `file` (look for the copy).
    pub emptied: bool,
}

/// What the reader takes from the tap: the files that ended since it last looked, in order, and the
/// one being written now, with the total of rows ever appended (for counting what is pending).
#[derive(Debug, Clone, Default)]
pub struct TapView {
    pub retired: Vec<Announced>,
    pub live: Option<Announced>,
    pub rows: u64,
}

#[derive(Default)]
struct TapState {
    retired: VecDeque<Announced>,
    live: Option<Announced>,
    next_epoch: u64,
    rows: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<TapState>,
    wake: tokio::sync::Notify,
}

/// Shared by the sink's `ResultLog` (writer) and the outbox (reader). Cloning shares it.
#[derive(Clone, Default)]
pub struct LogTap {
    shared: Arc<Shared>,
}

impl LogTap {
    pub fn new() -> LogTap {
        LogTap::default()
    }

    /// The files that ended since the last call (handed over, not kept) and the live one.
    pub fn take(&self) -> TapView {
        let mut s = self.lock();
        TapView { retired: s.retired.drain(..).collect(), live: s.live.clone(), rows: s.rows }
    }

    /// The live file and the row total, leaving retired files for the next [`LogTap::take`].
    pub fn peek(&self) -> TapView {
        let s = self.lock();
        TapView { retired: Vec::new(), live: s.live.clone(), rows: s.rows }
    }

    /// Whether files ended since the last [`LogTap::take`].
    pub fn has_retired(&self) -> bool {
        !self.lock().retired.is_empty()
    }

    /// Resolves after the writer announced something (possibly at once: a wake-up is kept until taken).
    pub async fn changed(&self) {
        self.shared.wake.notified().await;
    }

    /// The writer (re)opened its log at `path`. The same file as before, not shorter: its life goes on.
    /// Another file, or the same one emptied: a new generation.
    pub(super) fn opened(&self, file: &File, path: &Path) -> std::io::Result<()> {
        let meta = file.metadata()?;
        let handle = Arc::new(file.try_clone()?);
        let fingerprint = Fingerprint::of(file, meta.len())?;
        let mut s = self.lock();
        let same_file = s.live.as_ref().is_some_and(|l| l.dev == meta.dev() && l.inode == meta.ino());
        if same_file {
            // Emptied in place since the last append (its header may be back): a new life of it.
            begin_emptied(&mut s, meta.len());
        }
        if let Some(live) = s.live.as_mut().filter(|_| same_file) {
            live.file = handle;
            live.path = path.to_path_buf();
            live.durable = meta.len();
            live.fingerprint = fingerprint;
        } else {
            let epoch = s.next_epoch;
            s.next_epoch += 1;
            let next = Announced {
                epoch,
                file: handle,
                path: path.to_path_buf(),
                dev: meta.dev(),
                inode: meta.ino(),
                opened_len: meta.len(),
                durable: meta.len(),
                fingerprint,
                emptied: false,
            };
            retire(&mut s, next);
        }
        drop(s);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The writer is about to append at `len`: shorter than what it made durable means the file was
    /// emptied under it (copytruncate), and what follows is a new life of the same file.
    pub(super) fn shrunk_to(&self, len: u64) {
        let mut s = self.lock();
        if begin_emptied(&mut s, len) {
            drop(s);
            self.shared.wake.notify_one();
        }
    }

    /// For the reader, when the live file ends before what was made durable: it was emptied in place
    /// and the writer has not written since. Ends that generation now (its rows are in the copy), so
    /// they need not wait for the next image. Measured under the lock, so it cannot race an append.
    pub fn check_emptied(&self) -> bool {
        let mut s = self.lock();
        let Some(len) = s.live.as_ref().and_then(|l| l.file.metadata().ok()).map(|m| m.len()) else { return false };
        begin_emptied(&mut s, len)
    }

    /// `rows` more rows are durable; the file is now `len` bytes long.
    pub(super) fn appended(&self, file: &File, len: u64, rows: u64) {
        let mut s = self.lock();
        s.rows += rows;
        let Some(live) = s.live.as_mut() else { return };
        live.durable = len;
        if live.fingerprint.is_none_or(|f| f.len < FINGERPRINT_LEN) {
            // Only while the file is young: at most one 4 KB read per append.
            match Fingerprint::of(file, len) {
                Ok(f) => live.fingerprint = f,
                Err(e) => tracing::warn!(csv = %live.path.display(), error = %e, "cannot read the start of the results log to identify it"),
            }
        }
        drop(s);
        self.shared.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The live file is `len` long: if shorter than its durable length, a new life of it begins.
fn begin_emptied(s: &mut TapState, len: u64) -> bool {
    let Some(live) = s.live.as_ref().filter(|l| len < l.durable) else { return false };
    let mut next = live.clone();
    next.epoch = s.next_epoch;
    s.next_epoch += 1;
    (next.opened_len, next.durable, next.fingerprint) = (len, len, None);
    if let Some(old) = s.live.as_mut() {
        old.emptied = true;
    }
    retire(s, next);
    true
}

/// `next` becomes the live file; the one before it waits for the reader.
fn retire(s: &mut TapState, next: Announced) {
    if let Some(old) = s.live.replace(next) {
        s.retired.push_back(old);
    }
    if s.retired.len() > MAX_RETIRED
        && let Some(dropped) = s.retired.pop_front()
    {
        tracing::warn!(csv = %dropped.path.display(), "many log rotations unread by the publisher; it looks for the oldest beside the log");
    }
}
