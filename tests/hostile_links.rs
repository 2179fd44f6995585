//! A hostile inbox, links and file identity: the real binary, real inotify, real files. Nothing
//! outside the inbox is read, written or deleted through a link at any component; a sidecar write
//! cannot be redirected by a planted name; a FIFO never hangs the daemon; "already labelled" follows
//! the file's identity, not its timestamps.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const LONG: Duration = Duration::from_secs(30);

/// Every file under `dir` (links as their target text), for a before/after comparison.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).follow_links(false) {
        let e = e.unwrap();
        let ft = e.file_type();
        if ft.is_file() {
            out.insert(e.path().to_path_buf(), std::fs::read(e.path()).unwrap());
        } else if ft.is_symlink() {
            out.insert(e.path().to_path_buf(), std::fs::read_link(e.path()).unwrap().into_os_string().into_encoded_bytes());
        }
    }
    out
}

/// Puts a finished image into the inbox with one rename (as a well-behaved producer does).
fn drop_in(s: &Setup, name: &str, rgb: [u8; 3]) -> PathBuf {
    let staged = s.dir.path().join(format!("staged-{name}"));
    solid(&staged, rgb, 32, 32);
    let to = s.inbox.join(name);
    std::fs::rename(&staged, &to).unwrap();
    to
}

fn wait_rows(s: &Setup, n: usize, timeout: Duration) -> Vec<csv::StringRecord> {
    eventually(format_args!("{n} rows"), timeout, || {
        let rows = s.rows_so_far();
        if rows.len() >= n { Ok(rows) } else { Err(Shown(rows)) }
    })
}


fn alive(d: &Daemon) -> bool {
    unsafe { libc::kill(d.pid(), 0) == 0 }
}

fn class_of(row: &csv::StringRecord, header: &csv::StringRecord) -> String {
    let at = header.iter().position(|h| h == "class1").unwrap();
    row[at].to_string()
}

fn column(header: &csv::StringRecord, name: &str) -> usize {
    header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no {name} column in {header:?}"))
}

#[test]
fn planted_links_at_every_guessable_temp_and_sidecar_name_redirect_nothing() {
    let s = Setup::new("channel_mean", "");
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"do not touch\n").unwrap();
    let d = s.spawn_daemon();
    let pid = d.pid();
    let secret = outside.join("secret.txt");
    for img in ["a.png", "b.png"] {
        symlink(&secret, s.inbox.join(format!(".{img}.json.{pid}.tmp"))).unwrap();
        symlink(&secret, s.inbox.join(format!(".{img}.json.tmp"))).unwrap();
    }
    symlink(&secret, s.inbox.join(format!(".labeld-{pid}-0000000000000000.tmp"))).unwrap();
    symlink(&s.csv, s.inbox.join("a.png.json")).unwrap();
    symlink(&secret, s.inbox.join("b.png.json")).unwrap();
    let outside_before = snapshot(&outside);
    let csv_before = std::fs::read(&s.csv).unwrap_or_default();

    let a = drop_in(&s, "a.png", RED);
    let b = drop_in(&s, "b.png", GREEN);
    wait_rows(&s, 2, LONG);
    let side_a = wait_for_sidecar(&a, LONG);
    let side_b = wait_for_sidecar(&b, LONG);
    let rows = settled_rows(&s, Duration::from_secs(1));

    assert_eq!(snapshot(&outside), outside_before, "a file outside the inbox changed");
    let csv_after = std::fs::read(&s.csv).unwrap();
    assert!(csv_after.starts_with(&csv_before), "the CSV's earlier bytes changed");
    let text = String::from_utf8_lossy(&csv_after);
    assert_eq!(text.lines().filter(|l| l.starts_with("time,")).count(), 1, "one header:\n{text}");
    assert_eq!(rows.len(), 2, "one row per image: {rows:?}");
    for (img, side, class) in [(&a, &side_a, 0), (&b, &side_b, 1)] {
        let m = std::fs::symlink_metadata(sidecar(img)).unwrap();
        assert!(m.file_type().is_file(), "{} is a regular file now", sidecar(img).display());
        assert_eq!(top1(side).0, class);
    }
    assert!(alive(&d));
    println!("temp-name attack: {} rows, outside untouched, sidecars regular files", rows.len());
}

