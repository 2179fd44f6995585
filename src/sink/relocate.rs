//! Moving a labelled image and its sidecar out of the inbox (`on_done = "move"`, quarantine) without
//! ever replacing a file already there: cameras reuse names (IMG_0001.jpg), so a taken name gets a
//! numbered suffix before the extension (`IMG_0001~1.jpg`, `~2`, …) and the sidecar follows under the
//! matching name (`IMG_0001~1.jpg.json`).
//!
//! "Not taken" is decided by the kernel, not by a check before the move: `renameat2(RENAME_NOREPLACE)`
//! on the same filesystem; across filesystems a copy into an `O_CREAT|O_EXCL` temp file beside the
//! destination, then the same no-replace rename. The source is reached beneath the inbox root without
//! following links (`beneath`), so a folder swapped for a link cannot make labeld move a file from
//! outside the inbox; the destination folder is the operator's own.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::sidecar::sidecar_path;
use crate::beneath::{self, Beneath};

/// More images of one name than this in one folder is an operator problem, not a reason to loop.
const MAX_SUFFIX: u32 = 100_000;

/// Moves `image` from `inbox` to the same relative path under `dir` (quarantine, done_dir), creating
/// folders as needed, under the first free numbered name; returns where it went.
pub fn move_under(inbox: &Path, dir: &Path, image: &Path) -> io::Result<PathBuf> {
    let wanted = path_under(inbox, dir, image)?;
    let src = Beneath::new(inbox, image)?;
    let src_dir = src.open_parent()?;
    let dest_dir = open_dest_dir(&wanted)?;
    for n in 0..MAX_SUFFIX {
        let dest = numbered(&wanted, n);
        // A stray sidecar on the name would be taken for this image's.
        if fs::symlink_metadata(sidecar_path(&dest)).is_ok() {
            continue;
        }
        match move_at(&src_dir, src.file_name(), &dest_dir, file_name(&dest)) {
            Ok(()) => return Ok(dest),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot move {} to {}: {e}", image.display(), dest.display()))),
        }
    }
    Err(io::Error::other(format!("{MAX_SUFFIX} files named like {} already: clear that folder", wanted.display())))
}

/// Moves the sidecar of `image` (in `inbox`) beside `dest`, where the image went, and makes both
/// moves durable.
pub fn move_sidecar(inbox: &Path, image: &Path, dest: &Path) -> io::Result<()> {
    let (from, to) = (sidecar_path(image), sidecar_path(dest));
    let src = Beneath::new(inbox, &from)?;
    let src_dir = src.open_parent()?;
    let dest_dir = open_dest_dir(&to)?;
    move_at(&src_dir, src.file_name(), &dest_dir, file_name(&to))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot move {} to {}: {e}", from.display(), to.display())))?;
    beneath::sync_dir(&dest_dir)?;
    beneath::sync_dir(&src_dir)
}

/// Deletes `path` (in `inbox`) without following a link on the way (`on_done = "delete"`).
pub fn remove(inbox: &Path, path: &Path) -> io::Result<()> {
    let at = Beneath::new(inbox, path)?;
    Ok(rustix::fs::unlinkat(at.open_parent()?, at.file_name(), AtFlags::empty())?)
}

/// The folder `dest` goes in, created if needed (it is the operator's: followed as configured).
fn open_dest_dir(dest: &Path) -> io::Result<OwnedFd> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    Ok(rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

fn file_name(p: &Path) -> &OsStr {
    p.file_name().unwrap_or_default()
}

/// `image`'s path relative to `inbox`, placed under `dir`.
pub fn path_under(inbox: &Path, dir: &Path, image: &Path) -> io::Result<PathBuf> {
    let rel = image
        .strip_prefix(inbox)
        .map_err(|_| io::Error::other(format!("{} is not in inbox {}", image.display(), inbox.display())))?;
    Ok(dir.join(rel))
}

/// `d/IMG_0001.jpg` and n → `d/IMG_0001~n.jpg`; n = 0 leaves the name as it is.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let (stem, ext) = split_name(path);
    let mut name = stem;
    name.extend_from_slice(format!("~{n}").as_bytes());
    name.extend_from_slice(&ext);
    path.with_file_name(OsString::from_vec(name))
}

