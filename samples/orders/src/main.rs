//! Orders: a conversation between two services over a broker, each with its
//! own Postgres tables, outbox and inbox (`DATABASE_URL`), in two flows.
//!
//! **Choreography** (`--flow choreography`, the default): no one runs the
//! conversation, each service reacts to the last message.
//! - The **orders** service takes `PlaceOrder`: in one transaction it records
//!   the order, reserves the stock and deposits `TakePayment` in its outbox.
//! - The **payments** service takes `TakePayment` (inbox-protected, so a
//!   redelivery charges nobody twice). It charges the card and deposits
//!   `PaymentTaken`; a declined card instead sends the fault message
//!   `PaymentFailed` back to the orders service.
//! - The orders service marks the order paid on `PaymentTaken`, and on
//!   `PaymentFailed` compensates: it releases the reserved stock and cancels the
//!   order.
//!
//! **Orchestration** (`--flow orchestration`): a process manager, the
//! `OrderSaga` (see `saga.rs`), runs each order with its state in a Postgres
//! saga store: it places the order, asks for the payment and schedules a
//! payment timeout to itself; whichever comes first of the payment, the
//! declined card or the timeout decides. Payments sends a large order to
//! manual review and does not answer: the timeout fires, and the saga
//! releases the stock and cancels the order.
//!
//! Both services run in this one process, each with its own processor,
//! dispatcher, schema, outbox and sweeper, as they would in two. The run places
//! one order that is paid and one whose payment fails (and, orchestrated, one
//! that payments never answers), checks the end state and drops its schemas.
//!
//! Or as two processes, two services (each its own `service.name`, outbox and
//! inbox): `--service payments --run R` serves payments until SIGTERM or
//! Ctrl-C; `--service orders --run R` places the orders through it and
//! checks the orders side's end state. With `OTEL_EXPORTER_OTLP_ENDPOINT` set
//! each order is one trace across both services.
//!
//! `--asyncapi` prints the AsyncAPI document of the service(s) `--service`
//! names (both by default) and exits; it needs no database.
//!
//! Run with: cargo run -p orders                          (in-memory broker, Postgres)
//!           cargo run -p orders -- --flow orchestration
//!           cargo run -p orders --features rabbitmq -- --transport rabbitmq
//!           cargo run -p orders --features kafka -- --transport kafka --flow orchestration
#![allow(clippy::print_stdout)]

mod orders;
mod saga;

use std::time::Duration;

use brighter::pipeline::{Pipeline, UseInbox};
use brighter::postgres::{PgInbox, PgOutbox, PgSagaStore, PgSweeper, PgUnitOfWork, pg_transaction};
use brighter::sqlx::{self, PgPool};
use brighter::uuid::Uuid;
use brighter::{
    CommandProcessor, CommandProcessorBuilder, Dispatcher, Error, Handler, Publication,
    RequestContext, SagaBuilder, SagaStore, Subscription,
};

use orders::{
    Orders, PaymentFailed, PaymentTaken, PaymentTimeout, PlaceOrder, TakePayment, db_error, short,
};
use saga::{OrderSaga, PAYMENT_TIMEOUT};

/// Cards are declined above this amount.
const CARD_LIMIT_CENTS: i64 = 100_000;
/// Payments above this amount (and within the card limit) go to manual
/// review, and payments does not answer.
const REVIEW_ABOVE_CENTS: i64 = 50_000;

/// Names of one run's schemas and topics (unique, so runs never mix).
#[derive(Clone)]
struct Names {
    orders: String,
    payments: String,
    take_payment: String,
    payment_taken: String,
    payment_failed: String,
    payment_timeout: String,
}

impl Names {
    /// A fresh run's names.
    fn new() -> Self {
        let run = Uuid::now_v7().simple().to_string();
        Names::of(&run[run.len() - 12..])
    }

    /// The names of run `run` (what two processes of one run agree on).
    fn of(run: &str) -> Self {
        Names {
            orders: format!("orders_{run}"),
            payments: format!("payments_{run}"),
            take_payment: format!("payments.take.{run}"),
            payment_taken: format!("orders.payment-taken.{run}"),
            payment_failed: format!("orders.payment-failed.{run}"),
            payment_timeout: format!("orders.payment-timeout.{run}"),
        }
    }

    fn orders(&self) -> Orders {
        Orders {
            schema: self.orders.clone(),
        }
    }
}

// ------------------------------------------- orders, choreographed handlers

