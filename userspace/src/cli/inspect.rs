//! The `inspect` client: reads the daemon's flow stream (or a saved JSON
//! file), filters it and prints it compact or as JSON lines.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::Path;

use crate::control::api::{inspect_stream, ClientError};
use crate::observe::record::{compact, FlowRecord, InspectArgs, Output};
use crate::observe::hub::{Lost, StreamLine};

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

/// Runs `inspect` with parsed arguments. A closed stdout (`| head`) ends it quietly.
pub fn run(socket: &Path, args: &InspectArgs, out: &mut impl Write, err: &mut impl Write, color: bool) -> Result<(), InspectError> {
    let mut printer = Printer { out, err, output: args.output, color };
    let result = run_inner(socket, args, &mut printer);
    match result {
        Err(InspectError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn run_inner<W: Write, E: Write>(socket: &Path, args: &InspectArgs, printer: &mut Printer<'_, W, E>) -> Result<(), InspectError> {
    let keep = args.last.unwrap_or(usize::MAX);
    let mut history: VecDeque<FlowRecord> = VecDeque::new();
    let push = |r: FlowRecord, history: &mut VecDeque<FlowRecord>| {
        if args.filter.matches(&r) && keep > 0 {
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
            StreamLine::Flow(r) if args.filter.matches(&r) => printer.record(&r)?,
            StreamLine::Lost(l) => printer.lost(&l),
            _ => {}
        }
    }
    Ok(())
}
