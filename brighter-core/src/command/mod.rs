//! Command processing: requests, their context, handlers, the policy
//! pipeline and the command processor that dispatches through it.

pub(crate) mod context;
pub(crate) mod handler;
pub mod pipeline;
pub(crate) mod processor;
pub(crate) mod request;
