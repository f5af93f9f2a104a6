//! Trip: a routing slip books a trip across three services. The travel agency
//! plans the itinerary (book a flight, then a hotel, then a car; cancelling
//! the flight and the hotel undo the first two) and posts it; each service
//! only does its step, and the framework forwards the slip to the next one.
//! The first trip is booked end to end. For the second, the car rental has
//! no car: the hotel and then the flight are cancelled, in reverse order,
//! and the agency is told why.
//!
//! `--asyncapi` prints the sample's AsyncAPI document and exits.
//!
//! Run with: cargo run -p trip
//!           cargo run -p trip --features rabbitmq -- --transport rabbitmq
//!           cargo run -p trip --features kafka -- --transport kafka
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brighter::pipeline::{Identity, Pipeline, Stack, UseInbox};
use brighter::uuid::Uuid;
use brighter::{
    Command, CommandProcessor, CommandProcessorBuilder, Dispatcher, Error, Event, Handler,
    InMemoryInbox, Publication, RequestContext, RoutingSlip, Subscription,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

macro_rules! request {
    ($kind:ident $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, $kind)]
        #[doc = concat!("The `", stringify!($name), "` message.")]
        struct $name {
            id: Uuid,
            trip: Uuid,
            $($field: $ty),*
        }
    };
}

request!(Command BookFlight { from: String, to: String });
request!(Command CancelFlight {});
request!(Command BookHotel { city: String, nights: u32 });
request!(Command CancelHotel {});
request!(Command BookCar { city: String });
request!(Event TripBooked {});
request!(Event TripNotBooked {});

/// What the services did, per trip, in order.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<Vec<(Uuid, String)>>>);

impl Ledger {
    fn write(&self, trip: Uuid, entry: String) {
        println!("  trip {}: {entry}", short(trip));
        if let Ok(mut entries) = self.0.lock() {
            entries.push((trip, entry));
        }
    }

    fn of(&self, trip: Uuid) -> Vec<String> {
        self.0
            .lock()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|(t, _)| *t == trip)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn short(id: Uuid) -> String {
    let id = id.simple().to_string();
    id[id.len() - 8..].to_owned()
}

/// The flights service: books and cancels flights.
#[derive(Clone)]
struct Flights(Ledger);

impl Handler<BookFlight> for Flights {
    async fn handle(&self, cmd: &BookFlight, _: &mut RequestContext) -> Result<(), Error> {
        self.0.write(
            cmd.trip,
            format!("[flights] flight {} -> {} booked", cmd.from, cmd.to),
        );
        Ok(())
    }
}

impl Handler<CancelFlight> for Flights {
    async fn handle(&self, cmd: &CancelFlight, _: &mut RequestContext) -> Result<(), Error> {
        self.0.write(cmd.trip, "[flights] flight cancelled".into());
        Ok(())
    }
}

/// The hotels service: books and cancels rooms.
#[derive(Clone)]
struct Hotels(Ledger);

impl Handler<BookHotel> for Hotels {
    async fn handle(&self, cmd: &BookHotel, _: &mut RequestContext) -> Result<(), Error> {
        self.0.write(
            cmd.trip,
            format!("[hotels]  {} nights in {} booked", cmd.nights, cmd.city),
        );
        Ok(())
    }
}

impl Handler<CancelHotel> for Hotels {
    async fn handle(&self, cmd: &CancelHotel, _: &mut RequestContext) -> Result<(), Error> {
        self.0.write(cmd.trip, "[hotels]  room cancelled".into());
        Ok(())
    }
}

/// The car rental: it has no car in Reykjavik.
#[derive(Clone)]
struct Cars(Ledger);

impl Handler<BookCar> for Cars {
    async fn handle(&self, cmd: &BookCar, _: &mut RequestContext) -> Result<(), Error> {
        if cmd.city == "Reykjavik" {
            self.0
                .write(cmd.trip, format!("[cars]    no car left in {}", cmd.city));
            // A business failure: the slip compensates the steps done.
            return Err(Error::reject(format!("no car left in {}", cmd.city)));
        }
        self.0
            .write(cmd.trip, format!("[cars]    car in {} booked", cmd.city));
        Ok(())
    }
}

/// The travel agency hears how each trip ended: booked, or not, and why
/// (the fault travels in the slip).
#[derive(Clone, Default)]
struct Agency {
    ledger: Ledger,
    outcomes: Arc<Mutex<HashMap<Uuid, String>>>,
}

impl Agency {
    fn outcome(&self, trip: Uuid, outcome: String) {
        self.ledger.write(trip, format!("[agency]  trip {outcome}"));
        if let Ok(mut outcomes) = self.outcomes.lock() {
            outcomes.insert(trip, outcome);
        }
    }

