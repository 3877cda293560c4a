//! Which external programs Rust sources run, read from the source text:
//! the check that keeps tests/src/tools.rs complete.
//!
//! A small lexer (comments, strings, raw strings, chars and lifetimes are
//! told apart, so text inside a string or a comment is never mistaken for
//! code) and a few patterns over its tokens, one per way this workspace
//! starts a program:
//!
//! - `Command::new("X")`, `host_command("X")`, `require_tool("X")`
//! - `run_in(NS, "X", …)`, `netns_command(NS, "X")`
//! - `shell_in(NS, &["X", "Y"], script)`: each listed program, and `sh`
//! - `["netns", "exec", NS, "X", …]`: the argument list of `ip netns exec`
//!
//! A program given as a variable or an expression (the sbx-net binary, the
//! mitmdump of a venv) is not a literal and is not reported.

/// A token: only what the patterns need.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    /// A string literal's value (escapes left as written).
    Str(String),
    Punct(char),
}

/// A token and the line it starts on (1-based).
type Located = (Token, usize);

fn lex(source: &str) -> Vec<Located> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut line = 1;
    // Advances over chars[from..to], counting newlines.
    let advance = |from: usize, to: usize, line: &mut usize| {
        *line += chars[from..to.min(chars.len())].iter().filter(|&&c| c == '\n').count();
        to
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let start_line = line;
        if c == '/' && next == Some('/') {
            let end = chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |p| i + p);
            i = advance(i, end, &mut line);
        } else if c == '/' && next == Some('*') {
            i = skip_block_comment(&chars, i, &mut line);
        } else if c == '"' {
            let (value, end) = string_body(&chars, i + 1);
            tokens.push((Token::Str(value), start_line));
            i = advance(i, end, &mut line);
        } else if let Some((hashes, body)) = raw_string_start(&chars, i) {
            let closing: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let end = (body..chars.len()).find(|&j| chars[j..].starts_with(&closing)).unwrap_or(chars.len());
            tokens.push((Token::Str(chars[body..end].iter().collect()), start_line));
            i = advance(i, end + closing.len(), &mut line);
        } else if c == 'b' && next == Some('"') {
            let (value, end) = string_body(&chars, i + 2);
            tokens.push((Token::Str(value), start_line));
            i = advance(i, end, &mut line);
        } else if c == '\'' {
            i = skip_char_or_lifetime(&chars, i);
        } else if c.is_alphabetic() || c == '_' {
            let end = (i..chars.len()).find(|&j| !(chars[j].is_alphanumeric() || chars[j] == '_')).unwrap_or(chars.len());
            tokens.push((Token::Ident(chars[i..end].iter().collect()), start_line));
            i = end;
        } else if c.is_whitespace() || c.is_ascii_digit() {
            if c == '\n' {
                line += 1;
            }
            i += 1;
        } else {
            tokens.push((Token::Punct(c), start_line));
            i += 1;
        }
    }
    tokens
}

/// A string's value from just after its opening quote; returns the index
/// after the closing quote.
fn string_body(chars: &[char], mut i: usize) -> (String, usize) {
    let mut value = String::new();
    while i < chars.len() {
        match chars[i] {
            '"' => return (value, i + 1),
            '\\' => {
                value.push('\\');
                if let Some(&escaped) = chars.get(i + 1) {
                    value.push(escaped);
                }
                i += 2;
            }
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    (value, i)
}

/// `r"…"`, `r#"…"#`, `br"…"`: the number of `#` and where the body starts.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let after_prefix = match (chars.get(i), chars.get(i + 1)) {
        (Some('r'), _) => i + 1,
        (Some('b'), Some('r')) => i + 2,
        _ => return None,
    };
    // Not the tail of an identifier (`bar"`) — the caller only gets here at
    // a token start, so check the char before.
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    let hashes = chars[after_prefix..].iter().take_while(|&&c| c == '#').count();
    (chars.get(after_prefix + hashes) == Some(&'"')).then_some((hashes, after_prefix + hashes + 1))
}

fn skip_block_comment(chars: &[char], mut i: usize, line: &mut usize) -> usize {
    let mut depth = 0;
    while i < chars.len() {
        if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
            depth += 1;
            i += 2;
        } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            if chars[i] == '\n' {
                *line += 1;
            }
            i += 1;
        }
    }
    i
}

/// `'x'`, `'\n'`, `'\u{1F600}'` are chars; `'a` in `&'a str` a lifetime.
fn skip_char_or_lifetime(chars: &[char], i: usize) -> usize {
    match chars.get(i + 1) {
        Some('\\') => (i + 2..chars.len()).find(|&j| chars[j] == '\'').map_or(chars.len(), |j| j + 1),
        Some(_) if chars.get(i + 2) == Some(&'\'') => i + 3,
        _ => i + 1,
    }
}

/// Functions whose argument at the given index is a program to run.
const PROGRAM_ARGUMENT: &[(&str, usize)] =
    &[("host_command", 0), ("require_tool", 0), ("run_in", 1), ("netns_command", 1)];

/// Programs `source` runs, with the line of each use.
pub fn programs_used(source: &str) -> Vec<(String, usize)> {
    let tokens = lex(source);
    let mut found = Vec::new();
    for at in 0..tokens.len() {
        found.extend(command_new(&tokens, at));
        found.extend(helper_call(&tokens, at));
        found.extend(netns_exec_array(&tokens, at));
    }
    found
}

fn is_ident(tokens: &[Located], at: usize, name: &str) -> bool {
    matches!(tokens.get(at), Some((Token::Ident(n), _)) if n == name)
}

fn is_punct(tokens: &[Located], at: usize, c: char) -> bool {
    matches!(tokens.get(at), Some((Token::Punct(p), _)) if *p == c)
}

