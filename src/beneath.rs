//! Invariant I6 (docs/design.md): no path beneath an inbox is resolved through a link.
//!
//! The one way labeld touches files inside an inbox: every open, stat and rename resolves the path
//! relative to the inbox root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symbolic
//! link at any component (a planted link, a linked folder, a folder swapped for a link mid-flight) is
//! refused by the kernel instead of followed out of the inbox. The root itself is the operator's
//! configured path and is followed like any path in the config.
//!
//! Files are opened non-blocking (a FIFO never blocks a thread) and their type is checked on the open
//! descriptor. New files are created `O_CREAT | O_EXCL` under unpredictable names, then renamed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::vocab::Identity;

/// A path inside an inbox, split into the root (followed as configured) and the part below it
/// (never followed through a link).
#[derive(Debug, Clone, Copy)]
pub struct Beneath<'a> {
    root: &'a Path,
    rel: &'a Path,
}

impl<'a> Beneath<'a> {
    /// `path` must lie under `root` lexically and have no `..` or `.` components below it.
    pub fn new(root: &'a Path, path: &'a Path) -> io::Result<Beneath<'a>> {
        let rel = path.strip_prefix(root).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not inside {}", path.display(), root.display()))
        })?;
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a plain path below its inbox", path.display())));
        }
        Ok(Beneath { root, rel })
    }

    fn open_root(&self) -> io::Result<OwnedFd> {
        let root = if self.root.as_os_str().is_empty() { Path::new(".") } else { self.root };
        let f = File::options().read(true).custom_flags_dir().open(root)?;
        Ok(f.into())
    }

    fn open_with(&self, flags: OFlags, mode: Mode, rel: &Path) -> io::Result<OwnedFd> {
        open_beneath(&self.open_root()?, rel, flags, mode)
    }

    /// Opens the file for reading without following a link and without blocking on a FIFO.
    pub fn open_read(&self) -> io::Result<File> {
        Ok(self.open_with(OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY, Mode::empty(), self.rel)?.into())
    }

    /// The file's metadata (of a link itself, never its target), or NotFound.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        let fd = self.open_with(OFlags::PATH | OFlags::NOFOLLOW, Mode::empty(), self.rel)?;
        File::from(fd).metadata()
    }

    /// The folder holding the file.
    pub fn open_parent(&self) -> io::Result<OwnedFd> {
        let parent = self.rel.parent().unwrap_or(Path::new(""));
        self.open_with(OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW, Mode::empty(), parent)
    }

    pub fn file_name(&self) -> &'a std::ffi::OsStr {
        self.rel.file_name().unwrap_or_default()
    }

    /// Reads the whole file (at most `max` bytes, else an error naming the size). The identity is taken
    /// from the open descriptor before and after reading: if they differ the file was being written
    /// while read, which is reported as `Changing`.
    pub fn read(&self, max: u64) -> Result<(Vec<u8>, Identity), ReadError> {
        let file = self.open_read().map_err(ReadError::Open)?;
        let before = file.metadata().map_err(ReadError::Io)?;
        if !before.file_type().is_file() {
            return Err(ReadError::NotRegular(kind_of(before.file_type())));
        }
        if before.len() > max {
            return Err(ReadError::TooBig(before.len()));
        }
        let mut bytes = Vec::with_capacity(before.len() as usize);
        (&file).take(max + 1).read_to_end(&mut bytes).map_err(ReadError::Io)?;
        let after = file.metadata().map_err(ReadError::Io)?;
        if bytes.len() as u64 > max {
            return Err(ReadError::TooBig(bytes.len() as u64));
        }
        let mut id = Identity::of(&after);
        if Identity::of(&before) != id || bytes.len() as u64 != after.len() {
            return Err(ReadError::Changing);
        }
        id.xxh3 = Some(xxhash_rust::xxh3::xxh3_64(&bytes));
        Ok((bytes, id))
    }
}

/// Opens `rel` beneath the folder open as `root`: a link at any component, a `..` or an absolute path is
/// refused by the kernel, never followed. An empty `rel` is the root itself.
pub fn open_beneath(root: &OwnedFd, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    Ok(rustix::fs::openat2(root, rel, flags | OFlags::CLOEXEC, mode, resolve)?)
}

