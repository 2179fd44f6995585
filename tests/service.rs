//! labeld as a service: the systemd notify protocol and watchdog, SIGHUP reload, check-config,
//! on_done, translated labels, min_score and the progress bar; all against the real binary.

use std::time::{Duration, Instant};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

/// How many of `messages` make the first `n` watchdog pings, if they hold that many.
fn pings_in(messages: &[String], n: usize) -> Option<usize> {
    let mut seen = 0;
    messages.iter().position(|m| {
        seen += usize::from(m.lines().any(|l| l == "WATCHDOG=1"));
        seen == n
    }).map(|i| i + 1)
}

#[test]
fn systemd_hears_ready_then_watchdog_pings_with_status_then_reloading_and_stopping() {
    let s = Setup::new("channel_mean", "");
    solid(&s.inbox.join("backlog.png"), RED, 32, 32);
    let d = s.spawn_daemon_with(&[("WATCHDOG_USEC", "1000000")]);
    let mut n = d.notifications();

    let ready = n.wait_for("READY=1", WAIT);
    assert!(n.seen().len() == 1, "READY=1 must be the first message: {:?}", n.seen());
    assert!(ready.contains("STATUS=queue "), "{ready}");
    // READY comes only after the model is loaded and the inbox is watched.
    let log = d.log_text();
    let (loaded, watching) = (log.find("model loaded").unwrap(), log.find("watching").unwrap());
    assert!(loaded < log.find("ready").unwrap() && watching < log.find("ready").unwrap(), "{log}");

    // Pings every half interval (0.5 s), each with a status line: three within 2.2 s.
    let since = Instant::now();
    let pings = n.read_until("3 WATCHDOG=1", WAIT, |m| pings_in(m, 3));
    assert!(since.elapsed() <= Duration::from_millis(2200), "expected >= 3 WATCHDOG=1 in 2.2 s, took {:?}: {pings:?}", since.elapsed());
    let watchdog: Vec<_> = pings.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).collect();
    assert!(watchdog.iter().all(|m| m.contains("STATUS=queue ") && m.contains(" img/s, ")), "{pings:?}");
    wait_for_sidecar(&s.inbox.join("backlog.png"), WAIT);
    n.wait_for("STATUS=queue 0, ", WAIT);
    let status = n.wait_for("STATUS=", WAIT);
    assert!(status.contains("1 labelled, 0 errors"), "{status}");

    d.signal(1);
    n.wait_for("RELOADING=1", WAIT);
    n.wait_for("READY=1", WAIT);

    let st = d.stop();
    assert!(st.success());
    n.wait_for("STOPPING=1", WAIT);
}

#[test]
fn a_hung_worker_stops_the_watchdog_pings_and_its_image_is_not_tried_again() {
    let s = Setup::new("channel_mean", "").with_workers("count = 1\nmax_batch = 1\n");
    let hang = s.dir.path().join("models/hang.pt");
    hanging_model(&hang);
    s.edit_config("models/channel_mean.pt", "models/hang.pt");
    let d = s.spawn_daemon_with(&[("WATCHDOG_USEC", "1000000")]);
    let mut n = d.notifications();
    n.wait_for("READY=1", WAIT);
    n.wait_for("WATCHDOG=1", WAIT);

    // A dark image is labelled; the pings go on.
    solid(&s.inbox.join("red.png"), RED, 32, 32);
    assert_eq!(top1(&wait_for_sidecar(&s.inbox.join("red.png"), WAIT)), (0, "tench".into()));
    n.wait_for("WATCHDOG=1", WAIT);

    // A white image makes the model spin forever: the worker is stuck, the pings stop.
    let white = s.inbox.join("white.png");
    solid(&white, [255, 255, 255], 32, 32);
    d.wait_for_log("watchdog ping is withheld", WAIT);
    let stuck = n.wait_for("STATUS=infer-0 stuck", WAIT);
    assert!(!stuck.contains("WATCHDOG=1"), "{stuck}");
    // A window in which no WATCHDOG=1 may come.
    let after = n.drain(Duration::from_secs(3));
    assert!(!after.is_empty(), "status updates keep coming");
    assert!(after.iter().all(|m| !m.lines().any(|l| l == "WATCHDOG=1")), "a hung worker must stop the pings: {after:?}");
    let log = d.log_text();
    assert!(log.contains("thread=infer-0") && log.contains("white.png"), "the log names the thread and the image:\n{log}");

    // The image that hung it has an error record, so the restart systemd makes does not hang again.
    let side = wait_for_sidecar(&white, WAIT);
    assert_eq!(side["status"], "error");
    assert!(side["error"].as_str().unwrap().contains("hung worker"), "{side}");
    drop(d); // as systemd's watchdog would: SIGKILL
    let rows = s.rows();
    assert_eq!(rows.iter().filter(|r| r[1].ends_with("/white.png")).count(), 1);

    let d = s.spawn_daemon_with(&[("WATCHDOG_USEC", "1000000")]);
    let mut n = d.notifications();
    n.wait_for("READY=1", WAIT);
    let since = Instant::now();
    let pings = n.read_until("2 WATCHDOG=1", WAIT, |m| pings_in(m, 2));
    assert!(since.elapsed() <= Duration::from_secs(2), "expected >= 2 WATCHDOG=1 in 2 s, took {:?}: {pings:?}", since.elapsed());
    assert!(d.stop().success());
    assert_eq!(s.rows().len(), 2, "nothing labelled twice");
}

