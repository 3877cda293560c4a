//! The MCP allowlist end to end: a real MCP client (the PyPI SDK, in the
//! venv bootstrap makes) in a netns guest talks to real MCP servers (the
//! same SDK) in the world namespace through sbx-net, over Streamable HTTP
//! and the older HTTP+SSE transport. Listed tools only in `tools/list`,
//! an unlisted call answered with the JSON-RPC error naming the rule and
//! never seen by the server (each server logs the calls it gets), flow
//! records with protocol mcp, audit mode letting calls through, a server
//! not listed being just a host; and raw JSON-RPC attacks sent with curl.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sbx_net::observe::record::{FlowRecord, Verdict};
use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{host_command, netns_command, require_root, run_in, tcp_listening_on, unique_name, wait_until, Background, WorldDns};
use serde_json::Value;

/// The MCP SDK's venv (`cargo xtask bootstrap` makes it).
const PYTHON: &str = "/opt/sbx-net/mcp-venv/bin/python";
const MCP_ADDR: &str = "198.51.100.60";
const SSE_ADDR: &str = "198.51.100.61";
const OTHER_ADDR: &str = "198.51.100.62";
const TLS_ADDR: &str = "198.51.100.63";
const RULE: &str = "mcp http://mcp.test/mcp tools search,fetch";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp").join(name)
}

/// An MCP server of tests/mcp/server.py in the world, on port 80 of
/// `addr` (or `port`); its calls logged to `log`. Killed on drop.
fn start_server(world: &str, transport: &str, addr: &str, port: u16, log: &Path, dir: &Path, extra: &[&str]) -> Background {
    let out = std::fs::File::create(dir.join(format!("server-{addr}.out"))).unwrap();
    let child = netns_command(world, PYTHON)
        .arg(script("server.py"))
        .args(["--transport", transport, "--host", addr, "--port", &port.to_string(), "--log"])
        .arg(log)
        .args(extra)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn the MCP server");
    let mut child = Background(child);
    // Python starts slowly on a busy machine.
    wait_until(Duration::from_secs(90), &format!("the MCP server on {addr}:{port}"), || {
        child.assert_running("the MCP server");
        tcp_listening_on(world, SocketAddr::new(ip(addr), port))
    });
    child
}

/// tests/mcp/client.py in the guest: its JSON (tools listed, calls made).
fn client(ns: &str, args: &[&str]) -> Value {
    client_with(ns, args, &[])
}

