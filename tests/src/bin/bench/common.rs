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
