//! `cargo xtask package`: the Debian package, from built binaries and the
//! files under packaging/. `cargo xtask test` builds the same package from
//! the debug binaries (fast compression) for the package test, so the test
//! installs exactly what this code makes.
//!
//! What goes where (FHS, Debian):
//! - /usr/bin/sbx-net, /usr/lib/cni/sbx-net-cni
//! - /usr/lib/systemd/system/sbx-net.{service,socket}
//! - /etc/sbx-net/config.toml (a conffile: the defaults, all commented out)
//!   and /etc/sbx-net/policies/ (the daemon reads it when it exists)
//! - /usr/share/man/man1/sbx-net*.1.gz, shell completions for bash, zsh, fish
//! - /usr/share/sbx-net/schema/{policy,config}.schema.json,
//!   /usr/share/sbx-net/prometheus/, /usr/share/sbx-net/grafana/
//! - /usr/share/doc/sbx-net/: copyright, examples (policies, CNI config)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{output, run};

pub const PACKAGE: &str = "sbx-net";

/// How hard dpkg-deb compresses: a release is built once and downloaded
/// many times; the test package is built on every test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Release,
    Fast,
}

/// The shared libraries the binaries link (ldd) and the Debian packages
/// that provide them: `Depends:`. The package test checks this against ldd
/// of the installed binary, so a new link cannot go unlisted.
const DEPENDS: &str = "libc6 (>= 2.36), libgcc-s1, libnftnl11, libmnl0";

/// Files the package takes from the tree: (source under the repository,
/// destination in the package, mode).
const TREE_FILES: &[(&str, &str, u32)] = &[
    ("packaging/systemd/sbx-net.service", "usr/lib/systemd/system/sbx-net.service", 0o644),
    ("packaging/systemd/sbx-net.socket", "usr/lib/systemd/system/sbx-net.socket", 0o644),
    ("packaging/prometheus/sbx-net.rules.yml", "usr/share/sbx-net/prometheus/sbx-net.rules.yml", 0o644),
    ("packaging/prometheus/sbx-net.rules.test.yml", "usr/share/sbx-net/prometheus/sbx-net.rules.test.yml", 0o644),
    ("packaging/grafana/sbx-net.json", "usr/share/sbx-net/grafana/sbx-net.json", 0o644),
    ("packaging/cni/10-sbx-net.conflist", "usr/share/doc/sbx-net/examples/cni/10-sbx-net.conflist", 0o644),
    ("packaging/debian/copyright", "usr/share/doc/sbx-net/copyright", 0o644),
    ("packaging/debian/postinst", "DEBIAN/postinst", 0o755),
    ("packaging/debian/prerm", "DEBIAN/prerm", 0o755),
    ("packaging/debian/postrm", "DEBIAN/postrm", 0o755),
];

