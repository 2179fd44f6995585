//! Moving a labelled image and its sidecar out of the inbox (`on_done = "move"`, quarantine) without
//! ever replacing a file already there: cameras reuse names (IMG_0001.jpg), so a taken name gets a
//! numbered suffix before the extension (`IMG_0001~1.jpg`, `~2`, …) and the sidecar follows under the
//! matching name (`IMG_0001~1.jpg.json`).
//!
//! "Not taken" is decided by the kernel, not by a check before the move: `renameat2(RENAME_NOREPLACE)`
//! on the same filesystem; across filesystems a copy into an `O_CREAT|O_EXCL` temp file beside the
//! destination, then the same no-replace rename. The source is reached beneath the inbox root without
//! following links (`beneath`), so a folder swapped for a link cannot make labeld move a file from
//! outside the inbox. The destination is reached beneath the pinned archive folder, also without links,
//! and each file is recorded in that folder's ledger before it appears under its name (invariant I11).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::beneath::{self, Beneath};
use crate::ledger::{ArchiveFolder, FileKey, Meta};
use crate::vocab::sidecar_path;

/// More images of one name than this in one folder is an operator problem, not a reason to loop.
const MAX_SUFFIX: u32 = 100_000;

/// Moves `image` from `inbox` to the same relative path under the archive folder `dest`, creating
/// folders as needed, under the first free numbered name; returns where it went. With `expect` (the
/// device and inode of the file that was labelled), only that very file is moved: another file that
/// took its name meanwhile stays in the inbox (is put back, should it slip in during the move).
pub fn move_under(inbox: &Path, dest: &ArchiveFolder, image: &Path, expect: Option<(u64, u64)>) -> io::Result<PathBuf> {
    let rel = rel_in(inbox, image)?;
    move_into(inbox, dest, image, rel.parent().unwrap_or(Path::new("")), expect)
}

/// How a route places an image in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placing {
    Move,
    Copy,
    /// A hard link; a copy where the folder is on another file system.
    Link,
}

/// Moves `image` from `inbox` into the folder `rel_dir` below the archive folder `dest` (a route's
/// folder), as `move_under` does; returns where it went.
pub fn move_into(inbox: &Path, dest: &ArchiveFolder, image: &Path, rel_dir: &Path, expect: Option<(u64, u64)>) -> io::Result<PathBuf> {
    place_into(inbox, dest, image, rel_dir, expect, Placing::Move)
}

/// Places `image` (in `inbox`) into `rel_dir` below `dest` under the first free numbered name, by
/// `how`; the source stays for a copy or link. Returns where it went.
pub fn place_into(inbox: &Path, dest: &ArchiveFolder, image: &Path, rel_dir: &Path, expect: Option<(u64, u64)>, how: Placing) -> io::Result<PathBuf> {
    if !rel_dir.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a plain folder below {}", rel_dir.display(), dest.path.display())));
    }
    let root = dest.root()?;
    let src = Beneath::new(inbox, image)?;
    let src_dir = src.open_parent()?;
    let dest_dir = beneath::create_dirs_beneath(&root, rel_dir)?;
    for n in 0..MAX_SUFFIX {
        let name = numbered(Path::new(src.file_name()), n);
        // A stray sidecar on the name would be taken for this image's.
        if exists_in(&dest_dir, sidecar_path(&name).as_os_str())? {
            continue;
        }
        let rel_dest = rel_dir.join(&name);
        let record = |key: FileKey| dest.record(&root, &[(key, rel_dest.as_path())]);
        let placed = match how {
            Placing::Move => move_at(&src_dir, src.file_name(), &dest_dir, name.as_os_str(), expect, &record),
            Placing::Copy | Placing::Link => copy_at(&src_dir, src.file_name(), &dest_dir, name.as_os_str(), expect, how == Placing::Link, &record),
        };
        match placed {
            Ok(()) => return Ok(dest.path.join(&rel_dest)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                let verb = match how {
                    Placing::Move => "move",
                    Placing::Copy => "copy",
                    Placing::Link => "link",
                };
                return Err(io::Error::new(e.kind(), format!("cannot {verb} {} to {}: {e}", image.display(), dest.path.join(&rel_dest).display())));
            }
        }
    }
    Err(io::Error::other(format!("{MAX_SUFFIX} files named like {} already: clear that folder", dest.path.join(rel_dir).join(src.file_name()).display())))
}

