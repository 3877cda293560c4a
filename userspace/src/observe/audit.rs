//! The audit log: one JSON line per record, rotated by size, with a
//! per-sandbox budget so one sandbox cannot flood it.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::record::{FlowRecord, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Append-only JSONL with size-based rotation: past `max_bytes` the file
/// becomes `.1` (`.1` becomes `.2`, ...; the oldest beyond `keep` goes).
/// Whether an audit line is written.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it; first say how many of this sandbox's lines were suppressed
    /// since its last written one.
    Write { suppressed_before: u64 },
    /// The first line over budget: not written, but say that suppression
    /// starts (the flood may end, or the sandbox go, before any summary).
    SuppressFirst,
    Suppress,
}

/// The audit record announcing (`starting`) or summing up a suppression
/// for `like`'s sandbox; `packets` carries the count.
pub(super) fn suppression_record(like: &FlowRecord, suppressed: u64, starting: bool) -> FlowRecord {
    let mut s = FlowRecord::new(&like.sandbox, "audit", "audit_suppressed", "other", Verdict::Denied, "rate_limit");
    s.time_unix_ns = like.time_unix_ns;
    s.time = like.time.clone();
    s.packets = suppressed;
    s.rule = Some(if starting {
        "this sandbox is over its audit budget: its records are counted, not written, until it has budget again".to_string()
    } else {
        format!("{suppressed} audit records of this sandbox were over its budget and not written")
    });
    s
}

/// A token bucket per sandbox (pure: the clock is passed in).
#[derive(Debug)]
pub struct AuditBudgets {
    per_second: f64,
    burst: f64,
    by_sandbox: std::collections::HashMap<String, AuditBudget>,
}

#[derive(Debug)]
struct AuditBudget {
    tokens: f64,
    last_ns: u64,
    suppressed: u64,
}

/// Sandboxes whose buckets are kept; past it, full (idle) buckets go.
const AUDIT_BUDGETS_KEPT: usize = 4096;

impl AuditBudgets {
    /// `per_second` 0 turns the budget off.
    pub fn new(per_second: u32, burst: u32) -> AuditBudgets {
        AuditBudgets { per_second: f64::from(per_second), burst: f64::from(burst.max(1)), by_sandbox: Default::default() }
    }

    /// Forgets a deleted sandbox; what it had suppressed and not yet reported.
    pub fn forget(&mut self, sandbox: &str) -> Option<u64> {
        self.by_sandbox.remove(sandbox).map(|b| b.suppressed)
    }

    pub fn admit(&mut self, sandbox: &str, now_ns: u64) -> Admit {
        if self.per_second == 0.0 {
            return Admit::Write { suppressed_before: 0 };
        }
        if self.by_sandbox.len() >= AUDIT_BUDGETS_KEPT && !self.by_sandbox.contains_key(sandbox) {
            let (rate, burst) = (self.per_second, self.burst);
            self.by_sandbox.retain(|_, b| b.suppressed > 0 || b.tokens + (now_ns.saturating_sub(b.last_ns) as f64 / 1e9) * rate < burst);
        }
        let burst = self.burst;
        let budget = self.by_sandbox.entry(sandbox.to_string()).or_insert(AuditBudget { tokens: burst, last_ns: now_ns, suppressed: 0 });
        let elapsed = now_ns.saturating_sub(budget.last_ns) as f64 / 1e9;
        budget.tokens = (budget.tokens + elapsed * self.per_second).min(self.burst);
        budget.last_ns = now_ns;
        if budget.tokens < 1.0 {
            budget.suppressed += 1;
            return if budget.suppressed == 1 { Admit::SuppressFirst } else { Admit::Suppress };
        }
        budget.tokens -= 1.0;
        Admit::Write { suppressed_before: std::mem::take(&mut budget.suppressed) }
    }
}

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<std::fs::File>,
    size: u64,
}

impl AuditLog {
    pub fn new(path: &Path, max_bytes: u64, keep: usize) -> AuditLog {
        AuditLog { path: path.to_path_buf(), max_bytes: max_bytes.max(1), keep, file: None, size: 0 }
    }

    fn err(&self) -> impl Fn(std::io::Error) -> AuditError + '_ {
        move |source| AuditError::Io { path: self.path.display().to_string(), source }
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path).or_else(ignore_missing).map_err(self.err())?;
        } else {
            std::fs::remove_file(self.rotated(self.keep)).or_else(ignore_missing).map_err(self.err())?;
            for n in (1..self.keep).rev() {
                std::fs::rename(self.rotated(n), self.rotated(n + 1)).or_else(ignore_missing).map_err(self.err())?;
            }
            std::fs::rename(&self.path, self.rotated(1)).or_else(ignore_missing).map_err(self.err())?;
        }
        self.size = 0;
        Ok(())
    }

    /// Appends one record as a JSON line (one write, so a reader never sees
    /// half a line), rotating first when it would not fit.
    pub fn append(&mut self, record: &FlowRecord) -> Result<(), AuditError> {
        let mut line = serde_json::to_string(record).expect("records serialize");
        line.push('\n');
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(self.err())?;
            }
            let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path).map_err(self.err())?;
            self.size = file.metadata().map_err(self.err())?.len();
            self.file = Some(file);
        }
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
            return self.append(record);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(line.as_bytes()).map_err(|source| AuditError::Io { path: self.path.display().to_string(), source })?;
        self.size += line.len() as u64;
        Ok(())
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

