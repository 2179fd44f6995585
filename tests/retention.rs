//! `[retention]` against the real binary: a small real tmpfs filling up with moved images, and old
//! files past `max_age_days` in a done folder and a quarantine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{RED, Setup, solid};

const MB: u64 = 1024 * 1024;

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None (with the reason printed) where mounting is not possible (no root, a container without
    /// CAP_SYS_ADMIN).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs at {}: {}", at.display(), String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Bytes available on the file system holding `p`.
fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs {}", p.display());
    s.f_bavail * s.f_frsize
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
}

/// `touch -h`: the link's own time, not its target's.
fn set_link_mtime(p: &Path, t: SystemTime) {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let ok = Command::new("touch").args(["-h", "-d", &format!("@{secs}")]).arg(p).status().unwrap();
    assert!(ok.success());
}

fn days_ago(d: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(d * 86_400)
}

fn metrics(addr: &str) -> String {
    let mut r = ureq::get(&format!("http://{addr}/metrics")).call().unwrap();
    r.body_mut().read_to_string().unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() as u64
}

/// `key=value` fields of every retention line in the log, summed per key.
fn removed_in_log(log: &str, key: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("retention: removed"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).map(|v| v.parse::<u64>().unwrap()))
        .sum()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 320×320 24-bit BMP: 300 KB that decodes in no time.
fn stage_image(staging: &Path, inbox: &Path, name: &str, mtime: SystemTime) {
    let p = staging.join(name);
    solid(&p, RED, 320, 320);
    set_mtime(&p, mtime);
    std::fs::rename(&p, inbox.join(name)).unwrap(); // same file system: the mtime stays
}

#[test]
fn a_filling_tmpfs_gets_its_oldest_moved_images_removed_and_nothing_else() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmin_free_mb = 4\ninterval_s = 10\n");
    let disk = s.dir.path().join("disk");
    let Some(_mount) = Tmpfs::mount(&disk, "8m") else { return };
    // The hardest placement: done_dir is a dot-folder inside the inbox, all on the small disk.
    s.edit_config("path = \"inbox\"\nsettle_ms = 200\n", "path = \"disk/inbox\"\nsettle_ms = 200\nrecursive = false\non_done = \"move\"\ndone_dir = \"disk/inbox/.done\"\n");
    let (inbox, done, staging) = (disk.join("inbox"), disk.join("inbox/.done"), disk.join("staging"));
    for d in [&inbox.join("later"), &done, &staging] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Inbox files labeld does not label (a folder it does not watch, a text file): the oldest on the disk.
    let untouched = [inbox.join("later/unlabelled-1.bmp"), inbox.join("later/unlabelled-2.bmp"), inbox.join("notes.txt")];
    for p in &untouched[..2] {
        solid(p, RED, 320, 320);
    }
    std::fs::write(&untouched[2], "camera 3 is off\n").unwrap();
    for p in &untouched {
        set_mtime(p, days_ago(2000));
    }
    let outside = s.dir.path().join("outside.jpg");
    std::fs::write(&outside, b"not labeld's").unwrap();
    let link = done.join("aaa-link.jpg");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    set_link_mtime(&link, days_ago(3000));

    let d = s.spawn_daemon();
    let addr = d.http_addr();
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    let name = |i: usize| format!("img-{i:02}.bmp");
    let mut sent = 0;
    let free_at_start = free_bytes(&disk);
    let mut lowest_free = free_at_start;
    // Waves of images until the disk would fill; a sweep frees space between waves.
    for (wave, count) in [(1, 16), (2, 8)] {
        for _ in 0..count {
            stage_image(&staging, &inbox, &name(sent), t0 + Duration::from_secs(60 * sent as u64));
            sent += 1;
        }
        wait_until("the wave labelled and moved", Duration::from_secs(60), || {
            (0..sent).all(|i| !inbox.join(name(i)).exists())
        });
        lowest_free = lowest_free.min(free_bytes(&disk));
        wait_until("a sweep removed images", Duration::from_secs(40), || d.count_in_log("retention: removed") >= wave);
        wait_until("free space back above 4 MB", Duration::from_secs(40), || free_bytes(&disk) >= 4 * MB);
    }
    let free_at_end = free_bytes(&disk);

    // The oldest went with their sidecars; what is left is the newest, each with its sidecar.
    let present: Vec<bool> = (0..sent).map(|i| done.join(name(i)).exists()).collect();
    let removed = present.iter().take_while(|p| !**p).count();
    assert!(removed > 0 && present[removed..].iter().all(|p| *p), "not the oldest first: {present:?}");
    for i in 0..sent {
        let side = done.join(format!("{}.json", name(i)));
        assert_eq!(side.exists(), i >= removed, "sidecar of {} (removed: {removed})", name(i));
    }
    assert!(present[sent - 4..].iter().all(|p| *p), "the newest are kept");
    for p in &untouched {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{} was touched: {e}", p.display()));
        assert!(m.modified().unwrap() < days_ago(1999), "{} changed", p.display());
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the planted link is left alone");
    assert_eq!(std::fs::read(&outside).unwrap(), b"not labeld's");
    assert!(!inbox.join("later/unlabelled-1.bmp.json").exists());

    let log = d.log_text();
    let (files, bytes) = (removed_in_log(&log, "files"), removed_in_log(&log, "bytes"));
    assert_eq!(files, removed as u64, "{log}");
    let m = metrics(&addr);
    assert_eq!(metric(&m, "labeld_retention_removed_files_total"), files);
    assert_eq!(metric(&m, "labeld_retention_removed_bytes_total"), bytes);
    assert!(metric(&m, "labeld_retention_sweeps_total") >= 2);
    assert!(m.contains("labeld_retention_free_bytes{folder="), "{m}");
    let line = log.lines().find(|l| l.contains("retention: removed")).unwrap();
    assert!(line.contains("by_low_space=") && line.contains("free_mb_before=") && line.contains("free_mb_after=") && line.contains("links_left_alone=1"), "{line}");
    assert!(d.stop().success());
    println!(
        "tmpfs 8 MiB, min_free_mb = 4: {sent} images of 300 KB arrived in 2 waves; {files} removed ({bytes} bytes, images + sidecars), \
         the {} newest kept; free: {:.2} MiB at start, {:.2} MiB at the lowest, {:.2} MiB at the end",
        sent - removed,
        free_at_start as f64 / MB as f64,
        lowest_free as f64 / MB as f64,
        free_at_end as f64 / MB as f64
    );
    for l in log.lines().filter(|l| l.contains("retention: removed")) {
        println!("  {l}");
    }
}

