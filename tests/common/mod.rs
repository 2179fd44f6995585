//! Shared helpers for the integration tests: TorchScript test models built in Rust (no Python),
//! test images, a config writer and a handle on the real `labeld` binary; `broker`: a real Mosquitto.
#![allow(dead_code)]

pub mod broker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tch::nn::{self, Module, ModuleT};
use tch::{CModule, Device, Kind, Tensor};

pub const BIN: &str = env!("CARGO_BIN_EXE_labeld");

/// A 1000-class model whose logits are 10 × the per-channel mean of the normalized input in classes
/// 0, 1, 2 (and 0 elsewhere): a red image is class 0 ("tench"), green is 1 ("goldfish"), blue is 2
/// ("great white shark"). Accepts any batch size.
pub fn channel_mean_model(path: &Path) {
    channel_mean_model_to(path, [0, 1, 2]);
}

/// Like `channel_mean_model`, with the red, green and blue means going to `classes`.
pub fn channel_mean_model_to(path: &Path, classes: [usize; 3]) {
    let mut w = vec![0f32; 3 * 1000];
    for c in 0..3 {
        w[c * 1000 + classes[c]] = 10.0;
    }
    let weight = Tensor::from_slice(&w).view([3, 1000]);
    let example = Tensor::zeros([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let m = CModule::create_by_tracing("ChannelMean", "forward", &[example], &mut |xs| {
        vec![xs[0].mean_dim([2i64, 3].as_slice(), false, Kind::Float).matmul(&weight)]
    })
    .expect("trace channel-mean model");
    m.save(path).expect("save channel-mean model");
}

/// ResNet-18 (torchvision layout, random weights) with a batch-size-independent head, traced.
pub fn resnet18_model(path: &Path) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root());
    vs.freeze();
    let example = Tensor::zeros([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let m = CModule::create_by_tracing("ResNet18", "forward", &[example], &mut |xs| vec![net.forward_t(&xs[0], false)])
        .expect("trace resnet18");
    m.save(path).expect("save resnet18");
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding, bias: false, ..Default::default() })
}

fn block(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    let conv1 = conv(&p / "conv1", c_in, c_out, 3, 1, stride);
    let bn1 = nn::batch_norm2d(&p / "bn1", c_out, Default::default());
    let conv2 = conv(&p / "conv2", c_out, c_out, 3, 1, 1);
    let bn2 = nn::batch_norm2d(&p / "bn2", c_out, Default::default());
    let down = (stride != 1 || c_in != c_out).then(|| {
        (conv(&p / "downsample" / "0", c_in, c_out, 1, 0, stride), nn::batch_norm2d(&p / "downsample" / "1", c_out, Default::default()))
    });
    nn::func_t(move |xs, train| {
        let ys = xs.apply(&conv1).apply_t(&bn1, train).relu().apply(&conv2).apply_t(&bn2, train);
        let skip = match &down {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        (skip + ys).relu()
    })
}

fn layer(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    nn::seq_t().add(block(&p / "0", c_in, c_out, stride)).add(block(&p / "1", c_out, c_out, 1))
}

fn resnet18(p: &nn::Path) -> impl ModuleT + use<> {
    let conv1 = conv(p / "conv1", 3, 64, 7, 3, 2);
    let bn1 = nn::batch_norm2d(p / "bn1", 64, Default::default());
    let (l1, l2, l3, l4) =
        (layer(p / "layer1", 64, 64, 1), layer(p / "layer2", 64, 128, 2), layer(p / "layer3", 128, 256, 2), layer(p / "layer4", 256, 512, 2));
    let fc = nn::linear(p / "fc", 512, 1000, Default::default());
    nn::func_t(move |xs, train| {
        let x = xs
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
            .apply_t(&l1, train)
            .apply_t(&l2, train)
            .apply_t(&l3, train)
            .apply_t(&l4, train)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1);
        fc.forward(&x)
    })
}

