//! The Debian package on this machine, as an operator meets it: `dpkg -i`,
//! the first commands (`--version`, `policy check` on the shipped
//! examples, `config check` on the shipped config), the files where Debian
//! puts them, maintainer scripts that start nothing where systemd is not
//! PID 1, then `dpkg --purge`, after which nothing of it is left.
//!
//! The package is the one `cargo xtask test` builds from the debug binaries
//! with the code `cargo xtask package` runs (SBX_NET_DEB names it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sbx_net_tests::{require_root, require_tool};

const CHECK_JSONSCHEMA: &str = "/opt/sbx-net/mcp-venv/bin/check-jsonschema";

/// Where a package could leave something (dpkg's own database included);
/// /run is checked on its own: other tests' daemons keep lock files in
/// /run/sbx-net, which a purge rightly removes.
const WATCHED: &[&str] = &[
    "/etc",
    "/usr/bin",
    "/usr/lib/cni",
    "/usr/lib/systemd",
    "/lib/systemd",
    "/usr/share/man/man1",
    "/usr/share/doc/sbx-net",
    "/usr/share/sbx-net",
    "/usr/share/bash-completion/completions",
    "/usr/share/zsh/vendor-completions",
    "/usr/share/fish/vendor_completions.d",
    "/var/lib/sbx-net",
    "/var/lib/systemd",
    "/var/lib/dpkg/info",
];

/// Written by other tests' daemons (a netns guest's own /etc files), never
/// by the package.
const NOT_WATCHED: &[&str] = &["/etc/netns"];

fn snapshot() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, into: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if NOT_WATCHED.iter().any(|n| path == Path::new(n)) {
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            into.insert(path.clone());
            if is_dir {
                walk(&path, into);
            }
        }
    }
    let mut all = BTreeSet::new();
    for dir in WATCHED {
        walk(Path::new(dir), &mut all);
    }
    all
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(require_tool(program)).args(args).env("DEBIAN_FRONTEND", "noninteractive").output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f", "${db:Status-Status}", "sbx-net"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() != "not-installed"
}

/// Purges the package when the test ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = run("dpkg", &["--purge", "sbx-net"]);
        }
    }
}

