//! A performer: one reactor loop that receives one message at a time, runs it
//! through the pipeline and settles it by outcome. The supervisor restarts a
//! performer that fails or panics.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use opentelemetry::KeyValue;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::health::{RunningGuard, Stats, SubscriptionState};
use super::outcome::Settlement;
use super::subscription::{DispatchError, Subscription};
use crate::command::processor::{CommandProcessor, panic_message};
use crate::dispatch::channel::{Channel, Delivery};
use crate::error::Error;
use crate::message::Message;
use crate::message::transform::{acked_all, unwrap_all};
use crate::telemetry::ConsumedLabels;
use crate::telemetry::attributes as attr;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

/// Why a performer returned.
pub(crate) enum Exit {
    Shutdown,
    UnacceptableLimit(u32),
    /// Settling message `id` failed (the channel is closed; the message comes back).
    Unsettled(Uuid, Error),
}

/// How one message was settled.
enum Settled {
    Acked,
    Requeued,
    DeadLettered,
    Unacceptable,
    NotAcked,
}

/// Waits `delay` unless shut down first.
async fn pause(delay: Duration, shutdown: &CancellationToken) {
    if !delay.is_zero() {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs one performer until shutdown, a fatal channel error, or the unacceptable
/// message limit. One function on purpose: it is the reactor loop, and every
/// exit of it must pass the channel close at the end.
pub(crate) async fn run(
    sub: &Subscription,
    processor: &CommandProcessor,
    shutdown: &CancellationToken,
    stats: &Stats,
    index: usize,
) -> Result<Exit, Error> {
    let spec = sub.spec();
    let mut channel = tokio::select! {
        biased;
        () = shutdown.cancelled() => return Ok(Exit::Shutdown),
        channel = sub.factory.create_channel(&spec) => channel?,
    };
    let _running = RunningGuard::new(stats);
    let labels = processor.telemetry().consumed_labels(&sub.topic, &sub.name);
    let mut unacceptable = 0u32;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(Exit::Shutdown);
        }
        // A message the channel has at hand comes without a future; else on
        // the first poll, without setting up the wait for a shutdown.
        let received = match channel.try_receive() {
            Some(received) => received.map(Some),
            None => {
                let mut receive = channel.receive(sub.receive_timeout);
                match futures::poll!(&mut receive) {
                    std::task::Poll::Ready(received) => received,
                    std::task::Poll::Pending => tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break Ok(Exit::Shutdown),
                        received = &mut receive => received,
                    },
                }
            }
        };
        let unreadable = channel.take_unreadable();
        if unreadable > 0 {
            stats.invalid.fetch_add(unreadable, Ordering::Relaxed);
            for _ in 0..unreadable {
                processor
                    .telemetry()
                    .record_consumed(&labels, "invalid", true, 0.0);
            }
            unacceptable =
                unacceptable.saturating_add(u32::try_from(unreadable).unwrap_or(u32::MAX));
            if sub
                .unacceptable_limit
                .is_some_and(|limit| unacceptable >= limit)
            {
                break Ok(Exit::UnacceptableLimit(unacceptable));
            }
        }
        let delivery = match received {
            Ok(Some(delivery)) => delivery,
            Ok(None) => {
                pause(sub.empty_channel_delay, shutdown).await;
                continue;
            }
            Err(error) => break Err(error),
        };
        // Once received, a message is finished and settled even during shutdown.
        let id = delivery.message.id();
        stats.take_in_hand(index, id);
        let settled = handle(sub, processor, channel.as_mut(), delivery, stats, &labels).await;
        stats.release_in_hand(index);
        if settled.is_ok() {
            stats.settled();
        }
        match settled {
            Ok(Settled::Unacceptable) => {
                unacceptable += 1;
                if sub
                    .unacceptable_limit
                    .is_some_and(|limit| unacceptable >= limit)
                {
                    break Ok(Exit::UnacceptableLimit(unacceptable));
                }
            }
            Ok(Settled::NotAcked) => pause(sub.dont_ack_delay, shutdown).await,
            Ok(Settled::Acked | Settled::Requeued | Settled::DeadLettered) => {}
            Err(error) => break Ok(Exit::Unsettled(id, error)),
        }
    };
    if let Err(error) = channel.close().await {
        tracing::debug!(subscription = %sub.name, %error, "closing channel failed");
    }
    result
}

