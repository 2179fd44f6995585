//! `[[route]]` against the real binary: real photos through the real EfficientNet-Lite0 sorted into
//! label folders, hostile label names, SIGKILL while 500 images are routed, a route folder on another
//! file system, and check-config refusing a route folder inside an inbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::devtools;
use crate::common::*;

const WAIT: Duration = Duration::from_secs(120);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A setup running the exported Lite0 (`models/default.pt`), as tests/accuracy.rs does.
fn lite0(extra: &str) -> Setup {
    let s = Setup::new("channel_mean", extra);
    let model = root().join("models/default.pt");
    assert!(model.exists(), "{} is missing: run `make model`", model.display());
    s.edit_config("path = \"models/channel_mean.pt\"", &format!("path = {}", toml_str(&model)));
    s
}

fn toml_str(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// Every regular file below `dir` (none if it does not exist), sidecars and ledgers included.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir).into_iter().map(|e| e.unwrap()).filter(|e| e.file_type().is_file()).map(|e| e.into_path()).collect();
    v.sort();
    v
}

fn images_in(dir: &Path) -> Vec<PathBuf> {
    files_in(dir).into_iter().filter(|p| !p.to_string_lossy().ends_with(".json") && !p.file_name().unwrap().to_string_lossy().starts_with('.')).collect()
}

fn today_utc() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].to_string()
}

#[test]
fn real_photos_go_to_their_label_folders_with_their_sidecars_and_the_row_says_where() {
    let routes = "\n[[route]]\nname = \"unsure\"\nmax_margin = 0.05\naction = \"move\"\nto = \"review\"\n\
        \n[[route]]\nlabels = [\"espresso\", \"cup\"]\nmin_score = 0.5\naction = \"move\"\nto = \"sorted/{label}/{date}\"\n\
        \n[[route]]\nclass_ids = [657]\naction = \"copy\"\nto = \"sorted/{label}\"\n";
    let s = lite0(routes);
    let (sorted, review) = (s.dir.path().join("sorted"), s.dir.path().join("review"));
    let d = s.spawn_daemon();
    let date = today_utc();
    std::fs::copy(root().join("tests/data/coffee.jpg"), s.inbox.join("coffee.jpg")).unwrap();
    std::fs::copy(root().join("tests/data/rocket.jpg"), s.inbox.join("rocket.jpg")).unwrap();
    std::fs::copy(root().join("tests/data/chelsea.png"), s.inbox.join("cat.png")).unwrap();

    // Coffee is espresso at 0.95: moved with its sidecar into espresso/<date>/.
    let espresso = sorted.join("espresso").join(&date).join("coffee.jpg");
    let side = wait_for_sidecar(&espresso, WAIT);
    assert_eq!(top1(&side), (967, "espresso".into()));
    assert_eq!(side["path"], s.inbox.join("coffee.jpg").display().to_string(), "the sidecar keeps where the image was found");
    assert_eq!(side["route"]["action"], "move");
    assert_eq!(side["route"]["to"], sorted.join("espresso").join(&date).display().to_string());
    assert_eq!(std::fs::read(&espresso).unwrap(), std::fs::read(root().join("tests/data/coffee.jpg")).unwrap());
    // The rocket is a missile at 0.36 (not sure enough for espresso's min_score, sure enough for no
    // review): copied, with a copy of its sidecar; the inbox keeps both, its sidecar noting the copy.
    let missile = sorted.join("missile/rocket.jpg");
    let copy_side = wait_for_sidecar(&missile, WAIT);
    assert_eq!(top1(&copy_side), (657, "missile".into()));
    let noted = d.eventually("the inbox sidecar notes where the copy went", WAIT, || {
        let v = read_sidecar(&s.inbox.join("rocket.jpg"));
        v["route"]["at"].as_str().map(String::from)
    });
    assert_eq!(noted, missile.display().to_string());
    // The cat is tiger cat 0.379 vs Egyptian cat 0.375: unsure, to review.
    let cat = review.join("cat.png");
    let cat_side = wait_for_sidecar(&cat, WAIT);
    assert_eq!(cat_side["route"]["to"], review.display().to_string());
    assert!(!s.inbox.join("cat.png").exists() && !sidecar(&s.inbox.join("cat.png")).exists());
    assert!(!s.inbox.join("coffee.jpg").exists() && !sidecar(&s.inbox.join("coffee.jpg")).exists());
    assert!(d.stop().success());

    // The rows say where each image went, in the last column.
    let (header, rows) = read_csv(&s.csv);
    assert_eq!(header.iter().last(), Some("route"), "{header:?}");
    let route_of = |name: &str| rows.iter().find(|r| r[1].ends_with(name)).map(|r| r[r.len() - 1].to_string()).unwrap();
    assert_eq!(route_of("coffee.jpg"), format!("move:{}", sorted.join("espresso").join(&date).display()));
    assert_eq!(route_of("rocket.jpg"), format!("copy:{}", sorted.join("missile").display()));
    assert_eq!(route_of("cat.png"), format!("move:{}", review.display()));
    assert_eq!(rows.len(), 3);

    // A restart copies nothing again, even once retention (here: the operator) removed the copy.
    std::fs::remove_file(&missile).unwrap();
    std::fs::remove_file(sidecar(&missile)).unwrap();
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(images_in(&sorted.join("missile")).is_empty(), "copied again: {:?}", files_in(&sorted));
    assert_eq!(s.rows().len(), 3, "nothing labelled twice");
}

