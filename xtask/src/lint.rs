//! `cargo xtask lint`: the layering of `userspace/src`.
//!
//! The crate is one folder per path of the data, in layers listed lowest
//! first in `LAYERS` (userspace/src/lib.rs, the one place the order is
//! written). A module may use its own layer and the layers before it: a
//! `crate::x` path naming a later layer is an upward import, and an
//! upward import is how a circle between modules starts. Inside a layer,
//! the files (other than `mod.rs`, the layer's own front) must not form a
//! circle either.
//!
//! The `policy` layer is pure: its files name no `aya`, `tokio` or `libc`
//! and hold no `unsafe`, so the compiler and every decision it makes stay
//! testable without privileges.
//!
//! The check reads source text: every `crate::name` path, and every name
//! in a `crate::{…}` group, outside comments. It is deliberately simple;
//! its unit tests show what it catches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// One import that breaks the order.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Lints `userspace/src` under `root`; fails listing every violation.
pub fn lint(root: &Path) -> Result<()> {
    let src = root.join("userspace/src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).context("reading userspace/src/lib.rs")?;
    let layers = declared_layers(&lib).context("userspace/src/lib.rs: no `pub const LAYERS: &[&str] = &[…];`")?;
    let mut files = Vec::new();
    collect_rs(&src, &mut files)?;
    let mut sources = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).expect("under src").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        sources.push((rel, text));
    }
    let violations = check(&layers, &sources);
    if violations.is_empty() {
        eprintln!("[lint] {} files in {} layers: no upward import, no circle", sources.len(), layers.len());
        return Ok(());
    }
    for v in &violations {
        eprintln!("userspace/src/{}:{}: {}", v.file, v.line, v.message);
    }
    bail!("{} layering violation(s); the order is LAYERS in userspace/src/lib.rs (lowest first)", violations.len())
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The names in `pub const LAYERS: &[&str] = &["a", "b", …];`.
pub fn declared_layers(lib: &str) -> Option<Vec<String>> {
    let start = lib.find("pub const LAYERS")?;
    let rest = &lib[start..];
    let open = rest.find("&[\"").or_else(|| rest.find("= &["))?;
    let close = rest[open..].find("];")? + open;
    let list = &rest[open..close];
    let names: Vec<String> = list.split('"').skip(1).step_by(2).map(str::to_string).collect();
    (!names.is_empty()).then_some(names)
}

/// Layers that must stay free of syscalls and async runtimes.
const PURE_LAYERS: &[&str] = &["policy"];
/// What a pure layer may not name.
const IMPURE: &[&str] = &["aya", "tokio", "libc", "unsafe"];

/// Whether `word` appears in `text` as a whole identifier.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().last();
        let after = text[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

/// The layer (top-level module) a file under src belongs to: its folder,
/// or its stem for a file at the top. `lib.rs` and `main.rs` have none, nor
/// the binaries in `bin/` (crates of their own over the library, like `main.rs`).
fn layer_of(rel: &str) -> Option<&str> {
    match rel.split_once('/') {
        Some(("bin", _)) => None,
        Some((dir, _)) => Some(dir),
        None => rel.strip_suffix(".rs").filter(|s| *s != "lib" && *s != "main"),
    }
}

/// The module a file is, inside its layer (`dns/server.rs` → `server`),
/// for files other than the layer's `mod.rs`.
fn sibling_of(rel: &str) -> Option<&str> {
    let (_, file) = rel.split_once('/')?;
    let first = file.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "mod").then_some(name)
}

