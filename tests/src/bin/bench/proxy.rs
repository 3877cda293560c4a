//! `bench proxy`: the credential proxy against the server directly and peer proxies.

use super::*;

pub(crate) const PROXY_SECONDS: u64 = 2;
/// Alternating rounds of every path (the figures are their medians).
pub(crate) const PROXY_ROUNDS: usize = 5;
/// `[[http]]` allow globs on the ruled host of the proxy bench.
pub(crate) const PATH_RULES: usize = 100;
pub(crate) const PROXY_CONNECTIONS: usize = 8;

/// GETs before the latencies are taken (connection made, caches warm).
pub(crate) const LATENCY_WARMUP: usize = 50;

/// Sequential GETs on one kept-alive connection for `seconds`: latencies (µs).
pub(crate) fn proxy_latency(addr: SocketAddr, sni: &str, ca: &std::path::Path, seconds: u64) -> Result<Vec<f64>> {
    let config = sbx_net_tests::https::client_config(ca);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut c = sbx_net_tests::https::KeepAlive::connect(addr, sni, config).await?;
        for _ in 0..LATENCY_WARMUP {
            c.get("/warm").await?;
        }
        let mut lat = Vec::new();
        let end = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < end {
            let t = Instant::now();
            let status = c.get("/bench").await?;
            if status != 200 {
                bail!("status {status} from {addr}");
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(lat)
    })
}

/// PROXY_CONNECTIONS kept-alive connections in parallel: requests/s.
pub(crate) fn proxy_throughput(addr: SocketAddr, sni: &str, ca: &std::path::Path, seconds: u64) -> Result<f64> {
    let config = sbx_net_tests::https::client_config(ca);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sni = sni.to_string();
    rt.block_on(async move {
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..PROXY_CONNECTIONS {
            let (config, sni) = (config.clone(), sni.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = sbx_net_tests::https::KeepAlive::connect(addr, &sni, config).await?;
                let mut n = 0u64;
                while Instant::now() < end {
                    c.get("/bench").await?;
                    n += 1;
                }
                Ok::<u64, std::io::Error>(n)
            }));
        }
        let start = Instant::now();
        let mut total = 0;
        for t in tasks {
            total += t.await.map_err(|e| anyhow::anyhow!("{e}"))??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64().max(seconds as f64))
    })
}

/// Requests in flight at once on the one HTTP/2 connection.
pub(crate) const H2_STREAMS: usize = 8;

/// H2_STREAMS requests at a time for `path`, on one HTTP/2 connection for
/// `seconds` after a warm-up: requests/s, and the median time of one.
pub(crate) fn h2_streams(addr: SocketAddr, sni: &str, ca: &std::path::Path, path: &str, seconds: u64) -> Result<(f64, f64)> {
    use http_body_util::BodyExt;
    let config = sbx_net_tests::https::client_config_with(&[ca], &[b"h2"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let uri = format!("https://{sni}{path}");
    let sni = sni.to_string();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(sni)?;
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            bail!("{addr} did not choose HTTP/2");
        }
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let get = |mut sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>, uri: String| async move {
            let req = hyper::Request::get(uri).body(http_body_util::Empty::new())?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if status != 200 {
                bail!("status {status}");
            }
            Ok::<_, anyhow::Error>(())
        };
        for _ in 0..H2_STREAMS {
            get(sender.clone(), uri.clone()).await?;
        }
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..H2_STREAMS {
            let (sender, uri) = (sender.clone(), uri.clone());
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    get(sender.clone(), uri.clone()).await?;
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, anyhow::Error>(times)
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await??);
        }
        let rps = times.len() as f64 / start.elapsed().as_secs_f64();
        Ok((rps, median(times)))
    })
}

/// A peer proxy (nginx, haproxy) run by the bench as its own foreground
/// child in the world namespace, its configuration, certificates and logs
/// in `dir`: stopped (TERM, then KILL after a deadline) and `dir` removed
/// on drop.
struct PeerProcess {
    name: &'static str,
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// Where the peer writes its errors (shown when it fails to start).
    log: std::path::PathBuf,
}

