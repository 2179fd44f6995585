//! The HTTP endpoint of a running labeld: /metrics, /healthz, /readyz, POST /predict, the token, and
//! the status page in a real headless Chromium.

mod common;

use std::time::{Duration, Instant};

use common::*;

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
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("{base}/"))
        .output()
        .expect("run chromium (Debian package `chromium`, installed by scripts/setup-system.sh)");
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
    let t = Instant::now();
    while get(&format!("{base}/readyz")).0 != 200 {
        assert!(t.elapsed() < WAIT, "not ready again after a good reload:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    solid(&s.inbox.join("back.png"), GREEN, 32, 32);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("back.png"), WAIT)), (1, "goldfish".into()));
    assert!(d.stop().success());
}
