//! `[retention]` against the real binary: a small real tmpfs filling up with moved images, old files
//! past `max_age_days` in a done folder and a quarantine, and the set-ups a hostile or careless
//! operator makes: archive folders that are inboxes or hold them, links, folders swapped while
//! running, unrelated data, files still being written, and `kill -9` in the middle of archiving. Each
//! asserts that no file without an archive record was removed and nothing outside changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use crate::common::{RED, Setup, eventually, solid};

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

fn wait_until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    eventually(what, timeout, done);
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

/// Every path below `root` (links not followed) with what it is: kind, size, mtime and a hash of the
/// bytes for files, the target for links. Two equal snapshots: nothing there changed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false).into_iter().filter_map(Result::ok) {
        let m = e.path().symlink_metadata().unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            format!("file {} {:?} {:x}", m.len(), m.modified().unwrap(), xxhash_rust::xxh3::xxh3_64(&bytes))
        } else {
            "dir".to_string()
        };
        out.insert(e.path().to_path_buf(), what);
    }
    out
}

fn assert_unchanged(before: &BTreeMap<PathBuf, String>, root: &Path) {
    assert_unchanged_but(before, root, &[]);
}

/// Like `assert_unchanged`, except for the files of `except` (the test's own).
fn assert_unchanged_but(before: &BTreeMap<PathBuf, String>, root: &Path, except: &[&Path]) {
    let mut after = snapshot(root);
    let mut before = before.clone();
    for p in except {
        before.remove(*p);
        after.remove(*p);
    }
    for (p, was) in &before {
        assert_eq!(after.get(p), Some(was), "{} changed", p.display());
    }
    for p in after.keys() {
        assert!(before.contains_key(p), "{} appeared", p.display());
    }
}

fn years_ago(y: u64) -> SystemTime {
    days_ago(y * 365)
}

