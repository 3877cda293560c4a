//! The data plane: the DNS proxy, the HTTP(S) proxy, the learned addresses
//! and the flow stream, in a process of its own (`sbx-net dataplane`) so
//! that restarting or upgrading the daemon cuts no query and no connection.
//!
//! The daemon starts it, holds a copy of its listening sockets (so that
//! while no data plane runs, connections wait in the kernel's backlog and
//! queries in the socket buffer instead of being refused), pushes it a
//! versioned copy of the routing state, and restarts it if it dies. A
//! restarted daemon finds the running data plane on its local socket, takes
//! copies of the listeners from it (SCM_RIGHTS) and pushes it the state
//! again; a daemon of another build hands the listeners to a new data plane
//! of its own build and lets the old one drain.
//!
//! `process` is the data plane process; `link` the daemon's side of it.
//! This file is the protocol between them.

pub mod link;
pub mod process;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::config::DaemonConfig;
use crate::dns::decide::LearnedAddr;
use crate::policy::compile::CompiledPolicy;

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("data plane socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to the data plane: {0}")]
    Io(#[from] std::io::Error),
    #[error("the data plane answered something unreadable: {0}")]
    BadReply(String),
    #[error("the data plane refused: {0}")]
    Refused(String),
    #[error("listening sockets: {0}")]
    Listeners(String),
    #[error("starting the data plane: {0}")]
    Spawn(String),
}

/// One request to the data plane, one JSON line.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PlaneRequest {
    /// Who is there: build, pid, snapshot version, whether it serves.
    Hello,
    /// Copies of the listening sockets, attached to the answer (SCM_RIGHTS).
    Listeners,
    /// The whole routing state, replacing what the data plane had.
    /// `recorded`: every sandbox the daemon has (some may lack an entry);
    /// learned addresses and flow series of any other are forgotten.
    Apply { version: u64, sandboxes: Vec<SandboxEntry>, recorded: Option<Vec<String>> },
    /// One sandbox added or changed.
    Upsert { version: u64, sandbox: Box<SandboxEntry> },
    /// One sandbox gone: its route, learned addresses and flow series.
    Remove { version: u64, sandbox: String },
    /// A sandbox to a new policy generation, learned addresses carried.
    Switch { version: u64, switch: Box<SwitchRequest> },
    /// A sandbox's learned addresses (to roll a failed change back to).
    LearnedTable { sandbox: String },
    /// Serve: restore the learned addresses and start reading the listeners.
    Start,
    /// Stop reading the listeners, let DNS in flight finish, save the
    /// learned addresses, answer; then finish the proxied connections
    /// (at most `seconds`), send a last line with how many were cut, exit.
    Drain { seconds: u64 },
    /// DNS counters and learned-address count (for `status`).
    Stats,
    /// The data plane's `/metrics` families (OpenMetrics text).
    Metrics,
    /// The flow stream (as the daemon's `inspect`).
    Inspect { follow: bool },
    /// Exit now (`daemon --cleanup`).
    Stop,
}

/// What the proxies need of one sandbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxEntry {
    pub name: String,
    pub id: u32,
    pub guest_ipv4: Ipv4Addr,
    pub guest_ipv6: Ipv6Addr,
    pub policy_id: u32,
    /// Shared with the daemon's own copies (serialized as the policy).
    pub policy: std::sync::Arc<CompiledPolicy>,
    pub credentials: Vec<CredentialEntry>,
    /// Where the sandbox's CA is (`ca.pem`, `ca.key`), when it has one.
    pub ca_dir: Option<PathBuf>,
}

/// A credential binding with its secret (root-only socket; never logged).
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialEntry {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: String,
    pub format: String,
    pub secret: String,
    pub allow_plaintext: bool,
}

impl std::fmt::Debug for CredentialEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialEntry").field("name", &self.name).field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

