//! Transforms on a message: applied in order when it is written, undone in
//! reverse order when it is read. Two come with the crate: [`Compression`] (gzip
//! above a size threshold) and [`ClaimCheck`] (a large body goes to a store and
//! the message carries its key).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use flate2::Compression as Level;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::error::Error;
use crate::message::Message;

/// A reversible change to a message.
#[async_trait]
pub trait Transform: Send + Sync + 'static {
    /// Applied when the message is written (before the outbox).
    async fn wrap(&self, message: Message) -> Result<Message, Error>;

    /// Undoes [`wrap`](Transform::wrap) when the message is read; leaves a message
    /// that was not wrapped as it is. Fails with [`Error::Mapping`] on a message
    /// that cannot be unwrapped, which the pump sends to the invalid-message channel.
    async fn unwrap(&self, message: Message) -> Result<Message, Error>;

    /// Called once the message read with [`unwrap`](Transform::unwrap) was
    /// handled and acknowledged, with the message as it arrived (still
    /// wrapped): the place to release what had to outlive every redelivery (a
    /// claim check's stored body). Not called when the message is requeued,
    /// dead-lettered or left for redelivery. A failure is logged; the message
    /// stays acknowledged. Does nothing by default.
    async fn acked(&self, message: &Message) -> Result<(), Error> {
        let _ = message;
        Ok(())
    }
}

/// Tells every transform that `message` (as it arrived) was acknowledged;
/// failures are logged.
pub(crate) async fn acked_all(transforms: &[Arc<dyn Transform>], message: &Message) {
    for transform in transforms.iter().rev() {
        if let Err(error) = transform.acked(message).await {
            tracing::warn!(id = %message.id(), %error, "a transform could not release what it kept for an acknowledged message");
        }
    }
}

/// Applies `transforms` in order.
pub(crate) async fn wrap_all(
    transforms: &[Arc<dyn Transform>],
    mut message: Message,
) -> Result<Message, Error> {
    for transform in transforms {
        message = transform.wrap(message).await?;
    }
    Ok(message)
}

/// Undoes `transforms` in reverse order.
pub(crate) async fn unwrap_all(
    transforms: &[Arc<dyn Transform>],
    mut message: Message,
) -> Result<Message, Error> {
    for transform in transforms.iter().rev() {
        message = transform.unwrap(message).await?;
    }
    Ok(message)
}

/// Header bag key naming the compression of the body.
pub const COMPRESSION_HEADER: &str = "brighter-compression";
/// Header bag key holding the content type the body had before compression.
pub const ORIGINAL_CONTENT_TYPE_HEADER: &str = "brighter-original-content-type";
/// Header bag key holding the claim-check key of a body moved to a store.
pub const CLAIM_CHECK_HEADER: &str = "brighter-claim-check";

/// Gzips bodies larger than a threshold.
///
/// ```
/// use brighter_core::{Compression, Message, MessageHeader, MessageType, Transform};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let gzip = Compression::gzip(1024);
/// let message = Message::new(MessageHeader::new("t", MessageType::Event), vec![b'a'; 10_000]);
/// let wrapped = gzip.wrap(message.clone()).await.unwrap();
/// assert!(wrapped.body.len() < 1024);
/// assert_eq!(gzip.unwrap(wrapped).await.unwrap(), message);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Compression {
    threshold: usize,
    level: u32,
    max_decompressed: usize,
}

impl Compression {
    /// Gzip at the default level for bodies over `threshold` bytes; refuses to
    /// inflate a body past 64 MiB.
    pub fn gzip(threshold: usize) -> Self {
        Compression {
            threshold,
            level: 6,
            max_decompressed: 64 * 1024 * 1024,
        }
    }

    /// Compression level 0 (none) to 9 (best).
    #[must_use]
    pub fn level(mut self, level: u32) -> Self {
        self.level = level.min(9);
        self
    }

    /// The largest body `unwrap` inflates; a larger one is refused as a mapping error.
    #[must_use]
    pub fn max_decompressed(mut self, bytes: usize) -> Self {
        self.max_decompressed = bytes;
        self
    }
}

#[async_trait]
impl Transform for Compression {
    async fn wrap(&self, mut message: Message) -> Result<Message, Error> {
        if message.body.len() <= self.threshold
            || message.header.bag.contains_key(COMPRESSION_HEADER)
        {
            return Ok(message);
        }
        let mut encoder = GzEncoder::new(Vec::new(), Level::new(self.level));
        encoder
            .write_all(&message.body)
            .and_then(|()| encoder.finish())
            .map(|gz| {
                message.body = Bytes::from(gz);
            })
            .map_err(|e| Error::Mapping(format!("gzip failed: {e}")))?;
        let original =
            std::mem::replace(&mut message.header.content_type, "application/gzip".into());
        message
            .header
            .bag
            .insert(COMPRESSION_HEADER.into(), "gzip".into());
        message
            .header
            .bag
            .insert(ORIGINAL_CONTENT_TYPE_HEADER.into(), original.into());
        Ok(message)
    }

