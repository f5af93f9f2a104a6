//! The orchestrated flow: a process manager, `OrderSaga`, drives each order.
//! It reserves the stock, asks payments to take the payment and sets itself
//! a payment timeout; then the first of `PaymentTaken`, `PaymentFailed` or
//! its `PaymentTimeout` decides: ship, or release the stock and cancel. The
//! order's state, the saga's inbox record and what it sends commit in one
//! transaction per step; a timeout that comes after the order was decided
//! finds the instance ended and is ignored.

use std::time::Duration;

use brighter::postgres::pg_transaction;
use brighter::uuid::Uuid;
use brighter::{Error, RequestContext, Saga, SagaContext, SagaStep};
use serde::{Deserialize, Serialize};

use crate::model::{
    Orders, PaymentFailed, PaymentTaken, PaymentTimeout, PlaceOrder, TakePayment, short,
};

/// How long payments has to answer before the order is cancelled, by default.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where one order is, kept between the saga's steps.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OrderState {
    /// The order.
    pub order_id: Option<Uuid>,
    /// What it is for.
    pub sku: String,
    /// The step it is at.
    pub step: String,
}

/// The process manager of one order, keyed by the order id.
pub struct OrderSaga {
    pub(crate) orders: Orders,
    /// How long it waits for payments to answer.
    pub payment_timeout: Duration,
}

impl Saga for OrderSaga {
    type State = OrderState;
    const NAME: &'static str = "order";
}

impl SagaStep<PlaceOrder> for OrderSaga {
    fn correlate(&self, cmd: &PlaceOrder, _: &RequestContext) -> String {
        cmd.order_id.to_string()
    }

    async fn handle(
        &self,
        cmd: &PlaceOrder,
        saga: &mut SagaContext<'_, OrderState>,
    ) -> Result<(), Error> {
        let state = saga.state_mut();
        state.order_id = Some(cmd.order_id);
        state.sku.clone_from(&cmd.sku);
        if !self
            .orders
            .place(pg_transaction(saga.context())?, cmd)
            .await?
        {
            saga.state_mut().step = "out of stock".into();
            saga.fail(format!("{} x {} is not in stock", cmd.quantity, cmd.sku));
            return Ok(());
        }
        saga.post(&TakePayment {
            id: Uuid::now_v7(),
            order_id: cmd.order_id,
            amount_cents: cmd.amount_cents,
        })
        .await?;
        saga.schedule(
            &PaymentTimeout {
                id: Uuid::now_v7(),
                order_id: cmd.order_id,
            },
            self.payment_timeout,
        )
        .await?;
        saga.state_mut().step = "awaiting payment".into();
        println!(
            "  [saga]     order {}: payment requested, timeout in {}s",
            short(cmd.order_id),
            self.payment_timeout.as_secs()
        );
        Ok(())
    }
}

impl SagaStep<PaymentTaken> for OrderSaga {
    fn correlate(&self, event: &PaymentTaken, _: &RequestContext) -> String {
        event.order_id.to_string()
    }

    async fn handle(
        &self,
        event: &PaymentTaken,
        saga: &mut SagaContext<'_, OrderState>,
    ) -> Result<(), Error> {
        self.orders
            .ship(pg_transaction(saga.context())?, event)
            .await?;
        saga.state_mut().step = "paid".into();
        saga.complete();
        Ok(())
    }
}

impl SagaStep<PaymentFailed> for OrderSaga {
    fn correlate(&self, event: &PaymentFailed, _: &RequestContext) -> String {
        event.order_id.to_string()
    }

    async fn handle(
        &self,
        event: &PaymentFailed,
        saga: &mut SagaContext<'_, OrderState>,
    ) -> Result<(), Error> {
        let reason = format!("payment failed ({})", event.reason);
        self.orders
            .cancel(pg_transaction(saga.context())?, event.order_id, &reason)
            .await?;
        saga.state_mut().step = "payment failed".into();
        saga.fail(reason);
        Ok(())
    }
}

impl SagaStep<PaymentTimeout> for OrderSaga {
    fn correlate(&self, timeout: &PaymentTimeout, _: &RequestContext) -> String {
        timeout.order_id.to_string()
    }

    async fn handle(
        &self,
        timeout: &PaymentTimeout,
        saga: &mut SagaContext<'_, OrderState>,
    ) -> Result<(), Error> {
        self.orders
            .cancel(
                pg_transaction(saga.context())?,
                timeout.order_id,
                "payment timed out",
            )
            .await?;
        saga.state_mut().step = "payment timed out".into();
        saga.fail("payment timed out");
        Ok(())
    }
}