/// A generation switch: the daemon has written the new static entries;
/// the data plane carries the learned ones, flips the tap's config and
/// removes the old learned keys, under its learned-store lock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchRequest {
    /// The sandbox under its new policy id and policy.
    pub sandbox: SandboxEntry,
    pub ifindex: u32,
    pub config: sbx_net_common::SandboxConfig,
    pub old_policy_id: u32,
    /// A rollback's: what the sandbox had learned before the failed change.
    pub restore: Option<Vec<(IpAddr, LearnedAddr)>>,
}

/// The build of this executable: the version and the file's size and
/// modification time, so a rebuilt or replaced binary of the same version
/// is another build (a stat, not a read: a debug binary is large, and a
/// data plane must start fast).
pub fn build_id() -> &'static str {
    static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILD.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata("/proc/self/exe") {
            Ok(m) => format!("{}+{:x}.{:x}", env!("CARGO_PKG_VERSION"), m.size(), m.mtime() as u64 * 1_000_000_000 + m.mtime_nsec() as u64),
            Err(e) => {
                tracing::warn!("reading our executable's metadata: {e}; builds are told apart by version only");
                env!("CARGO_PKG_VERSION").to_string()
            }
        }
    })
}

/// The hash of a configuration: a data plane started with another one is
/// replaced, as one of another build is.
pub fn config_hash(config: &DaemonConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_string(config).unwrap_or_default().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The sockets the redirects lead to, in a fixed order: the proxy's, the
/// DNS proxy's UDP, its TCP (each IPv4 then IPv6).
pub struct Listeners {
    pub proxy: Vec<std::net::TcpListener>,
    pub dns_udp: Vec<std::net::UdpSocket>,
    pub dns_tcp: Vec<std::net::TcpListener>,
}

const KIND_PROXY: &str = "proxy";
const KIND_DNS_UDP: &str = "dns-udp";
const KIND_DNS_TCP: &str = "dns-tcp";

/// The environment variable naming the kinds of the inherited descriptors.
pub const INHERITED_FDS_ENV: &str = "SBX_NET_DATAPLANE_FDS";

impl Listeners {
    /// Binds them afresh (no data plane runs).
    pub fn bind(config: &DaemonConfig) -> Result<Listeners, PlaneError> {
        let proxy = crate::proxy::bind(config.proxy_port).map_err(|e| PlaneError::Listeners(e.to_string()))?;
        let (dns_udp, dns_tcp) = crate::dns::server::bind(config.dns_port).map_err(|e| PlaneError::Listeners(e.to_string()))?;
        Ok(Listeners { proxy, dns_udp, dns_tcp })
    }

    /// Each descriptor with its kind, in order.
    pub fn described(&self) -> (Vec<&'static str>, Vec<BorrowedFd<'_>>) {
        let mut kinds = Vec::new();
        let mut fds = Vec::new();
        for l in &self.proxy {
            kinds.push(KIND_PROXY);
            fds.push(l.as_fd());
        }
        for s in &self.dns_udp {
            kinds.push(KIND_DNS_UDP);
            fds.push(s.as_fd());
        }
        for l in &self.dns_tcp {
            kinds.push(KIND_DNS_TCP);
            fds.push(l.as_fd());
        }
        (kinds, fds)
    }

    /// Rebuilds them from descriptors and their kinds, checking each is the
    /// socket it claims to be, bound to the port `config` expects.
    pub fn from_fds(kinds: &[String], fds: Vec<OwnedFd>, config: &DaemonConfig) -> Result<Listeners, PlaneError> {
        if kinds.len() != fds.len() {
            return Err(PlaneError::Listeners(format!("{} kinds for {} descriptors", kinds.len(), fds.len())));
        }
        let mut out = Listeners { proxy: Vec::new(), dns_udp: Vec::new(), dns_tcp: Vec::new() };
        for (kind, fd) in kinds.iter().zip(fds) {
            let socket = socket2::Socket::from(fd);
            let (want_type, port) = match kind.as_str() {
                KIND_PROXY => (socket2::Type::STREAM, config.proxy_port),
                KIND_DNS_UDP => (socket2::Type::DGRAM, config.dns_port),
                KIND_DNS_TCP => (socket2::Type::STREAM, config.dns_port),
                other => return Err(PlaneError::Listeners(format!("unknown listener kind {other:?}"))),
            };
            let ty = socket.r#type().map_err(|e| PlaneError::Listeners(format!("{kind}: {e}")))?;
            let local = socket.local_addr().ok().and_then(|a| a.as_socket());
            if ty != want_type || local.map(|a| a.port()) != Some(port) {
                return Err(PlaneError::Listeners(format!("{kind}: a {ty:?} socket at {local:?}, not one on port {port}")));
            }
            socket.set_nonblocking(true).map_err(|e| PlaneError::Listeners(format!("{kind}: {e}")))?;
            match kind.as_str() {
                KIND_PROXY => out.proxy.push(socket.into()),
                KIND_DNS_UDP => out.dns_udp.push(socket.into()),
                _ => out.dns_tcp.push(socket.into()),
            }
        }
        if out.proxy.is_empty() || out.dns_udp.is_empty() || out.dns_tcp.is_empty() {
            return Err(PlaneError::Listeners(format!("incomplete set: {kinds:?}")));
        }
        Ok(out)
    }

    pub fn try_clone(&self) -> std::io::Result<Listeners> {
        Ok(Listeners {
            proxy: self.proxy.iter().map(|l| l.try_clone()).collect::<Result<_, _>>()?,
            dns_udp: self.dns_udp.iter().map(|s| s.try_clone()).collect::<Result<_, _>>()?,
            dns_tcp: self.dns_tcp.iter().map(|l| l.try_clone()).collect::<Result<_, _>>()?,
        })
    }

    /// Where they listen (for the log).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.proxy.iter().chain(&self.dns_tcp).filter_map(|l| l.local_addr().ok()).collect();
        out.extend(self.dns_udp.iter().filter_map(|s| s.local_addr().ok()));
        out
    }
}

