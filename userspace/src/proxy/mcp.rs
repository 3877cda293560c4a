//! MCP at the proxy: JSON-RPC requests to an `[[mcp]]` server's host are
//! parsed (Streamable HTTP and the older HTTP+SSE transport, batches
//! included); a `tools/call` for an unlisted tool is answered with a
//! JSON-RPC error naming the rule and never reaches the server; `tools/list`
//! answers (JSON or event streams) are filtered to the allowed tools; every
//! message is a flow record (`mcp` protocol), arguments never logged.
//!
//! The guest is hostile, so the body is read the one way the proxy decides
//! on and forwarded in that reading: parsed strictly (a duplicate object
//! key anywhere is refused, since parsers disagree on which one counts),
//! then serialised again, so the server gets exactly the messages that
//! were checked. A batch with one refused call is refused whole: nothing
//! of it reaches the server. Malformed `tools/call`s (a name that is not a
//! string, no params) are refused in audit mode too: they are not a policy
//! question, and no server can do anything meaningful with them.
//!
//! The old HTTP+SSE transport answers on the client's GET event stream,
//! not on the POST: a stream that names its message endpoint is
//! registered (by sandbox, server and endpoint), and a refused POST to
//! that endpoint gets 202 while its JSON-RPC errors go down the stream.
//!
//! The answers are filtered for the agent's benefit (it is not shown tools
//! it cannot call); the enforcement is the call check. The pure parts
//! ([`inspect_request_body`], [`filter_json_body`], [`SseFilter`]) are
//! unit-tested and fuzzed ([`fuzz`]); the entry points only move bodies.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Frame};
use hyper::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

use crate::observe::hub::FlowContext;
use crate::observe::record::{McpDetail, Verdict};
use crate::policy::mcp::ToolVerdict;
use crate::policy::McpServer;
use crate::proxy::inject::ProxyBody;

/// The largest request body read (a JSON-RPC request is small; a bigger
/// one is refused rather than forwarded unread).
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// The largest JSON answer buffered for filtering.
pub const MAX_RESPONSE_BODY: usize = 8 << 20;
/// The largest server-sent event (lines and data together).
pub const MAX_EVENT: usize = 4 << 20;
/// MCP names tools in at most 128 characters; anything much longer is not
/// a tool name and would only bloat the rule text and the records.
const MAX_TOOL_NAME: usize = 256;
/// How much of a method name a record keeps.
const MAX_RECORDED_METHOD: usize = 128;
/// The JSON-RPC error code of a call the policy refused (the range -32000
/// to -32099 is for implementation-defined server errors).
pub const DENIED_CODE: i64 = -32001;
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;

/// Why a body could not be read as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("not JSON: {0}")]
    Syntax(String),
    /// Two keys of one object decode to the same string.
    #[error("{0}")]
    DuplicateKey(String),
}

/// A JSON value read with every object's keys checked for duplicates
/// (after unescaping: `"name"` and `"n\u0061me"` are the same key).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity: from_f64 only fails for those.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key {:?}", truncate(&key, 64))));
            }
            let Strict(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// Parses `bytes` as one JSON value, refusing duplicate keys (serde_json's
/// nesting limit bounds the recursion).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(v)) => Ok(v),
        // The visitor accepts every JSON value: a data error is ours.
        Err(e) if e.classify() == serde_json::error::Category::Data => Err(JsonError::DuplicateKey(e.to_string())),
        Err(e) => Err(JsonError::Syntax(e.to_string())),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One flow record to publish for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRecord {
    pub verdict: Verdict,
    pub reason: &'static str,
    pub rule: String,
    pub method: String,
    pub tool: Option<String>,
}

/// What becomes of a request body.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestCheck {
    /// Forward `body` (the checked messages, serialised again).
    Forward { body: Bytes, records: Vec<McpRecord> },
    /// Answer the guest instead: `answer` (a JSON-RPC error or an array of
    /// them; none when only notifications were refused) with `status` and
    /// `X-Sbx-Net-Denied: denied`.
    Refuse { status: StatusCode, denied: String, answer: Option<Value>, records: Vec<McpRecord> },
}