#[test]
fn sighup_applies_new_inboxes_labels_min_score_and_output_without_losing_queued_images() {
    let s = Setup::new("channel_mean", "").with_workers("count = 1\nmax_batch = 4\nqueue = 8\n");
    let d = s.spawn_daemon();
    // A stream of images, with the reload in the middle of it.
    for i in 0..120 {
        solid(&s.inbox.join(format!("a{i:03}.png")), RED, 64, 64);
    }
    let second = s.dir.path().join("inbox2");
    let csv2 = s.dir.path().join("results2.csv");
    s.edit_config("[[inbox]]", "[[inbox]]\npath = \"inbox2\"\n\n[[inbox]]");
    s.edit_config("[model]\n", "[model]\nlabels_lang = \"zh\"\nmin_score = 0.5\n");
    s.edit_config("csv = \"results.csv\"", "csv = \"results2.csv\"");
    s.edit_config("max_batch = 4", "max_batch = 2");
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("config reloaded")).unwrap();
    for section in ["[model]", "[[inbox]]", "[output]", "[workers]"] {
        assert!(line.contains(section), "{section} missing from {line}");
    }

    solid(&second.join("new.png"), GREEN, 64, 64);
    let side = wait_for_sidecar(&second.join("new.png"), WAIT);
    assert_eq!(side["top"][0]["label"], "金鱼");
    assert_eq!(side["top"][0]["label_en"], "goldfish");
    assert_eq!(side["confident"], true);
    for i in 0..120 {
        wait_for_sidecar(&s.inbox.join(format!("a{i:03}.png")), WAIT);
    }
    d.stop();

    // Every image has exactly one row, in the old log or the new one; none lost, none twice.
    let (_, old_rows) = read_csv(&s.csv);
    let (header2, new_rows) = read_csv(&csv2);
    assert!(header2.iter().any(|h| h == "label1_en") && header2.iter().any(|h| h == "confident"), "{header2:?}");
    let mut paths: Vec<String> = old_rows.iter().chain(&new_rows).map(|r| r[1].to_string()).collect();
    paths.sort();
    let before = paths.len();
    let twice: Vec<_> = old_rows.iter().chain(&new_rows).filter(|r| paths.windows(2).any(|w| w[0] == w[1] && w[0] == r[1])).collect();
    paths.dedup();
    assert_eq!(before, paths.len(), "an image was labelled twice: {twice:?}");
    assert_eq!(paths.len(), 121, "every image has a row");
    assert!(new_rows.iter().any(|r| r[1].ends_with("/new.png") && &r[4] == "金鱼" && &r[5] == "goldfish"));
}