struct PlaceOrderHandler {
    orders: Orders,
}
impl Handler<PlaceOrder> for PlaceOrderHandler {
    async fn handle(&self, cmd: &PlaceOrder, ctx: &mut RequestContext) -> Result<(), Error> {
        if !self.orders.place(pg_transaction(ctx)?, cmd).await? {
            return Err(Error::reject(format!(
                "{} x {} is not in stock",
                cmd.quantity, cmd.sku
            )));
        }
        let payment = TakePayment {
            id: Uuid::now_v7(),
            order_id: cmd.order_id,
            amount_cents: cmd.amount_cents,
        };
        // In the same transaction: the payment request exists if and only if the
        // order does.
        ctx.deposit_post(&payment).await?;
        Ok(())
    }
}

struct PaymentTakenHandler {
    orders: Orders,
}
impl Handler<PaymentTaken> for PaymentTakenHandler {
    async fn handle(&self, event: &PaymentTaken, ctx: &mut RequestContext) -> Result<(), Error> {
        self.orders.ship(pg_transaction(ctx)?, event).await
    }
}

/// The compensation: releases the reserved stock and cancels the order.
struct PaymentFailedHandler {
    orders: Orders,
}
impl Handler<PaymentFailed> for PaymentFailedHandler {
    async fn handle(&self, fault: &PaymentFailed, ctx: &mut RequestContext) -> Result<(), Error> {
        let reason = format!("payment failed ({})", fault.reason);
        self.orders
            .cancel(pg_transaction(ctx)?, fault.order_id, &reason)
            .await
    }
}

// ---------------------------------------------------------------- payments

struct TakePaymentHandler {
    schema: String,
}
impl Handler<TakePayment> for TakePaymentHandler {
    async fn handle(&self, cmd: &TakePayment, ctx: &mut RequestContext) -> Result<(), Error> {
        if cmd.amount_cents > CARD_LIMIT_CENTS {
            let reason = format!(
                "card declined: {} cents is over the limit",
                cmd.amount_cents
            );
            println!(
                "  [payments] order {}: {reason}; sending the fault back",
                short(cmd.order_id)
            );
            let fault = PaymentFailed {
                id: Uuid::now_v7(),
                order_id: cmd.order_id,
                reason,
            };
            ctx.deposit_post(&fault).await?;
            return Ok(());
        }
        if cmd.amount_cents > REVIEW_ABOVE_CENTS {
            println!(
                "  [payments] order {}: {} cents sent to manual review; no answer for now",
                short(cmd.order_id),
                cmd.amount_cents
            );
            return Ok(());
        }
        let payment_id = Uuid::now_v7();
        sqlx::query(&format!(
            "INSERT INTO {}.payments (id, order_id, amount_cents) VALUES ($1, $2, $3)",
            self.schema
        ))
        .bind(payment_id)
        .bind(cmd.order_id)
        .bind(cmd.amount_cents)
        .execute(pg_transaction(ctx)?)
        .await
        .map_err(db_error)?;
        println!(
            "  [payments] order {}: charged {} cents",
            short(cmd.order_id),
            cmd.amount_cents
        );
        let taken = PaymentTaken {
            id: Uuid::now_v7(),
            order_id: cmd.order_id,
            payment_id,
        };
        ctx.deposit_post(&taken).await?;
        Ok(())
    }
}

async fn exec(pool: &PgPool, sql: &str) -> Result<(), Error> {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| Error::transport("set up the sample's tables", e))
}

/// What a service is made of, before it runs: its processor, its
/// dispatcher (not started), its outbox, and the orchestrated orders
/// service's saga store.
struct Parts {
    processor: CommandProcessor,
    dispatcher: Dispatcher,
    outbox: PgOutbox,
    sagas: Option<PgSagaStore>,
}

impl Parts {
    fn new(
        processor: CommandProcessor,
        subscriptions: Vec<Subscription>,
        outbox: PgOutbox,
        sagas: Option<PgSagaStore>,
    ) -> Result<Parts, Error> {
        let mut dispatcher = Dispatcher::builder(processor.clone());
        for subscription in subscriptions {
            dispatcher = dispatcher.subscription(subscription);
        }
        Ok(Parts {
            processor,
            dispatcher: dispatcher.build()?,
            outbox,
            sagas,
        })
    }
}

/// One service's processor, dispatcher and sweeper, running.
struct Service {
    processor: CommandProcessor,
    dispatcher: Dispatcher,
    sweeper: brighter::RunningSweeper,
}

