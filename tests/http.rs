//! The HTTP endpoint of a running labeld: /metrics, /healthz, /readyz, POST /predict, the token, and
//! the status page in a real headless Chromium.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::common::devtools::{self, Chromium};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into()
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn post(url: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut r = agent().post(url).header("Content-Type", content_type).send(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let code = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (code, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(48, 32, image::Rgb(rgb)).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn multipart(field: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "labeldtestboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// POSTs a `len`-byte body with `Expect: 100-continue` and returns the response, having sent no body.
fn too_large(addr: &str, len: usize) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        c,
        "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/png\r\nContent-Length: {len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// A metric's value from the Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_health_and_predict_through_the_same_workers() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_mb = 1\n");
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    assert!(d.log_text().contains("HTTP on (loopback, no token)"));

    assert_eq!(get(&format!("{base}/healthz")), (200, "ok\n".into()));
    assert_eq!(get(&format!("{base}/readyz")), (200, "ready\n".into()));

    solid(&s.inbox.join("red.png"), RED, 32, 32);
    std::fs::write(s.inbox.join("bad.jpg"), b"nope").unwrap();
    wait_for_sidecar(&s.inbox.join("red.png"), WAIT);
    wait_for_sidecar(&s.inbox.join("bad.jpg"), WAIT);

    // Raw body.
    let (code, r) = post(&format!("{base}/predict"), "image/png", &png(GREEN));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "ok");
    assert_eq!(r["model"], "channel_mean");
    let top = r["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!((top[0]["class_id"].as_u64(), top[0]["label"].as_str()), (Some(1), Some("goldfish")));
    assert!(r.get("path").is_none());
    // Multipart field "file", as the original service took it.
    let (ct, body) = multipart("file", &png(BLUE));
    let (code, r) = post(&format!("{base}/predict"), &ct, &body);
    assert_eq!((code, r["top"][0]["label"].as_str()), (200, Some("great white shark")), "{r}");
    // Errors are JSON with a 4xx status.
    let (code, r) = post(&format!("{base}/predict"), "image/jpeg", b"this is not an image");
    assert_eq!(code, 422);
    assert_eq!(r["status"], "error");
    assert!(r["error"].as_str().unwrap().contains("not a supported image format"), "{r}");
    let (code, r) = post(&format!("{base}/predict"), "image/png", b"");
    assert_eq!(code, 400, "{r}");
    let (ct, body) = multipart("photo", &png(BLUE));
    let (code, r) = post(&format!("{base}/predict"), &ct, &body);
    assert_eq!(code, 400);
    assert!(r["error"].as_str().unwrap().contains("\"file\""), "{r}");
    // Too large: refused from the headers, before the body is sent (curl sends large files this way).
    let head = too_large(&d.http_addr(), 2 * 1024 * 1024);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("max_body_mb"), "{head}");
    // Uploads write nothing to disk.
    assert_eq!(s.rows().len(), 2);

    let (code, m) = get(&format!("{base}/metrics"));
    assert_eq!(code, 200);
    assert_eq!(metric(&m, "labeld_images_total{status=\"ok\"}"), 3.0, "1 file + 2 uploads");
    assert_eq!(metric(&m, "labeld_images_total{status=\"error\"}"), 2.0, "1 file + 1 upload");
    assert!(metric(&m, "labeld_batches_total") >= 1.0);
    assert_eq!(metric(&m, "labeld_latency_seconds_count"), 5.0);
    assert!(metric(&m, "labeld_batch_size_bucket{le=\"+Inf\"}") >= 1.0);
    assert!(metric(&m, "labeld_stage_seconds_total{stage=\"inference\"}") > 0.0);
    assert_eq!(metric(&m, "labeld_queue_depth"), 0.0);
    assert_eq!(metric(&m, "labeld_in_flight"), 0.0);
    assert_eq!(metric(&m, "labeld_csv_write_errors_total"), 0.0);
    assert_eq!(metric(&m, "labeld_model{name=\"channel_mean\",precision=\"fp32\"}"), 1.0);
    assert!(m.ends_with("# EOF\n"));

    let (code, status) = get(&format!("{base}/api/status"));
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["recent"].as_array().unwrap().len(), 5);
    assert_eq!(status["ok"], 3);
    assert!(d.stop().success());
}

