//! `bench all`: every suite in a process of its own (each enters network
//! namespaces and leaves threads behind), their tables in one Markdown file
//! and their headline figures and target verdicts in one JSON file; and
//! `--compare`, what moved against an earlier run's JSON.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::*;

/// One run's figures and verdicts, as written to and read from JSON.
pub(crate) struct RunFile {
    pub(crate) value: Value,
}

impl RunFile {
    pub(crate) fn from_recorded(suites: &[&str]) -> RunFile {
        let recorded = RECORDED.lock().unwrap();
        let figures: Vec<Value> = recorded
            .figures
            .iter()
            .map(|f| {
                json!({
                    "suite": f.suite, "name": f.name, "unit": f.unit, "better": f.better.as_str(),
                    "median": f.median(), "min": f.min(), "max": f.max(), "runs": f.runs,
                })
            })
            .collect();
        let targets: Vec<Value> = recorded
            .targets
            .iter()
            .map(|t| json!({"suite": t.suite, "target": t.target, "measured": t.measured, "met": t.met}))
            .collect();
        RunFile {
            value: json!({
                "format": 1,
                "started": utc_now(),
                "machine": {"cores": num_cpus(), "kernel": kernel()},
                "suites": suites,
                "figures": figures,
                "targets": targets,
            }),
        }
    }

    pub(crate) fn read(path: &Path) -> Result<RunFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not a benchmark run's JSON", path.display()))?;
        if value["format"] != 1 || !value["figures"].is_array() {
            bail!("{} is not a benchmark run's JSON (format 1 with figures)", path.display());
        }
        Ok(RunFile { value })
    }

    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&self.value)? + "\n").with_context(|| format!("writing {}", path.display()))
    }

    fn figures(&self) -> &[Value] {
        self.value["figures"].as_array().map(Vec::as_slice).unwrap_or(&[])
    }

    fn targets(&self) -> &[Value] {
        self.value["targets"].as_array().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Merges the parts `all` collected from its suites' processes.
    fn merge(suites: &[&str], parts: Vec<RunFile>, started: String) -> RunFile {
        let mut figures = Vec::new();
        let mut targets = Vec::new();
        for part in parts {
            figures.extend(part.figures().iter().cloned());
            targets.extend(part.targets().iter().cloned());
        }
        RunFile {
            value: json!({
                "format": 1,
                "started": started,
                "machine": {"cores": num_cpus(), "kernel": kernel()},
                "suites": suites,
                "figures": figures,
                "targets": targets,
            }),
        }
    }
}

