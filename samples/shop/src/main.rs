//! Shop: a microservice as users build one with brighter.
//!
//! - `POST /orders {"item": "tea"}` opens a sqlx transaction, writes the order
//!   row, `deposit_post`s an `OrderPlaced` event in the same transaction,
//!   commits, asks for the event to be sent at once and answers `202` with the
//!   order's id. If the send fails (or the process dies first), the
//!   `PgSweeper` running in this binary sends it later: the row and the event
//!   exist together or not at all.
//! - The dispatcher in this binary consumes `OrderPlaced` (a unit of work with
//!   an inbox, so a redelivery ships nothing twice) and marks the order
//!   `shipped`. `GET /orders/{id}` shows it.
//! - `GET /healthz` (liveness: the process answers) and `GET /readyz`
//!   (readiness: the database, the broker and every subscription), as JSON;
//!   `503` when not ready. `POST /admin/subscriptions/{name}/stop|start`
//!   takes a subscription out of (and back into) service. `GET
//!   /asyncapi.json` is its AsyncAPI document (also `shop --asyncapi`, which
//!   prints it and exits without a database).
//! - SIGTERM or Ctrl-C: stop taking HTTP requests, drain the pump within
//!   `SHOP_DRAIN_TIMEOUT_MS`, stop the sweeper, flush telemetry, exit 0.
//!
//! Configuration from the environment (12-factor), with defaults:
//! `SHOP_ADDR` (`127.0.0.1:8080`), `SHOP_TRANSPORT` (`memory`, `rabbitmq`,
//! `kafka`), `SHOP_SCHEMA` (`shop`: its tables, outbox and inbox, and the
//! topic `<schema>.order-placed`), `SHOP_DRAIN_TIMEOUT_MS` (`10000`),
//! `DATABASE_URL`, `AMQP_ADDR`, `KAFKA_BROKERS`, `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (with `--features otel`).
//!
//! Run with: cargo run -p shop        then: curl -d '{"item":"tea"}' -H 'content-type: application/json' localhost:8080/orders
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use brighter::pipeline::{Pipeline, UseInbox};
use brighter::postgres::{PgInbox, PgOutbox, PgSweeper, PgUnitOfWork, pg_transaction};
use brighter::sqlx::{self, PgPool};
use brighter::uuid::Uuid;
use brighter::{
    CommandProcessor, Dispatcher, Error, Event, Handler, Publication, RequestContext, Subscription,
    SubscriptionState,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An order was placed.
#[derive(Debug, Clone, Event, Serialize, Deserialize, JsonSchema)]
struct OrderPlaced {
    id: Uuid,
    order_id: Uuid,
    item: String,
}

/// The service's settings, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    addr: String,
    transport: String,
    schema: String,
    drain_timeout: Duration,
}

impl Settings {
    fn from_env() -> Result<Self, Error> {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        let drain_ms = var("SHOP_DRAIN_TIMEOUT_MS", "10000");
        let drain_timeout = Duration::from_millis(drain_ms.parse().map_err(|_| {
            Error::configuration(format!(
                "SHOP_DRAIN_TIMEOUT_MS must be a number of milliseconds, not '{drain_ms}'"
            ))
        })?);
        let schema = var("SHOP_SCHEMA", "shop");
        if !schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::configuration(format!(
                "SHOP_SCHEMA must be lower-case letters, digits and '_', not '{schema}'"
            )));
        }
        Ok(Settings {
            addr: var("SHOP_ADDR", "127.0.0.1:8080"),
            transport: var("SHOP_TRANSPORT", "memory"),
            schema,
            drain_timeout,
        })
    }

    fn topic(&self) -> String {
        format!("{}.order-placed", self.schema)
    }

    fn subscription(&self) -> String {
        format!("{}-shipping", self.schema)
    }
}

fn db_error(error: sqlx::Error) -> Error {
    Error::transport("shop database", error)
}

