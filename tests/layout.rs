//! The worker layout adapts to the load: with `[workers]` left to its defaults, a lone image runs on
//! every CPU (on the solo thread) and a backlog on each worker's share. Read from the per-batch debug
//! log line, which names the intra-op threads the batch ran with, and from the process's threads.
//! The same holds for an ONNX model, whose lone images run on a session of their own. (How fast each
//! layout is lives in `make bench`.)

use std::time::Duration;

use crate::common::*;

fn batch_threads(log: &str) -> Vec<usize> {
    log.lines()
        .filter(|l| l.contains(" batch size="))
        .filter_map(|l| l.split("threads=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// A set-up with `[workers]` left to its defaults but for `workers` (e.g. max_batch), and the CPU count;
/// `None` on a one-CPU box, where there is nothing to adapt.
fn adaptive(workers: &str) -> Option<(Setup, usize)> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cpus < 2 {
        eprintln!("skipped: one CPU, so there is nothing to adapt");
        return None;
    }
    let s = Setup::new("channel_mean", "");
    s.edit_config("count = 1\nthreads = 2\nmax_batch = 8\n", workers);
    Some((s, cpus))
}

#[test]
fn a_lone_image_runs_on_every_cpu_and_a_backlog_on_each_workers_share() {
    let Some((s, cpus)) = adaptive("max_batch = 1\n") else { return };
    let d = s.spawn_daemon_with(&[("LABELD_LOG", "labeld=debug")]);
    assert!(d.log_text().contains(&format!("threads_alone={cpus}")), "{}", d.log_text());

    // One image at a time, each labelled before the next arrives: every batch has the box to itself.
    for i in 0..3 {
        let p = s.inbox.join(format!("lone{i}.png"));
        solid(&p, [200, 30, 30], 64, 48);
        wait_for_sidecar(&p, Duration::from_secs(30));
    }
    let lone = batch_threads(&d.log_text());
    assert_eq!(lone, vec![cpus; 3], "lone images ran with {lone:?}; log:\n{}", d.log_text());

    // A backlog: 200 images at once, two workers busy, images waiting.
    let staging = s.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    for i in 0..200 {
        solid(&staging.join(format!("b{i:03}.png")), [30, 200, 30], 640, 480);
    }
    for i in 0..200 {
        let name = format!("b{i:03}.png");
        std::fs::rename(staging.join(&name), s.inbox.join(&name)).unwrap();
    }
    for i in 0..200 {
        wait_for_sidecar(&s.inbox.join(format!("b{i:03}.png")), Duration::from_secs(60));
    }
    let all = batch_threads(&d.log_text());
    let backlog = &all[3..];
    let share = cpus / 2;
    eprintln!("backlog batches by threads: {} on {share}, {} on {cpus}", backlog.iter().filter(|t| **t == share).count(), backlog.iter().filter(|t| **t == cpus).count());
    assert!(
        backlog.iter().filter(|t| **t == share).count() >= backlog.len() / 2,
        "most backlog batches should run on a worker's share ({share}): {backlog:?}"
    );

    // The OpenMP threads never outnumber the CPUs (else they sleep between parallel regions and a
    // pass on every CPU is no faster than one on a share): the workers never grew helpers, only the
    // solo thread did. Helpers carry the name of the thread that made them (so do libtorch's other
    // pools, which the solo thread may have made too: its count is not checked).
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    let count = |name: &str| names.iter().filter(|n| *n == name).count();
    assert_eq!((count("infer-0"), count("infer-1")), (1, 1), "workers with OpenMP helpers: {names:?}");
    assert!(count("infer-solo") >= 1, "no solo thread: {names:?}");
    assert!(d.stop().success());
}

/// ONNX Runtime fixes a session's threads when it is made: each worker runs a backlog on a session of
/// its share, and a lone image goes to the model's one session with every CPU. The labels are the same
/// on both.
#[test]
fn a_lone_image_through_onnx_runtime_runs_on_every_cpu_too() {
    let Some((s, cpus)) = adaptive("max_batch = 4\n") else { return };
    onnx_model(&s.dir.path().join("models/channel_mean.onnx"), "channel_mean");
    s.edit_config("models/channel_mean.pt", "models/channel_mean.onnx");
    let d = s.spawn_daemon_with(&[("LABELD_LOG", "labeld=debug")]);
    let colours = [(RED, 0), (GREEN, 1), (BLUE, 2)];
    let check = |p: &std::path::Path, class: u64| {
        let side = read_sidecar(p);
        assert_eq!((side["status"].as_str(), top1(&side).0, side["engine"].as_str()), (Some("ok"), class, Some("onnxruntime")), "{}", p.display());
    };

    for (i, (rgb, class)) in colours.iter().enumerate() {
        let p = s.inbox.join(format!("lone{i}.png"));
        solid(&p, *rgb, 64, 48);
        wait_for_sidecar(&p, Duration::from_secs(30));
        check(&p, *class);
    }
    let lone = batch_threads(&d.log_text());
    assert_eq!(lone, vec![cpus; 3], "lone images ran with {lone:?}; log:\n{}", d.log_text());

    let staging = s.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let backlog: Vec<(String, u64)> = (0..120).map(|i| (format!("b{i:03}.png"), colours[i % 3].1)).collect();
    for (i, (name, _)) in backlog.iter().enumerate() {
        solid(&staging.join(name), colours[i % 3].0, 640, 480);
    }
    for (name, _) in &backlog {
        std::fs::rename(staging.join(name), s.inbox.join(name)).unwrap();
    }
    for (name, class) in &backlog {
        let p = s.inbox.join(name);
        wait_for_sidecar(&p, Duration::from_secs(60));
        check(&p, *class);
    }
    let all = batch_threads(&d.log_text());
    let share = cpus / 2;
    assert!(
        all[3..].iter().filter(|t| **t == share).count() >= all[3..].len() / 2,
        "most backlog batches should run on a worker's session ({share} threads): {:?}",
        &all[3..]
    );
    assert!(d.stop().success());
}
