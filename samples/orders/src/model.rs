//! The orders service's own data (its stock and orders tables) and the
//! messages of the conversation with payments: what both flows, the
//! choreographed one and the orchestrated one, do to an order.

use brighter::sqlx::{self, PgConnection};
use brighter::uuid::Uuid;
use brighter::{Command, Error, Event};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

macro_rules! request {
    ($kind:ident $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, $kind)]
        #[doc = concat!("The `", stringify!($name), "` message.")]
        pub struct $name {
            /// The request id.
            pub id: Uuid,
            $(#[allow(missing_docs)] pub $field: $ty),*
        }
    };
}

request!(Command PlaceOrder { order_id: Uuid, sku: String, quantity: i32, amount_cents: i64 });
request!(Command TakePayment { order_id: Uuid, amount_cents: i64 });
request!(Event PaymentTaken { order_id: Uuid, payment_id: Uuid });
request!(Event PaymentFailed { order_id: Uuid, reason: String });
// The orchestrated flow's timeout, which the saga schedules to itself.
request!(Command PaymentTimeout { order_id: Uuid });

/// A database error in a handler (retryable).
pub fn db_error(error: sqlx::Error) -> Error {
    Error::handler(error)
}

/// The last eight hex digits of `id`, for the sample's output.
pub fn short(id: Uuid) -> String {
    let id = id.simple().to_string();
    id[id.len() - 8..].to_owned()
}

/// The orders tables of one run, in schema `schema`.
#[derive(Debug, Clone)]
pub struct Orders {
    /// The schema.
    pub schema: String,
}

impl Orders {
    /// Reserves the stock of `cmd` and records the order awaiting payment;
    /// `false` (and nothing written) when the stock is not there.
    pub async fn place(&self, tx: &mut PgConnection, cmd: &PlaceOrder) -> Result<bool, Error> {
        let s = &self.schema;
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
            return Ok(false);
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
        Ok(true)
    }

    /// Ships a paid order: its reserved stock leaves, the order is paid.
    pub async fn ship(&self, tx: &mut PgConnection, paid: &PaymentTaken) -> Result<(), Error> {
        let s = &self.schema;
        sqlx::query(&format!(
            "UPDATE {s}.stock SET reserved = reserved - o.quantity FROM {s}.orders o \
             WHERE o.id = $1 AND o.status = 'awaiting payment' AND stock.sku = o.sku"
        ))
        .bind(paid.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(&format!(
            "UPDATE {s}.orders SET status = 'paid' WHERE id = $1 AND status = 'awaiting payment'"
        ))
        .bind(paid.order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        println!(
            "  [orders]   order {} paid (payment {}); stock shipped",
            short(paid.order_id),
            short(paid.payment_id)
        );
        Ok(())
    }

    /// The compensation: releases the order's reserved stock and cancels it
    /// with `reason`.
    pub async fn cancel(
        &self,
        tx: &mut PgConnection,
        order_id: Uuid,
        reason: &str,
    ) -> Result<(), Error> {
        let s = &self.schema;
        sqlx::query(&format!(
            "UPDATE {s}.stock SET available = available + o.quantity, reserved = reserved - o.quantity \
             FROM {s}.orders o WHERE o.id = $1 AND o.status = 'awaiting payment' AND stock.sku = o.sku"
        ))
        .bind(order_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(&format!(
            "UPDATE {s}.orders SET status = 'cancelled: ' || $2 WHERE id = $1 AND status = 'awaiting payment'"
        ))
        .bind(order_id)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        println!(
            "  [orders]   order {} {reason}: reserved stock released, order cancelled",
            short(order_id)
        );
        Ok(())
    }
}
