//! Watch: turns inbox activity into "this file is completely written" and feeds the queue.
//!
//! Sources of ready files: the start-up scan (backlog), close-after-write and rename-into events
//! (immediately ready), and any other sign of a new file (create/modify events, files still changing at
//! start-up), which waits until size and mtime are unchanged for the inbox's `settle_ms`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher as _};

use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::queue::{Pushed, QueueSender, ReadyFile};
use crate::shutdown::Shutdown;
use crate::sink::sidecar::is_labelled;

/// What a scan of an inbox found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Unlabelled images that are not changing.
    pub ready: Vec<PathBuf>,
    /// Unlabelled images modified within the settle interval: maybe still being written.
    pub unsettled: Vec<PathBuf>,
}

/// Finds images under `inbox` (or `dir`, a folder inside it) that have no up-to-date sidecar.
pub fn scan(inbox: &InboxConfig, dir: &Path) -> Scan {
    let mut found = Scan::default();
    let depth = if inbox.recursive { usize::MAX } else { 1 };
    let walker = walkdir::WalkDir::new(dir).follow_links(false).max_depth(depth).into_iter();
    // Skip dot-folders (a hidden quarantine, other tools' state).
    let walker = walker.filter_entry(|e| {
        e.depth() == 0 || !(e.file_type().is_dir() && e.file_name().to_string_lossy().starts_with('.'))
    });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(inbox = %inbox.path.display(), error = %e, "cannot read part of the inbox");
                continue;
            }
        };
        let name = entry.file_name().to_string_lossy();
        if crate::beneath::is_stale_temp(&name) {
            // A sidecar temp file left by a crash mid-write (the finished sidecar never replaced it).
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(path = %entry.path().display(), "removed temp file left by an interrupted write"),
                Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale temp file"),
            }
            continue;
        }
        if entry.file_type().is_dir() || !inbox.wants(entry.path()) {
            continue;
        }
        if !entry.file_type().is_file() {
            tracing::warn!(path = %entry.path().display(), kind = kind_of(entry.file_type()), "skipped: not a regular file");
            continue;
        }
        if is_labelled(entry.path()) {
            continue;
        }
        let recent = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age < inbox.settle);
        if recent {
            found.unsettled.push(entry.into_path());
        } else {
            found.ready.push(entry.into_path());
        }
    }
    found
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symbolic link (not followed)"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// Whether a file that was just closed or renamed in holds a whole image, judged by the end marker
/// its format has (JPEG EOI, PNG IEND, GIF trailer, RIFF/BMP size fields). `None`: no cheap check
/// (TIFF), or unreadable. A writer that closes and reopens the file between chunks makes
/// close-after-write events for half files; those fail this check and wait to settle instead.
pub fn looks_complete(path: &Path) -> Option<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 12];
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    let mut tail = [0u8; 12];
    if len >= 12 {
        f.seek(SeekFrom::End(-12)).ok()?;
        f.read_exact(&mut tail).ok()?;
    }
    let le32 = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(len >= 12 && tail[10..] == [0xFF, 0xD9])
    } else if head.starts_with(b"\x89PNG") {
        Some(len >= 12 && tail[4..] == *b"IEND\xAE\x42\x60\x82")
    } else if head.starts_with(b"GIF8") {
        Some(len >= 12 && tail[11] == 0x3B)
    } else if head.starts_with(b"RIFF") && head.len() >= 12 {
        Some(le32(&head[4..8]) + 8 == len)
    } else if head.starts_with(b"BM") && head.len() >= 6 && le32(&head[2..6]) != 0 {
        Some(le32(&head[2..6]) == len)
    } else if len == 0 {
        Some(false)
    } else {
        None
    }
}

/// Files waiting for their size and mtime to stop changing.
#[derive(Default)]
pub struct Settler {
    pending: HashMap<PathBuf, Pending>,
}

struct Pending {
    len: u64,
    mtime: Option<SystemTime>,
    since: Instant,
    settle: Duration,
}

