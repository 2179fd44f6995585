//! Retention (`[retention]`): a thread that, every `interval_s`, removes labelled images (with their
//! sidecars) from each inbox's `done_dir` and `quarantine`: those older than `max_age_days`, and, while
//! the file system holding a folder has less free space than `min_free_mb` / `min_free_percent`, the
//! oldest first. "Old" is the image's modification time (a move keeps it; the camera's write time).
//!
//! Only those folders are swept, never an inbox (a folder that is an inbox root is not entered), and
//! only names an inbox would label (`include`) and their sidecars are removed: a CSV log or notes kept
//! in the folder stay. Nothing is followed through a link: folders are opened `O_NOFOLLOW` relative to
//! their parent while walking, and each removal resolves its path again beneath the folder root with
//! `beneath` (RESOLVE_BENEATH | NO_SYMLINKS), so a folder swapped for a link mid-sweep cannot make labeld
//! delete outside. Links themselves are left alone. File systems mounted below a folder are not entered.
//! The choice of what to remove is a pure function (`choose`); the I/O around it is thin.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use globset::GlobSet;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::beneath::Beneath;
use crate::config::{Config, OnDone, RetentionConfig, is_candidate_name};
use crate::health::Lifeline;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::sidecar::sidecar_path;

/// Why a file was chosen for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Age,
    Space,
}

/// One removable image (with its sidecar, if any), as `choose` sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aged {
    pub mtime: SystemTime,
    /// Space its removal gives back (allocated blocks of image and sidecar).
    pub allocated: u64,
}

/// The file system holding a folder: bytes available to labeld, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    pub total: u64,
}

impl Space {
    fn of(fd: &OwnedFd) -> io::Result<Space> {
        let v = rustix::fs::fstatvfs(fd)?;
        Ok(Space { free: v.f_bavail.saturating_mul(v.f_frsize), total: v.f_blocks.saturating_mul(v.f_frsize) })
    }
}

/// The free space `limits` ask for on a file system of `total` bytes (0: no space limit).
pub fn wanted_free(limits: &RetentionConfig, total: u64) -> u64 {
    let by_percent = limits.min_free_percent.map_or(0, |p| (total as f64 * p / 100.0).ceil() as u64);
    limits.min_free_bytes.unwrap_or(0).max(by_percent)
}

/// Which of `files` to remove (indices, oldest first, each with why): all older than `max_age`, then,
/// while the estimated free space is below what the limits want, the oldest of the rest.
pub fn choose(limits: &RetentionConfig, now: SystemTime, files: &[Aged], space: Option<Space>) -> Vec<(usize, Why)> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| (files[i].mtime, i));
    let cutoff = limits.max_age.and_then(|age| now.checked_sub(age));
    let (mut free, want) = match space {
        Some(s) => (s.free, wanted_free(limits, s.total)),
        None => (0, 0),
    };
    let mut chosen = Vec::new();
    for i in order {
        let why = if cutoff.is_some_and(|c| files[i].mtime < c) {
            Why::Age
        } else if free < want {
            Why::Space
        } else {
            // Sorted oldest first: nothing after this one is old enough either.
            break;
        };
        free = free.saturating_add(files[i].allocated);
        chosen.push((i, why));
    }
    chosen
}

/// A folder to sweep and the `include` patterns of the inboxes that put images there.
#[derive(Debug, Clone)]
struct Folder {
    path: PathBuf,
    matchers: Vec<GlobSet>,
}

/// What a sweep needs from the config; replaced on reload.
#[derive(Debug, Clone)]
struct Plan {
    limits: RetentionConfig,
    folders: Vec<Folder>,
    /// Inbox roots and the other swept folders: never entered while walking a folder.
    inboxes: Vec<PathBuf>,
}

