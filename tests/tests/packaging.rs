//! Installed like a host service (issue 17): the FHS defaults a daemon and
//! the CLI use with no flags at all, the JSON Schemas checked by an
//! independent validator (check-jsonschema) against the example policies
//! and every TOML snippet of the README, shell completions run by the
//! shells they are for, a man page for every subcommand, `-o json` and the
//! documented exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sbx_net_tests::daemon::{sbx_net_bin, DaemonHarness};
use sbx_net_tests::{require_root, require_tool, unique_name, wait_for, Background, Topology};

const CHECK_JSONSCHEMA: &str = "/opt/sbx-net/mcp-venv/bin/check-jsonschema";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sbx-net ARGS` with no socket or config from the environment.
fn sbx(args: &[&str]) -> Output {
    Command::new(sbx_net_bin()).args(args).env_remove("SBX_NET_SOCKET").env_remove("SBX_NET_CONFIG").output().expect("run sbx-net")
}

fn sbx_ok(args: &[&str]) -> String {
    let out = sbx(args);
    assert!(out.status.success(), "sbx-net {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// check-jsonschema on `files` against `schema`.
fn validate(schema: &Path, files: &[PathBuf]) -> Output {
    assert!(Path::new(CHECK_JSONSCHEMA).exists(), "{CHECK_JSONSCHEMA} is missing: `cargo xtask bootstrap` installs it");
    Command::new(CHECK_JSONSCHEMA).arg("--schemafile").arg(schema).args(files).output().expect("run check-jsonschema")
}

/// The README's ```toml blocks, dedented, as (policy snippets, config
/// snippets). A policy fragment without a `name` gets one, so that it is a
/// whole file; a block with `[fleet]` or only daemon settings is a config.
fn readme_snippets() -> (Vec<String>, Vec<String>) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let config_keys: Vec<String> = DaemonConfigKeys::get();
    let (mut policies, mut configs) = (Vec::new(), Vec::new());
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + "```toml\n".len()..];
        let end = body.find("```").expect("closed toml block");
        let block = &body[..end];
        rest = &body[end + 3..];
        let indent = block.lines().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
        let block: String = block.lines().map(|l| format!("{}\n", l.get(indent..).unwrap_or(""))).collect();
        let first_key = block.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        let key = first_key.split(['=', ' ']).next().unwrap_or("");
        if first_key.starts_with("[fleet") || config_keys.iter().any(|k| k == key) {
            configs.push(block);
        } else if block.lines().any(|l| l.starts_with("name =")) {
            policies.push(block);
        } else {
            policies.push(format!("name = \"readme-snippet\"\n{block}"));
        }
    }
    (policies, configs)
}

/// The configuration's top-level keys, from the schema the binary prints.
struct DaemonConfigKeys;

impl DaemonConfigKeys {
    fn get() -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(&sbx_ok(&["config", "schema"])).expect("schema JSON");
        schema["properties"].as_object().expect("properties").keys().cloned().collect()
    }
}

fn write_all(dir: &Path, prefix: &str, texts: &[String]) -> Vec<PathBuf> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let path = dir.join(format!("{prefix}-{i}.toml"));
            std::fs::write(&path, t).expect("write snippet");
            path
        })
        .collect()
}

