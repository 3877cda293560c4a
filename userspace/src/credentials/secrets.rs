//! Credential secrets: read from their host-side sources (environment or
//! file) when policies load or reload, held only in daemon memory, zeroed
//! when dropped, and never printed — `Debug` is redacted and there is no
//! `Display`, so a secret cannot reach a log line or an error by accident.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::policy::{CredentialSource, Policy};

pub struct Secret {
    value: Zeroizing<String>,
    /// Its forms for scrubbing responses, made once per loaded secret (the
    /// matcher is some hundreds of kilobytes; every sandbox of a policy
    /// shares it).
    scrub: std::sync::OnceLock<crate::credentials::scrub::Patterns>,
}

impl Secret {
    fn new(value: Zeroizing<String>) -> Secret {
        Secret { value, scrub: std::sync::OnceLock::new() }
    }

    /// A secret the daemon read and handed to the data plane.
    pub fn from_value(value: String) -> Secret {
        Secret::new(Zeroizing::new(value))
    }

    /// The value, for the one place that builds the injected header.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The scrubbing patterns of this secret as injected in
    /// `injected_value` (one credential, one format: the first call's
    /// value is the one for every later call).
    pub fn scrub_patterns(&self, injected_value: &[u8]) -> Result<crate::credentials::scrub::Patterns, crate::credentials::scrub::ScrubError> {
        if let Some(p) = self.scrub.get() {
            return Ok(p.clone());
        }
        let p = crate::credentials::scrub::Patterns::for_secret(self.value.as_bytes(), injected_value)?;
        // Two first calls at once build it twice; one is kept.
        Ok(self.scrub.get_or_init(|| p).clone())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Reads one secret. Errors name the source, never a value.
pub fn load_secret(source: &CredentialSource) -> Result<Secret, String> {
    let value = match source {
        CredentialSource::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?),
        CredentialSource::File(path) => {
            let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {}", e.kind()))?);
            // Files usually end with a newline that is not part of the secret.
            Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_string())
        }
    };
    if value.is_empty() {
        return Err(match source {
            CredentialSource::Env(var) => format!("environment variable {var} is empty"),
            CredentialSource::File(path) => format!("{path} is empty"),
        });
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        // It goes into an HTTP header: no line breaks.
        return Err("the secret contains a line break or NUL".into());
    }
    Ok(Secret::new(value))
}

/// The secrets of every credential of a set of policies, by (policy,
/// credential): loaded, or why not (the credential is then unavailable:
/// nothing is injected for it, and status says so).
#[derive(Debug, Default)]
pub struct SecretStore {
    pub secrets: BTreeMap<(String, String), Result<std::sync::Arc<Secret>, String>>,
}

impl SecretStore {
    pub fn load<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> SecretStore {
        let mut secrets = BTreeMap::new();
        for policy in policies {
            for c in &policy.credentials {
                secrets.insert((policy.name.clone(), c.name.clone()), load_secret(&c.source).map(std::sync::Arc::new));
            }
        }
        SecretStore { secrets }
    }

    /// Availability per credential, for `status` and `policy list`.
    pub fn report(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.secrets
                .iter()
                .map(|((policy, name), r)| {
                    serde_json::json!({
                        "policy": policy,
                        "credential": name,
                        "available": r.is_ok(),
                        "reason": r.as_ref().err(),
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_errors_and_redaction() {
        let dir = std::env::temp_dir().join(format!("sbx-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cr3t-file-value\n").unwrap();
        let s = load_secret(&CredentialSource::File(file.display().to_string())).unwrap();
        assert_eq!(s.expose(), "s3cr3t-file-value");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        // Its scrubbing patterns are made once, whatever asks again.
        let p = s.scrub_patterns(b"Bearer s3cr3t-file-value").unwrap();
        assert!(p.shares(&s.scrub_patterns(b"Bearer s3cr3t-file-value").unwrap()));
        assert!(p.is_match(b"x s3cr3t-file-value") && !format!("{p:?}").contains("s3cr3t"));
        std::fs::write(&file, "a\nb").unwrap();
        assert!(load_secret(&CredentialSource::File(file.display().to_string())).unwrap_err().contains("line break"));
        std::fs::write(&file, "").unwrap();
        assert!(load_secret(&CredentialSource::File(file.display().to_string())).unwrap_err().contains("empty"));
        let e = load_secret(&CredentialSource::Env("SBX_NET_TEST_SURELY_UNSET".into())).unwrap_err();
        assert!(e.contains("SBX_NET_TEST_SURELY_UNSET is not set"), "{e}");
        let e = load_secret(&CredentialSource::File("/nonexistent/token".into())).unwrap_err();
        assert!(e.contains("/nonexistent/token"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let policy = Policy::parse(
            "p.toml",
            "name = \"p\"\n[network]\nallow = [\"api.test\"]\n[[credentials]]\nname = \"t\"\nhosts = [\"api.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {secret}\"\nsource = { env = \"SBX_NET_TEST_SURELY_UNSET\" }\n",
        )
        .unwrap();
        let store = SecretStore::load([&policy]);
        let report = store.report().to_string();
        assert!(report.contains("\"available\":false") && report.contains("is not set"), "{report}");
        assert!(format!("{store:?}").contains("Err"));
    }
}