impl Plan {
    fn from_config(c: &Config) -> Option<Plan> {
        let limits = c.retention.clone()?;
        let mut folders: Vec<Folder> = Vec::new();
        for ib in &c.inboxes {
            let done = match &ib.on_done {
                OnDone::Move(d) => Some(d),
                _ => None,
            };
            for path in done.into_iter().chain(ib.quarantine.as_ref()) {
                match folders.iter_mut().find(|f| &f.path == path) {
                    Some(f) => f.matchers.push(ib.matcher.clone()),
                    None => folders.push(Folder { path: path.clone(), matchers: vec![ib.matcher.clone()] }),
                }
            }
        }
        Some(Plan { limits, folders, inboxes: c.inboxes.iter().map(|i| i.path.clone()).collect() })
    }
}

/// The retention thread; `join` after shutdown.
pub struct Retention {
    control: RetentionControl,
    handle: std::thread::JoinHandle<()>,
}

/// Changes what the retention thread sweeps (SIGHUP).
#[derive(Clone)]
pub struct RetentionControl {
    plan: Arc<Mutex<Option<Plan>>>,
    wake: crossbeam_channel::Sender<()>,
}

impl RetentionControl {
    /// Applies a reloaded config (its `[retention]` and folders) with a sweep now.
    pub fn reconfigure(&self, config: &Config) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Plan::from_config(config);
        let _ = self.wake.try_send(()); // one pending wake-up is enough
    }
}

/// How long an idle thread (no `[retention]`) waits when nothing wakes it.
const IDLE: Duration = Duration::from_secs(86_400);

impl Retention {
    /// Sweeps now and every `interval_s` after; idle while the config has no `[retention]` (a reload
    /// that adds one wakes it).
    pub fn start(config: &Config, metrics: Metrics, lifeline: Lifeline, shutdown: Shutdown) -> io::Result<Retention> {
        let plan = Arc::new(Mutex::new(Plan::from_config(config)));
        let (wake, woken) = crossbeam_channel::bounded::<()>(1);
        let control = RetentionControl { plan: plan.clone(), wake };
        let handle = std::thread::Builder::new().name("retention".into()).spawn(move || {
            let _lifeline = lifeline;
            loop {
                let current = plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let interval = current.as_ref().map_or(IDLE, |p| p.limits.interval);
                if let Some(plan) = current {
                    sweep(&plan, &metrics, &shutdown);
                }
                crossbeam_channel::select! {
                    recv(shutdown.closed()) -> _ => return,
                    recv(woken) -> _ => {}
                    default(interval) => {}
                }
                if shutdown.is_triggered() {
                    return;
                }
            }
        })?;
        Ok(Retention { control, handle })
    }

    pub fn control(&self) -> RetentionControl {
        self.control.clone()
    }

