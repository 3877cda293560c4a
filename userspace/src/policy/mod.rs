//! Policy files: TOML, one policy per file. Parsing and validation only —
//! no syscalls — so every rule is unit-tested without privileges.
//!
//! Errors name the file, the line and the reason; a policy that fails any
//! check is rejected whole.

pub mod compile;
pub mod explain;
pub mod http;
pub mod learn;
pub mod mcp;
pub mod store;
pub mod wire;

pub use http::{HttpRules, Mode};
pub use mcp::McpServer;

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

/// The embedded default policy (`policies/default.toml`).
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../../policies/default.toml");
pub const DEFAULT_POLICY_SOURCE: &str = "<embedded>/policies/default.toml";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// How a domain pattern matches names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DomainPattern {
    /// `name`: exactly that name.
    Exact(String),
    /// `*.name`: exactly one label under name (not name itself).
    OneLabel(String),
    /// `**.name`: any depth under name (not name itself).
    AnyDepth(String),
}

impl DomainPattern {
    /// Whether `name` (already normalised) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            DomainPattern::Exact(base) => name == base,
            DomainPattern::OneLabel(base) => name
                .strip_suffix(base.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            DomainPattern::AnyDepth(base) => name
                .strip_suffix(base.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|labels| !labels.is_empty()),
        }
    }
}

/// What a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Target {
    Cidr(IpNetwork),
    Domain(DomainPattern),
}

/// Where a rule comes from; decides how it ranks against others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Origin {
    /// Written in the policy file.
    Policy,
    /// The built-in deny list, or the host's own addresses. Yields only to
    /// an allow that is at least as specific.
    Builtin,
    /// Made by the compiler, never written: the verdict an exception let
    /// through (the allow or default that decided, and the deny it was
    /// excepted from), so records name both. Matches nothing by itself;
    /// `text` is the whole attribution.
    Exception,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
    /// `:port` narrows the rule to one TCP/UDP destination port.
    pub port: Option<u16>,
    pub origin: Origin,
    /// The rule as written (`140.82.112.0/20`, `github.com:22`), or the
    /// built-in entry with its purpose.
    pub text: String,
    /// Line in the policy file (0 for built-ins).
    pub line: usize,
    /// A deny's exceptions (`{ pattern = …, except = […] }`): what they
    /// match is not denied by this rule (other rules and the default
    /// decide it). Always narrower than the rule's own target.
    #[serde(default)]
    pub except: Vec<Exception>,
    /// `mode = "audit"`: what this deny would deny is allowed and recorded
    /// with verdict `audit`. A rule that names no mode has its policy's
    /// (an explicit `mode = "enforce"` stays enforced in an audit policy).
    #[serde(default)]
    pub mode: Mode,
}

/// One exception of a deny rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exception {
    pub target: Target,
    /// As written.
    pub text: String,
}

impl Exception {
    /// How an exception is named wherever it decided a verdict.
    pub fn describe(&self, rule: &Rule) -> String {
        format!("{} except {}", rule.describe(), self.text)
    }
}

impl Rule {
    /// How the rule is shown wherever a verdict is attributed to it.
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::Policy => format!("{} {}", self.action.as_str(), self.text),
            Origin::Builtin => format!("builtin {} {}", self.action.as_str(), self.text),
            Origin::Exception => self.text.clone(),
        }
    }

    pub fn builtin_deny(network: IpNetwork, purpose: &str) -> Rule {
        Rule {
            action: Action::Deny,
            target: Target::Cidr(network),
            port: None,
            origin: Origin::Builtin,
            text: format!("{network} ({purpose})"),
            line: 0,
            except: Vec::new(),
            mode: Mode::Enforce,
        }
    }

    /// The exception of this rule that `target` falls under, if any
    /// (domain rules: a name; CIDR rules: an address).
    pub fn exception_for_name(&self, name: &str) -> Option<&Exception> {
        self.except.iter().find(|e| matches!(&e.target, Target::Domain(p) if p.matches(name)))
    }

    pub fn exception_for_ip(&self, ip: IpAddr) -> Option<&Exception> {
        self.except.iter().find(|e| matches!(&e.target, Target::Cidr(net) if net.contains(ip)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    Env(String),
    File(String),
}

/// `[[credentials]]`: validated here, used by the credential proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub hosts: Vec<String>,
    pub header: String,
    pub format: String,
    pub source: CredentialSource,
    /// Inject into plain HTTP too (off by default: the secret would cross
    /// the network in clear).
    pub allow_plaintext: bool,
    pub line: usize,
}

/// Whether the guest may write to a mounted image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MountMode {
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// `[filesystem] mounts`: a host image the sandbox's VM sees as a disk
/// mounted at `guest`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    pub host: PathBuf,
    /// Absolute, without `..`, normalised (`/work/` and `/work/.` are `/work`).
    pub guest: String,
    pub mode: MountMode,
}

/// A VM gets one virtio-blk device per mount.
pub const MAX_MOUNTS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// The file it came from, for error messages and `policy list`.
    pub source: String,
    /// `mode = "audit"`: every deny of the policy (its rules and its
    /// default; never the built-in list) is only recorded.
    pub mode: Mode,
    pub default: Action,
    /// `[network]` allow then deny rules, in file order.
    pub rules: Vec<Rule>,
    pub credentials: Vec<Credential>,
    /// `[filesystem]` mounts, in file order (none without the section).
    pub filesystem: Vec<Mount>,
    /// `[[http]]` blocks, in file order.
    pub http: Vec<HttpRules>,
    /// `[[mcp]]` servers, in file order.
    pub mcp: Vec<McpServer>,
}