/// What one message of a request is.
enum Message {
    Call { tool: String },
    /// Any other request or notification.
    Other { method: String },
    /// A JSON-RPC response the client sends back (to a server's sampling
    /// or elicitation request).
    Response,
    /// Refused whatever the policy: (JSON-RPC code, why).
    Invalid(i64, &'static str),
}

/// Whether `method` is `tools/call` as some server might read it: exact,
/// or another case or padding (JSON-RPC methods are case-sensitive, but a
/// lenient server must not be handed an unchecked call).
fn is_tools_call(method: &str) -> bool {
    method.trim_matches(|c: char| c.is_whitespace() || c == '\0').eq_ignore_ascii_case("tools/call")
}

fn classify(message: &Value) -> Message {
    let Some(object) = message.as_object() else { return Message::Invalid(INVALID_REQUEST, "a JSON-RPC message must be an object") };
    let Some(method) = object.get("method") else {
        if object.contains_key("result") || object.contains_key("error") {
            return Message::Response;
        }
        return Message::Invalid(INVALID_REQUEST, "a JSON-RPC message without a method");
    };
    let Some(method) = method.as_str() else { return Message::Invalid(INVALID_REQUEST, "the JSON-RPC method is not a string") };
    if !is_tools_call(method) {
        return Message::Other { method: truncate(method, MAX_RECORDED_METHOD).to_string() };
    }
    match object.get("params").and_then(|p| p.get("name")) {
        Some(Value::String(tool)) if tool.len() <= MAX_TOOL_NAME => Message::Call { tool: tool.clone() },
        Some(Value::String(_)) => Message::Invalid(INVALID_PARAMS, "the tools/call name is too long"),
        _ => Message::Invalid(INVALID_PARAMS, "the tools/call params.name is not a string"),
    }
}

fn error_object(id: Value, code: i64, message: String, data: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
}

fn record(verdict: Verdict, reason: &'static str, rule: &str, method: &str, tool: Option<&str>) -> McpRecord {
    McpRecord { verdict, reason, rule: rule.to_string(), method: method.to_string(), tool: tool.map(str::to_string) }
}

/// Refuses the whole body before reading any message of it.
fn refuse_body(server: &McpServer, code: i64, why: String, reason: &'static str) -> RequestCheck {
    let rule = server.describe();
    let answer = error_object(Value::Null, code, format!("sbx-net: refused: {why}"), json!({"rule": rule, "reason": why}));
    RequestCheck::Refuse { status: StatusCode::OK, denied: why, answer: Some(answer), records: vec![record(Verdict::Denied, reason, &rule, "-", None)] }
}

/// Decides a POSTed body: every message classified and every `tools/call`
/// asked of the allowlist; forwarded whole or refused whole.
pub fn inspect_request_body(body: &[u8], server: &McpServer) -> RequestCheck {
    let value = match parse_strict(body) {
        Ok(v) => v,
        Err(JsonError::Syntax(_)) => return refuse_body(server, PARSE_ERROR, "the MCP request body is not JSON".into(), "parse_error"),
        Err(JsonError::DuplicateKey(e)) => return refuse_body(server, PARSE_ERROR, format!("ambiguous JSON: {e}"), "duplicate_key"),
    };
    let batch = value.is_array();
    let messages: Vec<Value> = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    if messages.is_empty() {
        return refuse_body(server, INVALID_REQUEST, "an empty JSON-RPC batch".into(), "invalid_request");
    }
    let describe = server.describe();
    // Per message: (method, tool, outcome); outcome None = passes.
    struct Refusal {
        code: i64,
        message: String,
        rule: String,
        reason: &'static str,
        /// The X-Sbx-Net-Denied text.
        denied: String,
    }
    let mut records = Vec::with_capacity(messages.len());
    let mut refusals: Vec<Option<Refusal>> = Vec::with_capacity(messages.len());
    for message in &messages {
        let (method, tool, refusal) = match classify(message) {
            Message::Call { tool } => match server.decide_tool(&tool) {
                ToolVerdict::Allow { rule } => {
                    records.push(record(Verdict::Allowed, "allowed", &rule, "tools/call", Some(&tool)));
                    (None, None, None)
                }
                ToolVerdict::Deny { rule, audit: true } => {
                    records.push(record(Verdict::Audit, "audit", &rule, "tools/call", Some(&tool)));
                    (None, None, None)
                }
                ToolVerdict::Deny { rule, audit: false } => {
                    let refusal = Refusal { code: DENIED_CODE, message: format!("sbx-net: denied by {rule}"), denied: rule.clone(), rule, reason: "denied" };
                    (Some("tools/call".to_string()), Some(tool), Some(refusal))
                }
            },
            Message::Other { method } => {
                records.push(record(Verdict::Allowed, "allowed", &describe, &method, None));
                (None, None, None)
            }
            Message::Response => {
                records.push(record(Verdict::Allowed, "allowed", &describe, "(response)", None));
                (None, None, None)
            }
            Message::Invalid(code, why) => {
                let method = message.get("method").and_then(Value::as_str).map_or("-", |m| truncate(m, MAX_RECORDED_METHOD)).to_string();
                let refusal = Refusal { code, message: format!("sbx-net: refused: {why}"), rule: describe.clone(), reason: "invalid_request", denied: why.to_string() };
                (Some(method), None, Some(refusal))
            }
        };
        if let (Some(method), Some(r)) = (&method, &refusal) {
            records.push(record(Verdict::Denied, r.reason, &r.rule, method, tool.as_deref()));
        }
        refusals.push(refusal);
    }
    let Some(cause) = refusals.iter().flatten().next() else {
        let body = serde_json::to_vec(&if batch { Value::Array(messages) } else { messages.into_iter().next().unwrap_or_default() }).unwrap_or_default();
        return RequestCheck::Forward { body: Bytes::from(body), records };
    };
    // Refused: every message answered (requests) or dropped (notifications);
    // the ones that passed on their own are recorded as refused with the batch.
    let cause_rule = cause.rule.clone();
    let cause_denied = cause.denied.clone();
    let mut answers = Vec::new();
    let mut batch_records = Vec::new();
    for (message, refusal) in messages.iter().zip(&refusals) {
        let id = message.as_object().and_then(|o| o.get("id")).cloned();
        match refusal {
            Some(r) => {
                // A message that is not even an object is answered with a
                // null id, as JSON-RPC says for an id it cannot read.
                if let Some(id) = id.or_else(|| (!message.is_object()).then_some(Value::Null)) {
                    answers.push(error_object(id, r.code, r.message.clone(), json!({"rule": r.rule})));
                }
            }
            None => {
                let method = match classify(message) {
                    Message::Call { .. } => "tools/call".to_string(),
                    Message::Other { method } => method,
                    Message::Response => "(response)".to_string(),
                    Message::Invalid(..) => "-".to_string(),
                };
                let tool = match classify(message) {
                    Message::Call { tool } => Some(tool),
                    _ => None,
                };
                batch_records.push(record(Verdict::Denied, "batch_refused", &cause_rule, &method, tool.as_deref()));
                if let Some(id) = id {
                    let text = format!("sbx-net: batch refused: another message of it was denied by {cause_rule}");
                    answers.push(error_object(id, DENIED_CODE, text, json!({"rule": cause_rule})));
                }
            }
        }
    }
    // The passing messages' own "allowed"/"audit" records give way to the
    // batch's refusal: nothing of it was forwarded.
    records.retain(|r| r.verdict == Verdict::Denied);
    records.extend(batch_records);
    let answer = match (batch, answers.len()) {
        (_, 0) => None,
        (false, _) => answers.into_iter().next(),
        (true, _) => Some(Value::Array(answers)),
    };
    RequestCheck::Refuse { status: StatusCode::OK, denied: cause_denied, answer, records }
}

/// `text` as a header value: visible ASCII only (a tool name may be
/// anything), bounded.
fn header_text(text: &str) -> HeaderValue {
    let clean: String = truncate(text, 512).chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("mcp"))
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// The guest's answer for a refused request.
fn refusal_response(status: StatusCode, denied: &str, answer: Option<&Value>) -> Response<ProxyBody> {
    let body = answer.map(|a| serde_json::to_vec(a).unwrap_or_default()).unwrap_or_default();
    // Only notifications refused: nothing to answer (Streamable HTTP
    // answers notifications with 202 and no body).
    let status = if answer.is_none() && status == StatusCode::OK { StatusCode::ACCEPTED } else { status };
    let len = body.len();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    if answer.is_some() {
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert("x-sbx-net-denied", header_text(denied));
    r
}

fn publish(flow: &FlowContext, server: &McpServer, records: Vec<McpRecord>) {
    for r in records {
        tracing::info!(sandbox = %flow.sandbox, server = %server.url, method = %r.method, tool = r.tool.as_deref().unwrap_or("-"), verdict = ?r.verdict, rule = %r.rule, "mcp");
        flow.mcp(r.verdict, r.reason, &r.rule, McpDetail { server: server.url.clone(), method: r.method, tool: r.tool });
    }
}

/// Refuses a request that is not even read as JSON-RPC.
fn refuse_http(flow: &FlowContext, server: &McpServer, status: StatusCode, code: i64, why: &str, method: &str) -> Response<ProxyBody> {
    let rule = server.describe();
    publish(flow, server, vec![record(Verdict::Denied, "invalid_request", &rule, method, None)]);
    let answer = error_object(Value::Null, code, format!("sbx-net: refused: {why}"), json!({"rule": rule, "reason": why}));
    refusal_response(status, why, Some(&answer))
}

/// Checks a request to `server`'s host (method and path already
/// normalised): the request to forward (its body re-assembled), or the
/// answer the guest gets instead (a JSON-RPC error).
pub async fn check_request(req: Request<ProxyBody>, server: &McpServer, flow: &FlowContext) -> Result<Request<ProxyBody>, Response<ProxyBody>> {
    let (mut parts, body) = req.into_parts();
    let http_method = parts.method.as_str().to_string();
    // Answers must come uncompressed to be filtered.
    parts.headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    if coded(&parts.headers) {
        return Err(refuse_http(flow, server, StatusCode::UNSUPPORTED_MEDIA_TYPE, INVALID_REQUEST, "a compressed MCP request cannot be checked", &http_method));
    }
    // What goes upstream is the checked text itself, uncoded.
    parts.headers.remove(CONTENT_ENCODING);
    let too_large = || refuse_http(flow, server, StatusCode::PAYLOAD_TOO_LARGE, INVALID_REQUEST, "the MCP request body is over 1 MiB", &http_method);
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(_) => return Err(refuse_http(flow, server, StatusCode::BAD_REQUEST, INVALID_REQUEST, "the MCP request body could not be read", &http_method)),
    };
    // The event stream (GET), the end of a session (DELETE) and the like
    // carry no messages; one that has a body might be read as one by a
    // lenient server.
    if matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS) {
        if !bytes.is_empty() {
            return Err(refuse_http(flow, server, StatusCode::BAD_REQUEST, INVALID_REQUEST, "a body on an MCP GET, HEAD, DELETE or OPTIONS", &http_method));
        }
        publish(flow, server, vec![record(Verdict::Allowed, "allowed", &server.describe(), &http_method, None)]);
        parts.headers.remove(TRANSFER_ENCODING);
        return Ok(Request::from_parts(parts, full(bytes)));
    }
    match inspect_request_body(&bytes, server) {
        RequestCheck::Forward { body, records } => {
            publish(flow, server, records);
            parts.headers.remove(TRANSFER_ENCODING);
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            Ok(Request::from_parts(parts, full(body)))
        }
        RequestCheck::Refuse { status, denied, answer, records } => {
            publish(flow, server, records);
            if let (Some(stream), Some(answer)) = (session_stream(flow, server, &parts.uri), &answer) {
                // The HTTP+SSE transport: accepted like the server would,
                // answered on the session's stream.
                if stream.send(as_events(answer)).is_ok() {
                    return Err(refusal_response(StatusCode::OK, &denied, None));
                }
            }
            Err(refusal_response(status, &denied, answer.as_ref()))
        }
    }
}