#[test]
fn hostile_label_names_become_safe_folders_inside_the_route_folder() {
    // Red, green and blue images come out as classes 0, 1 and 4 of a label file that names them
    // with a path escape and control characters, a name that differs from another only in case, and
    // a name over 255 bytes.
    let long = "é".repeat(150);
    let mut labels: Vec<String> = vec!["../..\u{1b}/escape".into(), "Crack".into(), "x".into(), "crack".into(), long.clone()];
    labels.extend((5..1000).map(|i| format!("c{i}")));
    let s = Setup::new("channel_mean", "\n[[route]]\naction = \"move\"\nto = \"sorted/{label}\"\n");
    channel_mean_model_to(&s.model, [0, 1, 4]);
    std::fs::write(s.dir.path().join("labels.txt"), labels.join("\n") + "\n").unwrap();
    s.edit_config("[model]\n", "[model]\nlabels = \"labels.txt\"\n");
    for (name, rgb) in [("red.png", RED), ("green.png", GREEN), ("blue.png", BLUE)] {
        solid(&s.inbox.join(name), rgb, 40, 30);
    }
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sorted = s.dir.path().join("sorted");
    let folders: Vec<String> = std::fs::read_dir(&sorted)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_str().unwrap().to_string())
        .collect();
    assert_eq!(folders.len(), 3, "one folder per label: {folders:?}");
    for f in &folders {
        assert!(!f.starts_with('.') && f.len() <= 255 && !f.chars().any(char::is_control), "{f:?}");
    }
    assert!(folders.iter().any(|f| f.starts_with("Crack~")), "a name that differs from another only in case gets a hash: {folders:?}");
    assert!(folders.iter().any(|f| f.starts_with("é") && f.len() < 255), "the long name is cut: {folders:?}");
    // Each image is in its folder with its sidecar, and nothing is anywhere else.
    let images = images_in(&sorted);
    assert_eq!(images.len(), 3, "{images:?}");
    for img in &images {
        assert!(img.parent().unwrap().parent().unwrap() == sorted, "one level below the route folder: {}", img.display());
        assert!(sidecar(img).exists(), "{}", img.display());
    }
    let everything = files_in(s.dir.path());
    assert!(everything.iter().all(|p| !p.to_string_lossy().contains("escape") || p.starts_with(&sorted)), "{everything:?}");
    assert!(images_in(&s.inbox).is_empty());
}