#[test]
fn policy_schema_accepts_the_examples_and_readme_and_refuses_what_the_parser_refuses() {
    let dir = TempDir::new("schema");
    let schema = dir.0.join("policy.schema.json");
    std::fs::write(&schema, sbx_ok(&["policy", "schema"])).unwrap();

    let mut good: Vec<PathBuf> = std::fs::read_dir(repo_root().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    good.sort();
    assert!(good.len() >= 3, "example policies: {good:?}");
    let (readme_policies, _) = readme_snippets();
    assert!(readme_policies.len() >= 3, "README policy snippets: {readme_policies:?}");
    good.extend(write_all(&dir.0, "readme-policy", &readme_policies));
    let out = validate(&schema, &good);
    assert!(out.status.success(), "check-jsonschema refused an example or README policy:\n{}", text(&out));
    // The parser agrees: everything the schema accepts here is a valid policy.
    for file in &good {
        let out = sbx(&["policy", "check", &file.display().to_string()]);
        assert!(out.status.success(), "{} passes the schema but `policy check` says: {}\n{}", file.display(), text(&out), std::fs::read_to_string(file).unwrap());
    }

    // What the parser refuses for its shape, the schema refuses too (an
    // editor flags it before `policy check` does).
    let bad = [
        ("unknown top-level key", "name = \"b\"\nbogus = 1\n"),
        ("no name", "[network]\nallow = [\"192.0.2.0/24\"]\n"),
        ("mode not enforce/audit", "name = \"b\"\nmode = \"log\"\n"),
        ("default not allow/deny", "name = \"b\"\n[network]\ndefault = \"maybe\"\n"),
        ("allow entry as a table", "name = \"b\"\n[network]\nallow = [{ pattern = \"x.test\" }]\n"),
        ("deny table with an unknown key", "name = \"b\"\n[network]\ndeny = [{ pattern = \"x.test\", exempt = [\"a.x.test\"] }]\n"),
        ("unknown [network] key", "name = \"b\"\n[network]\nallowed = [\"x.test\"]\n"),
        ("credential with two sources", "name = \"b\"\n[network]\nallow = [\"x.test\"]\n[[credentials]]\nname = \"c\"\nhosts = [\"x.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {secret}\"\nsource = { env = \"A\", file = \"/f\" }\n"),
        ("credential with no source", "name = \"b\"\n[network]\nallow = [\"x.test\"]\n[[credentials]]\nname = \"c\"\nhosts = [\"x.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {secret}\"\nsource = {}\n"),
        ("http block without hosts", "name = \"b\"\n[[http]]\nallow = [\"GET /**\"]\n"),
        ("mcp tools not a list", "name = \"b\"\n[[mcp]]\nurl = \"https://m.test/mcp\"\ntools = \"search\"\n"),
        ("mount mode", "name = \"b\"\n[filesystem]\nmounts = [{ host = \"/a.img\", guest = \"/a\", mode = \"rwx\" }]\n"),
    ];
    for (why, policy) in bad {
        let file = dir.0.join("bad.toml");
        std::fs::write(&file, policy).unwrap();
        let out = validate(&schema, std::slice::from_ref(&file));
        assert!(!out.status.success(), "the schema accepted a policy with {why}:\n{policy}");
        let out = sbx(&["policy", "check", &file.display().to_string()]);
        assert_eq!(out.status.code(), Some(65), "policy check on a policy with {why}: {}", text(&out));
    }
}

#[test]
fn config_schema_accepts_the_defaults_and_readme_and_refuses_bad_settings() {
    let dir = TempDir::new("cschema");
    let schema = dir.0.join("config.schema.json");
    std::fs::write(&schema, sbx_ok(&["config", "schema"])).unwrap();
    let defaults = sbx_ok(&["config", "default"]);
    // Every setting uncommented: the real defaults, checked by both.
    let uncommented: String =
        defaults.lines().filter(|l| l.starts_with("# ") && l.contains(" = ") && !l.contains("  (")).map(|l| format!("{}\n", &l[2..])).collect();
    assert!(uncommented.lines().count() >= 30, "{uncommented}");
    let (_, readme_configs) = readme_snippets();
    assert!(!readme_configs.is_empty(), "the README shows no configuration snippet");
    let mut good = vec![defaults, uncommented];
    good.extend(readme_configs);
    let files = write_all(&dir.0, "config", &good);
    let out = validate(&schema, &files);
    assert!(out.status.success(), "check-jsonschema refused a shipped or README configuration:\n{}", text(&out));
    for file in &files {
        let out = sbx(&["config", "check", &file.display().to_string()]);
        assert!(out.status.success(), "{}: {}", file.display(), text(&out));
    }
    for (why, config) in [
        ("an unknown key", "bogus = 1\n"),
        ("a port as a string", "dns_port = \"53\"\n"),
        ("an unknown [fleet] key", "[fleet]\nsourc = \"etcd://127.0.0.1:2379/sbx\"\n"),
        ("a negative size", "flow_history = -1\n"),
    ] {
        let file = dir.0.join("bad.toml");
        std::fs::write(&file, config).unwrap();
        let out = validate(&schema, std::slice::from_ref(&file));
        assert!(!out.status.success(), "the config schema accepted {why}: {config}");
        let out = sbx(&["config", "check", &file.display().to_string()]);
        assert_eq!(out.status.code(), Some(78), "config check on {why}: {}", text(&out));
        assert!(text(&out).contains("bad.toml:"), "no file:line for {why}: {}", text(&out));
    }
}

/// Every visible subcommand path (`["policy", "check"]`), from `--help`.
fn subcommands(path: &[String]) -> Vec<Vec<String>> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let help = sbx_ok(&args);
    let mut found = Vec::new();
    let Some(section) = help.split("Commands:\n").nth(1) else { return found };
    for line in section.lines().take_while(|l| l.starts_with("  ")) {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.is_empty() || name == "help" {
            continue;
        }
        let mut sub = path.to_vec();
        sub.push(name.to_string());
        found.push(sub.clone());
        found.extend(subcommands(&sub));
    }
    found
}

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let all = subcommands(&[]);
    assert!(all.len() >= 25, "{all:?}");
    let dir = TempDir::new("man");
    let listed = sbx_ok(&["manpages", "--dir", &dir.0.display().to_string()]);
    let mut pages = vec!["sbx-net".to_string()];
    pages.extend(all.iter().map(|p| format!("sbx-net-{}", p.join("-"))));
    for page in &pages {
        let file = dir.0.join(format!("{page}.1"));
        let text = std::fs::read_to_string(&file).unwrap_or_else(|_| panic!("no man page {page}.1; written: {listed}"));
        assert!(text.contains(".TH ") && text.contains(".SH NAME") && text.contains(".SH SYNOPSIS"), "{page}.1 is not a man page:\n{text}");
    }
    assert_eq!(listed.lines().count(), pages.len(), "a page for each visible command and no other: {listed}");

    // bash: the function clap generates, run as bash runs it on <TAB>.
    let bash = dir.0.join("sbx-net.bash");
    std::fs::write(&bash, sbx_ok(&["completions", "bash"])).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let script = format!(
            // The function `complete -p` registered, called as bash calls it.
            "source {}; f=$(complete -p sbx-net | sed -E 's/.*-F ([^ ]+).*/\\1/'); COMP_WORDS=(sbx-net {} ''); COMP_CWORD={}; \
             $f sbx-net \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display(),
            words.join(" "),
            words.len() + 1
        );
        let out = Command::new(require_tool("bash")).args(["-c", &script]).output().expect("bash");
        assert!(out.status.success(), "bash completion {words:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
    };
    let mut parents: Vec<Vec<String>> = vec![Vec::new()];
    parents.extend(all.iter().filter(|p| all.iter().any(|q| q.len() == p.len() + 1 && q.starts_with(p))).cloned());
    for parent in &parents {
        let words: Vec<&str> = parent.iter().map(String::as_str).collect();
        let offered = complete(&words);
        for child in all.iter().filter(|q| q.len() == parent.len() + 1 && q.starts_with(parent)) {
            assert!(offered.contains(child.last().unwrap()), "bash completion after {words:?} offers {offered:?}, not {child:?}");
        }
    }
    assert!(complete(&["sandbox", "create", "x", "-o"]).iter().any(|w| w == "firecracker"), "value completion for -o");

    // zsh and fish: the scripts parse, and name every subcommand.
    for (shell, check) in [("zsh", ["-n"]), ("fish", ["--no-execute"])] {
        let file = dir.0.join(format!("sbx-net.{shell}"));
        let script = sbx_ok(&["completions", shell]);
        std::fs::write(&file, &script).unwrap();
        let out = Command::new(require_tool(shell)).args(check).arg(&file).output().expect("shell");
        assert!(out.status.success(), "{shell} refuses its completion script: {}", text(&out));
        for path in &all {
            assert!(script.contains(path.last().unwrap().as_str()), "{shell} completion lacks {path:?}");
        }
    }
}

