//! The `sbx-net` command. Thin: parse arguments, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sbx_net::policy::Policy;

#[derive(Parser)]
#[command(name = "sbx-net", version, about = "Host-side network enforcement for AI-agent sandboxes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file (exit 1 with file:line: reason if invalid).
    Check { file: PathBuf },
    /// Print the embedded default policy.
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy { command: PolicyCommand::Check { file } } => match check(&file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Policy { command: PolicyCommand::Default } => {
            print!("{}", sbx_net::policy::DEFAULT_POLICY_TOML);
            ExitCode::SUCCESS
        }
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<String> {
    let policy = Policy::load(file)?;
    let compiled = sbx_net::compile(&policy, &[])?;
    Ok(format!(
        "{}: policy {:?} is valid: default {}, {} IP/CIDR rules, {} domain rules, {} credentials, {} trie entries",
        file.display(),
        policy.name,
        policy.default.as_str(),
        policy.cidr_rules().count(),
        policy.domain_rules().count(),
        policy.credentials.len(),
        compiled.entry_count()
    ))
}
