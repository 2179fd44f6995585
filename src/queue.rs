//! The bounded hand-off from the watcher to the inference workers.
//!
//! A full queue makes the pushing side wait (never drop). Each image is in the queue or in a worker at
//! most once: its job holds a claim in `InFlight` (see `job`) from `push` until the sink has written its
//! result.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

pub use crate::job::{InFlight, Resubmit};
use crate::job::{FileKey, Job, Upload};
use crate::shutdown::Shutdown;

/// A file the watcher found completely written: a candidate for a job.
#[derive(Debug, Clone)]
pub struct ReadyFile {
    pub path: PathBuf,
    /// When labeld decided the file was complete; latency is measured from here.
    pub ready_at: Instant,
}

impl ReadyFile {
    pub fn new(path: PathBuf) -> Self {
        ReadyFile { path, ready_at: Instant::now() }
    }
}

/// The file's device and inode, without following a link at its last component.
fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let meta = crate::beneath::Beneath::new(path.parent()?, path).ok()?.metadata().ok()?;
    Some((meta.dev(), meta.ino()))
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
    tx: Sender<Job>,
    in_flight: InFlight,
    shutdown: Shutdown,
}

pub type QueueReceiver = Receiver<Job>;

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
        let Some(claim) = self.in_flight.claim(&file.path, file_key(&file.path)) else {
            return Pushed::AlreadyInFlight;
        };
        if !needed(&file.path) {
            return Pushed::NotNeeded;
        }
        self.send(Job::inbox(claim, file.ready_at))
    }

    /// Queues an uploaded image; like files, it waits while the queue is full.
    pub fn push_upload(&self, upload: Upload) -> Pushed {
        self.send(Job::upload(upload))
    }

    /// Waits for room or for shutdown, whichever comes first. A job dropped here releases its claim.
    fn send(&self, job: Job) -> Pushed {
        if self.shutdown.is_triggered() {
            return Pushed::ShuttingDown;
        }
        let mut sel = crossbeam_channel::Select::new();
        let room = sel.send(&self.tx);
        sel.recv(self.shutdown.closed());
        let op = sel.select();
        if op.index() != room {
            let _ = op.recv(self.shutdown.closed());
            return Pushed::ShuttingDown;
        }
        match op.send(&self.tx, job) {
            Ok(()) => Pushed::Queued,
            Err(_) => Pushed::ShuttingDown,
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Disconnects when shutdown begins (for a `select!`).
    pub fn stopping(&self) -> &Receiver<()> {
        self.shutdown.closed()
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_triggered()
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
    pub fn next(&mut self, rx: &QueueReceiver, shutdown: &Shutdown) -> Vec<Job> {
        let mut batch = Vec::with_capacity(self.max);
        if shutdown.is_triggered() {
            return batch;
        }
        crossbeam_channel::select! {
            recv(rx) -> job => match job {
                Ok(f) => batch.push(f),
                Err(_) => return batch,
            },
            recv(shutdown.closed()) -> _ => return batch,
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

    fn path(j: &Job) -> &str {
        j.path().and_then(Path::to_str).unwrap()
    }

    #[test]
    fn the_same_image_is_queued_once_until_its_job_is_dropped() {
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::AlreadyInFlight);
        let got = rx.recv().unwrap();
        assert_eq!(path(&got), "/a.jpg");
        drop(got);
        assert_eq!(tx.push(ReadyFile::new("/a.jpg".into())), Pushed::Queued);
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
    fn a_file_under_a_second_path_is_not_queued_while_its_first_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("a.jpg"), b"x").unwrap();
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        assert_eq!(tx.push(ReadyFile::new(old.join("a.jpg"))), Pushed::Queued);
        std::fs::rename(&old, &new).unwrap();
        assert_eq!(tx.push(ReadyFile::new(new.join("a.jpg"))), Pushed::AlreadyInFlight);
        let again = tx.in_flight().resubmissions();
        drop(rx.recv().unwrap());
        assert_eq!(again.try_recv().unwrap().path, new.join("a.jpg"));
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
            seen.extend(b.iter().map(|j| path(j).to_string()));
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
        assert_eq!(b.iter().map(path).collect::<Vec<_>>(), ["/two.jpg", "/three.jpg"]);
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
