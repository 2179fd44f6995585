//! What a container image relies on in labeld itself: `labeld probe` (its health check) and JSON logs.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{BIN, RED, Setup, solid};
use serde_json::Value;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `fact` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut fact: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = fact() {
            return v;
        }
        assert!(t.elapsed() < timeout, "after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn probe(url: &str, timeout_s: &str) -> Output {
    Command::new(BIN).args(["probe", "--timeout", timeout_s, url]).output().expect("run labeld probe")
}

#[test]
fn probe_exits_0_only_on_a_2xx_answer() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:0\"\n");
    let d = s.spawn_daemon();
    let addr = d.http_addr();

    let ok = probe(&format!("http://{addr}/healthz"), "3");
    assert_eq!((ok.status.code(), text(&ok.stdout).as_str()), (Some(0), "ok\n"), "{}", text(&ok.stderr));
    let ready = probe(&format!("http://{addr}/readyz"), "3");
    assert_eq!((ready.status.code(), text(&ready.stdout).as_str()), (Some(0), "ready\n"), "{}", text(&ready.stderr));
    let missing = probe(&format!("http://{addr}/nothing-here"), "3");
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains(": 404"), "{}", text(&missing.stderr));

    // A real 503: the inbox folder is gone, /readyz says so, and the probe turns 0 again once it is back.
    std::fs::remove_dir(&s.inbox).unwrap();
    let gone = eventually(Duration::from_secs(30), "/readyz never turned 503 with the inbox gone", || {
        let out = probe(&format!("http://{addr}/readyz"), "3");
        (out.status.code() == Some(1)).then_some(out)
    });
    assert!(text(&gone.stderr).contains(": 503"), "{}", text(&gone.stderr));
    std::fs::create_dir(&s.inbox).unwrap();
    eventually(Duration::from_secs(30), "/readyz never turned 200 with the inbox back", || {
        probe(&format!("http://{addr}/readyz"), "3").status.success().then_some(())
    });
    assert!(d.stop().success());

    // Nothing listening: refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = probe(&format!("http://127.0.0.1:{port}/healthz"), "3");
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("cannot connect"), "{}", text(&refused.stderr));
    // Something that accepts and never answers: given up after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t = Instant::now();
    let hung = probe(&format!("http://{}/healthz", silent.local_addr().unwrap()), "1");
    assert_eq!(hung.status.code(), Some(1), "{}", text(&hung.stderr));
    assert!(t.elapsed() < Duration::from_secs(10), "the probe took {:?}", t.elapsed());
    // A URL it cannot use is a usage error, not a verdict on health.
    assert_eq!(probe("https://127.0.0.1:9187/healthz", "3").status.code(), Some(2));
}

#[test]
fn json_logs_are_one_object_per_line_with_time_level_message_and_fields() {
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("red.png"), RED, 64, 64);
    std::fs::write(s.inbox.join("notes.jpg"), b"hello").unwrap();
    let out = s.labeld().env("LABELD_LOG_FORMAT", "json").args(["run", "--once", "--config"]).arg(&s.config).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stderr)
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
    assert!(text(&bad.stderr).contains("LABELD_LOG_FORMAT: must be text or json"), "{}", text(&bad.stderr));
}