/// Tiny xorshift for the kill moments (printed seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_while_500_images_are_routed_leaves_each_exactly_once_in_one_place_with_its_sidecar() {
    let n = 500;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("routing crash test: {n} images, seed {seed}");
    let mut rng = Rng(seed);
    let routes = "\n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"sorted/{label}\"\n\
        \n[[route]]\nclass_ids = [1]\naction = \"move\"\nto = \"sorted/{class_id}\"\n\
        \n[[route]]\naction = \"move\"\nto = \"other\"\n";
    let s = Setup::new("channel_mean", routes);
    let colours = [RED, GREEN, BLUE];
    for i in 0..n {
        let sub = s.inbox.join(format!("cam{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        solid(&sub.join(format!("{i:05}.png")), colours[i % 3], 48, 32);
    }
    let (sorted, other) = (s.dir.path().join("sorted"), s.dir.path().join("other"));
    let routed = || images_in(&sorted).len() + images_in(&other).len();
    for k in 0..5 {
        let d = s.spawn_daemon();
        let before = routed();
        let target = (before + 5 + (rng.next() % 120) as usize).min(n);
        let _ = within(WAIT, || routed() >= target);
        std::thread::sleep(Duration::from_micros(100 + rng.next() % 2000)); // a random moment to kill at
        d.signal(9);
        drop(d);
        eprintln!("kill {}: {} of {n} routed", k + 1, routed());
    }
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let want = |i: usize| match i % 3 {
        0 => sorted.join("tench"),
        1 => sorted.join("1"),
        _ => other.clone(),
    };
    let mut places = HashMap::<String, Vec<PathBuf>>::new();
    for img in images_in(&sorted).into_iter().chain(images_in(&other)).chain(images_in(&s.inbox)) {
        places.entry(img.file_name().unwrap().to_string_lossy().into_owned()).or_default().push(img);
    }
    assert_eq!(places.len(), n, "every image somewhere, under its own name (no ~1 copies)");
    for i in 0..n {
        let name = format!("{i:05}.png");
        let at = &places[&name];
        assert_eq!(at.len(), 1, "{name} is in exactly one place: {at:?}");
        assert_eq!(at[0], want(i).join(&name), "{name} in its route's folder");
        let v = read_sidecar(&at[0]);
        assert_eq!(v["status"], "ok");
        assert_eq!(top1(&v).0, (i % 3) as u64);
        assert_eq!(v["path"], s.inbox.join(format!("cam{}/{name}", i % 4)).display().to_string());
    }
    let sidecars: Vec<PathBuf> = files_in(s.dir.path()).into_iter().filter(|p| p.to_string_lossy().ends_with(".png.json")).collect();
    assert_eq!(sidecars.len(), n, "one sidecar per image, none left behind");
    let rows = s.rows();
    let mut per_image = HashMap::<String, usize>::new();
    for r in &rows {
        *per_image.entry(r[1].to_string()).or_default() += 1;
    }
    assert_eq!(per_image.len(), n);
    assert!(per_image.values().all(|&c| c == 1), "one row per image: {} rows", rows.len());
}

#[test]
fn a_route_folder_on_another_file_system_gets_copies_fsynced_and_recorded() {
    let s = Setup::new("channel_mean", "\n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"disk/{label}\"\n\n[[route]]\naction = \"link\"\nto = \"disk/linked\"\n");
    let disk = s.dir.path().join("disk");
    let Some(_mount) = Tmpfs::mount(&disk, "16m") else { return };
    solid(&s.inbox.join("red.png"), RED, 40, 30);
    solid(&s.inbox.join("green.png"), GREEN, 40, 30);
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Moved across file systems: copied, then taken out of the inbox.
    let red = disk.join("tench/red.png");
    assert_eq!(read_sidecar(&red)["route"]["action"], "move");
    assert!(!s.inbox.join("red.png").exists() && !sidecar(&s.inbox.join("red.png")).exists());
    // A link across file systems is a copy; the inbox keeps the image.
    let green = disk.join("linked/green.png");
    assert_eq!(read_sidecar(&green)["route"]["action"], "link");
    assert!(s.inbox.join("green.png").exists());
    assert_eq!(std::fs::read(&green).unwrap(), std::fs::read(s.inbox.join("green.png")).unwrap());
    // Every file placed is in the route folder's ledger (so retention may remove it), no temp file left.
    let ledger = std::fs::read_to_string(disk.join(".labeld-archive")).unwrap();
    for rel in ["tench/red.png", "tench/red.png.json", "linked/green.png", "linked/green.png.json"] {
        assert!(ledger.lines().any(|l| l.ends_with(&format!(" {rel}"))), "{rel} not recorded:\n{ledger}");
    }
    let temps: Vec<_> = files_in(&disk).into_iter().filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(".tmp")).collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn a_link_route_on_the_same_file_system_is_a_hard_link_and_the_image_is_not_labelled_again() {
    let s = Setup::new("channel_mean", "\n[[route]]\naction = \"link\"\nto = \"linked/{label}\"\n");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("blue.png"), BLUE, 40, 30);
    let linked = s.dir.path().join("linked/great white shark/blue.png");
    wait_for_sidecar(&linked, WAIT);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&linked).unwrap().ino(), std::fs::metadata(s.inbox.join("blue.png")).unwrap().ino());
    d.eventually("the inbox sidecar notes the link", WAIT, || read_sidecar(&s.inbox.join("blue.png"))["route"]["at"].is_string());
    assert!(d.stop().success());
    // The link changed the image's ctime; a restart still knows it is labelled.
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.rows().len(), 1);
    assert_eq!(images_in(&s.dir.path().join("linked")).len(), 1);
}

