//! The audit log: one JSON line per record, rotated by size, with a
//! per-sandbox budget so one sandbox cannot flood it, written by a thread
//! of its own so no DNS answer or proxied request waits for the disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::record::{FlowRecord, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

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

/// Append-only JSONL with size-based rotation: past `max_bytes` the file
/// becomes `.1` (`.1` becomes `.2`, ...; the oldest beyond `keep` goes).
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

impl AuditSink for AuditLog {
    fn append(&mut self, record: &FlowRecord) -> Result<(), AuditError> {
        AuditLog::append(self, record)
    }
}

/// Where the writer thread puts audit lines: the log file, or a test's
/// recorder.
pub trait AuditSink: Send + 'static {
    fn append(&mut self, record: &FlowRecord) -> Result<(), AuditError>;
}

/// The audit path's counters (shared handles: the hub's metrics see them).
#[derive(Clone, Default)]
pub struct AuditCounters {
    /// Lines written.
    pub written: Counter,
    /// Lines the sink failed to write, or that found no writer.
    pub write_failures: Counter,
    /// Lines not queued because the writer's queue was full.
    pub dropped: Counter,
}

/// Lines for the writer, written together and in order.
struct AuditJob {
    records: Vec<Arc<FlowRecord>>,
    /// Lines the full queue turned away since the last job that got in:
    /// said in the log before this job's lines.
    dropped_before: u64,
}

/// What publishers share about the queue, under one lock so that the
/// count of queued jobs is exactly the jobs in the queue's order.
struct QueueState {
    jobs: SyncSender<AuditJob>,
    /// Jobs accepted so far.
    queued: u64,
    /// Lines turned away since the last accepted job.
    dropped: u64,
}

/// The audit log on a dedicated thread fed by a bounded queue. Publishers
/// (DNS answers, proxy requests, the datapath reader) only ever try to
/// queue: a full queue drops the line and counts it, and the next line
/// that gets in is preceded by an `audit_dropped` record saying how many
/// went. [`AuditWriter::sync`] waits until what was queued is written.
pub struct AuditWriter {
    queue: Mutex<QueueState>,
    /// Jobs the thread has finished, and its signal that it finished one.
    done: Arc<(Mutex<u64>, Condvar)>,
    counters: AuditCounters,
}

impl AuditWriter {
    /// Starts the writer thread with `capacity` jobs of queue. If the
    /// thread cannot start, every line counts as a write failure.
    pub fn start(sink: impl AuditSink, capacity: usize, counters: AuditCounters) -> AuditWriter {
        let (jobs, queued_jobs) = sync_channel(capacity.max(1));
        let done: Arc<(Mutex<u64>, Condvar)> = Arc::default();
        let (thread_done, thread_counters) = (done.clone(), counters.clone());
        let started = std::thread::Builder::new().name("audit".into()).spawn(move || write_jobs(sink, queued_jobs, &thread_done, &thread_counters));
        if let Err(e) = started {
            // The receiver went with the closure: queueing finds no writer.
            tracing::error!("audit log: no writer thread ({e}); audit lines are counted as failures");
        }
        AuditWriter { queue: Mutex::new(QueueState { jobs, queued: 0, dropped: 0 }), done, counters }
    }

    /// Queues `records` for writing without ever waiting: when the queue is
    /// full they are dropped and counted (false).
    pub fn submit(&self, records: Vec<Arc<FlowRecord>>) -> bool {
        if records.is_empty() {
            return true;
        }
        let lines = records.len() as u64;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let job = AuditJob { records, dropped_before: q.dropped };
        match q.jobs.try_send(job) {
            Ok(()) => {
                q.queued += 1;
                q.dropped = 0;
                true
            }
            Err(TrySendError::Full(_)) => {
                q.dropped += lines;
                self.counters.dropped.inc_by(lines);
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.write_failures.inc_by(lines);
                false
            }
        }
    }

    /// Blocks until every job queued before the call is written, or
    /// `timeout` passes (false). For threads off the async runtime: the
    /// control thread deleting a sandbox, an `inspect` client, shutdown.
    pub fn sync(&self, timeout: Duration) -> bool {
        let target = self.queue.lock().unwrap_or_else(|p| p.into_inner()).queued;
        let (finished, signal) = &*self.done;
        let finished = finished.lock().unwrap_or_else(|p| p.into_inner());
        let (finished, _) = signal.wait_timeout_while(finished, timeout, |n| *n < target).unwrap_or_else(|p| p.into_inner());
        let caught_up = *finished >= target;
        if !caught_up {
            tracing::warn!(behind = target - *finished, "audit log: the writer did not catch up within {timeout:?}");
        }
        caught_up
    }
}

