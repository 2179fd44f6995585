//! Decompression bombs by aspect ratio: PNGs of a few kilobytes whose pixel count is far under
//! `[limits] max_pixels`, but whose resize target ("shorter side → 256") is gigabytes. The real daemon
//! runs inside a 1 GiB memory cgroup (as the unit's MemoryMax= would hold it): it must refuse each
//! bomb with an error record naming the limit, label the ordinary photo after them, stay alive and
//! say so in /healthz and /readyz.

use std::path::{Path, PathBuf};

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);
const CGROUP_LIMIT: u64 = 1 << 30;

/// A v1 memory cgroup limited to `CGROUP_LIMIT`; removed on drop.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    /// `None` (with the reason printed) where memory cgroups cannot be made here.
    fn create() -> Option<MemoryCgroup> {
        let root = Path::new("/sys/fs/cgroup/memory");
        if !root.join("memory.limit_in_bytes").exists() {
            eprintln!("SKIPPING the memory cgroup: no cgroup v1 memory controller at {}", root.display());
            return None;
        }
        let dir = root.join(format!("labeld-hostile-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("SKIPPING the memory cgroup: cannot create {} (needs root): {e}", dir.display());
            return None;
        }
        let cg = MemoryCgroup(dir);
        std::fs::write(cg.0.join("memory.limit_in_bytes"), CGROUP_LIMIT.to_string()).expect("set memory.limit_in_bytes");
        Some(cg)
    }

    fn join(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move labeld into the memory cgroup");
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }

    /// How many processes the kernel OOM-killed in this cgroup.
    fn oom_kills(&self) -> u64 {
        let text = self.read("memory.oom_control");
        let line = text.lines().find(|l| l.starts_with("oom_kill ")).unwrap_or("oom_kill 0");
        line["oom_kill ".len()..].trim().parse().unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Processes leave a cgroup when they exit; rmdir fails while one is still in it.
        let _ = within(Duration::from_secs(5), || std::fs::remove_dir(&self.0).is_ok());
    }
}

/// A solid grey PNG of `w`x`h` pixels: a few kilobytes however long it is.
fn bomb(path: &Path, w: u32, h: u32) -> u64 {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let pixels = vec![128u8; w as usize * h as usize];
    let file = std::fs::File::create(path).unwrap();
    PngEncoder::new_with_quality(std::io::BufWriter::new(file), CompressionType::Best, FilterType::NoFilter)
        .write_image(&pixels, w, h, image::ExtendedColorType::L8)
        .expect("write bomb PNG");
    std::fs::metadata(path).unwrap().len()
}

fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into();
    let mut r = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn aspect_ratio_bombs_get_error_records_and_the_photo_after_them_is_labelled() {
    let s = Setup::new("channel_mean", "").with_workers("count = 1\nmax_batch = 4\n\n[http]\nlisten = \"127.0.0.1:0\"\n");
    let cgroup = MemoryCgroup::create();
    let mut d = s.spawn_daemon_then(&[], |pid| {
        if let Some(cg) = &cgroup {
            cg.join(pid);
        }
    });
    let base = format!("http://{}", d.http_addr());

    // Written outside the inbox, then moved in: the daemon sees each whole.
    let staging = s.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let bombs: Vec<(&str, u32, u32)> = vec![
        ("tall-3x60000.png", 3, 60_000),
        ("wide-1000000x1.png", 1_000_000, 1),
        ("tall-1x16777216.png", 1, 16_777_216),
    ];
    for (name, w, h) in &bombs {
        let bytes = bomb(&staging.join(name), *w, *h);
        eprintln!("{name}: {bytes} bytes");
        assert!(bytes < 200_000, "{name} is {bytes} bytes: not a small bomb");
        std::fs::rename(staging.join(name), s.inbox.join(name)).unwrap();
    }
    // A JPEG near libjpeg-turbo's longest side takes the scaled-decode path.
    image::RgbImage::from_pixel(8, 65_000, image::Rgb([90, 90, 90])).save(staging.join("tall-8x65000.jpg")).unwrap();
    std::fs::rename(staging.join("tall-8x65000.jpg"), s.inbox.join("tall-8x65000.jpg")).unwrap();
    let names: Vec<&str> = bombs.iter().map(|b| b.0).chain(["tall-8x65000.jpg"]).collect();
    for name in &names {
        let side = wait_for_sidecar(&s.inbox.join(name), WAIT);
        assert_eq!(side["status"], "error", "{name}: {side}");
        let e = side["error"].as_str().unwrap();
        assert!(e.contains("[limits] max_pixels") && e.contains("aspect ratio"), "{name}: {e}");
    }
    let photo = s.inbox.join("coffee.jpg");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/coffee.jpg"), &photo).unwrap();
    let side = wait_for_sidecar(&photo, WAIT);
    assert_eq!(side["status"], "ok", "{side}");

    assert_eq!(d.exited(), None, "labeld died:\n{}", d.log_text());
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    if let Some(cg) = &cgroup {
        let peak: u64 = cg.read("memory.max_usage_in_bytes").trim().parse().unwrap_or(0);
        eprintln!("memory cgroup: peak {} MiB of {} MiB, failcnt {}", peak >> 20, CGROUP_LIMIT >> 20, cg.read("memory.failcnt").trim());
        assert_eq!(cg.oom_kills(), 0, "the kernel OOM-killed a process in the cgroup");
    }

    // Exactly one row per image, the bombs' naming the limit.
    let log = d.log.clone();
    let status = d.stop();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "exit {status:?}:\n{log}");
    let rows = s.rows();
    assert_eq!(rows.len(), names.len() + 1, "{rows:?}");
    for name in names.iter().chain([&"coffee.jpg"]) {
        let mine: Vec<_> = rows.iter().filter(|r| r[1].ends_with(name)).collect();
        assert_eq!(mine.len(), 1, "{name}: {rows:?}");
        let expect = if *name == "coffee.jpg" { "ok" } else { "error" };
        assert_eq!(&mine[0][2], expect, "{name}: {:?}", mine[0]);
    }
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn run_once_refuses_a_bomb_and_exits_zero_with_every_image_recorded() {
    let s = Setup::new("channel_mean", "");
    bomb(&s.inbox.join("bomb.png"), 3, 60_000);
    solid(&s.inbox.join("red.png"), RED, 64, 48);
    let out = s.run_once();
    assert!(out.status.success(), "exit {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_sidecar(&s.inbox.join("bomb.png"))["status"], "error");
    assert_eq!(read_sidecar(&s.inbox.join("red.png"))["status"], "ok");
    assert_eq!(s.rows().len(), 2);
}
