//! MCP at the proxy: JSON-RPC requests to an `[[mcp]]` server's host are
//! parsed (Streamable HTTP and the older HTTP+SSE transport, batches
//! included); a `tools/call` for an unlisted tool is answered with a
//! JSON-RPC error naming the rule and never reaches the server; `tools/list`
//! answers (JSON or event streams) are filtered to the allowed tools; every
//! message is a flow record (`mcp` protocol), arguments never logged.
//!
//! INTERFACE STUB: the two entry points below are what the proxy calls;
//! their bodies are being written (issue 16).

use hyper::{Request, Response};

use crate::observe::hub::FlowContext;
use crate::policy::McpServer;
use crate::proxy::inject::ProxyBody;

/// Checks a request to `server`'s host (method and path already
/// normalised): the request to forward (its body re-assembled), or the
/// answer the guest gets instead (a JSON-RPC error).
pub async fn check_request(req: Request<ProxyBody>, server: &McpServer, flow: &FlowContext) -> Result<Request<ProxyBody>, Response<ProxyBody>> {
    let _ = (server, flow);
    Ok(req)
}

/// The upstream's answer as the guest gets it: `tools/list` results
/// filtered to the allowed tools, in JSON bodies and event streams.
pub fn filter_response(resp: Response<ProxyBody>, server: &McpServer, flow: &FlowContext) -> Response<ProxyBody> {
    let _ = (server, flow);
    resp
}
