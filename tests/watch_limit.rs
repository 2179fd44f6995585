//! inotify's watch limit, hit for real: labeld must say which sysctl to raise and poll that inbox
//! instead of going blind. Its own test binary (not a module of tests/tests.rs), so no other test's
//! watches are live while the machine-wide limit is lowered; the old limit is put back even if the
//! test fails.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: &str = "/proc/sys/fs/inotify/max_user_watches";
const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";

/// The tests here change machine-wide settings: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Puts a /proc/sys setting back when dropped.
struct Restore(&'static str, String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, &self.1);
    }
}

fn lower(setting: &'static str, value: usize) -> Restore {
    let old = std::fs::read_to_string(setting).unwrap_or_else(|e| panic!("cannot read {setting}: {e}"));
    std::fs::write(setting, format!("{value}\n"))
        .unwrap_or_else(|e| panic!("cannot set {setting} (the test needs root and a writable /proc/sys): {e}"));
    Restore(setting, old)
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
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("channel_mean", "");
    for i in 0..40 {
        std::fs::create_dir_all(s.inbox.join(format!("line{i}"))).unwrap();
    }
    let restore = lower(LIMIT, watches_in_use() + 10);
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

#[test]
fn an_overflowing_event_queue_triggers_a_rescan_and_nothing_is_missed() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("channel_mean", "").with_workers("queue = 16\n");
    // A tiny kernel event queue: a burst of files overflows it (IN_Q_OVERFLOW).
    let restore = lower(QUEUE, 16);
    let d = s.spawn_daemon();
    drop(restore);
    let src = s.dir.path().join("src.png");
    solid(&src, RED, 8, 8);
    let bytes = std::fs::read(&src).unwrap();
    let n = 2000;
    for i in 0..n {
        std::fs::write(s.inbox.join(format!("b{i:04}.png")), &bytes).unwrap();
    }
    let count = || std::fs::read_dir(&s.inbox).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count();
    d.eventually(&format!("all {n} labelled"), Duration::from_secs(120), || {
        let done = count();
        (done >= n).then_some(()).ok_or(done)
    });
    assert!(d.log_text().contains("rescanning"), "the burst should have overflowed the event queue");
    assert!(d.stop().success());
    assert_eq!(s.rows().len(), n);
}