#[test]
fn exit_codes_are_the_documented_sysexits() {
    let dir = TempDir::new("exit");
    let bad_policy = dir.0.join("p.toml");
    std::fs::write(&bad_policy, "name = \"p\"\n[network]\nallow = [\"10.0.0.1/8\"]\n").unwrap();
    let bad_config = dir.0.join("c.toml");
    std::fs::write(&bad_config, "dns_port = 0\n").unwrap();
    let nowhere = dir.0.join("no.sock").display().to_string();
    for (args, code) in [
        (vec!["policy", "check", bad_policy.to_str().unwrap()], 65),
        (vec!["config", "check", bad_config.to_str().unwrap()], 78),
        (vec!["--config", bad_config.to_str().unwrap(), "status"], 78),
        (vec!["status", "--socket", &nowhere], 69),
        (vec!["policy", "frobnicate"], 64),
        (vec!["sandbox", "create", "x"], 64),
    ] {
        let out = sbx(&args);
        assert_eq!(out.status.code(), Some(code), "sbx-net {args:?}: {}", text(&out));
    }
    // The README's table lists each of them.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for code in ["| 64 ", "| 65 ", "| 66 ", "| 69 ", "| 73 ", "| 75 ", "| 76 ", "| 78 "] {
        assert!(readme.contains(code), "README's exit code table lacks {code}");
    }
}

