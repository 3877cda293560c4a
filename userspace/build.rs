//! Builds the eBPF object (ebpf/prog, nightly, bpfel-unknown-none) with
//! aya-build and leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .join("../ebpf/prog")
        .canonicalize()
        .context("locating ebpf/prog")?;
    let root = root.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={root}/../common/src");
    let package = aya_build::Package {
        name: "sbx-net-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
