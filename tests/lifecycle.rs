//! How labeld ends: a second SIGTERM/SIGINT mid-batch exits at once with 128 + the signal (never a
//! crash), and a long-lived thread that dies makes labeld exit non-zero so that systemd restarts it.
//! The dying thread is made with the documented test hook `LABELD_TEST_PANIC_THREAD`: since a panic
//! while preprocessing an image is now contained, no input can kill a worker thread.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_second_signal_mid_batch_exits_at_once_with_128_plus_the_signal() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let s = Setup::new("channel_mean", "");
        // A forward pass that never returns on a white image: labeld is mid-batch for good.
        hanging_model(&s.model);
        let mut d = s.spawn_daemon_with(&[]);
        let idle = thread_ticks(d.pid(), "infer-0");
        solid(&s.inbox.join("white.png"), [255, 255, 255], 64, 48);
        // The white image is in the model for good once the inference thread spins (200 ms of CPU).
        d.eventually("infer-0 spinning on the white image", WAIT, || thread_ticks(d.pid(), "infer-0") >= idle + 20);
        d.signal(sig);
        d.wait_for_log("stopping: no new files", WAIT);
        std::thread::sleep(Duration::from_millis(300)); // a window in which labeld must not exit
        assert_eq!(d.exited(), None, "labeld exited on the first signal, though its batch is not done");
        d.signal(sig);
        let status = d.wait_exit();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), None, "signal {sig}: labeld crashed: {status:?}\n{}", d.log_text());
        assert_eq!(status.code(), Some(code), "signal {sig}:\n{}", d.log_text());
        assert!(d.log_text().contains("second signal: exiting now"), "{}", d.log_text());
        assert!(!sidecar(&s.inbox.join("white.png")).exists());
    }
}

#[test]
fn a_dead_decode_thread_stops_the_daemon_with_a_non_zero_exit() {
    let s = Setup::new("channel_mean", "");
    let mut d = s.spawn_daemon_with(&[("LABELD_TEST_PANIC_THREAD", "decode-0")]);
    solid(&s.inbox.join("red.png"), RED, 64, 48);
    let status = d.wait_exit();
    let log = d.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("thread died") && log.contains("decode-0"), "{log}");
    assert!(log.contains("thread decode-0 died: panicked: LABELD_TEST_PANIC_THREAD=decode-0"), "the exit names the thread and why:\n{log}");
}

#[test]
fn run_once_exits_non_zero_when_an_inference_thread_dies() {
    let s = Setup::new("channel_mean", "");
    for i in 0..3 {
        solid(&s.inbox.join(format!("red-{i}.png")), RED, 64, 48);
    }
    let out = s.labeld().env("LABELD_TEST_PANIC_THREAD", "infer-0").args(["run", "--once", "--config"]).arg(&s.config).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("thread infer-0 died"), "{log}");
    // Without the hook the same backlog is labelled and the exit is 0.
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.rows().len(), 3);
}

/// CPU time (user + system, in clock ticks) of the daemon's thread named `name`.
fn thread_ticks(pid: i32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread {name} in labeld ({pid})");
}
