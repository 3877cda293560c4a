//! The `inspect` client: its command line (clap), and reading the
//! daemon's flow stream (or a saved JSON file), filtering it and printing
//! it compact or as JSON lines.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::control::api::{inspect_stream, ClientError};
use crate::observe::filter::{Criterion, Filter, Since};
use crate::observe::hub::{Lost, StreamLine};
use crate::observe::record::{compact, FlowRecord, Verdict};

/// How filters combine, and examples (after the options in `--help`).
const AFTER_HELP: &str = "\
A filter kind given twice matches either value; different kinds must all match;
--not negates the filter after it.

Examples:
  sbx-net inspect --last 20 --sandbox agent-1 --verdict denied
  sbx-net inspect -f --domain '*.github.com' --not --port 443 -o json";

/// `sbx-net inspect`: the daemon's recent flow records (or a saved file's),
/// filtered; with `--follow`, then new ones as they happen.
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(after_help = AFTER_HELP)]
pub struct InspectArgs {
    // First: it reads every argument's position (see `FilterArgs`), which
    // the derived code takes out of the matches field by field.
    #[command(flatten)]
    pub filters: FilterArgs,
    /// After the history, keep printing new records as they happen.
    #[arg(short = 'f', long, conflicts_with = "input")]
    pub follow: bool,
    /// Only the last N records that match.
    #[arg(short = 'n', long, value_name = "N")]
    pub last: Option<usize>,
    /// Only records from this time on: a duration back (30s, 5m, 2h, 1d) or an RFC 3339 UTC time (2026-11-28T12:00:00Z).
    #[arg(long, value_name = "DURATION|TIME", value_parser = Since::parse)]
    pub since: Option<Since>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT", default_value_t = Output::Compact)]
    pub output: Output,
    /// Read records from FILE (the audit log, `-o json` output, a saved stream) instead of the daemon.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Colour the verdicts (the default when stdout is a terminal).
    #[arg(long, overrides_with = "no_color")]
    pub color: bool,
    /// Do not colour the verdicts.
    #[arg(long, overrides_with = "color")]
    pub no_color: bool,
}

/// Output format of `inspect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One readable line per record.
    Compact,
    /// One JSON object per line (what `--input` reads back).
    #[value(alias = "jsonpb")]
    Json,
}

impl InspectArgs {
    /// The filter, with a relative `--since` counted back from `now_unix_ns`.
    pub fn filter(&self, now_unix_ns: u64) -> Filter {
        Filter { criteria: self.filters.criteria.clone(), since_unix_ns: self.since.map(|s| s.unix_ns(now_unix_ns)) }
    }

    /// Whether to colour: as asked, else when writing to a terminal.
    pub fn color(&self, terminal: bool) -> bool {
        match (self.color, self.no_color) {
            (true, _) => true,
            (_, true) => false,
            _ => terminal,
        }
    }
}

/// The filter arguments, in command-line order: clap gives each kind's
/// values apart, and their positions put them back in order, which `--not`
/// (negate the filter right after it) needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FilterArgs {
    /// (negated, criterion), in command-line order.
    pub criteria: Vec<(bool, Criterion)>,
}

/// The filter kinds: argument id (also the long flag), value name, help,
/// and the parser of one value.
type CriterionParser = fn(&str) -> Result<Criterion, String>;
const FILTER_KINDS: [(&str, &str, &str, CriterionParser); 6] = [
    ("sandbox", "NAME", "Records of this sandbox", |v| Ok(Criterion::Sandbox(v.to_string()))),
    ("verdict", "VERDICT", "allowed, denied or redirected", |v| {
        Verdict::parse(v).map(Criterion::Verdict).ok_or_else(|| "expected allowed, denied or redirected".to_string())
    }),
    ("domain", "GLOB", "A name (DNS query, learned name, HTTP host, TLS server name) matching the glob (*, ?; any case)", |v| {
        Ok(Criterion::Domain(v.trim_end_matches('.').to_string()))
    }),
    ("ip", "CIDR", "Source or destination in this address or network", |v| {
        v.parse().map(Criterion::Ip).map_err(|_| "expected an address or CIDR".to_string())
    }),
    ("port", "N", "Source or destination port", |v| v.parse().map(Criterion::Port).map_err(|_| "expected a port number".to_string())),
    ("protocol", "PROTOCOL", "tcp, udp, icmp, icmpv6, arp, dns or http", |v| Ok(Criterion::Protocol(v.to_ascii_lowercase()))),
];