/// Copies the sidecar of `image` (in `inbox`) beside `dest_image` (where a copy or link of the image
/// went, in `dest`), durably; the inbox's sidecar stays with the inbox's image.
pub fn copy_sidecar(inbox: &Path, image: &Path, dest: &ArchiveFolder, dest_image: &Path) -> io::Result<()> {
    let from = sidecar_path(image);
    let rel_to = sidecar_path(rel_in(&dest.path, dest_image)?);
    let root = dest.root()?;
    let src = Beneath::new(inbox, &from)?;
    let src_dir = src.open_parent()?;
    let dest_dir = beneath::create_dirs_beneath(&root, rel_to.parent().unwrap_or(Path::new("")))?;
    let key = Meta::at(&src_dir, src.file_name())?.key;
    let record = |key: FileKey| dest.record(&root, &[(key, rel_to.as_path())]);
    copy_no_replace(&src_dir, src.file_name(), &dest_dir, file_name(&rel_to), key, &record)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot copy {} to {}: {e}", from.display(), dest.path.join(&rel_to).display())))?;
    beneath::sync_dir(&dest_dir)
}

/// Copies (or hard-links) `from` to `to` without replacing anything there; `record` as for `move_at`.
/// A link checks that what arrived is the file recorded, and takes back one that is not.
fn copy_at(
    from_dir: &OwnedFd,
    from: &OsStr,
    to_dir: &OwnedFd,
    to: &OsStr,
    expect: Option<(u64, u64)>,
    link: bool,
    record: &dyn Fn(FileKey) -> io::Result<()>,
) -> io::Result<()> {
    let m = Meta::at(from_dir, from)?;
    if m.kind != FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if expect.is_some_and(|e| e != (m.key.dev, m.key.ino)) {
        return Err(io::Error::other("another file took its name after it was labelled; that one stays in the inbox"));
    }
    if link && Meta::of(to_dir).is_ok_and(|d| d.key.dev == m.key.dev) {
        // A link is the same file: the key recorded is the key it will have.
        record(m.key)?;
        match rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty()) {
            Ok(()) => {
                if Meta::at(to_dir, to).is_ok_and(|now| now.key == m.key) {
                    return beneath::sync_dir(to_dir);
                }
                // Another file took the source's name between the look and the link: not ours to place.
                rustix::fs::unlinkat(to_dir, to, AtFlags::empty())?;
                return Err(io::Error::other("another file took its name while it was linked; nothing placed"));
            }
            Err(Errno::XDEV) => {}
            Err(e) => return Err(e.into()),
        }
    }
    copy_no_replace(from_dir, from, to_dir, to, m.key, record)?;
    beneath::sync_dir(to_dir)
}

/// Where an earlier copy or link of `image` (the file `key`, labelled as `path`) was placed in
/// `rel_dir` below `dest`, by a run a crash stopped before it noted it: of the image's name and its
/// numbered names there, one whose sidecar describes that image, else one without a sidecar that is
/// that file (a link) or has its size and modification time (a copy). `(path, has sidecar)`.
pub fn placed_before(dest: &ArchiveFolder, rel_dir: &Path, image_name: &OsStr, labelled: &crate::vocab::Record) -> Option<(PathBuf, bool)> {
    let id = labelled.file?;
    let root = dest.root().ok()?;
    let dir = beneath::open_beneath(&root, rel_dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW, Mode::empty()).ok()?;
    let mut bare = None;
    for entry in rustix::fs::Dir::read_from(&dir).ok()?.flatten() {
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        if !is_numbered_of(Path::new(&name), Path::new(image_name)) {
            continue;
        }
        let Ok(m) = Meta::at(&dir, &name) else { continue };
        if m.kind != FileType::RegularFile {
            continue;
        }
        let sidecar = sidecar_path(Path::new(&name));
        let described = beneath::open_beneath(&dir, &sidecar, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())
            .ok()
            .and_then(|fd| {
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut File::from(fd).take(1 << 20), &mut bytes).ok()?;
                serde_json::from_slice::<crate::vocab::Record>(&bytes).ok()
            });
        let same = (m.key.dev, m.key.ino) == (id.dev, id.inode) || (m.key.size, m.key.mtime_ns) == (id.size, id.mtime_ns);
        match described {
            Some(r) if r.path == labelled.path && r.file == labelled.file => return Some((dest.path.join(rel_dir).join(name), true)),
            None if same && !exists_in(&dir, sidecar.as_os_str()).unwrap_or(true) => bare = Some(dest.path.join(rel_dir).join(name)),
            _ => {}
        }
    }
    bare.map(|p| (p, false))
}

