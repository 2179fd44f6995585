//! A hostile inbox, against the real binary and real inotify: symbolic links into other folders,
//! FIFOs swapped in under an image's name, the inbox deleted and recreated, folders labeld cannot
//! read, names that are not UTF-8, a folder renamed mid-backlog and images replaced while in flight.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use crate::common::{self, *};

const WAIT: Duration = Duration::from_secs(30);

fn recursive(s: &Setup, extra: &str) {
    s.edit_config("settle_ms = 200\n", &format!("settle_ms = 200\nrecursive = true\n{extra}"));
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(16, 16, image::Rgb(rgb)).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Writes `bytes` under a temp name beside `path`, then renames it into place (one rename event).
fn put(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name(format!(".put.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn row_paths(s: &Setup) -> Vec<String> {
    if !s.csv.exists() {
        return Vec::new();
    }
    s.rows().iter().map(|r| r[1].to_string()).collect()
}

fn wait_until(what: &str, d: &Daemon, ok: impl FnMut() -> bool) {
    d.eventually(what, WAIT, ok);
}

/// Name, bytes and mtime of every entry of `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            (p.clone(), (std::fs::read(&p).unwrap(), m.modified().unwrap()))
        })
        .collect()
}

fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into();
    let mut r = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn a_linked_folder_moved_into_a_recursive_inbox_is_never_followed() {
    let s = Setup::new("channel_mean", "");
    recursive(&s, "on_done = \"delete\"\n");
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for (i, rgb) in [RED, GREEN, BLUE].into_iter().enumerate() {
        solid(&outside.join(format!("keep{i}.png")), rgb, 16, 16);
    }
    let before = snapshot(&outside);
    let d = s.spawn_daemon();

    let link = s.dir.path().join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    std::fs::rename(&link, s.inbox.join("link")).unwrap();
    put(&s.inbox.join("control1.png"), &png(GREEN));
    wait_until("the control image's row", &d, || row_paths(&s).iter().any(|p| p.ends_with("control1.png")));
    // Written outside after the link is in the inbox: still not labelled.
    solid(&outside.join("late.png"), BLUE, 16, 16);
    std::thread::sleep(Duration::from_millis(500)); // a window in which late.png must not be labelled
    put(&s.inbox.join("control2.png"), &png(GREEN));
    wait_until("the second control image's row", &d, || row_paths(&s).iter().any(|p| p.ends_with("control2.png")));
    // A restart scans the inbox with the link in it: still not followed.
    assert!(d.stop().success());
    let d = s.spawn_daemon();
    put(&s.inbox.join("control3.png"), &png(GREEN));
    wait_until("the third control image's row", &d, || row_paths(&s).iter().any(|p| p.ends_with("control3.png")));
    let log = d.log_text();
    assert!(d.stop().success());

    let mut after = snapshot(&outside);
    assert!(after.remove(&outside.join("late.png")).is_some(), "the file written outside is still there");
    assert_eq!(after, before, "nothing outside the inbox changed (names, bytes, mtimes)");
    let rows = row_paths(&s);
    assert_eq!(rows.len(), 3, "rows only for the control images: {rows:?}");
    assert!(rows.iter().all(|p| p.contains("control")), "{rows:?}");
    assert_eq!(log.matches("not followed").count(), 1, "the link is reported once per run:\n{log}");
}

#[test]
fn a_fifo_swapped_in_under_an_image_name_never_blocks_the_daemon() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let name = s.inbox.join("swap.png");
    let c_name = std::ffi::CString::new(name.as_os_str().as_bytes()).unwrap();
    let good = png(RED);
    let t = Instant::now();
    let mut fifos = 0;
    while t.elapsed() < Duration::from_secs(3) {
        let _ = std::fs::remove_file(&name);
        assert_eq!(unsafe { libc::mkfifo(c_name.as_ptr(), 0o644) }, 0);
        fifos += 1;
        std::thread::sleep(Duration::from_millis(3)); // the swapper's pace, not a wait
        std::fs::remove_file(&name).unwrap();
        std::fs::write(&name, &good).unwrap();
        std::thread::sleep(Duration::from_millis(3)); // the swapper's pace, not a wait
    }
    // End on a FIFO: nothing may ever open it blocking.
    std::fs::remove_file(&name).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_name.as_ptr(), 0o644) }, 0);
    assert!(fifos > 50, "the swap loop ran {fifos} times");
    solid(&s.inbox.join("after.png"), BLUE, 16, 16);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("after.png"), WAIT)).0, 2);
    let stopping = Instant::now();
    assert!(d.stop().success());
    assert!(stopping.elapsed() < Duration::from_secs(15), "SIGTERM took {:?}", stopping.elapsed());
}