    /// Waits for a sweep in progress to stop (shutdown must be triggered).
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

/// A removable image (or a sidecar whose image is gone) found in a folder.
#[derive(Debug)]
struct Found {
    folder: usize,
    /// Its folder, relative to the swept folder's root.
    dir: PathBuf,
    name: OsString,
    inode: u64,
    sidecar: Option<OsString>,
    bytes: u64,
    aged: Aged,
}

/// What one folder's walk and removals came to in one sweep.
#[derive(Debug, Default)]
struct Tally {
    files: u64,
    bytes: u64,
    by_age: u64,
    by_space: u64,
    links: u64,
    errors: Vec<String>,
}

/// One pass over every folder: per file system, the candidates of all its folders compete, oldest first.
fn sweep(plan: &Plan, metrics: &Metrics, shutdown: &Shutdown) {
    let skip = folder_keys(plan.inboxes.iter().chain(plan.folders.iter().map(|f| &f.path)));
    let mut tallies: Vec<Tally> = plan.folders.iter().map(|_| Tally::default()).collect();
    let mut by_fs: HashMap<u64, (Space, OwnedFd, Vec<Found>, usize)> = HashMap::new();
    let mut free_before: Vec<Option<u64>> = vec![None; plan.folders.len()];
    for (i, folder) in plan.folders.iter().enumerate() {
        let root = match open_root(&folder.path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // nothing moved there yet
            Err(e) => {
                tallies[i].errors.push(format!("cannot open {}: {e}", folder.path.display()));
                continue;
            }
        };
        let (dev, space) = match (rustix::fs::fstat(&root).map_err(io::Error::from), Space::of(&root)) {
            (Ok(st), Ok(space)) => (st.st_dev, space),
            (Err(e), _) | (_, Err(e)) => {
                tallies[i].errors.push(format!("cannot stat {}: {e}", folder.path.display()));
                continue;
            }
        };
        free_before[i] = Some(space.free);
        let own = skip.iter().filter(|k| **k != key_of(&root)).copied().collect();
        // With space to spare only files past max_age can go: keep just those (a year of images is many).
        let now = SystemTime::now();
        let low = space.free < wanted_free(&plan.limits, space.total);
        let older_than = if low { None } else { Some(plan.limits.max_age.and_then(|a| now.checked_sub(a)).unwrap_or(SystemTime::UNIX_EPOCH)) };
        let walk = Walk { folder: i, matchers: &folder.matchers, skip: &own, dev, older_than };
        let mut found = Vec::new();
        walk.dir(&root, Path::new(""), &mut found, &mut tallies[i]);
        let entry = by_fs.entry(dev).or_insert_with(|| (space, root, Vec::new(), i));
        entry.2.extend(found);
    }
    let now = SystemTime::now();
    let mut emptied: Vec<HashSet<PathBuf>> = plan.folders.iter().map(|_| HashSet::new()).collect();
    for (space, fd, found, first) in by_fs.values() {
        let aged: Vec<Aged> = found.iter().map(|f| f.aged).collect();
        for (i, why) in choose(&plan.limits, now, &aged, Some(*space)) {
            if shutdown.is_triggered() {
                break;
            }
            let f = &found[i];
            let t = &mut tallies[f.folder];
            match remove(&plan.folders[f.folder].path, f) {
                Ok(true) => {
                    t.files += 1;
                    t.bytes += f.bytes;
                    *(if why == Why::Age { &mut t.by_age } else { &mut t.by_space }) += 1;
                    emptied[f.folder].insert(f.dir.clone());
                }
                Ok(false) => {}
                Err(e) => t.errors.push(format!("cannot remove {}: {e}", plan.folders[f.folder].path.join(&f.dir).join(&f.name).display())),
            }
        }
        if let Ok(after) = Space::of(fd) {
            let want = wanted_free(&plan.limits, after.total);
            if after.free < want && !shutdown.is_triggered() {
                tracing::warn!(
                    folder = %plan.folders[*first].path.display(),
                    free_mb = after.free >> 20,
                    wanted_mb = want >> 20,
                    "retention: still below the free-space limit with nothing more to remove from the done and quarantine folders; something else fills this file system"
                );
            }
        }
    }
    for (i, folder) in plan.folders.iter().enumerate() {
        remove_empty_folders(&folder.path, &emptied[i]);
        report(folder, &tallies[i], free_before[i], metrics);
    }
    metrics.retention_sweep();
}

/// One line per folder that lost files, one per folder that had errors; metrics.
fn report(folder: &Folder, t: &Tally, free_before: Option<u64>, metrics: &Metrics) {
    let free_after = open_root(&folder.path).and_then(|fd| Space::of(&fd)).ok().map(|s| s.free);
    if let Some(free) = free_after {
        metrics.retention_free(&folder.path, free);
    }
    if t.files > 0 {
        metrics.retention_removed(t.files, t.bytes);
        let mb = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)));
        tracing::info!(
            folder = %folder.path.display(),
            files = t.files,
            bytes = t.bytes,
            by_age = t.by_age,
            by_low_space = t.by_space,
            free_mb_before = %mb(free_before),
            free_mb_after = %mb(free_after),
            links_left_alone = t.links,
            "retention: removed old images and their sidecars"
        );
    }
    if let Some(first) = t.errors.first() {
        tracing::warn!(
            folder = %folder.path.display(),
            errors = t.errors.len(),
            "retention: {first} (and {} more); those files stay, retried at the next sweep: check the folder's owner, permissions and mount",
            t.errors.len() - 1
        );
    }
}

