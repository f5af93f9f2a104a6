//! Conversations: process managers (sagas) with stored state, and routing
//! slips that carry their own itinerary. Turn taking, the third pattern,
//! needs nothing more than handlers that send with the context's verbs.

pub(crate) mod saga;
pub(crate) mod slip;

pub use saga::{Saga, SagaBuilder, SagaContext, SagaNotFound, SagaStep};
pub use slip::{
    ROUTING_SLIP_HEADER, RoutingSlip, RoutingSlipBuilder, SlipFault, SlipMessage, SlipPosition,
    SlipStep,
};