#[test]
fn off_loopback_needs_a_token_and_every_guarded_request_must_carry_it() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"0.0.0.0:0\"\n");
    let out = s.run_once();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[http] token"));

    s.edit_config("listen = \"0.0.0.0:0\"\n", "listen = \"0.0.0.0:0\"\ntoken = \"s3cret+tok/en\"\n");
    let d = s.spawn_daemon();
    assert!(d.log_text().contains("requests need Authorization: Bearer"), "{}", d.log_text());
    let port = d.http_addr().rsplit(':').next().unwrap().to_string();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/healthz")).0, 200, "probes stay open");
    assert_eq!(get(&format!("{base}/metrics")).0, 401);
    assert_eq!(get(&format!("{base}/")).0, 401);
    let (code, r) = post(&format!("{base}/predict"), "image/png", &png(RED));
    assert_eq!(code, 401, "{r}");
    let wrong = agent().get(format!("{base}/metrics")).header("Authorization", "Bearer nope").call().unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let mut ok = agent().get(format!("{base}/metrics")).header("Authorization", "Bearer s3cret+tok/en").call().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(ok.body_mut().read_to_string().unwrap().contains("labeld_images_total"));
    let mut r = agent()
        .post(format!("{base}/predict"))
        .header("Authorization", "Bearer s3cret+tok/en")
        .send(&png(RED)[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.body_mut().read_to_string().unwrap());
    assert_eq!(get(&format!("{base}/?token=s3cret%2Btok%2Fen")).0, 200, "a browser can open the page with ?token=");
    assert_eq!(get(&format!("{base}/?token=s3cret")).0, 401);
}

