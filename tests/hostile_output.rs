//! Exactly-once output whatever the fault, against the real binary: the CSV log on a disk that fills
//! up, a stop while sidecar writes fail (long rows), reused names with on_done = "move", and the
//! quarantine's crash windows.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![b'x'; 1024];
    let mut written = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => return written,
            Ok(n) => written += n as u64,
        }
    }
}

/// Rows per path; panics (read_csv) if any line does not parse with the header's column count.
fn rows_per_path(csv: &Path) -> HashMap<String, usize> {
    let (_, rows) = read_csv(csv);
    let mut per = HashMap::new();
    for r in &rows {
        *per.entry(r[1].to_string()).or_default() += 1;
    }
    per
}

fn assert_exactly_one_row_each(csv: &Path, images: &[PathBuf]) {
    let per = rows_per_path(csv);
    let wrong: Vec<(&Path, usize)> =
        images.iter().map(|i| (i.as_path(), per.get(i.to_str().unwrap()).copied().unwrap_or(0))).filter(|(_, n)| *n != 1).collect();
    assert!(wrong.is_empty(), "{} of {} images without exactly one row (path, rows): {wrong:?}", wrong.len(), images.len());
    assert_eq!(per.len(), images.len(), "rows for other paths: {:?}", per.keys().filter(|p| !images.iter().any(|i| i.to_str() == Some(p.as_str()))).collect::<Vec<_>>());
}

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    eventually(what, WAIT, done);
}

const COLOURS: [[u8; 3]; 3] = [RED, GREEN, BLUE];

#[test]
fn a_full_disk_under_the_results_log_leaves_no_torn_row_and_no_duplicate() {
    let s = Setup::new("channel_mean", "");
    let out = s.dir.path().join("out");
    let _fs = match Tmpfs::mount(&out, "256k") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the results log ({e})");
            return;
        }
    };
    let csv = out.join("results.csv");
    s.edit_config("csv = \"results.csv\"", &format!("csv = {:?}", csv.to_str().unwrap()));
    // Longer rows: a batch crosses a page boundary of the full tmpfs and lands only in part.
    s.edit_config("[[inbox]]", "top_k = 20\n\n[[inbox]]");
    let d = s.spawn_daemon();
    let filler = out.join("filler");
    fill(&filler);
    let mut images = Vec::new();
    for i in 0..40 {
        let img = s.inbox.join(format!("full-{i:02}.png"));
        solid(&img, COLOURS[i % 3], 16, 16);
        images.push(img);
        if i == 20 {
            d.wait_for_log("cannot write to results log", WAIT);
        }
    }
    // Full until an append has failed again after the last image arrived.
    let failed = d.count_in_log("cannot write to results log");
    d.wait_for_log_count("cannot write to results log", failed.max(1) + 1, WAIT);
    std::fs::remove_file(&filler).unwrap();
    for img in &images {
        wait_for_sidecar(img, WAIT);
    }
    assert!(d.stop().success());
    let log = std::fs::read_to_string(s.dir.path().join("daemon.log")).unwrap_or_default();
    eprintln!(
        "full disk: {} failed appends, {} partly written batches cut back",
        log.matches("cannot write to results log").count(),
        log.matches("removed a partly written batch").count()
    );
    assert_exactly_one_row_each(&csv, &images);
    for (i, img) in images.iter().enumerate() {
        let v = read_sidecar(img);
        assert_eq!(top1(&v).0, (i % 3) as u64, "{}: {v}", img.display());
    }
    // Every line, raw: the header's column count (read_csv checked the parsed rows), nothing torn.
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().count(), images.len() + 1, "one line per row plus the header");
}

