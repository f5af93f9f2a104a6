//! The transport conformance suite against the in-memory transport.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::conformance::Harness;
use brighter_core::{ChannelFactory, Error, InMemoryBroker, ParkedMessage, Producer};

struct Memory {
    broker: InMemoryBroker,
}

#[async_trait]
impl Harness for Memory {
    fn producer(&self) -> Arc<dyn Producer> {
        Arc::new(self.broker.clone())
    }

    fn channel_factory(&self) -> Arc<dyn ChannelFactory> {
        Arc::new(self.broker.clone())
    }

    async fn provision(&self, topic: &str, channel: &str) -> Result<(), Error> {
        self.broker.declare(topic, channel)
    }

    async fn dead_letters(&self, _topic: &str, channel: &str) -> Result<Vec<ParkedMessage>, Error> {
        Ok(self.broker.dead_letters(channel))
    }

    async fn invalid_messages(
        &self,
        _topic: &str,
        channel: &str,
    ) -> Result<Vec<ParkedMessage>, Error> {
        Ok(self.broker.invalid_messages(channel))
    }
}

async fn memory() -> Memory {
    Memory {
        broker: InMemoryBroker::new(),
    }
}

brighter_core::conformance_tests!(memory);