#[test]
fn every_command_that_prints_data_takes_output_json() {
    require_root();
    let h = DaemonHarness::new("ojson", &[("p.toml", "name = \"p\"\n[network]\nallow = [\"192.0.2.0/24\"]\n")]);
    let name = unique_name("oj");
    let created = h.json(&["sandbox", "create", &name, "--policy", "p", "-o", "json"]);
    assert_eq!(created["name"], name.as_str());
    for args in [
        vec!["status", "-o", "json"],
        vec!["sandbox", "list", "-o", "json"],
        vec!["sandbox", "show", &name, "-o", "json"],
        vec!["policy", "list", "-o", "json"],
        vec!["policy", "test", &name, "192.0.2.7:443", "-o", "json"],
        vec!["config", "show", "-o", "json"],
        vec!["inspect", "-n", "5", "-o", "json"],
    ] {
        let out = h.cli_ok(&args);
        for line in out.lines().filter(|l| !l.trim().is_empty()).take(if args[0] == "inspect" { usize::MAX } else { 1 }) {
            if args[0] == "inspect" {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{args:?} line is not JSON ({e}): {line}"));
            }
        }
        if args[0] != "inspect" {
            serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"));
        }
    }
    let tested = h.json(&["policy", "test", &name, "192.0.2.7:443", "-o", "json"]);
    assert_eq!(tested["verdict"], "allowed", "{tested}");
    let deleted = h.json(&["sandbox", "delete", &name, "-o", "json"]);
    assert_eq!(deleted["deleted"], name.as_str());
}

