//! Remote inference (`[remote]`) against a real Open Inference Protocol server: MLServer 1.7.1 on a
//! loopback port, hosting ONNX copies of the test models through onnxruntime (tests/common/model_server.rs).
//! Labels equal the local ones; a server killed or paused mid-stream loses nothing and labels nothing
//! twice; with every server down, `fallback = "local"` labels here and says so; TLS with a test CA and
//! a client certificate; a wrong token and a model that does not fit are named in the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::model_server::{Gateway, GatewayOptions, Hosted, ModelServer};
use crate::common::*;

const LONG: Duration = Duration::from_secs(120);

/// The ONNX copy of the channel-mean test model (red → 0, green → 1, blue → 2).
fn channel_mean_onnx() -> PathBuf {
    static ONNX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONNX.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("remote-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let onnx = dir.join("channel_mean.onnx");
        onnx_model(&onnx, "channel_mean");
        onnx
    })
    .clone()
}

fn remote_section(servers: &[String], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!("\n[remote]\nservers = [{}]\nmodel = \"channel_mean\"\ntimeout_ms = 2000\nconnect_timeout_ms = 1000\n{extra}", list.join(", "))
}

fn colour(i: usize) -> ([u8; 3], u64) {
    [(RED, 0), (GREEN, 1), (BLUE, 2)][i % 3]
}

/// Every image has exactly one row, ok, with the class its colour gives; returns the rows by path.
fn one_right_row_each(s: &Setup, images: &[(PathBuf, u64)]) -> HashMap<String, csv::StringRecord> {
    let rows = s.rows();
    let mut by_path: HashMap<String, csv::StringRecord> = HashMap::new();
    for r in rows {
        let path = r[1].to_string();
        assert!(by_path.insert(path.clone(), r.clone()).is_none(), "{path} has two rows");
    }
    for (img, class) in images {
        let row = by_path.get(img.to_str().unwrap()).unwrap_or_else(|| panic!("no row for {}", img.display()));
        assert_eq!(&row[2], "ok", "{row:?}");
        assert_eq!(row[3].parse::<u64>().unwrap(), *class, "{row:?}");
    }
    assert_eq!(by_path.len(), images.len());
    by_path
}

/// `image`'s sidecar, once it is there (the daemon's log in the panic otherwise).
fn labelled(d: &Daemon, image: &Path) -> Value {
    d.eventually(&format!("a sidecar for {}", image.display()), LONG, || {
        std::fs::read(sidecar(image)).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    })
}

fn metrics(d: &Daemon) -> String {
    let url = format!("http://{}/metrics", d.http_addr());
    ureq::get(&url).call().expect("GET /metrics").into_body().read_to_string().expect("metrics text")
}

