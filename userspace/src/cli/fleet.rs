//! The operator's side of a fleet: `policy push` (validate locally, then
//! write the key) and `fleet status` (what every host enforces and what it
//! rejected, from the hosts' own status keys).

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions};

use crate::fleet::status::HostStatus;
use crate::fleet::{EtcdOptions, EtcdSource, FleetError, Scope};
use crate::policy::{Policy, PolicyError};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["file", "delete"])))]
pub struct PushArgs {
    /// The policy file (validated as `policy check` does; nothing is
    /// written when it is invalid).
    pub file: Option<PathBuf>,
    /// Remove policy NAME from the scope instead.
    #[arg(long, value_name = "NAME")]
    pub delete: Option<String>,
    /// The fleet: etcd://HOST:PORT[,HOST:PORT…]/PREFIX (etcds:// for TLS).
    #[arg(long, env = "SBX_NET_ETCD")]
    pub etcd: String,
    /// Who the policy is for: all, group:NAME or host:NAME.
    #[arg(long, default_value = "all")]
    pub scope: String,
    #[command(flatten)]
    pub options: EtcdOptions,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[arg(long, env = "SBX_NET_ETCD")]
    pub etcd: String,
    /// `-o json`: {"revision", "hosts": [...]}.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: super::Output,
    /// The same as `-o json` (kept for scripts).
    #[arg(long, hide = true)]
    pub json: bool,
    #[command(flatten)]
    pub options: EtcdOptions,
}

impl StatusArgs {
    pub fn json(&self) -> bool {
        self.json || self.output == super::Output::Json
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetCliError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Compile(#[from] crate::policy::compile::CompileError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(std::io::Error),
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, FleetCliError>>) -> Result<T, FleetCliError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(FleetCliError::Runtime)?.block_on(f)
}

const DEADLINE: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, FleetCliError> {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(r) => Ok(r.map_err(FleetError::from)?),
        Err(_) => Err(FleetError::Timeout(what.to_string()).into()),
    }
}

/// Validates `file` as `policy check` does and returns its text (read
/// once: what is written is what was checked) and name.
fn validated(file: &Path) -> Result<(String, String), FleetCliError> {
    let source = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| PolicyError { file: source.clone(), line: 0, reason: format!("cannot read: {e}") })?;
    let policy = Policy::parse(&source, &text)?;
    crate::policy::compile::compile(&policy, &[])?;
    // Hosts ignore a key whose name segment is not a plain name.
    crate::fleet::layout::check_segment("policy name", &policy.name).map_err(|reason| PolicyError { file: source, line: 1, reason })?;
    Ok((text, policy.name))
}

/// `policy push`: the JSON it prints.
pub fn push(args: &PushArgs) -> Result<serde_json::Value, FleetCliError> {
    let source = EtcdSource::parse(&args.etcd)?;
    let scope = Scope::parse(&args.scope).map_err(FleetCliError::Usage)?;
    // Validate before connecting: a bad file never reaches the store.
    let file = match (&args.file, &args.delete) {
        (Some(file), None) => Some(validated(file)?),
        (None, Some(name)) => {
            crate::fleet::layout::check_segment("policy name", name).map_err(FleetCliError::Usage)?;
            None
        }
        _ => return Err(FleetCliError::Usage("give a policy FILE or --delete NAME".into())),
    };
    block_on(async {
        let mut client = args.options.connect(&source, DEADLINE).await?;
        match file {
            Some((text, name)) => {
                let key = source.layout.policy_key(&scope, &name);
                let put = bounded("writing the policy", client.put(key.clone(), text, None)).await?;
                let revision = put.header().map_or(0, |h| h.revision());
                Ok(serde_json::json!({ "key": key, "policy": name, "scope": scope.to_string(), "revision": revision }))
            }
            None => {
                let name = args.delete.clone().unwrap_or_default();
                let key = source.layout.policy_key(&scope, &name);
                let deleted = bounded("deleting the policy", client.delete(key.clone(), None::<DeleteOptions>)).await?;
                let revision = deleted.header().map_or(0, |h| h.revision());
                Ok(serde_json::json!({ "key": key, "policy": name, "scope": scope.to_string(), "deleted": deleted.deleted() > 0, "revision": revision }))
            }
        }
    })
}

/// `fleet status`: the revision of the latest policy write (a host whose
/// `revision` is below it has not seen it yet) and every host's status.
pub fn status(args: &StatusArgs) -> Result<(i64, Vec<HostStatus>), FleetCliError> {
    let source = EtcdSource::parse(&args.etcd)?;
    block_on(async {
        let mut client = args.options.connect(&source, DEADLINE).await?;
        let policies = bounded("reading the policies", client.get(source.layout.policies(), Some(GetOptions::new().with_prefix().with_keys_only()))).await?;
        // The newest write of a key still there (a delete leaves nothing to
        // read, though hosts see it as an event at its own revision).
        let revision = policies.kvs().iter().map(|kv| kv.mod_revision()).max().unwrap_or(0);
        let response = bounded("reading the statuses", client.get(source.layout.statuses(), Some(GetOptions::new().with_prefix()))).await?;
        let mut hosts = Vec::new();
        for kv in response.kvs() {
            match serde_json::from_slice::<HostStatus>(kv.value()) {
                Ok(status) => hosts.push(status),
                Err(e) => tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "not a host status: {e}"),
            }
        }
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        Ok((revision, hosts))
    })
}
