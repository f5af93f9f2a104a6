//! Routing slips in memory: how a slip moves on, what a step delivered twice
//! does, and what is refused (the transport suite runs the whole trip on
//! every transport: `conformance::a_routing_slip_forwards_in_order_and_compensates_in_reverse`).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter_core::pipeline::{Pipeline, UseInbox};
use brighter_core::{
    Command, CommandProcessor, Dispatcher, Error, Handler, InMemoryBroker, InMemoryInbox,
    InMemoryOutbox, Message, MessageHeader, MessageType, Producer, Publication,
    ROUTING_SLIP_HEADER, Request, RequestContext, RoutingSlip, SlipPosition, Subscription,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Leg {
    id: Uuid,
    name: String,
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
        name: name.into(),
    }
}

/// A processor whose `Leg` handler is behind the inbox; the broker's `legs`
/// queue is bound, so nothing sent before the pump starts is refused.
fn processor(broker: &InMemoryBroker, handler: Recorder) -> CommandProcessor {
    processor_with(broker, handler, InMemoryOutbox::new())
}

fn processor_with(
    broker: &InMemoryBroker,
    handler: Recorder,
    outbox: InMemoryOutbox,
) -> CommandProcessor {
    broker.declare("legs", "legs").unwrap();
    CommandProcessor::builder()
        .outbox(outbox)
        .inbox(InMemoryInbox::new())
        .command_with(Pipeline::new().step(UseInbox::new("legs")), handler)
        .publication::<Leg>(Publication::command("legs"))
        .producer(broker.clone())
        .build()
        .unwrap()
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Handler<Leg> for Recorder {
    async fn handle(&self, leg: &Leg, _: &mut RequestContext) -> Result<(), Error> {
        self.0.lock().unwrap().push(leg.name.clone());
        Ok(())
    }
}

impl Recorder {
    async fn until(&self, count: usize) -> Vec<String> {
        for _ in 0..500 {
            if self.0.lock().unwrap().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn compensating_skips_the_done_steps_that_have_no_compensation() {
    let broker = InMemoryBroker::new();
    let processor = processor(&broker, Recorder::default());
    let slip = processor
        .routing_slip()
        .step(&leg("a"))
        .compensate(&leg("undo a"))
        .step(&leg("b"))
        .step(&leg("c"))
        .compensate(&leg("undo c"))
        .step(&leg("d"))
        .build()
        .unwrap();
    assert_eq!(slip.position, SlipPosition::Step { index: 0 });
    // d fails: c, then (b has nothing to undo) a.
    let at_d = slip
        .after_success()
        .and_then(|s| s.after_success())
        .and_then(|s| s.after_success())
        .unwrap();
    assert_eq!(at_d.position, SlipPosition::Step { index: 3 });
    assert_eq!(at_d.completed, 3);
    let undo_c = at_d.after_fault("no").unwrap();
    assert_eq!(undo_c.position, SlipPosition::Compensation { index: 2 });
    assert_eq!(undo_c.fault.as_ref().unwrap().step, 3);
    let undo_a = undo_c.after_success().unwrap();
    assert_eq!(undo_a.position, SlipPosition::Compensation { index: 0 });
    let faulted = undo_a.after_success().unwrap();
    assert_eq!(faulted.position, SlipPosition::Faulted);
    assert!(faulted.after_success().is_none(), "the end");
    // A failed compensation is not compensated: it is dead-lettered.
    assert!(undo_c.after_fault("again").is_none());
    // The first step failing has nothing to undo.
    assert_eq!(
        slip.after_fault("no").unwrap().position,
        SlipPosition::Faulted
    );
}

#[tokio::test]
async fn a_step_delivered_twice_forwards_the_slip_once() {
    // A step redelivered after its handler ran (the consumer died before
    // acking) is skipped by the inbox and forwards the slip again: the
    // forward has the id the slip planned for it, so the outbox and the next
    // step see one message.
    let broker = InMemoryBroker::new();
    let recorder = Recorder::default();
    let outbox = InMemoryOutbox::new();
    let processor = processor_with(&broker, recorder.clone(), outbox.clone());
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Leg>("legs", "legs", broker.clone())
                .empty_channel_delay(Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let slip = processor
        .routing_slip()
        .step(&leg("first"))
        .step(&leg("second"))
        .build()
        .unwrap();
    let first = processor.post_routing_slip(&slip).await.unwrap();
    assert_eq!(recorder.until(2).await, ["first", "second"]);
    // The first step's message once more, as a broker would redeliver it.
    let again = processor.outbox().get(&[first]).await.unwrap();
    assert!(again.is_empty(), "the first step is dispatched");
    let mut copy = Message::new(MessageHeader::new("legs", MessageType::Command), "{}");
    copy.header.id = first;
    copy.body = serde_json::to_vec(&Leg {
        id: first,
        name: "first".into(),
    })
    .unwrap()
    .into();
    copy.header
        .bag
        .insert(ROUTING_SLIP_HEADER.into(), slip.to_header().unwrap());
    broker.send(&copy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatcher.shutdown().await;
    assert_eq!(
        *recorder.0.lock().unwrap(),
        ["first", "second"],
        "a step ran twice"
    );
    let planned: Vec<Uuid> = slip.itinerary.iter().map(|s| s.message.id).collect();
    let mut sent: Vec<Uuid> = outbox.entries().iter().map(|e| e.message.id()).collect();
    sent.sort();
    assert_eq!(sent, planned, "each step one message, with its planned id");
}

#[tokio::test]
async fn a_message_whose_slip_cannot_be_read_goes_to_the_invalid_channel() {
    let broker = InMemoryBroker::new();
    let recorder = Recorder::default();
    let processor = processor(&broker, recorder.clone());
    let dispatcher = Dispatcher::builder(processor.clone())
        .subscription(
            Subscription::command::<Leg>("legs", "legs", broker.clone())
                .empty_channel_delay(Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    dispatcher.start().await.unwrap();
    let slip = processor.routing_slip().step(&leg("only")).build().unwrap();
    let mut past_the_end = slip.clone();
    past_the_end.position = SlipPosition::Step { index: 7 };
    for header in ["{not json".to_owned(), past_the_end.to_header().unwrap()] {
        let leg = leg("garbled");
        let mut message = Message::new(
            MessageHeader::new("legs", MessageType::Command),
            serde_json::to_vec(&leg).unwrap(),
        );
        message.header.id = leg.id;
        message
            .header
            .bag
            .insert(ROUTING_SLIP_HEADER.into(), header);
        broker.send(&message).await.unwrap();
    }
    let mut invalid = Vec::new();
    for _ in 0..200 {
        invalid = broker.invalid_messages("legs");
        if invalid.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dispatcher.shutdown().await;
    assert_eq!(invalid.len(), 2, "{invalid:?}");
    assert!(
        invalid.iter().all(|p| p.reason.contains("routing slip")),
        "{invalid:?}"
    );
    assert!(recorder.0.lock().unwrap().is_empty(), "a handler ran");
}

#[tokio::test]
async fn a_slip_that_cannot_work_is_refused_when_built() {
    let broker = InMemoryBroker::new();
    let processor = processor(&broker, Recorder::default());
    let empty = processor.routing_slip().build().unwrap_err();
    assert!(empty.to_string().contains("itinerary is empty"), "{empty}");
    let early = processor
        .routing_slip()
        .compensate(&leg("undo"))
        .step(&leg("do"))
        .build()
        .unwrap_err();
    assert!(early.to_string().contains("after the step"), "{early}");
    let same = leg("twice");
    let twice = processor
        .routing_slip()
        .step(&same)
        .step(&same)
        .build()
        .unwrap_err();
    assert!(twice.to_string().contains("used twice"), "{twice}");
    #[derive(Serialize, Deserialize)]
    struct Unpublished {
        id: Uuid,
    }
    impl Request for Unpublished {
        fn id(&self) -> Uuid {
            self.id
        }
    }
    let unknown = processor
        .routing_slip()
        .step(&Unpublished { id: Uuid::now_v7() })
        .build()
        .unwrap_err();
    assert!(unknown.to_string().contains("no publication"), "{unknown}");
    let addressed = processor
        .routing_slip()
        .step_to("elsewhere", &Unpublished { id: Uuid::now_v7() })
        .build()
        .unwrap();
    assert_eq!(addressed.itinerary[0].message.topic, "elsewhere");
    let read: RoutingSlip = serde_json::from_str(&addressed.to_header().unwrap()).unwrap();
    assert_eq!(read, addressed, "the header round-trips");
}