/// Drops the tools `server` does not allow from `message` (a JSON-RPC
/// message or a batch of them) wherever `result.tools` is an array; the
/// number dropped. A tool without a string name is dropped.
pub fn filter_tools(message: &mut Value, server: &McpServer) -> usize {
    match message {
        Value::Array(items) => items.iter_mut().map(|m| filter_tools_one(m, server)).sum(),
        one => filter_tools_one(one, server),
    }
}

fn filter_tools_one(message: &mut Value, server: &McpServer) -> usize {
    let Some(Value::Array(tools)) = message.get_mut("result").and_then(|r| r.get_mut("tools")) else { return 0 };
    let before = tools.len();
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(|n| server.allows_tool(n)));
    before - tools.len()
}

/// What a JSON answer becomes: (body for the guest, tools hidden or that
/// would be in audit mode). Not JSON: as it came (no client reads tools
/// from it); ambiguous JSON: a JSON-RPC error in its place (fail closed;
/// audit mode passes it on).
pub fn filter_json_body(body: &[u8], server: &McpServer, audit: bool) -> (Bytes, usize) {
    match parse_strict(body) {
        Ok(mut v) => {
            let hidden = filter_tools(&mut v, server);
            if hidden == 0 || audit {
                return (Bytes::copy_from_slice(body), hidden);
            }
            (Bytes::from(serde_json::to_vec(&v).unwrap_or_default()), hidden)
        }
        Err(JsonError::DuplicateKey(e)) if !audit => (answer_error(&format!("the MCP server's answer is ambiguous JSON: {e}")), 0),
        Err(_) => (Bytes::copy_from_slice(body), 0),
    }
}

fn answer_error(why: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&error_object(Value::Null, INTERNAL_ERROR, format!("sbx-net: {why}"), json!({"reason": why}))).unwrap_or_default())
}

/// Why an event stream was cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event over {MAX_EVENT} bytes")]
    Overlong,
    #[error("an event's data is ambiguous JSON: {0}")]
    DuplicateKey(String),
}

/// A `text/event-stream` body, event by event: `data:` JSON messages
/// whose `result.tools` is an array are rewritten to the allowed tools
/// (unless `audit`), everything else goes out as it came. Lines end in
/// CRLF, LF or CR (a CR at the end of a chunk waits to see whether an LF
/// follows); a leading BOM is skipped when reading field names, as
/// clients do. An event is only let out once complete: a client ignores
/// an unfinished event at the end of the stream, and so does this.
pub struct SseFilter {
    server: McpServer,
    audit: bool,
    /// The line being read (no terminator yet).
    line: Vec<u8>,
    /// The current event's complete lines, terminators included, and
    /// whether each is a `data` field.
    lines: Vec<(Vec<u8>, bool)>,
    /// Bytes in `lines`.
    size: usize,
    /// The event's data, joined with LF as a client joins it.
    data: Vec<u8>,
    has_data: bool,
    /// The last line ended in CR: an LF first is the rest of it.
    after_cr: bool,
    first_line: bool,
    /// The current event's `event` field.
    event_type: Vec<u8>,
    /// The data of the last `endpoint` event (HTTP+SSE transport: where
    /// the client posts its messages).
    endpoint: Option<String>,
    /// Per event with tools hidden (or that would be, in audit mode): how many.
    hidden: Vec<usize>,
}

