//! # brighter-core
//!
//! A Brighter-style command processor for Rust: requests (commands and events)
//! dispatched to handlers through a per-handler policy pipeline (tracing, retry,
//! circuit breaker, timeout, feature switch, fallback, validation, inbox, your own
//! steps), plus the message model, the outbox/inbox contracts with in-memory
//! implementations, an in-memory transport and the message pump that consumes
//! messages and acknowledges them only after the work is done.
//!
//! The modules, by concern:
//! - [`command`]: requests, the request context, handlers, the pipeline and
//!   the [`CommandProcessor`];
//! - [`message`]: the message model, mappers, publications, transforms and the
//!   wire codec;
//! - [`messenger`]: the outgoing side, the [`Messenger`] (deposit, clear, post,
//!   call, reply, the one send path);
//! - [`store`]: the outbox and inbox contracts and the sweeper loop;
//! - [`conversation`]: process managers (sagas) with stored state, and
//!   routing slips;
//! - [`dispatch`]: channels, subscriptions, the dispatcher and its reactor pump;
//! - [`memory`]: the in-memory broker, outbox, inbox, saga store and
//!   transaction;
//! - [`operate`]: the AsyncAPI document and the activity of a conversation;
//! - [`telemetry`]: OpenTelemetry spans, propagation and metrics.
//!
//! Start with [`CommandProcessor::builder`].

#![forbid(unsafe_code)]

// The derives name `::brighter_core`; inside this crate too.
#[allow(unused_extern_crates)]
extern crate self as brighter_core;

pub mod command;
pub mod conversation;
pub mod dispatch;
mod error;
pub mod memory;
pub mod message;
pub mod messenger;
pub mod operate;
pub mod store;
mod sync;
pub mod telemetry;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod testing;

pub use command::pipeline;
pub use message::wire;

/// Derives: `#[derive(Command)]`, `#[derive(Event)]`, `#[derive(Request)]`
/// (see [`brighter_macros`]).
#[cfg(feature = "macros")]
pub use brighter_macros::{Command, Event, Request};
pub use command::context::RequestContext;
pub use command::handler::{Handler, HandlerFn, handler_fn};
pub use command::processor::{CommandProcessor, CommandProcessorBuilder};
#[doc(hidden)]
pub use command::request::probe as __probe;
pub use command::request::{Command, Event, Request, describe_schema};
pub use conversation::{
    ROUTING_SLIP_HEADER, RoutingSlip, RoutingSlipBuilder, Saga, SagaBuilder, SagaContext,
    SagaNotFound, SagaStep, SlipFault, SlipMessage, SlipPosition, SlipStep,
};
pub use dispatch::channel::{Channel, ChannelFactory, ChannelSpec, Delivery};
pub use dispatch::{
    Abandoned, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_HEADER_COUNT, Dispatcher,
    DispatcherBuilder, InHand, Outcome, ShutdownReport, Subscription, SubscriptionHealth,
    SubscriptionState,
};
pub use error::{BoxError, Error, ErrorKind};
pub use memory::{
    InMemoryBroker, InMemoryChannel, InMemoryInbox, InMemoryOutbox, InMemorySagaStore,
    InMemoryTransaction, OutboxEntry, ParkedMessage,
};
pub use message::mapper::{JsonMapper, MessageMapper};
pub use message::publication::Publication;
pub use message::transform::{
    CLAIM_CHECK_HEADER, COMPRESSION_HEADER, ClaimCheck, ClaimCheckStore, Compression,
    InMemoryClaimCheckStore, ORIGINAL_CONTENT_TYPE_HEADER, Transform,
};
pub use message::{
    CloudEvents, JSON_CONTENT_TYPE, Message, MessageHeader, MessageType, SmolStr, TraceContext,
};
pub use messenger::producer::Producer;
pub use messenger::{Messenger, MessengerBuilder, SEND_LEASE, SendReport};
pub use operate::{
    Activity, ActivityStep, AsyncApi, DescribedPublication, DescribedReply, DescribedSubscription,
    Direction, Endpoint, Whereabouts,
};
/// The `schemars` crate, whose `JsonSchema` derive gives a request type its
/// schema in the AsyncAPI document.
pub use schemars;
/// The `serde_json` crate, for the derives.
#[doc(hidden)]
pub use serde_json as __serde_json;
pub use store::sweeper::{
    DEFAULT_PARK_AFTER, OutboxSweeper, Retention, RunningSweeper, SweepReport, SweeperStats,
};
pub use store::{
    ClaimRequest, Claimed, Due, Inbox, InboxEntry, Outbox, OutboxClaim, ParkedOutboxMessage,
    SagaInstance, SagaStatus, SagaStore, SendFailure, Transaction, Wake, downcast_transaction,
};
pub use telemetry::Telemetry;
/// The `uuid` crate, for the derives and for request ids.
pub use uuid;