#[test]
fn deb_installs_runs_its_examples_and_purges_without_a_trace() {
    require_root();
    let deb = std::env::var_os("SBX_NET_DEB").map(PathBuf::from).unwrap_or_else(|| {
        panic!("SBX_NET_DEB is not set: `cargo xtask test` builds the package and sets it (or run `cargo xtask package` and set it to target/debian/sbx-net_*.deb)")
    });
    assert!(deb.is_file(), "{} is missing", deb.display());
    assert!(!installed(), "sbx-net is installed on this host: the package test will not replace an operator's installation");
    // Nor run over a daemon started from a build tree with the defaults:
    // the purge would remove its state and socket.
    for path in ["/etc/sbx-net", "/var/lib/sbx-net", "/sys/fs/bpf/sbx-net", "/run/sbx-net/sbx-net.sock"] {
        assert!(std::fs::symlink_metadata(path).is_err(), "{path} exists: an sbx-net daemon uses this host's default paths; the package test will not install and purge over it");
    }
    let before = snapshot();
    let run_before: BTreeSet<PathBuf> = std::fs::read_dir("/run/sbx-net").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let pids_before = sbx_net_processes();

    let _purge = Purge;
    let out = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    if !Path::new("/run/systemd/system").exists() {
        assert!(text(&out).contains("systemd is not running here"), "postinst said nothing of not starting: {}", text(&out));
    }
    assert!(installed());

    // What the operator runs first.
    let out = run("/usr/bin/sbx-net", &["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.starts_with("sbx-net 0.") || version.starts_with("sbx-net 1."), "{version}");
    let examples: Vec<PathBuf> = std::fs::read_dir("/usr/share/doc/sbx-net/examples/policies")
        .expect("the example policies")
        .map(|e| e.unwrap().path())
        .collect();
    assert!(examples.len() >= 3, "{examples:?}");
    for example in &examples {
        let out = run("/usr/bin/sbx-net", &["policy", "check", example.to_str().unwrap()]);
        assert!(out.status.success(), "policy check {}: {}", example.display(), text(&out));
    }
    let out = run("/usr/bin/sbx-net", &["config", "check", "/etc/sbx-net/config.toml"]);
    assert!(out.status.success(), "the shipped config: {}", text(&out));
    // The installed CLI reads the installed config (the socket it names).
    let out = run("/usr/bin/sbx-net", &["config", "show", "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("config show ({e}): {}", text(&out)));
    assert_eq!(shown["socket"], "/run/sbx-net/sbx-net.sock");
    if Path::new(CHECK_JSONSCHEMA).exists() {
        let out = Command::new(CHECK_JSONSCHEMA).args(["--schemafile", "/usr/share/sbx-net/schema/policy.schema.json"]).args(&examples).output().unwrap();
        assert!(out.status.success(), "the installed schema refuses the installed examples: {}", text(&out));
    }

    // Where Debian puts things.
    for file in [
        "/usr/bin/sbx-net",
        "/usr/lib/cni/sbx-net-cni",
        "/usr/lib/systemd/system/sbx-net.service",
        "/usr/lib/systemd/system/sbx-net.socket",
        "/usr/share/man/man1/sbx-net.1.gz",
        "/usr/share/man/man1/sbx-net-policy-check.1.gz",
        "/usr/share/bash-completion/completions/sbx-net",
        "/usr/share/zsh/vendor-completions/_sbx-net",
        "/usr/share/fish/vendor_completions.d/sbx-net.fish",
        "/usr/share/sbx-net/schema/policy.schema.json",
        "/usr/share/sbx-net/schema/config.schema.json",
        "/usr/share/sbx-net/prometheus/sbx-net.rules.yml",
        "/usr/share/sbx-net/grafana/sbx-net.json",
        "/usr/share/doc/sbx-net/copyright",
    ] {
        assert!(Path::new(file).is_file(), "{file} is not installed");
    }
    assert!(Path::new("/etc/sbx-net/policies").is_dir());
    let out = run("dpkg-query", &["-W", "-f", "${Conffiles}", "sbx-net"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("/etc/sbx-net/config.toml"), "config.toml is not a conffile: {}", text(&out));

    // Every library the binaries link comes from a package in Depends.
    let out = run("dpkg-query", &["-W", "-f", "${Depends}", "sbx-net"]);
    let depends: Vec<String> =
        String::from_utf8_lossy(&out.stdout).split(',').map(|d| d.split_whitespace().next().unwrap_or("").split(':').next().unwrap_or("").to_string()).collect();
    for binary in ["/usr/bin/sbx-net", "/usr/lib/cni/sbx-net-cni"] {
        let out = run("ldd", &[binary]);
        for lib in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(" => ").nth(1)).filter_map(|r| r.split_whitespace().next()) {
            // dpkg knows a file by the path its package installed it at:
            // with merged /usr, ldd's /lib/… is dpkg's /usr/lib/….
            let canonical = std::fs::canonicalize(lib).unwrap_or_else(|_| PathBuf::from(lib));
            let candidates = [lib.to_string(), format!("/usr{lib}"), canonical.display().to_string()];
            let package = candidates
                .iter()
                .find_map(|path| {
                    let out = run("dpkg-query", &["-S", path]);
                    let owner = String::from_utf8_lossy(&out.stdout).into_owned();
                    out.status.success().then(|| owner.split(':').next().unwrap_or("").trim().to_string())
                })
                .unwrap_or_else(|| panic!("no package owns {lib} ({candidates:?})"));
            assert!(depends.contains(&package), "{binary} links {lib} of package {package:?}, which Depends ({depends:?}) lacks");
        }
    }

    // Nothing was started: there is no systemd here to start it, and the
    // maintainer scripts start nothing else.
    assert_eq!(sbx_net_processes(), pids_before, "installing the package started sbx-net");

    let out = run("dpkg", &["--purge", "sbx-net"]);
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    assert!(!installed());
    let after = snapshot();
    let left: Vec<_> = after.difference(&before).take(20).collect();
    let lost: Vec<_> = before.difference(&after).take(20).collect();
    assert!(left.is_empty(), "the purge left: {left:?}");
    assert!(lost.is_empty(), "install and purge removed what was there before: {lost:?}");
    let run_after: BTreeSet<PathBuf> = std::fs::read_dir("/run/sbx-net").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(run_after.is_subset(&run_before), "left in /run/sbx-net: {:?}", run_after.difference(&run_before).collect::<Vec<_>>());
}

/// Pids of processes whose executable is an installed sbx-net.
fn sbx_net_processes() -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with("/usr/bin/sbx-net") || exe.starts_with("/usr/lib/cni/sbx-net")))
        .collect()
}
