//! A real Mosquitto broker for the MQTT tests, on its own loopback port with its own config,
//! persistence folder and log (never the system's broker on 1883), `mosquitto_sub`/`mosquitto_pub`
//! clients that talk to it, and a `Link` to it that the test can cut. Debian's `mosquitto` and
//! `mosquitto-clients` come from scripts/setup-system.sh.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::wait::{eventually, settled};

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// How long a broker may take to accept connections after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A loopback port nobody listens on right now (the kernel's pick; released at once for the caller).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    l.local_addr().expect("local address of the free port").port()
}

#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    /// A TLS listener with a server certificate for `localhost` and 127.0.0.1 from a CA made by the
    /// test (`Broker::ca_file`); the URL becomes `mqtts://localhost:PORT`.
    pub tls: bool,
    /// Only this user (name, password) may connect (`password_file`, `allow_anonymous false`).
    pub user: Option<(String, String)>,
    /// More lines for mosquitto.conf (limits such as `max_packet_size 1000`).
    pub extra: String,
}

impl BrokerOptions {
    pub fn tls() -> BrokerOptions {
        BrokerOptions { tls: true, ..Default::default() }
    }

    pub fn with_user(mut self, name: &str, password: &str) -> BrokerOptions {
        self.user = Some((name.to_string(), password.to_string()));
        self
    }
}

