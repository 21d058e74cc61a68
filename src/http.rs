//! The HTTP(S) client used for trackers: ureq with timeouts, a redirect limit, and outgoing
//! connections from the `--bind` address.
//!
//! The bound source address matters: a tracker records the address an announce came from, and
//! other peers dial that. A client listening on 127.0.0.2 that announced from 127.0.0.1 would be
//! unreachable. ureq has no option for a local address, so a small connector makes the TCP
//! connection (socket2: bind, then connect with a timeout) and TLS is chained on top.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::tls::{Certificate, RootCerts};

use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, RustlsConnector, Transport,
};

#[derive(Debug)]
struct BoundTcpConnector {
    bind: Option<IpAddr>,
    connect_timeout: Duration,
    /// Longest wait for any one read (`None`: up to the request's own deadline).
    read_timeout: Option<Duration>,
    /// Whether a connection may serve another request (web seeds), or closes after one.
    keep_alive: bool,
}

fn connect_one(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// A plain blocking TCP transport. A tracker's connections are not reused (`is_open` is
/// false): it is asked every few minutes at most, so a pool buys nothing. A web seed's are
/// (`keep_alive`), while the server keeps them open.
#[derive(Debug)]
struct BoundTransport {
    stream: TcpStream,
    buffers: LazyBuffers,
    read_timeout: Option<Duration>,
    keep_alive: bool,
}

fn map_io(e: io::Error, timeout: &NextTimeout) -> ureq::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ureq::Error::Timeout(timeout.reason),
        _ => ureq::Error::Io(e),
    }
}

impl Transport for BoundTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream
            .set_write_timeout(timeout.not_zero().map(|d| *d))
            .map_err(ureq::Error::Io)?;
        let out = &self.buffers.output()[..amount];
        self.stream.write_all(out).map_err(|e| map_io(e, &timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let wait = match (timeout.not_zero().map(|d| *d), self.read_timeout) {
            (Some(left), Some(cap)) => Some(left.min(cap)),
            (left, cap) => left.or(cap),
        };
        self.stream
            .set_read_timeout(wait)
            .map_err(ureq::Error::Io)?;
        let input = self.buffers.input_append_buf();
        let n = loop {
            match self.stream.read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
        .map_err(|e| map_io(e, &timeout))?;
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        self.keep_alive && still_open(&self.stream)
    }
}

/// Whether an idle connection is still usable: the server has neither closed it nor sent
/// anything unasked (a peek that would block).
fn still_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let open = matches!(stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).is_ok() && open
}

impl Connector<()> for BoundTcpConnector {
    type Out = BoundTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let timeout = details
            .timeout
            .not_zero()
            .map_or(self.connect_timeout, |t| (*t).min(self.connect_timeout));
        let mut last = None;
        for addr in details.addrs.iter() {
            match connect_one(*addr, self.bind, timeout) {
                Ok(stream) => {
                    let config = details.config;
                    let buffers =
                        LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
                    return Ok(Some(BoundTransport {
                        stream,
                        buffers,
                        read_timeout: self.read_timeout,
                        keep_alive: self.keep_alive,
                    }));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(ureq::Error::ConnectionFailed, ureq::Error::Io))
    }
}

#[derive(Debug)]
pub enum Error {
    CaFile { path: PathBuf, source: io::Error },
    NoCertificates(PathBuf),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::CaFile { path, source } => {
                write!(f, "cannot read CA file {}: {source}", path.display())
            }
            Error::NoCertificates(p) => {
                write!(f, "{} holds no PEM certificate", p.display())
            }
        }
    }
}

impl std::error::Error for Error {}

/// Reads the PEM certificates of a CA bundle.
pub fn load_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::CaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(Error::NoCertificates(path.to_path_buf()));
    }
    Ok(certs)
}

/// An agent whose whole request (connect, redirects, body) is bounded by `timeout`. HTTPS
/// always verifies certificates: against `ca_file` when given (like curl's `--cacert`), else
/// against the built-in Mozilla roots.
pub fn agent(
    timeout: Duration,
    bind: Option<IpAddr>,
    ca_file: Option<&Path>,
) -> Result<ureq::Agent, Error> {
    build_agent(Some(timeout), None, false, bind, ca_file)
}

/// An agent for one web seed: connections kept alive between requests, no read waiting
/// longer than `read_timeout`, and each request's whole deadline set by the request (see
/// [`get_with`]). Certificates are checked as for [`agent`].
pub fn web_seed_agent(
    read_timeout: Duration,
    bind: Option<IpAddr>,
    ca_file: Option<&Path>,
) -> Result<ureq::Agent, Error> {
    build_agent(None, Some(read_timeout), true, bind, ca_file)
}

