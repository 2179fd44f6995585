//! The one thread that runs a forward pass on every CPU: the pass of an image that has the box to
//! itself (see `layout`).
//!
//! libtorch's intra-op threads are GNU OpenMP teams, one per calling thread. OpenMP lets a team's
//! helpers spin between the ~60 parallel regions of a forward pass only while the process's OpenMP
//! threads (one, plus every team's helpers, idle ones included) are no more than the CPUs; beyond that
//! they sleep after ~100 spins and each region pays a futex wake-up. With two workers that each grew a
//! two-thread team on a two-CPU box, a two-thread pass ran no faster than a one-thread pass. So the
//! workers never grow their teams: each stays at its share (one thread on two CPUs: no helper at all),
//! and a pass that has the box to itself is handed to this thread, the only one with a larger team. Its
//! thread count never changes, so libtorch keeps its oneDNN primitives (it drops them all whenever a
//! thread's count changes).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::backend::{Backend, Failure};
use crate::error::panic_message;

/// One image's ranked (class, probability) pairs, or why the model failed on it alone.
pub type Ranked = Result<Vec<(usize, f32)>, String>;

/// How a batch is ranked, wherever it runs: see `worker::rank`.
pub type RankFn = fn(&dyn Backend, u32, &[f32], usize, usize) -> Result<Vec<Ranked>, Failure>;

struct Request {
    model: Arc<dyn Backend>,
    crop: u32,
    data: Vec<f32>,
    n: usize,
    k: usize,
    reply: Sender<Result<Vec<Ranked>, Failure>>,
}

/// Hands passes to the solo thread; cloned into every worker. The thread ends when the last clone goes.
#[derive(Clone)]
pub struct Solo {
    tx: Sender<Request>,
    threads: usize,
}

impl Solo {
    /// Starts the thread with `threads` intra-op threads, ranking with `rank`.
    pub fn start(threads: usize, rank: RankFn) -> std::io::Result<(Solo, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::bounded::<Request>(1);
        let handle = std::thread::Builder::new().name("infer-solo".into()).spawn(move || serve(&rx, threads, rank))?;
        Ok((Solo { tx, threads }, handle))
    }

    /// The intra-op threads its passes run with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Ranks `n` images on the solo thread and waits for the result; `None` if the thread is gone
    /// (the caller then runs the pass itself).
    pub fn rank(&self, model: &Arc<dyn Backend>, crop: u32, data: &[f32], n: usize, k: usize) -> Option<Result<Vec<Ranked>, Failure>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let request = Request { model: model.clone(), crop, data: data.to_vec(), n, k, reply };
        self.tx.send(request).ok()?;
        answer.recv().ok()
    }

    /// Runs the model once on its test input on the solo thread, so that the first lone image after a
    /// start or a model switch does not pay for creating the model's kernels for this thread count.
    pub fn warm(&self, model: &Arc<dyn Backend>, crop: u32) {
        let zeros = vec![0f32; 3 * (crop as usize) * (crop as usize)];
        let _ = self.rank(model, crop, &zeros, 1, 1);
    }
}

fn serve(requests: &Receiver<Request>, threads: usize, rank: RankFn) {
    super::layout::set_threads(threads);
    for r in requests {
        // A panic here is the model's (libtorch's own are caught inside the backend): the batch fails
        // as the model's fault and the thread lives on.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rank(&*r.model, r.crop, &r.data, r.n, r.k)))
            .unwrap_or_else(|p| Err(Failure::Model(format!("the model panicked: {}", panic_message(&*p)))));
        let _ = r.reply.send(result);
    }
}
