//! The outbox checkpoint's file (its format is `vocab::checkpoint`): read at start, replaced
//! atomically (temp file under an unpredictable name, fsync, rename, folder fsync), so a crash leaves the
//! old checkpoint or the new one, never a mix.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::beneath;
use crate::vocab::checkpoint::{Checkpoint, FormatError, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the outbox checkpoint {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the outbox checkpoint {path} is not valid ({source}); delete it to start publishing from the end of the log")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("the outbox checkpoint {path} has version {version}, this labeld knows version {VERSION}; delete it to start publishing from the end of the log")]
    UnknownVersion { path: PathBuf, version: u32 },
}

/// The checkpoint at `path`; `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<Checkpoint>, LoadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path: path.to_path_buf(), source }),
    };
    match Checkpoint::from_bytes(&bytes) {
        Ok(c) => Ok(Some(c)),
        Err(FormatError::Corrupt(source)) => Err(LoadError::Corrupt { path: path.to_path_buf(), source }),
        Err(FormatError::UnknownVersion(version)) => Err(LoadError::UnknownVersion { path: path.to_path_buf(), version }),
    }
}

/// Replaces the checkpoint at `path` with `c`: temp file beside it, fsync, rename, folder fsync.
/// Invariant I10 (docs/design.md): a crash leaves the old checkpoint or the new one.
pub fn store(path: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| std::io::Error::new(e.kind(), format!("cannot create the folder of the outbox checkpoint {}: {e}", path.display())))?;
    let written = (|| {
        let name = path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let bytes = c.to_bytes().map_err(std::io::Error::other)?;
        let folder: OwnedFd = File::open(dir)?.into();
        beneath::write_atomic_in(&folder, name, &bytes)?;
        beneath::sync_dir(&folder)
    })();
    written.map_err(|e| std::io::Error::new(e.kind(), format!("cannot write the outbox checkpoint {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::checkpoint::GenerationMark;
    use crate::vocab::results_log::Fingerprint;

    fn sample() -> Checkpoint {
        Checkpoint {
            version: VERSION,
            generations: vec![GenerationMark { dev: 1, inode: 2, fingerprint: Some(Fingerprint { len: 10, xxh3: 99 }), path: "/x/r.csv".into(), len: 500 }],
            offset: 123,
        }
    }

    #[test]
    fn stored_then_loaded_is_the_same_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/outbox.json");
        assert_eq!(load(&p).unwrap(), None);
        store(&p, &sample()).unwrap();
        let mut next = sample();
        next.offset = 456;
        store(&p, &next).unwrap();
        assert_eq!(load(&p).unwrap(), Some(next.clone()));
        assert_eq!(std::fs::read(&p).unwrap(), next.to_bytes().unwrap(), "the file holds the format's bytes");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["outbox.json"]);
    }

    #[test]
    fn corrupt_and_unknown_versions_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("outbox.json");
        std::fs::write(&p, b"{\"version\": 1, \"generations\": [").unwrap();
        let e = load(&p).unwrap_err();
        assert!(matches!(e, LoadError::Corrupt { .. }) && e.to_string().contains("outbox.json"), "{e}");
        std::fs::write(&p, b"{\"version\": 7, \"whatever\": true}").unwrap();
        let e = load(&p).unwrap_err();
        assert!(matches!(e, LoadError::UnknownVersion { version: 7, .. }), "{e}");
        assert_eq!(e.to_string(), format!("the outbox checkpoint {} has version 7, this labeld knows version 1; delete it to start publishing from the end of the log", p.display()));
    }
}
