//! `[[inbox]]`: the folders watched for images, what counts as one, and where an image goes once it
//! has its result. On reload: applies; the watches are set up again when `watch_settings` change,
//! `quarantine`/`on_done`/`done_dir` apply from the next result, `name` (MQTT topics) at restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::absolute;
use super::mqtt::topic_level_breaker;
use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbox {
    path: PathBuf,
    name: Option<String>,
    #[serde(default = "yes")]
    recursive: bool,
    #[serde(default = "default_include")]
    include: Vec<String>,
    #[serde(default = "default_settle_ms")]
    settle_ms: u64,
    quarantine: Option<PathBuf>,
    #[serde(default)]
    poll: bool,
    #[serde(default = "default_poll_interval_ms")]
    poll_interval_ms: u64,
    #[serde(default)]
    on_done: RawOnDone,
    done_dir: Option<PathBuf>,
}

/// What happens to an image once it is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnDone {
    #[default]
    Keep,
    Move,
    Delete,
}

fn yes() -> bool {
    true
}
pub fn default_include() -> Vec<String> {
    ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.webp", "*.tif", "*.tiff"].iter().map(|s| s.to_string()).collect()
}
fn default_settle_ms() -> u64 {
    500
}
fn default_poll_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Clone)]
pub struct InboxConfig {
    pub path: PathBuf,
    /// The inbox's name in MQTT topics and payloads (`{inbox}`): `name`, else the folder's name.
    pub name: String,
    pub recursive: bool,
    pub include: Vec<String>,
    /// `include` compiled.
    pub matcher: GlobSet,
    /// Files that arrive without a close-write or rename event are queued once their size and mtime
    /// have been unchanged this long.
    pub settle: Duration,
    /// Failed images move here (same relative path) with their error sidecar.
    pub quarantine: Option<PathBuf>,
    /// Poll instead of inotify (network filesystems), every `poll_interval`.
    pub poll: bool,
    pub poll_interval: Duration,
    /// What to do with an image once it has its result (errors stay, or go to quarantine).
    pub on_done: OnDone,
}

/// Equal when every key is (the compiled `matcher` follows from `include`).
impl PartialEq for InboxConfig {
    fn eq(&self, o: &InboxConfig) -> bool {
        self.watch_settings() == o.watch_settings() && (&self.name, &self.quarantine, &self.on_done) == (&o.name, &o.quarantine, &o.on_done)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OnDone {
    /// Image and sidecar stay in the inbox.
    Keep,
    /// Image and sidecar move to this folder (same relative path).
    Move(PathBuf),
    /// Image and sidecar are deleted; the CSV row is the record.
    Delete,
}

impl OnDone {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnDone::Keep => "keep",
            OnDone::Move(_) => "move",
            OnDone::Delete => "delete",
        }
    }
}

/// What the watch stage depends on: when these change on reload, the watches are set up again.
#[derive(Debug, PartialEq)]
pub struct WatchSettings<'a> {
    path: &'a Path,
    recursive: bool,
    include: &'a [String],
    settle: Duration,
    poll: bool,
    poll_interval: Duration,
}

impl InboxConfig {
    /// An image this inbox should label: a regular name matching `include`, not one of labeld's own
    /// files (sidecars, temp files) and not a dotfile.
    pub fn wants(&self, path: &Path) -> bool {
        // Nothing under a dot-folder of the inbox (e.g. a `.quarantine` inside it).
        let hidden_dir = path
            .parent()
            .and_then(|p| p.strip_prefix(&self.path).ok())
            .is_some_and(|rel| rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')));
        !hidden_dir && is_candidate_name(path, &self.matcher)
    }

    pub fn watch_settings(&self) -> WatchSettings<'_> {
        WatchSettings {
            path: &self.path,
            recursive: self.recursive,
            include: &self.include,
            settle: self.settle,
            poll: self.poll,
            poll_interval: self.poll_interval,
        }
    }

    /// Whether this inbox moves or deletes images once they have their result.
    pub fn sets_aside(&self) -> bool {
        self.on_done != OnDone::Keep || self.quarantine.is_some()
    }

