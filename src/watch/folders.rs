//! Which folders are watched, and watches that heal.
//!
//! labeld walks each inbox itself and puts one non-recursive inotify watch on every folder, so a
//! symbolic link is never followed (notify's recursive mode would walk into a linked folder) and a
//! sub-folder it cannot read is a warning, not a failed start. A `poll` inbox gets a recursive
//! PollWatcher that does not follow links.
//!
//! The configured inbox path may itself be a link (invariant I6 in docs/design.md): it is resolved when
//! the inbox is attached and the folder it leads to is watched at its real path. Events name real
//! paths; [`Folders::configured`] spells them back under the configured path, as the start-up scan
//! and the sink do. The folders the inbox path is resolved through (its ancestors, and a link's
//! target's) are watched too, by a second watcher: a folder deleted, created or renamed there, or the
//! link re-pointed, is an event, and the inbox is checked at once. An inbox folder that went away is
//! reported (and /readyz is 503) until it is back; then it is watched again and the caller rescans it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::notices::Notices;
use super::scan::is_dot_name;
use crate::config::InboxConfig;
use crate::error::Fatal;
use crate::health::Health;

pub(super) type EventSender = crossbeam_channel::Sender<notify::Result<Event>>;

/// Links followed at most when resolving an inbox path (the kernel's own limit is 40).
const MAX_HOPS: usize = 8;

pub(super) struct Folders {
    inotify: RecommendedWatcher,
    events: EventSender,
    /// Watches the folders each inbox path is resolved through; `None` if it could not start (then only
    /// the inbox folders' own delete and move events, and mount changes, are noticed).
    guard: Option<RecommendedWatcher>,
    guarded: BTreeSet<PathBuf>,
    roots: Vec<Root>,
    health: Health,
    pub notices: Notices,
}

/// One inbox folder.
struct Root {
    inbox: InboxConfig,
    /// The folder the configured path leads to; `None` while it is missing.
    at: Option<Resolved>,
    via: Via,
    /// The configured path and, while it is a link, the paths it is resolved through (as of the last look).
    chain: Vec<PathBuf>,
}

/// Where an inbox path led when it was attached.
#[derive(Debug, Clone, PartialEq)]
struct Resolved {
    /// Links resolved: the path inotify watches and events name.
    real: PathBuf,
    dev: u64,
    inode: u64,
}

enum Via {
    /// Every folder (real path) that has an inotify watch.
    Inotify(BTreeSet<PathBuf>),
    /// Kept only to stay alive: dropping it stops the polling.
    Poll { _watcher: PollWatcher },
    Nothing,
}

/// inotify ran out of watches (fs.inotify.max_user_watches): the error, and the folders watched so far.
type WatchLimit = (notify::Error, BTreeSet<PathBuf>);