/// The value of the sample `name{labels}` (labels exactly as labeld writes them).
fn sample(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn labels_through_the_server_equal_the_local_ones_on_the_golden_photos() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/default.pt");
    assert!(model.exists(), "{} is missing: run `make model`", model.display());
    let golden: Value = serde_json::from_slice(&std::fs::read(root.join("tests/data/golden/golden.json")).unwrap()).unwrap();
    let photos: Vec<String> = golden["photos"].as_object().unwrap().keys().cloned().collect();
    let onnx = std::fs::canonicalize(&model).unwrap().with_extension("onnx");
    assert!(onnx.exists(), "{} is missing: run `make model` (scripts/setup-model.sh exports it)", onnx.display());
    let server = ModelServer::start(&[Hosted::imagenet("lite0", &onnx)]);

    let s = Setup::new("channel_mean", &format!("\n[remote]\nservers = [\"{}\"]\nmodel = \"lite0\"\n", server.url()));
    s.edit_config("path = \"models/channel_mean.pt\"", &format!("path = {:?}", model.to_str().unwrap()));
    for p in &photos {
        std::fs::copy(root.join("tests/data").join(p), s.inbox.join(p.replace('/', "_"))).unwrap();
    }
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let local = Command::new(BIN).args(["classify", "--model"]).arg(&model).arg(&s.inbox).env_remove("LABELD_CONFIG").output().unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let local: HashMap<String, Value> = String::from_utf8(local.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["path"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(local.len(), photos.len());
    for (path, here) in &local {
        let remote = read_sidecar(Path::new(path));
        assert_eq!((remote["engine"].as_str(), remote["model"].as_str()), (Some("remote"), Some("lite0")), "{remote}");
        assert_eq!(here["engine"].as_str(), Some("libtorch"));
        assert_eq!(top1(&remote), top1(here), "{path}");
        let scores = |v: &Value| -> HashMap<u64, f64> {
            v["top"].as_array().unwrap().iter().map(|t| (t["class_id"].as_u64().unwrap(), t["score"].as_f64().unwrap())).collect()
        };
        let (r, l) = (scores(&remote), scores(here));
        for (class, score) in &l {
            let other = r.get(class).unwrap_or_else(|| panic!("{path}: class {class} is in the local top-3, not the remote one: {remote}"));
            assert!((other - score).abs() <= 1e-4, "{path}: class {class} scores {score} here and {other} remote");
        }
    }
}

#[test]
fn a_server_killed_mid_stream_loses_nothing_labels_nothing_twice_and_labelling_resumes() {
    let mut server = ModelServer::start(&[Hosted::imagenet("channel_mean", &channel_mean_onnx())]);
    let s = Setup::new("channel_mean", &remote_section(&[server.url()], ""));
    let d = s.spawn_daemon();
    let total = 1000;
    let mut images = Vec::new();
    let writer = {
        let inbox = s.inbox.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                solid(&inbox.join(format!("img{i:04}.png")), colour(i).0, 32, 32);
                // The pace of a camera: the stream goes on through the outage.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for i in 0..total {
        images.push((s.inbox.join(format!("img{i:04}.png")), colour(i).1));
    }
    d.eventually("a third of the stream labelled", LONG, || s.rows_so_far().len() >= total / 3);
    server.kill9();
    d.wait_for_log("model server down", LONG);
    // The outage: the stream goes on arriving while the server is away.
    std::thread::sleep(Duration::from_secs(3));
    let during = s.rows_so_far().len();
    server.restart();
    writer.join().unwrap();
    d.eventually("every image labelled after the server returned", LONG, || {
        let n = s.rows_so_far().len();
        if n >= total { Ok(n) } else { Err(format!("{n} of {total} rows")) }
    });
    assert!(during < total, "the outage came before the stream ended");
    let rows = one_right_row_each(&s, &images);
    assert!(rows.values().all(|r| &r[13] == "" && &r[14] == "channel_mean"), "no error rows");
    // A batch's rows are written before its sidecars.
    for (img, _) in images.iter().step_by(37) {
        assert_eq!(labelled(&d, img)["engine"], "remote");
    }
    assert!(d.log_text().contains("model server up"), "{}", d.log_text());
    assert_eq!(d.count_in_log("model server down"), 1, "one line per state change:\n{}", d.log_text());
    d.stop();
}

#[test]
fn two_servers_one_paused_the_work_shifts_to_the_other() {
    let onnx = channel_mean_onnx();
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| ModelServer::start(&[Hosted::imagenet("channel_mean", &onnx)]));
        let b = ModelServer::start(&[Hosted::imagenet("channel_mean", &onnx)]);
        (a.join().unwrap(), b)
    });
    let s = Setup::new("channel_mean", &format!("\n[http]\nlisten = \"127.0.0.1:0\"\n{}", remote_section(&[a.url(), b.url()], "")));
    s.edit_config("count = 1\n", "count = 2\n");
    s.edit_config("max_batch = 8\n", "max_batch = 4\n");
    let d = s.spawn_daemon();
    let ok = |m: &str, server: &ModelServer| sample(m, &format!("labeld_remote_requests_total{{server=\"{}\",result=\"ok\"}}", server.url()));

    let mut images = Vec::new();
    for i in 0..60 {
        let p = s.inbox.join(format!("both{i:02}.png"));
        solid(&p, colour(i).0, 32, 32);
        images.push((p, colour(i).1));
    }
    d.eventually("60 images labelled by both servers", LONG, || s.rows_so_far().len() >= 60);
    let before = metrics(&d);
    assert!(ok(&before, &a) >= 1.0 && ok(&before, &b) >= 1.0, "both servers took work:\n{before}");

    a.pause();
    for i in 0..60 {
        let p = s.inbox.join(format!("one{i:02}.png"));
        solid(&p, colour(i).0, 32, 32);
        images.push((p, colour(i).1));
    }
    d.eventually("120 images labelled with one server paused", LONG, || s.rows_so_far().len() >= 120);
    let after = metrics(&d);
    let up_a = format!("labeld_remote_up{{server=\"{}\"}}", a.url());
    assert_eq!(sample(&after, &up_a), 0.0, "{after}");
    assert!(ok(&after, &b) > ok(&before, &b), "{after}");
    assert_eq!(ok(&after, &a), ok(&before, &a), "the paused server answered nothing:\n{after}");
    assert!(sample(&after, &format!("labeld_remote_requests_total{{server=\"{}\",result=\"unavailable\"}}", a.url())) >= 1.0);
    a.resume();
    one_right_row_each(&s, &images);
    d.stop();
}

