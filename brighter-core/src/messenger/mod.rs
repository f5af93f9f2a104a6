//! The outgoing side: a [`Messenger`] owns the publications, mappers,
//! producers and the outbox; it writes the framework's header fields in one
//! place, validates a message once, and has one send path, with the per-key
//! order rule, for every way a message leaves (post, clear, sweepers, call,
//! reply). The command processor holds one and delegates to it.

pub(crate) mod producer;
mod replies;

use std::any::{Any, TypeId, type_name};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use opentelemetry::trace::SpanKind;
use opentelemetry::{Context as OtelContext, KeyValue};
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::Request;
use crate::dispatch::channel::ChannelFactory;
use crate::error::Error;
use crate::message::mapper::{JsonMapper, MessageMapper};
use crate::message::publication::Publication;
use crate::message::transform::{acked_all, unwrap_all, wrap_all};
use crate::message::{CLOUD_EVENTS_SPEC_VERSION, Message, MessageType, SmolStr};
use crate::messenger::producer::Producer;
use crate::store::{Due, Transaction};
use crate::telemetry::{self, Telemetry, attributes as attr, traced};
use crate::{InMemoryOutbox, Outbox};
use replies::Replies;

type ErasedMapper = Box<dyn Any + Send + Sync>;

/// A publication's request type, for the AsyncAPI document.
#[derive(Debug, Clone, Copy)]
struct Catalogued {
    request_type: &'static str,
    name: &'static str,
    schema: fn() -> Option<serde_json::Value>,
}

/// Configures a [`Messenger`]; reached through the
/// [`CommandProcessorBuilder`](crate::CommandProcessorBuilder), whose messaging
/// methods delegate here.
#[derive(Default)]
#[must_use]
pub struct MessengerBuilder {
    publications: FxHashMap<TypeId, (Catalogued, Publication)>,
    mappers: FxHashMap<TypeId, ErasedMapper>,
    default_producer: Option<Arc<dyn Producer>>,
    topic_producers: HashMap<String, Arc<dyn Producer>>,
    named_producers: HashMap<String, Arc<dyn Producer>>,
    outbox: Option<Arc<dyn Outbox>>,
    outbox_limit: Option<u64>,
    reply_channels: Option<Arc<dyn ChannelFactory>>,
    source: Option<String>,
    errors: Vec<String>,
}

/// The outgoing side of a processor: publications, mappers, producers and the
/// outbox, and every way a message leaves. Cheap to clone.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

struct Inner {
    publications: FxHashMap<TypeId, Publication>,
    /// Every publication with its request type, for the AsyncAPI document.
    catalog: Vec<(Catalogued, Publication)>,
    mappers: FxHashMap<TypeId, ErasedMapper>,
    /// topic -> producer, from publications and topic producers.
    routes: HashMap<String, Arc<dyn Producer>>,
    /// Topics whose publication drops a message no queue is bound to.
    droppable: HashSet<String>,
    default_producer: Option<Arc<dyn Producer>>,
    pub(crate) outbox: Arc<dyn Outbox>,
    outbox_limit: Option<u64>,
    reply_channels: Option<Arc<dyn ChannelFactory>>,
    /// The one reply channel, opened by the first `call`.
    replies: tokio::sync::OnceCell<Replies>,
    source: SmolStr,
    telemetry: Telemetry,
    /// Sweepers started on this messenger and still running.
    sweepers: AtomicUsize,
    /// Whether the missing-sweeper warning was logged.
    warned_no_sweeper: AtomicBool,
}

/// Counts a running sweeper on its messenger until dropped.
#[derive(Debug)]
pub(crate) struct SweeperRunning(Messenger);

