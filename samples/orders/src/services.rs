//! The two services of the sample, as parts to build and start: the orders
//! service (its choreographed handlers, or the order saga) and the payments
//! service, each with its own Postgres outbox, inbox and sweeper.

use std::time::Duration;

use brighter::pipeline::{Pipeline, UseInbox};
use brighter::postgres::{PgInbox, PgOutbox, PgSagaStore, PgSweeper, PgUnitOfWork, pg_transaction};
use brighter::sqlx::{self, PgPool};
use brighter::uuid::Uuid;
use brighter::{
    CommandProcessor, CommandProcessorBuilder, Dispatcher, Error, Handler, Publication,
    RequestContext, SagaBuilder, Subscription,
};

use crate::model::{
    Orders, PaymentFailed, PaymentTaken, PaymentTimeout, PlaceOrder, TakePayment, db_error, short,
};
use crate::saga::OrderSaga;

/// Cards are declined above this amount.
const CARD_LIMIT_CENTS: i64 = 100_000;
/// Payments above this amount (and within the card limit) go to manual
/// review, and payments does not answer.
const REVIEW_ABOVE_CENTS: i64 = 50_000;

/// Names of one run's schemas and topics (unique, so runs never mix).
#[derive(Debug, Clone)]
pub struct Names {
    /// The orders service's schema.
    pub orders: String,
    /// The payments service's schema.
    pub payments: String,
    /// Where `TakePayment` goes.
    pub take_payment: String,
    /// Where `PaymentTaken` goes.
    pub payment_taken: String,
    /// Where `PaymentFailed` goes.
    pub payment_failed: String,
    /// Where the saga's `PaymentTimeout` goes.
    pub payment_timeout: String,
}

impl Names {
    /// A fresh run's names.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let run = Uuid::now_v7().simple().to_string();
        Names::of(&run[run.len() - 12..])
    }

    /// The names of run `run` (what two processes of one run agree on).
    pub fn of(run: &str) -> Self {
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

    /// The orders service's own tables, with its stock.
    pub fn orders_tables(&self) -> String {
        let o = &self.orders;
        format!(
            "CREATE SCHEMA {o};
             CREATE TABLE {o}.stock (sku text PRIMARY KEY, available int NOT NULL, reserved int NOT NULL);
             CREATE TABLE {o}.orders (id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL,
                                      amount_cents bigint NOT NULL, status text NOT NULL);
             INSERT INTO {o}.stock VALUES ('tea', 10, 0), ('piano', 1, 0), ('kettle', 5, 0);"
        )
    }

    /// The payments service's own table.
    pub fn payments_tables(&self) -> String {
        let p = &self.payments;
        format!(
            "CREATE SCHEMA {p};
             CREATE TABLE {p}.payments (id uuid PRIMARY KEY, order_id uuid NOT NULL, amount_cents bigint NOT NULL);"
        )
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

/// Runs the statements `sql` (the sample's tables).
pub async fn exec(pool: &PgPool, sql: &str) -> Result<(), Error> {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| Error::transport("set up the sample's tables", e))
}

/// What a service is made of, before it runs: its processor, its
/// dispatcher (not started), its outbox, and the orchestrated orders
/// service's saga store.
pub struct Parts {
    /// The service's processor.
    pub processor: CommandProcessor,
    /// Its dispatcher, not started.
    pub dispatcher: Dispatcher,
    /// Its outbox.
    pub outbox: PgOutbox,
    /// The orchestrated orders service's saga store.
    pub sagas: Option<PgSagaStore>,
}

impl Parts {
    /// The parts of a service: `processor`, a dispatcher of
    /// `subscriptions`, `outbox`, and the saga store.
    pub fn new(
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
pub struct Service {
    /// The service's processor.
    pub processor: CommandProcessor,
    /// Its dispatcher, running.
    pub dispatcher: Dispatcher,
    sweeper: brighter::RunningSweeper,
}

impl Service {
    /// Starts `parts`: the dispatcher (waiting until every subscription
    /// runs) and a sweeper.
    pub async fn start(parts: Parts) -> Result<Self, Error> {
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
        let sweeper = PgSweeper::new(outbox, processor.clone()).start().await?;
        Ok(Service {
            processor,
            dispatcher,
            sweeper,
        })
    }

    /// Stops the dispatcher and the sweeper.
    pub async fn stop(self) {
        self.dispatcher.shutdown().await;
        self.sweeper.stop().await;
    }
}

/// Who runs the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Each service reacts to the last message.
    Choreography,
    /// A process manager (the order saga) runs each order.
    Orchestration,
}

/// What every part of a run works with.
pub struct Setting<'a> {
    /// The broker.
    pub transport: &'a sample_support::Transport,
    /// The database.
    pub pool: &'a PgPool,
    /// The run's schemas and topics.
    pub names: &'a Names,
    /// Who runs the conversation.
    pub flow: Flow,
    /// Whether the stores create their tables (not for `--asyncapi`, which
    /// touches no database).
    pub migrate: bool,
    /// How long the order saga waits for payments (orchestrated).
    pub payment_timeout: Duration,
}

/// The orders service, running; with the saga's store, orchestrated.
pub async fn start_orders(setting: &Setting<'_>) -> Result<(Service, Option<PgSagaStore>), Error> {
    let parts = orders_parts(setting).await?;
    let sagas = parts.sagas.clone();
    Ok((Service::start(parts).await?, sagas))
}

/// The orders service's parts: its processor (the choreographed handlers,
/// each a unit of work with an inbox, or the order saga), its subscriptions
/// and outbox.
pub async fn orders_parts(setting: &Setting<'_>) -> Result<Parts, Error> {
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
                    payment_timeout: setting.payment_timeout,
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
pub async fn start_payments(setting: &Setting<'_>) -> Result<Service, Error> {
    Service::start(payments_parts(setting).await?).await
}

/// The payments service's parts.
pub async fn payments_parts(setting: &Setting<'_>) -> Result<Parts, Error> {
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
