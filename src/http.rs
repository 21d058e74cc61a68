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

/// A plain blocking TCP transport. Connections are not reused (`is_open` is false): a tracker
/// is asked every few minutes at most, so a pool buys nothing.
#[derive(Debug)]
struct BoundTransport {
    stream: TcpStream,
    buffers: LazyBuffers,
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
        self.stream
            .set_read_timeout(timeout.not_zero().map(|d| *d))
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
        false
    }
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
                    return Ok(Some(BoundTransport { stream, buffers }));
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
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_file {
        tls = tls.root_certs(RootCerts::new_with_certs(&load_ca_file(path)?));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(3)
        .user_agent(concat!("bitfetch/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    let connector = BoundTcpConnector {
        bind,
        connect_timeout: Duration::from_secs(10).min(timeout),
    }
    .chain(RustlsConnector::default());
    Ok(ureq::Agent::with_parts(
        config,
        connector,
        DefaultResolver::default(),
    ))
}

#[cfg(test)]
mod tests {
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