impl Drop for SweeperRunning {
    fn drop(&mut self) {
        self.0.inner.sweepers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `message` as handed to a producer once it is due: the outbox held it for
/// its delay, so no producer waits again.
/// How long a writer holds what it posts (or takes with `clear_outbox`)
/// before a sweeper may send it: the writer sends at once and gives up
/// after this; a message it could not send is the sweepers' at once.
pub const SEND_LEASE: Duration = Duration::from_secs(5);

/// Where a deposit goes.
enum Deposit<'a> {
    /// Into the outbox, in the caller's transaction when given, for a
    /// sweeper or a later `clear_outbox`.
    Outbox(Option<&'a mut dyn Transaction>),
    /// Into the outbox, leased to this writer, which sends it at once.
    ToSend,
}

pub(crate) fn due_now(mut message: Message) -> Message {
    message.header.delay = Duration::ZERO;
    message
}

impl fmt::Debug for Messenger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messenger")
            .field("publications", &self.inner.publications.len())
            .field("routes", &self.inner.routes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for MessengerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessengerBuilder")
            .field("publications", &self.publications.len())
            .field("mappers", &self.mappers.len())
            .finish_non_exhaustive()
    }
}

impl MessengerBuilder {
    /// Checks the configuration (a mapper and a producer for every
    /// publication, one producer per topic) and builds the messenger. One
    /// function: each check names the publication it refuses.
    pub(crate) fn build(self, telemetry: Telemetry) -> Result<Messenger, Error> {
        if let Some(reason) = self.errors.into_iter().next() {
            return Err(Error::configuration(reason));
        }
        let mut routes = self.topic_producers;
        let mut publications = FxHashMap::default();
        let mut catalog = Vec::new();
        let mut droppable = HashSet::new();
        for (type_id, (catalogued, publication)) in self.publications {
            let name = catalogued.request_type;
            if !self.mappers.contains_key(&type_id) {
                return Err(Error::configuration(format!(
                    "publication of {name} to '{}' has no message mapper: register one with .mapper::<{name}>(..)",
                    publication.topic
                )));
            }
            if publication.drop_if_unrouted && publication.message_type != MessageType::Event {
                return Err(Error::configuration(format!(
                    "publication of {name} to '{}' is a {}: only events may be dropped when no queue is bound (drop_if_unrouted)",
                    publication.topic,
                    publication.message_type.as_str()
                )));
            }
            if publication.topic.trim().is_empty() {
                return Err(Error::configuration(format!(
                    "publication of {name} has an empty topic"
                )));
            }
            let producer = match &publication.producer {
                Some(producer) => self.named_producers.get(producer).cloned().ok_or_else(|| {
                    Error::configuration(format!(
                        "publication of {name} uses producer '{producer}', which is not registered"
                    ))
                })?,
                None => routes
                    .get(publication.topic.as_str())
                    .or(self.default_producer.as_ref())
                    .cloned()
                    .ok_or_else(|| {
                        Error::configuration(format!(
                            "no producer for topic '{}' (publication of {name}): register a default producer or one for the topic",
                            publication.topic
                        ))
                    })?,
            };
            if let Some(existing) = routes.get(publication.topic.as_str())
                && !Arc::ptr_eq(existing, &producer)
            {
                return Err(Error::configuration(format!(
                    "topic '{}' is routed to two different producers",
                    publication.topic
                )));
            }
            if publication.drop_if_unrouted {
                droppable.insert(publication.topic.to_string());
            }
            routes.insert(publication.topic.to_string(), producer);
            catalog.push((catalogued, publication.clone()));
            publications.insert(type_id, publication);
        }
        catalog.sort_by(|a, b| a.1.topic.cmp(&b.1.topic).then(a.0.name.cmp(b.0.name)));
        Ok(Messenger {
            inner: Arc::new(Inner {
                publications,
                catalog,
                mappers: self.mappers,
                routes,
                droppable,
                default_producer: self.default_producer,
                outbox: self
                    .outbox
                    .unwrap_or_else(|| Arc::new(InMemoryOutbox::new())),
                outbox_limit: self.outbox_limit,
                reply_channels: self.reply_channels,
                replies: tokio::sync::OnceCell::new(),
                source: self
                    .source
                    .map_or_else(|| SmolStr::new_static("urn:brighter"), SmolStr::from),
                telemetry,
                sweepers: AtomicUsize::new(0),
                warned_no_sweeper: AtomicBool::new(false),
            }),
        })
    }

    /// The mapper between `R` and messages, used to post `R` and to read it in
    /// subscriptions. [`JsonMapper`] works for any serde type.
    pub fn mapper<R: Request>(mut self, mapper: impl MessageMapper<R>) -> Self {
        let mapper: Arc<dyn MessageMapper<R>> = Arc::new(mapper);
        self.mappers.insert(TypeId::of::<R>(), Box::new(mapper));
        self
    }

    /// Where `R` is sent when posted. Needs a producer for the topic, checked
    /// by `build`. The mapper is [`JsonMapper`] unless one
    /// is registered with [`mapper`](Self::mapper).
    pub fn publication<R>(mut self, publication: Publication) -> Self
    where
        R: Request + Serialize + DeserializeOwned,
    {
        self.mappers.entry(TypeId::of::<R>()).or_insert_with(|| {
            let json: Arc<dyn MessageMapper<R>> = Arc::new(JsonMapper);
            Box::new(json)
        });
        let catalogued = Catalogued {
            request_type: type_name::<R>(),
            name: short_type_name::<R>(),
            schema: R::json_schema,
        };
        if self
            .publications
            .insert(TypeId::of::<R>(), (catalogued, publication))
            .is_some()
        {
            self.errors
                .push(format!("{} has two publications", type_name::<R>()));
        }
        self
    }

    /// The producer for topics with no producer of their own.
    pub fn producer(mut self, producer: impl Producer) -> Self {
        self.default_producer = Some(Arc::new(producer));
        self
    }

