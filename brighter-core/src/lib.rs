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

mod error;
mod handler;
mod inbox;
mod message;
mod outgoing;
pub mod pipeline;
mod processor;
mod request;
mod transaction;

pub use error::{BoxError, Error, ErrorKind};
pub use handler::{Handler, HandlerFn, handler_fn};
pub use inbox::{InMemoryInbox, Inbox};
pub use message::{
    CloudEvents, JSON_CONTENT_TYPE, Message, MessageHeader, MessageType, TraceContext,
};
pub use processor::{CommandProcessor, CommandProcessorBuilder};
pub use request::{Command, Event, Request, RequestContext};
pub use transaction::{InMemoryTransaction, Transaction, downcast_transaction};
