//! The rules that keep web pages from driving the engine (issue 21).
//!
//! Owns: [`BrowserGuard`], checked on the request head of every HTTP route
//! (by the middleware, and at the `Expect: 100-continue` gate) before any
//! handler runs:
//!
//! - a request carrying an `Origin` header that is not in
//!   `server.allowed_origins` is refused. Browsers send `Origin` on every
//!   cross-origin request a page makes with `fetch` or a form, including
//!   `mode: 'no-cors'` ones and bodiless POSTs, none of which need a CORS
//!   preflight;
//! - `Sec-Fetch-Site: cross-site` without a listed `Origin` is refused: it
//!   covers what a page makes without `Origin` (an image or script tag
//!   loading a GET route);
//! - when the server is bound to a loopback address, a `Host` that is not a
//!   loopback name or address (`localhost`, `127.x.x.x`, `[::1]`, any port)
//!   nor in `server.allowed_hosts` is refused: a DNS-rebinding page (its
//!   own name re-resolved to 127.0.0.1) sends its own name as `Host`, and
//!   as a same-origin request it carries neither of the headers above. The
//!   Unix socket (`server.unix_socket`) is checked the same way: no browser
//!   can reach it, but its callers are on this host like a loopback
//!   bind's, and `curl --unix-socket` sends `Host: localhost`. On
//!   other binds the rule is off: a pod's probes and Services send the pod
//!   IP or a Service name, and no browser shares the pod's loopback.
//!
//! Clients that are not browsers (tritonclient, curl, Prometheus, the
//! kubelet) send no `Origin` and a loopback or pod `Host`, so nothing
//! changes for them. A refusal is [`HttpError::Forbidden`] (403 JSON).
//! No CORS headers are ever sent, so a page on a listed origin may send
//! requests but cannot read the answers or send `application/json` ones
//! (those need a preflight, which is not answered). Must not touch: what a
//! route does; other head checks (`extract.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use actix_web::http::header::{self, HeaderMap};

use crate::config::Config;
use crate::http::error::HttpError;

/// `Sec-Fetch-Site`, sent by current browsers on every request.
const SEC_FETCH_SITE: &str = "sec-fetch-site";
/// Most characters of a refused header quoted back.
const MAX_QUOTED: usize = 100;

/// The allow-lists and whether `Host` is checked (loopback binds only).
#[derive(Debug, Clone)]
pub struct BrowserGuard {
    /// ASCII-lowercased, as browsers serialize origins.
    allowed_origins: Vec<String>,
    /// ASCII-lowercased host names, no port.
    allowed_hosts: Vec<String>,
    check_host: bool,
}

impl BrowserGuard {
    /// The guard for a server bound to `local` with `config`'s lists.
    pub fn new(config: &Config, local: SocketAddr) -> BrowserGuard {
        let lower = |list: &[String]| list.iter().map(|s| s.to_ascii_lowercase()).collect();
        BrowserGuard {
            allowed_origins: lower(&config.server.allowed_origins),
            allowed_hosts: lower(&config.server.allowed_hosts),
            check_host: is_loopback(local.ip()),
        }
    }

    /// The guard for the Unix socket listener: `Host` checked as on a
    /// loopback bind.
    pub fn for_unix_socket(config: &Config) -> BrowserGuard {
        BrowserGuard {
            check_host: true,
            ..BrowserGuard::new(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        }
    }

    /// `Err(403)` for a request a web page made (or could have made) that
    /// the lists do not allow.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        let origin_allowed = self.check_origins(headers)?;
        let cross_site = headers
            .get(SEC_FETCH_SITE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        if cross_site && !origin_allowed {
            return Err(HttpError::Forbidden(
                "a cross-site browser request (Sec-Fetch-Site: cross-site) without an Origin listed in \
                 server.allowed_origins is refused"
                    .into(),
            ));
        }
        if self.check_host {
            self.check_host(headers)?;
        }
        Ok(())
    }

    /// `Ok(true)` when every `Origin` is listed, `Ok(false)` when there is
    /// none, `Err` naming the first one that is not listed.
    fn check_origins(&self, headers: &HeaderMap) -> Result<bool, HttpError> {
        let mut any = false;
        for value in headers.get_all(header::ORIGIN) {
            any = true;
            let text = value.to_str().unwrap_or("<non-ASCII>").trim();
            if !self.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(text)) {
                let shown: String = text.chars().take(MAX_QUOTED).collect();
                return Err(HttpError::Forbidden(format!(
                    "requests from web pages are refused: Origin {shown:?} is not in server.allowed_origins"
                )));
            }
        }
        Ok(any)
    }