impl Service {
    async fn start(parts: Parts) -> Result<Self, Error> {
        let Parts {
            processor,
            dispatcher,
            outbox,
            ..
        } = parts;
        dispatcher.start().await?;
        // Running once every subscription has its queue or topic: what is
        // posted after this reaches it.
        sample_support::wait_until(
            "the subscriptions' start",
            Duration::from_secs(30),
            async || dispatcher.health().iter().all(|h| h.is_healthy()),
        )
        .await?;
        let sweeper = PgSweeper::new(outbox, processor.clone())
            .min_age(Duration::from_millis(500))
            .start()
            .await?;
        Ok(Service {
            processor,
            dispatcher,
            sweeper,
        })
    }

    async fn stop(self) {
        self.dispatcher.shutdown().await;
        self.sweeper.stop().await;
    }
}

/// Which service(s) this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Both,
    Orders,
    Payments,
}

/// Who runs the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Each service reacts to the last message.
    Choreography,
    /// A process manager (the order saga) runs each order.
    Orchestration,
}

/// The sample's own options.
struct Args {
    role: Role,
    run: Option<String>,
    flow: Flow,
    /// The common sample options.
    rest: Vec<String>,
}

/// `--service both|orders|payments`, `--run RUN` and `--flow
/// choreography|orchestration` out of `args`; the rest are the common
/// sample options.
fn parse(args: Vec<String>) -> Result<Args, Error> {
    let mut parsed = Args {
        role: Role::Both,
        run: None,
        flow: Flow::Choreography,
        rest: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--service" => {
                parsed.role = match args.next().as_deref() {
                    Some("both") => Role::Both,
                    Some("orders") => Role::Orders,
                    Some("payments") => Role::Payments,
                    other => {
                        return Err(Error::configuration(format!(
                            "--service {other:?}: use both, orders or payments"
                        )));
                    }
                }
            }
            "--flow" => {
                parsed.flow = match args.next().as_deref() {
                    Some("choreography") => Flow::Choreography,
                    Some("orchestration") => Flow::Orchestration,
                    other => {
                        return Err(Error::configuration(format!(
                            "--flow {other:?}: use choreography or orchestration"
                        )));
                    }
                }
            }
            "--run" => {
                let value = args.next().unwrap_or_default();
                if value.is_empty()
                    || !value
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                {
                    return Err(Error::configuration(
                        "--run needs lower-case letters and digits (both processes of a run name it)",
                    ));
                }
                parsed.run = Some(value);
            }
            _ => parsed.rest.push(arg),
        }
    }
    if parsed.role != Role::Both && parsed.run.is_none() {
        return Err(Error::configuration(
            "--service orders|payments needs --run RUN, the same for both processes",
        ));
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = parse(std::env::args().skip(1).collect())?;
    let options = sample_support::options(args.rest, "memory", "postgres")?;
    if options.outbox != "postgres" {
        return Err(Error::configuration(
            "the orders sample needs --outbox postgres (the default)",
        ));
    }
    let service = match args.role {
        Role::Payments => "payments",
        Role::Both | Role::Orders => "orders",
    };
    let _telemetry = sample_support::telemetry(service)?;
    let transport = sample_support::transport(&options.transport, "orders")?;
    let names = args.run.as_deref().map_or_else(Names::new, Names::of);
    if options.asyncapi {
        let pool = sample_support::postgres_lazy()?;
        let setting = Setting {
            transport: &transport,
            pool: &pool,
            names: &names,
            flow: args.flow,
            migrate: false,
        };
        let mut parts = Vec::new();
        if args.role != Role::Payments {
            parts.push(orders_parts(&setting).await?);
        }
        if args.role != Role::Orders {
            parts.push(payments_parts(&setting).await?);
        }
        let processors: Vec<&CommandProcessor> = parts.iter().map(|p| &p.processor).collect();
        let dispatchers: Vec<&Dispatcher> = parts.iter().map(|p| &p.dispatcher).collect();
        sample_support::print_asyncapi(
            service,
            "Orders and payments: an order's payment, choreographed or run by the order saga, with a payment timeout",
            &processors,
            &dispatchers,
        );
        return Ok(());
    }
    let pool = sample_support::postgres().await?;
    let (o, p) = (&names.orders, &names.payments);
    let orders_tables = format!(
        "CREATE SCHEMA {o};
         CREATE TABLE {o}.stock (sku text PRIMARY KEY, available int NOT NULL, reserved int NOT NULL);
         CREATE TABLE {o}.orders (id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL,
                                  amount_cents bigint NOT NULL, status text NOT NULL);
         INSERT INTO {o}.stock VALUES ('tea', 10, 0), ('piano', 1, 0), ('kettle', 5, 0);"
    );
    let payments_tables = format!(
        "CREATE SCHEMA {p};
         CREATE TABLE {p}.payments (id uuid PRIMARY KEY, order_id uuid NOT NULL, amount_cents bigint NOT NULL);"
    );
    let (create, drop) = match args.role {
        Role::Both => (
            format!("{orders_tables}{payments_tables}"),
            format!("DROP SCHEMA {o} CASCADE; DROP SCHEMA {p} CASCADE;"),
        ),
        Role::Orders => (orders_tables, format!("DROP SCHEMA {o} CASCADE;")),
        Role::Payments => (payments_tables, format!("DROP SCHEMA {p} CASCADE;")),
    };
    exec(&pool, &create).await?;
    let setting = Setting {
        transport: &transport,
        pool: &pool,
        names: &names,
        flow: args.flow,
        migrate: true,
    };
    println!(
        "flow: {}",
        match args.flow {
            Flow::Choreography => "choreography (each service reacts to the last message)",
            Flow::Orchestration =>
                "orchestration (a process manager, the order saga, runs each order)",
        }
    );
    let result = match args.role {
        Role::Both => run_both(&options, &setting).await,
        Role::Orders => run_orders(&options, &setting).await,
        Role::Payments => serve_payments(&setting).await,
    };
    exec(&pool, &drop).await?;
    result
}