/// Someone else's old photo with a file beside it that only looks like its sidecar.
fn plant_foreign(dir: &Path, name: &str) -> [PathBuf; 2] {
    std::fs::create_dir_all(dir).unwrap();
    let (img, side) = (dir.join(name), dir.join(format!("{name}.json")));
    solid(&img, RED, 32, 32);
    std::fs::write(&side, r#"{"path":"/elsewhere/x.jpg","status":"ok","top":[]}"#).unwrap();
    for p in [&img, &side] {
        set_mtime(p, years_ago(6));
    }
    [img, side]
}

/// Images of `(name, colour)` taken `mtime`, renamed into `inbox` whole (a camera's upload).
fn arrive(s: &Setup, inbox: &Path, names: &[&str], mtime: SystemTime, broken: bool) {
    let staging = s.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for name in names {
        let p = staging.join(name.replace('/', "_"));
        if broken {
            std::fs::write(&p, b"not an image at all").unwrap();
        } else {
            solid(&p, RED, 64, 48);
        }
        set_mtime(&p, mtime);
        let to = inbox.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(&p, &to).unwrap();
    }
}

#[test]
fn images_older_than_max_age_days_leave_done_and_quarantine_with_their_sidecars_and_nothing_else_does() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\nquarantine = \"rejects\"\n");
    let (done, rejects) = (s.dir.path().join("done"), s.dir.path().join("rejects"));
    // In the done folder before labeld: not its own, whatever their age and names.
    let foreign = plant_foreign(&done.join("cam1/2025-01"), "old.png");
    std::fs::write(done.join("results-copy.csv"), "a,b\n").unwrap();
    std::fs::write(done.join("old-notes.txt"), "n\n").unwrap();
    for p in [done.join("results-copy.csv"), done.join("old-notes.txt")] {
        set_mtime(&p, days_ago(400));
    }
    let outside = s.dir.path().join("outside.jpg");
    std::fs::write(&outside, b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, done.join("link.jpg")).unwrap();
    set_link_mtime(&done.join("link.jpg"), days_ago(400));
    let planted = snapshot(&done.join("cam1"));

    let check = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(shown.contains("[retention]\nmax_age_days = 30\ninterval_s = 10\n"), "{shown}");

    let d = s.spawn_daemon();
    let addr = d.http_addr();
    // Photos taken 40 days ago arrive now (one in a sub-folder with the same name as a foreign one), one
    // broken; one taken 29 days ago.
    arrive(&s, &s.inbox, &["cam1/2025-01/old.png", "old2.png"], days_ago(40), false);
    arrive(&s, &s.inbox, &["broken.jpg"], days_ago(40), true);
    arrive(&s, &s.inbox, &["new.png"], days_ago(29), false);
    wait_until("all four labelled", Duration::from_secs(30), || s.csv.exists() && s.rows().len() == 4);
    // Its row is written before it moves: the young image archived, to check below that it stays.
    wait_until("new.png archived", Duration::from_secs(30), || done.join("new.png.json").exists());
    // The archived old ones go at a sweep; the foreign files and the 29-day-old image stay.
    let gone = [done.join("cam1/2025-01/old~1.png"), done.join("old2.png"), rejects.join("broken.jpg")];
    wait_until("the archived old images removed", Duration::from_secs(40), || {
        gone.iter().all(|p| !p.exists() && !p.with_file_name(format!("{}.json", p.file_name().unwrap().to_string_lossy())).exists())
    });
    assert!(done.join("new.png").exists() && done.join("new.png.json").exists());
    assert_unchanged(&planted, &done.join("cam1"));
    for p in foreign.iter().chain([&done.join("results-copy.csv"), &done.join("old-notes.txt"), &outside]) {
        assert!(p.exists(), "{} was removed", p.display());
    }
    assert!(std::fs::symlink_metadata(done.join("link.jpg")).unwrap().file_type().is_symlink());
    assert!(done.is_dir() && rejects.is_dir(), "the configured folders stay");
    let m = metrics(&addr);
    let foreign_line = format!("labeld_retention_foreign_files{{folder=\"{}\"}}", done.display());
    assert!(m.lines().any(|l| l.starts_with(&foreign_line) && l.ends_with(" 4")), "old.png, its look-alike sidecar, the csv copy, the notes:\n{m}");
    assert!(d.log_text().contains("retention: files due for removal that labeld did not archive here are left alone"));
    let log = d.log_text();
    assert!(d.stop().success());
    println!("max_age_days = 30: removed {} files ({} bytes)", removed_in_log(&log, "files"), removed_in_log(&log, "bytes"));
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
    let d = s.spawn_daemon();
    arrive(&s, &s.inbox, &["old.png"], days_ago(100), false);
    wait_until("old.png archived", Duration::from_secs(30), || done.join("old.png.json").exists());
    std::thread::sleep(Duration::from_millis(500)); // a window in which nothing may be removed without [retention]
    assert!(done.join("old.png").exists(), "no [retention], nothing removed");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("{text}\n[retention]\nmax_age_days = 30\ninterval_s = 3600\n")).unwrap();
    d.signal(1);
    d.wait_for_log("config reloaded", Duration::from_secs(30));
    // Not an hour later: the reload wakes the sweeper.
    wait_until("old.png removed after the reload", Duration::from_secs(10), || !done.join("old.png").exists());
    assert!(d.stop().success());
}

