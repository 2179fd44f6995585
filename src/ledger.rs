//! Archive folders (`done_dir`, `quarantine`) and the ledger of what labeld put into them.
//! Invariant I11 (docs/design.md): retention removes only files this ledger records.
//!
//! Each folder is pinned: opened once at start and at every reload (`O_DIRECTORY | O_NOFOLLOW`, its
//! device and inode kept), and every move into it and every sweep of it work beneath that descriptor.
//! Before each use the configured path must still lead to the pinned folder; a folder renamed away or
//! replaced (by a link or another folder) is logged once and not used again until a reload pins it
//! anew. A configured path that is itself a link is never pinned, and a folder that was not there at
//! start is checked against the inboxes again before it is first used.
//!
//! The ledger is `.labeld-archive` in the folder's root: a header, then one line per file labeld placed
//! in the folder (`<unix time> <dev> <inode> <size> <mtime_ns> <btime_ns> <path below the root,
//! escaped>`), appended and fdatasynced *before* the file appears under its name. A file is labeld's
//! only while it is at that path with that key: the birth time tells a new file that reuses a freed
//! inode (same size, `cp -p`'s mtime) from the one archived. A crash at any point leaves every archived
//! file recorded; a record whose move never happened matches nothing; a torn last line does not parse
//! and is passed over, so a file it would have recorded is kept, never removed. The ledger is only ever
//! opened as a regular file (no FIFO, device or link), reopened when it was replaced behind labeld's
//! back, and appends and compactions take an `flock` on the folder, so two labeld processes sharing a
//! folder cannot lose each other's records. Compaction rewrites the ledger (temp file, fsync, rename,
//! folder fsync) without the records whose file is no longer at its path with its key.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, StatxFlags};

use crate::beneath;
use crate::config::{Config, OnDone, check_archive_folder};

/// The ledger's name in each archive folder (a dotfile: never labelled, never swept).
pub const LEDGER: &str = ".labeld-archive";
const HEADER: &str = "labeld-archive 1";
const ADOPTED: &str = "adopted";
/// A record younger than this is kept by compaction even if its file is not (yet) at its path: its
/// move may still be under way.
const SETTLING: Duration = Duration::from_secs(60);
/// A ledger line longer than this is no record (a path is at most 4096 bytes, escaped ×4).
const MAX_LINE: usize = 20_000;

/// What identifies an archived file: a move within a file system keeps all of it; an edit, a
/// replacement or a copy changes at least one part. `btime_ns` is 0 where the file system keeps no
/// birth time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub btime_ns: i64,
}

/// What `statx` says of a file, as labeld uses it.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub kind: FileType,
    pub key: FileKey,
    /// Bytes allocated on disk.
    pub allocated: u64,
    pub mtime: SystemTime,
    /// The mount it is on (0 where the kernel does not say).
    pub mnt_id: u64,
}

impl Meta {
    /// Of `name` in the folder `dir`, not following a link (an empty `name`: `dir` itself).
    pub fn at(dir: impl AsFd, name: impl AsRef<Path>) -> io::Result<Meta> {
        let name = name.as_ref();
        let flags = if name.as_os_str().is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
        let st = rustix::fs::statx(dir, name, flags, StatxFlags::BASIC_STATS | StatxFlags::BTIME | StatxFlags::MNT_ID)?;
        let ns = |t: rustix::fs::StatxTimestamp| t.tv_sec.saturating_mul(1_000_000_000).saturating_add(i64::from(t.tv_nsec));
        let btime_ns = if st.stx_mask & StatxFlags::BTIME.bits() != 0 { ns(st.stx_btime) } else { 0 };
        let mtime = if st.stx_mtime.tv_sec >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(st.stx_mtime.tv_sec as u64, st.stx_mtime.tv_nsec)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(st.stx_mtime.tv_sec.unsigned_abs())
        };
        Ok(Meta {
            kind: FileType::from_raw_mode(u32::from(st.stx_mode)),
            key: FileKey {
                dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
                ino: st.stx_ino,
                size: st.stx_size,
                mtime_ns: ns(st.stx_mtime),
                btime_ns,
            },
            allocated: st.stx_blocks.saturating_mul(512),
            mtime,
            mnt_id: if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 { st.stx_mnt_id } else { 0 },
        })
    }

    /// Of the open file `fd`.
    pub fn of(fd: impl AsFd) -> io::Result<Meta> {
        Meta::at(fd, "")
    }
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    time: u64,
    key: FileKey,
    rel: PathBuf,
}

