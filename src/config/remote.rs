//! `[remote]`: label on model servers that speak the Open Inference Protocol (KServe v2 over gRPC:
//! Triton, OpenVINO Model Server, MLServer) instead of this box's CPU. Raw TOML in, a checked
//! `RemoteConfig` out: URLs parsed, the CA, certificate, key and token files read now, so a bad value
//! stops `check-config` and start-up (exit 2 naming the key). `[model]` still gives the crop,
//! normalisation, labels and top_k, and the local model for `fallback = "local"`.
//!
//! Reload: the section is read again on SIGHUP (a new token file's contents too); when it changed, the
//! workers connect anew between batches, as for a new `[model]` file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Secret;
use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    servers: Vec<String>,
    model: String,
    version: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default)]
    fallback: Fallback,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}

/// What labels while no server answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Nothing: images wait (faults, retried with back-off) until a server answers.
    #[default]
    None,
    /// The `[model]` model on this box, until a server answers again.
    Local,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::None => "none",
            Fallback::Local => "local",
        }
    }
}

/// One model server: `grpc://host:port` or `grpcs://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As written, for logs and metrics labels.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// The model servers and how to talk to them, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    pub servers: Vec<Server>,
    /// The model's name on the servers.
    pub model: String,
    /// The model version to ask for (else the server's choice).
    pub version: Option<String>,
    /// PEM bytes of the CA certificate(s) a server's certificate must chain to (else the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for servers that authenticate clients by certificate.
    pub client_auth: Option<(Vec<u8>, Secret)>,
    /// A bearer token sent with every call, and the file it came from (named in the log when refused).
    pub token: Option<(Secret, PathBuf)>,
    /// Per call, from sending it to its answer.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub fallback: Fallback,
}

pub(super) fn from_raw(file: &Path, base: &Path, raw: RawRemote) -> Result<RemoteConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[remote] {key}"), reason);
    if raw.servers.is_empty() {
        return Err(err("servers", "name at least one server, such as [\"grpc://127.0.0.1:8001\"]".into()));
    }
    let mut servers = Vec::new();
    for url in &raw.servers {
        let s = parse_url(url).map_err(|why| err("servers", why))?;
        if servers.iter().any(|o: &Server| o.host == s.host && o.port == s.port) {
            return Err(err("servers", format!("{}:{} is listed twice", s.host, s.port)));
        }
        servers.push(s);
    }
    if raw.model.trim().is_empty() {
        return Err(err("model", "must name the model on the servers".into()));
    }
    if raw.version.as_deref().is_some_and(|v| v.trim().is_empty()) {
        return Err(err("version", "must not be empty (leave it out for the server's choice)".into()));
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
    let client_auth = match (read_pem("cert_file", &raw.cert_file)?, read_pem("key_file", &raw.key_file)?) {
        (Some(c), Some(k)) => Some((c, Secret(String::from_utf8_lossy(&k).into_owned()))),
        (None, None) => None,
        (Some(_), None) => return Err(err("key_file", "cert_file is set: set key_file too".into())),
        (None, Some(_)) => return Err(err("cert_file", "key_file is set: set cert_file too".into())),
    };
    if (ca_pem.is_some() || client_auth.is_some()) && !servers.iter().any(|s| s.tls) {
        return Err(err("servers", "ca_file/cert_file/key_file need TLS: use grpcs:// URLs".into()));
    }
    let token = match &raw.token_file {
        None => None,
        Some(p) => {
            let path = super::absolute(base, p);
            let text = std::fs::read_to_string(&path).map_err(|e| err("token_file", format!("cannot read {}: {e}", path.display())))?;
            // One line: the token; a trailing newline (echo > file) is not part of it.
            let first = text.lines().next().unwrap_or_default().trim().to_string();
            if first.is_empty() {
                return Err(err("token_file", format!("{} is empty", path.display())));
            }
            // It travels as an HTTP/2 header value: visible ASCII only.
            if !first.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err("token_file", format!("{}: the token must be printable ASCII without spaces", path.display())));
            }
            Some((Secret(first), path))
        }
    };
    if !(1..=600_000).contains(&raw.timeout_ms) {
        return Err(err("timeout_ms", format!("must be 1..=600000, got {}", raw.timeout_ms)));
    }
    if !(1..=60_000).contains(&raw.connect_timeout_ms) {
        return Err(err("connect_timeout_ms", format!("must be 1..=60000, got {}", raw.connect_timeout_ms)));
    }
    Ok(RemoteConfig {
        servers,
        model: raw.model,
        version: raw.version,
        ca_pem,
        client_auth,
        token,
        timeout: Duration::from_millis(raw.timeout_ms),
        connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
        fallback: raw.fallback,
    })
}

