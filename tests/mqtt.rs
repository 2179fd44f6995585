//! MQTT publishing against a real Mosquitto started by the test (tests/common/broker.rs):
//! every CSV row reaches a persistent QoS 1 subscriber through broker and labeld kill -9s, a broker
//! that is down at start-up, log rotation during an outage, TLS with a password file, presence
//! (online, offline, the will), and check-config.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crate::common::broker::*;
use crate::common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// The stream test's waits: 2,000 images share two cores with the other tests.
const STREAM_WAIT: Duration = Duration::from_secs(240);
/// The `[mqtt] host` the tests set, so topics do not depend on the machine's name.
const HOST: &str = "test-box";
/// Every result of the test box (default topic template `labeld/{host}/{inbox}/result`).
const RESULTS: &str = "labeld/test-box/+/result";
const STATUS: &str = "labeld/test-box/status";

/// The `[mqtt]` section for `broker`, with `extra` keys.
fn mqtt_section(b: &Broker, extra: &str) -> String {
    format!("\n[mqtt]\nurl = \"{}\"\nhost = \"{HOST}\"\nclient_id = \"labeld-test\"\nkeep_alive_s = 2\n{extra}", b.url())
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(16, 16, image::Rgb(rgb)).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Tiny PNGs (red, green, blue), written as copies: `n` images named `{prefix}{i}.png`.
fn write_images(inbox: &Path, prefix: &str, n: usize, gap: Duration) {
    let pngs = [png(RED), png(GREEN), png(BLUE)];
    for i in 0..n {
        std::fs::write(inbox.join(format!("{prefix}{i:05}.png")), &pngs[i % 3]).unwrap();
        if !gap.is_zero() {
            std::thread::sleep(gap); // a camera's pace, not a wait
        }
    }
}

fn sidecar_count(inbox: &Path) -> usize {
    std::fs::read_dir(inbox).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".json")).count()
}

fn wait_labelled(inbox: &Path, n: usize, timeout: Duration) {
    eventually(format_args!("{n} images labelled"), timeout, || {
        let done = sidecar_count(inbox);
        (done >= n).then_some(()).ok_or(done)
    });
}

/// The payloads, each parsed (panics on one that is not a JSON object).
fn parsed(messages: &[(String, String)]) -> Vec<Value> {
    messages
        .iter()
        .map(|(topic, p)| {
            let v: Value = serde_json::from_str(p).unwrap_or_else(|e| panic!("payload on {topic} is not JSON ({e}): {p}"));
            assert!(v.is_object(), "payload on {topic} is not an object: {p}");
            v
        })
        .collect()
}

fn paths_of(messages: &[(String, String)]) -> HashSet<String> {
    parsed(messages).iter().filter_map(|v| v["path"].as_str().map(str::to_string)).collect()
}