#[test]
fn the_status_page_shows_a_labelled_image_in_headless_chromium() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n");
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    solid(&s.inbox.join("camera-7.png"), RED, 300, 200);
    wait_for_sidecar(&s.inbox.join("camera-7.png"), WAIT);

    let profile = s.dir.path().join("chromium-profile");
    let t = Instant::now();
    let out = std::process::Command::new("chromium")
        .args(devtools::HEADLESS)
        .args(["--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("{base}/"))
        .output()
        .expect("run chromium (Debian package `chromium`, installed by scripts/setup-system.sh test)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !dom.is_empty(), "chromium failed after {:?}: {}", t.elapsed(), String::from_utf8_lossy(&out.stderr));

    // The script filled the table from /api/status: the image's row with its label and score, and
    // its thumbnail loaded (112 px wide).
    let row_start = dom.find("camera-7.png").unwrap_or_else(|| panic!("no row for the image in\n{dom}"));
    let row = &dom[dom[..row_start].rfind("<tr").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("data-status=\"ok\""), "{row}");
    assert!(row.contains("tench"), "{row}");
    assert!(row.contains('%'), "{row}");
    assert!(row.contains("data-loaded=\"112\""), "thumbnail did not load: {row}");
    assert!(dom.contains("id=\"ok\">1<"), "the labelled count is shown");
    assert!(dom.contains("channel_mean (fp32)"));
}

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The page's panel as a keyboard user drives it: focus is on the chooser, `key` opens it, `file` is
/// picked; returns the status line's state ("done" or "error") once the page has an answer.
fn choose_with_key(c: &mut Chromium, key: &str, file: &Path) -> String {
    assert_eq!(c.eval("document.activeElement.id"), "try-file", "keyboard focus is not on the file chooser");
    c.press(key);
    let chooser = c.event("Page.fileChooserOpened");
    c.call("DOM.setFileInputFiles", json!({ "files": [file], "backendNodeId": chooser["backendNodeId"] }));
    settled(c)
}

fn settled(c: &mut Chromium) -> String {
    let state = c.wait_for("(s => s && s !== 'busy' && s)(document.getElementById('try-status').dataset.state)");
    state.as_str().unwrap().to_string()
}

fn try_status(c: &mut Chromium) -> String {
    c.eval("document.getElementById('try-status').textContent").as_str().unwrap().to_string()
}

#[test]
fn try_an_image_labels_a_chosen_or_dropped_photo_and_explains_refusals_in_headless_chromium() {
    let model = Path::new(ROOT).join("models/default.pt");
    assert!(model.exists(), "{} is missing: run `make model`", model.display());
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_mb = 1\n");
    s.edit_config("path = \"models/channel_mean.pt\"", &format!("path = {:?}", model.display().to_string()));
    for photo in ["coffee.jpg", "rocket.jpg"] {
        std::fs::copy(Path::new(ROOT).join("tests/data").join(photo), s.inbox.join(photo)).unwrap();
    }
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    for photo in ["coffee.jpg", "rocket.jpg"] {
        wait_for_sidecar(&s.inbox.join(photo), WAIT);
    }
    // What labeld answers for the cat when asked directly; the page must show the same.
    let cat = Path::new(ROOT).join("tests/data/chelsea.png");
    let (code, want) = post(&format!("{base}/predict"), "image/png", &std::fs::read(&cat).unwrap());
    assert_eq!(code, 200, "{want}");
    assert!((281..=285).contains(&want["top"][0]["class_id"].as_u64().unwrap()), "the cat is not a cat: {want}");

    let mut c = Chromium::start(&s.dir.path().join("chromium-profile"), WAIT);
    c.open(&format!("{base}/"));
    c.wait_for("(e => e && e.textContent)(document.getElementById('model'))");
    c.call("Page.setInterceptFileChooserDialog", json!({ "enabled": true }));

    // Tab from the top of the page lands on the chooser; Enter opens it.
    c.press("Tab");
    assert_eq!(choose_with_key(&mut c, "Enter", &cat), "done", "{}", try_status(&mut c));
    let shown = c.eval(
        "[...document.querySelectorAll('#try-top li')].map(li => \
           [li.querySelector('.label').textContent, li.querySelector('.pct').textContent, li.querySelector('.bar span').style.width])",
    );
    let shown = shown.as_array().unwrap();
    let top = want["top"].as_array().unwrap();
    assert_eq!(shown.len(), top.len(), "{shown:?}");
    for (row, t) in shown.iter().zip(top) {
        let score = t["score"].as_f64().unwrap() * 100.0;
        assert_eq!(row[0], t["label"], "{shown:?}");
        assert_eq!(row[1], format!("{score:.1} %"), "the bar's value in words");
        assert_eq!(row[2], format!("{score:.1}%"), "the bar's length");
    }
    // The spoken summary names the top label; the photo itself is shown; model and latency too.
    let spoken = try_status(&mut c);
    assert!(spoken.starts_with(&format!("chelsea.png: {}, ", top[0]["label"].as_str().unwrap())), "{spoken}");
    assert_eq!(c.eval("document.getElementById('try-status').getAttribute('aria-live')"), "polite");
    assert_eq!(c.wait_for("document.getElementById('try-image').naturalWidth"), 451, "the chosen photo is displayed");
    let meta = c.eval("document.getElementById('try-meta').textContent");
    let meta = meta.as_str().unwrap();
    assert!(meta.starts_with(&format!("model {} · ", want["model"].as_str().unwrap())) && meta.contains(" ms in labeld"), "{meta}");

    // The screenshot for docs/status-page.png, taken with the cat labelled and the table filled.
    c.wait_for("document.querySelectorAll('#results img[data-loaded]').length >= 3");
    let png = c.screenshot(1000);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "screenshot of {} bytes", png.len());
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());

    // A text file, chosen with Space: refused by labeld (422) and said in words; no labels shown.
    let notes = s.dir.path().join("notes.txt");
    std::fs::write(&notes, "shopping list: milk, bread\n").unwrap();
    assert_eq!(choose_with_key(&mut c, " ", &notes), "error");
    let said = try_status(&mut c);
    assert!(said.starts_with("notes.txt is not an image labeld can read: ") && said.contains("not a supported image format"), "{said}");
    assert_eq!(c.eval("document.getElementById('try-result').hidden"), true);

    // Over [http] max_body_mb: refused before it is sent, with the limit in words.
    let big = s.dir.path().join("big.png");
    std::fs::write(&big, vec![7u8; 1536 * 1024]).unwrap();
    assert_eq!(choose_with_key(&mut c, "Enter", &big), "error");
    let said = try_status(&mut c);
    assert!(said.contains("big.png is too large") && said.contains("up to 1 MB"), "{said}");

    // Dropped onto the zone with the mouse: labelled like a chosen one.
    let zone = c.eval("(r => [r.x + r.width / 2, r.y + r.height / 2])(document.getElementById('drop').getBoundingClientRect())");
    let (x, y) = (zone[0].as_f64().unwrap(), zone[1].as_f64().unwrap());
    let coffee = Path::new(ROOT).join("tests/data/coffee.jpg");
    let data = json!({ "items": [], "files": [coffee], "dragOperationsMask": 1 });
    for kind in ["dragEnter", "dragOver", "drop"] {
        c.call("Input.dispatchDragEvent", json!({ "type": kind, "x": x, "y": y, "data": data }));
    }
    assert_eq!(settled(&mut c), "done", "{}", try_status(&mut c));
    let said = try_status(&mut c);
    assert!(said.starts_with("coffee.jpg: espresso, "), "{said}");

    // Every upload went through the workers: the cat twice (API and page), the coffee once, the text once.
    let (_, m) = get(&format!("{base}/metrics"));
    assert_eq!(metric(&m, "labeld_images_total{status=\"ok\"}"), 5.0, "2 inbox photos + 3 uploads");
    assert_eq!(metric(&m, "labeld_images_total{status=\"error\"}"), 1.0);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn try_an_image_sends_the_token_the_page_was_opened_with() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret+tok/en\"\n");
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    let red = s.dir.path().join("red.png");
    solid(&red, RED, 64, 64);
    let mut c = Chromium::start(&s.dir.path().join("chromium-profile"), WAIT);
    c.open(&format!("{base}/?token=s3cret%2Btok%2Fen"));
    c.wait_for("(e => e && e.textContent)(document.getElementById('model'))");
    c.call("Page.setInterceptFileChooserDialog", json!({ "enabled": true }));
    c.eval("document.getElementById('try-file').focus()");
    assert_eq!(choose_with_key(&mut c, "Enter", &red), "done", "{}", try_status(&mut c));
    assert!(try_status(&mut c).starts_with("red.png: tench, "), "{}", try_status(&mut c));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn readyz_is_503_while_a_reloaded_inbox_cannot_be_watched() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n");
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    let good = std::fs::read_to_string(&s.config).unwrap();

    // Valid config, but the inbox cannot be created (/proc takes no new folders).
    std::fs::write(&s.config, good.replace("path = \"inbox\"", "path = \"/proc/labeld-inbox\"")).unwrap();
    d.signal(1);
    d.wait_for_log("cannot watch the new inboxes", WAIT);
    let (code, body) = get(&format!("{base}/readyz"));
    assert_eq!(code, 503, "{body}");
    assert_eq!(get(&format!("{base}/healthz")).0, 200, "alive, just not ready");

    std::fs::write(&s.config, good).unwrap();
    d.signal(1);
    d.eventually("/readyz 200 again after a good reload", WAIT, || get(&format!("{base}/readyz")).0 == 200);
    solid(&s.inbox.join("back.png"), GREEN, 32, 32);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("back.png"), WAIT)), (1, "goldfish".into()));
    assert!(d.stop().success());
}

