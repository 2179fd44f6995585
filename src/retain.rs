//! Retention (`[retention]`): a thread that, every `interval_s`, removes archived images (with their
//! sidecars) from the `done_dir` and `quarantine` folders: those older than `max_age_days`, and, while
//! the file system holding a folder has less free space than `min_free_mb` / `min_free_percent`, the
//! oldest first. "Old" is the image's modification time (a move keeps it; the camera's write time).
//!
//! Invariant I11 (docs/design.md): a file is removed only when the folder's archive ledger records it
//! at its path with its key (device, inode, size, mtime, birth time; written before labeld moved it
//! there; see `ledger.rs`). Where a
//! file is and what its name looks like decide nothing: anything else in those folders (an operator's
//! files, another program's, a file edited since) is left alone and counted as foreign. Folders are the
//! pinned ones (`ArchiveFolder::root`): a folder replaced since start or reload is not swept. The walk
//! opens every sub-folder `O_NOFOLLOW` beneath the pinned root, never enters an inbox, another swept
//! folder, another file system or mount (bind mounts included), and leaves links alone; each removal checks the key again on the
//! folder descriptor it walked. The choice of what to remove is a pure function (`choose`); the I/O
//! around it is thin.
//!
//! Archives made before the ledger existed are adopted once per folder, at its first sweep: an image
//! whose sidecar beside it is a labeld record of that very file moved here from an inbox of the config
//! (its `path` in an inbox, not here; same size and mtime; the same device and inode, or, when it was
//! labelled on another file system, the same XXH3 of its bytes), with that sidecar. A folder labeld
//! created, or found empty, has nothing to adopt.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::beneath;
use crate::config::{Cap, Config, RetentionConfig};
use crate::health::Lifeline;
use crate::ledger::{ArchiveFolder, ArchiveFolders, Archived, FileKey, Meta, archive_paths};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::vocab::Record;
use crate::vocab::sidecar_path;

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

/// What a sweep needs from the config; replaced on reload.
#[derive(Debug, Clone)]
struct Plan {
    /// `[retention]`; without it nothing is removed, the ledgers are only compacted once a day.
    limits: Option<RetentionConfig>,
    folders: Vec<Arc<ArchiveFolder>>,
    /// Inbox roots: never entered while walking a folder; adopted sidecars must name an image in one.
    inboxes: Vec<PathBuf>,
    /// Route folders with a cap (`max_files`, `max_mb`): kept under it as files arrive.
    caps: Vec<(Arc<ArchiveFolder>, Cap)>,
}

impl Plan {
    fn from_config(c: &Config, pinned: &ArchiveFolders) -> Plan {
        let folders = archive_paths(c).iter().filter_map(|p| pinned.get(p)).collect();
        let caps = c.routes.iter().filter_map(|r| Some((pinned.get(&r.to.as_ref()?.root)?, r.cap?))).collect();
        Plan { limits: c.retention.clone(), folders, inboxes: c.inboxes.iter().map(|i| i.path.clone()).collect(), caps }
    }
}

/// Which of `files` (each with its bytes) leave a folder capped at `cap` (indices, oldest first): the
/// oldest, until at most `max_files` are left and they hold at most `max_bytes`.
pub fn over_cap(cap: Cap, files: &[(Aged, u64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| (files[i].0.mtime, i));
    let (mut count, mut bytes) = (files.len() as u64, files.iter().map(|f| f.1).sum::<u64>());
    let mut chosen = Vec::new();
    for i in order {
        if cap.max_files.is_none_or(|m| count <= m) && cap.max_bytes.is_none_or(|m| bytes <= m) {
            break;
        }
        count -= 1;
        bytes = bytes.saturating_sub(files[i].1);
        chosen.push(i);
    }
    chosen
}

/// Keeps every capped route folder under its cap: the oldest files labeld recorded there leave first
/// (with their sidecars), by the rule of I11; anything else in the folder stays and does not count.
fn enforce_caps(plan: &Plan, metrics: &Metrics, shutdown: &Shutdown) {
    if plan.caps.is_empty() {
        return;
    }
    let roots: Vec<Option<Arc<OwnedFd>>> = plan.folders.iter().map(|f| f.root().ok()).collect();
    let skip = folder_keys(&plan.inboxes, &roots);
    for (folder, cap) in &plan.caps {
        let Ok(root) = folder.root() else { continue };
        let Ok(meta) = Meta::of(root.as_ref()) else { continue };
        let own: HashSet<(u64, u64)> = skip.iter().filter(|k| **k != (meta.key.dev, meta.key.ino)).copied().collect();
        let bounds = Bounds { dev: meta.key.dev, mnt_id: meta.mnt_id, skip: &own };
        let mut t = Tally::default();
        let mut units = Vec::new();
        walk(&root, &bounds, &mut t, &mut |_, unit| units.push(unit));
        let archived = match recorded(folder, &root, &units) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(folder = %folder.path.display(), error = %e, "cannot read the archive ledger; the cap is checked again at the next file");
                continue;
            }
        };
        units.retain(|u| archived.contains(&u.archived()));
        for u in &mut units {
            if u.sidecar_archived().is_some_and(|s| !archived.contains(&s)) {
                u.sidecar = None;
            }
        }
        let sized: Vec<(Aged, u64)> = units.iter().map(|u| (u.aged, u.bytes)).collect();
        let mut emptied = HashSet::new();
        for i in over_cap(*cap, &sized) {
            if shutdown.is_triggered() {
                break;
            }
            match remove(&root, &units[i]) {
                Ok(true) => {
                    t.files += 1;
                    t.bytes += units[i].bytes;
                    emptied.insert(units[i].dir.clone());
                }
                Ok(false) => {}
                Err(e) => t.errors.push(format!("cannot remove {}: {e}", folder.path.join(&units[i].dir).join(&units[i].name).display())),
            }
        }
        remove_empty_folders(&root, &emptied);
        if t.files > 0 {
            metrics.retention_removed(t.files, t.bytes);
            tracing::info!(folder = %folder.path.display(), files = t.files, bytes = t.bytes, "route folder over its cap: removed the oldest images and their sidecars");
        }
        if let Some(first) = t.errors.first() {
            tracing::warn!(folder = %folder.path.display(), errors = t.errors.len(), first_error = %first, "route folder cap: errors; those files stay, retried at the next file");
        }
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
    plan: Arc<Mutex<Plan>>,
    folders: ArchiveFolders,
    wake: crossbeam_channel::Sender<()>,
}