impl Policy {
    pub fn embedded_default() -> Policy {
        Policy::parse(DEFAULT_POLICY_SOURCE, DEFAULT_POLICY_TOML)
            .expect("the embedded default policy is valid (unit-tested)")
    }

    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError { file: file.clone(), line: 0, reason: format!("cannot read: {e}") })?;
        Policy::parse(&file, &text)
    }

    /// IP/CIDR rules only (domain rules are enforced through DNS).
    pub fn cidr_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| matches!(r.target, Target::Cidr(_)))
    }

    /// Domain rules, kept for the DNS proxy; they never allow an address by
    /// themselves.
    pub fn domain_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| matches!(r.target, Target::Domain(_)))
    }

    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let lines = LineIndex::new(text);
        let err = |span: Option<Range<usize>>, reason: String| PolicyError {
            file: file.to_string(),
            line: span.map(|s| lines.line_of(s.start)).unwrap_or(0),
            reason,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let reason = match e.message().trim() {
                "" => unexplained_toml_error(text, e.span()),
                message => message.to_string(),
            };
            err(e.span(), reason)
        })?;

        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                Some(raw.name.span()),
                format!("policy name {name:?} must be non-empty and use only letters, digits, '-', '_', '.'"),
            ));
        }

        let network = raw.network.unwrap_or_default();
        let default = match network.default.as_ref().map(|d| (d.get_ref().as_str(), d.span())) {
            None => Action::Deny,
            Some(("deny", _)) => Action::Deny,
            Some(("allow", _)) => Action::Allow,
            Some((other, span)) => {
                return Err(err(Some(span), format!("default must be \"allow\" or \"deny\", not {other:?}")))
            }
        };

        let mode = match &raw.mode {
            None => Mode::Enforce,
            Some(m) => Mode::parse(m.get_ref()).map_err(|reason| err(Some(m.span()), reason))?,
        };

        let mut rules = Vec::new();
        for (action, list) in [(Action::Allow, &network.allow), (Action::Deny, &network.deny)] {
            for entry in list {
                let line = lines.line_of(entry.span().start);
                let rule = parse_rule_entry(action, entry.get_ref(), line, mode)
                    .map_err(|reason| err(Some(entry.span()), reason))?;
                rules.push(rule);
            }
        }

        let mut credentials = Vec::new();
        for cred in &raw.credentials {
            let span = cred.span();
            let c = cred.get_ref();
            let line = lines.line_of(span.start);
            let source = match (&c.source.env, &c.source.file) {
                (Some(var), None) => CredentialSource::Env(var.clone()),
                (None, Some(path)) => CredentialSource::File(path.clone()),
                _ => {
                    return Err(err(
                        Some(span),
                        format!("credential {:?}: source must be exactly one of {{ env = … }} or {{ file = … }}", c.name),
                    ))
                }
            };
            if !c.format.contains("{secret}") {
                return Err(err(Some(span), format!("credential {:?}: format must contain {{secret}}", c.name)));
            }
            if c.header.is_empty() || !c.header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(err(Some(span), format!("credential {:?}: header {:?} is not a valid header name", c.name, c.header)));
            }
            if c.hosts.is_empty() {
                return Err(err(Some(span), format!("credential {:?}: hosts must not be empty", c.name)));
            }
            for host in &c.hosts {
                let normalised = normalise_name(host)
                    .map_err(|reason| err(Some(span.clone()), format!("credential {:?}: host {host:?}: {reason}", c.name)))?;
                if !domain_allowed(&rules, &normalised) {
                    return Err(err(
                        Some(span),
                        format!("credential {:?}: host {host:?} is not covered by network.allow (or is denied)", c.name),
                    ));
                }
            }
            credentials.push(Credential {
                name: c.name.clone(),
                hosts: c.hosts.iter().map(|h| normalise_name(h).expect("validated above")).collect(),
                header: c.header.clone(),
                format: c.format.clone(),
                source,
                allow_plaintext: c.allow_plaintext,
                line,
            });
        }

        let mut filesystem: Vec<Mount> = Vec::new();
        for (index, mount) in raw.filesystem.iter().flat_map(|f| &f.mounts).enumerate() {
            let m = mount.get_ref();
            if index == MAX_MOUNTS {
                return Err(err(
                    Some(mount.span()),
                    format!("at most {MAX_MOUNTS} mounts (a VM gets one virtio-blk device per mount)"),
                ));
            }
            let host = m.host.get_ref();
            if !Path::new(host).is_absolute() {
                return Err(err(Some(m.host.span()), format!("mount host path {host:?} must be absolute")));
            }
            let guest = m.guest.get_ref();
            let guest_path = Path::new(guest);
            if !guest_path.is_absolute() || guest_path.components().any(|c| c == Component::ParentDir) {
                return Err(err(Some(m.guest.span()), format!("mount guest path {guest:?} must be an absolute path without \"..\"")));
            }
            // Components drop repeated slashes, `.` and a trailing slash, so
            // two spellings of one mount point compare equal.
            let guest = guest_path.components().collect::<PathBuf>().display().to_string();
            if filesystem.iter().any(|earlier| earlier.guest == guest) {
                return Err(err(Some(m.guest.span()), format!("guest path {guest:?} is mounted twice")));
            }
            // Read-only unless the policy says otherwise: a mount that forgot
            // its mode must not let the sandbox change the image (fail closed).
            let mode = match m.mode.as_ref().map(|mode| (mode.get_ref().as_str(), mode.span())) {
                None | Some(("ro", _)) => MountMode::ReadOnly,
                Some(("rw", _)) => MountMode::ReadWrite,
                Some((other, span)) => {
                    return Err(err(Some(span), format!("mode must be \"ro\" or \"rw\", not {other:?}")))
                }
            };
            filesystem.push(Mount { host: PathBuf::from(host), guest, mode });
        }

        let mut http = Vec::new();
        for block in &raw.http {
            let line = lines.line_of(block.span().start);
            let b = block.get_ref();
            let at = |reason: String| err(Some(block.span()), format!("[[http]]: {reason}"));
            if b.hosts.is_empty() {
                return Err(at("hosts must not be empty".into()));
            }
            let mut hosts = Vec::new();
            for host in &b.hosts {
                let pattern = parse_domain_pattern(host.trim()).map_err(|e| at(format!("host {host:?}: {e}")))?;
                hosts.push(pattern);
            }
            if b.allow.is_empty() && b.deny.is_empty() {
                return Err(at("give allow or deny rules".into()));
            }
            let matchers = |list: &Vec<Spanned<String>>| -> Result<Vec<http::HttpMatcher>, PolicyError> {
                list.iter()
                    .map(|m| {
                        let line = lines.line_of(m.span().start);
                        http::HttpMatcher::parse(m.get_ref(), line).map_err(|e| err(Some(m.span()), format!("[[http]] rule {:?}: {e}", m.get_ref())))
                    })
                    .collect()
            };
            let mode = match &b.mode {
                None => mode,
                Some(m) => Mode::parse(m.get_ref()).map_err(|reason| err(Some(m.span()), reason))?,
            };
            http.push(HttpRules { hosts, allow: matchers(&b.allow)?, deny: matchers(&b.deny)?, mode, line });
        }

        let mut mcp = Vec::new();
        for server in &raw.mcp {
            let line = lines.line_of(server.span().start);
            let s = server.get_ref();
            let at = |reason: String| err(Some(server.span()), format!("[[mcp]] {:?}: {reason}", s.url));
            let (host, port, tls, path) = McpServer::parse_url(s.url.trim()).map_err(&at)?;
            if mcp.iter().any(|m: &McpServer| m.host == host) {
                return Err(at(format!("{host} is listed twice")));
            }
            if !mcp::PROXIED_PORTS.contains(&port) {
                return Err(at(format!("port {port}: the proxy sees MCP traffic on ports 80 and 443 only; on another port the allowlist would never apply")));
            }
            if !domain_allowed(&rules, &host) {
                return Err(at(format!("host {host:?} is not covered by network.allow (or is denied)")));
            }
            if s.tools.is_empty() {
                return Err(at("tools must not be empty (write [\"*\"] for every tool)".into()));
            }
            let tools = if s.tools.iter().any(|t| t == "*") {
                if s.tools.len() > 1 {
                    return Err(at("\"*\" stands alone in tools".into()));
                }
                mcp::ToolList::All
            } else {
                if let Some(bad) = s.tools.iter().find(|t| t.is_empty() || t.len() > 128 || t.chars().any(|c| c.is_control())) {
                    return Err(at(format!("invalid tool name {bad:?}")));
                }
                mcp::ToolList::Only(s.tools.clone())
            };
            let mode = match &s.mode {
                None => mode,
                Some(m) => Mode::parse(m.get_ref()).map_err(|reason| err(Some(m.span()), reason))?,
            };
            mcp.push(McpServer { url: s.url.trim().to_string(), host, port, tls, path, tools, mode, line });
        }

        Ok(Policy { name, source: file.to_string(), mode, default, rules, credentials, filesystem, http, mcp })
    }
}

