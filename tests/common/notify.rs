//! Stands in for systemd: the datagram socket a daemon's `NOTIFY_SOCKET` names. A thread records
//! every message as it arrives (so labeld never blocks on a full socket); each `Notifications` handle
//! reads the record in order from its own cursor.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wait::{Shown, eventually};

/// Every message received so far, in order.
type Record = Arc<Mutex<Vec<String>>>;

pub struct Notifications {
    record: Record,
    path: PathBuf,
    /// Messages before this one have been read by `wait_for` or `drain`.
    cursor: usize,
}

impl Notifications {
    /// Binds a fresh socket in `dir` (writable by any user, for a daemon run as another one) and
    /// starts recording.
    pub fn bind(dir: &Path) -> Notifications {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = dir.join(format!("notify-{}.sock", N.fetch_add(1, Ordering::Relaxed)));
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let record: Record = Arc::default();
        let mine = record.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Until every handle is gone.
            while Arc::strong_count(&mine) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    mine.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        Notifications { record, path, cursor: 0 }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Another handle on the same record, reading from the first message.
    pub fn handle(&self) -> Notifications {
        Notifications { record: self.record.clone(), path: self.path.clone(), cursor: 0 }
    }

    /// Every message received so far.
    pub fn all(&self) -> Vec<String> {
        self.record.lock().unwrap().clone()
    }

    /// The messages read so far through this handle.
    pub fn seen(&self) -> Vec<String> {
        self.record.lock().unwrap()[..self.cursor].to_vec()
    }

    /// True once any message so far has a line equal to `line` (the cursor does not move).
    pub fn has_line(&self, line: &str) -> bool {
        self.record.lock().unwrap().iter().any(|m| m.lines().any(|l| l == line))
    }

    /// Reads messages until one has a line that is `needle` or starts with it; returns that message.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line(needle, timeout, |l| l == needle || l.starts_with(needle))
    }

    /// Reads messages until one has a line for which `want` holds; returns that message.
    pub fn wait_for_line(&mut self, what: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let found = self.read_until(what, timeout, |unread| unread.iter().position(|m| m.lines().any(&want)).map(|i| i + 1));
        found.last().unwrap().clone()
    }

    /// Reads the messages after the cursor until `enough` says how many of them make what is awaited;
    /// returns those and moves the cursor past them.
    pub fn read_until(&mut self, what: &str, timeout: Duration, enough: impl Fn(&[String]) -> Option<usize>) -> Vec<String> {
        let record = self.record.clone();
        let cursor = self.cursor;
        let got = eventually(format!("{what} from labeld"), timeout, || {
            let messages = record.lock().unwrap();
            enough(&messages[cursor..]).map(|n| messages[cursor..cursor + n].to_vec()).ok_or_else(|| Shown(messages.clone()))
        });
        self.cursor += got.len();
        got
    }

    /// Every message that arrives within `window` from now (a fixed window: for asserting what does
    /// and does not arrive in it).
    pub fn drain(&mut self, window: Duration) -> Vec<String> {
        std::thread::sleep(window);
        let messages = self.record.lock().unwrap();
        let got = messages[self.cursor..].to_vec();
        self.cursor = messages.len();
        got
    }
}
