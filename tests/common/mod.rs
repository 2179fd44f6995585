//! Shared helpers for the integration tests: test images, a config writer and a handle on the real
//! `labeld` binary, started and found ready the way systemd finds it (READY=1 on `NOTIFY_SOCKET`).
//! `models`: the TorchScript test models; `wait`: `eventually`; `notify`: the systemd stand-in;
//! `broker`: a real Mosquitto; `devtools`: a headless Chromium.
#![allow(dead_code)]

pub mod broker;
pub mod devtools;
pub mod model_server;
pub mod models;
pub mod notify;
pub mod wait;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

// Not every crate that includes these helpers uses each of them.
#[allow(unused_imports)]
pub use models::*;
#[allow(unused_imports)]
pub use notify::Notifications;
#[allow(unused_imports)]
pub use wait::{Shown, eventually, settled, within};

pub const BIN: &str = env!("CARGO_BIN_EXE_labeld");

/// A solid-colour RGB image written in the format its extension names.
pub fn solid(path: &Path, rgb: [u8; 3], w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).expect("write test image");
}

pub const RED: [u8; 3] = [230, 20, 20];
pub const GREEN: [u8; 3] = [20, 230, 20];
pub const BLUE: [u8; 3] = [20, 20, 230];

/// A test folder: `models/`, `inbox/`, a config, and the CSV path.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub inbox: PathBuf,
    pub csv: PathBuf,
    pub model: PathBuf,
}

/// How long a daemon may take from its start to READY=1 (loading the model included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped daemon may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

impl Setup {
    /// `model`: "channel_mean" or "resnet18"; `extra` is appended to the config.
    pub fn new(model: &str, extra: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let models = dir.path().join("models");
        std::fs::create_dir(&models).unwrap();
        let model_path = models.join(format!("{model}.pt"));
        match model {
            "channel_mean" => channel_mean_model(&model_path),
            "resnet18" => resnet18_model(&model_path),
            other => panic!("unknown test model {other}"),
        }
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let config = dir.path().join("labeld.toml");
        let text = format!(
            "[model]\npath = \"models/{model}.pt\"\n\n[[inbox]]\npath = \"inbox\"\nsettle_ms = 200\n\n\
             [output]\ncsv = \"results.csv\"\n\n[workers]\ncount = 1\nthreads = 2\nmax_batch = 8\nmax_delay_ms = 20\n{extra}"
        );
        std::fs::write(&config, text).unwrap();
        Setup { csv: dir.path().join("results.csv"), dir, config, inbox, model: model_path }
    }

    /// Replaces `from` with `to` in the config file; `from` must be there.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains(from), "{from:?} is not in the test config:\n{text}");
        std::fs::write(&self.config, text.replacen(from, to, 1)).unwrap();
    }

    /// Replaces the `[workers]` section's settings.
    pub fn with_workers(self, workers: &str) -> Setup {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let head = text.split("[workers]").next().unwrap().to_string();
        // One worker unless the test says otherwise (the default is two on a multi-core box).
        let count = if workers.contains("count") { "" } else { "count = 1\n" };
        std::fs::write(&self.config, format!("{head}[workers]\n{count}threads = 2\nmax_delay_ms = 20\n{workers}")).unwrap();
        self
    }

    pub fn labeld(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("LABELD_LOG", "info").env_remove("LABELD_CONFIG").env_remove("NOTIFY_SOCKET");
        c
    }

    pub fn run_once(&self) -> std::process::Output {
        self.labeld().args(["run", "--once", "--config"]).arg(&self.config).output().expect("run labeld")
    }

    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(&[])
    }

    /// Starts `labeld run` with extra environment variables and waits until it tells its
    /// `NOTIFY_SOCKET` READY=1 (the model loaded, every inbox watched).
    pub fn spawn_daemon_with(&self, env: &[(&str, &str)]) -> Daemon {
        self.spawn_daemon_then(env, |_| {})
    }

    /// Like `spawn_daemon_with`, calling `started` with the pid before waiting for READY=1 (e.g. to
    /// put the process into a cgroup before it loads the model).
    pub fn spawn_daemon_then(&self, env: &[(&str, &str)], started: impl FnOnce(u32)) -> Daemon {
        let log = self.dir.path().join("daemon.log");
        let notify = Notifications::bind(self.dir.path());
        let child = self
            .labeld()
            .env("NOTIFY_SOCKET", notify.socket())
            .envs(env.iter().copied())
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start labeld");
        started(child.id());
        let mut d = Daemon { child: Some(child), log, notify };
        d.wait_ready();
        d
    }

    pub fn rows(&self) -> Vec<csv::StringRecord> {
        read_csv(&self.csv).1
    }

    /// The rows, or none while the CSV log does not exist yet.
    pub fn rows_so_far(&self) -> Vec<csv::StringRecord> {
        if self.csv.exists() { self.rows() } else { Vec::new() }
    }
}

/// (header, rows); panics if any row fails to parse or has the wrong number of fields.
pub fn read_csv(path: &Path) -> (csv::StringRecord, Vec<csv::StringRecord>) {
    let mut r = csv::Reader::from_path(path).expect("open results.csv");
    let header = r.headers().expect("csv header").clone();
    let rows: Vec<_> = r.records().map(|x| x.expect("every CSV row parses")).collect();
    for row in &rows {
        assert_eq!(row.len(), header.len(), "row has {} fields, header {}: {row:?}", row.len(), header.len());
    }
    (header, rows)
}