#[test]
fn archive_folders_that_are_inboxes_hold_inboxes_or_are_links_or_system_folders_are_refused() {
    let s = Setup::new("channel_mean", "\n[retention]\nmax_age_days = 1\ninterval_s = 10\n");
    let second = s.dir.path().join("camera2");
    // The second inbox's unlabelled images, one still being written: years old, never labeld's.
    let waiting = plant_foreign(&second, "IMG_0001.jpg");
    let mut writer = std::fs::File::create(second.join("IMG_0002.jpg")).unwrap();
    std::io::Write::write_all(&mut writer, b"\xff\xd8 half a jpeg").unwrap();
    set_mtime(&second.join("IMG_0002.jpg"), years_ago(3));
    std::os::unix::fs::symlink(&s.inbox, s.dir.path().join("inbox-link")).unwrap();
    std::fs::create_dir_all(s.dir.path().join("real-done")).unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("real-done"), s.dir.path().join("done-link")).unwrap();
    let before = snapshot(s.dir.path());
    let base = std::fs::read_to_string(&s.config).unwrap();
    let second_inbox = "\n[[inbox]]\npath = \"camera2\"\nsettle_ms = 200\n".to_string();
    let cases: &[(&str, &str, &[&str])] = &[
        ("quarantine = \"camera2\"\n", &second_inbox, &["[[inbox]] #1 quarantine", "camera2", "[[inbox]] #2 path", "not labelled yet"]),
        ("on_done = \"move\"\ndone_dir = \"inbox-link\"\n", "", &["[[inbox]] #1 done_dir", "inbox-link", "symbolic link"]),
        ("on_done = \"move\"\ndone_dir = \"done-link\"\n", "", &["[[inbox]] #1 done_dir", "done-link", "symbolic link", "real-done"]),
        ("on_done = \"move\"\ndone_dir = \".\"\n", "", &["[[inbox]] #1 done_dir", "contains the inbox"]),
        ("quarantine = \"inbox/rejects\"\n", "", &["[[inbox]] #1 quarantine", "inside the inbox", "dot-folder"]),
        ("on_done = \"move\"\ndone_dir = \"camera2/done\"\n", &second_inbox, &["[[inbox]] #1 done_dir", "inside the inbox of [[inbox]] #2 path"]),
        ("on_done = \"move\"\ndone_dir = \"/\"\n", "", &["[[inbox]] #1 done_dir", "system folder"]),
        ("quarantine = \"/etc\"\n", "", &["[[inbox]] #1 quarantine", "/etc", "system folder"]),
        ("on_done = \"move\"\ndone_dir = \"/var\"\n", "", &["[[inbox]] #1 done_dir", "top-level"]),
    ];
    for (keys, extra, expect) in cases {
        let text = base.replacen("settle_ms = 200\n", &format!("settle_ms = 200\n{keys}"), 1) + extra;
        std::fs::write(&s.config, &text).unwrap();
        for args in [&["check-config", "--config"][..], &["run", "--once", "--config"][..]] {
            let out = s.labeld().args(args).arg(&s.config).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} with {keys}: {err}");
            for e in *expect {
                assert!(err.contains(e), "{args:?} with {keys}: {e:?} not in {err}");
            }
        }
    }
    drop(writer);
    assert_unchanged_but(&before, s.dir.path(), &[&s.config]);
    assert!(waiting.iter().all(|p| p.exists()));
    // A dot-folder inside the inbox, and a folder beside it, are fine.
    for keys in ["quarantine = \"inbox/.rejects\"\n", "on_done = \"move\"\ndone_dir = \"done\"\n"] {
        std::fs::write(&s.config, base.replacen("settle_ms = 200\n", &format!("settle_ms = 200\n{keys}"), 1)).unwrap();
        let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
        assert!(out.status.success(), "{keys}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn archive_folders_swapped_for_links_while_running_are_neither_swept_nor_written_until_a_reload_finds_them_real() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmax_age_days = 1\ninterval_s = 10\n");
    let disk = s.dir.path().join("disk");
    let Some(_mount) = Tmpfs::mount(&disk, "16m") else { return };
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"disk/done\"\nquarantine = \"disk/rejects\"\n");
    let (done, rejects) = (disk.join("done"), disk.join("rejects"));
    // Somewhere else on the same disk: old files, one of them a look-alike of what labeld archives.
    let elsewhere = disk.join("elsewhere");
    plant_foreign(&elsewhere, "a.png");
    plant_foreign(&elsewhere, "broken.jpg");
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    arrive(&s, &s.inbox, &["a.png"], years_ago(5), false);
    arrive(&s, &s.inbox, &["broken.jpg"], years_ago(5), true);
    wait_until("both archived", Duration::from_secs(30), || done.join("a.png.json").exists() && rejects.join("broken.jpg.json").exists());
    let outside = snapshot(&elsewhere);
    for dir in [&done, &rejects] {
        let real = dir.with_extension("real");
        std::fs::rename(dir, &real).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir).unwrap();
    }
    let (done_real, rejects_real) = (snapshot(&done.with_extension("real")), snapshot(&rejects.with_extension("real")));
    // The config now names links: the reload is refused and the running folders are found replaced.
    d.signal(1);
    d.wait_for_log("config reload rejected", Duration::from_secs(30));
    arrive(&s, &s.inbox, &["b.png"], years_ago(5), false);
    wait_until("b.png labelled", Duration::from_secs(30), || s.inbox.join("b.png.json").exists());
    wait_until("both replacements noticed", Duration::from_secs(40), || d.count_in_log("archive folder replaced") >= 2);
    // A whole sweep after both were noticed.
    let sweeps = metric(&metrics(&addr), "labeld_retention_sweeps_total");
    wait_until("a sweep after the replacements", Duration::from_secs(30), || metric(&metrics(&addr), "labeld_retention_sweeps_total") >= sweeps + 2);
    assert_unchanged(&outside, &elsewhere);
    assert_unchanged(&done_real, &done.with_extension("real"));
    assert_unchanged(&rejects_real, &rejects.with_extension("real"));
    assert!(s.inbox.join("b.png").exists(), "an image that cannot be archived stays in its inbox");
    assert!(d.log_text().contains("cannot set the image aside"), "{}", d.log_text());

    // The operator puts the folders back and reloads: archiving and sweeping resume.
    for dir in [&done, &rejects] {
        std::fs::remove_file(dir).unwrap();
        std::fs::rename(dir.with_extension("real"), dir).unwrap();
    }
    d.signal(1);
    d.wait_for_log("config reloaded", Duration::from_secs(30));
    wait_until("b.png archived and removed, a.png and broken.jpg removed", Duration::from_secs(40), || {
        !s.inbox.join("b.png").exists() && !done.join("b.png").exists() && !done.join("a.png").exists() && !rejects.join("broken.jpg").exists()
    });
    assert_unchanged(&outside, &elsewhere);
    assert!(d.stop().success());
}

