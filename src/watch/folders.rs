//! Which folders are watched, and watches that heal.
//!
//! labeld walks each inbox itself and puts one non-recursive inotify watch on every folder, so a
//! symbolic link is never followed (notify's recursive mode would walk into a linked folder) and a
//! sub-folder it cannot read is a warning, not a failed start. A `poll` inbox gets a recursive
//! PollWatcher that does not follow links. An inbox folder deleted or moved away is reported (and
//! /readyz is 503) until it is back; then it is watched again and the caller rescans it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::notices::Notices;
use super::scan::is_dot_name;
use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::health::Health;

pub(super) type EventSender = tokio::sync::mpsc::UnboundedSender<notify::Result<Event>>;

pub(super) struct Folders {
    inotify: RecommendedWatcher,
    events: EventSender,
    roots: Vec<Root>,
    health: Health,
    pub notices: Notices,
}

/// One inbox folder.
struct Root {
    inbox: InboxConfig,
    /// (dev, inode) of the folder being watched; `None` while it is missing.
    identity: Option<(u64, u64)>,
    via: Via,
}

enum Via {
    /// Every folder that has an inotify watch.
    Inotify(BTreeSet<PathBuf>),
    /// Kept only to stay alive: dropping it stops the polling.
    Poll { _watcher: PollWatcher },
    Nothing,
}

/// inotify ran out of watches (fs.inotify.max_user_watches): the error, and the folders watched so far.
type WatchLimit = (notify::Error, BTreeSet<PathBuf>);

impl Folders {
    /// Creates missing inboxes and watches them all; failing to watch one is fatal at start.
    pub fn start(inboxes: &[InboxConfig], events: EventSender, health: Health) -> Result<Folders, Fatal> {
        let handler = handler(&events);
        let config = notify::Config::default().with_follow_symlinks(false);
        let inotify = RecommendedWatcher::new(handler, config)
            .map_err(|e| Fatal::Other(format!("cannot start the file watcher: {e}")))?;
        let roots = inboxes.iter().map(|ib| Root { inbox: ib.clone(), identity: None, via: Via::Nothing }).collect();
        let mut folders = Folders { inotify, events, roots, health, notices: Notices::default() };
        for (i, ib) in inboxes.iter().enumerate() {
            let path = &ib.path;
            if !path.exists() {
                std::fs::create_dir_all(path)
                    .map_err(|e| Fatal::io(format!("cannot create inbox {}", path.display()), e))?;
                tracing::info!(inbox = %path.display(), "created missing inbox");
            }
            folders.attach(i).map_err(|e| Fatal::Other(format!("cannot watch inbox {}: {e}", path.display())))?;
        }
        Ok(folders)
    }

    /// Watches inbox `i` as it is on disk now.
    fn attach(&mut self, i: usize) -> Result<(), String> {
        let path = self.roots[i].inbox.path.clone();
        let meta = std::fs::metadata(&path).map_err(|e| e.to_string())?;
        if !meta.is_dir() {
            return Err("not a folder".into());
        }
        let mut poll = self.roots[i].inbox.poll;
        if !poll {
            match self.watch_tree(i, &path) {
                Ok(dirs) => self.roots[i].via = Via::Inotify(dirs),
                Err((e, dirs)) => {
                    for d in dirs {
                        let _ = self.inotify.unwatch(&d);
                    }
                    tracing::error!(
                        inbox = %path.display(),
                        error = %e,
                        "inotify watch limit reached: raise fs.inotify.max_user_watches \
                         (sysctl fs.inotify.max_user_watches=524288); polling this inbox instead"
                    );
                    poll = true;
                }
            }
        }
        if poll {
            let ib = &self.roots[i].inbox;
            let config = notify::Config::default().with_poll_interval(ib.poll_interval).with_follow_symlinks(false);
            let mut p = PollWatcher::new(handler(&self.events), config).map_err(|e| format!("cannot start polling: {e}"))?;
            p.watch(&path, mode(ib.recursive)).map_err(|e| format!("cannot poll: {e}"))?;
            self.roots[i].via = Via::Poll { _watcher: p };
        }
        self.roots[i].identity = Some((meta.dev(), meta.ino()));
        tracing::info!(
            inbox = %path.display(),
            recursive = self.roots[i].inbox.recursive,
            via = if poll { "polling" } else { "inotify" },
            "watching"
        );
        Ok(())
    }

