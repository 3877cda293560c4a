//! Shared by the suites: machine facts and the statistics of samples.

use super::*;

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub(crate) fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub(crate) fn fmt_runs(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which way a figure improves, for `--compare`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Better {
    Higher,
    Lower,
}

impl Better {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// A headline figure of a run: the median of its runs, with their spread.
#[derive(Clone, Debug)]
pub(crate) struct Figure {
    pub(crate) suite: String,
    pub(crate) name: String,
    pub(crate) unit: String,
    pub(crate) better: Better,
    pub(crate) runs: Vec<f64>,
}

impl Figure {
    pub(crate) fn median(&self) -> f64 {
        median(self.runs.clone())
    }
    pub(crate) fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub(crate) fn max(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    /// "median (min–max)", or the value alone for a single run.
    pub(crate) fn spread(&self, decimals: usize) -> String {
        if self.runs.len() < 2 {
            format!("{:.*}", decimals, self.median())
        } else {
            format!("{:.*} ({:.*}–{:.*})", decimals, self.median(), decimals, self.min(), decimals, self.max())
        }
    }
}

/// A target of the issue, met or not, in this run.
#[derive(Clone, Debug)]
pub(crate) struct TargetCheck {
    pub(crate) suite: String,
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

#[derive(Default)]
pub(crate) struct Recorded {
    pub(crate) figures: Vec<Figure>,
    pub(crate) targets: Vec<TargetCheck>,
}

pub(crate) static RECORDED: std::sync::Mutex<Recorded> = std::sync::Mutex::new(Recorded { figures: Vec::new(), targets: Vec::new() });

/// Keeps a headline figure for the JSON file; returns it for the table.
pub(crate) fn record(suite: &str, name: &str, unit: &str, better: Better, runs: &[f64]) -> Figure {
    assert!(!runs.is_empty(), "figure {suite}/{name} has no runs");
    let figure = Figure { suite: suite.into(), name: name.into(), unit: unit.into(), better, runs: runs.to_vec() };
    RECORDED.lock().unwrap().figures.push(figure.clone());
    figure
}

/// Keeps a target's verdict for the JSON file and prints it as a line.
pub(crate) fn check_target(suite: &str, target: &str, measured: String, met: bool) -> bool {
    println!("- target {target}: {measured} — **{}**", if met { "met" } else { "NOT met" });
    RECORDED.lock().unwrap().targets.push(TargetCheck { suite: suite.into(), target: target.into(), measured, met });
    met
}

/// Interleaves `rounds` runs of every configuration, rotating the order
/// each round so drift on a small machine favours none; `run(config)`
/// measures one. Returns each configuration's runs.
pub(crate) fn alternating<T>(configs: usize, rounds: usize, mut run: impl FnMut(usize) -> Result<T>) -> Result<Vec<Vec<T>>> {
    let mut out: Vec<Vec<T>> = (0..configs).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..rounds {
        for k in 0..configs {
            let config = (round + k) % configs;
            out[config].push(run(config)?);
        }
    }
    Ok(out)
}

/// CPU time (µs) used so far by process `pid` and its children (nginx's
/// workers), read from /proc: (user + system, user alone).
pub(crate) fn tree_cpu_us(pid: u32) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (mut ticks, mut user) = (0u64, 0u64);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command's closing parenthesis: state (3), ppid
        // (4), …, utime (14), stime (15).
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let own: Option<u32> = head.split_whitespace().next().and_then(|p| p.parse().ok());
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: Option<u32> = fields.get(1).and_then(|p| p.parse().ok());
        if own == Some(pid) || ppid == Some(pid) {
            let utime = fields.get(11).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
            user += utime;
            ticks += utime + fields.get(12).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (ticks as f64 / hz * 1e6, user as f64 / hz * 1e6)
}

/// The pids of the sbx-net data planes (the process the proxies run in)
/// of the daemon whose state is in `state_dir`: more than one while a
/// replaced one drains.
fn dataplane_pids(state_dir: &std::path::Path) -> Vec<u32> {
    let want = state_dir.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            (args.iter().any(|a| a == "dataplane") && args.contains(&want)).then(|| entry.file_name().to_string_lossy().parse().ok()).flatten()
        })
        .collect()
}

/// The pid of the data plane of the daemon whose state is in `state_dir`
/// (the first found).
pub(crate) fn dataplane_pid(state_dir: &std::path::Path) -> Option<u32> {
    dataplane_pids(state_dir).first().copied()
}

/// The pid of the daemon's one data plane, once a replaced one (after a
/// restart with another configuration) has drained and gone: its CPU time
/// is the serving one's. At most 60 s (the default drain is at most 30).
pub(crate) fn sole_dataplane_pid(state_dir: &std::path::Path) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match dataplane_pids(state_dir)[..] {
            [pid] => return Ok(pid),
            ref pids if Instant::now() > deadline => bail!("expected one data plane for {}, found {pids:?}", state_dir.display()),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Busy CPU time (µs) of the whole machine so far, all CPUs, from
/// /proc/stat (user, nice, system, irq and softirq; not idle, iowait or
/// the hypervisor's steal).
pub(crate) fn machine_busy_us() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|i| ticks.get(*i)).sum();
    busy as f64 / hz * 1e6
}
