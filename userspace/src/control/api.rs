//! The control protocol between the CLI and the daemon: one JSON request
//! per line on the Unix socket, one JSON response line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    SandboxCreate {
        name: String,
        policy: String,
        tap: Option<String>,
        netns_guest: bool,
        /// Run a microVM on the sandbox's tap (`--vm`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<VmCreate>,
    },
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
    /// Hand the listeners to a new data plane (the daemon's executable)
    /// and let the old one drain.
    Upgrade,
}

/// The microVM `sandbox create --vm` starts: the test guest with this
/// probe script (the CLI sends the file's text; none: it serves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCreate {
    pub probe: Option<String>,
    pub memory_mib: Option<u32>,
}

/// A sandbox's microVM, as `sandbox show` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub pid: u32,
    /// "running" or "exited".
    pub state: String,
    /// The guest's console (JSON lines of the test guest) and the VMM's log.
    pub console: String,
}

/// The answer to a request: `{"ok": VALUE}` or `{"error": MESSAGE,
/// "kind": KIND}`. `error` stays the message, as it always was; `kind`
/// was added beside it, and a response without one (an older daemon) reads
/// as [`ErrorKind::Internal`].
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Ok(Value),
    Error(ErrorReply),
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply { kind, message: message.into() })
    }
}

/// A refused or failed request: what went wrong, and its kind, which
/// scripts (and the CLI's exit status) act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

/// What kind of failure a request met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// What the request names does not exist (a sandbox, a policy).
    NotFound,
    /// What the request would create exists already.
    AlreadyExists,
    /// The request collides with what is there now: the address pools are
    /// full, the tap belongs to another sandbox, a policy is in use.
    Conflict,
    /// The daemon cannot serve requests now.
    Unavailable,
    /// The request itself is wrong (a bad name, flags that exclude each other).
    Invalid,
    /// The policy given is not valid.
    InvalidPolicy,
    /// Anything else: the message says what.
    Internal,
}

impl ErrorKind {
    const NAMES: [(ErrorKind, &'static str); 7] = [
        (ErrorKind::NotFound, "not_found"),
        (ErrorKind::AlreadyExists, "already_exists"),
        (ErrorKind::Conflict, "conflict"),
        (ErrorKind::Unavailable, "unavailable"),
        (ErrorKind::Invalid, "invalid"),
        (ErrorKind::InvalidPolicy, "invalid_policy"),
        (ErrorKind::Internal, "internal"),
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        Self::NAMES.iter().find(|(k, _)| *k == self).map(|(_, n)| *n).expect("every kind is named")
    }

    /// A kind from its wire name; one this build does not know (a newer
    /// daemon's) is [`ErrorKind::Internal`].
    pub fn from_name(name: &str) -> ErrorKind {
        Self::NAMES.iter().find(|(_, n)| *n == name).map_or(ErrorKind::Internal, |(k, _)| *k)
    }

    /// The CLI's exit status for this kind (sysexits(3), see [`exit_code`]).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::NotFound => exit_code::NOINPUT,
            ErrorKind::AlreadyExists => exit_code::CANTCREAT,
            ErrorKind::Conflict => exit_code::TEMPFAIL,
            ErrorKind::Unavailable => exit_code::UNAVAILABLE,
            ErrorKind::Invalid => exit_code::USAGE,
            ErrorKind::InvalidPolicy => exit_code::DATAERR,
            ErrorKind::Internal => exit_code::FAILURE,
        }
    }
}

/// The CLI's exit statuses: sysexits(3) where one fits, 1 otherwise.
pub mod exit_code {
    /// Any failure without a more specific status.
    pub const FAILURE: u8 = 1;
    /// EX_USAGE: the command was given wrongly (arguments, flags, a name).
    pub const USAGE: u8 = 64;
    /// EX_DATAERR: a policy is not valid.
    pub const DATAERR: u8 = 65;
    /// EX_NOINPUT: what the command names does not exist.
    pub const NOINPUT: u8 = 66;
    /// EX_UNAVAILABLE: the daemon cannot be reached (or stopped answering).
    pub const UNAVAILABLE: u8 = 69;
    /// EX_CANTCREAT: what the command would create exists already.
    pub const CANTCREAT: u8 = 73;
    /// EX_TEMPFAIL: busy or in conflict (the pools are full; another daemon
    /// holds the data path): try again later.
    pub const TEMPFAIL: u8 = 75;
    /// EX_PROTOCOL: the daemon's answer could not be read.
    pub const PROTOCOL: u8 = 76;
    /// EX_CONFIG: the configuration is wrong (the config file, a flag
    /// overriding it, or what systemd passed the daemon): starting again
    /// will not help.
    pub const CONFIG: u8 = 78;
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Response::Ok(value) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("ok", value)?;
                map.end()
            }
            Response::Error(reply) => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("error", &reply.message)?;
                map.serialize_entry("kind", reply.kind.as_str())?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = serde_json::Map::<String, Value>::deserialize(deserializer)?;
        if let Some(value) = map.remove("ok") {
            return Ok(Response::Ok(value));
        }
        match map.remove("error") {
            Some(Value::String(message)) => {
                let kind = map.get("kind").and_then(Value::as_str).map_or(ErrorKind::Internal, ErrorKind::from_name);
                Ok(Response::Error(ErrorReply { kind, message }))
            }
            _ => Err(serde::de::Error::custom("expected {\"ok\": …} or {\"error\": \"…\"}")),
        }
    }
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
    /// The policy's `[filesystem]` mounts: one virtio-blk each in its VM.
    #[serde(default)]
    pub mounts: Vec<crate::policy::Mount>,
    /// The microVM the daemon runs on the tap (`--vm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `sbx-net daemon` running? --socket selects another)")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable response: {0}")]
    Protocol(String),
    #[error("{message}")]
    Daemon { kind: ErrorKind, message: String },
}

