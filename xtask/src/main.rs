//! Orchestration: `cargo xtask bootstrap | build | lint | test | demo | bench | fuzz`.
//!
//! Every command but `bootstrap` runs the bootstrap first; it is idempotent
//! and says what each step does.

// The one list of external programs, shared with the tests.
#[path = "../../tests/src/tools.rs"]
#[allow(dead_code)] // the tests use more of it than xtask does
mod tools;

mod fuzz;
mod lint;
mod package;
mod scan;
mod stress;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs: apt packages (every program in
    /// tests/src/tools.rs), nightly rust-src, bpf-linker built against the
    /// nightly's LLVM; mount bpffs.
    Bootstrap,
    /// Build the release binary at target/release/sbx-net.
    Build,
    /// Check the layering of userspace/src: no module uses one in a later
    /// layer (the order is `LAYERS` in userspace/src/lib.rs), no circle.
    Lint,
    /// Run the whole test suite (lint, unit, BPF_PROG_TEST_RUN, end-to-end).
    Test {
        /// Run it with every CPU kept busy by a background load.
        #[arg(long)]
        stress: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The self-contained demo on the embedded default policy.
    Demo,
    /// Benchmarks, reported against baselines and peers measured in the
    /// same run: `all` (every suite; tables in target/bench/bench-STAMP.md,
    /// figures and target verdicts in target/bench/bench-STAMP.json),
    /// datapath, lifecycle, dns, proxy, upgrade, vmm, fleet.
    Bench {
        #[arg(default_value = "datapath")]
        suite: String,
        /// `--compare FILE` (a run's JSON: what moved), `--json FILE` (one
        /// suite's figures), `--out DIR` (where `all` writes), `--only
        /// SUITE,…` (a subset of `all`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/debian/sbx-net_VERSION_ARCH.deb)
    /// from a release build: binaries, systemd units, default config,
    /// example policies, man pages, completions, schemas, alert rules and
    /// the Grafana dashboard.
    Package,
    /// Run the cargo-fuzz targets of fuzz/ (nightly; installs cargo-fuzz
    /// if missing), each for N seconds; fails on a crash.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target only (default: all).
        target: Option<String>,
    },
}

/// Packages the build needs that provide no program (libraries, the
/// pkg-config the nftables crate builds with); the programs and their
/// packages are in tests/src/tools.rs.
/// g++ builds libFuzzer's C++ half for `cargo xtask fuzz`; protoc is run
/// by the etcd client's build script (its gRPC stubs are generated), and
/// etcd's protos import protobuf's well-known types (descriptor.proto,
/// struct.proto), which only libprotobuf-dev ships: protobuf-compiler
/// merely recommends it, and bootstrap installs without recommends.
const BUILD_PACKAGES: &[&str] = &["pkg-config", "libnftnl-dev", "libmnl-dev", "g++", "protobuf-compiler", "libprotobuf-dev"];
/// The directories whose Rust sources may run programs.
const SOURCE_DIRS: &[&str] = &["tests", "xtask", "userspace", "vmm"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where bpf-linker finds the nightly's libLLVM (outside the repository).
const LLVM_PREFIX: &str = "/opt/sbx-net/rust-llvm";

fn main() -> Result<()> {
    let cli = Cli::parse();
    step("start");
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Bootstrap => bootstrap(),
        Task::Build => {
            bootstrap()?;
            build_release(&root)
        }
        Task::Lint => lint::lint(&root),
        Task::Test { stress, args } => {
            check_sources_use_listed_tools(&root)?;
            lint::lint(&root)?;
            bootstrap()?;
            test(&root, stress, &args)
        }
        Task::Demo => {
            bootstrap()?;
            build_release(&root)?;
            run_release_bin(&root, "sbx-net-demo", &[])
        }
        Task::Bench { suite, args } => {
            bootstrap()?;
            if suite == "proxy" || suite == "all" {
                mitmproxy()?;
            }
            build_release(&root)?;
            let mut bench_args = vec![suite.as_str()];
            bench_args.extend(args.iter().map(String::as_str));
            run_release_bin(&root, "sbx-net-bench", &bench_args)
        }
        Task::Package => {
            bootstrap()?;
            build_release(&root)?;
            step("building the Debian package");
            let deb = package::build_deb(&root, &target_dir(&root).join("release"), &root.join("target/debian"), package::Compression::Release)?;
            eprintln!("built {}", deb.display());
            Ok(())
        }
        Task::Fuzz { seconds, target } => {
            bootstrap()?;
            fuzz::fuzz(&root, seconds, target.as_deref())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

/// Progress of the long steps (downloads, builds, installs), with the
/// seconds since xtask started, so a slow step shows where the time goes.
fn step(what: &str) {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    eprintln!("[xtask {:>6.1}s] {what}", elapsed.as_secs_f64());
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn bootstrap() -> Result<()> {
    if !is_root() {
        bail!("sbx-net's build, tests and demo need root (apt, bpffs, CAP_NET_ADMIN, CAP_BPF): run as root");
    }
    apt_packages()?;
    nightly_rust_src()?;
    guest_target()?;
    bpf_linker()?;
    bpffs()?;
    tools_on_path()?;
    mcp_venv()?;
    step("ready");
    Ok(())
}

/// The build's packages and the Debian package of every listed program.
fn apt_package_list() -> Vec<&'static str> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    for tool in tools::TOOLS.iter().filter(|t| t.source == tools::Source::Apt) {
        if !packages.contains(&tool.package) {
            packages.push(tool.package);
        }
    }
    packages
}

fn apt_packages() -> Result<()> {
    let packages = apt_package_list();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!("apt packages present: {}", packages.join(" ")));
        return Ok(());
    }
    step(&format!("installing apt packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update failed; the Debian package mirrors must be reachable")?;
    // Packages with services (prometheus) must not start them: a
    // policy-rc.d that says "no" for the length of the install.
    let policy_rc = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy_rc.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(policy_rc, "#!/bin/sh\n# sbx-net bootstrap: start no services\nexit 101\n")?;
        std::fs::set_permissions(policy_rc, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        let _ = std::fs::remove_file(policy_rc);
    }
    installed.with_context(|| format!("could not install {}; install them with apt-get", missing.join(" ")))
}

/// Every listed program can be run now (mitmdump excepted: it lives in
/// its own venv, which `bench proxy` makes; and what the one xtask command
/// that needs it installs, cargo-fuzz).
fn tools_on_path() -> Result<()> {
    let on_path: Vec<&tools::Tool> =
        tools::TOOLS.iter().filter(|t| !matches!(t.source, tools::Source::Pip | tools::Source::XtaskInstall)).collect();
    let missing: Vec<String> = on_path.iter().filter_map(|t| tools::locate(t.program).err()).collect();
    if !missing.is_empty() {
        bail!("after bootstrap: {}", missing.join("; "));
    }
    step(&format!("every listed program found on PATH ({})", on_path.len()));
    Ok(())
}

/// The `.rs` files under `dir`, build output excluded.
fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, into)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
    Ok(())
}

