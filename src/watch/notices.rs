//! Things the watcher tells the operator once per path, however often rescans and events meet them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Default)]
pub(super) struct Notices {
    told: HashSet<(Topic, PathBuf)>,
}

#[derive(PartialEq, Eq, Hash)]
enum Topic {
    Link,
    Unreadable,
    WatcherError(String),
}

impl Notices {
    fn first(&mut self, topic: Topic, path: &Path) -> bool {
        self.told.insert((topic, path.to_path_buf()))
    }

    /// A symbolic link inside an inbox: never followed, so nothing behind it is labelled or touched.
    pub fn link(&mut self, path: &Path) {
        if self.first(Topic::Link, path) {
            tracing::warn!(path = %path.display(), "symbolic link not followed: it and what it points to are ignored");
        }
    }

    /// A folder labeld cannot list or watch: the rest of the inbox goes on.
    pub fn unreadable(&mut self, path: &Path, why: &str) {
        if self.first(Topic::Unreadable, path) {
            tracing::warn!(
                path = %path.display(),
                error = why,
                "cannot read or watch this folder: images in it are not labelled (make it readable by labeld's user, or ignore this for lost+found)"
            );
        }
    }

    /// An error the file watcher reports (a polled folder that cannot be read repeats every poll).
    pub fn watcher_error(&mut self, e: &notify::Error) {
        let path = e.paths.first().cloned().unwrap_or_default();
        if self.first(Topic::WatcherError(e.to_string()), &path) {
            tracing::error!(error = %e, "file watcher error");
        }
    }
}