impl Entry {
    fn line(&self) -> Vec<u8> {
        let k = &self.key;
        let mut out = format!("{} {} {} {} {} {} ", self.time, k.dev, k.ino, k.size, k.mtime_ns, k.btime_ns).into_bytes();
        escape(self.rel.as_os_str().as_bytes(), &mut out);
        out.push(b'\n');
        out
    }

    fn parse(line: &[u8]) -> Option<Entry> {
        let text = std::str::from_utf8(line).ok()?;
        let mut it = text.split(' ');
        let time = it.next()?.parse().ok()?;
        let key = FileKey {
            dev: it.next()?.parse().ok()?,
            ino: it.next()?.parse().ok()?,
            size: it.next()?.parse().ok()?,
            mtime_ns: it.next()?.parse().ok()?,
            btime_ns: it.next()?.parse().ok()?,
        };
        let rel = PathBuf::from(OsStr::from_bytes(&unescape(it.next()?)?));
        let plain = rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        (it.next().is_none() && !rel.as_os_str().is_empty() && plain).then_some(Entry { time, key, rel })
    }
}

/// Bytes outside printable ASCII, space and backslash become `\xHH`: one record per line, whatever the name.
fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let hex = s.get(i + 2..i + 4).filter(|_| b.get(i + 1) == Some(&b'x'))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether a folder can be used now.
#[derive(Debug, Clone)]
enum Pin {
    Pinned { fd: Arc<OwnedFd>, dev: u64, ino: u64 },
    /// Could not be opened (missing and not creatable, no permission): tried again at the next use,
    /// after the same checks as the config's.
    Unavailable(String),
    /// The configured path is a link, or no longer leads to the folder pinned: unused until a reload.
    Refused(String),
}

/// A file archived into a folder: its key and its path below the folder's root.
pub type Archived = (FileKey, PathBuf);

/// One archive folder, pinned, with its ledger.
#[derive(Debug)]
pub struct ArchiveFolder {
    pub path: PathBuf,
    pin: Mutex<Pin>,
    /// The inboxes of the config that named it: a folder opened late is checked against them first.
    inboxes: Mutex<Vec<PathBuf>>,
    /// The ledger open for appending (lazily), behind the lock every append and the end of a compaction take.
    ledger: Mutex<Option<File>>,
    /// Records appended since the last compaction, and the records it kept (None: not compacted yet).
    growth: Mutex<(u64, Option<(u64, SystemTime)>)>,
    /// Told after each record (a file is being placed): the retention thread then checks capped folders.
    placed: Option<crossbeam_channel::Sender<()>>,
}

impl ArchiveFolder {
    /// Pins `path` on its own; the daemon goes through `ArchiveFolders`, which shares one value per path.
    pub(crate) fn new(path: &Path, inboxes: Vec<PathBuf>) -> ArchiveFolder {
        let f = ArchiveFolder {
            path: path.to_path_buf(),
            pin: Mutex::new(Pin::Unavailable("not opened yet".into())),
            inboxes: Mutex::new(Vec::new()),
            ledger: Mutex::new(None),
            growth: Mutex::new((0, None)),
            placed: None,
        };
        f.repin(inboxes);
        f
    }

