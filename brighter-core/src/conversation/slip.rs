//! The routing slip: a message that carries its own itinerary. The sender
//! plans the steps (each a topic, with an optional compensation); each
//! step's handler only does its work, and the framework forwards the message
//! to the next step. When a step fails, the compensations of the steps
//! already done run in reverse order. The itinerary, and which steps are
//! done, travel in the message header ([`ROUTING_SLIP_HEADER`]), so they
//! survive every transport.
//!
//! ```
//! # use brighter_core::{CommandProcessor, InMemoryBroker, Publication, Command};
//! # #[derive(Command, serde::Serialize, serde::Deserialize)] struct BookFlight { id: uuid::Uuid }
//! # #[derive(Command, serde::Serialize, serde::Deserialize)] struct CancelFlight { id: uuid::Uuid }
//! # #[derive(Command, serde::Serialize, serde::Deserialize)] struct BookHotel { id: uuid::Uuid }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let processor = CommandProcessor::builder()
//!     .publication::<BookFlight>(Publication::command("flights.book"))
//!     .publication::<CancelFlight>(Publication::command("flights.cancel"))
//!     .publication::<BookHotel>(Publication::command("hotels.book"))
//!     .producer(InMemoryBroker::new())
//!     .build()?;
//! let slip = processor
//!     .routing_slip()
//!     .step(&BookFlight { id: uuid::Uuid::now_v7() })
//!     .compensate(&CancelFlight { id: uuid::Uuid::now_v7() })
//!     .step(&BookHotel { id: uuid::Uuid::now_v7() })
//!     .build()?;
//! assert_eq!(slip.itinerary.len(), 2);
//! // processor.post_routing_slip(&slip).await? sends the first step.
//! # Ok::<(), brighter_core::Error>(()) }).unwrap();
//! ```

use std::any::type_name;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dispatch::outcome::Settlement;
use crate::error::Error;
use crate::message::publication::Publication;
use crate::message::{CLOUD_EVENTS_SPEC_VERSION, Message, MessageType, SmolStr};
use crate::messenger::{Messenger, short_type_name};
use crate::{Request, RequestContext};

/// The header (a bag entry) a routing slip travels in, as JSON.
pub const ROUTING_SLIP_HEADER: &str = "routing-slip";

/// One message of an itinerary, ready to be sent: its id (the request's),
/// where it goes, and its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlipMessage {
    /// The message id: the request's id, so a step forwarded twice (after a
    /// crash) is one message to the outbox and to the next step's inbox.
    pub id: Uuid,
    /// The topic it is sent to.
    pub topic: SmolStr,
    /// Command, event or document.
    pub message_type: MessageType,
    /// Its CloudEvents type (the request's type name unless the publication
    /// names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SmolStr>,
    /// The content type of the body.
    pub content_type: SmolStr,
    /// Its partition key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// The body, as text (what the request's mapper wrote).
    pub body: String,
}

/// One step of an itinerary: the message that does it, and the one that
/// undoes it if a later step fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlipStep {
    /// The step's message.
    pub message: SlipMessage,
    /// What undoes the step, if anything does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<SlipMessage>,
}

/// Which message of the slip the one carrying it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum SlipPosition {
    /// Step `index` of the itinerary.
    Step {
        /// The step's index.
        index: usize,
    },
    /// The compensation of step `index`.
    Compensation {
        /// The compensated step's index.
        index: usize,
    },
    /// The notification that every step was done.
    Completed,
    /// The notification that a step failed and the done steps were compensated.
    Faulted,
}

/// Why a slip is being compensated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlipFault {
    /// The step that failed.
    pub step: usize,
    /// Why (the error that would have dead-lettered it).
    pub reason: String,
}

/// A routing slip: the itinerary, how far along it the message is, and
/// why it is being compensated, if it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingSlip {
    /// The slip's id (a tracking number for its whole trip).
    pub id: Uuid,
    /// The steps, in order.
    pub itinerary: Vec<SlipStep>,
    /// Where the message carrying it is.
    pub position: SlipPosition,
    /// How many steps are done (the indicator a step is complete).
    pub completed: usize,
    /// Why the slip is compensating, once a step failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<SlipFault>,
    /// Sent when the last step is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_completed: Option<SlipMessage>,
    /// Sent when a step failed and every done step was compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_faulted: Option<SlipMessage>,
}