/// Where a crash left the image whose sidecar did not follow it to `wanted`'s folder: of `wanted` and
/// its numbered names, the file without a sidecar that arrived last (newest ctime; a move sets it).
pub fn moved_without_sidecar(wanted: &Path) -> Option<PathBuf> {
    let dir = wanted.parent()?;
    let mut best: Option<((i64, i64), PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if !is_numbered_of(&p, wanted) || fs::symlink_metadata(sidecar_path(&p)).is_ok() {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        let arrived = (m.ctime(), m.ctime_nsec());
        if m.is_file() && best.as_ref().is_none_or(|(t, _)| arrived > *t) {
            best = Some((arrived, p));
        }
    }
    best.map(|(_, p)| p)
}

/// True for `wanted` itself and for `numbered(wanted, n)` with any n ≥ 1.
fn is_numbered_of(p: &Path, wanted: &Path) -> bool {
    if p == wanted {
        return true;
    }
    let (stem, ext) = split_name(wanted);
    let name = p.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let middle = name.strip_prefix(stem.as_slice()).and_then(|r| r.strip_prefix(b"~")).and_then(|r| r.strip_suffix(ext.as_slice()));
    middle.is_some_and(|d| !d.is_empty() && d[0] != b'0' && d.iter().all(u8::is_ascii_digit))
}

/// A file name as (stem, extension with its dot): `a.tar.jpg` → (`a.tar`, `.jpg`); `.x` → (`.x`, ``).
fn split_name(path: &Path) -> (Vec<u8>, Vec<u8>) {
    let stem = path.file_stem().map(|s| s.as_bytes().to_vec()).unwrap_or_default();
    let ext = path.extension().map(|e| [b".", e.as_bytes()].concat()).unwrap_or_default();
    (stem, ext)
}

/// Moves `from` to `to` (names in open folders), failing with `AlreadyExists` if `to` exists;
/// across filesystems copies, then removes `from`.
fn move_at(from_dir: &OwnedFd, from: &OsStr, to_dir: &OwnedFd, to: &OsStr) -> io::Result<()> {
    match rename_no_replace(from_dir, from, to_dir, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_no_replace(from_dir, from, to_dir, to)?;
            Ok(rustix::fs::unlinkat(from_dir, from, AtFlags::empty())?)
        }
        other => other,
    }
}

fn rename_no_replace(from_dir: &OwnedFd, from: &OsStr, to_dir: &OwnedFd, to: &OsStr) -> io::Result<()> {
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        // A filesystem without RENAME_NOREPLACE (some network ones): link(2) refuses an existing name too.
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty())?;
            Ok(rustix::fs::unlinkat(from_dir, from, AtFlags::empty())?)
        }
        other => Ok(other?),
    }
}

