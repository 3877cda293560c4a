//! `/metrics`: one prometheus-client registry (prefix `sbx_net`) that each
//! component registers its own families into when the daemon wires it up —
//! the flow hub, the DNS proxy, the datapath's pinned maps (read by a
//! collector at scrape time), the daemon — and the HTTP endpoint that
//! serves it. A scrape reads the components' own counters; it never waits
//! for the control thread. Labels are low-cardinality: sandboxes, verdicts,
//! reasons, families, outcomes — never addresses or names.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::util::conn_limit::AcceptBackoff;

/// A process's metric registry.
pub struct Metrics {
    registry: Registry,
    /// One rendering at a time: each walks the pinned maps key by key, so
    /// scrapes arriving together wait their turn (asynchronously) instead
    /// of each taking a blocking thread for the same walk.
    rendering: tokio::sync::Semaphore,
    /// Families another process renders (the data plane's), appended.
    appended: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("appended", &self.appended.is_some()).finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { registry: Registry::with_prefix("sbx_net"), rendering: tokio::sync::Semaphore::new(1), appended: None }
    }
}

impl Metrics {
    /// Where a component registers its families (names without the
    /// `sbx_net_` prefix; counters without `_total`, which the encoder adds).
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text of everything registered. Collectors read maps
    /// and take locks: call it where blocking is fine.
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        if let Some(more) = self.appended.as_ref().map(|f| f()).filter(|t| !t.is_empty()) {
            // One document: one `# EOF`, at the end.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            out.push_str(&more);
            if !out.ends_with("# EOF\n") {
                out.push_str("# EOF\n");
            }
        }
        out
    }

    /// Appends the OpenMetrics text `render` gives (its own `# EOF` or not)
    /// to every rendering: another process's families.
    pub fn append_from(&mut self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.appended = Some(Box::new(render));
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text, for
/// clients that do not ask for OpenMetrics (curl, `promtool check metrics`):
/// counter families are named with their `_total` suffix, and the `# EOF`
/// and `# UNIT` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ").and_then(|r| r.strip_suffix(" counter")))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A collector made of a function that writes families at scrape time
/// (with the `encode_*` helpers below); the name is for `Debug`.
pub struct CollectWith<F>(pub &'static str, pub F);

impl<F> std::fmt::Debug for CollectWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CollectWith").field(&self.0).finish()
    }
}

impl<F> Collector for CollectWith<F>
where
    F: Fn(&mut DescriptorEncoder) -> Result<(), std::fmt::Error> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        (self.1)(&mut encoder)
    }
}

/// The OpenMetrics text of what `write` writes as a collector (for tests
/// of a component's families).
#[cfg(test)]
pub fn collected_text(write: impl Fn(&mut DescriptorEncoder) -> Result<(), std::fmt::Error> + Send + Sync + 'static) -> String {
    let mut m = Metrics::default();
    m.registry().register_collector(Box::new(CollectWith("test", write)));
    m.openmetrics()
}

// Collectors write their families with these, so a collected family reads
// exactly like a registered one (`Registry::register` ends the help with a
// full stop; `encode_descriptor` writes it as given).

/// One unlabelled counter.
pub fn encode_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, &format!("{help}."), None, metric.metric_type())?)
}

/// One unlabelled gauge.
pub fn encode_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, &format!("{help}."), None, metric.metric_type())?)
}

/// A counter family: one series per label set.
pub fn encode_counters<L: EncodeLabelSet>(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: impl IntoIterator<Item = (L, u64)>) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, &format!("{help}."), None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family: one series per label set.
pub fn encode_gauges<L: EncodeLabelSet>(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: impl IntoIterator<Item = (L, i64)>) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, &format!("{help}."), None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// How long a client has to send its request head (a scraper sends it at
/// once; a connection that trickles it is cut).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight scrapes may finish once the daemon stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The request head a scraper sends is small (hyper's minimum buffer).
const MAX_HEAD_BYTES: usize = 8192;

/// What `/metrics` answers a request with, before any rendering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The metrics, in OpenMetrics text (the client asked for it: Prometheus does).
    OpenMetrics,
    /// The metrics, in the classic text format 0.0.4 (curl, promtool).
    PrometheusText,
    /// Anything but `GET /metrics` (a query string is fine).
    NotFound,
}

/// The answer for a request's method, path and `Accept` header values.
pub fn answer<'a>(method: &Method, path: &str, accept: impl IntoIterator<Item = &'a [u8]>) -> Answer {
    if method != Method::GET || path != "/metrics" {
        return Answer::NotFound;
    }
    let openmetrics = accept.into_iter().any(|v| String::from_utf8_lossy(v).to_ascii_lowercase().contains("application/openmetrics-text"));
    if openmetrics {
        Answer::OpenMetrics
    } else {
        Answer::PrometheusText
    }
}

