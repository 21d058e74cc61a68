//! nginx in the foreground for the tests: one process (`daemon off`, `master_process off`),
//! its pid, logs and temp paths in a scratch directory of its own, listening on 127.0.0.1 on
//! a free port, stopped by PID when dropped. Two uses: a static file server (the honest web
//! seed of the BEP 19 tests, Range requests on as nginx has them by default, optionally with
//! a per-connection `limit_rate`, optionally over TLS) and, in [`super::clients`], a
//! TLS-terminating proxy in front of a tracker.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::DEADLINE;
use super::Diagnose;
use super::cli::ChildGuard;
use super::clients::{TestCa, require_tool};
use super::files::scratch_dir;
use super::net::free_port;
use super::poll_until;

/// A running nginx: its guard, port and access log.
pub struct NginxProcess {
    guard: ChildGuard,
    pub port: u16,
    access_log: PathBuf,
}

impl NginxProcess {
    /// Starts nginx with `server_body` (the inside of one `server { }` block, after its
    /// `listen` line) and waits until it accepts connections. `tls`: listen with `ssl` and this
    /// CA's server certificate. Retries on another port when the one found free was taken.
    pub fn start(label: &str, tls: Option<&TestCa>, server_body: &str) -> NginxProcess {
        let nginx = require_tool("nginx");
        let mut last = String::new();
        for _ in 0..3 {
            let dir = scratch_dir();
            let d = dir.path().display().to_string();
            fs::create_dir_all(dir.path().join("tmp")).expect("nginx temp dir");
            let port = free_port();
            let listen = match tls {
                Some(ca) => format!(
                    "listen 127.0.0.1:{port} ssl;\n ssl_certificate {};\n ssl_certificate_key {};\n",
                    ca.server_pem.display(),
                    ca.server_key.display()
                ),
                None => format!("listen 127.0.0.1:{port};\n"),
            };
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n\
                 access_log {d}/access.log;\n\
                 client_body_temp_path {d}/tmp/body;\nproxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fastcgi;\nuwsgi_temp_path {d}/tmp/uwsgi;\n\
                 scgi_temp_path {d}/tmp/scgi;\n\
                 server {{\n {listen} {server_body}\n}}\n}}\n"
            );
            let conf_path = dir.path().join("nginx.conf");
            fs::write(&conf_path, conf).expect("write nginx.conf");
            let log = dir.path().join("error.log");
            let access_log = dir.path().join("access.log");
            let mut command = Command::new(&nginx);
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(&log)
                .arg("-c")
                .arg(&conf_path);
            let guard = ChildGuard::spawn(&format!("nginx {label} 127.0.0.1:{port}"), &mut command)
                .with_log(log)
                .with_log(access_log.clone())
                .with_scratch(dir);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let up = poll_until(DEADLINE, || {
                if guard.exit_status().is_some() {
                    return Some(false);
                }
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .ok()
                    .map(|_| true)
            });
            match up {
                Some(true) => {
                    return NginxProcess {
                        guard,
                        port,
                        access_log,
                    };
                }
                Some(false) => last = guard.diagnostics(),
                None => panic!(
                    "nginx did not listen on {addr} within {DEADLINE:?}\n{}",
                    guard.diagnostics()
                ),
            }
        }
        panic!("nginx failed to start three times; last attempt:\n{last}");
    }

    /// The lines of the access log so far (one per request answered).
    pub fn access_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn guard(&self) -> &ChildGuard {
        &self.guard
    }
}

impl Diagnose for NginxProcess {
    fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }
}

/// nginx serving the files under a directory, on 127.0.0.1.
pub struct StaticServer {
    process: NginxProcess,
    root: PathBuf,
    scheme: &'static str,
}

/// How a [`StaticServer`] serves.
#[derive(Default)]
pub struct StaticOptions<'a> {
    /// nginx `limit_rate` per connection, e.g. `"256k"` (a slow but honest web seed).
    pub limit_rate: Option<&'a str>,
    /// Serve HTTPS with this CA's server certificate for 127.0.0.1.
    pub tls: Option<&'a TestCa>,
}

impl StaticServer {
    /// Serves `root` as is: GET and HEAD, Range requests answered with 206 (nginx's default),
    /// `sendfile on`, no compression.
    pub fn start(root: &Path) -> StaticServer {
        StaticServer::start_with(root, StaticOptions::default())
    }

    pub fn start_with(root: &Path, options: StaticOptions<'_>) -> StaticServer {
        let root = root
            .canonicalize()
            .unwrap_or_else(|e| panic!("cannot serve {}: {e}", root.display()));
        make_world_readable(&root);
        let mut body = format!(
            "root {};\n sendfile on;\n default_type application/octet-stream;\n\
             location / {{ }}\n",
            root.display()
        );
        if let Some(rate) = options.limit_rate {
            body.push_str(&format!(" limit_rate {rate};\n"));
        }
        StaticServer {
            process: NginxProcess::start("static", options.tls, &body),
            root,
            scheme: if options.tls.is_some() {
                "https"
            } else {
                "http"
            },
        }
    }

    /// `http://127.0.0.1:PORT/` followed by `path` (already percent-encoded as wanted).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            self.scheme,
            self.process.port,
            path.trim_start_matches('/')
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The access log so far: one line per request answered.
    pub fn access_lines(&self) -> Vec<String> {
        self.process.access_lines()
    }

    /// Body bytes nginx logged as sent, over every request so far (`$body_bytes_sent`, the
    /// field after the status in the combined log format).
    pub fn body_bytes_sent(&self) -> u64 {
        self.access_lines()
            .iter()
            .filter_map(|l| {
                let after = l
                    .rsplit_once("HTTP/1.1\" ")
                    .or_else(|| l.rsplit_once("HTTP/1.0\" "))?
                    .1;
                after.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// How many requests nginx answered so far.
    pub fn requests(&self) -> usize {
        self.access_lines().len()
    }

    pub fn process(&self) -> &NginxProcess {
        &self.process
    }
}

impl Diagnose for StaticServer {
    fn diagnostics(&self) -> String {
        self.process.diagnostics()
    }
}

/// Directories 0755 and files 0644 under `root` (and `root` itself): nginx may read them as
/// another user.
fn make_world_readable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(at) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&at) else {
            continue;
        };
        if meta.is_dir() {
            let _ = fs::set_permissions(&at, fs::Permissions::from_mode(0o755));
            if let Ok(entries) = fs::read_dir(&at) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file() {
            let _ = fs::set_permissions(&at, fs::Permissions::from_mode(0o644));
        }
    }
}