#[test]
fn a_stop_while_sidecar_writes_fail_then_a_restart_gives_each_image_one_row_and_one_sidecar() {
    let s = Setup::new("channel_mean", "");
    // Long rows: 100 ranks of Chinese labels, in a folder with a long name.
    s.edit_config("[[inbox]]", "top_k = 100\nlabels_lang = \"zh\"\n\n[[inbox]]");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nrecursive = true\n");
    let deep = s.inbox.join("相机".repeat(30)).join("a-rather-long-folder-name-for-a-camera-line-".repeat(3));
    std::fs::create_dir_all(&deep).unwrap();
    let images: Vec<PathBuf> = (0..40).map(|i| deep.join(format!("IMG_{i:04}.png"))).collect();
    for img in &images {
        // A folder squatting on the sidecar's name makes every sidecar write fail.
        std::fs::create_dir(sidecar(img)).unwrap();
        std::fs::write(sidecar(img).join("keep"), b"x").unwrap();
    }
    let d = s.spawn_daemon();
    for (i, img) in images.iter().enumerate() {
        solid(img, COLOURS[i % 3], 16, 16);
    }
    wait_until("40 rows", || s.csv.exists() && rows_per_path(&s.csv).len() == images.len());
    d.wait_for_log("cannot write sidecar", WAIT);
    assert!(d.stop().success());
    let row_bytes = std::fs::metadata(&s.csv).unwrap().len() / images.len() as u64;
    eprintln!("rows of about {row_bytes} bytes");
    assert!(row_bytes > 2048, "the rows are long");
    for img in &images {
        std::fs::remove_dir_all(sidecar(img)).unwrap();
    }

    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_exactly_one_row_each(&s.csv, &images);
    for (i, img) in images.iter().enumerate() {
        let v = read_sidecar(img);
        assert_eq!(v["status"], "ok", "{}: {v}", img.display());
        assert_eq!(top1(&v).0, (i % 3) as u64, "{}", img.display());
        assert_eq!(v["top"].as_array().unwrap().len(), 100);
    }
}

#[test]
fn reused_names_with_on_done_move_are_archived_side_by_side_never_overwritten() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\n");
    let done = s.dir.path().join("done");
    // On another filesystem when a tmpfs can be mounted: the moves are then copies (EXDEV).
    let _fs = Tmpfs::mount(&done, "16m").map_err(|e| eprintln!("done_dir on the inbox's filesystem (no tmpfs: {e})")).ok();
    let d = s.spawn_daemon();
    let img = s.inbox.join("IMG_0001.jpg");
    let archived = ["IMG_0001.jpg", "IMG_0001~1.jpg", "IMG_0001~2.jpg"].map(|n| done.join(n));
    for (i, colour) in COLOURS.iter().enumerate() {
        solid(&img, *colour, 32, 32);
        wait_until("the image archived", || sidecar(&archived[i]).exists() && !img.exists());
    }
    assert!(d.stop().success());
    for (i, a) in archived.iter().enumerate() {
        let v = read_sidecar(a);
        assert_eq!(top1(&v).0, i as u64, "{}: {v}", a.display());
        // The sidecar describes the image beside it: its pixels are that colour.
        let px = image::open(a).unwrap().to_rgb8().get_pixel(16, 16).0;
        let brightest = (0..3).max_by_key(|c| px[*c]).unwrap();
        assert_eq!(brightest, i, "{}: {px:?}", a.display());
    }
    let mut names: Vec<String> = std::fs::read_dir(&done).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != ".labeld-archive").collect();
    names.sort();
    assert_eq!(names.len(), 6, "three images and three sidecars: {names:?}");
    let rows = s.rows();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r[1] == *img.to_str().unwrap()), "rows keep the inbox path");
}

