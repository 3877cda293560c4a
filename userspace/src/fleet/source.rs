//! `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` and the connection options etcd
//! users expect (etcdctl's names: CA, client certificate and key, user and
//! password).

use std::path::PathBuf;
use std::time::Duration;

use super::layout::Layout;
use super::FleetError;

/// Where a fleet's policies are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSource {
    /// `http://HOST:PORT` or `https://HOST:PORT`, as given.
    pub endpoints: Vec<String>,
    pub layout: Layout,
    pub tls: bool,
    /// The URL as written (status, logs, the cache's owner).
    pub url: String,
}

impl EtcdSource {
    /// `etcd://` (plain) or `etcds://` (TLS) endpoints, then `/PREFIX`.
    pub fn parse(url: &str) -> Result<EtcdSource, FleetError> {
        let bad = |why: &str| FleetError::BadSource { url: url.to_string(), reason: why.to_string() };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("etcds://") {
            (true, rest)
        } else {
            return Err(bad("expected etcd://HOST:PORT[,HOST:PORT…]/PREFIX (or etcds:// for TLS)"));
        };
        let (hosts, prefix) = rest.split_once('/').ok_or_else(|| bad("no /PREFIX after the endpoints"))?;
        let prefix = format!("/{}", prefix.trim_end_matches('/'));
        if prefix == "/" {
            return Err(bad("the prefix is empty: give one, e.g. etcd://127.0.0.1:2379/sbx-net"));
        }
        if prefix.split('/').skip(1).any(|s| super::layout::check_segment("prefix segment", s).is_err()) {
            return Err(bad("prefix segments use letters, digits, '.', '-' and '_' only"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host.rsplit_once(':').ok_or_else(|| bad(&format!("endpoint {host:?} has no :PORT")))?;
            if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("endpoint {host:?} is not HOST:PORT")));
            }
            if host.contains(['@', '?', '#']) {
                return Err(bad(&format!("endpoint {host:?} is not HOST:PORT")));
            }
            endpoints.push(format!("{}://{host}", if tls { "https" } else { "http" }));
        }
        Ok(EtcdSource { endpoints, layout: Layout { prefix }, tls, url: url.to_string() })
    }
}

/// Connection options (the same flags for the daemon and the CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdOptions {
    /// CA bundle (PEM) that signs the etcd servers' certificates (etcds://).
    #[arg(long, value_name = "PEM")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert auth (etcds://).
    #[arg(long, value_name = "PEM", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "PEM", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (role-based access); the password comes from
    /// --etcd-password-file or SBX_NET_ETCD_PASSWORD.
    #[arg(long)]
    pub etcd_user: Option<String>,
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdOptions {
    fn read(path: &PathBuf) -> Result<String, FleetError> {
        std::fs::read_to_string(path).map_err(|e| FleetError::Read { path: path.display().to_string(), source: e })
    }

    /// The client's options, files read now (a missing file is an error
    /// at start, not at the first reconnect).
    pub fn connect_options(&self, source: &EtcdSource) -> Result<etcd_client::ConnectOptions, FleetError> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // A dead server or path is noticed in seconds: the watcher
            // reconnects and resumes from its revision.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(user) = &self.etcd_user {
            let password = match &self.etcd_password_file {
                Some(path) => Self::read(path)?.trim_end_matches(['\n', '\r']).to_string(),
                None => std::env::var("SBX_NET_ETCD_PASSWORD").map_err(|_| FleetError::BadOptions("--etcd-user needs --etcd-password-file or SBX_NET_ETCD_PASSWORD".into()))?,
            };
            // etcd's simple tokens expire after minutes of quiet: renewed
            // on demand instead of failing the next request.
            options = options.with_user(user.clone(), password).with_auto_token_refresh(true);
        }
        let wants_tls = self.etcd_cacert.is_some() || self.etcd_cert.is_some();
        if wants_tls && !source.tls {
            return Err(FleetError::BadOptions("TLS options need an etcds:// source".into()));
        }
        if source.tls {
            let mut tls = etcd_client::TlsOptions::new();
            match &self.etcd_cacert {
                Some(ca) => tls = tls.ca_certificate(etcd_client::Certificate::from_pem(Self::read(ca)?)),
                None => tls = tls.with_webpki_roots(),
            }
            if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
                tls = tls.identity(etcd_client::Identity::from_pem(Self::read(cert)?, Self::read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// A connected client (within `deadline`).
    pub async fn connect(&self, source: &EtcdSource, deadline: Duration) -> Result<etcd_client::Client, FleetError> {
        let options = self.connect_options(source)?;
        let connect = etcd_client::Client::connect(&source.endpoints, Some(options));
        match tokio::time::timeout(deadline, connect).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(FleetError::Timeout(format!("connecting to {}", source.endpoints.join(",")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = EtcdSource::parse("etcd://127.0.0.1:2379,[::1]:2379/sbx/prod/").unwrap();
        assert_eq!(s.endpoints, vec!["http://127.0.0.1:2379", "http://[::1]:2379"]);
        assert_eq!(s.layout.prefix, "/sbx/prod");
        assert!(!s.tls);
        let s = EtcdSource::parse("etcds://etcd.example:2379/f").unwrap();
        assert_eq!(s.endpoints, vec!["https://etcd.example:2379"]);
        assert!(s.tls);
        for bad in ["http://h:1/p", "etcd://h:1", "etcd://h:1/", "etcd://h/p", "etcd://h:0/p", "etcd://:1/p", "etcd://h:1,/p", "etcd://u@h:1/p", "etcd://h:1/a b", "etcd://h:1/a//b"] {
            assert!(EtcdSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_options_need_etcds() {
        let plain = EtcdSource::parse("etcd://h:1/p").unwrap();
        let opts = EtcdOptions { etcd_cacert: Some("/nonexistent".into()), ..Default::default() };
        assert!(matches!(opts.connect_options(&plain), Err(FleetError::BadOptions(_))));
        let tls = EtcdSource::parse("etcds://h:1/p").unwrap();
        assert!(matches!(opts.connect_options(&tls), Err(FleetError::Read { .. })));
        let user = EtcdOptions { etcd_user: Some("u".into()), etcd_password_file: Some("/nonexistent".into()), ..Default::default() };
        assert!(matches!(user.connect_options(&plain), Err(FleetError::Read { .. })));
    }
}
