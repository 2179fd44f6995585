//! `<image>.json` beside each image, written so that a crash leaves either no sidecar or a whole one:
//! temp file in the same folder → fsync → rename.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::record::Record;

/// `a.jpg` → `a.jpg.json`.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// True when `image` already has a sidecar at least as new as the image itself.
pub fn is_labelled(image: &Path) -> bool {
    let (Ok(img), Ok(side)) = (std::fs::metadata(image), std::fs::metadata(sidecar_path(image))) else {
        return false;
    };
    if !side.is_file() {
        return false;
    }
    match (img.modified(), side.modified()) {
        (Ok(i), Ok(s)) => s >= i,
        _ => true,
    }
}

pub fn write(record: &Record, image: &Path) -> std::io::Result<PathBuf> {
    let dest = sidecar_path(image);
    let mut json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    json.push(b'\n');
    write_atomic(&dest, &json)?;
    Ok(dest)
}

/// Writes `bytes` to `dest` through a dotfile temp (which the watcher ignores) and a rename.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
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
    fn atomic_write_leaves_no_temp_file_and_replaces_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.jpg.json");
        write_atomic(&dest, b"old").unwrap();
        write_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.jpg.json")]);
    }

    #[test]
    fn an_image_newer_than_its_sidecar_is_not_labelled() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.jpg");
        std::fs::write(&img, b"x").unwrap();
        assert!(!is_labelled(&img));
        std::fs::write(sidecar_path(&img), b"{}").unwrap();
        assert!(is_labelled(&img));
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        File::options().write(true).open(&img).unwrap().set_modified(later).unwrap();
        assert!(!is_labelled(&img));
    }
}