/// Opens the folder `rel` beneath `root`, creating each missing component (mode 0755): none may be a
/// link, a file or a mount's way out.
pub fn create_dirs_beneath(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
    let mut dir = open_beneath(root, Path::new(""), dir_flags, Mode::empty())?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a plain relative path", rel.display())));
        };
        match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = open_beneath(&dir, Path::new(name), dir_flags, Mode::empty())?;
    }
    Ok(dir)
}

/// Where the folder open as `dir` is now, as a path under `root` (the root spelled as configured):
/// `None` if it was deleted, moved out of `root`, or can only be reached through a link. Lets a result
/// follow an image whose folder was renamed while it was being labelled.
pub fn folder_path(dir: &OwnedFd, root: &Path) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    let now = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    let real_root = std::fs::canonicalize(if root.as_os_str().is_empty() { Path::new(".") } else { root }).ok()?;
    let candidate = root.join(now.strip_prefix(&real_root).ok()?);
    // The kernel's name for it may be stale (" (deleted)") or reached through a link: check that the
    // path leads to this very folder without one.
    let there = Beneath::new(root, &candidate).ok()?.metadata().ok()?;
    let held = rustix::fs::fstat(dir).ok()?;
    (there.is_dir() && there.dev() == held.st_dev && there.ino() == held.st_ino).then_some(candidate)
}

/// The inbox root `path` lies under (the longest match), or, for a path in no inbox (`classify`), its
/// own folder: then only the file name itself is guarded against links.
pub fn root_of<'a>(roots: impl IntoIterator<Item = &'a Path>, path: &'a Path) -> &'a Path {
    roots
        .into_iter()
        .filter(|r| path.starts_with(r) && path != *r)
        .max_by_key(|r| r.as_os_str().len())
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new("/")))
}

/// Why `Beneath::read` failed; the caller decides what is a verdict on the image and what a fault.
#[derive(Debug)]
pub enum ReadError {
    /// The open itself failed (NotFound, ELOOP for a link, EXDEV/ELOOP for a path through a link, EACCES…).
    Open(io::Error),
    Io(io::Error),
    NotRegular(&'static str),
    TooBig(u64),
    /// Size or times changed while reading: still being written.
    Changing,
}

/// What kind of non-regular file this is, for error records and log lines.
pub fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symbolic link (not followed)"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// True when the open failed because a component of the path is a symbolic link.
pub fn is_link_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV))
}

/// Writes `bytes` as `name` in the folder `dir` (an open descriptor): a temp file created
/// `O_CREAT | O_EXCL | O_NOFOLLOW` under a random dot-name (which the watcher ignores), fsynced, then
/// renamed over `name`. A link planted at any name cannot redirect the write; a rename replaces a link
/// at `name` itself, never its target. The caller syncs `dir` when the rename must be durable.
pub fn write_atomic_in(dir: &OwnedFd, name: &std::ffi::OsStr, bytes: &[u8]) -> io::Result<()> {
    let (tmp, mut f) = create_temp(dir)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_data()?;
        rustix::fs::renameat(dir, &tmp, dir, name)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
    }
    result
}