/// A solid-colour RGB image written in the format its extension names.
/// A channel-mean model (red → class 0, green → 1, blue → 2) scripted with Debian's PyTorch, for
/// behaviour a trace cannot capture: its `forward` first runs `prelude` (TorchScript, indented 8 spaces;
/// `x` is the input batch, `self.calls` counts forward calls, the load-time checks included).
pub fn scripted_channel_mean(path: &Path, prelude: &str) {
    let script = format!(
        r#"
import sys, torch
class Scripted(torch.nn.Module):
    calls: int
    def __init__(self):
        super().__init__()
        w = torch.zeros(3, 1000)
        for c in range(3):
            w[c, c] = 10.0
        self.register_buffer("w", w)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
{prelude}
        return x.mean([2, 3]) @ self.w
torch.jit.script(Scripted()).save(sys.argv[1])
"#
    );
    // TorchScript reads the class's source, so the script must be a file.
    let py = path.with_extension("py");
    std::fs::write(&py, script).unwrap();
    let out = Command::new("/usr/bin/python3").arg(&py).arg(path).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "cannot script the model: {}", String::from_utf8_lossy(&out.stderr));
}

/// A channel-mean model whose forward pass never returns for a bright image (mean of the normalized
/// input above 1.5, e.g. white): a hung worker.
pub fn hanging_model(path: &Path) {
    scripted_channel_mean(path, "        m = x.mean()\n        while bool(m > 1.5):\n            m = m * 1.0");
}

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
        c.env("LABELD_LOG", "info").env_remove("LABELD_CONFIG");
        c
    }

    pub fn run_once(&self) -> std::process::Output {
        self.labeld().args(["run", "--once", "--config"]).arg(&self.config).output().expect("run labeld")
    }

    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(&[])
    }

    /// Starts `labeld run` with extra environment variables and waits for "ready".
    pub fn spawn_daemon_with(&self, env: &[(&str, &str)]) -> Daemon {
        self.spawn_daemon_then(env, |_| {})
    }

    /// Like `spawn_daemon_with`, calling `started` with the pid before waiting for "ready" (e.g. to
    /// put the process into a cgroup before it loads the model).
    pub fn spawn_daemon_then(&self, env: &[(&str, &str)], started: impl FnOnce(u32)) -> Daemon {
        let log = self.dir.path().join("daemon.log");
        let child = self
            .labeld()
            .envs(env.iter().copied())
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start labeld");
        started(child.id());
        let mut d = Daemon { child: Some(child), log };
        // A daemon that exits at start (a config it rejects) fails the test at once, not after 60 s.
        let t = Instant::now();
        while !d.log_text().contains("ready") {
            if let Some(st) = d.exited() {
                panic!("labeld exited ({st}) before \"ready\":\n{}", d.log_text());
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no \"ready\" in the daemon log after 60 s:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn rows(&self) -> Vec<csv::StringRecord> {
        read_csv(&self.csv).1
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

pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let t = Instant::now();
        while !self.log_text().contains(needle) {
            assert!(t.elapsed() < timeout, "no {needle:?} in the daemon log after {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let t = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "labeld did not exit:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of times `needle` appears in the log.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn signal(&self, sig: i32) {
        let rc = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(rc.success());
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(15);
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "labeld did not stop within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `path` exists (and parses as a sidecar), or panics after `timeout`.
pub fn wait_for_sidecar(image: &Path, timeout: Duration) -> serde_json::Value {
    let side = sidecar(image);
    let t = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&side) {
            return serde_json::from_slice(&bytes).expect("sidecar is valid JSON");
        }
        assert!(t.elapsed() < timeout, "no sidecar for {} after {timeout:?}", image.display());
        std::thread::sleep(Duration::from_millis(20));
    }
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
/// started once its start-up scan is done, killed on drop.
pub struct Nobody {
    child: Child,
    log: PathBuf,
}

impl Nobody {
    pub fn spawn(s: &Setup) -> Nobody {
        let log = s.dir.path().join("nobody.log");
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "run", "--config"])
            .arg(&s.config)
            .env("LABELD_LOG", "info")
            .env_remove("LABELD_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start labeld under setpriv");
        let n = Nobody { child, log };
        let t = Instant::now();
        while !n.log_text().contains("scan done") {
            assert!(t.elapsed() < Duration::from_secs(60), "no \"scan done\" as nobody:\n{}", n.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 30 s) for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "labeld did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nobody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the row count has not changed for `quiet`, and returns the rows.
pub fn settled_rows(s: &Setup, quiet: Duration) -> Vec<csv::StringRecord> {
    let (mut n, mut since) = (usize::MAX, Instant::now());
    loop {
        let rows = if s.csv.exists() { s.rows() } else { Vec::new() };
        if rows.len() != n {
            (n, since) = (rows.len(), Instant::now());
        } else if since.elapsed() >= quiet {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
