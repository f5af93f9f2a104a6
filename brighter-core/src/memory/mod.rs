//! In memory, first-class (the default sample, users' tests): a broker with
//! topics and queues, an outbox, an inbox, a saga store and a transaction
//! for them.

pub(crate) mod broker;
pub(crate) mod inbox;
pub(crate) mod outbox;
pub(crate) mod saga;
pub(crate) mod transaction;

pub use broker::{InMemoryBroker, InMemoryChannel, ParkedMessage};
pub use inbox::InMemoryInbox;
pub use outbox::{DEFAULT_RETENTION, InMemoryOutbox, OutboxEntry};
pub use saga::InMemorySagaStore;
pub use transaction::InMemoryTransaction;
