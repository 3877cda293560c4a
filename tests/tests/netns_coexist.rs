//! Guest namespaces live beside other users of `ip netns` (Docker, CNI, an
//! admin): while another thread runs `ip netns add/delete` in a loop, the
//! daemon creates and deletes guests, and nothing is left — no namespace
//! hidden under a mount that iproute2 stacked over /run/netns.
//!
//! The test starts from a fresh /run/netns (not yet a mount point), in a
//! mount namespace of its own so the host's /run is untouched; it has its
//! own `main` because unshare(CLONE_NEWNS) needs a single-threaded process.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbx_net_tests::daemon::DaemonHarness;
use sbx_net_tests::{require_root, run_in, unique_name, wait_until};

const NAME: &str = "guest_namespaces_live_beside_ip_netns";

const POLICY: &str = r#"
name = "p"
[network]
default = "deny"
allow = ["198.51.100.0/24"]
"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("{NAME}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("running 0 tests");
        return;
    }
    require_root();
    enter_mount_namespace_with_fresh_run();
    println!("running 1 test");
    guest_namespaces_live_beside_ip_netns();
    println!("test {NAME} ... ok");
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

/// A private mount namespace with an empty tmpfs on /run. Mounts made here
/// (the tmpfs, namespace bind mounts) never reach the host's and go with
/// the last process in the namespace.
fn enter_mount_namespace_with_fresh_run() {
    // SAFETY: plain syscalls with NUL-terminated constant strings; the
    // process is single-threaded (nothing has spawned a thread yet), as
    // unshare(CLONE_NEWNS) requires.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)");
        check(libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), "making / private");
        check(
            libc::mount(c"tmpfs".as_ptr(), c"/run".as_ptr(), c"tmpfs".as_ptr(), libc::MS_NOSUID | libc::MS_NODEV, c"mode=0755".as_ptr().cast()),
            "tmpfs on /run",
        );
    }
    assert!(!Path::new("/run/netns").exists());
}

/// Mounts at /run/netns stacked on our fresh /run (the host's own mounts
/// there are still listed, shadowed by our tmpfs): one when /run/netns is a
/// mount point that iproute2 reused, more when it stacked another.
fn netns_run_dir_mounts() -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    // Fields: id parent major:minor root mount-point …
    let rows: Vec<Vec<&str>> = info.lines().map(|l| l.split_whitespace().collect()).collect();
    let run = rows.iter().rev().find(|f| f.get(4) == Some(&"/run")).expect("our /run tmpfs")[0];
    let mut ours = vec![run];
    let mut count = 0;
    for f in &rows {
        if f.get(4) == Some(&"/run/netns") && ours.contains(&f[1]) {
            ours.push(f[0]);
            count += 1;
        }
    }
    count
}

fn mounts_under(prefix: &str) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines().filter_map(|l| l.split_whitespace().nth(4)).filter(|m| m.starts_with(prefix)).map(str::to_string).collect()
}

fn guest_namespaces_live_beside_ip_netns() {
    let h = DaemonHarness::new("coexist", &[("p.toml", POLICY)]);

    let names: Vec<String> = (0..6).map(|i| unique_name(&format!("c{i}"))).collect();
    let mut guests = Vec::new();
    let create = |name: &str, guests: &mut Vec<(String, String, u32)>| {
        let info = h.create_guest(name, "p");
        let netns = info["netns"].as_str().unwrap().to_string();
        let tap = info["tap"].as_str().unwrap().to_string();
        let ifindex = h.topology.host_netlink.link_index(&tap).expect("the tap exists");
        let out = run_in(&netns, "ip", &["link", "show", "eth0"]);
        assert!(out.status.success(), "guest {netns} unusable: {}", String::from_utf8_lossy(&out.stderr));
        guests.push((netns, tap, ifindex));
    };
    // Half the guests exist before the other tool first runs `ip netns add`
    // (the ones a stacked mount would hide), half are made while it runs.
    for name in &names[..3] {
        create(name, &mut guests);
    }

    // Another tool using `ip netns` from then on (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU32::new(0));
    let other_prefix = unique_name("other");
    let other = {
        let (stop, rounds, prefix) = (stop.clone(), rounds.clone(), other_prefix.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) && rounds.load(Ordering::Relaxed) < 5000 && Instant::now() < deadline {
                let name = format!("{prefix}-{}", rounds.load(Ordering::Relaxed));
                for op in ["add", "delete"] {
                    let out = Command::new("ip").args(["netns", op, &name]).output().expect("ip netns");
                    if !out.status.success() {
                        failures.push(format!("ip netns {op} {name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            failures
        })
    };
    wait_until(Duration::from_secs(20), "the other tool's first `ip netns add`", || rounds.load(Ordering::Relaxed) > 0);
    for name in &names[3..] {
        create(name, &mut guests);
    }
    for name in &names {
        // A delete that leaves anything behind is an error naming it.
        h.cli_ok(&["sandbox", "delete", name]);
    }
    stop.store(true, Ordering::Relaxed);
    let failures = other.join().expect("the ip netns loop");
    assert!(failures.is_empty(), "the other tool's own namespaces broke: {failures:?}");

    assert_eq!(netns_run_dir_mounts(), 1, "/run/netns must be one shared mount point, not a stack");
    let listed = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    for (netns, _, _) in &guests {
        assert!(!Path::new("/run/netns").join(netns).exists(), "{netns} is left in /run/netns");
        assert!(!listed.contains(netns.as_str()), "{netns} is still listed: {listed}");
    }
    let left: Vec<String> = mounts_under("/run/netns/").into_iter().filter(|m| guests.iter().any(|(n, _, _)| m.ends_with(n.as_str())) || m.contains(&other_prefix)).collect();
    assert!(left.is_empty(), "namespace mounts left: {left:?}");

    // The taps go with the reaper, after the deletes were answered.
    wait_until(Duration::from_secs(20), "deleted sandboxes' taps to be removed", || {
        h.json(&["status", "--json"])["taps_being_removed"] == 0
    });
    let status = h.json(&["status", "--json"]);
    assert_eq!(status["reap_failures"], serde_json::json!([]), "{status}");
    for (_, tap, ifindex) in &guests {
        // The name may already serve a new pre-warmed tap (ids are reused);
        // the deleted one had this index.
        assert_ne!(h.topology.host_netlink.link_index(tap).ok(), Some(*ifindex), "tap {tap} is left");
    }
}
