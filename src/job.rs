//! A job: one image on its way from the queue to its result. It knows where it comes from (a file in
//! an inbox or an HTTP upload), which version of the file was read, and the folder it was read from.
//!
//! An inbox file is labelled by one job at a time (invariant I5 in docs/design.md): a job holds the
//! file's `Claim` in the `InFlight` set, keyed by its path and by its device and inode (so the same
//! file seen under a second path — its folder renamed mid-flight — waits for the first job). The claim
//! is released when the last handle on the job is dropped, whatever path the job took (written, gone,
//! failed, dropped at shutdown or in a panic), so no image can stay claimed for good. A path pushed
//! again while claimed is handed back through `InFlight::resubmissions` on release, so the newest
//! content is checked too.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::vocab::Identity;
use crate::vocab::Record;

/// An image to label.
#[derive(Clone, Debug)]
pub struct Job {
    pub source: Source,
    /// When labeld decided the image was ready; latency is measured from here.
    pub ready_at: Instant,
    /// The version of the file that was read (set by the worker when it reads the file).
    pub identity: Option<Identity>,
    /// The folder the file was read from, held open (set by the worker): if the folder is renamed
    /// while the job is in flight, the result is written where the image is now.
    pub folder: Option<Arc<OwnedFd>>,
}

#[derive(Clone, Debug)]
pub enum Source {
    /// A file in an inbox, claimed for this job.
    Inbox(Claim),
    /// An image posted to `POST /predict`: its result goes back to the client only.
    Upload(Upload),
}

impl Job {
    pub fn inbox(claim: Claim, ready_at: Instant) -> Job {
        Job { source: Source::Inbox(claim), ready_at, identity: None, folder: None }
    }

    pub fn upload(upload: Upload) -> Job {
        Job { source: Source::Upload(upload), ready_at: Instant::now(), identity: None, folder: None }
    }

    /// The inbox path the image was found at; `None` for an upload.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            Source::Inbox(c) => Some(c.path()),
            Source::Upload(_) => None,
        }
    }

    pub fn claim(&self) -> Option<&Claim> {
        match &self.source {
            Source::Inbox(c) => Some(c),
            Source::Upload(_) => None,
        }
    }

    /// For logs and the status page: the path, or "upload".
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Inbox(c) => c.path().display().to_string(),
            Source::Upload(u) => format!("upload ({} bytes)", u.bytes.len()),
        }
    }
}

/// An image posted over HTTP.
#[derive(Clone)]
pub struct Upload {
    pub bytes: Arc<[u8]>,
    pub reply: tokio::sync::mpsc::Sender<Record>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upload({} bytes)", self.bytes.len())
    }
}

/// A file's device and inode: the same file under any path.
pub type FileKey = (u64, u64);

/// A job's hold on its inbox file; clones share it, and the last one dropped releases it.
#[derive(Clone)]
pub struct Claim(Arc<Held>);

struct Held {
    path: PathBuf,
    key: Option<FileKey>,
    in_flight: InFlight,
    /// Set when the image should be tried again after this long (a passing fault).
    retry: Mutex<Option<Duration>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let retry = *self.retry.lock().unwrap_or_else(|e| e.into_inner());
        self.in_flight.release(&self.path, self.key, retry);
    }
}

impl Claim {
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// On release, hand the path back for another try after `after` (a fault worth retrying).
    pub fn retry_after(&self, after: Duration) {
        *self.0.retry.lock().unwrap_or_else(|e| e.into_inner()) = Some(after);
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claim({})", self.0.path.display())
    }
}

/// Inbox files queued or being labelled right now.
#[derive(Clone)]
pub struct InFlight(Arc<Shared>);

struct Shared {
    claims: Mutex<Claims>,
    resubmit_tx: Sender<Resubmit>,
    resubmit_rx: Receiver<Resubmit>,
    /// A notice after each release (at most one waiting): for the feeder's last wait in `run --once`.
    released_tx: Sender<()>,
    released_rx: Receiver<()>,
}

#[derive(Default)]
struct Claims {
    paths: HashSet<PathBuf>,
    keys: HashSet<FileKey>,
    /// Paths pushed again while their path was claimed.
    again: HashSet<PathBuf>,
    /// Paths pushed while another path of the same file was claimed.
    again_by_key: HashMap<FileKey, HashSet<PathBuf>>,
}

/// A released path to push again once `due` has come.
#[derive(Debug)]
pub struct Resubmit {
    pub path: PathBuf,
    pub due: Instant,
}

impl Default for InFlight {
    fn default() -> Self {
        let (resubmit_tx, resubmit_rx) = crossbeam_channel::unbounded();
        let (released_tx, released_rx) = crossbeam_channel::bounded(1);
        InFlight(Arc::new(Shared { claims: Mutex::default(), resubmit_tx, resubmit_rx, released_tx, released_rx }))
    }
}