/// The configured folder itself is the operator's and followed as written.
fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

fn key_of(fd: &OwnedFd) -> (u64, u64) {
    rustix::fs::fstat(fd).map(|st| (st.st_dev, st.st_ino)).unwrap_or((u64::MAX, u64::MAX))
}

/// (device, inode) of each existing folder.
fn folder_keys<'a>(paths: impl Iterator<Item = &'a PathBuf>) -> HashSet<(u64, u64)> {
    paths.filter_map(|p| rustix::fs::stat(p).ok().map(|st| (st.st_dev, st.st_ino))).collect()
}

/// Walking one swept folder.
struct Walk<'a> {
    folder: usize,
    matchers: &'a [GlobSet],
    /// Inboxes and other swept folders.
    skip: &'a HashSet<(u64, u64)>,
    dev: u64,
    /// Collect only files modified before this (None: all).
    older_than: Option<SystemTime>,
}

impl Walk<'_> {
    fn collect(&self, found: Found, out: &mut Vec<Found>) {
        if self.older_than.is_none_or(|c| found.aged.mtime < c) {
            out.push(found);
        }
    }

    fn wants(&self, name: &OsStr) -> bool {
        self.matchers.iter().any(|m| is_candidate_name(Path::new(name), m))
    }

    /// Collects the removable files of the folder open as `dir` (at `rel`), and walks its subfolders.
    fn dir(&self, dir: &OwnedFd, rel: &Path, out: &mut Vec<Found>, t: &mut Tally) {
        let names = match list(dir) {
            Ok(n) => n,
            Err(e) => return t.errors.push(format!("cannot list {}: {e}", rel.display())),
        };
        let present: HashSet<&OsStr> = names.iter().map(OsString::as_os_str).collect();
        let mut sidecars: HashSet<OsString> = HashSet::new();
        let mut orphans = Vec::new();
        for name in &names {
            // Dot-names are labeld's temp files (a copy into this folder in progress) or not images.
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let st = match rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) if e == rustix::io::Errno::NOENT => continue,
                Err(e) => {
                    t.errors.push(format!("cannot stat {}: {e}", rel.join(name).display()));
                    continue;
                }
            };
            match FileType::from_raw_mode(st.st_mode as _) {
                FileType::Symlink => t.links += 1,
                FileType::Directory => self.subdir(dir, rel, name, (st.st_dev, st.st_ino), out, t),
                FileType::RegularFile if self.wants(name) => {
                    let side = sidecar_path(Path::new(name)).into_os_string();
                    let side_stat = present
                        .contains(side.as_os_str())
                        .then(|| rustix::fs::statat(dir, side.as_os_str(), AtFlags::SYMLINK_NOFOLLOW).ok())
                        .flatten()
                        .filter(|s| FileType::from_raw_mode(s.st_mode as _) == FileType::RegularFile);
                    let (side_bytes, side_alloc) = side_stat.as_ref().map_or((0, 0), |s| (s.st_size as u64, s.st_blocks as u64 * 512));
                    let found = Found {
                        folder: self.folder,
                        dir: rel.to_path_buf(),
                        name: name.clone(),
                        inode: st.st_ino as u64,
                        sidecar: side_stat.is_some().then(|| side.clone()),
                        bytes: st.st_size as u64 + side_bytes,
                        aged: Aged { mtime: mtime(st.st_mtime as i64, st.st_mtime_nsec as u32), allocated: st.st_blocks as u64 * 512 + side_alloc },
                    };
                    self.collect(found, out);
                    sidecars.insert(side);
                }
                FileType::RegularFile => {
                    // A sidecar left without its image (a crash between the two removals or moves).
                    let image = name.as_bytes().strip_suffix(b".json").map(OsStr::from_bytes);
                    if image.is_some_and(|i| self.wants(i) && !present.contains(i)) {
                        orphans.push((name.clone(), st));
                    }
                }
                _ => {}
            }
        }
        for (name, st) in orphans.into_iter().filter(|(n, _)| !sidecars.contains(n)) {
            let found = Found {
                folder: self.folder,
                dir: rel.to_path_buf(),
                name,
                inode: st.st_ino as u64,
                sidecar: None,
                bytes: st.st_size as u64,
                aged: Aged { mtime: mtime(st.st_mtime as i64, st.st_mtime_nsec as u32), allocated: st.st_blocks as u64 * 512 },
            };
            self.collect(found, out);
        }
    }

    fn subdir(&self, dir: &OwnedFd, rel: &Path, name: &OsStr, key: (u64, u64), out: &mut Vec<Found>, t: &mut Tally) {
        if key.0 != self.dev || self.skip.contains(&key) {
            return;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            // Still the folder that was stat'ed, not one swapped in since.
            Ok(sub) if key_of(&sub) == key => self.dir(&sub, &rel.join(name), out, t),
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {}
            Err(e) => t.errors.push(format!("cannot open {}: {e}", rel.join(name).display())),
        }
    }
}