    fn of(&self, trip: Uuid) -> Option<String> {
        self.outcomes.lock().ok()?.get(&trip).cloned()
    }
}

impl Handler<TripBooked> for Agency {
    async fn handle(&self, event: &TripBooked, ctx: &mut RequestContext) -> Result<(), Error> {
        let steps = ctx.routing_slip().map_or(0, |slip| slip.completed);
        self.outcome(event.trip, format!("booked ({steps} steps done)"));
        Ok(())
    }
}

impl Handler<TripNotBooked> for Agency {
    async fn handle(&self, event: &TripNotBooked, ctx: &mut RequestContext) -> Result<(), Error> {
        let why = ctx
            .routing_slip()
            .and_then(|slip| slip.fault)
            .map(|fault| format!("step {} failed: {}", fault.step + 1, fault.reason))
            .unwrap_or_else(|| "no reason given".into());
        self.outcome(event.trip, format!("not booked ({why})"));
        Ok(())
    }
}

/// One run's topics (unique, so runs never mix).
struct Topics {
    run: String,
}

impl Topics {
    fn topic(&self, name: &str) -> String {
        format!("trip.{name}.{}", self.run)
    }
}

/// A service: its handlers behind the inbox, one subscription per message
/// (its dispatcher not started yet).
fn service(
    builder: CommandProcessorBuilder,
    transport: &sample_support::Transport,
    subscriptions: impl FnOnce(&sample_support::Transport) -> Vec<Subscription>,
) -> Result<(CommandProcessor, Dispatcher), Error> {
    let processor = builder.producer(transport.producer.clone()).build()?;
    let mut dispatcher = Dispatcher::builder(processor.clone());
    for subscription in subscriptions(transport) {
        dispatcher = dispatcher.subscription(subscription);
    }
    Ok((processor, dispatcher.build()?))
}

/// Once-only handling in `context`.
fn once(context: &str) -> Pipeline<Stack<UseInbox, Identity>> {
    Pipeline::new().step(UseInbox::new(context))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let options = sample_support::options(std::env::args().skip(1), "memory", "memory")?;
    let _telemetry = sample_support::telemetry("trip")?;
    let transport = sample_support::transport(&options.transport, "trip")?;
    let run = Uuid::now_v7().simple().to_string();
    let topics = Topics {
        run: run[run.len() - 12..].to_owned(),
    };
    let t = |name: &str| topics.topic(name);
    let sub = |name: &str| format!("trip-{name}-{}", topics.run);
    let ledger = Ledger::default();
    let agency = Agency {
        ledger: ledger.clone(),
        ..Agency::default()
    };

    let flights = Flights(ledger.clone());
    let hotels = Hotels(ledger.clone());
    let cars = Cars(ledger.clone());
    let mut dispatchers = vec![
        service(
            CommandProcessor::builder()
                .inbox(InMemoryInbox::new())
                .command_with::<BookFlight, _, _>(once("flights.book"), flights.clone())
                .command_with::<CancelFlight, _, _>(once("flights.cancel"), flights),
            &transport,
            |tr| {
                vec![
                    Subscription::command::<BookFlight>(
                        sub("flights-book"),
                        t("flights.book"),
                        tr.channels.clone(),
                    ),
                    Subscription::command::<CancelFlight>(
                        sub("flights-cancel"),
                        t("flights.cancel"),
                        tr.channels.clone(),
                    ),
                ]
            },
        )?,
        service(
            CommandProcessor::builder()
                .inbox(InMemoryInbox::new())
                .command_with::<BookHotel, _, _>(once("hotels.book"), hotels.clone())
                .command_with::<CancelHotel, _, _>(once("hotels.cancel"), hotels),
            &transport,
            |tr| {
                vec![
                    Subscription::command::<BookHotel>(
                        sub("hotels-book"),
                        t("hotels.book"),
                        tr.channels.clone(),
                    ),
                    Subscription::command::<CancelHotel>(
                        sub("hotels-cancel"),
                        t("hotels.cancel"),
                        tr.channels.clone(),
                    ),
                ]
            },
        )?,
        service(
            CommandProcessor::builder()
                .inbox(InMemoryInbox::new())
                .command_with(once("cars.book"), cars),
            &transport,
            |tr| {
                vec![Subscription::command::<BookCar>(
                    sub("cars-book"),
                    t("cars.book"),
                    tr.channels.clone(),
                )]
            },
        )?,
    ];
    // The agency plans the slips: its publications say where each message
    // of an itinerary goes.
    let planner = CommandProcessor::builder()
        .event::<TripBooked>(agency.clone())
        .event::<TripNotBooked>(agency.clone())
        .publication::<BookFlight>(Publication::command(t("flights.book")))
        .publication::<CancelFlight>(Publication::command(t("flights.cancel")))
        .publication::<BookHotel>(Publication::command(t("hotels.book")))
        .publication::<CancelHotel>(Publication::command(t("hotels.cancel")))
        .publication::<BookCar>(Publication::command(t("cars.book")))
        .publication::<TripBooked>(Publication::event(t("booked")))
        .publication::<TripNotBooked>(Publication::event(t("not-booked")))
        .producer(transport.producer.clone())
        .build()?;
    let agency_dispatcher = Dispatcher::builder(planner.clone())
        .subscription(Subscription::event::<TripBooked>(
            sub("booked"),
            t("booked"),
            transport.channels.clone(),
        ))
        .subscription(Subscription::event::<TripNotBooked>(
            sub("not-booked"),
            t("not-booked"),
            transport.channels.clone(),
        ))
        .build()?;
    dispatchers.push((planner.clone(), agency_dispatcher));
    if options.asyncapi {
        let processors: Vec<&CommandProcessor> = dispatchers.iter().map(|(p, _)| p).collect();
        let subscribers: Vec<&Dispatcher> = dispatchers.iter().map(|(_, d)| d).collect();
        sample_support::print_asyncapi(
            "trip",
            "A travel agency books trips with a routing slip across flights, hotels and cars",
            &processors,
            &subscribers,
        );
        return Ok(());
    }
    let dispatchers: Vec<Dispatcher> = dispatchers.into_iter().map(|(_, d)| d).collect();
    for dispatcher in &dispatchers {
        dispatcher.start().await?;
    }
    sample_support::wait_until("the services' start", Duration::from_secs(60), async || {
        dispatchers
            .iter()
            .all(|d| d.health().iter().all(|h| h.is_healthy()))
    })
    .await?;
    println!(
        "travel agency, flights, hotels and cars running over {}",
        transport.name
    );

    let book = async |n: u32, city: &str, what: &str| {
        let trip = Uuid::now_v7();
        println!();
        println!("{n}. {what} (trip {})", short(trip));
        let slip: RoutingSlip = planner
            .routing_slip()
            .step(&BookFlight {
                id: Uuid::now_v7(),
                trip,
                from: "London".into(),
                to: city.into(),
            })
            .compensate(&CancelFlight {
                id: Uuid::now_v7(),
                trip,
            })
            .step(&BookHotel {
                id: Uuid::now_v7(),
                trip,
                city: city.into(),
                nights: 3,
            })
            .compensate(&CancelHotel {
                id: Uuid::now_v7(),
                trip,
            })
            .step(&BookCar {
                id: Uuid::now_v7(),
                trip,
                city: city.into(),
            })
            .on_completed(&TripBooked {
                id: Uuid::now_v7(),
                trip,
            })
            .on_faulted(&TripNotBooked {
                id: Uuid::now_v7(),
                trip,
            })
            .build()?;
        planner.post_routing_slip(&slip).await?;
        sample_support::wait_until(
            &format!("trip {n}'s outcome"),
            Duration::from_secs(60),
            async || agency.of(trip).is_some(),
        )
        .await?;
        Ok::<_, Error>(trip)
    };
    let lisbon = book(
        1,
        "Lisbon",
        "a trip to Lisbon: flight, hotel and car are booked",
    )
    .await?;
    let reykjavik = book(
        2,
        "Reykjavik",
        "a trip to Reykjavik: no car is left, so the hotel and the flight are cancelled",
    )
    .await?;
    // Anything more would show now: a step forwarded twice, a late compensation.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for dispatcher in &dispatchers {
        dispatcher.shutdown().await;
    }

    println!();
    println!("end state:");
    let expected_lisbon = [
        "[flights] flight London -> Lisbon booked",
        "[hotels]  3 nights in Lisbon booked",
        "[cars]    car in Lisbon booked",
        "[agency]  trip booked (3 steps done)",
    ];
    let expected_reykjavik = [
        "[flights] flight London -> Reykjavik booked",
        "[hotels]  3 nights in Reykjavik booked",
        "[cars]    no car left in Reykjavik",
        "[hotels]  room cancelled",
        "[flights] flight cancelled",
        "[agency]  trip not booked (step 3 failed: no car left in Reykjavik)",
    ];
    let mut right = true;
    for (trip, expected) in [
        (lisbon, &expected_lisbon[..]),
        (reykjavik, &expected_reykjavik[..]),
    ] {
        let entries = ledger.of(trip);
        println!("  trip {}: {}", short(trip), entries.join("; "));
        right &= entries == expected;
    }
    if !right {
        return Err(Error::configuration("the trips ended in the wrong state"));
    }
    println!();
    println!(
        "done: trip 1 booked (flight, hotel, car); trip 2 car refused, hotel and flight cancelled in reverse"
    );
    Ok(())
}