/// The writer thread: until every sender is gone.
fn write_jobs(mut sink: impl AuditSink, jobs: Receiver<AuditJob>, done: &(Mutex<u64>, Condvar), counters: &AuditCounters) {
    let mut write = |record: &FlowRecord| match sink.append(record) {
        Ok(()) => {
            counters.written.inc();
        }
        Err(e) => {
            counters.write_failures.inc();
            tracing::warn!("audit log: {e}");
        }
    };
    for job in jobs {
        if job.dropped_before > 0 {
            write(&dropped_record(job.dropped_before));
        }
        for record in &job.records {
            write(record);
        }
        let (finished, signal) = done;
        *finished.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        signal.notify_all();
    }
}

/// The audit record saying that `dropped` lines found the queue full. No
/// sandbox's: the queue is everyone's.
fn dropped_record(dropped: u64) -> FlowRecord {
    let mut r = FlowRecord::new("", "audit", "audit_dropped", "other", Verdict::Denied, "queue_full");
    r.time_unix_ns = crate::util::clock::unix_now_ns();
    r.time = super::record::rfc3339(r.time_unix_ns);
    r.packets = dropped;
    r.rule = Some(format!("{dropped} audit records were not written: the audit writer's queue was full"));
    r
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks each line until the test opens its gate, and
    /// says when it is blocked.
    struct Gated {
        entered: mpsc::Sender<()>,
        gate: Arc<(Mutex<bool>, Condvar)>,
        lines: Arc<Mutex<Vec<FlowRecord>>>,
    }

    impl AuditSink for Gated {
        fn append(&mut self, record: &FlowRecord) -> Result<(), AuditError> {
            let _ = self.entered.send(());
            let (open, signal) = &*self.gate;
            drop(signal.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            self.lines.lock().unwrap().push(record.clone());
            Ok(())
        }
    }

    fn line(port: u16) -> Arc<FlowRecord> {
        let mut r = FlowRecord::new("a", "datapath", "new_flow", "tcp", Verdict::Denied, "x");
        r.dst_port = port;
        Arc::new(r)
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_waits_and_the_log_says_so() {
        let (entered, blocked) = mpsc::channel();
        let gate: Arc<(Mutex<bool>, Condvar)> = Arc::default();
        let lines: Arc<Mutex<Vec<FlowRecord>>> = Arc::default();
        let counters = AuditCounters::default();
        let writer = Arc::new(AuditWriter::start(Gated { entered, gate: gate.clone(), lines: lines.clone() }, 2, counters.clone()));
        // The writer takes the first job and blocks on the (slow) disk...
        assert!(writer.submit(vec![line(1)]));
        blocked.recv_timeout(Duration::from_secs(5)).expect("the writer took the first job");
        // ...two more fill the queue, the next ones are turned away at once.
        assert!(writer.submit(vec![line(2)]) && writer.submit(vec![line(3)]));
        let turned_away = {
            let writer = writer.clone();
            let (done, finished) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = done.send((writer.submit(vec![line(4)]), writer.submit(vec![line(5), line(6)])));
            });
            finished.recv_timeout(Duration::from_secs(5)).expect("a full queue never makes the publisher wait")
        };
        assert_eq!(turned_away, (false, false));
        assert_eq!(counters.dropped.get(), 3, "counted by line");
        assert!(!writer.sync(Duration::from_millis(50)), "the writer is behind while the disk is stuck");
        let (open, signal) = &*gate;
        *open.lock().unwrap() = true;
        signal.notify_all();
        assert!(writer.sync(Duration::from_secs(5)));
        // The next line that gets in is preceded by the count of those that did not.
        assert!(writer.submit(vec![line(7)]));
        assert!(writer.sync(Duration::from_secs(5)));
        let written: Vec<(String, u16, u64)> = lines.lock().unwrap().iter().map(|r| (r.event.to_string(), r.dst_port, r.packets)).collect();
        let flow = |port| ("new_flow".to_string(), port, 0);
        assert_eq!(written, [flow(1), flow(2), flow(3), ("audit_dropped".to_string(), 0, 3), flow(7)]);
        assert_eq!((counters.written.get(), counters.write_failures.get()), (5, 0));
    }
}
