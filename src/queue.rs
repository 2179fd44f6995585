//! The bounded hand-off from the watcher to the inference workers.
//!
//! A full queue makes the pushing side wait (never drop). Each image is in the queue or in a worker at
//! most once: `InFlight` remembers it from `push` until the sink has written its result.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use crate::shutdown::Shutdown;

/// An image that is completely written and should be labelled.
#[derive(Debug, Clone)]
pub struct ReadyFile {
    pub path: PathBuf,
    /// When labeld decided the file was complete; latency is measured from here.
    pub ready_at: Instant,
    /// Set for an image sent to `POST /predict`: its bytes, and where its result goes instead of a
    /// sidecar and a CSV row.
    pub upload: Option<Upload>,
    /// The version of the file that was read (set by the worker when it reads the file).
    pub identity: Option<crate::beneath::Identity>,
}

impl ReadyFile {
    pub fn new(path: PathBuf) -> Self {
        ReadyFile { path, ready_at: Instant::now(), upload: None, identity: None }
    }
}

/// An image posted over HTTP.
#[derive(Clone)]
pub struct Upload {
    pub bytes: Arc<[u8]>,
    pub reply: tokio::sync::mpsc::Sender<crate::sink::record::Record>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upload({} bytes)", self.bytes.len())
    }
}

/// Images queued or being labelled right now.
///
/// A path pushed again while it is in flight (its file was replaced while the old content was being
/// labelled) is remembered and handed back through `resubmissions` when released, so the newest
/// content is checked too.
#[derive(Clone)]
pub struct InFlight(Arc<Shared>);

struct Shared {
    claims: Mutex<Claims>,
    resubmit_tx: Sender<Resubmit>,
    resubmit_rx: Receiver<Resubmit>,
}

#[derive(Default)]
struct Claims {
    held: HashSet<PathBuf>,
    /// Held paths that were pushed again meanwhile.
    again: HashSet<PathBuf>,
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
        InFlight(Arc::new(Shared { claims: Mutex::default(), resubmit_tx, resubmit_rx }))
    }
}

impl InFlight {
    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.0.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `p`; if it is already claimed, remembers that it was wanted again.
    fn claim(&self, p: &Path) -> bool {
        let mut c = self.claims();
        if c.held.contains(p) {
            c.again.insert(p.to_path_buf());
            return false;
        }
        c.held.insert(p.to_path_buf())
    }

    /// Releases `p`; a push refused meanwhile is handed back for resubmission now.
    pub fn done(&self, p: &Path) {
        let mut c = self.claims();
        c.held.remove(p);
        if c.again.remove(p) {
            self.resubmit(p, Instant::now());
        }
    }

    /// Releases `p` and hands it back for resubmission after `after` (a fault worth retrying).
    pub fn retry_after(&self, p: &Path, after: Duration) {
        let mut c = self.claims();
        c.held.remove(p);
        c.again.remove(p);
        self.resubmit(p, Instant::now() + after);
    }

    fn resubmit(&self, p: &Path, due: Instant) {
        // Never fails: the receiving end lives in `self`.
        let _ = self.0.resubmit_tx.send(Resubmit { path: p.to_path_buf(), due });
    }

    /// Paths to push again (read by the feeder).
    pub fn resubmissions(&self) -> Receiver<Resubmit> {
        self.0.resubmit_rx.clone()
    }

    pub fn len(&self) -> usize {
        self.claims().held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, PartialEq)]
pub enum Pushed {
    Queued,
    /// Already queued or being labelled.
    AlreadyInFlight,
    /// `push_if`'s check said no.
    NotNeeded,
    /// Shutdown began while waiting for room; the image stays unlabelled and is found again at start-up.
    ShuttingDown,
}

#[derive(Clone)]
pub struct QueueSender {
    tx: Sender<ReadyFile>,
    in_flight: InFlight,
    shutdown: Shutdown,
}

pub type QueueReceiver = Receiver<ReadyFile>;

pub fn bounded(capacity: usize, in_flight: InFlight, shutdown: Shutdown) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    (QueueSender { tx, in_flight, shutdown }, rx)
}

impl QueueSender {
    /// Queues `file`, waiting while the queue is full. Blocking: call from a thread, not a task.
    pub fn push(&self, file: ReadyFile) -> Pushed {
        self.push_if(file, |_| true)
    }

    /// Like `push`, but first asks `needed` (once the image is claimed, so the answer cannot go stale
    /// because its result was being written at that moment).
    pub fn push_if(&self, file: ReadyFile, needed: impl Fn(&Path) -> bool) -> Pushed {
        if !self.in_flight.claim(&file.path) {
            return Pushed::AlreadyInFlight;
        }
        if !needed(&file.path) {
            self.in_flight.done(&file.path);
            return Pushed::NotNeeded;
        }
        let mut file = file;
        loop {
            if self.shutdown.is_triggered() {
                self.in_flight.done(&file.path);
                return Pushed::ShuttingDown;
            }
            match self.tx.send_timeout(file, Duration::from_millis(100)) {
                Ok(()) => return Pushed::Queued,
                Err(SendTimeoutError::Timeout(f)) => file = f,
                Err(SendTimeoutError::Disconnected(f)) => {
                    self.in_flight.done(&f.path);
                    return Pushed::ShuttingDown;
                }
            }
        }
    }