#[test]
fn images_older_than_max_age_days_leave_done_and_quarantine_with_their_sidecars() {
    let s = Setup::new("channel_mean", "\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\nquarantine = \"rejects\"\n");
    let (done, rejects) = (s.dir.path().join("done"), s.dir.path().join("rejects"));
    std::fs::create_dir_all(done.join("cam1/2025-01")).unwrap();
    std::fs::create_dir_all(&rejects).unwrap();
    let old = [done.join("cam1/2025-01/old.jpg"), done.join("old2.png"), rejects.join("broken.jpg")];
    let kept = [done.join("new.jpg"), done.join("results-copy.csv"), done.join("old-notes.txt")];
    for p in old.iter().chain(&kept) {
        std::fs::write(p, vec![7u8; 1000]).unwrap();
        if p.extension().is_some_and(|e| e != "csv" && e != "txt") {
            std::fs::write(p.with_file_name(format!("{}.json", p.file_name().unwrap().to_string_lossy())), "{}").unwrap();
        }
    }
    for p in &old {
        set_mtime(p, days_ago(40));
    }
    for p in &kept[1..] {
        set_mtime(p, days_ago(400)); // old, but not an image: not retention's
    }
    set_mtime(&kept[0], days_ago(29));
    let outside = s.dir.path().join("outside.jpg");
    std::fs::write(&outside, b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, done.join("link.jpg")).unwrap();
    set_link_mtime(&done.join("link.jpg"), days_ago(400));

    let check = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(shown.contains("[retention]\nmax_age_days = 30\ninterval_s = 10\n"), "{shown}");

    let d = s.spawn_daemon();
    d.wait_for_log("retention: removed", Duration::from_secs(30));
    for p in &old {
        assert!(!p.exists(), "{} is 40 days old", p.display());
        assert!(!p.with_file_name(format!("{}.json", p.file_name().unwrap().to_string_lossy())).exists(), "its sidecar went too");
    }
    assert!(!done.join("cam1").exists(), "folders emptied by the sweep go");
    assert!(done.is_dir() && rejects.is_dir(), "the configured folders stay");
    for p in &kept {
        assert!(p.exists(), "{} was removed", p.display());
    }
    assert!(done.join("new.jpg.json").exists());
    assert!(std::fs::symlink_metadata(done.join("link.jpg")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");

    // An image taken 31 days ago and labelled now: moved with its mtime, removed at the next sweep.
    let late = s.dir.path().join("late.png");
    solid(&late, RED, 64, 48);
    set_mtime(&late, days_ago(31));
    std::fs::rename(&late, s.inbox.join("late.png")).unwrap();
    wait_until("late.png labelled and moved", Duration::from_secs(30), || done.join("late.png.json").exists());
    wait_until("late.png removed by the next sweep", Duration::from_secs(30), || !done.join("late.png").exists() && !done.join("late.png.json").exists());
    let log = d.log_text();
    assert!(d.stop().success());
    println!("max_age_days = 30: removed {} files ({} bytes)", removed_in_log(&log, "files"), removed_in_log(&log, "bytes"));
    for l in log.lines().filter(|l| l.contains("retention: removed")) {
        println!("  {l}");
    }
}

#[test]
fn a_retention_section_without_a_limit_is_a_config_error() {
    let s = Setup::new("channel_mean", "\n[retention]\ninterval_s = 60\n");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[retention]") && err.contains("max_age_days"), "{err}");
}

#[test]
fn a_reload_that_adds_retention_sweeps_at_once() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    let done = s.dir.path().join("done");
    std::fs::create_dir_all(&done).unwrap();
    std::fs::write(done.join("old.jpg"), b"x").unwrap();
    set_mtime(&done.join("old.jpg"), days_ago(100));
    let d = s.spawn_daemon();
    std::thread::sleep(Duration::from_millis(500));
    assert!(done.join("old.jpg").exists(), "no [retention], nothing removed");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("{text}\n[retention]\nmax_age_days = 30\ninterval_s = 3600\n")).unwrap();
    d.signal(1);
    d.wait_for_log("config reloaded", Duration::from_secs(30));
    // Not an hour later: the reload wakes the sweeper.
    wait_until("old.jpg removed after the reload", Duration::from_secs(10), || !done.join("old.jpg").exists());
    assert!(d.stop().success());
}