    fn lock_pin(&self) -> MutexGuard<'_, Pin> {
        self.pin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_ledger(&self) -> MutexGuard<'_, Option<File>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_growth(&self) -> MutexGuard<'_, (u64, Option<(u64, SystemTime)>)> {
        self.growth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the configured path anew (start, reload): creates it if missing, refuses a link.
    fn repin(&self, inboxes: Vec<PathBuf>) {
        *self.inboxes.lock().unwrap_or_else(|e| e.into_inner()) = inboxes;
        let new = pin(&self.path);
        match &new {
            Pin::Pinned { fd, .. } => {
                if let Err(e) = start_ledger_if_new(fd) {
                    tracing::warn!(folder = %self.path.display(), error = %e, "cannot start the archive ledger; tried again at the first move");
                }
            }
            Pin::Unavailable(why) => tracing::warn!(folder = %self.path.display(), reason = %why, "archive folder not available; images stay in their inbox until it is"),
            Pin::Refused(why) => tracing::error!(folder = %self.path.display(), reason = %why, "archive folder refused; nothing is moved there or removed from it until a reload names a real folder"),
        }
        let mut p = self.lock_pin();
        *self.lock_ledger() = None;
        *p = new;
    }

    /// The pinned folder, once its configured path is checked to still lead to it. A folder that was
    /// replaced is logged (once) and refused until a reload; one that was not available is tried again.
    pub fn root(&self) -> io::Result<Arc<OwnedFd>> {
        let mut p = self.lock_pin();
        if let Pin::Unavailable(_) = &*p {
            let inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner()).clone();
            *p = match check_archive_folder(&self.path, &inboxes) {
                Ok(()) => pin(&self.path),
                Err(why) => {
                    tracing::error!(folder = %self.path.display(), reason = %why, "archive folder refused now that it is there; nothing is moved there or removed from it until a reload");
                    Pin::Refused(why)
                }
            };
            if let Pin::Pinned { fd, .. } = &*p {
                start_ledger_if_new(fd)?;
            }
        }
        match &*p {
            Pin::Pinned { fd, dev, ino } => {
                let now = rustix::fs::lstat(&self.path).map(|st| (st.st_dev, st.st_ino, FileType::from_raw_mode(st.st_mode)));
                match now {
                    Ok((d, i, FileType::Directory)) if (d, i) == (*dev, *ino) => Ok(fd.clone()),
                    other => {
                        let what = match other {
                            Ok((_, _, FileType::Symlink)) => "is a symbolic link now",
                            Ok(_) => "leads to another folder now",
                            Err(_) => "is gone (renamed or deleted)",
                        };
                        let why = format!("{} {what}; the folder labeld opened at start or reload is not used again until a reload finds a real folder there", self.path.display());
                        tracing::error!(folder = %self.path.display(), "archive folder replaced: {what}; nothing is moved there or removed from it until a reload");
                        *p = Pin::Refused(why.clone());
                        Err(io::Error::other(why))
                    }
                }
            }
            Pin::Unavailable(why) | Pin::Refused(why) => Err(io::Error::other(why.clone())),
        }
    }

    /// Appends `bytes` to the ledger durably, under the folder's lock, reopening it if it was replaced.
    fn append(&self, root: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
        let mut ledger = self.lock_ledger();
        let written = with_folder_lock(root, || {
            if let Some(f) = ledger.as_ref() {
                if !is_the_ledger(f, root) {
                    *ledger = None; // deleted, renamed or compacted by another process since
                }
            }
            if ledger.is_none() {
                *ledger = Some(open_append(root)?);
            }
            let f = ledger.as_mut().ok_or_else(|| io::Error::other("archive ledger not open"))?;
            f.write_all(bytes)?;
            f.sync_data()
        });
        if written.is_err() {
            // Reopened at the next record, which starts on a fresh line.
            *ledger = None;
        }
        written
    }

    /// Records `files` (keys, paths below the root) as archived, durably, before they appear there.
    pub fn record(&self, root: &OwnedFd, files: &[(FileKey, &Path)]) -> io::Result<()> {
        let time = unix_now();
        let bytes: Vec<u8> = files.iter().flat_map(|(key, rel)| Entry { time, key: *key, rel: rel.to_path_buf() }.line()).collect();
        self.append(root, &bytes)?;
        self.lock_growth().0 += files.len() as u64;
        if let Some(tx) = &self.placed {
            let _ = tx.try_send(()); // one pending notice is enough
        }
        Ok(())
    }

    /// Which of `candidates` the ledger records (one pass over it; memory bounded by `candidates`).
    pub fn recorded(&self, root: &OwnedFd, candidates: &HashSet<Archived>) -> io::Result<HashSet<Archived>> {
        let mut found = HashSet::new();
        if candidates.is_empty() {
            return Ok(found);
        }
        let Some(file) = open_read(root)? else { return Ok(found) };
        for_each_line(file, u64::MAX, |line| {
            if let Some(e) = Entry::parse(line) {
                let a = (e.key, e.rel);
                if candidates.contains(&a) {
                    found.insert(a);
                }
            }
        })?;
        Ok(found)
    }

    /// Whether files archived before the ledger existed were adopted (see `adopt` in retain.rs).
    pub fn adopted(&self, root: &OwnedFd) -> io::Result<bool> {
        let Some(file) = open_read(root)? else { return Ok(false) };
        let mut adopted = false;
        for_each_line(file, u64::MAX, |line| adopted |= line.starts_with(ADOPTED.as_bytes()))?;
        Ok(adopted)
    }

    /// Notes that adoption is done: it never runs again for this folder.
    pub fn mark_adopted(&self, root: &OwnedFd) -> io::Result<()> {
        self.append(root, format!("{ADOPTED} {}\n", unix_now()).as_bytes())
    }