#[test]
fn an_inbox_deleted_or_moved_away_and_recreated_is_watched_again() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n");
    recursive(&s, "");
    std::fs::create_dir(s.inbox.join("sub")).unwrap();
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    assert_eq!(http_get(&format!("{base}/readyz")).0, 200);

    // rm -rf inbox && mkdir inbox, as fast as a shell does it.
    std::fs::remove_dir_all(&s.inbox).unwrap();
    std::fs::create_dir(&s.inbox).unwrap();
    d.wait_for_log("watching it again", WAIT);
    solid(&s.inbox.join("one.png"), RED, 16, 16);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("one.png"), WAIT)).0, 0);

    // Gone for a while: /readyz says so, naming the inbox; the log says it once.
    std::fs::remove_dir_all(&s.inbox).unwrap();
    wait_until("/readyz 503", &d, || http_get(&format!("{base}/readyz")).0 == 503);
    let (_, body) = http_get(&format!("{base}/readyz"));
    assert!(body.contains(&s.inbox.display().to_string()), "{body}");
    let told = d.count_in_log("inbox folder is gone");
    std::thread::sleep(Duration::from_secs(5)); // several periodic checks, which must not say it again
    assert_eq!(d.count_in_log("inbox folder is gone"), told, "said once per disappearance:\n{}", d.log_text());
    std::fs::create_dir(&s.inbox).unwrap();
    solid(&s.inbox.join("two.png"), GREEN, 16, 16); // written before the new folder is watched
    wait_until("/readyz 200", &d, || http_get(&format!("{base}/readyz")).0 == 200);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("two.png"), WAIT)).0, 1);

    // A sub-folder deleted and recreated.
    std::fs::create_dir(s.inbox.join("sub")).unwrap();
    wait_until("a watch on the sub-folder", &d, || d.watches(&s.inbox.join("sub")));
    std::fs::remove_dir_all(s.inbox.join("sub")).unwrap();
    std::fs::create_dir(s.inbox.join("sub")).unwrap();
    wait_until("a watch on the recreated sub-folder", &d, || d.watches(&s.inbox.join("sub")));
    solid(&s.inbox.join("sub/three.png"), BLUE, 16, 16);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("sub/three.png"), WAIT)).0, 2);

    // Moved away and recreated: the new folder is watched, the old one no longer is.
    let old = s.dir.path().join("inbox.old");
    std::fs::rename(&s.inbox, &old).unwrap();
    std::fs::create_dir(&s.inbox).unwrap();
    d.wait_for_log("watching it again", WAIT);
    wait_until("/readyz 200", &d, || http_get(&format!("{base}/readyz")).0 == 200);
    solid(&old.join("stray.png"), RED, 16, 16);
    solid(&s.inbox.join("four.png"), GREEN, 16, 16);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("four.png"), WAIT)).0, 1);
    assert!(!common::sidecar(&old.join("stray.png")).exists(), "the moved-away folder is no longer an inbox");
    assert!(d.stop().success());
    let rows = row_paths(&s);
    assert_eq!(rows.len(), 4, "{rows:?}");
}


#[test]
fn an_unreadable_sub_folder_is_a_warning_and_the_rest_is_labelled() {
    let s = Setup::new("channel_mean", "");
    recursive(&s, "");
    std::fs::create_dir(s.inbox.join("sub")).unwrap();
    solid(&s.inbox.join("a.png"), RED, 16, 16);
    solid(&s.inbox.join("sub/b.png"), GREEN, 16, 16);
    let chown = Command::new("chown").args(["-R", "65534:65534"]).arg(s.dir.path()).status().unwrap();
    assert!(chown.success());
    // Like lost+found: root's, mode 0700, with something in it.
    let lost = s.inbox.join("lost+found");
    std::fs::create_dir(&lost).unwrap();
    solid(&lost.join("secret.png"), BLUE, 16, 16);
    std::fs::set_permissions(&lost, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();

    let d = Nobody::spawn(&s);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("a.png"), WAIT)).0, 0);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("sub/b.png"), WAIT)).0, 1);
    solid(&s.inbox.join("sub/c.png"), BLUE, 16, 16);
    Command::new("chown").args(["65534:65534"]).arg(s.inbox.join("sub/c.png")).status().unwrap();
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("sub/c.png"), WAIT)).0, 2);
    let log = d.log_text();
    assert!(d.stop().success(), "{log}");
    assert_eq!(log.matches("cannot read or watch this folder").count(), 1, "{log}");
    assert!(log.contains("lost+found"), "{log}");
    assert!(!common::sidecar(&lost.join("secret.png")).exists());
    assert_eq!(row_paths(&s).len(), 3);
}

#[test]
fn a_name_that_is_not_utf8_is_labelled_with_a_lossy_path_in_its_row() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let name = s.inbox.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    put(&name, &png(BLUE));
    assert_eq!(top1(&wait_for_sidecar(&name, WAIT)).0, 2);
    assert!(d.stop().success());
    let rows = row_paths(&s);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].ends_with("caf\u{FFFD}.png"), "{rows:?}");
}

