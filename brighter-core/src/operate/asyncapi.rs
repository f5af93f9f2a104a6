//! An AsyncAPI 3.0 document of what a service publishes and subscribes to,
//! made from its processor and dispatcher: servers (from the transports,
//! without credentials), channels, operations (`send` for publications with
//! the reply channel of `call`, `receive` for subscriptions), messages with
//! the JSON Schemas of the request types and the framework's headers, and
//! the Kafka and AMQP bindings.
//!
//! ```
//! # use brighter_core::{AsyncApi, Command, CommandProcessor, Dispatcher, InMemoryBroker, Publication, Subscription};
//! # #[derive(Command, serde::Serialize, serde::Deserialize, brighter_core::schemars::JsonSchema)]
//! # #[schemars(crate = "brighter_core::schemars")]
//! # struct Greet { id: uuid::Uuid, name: String }
//! # struct GreetHandler;
//! # impl brighter_core::Handler<Greet> for GreetHandler {
//! #     async fn handle(&self, _: &Greet, _: &mut brighter_core::RequestContext) -> Result<(), brighter_core::Error> { Ok(()) }
//! # }
//! let broker = InMemoryBroker::new();
//! let processor = CommandProcessor::builder()
//!     .command(GreetHandler)
//!     .publication::<Greet>(Publication::command("greetings"))
//!     .producer(broker.clone())
//!     .build()?;
//! let dispatcher = Dispatcher::builder(processor.clone())
//!     .subscription(Subscription::command::<Greet>("greeter", "greetings", broker))
//!     .build()?;
//! let document = AsyncApi::new("greetings", "1.0.0")
//!     .processor(&processor)
//!     .dispatcher(&dispatcher)
//!     .document();
//! assert_eq!(document["asyncapi"], "3.0.0");
//! assert_eq!(document["operations"]["send.Greet"]["action"], "send");
//! assert_eq!(document["components"]["messages"]["Greet"]["payload"]["properties"]["name"]["type"], "string");
//! # Ok::<(), brighter_core::Error>(())
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::message::publication::Publication;
use crate::message::{MessageType, wire};
use crate::{CommandProcessor, Dispatcher};

/// Where a transport sends and receives, as an AsyncAPI server: no
/// credentials, ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The server's name in the document, e.g. `rabbitmq` or `kafka`.
    pub name: String,
    /// Host and port (several, comma separated, for a Kafka cluster).
    pub host: String,
    /// `kafka`, `kafka-secure`, `amqp` or `amqps`.
    pub protocol: String,
    /// The AMQP virtual host.
    pub pathname: Option<String>,
    /// The exchange publications go through (AMQP) and its kind (`topic`,
    /// `direct`, `fanout`).
    pub exchange: Option<(String, String)>,
    /// Partitions and replication factor of the topics the transport
    /// creates (Kafka).
    pub partitions: Option<(i32, i32)>,
}

impl Endpoint {
    fn is_kafka(&self) -> bool {
        self.protocol.starts_with("kafka")
    }

    fn is_amqp(&self) -> bool {
        self.protocol.starts_with("amqp")
    }
}

/// A publication as the document shows it.
#[derive(Debug, Clone)]
pub struct DescribedPublication {
    /// The request's Rust type.
    pub request_type: &'static str,
    /// Its short name (the message's name in the document).
    pub name: &'static str,
    /// Where it goes.
    pub publication: Publication,
    /// Its JSON Schema, when the type has one ([`Request::json_schema`](crate::Request::json_schema)).
    pub schema: Option<Value>,
    /// The server of its producer.
    pub endpoint: Option<Endpoint>,
}

/// A subscription as the document shows it.
#[derive(Debug, Clone)]
pub struct DescribedSubscription {
    /// The subscription's name.
    pub name: String,
    /// The topic it consumes.
    pub topic: String,
    /// Its queue (AMQP) or consumer group (Kafka).
    pub channel: String,
    /// The request's Rust type.
    pub request_type: &'static str,
    /// Its short name.
    pub message: &'static str,
    /// Command or event.
    pub kind: MessageType,
    /// Its JSON Schema, when the type has one.
    pub schema: Option<Value>,
    /// The server of its channel factory.
    pub endpoint: Option<Endpoint>,
}

/// What a request with a reply (`call`) is answered with.
#[derive(Debug, Clone)]
pub struct DescribedReply {
    /// The reply's Rust type.
    pub request_type: &'static str,
    /// Its short name.
    pub name: &'static str,
    /// Its JSON Schema, when it has one.
    pub schema: Option<Value>,
}