#[test]
fn with_every_server_down_fallback_local_labels_here_and_the_records_say_so() {
    // Named apart from the local model, so that the CSV's model column tells them apart too.
    let mut server = ModelServer::start(&[Hosted::imagenet("channel_mean_remote", &channel_mean_onnx())]);
    let s = Setup::new("channel_mean", &remote_section(&[server.url()], "fallback = \"local\"\n"));
    s.edit_config("model = \"channel_mean\"", "model = \"channel_mean_remote\"");
    let d = s.spawn_daemon();
    let label = |name: &str, rgb| {
        let p = s.inbox.join(name);
        solid(&p, rgb, 32, 32);
        labelled(&d, &p)
    };
    let first = label("first.png", RED);
    assert_eq!((first["engine"].as_str(), first["model"].as_str()), (Some("remote"), Some("channel_mean_remote")), "{first}");

    server.kill9();
    let second = label("second.png", GREEN);
    assert_eq!(second["engine"], "libtorch", "{second}");
    assert_eq!(top1(&second).0, 1);
    let rows = s.rows();
    let row = rows.iter().find(|r| r[1].ends_with("second.png")).unwrap();
    assert_eq!(&row[14], "channel_mean", "the local model's name: [model] path's stem");

    server.restart();
    // The server is tried again after its back-off (at most 15 s); until then images stay local.
    let mut i = 0;
    d.eventually("an image labelled by the server again", LONG, || {
        i += 1;
        let side = label(&format!("after{i}.png"), BLUE);
        side["engine"].as_str() == Some("remote")
    });
    d.stop();
}

#[test]
fn tls_with_a_test_ca_a_client_certificate_and_a_token() {
    let server = ModelServer::start(&[Hosted::imagenet("channel_mean", &channel_mean_onnx())]);
    let gw = Gateway::start(&server, GatewayOptions { tls: true, client_cert: true, token: Some("t0ken-for-labeld".into()) });
    let tls = gw.tls.as_ref().unwrap();
    let (cert, key) = gw.client.as_ref().unwrap();
    let s = Setup::new("channel_mean", "");
    std::fs::write(s.dir.path().join("token"), "t0ken-for-labeld\n").unwrap();
    let extra = format!("ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ntoken_file = \"token\"\n", tls.ca_cert, cert, key);
    let text = std::fs::read_to_string(&s.config).unwrap() + &remote_section(&[gw.url()], &extra);
    std::fs::write(&s.config, text).unwrap();
    let d = s.spawn_daemon();
    let p = s.inbox.join("over-tls.png");
    solid(&p, BLUE, 32, 32);
    let side = labelled(&d, &p);
    assert_eq!((side["engine"].as_str(), top1(&side).0), (Some("remote"), 2), "{side}");
    assert!(!d.log_text().contains("t0ken-for-labeld"), "the token is never logged");
    d.stop();

    // Without the test CA the server's certificate is not trusted: a fault, not an image's error.
    s.edit_config(&format!("ca_file = {:?}\n", tls.ca_cert), "");
    let d = s.spawn_daemon();
    let p = s.inbox.join("untrusted.png");
    solid(&p, RED, 32, 32);
    d.wait_for_log("model server down", LONG);
    // A window in which nothing may be recorded for the image.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!sidecar(&p).exists() && s.rows().len() == 1, "nothing recorded for an image while the server is not trusted");
    d.stop();
}