    /// Whether the ledger has grown enough since its last compaction to be worth one (amortised: a
    /// compaction reads every record once), or a day went by.
    pub fn compaction_due(&self, now: SystemTime) -> bool {
        let g = self.lock_growth();
        match g.1 {
            None => true,
            Some((kept, at)) => g.0 > kept.max(1000) || now.duration_since(at).is_ok_and(|d| d > Duration::from_secs(86_400)),
        }
    }

    /// Rewrites the ledger without the records whose file is no longer at its path with its key
    /// (removed by retention or by someone else, or a move a crash cut short). Returns (kept, dropped).
    /// Appends go on while the records are checked; they are carried over under the lock at the end.
    pub fn compact(&self, root: &OwnedFd) -> io::Result<(u64, u64)> {
        let Some(draft) = self.draft(root)? else {
            *self.lock_growth() = (0, Some((0, SystemTime::now())));
            return Ok((0, 0));
        };
        let tmp = draft.tmp.clone();
        let result = self.install(root, draft);
        if result.is_err() {
            let _ = rustix::fs::unlinkat(root, &tmp, AtFlags::empty());
        }
        result
    }

    /// The records up to the ledger's present end that still hold, in a temp file beside it.
    fn draft(&self, root: &OwnedFd) -> io::Result<Option<Draft>> {
        let Some(file) = open_read(root)? else { return Ok(None) };
        let of = Meta::of(&file)?.key;
        let settled_before = unix_now().saturating_sub(SETTLING.as_secs());
        let (tmp, mut out) = beneath::create_temp(root)?;
        let mut draft = Draft { tmp, out: None, of: (of.dev, of.ino), end: of.size, kept: 0, dropped: 0 };
        let written = (|| {
            let mut w = io::BufWriter::new(&mut out);
            w.write_all(format!("{HEADER}\n").as_bytes())?;
            let mut adopted = false;
            let mut seen = HashSet::new();
            let mut failure = None;
            for_each_line(file, draft.end, |line| {
                if failure.is_some() {
                    return;
                }
                if line.starts_with(ADOPTED.as_bytes()) {
                    adopted = true;
                    return;
                }
                let Some(e) = Entry::parse(line) else { return };
                let keep = seen.insert((e.key, e.rel.clone())) && (e.time >= settled_before || key_at(root, &e.rel) == Some(e.key));
                if keep {
                    draft.kept += 1;
                    if let Err(err) = w.write_all(&e.line()) {
                        failure = Some(err);
                    }
                } else {
                    draft.dropped += 1;
                }
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            if adopted {
                w.write_all(format!("{ADOPTED} {}\n", unix_now()).as_bytes())?;
            }
            w.flush()
        })();
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(root, &draft.tmp, AtFlags::empty());
            return Err(e);
        }
        draft.out = Some(out);
        Ok(Some(draft))
    }

    /// Appends what was recorded since `draft` was begun and puts it in place of the ledger, unless
    /// the ledger was replaced meanwhile (then nothing changes; the next compaction starts over).
    fn install(&self, root: &OwnedFd, draft: Draft) -> io::Result<(u64, u64)> {
        let Draft { tmp, out, of, end, kept, dropped } = draft;
        let mut out = out.ok_or_else(|| io::Error::other("compaction draft not written"))?;
        let mut ledger = self.lock_ledger();
        with_folder_lock(root, || {
            let Some(mut tail) = open_read(root)? else { return Err(io::Error::other("the archive ledger was removed during compaction")) };
            let now = Meta::of(&tail)?.key;
            if (now.dev, now.ino) != of || now.size < end {
                return Err(io::Error::other("the archive ledger was replaced during compaction; compacted again later"));
            }
            tail.seek(io::SeekFrom::Start(end))?;
            let mut appended = Vec::new();
            tail.read_to_end(&mut appended)?;
            if appended.last().is_some_and(|b| *b != b'\n') {
                appended.push(b'\n'); // a record cut short by a failed write stays apart from the next
            }
            out.write_all(&appended)?;
            out.sync_all()?;
            rustix::fs::renameat(root, &tmp, root, LEDGER)?;
            beneath::sync_dir(root)?;
            *ledger = None;
            let since = appended.iter().filter(|b| **b == b'\n').count() as u64;
            *self.lock_growth() = (since, Some((kept, SystemTime::now())));
            Ok((kept + since, dropped))
        })
    }
}

/// A compacted ledger being written (`ArchiveFolder::compact`).
struct Draft {
    tmp: PathBuf,
    out: Option<File>,
    /// The ledger the draft was made from (device, inode), and where it ended then.
    of: (u64, u64),
    end: u64,
    kept: u64,
    dropped: u64,
}

/// Runs `f` holding an exclusive `flock` on the folder `root` (other labeld processes sharing it wait).
fn with_folder_lock<T>(root: &OwnedFd, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    rustix::fs::flock(root, FlockOperation::LockExclusive)?;
    let result = f();
    let _ = rustix::fs::flock(root, FlockOperation::Unlock);
    result
}

/// Opens `path` as an archive folder root: created if missing (as configured), never through a link
/// at its last component.
fn pin(path: &Path) -> Pin {
    if let Ok(st) = rustix::fs::lstat(path) {
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            let to = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            return Pin::Refused(format!("{} is a symbolic link (to {to}); name the folder itself", path.display()));
        }
    } else if let Err(e) = std::fs::create_dir_all(path) {
        return Pin::Unavailable(format!("cannot create {}: {e}", path.display()));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::open(path, flags, Mode::empty()).and_then(|fd| Ok((rustix::fs::fstat(&fd)?, fd))) {
        Ok((st, fd)) => Pin::Pinned { fd: Arc::new(fd), dev: st.st_dev, ino: st.st_ino },
        Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
            Pin::Refused(format!("{} is not a folder (a link or a file): {e}", path.display()))
        }
        Err(e) => Pin::Unavailable(format!("cannot open {}: {e}", path.display())),
    }
}