/// Builds the AsyncAPI 3.0 document of a service from its processor (what
/// it publishes) and its dispatchers (what it subscribes to).
#[derive(Debug, Clone)]
#[must_use]
pub struct AsyncApi {
    title: String,
    version: String,
    description: Option<String>,
    publications: Vec<DescribedPublication>,
    replies: Option<Endpoint>,
    subscriptions: Vec<DescribedSubscription>,
}

const KAFKA_BINDING: &str = "0.5.0";
const AMQP_BINDING: &str = "0.3.0";

/// A key the document may use for a component: letters, digits, `.`, `-`
/// and `_`; anything else becomes `_`.
fn key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn reference(path: &str) -> Value {
    json!({ "$ref": path })
}

/// The framework's headers, as `binding` names them, as a JSON Schema.
fn headers(binding: Option<wire::CloudEventsBinding>) -> Value {
    let string = |description: &str| json!({ "type": "string", "description": description });
    let mut properties = Map::new();
    let mut add = |name: &str, schema: Value| {
        properties.insert(name.to_owned(), schema);
    };
    add(
        wire::ID,
        json!({ "type": "string", "format": "uuid", "description": "message id (the request's id)" }),
    );
    add(wire::TOPIC, string("the topic the message was sent to"));
    add(
        wire::MESSAGE_TYPE,
        json!({ "type": "string", "enum": ["command", "event", "document"] }),
    );
    add(
        wire::TIMESTAMP,
        json!({ "type": "string", "format": "date-time" }),
    );
    add(
        wire::CORRELATION_ID,
        json!({ "type": "string", "format": "uuid", "description": "the conversation" }),
    );
    add(wire::CONTENT_TYPE, string("content type of the body"));
    add(wire::HANDLED_COUNT, string("requeues so far (a number)"));
    add(wire::DELAY_MS, string("delay in milliseconds (a number)"));
    add(wire::REPLY_TO, string("where a reply goes (call)"));
    add(
        wire::PARTITION_KEY,
        string("messages of one key keep their order"),
    );
    add(wire::TRACEPARENT, string("W3C trace context"));
    add(wire::TRACESTATE, string("W3C trace state"));
    add(wire::BAGGAGE, string("W3C baggage"));
    if let Some(binding) = binding {
        for attribute in [
            "id",
            "source",
            "specversion",
            "type",
            "time",
            "subject",
            "dataschema",
        ] {
            add(
                &binding.key(attribute),
                string(&format!("CloudEvents `{attribute}`")),
            );
        }
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": [wire::ID, wire::TOPIC, wire::CORRELATION_ID],
        "additionalProperties": { "type": "string" },
    })
}

/// The document's parts as they are gathered.
#[derive(Default)]
struct Parts {
    servers: BTreeMap<String, Value>,
    channels: BTreeMap<String, Map<String, Value>>,
    operations: BTreeMap<String, Value>,
    messages: BTreeMap<String, Value>,
    schemas: BTreeMap<String, Value>,
}

impl Parts {
    /// Registers `endpoint` as a server; its key.
    fn server(&mut self, endpoint: &Endpoint) -> String {
        let name = key(&endpoint.name);
        let mut server = json!({
            "host": endpoint.host,
            "protocol": endpoint.protocol,
        });
        if let Some(path) = &endpoint.pathname {
            server["pathname"] = json!(path);
        }
        self.servers.insert(name.clone(), server);
        name
    }

    /// The headers schema for messages on `endpoint`; its reference.
    fn headers(&mut self, endpoint: Option<&Endpoint>) -> Value {
        let (name, binding) = match endpoint {
            Some(e) if e.is_kafka() => ("KafkaHeaders", Some(wire::CloudEventsBinding::Kafka)),
            Some(e) if e.is_amqp() => ("AmqpHeaders", Some(wire::CloudEventsBinding::Amqp)),
            _ => ("Headers", None),
        };
        self.schemas
            .entry(name.to_owned())
            .or_insert_with(|| headers(binding));
        reference(&format!("#/components/schemas/{name}"))
    }

