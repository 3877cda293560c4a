//! A real etcd server (Debian's `etcd-server`) for the fleet tests and the
//! fleet benchmark: started by the test on loopback inside a network
//! namespace the test made (never as a system service, never in the root
//! namespace), with its own data dir; stopping and starting it again keeps
//! the data, as an etcd restart does. Dropping it kills the server and
//! removes its data dir, also when a test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use crate::{require_tool, try_wait_for, unique_name};

/// Certificates for an etcd that speaks TLS and requires client
/// certificates (made with openssl by [`TlsFiles::generate`]).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// all under `dir`.
    pub fn generate(dir: &std::path::Path) -> TlsFiles {
        std::fs::create_dir_all(dir).expect("tls dir");
        let f = |name: &str| dir.join(name);
        let files = TlsFiles {
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server-key.pem"),
            client_cert: f("client.pem"),
            client_key: f("client-key.pem"),
        };
        let openssl = |args: &[&str]| {
            let out = Command::new(require_tool("openssl")).args(args).current_dir(dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sbx-net test etcd CA"]);
        std::fs::write(f("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n").expect("ext");
        std::fs::write(f("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for (who, cn) in [("server", "127.0.0.1"), ("client", "sbx-net")] {
            openssl(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", &format!("{who}-key.pem"), "-out", &format!("{who}.csr"), "-subj", &format!("/CN={cn}")]);
            openssl(&["x509", "-req", "-in", &format!("{who}.csr"), "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-out", &format!("{who}.pem"), "-days", "2", "-extfile", &format!("{who}.ext")]);
        }
        files
    }
}

pub struct EtcdServer {
    /// The network namespace it listens in (on 127.0.0.1).
    pub netns: String,
    /// Set: clients must use TLS with a client certificate of this CA.
    pub tls: Option<TlsFiles>,
    /// Set by [`EtcdServer::enable_auth`]: etcdctl logs in as root.
    root_password: Option<String>,
    /// The client address it listens on (127.0.0.1, or 0.0.0.0: every
    /// address of its namespace).
    listen: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Ports per test process: each server takes two, from a range chosen by the
/// pid so concurrent test binaries (each in its own namespace anyway) differ.
fn next_ports() -> (u16, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(2, Ordering::Relaxed);
    let base = 20000 + (std::process::id() % 2000) as u16 * 10;
    (base + n, base + n + 1)
}

impl EtcdServer {
    /// Starts etcd in `netns` and waits (at most 30 s) until it answers.
    pub fn start(netns: &str) -> EtcdServer {
        Self::start_with(netns, None)
    }

    /// Like [`EtcdServer::start`]; with `tls`, clients must speak TLS and
    /// present a certificate of its CA.
    pub fn start_with(netns: &str, tls: Option<TlsFiles>) -> EtcdServer {
        Self::start_listening(netns, tls, "127.0.0.1")
    }

    /// Like [`EtcdServer::start_with`], its client port on `listen` (an
    /// address of the namespace, or 0.0.0.0); clients still use 127.0.0.1.
    pub fn start_listening(netns: &str, tls: Option<TlsFiles>, listen: &str) -> EtcdServer {
        require_tool("etcd");
        let (client_port, peer_port) = next_ports();
        let dir = std::env::temp_dir().join(unique_name("etcd"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let mut server = EtcdServer {
            netns: netns.to_string(),
            tls,
            root_password: None,
            listen: listen.to_string(),
            client_port,
            peer_port,
            data_dir: dir.join("data"),
            log: dir.join("etcd.log"),
            child: None,
        };
        server.start_again();
        server
    }

    /// `etcd://127.0.0.1:PORT/PREFIX`, the daemon's `--policy-source`.
    pub fn url(&self, prefix: &str) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}/{}", self.client_port, prefix.trim_start_matches('/'))
    }

    /// `127.0.0.1:PORT`, for etcdctl's `--endpoints`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// (Re)starts the server on its data dir and waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("etcd log");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let listen_client = format!("{scheme}://{}:{}", self.listen, self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            for (flag, path) in [("--cert-file", &t.server_cert), ("--key-file", &t.server_key), ("--trusted-ca-file", &t.ca)] {
                tls_args.push(flag.into());
                tls_args.push(path.display().to_string());
            }
            tls_args.push("--client-cert-auth".into());
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "etcd"])
            .args(["--name", "sbx-test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &listen_client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sbx-test={peer}")])
            // No metrics or pprof listeners beyond the client port; small
            // snapshots so a test never waits on a big one.
            .args(["--snapshot-count", "10000", "--log-level", "warn", "--logger", "zap"])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let ready = try_wait_for(Duration::from_secs(30), || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("etcd exited with {status}:\n{}", self.log_text());
            }
            self.etcdctl(&["endpoint", "health"]).status.success().then_some(())
        });
        assert!(ready.is_some(), "etcd did not answer within 30 s:\n{}", self.log_text());
    }

    /// Kills the server (SIGKILL, as a crash); the data dir stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's pid (its `ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `etcdctl` (API v3) against this server.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            for (flag, path) in [("--cacert", &t.ca), ("--cert", &t.client_cert), ("--key", &t.client_key)] {
                tls_args.push(format!("{flag}={}", path.display()));
            }
        }
        if let Some(password) = &self.root_password {
            tls_args.push(format!("--user=root:{password}"));
        }
        let endpoint = match &self.tls {
            Some(_) => format!("https://{}", self.endpoint()),
            None => self.endpoint(),
        };
        Command::new("ip")
            .args(["netns", "exec", &self.netns, "etcdctl", "--endpoints", &endpoint, "--command-timeout=5s"])
            .args(&tls_args)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl")
    }

    /// Turns on etcd's users and roles with a `root` user of `password`
    /// (etcdctl logs in as root from then on).
    pub fn enable_auth(&mut self, password: &str) {
        for args in [vec!["user", "add", "root", &format!("--new-user-password={password}")[..]], vec!["auth", "enable"]] {
            let out = self.etcdctl(&args);
            assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.root_password = Some(password.to_string());
    }

    /// `etcdctl put KEY VALUE`, asserting success (for writing what
    /// `policy push` would refuse).
    pub fn put(&self, key: &str, value: &str) {
        let out = self.etcdctl(&["put", key, value]);
        assert!(out.status.success(), "etcdctl put {key}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", key]);
        assert!(out.status.success(), "etcdctl get {key}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string();
        (!text.is_empty()).then_some(text)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.data_dir.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