    /// The producer for `topic`.
    pub fn producer_for_topic(mut self, topic: impl Into<String>, producer: impl Producer) -> Self {
        self.topic_producers
            .insert(topic.into(), Arc::new(producer));
        self
    }

    /// A producer that publications name with [`Publication::producer`].
    pub fn named_producer(mut self, name: impl Into<String>, producer: impl Producer) -> Self {
        self.named_producers.insert(name.into(), Arc::new(producer));
        self
    }

    /// The outbox (an [`InMemoryOutbox`] when none is given).
    pub fn outbox(mut self, outbox: impl Outbox) -> Self {
        self.outbox = Some(Arc::new(outbox));
        self
    }

    /// At most `limit` outstanding messages: past it, `deposit_post` fails with
    /// [`Error::Backpressure`] instead of letting the outbox grow without bound.
    pub fn outbox_limit(mut self, limit: u64) -> Self {
        self.outbox_limit = Some(limit);
        self
    }

    /// Where `call` opens its reply channel.
    pub fn reply_channels(mut self, factory: impl ChannelFactory) -> Self {
        self.reply_channels = Some(Arc::new(factory));
        self
    }

    /// The CloudEvents `source` of messages whose publication sets none.
    pub fn cloud_events_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }
}

pub(crate) fn short_type_name<R>() -> &'static str {
    let full = type_name::<R>();
    let base = full.split('<').next().unwrap_or(full);
    // Segments are separated by `::` and a type name has no other ':', so
    // the last segment follows the last ':' (found by a byte search, where
    // the two-character separator takes a substring search per call).
    base.rsplit(':').next().unwrap_or(base)
}

/// What the messenger's one send path did with a set of messages.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Sent and confirmed: (id, topic).
    pub sent: Vec<(Uuid, SmolStr)>,
    /// Failed: (id, topic, the error).
    pub failed: Vec<(Uuid, SmolStr, Error)>,
    /// Not tried: an earlier message of their partition key failed in this
    /// send, or is outstanding outside it (the sweeper sends them in order).
    pub not_tried: Vec<Uuid>,
}