impl Settler {
    /// Notes activity on `path`; it becomes due once unchanged for `settle`.
    pub fn observe(&mut self, path: PathBuf, settle: Duration) {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            self.pending.remove(&path);
            return;
        };
        if !meta.is_file() {
            return;
        }
        let (len, mtime) = (meta.len(), meta.modified().ok());
        let now = Instant::now();
        let entry = self.pending.entry(path).or_insert(Pending { len, mtime, since: now, settle });
        if entry.len != len || entry.mtime != mtime {
            *entry = Pending { len, mtime, since: now, settle };
        }
    }

    pub fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Paths that have been unchanged for their settle interval; they leave the settler.
    pub fn due(&mut self) -> Vec<PathBuf> {
        let now = Instant::now();
        let mut due = Vec::new();
        self.pending.retain(|path, p| {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return false; // gone
            };
            let (len, mtime) = (meta.len(), meta.modified().ok());
            if len != p.len || mtime != p.mtime {
                *p = Pending { len, mtime, since: now, settle: p.settle };
                return true;
            }
            let quiet = now.duration_since(p.since);
            if quiet >= p.settle {
                // A file whose format says it is cut short may be a writer pausing between chunks:
                // give it ten settle intervals (at least 5 s) before labelling it as broken.
                let patience = (p.settle * 10).max(Duration::from_secs(5));
                if quiet < patience && looks_complete(path) == Some(false) {
                    return true;
                }
                due.push(path.clone());
                return false;
            }
            true
        });
        due
    }
}

/// Feeds ready files into the bounded queue from its own thread, so a full queue never stalls event
/// handling: events keep being read and ready files are remembered until there is room.
pub struct Feeder {
    tx: Sender<ReadyFile>,
    handle: std::thread::JoinHandle<()>,
}

impl Feeder {
    pub fn start(queue: QueueSender) -> Result<Feeder, Fatal> {
        let (tx, rx) = crossbeam_channel::unbounded::<ReadyFile>();
        let handle = std::thread::Builder::new()
            .name("feeder".into())
            .spawn(move || feed(rx, queue))
            .map_err(|e| Fatal::io("cannot start feeder thread", e))?;
        Ok(Feeder { tx, handle })
    }

    pub fn sender(&self) -> Sender<ReadyFile> {
        self.tx.clone()
    }

    /// Waits until everything handed over so far is queued (or shutdown began).
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

fn feed(rx: Receiver<ReadyFile>, queue: QueueSender) {
    for file in rx {
        // The image may have been labelled since it was seen (duplicate events, rescans).
        if queue.push_if(file, |p| !is_labelled(p)) == Pushed::ShuttingDown {
            return;
        }
    }
}

/// The running watch stage: inotify watches plus the task that handles their events.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// Creates missing inboxes, watches them, then queues the backlog. Returns once every inbox is
    /// watched (the backlog is still being queued). Call inside a tokio runtime.
    pub fn start(inboxes: Vec<InboxConfig>, feeder: Sender<ReadyFile>, shutdown: Shutdown) -> Result<Watch, Fatal> {
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel::<notify::Result<Event>>();
        let handler = move |res| {
            let _ = ev_tx.send(res);
        };
        let mut inotify = RecommendedWatcher::new(handler.clone(), notify::Config::default())
            .map_err(|e| Fatal::Other(format!("cannot start the file watcher: {e}")))?;
        let mut pollers: Vec<PollWatcher> = Vec::new();
        for ib in &inboxes {
            if !ib.path.exists() {
                std::fs::create_dir_all(&ib.path)
                    .map_err(|e| Fatal::io(format!("cannot create inbox {}", ib.path.display()), e))?;
                tracing::info!(inbox = %ib.path.display(), "created missing inbox");
            }
            let mode = if ib.recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
            let poll = if ib.poll {
                true
            } else {
                match inotify.watch(&ib.path, mode) {
                    Ok(()) => false,
                    Err(e) if is_watch_limit(&e) => {
                        let _ = inotify.unwatch(&ib.path);
                        tracing::error!(
                            inbox = %ib.path.display(),
                            error = %e,
                            "inotify watch limit reached: raise fs.inotify.max_user_watches \
                             (sysctl fs.inotify.max_user_watches=524288); polling this inbox instead"
                        );
                        true
                    }
                    Err(e) => return Err(Fatal::Other(format!("cannot watch inbox {}: {e}", ib.path.display()))),
                }
            };
            if poll {
                let cfg = notify::Config::default().with_poll_interval(ib.poll_interval);
                let mut p = PollWatcher::new(handler.clone(), cfg)
                    .map_err(|e| Fatal::Other(format!("cannot start polling {}: {e}", ib.path.display())))?;
                p.watch(&ib.path, mode)
                    .map_err(|e| Fatal::Other(format!("cannot poll inbox {}: {e}", ib.path.display())))?;
                pollers.push(p);
            }
            tracing::info!(
                inbox = %ib.path.display(),
                recursive = ib.recursive,
                via = if poll { "polling" } else { "inotify" },
                "watching"
            );
        }
        let inboxes = Arc::new(inboxes);
        let watchers = Watchers { _inotify: inotify, _pollers: pollers };
        let task = tokio::spawn(event_loop(watchers, inboxes, ev_rx, feeder, shutdown));
        Ok(Watch { task })
    }

