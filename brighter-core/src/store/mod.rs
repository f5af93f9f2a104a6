//! The store contracts: the outbox (messages until they are sent), the inbox
//! (messages handled), the saga store (process managers' state), the
//! caller's transaction they join, and the sweeper loop written once for
//! every outbox.

pub(crate) mod inbox;
pub(crate) mod outbox;
pub(crate) mod saga;
pub(crate) mod schedule;
pub(crate) mod sweeper;

pub use sweeper::{OutboxSweeper, Retention, RunningSweeper, SweepReport, SweeperStats};
pub(crate) mod transaction;

pub use inbox::{Inbox, InboxEntry};
pub use outbox::{
    ClaimRequest, Claimed, Outbox, OutboxClaim, ParkedOutboxMessage, SendFailure, Wake,
};
pub use saga::{SagaInstance, SagaStatus, SagaStore};
pub use schedule::Due;
pub use transaction::{Transaction, downcast_transaction};