/// A folder with nothing in it and no ledger yet (labeld just made it, or it is new) has nothing to
/// adopt: its ledger starts marked adopted, so that a file someone puts there later is never adopted.
fn start_ledger_if_new(root: &OwnedFd) -> io::Result<()> {
    let mut entries = rustix::fs::Dir::read_from(root)?;
    let empty = entries.by_ref().filter_map(Result::ok).all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
    if !empty {
        return Ok(());
    }
    with_folder_lock(root, || {
        let mut f = open_append(root)?;
        if f.metadata()?.len() == HEADER.len() as u64 + 1 {
            f.write_all(format!("{ADOPTED} {}\n", unix_now()).as_bytes())?;
            f.sync_data()?;
            beneath::sync_dir(root)?;
        }
        Ok(())
    })
}

/// Opens the ledger for appending (created with its header if missing): only a regular file, never
/// through a link, never waiting on a FIFO.
fn open_append(root: &OwnedFd) -> io::Result<File> {
    // Read as well: a torn last line is looked for before the first append.
    let flags = OFlags::RDWR | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let mut f = regular(rustix::fs::openat(root, LEDGER, flags, Mode::from_raw_mode(0o640))?)?;
    let len = f.metadata()?.len();
    if len == 0 {
        f.write_all(format!("{HEADER}\n").as_bytes())?;
    } else if !ends_with_newline(&f)? {
        // A crash tore the last line: the next record starts on its own line.
        f.write_all(b"\n")?;
    }
    Ok(f)
}

fn open_read(root: &OwnedFd) -> io::Result<Option<File>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    match rustix::fs::openat(root, LEDGER, flags, Mode::empty()) {
        Ok(fd) => regular(fd).map(Some),
        Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
        Err(e) => Err(io::Error::new(io::Error::from(e).kind(), format!("cannot open the archive ledger {LEDGER}: {e}"))),
    }
}

fn regular(fd: OwnedFd) -> io::Result<File> {
    let f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!("the archive ledger {LEDGER} is not a regular file: move it away and reload")));
    }
    Ok(f)
}

/// Whether `f` is still the file named `LEDGER` in `root`.
fn is_the_ledger(f: &File, root: &OwnedFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(held) = f.metadata() else { return false };
    rustix::fs::statat(root, LEDGER, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| (st.st_dev, st.st_ino) == (held.dev(), held.ino()))
}

fn ends_with_newline(f: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8];
    f.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] == b'\n')
}

/// Calls `f` on each whole line of the first `limit` bytes: a line without its newline is torn, and a
/// line over `MAX_LINE` is no record; both are skipped, and neither is held in memory whole.
fn for_each_line(file: File, limit: u64, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 16, file.take(limit));
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        let (chunk, ends) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = ends.unwrap_or(buf.len());
        r.consume(used);
        if ends.is_some() {
            if !too_long {
                f(&line);
            }
            line.clear();
            too_long = false;
        }
    }
}