impl RemoteConfig {
    /// The `[remote]` section as `check-config` prints it (secrets not shown).
    pub fn describe(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let servers: Vec<String> = self.servers.iter().map(|s| q(&s.url)).collect();
        let mut s = format!(
            "[remote]\nservers = [{}]\nmodel = {}\ntimeout_ms = {}\nconnect_timeout_ms = {}\nfallback = {}\n",
            servers.join(", "),
            q(&self.model),
            self.timeout.as_millis(),
            self.connect_timeout.as_millis(),
            q(self.fallback.as_str()),
        );
        if let Some(v) = &self.version {
            s += &format!("version = {}\n", q(v));
        }
        if let Some((_, path)) = &self.token {
            s += &format!("token_file = {}\n", q(&path.display().to_string()));
        }
        if self.ca_pem.is_some() {
            s += "ca_file = \"(read)\"\n";
        }
        if self.client_auth.is_some() {
            s += "cert_file = \"(read)\"\nkey_file = \"(read, not shown)\"\n";
        }
        s
    }

    /// The model as rows and sidecars name it when a server labelled: `model` or `model@version`.
    pub fn model_name(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.model),
            None => self.model.clone(),
        }
    }
}

/// `grpc://host:port` or `grpcs://host[:port]` (443 by default) → a `Server`.
fn parse_url(url: &str) -> Result<Server, String> {
    let example = "such as \"grpc://10.0.0.5:8001\" or \"grpcs://models.plant.local:443\"";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("\"{url}\" is not a server URL {example}"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "grpc" => false,
        "grpcs" => true,
        other => return Err(format!("scheme \"{other}\" is not grpc:// or grpcs:// ({example}); labeld speaks the protocol's gRPC API")),
    };
    let shape = "a server URL is scheme://host:port";
    let (host, port) = super::url::host_port(url, rest, shape, example, "set token_file")?;
    let port = match port {
        Some(p) => p,
        None if tls => 443,
        None => return Err(format!("\"{url}\" names no port; gRPC servers have no usual one ({example})")),
    };
    Ok(Server { url: url.to_string(), tls, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{MINIMAL, setup};

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let s = parse_url("grpc://127.0.0.1:8001").unwrap();
        assert_eq!((s.tls, s.host.as_str(), s.port), (false, "127.0.0.1", 8001));
        let s = parse_url("grpcs://[::1]").unwrap();
        assert_eq!((s.tls, s.host.as_str(), s.port), (true, "::1", 443));
        for bad in ["127.0.0.1:8001", "http://h:80", "grpc://h", "grpc://:1", "grpc://h:0", "grpc://u:p@h:1", "grpc://h:1/v2"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_section_is_checked_and_reads_back_without_its_secrets() {
        let (dir, file) = setup();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let text = format!(
            "{MINIMAL}[remote]\nservers = [\"grpc://127.0.0.1:8001\", \"grpc://10.0.0.2:8001\"]\nmodel = \"lite0\"\nversion = \"2\"\ntoken_file = \"token\"\nfallback = \"local\"\n"
        );
        let c = Config::parse(&file, &text).unwrap();
        let r = c.remote.as_ref().unwrap();
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.token.as_ref().unwrap().0, Secret("s3cret".into()));
        assert_eq!((r.fallback, r.timeout, r.model_name().as_str()), (Fallback::Local, Duration::from_secs(10), "lite0@2"));
        let described = c.describe();
        assert!(!described.contains("s3cret"), "{described}");
        let again = Config::parse(&file, &described).unwrap();
        assert_eq!(again.remote, c.remote);

        for (bad, key) in [
            ("servers = []\nmodel = \"m\"\n", "[remote] servers"),
            ("servers = [\"grpc://h:1\", \"grpc://h:1\"]\nmodel = \"m\"\n", "[remote] servers"),
            ("servers = [\"grpc://h:1\"]\nmodel = \"\"\n", "[remote] model"),
            ("servers = [\"grpc://h:1\"]\nmodel = \"m\"\ntoken_file = \"nope\"\n", "[remote] token_file"),
            ("servers = [\"grpc://h:1\"]\nmodel = \"m\"\nca_file = \"token\"\n", "[remote] ca_file"),
            ("servers = [\"grpc://h:1\"]\nmodel = \"m\"\ntimeout_ms = 0\n", "[remote] timeout_ms"),
        ] {
            let e = Config::parse(&file, &format!("{MINIMAL}[remote]\n{bad}")).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
        let e = Config::parse(&file, &format!("{MINIMAL}[remote]\nservers = [\"grpc://h:1\"]\nmodel = \"m\"\nfallback = \"gpu\"\n")).unwrap_err();
        assert!(e.to_string().contains("fallback") || e.reason.contains("unknown variant"), "{e}");
    }
}