    async fn unwrap(&self, mut message: Message) -> Result<Message, Error> {
        match message
            .header
            .bag
            .get(COMPRESSION_HEADER)
            .map(String::as_str)
        {
            None => return Ok(message),
            Some("gzip") => {}
            Some(other) => {
                return Err(Error::Mapping(format!(
                    "message {} is compressed with unknown '{other}'",
                    message.header.id
                )));
            }
        }
        let mut body = Vec::new();
        let limit = u64::try_from(self.max_decompressed).unwrap_or(u64::MAX);
        GzDecoder::new(&message.body[..])
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| {
                Error::Mapping(format!(
                    "message {} is not valid gzip: {e}",
                    message.header.id
                ))
            })?;
        if body.len() > self.max_decompressed {
            return Err(Error::Mapping(format!(
                "message {} inflates past the {} byte limit",
                message.header.id, self.max_decompressed
            )));
        }
        message.body = Bytes::from(body);
        message.header.bag.remove(COMPRESSION_HEADER);
        if let Some(original) = message.header.bag.remove(ORIGINAL_CONTENT_TYPE_HEADER) {
            message.header.content_type = original.into();
        }
        Ok(message)
    }
}

/// Where a [`ClaimCheck`] keeps large bodies.
#[async_trait]
pub trait ClaimCheckStore: Send + Sync + 'static {
    /// Stores `body`; returns the key to fetch it with.
    async fn put(&self, body: Bytes) -> Result<String, Error>;
    /// The body stored under `key`, or `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, Error>;
    /// Removes the body stored under `key`.
    async fn delete(&self, key: &str) -> Result<(), Error>;
}

/// A claim-check store in memory: for samples and tests.
#[derive(Debug, Default, Clone)]
pub struct InMemoryClaimCheckStore {
    bodies: Arc<Mutex<HashMap<String, Bytes>>>,
}

impl InMemoryClaimCheckStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryClaimCheckStore::default()
    }

    /// How many bodies it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        crate::sync::lock(&self.bodies)
    }
}

#[async_trait]
impl ClaimCheckStore for InMemoryClaimCheckStore {
    async fn put(&self, body: Bytes) -> Result<String, Error> {
        let key = uuid::Uuid::now_v7().to_string();
        self.lock().insert(key.clone(), body);
        Ok(key)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        Ok(self.lock().get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        self.lock().remove(key);
        Ok(())
    }
}

/// Moves bodies larger than a threshold to a [`ClaimCheckStore`]; the message
/// carries the key in its header bag and an empty body.
///
/// By default the body stays in the store for good (a message may be delivered
/// more than once, replayed from a dead-letter queue, or read by several
/// subscriptions); call [`delete_after_ack`](ClaimCheck::delete_after_ack) to
/// remove it once a subscription has handled and acknowledged the message.
#[derive(Clone)]
pub struct ClaimCheck {
    store: Arc<dyn ClaimCheckStore>,
    threshold: usize,
    delete_after_ack: bool,
}

impl std::fmt::Debug for ClaimCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimCheck")
            .field("threshold", &self.threshold)
            .field("delete_after_ack", &self.delete_after_ack)
            .finish_non_exhaustive()
    }
}

impl ClaimCheck {
    /// Bodies over `threshold` bytes go to `store`.
    pub fn new(store: Arc<dyn ClaimCheckStore>, threshold: usize) -> Self {
        ClaimCheck {
            store,
            threshold,
            delete_after_ack: false,
        }
    }

    /// Removes the body from the store once the message was handled and
    /// acknowledged, never earlier: a requeued, crashed-before-ack or
    /// dead-lettered message still has its body when it comes back. Only for a
    /// topic with one subscription (another subscription would find the body
    /// gone).
    #[must_use]
    pub fn delete_after_ack(mut self) -> Self {
        self.delete_after_ack = true;
        self
    }
}

#[async_trait]
impl Transform for ClaimCheck {
    async fn wrap(&self, mut message: Message) -> Result<Message, Error> {
        if message.body.len() <= self.threshold
            || message.header.bag.contains_key(CLAIM_CHECK_HEADER)
        {
            return Ok(message);
        }
        let body = std::mem::take(&mut message.body);
        let key = self.store.put(body).await?;
        message.header.bag.insert(CLAIM_CHECK_HEADER.into(), key);
        Ok(message)
    }

    async fn unwrap(&self, mut message: Message) -> Result<Message, Error> {
        let Some(key) = message.header.bag.get(CLAIM_CHECK_HEADER).cloned() else {
            return Ok(message);
        };
        let body = self.store.get(&key).await?.ok_or_else(|| {
            Error::Mapping(format!(
                "message {} refers to claim check '{key}', which the store does not have",
                message.header.id
            ))
        })?;
        message.body = body;
        message.header.bag.remove(CLAIM_CHECK_HEADER);
        Ok(message)
    }

    async fn acked(&self, message: &Message) -> Result<(), Error> {
        match message.header.bag.get(CLAIM_CHECK_HEADER) {
            Some(key) if self.delete_after_ack => self.store.delete(key).await,
            _ => Ok(()),
        }
    }
}
