//! A caller's transaction, handed to an outbox or inbox so that a message or an
//! inbox record commits together with the caller's own writes.
//!
//! Each store downcasts it to the type it works with: `sqlx::Transaction<'static,
//! Postgres>` for the Postgres stores, [`InMemoryTransaction`](crate::InMemoryTransaction)
//! for the in-memory ones. A store given a transaction of another type fails with a
//! configuration error naming the type it expected.

use std::any::{Any, type_name};

use crate::error::Error;

/// Any `Send + 'static` value can be passed as a transaction.
pub trait Transaction: Any + Send {
    /// For stores to downcast to the transaction type they support.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// For the owner of a boxed transaction to get it back to commit it.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: Any + Send> Transaction for T {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// Downcasts `tx` to `T`, or fails with an error naming the store and the type it
/// expects.
pub fn downcast_transaction<'a, T: Any>(
    tx: &'a mut dyn Transaction,
    store: &str,
) -> Result<&'a mut T, Error> {
    tx.as_any_mut().downcast_mut::<T>().ok_or_else(|| {
        Error::configuration(format!(
            "{store} needs a transaction of type {}, and was given another type",
            type_name::<T>()
        ))
    })
}

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
