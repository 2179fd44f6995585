//! Changes of the mount table. A file system mounted over an inbox folder, or unmounted from under it,
//! makes no inotify event in any folder; the kernel marks `/proc/self/mountinfo` instead (POLLPRI), and
//! a thread waiting on that says so.

use std::fs::File;
use std::io::{PipeWriter, Write};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

/// The thread waiting for mount table changes; dropping this stops it.
pub(super) struct MountChanges {
    /// Closed (dropped) to wake the thread and end it.
    stop: Option<PipeWriter>,
    thread: Option<JoinHandle<()>>,
}

impl MountChanges {
    /// Sends `()` on `changed` after every change of the mount table. `None` (logged) where there is no
    /// `/proc`.
    pub fn start(changed: Sender<()>) -> Option<MountChanges> {
        let started = (|| {
            let table = File::open("/proc/self/mountinfo")?;
            let (stop_rx, stop_tx) = std::io::pipe()?;
            let thread = std::thread::Builder::new().name("mount-watch".into()).spawn(move || {
                let mut fds = [
                    libc::pollfd { fd: table.as_raw_fd(), events: libc::POLLPRI, revents: 0 },
                    libc::pollfd { fd: stop_rx.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                loop {
                    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call, and both
                    // descriptors stay open (owned by this closure) while it runs.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                    if n < 0 {
                        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                            continue;
                        }
                        return;
                    }
                    if fds[1].revents != 0 {
                        return; // the owner dropped the pipe's other end
                    }
                    // The kernel notes at each poll which change it reported: no read is needed.
                    if fds[0].revents & (libc::POLLPRI | libc::POLLERR) != 0 && changed.send(()).is_err() {
                        return;
                    }
                }
            })?;
            Ok::<_, std::io::Error>(MountChanges { stop: Some(stop_tx), thread: Some(thread) })
        })();
        match started {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow mount table changes: a file system mounted over or unmounted from an inbox is noticed only at a reload");
                None
            }
        }
    }
}

impl Drop for MountChanges {
    fn drop(&mut self) {
        if let Some(mut stop) = self.stop.take() {
            let _ = stop.write_all(b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_thread_ends_at_once_when_dropped() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = MountChanges::start(tx).expect("/proc/self/mountinfo");
        let t = Instant::now();
        drop(m);
        assert!(t.elapsed() < Duration::from_secs(1));
        // Whatever it reported (a poll reports the table as changed once, at first), it is gone.
        while rx.try_recv().is_ok() {}
        assert!(rx.recv_timeout(Duration::from_millis(10)).is_err());
    }
}