/// The code of a line: string and char literals blanked (a `"http://x"`
/// is not a comment, a `"crate::x"` not a path), then without its `//`
/// comment, and `crate :: x` written `crate::x`.
fn code(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_string = false;
                    out.push('"');
                }
                _ => out.push(' '),
            }
            continue;
        }
        match c {
            // A char literal of a quote (`'"'`, `'\\"'`) opens no string.
            '\'' if chars.peek() == Some(&'"') || chars.peek() == Some(&'\\') => {
                let rest: String = chars.clone().take(3).collect();
                let len = if rest.starts_with("\"'") { 2 } else if rest.starts_with("\\\"'") { 3 } else { 0 };
                out.push('\'');
                for _ in 0..len {
                    chars.next();
                    out.push(' ');
                }
            }
            '"' => {
                in_string = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    let mut squeezed = out.replace("crate ::", "crate::");
    while squeezed.contains(":: ") {
        squeezed = squeezed.replace(":: ", "::");
    }
    squeezed
}

/// Every `crate::` path in `text` as (line, first segment, second segment).
/// A `crate::{a, b::c}` group (possibly spanning lines) yields each member.
pub fn crate_paths(text: &str) -> Vec<(usize, String, Option<String>)> {
    let mut out = Vec::new();
    let lines: Vec<String> = text.lines().map(code).collect();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    for (n, line) in lines.iter().enumerate() {
        let mut rest = line.as_str();
        while let Some(i) = rest.find("crate::") {
            // `sbx_net_crate::` or `my_crate::` are other paths.
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Gather the group across lines up to its closing brace.
                let mut body = String::from(group);
                let mut m = n;
                while depth(&body) > -1 && m + 1 < lines.len() {
                    m += 1;
                    body.push(' ');
                    body.push_str(&lines[m]);
                }
                for member in top_level_members(&body) {
                    let mut parts = member.split("::").map(str::trim);
                    let first = ident(parts.next().unwrap_or(""));
                    let second = parts.next().map(ident).filter(|s| !s.is_empty());
                    if !first.is_empty() {
                        out.push((n + 1, first, second));
                    }
                }
                continue;
            }
            let first = ident(rest);
            let second = rest[first.len()..].strip_prefix("::").map(ident).filter(|s| !s.is_empty());
            if !first.is_empty() {
                out.push((n + 1, first, second));
            }
        }
    }
    out
}

/// Every `super::name` path in `text` (outside comments), with its line; a
/// `super::{a, b}` group yields each member.
pub fn super_paths(text: &str) -> Vec<(usize, String)> {
    let renamed = text.replace("super::super", "_climb_");
    crate_paths(&renamed.replace("super::", "crate::")).into_iter().map(|(line, first, _)| (line, first)).collect()
}

/// Brace depth of a group body that starts just inside its `{`: -1 once
/// it is closed.
fn depth(body: &str) -> i32 {
    let mut d = 0;
    for c in body.chars() {
        match c {
            '{' => d += 1,
            '}' => {
                d -= 1;
                if d < 0 {
                    return d;
                }
            }
            _ => {}
        }
    }
    d
}

