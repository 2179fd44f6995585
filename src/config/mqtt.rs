//! `[mqtt]`: where results are published. Raw TOML in, a checked `MqttConfig` out: the URL parsed, the
//! topic template checked, the password, CA, certificate and key files read now, so that a bad value
//! stops `check-config` and start-up (exit 2 naming the key) instead of failing at the first connect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    url: String,
    client_id: Option<String>,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_status_topic")]
    status_topic: String,
    #[serde(default = "default_qos")]
    qos: u8,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive_s")]
    keep_alive_s: u64,
    host: Option<String>,
    checkpoint: Option<PathBuf>,
    #[serde(default = "default_max_inflight")]
    max_inflight: u16,
    #[serde(default = "default_max_message_kb")]
    max_message_kb: usize,
}

fn default_topic() -> String {
    "labeld/{host}/{inbox}/result".into()
}
fn default_status_topic() -> String {
    "labeld/{host}/status".into()
}
fn default_qos() -> u8 {
    1
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_max_inflight() -> u16 {
    100
}
fn default_max_message_kb() -> usize {
    256
}

/// A value that must not appear in logs or `check-config` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(secret)")
    }
}

/// The broker connection, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// As written, for logs and the status page (never carries a password: those come from a file).
    pub url: String,
    pub tls: bool,
    pub broker_host: String,
    pub port: u16,
    pub client_id: String,
    /// Result topic template: `{host}`, `{inbox}`, `{status}`, `{label}`.
    pub topic: String,
    /// Presence topic template (`{host}`): retained online/offline.
    pub status_topic: String,
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM bytes of the CA certificate(s) the broker's certificate must chain to (else the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for brokers that authenticate clients by certificate.
    pub client_auth: Option<(Vec<u8>, Secret)>,
    pub keep_alive: Duration,
    /// This box's name in topics and payloads.
    pub host: String,
    /// Where the publish position in the results log is kept.
    pub checkpoint: PathBuf,
    /// Messages sent and not yet acknowledged, at most.
    pub max_inflight: u16,
    /// A result whose topic + payload is larger is not published (logged, counted): for brokers with a
    /// packet size limit, which drop the connection rather than refuse one message.
    pub max_message_kb: usize,
}

/// Placeholders a result topic may use.
pub const TOPIC_PLACEHOLDERS: [&str; 4] = ["{host}", "{inbox}", "{status}", "{label}"];

