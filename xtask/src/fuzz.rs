//! `cargo xtask fuzz [--seconds N] [TARGET]`: runs the cargo-fuzz targets
//! of `fuzz/` (nightly, libFuzzer, AddressSanitizer) for N seconds each and
//! reports executions and crashes; a crash makes it fail.
//!
//! libFuzzer's growing corpus goes to `fuzz/work/<target>/` (gitignored);
//! the committed seeds (`fuzz/corpus/<target>/`) and kept crashes
//! (`fuzz/regressions/<target>/`) are read, never written. A crash input is
//! left in `fuzz/artifacts/<target>/`: fix the bug, then copy the input to
//! `fuzz/regressions/<target>/` so `cargo xtask test` replays it for good.
//! The `frames` target needs root (it loads the classifier), as every xtask
//! command does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// cargo-fuzz's own dependencies need a recent toolchain; it is built with
/// the default one and runs the targets with nightly.
const CARGO_FUZZ: &str = "cargo-fuzz";

/// What one target's run did.
struct Run {
    target: String,
    executions: Option<u64>,
    crash: Option<String>,
}

/// The rustup proxy, not `$CARGO`: only the proxy understands `+nightly`.
fn cargo_nightly(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(root);
    // `cargo xtask` runs us with cargo's variables for the xtask package
    // (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). Build scripts that watch them
    // (ring's does) would then rebuild on every switch between `cargo fuzz`
    // from a shell and from here, so the nested cargo gets none of them —
    // nor CARGO_TARGET_DIR: the fuzz crate has its own target dir, where
    // sanitizer flags do not mix with the workspace's builds.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key == "CARGO" || key.starts_with("CARGO_") || key == "RUSTUP_TOOLCHAIN") && key != "CARGO_HOME" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// The fuzz build is a nightly build of sbx-net, whose sbx-vmm build
/// script builds the microVM's test guest with that same toolchain: nightly
/// needs the x86_64-unknown-none target too (bootstrap adds it to stable).
fn ensure_nightly_guest_target() -> Result<()> {
    let listed = Command::new("rustup").args(["+nightly", "target", "list", "--installed"]).output().context("rustup +nightly target list")?;
    if String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.trim() == "x86_64-unknown-none") {
        return Ok(());
    }
    eprintln!("[fuzz] adding x86_64-unknown-none to nightly (sbx-vmm embeds the test guest)");
    crate::run(Command::new("rustup").args(["target", "add", "x86_64-unknown-none", "--toolchain", "nightly"]))
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo").args(["fuzz", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("[fuzz] installing {CARGO_FUZZ} (cargo install {CARGO_FUZZ} --locked)");
    let status = Command::new("cargo").args(["install", CARGO_FUZZ, "--locked"]).status().context("running cargo install")?;
    if !status.success() {
        bail!("`cargo install {CARGO_FUZZ} --locked` failed: {status}");
    }
    Ok(())
}

/// The targets: one `fuzz/fuzz_targets/<name>.rs` each.
fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.path().file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

pub fn fuzz(root: &Path, seconds: u64, only: Option<&str>) -> Result<()> {
    ensure_cargo_fuzz()?;
    ensure_nightly_guest_target()?;
    let all = targets(root)?;
    let chosen: Vec<String> = match only {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_string()],
        Some(t) => bail!("no fuzz target {t:?} (targets: {})", all.join(", ")),
        None => all,
    };
    let target_dir = root.join("fuzz/target");
    eprintln!("[fuzz] building {} (nightly, AddressSanitizer; the first build takes a while)", chosen.join(", "));
    let mut build = cargo_nightly(root);
    build.args(["fuzz", "build"]).arg("--target-dir").arg(&target_dir);
    if let [one] = chosen.as_slice() {
        build.arg(one);
    }
    crate::run(&mut build)?;

    let mut runs = Vec::new();
    for target in &chosen {
        runs.push(run_target(root, &target_dir, target, seconds)?);
    }
    eprintln!("\n| target | executions in {seconds} s | result |\n|---|---:|---|");
    for r in &runs {
        let executions = r.executions.map_or("?".to_string(), |n| n.to_string());
        let result = r.crash.as_deref().map_or("ok".to_string(), |c| format!("CRASH: {c}"));
        eprintln!("| {} | {executions} | {result} |", r.target);
    }
    let crashed: Vec<&str> = runs.iter().filter(|r| r.crash.is_some()).map(|r| r.target.as_str()).collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {} (inputs in fuzz/artifacts/; fix, then keep each in fuzz/regressions/<target>/)", crashed.join(", "));
    }
    Ok(())
}

fn run_target(root: &Path, target_dir: &Path, target: &str, seconds: u64) -> Result<Run> {
    let work = root.join("fuzz/work").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut corpora: Vec<PathBuf> = vec![work];
    for kind in ["corpus", "regressions"] {
        let dir = root.join("fuzz").join(kind).join(target);
        if dir.is_dir() {
            corpora.push(dir);
        }
    }
    eprintln!("\n[fuzz] {target}: {seconds} s");
    let mut cmd = cargo_nightly(root);
    cmd.args(["fuzz", "run", target]).arg("--target-dir").arg(target_dir).args(&corpora);
    cmd.args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"]);
    let output = cmd.stdout(Stdio::inherit()).stderr(Stdio::piped()).output().with_context(|| format!("running cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    // libFuzzer's verdict, not its progress: the panic or sanitizer report
    // (up to its backtrace), where the input went, the final counts.
    let mut in_report = false;
    for line in log.lines() {
        if line.contains("panicked at") || line.contains("ERROR: AddressSanitizer") || line.contains("ERROR: libFuzzer") {
            in_report = true;
        }
        if in_report && (line.contains("stack backtrace:") || line.starts_with("SUMMARY")) {
            in_report = false;
        }
        let summary = line.starts_with("Done ") || line.starts_with("stat::") || line.contains("Test unit written to");
        if in_report || summary {
            eprintln!("  {line}");
        }
    }
    let executions = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .or_else(|| log.lines().rev().find_map(|l| l.strip_prefix("Done ").and_then(|r| r.split_whitespace().next())))
        .and_then(|n| n.trim().parse().ok());
    let crash = if output.status.success() {
        None
    } else {
        let artifact = log.lines().find_map(|l| l.split("Test unit written to ").nth(1)).map(str::trim);
        Some(artifact.map_or_else(|| format!("exit {}", output.status), str::to_string))
    };
    Ok(Run { target: target.to_string(), executions, crash })
}