/// Ships a placed order: marks it shipped, in the unit of work's transaction
/// (with its inbox row).
struct Shipping {
    schema: String,
}
impl Handler<OrderPlaced> for Shipping {
    async fn handle(&self, event: &OrderPlaced, ctx: &mut RequestContext) -> Result<(), Error> {
        let tx = pg_transaction(ctx)?;
        sqlx::query(&format!(
            "UPDATE {}.orders SET status = 'shipped', shipped_count = shipped_count + 1 WHERE id = $1",
            self.schema
        ))
        .bind(event.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct App {
    pool: PgPool,
    processor: CommandProcessor,
    dispatcher: Arc<Dispatcher>,
    transport: sample_support::Transport,
    schema: String,
    /// The service's AsyncAPI document, served at `/asyncapi.json`.
    asyncapi: Arc<Value>,
}

type Reply = (StatusCode, Json<Value>);

fn problem(status: StatusCode, error: impl std::fmt::Display) -> Reply {
    (status, Json(json!({ "error": error.to_string() })))
}

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

async fn place_order(State(app): State<App>, Json(order): Json<NewOrder>) -> Reply {
    if order.item.trim().is_empty() || order.item.len() > 200 {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "item must be 1 to 200 bytes",
        );
    }
    let order_id = Uuid::now_v7();
    let event = OrderPlaced {
        id: Uuid::now_v7(),
        order_id,
        item: order.item.clone(),
    };
    let placed = async {
        let mut tx = app.pool.begin().await.map_err(db_error)?;
        sqlx::query(&format!(
            "INSERT INTO {}.orders (id, item, status) VALUES ($1, $2, 'placed')",
            app.schema
        ))
        .bind(order_id)
        .bind(&order.item)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let message = app.processor.deposit_post(&event, Some(&mut tx)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok::<Uuid, Error>(message)
    };
    let message = match placed.await {
        Ok(message) => message,
        Err(error) => return problem(StatusCode::SERVICE_UNAVAILABLE, error),
    };
    // Committed: the order and its event exist. Send now; if this fails the
    // sweeper sends it, so the request has succeeded either way.
    if let Err(error) = app.processor.clear_outbox(&[message]).await {
        tracing::warn!(%order_id, %error, "the event is left to the sweeper");
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "id": order_id, "status": "placed" })),
    )
}

async fn show_order(State(app): State<App>, Path(id): Path<Uuid>) -> Reply {
    let row: Result<Option<(String, String, i32)>, _> = sqlx::query_as(&format!(
        "SELECT item, status, shipped_count FROM {}.orders WHERE id = $1",
        app.schema
    ))
    .bind(id)
    .fetch_optional(&app.pool)
    .await;
    match row {
        Ok(Some((item, status, shipped))) => (
            StatusCode::OK,
            Json(json!({ "id": id, "item": item, "status": status, "shipped_count": shipped })),
        ),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no order {id}")),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, db_error(error)),
    }
}

/// The service's AsyncAPI document: what it publishes and subscribes to.
async fn asyncapi(State(app): State<App>) -> Reply {
    (StatusCode::OK, Json(app.asyncapi.as_ref().clone()))
}

async fn healthz() -> Reply {
    (StatusCode::OK, Json(json!({ "status": "ok" })))
}

/// Ready when the database and the broker answer within a second and every
/// subscription is running and healthy.
async fn readyz(State(app): State<App>) -> Reply {
    let limit = Duration::from_secs(1);
    let database = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&app.pool))
        .await
        .map_err(|_| Error::Timeout(limit).to_string())
        .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
    let broker = app.transport.ping(limit).await.map_err(|e| e.to_string());
    let subscriptions: Vec<Value> = app
        .dispatcher
        .health()
        .iter()
        .map(|h| {
            json!({
                "name": h.name,
                "state": format!("{:?}", h.state),
                "healthy": h.is_healthy(),
                "handled": h.handled,
                "dead_lettered": h.dead_lettered,
            })
        })
        .collect();
    let ready =
        database.is_ok() && broker.is_ok() && subscriptions.iter().all(|s| s["healthy"] == true);
    let check = |r: &Result<(), String>| match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "database": check(&database),
            "broker": check(&broker),
            "subscriptions": subscriptions,
        })),
    )
}

