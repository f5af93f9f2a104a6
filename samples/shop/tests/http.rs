//! The shop service driven over HTTP as its users would, against the real
//! services (`DATABASE_URL`, `AMQP_ADDR`, `KAFKA_BROKERS`): orders placed over
//! HTTP are shipped downstream once; `/readyz` goes unready when a
//! subscription is taken out of service or fails (the broker refuses it), and
//! ready again after; SIGTERM while
//! orders are in flight exits 0, and after a restart every accepted order is
//! shipped exactly once.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use brighter::sqlx;
use brighter::uuid::Uuid;
use serde_json::{Value, json};

struct Shop {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(transport: &str, schema: &str) -> Shop {
    start_with(transport, schema, &[]).await
}

async fn start_with(transport: &str, schema: &str, env: &[(&str, &str)]) -> Shop {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_shop"))
        .envs(env.iter().copied())
        .env("SHOP_ADDR", format!("127.0.0.1:{port}"))
        .env("SHOP_TRANSPORT", transport)
        .env("SHOP_SCHEMA", schema)
        .env("SHOP_DRAIN_TIMEOUT_MS", "10000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let shop = Shop {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(format!("{}/healthz", shop.base)).send().await
            && response.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shop never answered /healthz"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shop
}

/// `/readyz` until its status is `want`; its last body.
async fn readiness(shop: &Shop, want: u16) -> Value {
    readiness_until(shop, |status, _| status == want).await
}

/// `/readyz` until `done(status, body)` holds; its last body.
async fn readiness_until(shop: &Shop, done: impl Fn(u16, &Value) -> bool) -> Value {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = client
            .get(format!("{}/readyz", shop.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if done(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn place(shop: &Shop, item: &str) -> Uuid {
    let response = reqwest::Client::new()
        .post(format!("{}/orders", shop.base))
        .json(&json!({ "item": item }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn order(shop: &Shop, id: Uuid) -> Value {
    reqwest::get(format!("{}/orders/{id}", shop.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn until_shipped(shop: &Shop, ids: &[Uuid]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let order = order(shop, *id).await;
            if order["status"] == "shipped" {
                assert_eq!(order["shipped_count"], 1, "shipped twice: {order}");
                break;
            }
            assert!(Instant::now() < deadline, "never shipped: {order}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends SIGTERM and waits for the exit; the status and what it printed.
fn terminate(mut shop: Shop) -> (std::process::ExitStatus, String) {
    let pid = shop.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = shop.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the shop did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    shop.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    (status, output)
}

async fn a_shop_over(transport: &str) {
    let schema = format!("shop_{}", Uuid::now_v7().simple());
    let shop = start(transport, &schema).await;
    let ready = readiness(&shop, 200).await;
    assert_eq!(ready["database"]["ok"], true, "{ready}");
    assert_eq!(ready["broker"]["ok"], true, "{ready}");

    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(place(&shop, &format!("item {n}")).await);
    }
    until_shipped(&shop, &ids).await;

    // A subscription out of service: not ready, and says which.
    let subscription = format!("{schema}-shipping");
    let client = reqwest::Client::new();
    let stopped = client
        .post(format!(
            "{}/admin/subscriptions/{subscription}/stop",
            shop.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    let unready = readiness(&shop, 503).await;
    assert_eq!(unready["ready"], false);
    assert_eq!(unready["subscriptions"][0]["name"], subscription.as_str());
    assert_eq!(unready["subscriptions"][0]["healthy"], false, "{unready}");
    let started = client
        .post(format!(
            "{}/admin/subscriptions/{subscription}/start",
            shop.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    readiness(&shop, 200).await;

    // SIGTERM with orders in flight: a clean exit...
    for n in 0..20 {
        ids.push(place(&shop, &format!("late item {n}")).await);
    }
    let (status, output) = terminate(shop);
    println!("{output}");
    assert!(status.success(), "exit {status:?}: {output}");
    assert!(output.contains("shop: stopped cleanly"), "{output}");

    // ...and nothing lost: after a restart every accepted order ships, once.
    let shop = start(transport, &schema).await;
    readiness(&shop, 200).await;
    until_shipped(&shop, &ids).await;
    let (status, _) = terminate(shop);
    assert!(status.success());

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let shipped: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.orders WHERE status = 'shipped' AND shipped_count = 1"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(shipped, 40);
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_over_rabbitmq_ships_every_order_once_and_stops_cleanly_on_sigterm() {
    a_shop_over("rabbitmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_over_kafka_ships_every_order_once_and_stops_cleanly_on_sigterm() {
    a_shop_over("kafka").await;
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_unready_when_a_subscription_fails_and_ready_again_when_it_recovers() {
    // A broker user of this test's own, so taking its rights away touches no
    // other test.
    let user = format!("shop_{}", Uuid::now_v7().simple());
    rabbitmqctl(&["add_user", &user, "secret"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let schema = format!("shop_{}", Uuid::now_v7().simple());
    let addr = format!("amqp://{user}:secret@127.0.0.1:5672/%2f");
    let shop = start_with("rabbitmq", &schema, &[("AMQP_ADDR", &addr)]).await;
    readiness(&shop, 200).await;

    // The broker refuses the subscription its queue, and its connection is
    // closed: the subscription cannot reopen its channel.
    rabbitmqctl(&["set_permissions", "-p", "/", &user, "^$", "^$", "^$"]);
    rabbitmqctl(&["close_all_user_connections", &user, "test: rights revoked"]);
    let failed = readiness_until(&shop, |status, body| {
        status == 503 && body["subscriptions"][0]["healthy"] == false
    })
    .await;
    println!("failed: {failed}");
    assert_eq!(failed["ready"], false);

    // Rights back: it recovers on its own.
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let ready = readiness(&shop, 200).await;
    assert_eq!(ready["subscriptions"][0]["healthy"], true, "{ready}");
    let id = place(&shop, "after recovery").await;
    until_shipped(&shop, &[id]).await;
    let (status, _) = terminate(shop);
    assert!(status.success());
    rabbitmqctl(&["delete_user", &user]);

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