#[test]
fn check_config_refuses_a_route_folder_inside_a_recursive_inbox_naming_both() {
    let s = Setup::new("channel_mean", "\n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"inbox/sorted/{label}\"\n");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[[route]] #1 to"), "{err}");
    assert!(err.contains(&s.inbox.join("sorted").display().to_string()) && err.contains(&format!("({})", s.inbox.display())), "names both paths: {err}");
    // The same through a link to the inbox.
    std::os::unix::fs::symlink(&s.inbox, s.dir.path().join("via")).unwrap();
    s.edit_config("to = \"inbox/sorted/{label}\"", "to = \"via/sorted/{label}\"");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the inbox"));
}

#[test]
fn drift_metrics_name_only_the_routes_labels_and_other_whatever_the_class_count() {
    // A 1000-class model; routes name two labels (one by class id) and a route for unsure images.
    let routes = "[http]\nlisten = \"127.0.0.1:0\"\n\
        \n[[route]]\nmax_score = 0.5\naction = \"move\"\nto = \"sorted/review\"\n\
        \n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"sorted/{label}\"\n\
        \n[[route]]\nclass_ids = [1]\naction = \"keep\"\n";
    let s = Setup::new("channel_mean", routes);
    let d = s.spawn_daemon();
    for (i, rgb) in [RED, RED, RED, GREEN, BLUE, BLUE].into_iter().enumerate() {
        solid(&s.inbox.join(format!("{i}.png")), rgb, 40, 30);
    }
    let metrics = || {
        let url = format!("http://{}/metrics", d.http_addr());
        ureq::get(&url).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok()).unwrap_or_default()
    };
    let text = d.eventually("six images counted", WAIT, || {
        let m = metrics();
        m.contains("labeld_label_images_total{label=\"other\"} 2").then_some(m)
    });
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("labeld_label_images_total{")).collect();
    assert_eq!(series.len(), 3, "tench, goldfish (class 1) and other, not one per class: {series:?}");
    assert!(text.contains("labeld_label_images_total{label=\"tench\"} 3"), "{text}");
    assert!(text.contains("labeld_label_images_total{label=\"goldfish\"} 1"), "{text}");
    assert!(text.contains("labeld_top1_score_count{label=\"tench\"} 3"), "{text}");
    assert!(text.contains("labeld_unsure_share 0"), "every image is sure: {text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("labeld_top1_score_count{")).count(), 3);
    assert!(d.stop().success());
}

#[test]
fn the_status_page_draws_labels_per_hour_from_the_results_log_across_restarts() {
    let routes = "[http]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"sorted/{label}\"\n";
    let s = Setup::new("channel_mean", routes);
    // A results log from the last 30 hours, as an earlier run wrote it: one row an hour.
    let header = "time,path,status,class1,label1,score1,class2,label2,score2,class3,label3,score3,latency_ms,error,model,file_id,route";
    let now = std::time::SystemTime::now();
    let mut log = format!("{header}\n");
    for h in 1..=30u64 {
        let t = humantime::format_rfc3339_millis(now - Duration::from_secs(h * 3600));
        let (class, label, score) = if h % 2 == 0 { (0, "tench", 0.9) } else { (1, "goldfish", 0.6) };
        log += &format!("{t},/gone/{h}.png,ok,{class},{label},{score},5,c5,0.01,6,c6,0.01,1.0,,channel_mean,,\n");
    }
    std::fs::write(&s.csv, &log).unwrap();
    let d = s.spawn_daemon();
    solid(&s.inbox.join("red.png"), RED, 40, 30);
    wait_for_sidecar(&s.dir.path().join("sorted/tench/red.png"), WAIT);
    let base = format!("http://{}", d.http_addr());
    let mut c = devtools::Chromium::start(&s.dir.path().join("chromium-profile"), WAIT);
    c.open(&format!("{base}/"));
    let bars = c.wait_for("(n => n >= 31 ? n : null)(document.querySelectorAll('#drift svg rect.bar').length)");
    assert_eq!(bars, 31, "one bar per hour of the log and one for the image now");
    let legend = c.eval("[...document.querySelectorAll('#drift svg > text')].map(t => t.textContent).join('|')");
    let legend = legend.as_str().unwrap();
    assert!(legend.contains("|tench") && legend.contains("|other"), "the routes' label and other: {legend}");
    let points = c.eval("document.querySelector('#drift svg polyline.mean').getAttribute('points').split(' ').length");
    assert_eq!(points, 31, "a mean top-1 point per hour with images");
    let png = c.screenshot(900);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("drift-chart.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    drop(c);
    assert!(d.stop().success());
    // After a restart the chart is read back from the log: the same bars.
    let d = s.spawn_daemon();
    let url = format!("http://{}/api/status", d.http_addr());
    let status: serde_json::Value = serde_json::from_str(&ureq::get(&url).call().unwrap().body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(status["drift_svg"].as_str().unwrap().matches("class=\"bar\"").count(), 31);
    assert!(d.stop().success());
}

#[test]
fn a_review_folder_keeps_its_cap_under_a_stream_oldest_leaving_first() {
    let routes = "\n[[route]]\nname = \"unsure\"\nreview = true\nmax_files = 5\naction = \"move\"\nto = \"review\"\n";
    let s = Setup::new("channel_mean", routes);
    let review = s.dir.path().join("review");
    std::fs::create_dir_all(&review).unwrap();
    std::fs::write(review.join("operator-notes.png"), b"not labeld's").unwrap();
    let d = s.spawn_daemon();
    let mut most = 0;
    for i in 0..20 {
        solid(&s.inbox.join(format!("{i:02}.png")), [RED, GREEN, BLUE][i % 3], 40, 30);
        wait_for_sidecar(&review.join(format!("{i:02}.png")), WAIT);
        most = most.max(images_in(&review).len() - 1);
    }
    let left = d.eventually("the review folder back at its cap", WAIT, || {
        let names: Vec<String> = images_in(&review).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        (names.len() == 6).then_some(names)
    });
    eprintln!("review cap 5 under a stream of 20: at most {most} images seen at once");
    assert_eq!(left, ["15.png", "16.png", "17.png", "18.png", "19.png", "operator-notes.png"], "the newest five stay, and the operator's file");
    for name in &left[..5] {
        assert!(sidecar(&review.join(name)).exists(), "{name} keeps its sidecar");
    }
    let sidecars = files_in(&review).into_iter().filter(|p| p.to_string_lossy().ends_with(".json")).count();
    assert_eq!(sidecars, 5, "the sidecars of the images that left went with them");
    d.wait_for_log("route folder over its cap", WAIT);
    assert!(d.stop().success());
    assert_eq!(s.rows().len(), 20);
}

#[test]
fn a_review_route_needs_a_folder_of_its_own() {
    let s = Setup::new("channel_mean", "\n[[route]]\nreview = true\naction = \"move\"\nto = \"sorted/review\"\n\n[[route]]\naction = \"move\"\nto = \"sorted/{label}\"\n");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[[route]] #1 review") && err.contains("a folder of its own"), "{err}");
}

#[test]
fn an_operator_confirms_and_corrects_labels_on_the_status_page_into_corrections_csv() {
    let routes = "[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0k-en\"\n\n[[route]]\nname = \"unsure\"\nreview = true\nmax_files = 50\naction = \"move\"\nto = \"review\"\n";
    let s = Setup::new("channel_mean", routes);
    let review = s.dir.path().join("review");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("red.png"), RED, 40, 30);
    solid(&s.inbox.join("green.png"), GREEN, 40, 30);
    let red = wait_for_sidecar(&review.join("red.png"), WAIT);
    wait_for_sidecar(&review.join("green.png"), WAIT);
    let base = format!("http://{}", d.http_addr());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into();
    assert_eq!(agent.get(format!("{base}/api/review")).call().unwrap().status().as_u16(), 401, "behind the token");
    assert_eq!(agent.get(format!("{base}/review/0/red.png")).call().unwrap().status().as_u16(), 401);

    let mut c = devtools::Chromium::start(&s.dir.path().join("chromium-profile"), WAIT);
    c.open(&format!("{base}/?token=t0k-en"));
    c.wait_for("(n => n == 2 ? n : null)(document.querySelectorAll('#review-items li').length)");
    c.wait_for("(i => i && i.complete && i.naturalWidth == 40 ? 1 : null)(document.querySelector(\"#review-items li[data-key='0/red.png'] img\"))");
    let said = c.eval("document.querySelector(\"#review-items li[data-key='0/red.png'] .said\").textContent");
    assert!(said.as_str().unwrap().starts_with("tench "), "{said}");
    // The red one is corrected to goldfish (typed, as from the list), the green one confirmed.
    c.eval("(li => { li.querySelector('input').value = 'goldfish'; li.querySelector('button.correct').click(); })(document.querySelector(\"#review-items li[data-key='0/red.png']\"))");
    c.wait_for("(li => li.dataset.verdict || null)(document.querySelector(\"#review-items li[data-key='0/red.png']\"))");
    c.eval("document.querySelector(\"#review-items li[data-key='0/green.png'] button.confirm\").click()");
    c.wait_for("(li => li.dataset.verdict || null)(document.querySelector(\"#review-items li[data-key='0/green.png']\"))");
    let shown = c.eval("document.querySelector(\"#review-items li[data-key='0/red.png'] .verdict\").textContent");
    assert_eq!(shown, "✓ goldfish (was tench)");
    let png = c.screenshot(900);
    std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join("review-queue.png"), &png).unwrap();

    let corrections = s.dir.path().join("corrections.csv");
    let (header, rows) = read_csv(&corrections);
    assert_eq!(header.iter().collect::<Vec<_>>(), ["time", "path", "file_id", "xxh3", "review_file", "model", "predicted", "corrected"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let red_row = &rows[0];
    assert_eq!(&red_row[1], s.inbox.join("red.png").display().to_string().as_str(), "the image as it was found");
    let id = red["file"].clone();
    assert_eq!(&red_row[2], format!("{}:{}:{}:{}:{}", id["dev"], id["inode"], id["size"], id["mtime_ns"], id["ctime_ns"]).as_str());
    assert_eq!(&red_row[3], format!("{:016x}", id["xxh3"].as_u64().unwrap()).as_str(), "the hash of the bytes labelled");
    assert_eq!(&red_row[4], review.join("red.png").display().to_string().as_str());
    assert_eq!((&red_row[5], &red_row[6], &red_row[7]), ("channel_mean", "tench", "goldfish"));
    assert_eq!((&rows[1][6], &rows[1][7]), ("goldfish", "goldfish"), "a confirmation is a row too");

    // Not one of the model's labels, or no such image: refused, nothing written.
    let post = |path: &str, body: &str| {
        agent.post(format!("{base}{path}?token=t0k-en")).header("Content-Type", "application/json").send(body).unwrap().status().as_u16()
    };
    assert_eq!(post("/review/0/red.png", r#"{"label": "not a label"}"#), 422);
    assert_eq!(post("/review/0/..%2Fresults.csv", r#"{"label": "tench"}"#), 422);
    assert_eq!(post("/review/7/red.png", r#"{"label": "tench"}"#), 422);
    assert_eq!(read_csv(&corrections).1.len(), 2);
    // The verdicts are shown again after a restart (read back from corrections.csv).
    drop(c);
    assert!(d.stop().success());
    let d = s.spawn_daemon();
    let url = format!("http://{}/api/review?token=t0k-en", d.http_addr());
    let list: serde_json::Value = serde_json::from_str(&agent.get(url).call().unwrap().body_mut().read_to_string().unwrap()).unwrap();
    let verdicts: Vec<&str> = list["items"].as_array().unwrap().iter().map(|i| i["verdict"].as_str().unwrap_or("")).collect();
    assert!(verdicts.contains(&"goldfish") && verdicts.len() == 2, "{list}");
    assert!(d.stop().success());
}

#[test]
fn a_reload_adds_a_route_and_the_log_gets_its_route_column_in_a_new_file() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("before.png"), RED, 40, 30);
    wait_for_sidecar(&s.inbox.join("before.png"), WAIT);
    std::fs::write(&s.config, std::fs::read_to_string(&s.config).unwrap() + "\n[[route]]\nlabels = [\"tench\"]\naction = \"move\"\nto = \"sorted/{label}\"\n").unwrap();
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);
    assert!(d.log_text().lines().any(|l| l.contains("config reloaded") && l.contains("[[route]]")), "{}", d.log_text());
    solid(&s.inbox.join("after.png"), RED, 40, 30);
    let side = wait_for_sidecar(&s.dir.path().join("sorted/tench/after.png"), WAIT);
    assert_eq!(side["route"]["action"], "move");
    assert!(s.inbox.join("before.png").exists(), "an image labelled before the route stays where on_done left it");
    assert!(d.stop().success());
    let (header, rows) = read_csv(&s.csv);
    assert_eq!(header.iter().last(), Some("route"));
    assert_eq!(rows.len(), 1, "the new log holds the row written after the reload");
    let older: Vec<_> = std::fs::read_dir(s.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("results.") && n != "results.csv").collect();
    assert_eq!(older.len(), 1, "the log without the column was set aside: {older:?}");
}

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None (with the reason printed) where mounting is not possible (no root, a container without
    /// CAP_SYS_ADMIN).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
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
        let ok = std::process::Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}