/// An outside folder of blue images (class 2): if any row or sidecar says class 2, something outside
/// was read.
fn blue_outside(s: &Setup, name: &str, images: &[&str]) -> PathBuf {
    let dir = s.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for i in images {
        solid(&dir.join(i), BLUE, 32, 32);
    }
    dir
}

#[test]
fn links_at_every_component_never_read_write_or_delete_outside() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200", "settle_ms = 200\nrecursive = true\non_done = \"delete\"");
    let names: Vec<String> = (0..40).map(|i| format!("r{i:02}.png")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let outside = blue_outside(&s, "outside", &name_refs);
    std::fs::create_dir(outside.join("deeper")).unwrap();
    solid(&outside.join("deeper/x.png"), BLUE, 32, 32);
    let d = s.spawn_daemon();

    // A link to an outside image; a linked folder created in place; one moved in with rename.
    symlink(outside.join("r00.png"), s.inbox.join("evil.png")).unwrap();
    symlink(&outside, s.inbox.join("linked")).unwrap();
    let staged = s.dir.path().join("staged-link");
    symlink(&outside, &staged).unwrap();
    std::fs::rename(&staged, s.inbox.join("moved")).unwrap();
    // A new image appearing outside, now reachable through both links.
    std::thread::sleep(Duration::from_millis(300)); // a window in which the links must not be followed
    solid(&outside.join("late.png"), BLUE, 32, 32);
    let before = snapshot(&outside);

    // Many images queued in sub/, then sub swapped for a link to the outside folder (same names).
    let prep = s.dir.path().join("prep");
    std::fs::create_dir(&prep).unwrap();
    for n in &names {
        solid(&prep.join(n), RED, 32, 32);
    }
    std::fs::rename(&prep, s.inbox.join("sub")).unwrap();
    std::thread::sleep(Duration::from_millis(30)); // the attacker's pace: the images are queued, not yet labelled
    std::fs::rename(s.inbox.join("sub"), s.inbox.join("sub.real")).unwrap();
    symlink(&outside, s.inbox.join("sub")).unwrap();

    let good = drop_in(&s, "good.png", GREEN);
    d.eventually("the good image labelled (and deleted)", LONG, || !good.exists());
    let rows = settled_rows(&s, Duration::from_secs(2));
    let (header, _) = read_csv(&s.csv);
    let (path_at, status_at) = (column(&header, "path"), column(&header, "status"));
    for r in &rows {
        assert_ne!(class_of(r, &header), "2", "an outside (blue) image was read: {r:?}");
    }
    assert!(rows.iter().any(|r| r[path_at].ends_with("good.png") && &r[status_at] == "ok"), "{rows:?}");
    for e in walkdir::WalkDir::new(&s.inbox).follow_links(false).into_iter().flatten() {
        if e.file_type().is_file() && e.path().to_string_lossy().ends_with(".json") {
            let side: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            if side["top"].is_array() {
                assert_ne!(top1(&side).0, 2, "{} names an outside image's class", e.path().display());
            }
        }
    }
    assert_eq!(snapshot(&outside), before, "a file outside the inbox was written or deleted");
    assert!(alive(&d), "daemon died:\n{}", d.log_text());
    let ok = rows.iter().filter(|r| &r[status_at] == "ok").count();
    println!("links: {} rows ({ok} ok, {} error), outside untouched", rows.len(), rows.len() - ok);
    for r in rows.iter().filter(|r| &r[status_at] != "ok") {
        println!("  {} {} {}", &r[path_at], &r[status_at], &r[column(&header, "error")]);
    }
}

