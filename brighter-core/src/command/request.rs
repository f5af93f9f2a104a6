//! Requests: commands and events.

use uuid::Uuid;

/// Anything the command processor can dispatch: it has a unique id.
///
/// Implement [`Command`] or [`Event`] on top of it to say how it is dispatched.
pub trait Request: Send + Sync + 'static {
    /// The request's unique id. It becomes the message id when the request is
    /// posted, and is the inbox key on the consumer side; make it with
    /// `Uuid::now_v7()` so message ids are time-ordered.
    fn id(&self) -> Uuid;

    /// Messages with the same partition key are delivered in order (Kafka record
    /// key, RabbitMQ consistent ordering within a queue). `None` by default.
    fn partition_key(&self) -> Option<String> {
        None
    }

    /// The JSON Schema (draft 07, subschemas inlined) of the request as its
    /// message body, for the AsyncAPI document; `None` by default. The
    /// derives return the type's schema when it also derives
    /// `schemars::JsonSchema`; by hand, return
    /// `Some(brighter_core::describe_schema::<Self>())`.
    fn json_schema() -> Option<serde_json::Value>
    where
        Self: Sized,
    {
        None
    }
}

/// The JSON Schema of `T` as a message payload: draft 07, every subschema
/// inlined (no `$ref` into definitions, which an AsyncAPI document would
/// resolve against its own root), no `$schema` key.
pub fn describe_schema<T: schemars::JsonSchema>() -> serde_json::Value {
    let mut settings = schemars::generate::SchemaSettings::draft07();
    settings.inline_subschemas = true;
    settings.meta_schema = None;
    settings
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// For the derives: picks [`describe_schema`] when the type derives
/// `JsonSchema`, `None` otherwise (autoref specialization: the first trait
/// whose method applies wins).
#[doc(hidden)]
pub mod probe {
    use std::marker::PhantomData;

    /// A type to ask about.
    pub struct Probe<T>(PhantomData<T>);

    impl<T> Probe<T> {
        /// The probe of `T`.
        pub fn new() -> Self {
            Probe(PhantomData)
        }
    }

    impl<T> Default for Probe<T> {
        fn default() -> Self {
            Probe::new()
        }
    }

    /// Chosen when `T: JsonSchema`.
    pub trait HasSchema {
        /// `T`'s schema.
        fn json_schema(&self) -> Option<serde_json::Value>;
    }

    impl<T: schemars::JsonSchema> HasSchema for Probe<T> {
        fn json_schema(&self) -> Option<serde_json::Value> {
            Some(super::describe_schema::<T>())
        }
    }

    /// Chosen otherwise.
    pub trait NoSchema {
        /// None.
        fn json_schema(&self) -> Option<serde_json::Value>;
    }

    impl<T> NoSchema for &Probe<T> {
        fn json_schema(&self) -> Option<serde_json::Value> {
            None
        }
    }
}

/// A request with exactly one handler: `send` runs it, `post` sends it as a message.
pub trait Command: Request {}

/// A request with any number of handlers: `publish` runs them all.
pub trait Event: Request {}