/// An RGB PNG of noise (which does not compress) of about `bytes` bytes.
fn noise_png(bytes: usize) -> Vec<u8> {
    let side = ((bytes / 3) as f64).sqrt() as u32;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One reply read off a raw connection: status, headers (lower-case names) and body.
struct Reply {
    code: u16,
    headers: String,
    body: String,
}

/// Reads a response head (up to the blank line) and, unless it is `100 Continue`, the rest to EOF.
fn read_reply(c: &mut std::net::TcpStream) -> std::io::Result<Reply> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {head:?}")));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let code = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut body = String::new();
    if code != 100 {
        c.read_to_string(&mut body)?;
    }
    Ok(Reply { code, headers: head, body })
}

/// `POST /predict` of `image` on a fresh connection; with `expect_continue` the body is sent only
/// after the server's `100 Continue` (as curl does for large files).
fn raw_predict(addr: &str, image: &[u8], expect_continue: bool) -> std::io::Result<Reply> {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(WAIT))?;
    let expect = if expect_continue { "Expect: 100-continue\r\n" } else { "" };
    write!(
        c,
        "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/png\r\nContent-Length: {}\r\n{expect}Connection: close\r\n\r\n",
        image.len()
    )?;
    if expect_continue {
        let first = read_reply(&mut c)?;
        if first.code != 100 {
            return Ok(first);
        }
    }
    c.write_all(image)?;
    read_reply(&mut c)
}

