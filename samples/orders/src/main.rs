//! Orders: a small saga between two services over a broker, each with its own
//! Postgres tables, outbox and inbox (`DATABASE_URL`).
//!
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
//! Both services run in this one process, each with its own processor,
//! dispatcher, schema, outbox and sweeper, as they would in two. The run places
//! one order that is paid and one whose payment fails, checks the end state and
//! drops its schemas.
//!
//! Or as two processes, two services (each its own `service.name`, outbox and
//! inbox): `--service payments --run R` serves payments until SIGTERM or
//! Ctrl-C; `--service orders --run R` places the two orders through it and
//! checks the orders side's end state. With `OTEL_EXPORTER_OTLP_ENDPOINT` set
//! each order is one trace across both services.
//!
//! Run with: cargo run -p orders                          (in-memory broker, Postgres)
//!           cargo run -p orders --features rabbitmq -- --transport rabbitmq
//!           cargo run -p orders --features kafka -- --transport kafka
#![allow(clippy::print_stdout)]

use std::time::Duration;

use brighter::pipeline::{Pipeline, UseInbox};
use brighter::postgres::{PgInbox, PgOutbox, PgSweeper, PgUnitOfWork, pg_transaction};
use brighter::sqlx::{self, PgPool};
use brighter::uuid::Uuid;
use brighter::{
    Command, CommandProcessor, Dispatcher, Error, Event, Handler, Publication, Request,
    RequestContext, Subscription,
};
use serde::{Deserialize, Serialize};

/// Cards are declined above this amount.
const CARD_LIMIT_CENTS: i64 = 100_000;

macro_rules! request {
    ($kind:ident $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[doc = concat!("The `", stringify!($name), "` message.")]
        struct $name {
            id: Uuid,
            $($field: $ty),*
        }
        impl Request for $name {
            fn id(&self) -> Uuid {
                self.id
            }
        }
        impl $kind for $name {}
    };
}

request!(Command PlaceOrder { order_id: Uuid, sku: String, quantity: i32, amount_cents: i64 });
request!(Command TakePayment { order_id: Uuid, amount_cents: i64 });
request!(Event PaymentTaken { order_id: Uuid, payment_id: Uuid });
request!(Event PaymentFailed { order_id: Uuid, reason: String });

fn db_error(error: sqlx::Error) -> Error {
    Error::handler(error)
}

/// Names of one run's schemas and topics (unique, so runs never mix).
#[derive(Clone)]
struct Names {
    orders: String,
    payments: String,
    take_payment: String,
    payment_taken: String,
    payment_failed: String,
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
        }
    }
}

// ------------------------------------------------------------------ orders

