//! The reply channel of a messenger: one per processor instance, opened on the
//! first `call` and shared by every call after it. A task receives the
//! replies, acks them, and hands each to the call waiting for its correlation
//! id; replies nobody waits for (late, or foreign) are dropped with a warning.
//! The channel closes, and on brokers that allow it is removed, when
//! [`Messenger::close_replies`](super::Messenger::close_replies) is called or
//! the last clone of the messenger goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dispatch::channel::{Channel, ChannelFactory, ChannelSpec};
use crate::error::Error;
use crate::message::{Message, SmolStr};
use crate::sync::lock;

type Pending = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Message>>>>;

/// The shared reply channel and the calls waiting on it.
pub(crate) struct Replies {
    /// The reply-to address every call of this messenger sends.
    pub(crate) reply_to: SmolStr,
    pending: Pending,
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A call waiting for its reply; dropping it stops waiting.
pub(crate) struct Waiting {
    pending: Pending,
    correlation_id: Uuid,
    pub(crate) reply: oneshot::Receiver<Message>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.correlation_id);
    }
}

impl Replies {
    /// Opens the reply channel (a fresh, private, auto-deleted one) and starts
    /// its receiving task.
    pub(crate) async fn open(factory: Arc<dyn ChannelFactory>) -> Result<Replies, Error> {
        let reply_to = format!("reply.{}", Uuid::now_v7().simple());
        let mut spec = ChannelSpec::new("replies", reply_to.clone(), reply_to.clone());
        spec.auto_delete = true;
        spec.buffer_size = 16;
        let channel = factory.create_channel(&spec).await?;
        let pending: Pending = Arc::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(receive(
            channel,
            factory,
            spec,
            Arc::clone(&pending),
            stop.clone(),
        ));
        Ok(Replies {
            reply_to: reply_to.into(),
            pending,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// Registers a call waiting for `correlation_id`, before its request is sent.
    pub(crate) fn wait_for(&self, correlation_id: Uuid) -> Waiting {
        let (sender, reply) = oneshot::channel();
        lock(&self.pending).insert(correlation_id, sender);
        Waiting {
            pending: Arc::clone(&self.pending),
            correlation_id,
            reply,
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops receiving and closes the channel (which removes it where the
    /// broker allows).
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// Receives replies until `stop`, reopening the channel after a failure.
async fn receive(
    mut channel: Box<dyn Channel>,
    factory: Arc<dyn ChannelFactory>,
    spec: ChannelSpec,
    pending: Pending,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            received = channel.receive(Duration::from_secs(1)) => received,
        };
        match received {
            Ok(Some(delivery)) => {
                delay = Duration::from_millis(100);
                if let Err(error) = channel.ack(&delivery).await {
                    tracing::warn!(%error, "reply channel: ack failed");
                }
                let message = delivery.into_message();
                let waiting = lock(&pending).remove(&message.header.correlation_id);
                match waiting {
                    Some(call) => {
                        let _ = call.send(message);
                    }
                    None => {
                        tracing::warn!(id = %message.id(), correlation_id = %message.header.correlation_id, "reply channel: a reply nobody waits for (late or foreign); dropped")
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, ?delay, "reply channel failed; reopening it");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                match factory.create_channel(&spec).await {
                    Ok(reopened) => channel = reopened,
                    Err(error) => tracing::warn!(%error, "reopening the reply channel failed"),
                }
            }
        }
    }
    if let Err(error) = channel.close().await {
        tracing::debug!(%error, "closing the reply channel failed");
    }
}
