//! `<image>.json` beside each image, written so that a crash leaves either no sidecar or a whole one
//! (invariant I2 in docs/design.md): temp file in the same folder → fsync → rename, all beneath the
//! inbox root without following links (`beneath`). The sidecar records the identity of the file version it describes; "already labelled"
//! means the sidecar's identity is the file's identity now.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::record::Record;
use crate::beneath::{self, Beneath, Identity};

/// The longest file name Linux file systems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// `a.jpg` → `a.jpg.json`. A name too long for that (over 250 bytes) gets
/// `<its first 233 bytes>~<16 hex of a hash of the whole name>.json`, which always fits and is the same
/// at every start.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap_or_default();
    image.with_file_name(sidecar_name(name))
}

fn sidecar_name(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    if bytes.len() + ".json".len() <= NAME_MAX {
        let mut s = name.to_owned();
        s.push(".json");
        return s;
    }
    let keep = NAME_MAX - ".json".len() - 17;
    // Cut on a UTF-8 boundary where the name is UTF-8, so the sidecar name stays readable.
    let mut cut = keep;
    while cut > 0 && std::str::from_utf8(&bytes[..cut]).is_err() && std::str::from_utf8(bytes).is_ok() {
        cut -= 1;
    }
    let mut out = bytes[..cut].to_vec();
    out.extend(format!("~{:016x}.json", fnv1a(bytes)).into_bytes());
    OsString::from_vec(out)
}

/// FNV-1a, 64 bit: stable across builds and machines (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The identity a sidecar records, if it exists, is a regular file and parses.
pub fn recorded_identity(root: &Path, image: &Path) -> Option<Identity> {
    let side = sidecar_path(image);
    let (bytes, _) = Beneath::new(root, &side).ok()?.read(1 << 20).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    record.file
}

/// True when `image` has a sidecar describing the file as it is now (same device, inode, size, mtime
/// and ctime). Sidecars written before labeld recorded identities count when at least as new as the
/// image. Neither the image nor the sidecar is followed through a link.
pub fn is_labelled_under(root: &Path, image: &Path) -> bool {
    let Ok(img) = Beneath::new(root, image).and_then(|b| b.metadata()) else {
        return false;
    };
    if !img.is_file() {
        return false;
    }
    let side = sidecar_path(image);
    let Ok((bytes, side_id)) = Beneath::new(root, &side).map_err(|_| ()).and_then(|b| b.read(1 << 20).map_err(|_| ())) else {
        return false;
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(Record { file: Some(id), .. }) => {
            let now = Identity::of(&img);
            id == now || (id.differs_only_in_ctime(&now) && id.xxh3.is_some() && same_bytes(root, image, id))
        }
        // An older sidecar without an identity: judged by time, as labeld did before.
        _ => side_id.mtime_ns >= Identity::of(&img).mtime_ns,
    }
}

/// The file's bytes hash as the sidecar recorded (read only when nothing but its ctime changed).
fn same_bytes(root: &Path, image: &Path, id: Identity) -> bool {
    Beneath::new(root, image).ok().and_then(|b| b.read(id.size).ok()).is_some_and(|(_, now)| now.xxh3 == id.xxh3)
}

/// `is_labelled_under` with the image's own folder as the root: for callers that do not know the inbox.
pub fn is_labelled(image: &Path) -> bool {
    is_labelled_under(image.parent().unwrap_or(Path::new("/")), image)
}

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

    #[test]
    fn sidecar_sits_beside_the_image_with_json_appended() {
        assert_eq!(sidecar_path(Path::new("/in/a.jpg")), PathBuf::from("/in/a.jpg.json"));
        assert_eq!(sidecar_path(Path::new("/in/b.tar.png")), PathBuf::from("/in/b.tar.png.json"));
    }

    #[test]
    fn a_name_too_long_for_a_sidecar_gets_a_short_stable_one() {
        let long = format!("/in/{}.jpg", "é".repeat(124)); // 252 bytes
        let side = sidecar_path(Path::new(&long));
        let name = side.file_name().unwrap().as_bytes();
        assert!(name.len() <= NAME_MAX, "{}", name.len());
        assert!(side.to_str().is_some(), "cut on a character boundary");
        assert!(side.to_string_lossy().ends_with(".json"));
        assert_eq!(side, sidecar_path(Path::new(&long)));
        let other = format!("/in/{}.png", "é".repeat(124));
        assert_ne!(side, sidecar_path(Path::new(&other)));
    }

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
