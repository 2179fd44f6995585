//! The watch thread: blocks on inotify events, on events from the folders above the inboxes, on mount
//! table changes, on finished scans, on shutdown, and on the settler's next deadline; nothing else
//! wakes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use notify::Event;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};

use super::folders::Folders;
use super::look::{self, looks_complete};
use super::mounts::MountChanges;
use super::scan::{Scanned, Scanners, Why};
use super::settle::Settler;
use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::health::Health;
use crate::queue::ReadyFile;
use crate::shutdown::Shutdown;

type FsEvents = Receiver<notify::Result<Event>>;

/// Full rescans run one at a time: an overflow storm asks for hundreds, and one more after the
/// running one sees everything they would have.
#[derive(Default)]
struct Rescans {
    running: usize,
    again: bool,
}

/// The state of the watch thread.
pub(super) struct Stage {
    inboxes: Arc<Vec<InboxConfig>>,
    folders: Folders,
    settler: Settler,
    feeder: Sender<ReadyFile>,
    scanners: Scanners,
    rescans: Rescans,
    events: FsEvents,
    guard_events: FsEvents,
    scans: Receiver<Scanned>,
    mount_changes: Receiver<()>,
    _mounts: Option<MountChanges>,
}

impl Stage {
    /// Watches every inbox (creating missing ones) and starts the scanners.
    pub fn start(inboxes: Arc<Vec<InboxConfig>>, feeder: Sender<ReadyFile>, health: Health, stop: &Shutdown) -> Result<Stage, Fatal> {
        let (ev_tx, events) = crossbeam_channel::unbounded();
        let (guard_tx, guard_events) = crossbeam_channel::unbounded();
        let folders = Folders::start(&inboxes, ev_tx, guard_tx, health)?;
        let (mount_tx, mount_changes) = crossbeam_channel::unbounded();
        let mounts = MountChanges::start(mount_tx);
        let (scan_tx, scans) = crossbeam_channel::unbounded();
        let scanners = Scanners::start(&inboxes, &scan_tx, stop).map_err(|e| Fatal::io("cannot start the inbox scanner threads", e))?;
        Ok(Stage {
            inboxes,
            folders,
            settler: Settler::default(),
            feeder,
            scanners,
            rescans: Rescans::default(),
            events,
            guard_events,
            scans,
            mount_changes,
            _mounts: mounts,
        })
    }

    /// Queues the backlog, then handles events until `shutdown`.
    pub fn run(mut self, shutdown: &Shutdown) {
        for i in 0..self.inboxes.len() {
            self.scanners.scan(i, self.inboxes[i].path.clone(), Why::Startup);
        }
        let (mut events, mut guard_events, mut mount_changes, mut scans) =
            (self.events.clone(), self.guard_events.clone(), self.mount_changes.clone(), self.scans.clone());
        loop {
            // The only deadline: when the settler has a file to look at again.
            let settle_due = self.settler.next_check().map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            crossbeam_channel::select! {
                recv(shutdown.closed()) -> _ => break,
                recv(scans) -> s => match s {
                    Ok(s) => self.scanned(s),
                    Err(_) => scans = crossbeam_channel::never(),
                },
                recv(events) -> ev => match ev {
                    Ok(Ok(ev)) => self.handle_event(ev),
                    Ok(Err(e)) if super::is_watch_limit(&e) => {
                        // A new sub-folder could not be watched: find its files by scanning.
                        tracing::error!(error = %e, "inotify watch limit reached: raise fs.inotify.max_user_watches; rescanning");
                        self.rescan_all();
                    }
                    Ok(Err(e)) => self.folders.notices.watcher_error(&e),
                    Err(_) => events = crossbeam_channel::never(),
                },
                recv(guard_events) -> ev => match ev {
                    Ok(Ok(ev)) => self.resolution_changed(Some(&ev)),
                    Ok(Err(e)) => tracing::debug!(error = %e, "error watching the folders above the inboxes"),
                    Err(_) => guard_events = crossbeam_channel::never(),
                },
                recv(mount_changes) -> m => match m {
                    Ok(()) => self.resolution_changed(None),
                    Err(_) => mount_changes = crossbeam_channel::never(),
                },
                recv(settle_due) -> _ => {
                    for p in look::settled(&mut self.settler, Instant::now()) {
                        let _ = self.feeder.send(ReadyFile::new(p));
                    }
                }
            }
        }
        let Stage { scanners, folders, _mounts, .. } = self;
        drop((folders, _mounts));
        scanners.finish();
    }