impl clap::Args for FilterArgs {
    fn augment_args(cmd: Command) -> Command {
        let mut cmd = cmd.next_help_heading("Filters");
        for (id, value_name, help, parse) in FILTER_KINDS {
            cmd = cmd.arg(Arg::new(id).long(id).value_name(value_name).help(help).action(ArgAction::Append).value_parser(parse));
        }
        // Each --not is a value of its own (Count would keep one position).
        let not = Arg::new("not").long("not").help("Negate the filter after it").action(ArgAction::Append).num_args(0).default_missing_value("true").value_parser(clap::value_parser!(bool));
        cmd.arg(not).next_help_heading(None)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// One argument of the command line, by position.
enum Given {
    Criterion(Criterion),
    Not,
    Other(String),
}

impl clap::FromArgMatches for FilterArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given: Vec<(usize, Given)> = Vec::new();
        for (id, ..) in FILTER_KINDS {
            if let (Some(values), Some(at)) = (matches.get_many::<Criterion>(id), matches.indices_of(id)) {
                given.extend(at.zip(values.cloned().map(Given::Criterion)));
            }
        }
        given.extend(matches.indices_of("not").into_iter().flatten().map(|at| (at, Given::Not)));
        // Only inspect's own flags: a global one (`--socket`) given before
        // the subcommand carries its index in the parent's command line,
        // which says nothing about its place among the filters.
        let own: Vec<String> = <InspectArgs as clap::Args>::augment_args(Command::default()).get_arguments().map(|a| a.get_id().as_str().to_string()).collect();
        for id in matches.ids().map(|id| id.as_str()).filter(|id| own.iter().any(|o| o == id)) {
            let filter = id == "not" || FILTER_KINDS.iter().any(|(kind, ..)| *kind == id);
            if !filter && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                given.extend(matches.indices_of(id).into_iter().flatten().map(|at| (at, Given::Other(id.replace('_', "-")))));
            }
        }
        given.sort_by_key(|(at, _)| *at);
        let invalid = |message: String| clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, message);
        let mut criteria = Vec::new();
        let mut negate = false;
        for (_, g) in given {
            match g {
                Given::Criterion(c) => criteria.push((std::mem::take(&mut negate), c)),
                Given::Not if negate => return Err(invalid("--not --not: negate a filter once".into())),
                Given::Not => negate = true,
                Given::Other(flag) if negate => return Err(invalid(format!("--not must precede a filter, not --{flag}"))),
                Given::Other(_) => {}
            }
        }
        if negate {
            return Err(invalid("--not at the end: it negates the filter after it".into()));
        }
        Ok(FilterArgs { criteria })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: not a flow record: {reason}")]
    BadRecord { path: String, line: usize, reason: String },
    #[error("writing the output: {0}")]
    Write(std::io::Error),
}

struct Printer<'a, W: Write, E: Write> {
    out: &'a mut W,
    err: &'a mut E,
    output: Output,
    color: bool,
}

impl<W: Write, E: Write> Printer<'_, W, E> {
    fn record(&mut self, r: &FlowRecord) -> Result<(), InspectError> {
        let line = match self.output {
            Output::Json => serde_json::to_string(r).expect("records serialize"),
            Output::Compact => compact(r, self.color),
        };
        writeln!(self.out, "{line}").and_then(|()| self.out.flush()).map_err(InspectError::Write)
    }

    fn lost(&mut self, lost: &Lost) {
        if lost.any() {
            let _ = writeln!(
                self.err,
                "sbx-net inspect: lost events: ring buffer {}, history evicted {}, follower lagged {}",
                lost.ring_buffer, lost.history_evicted, lost.follower_lagged
            );
        }
    }
}

/// One non-empty line of an `--input` file.
#[derive(Clone, Debug, PartialEq)]
pub enum InputLine {
    Record(Box<FlowRecord>),
    Lost(Lost),
    EndOfHistory,
}

