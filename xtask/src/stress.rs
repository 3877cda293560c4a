//! `cargo xtask test --stress`: the suite with every CPU kept busy, as on a
//! build host running other jobs. The load is threads of this process, so
//! it cannot outlive xtask whatever happens to it (a failed run, a panic,
//! a kill); dropping it stops it, and it stops by itself after [`LIMIT`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longer than any suite run: a bound should everything else fail.
pub const LIMIT: Duration = Duration::from_secs(60 * 60);

/// The CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Busy-looping threads at normal priority; stopped and joined on drop.
pub struct BusyLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl BusyLoad {
    pub fn start(workers: usize, limit: Duration) -> BusyLoad {
        eprintln!("[stress] on: {workers} busy workers (one per CPU), stopped when the tests end or after {} min", limit.as_secs() / 60);
        let stop = Arc::new(AtomicBool::new(false));
        let until = Instant::now() + limit;
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || spin(&stop, until))
            })
            .collect();
        BusyLoad { stop, workers }
    }
}

/// Integer work (not a pause hint: that would leave the core's pipeline
/// idle) until told to stop or `until` passes.
fn spin(stop: &AtomicBool, until: Instant) {
    let mut x = 1u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        eprintln!("[stress] off");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_stops_when_dropped_and_at_its_limit() {
        let load = BusyLoad::start(2, LIMIT);
        let started = Instant::now();
        drop(load);
        assert!(started.elapsed() < Duration::from_secs(5), "dropping stops the workers at once");
        let expired = BusyLoad::start(1, Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(300));
        assert!(expired.workers.iter().all(|w| w.is_finished()), "workers stop at the limit");
    }
}
