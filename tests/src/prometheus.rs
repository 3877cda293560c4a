//! A real Prometheus server in a test's namespace, scraping the daemon's
//! /metrics every second (and evaluating a rules file every second when
//! given one), queried over its HTTP API with curl; killed on drop (its
//! data is in the caller's directory).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::{netns_command, run_in, try_wait_for, Background};

pub struct PrometheusServer {
    _child: Background,
    ns: String,
    web: String,
}

impl PrometheusServer {
    /// Starts it in `ns` listening on `web` (an address of that namespace,
    /// distinct per test binary), its config and data under `dir`,
    /// scraping the daemon at 127.0.0.1:9464 as job `sbx-net`.
    pub fn start(ns: &str, dir: &Path, web: &str, rules: Option<&Path>) -> PrometheusServer {
        let config = dir.join("prometheus.yml");
        let rule_files = rules.map(|r| format!("rule_files:\n  - {}\n", r.display())).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: sbx-net\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = netns_command(ns, "prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        PrometheusServer { _child: Background(child), ns: ns.to_string(), web: web.to_string() }
    }

    /// GET an API path with query parameters: its `data`, or None (not up
    /// yet, or an error: then `Some(Err)` with what it said).
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<Result<Value, String>> {
        let url = format!("http://{}{path}", self.web);
        let mut args = vec!["-s".to_string(), "--max-time".into(), "5".into(), "-G".into(), url];
        for (k, v) in params {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_in(&self.ns, "curl", &args);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(if v["status"] == "success" { Ok(v["data"].clone()) } else { Err(v.to_string()) })
    }

    /// An instant query's result vector (Err: Prometheus refused it).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = try_wait_for(Duration::from_secs(10), || self.api("/api/v1/query", &[("query", promql)]))
            .unwrap_or_else(|| panic!("prometheus did not answer a query for {promql}"))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of an instant query's first series (None: no data yet).
    pub fn first_value(&self, promql: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", promql)])?.ok()?;
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (≤ 60 s: the server starts, then scrapes each second) until
    /// `promql` yields a value satisfying `ok`.
    pub fn wait_for(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = None;
        try_wait_for(Duration::from_secs(60), || {
            last = self.first_value(promql);
            last.filter(|v| ok(*v))
        })
        .unwrap_or_else(|| panic!("prometheus: {promql} = {last:?} after 60 s"))
    }

    /// The rules as loaded, each with its type, name, query and health.
    pub fn rules(&self) -> Vec<Value> {
        match self.api("/api/v1/rules", &[]) {
            Some(Ok(data)) => data["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect(),
            _ => Vec::new(),
        }
    }

    /// The alerts pending or firing.
    pub fn alerts(&self) -> Option<Vec<Value>> {
        match self.api("/api/v1/alerts", &[])? {
            Ok(data) => data["alerts"].as_array().cloned(),
            Err(_) => None,
        }
    }
}