#[test]
fn a_done_dir_above_unrelated_data_on_a_full_disk_removes_only_what_labeld_archived() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmin_free_mb = 100\nmax_age_days = 1\ninterval_s = 10\n");
    let disk = s.dir.path().join("disk");
    // Never as much free space as asked for: everything in the folder is due, what is not labeld's stays.
    let Some(_mount) = Tmpfs::mount(&disk, "8m") else { return };
    // The operator points done_dir at a folder that already holds other data.
    let data = disk.join("data");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"disk/data\"\n");
    let mut theirs = plant_foreign(&data.join("photos/2019"), "old.jpg").to_vec();
    theirs.extend(plant_foreign(&data, "a.png")); // the very name labeld will archive under (it gets a.png~1)
    std::fs::write(data.join("export.json"), b"{}").unwrap();
    set_mtime(&data.join("export.json"), years_ago(4));
    // Still being written by another program, old timestamp.
    let mut writer = std::fs::File::create(data.join("live.jpg")).unwrap();
    std::io::Write::write_all(&mut writer, b"\xff\xd8 partial").unwrap();
    set_mtime(&data.join("live.jpg"), years_ago(2));
    theirs.extend([data.join("export.json"), data.join("live.jpg")]);
    let before: Vec<(PathBuf, Vec<u8>)> = theirs.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();

    let d = s.spawn_daemon();
    let addr = d.http_addr();
    arrive(&s, &s.inbox, &["a.png", "b.png", "cam/c.png"], years_ago(5), false);
    wait_until("three labelled", Duration::from_secs(30), || s.csv.exists() && s.rows().len() == 3);
    let archived = [data.join("a.png~1.png"), data.join("b.png"), data.join("cam/c.png")];
    wait_until("what labeld archived is removed", Duration::from_secs(40), || archived.iter().all(|p| !p.exists()));
    std::io::Write::write_all(&mut writer, b" more").unwrap();
    drop(writer);
    wait_until("a sweep after the writer finished", Duration::from_secs(40), || metric(&metrics(&addr), "labeld_retention_sweeps_total") >= 3);
    for (p, bytes) in &before {
        let now = std::fs::read(p).unwrap_or_else(|e| panic!("{} was removed: {e}", p.display()));
        if !p.ends_with("live.jpg") {
            assert_eq!(&now, bytes, "{} changed", p.display());
        }
    }
    let m = metrics(&addr);
    assert!(m.contains(&format!("labeld_retention_foreign_files{{folder=\"{}\"}} 6", data.display())), "{m}");
    assert!(d.log_text().contains("retention: still below the free-space limit"), "100 MB free cannot be reached on 8 MB");
    assert!(d.stop().success());
}