impl Folders {
    /// Creates missing inboxes and watches them all; failing to watch one is fatal at start. Events of
    /// the inbox folders go to `events`, those of the folders the inbox paths are resolved through to
    /// `guard_events`.
    pub fn start(inboxes: &[InboxConfig], events: EventSender, guard_events: EventSender, health: Health) -> Result<Folders, Fatal> {
        let config = notify::Config::default().with_follow_symlinks(false);
        let inotify = RecommendedWatcher::new(handler(&events), config)
            .map_err(|e| Fatal::Other(format!("cannot start the file watcher: {e}")))?;
        let guard = match RecommendedWatcher::new(handler(&guard_events), config) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the folders above the inboxes: an inbox folder deleted and recreated, or a re-pointed inbox link, is noticed only at a reload");
                None
            }
        };
        let roots = inboxes.iter().map(|ib| Root { inbox: ib.clone(), at: None, via: Via::Nothing, chain: Vec::new() }).collect();
        let mut folders = Folders { inotify, events, guard, guarded: BTreeSet::new(), roots, health, notices: Notices::default() };
        for (i, ib) in inboxes.iter().enumerate() {
            let path = &ib.path;
            if !path.exists() {
                std::fs::create_dir_all(path)
                    .map_err(|e| Fatal::io(format!("cannot create inbox {}", path.display()), e))?;
                tracing::info!(inbox = %path.display(), "created missing inbox");
            }
            folders.attach(i).map_err(|e| Fatal::Other(format!("cannot watch inbox {}: {e}", path.display())))?;
        }
        folders.guard_paths();
        Ok(folders)
    }

    /// Watches inbox `i` as it is on disk now, at the real path its configured path leads to.
    fn attach(&mut self, i: usize) -> Result<(), String> {
        let path = self.roots[i].inbox.path.clone();
        let real = std::fs::canonicalize(&path).map_err(|e| e.to_string())?;
        let meta = std::fs::symlink_metadata(&real).map_err(|e| e.to_string())?;
        if !meta.is_dir() {
            return Err("not a folder".into());
        }
        let mut poll = self.roots[i].inbox.poll;
        if !poll {
            match self.watch_tree(i, &real) {
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
            p.watch(&real, mode(ib.recursive)).map_err(|e| format!("cannot poll: {e}"))?;
            self.roots[i].via = Via::Poll { _watcher: p };
        }
        let recursive = self.roots[i].inbox.recursive;
        let via = if poll { "polling" } else { "inotify" };
        if real == path {
            tracing::info!(inbox = %path.display(), recursive, via, "watching");
        } else {
            tracing::info!(inbox = %path.display(), folder = %real.display(), recursive, via, "watching");
        }
        self.roots[i].at = Some(Resolved { real, dev: meta.dev(), inode: meta.ino() });
        Ok(())
    }

    /// Puts a watch on `dir` (a real path) and (in a recursive inbox) every folder under it that is not a
    /// link or a dot-folder. Returns the folders watched.
    fn watch_tree(&mut self, i: usize, dir: &Path) -> Result<BTreeSet<PathBuf>, WatchLimit> {
        let ib = &self.roots[i].inbox;
        let depth = if ib.recursive { usize::MAX } else { 0 };
        // Not even `dir` is followed if it is a link: the inbox root is watched at its real path.
        let walker = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .follow_root_links(false)
            .max_depth(depth)
            .into_iter()
            .filter_entry(|e| e.file_type().is_dir() && (e.depth() == 0 || !is_dot_name(e.file_name())));
        let mut watched = BTreeSet::new();
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e.path().map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
                    let shown = self.configured(&path).map_or(path, |(_, p)| p);
                    self.notices.unreadable(&shown, &e.io_error().map_or_else(|| e.to_string(), |io| io.to_string()));
                    continue;
                }
            };
            match self.inotify.watch(entry.path(), RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(entry.into_path());
                }
                Err(e) if super::is_watch_limit(&e) => return Err((e, watched)),
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {} // gone meanwhile
                Err(e) => {
                    let shown = self.configured(entry.path()).map_or_else(|| entry.path().to_path_buf(), |(_, p)| p);
                    self.notices.unreadable(&shown, &e.to_string());
                }
            }
        }
        Ok(watched)
    }

    /// The inbox a real path (as events name it) lies in, and the path spelled under the inbox's
    /// configured path. `None`: in no attached inbox (an event from a folder no longer watched).
    pub fn configured(&self, real: &Path) -> Option<(usize, PathBuf)> {
        self.roots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let at = r.at.as_ref()?;
                let rel = real.strip_prefix(&at.real).ok()?;
                Some((at.real.as_os_str().len(), i, if rel.as_os_str().is_empty() { r.inbox.path.clone() } else { r.inbox.path.join(rel) }))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, i, p)| (i, p))
    }

    /// `path` (spelled under inbox `i`'s configured path) at the real path it is watched at.
    fn real(&self, i: usize, path: &Path) -> Option<PathBuf> {
        let r = &self.roots[i];
        let rel = path.strip_prefix(&r.inbox.path).ok()?;
        let at = r.at.as_ref()?;
        Some(if rel.as_os_str().is_empty() { at.real.clone() } else { at.real.join(rel) })
    }

    /// A folder appeared at `dir` (created, or moved in; spelled under its inbox's configured path).
    /// Watches it if its inbox is recursive and watched by inotify; returns whether it should be scanned.
    pub fn folder_appeared(&mut self, i: usize, dir: &Path) -> bool {
        let ib = &self.roots[i].inbox;
        let hidden = dir.strip_prefix(&ib.path).is_ok_and(|rel| rel.components().any(|c| is_dot_name(c.as_os_str())));
        if !ib.recursive || hidden {
            return false;
        }
        if !matches!(self.roots[i].via, Via::Inotify(_)) {
            return true; // polled: the poller finds it, the scan catches up at once
        }
        let Some(real) = self.real(i, dir) else { return false };
        match self.watch_tree(i, &real) {
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

    /// Something at `path` (spelled under inbox `i`'s configured path) left: deleted, or moved away.
    /// Drops the watches of folders at and under it. If it was the inbox folder itself, checks it at
    /// once; returns whether it is back (watched again, to be rescanned).
    pub fn path_left(&mut self, i: usize, path: &Path) -> bool {
        if let Some(real) = self.real(i, path)
            && let Via::Inotify(set) = &mut self.roots[i].via
        {
            // Sorted paths: `real` and everything under it follow each other from `real` on.
            let gone: Vec<PathBuf> = set.range(real.clone()..).take_while(|d| d.starts_with(&real)).cloned().collect();
            for d in gone {
                let _ = self.inotify.unwatch(&d); // usually already dropped by the kernel
                set.remove(&d);
            }
        }
        if path != self.roots[i].inbox.path {
            return false;
        }
        let back = self.check_root(i, true);
        self.guard_paths();
        back
    }

    /// Something changed in a folder an inbox path is resolved through (`ev`, from the guard watcher),
    /// or in the mount table (`None`). Checks the inboxes it may concern; returns those watched again
    /// (to be rescanned).
    pub fn resolution_changed(&mut self, ev: Option<&Event>) -> Vec<usize> {
        let concerned: Vec<usize> = (0..self.roots.len())
            .filter(|&i| match ev {
                None => true,
                Some(ev) if ev.need_rescan() => true,
                Some(ev) => ev.paths.iter().any(|p| self.roots[i].chain.iter().any(|c| c.starts_with(p))),
            })
            .collect();
        let back = concerned.into_iter().filter(|&i| self.check_root(i, false)).collect();
        self.guard_paths();
        back
    }

    /// Whether inbox `i`'s path still leads to the folder watched; if not, stops watching that one and
    /// watches what it leads to now (`force`: an event said the folder left). Returns whether the
    /// inbox is watched again (to be rescanned).
    fn check_root(&mut self, i: usize, force: bool) -> bool {
        let path = self.roots[i].inbox.path.clone();
        let now = std::fs::canonicalize(&path).ok().and_then(|real| {
            let m = std::fs::symlink_metadata(&real).ok().filter(|m| m.is_dir())?;
            Some(Resolved { real, dev: m.dev(), inode: m.ino() })
        });
        let was = self.roots[i].at.clone();
        let back = match now {
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
            Some(now) if was.as_ref() == Some(&now) && !force => false,
            Some(now) => {
                let moved = was.as_ref().is_some_and(|w| w.real != now.real);
                self.detach(i);
                match self.attach(i) {
                    Ok(()) => {
                        self.health.set_inbox_missing(&path, false);
                        if moved {
                            tracing::info!(inbox = %path.display(), folder = %now.real.display(), "inbox path leads to another folder now: watching it and scanning it");
                        } else {
                            tracing::info!(inbox = %path.display(), "inbox folder is back: watching it again and rescanning");
                        }
                        true
                    }
                    Err(e) => {
                        self.health.set_inbox_missing(&path, true);
                        tracing::error!(inbox = %path.display(), error = %e, "cannot watch the inbox folder again; tried again at its next change");
                        false
                    }
                }
            }
        };
        back
    }

    fn detach(&mut self, i: usize) {
        if let Via::Inotify(set) = std::mem::replace(&mut self.roots[i].via, Via::Nothing) {
            for d in set {
                let _ = self.inotify.unwatch(&d);
            }
        }
        self.roots[i].at = None;
    }

    /// Watches the folders every inbox path is resolved through, as they are now.
    fn guard_paths(&mut self) {
        for root in &mut self.roots {
            root.chain = resolution_chain(&root.inbox.path);
        }
        let Some(guard) = self.guard.as_mut() else { return };
        let mut want = BTreeSet::new();
        for p in self.roots.iter().flat_map(|r| &r.chain) {
            want.extend(p.ancestors().skip(1).filter(|a| a.is_dir()).map(Path::to_path_buf));
        }
        for gone in self.guarded.difference(&want) {
            let _ = guard.unwatch(gone); // already dropped when the folder was deleted
        }
        self.guarded.retain(|p| want.contains(p));
        for p in want {
            if !self.guarded.contains(&p) {
                match guard.watch(&p, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.guarded.insert(p);
                    }
                    Err(e) => tracing::debug!(folder = %p.display(), error = %e, "cannot watch a folder an inbox path goes through"),
                }
            }
        }
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

/// The paths `path` is resolved through: itself and, while it is a link, what it points to (hop by
/// hop). A change at any of them, or at one of their ancestors, may change where `path` leads.
fn resolution_chain(path: &Path) -> Vec<PathBuf> {
    let mut chain = vec![path.to_path_buf()];
    let mut at = path.to_path_buf();
    while chain.len() <= MAX_HOPS {
        let Ok(target) = std::fs::read_link(&at) else { break };
        let joined = at.parent().unwrap_or(Path::new("/")).join(target);
        at = lexical(&joined);
        if chain.contains(&at) {
            break;
        }
        chain.push(at.clone());
    }
    chain
}

/// `p` with `.` and `..` taken out by their names alone.
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
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

    fn start(root: &Path, health: &Health) -> (Folders, crossbeam_channel::Receiver<notify::Result<Event>>) {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let (guard_tx, guard_rx) = crossbeam_channel::unbounded();
        (Folders::start(&[inbox(root)], tx, guard_tx, health.clone()).unwrap(), guard_rx)
    }

    /// Hands the guard watcher's events to the folders until one has the inbox watched again.
    fn next_change(f: &mut Folders, guard: &crossbeam_channel::Receiver<notify::Result<Event>>) -> Vec<usize> {
        loop {
            let ev = guard.recv_timeout(Duration::from_secs(10)).expect("an event from the folders above the inbox").unwrap();
            let back = f.resolution_changed(Some(&ev));
            if !back.is_empty() {
                return back;
            }
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
        let health = Health::new();
        let (mut f, guard) = start(&root, &health);
        let real = std::fs::canonicalize(&root).unwrap();
        let rel = |f: &Folders| watched(f).iter().map(|p| p.strip_prefix(&real).unwrap().display().to_string()).collect::<Vec<_>>();
        assert_eq!(rel(&f), ["", "a", "a/b", "a-x"]);
        assert!(!f.path_left(0, &root.join("a")));
        assert_eq!(rel(&f), ["", "a-x"]);

        // The inbox itself gone: missing (not ready) until it is back, then watched again.
        std::fs::remove_dir_all(&root).unwrap();
        assert!(!f.path_left(0, &root));
        assert_eq!(health.missing_inboxes(), std::slice::from_ref(&root));
        // Recreated: the watch on the folder above says so.
        std::fs::create_dir_all(root.join("new")).unwrap();
        assert_eq!(next_change(&mut f, &guard), [0]);
        assert_eq!(rel(&f), ["", "new"]);
        assert!(health.missing_inboxes().is_empty());
    }

    #[test]
    fn an_inbox_path_that_is_a_link_is_watched_at_its_target_and_follows_it_when_re_pointed() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let (cam1, cam2, link) = (base.join("cam1"), base.join("cam2"), base.join("data/inbox"));
        std::fs::create_dir_all(cam1.join("sub")).unwrap();
        std::fs::create_dir_all(&cam2).unwrap();
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&cam1, &link).unwrap();
        let health = Health::new();
        let (mut f, guard) = start(&link, &health);
        assert_eq!(watched(&f), [cam1.clone(), cam1.join("sub")]);
        assert_eq!(f.configured(&cam1.join("sub/a.jpg")), Some((0, link.join("sub/a.jpg"))));
        assert_eq!(f.configured(&cam1), Some((0, link.clone())));
        assert_eq!(f.configured(&cam2.join("a.jpg")), None);

        // `ln -sfn cam2 inbox`: a new link renamed over the old one.
        let staged = base.join("data/.inbox.new");
        std::os::unix::fs::symlink(&cam2, &staged).unwrap();
        std::fs::rename(&staged, &link).unwrap();
        assert_eq!(next_change(&mut f, &guard), [0]);
        assert_eq!(watched(&f), [cam2.clone()]);
        assert_eq!(f.configured(&cam2.join("a.jpg")), Some((0, link.join("a.jpg"))));
        assert_eq!(f.configured(&cam1.join("a.jpg")), None, "the old folder's late events are not ours");

        // The target deleted: missing; created again: watched again (its parent is watched too).
        std::fs::remove_dir(&cam2).unwrap();
        assert!(!f.path_left(0, &link));
        assert_eq!(health.missing_inboxes(), std::slice::from_ref(&link));
        std::fs::create_dir(&cam2).unwrap();
        assert_eq!(next_change(&mut f, &guard), [0]);
        assert!(health.missing_inboxes().is_empty());
    }
}
