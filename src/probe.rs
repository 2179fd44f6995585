//! `labeld probe URL`: one HTTP GET, for a container's health check where there is no curl. Exit 0 on a
//! 2xx answer, 1 on any other answer or none (refused, timed out), 2 for a URL it cannot use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Where to send the GET: an `http://host[:port]/path` URL, the only kind labeld serves.
#[derive(Debug, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs (labeld serves no TLS)"))?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 literal: [::1]:9187
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| format!("{url}: no ']' after the IPv6 address"))?;
                (host, after.strip_prefix(':'))
            }
            None => authority.split_once(':').map_or((authority, None), |(h, p)| (h, Some(p))),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse().map_err(|_| format!("{url}: port {p:?} is not a number 0..=65535"))?,
        };
        Ok(Target { host: host.to_string(), port, path: path.to_string() })
    }
}

/// What the endpoint answered: its status code and body.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Parses an HTTP/1.x response read to its end.
pub fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", status_line.chars().take(80).collect::<String>()))?;
    Ok(Answer { status, body: body.trim().to_string() })
}

/// One GET, as HTTP/1.0 so that the answer is never chunked and ends when the connection closes.
pub fn get(target: &Target, timeout: Duration) -> Result<Answer, String> {
    let addrs: Vec<SocketAddr> =
        (target.host.as_str(), target.port).to_socket_addrs().map_err(|e| format!("cannot resolve {}: {e}", target.host))?.collect();
    let addr = addrs.first().ok_or_else(|| format!("{} resolves to no address", target.host))?;
    let mut stream = TcpStream::connect_timeout(addr, timeout).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("{addr}: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let host = if target.host.contains(':') { format!("[{}]", target.host) } else { target.host.clone() };
    write!(stream, "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nConnection: close\r\n\r\n", target.path, target.port).map_err(io)?;
    // The health endpoints answer a few bytes; the cap keeps a wrong URL from reading a large body.
    let mut raw = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut raw).map_err(io)?;
    parse_answer(&raw)
}

/// The command: prints the body of a 2xx answer to stdout, anything else to stderr.
pub fn run(url: &str, timeout: Duration) -> ExitCode {
    let target = match Target::parse(url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("labeld probe: {e}");
            return ExitCode::from(2);
        }
    };
    match get(&target, timeout) {
        Ok(a) if (200..300).contains(&a.status) => {
            println!("{}", a.body);
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("labeld probe: {url}: {} {}", a.status, a.body);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("labeld probe: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16, path: &str) -> Target {
        Target { host: host.into(), port, path: path.into() }
    }

    #[test]
    fn urls_it_can_use_and_urls_it_cannot() {
        assert_eq!(Target::parse("http://127.0.0.1:9187/healthz"), Ok(t("127.0.0.1", 9187, "/healthz")));
        assert_eq!(Target::parse("http://localhost/readyz"), Ok(t("localhost", 80, "/readyz")));
        assert_eq!(Target::parse("http://[::1]:9187/healthz"), Ok(t("::1", 9187, "/healthz")));
        assert_eq!(Target::parse("http://box:9187"), Ok(t("box", 9187, "/")));
        for bad in ["https://box/healthz", "box:9187/healthz", "http://:9187/", "http://box:99999/", "http://[::1/"] {
            assert!(Target::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn answers_are_read_by_their_status_line() {
        let ok = parse_answer(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!(ok, Answer { status: 200, body: "ok".into() });
        let busy = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\nstarting: model loading\n").unwrap();
        assert_eq!(busy, Answer { status: 503, body: "starting: model loading".into() });
        assert!(parse_answer(b"SSH-2.0-OpenSSH_9.2\r\n").is_err());
        assert!(parse_answer(b"").is_err());
    }
}