/// Swaps a folder of queued images for a link, again and again, while the daemon deletes what it
/// labels: the deletion must never go through the link.
#[test]
fn on_done_delete_never_deletes_through_a_swapped_folder() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200", "settle_ms = 200\nrecursive = true\non_done = \"delete\"");
    let names: Vec<String> = (0..24).map(|i| format!("i{i:02}.png")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let outside = blue_outside(&s, "outside", &name_refs);
    let before = snapshot(&outside);
    let d = s.spawn_daemon();
    for round in 0..6 {
        let prep = s.dir.path().join(format!("prep{round}"));
        std::fs::create_dir(&prep).unwrap();
        for n in &names {
            solid(&prep.join(n), RED, 32, 32);
        }
        let sub = s.inbox.join("sub");
        std::fs::rename(&prep, &sub).unwrap();
        // Let a few be labelled, then swap mid-stream.
        let _ = within(LONG, || std::fs::read_dir(&sub).map(|r| r.count()).unwrap_or(0) <= names.len());
        std::thread::sleep(Duration::from_millis(5 * round)); // the attacker's pace: a later swap each round
        std::fs::rename(&sub, s.inbox.join(format!("sub.real{round}"))).unwrap();
        symlink(&outside, &sub).unwrap();
        std::thread::sleep(Duration::from_millis(300)); // a window in which nothing may go through the link
        std::fs::remove_file(&sub).unwrap();
    }
    let rows = settled_rows(&s, Duration::from_secs(2));
    let (header, _) = read_csv(&s.csv);
    for r in &rows {
        assert_ne!(class_of(r, &header), "2", "an outside (blue) image was read: {r:?}");
    }
    let after = snapshot(&outside);
    let lost: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(lost.is_empty(), "deleted outside the inbox through a link: {lost:?}");
    assert_eq!(after, before, "a file outside the inbox changed");
    assert!(alive(&d));
    println!("swap under on_done=delete: {} rows, outside untouched", rows.len());
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

/// FIFOs at `names` (already in the inbox or made by `make`), then a good image: each FIFO gets an
/// error record or a log line naming it, the good image is labelled, SIGTERM stops the daemon.
fn fifos_never_hang(backlog: &str, make: impl FnOnce(&Setup) -> Vec<&'static str>) {
    let s = Setup::new("channel_mean", "");
    mkfifo(&s.inbox.join(backlog));
    let d = s.spawn_daemon();
    let mut fifos = make(&s);
    fifos.push("backlog.png");
    // Each FIFO noticed (an error record or a log line) before the good image arrives.
    for fifo in &fifos {
        d.eventually(&format!("{fifo} noticed"), LONG, || {
            let logged = d.log_text().lines().any(|l| l.contains(fifo) && l.contains("FIFO"));
            logged || s.rows_so_far().iter().any(|r| r[1].ends_with(fifo))
        });
    }
    let good = drop_in(&s, "good.png", GREEN);
    assert_eq!(top1(&wait_for_sidecar(&good, LONG)).0, 1);
    let rows = settled_rows(&s, Duration::from_secs(1));
    let log = d.log_text();
    let (header, _) = read_csv(&s.csv);
    let path_at = column(&header, "path");
    for fifo in fifos {
        let row = rows.iter().any(|r| r[path_at].ends_with(fifo));
        let logged = log.lines().any(|l| l.contains(fifo) && l.contains("FIFO"));
        assert!(row || logged, "{fifo}: neither an error record nor a log line:\n{log}");
        assert!(!sidecar(&s.inbox.join(fifo)).exists() || row, "{fifo}: a sidecar without a row");
    }
    assert!(alive(&d));
    let t = Instant::now();
    let status = d.stop();
    let took = t.elapsed();
    println!("FIFO: {} rows, SIGTERM → exit {status} in {took:?}", rows.len());
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
}

#[test]
fn a_fifo_named_like_an_image_never_hangs_the_daemon() {
    fifos_never_hang("backlog.png", |s| {
        // A FIFO renamed in, as a producer's rename would deliver it.
        let staged = s.dir.path().join("staged.png");
        mkfifo(&staged);
        std::fs::rename(&staged, s.inbox.join("moved.png")).unwrap();
        vec!["moved.png"]
    });
}

#[test]
fn a_fifo_created_live_is_logged() {
    fifos_never_hang("backlog.png", |s| {
        mkfifo(&s.inbox.join("live.png"));
        vec!["live.png"]
    });
}

/// The identity the sidecar records, as the file's stat gives it.
fn stat_identity(p: &Path) -> serde_json::Value {
    let m = std::fs::metadata(p).unwrap();
    let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
    serde_json::json!({
        "dev": m.dev(), "inode": m.ino(), "size": m.size(),
        "mtime_ns": ns(m.mtime(), m.mtime_nsec()), "ctime_ns": ns(m.ctime(), m.ctime_nsec()),
    })
}

/// Waits until the sidecar of `img` says `class` and records the file's identity as it is now.
fn wait_labelled_as(img: &Path, class: u64) -> serde_json::Value {
    eventually(format_args!("{} relabelled as class {class} with its identity", img.display()), LONG, || {
        if let Ok(bytes) = std::fs::read(sidecar(img)) {
            if let Ok(side) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                let mut recorded = side["file"].clone();
                // The hash of the bytes is checked by the daemon, not here.
                recorded.as_object_mut().map(|o| o.remove("xxh3"));
                if side["top"].is_array() && top1(&side).0 == class && recorded == stat_identity(img) {
                    return Ok(side);
                }
            }
        }
        let now = std::fs::read_to_string(sidecar(img)).unwrap_or_default();
        Err(format!("identity {}, sidecar:\n{now}", stat_identity(img)))
    })
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn identity_not_timestamps_decides_what_is_labelled() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let img = drop_in(&s, "a.png", RED);
    wait_labelled_as(&img, 0);

    // Replaced by mv of a file with an older mtime.
    let older = s.dir.path().join("older.png");
    solid(&older, GREEN, 32, 32);
    sh(&format!("touch -d '2001-01-01' '{}' && mv '{}' '{}'", older.display(), older.display(), img.display()));
    wait_labelled_as(&img, 1);

    // Overwritten in place by cp -p of another file (its old times kept).
    let other = s.dir.path().join("other.png");
    solid(&other, BLUE, 32, 32);
    sh(&format!("touch -d '2001-01-01' '{}' && cp -p '{}' '{}'", other.display(), other.display(), img.display()));
    wait_labelled_as(&img, 2);

    // An mtime in the future: labelled for that version, then never again at a restart.
    sh(&format!("touch -d '+1 year' '{}'", img.display()));
    wait_labelled_as(&img, 2);
    let n = settled_rows(&s, Duration::from_secs(1)).len();
    assert!(d.stop().success());
    for restart in 1..=2 {
        let d = s.spawn_daemon();
        d.wait_for_log("scan done", LONG);
        let rows = settled_rows(&s, Duration::from_secs(2));
        assert_eq!(rows.len(), n, "restart {restart} relabelled a future-dated image: {rows:?}");
        assert!(d.stop().success());
    }
    println!("identity: {n} rows after mv-older, cp -p and touch +1 year; 2 restarts added none");
}

