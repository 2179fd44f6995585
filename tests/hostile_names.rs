//! Hostile names and unreadable files: the real binary, real inotify, real files. Every name the
//! file system takes is labelled exactly once, with its sidecar at the documented name, and stays
//! labelled across restarts; a file that cannot be read now is a fault (no record), labelled once it
//! can be.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const LONG: Duration = Duration::from_secs(30);

/// The documented sidecar name: `<name>.json`, or when that exceeds 255 bytes,
/// `<first 233 bytes, cut on a UTF-8 boundary>~<16 hex of FNV-1a 64 of the name>.json`.
fn documented_sidecar(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap().as_bytes();
    if name.len() + 5 <= 255 {
        let mut s = image.as_os_str().to_owned();
        s.push(".json");
        return s.into();
    }
    let mut cut = 233;
    while std::str::from_utf8(name).is_ok() && std::str::from_utf8(&name[..cut]).is_err() {
        cut -= 1;
    }
    let hash = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    let mut out = name[..cut].to_vec();
    out.extend(format!("~{hash:016x}.json").into_bytes());
    image.with_file_name(OsString::from_vec(out))
}

fn stage_and_drop(s: &Setup, name: &OsStr, rgb: [u8; 3]) -> PathBuf {
    let staged = s.dir.path().join("staged.png");
    solid(&staged, rgb, 32, 32);
    let to = s.inbox.join(name);
    std::fs::rename(&staged, &to).unwrap();
    to
}


/// Labels each name once, checks one row and one sidecar each, then restarts twice: no new rows.
fn each_labelled_once_across_restarts(names: &[OsString]) {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let images: Vec<PathBuf> = names.iter().map(|n| stage_and_drop(&s, n, GREEN)).collect();
    for img in &images {
        let side = documented_sidecar(img);
        eventually(format_args!("a sidecar {side:?}"), LONG, || side.exists());
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
        assert_eq!(top1(&v).0, 1, "{side:?}");
    }
    let rows = settled_rows(&s, Duration::from_secs(1));
    assert_eq!(rows.len(), images.len(), "one row per image: {rows:?}");
    let (header, _) = read_csv(&s.csv);
    let path_at = header.iter().position(|h| h == "path").unwrap();
    for img in &images {
        let want = img.to_string_lossy();
        assert_eq!(rows.iter().filter(|r| r[path_at] == *want).count(), 1, "one row for {want:?}: {rows:?}");
        let sidecars = std::fs::read_dir(&s.inbox).unwrap().flatten().filter(|e| e.path() == documented_sidecar(img)).count();
        assert_eq!(sidecars, 1);
    }
    let files = std::fs::read_dir(&s.inbox).unwrap().count();
    assert_eq!(files, 2 * images.len(), "only images and their sidecars in the inbox");
    assert!(d.stop().success());
    for restart in 1..=2 {
        let d = s.spawn_daemon();
        d.wait_for_log("scan done", LONG);
        let again = settled_rows(&s, Duration::from_secs(2));
        assert_eq!(again.len(), images.len(), "restart {restart} relabelled: {again:?}");
        assert!(d.stop().success());
    }
    println!("names: {} images, {} rows, 2 restarts added none", images.len(), rows.len());
}

#[test]
fn long_and_odd_utf8_names_are_labelled_once() {
    let names: Vec<OsString> = vec![
        format!("a{}.png", "é".repeat(125)).into(), // 255 bytes: the longest name; hashed sidecar
        format!("b{}.png", "é".repeat(123)).into(), // 251 bytes: just too long for `.json`
        format!("{}.png", "é".repeat(123)).into(),  // 250 bytes: `.json` fits exactly
        "new\nline, \"quoted\" 'single'.png".into(),
    ];
    for n in &names[..3] {
        assert!([255, 251, 250].contains(&n.len()), "{}", n.len());
    }
    each_labelled_once_across_restarts(&names);
}

#[test]
fn a_non_utf8_name_is_labelled_once() {
    each_labelled_once_across_restarts(&[OsString::from_vec(b"\xff\xfe.png".to_vec())]);
}


fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn an_unreadable_image_is_a_fault_not_a_verdict() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipped: setpriv is not installed");
        return;
    }
    let s = Setup::new("channel_mean", "");
    let backlog = s.inbox.join("backlog.png");
    solid(&backlog, RED, 32, 32);
    sh(&format!("chmod 000 '{}' && chown -R 65534:65534 '{}'", backlog.display(), s.dir.path().display()));
    let d = Nobody::spawn(&s);
    let staged = s.dir.path().join("staged.png");
    solid(&staged, GREEN, 32, 32);
    sh(&format!("chown 65534:65534 '{0}' && chmod 000 '{0}'", staged.display()));
    let live = s.inbox.join("live.png");
    std::fs::rename(&staged, &live).unwrap();
    std::thread::sleep(Duration::from_secs(2)); // a window in which an unreadable image must get no record
    let rows = if s.csv.exists() { s.rows() } else { Vec::new() };
    assert!(rows.is_empty(), "an unreadable image got a row: {rows:?}\n{}", d.log_text());
    assert!(!sidecar(&backlog).exists() && !sidecar(&live).exists(), "an unreadable image got a sidecar");
    let faults = d.log_text().lines().filter(|l| l.contains("not recorded")).count();
    assert!(faults >= 2, "each unreadable image is logged as a fault:\n{}", d.log_text());

    // Retried with back-off: fixed permissions are picked up without a restart or a new event.
    assert!(d.log_text().contains("retried"), "a fault says it is retried:\n{}", d.log_text());
    sh(&format!("chmod 644 '{}' '{}'", backlog.display(), live.display()));
    let t = Instant::now();
    eventually("the images labelled once readable", LONG, || sidecar(&backlog).exists() && sidecar(&live).exists());
    let took = t.elapsed();
    let rows = settled_rows(&s, Duration::from_secs(1));
    assert_eq!(rows.len(), 2, "exactly one row per image: {rows:?}");
    assert_eq!(top1(&read_sidecar(&backlog)).0, 0);
    assert_eq!(top1(&read_sidecar(&live)).0, 1);
    d.stop();
    // And a restart adds nothing.
    let d = Nobody::spawn(&s);
    std::thread::sleep(Duration::from_secs(2)); // a window in which a relabelling would show
    d.stop();
    assert_eq!(s.rows().len(), 2, "a restart labelled again");
    println!("permission fault: {faults} fault lines, 0 rows while unreadable; 2 rows {took:?} after chmod (no restart)");
}
