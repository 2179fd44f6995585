//! Gives memory back after a burst. glibc's malloc keeps the pages a burst of uploads or a backlog
//! freed (in every thread's arena), so RSS would stay at the burst's peak; once labeld has been quiet
//! for `QUIET`, `malloc_trim(0)` returns the free pages of every arena to the kernel. Stages call
//! `busy()` when they finish work; the trimmer thread waits for those notices, the quiet deadline or
//! shutdown, never on a fixed tick.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::shutdown::Shutdown;

/// How long labeld must have been idle before it trims.
pub const QUIET: Duration = Duration::from_secs(2);

static NOTICES: OnceLock<Sender<()>> = OnceLock::new();

/// Says that work just finished (a batch written, an upload answered); cheap, never blocks.
pub fn busy() {
    if let Some(tx) = NOTICES.get() {
        match tx.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }
}

/// Starts the trimmer (once per process; a second call returns None).
pub fn start_trimmer(shutdown: Shutdown) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if NOTICES.set(tx).is_err() {
        return Ok(None);
    }
    std::thread::Builder::new().name("trimmer".into()).spawn(move || trim_after_bursts(&rx, &shutdown)).map(Some)
}

fn trim_after_bursts(notices: &Receiver<()>, shutdown: &Shutdown) {
    let mut due: Option<Instant> = None;
    loop {
        let deadline = due.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
        crossbeam_channel::select! {
            recv(notices) -> _ => due = Some(Instant::now() + QUIET),
            recv(deadline) -> _ => {
                due = None;
                trim();
            }
            recv(shutdown.closed()) -> _ => return,
        }
    }
}

/// Returns every arena's free pages to the kernel.
pub fn trim() {
    // SAFETY: malloc_trim only walks glibc's own heap structures under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