/// Fails naming every program the sources run that tests/src/tools.rs does
/// not list (a fresh machine would lack it; bootstrap installs only the list).
fn check_sources_use_listed_tools(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        rust_files(&root.join(dir), &mut files)?;
    }
    let mut used = std::collections::BTreeSet::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (program, line) in scan::programs_used(&text) {
            if tools::tool(&program).is_none() {
                unlisted.push(format!("{program} ({}:{line})", file.strip_prefix(root).unwrap_or(file).display()));
            }
            used.insert(program);
        }
    }
    if !unlisted.is_empty() {
        bail!(
            "programs run by the sources but not in tests/src/tools.rs (add each with its Debian package): {}",
            unlisted.join(", ")
        );
    }
    eprintln!("[check] every program the sources run is in tests/src/tools.rs: {}", used.into_iter().collect::<Vec<_>>().join(" "));
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup not found: the eBPF program needs rustup with a nightly toolchain (https://rustup.rs)",
    )?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("no nightly toolchain and none can be installed; install one with `rustup toolchain install nightly`")?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src present");
        return Ok(());
    }
    step("adding rust-src to nightly (needed by -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("`rustup component add rust-src --toolchain nightly` failed")
}

/// The microVM's test guest (guest/) builds for x86_64-unknown-none with
/// the toolchain this build runs on (sbx-vmm's build script builds it).
fn guest_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == "x86_64-unknown-none") {
        step("x86_64-unknown-none target present");
        return Ok(());
    }
    step("adding the x86_64-unknown-none target (the microVM's test guest)");
    run(Command::new("rustup").args(["target", "add", "x86_64-unknown-none"])).context("`rustup target add x86_64-unknown-none` failed")
}