impl SseFilter {
    pub fn new(server: &McpServer, audit: bool) -> SseFilter {
        SseFilter {
            server: server.clone(),
            audit,
            line: Vec::new(),
            lines: Vec::new(),
            size: 0,
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            first_line: true,
            event_type: Vec::new(),
            endpoint: None,
            hidden: Vec::new(),
        }
    }

    /// Feeds `input`; complete events are appended to `out`. After an
    /// error the stream must end (what `out` holds is complete events).
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), SseError> {
        while !input.is_empty() {
            if std::mem::take(&mut self.after_cr) && input[0] == b'\n' {
                match self.lines.last_mut() {
                    Some((raw, _)) => raw.push(b'\n'),
                    // The CR ended the blank line of an event already let out.
                    None => out.push(b'\n'),
                }
                input = &input[1..];
                continue;
            }
            match input.iter().position(|b| *b == b'\n' || *b == b'\r') {
                None => {
                    self.line.extend_from_slice(input);
                    input = &[];
                }
                Some(i) => {
                    self.line.extend_from_slice(&input[..i]);
                    let terminator = input[i];
                    input = &input[i + 1..];
                    self.end_line(terminator, out)?;
                    self.after_cr = terminator == b'\r';
                }
            }
            if self.size + self.line.len() + self.data.len() > MAX_EVENT {
                return Err(SseError::Overlong);
            }
        }
        Ok(())
    }

    /// The message endpoint an `endpoint` event named since the last call.
    pub fn take_endpoint(&mut self) -> Option<String> {
        self.endpoint.take()
    }

    /// Tools hidden per event since the last call.
    pub fn take_hidden(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.hidden)
    }

    fn end_line(&mut self, terminator: u8, out: &mut Vec<u8>) -> Result<(), SseError> {
        let mut raw = std::mem::take(&mut self.line);
        let first = std::mem::take(&mut self.first_line);
        let content: &[u8] = if first { raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&raw) } else { &raw };
        if content.is_empty() {
            raw.push(terminator);
            return self.dispatch(&raw, out);
        }
        let is_data = if content.first() == Some(&b':') {
            false
        } else {
            let (name, value) = match content.iter().position(|b| *b == b':') {
                Some(i) => (&content[..i], &content[i + 1..]),
                None => (content, &[][..]),
            };
            if name == b"data" {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
                true
            } else {
                if name == b"event" {
                    self.event_type = value.strip_prefix(b" ").unwrap_or(value).to_vec();
                }
                false
            }
        };
        raw.push(terminator);
        self.size += raw.len();
        self.lines.push((raw, is_data));
        Ok(())
    }

    /// The event is complete (`blank` is its ending line): out as it came,
    /// or rewritten.
    fn dispatch(&mut self, blank: &[u8], out: &mut Vec<u8>) -> Result<(), SseError> {
        let lines = std::mem::take(&mut self.lines);
        let data = std::mem::take(&mut self.data);
        self.size = 0;
        if std::mem::take(&mut self.event_type) == b"endpoint" && self.has_data {
            self.endpoint = std::str::from_utf8(&data).ok().map(str::to_string);
        }
        if std::mem::take(&mut self.has_data) {
            match parse_strict(&data) {
                Ok(mut v) => {
                    let hidden = filter_tools(&mut v, &self.server);
                    if hidden > 0 {
                        self.hidden.push(hidden);
                        if !self.audit {
                            for (raw, is_data) in &lines {
                                if !is_data {
                                    out.extend_from_slice(raw);
                                }
                            }
                            out.extend_from_slice(b"data: ");
                            out.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_default());
                            out.push(b'\n');
                            out.extend_from_slice(blank);
                            return Ok(());
                        }
                    }
                }
                Err(JsonError::DuplicateKey(e)) if !self.audit => return Err(SseError::DuplicateKey(e)),
                Err(_) => {}
            }
        }
        for (raw, _) in &lines {
            out.extend_from_slice(raw);
        }
        out.extend_from_slice(blank);
        Ok(())
    }
}

/// Records tools/list answers with tools hidden (audit mode: that would be).
fn record_hidden(flow: &FlowContext, server: &McpServer, audit: bool, hidden: usize) {
    let rule = format!("{} (tools/list: {hidden} not listed)", server.describe());
    tracing::info!(sandbox = %flow.sandbox, server = %server.url, hidden, audit, "mcp: tools/list filtered");
    if audit {
        flow.mcp(Verdict::Audit, "audit", &rule, McpDetail { server: server.url.clone(), method: "tools/list".into(), tool: None });
    }
}

/// The HTTP+SSE transport answers a POSTed message with 202 and sends the
/// response on the client's GET event stream: a refusal must go there
/// too, or the client waits for it forever. Each stream that names its
/// message endpoint registers here, by sandbox, server and endpoint; a
/// refused POST to that endpoint has its errors sent down the stream.
type SessionKey = (String, String, String);

fn sessions() -> &'static std::sync::Mutex<std::collections::HashMap<SessionKey, tokio::sync::mpsc::UnboundedSender<Bytes>>> {
    static SESSIONS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<SessionKey, tokio::sync::mpsc::UnboundedSender<Bytes>>>> =
        std::sync::OnceLock::new();
    SESSIONS.get_or_init(Default::default)
}

/// How a message endpoint is told apart: its query (the SDKs put the
/// session id there), else its path; `endpoint` may be a whole URL.
fn session_part(endpoint: &str) -> String {
    match endpoint.split_once('?') {
        Some((_, query)) if !query.is_empty() => query.to_string(),
        _ => {
            let path = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
            path.to_string()
        }
    }
}

/// The event stream of the session `uri` posts to, if one is open.
fn session_stream(flow: &FlowContext, server: &McpServer, uri: &hyper::Uri) -> Option<tokio::sync::mpsc::UnboundedSender<Bytes>> {
    let part = match uri.query() {
        Some(q) if !q.is_empty() => q.to_string(),
        _ => uri.path().to_string(),
    };
    let key = (flow.sandbox.to_string(), server.url.clone(), part);
    sessions().lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).filter(|tx| !tx.is_closed()).cloned()
}

/// `answer` (an error or a batch of them) as events of a stream.
fn as_events(answer: &Value) -> Bytes {
    let mut out = Vec::new();
    let one = |v: &Value, out: &mut Vec<u8>| {
        out.extend_from_slice(b"event: message\r\ndata: ");
        out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
        out.extend_from_slice(b"\r\n\r\n");
    };
    match answer {
        Value::Array(items) => items.iter().for_each(|v| one(v, &mut out)),
        v => one(v, &mut out),
    }
    Bytes::from(out)
}