fn string_at(tokens: &[Located], at: usize) -> Option<(String, usize)> {
    match tokens.get(at) {
        Some((Token::Str(s), line)) => Some((s.clone(), *line)),
        _ => None,
    }
}

/// `Command :: new ( "X" )`.
fn command_new(tokens: &[Located], at: usize) -> Option<(String, usize)> {
    let call = is_ident(tokens, at, "Command")
        && is_punct(tokens, at + 1, ':')
        && is_punct(tokens, at + 2, ':')
        && is_ident(tokens, at + 3, "new")
        && is_punct(tokens, at + 4, '(');
    if !call {
        return None;
    }
    string_at(tokens, at + 5).filter(|_| is_punct(tokens, at + 6, ')'))
}

/// The token ranges of a call's arguments, from just after its `(`.
fn arguments(tokens: &[Located], mut at: usize) -> Vec<std::ops::Range<usize>> {
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = at;
    while at < tokens.len() {
        match tokens[at].0 {
            Token::Punct('(' | '[' | '{') => depth += 1,
            Token::Punct(')' | ']' | '}') if depth == 0 => {
                if start < at {
                    args.push(start..at);
                }
                return args;
            }
            Token::Punct(')' | ']' | '}') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                args.push(start..at);
                start = at + 1;
            }
            _ => {}
        }
        at += 1;
    }
    args
}

/// An argument that is exactly one string literal.
fn literal(tokens: &[Located], range: &std::ops::Range<usize>) -> Option<(String, usize)> {
    (range.len() == 1).then(|| string_at(tokens, range.start)).flatten()
}

/// `run_in(NS, "X", …)` and the other helpers; `shell_in(NS, &["X"], …)`.
fn helper_call(tokens: &[Located], at: usize) -> Vec<(String, usize)> {
    let Some((Token::Ident(name), line)) = tokens.get(at) else { return Vec::new() };
    // A definition (`fn run_in(`) is not a call.
    if !is_punct(tokens, at + 1, '(') || is_ident(tokens, at.wrapping_sub(1), "fn") {
        return Vec::new();
    }
    let args = arguments(tokens, at + 2);
    if name == "shell_in" {
        let Some(list) = args.get(1) else { return Vec::new() };
        let listed = list.clone().filter_map(|i| string_at(tokens, i));
        return std::iter::once(("sh".to_string(), *line)).chain(listed).collect();
    }
    PROGRAM_ARGUMENT
        .iter()
        .filter(|(helper, _)| helper == name)
        .filter_map(|(_, index)| args.get(*index).and_then(|range| literal(tokens, range)))
        .collect()
}

/// `"netns", "exec", NS, "X"`: X when it is a literal.
fn netns_exec_array(tokens: &[Located], at: usize) -> Option<(String, usize)> {
    let starts = matches!(string_at(tokens, at), Some((s, _)) if s == "netns")
        && is_punct(tokens, at + 1, ',')
        && matches!(string_at(tokens, at + 2), Some((s, _)) if s == "exec")
        && is_punct(tokens, at + 3, ',');
    if !starts {
        return None;
    }
    // The namespace argument, then the program: the array's next elements.
    let elements = arguments(tokens, at + 4);
    elements.get(1).and_then(|range| literal(tokens, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programs(source: &str) -> Vec<String> {
        programs_used(source).into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn finds_every_way_a_program_is_started() {
        let source = r##"
            use std::process::Command;
            fn f(ns: &str, h: &Harness) {
                let a = Command::new("openssl").arg("x509").output();
                let b = std::process::Command::new("ip")
                    .args(["netns", "exec", h.topology.host.name(), "tcpdump", "-i", tap])
                    .spawn();
                let c = run_in(ns, "nft", &["list", "tables"]);
                let d = crate::run_in(&format!("{a}, {b}"), "curl", &[]);
                let e = sbx_net_tests::netns_command(&ns, "nc").args(["-l"]);
                let f = shell_in(&ns, &["seq", "dig"], &script);
                let g = host_command("promtool");
                let mut args: Vec<String> = vec!["netns", "exec", ns.name(), "dnsmasq", "--no-hosts"];
            }
        "##;
        assert_eq!(
            programs(source),
            ["openssl", "ip", "tcpdump", "nft", "curl", "nc", "sh", "seq", "dig", "promtool", "dnsmasq"]
        );
    }

    #[test]
    fn ignores_programs_given_as_variables() {
        let source = r#"
            let a = Command::new(&self.bin).arg("status");
            let b = Command::new(exe);
            let c = run_in(ns, program, &[]);
            let d = Command::new("ip").args(["netns", "exec", world]).arg(&mitmdump);
            let e = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        "#;
        assert_eq!(programs(source), ["ip"]);
    }

    #[test]
    fn ignores_comments_strings_and_definitions() {
        let source = r###"
            // Command::new("commented")
            /* run_in(ns, "blocked", &[]) /* nested */ Command::new("still-comment") */
            /// Runs `program` with `ip netns exec` and run_in(ns, "doc", &[])
            let s = "Command::new(\"in-a-string\")";
            let r = r#"run_in(ns, "in-a-raw-string", &[])"#;
            let c = '"'; let l: &'static str = "x"; let q = '\'';
            pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Output { exec(ns, program, args) }
            let real = Command::new("ping");
        "###;
        assert_eq!(programs(source), ["ping"]);
    }

    #[test]
    fn reports_the_line_of_each_use() {
        let source = "fn f() {\n    let x = \"two\nlines\";\n    run_in(ns,\n        \"dig\", &[]);\n}\n";
        assert_eq!(programs_used(source), [("dig".to_string(), 5)]);
    }
}
