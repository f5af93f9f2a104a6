//! The saga conformance suite against the in-memory saga store, inbox and
//! outbox.

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::conformance::saga::{SagaHarness, SagaParts};
use brighter_core::{InMemoryInbox, InMemoryOutbox, InMemorySagaStore};

struct Memory;

async fn memory() -> Memory {
    Memory
}

#[async_trait]
impl SagaHarness for Memory {
    async fn parts(&self) -> SagaParts {
        SagaParts {
            store: Arc::new(InMemorySagaStore::new()),
            inbox: Arc::new(InMemoryInbox::new()),
            outbox: Arc::new(InMemoryOutbox::new()),
        }
    }
}

brighter_core::saga_conformance_tests!(memory);
