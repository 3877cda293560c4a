//! The `sbx-net` command. Thin: parse arguments, call the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

/// The allocator of every process this binary becomes (daemon, data plane,
/// pumps, VMM): see userspace/Cargo.toml for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use sbx_net::control::api::{call, exit_code, ClientError, Request};
use sbx_net::cli::Output;
use sbx_net::control::config::{DaemonConfig, DEFAULT_SOCKET};
use sbx_net::policy::Policy;

#[derive(Parser)]
#[command(name = "sbx-net", version, about = "Host-side network enforcement for AI-agent sandboxes")]
struct Cli {
    /// The daemon's control socket (client and daemon; default: the
    /// configuration's `socket`, else /run/sbx-net/sbx-net.sock).
    #[arg(long, global = true, env = "SBX_NET_SOCKET")]
    socket: Option<PathBuf>,
    /// The configuration file (daemon and client; default:
    /// /etc/sbx-net/config.toml when it exists).
    #[arg(long, global = true, env = "SBX_NET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host service (root).
    Daemon(DaemonArgs),
    /// Create, list, show and delete sandboxes.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Policy files and the policies in force.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Daemon version, uptime, sandboxes, policy generations, map occupancy.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
        /// The same as `-o json` (kept for scripts).
        #[arg(long, hide = true)]
        json: bool,
    },
    /// The daemon's configuration file: check one, show the one in force,
    /// print the defaults or the JSON Schema.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Shell completions (`sbx-net completions bash >
    /// /usr/share/bash-completion/completions/sbx-net`).
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Write the man pages of sbx-net and every subcommand into DIR
    /// (sbx-net.1, sbx-net-policy-check.1, …).
    Manpages {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Live and recent flows with the rule that decided each.
    Inspect(sbx_net::cli::inspect::InspectArgs),
    /// Hand the proxies' listening sockets to a new data plane (this
    /// daemon's executable); the old one finishes its connections and exits.
    Upgrade {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// The data plane process: DNS and HTTP(S) proxies (started and
    /// supervised by the daemon, never by hand).
    #[command(hide = true)]
    Dataplane {
        /// The daemon's state dir (the configuration comes on stdin; this
        /// names the data plane in `ps` and is checked against it).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Internal: the frame pump of a netns guest (started by the daemon).
    #[command(name = "__guest-pump", hide = true)]
    GuestPump { spec: String },
    /// MicroVMs on sandbox taps.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// A fleet of hosts that take their policies from etcd.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Internal: light fleet hosts for `cargo xtask bench fleet` (the
    /// policy source's code path without a datapath).
    #[command(name = "__fleet-light-hosts", hide = true)]
    FleetLightHosts {
        #[arg(long)]
        etcd: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "light-")]
        name_prefix: String,
        #[arg(long)]
        host_group: Option<String>,
        #[command(flatten)]
        options: sbx_net::fleet::EtcdOptions,
    },
    /// Internal: the VMM of a sandbox's microVM (started by the daemon).
    #[command(name = "__vmm", hide = true)]
    Vmm {
        #[arg(long)]
        sandbox: String,
        #[arg(long)]
        spec: PathBuf,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Every host's applied revision, policy generation and rejections
    /// (from the hosts' status keys).
    Status(sbx_net::cli::fleet::StatusArgs),
}

#[derive(Subcommand)]
enum VmCommand {
    /// Run a microVM on SANDBOX's tap in the foreground (the console on
    /// stdout): the test guest with a probe script, or a Linux kernel.
    Run(sbx_net::cli::vm::VmRunArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (exit 78 with file:line: reason).
    Check {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// The configuration a daemon started now would run with (--config,
    /// else /etc/sbx-net/config.toml, else the defaults), as TOML or JSON.
    Show {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// The defaults as a configuration file, every setting commented out.
    Default,
    /// The JSON Schema of the configuration file.
    Schema,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Policy files (*.toml); default: the configuration's, else
    /// /etc/sbx-net/policies when it exists.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    #[arg(long)]
    upstream_dns: Option<SocketAddr>,
    /// Extra trusted roots (PEM) for upstream TLS.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Interface sandbox traffic leaves by (masqueraded).
    #[arg(long)]
    uplink: Option<String>,
    /// bpffs directory for pinned maps and links.
    #[arg(long)]
    bpf_dir: Option<PathBuf>,
    /// Remove everything a daemon with this configuration made, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Take policies from etcd as well: etcd://HOST:PORT[,HOST:PORT…]/PREFIX
    /// (etcds:// for TLS); they override the policy dir's by name.
    #[arg(long, value_name = "URL")]
    policy_source: Option<String>,
    /// This host's name in the fleet (default: the hostname).
    #[arg(long)]
    host_name: Option<String>,
    /// This host's group in the fleet (policies under group/GROUP apply).
    #[arg(long)]
    host_group: Option<String>,
    #[command(flatten)]
    etcd: sbx_net::fleet::EtcdOptions,
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox; prints its network as JSON.
    Create {
        name: String,
        #[arg(long)]
        policy: String,
        /// Adopt an existing tap made for an external VMM.
        #[arg(long)]
        tap: Option<String>,
        /// Give the sandbox a network-namespace guest (`ip netns exec sbx-NAME …`).
        #[arg(long)]
        netns_guest: bool,
        /// Run a microVM (the test guest) on the sandbox's tap; its console
        /// is in `sandbox show`'s `vm.console`.
        #[arg(long)]
        vm: bool,
        /// The probe script the VM's guest runs (default: it serves).
        #[arg(long, requires = "vm")]
        probe: Option<PathBuf>,
        /// Guest memory of the VM, MiB.
        #[arg(long, requires = "vm")]
        mem: Option<u32>,
        /// What to print: the daemon's JSON, or what a VMM needs to use the
        /// tap (Firecracker's network interface, Cloud Hypervisor's --net,
        /// shell variables).
        #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
        output: sbx_net::cli::handoff::Format,
    },
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
        /// The same as `-o json` (kept for scripts).
        #[arg(long, hide = true)]
        json: bool,
    },
    Show {
        name: String,
        /// As for `sandbox create`.
        #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
        output: sbx_net::cli::handoff::Format,
    },
    Delete {
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file (exit 65 with file:line: reason if invalid).
    Check {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Validate and apply a policy file to the running daemon (prints the
    /// new generation).
    Apply {
        file: PathBuf,
        /// JSON by default, as it always printed.
        #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
        output: Output,
    },
    /// Validate a policy file locally, then write it to a fleet's etcd
    /// (every host under the scope applies it); prints the key and revision.
    Push(sbx_net::cli::fleet::PushArgs),
    /// The policies the daemon knows.
    List {
        /// JSON by default, as it always printed.
        #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
        output: Output,
    },
    /// Re-read the policy directory (all-or-nothing).
    Reload {
        /// JSON by default, as it always printed.
        #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
        output: Output,
    },
    /// What would happen to a connection from SANDBOX to HOST[:PORT], an
    /// HTTP request (`"METHOD https://HOST/PATH"`, checked as the proxy
    /// checks it) or an MCP call (`"call TOOL https://HOST/PATH"`), and
    /// which rule decides.
    Test {
        sandbox: String,
        destination: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the embedded default policy.
    Default,
    /// The JSON Schema of policy files (for editors and validators).
    Schema,
    /// Write the smallest policy that would have allowed what SANDBOX did
    /// (from the daemon's flow history): names from DNS, wildcards only
    /// where siblings were used, the HTTP requests and MCP tools seen;
    /// counts and first/last use in comments, denials listed.
    Learn(sbx_net::cli::learn::LearnArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are answers, not errors.
            return if e.use_stderr() { ExitCode::from(exit_code::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let long_running = matches!(
        cli.command,
        Command::Daemon(_) | Command::Dataplane { .. } | Command::GuestPump { .. } | Command::Vmm { .. } | Command::FleetLightHosts { .. } | Command::Inspect(_) | Command::Vm { .. }
    );
    if !long_running {
        // A command whose output is piped into `head` ends quietly when the
        // reader goes, as every Unix tool does (Rust ignores SIGPIPE, so a
        // print would panic instead). Services keep ignoring it: a closed
        // peer is an error they handle.
        // SAFETY: restoring a signal's default disposition before any thread
        // is started; no handler runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sbx-net: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The exit status for a failure (README "Exit codes"): by the kind the
/// daemon gave it, EX_UNAVAILABLE when the daemon cannot be reached,
/// EX_TEMPFAIL when another daemon holds this data path (so a unit or
/// script can tell "already running" from a broken start), EX_CONFIG for a
/// bad config file or a socket/environment systemd passed that is not
/// what the configuration names, EX_DATAERR for
/// a policy `policy check` rejects, 1 for anything else.
fn exit_status(e: &anyhow::Error) -> u8 {
    use sbx_net::control::instance_lock::{LockError, EXIT_LOCKED};
    use sbx_net::control::server::ServerError;
    for cause in e.chain() {
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            return client.exit_code();
        }
        let held = |l: &LockError| matches!(l, LockError::Held { .. });
        if cause.downcast_ref::<LockError>().is_some_and(held) || cause.downcast_ref::<ServerError>().is_some_and(|s| matches!(s, ServerError::Locked(l) if held(l))) {
            return EXIT_LOCKED;
        }
        // A wrong config file or systemd setup: a unit should not retry.
        let systemd_setup = |s: &ServerError| matches!(s, ServerError::Systemd(e) if e.is_configuration());
        if cause.is::<sbx_net::control::config::ConfigError>() || cause.downcast_ref::<ServerError>().is_some_and(systemd_setup) {
            return exit_code::CONFIG;
        }
        if let Some(sbx_net::cli::learn::LearnCliError::Client(client)) = cause.downcast_ref() {
            return client.exit_code();
        }
        if cause.is::<sbx_net::policy::PolicyError>() || cause.is::<sbx_net::policy::compile::CompileError>() {
            return exit_code::DATAERR;
        }
        if let Some(sbx_net::cli::fleet::FleetCliError::Policy(_) | sbx_net::cli::fleet::FleetCliError::Compile(_)) = cause.downcast_ref() {
            return exit_code::DATAERR;
        }
    }
    exit_code::FAILURE
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need no daemon first: a broken /etc config must not
    // stop `policy check` or `completions`.
    let command = match cli.command {
        Command::Daemon(args) => return daemon(args, cli.config, cli.socket),
        Command::GuestPump { spec } => return Ok(sbx_net::sandbox::guest_pump::run_pump(&spec)?),
        Command::Vmm { sandbox: _, spec } => {
            let status = sbx_net::sandbox::vm_process::vmm_main(&spec)?;
            std::process::exit(status)
        }
        Command::Dataplane { state_dir } => return dataplane(state_dir),
        Command::Policy { command: PolicyCommand::Check { file, output } } => {
            let (summary, detail) = check(&file)?;
            return match output {
                Output::Text => {
                    println!("{summary}");
                    Ok(())
                }
                Output::Json => print_json(&detail),
            };
        }
        Command::Policy { command: PolicyCommand::Default } => {
            print!("{}", sbx_net::policy::DEFAULT_POLICY_TOML);
            return Ok(());
        }
        Command::Policy { command: PolicyCommand::Schema } => return print_json(&sbx_net::policy::json_schema()),
        Command::Policy { command: PolicyCommand::Push(args) } => return print_json(&sbx_net::cli::fleet::push(&args)?),
        Command::Fleet { command: FleetCommand::Status(args) } => {
            let (revision, hosts) = sbx_net::cli::fleet::status(&args)?;
            if args.json() {
                return print_json(&serde_json::json!({ "revision": revision, "hosts": hosts }));
            }
            print!("{}", sbx_net::fleet::status::render(revision, &hosts));
            return Ok(());
        }
        Command::FleetLightHosts { etcd, count, name_prefix, host_group, options } => {
            init_logging("warn");
            let source = sbx_net::fleet::EtcdSource::parse(&etcd)?;
            return Ok(sbx_net::fleet::light::run(&source, &options, count, &name_prefix, host_group.as_deref())?);
        }
        Command::Config { command } => return config(command, cli.config.as_deref()),
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "sbx-net", &mut script);
            let mut script = String::from_utf8(script).context("a completion script")?;
            if shell == clap_complete::Shell::Bash {
                // clap_complete's bash script spells a hyphenated bin's state
                // two ways (the loop `sbx__net__subcmd__…`, the case arms
                // `sbx__subcmd__net__subcmd__…`), so nothing past the first
                // word completes: clap-rs/clap#6421. The packaging test runs
                // the script in bash, so a fixed clap shows up there.
                script = script.replace("sbx__subcmd__net", "sbx__net");
            }
            print!("{script}");
            return Ok(());
        }
        Command::Manpages { dir } => {
            for page in man_pages(&dir)? {
                println!("{}", page.display());
            }
            return Ok(());
        }
        command => command,
    };
    let socket = client_socket(cli.socket, cli.config.as_deref())?;
    let socket = socket.as_path();
    match command {
        Command::Vm { command: VmCommand::Run(args) } => {
            let status = sbx_net::cli::vm::run(socket, &args)?;
            std::process::exit(status)
        }
        Command::Upgrade { output } => {
            let v = call(socket, &Request::Upgrade, Duration::from_secs(120))?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!("data plane {} ({}) took over from {} ({}) in {} ms; the old one drains",
                v["new"]["pid"], v["new"]["build"].as_str().unwrap_or("?"), v["old"]["pid"], v["old"]["build"].as_str().unwrap_or("?"), v["switched_ms"]);
            Ok(())
        }
        Command::Policy { command: PolicyCommand::Apply { file, output } } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let source = std::path::absolute(&file).unwrap_or(file).display().to_string();
            print_switch(output, &request(socket, Request::PolicyApply { source, text })?)
        }
        Command::Policy { command: PolicyCommand::Learn(args) } => {
            sbx_net::cli::learn::run(socket, &args, sbx_net::util::clock::unix_now_ns(), &mut std::io::stdout().lock(), &mut std::io::stderr())?;
            Ok(())
        }
        Command::Policy { command: PolicyCommand::List { output } } => {
            let v = request(socket, Request::PolicyList)?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!("{:<24} {:<8} {:>6} {:>12}  SANDBOXES  SOURCE", "NAME", "DEFAULT", "RULES", "CREDENTIALS");
            for p in v.as_array().into_iter().flatten() {
                let users = p["sandboxes"].as_array().map(Vec::len).unwrap_or(0);
                println!("{:<24} {:<8} {:>6} {:>12}  {users:>9}  {}", p["name"].as_str().unwrap_or(""), p["default"].as_str().unwrap_or(""), p["rules"], p["credentials"], p["source"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Command::Policy { command: PolicyCommand::Reload { output } } => print_switch(output, &request(socket, Request::PolicyReload)?),
        Command::Policy { command: PolicyCommand::Test { sandbox, destination, output } } => {
            let v = request(socket, Request::PolicyTest { sandbox, destination })?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!("{}: {} by `{}` (policy {}); {}", v["destination"].as_str().unwrap_or(""), v["verdict"].as_str().unwrap_or(""),
                v["rule"].as_str().unwrap_or(""), v["policy"].as_str().unwrap_or(""), v["path"].as_str().unwrap_or(""));
            Ok(())
        }
        Command::Sandbox { command } => sandbox(socket, command),
        Command::Inspect(args) => {
            use std::io::IsTerminal;
            let color = args.color(std::io::stdout().is_terminal());
            sbx_net::cli::inspect::run(socket, &args, sbx_net::util::clock::unix_now_ns(), &mut std::io::stdout().lock(), &mut std::io::stderr(), color)?;
            Ok(())
        }
        Command::Status { output, json } => {
            let v = request(socket, Request::Status)?;
            if json || output == Output::Json {
                return print_json(&v);
            }
            print_status(&v);
            Ok(())
        }
        Command::Daemon(_)
        | Command::GuestPump { .. }
        | Command::Vmm { .. }
        | Command::Dataplane { .. }
        | Command::Policy { command: PolicyCommand::Check { .. } | PolicyCommand::Default | PolicyCommand::Schema | PolicyCommand::Push(_) }
        | Command::Fleet { .. }
        | Command::FleetLightHosts { .. }
        | Command::Config { .. }
        | Command::Completions { .. }
        | Command::Manpages { .. } => unreachable!("handled before the socket is resolved"),
    }
}

/// The control socket a client uses: `--socket`/`SBX_NET_SOCKET`, else the
/// configuration's (`--config`, else /etc/sbx-net/config.toml when it
/// exists), else the default: the daemon binds the same path.
fn client_socket(flag: Option<PathBuf>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(socket) = flag {
        return Ok(socket);
    }
    if config.is_some() || DaemonConfig::default_config_present()? {
        return Ok(DaemonConfig::load_or_default(config)?.socket);
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

fn config(command: ConfigCommand, explicit: Option<&Path>) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { file, output } => {
            let config = DaemonConfig::load(&file)?;
            match output {
                Output::Text => println!("{}: valid", file.display()),
                Output::Json => print_json(&serde_json::json!({ "file": file, "valid": true, "config": config }))?,
            }
        }
        ConfigCommand::Show { output } => {
            let config = DaemonConfig::load_or_default(explicit)?;
            match output {
                Output::Text => print!("{}", toml::to_string(&config)?),
                Output::Json => print_json(&serde_json::to_value(&config)?)?,
            }
        }
        ConfigCommand::Default => print!("{}", DaemonConfig::commented_defaults()),
        ConfigCommand::Schema => print_json(&DaemonConfig::json_schema())?,
    }
    Ok(())
}

/// Writes a man page for sbx-net and each visible subcommand into `dir`.
fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn write(command: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let page = dir.join(format!("{name}.1"));
        let mut text = Vec::new();
        clap_mangen::Man::new(command.clone().name(name.to_string())).render(&mut text)?;
        std::fs::write(&page, text).with_context(|| format!("writing {}", page.display()))?;
        written.push(page);
        // `help` is clap's, documented by every page's --help.
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            write(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let mut written = Vec::new();
    write(&command, "sbx-net", dir, &mut written)?;
    Ok(written)
}

fn print_status(v: &serde_json::Value) {
    println!("sbx-net daemon {} up {} s", v["version"].as_str().unwrap_or("?"), v["uptime_seconds"]);
    println!("sandboxes: {}  policy generation: {}  reload failures: {}", v["sandboxes"], v["policy_generation"], v["reload_failures"]);
    if let Some(e) = v["last_reload_error"].as_str() {
        println!("last reload error: {e}");
    }
    let m = &v["maps"];
    println!(
        "maps: policy entries v4 {} v6 {} (capacity {} each), sandbox slots {}/{}",
        m["policy_v4_entries"], m["policy_v6_entries"], m["policy_capacity_per_family"], m["sandbox_slots_used"], m["sandbox_slots"]
    );
    for p in v["policies"].as_array().into_iter().flatten() {
        println!("policy {}: {} sandboxes ({})", p["name"].as_str().unwrap_or(""), p["sandboxes"], p["source"].as_str().unwrap_or(""));
    }
    println!("flow table: {} flows (capacity {} per family); events lost: {}", m["flows"], m["flow_capacity"], v["events_lost"]);
    for c in v["host"].as_array().into_iter().flatten() {
        let how = match (c["changed"].as_bool(), c["found"].as_str()) {
            (Some(true), Some(found)) => format!("set by sbx-net, was {found}"),
            (Some(true), None) => "set by sbx-net".to_string(),
            _ => "as found".to_string(),
        };
        println!("host: {} = {} ({how}): {}", c["name"].as_str().unwrap_or(""), c["value"].as_str().unwrap_or(""), c["why"].as_str().unwrap_or(""));
    }
    for l in v["reap_failures"].as_array().into_iter().flatten() {
        println!("left by a delete: {}", l.as_str().unwrap_or(""));
    }
}

/// Logs to stderr at `RUST_LOG`, else at `default_level`.
fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .init();
}

fn request(socket: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    Ok(call(socket, &request, Duration::from_secs(60))?)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn sandbox(socket: &Path, command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Create { name, policy, tap, netns_guest, vm, probe, mem, output } => {
            let vm = match vm {
                true => Some(sbx_net::control::api::VmCreate {
                    probe: probe.map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading the probe script {}", p.display()))).transpose()?,
                    memory_mib: mem,
                }),
                false => None,
            };
            let v = request(socket, Request::SandboxCreate { name, policy, tap, netns_guest, vm })?;
            handoff(output, v)
        }
        SandboxCommand::List { output, json } => {
            let v = request(socket, Request::SandboxList)?;
            if json || output == Output::Json {
                return print_json(&v);
            }
            println!("{:<20} {:<16} {:<16} {:<24} POLICY", "NAME", "TAP", "GUEST IPV4", "GUEST IPV6");
            for s in v.as_array().into_iter().flatten() {
                let f = |k: &str| s[k].as_str().unwrap_or("").to_string();
                println!("{:<20} {:<16} {:<16} {:<24} {}", f("name"), f("tap"), f("guest_ipv4"), f("guest_ipv6"), f("policy"));
            }
            Ok(())
        }
        SandboxCommand::Show { name, output: sbx_net::cli::handoff::Format::Json } => print_json(&request(socket, Request::SandboxShow { name })?),
        SandboxCommand::Show { name, output } => handoff(output, request(socket, Request::SandboxShow { name })?),
        SandboxCommand::Delete { name, output } => {
            let v = request(socket, Request::SandboxDelete { name: name.clone() })?;
            match output {
                Output::Text => println!("deleted {name}"),
                Output::Json => print_json(&v)?,
            }
            Ok(())
        }
    }
}

/// `policy apply` / `policy reload`: the generation now in force.
fn print_switch(output: Output, v: &serde_json::Value) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(v),
        Output::Text => {
            println!("policy generation {}: {} sandboxes switched", v["policy_generation"], v["sandboxes_switched"]);
            Ok(())
        }
    }
}

/// Prints a sandbox the way `output` asks (`sandbox create`'s JSON stays
/// on one line: scripts read it with `head -1`).
fn handoff(output: sbx_net::cli::handoff::Format, v: serde_json::Value) -> anyhow::Result<()> {
    let info: sbx_net::control::api::SandboxInfo = serde_json::from_value(v).context("the daemon's sandbox answer")?;
    println!("{}", sbx_net::cli::handoff::render(output, &info)?);
    Ok(())
}

fn daemon(args: DaemonArgs, config_file: Option<PathBuf>, socket: Option<PathBuf>) -> anyhow::Result<()> {
    init_logging("info");
    let mut config = DaemonConfig::load_or_default(config_file.as_deref())?;
    if let Some(v) = socket {
        config.socket = v;
    }
    if let Some(v) = args.policy_dir {
        config.policy_dir = Some(v);
    }
    if let Some(v) = args.state_dir {
        config.state_dir = v;
    }
    if let Some(v) = args.metrics_addr {
        config.metrics_addr = Some(v);
    }
    if let Some(v) = args.upstream_dns {
        config.upstream_dns = Some(v);
    }
    if let Some(v) = args.upstream_ca {
        config.upstream_ca = Some(v);
    }
    if let Some(v) = args.uplink {
        config.uplink = Some(v);
    }
    if let Some(v) = args.bpf_dir {
        config.bpf_dir = v;
    }
    if args.policy_source.is_some() || args.host_name.is_some() || args.host_group.is_some() || args.etcd != Default::default() {
        let fleet = config.fleet.get_or_insert_with(Default::default);
        if let Some(v) = args.policy_source {
            fleet.source = v;
        }
        if let Some(v) = args.host_name {
            fleet.host_name = Some(v);
        }
        if let Some(v) = args.host_group {
            fleet.host_group = Some(v);
        }
        // Flag by flag over the config file's [fleet.etcd].
        let (from_flags, etcd) = (args.etcd, &mut fleet.etcd);
        etcd.etcd_cacert = from_flags.etcd_cacert.or(etcd.etcd_cacert.take());
        etcd.etcd_cert = from_flags.etcd_cert.or(etcd.etcd_cert.take());
        etcd.etcd_key = from_flags.etcd_key.or(etcd.etcd_key.take());
        etcd.etcd_user = from_flags.etcd_user.or(etcd.etcd_user.take());
        etcd.etcd_password_file = from_flags.etcd_password_file.or(etcd.etcd_password_file.take());
        if fleet.source.is_empty() {
            anyhow::bail!("--host-name, --host-group and the --etcd-* options need --policy-source etcd://… (or [fleet] source in the config)");
        }
    }
    config.validate().map_err(|reason| sbx_net::control::config::ConfigError::Invalid { file: "the daemon's flags and configuration".into(), reason })?;
    if args.cleanup {
        sbx_net::control::server::prepare(&mut config)?;
        if call(&config.socket, &Request::Status, Duration::from_secs(5)).is_ok() {
            anyhow::bail!("a daemon answers on {}; stop it before --cleanup", config.socket.display());
        }
        // Held through the cleanup: no daemon may start on what we remove.
        let _lock = sbx_net::control::server::lock_instance(&config)?;
        for removed in sbx_net::control::daemon::cleanup(&config)? {
            println!("removed {removed}");
        }
        return Ok(());
    }
    sbx_net::control::server::run(config)?;
    Ok(())
}

fn dataplane(state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    init_logging("info");
    let (config, listeners) = sbx_net::control::dataplane::process::inherited(std::io::stdin().lock())?;
    if let Some(dir) = state_dir.filter(|d| *d != config.state_dir) {
        anyhow::bail!("--state-dir {} is not the configuration's {}", dir.display(), config.state_dir.display());
    }
    sbx_net::control::dataplane::process::run(config, listeners, std::io::stdout())?;
    Ok(())
}

/// `policy check`: the one-line summary and the same as JSON.
fn check(file: &Path) -> anyhow::Result<(String, serde_json::Value)> {
    let policy = Policy::load(file)?;
    let compiled = sbx_net::compile(&policy, &[])?;
    let (cidr, domain) = (policy.cidr_rules().count(), policy.domain_rules().count());
    let summary = format!(
        "{}: policy {:?} is valid: default {}, {cidr} IP/CIDR rules, {domain} domain rules, {} credentials, {} trie entries",
        file.display(),
        policy.name,
        policy.default.as_str(),
        policy.credentials.len(),
        compiled.entry_count()
    );
    let detail = serde_json::json!({
        "file": file, "policy": policy.name, "valid": true, "default": policy.default.as_str(),
        "ip_rules": cidr, "domain_rules": domain, "credentials": policy.credentials.len(),
        "http_blocks": policy.http.len(), "mcp_servers": policy.mcp.len(), "trie_entries": compiled.entry_count(),
    });
    Ok((summary, detail))
}