#[test]
fn a_wrong_token_is_named_in_the_log_faults_and_records_nothing_until_it_is_fixed() {
    let server = ModelServer::start(&[Hosted::imagenet("channel_mean", &channel_mean_onnx())]);
    let gw = Gateway::start(&server, GatewayOptions { token: Some("the-right-one".into()), ..Default::default() });
    let s = Setup::new("channel_mean", &format!("\n[http]\nlisten = \"127.0.0.1:0\"\n{}", remote_section(&[gw.url()], "token_file = \"token\"\n")));
    let token = s.dir.path().join("token");
    std::fs::write(&token, "a-wrong-one\n").unwrap();
    let d = s.spawn_daemon();
    d.wait_for_log("refuses labeld's credentials", LONG);
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("refuses labeld's credentials")).unwrap();
    assert!(line.contains(token.to_str().unwrap()) && line.contains("Unauthenticated"), "{line}");
    assert!(!log.contains("a-wrong-one"), "the token is never logged");

    let p = s.inbox.join("waits.png");
    solid(&p, GREEN, 32, 32);
    d.eventually("/readyz says no server answers", LONG, || {
        let url = format!("http://{}/readyz", d.http_addr());
        match ureq::get(&url).call() {
            Err(ureq::Error::StatusCode(503)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // A window in which nothing may be recorded for the image.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!sidecar(&p).exists() && s.rows_so_far().is_empty(), "nothing recorded while the token is refused");

    std::fs::write(&token, "the-right-one\n").unwrap();
    d.signal(libc::SIGHUP);
    let side = labelled(&d, &p);
    assert_eq!((side["status"].as_str(), top1(&side).0), (Some("ok"), 1), "{side}");
    assert_eq!(s.rows().len(), 1);
    d.stop();
}

#[test]
fn a_model_that_does_not_fit_is_refused_at_start_naming_the_difference() {
    let onnx = channel_mean_onnx();
    let wrong_input = Hosted { input: vec![-1, 3, 256, 256], ..Hosted::imagenet("wrong_input", &onnx) };
    let wrong_classes = Hosted { output: vec![-1, 10], ..Hosted::imagenet("wrong_classes", &onnx) };
    let server = ModelServer::start(&[wrong_input, wrong_classes]);
    let s = Setup::new("channel_mean", "");
    let base = std::fs::read_to_string(&s.config).unwrap();
    for (model, says) in [
        ("wrong_input", ["labeld sends FP32 [-1, 3, 224, 224]", "\"input\" is FP32 [-1, 3, 256, 256]"]),
        ("wrong_classes", ["labeld expects FP32 [-1, 1000] logits", "\"logits\" is FP32 [-1, 10]"]),
    ] {
        let section = remote_section(&[server.url()], "").replace("model = \"channel_mean\"", &format!("model = \"{model}\""));
        std::fs::write(&s.config, format!("{base}{section}")).unwrap();
        let out = s.run_once();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{model}: labeld started with a model that does not fit:\n{err}");
        for said in says {
            assert!(err.contains(said) && err.contains(&server.url()), "{model}: {said:?} not in:\n{err}");
        }
    }
    assert!(s.rows_so_far().is_empty());
}
