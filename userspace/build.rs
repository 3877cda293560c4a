//! Builds the eBPF object (ebpf/prog, nightly, bpfel-unknown-none) and
//! leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! This is aya-build 0.2's recipe (`rustup run nightly cargo build -Z
//! build-std=core` with its rustflags) plus the one thing it has no way to
//! pass: the BPF instruction set. rustc hands bpf-linker `--cpu generic`
//! (v1) unless told otherwise; v1 has no 32-bit ALU or jumps, so every
//! 32-bit value is widened with a pair of shifts and more registers spill
//! to the stack. With v3 the classifier's own work (everything but its trie
//! lookup) took a third of the time on the benchmark machine (BENCHMARKS.md,
//! issue 19). v3 needs kernel 5.1; the daemon needs 6.6 (TCX) anyway.
use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

const PACKAGE: &str = "sbx-net-ebpf";
const TARGET: &str = "bpfel-unknown-none";
/// The BPF instruction set version the programs are compiled for.
const BPF_CPU: &str = "v3";

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf = Path::new(&manifest_dir).join("../ebpf").canonicalize().context("locating ebpf/")?;
    println!("cargo:rerun-if-changed={}", ebpf.join("prog").display());
    println!("cargo:rerun-if-changed={}", ebpf.join("common/src").display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    if env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN")? != "little" {
        bail!("the eBPF object is built for {TARGET}: a big-endian host is not supported");
    }
    // aya-ebpf reads this cfg to pick the host's register layout.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        format!("-Ctarget-cpu={BPF_CPU}"),
    ]
    .join("\x1f");
    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--package", PACKAGE, "--bins", "--release", "--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The host build's compiler must not build the BPF object.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cargo.spawn().with_context(|| format!("spawning {cargo:?} (is rustup installed?)"))?;
    // Compiler messages surface as build warnings, as aya-build's did.
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            println!("cargo:warning={}", line.context("reading the eBPF build's output")?);
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    if !status.success() {
        bail!("{cargo:?} failed: {status}");
    }
    let built = target_dir.join(TARGET).join("release").join(PACKAGE);
    std::fs::copy(&built, out_dir.join(PACKAGE)).with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}
