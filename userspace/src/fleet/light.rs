//! Light hosts: the policy source's code path (connect, read, watch,
//! validate, merge, compile, publish the status) without a datapath, many
//! per process. The fleet benchmark runs them beside real daemons to make
//! a fleet of a hundred hosts on one machine.

use std::time::Duration;

use super::layout::HostIdentity;
use super::reconcile::Refusal;
use super::source::{EtcdOptions, EtcdSource};
use super::watch::{FleetChange, PolicySink, Watcher, WatcherSettings};
use super::FleetError;

/// Compiles every policy as a daemon would before writing its maps.
#[derive(Default)]
pub struct CompileOnly {
    generation: u64,
}

impl PolicySink for CompileOnly {
    fn apply(&mut self, change: FleetChange) -> Result<u64, Refusal> {
        for entry in &change.entries {
            crate::policy::compile::compile(&entry.policy, &[])
                .map_err(|e| Refusal { policy: Some(entry.policy.name.clone()), reason: e.to_string() })?;
        }
        self.generation += 1;
        Ok(self.generation)
    }
}

/// Runs `count` light hosts named `{name_prefix}{i}` until the process is
/// stopped; each has its own connection, watch and status lease.
pub fn run(source: &EtcdSource, options: &EtcdOptions, count: usize, name_prefix: &str, group: Option<&str>) -> Result<(), FleetError> {
    let mut watchers = Vec::new();
    for i in 0..count {
        let host = HostIdentity::new(&format!("{name_prefix}{i}"), group).map_err(FleetError::BadOptions)?;
        let settings = WatcherSettings { source: source.clone(), options: options.clone(), host, light: true };
        watchers.push(Watcher::new(settings, CompileOnly::default(), None, None));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| FleetError::Write { what: "starting the runtime".into(), source })?;
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for (i, watcher) in watchers.into_iter().enumerate() {
            tasks.push(tokio::spawn(watcher.run()));
            // Spread the connects so a hundred hosts do not arrive at once.
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    Ok(())
}