    fn scanned(&mut self, s: Scanned) {
        if s.why == Why::Full {
            self.rescans.running -= 1;
            if self.rescans.running == 0 && std::mem::take(&mut self.rescans.again) {
                self.rescan_all();
            }
        }
        let found = s.found;
        for p in &found.links {
            self.folders.notices.link(p);
        }
        for (p, why) in &found.unreadable {
            self.folders.notices.unreadable(p, why);
        }
        for p in found.ready {
            let _ = self.feeder.send(ReadyFile::new(p));
        }
        let now = Instant::now();
        for p in found.unsettled {
            look::observe(&mut self.settler, p, self.inboxes[s.inbox].settle, now);
        }
    }

    fn rescan_all(&mut self) {
        if self.rescans.running > 0 {
            self.rescans.again = true;
            return;
        }
        self.rescans.running = self.inboxes.len();
        for (i, ib) in self.inboxes.iter().enumerate() {
            self.scanners.scan(i, ib.path.clone(), Why::Full);
        }
    }

    /// A change in a folder an inbox path is resolved through, or in the mount table: inboxes that
    /// lead to another folder now, or are back, are scanned.
    fn resolution_changed(&mut self, ev: Option<&Event>) {
        for i in self.folders.resolution_changed(ev) {
            self.scanners.scan(i, self.inboxes[i].path.clone(), Why::Part);
        }
    }

    fn handle_event(&mut self, ev: Event) {
        if ev.need_rescan() {
            tracing::warn!("file watcher lost events; rescanning every inbox");
            self.rescan_all();
            return;
        }
        // Events name real paths; from here on, paths are spelled under the inbox's configured path.
        let paths: Vec<Option<(usize, PathBuf)>> = ev.paths.iter().map(|p| self.folders.configured(p)).collect();
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for (i, p) in paths.into_iter().flatten() {
                    self.ready_now(i, &p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) | EventKind::Create(CreateKind::Folder) => {
                for (i, p) in paths.into_iter().flatten() {
                    self.arrived(i, &p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = &paths[..] {
                    if let Some((i, from)) = from {
                        self.left(*i, from);
                    }
                    if let Some((i, to)) = to {
                        self.arrived(*i, to);
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                for (i, p) in paths.into_iter().flatten() {
                    self.left(i, &p);
                }
            }
            EventKind::Create(_) | EventKind::Modify(_) => {
                for (i, p) in paths.into_iter().flatten() {
                    self.changed(i, p);
                }
            }
            _ => {}
        }
    }

    /// Something was moved in or created at `path` (in inbox `i`): a folder to watch and scan, a link
    /// to report, or a file that may be ready.
    fn arrived(&mut self, i: usize, path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => self.folders.notices.link(path),
            Ok(m) if m.is_dir() => {
                if self.folders.folder_appeared(i, path) {
                    self.scanners.scan(i, path.to_path_buf(), Why::Part);
                }
            }
            Ok(_) => self.ready_now(i, path),
            Err(_) => {} // gone already
        }
    }

    /// Something at `path` (in inbox `i`) was deleted or moved away: what was pending under it is
    /// forgotten (a file already queued under it is dropped without a row when it cannot be read).
    fn left(&mut self, i: usize, path: &Path) {
        self.settler.forget_under(path);
        if self.folders.path_left(i, path) {
            self.scanners.scan(i, self.inboxes[i].path.clone(), Why::Part);
        }
    }

    /// A file was created or changed without being closed: wait for it to settle.
    fn changed(&mut self, i: usize, path: PathBuf) {
        let ib = &self.inboxes[i];
        if !ib.wants(&path) {
            return;
        }
        let settle = ib.settle;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_symlink() => self.folders.notices.link(&path),
            _ => look::observe(&mut self.settler, path, settle, Instant::now()),
        }
    }

    /// A file was closed after writing or renamed in: ready unless its format says it is cut short.
    fn ready_now(&mut self, i: usize, path: &Path) {
        let ib = &self.inboxes[i];
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
            look::observe(&mut self.settler, path.to_path_buf(), settle, Instant::now());
        } else {
            self.settler.forget(path);
            let _ = self.feeder.send(ReadyFile::new(path.to_path_buf()));
        }
    }
}