/// The daemon and the CLI with no flags: /etc/sbx-net/config.toml and
/// /etc/sbx-net/policies, state in /var/lib/sbx-net, the socket at
/// /run/sbx-net/sbx-net.sock, pins under /sys/fs/bpf/sbx-net. Run in a
/// mount namespace whose /etc, /var/lib and /run are overlays on the
/// host's (what the daemon writes lands in a tmpfs of the test's) and whose
/// /sys/fs/bpf is a fresh bpffs, so the host's own paths are never touched.
#[test]
fn daemon_and_cli_use_the_fhs_paths_with_no_flags() {
    require_root();
    let topology = Topology::new("fhs");
    let dir = TempDir::new("fhs");
    let layer = dir.0.join("layers");
    std::fs::create_dir_all(&layer).unwrap();
    let sbx_net = sbx_net_bin();
    let script = format!(
        "set -e
         mount -t tmpfs tmpfs {layer}
         for d in etc var run; do mkdir -p {layer}/$d/upper {layer}/$d/work; done
         mount -t overlay overlay -o lowerdir=/etc,upperdir={layer}/etc/upper,workdir={layer}/etc/work /etc
         mount -t overlay overlay -o lowerdir=/var/lib,upperdir={layer}/var/upper,workdir={layer}/var/work /var/lib
         mount -t overlay overlay -o lowerdir=/run,upperdir={layer}/run/upper,workdir={layer}/run/work /run
         mount -t bpf bpf /sys/fs/bpf
         rm -rf /etc/sbx-net /var/lib/sbx-net /run/sbx-net
         mkdir -p /etc/sbx-net/policies
         printf 'uplink = \"uplink\"\\ntap_pool_size = 1\\n' > /etc/sbx-net/config.toml
         printf 'name = \"fhs\"\\n[network]\\nallow = [\"192.0.2.0/24\"]\\n' > /etc/sbx-net/policies/fhs.toml
         exec {sbx_net} daemon",
        layer = layer.display(),
        sbx_net = sbx_net.display()
    );
    let log = std::fs::File::create(dir.0.join("daemon.log")).unwrap();
    let child = Command::new(require_tool("ip"))
        .args(["netns", "exec", topology.host.name(), &require_tool("unshare").display().to_string(), "--mount", "--propagation", "private"])
        .args([require_tool("sh").display().to_string(), "-c".into(), script])
        .env_remove("SBX_NET_SOCKET")
        .env_remove("SBX_NET_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn the daemon");
    // `ip netns exec`, unshare and sh each exec the next: this is the daemon.
    let pid = child.id().to_string();
    let mut daemon = Background(child);
    let log = || std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
    // The CLI in the daemon's mount namespace, with no flags either.
    let cli = |args: &[&str]| -> Output {
        Command::new(require_tool("nsenter"))
            .args(["-t", &pid, "-m", "--"])
            .arg(&sbx_net)
            .args(args)
            .env_remove("SBX_NET_SOCKET")
            .env_remove("SBX_NET_CONFIG")
            .output()
            .expect("nsenter sbx-net")
    };
    let status: serde_json::Value = wait_for(Duration::from_secs(30), "the daemon answering on /run/sbx-net/sbx-net.sock", || {
        daemon.assert_running(&format!("sbx-net daemon with no flags:\n{}", log()));
        let out = cli(&["status", "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    });
    assert!(status["policies"].as_array().unwrap().iter().any(|p| p["name"] == "fhs"), "the policy in /etc/sbx-net/policies was not loaded: {status}");
    let shown = cli(&["config", "show", "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap_or_else(|e| panic!("config show ({e}): {}", text(&shown)));
    assert_eq!(shown["uplink"], "uplink", "{shown}");
    assert_eq!(shown["policy_dir"], "/etc/sbx-net/policies", "{shown}");
    let name = unique_name("f");
    let out = cli(&["sandbox", "create", &name, "--policy", "fhs"]);
    assert!(out.status.success(), "sandbox create: {}\n{}", text(&out), log());
    let check = |what: &str, test: &str| {
        let out = Command::new(require_tool("nsenter")).args(["-t", &pid, "-m", "--", "sh", "-c", test]).output().unwrap();
        assert!(out.status.success(), "{what} ({test}): {}", text(&out));
    };
    check("the control socket", "test -S /run/sbx-net/sbx-net.sock");
    check("the state dir holds the sandbox", &format!("grep -rqs {name} /var/lib/sbx-net"));
    check("the pins", "test -d /sys/fs/bpf/sbx-net && ls /sys/fs/bpf/sbx-net | grep -q .");
    let out = cli(&["sandbox", "delete", &name]);
    assert!(out.status.success(), "sandbox delete: {}", text(&out));
    // The data plane outlives a stopped daemon by design (it keeps the
    // proxies serving), and keeps the mount namespace alive with it.
    let dataplane = status["dataplane"]["pid"].as_u64().expect("the data plane's pid in status").to_string();
    let _dataplane_guard = KillOnDrop(dataplane.parse().unwrap());
    // SIGTERM, as systemd stops it.
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    let exited = wait_for(Duration::from_secs(20), "the daemon to stop at SIGTERM", || daemon.0.try_wait().ok().flatten());
    assert!(exited.success(), "daemon exit {exited}:\n{}", log());
    // `--cleanup` with no flags either, in the namespaces the data plane
    // keeps: it finds the same FHS paths and takes everything down.
    let out = Command::new(require_tool("nsenter"))
        .args(["-t", &dataplane, "-m", "-n", "--"])
        .arg(&sbx_net)
        .args(["daemon", "--cleanup"])
        .env_remove("SBX_NET_SOCKET")
        .env_remove("SBX_NET_CONFIG")
        .output()
        .expect("nsenter sbx-net daemon --cleanup");
    assert!(out.status.success(), "daemon --cleanup with no flags: {}", text(&out));
    wait_for(Duration::from_secs(20), "the data plane to be gone after --cleanup", || {
        (!Path::new(&format!("/proc/{dataplane}")).exists()).then_some(())
    });
}

/// SIGKILLs a pid when the test ends, however it ends (a data plane the
/// test's daemon left, which no harness knows of).
struct KillOnDrop(libc::pid_t);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill on a pid this test saw its daemon start; a pid that
        // is gone already gets ESRCH.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}