#[test]
fn kill_9_while_images_are_archived_loses_nothing_and_removes_only_recorded_files() {
    let s = Setup::new("channel_mean", "\n[retention]\nmax_age_days = 1\ninterval_s = 10\n");
    let disk = s.dir.path().join("disk");
    let Some(_mount) = Tmpfs::mount(&disk, "64m") else { return };
    s.edit_config("path = \"inbox\"\n", "path = \"disk/inbox\"\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"disk/done\"\nquarantine = \"disk/rejects\"\n");
    let (inbox, done) = (disk.join("inbox"), disk.join("done"));
    std::fs::create_dir_all(&inbox).unwrap();
    let foreign = plant_foreign(&done, "zz-theirs.png");
    let n = 300;
    let names: Vec<String> = (0..n).map(|i| format!("cam{}/img-{i:03}.{}", i % 3, if i % 50 == 7 { "jpg" } else { "png" })).collect();
    let staging = disk.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let mut staged = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let p = staging.join(format!("{i}.png"));
        if name.ends_with(".jpg") {
            std::fs::write(&p, b"broken").unwrap();
        } else {
            solid(&p, RED, 64, 48);
        }
        set_mtime(&p, years_ago(3));
        staged.push(p);
    }
    let mut d = s.spawn_daemon();
    for (p, name) in staged.iter().zip(&names) {
        let to = inbox.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(p, &to).unwrap();
    }
    wait_until("some archived", Duration::from_secs(60), || s.csv.exists() && s.rows().len() >= 60);
    d.signal(9);
    d.wait_exit();
    let d = s.spawn_daemon();
    wait_until("every image labelled and set aside", Duration::from_secs(120), || {
        s.csv.exists() && s.rows().len() >= n && walkdir::WalkDir::new(&inbox).into_iter().filter_map(Result::ok).all(|e| e.file_type().is_dir())
    });
    // Each image: one row, and it was archived (its record written before the move), so it is removed.
    let rows = s.rows();
    let mut per_path = BTreeMap::<String, usize>::new();
    for r in &rows {
        *per_path.entry(r[1].to_string()).or_default() += 1;
    }
    for name in &names {
        assert_eq!(per_path.get(&inbox.join(name).to_string_lossy().into_owned()), Some(&1), "{name}");
    }
    wait_until("every archived file removed", Duration::from_secs(40), || {
        walkdir::WalkDir::new(&disk).into_iter().filter_map(Result::ok).filter(|e| e.file_type().is_file()).all(|e| {
            let p = e.path();
            foreign.iter().any(|f| f == p) || p.file_name().unwrap().to_string_lossy().starts_with(".labeld-archive")
        })
    });
    assert!(foreign.iter().all(|p| p.exists()));
    assert!(d.stop().success());
}

/// The inode of `p` (links not followed).
fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).unwrap().ino()
}

