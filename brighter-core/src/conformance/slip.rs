//! The routing slip over a transport: its itinerary travels in the header,
//! each step is forwarded to the next, and a failed step's done steps are
//! compensated in reverse, whatever carries the messages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

use super::{Harness, WAIT, fresh};
use crate::{
    Command, CommandProcessor, Dispatcher, Error, Handler, Publication, Request, RequestContext,
    RoutingSlip, SlipPosition, Subscription,
};

/// One leg of a trip: every step, compensation and notice of the check is
/// one, to one topic, so that one subscription sees the whole slip in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leg {
    /// Request id.
    pub id: Uuid,
    /// What the leg does (`car!` fails).
    pub name: String,
}

impl Request for Leg {
    fn id(&self) -> Uuid {
        self.id
    }
}
impl Command for Leg {}

fn leg(name: &str) -> Leg {
    Leg {
        id: Uuid::now_v7(),
        name: name.to_owned(),
    }
}

/// What a leg's handler saw: its name and the slip it carried.
type Seen = Arc<Mutex<Vec<(String, RoutingSlip)>>>;

#[derive(Clone, Default)]
struct Legs {
    seen: Seen,
}

impl Handler<Leg> for Legs {
    async fn handle(&self, leg: &Leg, ctx: &mut RequestContext) -> Result<(), Error> {
        let slip = ctx
            .routing_slip()
            .ok_or_else(|| Error::fatal(format!("leg {} arrived without its slip", leg.name)))?;
        self.seen
            .lock()
            .expect("lock")
            .push((leg.name.clone(), slip));
        if leg.name.ends_with('!') {
            return Err(Error::reject(format!("{} is fully booked", leg.name)));
        }
        Ok(())
    }
}

async fn seen_until(seen: &Seen, count: usize) -> Vec<(String, RoutingSlip)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = seen.lock().expect("lock").clone();
        if now.len() >= count || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A routing slip posted to a transport: every step is forwarded to the
/// next in order with the itinerary intact and the steps done counted, then
/// the completed notice; a slip whose third step fails compensates the two
/// done steps in reverse order, then sends the faulted notice with the
/// failed step and its reason.
pub async fn a_routing_slip_forwards_in_order_and_compensates_in_reverse<H: Harness>(harness: &H) {
    let (topic, channel) = fresh(harness, "slip").await;
    let legs = Legs::default();
    let processor = CommandProcessor::builder()
        .command(legs.clone())
        .publication::<Leg>(Publication::command(&topic))
        .producer(harness.producer())
        .build()
        .expect("processor");
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Leg>(&channel, &topic, harness.channel_factory())
                .channel(&channel)
                .empty_channel_delay(Duration::from_millis(10))
                .receive_timeout(Duration::from_millis(200)),
        )
        .build()
        .expect("dispatcher");
    dispatcher.start().await.expect("start");

    let trip = |car: &str| {
        processor
            .routing_slip()
            .step(&leg("flight"))
            .compensate(&leg("cancel flight"))
            .step(&leg("hotel"))
            .compensate(&leg("cancel hotel"))
            .step(&leg(car))
            .on_completed(&leg("booked"))
            .on_faulted(&leg("not booked"))
            .build()
            .expect("slip")
    };

    let booked = trip("car");
    processor.post_routing_slip(&booked).await.expect("post");
    let seen = seen_until(&legs.seen, 4).await;
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["flight", "hotel", "car", "booked"],
        "steps in order"
    );
    for (i, (name, slip)) in seen.iter().enumerate() {
        assert_eq!(slip.id, booked.id, "{name}: the same slip");
        assert_eq!(slip.itinerary, booked.itinerary, "{name}: itinerary intact");
        assert_eq!(slip.completed, i, "{name}: steps done before it");
    }
    assert_eq!(seen[3].1.position, SlipPosition::Completed);

    legs.seen.lock().expect("lock").clear();
    let failing = trip("car!");
    processor.post_routing_slip(&failing).await.expect("post");
    let seen = seen_until(&legs.seen, 6).await;
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "flight",
            "hotel",
            "car!",
            "cancel hotel",
            "cancel flight",
            "not booked"
        ],
        "the done steps compensated in reverse"
    );
    let (_, faulted) = &seen[5];
    assert_eq!(faulted.position, SlipPosition::Faulted);
    let fault = faulted
        .fault
        .as_ref()
        .expect("the fault travels with the slip");
    assert_eq!(fault.step, 2, "the failed step");
    assert!(fault.reason.contains("car! is fully booked"), "{fault:?}");
    // Nothing more comes: the failed step was replaced by its fault, not
    // dead-lettered and not retried.
    tokio::time::sleep(Duration::from_secs(1)).await;
    dispatcher.shutdown().await;
    assert_eq!(
        legs.seen.lock().expect("lock").len(),
        6,
        "nothing after the notice"
    );
    let dead = harness
        .dead_letters(&topic, &channel)
        .await
        .expect("dead letters");
    assert!(
        dead.is_empty(),
        "the failed step was dead-lettered: {dead:?}"
    );
}