async fn respond(request: Request<Incoming>, metrics: Arc<Metrics>) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = answer(request.method(), request.uri().path(), request.headers().get_all(ACCEPT).iter().map(HeaderValue::as_bytes));
    let empty = |status| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = status;
        r
    };
    if answer == Answer::NotFound {
        return Ok(empty(StatusCode::NOT_FOUND));
    }
    // Collectors read the pinned maps and take the DNS proxy's lock: off
    // the async workers, which carry the proxies.
    let Ok(_turn) = metrics.rendering.acquire().await else {
        return Ok(empty(StatusCode::SERVICE_UNAVAILABLE));
    };
    let renderer = metrics.clone();
    let Ok(openmetrics) = tokio::task::spawn_blocking(move || renderer.openmetrics()).await else {
        tracing::error!("rendering /metrics failed");
        return Ok(empty(StatusCode::SERVICE_UNAVAILABLE));
    };
    let (body, content_type) = match answer {
        Answer::OpenMetrics => (openmetrics, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        _ => (to_prometheus_text(&openmetrics), "text/plain; version=0.0.4; charset=utf-8"),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(r)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; then
/// stops accepting, lets scrapes in flight finish (for at most
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) => {
                // Out of descriptors: wait for some to close rather than spin.
                tokio::time::sleep(backoff.wait_after(&e, "metrics endpoint")).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let connection = http.serve_connection(TokioIo::new(stream), hyper::service::service_fn(move |request| respond(request, metrics.clone())));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("metrics endpoint: connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("metrics endpoint: scrapes still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use std::io::{Read, Write};

    fn fixed(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_counter(encoder, "lost", "Things lost", 4)?;
        encode_gauge(encoder, "held", "Things held", 2)?;
        encode_counters(encoder, "seen", "Things seen by kind", [([("kind", "a")], 1), ([("kind", "b")], 2)])?;
        encode_gauges(encoder, "room", "Room by family", [([("family", "ipv4")], 7)])
    }

    fn metrics() -> Metrics {
        let mut m = Metrics::default();
        let registered: Family<[(&'static str, &'static str); 1], Counter> = Family::default();
        registered.get_or_create(&[("kind", "a")]).inc_by(3);
        m.registry().register("registered", "Counted in place", registered);
        m.registry().register_collector(Box::new(CollectWith("fixed", fixed)));
        m
    }

    #[test]
    fn collected_families_read_like_registered_ones() {
        let text = metrics().openmetrics();
        for line in [
            "# HELP sbx_net_registered Counted in place.",
            "sbx_net_registered_total{kind=\"a\"} 3",
            "# HELP sbx_net_lost Things lost.",
            "# TYPE sbx_net_lost counter",
            "sbx_net_lost_total 4",
            "# TYPE sbx_net_held gauge",
            "sbx_net_held 2",
            "sbx_net_seen_total{kind=\"b\"} 2",
            "sbx_net_room{family=\"ipv4\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
        let classic = to_prometheus_text(&text);
        assert!(classic.contains("# TYPE sbx_net_lost_total counter\n"), "{classic}");
        assert!(classic.contains("# HELP sbx_net_registered_total Counted in place.\n"), "{classic}");
        assert!(classic.contains("# TYPE sbx_net_held gauge\n"), "{classic}");
        assert!(!classic.contains("# EOF"));
    }

    #[test]
    fn only_get_metrics_is_answered_and_openmetrics_only_when_asked() {
        let om: &[u8] = b"application/openmetrics-text; version=1.0.0";
        assert_eq!(answer(&Method::GET, "/metrics", []), Answer::PrometheusText);
        assert_eq!(answer(&Method::GET, "/metrics", [b"text/plain".as_slice(), om]), Answer::OpenMetrics);
        assert_eq!(answer(&Method::GET, "/metrics", [b"Application/OpenMetrics-Text".as_slice()]), Answer::OpenMetrics);
        assert_eq!(answer(&Method::GET, "/other", []), Answer::NotFound);
        assert_eq!(answer(&Method::GET, "/metrics/x", []), Answer::NotFound);
        assert_eq!(answer(&Method::POST, "/metrics", []), Answer::NotFound, "what the endpoint answered before hyper");
        assert_eq!(answer(&Method::HEAD, "/metrics", []), Answer::NotFound);
    }

    /// One HTTP/1.1 exchange on a fresh connection: (status line, headers and body).
    fn exchange(addr: std::net::SocketAddr, request: &str) -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (status, rest) = out.split_once("\r\n").unwrap_or((&out, ""));
        (status.to_string(), rest.to_string())
    }

    #[test]
    fn serves_over_http_and_stops_when_told() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(serve(listener, Arc::new(metrics()), async move {
            let _ = stopped.await;
        }));
        let (status, rest) = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(rest.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{rest}");
        assert!(rest.contains("sbx_net_lost_total 4") && !rest.contains("# EOF"), "{rest}");
        let (status, rest) = exchange(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(rest.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"), "{rest}");
        assert!(rest.trim_end().ends_with("# EOF"), "{rest}");
        assert_eq!(exchange(addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0, "HTTP/1.1 404 Not Found");
        assert_eq!(exchange(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").0, "HTTP/1.1 404 Not Found");
        // A keep-alive connection open at shutdown is closed, and the server returns.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        stop.send(()).unwrap();
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await }).expect("the server returns after shutdown").unwrap();
        let mut rest = Vec::new();
        assert!(idle.read_to_end(&mut rest).is_ok(), "the idle connection is closed, not left hanging");
        assert!(std::net::TcpStream::connect(addr).is_err(), "no longer listening");
    }
}
