//! Messaging configuration of the processor (publications, producers, outbox).
//! Filled in by the messaging layer.

use crate::error::Error;

#[derive(Default)]
pub(crate) struct MessagingBuilder {}

pub(crate) struct Messaging {}

impl MessagingBuilder {
    pub(crate) fn build(self) -> Result<Messaging, Error> {
        Ok(Messaging {})
    }
}
