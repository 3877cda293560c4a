//! `[[mcp]]` entries: an MCP server (by URL) and the tools an agent may
//! call on it. Pure: the proxy parses the JSON-RPC and asks here.

use crate::policy::http::Mode;

/// Which tools of a server may be called.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ToolList {
    /// `tools = ["*"]`.
    All,
    Only(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct McpServer {
    /// As written.
    pub url: String,
    /// Normalised host name of the URL.
    pub host: String,
    pub port: u16,
    /// `https` (else `http`).
    pub tls: bool,
    /// The endpoint's path (normalised, no query).
    pub path: String,
    pub tools: ToolList,
    pub mode: Mode,
    pub line: usize,
}

/// What the allowlist says about one `tools/call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolVerdict {
    Allow { rule: String },
    /// Refused by `rule`; `audit`: recorded only, the call goes on.
    Deny { rule: String, audit: bool },
}

impl McpServer {
    /// How the entry is named wherever a verdict is attributed to it.
    pub fn describe(&self) -> String {
        match &self.tools {
            ToolList::All => format!("mcp {} tools *", self.url),
            ToolList::Only(tools) => format!("mcp {} tools {}", self.url, tools.join(",")),
        }
    }

    pub fn allows_tool(&self, tool: &str) -> bool {
        match &self.tools {
            ToolList::All => true,
            ToolList::Only(tools) => tools.iter().any(|t| t == tool),
        }
    }

    pub fn decide_tool(&self, tool: &str) -> ToolVerdict {
        if self.allows_tool(tool) {
            ToolVerdict::Allow { rule: self.describe() }
        } else {
            ToolVerdict::Deny { rule: format!("{} (tool {tool:?} not listed)", self.describe()), audit: self.mode.is_audit() }
        }
    }

    /// Parses `url` (`http[s]://host[:port]/path`) for the entry.
    pub fn parse_url(url: &str) -> Result<(String, u16, bool, String), String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("url {url:?} must start with https:// or http://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains(['?', '#']) {
            return Err(format!("url {url:?}: no query or fragment"));
        }
        if authority.contains('@') || authority.starts_with('[') {
            return Err(format!("url {url:?}: the host must be a name (no user, no IP literal)"));
        }
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("url {url:?}: invalid port {p:?}"))?),
            None => (authority, if tls { 443 } else { 80 }),
        };
        let host = crate::policy::normalise_name(host).map_err(|e| format!("url {url:?}: {e}"))?;
        if host.parse::<std::net::IpAddr>().is_ok() || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("url {url:?}: the host must be a name"));
        }
        let path = crate::policy::http::normalise_path(path).map_err(|e| format!("url {url:?}: {}", e.reason()))?;
        Ok((host, port, tls, path))
    }
}

/// The entry for a request to `host` on any port the proxy sees (every
/// request to the server's host is checked, whatever its path — the SSE
/// transport posts to a message endpoint beside its stream — and whatever
/// proxied port it came on: the same server on port 80 is not a way
/// around its allowlist). `_port` is the guest's destination port.
pub fn server_for<'a>(servers: &'a [McpServer], host: &str, _port: u16) -> Option<&'a McpServer> {
    servers.iter().find(|s| s.host == host)
}

/// The ports nftables redirects to the proxy by default: an `[[mcp]]` URL
/// on another port would never be seen, its allowlist never applied.
pub const PROXIED_PORTS: [u16; 2] = [80, 443];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_path() {
        assert_eq!(McpServer::parse_url("https://MCP.example.com/mcp").unwrap(), ("mcp.example.com".into(), 443, true, "/mcp".into()));
        assert_eq!(McpServer::parse_url("http://mcp.test:8080").unwrap(), ("mcp.test".into(), 8080, false, "/".into()));
        for bad in ["ftp://x/", "https://1.2.3.4/mcp", "https://u@h/", "https://h:0/", "https://h/a?b", "https://[::1]/"] {
            assert!(McpServer::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tools_are_allowed_by_name_or_star() {
        let (host, port, tls, path) = McpServer::parse_url("https://mcp.test/mcp").unwrap();
        let mut s = McpServer { url: "https://mcp.test/mcp".into(), host, port, tls, path, tools: ToolList::Only(vec!["search".into()]), mode: Mode::Enforce, line: 1 };
        assert_eq!(s.decide_tool("search"), ToolVerdict::Allow { rule: "mcp https://mcp.test/mcp tools search".into() });
        assert_eq!(
            s.decide_tool("delete"),
            ToolVerdict::Deny { rule: "mcp https://mcp.test/mcp tools search (tool \"delete\" not listed)".into(), audit: false }
        );
        s.tools = ToolList::All;
        assert!(s.allows_tool("anything"));
        assert!(server_for(std::slice::from_ref(&s), "mcp.test", 443).is_some());
        assert!(server_for(std::slice::from_ref(&s), "mcp.test", 80).is_some(), "every proxied port of the host");
        assert!(server_for(std::slice::from_ref(&s), "other.test", 443).is_none());
    }
}
