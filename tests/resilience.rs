//! Failures inflicted on the real binary: half-written files, SIGKILL, floods, hostile input, output
//! failures, log rotation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)).unwrap()
}

fn sidecars_in(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect()
}

/// A camera that writes a JPEG in 10 chunks over 2 s. `reopen`: it opens, appends and closes the file
/// for every chunk (each close is a close-after-write event for a half file).
fn slow_writer(path: &Path, bytes: &[u8], reopen: bool) {
    let chunk = bytes.len().div_ceil(10);
    let mut held = None;
    for (i, part) in bytes.chunks(chunk).enumerate() {
        if reopen || held.is_none() {
            held = Some(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap());
        }
        let f = held.as_mut().unwrap();
        f.write_all(part).unwrap();
        f.flush().unwrap();
        if reopen {
            held = None;
        }
        if i < 9 {
            std::thread::sleep(Duration::from_millis(220)); // the camera's pace, not a wait
        }
    }
}

#[test]
fn a_slowly_written_jpeg_gets_exactly_one_ok_sidecar_after_its_last_chunk() {
    let s = Setup::new("channel_mean", "");
    // The default settle interval, shorter than the writer's pauses between chunks.
    s.edit_config("settle_ms = 200", "settle_ms = 500");
    let d = s.spawn_daemon();
    let bytes = photo("coffee.jpg");
    for (name, reopen) in [("reopening.jpg", true), ("held-open.jpg", false)] {
        let path = s.inbox.join(name);
        let side = sidecar(&path);
        let writer = {
            let (path, bytes) = (path.clone(), bytes.clone());
            std::thread::spawn(move || slow_writer(&path, &bytes, reopen))
        };
        // While the camera writes, no sidecar may appear.
        while !writer.is_finished() {
            assert!(!side.exists(), "{name}: a sidecar appeared before the last chunk");
            std::thread::sleep(Duration::from_millis(5)); // polled: no sidecar may appear meanwhile
        }
        writer.join().unwrap();
        let v = wait_for_sidecar(&path, WAIT);
        assert_eq!(v["status"], "ok", "{name}: {v}");
    }
    assert!(d.stop().success());
    let rows = s.rows();
    assert_eq!(rows.len(), 2, "exactly one row per image: {rows:?}");
    assert!(rows.iter().all(|r| &r[2] == "ok"));
}