#[test]
fn an_edited_replacement_of_an_archived_image_is_never_removed_even_on_the_same_inode() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    let done = s.dir.path().join("done");
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    // Due in a minute: taken 30 days ago less 60 s.
    arrive(&s, &s.inbox, &["a.png"], days_ago(30) + Duration::from_secs(60), false);
    wait_until("a.png archived", Duration::from_secs(30), || done.join("a.png.json").exists());
    let archived = done.join("a.png");
    let (bytes, mtime, ino) = (std::fs::read(&archived).unwrap(), std::fs::metadata(&archived).unwrap().modified().unwrap(), inode(&archived));
    // The operator swaps in an edited copy of the same size and mtime (rm + cp -p): the file system
    // often hands the freed inode straight back.
    let mut edited = bytes.clone();
    let at = edited.len() / 2;
    edited[at] ^= 0xff;
    std::fs::remove_file(&archived).unwrap();
    std::fs::write(&archived, &edited).unwrap();
    set_mtime(&archived, mtime);
    println!("replacement on the same inode: {}", inode(&archived) == ino);
    // Two whole sweeps after the image became due.
    wait_until("due", Duration::from_secs(90), || SystemTime::now() > mtime + Duration::from_secs(30 * 86_400));
    let sweeps = metric(&metrics(&addr), "labeld_retention_sweeps_total");
    wait_until("two sweeps", Duration::from_secs(40), || metric(&metrics(&addr), "labeld_retention_sweeps_total") >= sweeps + 2);
    assert_eq!(std::fs::read(&archived).unwrap(), edited, "the edited copy is not the archived image");
    assert!(d.stop().success());
}

#[test]
fn a_ledger_that_is_a_fifo_stops_nothing_and_labeld_stops_at_once() {
    let s = Setup::new("channel_mean", "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\nquarantine = \"rejects\"\n");
    let (done, rejects) = (s.dir.path().join("done"), s.dir.path().join("rejects"));
    std::fs::create_dir_all(&done).unwrap();
    let fifo = std::ffi::CString::new(done.join(".labeld-archive").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    arrive(&s, &s.inbox, &["old.png"], years_ago(2), false);
    arrive(&s, &s.inbox, &["broken.jpg"], years_ago(2), true);
    wait_until("old.png labelled", Duration::from_secs(30), || s.inbox.join("old.png.json").exists());
    // The quarantine, with a ledger of its own, is archived into and swept as usual.
    wait_until("broken.jpg quarantined and removed", Duration::from_secs(40), || !rejects.join("broken.jpg").exists() && !s.inbox.join("broken.jpg").exists());
    let sweeps = metric(&metrics(&addr), "labeld_retention_sweeps_total");
    wait_until("sweeps go on", Duration::from_secs(40), || metric(&metrics(&addr), "labeld_retention_sweeps_total") >= sweeps + 1);
    assert!(s.inbox.join("old.png").exists(), "it cannot be recorded, so it is not moved");
    assert!(d.log_text().contains("not a regular file"), "{}", d.log_text());
    let t = Instant::now();
    assert!(d.stop().success());
    assert!(t.elapsed() < Duration::from_secs(10), "stopping took {:?}", t.elapsed());
}

#[test]
fn a_ledger_deleted_while_running_is_started_again_and_what_is_archived_after_is_removed() {
    let s = Setup::new("channel_mean", "\n[retention]\nmax_age_days = 30\ninterval_s = 10\n");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    let done = s.dir.path().join("done");
    let d = s.spawn_daemon();
    arrive(&s, &s.inbox, &["a.png"], years_ago(2), false);
    wait_until("a.png archived and removed", Duration::from_secs(40), || s.rows().len() == 1 && !done.join("a.png").exists());
    std::fs::remove_file(done.join(".labeld-archive")).unwrap();
    arrive(&s, &s.inbox, &["b.png"], years_ago(2), false);
    wait_until("b.png archived and removed", Duration::from_secs(40), || s.rows().len() == 2 && !s.inbox.join("b.png").exists() && !done.join("b.png").exists());
    assert!(d.stop().success());
}

#[test]
fn a_camera_renaming_new_frames_over_one_name_never_gets_an_unlabelled_frame_archived() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    let done = s.dir.path().join("done");
    let staging = s.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let n = 400;
    for i in 0..n {
        solid(&staging.join(format!("{i}.png")), [(i % 250) as u8, 20, 20], 16, 16 + (i % 7) as u32);
    }
    let d = s.spawn_daemon();
    for i in 0..n {
        std::fs::rename(staging.join(format!("{i}.png")), s.inbox.join("latest.png")).unwrap();
        std::thread::sleep(Duration::from_millis((i % 4) as u64 * 5)); // a camera's pace: 0–15 ms apart
    }
    // Until the last frame is labelled and the folder is quiet.
    wait_until("the last frame set aside", Duration::from_secs(60), || !s.inbox.join("latest.png").exists() && !s.inbox.join("latest.png.json").exists());
    let rows: Vec<String> = s.rows().iter().map(|r| r[r.len() - 1].to_string()).collect();
    assert!(d.stop().success());
    let mut archived = 0;
    for e in std::fs::read_dir(&done).unwrap().map(|e| e.unwrap().path()) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".json") || name.starts_with('.') {
            continue;
        }
        archived += 1;
        let side = crate::common::read_sidecar(&e);
        assert_eq!(side["file"]["inode"].as_u64(), Some(inode(&e)), "{name}: its sidecar describes another frame");
        let id = format!("{}:{}:", side["file"]["dev"], side["file"]["inode"]);
        assert!(rows.iter().any(|r| r.starts_with(&id)), "{name} has no row");
    }
    println!("{n} frames renamed over one name: {} rows, {archived} archived", rows.len());
    assert!(archived > 0);
}