impl RetentionControl {
    /// Applies a reloaded config (its `[retention]` and folders, pinned by the reload) with a sweep now.
    pub fn reconfigure(&self, config: &Config) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Plan::from_config(config, &self.folders);
        let _ = self.wake.try_send(()); // one pending wake-up is enough
    }
}

/// How often the ledgers are compacted when no `[retention]` sweeps them.
const IDLE: Duration = Duration::from_secs(86_400);

impl Retention {
    /// Sweeps now and every `interval_s` after; without `[retention]` only compacts the archive
    /// ledgers now and then (a reload that adds the section wakes it).
    pub fn start(config: &Config, folders: ArchiveFolders, metrics: Metrics, lifeline: Lifeline, shutdown: Shutdown) -> io::Result<Retention> {
        let plan = Arc::new(Mutex::new(Plan::from_config(config, &folders)));
        let placed = folders.placed();
        let (wake, woken) = crossbeam_channel::bounded::<()>(1);
        let control = RetentionControl { plan: plan.clone(), folders, wake };
        let handle = std::thread::Builder::new().name("retention".into()).spawn(move || {
            let _lifeline = lifeline;
            loop {
                let current = plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match &current.limits {
                    Some(_) => sweep(&current, &metrics, &shutdown),
                    None => compact_ledgers(&current, &shutdown),
                }
                enforce_caps(&current, &metrics, &shutdown);
                let next = std::time::Instant::now() + current.limits.as_ref().map_or(IDLE, |l| l.interval);
                // Between sweeps, files arriving in capped folders are checked against their caps.
                loop {
                    crossbeam_channel::select! {
                        recv(shutdown.closed()) -> _ => return,
                        recv(woken) -> _ => break,
                        recv(placed) -> _ => enforce_caps(&current, &metrics, &shutdown),
                        recv(crossbeam_channel::at(next)) -> _ => break,
                    }
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

/// A regular file of a swept folder with its sidecar (if present), or a sidecar without its image.
#[derive(Debug)]
struct Unit {
    /// Its folder, relative to the swept folder's root.
    dir: PathBuf,
    name: OsString,
    key: FileKey,
    sidecar: Option<(OsString, FileKey)>,
    bytes: u64,
    aged: Aged,
}

impl Unit {
    fn archived(&self) -> Archived {
        (self.key, self.dir.join(&self.name))
    }

    fn sidecar_archived(&self) -> Option<Archived> {
        self.sidecar.as_ref().map(|(name, key)| (*key, self.dir.join(name)))
    }
}

/// A unit found in folder `folder` during a sweep.
#[derive(Debug)]
struct Found {
    folder: usize,
    unit: Unit,
}

/// What one folder's walk and removals came to in one sweep.
#[derive(Debug, Default)]
struct Tally {
    files: u64,
    bytes: u64,
    by_age: u64,
    by_space: u64,
    links: u64,
    /// Files due for removal by age or space, but not recorded as archived there: left alone.
    foreign: u64,
    errors: Vec<String>,
}

/// The folder the root of a walk is, and what is never entered from it.
struct Bounds<'a> {
    dev: u64,
    mnt_id: u64,
    /// Inboxes and the other swept folders.
    skip: &'a HashSet<(u64, u64)>,
}

/// One pass over every folder: per file system, the archived files of all its folders compete, oldest first.
fn sweep(plan: &Plan, metrics: &Metrics, shutdown: &Shutdown) {
    let Some(limits) = &plan.limits else { return };
    let roots: Vec<Option<Arc<OwnedFd>>> = plan.folders.iter().map(|f| f.root().ok()).collect();
    let skip = folder_keys(&plan.inboxes, &roots);
    let mut tallies: Vec<Tally> = plan.folders.iter().map(|_| Tally::default()).collect();
    let mut by_fs: HashMap<u64, (Space, Arc<OwnedFd>, Vec<Found>, usize)> = HashMap::new();
    let mut free_before: Vec<Option<u64>> = vec![None; plan.folders.len()];
    for (i, folder) in plan.folders.iter().enumerate() {
        // A folder not available or replaced was logged when that was found; it is not swept.
        let Some(root) = &roots[i] else { continue };
        let t = &mut tallies[i];
        let (meta, space) = match (Meta::of(root.as_ref()), Space::of(root)) {
            (Ok(m), Ok(space)) => (m, space),
            (Err(e), _) | (_, Err(e)) => {
                t.errors.push(format!("cannot stat {}: {e}", folder.path.display()));
                continue;
            }
        };
        let own: HashSet<(u64, u64)> = skip.iter().filter(|k| **k != (meta.key.dev, meta.key.ino)).copied().collect();
        let bounds = Bounds { dev: meta.key.dev, mnt_id: meta.mnt_id, skip: &own };
        match folder.adopted(root) {
            Ok(true) => {}
            Ok(false) => adopt(folder, root, &bounds, &plan.inboxes, t),
            Err(e) => t.errors.push(format!("cannot read the archive ledger: {e}")),
        }
        free_before[i] = Some(space.free);
        // With space to spare only files past max_age can go: keep just those (a year of images is many).
        let now = SystemTime::now();
        let low = space.free < wanted_free(limits, space.total);
        let older_than = if low { None } else { Some(limits.max_age.and_then(|a| now.checked_sub(a)).unwrap_or(SystemTime::UNIX_EPOCH)) };
        let mut units = Vec::new();
        walk(root, &bounds, t, &mut |_, unit| {
            if older_than.is_none_or(|c| unit.aged.mtime < c) {
                units.push(unit);
            }
        });
        let archived = match recorded(folder, root, &units) {
            Ok(r) => r,
            Err(e) => {
                t.errors.push(format!("cannot read the archive ledger: {e}"));
                continue;
            }
        };
        let mut found = Vec::new();
        for mut unit in units {
            let side_foreign = unit.sidecar_archived().is_some_and(|s| !archived.contains(&s));
            if !archived.contains(&unit.archived()) {
                t.foreign += 1 + u64::from(unit.sidecar.is_some());
                continue;
            }
            // A sidecar labeld did not put there stays, even beside an image that goes.
            if side_foreign {
                t.foreign += 1;
                unit.sidecar = None;
            }
            found.push(Found { folder: i, unit });
        }
        let entry = by_fs.entry(meta.key.dev).or_insert_with(|| (space, root.clone(), Vec::new(), i));
        entry.2.extend(found);
    }
    let now = SystemTime::now();
    let mut emptied: Vec<HashSet<PathBuf>> = plan.folders.iter().map(|_| HashSet::new()).collect();
    for (space, fd, found, first) in by_fs.values() {
        let aged: Vec<Aged> = found.iter().map(|f| f.unit.aged).collect();
        for (i, why) in choose(limits, now, &aged, Some(*space)) {
            if shutdown.is_triggered() {
                break;
            }
            let Found { folder, unit } = &found[i];
            let (Some(root), t) = (&roots[*folder], &mut tallies[*folder]) else { continue };
            match remove(root, unit) {
                Ok(true) => {
                    t.files += 1;
                    t.bytes += unit.bytes;
                    *(if why == Why::Age { &mut t.by_age } else { &mut t.by_space }) += 1;
                    emptied[*folder].insert(unit.dir.clone());
                }
                Ok(false) => {}
                Err(e) => t.errors.push(format!("cannot remove {}: {e}", plan.folders[*folder].path.join(&unit.dir).join(&unit.name).display())),
            }
        }
        if let Ok(after) = Space::of(fd) {
            let want = wanted_free(limits, after.total);
            if after.free < want && !shutdown.is_triggered() {
                tracing::warn!(
                    folder = %plan.folders[*first].path.display(),
                    free_mb = after.free >> 20,
                    wanted_mb = want >> 20,
                    "retention: still below the free-space limit with nothing more labeld archived to remove from the done and quarantine folders; something else fills this file system"
                );
            }
        }
    }
    for (i, folder) in plan.folders.iter().enumerate() {
        if let Some(root) = &roots[i] {
            remove_empty_folders(root, &emptied[i]);
            compact_if_due(folder, root, shutdown, &mut tallies[i].errors);
            report(folder, root, &tallies[i], free_before[i], metrics);
        }
    }
    metrics.retention_sweep();
}

fn compact_if_due(folder: &ArchiveFolder, root: &OwnedFd, shutdown: &Shutdown, errors: &mut Vec<String>) {
    if folder.compaction_due(SystemTime::now()) && !shutdown.is_triggered() {
        match folder.compact(root) {
            Ok((kept, dropped)) => tracing::debug!(folder = %folder.path.display(), kept, dropped, "archive ledger compacted"),
            Err(e) => errors.push(format!("cannot compact the archive ledger: {e}")),
        }
    }
}

/// Without `[retention]`: the ledgers still drop the records of files that are gone.
fn compact_ledgers(plan: &Plan, shutdown: &Shutdown) {
    for folder in &plan.folders {
        let Ok(root) = folder.root() else { continue };
        let mut errors = Vec::new();
        compact_if_due(folder, &root, shutdown, &mut errors);
        if let Some(e) = errors.first() {
            tracing::warn!(folder = %folder.path.display(), error = %e, "archive ledger not compacted; tried again tomorrow");
        }
    }
}

/// Which of `units` (images and sidecars, each by key and path) the folder's ledger records.
fn recorded(folder: &ArchiveFolder, root: &OwnedFd, units: &[Unit]) -> io::Result<HashSet<Archived>> {
    let wanted: HashSet<Archived> = units.iter().flat_map(|u| std::iter::once(u.archived()).chain(u.sidecar_archived())).collect();
    folder.recorded(root, &wanted)
}

/// One line per folder that lost files, one per folder with files left alone, one per folder that
/// had errors; metrics.
fn report(folder: &ArchiveFolder, root: &OwnedFd, t: &Tally, free_before: Option<u64>, metrics: &Metrics) {
    let free_after = Space::of(root).ok().map(|s| s.free);
    if let Some(free) = free_after {
        metrics.retention_free(&folder.path, free);
    }
    metrics.retention_foreign(&folder.path, t.foreign);
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
    if t.foreign > 0 {
        tracing::info!(
            folder = %folder.path.display(),
            files = t.foreign,
            "retention: files due for removal that labeld did not archive here are left alone (someone else's, or changed since)"
        );
    }
    if let Some(first) = t.errors.first() {
        tracing::warn!(
            folder = %folder.path.display(),
            errors = t.errors.len(),
            first_error = %first,
            "retention: errors; those files stay, retried at the next sweep: check the folder's owner, permissions and mount"
        );
    }
}

/// (device, inode) of each existing inbox and pinned folder: never entered from another folder.
fn folder_keys(inboxes: &[PathBuf], roots: &[Option<Arc<OwnedFd>>]) -> HashSet<(u64, u64)> {
    let inboxes = inboxes.iter().filter_map(|p| rustix::fs::stat(p).ok().map(|st| (st.st_dev, st.st_ino)));
    let roots = roots.iter().flatten().filter_map(|r| Meta::of(r.as_ref()).ok().map(|m| (m.key.dev, m.key.ino)));
    inboxes.chain(roots).collect()
}

/// Calls `visit` with each unit beneath `root` (its folder's descriptor and the unit), walking
/// sub-folders `O_NOFOLLOW`, never into another mount (a bind mount of the same file system included)
/// or the folders of `bounds.skip`.
fn walk(root: &OwnedFd, bounds: &Bounds, t: &mut Tally, visit: &mut dyn FnMut(&OwnedFd, Unit)) {
    let Ok(dup) = beneath::open_beneath(root, Path::new(""), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) else { return };
    let mut stack = vec![(dup, PathBuf::new())];
    while let Some((dir, rel)) = stack.pop() {
        let names = match list(&dir) {
            Ok(n) => n,
            Err(e) => {
                t.errors.push(format!("cannot list {}: {e}", rel.display()));
                continue;
            }
        };
        let mut files: HashMap<OsString, Meta> = HashMap::new();
        for name in names {
            // Dot-names are labeld's own (the ledger, temp files of a copy in progress) or hidden.
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let m = match Meta::at(&dir, &name) {
                Ok(m) => m,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    t.errors.push(format!("cannot stat {}: {e}", rel.join(&name).display()));
                    continue;
                }
            };
            match m.kind {
                FileType::Symlink => t.links += 1,
                FileType::Directory if m.key.dev == bounds.dev && (m.mnt_id == bounds.mnt_id || m.mnt_id == 0) && !bounds.skip.contains(&(m.key.dev, m.key.ino)) => {
                    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
                    match beneath::open_beneath(&dir, Path::new(&name), flags, Mode::empty()) {
                        // Still the folder that was looked at, not one swapped in since.
                        Ok(sub) if Meta::of(&sub).is_ok_and(|s| (s.key.dev, s.key.ino) == (m.key.dev, m.key.ino)) => stack.push((sub, rel.join(&name))),
                        Ok(_) => {}
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR | libc::EXDEV)) => {}
                        Err(e) => t.errors.push(format!("cannot open {}: {e}", rel.join(&name).display())),
                    }
                }
                FileType::RegularFile => {
                    files.insert(name, m);
                }
                _ => {}
            }
        }
        let sidecars: HashSet<OsString> = files.keys().map(|n| sidecar_path(Path::new(n)).into_os_string()).collect();
        for (name, m) in &files {
            if sidecars.contains(name) {
                continue; // visited with its image
            }
            let side = sidecar_path(Path::new(name)).into_os_string();
            let side_m = files.get(&side);
            let unit = Unit {
                dir: rel.clone(),
                name: name.clone(),
                key: m.key,
                sidecar: side_m.map(|s| (side.clone(), s.key)),
                bytes: m.key.size + side_m.map_or(0, |s| s.key.size),
                aged: Aged { mtime: m.mtime, allocated: m.allocated + side_m.map_or(0, |s| s.allocated) },
            };
            visit(&dir, unit);
        }
    }
}

/// Adopts what an earlier version archived in `folder` (see the module docs), then marks the ledger
/// so that this never runs again for it.
fn adopt(folder: &ArchiveFolder, root: &OwnedFd, bounds: &Bounds, inboxes: &[PathBuf], t: &mut Tally) {
    let mut adopted = 0u64;
    let mut failed = None;
    walk(root, bounds, t, &mut |dir, unit| {
        let Some((side, side_key)) = &unit.sidecar else { return };
        let here = folder.path.join(&unit.dir).join(&unit.name);
        if failed.is_some() || !is_labeld_record_of(dir, &unit, side, &here, bounds.dev, inboxes) {
            return;
        }
        let (img_rel, side_rel) = (unit.dir.join(&unit.name), unit.dir.join(side));
        match folder.record(root, &[(unit.key, img_rel.as_path()), (*side_key, side_rel.as_path())]) {
            Ok(()) => adopted += 1,
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return t.errors.push(format!("cannot record adopted images in the archive ledger (tried again at the next sweep): {e}"));
    }
    match folder.mark_adopted(root) {
        Ok(()) => tracing::info!(folder = %folder.path.display(), images = adopted, "retention: adopted images archived before the archive ledger existed (each with a sidecar that records that very file, moved here from an inbox)"),
        Err(e) => t.errors.push(format!("cannot write the archive ledger: {e}")),
    }
}

/// The sidecar `side` (in `dir`) is labeld's record of the image `unit`, which was moved here (now at
/// `here`) from one of `inboxes`: its path names an image in an inbox, not this place; size and mtime
/// match; and the device and inode match, or, only when the record's device is another file system
/// than the folder's (a copy across file systems), the XXH3 of the bytes.
fn is_labeld_record_of(dir: &OwnedFd, unit: &Unit, side: &OsStr, here: &Path, folder_dev: u64, inboxes: &[PathBuf]) -> bool {
    let Some(bytes) = read_small(dir, side, 1 << 20) else { return false };
    let Ok(Record { path, file: Some(id), .. }) = serde_json::from_slice::<Record>(&bytes) else { return false };
    let from = Path::new(&path);
    let from_an_inbox = inboxes.iter().any(|ib| from.starts_with(ib) && from != ib.as_path());
    if !from_an_inbox || from == here || (id.size, id.mtime_ns) != (unit.key.size, unit.key.mtime_ns) {
        return false;
    }
    if (id.dev, id.inode) == (unit.key.dev, unit.key.ino) {
        return true;
    }
    id.dev != folder_dev
        && id.xxh3.is_some_and(|h| read_small(dir, &unit.name, u64::MAX).is_some_and(|b| b.len() as u64 == unit.key.size && xxhash_rust::xxh3::xxh3_64(&b) == h))
}

/// The whole regular file `name` in `dir` if it is at most `max` bytes (no link followed, no FIFO waited on).
fn read_small(dir: &OwnedFd, name: &OsStr, max: u64) -> Option<Vec<u8>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let f = std::fs::File::from(rustix::fs::openat(dir, name, flags, Mode::empty()).ok()?);
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > max {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
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

/// Removes `u` (then its sidecar), reached again beneath the pinned `root` without links; false when
/// it is no longer the file that was chosen (replaced, edited or gone since).
fn remove(root: &OwnedFd, u: &Unit) -> io::Result<bool> {
    // Invariants I6 and I11 (docs/design.md), applied to the swept folder: resolved beneath its pinned root, never through a link.
    let dir = beneath::open_beneath(root, &u.dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW, Mode::empty())?;
    let is = |name: &OsStr, key: FileKey| match Meta::at(&dir, name) {
        Ok(m) => Ok(m.kind == FileType::RegularFile && m.key == key),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    };
    if !is(&u.name, u.key)? {
        return Ok(false);
    }
    rustix::fs::unlinkat(&dir, &u.name, AtFlags::empty())?;
    if let Some((side, key)) = &u.sidecar
        && is(side, *key)?
    {
        rustix::fs::unlinkat(&dir, side, AtFlags::empty())?;
    }
    Ok(true)
}

/// Removes the folders this sweep emptied and their parents that became empty, never the root itself.
fn remove_empty_folders(root: &OwnedFd, emptied: &HashSet<PathBuf>) {
    let mut dirs: Vec<&PathBuf> = emptied.iter().filter(|d| !d.as_os_str().is_empty()).collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let mut at: &Path = d;
        while let (Some(parent), Some(name)) = (at.parent(), at.file_name()) {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
            let removed = beneath::open_beneath(root, parent, flags, Mode::empty())
                .and_then(|p| Ok(rustix::fs::unlinkat(&p, name, AtFlags::REMOVEDIR)?));
            if removed.is_err() {
                break; // not empty (or gone): its parents are not empty either
            }
            at = parent;
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
    fn a_capped_folder_loses_its_oldest_files_until_under_both_limits() {
        let now = SystemTime::now();
        let f = |days: u64, bytes: u64| (Aged { mtime: now - Duration::from_secs(days * 86_400), allocated: bytes }, bytes);
        let files = [f(1, 10), f(5, 10), f(3, 10), f(2, 100), f(4, 10)];
        assert_eq!(over_cap(Cap { max_files: Some(3), max_bytes: None }, &files), vec![1, 4]);
        assert_eq!(over_cap(Cap { max_files: None, max_bytes: Some(100) }, &files), vec![1, 4, 2, 3]);
        assert_eq!(over_cap(Cap { max_files: Some(5), max_bytes: Some(140) }, &files), Vec::<usize>::new());
        assert_eq!(over_cap(Cap { max_files: Some(1), max_bytes: None }, &[]), Vec::<usize>::new());
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

    fn days_ago(d: u64) -> SystemTime {
        SystemTime::now() - Duration::from_secs(d * 86_400)
    }

    /// Writes `rel` in `folder` with `mtime`, as a file labeld did not put there.
    fn plant(folder: &Path, rel: &str, body: &[u8], mtime: SystemTime) -> PathBuf {
        let p = folder.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        p
    }

    fn key(p: &Path) -> FileKey {
        Meta::at(rustix::fs::CWD, p).unwrap().key
    }

    /// Writes `rel` in `folder` with `mtime` and records it in the folder's ledger, as an archive move does.
    fn archive(folder: &ArchiveFolder, rel: &str, body: &[u8], mtime: SystemTime) -> PathBuf {
        let p = plant(&folder.path, rel, body, mtime);
        folder.record(&folder.root().unwrap(), &[(key(&p), Path::new(rel))]).unwrap();
        p
    }

    fn plan_for(folder: Arc<ArchiveFolder>, inboxes: Vec<PathBuf>) -> Plan {
        Plan { limits: Some(limits(Some(30), None, None)), folders: vec![folder], inboxes, caps: vec![] }
    }

    /// A folder labeld created: nothing to adopt.
    fn fresh(path: &Path) -> Arc<ArchiveFolder> {
        let f = Arc::new(ArchiveFolder::new(path, vec![]));
        assert!(f.adopted(&f.root().unwrap()).unwrap());
        f
    }

    fn walk_all(root: &OwnedFd) -> Vec<Unit> {
        let m = Meta::of(root).unwrap();
        let mut units = Vec::new();
        walk(root, &Bounds { dev: m.key.dev, mnt_id: m.mnt_id, skip: &HashSet::new() }, &mut Tally::default(), &mut |_, u| units.push(u));
        units
    }

    #[test]
    fn a_sweep_removes_archived_images_with_sidecars_and_emptied_folders_and_leaves_everything_else() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let folder = fresh(&done);
        let outside = plant(d.path(), "outside.jpg", b"keep me", days_ago(400));
        let old = days_ago(100);
        archive(&folder, "cam1/2024/a.jpg", b"aa", old);
        archive(&folder, "cam1/2024/a.jpg.json", b"{}", old);
        archive(&folder, "b.jpg", b"bb", SystemTime::now());
        archive(&folder, "c.JPG.json", b"{}", old); // a sidecar whose image went before
        // Not labeld's: an old photo, a file that only looks like a sidecar, notes, a link.
        for rel in ["never-seen.jpg", "looks-like.jpg.json", "notes.txt", "cam2/x.png"] {
            plant(&done, rel, b"theirs", days_ago(3000));
        }
        std::os::unix::fs::symlink(&outside, done.join("link.jpg")).unwrap();
        // Archived, then edited by someone: no longer the file labeld archived.
        let edited = archive(&folder, "edited.jpg", b"v1", old);
        std::fs::write(&edited, b"v2 longer").unwrap();
        std::fs::File::options().write(true).open(&edited).unwrap().set_modified(old).unwrap();

        let metrics = Metrics::new();
        sweep(&plan_for(folder.clone(), vec![]), &metrics, &Shutdown::new());
        assert!(!done.join("cam1").exists(), "the emptied folders go");
        assert!(!done.join("c.JPG.json").exists(), "an archived sidecar without its image goes");
        for kept in ["b.jpg", "notes.txt", "link.jpg", "never-seen.jpg", "looks-like.jpg.json", "cam2/x.png", "edited.jpg", ".labeld-archive"] {
            assert!(std::fs::symlink_metadata(done.join(kept)).is_ok(), "{kept} was removed");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        assert!(done.is_dir(), "the folder itself stays");
        let text = metrics.encode();
        assert!(text.contains("labeld_retention_removed_files_total 2"), "{text}");
        assert!(text.contains("labeld_retention_removed_bytes_total 6"), "{text}");
        assert!(text.contains("labeld_retention_sweeps_total 1"), "{text}");
        // never-seen, looks-like (not the sidecar of a file there), notes, x.png, edited.
        assert!(text.contains(&format!("labeld_retention_foreign_files{{folder=\"{}\"}} 5", done.display())), "{text}");
    }

    #[test]
    fn a_folder_swapped_for_a_link_after_the_walk_is_refused_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (done, outside) = (d.path().join("done"), d.path().join("outside"));
        let folder = fresh(&done);
        archive(&folder, "cam1/old.jpg", b"x", days_ago(100));
        let precious = plant(&outside, "old.jpg", b"precious", days_ago(100));
        let root = folder.root().unwrap();
        let units = walk_all(&root);
        assert_eq!(units.len(), 1);
        std::fs::rename(done.join("cam1"), d.path().join("cam1-away")).unwrap();
        std::os::unix::fs::symlink(&outside, done.join("cam1")).unwrap();
        // The same name and even the same key outside: never reached through the link.
        let e = remove(&root, &units[0]).unwrap_err();
        assert!(beneath::is_link_refusal(&e) || e.raw_os_error() == Some(libc::ENOTDIR), "{e}");
        assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
    }

    #[test]
    fn a_swept_folder_replaced_by_a_link_is_not_swept() {
        let d = tempfile::tempdir().unwrap();
        let (done, elsewhere) = (d.path().join("done"), d.path().join("elsewhere"));
        let folder = fresh(&done);
        archive(&folder, "old.jpg", b"x", days_ago(100));
        // The same archived bytes and key can only be in the real folder; elsewhere holds someone's old files.
        let theirs = plant(&elsewhere, "old.jpg", b"x", days_ago(100));
        std::fs::rename(&done, d.path().join("done.real")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &done).unwrap();
        sweep(&plan_for(folder, vec![]), &Metrics::new(), &Shutdown::new());
        assert!(theirs.exists());
        assert!(d.path().join("done.real/old.jpg").exists(), "a replaced folder is not swept at all");
    }

    #[test]
    fn an_inbox_inside_a_swept_folder_is_never_entered() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("data");
        let folder = fresh(&done);
        archive(&folder, "old.jpg", b"x", days_ago(90));
        // Recorded, yet inside an inbox (a config that allowed it): the inbox is not retention's.
        let waiting = archive(&folder, "inbox/waiting.jpg", b"x", days_ago(90));
        sweep(&plan_for(folder, vec![done.join("inbox")]), &Metrics::new(), &Shutdown::new());
        assert!(!done.join("old.jpg").exists());
        assert!(waiting.exists(), "an image waiting in an inbox is not retention's");
    }

    /// A labeld sidecar for `image` as it is now, as labeld wrote it when the image was at `labelled_at`
    /// (`other_fs`: labelled on another file system, then copied here).
    fn sidecar_for(image: &Path, labelled_at: &str, other_fs: bool) -> String {
        let mut id = crate::vocab::Identity::of(&std::fs::metadata(image).unwrap());
        if other_fs {
            id.xxh3 = Some(xxhash_rust::xxh3::xxh3_64(&std::fs::read(image).unwrap()));
            id.inode += 1;
            id.dev += 1;
        }
        let r = serde_json::json!({"path": labelled_at, "time": "2020-01-01T00:00:00Z", "model": "m", "status": "ok", "latency_ms": 1.0, "file": id});
        r.to_string()
    }

    #[test]
    fn archives_from_before_the_ledger_are_adopted_once_by_their_sidecars() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let old = days_ago(100);
        let same = plant(&done, "cam/same.jpg", b"labelled here", old);
        std::fs::write(done.join("cam/same.jpg.json"), sidecar_for(&same, "/in/cam/same.jpg", false)).unwrap();
        let copied = plant(&done, "copied.jpg", b"labelled, then copied", old);
        std::fs::write(done.join("copied.jpg.json"), sidecar_for(&copied, "/in/copied.jpg", true)).unwrap();
        // A photo and a JSON that only looks like its sidecar, and a sidecar of another file.
        let photo = plant(&done, "photo.jpg", b"someone's photo", old);
        std::fs::write(done.join("photo.jpg.json"), r#"{"path":"x","status":"ok"}"#).unwrap();
        let other = plant(&done, "other.jpg", b"other", old);
        std::fs::write(done.join("other.jpg.json"), sidecar_for(&same, "/in/cam/same.jpg", false)).unwrap();
        // Labelled where it lies (the folder was an inbox with on_done = "keep"), and labelled in an
        // inbox this config does not have.
        let in_place = plant(&done, "kept.jpg", b"labelled in place", old);
        std::fs::write(done.join("kept.jpg.json"), sidecar_for(&in_place, &in_place.to_string_lossy(), false)).unwrap();
        let foreign_inbox = plant(&done, "theirs.jpg", b"another labeld's", old);
        std::fs::write(done.join("theirs.jpg.json"), sidecar_for(&foreign_inbox, "/elsewhere/theirs.jpg", false)).unwrap();
        // An operator's copy (cp -p) of an archived image beside it: the same bytes on the same file
        // system is a copy, not the archived file.
        let dup = plant(&done, "dup.jpg", b"labelled here", old);
        std::fs::write(done.join("dup.jpg.json"), {
            let mut id = crate::vocab::Identity::of(&std::fs::metadata(&same).unwrap());
            id.xxh3 = Some(xxhash_rust::xxh3::xxh3_64(b"labelled here"));
            serde_json::json!({"path": "/in/dup.jpg", "time": "t", "model": "m", "status": "ok", "latency_ms": 1.0, "file": id}).to_string()
        })
        .unwrap();
        std::fs::write(done.join("notes.txt"), b"keeps the folder from looking new").unwrap();
        let folder = Arc::new(ArchiveFolder::new(&done, vec![]));
        let plan = plan_for(folder.clone(), vec![PathBuf::from("/in")]);
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        for gone in ["cam/same.jpg", "cam/same.jpg.json", "copied.jpg", "copied.jpg.json"] {
            assert!(!done.join(gone).exists(), "{gone} was not adopted");
        }
        for kept in [&photo, &other, &in_place, &foreign_inbox, &dup] {
            assert!(kept.exists(), "{} was adopted", kept.display());
            assert!(sidecar_path(kept).exists(), "the sidecar of {} was adopted", kept.display());
        }
        assert!(folder.adopted(&folder.root().unwrap()).unwrap());
        // Once: a pair that matches, made after adoption, is not adopted later.
        let late = plant(&done, "late.jpg", b"late", old);
        std::fs::write(done.join("late.jpg.json"), sidecar_for(&late, "/in/late.jpg", false)).unwrap();
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        assert!(late.exists());
    }

    #[test]
    fn low_space_removes_only_archived_files_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let folder = fresh(&done);
        let theirs = plant(&done, "aaa-oldest.jpg", b"t", days_ago(9000));
        let a = archive(&folder, "a.jpg", b"a", days_ago(3));
        let b = archive(&folder, "b.jpg", b"b", days_ago(2));
        let root = folder.root().unwrap();
        // Ask for more free space than the file system has: everything archived is due, nothing else.
        let total = Space::of(&root).unwrap().total;
        let plan = Plan { limits: Some(RetentionConfig { max_age: None, min_free_bytes: Some(total), min_free_percent: None, interval: Duration::from_secs(60) }), caps: vec![], folders: vec![folder], inboxes: vec![] };
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        assert!(!a.exists() && !b.exists());
        assert!(theirs.exists());
    }

    /// `cargo test --release --lib -- --ignored --nocapture sweep_cost`: what a sweep costs on a big folder.
    #[test]
    #[ignore]
    fn sweep_cost_of_a_big_folder_with_nothing_to_remove() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        let folder = fresh(&done);
        let n = 20_000;
        let now = SystemTime::now();
        for i in 0..n {
            archive(&folder, &format!("cam{}/{i}.jpg", i % 20), b"x", now);
            archive(&folder, &format!("cam{}/{i}.jpg.json", i % 20), b"{}", now);
        }
        let plan = plan_for(folder.clone(), vec![]); // max_age_days = 30, all files new
        let t = std::time::Instant::now();
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        println!("max_age only: {n} images + {n} sidecars in 20 folders, swept in {:.0} ms (ledger compacted in it)", t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        sweep(&plan, &Metrics::new(), &Shutdown::new());
        println!("again, ledger already compact: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        // Low on space: every file is collected, looked up in the ledger and sorted.
        let root = folder.root().unwrap();
        let t = std::time::Instant::now();
        let units = walk_all(&root);
        let archived = recorded(&folder, &root, &units).unwrap();
        let aged: Vec<Aged> = units.iter().filter(|u| archived.contains(&u.archived())).map(|u| u.aged).collect();
        let chosen = choose(&limits(None, Some(1 << 30), None), SystemTime::now(), &aged, Some(Space { free: 0, total: 1 << 40 }));
        println!("low space: {} candidates walked, looked up and ordered in {:.0} ms", units.len(), t.elapsed().as_secs_f64() * 1e3);
        assert_eq!((units.len(), chosen.len()), (n, n));
        assert_eq!(std::fs::read_dir(done.join("cam0")).unwrap().count(), 2 * n / 20, "nothing was old enough or needed");
    }
}
