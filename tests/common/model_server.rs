//! A real Open Inference Protocol server for the remote-inference tests: MLServer 1.7.1 (from
//! scripts/setup-mlserver.sh, in .deps/mlserver) on loopback ports of its own, hosting ONNX copies of
//! the test models through a small onnxruntime runtime (tests/data/remote/onnx_runtime.py). MLServer
//! speaks neither TLS nor tokens: `Gateway` puts a gRPC gateway with both in front of it
//! (tests/data/remote/gateway.py), as a deployment would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::broker::{Tls, free_port};
use super::wait::eventually;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// MLServer imports a lot (FastAPI, gRPC, onnxruntime) and loads the model: on a busy 2-core box,
/// tens of seconds.
const START_TIMEOUT: Duration = Duration::from_secs(120);

fn venv_bin(name: &str) -> PathBuf {
    Path::new(ROOT).join(".deps/mlserver/bin").join(name)
}

/// Runs scripts/setup-mlserver.sh once per test process (a no-op when it is installed).
fn installed() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new(Path::new(ROOT).join("scripts/setup-mlserver.sh")).output().expect("run scripts/setup-mlserver.sh");
        assert!(out.status.success(), "scripts/setup-mlserver.sh: {}", String::from_utf8_lossy(&out.stderr));
    });
}

/// One model as the server hosts it: its name, ONNX file, and the input and output shapes its
/// metadata declares (what labeld checks at start).
pub struct Hosted {
    pub name: String,
    pub onnx: PathBuf,
    pub input: Vec<i64>,
    pub output: Vec<i64>,
}

impl Hosted {
    /// A 224×224 NCHW, 1000-class model, as the test models are.
    pub fn imagenet(name: &str, onnx: &Path) -> Hosted {
        Hosted { name: name.into(), onnx: onnx.to_path_buf(), input: vec![-1, 3, 224, 224], output: vec![-1, 1000] }
    }
}

/// An MLServer process; killed on drop. `kill9`, `pause`/`resume` and `restart` keep its ports.
pub struct ModelServer {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    http_port: u16,
    log: PathBuf,
    models: Vec<String>,
    child: Option<Child>,
}

impl ModelServer {
    /// Writes MLServer's settings and one folder per model, starts it, and returns once every model
    /// answers ready.
    pub fn start(models: &[Hosted]) -> ModelServer {
        installed();
        let dir = tempfile::Builder::new().prefix("mlserver-").tempdir().expect("model server tempdir");
        let (grpc_port, http_port) = (free_port(), free_port());
        // parallel_workers 0: MLServer's worker processes die here ("no current event loop"); one
        // process serves. Metrics off (another port). Messages up to 100 MB (gRPC's default is 4 MB,
        // less than a batch of 8 images).
        let settings = serde_json::json!({
            "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "parallel_workers": 0,
            "metrics_endpoint": null, "grpc_max_message_length": 104857600,
        });
        std::fs::write(dir.path().join("settings.json"), settings.to_string()).unwrap();
        for m in models {
            let folder = dir.path().join(&m.name);
            std::fs::create_dir(&folder).unwrap();
            std::fs::copy(&m.onnx, folder.join("model.onnx")).unwrap_or_else(|e| panic!("copy {}: {e}", m.onnx.display()));
            std::fs::copy(Path::new(ROOT).join("tests/data/remote/onnx_runtime.py"), folder.join("onnx_runtime.py")).unwrap();
            let spec = serde_json::json!({
                "name": m.name, "implementation": "onnx_runtime.OnnxModel", "parameters": {"uri": "./model.onnx"},
                "inputs": [{"name": "input", "datatype": "FP32", "shape": m.input}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": m.output}],
            });
            std::fs::write(folder.join("model-settings.json"), spec.to_string()).unwrap();
        }
        let log = dir.path().join("mlserver.log");
        let mut s = ModelServer { dir, grpc_port, http_port, log, models: models.iter().map(|m| m.name.clone()).collect(), child: None };
        s.restart();
        s
    }

    /// `grpc://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.grpc_port)
    }

