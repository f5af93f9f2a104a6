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