impl ClientError {
    /// The CLI's exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Connect { .. } | ClientError::Io(_) => exit_code::UNAVAILABLE,
            ClientError::Protocol(_) => exit_code::PROTOCOL,
            ClientError::Daemon { kind, .. } => kind.exit_code(),
        }
    }
}

impl From<ErrorReply> for ClientError {
    fn from(reply: ErrorReply) -> ClientError {
        ClientError::Daemon { kind: reply.kind, message: reply.message }
    }
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
        Ok(Response::Error(reply)) => Err(reply.into()),
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
        if let Ok(Response::Error(reply)) = serde_json::from_str::<Response>(&line) {
            return Err(reply.into());
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
        let r = Request::SandboxCreate { name: "a".into(), policy: "default".into(), tap: None, netns_guest: true, vm: None };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"sandbox_create","name":"a","policy":"default","tap":null,"netns_guest":true}"#
        );
        assert_eq!(serde_json::to_string(&Response::error(ErrorKind::NotFound, "x")).unwrap(), r#"{"error":"x","kind":"not_found"}"#);
        assert_eq!(serde_json::to_string(&Response::Ok(serde_json::json!([1]))).unwrap(), r#"{"ok":[1]}"#);
        assert_eq!(format_mac([2, 0x5b, 0, 0, 0, 1]), "02:5b:00:00:00:01");
    }

    #[test]
    fn an_error_without_a_kind_still_reads() {
        // What daemons answered before errors had kinds.
        let old: Response = serde_json::from_str(r#"{"error":"no sandbox named \"a\""}"#).unwrap();
        assert_eq!(old, Response::error(ErrorKind::Internal, "no sandbox named \"a\""));
        let newer: Response = serde_json::from_str(r#"{"error":"x","kind":"quota_exceeded"}"#).unwrap();
        assert_eq!(newer, Response::error(ErrorKind::Internal, "x"), "a kind this build does not know");
        assert!(serde_json::from_str::<Response>(r#"{"neither":1}"#).is_err());
        assert!(serde_json::from_str::<Response>(r#"{"error":5}"#).is_err());
    }

    #[test]
    fn every_kind_round_trips_by_name() {
        for (kind, name) in ErrorKind::NAMES {
            assert_eq!(kind.as_str(), name);
            assert_eq!(ErrorKind::from_name(name), kind);
            let wire = serde_json::to_string(&Response::error(kind, "m")).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&wire).unwrap(), Response::error(kind, "m"));
        }
    }

    #[test]
    fn each_kind_exits_with_its_sysexits_code() {
        let codes: Vec<(&str, u8)> = ErrorKind::NAMES.iter().map(|(k, n)| (*n, k.exit_code())).collect();
        assert_eq!(
            codes,
            [("not_found", 66), ("already_exists", 73), ("conflict", 75), ("unavailable", 69), ("invalid", 64), ("invalid_policy", 65), ("internal", 1)]
        );
        let unreachable = ClientError::Connect { path: "/run/x.sock".into(), source: std::io::ErrorKind::NotFound.into() };
        assert_eq!(unreachable.exit_code(), 69);
        assert_eq!(ClientError::Protocol("garbage".into()).exit_code(), 76);
        let busy: ClientError = ErrorReply { kind: ErrorKind::Conflict, message: "the address pools are full".into() }.into();
        assert_eq!((busy.exit_code(), busy.to_string().as_str()), (75, "the address pools are full"));
        assert_eq!(crate::control::instance_lock::EXIT_LOCKED, exit_code::TEMPFAIL, "a held data path is busy too");
    }
}