    /// Starts the server (again, on the same ports) and waits until every model is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the model server is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(venv_bin("mlserver"))
            .arg("start")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mlserver");
        self.child = Some(child);
        for m in self.models.clone() {
            let url = format!("http://127.0.0.1:{}/v2/models/{m}/ready", self.http_port);
            let log = self.log.clone();
            let child = self.child.as_mut().expect("just started");
            eventually(format_args!("model {m} ready on MLServer (log {})", log.display()), START_TIMEOUT, || {
                if let Some(status) = child.try_wait().ok().flatten() {
                    panic!("mlserver exited ({status}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                }
                ureq::get(&url).call().map(|_| ()).map_err(|e| e.to_string())
            });
        }
    }

    /// SIGKILL: no goodbye to open connections.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("the model server is running").id();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "signal {sig} to mlserver");
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too; continued first so nothing is left half-stopped.
        if self.child.is_some() {
            self.resume();
        }
        self.kill9();
    }
}

/// What the gateway demands.
#[derive(Default)]
pub struct GatewayOptions {
    /// TLS with a server certificate for localhost/127.0.0.1 from a CA made by the test.
    pub tls: bool,
    /// Clients must show a certificate signed by the test CA.
    pub client_cert: bool,
    /// Calls must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// A gRPC gateway on a loopback port of its own in front of a `ModelServer`; killed on drop.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls: Option<Tls>,
    /// With `client_cert`: a client certificate and key signed by the test CA.
    pub client: Option<(PathBuf, PathBuf)>,
    child: Child,
}

impl Gateway {
    pub fn start(server: &ModelServer, opts: GatewayOptions) -> Gateway {
        let dir = tempfile::Builder::new().prefix("gateway-").tempdir().expect("gateway tempdir");
        let port = free_port();
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(Path::new(ROOT).join("tests/data/remote/gateway.py"));
        cmd.args(["--listen", &port.to_string(), "--upstream", &server.grpc_port.to_string()]);
        let tls = opts.tls.then(|| Tls::make(dir.path()));
        let mut client = None;
        if let Some(t) = &tls {
            cmd.arg("--cert").arg(&t.server_cert).arg("--key").arg(&t.server_key);
            if opts.client_cert {
                client = Some(client_certificate(dir.path(), t));
                cmd.arg("--client-ca").arg(&t.ca_cert);
            }
        }
        if let Some(token) = &opts.token {
            let file = dir.path().join("token");
            std::fs::write(&file, token).unwrap();
            cmd.arg("--token-file").arg(file);
        }
        let log = dir.path().join("gateway.log");
        let child = cmd
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("gateway.err")).unwrap())
            .spawn()
            .expect("start the gateway");
        eventually("the gateway listening", START_TIMEOUT, || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("gateway ready")
        });
        Gateway { dir, port, tls, client, child }
    }

    /// `grpcs://localhost:PORT` with TLS, else `grpc://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        if self.tls.is_some() { format!("grpcs://localhost:{}", self.port) } else { format!("grpc://127.0.0.1:{}", self.port) }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client certificate (CN labeld) signed by the test CA, with `openssl`.
fn client_certificate(dir: &Path, tls: &Tls) -> (PathBuf, PathBuf) {
    let (cert, key, csr, ext) = (dir.join("client.crt"), dir.join("client.key"), dir.join("client.csr"), dir.join("client.ext"));
    std::fs::write(&ext, "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n").unwrap();
    let ca_key = tls.ca_cert.with_file_name("ca.key");
    let run = |args: &[&Path]| {
        let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let p = Path::new;
    run(&[p("req"), p("-newkey"), p("ec"), p("-pkeyopt"), p("ec_paramgen_curve:prime256v1"), p("-nodes"), p("-keyout"), &key, p("-out"), &csr, p("-subj"), p("/CN=labeld")]);
    run(&[p("x509"), p("-req"), p("-in"), &csr, p("-CA"), &tls.ca_cert, p("-CAkey"), &ca_key, p("-CAcreateserial"), p("-out"), &cert, p("-days"), p("3"), p("-extfile"), &ext]);
    (cert, key)
}
