//! The fleet's connection to etcd as its operators secure it: TLS with
//! client certificates (etcds://, --etcd-cacert/--etcd-cert/--etcd-key) and
//! etcd's users and roles (--etcd-user, --etcd-password-file), against a
//! real etcd on loopback in a namespace of the test. A wrong CA, a missing
//! client certificate, a wrong password or a read-only role are refused
//! by the store, and the CLI says so with a failing exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sbx_net_tests::daemon::sbx_net_bin;
use sbx_net_tests::etcd::{EtcdServer, TlsFiles};
use sbx_net_tests::{require_root, tcp_connects, unique_name, wait_for, Background, UPLINK_HOST_V4};
use sbx_net_tests::daemon::DaemonHarness;
use sbx_vmm::{NetNs, Netlink};

const WEB: &str = "name = \"web\"\n[network]\nallow = [\"192.0.2.0/24\"]\n";

/// A namespace with loopback up, removed on drop.
fn namespace(tag: &str) -> NetNs {
    let ns = NetNs::create(&unique_name(tag)).expect("netns");
    let nl = Netlink::in_namespace(&ns).expect("netlink");
    nl.set_up(nl.link_index("lo").expect("lo")).expect("lo up");
    ns
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(tag));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn sbx_net(ns: &NetNs, args: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", ns.name()]).arg(sbx_net_bin()).args(args).env_remove("SBX_NET_ETCD_PASSWORD").output().expect("run sbx-net")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn flags(files: &TlsFiles, ca: &Path) -> Vec<String> {
    vec![
        format!("--etcd-cacert={}", ca.display()),
        format!("--etcd-cert={}", files.client_cert.display()),
        format!("--etcd-key={}", files.client_key.display()),
    ]
}

