//! The audit log: one JSON line per record, rotated by size, with a
//! per-sandbox budget so one sandbox cannot flood it, written by a thread
//! of its own so no DNS answer or proxied request waits for the disk.

use std::io::Write;
use std::path::{Path, PathBuf};
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

/// Log lines one sandbox's traffic may cause per second on average, and at
/// once, where each query or connection it makes would write one (a
/// denial, a refusal): a guest decides how many it makes, and a line each
/// would let it flood the host's log and slow the loop serving everyone.
/// Its flow records keep every decision (under the audit budget).
pub const GUEST_LOG_LINES_PER_SECOND: u32 = 20;
pub const GUEST_LOG_BURST: u32 = 200;

/// The per-sandbox budget of per-decision log lines.
pub struct LogBudget {
    budgets: std::sync::Mutex<AuditBudgets>,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBudget {
    pub fn new() -> LogBudget {
        LogBudget { budgets: std::sync::Mutex::new(AuditBudgets::new(GUEST_LOG_LINES_PER_SECOND, GUEST_LOG_BURST)) }
    }

    /// Whether `sandbox` may write one more line; says so when its lines
    /// start being suppressed, and how many were, when they stop.
    pub fn admits(&self, sandbox: &str) -> bool {
        let admit = self.budgets.lock().unwrap_or_else(|p| p.into_inner()).admit(sandbox, crate::util::clock::boot_time_ns());
        match admit {
            Admit::Write { suppressed_before: 0 } => true,
            Admit::Write { suppressed_before } => {
                tracing::info!(%sandbox, suppressed = suppressed_before, "this sandbox's per-decision log lines (DNS, proxy) were over budget; that many were not written");
                true
            }
            Admit::SuppressFirst => {
                tracing::info!(%sandbox, "this sandbox's per-decision log lines (DNS, proxy) are over budget: not written until it has budget again (its flow records still are)");
                false
            }
            Admit::Suppress => false,
        }
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
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        self.reserve(line.len() as u64)?;
        self.write_lines(&line)
    }

    /// Opens the file if it is not open, and rotates first when `len` more
    /// bytes would not fit.
    fn reserve(&mut self, len: u64) -> Result<(), AuditError> {
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(self.err())?;
            }
            let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path).map_err(self.err())?;
            self.size = file.metadata().map_err(self.err())?.len();
            self.file = Some(file);
        }
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
            return self.reserve(len);
        }
        Ok(())
    }

    /// Writes whole lines (room made by [`AuditLog::reserve`]).
    fn write_lines(&mut self, lines: &[u8]) -> Result<(), AuditError> {
        let Some(file) = self.file.as_mut() else {
            return Err(AuditError::Io { path: self.path.display().to_string(), source: std::io::Error::other("the log is not open") });
        };
        file.write_all(lines).map_err(|source| AuditError::Io { path: self.path.display().to_string(), source })?;
        self.size += lines.len() as u64;
        Ok(())
    }

    /// Appends `records` in order with one write per run of lines that fit
    /// before the next rotation (one, nearly always); the lines of a failed
    /// write are counted as failures with its error.
    fn append_batch(&mut self, records: &[&FlowRecord]) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        let mut pending = Pending { bytes: Vec::with_capacity(records.len() * 512), lines: 0 };
        for record in records {
            let start = pending.bytes.len();
            serde_json::to_writer(&mut pending.bytes, record).expect("records serialize");
            pending.bytes.push(b'\n');
            let len = (pending.bytes.len() - start) as u64;
            // Rotation is decided line by line, as one append at a time would.
            let before = self.size + start as u64;
            if self.file.is_none() || (before > 0 && before + len > self.max_bytes) {
                let line = pending.bytes.split_off(start);
                pending.write_to(self, &mut outcome);
                pending.bytes = line;
                if let Err(e) = self.reserve(len) {
                    outcome.fail(1, e);
                    pending.bytes.clear();
                    continue;
                }
            }
            pending.lines += 1;
        }
        pending.write_to(self, &mut outcome);
        outcome
    }
}

/// Whole lines serialized and not yet written.
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

impl Pending {
    fn write_to(&mut self, log: &mut AuditLog, outcome: &mut BatchOutcome) {
        if self.lines == 0 {
            return;
        }
        match log.write_lines(&self.bytes) {
            Ok(()) => outcome.written += self.lines,
            Err(e) => outcome.fail(self.lines, e),
        }
        self.bytes.clear();
        self.lines = 0;
    }
}