impl Messenger {
    /// The outbox this messenger deposits into.
    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.inner.outbox
    }

    /// The tracer and metric instruments messages are sent with.
    pub fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }

    /// Every publication, as the AsyncAPI document shows it.
    pub fn publications(&self) -> Vec<crate::operate::asyncapi::DescribedPublication> {
        self.inner
            .catalog
            .iter()
            .map(
                |(c, publication)| crate::operate::asyncapi::DescribedPublication {
                    request_type: c.request_type,
                    name: c.name,
                    publication: publication.clone(),
                    schema: (c.schema)(),
                    endpoint: self
                        .producer_for(&publication.topic)
                        .ok()
                        .and_then(|p| p.endpoint()),
                },
            )
            .collect()
    }

    /// Where `call` receives its replies, for the AsyncAPI document.
    pub fn reply_endpoint(&self) -> Option<crate::operate::asyncapi::Endpoint> {
        self.inner
            .reply_channels
            .as_ref()
            .and_then(|f| f.endpoint())
    }

    /// The CloudEvents `source` of messages whose publication sets none.
    pub(crate) fn source(&self) -> &SmolStr {
        &self.inner.source
    }

    /// The mapper registered for `R`, or [`JsonMapper`].
    pub(crate) fn mapper_or_json<R>(&self) -> Arc<dyn MessageMapper<R>>
    where
        R: Request + Serialize + DeserializeOwned,
    {
        match self.mapper::<R>() {
            Ok(mapper) => Arc::clone(mapper),
            Err(_) => Arc::new(JsonMapper),
        }
    }

    pub(crate) fn mapper<R: Request>(&self) -> Result<&Arc<dyn MessageMapper<R>>, Error> {
        self.inner
            .mappers
            .get(&TypeId::of::<R>())
            .and_then(|m| m.downcast_ref::<Arc<dyn MessageMapper<R>>>())
            .ok_or_else(|| {
                Error::configuration(format!(
                    "no message mapper for {}: register one with .mapper::<{0}>(..)",
                    type_name::<R>()
                ))
            })
    }

    pub(crate) fn publication<R: Request>(&self) -> Result<&Publication, Error> {
        self.inner
            .publications
            .get(&TypeId::of::<R>())
            .ok_or_else(|| {
                Error::configuration(format!(
                    "no publication for {}: register one with .publication::<{0}>(..)",
                    type_name::<R>()
                ))
            })
    }

    /// The producer messages to `topic` are sent with: the publication's, the
    /// topic's, or the default one.
    pub fn producer_for(&self, topic: &str) -> Result<&Arc<dyn Producer>, Error> {
        self.inner
            .routes
            .get(topic)
            .or(self.inner.default_producer.as_ref())
            .ok_or_else(|| Error::configuration(format!("no producer for topic '{topic}'")))
    }

    /// The one place the framework's header fields are written: maps `request`
    /// with its publication, fills topic, type, correlation id, reply-to, delay
    /// and the CloudEvents attributes, applies the publication's transforms,
    /// and validates the result (the only validation on the way out).
    async fn to_message<R: Request>(
        &self,
        request: &R,
        publication: &Publication,
        correlation_id: Option<Uuid>,
        reply_to: Option<SmolStr>,
        delay: Duration,
    ) -> Result<Message, Error> {
        let mapper = self.mapper::<R>()?;
        self.to_message_with(
            mapper.as_ref(),
            request,
            publication,
            correlation_id,
            reply_to,
            delay,
        )
        .await
    }

    /// [`to_message`](Self::to_message) with `mapper`.
    async fn to_message_with<R: Request>(
        &self,
        mapper: &dyn MessageMapper<R>,
        request: &R,
        publication: &Publication,
        correlation_id: Option<Uuid>,
        reply_to: Option<SmolStr>,
        delay: Duration,
    ) -> Result<Message, Error> {
        let mut message = mapper.to_message(request, publication)?;
        let header = &mut message.header;
        header.topic.clone_from(&publication.topic);
        header.message_type = publication.message_type;
        header.correlation_id = correlation_id.unwrap_or(header.correlation_id);
        if header.correlation_id.is_nil() {
            header.correlation_id = header.id;
        }
        if reply_to.is_some() {
            header.reply_to = reply_to;
        }
        header.delay = delay;
        let ce = &mut header.cloud_events;
        let defaults = &publication.cloud_events;
        ce.source = ce
            .source
            .take()
            .or_else(|| defaults.source.clone())
            .or_else(|| Some(self.inner.source.clone()));
        ce.kind = ce
            .kind
            .take()
            .or_else(|| defaults.kind.clone())
            .or_else(|| Some(SmolStr::new_static(short_type_name::<R>())));
        ce.subject = ce.subject.take().or_else(|| defaults.subject.clone());
        ce.dataschema = ce.dataschema.take().or_else(|| defaults.dataschema.clone());
        ce.specversion = Some(SmolStr::new_static(CLOUD_EVENTS_SPEC_VERSION));
        if message.header.trace.traceparent.is_none() {
            // The current span's context (the deposit span, or the caller's)
            // goes with the message, so its publish and process spans join it.
            telemetry::inject(&OtelContext::current(), &mut message.header.trace);
        }
        // Without transforms the message is not moved through `wrap_all`'s
        // future and out again.
        let message = if publication.transforms.is_empty() {
            message
        } else {
            wrap_all(&publication.transforms, message).await?
        };
        message.validate_for_send()?;
        Ok(message)
    }

    /// The message `request` becomes when posted in the conversation
    /// `correlation_id`: mapped, its header fields written, validated, with the
    /// current trace context. For stores that insert it themselves, in a
    /// transaction of their own type (a typed unit of work).
    pub async fn message_for<R: Request>(
        &self,
        request: &R,
        correlation_id: Option<Uuid>,
    ) -> Result<Message, Error> {
        let publication = self.publication::<R>()?;
        self.to_message(request, publication, correlation_id, None, Duration::ZERO)
            .await
    }

    /// Maps `request` to a message and adds it to the outbox, in `tx` when given
    /// (so it commits or rolls back with the caller's own writes). Returns the
    /// message id. Nothing is sent yet: call [`clear_outbox`](Self::clear_outbox)
    /// after committing, or let a sweeper send it.
    pub async fn deposit_post<R: Request>(
        &self,
        request: &R,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Uuid, Error> {
        let messages = self
            .deposit(std::slice::from_ref(request), None, Duration::ZERO, tx)
            .await?;
        Ok(messages[0].id())
    }

    /// Maps `request` to a message and adds it to the outbox, in `tx` when
    /// given, **scheduled**: the outbox holds it until `due` (a delay or an
    /// absolute time) and a sweeper sends it then, once, whichever process
    /// runs one. Until then [`cancel_scheduled`](Self::cancel_scheduled)
    /// removes it. No transport waits for it: a producer is handed it only
    /// when it is due. Returns the message id.
    pub async fn deposit_post_scheduled<R: Request>(
        &self,
        request: &R,
        due: impl Into<Due>,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Uuid, Error> {
        let delay = due.into().delay();
        let messages = self
            .deposit(std::slice::from_ref(request), None, delay, tx)
            .await?;
        Ok(messages[0].id())
    }

    /// Cancels scheduled message `id` if no sweeper has sent it yet; `true`
    /// when it was cancelled (see [`Outbox::cancel_scheduled`]).
    pub async fn cancel_scheduled(&self, id: Uuid) -> Result<bool, Error> {
        self.inner.outbox.cancel_scheduled(id).await
    }

    /// Counts a sweeper running on this messenger, until the guard drops.
    pub(crate) fn sweeper_running(&self) -> SweeperRunning {
        self.inner.sweepers.fetch_add(1, Ordering::Relaxed);
        SweeperRunning(self.clone())
    }

    /// A scheduled message was deposited: only sweepers send those, so say
    /// once when none runs in this process (one may run in another).
    fn expect_sweeper(&self) {
        if self.inner.sweepers.load(Ordering::Relaxed) == 0
            && !self.inner.warned_no_sweeper.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "a scheduled message was deposited and no outbox sweeper runs in this process: scheduled messages are sent by a sweeper (OutboxSweeper, PgSweeper) when due; run one here or in another process"
            );
        }
    }

    /// Deposits many requests in one outbox write; returns their ids in order.
    pub async fn deposit_post_batch<R: Request>(
        &self,
        requests: &[R],
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Vec<Uuid>, Error> {
        let messages = self.deposit(requests, None, Duration::ZERO, tx).await?;
        Ok(messages.iter().map(Message::id).collect())
    }

    /// Maps and deposits `requests` in the conversation `correlation_id`.
    pub(crate) async fn deposit<R: Request>(
        &self,
        requests: &[R],
        correlation_id: Option<Uuid>,
        delay: Duration,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Vec<Message>, Error> {
        self.deposit_into(requests, correlation_id, delay, Deposit::Outbox(tx))
            .await
    }

    /// [`deposit`](Self::deposit) into the outbox as `into` says.
    async fn deposit_into<R: Request>(
        &self,
        requests: &[R],
        correlation_id: Option<Uuid>,
        delay: Duration,
        into: Deposit<'_>,
    ) -> Result<Vec<Message>, Error> {
        let publication = self.publication::<R>()?;
        let span = self.telemetry().start_span(
            || format!("{} deposit", publication.topic),
            SpanKind::Internal,
            &OtelContext::current(),
            || {
                vec![
                    KeyValue::new(attr::DESTINATION, publication.topic.to_string()),
                    KeyValue::new(attr::OPERATION_TYPE, "create"),
                    KeyValue::new(attr::OPERATION_NAME, "deposit"),
                    KeyValue::new(attr::BATCH_COUNT, requests.len() as i64),
                ]
            },
        );
        traced(span, async move {
            let mut messages = Vec::with_capacity(requests.len());
            for request in requests {
                messages.push(
                    self.to_message(request, publication, correlation_id, None, delay)
                        .await?,
                );
            }
            let outbox = &self.inner.outbox;
            if let Some(limit) = self.inner.outbox_limit {
                let outstanding = outbox.outstanding_count().await?;
                if outstanding + messages.len() as u64 > limit {
                    return Err(Error::Backpressure { outstanding, limit });
                }
            }
            match into {
                Deposit::Outbox(tx) => outbox.add(&messages, tx).await?,
                Deposit::ToSend => outbox.add_to_send(&messages, SEND_LEASE).await?,
            }
            if !delay.is_zero() {
                self.expect_sweeper();
            }
            tracing::debug!(topic = %publication.topic, count = messages.len(), "deposited in outbox");
            Ok(messages)
        })
        .await
    }

    /// The internal `clear outbox` span, under the current context.
    fn clear_span(&self, count: Option<usize>) -> Option<OtelContext> {
        self.telemetry().start_span(
            || "clear outbox",
            SpanKind::Internal,
            &OtelContext::current(),
            || {
                let mut attributes = vec![KeyValue::new(attr::OPERATION_NAME, "clear")];
                if let Some(count) = count {
                    attributes.push(KeyValue::new(attr::BATCH_COUNT, count as i64));
                }
                attributes
            },
        )
    }

    /// Sends one message through the producer of its topic, waiting at most
    /// `timeout` for the confirm when given. The send runs in a `<topic> publish`
    /// producer span that continues the trace carried in the message header, and
    /// the span's context replaces it in what is sent; the send is counted in
    /// `messaging.client.sent.messages`.
    pub async fn send_message(
        &self,
        mut message: Message,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        let telemetry = self.telemetry();
        let producer = match self.producer_for(&message.header.topic) {
            Ok(producer) => producer,
            Err(error) => {
                let result = Err(error);
                telemetry.end_publish(None, &message.header.topic, &result);
                return result;
            }
        };
        let span = telemetry.start_publish(producer.system(), &mut message);
        let send = producer.send(&message);
        let result = match timeout {
            None => send.await,
            Some(limit) => tokio::time::timeout(limit, send).await.unwrap_or_else(|_| {
                Err(Error::transport(
                    "send",
                    format!("no confirm within {limit:?}"),
                ))
            }),
        };
        let result = match result {
            Err(Error::Unroutable { topic }) if self.inner.droppable.contains(&topic) => {
                tracing::debug!(%topic, id = %message.id(), "no queue is bound to the topic; the event is dropped, as its publication allows");
                Ok(())
            }
            other => other,
        };
        telemetry.end_publish(span, &message.header.topic, &result);
        result
    }

    /// The one send path, for every way a message leaves: `messages` (in
    /// outbox order) go out with one chain per partition key, each chain sent
    /// one message at a time (a later message of a key only after the earlier
    /// one was confirmed; after a failure the rest of the chain is not tried),
    /// and every chain and keyless message in flight at once.
    pub async fn send(&self, messages: Vec<Message>, timeout: Option<Duration>) -> SendReport {
        let mut chains: Vec<Vec<Message>> = Vec::new();
        let mut chain_of_key: HashMap<String, usize> = HashMap::new();
        for message in messages {
            match message.header.partition_key.clone() {
                Some(key) => match chain_of_key.get(&key) {
                    Some(&i) => chains[i].push(message),
                    None => {
                        chain_of_key.insert(key, chains.len());
                        chains.push(vec![message]);
                    }
                },
                None => chains.push(vec![message]),
            }
        }
        let results = join_all(chains.into_iter().map(|chain| async move {
            let mut sent = Vec::new();
            let mut failed = None;
            let mut rest = chain.into_iter();
            for message in rest.by_ref() {
                let (id, topic) = (message.id(), message.header.topic.clone());
                match self.send_message(message, timeout).await {
                    Ok(()) => sent.push((id, topic)),
                    Err(e) => {
                        failed = Some((id, topic, e));
                        break;
                    }
                }
            }
            (sent, failed, rest.map(|m| m.id()).collect::<Vec<_>>())
        }))
        .await;
        let mut report = SendReport::default();
        for (sent, failed, not_tried) in results {
            report.sent.extend(sent);
            report.failed.extend(failed);
            report.not_tried.extend(not_tried);
        }
        report
    }

    /// Sends the outstanding messages among `ids` and marks the confirmed
    /// ones dispatched. Ids already dispatched are skipped. Messages that fail
    /// stay in the outbox with the failure recorded, for a sweeper to retry;
    /// the call then fails too.
    pub async fn clear_outbox(&self, ids: &[Uuid]) -> Result<(), Error> {
        traced(self.clear_span(Some(ids.len())), async {
            // Taken from the outbox for this writer: what a sweeper holds is
            // the sweeper's to send, and what is taken here no sweeper sends.
            let messages = self.inner.outbox.take_to_send(ids, SEND_LEASE).await?;
            let dispatched = self.dispatch(messages).await?;
            into_result(dispatched)
        })
        .await
    }

    /// Sends up to `limit` outstanding messages added at least `min_age` ago,
    /// oldest first: what a simple sweeper does on each pass. Returns how many
    /// were sent.
    pub async fn clear_outstanding(&self, min_age: Duration, limit: usize) -> Result<usize, Error> {
        traced(self.clear_span(None), async {
            let messages = self.inner.outbox.outstanding(min_age, limit).await?;
            let dispatched = self.dispatch(messages).await?;
            let sent = dispatched.sent.len();
            into_result(dispatched).map(|()| sent)
        })
        .await
    }

    /// Sends outbox messages through the one send path and records what
    /// happened in the outbox.
    async fn dispatch(&self, messages: Vec<Message>) -> Result<SendReport, Error> {
        let outbox = &self.inner.outbox;
        let messages: Vec<Message> = messages.into_iter().map(due_now).collect();
        // Per-key order for every way a message leaves: one whose key has an
        // earlier message still outstanding elsewhere (a failed send, another
        // sender's) waits for the sweeper, which sends the key in order.
        let held = outbox.held_back(&messages).await?;
        let (messages, held): (Vec<Message>, Vec<Message>) =
            messages.into_iter().partition(|m| !held.contains(&m.id()));
        for message in &held {
            tracing::debug!(id = %message.id(), key = ?message.header.partition_key, "an earlier message of the key is outstanding; left to the sweeper");
        }
        // A writer gives up when its lease ends: from then on the message is
        // a sweeper's.
        let mut report = self.send(messages, Some(SEND_LEASE)).await;
        report.not_tried.extend(held.iter().map(Message::id));
        if !report.sent.is_empty() {
            let ids: Vec<Uuid> = report.sent.iter().map(|(id, _)| *id).collect();
            outbox.mark_dispatched(&ids, Utc::now()).await?;
        }
        for (id, _, error) in &report.failed {
            tracing::warn!(%id, %error, "outbox message not sent; it stays outstanding");
            outbox.mark_failed(*id, &error.to_string()).await?;
        }
        if !report.not_tried.is_empty() {
            // Held back or behind a failure: the sweepers' now, in key order.
            outbox.release(&report.not_tried).await?;
        }
        Ok(report)
    }

    /// Deposits `request` in the conversation `correlation_id` and sends it at
    /// once, without reading it back from the outbox; with a nonzero `delay`
    /// it is scheduled instead, left to a sweeper when due. Once
    /// the message is in the outbox the post has succeeded: when the send
    /// fails, the failure is logged, counted and recorded with the message,
    /// which stays outstanding for a sweeper, and the id is returned all the
    /// same. (Returning the error made callers, and a `Retry` step around a
    /// handler, post again: a second copy with a new id that no inbox can
    /// catch.)
    pub(crate) async fn post_in<R: Request>(
        &self,
        request: &R,
        correlation_id: Option<Uuid>,
        delay: Duration,
    ) -> Result<Uuid, Error> {
        // Sent at once: leased to this writer, so no sweeper sends it too; a
        // scheduled one is the sweepers' when due.
        let into = if delay.is_zero() {
            Deposit::ToSend
        } else {
            Deposit::Outbox(None)
        };
        let messages = self
            .deposit_into(std::slice::from_ref(request), correlation_id, delay, into)
            .await?;
        let id = messages[0].id();
        if !delay.is_zero() {
            return Ok(id);
        }
        self.send_posted(messages).await;
        Ok(id)
    }

    /// Sends messages just deposited by a post; what fails stays in the
    /// outbox for a sweeper, with the failure logged.
    async fn send_posted(&self, messages: Vec<Message>) {
        let first = messages.first().map(Message::id);
        let sent = traced(self.clear_span(Some(messages.len())), async {
            let dispatched = self.dispatch(messages).await?;
            into_result(dispatched)
        })
        .await;
        if let (Err(error), Some(id)) = (sent, first) {
            tracing::warn!(%id, %error, "posted message not sent yet; it stays in the outbox for a sweeper");
        }
    }

    /// Posts a message built by the framework itself (a routing slip's next
    /// step): deposits it, outside any transaction, and sends it. Its id is
    /// fixed by what it stands for, so a second post of it (after a crash)
    /// finds it in the outbox and only sends it if it is still outstanding.
    pub(crate) async fn post_message(&self, message: Message) -> Result<Uuid, Error> {
        let id = message.id();
        match self
            .inner
            .outbox
            .add_to_send(std::slice::from_ref(&message), SEND_LEASE)
            .await
        {
            Ok(()) => self.send_posted(vec![message]).await,
            Err(e) if e.is_duplicate() => {
                tracing::debug!(%id, "posted before; sending it if it is still outstanding");
                if let Err(error) = self.clear_outbox(&[id]).await {
                    tracing::warn!(%id, %error, "posted message not sent yet; it stays in the outbox for a sweeper");
                }
            }
            Err(e) => return Err(e),
        }
        Ok(id)
    }

    /// Deposits `request` and sends it at once (`deposit_post` +
    /// `clear_outbox`). Succeeds once the message is in the outbox: what
    /// fails to send at once stays there for a sweeper (run one:
    /// [`OutboxSweeper`](crate::OutboxSweeper) or the Postgres one).
    pub async fn post<R: Request>(&self, request: &R) -> Result<Uuid, Error> {
        self.post_in(request, None, Duration::ZERO).await
    }

    /// Posts `request` to be delivered no earlier than `delay` from now:
    /// [`post_scheduled`](Self::post_scheduled) with a delay.
    pub async fn post_with_delay<R: Request>(
        &self,
        request: &R,
        delay: Duration,
    ) -> Result<Uuid, Error> {
        self.post_in(request, None, delay).await
    }

    /// Posts `request` to be delivered when `due` (a delay or an absolute
    /// time): it is deposited scheduled and the call returns at once; a
    /// sweeper sends it when due (see
    /// [`deposit_post_scheduled`](Self::deposit_post_scheduled)). A due time
    /// already past posts it now.
    pub async fn post_scheduled<R: Request>(
        &self,
        request: &R,
        due: impl Into<Due>,
    ) -> Result<Uuid, Error> {
        self.post_in(request, None, due.into().delay()).await
    }

    /// Request-reply: sends `request` with a private reply-to channel and a fresh
    /// correlation id, and waits up to `timeout` for the reply, mapped to `Resp`.
    /// Fails with [`Error::CallTimeout`] when no reply comes in time. Needs
    /// `reply_channels` on the builder and a mapper for `Resp`.
    pub async fn call<Req, Resp>(&self, request: &Req, timeout: Duration) -> Result<Resp, Error>
    where
        Req: Request,
        Resp: Request + Serialize + DeserializeOwned,
    {
        let factory = self.inner.reply_channels.as_ref().ok_or_else(|| {
            Error::configuration(
                "call needs a reply channel factory: set one with .reply_channels(..)",
            )
        })?;
        let response_mapper = self.mapper_or_json::<Resp>();
        let publication = self.publication::<Req>()?;
        let replies = self
            .inner
            .replies
            .get_or_try_init(|| Replies::open(Arc::clone(factory)))
            .await?;
        if replies.is_closed() {
            return Err(Error::Shutdown);
        }
        let correlation_id = Uuid::now_v7();
        let waiting = replies.wait_for(correlation_id);
        let message = self
            .to_message(
                request,
                publication,
                Some(correlation_id),
                Some(replies.reply_to.clone()),
                Duration::ZERO,
            )
            .await?;
        let sent = self.send(vec![message], None).await;
        if let Some((_, _, error)) = sent.failed.into_iter().next() {
            return Err(error);
        }
        let timed_out = || Error::CallTimeout {
            request_type: type_name::<Req>(),
            timeout,
        };
        let delivered = match tokio::time::timeout(timeout, &mut { waiting }.reply).await {
            Ok(Ok(message)) => message,
            // The reply channel went away (closed): no reply will come.
            Ok(Err(_)) | Err(_) => return Err(timed_out()),
        };
        let reply = unwrap_all(&publication.transforms, delivered.clone()).await?;
        acked_all(&publication.transforms, &delivered).await;
        response_mapper.to_request(&reply)
    }

    /// Closes the reply channel `call` opened (on RabbitMQ its queue is
    /// deleted, on Kafka its topics and group), waiting for its task to end;
    /// calls after this fail. Dropping the last clone of the messenger does
    /// the same without waiting.
    pub async fn close_replies(&self) {
        if let Some(replies) = self.inner.replies.get() {
            replies.close().await;
        }
    }

    /// Sends `response` to the reply-to channel of `request` (a message
    /// received by a subscription), with the request's correlation id.
    pub async fn reply<Resp>(&self, request: &Message, response: &Resp) -> Result<(), Error>
    where
        Resp: Request + Serialize + DeserializeOwned,
    {
        let message = self.reply_message(request, response).await?;
        match self
            .send(vec![message], None)
            .await
            .failed
            .into_iter()
            .next()
        {
            Some((_, _, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// Deposits the reply to `request` (see [`reply`](Self::reply)) in the
    /// outbox, in `tx` when given: it is sent once `tx` commits (by the unit
    /// of work, or a sweeper). Returns its id.
    pub async fn deposit_reply<Resp>(
        &self,
        request: &Message,
        response: &Resp,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Uuid, Error>
    where
        Resp: Request + Serialize + DeserializeOwned,
    {
        let message = self.reply_message(request, response).await?;
        self.inner
            .outbox
            .add(std::slice::from_ref(&message), tx)
            .await?;
        Ok(message.id())
    }

    /// The reply to `request`: `response` as a document to its reply-to
    /// channel, with its correlation id.
    async fn reply_message<Resp>(
        &self,
        request: &Message,
        response: &Resp,
    ) -> Result<Message, Error>
    where
        Resp: Request + Serialize + DeserializeOwned,
    {
        let reply_to = request.header.reply_to.clone().ok_or_else(|| {
            Error::reject(format!(
                "message {} asks for no reply (no reply-to header)",
                request.id()
            ))
        })?;
        let publication = Publication::document(reply_to);
        let mapper = self.mapper_or_json::<Resp>();
        let mut message = self
            .to_message_with(
                mapper.as_ref(),
                response,
                &publication,
                Some(request.header.correlation_id),
                None,
                Duration::ZERO,
            )
            .await?;
        // The reply continues the handler's trace, not the one the response
        // type's mapper may have copied.
        telemetry::inject(&OtelContext::current(), &mut message.header.trace);
        Ok(message)
    }
}

fn into_result(report: SendReport) -> Result<(), Error> {
    let count = report.failed.len();
    match report.failed.into_iter().next() {
        None => Ok(()),
        Some((id, _, first)) => Err(Error::transport(
            format!("{count} outbox message(s) not sent, first {id}; they stay outstanding"),
            first,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::short_type_name;

    mod orders {
        pub(super) struct Placed;
        pub(super) struct Batch<T>(pub(super) T);
    }

    #[test]
    fn a_short_type_name_is_the_last_path_segment_without_generics() {
        assert_eq!(short_type_name::<orders::Placed>(), "Placed");
        assert_eq!(short_type_name::<orders::Batch<orders::Placed>>(), "Batch");
        assert_eq!(short_type_name::<u32>(), "u32");
    }
}
