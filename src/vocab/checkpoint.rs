//! The outbox checkpoint's format: which log generations still hold rows the broker has not
//! acknowledged, and where in the first of them the acknowledged rows end. Versioned JSON; reading and
//! replacing the file is the outbox's (`publish/checkpoint.rs`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::results_log::Fingerprint;

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

/// Why bytes are not a checkpoint this labeld can use.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Corrupt(serde_json::Error),
    #[error("version {0}, this labeld knows version {VERSION}")]
    UnknownVersion(u32),
}

impl Checkpoint {
    /// The checkpoint as written to its file.
    pub fn to_bytes(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, FormatError> {
        // The version first, so a newer layout is reported as such, not as corrupt.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(bytes).map_err(FormatError::Corrupt)?;
        if v.version != VERSION {
            return Err(FormatError::UnknownVersion(v.version));
        }
        serde_json::from_slice(bytes).map_err(FormatError::Corrupt)
    }
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
    fn the_format_is_pretty_json_with_its_version_and_reads_back_the_same() {
        let bytes = sample().to_bytes().unwrap();
        let want = r#"{
  "version": 1,
  "generations": [
    {
      "dev": 1,
      "inode": 2,
      "fingerprint": {
        "len": 10,
        "xxh3": 99
      },
      "path": "/x/r.csv",
      "len": 500
    }
  ],
  "offset": 123
}"#;
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), want);
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), sample());
    }

    #[test]
    fn corrupt_and_unknown_versions_are_told_apart() {
        assert!(matches!(Checkpoint::from_bytes(b"{\"version\": 1, \"generations\": ["), Err(FormatError::Corrupt(_))));
        assert!(matches!(Checkpoint::from_bytes(b"{\"version\": 1}"), Err(FormatError::Corrupt(_))));
        assert!(matches!(Checkpoint::from_bytes(b"{\"version\": 7, \"whatever\": true}"), Err(FormatError::UnknownVersion(7))));
    }
}
