//! Builds the test guest (`guest/`, no_std, x86_64-unknown-none) with the
//! same toolchain and embeds its image in sbx-vmm (`probe::IMAGE`): the
//! monitor carries its guest, as the daemon carries its eBPF program.
//!
//! The guest has its own workspace and target triple; it builds into
//! `<target>/sbx-net-guest`, shared by the debug and release builds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../guest");
    for watched in ["src", "Cargo.toml", "Cargo.lock", "link.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(watched).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<package>/out.
    let target_dir = out.ancestors().nth(4).map(|t| t.join("sbx-net-guest")).unwrap_or_else(|| out.join("guest-target"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&guest).args(["build", "--release", "--locked", "--target", "x86_64-unknown-none", "--target-dir"]).arg(&target_dir);
    // The outer build's flags are for the host; the guest's are in its
    // own .cargo/config.toml.
    // A `cargo clippy` of the workspace is not one of the guest either.
    for flags in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER", "CLIPPY_ARGS"] {
        build.env_remove(flags);
    }
    let status = build.status().expect("running cargo for the test guest");
    assert!(
        status.success(),
        "building the test guest (guest/) failed; it needs the x86_64-unknown-none target: `rustup target add x86_64-unknown-none` (`cargo xtask bootstrap` adds it)"
    );
    let image = target_dir.join("x86_64-unknown-none/release/sbx-net-guest");
    std::fs::copy(&image, out.join("sbx-net-guest")).unwrap_or_else(|e| panic!("copying {}: {e}", image.display()));
}