impl RoutingSlip {
    /// The slip `message` carries: `Ok(None)` when it carries none, an
    /// error when its header is not a routing slip.
    pub fn of(message: &Message) -> Result<Option<RoutingSlip>, Error> {
        let Some(text) = message.header.bag.get(ROUTING_SLIP_HEADER) else {
            return Ok(None);
        };
        let slip: RoutingSlip = serde_json::from_str(text).map_err(|e| {
            Error::Mapping(format!(
                "message {}: the {ROUTING_SLIP_HEADER} header is not a routing slip: {e}",
                message.id()
            ))
        })?;
        slip.check()?;
        Ok(Some(slip))
    }

    /// The slip as its header value.
    pub fn to_header(&self) -> Result<String, Error> {
        serde_json::to_string(self)
            .map_err(|e| Error::Mapping(format!("cannot write routing slip {}: {e}", self.id)))
    }

    /// Whether the slip reads as one the framework wrote: positions inside
    /// the itinerary. (Read from the wire, it may be anything.)
    fn check(&self) -> Result<(), Error> {
        let len = self.itinerary.len();
        let bad = |what: String| {
            Err(Error::Mapping(format!(
                "routing slip {}: {what} (itinerary of {len})",
                self.id
            )))
        };
        match self.position {
            SlipPosition::Step { index } | SlipPosition::Compensation { index } if index >= len => {
                bad(format!("position {index} is past the itinerary"))
            }
            _ if self.completed > len => bad(format!("{} steps done", self.completed)),
            _ => Ok(()),
        }
    }

    /// The message the slip's current position stands for.
    pub fn current(&self) -> Option<&SlipMessage> {
        match self.position {
            SlipPosition::Step { index } => self.itinerary.get(index).map(|s| &s.message),
            SlipPosition::Compensation { index } => self
                .itinerary
                .get(index)
                .and_then(|s| s.compensation.as_ref()),
            SlipPosition::Completed => self.on_completed.as_ref(),
            SlipPosition::Faulted => self.on_faulted.as_ref(),
        }
    }

    /// The slip moved on to `position`.
    fn at(&self, position: SlipPosition) -> RoutingSlip {
        RoutingSlip {
            position,
            ..self.clone()
        }
    }

    /// The compensation to run before (in reverse order) step `before`: the
    /// latest done step under it that has one; else the faulted notice.
    fn compensating_from(&self, before: usize) -> RoutingSlip {
        match (0..before)
            .rev()
            .find(|&i| self.itinerary[i].compensation.is_some())
        {
            Some(index) => self.at(SlipPosition::Compensation { index }),
            None => self.at(SlipPosition::Faulted),
        }
    }

    /// Where the slip goes after the message at its position was handled.
    /// `None` when it is at its end.
    pub fn after_success(&self) -> Option<RoutingSlip> {
        match self.position {
            SlipPosition::Step { index } => {
                let mut next = if index + 1 < self.itinerary.len() {
                    self.at(SlipPosition::Step { index: index + 1 })
                } else {
                    self.at(SlipPosition::Completed)
                };
                next.completed = index + 1;
                Some(next)
            }
            SlipPosition::Compensation { index } => Some(self.compensating_from(index)),
            SlipPosition::Completed | SlipPosition::Faulted => None,
        }
    }

    /// Where the slip goes when the message at its position failed for good
    /// with `reason`: a step's failure starts the compensations; `None` for a
    /// compensation or a notice that failed (dead-lettered like any message).
    pub fn after_fault(&self, reason: &str) -> Option<RoutingSlip> {
        match self.position {
            SlipPosition::Step { index } => {
                let mut next = self.compensating_from(index);
                next.fault = Some(SlipFault {
                    step: index,
                    reason: reason.to_owned(),
                });
                Some(next)
            }
            _ => None,
        }
    }
}