impl InFlight {
    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.0.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `path` (the file `key`, if known); `None` if the path or the file is already claimed,
    /// in which case the path is handed back when that claim is released.
    pub fn claim(&self, path: &Path, key: Option<FileKey>) -> Option<Claim> {
        let mut c = self.claims();
        if c.paths.contains(path) {
            c.again.insert(path.to_path_buf());
            return None;
        }
        if let Some(k) = key.filter(|k| c.keys.contains(k)) {
            c.again_by_key.entry(k).or_default().insert(path.to_path_buf());
            return None;
        }
        c.paths.insert(path.to_path_buf());
        if let Some(k) = key {
            c.keys.insert(k);
        }
        drop(c);
        Some(Claim(Arc::new(Held { path: path.to_path_buf(), key, in_flight: self.clone(), retry: Mutex::new(None) })))
    }

    /// Releases a claim; what was pushed meanwhile is handed back now, the path itself after `retry`.
    fn release(&self, path: &Path, key: Option<FileKey>, retry: Option<Duration>) {
        let mut c = self.claims();
        c.paths.remove(path);
        let mut now: Vec<PathBuf> = Vec::new();
        if let Some(k) = key {
            c.keys.remove(&k);
            now.extend(c.again_by_key.remove(&k).unwrap_or_default());
        }
        let wanted_again = c.again.remove(path);
        // Handed back under the lock, so `drained` never sees the claim gone and its resubmission not yet sent.
        match retry {
            Some(after) => self.resubmit(path, Instant::now() + after),
            None if wanted_again => self.resubmit(path, Instant::now()),
            None => {}
        }
        for p in now.iter().filter(|p| p.as_path() != path) {
            self.resubmit(p, Instant::now());
        }
        drop(c);
        let _ = self.0.released_tx.try_send(()); // one waiting notice is enough
    }

    fn resubmit(&self, p: &Path, due: Instant) {
        // Never fails: the receiving end lives in `self`.
        let _ = self.0.resubmit_tx.send(Resubmit { path: p.to_path_buf(), due });
    }

    /// Paths to push again (read by the feeder).
    pub fn resubmissions(&self) -> Receiver<Resubmit> {
        self.0.resubmit_rx.clone()
    }

    /// A notice after each release; see `drained`.
    pub fn releases(&self) -> Receiver<()> {
        self.0.released_rx.clone()
    }

    /// Nothing claimed and nothing handed back waiting to be pushed again.
    pub fn drained(&self) -> bool {
        let c = self.claims();
        c.paths.is_empty() && self.0.resubmit_rx.is_empty()
    }

    pub fn len(&self) -> usize {
        self.claims().paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_released_when_its_last_handle_is_dropped() {
        let f = InFlight::default();
        let c = f.claim(Path::new("/a.jpg"), None).unwrap();
        let copy = c.clone();
        assert!(f.claim(Path::new("/a.jpg"), None).is_none());
        drop(c);
        assert_eq!(f.len(), 1, "a clone still holds it");
        drop(copy);
        assert!(f.is_empty());
        assert!(f.claim(Path::new("/a.jpg"), None).is_some());
    }

    #[test]
    fn a_path_pushed_while_claimed_comes_back_on_release() {
        let f = InFlight::default();
        let again = f.resubmissions();
        let c = f.claim(Path::new("/a.jpg"), None).unwrap();
        assert!(again.try_recv().is_err());
        assert!(f.claim(Path::new("/a.jpg"), None).is_none());
        drop(c);
        let r = again.try_recv().expect("handed back once released");
        assert_eq!(r.path, PathBuf::from("/a.jpg"));
        assert!(r.due <= Instant::now());
        // Released again without a refused push in between: nothing more comes back.
        drop(f.claim(Path::new("/a.jpg"), None));
        assert!(again.try_recv().is_err());
    }

    #[test]
    fn the_same_file_under_a_second_path_waits_for_the_first_job() {
        let f = InFlight::default();
        let again = f.resubmissions();
        let old = f.claim(Path::new("/in/batch/a.jpg"), Some((1, 42))).unwrap();
        assert!(f.claim(Path::new("/in/renamed/a.jpg"), Some((1, 42))).is_none(), "same device and inode");
        assert!(f.claim(Path::new("/in/renamed/b.jpg"), Some((1, 43))).is_some(), "another file");
        drop(old);
        let r = again.try_recv().unwrap();
        assert_eq!(r.path, PathBuf::from("/in/renamed/a.jpg"));
        assert!(again.try_recv().is_err());
    }

    #[test]
    fn retry_after_hands_the_path_back_later() {
        let f = InFlight::default();
        let again = f.resubmissions();
        let c = f.claim(Path::new("/a.jpg"), Some((1, 1))).unwrap();
        let before = Instant::now();
        c.retry_after(Duration::from_secs(3));
        drop(c);
        assert!(f.is_empty(), "released at once");
        let r = again.try_recv().unwrap();
        assert_eq!(r.path, PathBuf::from("/a.jpg"));
        assert!(r.due >= before + Duration::from_secs(3));
        assert!(again.try_recv().is_err());
    }
}
