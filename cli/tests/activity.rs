//! `brighter activity` on the orders saga over RabbitMQ and Postgres, stopped
//! half-way: the orders service's consumer of payment results is out of
//! service, so the payment is taken and its answer is never handled. The
//! activity shows exactly what each service sent and received, and that the
//! conversation waits for `PaymentTaken`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use brighter::uuid::Uuid;
use common::{brighter, fresh, pool, scalar, until};
use orders::model::PlaceOrder;
use orders::services::{Flow, Names, Setting, exec, start_orders, start_payments};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_shows_what_each_service_sent_and_received_and_where_the_saga_stopped() {
    let pool = pool().await;
    let names = Names::of(&fresh("act"));
    exec(
        &pool,
        &format!("{}{}", names.orders_tables(), names.payments_tables()),
    )
    .await
    .unwrap();
    let transport = sample_support::transport("rabbitmq", "orders").unwrap();
    let setting = Setting {
        transport: &transport,
        pool: &pool,
        names: &names,
        flow: Flow::Orchestration,
        migrate: true,
        payment_timeout: Duration::from_secs(3600),
    };
    let (orders, _sagas) = start_orders(&setting).await.unwrap();
    let payments = start_payments(&setting).await.unwrap();
    // Half-way: the orders service stops consuming payment results.
    orders
        .dispatcher
        .stop_subscription(&format!("orders-paid-{}", names.orders))
        .await
        .unwrap();

    let place = PlaceOrder {
        id: Uuid::now_v7(),
        order_id: Uuid::now_v7(),
        sku: "tea".into(),
        quantity: 1,
        amount_cents: 500,
    };
    orders.processor.send(&place).await.unwrap();
    let answered = format!(
        "SELECT count(*) FROM {}.outbox WHERE dispatched IS NOT NULL",
        names.payments
    );
    until(
        "the payment's answer",
        Duration::from_secs(30),
        async || scalar(&pool, &answered).await == 1,
    )
    .await;

    let correlation = place.id.to_string();
    let services = [
        format!("orders={}", names.orders),
        format!("payments={}", names.payments),
    ];
    let args = [
        "activity",
        &correlation,
        "--service",
        &services[0],
        "--service",
        &services[1],
    ];
    let table = brighter(&args, &[]).await;
    assert!(table.ok, "{}", table.stderr);
    let json = brighter(&[&["--json"], &args[..]].concat(), &[])
        .await
        .json();
    orders.stop().await;
    payments.stop().await;
    exec(
        &pool,
        &format!(
            "DROP SCHEMA {} CASCADE; DROP SCHEMA {} CASCADE;",
            names.orders, names.payments
        ),
    )
    .await
    .unwrap();

    let steps: Vec<(String, String, String, String)> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let text = |key: &str| s[key].as_str().unwrap_or_default().to_owned();
            (
                text("service"),
                text("direction"),
                text("message"),
                s["whereabouts"]["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut seen: Vec<(&str, &str, &str, &str)> = steps
        .iter()
        .map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.as_str(), d.as_str()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("orders", "received", "PlaceOrder", "handled"),
            ("orders", "sent", "PaymentTimeout", "scheduled"),
            ("orders", "sent", "TakePayment", "dispatched"),
            ("payments", "received", "TakePayment", "handled"),
            ("payments", "sent", "PaymentTaken", "dispatched"),
        ],
        "exactly what each service sent and received"
    );
    let take = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["message"] == "TakePayment" && s["direction"] == "sent")
        .unwrap();
    assert_eq!(take["handled_by"][0], "payments (payments.take)");
    let stopped = json["stopped"].as_str().unwrap();
    assert!(
        stopped.contains("PaymentTaken") && stopped.contains("no service asked has handled it"),
        "{stopped}"
    );
    assert!(
        table.stdout.contains("stopped: waiting: PaymentTaken"),
        "{}",
        table.stdout
    );
}
