//! The outbox's checkpoint: which log generations still hold rows the broker has not acknowledged, and
//! where in the first of them the acknowledged rows end. Versioned JSON, replaced atomically (temp file,
//! fsync, rename, folder fsync), so a crash leaves the old checkpoint or the new one, never a mix.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vocab::results_log::Fingerprint;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// Oldest first; the last is normally the live log.
    pub generations: Vec<GenerationMark>,
    /// Bytes of the first generation whose rows the broker has (the end of its last acknowledged row).
    pub offset: u64,
}

/// How to find one log generation again: by (dev, inode) and content, or by content alone (a copy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationMark {
    pub dev: u64,
    pub inode: u64,
    pub fingerprint: Option<Fingerprint>,
    /// Where it was last seen.
    pub path: PathBuf,
    /// Its length when last seen: what is lost if it cannot be found.
    pub len: u64,
}

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
    // The version first, so a newer layout is reported as such, not as corrupt.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(&bytes).map_err(|source| LoadError::Corrupt { path: path.to_path_buf(), source })?;
    if v.version != VERSION {
        return Err(LoadError::UnknownVersion { path: path.to_path_buf(), version: v.version });
    }
    let c = serde_json::from_slice(&bytes).map_err(|source| LoadError::Corrupt { path: path.to_path_buf(), source })?;
    Ok(Some(c))
}

/// Replaces the checkpoint at `path` with `c`: temp file beside it, fsync, rename, folder fsync.
/// Invariant I10 (docs/design.md): a crash leaves the old checkpoint or the new one.
pub fn store(path: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::create_dir_all(dir).map_err(|e| std::io::Error::new(e.kind(), format!("cannot create the folder of the outbox checkpoint {}: {e}", path.display())))?;
    // Left by an earlier attempt of this process that failed halfway.
    let _ = std::fs::remove_file(&temp);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        f.write_all(&serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(|e| std::io::Error::new(e.kind(), format!("cannot write the outbox checkpoint {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(load(&p).unwrap(), Some(next));
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
        assert!(matches!(load(&p).unwrap_err(), LoadError::UnknownVersion { version: 7, .. }));
    }
}