/// Tiny xorshift: the crash test's kill points, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `LABELD_CRASH_IMAGES` / `LABELD_CRASH_KILLS` scale it up (docs/development.md: full size 5000 / 10).
#[test]
fn sigkill_at_random_moments_loses_nothing_and_tears_nothing() {
    let n = env_usize("LABELD_CRASH_IMAGES", 1500);
    let kills = env_usize("LABELD_CRASH_KILLS", 6);
    let seed = std::env::var("LABELD_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("crash test: {n} images, {kills} kills, LABELD_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let s = Setup::new("channel_mean", "");
    let colours = [RED, GREEN, BLUE];
    for i in 0..n {
        let sub = s.inbox.join(format!("cam{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        solid(&sub.join(format!("{i:05}.png")), colours[i % 3], 48, 32);
    }
    let mut survived = 0;
    for k in 0..kills {
        let d = s.spawn_daemon();
        let before = sidecars_in(&s.inbox).len();
        // Kill somewhere between a few and a few hundred images into this run.
        let target = before + 3 + (rng.next() % (n as u64 / kills as u64).max(4)) as usize;
        let _ = within(WAIT, || sidecars_in(&s.inbox).len() >= target.min(n));
        std::thread::sleep(Duration::from_micros(200 + rng.next() % 3000)); // a random moment to kill at
        d.signal(9);
        drop(d);
        survived += 1;
        eprintln!("kill {}: {} of {n} labelled", k + 1, sidecars_in(&s.inbox).len());
    }
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every image: exactly one whole, parseable sidecar with the right label.
    let mut checked = 0;
    for i in 0..n {
        let img = s.inbox.join(format!("cam{}/{i:05}.png", i % 4));
        let v = read_sidecar(&img);
        assert_eq!(v["status"], "ok", "{}: {v}", img.display());
        assert_eq!(top1(&v).0, (i % 3) as u64, "{}", img.display());
        checked += 1;
    }
    assert_eq!(sidecars_in(&s.inbox).len(), n, "one sidecar per image, no strays");
    let temps: Vec<_> = walkdir::WalkDir::new(&s.inbox)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");

    // Every row parses (read_csv checks field counts); every image has at least one row.
    let rows = s.rows();
    let mut per_image = std::collections::HashMap::<String, usize>::new();
    for r in &rows {
        *per_image.entry(r[1].to_string()).or_default() += 1;
    }
    assert_eq!(per_image.len(), n, "every image has a CSV row");
    let duplicates: usize = per_image.values().map(|c| c - 1).sum();
    eprintln!(
        "crash test: {survived} SIGKILLs survived, {checked} images checked, {} CSV rows, {duplicates} duplicate rows",
        rows.len()
    );
    // Rows of a batch cut short by a crash complete their sidecars at restart instead of being
    // labelled again: exactly one row per image.
    assert_eq!(duplicates, 0, "{duplicates} duplicate rows after {survived} kills");
}

#[test]
fn five_thousand_files_through_a_queue_of_16_are_all_labelled() {
    let n = env_usize("LABELD_FLOOD_IMAGES", 5000);
    let s = Setup::new("channel_mean", "").with_workers("queue = 16\nmax_batch = 8\n");
    let src = s.dir.path().join("src.png");
    solid(&src, GREEN, 16, 16);
    let bytes = std::fs::read(&src).unwrap();
    let d = s.spawn_daemon();
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(s.inbox.join(format!("f{i:05}.png")), &bytes).unwrap();
    }
    eprintln!("wrote {n} files in {:?}", t.elapsed());
    d.eventually(&format!("all {n} labelled"), Duration::from_secs(600), || {
        let done = sidecars_in(&s.inbox).len();
        (done >= n).then_some(()).ok_or(done)
    });
    assert!(d.stop().success());
    let rows = s.rows();
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| &r[2] == "ok" && &r[3] == "1"));
}

#[test]
fn a_polled_inbox_is_labelled_without_inotify() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\npoll = true\npoll_interval_ms = 100\n");
    let d = s.spawn_daemon();
    assert!(d.log_text().contains("polling"), "{}", d.log_text());
    solid(&s.inbox.join("net.png"), BLUE, 20, 20);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("net.png"), WAIT)).0, 2);
    assert!(d.stop().success());
}

#[test]
fn failed_images_go_to_quarantine_once_and_are_not_retried() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nquarantine = \"rejects\"\n");
    std::fs::create_dir(s.inbox.join("line1")).unwrap();
    std::fs::write(s.inbox.join("line1/broken.jpg"), b"\xFF\xD8\xFF garbage").unwrap();
    solid(&s.inbox.join("line1/fine.png"), RED, 10, 10);
    assert!(s.run_once().status.success());
    let q = s.dir.path().join("rejects/line1/broken.jpg");
    assert!(q.exists() && !s.inbox.join("line1/broken.jpg").exists());
    let v = read_sidecar(&q);
    assert_eq!(v["status"], "error");
    // The record keeps the path the image was found at (its row is written before the move).
    assert_eq!(v["path"], s.inbox.join("line1/broken.jpg").to_str().unwrap());
    assert_eq!(read_sidecar(&s.inbox.join("line1/fine.png"))["status"], "ok");
    // Restarting finds nothing to do.
    assert!(s.run_once().status.success());
    assert_eq!(s.rows().len(), 2);
}

#[test]
fn links_and_special_files_are_skipped_with_a_log_line() {
    let s = Setup::new("channel_mean", "");
    let outside = s.dir.path().join("secret.png");
    solid(&outside, RED, 10, 10);
    std::os::unix::fs::symlink(&outside, s.inbox.join("link.png")).unwrap();
    let fifo = s.inbox.join("pipe.png");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    solid(&s.inbox.join("real.png"), GREEN, 10, 10);
    let out = s.run_once();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("link.png") && log.contains("symbolic link"), "{log}");
    assert!(log.contains("pipe.png") && log.contains("FIFO"), "{log}");
    assert!(!sidecar(&s.inbox.join("link.png")).exists());
    assert!(!sidecar(&outside).exists());
    assert!(!sidecar(&fifo).exists());
    assert_eq!(read_sidecar(&s.inbox.join("real.png"))["status"], "ok");

    // While running: a link dropped in is not followed either.
    let d = s.spawn_daemon();
    std::os::unix::fs::symlink(&outside, s.inbox.join("link2.png")).unwrap();
    solid(&s.inbox.join("after.png"), BLUE, 10, 10);
    wait_for_sidecar(&s.inbox.join("after.png"), WAIT);
    assert!(d.stop().success());
    assert!(!sidecar(&s.inbox.join("link2.png")).exists());
}