    /// Puts a watch on `dir` and (in a recursive inbox) every folder under it that is not a link or
    /// a dot-folder. Returns the folders watched.
    fn watch_tree(&mut self, i: usize, dir: &Path) -> Result<BTreeSet<PathBuf>, WatchLimit> {
        let ib = &self.roots[i].inbox;
        let depth = if ib.recursive { usize::MAX } else { 0 };
        let walker = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .follow_root_links(dir == ib.path)
            .max_depth(depth)
            .into_iter()
            .filter_entry(|e| e.file_type().is_dir() && (e.depth() == 0 || !is_dot_name(e.file_name())));
        let mut watched = BTreeSet::new();
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e.path().map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
                    self.notices.unreadable(&path, &e.io_error().map_or_else(|| e.to_string(), |io| io.to_string()));
                    continue;
                }
            };
            match self.inotify.watch(entry.path(), RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(entry.into_path());
                }
                Err(e) if super::is_watch_limit(&e) => return Err((e, watched)),
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {} // gone meanwhile
                Err(e) => self.notices.unreadable(entry.path(), &e.to_string()),
            }
        }
        Ok(watched)
    }

    /// A folder appeared at `dir` (created, or moved in). Watches it if its inbox is recursive and
    /// watched by inotify; returns whether it should be scanned.
    pub fn folder_appeared(&mut self, dir: &Path) -> bool {
        let Some(i) = self.roots.iter().position(|r| dir.starts_with(&r.inbox.path)) else { return false };
        let ib = &self.roots[i].inbox;
        let hidden = dir.strip_prefix(&ib.path).is_ok_and(|rel| rel.components().any(|c| is_dot_name(c.as_os_str())));
        if !ib.recursive || hidden {
            return false;
        }
        if !matches!(self.roots[i].via, Via::Inotify(_)) {
            return true; // polled: the poller finds it, the scan catches up at once
        }
        match self.watch_tree(i, dir) {
            Ok(dirs) => self.add_watched(i, dirs),
            Err((e, dirs)) => {
                self.add_watched(i, dirs);
                tracing::error!(
                    dir = %dir.display(),
                    error = %e,
                    "inotify watch limit reached: raise fs.inotify.max_user_watches; files later written in this folder are not seen until a rescan"
                );
            }
        }
        true
    }

    fn add_watched(&mut self, i: usize, dirs: BTreeSet<PathBuf>) {
        if let Via::Inotify(set) = &mut self.roots[i].via {
            set.extend(dirs);
        }
    }

    /// Something at `path` left (deleted, or moved away): drops the watches of folders at and under
    /// it. If it was an inbox folder itself, checks it at once; returns that inbox if it is back
    /// (watched again, to be rescanned).
    pub fn path_left(&mut self, path: &Path) -> Option<usize> {
        for root in &mut self.roots {
            if let Via::Inotify(set) = &mut root.via {
                // Sorted paths: `path` and everything under it follow each other from `path` on.
                let gone: Vec<PathBuf> = set.range(path.to_path_buf()..).take_while(|d| d.starts_with(path)).cloned().collect();
                for d in gone {
                    let _ = self.inotify.unwatch(&d); // usually already dropped by the kernel
                    set.remove(&d);
                }
            }
        }
        let i = self.roots.iter().position(|r| r.inbox.path == path)?;
        self.check_root(i, true).then_some(i)
    }

    /// The periodic safety net: every inbox folder still the one watched? Returns the inboxes
    /// watched again (to be rescanned).
    pub fn check_roots(&mut self) -> Vec<usize> {
        (0..self.roots.len()).filter(|&i| self.check_root(i, false)).collect()
    }

    /// Notices an inbox folder that is gone or was replaced (`force`: an event said it left).
    fn check_root(&mut self, i: usize, force: bool) -> bool {
        let path = self.roots[i].inbox.path.clone();
        let now = std::fs::metadata(&path).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()));
        let was = self.roots[i].identity;
        match now {
            None if was.is_none() => false,
            None => {
                self.detach(i);
                self.health.set_inbox_missing(&path, true);
                tracing::error!(
                    inbox = %path.display(),
                    "inbox folder is gone (deleted or moved away): nothing is labelled there until it is back; recreate it"
                );
                false
            }
            Some(id) if was == Some(id) && !force => false,
            Some(_) => {
                self.detach(i);
                match self.attach(i) {
                    Ok(()) => {
                        self.health.set_inbox_missing(&path, false);
                        tracing::info!(inbox = %path.display(), "inbox folder is back: watching it again and rescanning");
                        true
                    }
                    Err(e) => {
                        self.health.set_inbox_missing(&path, true);
                        tracing::error!(inbox = %path.display(), error = %e, "cannot watch the inbox folder again; retrying in a few seconds");
                        false
                    }
                }
            }
        }
    }

    fn detach(&mut self, i: usize) {
        if let Via::Inotify(set) = std::mem::replace(&mut self.roots[i].via, Via::Nothing) {
            for d in set {
                let _ = self.inotify.unwatch(&d);
            }
        }
        self.roots[i].identity = None;
    }
}