/// A running `labeld run`, its log file and what it tells systemd; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    notify: Notifications,
}

impl Daemon {
    /// Waits for READY=1; panics at once if the daemon exits first (a config it rejects).
    fn wait_ready(&mut self) {
        eventually("READY=1 from labeld", START_TIMEOUT, || {
            if let Some(st) = self.exited() {
                panic!("labeld exited ({st}) before READY=1:\n{}", self.log_text());
            }
            self.notify.has_line("READY=1").then_some(()).ok_or_else(|| self.log_text())
        });
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// What the daemon tells systemd, read from its first message on (a handle that outlives the daemon).
    pub fn notifications(&self) -> Notifications {
        self.notify.handle()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `condition` like `eventually`; on a timeout the panic shows the daemon's log too.
    pub fn eventually<F: wait::Fact>(&self, what: &str, timeout: Duration, condition: impl FnMut() -> F) -> F::Value {
        match within(timeout, condition) {
            Ok(v) => v,
            Err(seen) => {
                let seen = seen.map(|s| format!("; last seen: {s}")).unwrap_or_default();
                panic!("{what}: not within {timeout:?}{seen}\ndaemon log:\n{}", self.log_text())
            }
        }
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    /// Waits until `needle` is in the log at least `n` times.
    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        self.eventually(&format!("{needle:?} {n} times in the daemon log"), timeout, || self.count_in_log(needle) >= n);
    }

    /// The address the daemon's HTTP endpoint listens on (from its log).
    pub fn http_addr(&self) -> String {
        self.wait_for_log("HTTP on", Duration::from_secs(30));
        let log = self.log_text();
        let line = log.lines().find(|l| l.contains("HTTP on")).unwrap();
        let at = line.find("addr=").expect("addr= in the HTTP line") + 5;
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    /// The exit status if the daemon has exited, without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits (at most 60 s) for the daemon to exit on its own.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let log = self.log.clone();
        let child = self.child.as_mut().unwrap();
        eventually("labeld exits", STOP_TIMEOUT, || child.try_wait().unwrap().ok_or_else(|| read_log(&log)))
    }

    /// Number of times `needle` appears in the log.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// True while the daemon holds an inotify watch on `dir` (its inode, from /proc/PID/fdinfo).
    pub fn watches(&self, dir: &Path) -> bool {
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir).unwrap());
        let needle = format!(" ino:{ino:x} ");
        let fds = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())).unwrap();
        fds.flatten().any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|t| t.lines().any(|l| l.starts_with("inotify wd:") && l.contains(&needle))))
    }

    pub fn signal(&self, sig: i32) {
        let rc = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(rc.success());
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(15);
        self.wait_exit()
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `image`'s sidecar exists and parses as JSON (what was planted at its name may not),
/// or panics after `timeout` with what is there.
pub fn wait_for_sidecar(image: &Path, timeout: Duration) -> serde_json::Value {
    let side = sidecar(image);
    eventually(format_args!("a sidecar for {}", image.display()), timeout, || match std::fs::read(&side) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes))),
        Err(e) => Err(e.to_string()),
    })
}

pub fn sidecar(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

pub fn read_sidecar(image: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(sidecar(image)).unwrap_or_else(|e| panic!("{}: {e}", image.display())))
        .expect("sidecar is valid JSON")
}

pub fn top1(side: &serde_json::Value) -> (u64, String) {
    let t = &side["top"][0];
    (t["class_id"].as_u64().unwrap(), t["label"].as_str().unwrap().to_string())
}

/// `labeld run` as the unprivileged user nobody (65534, through `setpriv`), logging to its own file;
/// returned once it is ready (READY=1) and its start-up scan is done; killed on drop.
pub struct Nobody {
    child: Child,
    log: PathBuf,
    notify: Notifications,
}

impl Nobody {
    pub fn spawn(s: &Setup) -> Nobody {
        let log = s.dir.path().join("nobody.log");
        let notify = Notifications::bind(s.dir.path());
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "run", "--config"])
            .arg(&s.config)
            .env("LABELD_LOG", "info")
            .env("NOTIFY_SOCKET", notify.socket())
            .env_remove("LABELD_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start labeld under setpriv");
        let n = Nobody { child, log, notify };
        eventually("READY=1 from labeld run as nobody", START_TIMEOUT, || n.notify.has_line("READY=1").then_some(()).ok_or_else(|| n.log_text()));
        eventually("the start-up scan as nobody", START_TIMEOUT, || n.log_text().contains("scan done").then_some(()).ok_or_else(|| n.log_text()));
        n
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 30 s) for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let child = &mut self.child;
        eventually("labeld run as nobody stops", Duration::from_secs(30), || child.try_wait().unwrap())
    }
}

impl Drop for Nobody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rows once their count has not changed for `quiet`: the window in which a row that should not
/// be written (a duplicate, a relabelling) would appear.
pub fn settled_rows(s: &Setup, quiet: Duration) -> Vec<csv::StringRecord> {
    let mut rows = Vec::new();
    settled("the row count to settle", quiet, Duration::from_secs(120), || {
        rows = s.rows_so_far();
        rows.len()
    });
    rows
}