/// What one batch of lines came to.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub written: u64,
    pub failed: u64,
    /// The failures' errors (each is logged).
    pub errors: Vec<AuditError>,
}

impl BatchOutcome {
    fn fail(&mut self, lines: u64, error: AuditError) {
        self.failed += lines;
        self.errors.push(error);
    }
}

impl AuditSink for AuditLog {
    fn append_batch(&mut self, records: &[&FlowRecord]) -> BatchOutcome {
        AuditLog::append_batch(self, records)
    }
}

/// Where the writer thread puts audit lines: the log file, or a test's
/// recorder.
pub trait AuditSink: Send + 'static {
    /// Writes `records` in order (as few writes as it can).
    fn append_batch(&mut self, records: &[&FlowRecord]) -> BatchOutcome;
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

/// The queue publishers and the writer share, under one lock so that the
/// count of queued jobs is exactly the jobs in the queue's order.
#[derive(Default)]
struct Queue {
    jobs: Vec<AuditJob>,
    /// Jobs accepted so far.
    queued: u64,
    /// Lines turned away since the last accepted job.
    dropped: u64,
    /// The writer is asleep on `Shared::work` (and must be woken); while it
    /// writes or lingers, publishers only queue, with no system call.
    writer_waiting: bool,
    /// The writer is gone (it could not start, or the hub went).
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    capacity: usize,
    /// Rung by the first job queued while the writer waits, and on close.
    work: Condvar,
    /// Jobs the writer has finished, and its signal that it finished some.
    done: Mutex<u64>,
    finished: Condvar,
}

/// After writing a batch the writer lets this long pass before it takes
/// the next, so a steady stream of lines costs one wakeup and one write(2)
/// per interval instead of one per line (a proxied request's line was a
/// futex wake, a context switch and a write of its own: ~15 % of the data
/// plane's CPU under `bench proxy`). It is the most a line waits beyond
/// the disk; [`AuditWriter::sync`] callers wait it at most once more.
const AUDIT_LINGER: Duration = Duration::from_millis(2);

/// The audit log on a dedicated thread fed by a bounded queue. Publishers
/// (DNS answers, proxy requests, the datapath reader) only ever try to
/// queue: a full queue drops the line and counts it, and the next line
/// that gets in is preceded by an `audit_dropped` record saying how many
/// went. The writer takes what is queued as one batch, writes it with one
/// write, and lingers ([`AUDIT_LINGER`]) before the next.
/// [`AuditWriter::sync`] waits until what was queued is written.
pub struct AuditWriter {
    shared: Arc<Shared>,
    counters: AuditCounters,
}

impl AuditWriter {
    /// Starts the writer thread with `capacity` jobs of queue. If the
    /// thread cannot start, every line counts as a write failure.
    pub fn start(sink: impl AuditSink, capacity: usize, counters: AuditCounters) -> AuditWriter {
        let shared = Arc::new(Shared { queue: Mutex::default(), capacity: capacity.max(1), work: Condvar::new(), done: Mutex::new(0), finished: Condvar::new() });
        let (thread_shared, thread_counters) = (shared.clone(), counters.clone());
        let started = std::thread::Builder::new().name("audit".into()).spawn(move || write_jobs(sink, &thread_shared, &thread_counters));
        if let Err(e) = started {
            shared.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            tracing::error!("audit log: no writer thread ({e}); audit lines are counted as failures");
        }
        AuditWriter { shared, counters }
    }