/// The key of the regular file at `rel` beneath `root`, reached without links.
pub fn key_at(root: &OwnedFd, rel: &Path) -> Option<FileKey> {
    let fd = beneath::open_beneath(root, rel, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).ok()?;
    let m = Meta::of(&fd).ok()?;
    (m.kind == FileType::RegularFile).then_some(m.key)
}

/// Every archive folder the config names, pinned; one value per path for the life of the process, so
/// that the sink's moves and the sweeps share one ledger lock.
#[derive(Debug, Clone)]
pub struct ArchiveFolders {
    folders: Arc<Mutex<HashMap<PathBuf, Arc<ArchiveFolder>>>>,
    /// A notice per file recorded in any of them (coalesced), for capped folders.
    placed: (crossbeam_channel::Sender<()>, crossbeam_channel::Receiver<()>),
}

impl Default for ArchiveFolders {
    fn default() -> Self {
        ArchiveFolders { folders: Arc::default(), placed: crossbeam_channel::bounded(1) }
    }
}

impl ArchiveFolders {
    /// Pins every done_dir and quarantine of `config` (again, for folders pinned before: a reload is
    /// the operator saying which folder the path means now).
    pub fn pin(&self, config: &Config) {
        let inboxes: Vec<PathBuf> = config.inboxes.iter().map(|i| i.path.clone()).collect();
        let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        for path in archive_paths(config) {
            match folders.get(&path) {
                Some(f) => f.repin(inboxes.clone()),
                None => {
                    let mut f = ArchiveFolder::new(&path, inboxes.clone());
                    f.placed = Some(self.placed.0.clone());
                    folders.insert(path.clone(), Arc::new(f));
                }
            }
        }
    }

    /// The folder pinned for `path` (None if no config named it).
    pub fn get(&self, path: &Path) -> Option<Arc<ArchiveFolder>> {
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).get(path).cloned()
    }

    /// Ready after a file was recorded in one of the folders (a notice per burst, not per file).
    pub fn placed(&self) -> crossbeam_channel::Receiver<()> {
        self.placed.1.clone()
    }

    /// The pinned folder `path` lies in (a route's folder below its fixed part); archive folders never
    /// nest, so there is at most one.
    pub fn containing(&self, path: &Path) -> Option<Arc<ArchiveFolder>> {
        let folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        folders.iter().filter(|(root, _)| path.starts_with(root)).max_by_key(|(root, _)| root.as_os_str().len()).map(|(_, f)| f.clone())
    }
}

