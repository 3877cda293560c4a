//! Every external program that sbx-net's product, tests, demo, benchmarks
//! and xtask run, with what provides it: one list. `cargo xtask bootstrap`
//! installs the Debian packages of this list and then checks every program
//! is on PATH; `cargo xtask test` first checks that the sources run no
//! program missing here; the test helpers name the package when a program
//! is absent instead of failing later with empty output.
//!
//! xtask includes this file with `#[path]`, so it uses std only.

use std::path::{Path, PathBuf};

/// Where a program comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package; bootstrap installs it with apt-get.
    Apt,
    /// The Rust toolchain (rustup), needed before anything can be built.
    Rustup,
    /// Built by bootstrap with `cargo install` (into ~/.cargo/bin).
    CargoInstall,
    /// From PyPI into its own venv (mitmproxy by `cargo xtask bench proxy`,
    /// the MCP SDK by bootstrap); not on PATH.
    Pip,
    /// Built with `cargo install` by the one xtask command that needs it
    /// (`cargo xtask fuzz` installs cargo-fuzz), not by bootstrap.
    XtaskInstall,
}

/// A program and the package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    pub source: Source,
}

const fn apt(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package, source: Source::Apt }
}

pub const TOOLS: &[Tool] = &[
    // Namespaces, links and routes in tests; leftover cleanup in xtask.
    apt("ip", "iproute2"),
    // The daemon tests, nft test and demo read the nftables table with it.
    apt("nft", "nftables"),
    apt("ping", "iputils-ping"),
    apt("nc", "netcat-openbsd"),
    apt("curl", "curl"),
    apt("dig", "bind9-dnsutils"),
    // The world's authoritative DNS server in tests, demo and benchmarks.
    apt("dnsmasq", "dnsmasq-base"),
    apt("openssl", "openssl"),
    apt("tcpdump", "tcpdump"),
    // promtool checks /metrics; the server scrapes it in a test (never as a service).
    apt("promtool", "prometheus"),
    apt("prometheus", "prometheus"),
    // The host test runs the daemon with /proc/sys read-only in a mount
    // namespace of its own (`unshare … sh -c "mount …; exec nsenter …"`).
    apt("unshare", "util-linux"),
    apt("nsenter", "util-linux"),
    // Shell scripts: guest-side loops (dns tests), the host test's wrapper.
    apt("sh", "dash"),
    apt("seq", "coreutils"),
    // The microVM tests bound `sbx-net vm run` in time.
    apt("timeout", "coreutils"),
    apt("printf", "coreutils"),
    // xtask: root check, leftover pumps, bpffs (and the host test's
    // read-only /proc/sys), apt itself.
    apt("id", "coreutils"),
    apt("kill", "procps"),
    apt("mount", "mount"),
    apt("dpkg-query", "dpkg"),
    apt("apt-get", "apt"),
    // The fleet tests and `bench fleet` run a real etcd on loopback in a
    // namespace of theirs (never the Debian service) and read it back with
    // etcdctl, an independent client.
    apt("etcd", "etcd-server"),
    apt("etcdctl", "etcd-client"),
    // Packaging (issue 17): the unit files are checked with
    // systemd-analyze verify (never run: no systemd is PID 1 in tests);
    // `cargo xtask package` builds the .deb with dpkg-deb and the package
    // test installs and purges it with dpkg; the capability measurement
    // runs the daemon under setpriv with a reduced bounding set.
    apt("systemd-analyze", "systemd"),
    apt("dpkg", "dpkg"),
    apt("dpkg-deb", "dpkg"),
    // The package test checks every linked library's package is in Depends.
    apt("ldd", "libc-bin"),
    apt("setpriv", "util-linux"),
    // The package's man pages are compressed as Debian's are.
    apt("gzip", "gzip"),
    // The completion scripts are loaded and run by the shells they are for.
    apt("bash", "bash"),
    apt("zsh", "zsh"),
    apt("fish", "fish"),
    // The peers of `bench proxy` (nginx, haproxy: TLS terminated, a header
    // injected, TLS to the upstream) and of `bench dns` (unbound forwarding,
    // cache off), run in the benchmark's world namespace, never as services
    // (bootstrap's policy-rc.d keeps apt from starting them).
    apt("nginx", "nginx"),
    apt("haproxy", "haproxy"),
    apt("unbound", "unbound"),
    // The venv of `bench proxy`'s mitmproxy (`python3 -m venv`).
    apt("python3", "python3-venv"),
    Tool { program: "rustup", package: "rustup", source: Source::Rustup },
    Tool { program: "rustc", package: "rustup", source: Source::Rustup },
    Tool { program: "cargo", package: "rustup", source: Source::Rustup },
    Tool { program: "bpf-linker", package: "bpf-linker", source: Source::CargoInstall },
    Tool { program: "mitmdump", package: "mitmproxy", source: Source::Pip },
    // The MCP tests' server and client (tests/mcp/*.py) run on the venv's
    // python, with the MCP SDK bootstrap installs into it.
    Tool { program: "python", package: "mcp", source: Source::Pip },
    // An independent JSON Schema validator for the policy and config
    // schemas, the examples and the CNI results (same venv as the MCP SDK).
    Tool { program: "check-jsonschema", package: "check-jsonschema", source: Source::Pip },
    // `cargo xtask fuzz` runs it as `cargo +nightly fuzz` (libFuzzer's C++
    // half builds with g++, one of bootstrap's build packages).
    Tool { program: "cargo-fuzz", package: "cargo-fuzz", source: Source::XtaskInstall },
];

/// The tool entry of `program` (a name or a path: looked up by file name).
pub fn tool(program: &str) -> Option<&'static Tool> {
    let name = Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program);
    TOOLS.iter().find(|t| t.program == name)
}

/// The package that provides `program`.
pub fn package_of(program: &str) -> Option<&'static str> {
    tool(program).map(|t| t.package)
}

/// What to say when `program` cannot be run: "PROGRAM not found (package P)".
pub fn not_found(program: &str) -> String {
    match tool(program) {
        Some(t) if t.source == Source::Apt => {
            format!("{program} not found (package {}): `cargo xtask bootstrap` installs it", t.package)
        }
        Some(t) => format!("{program} not found (package {}, {:?})", t.package, t.source),
        None => format!("{program} not found (package unknown: it is not listed in tests/src/tools.rs)"),
    }
}

/// Where `program` is: a path (containing `/`) is checked as given, a
/// name is searched on PATH. Err is the [`not_found`] message.
pub fn locate(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if is_executable(&path) { Ok(path) } else { Err(not_found(program)) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| not_found(program))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
