//! `<image>.json` beside each image, written so that a crash leaves either no sidecar or a whole one
//! (invariant I2 in docs/design.md): temp file in the same folder → fsync → rename, all beneath the
//! inbox root without following links (`beneath`). The sidecar records the identity of the file version it describes; "already labelled"
//! means the sidecar's identity is the file's identity now.

use std::ffi::OsStr;
use std::path::Path;

use crate::vocab::Record;
use crate::beneath::{self, Beneath};
use crate::vocab::sidecar_name;

/// Why a sidecar was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The image's folder is gone, or is (or lies behind) a link: no sidecar can ever be placed there.
    #[error("the image's folder is gone or is a link (not followed): {0}")]
    NoFolder(std::io::Error),
    /// Disk full, read-only, permissions…: worth retrying.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Writes the sidecar of `image` (which lies under `root`) and returns the folder to sync.
pub fn write(record: &Record, root: &Path, image: &Path) -> Result<std::os::fd::OwnedFd, WriteError> {
    let mut json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let at = Beneath::new(root, image).map_err(WriteError::NoFolder)?;
    let dir = at.open_parent().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound || beneath::is_link_refusal(&e) { WriteError::NoFolder(e) } else { WriteError::Io(e) }
    })?;
    beneath::write_atomic_in(&dir, &sidecar_name(at.file_name()), &json)?;
    Ok(dir)
}

/// Writes the sidecar of the image named `image_name` into the open folder `dir` (the caller has
/// checked that the folder is inside the inbox and still holds that image).
pub fn write_in(record: &Record, dir: &std::os::fd::OwnedFd, image_name: &OsStr) -> std::io::Result<()> {
    let mut json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    json.push(b'\n');
    beneath::write_atomic_in(dir, &sidecar_name(image_name), &json)
}

/// Makes renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labelled::{is_labelled, is_labelled_under, recorded_identity};
    use crate::vocab::{Identity, sidecar_path};

    #[test]
    fn a_sidecar_describes_one_version_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.jpg");
        std::fs::write(&img, b"x").unwrap();
        assert!(!is_labelled_under(dir.path(), &img));
        let mut r = Record::example();
        r.file = Some(Identity::of(&std::fs::metadata(&img).unwrap()));
        write(&r, dir.path(), &img).unwrap();
        assert!(is_labelled_under(dir.path(), &img));
        assert_eq!(recorded_identity(dir.path(), &img), r.file);
        // Replaced by a file with an older mtime: not labelled any more.
        let old = std::fs::metadata(&img).unwrap().modified().unwrap() - std::time::Duration::from_secs(3600);
        let tmp = dir.path().join("b");
        std::fs::write(&tmp, b"y").unwrap();
        std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(old).unwrap();
        std::fs::rename(&tmp, &img).unwrap();
        assert!(!is_labelled_under(dir.path(), &img));
    }

    #[test]
    fn an_old_sidecar_without_identity_is_judged_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.jpg");
        std::fs::write(&img, b"x").unwrap();
        std::fs::write(sidecar_path(&img), serde_json::to_vec(&Record::example()).unwrap()).unwrap();
        assert!(is_labelled(&img));
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&img).unwrap().set_modified(later).unwrap();
        assert!(!is_labelled(&img));
    }
}