    /// A loopback `Host` (or a listed one) on a loopback bind. A request
    /// without `Host` (HTTP/1.0) is no browser's and passes.
    fn check_host(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        let Some(value) = headers.get(header::HOST) else {
            return Ok(());
        };
        let text = value.to_str().unwrap_or("");
        let name = host_name(text).to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        if is_loopback_name(name) || self.allowed_hosts.iter().any(|h| h == name) {
            return Ok(());
        }
        let shown: String = text.chars().take(MAX_QUOTED).collect();
        Err(HttpError::Forbidden(format!(
            "Host {shown:?} is not a loopback name or address and not in server.allowed_hosts \
             (on a loopback bind or the Unix socket, another name is a DNS-rebinding page)"
        )))
    }
}

/// 127.0.0.0/8, ::1, and ::ffff:127.x.x.x.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `Host` without its port: `[v6]`, or what comes before a final `:digits`.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `localhost`, an IPv4 loopback address, or `[::1]` (lowercase, no port).
fn is_loopback_name(name: &str) -> bool {
    if name == "localhost" {
        return true;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| is_loopback(IpAddr::V6(ip)));
    }
    name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn guard(bind: &str, origins: &[&str], hosts: &[&str]) -> BrowserGuard {
        let mut config = Config::default();
        config.server.allowed_origins = origins.iter().map(|s| s.to_string()).collect();
        config.server.allowed_hosts = hosts.iter().map(|s| s.to_string()).collect();
        BrowserGuard::new(&config, bind.parse().unwrap())
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn origins_are_refused_unless_listed() {
        let g = guard("127.0.0.1:9100", &["https://app.example:8443"], &[]);
        let ok = |pairs: &[(&str, &str)]| g.check(&head(pairs)).is_ok();
        assert!(ok(&[("host", "127.0.0.1:9100")]));
        assert!(!ok(&[("host", "127.0.0.1:9100"), ("origin", "http://evil.example")]));
        assert!(!ok(&[("host", "127.0.0.1:9100"), ("origin", "null")]));
        assert!(ok(&[
            ("host", "127.0.0.1:9100"),
            ("origin", "HTTPS://APP.EXAMPLE:8443")
        ]));
        // Every Origin must be listed.
        assert!(!ok(&[
            ("origin", "https://app.example:8443"),
            ("origin", "http://evil.example")
        ]));
        assert!(!ok(&[("sec-fetch-site", "cross-site")]));
        assert!(ok(&[("sec-fetch-site", "same-origin")]));
        assert!(ok(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://app.example:8443")
        ]));
        let err = g.check(&head(&[("origin", "http://evil.example")])).unwrap_err();
        assert!(err.to_string().contains("http://evil.example"), "{err}");
    }

    #[test]
    fn hosts_must_be_loopback_or_listed_on_a_loopback_bind_only() {
        let g = guard("127.0.0.1:9100", &[], &["engine.internal"]);
        for host in [
            "127.0.0.1:9100",
            "127.0.0.1",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:9100",
            "localhost.:9100",
            "[::1]:9100",
            "[::1]",
            "engine.internal:9100",
        ] {
            assert!(g.check(&head(&[("host", host)])).is_ok(), "{host}");
        }
        for host in [
            "evil.example:9100",
            "evil.example",
            "10.0.0.1:9100",
            "[::2]:9100",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(g.check(&head(&[("host", host)])).is_err(), "{host}");
        }
        assert!(g.check(&head(&[])).is_ok(), "no Host: HTTP/1.0, not a browser");
        for bind in ["[::1]:9100", "127.0.0.2:1"] {
            let g = guard(bind, &[], &[]);
            assert!(g.check(&head(&[("host", "evil.example")])).is_err(), "{bind}");
        }
        // Bound to every address (a pod): probes send the pod IP.
        let g = guard("0.0.0.0:9100", &[], &[]);
        assert!(g.check(&head(&[("host", "10.1.2.3:9100")])).is_ok());
        assert!(
            g.check(&head(&[("host", "10.1.2.3:9100"), ("origin", "http://x.example")]))
                .is_err()
        );
    }
}