    /// Waits for the watch task to end (it ends on shutdown).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Kept alive for as long as the inboxes should be watched; dropping it removes the watches.
struct Watchers {
    _inotify: RecommendedWatcher,
    _pollers: Vec<PollWatcher>,
}

/// inotify's ENOSPC: out of watches (fs.inotify.max_user_watches).
fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

async fn event_loop(
    watchers: Watchers,
    inboxes: Arc<Vec<InboxConfig>>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<notify::Result<Event>>,
    feeder: Sender<ReadyFile>,
    shutdown: Shutdown,
) {
    let _watchers = watchers;
    let mut settler = Settler::default();
    let (scan_tx, mut scan_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Scan)>();
    for i in 0..inboxes.len() {
        spawn_scan(&inboxes, i, inboxes[i].path.clone(), scan_tx.clone(), true);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some((i, found)) = scan_rx.recv() => {
                for p in found.ready {
                    let _ = feeder.send(ReadyFile::new(p));
                }
                for p in found.unsettled {
                    settler.observe(p, inboxes[i].settle);
                }
            }
            Some(ev) = events.recv() => match ev {
                Ok(ev) => handle_event(ev, &inboxes, &mut settler, &feeder, &scan_tx),
                Err(e) if is_watch_limit(&e) => {
                    // A new sub-folder could not be watched: find its files by scanning.
                    tracing::error!(error = %e, "inotify watch limit reached: raise fs.inotify.max_user_watches; rescanning");
                    rescan_all(&inboxes, &scan_tx);
                }
                Err(e) => tracing::error!(error = %e, "file watcher error"),
            },
            _ = tick.tick() => {
                for p in settler.due() {
                    let _ = feeder.send(ReadyFile::new(p));
                }
            }
        }
    }
}

fn spawn_scan(
    inboxes: &Arc<Vec<InboxConfig>>,
    i: usize,
    dir: PathBuf,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, Scan)>,
    is_startup: bool,
) {
    let inboxes = inboxes.clone();
    tokio::task::spawn_blocking(move || {
        let found = scan(&inboxes[i], &dir);
        if is_startup {
            tracing::info!(
                inbox = %inboxes[i].path.display(),
                backlog = found.ready.len() + found.unsettled.len(),
                "start-up scan done"
            );
        }
        let _ = tx.send((i, found));
    });
}

fn inbox_of<'a>(inboxes: &'a [InboxConfig], path: &Path) -> Option<(usize, &'a InboxConfig)> {
    inboxes.iter().enumerate().find(|(_, ib)| path.starts_with(&ib.path))
}

