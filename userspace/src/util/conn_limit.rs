//! What keeps one guest from taking a proxy down for every tenant: a cap on
//! each sandbox's concurrent connections, and an accept loop that backs off
//! when the process runs out of file descriptors instead of spinning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Concurrent connections per sandbox, with a cap.
#[derive(Debug)]
pub struct ConnLimits {
    cap: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One counted connection; the count drops with it.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    sandbox: String,
}

impl ConnLimits {
    /// `cap` connections per sandbox (0: no cap).
    pub fn new(cap: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits { cap, open: Mutex::new(HashMap::new()) })
    }

    /// A permit for one more connection of `sandbox`, or None at the cap.
    pub fn try_acquire(self: &Arc<Self>, sandbox: &str) -> Option<ConnPermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(sandbox.to_string()).or_insert(0);
        if self.cap != 0 && *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(ConnPermit { limits: self.clone(), sandbox: sandbox.to_string() })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections `sandbox` holds now.
    pub fn open(&self, sandbox: &str) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(sandbox).copied().unwrap_or(0)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.sandbox) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.sandbox);
            }
        }
    }
}

/// The wait after a failed accept: EMFILE/ENFILE/ENOBUFS/ENOMEM persist
/// until connections close, so the wait doubles (10 ms … 1 s) while they
/// last; anything else (a connection reset before accept) is retried at once.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// Called after an accept error: how long to wait, and whether this is
    /// the first failure of a burst (worth a log line).
    pub fn failed(&mut self, error: &std::io::Error) -> (Duration, bool) {
        let exhausted = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
        if !exhausted {
            return (Duration::ZERO, false);
        }
        let first = self.failures == 0;
        let wait = Duration::from_millis(10u64 << self.failures.min(7)).min(Duration::from_secs(1));
        self.failures = self.failures.saturating_add(1);
        (wait, first)
    }

    /// Called after a successful accept.
    pub fn succeeded(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

/// Accepts on `listener` forever, backing off while descriptors are short,
/// and hands each connection to `handle`.
pub async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, what: &'static str, mut handle: F)
where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Some(failures) = backoff.succeeded() {
                    tracing::warn!("{what}: accepting again after {failures} failed accepts");
                }
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                let (wait, first) = backoff.failed(&e);
                if first {
                    tracing::warn!("{what}: accept failed ({e}); backing off until connections close");
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_sandbox_and_releases_on_drop() {
        let limits = ConnLimits::new(2);
        let a1 = limits.try_acquire("a").unwrap();
        let _a2 = limits.try_acquire("a").unwrap();
        assert!(limits.try_acquire("a").is_none(), "a is at its cap");
        let _b = limits.try_acquire("b").expect("b has its own cap");
        drop(a1);
        assert_eq!(limits.open("a"), 1);
        assert!(limits.try_acquire("a").is_some());
        let unlimited = ConnLimits::new(0);
        let held: Vec<_> = (0..1000).map(|_| unlimited.try_acquire("a").unwrap()).collect();
        assert_eq!(unlimited.open("a"), 1000);
        drop(held);
        assert_eq!(unlimited.open("a"), 0);
    }

    #[test]
    fn backoff_grows_on_descriptor_exhaustion_only() {
        let mut b = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<(Duration, bool)> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(waits[0], (Duration::from_millis(10), true));
        assert_eq!(waits[1], (Duration::from_millis(20), false));
        assert!(waits.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(waits[9].0, Duration::from_secs(1));
        assert_eq!(b.succeeded(), Some(10));
        assert_eq!(b.succeeded(), None);
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.failed(&aborted), (Duration::ZERO, false));
    }
}