fn client_with(ns: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = netns_command(ns, PYTHON)
        .arg(script("client.py"))
        .args(args)
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client.py {args:?} failed: {stderr}\n{stdout}");
    let line = stdout.lines().last().unwrap_or_else(|| panic!("client.py {args:?} printed nothing: {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("client.py printed no JSON ({e}): {stdout}\n{stderr}"))
}

fn tools(result: &Value) -> Vec<&str> {
    result["tools"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
}

fn mcp_records(h: &DaemonHarness, sandbox: &str) -> Vec<FlowRecord> {
    let out = h.cli_ok(&["inspect", "-o", "json", "--sandbox", sandbox]);
    out.lines()
        .map(|l| serde_json::from_str::<FlowRecord>(l).unwrap_or_else(|e| panic!("inspect printed a non-record ({e}): {l}")))
        .filter(|r| &*r.protocol == "mcp")
        .collect()
}

/// The records of `sandbox` for calls of `tool`.
fn call_records(h: &DaemonHarness, sandbox: &str, tool: &str) -> Vec<FlowRecord> {
    mcp_records(h, sandbox).into_iter().filter(|r| r.mcp.as_ref().is_some_and(|m| m.method == "tools/call" && m.tool.as_deref() == Some(tool))).collect()
}

fn calls_seen(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A CA and a leaf for `name` made with openssl in `dir`: (CA PEM, leaf
/// PEM, leaf key PEM).
fn tls_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let [ca, ca_key, leaf, key, csr, ext] = ["ca.pem", "ca.key", "leaf.pem", "leaf.key", "leaf.csr", "leaf.ext"].map(|f| dir.join(f));
    std::fs::write(&ext, format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n")).unwrap();
    let openssl = |args: &[&str]| {
        let out = host_command("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(&[&["req", "-x509"][..], &ec, &["-keyout", &p(&ca_key), "-out", &p(&ca), "-days", "2", "-subj", "/CN=sbx-net MCP test CA"]].concat());
    openssl(&[&["req"][..], &ec, &["-keyout", &p(&key), "-out", &p(&csr), "-subj", &format!("/CN={name}")]].concat());
    openssl(&["x509", "-req", "-in", &p(&csr), "-CA", &p(&ca), "-CAkey", &p(&ca_key), "-CAcreateserial", "-out", &p(&leaf), "-days", "2", "-extfile", &p(&ext)]);
    (ca, leaf, key)
}

struct World {
    h: DaemonHarness,
    dir: PathBuf,
    log: PathBuf,
    _dns: WorldDns,
    _servers: Vec<Background>,
    tls_dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tls_dir);
    }
}

fn world(tag: &str) -> World {
    require_root();
    assert!(Path::new(PYTHON).exists(), "{PYTHON} missing: `cargo xtask bootstrap` installs the MCP SDK into its venv");
    let policy = |name: &str, mode: &str| {
        format!(
            "name = \"{name}\"\n[network]\ndefault = \"deny\"\nallow = [\"mcp.test\", \"sse.test\", \"other.test\", \"mcps.test\"]\n\
             [[mcp]]\nurl = \"http://mcp.test/mcp\"\ntools = [\"search\", \"fetch\"]\n{mode}\
             [[mcp]]\nurl = \"http://sse.test/sse\"\ntools = [\"search\"]\n{mode}\
             [[mcp]]\nurl = \"https://mcps.test/mcp\"\ntools = [\"search\"]\n{mode}"
        )
    };
    let enforce = policy("agent", "");
    let audit = policy("agent-audit", "mode = \"audit\"\n");
    let upstream = format!("--upstream-dns={}:53", WorldDns::ADDR);
    let tls_dir = std::env::temp_dir().join(unique_name("mcptls"));
    std::fs::create_dir_all(&tls_dir).unwrap();
    let (ca, leaf, key) = tls_files(&tls_dir, "mcps.test");
    let upstream_ca = format!("--upstream-ca={}", ca.display());
    let h = DaemonHarness::with_args(
        tag,
        &[("agent.toml", enforce.as_str()), ("agent-audit.toml", audit.as_str())],
        None,
        &[upstream.as_str(), upstream_ca.as_str()],
    );
    for a in [MCP_ADDR, SSE_ADDR, OTHER_ADDR, TLS_ADDR] {
        h.topology.add_world_address(ip(a));
    }
    let dns = WorldDns::start(
        &h.topology.world,
        &[format!("mcp.test,{MCP_ADDR},60"), format!("sse.test,{SSE_ADDR},60"), format!("other.test,{OTHER_ADDR},60"), format!("mcps.test,{TLS_ADDR},60")],
        &[],
    );
    let dir = h.dir.join("mcp");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("calls.log");
    let world = h.topology.world.name().to_string();
    let (leaf, key) = (leaf.to_str().unwrap(), key.to_str().unwrap());
    let servers = vec![
        start_server(&world, "streamable-http", MCP_ADDR, 80, &log, &dir, &[]),
        start_server(&world, "sse", SSE_ADDR, 80, &log, &dir, &[]),
        start_server(&world, "streamable-http", OTHER_ADDR, 80, &dir.join("other.log"), &dir, &[]),
        start_server(&world, "streamable-http", TLS_ADDR, 443, &dir.join("tls.log"), &dir, &["--certfile", leaf, "--keyfile", key]),
    ];
    World { h, dir, log, _dns: dns, _servers: servers, tls_dir }
}

#[test]
fn mcp_tools_are_allowlisted_filtered_and_recorded() {
    let w = world("mcp");
    let h = &w.h;
    let name = unique_name("g");
    let g = h.create_guest(&name, "agent");
    let ns = g["netns"].as_str().unwrap().to_string();

    // Streamable HTTP: the listed tools only; the allowed call works; the
    // unlisted one gets the JSON-RPC error naming the rule.
    let r = client(&ns, &["http://mcp.test/mcp", "search", "delete_repo"]);
    assert_eq!(tools(&r), vec!["fetch", "search"], "{r}");
    assert_eq!(r["calls"]["search"]["ok"], true, "{r}");
    assert_eq!(r["calls"]["search"]["text"], "results for arg-q-5e1", "{r}");
    let denied = &r["calls"]["delete_repo"];
    let rule = format!("{RULE} (tool \"delete_repo\" not listed)");
    assert_eq!(denied["ok"], false, "{r}");
    assert_eq!(denied["code"], -32001, "{r}");
    assert_eq!(denied["message"], format!("sbx-net: denied by {rule}"), "{r}");
    assert_eq!(denied["data"]["rule"], rule.as_str(), "{r}");
    // The server saw the allowed call and never the refused one.
    let seen = calls_seen(&w.log);
    assert!(seen.contains("CALL search"), "{seen}");
    assert!(!seen.contains("delete_repo"), "{seen}");

    // Every message is a record; calls carry the tool and the verdict,
    // never the arguments.
    let records = mcp_records(h, &name);
    assert!(records.iter().any(|r| r.mcp.as_ref().unwrap().method == "initialize"), "{records:?}");
    assert!(records.iter().any(|r| r.mcp.as_ref().unwrap().method == "tools/list"), "{records:?}");
    let allowed = call_records(h, &name, "search");
    assert_eq!(allowed.len(), 1, "{records:?}");
    assert_eq!(allowed[0].verdict, Verdict::Allowed);
    assert_eq!(allowed[0].rule.as_deref(), Some(RULE));
    assert_eq!(allowed[0].mcp.as_ref().unwrap().server, "http://mcp.test/mcp");
    let refused = call_records(h, &name, "delete_repo");
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0].verdict, Verdict::Denied);
    assert_eq!(refused[0].rule.as_deref(), Some(rule.as_str()));
    let all = h.cli_ok(&["inspect", "-o", "json", "--sandbox", &name]);
    assert!(!all.contains("arg-q-5e1") && !all.contains("arg-n-5e1"), "arguments recorded: {all}");
    assert!(!h.log().contains("arg-q-5e1") && !h.log().contains("arg-n-5e1"), "arguments in the daemon log");

    // The HTTP+SSE transport (answers come on the GET stream): the same.
    let r = client(&ns, &["--sse", "http://sse.test/sse", "search", "fetch"]);
    assert_eq!(tools(&r), vec!["search"], "{r}");
    assert_eq!(r["calls"]["search"]["ok"], true, "{r}");
    assert_eq!(r["calls"]["fetch"]["code"], -32001, "{r}");
    assert!(r["calls"]["fetch"]["message"].as_str().unwrap().contains("mcp http://sse.test/sse tools search (tool \"fetch\" not listed)"), "{r}");
    assert!(!calls_seen(&w.log).contains("fetch"), "{}", calls_seen(&w.log));

    // HTTPS: terminated with the sandbox CA (which the client trusts
    // through SSL_CERT_FILE), checked the same way.
    let sandbox_ca = g["ca_cert"].as_str().unwrap().to_string();
    let r = client_with(&ns, &["https://mcps.test/mcp", "search", "delete_repo"], &[("SSL_CERT_FILE", sandbox_ca.as_str())]);
    assert_eq!(tools(&r), vec!["search"], "{r}");
    assert_eq!(r["calls"]["search"]["ok"], true, "{r}");
    assert_eq!(r["calls"]["delete_repo"]["code"], -32001, "{r}");
    let tls_seen = calls_seen(&w.dir.join("tls.log"));
    assert!(tls_seen.contains("CALL search") && !tls_seen.contains("delete_repo"), "{tls_seen}");
    assert_eq!(call_records(h, &name, "delete_repo").iter().filter(|r| r.mcp.as_ref().unwrap().server == "https://mcps.test/mcp").count(), 1);

    // A server not listed in [[mcp]] is just a host: every tool, every call.
    let r = client(&ns, &["http://other.test/mcp", "delete_repo"]);
    assert_eq!(tools(&r), vec!["delete_repo", "fetch", "search"], "{r}");
    assert_eq!(r["calls"]["delete_repo"]["ok"], true, "{r}");
    assert!(calls_seen(&w.dir.join("other.log")).contains("CALL delete_repo"));
    assert!(mcp_records(h, &name).iter().all(|r| r.dst_ip != Some(ip(OTHER_ADDR))), "records for the unlisted server");

    // Audit mode: nothing filtered or refused, the would-be denial recorded.
    let audit_name = unique_name("ga");
    let g = h.create_guest(&audit_name, "agent-audit");
    let audit_ns = g["netns"].as_str().unwrap().to_string();
    let r = client(&audit_ns, &["http://mcp.test/mcp", "delete_repo"]);
    assert_eq!(tools(&r), vec!["delete_repo", "fetch", "search"], "{r}");
    assert_eq!(r["calls"]["delete_repo"]["ok"], true, "{r}");
    assert!(calls_seen(&w.log).contains("CALL delete_repo"));
    let audited = call_records(h, &audit_name, "delete_repo");
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].verdict, Verdict::Audit);
    assert_eq!(audited[0].rule.as_deref(), Some(rule.as_str()));
    let listed = mcp_records(h, &audit_name);
    assert!(listed.iter().any(|r| r.verdict == Verdict::Audit && r.mcp.as_ref().unwrap().method == "tools/list"), "{listed:?}");
}

/// A POST of `body` to http://mcp.test/mcp with curl: (status line and
/// headers, body).
fn post(ns: &str, dir: &Path, body: &[u8]) -> (String, String) {
    let file = dir.join(unique_name("body"));
    let answer = file.with_extension("out");
    std::fs::write(&file, body).unwrap();
    let data = format!("@{}", file.display());
    let out = run_in(
        ns,
        "curl",
        &[
            "-s",
            "-D",
            "-",
            "-o",
            answer.to_str().unwrap(),
            "--max-time",
            "10",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "--data-binary",
            &data,
            "http://mcp.test/mcp",
        ],
    );
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(head.starts_with("HTTP/"), "no response (curl {:?}): {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    (head, std::fs::read_to_string(&answer).unwrap_or_default())
}

#[test]
fn raw_json_rpc_tricks_are_refused() {
    let w = world("mcpraw");
    let h = &w.h;
    let name = unique_name("g");
    let g = h.create_guest(&name, "agent");
    let ns = g["netns"].as_str().unwrap().to_string();
    let rule = format!("{RULE} (tool \"delete_repo\" not listed)");
    let call = |id: u32, tool: &str| format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{"name":"x"}}}}}}"#);

    // A batch hiding a denied call among allowed ones: refused whole, one
    // error per request, none for the notification.
    let batch = format!("[{},{},{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}}]", call(1, "search"), call(2, "delete_repo"));
    let (head, body) = post(&ns, &w.dir, batch.as_bytes());
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("x-sbx-net-denied: {}", rule.to_ascii_lowercase())), "{head}");
    let answers: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 2, "{body}");
    assert_eq!((answers[0]["id"].as_u64(), answers[1]["id"].as_u64()), (Some(1), Some(2)), "{body}");
    assert!(answers[0]["error"]["message"].as_str().unwrap().contains("batch refused"), "{body}");
    assert_eq!(answers[1]["error"]["data"]["rule"], rule.as_str(), "{body}");

    // Duplicate keys: read differently by different parsers, so refused.
    let dup = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search","name":"delete_repo"}}"#;
    let (head, body) = post(&ns, &w.dir, dup.as_bytes());
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("x-sbx-net-denied"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32700, "{body}");
    assert!(v["error"]["message"].as_str().unwrap().contains("duplicate key"), "{body}");
    // …also spelt with an escape.
    let escaped = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search","n\u0061me":"delete_repo"}}"#;
    let (_, body) = post(&ns, &w.dir, escaped.as_bytes());
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], -32700, "{body}");

    // Method spellings a lenient server might take for tools/call.
    for method in ["Tools/Call", "TOOLS/CALL", " tools/call"] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":4,"method":"{method}","params":{{"name":"delete_repo"}}}}"#);
        let (head, answer) = post(&ns, &w.dir, body.as_bytes());
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{method}: {e}: {head}\n{answer}"));
        assert_eq!(v["error"]["code"], -32001, "{method}: {answer}");
    }

    // A name that is not a string, or no name.
    for params in [r#"{"name":["delete_repo"]}"#, r#"{"name":{"x":"delete_repo"}}"#, r#"{"name":null}"#, r#"{}"#] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{params}}}"#);
        let (_, answer) = post(&ns, &w.dir, body.as_bytes());
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{params}: {e}: {answer}"));
        assert_eq!(v["error"]["code"], -32602, "{params}: {answer}");
    }

    // Not JSON at all; and a body over the bound.
    let (_, answer) = post(&ns, &w.dir, b"{\"jsonrpc\":\"2.0\",");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["error"]["code"], -32700, "{answer}");
    let mut big = call(6, "search").into_bytes();
    big.truncate(big.len() - 1);
    big.extend_from_slice(b",\"pad\":\"");
    big.resize(big.len() + (1 << 20), b'a');
    big.extend_from_slice(b"\"}");
    let (head, _) = post(&ns, &w.dir, &big);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // None of it reached the server; all of it is recorded as denied.
    let seen = calls_seen(&w.log);
    assert!(seen.is_empty(), "the server saw: {seen}");
    let records = mcp_records(h, &name);
    assert!(records.len() >= 12, "{records:?}");
    assert!(records.iter().all(|r| r.verdict == Verdict::Denied), "{records:?}");
    let reasons: std::collections::BTreeSet<&str> = records.iter().map(|r| &*r.reason).collect();
    for reason in ["denied", "batch_refused", "duplicate_key", "invalid_request", "parse_error"] {
        assert!(reasons.contains(reason), "no {reason} record: {reasons:?}");
    }
}