/// toml reports some syntax errors (a control character in a comment, for
/// one) with a position and no message; name the character found there so
/// the error still says what is wrong (found by the `policy` fuzz target).
fn unexplained_toml_error(text: &str, span: Option<Range<usize>>) -> String {
    match span.and_then(|s| text.get(s.start..)).and_then(|rest| rest.chars().next()) {
        Some(c) => format!("invalid TOML: unexpected character {c:?}"),
        None => "invalid TOML".to_string(),
    }
}

/// Whether a normalised name is allowed by the domain rules (deny wins).
fn domain_allowed(rules: &[Rule], name: &str) -> bool {
    let matching = |action| {
        rules.iter().any(|r| {
            r.action == action && r.port.is_none() && matches!(&r.target, Target::Domain(p) if p.matches(name))
        })
    };
    matching(Action::Allow) && !matching(Action::Deny)
}

// The parser's own types. They also generate the JSON Schema of policy files
// (`sbx-net policy schema`): a field's doc comment is its description in an
// editor. Where the parser keeps a span or a raw TOML value to name the
// line of an error, `schemars(with)` gives the shape it accepts.

/// An sbx-net policy file (TOML). `sbx-net policy check FILE` validates one
/// with file:line reasons; this schema gives editors completion and the
/// shape of every entry.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "sbx-net policy")]
struct RawPolicy {
    /// The policy's name (sandboxes name it; a file in a policy directory
    /// must be named NAME.toml).
    #[schemars(with = "String", length(min = 1))]
    name: Spanned<String>,
    /// `audit`: every deny of this policy is only recorded (the traffic
    /// passes and is reported as `audit`); built-in denies stay enforced.
    #[serde(default)]
    #[schemars(with = "Option<ModeName>")]
    mode: Option<Spanned<String>>,
    /// HTTP method and path rules for hosts (checked at the proxy).
    #[serde(default)]
    #[schemars(with = "Vec<RawHttp>")]
    http: Vec<Spanned<RawHttp>>,
    /// MCP servers and the tools a sandbox may call on them.
    #[serde(default)]
    #[schemars(with = "Vec<RawMcp>")]
    mcp: Vec<Spanned<RawMcp>>,
    /// Where the sandbox may connect.
    #[serde(default)]
    network: Option<RawNetwork>,
    /// Secrets the proxy adds to requests to their hosts (never enter the VM).
    #[serde(default)]
    #[schemars(with = "Vec<RawCredential>")]
    credentials: Vec<Spanned<RawCredential>>,
    /// Host directories or images given to the sandbox's microVM.
    #[serde(default)]
    filesystem: Option<RawFilesystem>,
}