    /// Queues `records` for writing without ever waiting: when the queue is
    /// full they are dropped and counted (false).
    pub fn submit(&self, records: Vec<Arc<FlowRecord>>) -> bool {
        if records.is_empty() {
            return true;
        }
        let lines = records.len() as u64;
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            drop(q);
            self.counters.write_failures.inc_by(lines);
            return false;
        }
        if q.jobs.len() >= self.shared.capacity {
            q.dropped += lines;
            drop(q);
            self.counters.dropped.inc_by(lines);
            return false;
        }
        let dropped_before = std::mem::take(&mut q.dropped);
        q.jobs.push(AuditJob { records, dropped_before });
        q.queued += 1;
        let wake = std::mem::take(&mut q.writer_waiting);
        drop(q);
        if wake {
            self.shared.work.notify_one();
        }
        true
    }

    /// Blocks until every job queued before the call is written, or
    /// `timeout` passes (false). For threads off the async runtime: the
    /// control thread deleting a sandbox, an `inspect` client, shutdown.
    pub fn sync(&self, timeout: Duration) -> bool {
        let target = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).queued;
        let finished = self.shared.done.lock().unwrap_or_else(|p| p.into_inner());
        let (finished, _) = self.shared.finished.wait_timeout_while(finished, timeout, |n| *n < target).unwrap_or_else(|p| p.into_inner());
        let caught_up = *finished >= target;
        if !caught_up {
            tracing::warn!(behind = target - *finished, "audit log: the writer did not catch up within {timeout:?}");
        }
        caught_up
    }
}

impl Drop for AuditWriter {
    /// The writer writes what is queued, then ends.
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.shared.work.notify_one();
    }
}

/// Marks the queue closed when the writer thread ends however it ends (a
/// sink that panics included): publishers then count their lines as write
/// failures, as they did when the channel's receiver went, instead of
/// filling a queue nobody takes from.
struct ClosesOnExit<'a>(&'a Shared);

impl Drop for ClosesOnExit<'_> {
    fn drop(&mut self) {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.0.finished.notify_all();
    }
}