    /// Queues an uploaded image. It has no path to claim, so it skips the in-flight set; like files,
    /// it waits while the queue is full.
    pub fn push_upload(&self, file: ReadyFile) -> Pushed {
        let mut file = file;
        loop {
            if self.shutdown.is_triggered() {
                return Pushed::ShuttingDown;
            }
            match self.tx.send_timeout(file, Duration::from_millis(100)) {
                Ok(()) => return Pushed::Queued,
                Err(SendTimeoutError::Timeout(f)) => file = f,
                Err(SendTimeoutError::Disconnected(_)) => return Pushed::ShuttingDown,
            }
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

/// Forms batches of up to `max` files. Whatever is already queued goes at once; a partial batch
/// waits up to `max_delay` for company only while files are arriving closer together than that, so
/// at light load a lone image is not held back and under load batches fill.
pub struct Batcher {
    max: usize,
    max_delay: Duration,
    last_arrival: Option<Instant>,
}

impl Batcher {
    pub fn new(max: usize, max_delay: Duration) -> Self {
        Batcher { max, max_delay, last_arrival: None }
    }

    /// The next batch; empty once the queue is closed and drained, or when shutdown begins.
    pub fn next(&mut self, rx: &QueueReceiver, shutdown: &Shutdown) -> Vec<ReadyFile> {
        let mut batch = Vec::with_capacity(self.max);
        loop {
            if shutdown.is_triggered() {
                return batch;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => {
                    batch.push(f);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return batch,
            }
        }
        while batch.len() < self.max {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let first = batch[0].ready_at;
        let busy = batch.len() > 1 || self.last_arrival.is_some_and(|t| first.saturating_duration_since(t) < self.max_delay);
        if busy {
            let deadline = Instant::now() + self.max_delay;
            while batch.len() < self.max {
                match rx.recv_deadline(deadline) {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
        }
        self.last_arrival = batch.iter().map(|f| f.ready_at).max();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_image_is_queued_once_until_done() {
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::AlreadyInFlight);
        let got = rx.recv().unwrap();
        tx.in_flight().done(&got.path);
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
    }

    #[test]
    fn a_push_refused_while_in_flight_is_handed_back_on_release() {
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        let again = tx.in_flight().resubmissions();
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
        assert!(again.try_recv().is_err(), "nothing to hand back yet");
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::AlreadyInFlight);
        tx.in_flight().done(&rx.recv().unwrap().path);
        let r = again.try_recv().expect("the refused push comes back once the path is released");
        assert_eq!(r.path, PathBuf::from("/a.jpg"));
        assert!(r.due <= Instant::now());
        assert!(tx.in_flight().is_empty());
        // Released again without a refused push in between: nothing more comes back.
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
        tx.in_flight().done(&rx.recv().unwrap().path);
        assert!(again.try_recv().is_err());
    }

    #[test]
    fn retry_after_releases_the_claim_and_hands_the_path_back_later() {
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        let again = tx.in_flight().resubmissions();
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
        let before = Instant::now();
        tx.in_flight().retry_after(&rx.recv().unwrap().path, Duration::from_secs(3));
        assert!(tx.in_flight().is_empty(), "the claim is released at once");
        let r = again.try_recv().unwrap();
        assert_eq!(r.path, PathBuf::from("/a.jpg"));
        assert!(r.due >= before + Duration::from_secs(3));
    }

    #[test]
    fn push_if_checks_after_claiming_and_releases_when_not_needed() {
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        assert_eq!(tx.push_if(ReadyFile::new("/a.jpg".into()), |_| false), Pushed::NotNeeded);
        assert!(tx.in_flight().is_empty());
        assert_eq!(tx.push_if(ReadyFile::new("/a.jpg".into()), |p| p.ends_with("a.jpg")), Pushed::Queued);
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn a_full_queue_makes_the_producer_wait_and_loses_nothing() {
        let shutdown = Shutdown::new();
        let (tx, rx) = bounded(2, InFlight::default(), shutdown.clone());
        let producer = std::thread::spawn(move || {
            for i in 0..50 {
                assert_eq!(tx.push(ReadyFile::new(format!("/{i}.jpg").into())), Pushed::Queued);
            }
        });
        let mut seen = Vec::new();
        let mut batcher = Batcher::new(8, Duration::from_millis(5));
        loop {
            let b = batcher.next(&rx, &shutdown);
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= 8);
            seen.extend(b.into_iter().map(|f| f.path));
        }
        producer.join().unwrap();
        assert_eq!(seen.len(), 50);
    }

    #[test]
    fn a_lone_file_goes_at_once_but_a_stream_waits_for_company() {
        let shutdown = Shutdown::new();
        let (tx, rx) = bounded(8, InFlight::default(), shutdown.clone());
        let mut batcher = Batcher::new(8, Duration::from_millis(300));
        tx.push(ReadyFile::new("/one.jpg".into()));
        assert_eq!(batcher.next(&rx, &shutdown).len(), 1, "nothing else arriving: no waiting");
        // A second file right behind the first: the stream is busy, so the batcher waits for a third.
        tx.push(ReadyFile::new("/two.jpg".into()));
        let tx2 = tx.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx2.push(ReadyFile::new("/three.jpg".into()));
        });
        let b = batcher.next(&rx, &shutdown);
        late.join().unwrap();
        assert_eq!(b.iter().map(|f| f.path.to_str().unwrap()).collect::<Vec<_>>(), ["/two.jpg", "/three.jpg"]);
    }

    #[test]
    fn shutdown_releases_a_producer_blocked_on_a_full_queue() {
        let shutdown = Shutdown::new();
        let (tx, _rx) = bounded(1, InFlight::default(), shutdown.clone());
        tx.push(ReadyFile::new("/a.jpg".into()));
        let s2 = shutdown.clone();
        let h = std::thread::spawn(move || tx.push(ReadyFile::new("/b.jpg".into())));
        std::thread::sleep(Duration::from_millis(150));
        s2.trigger();
        assert_eq!(h.join().unwrap(), Pushed::ShuttingDown);
    }
}