/// `mode`: whether denies are enforced or only recorded.
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // schema only: the parser reads the string (Mode::parse)
enum ModeName {
    Enforce,
    Audit,
}

/// `[network] default`: what no rule matches.
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // schema only: the parser reads the string
enum DefaultName {
    Allow,
    Deny,
}

/// `mounts[].mode`.
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // schema only: the parser reads the string
enum MountModeName {
    Ro,
    Rw,
}

/// An `allow` or `deny` entry: an address or CIDR (`192.0.2.0/24`,
/// `2001:db8::/32`), a domain pattern (`api.github.com`, `*.github.com`
/// one label, `**.corp.example` any depth), each with an optional `:port`
/// (`[2001:db8::/32]:443` for IPv6).
#[derive(schemars::JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)] // schema only: parse_rule_entry reads the TOML value
struct RulePattern(#[schemars(length(min = 1))] String);

/// A `deny` entry: a pattern, or a table with exceptions and a mode.
#[derive(schemars::JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
#[allow(dead_code)] // schema only: parse_rule_entry reads the TOML value
enum DenyEntry {
    Pattern(RulePattern),
    Table {
        pattern: RulePattern,
        /// Names or CIDRs strictly inside `pattern` that stay allowed
        /// (no port).
        #[serde(default)]
        except: Vec<String>,
        #[serde(default)]
        mode: Option<ModeName>,
    },
}

/// `[filesystem]`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawFilesystem {
    #[serde(default)]
    #[schemars(with = "Vec<RawMount>")]
    mounts: Vec<Spanned<RawMount>>,
}

/// One virtio-blk device of the sandbox's microVM.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawMount {
    /// The image file on the host (absolute path).
    #[schemars(with = "String")]
    host: Spanned<String>,
    /// Where the guest mounts it (absolute path).
    #[schemars(with = "String")]
    guest: Spanned<String>,
    /// `ro` (the default) or `rw`.
    #[schemars(with = "Option<MountModeName>")]
    mode: Option<Spanned<String>>,
}

/// `[network]`: deny wins over allow; built-in denies (loopback, private
/// ranges, metadata, the host's addresses) apply on top.
#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    /// What no rule matches (default: deny).
    #[schemars(with = "Option<DefaultName>")]
    default: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Vec<RulePattern>")]
    allow: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    #[schemars(with = "Vec<DenyEntry>")]
    deny: Vec<Spanned<toml::Value>>,
}

/// `[[http]]`: method and path rules for requests to `hosts`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Host patterns the block governs (as in `[network]`, no port).
    #[schemars(length(min = 1))]
    hosts: Vec<String>,
    /// `METHOD[,METHOD…] /path/glob` (`*` one segment, `**` any); once
    /// any allow is listed, a request no allow matches is denied.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    allow: Vec<Spanned<String>>,
    /// As `allow`; deny wins.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    deny: Vec<Spanned<String>>,
    #[schemars(with = "Option<ModeName>")]
    mode: Option<Spanned<String>>,
}

/// `[[mcp]]`: an MCP server and its tool allowlist.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawMcp {
    /// The server's endpoint, `http(s)://HOST[:PORT]/PATH`; its host must
    /// be allowed by `[network]`.
    url: String,
    /// Tools a sandbox may call (`["*"]`: every tool).
    tools: Vec<String>,
    #[schemars(with = "Option<ModeName>")]
    mode: Option<Spanned<String>>,
}

/// The JSON Schema (draft 2020-12) of policy files, from the parser's types.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(RawPolicy)).expect("a schema serialises");
    schema["$id"] = serde_json::json!("https://sbx-net.dev/schema/policy.json");
    schema
}

