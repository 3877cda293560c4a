//! What keeps one guest from taking a proxy down for every tenant: a cap on
//! what each sandbox holds at once (proxied connections, DNS-over-TCP
//! connections, DNS queries waiting upstream), and an accept loop that backs
//! off when the process runs out of file descriptors instead of spinning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many of something each sandbox holds at once, with a cap checked and
/// taken under one lock.
#[derive(Debug)]
pub struct ConnLimits {
    cap: usize,
    open: Mutex<HashMap<String, Held>>,
}

#[derive(Debug, Default)]
struct Held {
    count: usize,
    /// Refused since the sandbox last got a permit: only the first refusal
    /// of a burst is worth a log line.
    refusing: bool,
}

/// A refusal at the cap.
#[derive(Debug, PartialEq, Eq)]
pub struct AtCap {
    /// The first refusal since the sandbox last got a permit.
    pub first_of_burst: bool,
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

    /// A permit for one more of `sandbox`'s, or the refusal at the cap.
    pub fn try_acquire(self: &Arc<Self>, sandbox: &str) -> Result<ConnPermit, AtCap> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open.entry(sandbox.to_string()).or_default();
        if self.cap != 0 && held.count >= self.cap {
            let first_of_burst = !held.refusing;
            held.refusing = true;
            return Err(AtCap { first_of_burst });
        }
        held.count += 1;
        held.refusing = false;
        Ok(ConnPermit { limits: self.clone(), sandbox: sandbox.to_string() })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections `sandbox` holds now.
    pub fn open(&self, sandbox: &str) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(sandbox).map_or(0, |h| h.count)
    }
}

impl ConnPermit {
    /// A permit for one more connection of the same sandbox (an upstream
    /// connection a guest connection adds), under the same cap.
    pub fn another(&self) -> Result<ConnPermit, AtCap> {
        self.limits.try_acquire(&self.sandbox)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = open.get_mut(&self.sandbox) {
            held.count -= 1;
            if held.count == 0 {
                // Nothing held, nothing refused since: the next refusal can
                // only come after `cap` new permits, which start a new burst.
                open.remove(&self.sandbox);
            }
        }
    }
}

/// How many queries or connections are being served right now (a guard
/// per one): what a draining data plane waits on before it exits.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

/// One query or connection in flight; the count drops with it.
#[derive(Debug)]
pub struct InFlightGuard(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlightGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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

    /// [`AcceptBackoff::failed`], saying so in the log at the first
    /// failure of a burst (`what` names the listener): how long to wait.
    pub fn wait_after(&mut self, error: &std::io::Error, what: &str) -> Duration {
        let (wait, first) = self.failed(error);
        if first {
            tracing::warn!("{what}: accept failed ({error}); backing off until connections close");
        }
        wait
    }

    /// Called after a successful accept.
    pub fn succeeded(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

/// Accepts on `listener` forever, backing off while descriptors are short,
/// and spawns `handle`'s future for each connection on the current runtime.
pub async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, what: &'static str, mut handle: F)
where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept_each(listener, what, move |stream, peer| {
        tokio::spawn(handle(stream, peer));
    })
    .await
}

/// Accepts on `listener` forever, backing off while descriptors are short,
/// and gives each connection to `take` (which starts serving it, and must
/// not wait).
pub async fn accept_each(listener: tokio::net::TcpListener, what: &'static str, mut take: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr)) {
    let mut backoff = AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Some(failures) = backoff.succeeded() {
                    tracing::warn!("{what}: accepting again after {failures} failed accepts");
                }
                take(stream, peer);
            }
            Err(e) => {
                let wait = backoff.wait_after(&e, what);
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
        assert_eq!(limits.try_acquire("a").err(), Some(AtCap { first_of_burst: true }), "a is at its cap");
        assert_eq!(limits.try_acquire("a").err(), Some(AtCap { first_of_burst: false }), "the burst goes on");
        let _b = limits.try_acquire("b").expect("b has its own cap");
        drop(a1);
        assert_eq!(limits.open("a"), 1);
        let _a3 = limits.try_acquire("a").expect("a permit given back is free again");
        assert_eq!(limits.try_acquire("a").err(), Some(AtCap { first_of_burst: true }), "a refusal after a permit starts a new burst");
        let unlimited = ConnLimits::new(0);
        let held: Vec<_> = (0..1000).map(|_| unlimited.try_acquire("a").unwrap()).collect();
        assert_eq!(unlimited.open("a"), 1000);
        drop(held);
        assert_eq!(unlimited.open("a"), 0);
    }

    #[test]
    fn another_permit_counts_against_the_same_sandbox() {
        let limits = ConnLimits::new(2);
        let first = limits.try_acquire("a").unwrap();
        let second = first.another().unwrap();
        assert_eq!(limits.open("a"), 2);
        assert!(first.another().is_err());
        assert!(limits.try_acquire("b").is_ok());
        drop(second);
        assert_eq!(limits.open("a"), 1);
    }

    #[test]
    fn in_flight_counts_live_guards() {
        let in_flight = InFlight::default();
        let a = in_flight.enter();
        let b = in_flight.clone().enter();
        assert_eq!(in_flight.count(), 2);
        drop(a);
        assert_eq!(in_flight.count(), 1);
        drop(b);
        assert_eq!(in_flight.count(), 0);
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