/// The LLVM major version of the nightly rustc (bpf-linker must match it).
fn nightly_llvm_major() -> Result<String> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV failed")?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV does not say its LLVM version")?;
    Ok(version.split('.').next().unwrap_or(version).to_string())
}

fn bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") {
        step(&format!("bpf-linker {BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} against the nightly's own LLVM {major}"));
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context("nightly sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let soname = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so") || (n.starts_with("libLLVM") && n.contains(".so")))
        .with_context(|| format!("no libLLVM shared library in {}", lib.display()))?;
    let prefix_lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&soname), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("building bpf-linker failed (it needs the crates.io registry and the nightly's libLLVM)")?;
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        step("bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).context("mounting bpffs failed")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn build_release(root: &Path) -> Result<()> {
    step("building the release binaries (about 10 minutes on 2 cores from a fresh clone)");
    run(cargo().args(["build", "--release", "-p", "sbx-net", "--bins"]))?;
    let built = target_dir(root).join("release/sbx-net");
    let wanted = root.join("target/release/sbx-net");
    if built != wanted {
        std::fs::create_dir_all(wanted.parent().expect("has parent"))?;
        std::fs::copy(&built, &wanted).with_context(|| format!("copying {} to {}", built.display(), wanted.display()))?;
    }
    eprintln!("built {}", wanted.display());
    Ok(())
}

/// Runs a release binary of the tests crate, pointing it at the release
/// `sbx-net` (the daemon and CLI it drives).
fn run_release_bin(root: &Path, bin: &str, args: &[&str]) -> Result<()> {
    run(cargo()
        .args(["run", "--release", "-q", "-p", "sbx-net-tests", "--bin", bin, "--"])
        .args(args)
        .env("SBX_NET_BIN", target_dir(root).join("release/sbx-net")))
}

/// Namespaces our tests name `sbxt<pid>-…` or guests `sbx-sbxt…`.
fn leftover_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sbxt") || n.starts_with("sbx-sbxt") || n.starts_with("sbx-demo"))
                .collect()
        })
        .unwrap_or_default()
}

/// The peer of `bench proxy`: mitmproxy from PyPI in its own venv.
const MITMPROXY_VENV: &str = "/opt/sbx-net/mitmproxy-venv";

fn mitmproxy() -> Result<()> {
    let mitmdump = Path::new(MITMPROXY_VENV).join("bin/mitmdump");
    if mitmdump.exists() {
        return Ok(());
    }
    step("installing mitmproxy (PyPI) into /opt/sbx-net/mitmproxy-venv for the proxy benchmark");
    run(Command::new("python3").args(["-m", "venv", MITMPROXY_VENV]))
        .context("python3 -m venv (apt package python3-venv)")?;
    run(Command::new(Path::new(MITMPROXY_VENV).join("bin/pip")).args(["install", "-q", "mitmproxy"]))
}

/// The tests' Python tools from PyPI, pinned, in their own venv: the MCP
/// tests' server and client (tests/mcp/*.py) run on the maintained MCP SDK;
/// check-jsonschema validates the policy, config and CNI result schemas.
const MCP_VENV: &str = "/opt/sbx-net/mcp-venv";
const MCP_SDK: &str = "mcp==2.3.0";
const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.33.3";

fn mcp_venv() -> Result<()> {
    // Written once the install has succeeded: a half-made venv (an install
    // cut short) is made again, and so is one with another pinned version.
    let stamp = Path::new(MCP_VENV).join(format!(".sbx-net-{MCP_SDK}-{CHECK_JSONSCHEMA}"));
    if stamp.exists() {
        return Ok(());
    }
    step(&format!("installing {MCP_SDK} and {CHECK_JSONSCHEMA} (PyPI) into {MCP_VENV} for the tests"));
    run(Command::new("python3").args(["-m", "venv", "--clear", MCP_VENV]))
        .context("python3 -m venv (apt package python3-venv)")?;
    run(Command::new(Path::new(MCP_VENV).join("bin/pip")).args(["install", "-q", MCP_SDK, CHECK_JSONSCHEMA]))
        .with_context(|| format!("pip install {MCP_SDK} {CHECK_JSONSCHEMA}: PyPI must be reachable"))?;
    std::fs::write(&stamp, "")?;
    Ok(())
}