/// A `[network]` entry: `"pattern"`, or for a deny
/// `{ pattern = "…", except = ["…"], mode = "audit" }`.
/// `policy_mode` is the mode of a rule that names none.
fn parse_rule_entry(action: Action, value: &toml::Value, line: usize, policy_mode: Mode) -> Result<Rule, String> {
    let verb = action.as_str();
    let (pattern, except, mode) = match value {
        toml::Value::String(s) => (s.as_str(), Vec::new(), policy_mode),
        toml::Value::Table(t) if action == Action::Deny => {
            if let Some(key) = t.keys().find(|k| !matches!(k.as_str(), "pattern" | "except" | "mode")) {
                return Err(format!("deny rule: unknown key {key:?} (expected pattern, except, mode)"));
            }
            let pattern = match t.get("pattern") {
                Some(toml::Value::String(p)) => p.as_str(),
                _ => return Err("deny rule: pattern = \"…\" is required".into()),
            };
            let except = match t.get("except") {
                None => Vec::new(),
                Some(toml::Value::Array(items)) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("deny rule {pattern:?}: except entries are strings")))
                    .collect::<Result<Vec<_>, _>>()?,
                Some(_) => return Err(format!("deny rule {pattern:?}: except must be a list of strings")),
            };
            let mode = match t.get("mode") {
                None => policy_mode,
                Some(toml::Value::String(m)) => Mode::parse(m).map_err(|e| format!("deny rule {pattern:?}: {e}"))?,
                Some(_) => return Err(format!("deny rule {pattern:?}: mode must be a string")),
            };
            (pattern, except, mode)
        }
        toml::Value::Table(_) => return Err(format!("{verb} entries are strings (only deny rules take {{ pattern, except, mode }})")),
        other => return Err(format!("{verb} entries are strings, not {}", other.type_str())),
    };
    let (target, port) = parse_rule(pattern).map_err(|reason| format!("{verb} rule {pattern:?}: {reason}"))?;
    let mut exceptions = Vec::new();
    for text in except {
        let (inner, inner_port) = parse_rule(&text).map_err(|reason| format!("deny rule {pattern:?}: exception {text:?}: {reason}"))?;
        if inner_port.is_some() {
            return Err(format!("deny rule {pattern:?}: exception {text:?} cannot name a port"));
        }
        if !target_covers(&target, &inner) {
            return Err(format!("deny rule {pattern:?}: exception {text:?} is not inside the pattern it excepts from"));
        }
        exceptions.push(Exception { target: inner, text: text.trim().to_string() });
    }
    Ok(Rule { action, target, port, origin: Origin::Policy, text: pattern.trim().to_string(), line, except: exceptions, mode })
}

/// Whether everything `inner` matches, `outer` matches too (and `inner`
/// is narrower: an exception equal to its rule would undo it).
fn target_covers(outer: &Target, inner: &Target) -> bool {
    match (outer, inner) {
        (Target::Cidr(o), Target::Cidr(i)) => {
            o.is_ipv4() == i.is_ipv4() && i.prefix() > o.prefix() && o.contains(i.network())
        }
        (Target::Domain(o), Target::Domain(i)) => {
            let under = |base: &str, d: &str| base == d || base.ends_with(&format!(".{d}"));
            match (o, i) {
                (_, DomainPattern::Exact(name)) => o.matches(name),
                (DomainPattern::AnyDepth(d), DomainPattern::OneLabel(b) | DomainPattern::AnyDepth(b)) => {
                    under(b, d) && !(matches!(i, DomainPattern::AnyDepth(_)) && b == d)
                }
                (DomainPattern::OneLabel(_), DomainPattern::OneLabel(_) | DomainPattern::AnyDepth(_)) => false,
                (DomainPattern::Exact(_), _) => false,
            }
        }
        _ => false,
    }
}

/// A `[[credentials]]` entry.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: String,
    /// Hosts the header is added for (each must be allowed by `[network]`).
    #[schemars(length(min = 1))]
    hosts: Vec<String>,
    /// The header, e.g. `Authorization`.
    header: String,
    /// The header's value with `{secret}` where the secret goes.
    format: String,
    source: RawSource,
    /// Also inject over plain HTTP (default: HTTPS only).
    #[serde(default)]
    allow_plaintext: bool,
}

/// Where the secret comes from: exactly one of `env` or `file`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
struct RawSource {
    /// An environment variable of the daemon.
    env: Option<String>,
    /// A file readable by the daemon.
    file: Option<String>,
}

struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn line_of(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }
}

/// Parses one `allow`/`deny` entry: a CIDR or address (v4, v6; v6 with a
/// port in brackets: `[2001:db8::/32]:443`) or a domain pattern, with an
/// optional `:port`.
pub fn parse_rule(entry: &str) -> Result<(Target, Option<u16>), String> {
    let s = entry.trim();
    if s.is_empty() {
        return Err("empty rule".into());
    }
    let (host, port) = split_port(s)?;
    let port = port.map(parse_port).transpose()?;
    if let Some(net) = parse_cidr(host)? {
        return Ok((Target::Cidr(net), port));
    }
    Ok((Target::Domain(parse_domain_pattern(host)?), port))
}

fn split_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("'[' without a closing ']'")?;
        return match after {
            "" => Ok((inside, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((inside, Some(port))),
                None => Err(format!("unexpected {after:?} after ']' (write [address/len]:port)")),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (host, port) = s.split_once(':').expect("one colon");
            Ok((host, Some(port)))
        }
        // A bare IPv6 address or prefix; a port needs brackets.
        _ => Ok((s, None)),
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port {p:?} (1-65535)")),
        Ok(port) => Ok(port),
    }
}

/// `Ok(None)` when `s` is not an address at all (so maybe a domain).
fn parse_cidr(s: &str) -> Result<Option<IpNetwork>, String> {
    let looks_like_ip = s.contains('/') || s.parse::<IpAddr>().is_ok() || s.contains(':');
    if !looks_like_ip {
        // Dotted digits that failed to parse as an address are a bad IP,
        // not a domain.
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!("invalid IP address {s:?}"));
        }
        return Ok(None);
    }
    let net: IpNetwork = s.parse().map_err(|e| format!("invalid CIDR {s:?}: {e}"))?;
    if net.network() != net.ip() {
        return Err(format!(
            "{s} has host bits set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        ));
    }
    Ok(Some(net))
}

fn parse_domain_pattern(s: &str) -> Result<DomainPattern, String> {
    if s == "*" || s == "**" {
        return Err("a bare wildcard would allow everything; use `default = \"allow\"` instead".into());
    }
    let (make, base): (fn(String) -> DomainPattern, &str) = if let Some(base) = s.strip_prefix("**.") {
        (DomainPattern::AnyDepth, base)
    } else if let Some(base) = s.strip_prefix("*.") {
        (DomainPattern::OneLabel, base)
    } else {
        (DomainPattern::Exact, s)
    };
    if base.contains('*') {
        return Err("wildcards are only allowed as a whole leading label (`*.name` or `**.name`)".into());
    }
    let base = normalise_name(base)?;
    if base.is_empty() {
        return Err("empty domain name".into());
    }
    Ok(make(base))
}

/// Lower-cases, drops the trailing dot and validates a DNS name.
pub fn normalise_name(name: &str) -> Result<String, String> {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err("empty domain name".into());
    }
    // Internationalised names become their A-labels (punycode), the form
    // they take on the wire (UTS #46 processing, as browsers do).
    let name = if name.is_ascii() {
        name
    } else {
        idna::domain_to_ascii(&name).map_err(|_| format!("{name:?} is not a valid internationalised domain name"))?
    };
    if name.len() > 253 {
        return Err("domain name longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?}: labels must be 1-63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("{name:?}: label {label:?} may only contain letters, digits, '-' and '_'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?}: label {label:?} may not start or end with '-'"));
        }
    }
    Ok(name)
}