#[test]
fn an_animated_gif_is_labelled_by_its_first_frame() {
    use image::codecs::gif::GifEncoder;
    let s = Setup::new("channel_mean", "");
    s.edit_config("[[inbox]]\n", "[[inbox]]\ninclude = [\"*.gif\"]\n");
    let f = std::fs::File::create(s.inbox.join("anim.gif")).unwrap();
    let mut enc = GifEncoder::new(f);
    for c in [RED, BLUE, BLUE] {
        let frame = image::RgbaImage::from_pixel(20, 20, image::Rgba([c[0], c[1], c[2], 255]));
        enc.encode_frame(image::Frame::new(frame)).unwrap();
    }
    drop(enc);
    assert!(s.run_once().status.success());
    assert_eq!(top1(&read_sidecar(&s.inbox.join("anim.gif"))).0, 0);
}

#[test]
fn an_unwritable_sidecar_is_retried_until_it_can_be_written() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    // A directory squatting on the sidecar's name makes the rename fail, as a read-only folder would.
    let blocker = s.inbox.join("stuck.png.json");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"x").unwrap();
    solid(&s.inbox.join("stuck.png"), RED, 10, 10);
    d.wait_for_log("cannot write sidecar", WAIT);
    // Meanwhile it neither spins nor stops labelling other images.
    let cpu0 = cpu_ticks(d.pid());
    solid(&s.inbox.join("other.png"), GREEN, 10, 10);
    wait_for_sidecar(&s.inbox.join("other.png"), WAIT);
    std::thread::sleep(Duration::from_secs(2)); // a window in which labeld must not spin
    let busy = cpu_ticks(d.pid()) - cpu0;
    assert!(busy < 100, "labeld used {busy} ticks of CPU in ~2 s while a write kept failing");
    std::fs::remove_dir_all(&blocker).unwrap();
    let v = wait_for_sidecar(&s.inbox.join("stuck.png"), WAIT);
    assert_eq!(top1(&v).0, 0);
    assert!(d.stop().success());
    let rows = s.rows();
    assert_eq!(rows.len(), 2, "{rows:?}");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn the_results_log_follows_logrotate_rename_and_copytruncate() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("1.png"), RED, 10, 10);
    wait_for_sidecar(&s.inbox.join("1.png"), WAIT);
    // logrotate `create` + postrotate `kill -HUP`.
    std::fs::rename(&s.csv, s.dir.path().join("results.csv.1")).unwrap();
    d.signal(1);
    d.wait_for_log("results log reopened", WAIT);
    solid(&s.inbox.join("2.png"), GREEN, 10, 10);
    wait_for_sidecar(&s.inbox.join("2.png"), WAIT);
    // `copytruncate`.
    std::fs::copy(&s.csv, s.dir.path().join("results.csv.2")).unwrap();
    std::fs::OpenOptions::new().write(true).open(&s.csv).unwrap().set_len(0).unwrap();
    solid(&s.inbox.join("3.png"), BLUE, 10, 10);
    wait_for_sidecar(&s.inbox.join("3.png"), WAIT);
    assert!(d.stop().success());
    let (_, old) = read_csv(&s.dir.path().join("results.csv.1"));
    let (_, mid) = read_csv(&s.dir.path().join("results.csv.2"));
    let (_, now) = read_csv(&s.csv);
    assert!(old.len() == 1 && old[0][1].ends_with("1.png"), "{old:?}");
    assert!(mid.len() == 1 && mid[0][1].ends_with("2.png"), "{mid:?}");
    assert!(now.len() == 1 && now[0][1].ends_with("3.png"), "{now:?}");
}
