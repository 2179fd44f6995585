//! Which version of a file: what a sidecar and a row record, and what "already labelled" compares.

use std::os::unix::fs::MetadataExt;

/// Which version of a file was labelled: what its sidecar records, and what "already labelled"
/// compares. A replacement (new inode), a rewrite in place (size, mtime or ctime) and an `mv`/`cp -p`
/// of an old file (ctime cannot be set back) all change it; clocks and timestamps alone cannot fool it.
/// A file that was read also carries a hash of its bytes: when only the ctime moved (a hard link made
/// to it, a chmod), the bytes decide whether it is the same version. Equality is on the metadata.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// XXH3-64 of the bytes read (absent when the file was only stat'ed, and in older sidecars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<u64>,
}

impl PartialEq for Identity {
    fn eq(&self, o: &Identity) -> bool {
        self.key() == o.key()
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key().hash(h)
    }
}

impl Identity {
    pub fn of(meta: &std::fs::Metadata) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            xxh3: None,
        }
    }

    fn key(&self) -> (u64, u64, u64, i64, i64) {
        (self.dev, self.inode, self.size, self.mtime_ns, self.ctime_ns)
    }

    /// Same file, size and mtime; only the ctime moved (a link made, a chmod): maybe the same bytes.
    pub fn differs_only_in_ctime(&self, now: &Identity) -> bool {
        (self.dev, self.inode, self.size, self.mtime_ns) == (now.dev, now.inode, now.size, now.mtime_ns) && self.ctime_ns != now.ctime_ns
    }

    /// `dev:inode:size:mtime_ns:ctime_ns`, as the CSV's `file_id` column carries it.
    pub fn to_key(self) -> String {
        format!("{}:{}:{}:{}:{}", self.dev, self.inode, self.size, self.mtime_ns, self.ctime_ns)
    }

    pub fn from_key(s: &str) -> Option<Identity> {
        let mut it = s.split(':');
        let id = Identity {
            dev: it.next()?.parse().ok()?,
            inode: it.next()?.parse().ok()?,
            size: it.next()?.parse().ok()?,
            mtime_ns: it.next()?.parse().ok()?,
            ctime_ns: it.next()?.parse().ok()?,
            xxh3: None,
        };
        it.next().is_none().then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn identity_changes_with_replacement_and_round_trips_as_a_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jpg");
        std::fs::write(&p, b"one").unwrap();
        let a = Identity::of(&std::fs::metadata(&p).unwrap());
        let old_mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(d.path().join("b"), b"two").unwrap();
        let f = File::options().write(true).open(d.path().join("b")).unwrap();
        f.set_modified(old_mtime).unwrap();
        std::fs::rename(d.path().join("b"), &p).unwrap();
        let b = Identity::of(&std::fs::metadata(&p).unwrap());
        assert_ne!(a, b, "an old-mtime replacement is a new identity");
        assert_eq!(Identity::from_key(&a.to_key()), Some(a));
        assert_eq!(Identity::from_key("1:2:3"), None);
    }
}
