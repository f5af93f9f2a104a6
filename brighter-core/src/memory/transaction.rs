//! A transaction for the in-memory stores.

/// A transaction for the in-memory outbox and inbox: what is added with it takes
/// effect on [`commit`](InMemoryTransaction::commit); dropping it uncommitted rolls
/// it all back. Lets users' tests exercise "commit the business data and the
/// message together" without a database.
///
/// ```
/// use brighter_core::{InMemoryInbox, InMemoryTransaction, Inbox};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let inbox = InMemoryInbox::new();
/// let id = uuid::Uuid::now_v7();
/// let mut tx = InMemoryTransaction::new();
/// inbox.add(id, "greetings", Some(&mut tx)).await.unwrap();
/// assert!(!inbox.exists(id, "greetings").await.unwrap());
/// tx.commit();
/// assert!(inbox.exists(id, "greetings").await.unwrap());
/// # });
/// ```
#[derive(Default)]
#[must_use = "dropping the transaction rolls it back"]
pub struct InMemoryTransaction {
    on_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for InMemoryTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryTransaction")
            .field("pending", &self.on_commit.len())
            .finish()
    }
}

impl InMemoryTransaction {
    /// A new, empty transaction.
    pub fn new() -> Self {
        InMemoryTransaction::default()
    }

    /// Applies everything added with this transaction.
    pub fn commit(self) {
        for apply in self.on_commit {
            apply();
        }
    }

    /// Discards everything added with this transaction (as dropping it does).
    pub fn rollback(self) {}

    /// Runs `apply` when the transaction commits; stores call this.
    pub fn on_commit(&mut self, apply: impl FnOnce() + Send + 'static) {
        self.on_commit.push(Box::new(apply));
    }
}
