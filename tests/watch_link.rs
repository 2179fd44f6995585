//! An inbox whose configured path is a symbolic link (`inbox -> cam1`), against the real binary and real
//! inotify: the backlog is labelled, then every file written later, through the link or into the real
//! folder, gets exactly one row under the configured spelling; re-pointing the link moves the watch to
//! the new folder at once (no reload), and the old folder is no longer watched.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Writes `bytes` under a dot-name beside `path`, then renames it into place (one rename event).
fn put(path: &Path, rgb: [u8; 3]) {
    let tmp = path.with_file_name(format!(".put.{}.tmp.png", std::process::id()));
    solid(&tmp, rgb, 16, 16);
    std::fs::rename(&tmp, path).unwrap();
}

/// How many rows each path has.
fn rows_by_path(s: &Setup) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    if s.csv.exists() {
        for r in s.rows() {
            *n.entry(r[1].to_string()).or_default() += 1;
        }
    }
    n
}

fn wait_for_rows(s: &Setup, d: &Daemon, paths: &[&Path]) {
    d.eventually(&format!("rows for {paths:?}"), WAIT, || {
        let rows = rows_by_path(s);
        if paths.iter().all(|p| rows.contains_key(&p.display().to_string())) { Ok(()) } else { Err(format!("rows {rows:?}")) }
    });
}

/// `ln -sfn target link`: a new link renamed over the old one.
fn repoint(link: &Path, target: &Path) {
    let staged = link.with_file_name(".inbox.new");
    std::os::unix::fs::symlink(target, &staged).unwrap();
    std::fs::rename(&staged, link).unwrap();
}

/// A setup whose inbox path is a link to `cam1`, with one image waiting in it.
fn linked(extra: &str) -> (Setup, std::path::PathBuf) {
    let s = Setup::new("channel_mean", extra);
    let cam1 = s.dir.path().join("cam1");
    std::fs::create_dir(&cam1).unwrap();
    solid(&cam1.join("backlog.png"), RED, 16, 16);
    std::fs::remove_dir(&s.inbox).unwrap();
    std::os::unix::fs::symlink(&cam1, &s.inbox).unwrap();
    (s, cam1)
}

#[test]
fn an_inbox_path_that_is_a_link_labels_every_file_once_whichever_path_it_is_written_through_and_follows_a_re_pointed_link() {
    let (s, cam1) = linked("");
    let d = s.spawn_daemon();
    assert!(d.log_text().contains(&format!("folder={}", std::fs::canonicalize(&cam1).unwrap().display())), "{}", d.log_text());
    let inbox = |name: &str| s.inbox.join(name);
    wait_for_rows(&s, &d, &[&inbox("backlog.png")]);

    // Live files: renamed in through the link, written in place through the link, written into the
    // real folder.
    put(&inbox("renamed.png"), GREEN);
    solid(&inbox("written.png"), BLUE, 16, 16);
    solid(&cam1.join("real.png"), GREEN, 16, 16);
    wait_for_rows(&s, &d, &[&inbox("renamed.png"), &inbox("written.png"), &inbox("real.png")]);
    // The row is durable before the sidecar (I1): wait for the sidecar itself.
    assert_eq!(top1(&wait_for_sidecar(&cam1.join("written.png"), WAIT)).0, 2, "the sidecar beside the image");

    // The link re-pointed to another folder, with an image already in it: watched and scanned at once.
    let cam2 = s.dir.path().join("cam2");
    std::fs::create_dir(&cam2).unwrap();
    solid(&cam2.join("waiting.png"), BLUE, 16, 16);
    repoint(&s.inbox, &cam2);
    d.wait_for_log("inbox path leads to another folder now", WAIT);
    wait_for_rows(&s, &d, &[&inbox("waiting.png")]);
    solid(&inbox("after.png"), RED, 16, 16);
    solid(&cam1.join("left_behind.png"), RED, 16, 16);
    wait_for_rows(&s, &d, &[&inbox("after.png")]);

    // A reload with the same config changes nothing.
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);
    // Quiet for 2 s: a second row for any of them, or one for the old folder's file, would be there by then.
    let rows = settled_rows(&s, Duration::from_secs(2));
    let mut counts = BTreeMap::new();
    for r in &rows {
        *counts.entry(r[1].to_string()).or_insert(0) += 1;
    }
    let want: BTreeMap<String, usize> =
        ["backlog.png", "renamed.png", "written.png", "real.png", "waiting.png", "after.png"].iter().map(|n| (inbox(n).display().to_string(), 1)).collect();
    assert_eq!(counts, want, "one row per image, under the configured path; none for the folder the link left; log:\n{}", d.log_text());
    assert!(!cam1.join("left_behind.png.json").exists(), "the old folder is no longer watched");
    assert!(d.stop().success());
}

#[test]
fn a_polled_inbox_whose_path_is_a_link_labels_live_files() {
    let (s, cam1) = linked("");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\npoll = true\npoll_interval_ms = 200\n");
    let d = s.spawn_daemon();
    assert!(d.log_text().contains("via=\"polling\"") || d.log_text().contains("via=polling"), "{}", d.log_text());
    wait_for_rows(&s, &d, &[&s.inbox.join("backlog.png")]);
    solid(&cam1.join("live.png"), GREEN, 16, 16);
    wait_for_rows(&s, &d, &[&s.inbox.join("live.png")]);
    let rows = settled_rows(&s, Duration::from_secs(1)); // quiet for 1 s: no second row
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(d.stop().success());
}
