//! `[http]`: the endpoint for metrics, health, `POST /predict` and the status page. Off when absent.
//! On reload: at the next restart.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: String,
    token: Option<String>,
    #[serde(default = "default_max_body_mb")]
    max_body_mb: u64,
    #[serde(default = "default_max_uploads")]
    max_uploads: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_header_timeout_s")]
    header_timeout_s: u64,
    #[serde(default = "default_body_timeout_s")]
    body_timeout_s: u64,
}

fn default_max_body_mb() -> u64 {
    32
}
fn default_max_uploads() -> usize {
    8
}
fn default_max_connections() -> usize {
    256
}
fn default_header_timeout_s() -> u64 {
    10
}
fn default_body_timeout_s() -> u64 {
    30
}

/// The optional HTTP endpoint: metrics, health, /predict and the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: std::net::SocketAddr,
    /// Bearer token every request except /healthz and /readyz must carry. Required off loopback.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// `POST /predict` requests being read or labelled at once; more are answered 503 unread.
    pub max_uploads: usize,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request's headers (or the next one on a kept-alive connection) must arrive within this.
    pub header_timeout: Duration,
    /// An upload's whole body must arrive within this, else 408.
    pub body_timeout: Duration,
}

impl HttpConfig {
    pub fn describe(&self) -> String {
        let mut s = format!(
            "[http]\nlisten = \"{}\"\nmax_body_mb = {}\nmax_uploads = {}\nmax_connections = {}\nheader_timeout_s = {}\nbody_timeout_s = {}\n",
            self.listen,
            self.max_body_bytes / (1024 * 1024),
            self.max_uploads,
            self.max_connections,
            self.header_timeout.as_secs(),
            self.body_timeout.as_secs()
        );
        if self.token.is_some() {
            s += "token = \"(set, not shown)\"\n";
        }
        s
    }
}

pub(super) fn from_raw(file: &Path, h: RawHttp) -> Result<HttpConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, format!("[http] {key}"), reason);
    let listen: std::net::SocketAddr =
        h.listen.parse().map_err(|_| err("listen", format!("\"{}\" is not an address:port such as \"127.0.0.1:9187\"", h.listen)))?;
    let token = h.token.filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(err(
            "token",
            format!("{listen} is reachable from other machines: set token = \"...\" (clients send Authorization: Bearer ...) or listen on 127.0.0.1"),
        ));
    }
    if h.max_body_mb == 0 || h.max_body_mb > 1024 {
        return Err(err("max_body_mb", format!("must be 1..=1024, got {}", h.max_body_mb)));
    }
    let within = |key: &str, v: u64, max: u64| if (1..=max).contains(&v) { Ok(v) } else { Err(err(key, format!("must be 1..={max}, got {v}"))) };
    Ok(HttpConfig {
        listen,
        token,
        max_body_bytes: (h.max_body_mb * 1024 * 1024) as usize,
        max_uploads: within("max_uploads", h.max_uploads as u64, 1024)? as usize,
        max_connections: within("max_connections", h.max_connections as u64, 65536)? as usize,
        header_timeout: Duration::from_secs(within("header_timeout_s", h.header_timeout_s, 3600)?),
        body_timeout: Duration::from_secs(within("body_timeout_s", h.body_timeout_s, 3600)?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, setup};
    use super::super::*;
    use std::time::Duration;

    #[test]
    fn http_off_loopback_needs_a_token() {
        let (_dir, file) = setup();
        let c = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"127.0.0.1:9187\"\n")).unwrap();
        assert_eq!(c.http.unwrap().listen.port(), 9187);
        let e = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"0.0.0.0:9187\"\n")).unwrap_err();
        assert_eq!(e.key, "[http] token");
        let c = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"0.0.0.0:9187\"\ntoken = \"s3cret\"\n")).unwrap();
        assert_eq!(c.http.unwrap().token.as_deref(), Some("s3cret"));
        let e = Config::parse(&file, &format!("{MINIMAL}[http]\nlisten = \"localhost\"\n")).unwrap_err();
        assert_eq!(e.key, "[http] listen");
    }

    #[test]
    fn http_limits_have_defaults_and_are_checked() {
        let (_dir, file) = setup();
        let http = "[http]\nlisten = \"127.0.0.1:0\"\n";
        let h = Config::parse(&file, &format!("{MINIMAL}{http}")).unwrap().http.unwrap();
        assert_eq!((h.max_uploads, h.max_connections), (8, 256));
        assert_eq!((h.header_timeout, h.body_timeout), (Duration::from_secs(10), Duration::from_secs(30)));
        let shown = Config::parse(&file, &format!("{MINIMAL}{http}")).unwrap().describe();
        assert!(shown.contains("max_uploads = 8\nmax_connections = 256\nheader_timeout_s = 10\nbody_timeout_s = 30\n"), "{shown}");
        for (key, bad) in [("max_uploads", 0), ("max_connections", 0), ("header_timeout_s", 0), ("body_timeout_s", 3601)] {
            let e = Config::parse(&file, &format!("{MINIMAL}{http}{key} = {bad}\n")).unwrap_err();
            assert_eq!(e.key, format!("[http] {key}"));
            assert!(e.reason.contains(&format!("got {bad}")), "{e}");
        }
        let h = Config::parse(&file, &format!("{MINIMAL}{http}max_uploads = 2\nbody_timeout_s = 1\n")).unwrap().http.unwrap();
        assert_eq!((h.max_uploads, h.body_timeout), (2, Duration::from_secs(1)));
    }
}
