//! The messaging side of the processor: publications, mappers and producers
//! configured on the builder, and `deposit_post`, `clear_outbox`, `post`, delayed
//! post, `call` and `reply` on the processor.

pub(crate) mod producer;

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use opentelemetry::trace::SpanKind;
use opentelemetry::{Context as OtelContext, KeyValue};
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use uuid::Uuid;

use crate::command::processor::{CommandProcessor, CommandProcessorBuilder};
use crate::dispatch::channel::{ChannelFactory, ChannelSpec};
use crate::error::Error;
use crate::message::Message;
use crate::message::mapper::MessageMapper;
use crate::message::publication::Publication;
use crate::message::transform::{unwrap_all, wrap_all};
use crate::messenger::producer::Producer;
use crate::store::Transaction;
use crate::telemetry::{self, attributes as attr, traced};
use crate::{InMemoryOutbox, Outbox};
use crate::{Request, RequestContext};

type ErasedMapper = Box<dyn Any + Send + Sync>;

#[derive(Default)]
pub(crate) struct MessagingBuilder {
    publications: FxHashMap<TypeId, (&'static str, Publication)>,
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

pub(crate) struct Messaging {
    publications: FxHashMap<TypeId, Publication>,
    mappers: FxHashMap<TypeId, ErasedMapper>,
    /// topic -> producer, from publications and topic producers.
    routes: HashMap<String, Arc<dyn Producer>>,
    default_producer: Option<Arc<dyn Producer>>,
    pub(crate) outbox: Arc<dyn Outbox>,
    outbox_limit: Option<u64>,
    reply_channels: Option<Arc<dyn ChannelFactory>>,
    source: String,
}

impl fmt::Debug for Messaging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messaging")
            .field("publications", &self.publications.len())
            .field("routes", &self.routes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MessagingBuilder {
    pub(crate) fn build(self) -> Result<Messaging, Error> {
        if let Some(reason) = self.errors.into_iter().next() {
            return Err(Error::configuration(reason));
        }
        let mut routes = self.topic_producers;
        let mut publications = FxHashMap::default();
        for (type_id, (name, publication)) in self.publications {
            if !self.mappers.contains_key(&type_id) {
                return Err(Error::configuration(format!(
                    "publication of {name} to '{}' has no message mapper: register one with .mapper::<{name}>(..)",
                    publication.topic
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
                    .get(&publication.topic)
                    .or(self.default_producer.as_ref())
                    .cloned()
                    .ok_or_else(|| {
                        Error::configuration(format!(
                            "no producer for topic '{}' (publication of {name}): register a default producer or one for the topic",
                            publication.topic
                        ))
                    })?,
            };
            if let Some(existing) = routes.get(&publication.topic) {
                if !Arc::ptr_eq(existing, &producer) {
                    return Err(Error::configuration(format!(
                        "topic '{}' is routed to two different producers",
                        publication.topic
                    )));
                }
            }
            routes.insert(publication.topic.clone(), producer);
            publications.insert(type_id, publication);
        }
        Ok(Messaging {
            publications,
            mappers: self.mappers,
            routes,
            default_producer: self.default_producer,
            outbox: self
                .outbox
                .unwrap_or_else(|| Arc::new(InMemoryOutbox::new())),
            outbox_limit: self.outbox_limit,
            reply_channels: self.reply_channels,
            source: self.source.unwrap_or_else(|| "urn:brighter".to_owned()),
        })
    }
}

impl CommandProcessorBuilder {
    /// The mapper between `R` and messages, used to post `R` and to read it in
    /// subscriptions. [`JsonMapper`](crate::JsonMapper) works for any serde type.
    pub fn mapper<R: Request>(mut self, mapper: impl MessageMapper<R>) -> Self {
        let mapper: Arc<dyn MessageMapper<R>> = Arc::new(mapper);
        self.messaging
            .mappers
            .insert(TypeId::of::<R>(), Box::new(mapper));
        self
    }

    /// Where `R` is sent when posted. Needs a mapper for `R` and a producer for the
    /// topic, checked by `build`.
    pub fn publication<R: Request>(mut self, publication: Publication) -> Self {
        if self
            .messaging
            .publications
            .insert(TypeId::of::<R>(), (type_name::<R>(), publication))
            .is_some()
        {
            self.messaging
                .errors
                .push(format!("{} has two publications", type_name::<R>()));
        }
        self
    }

    /// The producer for topics with no producer of their own.
    pub fn producer(mut self, producer: impl Producer) -> Self {
        self.messaging.default_producer = Some(Arc::new(producer));
        self
    }

    /// The producer for `topic`.
    pub fn producer_for_topic(mut self, topic: impl Into<String>, producer: impl Producer) -> Self {
        self.messaging
            .topic_producers
            .insert(topic.into(), Arc::new(producer));
        self
    }

    /// A producer that publications name with [`Publication::producer`].
    pub fn named_producer(mut self, name: impl Into<String>, producer: impl Producer) -> Self {
        self.messaging
            .named_producers
            .insert(name.into(), Arc::new(producer));
        self
    }

    /// The outbox (an [`InMemoryOutbox`] when none is given).
    pub fn outbox(mut self, outbox: impl Outbox) -> Self {
        self.messaging.outbox = Some(Arc::new(outbox));
        self
    }

    /// At most `limit` outstanding messages: past it, `deposit_post` fails with
    /// [`Error::Backpressure`] instead of letting the outbox grow without bound.
    pub fn outbox_limit(mut self, limit: u64) -> Self {
        self.messaging.outbox_limit = Some(limit);
        self
    }

    /// Where `call` opens its reply channel.
    pub fn reply_channels(mut self, factory: impl ChannelFactory) -> Self {
        self.messaging.reply_channels = Some(Arc::new(factory));
        self
    }

    /// The CloudEvents `source` of messages whose publication sets none.
    pub fn cloud_events_source(mut self, source: impl Into<String>) -> Self {
        self.messaging.source = Some(source.into());
        self
    }
}

pub(crate) fn short_type_name<R>() -> &'static str {
    let full = type_name::<R>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

impl Messaging {
    pub(crate) fn mapper<R: Request>(&self) -> Result<&Arc<dyn MessageMapper<R>>, Error> {
        self.mappers
            .get(&TypeId::of::<R>())
            .and_then(|m| m.downcast_ref::<Arc<dyn MessageMapper<R>>>())
            .ok_or_else(|| {
                Error::configuration(format!(
                    "no message mapper for {}: register one with .mapper::<{0}>(..)",
                    type_name::<R>()
                ))
            })
    }

    fn publication<R: Request>(&self) -> Result<&Publication, Error> {
        self.publications.get(&TypeId::of::<R>()).ok_or_else(|| {
            Error::configuration(format!(
                "no publication for {}: register one with .publication::<{0}>(..)",
                type_name::<R>()
            ))
        })
    }

    pub(crate) fn producer_for(&self, topic: &str) -> Result<&Arc<dyn Producer>, Error> {
        self.routes
            .get(topic)
            .or(self.default_producer.as_ref())
            .ok_or_else(|| Error::configuration(format!("no producer for topic '{topic}'")))
    }

    /// Maps `request` with its publication and fills the header fields the
    /// processor owns, then applies the publication's transforms.
    async fn to_message<R: Request>(
        &self,
        request: &R,
        publication: &Publication,
        correlation_id: Option<Uuid>,
        delay: Duration,
    ) -> Result<Message, Error> {
        let mut message = self.mapper::<R>()?.to_message(request, publication)?;
        let header = &mut message.header;
        header.topic.clone_from(&publication.topic);
        header.message_type = publication.message_type;
        header.correlation_id = correlation_id.unwrap_or(header.correlation_id);
        if header.correlation_id.is_nil() {
            header.correlation_id = header.id;
        }
        header.delay = delay;
        let ce = &mut header.cloud_events;
        let defaults = &publication.cloud_events;
        ce.source = ce
            .source
            .take()
            .or_else(|| defaults.source.clone())
            .or_else(|| Some(self.source.clone()));
        ce.kind = ce
            .kind
            .take()
            .or_else(|| defaults.kind.clone())
            .or_else(|| Some(short_type_name::<R>().to_owned()));
        ce.subject = ce.subject.take().or_else(|| defaults.subject.clone());
        ce.dataschema = ce.dataschema.take().or_else(|| defaults.dataschema.clone());
        ce.specversion = Some("1.0".to_owned());
        let message = wrap_all(&publication.transforms, message).await?;
        message.validate_for_send()?;
        Ok(message)
    }
}

/// Outcome of sending a set of outbox messages.
struct Dispatched {
    sent: usize,
    failures: Vec<(Uuid, Error)>,
}

impl CommandProcessor {
    fn messaging(&self) -> &Messaging {
        &self.inner.messaging
    }

    /// The outbox this processor deposits into.
    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.messaging().outbox
    }

    /// The producer messages to `topic` are sent with: the publication's, the
    /// topic's, or the default one. For sweepers that send outbox rows themselves.
    pub fn producer_for(&self, topic: &str) -> Result<&Arc<dyn Producer>, Error> {
        self.messaging().producer_for(topic)
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

    /// [`deposit_post`](Self::deposit_post) from inside a handler: continues the
    /// conversation of `ctx` (its correlation id) and joins the transaction in `ctx`
    /// when there is one, so the message commits with the handler's own writes and
    /// its inbox record. A unit-of-work step clears such messages after commit.
    pub async fn deposit_post_with<R: Request>(
        &self,
        request: &R,
        ctx: &mut RequestContext,
    ) -> Result<Uuid, Error> {
        let correlation_id = ctx.correlation_id;
        let in_transaction = ctx.transaction_mut().is_some();
        let ids: Vec<Uuid> = self
            .deposit(
                std::slice::from_ref(request),
                correlation_id,
                Duration::ZERO,
                ctx.transaction_mut(),
            )
            .await?
            .iter()
            .map(Message::id)
            .collect();
        if in_transaction {
            ctx.record_deposited(&ids);
        }
        Ok(ids[0])
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

    async fn deposit<R: Request>(
        &self,
        requests: &[R],
        correlation_id: Option<Uuid>,
        delay: Duration,
        tx: Option<&mut dyn Transaction>,
    ) -> Result<Vec<Message>, Error> {
        let messaging = self.messaging();
        let publication = messaging.publication::<R>()?;
        let span = self.telemetry().start_span(
            || format!("{} deposit", publication.topic),
            SpanKind::Internal,
            &OtelContext::current(),
            || {
                vec![
                    KeyValue::new(attr::DESTINATION, publication.topic.clone()),
                    KeyValue::new(attr::OPERATION_TYPE, "create"),
                    KeyValue::new(attr::OPERATION_NAME, "deposit"),
                    KeyValue::new(attr::BATCH_COUNT, requests.len() as i64),
                ]
            },
        );
        traced(span, async move {
            // The deposit span's context (or, with tracing off, the caller's) goes
            // with each message, so its publish and process spans join this trace.
            let carried = OtelContext::current();
            let mut messages = Vec::with_capacity(requests.len());
            for request in requests {
                let mut message = messaging
                    .to_message(request, publication, correlation_id, delay)
                    .await?;
                if message.header.trace.traceparent.is_none() {
                    telemetry::inject(&carried, &mut message.header.trace);
                }
                messages.push(message);
            }
            if let Some(limit) = messaging.outbox_limit {
                let outstanding = messaging.outbox.outstanding_count().await?;
                if outstanding + messages.len() as u64 > limit {
                    return Err(Error::Backpressure { outstanding, limit });
                }
            }
            messaging.outbox.add(&messages, tx).await?;
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
    /// `messaging.client.sent.messages`. For sweepers that send outbox rows.
    pub async fn send_message(
        &self,
        mut message: Message,
        timeout: Option<Duration>,
    ) -> Result<(), Error> {
        let telemetry = self.telemetry();
        let producer = match self.messaging().producer_for(&message.header.topic) {
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
        telemetry.end_publish(span, &message.header.topic, &result);
        result
    }

    /// Sends the outstanding messages among `ids` (each through the producer of its
    /// topic, all in flight at once) and marks the confirmed ones dispatched. Ids
    /// already dispatched are skipped. Messages that fail stay in the outbox with
    /// the failure recorded, for a sweeper to retry; the call then fails too.
    pub async fn clear_outbox(&self, ids: &[Uuid]) -> Result<(), Error> {
        traced(self.clear_span(Some(ids.len())), async {
            let messages = self.messaging().outbox.get(ids).await?;
            let result = self.dispatch(messages).await?;
            into_result(result)
        })
        .await
    }

    /// Sends up to `limit` outstanding messages added at least `min_age` ago,
    /// oldest first: what a sweeper does on each pass. Returns how many were sent.
    pub async fn clear_outstanding(&self, min_age: Duration, limit: usize) -> Result<usize, Error> {
        traced(self.clear_span(None), async {
            let messages = self.messaging().outbox.outstanding(min_age, limit).await?;
            let result = self.dispatch(messages).await?;
            let sent = result.sent;
            into_result(result).map(|()| sent)
        })
        .await
    }

    async fn dispatch(&self, messages: Vec<Message>) -> Result<Dispatched, Error> {
        let messaging = self.messaging();
        let mut failures = Vec::new();
        // Group by producer, keeping each group in outbox order.
        let mut groups: Vec<(Arc<dyn Producer>, Vec<Message>)> = Vec::new();
        for message in messages {
            match messaging.producer_for(&message.header.topic) {
                Ok(producer) => match groups.iter_mut().find(|(p, _)| Arc::ptr_eq(p, producer)) {
                    Some((_, group)) => group.push(message),
                    None => groups.push((Arc::clone(producer), vec![message])),
                },
                Err(e) => failures.push((message.id(), e)),
            }
        }
        let telemetry = self.telemetry();
        let spans: Vec<Vec<Option<OtelContext>>> = groups
            .iter_mut()
            .map(|(producer, group)| {
                let system = producer.system();
                group
                    .iter_mut()
                    .map(|message| telemetry.start_publish(system, message))
                    .collect()
            })
            .collect();
        let results = join_all(
            groups
                .iter()
                .map(|(producer, group)| producer.send_batch(group)),
        )
        .await;
        let mut sent_ids = Vec::new();
        for (((_, group), results), spans) in groups.iter().zip(results).zip(spans) {
            for ((message, result), span) in group.iter().zip(results).zip(spans) {
                telemetry.end_publish(span, &message.header.topic, &result);
                match result {
                    Ok(()) => sent_ids.push(message.id()),
                    Err(e) => failures.push((message.id(), e)),
                }
            }
        }
        if !sent_ids.is_empty() {
            messaging
                .outbox
                .mark_dispatched(&sent_ids, Utc::now())
                .await?;
        }
        for (id, error) in &failures {
            tracing::warn!(%id, %error, "outbox message not sent; it stays outstanding");
            messaging
                .outbox
                .mark_failed(*id, &error.to_string())
                .await?;
        }
        Ok(Dispatched {
            sent: sent_ids.len(),
            failures,
        })
    }

    /// Deposits `request` and sends it at once (`deposit_post` + `clear_outbox`,
    /// without reading the message back).
    /// When sending fails the message stays in the outbox for a sweeper, and the
    /// error is returned.
    pub async fn post<R: Request>(&self, request: &R) -> Result<Uuid, Error> {
        let messages = self
            .deposit(std::slice::from_ref(request), None, Duration::ZERO, None)
            .await?;
        self.send_deposited(messages).await
    }

    /// Sends messages just deposited outside any transaction, as `clear_outbox`
    /// would, without reading them back from the outbox; returns the first id.
    async fn send_deposited(&self, messages: Vec<Message>) -> Result<Uuid, Error> {
        let id = messages[0].id();
        traced(self.clear_span(Some(messages.len())), async {
            let result = self.dispatch(messages).await?;
            into_result(result)
        })
        .await?;
        Ok(id)
    }

    /// [`post`](Self::post) continuing the conversation of `ctx`, outside any
    /// transaction: the message is sent at once.
    pub async fn post_with<R: Request>(
        &self,
        request: &R,
        ctx: &RequestContext,
    ) -> Result<Uuid, Error> {
        let messages = self
            .deposit(
                std::slice::from_ref(request),
                ctx.correlation_id,
                Duration::ZERO,
                None,
            )
            .await?;
        self.send_deposited(messages).await
    }

    /// Posts `request` to be delivered no earlier than `delay` from now; the
    /// transport holds it (delay queue, delay topic or timer).
    pub async fn post_with_delay<R: Request>(
        &self,
        request: &R,
        delay: Duration,
    ) -> Result<Uuid, Error> {
        let messages = self
            .deposit(std::slice::from_ref(request), None, delay, None)
            .await?;
        self.send_deposited(messages).await
    }

    /// Request-reply: sends `request` with a private reply-to channel and a fresh
    /// correlation id, and waits up to `timeout` for the reply, mapped to `Resp`.
    /// Fails with [`Error::CallTimeout`] when no reply comes in time. Needs
    /// `reply_channels` on the builder and a mapper for `Resp`.
    pub async fn call<Req: Request, Resp: Request>(
        &self,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Error> {
        let messaging = self.messaging();
        let factory = messaging.reply_channels.as_ref().ok_or_else(|| {
            Error::configuration(
                "call needs a reply channel factory: set one with .reply_channels(..)",
            )
        })?;
        let response_mapper = messaging.mapper::<Resp>()?;
        let publication = messaging.publication::<Req>()?;
        let reply_to = format!("reply.{}", Uuid::now_v7());
        let mut spec = ChannelSpec::new("call", reply_to.clone(), reply_to.clone());
        spec.auto_delete = true;
        spec.buffer_size = 1;
        let mut channel = factory.create_channel(&spec).await?;

        let correlation_id = Uuid::now_v7();
        let mut message = messaging
            .to_message(request, publication, Some(correlation_id), Duration::ZERO)
            .await?;
        message.header.reply_to = Some(reply_to);
        if message.header.trace.traceparent.is_none() {
            telemetry::inject(&OtelContext::current(), &mut message.header.trace);
        }
        self.send_message(message, None).await?;

        let deadline = Instant::now() + timeout;
        let result = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break Err(Error::CallTimeout {
                    request_type: type_name::<Req>(),
                    timeout,
                });
            }
            let Some(delivery) = channel.receive(remaining).await? else {
                continue;
            };
            channel.ack(&delivery).await?;
            if delivery.message.header.correlation_id != correlation_id {
                tracing::warn!(id = %delivery.message.id(), "call: ignored a reply with another correlation id");
                continue;
            }
            let reply = unwrap_all(&publication.transforms, delivery.message).await?;
            break response_mapper.to_request(&reply);
        };
        if let Err(error) = channel.close().await {
            tracing::debug!(%error, "call: closing the reply channel failed");
        }
        result
    }

    /// Sends `response` to the reply-to channel of the request being handled in
    /// `ctx`, with the request's correlation id. For handlers of requests sent with
    /// [`call`](Self::call).
    pub async fn reply<Resp: Request>(
        &self,
        ctx: &RequestContext,
        response: &Resp,
    ) -> Result<(), Error> {
        let request = ctx.message().ok_or_else(|| {
            Error::configuration("reply needs the request's message: only requests from a subscription can be replied to")
        })?;
        let reply_to = request.header.reply_to.clone().ok_or_else(|| {
            Error::reject(format!(
                "message {} asks for no reply (no reply-to header)",
                request.id()
            ))
        })?;
        let messaging = self.messaging();
        let publication = Publication::document(reply_to);
        let message = messaging
            .to_message(
                response,
                &publication,
                Some(request.header.correlation_id),
                Duration::ZERO,
            )
            .await?;
        let mut message = message;
        telemetry::inject(&OtelContext::current(), &mut message.header.trace);
        self.send_message(message, None).await
    }
}

fn into_result(dispatched: Dispatched) -> Result<(), Error> {
    let count = dispatched.failures.len();
    match dispatched.failures.into_iter().next() {
        None => Ok(()),
        Some((id, first)) => Err(Error::transport(
            format!("{count} outbox message(s) not sent, first {id}; they stay outstanding"),
            first,
        )),
    }
}