    /// Registers message `name`; its key.
    fn message(
        &mut self,
        name: &str,
        request_type: &str,
        kind: &str,
        schema: Option<&Value>,
        endpoint: Option<&Endpoint>,
        keyed: bool,
    ) -> String {
        let id = key(name);
        if self.messages.contains_key(&id) {
            return id;
        }
        let payload = schema.cloned().unwrap_or_else(|| {
            json!({
                "type": "object",
                "description": format!("{request_type} as JSON (the type derives no schemars::JsonSchema)"),
            })
        });
        let mut message = json!({
            "name": name,
            "title": name,
            "summary": format!("{kind} {request_type}"),
            "contentType": crate::JSON_CONTENT_TYPE,
            "headers": self.headers(endpoint),
            "payload": payload,
            "correlationId": { "location": format!("$message.header#/{}", wire::CORRELATION_ID) },
        });
        if keyed && endpoint.is_some_and(Endpoint::is_kafka) {
            message["bindings"] = json!({
                "kafka": { "key": { "type": "string", "description": "the partition key" }, "bindingVersion": KAFKA_BINDING }
            });
        }
        self.messages.insert(id.clone(), message);
        id
    }

    /// A channel at `address` carrying `message`; its key.
    fn channel(
        &mut self,
        id: &str,
        address: Option<&str>,
        description: &str,
        message: &str,
        endpoint: Option<&Endpoint>,
        bindings: Option<Value>,
    ) -> String {
        let id = key(id);
        let server = endpoint.map(|e| self.server(e));
        let channel = self.channels.entry(id.clone()).or_insert_with(|| {
            let mut channel = Map::new();
            channel.insert("address".into(), json!(address));
            channel.insert("description".into(), json!(description));
            channel.insert("messages".into(), json!({}));
            if let Some(server) = server {
                channel.insert(
                    "servers".into(),
                    json!([reference(&format!("#/servers/{server}"))]),
                );
            }
            if let Some(bindings) = bindings {
                channel.insert("bindings".into(), bindings);
            }
            channel
        });
        if let Some(messages) = channel.get_mut("messages").and_then(Value::as_object_mut) {
            messages.insert(
                message.to_owned(),
                reference(&format!("#/components/messages/{message}")),
            );
        }
        id
    }
}

fn kafka_topic(topic: &str, endpoint: &Endpoint) -> Value {
    let mut binding = json!({ "topic": topic, "bindingVersion": KAFKA_BINDING });
    if let Some((partitions, replicas)) = endpoint.partitions {
        binding["partitions"] = json!(partitions);
        binding["replicas"] = json!(replicas);
    }
    json!({ "kafka": binding })
}

fn amqp_exchange(endpoint: &Endpoint) -> Value {
    let (name, kind) = endpoint
        .exchange
        .clone()
        .unwrap_or_else(|| ("amq.topic".into(), "topic".into()));
    json!({
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": name,
                "type": kind,
                "durable": true,
                "autoDelete": false,
                "vhost": endpoint.pathname.clone().unwrap_or_else(|| "/".into()),
            },
            "bindingVersion": AMQP_BINDING,
        }
    })
}

fn amqp_queue(queue: &str, endpoint: &Endpoint) -> Value {
    json!({
        "amqp": {
            "is": "queue",
            "queue": {
                "name": queue,
                "durable": true,
                "exclusive": false,
                "autoDelete": false,
                "vhost": endpoint.pathname.clone().unwrap_or_else(|| "/".into()),
            },
            "bindingVersion": AMQP_BINDING,
        }
    })
}

