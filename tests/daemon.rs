//! The real `labeld` binary against real folders, real inotify and real libtorch.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn once_labels_the_backlog_and_exits_zero() {
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("red.png"), RED, 64, 48);
    solid(&s.inbox.join("green.jpg"), GREEN, 300, 200);
    std::fs::create_dir(s.inbox.join("line2")).unwrap();
    solid(&s.inbox.join("line2/BLUE.JPG"), BLUE, 200, 300);
    // Not images labeld should touch.
    std::fs::write(s.inbox.join("notes.txt"), "hello").unwrap();
    solid(&s.inbox.join(".hidden.png"), RED, 8, 8);

    let out = s.run_once();
    assert!(out.status.success(), "exit {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));

    let expect = [("red.png", 0, "tench"), ("green.jpg", 1, "goldfish"), ("line2/BLUE.JPG", 2, "great white shark")];
    for (name, class, label) in expect {
        let side = read_sidecar(&s.inbox.join(name));
        assert_eq!(side["status"], "ok", "{name}: {side}");
        assert_eq!(top1(&side), (class, label.to_string()), "{name}");
        assert_eq!(side["model"], "channel_mean");
        assert_eq!(side["path"], s.inbox.join(name).to_str().unwrap());
        let top = side["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let scores: Vec<f64> = top.iter().map(|t| t["score"].as_f64().unwrap()).collect();
        assert!(scores.iter().all(|p| (0.0..=1.0).contains(p)) && scores[0] > 0.99, "{scores:?}");
        assert!(scores.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(top.iter().map(|t| t["rank"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(side["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(side["time"].as_str().unwrap().ends_with('Z'));
        assert!(side.get("error").is_none());
    }
    assert!(!s.inbox.join("notes.txt.json").exists());
    assert!(!s.inbox.join(".hidden.png.json").exists());

    let (header, rows) = read_csv(&s.csv);
    assert_eq!(
        header.iter().collect::<Vec<_>>().join(","),
        "time,path,status,class1,label1,score1,class2,label2,score2,class3,label3,score3,latency_ms,error,model,file_id"
    );
    assert_eq!(rows.len(), 3);
    let red = rows.iter().find(|r| r[1].ends_with("/red.png")).expect("row for red.png");
    assert_eq!((&red[2], &red[3], &red[4]), ("ok", "0", "tench"));
    assert_eq!(&red[14], "channel_mean");
    // Row and sidecar name the version of the file they describe.
    let meta = std::fs::metadata(s.inbox.join("red.png")).unwrap();
    let side = read_sidecar(&s.inbox.join("red.png"));
    assert_eq!(side["file"]["inode"].as_u64(), Some(std::os::unix::fs::MetadataExt::ino(&meta)));
    assert_eq!(side["file"]["size"].as_u64(), Some(meta.len()));
    let f = &side["file"];
    let key = ["dev", "inode", "size", "mtime_ns", "ctime_ns"].map(|k| f[k].to_string()).join(":");
    assert_eq!(red[15], key);

    // A second run finds nothing new: no double labelling.
    let out = s.run_once();
    assert!(out.status.success());
    assert_eq!(s.rows().len(), 3);

    // An image replaced in place (newer than its sidecar) is labelled again.
    solid(&s.inbox.join("red.png"), BLUE, 64, 48);
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options().write(true).open(s.inbox.join("red.png")).unwrap().set_modified(later).unwrap();
    assert!(s.run_once().status.success());
    assert_eq!(top1(&read_sidecar(&s.inbox.join("red.png"))).0, 2);
    assert_eq!(s.rows().len(), 4);
}

#[test]
fn daemon_labels_backlog_then_new_files_then_stops_cleanly_on_sigterm() {
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("before.png"), RED, 100, 100);
    let d = s.spawn_daemon();
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("before.png"), WAIT)).0, 0);

    // Written in place (close-after-write).
    solid(&s.inbox.join("dropped.jpg"), GREEN, 640, 480);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("dropped.jpg"), WAIT)).0, 1);

    // Written elsewhere, then renamed in (what uploaders do).
    let outside = s.dir.path().join("upload.tmp");
    solid(&s.dir.path().join("upload.png"), BLUE, 50, 80);
    std::fs::rename(s.dir.path().join("upload.png"), &outside).unwrap();
    std::fs::rename(&outside, s.inbox.join("moved.png")).unwrap();
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("moved.png"), WAIT)).0, 2);

    // A new sub-folder with files already in it when it appears.
    let staging = s.dir.path().join("batch7");
    std::fs::create_dir(&staging).unwrap();
    solid(&staging.join("a.png"), RED, 30, 30);
    solid(&staging.join("b.png"), GREEN, 30, 30);
    std::fs::rename(&staging, s.inbox.join("batch7")).unwrap();
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("batch7/a.png"), WAIT)).0, 0);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("batch7/b.png"), WAIT)).0, 1);

    // A folder created in place, then filled once it is watched.
    std::fs::create_dir(s.inbox.join("cam2")).unwrap();
    d.eventually("a watch on the new folder", WAIT, || d.watches(&s.inbox.join("cam2")));
    solid(&s.inbox.join("cam2/c.png"), BLUE, 30, 30);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("cam2/c.png"), WAIT)).0, 2);

    // A hard link gives no close-write event: it is picked up once it has settled.
    solid(&s.dir.path().join("linked.png"), RED, 20, 20);
    std::fs::hard_link(s.dir.path().join("linked.png"), s.inbox.join("linked.png")).unwrap();
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("linked.png"), WAIT)).0, 0);

    let status = d.stop();
    assert!(status.success(), "exit status {status:?}");
    let rows = s.rows();
    assert_eq!(rows.len(), 7, "one row per image: {rows:?}");
    assert!(rows.iter().all(|r| &r[2] == "ok"));
}