/// Moves the sidecar of `image` (in `inbox`) beside `dest_image` (where the image went, in the archive
/// folder `dest`), and makes both moves durable.
pub fn move_sidecar(inbox: &Path, image: &Path, dest: &ArchiveFolder, dest_image: &Path) -> io::Result<()> {
    let from = sidecar_path(image);
    let rel_to = sidecar_path(rel_in(&dest.path, dest_image)?);
    let root = dest.root()?;
    let src = Beneath::new(inbox, &from)?;
    let src_dir = src.open_parent()?;
    let dest_dir = beneath::create_dirs_beneath(&root, rel_to.parent().unwrap_or(Path::new("")))?;
    let record = |key: FileKey| dest.record(&root, &[(key, rel_to.as_path())]);
    move_at(&src_dir, src.file_name(), &dest_dir, file_name(&rel_to), None, &record)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot move {} to {}: {e}", from.display(), dest.path.join(&rel_to).display())))?;
    beneath::sync_dir(&dest_dir)?;
    beneath::sync_dir(&src_dir)
}

/// Deletes `path` (in `inbox`) without following a link on the way (`on_done = "delete"`).
pub fn remove(inbox: &Path, path: &Path) -> io::Result<()> {
    let at = Beneath::new(inbox, path)?;
    Ok(rustix::fs::unlinkat(at.open_parent()?, at.file_name(), AtFlags::empty())?)
}

fn exists_in(dir: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn file_name(p: &Path) -> &OsStr {
    p.file_name().unwrap_or_default()
}

/// `path` relative to `root`, as a plain path (no `..`, not empty).
fn rel_in<'a>(root: &Path, path: &'a Path) -> io::Result<&'a Path> {
    let rel = path.strip_prefix(root).map_err(|_| io::Error::other(format!("{} is not in {}", path.display(), root.display())))?;
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a plain path below {}", path.display(), root.display())));
    }
    Ok(rel)
}