/// Runs every suite, each in a child process of this binary, its tables
/// shown as they come and kept in `DIR/bench-STAMP.md`, its figures in
/// `DIR/bench-STAMP.json`. A suite that fails is reported and the others
/// still run; the exit status is then an error.
pub(crate) fn run_all(suites: &[&str], out: Option<&Path>, compare: Option<&Path>) -> Result<()> {
    let before = compare.map(RunFile::read).transpose()?;
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = utc_now();
    let stamp = started.replace([':', '-'], "");
    let md_path = out.join(format!("bench-{stamp}.md"));
    let json_path = out.join(format!("bench-{stamp}.json"));
    let mut md = std::fs::File::create(&md_path).with_context(|| format!("creating {}", md_path.display()))?;
    writeln!(md, "# Benchmarks, `cargo xtask bench all` of {started}\n\nMachine: {} cores, kernel {}.\n", num_cpus(), kernel())?;
    let exe = std::env::current_exe()?;
    let mut parts = Vec::new();
    let mut failed = Vec::new();
    for suite in suites {
        let part_path = out.join(format!(".part-{stamp}-{suite}.json"));
        let t = Instant::now();
        eprintln!("[bench all] {suite} …");
        let mut child = Command::new(&exe).args([suite, "--json"]).arg(&part_path).stdout(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            writeln!(md, "{line}")?;
        }
        let status = child.wait()?;
        eprintln!("[bench all] {suite}: {status} in {:.0} s", t.elapsed().as_secs_f64());
        if !status.success() {
            writeln!(md, "\n**Suite `{suite}` failed: {status}.**\n")?;
            failed.push(*suite);
        }
        match RunFile::read(&part_path) {
            Ok(part) => parts.push(part),
            Err(e) if status.success() => return Err(e),
            Err(_) => {}
        }
        let _ = std::fs::remove_file(&part_path);
    }
    let run = RunFile::merge(suites, parts, started);
    run.write(&json_path)?;
    let summary = targets_summary(&run);
    println!("{summary}");
    writeln!(md, "{summary}")?;
    if let Some(before) = &before {
        let comparison = comparison(before, &run);
        println!("{comparison}");
        writeln!(md, "{comparison}")?;
    }
    eprintln!("[bench all] tables in {}, figures in {}", md_path.display(), json_path.display());
    if !failed.is_empty() {
        bail!("suites failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Every target's verdict in this run.
fn targets_summary(run: &RunFile) -> String {
    let mut s = String::from("## Targets in this run\n\n| suite | target | measured | met |\n|---|---|---|---|\n");
    for t in run.targets() {
        let met = if t["met"].as_bool() == Some(true) { "yes" } else { "**no**" };
        s += &format!("| {} | {} | {} | {met} |\n", str_of(&t["suite"]), str_of(&t["target"]), str_of(&t["measured"]));
    }
    s
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

pub(crate) fn print_comparison(before: &RunFile, after: &RunFile) {
    println!("{}", comparison(before, after));
}

/// What moved between two runs: each figure both runs have, its medians,
/// the change, and whether it is outside both runs' spreads (the only
/// moves worth a word on a noisy machine).
fn comparison(before: &RunFile, after: &RunFile) -> String {
    let mut s = format!(
        "## Against the run of {}\n\n| suite | figure | before | after | change | verdict |\n|---|---|---:|---:|---:|---|\n",
        str_of(&before.value["started"])
    );
    let key = |f: &Value| (str_of(&f["suite"]).to_string(), str_of(&f["name"]).to_string());
    let old: std::collections::HashMap<(String, String), &Value> = before.figures().iter().map(|f| (key(f), f)).collect();
    let mut only_new = Vec::new();
    for f in after.figures() {
        let Some(o) = old.get(&key(f)) else {
            only_new.push(format!("{}/{}", str_of(&f["suite"]), str_of(&f["name"])));
            continue;
        };
        let (b, a) = (o["median"].as_f64().unwrap_or(f64::NAN), f["median"].as_f64().unwrap_or(f64::NAN));
        let change = if b != 0.0 { format!("{:+.1} %", 100.0 * (a - b) / b.abs()) } else { "–".to_string() };
        let higher_is_better = f["better"] == "higher";
        let verdict = move_verdict(
            (o["min"].as_f64().unwrap_or(b), o["max"].as_f64().unwrap_or(b)),
            (f["min"].as_f64().unwrap_or(a), f["max"].as_f64().unwrap_or(a)),
            a > b,
            higher_is_better,
        );
        s += &format!("| {} | {} ({}) | {b:.1} | {a:.1} | {change} | {verdict} |\n", key(f).0, key(f).1, str_of(&f["unit"]));
    }
    if !only_new.is_empty() {
        s += &format!("\nNew in this run: {}.\n", only_new.join(", "));
    }
    s
}

/// "better"/"worse" when the two runs' ranges do not overlap, else
/// "within the spread".
fn move_verdict(before: (f64, f64), after: (f64, f64), rose: bool, higher_is_better: bool) -> &'static str {
    let disjoint = after.0 > before.1 || after.1 < before.0;
    match (disjoint, rose == higher_is_better) {
        (false, _) => "within the spread",
        (true, true) => "better",
        (true, false) => "worse",
    }
}

/// Consecutive runs side by side: every target's verdict in each run (held
/// = met in all), then every figure's median in each run.
pub(crate) fn summarize(runs: &[RunFile]) -> String {
    let starts: Vec<&str> = runs.iter().map(|r| str_of(&r.value["started"])).collect();
    let mut s = format!("### Targets in {} consecutive runs ({})\n\n| suite | target |", runs.len(), starts.join(", "));
    for i in 1..=runs.len() {
        s += &format!(" run {i} |");
    }
    s += " held |\n|---|---|";
    s += &"---|".repeat(runs.len() + 1);
    s += "\n";
    let mut seen = Vec::new();
    for t in runs.iter().flat_map(|r| r.targets()) {
        let key = (str_of(&t["suite"]).to_string(), str_of(&t["target"]).to_string());
        if seen.contains(&key) {
            continue;
        }
        s += &format!("| {} | {} |", key.0, key.1);
        let mut held = true;
        for run in runs {
            match run.targets().iter().find(|x| str_of(&x["suite"]) == key.0 && str_of(&x["target"]) == key.1) {
                Some(x) => {
                    let met = x["met"].as_bool() == Some(true);
                    held &= met;
                    s += &format!(" {}{} |", str_of(&x["measured"]), if met { "" } else { " ✗" });
                }
                None => {
                    held = false;
                    s += " – |";
                }
            }
        }
        s += if held { " yes |\n" } else { " **no** |\n" };
        seen.push(key);
    }
    s += "\n### Headline figures (median of each run; spread within a run in its tables)\n\n| suite | figure | unit |";
    for i in 1..=runs.len() {
        s += &format!(" run {i} |");
    }
    s += "\n|---|---|---|";
    s += &"---:|".repeat(runs.len());
    s += "\n";
    let mut seen = Vec::new();
    for f in runs.iter().flat_map(|r| r.figures()) {
        let key = (str_of(&f["suite"]).to_string(), str_of(&f["name"]).to_string());
        if seen.contains(&key) {
            continue;
        }
        s += &format!("| {} | {} | {} |", key.0, key.1, str_of(&f["unit"]));
        for run in runs {
            match run.figures().iter().find(|x| str_of(&x["suite"]) == key.0 && str_of(&x["name"]) == key.1) {
                Some(x) => s += &format!(" {} |", short(x["median"].as_f64().unwrap_or(f64::NAN))),
                None => s += " – |",
            }
        }
        s += "\n";
        seen.push(key);
    }
    s
}

/// A figure at a precision that suits its size.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (civil date from the Unix day count).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_outside_both_spreads_are_named() {
        assert_eq!(move_verdict((10.0, 12.0), (13.0, 14.0), true, true), "better");
        assert_eq!(move_verdict((10.0, 12.0), (13.0, 14.0), true, false), "worse");
        assert_eq!(move_verdict((10.0, 12.0), (11.0, 14.0), true, true), "within the spread");
        assert_eq!(move_verdict((10.0, 12.0), (7.0, 9.0), false, false), "better");
    }

    #[test]
    fn utc_stamp_has_the_iso_shape() {
        let s = utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