/// A `/proc/<pid>/status` figure in KiB (`VmHWM` is the peak resident set).
fn proc_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_else(|| panic!("no {field} in\n{status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const FLOOD: usize = 200;
const UPLOAD_BYTES: usize = 5 * 1024 * 1024;

#[test]
fn a_flood_of_large_uploads_is_answered_in_bounded_memory() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_mb = 8\nmax_uploads = 8\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    let image = std::sync::Arc::new(noise_png(UPLOAD_BYTES));
    assert!(image.len() > UPLOAD_BYTES - 64 * 1024, "the test image is {} bytes", image.len());
    let rss_before = proc_kib(d.pid(), "VmRSS");

    let start = std::sync::Arc::new(std::sync::Barrier::new(FLOOD));
    let clients: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (addr, image, start) = (addr.clone(), image.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                raw_predict(&addr, &image, i % 2 == 0)
            })
        })
        .collect();
    let replies: Vec<Reply> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.join().unwrap().unwrap_or_else(|e| panic!("upload {i} got no answer: {e}")))
        .collect();
    let peak = proc_kib(d.pid(), "VmHWM");

    let (mut labelled, mut busy) = (0, 0);
    for r in &replies {
        match r.code {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body));
                assert_eq!(v["status"], "ok", "{v}");
                labelled += 1;
            }
            503 => {
                assert!(r.headers.contains("\r\nretry-after: 1\r\n"), "{}", r.headers);
                assert!(r.body.contains("max_uploads"), "{}", r.body);
                busy += 1;
            }
            other => panic!("upload answered {other}: {}{}", r.headers, r.body),
        }
    }
    assert!(labelled >= 1 && busy >= 1, "{labelled} labelled, {busy} refused");
    assert_eq!(get(&format!("http://{addr}/healthz")), (200, "ok\n".into()));
    let (_, m) = get(&format!("http://{addr}/metrics"));
    assert_eq!(metric(&m, "labeld_http_refused_total{reason=\"busy\"}"), busy as f64);
    assert_eq!(metric(&m, "labeld_images_total{status=\"ok\"}"), labelled as f64);

    // Unbounded, the 200 bodies alone are 1000 MiB, held two or three times over. Bounded: 8 uploads
    // of 5 MiB, each held at most three times (hyper's chunks, the collected body, the queued copy),
    // plus one decoded image and the read buffers of the refused connections being drained.
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "{FLOOD} x {:.1} MiB uploads: {labelled} labelled, {busy} refused; labeld RSS {} MiB before, peak {} MiB (+{growth_mib} MiB)",
        image.len() as f64 / (1024.0 * 1024.0),
        rss_before / 1024,
        peak / 1024
    );
    assert!(growth_mib < 400, "peak RSS grew by {growth_mib} MiB");
    assert!(peak / 1024 < 1024, "peak RSS {} MiB", peak / 1024);
    assert!(d.stop().success());
}