#[test]
fn a_hard_link_or_chmod_to_a_labelled_image_does_not_label_it_again() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let img = drop_in(&s, "a.png", RED);
    wait_labelled_as(&img, 0);
    // Both move the image's ctime, not its bytes: its sidecar's hash of the bytes still matches.
    let link = s.inbox.join("b.png");
    std::fs::hard_link(&img, &link).unwrap();
    wait_labelled_as(&link, 0);
    sh(&format!("chmod 600 '{}'", img.display()));
    let rows = settled_rows(&s, Duration::from_secs(2));
    assert!(d.stop().success());
    let d = s.spawn_daemon();
    d.wait_for_log("scan done", LONG);
    let after = settled_rows(&s, Duration::from_secs(2));
    assert!(d.stop().success());
    let paths: Vec<String> = after.iter().map(|r| r[1].to_string()).collect();
    assert_eq!(paths.len(), 2, "one row per name, also after a restart: {paths:?}");
    assert_eq!(rows.len(), 2, "nothing relabelled while running: {rows:?}");
    assert!(paths.iter().any(|p| p.ends_with("/a.png")) && paths.iter().any(|p| p.ends_with("/b.png")));
}

#[test]
fn run_once_labels_every_name_of_a_hard_linked_image() {
    let s = Setup::new("channel_mean", "");
    let img = s.inbox.join("a.png");
    solid(&img, GREEN, 32, 32);
    let names: Vec<PathBuf> = std::iter::once(img.clone()).chain((0..5).map(|i| s.inbox.join(format!("link{i}.png")))).collect();
    for n in &names[1..] {
        std::fs::hard_link(&img, n).unwrap();
    }
    // One file under six names: each name waits for the one before it (claims go by inode too), and
    // `--once` must not stop before the last.
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for n in &names {
        assert_eq!(top1(&read_sidecar(n)).0, 1, "{}", n.display());
    }
    assert_eq!(s.rows().len(), names.len());
}