/// The comma-separated members at the top level of a group body (up to
/// its closing brace).
fn top_level_members(body: &str) -> Vec<String> {
    let mut members = Vec::new();
    let mut current = String::new();
    let mut d = 0;
    for c in body.chars() {
        match c {
            '{' => {
                d += 1;
                current.push(c);
            }
            '}' if d == 0 => break,
            '}' => {
                d -= 1;
                current.push(c);
            }
            ',' if d == 0 => members.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    members.push(current);
    members.into_iter().map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect()
}

/// The violations in `sources` ((path under src, text) pairs) against
/// `layers` (lowest first).
pub fn check(layers: &[String], sources: &[(String, String)]) -> Vec<Violation> {
    let rank: BTreeMap<&str, usize> = layers.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let mut out = Vec::new();
    // Within each layer: sibling file → siblings it uses.
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<(String, usize)>>> = BTreeMap::new();
    for (rel, text) in sources {
        let Some(own) = layer_of(rel) else { continue };
        let Some(&own_rank) = rank.get(own) else {
            out.push(Violation { file: rel.clone(), line: 1, message: format!("module `{own}` is not in LAYERS") });
            continue;
        };
        for (line, first, second) in crate_paths(text) {
            match rank.get(first.as_str()) {
                Some(&r) if r > own_rank => out.push(Violation {
                    file: rel.clone(),
                    line,
                    message: format!("`{own}` (layer {own_rank}) uses `crate::{first}` (layer {r}), a later layer"),
                }),
                Some(_) if first == own => {
                    if let (Some(from), Some(to)) = (sibling_of(rel), second.as_deref()) {
                        if from != to && sources.iter().any(|(r, _)| layer_of(r) == Some(own) && sibling_of(r) == Some(to)) {
                            edges.entry(own.to_string()).or_default().entry(from.to_string()).or_default().insert((to.to_string(), line));
                        }
                    }
                }
                Some(_) => {}
                // A name that is not a layer: an item re-exported at the
                // crate root (`crate::Policy`) is fine only from lib.rs.
                None => out.push(Violation {
                    file: rel.clone(),
                    line,
                    message: format!("`crate::{first}` is not a layer; import through the layer that owns it"),
                }),
            }
        }
        // `super::sibling` from a file directly in a layer's folder is the
        // same edge as `crate::layer::sibling`.
        if let (Some(from), 1) = (sibling_of(rel), rel.matches('/').count()) {
            for (line, to) in super_paths(text) {
                if to != from && sources.iter().any(|(r, _)| layer_of(r) == Some(own) && sibling_of(r) == Some(to.as_str())) {
                    edges.entry(own.to_string()).or_default().entry(from.to_string()).or_default().insert((to, line));
                }
            }
        }
        if PURE_LAYERS.contains(&own) {
            for (n, l) in text.lines().enumerate() {
                let c = code(l);
                if let Some(word) = IMPURE.iter().find(|w| contains_word(&c, w)) {
                    out.push(Violation { file: rel.clone(), line: n + 1, message: format!("`{own}` is pure: no `{word}` here (move the I/O to a later layer)") });
                }
            }
        }
        // `use crate as x;` would hide every later path from this check.
        for (n, l) in text.lines().enumerate() {
            if code(l).contains("crate as ") {
                out.push(Violation { file: rel.clone(), line: n + 1, message: "`crate as …` hides paths from the layering check; write `crate::` paths".into() });
            }
        }
        // `super::super::` from a file in a folder climbs out of its layer.
        for (n, l) in text.lines().enumerate() {
            if code(l).contains("super::super::super") || (rel.matches('/').count() == 1 && code(l).contains("super::super")) {
                out.push(Violation { file: rel.clone(), line: n + 1, message: "`super::super` leaves the layer; use a `crate::` path".into() });
            }
        }
    }
    for (layer, graph) in &edges {
        if let Some(cycle) = find_cycle(graph) {
            let file = format!("{layer}/{}.rs", cycle[0]);
            let line = graph[&cycle[0]].iter().find(|(to, _)| *to == cycle[1]).map_or(1, |(_, l)| *l);
            out.push(Violation { file, line, message: format!("a circle inside `{layer}`: {}", cycle.join(" → ")) });
        }
    }
    out
}

/// A cycle in a small directed graph, as the node list closing on itself.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<(String, usize)>>) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &BTreeMap<String, BTreeSet<(String, usize)>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for (next, _) in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<String> {
        ["util", "policy", "dns", "proxy"].map(String::from).to_vec()
    }

    fn src(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
    }

    #[test]
    fn layers_are_read_from_lib_rs() {
        let lib = "pub mod a;\npub const LAYERS: &[&str] = &[\"util\", \"policy\",\n \"dns\"];\n";
        assert_eq!(declared_layers(lib).unwrap(), ["util", "policy", "dns"]);
    }

    #[test]
    fn a_downward_import_passes() {
        let s = src(&[("proxy/mod.rs", "use crate::dns::decide::name_verdict;\nuse crate::util::net::canonical;\n")]);
        assert_eq!(check(&layers(), &s), []);
    }

    #[test]
    fn an_upward_path_fails_with_its_line() {
        let s = src(&[("dns/server.rs", "use crate::util::clock;\n\nfn f() { crate::proxy::serve(); }\n")]);
        let v = check(&layers(), &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].file.as_str(), v[0].line), ("dns/server.rs", 3));
        assert!(v[0].message.contains("crate::proxy"), "{}", v[0].message);
    }

    #[test]
    fn an_upward_member_of_a_multi_line_group_fails() {
        let s = src(&[("policy/mod.rs", "use crate::{\n    util::fs,\n    dns::decide::{a, b},\n};\n")]);
        let v = check(&layers(), &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("crate::dns"));
    }

    #[test]
    fn comments_and_other_crates_paths_are_not_imports() {
        let s = src(&[("util/net.rs", "// see crate::proxy::serve\n/// [`crate::dns`]\nuse sbx_net_crate::proxy;\n")]);
        assert_eq!(check(&layers(), &s), []);
    }

    #[test]
    fn strings_are_not_comments_and_spacing_or_renames_do_not_hide_a_path() {
        let s = src(&[
            ("util/a.rs", "let u = \"http://x\"; crate::proxy::serve();\n"),
            ("util/b.rs", "fn f() { crate :: proxy :: serve(); }\n"),
            ("util/c.rs", "use crate as root;\n"),
            ("util/d.rs", "let s = \"crate::proxy is only text\"; // crate::proxy\n"),
            ("util/e.rs", "let q = '\"'; crate::proxy::serve();\n"),
        ]);
        let v = check(&layers(), &s);
        let files: Vec<&str> = v.iter().map(|v| v.file.as_str()).collect();
        assert_eq!(files, ["util/a.rs", "util/b.rs", "util/c.rs", "util/e.rs"], "{v:?}");
    }

    #[test]
    fn a_circle_between_files_of_one_layer_fails() {
        let s = src(&[
            ("dns/server.rs", "use crate::dns::learned::Learned;\n"),
            ("dns/learned.rs", "use crate::dns::server::boot;\n"),
            ("dns/mod.rs", "pub mod learned;\npub mod server;\n"),
        ]);
        let v = check(&layers(), &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("circle"), "{}", v[0].message);
    }

    #[test]
    fn a_circle_through_super_paths_fails() {
        let s = src(&[
            ("dns/server.rs", "use super::upstream::{read_framed, UpstreamClient};\n"),
            ("dns/upstream.rs", "use super::server::DnsError;\n"),
            ("dns/mod.rs", "pub mod server;\npub mod upstream;\n"),
        ]);
        let v = check(&layers(), &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("server → upstream → server") || v[0].message.contains("upstream → server → upstream"), "{}", v[0].message);
    }

    #[test]
    fn binaries_are_above_every_layer_like_main() {
        let s = src(&[("bin/sbx-net-cni.rs", "use sbx_net::cli::cni::run;\n"), ("main.rs", "use sbx_net::cli::vm;\n")]);
        assert_eq!(check(&layers(), &s), []);
    }

    #[test]
    fn a_root_re_export_or_unknown_module_fails_outside_lib() {
        let s = src(&[("dns/server.rs", "use crate::Policy;\n")]);
        assert_eq!(check(&layers(), &s).len(), 1);
    }

    #[test]
    fn the_policy_layer_stays_pure() {
        let s = src(&[("policy/compile.rs", "use std::fs;\nfn f() { let _ = tokio::spawn(async {}); }\n// unsafe in a comment is fine\nlet unsafety = 1;\n")]);
        let v = check(&layers(), &s);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].line, 2);
        assert!(v[0].message.contains("tokio"));
    }

    #[test]
    fn climbing_out_of_a_layer_with_super_fails() {
        let s = src(&[("dns/server.rs", "use super::super::proxy;\n")]);
        assert_eq!(check(&layers(), &s).len(), 1);
    }

    /// The check `cargo xtask test` runs, on this workspace.
    #[test]
    fn the_workspace_has_no_upward_import() {
        lint(&crate::workspace_root()).unwrap();
    }
}