fn handle_event(
    ev: Event,
    inboxes: &Arc<Vec<InboxConfig>>,
    settler: &mut Settler,
    feeder: &Sender<ReadyFile>,
    scan_tx: &tokio::sync::mpsc::UnboundedSender<(usize, Scan)>,
) {
    if ev.need_rescan() {
        tracing::warn!("file watcher lost events; rescanning every inbox");
        rescan_all(inboxes, scan_tx);
        return;
    }
    let ready_now = |path: &Path, settler: &mut Settler| {
        let Some((_, ib)) = inbox_of(inboxes, path) else { return };
        if !ib.wants(path) {
            return;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(m) => {
                tracing::warn!(path = %path.display(), kind = kind_of(m.file_type()), "skipped: not a regular file");
                return;
            }
            Err(_) => return, // gone already
        }
        if looks_complete(path) == Some(false) {
            settler.observe(path.to_path_buf(), ib.settle);
        } else {
            settler.forget(path);
            let _ = feeder.send(ReadyFile::new(path.to_path_buf()));
        }
    };
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            for p in &ev.paths {
                ready_now(p, settler);
            }
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            for p in &ev.paths {
                if p.is_dir() {
                    rescan_dir(inboxes, p, scan_tx);
                } else {
                    ready_now(p, settler);
                }
            }
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            if let [from, to] = &ev.paths[..] {
                settler.forget(from);
                if to.is_dir() {
                    rescan_dir(inboxes, to, scan_tx);
                } else {
                    ready_now(to, settler);
                }
            }
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
            for p in &ev.paths {
                settler.forget(p);
            }
        }
        EventKind::Create(CreateKind::Folder) => {
            for p in &ev.paths {
                rescan_dir(inboxes, p, scan_tx);
            }
        }
        EventKind::Create(_) | EventKind::Modify(_) => {
            for p in &ev.paths {
                if let Some((_, ib)) = inbox_of(inboxes, p) {
                    if ib.wants(p) {
                        settler.observe(p.clone(), ib.settle);
                    }
                }
            }
        }
        _ => {}
    }
}

fn rescan_all(inboxes: &Arc<Vec<InboxConfig>>, scan_tx: &tokio::sync::mpsc::UnboundedSender<(usize, Scan)>) {
    for (i, ib) in inboxes.iter().enumerate() {
        spawn_scan(inboxes, i, ib.path.clone(), scan_tx.clone(), false);
    }
}

/// A folder appeared inside an inbox: files may have been written into it before its watch existed.
fn rescan_dir(inboxes: &Arc<Vec<InboxConfig>>, dir: &Path, scan_tx: &tokio::sync::mpsc::UnboundedSender<(usize, Scan)>) {
    if let Some((i, ib)) = inbox_of(inboxes, dir) {
        if ib.recursive {
            spawn_scan(inboxes, i, dir.to_path_buf(), scan_tx.clone(), false);
        }
    }
}

/// For `--once`: scans every inbox, waits for still-changing files to settle, and hands everything to
/// `feeder`. Returns the number of images found.
pub fn scan_backlog(inboxes: &[InboxConfig], feeder: &Sender<ReadyFile>, shutdown: &Shutdown) -> usize {
    let mut settler = Settler::default();
    let mut total = 0;
    for ib in inboxes {
        if !ib.path.is_dir() {
            tracing::warn!(inbox = %ib.path.display(), "inbox does not exist; nothing to do there");
            continue;
        }
        let found = scan(ib, &ib.path);
        tracing::info!(inbox = %ib.path.display(), backlog = found.ready.len() + found.unsettled.len(), "scan done");
        total += found.ready.len() + found.unsettled.len();
        for p in found.ready {
            let _ = feeder.send(ReadyFile::new(p));
        }
        for p in found.unsettled {
            settler.observe(p, ib.settle);
        }
    }
    while !settler.is_empty() && !shutdown.is_triggered() {
        std::thread::sleep(Duration::from_millis(50));
        for p in settler.due() {
            let _ = feeder.send(ReadyFile::new(p));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settler_waits_for_size_and_mtime_to_hold_still() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        std::fs::write(&p, b"12").unwrap();
        let mut s = Settler::default();
        s.observe(p.clone(), Duration::from_millis(200));
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        std::fs::write(&p, b"1234").unwrap(); // still growing: the clock restarts
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.due(), vec![p]);
        assert!(s.is_empty());
    }

    #[test]
    fn settler_forgets_files_that_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        std::fs::write(&p, b"12").unwrap();
        let mut s = Settler::default();
        s.observe(p.clone(), Duration::ZERO);
        std::fs::remove_file(&p).unwrap();
        assert!(s.due().is_empty());
        assert!(s.is_empty());
    }
}