#[test]
fn photos_labelled_where_they_lie_are_not_adopted_when_their_folder_becomes_a_done_dir() {
    let s = Setup::new("channel_mean", "");
    // First the folder is an inbox that keeps what it labels.
    let photos = s.dir.path().join("photos");
    std::fs::create_dir_all(photos.join("2015")).unwrap();
    s.edit_config("path = \"inbox\"\n", "path = \"photos\"\n");
    for name in ["2015/beach.png", "2015/hill.png"] {
        let p = photos.join(name);
        solid(&p, RED, 48, 48);
        set_mtime(&p, years_ago(10));
    }
    assert!(s.run_once().status.success());
    assert!(photos.join("2015/beach.png.json").exists());
    // Then it becomes a done_dir with retention: the photos are not labeld's archive.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap().replace("path = \"photos\"\n", "path = \"inbox\"\non_done = \"move\"\ndone_dir = \"photos\"\n")
            + "\n[retention]\nmax_age_days = 1\ninterval_s = 10\n",
    )
    .unwrap();
    let before = snapshot(&photos);
    let d = s.spawn_daemon();
    arrive(&s, &s.inbox, &["new.png"], years_ago(2), false);
    wait_until("new.png archived and removed", Duration::from_secs(40), || s.rows().len() == 3 && !s.inbox.join("new.png").exists() && !photos.join("new.png").exists());
    assert!(d.stop().success());
    let mut after = snapshot(&photos);
    after.retain(|p, _| !p.ends_with(".labeld-archive"));
    assert_eq!(after, before, "only what labeld archived went");
}

#[test]
fn a_sighup_while_labeld_starts_does_not_stop_it() {
    let s = Setup::new("channel_mean", "");
    let log = s.dir.path().join("early.log");
    let mut child = s
        .labeld()
        .args(["run", "--config"])
        .arg(&s.config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // From the moment labeld's main has run its first step it catches SIGHUP (before that the
    // kernel is still loading libraries, and systemd sends no reload before READY=1).
    let catches_hup = || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("SigCgt:"))?.to_owned();
            u64::from_str_radix(line["SigCgt:".len()..].trim(), 16).ok()
        }).is_some_and(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
    };
    wait_until("labeld catches SIGHUP", Duration::from_secs(60), catches_hup);
    let t = Instant::now();
    let mut sent = 0;
    while !std::fs::read_to_string(&log).unwrap().contains("INFO ready") {
        assert!(child.try_wait().unwrap().is_none(), "labeld died from SIGHUP #{sent} at {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(60), "not ready");
        unsafe { libc::kill(pid, libc::SIGHUP) };
        sent += 1;
        std::thread::sleep(Duration::from_millis(2)); // the pace of the signals
    }
    assert!(child.try_wait().unwrap().is_none());
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    println!("{sent} SIGHUPs while starting");
}