async fn control_subscription(
    State(app): State<App>,
    Path((name, action)): Path<(String, String)>,
) -> Reply {
    let result = match action.as_str() {
        "stop" => app.dispatcher.stop_subscription(&name).await.map(|_| ()),
        "start" => app.dispatcher.start_subscription(&name).await,
        other => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("no action '{other}': use stop or start"),
            );
        }
    };
    match result {
        Ok(()) => {
            let state = app
                .dispatcher
                .subscription_health(&name)
                .map(|h| h.state)
                .unwrap_or(SubscriptionState::Stopped);
            (
                StatusCode::OK,
                Json(json!({ "name": name, "state": format!("{state:?}") })),
            )
        }
        Err(error) => problem(StatusCode::NOT_FOUND, error),
    }
}

async fn setup_tables(pool: &PgPool, schema: &str) -> Result<(), Error> {
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.orders (
             id uuid PRIMARY KEY,
             item text NOT NULL,
             status text NOT NULL,
             shipped_count int NOT NULL DEFAULT 0,
             created_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(db_error)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let settings = Settings::from_env()?;
    // `--asyncapi`: print the document and exit, touching no database.
    let document_only = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--asyncapi") => true,
        Some(other) => {
            return Err(Error::configuration(format!(
                "unexpected argument '{other}': the shop is configured by its environment (SHOP_*); --asyncapi prints its AsyncAPI document"
            )));
        }
    };
    let telemetry = sample_support::telemetry("shop")?;
    let transport = sample_support::transport(&settings.transport, &settings.schema)?;
    let pool = if document_only {
        sample_support::postgres_lazy()?
    } else {
        let pool = sample_support::postgres().await?;
        setup_tables(&pool, &settings.schema).await?;
        pool
    };
    let outbox = PgOutbox::builder(pool.clone())
        .schema(&settings.schema)
        .migrate(!document_only)
        .build()
        .await?;
    let inbox = PgInbox::builder(pool.clone())
        .schema(&settings.schema)
        .migrate(!document_only)
        .build()
        .await?;
    let processor = CommandProcessor::builder()
        .inbox(inbox)
        .event_with(
            Pipeline::new()
                .step(PgUnitOfWork::new(pool.clone()))
                .step(UseInbox::new("shop.shipping")),
            Shipping {
                schema: settings.schema.clone(),
            },
        )
        .publication::<OrderPlaced>(Publication::event(settings.topic()).source("urn:sample:shop"))
        .producer(Arc::clone(&transport.producer))
        .outbox(outbox.clone())
        .build()?;
    let dispatcher = Dispatcher::builder(processor.clone())
        .drain_timeout(settings.drain_timeout)
        .subscription(Subscription::event::<OrderPlaced>(
            settings.subscription(),
            settings.topic(),
            Arc::clone(&transport.channels),
        ))
        .build()?;
    let document = brighter::AsyncApi::new("shop", env!("CARGO_PKG_VERSION"))
        .description("Takes orders over HTTP, publishes OrderPlaced through its outbox, and ships each placed order once")
        .processor(&processor)
        .dispatcher(&dispatcher)
        .document();
    if document_only {
        println!("{document:#}");
        return Ok(());
    }
    let dispatcher = Arc::new(dispatcher);
    dispatcher.start().await?;
    let sweeper = PgSweeper::new(outbox, processor.clone()).start().await?;

    let app = App {
        pool,
        processor,
        dispatcher: Arc::clone(&dispatcher),
        transport,
        schema: settings.schema.clone(),
        asyncapi: Arc::new(document),
    };
    let router = Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{id}", get(show_order))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/asyncapi.json", get(asyncapi))
        .route(
            "/admin/subscriptions/{name}/{action}",
            post(control_subscription),
        )
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&settings.addr)
        .await
        .map_err(|e| Error::transport(format!("listen on {} (SHOP_ADDR)", settings.addr), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::transport("the listening address", e))?;
    println!(
        "shop: listening on http://{addr} ({} transport, schema {})",
        settings.transport, settings.schema
    );

    // Stop taking requests on the signal; in-flight ones finish first.
    axum::serve(listener, router)
        .with_graceful_shutdown(sample_support::stop_signal())
        .await
        .map_err(|e| Error::transport("serve HTTP", e))?;
    println!("shop: stopping: no new requests; draining the pump");
    let report = dispatcher.shutdown().await;
    sweeper.stop().await;
    drop(telemetry);
    println!(
        "shop: stopped cleanly: {} message(s) abandoned to redelivery",
        report.abandoned.len()
    );
    Ok(())
}
