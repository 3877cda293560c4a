//! A standing thread that runs the jobs handed to it, one at a time, while
//! the caller goes on with other work and collects each result later.
//! Cheaper than a thread per job (no stack to map, no clone(2) on the
//! caller's path), and the jobs keep the order they were handed in.

use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// The thread and its queue; dropping it lets the queued jobs finish and
/// joins the thread.
pub struct Background {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// A job's result, to wait for.
#[must_use = "a job handed off is only known done once waited for"]
pub struct Pending<T>(mpsc::Receiver<T>);

impl<T> Pending<T> {
    /// Waits for the job; None if it panicked.
    pub fn wait(self) -> Option<T> {
        self.0.recv().ok()
    }
}

impl Background {
    /// Starts the thread, named `name`.
    pub fn start(name: &str) -> std::io::Result<Background> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            for job in queue {
                // A job that panics loses its own result (its waiter sees
                // None), not the thread: later jobs still run here.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(Background { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Hands `job` to the thread. Should the thread be gone, the job runs
    /// here, so it is never lost.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = done.send(job());
        });
        let refused = match &self.jobs {
            Some(jobs) => jobs.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = refused {
            job();
        }
        Pending(result)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn jobs_run_off_the_callers_thread_in_the_order_handed() {
        let background = Background::start("test-bg").unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let caller = std::thread::current().id();
        let pending: Vec<_> = (0..5)
            .map(|i| {
                let order = order.clone();
                background.run(move || {
                    order.lock().unwrap().push(i);
                    std::thread::current().id()
                })
            })
            .collect();
        for p in pending {
            assert_ne!(p.wait(), Some(caller), "ran on the standing thread");
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_panicking_job_is_reported_and_later_jobs_still_run() {
        let background = Background::start("test-bg").unwrap();
        assert_eq!(background.run(|| -> u32 { panic!("job fails") }).wait(), None);
        let caller = std::thread::current().id();
        let (value, ran_on) = background.run(|| (7, std::thread::current().id())).wait().unwrap();
        assert_eq!(value, 7);
        assert_ne!(ran_on, caller, "the standing thread outlived the panic");
    }

    #[test]
    fn dropping_it_finishes_what_was_queued() {
        let background = Background::start("test-bg").unwrap();
        let ran = Arc::new(Mutex::new(0));
        for _ in 0..3 {
            let ran = ran.clone();
            drop(background.run(move || *ran.lock().unwrap() += 1));
        }
        drop(background);
        assert_eq!(*ran.lock().unwrap(), 3);
    }
}