pub(super) fn from_raw(file: &Path, base: &Path, raw: RawMqtt, csv: &Path) -> Result<MqttConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[mqtt] {key}"), reason);
    let (tls, broker_host, port) = parse_url(&raw.url).map_err(|why| err("url", why))?;
    let host = match raw.host {
        Some(h) if h.trim().is_empty() => return Err(err("host", "must not be empty".into())),
        Some(h) => h,
        None => hostname(),
    };
    if let Some(bad) = topic_level_breaker(&host) {
        return Err(err("host", format!("\"{host}\" contains {bad}, which would change the topic's levels")));
    }
    check_template(&raw.topic, &TOPIC_PLACEHOLDERS).map_err(|why| err("topic", why))?;
    check_template(&raw.status_topic, &["{host}"]).map_err(|why| err("status_topic", why))?;
    if raw.qos > 2 {
        return Err(err("qos", format!("must be 0, 1 or 2, got {}", raw.qos)));
    }
    let client_id = match raw.client_id {
        Some(id) if id.is_empty() || id.len() > 256 => return Err(err("client_id", "must be 1 to 256 bytes".into())),
        Some(id) => id,
        None => format!("labeld-{host}"),
    };
    let password = match &raw.password_file {
        None => None,
        Some(p) => {
            let path = super::absolute(base, p);
            let text = std::fs::read_to_string(&path).map_err(|e| err("password_file", format!("cannot read {}: {e}", path.display())))?;
            // One line: the password; a trailing newline (echo > file) is not part of it.
            let first = text.lines().next().unwrap_or_default().to_string();
            if first.is_empty() {
                return Err(err("password_file", format!("{} is empty", path.display())));
            }
            Some(Secret(first))
        }
    };
    if password.is_some() && raw.username.is_none() {
        return Err(err("username", "password_file is set: set username too".into()));
    }
    let read_pem = |key: &str, p: &Option<PathBuf>| -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(p) = p else { return Ok(None) };
        let path = super::absolute(base, p);
        let bytes = std::fs::read(&path).map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(err(key, format!("{} is not a PEM file (no -----BEGIN line)", path.display())));
        }
        Ok(Some(bytes))
    };
    let ca_pem = read_pem("ca_file", &raw.ca_file)?;
    let cert = read_pem("cert_file", &raw.cert_file)?;
    let key = read_pem("key_file", &raw.key_file)?;
    let client_auth = match (cert, key) {
        (Some(c), Some(k)) => Some((c, Secret(String::from_utf8_lossy(&k).into_owned()))),
        (None, None) => None,
        (Some(_), None) => return Err(err("key_file", "cert_file is set: set key_file too".into())),
        (None, Some(_)) => return Err(err("cert_file", "key_file is set: set cert_file too".into())),
    };
    if !tls && (ca_pem.is_some() || client_auth.is_some()) {
        return Err(err("url", format!("ca_file/cert_file/key_file need TLS: use mqtts://{broker_host}:{port}")));
    }
    if !(1..=3600).contains(&raw.keep_alive_s) {
        return Err(err("keep_alive_s", format!("must be 1..=3600, got {}", raw.keep_alive_s)));
    }
    if !(1..=1024).contains(&raw.max_message_kb) {
        return Err(err("max_message_kb", format!("must be 1..=1024, got {}", raw.max_message_kb)));
    }
    if !(1..=1000).contains(&raw.max_inflight) {
        return Err(err("max_inflight", format!("must be 1..=1000, got {}", raw.max_inflight)));
    }
    let checkpoint = match raw.checkpoint {
        Some(p) => super::absolute(base, &p),
        None => {
            let mut name = csv.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            name.push(".mqtt-offset");
            csv.with_file_name(name)
        }
    };
    if checkpoint == csv || checkpoint.is_dir() {
        return Err(err("checkpoint", format!("{} must be a file of its own", checkpoint.display())));
    }
    Ok(MqttConfig {
        url: raw.url,
        tls,
        broker_host,
        port,
        client_id,
        topic: raw.topic,
        status_topic: raw.status_topic,
        qos: raw.qos,
        username: raw.username,
        password,
        ca_pem,
        client_auth,
        keep_alive: Duration::from_secs(raw.keep_alive_s),
        host,
        checkpoint,
        max_inflight: raw.max_inflight,
        max_message_kb: raw.max_message_kb,
    })
}

impl MqttConfig {
    /// The `[mqtt]` section as `check-config` prints it (secrets not shown).
    pub fn describe(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut s = format!(
            "[mqtt]\nurl = {}\nclient_id = {}\nhost = {}\ntopic = {}\nstatus_topic = {}\nqos = {}\nkeep_alive_s = {}\nmax_inflight = {}\nmax_message_kb = {}\ncheckpoint = {}\n",
            q(&self.url),
            q(&self.client_id),
            q(&self.host),
            q(&self.topic),
            q(&self.status_topic),
            self.qos,
            self.keep_alive.as_secs(),
            self.max_inflight,
            self.max_message_kb,
            q(&self.checkpoint.display().to_string()),
        );
        if let Some(u) = &self.username {
            s += &format!("username = {}\npassword_file = \"(read, not shown)\"\n", q(u));
        }
        if self.ca_pem.is_some() {
            s += "ca_file = \"(read)\"\n";
        }
        if self.client_auth.is_some() {
            s += "cert_file = \"(read)\"\nkey_file = \"(read, not shown)\"\n";
        }
        s
    }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` (also `tcp://`, `ssl://`) → (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let example = "such as \"mqtt://broker.local:1883\" or \"mqtts://broker.local:8883\"";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("\"{url}\" is not a broker URL {example}"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(format!("scheme \"{other}\" is not mqtt:// or mqtts:// ({example})")),
    };
    let shape = "a broker URL is scheme://host[:port]";
    let (host, port) = super::url::host_port(url, rest, shape, example, "set username and password_file")?;
    let port = port.unwrap_or(if tls { 8883 } else { 1883 });
    Ok((tls, host, port))
}

