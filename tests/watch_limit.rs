//! inotify's watch limit, hit for real: labeld must say which sysctl to raise and poll that inbox
//! instead of going blind. Its own test binary, so no other test's watches are live while the
//! machine-wide limit is lowered; the old limit is put back even if the test fails.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: &str = "/proc/sys/fs/inotify/max_user_watches";

struct Restore(String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(LIMIT, &self.0);
    }
}

/// inotify watches this user holds right now, across all processes.
fn watches_in_use() -> usize {
    let mut n = 0;
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_to_string(fd.path()) {
                n += t.lines().filter(|l| l.starts_with("inotify wd:")).count();
            }
        }
    }
    n
}

#[test]
fn hitting_the_inotify_watch_limit_falls_back_to_polling() {
    let Ok(old) = std::fs::read_to_string(LIMIT) else {
        panic!("cannot read {LIMIT}");
    };
    let s = Setup::new("channel_mean", "");
    for i in 0..40 {
        std::fs::create_dir_all(s.inbox.join(format!("line{i}"))).unwrap();
    }
    let in_use = watches_in_use();
    if std::fs::write(LIMIT, format!("{}\n", in_use + 10)).is_err() {
        panic!("cannot lower {LIMIT} (the test needs root and a writable /proc/sys)");
    }
    let restore = Restore(old);
    let d = s.spawn_daemon();
    drop(restore); // the daemon has met the limit; put it back before anything else needs watches
    let log = d.log_text();
    assert!(log.contains("fs.inotify.max_user_watches"), "{log}");
    assert!(log.contains("polling"), "{log}");
    solid(&s.inbox.join("line33/late.png"), GREEN, 12, 12);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("line33/late.png"), Duration::from_secs(30))).0, 1);
    assert!(d.stop().success());
    assert!(Path::new(LIMIT).exists());
}