#[test]
fn sighup_swaps_in_a_new_model_between_batches() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("before.png"), RED, 32, 32);
    let side = wait_for_sidecar(&s.inbox.join("before.png"), WAIT);
    assert_eq!((top1(&side), side["model"].as_str().unwrap()), ((0, "tench".into()), "channel_mean"));

    let other = s.dir.path().join("models/shifted.pt");
    channel_mean_model_to(&other, [7, 8, 9]);
    s.edit_config("models/channel_mean.pt", "models/shifted.pt");
    d.signal(1);
    d.wait_for_log("config reloaded", WAIT);

    solid(&s.inbox.join("after.png"), RED, 32, 32);
    let side = wait_for_sidecar(&s.inbox.join("after.png"), WAIT);
    assert_eq!((top1(&side), side["model"].as_str().unwrap()), ((7, "cock".into()), "shifted"));
    assert!(d.log_text().contains("worker switched model"));

    // The same path, a new file behind it (as `make model` or a deploy tool replaces it).
    let staged = s.dir.path().join("models/.staged.pt");
    channel_mean_model_to(&staged, [4, 5, 6]);
    std::fs::rename(&staged, &other).unwrap();
    d.signal(1);
    d.wait_for_log_count("config reloaded", 2, WAIT);
    solid(&s.inbox.join("replaced.png"), RED, 32, 32);
    let side = wait_for_sidecar(&s.inbox.join("replaced.png"), WAIT);
    assert_eq!((top1(&side), side["model"].as_str().unwrap()), ((4, "hammerhead".into()), "shifted"));
    let rows = {
        d.stop();
        s.rows()
    };
    assert_eq!(rows.len(), 3);
}

#[test]
fn an_invalid_config_on_sighup_is_rejected_and_the_old_one_keeps_running() {
    let s = Setup::new("channel_mean", "");
    let d = s.spawn_daemon();
    let good = std::fs::read_to_string(&s.config).unwrap();

    // Not valid: a bad key.
    std::fs::write(&s.config, good.replace("max_batch = 8", "max_batch = 0")).unwrap();
    d.signal(1);
    d.wait_for_log("config reload rejected", WAIT);
    assert!(d.log_text().contains("[workers] max_batch"), "the log names the key:\n{}", d.log_text());

    // Valid TOML, but the model file is not a model: rejected before any worker switches.
    let junk = s.dir.path().join("models/junk.pt");
    std::fs::write(&junk, b"not a model").unwrap();
    std::fs::write(&s.config, good.replace("models/channel_mean.pt", "models/junk.pt")).unwrap();
    d.signal(1);
    d.wait_for_log_count("config reload rejected", 2, WAIT);
    assert!(d.log_text().contains("keeping the running model"));

    solid(&s.inbox.join("still.png"), BLUE, 32, 32);
    let side = wait_for_sidecar(&s.inbox.join("still.png"), WAIT);
    assert_eq!(top1(&side), (2, "great white shark".into()));
    assert_eq!(side["model"], "channel_mean");
    assert!(d.stop().success());
}

#[test]
fn check_config_prints_the_resolved_config_or_exits_2_naming_the_key() {
    let s = Setup::new("channel_mean", "[http]\nlisten = \"127.0.0.1:9187\"\n");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["[model]", "labels_lang = \"en\"", "on_done = \"keep\"", "[http]", "listen = \"127.0.0.1:9187\"", "threads = 2"] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    assert!(text.contains(s.inbox.to_str().unwrap()), "paths are shown resolved:\n{text}");

    s.edit_config("listen = \"127.0.0.1:9187\"", "listen = \"0.0.0.0:9187\"");
    let out = s.labeld().args(["check-config", "--config"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[http] token") && err.contains("reachable from other machines"), "{err}");
}

#[test]
fn on_done_move_archives_labelled_images_and_keeps_failed_ones() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"move\"\ndone_dir = \"archive\"\n");
    let archive = s.dir.path().join("archive");
    // Left by earlier runs: an image labelled before on_done was set, and an archiving a crash cut
    // short (image moved, its sidecar not yet).
    solid(&s.inbox.join("old.png"), RED, 32, 32);
    let out = s.labeld().args(["classify", "--config"]).arg(&s.config).arg(s.inbox.join("old.png")).output().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::write(sidecar(&s.inbox.join("old.png")), serde_json::to_vec(&rec).unwrap()).unwrap();
    std::fs::create_dir_all(archive.join("cam")).unwrap();
    std::fs::create_dir_all(s.inbox.join("cam")).unwrap();
    solid(&archive.join("cam/cut.png"), RED, 32, 32);
    let mut cut = rec.clone();
    cut["path"] = s.inbox.join("cam/cut.png").to_str().unwrap().into();
    std::fs::write(sidecar(&s.inbox.join("cam/cut.png")), serde_json::to_vec(&cut).unwrap()).unwrap();

    let d = s.spawn_daemon();
    for name in ["old.png", "cam/cut.png"] {
        assert!(archive.join(name).exists() && sidecar(&archive.join(name)).exists(), "{name} archived at start");
        assert!(!s.inbox.join(name).exists() && !sidecar(&s.inbox.join(name)).exists(), "{name} gone from the inbox");
    }

    std::fs::create_dir_all(s.inbox.join("line2")).unwrap();
    solid(&s.inbox.join("line2/a.png"), GREEN, 32, 32);
    std::fs::write(s.inbox.join("broken.jpg"), b"not a jpeg").unwrap();
    let side = wait_for_sidecar(&archive.join("line2/a.png"), WAIT);
    assert_eq!(top1(&side), (1, "goldfish".into()));
    assert!(archive.join("line2/a.png").exists());
    assert!(!s.inbox.join("line2/a.png").exists() && !sidecar(&s.inbox.join("line2/a.png")).exists());
    let bad = wait_for_sidecar(&s.inbox.join("broken.jpg"), WAIT);
    assert_eq!(bad["status"], "error");
    assert!(s.inbox.join("broken.jpg").exists(), "a failed image stays for the operator");
    d.stop();
    let rows = s.rows();
    assert_eq!(rows.len(), 2, "one row per image labelled in this run: {rows:?}");
    assert!(rows.iter().any(|r| r[1].ends_with("/inbox/line2/a.png")), "the row keeps the path the image arrived at");
}

