//! # brighter-core
//!
//! A Brighter-style command processor for Rust: requests (commands and events)
//! dispatched to handlers through a per-handler policy pipeline (tracing, retry,
//! circuit breaker, timeout, feature switch, fallback, validation, inbox, your own
//! steps), plus the message model, the outbox/inbox contracts with in-memory
//! implementations, an in-memory transport and the message pump that consumes
//! messages and acknowledges them only after the work is done.
//!
//! Start with [`CommandProcessor::builder`].

#![forbid(unsafe_code)]

mod channel;
mod dispatcher;
mod error;
mod handler;
mod inbox;
mod mapper;
mod memory;
mod message;
mod outbox;
mod outgoing;
pub mod pipeline;
mod processor;
mod producer;
mod publication;
mod request;
mod sweeper;
pub mod telemetry;
mod transaction;
mod transform;
pub mod wire;

pub mod conformance;

pub use channel::{Channel, ChannelFactory, ChannelSpec, Delivery};
pub use dispatcher::{
    DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_HEADER_COUNT, Dispatcher, DispatcherBuilder, Subscription,
    SubscriptionHealth, SubscriptionState,
};
pub use error::{BoxError, Error, ErrorKind};
pub use handler::{Handler, HandlerFn, handler_fn};
pub use inbox::{InMemoryInbox, Inbox};
pub use mapper::{JsonMapper, MessageMapper};
pub use memory::{InMemoryBroker, InMemoryChannel, ParkedMessage};
pub use message::{
    CloudEvents, JSON_CONTENT_TYPE, Message, MessageHeader, MessageType, TraceContext,
};
pub use outbox::{InMemoryOutbox, Outbox, OutboxEntry};
pub use processor::{CommandProcessor, CommandProcessorBuilder};
pub use producer::Producer;
pub use publication::Publication;
pub use request::{Command, Event, Request, RequestContext};
pub use sweeper::OutboxSweeper;
pub use telemetry::Telemetry;
pub use transaction::{InMemoryTransaction, Transaction, downcast_transaction};
pub use transform::{
    CLAIM_CHECK_HEADER, COMPRESSION_HEADER, ClaimCheck, ClaimCheckStore, Compression,
    InMemoryClaimCheckStore, ORIGINAL_CONTENT_TYPE_HEADER, Transform,
};