/// The writer thread: until the writer is closed and its queue empty.
fn write_jobs(mut sink: impl AuditSink, shared: &Shared, counters: &AuditCounters) {
    let _closes = ClosesOnExit(shared);
    loop {
        let jobs = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.jobs.is_empty() && !q.closed {
                q.writer_waiting = true;
                q = shared.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.jobs.is_empty() {
                return;
            }
            std::mem::take(&mut q.jobs)
        };
        let notices: Vec<FlowRecord> = jobs.iter().filter(|j| j.dropped_before > 0).map(|j| dropped_record(j.dropped_before)).collect();
        let mut notices = notices.iter();
        let mut lines: Vec<&FlowRecord> = Vec::with_capacity(jobs.iter().map(|j| j.records.len() + 1).sum());
        for job in &jobs {
            if job.dropped_before > 0 {
                lines.push(notices.next().expect("one notice per job that had drops"));
            }
            lines.extend(job.records.iter().map(|r| &**r));
        }
        let outcome = sink.append_batch(&lines);
        counters.written.inc_by(outcome.written);
        counters.write_failures.inc_by(outcome.failed);
        for e in &outcome.errors {
            tracing::warn!("audit log: {e}");
        }
        *shared.done.lock().unwrap_or_else(|p| p.into_inner()) += jobs.len() as u64;
        shared.finished.notify_all();
        drop(lines);
        drop(jobs);
        std::thread::sleep(AUDIT_LINGER);
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

    #[test]
    fn a_sandboxs_log_lines_stop_at_its_burst_and_not_anothers() {
        let budget = LogBudget::new();
        // Refilled at 20 a second: none comes back in the microseconds this takes.
        assert!((0..GUEST_LOG_BURST).all(|_| budget.admits("flood")));
        assert!(!budget.admits("flood"));
        assert!(!budget.admits("flood"));
        assert!(budget.admits("quiet"));
    }

    /// A sink that blocks each line until the test opens its gate, and
    /// says when it is blocked.
    struct Gated {
        entered: mpsc::Sender<()>,
        gate: Arc<(Mutex<bool>, Condvar)>,
        lines: Arc<Mutex<Vec<FlowRecord>>>,
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    impl Gated {
        /// The sink, its "blocked" signal, its gate (closed) and what it wrote.
        fn new() -> (Gated, mpsc::Receiver<()>, Gate, Arc<Mutex<Vec<FlowRecord>>>) {
            let (entered, blocked) = mpsc::channel();
            let (gate, lines): (Gate, Arc<Mutex<Vec<FlowRecord>>>) = Default::default();
            (Gated { entered, gate: gate.clone(), lines: lines.clone() }, blocked, gate, lines)
        }
    }

    impl AuditSink for Gated {
        fn append_batch(&mut self, records: &[&FlowRecord]) -> BatchOutcome {
            for record in records {
                let _ = self.entered.send(());
                let (open, signal) = &*self.gate;
                drop(signal.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
                self.lines.lock().unwrap().push((*record).clone());
            }
            BatchOutcome { written: records.len() as u64, ..BatchOutcome::default() }
        }
    }

    fn line(port: u16) -> Arc<FlowRecord> {
        let mut r = FlowRecord::new("a", "datapath", "new_flow", "tcp", Verdict::Denied, "x");
        r.dst_port = port;
        Arc::new(r)
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_waits_and_the_log_says_so() {
        let (sink, blocked, gate, lines) = Gated::new();
        let counters = AuditCounters::default();
        let writer = Arc::new(AuditWriter::start(sink, 2, counters.clone()));
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

    #[test]
    fn what_queues_while_the_writer_writes_goes_in_its_next_batch_in_order() {
        let (sink, blocked, gate, lines) = Gated::new();
        let counters = AuditCounters::default();
        let batches: Arc<Mutex<Vec<usize>>> = Arc::default();
        struct Counted(Gated, Arc<Mutex<Vec<usize>>>);
        impl AuditSink for Counted {
            fn append_batch(&mut self, records: &[&FlowRecord]) -> BatchOutcome {
                self.1.lock().unwrap().push(records.len());
                self.0.append_batch(records)
            }
        }
        let writer = AuditWriter::start(Counted(sink, batches.clone()), 1000, counters.clone());
        assert!(writer.submit(vec![line(0)]));
        blocked.recv_timeout(Duration::from_secs(5)).expect("the writer took the first job");
        for port in 1..=50 {
            assert!(writer.submit(vec![line(port)]));
        }
        let (open, signal) = &*gate;
        *open.lock().unwrap() = true;
        signal.notify_all();
        assert!(writer.sync(Duration::from_secs(5)));
        assert_eq!(*batches.lock().unwrap(), [1, 50], "one batch for everything queued meanwhile");
        let ports: Vec<u16> = lines.lock().unwrap().iter().map(|r| r.dst_port).collect();
        assert_eq!(ports, (0..=50).collect::<Vec<u16>>());
        assert_eq!(counters.written.get(), 51);
    }

    #[test]
    fn a_batch_rotates_where_appends_one_at_a_time_would() {
        let dir = std::env::temp_dir().join(format!("sbx-net-audit-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let records: Vec<Arc<FlowRecord>> = (1000..1010).map(line).collect();
        let line_len = serde_json::to_string(&*records[0]).unwrap().len() as u64 + 1;
        let (one, batch) = (dir.join("one/audit.log"), dir.join("batch/audit.log"));
        let mut log = AuditLog::new(&one, line_len * 3, 2);
        for r in &records {
            log.append(r).unwrap();
        }
        let mut log = AuditLog::new(&batch, line_len * 3, 2);
        let (first, rest) = records.split_at(4);
        for part in [first, rest] {
            let outcome = log.append_batch(&part.iter().map(|r| &**r).collect::<Vec<_>>());
            assert_eq!((outcome.written, outcome.failed), (part.len() as u64, 0));
        }
        for suffix in ["", ".1", ".2"] {
            let read = |p: &Path| std::fs::read_to_string(format!("{}{suffix}", p.display())).unwrap();
            assert_eq!(read(&batch), read(&one), "audit.log{suffix}");
        }
        assert!(!dir.join("batch/audit.log.3").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_writer_that_dies_makes_later_lines_failures_not_a_full_queue() {
        struct Panics;
        impl AuditSink for Panics {
            fn append_batch(&mut self, _: &[&FlowRecord]) -> BatchOutcome {
                panic!("the sink broke (expected by this test)");
            }
        }
        let counters = AuditCounters::default();
        let writer = AuditWriter::start(Panics, 4, counters.clone());
        assert!(writer.submit(vec![line(1)]));
        // Until the writer is gone (the first lines may still find room).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counters.write_failures.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "the queue never closed");
            writer.submit(vec![line(2)]);
            std::thread::yield_now();
        }
        let (failed, dropped) = (counters.write_failures.get(), counters.dropped.get());
        assert!(!writer.submit(vec![line(3), line(4)]));
        assert_eq!((counters.write_failures.get(), counters.dropped.get()), (failed + 2, dropped), "failures, not a full queue");
        assert!(!writer.sync(Duration::from_millis(10)), "what was queued was never written");
    }
}