/// Handles one delivery: limits, transforms, mapping, the pipeline, then the
/// settlement, all inside the message's `process` span, which it ends with the
/// outcome. Kept whole so the span and the metrics see every path out.
async fn handle(
    sub: &Subscription,
    processor: &CommandProcessor,
    channel: &mut dyn Channel,
    delivery: Delivery,
    stats: &Stats,
    labels: &ConsumedLabels,
) -> Result<Settled, Error> {
    let header = &delivery.message.header;
    let telemetry = processor.telemetry();
    let system = channel.system();
    // The trace the message carries: the process span continues it, and with
    // tracing off it is still the current context, so what the handler sends
    // carries it on.
    let parent = crate::telemetry::extract(&header.trace);
    let otel_span = telemetry.start_span(
        || format!("{} process", header.topic),
        SpanKind::Consumer,
        &parent,
        || {
            vec![
                KeyValue::new(attr::SYSTEM, system),
                KeyValue::new(attr::DESTINATION, header.topic.to_string()),
                KeyValue::new(attr::OPERATION_TYPE, "process"),
                KeyValue::new(attr::OPERATION_NAME, "process"),
                KeyValue::new(attr::CONSUMER_GROUP, sub.channel.clone()),
                KeyValue::new(attr::SUBSCRIPTION, sub.name.clone()),
                KeyValue::new(attr::MESSAGE_ID, header.id.to_string()),
                KeyValue::new(attr::CONVERSATION_ID, header.correlation_id.to_string()),
                KeyValue::new(
                    "messaging.message.delivery_attempt",
                    i64::from(header.handled_count) + 1,
                ),
            ]
        },
    );
    let current = otel_span.clone().unwrap_or(parent);
    let started = Instant::now();
    let span = tracing::info_span!(
        "process",
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.destination.name = %header.topic,
        messaging.consumer.group.name = %sub.channel,
        messaging.message.id = %header.id,
        messaging.message.conversation_id = %header.correlation_id,
        subscription = %sub.name,
        handled_count = header.handled_count,
    );
    let settled = async move {
        if let Some(reason) = sub.over_limits(&delivery.message) {
            return Box::pin(settle_unacceptable(channel, delivery, &reason, stats)).await;
        }
        let Delivery {
            message: received,
            tag,
        } = delivery;
        // Without transforms the message handled is the one received: shared
        // with the pipeline, not copied, and settled as it is.
        let (received, message) = if sub.transforms.is_empty() {
            (None, received)
        } else {
            // A transform is user code too: a panic in it makes the message
            // unacceptable rather than taking the performer down (and bringing
            // the same message back to it for ever).
            let unwrapped =
                AssertUnwindSafe(unwrap_all(&sub.transforms, Message::clone(&received)))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(Error::Mapping(format!(
                            "a transform panicked: {}",
                            panic_message(panic.as_ref())
                        )))
                    });
            match unwrapped {
                Ok(message) => (Some(received), Arc::new(message)),
                Err(error) => {
                    let delivery = Delivery {
                        message: received,
                        tag,
                    };
                    return Box::pin(settle_unacceptable(
                        channel,
                        delivery,
                        &error.to_string(),
                        stats,
                    ))
                    .await;
                }
            }
        };
        if let Some(reason) = sub.over_limits(&message) {
            let delivery = as_received(received, message, tag);
            return Box::pin(settle_unacceptable(channel, delivery, &reason, stats)).await;
        }
        let outcome = AssertUnwindSafe(sub.dispatch.dispatch(processor, Arc::clone(&message)))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(DispatchError::Handler(Error::Panicked(panic_message(
                    panic.as_ref(),
                ))))
            });
        let delivery = as_received(received, message, tag);
        match outcome {
            Ok(()) => {
                match channel.try_ack(&delivery) {
                    Some(acked) => acked?,
                    None => channel.ack(&delivery).await?,
                }
                Stats::bump(&stats.handled);
                if !sub.transforms.is_empty() {
                    acked_all(&sub.transforms, &delivery.message).await;
                }
                Ok(Settled::Acked)
            }
            // Boxed, as the other ways out: their state stays out of the
            // future every message moves through.
            Err(DispatchError::Unacceptable(reason)) => {
                Box::pin(settle_unacceptable(channel, delivery, &reason, stats)).await
            }
            Err(DispatchError::Handler(error)) => {
                Box::pin(settle_failure(sub, channel, delivery, &error, stats)).await
            }
        }
    }
    .instrument(span)
    .with_context(current)
    .await;
    let outcome = match &settled {
        Ok(Settled::Acked) => "acked",
        Ok(Settled::Requeued) => "requeued",
        Ok(Settled::DeadLettered) => "rejected",
        Ok(Settled::Unacceptable) => "invalid",
        Ok(Settled::NotAcked) => "not_acked",
        Err(_) => "error",
    };
    let dead_lettered = matches!(settled, Ok(Settled::DeadLettered | Settled::Unacceptable));
    // Under the subscription's topic: the message's, or the one it was read
    // from on its behalf (a retry tier, a delay queue).
    telemetry.record_consumed(
        labels,
        outcome,
        dead_lettered,
        started.elapsed().as_secs_f64(),
    );
    if let Some(cx) = otel_span {
        let otel = cx.span();
        otel.set_attribute(KeyValue::new(attr::OUTCOME, outcome));
        if !matches!(settled, Ok(Settled::Acked)) {
            otel.set_status(Status::error(outcome));
        }
        otel.end();
    }
    settled
}