/// bpffs pin directories of test daemons (`/sys/fs/bpf/sbxt…`).
fn leftover_pins() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("sbxt"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Guest pump, data plane and VMM processes of test daemons.
fn leftover_pumps(test_binaries: &[PathBuf]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            // Anything still running the binaries the tests ran is theirs,
            // whatever its arguments (a data plane with the FHS state dir).
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| test_binaries.contains(&exe)) {
                return true;
            }
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    let ours = (c.contains("__guest-pump") || c.contains("dataplane") || c.contains("__vmm")) && c.contains("sbxt");
                    // The fleet tests' etcd (its data dir is a test's) and light hosts.
                    let fleet = (c.starts_with("etcd\0") && c.contains("sbxt")) || c.contains("__fleet-light-hosts");
                    ours || fleet
                })
                .unwrap_or(false)
        })
        .collect()
}

fn test(root: &Path, stress: bool, args: &[String]) -> Result<()> {
    // The daemon tests drive the real binaries (the CNI plugin too): build
    // them with the tests' profile, and the package test installs a .deb
    // made of them by the code `cargo xtask package` runs.
    step("building the debug binaries");
    run(cargo().args(["build", "-p", "sbx-net", "--bins"]))?;
    let sbx_net_bin = target_dir(root).join("debug/sbx-net");
    step("building the test package from the debug binaries");
    let deb = package::build_deb(root, &target_dir(root).join("debug"), &target_dir(root).join("debian-test"), package::Compression::Fast)?;
    // Under stress the load is on while the suite runs, not while it builds.
    let load = if stress {
        run(cargo().args(["test", "--no-run"]).args(args).env("SBX_NET_BIN", &sbx_net_bin).env("SBX_NET_DEB", &deb))?;
        Some(stress::BusyLoad::start(stress::online_cpus(), stress::LIMIT))
    } else {
        None
    };
    step("building and running the test suite (cargo prints each binary's tests as they run)");
    // Default members only: the eBPF crate builds for bpfel-unknown-none alone.
    let test_binaries: Vec<PathBuf> = [sbx_net_bin.clone(), target_dir(root).join("debug/sbx-net-cni")]
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    // What a run that was killed before its cleanup (a timeout, a machine
    // reused) left would be blamed on this one: removed first, and said.
    // Only a dead test process's: another suite running beside this one
    // keeps its own.
    let earlier = sweep_leftovers(&test_binaries, Owners::Named);
    if !earlier.is_empty() {
        step(&format!("removed what earlier, killed test runs left behind:\n  {}", earlier.join("\n  ")));
    }
    let result = run(cargo().arg("test").args(args).env("SBX_NET_BIN", &sbx_net_bin).env("SBX_NET_DEB", &deb));
    drop(load);
    let left = sweep_leftovers(&test_binaries, Owners::AlsoUnnamed);
    if !left.is_empty() {
        // Both verdicts: a leak after a failed suite is often its cause's
        // echo, a leak after a passing one is a cleanup bug of its own.
        let suite = match &result {
            Ok(()) => "the suite itself passed".to_string(),
            Err(e) => format!("the suite itself failed: {e:#}"),
        };
        bail!("tests left these behind (now removed; {suite}):\n  {}\n/run/netns mounts:\n{}", left.join("\n  "), netns_mounts());
    }
    result
}

/// Whose leftovers [`sweep_leftovers`] removes. Either way only those of
/// test processes no longer running, when a name says whose it is: another
/// suite running beside this one keeps its own.
#[derive(Clone, Copy, PartialEq)]
enum Owners {
    /// Also what names no test process (the demo's namespaces, a data
    /// plane known only by its executable): after the suite, they are
    /// this run's.
    AlsoUnnamed,
    /// Only what a test process's name is in.
    Named,
}