/// What every part of a run works with.
struct Setting<'a> {
    transport: &'a sample_support::Transport,
    pool: &'a PgPool,
    names: &'a Names,
    flow: Flow,
    /// Whether the stores create their tables (not for `--asyncapi`, which
    /// touches no database).
    migrate: bool,
}

/// The payments service alone, until SIGTERM or Ctrl-C.
async fn serve_payments(setting: &Setting<'_>) -> Result<(), Error> {
    let payments = start_payments(setting).await?;
    println!("payments service running over {}", setting.transport.name);
    sample_support::stop_signal().await;
    payments.stop().await;
    println!("payments service stopped");
    Ok(())
}

/// The orders service alone: places the orders through a payments service
/// in another process and checks this side's end state.
async fn run_orders(options: &sample_support::Options, setting: &Setting<'_>) -> Result<(), Error> {
    let (orders, sagas) = start_orders(setting).await?;
    println!(
        "orders service running over {} (outbox: {}); payments in another process",
        setting.transport.name, options.outbox
    );
    let result = place_orders(&orders, setting).await;
    orders.stop().await;
    let placed = result?;
    check(setting, &placed, sagas.as_ref(), None).await
}

/// Both services in this process.
async fn run_both(options: &sample_support::Options, setting: &Setting<'_>) -> Result<(), Error> {
    let (orders, sagas) = start_orders(setting).await?;
    let payments = start_payments(setting).await?;
    println!(
        "orders and payments services running over {} (outbox: {})",
        setting.transport.name, options.outbox
    );
    let result = place_orders(&orders, setting).await;
    orders.stop().await;
    payments.stop().await;
    let placed = result?;
    let payments_made: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.payments",
        setting.names.payments
    ))
    .fetch_one(setting.pool)
    .await
    .map_err(db_error)?;
    check(setting, &placed, sagas.as_ref(), Some(payments_made)).await
}

/// The orders service, running; with the saga's store, orchestrated.
async fn start_orders(setting: &Setting<'_>) -> Result<(Service, Option<PgSagaStore>), Error> {
    let parts = orders_parts(setting).await?;
    let sagas = parts.sagas.clone();
    Ok((Service::start(parts).await?, sagas))
}