/// The delivery as received, to settle: `received` when transforms made
/// `handled` from a copy of it, else `handled` itself.
fn as_received(received: Option<Arc<Message>>, handled: Arc<Message>, tag: u64) -> Delivery {
    Delivery {
        message: received.unwrap_or(handled),
        tag,
    }
}

async fn settle_unacceptable(
    channel: &mut dyn Channel,
    delivery: Delivery,
    reason: &str,
    stats: &Stats,
) -> Result<Settled, Error> {
    tracing::warn!(id = %delivery.message.id(), %reason, "unacceptable message: moved to the invalid-message channel");
    channel.invalid(delivery, reason).await?;
    Stats::bump(&stats.invalid);
    Ok(Settled::Unacceptable)
}

async fn settle_failure(
    sub: &Subscription,
    channel: &mut dyn Channel,
    mut delivery: Delivery,
    error: &Error,
    stats: &Stats,
) -> Result<Settled, Error> {
    let id = delivery.message.id();
    match Settlement::of(error) {
        Settlement::Requeue(delay) => {
            let requeues = delivery.message.header.handled_count;
            if requeues >= sub.requeue_count {
                let reason = format!(
                    "requeue count exhausted: deferred after {requeues} requeue(s), limit {}; last: {error}",
                    sub.requeue_count
                );
                tracing::warn!(%id, %reason, "dead-lettered");
                channel.reject(delivery, &reason).await?;
                Stats::bump(&stats.dead_lettered);
                return Ok(Settled::DeadLettered);
            }
            let delay = if delay.is_zero() {
                sub.requeue_delay
            } else {
                delay
            };
            delivery.message_mut().header.handled_count = requeues + 1;
            tracing::info!(%id, ?delay, requeue = requeues + 1, "requeued");
            channel.requeue(delivery, delay).await?;
            Stats::bump(&stats.deferred);
            Ok(Settled::Requeued)
        }
        Settlement::DeadLetter(reason) => {
            tracing::warn!(%id, %reason, "dead-lettered");
            channel.reject(delivery, &reason).await?;
            Stats::bump(&stats.dead_lettered);
            Ok(Settled::DeadLettered)
        }
        Settlement::Leave => {
            tracing::info!(%id, "not acknowledged; pausing");
            channel.nack(delivery).await?;
            Stats::bump(&stats.not_acked);
            Ok(Settled::NotAcked)
        }
    }
}

/// Keeps one performer running: restarts it with backoff when it fails or
/// panics, until shutdown.
pub(crate) async fn supervise(
    sub: Subscription,
    processor: CommandProcessor,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    index: usize,
) {
    let (first_delay, max_delay) = sub.restart_delay;
    let mut delay = first_delay;
    loop {
        let started = Instant::now();
        let task = {
            let (sub, processor, shutdown, stats) = (
                sub.clone(),
                processor.clone(),
                shutdown.clone(),
                Arc::clone(&stats),
            );
            AbortOnDropHandle::new(tokio::spawn(async move {
                run(&sub, &processor, &shutdown, &stats, index).await
            }))
        };
        let mut same_message_again = false;
        let failure = match task.await {
            Ok(Ok(Exit::Shutdown)) => return,
            Ok(Ok(Exit::Unsettled(id, error))) => {
                let streak = stats.unsettled_again(id);
                processor
                    .telemetry()
                    .record_unsettled(&sub.topic, &sub.name);
                let reason = format!(
                    "performer {index} could not settle message {id} ({streak} time(s) in a row): {error}"
                );
                if streak >= sub.settle_attempts {
                    tracing::error!(subscription = %sub.name, %reason, "giving up on the message; the subscription has failed");
                    stats.set_error(reason.clone());
                    stats.set_state(SubscriptionState::Failed(reason));
                    return;
                }
                same_message_again = streak > 1;
                reason
            }
            Ok(Ok(Exit::UnacceptableLimit(count))) => {
                let reason =
                    format!("performer {index} stopped after {count} unacceptable messages");
                tracing::error!(subscription = %sub.name, %reason);
                stats.set_error(reason.clone());
                stats.set_state(SubscriptionState::Failed(reason));
                return;
            }
            Ok(Err(error)) => format!("performer {index} failed: {error}"),
            Err(join) if join.is_panic() => {
                format!(
                    "performer {index} panicked: {}",
                    panic_message(join.into_panic().as_ref())
                )
            }
            Err(join) => format!("performer {index} was cancelled: {join}"),
        };
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(subscription = %sub.name, error = %failure, ?delay, "restarting performer");
        stats.set_error(failure);
        Stats::bump(&stats.restarts);
        // A performer that ran a while before failing starts the backoff
        // afresh, unless it failed on the same message as before.
        if started.elapsed() > max_delay && !same_message_again {
            delay = first_delay;
        }
        pause(delay, &shutdown).await;
        delay = (delay * 2).min(max_delay);
    }
}
