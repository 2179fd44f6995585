//! Models that misbehave, scripted with Debian's PyTorch (TorchScript with control flow and state):
//! one that raises on a bright image, one that returns no rows, one that breaks for a while after
//! loading, one that never works again. An image's batch-mates are labelled; an image gets a
//! permanent error record only when the model still passes its load-time test input; a model fault
//! is retried, says "model failing" on /readyz, and does not stop a clean shutdown.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

/// Raises when any image of the batch is bright (mean of the normalized input above 1.5: white).
const RAISE_ON_BRIGHT: &str = r#"        if bool((x.mean([1, 2, 3]) > 1.5).any()):
            raise RuntimeError("bright image refused")"#;

/// Returns no rows for anything but the all-zero test input.
const NO_ROWS: &str = r#"        if bool((x != 0.0).any()):
            return torch.zeros(0, 1000)"#;

/// Raises on calls 6..=11: right after the 5 load-time calls, for three retry rounds (each round is
/// the batch, then the test input).
const BROKEN_FOR_A_WHILE: &str = r#"        if self.calls > 5 and self.calls <= 11:
            raise RuntimeError("model broken on call " + str(self.calls))"#;

/// Raises on every call after the 5 load-time ones.
const BROKEN_AFTER_LOAD: &str = r#"        if self.calls > 5:
            raise RuntimeError("model broken for good")"#;

fn setup(guard: &str, workers: &str) -> Setup {
    let s = Setup::new("channel_mean", "").with_workers(workers);
    scripted_channel_mean(&s.model, guard);
    s
}

fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into();
    let mut r = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

const HTTP: &str = "\n[http]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn only_the_image_the_model_raises_on_gets_an_error_its_batch_mates_are_labelled() {
    // The backlog forms at most two batches: the first image alone (nothing else queued yet), then
    // the rest. With two bright images one of them always shares a batch, so the split is exercised.
    let s = setup(RAISE_ON_BRIGHT, "count = 1\nmax_batch = 11\n");
    s.edit_config("max_delay_ms = 20", "max_delay_ms = 300");
    let colours = [("red", RED, 0), ("green", GREEN, 1), ("blue", BLUE, 2)];
    for i in 0..3 {
        for (name, rgb, _) in colours {
            solid(&s.inbox.join(format!("{name}-{i}.png")), rgb, 64, 48);
        }
    }
    for w in ["white-0.png", "white-1.png"] {
        solid(&s.inbox.join(w), [255, 255, 255], 64, 48);
    }
    let out = s.run_once();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);
    assert!(log.contains("splitting it to find the image at fault"), "no bright image shared a batch:\n{log}");

    for w in ["white-0.png", "white-1.png"] {
        let white = read_sidecar(&s.inbox.join(w));
        assert_eq!(white["status"], "error", "{white}");
        let e = white["error"].as_str().unwrap();
        assert!(e.contains("the model failed on this image") && e.contains("bright image refused"), "{e}");
    }
    for i in 0..3 {
        for (name, _, class) in colours {
            let side = read_sidecar(&s.inbox.join(format!("{name}-{i}.png")));
            assert_eq!(side["status"], "ok", "{name}-{i}: {side}");
            assert_eq!(top1(&side).0, class, "{name}-{i}: {side}");
        }
    }
    let rows = s.rows();
    assert_eq!(rows.len(), 11);
    assert_eq!(rows.iter().filter(|r| &r[2] == "error").count(), 2);
}

#[test]
fn a_model_returning_no_rows_gives_error_records_and_no_panic() {
    let s = setup(NO_ROWS, &format!("count = 1\nmax_batch = 4\n{HTTP}"));
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    for (name, rgb) in [("red.png", RED), ("blue.png", BLUE)] {
        solid(&s.inbox.join(name), rgb, 64, 48);
    }
    for name in ["red.png", "blue.png"] {
        let side = wait_for_sidecar(&s.inbox.join(name), WAIT);
        assert_eq!(side["status"], "error", "{name}: {side}");
        let e = side["error"].as_str().unwrap();
        assert!(e.contains("the model failed on this image") && e.contains("output shape [0, 1000]"), "{e}");
    }
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    let status = d.stop();
    assert!(status.success(), "exit {status:?}");
    assert_eq!(s.rows().len(), 2);
}

#[test]
fn a_model_that_fails_on_its_test_input_too_is_retried_and_the_image_labelled_once_it_works() {
    let s = setup(BROKEN_FOR_A_WHILE, &format!("count = 1\nmax_batch = 4\n{HTTP}"));
    let d = s.spawn_daemon();
    let base = format!("http://{}", d.http_addr());
    let red = s.inbox.join("red.png");
    solid(&red, RED, 64, 48);
    // /readyz says why while the model fails; no error record is written meanwhile.
    let body = d.eventually("/readyz 503 while the model fails", WAIT, || {
        let (code, body) = get(&format!("{base}/readyz"));
        if code == 503 {
            return Some(body);
        }
        assert!(!sidecar(&red).exists(), "a record was written before /readyz said the model fails");
        None
    });
    assert!(body.contains("model failing") && body.contains("model broken on call"), "{body}");
    let side = wait_for_sidecar(&red, WAIT);
    assert_eq!(side["status"], "ok", "{side}");
    assert_eq!(top1(&side).0, 0);
    d.wait_for_log("the model works again", WAIT);
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    assert!(d.log_text().contains("retry_in_ms=1000"), "the back-off doubles:\n{}", d.log_text());
    let status = d.stop();
    assert!(status.success(), "exit {status:?}");
    let rows = s.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(&rows[0][2], "ok");
}

#[test]
fn a_model_that_never_works_again_is_unhealthy_records_nothing_and_does_not_hold_up_shutdown() {
    let s = setup(BROKEN_AFTER_LOAD, &format!("count = 1\nmax_batch = 4\n{HTTP}"));
    // A 4 s watchdog: an image in flight for over 2 s with nothing completed is no progress.
    let d = s.spawn_daemon_with(&[("WATCHDOG_USEC", "4000000")]);
    let base = format!("http://{}", d.http_addr());
    let red = s.inbox.join("red.png");
    solid(&red, RED, 64, 48);
    d.wait_for_log("retry_in_ms=4000", WAIT);
    let (code, body) = get(&format!("{base}/readyz"));
    assert_eq!(code, 503, "{body}");
    let body = d.eventually("/healthz 503 while nothing is labelled", WAIT, || {
        let (code, body) = get(&format!("{base}/healthz"));
        (code == 503).then_some(body)
    });
    assert!(body.contains("no progress: 1 images in flight"), "{body}");
    // Stopped during the 4 s back-off: waiting is not sleeping.
    let status = d.stop();
    assert!(status.success(), "exit {status:?}");
    let log = std::fs::read_to_string(s.dir.path().join("daemon.log")).unwrap();
    assert!(!log.contains("retry_in_ms=8000"), "shutdown waited out the back-off:\n{log}");
    assert!(!sidecar(&red).exists(), "a model fault left a permanent record");
    assert!(s.rows().is_empty());

    // `run --once` stopped the same way has not labelled everything: non-zero.
    let log = s.dir.path().join("once.log");
    let mut child = s
        .labeld()
        .args(["run", "--once", "--config"])
        .arg(&s.config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually("run --once retrying", WAIT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("retry_in_ms=1000").then_some(()).ok_or(text)
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("stopped before the backlog was labelled"), "{text}");
    assert!(!sidecar(&red).exists());
}
