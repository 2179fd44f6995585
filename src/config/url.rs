//! The host and port of a server URL's authority, for `[mqtt] url` and `[remote] servers`.

/// The part of `url` after `scheme://` (`rest`) as (host, port if given): one trailing slash allowed; IPv6
/// addresses in brackets; credentials (`credentials` says where they belong instead), paths and queries
/// refused. `shape` is what such a URL looks like, `example` a sentence naming two.
pub(super) fn host_port(url: &str, rest: &str, shape: &str, example: &str, credentials: &str) -> Result<(String, Option<u16>), String> {
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(format!("credentials do not belong in the URL: {credentials}"));
    }
    if authority.contains('/') || authority.contains('?') {
        return Err(format!("\"{url}\" has a path; {shape} ({example})"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("\"{url}\": unclosed [ in an IPv6 address"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("\"{url}\" names no host ({example})"));
    }
    let port = port
        .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("\"{p}\" is not a port number (1..=65535)")))
        .transpose()?;
    Ok((host, port))
}
