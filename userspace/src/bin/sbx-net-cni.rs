//! `sbx-net-cni`: the CNI plugin (spec 1.0.0) that gives a container's VM
//! an sbx-net sandbox. The runtime runs it with CNI_COMMAND, CNI_CONTAINERID,
//! CNI_NETNS, CNI_IFNAME (CNI_ARGS, CNI_PATH) and the network configuration
//! on stdin; the result or the CNI error goes to stdout, a log line to
//! stderr. The daemon's socket is the network configuration's `socket`,
//! else that of /etc/sbx-net/config.toml, else the default. All of the
//! logic is in `sbx_net::cli::cni`.

use std::io::{Read, Write};

use sbx_net::cli::cni::{daemon_config_socket, run, DaemonBackend, World};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    let world = World { daemon_socket: daemon_config_socket, backend: |socket: &std::path::Path| DaemonBackend { socket: socket.to_path_buf() } };
    let outcome = run(|name| std::env::var(name).ok(), read, world);
    if let Some(line) = &outcome.log {
        eprintln!("{line}");
    }
    let mut out = std::io::stdout().lock();
    // Nothing to do about a runtime that closed our stdout: exit with the status anyway.
    let _ = out.write_all(outcome.stdout.as_bytes()).and_then(|()| if outcome.stdout.is_empty() { Ok(()) } else { out.write_all(b"\n") }).and_then(|()| out.flush());
    std::process::exit(outcome.exit_code);
}
