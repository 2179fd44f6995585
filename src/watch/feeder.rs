//! The feeder: moves ready files into the bounded queue from its own thread, so a full queue never
//! stalls event handling, and pushes again what the in-flight set hands back (a file replaced while
//! it was being labelled, a fault to retry later).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::error::Fatal;
use crate::health::Lifeline;
use crate::queue::{Pushed, QueueSender, ReadyFile, Resubmit};
use crate::labelled::is_labelled;

pub struct Feeder {
    tx: Sender<ReadyFile>,
    handle: std::thread::JoinHandle<()>,
}

impl Feeder {
    pub fn start(queue: QueueSender, lifeline: Lifeline) -> Result<Feeder, Fatal> {
        let (tx, rx) = crossbeam_channel::unbounded::<ReadyFile>();
        let resubmits = queue.in_flight().resubmissions();
        let handle = std::thread::Builder::new()
            .name("feeder".into())
            .spawn(move || {
                let _line = lifeline;
                feed(rx, resubmits, queue)
            })
            .map_err(|e| Fatal::io("cannot start feeder thread", e))?;
        Ok(Feeder { tx, handle })
    }

    pub fn sender(&self) -> Sender<ReadyFile> {
        self.tx.clone()
    }

    /// Waits until everything handed over so far is queued (or shutdown began).
    pub fn finish(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

/// Blocks on its inputs and on the earliest retry deadline. Once every sender of ready files is gone
/// (`run --once` has queued its backlog, or shutdown), it still pushes what released claims hand back at
/// once (the same file under a second name, e.g. a hard link, waits for the first), until nothing is in
/// flight; retries waiting out a back-off are left for the next start. Ends then, or when shutdown began.
fn feed(rx: Receiver<ReadyFile>, resubmits: Receiver<Resubmit>, queue: QueueSender) {
    let mut later: BinaryHeap<Reverse<(Instant, PathBuf)>> = BinaryHeap::new();
    let mut input = Some(rx);
    let releases = queue.in_flight().releases();
    loop {
        let timer = match later.peek() {
            Some(Reverse((due, _))) if input.is_some() => crossbeam_channel::at(*due),
            _ => crossbeam_channel::never(),
        };
        let files = input.clone().unwrap_or_else(crossbeam_channel::never);
        // With the input closed, each release is a moment to see whether everything is done.
        let released = if input.is_none() { releases.clone() } else { crossbeam_channel::never() };
        let stopping = if input.is_none() { queue.stopping().clone() } else { crossbeam_channel::never() };
        let pushed = crossbeam_channel::select! {
            recv(files) -> file => match file {
                Ok(file) => offer(&queue, file),
                Err(_) => {
                    input = None;
                    Pushed::Queued
                }
            },
            recv(resubmits) -> r => match r {
                Ok(r) if r.due <= Instant::now() => offer(&queue, ReadyFile::new(r.path)),
                Ok(r) => {
                    later.push(Reverse((r.due, r.path)));
                    Pushed::Queued
                }
                Err(_) => break,
            },
            recv(timer) -> _ => {
                let mut pushed = Pushed::Queued;
                while later.peek().is_some_and(|Reverse((due, _))| *due <= Instant::now()) && pushed != Pushed::ShuttingDown {
                    if let Some(Reverse((_, path))) = later.pop() {
                        pushed = offer(&queue, ReadyFile::new(path));
                    }
                }
                pushed
            },
            recv(released) -> _ => Pushed::Queued,
            recv(stopping) -> _ => Pushed::ShuttingDown,
        };
        let done = input.is_none() && queue.in_flight().drained();
        if pushed == Pushed::ShuttingDown || done || (input.is_none() && queue.shutting_down()) {
            break;
        }
    }
    if !later.is_empty() {
        tracing::info!(images = later.len(), "images waiting for a retry are left for the next start's scan");
    }
}

/// The image may have been labelled since it was seen (duplicate events, rescans, resubmissions).
fn offer(queue: &QueueSender, file: ReadyFile) -> Pushed {
    queue.push_if(file, |p| !is_labelled(p))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::Job;
    use crate::queue::{InFlight, bounded};
    use crate::shutdown::Shutdown;

    /// A running feeder in front of a queue, and one image offered to it and taken from the queue.
    fn feeder_with_one_image() -> (tempfile::TempDir, std::path::PathBuf, Feeder, crate::queue::QueueReceiver, Job) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.jpg");
        std::fs::write(&img, b"x").unwrap();
        let (tx, rx) = bounded(4, InFlight::default(), Shutdown::new());
        let feeder = Feeder::start(tx, crate::health::Health::new().lifeline("feeder", &Shutdown::new())).unwrap();
        feeder.sender().send(ReadyFile::new(img.clone())).unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        (dir, img, feeder, rx, first)
    }

    #[test]
    fn a_retried_path_is_queued_again_after_its_delay_and_not_before() {
        let (_dir, img, feeder, rx, first) = feeder_with_one_image();
        let released = Instant::now();
        first.claim().unwrap().retry_after(Duration::from_millis(300));
        drop(first);
        let again = rx.recv_timeout(Duration::from_secs(5)).expect("queued again after the delay");
        assert_eq!(again.path(), Some(img.as_path()));
        assert!(released.elapsed() >= Duration::from_millis(300), "queued again too early");
        drop(again);
        feeder.finish();
    }

    #[test]
    fn a_replacement_refused_while_in_flight_is_queued_once_the_old_one_is_done() {
        let (_dir, img, feeder, rx, old) = feeder_with_one_image();
        feeder.sender().send(ReadyFile::new(img.clone())).unwrap(); // the replacement's event
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "not while the old content is in flight");
        drop(old);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().path(), Some(img.as_path()));
        feeder.finish();
    }
}
