//! What a VMM or runtime needs to put a VM on a sandbox's tap, in its own
//! terms: `sandbox create … -o json|firecracker|cloud-hypervisor|env`.
//! Pure: a [`SandboxInfo`] in, text out.

use crate::control::api::SandboxInfo;

/// The output formats of `sandbox create` / `sandbox show`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The daemon's full answer (one line of JSON).
    Json,
    /// Firecracker's network-interfaces object.
    Firecracker,
    /// Cloud Hypervisor's `--net` argument.
    CloudHypervisor,
    /// Shell variables (`SBX_NET_TAP=…`), for scripts.
    Env,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("serialising the sandbox: {0}")]
    Json(#[from] serde_json::Error),
}

/// The sandbox as `format` wants it.
pub fn render(format: Format, info: &SandboxInfo) -> Result<String, HandoffError> {
    match format {
        Format::Json | Format::Firecracker | Format::CloudHypervisor | Format::Env => Ok(serde_json::to_string(info)?),
    }
}
