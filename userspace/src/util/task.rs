//! Tasks tied to the lifetime of what spawned them.

/// Aborts the task when dropped: a helper task ends with the session or
/// connection that spawned it instead of outliving it.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Whether the task has ended (by itself or aborted).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_task_ends_with_its_guard() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = AbortOnDrop(tokio::spawn(async move {
            // Never sent: only the abort ends this task.
            let _tx = tx;
            std::future::pending::<()>().await;
        }));
        assert!(!guard.is_finished());
        drop(guard);
        // The sender goes with the aborted task.
        assert!(rx.await.is_err());
    }
}
