//! Message mappers: turn a request into a message and back. [`JsonMapper`] is the
//! default, with serde JSON bodies.

use std::any::type_name;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::command::request::Request;
use crate::error::Error;
use crate::message::publication::Publication;
use crate::message::{JSON_CONTENT_TYPE, Message, MessageHeader, SmolStr};

/// Maps requests of type `R` to messages and back.
///
/// `to_message` writes the body and whatever header fields the mapper owns; the
/// processor then fills in correlation id, reply-to, delay, CloudEvents attributes
/// and trace context. `to_request` must not panic on bad input: return
/// [`Error::Mapping`] and the pump sends the message to the invalid-message channel.
pub trait MessageMapper<R>: Send + Sync + 'static {
    /// The message for `request`, to be sent as `publication` says.
    fn to_message(&self, request: &R, publication: &Publication) -> Result<Message, Error>;

    /// The request carried by `message`.
    fn to_request(&self, message: &Message) -> Result<R, Error>;
}

/// Maps any `Serialize + DeserializeOwned` request to a JSON body.
///
/// Reading is tolerant: unknown fields are ignored, fields with
/// `#[serde(default)]` may be missing, and any JSON content type (or none) is
/// accepted. Writing is strict: the message id is the request id and must not be
/// nil, and the topic comes from the publication.
///
/// ```
/// use brighter_core::{JsonMapper, MessageMapper, Publication, Request};
/// use serde::{Deserialize, Serialize};
/// use uuid::Uuid;
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct Greet { id: Uuid, name: String }
/// impl Request for Greet { fn id(&self) -> Uuid { self.id } }
///
/// let greet = Greet { id: Uuid::now_v7(), name: "Ada".into() };
/// let message = JsonMapper.to_message(&greet, &Publication::command("greetings")).unwrap();
/// assert_eq!(message.header.id, greet.id);
/// assert_eq!(message.header.topic, "greetings");
/// let back: Greet = JsonMapper.to_request(&message).unwrap();
/// assert_eq!(back, greet);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonMapper;

impl<R> MessageMapper<R> for JsonMapper
where
    R: Request + Serialize + DeserializeOwned,
{
    fn to_message(&self, request: &R, publication: &Publication) -> Result<Message, Error> {
        let body = serde_json::to_vec(request).map_err(|e| {
            Error::Mapping(format!(
                "cannot serialize {} to JSON: {e}",
                type_name::<R>()
            ))
        })?;
        let mut header = MessageHeader::new(publication.topic.clone(), publication.message_type);
        header.id = request.id();
        header.correlation_id = request.id();
        header.content_type = SmolStr::new_static(JSON_CONTENT_TYPE);
        header.partition_key = request.partition_key();
        let message = Message::new(header, body);
        message.validate_for_send()?;
        Ok(message)
    }

    fn to_request(&self, message: &Message) -> Result<R, Error> {
        if !is_json(&message.header.content_type) {
            return Err(Error::Mapping(format!(
                "message {} has content type '{}', the JSON mapper of {} reads JSON only",
                message.header.id,
                message.header.content_type,
                type_name::<R>()
            )));
        }
        serde_json::from_slice(&message.body).map_err(|e| {
            Error::Mapping(format!(
                "message {} is not a valid {}: {e}",
                message.header.id,
                type_name::<R>()
            ))
        })
    }
}

fn is_json(content_type: &str) -> bool {
    // Compared without case and without a lowercased copy: this runs for
    // every message received.
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let starts = |prefix: &str| {
        essence
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    let ends = |suffix: &str| {
        essence.len() >= suffix.len()
            && essence
                .get(essence.len() - suffix.len()..)
                .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
    };
    essence.is_empty()
        || essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/json")
        || (starts("application/") && ends("+json"))
}