#[test]
fn a_folder_renamed_mid_backlog_gives_one_row_per_image() {
    let s = Setup::new("channel_mean", "");
    recursive(&s, "");
    let n = 300;
    let batch = s.inbox.join("batch");
    std::fs::create_dir(&batch).unwrap();
    let bytes = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_fn(160, 120, |x, y| image::Rgb([(x * 7 % 255) as u8, (y * 5 % 255) as u8, 40]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    for i in 0..n {
        std::fs::write(batch.join(format!("img{i:03}.png")), &bytes).unwrap();
    }
    let d = s.spawn_daemon();
    wait_until("the first rows", &d, || row_paths(&s).len() >= 20);
    let renamed = s.inbox.join("renamed");
    std::fs::rename(&batch, &renamed).unwrap();
    let done_at_rename = row_paths(&s).len();
    wait_until("a sidecar for every image", &d, || {
        (0..n).all(|i| common::sidecar(&renamed.join(format!("img{i:03}.png"))).exists())
    });
    std::thread::sleep(Duration::from_secs(1)); // a window in which a second row would be written
    assert!(d.stop().success());
    let rows = row_paths(&s);
    let mut per_image = BTreeMap::<String, usize>::new();
    for p in &rows {
        *per_image.entry(Path::new(p).file_name().unwrap().to_string_lossy().into_owned()).or_default() += 1;
    }
    assert!(done_at_rename < n, "the rename came too late to test anything");
    // Exactly one row per image: images queued under the old path are read under the new one; an
    // image read before the rename has its result written where it is now (the job holds its folder
    // open), and is not labelled a second time under its new path meanwhile (claims go by inode).
    assert_eq!(per_image.len(), n, "every image has a row");
    let twice: Vec<_> = per_image.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "labelled more than once: {twice:?}");
    // Rows under the old path are those written before the rename (plus at most one batch whose
    // result was placed in the instant before it).
    let old = rows.iter().filter(|p| p.contains("/batch/")).count();
    assert!(old <= done_at_rename + 8, "{old} rows under the old path, {done_at_rename} written before the rename");
    assert_eq!(rows.iter().filter(|p| p.contains("/renamed/")).count(), n - old);
}

#[test]
fn an_image_replaced_while_in_flight_ends_with_the_new_contents_labels() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let (red, blue) = (png(RED), png(BLUE));
    let names: Vec<PathBuf> = (0..20).map(|i| s.inbox.join(format!("x{i}.png"))).collect();
    for name in &names {
        put(name, &red);
        std::thread::sleep(Duration::from_millis(2)); // the replacer's pace: well under 10 ms, red is likely in flight now
        put(name, &blue);
    }
    for name in &names {
        eventually(format_args!("{} describing the new content", name.display()), WAIT, || {
            (common::sidecar(name).exists() && top1(&read_sidecar(name)).0 == 2).then_some(()).ok_or_else(|| Shown(s.rows()))
        });
    }
    assert!(d.stop().success());
}

/// A channel-mean model that computes for a second or so on a bright image (mean of the normalized
/// input above 1.5, e.g. white) and at once on anything else (the load-time probe is all zeros).
fn slow_on_bright_model(path: &Path) {
    // `x` is used after the loop, so no optimisation pass can drop it.
    scripted_channel_mean(
        path,
        "        y = x\n        if bool(x.mean() > 1.5):\n            for i in range(6000):\n                y = torch.sin(y)\n        x = x + 0.0 * y.mean()",
    );
}

/// True while the daemon holds `dir` open.
fn holds_open(pid: i32, dir: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == dir)))
        .unwrap_or(false)
}

#[test]
fn an_image_whose_folder_is_renamed_while_it_is_labelled_gets_its_row_and_sidecar_where_it_is_now() {
    let s = Setup::new("channel_mean", "");
    slow_on_bright_model(&s.model);
    recursive(&s, "");
    let (old, new) = (s.inbox.join("line1"), s.inbox.join("line1-renamed"));
    std::fs::create_dir(&old).unwrap();
    let d = s.spawn_daemon();
    put(&old.join("white.png"), &png([255, 255, 255]));
    // A job holds its image's folder from its read until its result is written; a scan holds it only
    // for an instant, so it must be seen held at every look for 200 ms.
    let mut held_since: Option<Instant> = None;
    wait_until("the image's folder held open by its job", &d, || {
        held_since = holds_open(d.pid(), &old).then(|| held_since.unwrap_or_else(Instant::now));
        held_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(200))
    });
    std::fs::rename(&old, &new).unwrap();
    let image = new.join("white.png");
    // The model computes for a second or so on this image, longer on a busy machine.
    wait_for_sidecar(&image, 2 * WAIT);
    d.wait_for_log("recorded under its new path", WAIT);
    // The rescan of the renamed folder finds the image again: it must not be labelled twice.
    std::thread::sleep(Duration::from_secs(2)); // a window in which a second row would be written
    assert!(d.stop().success());
    assert_eq!(row_paths(&s), [image.to_string_lossy()], "one row, under the path the image has now");
    assert_eq!(read_sidecar(&image)["path"], image.to_string_lossy().as_ref());
    assert!(!old.exists());
}