/// Writes `bytes` one at a time, `gap` apart, until the server closes the connection; returns how
/// many it took (all of them if the server never did).
fn trickle(c: &mut std::net::TcpStream, bytes: &[u8], gap: Duration) -> usize {
    use std::io::{Read, Write};
    c.set_read_timeout(Some(gap)).unwrap();
    for (i, b) in bytes.iter().enumerate() {
        if c.write_all(&[*b]).is_err() {
            return i;
        }
        match c.read(&mut [0u8; 512]) {
            Ok(0) => return i + 1,
            Ok(_) => panic!("the server answered a half-sent request instead of closing it"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return i + 1,
        }
    }
    bytes.len()
}

/// Everything the server sends until it closes the connection; panics if it is still open after `WAIT`.
fn read_until_closed(c: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => String::from_utf8_lossy(&got).into_owned(),
        Err(e) => panic!("connection still open after {WAIT:?} ({e}), having sent {:?}", String::from_utf8_lossy(&got)),
    }
}

#[test]
fn slow_and_stalled_clients_are_cut_off_and_the_next_request_works() {
    use std::io::Write;
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nheader_timeout_s = 1\nbody_timeout_s = 2\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();

    // Half a body, then nothing: 408 once body_timeout_s has passed, and the connection closed.
    let image = png(RED);
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    write!(c, "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", image.len())
        .unwrap();
    c.write_all(&image[..image.len() / 2]).unwrap();
    let t = Instant::now();
    let r = read_reply(&mut c).unwrap_or_else(|e| panic!("no 408 for a stalled body: {e}"));
    assert_eq!(r.code, 408, "{}{}", r.headers, r.body);
    assert!(r.body.contains("body_timeout_s"), "{}", r.body);
    assert!(t.elapsed() >= Duration::from_millis(1500), "408 before the client stalled for body_timeout_s");

    // Headers a byte every 100 ms (the whole line would take 30 s): closed once header_timeout_s passed.
    let slow = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}\r\n\r\n", "a".repeat(300));
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    let sent = trickle(&mut c, slow.as_bytes(), Duration::from_millis(100));
    assert!(sent < slow.len(), "a client sending its headers byte by byte was never cut off");
    // A connection that never sends a request, or none after its first, is closed too.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(read_until_closed(&mut idle), "", "an idle connection stayed open");
    let mut kept = std::net::TcpStream::connect(&addr).unwrap();
    write!(kept, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let answered = read_until_closed(&mut kept);
    assert!(answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok\n"), "{answered}");

    // The daemon is fine: a normal upload right after is labelled.
    let (code, r) = post(&format!("http://{addr}/predict"), "image/png", &png(GREEN));
    assert_eq!((code, r["top"][0]["label"].as_str()), (200, Some("goldfish")), "{r}");
    let (_, m) = get(&format!("http://{addr}/metrics"));
    assert_eq!(metric(&m, "labeld_http_refused_total{reason=\"body_timeout\"}"), 1.0);
    assert!(metric(&m, "labeld_http_refused_total{reason=\"header_timeout\"}") >= 1.0);
    assert!(d.stop().success());
}

/// Open sockets of a process (its listener and its connections).
fn sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

#[test]
fn silent_connections_beyond_max_connections_cannot_keep_a_health_check_out() {
    // header_timeout_s far beyond the test: only eviction can let the health check in.
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nheader_timeout_s = 600\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    let before = sockets(d.pid());

    // Six clients that connect and say nothing: each newcomer closes the longest-silent one.
    let silent: Vec<_> = (0..6).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let closed_by_labeld = |c: &std::net::TcpStream| {
        c.set_nonblocking(true).unwrap();
        matches!(std::io::Read::read(&mut &*c, &mut [0u8; 1]), Ok(0))
    };
    d.eventually("the four longest-silent clients closed by labeld", WAIT, || {
        let closed: Vec<bool> = silent.iter().map(closed_by_labeld).collect();
        if closed == [true, true, true, true, false, false] { Ok(()) } else { Err(format!("closed: {closed:?}")) }
    });
    for _ in 0..20 {
        let open = sockets(d.pid());
        // Two served, at most one accepted and waiting for the slot an eviction frees.
        assert!(open <= before + 3, "{open} sockets open with max_connections = 2 (had {before})");
        std::thread::sleep(Duration::from_millis(25)); // a window in which no more may be held
    }
    // A health check behind them is served long before header_timeout_s.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut c, format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let answered = read_until_closed(&mut c);
    assert!(answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok\n"), "{answered}");
    let (_, m) = get(&format!("http://{addr}/metrics"));
    assert!(metric(&m, "labeld_http_refused_total{reason=\"idle\"}") >= 5.0, "{m}");
    drop(silent);
    assert!(d.stop().success());
}

#[test]
fn a_stop_does_not_wait_for_uploads_whose_bodies_never_finish() {
    use std::io::Write;
    // body_timeout_s far beyond the test: only the stop itself can end these uploads.
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\nmax_uploads = 32\nbody_timeout_s = 3600\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    let mut held: Vec<_> = (0..20)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            write!(c, "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/png\r\nContent-Length: 5000000\r\n\r\n").unwrap();
            c.write_all(&[0u8; 100_000]).unwrap();
            c
        })
        .collect();
    d.eventually("the 20 uploads being read", WAIT, || {
        let (_, m) = get(&format!("http://{addr}/metrics"));
        // Nothing refused: every one holds an upload permit, its body half read.
        (!m.contains("reason=\"busy\"} 1") && sockets(d.pid()) >= 20).then_some(())
    });
    let status = d.stop(); // waits for the exit (bounded well below body_timeout_s)
    assert!(status.success());
    for c in &mut held {
        let answer = read_until_closed(c);
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("shutting down"), "{answer}");
    }
}