fn list(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    Ok(names)
}

fn mtime(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Removes `f` (then its sidecar), reached again beneath `root` without following links; false when it
/// is no longer the file that was chosen (replaced or gone since).
fn remove(root: &Path, f: &Found) -> io::Result<bool> {
    // Invariants I6 and I11 (docs/design.md), applied to the swept folder: resolved beneath its root, never through a link.
    let path = root.join(&f.dir).join(&f.name);
    let at = Beneath::new(root, &path)?;
    let dir = at.open_parent()?;
    match rustix::fs::statat(&dir, &f.name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_ino as u64 == f.inode && FileType::from_raw_mode(st.st_mode as _) == FileType::RegularFile => {}
        Ok(_) => return Ok(false),
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    rustix::fs::unlinkat(&dir, &f.name, AtFlags::empty())?;
    if let Some(side) = &f.sidecar {
        match rustix::fs::unlinkat(&dir, side, AtFlags::empty()) {
            Err(e) if e != rustix::io::Errno::NOENT => return Err(e.into()),
            _ => {}
        }
    }
    Ok(true)
}

/// Removes the folders this sweep emptied and their parents that became empty, never `root` itself.
fn remove_empty_folders(root: &Path, emptied: &HashSet<PathBuf>) {
    let mut dirs: Vec<&PathBuf> = emptied.iter().filter(|d| !d.as_os_str().is_empty()).collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let mut at: &Path = d;
        while !at.as_os_str().is_empty() {
            let path = root.join(at);
            let Ok(beneath) = Beneath::new(root, &path) else { break };
            let removed = beneath
                .open_parent()
                .and_then(|parent| Ok(rustix::fs::unlinkat(&parent, beneath.file_name(), AtFlags::REMOVEDIR)?));
            if removed.is_err() {
                break; // not empty (or gone): its parents are not empty either
            }
            at = at.parent().unwrap_or(Path::new(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1024 * 1024;

    fn limits(max_age_days: Option<u64>, min_free_mb: Option<u64>, min_free_percent: Option<f64>) -> RetentionConfig {
        RetentionConfig {
            max_age: max_age_days.map(|d| Duration::from_secs(d * 86_400)),
            min_free_bytes: min_free_mb.map(|m| m * MB),
            min_free_percent,
            interval: Duration::from_secs(300),
        }
    }

    /// Files `days_old` days old, 1 MB each.
    fn files(now: SystemTime, days_old: &[u64]) -> Vec<Aged> {
        days_old.iter().map(|d| Aged { mtime: now - Duration::from_secs(d * 86_400), allocated: MB }).collect()
    }

    #[test]
    fn files_past_the_age_limit_go_and_newer_ones_stay() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let f = files(now, &[5, 40, 31, 29, 400]);
        let plenty = Some(Space { free: 900 * MB, total: 1000 * MB });
        assert_eq!(choose(&limits(Some(30), None, None), now, &f, plenty), vec![(4, Why::Age), (1, Why::Age), (2, Why::Age)]);
        assert_eq!(choose(&limits(Some(500), Some(10), None), now, &f, plenty), vec![]);
    }

    #[test]
    fn low_space_removes_the_oldest_first_until_above_the_limit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let f = files(now, &[1, 4, 2, 3, 0]);
        // 7 MB free, 10 MB wanted: the three oldest (4, 3, 2 days) bring it to 10 MB.
        let space = Some(Space { free: 7 * MB, total: 100 * MB });
        assert_eq!(choose(&limits(None, Some(10), None), now, &f, space), vec![(1, Why::Space), (3, Why::Space), (2, Why::Space)]);
        // The percentage wins when it asks for more: 12 % of 100 MB.
        let chosen = choose(&limits(None, Some(10), Some(12.0)), now, &f, space);
        assert_eq!(chosen.len(), 5);
        // Age first, then space counts what age already freed.
        assert_eq!(choose(&limits(Some(3), Some(9), None), now, &f, space), vec![(1, Why::Age), (3, Why::Space)]);
        // Above the limit: nothing.
        assert_eq!(choose(&limits(None, Some(5), None), now, &f, space), vec![]);
    }

    #[test]
    fn not_enough_to_remove_takes_everything_and_stops() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let f = files(now, &[1, 2]);
        let space = Some(Space { free: 0, total: 100 * MB });
        assert_eq!(choose(&limits(None, Some(50), None), now, &f, space).len(), 2);
        assert_eq!(choose(&limits(None, Some(50), None), now, &[], space), vec![]);
        assert_eq!(wanted_free(&limits(None, None, Some(50.0)), 1001), 501);
    }

    #[test]
    fn a_sweep_removes_images_with_sidecars_and_emptied_folders_and_leaves_links_and_other_files() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let outside = d.path().join("outside.jpg");
        std::fs::write(&outside, b"keep me").unwrap();
        std::fs::create_dir_all(done.join("cam1/2024")).unwrap();
        for (p, body) in [("cam1/2024/a.jpg", "aa"), ("cam1/2024/a.jpg.json", "{}"), ("b.jpg", "bb"), ("c.JPG.json", "{}"), ("notes.txt", "n")] {
            std::fs::write(done.join(p), body).unwrap();
        }
        std::os::unix::fs::symlink(&outside, done.join("link.jpg")).unwrap();
        let old = SystemTime::now() - Duration::from_secs(100 * 86_400);
        for p in ["cam1/2024/a.jpg", "c.JPG.json", "notes.txt"] {
            std::fs::File::options().write(true).open(done.join(p)).unwrap().set_modified(old).unwrap();
        }
        let matcher = crate::config::image_matcher(&crate::config::default_include()).unwrap();
        let plan = Plan { limits: limits(Some(30), None, None), folders: vec![Folder { path: done.clone(), matchers: vec![matcher] }], inboxes: vec![] };
        let metrics = Metrics::new();
        sweep(&plan, &metrics, &Shutdown::new());
        assert!(!done.join("cam1").exists(), "the emptied folders go");
        assert!(!done.join("c.JPG.json").exists(), "an old sidecar without its image goes");
        for kept in ["b.jpg", "notes.txt", "link.jpg"] {
            assert!(std::fs::symlink_metadata(done.join(kept)).is_ok(), "{kept} was removed");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        assert!(done.is_dir(), "the folder itself stays");
        let text = metrics.encode();
        assert!(text.contains("labeld_retention_removed_files_total 2"), "{text}");
        assert!(text.contains("labeld_retention_removed_bytes_total 6"), "{text}");
        assert!(text.contains("labeld_retention_sweeps_total 1"), "{text}");
    }

    fn plan_for(done: &Path, inboxes: Vec<PathBuf>) -> Plan {
        let matcher = crate::config::image_matcher(&crate::config::default_include()).unwrap();
        Plan { limits: limits(Some(30), None, None), folders: vec![Folder { path: done.to_path_buf(), matchers: vec![matcher] }], inboxes }
    }

    #[test]
    fn a_folder_swapped_for_a_link_after_the_walk_is_refused_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (done, outside) = (d.path().join("done"), d.path().join("outside"));
        std::fs::create_dir_all(done.join("cam1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(done.join("cam1/old.jpg"), b"x").unwrap();
        std::fs::write(outside.join("old.jpg"), b"precious").unwrap();
        let plan = plan_for(&done, vec![]);
        let root = open_root(&done).unwrap();
        let walk = Walk { folder: 0, matchers: &plan.folders[0].matchers, skip: &HashSet::new(), dev: rustix::fs::fstat(&root).unwrap().st_dev, older_than: None };
        let mut found = Vec::new();
        walk.dir(&root, Path::new(""), &mut found, &mut Tally::default());
        assert_eq!(found.len(), 1);
        std::fs::rename(done.join("cam1"), d.path().join("cam1-away")).unwrap();
        std::os::unix::fs::symlink(&outside, done.join("cam1")).unwrap();
        let e = remove(&done, &found[0]).unwrap_err();
        // ELOOP/EXDEV for a link on the way, ENOTDIR for a link where the folder was (O_NOFOLLOW|O_DIRECTORY).
        assert!(crate::beneath::is_link_refusal(&e) || e.raw_os_error() == Some(libc::ENOTDIR), "{e}");
        assert_eq!(std::fs::read(outside.join("old.jpg")).unwrap(), b"precious");
    }

    #[test]
    fn an_inbox_inside_a_swept_folder_is_never_entered() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("data");
        let inbox = done.join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        for p in [done.join("old.jpg"), inbox.join("waiting.jpg")] {
            std::fs::write(&p, b"x").unwrap();
            std::fs::File::options().write(true).open(&p).unwrap().set_modified(SystemTime::now() - Duration::from_secs(90 * 86_400)).unwrap();
        }
        sweep(&plan_for(&done, vec![inbox.clone()]), &Metrics::new(), &Shutdown::new());
        assert!(!done.join("old.jpg").exists());
        assert!(inbox.join("waiting.jpg").exists(), "an image waiting in an inbox is not retention's");
    }

    /// `cargo test --release --lib -- --ignored --nocapture sweep_cost`: what a sweep costs on a big folder.
    #[test]
    #[ignore]
    fn sweep_cost_of_a_big_folder_with_nothing_to_remove() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let n = 20_000;
        for i in 0..n {
            let dir = done.join(format!("cam{}", i % 20));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{i}.jpg")), b"x").unwrap();
            std::fs::write(dir.join(format!("{i}.jpg.json")), b"{}").unwrap();
        }
        let plan = plan_for(&done, vec![]); // max_age_days = 30, all files new
        let t = std::time::Instant::now();
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        println!("max_age only: {n} images + {n} sidecars in 20 folders, swept in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        // Low on space: every file is collected and sorted (the walk; removal is per file chosen).
        let root = open_root(&done).unwrap();
        let walk = Walk { folder: 0, matchers: &plan.folders[0].matchers, skip: &HashSet::new(), dev: rustix::fs::fstat(&root).unwrap().st_dev, older_than: None };
        let t = std::time::Instant::now();
        let mut found = Vec::new();
        walk.dir(&root, Path::new(""), &mut found, &mut Tally::default());
        let aged: Vec<Aged> = found.iter().map(|f| f.aged).collect();
        let chosen = choose(&limits(None, Some(1 << 30), None), SystemTime::now(), &aged, Some(Space { free: 0, total: 1 << 40 }));
        println!("low space: {} candidates walked and ordered in {:.0} ms", found.len(), t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((found.len(), chosen.len()), (n, n));
        assert_eq!(std::fs::read_dir(done.join("cam0")).unwrap().count(), 2 * n / 20, "nothing was old enough or needed");
    }
}