/// Every done_dir and quarantine of `config`, and the fixed folder of every route's `to`, each once.
pub fn archive_paths(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for ib in &config.inboxes {
        let done = match &ib.on_done {
            OnDone::Move(d) => Some(d),
            _ => None,
        };
        for p in done.into_iter().chain(ib.quarantine.as_ref()) {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    for root in config.routes.iter().filter_map(|r| r.to.as_ref()).map(|t| &t.root) {
        if !out.contains(root) {
            out.push(root.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key(path: &Path) -> FileKey {
        Meta::at(rustix::fs::CWD, path).unwrap().key
    }

    fn archived(paths: &[(&Path, &str)]) -> HashSet<Archived> {
        paths.iter().map(|(p, rel)| (key(p), PathBuf::from(rel))).collect()
    }

    #[test]
    fn entries_round_trip_whatever_the_name() {
        for name in ["a.jpg", "cam 1/IMG\n0001~2.jpg", "\\x41 weird\\", "ü/\u{1b}[31m.png"] {
            let e = Entry { time: 7, key: FileKey { dev: 1, ino: 2, size: 3, mtime_ns: -4, btime_ns: 5 }, rel: PathBuf::from(name) };
            let line = e.line();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "{name:?}");
            assert_eq!(Entry::parse(line.strip_suffix(b"\n").unwrap()), Some(e), "{name:?}");
        }
        for torn in ["7 1 2 3 4", "7 1 2 3 -4 5", "x 1 2 3 4 5 a", "7 1 2 3 4 5 a b", "7 1 2 3 4 5 \\x4", "7 1 2 3 4 5 ../x", "7 1 2 3 4 5 /etc/x", ""] {
            assert_eq!(Entry::parse(torn.as_bytes()), None, "{torn:?}");
        }
    }

    #[test]
    fn a_file_that_reuses_an_archived_inode_is_not_the_archived_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jpg");
        std::fs::write(&p, b"archived").unwrap();
        let before = key(&p);
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20)); // birth times one clock tick apart at least
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"replaced").unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        let after = key(&p);
        assert_eq!((after.size, after.mtime_ns), (before.size, before.mtime_ns));
        assert_ne!(after, before, "same size and mtime, maybe the same inode: the birth time tells them apart");
    }

    #[test]
    fn records_survive_reopening_and_a_torn_or_huge_line_matches_nothing() {
        let d = tempfile::tempdir().unwrap();
        let folder = ArchiveFolder::new(d.path(), vec![]);
        let root = folder.root().unwrap();
        std::fs::write(d.path().join("a.jpg"), b"a").unwrap();
        std::fs::write(d.path().join("b.jpg"), b"bb").unwrap();
        let (a, b) = (key(&d.path().join("a.jpg")), key(&d.path().join("b.jpg")));
        folder.record(&root, &[(a, Path::new("a.jpg"))]).unwrap();
        let mut f = File::options().append(true).open(d.path().join(LEDGER)).unwrap();
        f.write_all(&vec![b'7'; 3 * MAX_LINE]).unwrap();
        f.write_all(b"\n").unwrap();
        // A crash mid-append: half a record for b.
        let half = Entry { time: 1, key: b, rel: "b.jpg".into() }.line();
        f.write_all(&half[..half.len() / 2]).unwrap();
        let again = ArchiveFolder::new(d.path(), vec![]);
        let root = again.root().unwrap();
        let both = archived(&[(&d.path().join("a.jpg"), "a.jpg"), (&d.path().join("b.jpg"), "b.jpg")]);
        assert_eq!(again.recorded(&root, &both).unwrap().len(), 1);
        again.record(&root, &[(b, Path::new("b.jpg"))]).unwrap();
        assert_eq!(again.recorded(&root, &both).unwrap(), both);
        // The key alone is not enough: the same file under another name is not what was archived.
        let elsewhere: HashSet<Archived> = [(a, PathBuf::from("renamed.jpg"))].into();
        assert!(again.recorded(&root, &elsewhere).unwrap().is_empty());
        let text = std::fs::read(d.path().join(LEDGER)).unwrap();
        assert!(text.starts_with(b"labeld-archive 1\n"));
    }

    #[test]
    fn compaction_drops_records_of_files_gone_or_changed_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let folder = ArchiveFolder::new(d.path(), vec![]);
        let root = folder.root().unwrap();
        std::fs::create_dir(d.path().join("cam")).unwrap();
        let names = ["cam/a.jpg", "b.jpg", "c.jpg"];
        for n in names {
            std::fs::write(d.path().join(n), n).unwrap();
        }
        let keys: Vec<FileKey> = names.iter().map(|n| key(&d.path().join(n))).collect();
        // Recorded long ago (compaction keeps fresh records whatever it finds).
        let old = |k: FileKey, rel: &str| Entry { time: 1000, key: k, rel: rel.into() }.line();
        let mut f = File::options().append(true).open(d.path().join(LEDGER)).unwrap();
        for (k, rel) in keys.iter().zip(names) {
            f.write_all(&old(*k, rel)).unwrap();
        }
        f.write_all(&old(keys[0], "cam/a.jpg")).unwrap(); // a duplicate
        std::fs::remove_file(d.path().join("b.jpg")).unwrap();
        std::fs::write(d.path().join("c.jpg"), b"edited since").unwrap();
        assert!(folder.adopted(&root).unwrap(), "a folder labeld made has nothing to adopt");
        assert!(folder.compaction_due(SystemTime::now()));
        assert_eq!(folder.compact(&root).unwrap(), (1, 3));
        assert!(!folder.compaction_due(SystemTime::now()));
        let all: HashSet<Archived> = keys.iter().zip(names).map(|(k, n)| (*k, PathBuf::from(n))).collect();
        assert_eq!(folder.recorded(&root, &all).unwrap(), [(keys[0], PathBuf::from("cam/a.jpg"))].into());
        assert!(folder.adopted(&root).unwrap(), "the adoption mark survives compaction");
        // Appends after a compaction go to the new file.
        folder.record(&root, &[(keys[2], Path::new("c.jpg"))]).unwrap();
        assert_eq!(folder.recorded(&root, &all).unwrap().len(), 2);
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn records_made_during_a_compaction_are_kept_and_a_ledger_replaced_meanwhile_is_left_as_it_is() {
        let d = tempfile::tempdir().unwrap();
        let folder = ArchiveFolder::new(d.path(), vec![]);
        let root = folder.root().unwrap();
        let a = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, btime_ns: 5 }; // fresh records are kept whatever is at their path
        folder.record(&root, &[(a, Path::new("a.jpg"))]).unwrap();
        let draft = folder.draft(&root).unwrap().unwrap();
        let b = FileKey { size: 30, ..a };
        folder.record(&root, &[(b, Path::new("b.jpg"))]).unwrap();
        // A failed write left half a record behind it.
        let half = Entry { time: 1, key: a, rel: "c.jpg".into() }.line();
        File::options().append(true).open(d.path().join(LEDGER)).unwrap().write_all(&half[..10]).unwrap();
        assert_eq!(folder.install(&root, draft).unwrap(), (3, 0));
        let c = FileKey { size: 300, ..a };
        folder.record(&root, &[(c, Path::new("c.jpg"))]).unwrap();
        let want: HashSet<Archived> = [(a, "a.jpg".into()), (b, "b.jpg".into()), (c, "c.jpg".into())].into();
        assert_eq!(folder.recorded(&root, &want).unwrap(), want);
        // Another process compacts (renames a new ledger in) while this one drafts: this one gives up.
        let draft = folder.draft(&root).unwrap().unwrap();
        let copy = d.path().join("copy");
        std::fs::copy(d.path().join(LEDGER), &copy).unwrap();
        std::fs::rename(&copy, d.path().join(LEDGER)).unwrap();
        assert!(folder.install(&root, draft).is_err());
        assert_eq!(folder.recorded(&root, &want).unwrap(), want);
    }

    #[test]
    fn a_ledger_deleted_or_replaced_while_running_is_written_anew_not_into_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let folder = ArchiveFolder::new(d.path(), vec![]);
        let root = folder.root().unwrap();
        let a = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, btime_ns: 5 };
        folder.record(&root, &[(a, Path::new("a.jpg"))]).unwrap();
        std::fs::remove_file(d.path().join(LEDGER)).unwrap();
        let b = FileKey { size: 30, ..a };
        folder.record(&root, &[(b, Path::new("b.jpg"))]).unwrap();
        let want: HashSet<Archived> = [(b, "b.jpg".into())].into();
        assert_eq!(folder.recorded(&root, &want).unwrap(), want);
    }

    #[test]
    fn a_ledger_that_is_a_fifo_or_a_folder_is_refused_at_once_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("theirs.txt"), b"x").unwrap(); // not a new folder: no ledger made at pinning
        let c = std::ffi::CString::new(d.path().join(LEDGER).as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let folder = ArchiveFolder::new(d.path(), vec![]);
        let root = folder.root().unwrap();
        let a = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, btime_ns: 5 };
        let e = folder.record(&root, &[(a, Path::new("a.jpg"))]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(folder.mark_adopted(&root).is_err());
        assert!(folder.adopted(&root).is_err());
        assert!(folder.recorded(&root, &[(a, PathBuf::from("a.jpg"))].into()).is_err());
    }

    #[test]
    fn a_folder_replaced_by_a_link_is_refused_until_pinned_again() {
        let d = tempfile::tempdir().unwrap();
        let (done, elsewhere) = (d.path().join("done"), d.path().join("elsewhere"));
        std::fs::create_dir(&elsewhere).unwrap();
        let folder = ArchiveFolder::new(&done, vec![]);
        assert!(done.is_dir(), "created at pinning");
        folder.root().unwrap();
        std::fs::rename(&done, d.path().join("done.real")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &done).unwrap();
        let e = folder.root().unwrap_err().to_string();
        assert!(e.contains("symbolic link now"), "{e}");
        std::fs::remove_file(&done).unwrap();
        std::fs::rename(d.path().join("done.real"), &done).unwrap();
        assert!(folder.root().is_err(), "refused until a reload, even once the folder is back");
        folder.repin(vec![]);
        folder.root().unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.path().join("link")).unwrap();
        let linked = ArchiveFolder::new(&d.path().join("link"), vec![]);
        assert!(linked.root().unwrap_err().to_string().contains("symbolic link"));
    }

    #[test]
    fn a_folder_that_appears_later_is_checked_against_the_inboxes_before_it_is_used() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        std::fs::write(d.path().join("mnt"), b"a file where the mount will be").unwrap();
        let folder = ArchiveFolder::new(&d.path().join("mnt/done"), vec![inbox.clone()]);
        assert!(folder.root().is_err());
        std::fs::remove_file(d.path().join("mnt")).unwrap();
        std::os::unix::fs::symlink(&inbox, d.path().join("mnt")).unwrap();
        let e = folder.root().unwrap_err().to_string();
        assert!(e.contains("inside the inbox"), "{e}");
        assert!(!inbox.join("done").exists(), "nothing was created inside the inbox");
    }
}