/// `labeld probe URL` (the container image's health check) against the endpoint it checks.
fn probe(url: &str, timeout_s: &str) -> std::process::Output {
    std::process::Command::new(BIN).args(["probe", "--timeout", timeout_s, url]).output().expect("run labeld probe")
}

#[test]
fn probe_exits_0_only_on_a_2xx_answer() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();

    let ok = probe(&format!("http://{addr}/healthz"), "3");
    assert_eq!((ok.status.code(), lossy(&ok.stdout).as_str()), (Some(0), "ok\n"), "{}", lossy(&ok.stderr));
    let ready = probe(&format!("http://{addr}/readyz"), "3");
    assert_eq!((ready.status.code(), lossy(&ready.stdout).as_str()), (Some(0), "ready\n"), "{}", lossy(&ready.stderr));
    let missing = probe(&format!("http://{addr}/nothing-here"), "3");
    assert_eq!(missing.status.code(), Some(1));
    assert!(lossy(&missing.stderr).contains(": 404"), "{}", lossy(&missing.stderr));

    // A real 503: the inbox folder is gone, /readyz says so, and the probe turns 0 again once it is back.
    std::fs::remove_dir(&s.inbox).unwrap();
    let gone = d.eventually("/readyz 503 through the probe with the inbox gone", WAIT, || {
        let out = probe(&format!("http://{addr}/readyz"), "3");
        (out.status.code() == Some(1)).then_some(out)
    });
    assert!(lossy(&gone.stderr).contains(": 503"), "{}", lossy(&gone.stderr));
    std::fs::create_dir(&s.inbox).unwrap();
    d.eventually("/readyz 200 through the probe with the inbox back", WAIT, || probe(&format!("http://{addr}/readyz"), "3").status.success());
    assert!(d.stop().success());

    // Nothing listening: refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = probe(&format!("http://127.0.0.1:{port}/healthz"), "3");
    assert_eq!(refused.status.code(), Some(1));
    assert!(lossy(&refused.stderr).contains("cannot connect"), "{}", lossy(&refused.stderr));
    // Something that accepts and never answers: given up after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t = Instant::now();
    let hung = probe(&format!("http://{}/healthz", silent.local_addr().unwrap()), "1");
    assert_eq!(hung.status.code(), Some(1), "{}", lossy(&hung.stderr));
    assert!(t.elapsed() < Duration::from_secs(10), "the probe took {:?}", t.elapsed());
    // A URL it cannot use is a usage error, not a verdict on health.
    assert_eq!(probe("https://127.0.0.1:9187/healthz", "3").status.code(), Some(2));
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