#[test]
fn classify_prints_json_and_writes_nothing() {
    let s = Setup::new("channel_mean", "");
    let dir = s.dir.path().join("shots");
    std::fs::create_dir(&dir).unwrap();
    solid(&dir.join("a.png"), GREEN, 40, 40);
    solid(&dir.join("b.bmp"), BLUE, 40, 40);
    let single = s.dir.path().join("one.webp");
    solid(&single, RED, 40, 40);
    let before = list_all(s.dir.path());

    let out = s.labeld().args(["classify", "--config"]).arg(&s.config).arg(&single).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 3);
    let by_name = |n: &str| lines.iter().find(|l| l["path"].as_str().unwrap().ends_with(n)).unwrap();
    assert_eq!(top1(by_name("one.webp")).0, 0);
    assert_eq!(top1(by_name("a.png")).0, 1);
    assert_eq!(top1(by_name("b.bmp")).1, "great white shark");
    assert_eq!(by_name("a.png")["status"], "ok");
    assert_eq!(list_all(s.dir.path()), before, "classify must not write files");

    // --model without a config; a missing file is an error record and exit 1.
    let out = s
        .labeld()
        .current_dir(s.dir.path())
        .args(["classify", "--model"])
        .arg(&s.model)
        .arg(&single)
        .arg("missing.png")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(top1(&recs[0]).0, 0);
    assert_eq!(recs[1]["status"], "error");
    assert!(recs[1]["error"].as_str().unwrap().contains("not found"), "{}", recs[1]);
    assert!(recs[1].get("top").is_none());
}

fn list_all(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = walkdir::WalkDir::new(dir).into_iter().map(|e| e.unwrap().into_path()).collect();
    v.sort();
    v
}

/// A PNG whose header claims `w` x `h` pixels and which holds almost no data: a decompression bomb.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn bad_input_gets_an_error_record_and_the_daemon_keeps_going() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let photo = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/coffee.jpg")).unwrap();
    let png = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chelsea.png")).unwrap();
    let mut corrupt = png.clone();
    for b in &mut corrupt[20_000..30_000] {
        *b ^= 0x5A;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.jpg", vec![], "empty file"),
        ("truncated.jpg", photo[..photo.len() / 3].to_vec(), "cannot decode"),
        ("text.jpg", b"this is not an image\n".to_vec(), "not a supported image format"),
        ("corrupt.png", corrupt, "cannot decode"),
        ("bomb.png", png_claiming(30_000, 30_000), "over the limit"),
        ("header-only.jpg", photo[..200].to_vec(), "cannot decode"),
    ];
    for (name, bytes, _) in &cases {
        let mut f = std::fs::File::create(s.inbox.join(name)).unwrap();
        f.write_all(bytes).unwrap();
    }
    for (name, _, want) in &cases {
        let side = wait_for_sidecar(&s.inbox.join(name), WAIT);
        assert_eq!(side["status"], "error", "{name}: {side}");
        let err = side["error"].as_str().unwrap();
        assert!(err.contains(want), "{name}: error {err:?} should mention {want:?}");
        assert!(side.get("top").is_none(), "{name}");
        assert_eq!(side["model"], "channel_mean");
    }
    // Still labelling after all that.
    solid(&s.inbox.join("after.png"), GREEN, 64, 64);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("after.png"), WAIT)).0, 1);
    assert!(d.stop().success());

    let rows = s.rows();
    assert_eq!(rows.len(), cases.len() + 1);
    for (name, _, want) in &cases {
        let row = rows.iter().find(|r| r[1].ends_with(&format!("/{name}"))).unwrap();
        assert_eq!(&row[2], "error", "{name}");
        assert!(row[13].contains(want), "{name}: CSV error column {:?}", &row[13]);
        assert!(row[3].is_empty() && row[4].is_empty());
    }
}

