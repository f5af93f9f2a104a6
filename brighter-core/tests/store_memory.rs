//! The store conformance suite against the in-memory outbox and inbox.

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::conformance::store::{InboxHarness, OutboxHarness, TransactionHarness};
use brighter_core::{
    InMemoryInbox, InMemoryOutbox, InMemoryTransaction, Inbox, Outbox, Transaction,
};

struct Memory;

async fn memory() -> Memory {
    Memory
}

#[async_trait]
impl TransactionHarness for Memory {
    async fn begin(&self) -> Box<dyn Transaction> {
        Box::new(InMemoryTransaction::new())
    }

    async fn commit(&self, tx: Box<dyn Transaction>) {
        match tx.into_any().downcast::<InMemoryTransaction>() {
            Ok(tx) => tx.commit(),
            Err(_) => panic!("the harness begins in-memory transactions only"),
        }
    }

    async fn rollback(&self, tx: Box<dyn Transaction>) {
        drop(tx);
    }
}

#[async_trait]
impl OutboxHarness for Memory {
    fn transactions(&self) -> &dyn TransactionHarness {
        self
    }

    async fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(InMemoryOutbox::new())
    }
}

#[async_trait]
impl InboxHarness for Memory {
    fn transactions(&self) -> &dyn TransactionHarness {
        self
    }

    async fn inbox(&self) -> Arc<dyn Inbox> {
        Arc::new(InMemoryInbox::new())
    }
}

brighter_core::outbox_conformance_tests!(memory);
brighter_core::inbox_conformance_tests!(memory);