/// A new temp file in `dir` under an unpredictable dot-name (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0644),
/// for the caller to fill, sync and rename (or unlink on failure).
pub fn create_temp(dir: &OwnedFd) -> io::Result<(PathBuf, File)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    loop {
        let tmp = temp_name();
        match rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => return Ok((tmp, File::from(fd))),
            Err(e) if e == rustix::io::Errno::EXIST => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The device and inode of `name` in `dir` (a link itself, never its target).
pub fn key_in(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok((st.st_dev, st.st_ino))
}

/// Makes renames in the folder durable.
pub fn sync_dir(dir: &OwnedFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

/// `.labeld-<pid>-<16 hex>.tmp`: short (so any sidecar name fits), unpredictable (so it cannot be
/// planted in advance), and naming its writer (so a rescan never removes a write in progress).
fn temp_name() -> PathBuf {
    let mut r = [0u8; 8];
    if rustix::rand::getrandom(&mut r, rustix::rand::GetRandomFlags::empty()).is_err() {
        // No entropy source: the O_EXCL create still refuses a planted name; only predictability is lost.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        r = (t.as_nanos() as u64).to_le_bytes();
    }
    PathBuf::from(format!(".labeld-{}-{:016x}{TEMP_SUFFIX}", std::process::id(), u64::from_le_bytes(r)))
}

const TEMP_SUFFIX: &str = ".tmp";

/// A temp file left by an earlier labeld process (a crash mid-write): `.labeld-<pid>-<hex>.tmp` of
/// another pid, or the older `.<name>.json.<pid>.tmp`. This process's own temps are never stale.
pub fn is_stale_temp(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix(".labeld-").and_then(|n| n.strip_suffix(TEMP_SUFFIX)) {
        let Some((pid, hex)) = rest.split_once('-') else { return false };
        let ours = pid.parse::<u32>().ok() == Some(std::process::id());
        return !ours && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(TEMP_SUFFIX)) else {
        return false;
    };
    match rest.rsplit_once('.') {
        Some((stem, pid)) => stem.ends_with(".json") && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

trait DirFlags {
    fn custom_flags_dir(&mut self) -> &mut Self;
}

impl DirFlags for std::fs::OpenOptions {
    fn custom_flags_dir(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECTORY | libc::O_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_link_at_any_component_is_refused_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (inbox, outside) = (d.path().join("inbox"), d.path().join("outside"));
        std::fs::create_dir_all(inbox.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("a.jpg"), b"secret").unwrap();
        std::fs::write(inbox.join("real/a.jpg"), b"mine").unwrap();
        symlink(&outside, inbox.join("linked")).unwrap();
        symlink(outside.join("a.jpg"), inbox.join("b.jpg")).unwrap();
        let read = |p: &Path| Beneath::new(&inbox, p).unwrap().read(1 << 20);
        assert_eq!(read(&inbox.join("real/a.jpg")).unwrap().0, b"mine");
        for p in [inbox.join("linked/a.jpg"), inbox.join("b.jpg")] {
            match read(&p) {
                Err(ReadError::Open(e)) => assert!(is_link_refusal(&e), "{p:?}: {e}"),
                other => panic!("{p:?} was read through a link: {other:?}"),
            }
        }
        assert!(Beneath::new(&inbox, &inbox.join("real/../../outside/a.jpg")).is_err());
        assert!(Beneath::new(&inbox, &outside.join("a.jpg")).is_err());
    }

    #[test]
    fn a_held_folder_is_found_after_a_rename_but_not_outside_the_root_or_after_deletion() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        std::fs::create_dir_all(inbox.join("batch")).unwrap();
        // The root as configured, reached through a link: results keep that spelling.
        let spelled = d.path().join("via-link");
        symlink(&inbox, &spelled).unwrap();
        let dir = Beneath::new(&spelled, &spelled.join("batch/a.jpg")).unwrap().open_parent().unwrap();
        assert_eq!(folder_path(&dir, &spelled), Some(spelled.join("batch")));
        std::fs::rename(inbox.join("batch"), inbox.join("renamed")).unwrap();
        assert_eq!(folder_path(&dir, &spelled), Some(spelled.join("renamed")));
        std::fs::rename(inbox.join("renamed"), d.path().join("moved-out")).unwrap();
        assert_eq!(folder_path(&dir, &spelled), None, "moved out of the inbox");
        std::fs::remove_dir(d.path().join("moved-out")).unwrap();
        assert_eq!(folder_path(&dir, &spelled), None, "deleted");
    }

    #[test]
    fn a_fifo_is_reported_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("f.jpg");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        match Beneath::new(d.path(), &fifo).unwrap().read(100) {
            Err(ReadError::NotRegular(k)) => assert_eq!(k, "FIFO"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn atomic_write_replaces_a_planted_link_and_never_writes_through_it() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("results.csv");
        std::fs::write(&target, b"precious").unwrap();
        let dir = d.path().join("inbox");
        std::fs::create_dir(&dir).unwrap();
        symlink(&target, dir.join("a.jpg.json")).unwrap();
        let fd: OwnedFd = File::open(&dir).unwrap().into();
        write_atomic_in(&fd, "a.jpg.json".as_ref(), b"{}").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(dir.join("a.jpg.json")).unwrap().is_file());
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.jpg.json")], "no temp file left");
    }

    #[test]
    fn only_other_processes_temp_files_are_stale() {
        assert!(is_stale_temp(".labeld-1-0123456789abcdef.tmp"));
        assert!(is_stale_temp(".a.jpg.json.1234.tmp"));
        let ours = temp_name().to_string_lossy().into_owned();
        assert!(!is_stale_temp(&ours), "{ours}");
        assert!(ours.len() < 40);
        assert!(!is_stale_temp(".labeld-1-xyz.tmp"));
        assert!(!is_stale_temp("a.jpg"));
    }
}