/// The orders service's parts: its processor (the choreographed handlers,
/// each a unit of work with an inbox, or the order saga), its subscriptions
/// and outbox.
async fn orders_parts(setting: &Setting<'_>) -> Result<Parts, Error> {
    let (pool, names) = (setting.pool, setting.names);
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&names.orders)
        .migrate(setting.migrate)
        .build()
        .await?;
    let inbox = PgInbox::builder(pool.clone())
        .schema(&names.orders)
        .migrate(setting.migrate)
        .build()
        .await?;
    let builder = CommandProcessor::builder()
        .inbox(inbox)
        .publication::<TakePayment>(
            Publication::command(&names.take_payment).source("urn:sample:orders"),
        )
        .producer(setting.transport.producer.clone())
        .outbox(outbox.clone());
    let channels = &setting.transport.channels;
    let mut subscriptions = vec![
        Subscription::event::<PaymentTaken>(
            format!("orders-paid-{}", names.orders),
            &names.payment_taken,
            channels.clone(),
        ),
        Subscription::event::<PaymentFailed>(
            format!("orders-failed-{}", names.orders),
            &names.payment_failed,
            channels.clone(),
        ),
    ];
    let (processor, sagas) = match setting.flow {
        Flow::Choreography => (choreographed(builder, pool, names).build()?, None),
        Flow::Orchestration => {
            let sagas = PgSagaStore::builder(pool.clone())
                .schema(&names.orders)
                .migrate(setting.migrate)
                .build()
                .await?;
            let saga = SagaBuilder::new(
                OrderSaga {
                    orders: names.orders(),
                },
                sagas.clone(),
            )
            .starts::<PlaceOrder>()
            .handles_event::<PaymentTaken>()
            .handles_event::<PaymentFailed>()
            .handles::<PaymentTimeout>();
            subscriptions.push(Subscription::command::<PaymentTimeout>(
                format!("orders-timeout-{}", names.orders),
                &names.payment_timeout,
                channels.clone(),
            ));
            let processor = builder
                .saga(saga)
                .publication::<PaymentTimeout>(
                    Publication::command(&names.payment_timeout).source("urn:sample:orders"),
                )
                .build()?;
            (processor, Some(sagas))
        }
    };
    Parts::new(processor, subscriptions, outbox, sagas)
}

/// The choreographed orders handlers, each in a unit of work, the events'
/// with the inbox.
fn choreographed(
    builder: CommandProcessorBuilder,
    pool: &PgPool,
    names: &Names,
) -> CommandProcessorBuilder {
    let unit_of_work = || Pipeline::new().step(PgUnitOfWork::new(pool.clone()));
    builder
        .command_with(
            unit_of_work(),
            PlaceOrderHandler {
                orders: names.orders(),
            },
        )
        .event_with(
            unit_of_work().step(UseInbox::new("orders.payment-taken")),
            PaymentTakenHandler {
                orders: names.orders(),
            },
        )
        .event_with(
            unit_of_work().step(UseInbox::new("orders.payment-failed")),
            PaymentFailedHandler {
                orders: names.orders(),
            },
        )
}

/// The payments service, running.
async fn start_payments(setting: &Setting<'_>) -> Result<Service, Error> {
    Service::start(payments_parts(setting).await?).await
}

/// The payments service's parts.
async fn payments_parts(setting: &Setting<'_>) -> Result<Parts, Error> {
    let (pool, names) = (setting.pool, setting.names);
    let unit_of_work = || Pipeline::new().step(PgUnitOfWork::new(pool.clone()));
    let payments_outbox = PgOutbox::builder(pool.clone())
        .schema(&names.payments)
        .migrate(setting.migrate)
        .build()
        .await?;
    let payments_inbox = PgInbox::builder(pool.clone())
        .schema(&names.payments)
        .migrate(setting.migrate)
        .build()
        .await?;
    let payments_processor = CommandProcessor::builder()
        .inbox(payments_inbox)
        .command_with(
            unit_of_work().step(UseInbox::new("payments.take")),
            TakePaymentHandler {
                schema: names.payments.clone(),
            },
        )
        .publication::<PaymentTaken>(
            Publication::event(&names.payment_taken).source("urn:sample:payments"),
        )
        .publication::<PaymentFailed>(
            Publication::event(&names.payment_failed).source("urn:sample:payments"),
        )
        .producer(setting.transport.producer.clone())
        .outbox(payments_outbox.clone())
        .build()?;
    Parts::new(
        payments_processor,
        vec![Subscription::command::<TakePayment>(
            format!("payments-{}", names.payments),
            &names.take_payment,
            setting.transport.channels.clone(),
        )],
        payments_outbox,
        None,
    )
}

/// The orders a run places, by id: what each should end as.
struct Placed {
    tea: Uuid,
    piano: Uuid,
    /// Orchestrated only: payments never answers it.
    kettle: Option<Uuid>,
}

