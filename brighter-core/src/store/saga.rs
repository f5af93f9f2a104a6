//! The saga store contract: where process managers keep the state of their
//! instances between steps. A step runs in one transaction of the store's:
//! the instance is loaded and locked in it, the inbox record and the
//! step's outgoing messages join it, and the new state is saved in it, so a
//! crash leaves all of a step or none of it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::store::Transaction;

/// Where a saga instance is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SagaStatus {
    /// Steps may still run.
    #[default]
    Running,
    /// A step completed it; later messages for it are ignored.
    Completed,
    /// A step failed it, for this reason; later messages for it are ignored.
    Failed(String),
}

impl SagaStatus {
    /// Whether the instance has ended (completed or failed).
    pub fn has_ended(&self) -> bool {
        !matches!(self, SagaStatus::Running)
    }

    /// The stored name: `running`, `completed` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Completed => "completed",
            SagaStatus::Failed(_) => "failed",
        }
    }

    /// The failure reason, for a failed instance.
    pub fn reason(&self) -> Option<&str> {
        match self {
            SagaStatus::Failed(reason) => Some(reason),
            _ => None,
        }
    }

    /// The status named `name` (as [`as_str`](Self::as_str) writes it), with
    /// `reason` for a failed one; `None` for an unknown name.
    pub fn parse(name: &str, reason: Option<String>) -> Option<SagaStatus> {
        match name {
            "running" => Some(SagaStatus::Running),
            "completed" => Some(SagaStatus::Completed),
            "failed" => Some(SagaStatus::Failed(reason.unwrap_or_default())),
            _ => None,
        }
    }
}

/// One saga instance as stored: its state as JSON, and a version that every
/// save increments (version 0: created by this step, never saved).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaInstance {
    /// The saga's name.
    pub saga: String,
    /// The instance's key (what messages are correlated by).
    pub key: String,
    /// The state, as JSON; `null` for a new instance.
    pub state: serde_json::Value,
    /// Saves so far; 0 for an instance a starting message just created.
    pub version: i64,
    /// Running, completed or failed.
    pub status: SagaStatus,
    /// When it was last saved (when it was created, for a new one).
    pub updated: DateTime<Utc>,
}

impl SagaInstance {
    /// A new instance of `saga` under `key`, not saved yet.
    pub fn new(saga: impl Into<String>, key: impl Into<String>) -> SagaInstance {
        SagaInstance {
            saga: saga.into(),
            key: key.into(),
            state: serde_json::Value::Null,
            version: 0,
            status: SagaStatus::Running,
            updated: Utc::now(),
        }
    }

    /// Whether no step has saved it yet.
    pub fn is_new(&self) -> bool {
        self.version == 0
    }
}

/// Stores saga instances. A saga step runs as: [`begin`](Self::begin), the
/// inbox record in that transaction, [`load`](Self::load) (which locks the
/// instance until the transaction ends, so two messages for one instance
/// never interleave), the user's step with the transaction in its context
/// (its own writes and its messages join it), [`save`](Self::save), and
/// [`commit`](Self::commit); any failure drops the transaction instead, which
/// rolls all of it back.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Begins a transaction for one step. The inbox and outbox of the
    /// processor join it, so they must work with its type (the Postgres
    /// stores with a Postgres saga store on the same database, the in-memory
    /// ones with the in-memory store).
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error>;

    /// Loads instance (`saga`, `key`) in `tx` and locks it until `tx` ends:
    /// another step of the same instance waits; steps of other instances do
    /// not. With `create`, an instance that does not exist is created (version
    /// 0, state `null`), under the same lock, so two starting messages for one
    /// key make one instance. `None` when it does not exist and `create` is
    /// false.
    async fn load(
        &self,
        tx: &mut dyn Transaction,
        saga: &str,
        key: &str,
        create: bool,
    ) -> Result<Option<SagaInstance>, Error>;

    /// Saves `instance` in `tx` with its version incremented, if its stored
    /// version is still `instance.version` (otherwise fails: another step
    /// saved it first). Returns the new version.
    async fn save(&self, tx: &mut dyn Transaction, instance: &SagaInstance) -> Result<i64, Error>;

    /// Commits a step's transaction.
    async fn commit(&self, tx: Box<dyn Transaction>) -> Result<(), Error>;

    /// Rolls a step's transaction back (dropping it does too; this waits).
    async fn rollback(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        drop(tx);
        Ok(())
    }

    /// Reads instance (`saga`, `key`) outside any step, unlocked: for tests,
    /// operations and reports.
    async fn get(&self, saga: &str, key: &str) -> Result<Option<SagaInstance>, Error>;

    /// Deletes instances that ended (completed or failed) more than
    /// `older_than` ago; returns how many. Keep it above the longest time a
    /// late message (a timeout) can still arrive: an instance deleted before
    /// its late message comes makes that message "not found".
    async fn delete_ended(&self, older_than: Duration) -> Result<u64, Error>;
}

#[async_trait]
impl<T: SagaStore + ?Sized> SagaStore for Arc<T> {
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        (**self).begin().await
    }
    async fn load(
        &self,
        tx: &mut dyn Transaction,
        saga: &str,
        key: &str,
        create: bool,
    ) -> Result<Option<SagaInstance>, Error> {
        (**self).load(tx, saga, key, create).await
    }
    async fn save(&self, tx: &mut dyn Transaction, instance: &SagaInstance) -> Result<i64, Error> {
        (**self).save(tx, instance).await
    }
    async fn commit(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        (**self).commit(tx).await
    }
    async fn rollback(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        (**self).rollback(tx).await
    }
    async fn get(&self, saga: &str, key: &str) -> Result<Option<SagaInstance>, Error> {
        (**self).get(saga, key).await
    }
    async fn delete_ended(&self, older_than: Duration) -> Result<u64, Error> {
        (**self).delete_ended(older_than).await
    }
}