#[test]
fn on_done_delete_removes_image_and_sidecar_and_keeps_the_row() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("settle_ms = 200\n", "settle_ms = 200\non_done = \"delete\"\n");
    let d = s.spawn_daemon();
    solid(&s.inbox.join("gone.png"), BLUE, 32, 32);
    d.eventually("the image and its sidecar deleted after labelling", WAIT, || {
        !s.inbox.join("gone.png").exists() && !sidecar(&s.inbox.join("gone.png")).exists()
    });
    d.stop();
    let rows = s.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!((&rows[0][2], &rows[0][4]), ("ok", "great white shark"));
}

#[test]
fn chinese_labels_carry_the_english_name_and_min_score_marks_unsure_results() {
    let s = Setup::new("channel_mean", "");
    s.edit_config("[model]\n", "[model]\nlabels_lang = \"zh\"\nmin_score = 0.5\n");
    solid(&s.inbox.join("red.png"), RED, 32, 32);
    solid(&s.inbox.join("grey.png"), [124, 116, 104], 32, 32); // ≈ the mean: no class stands out
    assert!(s.run_once().status.success());
    let red = read_sidecar(&s.inbox.join("red.png"));
    assert_eq!((red["top"][0]["label"].as_str(), red["top"][0]["label_en"].as_str()), (Some("丁鲷"), Some("tench")));
    assert_eq!(red["confident"], true);
    let grey = read_sidecar(&s.inbox.join("grey.png"));
    assert!(grey["top"][0]["score"].as_f64().unwrap() < 0.5, "{grey}");
    assert_eq!(grey["confident"], false);

    let (header, rows) = read_csv(&s.csv);
    assert_eq!(
        header.iter().collect::<Vec<_>>().join(","),
        "time,path,status,class1,label1,label1_en,score1,class2,label2,label2_en,score2,class3,label3,label3_en,score3,latency_ms,error,model,confident,file_id"
    );
    let red_row = rows.iter().find(|r| r[1].ends_with("red.png")).unwrap();
    assert_eq!((&red_row[4], &red_row[5], &red_row[18]), ("丁鲷", "tench", "true"));
    let grey_row = rows.iter().find(|r| r[1].ends_with("grey.png")).unwrap();
    assert_eq!(&grey_row[18], "false");
}

#[test]
fn classify_and_run_once_on_a_terminal_show_a_progress_bar_with_images_per_second() {
    let s = Setup::new("channel_mean", "");
    for i in 0..40 {
        solid(&s.inbox.join(format!("{i}.png")), RED, 64, 64);
    }
    // `script` gives labeld a pseudo-terminal, as an operator's shell would.
    let cmd = format!("{BIN} classify --model {} {} > /dev/null", s.model.display(), s.inbox.display());
    let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script(1)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("40/40 images") && tty.contains("img/s"), "no progress bar on the terminal:\n{tty}");

    // `run --once` over the backlog: the bar ends at the full count.
    let cmd = format!("{BIN} run --once --config {}", s.config.display());
    let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && tty.contains("40/40 images") && tty.contains("img/s"), "{tty}");
    assert_eq!(s.rows().len(), 40);

    // Not a terminal: no bar, JSON only.
    let out = s.labeld().args(["classify", "--model"]).arg(&s.model).arg(&s.inbox).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("img/s"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 40);
}