/// An event-stream answer through an [`SseFilter`], with the refusals of
/// its session's POSTs put in between its events.
struct SseFilterBody {
    inner: ProxyBody,
    filter: SseFilter,
    flow: FlowContext,
    ended: bool,
    injected_tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    injected: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    /// Where this stream is registered.
    registered: Option<SessionKey>,
}

impl Drop for SseFilterBody {
    fn drop(&mut self) {
        if let Some(key) = self.registered.take() {
            let mut map = sessions().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.get(&key).is_some_and(|tx| tx.same_channel(&self.injected_tx)) {
                map.remove(&key);
            }
        }
    }
}

impl Body for SseFilterBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            // The filter lets out whole events only: between two of them
            // a refusal's events fit.
            if let Poll::Ready(Some(events)) = this.injected.poll_recv(cx) {
                return Poll::Ready(Some(Ok(Frame::data(events))));
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(other) => return Poll::Ready(Some(Ok(other))),
            };
            let mut out = Vec::new();
            if let Err(e) = this.filter.push(&data, &mut out) {
                tracing::warn!(sandbox = %this.flow.sandbox, server = %this.filter.server.url, error = %e, "mcp: event stream cut");
                this.ended = true;
            }
            if let Some(endpoint) = this.filter.take_endpoint() {
                let key = (this.flow.sandbox.to_string(), this.filter.server.url.clone(), session_part(&endpoint));
                let mut map = sessions().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                map.retain(|_, tx| !tx.is_closed());
                map.insert(key.clone(), this.injected_tx.clone());
                drop(map);
                if let Some(old) = this.registered.replace(key.clone()) {
                    if old != key {
                        sessions().lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&old);
                    }
                }
            }
            for hidden in this.filter.take_hidden() {
                record_hidden(&this.flow, &this.filter.server, this.filter.audit, hidden);
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }
}

/// A JSON answer, buffered (bounded) and filtered once whole. Over the
/// bound, in enforce mode the guest gets a JSON-RPC error in its place
/// (the head has gone out, so the status stays); in audit mode the rest
/// passes unread.
struct JsonFilterBody {
    inner: ProxyBody,
    buf: Vec<u8>,
    server: McpServer,
    flow: FlowContext,
    audit: bool,
    state: JsonState,
}

#[derive(PartialEq, Eq)]
enum JsonState {
    Buffering,
    Passing,
    Done,
}

impl Body for JsonFilterBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            match this.state {
                JsonState::Done => return Poll::Ready(None),
                JsonState::Passing => return Pin::new(&mut this.inner).poll_frame(cx),
                JsonState::Buffering => {}
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a JSON answer carry nothing for the guest.
                    let Ok(data) = frame.into_data() else { continue };
                    if this.buf.len() + data.len() > MAX_RESPONSE_BODY {
                        if this.audit {
                            this.state = JsonState::Passing;
                            let mut all = std::mem::take(&mut this.buf);
                            all.extend_from_slice(&data);
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(all)))));
                        }
                        tracing::warn!(sandbox = %this.flow.sandbox, server = %this.server.url, "mcp: answer over the bound replaced");
                        this.state = JsonState::Done;
                        return Poll::Ready(Some(Ok(Frame::data(answer_error("the MCP server's answer is over 8 MiB and cannot be checked")))));
                    }
                    this.buf.extend_from_slice(&data);
                }
                Some(Err(e)) => {
                    this.state = JsonState::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.state = JsonState::Done;
                    let (out, hidden) = filter_json_body(&this.buf, &this.server, this.audit);
                    this.buf = Vec::new();
                    if hidden > 0 {
                        record_hidden(&this.flow, &this.server, this.audit, hidden);
                    }
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == JsonState::Done
    }
}

/// How an answer's body is read, by its Content-Type (as the MCP client
/// SDKs tell them apart: by prefix, any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Json,
    EventStream,
    Other,
}

pub fn answer_kind(content_type: Option<&HeaderValue>) -> AnswerKind {
    let Some(ct) = content_type else { return AnswerKind::Other };
    let ct = String::from_utf8_lossy(ct.as_bytes()).trim().to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if ct.starts_with("text/event-stream") {
        AnswerKind::EventStream
    } else if ct.starts_with("application/json") || essence.ends_with("+json") {
        AnswerKind::Json
    } else {
        AnswerKind::Other
    }
}

/// The upstream's answer as the guest gets it: `tools/list` results
/// filtered to the allowed tools, in JSON bodies and event streams.
pub fn filter_response(resp: Response<ProxyBody>, server: &McpServer, flow: &FlowContext) -> Response<ProxyBody> {
    let kind = answer_kind(resp.headers().get(CONTENT_TYPE));
    if kind == AnswerKind::Other {
        return resp;
    }
    let audit = server.mode.is_audit();
    let compressed = coded(resp.headers());
    if compressed {
        if audit {
            return resp;
        }
        // Asked for identity; an answer that still comes compressed cannot
        // be filtered.
        tracing::info!(sandbox = %flow.sandbox, server = %server.url, "mcp: compressed answer refused");
        let why = "a compressed MCP answer cannot be checked";
        let mut r = Response::new(full(format!("sbx-net: {why}\n")));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r.headers_mut().insert("x-sbx-net-denied", HeaderValue::from_static("a compressed MCP answer cannot be checked"));
        return r;
    }
    let (mut parts, body) = resp.into_parts();
    let body = match kind {
        AnswerKind::EventStream => {
            parts.headers.remove(CONTENT_LENGTH);
            let (injected_tx, injected) = tokio::sync::mpsc::unbounded_channel();
            SseFilterBody { inner: body, filter: SseFilter::new(server, audit), flow: flow.clone(), ended: false, injected_tx, injected, registered: None }.boxed()
        }
        _ => {
            if !audit {
                parts.headers.remove(CONTENT_LENGTH);
            }
            JsonFilterBody { inner: body, buf: Vec::new(), server: server.clone(), flow: flow.clone(), audit, state: JsonState::Buffering }.boxed()
        }
    };
    Response::from_parts(parts, body)
}

