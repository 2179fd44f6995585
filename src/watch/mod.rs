//! Watch: turns inbox activity into "this file is completely written" and feeds the queue.
//!
//! Sources of ready files: the start-up scan (backlog), close-after-write and rename-into events
//! (immediately ready), and any other sign of a new file (create/modify events, files still changing at
//! start-up), which waits until size and mtime are unchanged for the inbox's `settle_ms`. Symbolic
//! links are never followed; folders that go away and come back are watched and scanned again.

mod feeder;
mod folders;
mod notices;
mod scan;
mod settle;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use notify::Event;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};

pub use feeder::Feeder;
pub use scan::{Scan, scan};
pub use settle::{Settler, looks_complete, open_regular};

use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::health::Health;
use crate::queue::ReadyFile;
use crate::shutdown::Shutdown;
use folders::Folders;

/// How often each inbox folder is checked to still be the one watched (a safety net under the
/// delete/move events that normally say so at once).
const ROOT_CHECK: Duration = Duration::from_secs(2);

/// The running watch stage: inotify watches plus the task that handles their events.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// Creates missing inboxes, watches them, then queues the backlog. Returns once every inbox is
    /// watched (the backlog is still being queued). Call inside a tokio runtime.
    pub fn start(inboxes: Vec<InboxConfig>, feeder: Sender<ReadyFile>, health: Health, shutdown: Shutdown) -> Result<Watch, Fatal> {
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel::<notify::Result<Event>>();
        let folders = Folders::start(&inboxes, ev_tx, health)?;
        let (scan_tx, scan_rx) = tokio::sync::mpsc::unbounded_channel::<Scanned>();
        let stage =
            Stage { inboxes: Arc::new(inboxes), folders, settler: Settler::default(), feeder, scan_tx, rescans: Rescans::default() };
        let task = tokio::spawn(stage.run(ev_rx, scan_rx, shutdown));
        Ok(Watch { task })
    }

    /// The watch task ended (only its shutdown should end it).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the watch task to end (it ends on shutdown).
    pub async fn join(self) {
        let _ = self.task.await;
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

/// Why a scan runs.
#[derive(Clone, Copy, PartialEq)]
enum Why {
    Startup,
    /// Every inbox, after lost events.
    Full,
    /// One folder or inbox that appeared or came back.
    Part,
}

/// A finished scan: of which inbox, why, and what it found.
type Scanned = (usize, Why, Scan);
type ScanSender = tokio::sync::mpsc::UnboundedSender<Scanned>;

/// Full rescans run one at a time: an overflow storm asks for hundreds, and one more after the
/// running one sees everything they would have.
#[derive(Default)]
struct Rescans {
    running: usize,
    again: bool,
}

/// The state of the watch task.
struct Stage {
    inboxes: Arc<Vec<InboxConfig>>,
    folders: Folders,
    settler: Settler,
    feeder: Sender<ReadyFile>,
    scan_tx: ScanSender,
    rescans: Rescans,
}

impl Stage {
    async fn run(
        mut self,
        mut events: tokio::sync::mpsc::UnboundedReceiver<notify::Result<Event>>,
        mut scans: tokio::sync::mpsc::UnboundedReceiver<Scanned>,
        shutdown: Shutdown,
    ) {
        for i in 0..self.inboxes.len() {
            self.spawn_scan(i, self.inboxes[i].path.clone(), Why::Startup);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut roots = tokio::time::interval(ROOT_CHECK);
        roots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                Some((i, why, found)) = scans.recv() => self.scanned(i, why, found),
                Some(ev) = events.recv() => match ev {
                    Ok(ev) => self.handle_event(ev),
                    Err(e) if is_watch_limit(&e) => {
                        // A new sub-folder could not be watched: find its files by scanning.
                        tracing::error!(error = %e, "inotify watch limit reached: raise fs.inotify.max_user_watches; rescanning");
                        self.rescan_all();
                    }
                    Err(e) => self.folders.notices.watcher_error(&e),
                },
                _ = tick.tick() => {
                    for p in self.settler.due() {
                        let _ = self.feeder.send(ReadyFile::new(p));
                    }
                }
                _ = roots.tick() => {
                    for i in self.folders.check_roots() {
                        self.spawn_scan(i, self.inboxes[i].path.clone(), Why::Part);
                    }
                }
            }
        }
    }

    fn scanned(&mut self, i: usize, why: Why, found: Scan) {
        if why == Why::Full {
            self.rescans.running -= 1;
            if self.rescans.running == 0 && std::mem::take(&mut self.rescans.again) {
                self.rescan_all();
            }
        }
        for p in &found.links {
            self.folders.notices.link(p);
        }
        for (p, why) in &found.unreadable {
            self.folders.notices.unreadable(p, why);
        }
        for p in found.ready {
            let _ = self.feeder.send(ReadyFile::new(p));
        }
        for p in found.unsettled {
            self.settler.observe(p, self.inboxes[i].settle);
        }
    }

    fn spawn_scan(&self, i: usize, dir: PathBuf, why: Why) {
        let (inboxes, tx) = (self.inboxes.clone(), self.scan_tx.clone());
        tokio::task::spawn_blocking(move || {
            let found = scan(&inboxes[i], &dir);
            if why == Why::Startup {
                tracing::info!(
                    inbox = %inboxes[i].path.display(),
                    backlog = found.ready.len() + found.unsettled.len(),
                    "start-up scan done"
                );
            }
            let _ = tx.send((i, why, found));
        });
    }

    fn rescan_all(&mut self) {
        if self.rescans.running > 0 {
            self.rescans.again = true;
            return;
        }
        self.rescans.running = self.inboxes.len();
        for (i, ib) in self.inboxes.iter().enumerate() {
            self.spawn_scan(i, ib.path.clone(), Why::Full);
        }
    }

    fn handle_event(&mut self, ev: Event) {
        if ev.need_rescan() {
            tracing::warn!("file watcher lost events; rescanning every inbox");
            self.rescan_all();
            return;
        }
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &ev.paths {
                    self.ready_now(p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) | EventKind::Create(CreateKind::Folder) => {
                for p in &ev.paths {
                    self.arrived(p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = &ev.paths[..] {
                    self.left(from);
                    self.arrived(to);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                for p in &ev.paths {
                    self.left(p);
                }
            }
            EventKind::Create(_) | EventKind::Modify(_) => {
                for p in &ev.paths {
                    self.changed(p);
                }
            }
            _ => {}
        }
    }

    /// Something was moved in or created at `path`: a folder to watch and scan, a link to report, or
    /// a file that may be ready.
    fn arrived(&mut self, path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => {
                if self.inbox_of(path).is_some() {
                    self.folders.notices.link(path);
                }
            }
            Ok(m) if m.is_dir() => {
                if self.folders.folder_appeared(path)
                    && let Some((i, _)) = self.inbox_of(path)
                {
                    self.spawn_scan(i, path.to_path_buf(), Why::Part);
                }
            }
            Ok(_) => self.ready_now(path),
            Err(_) => {} // gone already
        }
    }

    /// Something at `path` was deleted or moved away: what was pending under it is forgotten (a file
    /// already queued under it is dropped without a row when it cannot be read).
    fn left(&mut self, path: &Path) {
        self.settler.forget_under(path);
        if let Some(i) = self.folders.path_left(path) {
            self.spawn_scan(i, self.inboxes[i].path.clone(), Why::Part);
        }
    }

    /// A file was created or changed without being closed: wait for it to settle.
    fn changed(&mut self, path: &Path) {
        let Some((_, ib)) = self.inbox_of(path) else { return };
        if !ib.wants(path) {
            return;
        }
        let settle = ib.settle;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => self.folders.notices.link(path),
            _ => self.settler.observe(path.to_path_buf(), settle),
        }
    }

    /// A file was closed after writing or renamed in: ready unless its format says it is cut short.
    fn ready_now(&mut self, path: &Path) {
        let Some((_, ib)) = self.inbox_of(path) else { return };
        if !ib.wants(path) {
            return;
        }
        let settle = ib.settle;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(m) if m.is_symlink() => return self.folders.notices.link(path),
            Ok(m) => {
                tracing::warn!(path = %path.display(), kind = crate::beneath::kind_of(m.file_type()), "skipped: not a regular file");
                return;
            }
            Err(_) => return, // gone already
        }
        if looks_complete(path) == Some(false) {
            self.settler.observe(path.to_path_buf(), settle);
        } else {
            self.settler.forget(path);
            let _ = self.feeder.send(ReadyFile::new(path.to_path_buf()));
        }
    }

    fn inbox_of(&self, path: &Path) -> Option<(usize, &InboxConfig)> {
        self.inboxes.iter().enumerate().find(|(_, ib)| path.starts_with(&ib.path))
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
        let found = scan(ib, &ib.path);
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