/// Builds `target/debian/sbx-net_VERSION_ARCH.deb` (under `out_dir`) from
/// the binaries in `bin_dir`; returns its path.
pub fn build_deb(root: &Path, bin_dir: &Path, out_dir: &Path, compression: Compression) -> Result<PathBuf> {
    let version = workspace_version(root)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture")).context("dpkg --print-architecture")?.trim().to_string();
    let stage = out_dir.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let dir = |p: &str| -> Result<PathBuf> {
        let d = stage.join(p);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    };

    // Binaries.
    let sbx_net = dir("usr/bin")?.join("sbx-net");
    install(&bin_dir.join("sbx-net"), &sbx_net, 0o755)?;
    install(&bin_dir.join("sbx-net-cni"), &dir("usr/lib/cni")?.join("sbx-net-cni"), 0o755)?;

    // What the binary generates from its own definitions.
    let generate = |args: &[&str]| -> Result<String> {
        let out = Command::new(&sbx_net).args(args).env_remove("SBX_NET_CONFIG").output().with_context(|| format!("running sbx-net {args:?}"))?;
        if !out.status.success() {
            bail!("sbx-net {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    };
    write(&dir("etc/sbx-net")?.join("config.toml"), &generate(&["config", "default"])?, 0o644)?;
    dir("etc/sbx-net/policies")?;
    let schema = dir("usr/share/sbx-net/schema")?;
    write(&schema.join("policy.schema.json"), &generate(&["policy", "schema"])?, 0o644)?;
    write(&schema.join("config.schema.json"), &generate(&["config", "schema"])?, 0o644)?;
    write(&dir("usr/share/bash-completion/completions")?.join("sbx-net"), &generate(&["completions", "bash"])?, 0o644)?;
    write(&dir("usr/share/zsh/vendor-completions")?.join("_sbx-net"), &generate(&["completions", "zsh"])?, 0o644)?;
    write(&dir("usr/share/fish/vendor_completions.d")?.join("sbx-net.fish"), &generate(&["completions", "fish"])?, 0o644)?;
    let man = dir("usr/share/man/man1")?;
    generate(&["manpages", "--dir", &man.display().to_string()])?;
    // Debian compresses man pages; -n keeps the archive reproducible.
    run(Command::new("gzip").arg("-9nf").args(std::fs::read_dir(&man)?.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>()?))?;

    // Files from the tree.
    for (from, to, mode) in TREE_FILES {
        let to = stage.join(to);
        dir(&to.parent().expect("has parent").strip_prefix(&stage).expect("inside").display().to_string())?;
        install(&root.join(from), &to, *mode)?;
    }
    let examples = dir("usr/share/doc/sbx-net/examples/policies")?;
    for entry in std::fs::read_dir(root.join("policies"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            install(&path, &examples.join(path.file_name().expect("a file")), 0o644)?;
        }
    }

    // Control files.
    write(&stage.join("DEBIAN/conffiles"), "/etc/sbx-net/config.toml\n", 0o644)?;
    let installed_kib = installed_size_kib(&stage)?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: sbx-net developers <sbx-net@example.org>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {DEPENDS}\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/sbx-net/sbx-net\n\
         Description: host-side network enforcement for AI-agent sandboxes\n \
         eBPF classifiers on every microVM tap enforce per-sandbox domain, IP and\n \
         CIDR policy (deny wins); a DNS proxy keeps the maps in step with the\n \
         answers; a TLS-terminating proxy injects credentials the VM never sees.\n \
         Ships the daemon and CLI, systemd units (socket activation), a CNI\n \
         plugin, JSON Schemas, Prometheus rules and a Grafana dashboard.\n"
    );
    write(&stage.join("DEBIAN/control"), &control, 0o644)?;

    // Whatever the umask, directories are 0755 (dpkg-deb refuses a
    // control directory it cannot trust).
    set_dir_modes(&stage)?;
    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let compress = match compression {
        Compression::Release => ["-Zxz", "-z9"],
        Compression::Fast => ["-Zgzip", "-z1"],
    };
    run(Command::new("dpkg-deb").arg("--root-owner-group").args(compress).arg("--build").arg(&stage).arg(&deb))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(deb)
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).with_context(|| format!("copying {} into the package", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The workspace's `version` (Cargo.toml's [workspace.package]).
fn workspace_version(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package {
            if let Some(v) = line.strip_prefix("version").map(str::trim).and_then(|r| r.strip_prefix('=')) {
                return Ok(v.trim().trim_matches('"').to_string());
            }
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// Installed-Size: KiB of the files outside DEBIAN/.
fn installed_size_kib(stage: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name() == "DEBIAN" {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(stage, &mut total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_workspaces() {
        let v = workspace_version(&crate::workspace_root()).unwrap();
        assert!(v.split('.').count() == 3 && v.split('.').all(|p| p.parse::<u32>().is_ok()), "{v}");
    }

    #[test]
    fn every_tree_file_exists() {
        let root = crate::workspace_root();
        for (from, _, _) in TREE_FILES {
            assert!(root.join(from).is_file(), "{from} is missing");
        }
    }
}