impl PeerProcess {
    /// Spawns `command` and waits (bounded) until it listens on `addr` in
    /// namespace `ns`.
    fn start(name: &'static str, mut command: std::process::Command, dir: std::path::PathBuf, log: std::path::PathBuf, ns: &str, addr: SocketAddr) -> Result<PeerProcess> {
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut peer = PeerProcess { name, child, dir, log };
        let started = sbx_net_tests::try_wait_for(Duration::from_secs(15), || {
            if matches!(peer.child.try_wait(), Ok(Some(_))) {
                return Some(false);
            }
            sbx_net_tests::tcp_listening_on(ns, addr).then_some(true)
        });
        if started != Some(true) {
            let log = std::fs::read_to_string(&peer.log).unwrap_or_default();
            let stderr = std::fs::read_to_string(peer.dir.join("stderr.log")).unwrap_or_default();
            bail!("{name} did not start listening on {addr}:\n{stderr}\n{log}");
        }
        Ok(peer)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers (a KILLed master
        // would leave them behind).
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let stopped = sbx_net_tests::try_wait_for(Duration::from_secs(5), || matches!(self.child.try_wait(), Ok(Some(_))).then_some(()));
        if stopped.is_none() {
            eprintln!("{} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Worker processes (nginx) and threads (haproxy): the sbx-net data plane
/// serves the proxy on a 2-worker tokio runtime, so every proxy gets 2.
const PEER_WORKERS: usize = 2;

/// nginx terminating TLS for api.test (a leaf from the test CA) at
/// `listen`, HTTP/1.1 and HTTP/2, setting Authorization and forwarding
/// over verified TLS (SNI api.test) to `upstream` on kept-alive
/// connections.
fn start_nginx(ns: &str, dir: std::path::PathBuf, ca: &sbx_net_tests::https::TestCa, listen: SocketAddr, upstream: SocketAddr, secret: &str) -> Result<PeerProcess> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let (cert, key) = ca.leaf_pem_files(&dir, &["api.test"]);
    let d = dir.display();
    let conf = format!(
        "worker_processes {PEER_WORKERS};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
         \x20 keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
         \x20 upstream api {{ server {upstream}; keepalive 32; keepalive_requests 10000000; }}\n\
         \x20 server {{\n    listen {listen} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};\n\
         \x20   location / {{\n      proxy_pass https://api;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host api.test;\n\
         \x20     proxy_set_header Authorization \"Bearer {secret}\";\n      proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {};\n\
         \x20     proxy_ssl_server_name on;\n      proxy_ssl_name api.test;\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n}}\n",
        cert.display(),
        key.display(),
        ca.pem_path.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut command = sbx_net_tests::netns_command(ns, "nginx");
    command.arg("-p").arg(&dir).arg("-c").arg(&conf_path).arg("-e").arg(dir.join("error.log")).args(["-g", "daemon off;"]);
    let log = dir.join("error.log");
    PeerProcess::start("nginx", command, dir, log, ns, listen)
}

/// haproxy in HTTP mode: TLS for api.test at `listen` (ALPN h2 and
/// http/1.1), Authorization set, the server over verified TLS (SNI
/// api.test, ALPN as sbx-net offers it) with connections reused.
fn start_haproxy(ns: &str, dir: std::path::PathBuf, ca: &sbx_net_tests::https::TestCa, listen: SocketAddr, upstream: SocketAddr, secret: &str) -> Result<PeerProcess> {
    let (cert, key) = ca.leaf_pem_files(&dir, &["api.test"]);
    // haproxy reads the certificate and its key from one file.
    let bundle = dir.join("leaf-bundle.pem");
    std::fs::write(&bundle, [std::fs::read(&cert)?, std::fs::read(&key)?].concat())?;
    let conf = format!(
        "global\n  nbthread {PEER_WORKERS}\n  maxconn 4096\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend bench\n  bind {listen} ssl crt {} alpn h2,http/1.1\n  http-request set-header Authorization \"Bearer {secret}\"\n  default_backend api\n\n\
         backend api\n  http-reuse always\n  server up {upstream} ssl verify required ca-file {} sni str(api.test) verifyhost api.test alpn h2,http/1.1\n",
        bundle.display(),
        ca.pem_path.display()
    );
    let conf_path = dir.join("haproxy.cfg");
    std::fs::write(&conf_path, conf)?;
    let mut command = sbx_net_tests::netns_command(ns, "haproxy");
    command.arg("-db").arg("-f").arg(&conf_path);
    let log = dir.join("stderr.log");
    PeerProcess::start("haproxy", command, dir, log, ns, listen)
}

/// From the calling thread's namespace: one GET through `addr` over
/// HTTP/1.1 and one over HTTP/2; fails unless the upstream (the echo
/// server) reported the injected secret in Authorization both times.
fn check_injects(what: &str, addr: SocketAddr, sni: &str, ca: &std::path::Path) -> Result<()> {
    let want = "authorization: <injected>";
    let raw = format!("GET /check HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    let got = sbx_net_tests::https::exchange(addr, Some(sni), sbx_net_tests::https::client_config(ca), raw.as_bytes(), Duration::from_secs(3));
    let responses = sbx_net_tests::https::parse_responses(&got);
    let body = responses.first().map(|r| String::from_utf8_lossy(&r.body).into_owned()).unwrap_or_default();
    if !body.lines().any(|l| l.eq_ignore_ascii_case(want)) {
        bail!("{what} over HTTP/1.1: the upstream did not see the injected Authorization; it saw:\n{}", String::from_utf8_lossy(&got));
    }
    let req = hyper::Request::get(format!("https://{sni}/check")).body(http_body_util::Full::new(hyper::body::Bytes::new()))?;
    let (parts, body, _) = sbx_net_tests::https::h2_request(addr, sni, sbx_net_tests::https::client_config_with(&[ca], &[b"h2"]), req).map_err(anyhow::Error::msg)?;
    let body = String::from_utf8_lossy(&body);
    if parts.status != 200 || !body.lines().any(|l| l.eq_ignore_ascii_case(want)) || !body.contains("version: HTTP/") {
        bail!("{what} over HTTP/2: status {}, the upstream did not see the injected Authorization; it saw:\n{body}", parts.status);
    }
    Ok(())
}

/// A temporary directory, removed on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One round's measurements of one path.
#[derive(Clone, Copy, Debug)]
struct PathRun {
    h1_p50: f64,
    h1_p99: f64,
    h1_rps: f64,
    h2_rps: f64,
    h2_p50: f64,
    /// CPU time of the proxy's processes per request (µs) under the
    /// HTTP/1.1 and HTTP/2 loads; NaN for the server directly.
    h1_cpu: f64,
    h2_cpu: f64,
    /// Of those, user space (the rest is the kernel: sockets, TCP, the
    /// packet path charged to the process that sends).
    h1_user: f64,
    h2_user: f64,
    /// The whole machine's busy CPU time per request (µs): client, server,
    /// proxy and the kernel between them. On shared cores requests/s
    /// follows it, not only the proxy's own share.
    h1_machine: f64,
    h2_machine: f64,
    /// The proxy's CPU time per request (µs), and of it user space, under
    /// the sequential GETs the p50 is measured on: one request at a time,
    /// so every bit of it is on the request's path (and the machine sleeps
    /// and wakes between requests, as it does not under load).
    seq_cpu: f64,
    seq_user: f64,
}

pub(crate) fn proxy_bench() -> Result<()> {
    use sbx_net_tests::daemon::DaemonHarness;
    use sbx_net_tests::https::{HttpsEcho, TestCa};
    use sbx_net_tests::WorldDns;

    println!("## Credential proxy (`cargo xtask bench proxy`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let mitmdump = std::env::var("SBX_NET_MITMDUMP").unwrap_or_else(|_| "/opt/sbx-net/mitmproxy-venv/bin/mitmdump".into());
    let dir = std::env::temp_dir().join(unique_name("bench-proxy"));
    std::fs::create_dir_all(&dir)?;
    // Removed however the bench ends (declared first: dropped last, after
    // the daemon and the peers that use it).
    let _remove_dir = RemoveDir(dir.clone());
    let ca = TestCa::new(&dir);
    let secret = "sbx-bench-secret-0123456789abcdef";
    std::fs::write(dir.join("token"), secret)?;
    let server: IpAddr = Ipv4Addr::new(198, 51, 100, 40).into();
    let mitm: IpAddr = Ipv4Addr::new(198, 51, 100, 50).into();
    let nginx: IpAddr = Ipv4Addr::new(198, 51, 100, 60).into();
    let haproxy: IpAddr = Ipv4Addr::new(198, 51, 100, 70).into();
    // ruled.test: the same server and credential as api.test, and an
    // `[[http]]` block of PATH_RULES allows, the requests matching only
    // the last (every one before it is tried and fails).
    let mut allows: Vec<String> = (1..PATH_RULES).map(|i| format!("\"GET /v1/service{i}/**\"")).collect();
    allows.push("\"GET /*\"".into());
    let policy = format!(
        "name = \"bench\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"ruled.test\", \"{server}/32:8443\", \"{mitm}/32:9443\", \"{nginx}/32:9443\", \"{haproxy}/32:9443\"]\n\
         [[credentials]]\nname = \"api\"\nhosts = [\"api.test\", \"ruled.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n\
         [[http]]\nhosts = [\"ruled.test\"]\nallow = [{}]\n",
        dir.join("token").display(),
        allows.join(", ")
    );
    let upstream = format!("--upstream-dns={}:53", sbx_net_tests::UPLINK_WORLD_V4);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    // A config file (empty: the defaults) the HTTP/2 baseline rewrites.
    let mut h = DaemonHarness::with_args("bench-proxy", &[("bench.toml", policy.as_str())], Some(""), &[upstream.as_str(), upstream_ca.as_str()]);
    for a in [server, mitm, nginx, haproxy] {
        h.topology.add_world_address(a);
    }
    let _dns = WorldDns::start(&h.topology.world, &["api.test,198.51.100.40,300".into(), "ruled.test,198.51.100.40,300".into()], &[]);
    let server_str = server.to_string();
    let names = ["api.test", "ruled.test", server_str.as_str()];
    let _upstream443 = HttpsEcho::start(&h.topology.world, SocketAddr::new(server, 443), &names, &ca, secret);
    let _upstream8443 = HttpsEcho::start(&h.topology.world, SocketAddr::new(server, 8443), &names, &ca, secret);
    let world = h.topology.world.name().to_string();
    let direct = SocketAddr::new(server, 8443);
    let nginx_peer = start_nginx(&world, dir.join("nginx"), &ca, SocketAddr::new(nginx, 9443), direct, secret)?;
    let haproxy_peer = start_haproxy(&world, dir.join("haproxy"), &ca, SocketAddr::new(haproxy, 9443), direct, secret)?;

    // mitmproxy as a reverse proxy doing the same injection, verifying the
    // upstream against the same test CA.
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir)?;
    let addon = dir.join("inject.py");
    std::fs::write(&addon, format!("def request(flow):\n    flow.request.headers[\"Authorization\"] = \"Bearer {secret}\"\n"))?;
    sbx_net_tests::tools::locate(&mitmdump).map_err(anyhow::Error::msg)?;
    let mut mitm_command = sbx_net_tests::netns_command(&world, &mitmdump);
    mitm_command
        .args(["-q", "--mode", &format!("reverse:https://{server}:8443"), "--listen-host", &mitm.to_string(), "--listen-port", "9443"])
        .args(["--set", &format!("confdir={}", confdir.display())])
        .args(["--set", &format!("ssl_verify_upstream_trusted_ca={}", ca.pem_path.display())])
        .args(["--set", "connection_strategy=lazy"])
        .arg("-s")
        .arg(&addon);
    let mitm_log = confdir.join("stderr.log");
    let mitm_peer = PeerProcess::start("mitmproxy", mitm_command, confdir.clone(), mitm_log, &world, SocketAddr::new(mitm, 9443))?;
    let mitm_ca = confdir.join("mitmproxy-ca-cert.pem");
    if sbx_net_tests::try_wait_for(Duration::from_secs(10), || mitm_ca.exists().then_some(())).is_none() {
        bail!("mitmproxy wrote no CA certificate");
    }

    let g = h.create_guest("bench", "bench");
    let guest = NetNs::open(g["netns"].as_str().context("netns")?)?;
    let sandbox_ca = std::path::PathBuf::from(g["ca_cert"].as_str().context("ca_cert")?);
    // Resolve once so the proxy has the name's answer (as a real client would).
    sbx_net_tests::dig(guest.name(), &["api.test"]);
    sbx_net_tests::dig(guest.name(), &["ruled.test"]);
    let ruled_what = format!("sbx-net credential proxy, {PATH_RULES} path rules (request matches the last)");
    // (table label, figure key, SNI, address, CA the client trusts)
    let targets: [(&str, &str, &str, SocketAddr, std::path::PathBuf); 6] = [
        ("server directly, no injection (baseline)", "direct", "api.test", direct, ca.pem_path.clone()),
        ("sbx-net credential proxy (TLS terminated, injected)", "sbx-net", "api.test", SocketAddr::new(server, 443), sandbox_ca.clone()),
        ("nginx reverse proxy (same injection, peer)", "nginx", "api.test", SocketAddr::new(nginx, 9443), ca.pem_path.clone()),
        ("haproxy reverse proxy (same injection, peer)", "haproxy", "api.test", SocketAddr::new(haproxy, 9443), ca.pem_path.clone()),
        ("mitmproxy reverse proxy (same injection, peer)", "mitmproxy", "api.test", SocketAddr::new(mitm, 9443), mitm_ca.clone()),
        (ruled_what.as_str(), "sbx-net ruled", "ruled.test", SocketAddr::new(server, 443), sandbox_ca.clone()),
    ];
    // Every proxy must really inject before it is measured.
    for (what, key, sni, addr, ca_path) in &targets[1..] {
        guest.run(|| check_injects(what, *addr, sni, ca_path)).with_context(|| format!("checking {key}"))??;
    }
    // Whose CPU time each path's requests cost (the echo server runs in
    // this process: none for the direct path).
    let sbx_pid = dataplane_pid(&h.state_dir);
    let pids = [None, sbx_pid, Some(nginx_peer.child.id()), Some(haproxy_peer.child.id()), Some(mitm_peer.child.id()), sbx_pid];
    let runs = alternating(targets.len(), PROXY_ROUNDS, |k| {
        let (_, key, sni, addr, ca_path) = &targets[k];
        let pid = pids[k];
        let cpu = || pid.map_or((f64::NAN, f64::NAN), tree_cpu_us);
        let before = cpu();
        let lat = guest.run(|| proxy_latency(*addr, sni, ca_path, PROXY_SECONDS))?.with_context(|| format!("{key}: HTTP/1.1 latency"))?;
        let after = cpu();
        // The warm-up's requests are in the CPU time too.
        let seq_requests = (lat.len() + LATENCY_WARMUP) as f64;
        let (seq_cpu, seq_user) = ((after.0 - before.0) / seq_requests, (after.1 - before.1) / seq_requests);
        let (before, machine_before) = (cpu(), machine_busy_us());
        let h1_rps = guest.run(|| proxy_throughput(*addr, sni, ca_path, PROXY_SECONDS))?.with_context(|| format!("{key}: HTTP/1.1 requests/s"))?;
        let (after, machine_after) = (cpu(), machine_busy_us());
        let h1_requests = h1_rps * PROXY_SECONDS as f64;
        let (h1_cpu, h1_user) = ((after.0 - before.0) / h1_requests, (after.1 - before.1) / h1_requests);
        let h1_machine = (machine_after - machine_before) / h1_requests;
        let (before, machine_before) = (cpu(), machine_busy_us());
        let (h2_rps, h2_p50) = guest.run(|| h2_streams(*addr, sni, ca_path, "/bench", PROXY_SECONDS))?.with_context(|| format!("{key}: HTTP/2 streams"))?;
        let (after, machine_after) = (cpu(), machine_busy_us());
        let h2_requests = h2_rps * PROXY_SECONDS as f64;
        let (h2_cpu, h2_user) = ((after.0 - before.0) / h2_requests, (after.1 - before.1) / h2_requests);
        let h2_machine = (machine_after - machine_before) / h2_requests;
        Ok(PathRun { h1_p50: percentile(&lat, 0.5), h1_p99: percentile(&lat, 0.99), h1_rps, h2_rps, h2_p50, h1_cpu, h2_cpu, h1_user, h2_user, h1_machine, h2_machine, seq_cpu, seq_user })
    })?;
    drop(mitm_peer);
    drop(nginx_peer);
    drop(haproxy_peer);

    // 8 HTTP/2 streams at once on one guest connection, to an upstream that
    // answers at once and to one that takes 5 ms (as a real API does): as
    // the proxy sends them now (concurrent streams upstream), then with the
    // daemon restarted on the baseline key (one request at a time, as
    // before). The sandbox, its CA and what DNS taught it survive the
    // restart, so only that key differs.
    let h2_paths = [("answers at once", "/bench"), ("answers after 5 ms", "/reflect/delay/5")];
    let proxy = SocketAddr::new(server, 443);
    let mut concurrent = Vec::new();
    for (_, path) in &h2_paths {
        concurrent.push(guest.run(|| h2_streams(proxy, "api.test", &sandbox_ca, path, PROXY_SECONDS))??);
    }
    h.kill_daemon(libc::SIGTERM);
    std::fs::write(h.dir.join("daemon.toml"), "bench_serial_upstream_requests = true\n")?;
    h.start_daemon();
    sbx_net_tests::dig(guest.name(), &["api.test"]);
    let mut serial = Vec::new();
    for (_, path) in &h2_paths {
        serial.push(guest.run(|| h2_streams(proxy, "api.test", &sandbox_ca, path, PROXY_SECONDS))??);
    }

    let field = |k: usize, f: fn(&PathRun) -> f64| runs[k].iter().map(f).collect::<Vec<f64>>();
    // Added p50: each round's p50 less the same round's direct p50.
    let added = |k: usize, f: fn(&PathRun) -> f64| runs[k].iter().zip(&runs[0]).map(|(r, d)| f(r) - f(d)).collect::<Vec<f64>>();
    println!("### HTTPS GETs on kept-alive connections from a netns guest\n");
    println!(
        "Medians of {PROXY_ROUNDS} alternating rounds (min–max), {PROXY_SECONDS} s per measurement. HTTP/1.1: p50/p99 of sequential GETs on one connection; requests/s with {PROXY_CONNECTIONS} connections. HTTP/2: {H2_STREAMS} streams at once on one connection (requests/s, p50 of one request under that load). nginx runs {PEER_WORKERS} worker processes, haproxy {PEER_WORKERS} threads, sbx-net's data plane one serving thread per CPU, each serving its connections to the end.\n"
    );
    println!("| path | h1 p50 µs | h1 added p50 µs | h1 p99 µs | h1 requests/s | h2 requests/s | h2 p50 µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut figures = Vec::new();
    for (k, (what, key, ..)) in targets.iter().enumerate() {
        let h1_p50 = record("proxy", &format!("proxy h1 p50 {key}"), "µs", Better::Lower, &field(k, |r| r.h1_p50));
        let h1_added = record("proxy", &format!("proxy h1 added p50 {key}"), "µs", Better::Lower, &added(k, |r| r.h1_p50));
        let h1_p99 = record("proxy", &format!("proxy h1 p99 {key}"), "µs", Better::Lower, &field(k, |r| r.h1_p99));
        let h1_rps = record("proxy", &format!("proxy h1 requests/s {key}"), "requests/s", Better::Higher, &field(k, |r| r.h1_rps));
        let h2_rps = record("proxy", &format!("proxy h2 requests/s {key}"), "requests/s", Better::Higher, &field(k, |r| r.h2_rps));
        let h2_p50 = record("proxy", &format!("proxy h2 p50 {key}"), "µs", Better::Lower, &field(k, |r| r.h2_p50));
        println!("| {what} | {} | {} | {} | {} | {} | {} |", h1_p50.spread(0), h1_added.spread(0), h1_p99.spread(0), h1_rps.spread(0), h2_rps.spread(0), h2_p50.spread(0));
        figures.push((h1_added, h1_rps, h2_rps, h2_p50));
    }
    // Ratios per round (each against the same round's peer), then their median.
    let ratio = |a: usize, b: usize, f: fn(&PathRun) -> f64| runs[a].iter().zip(&runs[b]).map(|(x, y)| f(x) / f(y)).collect::<Vec<f64>>();
    let (sbx, ngx, hap, mtm) = (1, 2, 3, 4);
    let h1_vs_nginx = record("proxy", "proxy h1 requests/s sbx-net/nginx", "×", Better::Higher, &ratio(sbx, ngx, |r| r.h1_rps));
    let h2_vs_nginx = record("proxy", "proxy h2 requests/s sbx-net/nginx", "×", Better::Higher, &ratio(sbx, ngx, |r| r.h2_rps));
    let h1_vs_haproxy = record("proxy", "proxy h1 requests/s sbx-net/haproxy", "×", Better::Higher, &ratio(sbx, hap, |r| r.h1_rps));
    let h2_vs_haproxy = record("proxy", "proxy h2 requests/s sbx-net/haproxy", "×", Better::Higher, &ratio(sbx, hap, |r| r.h2_rps));
    let vs_mitm = record("proxy", "proxy h1 requests/s sbx-net/mitmproxy", "×", Better::Higher, &ratio(sbx, mtm, |r| r.h1_rps));
    let of_direct = record("proxy", "proxy h1 requests/s sbx-net/direct", "×", Better::Higher, &ratio(sbx, 0, |r| r.h1_rps));
    let p50_vs_nginx = record("proxy", "proxy h1 added p50 sbx-net-nginx", "µs", Better::Lower, &runs[sbx].iter().zip(&runs[ngx]).map(|(x, y)| x.h1_p50 - y.h1_p50).collect::<Vec<f64>>());
    println!(
        "\nsbx-net / nginx requests/s: HTTP/1.1 **{}×**, HTTP/2 **{}×**; sbx-net / haproxy: HTTP/1.1 {}×, HTTP/2 {}×; sbx-net / mitmproxy (HTTP/1.1): {}×; sbx-net / direct (HTTP/1.1): {}×. sbx-net's h1 p50 less nginx's: {} µs.\n",
        h1_vs_nginx.spread(2),
        h2_vs_nginx.spread(2),
        h1_vs_haproxy.spread(2),
        h2_vs_haproxy.spread(2),
        vs_mitm.spread(1),
        of_direct.spread(2),
        p50_vs_nginx.spread(0)
    );
    check_target("proxy", "h1 requests/s ≥ 1× nginx", format!("{:.2}×", h1_vs_nginx.median()), h1_vs_nginx.median() >= 1.0);
    check_target("proxy", "h2 requests/s ≥ 1× nginx", format!("{:.2}×", h2_vs_nginx.median()), h2_vs_nginx.median() >= 1.0);
    let (ours, theirs) = (figures[sbx].0.median(), figures[ngx].0.median());
    check_target("proxy", "added p50 ≤ nginx's", format!("{ours:+.0} µs vs nginx {theirs:+.0} µs"), ours <= theirs);
    check_target("proxy", "added p50 ≤ 300 µs", format!("{ours:+.0} µs"), ours <= 300.0);
    check_target("proxy", "≥ 10× mitmproxy's requests/s", format!("{:.1}×", vs_mitm.median()), vs_mitm.median() >= 10.0);

    println!("\n### CPU time per request of each proxy's processes (µs; the same rounds, on {} shared cores)\n", num_cpus());
    println!("The machine columns are every process's busy time (`/proc/stat`) per request: the client and the echo server (one thread) are in them for every path, the direct one included.\n");
    println!("| path | HTTP/1.1, {PROXY_CONNECTIONS} connections | of which user space | machine | HTTP/2, {H2_STREAMS} streams | of which user space | machine |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (k, (what, key, ..)) in targets.iter().enumerate() {
        let h1_machine = record("proxy", &format!("proxy h1 machine cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h1_machine));
        let h2_machine = record("proxy", &format!("proxy h2 machine cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h2_machine));
        if k == 0 {
            println!("| {what} | – | – | {} | – | – | {} |", h1_machine.spread(1), h2_machine.spread(1));
            continue;
        }
        let h1 = record("proxy", &format!("proxy h1 cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h1_cpu));
        let h1_user = record("proxy", &format!("proxy h1 user cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h1_user));
        let h2 = record("proxy", &format!("proxy h2 cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h2_cpu));
        let h2_user = record("proxy", &format!("proxy h2 user cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.h2_user));
        println!("| {what} | {} | {} | {} | {} | {} | {} |", h1.spread(1), h1_user.spread(1), h1_machine.spread(1), h2.spread(1), h2_user.spread(1), h2_machine.spread(1));
    }

    println!("\n### Where a request's added latency goes: each proxy's CPU time per request under the sequential GETs (µs, the same rounds)\n");
    println!("One request at a time: all of the proxy's work is on the request's path, and it sleeps and wakes twice per request (the guest's request, the server's answer). The kernel's share is the sockets, the packet path charged to the sender, and the sleeps and wakes; user space is the proxy's own code.\n");
    println!("| path | added p50 | CPU per request | of which user space | of which the kernel |");
    println!("|---|---:|---:|---:|---:|");
    for (k, (what, key, ..)) in targets.iter().enumerate().skip(1) {
        let seq = record("proxy", &format!("proxy h1 sequential cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.seq_cpu));
        let seq_user = record("proxy", &format!("proxy h1 sequential user cpu/request {key}"), "µs", Better::Lower, &field(k, |r| r.seq_user));
        let seq_kernel = Figure { suite: "proxy".into(), name: String::new(), unit: String::new(), better: Better::Lower, runs: field(k, |r| r.seq_cpu - r.seq_user) };
        println!("| {what} | {} | {} | {} | {} |", figures[k].0.spread(0), seq.spread(1), seq_user.spread(1), seq_kernel.spread(1));
    }

    println!("\n### {PATH_RULES} `[[http]]` path rules on the host, against the same host without rules (same rounds)\n");
    println!("| host | h1 added p50 µs | h1 requests/s | requests/s vs no rules |");
    println!("|---|---:|---:|---:|");
    let ruled = format!("credential host, {PATH_RULES} allow globs, request matches the last");
    let ruled_ratio = Figure { suite: "proxy".into(), name: String::new(), unit: String::new(), better: Better::Higher, runs: ratio(5, sbx, |r| r.h1_rps) };
    for (what, k) in [("credential host, no rules", sbx), (ruled.as_str(), 5)] {
        let ratio = if k == sbx { "1.00×".to_string() } else { format!("{}×", ruled_ratio.spread(2)) };
        println!("| {what} | {} | {} | {ratio} |", figures[k].0.spread(0), figures[k].1.spread(0));
    }
    println!("\n### {H2_STREAMS} HTTP/2 streams at once on one guest connection to a credential host ({PROXY_SECONDS} s each, one run)\n");
    println!("Before: the daemon restarted with `bench_serial_upstream_requests = true`, which sends the connection's requests upstream one at a time as the proxy did before (the upstream sender's lock held across each send); its bound is one request per upstream round trip, whatever the number of streams. After: each stream its own upstream stream.\n");
    println!("| upstream | before: requests/s | before: p50 µs | after: requests/s | after: p50 µs | after / before |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (((what, _), (before_rps, before_p50)), (after_rps, after_p50)) in h2_paths.iter().zip(&serial).zip(&concurrent) {
        println!("| {what} | {before_rps:.0} | {before_p50:.0} | {after_rps:.0} | {after_p50:.0} | **{:.1}×** |", after_rps / before_rps);
    }
    drop(h);
    Ok(())
}