/// Waits until every path in `want` has arrived, then for a quiet second; returns all messages.
fn wait_for_paths(sub: &Subscriber, want: &HashSet<String>, timeout: Duration) -> Vec<(String, String)> {
    eventually(format_args!("all {} rows published", want.len()), timeout, || {
        let got = paths_of(&sub.messages());
        let mut missing: Vec<_> = want.difference(&got).cloned().collect();
        missing.sort();
        missing.is_empty().then_some(()).ok_or_else(|| format!("{} missing, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]))
    });
    // A quiet second: the window in which a duplicate would still arrive.
    sub.wait_quiet(Duration::from_secs(1), WAIT)
}

/// The CSV's `file_id` as the payload's `file` object spells it (`dev:inode:size:mtime_ns:ctime_ns`).
fn file_id(file: &Value) -> String {
    ["dev", "inode", "size", "mtime_ns", "ctime_ns"].map(|k| file[k].to_string()).join(":")
}

/// Checks the published results against the CSV rows (path in column 1, `file_id` last): the same
/// set of images, each payload well formed, one stable `id` per image. Returns the duplicate count.
fn check_against_rows(messages: &[(String, String)], rows: &[csv::StringRecord], inbox: &str) -> usize {
    let rows_by_path: HashMap<&str, &csv::StringRecord> = rows.iter().map(|r| (&r[1], r)).collect();
    assert_eq!(rows_by_path.len(), rows.len(), "one CSV row per image");
    let mut ids = HashMap::<String, HashSet<String>>::new();
    for ((topic, _), v) in messages.iter().zip(parsed(messages)) {
        let path = v["path"].as_str().unwrap_or_else(|| panic!("no path in {v}"));
        let row = rows_by_path.get(path).unwrap_or_else(|| panic!("published {path} has no CSV row"));
        assert_eq!(topic, &format!("labeld/{HOST}/{inbox}/result"), "{v}");
        assert_eq!(v["host"], HOST, "{v}");
        assert_eq!(v["inbox"], inbox, "{v}");
        assert_eq!(v["status"], row[2].to_string(), "{v}");
        assert_eq!(v["model"], "channel_mean", "{v}");
        assert!(v["top"][0]["label"].is_string() && v["time"].is_string(), "sidecar fields: {v}");
        if !v["file"].is_null() {
            assert_eq!(file_id(&v["file"]), row[row.len() - 1].to_string(), "{v}");
        }
        let id = match &v["id"] {
            Value::String(s) if !s.is_empty() => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("no id ({other}) in {v}"),
        };
        ids.entry(path.to_string()).or_default().insert(id);
    }
    let published: HashSet<&str> = ids.keys().map(String::as_str).collect();
    let logged: HashSet<&str> = rows_by_path.keys().copied().collect();
    let mut missing: Vec<_> = logged.difference(&published).collect();
    missing.sort();
    assert!(missing.is_empty(), "{} CSV rows never published, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    let unstable: Vec<_> = ids.iter().filter(|(_, i)| i.len() > 1).collect();
    assert!(unstable.is_empty(), "an image republished with another id: {:?}", &unstable[..unstable.len().min(3)]);
    let distinct: HashSet<&String> = ids.values().flatten().collect();
    assert_eq!(distinct.len(), rows.len(), "one id per CSV row");
    messages.len() - rows.len()
}

fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(WAIT)).build().into();
    let mut r = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// A metric's value from `/metrics`, if it is there.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, text) = http_get(&format!("http://{addr}/metrics"));
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' '))).map(|v| v.parse().unwrap())
}

/// Waits until `metric` satisfies `want`; returns its value.
fn wait_metric(addr: &str, name: &str, want: impl Fn(f64) -> bool) -> f64 {
    eventually(format_args!("{name} as awaited"), WAIT, || match metric(addr, name) {
        Some(v) if want(v) => Ok(v),
        v => {
            let (_, text) = http_get(&format!("http://{addr}/metrics"));
            let mqtt: Vec<&str> = text.lines().filter(|l| l.starts_with("labeld_mqtt")).collect();
            Err(format!("{name} = {v:?}:\n{}", mqtt.join("\n")))
        }
    })
}

/// Reads what labeld tells systemd until a `STATUS=` line satisfies `want`; returns that line.
fn systemd_status(n: &mut Notifications, want: impl Fn(&str) -> bool) -> String {
    let status = |l: &str| l.strip_prefix("STATUS=").is_some_and(&want);
    let msg = n.wait_for_line("the awaited STATUS=", WAIT, status);
    msg.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap().to_string()
}

/// A persistent subscriber on the results, its session made while the broker was up; the broker
/// is then stopped (cleanly: the session is saved), and the subscriber keeps retrying.
fn recorder_with_broker_down(b: &mut Broker, id: &str) -> Subscriber {
    let sub = Subscriber::start(b, RESULTS, id);
    b.stop();
    sub
}

