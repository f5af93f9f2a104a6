//! The store conformance suite against the Postgres inbox (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`), a schema per check,
//! and the in-place upgrade of an inbox table of the first version.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use brighter_core::Inbox;
use brighter_core::conformance::store::{InboxHarness, TransactionHarness};
use brighter_inbox_postgres::PgInbox;
use brighter_postgres::testing::PgTransactions;

struct Pg(PgTransactions);

async fn pg() -> Pg {
    Pg(PgTransactions::connect().await)
}

#[async_trait]
impl InboxHarness for Pg {
    fn transactions(&self) -> &dyn TransactionHarness {
        &self.0
    }

    async fn inbox(&self) -> Arc<dyn Inbox> {
        let inbox = PgInbox::builder(self.0.pool.clone())
            .schema(PgTransactions::schema())
            .build()
            .await;
        Arc::new(inbox.expect("inbox"))
    }
}

brighter_core::inbox_conformance_tests!(pg);

#[tokio::test]
async fn an_inbox_table_of_the_first_version_is_upgraded_in_place_nothing_lost() {
    use brighter_core::{InboxEntry, MessageType};
    let pg = PgTransactions::connect().await;
    let schema = PgTransactions::schema();
    // The table as the first version made it, with rows of its own.
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.inbox (
             message_id  uuid        NOT NULL,
             context_key text        NOT NULL,
             handled_at  timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (message_id, context_key));
         CREATE INDEX inbox_handled_idx ON {schema}.inbox (handled_at);"
    ))
    .execute(&pg.pool)
    .await
    .unwrap();
    let old: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    for id in &old {
        sqlx::query(&format!(
            "INSERT INTO {schema}.inbox (message_id, context_key, handled_at) VALUES ($1, 'orders', '2026-01-02T03:04:05Z')"
        ))
        .bind(id)
        .execute(&pg.pool)
        .await
        .unwrap();
    }

    // Built twice: the migration upgrades once and is idempotent after.
    for _ in 0..2 {
        PgInbox::builder(pg.pool.clone())
            .schema(&schema)
            .build()
            .await
            .unwrap();
    }
    let inbox = PgInbox::builder(pg.pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let kept: Vec<(uuid::Uuid, String, chrono::DateTime<chrono::Utc>, Option<uuid::Uuid>)> =
        sqlx::query_as(&format!(
            "SELECT message_id, context_key, handled_at, correlation_id FROM {schema}.inbox ORDER BY message_id"
        ))
        .fetch_all(&pg.pool)
        .await
        .unwrap();
    assert_eq!(kept.len(), 3, "rows lost");
    for ((id, key, at, correlation), expected) in kept.iter().zip(&old) {
        assert_eq!((id, key.as_str()), (expected, "orders"));
        assert_eq!(
            at.to_rfc3339(),
            "2026-01-02T03:04:05+00:00",
            "the time changed"
        );
        assert_eq!(*correlation, None);
    }
    // The old rows still make duplicates; new rows carry their conversation.
    assert!(inbox.exists(old[0], "orders").await.unwrap());
    let err = inbox.add(old[1], "orders", None).await.unwrap_err();
    assert!(err.is_duplicate(), "{err}");
    let conversation = uuid::Uuid::now_v7();
    let entry = InboxEntry {
        correlation_id: Some(conversation),
        request_type: Some("PaymentTaken".into()),
        message_type: Some(MessageType::Event),
        topic: Some("payments.taken".into()),
        ..InboxEntry::new(uuid::Uuid::now_v7(), "orders.paid")
    };
    inbox.record(&entry, None).await.unwrap();
    let found = inbox.by_correlation(conversation).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].topic.as_deref(), Some("payments.taken"));
    assert_eq!(found[0].message_type, Some(MessageType::Event));
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pg.pool)
        .await
        .unwrap();
}
