//! The control protocol between the CLI and the daemon: one JSON request
//! per line on the Unix socket, one JSON response line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    SandboxCreate { name: String, policy: String, tap: Option<String>, netns_guest: bool },
    SandboxList,
    SandboxShow { name: String },
    SandboxDelete { name: String },
    /// `source` is the path the CLI read (for error messages); `text` its content.
    PolicyApply { source: String, text: String },
    PolicyList,
    PolicyReload,
    PolicyTest { sandbox: String, destination: String },
    Status,
    /// Streams [`crate::observe::hub::StreamLine`]s: the history, then (with
    /// `follow`) live records until the client disconnects.
    Inspect { follow: bool },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
}

/// What `sandbox create` and `sandbox show` print (stable field names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub name: String,
    pub id: u32,
    pub policy: String,
    pub policy_generation: u64,
    pub tap: String,
    pub adopted_tap: bool,
    /// The guest network namespace (`--netns-guest`), for `ip netns exec`.
    pub netns: Option<String>,
    pub guest_ipv4: String,
    pub guest_ipv6: String,
    pub guest_mac: String,
    pub gateway_ipv4: String,
    pub gateway_ipv6: String,
    pub gateway_mac: String,
    pub ipv4_prefix_len: u8,
    pub ipv6_prefix_len: u8,
    /// The resolver the guest uses (its gateway; redirected to the DNS proxy).
    pub dns: String,
    /// The CA certificate the guest must trust (empty until the credential
    /// proxy terminates TLS).
    pub ca_cert: String,
    pub created_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `sbx-net daemon` running? --socket selects another)")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable response: {0}")]
    Protocol(String),
    #[error("{0}")]
    Daemon(String),
}

/// Sends one request and waits (up to `timeout`) for its response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut response = String::new();
    reader.read_line(&mut response)?;
    match serde_json::from_str::<Response>(&response) {
        Ok(Response::Ok(value)) => Ok(value),
        Ok(Response::Error(message)) => Err(ClientError::Daemon(message)),
        Err(e) => Err(ClientError::Protocol(format!("{e}: {:?}", response.trim_end()))),
    }
}

/// Opens an `inspect` stream: yields the daemon's lines as they come.
pub fn inspect_stream(socket: &Path, follow: bool) -> Result<impl Iterator<Item = Result<crate::observe::hub::StreamLine, ClientError>>, ClientError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    let mut line = serde_json::to_string(&Request::Inspect { follow }).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    Ok(BufReader::new(stream).lines().map(|line| {
        let line = line?;
        if let Ok(Response::Error(message)) = serde_json::from_str::<Response>(&line) {
            return Err(ClientError::Daemon(message));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(format!("{e}: {line:?}")))
    }))
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request::SandboxCreate { name: "a".into(), policy: "default".into(), tap: None, netns_guest: true };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"sandbox_create","name":"a","policy":"default","tap":null,"netns_guest":true}"#
        );
        assert_eq!(serde_json::to_string(&Response::Error("x".into())).unwrap(), r#"{"error":"x"}"#);
        assert_eq!(format_mac([2, 0x5b, 0, 0, 0, 1]), "02:5b:00:00:00:01");
    }
}
