//! `bench proxy`: the credential proxy against the server directly and peer proxies.

use super::*;

pub(crate) const PROXY_SECONDS: u64 = 3;
/// `[[http]]` allow globs on the ruled host of the proxy bench.
pub(crate) const PATH_RULES: usize = 100;
pub(crate) const PROXY_CONNECTIONS: usize = 8;

/// Sequential GETs on one kept-alive connection for `seconds`: latencies (µs).
pub(crate) fn proxy_latency(addr: SocketAddr, sni: &str, ca: &std::path::Path, seconds: u64) -> Result<Vec<f64>> {
    let config = sbx_net_tests::https::client_config(ca);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut c = sbx_net_tests::https::KeepAlive::connect(addr, sni, config).await?;
        for _ in 0..50 {
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

pub(crate) fn proxy_bench() -> Result<()> {
    use sbx_net_tests::daemon::DaemonHarness;
    use sbx_net_tests::https::{HttpsEcho, TestCa};
    use sbx_net_tests::WorldDns;

    println!("## Credential proxy (`cargo xtask bench proxy`)\n");
    println!("Machine: {} cores, kernel {}.\n", num_cpus(), kernel());
    let mitmdump = std::env::var("SBX_NET_MITMDUMP").unwrap_or_else(|_| "/opt/sbx-net/mitmproxy-venv/bin/mitmdump".into());
    let dir = std::env::temp_dir().join(unique_name("bench-proxy"));
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new(&dir);
    let secret = "sbx-bench-secret-0123456789abcdef";
    std::fs::write(dir.join("token"), secret)?;
    let server: IpAddr = Ipv4Addr::new(198, 51, 100, 40).into();
    let mitm: IpAddr = Ipv4Addr::new(198, 51, 100, 50).into();
    // ruled.test: the same server and credential as api.test, and an
    // `[[http]]` block of PATH_RULES allows, the requests matching only
    // the last (every one before it is tried and fails).
    let mut allows: Vec<String> = (1..PATH_RULES).map(|i| format!("\"GET /v1/service{i}/**\"")).collect();
    allows.push("\"GET /*\"".into());
    let policy = format!(
        "name = \"bench\"\n[network]\ndefault = \"deny\"\nallow = [\"api.test\", \"ruled.test\", \"{server}/32:8443\", \"{mitm}/32:9443\"]\n\
         [[credentials]]\nname = \"api\"\nhosts = [\"api.test\", \"ruled.test\"]\nheader = \"Authorization\"\nformat = \"Bearer {{secret}}\"\nsource = {{ file = \"{}\" }}\n\
         [[http]]\nhosts = [\"ruled.test\"]\nallow = [{}]\n",
        dir.join("token").display(),
        allows.join(", ")
    );
    let upstream = format!("--upstream-dns={}:53", sbx_net_tests::UPLINK_WORLD_V4);
    let upstream_ca = format!("--upstream-ca={}", ca.pem_path.display());
    // A config file (empty: the defaults) the HTTP/2 baseline rewrites.
    let mut h = DaemonHarness::with_args("bench-proxy", &[("bench.toml", policy.as_str())], Some(""), &[upstream.as_str(), upstream_ca.as_str()]);
    h.topology.add_world_address(server);
    h.topology.add_world_address(mitm);
    let _dns = WorldDns::start(&h.topology.world, &["api.test,198.51.100.40,300".into(), "ruled.test,198.51.100.40,300".into()], &[]);
    let server_str = server.to_string();
    let names = ["api.test", "ruled.test", server_str.as_str()];
    let _upstream443 = HttpsEcho::start(&h.topology.world, SocketAddr::new(server, 443), &names, &ca, secret);
    let _upstream8443 = HttpsEcho::start(&h.topology.world, SocketAddr::new(server, 8443), &names, &ca, secret);

    // mitmproxy as a reverse proxy doing the same injection, verifying the
    // upstream against the same test CA.
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir)?;
    let addon = dir.join("inject.py");
    std::fs::write(&addon, format!("def request(flow):\n    flow.request.headers[\"Authorization\"] = \"Bearer {secret}\"\n"))?;
    sbx_net_tests::tools::locate(&mitmdump).map_err(anyhow::Error::msg)?;
    let mut mitm_child = sbx_net_tests::netns_command(h.topology.world.name(), &mitmdump)
        .args(["-q", "--mode", &format!("reverse:https://{server}:8443"), "--listen-host", &mitm.to_string(), "--listen-port", "9443"])
        .args(["--set", &format!("confdir={}", confdir.display())])
        .args(["--set", &format!("ssl_verify_upstream_trusted_ca={}", ca.pem_path.display())])
        .args(["--set", "connection_strategy=lazy"])
        .arg("-s")
        .arg(&addon)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {mitmdump} (cargo xtask bench proxy installs it)"))?;
    let mitm_ca = confdir.join("mitmproxy-ca-cert.pem");
    let started = sbx_net_tests::try_wait_for(Duration::from_secs(30), || {
        (mitm_ca.exists() && sbx_net_tests::tcp_listening_on(h.topology.world.name(), SocketAddr::new(mitm, 9443))).then_some(())
    });
    if started.is_none() {
        let _ = mitm_child.kill();
        bail!("mitmproxy did not start");
    }

    let g = h.create_guest("bench", "bench");
    let guest = NetNs::open(g["netns"].as_str().context("netns")?)?;
    let sandbox_ca = std::path::PathBuf::from(g["ca_cert"].as_str().context("ca_cert")?);
    // Resolve once so the proxy has the name's answer (as a real client would).
    sbx_net_tests::dig(guest.name(), &["api.test"]);
    sbx_net_tests::dig(guest.name(), &["ruled.test"]);
    let ruled_what = format!("sbx-net credential proxy, {PATH_RULES} path rules (request matches the last)");
    let targets: [(&str, &str, SocketAddr, std::path::PathBuf); 4] = [
        ("server directly, no injection (baseline)", "api.test", SocketAddr::new(server, 8443), ca.pem_path.clone()),
        ("sbx-net credential proxy (TLS terminated, injected)", "api.test", SocketAddr::new(server, 443), sandbox_ca.clone()),
        ("mitmproxy reverse proxy (same injection, peer)", "api.test", SocketAddr::new(mitm, 9443), mitm_ca),
        (ruled_what.as_str(), "ruled.test", SocketAddr::new(server, 443), sandbox_ca),
    ];
    let mut rows = Vec::new();
    for (what, sni, addr, ca_path) in &targets {
        let lat = guest.run(|| proxy_latency(*addr, sni, ca_path, PROXY_SECONDS))??;
        let rps = guest.run(|| proxy_throughput(*addr, sni, ca_path, PROXY_SECONDS))??;
        rows.push((*what, percentile(&lat, 0.5), percentile(&lat, 0.99), lat.len(), rps));
    }
    let _ = mitm_child.kill();
    let _ = mitm_child.wait();

    // 8 HTTP/2 streams at once on one guest connection, to an upstream that
    // answers at once and to one that takes 5 ms (as a real API does): as
    // the proxy sends them now (concurrent streams upstream), then with the
    // daemon restarted on the baseline key (one request at a time, as
    // before). The sandbox, its CA and what DNS taught it survive the
    // restart, so only that key differs.
    let h2_paths = [("answers at once", "/bench"), ("answers after 5 ms", "/reflect/delay/5")];
    let proxy = SocketAddr::new(server, 443);
    let sandbox_ca = &targets[1].3;
    let mut concurrent = Vec::new();
    for (_, path) in &h2_paths {
        concurrent.push(guest.run(|| h2_streams(proxy, "api.test", sandbox_ca, path, PROXY_SECONDS))??);
    }
    h.kill_daemon(libc::SIGTERM);
    std::fs::write(h.dir.join("daemon.toml"), "bench_serial_upstream_requests = true\n")?;
    h.start_daemon();
    sbx_net_tests::dig(guest.name(), &["api.test"]);
    let mut serial = Vec::new();
    for (_, path) in &h2_paths {
        serial.push(guest.run(|| h2_streams(proxy, "api.test", sandbox_ca, path, PROXY_SECONDS))??);
    }
    let (b50, b99) = (rows[0].1, rows[0].2);
    println!("### HTTPS GETs on kept-alive connections from a netns guest ({PROXY_SECONDS} s each; requests/s with {PROXY_CONNECTIONS} connections)\n");
    println!("| path | p50 µs | p99 µs | added p50 µs | added p99 µs | sequential requests | requests/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (what, p50, p99, n, rps) in &rows {
        println!("| {what} | {p50:.0} | {p99:.0} | {:+.0} | {:+.0} | {n} | {rps:.0} |", p50 - b50, p99 - b99);
    }
    println!(
        "\nsbx-net / mitmproxy requests/s: **{:.1}×**. Targets: added p50 ≤ 300 µs; ≥ 10× mitmproxy's requests/s.",
        rows[1].4 / rows[2].4
    );
    println!("\n### {PATH_RULES} `[[http]]` path rules on the host, against the same host without rules (same run)\n");
    println!("| host | p50 µs | added p50 µs | requests/s | requests/s vs no rules |");
    println!("|---|---:|---:|---:|---:|");
    let ruled = format!("credential host, {PATH_RULES} allow globs, request matches the last");
    for (what, row) in [("credential host, no rules", &rows[1]), (ruled.as_str(), &rows[3])] {
        println!("| {what} | {:.0} | {:+.0} | {:.0} | {:.2}× |", row.1, row.1 - rows[1].1, row.4, row.4 / rows[1].4);
    }
    println!("\n### {H2_STREAMS} HTTP/2 streams at once on one guest connection to a credential host ({PROXY_SECONDS} s each)\n");
    println!("Before: the daemon restarted with `bench_serial_upstream_requests = true`, which sends the connection's requests upstream one at a time as the proxy did before (the upstream sender's lock held across each send); its bound is one request per upstream round trip, whatever the number of streams. After: each stream its own upstream stream.\n");
    println!("| upstream | before: requests/s | before: p50 µs | after: requests/s | after: p50 µs | after / before |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (((what, _), (before_rps, before_p50)), (after_rps, after_p50)) in h2_paths.iter().zip(&serial).zip(&concurrent) {
        println!("| {what} | {before_rps:.0} | {before_p50:.0} | {after_rps:.0} | {after_p50:.0} | **{:.1}×** |", after_rps / before_rps);
    }
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