/// Plans a routing slip: steps in order, each with an optional compensation,
/// and the notices sent at the end. Made by
/// [`CommandProcessor::routing_slip`](crate::CommandProcessor::routing_slip),
/// whose publications and mappers turn requests into the slip's messages.
#[must_use]
pub struct RoutingSlipBuilder<'m> {
    messenger: &'m Messenger,
    itinerary: Vec<SlipStep>,
    on_completed: Option<SlipMessage>,
    on_faulted: Option<SlipMessage>,
    error: Option<Error>,
}

impl std::fmt::Debug for RoutingSlipBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingSlipBuilder")
            .field("itinerary", &self.itinerary)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<'m> RoutingSlipBuilder<'m> {
    pub(crate) fn new(messenger: &'m Messenger) -> Self {
        RoutingSlipBuilder {
            messenger,
            itinerary: Vec::new(),
            on_completed: None,
            on_faulted: None,
            error: None,
        }
    }

    fn message<R>(&mut self, request: &R, topic: Option<&str>) -> Option<SlipMessage>
    where
        R: Request + Serialize + DeserializeOwned,
    {
        if self.error.is_some() {
            return None;
        }
        match self.messenger.slip_message(request, topic) {
            Ok(message) => Some(message),
            Err(error) => {
                self.error = Some(error);
                None
            }
        }
    }

    /// The next step: `request`, sent where its publication says.
    pub fn step<R>(mut self, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        if let Some(message) = self.message(request, None) {
            self.itinerary.push(SlipStep {
                message,
                compensation: None,
            });
        }
        self
    }

    /// The next step: `request` as a command to `topic`.
    pub fn step_to<R>(mut self, topic: &str, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        if let Some(message) = self.message(request, Some(topic)) {
            self.itinerary.push(SlipStep {
                message,
                compensation: None,
            });
        }
        self
    }

    fn set_compensation(&mut self, compensation: Option<SlipMessage>) {
        let Some(compensation) = compensation else {
            return;
        };
        match self.itinerary.last_mut() {
            Some(step) => step.compensation = Some(compensation),
            None => {
                self.error = Some(Error::configuration(
                    "routing slip: a compensation comes after the step it undoes",
                ));
            }
        }
    }

    /// What undoes the step added last: `request`, sent where its
    /// publication says, if a later step fails.
    pub fn compensate<R>(mut self, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        let compensation = self.message(request, None);
        self.set_compensation(compensation);
        self
    }

    /// What undoes the step added last: `request` as a command to `topic`.
    pub fn compensate_to<R>(mut self, topic: &str, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        let compensation = self.message(request, Some(topic));
        self.set_compensation(compensation);
        self
    }

    /// Sent (where its publication says) when every step is done.
    pub fn on_completed<R>(mut self, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        self.on_completed = self.message(request, None);
        self
    }

    /// Sent (where its publication says) when a step failed and the done
    /// steps were compensated; its handler reads why from the slip
    /// ([`RequestContext::routing_slip`]).
    pub fn on_faulted<R>(mut self, request: &R) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        self.on_faulted = self.message(request, None);
        self
    }

    /// The slip, at its first step; fails when a request could not be
    /// mapped or the itinerary is empty.
    pub fn build(self) -> Result<RoutingSlip, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.itinerary.is_empty() {
            return Err(Error::configuration("routing slip: the itinerary is empty"));
        }
        let mut ids = std::collections::HashSet::new();
        let messages = self
            .itinerary
            .iter()
            .flat_map(|s| std::iter::once(&s.message).chain(s.compensation.as_ref()))
            .chain(self.on_completed.as_ref())
            .chain(self.on_faulted.as_ref());
        for message in messages {
            if !ids.insert(message.id) {
                return Err(Error::configuration(format!(
                    "routing slip: request id {} is used twice; each message needs its own",
                    message.id
                )));
            }
        }
        Ok(RoutingSlip {
            id: Uuid::now_v7(),
            itinerary: self.itinerary,
            position: SlipPosition::Step { index: 0 },
            completed: 0,
            fault: None,
            on_completed: self.on_completed,
            on_faulted: self.on_faulted,
        })
    }
}