/// Reads one line of an `--input` file: a flow record (the audit log, `-o
/// json`), or a line of a saved daemon stream. Err is why it is neither.
pub fn parse_input_line(line: &str) -> Result<InputLine, String> {
    match serde_json::from_str::<FlowRecord>(line) {
        Ok(r) => Ok(InputLine::Record(Box::new(r))),
        Err(e) => match serde_json::from_str::<StreamLine>(line) {
            Ok(StreamLine::Flow(r)) => Ok(InputLine::Record(r)),
            Ok(StreamLine::Lost(lost)) => Ok(InputLine::Lost(lost)),
            Ok(StreamLine::EndOfHistory) => Ok(InputLine::EndOfHistory),
            Err(_) => Err(e.to_string()),
        },
    }
}

/// Runs `inspect` with parsed arguments; a relative `--since` counts back
/// from `now_unix_ns`. A closed stdout (`| head`) ends it quietly.
pub fn run(socket: &Path, args: &InspectArgs, now_unix_ns: u64, out: &mut impl Write, err: &mut impl Write, color: bool) -> Result<(), InspectError> {
    let mut printer = Printer { out, err, output: args.output, color };
    let result = run_inner(socket, args, &args.filter(now_unix_ns), &mut printer);
    match result {
        Err(InspectError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn run_inner<W: Write, E: Write>(socket: &Path, args: &InspectArgs, filter: &Filter, printer: &mut Printer<'_, W, E>) -> Result<(), InspectError> {
    let keep = args.last.unwrap_or(usize::MAX);
    let mut history: VecDeque<FlowRecord> = VecDeque::new();
    let push = |r: FlowRecord, history: &mut VecDeque<FlowRecord>| {
        if filter.matches(&r) && keep > 0 {
            if history.len() == keep {
                history.pop_front();
            }
            history.push_back(r);
        }
    };
    if let Some(path) = &args.input {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| InspectError::Read { path: shown.clone(), source })?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| InspectError::Read { path: shown.clone(), source })?;
            if line.trim().is_empty() {
                continue;
            }
            match parse_input_line(&line) {
                Ok(InputLine::Record(record)) => push(*record, &mut history),
                Ok(InputLine::Lost(lost)) => printer.lost(&lost),
                Ok(InputLine::EndOfHistory) => {}
                Err(reason) => return Err(InspectError::BadRecord { path: shown, line: n + 1, reason }),
            }
        }
        for r in &history {
            printer.record(r)?;
        }
        return Ok(());
    }
    let mut lines = inspect_stream(socket, args.follow)?;
    let mut lost = Lost::default();
    let mut all = Vec::new();
    for line in lines.by_ref() {
        match line? {
            StreamLine::Lost(l) => lost = l,
            StreamLine::Flow(r) => all.push(*r),
            StreamLine::EndOfHistory => break,
        }
    }
    // The history is in publishing order; datapath events reach the daemon
    // a little after the proxies' records, so show it in time order.
    all.sort_by_key(|r| r.time_unix_ns);
    for r in all {
        push(r, &mut history);
    }
    for r in &history {
        printer.record(r)?;
    }
    printer.lost(&lost);
    if !args.follow {
        return Ok(());
    }
    for line in lines {
        match line? {
            StreamLine::Flow(r) if filter.matches(&r) => printer.record(&r)?,
            StreamLine::Lost(l) => printer.lost(&l),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `inspect` as a command of its own, as `sbx-net inspect` parses it.
    #[derive(Parser, Debug)]
    #[command(name = "inspect")]
    struct Inspect {
        #[command(flatten)]
        args: InspectArgs,
    }

    fn parse(line: &str) -> Result<InspectArgs, String> {
        Inspect::try_parse_from(std::iter::once("inspect").chain(line.split_whitespace())).map(|i| i.args).map_err(|e| e.to_string())
    }

    use crate::observe::record::test_record as record;

    #[test]
    fn filters_combine_kinds_and_negate() {
        let a = record("a", Verdict::Allowed, "198.51.100.7", 443, &["api.test"]);
        let b = record("b", Verdict::Denied, "203.0.113.9", 22, &[]);
        let c = record("a", Verdict::Denied, "198.51.100.200", 80, &["bad.test"]);
        let pick = |s: &str| -> Vec<String> {
            let f = parse(s).unwrap().filter(0);
            [&a, &b, &c].iter().filter(|r| f.matches(r)).map(|r| format!("{}:{}", r.sandbox, r.dst_port)).collect()
        };
        assert_eq!(pick(""), ["a:443", "b:22", "a:80"]);
        assert_eq!(pick("--sandbox a"), ["a:443", "a:80"]);
        assert_eq!(pick("--sandbox a --sandbox b --verdict denied"), ["b:22", "a:80"]);
        assert_eq!(pick("--not --sandbox a"), ["b:22"]);
        assert_eq!(pick("--sandbox a --not --verdict allowed"), ["a:80"]);
        assert_eq!(pick("--domain *.test"), ["a:443", "a:80"]);
        assert_eq!(pick("--not --domain bad.*"), ["a:443", "b:22"]);
        assert_eq!(pick("--ip 198.51.100.0/25"), ["a:443"]);
        assert_eq!(pick("--ip 10.200.0.5 --port 22"), ["b:22"]);
        assert_eq!(pick("--protocol udp"), Vec::<String>::new());
        assert_eq!(pick("--protocol TCP --not --port 443 --not --port 80"), ["b:22"]);
        // Positions, not spelling, put --not with its filter.
        assert_eq!(pick("--not --port=443 -n 5 --not --port=80 --protocol tcp"), ["b:22"]);
        assert_eq!(pick("-f --not --sandbox=a"), ["b:22"]);
    }

    /// The CLI's shape: a global flag before the subcommand.
    #[derive(Parser, Debug)]
    struct WithGlobal {
        #[arg(long, global = true)]
        socket: Option<String>,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Inspect(InspectArgs),
    }

    #[test]
    fn a_global_flag_before_the_subcommand_does_not_take_a_place_among_the_filters() {
        for line in ["sbx-net --socket /x inspect --not --sandbox a", "sbx-net inspect --not --sandbox a --socket /x"] {
            let parsed = WithGlobal::try_parse_from(line.split_whitespace()).unwrap_or_else(|e| panic!("{line}: {e}"));
            let Sub::Inspect(args) = parsed.command;
            assert_eq!(args.filters.criteria, [(true, Criterion::Sandbox("a".into()))], "{line}");
            assert_eq!(parsed.socket.as_deref(), Some("/x"));
        }
    }

    #[test]
    fn bad_inspect_arguments_are_explained() {
        for (line, want) in [
            ("--not", "--not at the end"),
            ("--not --follow", "--not must precede a filter, not --follow"),
            ("--not --not --port 1", "negate a filter once"),
            ("--verdict maybe", "expected allowed, denied or redirected"),
            ("--ip 300.1.1.1", "expected an address or CIDR"),
            ("--port", "a value is required for '--port <N>'"),
            ("--port 70000", "expected a port number"),
            ("-o yaml", "[possible values: compact, json]"),
            ("--since yesterday", "expected a duration (30s, 5m, 2h, 1d) or an RFC 3339 UTC time"),
            ("--frobnicate", "unexpected argument '--frobnicate'"),
            ("-f --input x.jsonl", "'--follow' cannot be used with '--input <FILE>'"),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let ok = parse("-f --last=5 -o json --since 5m").unwrap();
        assert!(ok.follow);
        assert_eq!(ok.last, Some(5));
        assert_eq!(ok.output, Output::Json);
        assert_eq!(ok.filter(600_000_000_000).since_unix_ns, Some(300_000_000_000));
        assert_eq!(parse("-o jsonpb").unwrap().output, Output::Json);
        assert_eq!(parse("--since 2026-11-28T12:00:00Z").unwrap().filter(0).since_unix_ns, Some(1_795_867_200_000_000_000));
    }

    #[test]
    fn colour_is_as_asked_last_flag_winning_else_the_terminal() {
        assert!(parse("").unwrap().color(true));
        assert!(!parse("").unwrap().color(false));
        assert!(parse("--color").unwrap().color(false));
        assert!(!parse("--no-color").unwrap().color(true));
        assert!(parse("--no-color --color").unwrap().color(false));
        assert!(!parse("--color --no-color").unwrap().color(true));
    }

    #[test]
    fn help_lists_every_flag_and_how_filters_combine() {
        let help = Inspect::try_parse_from(["inspect", "--help"]).unwrap_err().to_string();
        for flag in ["--follow", "--last <N>", "--since <DURATION|TIME>", "--output <FORMAT>", "--input <FILE>", "--color", "--no-color", "Filters:", "--sandbox <NAME>", "--verdict <VERDICT>", "--domain <GLOB>", "--ip <CIDR>", "--port <N>", "--protocol <PROTOCOL>", "--not", "--not negates the filter after it", "sbx-net inspect --last 20"] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
    }
}
