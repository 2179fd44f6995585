//! The file-system side of "is this file completely written?": what a path is now, and whether its
//! format's end marker is there. Nothing here follows a link or blocks on a FIFO or device.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::settle::{Check, Seen, Settler};

/// What `path` is now, without following a link.
pub fn look(path: &Path) -> Seen {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Seen::File { len: m.len(), mtime: m.modified().ok() },
        Ok(m) if m.is_dir() => Seen::Folder,
        Ok(m) => Seen::Other(crate::beneath::kind_of(m.file_type())),
        Err(_) => Seen::Gone,
    }
}

/// Tells `settler` about activity on `path`, as it is now.
pub fn observe(settler: &mut Settler, path: PathBuf, settle: Duration, now: Instant) {
    let seen = look(&path);
    if let Seen::Other(kind) = seen {
        tracing::warn!(path = %path.display(), kind, "skipped: not a regular file");
    }
    settler.observe(path, seen, settle, now);
}

/// Looks at the paths whose settle check is due at `now` and returns those that are ready.
pub fn settled(settler: &mut Settler, now: Instant) -> Vec<PathBuf> {
    let mut ready = Vec::new();
    for path in settler.to_check(now) {
        let due = match settler.check(&path, look(&path), now) {
            Check::Due => true,
            Check::EndMarker => settler.end_marker(&path, looks_complete(&path), now),
            Check::Waiting | Check::Dropped => false,
        };
        if due {
            ready.push(path);
        }
    }
    ready
}

/// Opens `path` for reading only if it is a regular file, never following a symbolic link and never
/// waiting (a FIFO with no writer would block a plain open forever). `Ok(None)`: not a regular file.
pub fn open_regular(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None), // a symbolic link
        Err(e) => return Err(e),
    };
    // The type that counts is the one of what was opened, not of what a stat saw earlier.
    Ok(file.metadata()?.is_file().then_some(file))
}

/// Whether a file that was just closed or renamed in holds a whole image, judged by the end marker
/// its format has (JPEG EOI, PNG IEND, GIF trailer, RIFF/BMP size fields). `None`: no cheap check
/// (TIFF), not a regular file, or unreadable. A writer that closes and reopens the file between
/// chunks makes close-after-write events for half files; those fail this check and wait to settle.
pub fn looks_complete(path: &Path) -> Option<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_regular(path).ok()??;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 12];
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    let mut tail = [0u8; 12];
    if len >= 12 {
        f.seek(SeekFrom::End(-12)).ok()?;
        f.read_exact(&mut tail).ok()?;
    }
    let le32 = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(len >= 12 && tail[10..] == [0xFF, 0xD9])
    } else if head.starts_with(b"\x89PNG") {
        Some(len >= 12 && tail[4..] == *b"IEND\xAE\x42\x60\x82")
    } else if head.starts_with(b"GIF8") {
        Some(len >= 12 && tail[11] == 0x3B)
    } else if head.starts_with(b"RIFF") && head.len() >= 12 {
        Some(le32(&head[4..8]) + 8 == len)
    } else if head.starts_with(b"BM") && head.len() >= 6 && le32(&head[2..6]) != 0 {
        Some(le32(&head[2..6]) == len)
    } else if len == 0 {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_link_is_never_opened_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("a.jpg");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(open_regular(&fifo).unwrap().is_none());
        assert_eq!(looks_complete(&fifo), None);
        assert_eq!(look(&fifo), Seen::Other("FIFO"));
        let real = dir.path().join("real.png");
        std::fs::write(&real, b"\x89PNG....").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(open_regular(&link).unwrap().is_none());
        assert!(open_regular(&real).unwrap().is_some());
        assert_eq!(looks_complete(&real), Some(false), "a PNG without its IEND chunk");
        assert!(matches!(look(&link), Seen::Other(_)));
        assert!(matches!(look(&real), Seen::File { len: 8, .. }));
        assert_eq!(look(&dir.path().join("nothing")), Seen::Gone);
        assert_eq!(look(dir.path()), Seen::Folder);
    }
}