    pub fn describe(&self) -> String {
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let include: Vec<String> = self.include.iter().map(|i| toml::Value::String(i.clone()).to_string()).collect();
        let mut s = format!(
            "[[inbox]]\npath = {}\nname = {}\nrecursive = {}\ninclude = [{}]\nsettle_ms = {}\npoll = {}\npoll_interval_ms = {}\n",
            q(&self.path),
            toml::Value::String(self.name.clone()),
            self.recursive,
            include.join(", "),
            self.settle.as_millis(),
            self.poll,
            self.poll_interval.as_millis()
        );
        if let Some(qd) = &self.quarantine {
            s += &format!("quarantine = {}\n", q(qd));
        }
        s += &format!("on_done = \"{}\"\n", self.on_done.as_str());
        if let OnDone::Move(d) = &self.on_done {
            s += &format!("done_dir = {}\n", q(d));
        }
        s
    }
}

/// Matches on the name's raw bytes, so a name that is not UTF-8 is judged by its extension too.
pub fn is_candidate_name(path: &Path, matcher: &GlobSet) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = path.file_name() else {
        return false;
    };
    let bytes = name.as_bytes();
    !bytes.starts_with(b".") && !bytes.ends_with(b".json") && matcher.is_match(Path::new(name))
}

/// Compiles `include` patterns; they match file names, case-insensitively.
pub fn image_matcher(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for pat in patterns {
        set.add(GlobBuilder::new(pat).case_insensitive(true).literal_separator(true).build()?);
    }
    set.build()
}