/// A topic template may only use the listed placeholders and no MQTT wildcards.
fn check_template(template: &str, allowed: &[&str]) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = template;
    let mut literal = String::new();
    while let Some(open) = rest.find('{') {
        literal.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("\"{template}\": unclosed {{"))? + open;
        let name = &rest[open..=close];
        if !allowed.contains(&name) {
            return Err(format!("\"{template}\": unknown placeholder {name} (known: {})", allowed.join(", ")));
        }
        rest = &rest[close + 1..];
    }
    literal.push_str(rest);
    if literal.contains(['+', '#', '\0']) {
        return Err(format!("\"{template}\": + and # are subscription wildcards, not allowed in a topic one publishes to"));
    }
    if template.starts_with('$') {
        return Err(format!("\"{template}\": topics starting with $ belong to the broker ($SYS…); it would acknowledge and drop what labeld publishes there"));
    }
    if literal.contains('}') {
        return Err(format!("\"{template}\": stray }}"));
    }
    Ok(())
}

/// What in a placeholder value would add topic levels or wildcards.
pub fn topic_level_breaker(value: &str) -> Option<&'static str> {
    if value.contains('/') {
        Some("'/'")
    } else if value.contains(['+', '#']) {
        Some("an MQTT wildcard (+ or #)")
    } else if value.contains('\0') {
        Some("a NUL byte")
    } else {
        None
    }
}

/// The machine's host name (`labeld-<hostname>` client id, `{host}`), "localhost" if it has none.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = if rc == 0 { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    let name = name.replace(['/', '+', '#'], "_");
    if name.is_empty() { "localhost".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(parse_url("mqtt://broker.local").unwrap(), (false, "broker.local".into(), 1883));
        assert_eq!(parse_url("mqtts://broker.local").unwrap(), (true, "broker.local".into(), 8883));
        assert_eq!(parse_url("mqtt://10.0.0.5:1884/").unwrap(), (false, "10.0.0.5".into(), 1884));
        assert_eq!(parse_url("mqtts://[::1]:8884").unwrap(), (true, "::1".into(), 8884));
        for bad in ["broker:1883", "http://b:1883", "mqtt://", "mqtt://b:0", "mqtt://b:99999", "mqtt://u:p@b", "mqtt://b/x"] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn templates_take_known_placeholders_and_no_wildcards() {
        assert!(check_template("labeld/{host}/{inbox}/result", &TOPIC_PLACEHOLDERS).is_ok());
        assert!(check_template("plant/{host}/{status}/{label}", &TOPIC_PLACEHOLDERS).is_ok());
        assert!(check_template("labeld/{hots}/x", &TOPIC_PLACEHOLDERS).unwrap_err().contains("{hots}"));
        assert!(check_template("labeld/+/x", &TOPIC_PLACEHOLDERS).is_err());
        assert!(check_template("labeld/#", &TOPIC_PLACEHOLDERS).is_err());
        assert!(check_template("labeld/{host", &TOPIC_PLACEHOLDERS).is_err());
        assert!(check_template("labeld/{inbox}/status", &["{host}"]).is_err());
        assert!(check_template("", &TOPIC_PLACEHOLDERS).is_err());
        assert!(check_template("$SYS/{host}", &TOPIC_PLACEHOLDERS).is_err());
    }
}
