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

use std::time::Duration;

use brighter::postgres::PgSagaStore;
use brighter::sqlx;
use brighter::uuid::Uuid;
use brighter::{CommandProcessor, Dispatcher, Error, SagaStore};

use orders::model::{PlaceOrder, db_error, short};
use orders::saga::PAYMENT_TIMEOUT;
use orders::services::{
    Flow, Names, Service, Setting, exec, orders_parts, payments_parts, start_orders, start_payments,
};

/// Which service(s) this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Both,
    Orders,
    Payments,
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
            payment_timeout: PAYMENT_TIMEOUT,
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
    let (orders_tables, payments_tables) = (names.orders_tables(), names.payments_tables());
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
        payment_timeout: PAYMENT_TIMEOUT,
    };
    // The flow is the orders side's: payments answers the same either way.
    if args.role != Role::Payments {
        println!(
            "flow: {}",
            match args.flow {
                Flow::Choreography => "choreography (each service reacts to the last message)",
                Flow::Orchestration =>
                    "orchestration (a process manager, the order saga, runs each order)",
            }
        );
    }
    let result = match args.role {
        Role::Both => run_both(&options, &setting).await,
        Role::Orders => run_orders(&options, &setting).await,
        Role::Payments => serve_payments(&setting).await,
    };
    exec(&pool, &drop).await?;
    result
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
