//! The start-up scan and every rescan: images under an inbox (or a folder in it) that need labelling.
//! Never follows a symbolic link, not even when the folder scanned is one (only the configured inbox
//! root may be a link).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use crossbeam_channel::Sender;

use crate::config::InboxConfig;
use crate::labelled::is_labelled;
use crate::shutdown::Shutdown;

/// What a scan of an inbox found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Unlabelled images that are not changing.
    pub ready: Vec<PathBuf>,
    /// Unlabelled images modified within the settle interval: maybe still being written.
    pub unsettled: Vec<PathBuf>,
    /// Symbolic links met (never followed); the caller reports each once.
    pub links: Vec<PathBuf>,
    /// Folders that could not be read, with why; the caller reports each once.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Finds images under `inbox` (or `dir`, a folder inside it) that have no up-to-date sidecar. Stops
/// early (with what it found so far) once `stop` is triggered.
pub fn scan(inbox: &InboxConfig, dir: &Path, stop: &Shutdown) -> Scan {
    let mut found = Scan::default();
    let depth = if inbox.recursive { usize::MAX } else { 1 };
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .follow_root_links(dir == inbox.path)
        .max_depth(depth)
        .into_iter();
    // Skip dot-folders (a hidden quarantine, other tools' state).
    let walker = walker.filter_entry(|e| e.depth() == 0 || !(e.file_type().is_dir() && is_dot_name(e.file_name())));
    for entry in walker {
        if stop.is_triggered() {
            break;
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
                let why = e.io_error().map_or_else(|| e.to_string(), |io| io.to_string());
                found.unreadable.push((path, why));
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
        if entry.file_type().is_symlink() && entry.depth() > 0 {
            found.links.push(entry.into_path());
            continue;
        }
        if entry.file_type().is_dir() || !inbox.wants(entry.path()) {
            continue;
        }
        if !entry.file_type().is_file() {
            tracing::warn!(path = %entry.path().display(), kind = crate::beneath::kind_of(entry.file_type()), "skipped: not a regular file");
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

/// Dot-folders are not watched or scanned (a hidden quarantine, other tools' state).
pub(super) fn is_dot_name(name: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().first() == Some(&b'.')
}


/// Why a scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    Startup,
    /// Every inbox, after lost events.
    Full,
    /// One folder or inbox that appeared or came back.
    Part,
}

/// A finished scan: of which inbox, why, and what it found.
pub(super) struct Scanned {
    pub inbox: usize,
    pub why: Why,
    pub found: Scan,
}

/// One thread per inbox scanning the folders asked for, in order: a large inbox's scan does not hold
/// up another's, and a storm of new folders queues scans instead of starting a thread each.
pub(super) struct Scanners {
    requests: Vec<Sender<(PathBuf, Why)>>,
    threads: Vec<JoinHandle<()>>,
}

impl Scanners {
    /// Scanners for `inboxes`, sending what they find to `results`; a scan stops early once `stop` is
    /// triggered.
    pub fn start(inboxes: &Arc<Vec<InboxConfig>>, results: &Sender<Scanned>, stop: &Shutdown) -> std::io::Result<Scanners> {
        let mut scanners = Scanners { requests: Vec::new(), threads: Vec::new() };
        for i in 0..inboxes.len() {
            let (tx, rx) = crossbeam_channel::unbounded::<(PathBuf, Why)>();
            let (inboxes, results, stop) = (inboxes.clone(), results.clone(), stop.clone());
            let thread = std::thread::Builder::new().name("inbox-scan".into()).spawn(move || {
                let ib = &inboxes[i];
                for (dir, why) in rx {
                    let found = scan(ib, &dir, &stop);
                    if stop.is_triggered() {
                        return;
                    }
                    if why == Why::Startup {
                        tracing::info!(inbox = %ib.path.display(), backlog = found.ready.len() + found.unsettled.len(), "start-up scan done");
                    }
                    if results.send(Scanned { inbox: i, why, found }).is_err() {
                        return;
                    }
                }
            });
            match thread {
                Ok(t) => {
                    scanners.requests.push(tx);
                    scanners.threads.push(t);
                }
                Err(e) => {
                    scanners.finish();
                    return Err(e);
                }
            }
        }
        Ok(scanners)
    }

    /// Asks inbox `i`'s scanner to scan `dir` (the inbox folder or a folder in it).
    pub fn scan(&self, i: usize, dir: PathBuf, why: Why) {
        let _ = self.requests[i].send((dir, why));
    }

    /// Lets the scanners finish (a scan stops early once its stop is triggered) and waits for them.
    pub fn finish(self) {
        drop(self.requests);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