#[test]
fn quarantine_happens_only_after_the_record_and_its_crash_windows_heal_at_start() {
    let s = Setup::new("channel_mean", "");
    let rejects = s.dir.path().join("rejects");
    let broken = s.inbox.join("broken.jpg");

    // Labelled without a quarantine: an error row and an error sidecar, the image stays.
    std::fs::write(&broken, b"\xFF\xD8\xFF garbage").unwrap();
    assert!(s.run_once().status.success());
    assert_eq!(read_sidecar(&broken)["status"], "error");

    // A crash between the error row and the sidecar: the sidecar comes from the row at start, then the
    // image goes to the new quarantine with it; no second row.
    std::fs::remove_file(sidecar(&broken)).unwrap();
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nquarantine = \"rejects\"\n");
    assert!(s.run_once().status.success());
    assert!(!broken.exists() && !sidecar(&broken).exists());
    let v = read_sidecar(&rejects.join("broken.jpg"));
    assert_eq!((&v["status"], &v["path"]), (&"error".into(), &broken.to_str().unwrap().into()), "the record keeps the inbox path");
    assert_exactly_one_row_each(&s.csv, std::slice::from_ref(&broken));

    // A crash after the row and the sidecar, before the move: the image and its error sidecar wait in
    // the inbox (made here by a run without the quarantine), and are moved at the next start, not
    // labelled again (the name is taken: ~1).
    let without_quarantine = |f: &dyn Fn()| {
        s.edit_config("quarantine = \"rejects\"\n", "");
        f();
        s.edit_config("settle_ms = 200\n", "settle_ms = 200\nquarantine = \"rejects\"\n");
    };
    without_quarantine(&|| {
        std::fs::write(&broken, b"\xFF\xD8\xFF other garbage").unwrap();
        assert!(s.run_once().status.success());
        assert_eq!(read_sidecar(&broken)["status"], "error");
    });
    let d = s.spawn_daemon();
    assert!(!broken.exists() && !sidecar(&broken).exists());
    assert_eq!(read_sidecar(&rejects.join("broken~1.jpg"))["status"], "error");
    assert_eq!(std::fs::read(rejects.join("broken~1.jpg")).unwrap(), b"\xFF\xD8\xFF other garbage");
    assert_eq!(read_sidecar(&rejects.join("broken.jpg")), v, "the first one untouched");

    // Live: a failed image gets its row and error sidecar, then moves (under a free name) with it.
    std::fs::write(&broken, b"not an image at all").unwrap();
    wait_until("the failed image quarantined", || sidecar(&rejects.join("broken~2.jpg")).exists());
    assert!(d.stop().success());
    assert_eq!(std::fs::read(rejects.join("broken~2.jpg")).unwrap(), b"not an image at all");

    // A crash between the image's move and its sidecar's: the sidecar follows its image at start.
    without_quarantine(&|| {
        std::fs::write(&broken, b"\xFF\xD8\xFF third").unwrap();
        assert!(s.run_once().status.success());
    });
    let third = read_sidecar(&broken);
    std::fs::rename(&broken, rejects.join("broken~3.jpg")).unwrap();
    assert!(s.run_once().status.success());
    assert!(!sidecar(&broken).exists());
    assert_eq!(read_sidecar(&rejects.join("broken~3.jpg")), third);
    assert_eq!(read_sidecar(&rejects.join("broken~1.jpg"))["status"], "error", "the others keep theirs");
    let rows = rows_per_path(&s.csv);
    assert_eq!(rows.get(broken.to_str().unwrap()), Some(&4), "one row per version of the file, none added at a start: {rows:?}");
    assert_eq!(files_in(&rejects), 8, "four images, four sidecars");
}

/// Regular files under `dir`, the archive ledger (`.labeld-archive`) aside.
fn files_in(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir).into_iter().filter_map(Result::ok).filter(|e| e.file_type().is_file() && e.file_name() != ".labeld-archive").count()
}

/// SIGKILL at random moments while images are labelled, archived and quarantined: afterwards every
/// image has exactly one row and sits, with the sidecar that describes it, in done or in quarantine.
#[test]
fn sigkill_while_archiving_and_quarantining_loses_nothing_and_labels_nothing_twice() {
    let n = 240;
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"done\"\nquarantine = \"rejects\"\n");
    let (done, rejects) = (s.dir.path().join("done"), s.dir.path().join("rejects"));
    let broken = |i: usize| i % 8 == 0;
    let mut images = Vec::new();
    for i in 0..n {
        let sub = s.inbox.join(format!("cam{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let img = if broken(i) { sub.join(format!("{i:04}.jpg")) } else { sub.join(format!("{i:04}.png")) };
        if broken(i) {
            std::fs::write(&img, b"\xFF\xD8\xFF not really").unwrap();
        } else {
            solid(&img, COLOURS[i % 3], 24, 24);
        }
        images.push(img);
    }
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed}");
    for _ in 0..4 {
        let d = s.spawn_daemon();
        let target = files_in(&done) + files_in(&rejects) + 10 + (seed % 60) as usize;
        let _ = within(WAIT, || files_in(&done) + files_in(&rejects) >= target.min(2 * n));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(200 + seed % 3000)); // a random moment to kill at
        d.signal(9);
        drop(d);
        eprintln!("killed with {} files set aside of {}", files_in(&done) + files_in(&rejects), 2 * n);
    }
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_exactly_one_row_each(&s.csv, &images);
    for (i, img) in images.iter().enumerate() {
        let rel = img.strip_prefix(&s.inbox).unwrap();
        let moved = if broken(i) { rejects.join(rel) } else { done.join(rel) };
        let v = read_sidecar(&moved);
        assert_eq!(v["path"], img.to_str().unwrap());
        if broken(i) {
            assert_eq!(v["status"], "error", "{}: {v}", moved.display());
        } else {
            assert_eq!(top1(&v).0, (i % 3) as u64, "{}: {v}", moved.display());
        }
    }
    assert_eq!(files_in(&s.inbox), 0, "nothing left in the inbox");
    assert_eq!(files_in(&done) + files_in(&rejects), 2 * n, "one image and one sidecar each, no extra copies");
}