/// `image`'s path relative to `inbox`, placed under `dir`.
pub fn path_under(inbox: &Path, dir: &Path, image: &Path) -> io::Result<PathBuf> {
    Ok(dir.join(rel_in(inbox, image)?))
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

/// Where a crash left the image whose sidecar did not follow it to `wanted` (a path in the archive
/// folder `dest`): of `wanted` and its numbered names, the file without a sidecar that arrived last
/// (newest ctime; a move sets it). Looked for beneath the pinned folder, without links.
pub fn moved_without_sidecar(dest: &ArchiveFolder, wanted: &Path) -> Option<PathBuf> {
    let rel = rel_in(&dest.path, wanted).ok()?;
    let root = dest.root().ok()?;
    let rel_dir = rel.parent().unwrap_or(Path::new(""));
    let dir = beneath::open_beneath(&root, rel_dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW, Mode::empty()).ok()?;
    let mut best: Option<((i64, i64), OsString)> = None;
    for entry in rustix::fs::Dir::read_from(&dir).ok()?.flatten() {
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        if !is_numbered_of(Path::new(&name), Path::new(file_name(rel))) || exists_in(&dir, sidecar_path(Path::new(&name)).as_os_str()).unwrap_or(true) {
            continue;
        }
        let Ok(st) = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) else { continue };
        let arrived = (st.st_ctime, st.st_ctime_nsec as i64);
        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && best.as_ref().is_none_or(|(t, _)| arrived > *t) {
            best = Some((arrived, name));
        }
    }
    best.map(|(_, name)| dest.path.join(rel_dir).join(name))
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
/// across filesystems copies, then takes `from` away. `record` is called with the key the file will
/// have at `to`, and must succeed, before the file appears there. With `expect`, `from` must be that
/// device and inode. What arrives at `to` is checked to be what was recorded: a file that took the
/// name of `from` between the look and the rename is put back into `from`'s folder.
fn move_at(
    from_dir: &OwnedFd,
    from: &OsStr,
    to_dir: &OwnedFd,
    to: &OsStr,
    expect: Option<(u64, u64)>,
    record: &dyn Fn(FileKey) -> io::Result<()>,
) -> io::Result<()> {
    let m = Meta::at(from_dir, from)?;
    if m.kind != FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if expect.is_some_and(|e| e != (m.key.dev, m.key.ino)) {
        return Err(io::Error::other("another file took its name after it was labelled; that one stays in the inbox"));
    }
    let same_fs = Meta::of(to_dir).is_ok_and(|d| d.key.dev == m.key.dev);
    if same_fs {
        // A rename keeps device, inode, size, mtime and birth time: the key recorded is the key it will have.
        record(m.key)?;
        match rename_no_replace(from_dir, from, to_dir, to) {
            Ok(()) => {
                if Meta::at(to_dir, to).is_ok_and(|now| now.key == m.key) {
                    return Ok(());
                }
                let back = put_back(to_dir, to, from_dir, from)?;
                return Err(io::Error::other(format!(
                    "another file took its name while it was moved; that one is back in the inbox as {}",
                    back.to_string_lossy()
                )));
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
            Err(e) => return Err(e),
        }
    }
    copy_no_replace(from_dir, from, to_dir, to, m.key, record)?;
    take_away(from_dir, from, m.key)
}

/// Renames `name` (in `dir`, not the labelled file) back to `orig` in `home`, or, if that name is taken
/// again by now, to the first free numbered name beside it; returns the name it got.
fn put_back(dir: &OwnedFd, name: &OsStr, home: &OwnedFd, orig: &OsStr) -> io::Result<OsString> {
    for n in 0..MAX_SUFFIX {
        let back = numbered(Path::new(orig), n).into_os_string();
        match rename_no_replace(dir, name, home, &back) {
            Ok(()) => return Ok(back),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free name to put a file back under"))
}

/// Removes `name` from `dir` once it is known to be the file with `key` (copied elsewhere already):
/// renamed to a private temp name first, so that a file that took the name meanwhile is never deleted
/// but put back.
fn take_away(dir: &OwnedFd, name: &OsStr, key: FileKey) -> io::Result<()> {
    let (tmp, placeholder) = beneath::create_temp(dir)?;
    drop(placeholder);
    let result = (|| {
        // Over our own empty placeholder: the temp name is unpredictable and created O_EXCL.
        rustix::fs::renameat(dir, name, dir, &tmp)?;
        if Meta::at(dir, &tmp)?.key == key {
            return Ok(rustix::fs::unlinkat(dir, &tmp, AtFlags::empty())?);
        }
        let back = put_back(dir, tmp.as_os_str(), dir, name)?;
        tracing::warn!(name = %back.to_string_lossy(), "a file took the name of an image while it was copied out of the inbox; it stays in the inbox");
        Ok(())
    })();
    let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty()); // the placeholder, if the rename failed
    result
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

/// Copies `from` (which must be the file with `key`) into a fresh temp file beside `to` (contents,
/// permissions, mtime, fsynced), records the copy's key, then renames it to `to` unless that exists.
/// The source is left in place.
fn copy_no_replace(from_dir: &OwnedFd, from: &OsStr, to_dir: &OwnedFd, to: &OsStr, key: FileKey, record: &dyn Fn(FileKey) -> io::Result<()>) -> io::Result<()> {
    let read = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let mut src = File::from(rustix::fs::openat(from_dir, from, read, Mode::empty())?);
    let meta = src.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    if Meta::of(&src)?.key != key {
        return Err(io::Error::other("another file took its name after it was labelled; that one stays in the inbox"));
    }
    let (tmp, mut out) = beneath::create_temp(to_dir)?;
    let result = (|| {
        io::copy(&mut src, &mut out)?;
        out.set_permissions(meta.permissions())?;
        // Keep the original mtime: the copy is the same image.
        out.set_modified(meta.modified()?)?;
        out.sync_all()?;
        record(Meta::of(&out)?.key)?;
        rename_no_replace(to_dir, tmp.as_os_str(), to_dir, to)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(to_dir, &tmp, AtFlags::empty());
    }
    result
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

    use std::fs;

    fn key(p: &Path) -> FileKey {
        Meta::at(rustix::fs::CWD, p).unwrap().key
    }

    fn keys_recorded(folder: &ArchiveFolder, paths: &[PathBuf]) -> usize {
        let root = folder.root().unwrap();
        let keys = paths.iter().map(|p| (key(p), p.strip_prefix(&folder.path).unwrap().to_path_buf())).collect();
        folder.recorded(&root, &keys).unwrap().len()
    }

    #[test]
    fn a_taken_name_is_never_replaced_and_every_file_moved_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done) = (dir.path().join("in"), dir.path().join("done"));
        fs::create_dir_all(inbox.join("cam")).unwrap();
        let folder = ArchiveFolder::new(&done, vec![]);
        for content in [b"one", b"two", b"thr"] {
            let img = inbox.join("cam/IMG_0001.jpg");
            fs::write(&img, content).unwrap();
            fs::write(sidecar_path(&img), content).unwrap();
            let dest = move_under(&inbox, &folder, &img, Some(ident(&img))).unwrap();
            move_sidecar(&inbox, &img, &folder, &dest).unwrap();
        }
        let mut moved = Vec::new();
        for (n, content) in [(0, b"one"), (1, b"two"), (2, b"thr")] {
            let img = numbered(&done.join("cam/IMG_0001.jpg"), n);
            assert_eq!(fs::read(&img).unwrap(), content);
            assert_eq!(fs::read(sidecar_path(&img)).unwrap(), content);
            moved.extend([sidecar_path(&img), img]);
        }
        assert_eq!(fs::read_dir(inbox.join("cam")).unwrap().count(), 0);
        assert_eq!(keys_recorded(&folder, &moved), 6);
    }

    #[test]
    fn a_folder_swapped_for_a_link_is_not_followed_out_of_the_inbox_nor_into_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done, outside) = (dir.path().join("in"), dir.path().join("done"), dir.path().join("outside"));
        fs::create_dir_all(&inbox).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("a.jpg"), b"not yours").unwrap();
        std::os::unix::fs::symlink(&outside, inbox.join("cam")).unwrap();
        let folder = ArchiveFolder::new(&done, vec![]);
        assert!(move_under(&inbox, &folder, &inbox.join("cam/a.jpg"), None).is_err());
        assert_eq!(fs::read(outside.join("a.jpg")).unwrap(), b"not yours");
        // A link planted inside the archive folder where the image's sub-folder goes.
        fs::create_dir_all(inbox.join("cam2")).unwrap();
        fs::write(inbox.join("cam2/b.jpg"), b"b").unwrap();
        std::os::unix::fs::symlink(&outside, done.join("cam2")).unwrap();
        assert!(move_under(&inbox, &folder, &inbox.join("cam2/b.jpg"), None).is_err());
        assert!(inbox.join("cam2/b.jpg").exists(), "the image stays in its inbox");
        assert!(!outside.join("b.jpg").exists());
    }

    #[test]
    fn the_image_a_crash_parted_from_its_sidecar_is_the_last_moved_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let folder = ArchiveFolder::new(dir.path(), vec![]);
        let wanted = dir.path().join("IMG_0001.jpg");
        fs::write(&wanted, b"a").unwrap();
        fs::write(sidecar_path(&wanted), b"{}").unwrap();
        fs::write(numbered(&wanted, 1), b"b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20)); // ctimes one clock tick apart at least
        fs::write(numbered(&wanted, 2), b"c").unwrap();
        fs::write(dir.path().join("IMG_0001~3.png"), b"d").unwrap();
        assert_eq!(moved_without_sidecar(&folder, &wanted), Some(numbered(&wanted, 2)));
        fs::write(sidecar_path(&numbered(&wanted, 2)), b"{}").unwrap();
        assert_eq!(moved_without_sidecar(&folder, &wanted), Some(numbered(&wanted, 1)));
    }

    #[test]
    fn a_copy_across_filesystems_refuses_a_taken_name_and_records_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"old").unwrap();
        let fd: OwnedFd = File::open(dir.path()).unwrap().into();
        let seen = std::cell::Cell::new(None);
        let record = |k: FileKey| {
            seen.set(Some(k));
            Ok(())
        };
        let a = key(&from);
        let copy = || copy_no_replace(&fd, OsStr::new("a"), &fd, OsStr::new("b"), a, &record);
        assert_eq!(copy().unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"old");
        fs::remove_file(&to).unwrap();
        copy().unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"new");
        assert_eq!(seen.get(), Some(key(&to)), "the key recorded is the copy's");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temp file left");
        // A record that cannot be written stops the move.
        let refuse = |_: FileKey| Err(io::Error::other("ledger full"));
        assert!(copy_no_replace(&fd, OsStr::new("a"), &fd, OsStr::new("c"), a, &refuse).is_err());
        assert!(!dir.path().join("c").exists());
        // Not the file that was labelled: nothing copied.
        let other = FileKey { ino: a.ino + 1, ..a };
        assert!(copy_no_replace(&fd, OsStr::new("a"), &fd, OsStr::new("d"), other, &record).is_err());
        assert!(!dir.path().join("d").exists());
    }

    fn ident(p: &Path) -> (u64, u64) {
        let k = key(p);
        (k.dev, k.ino)
    }

    #[test]
    fn another_file_that_took_the_name_is_never_archived_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done) = (dir.path().join("in"), dir.path().join("done"));
        fs::create_dir_all(&inbox).unwrap();
        let folder = ArchiveFolder::new(&done, vec![]);
        let img = inbox.join("latest.jpg");
        fs::write(&img, b"labelled").unwrap();
        let labelled = ident(&img);
        // The camera renames a new frame over the name before the move.
        fs::write(inbox.join("next"), b"the next frame").unwrap();
        fs::rename(inbox.join("next"), &img).unwrap();
        assert!(move_under(&inbox, &folder, &img, Some(labelled)).is_err());
        assert_eq!(fs::read(&img).unwrap(), b"the next frame", "the new frame stays in the inbox");
        assert!(!done.join("latest.jpg").exists());
    }

    #[test]
    fn a_file_that_slips_into_the_name_during_the_rename_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, done) = (dir.path().join("in"), dir.path().join("done"));
        fs::create_dir_all(&inbox).unwrap();
        fs::create_dir_all(&done).unwrap();
        let img = inbox.join("latest.jpg");
        fs::write(&img, b"labelled").unwrap();
        let labelled = key(&img);
        let fd = |p: &Path| -> OwnedFd { File::open(p).unwrap().into() };
        let (from_dir, to_dir) = (fd(&inbox), fd(&done));
        // The look has happened (`record` runs after it); the new frame lands before the rename.
        let swap = |_: FileKey| {
            fs::write(inbox.join("next"), b"the next frame").unwrap();
            fs::rename(inbox.join("next"), &img).unwrap();
            Ok(())
        };
        let e = move_at(&from_dir, OsStr::new("latest.jpg"), &to_dir, OsStr::new("latest.jpg"), Some((labelled.dev, labelled.ino)), &swap).unwrap_err();
        assert!(e.to_string().contains("back in the inbox"), "{e}");
        assert_eq!(fs::read(&img).unwrap(), b"the next frame", "put back under its own name");
        assert!(!done.join("latest.jpg").exists());
        // Taken away after a copy: the new frame that took the name in the meantime is kept.
        fs::write(inbox.join("copied.jpg"), b"copied").unwrap();
        let copied = key(&inbox.join("copied.jpg"));
        fs::write(inbox.join("next"), b"newer").unwrap();
        fs::rename(inbox.join("next"), inbox.join("copied.jpg")).unwrap();
        take_away(&from_dir, OsStr::new("copied.jpg"), copied).unwrap();
        assert_eq!(fs::read(inbox.join("copied.jpg")).unwrap(), b"newer");
        let names: Vec<_> = fs::read_dir(&inbox).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }
}