impl AsyncApi {
    /// A document titled `title`, of the service's version `version`.
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        AsyncApi {
            title: title.into(),
            version: version.into(),
            description: None,
            publications: Vec::new(),
            replies: None,
            subscriptions: Vec::new(),
        }
    }

    /// The service's description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// What `processor` publishes (and the reply channel of its `call`s).
    pub fn processor(mut self, processor: &CommandProcessor) -> Self {
        let messenger = processor.messenger();
        self.publications.extend(messenger.publications());
        if let Some(replies) = messenger.reply_endpoint() {
            self.replies = Some(replies);
        }
        self
    }

    /// What `dispatcher` subscribes to.
    pub fn dispatcher(mut self, dispatcher: &Dispatcher) -> Self {
        self.subscriptions.extend(dispatcher.subscriptions());
        self
    }

    /// The document, as JSON.
    pub fn document(&self) -> Value {
        let mut parts = Parts::default();
        for p in &self.publications {
            self.send_operation(&mut parts, p);
        }
        for s in &self.subscriptions {
            Self::receive_operation(&mut parts, s);
        }
        let mut info = json!({ "title": self.title, "version": self.version });
        if let Some(description) = &self.description {
            info["description"] = json!(description);
        }
        let channels: Map<String, Value> = parts
            .channels
            .into_iter()
            .map(|(k, v)| (k, Value::Object(v)))
            .collect();
        json!({
            "asyncapi": "3.0.0",
            "info": info,
            "defaultContentType": crate::JSON_CONTENT_TYPE,
            "servers": parts.servers,
            "channels": channels,
            "operations": parts.operations,
            "components": { "messages": parts.messages, "schemas": parts.schemas },
        })
    }

    /// The document as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.document()).unwrap_or_default()
    }

    fn send_operation(&self, parts: &mut Parts, p: &DescribedPublication) {
        let endpoint = p.endpoint.as_ref();
        let topic = &p.publication.topic;
        let kind = p.publication.message_type.as_str();
        let message = parts.message(
            p.name,
            p.request_type,
            kind,
            p.schema.as_ref(),
            endpoint,
            true,
        );
        let bindings = endpoint.and_then(|e| {
            if e.is_kafka() {
                Some(kafka_topic(topic, e))
            } else if e.is_amqp() {
                Some(amqp_exchange(e))
            } else {
                None
            }
        });
        let channel = parts.channel(
            topic,
            Some(topic),
            &format!("topic {topic}"),
            &message,
            endpoint,
            bindings,
        );
        let mut operation = json!({
            "action": "send",
            "title": format!("send {}", p.name),
            "summary": format!("{kind} {} sent to {topic} (through the outbox)", p.name),
            "channel": reference(&format!("#/channels/{channel}")),
            "messages": [reference(&format!("#/channels/{channel}/messages/{message}"))],
        });
        if endpoint.is_some_and(Endpoint::is_amqp) {
            operation["bindings"] = json!({ "amqp": { "deliveryMode": 2, "mandatory": true, "bindingVersion": AMQP_BINDING } });
        }
        if let Some(reply) = &p.publication.reply {
            let replies = self.replies.as_ref();
            let answer = parts.message(
                reply.name,
                reply.request_type,
                "document",
                reply.schema.as_ref(),
                replies,
                false,
            );
            let reply_channel = parts.channel(
                "replies",
                None,
                "the processor's private reply channel (a queue or topic of its own), named in each request's reply-to header",
                &answer,
                replies,
                None,
            );
            operation["reply"] = json!({
                "address": {
                    "location": format!("$message.header#/{}", wire::REPLY_TO),
                    "description": "the reply channel the request names",
                },
                "channel": reference(&format!("#/channels/{reply_channel}")),
                "messages": [reference(&format!("#/channels/{reply_channel}/messages/{answer}"))],
            });
        }
        parts
            .operations
            .insert(key(&format!("send.{}", p.name)), operation);
    }

    fn receive_operation(parts: &mut Parts, s: &DescribedSubscription) {
        let endpoint = s.endpoint.as_ref();
        let kind = s.kind.as_str();
        let message = parts.message(
            s.message,
            s.request_type,
            kind,
            s.schema.as_ref(),
            endpoint,
            true,
        );
        let mut operation = json!({
            "action": "receive",
            "title": format!("receive {}", s.message),
            "summary": format!(
                "subscription {}: {kind} {} from {} through {}; dead letters go to its dead-letter channel, unreadable messages to its invalid-message channel",
                s.name, s.message, s.topic, s.channel
            ),
        });
        let channel = match endpoint {
            Some(e) if e.is_amqp() => {
                let queue = &s.channel;
                parts.channel(
                    &format!("queue.{queue}"),
                    Some(queue),
                    &format!("queue {queue}, bound to topic {} of the exchange", s.topic),
                    &message,
                    endpoint,
                    Some(amqp_queue(queue, e)),
                )
            }
            Some(e) if e.is_kafka() => {
                operation["bindings"] = json!({
                    "kafka": {
                        "groupId": { "type": "string", "enum": [s.channel] },
                        "bindingVersion": KAFKA_BINDING,
                    }
                });
                parts.channel(
                    &s.topic,
                    Some(&s.topic),
                    &format!("topic {}", s.topic),
                    &message,
                    endpoint,
                    Some(kafka_topic(&s.topic, e)),
                )
            }
            _ => parts.channel(
                &s.topic,
                Some(&s.topic),
                &format!("topic {}", s.topic),
                &message,
                endpoint,
                None,
            ),
        };
        operation["channel"] = reference(&format!("#/channels/{channel}"));
        operation["messages"] = json!([reference(&format!(
            "#/channels/{channel}/messages/{message}"
        ))]);
        parts
            .operations
            .insert(key(&format!("receive.{}", s.name)), operation);
    }
}
