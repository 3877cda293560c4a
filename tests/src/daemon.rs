//! A real `sbx-net daemon` in a test's host namespace (started with
//! `ip netns exec`, as an operator would), driven with the real CLI. Every
//! harness has its own state dir, socket and bpffs pin dir; dropping it
//! kills the daemon and runs `daemon --cleanup`, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{unique_name, Topology};

/// The `sbx-net` binary: `SBX_NET_BIN`, or next to the test executables
/// (`cargo xtask test` builds it first).
pub fn sbx_net_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SBX_NET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/sbx-net
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("sbx-net");
    assert!(bin.exists(), "{} is missing: run `cargo build -p sbx-net` (cargo xtask test does) or set SBX_NET_BIN", bin.display());
    bin
}

pub struct DaemonHarness {
    pub topology: Topology,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub bpf_dir: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    extra_args: Vec<String>,
}

impl DaemonHarness {
    /// A topology, the given policy files in a policy dir, and a running daemon.
    pub fn new(tag: &str, policies: &[(&str, &str)]) -> DaemonHarness {
        Self::with_args(tag, policies, None, &[])
    }

    /// Like [`DaemonHarness::new`], with a `--config` file of `config_toml`
    /// and extra `daemon` flags.
    pub fn with_args(tag: &str, policies: &[(&str, &str)], config_toml: Option<&str>, extra_args: &[&str]) -> DaemonHarness {
        let mut h = Self::prepared(tag, policies, config_toml, extra_args);
        h.start_daemon();
        h
    }

    /// Everything [`DaemonHarness::with_args`] makes except the running
    /// daemon (for tests of how a daemon starts, or refuses to).
    pub fn prepared(tag: &str, policies: &[(&str, &str)], config_toml: Option<&str>, extra_args: &[&str]) -> DaemonHarness {
        let topology = Topology::new(tag);
        let name = unique_name(tag);
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).expect("test dir");
        for (file, text) in policies {
            std::fs::write(policy_dir.join(file), text).expect("policy file");
        }
        let mut h = DaemonHarness {
            topology,
            socket: dir.join("sbx-net.sock"),
            state_dir: dir.join("state"),
            policy_dir,
            bpf_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            dir,
            child: None,
            bin: sbx_net_bin(),
            extra_args: Vec::new(),
        };
        h.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        // Always a config of the test's own: a daemon given none reads the
        // host's /etc/sbx-net/config.toml (an installed package's).
        let path = h.dir.join("daemon.toml");
        std::fs::write(&path, config_toml.unwrap_or("")).expect("daemon config");
        h.extra_args.push("--config".into());
        h.extra_args.push(path.display().to_string());
        h
    }

    /// `ip` arguments that run this harness's daemon in its host namespace.
    pub fn daemon_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["netns".into(), "exec".into(), self.topology.host.name().into()];
        args.push(self.bin.display().to_string());
        for (flag, value) in [
            ("--socket", self.socket.display().to_string()),
            ("--state-dir", self.state_dir.display().to_string()),
            ("--policy-dir", self.policy_dir.display().to_string()),
            ("--bpf-dir", self.bpf_dir.display().to_string()),
            ("--uplink", "uplink".to_string()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        args.insert(4, "daemon".into());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Spawns this harness's daemon with `extra` flags after its own,
    /// logging to `daemon.log`; the caller waits for it.
    pub fn spawn_daemon_process(&self, extra: &[String]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("daemon log");
        Command::new("ip")
            .args(self.daemon_args())
            .args(extra)
            .env("RUST_LOG", std::env::var("SBX_NET_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn sbx-net daemon")
    }

    /// Starts the daemon and waits until it answers (at most 15 s).
    pub fn start_daemon(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let child = self.spawn_daemon_process(&[]);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.cli(&["status"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("daemon exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not answer within 15 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs another `sbx-net daemon` in network namespace `netns` with this
    /// harness's flags, each `(flag, value)` of `overrides` replacing or
    /// adding one, and waits for it to exit (at most `timeout`; one still
    /// running then is killed and the test fails: it should have refused).
    pub fn run_other_daemon(&self, netns: &str, overrides: &[(&str, &str)], timeout: Duration) -> Output {
        let mut args = self.daemon_args();
        args[2] = netns.to_string();
        for (flag, value) in overrides {
            match args.iter().position(|a| a == flag) {
                Some(i) => args[i + 1] = value.to_string(),
                None => args.extend([flag.to_string(), value.to_string()]),
            }
        }
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a second sbx-net daemon");
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("reap");
                panic!("sbx-net daemon {overrides:?} was still running after {timeout:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("second daemon output")
    }

    /// Runs this binary from now on (the daemon and the CLI): an upgrade.
    pub fn use_binary(&mut self, bin: PathBuf) {
        self.bin = bin;
    }

    /// Kills the daemon with `signal` and reaps it.
    pub fn kill_daemon(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            let _ = child.wait();
        }
    }

    /// `daemon --cleanup` with this harness's configuration.
    pub fn cleanup(&self) -> Output {
        let mut args = self.daemon_args();
        args.push("--cleanup".into());
        Command::new("ip").args(&args).output().expect("run daemon --cleanup")
    }

    /// The daemon's pid (`ip netns exec` execs it in place).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run sbx-net")
    }

    /// Runs the CLI and returns stdout; panics with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sbx-net {args:?} failed: {}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "sbx-net {args:?} unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.cli_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("sbx-net {args:?} printed no JSON ({e}): {text}"))
    }

    /// `sandbox create NAME --policy POLICY --netns-guest`.
    pub fn create_guest(&self, name: &str, policy: &str) -> serde_json::Value {
        self.json(&["sandbox", "create", name, "--policy", policy, "--netns-guest"])
    }

    /// `GET /metrics` (default address) from inside the daemon's namespace,
    /// with extra curl arguments (`-H Accept: …`).
    pub fn metrics_with(&self, curl_args: &[&str]) -> String {
        let mut args = vec!["-sf", "--max-time", "5"];
        args.extend_from_slice(curl_args);
        args.push("http://127.0.0.1:9464/metrics");
        let out = crate::run_in(self.topology.host.name(), "curl", &args);
        assert!(out.status.success(), "GET /metrics failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn metrics(&self) -> String {
        self.metrics_with(&[])
    }

    /// `nft list table inet sbx_net` in the host namespace.
    pub fn nft_table(&self) -> String {
        let out = crate::run_in(self.topology.host.name(), "nft", &["list", "table", "inet", "sbx_net"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DaemonHarness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.dir.display(), self.log());
        }
        // For looking into a run afterwards: SBX_NET_KEEP_LOG=FILE.
        if let Some(keep) = std::env::var_os("SBX_NET_KEEP_LOG") {
            let _ = std::fs::copy(self.dir.join("daemon.log"), keep);
        }
        self.kill_daemon(libc::SIGKILL);
        let out = self.cleanup();
        if !out.status.success() {
            eprintln!("daemon --cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