#[test]
fn pixel_limit_is_configurable() {
    let s = Setup::new("channel_mean", "\n[limits]\nmax_pixels = 10000\n");
    solid(&s.inbox.join("small.png"), RED, 100, 100);
    solid(&s.inbox.join("big.jpg"), RED, 101, 100);
    assert!(s.run_once().status.success());
    assert_eq!(read_sidecar(&s.inbox.join("small.png"))["status"], "ok");
    let big = read_sidecar(&s.inbox.join("big.jpg"));
    assert_eq!(big["status"], "error");
    assert!(big["error"].as_str().unwrap().contains("10100 pixels"), "{big}");
}

#[test]
fn sigterm_mid_stream_leaves_whole_sidecars_and_a_parseable_csv() {
    let s = Setup::new("resnet18", "");
    let colours = [RED, GREEN, BLUE, [120, 120, 120]];
    let n = 400;
    for i in 0..n {
        solid(&s.inbox.join(format!("img{i:04}.jpg")), colours[i % 4], 320, 240);
    }
    let d = s.spawn_daemon();
    // Let it get going, then stop it while the backlog is still being worked through.
    d.eventually("24 images labelled", Duration::from_secs(120), || count_sidecars(&s.inbox) >= 24);
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit status {status:?}");

    let done = count_sidecars(&s.inbox);
    assert!(done < n, "the test should stop labeld mid-stream (all {n} were done)");
    let leftovers: Vec<_> = std::fs::read_dir(&s.inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
    for e in std::fs::read_dir(&s.inbox).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).expect("whole sidecar");
            assert_eq!(v["status"], "ok");
        }
    }
    let rows = s.rows();
    assert_eq!(rows.len(), done, "every sidecar has its CSV row and vice versa");

    // Restarting picks up exactly what is left.
    assert!(s.run_once().status.success());
    assert_eq!(count_sidecars(&s.inbox), n);
    let rows = s.rows();
    assert_eq!(rows.len(), n);
    let mut paths: Vec<_> = rows.iter().map(|r| r[1].to_string()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n, "no image labelled twice");
}

fn count_sidecars(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
        .count()
}

#[test]
fn config_errors_exit_2_and_name_the_key() {
    let s = Setup::new("channel_mean", "");
    let bad = s.dir.path().join("bad.toml");
    let cases = [
        ("[model]\npath = \"models/channel_mean.pt\"\n[workers]\nmax_batch = 0\n", "max_batch"),
        ("[model]\npath = \"models/channel_mean.pt\"\ntop_kk = 3\n", "top_kk"),
        ("[model]\npath = \"models/nothere.pt\"\n", "[model] path"),
        ("[model]\npath = \"models/channel_mean.pt\"\n[[inbox]]\npath = \"inbox\"\ninclude = [\"[\"]\n", "include"),
    ];
    for (text, key) in cases {
        std::fs::write(&bad, text).unwrap();
        let out = s.labeld().args(["run", "--once", "--config"]).arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "stderr should name {key:?}: {err}");
    }
    let out = s.labeld().args(["run", "--config", "/nonexistent/labeld.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = s.labeld().args(["run", "--bogus-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_model_that_does_not_fit_the_labels_is_fatal_with_exit_1() {
    let s = Setup::new("channel_mean", "");
    let labels = s.dir.path().join("labels.txt");
    std::fs::write(&labels, "ok\ndefect\n").unwrap();
    s.edit_config("[model]\n", "[model]\nlabels = \"labels.txt\"\n");
    let out = s.run_once();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1000 classes") && err.contains("label list has 2"), "{err}");
}

#[test]
fn help_is_there_for_every_command() {
    for args in [vec!["--help"], vec!["run", "--help"], vec!["classify", "--help"], vec!["check-config", "--help"]] {
        let out = std::process::Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{args:?}");
    }
}

/// LABELD_LOG_FORMAT=json (the container image sets it): every stderr line is one JSON object.
#[test]
fn json_logs_are_one_object_per_line_with_time_level_message_and_fields() {
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("red.png"), RED, 64, 64);
    std::fs::write(s.inbox.join("notes.jpg"), b"hello").unwrap();
    let out = s.labeld().env("LABELD_LOG_FORMAT", "json").args(["run", "--once", "--config"]).arg(&s.config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{lines:?}");
    for l in &lines {
        assert!(l["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
        assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l["level"].as_str().unwrap_or_default()), "{l}");
        assert!(l["message"].is_string(), "{l}");
    }
    let failed = lines.iter().find(|l| l["level"] == "WARN" && l["message"] == "image not labelled").expect("the failed image's line");
    assert!(failed["path"].as_str().is_some_and(|p| p.ends_with("notes.jpg")), "{failed}");
    assert_eq!(failed["error"], "not a supported image format", "{failed}");

    let bad = s.labeld().env("LABELD_LOG_FORMAT", "xml").arg("--version").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("LABELD_LOG_FORMAT: must be text or json"), "{}", String::from_utf8_lossy(&bad.stderr));
}