fn build_agent(
    timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    keep_alive: bool,
    bind: Option<IpAddr>,
    ca_file: Option<&Path>,
) -> Result<ureq::Agent, Error> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_file {
        tls = tls.root_certs(RootCerts::new_with_certs(&load_ca_file(path)?));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        // Redirects are followed by `get`, which checks each hop's scheme.
        .max_redirects(0)
        .user_agent(concat!("bitfetch/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    let connector = BoundTcpConnector {
        bind,
        connect_timeout: timeout.map_or(CONNECT_TIMEOUT, |t| CONNECT_TIMEOUT.min(t)),
        read_timeout,
        keep_alive,
    }
    .chain(RustlsConnector::default());
    Ok(ureq::Agent::with_parts(
        config,
        connector,
        DefaultResolver::default(),
    ))
}

/// Longest wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 3;

/// Why a GET failed before a final response arrived.
#[derive(Debug)]
pub enum GetError {
    Ureq(ureq::Error),
    /// A redirect to something other than http or https (`file:`, `ftp:`, ...).
    RedirectScheme(String),
    /// More than [`MAX_REDIRECTS`] hops, or a redirect without a usable `Location`.
    Redirects(String),
}

impl fmt::Display for GetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GetError::Ureq(e) => write!(f, "{e}"),
            GetError::RedirectScheme(to) => write!(
                f,
                "redirected to {}, which is not an http or https URL",
                crate::path_safety::escape(to)
            ),
            GetError::Redirects(why) => write!(f, "{why}"),
        }
    }
}

/// GETs `url`, following at most [`MAX_REDIRECTS`] redirects by hand so that every hop is
/// checked: only http and https targets, relative ones resolved against the current URL.
/// Returns the final response, whatever its status.
pub fn get(agent: &ureq::Agent, url: &str) -> Result<ureq::http::Response<ureq::Body>, GetError> {
    get_with(agent, url, &|req| req)
}

/// A request as [`get`] makes it, before it is sent (headers, a deadline).
pub type Request = ureq::RequestBuilder<ureq::typestate::WithoutBody>;

/// Like [`get`], with each hop's request shaped by `shape` first (a `Range` header, the
/// request's own deadline).
pub fn get_with(
    agent: &ureq::Agent,
    url: &str,
    shape: &dyn Fn(Request) -> Request,
) -> Result<ureq::http::Response<ureq::Body>, GetError> {
    let mut current = url.to_string();
    for hop in 0..=MAX_REDIRECTS {
        let resp = shape(agent.get(&current)).call().map_err(GetError::Ureq)?;
        if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
            return Ok(resp);
        }
        if hop == MAX_REDIRECTS {
            break;
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| GetError::Redirects("redirect without a Location header".into()))?;
        current = resolve(&current, location)?;
    }
    Err(GetError::Redirects(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

/// Resolves a `Location` against the URL it came from (RFC 3986 in the forms servers send:
/// absolute, scheme-relative, absolute path, relative path).
fn resolve(base: &str, location: &str) -> Result<String, GetError> {
    let location = location.trim();
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(location.to_string());
    }
    // Any other `scheme:` prefix is refused. A scheme is letters, digits, + - . before ':'.
    if let Some(colon) = location.find(':') {
        let scheme = &location[..colon];
        let is_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if is_scheme {
            return Err(GetError::RedirectScheme(location.to_string()));
        }
    }
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| GetError::Redirects(format!("cannot resolve a redirect from {base}")))?;
    if let Some(authority_and_path) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{authority_and_path}"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let origin = format!("{scheme}://{}", &rest[..authority_end]);
    if location.starts_with('/') {
        return Ok(format!("{origin}{location}"));
    }
    // Relative path: replace the last segment of the base path (query dropped).
    let path = &rest[authority_end..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Ok(format!("{origin}{dir}{location}"))
}

#[cfg(test)]
mod tests {

    #[test]
    fn redirects_resolve_and_other_schemes_are_refused() {
        let base = "http://127.0.0.1:6969/a/announce?x=1";
        let ok = |loc: &str| resolve(base, loc).unwrap();
        assert_eq!(ok("https://t.example/b"), "https://t.example/b");
        assert_eq!(ok("//other:1/c"), "http://other:1/c");
        assert_eq!(ok("/d?e=1"), "http://127.0.0.1:6969/d?e=1");
        assert_eq!(ok("f"), "http://127.0.0.1:6969/a/f");
        for bad in [
            "file:///etc/passwd",
            "ftp://x/y",
            "FILE:/etc/passwd",
            "javascript:x",
        ] {
            assert!(
                matches!(resolve(base, bad), Err(GetError::RedirectScheme(_))),
                "{bad}"
            );
        }
    }
    use super::*;
    use std::net::TcpListener;

    /// The tracker must see the `--bind` address as our source address.
    #[test]
    fn requests_leave_from_the_bound_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/announce", listener.local_addr().unwrap());
        let client = std::thread::spawn(move || {
            let agent = agent(
                Duration::from_secs(10),
                Some("127.0.0.9".parse().unwrap()),
                None,
            )
            .unwrap();
            let mut resp = agent.get(&url).call().unwrap();
            resp.body_mut().read_to_vec().unwrap()
        });
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.9");
        let mut req = [0u8; 1024];
        let _ = conn.read(&mut req).unwrap();
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nde")
            .unwrap();
        drop(conn);
        assert_eq!(client.join().unwrap(), b"de");
    }
}