/// Copies `from` into a fresh temp file beside `to` (contents, permissions, mtime, fsynced), then
/// renames it to `to` unless that exists. The source is left in place.
fn copy_no_replace(from_dir: &OwnedFd, from: &OsStr, to_dir: &OwnedFd, to: &OsStr) -> io::Result<()> {
    let read = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let mut src = File::from(rustix::fs::openat(from_dir, from, read, Mode::empty())?);
    let meta = src.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let (tmp, mut out) = create_temp_in(to_dir)?;
    let result = (|| {
        io::copy(&mut src, &mut out)?;
        out.set_permissions(meta.permissions())?;
        // Keep the original mtime: the copy is the same image.
        out.set_modified(meta.modified()?)?;
        out.sync_all()?;
        rename_no_replace(to_dir, &tmp, to_dir, to)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(to_dir, &tmp, AtFlags::empty());
    }
    result
}

/// `.labeld-move-<pid>-<n>.part` in `dir`, created with O_CREAT|O_EXCL (a dotfile: never an image).
fn create_temp_in(dir: &OwnedFd) -> io::Result<(OsString, File)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for n in 0..MAX_SUFFIX {
        let tmp = OsString::from(format!(".labeld-move-{}-{n}.part", std::process::id()));
        match rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((tmp, File::from(fd))),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("no free temp name for a copy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_names_go_before_the_extension() {
        assert_eq!(numbered(Path::new("/d/IMG_0001.jpg"), 0), PathBuf::from("/d/IMG_0001.jpg"));
        assert_eq!(numbered(Path::new("/d/IMG_0001.jpg"), 2), PathBuf::from("/d/IMG_0001~2.jpg"));
        assert_eq!(numbered(Path::new("/d/a.tar.png"), 1), PathBuf::from("/d/a.tar~1.png"));
        assert_eq!(numbered(Path::new("/d/noext"), 3), PathBuf::from("/d/noext~3"));
        assert!(is_numbered_of(Path::new("/d/IMG_0001~12.jpg"), Path::new("/d/IMG_0001.jpg")));
        assert!(!is_numbered_of(Path::new("/d/IMG_0001~01.jpg"), Path::new("/d/IMG_0001.jpg")));
        assert!(!is_numbered_of(Path::new("/d/IMG_0001~.jpg"), Path::new("/d/IMG_0001.jpg")));
        assert!(!is_numbered_of(Path::new("/d/IMG_0001~1.png"), Path::new("/d/IMG_0001.jpg")));
    }

    #[test]
    fn a_taken_name_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done) = (dir.path().join("in"), dir.path().join("done"));
        fs::create_dir_all(&inbox).unwrap();
        for content in [b"one", b"two", b"thr"] {
            let img = inbox.join("IMG_0001.jpg");
            fs::write(&img, content).unwrap();
            fs::write(sidecar_path(&img), content).unwrap();
            let dest = move_under(&inbox, &done, &img).unwrap();
            move_sidecar(&inbox, &img, &dest).unwrap();
        }
        for (n, content) in [(0, b"one"), (1, b"two"), (2, b"thr")] {
            let img = numbered(&done.join("IMG_0001.jpg"), n);
            assert_eq!(fs::read(&img).unwrap(), content);
            assert_eq!(fs::read(sidecar_path(&img)).unwrap(), content);
        }
        assert_eq!(fs::read_dir(&inbox).unwrap().count(), 0);
    }

    #[test]
    fn a_folder_swapped_for_a_link_is_not_followed_out_of_the_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done, outside) = (dir.path().join("in"), dir.path().join("done"), dir.path().join("outside"));
        fs::create_dir_all(&inbox).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("a.jpg"), b"not yours").unwrap();
        std::os::unix::fs::symlink(&outside, inbox.join("cam")).unwrap();
        assert!(move_under(&inbox, &done, &inbox.join("cam/a.jpg")).is_err());
        assert_eq!(fs::read(outside.join("a.jpg")).unwrap(), b"not yours");
    }

    #[test]
    fn the_image_a_crash_parted_from_its_sidecar_is_the_last_moved_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = dir.path().join("IMG_0001.jpg");
        fs::write(&wanted, b"a").unwrap();
        fs::write(sidecar_path(&wanted), b"{}").unwrap();
        fs::write(numbered(&wanted, 1), b"b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(numbered(&wanted, 2), b"c").unwrap();
        fs::write(dir.path().join("IMG_0001~3.png"), b"d").unwrap();
        assert_eq!(moved_without_sidecar(&wanted), Some(numbered(&wanted, 2)));
        fs::write(sidecar_path(&numbered(&wanted, 2)), b"{}").unwrap();
        assert_eq!(moved_without_sidecar(&wanted), Some(numbered(&wanted, 1)));
    }

    #[test]
    fn a_copy_across_filesystems_refuses_a_taken_name() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"old").unwrap();
        let fd: OwnedFd = File::open(dir.path()).unwrap().into();
        let copy = || copy_no_replace(&fd, OsStr::new("a"), &fd, OsStr::new("b"));
        assert_eq!(copy().unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"old");
        fs::remove_file(&to).unwrap();
        copy().unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temp file left");
    }
}
