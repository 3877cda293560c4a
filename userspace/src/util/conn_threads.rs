//! Threads that each serve their connections to the end on a
//! single-threaded tokio runtime, as an nginx worker serves its own.
//!
//! Why not the work-stealing runtime: a proxied request wakes several
//! tasks in turn (the guest connection's, hyper's upstream connection's,
//! back again). On a multi-threaded runtime each wake of a task can go to
//! the other worker, which is then unparked with a futex and a context
//! switch; on a busy 2-core host those hand-offs and the wake-ups of idle
//! workers cost more than the request's own work (`bench proxy`, perf).
//! Here a connection's own tasks are all on the thread that took it, woken
//! by that thread's epoll (what it waits for elsewhere — a DNS lookup, a
//! lock — still wakes it from another thread). The price: a connection
//! cannot move to an idle thread, so new ones go to the thread serving the
//! fewest (by count, not by load).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The connection threads; dropping the last owner ends them (and cancels
/// what they were serving). Tasks on them may hold an owner themselves
/// (the proxy's context does): then the threads live as long as the
/// process, as a data plane's do.
pub struct ConnThreads {
    threads: Vec<ConnThread>,
}

struct ConnThread {
    handle: tokio::runtime::Handle,
    /// Connections taken and not yet done.
    open: Arc<AtomicUsize>,
    /// Dropped with [`ConnThreads`]: the thread's runtime then returns.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Counts a connection as open on its thread until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The index of the thread a new connection goes to: the one with the
/// fewest open, the first of those on a tie.
pub fn least_busy(open: &[usize]) -> usize {
    open.iter().enumerate().min_by_key(|(_, n)| **n).map(|(i, _)| i).unwrap_or(0)
}

impl ConnThreads {
    /// `count` threads (at least one) named `name`.
    pub fn start(count: usize, name: &str) -> std::io::Result<ConnThreads> {
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                // Returns when the sender is dropped; the runtime, dropped
                // here on its own thread, cancels the connections left.
                let _ = runtime.block_on(stopped);
            })?;
            threads.push(ConnThread { handle, open: Arc::default(), _stop: stop });
        }
        Ok(ConnThreads { threads })
    }

    /// One thread per CPU this process may run on.
    pub fn per_cpu(name: &str) -> std::io::Result<ConnThreads> {
        ConnThreads::start(std::thread::available_parallelism().map_or(1, |n| n.get()), name)
    }

    /// The first thread's runtime (of a set of one: its runtime), for work
    /// that must live there.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.threads[0].handle.clone()
    }

    /// Connections open on each thread.
    pub fn open(&self) -> Vec<usize> {
        self.threads.iter().map(|t| t.open.load(Ordering::Relaxed)).collect()
    }

    /// Runs `task` (a listener's loop, say, whose work should stay on one
    /// thread) on the thread with the fewest connections, counted as one
    /// of them until it ends.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let thread = &self.threads[least_busy(&self.open())];
        thread.open.fetch_add(1, Ordering::Relaxed);
        let open = Open(thread.open.clone());
        thread.handle.spawn(async move {
            let _open = open;
            task.await
        })
    }

    /// Serves `stream` with `serve` on the thread with the fewest
    /// connections open. The stream moves to that thread's reactor (taken
    /// off the accepting one's first).
    pub fn serve<F, Fut>(&self, stream: tokio::net::TcpStream, serve: F) -> std::io::Result<()>
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let stream = stream.into_std()?;
        self.spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!("connection thread: taking a connection: {e}"),
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_connections_go_to_the_least_busy_thread() {
        assert_eq!(least_busy(&[0, 0]), 0);
        assert_eq!(least_busy(&[3, 1, 2]), 1);
        assert_eq!(least_busy(&[2, 2, 1]), 2);
        assert_eq!(least_busy(&[]), 0);
    }

    #[test]
    fn spawned_loops_count_as_connections_until_they_end() {
        let threads = ConnThreads::start(2, "test-loop").unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let first = threads.spawn(async move {
            let _ = stop_rx.await;
            std::thread::current().name().unwrap_or("").to_string()
        });
        let second = threads.spawn(async { std::thread::current().name().unwrap_or("").to_string() });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            assert_eq!(second.await.unwrap(), "test-loop-1", "the second loop goes to the thread without one");
            assert_eq!(threads.open()[0], 1, "the first loop still counts");
            stop_tx.send(()).unwrap();
            assert_eq!(first.await.unwrap(), "test-loop-0");
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads.open() != [0, 0] {
            assert!(std::time::Instant::now() < deadline, "open counts stayed {:?}", threads.open());
            std::thread::yield_now();
        }
    }

    #[test]
    fn connections_are_served_on_the_threads_and_counted_until_done() {
        let threads = ConnThreads::start(2, "test-conn").unwrap();
        let accepting = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        accepting.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
                let (stream, _) = listener.accept().await.unwrap();
                let done = done_tx.clone();
                threads
                    .serve(stream, move |mut stream| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let name = std::thread::current().name().unwrap_or("").to_string();
                        let mut byte = [0u8; 1];
                        // Served until the client sends its byte.
                        let _ = stream.read_exact(&mut byte).await;
                        let _ = stream.write_all(name.as_bytes()).await;
                        let _ = done.send(name);
                    })
                    .unwrap();
            }
            assert_eq!(threads.open(), vec![2, 2], "spread over both threads");
            let mut names = Vec::new();
            for mut c in clients {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                c.write_all(b"x").await.unwrap();
                let mut name = String::new();
                c.read_to_string(&mut name).await.unwrap();
                names.push(name);
            }
            for _ in 0..4 {
                done_rx.recv().await.unwrap();
            }
            names.sort();
            assert_eq!(names, ["test-conn-0", "test-conn-0", "test-conn-1", "test-conn-1"]);
            // The count drops when the connection's future is dropped, just
            // after it sent `done`.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while threads.open() != [0, 0] {
                assert!(std::time::Instant::now() < deadline, "open counts stayed {:?}", threads.open());
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
    }
}