impl Drop for Folders {
    /// The watch stops (shutdown, reload): its missing-inbox marks go with it.
    fn drop(&mut self) {
        for root in &self.roots {
            self.health.set_inbox_missing(&root.inbox.path, false);
        }
    }
}

fn handler(events: &EventSender) -> impl Fn(notify::Result<Event>) + Send + 'static {
    let events = events.clone();
    move |res| {
        let _ = events.send(res);
    }
}

fn mode(recursive: bool) -> RecursiveMode {
    if recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{OnDone, default_include, image_matcher};

    fn inbox(path: &Path) -> InboxConfig {
        InboxConfig {
            path: path.to_path_buf(),
            name: "inbox".into(),
            recursive: true,
            include: default_include(),
            matcher: image_matcher(&default_include()).unwrap(),
            settle: Duration::from_millis(200),
            quarantine: None,
            poll: false,
            poll_interval: Duration::from_secs(1),
            on_done: OnDone::Keep,
        }
    }

    fn watched(f: &Folders) -> Vec<PathBuf> {
        match &f.roots[0].via {
            Via::Inotify(set) => set.iter().cloned().collect(),
            _ => panic!("not watched by inotify"),
        }
    }

    #[test]
    fn links_and_dot_folders_are_not_watched_and_a_folder_that_left_takes_its_sub_folders_along() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("in");
        for d in ["a/b", "a-x", ".hidden", "../outside/deep"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let health = Health::new();
        let mut f = Folders::start(&[inbox(&root)], tx, health.clone()).unwrap();
        let rel = |f: &Folders| watched(f).iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect::<Vec<_>>();
        assert_eq!(rel(&f), ["", "a", "a/b", "a-x"]);
        assert_eq!(f.path_left(&root.join("a")), None);
        assert_eq!(rel(&f), ["", "a-x"]);

        // The inbox itself gone: missing (not ready) until it is back, then watched again.
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(f.path_left(&root), None);
        assert_eq!(health.missing_inboxes(), std::slice::from_ref(&root));
        assert!(f.check_roots().is_empty(), "still gone");
        std::fs::create_dir_all(root.join("new")).unwrap();
        assert_eq!(f.check_roots(), [0]);
        assert_eq!(rel(&f), ["", "new"]);
        assert!(health.missing_inboxes().is_empty());
    }
}