#[test]
fn tls_with_client_certificates() {
    require_root();
    let ns = namespace("etls");
    let dir = scratch("etls");
    let policy = dir.join("web.toml");
    std::fs::write(&policy, WEB).unwrap();
    let files = TlsFiles::generate(&dir.join("pki"));
    let stranger = TlsFiles::generate(&dir.join("other-pki"));
    let etcd = EtcdServer::start_with(ns.name(), Some(files.clone()));
    let url = etcd.url("fleet");
    assert!(url.starts_with("etcds://"), "{url}");
    let push = |extra: &[String]| {
        let mut args: Vec<String> = vec!["policy".into(), "push".into(), policy.display().to_string(), "--etcd".into(), url.clone()];
        args.extend(extra.iter().cloned());
        sbx_net(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Plain gRPC to a TLS port, no client certificate, a CA that did not
    // sign the server: each refused, nothing written.
    let plain = sbx_net(&ns, &["policy", "push", policy.to_str().unwrap(), "--etcd", &etcd.url("fleet").replace("etcds://", "etcd://")]);
    assert!(!plain.status.success(), "plaintext to a TLS etcd: {}", text(&plain));
    let no_cert = push(&[format!("--etcd-cacert={}", files.ca.display())]);
    assert!(!no_cert.status.success(), "no client certificate: {}", text(&no_cert));
    let wrong_ca = push(&flags(&files, &stranger.ca));
    assert!(!wrong_ca.status.success(), "server certificate from an untrusted CA: {}", text(&wrong_ca));
    assert!(text(&wrong_ca).contains("etcd"), "the failure names the store: {}", text(&wrong_ca));
    assert_eq!(etcd.get("/fleet/policies/all/web"), None, "nothing was written by a refused push");
    let mixed = sbx_net(&ns, &["policy", "push", policy.to_str().unwrap(), "--etcd", &etcd.url("fleet").replace("etcds://", "etcd://"), &format!("--etcd-cacert={}", files.ca.display())]);
    assert!(text(&mixed).contains("etcds://"), "TLS options on a plain source are refused: {}", text(&mixed));

    // The right CA and client certificate.
    let ok = push(&flags(&files, &files.ca));
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(etcd.get("/fleet/policies/all/web").as_deref(), Some(WEB.trim_end()));

    // Hosts watch over TLS too: two light hosts report the policy in force.
    let mut light_args: Vec<String> = vec!["__fleet-light-hosts".into(), "--etcd".into(), url.clone(), "--count".into(), "2".into(), "--name-prefix".into(), "tls-".into()];
    light_args.extend(flags(&files, &files.ca));
    let mut hosts = Background(
        Command::new("ip").args(["netns", "exec", ns.name()]).arg(sbx_net_bin()).args(&light_args).spawn().expect("light hosts"),
    );
    let status_args = {
        let mut a: Vec<String> = vec!["fleet".into(), "status".into(), "--json".into(), "--etcd".into(), url.clone()];
        a.extend(flags(&files, &files.ca));
        a
    };
    let status: serde_json::Value = wait_for(Duration::from_secs(20), "two light hosts with web in force over TLS", || {
        let out = sbx_net(&ns, &status_args.iter().map(String::as_str).collect::<Vec<_>>());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let in_force = |h: &serde_json::Value| h["connected"] == true && h["in_force"]["/fleet/policies/all/web"].is_i64();
        (v["hosts"].as_array()?.iter().filter(|h| in_force(h)).count() == 2).then_some(v)
    });
    assert!(status["hosts"].as_array().unwrap().iter().all(|h| h["rejected"].as_array().is_some_and(Vec::is_empty)), "{status}");
    hosts.assert_running("light hosts");
    drop(hosts);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn etcd_users_and_roles() {
    require_root();
    let ns = namespace("eauth");
    let dir = scratch("eauth");
    let policy = dir.join("web.toml");
    std::fs::write(&policy, WEB).unwrap();
    let mut etcd = EtcdServer::start(ns.name());
    etcd.enable_auth("s3cret-root");
    // A reader: may read the fleet's keys, not write them.
    for args in [
        vec!["user", "add", "reader", "--new-user-password=r3ad"],
        vec!["role", "add", "fleet-read"],
        vec!["role", "grant-permission", "fleet-read", "--prefix=true", "read", "/fleet/"],
        vec!["user", "grant-role", "reader", "fleet-read"],
    ] {
        let out = etcd.etcdctl(&args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    }
    let password_file = |name: &str, password: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{password}\n")).unwrap();
        p.display().to_string()
    };
    let (root_pw, wrong_pw, reader_pw) = (password_file("root", "s3cret-root"), password_file("wrong", "guess"), password_file("reader", "r3ad"));
    let url = etcd.url("fleet");
    let push = |extra: &[&str]| {
        let mut args = vec!["policy", "push", policy.to_str().unwrap(), "--etcd", &url];
        args.extend_from_slice(extra);
        sbx_net(&ns, &args)
    };

    let anonymous = push(&[]);
    assert!(!anonymous.status.success(), "no user: {}", text(&anonymous));
    let wrong = push(&["--etcd-user", "root", "--etcd-password-file", &wrong_pw]);
    assert!(!wrong.status.success(), "wrong password: {}", text(&wrong));
    assert!(text(&wrong).to_lowercase().contains("authentication failed"), "{}", text(&wrong));
    let reader = push(&["--etcd-user", "reader", "--etcd-password-file", &reader_pw]);
    assert!(!reader.status.success(), "a read-only role cannot push: {}", text(&reader));
    assert!(text(&reader).to_lowercase().contains("permission denied"), "{}", text(&reader));
    let missing = sbx_net(&ns, &["policy", "push", policy.to_str().unwrap(), "--etcd", &url, "--etcd-user", "root"]);
    assert!(text(&missing).contains("SBX_NET_ETCD_PASSWORD"), "a user without a password says where it goes: {}", text(&missing));
    assert_eq!(etcd.get("/fleet/policies/all/web"), None, "nothing was written by a refused push");

    let root = push(&["--etcd-user", "root", "--etcd-password-file", &root_pw]);
    assert!(root.status.success(), "{}", text(&root));
    assert_eq!(etcd.get("/fleet/policies/all/web").as_deref(), Some(WEB.trim_end()));
    // The reader may look at the fleet.
    let status = sbx_net(&ns, &["fleet", "status", "--etcd", &url, "--etcd-user", "reader", "--etcd-password-file", &reader_pw]);
    assert!(status.status.success(), "{}", text(&status));
    let env_password = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(sbx_net_bin())
        .args(["fleet", "status", "--etcd", &url, "--etcd-user", "reader"])
        .env("SBX_NET_ETCD_PASSWORD", "r3ad")
        .output()
        .expect("run sbx-net");
    assert!(env_password.status.success(), "the password from the environment: {}", text(&env_password));

    // What a host needs (README): read the policies, write its status.
    for args in [
        vec!["user", "add", "host", "--new-user-password=h0st"],
        vec!["role", "add", "fleet-host"],
        vec!["role", "grant-permission", "fleet-host", "--prefix=true", "read", "/fleet/policies/"],
        vec!["role", "grant-permission", "fleet-host", "--prefix=true", "readwrite", "/fleet/status/"],
        vec!["user", "grant-role", "host", "fleet-host"],
    ] {
        let out = etcd.etcdctl(&args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    }
    let host_pw = password_file("host", "h0st");
    let mut hosts = Background(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(sbx_net_bin())
            .args(["__fleet-light-hosts", "--etcd", &url, "--count", "1", "--name-prefix", "roled-", "--etcd-user", "host", "--etcd-password-file", &host_pw])
            .spawn()
            .expect("light host"),
    );
    let status_args = ["fleet", "status", "--json", "--etcd", &url, "--etcd-user", "reader", "--etcd-password-file", &reader_pw];
    wait_for(Duration::from_secs(20), "a host with the fleet-host role publishing web in force", || {
        let out = sbx_net(&ns, &status_args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["hosts"].as_array()?.iter().any(|h| h["host"] == "roled-0" && h["in_force"]["/fleet/policies/all/web"].is_i64()).then_some(())
    });
    hosts.assert_running("light host");
    drop(hosts);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adversary: a guest whose policy allows every address still cannot reach
/// the fleet's store where its host reaches it (etcd on every address of the
/// host namespace: the gateway, the uplink), so it can neither read the
/// fleet's policies nor forge a status or a policy. The host itself can.
#[test]
fn a_guest_cannot_reach_the_hosts_etcd() {
    require_root();
    let open = "name = \"open\"\n[network]\ndefault = \"allow\"\nallow = [\"0.0.0.0/0\"]\n";
    let h = DaemonHarness::prepared("eguest", &[("open.toml", open)], None, &[]);
    let etcd = EtcdServer::start_listening(h.topology.host.name(), None, "0.0.0.0");
    let mut daemon = Background(h.spawn_daemon_process(&["--policy-source".into(), etcd.url("fleet"), "--host-name".into(), "adv".into()]));
    wait_for(Duration::from_secs(20), "the fleet daemon to answer", || h.cli(&["status"]).status.success().then_some(()));
    let guest = h.create_guest(&unique_name("g"), "open");
    let ns = guest["netns"].as_str().unwrap().to_string();
    let gateway: std::net::IpAddr = guest["gateway_ipv4"].as_str().unwrap().parse().unwrap();
    // Control: etcd answers on those addresses from the host's side, and
    // the guest's policy lets it out to the world.
    for addr in [gateway, std::net::IpAddr::V4(UPLINK_HOST_V4)] {
        assert!(tcp_connects(h.topology.host.name(), addr, etcd.client_port), "etcd is not listening on {addr} in the host namespace");
    }
    for addr in [gateway, std::net::IpAddr::V4(UPLINK_HOST_V4)] {
        assert!(!tcp_connects(&ns, addr, etcd.client_port), "the guest reached the host's etcd at {addr}:{}", etcd.client_port);
    }
    let denied = h.cli(&["inspect", "--verdict", "denied", "--port", &etcd.client_port.to_string(), "--no-color"]);
    let denied = String::from_utf8_lossy(&denied.stdout);
    assert!(denied.contains("host address"), "the attempts are recorded as denied by the host-address rule:\n{denied}");
    daemon.assert_running("daemon");
    // The daemon is killed before the harness cleans up after it.
    drop(daemon);
    drop(etcd);
}