impl Messenger {
    /// `request` as a message of a routing slip: mapped (with its mapper, or
    /// as JSON), to its publication's topic or to `topic`.
    fn slip_message<R>(&self, request: &R, topic: Option<&str>) -> Result<SlipMessage, Error>
    where
        R: Request + Serialize + DeserializeOwned,
    {
        let publication = match topic {
            Some(topic) => Publication::command(topic),
            None => self.publication::<R>()?.clone(),
        };
        let mapper = self.mapper_or_json::<R>();
        let message = mapper.to_message(request, &publication)?;
        let body = String::from_utf8(message.body.to_vec()).map_err(|_| {
            Error::Mapping(format!(
                "routing slip: {} maps to a body that is not text; a slip carries its steps as text",
                type_name::<R>()
            ))
        })?;
        Ok(SlipMessage {
            id: message.header.id,
            topic: publication.topic,
            message_type: publication.message_type,
            kind: publication
                .cloud_events
                .kind
                .or_else(|| Some(SmolStr::new_static(short_type_name::<R>()))),
            content_type: message.header.content_type,
            partition_key: message.header.partition_key,
            body,
        })
    }

    /// The message at `slip`'s position, carrying the slip, in conversation
    /// `correlation_id`.
    pub(crate) fn slip_to_message(
        &self,
        slip: &RoutingSlip,
        correlation_id: Uuid,
    ) -> Result<Option<Message>, Error> {
        let Some(next) = slip.current() else {
            return Ok(None);
        };
        let mut header = crate::MessageHeader::new(next.topic.clone(), next.message_type);
        header.id = next.id;
        header.correlation_id = correlation_id;
        header.content_type.clone_from(&next.content_type);
        header.partition_key.clone_from(&next.partition_key);
        header
            .bag
            .insert(ROUTING_SLIP_HEADER.to_owned(), slip.to_header()?);
        let ce = &mut header.cloud_events;
        ce.source = Some(self.source().clone());
        ce.kind.clone_from(&next.kind);
        ce.specversion = Some(SmolStr::new_static(CLOUD_EVENTS_SPEC_VERSION));
        crate::telemetry::inject(&opentelemetry::Context::current(), &mut header.trace);
        let message = Message::new(header, next.body.clone().into_bytes());
        message.validate_for_send()?;
        Ok(Some(message))
    }

    /// Posts the first step of `slip`, in conversation `correlation_id`
    /// (the slip's id when `None`); returns its message id.
    pub(crate) async fn post_routing_slip(
        &self,
        slip: &RoutingSlip,
        correlation_id: Option<Uuid>,
    ) -> Result<Uuid, Error> {
        let message = self
            .slip_to_message(slip, correlation_id.unwrap_or(slip.id))?
            .ok_or_else(|| Error::configuration("routing slip: nothing to send at its position"))?;
        self.post_message(message).await
    }
}

/// After the handler of a message carrying `slip` returned `result`: on
/// success the slip goes on (the next step, the next compensation, or the
/// end notice); when the message would be dead-lettered and it was a step,
/// the compensations start instead and the failed message is acknowledged
/// (the fault replaces it). Anything else is returned as it was.
pub(crate) async fn follow(
    messenger: &Messenger,
    message: &Message,
    slip: &RoutingSlip,
    result: Result<(), Error>,
) -> Result<(), Error> {
    let next = match result {
        Ok(()) => slip.after_success(),
        Err(error) => match Settlement::of(&error) {
            Settlement::DeadLetter(reason) => match slip.after_fault(&reason) {
                Some(next) => {
                    tracing::info!(slip = %slip.id, id = %message.id(), %reason, "routing slip step failed; compensating the steps done");
                    Some(next)
                }
                None => return Err(error),
            },
            _ => return Err(error),
        },
    };
    let Some(next) = next else {
        return Ok(());
    };
    if let Some(forward) = messenger.slip_to_message(&next, message.header.correlation_id)? {
        messenger.post_message(forward).await?;
    }
    Ok(())
}

impl RequestContext {
    /// The routing slip the message being handled carries, if it carries
    /// one: the itinerary, the steps done, and why it is compensating.
    pub fn routing_slip(&self) -> Option<RoutingSlip> {
        self.message()
            .and_then(|m| RoutingSlip::of(m).ok().flatten())
    }
}