/// Every `[[inbox]]`, checked one by one and against each other (no overlaps, unique names).
pub(super) fn from_raw(file: &Path, base: &Path, raw: Vec<RawInbox>) -> Result<Vec<InboxConfig>, ConfigError> {
    let mut inboxes: Vec<InboxConfig> = Vec::new();
    for (i, ib) in raw.into_iter().enumerate() {
        let err = |k: &str, reason: String| ConfigError::new(file, format!("[[inbox]] #{} {k}", i + 1), reason);
        let path = absolute(base, &ib.path);
        if path.exists() && !path.is_dir() {
            return Err(err("path", format!("{} exists and is not a directory", path.display())));
        }
        if let Some(other) = inboxes.iter().find(|o| path.starts_with(&o.path) || o.path.starts_with(&path)) {
            return Err(err("path", format!("{} overlaps the inbox {}; list each folder once", path.display(), other.path.display())));
        }
        if ib.include.is_empty() {
            return Err(err("include", "needs at least one pattern, e.g. \"*.jpg\"".into()));
        }
        let matcher = image_matcher(&ib.include).map_err(|e| err("include", format!("bad pattern: {e}")))?;
        if ib.settle_ms > 600_000 {
            return Err(err("settle_ms", format!("must be at most 600000, got {}", ib.settle_ms)));
        }
        let quarantine = ib.quarantine.map(|q| absolute(base, &q));
        let on_done = match (ib.on_done, ib.done_dir) {
            (RawOnDone::Move, Some(d)) => OnDone::Move(absolute(base, &d)),
            (RawOnDone::Move, None) => {
                return Err(err("done_dir", "on_done = \"move\" needs done_dir, the folder labelled images move to".into()));
            }
            (_, Some(_)) => return Err(err("done_dir", "is only used with on_done = \"move\"".into())),
            (RawOnDone::Keep, None) => OnDone::Keep,
            (RawOnDone::Delete, None) => OnDone::Delete,
        };
        if !(50..=3_600_000).contains(&ib.poll_interval_ms) {
            return Err(err("poll_interval_ms", format!("must be 50..=3600000, got {}", ib.poll_interval_ms)));
        }
        let name = match ib.name {
            Some(n) => n,
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "inbox".into()),
        };
        if name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if let Some(bad) = topic_level_breaker(&name) {
            return Err(err("name", format!("\"{name}\" contains {bad}; it is one MQTT topic level")));
        }
        if let Some(other) = inboxes.iter().find(|o| o.name == name) {
            return Err(err("name", format!("\"{name}\" is also the name of the inbox {}; set name = \"...\" to tell them apart", other.path.display())));
        }
        inboxes.push(InboxConfig {
            path,
            name,
            recursive: ib.recursive,
            include: ib.include,
            matcher,
            settle: Duration::from_millis(ib.settle_ms),
            quarantine,
            poll: ib.poll,
            poll_interval: Duration::from_millis(ib.poll_interval_ms),
            on_done,
        });
    }
    Ok(inboxes)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;

    #[test]
    fn overlapping_inboxes_are_rejected() {
        let (_dir, file) = setup();
        let text = format!("{MINIMAL}[[inbox]]\npath = \"inbox/sub\"\n");
        let e = Config::parse(&file, &text).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #2 path");
    }

    #[test]
    fn include_is_case_insensitive_and_skips_own_files() {
        let (_dir, file) = setup();
        let c = Config::parse(&file, MINIMAL).unwrap();
        let ib = &c.inboxes[0];
        assert!(ib.wants(Path::new("/x/CAT.JPG")));
        assert!(ib.wants(Path::new("/x/a.webp")));
        assert!(!ib.wants(Path::new("/x/a.jpg.json")));
        assert!(!ib.wants(Path::new("/x/.a.jpg")));
        assert!(!ib.wants(Path::new("/x/notes.txt")));
        assert!(ib.wants(&ib.path.join("cam1/a.jpg")));
        use std::os::unix::ffi::OsStrExt;
        assert!(ib.wants(Path::new(std::ffi::OsStr::from_bytes(b"/x/caf\xe9.JPG"))), "a Latin-1 name is an image too");
        assert!(!ib.wants(Path::new(std::ffi::OsStr::from_bytes(b"/x/caf\xe9.txt"))));
        assert!(!ib.wants(&ib.path.join(".quarantine/cam1/a.jpg")));
    }

    #[test]
    fn quarantine_must_be_outside_the_inbox_or_hidden() {
        let (_dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}quarantine = \"inbox/bad\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 quarantine");
        assert!(Config::parse(&file, &format!("{MINIMAL}quarantine = \"inbox/.quarantine\"\n")).is_ok());
        assert!(Config::parse(&file, &format!("{MINIMAL}quarantine = \"rejects\"\n")).is_ok());
    }

    #[test]
    fn on_done_move_needs_a_done_dir_outside_the_inbox() {
        let (dir, file) = setup();
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 done_dir");
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"inbox/done\"\n")).unwrap_err();
        assert_eq!(e.key, "[[inbox]] #1 done_dir");
        let e = Config::parse(&file, &format!("{MINIMAL}done_dir = \"archive\"\n")).unwrap_err();
        assert!(e.reason.contains("only used with"), "{e}");
        let c = Config::parse(&file, &format!("{MINIMAL}on_done = \"move\"\ndone_dir = \"archive\"\n")).unwrap();
        assert_eq!(c.inboxes[0].on_done, OnDone::Move(dir.path().join("archive")));
        let c = Config::parse(&file, &format!("{MINIMAL}on_done = \"delete\"\n")).unwrap();
        assert_eq!(c.inboxes[0].on_done, OnDone::Delete);
        let e = Config::parse(&file, &format!("{MINIMAL}on_done = \"shred\"\n")).unwrap_err();
        assert!(e.reason.contains("unknown variant"), "{e}");
    }

    #[test]
    fn only_watch_settings_restart_the_watches() {
        let (_dir, file) = setup();
        let a = Config::parse(&file, MINIMAL).unwrap();
        let b = Config::parse(&file, &format!("{MINIMAL}quarantine = \"rejects\"\n")).unwrap();
        let c = Config::parse(&file, &format!("{MINIMAL}settle_ms = 900\n")).unwrap();
        assert_ne!(a.inboxes, b.inboxes);
        assert_eq!(a.inboxes[0].watch_settings(), b.inboxes[0].watch_settings());
        assert_ne!(a.inboxes[0].watch_settings(), c.inboxes[0].watch_settings());
    }
}
