//! How many libtorch intra-op threads each forward pass gets, decided per batch from the load.
//!
//! A lone image (no other worker running the model, nothing waiting in the queue) gets every CPU
//! labeld may use, so its latency is as low as the box allows; that pass runs on the solo thread, the
//! only one with that many threads (`infer::solo` says why). Under load each worker keeps its share
//! (CPUs ÷ workers), so the workers overlap decoding and inference instead of fighting over cores,
//! which is the faster layout for a backlog. An explicit `[workers] threads` fixes the count.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::WorkersConfig;

pub struct Layout {
    /// Threads per worker while others may be busy.
    share: usize,
    /// Threads for a forward pass that has the box to itself.
    whole: usize,
    /// Workers running the model right now.
    running: AtomicUsize,
}

/// A forward pass in progress; dropping it ends it.
pub struct Pass<'a> {
    layout: &'a Layout,
    pub threads: usize,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.layout.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Layout {
    pub fn new(cfg: &WorkersConfig) -> Arc<Layout> {
        Arc::new(Layout { share: cfg.threads, whole: cfg.threads_alone.max(cfg.threads), running: AtomicUsize::new(0) })
    }

    /// Starts a forward pass; `queued` is the number of images waiting for a worker. The pass gets the
    /// whole box only when it is the only one running and nothing is waiting.
    pub fn begin(&self, queued: usize) -> Pass<'_> {
        let others = self.running.fetch_add(1, Ordering::SeqCst);
        let threads = if others == 0 && queued == 0 { self.whole } else { self.share };
        Pass { layout: self, threads }
    }

    /// The threads each worker runs its passes on (and loads with).
    pub fn share(&self) -> usize {
        self.share
    }

    /// The threads of a pass that has the box to itself (run on the solo thread, `infer::solo`).
    pub fn whole(&self) -> usize {
        self.whole
    }
}

/// Sets the calling thread's libtorch intra-op threads. libtorch initialises a thread's setting from
/// the last value any thread set, on the thread's first operator (or query): do that first, so the
/// value set here stays this thread's own.
pub fn set_threads(n: usize) {
    let _ = tch::get_num_threads();
    tch::set_num_threads(n as i32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(share: usize, whole: usize) -> Arc<Layout> {
        Arc::new(Layout { share, whole, running: AtomicUsize::new(0) })
    }

    #[test]
    fn a_lone_image_gets_the_whole_box_and_concurrent_passes_their_share() {
        let l = layout(1, 2);
        let first = l.begin(0);
        assert_eq!(first.threads, 2, "alone, nothing queued");
        let second = l.begin(0);
        assert_eq!(second.threads, 1, "another pass is running");
        drop(first);
        drop(second);
        assert_eq!(l.begin(3).threads, 1, "a backlog is waiting");
        assert_eq!(l.begin(0).threads, 2, "ended passes no longer count");
    }

    /// The layout relies on libtorch's intra-op setting being per calling thread (OpenMP's is), also
    /// when another thread changes its own setting before this one first runs an operator (without
    /// `set_threads`' first step, the other thread's 2 wins here).
    #[test]
    fn libtorch_intra_op_threads_are_set_per_thread() {
        use std::sync::Barrier;
        let order = Arc::new(Barrier::new(2));
        let b_order = order.clone();
        let work = || {
            let m = tch::Tensor::ones([512, 512], (tch::Kind::Float, tch::Device::Cpu));
            let _ = m.matmul(&m).sum(tch::Kind::Float).double_value(&[]);
        };
        let b = std::thread::spawn(move || {
            set_threads(1);
            b_order.wait(); // the other thread sets 2 ...
            b_order.wait(); // ... and has run an operator with it
            work();
            tch::get_num_threads()
        });
        order.wait();
        set_threads(2);
        work();
        let a = tch::get_num_threads();
        order.wait();
        assert_eq!((a, b.join().unwrap()), (2, 1));
    }
}
