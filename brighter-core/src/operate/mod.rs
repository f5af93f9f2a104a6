//! Operating a service: the AsyncAPI document of what it publishes and
//! subscribes to, and the activity of one conversation rebuilt from the
//! outboxes and inboxes of the services it crossed.

pub(crate) mod activity;
pub(crate) mod asyncapi;

pub use activity::{Activity, ActivityStep, Direction, Whereabouts};
pub use asyncapi::{
    AsyncApi, DescribedPublication, DescribedReply, DescribedSubscription, Endpoint,
};