/// The fuzz target `mcp`: arbitrary bytes as a request body and as an
/// event stream cut at places taken from the input. Invariants: a
/// forwarded body parses strictly and holds only allowed calls; the
/// stream's output is the same whatever the chunking; no panics.
pub fn fuzz(data: &[u8]) {
    let server = fuzz_server();
    match inspect_request_body(data, &server) {
        RequestCheck::Forward { body, .. } => {
            let v = parse_strict(&body).expect("a forwarded body parses");
            let messages = match v {
                Value::Array(items) => items,
                one => vec![one],
            };
            for m in &messages {
                if let Message::Call { tool } = classify(m) {
                    assert!(server.allows_tool(&tool), "a forwarded call of {tool:?}");
                }
                assert!(!matches!(classify(m), Message::Invalid(..)), "an invalid message forwarded");
            }
        }
        RequestCheck::Refuse { .. } => {}
    }
    let Some((&cut, rest)) = data.split_first() else { return };
    let whole = {
        let mut f = SseFilter::new(&server, false);
        let mut out = Vec::new();
        f.push(rest, &mut out).map(|_| out)
    };
    let step = usize::from(cut).max(1);
    let mut f = SseFilter::new(&server, false);
    let mut out = Vec::new();
    let chunked = rest.chunks(step).try_for_each(|c| f.push(c, &mut out)).map(|_| out);
    assert_eq!(whole, chunked, "chunking changed the stream");
    let _ = filter_json_body(rest, &server, false);
}

fn fuzz_server() -> McpServer {
    McpServer {
        url: "http://mcp.test/mcp".into(),
        host: "mcp.test".into(),
        port: 80,
        tls: false,
        path: "/mcp".into(),
        tools: crate::policy::mcp::ToolList::Only(vec!["search".into(), "fetch".into()]),
        mode: crate::policy::http::Mode::Enforce,
        line: 1,
    }
}