/// The test process a test-made name belongs to: `sbxt<pid>-…`, also
/// inside a longer name (a guest's `sbx-sbxt<pid>-…`, a helper's command
/// line).
fn owner_pid(text: &str) -> Option<u32> {
    let rest = &text[text.find("sbxt")? + 4..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether a process that may have made `text` runs: test names keep only
/// a pid's last five digits (`tests/src/lib.rs` `unique_name`), so any
/// running pid that ends in them counts (on a host whose pid_max is above
/// 100000 a live suite is never taken for a dead one).
fn owner_alive(text: &str) -> bool {
    let Some(owner) = owner_pid(text) else { return false };
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).any(|pid| pid % 100_000 == owner)
}

/// Kills and removes what test daemons left (helper processes, network
/// namespaces, bpffs pins); says what each was.
fn sweep_leftovers(test_binaries: &[PathBuf], owners: Owners) -> Vec<String> {
    let ours = |text: &str| match owner_pid(text) {
        Some(_) => !owner_alive(text),
        None => owners == Owners::AlsoUnnamed,
    };
    let mut left = Vec::new();
    for pid in leftover_pumps(test_binaries) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).into_owned()).unwrap_or_default();
        // A test process's own helper lives as long as its test does.
        if !ours(&cmdline) {
            continue;
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        left.push(format!("guest pump, data plane, VMM, etcd or light fleet host pid {pid}"));
    }
    for n in leftover_namespaces().into_iter().filter(|n| ours(n)) {
        let facts = leftover_facts(&Path::new("/run/netns").join(&n));
        let _ = Command::new("ip").args(["netns", "delete", &n]).status();
        left.push(format!("network namespace {n} ({facts})"));
    }
    for p in leftover_pins().into_iter().filter(|p| ours(&p.to_string_lossy())) {
        let facts = leftover_facts(&p);
        let _ = std::fs::remove_dir_all(&p);
        left.push(format!("bpffs pins {} ({facts})", p.display()));
    }
    left
}

/// When a leftover was made and last changed, and what its directory holds:
/// to tell a cleanup that never ran from something made again after it.
fn leftover_facts(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return "gone already".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let entries = std::fs::read_dir(path).map(|d| d.count().to_string()).unwrap_or_else(|_| "-".into());
    format!("changed {} s ago, modified {} s ago, {entries} entries", now - meta.ctime(), now - meta.mtime())
}

/// /proc/self/mountinfo's lines for /run/netns and what is under it (a
/// stacked mount hides namespaces from a cleanup that looks at the top one).
fn netns_mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().filter(|l| l.split_whitespace().nth(4).is_some_and(|p| p.starts_with("/run/netns"))).map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_name_the_test_process_that_made_them() {
        assert_eq!(owner_pid("sbxt22646-20-obs-prom-h"), Some(22646));
        assert_eq!(owner_pid("sbx-sbxt22646-22-g"), Some(22646));
        assert_eq!(owner_pid("/sys/fs/bpf/sbxt7-21-obs-prom"), Some(7));
        assert_eq!(owner_pid("sbx\0__guest-pump\0{\"sandbox\":\"sbxt31-2-g\"}"), Some(31));
        assert_eq!(owner_pid("sbx-demo-guest"), None);
        assert_eq!(owner_pid("sbxt-x"), None);
        // This process runs: what it made is not an earlier run's, also
        // when its name keeps only the pid's last five digits.
        assert!(owner_alive(&format!("sbxt{}-1-x", std::process::id())));
        assert!(owner_alive(&format!("sbxt{}-1-x", std::process::id() % 100_000)));
    }

    /// The check `cargo xtask test` starts with, on this workspace.
    #[test]
    fn workspace_sources_run_only_listed_programs() {
        check_sources_use_listed_tools(&workspace_root()).unwrap();
    }

    #[test]
    fn bootstrap_installs_nftables_and_each_package_once() {
        let packages = apt_package_list();
        for wanted in ["nftables", "libnftnl-dev", "iproute2", "prometheus", "procps"] {
            assert!(packages.contains(&wanted), "{wanted} missing from {packages:?}");
        }
        let mut unique = packages.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), packages.len(), "{packages:?}");
    }

    #[test]
    fn stress_is_parsed_before_the_cargo_test_arguments() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Task::Test { stress, args } => (stress, args),
            _ => unreachable!(),
        };
        assert_eq!(parse(&["xtask", "test"]), (false, vec![]));
        assert_eq!(parse(&["xtask", "test", "dns"]), (false, vec!["dns".to_string()]));
        assert_eq!(parse(&["xtask", "test", "--stress", "--test", "dns"]), (true, vec!["--test".to_string(), "dns".to_string()]));
        assert_eq!(
            parse(&["xtask", "test", "--stress", "--", "--nocapture"]),
            (true, vec!["--nocapture".to_string()])
        );
        // After the first cargo test argument, --stress is one of them.
        assert_eq!(parse(&["xtask", "test", "dns", "--stress"]), (false, vec!["dns".to_string(), "--stress".to_string()]));
    }
}