/// The built-in deny list: addresses a sandbox never reaches unless a
/// policy allows that CIDR explicitly (an allow at least as specific).
pub fn builtin_deny_rules() -> Vec<Rule> {
    const LIST: &[(&str, &str)] = &[
        ("0.0.0.0/8", "this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local, cloud metadata"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.168.0.0/16", "private"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved, broadcast"),
        ("::/96", "IPv4-compatible, embeds IPv4"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("64:ff9b::/96", "NAT64, embeds IPv4"),
        ("64:ff9b:1::/48", "local NAT64, embeds IPv4"),
        ("2001::/32", "Teredo, embeds IPv4"),
        ("2002::/16", "6to4, embeds IPv4"),
        ("fc00::/7", "unique local, private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ];
    LIST.iter()
        .map(|(net, purpose)| Rule::builtin_deny(net.parse().expect("valid built-in CIDR"), purpose))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse("test.toml", text)
    }

    #[test]
    fn governance_sections_parse_with_lines() {
        let p = parse(
            r#"name = "g"
mode = "audit"
[network]
allow = ["api.test", "mcp.test", "198.51.100.0/24"]
deny = [
  { pattern = "**.corp.test", except = ["jira.corp.test", "*.wiki.corp.test"] },
  { pattern = "198.51.100.0/24", except = ["198.51.100.16/28"], mode = "enforce" },
  "bad.test",
]
[[http]]
hosts = ["api.test"]
allow = ["GET /repos/**", "POST /repos/*/issues"]
deny = ["DELETE /**"]
mode = "enforce"
[[mcp]]
url = "https://mcp.test/mcp"
tools = ["search", "fetch"]
"#,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Audit);
        let corp = p.rules.iter().find(|r| r.text == "**.corp.test").unwrap();
        assert_eq!(corp.line, 6);
        assert_eq!(corp.except.len(), 2);
        assert_eq!(corp.exception_for_name("jira.corp.test").map(|e| e.describe(corp)).as_deref(), Some("deny **.corp.test except jira.corp.test"));
        assert!(corp.exception_for_name("a.wiki.corp.test").is_some());
        assert!(corp.exception_for_name("git.corp.test").is_none());
        let net = p.rules.iter().find(|r| r.text == "198.51.100.0/24" && r.action == Action::Deny).unwrap();
        assert!(net.exception_for_ip("198.51.100.17".parse().unwrap()).is_some());
        assert_eq!(net.mode, Mode::Enforce, "a rule's own mode wins over the policy's");
        assert_eq!(corp.mode, Mode::Audit, "a rule without a mode has the policy's");
        assert_eq!(p.http.len(), 1);
        assert_eq!(p.http[0].mode, Mode::Enforce);
        assert_eq!(p.http[0].allow[1].line, 12);
        assert_eq!(p.mcp[0].host, "mcp.test");
        assert_eq!(p.mcp[0].mode, Mode::Audit, "the policy's mode is the default of its entries");

        for (text, line, reason) in [
            ("name = \"x\"\nmode = \"loud\"\n", 2, "mode must be"),
            ("name = \"x\"\n[network]\ndeny = [{ pattern = \"a.test\", except = [\"b.test\"] }]\n", 3, "is not inside"),
            ("name = \"x\"\n[network]\ndeny = [{ pattern = \"10.0.0.0/8\", except = [\"10.0.0.0/8\"] }]\n", 3, "is not inside"),
            ("name = \"x\"\n[network]\ndeny = [{ pattern = \"**.a.test\", except = [\"b.a.test:22\"] }]\n", 3, "port"),
            ("name = \"x\"\n[network]\nallow = [{ pattern = \"a.test\" }]\n", 3, "only deny rules"),
            ("name = \"x\"\n[network]\ndeny = [{ pattern = \"a.test\", exept = [] }]\n", 3, "unknown key"),
            ("name = \"x\"\n\n[[http]]\nhosts = [\"a.test\"]\nallow = [\"GET /a/../b\"]\n", 5, "dot segments"),
            ("name = \"x\"\n[[http]]\nhosts = []\nallow = [\"GET /\"]\n", 2, "hosts must not be empty"),
            ("name = \"x\"\n[[mcp]]\nurl = \"https://m.test/mcp\"\ntools = [\"a\"]\n", 2, "not covered by network.allow"),
            ("name = \"x\"\n[network]\nallow = [\"m.test\"]\n[[mcp]]\nurl = \"https://m.test/mcp\"\ntools = [\"*\", \"a\"]\n", 4, "stands alone"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let p = Policy::embedded_default();
        assert_eq!(p.name, "default");
        assert_eq!(p.default, Action::Deny);
        assert!(p.cidr_rules().count() > 0);
    }

    #[test]
    fn shipped_policies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let policy = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
                crate::policy::compile::compile(&policy, &[]).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
        assert!(checked >= 3);
    }

    #[test]
    fn parses_cidrs_ports_and_domains() {
        let p = parse(
            r#"
name = "t"
[network]
default = "deny"
allow = ["140.82.112.0/20", "2606:50c0::/32", "1.2.3.4", "1.2.3.5:443",
         "[2001:db8::1]:22", "[2001:db8::/48]:443", "2001:db8::2",
         "api.anthropic.com", "*.githubusercontent.com", "**.pypi.org", "github.com:22"]
deny = ["10.0.0.0/8"]
"#,
        )
        .unwrap();
        let shown: Vec<_> = p.rules.iter().map(|r| (r.describe(), r.port, r.line)).collect();
        assert_eq!(shown[0], ("allow 140.82.112.0/20".into(), None, 5));
        assert_eq!(p.rules[3].port, Some(443));
        assert_eq!(p.rules[4].target, Target::Cidr("2001:db8::1/128".parse().unwrap()));
        assert_eq!(p.rules[4].port, Some(22));
        assert_eq!(p.rules[5].target, Target::Cidr("2001:db8::/48".parse().unwrap()));
        assert_eq!(p.rules[6].target, Target::Cidr("2001:db8::2/128".parse().unwrap()));
        assert_eq!(p.rules[8].target, Target::Domain(DomainPattern::OneLabel("githubusercontent.com".into())));
        assert_eq!(p.rules[9].target, Target::Domain(DomainPattern::AnyDepth("pypi.org".into())));
        assert_eq!(p.rules[10].port, Some(22));
        assert_eq!(p.rules[11].action, Action::Deny);
        assert_eq!(p.rules[11].line, 8);
        assert_eq!(p.cidr_rules().count(), 8);
        assert_eq!(p.domain_rules().count(), 4);
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let cases: &[(&str, usize, &str)] = &[
            ("name = \"t\"\n[network]\nallow = [\"10.0.0.0/33\"]\n", 3, "invalid CIDR"),
            ("name = \"t\"\n[network]\nallow = [\n  \"ok.com\",\n  \"10.0.0.1/8\"]\n", 5, "host bits set; did you mean 10.0.0.0/8"),
            ("name = \"t\"\n[network]\nallow = [\"*\"]\n", 3, "bare wildcard"),
            ("name = \"t\"\n[network]\nallow = [\"a*.com\"]\n", 3, "whole leading label"),
            ("name = \"t\"\n[network]\nallow = [\"x.com:0\"]\n", 3, "invalid port"),
            ("name = \"t\"\n[network]\nallow = [\"x.com:99999\"]\n", 3, "invalid port"),
            ("name = \"t\"\n[network]\nallow = [\"300.1.1.1\"]\n", 3, "invalid"),
            ("name = \"t\"\n[network]\ndefault = \"maybe\"\n", 3, "default must be"),
            ("name = \"t\"\n[network]\nalow = []\n", 3, "unknown field `alow`"),
            ("name = \"t\"\nbogus = 1\n", 2, "unknown field `bogus`"),
            ("name = \"t\"\n[network\n", 2, ""),
            ("[network]\nallow = []\n", 1, "missing field `name`"),
            ("name = \"t\"\n[network]\nallow = [\"[2001:db8::1]22\"]\n", 3, "after ']'"),
            // toml gives no message for this one (the policy fuzz target found it).
            ("name = \"t\"\n# a comment with a \u{1} in it\n", 2, "unexpected character '\\u{1}'"),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.file, "test.toml");
            assert_eq!(e.line, *line, "{text:?} → {e}");
            assert!(e.reason.contains(needle), "{text:?} → {e}");
            assert!(e.to_string().starts_with(&format!("test.toml:{line}: ")));
        }
    }

    #[test]
    fn credentials_must_be_covered_by_allow() {
        let base = "name = \"t\"\n[network]\nallow = [\"api.github.com\", \"**.example.com\"]\ndeny = [\"bad.example.com\"]\n";
        let cred = |host: &str| {
            format!("{base}[[credentials]]\nname = \"gh\"\nhosts = [\"{host}\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ env = \"GITHUB_TOKEN\" }}\n")
        };
        assert!(parse(&cred("api.github.com")).is_ok());
        assert!(parse(&cred("API.GitHub.com.")).is_ok());
        assert!(parse(&cred("x.y.example.com")).is_ok());
        let e = parse(&cred("evil.com")).unwrap_err();
        assert!(e.reason.contains("not covered"), "{e}");
        assert_eq!(e.line, 5);
        assert!(parse(&cred("bad.example.com")).is_err());
        assert!(parse(&cred("example.com")).is_err(), "** does not match the apex");
    }

    #[test]
    fn domain_patterns() {
        let one = DomainPattern::OneLabel("example.com".into());
        assert!(one.matches("a.example.com"));
        assert!(!one.matches("a.b.example.com"));
        assert!(!one.matches("example.com"));
        assert!(!one.matches("aexample.com"));
        let any = DomainPattern::AnyDepth("example.com".into());
        assert!(any.matches("a.example.com"));
        assert!(any.matches("a.b.example.com"));
        assert!(!any.matches("example.com"));
        assert!(!any.matches("badexample.com"));
        assert_eq!(normalise_name("WWW.Example.COM.").unwrap(), "www.example.com");
        assert_eq!(normalise_name("Bücher.DE.").unwrap(), "xn--bcher-kva.de");
        assert_eq!(normalise_name("*.bücher.de").map_err(|_| ()), Err(()));
        assert!(normalise_name("a b.de").is_err());
    }

    #[test]
    fn builtin_list_covers_metadata_and_embedded_v4() {
        let list = builtin_deny_rules();
        let covers = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            list.iter().any(|r| matches!(r.target, Target::Cidr(n) if n.contains(ip)))
        };
        for ip in ["169.254.169.254", "127.0.0.1", "10.1.2.3", "172.20.0.1", "192.168.1.1", "100.64.0.1",
                   "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::a9fe:a9fe", "::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "ff02::1", "224.0.0.251"] {
            assert!(covers(ip), "{ip}");
        }
        for ip in ["140.82.112.3", "8.8.8.8", "2606:50c0::1"] {
            assert!(!covers(ip), "{ip}");
        }
    }

    const MOUNTS: &str = r#"name = "t"
[filesystem]
mounts = [
  { host = "/var/lib/sbx/images/repo.img", guest = "/work", mode = "rw" },
  { host = "/var/lib/sbx/images/tools.img", guest = "/opt/tools/", mode = "ro" },
  { host = "/var/lib/sbx/images/data.img", guest = "/data" },
]
"#;

    #[test]
    fn filesystem_mounts_parse_and_default_to_read_only() {
        let p = parse(MOUNTS).unwrap();
        let mount = |host: &str, guest: &str, mode| Mount { host: host.into(), guest: guest.into(), mode };
        assert_eq!(
            p.filesystem,
            [
                mount("/var/lib/sbx/images/repo.img", "/work", MountMode::ReadWrite),
                mount("/var/lib/sbx/images/tools.img", "/opt/tools", MountMode::ReadOnly),
                mount("/var/lib/sbx/images/data.img", "/data", MountMode::ReadOnly),
            ]
        );
        assert!(parse("name = \"t\"\n").unwrap().filesystem.is_empty(), "no [filesystem], no mounts");
        assert!(parse("name = \"t\"\n[filesystem]\n").unwrap().filesystem.is_empty());
        assert!(Policy::embedded_default().filesystem.is_empty());
    }

    #[test]
    fn filesystem_errors_name_the_line() {
        let mounts = |lines: &[&str]| format!("name = \"t\"\n[filesystem]\nmounts = [\n{}\n]\n", lines.join(",\n"));
        let ok = r#"  { host = "/i/a.img", guest = "/a" }"#;
        let cases: Vec<(String, usize, &str)> = vec![
            (mounts(&[ok, r#"  { host = "images/b.img", guest = "/b" }"#]), 5, "host path \"images/b.img\" must be absolute"),
            (mounts(&[r#"  { host = "/i/b.img", guest = "b" }"#]), 4, "must be an absolute path without \"..\""),
            (mounts(&[ok, r#"  { host = "/i/b.img", guest = "/work/../etc" }"#]), 5, "must be an absolute path without \"..\""),
            (mounts(&[ok, r#"  { host = "/i/b.img", guest = "/a/" }"#]), 5, "guest path \"/a\" is mounted twice"),
            (mounts(&[ok, r#"  { host = "/i/b.img", guest = "/b", mode = "rwx" }"#]), 5, "mode must be \"ro\" or \"rw\""),
            (mounts(&[ok, r#"  { host = "/i/b.img", guest = "/b", mdoe = "rw" }"#]), 5, "unknown field `mdoe`"),
            (mounts(&[r#"  { guest = "/b" }"#]), 4, "missing field `host`"),
            ("name = \"t\"\n[filesystem]\nmount = []\n".to_string(), 3, "unknown field `mount`"),
        ];
        for (text, line, needle) in &cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, *line, "{text}\n→ {e}");
            assert!(e.reason.contains(needle), "{text}\n→ {e}");
            assert!(e.to_string().starts_with(&format!("test.toml:{line}: ")));
        }

        let entry = |i: usize| format!("  {{ host = \"/i/{i}.img\", guest = \"/m{i}\" }}");
        let sixteen: Vec<String> = (0..MAX_MOUNTS).map(entry).collect();
        let refs = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(",\n");
        let text = |v: &[String]| format!("name = \"t\"\n[filesystem]\nmounts = [\n{}\n]\n", refs(v));
        assert_eq!(parse(&text(&sixteen)).unwrap().filesystem.len(), 16);
        let seventeen: Vec<String> = (0..=MAX_MOUNTS).map(entry).collect();
        let e = parse(&text(&seventeen)).unwrap_err();
        assert_eq!(e.line, 4 + MAX_MOUNTS, "the 17th mount's line: {e}");
        assert!(e.reason.contains("at most 16 mounts (a VM gets one virtio-blk device per mount)"), "{e}");
    }

    #[test]
    fn compiled_policies_carry_the_mounts_and_older_forms_still_parse() {
        let compiled = compile::compile(&parse(MOUNTS).unwrap(), &[]).unwrap();
        assert_eq!(compiled.filesystem, parse(MOUNTS).unwrap().filesystem);
        let mut json = serde_json::to_value(&compiled).unwrap();
        assert_eq!(json["filesystem"][0]["mode"], "rw");
        json.as_object_mut().unwrap().remove("filesystem");
        let older: compile::CompiledPolicy = serde_json::from_value(json).unwrap();
        assert!(older.filesystem.is_empty());
        assert_eq!(older.v4, compiled.v4);
    }
}