/// A CA and a server certificate it signed, for CN/SAN `localhost` and IP 127.0.0.1, made with `openssl`.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Tls {
    pub fn make(dir: &Path) -> Tls {
        let tls = Tls { ca_cert: dir.join("ca.crt"), server_cert: dir.join("server.crt"), server_key: dir.join("server.key") };
        let ca_key = dir.join("ca.key");
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        // rustls (webpki) wants v3 certificates: a CA that says so, a leaf with SANs and serverAuth.
        std::fs::write(
            &ext,
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        .expect("write the server certificate's extensions");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(dir, &["req", "-x509"], &ec, &[
            "-keyout", path(&ca_key), "-out", path(&tls.ca_cert), "-days", "3", "-subj", "/CN=labeld test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &["req"], &ec, &["-keyout", path(&tls.server_key), "-out", path(&csr), "-subj", "/CN=localhost"]);
        openssl(dir, &["x509", "-req"], &[], &[
            "-in", path(&csr), "-CA", path(&tls.ca_cert), "-CAkey", path(&ca_key), "-CAcreateserial",
            "-out", path(&tls.server_cert), "-days", "3", "-extfile", path(&ext),
        ]);
        tls
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn append(file: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(file);
    f.unwrap_or_else(|e| panic!("open {}: {e}", file.display()))
}

fn openssl(dir: &Path, cmd: &[&str], key: &[&str], args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(cmd).args(key).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {cmd:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A Mosquitto process on 127.0.0.1:`port` with persistence in its own folder; killed on drop.
/// Created down (`Broker::down`) or running (`Broker::start`); `kill9` and `restart` keep the port and
/// the persisted sessions and messages.
pub struct Broker {
    pub dir: tempfile::TempDir,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    tls: Option<Tls>,
    user: Option<(String, String)>,
    child: Option<Child>,
}

impl Broker {
    /// Writes the config and starts the broker; returns once it accepts connections.
    pub fn start(opts: BrokerOptions) -> Broker {
        let mut b = Broker::down(opts);
        b.restart();
        b
    }

    /// Writes the config and picks the port, without starting the broker (a broker that "appears later").
    pub fn down(opts: BrokerOptions) -> Broker {
        let dir = tempfile::Builder::new().prefix("mosquitto-").tempdir().expect("broker tempdir");
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("broker persistence folder");
        let log = dir.path().join("mosquitto.log");
        let tls = opts.tls.then(|| Tls::make(dir.path()));
        let mut conf = format!(
            "# Written by tests/common/broker.rs.\n\
             listener {port} 127.0.0.1\n\
             persistence true\n\
             persistence_location {data}/\n\
             # Save after every change, so a kill -9 loses as little as possible.\n\
             autosave_interval 1\n\
             autosave_on_changes true\n\
             # A persistent subscriber that falls behind a replay must not lose QoS 1 messages (default: 1000).\n\
             max_queued_messages 1000000\n\
             # Forward each message to subscribers at once, before its PUBACK, instead of queueing it in\n\
             # memory behind 20 in flight: a kill -9 then cannot drop a message the publisher saw acknowledged.\n\
             max_inflight_messages 0\n\
             log_dest file {log}\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n\
             connection_messages true\n",
            data = path(&data),
            log = path(&log),
        );
        // Started as root, Mosquitto would switch to the `mosquitto` user, who cannot write here.
        if unsafe { libc::geteuid() } == 0 {
            conf.push_str("user root\n");
        }
        if let Some(t) = &tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                path(&t.ca_cert),
                path(&t.server_cert),
                path(&t.server_key)
            ));
        }
        match &opts.user {
            Some((name, password)) => {
                let file = dir.path().join("passwords");
                let out = Command::new("mosquitto_passwd")
                    .args(["-b", "-c", path(&file), name, password])
                    .output()
                    .expect("run mosquitto_passwd");
                assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
                conf.push_str(&format!("allow_anonymous false\npassword_file {}\n", path(&file)));
            }
            None => conf.push_str("allow_anonymous true\n"),
        }
        conf.push_str(&opts.extra);
        conf.push('\n');
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        Broker { dir, port, conf: conf_path, log, tls, user: opts.user, child: None }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL labeld's `[mqtt] url` takes: `mqtt://127.0.0.1:PORT`, or `mqtts://localhost:PORT` with TLS.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("mqtts://localhost:{}", self.port),
            None => format!("mqtt://127.0.0.1:{}", self.port),
        }
    }

    /// The CA certificate that signed the server's (with TLS).
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_cert.as_path())
    }

    pub fn user(&self) -> Option<(&str, &str)> {
        self.user.as_ref().map(|(n, p)| (n.as_str(), p.as_str()))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().expect("poll mosquitto").is_none())
    }

    /// The broker's own log (connections, refusals, every packet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for assertion messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until the broker's log contains `needle` (e.g. a client id on "New client connected").
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    /// Waits until `needle` appears at least `n` times in the broker's log.
    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        eventually(format_args!("{needle:?} {n} times in the broker log"), timeout, || {
            (self.count_in_log(needle) >= n).then_some(()).ok_or_else(|| self.log_tail(40))
        });
    }

    /// True if the broker's persistence file (written whole, then renamed into place) holds `payload`:
    /// a message kept for a subscriber or still waiting for its acknowledgement.
    pub fn persists(&self, payload: &str) -> bool {
        let db = std::fs::read(self.dir.path().join("data/mosquitto.db")).unwrap_or_default();
        db.windows(payload.len()).any(|w| w == payload.as_bytes())
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// SIGKILL: no clean disconnects, no wills sent, no final save.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: Mosquitto saves its state and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            eventually("mosquitto stops on SIGTERM", START_TIMEOUT, || c.try_wait().expect("poll mosquitto"));
        }
    }

    /// Starts the broker (kill -9 first if it is running) on the same port with the same persistence,
    /// and returns once it accepts connections.
    pub fn restart(&mut self) {
        self.kill9();
        let stderr = append(&self.dir.path().join("mosquitto.stderr"));
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {MOSQUITTO} (scripts/setup-system.sh installs it): {e}"));
        self.child = Some(child);
        let port = self.port;
        eventually(format_args!("mosquitto accepting connections on {port}"), START_TIMEOUT, || {
            if !self.is_running() {
                let err = std::fs::read_to_string(self.dir.path().join("mosquitto.stderr")).unwrap_or_default();
                panic!("mosquitto exited at start:\n{err}\n{}", self.log_tail(40));
            }
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok().then_some(()).ok_or_else(|| self.log_tail(40))
        });
    }

    /// `mosquitto_sub`/`mosquitto_pub` arguments that reach this broker (host, port, CA, user).
    pub fn client_args(&self) -> Vec<String> {
        let mut a = vec!["-p".to_string(), self.port.to_string()];
        match &self.tls {
            Some(t) => a.extend(["-h".into(), "localhost".into(), "--cafile".into(), path(&t.ca_cert).into()]),
            None => a.extend(["-h".into(), "127.0.0.1".into()]),
        }
        if let Some((name, password)) = &self.user {
            a.extend(["-u".into(), name.clone(), "-P".into(), password.clone()]);
        }
        a
    }

    /// Publishes one message at QoS 1 with `mosquitto_pub` and waits for its PUBACK.
    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let mut c = Command::new("mosquitto_pub");
        c.args(self.client_args()).args(["-q", "1", "-t", topic, "-m", payload]);
        if retain {
            c.arg("-r");
        }
        let out = c.output().expect("run mosquitto_pub");
        assert!(out.status.success(), "mosquitto_pub to {topic}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log_tail(20));
    }

    /// The retained message on `topic`, if there is one (a one-shot `mosquitto_sub --retained-only`).
    pub fn retained(&self, topic: &str) -> Option<String> {
        let out = Command::new("mosquitto_sub")
            .args(self.client_args())
            .args(["-t", topic, "--retained-only", "-C", "1", "-W", "2", "-F", "%p"])
            .output()
            .expect("run mosquitto_sub");
        let text = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string();
        // Exit code 27 is the -W timeout: nothing retained.
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    /// Waits until the retained message on `topic` satisfies `want`, and returns it.
    pub fn wait_retained(&self, topic: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        eventually(format_args!("the awaited retained message on {topic}"), timeout, || match self.retained(topic) {
            Some(m) if want(&m) => Ok(m),
            other => Err(format!("{other:?}\n{}", self.log_tail(40))),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `mosquitto_sub` with a persistent session (`-c -i ID -q 1`) recording "topic<TAB>payload" lines to
/// a file (a topic level may hold a space, e.g. a label). It reconnects by itself after a broker restart, and the broker keeps what arrived meanwhile.
pub struct Subscriber {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Subscriber {
    /// Subscribes to `topic` and returns once the broker has recorded the subscription.
    pub fn start(broker: &Broker, topic: &str, client_id: &str) -> Subscriber {
        // Appended to: a subscriber started again with the same id keeps the earlier messages in its file.
        let out = broker.dir.path().join(format!("sub-{client_id}.txt"));
        let err = broker.dir.path().join(format!("sub-{client_id}.stderr"));
        let suback = format!("Sending SUBACK to {client_id}\n");
        let before = broker.count_in_log(&suback);
        let child = Command::new("mosquitto_sub")
            .args(broker.client_args())
            .args(["-t", topic, "-q", "1", "-c", "-i", client_id, "-F", "%t\\t%p"])
            .stdin(Stdio::null())
            .stdout(append(&out))
            .stderr(append(&err))
            .spawn()
            .expect("run mosquitto_sub");
        broker.wait_for_log_count(&suback, before + 1, START_TIMEOUT);
        Subscriber { child, out, err }
    }

    /// Every message received so far, in order, as (topic, payload); duplicates are kept.
    pub fn messages(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // The last line may be cut mid-write: only complete lines count.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| match l.split_once('\t') {
                Some((t, p)) => (t.to_string(), p.to_string()),
                None => (l.to_string(), String::new()),
            })
            .collect()
    }

    /// Waits until at least `n` messages have arrived, and returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<(String, String)> {
        self.wait_until(timeout, |m| m.len() >= n)
    }

    /// Waits until the messages so far satisfy `done`, and returns them; panics after `timeout`.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
        eventually("the awaited messages", timeout, || {
            let m = self.messages();
            if done(&m) { Ok(m) } else { Err(format!("{} messages; mosquitto_sub said: {}", m.len(), self.stderr())) }
        })
    }

    /// Waits until no message has arrived for `quiet` (at most `timeout`), and returns them all: the
    /// window in which a message that should not come (a duplicate) would arrive.
    pub fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> Vec<(String, String)> {
        let mut m = Vec::new();
        settled("no more messages", quiet, timeout, || {
            m = self.messages();
            m.len()
        });
        m
    }

    /// What mosquitto_sub wrote to stderr (connection errors).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll mosquitto_sub").is_none()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP link to the broker that the test can cut like a network does: no FIN, no RST, bytes just
/// stop arriving (both ways), so only keep-alives can tell. Connect to `url()` instead of the broker's.
pub struct Link {
    port: u16,
    tls: bool,
    cut: Arc<AtomicBool>,
    /// Bumped by `heal`: connections from an earlier epoch lost bytes, so they are closed.
    epoch: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Link {
    pub fn start(broker: &Broker) -> Link {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the link's port");
        let port = listener.local_addr().expect("the link's port").port();
        let link = Link {
            port,
            tls: broker.tls.is_some(),
            cut: Arc::default(),
            epoch: Arc::default(),
            stop: Arc::default(),
        };
        let (target, cut, epoch, stop) = (broker.port, link.cut.clone(), link.epoch.clone(), link.stop.clone());
        std::thread::spawn(move || {
            // Blocks in accept; `drop` wakes it with a connection of its own once `stop` is set.
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else { continue };
                let born = epoch.load(Ordering::Relaxed);
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let (cut, epoch, stop) = (cut.clone(), epoch.clone(), stop.clone());
                    std::thread::spawn(move || pump(from, to, born, &cut, &epoch, &stop));
                }
            }
        });
        link
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's URL through this link.
    pub fn url(&self) -> String {
        match self.tls {
            true => format!("mqtts://localhost:{}", self.port),
            false => format!("mqtt://127.0.0.1:{}", self.port),
        }
    }

    /// From now on nothing gets through, and no connection is closed.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// New connections get through again; the ones that lived through the cut are closed (they lost bytes).
    pub fn heal(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` → `to` until either side closes; while cut, what arrives is dropped.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, born: u64, cut: &AtomicBool, epoch: &AtomicU64, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) || epoch.load(Ordering::Relaxed) != born && !cut.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if !cut.load(Ordering::Relaxed) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