/// Every image under `dir`, recursively (sidecars and dotfiles aside).
fn images_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(images_under(&p));
        } else if p.extension().is_some_and(|x| x == "png") {
            out.push(p);
        }
    }
    out
}

/// Two folders with the same layout swap names after their rows are written but while their sidecars
/// cannot be (a folder squats on each sidecar's name): each sidecar must still land beside its own
/// image, and on_done = "move" must archive each image with its own sidecar, never the other's.
#[test]
fn folders_swapped_between_row_and_sidecar_keep_each_result_with_its_own_image() {
    let s = Setup::new("channel_mean", "");
    let done = s.dir.path().join("done");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nrecursive = true\non_done = \"move\"\ndone_dir = \"done\"\n");
    let (a, b) = (s.inbox.join("A"), s.inbox.join("B"));
    for (dir, colour) in [(&a, RED), (&b, BLUE)] {
        std::fs::create_dir(dir).unwrap();
        solid(&dir.join("x.png"), colour, 16, 16);
        std::fs::create_dir(sidecar(&dir.join("x.png"))).unwrap();
        std::fs::write(sidecar(&dir.join("x.png")).join("keep"), b"x").unwrap();
    }
    let d = s.spawn_daemon();
    wait_until("2 rows", || s.csv.exists() && rows_per_path(&s.csv).len() == 2);
    d.wait_for_log("cannot write sidecar", WAIT);
    let t = s.inbox.join("T");
    std::fs::rename(&a, &t).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&t, &b).unwrap();
    for dir in [&a, &b] {
        std::fs::remove_dir_all(sidecar(&dir.join("x.png"))).unwrap();
    }
    wait_until("both images archived", || done.exists() && images_under(&done).len() == 2);
    std::thread::sleep(Duration::from_millis(500)); // a window in which a second row would be written
    assert!(d.stop().success());
    for img in images_under(&done) {
        let px = image::open(&img).unwrap().into_rgb8().get_pixel(0, 0).0;
        let want = if px == RED { 0 } else { 2 };
        assert_eq!(top1(&read_sidecar(&img)).0, want, "{} archived with another image's sidecar", img.display());
    }
    assert!(images_under(&s.inbox).is_empty());
    assert_eq!(rows_per_path(&s.csv).values().sum::<usize>(), 2, "one row each");
}

/// A folder moved out of the inbox after its images' rows were written but before their sidecars
/// could be, then moved back under another name: the same files get their sidecars from their rows,
/// not a second row.
#[test]
fn a_folder_moved_out_and_back_before_its_sidecars_gives_no_second_row() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nrecursive = true\n");
    let line = s.inbox.join("line");
    std::fs::create_dir(&line).unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("x{i}.png")).collect();
    for (i, n) in names.iter().enumerate() {
        solid(&line.join(n), COLOURS[i % 3], 16, 16);
        std::fs::create_dir(sidecar(&line.join(n))).unwrap();
        std::fs::write(sidecar(&line.join(n)).join("keep"), b"x").unwrap();
    }
    let d = s.spawn_daemon();
    wait_until("5 rows", || s.csv.exists() && rows_per_path(&s.csv).len() == 5);
    d.wait_for_log("cannot write sidecar", WAIT);
    let outside = s.dir.path().join("outside");
    std::fs::rename(&line, &outside).unwrap();
    d.wait_for_log("no sidecar written; the CSV row stands", WAIT);
    for n in &names {
        std::fs::remove_dir_all(sidecar(&outside.join(n))).unwrap();
    }
    let back = s.inbox.join("line-back");
    std::fs::rename(&outside, &back).unwrap();
    wait_until("sidecars in the folder moved back", || names.iter().all(|n| sidecar(&back.join(n)).exists()));
    std::thread::sleep(Duration::from_secs(1)); // a window in which a second row would be written
    assert!(d.log_text().contains("already has a row"), "{}", d.log_text());
    assert!(d.stop().success());
    assert_eq!(rows_per_path(&s.csv).values().sum::<usize>(), 5, "one row each: {:?}", rows_per_path(&s.csv));
    for (i, n) in names.iter().enumerate() {
        assert_eq!(top1(&read_sidecar(&back.join(n))).0, (i % 3) as u64);
    }
    assert!(!s.dir.path().join("outside").exists());
}