/// The stream test. `LABELD_MQTT_IMAGES` scales it (default 2,000).
#[test]
fn a_stream_through_broker_and_labeld_kill9s_publishes_every_row() {
    let n: usize = std::env::var("LABELD_MQTT_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let mut b = Broker::start(BrokerOptions::default());
    let sub = Subscriber::start(&b, RESULTS, "stream-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    let mut d = s.spawn_daemon();
    let camera = {
        let inbox = s.inbox.clone();
        std::thread::spawn(move || write_images(&inbox, "frame-", n, Duration::from_millis(8)))
    };

    sub.wait_for(n / 8, STREAM_WAIT);
    b.kill9();
    eprintln!("broker killed at {} labelled, {} received", sidecar_count(&s.inbox), sub.messages().len());
    // Down until labeld has lost it and failed to reconnect once (its back-off has begun).
    d.wait_for_log("lost the MQTT broker", WAIT);
    d.wait_for_log("cannot connect to the MQTT broker", WAIT);
    b.restart();

    // Killed while publishing again (reconnected after its back-off), rows in flight.
    sub.wait_for(n / 2, STREAM_WAIT);
    d.signal(9);
    drop(d);
    eprintln!("labeld killed at {} labelled, {} received", sidecar_count(&s.inbox), sub.messages().len());
    d = s.spawn_daemon();
    camera.join().unwrap();
    wait_labelled(&s.inbox, n, STREAM_WAIT);

    let logged: HashSet<String> = s.rows().iter().map(|r| r[1].to_string()).collect();
    assert_eq!(logged.len(), n, "every image has a CSV row");
    let messages = wait_for_paths(&sub, &logged, STREAM_WAIT);
    assert!(d.stop().success());
    let duplicates = check_against_rows(&messages, &s.rows(), "inbox");
    eprintln!("stream: {n} images, {} messages, {duplicates} duplicates (broker kill -9 + labeld kill -9)", messages.len());
    assert!(duplicates <= 300, "{duplicates} duplicates: more than the unacknowledged window");
}

/// A network cut (no FIN, no RST: only keep-alives tell) mid-stream: labelling goes on, the broker
/// gives labeld up and sends its will, labeld notices and reconnects once the link heals, nothing is lost.
#[test]
fn a_network_cut_mid_stream_is_noticed_by_keep_alive_and_publishing_resumes() {
    let b = Broker::start(BrokerOptions::default());
    let link = Link::start(&b);
    let sub = Subscriber::start(&b, RESULTS, "cut-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, "").replace(&b.url(), &link.url()));
    let d = s.spawn_daemon();
    status(&b, "online");
    let camera = {
        let inbox = s.inbox.clone();
        std::thread::spawn(move || write_images(&inbox, "cut-", 400, Duration::from_millis(10)))
    };
    sub.wait_for(100, WAIT);
    link.cut();
    // keep_alive_s = 2: the broker gives the silent client up after 3 s and publishes its will.
    status(&b, "offline");
    let (labelled, received) = (sidecar_count(&s.inbox), sub.messages().len());
    std::thread::sleep(Duration::from_secs(2)); // a window in which nothing may pass the cut link
    assert!(sidecar_count(&s.inbox) > labelled || labelled == 400, "labelling goes on during the cut");
    assert_eq!(sub.messages().len(), received, "nothing passed the cut link");
    link.heal();
    camera.join().unwrap();
    wait_labelled(&s.inbox, 400, WAIT);
    status(&b, "online");
    let rows = s.rows();
    let logged: HashSet<String> = rows.iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    let duplicates = check_against_rows(&messages, &rows, "inbox");
    eprintln!("network cut: 400 rows, {} messages, {duplicates} duplicates", messages.len());
    assert!(duplicates <= 200, "{duplicates} duplicates: more than the unacknowledged window");
    assert!(b.count_in_log(" as labeld-test (") >= 2, "labeld connected again:\n{}", b.log_tail(40));
    assert!(d.stop().success());
}

/// Also what systemd's STATUS and the status page say about the broker.
#[test]
fn a_broker_down_at_start_up_gets_the_backlog_when_it_appears() {
    let mut b = Broker::start(BrokerOptions::default());
    let sub = recorder_with_broker_down(&mut b, "late-recorder");
    let s = Setup::new("channel_mean", &format!("[http]\nlisten = \"127.0.0.1:0\"\n{}", mqtt_section(&b, "")));
    let d = s.spawn_daemon_with(&[("WATCHDOG_USEC", "1000000")]);
    let mut systemd = d.notifications();
    let addr = d.http_addr();
    assert_eq!(http_get(&format!("http://{addr}/readyz")), (200, "ready\n".into()), "ready without a broker");
    write_images(&s.inbox, "img-", 50, Duration::ZERO);
    wait_labelled(&s.inbox, 50, WAIT);
    assert_eq!(s.rows().len(), 50);
    assert_eq!(wait_metric(&addr, "labeld_mqtt_pending_rows", |v| v >= 50.0), 50.0);
    assert_eq!(metric(&addr, "labeld_mqtt_connected"), Some(0.0));
    let status = systemd_status(&mut systemd, |s| s.ends_with("lag 50"));
    assert!(status.contains("mqtt: disconnected since "), "{status}");
    let (_, page) = http_get(&format!("http://{addr}/api/status"));
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!((&page["mqtt"]["connected"], &page["mqtt"]["pending_rows"]), (&Value::from(false), &Value::from(50)), "{page}");
    assert!(sub.messages().is_empty());
    // Uploads are answered, not published (check_against_rows finds no message without a CSV row).
    let upload = ureq::post(format!("http://{addr}/predict")).header("Content-Type", "image/png").send(&png(BLUE)[..]);
    assert_eq!(upload.expect("POST /predict").status().as_u16(), 200);

    b.restart();
    let logged: HashSet<String> = s.rows().iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    let duplicates = check_against_rows(&messages, &s.rows(), "inbox");
    assert_eq!(duplicates, 0, "one clean connection: each row once");
    assert_eq!(wait_metric(&addr, "labeld_mqtt_connected", |v| v == 1.0), 1.0);
    assert_eq!(wait_metric(&addr, "labeld_mqtt_pending_rows", |v| v == 0.0), 0.0);
    assert!(metric(&addr, "labeld_mqtt_published_total").unwrap() >= 50.0);
    systemd_status(&mut systemd, |s| s.ends_with("mqtt: connected, lag 0"));
    assert!(d.stop().success());
}

/// Broker down; N rows; `rotate`; M rows; broker up: both files' rows are published, once each.
fn rotation_during_an_outage(name: &str, rotate: impl FnOnce(&Setup, &Daemon)) {
    let mut b = Broker::start(BrokerOptions::default());
    let sub = recorder_with_broker_down(&mut b, &format!("{name}-recorder"));
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    let d = s.spawn_daemon();
    write_images(&s.inbox, "before-", 30, Duration::ZERO);
    wait_labelled(&s.inbox, 30, WAIT);
    rotate(&s, &d);
    write_images(&s.inbox, "after-", 20, Duration::ZERO);
    wait_labelled(&s.inbox, 50, WAIT);
    let (_, old) = read_csv(&s.dir.path().join("results.csv.1"));
    let now = s.rows();
    assert_eq!((old.len(), now.len()), (30, 20), "{name}: rows before and after the rotation");

    b.restart();
    let all: Vec<csv::StringRecord> = old.into_iter().chain(now).collect();
    let logged: HashSet<String> = all.iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    let duplicates = check_against_rows(&messages, &all, "inbox");
    let mut per_path = HashMap::<String, usize>::new();
    for v in parsed(&messages) {
        *per_path.entry(v["path"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let twice: Vec<_> = per_path.iter().filter(|(_, c)| **c > 1).collect();
    eprintln!("{name}: 50 rows, {} messages, {duplicates} duplicates {twice:?}", messages.len());
    assert!(twice.is_empty(), "{name}: rows published more than once without any fault: {twice:?}");
    assert!(d.stop().success());
}

#[test]
fn rows_rotated_away_by_rename_and_sighup_during_an_outage_are_published() {
    rotation_during_an_outage("create", |s, d| {
        std::fs::rename(&s.csv, s.dir.path().join("results.csv.1")).unwrap();
        d.signal(1);
        d.wait_for_log("results log reopened", WAIT);
    });
}

#[test]
fn rows_copied_away_by_copytruncate_during_an_outage_are_published() {
    rotation_during_an_outage("copytruncate", |s, _| {
        std::fs::copy(&s.csv, s.dir.path().join("results.csv.1")).unwrap();
        std::fs::OpenOptions::new().write(true).open(&s.csv).unwrap().set_len(0).unwrap();
    });
}

#[test]
fn a_log_rotated_while_labeld_is_stopped_during_an_outage_is_still_published() {
    let mut b = Broker::start(BrokerOptions::default());
    let sub = recorder_with_broker_down(&mut b, "stopped-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    let d = s.spawn_daemon();
    write_images(&s.inbox, "before-", 20, Duration::ZERO);
    wait_labelled(&s.inbox, 20, WAIT);
    assert!(d.stop().success());
    // logrotate runs while labeld is down (`create`: the next start makes a new log).
    std::fs::rename(&s.csv, s.dir.path().join("results.csv.1")).unwrap();
    let d = s.spawn_daemon();
    write_images(&s.inbox, "after-", 10, Duration::ZERO);
    wait_labelled(&s.inbox, 30, WAIT);
    let (_, old) = read_csv(&s.dir.path().join("results.csv.1"));
    let all: Vec<csv::StringRecord> = old.into_iter().chain(s.rows()).collect();
    assert_eq!(all.len(), 30);

    b.restart();
    let logged: HashSet<String> = all.iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    assert_eq!(check_against_rows(&messages, &all, "inbox"), 0, "each row once");
    assert!(d.stop().success());
}

#[test]
fn rows_of_a_log_set_aside_by_a_column_change_during_an_outage_are_published_with_their_own_columns() {
    let mut b = Broker::start(BrokerOptions::default());
    let sub = recorder_with_broker_down(&mut b, "columns-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    s.edit_config("path = \"models/channel_mean.pt\"\n", "path = \"models/channel_mean.pt\"\ntop_k = 3\n");
    let d = s.spawn_daemon();
    write_images(&s.inbox, "three-", 20, Duration::ZERO);
    wait_labelled(&s.inbox, 20, WAIT);
    // A new top_k changes the CSV's columns: the old log is renamed to results.<time>.csv.
    s.edit_config("top_k = 3", "top_k = 2");
    d.signal(1);
    d.wait_for_log("results log now", WAIT);
    write_images(&s.inbox, "two-", 20, Duration::ZERO);
    wait_labelled(&s.inbox, 40, WAIT);
    let aside: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &s.csv && p.extension().is_some_and(|x| x == "csv"))
        .collect();
    assert_eq!(aside.len(), 1, "one log set aside: {aside:?}");
    let (_, old) = read_csv(&aside[0]);
    let (header, now) = read_csv(&s.csv);
    assert_eq!((old.len(), now.len()), (20, 20));
    assert!(header.iter().all(|h| h != "label3"), "{header:?}");

    b.restart();
    let all: Vec<csv::StringRecord> = old.into_iter().chain(now).collect();
    let logged: HashSet<String> = all.iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    assert_eq!(check_against_rows(&messages, &all, "inbox"), 0);
    for v in parsed(&messages) {
        let tops = v["top"].as_array().map_or(0, Vec::len);
        let want = if v["path"].as_str().unwrap().contains("three-") { 3 } else { 2 };
        assert_eq!(tops, want, "each row with its own log's columns: {v}");
    }
    assert!(d.stop().success());
}

#[test]
fn run_once_exits_only_when_the_broker_has_acknowledged_every_row() {
    let b = Broker::start(BrokerOptions::default());
    let sub = Subscriber::start(&b, RESULTS, "once-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    write_images(&s.inbox, "once-", 300, Duration::ZERO);
    let out = s.run_once();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Mosquitto logs each PUBACK before it sends it: counted the moment labeld has exited.
    let acked = b.count_in_log("Sending PUBACK to labeld-test");
    assert!(acked >= 300, "{acked} of 300 rows acknowledged when run --once exited");
    let rows = s.rows();
    let logged: HashSet<String> = rows.iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    assert_eq!(check_against_rows(&messages, &rows, "inbox"), 0);
    assert_eq!(serde_json::from_str::<Value>(&b.retained(STATUS).unwrap()).unwrap()["status"], "offline");
}

#[test]
fn tls_with_a_password_file_and_a_refused_password() {
    let b = Broker::start(BrokerOptions::tls().with_user("labeld", "s3cret pass"));
    let sub = Subscriber::start(&b, RESULTS, "tls-recorder");
    let ca = b.ca_file().unwrap().to_str().unwrap().to_string();
    let keys = |pass: &str| format!("username = \"labeld\"\npassword_file = \"{pass}\"\nca_file = \"{ca}\"\n");
    let s = Setup::new("channel_mean", &mqtt_section(&b, &keys("mqtt.pass")));
    std::fs::write(s.dir.path().join("mqtt.pass"), "s3cret pass\n").unwrap();
    let d = s.spawn_daemon();
    write_images(&s.inbox, "tls-", 10, Duration::ZERO);
    wait_labelled(&s.inbox, 10, WAIT);
    let logged: HashSet<String> = s.rows().iter().map(|r| r[1].to_string()).collect();
    let messages = wait_for_paths(&sub, &logged, WAIT);
    check_against_rows(&messages, &s.rows(), "inbox");
    assert!(d.stop().success());

    // The wrong password: labelling goes on, the refusal is logged per back-off step, not per image.
    let s = Setup::new(
        "channel_mean",
        &format!("[http]\nlisten = \"127.0.0.1:0\"\n{}", mqtt_section(&b, &keys("wrong.pass")).replace("labeld-test", "labeld-wrong")),
    );
    std::fs::write(s.dir.path().join("wrong.pass"), "not the password\n").unwrap();
    let d = s.spawn_daemon();
    let addr = d.http_addr();
    // Mosquitto 2.0 names a client it refused "<unknown>" (it never accepted its id).
    b.wait_for_log("disconnected, not authorised", WAIT);
    write_images(&s.inbox, "first-", 20, Duration::from_millis(50));
    wait_labelled(&s.inbox, 20, WAIT);
    let first = wait_metric(&addr, "labeld_mqtt_pending_rows", |v| v >= 20.0);
    write_images(&s.inbox, "then-", 20, Duration::from_millis(50));
    wait_labelled(&s.inbox, 40, WAIT);
    assert_eq!(s.rows().len(), 40, "labelling continues");
    let then = wait_metric(&addr, "labeld_mqtt_pending_rows", |v| v >= 40.0);
    assert!(then > first, "pending rows grow: {first} → {then}");
    assert_eq!(metric(&addr, "labeld_mqtt_connected"), Some(0.0));
    let log = d.log_text();
    let refusals = log
        .lines()
        .filter(|l| l.to_lowercase().contains("mqtt"))
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("refused") || l.contains("not authori") || l.contains("bad user") || l.contains("credentials")
        })
        .count();
    assert!(refusals >= 1, "the refusal is logged:\n{log}");
    assert!(refusals < 20, "{refusals} refusal lines for 40 images in a few seconds: logged per image?\n{log}");
    assert_eq!(sub.messages().len(), 10, "nothing from the refused box");
    assert!(d.stop().success());
}

fn status(b: &Broker, want: &str) -> Value {
    let m = b.wait_retained(STATUS, WAIT, |m| serde_json::from_str::<Value>(m).is_ok_and(|v| v["status"] == want));
    serde_json::from_str(&m).unwrap()
}

#[test]
fn presence_is_online_after_connect_and_offline_after_sigterm_and_kill9() {
    let b = Broker::start(BrokerOptions::default());
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    assert_eq!(b.retained(STATUS), None);
    let d = s.spawn_daemon();
    let online = status(&b, "online");
    assert_eq!(online["model"], "channel_mean", "{online}");
    assert!(online["version"].as_str().is_some_and(|v| !v.is_empty()), "{online}");
    assert!(d.stop().success());
    status(&b, "offline");
    assert!(b.log().contains("Received DISCONNECT from labeld-test"), "a clean stop disconnects:\n{}", b.log_tail(30));

    let d = s.spawn_daemon();
    status(&b, "online");
    d.signal(9);
    drop(d);
    // No DISCONNECT: the broker publishes the will when it notices the dead connection.
    let will = status(&b, "offline");
    eprintln!("will: {will}");
}

#[test]
fn topic_placeholders_and_the_inbox_name() {
    let b = Broker::start(BrokerOptions::default());
    let sub = Subscriber::start(&b, "plant/#", "topic-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, "topic = \"plant/{host}/{inbox}/{status}/{label}\"\nqos = 2\n"));
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\nname = \"line-7\"\n");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("red.png"), RED, 16, 16);
    std::fs::write(s.inbox.join("broken.png"), b"\x89PNG not really").unwrap();
    let m = sub.wait_for(2, WAIT);
    let topics: HashSet<&str> = m.iter().map(|(t, _)| t.as_str()).collect();
    assert!(topics.contains("plant/test-box/line-7/ok/tench"), "{topics:?}");
    assert!(topics.iter().any(|t| t.starts_with("plant/test-box/line-7/error/")), "{topics:?}");
    for v in parsed(&m) {
        assert_eq!(v["inbox"], "line-7", "{v}");
    }
    assert!(d.stop().success());
}

#[test]
fn a_row_the_broker_drops_the_connection_for_is_named_and_waited_for_until_max_message_kb_gives_it_up() {
    // Mosquitto drops a client whose packet exceeds max_packet_size; one image's path makes its row too big.
    let b = Broker::start(BrokerOptions { extra: "max_packet_size 1000".into(), ..Default::default() });
    let sub = Subscriber::start(&b, RESULTS, "poison-recorder");
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    let d = s.spawn_daemon();
    write_images(&s.inbox, "before-", 3, Duration::ZERO);
    wait_labelled(&s.inbox, 3, WAIT);
    let before: HashSet<String> = s.rows().iter().map(|r| r[1].to_string()).collect();
    wait_for_paths(&sub, &before, WAIT);
    let deep = s.inbox.join("a".repeat(200)).join("b".repeat(200)).join("c".repeat(200));
    std::fs::create_dir_all(&deep).unwrap();
    let big = "d".repeat(200);
    std::fs::write(deep.join(format!("{big}.png")), png(RED)).unwrap();
    // The big row first, then the rows after it.
    eventually("the deep image labelled", WAIT, || s.rows().len() >= 4);
    write_images(&s.inbox, "after-", 3, Duration::ZERO);
    wait_labelled(&s.inbox, 6, WAIT);
    eventually("the deep image and the ones after it labelled", WAIT, || s.rows().len() >= 7);
    // A good row is never given up by guesswork: labeld names the row and waits for it.
    d.wait_for_log("drops the connection every time this row is sent alone", WAIT);
    assert_eq!(sub.messages().len(), 3, "nothing after the big row is published while it waits");
    let connects = d.log_text().matches("connected to the MQTT broker").count();
    assert!(connects <= 8, "{connects} connects: reconnecting without back-off?\n{}", d.log_text());
    assert!(d.stop().success());

    // The operator's lever: rows above max_message_kb are given up; the rows after them go.
    s.edit_config("keep_alive_s = 2\n", "keep_alive_s = 2\nmax_message_kb = 1\n");
    let d = s.spawn_daemon();
    let want: HashSet<String> = s.rows().iter().map(|r| r[1].to_string()).filter(|p| !p.contains(&big)).collect();
    assert_eq!(want.len(), 6, "{want:?}");
    let got = wait_for_paths(&sub, &want, WAIT);
    assert!(!paths_of(&got).iter().any(|p| p.contains(&big)), "the big row cannot have arrived");
    assert_eq!(s.rows().len(), 7, "the big image keeps its row");
    let log = d.log_text();
    assert!(log.contains("larger than [mqtt] max_message_kb"), "the given-up row is said:\n{log}");
    println!("big row: {connects} connects before max_message_kb; then {} messages", got.len());
    assert!(d.stop().success());
}

#[test]
fn a_reload_that_changes_mqtt_keeps_the_connection_and_says_it_applies_at_the_next_restart() {
    let b = Broker::start(BrokerOptions::default());
    let s = Setup::new("channel_mean", &mqtt_section(&b, ""));
    let d = s.spawn_daemon();
    b.wait_for_log("New client connected from 127.0.0.1", WAIT);
    s.edit_config("keep_alive_s = 2\n", "keep_alive_s = 5\n");
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("config reloaded")).unwrap();
    assert!(line.contains("at_next_restart=[mqtt]"), "{line}");
    assert!(log.contains("[mqtt] takes effect at the next restart"), "{log}");
    assert_eq!(b.count_in_log("New client connected"), 1, "the running connection is kept");
    assert!(d.stop().success());
}

#[test]
fn check_config_names_a_bad_url_and_unreadable_password_and_ca_files() {
    let b = Broker::down(BrokerOptions::default());
    let s = Setup::new("channel_mean", &mqtt_section(&b, "username = \"labeld\"\npassword_file = \"mqtt.pass\"\n"));
    std::fs::write(s.dir.path().join("mqtt.pass"), "secret\n").unwrap();
    let check = || s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[mqtt]"), "{}", String::from_utf8_lossy(&out.stdout));

    for (from, to, key) in [
        (b.url(), "ftp://127.0.0.1:1883".to_string(), "url"),
        (b.url(), "not a url".to_string(), "url"),
        ("mqtt.pass\"".to_string(), "missing.pass\"".to_string(), "password_file"),
    ] {
        s.edit_config(&from, &to);
        let out = check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains("[mqtt]") && err.contains(key), "{to}: the message names [mqtt] {key}: {err}");
        s.edit_config(&to, &from);
    }
    // A CA file that is not there (on a TLS URL, where it is used).
    s.edit_config(&b.url(), "mqtts://localhost:8883");
    s.edit_config("keep_alive_s = 2\n", "keep_alive_s = 2\nca_file = \"missing-ca.pem\"\n");
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("[mqtt] ca_file") && err.contains("missing-ca.pem"), "{err}");
    s.edit_config("ca_file = \"missing-ca.pem\"\n", "");
    // A password file that is a folder cannot be read either.
    std::fs::remove_file(s.dir.path().join("mqtt.pass")).unwrap();
    std::fs::create_dir(s.dir.path().join("mqtt.pass")).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("password_file"), "{err}");
}
