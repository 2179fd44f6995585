//! "Is this file completely written?": the end-marker check for close-after-write events and the
//! settle timer for everything else. Nothing here follows a link or blocks on a FIFO or device.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

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

/// Files waiting for their size and mtime to stop changing.
#[derive(Default)]
pub struct Settler {
    pending: HashMap<PathBuf, Pending>,
}

struct Pending {
    len: u64,
    mtime: Option<SystemTime>,
    since: Instant,
    settle: Duration,
}

impl Settler {
    /// Notes activity on `path`; it becomes due once unchanged for `settle`.
    pub fn observe(&mut self, path: PathBuf, settle: Duration) {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            self.pending.remove(&path);
            return;
        };
        if !meta.is_file() {
            if !meta.is_dir() {
                tracing::warn!(path = %path.display(), kind = crate::beneath::kind_of(meta.file_type()), "skipped: not a regular file");
            }
            return;
        }
        let (len, mtime) = (meta.len(), meta.modified().ok());
        let now = Instant::now();
        let entry = self.pending.entry(path).or_insert(Pending { len, mtime, since: now, settle });
        if entry.len != len || entry.mtime != mtime {
            *entry = Pending { len, mtime, since: now, settle };
        }
    }

    pub fn forget(&mut self, path: &Path) {
        self.pending.remove(path);
    }

    /// Forgets everything under `dir` (a folder that left the inbox).
    pub fn forget_under(&mut self, dir: &Path) {
        self.pending.retain(|p, _| !p.starts_with(dir));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Paths that have been unchanged for their settle interval; they leave the settler.
    pub fn due(&mut self) -> Vec<PathBuf> {
        let now = Instant::now();
        let mut due = Vec::new();
        self.pending.retain(|path, p| {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return false; // gone
            };
            if !meta.is_file() {
                return false; // replaced by a link, FIFO or folder
            }
            let (len, mtime) = (meta.len(), meta.modified().ok());
            if len != p.len || mtime != p.mtime {
                *p = Pending { len, mtime, since: now, settle: p.settle };
                return true;
            }
            let quiet = now.duration_since(p.since);
            if quiet >= p.settle {
                // A file whose format says it is cut short may be a writer pausing between chunks:
                // give it ten settle intervals (at least 5 s) before labelling it as broken.
                let patience = (p.settle * 10).max(Duration::from_secs(5));
                if quiet < patience && looks_complete(path) == Some(false) {
                    return true;
                }
                due.push(path.clone());
                return false;
            }
            true
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settler_waits_for_size_and_mtime_to_hold_still() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        std::fs::write(&p, b"12").unwrap();
        let mut s = Settler::default();
        s.observe(p.clone(), Duration::from_millis(200));
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        std::fs::write(&p, b"1234").unwrap(); // still growing: the clock restarts
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        assert!(s.due().is_empty());
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.due(), vec![p]);
        assert!(s.is_empty());
    }

    #[test]
    fn settler_forgets_files_that_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        std::fs::write(&p, b"12").unwrap();
        let mut s = Settler::default();
        s.observe(p.clone(), Duration::ZERO);
        std::fs::remove_file(&p).unwrap();
        assert!(s.due().is_empty());
        assert!(s.is_empty());
    }

    #[test]
    fn a_fifo_or_a_link_is_never_opened_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("a.jpg");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(open_regular(&fifo).unwrap().is_none());
        assert_eq!(looks_complete(&fifo), None);
        let real = dir.path().join("real.png");
        std::fs::write(&real, b"\x89PNG....").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(open_regular(&link).unwrap().is_none());
        assert!(open_regular(&real).unwrap().is_some());
    }
}