/// Places the orders and waits until each has its outcome.
async fn place_orders(orders: &Service, setting: &Setting<'_>) -> Result<Placed, Error> {
    let place = async |what: &str, sku: &str, quantity: i32, amount_cents: i64, wait: Duration| {
        println!();
        println!("{what}");
        let order_id = Uuid::now_v7();
        orders
            .processor
            .send(&PlaceOrder {
                id: Uuid::now_v7(),
                order_id,
                sku: sku.into(),
                quantity,
                amount_cents,
            })
            .await?;
        sample_support::wait_until(&format!("the {sku} order's outcome"), wait, async || {
            order_status(setting, order_id).await != "awaiting payment"
        })
        .await?;
        Ok::<_, Error>(order_id)
    };
    let wait = Duration::from_secs(30);
    let tea = place("1. an order the card pays for", "tea", 2, 1_000, wait).await?;
    let piano = place(
        "2. an order the card declines: the fault comes back and the order is compensated",
        "piano",
        1,
        500_000,
        wait,
    )
    .await?;
    let kettle = match setting.flow {
        Flow::Choreography => None,
        Flow::Orchestration => Some(
            place(
                "3. an order payments never answers: the saga's payment timeout cancels it",
                "kettle",
                1,
                60_000,
                wait + PAYMENT_TIMEOUT,
            )
            .await?,
        ),
    };
    Ok(Placed { tea, piano, kettle })
}

async fn order_status(setting: &Setting<'_>, id: Uuid) -> String {
    sqlx::query_scalar::<_, String>(&format!(
        "SELECT status FROM {}.orders WHERE id = $1",
        setting.names.orders
    ))
    .bind(id)
    .fetch_one(setting.pool)
    .await
    .unwrap_or_default()
}

/// Checks the end state; `payments_made` when this process can see the
/// payments service's table; the saga instances when orchestrated.
async fn check(
    setting: &Setting<'_>,
    placed: &Placed,
    sagas: Option<&PgSagaStore>,
    payments_made: Option<i64>,
) -> Result<(), Error> {
    let stock: Vec<(String, i32, i32)> = sqlx::query_as(&format!(
        "SELECT sku, available, reserved FROM {}.stock ORDER BY sku",
        setting.names.orders
    ))
    .fetch_all(setting.pool)
    .await
    .map_err(db_error)?;
    let tea = order_status(setting, placed.tea).await;
    let piano = order_status(setting, placed.piano).await;
    println!();
    println!("end state:");
    println!("  tea order:    {tea}");
    println!("  piano order:  {piano}");
    let mut right = tea == "paid" && piano.starts_with("cancelled: payment failed");
    if let Some(kettle_id) = placed.kettle {
        let kettle = order_status(setting, kettle_id).await;
        println!("  kettle order: {kettle}");
        right &= kettle == "cancelled: payment timed out";
    }
    for (sku, available, reserved) in &stock {
        println!("  stock {sku}: {available} available, {reserved} reserved");
    }
    if let Some(made) = payments_made {
        println!("  payments taken: {made}");
        right &= made == 1;
    }
    if let Some(sagas) = sagas {
        let expected = [
            (placed.tea, "completed"),
            (placed.piano, "failed"),
            (placed.kettle.unwrap_or_default(), "failed"),
        ];
        for (order_id, status) in expected {
            let instance = sagas.get("order", &order_id.to_string()).await?;
            let found = instance.as_ref().map_or("missing", |i| i.status.as_str());
            let reason = instance
                .as_ref()
                .and_then(|i| i.status.reason().map(|r| format!(": {r}")))
                .unwrap_or_default();
            println!(
                "  order saga {}: {found}{reason} (version {})",
                short(order_id),
                instance.as_ref().map_or(0, |i| i.version)
            );
            right &= found == status;
        }
    }
    let expected_stock = vec![
        ("kettle".to_owned(), 5, 0),
        ("piano".to_owned(), 1, 0),
        ("tea".to_owned(), 8, 0),
    ];
    if !right || stock != expected_stock {
        return Err(Error::configuration(
            "the conversation ended in the wrong state",
        ));
    }
    println!();
    match setting.flow {
        Flow::Choreography => println!(
            "done: tea paid and shipped; piano payment failed, stock released, order cancelled"
        ),
        Flow::Orchestration => println!(
            "done: orchestrated: tea paid and shipped; piano payment failed and kettle payment timed out, stock released, orders cancelled"
        ),
    }
    Ok(())
}