/// A connection to a data plane's socket: one request line, one reply line.
pub struct PlaneConnection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    form: PolicyValueForm,
}

/// How a connection writes compiled policies' trie values: in the form the
/// data plane at its other end reads (see [`crate::policy::wire`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyValueForm {
    /// This build's data planes.
    #[default]
    Compact,
    /// A data plane of an older build (adopted at a daemon's start, then
    /// draining after the upgrade) reads only the derived form.
    SpelledOut,
}

impl PolicyValueForm {
    /// The form the data plane that said `hello` reads.
    pub fn from_hello(hello: &serde_json::Value) -> PolicyValueForm {
        if hello["compact_policy_values"] == true {
            PolicyValueForm::Compact
        } else {
            PolicyValueForm::SpelledOut
        }
    }
}

impl PlaneConnection {
    pub fn connect(path: &Path, timeout: Duration) -> Result<PlaneConnection, PlaneError> {
        let stream = UnixStream::connect(path).map_err(|source| PlaneError::Connect { path: path.display().to_string(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(PlaneConnection { reader: BufReader::new(stream.try_clone()?), writer: stream, form: PolicyValueForm::Compact })
    }

    /// Another connection to the data plane at `path`, which this one
    /// talks to: it writes the same form.
    pub fn another(&self, path: &Path, timeout: Duration) -> Result<PlaneConnection, PlaneError> {
        let mut conn = PlaneConnection::connect(path, timeout)?;
        conn.form = self.form;
        Ok(conn)
    }

    pub fn set_form(&mut self, form: PolicyValueForm) {
        self.form = form;
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), PlaneError> {
        self.writer.set_read_timeout(timeout)?;
        Ok(())
    }

    pub fn send(&mut self, request: &PlaneRequest) -> Result<(), PlaneError> {
        let line = match self.form {
            PolicyValueForm::Compact => serde_json::to_vec(request),
            PolicyValueForm::SpelledOut => crate::policy::wire::spelled_out(|| serde_json::to_vec(request)),
        };
        let mut line = line.map_err(|e| PlaneError::BadReply(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// The next reply line: its value, or the data plane's refusal.
    pub fn receive(&mut self) -> Result<serde_json::Value, PlaneError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(PlaneError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the data plane closed the connection")));
        }
        match serde_json::from_str::<Result<serde_json::Value, String>>(&line) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(PlaneError::Refused(e)),
            Err(e) => Err(PlaneError::BadReply(e.to_string())),
        }
    }

    pub fn call(&mut self, request: &PlaneRequest) -> Result<serde_json::Value, PlaneError> {
        self.send(request)?;
        self.receive()
    }

    /// Asks for the listeners: the answer's bytes come with the descriptors.
    pub fn listeners(path: &Path, config: &DaemonConfig, timeout: Duration) -> Result<Listeners, PlaneError> {
        let mut conn = PlaneConnection::connect(path, timeout)?;
        conn.send(&PlaneRequest::Listeners)?;
        let mut buf = vec![0u8; 4096];
        let (n, fds) = crate::util::fd_pass::recv_with_fds(conn.reader.get_ref(), &mut buf)?;
        let reply: Result<Vec<String>, String> = serde_json::from_slice(buf[..n].trim_ascii_end()).map_err(|e| PlaneError::BadReply(e.to_string()))?;
        let kinds = reply.map_err(PlaneError::Refused)?;
        Listeners::from_fds(&kinds, fds, config)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }

    /// The rest of the stream (an `inspect` relay reads it raw).
    pub fn into_reader(self) -> BufReader<UnixStream> {
        self.reader
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each_and_read_back() {
        let request = PlaneRequest::Drain { seconds: 30 };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(line, r#"{"op":"drain","seconds":30}"#);
        assert!(matches!(serde_json::from_str::<PlaneRequest>(&line).unwrap(), PlaneRequest::Drain { seconds: 30 }));
        assert!(serde_json::from_str::<PlaneRequest>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn a_credential_entry_never_prints_its_secret() {
        let c = CredentialEntry { name: "gh".into(), hosts: vec!["api.github.com".into()], header: "Authorization".into(), format: "Bearer {secret}".into(), secret: "s3cr3t".into(), allow_plaintext: false };
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn listeners_survive_a_round_trip_through_descriptors_and_are_checked() {
        let config = DaemonConfig { proxy_port: 0, dns_port: 0, ..Default::default() };
        // Port 0 binds ephemeral ports: describe them, then rebuild with the
        // config's ports set to what was bound.
        let proxy = vec![std::net::TcpListener::bind("127.0.0.1:0").unwrap()];
        let dns_udp = vec![std::net::UdpSocket::bind("127.0.0.1:0").unwrap()];
        let dns_tcp = vec![std::net::TcpListener::bind("127.0.0.1:0").unwrap()];
        let listeners = Listeners { proxy, dns_udp, dns_tcp };
        let (kinds, fds) = listeners.described();
        assert_eq!(kinds, [KIND_PROXY, KIND_DNS_UDP, KIND_DNS_TCP]);
        let owned: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone_to_owned().unwrap()).collect();
        let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
        let err = Listeners::from_fds(&kinds, owned, &config).err().expect("ports differ from the config's");
        assert!(err.to_string().contains("not one on port 0"), "{err}");
        let proxy_port = listeners.proxy[0].local_addr().unwrap().port();
        let dns_port = listeners.dns_udp[0].local_addr().unwrap().port();
        let dns_tcp = listeners.dns_tcp[0].local_addr().unwrap().port();
        // The TCP DNS listener is on another port here; check it alone is refused.
        let config = DaemonConfig { proxy_port, dns_port, ..Default::default() };
        let owned: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone_to_owned().unwrap()).collect();
        let result = Listeners::from_fds(&kinds, owned, &config);
        if dns_tcp == dns_port {
            assert!(result.is_ok());
        } else {
            assert!(result.err().unwrap().to_string().contains("dns-tcp"));
        }
        let swapped = vec!["dns-udp".to_string(), "proxy".to_string(), "dns-tcp".to_string()];
        let owned: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone_to_owned().unwrap()).collect();
        assert!(Listeners::from_fds(&swapped, owned, &config).is_err(), "a stream socket is not a DNS UDP socket");
    }
}