/// Whether any `Content-Encoding` value (of every header line, every
/// comma-separated coding) is other than identity.
fn coded(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii).any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::http::Mode;

    fn server() -> McpServer {
        fuzz_server()
    }

    fn audit_server() -> McpServer {
        McpServer { mode: Mode::Audit, ..server() }
    }

    fn refused(check: RequestCheck) -> (String, Option<Value>, Vec<McpRecord>) {
        match check {
            RequestCheck::Refuse { denied, answer, records, .. } => (denied, answer, records),
            RequestCheck::Forward { .. } => panic!("forwarded: {check:?}"),
        }
    }

    fn forwarded(check: RequestCheck) -> (Value, Vec<McpRecord>) {
        match check {
            RequestCheck::Forward { body, records } => (serde_json::from_slice(&body).unwrap(), records),
            RequestCheck::Refuse { .. } => panic!("refused: {check:?}"),
        }
    }

    const DENY_RULE: &str = "mcp http://mcp.test/mcp tools search,fetch (tool \"delete_repo\" not listed)";

    #[test]
    fn duplicate_keys_are_found_after_unescaping() {
        assert!(parse_strict(br#"{"a":1,"b":{"c":2}}"#).is_ok());
        assert!(matches!(parse_strict(br#"{"name":"a","name":"b"}"#), Err(JsonError::DuplicateKey(_))));
        assert!(matches!(parse_strict(br#"{"name":"a","n\u0061me":"b"}"#), Err(JsonError::DuplicateKey(_))));
        assert!(matches!(parse_strict(br#"[{"x":{"y":1,"y":1}}]"#), Err(JsonError::DuplicateKey(_))));
        assert!(matches!(parse_strict(b"{\"a\":1} x"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_strict(&[b'['; 10_000]), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn allowed_calls_are_forwarded_and_recorded_without_arguments() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"q":"secret-arg"}}}"#;
        let check = inspect_request_body(body, &server());
        let (v, records) = forwarded(check);
        assert_eq!(v["params"]["arguments"]["q"], "secret-arg");
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].verdict, records[0].method.as_str(), records[0].tool.as_deref()), (Verdict::Allowed, "tools/call", Some("search")));
        assert!(!format!("{records:?}").contains("secret-arg"));
    }

    #[test]
    fn unlisted_calls_are_answered_with_an_error_naming_the_rule() {
        let body = br#"{"jsonrpc":"2.0","id":"x7","method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#;
        let check = inspect_request_body(body, &server());
        let (denied, answer, records) = refused(check);
        assert_eq!(denied, DENY_RULE);
        let answer = answer.unwrap();
        assert_eq!(answer["id"], "x7");
        assert_eq!(answer["error"]["code"], DENIED_CODE);
        assert_eq!(answer["error"]["message"], format!("sbx-net: denied by {DENY_RULE}"));
        assert_eq!(answer["error"]["data"]["rule"], DENY_RULE);
        assert_eq!(records, vec![record(Verdict::Denied, "denied", DENY_RULE, "tools/call", Some("delete_repo"))]);
    }

    #[test]
    fn audit_mode_forwards_and_records_the_rule() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}}"#;
        let check = inspect_request_body(body, &audit_server());
        let (_, records) = forwarded(check);
        assert_eq!(records[0].verdict, Verdict::Audit);
        assert!(records[0].rule.contains("\"delete_repo\" not listed"));
    }

    #[test]
    fn a_batch_with_one_denied_call_is_refused_whole() {
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}},
            {"jsonrpc":"2.0","method":"notifications/progress","params":{}},
            {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"}},
            {"jsonrpc":"2.0","id":3,"method":"tools/list"}]"#;
        let check = inspect_request_body(body, &server());
        let (denied, answer, records) = refused(check);
        assert_eq!(denied, DENY_RULE);
        let answer = answer.unwrap();
        let answers = answer.as_array().unwrap();
        // The notification gets no element.
        assert_eq!(answers.iter().map(|a| a["id"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3)]);
        assert!(answers[0]["error"]["message"].as_str().unwrap().starts_with("sbx-net: batch refused"));
        assert_eq!(answers[1]["error"]["message"], format!("sbx-net: denied by {DENY_RULE}"));
        assert!(records.iter().all(|r| r.verdict == Verdict::Denied && r.rule == DENY_RULE));
        assert_eq!(records.len(), 4);
        // A batch of allowed messages goes on as a batch.
        let ok = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        let (v, records) = forwarded(inspect_request_body(ok, &server()));
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(records.len(), 2);
        // Only notifications refused: nothing to answer.
        let notes = br#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"delete_repo"}}]"#;
        assert_eq!(refused(inspect_request_body(notes, &server())).1, None);
    }

    #[test]
    fn malformed_bodies_are_refused_whatever_the_mode() {
        for s in [server(), audit_server()] {
            let (_, answer, records) = refused(inspect_request_body(b"not json", &s));
            assert_eq!(answer.unwrap()["error"]["code"], PARSE_ERROR);
            assert_eq!(records[0].reason, "parse_error");
            let dup = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_repo"}}"#;
            let (_, answer, records) = refused(inspect_request_body(dup, &s));
            assert_eq!(answer.unwrap()["error"]["code"], PARSE_ERROR);
            assert_eq!(records[0].reason, "duplicate_key");
            for bad in [
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["delete_repo"]}}"#,
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":null}}"#,
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
                r#"{"jsonrpc":"2.0","id":1,"method":["tools/call"]}"#,
                r#"[]"#,
                r#"[1]"#,
                r#"{"jsonrpc":"2.0","id":1}"#,
            ] {
                let check = inspect_request_body(bad.as_bytes(), &s);
                let (_, answer, _) = refused(check);
                assert!(answer.is_some(), "{bad}");
            }
            let long = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{}"}}}}"#, "a".repeat(300));
            refused(inspect_request_body(long.as_bytes(), &s));
        }
    }

    #[test]
    fn method_spellings_cannot_hide_a_call() {
        for method in ["Tools/Call", "TOOLS/CALL", " tools/call", "tools/call\u{0}"] {
            let body = json!({"jsonrpc":"2.0","id":1,"method":method,"params":{"name":"delete_repo"}}).to_string();
            let (denied, _, _) = refused(inspect_request_body(body.as_bytes(), &server()));
            assert_eq!(denied, DENY_RULE, "{method:?}");
        }
        // Other methods and responses pass, recorded.
        let (_, records) = forwarded(inspect_request_body(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#, &server()));
        assert_eq!(records[0].method, "(response)");
        let (_, records) = forwarded(inspect_request_body(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, &server()));
        assert_eq!(records[0].method, "tools/list");
    }

    #[test]
    fn tool_lists_are_filtered() {
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"},{"name":7},{"x":1},{"name":"fetch"}]}}"#;
        let (out, hidden) = filter_json_body(body, &server(), false);
        assert_eq!(hidden, 3);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"], json!([{"name":"search"},{"name":"fetch"}]));
        // Audit: as it came, counted.
        let (out, hidden) = filter_json_body(body, &audit_server(), true);
        assert_eq!((&out[..], hidden), (&body[..], 3));
        // Batches of answers.
        let batch = br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_repo"}]}},{"jsonrpc":"2.0","id":2,"result":{"content":[]}}]"#;
        let (out, hidden) = filter_json_body(batch, &server(), false);
        assert_eq!(hidden, 1);
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()[0]["result"]["tools"], json!([]));
        // Not JSON: as it came; ambiguous: an error in its place.
        assert_eq!(&filter_json_body(b"oops", &server(), false).0[..], b"oops");
        let dup = br#"{"result":{"tools":[],"tools":[{"name":"delete_repo"}]}}"#;
        let (out, _) = filter_json_body(dup, &server(), false);
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["error"]["code"], INTERNAL_ERROR);
    }

    fn sse(input: &[&[u8]], audit: bool) -> Result<String, SseError> {
        let mut f = SseFilter::new(&server(), audit);
        let mut out = Vec::new();
        for chunk in input {
            f.push(chunk, &mut out)?;
        }
        Ok(String::from_utf8(out).unwrap())
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_repo"}]}}"#;
    const FILTERED: &str = r#"{"id":1,"jsonrpc":"2.0","result":{"tools":[{"name":"search"}]}}"#;

    #[test]
    fn event_streams_are_filtered_event_by_event() {
        let stream = format!("event: message\nid: 5\ndata: {LIST}\n\n: ping\n\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"x\"}}\n\n");
        let out = sse(&[stream.as_bytes()], false).unwrap();
        assert_eq!(out, format!("event: message\nid: 5\ndata: {FILTERED}\n\n: ping\n\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"x\"}}\n\n"));
        // The same whatever the chunk boundaries (one byte at a time).
        let bytes = stream.as_bytes();
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(sse(&chunks, false).unwrap(), out);
        // Audit: as it came.
        assert_eq!(sse(&[bytes], true).unwrap(), stream);
    }

    #[test]
    fn event_streams_with_crlf_cr_and_multiline_data() {
        let (a, b) = LIST.split_at(40);
        let crlf = format!("event: message\r\ndata: {a}\r\ndata:{b}\r\n\r\n");
        // Multi-line data joins with LF, which JSON reads as whitespace.
        let (a2, b2) = LIST.split_at(LIST.find("\"result\"").unwrap());
        let multi = format!("data: {a2}\r\ndata: {b2}\r\n\r\n");
        let out = sse(&[multi.as_bytes()], false).unwrap();
        assert_eq!(out, format!("data: {FILTERED}\n\r\n"));
        // A split inside the JSON string is not JSON once joined: as it came.
        assert_eq!(sse(&[crlf.as_bytes()], false).unwrap(), crlf);
        // CR line ends, the CRLF split across chunks.
        let cr = format!("data: {LIST}\r\r");
        assert_eq!(sse(&[cr.as_bytes()], false).unwrap(), format!("data: {FILTERED}\n\r"));
        let split = format!("data: {LIST}\r\n\r");
        let out = sse(&[split.as_bytes(), b"\nevent: x\r\n\r\n"], false).unwrap();
        assert_eq!(out, format!("data: {FILTERED}\n\r\nevent: x\r\n\r\n"));
        // A BOM before the first field name is skipped, as clients do.
        let bom = format!("\u{feff}data: {LIST}\n\n");
        assert!(!sse(&[bom.as_bytes()], false).unwrap().contains("delete_repo"));
        // An unfinished event at the end is held back.
        assert_eq!(sse(&[format!("data: {LIST}\n").as_bytes()], false).unwrap(), "");
    }

    #[test]
    fn event_streams_fail_closed() {
        let dup = "data: {\"result\":{\"tools\":[],\"tools\":[{\"name\":\"delete_repo\"}]}}\n\n";
        assert!(matches!(sse(&[dup.as_bytes()], false), Err(SseError::DuplicateKey(_))));
        let long = vec![b'a'; MAX_EVENT + 1];
        assert_eq!(sse(&[b"data: ", &long], false), Err(SseError::Overlong));
        let many: Vec<u8> = b"data: x\n".iter().copied().cycle().take(MAX_EVENT + 16).collect();
        assert_eq!(sse(&[&many], false), Err(SseError::Overlong));
    }

    #[test]
    fn endpoint_events_name_the_session() {
        let mut f = SseFilter::new(&server(), false);
        let mut out = Vec::new();
        f.push(b"event: endpoint\r\ndata: /messages/?session_id=ab12\r\n\r\n", &mut out).unwrap();
        assert_eq!(f.take_endpoint().as_deref(), Some("/messages/?session_id=ab12"));
        assert_eq!(f.take_endpoint(), None);
        f.push(b"event: message\ndata: {}\n\n", &mut out).unwrap();
        assert_eq!(f.take_endpoint(), None);
        assert_eq!(session_part("/messages/?session_id=ab12"), "session_id=ab12");
        assert_eq!(session_part("http://sse.test/messages/s/ab12"), "/messages/s/ab12");
        let events = as_events(&json!([{"id": 1}, {"id": 2}]));
        assert_eq!(&events[..], b"event: message\r\ndata: {\"id\":1}\r\n\r\nevent: message\r\ndata: {\"id\":2}\r\n\r\n");
    }

    fn flow(dir: &std::path::Path) -> FlowContext {
        use crate::observe::hub::{FlowHub, FlowLogSettings};
        let settings = FlowLogSettings { history: 64, audit_path: dir.join("audit.log"), audit_max_bytes: 1 << 20, audit_keep: 1, audit_lines_per_second: 0, audit_burst: 0 };
        FlowContext {
            hub: std::sync::Arc::new(FlowHub::new(&settings)),
            sandbox: "s".into(),
            src: "10.200.0.2:40000".parse().unwrap(),
            dst: "198.51.100.60:80".parse().unwrap(),
            rule: "allow mcp.test".into(),
        }
    }

    async fn bytes(body: ProxyBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[test]
    fn the_entry_points_move_bodies_and_heads() {
        let dir = std::env::temp_dir().join(format!("sbx-mcp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flow = flow(&dir);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let post = |uri: &str, body: &str| Request::post(uri).header(CONTENT_LENGTH, body.len()).body(full(body.to_string())).unwrap();
            // Refused: 200, JSON-RPC error, the rule in the header.
            let denied = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}}"#;
            let resp = check_request(post("/mcp", denied), &server(), &flow).await.unwrap_err();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["x-sbx-net-denied"], DENY_RULE);
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
            let v: Value = serde_json::from_slice(&bytes(resp.into_body()).await).unwrap();
            assert_eq!(v["error"]["data"]["rule"], DENY_RULE);
            // Allowed: forwarded re-serialised, length true, answers asked uncompressed.
            let allowed = r#"{ "jsonrpc" : "2.0", "id" : 2, "method" : "tools/call", "params" : {"name":"search"} }"#;
            let req = check_request(post("/mcp", allowed), &server(), &flow).await.unwrap();
            assert_eq!(req.headers()[ACCEPT_ENCODING], "identity");
            let len: usize = req.headers()[CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
            let body = bytes(req.into_body()).await;
            assert_eq!(body.len(), len);
            assert!(len < allowed.len());
            // Declared over the bound: refused unread; a GET with a body: refused.
            let big = Request::post("/mcp").header(CONTENT_LENGTH, MAX_REQUEST_BODY + 1).body(full("")).unwrap();
            assert_eq!(check_request(big, &server(), &flow).await.unwrap_err().status(), StatusCode::PAYLOAD_TOO_LARGE);
            let get = Request::get("/mcp").body(full("x")).unwrap();
            assert_eq!(check_request(get, &server(), &flow).await.unwrap_err().status(), StatusCode::BAD_REQUEST);
            assert!(check_request(Request::get("/mcp").body(full("")).unwrap(), &server(), &flow).await.is_ok());

            // A JSON answer: filtered, no stale Content-Length.
            let list = Response::builder().header(CONTENT_TYPE, "application/json").header(CONTENT_LENGTH, LIST.len()).body(full(LIST)).unwrap();
            let resp = filter_response(list, &server(), &flow);
            assert!(resp.headers().get(CONTENT_LENGTH).is_none());
            assert_eq!(String::from_utf8(bytes(resp.into_body()).await).unwrap(), FILTERED);
            // Compressed: refused.
            let gz = Response::builder().header(CONTENT_TYPE, "application/json").header(CONTENT_ENCODING, "gzip").body(full("x")).unwrap();
            assert_eq!(filter_response(gz, &server(), &flow).status(), StatusCode::BAD_GATEWAY);

            // HTTP+SSE: the stream names its endpoint; a refused POST to it
            // is accepted (202) and answered on the stream.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
            let stream_body = ChannelBody(rx).boxed();
            let resp = Response::builder().header(CONTENT_TYPE, "text/event-stream").body(stream_body).unwrap();
            let mut body = filter_response(resp, &server(), &flow).into_body();
            tx.send(Bytes::from_static(b"event: endpoint\r\ndata: /messages/?session_id=u1\r\n\r\n")).unwrap();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert!(first.starts_with(b"event: endpoint"));
            let resp = check_request(post("/messages/?session_id=u1", denied), &server(), &flow).await.unwrap_err();
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            let injected = body.frame().await.unwrap().unwrap().into_data().unwrap();
            let text = String::from_utf8(injected.to_vec()).unwrap();
            assert!(text.starts_with("event: message\r\ndata: ") && text.contains(DENY_RULE.replace('"', "\\\"").as_str()), "{text}");
            // Another session's POST is answered in its own body.
            let resp = check_request(post("/messages/?session_id=other", denied), &server(), &flow).await.unwrap_err();
            assert_eq!(resp.status(), StatusCode::OK);
            drop(body);
            assert!(sessions().lock().unwrap().keys().all(|k| k.0 != "s"), "the stream's registration outlived it");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An upstream body fed by the test, chunk by chunk.
    struct ChannelBody(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    #[test]
    fn answer_kinds_follow_the_sdks() {
        let kind = |s: &'static str| answer_kind(Some(&HeaderValue::from_static(s)));
        assert_eq!(kind("application/json"), AnswerKind::Json);
        assert_eq!(kind("Application/JSON; charset=utf-8"), AnswerKind::Json);
        assert_eq!(kind("application/problem+json"), AnswerKind::Json);
        assert_eq!(kind("text/event-stream"), AnswerKind::EventStream);
        assert_eq!(kind("text/plain"), AnswerKind::Other);
        assert_eq!(answer_kind(None), AnswerKind::Other);
    }

    #[test]
    fn header_text_is_visible_ascii() {
        assert_eq!(header_text("tool \"dé\u{1}\"").to_str().unwrap(), "tool \"d??\"");
    }

    #[test]
    fn fuzz_smoke() {
        fuzz(b"");
        fuzz(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}"#);
        fuzz(format!("\x03data: {LIST}\r\n\r\n").as_bytes());
    }
}