struct PlaceOrderHandler {
    schema: String,
}
impl Handler<PlaceOrder> for PlaceOrderHandler {
    async fn handle(&self, cmd: &PlaceOrder, ctx: &mut RequestContext) -> Result<(), Error> {
        let s = &self.schema;
        let tx = pg_transaction(ctx)?;
        let reserved = sqlx::query(&format!(
            "UPDATE {s}.stock SET available = available - $2, reserved = reserved + $2 \
             WHERE sku = $1 AND available >= $2"
        ))
        .bind(&cmd.sku)
        .bind(cmd.quantity)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if reserved.rows_affected() == 0 {
            return Err(Error::reject(format!(
                "{} x {} is not in stock",
                cmd.quantity, cmd.sku
            )));
        }
        sqlx::query(&format!(
            "INSERT INTO {s}.orders (id, sku, quantity, amount_cents, status) VALUES ($1, $2, $3, $4, 'awaiting payment')"
        ))
        .bind(cmd.order_id)
        .bind(&cmd.sku)
        .bind(cmd.quantity)
        .bind(cmd.amount_cents)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        println!(
            "  [orders]   order {} placed: {} x {} reserved, {} cents to pay",
            short(cmd.order_id),
            cmd.quantity,
            cmd.sku,
            cmd.amount_cents
        );
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
    schema: String,
}
impl Handler<PaymentTaken> for PaymentTakenHandler {
    async fn handle(&self, event: &PaymentTaken, ctx: &mut RequestContext) -> Result<(), Error> {
        let s = &self.schema;
        let tx = pg_transaction(ctx)?;
        sqlx::query(&format!(
            "UPDATE {s}.stock SET reserved = reserved - o.quantity FROM {s}.orders o \
             WHERE o.id = $1 AND o.status = 'awaiting payment' AND stock.sku = o.sku"
        ))
        .bind(event.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(&format!(
            "UPDATE {s}.orders SET status = 'paid' WHERE id = $1 AND status = 'awaiting payment'"
        ))
        .bind(event.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        println!(
            "  [orders]   order {} paid (payment {}); stock shipped",
            short(event.order_id),
            short(event.payment_id)
        );
        Ok(())
    }
}

/// The compensation: releases the reserved stock and cancels the order.
struct PaymentFailedHandler {
    schema: String,
}
impl Handler<PaymentFailed> for PaymentFailedHandler {
    async fn handle(&self, fault: &PaymentFailed, ctx: &mut RequestContext) -> Result<(), Error> {
        let s = &self.schema;
        let tx = pg_transaction(ctx)?;
        sqlx::query(&format!(
            "UPDATE {s}.stock SET available = available + o.quantity, reserved = reserved - o.quantity \
             FROM {s}.orders o WHERE o.id = $1 AND o.status = 'awaiting payment' AND stock.sku = o.sku"
        ))
        .bind(fault.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(&format!(
            "UPDATE {s}.orders SET status = 'cancelled: ' || $2 WHERE id = $1 AND status = 'awaiting payment'"
        ))
        .bind(fault.order_id)
        .bind(&fault.reason)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        println!(
            "  [orders]   order {} payment failed ({}): reserved stock released, order cancelled",
            short(fault.order_id),
            fault.reason
        );
        Ok(())
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

fn short(id: Uuid) -> String {
    let id = id.simple().to_string();
    id[id.len() - 8..].to_owned()
}

async fn exec(pool: &PgPool, sql: &str) -> Result<(), Error> {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| Error::transport("set up the sample's tables", e))
}

/// One service's processor, dispatcher and sweeper.
struct Service {
    processor: CommandProcessor,
    dispatcher: Dispatcher,
    sweeper: brighter::RunningSweeper,
}

impl Service {
    async fn start(
        processor: CommandProcessor,
        subscriptions: Vec<Subscription>,
        outbox: PgOutbox,
    ) -> Result<Self, Error> {
        let mut dispatcher = Dispatcher::builder(processor.clone());
        for subscription in subscriptions {
            dispatcher = dispatcher.subscription(subscription);
        }
        let dispatcher = dispatcher.build()?;
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

/// `--service both|orders|payments` and `--run RUN` out of `args`; the rest
/// are the common sample options.
fn role(args: Vec<String>) -> Result<(Role, Option<String>, Vec<String>), Error> {
    let (mut role, mut run, mut rest) = (Role::Both, None, Vec::new());
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--service" => {
                role = match args.next().as_deref() {
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
                run = Some(value);
            }
            _ => rest.push(arg),
        }
    }
    if role != Role::Both && run.is_none() {
        return Err(Error::configuration(
            "--service orders|payments needs --run RUN, the same for both processes",
        ));
    }
    Ok((role, run, rest))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (role, run, rest) = role(std::env::args().skip(1).collect())?;
    let options = sample_support::options(rest, "memory", "postgres")?;
    if options.outbox != "postgres" {
        return Err(Error::configuration(
            "the orders sample needs --outbox postgres (the default)",
        ));
    }
    let service = match role {
        Role::Payments => "payments",
        Role::Both | Role::Orders => "orders",
    };
    let _telemetry = sample_support::telemetry(service)?;
    let transport = sample_support::transport(&options.transport, "orders")?;
    let pool = sample_support::postgres().await?;
    let names = run.as_deref().map_or_else(Names::new, Names::of);
    let (o, p) = (&names.orders, &names.payments);
    let orders_tables = format!(
        "CREATE SCHEMA {o};
         CREATE TABLE {o}.stock (sku text PRIMARY KEY, available int NOT NULL, reserved int NOT NULL);
         CREATE TABLE {o}.orders (id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL,
                                  amount_cents bigint NOT NULL, status text NOT NULL);
         INSERT INTO {o}.stock VALUES ('tea', 10, 0), ('piano', 1, 0);"
    );
    let payments_tables = format!(
        "CREATE SCHEMA {p};
         CREATE TABLE {p}.payments (id uuid PRIMARY KEY, order_id uuid NOT NULL, amount_cents bigint NOT NULL);"
    );
    let (create, drop) = match role {
        Role::Both => (
            format!("{orders_tables}{payments_tables}"),
            format!("DROP SCHEMA {o} CASCADE; DROP SCHEMA {p} CASCADE;"),
        ),
        Role::Orders => (orders_tables, format!("DROP SCHEMA {o} CASCADE;")),
        Role::Payments => (payments_tables, format!("DROP SCHEMA {p} CASCADE;")),
    };
    exec(&pool, &create).await?;
    let result = match role {
        Role::Both => run_both(&options, &transport, &pool, &names).await,
        Role::Orders => run_orders(&options, &transport, &pool, &names).await,
        Role::Payments => serve_payments(&transport, &pool, &names).await,
    };
    exec(&pool, &drop).await?;
    result
}

/// The payments service alone, until SIGTERM or Ctrl-C.
async fn serve_payments(
    transport: &sample_support::Transport,
    pool: &PgPool,
    names: &Names,
) -> Result<(), Error> {
    let payments = start_payments(transport, pool, names).await?;
    println!("payments service running over {}", transport.name);
    sample_support::stop_signal().await;
    payments.stop().await;
    println!("payments service stopped");
    Ok(())
}

/// The orders service alone: places the orders through a payments service
/// in another process and checks this side's end state.
async fn run_orders(
    options: &sample_support::Options,
    transport: &sample_support::Transport,
    pool: &PgPool,
    names: &Names,
) -> Result<(), Error> {
    let orders = start_orders(transport, pool, names).await?;
    println!(
        "orders service running over {} (outbox: {}); payments in another process",
        transport.name, options.outbox
    );
    let result = place_orders(&orders, pool, names).await;
    orders.stop().await;
    let (tea, piano) = result?;
    check(pool, names, tea, piano, None).await
}

/// Both services in this process.
async fn run_both(
    options: &sample_support::Options,
    transport: &sample_support::Transport,
    pool: &PgPool,
    names: &Names,
) -> Result<(), Error> {
    let orders = start_orders(transport, pool, names).await?;
    let payments = start_payments(transport, pool, names).await?;
    println!(
        "orders and payments services running over {} (outbox: {})",
        transport.name, options.outbox
    );
    let result = place_orders(&orders, pool, names).await;
    orders.stop().await;
    payments.stop().await;
    let (tea, piano) = result?;
    let payments_made: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}.payments", names.payments))
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
    check(pool, names, tea, piano, Some(payments_made)).await
}

/// The orders service: its processor (a unit of work per handler, an inbox),
/// dispatcher and sweeper.
async fn start_orders(
    transport: &sample_support::Transport,
    pool: &PgPool,
    names: &Names,
) -> Result<Service, Error> {
    let unit_of_work = || Pipeline::new().step(PgUnitOfWork::new(pool.clone()));
    // The orders service.
    let orders_outbox = PgOutbox::builder(pool.clone())
        .schema(&names.orders)
        .build()
        .await?;
    let orders_inbox = PgInbox::builder(pool.clone())
        .schema(&names.orders)
        .build()
        .await?;
    let orders_processor = CommandProcessor::builder()
        .inbox(orders_inbox)
        .command_with(
            unit_of_work(),
            PlaceOrderHandler {
                schema: names.orders.clone(),
            },
        )
        .event_with(
            unit_of_work().step(UseInbox::new("orders.payment-taken")),
            PaymentTakenHandler {
                schema: names.orders.clone(),
            },
        )
        .event_with(
            unit_of_work().step(UseInbox::new("orders.payment-failed")),
            PaymentFailedHandler {
                schema: names.orders.clone(),
            },
        )
        .publication::<TakePayment>(
            Publication::command(&names.take_payment).source("urn:sample:orders"),
        )
        .producer(transport.producer.clone())
        .outbox(orders_outbox.clone())
        .build()?;
    Service::start(
        orders_processor,
        vec![
            Subscription::event::<PaymentTaken>(
                format!("orders-paid-{}", names.orders),
                &names.payment_taken,
                transport.channels.clone(),
            ),
            Subscription::event::<PaymentFailed>(
                format!("orders-failed-{}", names.orders),
                &names.payment_failed,
                transport.channels.clone(),
            ),
        ],
        orders_outbox,
    )
    .await
}

/// The payments service.
async fn start_payments(
    transport: &sample_support::Transport,
    pool: &PgPool,
    names: &Names,
) -> Result<Service, Error> {
    let unit_of_work = || Pipeline::new().step(PgUnitOfWork::new(pool.clone()));
    // The payments service.
    let payments_outbox = PgOutbox::builder(pool.clone())
        .schema(&names.payments)
        .build()
        .await?;
    let payments_inbox = PgInbox::builder(pool.clone())
        .schema(&names.payments)
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
        .producer(transport.producer.clone())
        .outbox(payments_outbox.clone())
        .build()?;
    Service::start(
        payments_processor,
        vec![Subscription::command::<TakePayment>(
            format!("payments-{}", names.payments),
            &names.take_payment,
            transport.channels.clone(),
        )],
        payments_outbox,
    )
    .await
}

/// Places the two orders and waits until each has its outcome; their ids.
async fn place_orders(
    orders: &Service,
    pool: &PgPool,
    names: &Names,
) -> Result<(Uuid, Uuid), Error> {
    let tea = Uuid::now_v7();
    let piano = Uuid::now_v7();
    println!();
    println!("1. an order the card pays for");
    orders
        .processor
        .send(&PlaceOrder {
            id: Uuid::now_v7(),
            order_id: tea,
            sku: "tea".into(),
            quantity: 2,
            amount_cents: 1_000,
        })
        .await?;
    let status = |id: Uuid| order_status(pool, &names.orders, id);
    sample_support::wait_until(
        "the tea order's payment",
        Duration::from_secs(30),
        async || status(tea).await != "awaiting payment",
    )
    .await?;
    println!();
    println!("2. an order the card declines: the fault comes back and the order is compensated");
    orders
        .processor
        .send(&PlaceOrder {
            id: Uuid::now_v7(),
            order_id: piano,
            sku: "piano".into(),
            quantity: 1,
            amount_cents: 500_000,
        })
        .await?;
    sample_support::wait_until(
        "the piano order's compensation",
        Duration::from_secs(30),
        async || status(piano).await != "awaiting payment",
    )
    .await?;
    Ok((tea, piano))
}

async fn order_status(pool: &PgPool, schema: &str, id: Uuid) -> String {
    sqlx::query_scalar::<_, String>(&format!("SELECT status FROM {schema}.orders WHERE id = $1"))
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap_or_default()
}

/// Checks the end state; `payments_made` when this process can see the
/// payments service's table.
async fn check(
    pool: &PgPool,
    names: &Names,
    tea: Uuid,
    piano: Uuid,
    payments_made: Option<i64>,
) -> Result<(), Error> {
    let status = |id: Uuid| order_status(pool, &names.orders, id);
    let stock: Vec<(String, i32, i32)> = sqlx::query_as(&format!(
        "SELECT sku, available, reserved FROM {}.stock ORDER BY sku",
        names.orders
    ))
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    let (tea_status, piano_status) = (status(tea).await, status(piano).await);
    println!();
    println!("end state:");
    println!("  tea order:   {tea_status}");
    println!("  piano order: {piano_status}");
    for (sku, available, reserved) in &stock {
        println!("  stock {sku}: {available} available, {reserved} reserved");
    }
    if let Some(made) = payments_made {
        println!("  payments taken: {made}");
    }
    let expected_stock = vec![("piano".to_owned(), 1, 0), ("tea".to_owned(), 8, 0)];
    if tea_status != "paid"
        || !piano_status.starts_with("cancelled")
        || stock != expected_stock
        || payments_made.is_some_and(|made| made != 1)
    {
        return Err(Error::configuration("the saga ended in the wrong state"));
    }
    println!();
    println!("done: tea paid and shipped; piano payment failed, stock released, order cancelled");
    Ok(())
}
